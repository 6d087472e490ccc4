//! `sluice feedback`: true labels joined to results by record id, from a CSV file (columns
//! `record_id,label`, header optional) or JSON lines (`{"record_id": …, "label": …}`, or an
//! array of them).
//! Unknown ids and bad lines are reported, never fatal; feeding the same file again changes
//! nothing.

use std::path::Path;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sluice_core::Result;
use sluice_core::backend::{FeedbackOutcome, ResultStore};
use sluice_core::envelope::RecordId;

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

/// How a label file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelFormat {
    /// `record_id,label` rows, header optional.
    Csv,
    /// One `{"record_id": …, "label": …}` object a line, or (as a `.json` file often is) an
    /// array of them.
    Json,
}

impl LabelFormat {
    /// `.jsonl`, `.ndjson` and `.json` files are JSON; anything else CSV.
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson" | "json") => Self::Json,
            _ => Self::Csv,
        }
    }
}

/// Reads the labels of a file's `text`. Lines (entries, in a JSON array) that cannot be used go
/// to `rejected`, in the file's order, with why; so do labels not among `classes` (when given).
pub fn parse_labels(text: &str, format: LabelFormat, classes: &[String], rejected: &mut Vec<String>) -> Vec<Label> {
    // Spreadsheet programs save CSV, and some editors JSON, with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Each line (entry) in the file's order: a label, or why not. `unit` is what `line` counts:
    // lines, or a JSON array's entries.
    let mut read: Vec<std::result::Result<Label, String>> = Vec::new();
    let take = |unit: &str, line: u64, id: String, label: String| match RecordId::parse(id) {
        Err(e) => Err(format!("{unit} {line}: {}", e.detail())),
        Ok(_) if !classes.is_empty() && !classes.contains(&label) => {
            Err(format!("{unit} {line}: {label:?} is not one of the model's classes"))
        }
        Ok(record_id) => Ok(Label { line, record_id, label }),
    };
    match format {
        LabelFormat::Json if text.trim_start().starts_with('[') => {
            match serde_json::from_str::<Vec<serde_json::Value>>(text) {
                Ok(entries) => {
                    for (i, entry) in entries.into_iter().enumerate() {
                        let n = i as u64 + 1;
                        match serde_json::from_value::<JsonLabel>(entry) {
                            Ok(JsonLabel { record_id, label }) => {
                                read.push(take("entry", n, record_id, label_text(label)))
                            }
                            Err(e) => read.push(Err(format!("entry {n}: {e}"))),
                        }
                    }
                }
                Err(e) => read.push(Err(format!("the file is not a JSON array of labels: {e}"))),
            }
        }
        LabelFormat::Json => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let n = i as u64 + 1;
                match serde_json::from_str::<JsonLabel>(line) {
                    Ok(JsonLabel { record_id, label }) => read.push(take("line", n, record_id, label_text(label))),
                    Err(e) => read.push(Err(format!("line {n}: {e}"))),
                }
            }
        }
        LabelFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .trim(csv::Trim::All)
                .from_reader(text.as_bytes());
            for (i, row) in reader.records().enumerate() {
                let row = match row {
                    Ok(row) => row,
                    Err(e) => {
                        let n = e.position().map_or(i as u64 + 1, csv::Position::line);
                        read.push(Err(format!("line {n}: {e}")));
                        continue;
                    }
                };
                // The file's line (blank lines are passed over, not counted as rows).
                let n = row.position().map_or(i as u64 + 1, csv::Position::line);
                if i == 0 && row.get(0).is_some_and(|c| c.eq_ignore_ascii_case("record_id")) {
                    continue;
                }
                match (row.get(0), row.get(1), row.len()) {
                    (Some(id), Some(label), 2) => read.push(take("line", n, id.to_owned(), label.to_owned())),
                    _ => read.push(Err(format!("line {n}: expected two columns, record_id,label"))),
                }
            }
        }
    }
    let mut labels = Vec::with_capacity(read.len());
    for entry in read {
        match entry {
            Ok(label) => labels.push(label),
            Err(why) => rejected.push(why),
        }
    }
    // A record labelled twice in one file (a correction appended) gets its last label: the labels
    // are written many at a time, in no set order, so both could not go.
    let mut seen = std::collections::HashSet::with_capacity(labels.len());
    let mut labels: Vec<Label> = labels.into_iter().rev().filter(|l| seen.insert(l.record_id.clone())).collect();
    labels.reverse();
    labels
}

