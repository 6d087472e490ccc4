//! Prediction capture: what every captured prediction looks like in the capture log (JSON
//! lines in files locally, objects under an S3 prefix on AWS), after SageMaker Model Monitor's
//! data capture. The results stage writes it; the monitor reads it back.
//!
//! The schema is documented in `docs/monitoring.md`; a change that is not additive gets a new
//! [`CAPTURE_SCHEMA`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::envelope::{RecordId, StageTimes};
use crate::record::{PredictionResult, ResultStatus};

/// The `schema` of every captured line.
pub const CAPTURE_SCHEMA: &str = "sluice.capture/1";

/// One captured prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureRecord {
    pub schema: String,
    pub record_id: RecordId,
    /// When its result was stored: the time windows select on.
    pub captured_ms: u64,
    pub model: String,
    pub model_version: String,
    /// `candle-cpu`, `candle-cuda` or `sagemaker-xgboost`.
    pub backend: String,
    /// The predicted class and its probability.
    pub label: String,
    pub confidence: f32,
    pub probabilities: Vec<f32>,
    /// `accepted` or `review`, as the results stage judged it.
    pub status: ResultStatus,
    /// The record's content type (`image/png`, `application/json`…).
    pub content_type: String,
    pub timestamps: StageTimes,
    /// The engineered feature vector of a tabular record (JSON event), in the order of the
    /// bundle's tabular spec; absent for images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<f32>>,
    /// The producer's attributes of the record (its envelope's; a raw record's partition key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl CaptureRecord {
    pub fn new(
        result: &PredictionResult,
        content_type: &str,
        features: Option<Vec<f32>>,
        attributes: BTreeMap<String, String>,
    ) -> Self {
        Self {
            schema: CAPTURE_SCHEMA.to_owned(),
            record_id: result.record_id.clone(),
            captured_ms: result.timestamps.stored_ms.unwrap_or_else(crate::envelope::now_ms),
            model: result.model.clone(),
            model_version: result.model_version.clone(),
            backend: result.backend.clone(),
            label: result.label.clone(),
            confidence: result.confidence,
            probabilities: result.probabilities.clone(),
            status: result.status,
            content_type: content_type.to_owned(),
            timestamps: result.timestamps.clone(),
            features,
            attributes,
        }
    }

    /// The record as one line of the log, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a capture record serialises");
        line.push(b'\n');
        line
    }
}

/// Whether `id` falls in a sample of `rate` (0 to 1). Decided by the id alone, so that a
/// redelivered record is sampled the same way as the first time.
pub fn sampled(id: &RecordId, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    f64::from(id_hash(id)) / f64::from(u32::MAX) < rate
}

/// The hash [`sampled`] judges a record by: the records sampled at any rate are those whose
/// hash is lowest.
pub fn id_hash(id: &RecordId) -> u32 {
    crc32fast::hash(id.as_str().as_bytes())
}

/// The rate at which [`sampled`] takes exactly the records whose [`id_hash`] is `highest` or
/// lower.
pub fn rate_through(highest: u32) -> f64 {
    (f64::from(highest) + 0.5) / f64::from(u32::MAX)
}

/// Reads captured lines back, skipping what does not parse (a line cut short by a crash, a
/// later schema) and counting it.
pub fn parse_lines(chunk: &[u8], skipped: &mut u64) -> Vec<CaptureRecord> {
    chunk
        .split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .filter_map(|line| match serde_json::from_slice::<CaptureRecord>(line) {
            Ok(record) if record.schema == CAPTURE_SCHEMA => Some(record),
            _ => {
                *skipped += 1;
                None
            }
        })
        .collect()
}

/// `YYYY/MM/DD/HH` (UTC) of a time: how capture objects are grouped under their prefix, as
/// SageMaker's data capture groups them.
pub fn hour_path(ms: u64) -> String {
    // Times past what four-digit years can write (an open-ended window) are the last hour that can.
    let ms = ms.min(crate::backend::MAX_STORED_MS);
    let stamp = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
    let s = stamp.to_string();
    format!("{}/{}/{}/{}", &s[0..4], &s[5..7], &s[8..10], &s[11..13])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_decided_by_the_id() {
        let ids: Vec<RecordId> = (0..2000).map(|i| RecordId::parse(format!("r{i}")).unwrap()).collect();
        let kept = ids.iter().filter(|id| sampled(id, 0.25)).count();
        assert!((400..600).contains(&kept), "{kept} of 2000 kept at 25%");
        assert!(ids.iter().all(|id| sampled(id, 0.25) == sampled(id, 0.25)));
        assert!(ids.iter().all(|id| sampled(id, 1.0)));
        assert!(!ids.iter().any(|id| sampled(id, 0.0)));
        // The records of the lowest hashes are those a rate takes.
        let mut hashes: Vec<u32> = ids.iter().map(id_hash).collect();
        hashes.sort_unstable();
        for k in [1, 10, 999] {
            let taken = ids.iter().filter(|id| sampled(id, rate_through(hashes[k - 1]))).count();
            assert_eq!(taken, k);
        }
    }

    #[test]
    fn lines_round_trip_and_broken_ones_are_counted() {
        let mut result = crate::testing::prediction_result("r1", "7", ResultStatus::Accepted);
        result.timestamps.stored_ms = Some(5);
        let record = CaptureRecord::new(&result, "image/png", None, BTreeMap::new());
        let mut chunk = record.to_line();
        chunk.extend_from_slice(b"{\"schema\":\"sluice.capture/1\",\"record_id\"");
        let mut skipped = 0;
        assert_eq!(parse_lines(&chunk, &mut skipped), vec![record]);
        assert_eq!(skipped, 1);
    }

    #[test]
    fn hour_paths_are_utc() {
        assert_eq!(hour_path(0), "1970/01/01/00");
        assert_eq!(hour_path(u64::MAX), "2286/11/20/17");
        assert_eq!(hour_path(1_795_000_000_000), "2026/11/18/11");
    }
}
