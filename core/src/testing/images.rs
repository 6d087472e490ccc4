//! Small generated images for tests: gradients, so that an encoder has something to compress
//! and a cut file loses real data.

use std::io::Cursor;

use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};

/// A `width`×`height` 8-bit grey PNG.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let img = GrayImage::from_fn(width, height, |x, y| Luma([((x * 7 + y * 13) % 256) as u8]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).expect("a PNG encodes to memory");
    out
}

/// A `width`×`height` colour JPEG (baseline, quality 90).
pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(width, height, |x, y| Rgb([(x * 5) as u8, (y * 3) as u8, 90]));
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("a JPEG encodes to memory");
    out
}
