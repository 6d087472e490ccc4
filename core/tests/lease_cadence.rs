//! What a worker alone on the stream spends on its leases: renewals at a third of the failover
//! time, as ever, but the lease table read only every twice the failover time (nobody else's
//! counter to watch), and at once again when a lease changes hands. One test in this binary: it
//! reads the process's request counts.

use std::time::Duration;

use sluice_core::backend::aws::{bootstrap::bootstrap, requests};
use sluice_core::backend::{Backend, StreamConsumer, StreamInput};
use sluice_core::testing::{aws_store_config, unique_prefix};

const FAILOVER_MS: u64 = 900;

fn count(operation: &str) -> u64 {
    requests().snapshot().get(operation).copied().unwrap_or(0)
}

/// Polls `consumer` for `for_ms`; the records it read.
async fn poll(consumer: &mut Box<dyn StreamConsumer>, for_ms: u64) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(for_ms);
    let mut read = 0;
    while tokio::time::Instant::now() < deadline {
        read += consumer.poll(100).await.unwrap().len();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_worker_renews_at_pace_but_scans_the_lease_table_rarely() {
    let mut config = aws_store_config(&unique_prefix("lease-cadence"));
    config.shards = 2;
    config.aws.lease_failover_ms = FAILOVER_MS;
    bootstrap(&config).await.unwrap();
    let backend = Backend::open(&config).await.unwrap();
    let records = (0..4).map(|i| StreamInput { partition_key: format!("k{i}"), data: vec![1] }).collect();
    backend.stream.put_records(records).await.unwrap();

    let mut alone = backend.stream.consumer("alone").await.unwrap();
    assert_eq!(poll(&mut alone, 2 * FAILOVER_MS).await, 4, "both shards read");
    assert_eq!(alone.shards().len(), 2);

    let (scans, writes) = (count("DynamoDB.Scan"), count("DynamoDB.UpdateItem"));
    poll(&mut alone, 6 * FAILOVER_MS).await;
    let (scans, writes) = (count("DynamoDB.Scan") - scans, count("DynamoDB.UpdateItem") - writes);
    // Six failover times: each lease renewed at least every two thirds of one (six or more
    // renewals each), the table read about three times (it was read every third: eighteen).
    assert!(writes >= 2 * 6, "{writes} lease renewals of two leases in six failover times");
    assert!((2..=4).contains(&scans), "{scans} scans of the lease table in six failover times");
    assert_eq!(alone.shards().len(), 2, "still holds both");

    // A second worker steals its fair share; the first learns at its next renewal, reads the
    // table again and keeps to the one lease left.
    let mut second = backend.stream.consumer("second").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        alone.poll(100).await.unwrap();
        second.poll(100).await.unwrap();
        if alone.shards().len() == 1 && second.shards().len() == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no 1 + 1 split: {:?} / {:?}", alone.shards(), second.shards());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(alone.shards(), second.shards());
}
