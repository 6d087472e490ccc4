//! The capture writer: every stored prediction (or a sample of them) appended to the backend's
//! capture log, a chunk at a time: lines gather across batches and go out when the chunk is
//! big enough or old enough, never one request per record.
//!
//! Capture is for watching the model, not part of a record's delivery: a chunk that cannot be
//! written is kept and tried again with the next one (up to a bound, then dropped and counted),
//! and never holds a record back. A worker killed without SIGTERM loses what it had gathered
//! (at most `flush_after_ms` of lines); SIGTERM writes it out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_core::backend::{CaptureLog, FeatureStore};
use sluice_core::capture::{CaptureRecord, sampled};
use sluice_core::envelope::{ContentType, RecordId, now_ms};
use sluice_core::record::PredictionResult;
use sluice_core::telemetry::metrics::metrics;
use tokio::sync::Mutex;

/// `[results.capture]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    pub enabled: bool,
    /// The share of records captured (0 to 1), chosen by record id.
    pub sample_rate: f64,
    /// A chunk is written once it holds this many bytes…
    pub flush_bytes: usize,
    /// …or once its first line is this old.
    pub flush_after_ms: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self { enabled: true, sample_rate: 1.0, flush_bytes: 1 << 20, flush_after_ms: 5_000 }
    }
}

/// What a stored result is captured with.
pub(crate) struct Captured<'a> {
    pub(crate) result: &'a PredictionResult,
    pub(crate) content_type: ContentType,
}

pub(crate) struct CaptureWriter {
    log: Arc<dyn CaptureLog>,
    features: Arc<dyn FeatureStore>,
    config: CaptureConfig,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    records: u64,
    since: Option<Instant>,
}

/// Chunks that failed are kept up to this many times the flush size; past it the oldest lines
/// are dropped (and counted) rather than holding the worker's memory hostage to an outage.
const PENDING_LIMIT_FLUSHES: usize = 8;

impl CaptureWriter {
    pub(crate) fn new(log: Arc<dyn CaptureLog>, features: Arc<dyn FeatureStore>, config: CaptureConfig) -> Self {
        Self { log, features, config, pending: Mutex::default() }
    }

    pub(crate) fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.config.flush_after_ms.max(1))
    }

    /// Adds the sampled ones of a batch's stored results, and writes the chunk if it is due.
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
            lines.extend(CaptureRecord::new(c.result, c.content_type.as_str(), features).to_line());
        }
        {
            let mut pending = self.pending.lock().await;
            pending.lines.extend(lines);
            pending.records += kept.len() as u64;
            pending.since.get_or_insert_with(Instant::now);
        }
        self.flush(false).await;
    }

    /// The feature vectors of the tabular records among `kept`: what input drift is measured on.
    async fn tabular_vectors(&self, kept: &[&Captured<'_>]) -> Option<std::collections::HashMap<RecordId, Vec<f32>>> {
        let ids: Vec<RecordId> =
            kept.iter().filter(|c| c.content_type == ContentType::Json).map(|c| c.result.record_id.clone()).collect();
        if ids.is_empty() {
            return None;
        }
        match self.features.get_batch(&ids).await {
            Ok(vectors) => Some(vectors),
            Err(error) => {
                tracing::warn!(%error, "capture: feature vectors unreadable; captured without them");
                None
            }
        }
    }

    /// Writes what has gathered if it is due (big or old enough), or whatever there is when
    /// `all` (shutting down).
    pub(crate) async fn flush(&self, all: bool) {
        let mut pending = self.pending.lock().await;
        let due = pending.lines.len() >= self.config.flush_bytes
            || pending.since.is_some_and(|since| since.elapsed() >= Duration::from_millis(self.config.flush_after_ms));
        if pending.lines.is_empty() || !(all || due) {
            return;
        }
        match self.log.append(pending.lines.clone(), now_ms()).await {
            Ok(()) => {
                metrics().captured(pending.records, 0);
                *pending = Pending::default();
            }
            Err(error) => {
                tracing::warn!(%error, records = pending.records, location = %self.log.location(), "capture: chunk not written; kept for the next");
                let limit = self.config.flush_bytes.saturating_mul(PENDING_LIMIT_FLUSHES);
                if pending.lines.len() > limit {
                    let dropped = pending.records;
                    metrics().captured(0, dropped);
                    tracing::error!(dropped, "capture: too much unwritten; dropped");
                    *pending = Pending::default();
                }
            }
        }
    }
}
