//! The embedded store's own upkeep: its write-ahead log is copied into the database file by a
//! thread of its own, not by a writer.

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
