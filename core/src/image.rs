//! Image decoding with hard limits, shared by ingest (validation) and features (pixels).
//!
//! The limits are checked against the header before any pixel buffer is allocated, so a
//! decompression bomb (a tiny PNG declaring 100000×100000 pixels) is rejected, not decoded.

use std::io::Cursor;

use image::{DynamicImage, ImageError, ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};

use crate::envelope::ContentType;
use crate::error::{ReasonCode, Result, SluiceError};

/// `[ingest.image_limits]` / `[features.image_limits]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Most bytes the decoder may allocate for one image.
    pub max_alloc_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_width: 4096, max_height: 4096, max_alloc_bytes: 64 * 1024 * 1024 }
    }
}

/// Decodes `bytes` as `content_type`, classifying each way it can fail.
pub fn decode(bytes: &[u8], content_type: ContentType, limits: &ImageLimits) -> Result<DynamicImage> {
    let format = match content_type {
        ContentType::Png => ImageFormat::Png,
        ContentType::Jpeg => ImageFormat::Jpeg,
        ContentType::Json => {
            return Err(SluiceError::permanent(ReasonCode::UnsupportedContentType, "application/json is not an image"));
        }
    };
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_width);
    image_limits.max_image_height = Some(limits.max_height);
    image_limits.max_alloc = Some(limits.max_alloc_bytes);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(image_limits);
    let image = reader.decode().map_err(classify)?;
    if image.width() == 0 || image.height() == 0 {
        return Err(SluiceError::permanent(ReasonCode::UnsupportedImage, "image has no pixels"));
    }
    Ok(image)
}

fn classify(error: ImageError) -> SluiceError {
    let detail = error.to_string();
    let code = match &error {
        ImageError::Limits(_) => ReasonCode::ImageTooLarge,
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => ReasonCode::TruncatedImage,
        // Decoders report running out of data in their own words.
        _ if looks_truncated(&error) => ReasonCode::TruncatedImage,
        _ => ReasonCode::UndecodableImage,
    };
    SluiceError::permanent(code, detail)
}

fn looks_truncated(error: &ImageError) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::UnexpectedEof
        {
            return true;
        }
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("eof")
            || text.contains("end of file")
            || text.contains("truncated")
            || text.contains("unexpected end")
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// A PNG signature and IHDR chunk declaring `width`×`height` 8-bit grey pixels, and nothing
/// else: what a decompression bomb looks like to a decoder. The demo and tests produce it.
pub fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&width.to_be_bytes());
    chunk.extend_from_slice(&height.to_be_bytes());
    chunk.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32fast::hash(&chunk).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::GrayImage::from_fn(width, height, |x, y| image::Luma([((x * 7 + y * 13) % 256) as u8]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decodes_a_valid_png() {
        let img = decode(&png(8, 8), ContentType::Png, &ImageLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (8, 8));
    }

    #[test]
    fn rejects_a_decompression_bomb_by_its_header() {
        let err = decode(&png_header_only(100_000, 100_000), ContentType::Png, &ImageLimits::default()).unwrap_err();
        assert_eq!(err.code(), ReasonCode::ImageTooLarge, "{err}");
    }

    #[test]
    fn classifies_truncated_and_garbage_data() {
        let full = png(32, 32);
        let err = decode(&full[..full.len() / 2], ContentType::Png, &ImageLimits::default()).unwrap_err();
        assert_eq!(err.code(), ReasonCode::TruncatedImage, "{err}");
        let err = decode(b"\x89PNG\r\n\x1a\nnot a png at all, just words", ContentType::Png, &ImageLimits::default())
            .unwrap_err();
        assert!(matches!(err.code(), ReasonCode::UndecodableImage | ReasonCode::TruncatedImage), "{err}");
    }
}
