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

/// Every key there is appears in the example under its own table, set to its default or
/// commented out.
#[test]
fn the_example_names_every_key() {
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml")).unwrap();
    // The keys written under each table, commented out or not.
    let mut tables: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut table = String::new();
    for line in example.lines() {
        let line = line.trim_start_matches(['#', ' ']);
        if let Some(name) = line.strip_prefix('[').and_then(|rest| rest.split(']').next()) {
            table = name.to_owned();
        } else if let Some((key, _)) = line.split_once('=') {
            tables.entry(table.clone()).or_default().push(key.trim().to_owned());
        }
    }
    fn check(
        table: &str,
        value: &serde_json::Value,
        tables: &std::collections::BTreeMap<String, Vec<String>>,
        missing: &mut Vec<String>,
    ) {
        for (key, inner) in value.as_object().unwrap() {
            if inner.is_object() {
                check(&format!("{table}.{key}"), inner, tables, missing);
            } else if !tables.get(table).is_some_and(|keys| keys.contains(key)) {
                missing.push(format!("{table}.{key}"));
            }
        }
    }
    let mut missing = Vec::new();
    for (table, section) in [
        ("store", serde_json::to_value(StoreConfig::default()).unwrap()),
        ("worker", serde_json::to_value(WorkerConfig::default()).unwrap()),
        ("model", serde_json::to_value(ModelConfig::default()).unwrap()),
        ("telemetry", serde_json::to_value(TelemetryConfig::default()).unwrap()),
        ("ingest", serde_json::to_value(IngestConfig::default()).unwrap()),
        ("features", serde_json::to_value(FeaturesConfig::default()).unwrap()),
        ("inference", serde_json::to_value(InferenceConfig::default()).unwrap()),
        ("results", serde_json::to_value(ResultsConfig::default()).unwrap()),
        ("monitor", serde_json::to_value(MonitorConfig::default()).unwrap()),
    ] {
        check(table, &section, &tables, &mut missing);
    }
    assert!(missing.is_empty(), "sluice.example.toml lacks {missing:?}");
}
