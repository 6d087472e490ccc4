//! A reshard (2 → 4 shards) in the middle of a run loses nothing, and a child shard is read
//! only once its parents are drained. Run against `kinesis-local`, which ends closed shards as
//! Kinesis does (moto never returns a null iterator for a closed shard); DynamoDB leases on moto.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_kinesis::types::{ScalingType, StreamStatus};
use sluice_core::backend::aws::bootstrap::bootstrap;
use sluice_core::backend::aws::{Clients, Names};
use sluice_core::backend::{Backend, StreamInput, StreamRecord};
use sluice_core::config::StoreConfig;
use sluice_core::testing::{aws_store_config, kinesis_endpoint, unique_prefix};

fn inputs(tag: &str, n: usize) -> Vec<StreamInput> {
    (0..n)
        .map(|i| StreamInput { partition_key: format!("{tag}-{i}"), data: format!("{tag}-{i}").into_bytes() })
        .collect()
}

/// Fresh resources of `shards` shards on kinesis-local (leases on moto), a failover of 1 s: the
/// configuration, an observer's backend, the SDK clients, and the stream's name.
async fn on_kinesis_local(name: &str, shards: u32) -> (StoreConfig, Backend, Clients, String) {
    let mut config = aws_store_config(&unique_prefix(name));
    config.aws.kinesis_endpoint_url = Some(kinesis_endpoint());
    config.shards = shards;
    config.aws.lease_failover_ms = 1_000;
    bootstrap(&config).await.unwrap();
    let backend = Backend::open_observer(&config).await.unwrap();
    let clients = Clients::load(&config.aws, Default::default()).await.unwrap();
    let stream = Names::new(&config.aws.prefix).stream();
    (config, backend, clients, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_loses_nothing_and_children_wait_for_their_parents() {
    let (_, backend, clients, stream) = on_kinesis_local("reshard", 2).await;
    let kinesis = clients.kinesis;

    backend.stream.put_records(inputs("before", 100)).await.unwrap();
    let mut consumer = backend.stream.consumer("w1").await.unwrap();
    let mut read: Vec<StreamRecord> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut resharded = false;
    while read.len() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "read {} of 200 records", read.len());
        let batch = consumer.poll(20).await.unwrap();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for record in batch {
            consumer.checkpoint(&record.shard, &record.sequence, 1).await.unwrap();
            read.push(record);
        }
        if !resharded && read.len() >= 40 {
            resharded = true;
            kinesis
                .update_shard_count()
                .stream_name(&stream)
                .target_shard_count(4)
                .scaling_type(ScalingType::UniformScaling)
                .send()
                .await
                .unwrap();
            for _ in 0..100 {
                let summary = kinesis.describe_stream_summary().stream_name(&stream).send().await.unwrap();
                if summary.stream_description_summary.map(|s| s.stream_status) == Some(StreamStatus::Active) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            backend.stream.put_records(inputs("after", 100)).await.unwrap();
        }
    }

    let texts: Vec<String> = read.iter().map(|r| String::from_utf8(r.data.clone()).unwrap()).collect();
    let distinct: std::collections::BTreeSet<&String> = texts.iter().collect();
    assert_eq!(distinct.len(), 200, "every record, before and after the reshard, was read");

    let shards = kinesis.list_shards().stream_name(&stream).send().await.unwrap();
    let parents: HashMap<String, Vec<String>> = shards
        .shards()
        .iter()
        .map(|s| {
            let p = [s.parent_shard_id(), s.adjacent_parent_shard_id()].into_iter().flatten();
            (s.shard_id().to_owned(), p.map(str::to_owned).collect())
        })
        .collect();
    assert!(parents.len() >= 6, "2 closed parents and 4 children: {parents:?}");
    let last_of: BTreeMap<&str, usize> = read.iter().enumerate().map(|(i, r)| (r.shard.as_str(), i)).collect();
    for (i, record) in read.iter().enumerate() {
        for parent in &parents[&record.shard] {
            if let Some(&last) = last_of.get(parent.as_str()) {
                assert!(
                    last < i,
                    "{} was read from child {} before its parent {parent} was drained",
                    texts[i],
                    record.shard
                );
            }
        }
    }
    assert!(read.iter().any(|r| !parents[&r.shard].is_empty()), "children were read");
}

/// A closed parent shard past the stream's retention is gone from the stream (GetShardIterator
/// answers ResourceNotFound, ListShards no longer names it): it is taken as ended, so that its
/// child is read, rather than stopping every worker that takes its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_shard_gone_past_retention_lets_its_child_be_read() {
    let (config, backend, clients, stream) = on_kinesis_local("gone", 1).await;
    let listed = clients.kinesis.list_shards().stream_name(&stream).send().await.unwrap();
    let child = listed.shards()[0].shard_id().to_owned();

    // The leases as a reshard long ago left them: the stream's one shard is the child of one
    // that has aged out.
    let lease = |shard: &str| {
        use aws_sdk_dynamodb::types::AttributeValue::{N, S};
        clients
            .dynamodb
            .put_item()
            .table_name(Names::new(&config.aws.prefix).lease_table())
            .item("leaseKey", S(shard.to_owned()))
            .item("leaseCounter", N("0".into()))
            .item("checkpoint", S("TRIM_HORIZON".into()))
            .item("ownerSwitchesSinceCheckpoint", N("0".into()))
    };
    let gone = "shardId-000000000099";
    lease(gone).send().await.unwrap();
    lease(&child)
        .item("parentShardIds", aws_sdk_dynamodb::types::AttributeValue::Ss(vec![gone.to_owned()]))
        .send()
        .await
        .unwrap();

    backend.stream.put_records(inputs("after", 10)).await.unwrap();
    let mut consumer = backend.stream.consumer("w1").await.unwrap();
    let mut read = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while read < 10 {
        assert!(tokio::time::Instant::now() < deadline, "read {read} of 10 records");
        let batch = consumer.poll(20).await.expect("a shard gone past retention stops nobody");
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for record in batch {
            assert_eq!(record.shard, child);
            consumer.checkpoint(&record.shard, &record.sequence, 1).await.unwrap();
            read += 1;
        }
    }
}

