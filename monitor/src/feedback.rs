//! `sluice feedback`: true labels joined to results by record id, from a CSV file (columns
//! `record_id,label`, header optional) or JSON lines (`{"record_id": …, "label": …}`).
//! Unknown ids and bad lines are reported, never fatal; feeding the same file again changes
//! nothing.

use std::path::Path;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sluice_core::backend::{FeedbackOutcome, ResultStore};
use sluice_core::envelope::RecordId;
use sluice_core::{ReasonCode, Result, SluiceError};

/// One true label as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub line: u64,
    pub record_id: RecordId,
    pub label: String,
}

/// What a feedback file did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FeedbackReport {
    pub labels: u64,
    /// Results that now carry the label (they had none, or another).
    pub recorded: u64,
    /// Results that carried it already.
    pub unchanged: u64,
    /// Ids with no result (not yet stored, dead-lettered, expired, or mistyped).
    pub unknown: u64,
    /// The first of those ids.
    pub unknown_ids: Vec<String>,
    /// Lines that could not be used, with why.
    pub rejected: Vec<String>,
}

/// Unknown ids listed in the report; the rest are only counted.
const LISTED_UNKNOWN: usize = 50;
/// Labels written at once.
const CONCURRENCY: usize = 16;

#[derive(Deserialize)]
struct JsonLabel {
    record_id: String,
    label: serde_json::Value,
}

/// Reads a label file; `.jsonl`/`.ndjson`/`.json` are JSON lines, anything else CSV. Lines
/// that cannot be used go to `rejected`. Labels not among `classes` (when given) are rejected.
pub fn read_labels(path: &Path, classes: &[String], rejected: &mut Vec<String>) -> Result<Vec<Label>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        SluiceError::permanent(ReasonCode::SchemaMismatch, format!("{}: {e}", path.display()))
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(&e))?;
    let json = matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl" | "ndjson" | "json"));
    let mut raw: Vec<(u64, String, String)> = Vec::new();
    if json {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let n = i as u64 + 1;
            match serde_json::from_str::<JsonLabel>(line) {
                Ok(JsonLabel { record_id, label }) => {
                    let label = match label {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    raw.push((n, record_id, label));
                }
                Err(e) => rejected.push(format!("line {n}: {e}")),
            }
        }
    } else {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        for (i, row) in reader.records().enumerate() {
            let n = i as u64 + 1;
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    rejected.push(format!("line {n}: {e}"));
                    continue;
                }
            };
            if n == 1 && row.get(0).is_some_and(|c| c.eq_ignore_ascii_case("record_id")) {
                continue;
            }
            match (row.get(0), row.get(1), row.len()) {
                (Some(id), Some(label), 2) => raw.push((n, id.to_owned(), label.to_owned())),
                _ => rejected.push(format!("line {n}: expected two columns, record_id,label")),
            }
        }
    }
    let mut labels = Vec::with_capacity(raw.len());
    for (line, id, label) in raw {
        let record_id = match RecordId::parse(id) {
            Ok(id) => id,
            Err(e) => {
                rejected.push(format!("line {line}: {}", e.detail()));
                continue;
            }
        };
        if !classes.is_empty() && !classes.contains(&label) {
            rejected.push(format!("line {line}: {label:?} is not one of the model's classes"));
            continue;
        }
        labels.push(Label { line, record_id, label });
    }
    Ok(labels)
}

/// Records each label on its result.
pub async fn apply(
    results: &dyn ResultStore,
    labels: Vec<Label>,
    mut report: FeedbackReport,
) -> Result<FeedbackReport> {
    report.labels = labels.len() as u64;
    let mut outcomes = futures_util::stream::iter(labels)
        .map(|label| async move {
            let outcome = results.set_ground_truth(&label.record_id, &label.label).await;
            (label, outcome)
        })
        .buffered(CONCURRENCY);
    while let Some((label, outcome)) = outcomes.next().await {
        match outcome? {
            FeedbackOutcome::Recorded => report.recorded += 1,
            FeedbackOutcome::Unchanged => report.unchanged += 1,
            FeedbackOutcome::Missing => {
                report.unknown += 1;
                if report.unknown_ids.len() < LISTED_UNKNOWN {
                    report.unknown_ids.push(label.record_id.to_string());
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        (0..10).map(|d| d.to_string()).collect()
    }

    #[test]
    fn csv_with_or_without_a_header_and_bad_lines_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.csv");
        std::fs::write(&path, "record_id,label\na,1\nb , 2\nc\nd,12\n\"e\",3\n").unwrap();
        let mut rejected = Vec::new();
        let labels = read_labels(&path, &classes(), &mut rejected).unwrap();
        let got: Vec<(&str, &str)> = labels.iter().map(|l| (l.record_id.as_str(), l.label.as_str())).collect();
        assert_eq!(got, [("a", "1"), ("b", "2"), ("e", "3")]);
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected[1].contains("line 5") && rejected[1].contains("\"12\""), "{rejected:?}");

        std::fs::write(&path, "x,7\n").unwrap();
        assert_eq!(read_labels(&path, &classes(), &mut Vec::new()).unwrap()[0].label, "7");
    }

    #[test]
    fn json_lines_take_string_or_number_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.jsonl");
        std::fs::write(&path, "{\"record_id\":\"a\",\"label\":\"4\"}\n\n{\"record_id\":\"b\",\"label\":5}\nnot json\n")
            .unwrap();
        let mut rejected = Vec::new();
        let labels = read_labels(&path, &classes(), &mut rejected).unwrap();
        assert_eq!(labels.iter().map(|l| l.label.as_str()).collect::<Vec<_>>(), ["4", "5"]);
        assert_eq!(rejected.len(), 1);
        assert!(read_labels(&dir.path().join("missing.csv"), &[], &mut Vec::new()).is_err());
    }
}
