//! The ingest stage: reads the stream, turns each record (a sluice envelope, or raw bytes as any
//! Kinesis producer writes them) into a checked envelope, and forwards it to the features queue.
//! Anything invalid goes to the ingest DLQ with its reason.

mod config;
pub mod samples;
mod validate;

use std::sync::Arc;

use async_trait::async_trait;
use sluice_core::backend::{Backend, BlobStore, OutgoingMessage};
use sluice_core::config::Settings;
use sluice_core::envelope::{Envelope, RecordId};
use sluice_core::image::ImageLimits;
use sluice_core::model::{ModelBundle, TabularSpec};
use sluice_core::service::BuildError;
use sluice_core::telemetry::traces::TRACEPARENT;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{BatchPolicy, Delivery, Origin, Outcome, PARTITION_KEY, Stage};
use sluice_core::{ReasonCode, SluiceError};

pub use config::IngestConfig;
pub use validate::raw_event_id;

pub struct IngestStage {
    config: IngestConfig,
    blobs: Arc<dyn BlobStore>,
    /// The model's feature spec for JSON events, when the bundle is at hand: an event that does
    /// not carry enough of it is dead-lettered here rather than judged on defaults.
    tabular: Option<TabularSpec>,
}

impl IngestStage {
    pub fn build(settings: &Settings, backend: &Backend) -> Result<Self, BuildError> {
        let config: IngestConfig = settings.section("ingest")?;
        // Both stages' limits are one configuration's: said at start, not found out from a DLQ.
        let features: ImageLimits = settings.section("features.image_limits")?;
        let looser = config.image_limits.looser_than(&features);
        if !looser.is_empty() {
            tracing::warn!(
                looser = looser.join(", "),
                "ingest.image_limits pass images that features.image_limits refuse: they will be dead-lettered \
                 at features as image_too_large; raise features' limits as well"
            );
        }
        let stage = Self::new(config, Arc::clone(&backend.blobs));
        match ModelBundle::load(settings.model()?.dir) {
            Ok(bundle) => Ok(stage.with_tabular(bundle.manifest.input.tabular)),
            Err(e) => {
                tracing::warn!(error = %e, "no model bundle: JSON events are checked against its feature spec at features");
                Ok(stage)
            }
        }
    }

    pub fn new(config: IngestConfig, blobs: Arc<dyn BlobStore>) -> Self {
        Self { config, blobs, tabular: None }
    }

    /// Checks JSON events against `spec` (the model bundle's).
    pub fn with_tabular(mut self, spec: Option<TabularSpec>) -> Self {
        self.tabular = spec;
        self
    }

    /// A stream record read as an envelope, and its payload checked where it travels inline: the
    /// CPU's part of ingesting it (JSON, base64, an image check), done on every core for a batch.
    fn read(&self, delivery: &Delivery) -> Result<Envelope, Outcome> {
        let Origin::Stream { shard, sequence, arrived_ms, .. } = &delivery.origin else {
            let error = SluiceError::permanent(ReasonCode::Internal, "ingest reads the stream, not a queue");
            return Err(Outcome::failed(error, None));
        };
        let position = position_id(delivery, shard, sequence);
        let partition_key = delivery.attributes.get(PARTITION_KEY).map(String::as_str);
        let mut envelope = validate::parse(&delivery.body, &position, partition_key, *arrived_ms, &self.config)
            .map_err(|error| Outcome::failed(error, Some(validate::claimed_id(&delivery.body).unwrap_or(position))))?;
        // With tracing on, the worker gave the delivery this stage's span: the record carries it on.
        if let Some(traceparent) = delivery.attributes.get(TRACEPARENT) {
            envelope.trace = Some(traceparent.clone());
        }
        validate::check_inline(&envelope, &self.config, self.tabular.as_ref())
            .map_err(|error| Outcome::failed(error, Some(envelope.record_id.clone())))?;
        Ok(envelope)
    }

    /// What is left of ingesting a record once read: a claim-checked payload fetched and
    /// checked, a large one moved behind a claim-check, and the envelope sent on.
    async fn forward(&self, mut envelope: Envelope) -> Outcome {
        let checked =
            validate::check_claim_checked(&mut envelope, self.blobs.as_ref(), &self.config, self.tabular.as_ref());
        if let Err(error) = checked.await {
            return Outcome::failed(error, Some(envelope.record_id));
        }
        let mut attributes = std::collections::BTreeMap::new();
        if let Some(trace) = &envelope.trace {
            attributes.insert(TRACEPARENT.to_owned(), trace.clone());
        }
        Outcome::forward(
            QueueName::Features,
            OutgoingMessage { body: envelope.to_json(), attributes, dedup_key: Some(envelope.record_id.into()) },
        )
    }
}

/// A raw record's id: its stream position's, or, replayed, the one its first position gave it.
fn position_id(delivery: &Delivery, shard: &str, sequence: &str) -> RecordId {
    delivery
        .attributes
        .get(PARTITION_KEY)
        .and_then(|key| RecordId::from_replay_partition_key(key))
        .unwrap_or_else(|| RecordId::from_stream_position(shard, sequence))
}

#[async_trait]
impl Stage for IngestStage {
    fn name(&self) -> StageName {
        StageName::Ingest
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(self.config.batch_size)
    }

    /// The id a record failing as a whole (a panic on it) is dead-lettered, and replayed, under:
    /// the one its envelope claims, else its stream position's.
    fn record_id_of(&self, delivery: &Delivery) -> Option<RecordId> {
        let Origin::Stream { shard, sequence, .. } = &delivery.origin else { return None };
        Some(validate::claimed_id(&delivery.body).unwrap_or_else(|| position_id(delivery, shard, sequence)))
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let read = sluice_core::threads::on_every_core(batch.iter().collect(), |delivery| self.read(delivery));
        let mut outcomes = Vec::with_capacity(batch.len());
        for read in read {
            outcomes.push(match read {
                Ok(envelope) => self.forward(envelope).await,
                Err(failed) => failed,
            });
        }
        outcomes
    }
}
