//! Errors that say whether to retry.
//!
//! Every failure in sluice is either [`SluiceError::Retryable`] (throttling, timeouts, a busy
//! store, a lost lease: back off and try again, eventually redrive) or
//! [`SluiceError::Permanent`] (bad input, schema mismatch: straight to the stage's DLQ). Both
//! carry a machine-readable [`ReasonCode`] that ends up in DLQ entries and metrics.

use serde::{Deserialize, Serialize};

/// Machine-readable reason for a failure. Serialised in `snake_case`; operators filter DLQs by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// The payload has zero bytes.
    EmptyPayload,
    /// The payload is larger than the configured inline limit.
    PayloadTooLarge,
    /// The content type is neither declared nor recognisable as a supported one.
    UnsupportedContentType,
    /// The payload claims to be JSON but does not parse.
    InvalidJson,
    /// The envelope or event does not match the expected schema.
    SchemaMismatch,
    /// The envelope's `schema_version` is not one this build understands.
    UnsupportedSchemaVersion,
    /// The image data ends before the image does.
    TruncatedImage,
    /// The image header declares dimensions or an allocation over the configured limits.
    ImageTooLarge,
    /// The image cannot be decoded for any other reason.
    UndecodableImage,
    /// The image has a shape the model cannot take (e.g. zero-sized).
    UnsupportedImage,
    /// A claim-check reference points somewhere sluice may not read from.
    ClaimCheckRejected,
    /// A claim-check reference points to a blob that does not exist.
    ClaimCheckMissing,
    /// The feature vector the inference stage needs is not in the feature store.
    MissingFeatures,
    /// The feature vector does not have the length the model expects.
    FeatureShapeMismatch,
    /// A message on a queue could not be decoded as what that queue carries.
    MalformedMessage,
    /// The model failed to run.
    ModelFailure,
    /// The model produced output that is not a probability vector.
    InvalidModelOutput,
    /// The fallback endpoint could not serve the batch (e.g. SageMaker's ModelError).
    FallbackFailure,
    /// The message was received `max_receives` times without being acknowledged.
    MaxReceivesExceeded,
    /// The prediction's confidence is under its class threshold (review queue).
    BelowThreshold,
    /// A reviewer judged the record unfit for a result (not what the model is for, unreadable).
    RejectedInReview,
    /// The store is busy or locked; try again.
    StoreBusy,
    /// The store failed in a way that may clear up.
    StoreUnavailable,
    /// The deployment cannot do this at all (access denied, credentials refused, a queue, table,
    /// stream or bucket missing), whatever the record: a worker stops and hands its batch back
    /// rather than dead-letter records it could handle once the deployment is fixed.
    Misconfigured,
    /// A lease on a stream shard was lost to another worker.
    LeaseLost,
    /// Anything that should not happen; details in the message.
    Internal,
    /// A DLQ entry's reason this build does not know (a newer build's): the detail names it.
    /// Matches no reason but itself, and is not replayed (it may be one a replay should leave).
    Unrecognised,
}

