//! The UCI optical recognition of handwritten digits data (the 1,797 8×8 images scikit-learn
//! bundles), shipped in `data/digits/` and compiled into the binary, with its fixed split.

use std::io::Read;

use anyhow::{Context, bail};
use image::codecs::jpeg::JpegEncoder;
use image::imageops::{self, FilterType};
use image::{GrayImage, ImageFormat, Luma, Rgb, RgbImage};

const DATA: &[u8] = include_bytes!("../../data/digits/digits.csv.gz");

/// The shipped digits bundle (`models/digits`), for a demo run away from the repository.
const MODEL_MANIFEST: &[u8] = include_bytes!("../../models/digits/model.toml");
const MODEL_WEIGHTS: &[u8] = include_bytes!("../../models/digits/model.safetensors");

/// Writes the digits bundle built into the binary into `dir` (created).
pub fn write_model(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(sluice_core::model::MANIFEST_FILE), MODEL_MANIFEST)?;
    std::fs::write(dir.join(sluice_core::model::WEIGHTS_FILE), MODEL_WEIGHTS)
}

/// Pixel intensities run 0..=16 (counts of set pixels in 4×4 blocks).
pub const MAX_INTENSITY: u8 = 16;
pub const SIDE: u32 = 8;
/// Width and height of a digit drawn as a photo ([`Digit::to_photo`]).
pub const PHOTO_SIZE: (u32, u32) = (480, 360);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Validation,
    Test,
}

/// The documented, fixed split (see `data/digits/README.md`), stratified by class: the `k`-th
/// image of a class in file order (0-based) is test if `k % 5 == 4`, validation if
/// `k % 10 == 0`, train otherwise.
pub fn split_of(occurrence: usize) -> Split {
    if occurrence % 5 == 4 {
        Split::Test
    } else if occurrence.is_multiple_of(10) {
        Split::Validation
    } else {
        Split::Train
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digit {
    /// Row in the data file, 0-based.
    pub index: usize,
    pub pixels: [u8; 64],
    pub label: u8,
    pub split: Split,
}

impl Digit {
    /// The digit as an 8-bit greyscale image, intensities scaled from 0..=16 to 0..=255.
    pub fn to_image(&self) -> GrayImage {
        GrayImage::from_fn(SIDE, SIDE, |x, y| {
            let v = u32::from(self.pixels[(y * SIDE + x) as usize]);
            Luma([((v * 255 + u32::from(MAX_INTENSITY) / 2) / u32::from(MAX_INTENSITY)) as u8])
        })
    }

    pub fn to_png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.to_image().write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Png).expect("PNG encodes to memory");
        out
    }

    /// The digit as a photo-sized colour JPEG (quality 90): what an image model such as ResNet-18
    /// is fed, ImageNet's pictures being JPEGs of some 400×350 and 110 KB. The digit fills the
    /// middle of a coloured gradient, and a fixed noise gives the picture a photo's texture, so
    /// that it costs about what a photo costs to decode and resize.
    pub fn to_photo(&self) -> Vec<u8> {
        let (width, height) = PHOTO_SIZE;
        let side = height * 4 / 5;
        let glyph = imageops::resize(&self.to_image(), side, side, FilterType::Triangle);
        let (left, top) = ((width - side) / 2, (height - side) / 2);
        let tint = (self.index * 47 % 256) as u32;
        let photo = RgbImage::from_fn(width, height, |x, y| {
            let ink = (x.wrapping_sub(left) < side && y.wrapping_sub(top) < side)
                .then(|| glyph.get_pixel(x - left, y - top).0[0])
                .map_or(0, u32::from);
            let background = [x * 200 / width, y * 200 / height, tint * 200 / 255];
            // A hash of the position and the digit: the same picture every time.
            let noise = (x.wrapping_mul(0x9E37_79B1) ^ y.wrapping_mul(0x85EB_CA77) ^ (self.index as u32))
                .wrapping_mul(0xC2B2_AE3D)
                >> 27;
            Rgb(background.map(|b| ((b * (255 - ink) + 255 * ink) / 255 + noise).min(255) as u8))
        });
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90).encode_image(&photo).expect("JPEG encodes to memory");
        out
    }

    /// The digit as a tabular JSON event with fields `p00`..`p63`.
    pub fn to_event(&self) -> serde_json::Value {
        let fields = self.pixels.iter().enumerate().map(|(i, &v)| (field_name(i), serde_json::Value::from(v)));
        serde_json::Value::Object(fields.collect())
    }
}

pub fn field_name(i: usize) -> String {
    format!("p{i:02}")
}

/// Every digit, in file order.
pub fn load() -> anyhow::Result<Vec<Digit>> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DATA).read_to_string(&mut text).context("decompressing the digits data")?;
    let mut digits = Vec::with_capacity(1797);
    let mut seen_of_class = [0usize; 10];
    for (index, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let values: Vec<u8> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>().map(|f| f as u8))
            .collect::<Result<_, _>>()
            .with_context(|| format!("digits row {index}"))?;
        if values.len() != 65 || values[..64].iter().any(|&v| v > MAX_INTENSITY) || values[64] > 9 {
            bail!("digits row {index} is not 64 intensities in 0..=16 and a label in 0..=9");
        }
        let label = values[64];
        let split = split_of(seen_of_class[usize::from(label)]);
        seen_of_class[usize::from(label)] += 1;
        digits.push(Digit { index, pixels: values[..64].try_into().expect("64 values"), label, split });
    }
    Ok(digits)
}

pub fn load_split(split: Split) -> anyhow::Result<Vec<Digit>> {
    Ok(load()?.into_iter().filter(|d| d.split == split).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_and_split_are_as_documented() {
        let digits = load().unwrap();
        assert_eq!(digits.len(), 1797);
        let count = |s| digits.iter().filter(|d| d.split == s).count();
        assert_eq!((count(Split::Train), count(Split::Validation), count(Split::Test)), (1257, 185, 355));
        for label in 0..10 {
            let of_class = |s| digits.iter().filter(|d| d.split == s && d.label == label).count();
            assert!((34..=37).contains(&of_class(Split::Test)), "class {label} is stratified");
            assert!((18..=19).contains(&of_class(Split::Validation)), "class {label} is stratified");
        }
    }

    #[test]
    fn photos_are_photo_sized_jpegs() {
        let digit = &load().unwrap()[0];
        let photo = digit.to_photo();
        assert_eq!(sluice_core::envelope::ContentType::sniff(&photo), Some(sluice_core::envelope::ContentType::Jpeg));
        let decoded = image::load_from_memory(&photo).unwrap();
        assert_eq!((decoded.width(), decoded.height()), PHOTO_SIZE);
        assert!((40_000..128 * 1024).contains(&photo.len()), "{} bytes: a photo's size, and inline", photo.len());
    }

    #[test]
    fn images_keep_the_intensities() {
        let digit = &load().unwrap()[0];
        let img = digit.to_image();
        for (i, p) in img.pixels().enumerate() {
            let back = (f32::from(p.0[0]) / 255.0 * 16.0).round() as u8;
            assert_eq!(back, digit.pixels[i]);
        }
    }
}
