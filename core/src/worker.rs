//! The one loop every stage runs: receive a batch → stage function → durable downstream write →
//! acknowledge.
//!
//! A stage never acknowledges anything itself. It returns one [`Outcome`] per delivery; the loop
//! sends what is to be forwarded and what failed permanently (to the stage's DLQ), and only once
//! those writes are durable does it acknowledge (delete, checkpoint). A retryable failure is left
//! unacknowledged and comes back after a delay, until the queue's redrive policy moves it to the DLQ.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Checkpoint, OutgoingMessage, Receipt, StreamConsumer, WorkQueue};
use crate::config::{BackendKind, StoreConfig, WorkerConfig};
use crate::envelope::{REPLAY_KEY_PREFIX, RecordId};
use crate::error::{ReasonCode, Result, SluiceError};
use crate::record::DlqEntry;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{FailureAction, metrics};
use crate::telemetry::traces::{self, BatchTrace, Destination, TRACEPARENT};
use crate::topology::{QueueName, StageName};

/// The attribute of a stream delivery holding its partition key.
pub const PARTITION_KEY: &str = "partition_key";

/// Where a delivery came from, and so how to acknowledge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Queue(Receipt),
    /// `replay`: written back by `sluice dlq replay`, so not a new arrival.
    Stream {
        shard: String,
        sequence: String,
        arrived_ms: u64,
        replay: bool,
    },
}

/// One message or stream record handed to a stage.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    /// 1 on first delivery.
    pub receive_count: u32,
    /// When a queue first handed this message out, or this worker first read the stream record
    /// (`None` where the queue does not say): a DLQ entry's first failure, where the failures
    /// came one a receive.
    pub first_received_ms: Option<u64>,
    pub origin: Origin,
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Handled. These messages go downstream (none when the stage's own sink was the end).
    Forward(Vec<(QueueName, OutgoingMessage)>),
    /// Not handled: a permanent error goes to the stage's DLQ, a retryable one is retried; a
    /// misconfiguration ([`SluiceError::is_misconfiguration`]) hands the whole batch back and
    /// stops the worker.
    Failed { error: SluiceError, record_id: Option<RecordId> },
}

impl Outcome {
    pub fn forward(queue: QueueName, message: OutgoingMessage) -> Self {
        Self::Forward(vec![(queue, message)])
    }

    pub fn failed(error: SluiceError, record_id: Option<RecordId>) -> Self {
        Self::Failed { error, record_id }
    }

    /// The error, when this failure is the deployment's ([`SluiceError::is_misconfiguration`]).
    fn misconfiguration(&self) -> Option<&SluiceError> {
        match self {
            Self::Failed { error, .. } if error.is_misconfiguration() => Some(error),
            _ => None,
        }
    }
}

/// How a stage wants its input batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_size: usize,
    /// After the first delivery arrives, how long to wait for more to fill the batch.
    pub max_wait: Duration,
}

impl BatchPolicy {
    /// Batches of at most `max_size` (at least 1), taking whatever has arrived without waiting.
    pub fn up_to(max_size: usize) -> Self {
        Self { max_size: max_size.max(1), max_wait: Duration::ZERO }
    }

    /// Waits up to `max_wait` after the first delivery for the batch to fill (micro-batching).
    pub fn waiting(self, max_wait: Duration) -> Self {
        Self { max_wait, ..self }
    }
}

/// A stage function: a batch in, one outcome per delivery out, in order.
#[async_trait]
pub trait Stage: Send + Sync {
    fn name(&self) -> StageName;

    fn batch_policy(&self) -> BatchPolicy;

    /// Any write to the stage's own sink (feature store, result store) must be durable before
    /// this returns; the loop acknowledges right after forwarding.
    async fn process(&self, batch: &[Delivery]) -> Vec<Outcome>;

    /// The record a delivery is of, for a failure that named none (the stage panicked on it, or
    /// failed its whole batch): its DLQ entry is filed, and replayed, under it. By default what
    /// a queue delivery's body names; a stage reading the stream says what a record's id is.
    fn record_id_of(&self, delivery: &Delivery) -> Option<RecordId> {
        record_id_in(delivery)
    }

    /// Called once when the worker stops (after its last batch): write out anything the stage
    /// gathers across batches.
    async fn finish(&self) {}
}

/// Where a worker's deliveries come from.
#[async_trait]
pub trait Source: Send {
    /// Up to `max` deliveries, waiting up to `wait` for the first.
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// The most deliveries one call to the service behind it hands out, if it has a limit.
    fn per_call(&self) -> Option<usize> {
        None
    }

    /// A first receive of a batch waited its whole wait and found nothing.
    fn found_nothing(&self) {}

    /// Acknowledges `done` (their downstream writes are durable) and schedules `retry` again.
    async fn settle(&mut self, done: &[&Origin], retry: &[&Origin], retry_delay: Duration) -> Result<()>;

    /// Whether [`Source::forward_and_ack`] is there (a queue, or the stream, on the embedded
    /// store).
    fn forwards_with_ack(&self) -> bool {
        false
    }

    /// Sends a batch's messages and acknowledges `done` in one transaction
    /// ([`WorkQueue::forward_and_ack`], [`StreamConsumer::forward_and_checkpoint`]); `retry`,
    /// the rest of the batch, is for [`Source::settle`] after, but a stream checkpoints no
    /// further than the first of them. Only where [`Source::forwards_with_ack`].
    async fn forward_and_ack(
        &mut self,
        _sends: Vec<(QueueName, Vec<OutgoingMessage>)>,
        _done: &[&Origin],
        _retry: &[&Origin],
    ) -> Result<()> {
        Err(SluiceError::permanent(ReasonCode::Internal, "this source cannot acknowledge with its sends"))
    }

    /// Keeps in-flight deliveries from being handed to another worker.
    async fn heartbeat(&mut self, in_flight: &[&Origin]) -> Result<()>;

    /// Lets go of everything held (stream leases) so another worker continues at once.
    async fn close(&mut self) -> Result<()>;
}

/// Reads a work queue.
pub struct QueueSource {
    queue: Arc<dyn WorkQueue>,
    visibility: Duration,
}

impl QueueSource {
    pub fn new(queue: Arc<dyn WorkQueue>, store: &StoreConfig) -> Self {
        Self { queue, visibility: Duration::from_millis(store.visibility_timeout_ms) }
    }
}

