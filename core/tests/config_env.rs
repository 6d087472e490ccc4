//! `SLUICE__SECTION__KEY` variables are read as written: text stays text, numbers and booleans
//! are read where a setting is one. Its own test binary: it sets the process's environment,
//! which no other test may read meanwhile.

use serde::Deserialize;
use sluice_core::config::Settings;

#[derive(Debug, Deserialize)]
struct Inference {
    sagemaker: Sagemaker,
    inject_failures: Drill,
}

#[derive(Debug, Deserialize)]
struct Sagemaker {
    model_version: String,
    model_name: String,
}

#[derive(Debug, Deserialize)]
struct Drill {
    panic: bool,
}

#[derive(Debug, Deserialize)]
struct Monitor {
    #[serde(deserialize_with = "sluice_core::config::decimal")]
    accuracy_baseline: f64,
}

#[test]
#[allow(unsafe_code)] // setting the environment; sound as this test is the binary's only one
fn settings_from_the_environment_are_read_as_written() {
    let set = [
        ("SLUICE__INFERENCE__SAGEMAKER__MODEL_VERSION", "1.10"),
        ("SLUICE__INFERENCE__SAGEMAKER__MODEL_NAME", "007"),
        ("SLUICE__INFERENCE__INJECT_FAILURES__PANIC", "true"),
        ("SLUICE__STORE__AWS__PREFIX", "2024"),
        ("SLUICE__STORE__AWS", "{region=eu-west-1}"),
        ("SLUICE__STORE__BACKEND", " aws "),
        ("SLUICE__MONITOR__ACCURACY_BASELINE", "0.85"),
        ("SLUICE__STORE__SHARDS", "2"),
        ("SLUICE__STORE__AWS__CLAIM_CHECK_BUCKETS", "[inbox, \"2025\"]"),
        ("SLUICE__WORKER__POLL_WAIT_MS", "0"),
    ];
    for (name, value) in set {
        // SAFETY: the only test in this binary, so no other thread reads the environment.
        unsafe { std::env::set_var(name, value) };
    }
    let settings = Settings::load(None).unwrap();

    let inference: Inference = settings.section("inference").unwrap();
    assert_eq!(inference.sagemaker.model_version, "1.10", "not the number 1.1");
    assert_eq!(inference.sagemaker.model_name, "007", "not the number 7");
    assert!(inference.inject_failures.panic);

    let monitor: Monitor = settings.section("monitor").unwrap();
    assert_eq!(monitor.accuracy_baseline, 0.85, "not the f32 0.85 widened");

    let store = settings.store().unwrap();
    assert_eq!(store.backend, sluice_core::config::BackendKind::Aws, "trimmed");
    assert_eq!(store.aws.prefix, "2024");
    assert_eq!(store.aws.region.as_deref(), Some("eu-west-1"), "a table beside one of its keys: both kept");
    assert_eq!(store.shards, 2);
    assert_eq!(store.aws.claim_check_buckets, ["inbox", "2025"]);

    let refused = settings.worker().unwrap_err().to_string();
    assert!(refused.contains("SLUICE__WORKER__POLL_WAIT_MS") && refused.contains("0 ms: at least 1000"), "{refused}");
}