/// A label as text: a JSON string as it is, a number (`5`) as written.
fn label_text(label: serde_json::Value) -> String {
    match label {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
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

    fn parse(text: &str, format: LabelFormat) -> (Vec<(String, String)>, Vec<String>) {
        let mut rejected = Vec::new();
        let labels = parse_labels(text, format, &classes(), &mut rejected);
        (labels.into_iter().map(|l| (l.record_id.to_string(), l.label)).collect(), rejected)
    }

    fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(id, label)| (id.to_string(), label.to_string())).collect()
    }

    #[test]
    fn a_record_labelled_twice_gets_its_last_label_and_lines_count_blank_ones() {
        let (labels, rejected) = parse("a,3\n\nb,1\na,8\nc\n", LabelFormat::Csv);
        assert_eq!(labels, pairs(&[("b", "1"), ("a", "8")]));
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].starts_with("line 5:"), "{rejected:?}");
    }

    #[test]
    fn csv_with_or_without_a_header_and_bad_lines_reported_in_order() {
        let (labels, rejected) = parse("record_id,label\na,1\nb , 2\nd,12\nc\n\"e\",3\n", LabelFormat::Csv);
        assert_eq!(labels, pairs(&[("a", "1"), ("b", "2"), ("e", "3")]));
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected[0].starts_with("line 4") && rejected[1].starts_with("line 5"), "{rejected:?}");
        assert!(rejected[0].contains("\"12\"") && rejected[1].contains("two columns"), "{rejected:?}");

        assert_eq!(parse("x,7\n", LabelFormat::Csv).0, pairs(&[("x", "7")]));
        // Saved by a spreadsheet, with a byte-order mark: the header is still a header.
        assert_eq!(parse("\u{feff}record_id,label\nx,7\n", LabelFormat::Csv), (pairs(&[("x", "7")]), vec![]));
    }

    #[test]
    fn json_lines_or_an_array_take_string_or_number_labels() {
        let text = "{\"record_id\":\"a\",\"label\":\"4\"}\n\n{\"record_id\":\"b\",\"label\":5}\nnot json\n";
        let (labels, rejected) = parse(text, LabelFormat::Json);
        assert_eq!(labels, pairs(&[("a", "4"), ("b", "5")]));
        assert!(rejected.len() == 1 && rejected[0].starts_with("line 4"), "{rejected:?}");
        assert_eq!(parse(&format!("\u{feff}{text}"), LabelFormat::Json).0, pairs(&[("a", "4"), ("b", "5")]));

        let array = "[{\"record_id\":\"a\",\"label\":4}, {\"id\":\"b\"}, {\"record_id\":\"c\",\"label\":\"x\"}]";
        let (labels, rejected) = parse(array, LabelFormat::Json);
        assert_eq!(labels, pairs(&[("a", "4")]));
        assert!(rejected[0].starts_with("entry 2") && rejected[1].starts_with("entry 3"), "{rejected:?}");
        let (labels, rejected) = parse("[{\"record_id\":\"a\"", LabelFormat::Json);
        assert!(labels.is_empty() && rejected[0].starts_with("the file is not a JSON array"), "{rejected:?}");
    }

    #[test]
    fn the_format_follows_the_extension() {
        assert_eq!(LabelFormat::of(Path::new("l.json")), LabelFormat::Json);
        assert_eq!(LabelFormat::of(Path::new("l.ndjson")), LabelFormat::Json);
        assert_eq!(LabelFormat::of(Path::new("l.txt")), LabelFormat::Csv);
    }
}