fn receipts<'a>(origins: &'a [&'a Origin]) -> Vec<Receipt> {
    origins
        .iter()
        .filter_map(|o| match o {
            Origin::Queue(r) => Some(r.clone()),
            Origin::Stream { .. } => None,
        })
        .collect()
}

#[async_trait]
impl Source for QueueSource {
    fn per_call(&self) -> Option<usize> {
        self.queue.per_call()
    }

    /// Nothing waits: the age falls to 0 rather than stay at the last batch's (a gauge is
    /// exported at its last value until it is set again).
    fn found_nothing(&self) {
        metrics().oldest_message_age(self.queue.name(), 0.0);
    }

    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        // The visibility this worker heartbeats by, asked for on every receive: SQS would
        // otherwise hide a message for the queue's own timeout, set when the queue was made,
        // and one raised in the configuration would let it show again mid-batch.
        let messages = self.queue.receive_hidden(max, wait, self.visibility).await?;
        if let Some(oldest) = messages.iter().map(|m| m.sent_at_ms).min() {
            let age_ms = crate::envelope::now_ms().saturating_sub(oldest);
            metrics().oldest_message_age(self.queue.name(), age_ms as f64 / 1000.0);
        }
        Ok(messages
            .into_iter()
            .map(|m| Delivery {
                body: m.body,
                attributes: m.attributes,
                receive_count: m.receive_count,
                first_received_ms: m.first_received_ms,
                origin: Origin::Queue(m.receipt),
            })
            .collect())
    }

    async fn settle(&mut self, done: &[&Origin], retry: &[&Origin], retry_delay: Duration) -> Result<()> {
        if !done.is_empty() {
            self.queue.ack(&receipts(done)).await?;
        }
        if !retry.is_empty() {
            self.queue.release(&receipts(retry), retry_delay).await?;
        }
        Ok(())
    }

    fn forwards_with_ack(&self) -> bool {
        self.queue.forwards_with_ack()
    }

    async fn forward_and_ack(
        &mut self,
        sends: Vec<(QueueName, Vec<OutgoingMessage>)>,
        done: &[&Origin],
        _retry: &[&Origin],
    ) -> Result<()> {
        self.queue.forward_and_ack(sends, &receipts(done)).await
    }

    async fn heartbeat(&mut self, in_flight: &[&Origin]) -> Result<()> {
        self.queue.extend_visibility(&receipts(in_flight), self.visibility).await
    }

    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Reads the record stream through a lease-holding consumer.
pub struct StreamSource {
    consumer: Box<dyn StreamConsumer>,
    /// The shards held after the last poll, to report leases taken and let go.
    held: Vec<String>,
    /// How often each record (shard, sequence) read and not yet settled has been read: a
    /// stream keeps no receive counts, and one that fails every time would otherwise hold its
    /// shard up for good (nothing past it checkpointed, until the stream's retention drops it).
    /// With each, when it was first read (a DLQ entry's first failure).
    reads: HashMap<(String, String), (u32, u64)>,
    /// After a retry, when the next read may be: the records rewound are not read again at once.
    resume_at: Option<tokio::time::Instant>,
    /// Records (shard, sequence) handled, sent on or dead-lettered, that no checkpoint covers yet:
    /// past their shard's first retry, or in a batch whose checkpoint failed. Read again after
    /// the rewind, they are not handed to the stage twice (a second message downstream, a
    /// second DLQ entry on SQS), only checkpointed.
    handled: HashSet<(String, String)>,
    /// Of `handled`, those read again since the last settle, to settle with the next one.
    carried: Vec<Origin>,
    /// Records were handed out since the last settle: until it, nothing may be checkpointed
    /// (the batch being collected may hold records before the carried ones).
    outstanding: bool,
}

impl StreamSource {
    pub fn new(consumer: Box<dyn StreamConsumer>) -> Self {
        Self {
            consumer,
            held: Vec::new(),
            reads: HashMap::new(),
            resume_at: None,
            handled: HashSet::new(),
            carried: Vec::new(),
            outstanding: false,
        }
    }

    /// What settling the records `done` leaves to remember (`covered`: each shard's checkpointed
    /// sequence, where one was recorded this time): their reads are forgotten; those no
    /// checkpoint covers are `handled`, to be checkpointed, not handed out, when read again;
    /// and nothing is kept of shards no longer held, nor of records a checkpoint passed without
    /// their being read again (one recorded though it reported a failure, say).
    fn note_settled(&mut self, done: &[&Origin], covered: &HashMap<String, String>) {
        let is_covered = |shard: &String, sequence: &str| {
            covered.get(shard).is_some_and(|to| compare_sequences(sequence, to).is_le())
        };
        for origin in done {
            let Origin::Stream { shard, sequence, .. } = origin else { continue };
            let key = (shard.clone(), sequence.clone());
            self.reads.remove(&key);
            if is_covered(shard, sequence) {
                self.handled.remove(&key);
            } else {
                self.handled.insert(key);
            }
        }
        let held = self.consumer.shards();
        self.reads.retain(|(shard, _), _| held.contains(shard));
        self.handled.retain(|(shard, sequence)| held.contains(shard) && !is_covered(shard, sequence));
    }

    /// Reports the leases held now, and a 0 for each one let go since the last report.
    fn report_leases(&mut self) {
        let held = self.consumer.shards();
        if held != self.held {
            for shard in self.held.iter().filter(|s| !held.contains(s)) {
                metrics().lease(shard, false);
            }
            for shard in &held {
                metrics().lease(shard, true);
            }
            self.held = held;
        }
    }
}

