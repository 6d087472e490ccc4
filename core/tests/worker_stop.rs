//! A worker told to stop while a batch is still being processed, once its grace period is
//! nearly up, hands the batch back at once (visible again, not after a visibility timeout) and
//! stops; nothing is acknowledged that was not done (so too one whose sends on do not finish).
//! One told to stop while it fills a batch
//! from a slow store stops filling and finishes what it holds; filling never outlasts a quarter
//! of the visibility timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_core::backend::{Backend, OutgoingMessage, QueueDepth, Receipt, ReceivedMessage, WorkQueue};
use sluice_core::config::{StoreConfig, WorkerConfig};
use sluice_core::error::Result;
use sluice_core::topology::{QueueName, StageName};
use sluice_core::worker::{BatchPolicy, Delivery, Origin, Outcome, QueueSource, Source, Stage, Worker};
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
    let (store, backend, queue) = features_queue_of(dir.path(), 3).await;

    let abandon = CancellationToken::new();
    let source = QueueSource::new(Arc::clone(&queue), &store);
    let worker = Worker::new(Arc::new(Stuck), Box::new(source), backend.clone(), WorkerConfig::default(), &store)
        .abandoning_on(abandon.clone());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    wait_for(&queue, 100, |d| d.in_flight == 3).await;
    assert_eq!(queue.depth().await.unwrap().in_flight, 3, "the worker holds the batch");

    let report = stop_then_abandon(&shutdown, &abandon, running).await;
    assert_eq!(report.handled, 0);
    let depth = queue.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (3, 0), "handed back, visible at once");
}

/// A store whose received messages stay hidden far longer than a test (only an explicit
/// hand-back makes them visible), with `n` messages (`m0`, `m1`…) in its features queue.
async fn features_queue_of(dir: &std::path::Path, n: usize) -> (StoreConfig, Backend, Arc<dyn WorkQueue>) {
    let store = StoreConfig { path: dir.join("s.sqlite"), visibility_timeout_ms: 600_000, ..StoreConfig::default() };
    let backend = Backend::open(&store).await.unwrap();
    let queue = backend.queue(QueueName::Features);
    let messages = (0..n).map(|i| OutgoingMessage { body: format!("m{i}").into_bytes(), ..Default::default() });
    queue.send_batch(messages.collect()).await.unwrap();
    (store, backend, queue)
}

