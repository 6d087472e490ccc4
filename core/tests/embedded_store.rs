//! The embedded store's own upkeep: its write-ahead log is copied into the database file by a
//! thread of its own, not by a writer. And its queues' own edges.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_core::backend::{Backend, Checkpoint, OutgoingMessage, StreamInput, StreamRecord};
use sluice_core::config::{StoreConfig, WorkerConfig};
use sluice_core::error::{ReasonCode, SluiceError};
use sluice_core::record::DlqEntry;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{BatchPolicy, Delivery, Outcome, QueueSource, Stage, StreamSource, Worker};
use tokio_util::sync::CancellationToken;

/// A store in a folder of its own (kept while the guard lives), `config` giving the rest.
async fn fresh(config: StoreConfig) -> (tempfile::TempDir, StoreConfig, Backend) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { path: dir.path().join("store.sqlite"), ..config };
    let backend = Backend::open(&config).await.unwrap();
    (dir, config, backend)
}

/// A message whose body is the one byte `i`.
fn byte(i: u8) -> OutgoingMessage {
    OutgoingMessage { body: vec![i], ..Default::default() }
}

#[tokio::test]
async fn the_log_reaches_the_database_file_without_a_writer_checkpointing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let backend = Backend::open(&StoreConfig { path: path.clone(), ..StoreConfig::default() }).await.unwrap();

    // 600 KiB: far below the log size at which a writer would checkpoint by itself.
    let message = |i: usize| OutgoingMessage {
        body: vec![b'a' + (i % 26) as u8; 2048],
        attributes: Default::default(),
        dedup_key: Some(format!("record-{i}")),
    };
    let written = 300 * 2048;
    backend.queue(QueueName::Features).send_batch((0..300).map(message).collect()).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut size = 0;
    while Instant::now() < deadline {
        size = std::fs::metadata(&path).unwrap().len();
        if size > written {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        size > written,
        "the database file holds {size} bytes after {written} bytes were written: not checkpointed"
    );
}

/// `checkpoint_interval_ms` paces the checkpoints: with a minute's interval, what a send wrote
/// stays in the log (nothing syncs it into the file) until the store is closed.
#[tokio::test]
async fn checkpoints_come_at_the_configured_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sqlite");
    let config = StoreConfig { path: path.clone(), checkpoint_interval_ms: 60_000, ..StoreConfig::default() };
    let backend = Backend::open(&config).await.unwrap();
    let written = 300 * 2048;
    let message = |i: usize| OutgoingMessage { body: vec![b'a' + (i % 26) as u8; 2048], ..Default::default() };
    backend.queue(QueueName::Features).send_batch((0..300).map(message).collect()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size < written, "the database file holds {size} bytes: checkpointed before its interval");
    drop(backend);
}

/// With no visibility timeout a received message is visible again at once; one receive still
/// hands each message out once (its look for more after a short batch used to find the same
/// messages again).
#[tokio::test]
async fn one_receive_hands_each_message_out_once_even_without_a_visibility_timeout() {
    let (_dir, _, backend) = fresh(StoreConfig { visibility_timeout_ms: 0, ..StoreConfig::default() }).await;
    let queue = backend.queue(QueueName::Inference);
    queue.send_batch((0..3).map(byte).collect()).await.unwrap();

    let received = queue.receive(10, Duration::ZERO).await.unwrap();
    let bodies: Vec<Vec<u8>> = received.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, [vec![0], vec![1], vec![2]]);
}

/// The same with a redrive in the receive: the receive looks again to fill its batch, and must
/// not take the messages it has just taken (visible again at once) a second time.
#[tokio::test]
async fn a_receive_that_redrives_still_hands_each_message_out_once_without_a_visibility_timeout() {
    let config = StoreConfig { visibility_timeout_ms: 0, max_receives: 2, ..StoreConfig::default() };
    let (_dir, _, backend) = fresh(config).await;
    let queue = backend.queue(QueueName::Features);
    queue.send_batch(vec![byte(1)]).await.unwrap();
    for _ in 0..2 {
        assert_eq!(queue.receive(10, Duration::ZERO).await.unwrap().len(), 1);
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    queue.send_batch(vec![byte(2)]).await.unwrap();

    let received = queue.receive(10, Duration::ZERO).await.unwrap();
    let bodies: Vec<Vec<u8>> = received.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, [vec![2]], "1 redriven, 2 handed out once");
    let dlq = backend.queue(QueueName::FeaturesDlq).peek(10).await.unwrap();
    assert_eq!(dlq.iter().map(|m| m.body.clone()).collect::<Vec<_>>(), [vec![1]]);
}

/// A stage's sends and its acknowledgement commit as one: both, or neither when a send fails.
#[tokio::test]
async fn sends_and_the_acknowledgement_commit_together_or_not_at_all() {
    let (_dir, config, backend) = fresh(StoreConfig::default()).await;
    let features = backend.queue(QueueName::Features);
    assert!(features.forwards_with_ack());
    let queues = [QueueName::Features, QueueName::Inference, QueueName::Results];

    features.send_batch(vec![byte(1), byte(2)]).await.unwrap();
    let first = features.receive(1, Duration::ZERO).await.unwrap();
    features
        .forward_and_ack(vec![(QueueName::Inference, vec![byte(10), byte(11)])], &[first[0].receipt.clone()])
        .await
        .unwrap();
    assert_eq!(depths(&backend, queues).await, [(1, 0), (2, 0), (0, 0)], "sent and acknowledged");

    // Another process makes every send to the results queue fail (a trigger, on a connection of
    // its own): the inference queue's message stays unacknowledged, and nothing is half sent.
    let _refusing = refuse_sends(&config, QueueName::Results);
    let inference = backend.queue(QueueName::Inference);
    let second = inference.receive(1, Duration::ZERO).await.unwrap();
    let refused = inference
        .forward_and_ack(
            vec![(QueueName::Features, vec![byte(20)]), (QueueName::Results, vec![byte(21)])],
            &[second[0].receipt.clone()],
        )
        .await;
    assert!(refused.is_err(), "the refused send fails the whole: {refused:?}");
    assert_eq!(depths(&backend, queues).await, [(1, 0), (1, 1), (0, 0)], "none of it happened");
}