#[async_trait]
impl Source for StreamSource {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait;
        if let Some(at) = self.resume_at {
            if at > deadline {
                tokio::time::sleep_until(deadline).await;
                return Ok(Vec::new());
            }
            tokio::time::sleep_until(at).await;
            self.resume_at = None;
        }
        loop {
            let mut records = self.consumer.poll(max).await?;
            self.report_leases();
            if !self.handled.is_empty() {
                let handled = &self.handled;
                let (again, new): (Vec<_>, Vec<_>) =
                    records.into_iter().partition(|r| handled.contains(&(r.shard.clone(), r.sequence.clone())));
                records = new;
                self.carried.extend(
                    again.into_iter().map(|r| stream_origin(r.shard, r.sequence, r.arrived_ms, &r.partition_key)),
                );
                if records.is_empty() && !self.carried.is_empty() && !self.outstanding {
                    // Only records handled already: checkpointed now, not kept for a batch that
                    // may be long in coming.
                    self.settle(&[], &[], Duration::ZERO).await?;
                }
            }
            let now = tokio::time::Instant::now();
            if !records.is_empty() || now >= deadline {
                self.outstanding |= !records.is_empty();
                let reads = &mut self.reads;
                return Ok(records
                    .into_iter()
                    .map(|r| {
                        let (read, first) = reads
                            .entry((r.shard.clone(), r.sequence.clone()))
                            .or_insert((0, crate::envelope::now_ms()));
                        *read += 1;
                        Delivery {
                            body: r.data,
                            origin: stream_origin(r.shard, r.sequence, r.arrived_ms, &r.partition_key),
                            attributes: BTreeMap::from([(PARTITION_KEY.to_owned(), r.partition_key)]),
                            first_received_ms: Some(*first),
                            receive_count: *read,
                        }
                    })
                    .collect());
            }
            tokio::time::sleep(self.consumer.idle_poll().min(deadline - now)).await;
        }
    }

    /// Checkpoints each shard up to the last record before its first retry; a shard with a
    /// retry, or whose checkpoint failed, is rewound so the records from there on are read
    /// again. Every shard is seen to before the first error is returned.
    async fn settle(&mut self, done: &[&Origin], retry: &[&Origin], retry_delay: Duration) -> Result<()> {
        self.outstanding = false;
        if !retry.is_empty() {
            // The records rewound are not read again at once.
            self.resume_at = Some(tokio::time::Instant::now() + retry_delay);
        }
        let carried = std::mem::take(&mut self.carried);
        let done: Vec<&Origin> = done.iter().copied().chain(&carried).collect();
        let mut covered = HashMap::new();
        let mut first_error = None;
        for ShardSettlement { shard, checkpoint, rewind } in settlements(&done, retry) {
            if let Some(checkpoint) = checkpoint {
                match self.consumer.checkpoint(&shard, &checkpoint.sequence, checkpoint.records).await {
                    Err(e) if e.code() == ReasonCode::LeaseLost => {
                        warn_lease_lost(&shard);
                        continue;
                    }
                    Err(e) => {
                        // Read again from the stored checkpoint, so that what this batch handled is
                        // checkpointed (and counted) by a later one; the sinks are idempotent.
                        if let Err(rewind) = self.consumer.rewind(&shard).await {
                            tracing::warn!(shard, error = %rewind, "could not rewind after a failed checkpoint");
                        }
                        first_error.get_or_insert(e);
                        continue;
                    }
                    Ok(()) => {}
                }
                metrics().arrived(&shard, checkpoint.records);
                covered.insert(shard.clone(), checkpoint.sequence);
            }
            if rewind && let Err(e) = self.consumer.rewind(&shard).await {
                first_error.get_or_insert(e);
            }
        }
        self.note_settled(&done, &covered);
        first_error.map_or(Ok(()), Err)
    }

    fn forwards_with_ack(&self) -> bool {
        self.consumer.forwards_with_checkpoint()
    }

    /// The sends and each shard's checkpoint (as [`Source::settle`] would take it) in one
    /// transaction; the shards with a retry are rewound by the settle that follows.
    async fn forward_and_ack(
        &mut self,
        sends: Vec<(QueueName, Vec<OutgoingMessage>)>,
        done: &[&Origin],
        retry: &[&Origin],
    ) -> Result<()> {
        // Records read again that were handled before (see `handled`): checkpointed with these,
        // or, should the transaction fail, with the settle that follows.
        let carried = std::mem::take(&mut self.carried);
        let done: Vec<&Origin> = done.iter().copied().chain(&carried).collect();
        let checkpoints: Vec<Checkpoint> = settlements(&done, retry).into_iter().filter_map(|s| s.checkpoint).collect();
        let recorded = match self.consumer.forward_and_checkpoint(sends, &checkpoints).await {
            Ok(recorded) => recorded,
            Err(e) => {
                self.carried = carried;
                return Err(e);
            }
        };
        let mut covered = HashMap::new();
        for (checkpoint, held) in checkpoints.into_iter().zip(recorded) {
            if held {
                metrics().arrived(&checkpoint.shard, checkpoint.records);
                covered.insert(checkpoint.shard, checkpoint.sequence);
            } else {
                warn_lease_lost(&checkpoint.shard);
            }
        }
        self.note_settled(&done, &covered);
        Ok(())
    }

    async fn heartbeat(&mut self, _in_flight: &[&Origin]) -> Result<()> {
        self.consumer.renew_leases().await
    }

    async fn close(&mut self) -> Result<()> {
        self.consumer.release().await?;
        self.report_leases();
        Ok(())
    }
}

/// Where a stream record was read; one written back by a replay (its partition key says so) is
/// no new arrival.
fn stream_origin(shard: String, sequence: String, arrived_ms: u64, partition_key: &str) -> Origin {
    Origin::Stream { shard, sequence, arrived_ms, replay: partition_key.starts_with(REPLAY_KEY_PREFIX) }
}

/// What a batch's outcome means for one shard it read from.
struct ShardSettlement {
    shard: String,
    /// Up to the last record before the shard's first retry; none if the retry comes first.
    checkpoint: Option<Checkpoint>,
    /// The shard has a retry: it is read again from its checkpoint.
    rewind: bool,
}

/// Each shard's [`ShardSettlement`] for a batch's `done` and `retry` stream deliveries.
fn settlements(done: &[&Origin], retry: &[&Origin]) -> Vec<ShardSettlement> {
    // Sequence, handled, replayed.
    let mut shards: BTreeMap<&str, Vec<(&str, bool, bool)>> = BTreeMap::new();
    for (origin, ok) in done.iter().map(|o| (o, true)).chain(retry.iter().map(|o| (o, false))) {
        if let Origin::Stream { shard, sequence, replay, .. } = origin {
            shards.entry(shard).or_default().push((sequence, ok, *replay));
        }
    }
    shards
        .into_iter()
        .map(|(shard, mut seen)| {
            seen.sort_by(|a, b| compare_sequences(a.0, b.0));
            let handled = seen.iter().take_while(|(_, ok, _)| *ok).count();
            // Replays are not arrivals: they were counted when they first came.
            let records = seen[..handled].iter().filter(|(_, _, replay)| !replay).count() as u64;
            let checkpoint = handled.checked_sub(1).map(|last| Checkpoint {
                shard: shard.to_owned(),
                sequence: seen[last].0.to_owned(),
                records,
            });
            ShardSettlement { shard: shard.to_owned(), checkpoint, rewind: handled < seen.len() }
        })
        .collect()
}

