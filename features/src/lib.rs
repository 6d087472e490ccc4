//! The features stage: turns each record's payload into the feature vector its model takes
//! (images: decode, resize, crop, as bytes; JSON events: the bundle's declarative feature spec),
//! writes the vector to the feature store, and forwards the record to the inference queue.

pub mod image;
pub mod tabular;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sluice_core::backend::{Backend, BlobStore, FeatureStore, OutgoingMessage};
use sluice_core::config::Settings;
use sluice_core::envelope::{ContentType, Envelope, Payload, RecordId, now_ms};
use sluice_core::image::ImageLimits;
use sluice_core::model::{ModelBundle, ModelManifest};
use sluice_core::record::message_attr;
use sluice_core::service::BuildError;
use sluice_core::threads;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::vector::FeatureVector;
use sluice_core::worker::{BatchPolicy, Delivery, Outcome, Stage};
use sluice_core::{ReasonCode, Result, SluiceError};

/// `[features]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first record is in: fuller batches mean
    /// fewer store and queue requests per record.
    pub max_wait_ms: u64,
    /// Bounds on what an image may decode to here, where its pixels are decoded (ingest holds a
    /// header to its own).
    pub image_limits: ImageLimits,
    /// Largest claim-checked payload read (as `ingest.max_claim_check_bytes`): ingest checked
    /// the object, but a producer's object can be written again after that.
    pub max_claim_check_bytes: usize,
    /// Largest JSON event read from behind a claim-check (as `ingest.max_event_bytes`).
    pub max_event_bytes: usize,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self {
            batch_size: 200,
            max_wait_ms: 20,
            image_limits: ImageLimits::default(),
            max_claim_check_bytes: 32 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
        }
    }
}

/// Claim-checked payloads fetched at once, at most: each is a request that waits on the network
/// (a batch of 200 photos fetched one after another took 200 round trips), and each may hold up
/// to `features.max_claim_check_bytes` in memory.
const FETCHES_AT_ONCE: usize = 8;

pub struct FeaturesStage {
    config: FeaturesConfig,
    manifest: ModelManifest,
    blobs: Arc<dyn BlobStore>,
    store: Arc<dyn FeatureStore>,
    /// The bundle's input fingerprint, sent with each record to inference.
    input_spec: String,
}

impl FeaturesStage {
    pub fn build(settings: &Settings, backend: &Backend) -> Result<Self, BuildError> {
        let bundle = ModelBundle::load(settings.model()?.dir)?;
        Ok(Self {
            config: settings.section("features")?,
            input_spec: bundle.manifest.input.fingerprint(),
            manifest: bundle.manifest,
            blobs: Arc::clone(&backend.blobs),
            store: Arc::clone(&backend.features),
        })
    }

    /// Each envelope's feature vector (its payload fetched first where claim-checked), made on
    /// every core, with the envelope's place in the batch.
    async fn vectorise_all(&self, envelopes: Vec<(usize, Envelope)>) -> Vec<(usize, Made)> {
        use futures_util::StreamExt as _;
        // Collected first: a lazily mapped iterator in the stream trips the compiler's check that
        // the stage's (`async_trait`, `Send`) future is Send for every lifetime.
        let fetches: Vec<_> = envelopes
            .into_iter()
            .map(|(at, mut envelope)| async move {
                match self.take_payload(&mut envelope).await {
                    Ok(data) => Ok((at, envelope, data)),
                    Err(error) => Err((at, Outcome::failed(error, Some(envelope.record_id)))),
                }
            })
            .collect();
        let inputs: Vec<_> = futures_util::stream::iter(fetches).buffered(FETCHES_AT_ONCE).collect().await;
        let (manifest, limits) = (&self.manifest, &self.config.image_limits);
        threads::on_every_core(inputs, |input| {
            let (at, envelope, data) = match input {
                Ok(input) => input,
                Err((at, failed)) => return (at, Err(failed)),
            };
            match vectorise(manifest, envelope.content_type, &data, limits) {
                Ok(vector) => (at, Ok((envelope, vector))),
                Err(error) => (at, Err(Outcome::failed(error, Some(envelope.record_id)))),
            }
        })
    }