/// A worker whose message was received again while it worked (its visibility ran out, a
/// heartbeat failed) sends nothing with a stale acknowledgement: the message is another
/// worker's now, or in the DLQ, and its result beside a DLQ entry would be two outcomes.
#[tokio::test]
async fn sends_with_a_stale_acknowledgement_are_not_made() {
    let (_dir, _, backend) = fresh(StoreConfig::default()).await;
    let features = backend.queue(QueueName::Features);
    let queues = [QueueName::Features, QueueName::Inference, QueueName::Results];
    features.send_batch(vec![byte(1), byte(2)]).await.unwrap();
    let slow = features.receive_hidden(2, Duration::ZERO, Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = features.receive_hidden(1, Duration::ZERO, Duration::from_secs(30)).await.unwrap();
    assert_eq!(again.len(), 1);

    let receipts: Vec<_> = slow.iter().map(|m| m.receipt.clone()).collect();
    let refused = features.forward_and_ack(vec![(QueueName::Inference, vec![byte(10), byte(11)])], &receipts).await;
    let error = refused.expect_err("one receipt is stale");
    assert!(error.is_retryable() && error.detail().contains("received again"), "{error}");
    assert_eq!(depths(&backend, queues).await, [(1, 1), (0, 0), (0, 0)], "nothing sent, nothing acknowledged");

    // The one still held by the slow worker, and the new receive, each go through.
    let held = slow.iter().find(|m| m.body != again[0].body).unwrap();
    for (body, receipt) in [(10, &held.receipt), (11, &again[0].receipt)] {
        let sends = vec![(QueueName::Inference, vec![byte(body)])];
        features.forward_and_ack(sends, std::slice::from_ref(receipt)).await.unwrap();
    }
    assert_eq!(depths(&backend, queues).await, [(0, 0), (2, 0), (0, 0)]);
}

/// A stage that forwards each delivery to `to`, but one whose body starts with "retry" fails
/// (retryable): every time, or with `once` only the first time.
struct Forward {
    stage: StageName,
    to: QueueName,
    once: bool,
    failed: std::sync::atomic::AtomicBool,
}

impl Forward {
    fn new(stage: StageName, to: QueueName, once: bool) -> Arc<Self> {
        Arc::new(Self { stage, to, once, failed: Default::default() })
    }
}

#[async_trait]
impl Stage for Forward {
    fn name(&self) -> StageName {
        self.stage
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(10)
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        batch
            .iter()
            .map(|d| {
                let fails = d.body.starts_with(b"retry")
                    && !(self.once && self.failed.swap(true, std::sync::atomic::Ordering::SeqCst));
                if fails {
                    return Outcome::failed(SluiceError::retryable(ReasonCode::Internal, "not yet"), None);
                }
                if d.body.starts_with(b"denied") {
                    let error = SluiceError::permanent(ReasonCode::Misconfigured, "AccessDeniedException");
                    return Outcome::failed(error, None);
                }
                Outcome::forward(self.to, OutgoingMessage { body: d.body.clone(), ..Default::default() })
            })
            .collect()
    }
}

fn messages(bodies: &[&str]) -> Vec<OutgoingMessage> {
    bodies.iter().map(|b| OutgoingMessage { body: b.as_bytes().to_vec(), ..Default::default() }).collect()
}

/// A worker of `stage` on the features queue, which is sent `bodies` first: polls of 50 ms, no
/// delay before a retry.
async fn on_features(backend: &Backend, store: &StoreConfig, stage: Arc<dyn Stage>, bodies: &[&str]) -> Worker {
    let features = backend.queue(QueueName::Features);
    features.send_batch(messages(bodies)).await.unwrap();
    let config = WorkerConfig { poll_wait_ms: 50, retry_delay_ms: 0, ..WorkerConfig::default() };
    Worker::new(stage, Box::new(QueueSource::new(features, store)), backend.clone(), config, store)
}

/// Waits (up to 10 s) for the visible messages of `queues` to be `want`, and nothing in flight.
async fn settle_at(backend: &Backend, queues: [QueueName; 3], want: [u64; 3]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = want.map(|visible| (visible, 0));
    loop {
        let seen = depths(backend, queues).await;
        if seen == want {
            return;
        }
        assert!(Instant::now() < deadline, "{queues:?}: (visible, in flight) {seen:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each queue's (visible, in flight) messages.
async fn depths(backend: &Backend, queues: [QueueName; 3]) -> [(u64, u64); 3] {
    let mut out = [(0, 0); 3];
    for (depth, queue) in out.iter_mut().zip(queues) {
        let d = backend.queue(queue).depth().await.unwrap();
        *depth = (d.visible, d.in_flight);
    }
    out
}

/// Makes every send to `queue` fail from now on, as another process could (a trigger, on a
/// connection of its own, returned: `DROP TRIGGER refuse_sends` on it lifts the refusal).
fn refuse_sends(store: &StoreConfig, queue: QueueName) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(&store.path).unwrap();
    conn.execute_batch(&format!(
        "CREATE TRIGGER refuse_sends BEFORE INSERT ON queue_runs WHEN NEW.queue = '{}' \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        queue.as_str()
    ))
    .unwrap();
    conn
}

/// A worker on the embedded store: a refused send leaves its whole batch unacknowledged (it comes
/// back until redriven, nothing half sent); then a batch forwards and acknowledges what it did, and
/// the delivery that failed comes back on its own until its last receive, when it is dead-lettered
/// with its cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_acknowledges_only_with_its_sends_and_never_loses_a_refused_batch() {
    let (_dir, store, backend) = fresh(StoreConfig { max_receives: 2, ..StoreConfig::default() }).await;
    let queues = [QueueName::Features, QueueName::Inference, QueueName::FeaturesDlq];
    let refusing = refuse_sends(&store, QueueName::Inference);
    let stage = Forward::new(StageName::Features, QueueName::Inference, false);
    let worker = on_features(&backend, &store, stage, &["a", "b", "c"]).await;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    // Every send refused: each try hands the batch back, until the receives run out.
    settle_at(&backend, queues, [0, 0, 3]).await;

    refusing.execute_batch("DROP TRIGGER refuse_sends").unwrap();
    backend.queue(QueueName::Features).send_batch(messages(&["d", "retry-e", "f"])).await.unwrap();
    settle_at(&backend, queues, [0, 2, 4]).await;
    // The batches whose sends were refused were never acknowledged: the queue's redrive moved
    // them. The delivery that failed on every receive was dead-lettered by the worker, with why.
    let entries: Vec<DlqEntry> = backend
        .queue(QueueName::FeaturesDlq)
        .peek(10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| DlqEntry::from_message(StageName::Features, m.body, &m.attributes, 0, 0))
        .collect();
    let redriven = entries.iter().filter(|e| e.reason == ReasonCode::MaxReceivesExceeded).count();
    assert_eq!(redriven, 3, "{entries:?}");
    let given_up = entries.iter().find(|e| e.body == b"retry-e").unwrap();
    assert_eq!(given_up.reason, ReasonCode::Internal, "{given_up:?}");
    assert!(given_up.detail.starts_with("gave up after 2 receives: not yet"), "{given_up:?}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
}

/// A batch whose records all fail for one retryable reason says so in one warning (how many,
/// the first's id and error), not one a record: a store that cannot be reached would otherwise
/// log every record of every batch at each receive. Each is dead-lettered in a line of its own.
#[tokio::test]
async fn records_a_batch_retries_are_logged_a_line_a_reason() {
    let (logged, _logging) = sluice_core::testing::Logged::on_this_thread();
    let (_dir, store, backend) = fresh(StoreConfig { max_receives: 2, ..StoreConfig::default() }).await;
    let stage = Forward::new(StageName::Features, QueueName::Inference, false);
    let worker = on_features(&backend, &store, stage, &["retry-1", "retry-2", "retry-3", "retry-4"]).await;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    settle_at(&backend, [QueueName::Features, QueueName::Inference, QueueName::FeaturesDlq], [0, 0, 4]).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();

    let text = logged.text();
    let lines = |what: &str| text.lines().filter(|l| l.contains(what)).collect::<Vec<_>>();
    let retries = lines("will retry");
    assert_eq!(retries.len(), 1, "{text}");
    assert!(retries[0].contains("code=\"internal\"") && retries[0].contains("records=4"), "{text}");
    assert!(retries[0].contains("WARN") && retries[0].contains("not yet"), "{text}");
    assert_eq!(lines("dead-lettered").len(), 4, "{text}");
}

/// A store that refuses the deployment (access denied, a table missing) is not the records'
/// fault: the batch goes back whole, nothing is dead-lettered or sent on, and the worker stops
/// with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfiguration_hands_the_batch_back_and_stops_the_worker() {
    let (_dir, store, backend) = fresh(StoreConfig::default()).await;
    let stage = Forward::new(StageName::Features, QueueName::Inference, false);
    let worker = on_features(&backend, &store, stage, &["a", "denied-b", "retry-c"]).await;

    let stopped = tokio::time::timeout(Duration::from_secs(10), worker.run(CancellationToken::new())).await.unwrap();
    let error = stopped.unwrap_err();
    assert_eq!(error.code(), ReasonCode::Misconfigured, "{error}");
    let queues = [QueueName::Features, QueueName::Inference, QueueName::FeaturesDlq];
    settle_at(&backend, queues, [3, 0, 0]).await;
}

/// A stage that forwards each delivery, and panics at one whose body starts with "panic".
struct Panics;

#[async_trait]
impl Stage for Panics {
    fn name(&self) -> StageName {
        StageName::Features
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(10)
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let bodies = sluice_core::threads::on_every_core(batch.iter().collect(), |d: &Delivery| {
            assert!(!d.body.starts_with(b"panic"), "a decoder's bug");
            d.body.clone()
        });
        let to = |body| Outcome::forward(QueueName::Inference, OutgoingMessage { body, ..Default::default() });
        bodies.into_iter().map(to).collect()
    }
}

/// A panic in a stage (here in the thread pool, as a decoder's would be) costs the record that
/// caused it, dead-lettered as `internal`, not the worker nor the records batched with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_stage_panics_on_is_dead_lettered_and_the_worker_goes_on() {
    let (_dir, store, backend) = fresh(StoreConfig::default()).await;
    let worker = on_features(&backend, &store, Arc::new(Panics), &["a", "panic-b", "c"]).await;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    let queues = [QueueName::Features, QueueName::Inference, QueueName::FeaturesDlq];
    settle_at(&backend, queues, [0, 2, 1]).await;
    let dead = backend.queue(QueueName::FeaturesDlq).peek(10).await.unwrap();
    let entry = DlqEntry::from_message(StageName::Features, dead[0].body.clone(), &dead[0].attributes, 0, 0);
    assert_eq!((entry.body.as_slice(), entry.reason), (&b"panic-b"[..], ReasonCode::Internal), "{entry:?}");
    assert!(entry.detail.contains("a decoder's bug"), "{entry:?}");
    assert!(!running.is_finished(), "the worker goes on");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
}

/// Records `bodies` on a stream of one shard, each its own partition key.
async fn on_the_stream(backend: &Backend, bodies: &[&str]) {
    let inputs = bodies.iter().map(|b| StreamInput { partition_key: (*b).to_owned(), data: b.as_bytes().to_vec() });
    backend.stream.put_records(inputs.collect()).await.unwrap();
}

/// Records `keys` on the stream, reads them all and checkpoints through the one at `through`,
/// letting the shards go; what was read.
async fn checkpointed_through(backend: &Backend, keys: &[&str], through: usize) -> Vec<StreamRecord> {
    on_the_stream(backend, keys).await;
    let mut consumer = backend.stream.consumer("w1").await.unwrap();
    let read = consumer.poll(keys.len()).await.unwrap();
    assert_eq!(read.len(), keys.len());
    consumer.checkpoint(&read[through].shard, &read[through].sequence, through as u64 + 1).await.unwrap();
    consumer.release().await.unwrap();
    read
}

/// The stream forgets what ingest has checkpointed once it is older than the retention (the
/// store file stops growing), keeps what is not checkpointed however old, and still counts
/// what came in.
#[tokio::test]
async fn checkpointed_records_past_the_retention_are_deleted_and_still_counted() {
    let (_dir, config, backend) = fresh(StoreConfig { shards: 1, ..StoreConfig::default() }).await;
    let keys: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    let read = checkpointed_through(&backend, &keys.iter().map(String::as_str).collect::<Vec<_>>(), 5).await;

    // Two days pass.
    let conn = rusqlite::Connection::open(&config.path).unwrap();
    conn.execute("UPDATE stream_records SET arrived_ms = arrived_ms - 2 * 86400000", []).unwrap();
    let left = || conn.query_row("SELECT COUNT(*) FROM stream_records", [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(left(), 10);
    // The next consumer to hold the shard deletes what is past the retention.
    let mut next = backend.stream.consumer("w2").await.unwrap();
    let again = next.poll(10).await.unwrap();
    assert_eq!(
        again.iter().map(|r| r.sequence.clone()).collect::<Vec<_>>(),
        read[6..].iter().map(|r| r.sequence.clone()).collect::<Vec<_>>()
    );
    assert_eq!(left(), 4, "the six checkpointed records went; the four not checkpointed stay");
    let stats = backend.stream.stats().await.unwrap();
    assert_eq!((stats.records, stats.pending), (6, 4), "what came in is still counted");
}

/// A store made before shards counted their arrivals is given the count, from its log, when it
/// is opened.
#[tokio::test]
async fn a_store_made_before_arrivals_were_counted_counts_them_from_its_log() {
    let (_dir, config, backend) = fresh(StoreConfig { shards: 1, ..StoreConfig::default() }).await;
    checkpointed_through(&backend, &["a", "b", "c"], 1).await;
    drop(backend);
    let conn = rusqlite::Connection::open(&config.path).unwrap();
    conn.execute_batch("ALTER TABLE stream_shards DROP COLUMN arrived").unwrap();
    drop(conn);

    let reopened = Backend::open(&config).await.unwrap();
    let stats = reopened.stream.stats().await.unwrap();
    assert_eq!((stats.records, stats.pending), (2, 1));
}

/// A worker's polls take its shards in turn: one with a backlog of more than a poll takes does
/// not keep the others unread until it is drained.
#[tokio::test]
async fn polls_take_the_shards_in_turn() {
    let (_dir, _, backend) = fresh(StoreConfig { shards: 4, ..StoreConfig::default() }).await;
    let keys: Vec<String> = (0..400).map(|i| format!("key-{i}")).collect();
    on_the_stream(&backend, &keys.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let mut consumer = backend.stream.consumer("w1").await.unwrap();
    let mut first_shards = BTreeSet::new();
    for _ in 0..4 {
        let read = consumer.poll(5).await.unwrap();
        assert_eq!(read.len(), 5);
        first_shards.insert(read[0].shard.clone());
    }
    assert_eq!(first_shards.len(), 4, "four polls began at four shards: {first_shards:?}");
}

/// A stream's checkpoints commit with the sends: both, or neither when a send fails; a shard
/// another worker has taken by now is not checkpointed (its records are read again by the new
/// owner), though the sends go ahead.
#[tokio::test]
async fn stream_checkpoints_commit_with_their_sends_or_not_at_all() {
    let (_dir, config, backend) =
        fresh(StoreConfig { shards: 1, lease_duration_ms: 300, ..StoreConfig::default() }).await;
    let queues = [QueueName::Features, QueueName::Inference, QueueName::Results];
    on_the_stream(&backend, &["a", "b", "c"]).await;
    let mut consumer = backend.stream.consumer("w1").await.unwrap();
    assert!(consumer.forwards_with_checkpoint());
    let read = consumer.poll(10).await.unwrap();
    assert_eq!(read.len(), 3);
    let upto = |i: usize| Checkpoint { shard: read[i].shard.clone(), sequence: read[i].sequence.clone(), records: 1 };

    let held = consumer.forward_and_checkpoint(vec![(QueueName::Features, vec![byte(1)])], &[upto(0)]).await.unwrap();
    assert_eq!(held, [true]);
    assert_eq!(depths(&backend, queues).await, [(1, 0), (0, 0), (0, 0)]);
    assert_eq!(backend.stream.stats().await.unwrap().pending, 2, "checkpointed past the first");

    let refusing = refuse_sends(&config, QueueName::Features);
    let refused = consumer.forward_and_checkpoint(vec![(QueueName::Features, vec![byte(2)])], &[upto(1)]).await;
    assert!(refused.is_err(), "the refused send fails the whole: {refused:?}");
    assert_eq!(backend.stream.stats().await.unwrap().pending, 2, "not checkpointed either");
    refusing.execute_batch("DROP TRIGGER refuse_sends").unwrap();

    // w1 stops renewing; w2 takes the shard once its lease runs out.
    let mut other = backend.stream.consumer("w2").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while other.shards().is_empty() {
        assert!(Instant::now() < deadline, "w2 never took the shard");
        tokio::time::sleep(Duration::from_millis(50)).await;
        other.poll(10).await.unwrap();
    }
    let held = consumer.forward_and_checkpoint(vec![(QueueName::Features, vec![byte(3)])], &[upto(2)]).await.unwrap();
    assert_eq!(held, [false], "the lease was lost");
    assert_eq!(depths(&backend, queues).await, [(2, 0), (0, 0), (0, 0)], "sent all the same");
    assert_eq!(backend.stream.stats().await.unwrap().pending, 2, "left for the new owner");
}

/// Ingest's worker on the embedded store sends and checkpoints as one, up to the first retry of
/// a batch: the records from the retry on are read again, and everything is sent, checkpointed
/// and counted in at last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_worker_checkpoints_with_its_sends_up_to_its_first_retry() {
    let (_dir, store, backend) = fresh(StoreConfig { shards: 1, ..StoreConfig::default() }).await;
    on_the_stream(&backend, &["a", "retry-b", "c"]).await;
    let config = WorkerConfig { poll_wait_ms: 50, retry_delay_ms: 0, ..WorkerConfig::default() };
    let source = StreamSource::new(backend.stream.consumer("w1").await.unwrap());
    let worker = Worker::new(
        Forward::new(StageName::Ingest, QueueName::Features, true),
        Box::new(source),
        backend.clone(),
        config,
        &store,
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = backend.stream.stats().await.unwrap();
        if stats.pending == 0 {
            break stats;
        }
        assert!(Instant::now() < deadline, "never checkpointed to the end: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stats.records, 3, "each counted in once");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
    let sent = backend.queue(QueueName::Features).receive(10, Duration::ZERO).await.unwrap();
    let mut bodies: Vec<String> = sent.iter().map(|m| String::from_utf8(m.body.clone()).unwrap()).collect();
    bodies.sort();
    // c came in the first batch, after the retry, so it was not checkpointed then; read again
    // with retry-b, it was checkpointed, not sent on a second time.
    assert_eq!(bodies, ["a", "c", "retry-b"]);
}

/// A stream record that fails on every read does not hold its shard up for good: read as often
/// as a queue message may be received, it is dead-lettered with why, and the shard checkpoints
/// past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_record_that_always_fails_is_dead_lettered_after_its_reads() {
    let (_dir, store, backend) = fresh(StoreConfig { shards: 1, max_receives: 3, ..StoreConfig::default() }).await;
    on_the_stream(&backend, &["a", "retry-b", "c"]).await;
    let config = WorkerConfig { poll_wait_ms: 50, retry_delay_ms: 10, ..WorkerConfig::default() };
    let source = StreamSource::new(backend.stream.consumer("w1").await.unwrap());
    let stage = Forward::new(StageName::Ingest, QueueName::Features, false);
    let worker = Worker::new(stage, Box::new(source), backend.clone(), config, &store);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.stream.stats().await.unwrap().pending > 0 {
        assert!(Instant::now() < deadline, "the shard never got past the failing record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
    let dead = backend.queue(QueueName::IngestDlq).peek(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let entry = DlqEntry::from_message(StageName::Ingest, dead[0].body.clone(), &dead[0].attributes, 0, 0);
    assert_eq!((entry.body.as_slice(), entry.reason), (&b"retry-b"[..], ReasonCode::Internal), "{entry:?}");
    assert!(entry.detail.starts_with("gave up after 3 receives: not yet"), "{entry:?}");
}

/// An idle receiver looks without the write lock, so another process writing does not hold it up:
/// at first, and again once it has emptied its queue.
#[tokio::test]
async fn an_idle_receiver_does_not_wait_for_the_write_lock() {
    let (_dir, config, backend) = fresh(StoreConfig { busy_timeout_ms: 100, ..StoreConfig::default() }).await;
    let queue = backend.queue(QueueName::Features);
    let hold_write_lock = || {
        let conn = rusqlite::Connection::open(&config.path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        conn
    };

    let writing = hold_write_lock();
    assert!(queue.receive(10, Duration::ZERO).await.unwrap().is_empty(), "an idle receive waited for the lock");
    drop(writing);

    queue.send_batch((0..2).map(byte).collect()).await.unwrap();
    assert_eq!(queue.receive(10, Duration::ZERO).await.unwrap().len(), 2);
    let writing = hold_write_lock();
    assert!(queue.receive(10, Duration::ZERO).await.unwrap().is_empty(), "a receiver idle again waited for the lock");
    drop(writing);
}

/// A queue keeps a send's messages together (one batch) and tracks them in stretches: a receive,
/// an acknowledgement or a release that takes part of a stretch leaves the rest as it was, a
/// stale receipt changes nothing, and once every message is acknowledged nothing is left behind.
#[tokio::test]
async fn part_of_a_batch_received_acknowledged_or_released_leaves_the_rest_as_it_was() {
    let (_dir, config, backend) = fresh(StoreConfig::default()).await;
    let queue = backend.queue(QueueName::Inference);
    let depth = || async { queue.depth().await.map(|d| (d.visible, d.in_flight)).unwrap() };
    let message =
        |i: u8| OutgoingMessage { body: vec![i], attributes: [("n".into(), i.to_string())].into(), dedup_key: None };
    queue.send_batch((0..6).map(message).collect()).await.unwrap();

    let first = queue.receive(4, Duration::ZERO).await.unwrap();
    let bodies = |got: &[sluice_core::backend::ReceivedMessage]| got.iter().map(|m| m.body[0]).collect::<Vec<_>>();
    assert_eq!(bodies(&first), [0, 1, 2, 3]);
    assert_eq!(first[3].attributes["n"], "3");
    assert_eq!(depth().await, (2, 4), "the two not taken stay visible");

    queue.ack(&[first[0].receipt.clone(), first[2].receipt.clone()]).await.unwrap();
    queue.release(&[first[1].receipt.clone()], Duration::ZERO).await.unwrap();
    assert_eq!(depth().await, (3, 1), "0 and 2 gone, 1 back, 3 still out");

    let second = queue.receive(10, Duration::ZERO).await.unwrap();
    let mut counts: Vec<(u8, u32)> = second.iter().map(|m| (m.body[0], m.receive_count)).collect();
    counts.sort();
    assert_eq!(counts, [(1, 2), (4, 1), (5, 1)], "1 again, 4 and 5 for the first time");
    queue.ack(&[first[1].receipt.clone()]).await.unwrap();
    assert_eq!(depth().await, (0, 4), "a receipt of an earlier receive is stale");

    let all: Vec<_> = second.iter().chain(&first[3..]).map(|m| m.receipt.clone()).collect();
    queue.ack(&all).await.unwrap();
    assert_eq!(depth().await, (0, 0));
    let conn = rusqlite::Connection::open(&config.path).unwrap();
    let left: i64 = conn.query_row("SELECT COUNT(*) FROM queue_batches", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0, "a batch all of whose messages are acknowledged is deleted");
}

/// A store written before queues kept batches (a row per message, in `messages`) is moved when a
/// new build opens it: every message stays, with its receive count, visibility and DLQ key.
#[tokio::test]
async fn queued_messages_of_a_store_with_a_row_per_message_are_moved_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { path: dir.path().join("store.sqlite"), ..StoreConfig::default() };
    let far = 4_000_000_000_000_i64;
    {
        let conn = rusqlite::Connection::open(&config.path).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, body BLOB NOT NULL, \
               attributes TEXT NOT NULL, dedup_key TEXT, receive_count INTEGER NOT NULL DEFAULT 0, \
               visible_at_ms INTEGER NOT NULL, sent_at_ms INTEGER NOT NULL, first_received_ms INTEGER); \
             INSERT INTO messages (queue, body, attributes, dedup_key, receive_count, visible_at_ms, sent_at_ms) VALUES \
               ('inference', x'01', '{{\"traceparent\":\"t1\"}}', 'r1', 0, 0, 5), \
               ('inference', x'02', '{{}}', 'r2', 1, {far}, 5), \
               ('features-dlq', x'03', '{{\"reason\":\"bad\"}}', 'r3', 0, 0, 5);"
        ))
        .unwrap();
    }
    let backend = Backend::open(&config).await.unwrap();
    let inference = backend.queue(QueueName::Inference);
    let depth = inference.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (1, 1));
    let got = inference.receive(10, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].body.as_slice(), got[0].attributes["traceparent"].as_str()), (&[1u8][..], "t1"));
    assert_eq!(got[0].sent_at_ms, 5);

    let dlq = backend.queue(QueueName::FeaturesDlq);
    let again = OutgoingMessage { body: vec![3], dedup_key: Some("r3".into()), ..Default::default() };
    dlq.send_batch(vec![again]).await.unwrap();
    let entries = dlq.peek(10).await.unwrap();
    assert_eq!(entries.len(), 1, "the moved entry still refuses a second one for its record");
    assert_eq!(entries[0].attributes["reason"], "bad");

    let conn = rusqlite::Connection::open(&config.path).unwrap();
    let old: i64 =
        conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'messages'", [], |r| r.get(0)).unwrap();
    assert_eq!(old, 0, "the old table is gone");
}

/// A batch whose stored bytes cannot be read (a bug, a damaged disk, a missing row) holds up no
/// other message: receives hand out the rest, and once its messages are received too often the
/// whole batch goes to the DLQ as one entry holding its bytes, for an operator to look at, every
/// run of it at once, and leaves the queue empty.
#[tokio::test]
async fn an_unreadable_batch_holds_up_nothing_and_ends_in_the_dlq_as_one_entry() {
    let config = StoreConfig { visibility_timeout_ms: 0, max_receives: 2, ..StoreConfig::default() };
    let (_dir, config, backend) = fresh(config).await;
    let queue = backend.queue(QueueName::Features);
    queue.send_batch(vec![byte(1), byte(2), byte(3)]).await.unwrap();
    queue.send_batch(vec![byte(4)]).await.unwrap();
    queue.send_batch(vec![byte(5)]).await.unwrap();
    // The first batch's bytes are no packed batch (a varint that never ends); the third's row is gone.
    let damaged = vec![0xff_u8; 7];
    let conn = rusqlite::Connection::open(&config.path).unwrap();
    conn.execute("UPDATE queue_batches SET data = ?1 WHERE id = (SELECT MIN(id) FROM queue_batches)", [&damaged])
        .unwrap();
    conn.execute("DELETE FROM queue_batches WHERE id = (SELECT MAX(id) FROM queue_batches)", []).unwrap();

    let bodies = |got: Vec<sluice_core::backend::ReceivedMessage>| got.into_iter().map(|m| m.body).collect::<Vec<_>>();
    // One message of the first batch: it splits in two runs, and nothing readable comes of it.
    assert!(queue.receive(1, Duration::ZERO).await.unwrap().is_empty());
    let got = queue.receive(10, Duration::ZERO).await.unwrap();
    let receipt = got[0].receipt.clone();
    assert_eq!(bodies(got), [vec![4]], "the readable batch is handed out");
    queue.ack(&[receipt]).await.unwrap();
    assert!(queue.receive(10, Duration::ZERO).await.unwrap().is_empty(), "the rest passed over again");
    assert!(queue.receive(10, Duration::ZERO).await.unwrap().is_empty(), "received too often: redriven");

    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (0, 0), "nothing is left to hold the queue up");
    let mut dlq = backend.queue(QueueName::FeaturesDlq).peek(10).await.unwrap();
    dlq.sort_by_key(|m| m.body.len());
    assert_eq!(dlq.len(), 2, "one entry a damaged batch, whatever its runs");
    let entries: Vec<DlqEntry> =
        dlq.iter().map(|m| DlqEntry::from_message(StageName::Features, m.body.clone(), &m.attributes, 0, 0)).collect();
    assert!(entries.iter().all(|e| e.reason == ReasonCode::MalformedMessage));
    assert!(entries.iter().all(|e| e.stored_batch.is_some()), "each entry says its body is a stored batch");
    assert_eq!((dlq[0].body.as_slice(), dlq[1].body.as_slice()), (&[][..], damaged.as_slice()), "the bytes as stored");
    assert!(
        entries[0].detail.contains("holds 0 messages") && entries[0].detail.contains("the 1 messages"),
        "{}",
        entries[0].detail
    );
    assert!(
        entries[1].detail.contains("unreadable") && entries[1].detail.contains("the 3 messages"),
        "{}",
        entries[1].detail
    );
    let left: i64 = conn.query_row("SELECT COUNT(*) FROM queue_batches", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 2, "the damaged batch is gone; the DLQ's two entries are left");
}

