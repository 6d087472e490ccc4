//! What the stages hand each other after features, and what the pipeline ends in: results and
//! dead-letter entries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, RecordId, StageTimes, now_ms};
use crate::error::{ReasonCode, Result, SluiceError};
use crate::topology::StageName;

/// A model's output for one record, as the inference stage forwards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub probabilities: Vec<f32>,
    pub model: String,
    pub model_version: String,
    /// `candle-cpu`, `candle-cuda` or `sagemaker`.
    pub backend: String,
}

/// The message on the results queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferredRecord {
    pub envelope: Envelope,
    pub prediction: Prediction,
}

impl InferredRecord {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an inferred record always serialises")
    }

    /// Parses a message of the results queue. Probabilities must be finite numbers: one too
    /// large for an f32 would read as infinity, and write back out as `null`.
    /// A newer build's record is treated as [`Envelope::from_json`] treats its envelope.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let record: Self =
            serde_json::from_slice(bytes).map_err(|e| crate::envelope::unread(bytes, "inferred record", &e))?;
        crate::envelope::readable(record.envelope.schema_version)?;
        if let Some(bad) = record.prediction.probabilities.iter().find(|p| !p.is_finite()) {
            return Err(SluiceError::permanent(
                ReasonCode::MalformedMessage,
                format!("inferred record: a probability is {bad}, not a finite number"),
            ));
        }
        Ok(record)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// Confident enough to act on.
    Accepted,
    /// Under its class threshold: waiting for a person.
    Review,
    /// A person has looked at it.
    Reviewed,
    /// A person sent it to the results DLQ instead (`rejected_in_review`): no result, but a
    /// marker that the record has ended there, so that a copy of it reaching results later is
    /// not given one. Left out of listings unless asked for, and out of the result counts.
    Rejected,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Review => "review",
            Self::Reviewed => "reviewed",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Accepted, Self::Review, Self::Reviewed, Self::Rejected].into_iter().find(|s| s.as_str() == raw)
    }
}

/// How a result waiting for review is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A person says what it is: status `reviewed`, their label kept beside the model's.
    Label(String),
    /// Accepted as the model said (its confidence now clears the class threshold).
    Accept,
}

/// The one result a record ends in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionResult {
    pub record_id: RecordId,
    pub label: String,
    pub confidence: f32,
    pub probabilities: Vec<f32>,
    pub model: String,
    pub model_version: String,
    pub backend: String,
    pub status: ResultStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ground_truth: Option<String>,
    /// The label a person gave it in review, kept beside the model's `label`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed_label: Option<String>,
    /// When it left review (by a person's label, or accepted under new thresholds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed_ms: Option<u64>,
    pub timestamps: StageTimes,
    /// The producer's attributes of the record (the envelope's; a raw stream record's partition
    /// key as [`PARTITION_KEY_ATTRIBUTE`](crate::envelope::PARTITION_KEY_ATTRIBUTE)): what ties
    /// the result back to what was sent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Fields a newer build wrote that this one does not know: kept, so that settling a result
    /// (read, changed, written back whole) during a rolling upgrade does not drop them.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

impl PredictionResult {
    /// End-to-end latency from production to storage, when both are known.
    pub fn latency_ms(&self) -> Option<u64> {
        let t = &self.timestamps;
        Some(t.stored_ms?.saturating_sub(t.produced_ms?))
    }

    /// This result settled out of review: a person's label makes it `reviewed`; accepting it
    /// (its confidence clears a lowered threshold) makes it `accepted`.
    pub fn resolved(mut self, resolution: &Resolution) -> Self {
        match resolution {
            Resolution::Label(label) => {
                self.status = ResultStatus::Reviewed;
                self.reviewed_label = Some(label.clone());
            }
            Resolution::Accept => self.status = ResultStatus::Accepted,
        }
        self.reviewed_ms = Some(now_ms());
        self
    }

