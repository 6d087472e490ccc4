//! Every kind of bad input ends in the ingest DLQ with its own reason code, through the real
//! worker loop, and the good records beside them go on to the features queue.

use std::sync::Arc;
use std::time::Duration;

use sluice_core::ReasonCode;
use sluice_core::backend::{Backend, StreamInput};
use sluice_core::config::{StoreConfig, WorkerConfig};
use sluice_core::envelope::{ContentType, Envelope, RecordId};
use sluice_core::image::ImageCheck;
use sluice_core::model::{FieldSpec, TabularSpec};
use sluice_core::record::DlqEntry;
use sluice_core::testing::images::{jpeg, png};
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{StreamSource, Worker, WorkerReport};
use sluice_ingest::samples::bad_records;
use sluice_ingest::{IngestConfig, IngestStage};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_record_is_dead_lettered_with_its_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() };
    let backend = Backend::open(&store).await.unwrap();
    let config = IngestConfig { inline_limit_bytes: 1024, ..IngestConfig::default() };

    let bad = bad_records(&png(8, 8), config.max_payload_bytes);
    let mut inputs: Vec<StreamInput> = bad.iter().map(|b| b.input.clone()).collect();
    let good_envelope = Envelope::inline(RecordId::parse("good-1").unwrap(), "t", ContentType::Png, png(8, 8));
    inputs.push(StreamInput { partition_key: "good-1".into(), data: good_envelope.to_json() });
    inputs.push(StreamInput { partition_key: "raw-event".into(), data: br#"{"amount": 3}"#.to_vec() });
    // Over the inline limit: goes on as a claim-check.
    inputs.push(StreamInput { partition_key: "big".into(), data: png(200, 200) });
    backend.stream.put_records(inputs).await.unwrap();

    let report = ingest_all(&backend, &store, IngestStage::new(config, Arc::clone(&backend.blobs))).await;
    assert_eq!(report.dead_lettered, bad.len() as u64);

    let dlq = backend.queue(QueueName::IngestDlq).peek(100).await.unwrap();
    let mut reasons: Vec<_> = dlq
        .iter()
        .map(|m| DlqEntry::from_message(StageName::Ingest, m.body.clone(), &m.attributes, 0, 0).reason)
        .collect();
    let mut expected: Vec<_> = bad.iter().map(|b| b.expected).collect();
    reasons.sort_by_key(|r| r.as_str());
    expected.sort_by_key(|r| r.as_str());
    assert_eq!(reasons, expected);
    let unique: std::collections::HashSet<_> = expected.iter().collect();
    assert_eq!(unique.len(), expected.len(), "every bad record has a reason of its own");
    // The DLQ keeps the bytes exactly as produced.
    for m in &dlq {
        assert!(bad.iter().any(|b| b.input.data == m.body), "a DLQ body was rewritten");
    }

    let forwarded = backend.queue(QueueName::Features).peek(100).await.unwrap();
    let envelopes: Vec<Envelope> = forwarded.iter().map(|m| Envelope::from_json(&m.body).unwrap()).collect();
    assert_eq!(envelopes.len(), 3);
    assert!(envelopes.iter().any(|e| e.record_id.as_str() == "good-1"));
    assert!(envelopes.iter().all(|e| e.timestamps.ingested_ms.is_some() && e.trace.is_some()));
    let claim_checked =
        envelopes.iter().find(|e| e.content_type == ContentType::Png && e.record_id.as_str() != "good-1").unwrap();
    match &claim_checked.payload {
        sluice_core::envelope::Payload::ClaimCheck { reference } => {
            assert_eq!(backend.blobs.get(reference).await.unwrap(), png(200, 200));
        }
        other => panic!("a large payload should travel as a claim-check, got {other:?}"),
    }
}

/// A JPEG cut short in transit is refused at ingest however it checks images (`image`'s decoder
/// alone would pass it, the missing rows grey, and the model would judge half a picture); the
/// whole one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jpeg_cut_short_is_refused_by_either_image_check() {
    for image_check in [ImageCheck::Structure, ImageCheck::Decode] {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() };
        let backend = Backend::open(&store).await.unwrap();
        let whole = jpeg(64, 64);
        let cut = whole[..whole.len() / 2].to_vec();
        let inputs = vec![
            StreamInput { partition_key: "whole".into(), data: whole },
            StreamInput { partition_key: "cut".into(), data: cut.clone() },
        ];
        backend.stream.put_records(inputs).await.unwrap();

        let config = IngestConfig { image_check, ..IngestConfig::default() };
        let report = ingest_all(&backend, &store, IngestStage::new(config, Arc::clone(&backend.blobs))).await;
        assert_eq!(report.dead_lettered, 1, "{image_check:?}");
        let dlq = backend.queue(QueueName::IngestDlq).peek(10).await.unwrap();
        let entry = DlqEntry::from_message(StageName::Ingest, dlq[0].body.clone(), &dlq[0].attributes, 0, 0);
        assert_eq!((entry.reason, entry.body), (ReasonCode::TruncatedImage, cut), "{image_check:?}");
        assert_eq!(backend.queue(QueueName::Features).peek(10).await.unwrap().len(), 1, "{image_check:?}");
    }
}