/// Waits, 20 ms at a time and at most `tries` times, until `queue`'s depth is as `wanted`.
async fn wait_for(queue: &Arc<dyn WorkQueue>, tries: usize, wanted: impl Fn(&QueueDepth) -> bool) {
    for _ in 0..tries {
        if wanted(&queue.depth().await.unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tells a worker holding a batch it cannot finish to stop, checks it first tries to finish,
/// then says its grace is nearly up; what it reports once it stopped.
async fn stop_then_abandon(
    shutdown: &CancellationToken,
    abandon: &CancellationToken,
    running: tokio::task::JoinHandle<Result<sluice_core::worker::WorkerReport>>,
) -> sluice_core::worker::WorkerReport {
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "a stopping worker first tries to finish its batch");
    abandon.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap()
}

/// The queue it wraps, sent to and committed to one call at a time, as SQS is (no sends and
/// acknowledgements in one transaction); with `hang_sends`, a send never finishes (a queue
/// throttled, the SDK retrying on and on); with `fail_call`, that send call (the first is 1)
/// fails; `per_call`, the most messages one send takes.
#[derive(Default)]
struct Wrapped {
    inner: Option<Arc<dyn WorkQueue>>,
    hang_sends: bool,
    fail_call: Option<usize>,
    per_call: Option<usize>,
    calls: AtomicUsize,
}

impl Wrapped {
    fn new(inner: &Arc<dyn WorkQueue>) -> Self {
        Self { inner: Some(Arc::clone(inner)), ..Self::default() }
    }

    fn inner(&self) -> &Arc<dyn WorkQueue> {
        self.inner.as_ref().expect("a queue to wrap")
    }
}

#[async_trait]
impl WorkQueue for Wrapped {
    fn name(&self) -> QueueName {
        self.inner().name()
    }
    fn per_call(&self) -> Option<usize> {
        self.per_call
    }
    async fn send_batch(&self, messages: Vec<OutgoingMessage>) -> Result<()> {
        if self.hang_sends {
            std::future::pending::<()>().await;
        }
        assert!(messages.len() <= self.per_call.unwrap_or(usize::MAX), "more than a call takes");
        if Some(self.calls.fetch_add(1, Ordering::SeqCst) + 1) == self.fail_call {
            return Err(sluice_core::SluiceError::retryable(sluice_core::ReasonCode::StoreBusy, "throttled"));
        }
        self.inner().send_batch(messages).await
    }
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        self.inner().receive(max, wait).await
    }
    async fn receive_hidden(&self, max: usize, wait: Duration, hidden: Duration) -> Result<Vec<ReceivedMessage>> {
        self.inner().receive_hidden(max, wait, hidden).await
    }
    async fn ack(&self, receipts: &[Receipt]) -> Result<()> {
        self.inner().ack(receipts).await
    }
    async fn extend_visibility(&self, receipts: &[Receipt], by: Duration) -> Result<()> {
        self.inner().extend_visibility(receipts, by).await
    }
    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<()> {
        self.inner().release(receipts, delay).await
    }
    async fn depth(&self) -> Result<QueueDepth> {
        self.inner().depth().await
    }
    async fn peek(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        self.inner().peek(max).await
    }
}

/// `stage`, forwarding each record to `to`, or nowhere (its end).
struct Forwards {
    stage: StageName,
    to: Option<QueueName>,
}

#[async_trait]
impl Stage for Forwards {
    fn name(&self) -> StageName {
        self.stage
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(10)
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let on = |d: &Delivery| match self.to {
            Some(to) => Outcome::forward(to, OutgoingMessage { body: d.body.clone(), ..Default::default() }),
            None => Outcome::Forward(Vec::new()),
        };
        batch.iter().map(on).collect()
    }
}

/// Done processing but stuck sending on when the grace period runs out, the worker hands the
/// batch back (visible at once, none of it acknowledged) and stops, rather than be killed
/// holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_sends_hang_is_handed_back_when_the_grace_period_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let (store, backend, input) = features_queue_of(dir.path(), 3).await;
    let next = backend.queue(QueueName::Inference);
    let backend = backend.with_queue(Arc::new(Wrapped { hang_sends: true, ..Wrapped::new(&next) }));

    let abandon = CancellationToken::new();
    let source = QueueSource::new(Arc::new(Wrapped::new(&input)), &store);
    let stage = Forwards { stage: StageName::Features, to: Some(QueueName::Inference) };
    let worker = Worker::new(Arc::new(stage), Box::new(source), backend, WorkerConfig::default(), &store)
        .abandoning_on(abandon.clone());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    wait_for(&input, 100, |d| d.in_flight == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(input.depth().await.unwrap().in_flight, 3, "the worker holds the batch, sending it on");

    let report = stop_then_abandon(&shutdown, &abandon, running).await;
    assert_eq!(report.handled, 0);
    let depth = input.depth().await.unwrap();
    assert_eq!((depth.visible, depth.in_flight), (3, 0), "handed back, visible at once");
    assert_eq!(next.depth().await.unwrap().total(), 0, "nothing was sent on");
}

/// A batch whose sends on fail part way (the second call of two messages refused, as SQS
/// throttled past the SDK's attempts): what went out is acknowledged, only the rest is redone,
/// so no message is sent twice (a dead-lettered record would have two DLQ entries on SQS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_on_in_part_redoes_only_what_did_not_go_out() {
    let dir = tempfile::tempdir().unwrap();
    let (store, backend, input) = features_queue_of(dir.path(), 5).await;
    let next = backend.queue(QueueName::Inference);
    let on = Wrapped { fail_call: Some(2), per_call: Some(2), ..Wrapped::new(&next) };
    let backend = backend.with_queue(Arc::new(on));

    let source = QueueSource::new(Arc::new(Wrapped::new(&input)), &store);
    let config = WorkerConfig { retry_delay_ms: 10, ..WorkerConfig::default() };
    let stage = Forwards { stage: StageName::Features, to: Some(QueueName::Inference) };
    let worker = Worker::new(Arc::new(stage), Box::new(source), backend, config, &store);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    wait_for(&input, 200, |d| d.total() == 0).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
    assert_eq!(input.depth().await.unwrap().total(), 0, "all done");
    let mut sent: Vec<Vec<u8>> = next.peek(100).await.unwrap().into_iter().map(|m| m.body).collect();
    sent.sort();
    let expected: Vec<Vec<u8>> = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(sent, expected, "each sent on once");
}

/// A stream whose every read fails (a throttled or unreachable stream), counting lease renewals.
struct FailingStream {
    renewals: Arc<AtomicUsize>,
}

#[async_trait]
impl Source for FailingStream {
    async fn receive(&mut self, _max: usize, _wait: Duration) -> Result<Vec<Delivery>> {
        Err(sluice_core::SluiceError::retryable(sluice_core::ReasonCode::StoreUnavailable, "GetRecords failed"))
    }

    async fn settle(&mut self, _done: &[&Origin], _retry: &[&Origin], _retry_delay: Duration) -> Result<()> {
        Ok(())
    }

