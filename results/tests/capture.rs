//! Prediction capture from the results stage, on both backends: every stored result is
//! captured (redeliveries again, read back once), tabular records with their feature vectors,
//! sampling by record id, and on AWS never more than one S3 request per batch.

use std::path::Path;

use sluice_core::backend::aws::RequestCounter;
use sluice_core::backend::{Backend, Receipt};
use sluice_core::capture::{CaptureRecord, parse_lines};
use sluice_core::config::{Settings, StoreConfig};
use sluice_core::envelope::{ContentType, Envelope, RecordId};
use sluice_core::record::{InferredRecord, Prediction};
use sluice_core::vector::FeatureVector;
use sluice_core::worker::{Delivery, Origin, Stage};
use sluice_results::ResultsStage;

fn delivery(id: &str, content_type: ContentType) -> Delivery {
    let envelope = Envelope::inline(RecordId::parse(id).unwrap(), "test", content_type, Vec::new());
    let probabilities = (0..10).map(|i| if i == 3 { 0.91 } else { 0.01 }).collect();
    let prediction = Prediction {
        probabilities,
        model: "digits-cnn".into(),
        model_version: "1.0.0".into(),
        backend: "candle-cpu".into(),
    };
    Delivery {
        body: InferredRecord { envelope, prediction }.to_json(),
        attributes: Default::default(),
        receive_count: 1,
        first_received_ms: None,
        origin: Origin::Queue(Receipt(id.into())),
    }
}

fn settings() -> Settings {
    Settings::load(None).unwrap().set("model.dir", Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits"))
}

fn batch(prefix: &str, n: usize, content_type: ContentType) -> Vec<Delivery> {
    (0..n).map(|i| delivery(&format!("{prefix}-{i}"), content_type)).collect()
}

async fn captured(backend: &Backend) -> Vec<CaptureRecord> {
    let mut skipped = 0;
    let chunks = backend.capture.read(0, u64::MAX).await.unwrap();
    let records: Vec<CaptureRecord> = chunks.iter().flat_map(|c| parse_lines(c, &mut skipped)).collect();
    assert_eq!(skipped, 0);
    records
}

async fn captures_every_result_a_chunk_per_batch_at_most((backend, requests): (Backend, RequestCounter)) {
    // Due at every batch: the most requests capture can cost.
    let stage = ResultsStage::build(&settings().set("results.capture.flush_after_ms", 0), &backend).unwrap();
    stage.process(&batch("img", 30, ContentType::Png)).await;
    stage.process(&batch("img", 30, ContentType::Png)).await; // redelivered: captured again
    let vector = vec![0.25_f32; 64];
    backend
        .features
        .put_if_absent(
            (0..5)
                .map(|i| (RecordId::parse(format!("evt-{i}")).unwrap(), FeatureVector::Values(vector.clone())))
                .collect(),
        )
        .await
        .unwrap();
    stage.process(&batch("evt", 5, ContentType::Json)).await;
    // The flusher writes what the batches made due; the stop, what is left.
    stage.finish().await;
    let sent = requests.snapshot();
    if backend.kind() == sluice_core::config::BackendKind::Aws {
        let puts = sent.get("S3.PutObject").copied().unwrap_or(0);
        assert!((1..=3).contains(&puts), "three batches, an object each at most: {sent:?}");
    }
    // A chunk a batch at most (the embedded store appends them to one file, read as one).
    let chunks = backend.capture.read(0, u64::MAX).await.unwrap().len();
    assert!((1..=3).contains(&chunks), "three batches, {chunks} chunks");

    let records = captured(&backend).await;
    assert_eq!(records.len(), 65, "the redelivered batch is captured again");
    let unique: std::collections::HashSet<&str> = records.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(unique.len(), 35);
    let event = records.iter().find(|r| r.record_id.as_str() == "evt-0").unwrap();
    assert_eq!(event.features.as_deref(), Some(vector.as_slice()), "tabular records carry their vectors");
    assert_eq!(event.content_type, "application/json");
    assert!(records.iter().filter(|r| r.content_type == "image/png").all(|r| r.features.is_none()));
    assert_eq!((event.label.as_str(), event.model.as_str()), ("3", "digits-cnn"));
}

async fn gathers_lines_until_due_and_writes_them_when_the_worker_stops((backend, _): (Backend, RequestCounter)) {
    let stage = ResultsStage::build(&settings().set("results.capture.sample_rate", 0.5), &backend).unwrap();
    for b in 0..4 {
        stage.process(&batch(&format!("b{b}"), 25, ContentType::Png)).await;
    }
    assert!(captured(&backend).await.is_empty(), "nothing is due yet: 5 s, 1 MiB");
    stage.finish().await;
    let records = captured(&backend).await;
    assert_eq!(backend.capture.read(0, u64::MAX).await.unwrap().len(), 1, "one chunk for four batches");
    assert!((25..75).contains(&records.len()), "about half of 100 sampled: {}", records.len());
    assert!(records.iter().all(|r| sluice_core::capture::sampled(&r.record_id, 0.5)));
}

async fn embedded(dir: &tempfile::TempDir) -> (Backend, RequestCounter) {
    let config = StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() };
    (Backend::open(&config).await.unwrap(), RequestCounter::default())
}

/// A backend on the AWS stand-in whose requests are counted apart from other tests'.
async fn aws() -> (Backend, RequestCounter) {
    let config = sluice_core::testing::aws_store_config(&sluice_core::testing::unique_prefix("capture"));
    sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
    let requests = RequestCounter::default();
    (sluice_core::backend::aws::open(&config, requests.clone()).await.unwrap(), requests)
}

#[tokio::test]
async fn embedded_captures_every_result() {
    let dir = tempfile::tempdir().unwrap();
    captures_every_result_a_chunk_per_batch_at_most(embedded(&dir).await).await;
}

#[tokio::test]
async fn embedded_capture_is_gathered_and_sampled() {
    let dir = tempfile::tempdir().unwrap();
    gathers_lines_until_due_and_writes_them_when_the_worker_stops(embedded(&dir).await).await;
}

#[tokio::test]
async fn aws_captures_every_result_at_most_one_object_per_batch() {
    captures_every_result_a_chunk_per_batch_at_most(aws().await).await;
}

#[tokio::test]
async fn aws_capture_is_gathered_and_sampled() {
    gathers_lines_until_due_and_writes_them_when_the_worker_stops(aws().await).await;
}
