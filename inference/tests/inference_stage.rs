//! The inference stage on the shipped digits bundle.

mod common;

use std::path::Path;

use common::delivery;
use sluice_core::ReasonCode;
use sluice_core::backend::Backend;
use sluice_core::config::{Settings, StoreConfig};
use sluice_core::envelope::RecordId;
use sluice_core::record::InferredRecord;
use sluice_core::topology::QueueName;
use sluice_core::vector::FeatureVector;
use sluice_core::worker::{Outcome, Stage};
use sluice_inference::InferenceStage;

/// A "1": a vertical bar down the middle of an 8×8 image, intensities 0..1.
fn one() -> FeatureVector {
    FeatureVector::Values((0..64).map(|i| if (3..5).contains(&(i % 8)) { 1.0 } else { 0.0 }).collect())
}

/// The stage on the shipped bundle, over a fresh embedded store (kept while the directory lives).
async fn stage() -> (tempfile::TempDir, Backend, InferenceStage) {
    stage_with(|settings| settings).await
}

/// [`stage`], its settings changed by `configure`.
async fn stage_with(configure: impl FnOnce(Settings) -> Settings) -> (tempfile::TempDir, Backend, InferenceStage) {
    let dir = tempfile::tempdir().unwrap();
    let backend =
        Backend::open(&StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    let settings = Settings::load(None).unwrap().set("model.dir", model).set("inference.device", "cpu");
    let stage = InferenceStage::build(&configure(settings), &backend).unwrap();
    (dir, backend, stage)
}

#[tokio::test]
async fn predicts_a_batch_and_classifies_missing_or_misshapen_vectors() {
    let (_dir, backend, stage) = stage().await;

    let id = |s: &str| RecordId::parse(s).unwrap();
    backend
        .features
        .put_if_absent(vec![
            (id("a"), one()),
            (id("b"), FeatureVector::Values(vec![0.0; 64])),
            (id("short"), FeatureVector::Pixels(vec![5; 10])),
        ])
        .await
        .unwrap();
    let outcomes = stage.process(&[delivery("a"), delivery("missing"), delivery("b"), delivery("short")]).await;
    assert_eq!(outcomes.len(), 4);

    for i in [0, 2] {
        let Outcome::Forward(messages) = &outcomes[i] else { panic!("expected a forward, got {:?}", outcomes[i]) };
        assert_eq!(messages[0].0, QueueName::Results);
        let record = InferredRecord::from_json(&messages[0].1.body).unwrap();
        let p = &record.prediction;
        assert_eq!(p.probabilities.len(), 10);
        assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert_eq!(
            (p.model.as_str(), p.model_version.as_str(), p.backend.as_str()),
            ("digits-cnn", "1.0.0", "candle-cpu")
        );
        assert!(record.envelope.timestamps.inferred_ms.is_some());
    }
    let Outcome::Forward(messages) = &outcomes[0] else { unreachable!() };
    let p = InferredRecord::from_json(&messages[0].1.body).unwrap().prediction.probabilities;
    let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(best, 1, "a vertical bar is a one: {p:?}");

    let code = |o: &Outcome| match o {
        Outcome::Failed { error, .. } if !error.is_retryable() => error.code(),
        other => panic!("expected a permanent failure, got {other:?}"),
    };
    assert_eq!(code(&outcomes[1]), ReasonCode::MissingFeatures);
    assert_eq!(code(&outcomes[3]), ReasonCode::FeatureShapeMismatch);
}

/// A record whose vector the features stage made for another model input (a bundle changed
/// while the queue held records featured by the old one) is refused, for a worker still serving
/// that bundle; one made for this bundle's input, or sent without saying, is scored.
#[tokio::test]
async fn a_record_featured_for_another_input_is_refused() {
    use sluice_core::record::message_attr::INPUT_SPEC;
    let (_dir, backend, stage) = stage().await;
    let ids = ["ours", "theirs", "unsaid"].map(|s| RecordId::parse(s).unwrap());
    backend.features.put_if_absent(ids.iter().map(|id| (id.clone(), one())).collect()).await.unwrap();
    let bundle = sluice_core::model::ModelBundle::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits"));
    let said = |id: &str, spec: String| {
        let mut d = delivery(id);
        d.attributes.insert(INPUT_SPEC.to_owned(), spec);
        d
    };
    let batch = [
        said("ours", bundle.unwrap().manifest.input.fingerprint()),
        said("theirs", "0123456789abcdef".into()),
        delivery("unsaid"),
    ];
    let outcomes = stage.process(&batch).await;
    assert!(matches!(&outcomes[0], Outcome::Forward(_)), "{:?}", outcomes[0]);
    assert!(matches!(&outcomes[2], Outcome::Forward(_)), "{:?}", outcomes[2]);
    let Outcome::Failed { error, record_id } = &outcomes[1] else { panic!("{:?}", outcomes[1]) };
    assert_eq!((error.code(), error.is_retryable()), (ReasonCode::FeatureShapeMismatch, true), "{error}");
    assert!(error.detail().contains("0123456789abcdef"), "{error}");
    assert_eq!(record_id.as_ref(), Some(&ids[1]));
}

/// A record the model panics on does not take its batch with it: the batch is run a record at a
/// time, those the model takes alone are scored, and the one it panics on alone is dead-lettered
/// at once (it would panic on every receive).
#[tokio::test]
async fn a_panic_in_the_model_is_kept_to_the_record_that_causes_it() {
    // The first model call (the whole batch) and the second (its first record, alone) panic.
    let (_dir, backend, stage) = stage_with(|settings| {
        settings.set("inference.inject_failures.batches", 2).set("inference.inject_failures.panic", true)
    })
    .await;
    let records = ["poison", "b", "c"].map(|id| (RecordId::parse(id).unwrap(), one()));
    backend.features.put_if_absent(records.to_vec()).await.unwrap();

    let outcomes = stage.process(&[delivery("poison"), delivery("b"), delivery("c")]).await;
    assert_eq!(outcomes.len(), 3);
    match &outcomes[0] {
        Outcome::Failed { error, .. } => {
            assert!(!error.is_retryable(), "{error}");
            assert_eq!(error.code(), ReasonCode::ModelFailure);
            assert!(error.detail().contains("panicked") && error.detail().contains("injected panic"), "{error}");
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    for outcome in &outcomes[1..] {
        let Outcome::Forward(messages) = outcome else { panic!("expected a forward, got {outcome:?}") };
        let p = InferredRecord::from_json(&messages[0].1.body).unwrap().prediction.probabilities;
        let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(best, 1, "scored as it would be in any batch: {p:?}");
    }
    assert_eq!(stage.batch_policy().max_size, 64, "the one-record re-runs are no batches to size by");
}

/// At-least-once transport can put one record in a batch twice: both copies are scored (the
/// result store keeps one), neither is dead-lettered for a vector the first copy used up.
#[tokio::test]
async fn a_record_delivered_twice_in_one_batch_is_scored_both_times() {
    let (_dir, backend, stage) = stage().await;
    backend.features.put_if_absent(vec![(RecordId::parse("twice").unwrap(), one())]).await.unwrap();

    let outcomes = stage.process(&[delivery("twice"), delivery("twice")]).await;
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Forward(_))), "{outcomes:?}");
}

