//! The inference stage: micro-batches records, reads their vectors from the feature store in one
//! batch get, runs the model, and forwards the probabilities with model name, version and backend.
//!
//! The model is Candle's; when it cannot serve (it failed to load, a batch fails, or the circuit
//! breaker has opened on failures or latency) and a SageMaker XGBoost endpoint is configured, the
//! same vectors go there instead. `backend = "sagemaker"` sends every batch there.

pub mod batch_size;
pub mod breaker;
pub mod model;
pub mod sagemaker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_core::backend::{Backend, FeatureStore, OutgoingMessage};
use sluice_core::config::Settings;
use sluice_core::envelope::{Envelope, now_ms};
use sluice_core::model::{ModelBundle, ModelManifest};
use sluice_core::record::{InferredRecord, Prediction, message_attr};
use sluice_core::service::BuildError;
use sluice_core::telemetry::metrics::metrics;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::vector::FeatureVector;
use sluice_core::worker::{BatchPolicy, Delivery, Outcome, Stage};
use sluice_core::{ReasonCode, SluiceError};

use crate::batch_size::BatchSizer;
use crate::breaker::{BreakerConfig, CircuitBreaker, Route};
use crate::model::{CandleClassifier, DevicePreference, Precision, select_device};
use crate::sagemaker::{SageMakerConfig, SageMakerFallback};

/// Which model serves batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum InferenceBackend {
    /// Candle, with the SageMaker fallback when `[inference.sagemaker]` names an endpoint.
    #[default]
    Candle,
    /// Every batch to the SageMaker endpoint.
    Sagemaker,
}

/// Command-line flags for the inference stage (`sluice demo`, `sluice run`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InferenceArgs {
    /// Which model serves batches (overrides `inference.backend`).
    #[arg(long, value_enum)]
    pub inference_backend: Option<InferenceBackend>,
    /// The SageMaker XGBoost endpoint to fall back to (overrides
    /// `inference.sagemaker.endpoint_name`).
    #[arg(long)]
    pub sagemaker_endpoint: Option<String>,
    /// A local stand-in for the SageMaker runtime (overrides `inference.sagemaker.endpoint_url`).
    #[arg(long)]
    pub sagemaker_endpoint_url: Option<String>,
}

impl InferenceArgs {
    pub fn apply(&self, mut settings: Settings) -> Settings {
        if let Some(backend) = self.inference_backend {
            settings = settings.set("inference.backend", backend);
        }
        if let Some(name) = &self.sagemaker_endpoint {
            settings = settings.set("inference.sagemaker.endpoint_name", name);
        }
        if let Some(url) = &self.sagemaker_endpoint_url {
            settings = settings.set("inference.sagemaker.endpoint_url", url);
        }
        settings
    }
}

/// `[inference.inject_failures]`: make Candle fail on purpose, for drills and tests of the
/// fallback. Batches number `after_batches` + 1 to `after_batches` + `batches` fail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InjectFailures {
    pub after_batches: u64,
    pub batches: u64,
    /// The failing batches panic in the model's thread, as a model that cannot take an input
    /// would, rather than return an error.
    pub panic: bool,
}

/// `[inference]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Most records in one model call.
    pub batch_size: usize,
    /// The time each model call is sized for: the stage times the model as it runs and takes
    /// no more records per batch than fit, between 64 (or `batch_size` if less) and
    /// `batch_size`; 0: always `batch_size`.
    pub batch_target_ms: u64,
    /// How long to wait for a batch to fill once its first record is in.
    pub max_wait_ms: u64,
    pub device: DevicePreference,
    /// Number format on a GPU: f32, tf32, f16 or bf16 (the CPU computes in f32).
    pub precision: Precision,
    /// CPU threads for model math; 0 uses every core, or half of them when every stage runs in
    /// one process on the embedded store (`RAYON_NUM_THREADS`, when set, wins: see
    /// `sluice_core::threads`).
    pub threads: usize,
    pub backend: InferenceBackend,
    pub breaker: BreakerConfig,
    pub sagemaker: SageMakerConfig,
    pub inject_failures: InjectFailures,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            batch_target_ms: 2_000,
            max_wait_ms: 20,
            device: DevicePreference::Auto,
            precision: Precision::F32,
            threads: 0,
            backend: InferenceBackend::Candle,
            breaker: BreakerConfig::default(),
            sagemaker: SageMakerConfig::default(),
            inject_failures: InjectFailures::default(),
        }
    }
}