/// Runs an ingest worker until the stream is read to its end.
async fn ingest_all(backend: &Backend, store: &StoreConfig, stage: IngestStage) -> WorkerReport {
    let source = StreamSource::new(backend.stream.consumer("test").await.unwrap());
    let worker = Worker::new(Arc::new(stage), Box::new(source), backend.clone(), WorkerConfig::default(), store);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    for _ in 0..100 {
        if backend.stream.stats().await.unwrap().pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_event_must_carry_the_model_fields_and_a_string_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() };
    let backend = Backend::open(&store).await.unwrap();
    let config = IngestConfig { record_id_field: Some("event_id".into()), ..IngestConfig::default() };
    let spec = TabularSpec {
        fields: vec![
            FieldSpec::Numeric { name: "amount".into(), min: 0.0, max: 10.0, default: 5.0, clamp: false },
            FieldSpec::Numeric { name: "items".into(), min: 0.0, max: 10.0, default: 1.0, clamp: false },
        ],
        required: Vec::new(),
        min_present: None,
    };
    let events: [&[u8]; 5] = [
        br#"{"event_id": 5, "amount": 3}"#,
        br#"{"event_id": "no-fields"}"#,
        br#"{"event_id": "fine", "amount": 3}"#,
        br#"{"amount": 4}"#,
        br#"{"event_id": "too-many", "amount": 3, "items": 999}"#,
    ];
    let inputs = events.iter().map(|e| StreamInput { partition_key: "k".into(), data: e.to_vec() }).collect();
    backend.stream.put_records(inputs).await.unwrap();

    let stage = IngestStage::new(config, Arc::clone(&backend.blobs)).with_tabular(Some(spec));
    let report = ingest_all(&backend, &store, stage).await;
    assert_eq!(report.dead_lettered, 3);
    let dlq = backend.queue(QueueName::IngestDlq).peek(10).await.unwrap();
    let entries: Vec<DlqEntry> =
        dlq.iter().map(|m| DlqEntry::from_message(StageName::Ingest, m.body.clone(), &m.attributes, 0, 0)).collect();
    assert!(entries.iter().all(|e| e.reason == ReasonCode::SchemaMismatch), "{entries:?}");
    assert!(entries.iter().any(|e| e.detail.contains("must be a string")), "{entries:?}");
    assert!(entries.iter().any(|e| e.detail.contains("0 of the model's 2 fields (amount, items)")), "{entries:?}");
    assert!(entries.iter().any(|e| e.detail.contains("\"items\" is 999, outside its range")), "{entries:?}");
    let forwarded = backend.queue(QueueName::Features).peek(10).await.unwrap();
    let ids: Vec<String> =
        forwarded.iter().map(|m| Envelope::from_json(&m.body).unwrap().record_id.to_string()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"fine".to_owned()), "a string id is the record's id: {ids:?}");
}

/// A record that fails as a whole (the stage panicked on it) is dead-lettered under the id it
/// would have had: the one its envelope claims, else its stream position's (a replay then
/// keeps it, not a new position's).
#[tokio::test]
async fn a_record_failing_whole_is_named_as_ingest_would_name_it() {
    use sluice_core::worker::{Delivery, Origin, Stage};
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() };
    let backend = Backend::open(&store).await.unwrap();
    let stage = IngestStage::new(IngestConfig::default(), Arc::clone(&backend.blobs));
    let delivery = |body: Vec<u8>| Delivery {
        body,
        attributes: Default::default(),
        receive_count: 1,
        first_received_ms: None,
        origin: Origin::Stream { shard: "shard-0".into(), sequence: "42".into(), arrived_ms: 0, replay: false },
    };
    let raw = stage.record_id_of(&delivery(png(8, 8))).unwrap();
    assert_eq!(raw, RecordId::from_stream_position("shard-0", "42"));
    let envelope = Envelope::inline(RecordId::parse("claimed-1").unwrap(), "t", ContentType::Png, png(8, 8));
    assert_eq!(stage.record_id_of(&delivery(envelope.to_json())).unwrap().as_str(), "claimed-1");
}
