//! Image decoding with hard limits, shared by ingest (validation) and features (pixels).
//!
//! The limits are checked against the header before any pixel buffer is allocated, so a
//! decompression bomb (a tiny PNG declaring 100000×100000 pixels) is rejected, not decoded.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
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

impl ImageLimits {
    /// What of these limits lets through an image `stricter` would refuse, by setting name.
    pub fn looser_than(&self, stricter: &Self) -> Vec<String> {
        [
            ("max_width", u64::from(self.max_width), u64::from(stricter.max_width)),
            ("max_height", u64::from(self.max_height), u64::from(stricter.max_height)),
            ("max_alloc_bytes", self.max_alloc_bytes, stricter.max_alloc_bytes),
        ]
        .into_iter()
        .filter(|(_, ours, theirs)| ours > theirs)
        .map(|(name, ours, theirs)| format!("{name} {ours} > {theirs}"))
        .collect()
    }
}

/// How ingest checks an image before passing it on (`ingest.image_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageCheck {
    /// The header (the format, a size within the limits) and that the file is whole: a PNG's
    /// chunks up to `IEND`, each against its CRC; a JPEG's segments up to its scan and an
    /// end-of-image marker after it. No pixels are decoded (features decodes them anyway), so a
    /// JPEG damaged inside its scan, whole otherwise, reaches the features DLQ as
    /// `undecodable_image` instead of ingest's.
    #[default]
    Structure,
    /// A full decode, then the same walk of the file: every image that cannot be decoded ends
    /// in ingest's DLQ, at the cost of decoding each image twice in the pipeline (~1.5 ms of CPU
    /// for a 480×360 JPEG).
    Decode,
}

/// Checks `bytes` are an image of `content_type` within `limits`, as `how` says.
pub fn check(bytes: &[u8], content_type: ContentType, limits: &ImageLimits, how: ImageCheck) -> Result<()> {
    match how {
        ImageCheck::Structure => check_structure(bytes, content_type, limits),
        ImageCheck::Decode => decode(bytes, content_type, limits).map(drop),
    }
}

/// Decodes `bytes` as `content_type`, classifying each way it can fail. The file must also be
/// whole ([`is_whole`]): the decoders pass a JPEG cut short (the missing rows grey) and a PNG
/// missing the end of its last chunk.
pub fn decode(bytes: &[u8], content_type: ContentType, limits: &ImageLimits) -> Result<DynamicImage> {
    let image = reader(bytes, content_type, limits)?.decode().map_err(|e| classify(e, limits, bytes))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(no_pixels());
    }
    is_whole(bytes, content_type)?;
    Ok(image)
}

/// A reader of `bytes` as `content_type`, under `limits`.
fn reader<'a>(
    bytes: &'a [u8],
    content_type: ContentType,
    limits: &ImageLimits,
) -> Result<ImageReader<Cursor<&'a [u8]>>> {
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
    Ok(reader)
}

fn no_pixels() -> SluiceError {
    SluiceError::permanent(ReasonCode::UnsupportedImage, "image has no pixels")
}

/// [`ImageCheck::Structure`]: the header through the decoder, the rest by walking the file
/// ([`is_whole`]).
fn check_structure(bytes: &[u8], content_type: ContentType, limits: &ImageLimits) -> Result<()> {
    let decoder = reader(bytes, content_type, limits)?.into_decoder().map_err(|e| classify(e, limits, bytes))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(no_pixels());
    }
    let pixel_bytes = decoder.total_bytes();
    if width > limits.max_width || height > limits.max_height || pixel_bytes > limits.max_alloc_bytes {
        return Err(SluiceError::permanent(
            ReasonCode::ImageTooLarge,
            format!("{width}×{height} pixels ({pixel_bytes} bytes decoded) exceed the image limits"),
        ));
    }
    is_whole(bytes, content_type)
}

/// Whether an image whose header reads is whole, to its last byte.
fn is_whole(bytes: &[u8], content_type: ContentType) -> Result<()> {
    match content_type {
        ContentType::Png => png_is_whole(bytes),
        _ => jpeg_is_whole(bytes),
    }
}

