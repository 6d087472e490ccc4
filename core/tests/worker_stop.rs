//! A worker told to stop while a batch is still being processed, once its grace period is
//! nearly up, hands the batch back at once (visible again, not after a visibility timeout) and
//! stops; nothing is acknowledged that was not done.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::backend::{Backend, OutgoingMessage};
use sluice_core::config::{StoreConfig, WorkerConfig};
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{BatchPolicy, Delivery, Outcome, QueueSource, Stage, Worker};
use tokio_util::sync::CancellationToken;

/// A stage that never finishes a batch (a model call that hangs).
struct Stuck;

#[async_trait]
impl Stage for Stuck {
    fn name(&self) -> StageName {
        StageName::Features
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(10)
    }

    async fn process(&self, _batch: &[Delivery]) -> Vec<Outcome> {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_batch_is_handed_back_when_the_grace_period_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    // A visibility timeout far longer than the test: only an explicit hand-back makes them visible.
    let store =
        StoreConfig { path: dir.path().join("s.sqlite"), visibility_timeout_ms: 600_000, ..StoreConfig::default() };
    let backend = Backend::open(&store).await.unwrap();
    let queue = backend.queue(QueueName::Features);
    let messages = (0..3).map(|i| OutgoingMessage { body: format!("m{i}").into_bytes(), ..Default::default() });
    queue.send_batch(messages.collect()).await.unwrap();

    let abandon = CancellationToken::new();
    let source = QueueSource::new(Arc::clone(&queue), &store);
    let worker = Worker::new(Arc::new(Stuck), Box::new(source), backend.clone(), WorkerConfig::default(), &store)
        .abandoning_on(abandon.clone());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    for _ in 0..100 {
        if queue.depth().await.unwrap().in_flight == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queue.depth().await.unwrap().in_flight, 3, "the worker holds the batch");

    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "a stopping worker first tries to finish its batch");
    abandon.cancel();
    let report = tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
    assert_eq!(report.handled, 0);
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (3, 0), "handed back, visible at once");
}