/// In a DLQ, which redrives nowhere, an unreadable batch is one entry an operator can see and
/// purge: `malformed_message`, its body the stored bytes, the same each time it is looked at
/// (a purge reads 100 messages a round; this batch holds 150), left in place by a replay (no
/// stage could read it), and taken off the queue whole, every message of it, by a purge.
#[tokio::test]
async fn an_unreadable_batch_in_a_dlq_is_listed_as_one_entry_left_by_a_replay_and_purged_whole() {
    use sluice_core::dlq::{self, Delete, Filter, Letters, ReplayOptions, SendTo};
    let (_dir, config, backend) = fresh(StoreConfig::default()).await;
    let queue = backend.queue(QueueName::FeaturesDlq);
    queue.send_batch((0..150).map(|i| byte(i as u8)).collect()).await.unwrap();
    queue.send_batch(vec![byte(200)]).await.unwrap();
    let damaged = vec![0xff_u8; 7];
    let conn = rusqlite::Connection::open(&config.path).unwrap();
    conn.execute("UPDATE queue_batches SET data = ?1 WHERE id = (SELECT MIN(id) FROM queue_batches)", [&damaged])
        .unwrap();

    let letters = Letters::Stage(StageName::Features);
    let listed = dlq::list(&backend, letters, &Filter::default(), 10).await.unwrap();
    assert_eq!(listed.len(), 2, "the damaged batch is one entry, next to the readable one");
    let malformed: Vec<_> = listed.iter().filter(|i| i.entry.reason == ReasonCode::MalformedMessage).collect();
    assert_eq!(malformed.len(), 1);
    assert_eq!(malformed[0].entry.body, damaged, "the bytes as stored");
    assert!(malformed[0].entry.detail.contains("every message of it"), "{}", malformed[0].entry.detail);
    assert!(malformed[0].record_id().is_none() && !malformed[0].replayable());

    let (all, options, to) = (Filter::default(), ReplayOptions::default(), SendTo(StageName::Features));
    let replayed = dlq::apply(&backend, letters, &all, &to, &options, &|_| {}).await.unwrap();
    assert_eq!((replayed.moved, replayed.kept), (1, 1), "the readable entry went back to work, the batch stayed");
    let sent = backend.queue(QueueName::Features).peek(10).await.unwrap();
    assert_eq!(sent.iter().map(|m| m.body.clone()).collect::<Vec<_>>(), [vec![200]], "only the readable one");
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (150, 0), "the damaged batch was looked at and given back whole");

    let filter = Filter { reason: Some(ReasonCode::MalformedMessage), ..Filter::default() };
    let purged = dlq::apply(&backend, letters, &filter, &Delete, &options, &|_| {}).await.unwrap();
    assert_eq!(purged.moved, 1);
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (0, 0), "every message of the batch went with its one entry");
    let left: i64 = conn.query_row("SELECT COUNT(*) FROM queue_batches", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 1, "the damaged batch's row is gone; the replayed message's is left");
}

