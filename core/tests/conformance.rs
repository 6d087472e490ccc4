//! The backend conformance suite: every backend must pass every test here unchanged.
//!
//! Each test takes a fresh [`Fixture`]; `conformance!` instantiates the suite per backend. The
//! AWS backend runs against the endpoint `sluice_core::testing::aws_endpoint` provides (moto
//! server on 127.0.0.1), with fresh resource names per test.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use sluice_core::ReasonCode;
use sluice_core::backend::{
    Backend, FeedbackOutcome, OutgoingMessage, PageToken, PutOutcome, ResultQuery, ReviewOutcome, StreamInput,
};
use sluice_core::config::{BackendKind, StoreConfig};
use sluice_core::envelope::RecordId;
use sluice_core::record::{DlqEntry, PredictionResult, Resolution, ResultStatus};
use sluice_core::topology::{QueueName, StageName};
use sluice_core::vector::FeatureVector;

/// Short timeouts so visibility and lease expiry can be observed quickly.
const VISIBILITY_MS: u64 = 1000;
const LEASE_MS: u64 = 1000;
const MAX_RECEIVES: u32 = 3;

/// A backend plus whatever keeps it alive, and a way to open a second handle on the same state
/// (another process, as far as the backend can tell).
struct Fixture {
    config: StoreConfig,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn embedded() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            path: dir.path().join("store.sqlite"),
            shards: 4,
            visibility_timeout_ms: VISIBILITY_MS,
            max_receives: MAX_RECEIVES,
            lease_duration_ms: LEASE_MS,
            ..StoreConfig::default()
        };
        Self { config, _dir: dir }
    }

    async fn aws() -> Self {
        Self::aws_with_visibility(VISIBILITY_MS).await
    }

    /// SQS fixes the visibility timeout per queue, so a different one needs fresh queues.
    async fn aws_with_visibility(visibility_ms: u64) -> Self {
        let mut config = sluice_core::testing::aws_store_config(&sluice_core::testing::unique_prefix("conf"));
        config.shards = 4;
        config.visibility_timeout_ms = visibility_ms;
        config.max_receives = MAX_RECEIVES;
        config.aws.lease_failover_ms = LEASE_MS;
        sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
        Self { config, _dir: tempfile::tempdir().unwrap() }
    }

    /// The same kind of backend with another visibility timeout.
    async fn with_visibility(mut self, visibility_ms: u64) -> Self {
        match self.config.backend {
            BackendKind::Aws => Self::aws_with_visibility(visibility_ms).await,
            BackendKind::Embedded => {
                self.config.visibility_timeout_ms = visibility_ms;
                self
            }
        }
    }

    /// A handle of its own (on the embedded store, a connection of its own), as another
    /// process would have.
    async fn open(&self) -> Backend {
        Backend::open_separate(&self.config).await.unwrap()
    }
}

fn id(s: &str) -> RecordId {
    RecordId::parse(s).unwrap()
}

fn msg(body: &str) -> OutgoingMessage {
    OutgoingMessage { body: body.as_bytes().to_vec(), ..OutgoingMessage::default() }
}

fn bodies(messages: &[sluice_core::backend::ReceivedMessage]) -> Vec<String> {
    messages.iter().map(|m| String::from_utf8(m.body.clone()).unwrap()).collect()
}

/// A result, with an attribute that each store keeps as it was given.
fn result(record: &str, label: &str, status: ResultStatus) -> PredictionResult {
    let mut result = sluice_core::testing::prediction_result(record, label, status);
    result.attributes.insert("partition_key".to_owned(), format!("{record}.png"));
    result
}

async fn queue_round_trip(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::Features);
    q.send_batch((0..5).map(|i| msg(&format!("m{i}"))).collect()).await.unwrap();
    assert_eq!(q.depth().await.unwrap().visible, 5);
    let got = q.receive(3, Duration::ZERO).await.unwrap();
    assert_eq!(bodies(&got), ["m0", "m1", "m2"]);
    assert!(got.iter().all(|m| m.receive_count == 1));
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (2, 3));
    q.ack(&got.iter().map(|m| m.receipt.clone()).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(q.depth().await.unwrap().total(), 2);
    // Other queues are untouched.
    assert_eq!(b.queue(QueueName::Inference).depth().await.unwrap().total(), 0);
}