fn truncated(detail: String) -> SluiceError {
    SluiceError::permanent(ReasonCode::TruncatedImage, detail)
}

fn undecodable(detail: String) -> SluiceError {
    SluiceError::permanent(ReasonCode::UndecodableImage, detail)
}

/// Walks a PNG's chunks (after its signature) to `IEND`, each checked against its CRC, which
/// covers every byte of a PNG but the signature and the chunks' lengths. As the `png` decoder
/// does, an ancillary chunk (text, colour profile: its type's first letter lower case) that fails
/// its CRC is passed over; a critical one (header, palette, image data, end) is not.
fn png_is_whole(bytes: &[u8]) -> Result<()> {
    let mut at = 8;
    loop {
        let Some(header) = bytes.get(at..at + 8) else {
            return Err(truncated(format!("the PNG ends at byte {} before its IEND chunk", bytes.len())));
        };
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let kind = String::from_utf8_lossy(&header[4..8]).into_owned();
        if length > i32::MAX as u32 {
            return Err(undecodable(format!("the PNG's {kind} chunk at byte {at} has an impossible length, {length}")));
        }
        let length = length as usize;
        let end = (at + 8).saturating_add(length);
        let (Some(chunk), Some(crc)) = (bytes.get(at + 4..end), bytes.get(end..end.saturating_add(4))) else {
            return Err(truncated(format!("the PNG ends inside its {kind} chunk (byte {at})")));
        };
        let ancillary = header[4] & 0x20 != 0;
        if crc32fast::hash(chunk).to_be_bytes() != crc && !ancillary {
            return Err(undecodable(format!("the PNG's {kind} chunk at byte {at} fails its CRC")));
        }
        if kind == "IEND" {
            return Ok(());
        }
        at = end + 4;
    }
}

/// Walks a JPEG's marker segments (after its start-of-image marker) to its end-of-image marker:
/// each segment by its length, and each scan's entropy-coded data to the marker after it
/// ([`scan_end`]). A baseline JPEG has one scan; a progressive one has several, with tables
/// between them, and every one is walked, so no bytes of a table (which could read `FF D9`) are
/// taken for the end. Bytes after the end-of-image marker are passed over, and so are stray bytes
/// where a marker belongs, as `image`'s decoder does.
fn jpeg_is_whole(bytes: &[u8]) -> Result<()> {
    let mut at = 2;
    let mut scans = 0;
    loop {
        // Up to the next marker: stray bytes, then any fill bytes of 0xFF before it.
        while bytes.get(at).is_some_and(|&b| b != 0xFF) {
            at += 1;
        }
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&marker) = bytes.get(at) else {
            return Err(truncated(format!("the JPEG ends at byte {} before its end-of-image marker", bytes.len())));
        };
        at += 1;
        match marker {
            // Markers that stand alone: start of image, TEM, restarts.
            0xD8 | 0x01 | 0xD0..=0xD7 => continue,
            0xD9 if scans == 0 => return Err(undecodable(format!("the JPEG ends (byte {at}) before any scan"))),
            0xD9 => return Ok(()),
            _ => {}
        }
        let Some(length) = bytes.get(at..at + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
            return Err(truncated(format!("the JPEG ends at byte {} inside a segment", bytes.len())));
        };
        at += length;
        if marker == 0xDA {
            scans += 1;
            at = scan_end(bytes, at);
        }
    }
}

/// Where a scan's entropy-coded data, starting at `from`, ends: at the first 0xFF byte that
/// begins a marker. Inside the data a 0xFF byte is followed by 0x00 (a stuffed byte), a restart
/// marker (0xD0 to 0xD7) or more 0xFF bytes of fill; anything else after it is a marker. The
/// length of the data, when it runs to the end.
fn scan_end(bytes: &[u8], from: usize) -> usize {
    let mut at = from;
    while let Some(found) = bytes.get(at..).and_then(|rest| memchr::memchr(0xFF, rest)) {
        at += found;
        match bytes.get(at + 1) {
            Some(0x00 | 0xD0..=0xD7) => at += 2,
            Some(0xFF) => at += 1,
            _ => return at,
        }
    }
    bytes.len()
}

