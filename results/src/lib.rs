//! The results stage: applies the bundle's per-class confidence thresholds, writes each result
//! once (put-if-absent by record id), sends low-confidence ones to the review queue, and
//! captures every prediction for the monitor ([`capture`]).

mod capture;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_core::backend::{Backend, OutgoingMessage, PutOutcome, ResultStore};
use sluice_core::config::Settings;
use sluice_core::envelope::{ContentType, Envelope, RecordId, now_ms};
use sluice_core::model::{ModelBundle, ModelManifest};
use sluice_core::record::{InferredRecord, PredictionResult, ResultStatus, dlq_attr};
use sluice_core::service::BuildError;
use sluice_core::telemetry::metrics::metrics;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{BatchPolicy, Delivery, Outcome, Stage};
use sluice_core::{ReasonCode, Result, SluiceError};

pub use crate::capture::CaptureConfig;
use crate::capture::{CaptureWriter, Captured};

/// `[results]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResultsConfig {
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first record is in: fuller batches mean
    /// fewer store and queue requests per record.
    pub max_wait_ms: u64,
    /// The envelope attribute that carries a record's true label, when a producer knows it.
    pub ground_truth_attribute: String,
    /// `[results.capture]`: the prediction capture log.
    pub capture: CaptureConfig,
}

impl Default for ResultsConfig {
    fn default() -> Self {
        Self {
            batch_size: 200,
            max_wait_ms: 20,
            ground_truth_attribute: "label".to_owned(),
            capture: CaptureConfig::default(),
        }
    }
}

pub struct ResultsStage {
    config: ResultsConfig,
    manifest: ModelManifest,
    store: Arc<dyn ResultStore>,
    capture: Option<Arc<CaptureWriter>>,
    /// Writes gathered capture lines out when a batch says a chunk is due, or a flush interval on:
    /// the batches themselves never wait for the log.
    flusher: std::sync::Once,
}

impl ResultsStage {
    pub fn build(settings: &Settings, backend: &Backend) -> Result<Self, BuildError> {
        let bundle = ModelBundle::load(settings.model()?.dir)?;
        let config: ResultsConfig = settings.section("results")?;
        let capture = config.capture.enabled.then(|| {
            Arc::new(CaptureWriter::new(
                Arc::clone(&backend.capture),
                Arc::clone(&backend.features),
                config.capture.clone(),
            ))
        });
        Ok(Self {
            config,
            manifest: bundle.manifest,
            store: Arc::clone(&backend.results),
            capture,
            flusher: std::sync::Once::new(),
        })
    }

    /// The result a prediction becomes under this bundle's labels and thresholds.
    fn judge(&self, record: InferredRecord) -> Result<PredictionResult> {
        let InferredRecord { mut envelope, prediction } = record;
        let labels = &self.manifest.labels;
        if prediction.probabilities.len() != labels.len() {
            return Err(SluiceError::permanent(
                ReasonCode::InvalidModelOutput,
                format!("{} probabilities for {} labels", prediction.probabilities.len(), labels.len()),
            ));
        }
        // A little slack for rounding in the model's softmax.
        if let Some(p) = prediction.probabilities.iter().find(|p| !(-1e-4..=1.0 + 1e-4).contains(*p)) {
            return Err(SluiceError::permanent(
                ReasonCode::InvalidModelOutput,
                format!("a probability of {p} is not between 0 and 1"),
            ));
        }
        let (best, &confidence) = prediction
            .probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("labels are not empty");
        let label = labels[best].clone();
        let status =
            if confidence >= self.manifest.threshold(&label) { ResultStatus::Accepted } else { ResultStatus::Review };
        envelope.timestamps.stored_ms = Some(now_ms());
        let ground_truth = self.ground_truth(&envelope);
        Ok(PredictionResult {
            record_id: envelope.record_id,
            label,
            confidence,
            probabilities: prediction.probabilities,
            model: prediction.model,
            model_version: prediction.model_version,
            backend: prediction.backend,
            status,
            ground_truth,
            reviewed_label: None,
            reviewed_ms: None,
            timestamps: envelope.timestamps,
            attributes: envelope.attributes,
            unknown: serde_json::Map::new(),
        })
    }

    /// The true label the producer sent with the record (`results.ground_truth_attribute`): one
    /// of the model's classes, else none (as `sluice feedback` refuses it), so that a label from
    /// another scheme does not count against the model's accuracy.
    fn ground_truth(&self, envelope: &Envelope) -> Option<String> {
        let label = envelope.attributes.get(&self.config.ground_truth_attribute)?;
        if self.manifest.labels.contains(label) {
            return Some(label.clone());
        }
        tracing::debug!(record_id = %envelope.record_id, label, "a ground-truth label that is none of the model's classes");
        None
    }

    /// Where a stored result goes next: nowhere, or to the review queue.
    fn route(&self, stored: &PredictionResult) -> Outcome {
        if stored.status != ResultStatus::Review {
            return Outcome::Forward(Vec::new());
        }
        let threshold = self.manifest.threshold(&stored.label);
        let attributes = BTreeMap::from([
            (dlq_attr::REASON.to_owned(), ReasonCode::BelowThreshold.as_str().to_owned()),
            (
                dlq_attr::DETAIL.to_owned(),
                format!(
                    "confidence {:.4} for {:?} is under its threshold {threshold}",
                    stored.confidence, stored.label
                ),
            ),
            (dlq_attr::RECORD_ID.to_owned(), stored.record_id.to_string()),
        ]);
        let message = OutgoingMessage {
            body: serde_json::to_vec(stored).expect("a result serialises"),
            attributes,
            dedup_key: Some(stored.record_id.to_string()),
        };
        Outcome::forward(QueueName::Review, message)
    }
}