impl ReasonCode {
    /// The code as it appears in DLQ entries and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyPayload => "empty_payload",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedContentType => "unsupported_content_type",
            Self::InvalidJson => "invalid_json",
            Self::SchemaMismatch => "schema_mismatch",
            Self::UnsupportedSchemaVersion => "unsupported_schema_version",
            Self::TruncatedImage => "truncated_image",
            Self::ImageTooLarge => "image_too_large",
            Self::UndecodableImage => "undecodable_image",
            Self::UnsupportedImage => "unsupported_image",
            Self::ClaimCheckRejected => "claim_check_rejected",
            Self::ClaimCheckMissing => "claim_check_missing",
            Self::MissingFeatures => "missing_features",
            Self::FeatureShapeMismatch => "feature_shape_mismatch",
            Self::MalformedMessage => "malformed_message",
            Self::ModelFailure => "model_failure",
            Self::InvalidModelOutput => "invalid_model_output",
            Self::FallbackFailure => "fallback_failure",
            Self::MaxReceivesExceeded => "max_receives_exceeded",
            Self::BelowThreshold => "below_threshold",
            Self::RejectedInReview => "rejected_in_review",
            Self::StoreBusy => "store_busy",
            Self::StoreUnavailable => "store_unavailable",
            Self::Misconfigured => "misconfigured",
            Self::LeaseLost => "lease_lost",
            Self::Internal => "internal",
            Self::Unrecognised => "unrecognised",
        }
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure, classified by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SluiceError {
    /// Back off and try again; a message that keeps failing is eventually redriven to the DLQ.
    #[error("retryable ({code}): {detail}")]
    Retryable { code: ReasonCode, detail: String },
    /// Trying again cannot help: the record goes to the stage's DLQ at once.
    #[error("permanent ({code}): {detail}")]
    Permanent { code: ReasonCode, detail: String },
}

impl SluiceError {
    pub fn retryable(code: ReasonCode, detail: impl Into<String>) -> Self {
        Self::Retryable { code, detail: cut(detail.into()) }
    }

    pub fn permanent(code: ReasonCode, detail: impl Into<String>) -> Self {
        Self::Permanent { code, detail: cut(detail.into()) }
    }

    pub fn code(&self) -> ReasonCode {
        match self {
            Self::Retryable { code, .. } | Self::Permanent { code, .. } => *code,
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Self::Retryable { detail, .. } | Self::Permanent { detail, .. } => detail,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// Whether the error is about the deployment, not about any one record
    /// ([`ReasonCode::Misconfigured`]).
    pub fn is_misconfiguration(&self) -> bool {
        self.code() == ReasonCode::Misconfigured
    }
}

/// The most bytes of a detail kept. Details quote what a producer sent (a content type, a field
/// name, a value); a DLQ entry carries its detail beside the record, and one as large as the
/// record would take its DLQ message past the queue's limit, failing the send that should have
/// ended the record (at ingest, for good: the shard could not move past it).
pub const MAX_DETAIL_BYTES: usize = 4096;

/// `detail` cut to [`MAX_DETAIL_BYTES`] on a character boundary, saying how much was cut.
fn cut(mut detail: String) -> String {
    if detail.len() <= MAX_DETAIL_BYTES {
        return detail;
    }
    let total = detail.len();
    let keep = (0..=MAX_DETAIL_BYTES - 64).rev().find(|&i| detail.is_char_boundary(i)).unwrap_or(0);
    detail.truncate(keep);
    detail.push_str(&format!("… ({} of {total} bytes cut)", total - keep));
    detail
}

/// Result alias used throughout sluice's libraries.
pub type Result<T, E = SluiceError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_serialise_as_their_names() {
        for code in [ReasonCode::ImageTooLarge, ReasonCode::MaxReceivesExceeded, ReasonCode::InvalidJson] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ReasonCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn a_detail_is_cut_on_a_character_boundary_and_says_so() {
        let long = format!("content type {:?} is not one of them", "é".repeat(10_000));
        let e = SluiceError::permanent(ReasonCode::UnsupportedContentType, long.clone());
        assert!(e.detail().len() <= MAX_DETAIL_BYTES, "{}", e.detail().len());
        assert!(e.detail().starts_with("content type \"éé") && e.detail().ends_with("bytes cut)"), "{}", e.detail());
        assert!(e.detail().contains(&format!("of {} bytes", long.len())));
        assert_eq!(SluiceError::retryable(ReasonCode::StoreBusy, "short").detail(), "short");
    }

    #[test]
    fn classification_is_kept() {
        let e = SluiceError::permanent(ReasonCode::TruncatedImage, "eof at byte 40");
        assert!(!e.is_retryable());
        assert_eq!(e.code(), ReasonCode::TruncatedImage);
        assert_eq!(e.to_string(), "permanent (truncated_image): eof at byte 40");
    }
}
