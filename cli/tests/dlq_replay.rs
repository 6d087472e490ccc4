//! The operator's loop: a record fails permanently, is inspected in its DLQ, the cause is fixed,
//! and a replay takes it to a result — with nothing rewritten on the way.

mod common;

use sluice_cli::pipeline;
use sluice_core::ReasonCode;
use sluice_core::backend::{Backend, OutgoingMessage};
use sluice_core::config::Settings;
use sluice_core::dlq::{self, Filter, Letters, ReplayOptions, SendTo};
use sluice_core::envelope::{ContentType, Envelope, Payload, RecordId};
use sluice_core::stats::PipelineStats;
use sluice_core::telemetry::health::Health;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::vector::FeatureVector;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_record_replays_from_its_dlq_to_a_result() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::load(None)
        .unwrap()
        .set("store.path", dir.path().join("s.sqlite"))
        .set("model.dir", common::model_dir());
    let backend = Backend::open(&settings.store().unwrap()).await.unwrap();

    // A record reaches inference without its feature vector.
    let id = RecordId::parse("orphan-1").unwrap();
    let mut envelope = Envelope::inline(id.clone(), "test", ContentType::Png, Vec::new());
    envelope.payload = Payload::Released;
    let original = envelope.to_json();
    let message = OutgoingMessage { body: original.clone(), dedup_key: Some(id.to_string()), ..Default::default() };
    backend.queue(QueueName::Inference).send_batch(vec![message]).await.unwrap();
    pipeline::run_all(&settings, CancellationToken::new(), true, &Health::new(4)).await.unwrap();

    let inference = Letters::Stage(StageName::Inference);
    let entries = dlq::list(&backend, inference, &Filter::default(), 10).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].entry.reason, ReasonCode::MissingFeatures);
    assert_eq!(entries[0].record_id(), Some(&id));
    assert_eq!(entries[0].entry.body, original, "the DLQ holds the message exactly as received");

    let replay = |reason| {
        let backend = backend.clone();
        async move {
            let filter = Filter { reason: Some(reason), ..Filter::default() };
            let to = SendTo(StageName::Inference);
            dlq::apply(&backend, inference, &filter, &to, &ReplayOptions::default(), &|_| {}).await.unwrap().moved
        }
    };
    // A replay filtered to another reason moves nothing.
    assert_eq!(replay(ReasonCode::ModelFailure).await, 0);

    // The operator restores the vector and replays.
    backend.features.put_if_absent(vec![(id.clone(), FeatureVector::Pixels(vec![0; 64]))]).await.unwrap();
    assert_eq!(replay(ReasonCode::MissingFeatures).await, 1);
    pipeline::run_all(&settings, CancellationToken::new(), true, &Health::new(4)).await.unwrap();

    let stats = PipelineStats::collect(&backend).await.unwrap();
    assert_eq!(stats.dlq[&StageName::Inference], 0);
    assert_eq!(stats.results + stats.review, 1);
    let stored = backend.results.get_batch(std::slice::from_ref(&id)).await.unwrap();
    assert_eq!(stored[&id].probabilities.len(), 10);
}
