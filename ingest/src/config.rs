use serde::{Deserialize, Serialize};
use sluice_core::image::{ImageCheck, ImageLimits};

/// `[ingest]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Stream records per batch.
    pub batch_size: usize,
    /// Largest payload accepted inline in a stream record; under Kinesis's own 1 MiB record
    /// limit, so that an oversized record still arrives and is dead-lettered with its reason.
    pub max_payload_bytes: usize,
    /// Largest payload accepted behind a claim-check.
    pub max_claim_check_bytes: usize,
    /// Largest JSON event accepted, inline or behind a claim-check: read, an event takes up to
    /// some 16 times its size in memory (a value for every number of an array), and a tabular
    /// event the model reads a few fields of is kilobytes.
    pub max_event_bytes: usize,
    /// Payloads over this size travel on as claim-checks, to stay under queue message limits
    /// (SQS: 1 MiB on the queues sluice makes, and the envelope base64-encodes its payload; on
    /// a queue that takes less, the queue's client moves a larger message to S3 itself).
    pub inline_limit_bytes: usize,
    /// The JSON field that names a raw event's record id. Without it (or when an event lacks
    /// it) the id is the stream position, so a redelivery keeps its id; a value that is not a
    /// string record id is refused (`schema_mismatch`), never replaced.
    pub record_id_field: Option<String>,
    pub image_limits: ImageLimits,
    /// How images are checked: `structure` (the header, and that the file is whole) or
    /// `decode` (every pixel decoded, so that an image damaged inside ends here, not at features).
    pub image_check: ImageCheck,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            max_payload_bytes: 1_000_000,
            max_claim_check_bytes: 32 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            inline_limit_bytes: 700 * 1024,
            record_id_field: None,
            image_limits: ImageLimits::default(),
            image_check: ImageCheck::default(),
        }
    }
}
