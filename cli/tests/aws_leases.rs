//! Kinesis shard leases between ingest worker processes on the AWS backend (moto server on
//! 127.0.0.1): a 2 + 2 split, takeover after SIGKILL within twice the failover time, and an
//! immediate handover after SIGTERM, with nothing lost. A test binary of its own, so no other
//! test loads the endpoint while it times failover.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{aws_env, bin, wait_for};
use sluice_cli::produce::put_all;
use sluice_core::backend::{Backend, StreamInput};
use sluice_core::stats::PipelineStats;
use sluice_core::testing::{aws_store_config, unique_prefix};
use sluice_core::topology::QueueName;

const FAILOVER_MS: u64 = 3_000;

async fn lease_split(backend: &Backend) -> Vec<u64> {
    let stats = PipelineStats::collect(backend).await.unwrap();
    let mut held: Vec<u64> = stats.stream.leases.values().copied().collect();
    held.sort();
    held
}

fn ingest(prefix: &str, name: &str, logs: &std::path::Path) -> common::Worker {
    let log = logs.join(format!("{name}.log"));
    let mut cmd = Command::new(bin("sluice-ingest"));
    aws_env(&mut cmd, prefix)
        .env("SLUICE__STORE__AWS__LEASE_FAILOVER_MS", FAILOVER_MS.to_string())
        .args(["--worker-id", name])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    common::Worker { name: name.to_owned(), child: cmd.spawn().unwrap(), log }
}

/// Raw JSON events carrying one of the digits model's fields (`p00`), so ingest takes them in.
fn records(tag: &str, n: usize) -> Vec<StreamInput> {
    (0..n)
        .map(|i| StreamInput {
            partition_key: format!("{tag}-{i}"),
            data: format!("{{\"n\": {i}, \"p00\": 3}}").into_bytes(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_consumers_share_shards_and_survive_kill_and_term() {
    let prefix = unique_prefix("lease");
    let mut config = aws_store_config(&prefix);
    config.shards = 4;
    config.aws.lease_failover_ms = FAILOVER_MS;
    sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
    let backend = Backend::open_observer(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    put_all(&backend, records("a", 40), &Default::default()).await.unwrap();
    let one = ingest(&prefix, "one", dir.path());
    let two = ingest(&prefix, "two", dir.path());
    wait_for(&backend, Duration::from_secs(60), "a 2 + 2 split", |s| {
        let held: Vec<u64> = s.stream.leases.values().copied().collect();
        held.len() == 2 && held.iter().all(|&n| n == 2)
    })
    .await;

    // SIGKILL: the survivor holds all four within twice the failover time.
    one.kill();
    let killed_at = Instant::now();
    put_all(&backend, records("b", 40), &Default::default()).await.unwrap();
    wait_for(&backend, Duration::from_millis(4 * FAILOVER_MS), "the survivor to hold every shard", |s| {
        s.stream.leases.get("two") == Some(&4) && s.stream.leases.len() == 1
    })
    .await;
    let took = killed_at.elapsed();
    assert!(took <= Duration::from_millis(2 * FAILOVER_MS) + Duration::from_secs(2), "took {took:?}");

    // SIGTERM: the leaver checkpoints and releases; a newcomer continues at once.
    let three = ingest(&prefix, "three", dir.path());
    wait_for(&backend, Duration::from_secs(60), "a new 2 + 2 split", |s| {
        s.stream.leases.get("two") == Some(&2) && s.stream.leases.get("three") == Some(&2)
    })
    .await;
    two.terminate(Duration::from_secs(20));
    let termed_at = Instant::now();
    put_all(&backend, records("c", 40), &Default::default()).await.unwrap();
    wait_for(&backend, Duration::from_secs(60), "three to hold every shard", |s| {
        s.stream.leases.get("three") == Some(&4)
    })
    .await;
    assert!(
        termed_at.elapsed() < Duration::from_millis(FAILOVER_MS),
        "released leases are taken without waiting for expiry"
    );

    wait_for(&backend, Duration::from_secs(60), "every record forwarded", |s| s.stream.pending == 0).await;
    three.terminate(Duration::from_secs(20));
    assert_eq!(lease_split(&backend).await, Vec::<u64>::new(), "a clean stop releases every lease");

    // The workers left their request counts where any process can read them.
    let stats = PipelineStats::collect(&backend).await.unwrap();
    assert!(stats.aws_requests.get("Kinesis.GetRecords").is_some_and(|&n| n > 0), "{:?}", stats.aws_requests);
    assert!(stats.aws_requests_per_record.is_some_and(|r| r > 0.0));

    // Nothing lost: every record reached the features queue (duplicates are allowed upstream).
    let features = backend.queue(QueueName::Features);
    let mut seen = BTreeSet::new();
    loop {
        let got = features.receive(10, Duration::ZERO).await.unwrap();
        if got.is_empty() {
            break;
        }
        for m in &got {
            let envelope = sluice_core::envelope::Envelope::from_json(&m.body).unwrap();
            seen.insert(envelope.record_id.to_string());
        }
        features.ack(&got.iter().map(|m| m.receipt.clone()).collect::<Vec<_>>()).await.unwrap();
    }
    assert_eq!(seen.len(), 120, "every produced record was forwarded");
}
