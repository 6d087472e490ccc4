//! `sluice.example.toml` lists every key with its default: it must parse into every section and
//! match what the code does without it.

use std::path::Path;

use sluice_core::config::{ModelConfig, Settings, StoreConfig, WorkerConfig};
use sluice_core::telemetry::health::TelemetryConfig;
use sluice_features::FeaturesConfig;
use sluice_inference::InferenceConfig;
use sluice_ingest::IngestConfig;
use sluice_monitor::MonitorConfig;
use sluice_results::ResultsConfig;

#[test]
fn the_example_config_is_complete_and_states_the_defaults() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml");
    let settings = Settings::load(Some(&example)).unwrap();
    assert_eq!(settings.store().unwrap(), StoreConfig::default());
    assert_eq!(settings.worker().unwrap(), WorkerConfig::default());
    assert_eq!(settings.model().unwrap(), ModelConfig::default());
    assert_eq!(settings.telemetry().unwrap(), TelemetryConfig::default());
    assert_eq!(settings.section::<IngestConfig>("ingest").unwrap(), IngestConfig::default());
    assert_eq!(settings.section::<FeaturesConfig>("features").unwrap(), FeaturesConfig::default());
    assert_eq!(settings.section::<InferenceConfig>("inference").unwrap(), InferenceConfig::default());
    assert_eq!(settings.section::<ResultsConfig>("results").unwrap(), ResultsConfig::default());
    assert_eq!(settings.section::<MonitorConfig>("monitor").unwrap(), MonitorConfig::default());
}

/// The example holds exactly the sections there are, and a section of another name (a typo) is
/// refused with where it came from, not passed over with its settings.
#[test]
fn a_section_of_no_known_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let sections: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix('[')?.split([']', '.']).next()).collect();
    assert_eq!(sections, sluice_core::config::SECTIONS.into_iter().collect());

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, text.replace("[inference]", "[inferenc]")).unwrap();
    let err = Settings::load(Some(&typo)).unwrap_err().to_string();
    assert!(err.contains("unknown section \"inferenc\"") && err.contains("typo.toml"), "{err}");
}

/// Every key there is appears in the example, set to its default or commented out.
#[test]
fn the_example_names_every_key() {
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml")).unwrap();
    fn keys(value: &serde_json::Value, out: &mut Vec<String>) {
        if let Some(map) = value.as_object() {
            for (key, inner) in map {
                out.push(key.clone());
                keys(inner, out);
            }
        }
    }
    let mut all = Vec::new();
    for section in [
        serde_json::to_value(StoreConfig::default()).unwrap(),
        serde_json::to_value(WorkerConfig::default()).unwrap(),
        serde_json::to_value(ModelConfig::default()).unwrap(),
        serde_json::to_value(TelemetryConfig::default()).unwrap(),
        serde_json::to_value(IngestConfig::default()).unwrap(),
        serde_json::to_value(FeaturesConfig::default()).unwrap(),
        serde_json::to_value(InferenceConfig::default()).unwrap(),
        serde_json::to_value(ResultsConfig::default()).unwrap(),
        serde_json::to_value(MonitorConfig::default()).unwrap(),
    ] {
        keys(&section, &mut all);
    }
    let written = |key: &str| {
        example.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
                || l.starts_with(&format!("[{key}]"))
                || l.contains(&format!(".{key}]"))
        })
    };
    let missing: Vec<&String> = all.iter().filter(|k| !written(k)).collect();
    assert!(missing.is_empty(), "sluice.example.toml lacks {missing:?}");
}