/// A raw record that filled a stream record under its own short partition key cannot go back
/// under its longer replay key: the replay leaves its entry (the stream would refuse the whole
/// put, and stop every replay after at it) and sends the rest.
#[tokio::test]
async fn an_ingest_entry_too_large_for_the_stream_under_its_replay_key_stays() {
    use sluice_core::backend::MAX_STREAM_RECORD;
    use sluice_core::dlq::{self, Filter, Letters, ReplayOptions, SendTo};
    use sluice_core::envelope::RecordId;
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let error = SluiceError::permanent(ReasonCode::PayloadTooLarge, "over ingest.max_payload_bytes");
    let entry = |id: &str, len: usize| {
        let id = RecordId::parse(id).unwrap();
        let entry = DlqEntry::new(StageName::Ingest, &error, 1, Some(id.clone()), vec![b'x'; len]);
        OutgoingMessage { body: entry.body.clone(), attributes: entry.attributes(), dedup_key: Some(id.into()) }
    };
    let entries = vec![entry("r-small", 10), entry("r-big", MAX_STREAM_RECORD - 10)];
    backend.queue(QueueName::IngestDlq).send_batch(entries).await.unwrap();

    let (letters, all) = (Letters::Stage(StageName::Ingest), Filter::default());
    let to = SendTo(StageName::Ingest);
    let replayed = dlq::apply(&backend, letters, &all, &to, &ReplayOptions::default(), &|_| {}).await.unwrap();
    assert_eq!((replayed.moved, replayed.kept), (1, 1), "{replayed:?}");
    let left = dlq::list(&backend, letters, &all, 10).await.unwrap();
    assert_eq!(left.iter().map(|i| i.record_id().unwrap().as_str()).collect::<Vec<_>>(), ["r-big"]);
}

