//! Image preprocessing: resize to the model's input (stretched, or ImageNet-style: shorter side
//! to a length, then a centre crop) and convert channels. The pixels stay bytes: the model
//! scales and normalises them on its device (`ImageInput::normalise` says how).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, Pixel};
use sluice_core::model::ImageInput;

/// How images are resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resampler {
    /// `fast_image_resize`'s bilinear convolution (SIMD; Pillow's algorithm, so torchvision's
    /// on PIL images): what the stage uses.
    Fast,
    /// `image`'s Triangle filter (scalar): the earlier path, kept to compare against.
    Image,
}

/// The model's input pixels for `img`, channel-major (C, H, W).
pub fn preprocess(img: &DynamicImage, spec: &ImageInput) -> Vec<u8> {
    preprocess_with(img, spec, Resampler::Fast)
}

/// [`preprocess`] with the resampler chosen.
pub fn preprocess_with(img: &DynamicImage, spec: &ImageInput, resampler: Resampler) -> Vec<u8> {
    match spec.channels {
        1 => planes(&img.to_luma8(), spec, resampler),
        _ => planes(&img.to_rgb8(), spec, resampler),
    }
}

fn planes<P>(img: &ImageBuffer<P, Vec<u8>>, spec: &ImageInput, resampler: Resampler) -> Vec<u8>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let channels = spec.channels as usize;
    let (w, h) = img.dimensions();
    // Shorter side to `side` (the longer one scaled to match, truncated), as torchvision's
    // `Resize(side)` does; or stretched to the input's size.
    let (new_w, new_h) = match spec.resize_shorter_side {
        Some(side) => {
            let scale = |long: u32, short: u32| (u64::from(side) * u64::from(long) / u64::from(short)) as u32;
            if w <= h { (side, scale(h, w)) } else { (scale(w, h), side) }
        }
        None => (spec.width, spec.height),
    };
    let resized = if (new_w, new_h) == (w, h) {
        img.as_raw().clone()
    } else {
        match resampler {
            Resampler::Fast => resize_fast(img.as_raw(), (w, h), (new_w, new_h), channels),
            Resampler::Image => imageops::resize(img, new_w, new_h, FilterType::Triangle).into_raw(),
        }
    };
    // torchvision's `CenterCrop`: the offset rounded half to even, as Python's `round` does.
    let offset = |outer: u32, inner: u32| ((f64::from(outer) - f64::from(inner)) / 2.0).round_ties_even() as usize;
    let (left, top) = (offset(new_w, spec.width), offset(new_h, spec.height));
    let (width, plane) = (spec.width as usize, (spec.width * spec.height) as usize);
    let mut out = vec![0u8; plane * channels];
    for y in 0..spec.height as usize {
        let row = &resized[((top + y) * new_w as usize + left) * channels..][..width * channels];
        for (x, pixel) in row.chunks_exact(channels).enumerate() {
            for (c, &value) in pixel.iter().enumerate() {
                out[c * plane + y * width + x] = value;
            }
        }
    }
    out
}

/// `pixels` (`from`, interleaved `channels`) resized to `to` with a bilinear convolution.
fn resize_fast(pixels: &[u8], from: (u32, u32), to: (u32, u32), channels: usize) -> Vec<u8> {
    let pixel_type = if channels == 1 { PixelType::U8 } else { PixelType::U8x3 };
    let src =
        ImageRef::new(from.0, from.1, pixels, pixel_type).expect("a buffer of its own size; u8 needs no alignment");
    let mut dst = Image::new(to.0, to.1, pixel_type);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).expect("source and destination share a pixel type");
    dst.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(width: u32, height: u32, channels: u32) -> ImageInput {
        let n = channels as usize;
        ImageInput { width, height, channels, mean: vec![0.5; n], std: vec![0.5; n], resize_shorter_side: None }
    }

    #[test]
    fn keeps_an_image_of_the_right_size_exact() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(2, 2, |x, _| image::Luma([(x * 255) as u8])));
        assert_eq!(preprocess(&img, &spec(2, 2, 1)), vec![0, 255, 0, 255]);
    }

    #[test]
    fn resizes_and_lays_out_channels_first() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(16, 16, image::Rgb([255, 0, 255])));
        let v = preprocess(&img, &spec(4, 4, 3));
        assert_eq!(v.len(), 48);
        assert!(v[..16].iter().all(|&x| x == 255));
        assert!(v[16..32].iter().all(|&x| x == 0));
        assert!(v[32..].iter().all(|&x| x == 255));
    }

    #[test]
    fn imagenet_preprocessing_keeps_the_aspect_and_crops_the_centre() {
        // 600×300: the shorter side goes to 256 (512×256), then the centre 224×224 is kept.
        // The left and right thirds are black, the middle third white: after the crop, the
        // columns at the edges are black and the centre is white.
        let img = image::RgbImage::from_fn(600, 300, |x, _| {
            if (200..400).contains(&x) { image::Rgb([255, 255, 255]) } else { image::Rgb([0, 0, 0]) }
        });
        let spec = ImageInput::imagenet();
        let v = spec.normalise(&preprocess(&DynamicImage::ImageRgb8(img), &spec));
        assert_eq!(v.len(), 3 * 224 * 224);
        let at = |c: usize, y: usize, x: usize| v[c * 224 * 224 + y * 224 + x];
        // Crop offset (512 - 224) / 2 = 144: crop columns 0..224 are resized columns 144..368,
        // black up to 170.7 (200 × 512/600) and white from there to 341.3.
        let black = |c: usize| (0.0 - spec.mean[c]) / spec.std[c];
        let white = |c: usize| (1.0 - spec.mean[c]) / spec.std[c];
        for c in 0..3 {
            assert!((at(c, 100, 0) - black(c)).abs() < 1e-5, "channel {c} left edge {}", at(c, 100, 0));
            assert!((at(c, 100, 112) - white(c)).abs() < 1e-5, "channel {c} centre {}", at(c, 100, 112));
            assert!((at(c, 0, 223) - black(c)).abs() < 1e-5, "channel {c} right edge {}", at(c, 0, 223));
        }
        let black_columns = (0..224).filter(|&x| (at(0, 50, x) - black(0)).abs() < 1e-5).count();
        assert!((50..=56).contains(&black_columns), "{black_columns} black columns (about 2 × 26)");
    }
}