    async fn heartbeat(&mut self, _in_flight: &[&Origin]) -> Result<()> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A stream worker backing off after failed reads (for seconds, as the failures go on) keeps
/// renewing its shard leases meanwhile: let run out, other workers would take them and redo
/// what it had read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_worker_backing_off_keeps_its_leases() {
    let dir = tempfile::tempdir().unwrap();
    // Leases renewed every 100 ms.
    let store = StoreConfig {
        path: dir.path().join("s.sqlite"),
        lease_duration_ms: 1_000,
        visibility_timeout_ms: 1_000,
        ..StoreConfig::default()
    };
    let backend = Backend::open(&store).await.unwrap();
    let renewals = Arc::new(AtomicUsize::new(0));
    let source = FailingStream { renewals: Arc::clone(&renewals) };
    let stage = Forwards { stage: StageName::Ingest, to: None };
    let worker = Worker::new(Arc::new(stage), Box::new(source), backend, WorkerConfig::default(), &store);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    // Backing off 0.1, 0.2, 0.4, 0.8, 1.6 s… (each up to twice that with the jitter).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap().unwrap();
    let renewals = renewals.load(Ordering::SeqCst);
    assert!(renewals >= 10, "renewed {renewals} times in 2.5 s of backing off");
}

/// A deep backlog behind a slow store: every receive takes `delay` and comes back full (ten,
/// as SQS's most). Counts what it handed out and what was acknowledged.
struct SlowBacklog {
    delay: Duration,
    received: Arc<AtomicUsize>,
    acknowledged: Arc<AtomicUsize>,
}

#[async_trait]
impl Source for SlowBacklog {
    async fn receive(&mut self, max: usize, _wait: Duration) -> Result<Vec<Delivery>> {
        tokio::time::sleep(self.delay).await;
        let first = self.received.fetch_add(max.min(10), Ordering::SeqCst);
        Ok((first..first + max.min(10))
            .map(|i| Delivery {
                body: Vec::new(),
                attributes: Default::default(),
                receive_count: 1,
                first_received_ms: None,
                origin: Origin::Queue(Receipt(i.to_string())),
            })
            .collect())
    }

    async fn settle(&mut self, done: &[&Origin], retry: &[&Origin], _retry_delay: Duration) -> Result<()> {
        assert!(retry.is_empty());
        self.acknowledged.fetch_add(done.len(), Ordering::SeqCst);
        Ok(())
    }

    async fn heartbeat(&mut self, _in_flight: &[&Origin]) -> Result<()> {
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Takes batches of up to 1,000 and handles each delivery, noting the batch sizes.
struct Handles(Mutex<Vec<usize>>);

#[async_trait]
impl Stage for Handles {
    fn name(&self) -> StageName {
        StageName::Results
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::up_to(1_000).waiting(Duration::from_millis(20))
    }

    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome> {
        self.0.lock().unwrap().push(batch.len());
        batch.iter().map(|_| Outcome::Forward(Vec::new())).collect()
    }
}

/// Runs `Handles` on a `SlowBacklog` (receives of `delay`) under `store`'s visibility timeout
/// until `stop_after`, and says how long the stop took, the batch sizes, and what was received
/// and acknowledged.
async fn fill_slowly(
    visibility_ms: u64,
    delay: Duration,
    stop_after: Duration,
) -> (Duration, Vec<usize>, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig {
        path: dir.path().join("s.sqlite"),
        visibility_timeout_ms: visibility_ms,
        ..StoreConfig::default()
    };
    let backend = Backend::open(&store).await.unwrap();
    let (received, acknowledged) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let source = SlowBacklog { delay, received: Arc::clone(&received), acknowledged: Arc::clone(&acknowledged) };
    let stage = Arc::new(Handles(Mutex::new(Vec::new())));
    let worker = Worker::new(stage.clone(), Box::new(source), backend, WorkerConfig::default(), &store);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    tokio::time::sleep(stop_after).await;
    shutdown.cancel();
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap().unwrap();
    let batches = stage.0.lock().unwrap().clone();
    (stopping.elapsed(), batches, received.load(Ordering::SeqCst), acknowledged.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_stops_filling_its_batch_and_finishes_what_it_holds() {
    // A visibility timeout long enough not to cut the filling short: only the stop does.
    let (took, batches, received, acknowledged) =
        fill_slowly(600_000, Duration::from_millis(100), Duration::from_millis(550)).await;
    assert!(took < Duration::from_millis(500), "stopped filling at once, took {took:?}");
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert!(batches[0] < 1_000, "the batch was not filled to its size: {batches:?}");
    assert_eq!((received, acknowledged), (batches[0], batches[0]), "all it held was handled and acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_a_batch_stops_at_a_quarter_of_the_visibility_timeout() {
    // 100 receives of 10 ms would fill the batch in a second; the visibility allows 200 ms.
    let (_, batches, received, acknowledged) =
        fill_slowly(800, Duration::from_millis(10), Duration::from_millis(1_000)).await;
    assert!(batches.len() >= 2, "{batches:?}");
    assert!(batches.iter().all(|&n| n < 1_000), "each batch went to work before it was full: {batches:?}");
    assert_eq!(received, acknowledged);
}
