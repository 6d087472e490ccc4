//! The versioned record envelope that travels between stages.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ReasonCode, Result, SluiceError};

/// The envelope schema this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The attribute ingest keeps a raw stream record's partition key in: what ties its result back
/// to what the producer sent, its id being its stream position.
pub const PARTITION_KEY_ATTRIBUTE: &str = "partition_key";

/// The most bytes an envelope's attributes may take, names and values together: they go with the
/// record to its result (on AWS a DynamoDB item of at most 400 KB), so they are for tags, not data.
pub const MAX_ATTRIBUTE_BYTES: usize = 16 * 1024;

/// Longest record id accepted: DynamoDB and SQS dedup keys stay well within their limits.
const MAX_RECORD_ID_LEN: usize = 200;

/// A record's identity, the idempotency key of every sink. Once it exists it is valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RecordId(String);

impl RecordId {
    /// Accepts 1 to 200 printable ASCII characters without whitespace.
    pub fn parse(raw: impl Into<String>) -> Result<Self> {
        let raw = raw.into();
        if raw.is_empty() || raw.len() > MAX_RECORD_ID_LEN {
            return Err(SluiceError::permanent(
                ReasonCode::SchemaMismatch,
                format!("record id must be 1 to {MAX_RECORD_ID_LEN} characters, got {}", raw.len()),
            ));
        }
        if let Some(c) = raw.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(SluiceError::permanent(
                ReasonCode::SchemaMismatch,
                format!("record id contains {c:?}; only printable ASCII without spaces is allowed"),
            ));
        }
        Ok(Self(raw))
    }

    /// The id of a record that brought none: a hash of its content.
    pub fn from_content(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        Self(format!("sha256-{hex}"))
    }

    /// The id of a raw record taken from its stream position, stable across redeliveries.
    pub fn from_stream_position(shard: &str, sequence: &str) -> Self {
        Self(format!("{shard}:{sequence}"))
    }

    /// The partition key a replay of this record's DLQ entry is written to the stream with: it
    /// tells ingest the record's id (a raw record's id comes from its first stream position) and
    /// that this is no new arrival.
    pub fn replay_partition_key(&self) -> String {
        format!("{REPLAY_KEY_PREFIX}{}", self.0)
    }

    /// The record a replay's partition key names, if it is one. Only a stream position's id is
    /// taken from a key (a replayed record that names its id names it in its body): a producer's
    /// own key that happened to start with the prefix cannot give its record another's id.
    pub fn from_replay_partition_key(partition_key: &str) -> Option<Self> {
        partition_key
            .strip_prefix(REPLAY_KEY_PREFIX)
            .and_then(|id| Self::parse(id).ok())
            .filter(Self::is_stream_position)
    }

    /// Whether the id has the form [`from_stream_position`](Self::from_stream_position) gives:
    /// a shard (Kinesis `shardId-…`, embedded `shard-…`), a colon, the sequence's digits. Ids of
    /// that form are kept for records that name none; a producer's would be another record's.
    pub fn is_stream_position(&self) -> bool {
        let Some((shard, sequence)) = self.0.rsplit_once(':') else { return false };
        (shard.starts_with("shardId-") || shard.starts_with("shard-"))
            && !sequence.is_empty()
            && sequence.bytes().all(|b| b.is_ascii_digit())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Starts the partition key of a record replayed from the ingest DLQ.
pub const REPLAY_KEY_PREFIX: &str = "sluice-replay/";

impl TryFrom<String> for RecordId {
    type Error = SluiceError;
    fn try_from(value: String) -> Result<Self> {
        Self::parse(value)
    }
}

impl From<RecordId> for String {
    fn from(id: RecordId) -> Self {
        id.0
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The content types sluice processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ContentType {
    Png,
    Jpeg,
    Json,
}

impl ContentType {
    pub fn parse(raw: &str) -> Result<Self> {
        let essence = raw.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match essence.as_str() {
            "image/png" => Ok(Self::Png),
            "image/jpeg" | "image/jpg" => Ok(Self::Jpeg),
            "application/json" => Ok(Self::Json),
            _ => Err(SluiceError::permanent(
                ReasonCode::UnsupportedContentType,
                format!("content type {raw:?} is not one of image/png, image/jpeg, application/json"),
            )),
        }
    }

    /// The most bytes of a claim-checked payload of this type to read: `most`, or for a JSON
    /// event `event_most` where that is less (an event is read whole, at many times its size).
    pub fn read_at_most(self, most: usize, event_most: usize) -> usize {
        match self {
            Self::Json => event_most.min(most),
            Self::Png | Self::Jpeg => most,
        }
    }

    /// Recognises a raw payload by its first bytes, as a producer that sends bare data needs.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
        const JPEG_MAGIC: &[u8] = b"\xff\xd8\xff";
        if bytes.starts_with(PNG_MAGIC) {
            return Some(Self::Png);
        }
        if bytes.starts_with(JPEG_MAGIC) {
            return Some(Self::Jpeg);
        }
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') | Some(b'[') => Some(Self::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Json => "application/json",
        }
    }

    pub fn is_image(self) -> bool {
        matches!(self, Self::Png | Self::Jpeg)
    }
}

impl TryFrom<String> for ContentType {
    type Error = SluiceError;
    fn try_from(value: String) -> Result<Self> {
        Self::parse(&value)
    }
}

impl From<ContentType> for String {
    fn from(ct: ContentType) -> Self {
        ct.as_str().to_owned()
    }
}

/// Where a record's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Payload {
    /// The bytes themselves, base64 in JSON.
    Inline {
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// A claim-check: `blob:<id>` on the embedded store, `s3://bucket/key` on AWS.
    ClaimCheck { reference: String },
    /// Dropped after the features stage: the record's vector is in the feature store.
    Released,
}

/// Milliseconds since the Unix epoch at which each stage handled the record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produced_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingested_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub featured_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inferred_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_ms: Option<u64>,
}

/// A record as it travels through the pipeline. Read off a queue, fields it does not know are
/// passed over (a newer build's, during a rolling upgrade: [`Envelope::from_json`]); a producer's
/// are refused ([`Envelope::from_value`], [`Envelope::from_producer`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub schema_version: u32,
    pub record_id: RecordId,
    pub source: String,
    pub content_type: ContentType,
    pub payload: Payload,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// W3C `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    #[serde(default)]
    pub timestamps: StageTimes,
}

