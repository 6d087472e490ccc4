//! The inference stage: micro-batches records, reads their vectors from the feature store in one
//! batch get, runs the model, and forwards the probabilities with model name, version and backend.

pub mod model;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_core::backend::{Backend, FeatureStore, OutgoingMessage};
use sluice_core::config::Settings;
use sluice_core::envelope::{Envelope, now_ms};
use sluice_core::model::{ModelBundle, ModelManifest};
use sluice_core::record::{InferredRecord, Prediction};
use sluice_core::service::BuildError;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{BatchPolicy, Delivery, Outcome, Stage};
use sluice_core::{ReasonCode, SluiceError};

use crate::model::{CandleClassifier, DevicePreference, select_device};

/// `[inference]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Most records in one model call.
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first record is in.
    pub max_wait_ms: u64,
    pub device: DevicePreference,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self { batch_size: 64, max_wait_ms: 20, device: DevicePreference::Auto }
    }
}

pub struct InferenceStage {
    config: InferenceConfig,
    manifest: ModelManifest,
    classifier: Arc<CandleClassifier>,
    features: Arc<dyn FeatureStore>,
}

impl InferenceStage {
    pub fn build(settings: &Settings, backend: &Backend) -> Result<Self, BuildError> {
        let config: InferenceConfig = settings.section("inference")?;
        let bundle = ModelBundle::load(settings.model()?.dir)?;
        let (device, backend_name) = select_device(config.device);
        let classifier = CandleClassifier::load(&bundle, device, backend_name)?;
        tracing::info!(
            model = bundle.manifest.name,
            version = bundle.manifest.version,
            backend = backend_name,
            "model loaded"
        );
        Ok(Self {
            config,
            manifest: bundle.manifest,
            classifier: Arc::new(classifier),
            features: Arc::clone(&backend.features),
        })
    }

    async fn run_model(&self, inputs: Vec<f32>, rows: usize) -> Result<Vec<Vec<f32>>, SluiceError> {
        let classifier = Arc::clone(&self.classifier);
        // Model math is CPU-bound: keep it off the async threads.
        tokio::task::spawn_blocking(move || classifier.predict(inputs, rows))
            .await
            .map_err(|e| SluiceError::retryable(ReasonCode::ModelFailure, format!("model task: {e}")))?
    }
}

#[async_trait]
impl Stage for InferenceStage {
    fn name(&self) -> StageName {
        StageName::Inference
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(self.config.batch_size).waiting(Duration::from_millis(self.config.max_wait_ms))
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut envelopes: BTreeMap<usize, Envelope> = BTreeMap::new();
        for (i, delivery) in batch.iter().enumerate() {
            match Envelope::from_json(&delivery.body) {
                Ok(envelope) => {
                    envelopes.insert(i, envelope);
                }
                Err(error) => outcomes[i] = Some(Outcome::failed(error, None)),
            }
        }
        let ids: Vec<_> = envelopes.values().map(|e| e.record_id.clone()).collect();
        let mut vectors = match self.features.get_batch(&ids).await {
            Ok(found) => found,
            Err(error) => return vec![Outcome::failed(error, None); batch.len()],
        };

        let want = self.classifier.vector_len();
        let mut rows: Vec<(usize, Envelope)> = Vec::new();
        let mut inputs = Vec::with_capacity(envelopes.len() * want);
        for (i, envelope) in envelopes {
            let id = envelope.record_id.clone();
            match vectors.remove(&id) {
                None => {
                    let error =
                        SluiceError::permanent(ReasonCode::MissingFeatures, "no feature vector stored for this record");
                    outcomes[i] = Some(Outcome::failed(error, Some(id)));
                }
                Some(v) if v.len() != want => {
                    let error = SluiceError::permanent(
                        ReasonCode::FeatureShapeMismatch,
                        format!("vector has {} values; model {} takes {want}", v.len(), self.manifest.name),
                    );
                    outcomes[i] = Some(Outcome::failed(error, Some(id)));
                }
                Some(v) => {
                    inputs.extend_from_slice(&v);
                    rows.push((i, envelope));
                }
            }
        }

        if !rows.is_empty() {
            match self.run_model(inputs, rows.len()).await {
                Ok(probabilities) => {
                    for ((i, mut envelope), probabilities) in rows.into_iter().zip(probabilities) {
                        outcomes[i] = Some(self.forward(&batch[i], &mut envelope, probabilities));
                    }
                }
                Err(error) => {
                    for (i, envelope) in rows {
                        outcomes[i] = Some(Outcome::failed(error.clone(), Some(envelope.record_id)));
                    }
                }
            }
        }
        outcomes.into_iter().map(|o| o.expect("every delivery has an outcome")).collect()
    }
}

impl InferenceStage {
    fn forward(&self, delivery: &Delivery, envelope: &mut Envelope, probabilities: Vec<f32>) -> Outcome {
        if probabilities.iter().any(|p| !p.is_finite()) {
            let error = SluiceError::permanent(ReasonCode::InvalidModelOutput, "model output is not finite");
            return Outcome::failed(error, Some(envelope.record_id.clone()));
        }
        envelope.timestamps.inferred_ms = Some(now_ms());
        let record = InferredRecord {
            envelope: envelope.clone(),
            prediction: Prediction {
                probabilities,
                model: self.manifest.name.clone(),
                model_version: self.manifest.version.clone(),
                backend: self.classifier.backend().to_owned(),
            },
        };
        let message = OutgoingMessage {
            body: record.to_json(),
            attributes: delivery.attributes.clone(),
            dedup_key: Some(envelope.record_id.to_string()),
        };
        Outcome::forward(QueueName::Results, message)
    }
}
