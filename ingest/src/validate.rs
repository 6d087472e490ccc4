//! Turning stream bytes into a checked envelope.

use sluice_core::backend::BlobStore;
use sluice_core::envelope::{
    ContentType, Envelope, PARTITION_KEY_ATTRIBUTE, Payload, REPLAY_KEY_PREFIX, RecordId, new_traceparent, now_ms,
    without_bom,
};
use sluice_core::model::TabularSpec;
use sluice_core::telemetry::traces;
use sluice_core::{ReasonCode, Result, SluiceError};

use crate::IngestConfig;

/// Where raw records (not sluice envelopes) say they came from.
const RAW_SOURCE: &str = "stream";

/// Reads a stream record as an envelope: either it is one, or it is a raw image or JSON event
/// that gets wrapped in one, keeping the record's `partition_key` (a producer's, not a replay's)
/// in its attributes. `position` is the record id of last resort.
pub(crate) fn parse(
    body: &[u8],
    position: &RecordId,
    partition_key: Option<&str>,
    arrived_ms: u64,
    config: &IngestConfig,
) -> Result<Envelope> {
    let body = without_bom(body);
    if body.is_empty() {
        return Err(SluiceError::permanent(ReasonCode::EmptyPayload, "the record has no bytes"));
    }
    if body.len() > config.max_payload_bytes {
        return Err(too_large(body.len(), config.max_payload_bytes));
    }
    let wrap = |id: RecordId, content_type: ContentType| {
        let mut envelope = Envelope::inline(id, RAW_SOURCE, content_type, body.to_vec());
        if let Some(key) = partition_key.filter(|key| !key.starts_with(REPLAY_KEY_PREFIX)) {
            envelope.attributes.insert(PARTITION_KEY_ATTRIBUTE.to_owned(), key.to_owned());
        }
        envelope
    };
    let envelope = match ContentType::sniff(body) {
        Some(ContentType::Json) => {
            // Most records are envelopes as sluice writes them: read straight into one. Anything
            // else (a raw event, an envelope with something wrong) is read as a JSON value first,
            // to tell which it is and what is wrong; an envelope read here is one that way would
            // have given too.
            match Envelope::from_producer(body) {
                Ok(Some(envelope)) => envelope,
                typed => {
                    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
                        // A whole value and more after it: JSON lines written as one record.
                        let hint = if e.to_string().starts_with("trailing characters") {
                            " (several JSON values in one record: write one event a record; `sluice produce --dir` sends a .jsonl file a line a record)"
                        } else {
                            ""
                        };
                        SluiceError::permanent(ReasonCode::InvalidJson, format!("record is not valid JSON: {e}{hint}"))
                    })?;
                    if Envelope::looks_like_envelope(&value) {
                        // Read as a value, the last of a field named twice wins, where another
                        // reader may take the first: which record this is must not depend on that.
                        if let Err(e) = typed
                            && e.to_string().starts_with("duplicate field")
                        {
                            return Err(SluiceError::permanent(
                                ReasonCode::SchemaMismatch,
                                format!("the envelope has a {e}"),
                            ));
                        }
                        Envelope::from_value(value)?
                    } else {
                        let id = raw_event_id(&value, config)?.unwrap_or_else(|| position.clone());
                        wrap(id, ContentType::Json)
                    }
                }
            }
        }
        Some(image) => wrap(position.clone(), image),
        // JSON, but no object: not an event.
        None if serde_json::from_slice::<serde_json::Value>(body).is_ok() => {
            return Err(SluiceError::permanent(
                ReasonCode::SchemaMismatch,
                "a JSON event must be an object (this record is a JSON string, number, boolean or null)",
            ));
        }
        None => {
            return Err(SluiceError::permanent(
                ReasonCode::UnsupportedContentType,
                "raw record is neither PNG, JPEG nor JSON",
            ));
        }
    };
    envelope.check_attributes()?;
    if envelope.record_id != *position && envelope.record_id.is_stream_position() {
        return Err(SluiceError::permanent(
            ReasonCode::SchemaMismatch,
            format!(
                "record id {:?} has the form of a stream position (shard:sequence), which names records that \
                 name no id of their own: it could be another record's",
                envelope.record_id.as_str()
            ),
        ));
    }
    Ok(stamped(envelope, arrived_ms))
}

/// The record id an envelope names, when the record is one that [`parse`] refused (a schema
/// version from elsewhere, a field wrong): its DLQ entry is then found by the producer's id, not
/// only by its stream position.
pub(crate) fn claimed_id(body: &[u8]) -> Option<RecordId> {
    let value: serde_json::Value = serde_json::from_slice(without_bom(body)).ok()?;
    if !Envelope::looks_like_envelope(&value) {
        return None;
    }
    RecordId::parse(value.get("record_id")?.as_str()?.to_owned()).ok().filter(|id| !id.is_stream_position())
}