/// An image's width and height as its header gives them, its pixels unread: a PNG's from its
/// IHDR chunk, which comes first (the decoders will not read a header past the limits); else as
/// the decoder reads them.
fn header_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") {
        let word = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        return Some((word(16)?, word(20)?));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?;
    reader.no_limits();
    reader.into_dimensions().ok()
}

fn classify(error: ImageError, limits: &ImageLimits, bytes: &[u8]) -> SluiceError {
    let mut detail = error.to_string();
    let code = match &error {
        ImageError::Limits(_) => {
            // Its own size, from its header alone (read without the limits: no pixels are).
            let size = header_size(bytes).map_or_else(String::new, |(w, h)| format!("{w}×{h} pixels; "));
            detail += &format!(
                " ({size}at most {}×{} pixels, {} bytes decoded: `image_limits` of [ingest] and [features])",
                limits.max_width, limits.max_height, limits.max_alloc_bytes
            );
            ReasonCode::ImageTooLarge
        }
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
            || text.contains("not enough bytes")
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
    use crate::testing::images::{jpeg, png};

    /// Ingest's limits against features': what lets through more is named (ingest warns at
    /// start), read from either stage's section of one configuration.
    #[test]
    fn looser_limits_are_named() {
        let ingest = ImageLimits { max_width: 8192, ..ImageLimits::default() };
        assert_eq!(ingest.looser_than(&ImageLimits::default()), ["max_width 8192 > 4096"]);
        assert!(ImageLimits::default().looser_than(&ingest).is_empty());
        let settings = crate::config::Settings::from_toml("[features.image_limits]\nmax_height = 8192\n");
        let features: ImageLimits = settings.section("features.image_limits").unwrap();
        assert_eq!(features, ImageLimits { max_height: 8192, ..ImageLimits::default() });
        let absent: ImageLimits = crate::config::Settings::from_toml("").section("features.image_limits").unwrap();
        assert_eq!(absent, ImageLimits::default());
    }

    fn checked(bytes: &[u8], content_type: ContentType, how: ImageCheck) -> Result<()> {
        check(bytes, content_type, &ImageLimits::default(), how)
    }

    /// Both checks pass whole images and refuse cut, bomb and garbage ones with the same reason
    /// (`image`'s decoders alone pass a JPEG cut in half, and a PNG without its last byte); the
    /// structure check also finds any changed byte of a PNG, by its chunks' CRCs.
    #[test]
    fn the_structure_check_refuses_what_a_decode_refuses_but_damage_inside_a_jpeg_scan() {
        for (bytes, content_type) in [(png(32, 32), ContentType::Png), (jpeg(64, 48), ContentType::Jpeg)] {
            for how in [ImageCheck::Structure, ImageCheck::Decode] {
                checked(&bytes, content_type, how).unwrap();
                let mut padded = bytes.clone();
                padded.extend_from_slice(b"trailing");
                if content_type == ContentType::Jpeg {
                    checked(&padded, content_type, how).unwrap();
                }
                for cut in [bytes.len() / 2, bytes.len() - 1, 40] {
                    let Err(err) = checked(&bytes[..cut], content_type, how) else {
                        panic!("{how:?} {content_type:?} cut at {cut} of {} passed", bytes.len())
                    };
                    assert_eq!(err.code(), ReasonCode::TruncatedImage, "{how:?} {content_type:?} cut at {cut}: {err}");
                }
                let err = checked(b"\x89PNG\r\n\x1a\nnot a png at all", content_type, how).unwrap_err();
                assert!(matches!(err.code(), ReasonCode::UndecodableImage | ReasonCode::TruncatedImage), "{err}");
            }
        }
        for how in [ImageCheck::Structure, ImageCheck::Decode] {
            let err = checked(&png_header_only(100_000, 100_000), ContentType::Png, how).unwrap_err();
            assert_eq!(err.code(), ReasonCode::ImageTooLarge, "{how:?}: {err}");
            let small = ImageLimits { max_alloc_bytes: 1000, ..ImageLimits::default() };
            let err = check(&jpeg(64, 48), ContentType::Jpeg, &small, how).unwrap_err();
            assert_eq!(err.code(), ReasonCode::ImageTooLarge, "{how:?}: {err}");
        }
        // A text chunk with a bad CRC, before the end: passed over, as the decoder does.
        let whole = png(32, 32);
        let mut with_text = whole[..whole.len() - 12].to_vec();
        with_text.extend_from_slice(&[0, 0, 0, 3]);
        with_text.extend_from_slice(b"tEXtabc");
        with_text.extend_from_slice(&[1, 2, 3, 4]);
        with_text.extend_from_slice(&whole[whole.len() - 12..]);
        for how in [ImageCheck::Structure, ImageCheck::Decode] {
            checked(&with_text, ContentType::Png, how).unwrap();
        }
        // Stray bytes between two segments of a JPEG's header: passed over, as the decoder does.
        let whole = jpeg(64, 48);
        let app0_end = 4 + u16::from_be_bytes([whole[4], whole[5]]) as usize;
        let mut stray = whole[..app0_end].to_vec();
        stray.extend_from_slice(&[0x00, 0x17]);
        stray.extend_from_slice(&whole[app0_end..]);
        for how in [ImageCheck::Structure, ImageCheck::Decode] {
            checked(&stray, ContentType::Jpeg, how).unwrap();
        }
        let mut damaged = png(32, 32);
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x55;
        let err = checked(&damaged, ContentType::Png, ImageCheck::Structure).unwrap_err();
        assert_eq!(err.code(), ReasonCode::UndecodableImage, "{err}");
        assert!(err.to_string().contains("CRC"), "{err}");
    }

    /// A progressive JPEG: several scans, with Huffman tables between them. Made once with
    /// Pillow: `Image.save(path, quality=90, progressive=True, optimize=True)` of a 64×48 gradient.
    const PROGRESSIVE: &[u8] = include_bytes!("../tests/data/progressive-64x48.jpg");

    /// Every scan of a progressive JPEG is walked: cut anywhere it is refused, even when what is
    /// left holds `FF D9` in a segment between two scans (here a comment; a table can too).
    #[test]
    fn a_progressive_jpeg_cut_anywhere_is_truncated() {
        for how in [ImageCheck::Structure, ImageCheck::Decode] {
            checked(PROGRESSIVE, ContentType::Jpeg, how).unwrap();
        }
        let img = decode(PROGRESSIVE, ContentType::Jpeg, &ImageLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
        for cut in 4..PROGRESSIVE.len() - 1 {
            let err = checked(&PROGRESSIVE[..cut], ContentType::Jpeg, ImageCheck::Structure).unwrap_err();
            assert_eq!(err.code(), ReasonCode::TruncatedImage, "cut at {cut}: {err}");
            checked(&PROGRESSIVE[..cut], ContentType::Jpeg, ImageCheck::Decode).unwrap_err();
        }
        // A comment segment holding `FF D9`, before the second scan.
        let scans: Vec<usize> =
            PROGRESSIVE.windows(2).enumerate().filter(|(_, w)| w == b"\xFF\xDA").map(|(i, _)| i).collect();
        assert!(scans.len() > 2, "{} scans", scans.len());
        let second = scans[1];
        let mut with_comment = PROGRESSIVE[..second].to_vec();
        with_comment.extend_from_slice(b"\xFF\xFE\x00\x06\xFF\xD9\xFF\xD9");
        let cut_after = with_comment.len() + 20;
        with_comment.extend_from_slice(&PROGRESSIVE[second..]);
        for how in [ImageCheck::Structure, ImageCheck::Decode] {
            checked(&with_comment, ContentType::Jpeg, how).unwrap();
            let err = checked(&with_comment[..cut_after], ContentType::Jpeg, how).unwrap_err();
            assert_eq!(err.code(), ReasonCode::TruncatedImage, "{how:?}: {err}");
        }
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
        // Said with its own size, the limits, and where they are set.
        assert!(
            err.detail().contains("100000×100000 pixels; at most 4096×4096") && err.detail().contains("image_limits"),
            "{err}"
        );
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