async fn long_poll_waits_for_a_message(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::Inference);
    let sender = f.open().await;
    let send = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        sender.queue(QueueName::Inference).send_batch(vec![msg("late")]).await.unwrap();
    });
    let got = q.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(bodies(&got), ["late"]);
    send.await.unwrap();
    let empty = q.receive(10, Duration::from_millis(100)).await.unwrap();
    assert!(empty.is_empty());
}

async fn unacknowledged_messages_come_back_after_the_visibility_timeout(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::Results);
    q.send_batch(vec![msg("a")]).await.unwrap();
    let first = q.receive(1, Duration::ZERO).await.unwrap();
    assert!(q.receive(1, Duration::ZERO).await.unwrap().is_empty(), "invisible while in flight");
    tokio::time::sleep(Duration::from_millis(VISIBILITY_MS + 100)).await;
    let second = q.receive(1, Duration::ZERO).await.unwrap();
    assert_eq!(bodies(&second), ["a"]);
    assert_eq!(second[0].receive_count, 2);
    assert_ne!(first[0].receipt, second[0].receipt, "each receive has a receipt of its own");
    // (A stale receipt may or may not delete: SQS leaves that open. The latest one must.)
    q.ack(&[second[0].receipt.clone()]).await.unwrap();
    assert_eq!(q.depth().await.unwrap().total(), 0);
}

async fn visibility_can_be_extended_and_released(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::Features);
    q.send_batch(vec![msg("a"), msg("b")]).await.unwrap();
    let got = q.receive(2, Duration::ZERO).await.unwrap();
    q.extend_visibility(&[got[0].receipt.clone()], Duration::from_secs(10)).await.unwrap();
    q.release(&[got[1].receipt.clone()], Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(VISIBILITY_MS + 100)).await;
    let again = q.receive(10, Duration::ZERO).await.unwrap();
    assert_eq!(bodies(&again), ["b"], "a is still extended; b was released");
}

async fn messages_past_max_receives_are_redriven_to_the_stage_dlq(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::Inference);
    let mut attrs = std::collections::BTreeMap::new();
    attrs.insert("traceparent".to_owned(), "00-abc-def-01".to_owned());
    q.send_batch(vec![OutgoingMessage { body: b"poison".to_vec(), attributes: attrs, dedup_key: Some("r1".into()) }])
        .await
        .unwrap();
    for attempt in 1..=MAX_RECEIVES {
        let got = q.receive(1, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, attempt);
        q.release(&[got[0].receipt.clone()], Duration::ZERO).await.unwrap();
    }
    assert!(q.receive(1, Duration::ZERO).await.unwrap().is_empty(), "redriven instead of delivered");
    let dlq = b.queue(QueueName::InferenceDlq).peek(10).await.unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].body, b"poison", "the body is never rewritten");
    assert_eq!(dlq[0].attributes["traceparent"], "00-abc-def-01");
    let entry =
        DlqEntry::from_message(StageName::Inference, dlq[0].body.clone(), &dlq[0].attributes, dlq[0].receive_count, 0);
    assert_eq!(entry.reason, ReasonCode::MaxReceivesExceeded);
    assert!(entry.attempts >= MAX_RECEIVES, "{entry:?}");
    assert_eq!(entry.record_id, Some(id("r1")));
}

/// Dedup keys let a backend drop a duplicate (the embedded store's DLQs do, one entry a record;
/// SQS standard queues do not), but never a message with a key of its own.
async fn dedup_keys_never_drop_distinct_messages(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::IngestDlq);
    let keyed =
        |k: &str| OutgoingMessage { body: k.as_bytes().to_vec(), dedup_key: Some(k.to_owned()), ..Default::default() };
    q.send_batch(vec![keyed("x"), keyed("x"), keyed("y")]).await.unwrap();
    let got = bodies(&q.peek(10).await.unwrap());
    let distinct: BTreeSet<_> = got.iter().collect();
    assert_eq!(distinct.len(), 2, "{got:?}");
    assert!(got.len() <= 3);
}