    /// The payload's bytes, taken out of the envelope (which forwards without them) or fetched
    /// from behind its claim-check.
    async fn take_payload(&self, envelope: &mut Envelope) -> Result<Vec<u8>> {
        match std::mem::replace(&mut envelope.payload, Payload::Released) {
            Payload::Inline { data } => Ok(data),
            Payload::ClaimCheck { reference } => {
                let most =
                    envelope.content_type.read_at_most(self.config.max_claim_check_bytes, self.config.max_event_bytes);
                self.blobs.get_at_most(&reference, most).await
            }
            Payload::Released => {
                Err(SluiceError::permanent(ReasonCode::SchemaMismatch, "the record carries no payload"))
            }
        }
    }
}

/// A record's envelope and feature vector, or the outcome of its failure.
type Made = std::result::Result<(Envelope, FeatureVector), Outcome>;

/// The feature vector of one payload, as `manifest` wants it.
pub fn vectorise(
    manifest: &ModelManifest,
    content_type: ContentType,
    data: &[u8],
    limits: &ImageLimits,
) -> Result<FeatureVector> {
    let unsupported = |what: &str| {
        SluiceError::permanent(ReasonCode::SchemaMismatch, format!("model {} takes no {what} input", manifest.name))
    };
    if content_type.is_image() {
        let spec = manifest.input.image.as_ref().ok_or_else(|| unsupported("image"))?;
        let decoded = sluice_core::image::decode(data, content_type, limits)?;
        Ok(FeatureVector::Pixels(image::preprocess(&decoded, spec)))
    } else {
        let spec = manifest.input.tabular.as_ref().ok_or_else(|| unsupported("tabular"))?;
        let event: serde_json::Value = serde_json::from_slice(data)
            .map_err(|e| SluiceError::permanent(ReasonCode::InvalidJson, format!("payload is not valid JSON: {e}")))?;
        tabular::vectorise(spec, &event).map(FeatureVector::Values)
    }
}

#[async_trait]
impl Stage for FeaturesStage {
    fn name(&self) -> StageName {
        StageName::Features
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(self.config.batch_size).waiting(Duration::from_millis(self.config.max_wait_ms))
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        // The envelopes are read and the vectors made on every core (decoding and resizing an
        // image is the stage's work). Payloads that travel inline are at hand already;
        // claim-checked ones are fetched a core's worth (at least FETCHES_AT_ONCE) at a time, so
        // that a batch of large payloads is never all in memory at once.
        let envelopes = threads::on_every_core(batch.iter().collect(), |delivery: &Delivery| {
            Envelope::from_json(&delivery.body).map_err(|error| Outcome::failed(error, None))
        });
        let mut made = Vec::with_capacity(batch.len());
        let (mut inline, mut claim_checked) = (Vec::new(), Vec::new());
        for (at, envelope) in envelopes.into_iter().enumerate() {
            match envelope {
                Ok(envelope) if matches!(envelope.payload, Payload::ClaimCheck { .. }) => {
                    claim_checked.push((at, envelope));
                }
                Ok(envelope) => inline.push((at, envelope)),
                Err(failed) => made.push((at, Err(failed))),
            }
        }
        made.extend(self.vectorise_all(inline).await);
        let mut claim_checked = claim_checked.into_iter().peekable();
        while claim_checked.peek().is_some() {
            let some = claim_checked.by_ref().take(threads::stage_threads().max(FETCHES_AT_ONCE)).collect();
            made.extend(self.vectorise_all(some).await);
        }
        made.sort_unstable_by_key(|(at, _)| *at);
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut vectors: Vec<(RecordId, FeatureVector)> = Vec::new();
        for ((_, made), delivery) in made.into_iter().zip(batch) {
            let (mut envelope, vector) = match made {
                Ok(made) => made,
                Err(failed) => {
                    outcomes.push(failed);
                    continue;
                }
            };
            vectors.push((envelope.record_id.clone(), vector));
            envelope.timestamps.featured_ms = Some(now_ms());
            let mut attributes = delivery.attributes.clone();
            attributes.insert(message_attr::INPUT_SPEC.to_owned(), self.input_spec.clone());
            let message = OutgoingMessage {
                body: envelope.to_json(),
                attributes,
                dedup_key: Some(envelope.record_id.to_string()),
            };
            outcomes.push(Outcome::forward(QueueName::Inference, message));
        }
        if !vectors.is_empty()
            && let Err(error) = self.store.put_if_absent(vectors).await
        {
            // Nothing forwarded may go ahead of its vector.
            for outcome in &mut outcomes {
                if matches!(outcome, Outcome::Forward(_)) {
                    *outcome = Outcome::failed(error.clone(), None);
                }
            }
        }
        outcomes
    }
}
