//! The `sluice` command as a user runs it.

mod common;

use std::process::Command;

use common::{bin, demo_summary, test_env};

fn sluice(args: &[&str]) -> std::process::Output {
    let out = test_env(&mut Command::new(bin("sluice"))).args(args).output().unwrap();
    assert!(out.status.success(), "sluice {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `--photos`: the same digits as 480×360 JPEGs, each record accounted for (the digits model
/// shrinks them back to 8×8, so no accuracy bar).
#[test]
fn the_demo_on_photos_accounts_for_every_record() {
    let summary = demo_summary(test_env(&mut Command::new(bin("sluice"))).args(["demo", "--photos", "--json"]));
    assert_eq!(summary["dlq"]["features"], 0, "every photo decoded and resized: {summary}");
}

#[test]
fn demo_accounts_for_every_record_and_meets_the_accuracy_bar() {
    let summary = demo_summary(test_env(&mut Command::new(bin("sluice"))).args(["demo", "--json"]));
    for key in ["records_in", "results", "review", "dlq", "accuracy", "throughput_rps", "latency_ms"] {
        assert!(summary.get(key).is_some(), "missing {key} in {summary}");
    }
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.97, "{summary}");
    assert!(summary["latency_ms"]["p99"].as_f64().unwrap() >= summary["latency_ms"]["p50"].as_f64().unwrap());
    assert!(summary["throughput_rps"].as_f64().unwrap() > 0.0);
}

#[test]
fn produce_run_and_stats_as_separate_commands() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.sqlite");
    let store = store.to_str().unwrap();
    sluice(&["produce", "--store", store, "--digits", "test", "--repeat", "2"]);
    sluice(&["produce", "--store", store, "--digits", "validation", "--json"]);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("empty.png"), b"").unwrap();
    std::fs::write(files.join("notes.txt"), b"not an image").unwrap();
    sluice(&["produce", "--store", store, "--dir", files.to_str().unwrap()]);

    let before = json(&sluice(&["stats", "--store", store, "--json"]));
    assert_eq!(before["records_in"], 0, "nothing has reached ingest yet");
    assert_eq!(before["stream"]["pending"], 355 * 2 + 185 + 2);
    assert_eq!(before["results"], 0);

    sluice(&["run", "--store", store, "--until-drained"]);
    let after = json(&sluice(&["stats", "--store", store, "--json"]));
    let n = |k: &str| after[k].as_u64().unwrap();
    assert_eq!(n("records_in"), 355 * 2 + 185 + 2);
    assert_eq!(n("results") + n("review"), 355 * 2 + 185, "repeats and JSON events are distinct records");
    assert_eq!(after["dlq"]["ingest"], 2);

    let review = String::from_utf8(
        sluice(&["results", "--store", store, "--status", "review", "--limit", "100000", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(review.lines().count() as u64, n("review"));
    let listed = String::from_utf8(sluice(&["dlq", "list", "--store", store, "--stage", "ingest"]).stdout).unwrap();
    assert!(listed.contains("empty_payload") && listed.contains("unsupported_content_type"), "{listed}");
}

#[test]
fn worker_binaries_explain_bad_setup_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.sqlite");
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "[worker]\npoll_wait = 10\n").unwrap();
    for stage in ["ingest", "features", "inference", "results"] {
        let run = |extra: &[&str], model: &std::path::Path| {
            let out = Command::new(bin(&format!("sluice-{stage}")))
                .env("SLUICE__MODEL__DIR", model)
                .args(["--store", store.to_str().unwrap()])
                .args(extra)
                .output()
                .unwrap();
            assert!(!out.status.success(), "sluice-{stage} should refuse to start");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let stderr = run(&["--config", config.to_str().unwrap()], &common::model_dir());
        assert!(stderr.contains("poll_wait"), "sluice-{stage} does not name the unknown key:\n{stderr}");
        if stage != "ingest" {
            let stderr = run(&[], &dir.path().join("no-such-model"));
            assert!(stderr.contains("model bundle"), "sluice-{stage} does not explain the missing bundle:\n{stderr}");
        }
    }
}

#[test]
fn produce_keeps_to_a_rate_for_a_duration() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("load.sqlite");
    let store = store.to_str().unwrap();
    let started = std::time::Instant::now();
    let out = sluice(&[
        "produce",
        "--store",
        store,
        "--digits",
        "test",
        "--rate",
        "400",
        "--duration",
        "2s",
        "--pattern",
        "spikes",
    ]);
    let took = started.elapsed();
    let report = String::from_utf8(out.stdout).unwrap();
    // Spikes: five times the rate in the first second of every ten: 400 × 5 + 400 × 1 records.
    assert!(report.contains("produced 2400 records"), "{report}");
    assert!(took >= std::time::Duration::from_millis(1500), "it paced itself rather than writing at once ({took:?})");
    let stats = json(&sluice(&["stats", "--store", store, "--json"]));
    assert_eq!(stats["stream"]["pending"], 2400, "distinct records, all on the stream");
}
