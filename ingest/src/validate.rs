//! Turning stream bytes into a checked envelope.

use sluice_core::backend::BlobStore;
use sluice_core::envelope::{ContentType, Envelope, Payload, RecordId, new_traceparent, now_ms};
use sluice_core::model::TabularSpec;
use sluice_core::{ReasonCode, Result, SluiceError};

use crate::IngestConfig;

/// Where raw records (not sluice envelopes) say they came from.
const RAW_SOURCE: &str = "stream";

/// Reads a stream record as an envelope: either it is one, or it is a raw image or JSON event
/// that gets wrapped in one. `position` is the record id of last resort.
pub(crate) fn parse(body: &[u8], position: &RecordId, arrived_ms: u64, config: &IngestConfig) -> Result<Envelope> {
    if body.is_empty() {
        return Err(SluiceError::permanent(ReasonCode::EmptyPayload, "the record has no bytes"));
    }
    if body.len() > config.max_payload_bytes {
        return Err(too_large(body.len(), config.max_payload_bytes));
    }
    let mut envelope = match ContentType::sniff(body) {
        Some(ContentType::Json) => {
            let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
                SluiceError::permanent(ReasonCode::InvalidJson, format!("record is not valid JSON: {e}"))
            })?;
            if Envelope::looks_like_envelope(&value) {
                Envelope::from_value(value)?
            } else {
                let id = raw_event_id(&value, config)?.unwrap_or_else(|| position.clone());
                Envelope::inline(id, RAW_SOURCE, ContentType::Json, body.to_vec())
            }
        }
        Some(image) => Envelope::inline(position.clone(), RAW_SOURCE, image, body.to_vec()),
        None => {
            return Err(SluiceError::permanent(
                ReasonCode::UnsupportedContentType,
                "raw record is neither PNG, JPEG nor JSON",
            ));
        }
    };
    let times = &mut envelope.timestamps;
    times.produced_ms = times.produced_ms.or(Some(arrived_ms));
    times.ingested_ms = Some(now_ms());
    envelope.trace.get_or_insert_with(new_traceparent);
    Ok(envelope)
}

/// The id a raw event names in `record_id_field`: none when it is not configured or the event
/// lacks the field (the stream position serves); an error when the field holds anything but a
/// valid record id string, rather than an id made up in its place.
fn raw_event_id(event: &serde_json::Value, config: &IngestConfig) -> Result<Option<RecordId>> {
    let Some(field) = config.record_id_field.as_deref() else { return Ok(None) };
    match event.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => RecordId::parse(s.clone()).map(Some).map_err(|e| {
            SluiceError::permanent(ReasonCode::SchemaMismatch, format!("{field:?} is no record id: {}", e.detail()))
        }),
        Some(other) => Err(SluiceError::permanent(
            ReasonCode::SchemaMismatch,
            format!("{field:?} must be a string record id, got {other}"),
        )),
    }
}

fn too_large(len: usize, limit: usize) -> SluiceError {
    SluiceError::permanent(ReasonCode::PayloadTooLarge, format!("payload is {len} bytes; the limit is {limit}"))
}

/// Loads the payload, checks it is what its content type says, and moves a large inline
/// payload behind a claim-check.
pub(crate) async fn check_payload(
    envelope: &mut Envelope,
    blobs: &dyn BlobStore,
    config: &IngestConfig,
    tabular: Option<&TabularSpec>,
) -> Result<()> {
    let (data, limit) = match &envelope.payload {
        Payload::Inline { data } => (data.clone(), config.max_payload_bytes),
        Payload::ClaimCheck { reference } => (blobs.get(reference).await?, config.max_claim_check_bytes),
        Payload::Released => {
            return Err(SluiceError::permanent(
                ReasonCode::SchemaMismatch,
                "a producer's envelope must carry a payload",
            ));
        }
    };
    if data.is_empty() {
        return Err(SluiceError::permanent(ReasonCode::EmptyPayload, "the payload has no bytes"));
    }
    if data.len() > limit {
        return Err(too_large(data.len(), limit));
    }
    match envelope.content_type {
        ContentType::Json => {
            let value: serde_json::Value = serde_json::from_slice(&data).map_err(|e| {
                SluiceError::permanent(ReasonCode::InvalidJson, format!("payload is not valid JSON: {e}"))
            })?;
            let Some(event) = value.as_object() else {
                return Err(SluiceError::permanent(ReasonCode::SchemaMismatch, "a JSON event must be an object"));
            };
            if let Some(spec) = tabular {
                spec.check_present(event)
                    .map_err(|missing| SluiceError::permanent(ReasonCode::SchemaMismatch, missing))?;
            }
        }
        image => {
            sluice_core::image::decode(&data, image, &config.image_limits)?;
        }
    }
    if matches!(envelope.payload, Payload::Inline { .. }) && data.len() > config.inline_limit_bytes {
        envelope.payload = Payload::ClaimCheck { reference: blobs.put(data).await? };
    }
    Ok(())
}