/// A purge or replay with a limit takes that many entries and gives back every other one it
/// looked at; a search for one entry at the back of a deep queue finds it and leaves the rest.
#[tokio::test]
async fn a_limited_purge_takes_its_limit_and_gives_the_rest_back() {
    use sluice_core::dlq::{self, Delete, Filter, Letters, ReplayOptions};
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let queue = backend.queue(QueueName::InferenceDlq);
    let entry = |i: usize| OutgoingMessage {
        body: vec![1],
        attributes: [(sluice_core::record::dlq_attr::RECORD_ID.to_owned(), format!("r-{i:03}"))].into(),
        dedup_key: None,
    };
    queue.send_batch((0..250).map(entry).collect()).await.unwrap();
    let letters = Letters::Stage(StageName::Inference);
    let purge = |filter: Filter, limit| {
        let backend = backend.clone();
        async move {
            let options = ReplayOptions { limit: Some(limit), ..ReplayOptions::default() };
            dlq::apply(&backend, letters, &filter, &Delete, &options, &|_| {}).await.unwrap().moved
        }
    };

    assert_eq!(purge(Filter::default(), 120).await, 120);
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (130, 0), "what was looked at and not taken is back");

    let last = Filter { record_id: glob::Pattern::new("r-249").ok(), ..Filter::default() };
    assert_eq!(purge(last, 1).await, 1, "found behind the other 129");
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (129, 0));
    let left = dlq::list(&backend, letters, &Filter::default(), 1000).await.unwrap();
    assert!(left.iter().all(|i| i.record_id().is_some_and(|id| id.as_str() != "r-249")));
}

