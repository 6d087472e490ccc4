//! The fault proxy answers as a busy AWS does, in each service's own shape, and the SDK takes
//! each answer for what it is: throttling and 5xx are retried (three attempts, the SDK's
//! standard mode), then reach sluice as retryable errors naming the service's code.

use aws_sdk_dynamodb::types::AttributeValue;
use sluice_core::backend::{Backend, OutgoingMessage, StreamConsumer, StreamInput, StreamRecord};
use sluice_core::envelope::RecordId;
use sluice_core::testing::{FaultProxy, FaultRates, aws_endpoint, aws_store_config, unique_prefix};
use sluice_core::topology::QueueName;

fn only(rates: impl FnOnce(&mut FaultRates)) -> FaultRates {
    let mut r = FaultRates::spread(0.0);
    rates(&mut r);
    r
}

/// Fresh resources (made directly), and a backend on them through a proxy faulting at `rates`.
async fn through(rates: FaultRates) -> (Backend, FaultProxy, String) {
    let prefix = unique_prefix("faults");
    let mut config = aws_store_config(&prefix);
    sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
    let proxy = FaultProxy::start(&aws_endpoint(), rates, 3).unwrap();
    config.aws.endpoint_url = Some(proxy.url.clone());
    (Backend::open(&config).await.unwrap(), proxy, prefix)
}

