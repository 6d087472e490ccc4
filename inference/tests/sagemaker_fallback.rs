//! The SageMaker XGBoost fallback against the local endpoint (`deploy/sagemaker/local_endpoint.py`
//! on 127.0.0.1, serving the model `train_xgboost.py` trained with the real xgboost library).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::delivery;
use sluice_core::ReasonCode;
use sluice_core::backend::Backend;
use sluice_core::config::{Settings, StoreConfig};
use sluice_core::envelope::RecordId;
use sluice_core::record::InferredRecord;
use sluice_core::testing::xgboost_endpoint;
use sluice_core::vector::FeatureVector;
use sluice_core::worker::{Delivery, Outcome, Stage};
use sluice_inference::InferenceStage;

fn read_rows(path: &Path) -> Vec<Vec<f32>> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect()
}

/// Settings for a stage whose fallback is the local endpoint named `endpoint`.
fn settings(endpoint: &str) -> Settings {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    Settings::load(None)
        .unwrap()
        .set("model.dir", model)
        .set("inference.device", "cpu")
        .set("inference.sagemaker.endpoint_name", endpoint)
        .set("inference.sagemaker.endpoint_url", xgboost_endpoint().url)
        .set("store.aws.region", "us-east-1")
        .set("store.aws.access_key_id", "testing")
        .set("store.aws.secret_access_key", "testing")
}

