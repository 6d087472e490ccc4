//! The captured predictions of a time window, one per record, each with its true label when
//! one is known.

use std::collections::HashSet;

use sluice_core::Result;
use sluice_core::backend::Backend;
use sluice_core::capture::{CaptureRecord, parse_lines};
use sluice_core::envelope::RecordId;
use sluice_core::record::ResultStatus;

/// One captured prediction and what it really was.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub capture: CaptureRecord,
    /// The label fed back (`sluice feedback`, or the producer's attribute) or, failing that,
    /// the one a reviewer gave.
    pub truth: Option<String>,
    /// The result's status now: a prediction sent to review may have been reviewed since
    /// (`None` where no result stands, as after a rejection).
    pub status_now: Option<ResultStatus>,
}

impl Observation {
    pub fn correct(&self) -> Option<bool> {
        self.truth.as_ref().map(|truth| *truth == self.capture.label)
    }
}

/// The predictions captured in `since_ms..=until_ms`, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub since_ms: u64,
    pub until_ms: u64,
    pub observations: Vec<Observation>,
    /// Capture lines that did not parse (cut short by a crash, or of a later schema).
    pub skipped_lines: u64,
}

/// Results looked up per request when joining true labels.
const JOIN_BATCH: usize = 100;

impl Window {
    /// Reads the window from the capture log and joins each record's true label from the
    /// result store. A record captured twice (redelivered) counts once.
    pub async fn read(backend: &Backend, since_ms: u64, until_ms: u64) -> Result<Self> {
        let mut skipped_lines = 0;
        let mut captured: Vec<CaptureRecord> = Vec::new();
        for chunk in backend.capture.read(since_ms, until_ms).await? {
            captured.extend(
                parse_lines(&chunk, &mut skipped_lines)
                    .into_iter()
                    .filter(|r| (since_ms..=until_ms).contains(&r.captured_ms)),
            );
        }
        captured.sort_by(|a, b| a.captured_ms.cmp(&b.captured_ms).then_with(|| a.record_id.cmp(&b.record_id)));
        let mut seen: HashSet<RecordId> = HashSet::with_capacity(captured.len());
        captured.retain(|r| seen.insert(r.record_id.clone()));

        let mut observations = Vec::with_capacity(captured.len());
        for chunk in captured.chunks(JOIN_BATCH) {
            let ids: Vec<RecordId> = chunk.iter().map(|r| r.record_id.clone()).collect();
            let results = backend.results.get_batch(&ids).await?;
            observations.extend(chunk.iter().map(|capture| {
                // A reviewer's rejection leaves a marker, no result: the record is not scored.
                let result = results.get(&capture.record_id).filter(|r| r.status != ResultStatus::Rejected);
                let truth = result.and_then(|r| r.ground_truth.clone().or_else(|| r.reviewed_label.clone()));
                Observation { capture: capture.clone(), truth, status_now: result.map(|r| r.status) }
            }));
        }
        Ok(Self { since_ms, until_ms, observations, skipped_lines })
    }

    pub fn captures(&self) -> impl Iterator<Item = &CaptureRecord> {
        self.observations.iter().map(|o| &o.capture)
    }

    /// Predictions the results stage sent to review, and how many of them wait for a person still.
    pub fn review(&self) -> (u64, u64) {
        let sent = self.observations.iter().filter(|o| o.capture.status == ResultStatus::Review);
        sent.fold((0, 0), |(sent, waiting), o| {
            (sent + 1, waiting + u64::from(o.status_now == Some(ResultStatus::Review)))
        })
    }
}