/// Calls of one queue's sends in flight at once (as SQS's own batch sends go).
const SENDS_AT_ONCE: usize = 4;

/// A forward that stopped short: why, and the deliveries with a message that may not have gone
/// out (to be redone; the others' messages all went out).
struct ForwardFailed {
    error: SluiceError,
    unsent: BTreeSet<usize>,
}

fn warn_lease_lost(shard: &str) {
    tracing::warn!(shard, "lease lost before checkpoint; the new owner re-reads from the last checkpoint");
}

/// Sequence numbers are decimal strings of any length (Kinesis's exceed 64 bits).
pub(crate) fn compare_sequences(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The source a stage reads: the stream for ingest, its input queue for the others.
pub async fn source_for(
    stage: StageName,
    backend: &Backend,
    store: &StoreConfig,
    worker_id: &str,
) -> Result<Box<dyn Source>> {
    Ok(match stage.input_queue() {
        Some(queue) => Box::new(QueueSource::new(backend.queue(queue), store)),
        None => Box::new(StreamSource::new(backend.stream.consumer(worker_id).await?)),
    })
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub batches: u64,
    pub handled: u64,
    pub dead_lettered: u64,
    pub retried: u64,
}

/// One stage's loop.
pub struct Worker {
    stage: Arc<dyn Stage>,
    source: Box<dyn Source>,
    backend: Backend,
    config: WorkerConfig,
    heartbeat_every: Duration,
    /// The longest a batch is filled after its first delivery: a quarter of the visibility
    /// timeout, so that the heartbeat, every half of it once work starts, comes before what
    /// was received first becomes visible to other workers.
    fill_within: Duration,
    /// Told once the first receive has worked (store reachable, leases taken).
    health: Option<Health>,
    /// Cancelled when the grace period is nearly up: the batch in hand is handed back unfinished.
    abandon: CancellationToken,
    /// `messaging.system` of the queues, for spans.
    queue_system: &'static str,
    /// Where the stage reads from, for spans.
    input: Destination,
    /// Receives after which the queue redrives a message: a retryable failure on the last one is
    /// dead-lettered here, with its cause, rather than left for the redrive's
    /// `max_receives_exceeded`.
    max_receives: u32,
}

impl Worker {
    pub fn new(
        stage: Arc<dyn Stage>,
        source: Box<dyn Source>,
        backend: Backend,
        config: WorkerConfig,
        store: &StoreConfig,
    ) -> Self {
        metrics().start(stage.name());
        let (stream_system, queue_system) = traces::messaging_systems(store.backend == BackendKind::Aws);
        let input = match stage.name().input_queue() {
            Some(queue) => Destination { system: queue_system, name: queue.as_str().to_owned() },
            None => Destination { system: stream_system, name: traces::STREAM.to_owned() },
        };
        let heartbeat_every = heartbeat_every(stage.name(), store);
        Self {
            stage,
            source,
            backend,
            config,
            heartbeat_every,
            fill_within: Duration::from_millis(store.visibility_timeout_ms / 4),
            health: None,
            abandon: CancellationToken::new(),
            queue_system,
            input,
            max_receives: store.max_receives.max(1),
        }
    }

    /// Hands the batch in hand back unfinished (visible again at once) when `abandon` is
    /// cancelled, rather than finish it: for the end of a grace period.
    pub fn abandoning_on(mut self, abandon: CancellationToken) -> Self {
        self.abandon = abandon;
        self
    }

    /// Tells `health` the worker is ready once its first receive has worked.
    pub fn reporting_to(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }

    /// Runs until `shutdown` is cancelled, then finishes the batch in hand, acknowledges it and
    /// lets go of its leases.
    #[tracing::instrument(skip_all, fields(stage = %self.stage.name()))]
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<WorkerReport> {
        let mut report = WorkerReport::default();
        let mut backoff = new_backoff();
        while !shutdown.is_cancelled() {
            match self.run_once(&mut report, &shutdown).await {
                Ok(()) => {
                    backoff = new_backoff();
                    if let Some(health) = self.health.take() {
                        health.worker_ready();
                    }
                }
                Err(e) if e.is_retryable() => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, ?delay, "batch failed; backing off");
                    self.back_off(delay, &shutdown).await;
                }
                Err(e) => {
                    self.stage.finish().await;
                    let _ = self.source.close().await;
                    return Err(e);
                }
            }
        }
        self.stage.finish().await;
        self.source.close().await?;
        tracing::info!(?report, "worker stopped");
        Ok(report)
    }

    /// Waits `delay`, or until `shutdown`, keeping a stream's shard leases meanwhile: backing off
    /// for seconds (up to 20 with the jitter) would let them run out (10 s by default) and other
    /// workers take them and redo what this one read.
    async fn back_off(&mut self, delay: Duration, shutdown: &CancellationToken) {
        let sleep = tokio::time::sleep(delay);
        if self.stage.name().input_queue().is_none() {
            let mut beats = self.beats();
            keeping(self.source.as_mut(), &[], &mut beats, shutdown, sleep).await;
        } else {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = sleep => {}
            }
        }
    }

    /// A heartbeat every [`Self::heartbeat_every`], the first one that long from now; beats
    /// missed (a stage that kept its task busy) are one beat, not a burst of them.
    fn beats(&self) -> tokio::time::Interval {
        let every = self.heartbeat_every;
        let mut beats = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beats
    }

    async fn run_once(&mut self, report: &mut WorkerReport, shutdown: &CancellationToken) -> Result<()> {
        let received_at = SystemTime::now();
        let mut batch = self.collect_batch(shutdown).await?;
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let stage = self.stage.name();
        metrics().received(stage, batch.len());
        let trace = traces::enabled().then(|| self.start_trace(&mut batch, received_at));
        // One beat for the batch, from its processing through its sends.
        let mut beats = self.beats();
        let Some(outcomes) = self.process_with_heartbeat(&batch, &mut beats).await else {
            // Out of time to finish: hand the batch back at once, for another worker to redo.
            tracing::warn!(%stage, records = batch.len(), "stopping before the batch finished; it is handed back");
            return self.hand_back(&batch, Duration::ZERO).await;
        };
        let outcomes = if outcomes.len() == batch.len() {
            outcomes
        } else {
            let error = SluiceError::retryable(
                ReasonCode::Internal,
                format!("stage returned {} outcomes for {} deliveries", outcomes.len(), batch.len()),
            );
            vec![Outcome::failed(error, None); batch.len()]
        };
        let retry_delay = Duration::from_millis(self.config.retry_delay_ms);
        if let Some(error) = outcomes.iter().find_map(Outcome::misconfiguration) {
            // Dead-lettering would empty the input into the DLQ until someone fixes the
            // deployment: the batch goes back and the worker stops, loudly (on ECS the service
            // restarts it, and a deployment's circuit breaker rolls back).
            tracing::error!(%stage, error = %error, "the deployment refuses this stage's work: the batch is handed back and the worker stops");
            let error = error.clone();
            self.hand_back(&batch, retry_delay).await?;
            return Err(error);
        }

        // Messages by queue, each with the index of the delivery it came from.
        let mut sends: BTreeMap<QueueName, Vec<(usize, OutgoingMessage)>> = BTreeMap::new();
        let (mut done, mut retry) = (Vec::new(), Vec::new());
        // The delivery each of `done` is.
        let mut done_index = Vec::new();
        let mut processed = 0;
        // Records to retry, by reason: how many, and the first's id and error. Said in one line a
        // reason, not one a record: a store that cannot be reached fails every record of every
        // batch, again at each receive.
        let mut retrying: BTreeMap<&'static str, (usize, Option<RecordId>, SluiceError)> = BTreeMap::new();
        for (index, (delivery, outcome)) in batch.iter().zip(outcomes).enumerate() {
            match outcome {
                Outcome::Forward(messages) => {
                    if let (Some(trace), Some(id)) =
                        (&trace, messages.first().and_then(|(_, m)| m.dedup_key.as_deref()))
                    {
                        trace.record_id(index, id);
                    }
                    for (queue, message) in messages {
                        sends.entry(queue).or_default().push((index, message));
                    }
                    processed += 1;
                    done.push(&delivery.origin);
                    done_index.push(index);
                }
                Outcome::Failed { error, record_id } => {
                    // A stream record's receives are the reads its source counted.
                    let last_receive = delivery.receive_count >= self.max_receives && error.is_retryable();
                    let error = if last_receive {
                        SluiceError::permanent(
                            error.code(),
                            format!("gave up after {} receives: {}", delivery.receive_count, error.detail()),
                        )
                    } else {
                        error
                    };
                    let record_id = record_id.or_else(|| self.stage.record_id_of(delivery));
                    let permanent = !error.is_retryable();
                    let action = if permanent { FailureAction::DeadLettered } else { FailureAction::Retried };
                    metrics().failed(stage, error.code().as_str(), action);
                    if let Some(trace) = &trace {
                        if let Some(id) = &record_id {
                            trace.record_id(index, id.as_str());
                        }
                        trace.record_failed(index, error.code().as_str(), error.detail());
                    }
                    let id = record_id.as_ref().map(|r| r.as_str());
                    if permanent {
                        tracing::info!(%stage, record_id = id, code = %error.code(), detail = error.detail(), "dead-lettered");
                        sends
                            .entry(stage.dlq())
                            .or_default()
                            .push((index, dlq_message(stage, delivery, &error, record_id)));
                        report.dead_lettered += 1;
                        done.push(&delivery.origin);
                        done_index.push(index);
                    } else {
                        tracing::debug!(%stage, record_id = id, %error, "will retry");
                        retrying
                            .entry(error.code().as_str())
                            .or_insert_with(|| (0, record_id.clone(), error.clone()))
                            .0 += 1;
                        report.retried += 1;
                        retry.push(&delivery.origin);
                    }
                }
            }
        }

        for (code, (records, first, error)) in retrying {
            let first = first.as_ref().map(RecordId::as_str);
            tracing::warn!(%stage, code, records, first_record_id = first, %error, "will retry");
        }

        let acknowledged = match self.forward(trace.as_ref(), sends, &done, &retry, &mut beats).await {
            Ok(acknowledged) => acknowledged,
            Err(ForwardFailed { error, unsent }) => {
                // What went out whole is acknowledged (done again, a dead-lettered record would
                // be dead-lettered twice: SQS keeps both); the rest comes back to be redone, and
                // sinks are idempotent. At the end of a grace period it is visible at once.
                let delay = if self.abandon.is_cancelled() { Duration::ZERO } else { retry_delay };
                let (mut went, mut redo) = (Vec::new(), retry.clone());
                for (origin, index) in done.iter().zip(&done_index) {
                    if unsent.contains(index) { redo.push(*origin) } else { went.push(*origin) }
                }
                self.source.settle(&went, &redo, delay).await?;
                return Err(error);
            }
        };
        let settle = if acknowledged { &[][..] } else { &done[..] };
        self.source.settle(settle, &retry, retry_delay).await?;
        metrics().processed(stage, processed);
        metrics().batch(stage, batch.len(), started.elapsed().as_secs_f64());
        if let Some(trace) = trace {
            trace.finish();
        }
        report.batches += 1;
        report.handled += done.len() as u64;
        Ok(())
    }

    /// Hands the whole batch back unacknowledged, to come back after `delay` and be done again.
    async fn hand_back(&mut self, batch: &[Delivery], delay: Duration) -> Result<()> {
        let all: Vec<&Origin> = batch.iter().map(|d| &d.origin).collect();
        self.source.settle(&[], &all, delay).await
    }

    /// Sends each queue's messages (`(delivery index, message)`), each queue's in a span of its
    /// own: in one transaction with the acknowledgement of `done` where the source's store has
    /// them ([`Source::forwards_with_ack`]), else one queue after another, stopping at the first
    /// that fails, each queue's in calls of at most what one takes (SQS: 10), so that what
    /// went out before a failure is known. `Ok(true)`: `done` is acknowledged too.
    async fn forward(
        &mut self,
        trace: Option<&BatchTrace>,
        sends: BTreeMap<QueueName, Vec<(usize, OutgoingMessage)>>,
        done: &[&Origin],
        retry: &[&Origin],
        beats: &mut tokio::time::Interval,
    ) -> std::result::Result<bool, ForwardFailed> {
        let system = self.queue_system;
        let span = |queue: QueueName, records: &[usize]| {
            trace.map(|trace| trace.send(&Destination { system, name: queue.as_str().to_owned() }, records))
        };
        let outgoing: Vec<(QueueName, Vec<usize>, Vec<OutgoingMessage>)> = sends
            .into_iter()
            .map(|(queue, messages)| {
                let (records, messages) = messages
                    .into_iter()
                    .map(|(index, mut message)| {
                        if let Some(traceparent) = trace.and_then(|t| t.traceparent(index)) {
                            message.attributes.insert(TRACEPARENT.to_owned(), traceparent);
                        }
                        (index, message)
                    })
                    .unzip();
                (queue, records, messages)
            })
            .collect();

        // Deliveries with a message not (yet) known to have gone out, and how many each has.
        let unsent: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());
        for (_, records, _) in &outgoing {
            for index in records {
                *unsent.lock().expect("not poisoned").entry(*index).or_default() += 1;
            }
        }
        let failed = |error: SluiceError, unsent: &Mutex<BTreeMap<usize, usize>>| ForwardFailed {
            error,
            unsent: unsent.lock().expect("not poisoned").keys().copied().collect(),
        };
        if self.source.forwards_with_ack() && !(outgoing.is_empty() && done.is_empty()) {
            let spans: Vec<_> = outgoing.iter().map(|(queue, records, _)| span(*queue, records)).collect();
            let counts: Vec<(QueueName, usize)> = outgoing.iter().map(|(queue, _, m)| (*queue, m.len())).collect();
            let sends = outgoing.into_iter().map(|(queue, _, messages)| (queue, messages)).collect();
            if let Err(e) = self.source.forward_and_ack(sends, done, retry).await {
                for span in spans.iter().flatten() {
                    span.failed(&e);
                }
                return Err(failed(e, &unsent));
            }
            for (queue, count) in counts {
                metrics().sent(queue, count);
            }
            return Ok(true);
        }
        let backend = &self.backend;
        let unsent_ref = &unsent;
        let sending = async move {
            use futures_util::StreamExt as _;
            for (queue, records, messages) in outgoing {
                let span = span(queue, &records);
                let target = backend.queue(queue);
                let per_call = target.per_call().unwrap_or(usize::MAX).max(1);
                // One call a chunk, a few at a time; each, once it went out, says whose messages
                // it carried. Collected first: a lazily mapped iterator in the stream trips the
                // compiler's check that the (`Send`) future is Send for every lifetime.
                let mut records = records.into_iter();
                let mut messages = messages.into_iter().peekable();
                let mut calls = Vec::new();
                while messages.peek().is_some() {
                    let call: Vec<OutgoingMessage> = messages.by_ref().take(per_call).collect();
                    let carried: Vec<usize> = records.by_ref().take(call.len()).collect();
                    let target = Arc::clone(&target);
                    calls.push(async move { target.send_batch(call).await.map(|()| carried) });
                }
                // A call that fails does not stop the others: each that goes out is counted, so
                // that only the failed one's records are redone.
                let mut calls = futures_util::stream::iter(calls).buffer_unordered(SENDS_AT_ONCE);
                let mut failed = None;
                while let Some(sent) = calls.next().await {
                    let carried = match sent {
                        Ok(carried) => carried,
                        Err(e) => {
                            failed.get_or_insert(e);
                            continue;
                        }
                    };
                    let mut left = unsent_ref.lock().expect("not poisoned");
                    for index in &carried {
                        if let Some(n) = left.get_mut(index) {
                            *n -= 1;
                            if *n == 0 {
                                left.remove(index);
                            }
                        }
                    }
                    drop(left);
                    metrics().sent(queue, carried.len());
                }
                if let Some(e) = failed {
                    if let Some(span) = &span {
                        span.failed(&e);
                    }
                    return Err(e);
                }
            }
            Ok(false)
        };
        // Sends that take their time (a throttled queue, claim-checks to S3: the SDK's retries)
        // keep the batch's visibility and leases on the processing's beat; else another worker
        // could take its messages, or the shard, and do them again meanwhile.
        let in_flight: Vec<&Origin> = done.iter().chain(retry).copied().collect();
        match keeping(self.source.as_mut(), &in_flight, beats, &self.abandon, sending).await {
            Some(sent) => sent.map_err(|e| failed(e, &unsent)),
            // Out of time (a queue throttled, the SDK retrying): cut short, what did not go out
            // is handed back as after a failed send, and the worker still lets go of its leases
            // before the process is killed.
            None => Err(failed(
                SluiceError::retryable(
                    ReasonCode::Internal,
                    "the grace period ran out while the batch was being sent on",
                ),
                &unsent,
            )),
        }
    }

    /// Starts the batch's spans and hands each delivery the trace context its record carries on
    /// (the `traceparent` attribute, which the stages pass on and ingest writes into the envelope).
    fn start_trace(&self, batch: &mut [Delivery], received_at: SystemTime) -> BatchTrace {
        let parents: Vec<Option<String>> = batch.iter().map(arrived_traceparent).collect();
        let parents: Vec<Option<&str>> = parents.iter().map(Option::as_deref).collect();
        let trace = BatchTrace::start(self.stage.name().as_str(), &self.input, &parents, received_at);
        for (index, delivery) in batch.iter_mut().enumerate() {
            if let Some(traceparent) = trace.traceparent(index) {
                delivery.attributes.insert(TRACEPARENT.to_owned(), traceparent);
            }
        }
        trace
    }

    /// Waits for the first delivery, then fills the batch: at once from a backlog, else for up to
    /// the stage's `max_wait`.
    ///
    /// The first receive is a long poll of `poll_wait_ms` (on SQS one request per 20 s while a
    /// queue is empty, not one a second), cut short until the worker is first ready, so that
    /// readiness is known at once. A stopping worker does not wait it out: the receive is
    /// dropped, which only delays what it may already have taken, never loses it (a queue makes
    /// its messages visible again after the visibility timeout, counting one more receive; a
    /// stream's read position was not checkpointed, and the next owner of the shard reads on
    /// from the checkpoint).
    async fn collect_batch(&mut self, shutdown: &CancellationToken) -> Result<Vec<Delivery>> {
        let mut policy = self.stage.batch_policy();
        policy.max_size = in_whole_calls(policy.max_size, self.source.per_call());
        let mut wait = Duration::from_millis(self.config.poll_wait_ms);
        if self.health.is_some() {
            wait = wait.min(FIRST_POLL_WAIT);
        }
        let mut batch = tokio::select! {
            batch = self.source.receive(policy.max_size, wait) => batch?,
            () = shutdown.cancelled() => return Ok(Vec::new()),
        };
        if batch.is_empty() {
            self.source.found_nothing();
        }
        if batch.is_empty() || policy.max_wait.is_zero() {
            return Ok(batch);
        }
        // While receives come back full there is a backlog, and filling the batch costs no
        // waiting: keep receiving (fuller batches mean fewer downstream requests). Once one comes
        // back short, wait for more only until `max_wait` is up. Either way filling stops at
        // `fill_within` (a slow store must not keep the batch in hand past its visibility) and
        // when the worker is told to stop (what is in hand is finished within the grace).
        let started = tokio::time::Instant::now();
        let deadline = started + policy.max_wait;
        let fill_by = started + self.fill_within;
        let mut largest = batch.len();
        let mut backlog = true;
        while batch.len() < policy.max_size && !shutdown.is_cancelled() && tokio::time::Instant::now() < fill_by {
            let left = deadline.min(fill_by).saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() && !backlog {
                break;
            }
            let want = policy.max_size - batch.len();
            // The batch in hand is worked on even if a further receive fails: a stream source
            // has already moved its read position past it.
            let more = match self.source.receive(want, left).await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "a receive to fill the batch failed; going on with what is in hand");
                    break;
                }
            };
            if more.is_empty() {
                break;
            }
            backlog = more.len() >= want.min(largest);
            largest = largest.max(more.len());
            batch.extend(more);
        }
        Ok(batch)
    }

    /// Runs the stage, extending the batch's visibility (and the stream's leases) at each of
    /// `beats` while it works; `None` if told to abandon it first.
    async fn process_with_heartbeat(
        &mut self,
        batch: &[Delivery],
        beats: &mut tokio::time::Interval,
    ) -> Option<Vec<Outcome>> {
        let stage = Arc::clone(&self.stage);
        let in_flight: Vec<&Origin> = batch.iter().map(|d| &d.origin).collect();
        keeping(self.source.as_mut(), &in_flight, beats, &self.abandon, process_guarded(stage.as_ref(), batch)).await
    }
}