/// A DLQ deeper than one look reads: `stats` counts the first [`PEEK_MAX`] entries, says so, and
/// gives the queue's own count beside them.
#[tokio::test]
async fn stats_of_a_dlq_deeper_than_one_look_say_they_are_partial() {
    use sluice_core::dlq::{self, Letters, PEEK_MAX};
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let queue = backend.queue(QueueName::ResultsDlq);
    let held = PEEK_MAX + 50;
    for first in (0..held).step_by(10_000) {
        queue.send_batch((first..held.min(first + 10_000)).map(|_| byte(1)).collect()).await.unwrap();
    }
    let stats = dlq::stats(&backend).await.unwrap();
    let results = stats.iter().find(|q| q.queue == Letters::Stage(StageName::Results)).unwrap();
    assert_eq!((results.entries, results.depth, results.partial), (PEEK_MAX as u64, held as u64, true));
    let features = stats.iter().find(|q| q.queue == Letters::Stage(StageName::Features)).unwrap();
    assert_eq!((features.entries, features.depth, features.partial), (0, 0, false));

    // Exactly as many as one look reads is all of them.
    let queue = backend.queue(QueueName::ResultsDlq);
    let got = queue.receive(50, Duration::ZERO).await.unwrap();
    queue.ack(&got.into_iter().map(|m| m.receipt).collect::<Vec<_>>()).await.unwrap();
    let look = dlq::look(&backend, Letters::Stage(StageName::Results), &Default::default()).await.unwrap();
    assert_eq!((look.items.len(), look.depth, look.partial), (PEEK_MAX, PEEK_MAX as u64, false));
}

/// Entries an action keeps (a review item still under its threshold, a stored batch a replay
/// cannot send) do not use up a limit: the next ones are judged, and a limit of ten moves ten
/// though the first ten looked at stay.
#[tokio::test]
async fn entries_an_action_keeps_do_not_use_up_a_limit() {
    use sluice_core::dlq::{self, Action, Fate, Filter, Item, Letters, ReplayOptions};
    struct TakeFromTen;
    #[async_trait::async_trait]
    impl Action for TakeFromTen {
        async fn apply(&self, _: &Backend, items: &[Item]) -> sluice_core::Result<Vec<Fate>> {
            Ok(items.iter().map(|i| if i.entry.body[0] >= 10 { Fate::Done } else { Fate::Kept }).collect())
        }
    }
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let queue = backend.queue(QueueName::FeaturesDlq);
    queue.send_batch((0..20).map(byte).collect()).await.unwrap();
    let options = ReplayOptions { limit: Some(10), ..ReplayOptions::default() };
    let letters = Letters::Stage(StageName::Features);
    let done = dlq::apply(&backend, letters, &Filter::default(), &TakeFromTen, &options, &|_| {}).await.unwrap();
    assert_eq!((done.moved, done.kept), (10, 10));
    let mut left: Vec<u8> = queue.peek(100).await.unwrap().into_iter().map(|m| m.body[0]).collect();
    left.sort();
    assert_eq!(left, (0..10).collect::<Vec<u8>>(), "the kept ones are back, the others gone");
}