/// The envelope as it arrives, before its content type is checked, so that an unknown content
/// type is reported as such and not as a schema error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    schema_version: u32,
    record_id: String,
    source: String,
    content_type: String,
    payload: Payload,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    trace: Option<String>,
    #[serde(default)]
    timestamps: StageTimes,
}

impl WireEnvelope {
    /// The envelope, its record id and content type checked.
    fn into_envelope(self) -> Result<Envelope> {
        Ok(Envelope {
            schema_version: self.schema_version,
            record_id: RecordId::parse(self.record_id)?,
            source: self.source,
            content_type: ContentType::parse(&self.content_type)?,
            payload: self.payload,
            attributes: self.attributes,
            trace: self.trace,
            timestamps: self.timestamps,
        })
    }
}

impl Envelope {
    /// A new envelope with an inline payload, stamped as produced now.
    pub fn inline(record_id: RecordId, source: &str, content_type: ContentType, data: Vec<u8>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            record_id,
            source: source.to_owned(),
            content_type,
            payload: Payload::Inline { data },
            attributes: BTreeMap::new(),
            trace: None,
            timestamps: StageTimes { produced_ms: Some(now_ms()), ..StageTimes::default() },
        }
    }

    /// Refuses attributes past [`MAX_ATTRIBUTE_BYTES`].
    pub fn check_attributes(&self) -> Result<()> {
        let bytes: usize = self.attributes.iter().map(|(name, value)| name.len() + value.len()).sum();
        if bytes > MAX_ATTRIBUTE_BYTES {
            return Err(SluiceError::permanent(
                ReasonCode::SchemaMismatch,
                format!(
                    "the envelope's attributes take {bytes} bytes, over the {MAX_ATTRIBUTE_BYTES} they may: \
                     attributes are tags that go with the result; data goes in the payload"
                ),
            ));
        }
        Ok(())
    }

    /// Whether these bytes are meant to be a sluice envelope (as opposed to a raw JSON event).
    pub fn looks_like_envelope(value: &serde_json::Value) -> bool {
        value.as_object().is_some_and(|o| o.contains_key("schema_version") && o.contains_key("payload"))
    }

    /// Parses an envelope received from a producer, classifying every way it can be wrong.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let version = value.get("schema_version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(SCHEMA_VERSION)) {
            return Err(SluiceError::permanent(
                ReasonCode::UnsupportedSchemaVersion,
                match value.get("schema_version") {
                    Some(given) => {
                        format!("schema_version {given} is not supported; this build reads {SCHEMA_VERSION}")
                    }
                    None => format!("the envelope has no schema_version; this build reads {SCHEMA_VERSION}"),
                },
            ));
        }
        let wire: WireEnvelope = serde_json::from_value(value)
            .map_err(|e| SluiceError::permanent(ReasonCode::SchemaMismatch, format!("envelope: {e}")))?;
        wire.into_envelope()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }

    /// A producer's envelope read straight from its bytes, as [`from_value`](Self::from_value)
    /// would read it (this build's schema version, no field it does not know), or `None` where it
    /// does not read so (the error, where the bytes did not read as one): read as a JSON value,
    /// [`from_value`](Self::from_value) then says what is wrong.
    pub fn from_producer(bytes: &[u8]) -> std::result::Result<Option<Self>, serde_json::Error> {
        let wire: WireEnvelope = serde_json::from_slice(bytes)?;
        Ok(Some(wire).filter(|w| w.schema_version == SCHEMA_VERSION).and_then(|w| w.into_envelope().ok()))
    }

    /// Decodes an envelope that a sluice stage wrote onto a queue. A rolling upgrade runs two
    /// builds on one queue: fields a newer build added are passed over, and an envelope of a
    /// newer schema version is handed back (retryable) for a worker of that build to take (one
    /// this worker keeps receiving is dead-lettered at its last receive, as
    /// `unsupported_schema_version`, for the newer build to replay).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let envelope: Self = serde_json::from_slice(bytes).map_err(|e| unread(bytes, "envelope", &e))?;
        readable(envelope.schema_version)?;
        Ok(envelope)
    }
}