/// Pixels are normalised on the model's device, values (stored before pixels were) are taken as
/// they are: the same image either way gets the same probabilities, in a batch of its own kind or
/// in a mixed one.
#[tokio::test]
async fn pixels_and_values_of_one_image_get_the_same_prediction() {
    let (_dir, backend, stage) = stage().await;
    let FeatureVector::Values(values) = one() else { unreachable!() };
    let pixels = FeatureVector::Pixels(values.iter().map(|&v| (v * 255.0) as u8).collect());
    let id = |s: &str| RecordId::parse(s).unwrap();
    backend
        .features
        .put_if_absent(vec![(id("pixels"), pixels.clone()), (id("pixels-2"), pixels), (id("values"), one())])
        .await
        .unwrap();
    let probabilities = |outcome: &Outcome| match outcome {
        Outcome::Forward(messages) => InferredRecord::from_json(&messages[0].1.body).unwrap().prediction.probabilities,
        other => panic!("expected a forward, got {other:?}"),
    };
    let alone = probabilities(&stage.process(&[delivery("pixels")]).await[0]);
    let mixed = stage.process(&[delivery("pixels-2"), delivery("values")]).await;
    for other in [probabilities(&mixed[0]), probabilities(&mixed[1])] {
        let worst = alone.iter().zip(&other).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "differ by {worst}: {alone:?} vs {other:?}");
    }
}