/// A lease says through when its shard has been read and checkpointed (`readThroughMs`, written
/// with renewals and checkpoints), so that a worker taking the shard up once the stream's
/// retention has passed that time can say which records may have been trimmed unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_says_through_when_its_shard_is_read() {
    let (config, backend, clients, _) = on_kinesis_local("through", 1).await;
    backend.stream.put_records(inputs("r", 5)).await.unwrap();
    let mut consumer = backend.stream.consumer("w1").await.unwrap();
    let mut read: Vec<StreamRecord> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while read.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "read {} of 5 records", read.len());
        read.extend(consumer.poll(10).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = read.last().unwrap().clone();
    let through = || async {
        let item = clients
            .dynamodb
            .get_item()
            .table_name(Names::new(&config.aws.prefix).lease_table())
            .key("leaseKey", aws_sdk_dynamodb::types::AttributeValue::S(last.shard.clone()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap();
        item.get("readThroughMs").map(|v| v.as_n().unwrap().parse::<u64>().unwrap())
    };
    assert_eq!(through().await, None, "read, not yet checkpointed");
    consumer.checkpoint(&last.shard, &last.sequence, 5).await.unwrap();
    // The next renewal (a third of the failover time on) says it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    consumer.renew_leases().await.unwrap();
    let written = through().await.expect("a renewal writes it");
    assert!(
        written >= last.arrived_ms && written <= sluice_core::envelope::now_ms(),
        "read through {written}, the last record arrived at {}",
        last.arrived_ms
    );

    // Taken up again as if two days later (past the stream's 24 h): said, and read on as ever.
    consumer.release().await.unwrap();
    let long_ago = sluice_core::envelope::now_ms() - 48 * 3_600_000;
    clients
        .dynamodb
        .update_item()
        .table_name(Names::new(&config.aws.prefix).lease_table())
        .key("leaseKey", aws_sdk_dynamodb::types::AttributeValue::S(last.shard.clone()))
        .update_expression("SET readThroughMs = :t")
        .expression_attribute_values(":t", aws_sdk_dynamodb::types::AttributeValue::N(long_ago.to_string()))
        .send()
        .await
        .unwrap();
    backend.stream.put_records(inputs("later", 1)).await.unwrap();
    // What the worker logs, from here on (the consumer is polled on this thread).
    let (logged, _logging) = sluice_core::testing::Logged::on_this_thread();
    let mut later = backend.stream.consumer("w2").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let batch = later.poll(10).await.unwrap();
        if let Some(record) = batch.first() {
            assert_eq!(record.partition_key, "later-0", "read on after its checkpoint");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the shard was not read again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let said = logged.text();
    assert!(said.contains("ERROR") && said.contains("no worker read this shard"), "{said}");
}
