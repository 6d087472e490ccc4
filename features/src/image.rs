//! Image preprocessing: resize to the model's input, convert channels, scale and normalise.

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, Pixel};
use sluice_core::model::ImageInput;

/// The model's input vector for `img`, channel-major (C, H, W).
pub fn preprocess(img: &DynamicImage, spec: &ImageInput) -> Vec<f32> {
    match spec.channels {
        1 => normalise(&img.to_luma8(), spec),
        _ => normalise(&img.to_rgb8(), spec),
    }
}

fn normalise<P>(img: &ImageBuffer<P, Vec<u8>>, spec: &ImageInput) -> Vec<f32>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let resized;
    let img = if img.dimensions() == (spec.width, spec.height) {
        img
    } else {
        resized = imageops::resize(img, spec.width, spec.height, FilterType::Triangle);
        &resized
    };
    let channels = spec.channels as usize;
    let plane = (spec.width * spec.height) as usize;
    let mut out = vec![0.0f32; plane * channels];
    for (i, pixel) in img.pixels().enumerate() {
        for (c, &value) in pixel.channels().iter().take(channels).enumerate() {
            out[c * plane + i] = (f32::from(value) / 255.0 - spec.mean[c]) / spec.std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(width: u32, height: u32, channels: u32) -> ImageInput {
        let n = channels as usize;
        ImageInput { width, height, channels, mean: vec![0.5; n], std: vec![0.5; n] }
    }

    #[test]
    fn keeps_an_image_of_the_right_size_exact() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(2, 2, |x, _| image::Luma([(x * 255) as u8])));
        assert_eq!(preprocess(&img, &spec(2, 2, 1)), vec![-1.0, 1.0, -1.0, 1.0]);
    }

    #[test]
    fn resizes_and_lays_out_channels_first() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(16, 16, image::Rgb([255, 0, 255])));
        let v = preprocess(&img, &spec(4, 4, 3));
        assert_eq!(v.len(), 48);
        assert!(v[..16].iter().all(|&x| (x - 1.0).abs() < 1e-6));
        assert!(v[16..32].iter().all(|&x| (x + 1.0).abs() < 1e-6));
    }
}