/// Awaits `work`, keeping what `in_flight` names (its messages' visibility, the stream's shard
/// leases, which a heartbeat renews with or without records) at each of `beats` meanwhile: what
/// `work` gives, or `None` if `stop` comes first. A heartbeat that fails is said, and the next
/// beat tries again.
async fn keeping<T>(
    source: &mut dyn Source,
    in_flight: &[&Origin],
    beats: &mut tokio::time::Interval,
    stop: &CancellationToken,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Some(out),
            () = stop.cancelled() => return None,
            _ = beats.tick() => {
                if let Err(e) = source.heartbeat(in_flight).await {
                    tracing::warn!(error = %e, records = in_flight.len(), "heartbeat failed: visibility or leases not renewed");
                }
            }
        }
    }
}

/// `stage.process(batch)`, with a panic in it (a decoder's bug an input found, say) kept to the
/// record that caused it: the batch is processed again a record at a time, and a record that
/// panics on its own fails for good (reason `internal`). Uncaught, the panic would end the
/// worker, and on every receive again, until the queue's redrive took the whole batch.
async fn process_guarded(stage: &dyn Stage, batch: &[Delivery]) -> Vec<Outcome> {
    use futures_util::FutureExt as _;
    use std::panic::AssertUnwindSafe;
    match AssertUnwindSafe(stage.process(batch)).catch_unwind().await {
        Ok(outcomes) => outcomes,
        Err(panic) if batch.len() == 1 => vec![panicked(panic.as_ref())],
        Err(_) => {
            tracing::warn!(stage = %stage.name(), records = batch.len(), "the stage panicked; its batch is done again a record at a time");
            let mut outcomes = Vec::with_capacity(batch.len());
            for delivery in batch {
                match AssertUnwindSafe(stage.process(std::slice::from_ref(delivery))).catch_unwind().await {
                    Ok(one) => outcomes.extend(one),
                    Err(panic) => outcomes.push(panicked(panic.as_ref())),
                }
            }
            outcomes
        }
    }
}

