//! The capture writer: every stored prediction (or a sample of them) appended to the backend's
//! capture log, a chunk at a time: lines gather across batches and go out when the chunk is
//! big enough or old enough, never one request per record.
//!
//! Capture is for watching the model, not part of a record's delivery: a batch only adds its
//! lines; the stage's flusher task writes them out (when told a chunk is due, or a flush interval
//! on), so no batch waits on the log, even one that hangs. A chunk that cannot be written is kept
//! and tried again a flush interval later (up to a bound, then the oldest lines are dropped and
//! counted). A worker killed without SIGTERM loses what it had gathered (at most
//! `flush_after_ms` of lines); SIGTERM writes it out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_core::backend::{CaptureLog, FeatureStore};
use sluice_core::capture::{CaptureRecord, sampled};
use sluice_core::envelope::{ContentType, RecordId, now_ms};
use sluice_core::record::PredictionResult;
use sluice_core::telemetry::metrics::metrics;
use sluice_core::vector::FeatureVector;
use tokio::sync::Mutex;

/// `[results.capture]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    pub enabled: bool,
    /// The share of records captured (0 to 1), chosen by record id.
    #[serde(deserialize_with = "a_share")]
    pub sample_rate: f64,
    /// A chunk is written once it holds this many bytes…
    pub flush_bytes: usize,
    /// …or once its first line is this old.
    pub flush_after_ms: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self { enabled: true, sample_rate: 1.0, flush_bytes: 1 << 20, flush_after_ms: 30_000 }
    }
}

/// A share from 0 to 1: anything else (a negative rate, `nan`) would capture nothing without a
/// word, and the monitor would judge nothing for want of captures.
fn a_share<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let share = sluice_core::config::decimal(deserializer)?;
    if !(0.0..=1.0).contains(&share) {
        return Err(serde::de::Error::custom(format!("{share}: a share of the records, from 0 to 1")));
    }
    Ok(share)
}

/// What a stored result is captured with.
pub(crate) struct Captured<'a> {
    pub(crate) result: &'a PredictionResult,
    pub(crate) content_type: ContentType,
    /// The producer's attributes of the record.
    pub(crate) attributes: &'a BTreeMap<String, String>,
}

pub(crate) struct CaptureWriter {
    log: Arc<dyn CaptureLog>,
    features: Arc<dyn FeatureStore>,
    config: CaptureConfig,
    pending: Mutex<Pending>,
    /// Held while a chunk is written: a flush at stop waits for one in flight (which may fail and
    /// put its lines back), rather than find nothing pending and let the process exit under it.
    writing: Mutex<()>,
    /// Told when a batch has made a chunk due: the flusher writes it.
    due: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    records: u64,
    since: Option<Instant>,
    /// After a chunk could not be written, the next try waits until then.
    retry_at: Option<Instant>,
}

/// Lines kept through a failing log are bounded to this many times the flush size; past it the
/// oldest are dropped (and counted) rather than holding the worker's memory hostage to an outage.
const PENDING_LIMIT_FLUSHES: usize = 8;

impl CaptureWriter {
    pub(crate) fn new(log: Arc<dyn CaptureLog>, features: Arc<dyn FeatureStore>, config: CaptureConfig) -> Self {
        Self { log, features, config, pending: Mutex::default(), writing: Mutex::default(), due: Arc::default() }
    }