/// The model, version and backend a prediction names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    model: String,
    version: String,
    backend: String,
}

pub struct InferenceStage {
    config: InferenceConfig,
    manifest: ModelManifest,
    /// None when Candle could not load (or is not wanted) and the fallback serves alone.
    classifier: Option<Arc<CandleClassifier>>,
    fallback: Option<SageMakerFallback>,
    breaker: Arc<CircuitBreaker>,
    batch_size: BatchSizer,
    model_batches: AtomicU64,
    features: Arc<dyn FeatureStore>,
    /// The bundle's input fingerprint: a record whose vector was made for another is refused.
    input_spec: String,
}

impl InferenceStage {
    /// A record whose vector the features stage made for another input than this bundle's (a
    /// bundle changed while the queue held records featured by the old one): read as this one's,
    /// it would be judged on features it does not mean. Retryable: a worker still serving that
    /// bundle takes it; past its receives it is dead-lettered, saying so.
    fn made_for_another(&self, made_for: &str) -> SluiceError {
        SluiceError::retryable(
            ReasonCode::FeatureShapeMismatch,
            format!(
                "its features were made for another model input (fingerprint {made_for}); model {} {} takes {}",
                self.manifest.name, self.manifest.version, self.input_spec
            ),
        )
    }

    pub fn build(settings: &Settings, backend: &Backend) -> Result<Self, BuildError> {
        let config: InferenceConfig = settings.section("inference")?;
        let bundle = ModelBundle::load(settings.model()?.dir)?;
        // A second stage in the same process keeps the first one's thread count.
        if config.threads > 0
            && let Err(e) = model::use_cpu_threads(config.threads)
        {
            tracing::warn!(error = %e, "inference.threads not applied");
        }
        // The bundle may name its fallback endpoint; the configuration's wins. (The inference
        // task's role must be allowed to call it: the CDK stack grants the endpoint it makes.)
        let mut sagemaker = config.sagemaker.clone();
        if sagemaker.endpoint_name.is_none()
            && let Some(bundled) = &bundle.manifest.fallback
        {
            tracing::info!(endpoint = bundled.endpoint, "the fallback endpoint the model bundle names");
            sagemaker.endpoint_name = Some(bundled.endpoint.clone());
        }
        let fallback = SageMakerFallback::new(&sagemaker, &settings.store()?.aws);
        if fallback.is_some() {
            config.breaker.check().map_err(|e| SluiceError::permanent(ReasonCode::Misconfigured, e))?;
        }
        let classifier = match (config.backend, &fallback) {
            (InferenceBackend::Sagemaker, None) => {
                return Err(SluiceError::permanent(
                    ReasonCode::FallbackFailure,
                    "inference.backend = \"sagemaker\" needs inference.sagemaker.endpoint_name",
                )
                .into());
            }
            (InferenceBackend::Sagemaker, Some(_)) => None,
            (InferenceBackend::Candle, _) => {
                let (device, backend_name) = select_device(config.device);
                match CandleClassifier::load_at(&bundle, device, backend_name, config.precision)
                    .and_then(|c| c.warm_up().map(|()| c))
                {
                    Ok(classifier) => Some(Arc::new(classifier)),
                    Err(error) if fallback.is_some() => {
                        tracing::error!(%error, "Candle cannot serve; every batch goes to the SageMaker fallback");
                        None
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        tracing::info!(
            model = bundle.manifest.name,
            version = bundle.manifest.version,
            backend = classifier.as_ref().map_or(sagemaker::BACKEND, |c| c.backend()),
            fallback = fallback.as_ref().map(SageMakerFallback::endpoint),
            "model loaded"
        );
        // Only Candle's calls are timed: with none, every batch takes up to `batch_size`.
        let target = if classifier.is_some() { config.batch_target_ms } else { 0 };
        if target >= config.breaker.max_latency_ms && fallback.is_some() {
            tracing::warn!(
                batch_target_ms = target,
                max_latency_ms = config.breaker.max_latency_ms,
                "batches sized to take longer than the breaker allows will open it"
            );
        }
        Ok(Self {
            // Without a fallback nothing is recorded in the breaker: it stays closed, as every
            // batch goes to the model.
            breaker: {
                let breaker = Arc::new(CircuitBreaker::new(config.breaker.clone()));
                sluice_core::telemetry::metrics::watch_breaker(&breaker);
                breaker
            },
            batch_size: BatchSizer::new(config.batch_size, Duration::from_millis(target)),
            config,
            input_spec: bundle.manifest.input.fingerprint(),
            manifest: bundle.manifest,
            classifier,
            fallback,
            model_batches: AtomicU64::new(0),
            features: Arc::clone(&backend.features),
        })
    }

    /// Class probabilities for `rows` vectors and who served them, from Candle or, when it cannot
    /// serve, the fallback; reports the call's latency by backend (the breaker's state is read by
    /// the metrics, `watch_breaker`). `sized`: the batch sizer learns from the model's time (not
    /// from the one-record re-runs of a batch that panicked, whose per-call cost would read as a
    /// record's).
    async fn predict(
        &self,
        inputs: FeatureVector,
        rows: usize,
        sized: bool,
    ) -> Result<(Vec<Vec<f32>>, Served), SluiceError> {
        let started = Instant::now();
        let result = self.predict_routed(inputs, rows, sized).await;
        if let Ok((_, served)) = &result {
            metrics().inference(&served.backend, rows, started.elapsed().as_secs_f64());
        }
        result
    }

    async fn predict_routed(
        &self,
        inputs: FeatureVector,
        rows: usize,
        sized: bool,
    ) -> Result<(Vec<Vec<f32>>, Served), SluiceError> {
        let Some(classifier) = &self.classifier else {
            return self.predict_fallback(&inputs).await;
        };
        let Some(fallback) = &self.fallback else {
            // Nothing to fall back to: no breaker to judge, and each record's output is judged
            // on its own (`forward`).
            let started = Instant::now();
            let result = self.run_candle(classifier, inputs, rows).await;
            if result.is_ok() && sized {
                self.batch_size.observe(rows, started.elapsed());
            }
            return result.map(|probabilities| (probabilities, self.served(classifier)));
        };
        let route = self.breaker.route();
        if route == Route::Fallback {
            return self.predict_fallback(&inputs).await.map_err(|e| while_the_model_is_down(None, e));
        }
        let started = Instant::now();
        let keep = inputs.clone();
        // Output that is not a number for a whole batch (weights gone to NaN) is the model
        // failing: the breaker counts it and the fallback takes the batch. A row or two (an
        // overflow in f16) are judged each on its own, as without a fallback.
        let result = self.run_candle(classifier, inputs, rows).await.and_then(finite_or_failure);
        let elapsed = started.elapsed();
        // A panic is an input's doing, not the model being down: the breaker is told the model
        // ran, and a batch of several goes back to `process`, which runs its records one at a
        // time (the one that panics alone then goes to the fallback).
        let input_panicked = matches!(&result, Err(error) if panicked(error));
        self.breaker.record(route, result.is_ok() || input_panicked, elapsed);
        if result.is_ok() && sized {
            self.batch_size.observe(rows, elapsed);
        }
        match result {
            Ok(probabilities) => Ok((probabilities, self.served(classifier))),
            Err(error) if input_panicked && rows > 1 => Err(error),
            Err(error) => {
                tracing::warn!(%error, endpoint = fallback.endpoint(), "Candle failed; this batch goes to the SageMaker fallback");
                self.predict_fallback(&keep).await.map_err(|e| while_the_model_is_down(Some(&error), e))
            }
        }
    }

    fn served(&self, classifier: &CandleClassifier) -> Served {
        Served {
            model: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            backend: classifier.backend().to_owned(),
        }
    }

    async fn predict_fallback(&self, inputs: &FeatureVector) -> Result<(Vec<Vec<f32>>, Served), SluiceError> {
        let fallback = self.fallback.as_ref().expect("a stage without Candle has a fallback");
        // The endpoint takes the values the model takes.
        let values = inputs.to_values(self.manifest.input.image.as_ref())?;
        let probabilities = fallback.predict(&values, self.manifest.vector_len(), self.manifest.labels.len()).await?;
        let (model, version) = fallback.model();
        Ok((
            probabilities,
            Served { model: model.to_owned(), version: version.to_owned(), backend: sagemaker::BACKEND.to_owned() },
        ))
    }

    async fn run_candle(
        &self,
        classifier: &Arc<CandleClassifier>,
        inputs: FeatureVector,
        rows: usize,
    ) -> Result<Vec<Vec<f32>>, SluiceError> {
        let batch = self.model_batches.fetch_add(1, Ordering::Relaxed);
        let inject = &self.config.inject_failures;
        let injected = batch >= inject.after_batches && batch < inject.after_batches + inject.batches;
        if injected && !inject.panic {
            return Err(SluiceError::retryable(ReasonCode::ModelFailure, format!("injected failure (batch {batch})")));
        }
        let classifier = Arc::clone(classifier);
        // Model math is CPU-bound: keep it off the async threads.
        tokio::task::spawn_blocking(move || {
            if injected {
                panic!("injected panic (batch {batch})");
            }
            classifier.predict_batch(inputs, rows)
        })
        .await
        .map_err(model_task_failed)?
    }
}

/// What a panic in the model's thread says first (see [`panicked`]).
const MODEL_PANICKED: &str = "the model panicked";

/// The model's thread ended without an answer. A panic is the model failing on what it was
/// given, every time it is given it: permanent, and kept to the records that cause it, as
/// `process` runs a batch that panicked one record at a time.
fn model_task_failed(e: tokio::task::JoinError) -> SluiceError {
    if !e.is_panic() {
        return SluiceError::retryable(ReasonCode::ModelFailure, format!("model task: {e}"));
    }
    let payload = e.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    SluiceError::permanent(ReasonCode::ModelFailure, format!("{MODEL_PANICKED}: {text}"))
}

fn panicked(error: &SluiceError) -> bool {
    error.code() == ReasonCode::ModelFailure && error.detail().starts_with(MODEL_PANICKED)
}

/// The model's output, or its failure when none of it is a number.
fn finite_or_failure(probabilities: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, SluiceError> {
    let bad = probabilities.iter().filter(|row| row.iter().any(|p| !p.is_finite())).count();
    if probabilities.is_empty() || bad < probabilities.len() {
        return Ok(probabilities);
    }
    Err(SluiceError::permanent(
        ReasonCode::InvalidModelOutput,
        format!("model output is not finite for any of the batch's {bad} records"),
    ))
}

/// The fallback's failure for a batch the model did not take. While the model may take it on
/// a later receive (its own failure was retryable, or its breaker holds it off for now), the
/// batch is retried: the fallback's refusal of it (a ModelError, a request it finds wrong) is no
/// reason to dead-letter records the model fails on only for the moment.
fn while_the_model_is_down(model: Option<&SluiceError>, fallback: SluiceError) -> SluiceError {
    if fallback.is_retryable() || fallback.is_misconfiguration() || model.is_some_and(|m| !m.is_retryable()) {
        return fallback;
    }
    let why = match model {
        Some(model) => format!("Candle failed first: {}", model.detail()),
        None => "Candle is held off by its circuit breaker".to_owned(),
    };
    SluiceError::retryable(fallback.code(), format!("{} ({why}; tried again)", fallback.detail()))
}

#[async_trait]
impl Stage for InferenceStage {
    fn name(&self) -> StageName {
        StageName::Inference
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(self.batch_size.size()).waiting(Duration::from_millis(self.config.max_wait_ms))
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut envelopes: BTreeMap<usize, Envelope> = BTreeMap::new();
        for (i, delivery) in batch.iter().enumerate() {
            match Envelope::from_json(&delivery.body) {
                Ok(envelope) => match delivery.attributes.get(message_attr::INPUT_SPEC) {
                    Some(made_for) if *made_for != self.input_spec => {
                        outcomes[i] = Some(Outcome::failed(self.made_for_another(made_for), Some(envelope.record_id)));
                    }
                    // Made for this bundle's input, or sent by a build that did not say.
                    _ => {
                        envelopes.insert(i, envelope);
                    }
                },
                Err(error) => outcomes[i] = Some(Outcome::failed(error, None)),
            }
        }
        let ids: Vec<_> = envelopes.values().map(|e| e.record_id.clone()).collect();
        let vectors = match self.features.get_batch(&ids).await {
            Ok(found) => found,
            Err(error) => {
                // The messages already judged unreadable keep that outcome.
                for (i, envelope) in envelopes {
                    outcomes[i] = Some(Outcome::failed(error.clone(), Some(envelope.record_id)));
                }
                return outcomes.into_iter().map(|o| o.expect("every delivery has an outcome")).collect();
            }
        };

        let want = self.manifest.vector_len();
        let mut rows: Vec<(usize, Envelope)> = Vec::new();
        let mut found: Vec<&FeatureVector> = Vec::with_capacity(envelopes.len());
        for (i, envelope) in envelopes {
            let id = envelope.record_id.clone();
            // Looked up, not taken: a record delivered twice in one batch (at-least-once
            // transport) finds its vector both times.
            match vectors.get(&id) {
                None => {
                    let error =
                        SluiceError::permanent(ReasonCode::MissingFeatures, "no feature vector stored for this record");
                    outcomes[i] = Some(Outcome::failed(error, Some(id)));
                }
                Some(Err(error)) => outcomes[i] = Some(Outcome::failed(error.clone(), Some(id))),
                Some(Ok(v)) if v.len() != want => {
                    let error = SluiceError::permanent(
                        ReasonCode::FeatureShapeMismatch,
                        format!("vector has {} values; model {} takes {want}", v.len(), self.manifest.name),
                    );
                    outcomes[i] = Some(Outcome::failed(error, Some(id)));
                }
                Some(Ok(v)) => {
                    found.push(v);
                    rows.push((i, envelope));
                }
            }
        }
        let inputs = self.batch_inputs(&found);

        if !rows.is_empty() {
            match self.predict(inputs, rows.len(), true).await {
                Ok((probabilities, served)) => {
                    for ((i, mut envelope), probabilities) in rows.into_iter().zip(probabilities) {
                        outcomes[i] = Some(self.forward(&batch[i], &mut envelope, probabilities, &served));
                    }
                }
                // One record the model cannot take would fail its whole batch, receive after
                // receive: each is run on its own, and only those that panic alone fail.
                Err(error) if rows.len() > 1 && panicked(&error) => {
                    tracing::warn!(%error, records = rows.len(), "running the batch's records one at a time");
                    for ((i, mut envelope), vector) in rows.into_iter().zip(found) {
                        outcomes[i] = Some(match self.predict(self.batch_inputs(&[vector]), 1, false).await {
                            Ok((probabilities, served)) => {
                                let probabilities = probabilities.into_iter().next().unwrap_or_default();
                                self.forward(&batch[i], &mut envelope, probabilities, &served)
                            }
                            Err(error) => Outcome::failed(error, Some(envelope.record_id)),
                        });
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
    /// The batch's vectors end to end: pixels when every one is (the model normalises them on
    /// its device), else values (vectors stored before pixels were, or tabular ones).
    fn batch_inputs(&self, vectors: &[&FeatureVector]) -> FeatureVector {
        if vectors.iter().all(|v| matches!(v, FeatureVector::Pixels(_))) {
            let pixels = vectors.iter().flat_map(|v| match v {
                FeatureVector::Pixels(p) => p.as_slice(),
                FeatureVector::Values(_) => &[],
            });
            return FeatureVector::Pixels(pixels.copied().collect());
        }
        let image = self.manifest.input.image.as_ref();
        let values = vectors.iter().flat_map(|v| match v {
            FeatureVector::Values(values) => values.clone(),
            // Lengths were checked, and pixels are only ever stored for a model with images.
            FeatureVector::Pixels(pixels) => image.map(|spec| spec.normalise(pixels)).unwrap_or_default(),
        });
        FeatureVector::Values(values.collect())
    }

    fn forward(
        &self,
        delivery: &Delivery,
        envelope: &mut Envelope,
        probabilities: Vec<f32>,
        served: &Served,
    ) -> Outcome {
        let wrong = if probabilities.len() != self.manifest.labels.len() {
            Some(format!(
                "the model gave {} probabilities for {} labels",
                probabilities.len(),
                self.manifest.labels.len()
            ))
        } else {
            probabilities.iter().any(|p| !p.is_finite()).then(|| "model output is not finite".to_owned())
        };
        if let Some(detail) = wrong {
            let error = SluiceError::permanent(ReasonCode::InvalidModelOutput, detail);
            return Outcome::failed(error, Some(envelope.record_id.clone()));
        }
        envelope.timestamps.inferred_ms = Some(now_ms());
        let record = InferredRecord {
            envelope: envelope.clone(),
            prediction: Prediction {
                probabilities,
                model: served.model.clone(),
                model_version: served.version.clone(),
                backend: served.backend.clone(),
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
