//! The embedded store's own upkeep: its write-ahead log is copied into the database file by a
//! thread of its own, not by a writer. And its queues' own edges.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_core::backend::{Backend, OutgoingMessage};
use sluice_core::config::{StoreConfig, WorkerConfig};
use sluice_core::error::{ReasonCode, SluiceError};
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{BatchPolicy, Delivery, Outcome, QueueSource, Stage, Worker};
use tokio_util::sync::CancellationToken;

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

/// With no visibility timeout a received message is visible again at once; one receive still
/// hands each message out once (its look for more after a short batch used to find the same
/// messages again).
#[tokio::test]
async fn one_receive_hands_each_message_out_once_even_without_a_visibility_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        StoreConfig { path: dir.path().join("store.sqlite"), visibility_timeout_ms: 0, ..StoreConfig::default() };
    let backend = Backend::open(&config).await.unwrap();
    let queue = backend.queue(QueueName::Inference);
    let message = |i: usize| OutgoingMessage { body: vec![i as u8], attributes: Default::default(), dedup_key: None };
    queue.send_batch((0..3).map(message).collect()).await.unwrap();

    let received = queue.receive(10, Duration::ZERO).await.unwrap();
    let bodies: Vec<Vec<u8>> = received.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, [vec![0], vec![1], vec![2]]);
}

/// A stage's sends and its acknowledgement commit as one: both, or neither when a send fails.
#[tokio::test]
async fn sends_and_the_acknowledgement_commit_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { path: dir.path().join("store.sqlite"), ..StoreConfig::default() };
    let backend = Backend::open(&config).await.unwrap();
    let features = backend.queue(QueueName::Features);
    assert!(features.forwards_with_ack());
    let message = |i: u8| OutgoingMessage { body: vec![i], attributes: Default::default(), dedup_key: None };
    let queues = [QueueName::Features, QueueName::Inference, QueueName::Results];

    features.send_batch(vec![message(1), message(2)]).await.unwrap();
    let first = features.receive(1, Duration::ZERO).await.unwrap();
    features
        .forward_and_ack(vec![(QueueName::Inference, vec![message(10), message(11)])], &[first[0].receipt.clone()])
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
            vec![(QueueName::Features, vec![message(20)]), (QueueName::Results, vec![message(21)])],
            &[second[0].receipt.clone()],
        )
        .await;
    assert!(refused.is_err(), "the refused send fails the whole: {refused:?}");
    assert_eq!(depths(&backend, queues).await, [(1, 0), (1, 1), (0, 0)], "none of it happened");
}

/// Forwards each delivery to the inference queue, but one whose body starts with "retry" fails
/// for now (retryable).
struct Forward;

#[async_trait]
impl Stage for Forward {
    fn name(&self) -> StageName {
        StageName::Features
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(10)
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        batch
            .iter()
            .map(|d| match d.body.starts_with(b"retry") {
                true => Outcome::failed(SluiceError::retryable(ReasonCode::Internal, "not yet"), None),
                false => Outcome::forward(
                    QueueName::Inference,
                    OutgoingMessage { body: d.body.clone(), ..Default::default() },
                ),
            })
            .collect()
    }
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
        "CREATE TRIGGER refuse_sends BEFORE INSERT ON messages WHEN NEW.queue = '{}' \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        queue.as_str()
    ))
    .unwrap();
    conn
}

/// A worker on the embedded store: a refused send leaves its whole batch unacknowledged (it comes
/// back until redriven, nothing half sent); then a batch forwards and acknowledges what it did, and
/// the delivery that failed comes back on its own until redriven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_acknowledges_only_with_its_sends_and_never_loses_a_refused_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig { path: dir.path().join("store.sqlite"), max_receives: 2, ..StoreConfig::default() };
    let backend = Backend::open(&store).await.unwrap();
    let features = backend.queue(QueueName::Features);
    let queues = [QueueName::Features, QueueName::Inference, QueueName::FeaturesDlq];
    let message = |body: &str| OutgoingMessage { body: body.as_bytes().to_vec(), ..Default::default() };
    let refusing = refuse_sends(&store, QueueName::Inference);
    features.send_batch(vec![message("a"), message("b"), message("c")]).await.unwrap();

    let config = WorkerConfig { poll_wait_ms: 50, retry_delay_ms: 0, ..WorkerConfig::default() };
    let source = QueueSource::new(Arc::clone(&features), &store);
    let worker = Worker::new(Arc::new(Forward), Box::new(source), backend.clone(), config, &store);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    // Every send refused: each try hands the batch back, until the receives run out.
    settle_at(&backend, queues, [0, 0, 3]).await;

    refusing.execute_batch("DROP TRIGGER refuse_sends").unwrap();
    features.send_batch(vec![message("d"), message("retry-e"), message("f")]).await.unwrap();
    settle_at(&backend, queues, [0, 2, 4]).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
}