#[async_trait]
impl Stage for ResultsStage {
    fn name(&self) -> StageName {
        StageName::Results
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(self.config.batch_size).waiting(Duration::from_millis(self.config.max_wait_ms))
    }

    async fn finish(&self) {
        if let Some(capture) = &self.capture {
            capture.flush(true).await;
        }
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut judged: Vec<(usize, PredictionResult)> = Vec::new();
        // What each judged record is captured with besides its result.
        let mut origins = Vec::new();
        for (i, delivery) in batch.iter().enumerate() {
            let record = match InferredRecord::from_json(&delivery.body) {
                Ok(record) => record,
                Err(error) => {
                    outcomes[i] = Some(Outcome::failed(error, None));
                    continue;
                }
            };
            let id = record.envelope.record_id.clone();
            let origin = (record.envelope.content_type, record.envelope.attributes.clone());
            match self.judge(record) {
                Ok(result) => {
                    judged.push((i, result));
                    origins.push(origin);
                }
                Err(error) => outcomes[i] = Some(Outcome::failed(error, Some(id))),
            }
        }
        let (slots, results): (Vec<usize>, Vec<PredictionResult>) = judged.into_iter().unzip();
        let puts = match self.store.put_if_absent(results.clone()).await {
            Ok(puts) => puts.into_iter().map(Ok).collect(),
            Err(error) => self.stored_after_failing(&results, error).await,
        };
        let (mut stored_all, mut stored_origins) = (Vec::with_capacity(puts.len()), Vec::with_capacity(puts.len()));
        for (((i, ours), put), origin) in slots.into_iter().zip(results).zip(puts).zip(origins) {
            // A redelivered record keeps the result it was first given.
            let stored = match put {
                Ok(PutOutcome::Inserted) => {
                    report_new_result(&ours);
                    ours
                }
                Ok(PutOutcome::AlreadyPresent(existing)) => *existing,
                Err(error) => {
                    outcomes[i] = Some(Outcome::failed(error, Some(ours.record_id)));
                    continue;
                }
            };
            outcomes[i] = Some(self.route(&stored));
            // A copy of a record a reviewer rejected: it has ended in the DLQ, not in a result.
            if stored.status != ResultStatus::Rejected {
                stored_all.push(stored);
                stored_origins.push(origin);
            }
        }
        // Redeliveries are captured again (their first capture may have been lost with a killed
        // worker); readers keep one line per record.
        self.capture(&stored_all, &stored_origins).await;
        outcomes.into_iter().map(|o| o.expect("every delivery has an outcome")).collect()
    }
}

impl ResultsStage {
    /// What a write of `results` that failed with `error` left: part of the batch may be stored
    /// (DynamoDB writes it in transactions of 99), and a record with a result has its end, to be
    /// routed from it; only the rest fail (dead-lettered on a last receive, a stored one would end
    /// in two places). A stored result equal to ours was stored by this write.
    async fn stored_after_failing(&self, results: &[PredictionResult], error: SluiceError) -> Vec<Result<PutOutcome>> {
        let ids: Vec<RecordId> = results.iter().map(|r| r.record_id.clone()).collect();
        let stored = self.store.get_batch(&ids).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "which of a batch's results were stored is unknown: all are retried");
            Default::default()
        });
        results
            .iter()
            // Looked up, not taken: a record twice in the batch finds its result both times.
            .map(|ours| match stored.get(&ours.record_id) {
                Some(existing) if existing == ours => Ok(PutOutcome::Inserted),
                Some(existing) => Ok(PutOutcome::AlreadyPresent(Box::new(existing.clone()))),
                None => Err(error.clone()),
            })
            .collect()
    }

    async fn capture(&self, stored: &[PredictionResult], origins: &[(ContentType, BTreeMap<String, String>)]) {
        let Some(capture) = &self.capture else { return };
        self.flusher.call_once(|| {
            let (writer, every, due) = (Arc::downgrade(capture), capture.flush_interval(), capture.due());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        () = due.notified() => {}
                    }
                    let Some(writer) = writer.upgrade() else { return };
                    writer.flush(false).await;
                }
            });
        });
        let captured: Vec<Captured<'_>> = stored
            .iter()
            .zip(origins)
            .map(|(result, (content_type, attributes))| Captured { result, content_type: *content_type, attributes })
            .collect();
        capture.capture(&captured).await;
    }
}

/// A result stored for the first time: its confidence by class, and how long its record took
/// from arrival at ingest to here.
fn report_new_result(result: &PredictionResult) {
    metrics().prediction(&result.label, f64::from(result.confidence));
    let times = &result.timestamps;
    if let (Some(ingested), Some(stored)) = (times.ingested_ms, times.stored_ms) {
        metrics().record_latency(stored.saturating_sub(ingested) as f64 / 1000.0);
    }
}
