//! The captured predictions of a time window, one per record, each with its true label when
//! one is known.

use std::collections::BTreeMap;

use sluice_core::Result;
use sluice_core::backend::Backend;
use sluice_core::capture::{CaptureRecord, id_hash, parse_lines, rate_through};
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

/// The predictions captured in `since_ms..=until_ms`, oldest first: all of them, or a sample of
/// them where there were more than a pass keeps (see [`Window::read`]).
#[derive(Debug, Clone)]
pub struct Window {
    pub since_ms: u64,
    pub until_ms: u64,
    pub observations: Vec<Observation>,
    /// Capture lines that did not parse (cut short by a crash, or of a later schema).
    pub skipped_lines: u64,
    /// The share of records the window's observations are, by record id as
    /// [`sluice_core::capture::sampled`] takes them: 1 where it kept every record captured.
    pub sample_rate: f64,
}

impl Default for Window {
    fn default() -> Self {
        Self { since_ms: 0, until_ms: 0, observations: Vec::new(), skipped_lines: 0, sample_rate: 1.0 }
    }
}

/// Results looked up per request when joining true labels.
const JOIN_BATCH: usize = 100;

impl Window {
    /// Reads the window from the capture log, a chunk at a time, and joins each record's true
    /// label from the result store. A record captured twice (redelivered) counts once.
    ///
    /// At most `most` records are kept (`monitor.max_records`): past that, those whose id hashes
    /// lowest, a uniform sample the results stage's capture sampling would take at a lower rate
    /// ([`Self::sample_rate`]), the same whichever pass reads the window. So a week of a busy
    /// pipeline fits the monitor's memory, and accuracy and drift are judged on the sample. The
    /// class probabilities, which no check reads, are not kept (a thousand for ImageNet).
    pub async fn read(backend: &Backend, since_ms: u64, until_ms: u64, most: usize) -> Result<Self> {
        let most = most.max(1);
        let mut skipped_lines = 0;
        // By the id's hash: the `most` lowest stay. Once one has gone, every record whose hash is
        // that one's or higher goes (`cut`): what stays is exactly the records under it.
        let mut kept: BTreeMap<(u32, RecordId), CaptureRecord> = BTreeMap::new();
        let mut cut: Option<u32> = None;
        for name in backend.capture.chunks(since_ms, until_ms).await? {
            let Some(chunk) = backend.capture.chunk(&name).await? else { continue };
            for mut record in parse_lines(&chunk, &mut skipped_lines) {
                if !(since_ms..=until_ms).contains(&record.captured_ms) {
                    continue;
                }
                let hash = id_hash(&record.record_id);
                if cut.is_some_and(|cut| hash >= cut) {
                    continue;
                }
                record.probabilities = Vec::new();
                let key = (hash, record.record_id.clone());
                if let Some(held) = kept.get_mut(&key) {
                    // The first capture of a record stands for it.
                    if record.captured_ms < held.captured_ms {
                        *held = record;
                    }
                    continue;
                }
                kept.insert(key, record);
                if kept.len() > most
                    && let Some(((highest, _), _)) = kept.pop_last()
                {
                    while kept.last_key_value().is_some_and(|((hash, _), _)| *hash == highest) {
                        kept.pop_last();
                    }
                    cut = Some(highest);
                }
            }
        }
        let sample_rate = match cut {
            None => 1.0,
            Some(0) => 0.0,
            Some(cut) => rate_through(cut - 1),
        };
        let mut captured: Vec<CaptureRecord> = kept.into_values().collect();
        captured.sort_by(|a, b| a.captured_ms.cmp(&b.captured_ms).then_with(|| a.record_id.cmp(&b.record_id)));

        let mut observations = Vec::with_capacity(captured.len());
        let mut captured = captured.into_iter().peekable();
        while captured.peek().is_some() {
            let chunk: Vec<CaptureRecord> = captured.by_ref().take(JOIN_BATCH).collect();
            let ids: Vec<RecordId> = chunk.iter().map(|r| r.record_id.clone()).collect();
            let results = backend.results.get_batch(&ids).await?;
            observations.extend(chunk.into_iter().map(|capture| {
                // A reviewer's rejection leaves a marker, no result: the record is not scored.
                let result = results.get(&capture.record_id).filter(|r| r.status != ResultStatus::Rejected);
                let truth = result.and_then(|r| r.ground_truth.clone().or_else(|| r.reviewed_label.clone()));
                Observation { capture, truth, status_now: result.map(|r| r.status) }
            }));
        }
        Ok(Self { since_ms, until_ms, observations, skipped_lines, sample_rate })
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