    /// What the flusher waits on besides its interval (see [`Self::capture`]).
    pub(crate) fn due(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.due)
    }

    pub(crate) fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.config.flush_after_ms.max(1))
    }

    /// Adds the sampled ones of a batch's stored results, and tells the flusher if that makes a
    /// chunk due: the batch does not wait for the write.
    pub(crate) async fn capture(&self, stored: &[Captured<'_>]) {
        let kept: Vec<&Captured<'_>> =
            stored.iter().filter(|c| sampled(&c.result.record_id, self.config.sample_rate)).collect();
        if kept.is_empty() {
            return;
        }
        let vectors = self.tabular_vectors(&kept).await;
        let mut lines = Vec::new();
        for c in &kept {
            let features = vectors.as_ref().and_then(|v| v.get(&c.result.record_id).cloned());
            let record = CaptureRecord::new(c.result, c.content_type.as_str(), features, c.attributes.clone());
            lines.extend(record.to_line());
        }
        {
            let mut pending = self.pending.lock().await;
            pending.lines.extend(lines);
            pending.records += kept.len() as u64;
            pending.since.get_or_insert_with(Instant::now);
            // Bounded while a chunk is written or the log backs off, as after a failure.
            pending.trim(self.pending_limit());
            if self.is_due(&pending, Instant::now()) {
                self.due.notify_one();
            }
        }
    }

    /// Whether what has gathered is to be written now: big or old enough, and not backing off
    /// after a failure.
    fn is_due(&self, pending: &Pending, now: Instant) -> bool {
        let due = pending.lines.len() >= self.config.flush_bytes
            || pending.since.is_some_and(|since| now >= since + Duration::from_millis(self.config.flush_after_ms));
        let backing_off = pending.retry_at.is_some_and(|at| now < at);
        !pending.lines.is_empty() && due && !backing_off
    }

    /// The feature vectors of the tabular records among `kept`: what input drift is measured on.
    async fn tabular_vectors(&self, kept: &[&Captured<'_>]) -> Option<std::collections::HashMap<RecordId, Vec<f32>>> {
        let ids: Vec<RecordId> =
            kept.iter().filter(|c| c.content_type == ContentType::Json).map(|c| c.result.record_id.clone()).collect();
        if ids.is_empty() {
            return None;
        }
        match self.features.get_batch(&ids).await {
            // Tabular vectors are values; anything else (unreadable) is captured without one.
            Ok(vectors) => Some(
                vectors
                    .into_iter()
                    .filter_map(|(id, v)| match v {
                        Ok(FeatureVector::Values(values)) => Some((id, values)),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(error) => {
                tracing::warn!(%error, "capture: feature vectors unreadable; captured without them");
                None
            }
        }
    }

    /// Writes what has gathered if it is due (big or old enough, and not backing off after a
    /// failure), or whatever there is when `all` (stopping). The lines' lock is not held while
    /// the chunk is written: batches go on gathering lines meanwhile. One chunk is written at a
    /// time; a flush that is not the last leaves it to one already writing.
    pub(crate) async fn flush(&self, all: bool) {
        let _writing = match self.writing.try_lock() {
            Ok(guard) => guard,
            Err(_) if all => self.writing.lock().await,
            Err(_) => return,
        };
        let (lines, records) = {
            let mut pending = self.pending.lock().await;
            if pending.lines.is_empty() || !(all || self.is_due(&pending, Instant::now())) {
                return;
            }
            let taken = std::mem::take(&mut *pending);
            (taken.lines, taken.records)
        };
        let error = match self.log.append(lines.clone(), now_ms()).await {
            Ok(()) => {
                metrics().captured(records, 0);
                return;
            }
            Err(error) => error,
        };
        if all {
            metrics().captured(0, records);
            tracing::error!(%error, records, location = %self.log.location(), "capture: last chunk not written at stop; dropped");
            return;
        }
        tracing::warn!(%error, records, location = %self.log.location(), "capture: chunk not written; kept for the next try");
        // Back in front of what gathered meanwhile, oldest first.
        let mut pending = self.pending.lock().await;
        let mut kept = lines;
        kept.append(&mut pending.lines);
        pending.lines = kept;
        pending.records += records;
        pending.since = Some(Instant::now());
        pending.retry_at = Some(Instant::now() + self.flush_interval());
        pending.trim(self.pending_limit());
    }

    /// The most bytes of lines kept unwritten.
    fn pending_limit(&self) -> usize {
        self.config.flush_bytes.saturating_mul(PENDING_LIMIT_FLUSHES)
    }
}

impl Pending {
    /// Drops the oldest whole lines past `limit` bytes, and counts them dropped.
    fn trim(&mut self, limit: usize) {
        if self.lines.len() <= limit {
            return;
        }
        let cut = self.lines.len() - limit;
        // Whole lines only: cut after the newline at or past `cut`.
        let end = self.lines[cut..].iter().position(|&b| b == b'\n').map_or(self.lines.len(), |i| cut + i + 1);
        let dropped = self.lines[..end].iter().filter(|&&b| b == b'\n').count() as u64;
        self.lines.drain(..end);
        self.records = self.records.saturating_sub(dropped);
        metrics().captured(0, dropped);
        tracing::error!(dropped, "capture: too much unwritten; the oldest lines dropped");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use sluice_core::backend::FeatureStore;
    use sluice_core::record::ResultStatus;
    use sluice_core::{ReasonCode, SluiceError};

    use super::*;

    /// A log that refuses its first `failures` chunks, each after `slow`.
    #[derive(Default)]
    struct FlakyLog {
        failures: AtomicUsize,
        slow: Duration,
        written: StdMutex<Vec<Vec<u8>>>,
    }

    #[async_trait]
    impl CaptureLog for FlakyLog {
        async fn append(&self, lines: Vec<u8>, _at_ms: u64) -> sluice_core::Result<()> {
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(self.slow).await;
                return Err(SluiceError::retryable(ReasonCode::StoreUnavailable, "down"));
            }
            self.written.lock().unwrap().push(lines);
            Ok(())
        }
        async fn chunks(&self, _: u64, _: u64) -> sluice_core::Result<Vec<String>> {
            Ok(Vec::new())
        }
        async fn chunk(&self, _: &str) -> sluice_core::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        async fn get_meta(&self, _: &str) -> sluice_core::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        async fn put_meta(&self, _: &str, _: Vec<u8>) -> sluice_core::Result<()> {
            Ok(())
        }
        fn location(&self) -> String {
            "flaky".into()
        }
    }

    struct NoFeatures;

    #[async_trait]
    impl FeatureStore for NoFeatures {
        async fn put_if_absent(&self, _: Vec<(RecordId, FeatureVector)>) -> sluice_core::Result<()> {
            Ok(())
        }
        async fn get_batch(
            &self,
            _: &[RecordId],
        ) -> sluice_core::Result<std::collections::HashMap<RecordId, sluice_core::backend::StoredVector>> {
            Ok(Default::default())
        }
        async fn refresh(&self, _: &[RecordId]) -> sluice_core::Result<()> {
            Ok(())
        }
    }

    fn result(id: &str) -> PredictionResult {
        sluice_core::testing::prediction_result(id, "1", ResultStatus::Accepted)
    }

    async fn capture(writer: &CaptureWriter, id: &str) {
        let r = result(id);
        writer.capture(&[Captured { result: &r, content_type: ContentType::Png, attributes: &BTreeMap::new() }]).await;
    }

    /// A batch's capture, then the flusher's turn.
    async fn capture_then_flush(writer: &CaptureWriter, id: &str) {
        capture(writer, id).await;
        writer.flush(false).await;
    }

    /// A batch adds its lines and tells the flusher: it never waits on the log, even one that
    /// hangs.
    #[tokio::test]
    async fn a_batch_does_not_wait_on_the_log() {
        let log =
            Arc::new(FlakyLog { failures: AtomicUsize::new(1), slow: Duration::from_secs(60), ..Default::default() });
        let config = CaptureConfig { flush_after_ms: 0, ..CaptureConfig::default() };
        let writer = CaptureWriter::new(log.clone(), Arc::new(NoFeatures), config);
        tokio::time::timeout(Duration::from_secs(5), capture(&writer, "a")).await.expect("the batch went on");
        tokio::time::timeout(Duration::from_secs(5), writer.due().notified()).await.expect("the flusher was told");
        assert_eq!(ids(&writer.pending.lock().await.lines.clone()), ["a"]);
    }

    fn ids(chunk: &[u8]) -> Vec<String> {
        let mut skipped = 0;
        sluice_core::capture::parse_lines(chunk, &mut skipped).into_iter().map(|r| r.record_id.to_string()).collect()
    }

    #[tokio::test]
    async fn a_failed_chunk_is_kept_in_order_and_not_retried_at_every_batch() {
        let log = Arc::new(FlakyLog { failures: AtomicUsize::new(1), ..Default::default() });
        let config = CaptureConfig { flush_after_ms: 0, ..CaptureConfig::default() };
        let writer = CaptureWriter::new(log.clone(), Arc::new(NoFeatures), config);
        capture_then_flush(&writer, "a").await; // refused: kept, backing off a flush interval (1 ms)
        capture_then_flush(&writer, "b").await; // within the back-off: gathered, not written
        assert!(log.written.lock().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(5)).await;
        capture_then_flush(&writer, "c").await;
        let written = log.written.lock().unwrap().concat();
        assert_eq!(ids(&written), ["a", "b", "c"], "the oldest first, none lost");
    }

    /// SIGTERM's flush while a chunk is being written waits for it: that chunk, failed, is
    /// written by the last flush instead of being put back after it (and lost with the process).
    #[tokio::test]
    async fn the_last_flush_waits_for_a_chunk_in_flight() {
        let slow = Duration::from_millis(200);
        let log = Arc::new(FlakyLog { failures: AtomicUsize::new(1), slow, ..Default::default() });
        let config = CaptureConfig { flush_after_ms: 0, ..CaptureConfig::default() };
        let writer = Arc::new(CaptureWriter::new(log.clone(), Arc::new(NoFeatures), config));
        let batch = tokio::spawn({
            let writer = writer.clone();
            async move { capture_then_flush(&writer, "a").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.flush(true).await;
        assert_eq!(ids(&log.written.lock().unwrap().concat()), ["a"]);
        batch.await.unwrap();
    }

    /// While a chunk is being written (a PUT that hangs), the lines batches go on capturing are
    /// bounded too, not only once the write has failed.
    #[tokio::test]
    async fn lines_gathered_while_a_chunk_is_written_are_bounded() {
        let log =
            Arc::new(FlakyLog { failures: AtomicUsize::new(1), slow: Duration::from_secs(60), ..Default::default() });
        let line = CaptureRecord::new(&result("x0"), "image/png", None, BTreeMap::new()).to_line().len();
        let config = CaptureConfig {
            flush_after_ms: 0,
            flush_bytes: line * 3 / PENDING_LIMIT_FLUSHES + 1,
            ..CaptureConfig::default()
        };
        let writer = Arc::new(CaptureWriter::new(log.clone(), Arc::new(NoFeatures), config));
        let hanging = tokio::spawn({
            let writer = writer.clone();
            async move { capture_then_flush(&writer, "first").await }
        });
        while writer.writing.try_lock().is_ok() {
            tokio::task::yield_now().await;
        }
        for i in 0..20 {
            capture(&writer, &format!("x{i}")).await;
        }
        let kept = ids(&writer.pending.lock().await.lines.clone());
        assert!(kept.len() <= 4 && kept.last().map(String::as_str) == Some("x19"), "the newest are kept: {kept:?}");
        hanging.abort();
    }

    #[tokio::test]
    async fn past_the_bound_the_oldest_lines_go_and_a_failed_last_chunk_is_counted() {
        let log = Arc::new(FlakyLog { failures: AtomicUsize::new(usize::MAX / 2), ..Default::default() });
        let line = CaptureRecord::new(&result("x0"), "image/png", None, BTreeMap::new()).to_line().len();
        // Room for about three lines through the outage.
        let config = CaptureConfig {
            flush_after_ms: 0,
            flush_bytes: line * 3 / PENDING_LIMIT_FLUSHES + 1,
            ..CaptureConfig::default()
        };
        let writer = CaptureWriter::new(log.clone(), Arc::new(NoFeatures), config);
        for i in 0..10 {
            capture_then_flush(&writer, &format!("x{i}")).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let kept = writer.pending.lock().await.lines.clone();
        let kept = ids(&kept);
        assert!(kept.len() <= 4 && kept.last().map(String::as_str) == Some("x9"), "the newest are kept: {kept:?}");
        log.failures.store(0, Ordering::SeqCst);
        writer.flush(true).await;
        assert_eq!(ids(&log.written.lock().unwrap().concat()), kept);
    }
}
