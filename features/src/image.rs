//! Image preprocessing: resize to the model's input (stretched, or ImageNet-style: shorter side
//! to a length, then a centre crop) and convert channels. The pixels stay bytes: the model
//! scales and normalises them on its device (`ImageInput::normalise` says how).

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, Pixel};
use sluice_core::model::ImageInput;

/// The model's input pixels for `img`, channel-major (C, H, W).
pub fn preprocess(img: &DynamicImage, spec: &ImageInput) -> Vec<u8> {
    match spec.channels {
        1 => planes(&img.to_luma8(), spec),
        _ => planes(&img.to_rgb8(), spec),
    }
}

fn planes<P>(img: &ImageBuffer<P, Vec<u8>>, spec: &ImageInput) -> Vec<u8>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let resized;
    let img = if img.dimensions() == (spec.width, spec.height) {
        img
    } else {
        resized = match spec.resize_shorter_side {
            Some(side) => resize_and_crop(img, side, spec.width, spec.height),
            None => imageops::resize(img, spec.width, spec.height, FilterType::Triangle),
        };
        &resized
    };
    let channels = spec.channels as usize;
    let plane = (spec.width * spec.height) as usize;
    let mut out = vec![0u8; plane * channels];
    for (i, pixel) in img.pixels().enumerate() {
        for (c, &value) in pixel.channels().iter().take(channels).enumerate() {
            out[c * plane + i] = value;
        }
    }
    out
}

/// torchvision's `Resize(side)` then `CenterCrop((height, width))`: the shorter side becomes
/// `side` (the longer one scaled to match, truncated), and the crop is centred, rounding its
/// offset half to even as Python's `round` does.
fn resize_and_crop<P>(img: &ImageBuffer<P, Vec<u8>>, side: u32, width: u32, height: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = img.dimensions();
    let scale = |long: u32, short: u32| (u64::from(side) * u64::from(long) / u64::from(short)) as u32;
    let (new_w, new_h) = if w <= h { (side, scale(h, w)) } else { (scale(w, h), side) };
    let resized = imageops::resize(img, new_w, new_h, FilterType::Triangle);
    let offset = |outer: u32, inner: u32| ((f64::from(outer) - f64::from(inner)) / 2.0).round_ties_even() as u32;
    imageops::crop_imm(&resized, offset(new_w, width), offset(new_h, height), width, height).to_image()
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