/// A replay while the workers run: a copy that fails again comes back as a new entry, which the
/// same run leaves alone (once each record, and the run ends), and which stays.
#[tokio::test]
async fn a_run_leaves_the_entries_written_after_it_began() {
    use sluice_core::dlq::{self, Action, Fate, Filter, Item, Letters, ReplayOptions};
    /// Each entry "replayed" fails again at once: a new entry of it in the DLQ.
    struct FailsAgain;
    #[async_trait::async_trait]
    impl Action for FailsAgain {
        async fn apply(&self, backend: &Backend, items: &[Item]) -> sluice_core::Result<Vec<Fate>> {
            let again = items.iter().map(|i| byte(i.entry.body[0])).collect();
            backend.queue(QueueName::FeaturesDlq).send_batch(again).await?;
            Ok(vec![Fate::Done; items.len()])
        }
    }
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let queue = backend.queue(QueueName::FeaturesDlq);
    queue.send_batch((0..5).map(byte).collect()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let options = ReplayOptions { limit: Some(100), ..ReplayOptions::default() };
    let letters = Letters::Stage(StageName::Features);
    let done = dlq::apply(&backend, letters, &Filter::default(), &FailsAgain, &options, &|_| {}).await.unwrap();
    assert_eq!(done.moved, 5, "each entry once, not round and round to the limit");
    let mut left: Vec<u8> = queue.peek(100).await.unwrap().into_iter().map(|m| m.body[0]).collect();
    left.sort();
    assert_eq!(left, (0..5).collect::<Vec<u8>>(), "the new entries are there, visible");
}

/// A pass over a queue that keeps filling (the review queue of a running pipeline), whose
/// visibility timeout is shorter than the pass: it holds what it looked at to its end, so nothing
/// comes round again, ends at the first round of only new entries, and gives all of it back.
#[tokio::test]
async fn a_pass_over_a_queue_that_keeps_filling_ends_and_gives_everything_back() {
    use sluice_core::dlq::{self, Delete, Filter, Letters, ReplayOptions};
    let (_dir, _config, backend) = fresh(StoreConfig { visibility_timeout_ms: 1, ..StoreConfig::default() }).await;
    let queue = backend.queue(QueueName::FeaturesDlq);
    queue.send_batch((0..50).map(byte).collect()).await.unwrap();
    let filling = tokio::spawn({
        let queue = backend.queue(QueueName::FeaturesDlq);
        async move {
            for i in 0..u8::MAX {
                queue.send_batch(vec![byte(i)]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    // Matches none: every entry is looked at and given back.
    let none = Filter { record_id: glob::Pattern::new("no-such-record").ok(), ..Filter::default() };
    let letters = Letters::Stage(StageName::Features);
    let options = ReplayOptions::default();
    let pass = dlq::apply(&backend, letters, &none, &Delete, &options, &|_| {});
    let done = tokio::time::timeout(Duration::from_secs(20), pass).await.expect("the pass ends").unwrap();
    assert_eq!(done.moved, 0);
    filling.abort();
    let _ = filling.await;
    let depth = queue.depth().await.unwrap();
    assert_eq!(depth.in_flight, 0, "all it looked at is back: {depth:?}");
    assert!(depth.visible >= 50, "{depth:?}");
}

/// An action that fails, or judges fewer entries than it was given, stops the run with an error
/// and leaves nothing hidden: every entry looked at is visible again at once.
#[tokio::test]
async fn a_failing_action_gives_every_entry_back() {
    use sluice_core::dlq::{self, Action, Fate, Filter, Item, Letters, ReplayOptions};
    use sluice_core::{ReasonCode, SluiceError};
    struct Fails;
    #[async_trait::async_trait]
    impl Action for Fails {
        async fn apply(&self, _: &Backend, _: &[Item]) -> sluice_core::Result<Vec<Fate>> {
            Err(SluiceError::retryable(ReasonCode::Internal, "the copies could not be sent"))
        }
    }
    struct JudgesOne;
    #[async_trait::async_trait]
    impl Action for JudgesOne {
        async fn apply(&self, _: &Backend, _: &[Item]) -> sluice_core::Result<Vec<Fate>> {
            Ok(vec![Fate::Done])
        }
    }
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let queue = backend.queue(QueueName::FeaturesDlq);
    queue.send_batch((0..30).map(byte).collect()).await.unwrap();
    let letters = Letters::Stage(StageName::Features);
    for (action, limit) in [(&Fails as &dyn Action, None), (&JudgesOne, Some(10))] {
        let options = ReplayOptions { limit, ..ReplayOptions::default() };
        assert!(dlq::apply(&backend, letters, &Filter::default(), action, &options, &|_| {}).await.is_err());
        let depth = queue.depth().await.unwrap();
        assert_eq!((depth.visible, depth.in_flight), (30, 0), "nothing acknowledged, nothing left hidden");
    }
}

/// An inference DLQ entry replayed after its record's vector passed the store's retention (the
/// entry held it until then): the replay starts the vector's retention again, since once the
/// entry is gone nothing holds it, and a sweep before inference reads it would lose the record
/// for good (inference's DLQ entries carry no payload to make it again).
#[tokio::test]
async fn a_replay_to_inference_keeps_its_records_vectors() {
    use sluice_core::dlq::{self, Filter, Letters, ReplayOptions, SendTo};
    use sluice_core::envelope::RecordId;
    use sluice_core::vector::FeatureVector;
    let (_dir, config, backend) = fresh(StoreConfig { feature_retention_days: 1, ..StoreConfig::default() }).await;
    let (held, free) = (RecordId::parse("held").unwrap(), RecordId::parse("free").unwrap());
    let vectors = [&held, &free].map(|id| (id.clone(), FeatureVector::Pixels(vec![1, 2, 3])));
    backend.features.put_if_absent(vectors.to_vec()).await.unwrap();
    let two_days_ago = sluice_core::envelope::now_ms() as i64 - 2 * 24 * 3_600_000;
    let file = rusqlite::Connection::open(&config.path).unwrap();
    file.execute("UPDATE features SET created_ms = ?1", [two_days_ago]).unwrap();
    let error = SluiceError::permanent(ReasonCode::ModelFailure, "the model failed");
    let entry = DlqEntry::new(StageName::Inference, &error, 5, Some(held.clone()), Vec::new());
    let mut attributes = entry.attributes();
    // The input the vector was made for, as the features stage said it: it goes back with it.
    let input = sluice_core::record::message_attr::INPUT_SPEC.to_owned();
    attributes.insert(input.clone(), "0123456789abcdef".into());
    let message = OutgoingMessage { body: b"{}".to_vec(), attributes, dedup_key: Some("held".into()) };
    backend.queue(QueueName::InferenceDlq).send_batch(vec![message]).await.unwrap();

    let letters = Letters::Stage(StageName::Inference);
    let to = SendTo(StageName::Inference);
    let done =
        dlq::apply(&backend, letters, &Filter::default(), &to, &ReplayOptions::default(), &|_| {}).await.unwrap();
    assert_eq!(done.moved, 1);
    let replayed = backend.queue(QueueName::Inference).peek(1).await.unwrap().remove(0);
    assert_eq!(replayed.attributes.get(&input).map(String::as_str), Some("0123456789abcdef"));
    assert!(!replayed.attributes.contains_key(sluice_core::record::dlq_attr::REASON), "none of the DLQ's");
    // A fresh handle's first write sweeps what is past the retention.
    let features = Backend::open(&config).await.unwrap().features;
    features.put_if_absent(vec![(RecordId::parse("later").unwrap(), FeatureVector::Pixels(vec![1]))]).await.unwrap();
    let left = features.get_batch(&[held.clone(), free.clone()]).await.unwrap();
    assert_eq!(left.keys().collect::<Vec<_>>(), [&held], "the replayed record's vector kept, the other swept");
}

/// A rejection stopped halfway (the result withdrawn, the DLQ entry not written) leaves a review
/// item with no result. A review replay keeps it, however lenient its thresholds; `reject`
/// finishes the job: one DLQ entry, no item, nothing lost.
#[tokio::test]
async fn a_review_item_without_a_result_stays_until_rejected() {
    use sluice_core::dlq::{self, Filter, Letters, Rejected, Rejudge, ReplayOptions};
    use sluice_core::record::ResultStatus;
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let result = sluice_core::testing::prediction_result("half-rejected", "1", ResultStatus::Review);
    backend.results.put_if_absent(vec![result.clone()]).await.unwrap();
    let item = OutgoingMessage {
        body: serde_json::to_vec(&result).unwrap(),
        dedup_key: Some("half-rejected".into()),
        ..OutgoingMessage::default()
    };
    backend.queue(QueueName::Review).send_batch(vec![item]).await.unwrap();
    backend.results.withdraw_review(&result.record_id).await.unwrap();

    let manifest = accepting_everything();
    let options = ReplayOptions::default();
    let done =
        dlq::apply(&backend, Letters::Review, &Filter::default(), &Rejudge(manifest), &options, &|_| {}).await.unwrap();
    assert_eq!((done.moved, done.kept), (0, 1), "kept: its record has no end yet");
    assert_eq!(backend.queue(QueueName::Review).depth().await.unwrap().total(), 1);

    assert_eq!(dlq::reject(&backend, &result.record_id).await.unwrap(), Rejected::Rejected);
    assert_eq!(backend.queue(QueueName::Review).depth().await.unwrap().total(), 0);
    assert_eq!(backend.queue(QueueName::ResultsDlq).depth().await.unwrap().total(), 1);
}

/// A rejection by id of an item another reviewer holds changes nothing and says so: taken from
/// the result, it would leave that reviewer an item with no result, and their own rejection of
/// it a second DLQ entry. Once the item is back, the rejection goes through.
#[tokio::test]
async fn a_rejection_of_an_item_someone_holds_waits_for_it() {
    use sluice_core::dlq::{self, Rejected};
    use sluice_core::record::ResultStatus;
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let result = sluice_core::testing::prediction_result("held", "1", ResultStatus::Review);
    backend.results.put_if_absent(vec![result.clone()]).await.unwrap();
    let item = OutgoingMessage { body: serde_json::to_vec(&result).unwrap(), ..OutgoingMessage::default() };
    let review = backend.queue(QueueName::Review);
    review.send_batch(vec![item]).await.unwrap();
    let held = review.receive_hidden(1, Duration::ZERO, Duration::from_secs(600)).await.unwrap();

    assert_eq!(dlq::reject(&backend, &result.record_id).await.unwrap(), Rejected::Held(1));
    let stored = backend.results.get_batch(std::slice::from_ref(&result.record_id)).await.unwrap();
    assert_eq!(stored[&result.record_id].status, ResultStatus::Review, "its result is as it was");
    assert_eq!(backend.queue(QueueName::ResultsDlq).depth().await.unwrap().total(), 0);

    review.release(&[held[0].receipt.clone()], Duration::ZERO).await.unwrap();
    assert_eq!(dlq::reject(&backend, &result.record_id).await.unwrap(), Rejected::Rejected);
    assert_eq!(review.depth().await.unwrap().total(), 0);
    assert_eq!(backend.queue(QueueName::ResultsDlq).depth().await.unwrap().total(), 1);
}

/// The shipped digits bundle with every threshold at 0: a review replay accepts whatever it
/// judges.
fn accepting_everything() -> sluice_core::model::ModelManifest {
    let mut manifest = sluice_core::model::ModelBundle::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits"))
        .unwrap()
        .manifest;
    manifest.thresholds.default = 0.0;
    manifest.thresholds.per_class.clear();
    manifest
}

/// A record written twice leaves two identical review items. A replay judges each (where it
/// used to pass over the second as one it had seen), accepts the result once and counts the
/// other as stale; a purge by record id takes every copy.
#[tokio::test]
async fn copies_of_a_review_item_are_each_judged_once() {
    use sluice_core::dlq::{self, Delete, Fate, Filter, Letters, Rejudge, ReplayOptions};
    use sluice_core::record::ResultStatus;
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let review = backend.queue(QueueName::Review);
    let mut items = Vec::new();
    for id in ["twice", "kept", "rejected", "settled"] {
        let result = sluice_core::testing::prediction_result(id, "1", ResultStatus::Review);
        backend.results.put_if_absent(vec![result.clone()]).await.unwrap();
        let body = serde_json::to_vec(&result).unwrap();
        items.extend((0..2).map(|_| OutgoingMessage { body: body.clone(), ..OutgoingMessage::default() }));
    }
    review.send_batch(items).await.unwrap();

    let mut manifest = accepting_everything();
    // Another model's bundle (other labels) judges none of them, whatever its thresholds.
    let options = ReplayOptions::default();
    let everything = Filter::default();
    let other = sluice_core::model::ModelManifest { labels: vec!["cat".into(), "dog".into()], ..manifest.clone() };
    // A result labelled by id while its copies waited: they are stale, whatever the bundle.
    let settled = sluice_core::envelope::RecordId::parse("settled").unwrap();
    backend.results.resolve_review(&settled, &sluice_core::record::Resolution::Label("0".into())).await.unwrap();
    let looked = dlq::look(&backend, Letters::Review, &everything).await.unwrap();
    let fates = Rejudge(other.clone()).preview(&backend, &looked.items).await.unwrap();
    assert_eq!(fates.iter().filter(|&&f| f == Fate::Stale).count(), 2, "{fates:?}");
    let done = dlq::apply(&backend, Letters::Review, &everything, &Rejudge(other), &options, &|_| {}).await.unwrap();
    assert_eq!((done.moved, done.stale, done.kept), (0, 2, 6), "{done:?}");
    manifest.labels = vec!["0".into(), "1".into()];
    let twice = Filter { record_id: glob::Pattern::new("twice").ok(), ..Filter::default() };
    // A dry run sees what the run will do: the first copy accepted, the other stale.
    let looked = dlq::look(&backend, Letters::Review, &twice).await.unwrap();
    let fates = Rejudge(manifest.clone()).preview(&backend, &looked.items).await.unwrap();
    assert_eq!(fates, [Fate::Done, Fate::Stale]);
    let done = dlq::apply(&backend, Letters::Review, &twice, &Rejudge(manifest), &options, &|_| {}).await.unwrap();
    assert_eq!((done.moved, done.stale, done.kept), (1, 1, 0), "{done:?}");
    assert_eq!(review.depth().await.unwrap().total(), 4, "both copies of the others stay");

    // A rejection takes every copy off: with the result withdrawn, a copy left would wait for ever.
    let rejected = sluice_core::envelope::RecordId::parse("rejected").unwrap();
    assert_eq!(dlq::reject(&backend, &rejected).await.unwrap(), dlq::Rejected::Rejected);
    assert_eq!(review.depth().await.unwrap().total(), 2);
    assert_eq!(backend.queue(QueueName::ResultsDlq).depth().await.unwrap().total(), 1);

    let kept = Filter { record_id: glob::Pattern::new("kept").ok(), ..Filter::default() };
    let purged = dlq::apply(&backend, Letters::Review, &kept, &Delete, &options, &|_| {}).await.unwrap();
    assert_eq!(purged.moved, 2, "a purge takes every copy");
    assert_eq!(review.depth().await.unwrap().total(), 0);
}

/// A label searches the review queue for its item only when it settled the result, and looks at
/// no more than `LABEL_SEARCH` items: an item deeper than that, or one of a result labelled
/// before (a second click), stays for a later replay to take off, and the label stands.
#[tokio::test]
async fn a_labels_search_for_its_item_is_bounded_and_only_for_a_label_that_settled() {
    use sluice_core::backend::ReviewOutcome;
    use sluice_core::dlq::{self, LABEL_SEARCH};
    use sluice_core::record::ResultStatus;
    let (_dir, _config, backend) = fresh(StoreConfig::default()).await;
    let review = backend.queue(QueueName::Review);
    let ids: Vec<String> = (0..LABEL_SEARCH + 20).map(|i| format!("item-{i:04}")).collect();
    let results: Vec<_> =
        ids.iter().map(|id| sluice_core::testing::prediction_result(id, "1", ResultStatus::Review)).collect();
    backend.results.put_if_absent(results.clone()).await.unwrap();
    let items = results
        .iter()
        .map(|r| OutgoingMessage { body: serde_json::to_vec(r).unwrap(), ..OutgoingMessage::default() })
        .collect();
    review.send_batch(items).await.unwrap();
    let total = ids.len() as u64;
    let depth = || async { review.depth().await.unwrap() };

    // The queue hands items out oldest first: the last sent is past the search.
    let last = &results.last().unwrap().record_id;
    assert!(matches!(dlq::label(&backend, last, "0").await.unwrap(), ReviewOutcome::Resolved(_)));
    let after = depth().await;
    assert_eq!((after.total(), after.in_flight), (total, 0), "past the search: left, and everything given back");
    let stored = backend.results.get_batch(std::slice::from_ref(last)).await.unwrap();
    assert_eq!(stored[last].status, ResultStatus::Reviewed, "the label stands");

    // Given back, the items looked at went to the back of the queue: the first is found now.
    let first = &results[0].record_id;
    assert!(matches!(dlq::label(&backend, first, "0").await.unwrap(), ReviewOutcome::Resolved(_)));
    assert_eq!(depth().await.total(), total - 1, "an item within the search is found and taken off");
    // Labelled again: nothing settled, nothing searched. A copy of its item sent since stays.
    let copy = OutgoingMessage { body: serde_json::to_vec(&results[0]).unwrap(), ..OutgoingMessage::default() };
    review.send_batch(vec![copy]).await.unwrap();
    assert!(matches!(dlq::label(&backend, first, "0").await.unwrap(), ReviewOutcome::NotWaiting(_)));
    assert_eq!(depth().await.total(), total);
}

/// Claim-checked payloads go once they are older than the feature retention and nothing refers
/// to them any more (a checkpointed stream record does not); one a stream record still to be
/// read or a DLQ entry refers to is kept, and dated anew; one stored again is young again.
#[tokio::test]
async fn claim_checked_payloads_past_the_retention_go_unless_something_refers_to_them() {
    let config = StoreConfig { shards: 1, feature_retention_days: 1, ..StoreConfig::default() };
    let (_dir, config, backend) = fresh(config).await;
    let mut refs = Vec::new();
    for name in ["alone", "read", "unread", "dead-lettered", "stored-again"] {
        refs.push(backend.blobs.put(format!("payload {name}").into_bytes()).await.unwrap());
    }
    let envelope = |r: &str| format!(r#"{{"payload":{{"kind":"claim_check","reference":"{r}"}}}}"#);
    let (read, unread) = (envelope(&refs[1]), envelope(&refs[2]));
    checkpointed_through(&backend, &[read.as_str(), unread.as_str()], 0).await;
    let entry = OutgoingMessage { body: envelope(&refs[3]).into_bytes(), ..OutgoingMessage::default() };
    backend.queue(QueueName::IngestDlq).send_batch(vec![entry]).await.unwrap();
    // Two days pass; then the last is stored again.
    let conn = rusqlite::Connection::open(&config.path).unwrap();
    conn.execute("UPDATE blobs SET stored_ms = stored_ms - 2 * 86400000", []).unwrap();
    backend.blobs.put(b"payload stored-again".to_vec()).await.unwrap();

    // The next put of a fresh handle sweeps.
    let later = Backend::open(&config).await.unwrap();
    later.blobs.put(b"payload new".to_vec()).await.unwrap();
    let mut kept = Vec::new();
    for reference in &refs {
        match later.blobs.get(reference).await {
            Ok(_) => kept.push(true),
            Err(e) if e.code() == ReasonCode::ClaimCheckMissing => kept.push(false),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(kept, [false, false, true, true, true]);
    let day_ago = sluice_core::envelope::now_ms() as i64 - 86_400_000;
    let young: i64 =
        conn.query_row("SELECT COUNT(*) FROM blobs WHERE stored_ms > ?1", [day_ago], |r| r.get(0)).unwrap();
    assert_eq!(young, 4, "those kept are dated anew, not looked at again for a retention");
}

/// A store made before blobs were dated (keyed by id, `WITHOUT ROWID`) keeps them, dated as of
/// the move, whatever the retention.
#[tokio::test]
async fn blobs_of_a_store_made_before_they_were_dated_are_kept_and_dated() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { path: dir.path().join("s.sqlite"), feature_retention_days: 1, ..StoreConfig::default() };
    let id = sluice_core::envelope::RecordId::from_content(b"old payload").to_string();
    let old = rusqlite::Connection::open(&config.path).unwrap();
    old.execute_batch("CREATE TABLE blobs (id TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID").unwrap();
    old.execute("INSERT INTO blobs VALUES (?1, CAST('old payload' AS BLOB))", [&id]).unwrap();
    drop(old);
    let backend = Backend::open(&config).await.unwrap();
    backend.blobs.put(b"a new one, which sweeps".to_vec()).await.unwrap();
    assert_eq!(backend.blobs.get(&format!("blob:{id}")).await.unwrap(), b"old payload");
    let conn = rusqlite::Connection::open(&config.path).unwrap();
    let sql: String = conn
        .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'blobs'", [], |r| r.get(0))
        .unwrap();
    assert!(!sql.to_ascii_uppercase().contains("WITHOUT ROWID"), "{sql}");
    let dated: i64 = conn.query_row("SELECT MIN(stored_ms) FROM blobs", [], |r| r.get(0)).unwrap();
    assert!(dated > sluice_core::envelope::now_ms() as i64 - 60_000, "{dated}");
}
