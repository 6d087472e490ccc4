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
            // The demo's own fresh resources have one shard; these are named, so say so.
            .env("SLUICE__STORE__SHARDS", "1")
            .args(["demo", "--backend", "aws", "--prefix", &prefix, "--json"]),
    );
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.97);
    assert_requests_per_record(&summary);
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

    // The summary names the prefix; a second demo there would count the first one's records,
    // and is refused; teardown deletes it all.
    assert_eq!(summary["aws_prefix"].as_str(), Some(prefix.as_str()));
    let again = aws_env(&mut Command::new(bin("sluice")), &prefix)
        .args(["demo", "--backend", "aws", "--prefix", &prefix, "--json"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("records already"), "{again:?}");
    let down = sluice(&["aws", "teardown", "--prefix", &prefix, "--yes"]);
    assert_eq!(down["deleted"].as_array().map(Vec::len), Some(14), "{down}");
}

/// ResNet-sized features (224×224×3) are stored as pixels, 147 KiB, inside their DynamoDB item:
/// no S3 round trip per record, so the demo's requests per record stay as low as with digits.
/// The weights are seeded random ones: the request count, not the predictions, is the point.
#[test]
fn resnet_sized_images_cost_no_s3_round_trip_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("resnet18.safetensors");
    sluice_cli::resnet18::write_random_weights(&weights, 10, 7).unwrap();
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, (0..10).map(|i| format!("{i}\n")).collect::<String>()).unwrap();
    let bundle = dir.path().join("bundle");
    let out = Command::new(bin("sluice"))
        .args(["bundle", "resnet18", "--weights"])
        .arg(&weights)
        .arg("--labels")
        .arg(&labels)
        .arg("--out")
        .arg(&bundle)
        // Random weights are never confident: at the usual threshold every record would take one
        // more hop, to the review queue, that a trained model's would mostly not.
        .args(["--threshold", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let prefix = unique_prefix("resnet");
    let summary = demo_summary(
        aws_env(&mut Command::new(bin("sluice")), &prefix)
            .env("SLUICE__STORE__SHARDS", "1")
            .env("SLUICE__MODEL__DIR", &bundle)
            .args(["demo", "--backend", "aws", "--prefix", &prefix, "--json"]),
    );
    let requests = &summary["aws_requests"];
    let count = |op: &str| requests[op].as_u64().unwrap_or(0);
    let stored = summary["results"].as_u64().unwrap() + summary["review"].as_u64().unwrap();
    assert_eq!(stored, 355, "every digit, upscaled to 224×224, has a result: {summary}");
    // No vector went to S3 or came back from it: the only objects are capture chunks.
    assert_eq!(count("S3.GetObject"), 0, "{requests}");
    assert!(count("S3.PutObject") <= stored / 10, "S3 objects written for {stored} records: {requests}");
    // The feature store: one BatchWriteItem per 25 records and one BatchGetItem per inference
    // batch, not a request per record.
    let feature_store = count("DynamoDB.BatchWriteItem") + count("DynamoDB.BatchGetItem");
    assert!(feature_store * 10 <= stored, "{feature_store} feature store requests for {stored} records: {requests}");
    assert_requests_per_record(&summary);
}

/// All requests stay at most 1.2 per record (issue 13's bound), ResNet-sized images or digits, and
/// those that move records (queue sends, receives and deletes, feature store and results writes,
/// capture) at most 1.1: SQS's ten messages a call put the floor near 0.95 for the three queue
/// hops, and with vectors in S3 a ResNet-sized record cost over 3. (Receives include the idle
/// long polls of waiting stages.) The rest grows with time, not records (lease renewals and
/// scans, shard reads, the request ledger), about 1.5 requests a second, so a slower run costs
/// more per record: docs/benchmarks.md has 1.10 for digits and 1.13 for a CPU ResNet-18, the two
/// tests side by side on one 2-core VM, in a test build whose model runs at 0.9× of a release
/// build's speed.
fn assert_requests_per_record(summary: &serde_json::Value) {
    let requests = &summary["aws_requests"];
    let count = |op: &str| requests[op].as_u64().unwrap_or(0);
    let moving: u64 = [
        "SQS.SendMessageBatch",
        "SQS.ReceiveMessage",
        "SQS.DeleteMessageBatch",
        "DynamoDB.BatchWriteItem",
        "DynamoDB.BatchGetItem",
        "DynamoDB.TransactWriteItems",
        "S3.PutObject",
        "S3.GetObject",
        "Kinesis.PutRecords",
    ]
    .into_iter()
    .map(count)
    .sum();
    let records_in = summary["records_in"].as_u64().unwrap();
    assert!(moving as f64 <= 1.1 * records_in as f64, "{moving} requests moved {records_in} records: {requests}");
    // The demo reports the same split.
    let reported = summary["aws_record_requests_per_record"].as_f64().unwrap();
    assert!((reported - moving as f64 / records_in as f64).abs() < 1e-9, "{summary}");
    assert!(summary["aws_coordination_requests_per_s"].as_f64().unwrap() > 0.0, "{summary}");
    let per_record = summary["aws_requests_per_record"].as_f64().unwrap();
    eprintln!(
        "{per_record:.3} AWS requests per record ({:.3} moving records) in {:.1} s",
        moving as f64 / records_in as f64,
        summary["elapsed_s"].as_f64().unwrap_or_default()
    );
    assert!(per_record <= 1.2, "{per_record} AWS requests per record: {requests}");
}