#[tokio::test]
async fn batches_grow_as_the_model_is_timed_and_stay_within_the_configured_most() {
    let (_dir, backend, stage) = stage().await;
    let ids: Vec<String> = (0..960).map(|i| format!("digit-{i:03}")).collect();
    let vectors = ids.iter().map(|i| (RecordId::parse(i).unwrap(), one())).collect();
    backend.features.put_if_absent(vectors).await.unwrap();

    // Untimed, the stage starts at 64; the digits CNN takes microseconds a record, so each timed
    // batch lets the next one double, up to `inference.batch_size` (256 by default).
    let mut sizes = Vec::new();
    let mut next = ids.iter();
    for _ in 0..5 {
        let size = stage.batch_policy().max_size;
        sizes.push(size);
        let batch: Vec<_> = next.by_ref().take(size).map(|id| delivery(id)).collect();
        let outcomes = stage.process(&batch).await;
        assert_eq!(outcomes.len(), size);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Forward(_))), "{outcomes:?}");
    }
    assert_eq!(sizes, [64, 128, 256, 256, 256]);
}

/// A feature store that cannot answer.
struct Unreachable;

#[async_trait::async_trait]
impl sluice_core::backend::FeatureStore for Unreachable {
    async fn put_if_absent(&self, _: Vec<(RecordId, FeatureVector)>) -> sluice_core::Result<()> {
        unreachable!("inference only reads")
    }

    async fn get_batch(
        &self,
        _: &[RecordId],
    ) -> sluice_core::Result<std::collections::HashMap<RecordId, sluice_core::backend::StoredVector>> {
        Err(sluice_core::SluiceError::retryable(ReasonCode::StoreBusy, "throttled"))
    }

    async fn refresh(&self, _: &[RecordId]) -> sluice_core::Result<()> {
        unreachable!("inference only reads")
    }
}

/// A feature store that cannot answer fails the records it was asked about, for another try;
/// a message already found unreadable keeps its own reason (it is dead-lettered at once).
#[tokio::test]
async fn a_feature_store_that_cannot_answer_leaves_unreadable_messages_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let mut backend =
        Backend::open(&StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    backend.features = std::sync::Arc::new(Unreachable);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    let settings = Settings::load(None).unwrap().set("model.dir", model).set("inference.device", "cpu");
    let stage = InferenceStage::build(&settings, &backend).unwrap();
    let mut unreadable = delivery("x");
    unreadable.body = b"not an envelope".to_vec();
    let outcomes = stage.process(&[delivery("a"), unreadable]).await;
    let failed = |o: &Outcome| match o {
        Outcome::Failed { error, .. } => (error.code(), error.is_retryable()),
        other => panic!("expected a failure, got {other:?}"),
    };
    assert_eq!(failed(&outcomes[0]), (ReasonCode::StoreBusy, true));
    assert_eq!(failed(&outcomes[1]), (ReasonCode::MalformedMessage, false));
}

/// Weights gone to NaN (a training run that diverged) load as any others would; the stage
/// refuses to start on them rather than dead-letter every record for output it cannot judge.
#[tokio::test]
async fn a_model_whose_weights_are_not_numbers_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    std::fs::copy(model.join("model.toml"), bundle.join("model.toml")).unwrap();
    let mut weights =
        candle_core::safetensors::load(model.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    for tensor in weights.values_mut() {
        *tensor = (tensor.ones_like().unwrap() * f64::NAN).unwrap();
    }
    candle_core::safetensors::save(&weights, bundle.join("model.safetensors")).unwrap();
    let backend =
        Backend::open(&StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    let settings = Settings::load(None).unwrap().set("model.dir", &bundle).set("inference.device", "cpu");
    let refused = InferenceStage::build(&settings, &backend).err().expect("NaN weights are refused").to_string();
    assert!(refused.contains("not finite"), "{refused}");
}