/// A record the stage panicked on, alone.
fn panicked(panic: &(dyn std::any::Any + Send)) -> Outcome {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    let error = SluiceError::permanent(ReasonCode::Internal, format!("the stage panicked on this record: {message}"));
    Outcome::failed(error, None)
}

/// The trace context a delivery arrived with: its `traceparent` attribute (queues), or the
/// `trace` of the envelope a producer wrote to the stream (none from a foreign producer).
fn arrived_traceparent(delivery: &Delivery) -> Option<String> {
    if let Some(value) = delivery.attributes.get(TRACEPARENT) {
        return Some(value.clone());
    }
    #[derive(serde::Deserialize)]
    struct TraceOnly {
        trace: Option<String>,
    }
    // As ingest reads an envelope: past a byte-order mark and whitespace.
    let body = crate::envelope::without_bom(&delivery.body);
    if matches!(delivery.origin, Origin::Stream { .. }) && body.trim_ascii_start().first() == Some(&b'{') {
        return serde_json::from_slice::<TraceOnly>(body).ok().and_then(|t| t.trace);
    }
    None
}

/// How often a worker busy with a batch keeps it: halfway through its messages' visibility, and,
/// reading the stream, as often as its shard leases want renewing (they run out sooner).
fn heartbeat_every(stage: StageName, store: &StoreConfig) -> Duration {
    let visibility = Duration::from_millis(store.visibility_timeout_ms / 2);
    let every = match stage.input_queue() {
        Some(_) => visibility,
        None => visibility.min(store.lease_renewal_every()),
    };
    every.max(Duration::from_millis(1))
}

