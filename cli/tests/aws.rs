//! The demo on the AWS backend, against the local endpoint (moto server on 127.0.0.1), at the
//! store's default timeouts, so its request count is what a user would see; then the monitor
//! and the report over what it captured on S3.

mod common;

use std::process::Command;

use common::{aws_env, bin, demo_summary};
use sluice_core::testing::unique_prefix;

#[test]
fn demo_runs_end_to_end_on_aws_and_batches_its_requests() {
    let prefix = unique_prefix("demo");
    let summary = demo_summary(
        aws_env(&mut Command::new(bin("sluice")), &prefix)
            // The demo's own fresh resources have two shards; these are named, so say so.
            .env("SLUICE__STORE__SHARDS", "2")
            .args(["demo", "--backend", "aws", "--prefix", &prefix, "--json"]),
    );
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.97);
    let per_record = summary["aws_requests_per_record"].as_f64().unwrap();
    assert!(per_record <= 1.5, "{per_record} AWS requests per record: {}", summary["aws_requests"]);
    // Capture goes out a chunk at a time: a handful of objects, never one per record.
    let stored = summary["results"].as_u64().unwrap() + summary["review"].as_u64().unwrap();
    let puts = summary["aws_requests"]["S3.PutObject"].as_u64().unwrap_or(0);
    assert!((1..=stored / 10).contains(&puts), "{puts} capture objects for {stored} results");

    let sluice = |args: &[&str]| {
        let out = aws_env(&mut Command::new(bin("sluice")), &prefix).args(args).output().unwrap();
        assert!(out.status.success(), "sluice {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let pass = sluice(&["monitor", "--json"]);
    assert_eq!(pass["records"].as_u64(), Some(stored), "every result read back from S3 once: {pass}");
    let dir = tempfile::tempdir().unwrap();
    let report = sluice(&["report", "--out", dir.path().to_str().unwrap(), "--json"]);
    assert_eq!((report["records"].as_u64(), report["charts"].as_u64()), (Some(stored), Some(7)), "{report}");
}
