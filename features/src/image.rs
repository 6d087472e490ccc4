//! Image preprocessing: resize to the model's input (stretched, or ImageNet-style: shorter side
//! to a length, then a centre crop) and convert channels. The pixels stay bytes: the model
//! scales and normalises them on its device (`ImageInput::normalise` says how).

use std::borrow::Cow;

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
    // Borrowed where the decoder gave the pixels the model takes (a JPEG's RGB, a grey PNG's
    // luma): converted, they would be copied whole first (48 MiB for a 4096×4096 photo).
    match (spec.channels, img) {
        (1, DynamicImage::ImageLuma8(grey)) => planes(grey, spec, resampler),
        (1, _) => planes(&img.to_luma8(), spec, resampler),
        (_, DynamicImage::ImageRgb8(rgb)) => planes(rgb, spec, resampler),
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
    // torchvision's `CenterCrop`: the offset rounded half to even, as Python's `round` does.
    let offset = |outer: u32, inner: u32| ((f64::from(outer) - f64::from(inner)) / 2.0).round_ties_even() as u32;
    let (left, top) = (offset(new_w, spec.width), offset(new_h, spec.height));
    // The pixels the crop keeps, as rows of `stride` pixels from (`left`, `top`).
    let (kept, stride, left, top): (Cow<'_, [u8]>, u32, u32, u32) = if (new_w, new_h) == (w, h) {
        (Cow::Borrowed(img.as_raw()), w, left, top)
    } else {
        match resampler {
            // Only the crop is resized, from its box in the source: the pixels of resizing the
            // whole and cropping, to within a level's rounding (each output pixel maps to the
            // same source point, and the filter reads past the box where the source goes on),
            // without the whole, which for a 4096×1 image would be 1,048,576×256 (768 MiB).
            Resampler::Fast => {
                // The box's far edge kept inside the source: scaled back, a crop that spans the
                // whole side can come out a rounding past it (28 · 29/28 = 29.000000000000004),
                // which the resizer refuses.
                let span = |start: u32, inner: u32, outer: u32, resized: u32| {
                    let scale = f64::from(outer) / f64::from(resized);
                    let from = f64::from(start) * scale;
                    (from, (f64::from(start + inner) * scale).min(f64::from(outer)) - from)
                };
                let (x, width) = span(left, spec.width, w, new_w);
                let (y, height) = span(top, spec.height, h, new_h);
                let source = [x, y, width, height];
                (
                    Cow::Owned(resize_fast(img.as_raw(), (w, h), source, (spec.width, spec.height), channels)),
                    spec.width,
                    0,
                    0,
                )
            }
            Resampler::Image => {
                (Cow::Owned(imageops::resize(img, new_w, new_h, FilterType::Triangle).into_raw()), new_w, left, top)
            }
        }
    };
    let (width, plane) = (spec.width as usize, (spec.width * spec.height) as usize);
    let mut out = vec![0u8; plane * channels];
    for y in 0..spec.height as usize {
        let row = &kept[((top as usize + y) * stride as usize + left as usize) * channels..][..width * channels];
        for (x, pixel) in row.chunks_exact(channels).enumerate() {
            for (c, &value) in pixel.iter().enumerate() {
                out[c * plane + y * width + x] = value;
            }
        }
    }
    out
}

/// The box `source` (left, top, width, height, in source pixels) of `pixels` (`from`,
/// interleaved `channels`) resized to `to` with a bilinear convolution.
fn resize_fast(pixels: &[u8], from: (u32, u32), source: [f64; 4], to: (u32, u32), channels: usize) -> Vec<u8> {
    let pixel_type = if channels == 1 { PixelType::U8 } else { PixelType::U8x3 };
    let src =
        ImageRef::new(from.0, from.1, pixels, pixel_type).expect("a buffer of its own size; u8 needs no alignment");
    let mut dst = Image::new(to.0, to.1, pixel_type);
    let [left, top, width, height] = source;
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear))
        .crop(left, top, width, height);
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

    /// Resizing only the crop's box gives what resizing the whole image and cropping gives (to
    /// within a level), for shapes wider and taller than the crop, with even and odd offsets.
    #[test]
    fn the_crop_alone_resized_is_the_whole_resized_and_cropped() {
        let spec = ImageInput::imagenet();
        // New sizes 512×256, 256×439, 341×256 (offset 58.5, to 58), 256×513 (offset 144.5, to 144).
        for (w, h) in [(600, 300), (301, 517), (480, 360), (500, 1002)] {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x * y / 3) as u8])
            });
            let got = preprocess(&DynamicImage::ImageRgb8(img.clone()), &spec);
            let side = 256;
            let (new_w, new_h) = if w <= h { (side, side * h / w) } else { (side * w / h, side) };
            let whole = resize_fast(img.as_raw(), (w, h), [0.0, 0.0, f64::from(w), f64::from(h)], (new_w, new_h), 3);
            let offset = |outer: u32| (f64::from(outer - 224) / 2.0).round_ties_even() as u32;
            let (left, top) = (offset(new_w), offset(new_h));
            let plane = 224 * 224;
            let mut worst = 0;
            for y in 0..224 {
                for x in 0..224 {
                    for c in 0..3 {
                        let want = whole[(((top + y) * new_w + left + x) * 3) as usize + c];
                        let have = got[c * plane + (y * 224 + x) as usize];
                        worst = worst.max(want.abs_diff(have));
                    }
                }
            }
            assert!(worst <= 1, "{w}×{h}: off by {worst}");
        }
    }

    /// Sizes whose box, scaled back, comes out a rounding past the source (28 · 29/28 is
    /// 29.000000000000004): stretched, and resized by a shorter side equal to the crop.
    #[test]
    fn a_box_that_spans_the_whole_source_stays_inside_it() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(29, 58, image::Rgb([9, 99, 199])));
        let stretched = ImageInput { resize_shorter_side: None, ..spec(28, 28, 3) };
        let planes = preprocess(&img, &stretched);
        assert!(planes.chunks(28 * 28).zip([9u8, 99, 199]).all(|(p, v)| p.iter().all(|&x| x.abs_diff(v) <= 1)));
        let cropped = ImageInput { resize_shorter_side: Some(28), ..spec(28, 28, 3) };
        assert_eq!(preprocess(&img, &cropped).len(), 3 * 28 * 28);
    }

    /// A sliver (4096×1) is preprocessed from the crop's box alone: its one row stretched to
    /// the crop's height, its colour kept.
    #[test]
    fn a_sliver_is_preprocessed() {
        let img = image::RgbImage::from_fn(4096, 1, |x, _| image::Rgb([(x % 256) as u8, 0, 255]));
        let v = preprocess(&DynamicImage::ImageRgb8(img), &ImageInput::imagenet());
        assert_eq!(v.len(), 3 * 224 * 224);
        assert!(v[2 * 224 * 224..].iter().all(|&b| b == 255), "the blue plane stays full");
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