/// The longest first receive before the worker is ready.
const FIRST_POLL_WAIT: Duration = Duration::from_secs(1);

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The record id a queue delivery's body names (an envelope, or an inferred record's), for a
/// failure its stage named none for (a store write that failed for the whole batch): its DLQ
/// entry is then found by it, as one the queue's redrive moved is.
/// Read leniently: a body the stage refused (an unknown field, a number out of range) may still
/// name its record.
fn record_id_in(delivery: &Delivery) -> Option<RecordId> {
    /// An envelope's `record_id`, or an inferred record's `envelope.record_id`; nothing else.
    #[derive(serde::Deserialize)]
    struct Named {
        record_id: Option<RecordId>,
        envelope: Option<Box<Named>>,
    }
    if !matches!(delivery.origin, Origin::Queue(_)) {
        return None;
    }
    let named: Named = serde_json::from_slice(&delivery.body).ok()?;
    named.record_id.or_else(|| named.envelope.and_then(|e| e.record_id))
}

/// The DLQ message for a permanent failure: the body as received, the reason in attributes.
fn dlq_message(
    stage: StageName,
    delivery: &Delivery,
    error: &SluiceError,
    record_id: Option<RecordId>,
) -> OutgoingMessage {
    let mut entry = DlqEntry::new(stage, error, delivery.receive_count, record_id.clone(), Vec::new());
    // Failed on every receive (given up on the last): the first failure came with the first.
    if delivery.receive_count > 1
        && let Some(first) = delivery.first_received_ms
    {
        entry.first_failure_ms = first.min(entry.last_failure_ms);
    }
    let mut attributes = delivery.attributes.clone();
    if let Origin::Stream { shard, sequence, .. } = &delivery.origin {
        attributes.insert("shard".to_owned(), shard.clone());
        attributes.insert("sequence".to_owned(), sequence.clone());
    }
    attributes.extend(entry.attributes());
    OutgoingMessage { body: delivery.body.clone(), attributes, dedup_key: record_id.map(String::from) }
}