/// The envelope stamped as ingested now, with a trace if it came without one or with one that
/// is no W3C `traceparent`.
fn stamped(mut envelope: Envelope, arrived_ms: u64) -> Envelope {
    let times = &mut envelope.timestamps;
    times.produced_ms = times.produced_ms.or(Some(arrived_ms));
    times.ingested_ms = Some(now_ms());
    envelope.trace = envelope.trace.as_deref().and_then(traces::canonical).or_else(|| Some(new_traceparent()));
    envelope
}

/// The id a raw event names in `record_id_field`: none when it is not configured or the event
/// lacks the field (the stream position serves); an error when the field holds anything but a
/// valid record id string, rather than an id made up in its place.
pub fn raw_event_id(event: &serde_json::Value, config: &IngestConfig) -> Result<Option<RecordId>> {
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

/// Checks an inline payload is what its content type says: the CPU's part of the check (a JSON
/// parse, an image's structure or decode), done for a whole batch on every core. A
/// claim-checked payload is checked by [`check_claim_checked`], once fetched.
pub(crate) fn check_inline(envelope: &Envelope, config: &IngestConfig, tabular: Option<&TabularSpec>) -> Result<()> {
    match &envelope.payload {
        Payload::Inline { data } => check_bytes(data, envelope.content_type, config.max_payload_bytes, config, tabular),
        Payload::ClaimCheck { .. } => Ok(()),
        Payload::Released => {
            Err(SluiceError::permanent(ReasonCode::SchemaMismatch, "a producer's envelope must carry a payload"))
        }
    }
}

/// Loads a claim-checked payload and checks it; moves a large inline payload (checked already by
/// [`check_inline`]) behind a claim-check.
pub(crate) async fn check_claim_checked(
    envelope: &mut Envelope,
    blobs: &dyn BlobStore,
    config: &IngestConfig,
    tabular: Option<&TabularSpec>,
) -> Result<()> {
    match &envelope.payload {
        Payload::ClaimCheck { reference } => {
            // A JSON event over its limit is refused before its bytes are read, where the store can tell.
            let most = envelope.content_type.read_at_most(config.max_claim_check_bytes, config.max_event_bytes);
            let data = blobs.get_at_most(reference, most).await?;
            check_bytes(&data, envelope.content_type, config.max_claim_check_bytes, config, tabular)
        }
        Payload::Inline { data } if data.len() > config.inline_limit_bytes => {
            envelope.payload = Payload::ClaimCheck { reference: blobs.put(data.clone()).await? };
            Ok(())
        }
        Payload::Inline { .. } | Payload::Released => Ok(()),
    }
}

/// Checks a payload of at most `limit` bytes is what `content_type` says.
fn check_bytes(
    data: &[u8],
    content_type: ContentType,
    limit: usize,
    config: &IngestConfig,
    tabular: Option<&TabularSpec>,
) -> Result<()> {
    if data.is_empty() {
        return Err(SluiceError::permanent(ReasonCode::EmptyPayload, "the payload has no bytes"));
    }
    if data.len() > limit {
        return Err(too_large(data.len(), limit));
    }
    match content_type {
        ContentType::Json => {
            if data.len() > config.max_event_bytes {
                return Err(SluiceError::permanent(
                    ReasonCode::PayloadTooLarge,
                    format!(
                        "a JSON event of {} bytes; the limit is {} (ingest.max_event_bytes)",
                        data.len(),
                        config.max_event_bytes
                    ),
                ));
            }
            let value: serde_json::Value = serde_json::from_slice(data).map_err(|e| {
                SluiceError::permanent(ReasonCode::InvalidJson, format!("payload is not valid JSON: {e}"))
            })?;
            let Some(event) = value.as_object() else {
                return Err(SluiceError::permanent(ReasonCode::SchemaMismatch, "a JSON event must be an object"));
            };
            if let Some(spec) = tabular {
                spec.check(event).map_err(|wrong| SluiceError::permanent(ReasonCode::SchemaMismatch, wrong))?;
            }
        }
        image => {
            sluice_core::image::check(data, image, &config.image_limits, config.image_check)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::envelope::MAX_ATTRIBUTE_BYTES;

    /// An envelope as a producer sends it: record `r-1`, a PNG.
    fn sent() -> Envelope {
        Envelope::inline(RecordId::parse("r-1").unwrap(), "test", ContentType::Png, vec![1, 2, 3])
    }

    /// What ingest makes of `body`: the envelope, or the reason code it is refused with.
    fn read(body: &serde_json::Value) -> std::result::Result<Envelope, ReasonCode> {
        let position = RecordId::parse("shard-0:1").unwrap();
        parse(&serde_json::to_vec(body).unwrap(), &position, None, 7, &IngestConfig::default()).map_err(|e| e.code())
    }

    #[test]
    fn envelopes_read_straight_or_by_way_of_a_json_value_end_alike() {
        let sent = sent();
        let good = serde_json::to_value(&sent).unwrap();
        let envelope = read(&good).unwrap();
        assert_eq!((envelope.record_id.as_str(), envelope.payload), ("r-1", sent.payload.clone()));
        assert!(envelope.timestamps.ingested_ms.is_some() && envelope.trace.is_some());

        let with = |key: &str, value: serde_json::Value| {
            let mut body = good.clone();
            body[key] = value;
            body
        };
        assert_eq!(read(&with("schema_version", 2.into())).unwrap_err(), ReasonCode::UnsupportedSchemaVersion);
        assert_eq!(read(&with("extra", 1.into())).unwrap_err(), ReasonCode::SchemaMismatch);
        assert_eq!(read(&with("content_type", "image/gif".into())).unwrap_err(), ReasonCode::UnsupportedContentType);
        assert_eq!(read(&with("record_id", "has space".into())).unwrap_err(), ReasonCode::SchemaMismatch);
        // A raw event is no envelope: wrapped, under the stream position.
        let raw = read(&serde_json::json!({"amount": 3})).unwrap();
        assert_eq!((raw.record_id.as_str(), raw.content_type), ("shard-0:1", ContentType::Json));

        // A refused envelope is still known by the id its producer gave it, where it can be read.
        let claimed = |body: &serde_json::Value| claimed_id(&serde_json::to_vec(body).unwrap());
        assert_eq!(claimed(&with("schema_version", 2.into())).unwrap().as_str(), "r-1");
        assert_eq!(claimed(&with("content_type", "image/gif".into())).unwrap().as_str(), "r-1");
        assert_eq!(claimed(&with("record_id", "has space".into())), None);
        assert_eq!(claimed(&serde_json::json!({"record_id": "r-2"})), None, "a raw event is no envelope");
    }

    /// An id of a stream position's form could be another record's (one that names no id): a
    /// producer may not claim one, and its refused record is filed under its own position.
    #[test]
    fn a_producer_may_not_claim_a_stream_position_for_an_id() {
        let sent = sent();
        let claiming = |id: &str| {
            let mut body = serde_json::to_value(&sent).unwrap();
            body["record_id"] = id.into();
            body
        };
        for taken in ["shard-0000:17", "shardId-000000000003:49590338271490256608559692538361571095921575989136588898"]
        {
            assert_eq!(read(&claiming(taken)).unwrap_err(), ReasonCode::SchemaMismatch, "{taken}");
            assert_eq!(claimed_id(&serde_json::to_vec(&claiming(taken)).unwrap()), None, "{taken}");
        }
        for free in ["order:123", "shard-0000:17a", "shard-0000:", "my-shard-1:2"] {
            assert_eq!(read(&claiming(free)).unwrap().record_id.as_str(), free);
        }
        // Its own position is its own.
        assert_eq!(read(&claiming("shard-0:1")).unwrap().record_id.as_str(), "shard-0:1");
        // A raw event's id field too.
        let config = IngestConfig { record_id_field: Some("id".to_owned()), ..IngestConfig::default() };
        let position = RecordId::parse("shard-0:1").unwrap();
        let event = br#"{"id": "shard-0002:5", "amount": 3}"#;
        assert_eq!(parse(event, &position, None, 7, &config).unwrap_err().code(), ReasonCode::SchemaMismatch);
    }

    /// An envelope that names a field twice is refused: read as a value, the last would win,
    /// where another reader of the record may take the first.
    #[test]
    fn an_envelope_naming_a_field_twice_is_refused() {
        let sent = sent();
        let twice = String::from_utf8(sent.to_json()).unwrap().replacen('{', "{\"record_id\":\"r-2\",", 1);
        let position = RecordId::parse("shard-0:1").unwrap();
        let err = parse(twice.as_bytes(), &position, None, 7, &IngestConfig::default()).unwrap_err();
        assert_eq!(err.code(), ReasonCode::SchemaMismatch, "{err}");
        assert!(err.detail().contains("duplicate field `record_id`"), "{err}");
    }

    /// A JSON event past `max_event_bytes` is refused before it is read (read, it would take many
    /// times its size in memory); an image of that size is not an event.
    #[test]
    fn json_events_past_their_limit_are_refused_unread() {
        let config = IngestConfig { max_event_bytes: 64, ..IngestConfig::default() };
        let event = |len: usize| format!("{{\"amount\": [{}0]}}", "0,".repeat((len - 15) / 2)).into_bytes();
        let check = |data: Vec<u8>, content_type| {
            let envelope = Envelope::inline(RecordId::parse("e-1").unwrap(), "test", content_type, data);
            check_inline(&envelope, &config, None).map_err(|e| e.code())
        };
        assert!(event(64).len() <= 64 && check(event(64), ContentType::Json).is_ok());
        assert!(event(200).len() > 64);
        assert_eq!(check(event(200), ContentType::Json), Err(ReasonCode::PayloadTooLarge));
        assert_eq!(check(sluice_core::testing::images::png(8, 8), ContentType::Png), Ok(()));
    }

    #[test]
    fn a_producer_trace_goes_on_only_as_a_w3c_traceparent() {
        let sent = sent();
        let with_trace = |trace: &str| {
            let mut body = serde_json::to_value(&sent).unwrap();
            body["trace"] = trace.into();
            read(&body).unwrap().trace.unwrap()
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(with_trace(good), good);
        // SQS refuses a control character in the attribute the trace travels in: the record
        // would stop its shard, not a trace be lost.
        for bad in ["\u{1}", "nonsense", &format!("{good}\u{1}\u{fffe}")] {
            let trace = with_trace(bad);
            assert!(trace != bad && traces::canonical(&trace).as_deref() == Some(trace.as_str()), "{bad:?} -> {trace}");
        }
    }

    #[test]
    fn json_after_a_byte_order_mark_is_json_and_a_bare_value_is_no_event() {
        let position = RecordId::parse("shard-0:1").unwrap();
        let parse = |body: &[u8]| parse(body, &position, None, 7, &IngestConfig::default());
        let event = parse(b"\xEF\xBB\xBF{\"amount\": 3}").unwrap();
        assert_eq!(event.content_type, ContentType::Json);
        for scalar in [&b"42"[..], b"\"hello\"", b"\xEF\xBB\xBFtrue"] {
            let err = parse(scalar).unwrap_err();
            assert_eq!(err.code(), ReasonCode::SchemaMismatch, "{err}");
            assert!(err.to_string().contains("must be an object"), "{err}");
        }
        assert_eq!(parse(b"GIF89a").unwrap_err().code(), ReasonCode::UnsupportedContentType);
        // JSON lines written as one record: refused, saying how to send them.
        let err = parse(b"{\"p00\": 3}\n{\"p01\": 5}\n").unwrap_err();
        assert_eq!(err.code(), ReasonCode::InvalidJson);
        assert!(err.detail().contains("one event a record"), "{err}");
        assert!(!parse(b"{\"p00\": 3,").unwrap_err().detail().contains("one event a record"));
    }

    #[test]
    fn a_raw_records_partition_key_is_kept_in_its_attributes_and_an_envelopes_are_bounded() {
        let position = RecordId::parse("shard-0:1").unwrap();
        let config = IngestConfig::default();
        let png = sluice_core::testing::images::png(2, 2);
        for body in [&png[..], b"{\"amount\": 3}"] {
            let raw = parse(body, &position, Some("camera-7/frame-12.png"), 7, &config).unwrap();
            assert_eq!(raw.attributes.get(PARTITION_KEY_ATTRIBUTE).map(String::as_str), Some("camera-7/frame-12.png"));
            // A replay's key names the record, not what its producer sent (whatever id it names).
            for replay in [position.replay_partition_key(), RecordId::parse("order-17").unwrap().replay_partition_key()]
            {
                let replayed = parse(body, &position, Some(&replay), 7, &config).unwrap();
                assert!(replayed.attributes.is_empty(), "{replay}: {:?}", replayed.attributes);
            }
        }
        // An envelope's own attributes stand as sent, up to MAX_ATTRIBUTE_BYTES.
        let mut envelope = sent();
        envelope.attributes.insert("camera".to_owned(), "7".to_owned());
        let read = parse(&envelope.to_json(), &position, Some("key"), 7, &config).unwrap();
        assert_eq!(read.attributes, envelope.attributes);
        envelope.attributes.insert("notes".to_owned(), "x".repeat(MAX_ATTRIBUTE_BYTES));
        let err = parse(&envelope.to_json(), &position, None, 7, &config).unwrap_err();
        assert_eq!(err.code(), ReasonCode::SchemaMismatch, "{err}");
        assert!(err.detail().contains("attributes take"), "{err}");
    }
}
