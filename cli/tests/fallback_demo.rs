//! The demo with the SageMaker XGBoost fallback (the local endpoint on 127.0.0.1): forced, and
//! with Candle failing mid-run. Every record is still accounted for, and results name their backend.

mod common;

use std::process::Command;

use common::{bin, demo_summary, dummy_aws_credentials, test_env};
use sluice_core::testing::xgboost_endpoint;

fn demo(extra_env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(bin("sluice"));
    dummy_aws_credentials(test_env(&mut cmd))
        .envs(extra_env.iter().copied())
        .args(["demo", "--json", "--sagemaker-endpoint", "digits", "--sagemaker-endpoint-url"])
        .arg(xgboost_endpoint().url)
        .args(args);
    let summary = demo_summary(&mut cmd);
    let dlq: u64 = summary["dlq"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(dlq, 6, "only the six corrupt records are dead-lettered: {summary}");
    summary
}

#[test]
fn the_forced_fallback_serves_every_record() {
    let summary = demo(&[], &["--inference-backend", "sagemaker"]);
    assert_eq!(summary["served_by"], serde_json::json!({ "sagemaker-xgboost": 355 }), "{summary}");
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.95, "{summary}");
}

#[test]
fn candle_failing_mid_run_hands_over_to_the_fallback() {
    let failing = [
        ("SLUICE__INFERENCE__BATCH_SIZE", "16"),
        ("SLUICE__INFERENCE__INJECT_FAILURES__AFTER_BATCHES", "3"),
        ("SLUICE__INFERENCE__INJECT_FAILURES__BATCHES", "1000"),
    ];
    let summary = demo(&failing, &[]);
    let served = summary["served_by"].as_object().unwrap();
    let candle = served.get("candle-cpu").and_then(|v| v.as_u64()).unwrap_or(0);
    let fallback = served.get("sagemaker-xgboost").and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(candle > 0 && fallback > 0, "both served: {summary}");
    assert_eq!(candle + fallback, 355, "{summary}");
}