/// An embedded store holding the held-out digits' vectors as `train_xgboost.py` computed them,
/// and xgboost's own probabilities for each.
async fn held_out(dir: &Path) -> (Backend, Vec<String>, Vec<Vec<f32>>) {
    let endpoint = xgboost_endpoint();
    let features = read_rows(&endpoint.model_dir.join("test_features.csv"));
    let expected = read_rows(&endpoint.model_dir.join("test_predictions.csv"));
    assert_eq!(features.len(), 355);
    let backend = Backend::open(&StoreConfig { path: dir.join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    let ids: Vec<String> = (0..features.len()).map(|i| format!("digit-{i:03}")).collect();
    let rows = ids
        .iter()
        .map(|id| RecordId::parse(id).unwrap())
        .zip(features.into_iter().map(FeatureVector::Values))
        .collect();
    backend.features.put_if_absent(rows).await.unwrap();
    (backend, ids, expected)
}

fn forwarded(outcome: &Outcome) -> InferredRecord {
    let Outcome::Forward(messages) = outcome else { panic!("expected a forward, got {outcome:?}") };
    InferredRecord::from_json(&messages[0].1.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forced_fallback_returns_xgboosts_own_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, ids, expected) = held_out(dir.path()).await;
    // Small requests, so that a batch is split across several InvokeEndpoint calls.
    let settings =
        settings("digits").set("inference.backend", "sagemaker").set("inference.sagemaker.max_payload_bytes", 20_000);
    let stage = InferenceStage::build(&settings, &backend).unwrap();
    // No Candle calls to time: batches take the configured most from the start.
    assert_eq!(stage.batch_policy().max_size, 256);

    let mut checked = 0;
    for (chunk, want) in ids.chunks(128).zip(expected.chunks(128)) {
        let outcomes = stage.process(&chunk.iter().map(|id| delivery(id)).collect::<Vec<_>>()).await;
        assert_eq!(outcomes.len(), chunk.len());
        for (outcome, want) in outcomes.iter().zip(want) {
            let p = forwarded(outcome).prediction;
            assert_eq!((p.model.as_str(), p.backend.as_str()), ("digits-xgboost", "sagemaker-xgboost"));
            assert_eq!(p.probabilities.len(), want.len());
            for (got, want) in p.probabilities.iter().zip(want) {
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "{got} != {want}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 355);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candle_failures_go_to_the_fallback_and_the_breaker_closes_again() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, ids, _) = held_out(dir.path()).await;
    // Candle batches 3 to 8 fail; two failures in a window of four open the breaker for 200 ms.
    let settings = settings("digits")
        .set("inference.inject_failures.after_batches", 2)
        .set("inference.inject_failures.batches", 6)
        .set("inference.breaker.window", 4)
        .set("inference.breaker.min_batches", 2)
        .set("inference.breaker.open_ms", 200);
    let stage = InferenceStage::build(&settings, &backend).unwrap();

    let mut served = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for chunk in ids.chunks(8).cycle() {
        let outcomes = stage.process(&chunk.iter().map(|id| delivery(id)).collect::<Vec<_>>()).await;
        let backends: Vec<String> = outcomes.iter().map(|o| forwarded(o).prediction.backend).collect();
        assert!(backends.windows(2).all(|w| w[0] == w[1]), "one backend per batch: {backends:?}");
        served.push(backends[0].clone());
        let candle_again = served.iter().skip_while(|b| *b == "candle-cpu").any(|b| b == "candle-cpu");
        if candle_again && served.len() >= 12 {
            break;
        }
        assert!(Instant::now() < deadline, "Candle never served again: {served:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served[..2], ["candle-cpu", "candle-cpu"], "{served:?}");
    let fallback = served.iter().filter(|b| *b == "sagemaker-xgboost").count();
    // Six injected failures, each answered by the fallback; more batches than that went there
    // because the open breaker sent them without trying Candle.
    assert!(fallback > 6, "{served:?}");
    assert_eq!(served.last().unwrap(), "candle-cpu", "{served:?}");
}

/// A record the model panics on is no outage: its batch goes back to be run a record at a time
/// (Candle takes the others), the record that panics alone goes to the fallback, and the breaker
/// stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_model_panics_on_alone_goes_to_the_fallback_and_its_batch_to_candle() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, ids, _) = held_out(dir.path()).await;
    // The batch (Candle's first call) and its first record alone (the second) panic.
    let settings = settings("digits")
        .set("inference.inject_failures.batches", 2)
        .set("inference.inject_failures.panic", true)
        .set("inference.breaker.window", 2)
        .set("inference.breaker.min_batches", 1);
    let stage = InferenceStage::build(&settings, &backend).unwrap();
    let batch: Vec<Delivery> = ids[..3].iter().map(|id| delivery(id)).collect();
    let backends: Vec<String> = stage.process(&batch).await.iter().map(|o| forwarded(o).prediction.backend).collect();
    assert_eq!(backends, ["sagemaker-xgboost", "candle-cpu", "candle-cpu"]);
    // Had the panics counted, two failures in a window of two would have opened the breaker.
    let again: Vec<String> = stage.process(&batch).await.iter().map(|o| forwarded(o).prediction.backend).collect();
    assert_eq!(again, ["candle-cpu"; 3], "the breaker stayed closed");
}

/// A batch Candle failed on for the moment, which the fallback then refuses (a ModelError), is
/// retried, not dead-lettered: Candle takes it on the next receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_fallback_refuses_while_candle_is_down_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, ids, _) = held_out(dir.path()).await;
    let settings = settings("broken-model")
        .set("inference.inject_failures.after_batches", 0)
        .set("inference.inject_failures.batches", 1);
    let stage = InferenceStage::build(&settings, &backend).unwrap();
    let batch: Vec<Delivery> = ids[..3].iter().map(|id| delivery(id)).collect();
    for outcome in stage.process(&batch).await {
        let Outcome::Failed { error, .. } = &outcome else { panic!("expected a failure: {outcome:?}") };
        assert_eq!((error.code(), error.is_retryable()), (ReasonCode::FallbackFailure, true), "{error}");
        assert!(error.detail().contains("ModelError") && error.detail().contains("Candle failed first"), "{error}");
    }
    for outcome in stage.process(&batch).await {
        assert_eq!(forwarded(&outcome).prediction.backend, "candle-cpu");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_errors_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, ids, _) = held_out(dir.path()).await;
    let batch: Vec<Delivery> = ids[..3].iter().map(|id| delivery(id)).collect();
    let (fallback, deployment) = (ReasonCode::FallbackFailure, ReasonCode::Misconfigured);
    let endpoints = [
        // The container's answer to this input, and the container failing for the moment.
        ("broken-model", fallback, false),
        ("crashing-model", fallback, true),
        ("unavailable-now", fallback, true),
        ("throttled-now", fallback, true),
        ("gateway-timeout", fallback, true),
        // The deployment's to fix: the worker stops and the records wait.
        ("missing-endpoint", deployment, false),
        ("denied-endpoint", deployment, false),
    ];
    for (endpoint, code, retryable) in endpoints {
        let settings = settings(endpoint).set("inference.backend", "sagemaker");
        let stage = InferenceStage::build(&settings, &backend).unwrap();
        for outcome in stage.process(&batch).await {
            let Outcome::Failed { error, .. } = &outcome else { panic!("{endpoint}: expected a failure: {outcome:?}") };
            assert_eq!(error.code(), code, "{endpoint}: {error}");
            assert_eq!(error.is_retryable(), retryable, "{endpoint}: {error}");
        }
    }
}

/// A bundle names its fallback endpoint in model.toml; the configuration need not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_names_its_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, ids, expected) = held_out(dir.path()).await;
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    std::fs::copy(model.join("model.safetensors"), bundle.join("model.safetensors")).unwrap();
    let manifest = std::fs::read_to_string(model.join("model.toml")).unwrap();
    std::fs::write(bundle.join("model.toml"), format!("{manifest}\n[fallback]\nendpoint = \"digits\"\n")).unwrap();
    let settings = Settings::load(None)
        .unwrap()
        .set("model.dir", &bundle)
        .set("inference.backend", "sagemaker")
        .set("inference.sagemaker.endpoint_url", xgboost_endpoint().url)
        .set("store.aws.region", "us-east-1")
        .set("store.aws.access_key_id", "testing")
        .set("store.aws.secret_access_key", "testing");
    let stage = InferenceStage::build(&settings, &backend).unwrap();
    let outcomes = stage.process(&ids[..2].iter().map(|id| delivery(id)).collect::<Vec<_>>()).await;
    for (outcome, want) in outcomes.iter().zip(&expected) {
        let p = forwarded(outcome).prediction;
        assert_eq!(p.backend, "sagemaker-xgboost");
        assert!((p.probabilities[0] - want[0]).abs() <= 1e-6, "{:?} != {want:?}", p.probabilities);
    }
}