/// A keyed entry someone holds does not stand for its record: a replay holds an entry while the
/// copy it sent goes back to work, and if that copy fails again before the replay deletes the
/// entry, the new entry must stay (a record lost otherwise).
async fn a_held_entry_does_not_drop_a_new_one(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::FeaturesDlq);
    let keyed = |body: &str| OutgoingMessage {
        body: body.as_bytes().to_vec(),
        dedup_key: Some("r1".to_owned()),
        ..Default::default()
    };
    q.send_batch(vec![keyed("first failure")]).await.unwrap();
    let held = q.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(bodies(&held), vec!["first failure".to_owned()]);
    q.send_batch(vec![keyed("failed again")]).await.unwrap();
    q.ack(&held.iter().map(|m| m.receipt.clone()).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(bodies(&q.peek(10).await.unwrap()), vec!["failed again".to_owned()]);
}

/// A look reads every message of a queue deeper than one receive (SQS gives at most ten), and
/// leaves them all to be received at once afterwards.
async fn a_look_reads_every_message_and_leaves_them_there(f: Fixture) {
    let b = f.open().await;
    let q = b.queue(QueueName::IngestDlq);
    let sent: BTreeSet<String> = (0..35).map(|i| format!("entry-{i:02}")).collect();
    q.send_batch(sent.iter().map(|body| msg(body)).collect()).await.unwrap();
    let looked = bodies(&q.peek(1_000).await.unwrap());
    assert_eq!(looked.len(), sent.len(), "{looked:?}");
    assert_eq!(looked.into_iter().collect::<BTreeSet<_>>(), sent);
    let mut received = BTreeSet::new();
    for _ in 0..20 {
        let batch = q.receive(10, Duration::from_secs(1)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        received.extend(bodies(&batch));
    }
    assert_eq!(received, sent, "the look left some hidden");
}

/// Nothing is lost when receivers compete, and within the visibility timeout (a long one here, so
/// a slow endpoint cannot make a message visible again) no message goes to two of them. SQS
/// standard queues promise at-least-once delivery only: AWS may hand a message out twice, and
/// moto's concurrent receives do now and then; so on that backend a rare duplicate is allowed.
async fn concurrent_receivers_split_the_work_without_loss(f: Fixture) {
    let f = f.with_visibility(60_000).await;
    let b = f.open().await;
    let total = 100;
    b.queue(QueueName::Features).send_batch((0..total).map(|i| msg(&format!("{i}"))).collect()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let handle = f.open().await;
        tasks.push(tokio::spawn(async move {
            let q = handle.queue(QueueName::Features);
            let mut seen = Vec::new();
            loop {
                let got = q.receive(7, Duration::ZERO).await.unwrap();
                if got.is_empty() {
                    return seen;
                }
                q.ack(&got.iter().map(|m| m.receipt.clone()).collect::<Vec<_>>()).await.unwrap();
                seen.extend(bodies(&got));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), total, "every message received");
    let duplicates = all.len() - total;
    match f.config.backend {
        BackendKind::Embedded => assert_eq!(duplicates, 0, "every message received once"),
        BackendKind::Aws => assert!(duplicates <= total / 20, "{duplicates} duplicate deliveries of {total}"),
    }
}

fn inputs(n: usize) -> Vec<StreamInput> {
    (0..n).map(|i| StreamInput { partition_key: format!("key-{i}"), data: format!("rec-{i}").into_bytes() }).collect()
}

type Consumer = Box<dyn sluice_core::backend::StreamConsumer>;

/// How long a stream test waits for something that should happen: leases move and shards are
/// read on timers, at most a few times a second.
const PATIENCE: Duration = Duration::from_secs(20);

/// Polls until `want` records have come (checkpointing each if asked), or fails.
async fn read_n(consumer: &mut Consumer, want: usize, checkpoint: bool) -> Vec<sluice_core::backend::StreamRecord> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut out = Vec::new();
    while out.len() < want {
        assert!(tokio::time::Instant::now() < deadline, "read {} of {want} records", out.len());
        let batch = consumer.poll(want - out.len()).await.unwrap();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for r in batch {
            if checkpoint {
                consumer.checkpoint(&r.shard, &r.sequence, 1).await.unwrap();
            }
            out.push(r);
        }
    }
    out
}

/// Polls until `done` holds of the consumers' shards, or fails.
async fn poll_until(consumers: &mut [&mut Consumer], what: &str, done: impl Fn(&[Vec<String>]) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        for c in consumers.iter_mut() {
            c.poll(1).await.unwrap();
        }
        let shards: Vec<Vec<String>> = consumers.iter().map(|c| c.shards()).collect();
        if done(&shards) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {shards:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stream_delivers_everything_in_shard_order(f: Fixture) {
    let b = f.open().await;
    b.stream.put_records(inputs(100)).await.unwrap();
    let mut consumer = b.stream.consumer("w1").await.unwrap();
    let mut per_shard: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for r in read_n(&mut consumer, 100, false).await {
        let n: u64 = String::from_utf8(r.data).unwrap()[4..].parse().unwrap();
        per_shard.entry(r.shard).or_default().push(n);
    }
    assert_eq!(consumer.shards().len(), 4, "a lone consumer holds every shard");
    let all: BTreeSet<u64> = per_shard.values().flatten().copied().collect();
    assert_eq!(all.len(), 100);
    for seq in per_shard.values() {
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "records of one shard arrive in order");
    }
    let stats = b.stream.stats().await.unwrap();
    assert_eq!((stats.records, stats.pending), (0, 100), "nothing checkpointed, so nothing counted in yet");
}

async fn a_new_consumer_resumes_after_the_checkpoint(f: Fixture) {
    let b = f.open().await;
    b.stream.put_records(inputs(40)).await.unwrap();
    let mut first = b.stream.consumer("w1").await.unwrap();
    read_n(&mut first, 40, true).await;
    first.release().await.unwrap();
    let stats = b.stream.stats().await.unwrap();
    assert_eq!((stats.records, stats.pending), (40, 0), "each checkpointed record counted in once");
    assert_eq!(stats.arrived.values().sum::<u64>(), 40);

    b.stream.put_records(inputs(10)).await.unwrap();
    let mut second = f.open().await.stream.consumer("w2").await.unwrap();
    let rest = read_n(&mut second, 10, false).await;
    let texts: BTreeSet<String> = rest.iter().map(|r| String::from_utf8(r.data.clone()).unwrap()).collect();
    assert_eq!(texts.len(), 10, "only what came after the checkpoint, each once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(second.poll(100).await.unwrap().is_empty(), "nothing before the checkpoint is read again");
}

async fn rewind_goes_back_to_the_checkpoint(f: Fixture) {
    let b = f.open().await;
    b.stream.put_records(inputs(20)).await.unwrap();
    let mut c = b.stream.consumer("w1").await.unwrap();
    let first = read_n(&mut c, 20, false).await;
    // Each shard checkpointed through the first half of what was read from it.
    let mut after = BTreeSet::new();
    for shard in c.shards() {
        let read: Vec<_> = first.iter().filter(|r| r.shard == shard).collect();
        let half = read.len() / 2;
        if half > 0 {
            c.checkpoint(&shard, &read[half - 1].sequence, half as u64).await.unwrap();
        }
        after.extend(read[half..].iter().map(|r| String::from_utf8(r.data.clone()).unwrap()));
        c.rewind(&shard).await.unwrap();
    }
    assert!(after.len() < 20, "something was checkpointed");
    let again = read_n(&mut c, after.len(), false).await;
    let texts: BTreeSet<String> = again.iter().map(|r| String::from_utf8(r.data.clone()).unwrap()).collect();
    assert_eq!(texts.len(), again.len(), "each once");
    assert_eq!(texts, after, "what follows each checkpoint");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.poll(100).await.unwrap().is_empty(), "nothing before a checkpoint is read again");
}

async fn consumers_share_shards_and_take_over_expired_leases(f: Fixture) {
    let b = f.open().await;
    b.stream.put_records(inputs(8)).await.unwrap();
    let mut one = b.stream.consumer("w1").await.unwrap();
    let mut two = f.open().await.stream.consumer("w2").await.unwrap();
    poll_until(&mut [&mut one], "w1 to hold every shard", |s| s[0].len() == 4).await;
    // The second takes its share from the first, which sees the loss on a later poll.
    poll_until(&mut [&mut one, &mut two], "a 2 + 2 split", |s| s[0].len() == 2 && s[1].len() == 2).await;
    let (a, b2): (BTreeSet<_>, BTreeSet<_>) = (one.shards().into_iter().collect(), two.shards().into_iter().collect());
    assert!(a.is_disjoint(&b2));

    // w1 dies without releasing: once its leases expire w2 holds everything.
    drop(one);
    poll_until(&mut [&mut two], "w2 to take over", |s| s[0].len() == 4).await;
}

async fn a_lost_lease_refuses_the_checkpoint(f: Fixture) {
    let b = f.open().await;
    b.stream.put_records(inputs(8)).await.unwrap();
    let mut one = b.stream.consumer("w1").await.unwrap();
    let batch = read_n(&mut one, 8, false).await;
    // w1 stops renewing (it is not polled); w2 takes everything once the leases expire.
    let mut two = f.open().await.stream.consumer("w2").await.unwrap();
    poll_until(&mut [&mut two], "w2 to take the expired leases", |s| s[0].len() == 4).await;
    let err = one.checkpoint(&batch[0].shard, &batch[0].sequence, 1).await.unwrap_err();
    assert_eq!(err.code(), ReasonCode::LeaseLost);
    assert!(err.is_retryable());
}

/// A vector is a function of its record, so a redelivery writes the same one again.
async fn feature_store_round_trips_and_tolerates_rewrites(f: Fixture) {
    let b = f.open().await;
    let values = |v: &[f32]| FeatureVector::Values(v.to_vec());
    b.features
        .put_if_absent(vec![
            (id("a"), values(&[1.0, 2.0])),
            (id("b"), FeatureVector::Pixels(vec![0, 128, 255])),
            (id("a"), values(&[1.0, 2.0])),
        ])
        .await
        .unwrap();
    b.features.put_if_absent(vec![(id("a"), values(&[1.0, 2.0]))]).await.unwrap();
    let got = b.features.get_batch(&[id("a"), id("b"), id("missing")]).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[&id("a")].as_ref().unwrap(), &values(&[1.0, 2.0]));
    assert_eq!(got[&id("b")].as_ref().unwrap(), &FeatureVector::Pixels(vec![0, 128, 255]));

    // An ImageNet-sized image as pixels (3×224×224 bytes) fits a DynamoDB item; as f32 values
    // it is larger than an item may be.
    let pixels = FeatureVector::Pixels((0..3 * 224 * 224).map(|i| (i % 251) as u8).collect());
    let large = FeatureVector::Values((0..3 * 224 * 224).map(|i| (i % 997) as f32 / 997.0 - 0.5).collect());
    b.features
        .put_if_absent(vec![(id("large"), large.clone()), (id("pixels"), pixels.clone()), (id("c"), values(&[4.0]))])
        .await
        .unwrap();
    b.features.put_if_absent(vec![(id("large"), large.clone())]).await.unwrap();
    let got = b.features.get_batch(&[id("large"), id("pixels"), id("c")]).await.unwrap();
    assert_eq!(got[&id("c")].as_ref().unwrap(), &values(&[4.0]));
    assert!(got[&id("large")].as_ref().unwrap() == &large, "the large vector came back changed");
    assert!(got[&id("pixels")].as_ref().unwrap() == &pixels, "the pixels came back changed");
}

async fn result_store_is_put_if_absent(f: Fixture) {
    let b = f.open().await;
    let first = b
        .results
        .put_if_absent(vec![result("r1", "7", ResultStatus::Accepted), result("r2", "1", ResultStatus::Review)])
        .await
        .unwrap();
    assert_eq!(first, vec![PutOutcome::Inserted, PutOutcome::Inserted]);
    let again = b.results.put_if_absent(vec![result("r1", "3", ResultStatus::Review)]).await.unwrap();
    match &again[0] {
        PutOutcome::AlreadyPresent(existing) => assert_eq!(existing.label, "7"),
        other => panic!("expected AlreadyPresent, got {other:?}"),
    }
    let counts = b.results.counts().await.unwrap();
    assert_eq!((counts.accepted, counts.review), (1, 1));
    let got = b.results.get_batch(&[id("r1"), id("nope")]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[&id("r1")].label, "7");
}

async fn result_store_scans_in_pages(f: Fixture) {
    let b = f.open().await;
    let all: Vec<_> = (0..25)
        .map(|i| {
            result(&format!("r{i:02}"), "1", if i % 5 == 0 { ResultStatus::Review } else { ResultStatus::Accepted })
        })
        .collect();
    b.results.put_if_absent(all).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let page = b.results.scan(seen.last(), 10, None).await.unwrap();
        if page.is_empty() {
            break;
        }
        seen.extend(page.into_iter().map(|r| r.record_id));
    }
    assert_eq!(seen.len(), 25);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 25, "pages do not overlap");
    let review = b.results.scan(None, 100, Some(ResultStatus::Review)).await.unwrap();
    assert_eq!(review.len(), 5);
}

async fn result_store_lists_by_status_class_and_time_in_pages(f: Fixture) {
    let b = f.open().await;
    let early: Vec<_> = (0..12)
        .map(|i| {
            let status = if i % 3 == 0 { ResultStatus::Review } else { ResultStatus::Accepted };
            result(&format!("q{i:02}"), if i % 2 == 0 { "even" } else { "odd" }, status)
        })
        .collect();
    b.results.put_if_absent(early).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = sluice_core::envelope::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.results.put_if_absent(vec![result("z-late", "even", ResultStatus::Accepted)]).await.unwrap();

    let all_pages = |query: ResultQuery| {
        let results = b.results.clone();
        async move {
            let (mut seen, mut query) = (Vec::new(), query);
            loop {
                let page = results.query(&query).await.unwrap();
                assert!(page.results.len() <= query.limit);
                seen.extend(page.results.into_iter().map(|r| r.record_id.to_string()));
                match page.next_page_token {
                    Some(token) => query.page_token = Some(token),
                    None => return seen,
                }
            }
        }
    };
    let everything = all_pages(ResultQuery { limit: 5, ..ResultQuery::default() }).await;
    assert_eq!(everything.len(), 13, "{everything:?}");
    assert_eq!(everything.iter().collect::<BTreeSet<_>>().len(), 13, "pages do not overlap");
    assert_eq!(everything.last().map(String::as_str), Some("z-late"), "in store order");
    let review =
        all_pages(ResultQuery { status: Some(ResultStatus::Review), limit: 2, ..ResultQuery::default() }).await;
    assert_eq!(review, ["q00", "q03", "q06", "q09"]);
    let odd = all_pages(ResultQuery { class: Some("odd".into()), limit: 4, ..ResultQuery::default() }).await;
    assert_eq!(odd.len(), 6);
    // A page reads no more than it may: a filter few pass ends pages early, and the pages still
    // hold every match, once each, in order.
    let a_few_at_a_time =
        ResultQuery { class: Some("odd".into()), limit: 4, examine_at_most: Some(3), ..ResultQuery::default() };
    assert_eq!(all_pages(a_few_at_a_time).await, odd);
    let late = all_pages(ResultQuery { since_ms: Some(since), limit: 10, ..ResultQuery::default() }).await;
    assert_eq!(late, ["z-late"]);
    let none = all_pages(ResultQuery { min_confidence: Some(0.95), limit: 10, ..ResultQuery::default() }).await;
    assert!(none.is_empty());
    assert!(PageToken::parse("nonsense").is_err());
    // A token handed out is URL-safe, and one of the form handed out before (`#`) still reads.
    let token = PageToken::after(1_796_686_941_493, &RecordId::parse("digits-fda25399-test-0040-0").unwrap());
    assert_eq!(token.to_string(), "1796686941493.digits-fda25399-test-0040-0");
    assert_eq!(PageToken::parse(&token.to_string()).unwrap(), token);
    assert_eq!(PageToken::parse(&token.key()).unwrap(), token);
    let cut = PageToken::parse("1796686941493").unwrap_err();
    assert!(cut.detail().contains("%23"), "{cut}");

    // A review settles once: a second settle finds it settled.
    let id = RecordId::parse("q03").unwrap();
    let first = b.results.resolve_review(&id, &Resolution::Label("odd".into())).await.unwrap();
    assert!(
        matches!(first, ReviewOutcome::Resolved(ref r) if r.status == ResultStatus::Reviewed && r.reviewed_label.as_deref() == Some("odd"))
    );
    let again = b.results.resolve_review(&id, &Resolution::Accept).await.unwrap();
    assert!(matches!(again, ReviewOutcome::NotWaiting(ref r) if r.status == ResultStatus::Reviewed));
    let missing = b.results.resolve_review(&RecordId::parse("nope").unwrap(), &Resolution::Accept).await.unwrap();
    assert_eq!(missing, ReviewOutcome::Missing);
    let counts = b.results.counts().await.unwrap();
    assert_eq!((counts.accepted, counts.review, counts.reviewed), (9, 3, 1));
    let reviewed =
        all_pages(ResultQuery { status: Some(ResultStatus::Reviewed), limit: 10, ..ResultQuery::default() }).await;
    assert_eq!(reviewed, ["q03"], "the index follows the status");

    // A review withdrawn (the record went to the DLQ instead) leaves no result behind.
    let q06 = RecordId::parse("q06").unwrap();
    assert!(matches!(b.results.withdraw_review(&q06).await.unwrap(), ReviewOutcome::Resolved(_)));
    assert_eq!(b.results.withdraw_review(&q06).await.unwrap(), ReviewOutcome::Missing);
    assert!(matches!(b.results.withdraw_review(&id).await.unwrap(), ReviewOutcome::NotWaiting(_)), "reviewed stays");
    assert!(b.results.get_batch(std::slice::from_ref(&q06)).await.unwrap().is_empty());
    let counts = b.results.counts().await.unwrap();
    assert_eq!((counts.accepted, counts.review, counts.reviewed), (9, 2, 1));
}

async fn blobs_round_trip_and_refuse_foreign_references(f: Fixture) {
    let b = f.open().await;
    let data = vec![7u8; 300_000];
    let reference = b.blobs.put(data.clone()).await.unwrap();
    assert_eq!(b.blobs.get(&reference).await.unwrap(), data);
    let foreign = b.blobs.get("https://example.com/x.png").await.unwrap_err();
    assert_eq!(foreign.code(), ReasonCode::ClaimCheckRejected);
    assert!(!foreign.is_retryable());
    let missing = b.blobs.get(&reference.replace(&reference[reference.len() - 4..], "0000")).await.unwrap_err();
    assert_eq!(missing.code(), ReasonCode::ClaimCheckMissing);
    // A reader's limit: the blob whole within it, refused (for good) past it.
    assert_eq!(b.blobs.get_at_most(&reference, data.len()).await.unwrap(), data);
    let over = b.blobs.get_at_most(&reference, data.len() - 1).await.unwrap_err();
    assert_eq!(over.code(), ReasonCode::PayloadTooLarge);
    assert!(!over.is_retryable() && over.detail().contains("300000 bytes"), "{over}");
}

async fn true_labels_are_recorded_once_whatever_the_status(f: Fixture) {
    let b = f.open().await;
    b.results
        .put_if_absent(vec![result("g1", "7", ResultStatus::Accepted), result("g2", "3", ResultStatus::Review)])
        .await
        .unwrap();
    assert_eq!(b.results.set_ground_truth(&id("g1"), "1").await.unwrap(), FeedbackOutcome::Recorded);
    assert_eq!(b.results.set_ground_truth(&id("g1"), "1").await.unwrap(), FeedbackOutcome::Unchanged);
    assert_eq!(b.results.set_ground_truth(&id("g1"), "7").await.unwrap(), FeedbackOutcome::Recorded);
    assert_eq!(b.results.set_ground_truth(&id("g2"), "3").await.unwrap(), FeedbackOutcome::Recorded);
    assert_eq!(b.results.set_ground_truth(&id("nobody"), "3").await.unwrap(), FeedbackOutcome::Missing);
    let stored = b.results.get_batch(&[id("g1"), id("g2")]).await.unwrap();
    assert_eq!(stored[&id("g1")].ground_truth.as_deref(), Some("7"));
    assert_eq!(stored[&id("g1")].label, "7", "the prediction itself is untouched");
    assert_eq!(stored[&id("g2")].status, ResultStatus::Review);
    // A review after the feedback keeps the true label.
    b.results.resolve_review(&id("g2"), &Resolution::Label("3".to_owned())).await.unwrap();
    assert_eq!(b.results.get_batch(&[id("g2")]).await.unwrap()[&id("g2")].ground_truth.as_deref(), Some("3"));
    let counts = b.results.counts().await.unwrap();
    assert_eq!((counts.accepted, counts.review, counts.reviewed), (1, 0, 1));
}

async fn capture_chunks_are_read_back_by_window(f: Fixture) {
    let b = f.open().await;
    let hour = 3_600_000;
    let t0 = 1_795_000_000_000;
    b.capture.append(b"a\n".to_vec(), t0).await.unwrap();
    b.capture.append(b"b\n".to_vec(), t0 + 1).await.unwrap();
    b.capture.append(b"c\n".to_vec(), t0 + 30 * hour).await.unwrap();
    let mut all = b.capture.read(t0, t0 + 40 * hour).await.unwrap();
    all.sort();
    assert_eq!(all.concat(), b"a\nb\nc\n");
    // A window ending before the last chunk was written does not need it.
    let mut early = b.capture.read(0, t0 + 2 * hour).await.unwrap();
    early.sort();
    assert_eq!(early.concat(), b"a\nb\n", "both chunks of the window, not the later one");
    assert_eq!(b.capture.get_meta("state.json").await.unwrap(), None);
    b.capture.put_meta("state.json", b"{\"v\":1}".to_vec()).await.unwrap();
    b.capture.put_meta("state.json", b"{\"v\":2}".to_vec()).await.unwrap();
    assert_eq!(b.capture.get_meta("state.json").await.unwrap(), Some(b"{\"v\":2}".to_vec()));
}

/// One module per backend, each running every test of the suite.
macro_rules! suite_for {
    ($backend:ident: $($test:ident),+) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Fixture::$backend().await).await;
                }
            )+
        }
    };
}