/// Why a queue message (`what`) did not read as this build reads one: written by a newer build
/// (its envelope's schema version, at its top or under `envelope`, is past this build's), or
/// malformed.
pub(crate) fn unread(bytes: &[u8], what: &str, error: &serde_json::Error) -> SluiceError {
    #[derive(Deserialize)]
    struct Versioned {
        schema_version: Option<u64>,
        envelope: Option<Box<Versioned>>,
    }
    let read = serde_json::from_slice::<Versioned>(bytes).ok();
    match read.and_then(|read| read.schema_version.or_else(|| read.envelope?.schema_version)) {
        Some(version) if version > u64::from(SCHEMA_VERSION) => newer_schema(version),
        _ => SluiceError::permanent(ReasonCode::MalformedMessage, format!("{what}: {error}")),
    }
}

/// A queue message's envelope of `version`, read: refused when a newer build wrote it.
pub(crate) fn readable(version: u32) -> Result<()> {
    if version > SCHEMA_VERSION { Err(newer_schema(u64::from(version))) } else { Ok(()) }
}

/// A message of a newer build than this one: left (retryable) for a worker of that build.
fn newer_schema(version: u64) -> SluiceError {
    SluiceError::retryable(
        ReasonCode::UnsupportedSchemaVersion,
        format!(
            "a message of schema_version {version}, from a newer build (this one reads up to {SCHEMA_VERSION}): \
             left for a worker of that build"
        ),
    )
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// A time as people and programs give one (`--since`, `?since=`): milliseconds since the Unix
/// epoch (`1796686941493`), an RFC 3339 time (`2026-11-26T09:00:00Z`), or an age (`2h`, `90m`).
pub fn parse_time(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        return raw.parse().map_err(|_| format!("{raw:?} is too large for milliseconds since the epoch"));
    }
    let time = match humantime::parse_duration(raw) {
        Ok(age) => std::time::SystemTime::now().checked_sub(age).unwrap_or(std::time::UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(raw).map_err(|_| {
            format!("{raw:?} is neither a time (2026-11-26T09:00:00Z, or milliseconds since the epoch) nor an age (2h)")
        })?,
    };
    Ok(time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64)
}

/// `body` without a UTF-8 byte-order mark, which some editors and producers put before JSON
/// (serde_json reads past whitespace, not past the mark).
pub fn without_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// A fresh W3C `traceparent` for a record that arrived without one.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map_err(|e| serde::de::Error::custom(describe(&text, &e)))
    }

    /// The decoder's own words ("Invalid symbol 33, offset 0.") name a byte by its number and
    /// place in bytes; this names the character the producer wrote, counted in characters.
    fn describe(text: &str, error: &base64::DecodeError) -> String {
        use base64::DecodeError::*;
        let written = |at: usize| {
            let character = text.get(at..).and_then(|rest| rest.chars().next()).unwrap_or('?');
            (character, text.get(..at).map_or(at, |before| before.chars().count()))
        };
        let what = match error {
            InvalidByte(at, b'=') => format!("a `=` at character {} (padding goes only at the end)", written(*at).1),
            InvalidByte(at, _) => {
                let (character, place) = written(*at);
                format!("{character:?} at character {place} is not a base64 character")
            }
            InvalidLastSymbol(at, _) => {
                let (character, place) = written(*at);
                format!("its last character ({character:?}, at {place}) leaves bits over: cut short or altered?")
            }
            InvalidLength(length) => {
                format!("{length} characters cannot be base64 (a whole number of 4, padded with =)")
            }
            InvalidPadding => "its `=` padding is wrong".to_owned(),
        };
        format!("the payload's data is not standard base64 (RFC 4648, `+/` and `=` padding): {what}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rolling upgrade runs two builds on one queue: a field a newer build added is passed
    /// over, and a newer schema version is handed back (retryable) for that build's workers;
    /// a producer's envelope is read strictly.
    #[test]
    fn a_queue_reads_a_newer_builds_envelope_as_far_as_it_can() {
        let envelope = Envelope::inline(RecordId::parse("r-1").unwrap(), "t", ContentType::Png, vec![1, 2]);
        let mut newer = serde_json::to_value(&envelope).unwrap();
        newer["priority"] = "high".into();
        let bytes = serde_json::to_vec(&newer).unwrap();
        assert_eq!(Envelope::from_json(&bytes).unwrap(), envelope);
        assert!(Envelope::from_producer(&bytes).is_err());
        assert_eq!(Envelope::from_value(newer.clone()).unwrap_err().code(), ReasonCode::SchemaMismatch);

        for changed in [None, Some(serde_json::json!(2)), Some(serde_json::json!("a shape this build cannot read"))] {
            let mut later = newer.clone();
            later["schema_version"] = 2.into();
            if let Some(payload) = changed {
                later["payload"] = payload;
            }
            let err = Envelope::from_json(&serde_json::to_vec(&later).unwrap()).unwrap_err();
            assert!(err.is_retryable() && err.code() == ReasonCode::UnsupportedSchemaVersion, "{err}");
            let inferred = serde_json::json!({"envelope": later, "prediction": {"probabilities": [1.0]}});
            let err = crate::record::InferredRecord::from_json(&serde_json::to_vec(&inferred).unwrap()).unwrap_err();
            assert!(err.is_retryable() && err.code() == ReasonCode::UnsupportedSchemaVersion, "{err}");
        }
        // Malformed as ever where no newer build wrote it.
        let err = Envelope::from_json(br#"{"schema_version": 1, "payload": 3}"#).unwrap_err();
        assert!(!err.is_retryable() && err.code() == ReasonCode::MalformedMessage, "{err}");
    }

    /// `--since` and `?since=` take milliseconds, an RFC 3339 time or an age alike.
    #[test]
    fn times_are_read_as_milliseconds_times_or_ages() {
        assert_eq!(parse_time("1796686941493"), Ok(1_796_686_941_493));
        assert_eq!(parse_time("2026-11-26T09:00:00Z"), Ok(1_795_683_600_000));
        let two_hours_ago = parse_time("2h").unwrap();
        assert!(now_ms().abs_diff(two_hours_ago + 7_200_000) < 60_000, "{two_hours_ago}");
        for bad in ["", "yesterday", "99999999999999999999999"] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
    }

    /// A replay's partition key names a stream position's id, and only that: a producer's key
    /// that starts with the prefix gives its record no other record's id.
    #[test]
    fn a_replay_key_names_only_a_stream_position() {
        let position = RecordId::from_stream_position("shardId-000000000001", "4959033827149025660855");
        assert!(position.is_stream_position());
        assert_eq!(RecordId::from_replay_partition_key(&position.replay_partition_key()), Some(position));
        let embedded = RecordId::from_stream_position("shard-0003", "12");
        assert_eq!(RecordId::from_replay_partition_key(&embedded.replay_partition_key()), Some(embedded));
        for forged in ["sluice-replay/victim-7", "sluice-replay/order:12", "sluice-replay/", "victim"] {
            assert_eq!(RecordId::from_replay_partition_key(forged), None, "{forged}");
        }
    }

    #[test]
    fn record_ids_are_parsed_not_trusted() {
        assert!(RecordId::parse("digits-test-0001").is_ok());
        assert!(RecordId::parse("").is_err());
        assert!(RecordId::parse("has space").is_err());
        assert!(RecordId::parse("x".repeat(201)).is_err());
        assert_eq!(RecordId::from_content(b"abc"), RecordId::from_content(b"abc"));
        assert_ne!(RecordId::from_content(b"abc"), RecordId::from_content(b"abd"));
    }

    #[test]
    fn content_types_are_sniffed() {
        assert_eq!(ContentType::sniff(b"\x89PNG\r\n\x1a\nrest"), Some(ContentType::Png));
        assert_eq!(ContentType::sniff(b"\xff\xd8\xff\xe0"), Some(ContentType::Jpeg));
        assert_eq!(ContentType::sniff(b"  {\"a\":1}"), Some(ContentType::Json));
        assert_eq!(ContentType::sniff(b"GIF89a"), None);
        assert_eq!(ContentType::parse("image/PNG; charset=binary").unwrap(), ContentType::Png);
        assert_eq!(ContentType::parse("text/plain").unwrap_err().code(), ReasonCode::UnsupportedContentType);
    }

    #[test]
    fn envelope_round_trips_and_classifies_errors() {
        let env = Envelope::inline(RecordId::parse("r1").unwrap(), "test", ContentType::Png, vec![1, 2, 3]);
        let back = Envelope::from_json(&env.to_json()).unwrap();
        assert_eq!(back, env);

        let mut value = serde_json::to_value(&env).unwrap();
        assert!(Envelope::looks_like_envelope(&value));
        value["content_type"] = "application/x-unknown".into();
        assert_eq!(Envelope::from_value(value.clone()).unwrap_err().code(), ReasonCode::UnsupportedContentType);
        value["schema_version"] = 99.into();
        assert_eq!(Envelope::from_value(value).unwrap_err().code(), ReasonCode::UnsupportedSchemaVersion);
    }

    #[test]
    fn a_payload_that_is_not_base64_is_named_by_its_character() {
        let env = Envelope::inline(RecordId::parse("r1").unwrap(), "test", ContentType::Png, vec![1, 2, 3]);
        let refused = |data: &str| {
            let mut value = serde_json::to_value(&env).unwrap();
            value["payload"]["data"] = data.into();
            let error = Envelope::from_value(value).unwrap_err();
            assert_eq!(error.code(), ReasonCode::SchemaMismatch);
            error.to_string()
        };
        assert!(refused("AQ!D").contains("'!' at character 2 is not a base64 character"), "{}", refused("AQ!D"));
        assert!(refused("AQIDB").contains("5 characters cannot be base64"), "{}", refused("AQIDB"));
        assert!(refused("AR==").contains("leaves bits over"), "{}", refused("AR=="));
        assert!(refused("éAQID").contains("'é' at character 0 is not"), "{}", refused("éAQID"));
        assert!(refused("AQ=DAQID").contains("a `=` at character 2 (padding"), "{}", refused("AQ=DAQID"));
    }
}