#[tokio::test]
async fn throttling_reads_as_each_services_own_throttling_and_is_retried() {
    let (backend, proxy, _) = through(only(|r| r.throttle = 1.0)).await;
    let id = RecordId::parse("r1").unwrap();
    let errors = [
        (
            "Kinesis",
            backend
                .stream
                .put_records(vec![StreamInput { partition_key: "k".into(), data: b"x".to_vec() }])
                .await
                .unwrap_err(),
        ),
        ("DynamoDB", backend.results.get_batch(std::slice::from_ref(&id)).await.unwrap_err()),
        ("SQS", backend.queue(QueueName::Features).send_batch(vec![OutgoingMessage::default()]).await.unwrap_err()),
        ("S3", backend.blobs.put(vec![1, 2, 3]).await.unwrap_err()),
    ];
    for ((service, error), code) in errors.iter().zip([
        "ProvisionedThroughputExceededException",
        "ProvisionedThroughputExceededException",
        "RequestThrottled",
        "SlowDown",
    ]) {
        assert!(error.is_retryable(), "{service}: {error}");
        assert!(error.detail().contains(code), "{service}: {error}");
    }
    let counts = proxy.counts();
    assert_eq!(counts.throttled, counts.requests);
    assert_eq!(counts.requests, 4 * 3, "each call tried three times by the SDK: {counts:?}");
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried_and_then_retryable() {
    let (backend, proxy, _) = through(only(|r| r.server_error = 1.0)).await;
    let error = backend.queue(QueueName::Features).depth().await.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert_eq!(proxy.counts().requests, 3);

    // The queue's URL is looked up cleanly; then every send is carried out and its answer lost.
    let (backend, proxy, prefix) = through(only(|r| {
        r.drop_after = 1.0;
        r.clean_first = 1;
    }))
    .await;
    let error = backend.queue(QueueName::Features).send_batch(vec![OutgoingMessage::default()]).await.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert_eq!(proxy.counts().dropped_after, 3, "{error}: {:?}", proxy.counts());
    // Every attempt was carried out upstream: the answers were lost, not the sends (which is
    // why every sink downstream of a queue is idempotent by record id).
    let direct = Backend::open(&aws_store_config(&prefix)).await.unwrap();
    assert_eq!(direct.queue(QueueName::Features).depth().await.unwrap().visible, 3);
}

#[tokio::test]
async fn without_faults_it_passes_everything_through() {
    let (backend, proxy, _) = through(FaultRates::spread(0.0)).await;
    backend.queue(QueueName::Features).send_batch(vec![OutgoingMessage::default()]).await.unwrap();
    assert_eq!(backend.queue(QueueName::Features).depth().await.unwrap().visible, 1);
    let reference = backend.blobs.put(vec![7; 1000]).await.unwrap();
    assert_eq!(backend.blobs.get(&reference).await.unwrap(), vec![7; 1000]);
    assert_eq!(proxy.counts().failed(), 0);
}

/// A fresh one-shard stream (and its lease table, leases failing over after `failover_ms`),
/// reached directly.
async fn one_shard(name: &str, failover_ms: u64) -> (Backend, sluice_core::config::StoreConfig) {
    let mut config = aws_store_config(&unique_prefix(name));
    config.shards = 1;
    config.aws.lease_failover_ms = failover_ms;
    sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
    (Backend::open(&config).await.unwrap(), config)
}

/// `n` records whose data is `tag`.
fn inputs(tag: &str, n: usize) -> Vec<StreamInput> {
    (0..n).map(|i| StreamInput { partition_key: format!("{tag}{i}"), data: tag.into() }).collect()
}

/// Polls until `n` records came or five seconds passed; what came.
async fn read(consumer: &mut Box<dyn StreamConsumer>, n: usize) -> Vec<StreamRecord> {
    let mut read = Vec::new();
    for _ in 0..50 {
        read.extend(consumer.poll(100).await.unwrap());
        if read.len() >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    read
}

/// The lease table of a prefix, reached directly: written as another worker, or a write whose
/// answer was lost, would leave it.
struct LeaseTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl LeaseTable {
    async fn of(config: &sluice_core::config::StoreConfig) -> Self {
        let shared = sluice_core::backend::aws::sdk_config(&config.aws, config.aws.endpoint_url.as_deref()).await;
        let table = sluice_core::backend::aws::Names::new(&config.aws.prefix).lease_table();
        Self { client: aws_sdk_dynamodb::Client::new(&shared), table }
    }

    /// Applies the update `expression`, its `values` bound, to the lease of `shard`.
    async fn update(&self, shard: &str, expression: &str, values: &[(&str, AttributeValue)]) {
        let values = values.iter().map(|(name, value)| ((*name).to_owned(), value.clone())).collect();
        self.client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", AttributeValue::S(shard.to_owned()))
            .update_expression(expression)
            .set_expression_attribute_values(Some(values))
            .send()
            .await
            .unwrap();
    }

    /// The lease of `shard` as stored.
    async fn get(&self, shard: &str) -> std::collections::HashMap<String, AttributeValue> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("leaseKey", AttributeValue::S(shard.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        output.item.unwrap()
    }
}

/// A lease renewal carried out by DynamoDB whose answer was lost (the counter moved, the owner
/// is still this worker, and the retry fails its condition): the worker finds the lease still
/// its own and keeps reading (it used to let the shard go and have to take it back, since no
/// other worker takes a lease that reads as someone's live one: found by the demo through 20%
/// faults, where one shard stopped being read for good).
#[tokio::test]
async fn a_lease_whose_renewal_answer_was_lost_is_kept() {
    let (backend, config) = one_shard("lost-renewal", 600).await;
    let mut consumer = backend.stream.consumer("worker-a").await.unwrap();
    backend.stream.put_records(inputs("a", 3)).await.unwrap();
    assert_eq!(read(&mut consumer, 3).await.len(), 3);
    let shard = consumer.shards()[0].clone();

    // The renewal DynamoDB carried out but whose answer never came: counter + 1, owner unchanged.
    let leases = LeaseTable::of(&config).await;
    let switches = || async { leases.get(&shard).await["ownerSwitchesSinceCheckpoint"].as_n().unwrap().clone() };
    let before = switches().await;
    leases.update(&shard, "ADD leaseCounter :one", &[(":one", AttributeValue::N("1".into()))]).await;

    backend.stream.put_records(inputs("b", 2)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut later = Vec::new();
    while later.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the shard was never read again ({} of 2)", later.len());
        later.extend(consumer.poll(100).await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(consumer.shards(), std::slice::from_ref(&shard), "held");
    assert_eq!(switches().await, before, "never let go and taken back: found still its own");

    // A checkpoint carried out whose answer never came (counter + 1, the checkpoint written),
    // whose retry then failed its condition: done, and the lease still held.
    let last = later.last().unwrap().sequence.clone();
    let values = [(":cp", AttributeValue::S(last.clone())), (":one", AttributeValue::N("1".into()))];
    leases.update(&shard, "SET checkpoint = :cp ADD leaseCounter :one", &values).await;
    consumer.checkpoint(&shard, &last, 2).await.unwrap();
    assert_eq!(consumer.shards(), [shard], "still held");
}

/// A lease another worker took, read on with and checkpointed past this one's reader, then let
/// go, and this worker took back in one rebalance: it reads on from that checkpoint, not from
/// where its own reader was (which redid those records), and the checkpoint of what it read
/// before is refused rather than move the shard's back.
#[tokio::test]
async fn a_lease_lost_and_taken_back_reads_on_from_the_other_workers_checkpoint() {
    let (backend, config) = one_shard("taken-back", 600).await;
    let mut consumer = backend.stream.consumer("worker-a").await.unwrap();
    backend.stream.put_records(inputs("a", 3)).await.unwrap();
    let first = read(&mut consumer, 3).await;
    assert_eq!(first.len(), 3);
    let shard = first[0].shard.clone();

    // Worker B's turn, written as it would leave the lease: two more records read and
    // checkpointed, the lease let go.
    backend.stream.put_records(inputs("b", 2)).await.unwrap();
    let kinesis_endpoint = config.aws.kinesis_endpoint_url.as_deref().or(config.aws.endpoint_url.as_deref());
    let kinesis =
        aws_sdk_kinesis::Client::new(&sluice_core::backend::aws::sdk_config(&config.aws, kinesis_endpoint).await);
    let stream = sluice_core::backend::aws::Names::new(&config.aws.prefix).stream();
    let iterator = kinesis
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id(&shard)
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::AfterSequenceNumber)
        .starting_sequence_number(&first[2].sequence)
        .send()
        .await
        .unwrap()
        .shard_iterator
        .unwrap();
    let theirs = kinesis.get_records().shard_iterator(iterator).send().await.unwrap();
    assert_eq!(theirs.records().len(), 2);
    let their_checkpoint = theirs.records()[1].sequence_number().to_owned();
    let leases = LeaseTable::of(&config).await;
    let values = [(":cp", AttributeValue::S(their_checkpoint.clone())), (":three", AttributeValue::N("3".into()))];
    leases.update(&shard, "SET checkpoint = :cp ADD leaseCounter :three REMOVE leaseOwner", &values).await;

    // Past this worker's next scan (alone, every twice the failover time): taken back, nothing
    // read again.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(3_000);
    let mut again = Vec::new();
    while std::time::Instant::now() < until {
        again.extend(consumer.poll(100).await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(consumer.shards(), std::slice::from_ref(&shard), "taken back");
    assert!(again.is_empty(), "read again what the other worker did: {:?}", again.len());
    let late = consumer.checkpoint(&shard, &first[2].sequence, 3).await.unwrap_err();
    assert_eq!(late.code(), sluice_core::ReasonCode::LeaseLost, "{late}");
    assert_eq!(leases.get(&shard).await["checkpoint"].as_s().unwrap(), &their_checkpoint, "not moved back");

    backend.stream.put_records(inputs("c", 1)).await.unwrap();
    let later = read(&mut consumer, 1).await;
    let data: Vec<&[u8]> = later.iter().map(|r| r.data.as_slice()).collect();
    assert_eq!(data, [b"c"], "only what came after their checkpoint");
}

/// A checkpoint that fails (here DynamoDB refuses it as too large; throttling or a timeout
/// would do the same) drops the shard's reader while the lease stays held. A lone worker reads
/// its lease table rarely, so the new reader must start from the stored checkpoint, not from
/// the start of the shard (found on a second read of the rarer scans).
#[tokio::test]
async fn after_a_failed_checkpoint_a_lone_worker_resumes_from_the_stored_one() {
    // Alone, it scans every twice this: none falls between the failed checkpoint and the reads.
    let (backend, _) = one_shard("failed-checkpoint", 5_000).await;
    let mut consumer = backend.stream.consumer("worker-a").await.unwrap();
    backend.stream.put_records(inputs("a", 3)).await.unwrap();
    let first = read(&mut consumer, 3).await;
    assert_eq!(first.len(), 3);
    let last = first.last().unwrap();
    consumer.checkpoint(&last.shard, &last.sequence, 3).await.unwrap();
    // Past the next rebalance (a third of the failover time), whose scan finds it alone.
    let alone_by = tokio::time::Instant::now() + std::time::Duration::from_millis(2_500);
    while tokio::time::Instant::now() < alone_by {
        assert!(consumer.poll(100).await.unwrap().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    backend.stream.put_records(inputs("b", 2)).await.unwrap();
    let too_large = "9".repeat(500_000);
    assert!(consumer.checkpoint(&last.shard, &too_large, 0).await.is_err(), "a 500 KB checkpoint is refused");
    assert_eq!(consumer.shards(), std::slice::from_ref(&last.shard), "the lease is still held");

    let later = read(&mut consumer, 2).await;
    let data: Vec<&[u8]> = later.iter().map(|r| r.data.as_slice()).collect();
    assert_eq!(data, [b"b", b"b"], "only what came after the stored checkpoint");
}

/// A rewind (back to the checkpoint after a batch that could not be settled) that cannot read
/// the stored checkpoint, AWS out of reach, must not leave the reader past the records it gave:
/// the next batch's checkpoint would pass them, unsettled, and they would be lost.
#[tokio::test]
async fn a_rewind_that_fails_still_reads_again_from_the_checkpoint() {
    let mut config = aws_store_config(&unique_prefix("failed-rewind"));
    config.shards = 1;
    config.aws.lease_failover_ms = 3_000;
    sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
    let port = sluice_core::testing::free_port().unwrap();
    let proxy = FaultProxy::start_on(port, &aws_endpoint(), FaultRates::spread(0.0), 1).unwrap();
    config.aws.endpoint_url = Some(proxy.url.clone());
    let backend = Backend::open(&config).await.unwrap();
    let mut consumer = backend.stream.consumer("worker-a").await.unwrap();
    backend.stream.put_records(inputs("a", 3)).await.unwrap();
    let first = read(&mut consumer, 3).await;
    assert_eq!(first.len(), 3);

    drop(proxy);
    assert!(consumer.rewind(&first[0].shard).await.is_err(), "AWS out of reach");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let _back = loop {
        match FaultProxy::start_on(port, &aws_endpoint(), FaultRates::spread(0.0), 1) {
            Ok(proxy) => break proxy,
            Err(e) => assert!(std::time::Instant::now() < deadline, "the port stayed taken: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let again = read(&mut consumer, 3).await;
    let sequences = |records: &[StreamRecord]| records.iter().map(|r| r.sequence.clone()).collect::<Vec<_>>();
    assert_eq!(sequences(&again), sequences(&first), "read again from the checkpoint, not passed over");
}

/// A SendMessageBatch SQS takes in part is sent on with only what it refused, so what it took is
/// not sent twice: a DLQ entry sent twice would be two entries.
#[tokio::test]
async fn a_batch_sqs_takes_in_part_is_sent_on_with_only_what_it_refused() {
    let (backend, proxy, prefix) = through(only(|r| {
        r.partial = 1.0;
        r.clean_first = 1;
    }))
    .await;
    let messages: Vec<OutgoingMessage> =
        (0..10).map(|i| OutgoingMessage { body: format!("m{i}").into_bytes(), ..OutgoingMessage::default() }).collect();
    backend.queue(QueueName::FeaturesDlq).send_batch(messages).await.unwrap();
    // The call took nine; the tenth alone went again (after the queue's URL was looked up).
    let counts = proxy.counts();
    assert_eq!((counts.requests, counts.partial), (3, 1), "{counts:?}");
    let direct = Backend::open(&aws_store_config(&prefix)).await.unwrap();
    let mut bodies = std::collections::BTreeSet::new();
    for _ in 0..5 {
        for message in direct.queue(QueueName::FeaturesDlq).receive(10, std::time::Duration::ZERO).await.unwrap() {
            assert!(bodies.insert(message.body.clone()), "sent twice: {:?}", String::from_utf8_lossy(&message.body));
        }
    }
    assert_eq!(bodies.len(), 10);
    assert_eq!(direct.queue(QueueName::FeaturesDlq).depth().await.unwrap().total(), 10);
}