/// `max` rounded down to whole calls of `per_call` deliveries when it spans more than one: on
/// SQS a batch of 64 takes seven receives, seven deletes and seven sends downstream, where 60
/// takes six of each.
fn in_whole_calls(max: usize, per_call: Option<usize>) -> usize {
    match per_call {
        Some(unit) if unit > 0 && max > unit => max - max % unit,
        _ => max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;

    /// A failure its stage named no record for is still filed under the record its body names.
    #[test]
    fn a_queue_delivery_names_its_record() {
        let envelope =
            Envelope::inline(RecordId::parse("r-7").unwrap(), "t", crate::envelope::ContentType::Png, vec![1]);
        let delivery = |origin| Delivery {
            body: envelope.to_json(),
            attributes: BTreeMap::new(),
            receive_count: 1,
            first_received_ms: None,
            origin,
        };
        let queued = delivery(Origin::Queue(Receipt("q".into())));
        assert_eq!(record_id_in(&queued).unwrap().as_str(), "r-7");
        let streamed =
            delivery(Origin::Stream { shard: "s".into(), sequence: "1".into(), arrived_ms: 0, replay: false });
        assert_eq!(record_id_in(&streamed), None, "a stream record's id is ingest's to read");
        // Bodies a stage refuses may still name their record.
        let odd = Delivery { body: br#"{"record_id":"r-8","colour":"red"}"#.to_vec(), ..queued.clone() };
        assert_eq!(record_id_in(&odd).unwrap().as_str(), "r-8");
        let inferred = br#"{"envelope":{"record_id":"r-9"},"prediction":{"probabilities":[3e110]}}"#;
        let inferred = Delivery { body: inferred.to_vec(), ..queued.clone() };
        assert_eq!(record_id_in(&inferred).unwrap().as_str(), "r-9");
        let garbage = Delivery { body: b"not a record".to_vec(), ..queued };
        assert_eq!(record_id_in(&garbage), None);
    }

    /// A producer's trace goes on from an envelope on the stream however its JSON starts (ingest
    /// reads past a byte-order mark and whitespace); a queue message's comes from its attribute.
    #[test]
    fn a_producer_trace_is_read_past_a_byte_order_mark_and_whitespace() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let envelope = format!(r#"{{"schema_version":1,"trace":"{parent}"}}"#);
        let streamed = |body: Vec<u8>| Delivery {
            body,
            attributes: BTreeMap::new(),
            receive_count: 1,
            first_received_ms: None,
            origin: Origin::Stream { shard: "s".into(), sequence: "1".into(), arrived_ms: 0, replay: false },
        };
        for prefix in [&b""[..], b"\xEF\xBB\xBF", b" \r\n\t", b"\xEF\xBB\xBF\n"] {
            let delivery = streamed([prefix, envelope.as_bytes()].concat());
            assert_eq!(arrived_traceparent(&delivery).as_deref(), Some(parent), "{prefix:?}");
        }
        assert_eq!(arrived_traceparent(&streamed(b"\x89PNG".to_vec())), None);
        let queued = Delivery {
            attributes: BTreeMap::from([(TRACEPARENT.to_owned(), parent.to_owned())]),
            origin: Origin::Queue(Receipt("q".into())),
            ..streamed(b"{}".to_vec())
        };
        assert_eq!(arrived_traceparent(&queued).as_deref(), Some(parent));
    }

    /// A delivery given up on after failing on every receive failed first when first received.
    #[test]
    fn a_dlq_entry_of_many_receives_dates_its_first_failure_from_the_first() {
        use crate::record::dlq_attr;
        let error = SluiceError::retryable(ReasonCode::Internal, "down");
        let delivery = |receive_count| Delivery {
            body: b"x".to_vec(),
            attributes: BTreeMap::new(),
            receive_count,
            first_received_ms: Some(1_000),
            origin: Origin::Queue(Receipt("q".into())),
        };
        let first = |message: OutgoingMessage| message.attributes[dlq_attr::FIRST_FAILURE_MS].parse::<u64>().unwrap();
        assert_eq!(first(dlq_message(StageName::Features, &delivery(5), &error, None)), 1_000);
        assert!(first(dlq_message(StageName::Features, &delivery(1), &error, None)) > 1_000, "once: now");
    }

    #[test]
    fn long_sequence_numbers_order_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_sequences("9", "10"), Less);
        assert_eq!(compare_sequences("49590338271490256608559692538361571095921575989136588898", "9"), Greater);
        assert_eq!(compare_sequences("12", "12"), Equal);
    }

    #[test]
    fn batches_spanning_several_calls_fill_whole_calls() {
        assert_eq!(in_whole_calls(64, Some(10)), 60);
        assert_eq!(in_whole_calls(200, Some(10)), 200);
        assert_eq!(in_whole_calls(10, Some(10)), 10);
        assert_eq!(in_whole_calls(7, Some(10)), 7, "a batch under one call is left as it is");
        assert_eq!(in_whole_calls(64, None), 64, "no per-call limit (the embedded store)");
    }
}