    /// The marker a reviewer's rejection leaves in place of this result (see
    /// [`ResultStatus::Rejected`]).
    pub fn rejected(mut self) -> Self {
        self.status = ResultStatus::Rejected;
        self.reviewed_ms = Some(now_ms());
        self
    }

    pub fn is_correct(&self) -> Option<bool> {
        self.ground_truth.as_ref().map(|truth| *truth == self.label)
    }
}

/// Attribute keys of the messages between stages.
pub mod message_attr {
    /// On the inference queue's messages: the [`crate::model::InputSpec::fingerprint`] of the
    /// bundle the features stage made the record's vector with.
    pub const INPUT_SPEC: &str = "sluice.input_spec";
}

/// Attribute keys under which a DLQ message carries why it is there. The message body is the
/// original, byte for byte: nothing a DLQ receives is rewritten.
pub mod dlq_attr {
    pub const STAGE: &str = "sluice.stage";
    pub const REASON: &str = "sluice.reason";
    pub const DETAIL: &str = "sluice.detail";
    pub const ATTEMPTS: &str = "sluice.attempts";
    pub const FIRST_FAILURE_MS: &str = "sluice.first_failure_ms";
    pub const LAST_FAILURE_MS: &str = "sluice.last_failure_ms";
    pub const RECORD_ID: &str = "sluice.record_id";
    /// On an entry whose body is a queue's stored batch that could not be read (embedded store),
    /// not a record: the batch's id.
    pub const STORED_BATCH: &str = "sluice.stored_batch";
    /// On an entry whose body could not be read back as it was sent (SQS: its claim-checked body
    /// gone from S3, an encoding no sluice sender wrote): why. Its body is the text SQS held.
    pub const UNREADABLE: &str = "sluice.unreadable";
}

/// The stored batch an entry written before `sluice.stored_batch` existed holds, from its detail
/// ("queue batch N of Q is unreadable …", which a redrive wrote for an unreadable batch), so that
/// such an entry is not replayed either.
fn stored_batch_of_old(attrs: &BTreeMap<String, String>) -> Option<i64> {
    if attrs.get(dlq_attr::REASON).map(String::as_str) != Some(ReasonCode::MalformedMessage.as_str())
        || attrs.contains_key(dlq_attr::RECORD_ID)
    {
        return None;
    }
    let detail = attrs.get(dlq_attr::DETAIL)?.strip_prefix("queue batch ")?;
    let (batch, rest) = detail.split_once(" of ")?;
    rest.contains(" is unreadable (").then(|| batch.parse().ok()).flatten()
}

