//! Records that ingest must reject, one for each way a producer can get it wrong, with the reason
//! code each must end under. The demo mixes them into its load; tests check every one.

use sluice_core::ReasonCode;
use sluice_core::backend::StreamInput;
use sluice_core::envelope::{ContentType, Envelope, RecordId};

/// A rejected-on-purpose record and the reason it must be dead-lettered with.
pub struct BadRecord {
    pub name: &'static str,
    pub input: StreamInput,
    pub expected: ReasonCode,
}

/// `valid_png` is any well-formed PNG (it is truncated for one sample); `max_payload_bytes` is
/// ingest's limit (one sample exceeds it).
pub fn bad_records(valid_png: &[u8], max_payload_bytes: usize) -> Vec<BadRecord> {
    let raw = |name: &'static str, data: Vec<u8>, expected| BadRecord {
        name,
        input: StreamInput { partition_key: format!("bad-{name}"), data },
        expected,
    };
    let unknown = Envelope::inline(
        RecordId::parse("bad-unknown-content-type").expect("valid id"),
        "samples",
        ContentType::Png,
        b"GIF89a\x01\x00\x01\x00".to_vec(),
    );
    let mut unknown_json = serde_json::to_value(&unknown).expect("serialises");
    unknown_json["content_type"] = "image/gif".into();
    vec![
        raw("truncated-png", valid_png[..valid_png.len() / 2].to_vec(), ReasonCode::TruncatedImage),
        raw("zero-byte", Vec::new(), ReasonCode::EmptyPayload),
        raw("png-bomb", sluice_core::image::png_header_only(100_000, 100_000), ReasonCode::ImageTooLarge),
        raw("invalid-json", br#"{"p00": 3, "p01": "#.to_vec(), ReasonCode::InvalidJson),
        raw("oversized", vec![b'x'; max_payload_bytes + 1], ReasonCode::PayloadTooLarge),
        raw(
            "unknown-content-type",
            serde_json::to_vec(&unknown_json).expect("serialises"),
            ReasonCode::UnsupportedContentType,
        ),
    ]
}
