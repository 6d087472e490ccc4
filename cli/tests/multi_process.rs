//! Four kinds of worker process on one store file drain 10,000 records with none lost and none
//! with two results, while one worker of each kind gets SIGTERM mid-run (each must stop within
//! its grace period, and a fresh one takes over), and one inference worker is killed with
//! SIGKILL and replaced.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Worker, handled, store_config, wait_for};
use sluice_cli::demo::all_results;
use sluice_cli::digits::{self, Split};
use sluice_cli::produce::{DigitForm, digit_records, put_all};
use sluice_core::backend::Backend;
use sluice_core::envelope::Envelope;

const RECORDS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_drain_10k_records_through_sigterms_and_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.sqlite");
    let backend = Backend::open(&store_config(&store)).await.unwrap();

    let test = digits::load_split(Split::Test).unwrap();
    let mut records = digit_records(&test, Split::Test, RECORDS.div_ceil(test.len()), DigitForm::Png, "mp");
    records.truncate(RECORDS);
    let produced: BTreeSet<String> =
        records.iter().map(|r| Envelope::from_json(&r.data).unwrap().record_id.to_string()).collect();
    assert_eq!(produced.len(), RECORDS);
    put_all(&backend, records, &Default::default()).await.unwrap();

    let logs = dir.path();
    let grace = Duration::from_secs(10); // SLUICE__WORKER__SHUTDOWN_GRACE_MS in common::test_env
    let mut stopped = Vec::new();
    // SIGTERM mid-run: the worker stops within its grace period, cleanly, and a new one goes on.
    let mut replace = |worker: Worker, binary: &str, name: &str| {
        stopped.push((worker.name.clone(), worker.terminate(grace + Duration::from_secs(2))));
        Worker::start(binary, name, &store, logs)
    };
    let ingest = Worker::start("sluice-ingest", "ingest-a", &store, logs);
    let features = Worker::start("sluice-features", "features-a", &store, logs);
    let doomed = Worker::start("sluice-inference", "inference-a", &store, logs);
    let inference = Worker::start("sluice-inference", "inference-b", &store, logs);
    let results = Worker::start("sluice-results", "results-a", &store, logs);

    wait_for(&backend, Duration::from_secs(300), "the first results", |s| s.results + s.review >= 300).await;
    let ingest = replace(ingest, "sluice-ingest", "ingest-b");
    let features = replace(features, "sluice-features", "features-b");
    wait_for(&backend, Duration::from_secs(300), "a fifth of the results", |s| s.results + s.review >= 2_000).await;
    doomed.kill();
    let replacement = Worker::start("sluice-inference", "inference-c", &store, logs);
    let steady = replace(inference, "sluice-inference", "inference-d");
    let results = replace(results, "sluice-results", "results-b");

    let stats = wait_for(&backend, Duration::from_secs(600), "the pipeline to drain", |s| {
        s.is_drained() && s.accounted() >= RECORDS as u64
    })
    .await;

    let mut logs: Vec<(String, String)> = [ingest, features, steady, replacement, results]
        .into_iter()
        .map(|w| (w.name.clone(), w.terminate(grace + Duration::from_secs(2))))
        .collect();
    logs.extend(stopped);

    assert_eq!(stats.records_in, RECORDS as u64);
    assert_eq!(stats.accounted(), RECORDS as u64, "{stats:#?}");
    assert_eq!(stats.dlq.values().sum::<u64>(), 0, "no good record is dead-lettered: {stats:#?}");

    let stored: BTreeSet<String> =
        all_results(&backend).await.unwrap().into_iter().map(|r| r.record_id.to_string()).collect();
    assert_eq!(stored, produced, "exactly the produced records have results");

    for (name, log) in &logs {
        assert!(log.contains("worker stopped"), "{name} did not shut down cleanly:\n{log}");
    }
    let by_name = |n: &str| &logs.iter().find(|(name, _)| name == n).unwrap().1;
    assert!(handled(by_name("inference-b")) > 0, "the second inference worker shared the work");
    assert!(handled(by_name("inference-c")) + handled(by_name("inference-d")) > 0, "the replacements picked up work");
    for name in ["ingest-a", "features-a", "results-a"] {
        assert!(handled(by_name(name)) > 0, "{name} worked before its SIGTERM");
    }
}