/// A dead-letter entry: the original message plus why and when it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqEntry {
    pub stage: StageName,
    pub reason: ReasonCode,
    pub detail: String,
    pub attempts: u32,
    pub first_failure_ms: u64,
    pub last_failure_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<RecordId>,
    /// Set where the body is no record but a queue's stored batch that could not be read (the
    /// embedded store's, damaged): the batch's id. Such an entry can be kept or purged, not
    /// replayed: no stage can read its body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_batch: Option<i64>,
    /// The original message body, as the failing stage received it.
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl DlqEntry {
    /// An entry for a failure that happened just now.
    pub fn new(
        stage: StageName,
        error: &SluiceError,
        attempts: u32,
        record_id: Option<RecordId>,
        body: Vec<u8>,
    ) -> Self {
        let now = now_ms();
        Self {
            stage,
            reason: error.code(),
            detail: error.detail().to_owned(),
            attempts,
            first_failure_ms: now,
            last_failure_ms: now,
            record_id,
            stored_batch: None,
            body,
        }
    }

    pub fn attributes(&self) -> BTreeMap<String, String> {
        let mut attrs = BTreeMap::from([
            (dlq_attr::STAGE.to_owned(), self.stage.as_str().to_owned()),
            (dlq_attr::REASON.to_owned(), self.reason.as_str().to_owned()),
            (dlq_attr::DETAIL.to_owned(), self.detail.clone()),
            (dlq_attr::ATTEMPTS.to_owned(), self.attempts.to_string()),
            (dlq_attr::FIRST_FAILURE_MS.to_owned(), self.first_failure_ms.to_string()),
            (dlq_attr::LAST_FAILURE_MS.to_owned(), self.last_failure_ms.to_string()),
        ]);
        if let Some(id) = &self.record_id {
            attrs.insert(dlq_attr::RECORD_ID.to_owned(), id.to_string());
        }
        if let Some(batch) = self.stored_batch {
            attrs.insert(dlq_attr::STORED_BATCH.to_owned(), batch.to_string());
        }
        attrs
    }

    /// Reads an entry back from a DLQ message. A message the queue itself redrove carries no
    /// sluice attributes; it is reported as `max_receives_exceeded`.
    pub fn from_message(
        stage: StageName,
        body: Vec<u8>,
        attrs: &BTreeMap<String, String>,
        receive_count: u32,
        sent_at_ms: u64,
    ) -> Self {
        let num = |key: &str| attrs.get(key).and_then(|v| v.parse::<u64>().ok());
        let detail = attrs
            .get(dlq_attr::DETAIL)
            .cloned()
            .unwrap_or_else(|| "received more than max_receives times without being acknowledged".to_owned());
        // A reason this build does not know stays apart, under its own name, rather than pass
        // for the redrive's (a replay or a purge of those would take it along).
        let (reason, detail) = match attrs.get(dlq_attr::REASON) {
            None => (ReasonCode::MaxReceivesExceeded, detail),
            Some(raw) => match serde_json::from_value(serde_json::Value::String(raw.clone())) {
                Ok(reason) => (reason, detail),
                Err(_) => (ReasonCode::Unrecognised, format!("reason {raw:?}, unknown to this build: {detail}")),
            },
        };
        Self {
            stage,
            reason,
            detail,
            attempts: num(dlq_attr::ATTEMPTS).map(|n| n as u32).unwrap_or(receive_count),
            first_failure_ms: num(dlq_attr::FIRST_FAILURE_MS).unwrap_or(sent_at_ms),
            last_failure_ms: num(dlq_attr::LAST_FAILURE_MS).unwrap_or(sent_at_ms),
            record_id: attrs.get(dlq_attr::RECORD_ID).and_then(|id| RecordId::parse(id.clone()).ok()),
            stored_batch: attrs
                .get(dlq_attr::STORED_BATCH)
                .and_then(|b| b.parse().ok())
                .or_else(|| stored_batch_of_old(attrs)),
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result a newer build stored, with a field this build does not know, settled here and
    /// written back whole: the field is still there.
    #[test]
    fn a_result_settled_keeps_the_fields_a_newer_build_wrote() {
        let mut stored =
            serde_json::to_value(crate::testing::prediction_result("r-1", "cat", ResultStatus::Review)).unwrap();
        stored["explanation"] = serde_json::json!({"saliency": [0.1, 0.9]});
        let read: PredictionResult = serde_json::from_value(stored.clone()).unwrap();
        let written = serde_json::to_value(read.resolved(&Resolution::Label("dog".into()))).unwrap();
        assert_eq!(written["explanation"], stored["explanation"]);
        assert_eq!((&written["status"], &written["reviewed_label"]), (&"reviewed".into(), &"dog".into()));
        // A result of this build's has nothing more than it wrote.
        let ours = crate::testing::prediction_result("r-2", "cat", ResultStatus::Accepted);
        let again: PredictionResult = serde_json::from_slice(&serde_json::to_vec(&ours).unwrap()).unwrap();
        assert_eq!(again, ours);
    }

    #[test]
    fn an_inferred_record_with_an_overflowing_probability_is_malformed() {
        // Found by the queue_message fuzz target: 3e110 reads as an f32 infinity.
        let mut record = serde_json::to_value(InferredRecord {
            envelope: Envelope::inline(RecordId::parse("r").unwrap(), "t", crate::envelope::ContentType::Png, vec![1]),
            prediction: Prediction {
                probabilities: vec![0.5, 0.5],
                model: "m".into(),
                model_version: "1".into(),
                backend: "candle-cpu".into(),
            },
        })
        .unwrap();
        record["prediction"]["probabilities"][1] = serde_json::json!(3e110);
        let error = InferredRecord::from_json(&serde_json::to_vec(&record).unwrap()).unwrap_err();
        assert_eq!(error.code(), ReasonCode::MalformedMessage);
        assert!(error.detail().contains("inf"), "{error}");
    }

    #[test]
    fn dlq_entries_round_trip_through_attributes() {
        let err = SluiceError::permanent(ReasonCode::ImageTooLarge, "100000x100000");
        let entry = DlqEntry::new(StageName::Ingest, &err, 1, Some(RecordId::parse("r9").unwrap()), b"orig".to_vec());
        let back = DlqEntry::from_message(StageName::Ingest, b"orig".to_vec(), &entry.attributes(), 7, 0);
        assert_eq!(back, entry);
    }

    #[test]
    fn a_redriven_message_reads_as_max_receives_exceeded() {
        let entry = DlqEntry::from_message(StageName::Features, b"x".to_vec(), &BTreeMap::new(), 5, 1234);
        assert_eq!(entry.reason, ReasonCode::MaxReceivesExceeded);
        assert_eq!(entry.attempts, 5);
        assert_eq!(entry.first_failure_ms, 1234);
    }

    /// A reason a newer build wrote is kept apart under its own name, not read as the redrive's.
    #[test]
    fn a_reason_this_build_does_not_know_is_unrecognised_and_named() {
        let mut attrs = DlqEntry::new(
            StageName::Features,
            &SluiceError::permanent(ReasonCode::SchemaMismatch, "bad"),
            2,
            None,
            Vec::new(),
        )
        .attributes();
        attrs.insert(dlq_attr::REASON.to_owned(), "quarantined".to_owned());
        let entry = DlqEntry::from_message(StageName::Features, vec![], &attrs, 0, 0);
        assert_eq!(entry.reason, ReasonCode::Unrecognised);
        assert_eq!(entry.detail, "reason \"quarantined\", unknown to this build: bad");
    }

    /// An unreadable batch's entry says so in an attribute; one a redrive wrote before that
    /// attribute existed is known by its detail, and nothing else is taken for one.
    #[test]
    fn an_entry_holding_a_stored_batch_is_known_with_or_without_its_attribute() {
        let err = SluiceError::permanent(
            ReasonCode::MalformedMessage,
            "queue batch 7 of features is unreadable (invalid varint); the 3 messages of it still queued end here",
        );
        let mut entry = DlqEntry::new(StageName::Features, &err, 2, None, Vec::new());
        let read = |attrs: &BTreeMap<String, String>| DlqEntry::from_message(StageName::Features, vec![], attrs, 0, 0);
        assert_eq!(read(&entry.attributes()).stored_batch, Some(7), "from the detail of an older entry");
        entry.stored_batch = Some(8);
        assert_eq!(read(&entry.attributes()).stored_batch, Some(8), "the attribute, where there is one");

        entry.stored_batch = None;
        let mut attrs = entry.attributes();
        attrs.insert(dlq_attr::RECORD_ID.to_owned(), "r1".to_owned());
        assert_eq!(read(&attrs).stored_batch, None, "an entry with a record holds that record");
        let other = SluiceError::permanent(ReasonCode::MalformedMessage, "queue batch of bytes is unreadable (x)");
        let other = DlqEntry::new(StageName::Features, &other, 1, None, Vec::new());
        assert_eq!(read(&other.attributes()).stored_batch, None);
    }
}
