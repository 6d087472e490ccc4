//! The embedded store's own upkeep: its write-ahead log is copied into the database file by a
//! thread of its own, not by a writer. And its queues' own edges.

use std::time::{Duration, Instant};

use sluice_core::backend::{Backend, OutgoingMessage};
use sluice_core::config::StoreConfig;
use sluice_core::topology::QueueName;

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