macro_rules! conformance {
    ($($test:ident),+ $(,)?) => {
        suite_for!(embedded: $($test),+);
        suite_for!(aws: $($test),+);
    };
}

conformance!(
    queue_round_trip,
    long_poll_waits_for_a_message,
    unacknowledged_messages_come_back_after_the_visibility_timeout,
    visibility_can_be_extended_and_released,
    messages_past_max_receives_are_redriven_to_the_stage_dlq,
    dedup_keys_never_drop_distinct_messages,
    a_held_entry_does_not_drop_a_new_one,
    a_look_reads_every_message_and_leaves_them_there,
    concurrent_receivers_split_the_work_without_loss,
    stream_delivers_everything_in_shard_order,
    a_new_consumer_resumes_after_the_checkpoint,
    rewind_goes_back_to_the_checkpoint,
    consumers_share_shards_and_take_over_expired_leases,
    a_lost_lease_refuses_the_checkpoint,
    feature_store_round_trips_and_tolerates_rewrites,
    result_store_is_put_if_absent,
    result_store_scans_in_pages,
    result_store_lists_by_status_class_and_time_in_pages,
    blobs_round_trip_and_refuse_foreign_references,
    true_labels_are_recorded_once_whatever_the_status,
    capture_chunks_are_read_back_by_window,
);
