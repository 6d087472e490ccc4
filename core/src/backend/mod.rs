//! The storage contracts every stage relies on, and the backends that implement them.
//!
//! One set of traits, two implementations: [`embedded`] (one SQLite file) and [`aws`].
//! The conformance suite in `core/tests/conformance.rs` runs against each.

pub mod aws;
pub mod embedded;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::config::{BackendKind, StoreConfig};
use crate::envelope::RecordId;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::record::{PredictionResult, Resolution, ResultStatus};
use crate::topology::QueueName;
use crate::vector::FeatureVector;

/// A record as a producer writes it to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInput {
    pub partition_key: String,
    pub data: Vec<u8>,
}

/// The most a stream record may carry, partition key included (Kinesis: 1 MiB).
pub const MAX_STREAM_RECORD: usize = 1024 * 1024;

impl StreamInput {
    /// Whether the stream takes the record: a larger one fails the whole put.
    pub fn fits(&self) -> bool {
        self.data.len() + self.partition_key.len() <= MAX_STREAM_RECORD
    }
}

/// A record as a consumer reads it from one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub shard: String,
    /// Opaque, ordered within its shard.
    pub sequence: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    pub arrived_ms: u64,
}

/// What writing records to the stream took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PutReport {
    pub records: u64,
    /// Records the stream refused in a call that partly failed, and that were sent again.
    pub retried: u64,
    /// Of those, the ones refused for the shard's write throughput.
    pub throttled: u64,
}

impl std::ops::AddAssign for PutReport {
    fn add_assign(&mut self, other: Self) {
        self.records += other.records;
        self.retried += other.retried;
        self.throttled += other.throttled;
    }
}

/// How far consumers have got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StreamStats {
    pub shards: usize,
    /// Records the consumers (ingest) have taken in and checkpointed: every producer's, each
    /// counted once, as its checkpoint moves past it.
    pub records: u64,
    /// Those records by shard.
    pub arrived: BTreeMap<String, u64>,
    /// Records past every shard's checkpoint (on Kinesis, which counts nothing, what one read
    /// of at most 1,000 records past each checkpoint finds: a lower bound).
    pub pending: u64,
    /// Whether `pending` is only a lower bound (Kinesis): "at least" that many.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pending_at_least: bool,
    /// How far the oldest checkpoint is behind the tip of the stream, where the stream says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub millis_behind_latest: Option<u64>,
    /// Shards held by each consumer with a live lease.
    pub leases: BTreeMap<String, u64>,
}

/// The sharded record stream (Kinesis, or the embedded log).
#[async_trait]
pub trait RecordStream: Send + Sync {
    /// Appends records; each goes to the shard its partition key hashes to. Records a call
    /// refuses are sent again (as the KPL does), and counted in the report.
    async fn put_records(&self, records: Vec<StreamInput>) -> Result<PutReport>;

    /// A consumer that holds leases on shards in the name of `worker_id`.
    async fn consumer(&self, worker_id: &str) -> Result<Box<dyn StreamConsumer>>;

    async fn stats(&self) -> Result<StreamStats>;
}

/// Reads the shards whose leases it holds, and checkpoints them.
#[async_trait]
pub trait StreamConsumer: Send {
    /// Renews held leases, takes free or expired ones, and returns up to `max` records from the
    /// shards it holds, in order within each shard. Returns an empty batch when there is nothing.
    async fn poll(&mut self, max: usize) -> Result<Vec<StreamRecord>>;

    /// Records that everything in `shard` up to and including `sequence` is durably handled,
    /// `records` of them newly (counted as arrivals in the same write, so each is counted once).
    /// Fails with `lease_lost` if another worker took the shard.
    async fn checkpoint(&mut self, shard: &str, sequence: &str, records: u64) -> Result<()>;

    /// Whether [`StreamConsumer::forward_and_checkpoint`] is there: the stream and the queues
    /// share a store that commits sends and checkpoints together (the embedded store; Kinesis
    /// checkpoints live in DynamoDB, the queues in SQS).
    fn forwards_with_checkpoint(&self) -> bool {
        false
    }

    /// Sends each named queue's messages and records each [`Checkpoint`] as one transaction, so
    /// that no crash between them leaves the messages sent and the records to be read, and sent,
    /// again. A shard held by another worker by now is not checkpointed (its records are read
    /// again by the new owner; the sinks are idempotent): the answer says, for each checkpoint,
    /// whether it was recorded. Only where [`StreamConsumer::forwards_with_checkpoint`].
    async fn forward_and_checkpoint(
        &mut self,
        _sends: Vec<(QueueName, Vec<OutgoingMessage>)>,
        _checkpoints: &[Checkpoint],
    ) -> Result<Vec<bool>> {
        Err(SluiceError::permanent(ReasonCode::Internal, "this stream cannot checkpoint with its sends"))
    }

    /// Goes back to the last checkpoint of `shard`, so the records after it are read again.
    async fn rewind(&mut self, shard: &str) -> Result<()>;

    /// Renews the leases held where they are due, reading nothing: called while a batch is
    /// worked on, so that a long one does not let its shards go to another worker.
    async fn renew_leases(&mut self) -> Result<()>;

    /// Gives up every lease so another worker can continue at once.
    async fn release(&mut self) -> Result<()>;

    /// The shards this consumer holds now.
    fn shards(&self) -> Vec<String>;

    /// How long to wait before polling again after a poll found nothing. Kinesis allows five
    /// GetRecords a second per shard, hence the default; a local log can be asked more often.
    fn idle_poll(&self) -> std::time::Duration {
        std::time::Duration::from_millis(200)
    }
}

/// Everything in `shard` up to and including `sequence` is durably handled, `records` of it
/// newly (arrivals, not replays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub shard: String,
    pub sequence: String,
    pub records: u64,
}

/// A message to send to a queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutgoingMessage {
    pub body: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    /// The record the message is about. A backend may drop the message when one with the same key
    /// is already in the queue (the embedded store does in its DLQs: one entry a record); SQS
    /// standard queues never do. Every sink is idempotent, so nothing relies on it elsewhere.
    pub dedup_key: Option<String>,
}

/// Identifies one receipt of a message; needed to acknowledge it or change its visibility.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receipt(pub String);

/// A message as received from a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The queue's id for the message: the same each time it is received (SQS's MessageId),
    /// where its receipt is new each time. Two copies of one body are two ids.
    pub id: String,
    pub body: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    pub receipt: Receipt,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
    pub sent_at_ms: u64,
    /// When it was first received (this time, on its first receive); `None` where the queue
    /// does not say.
    pub first_received_ms: Option<u64>,
}

/// How many messages a queue holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    pub visible: u64,
    pub in_flight: u64,
}

impl QueueDepth {
    pub fn total(&self) -> u64 {
        self.visible + self.in_flight
    }
}

/// A work queue with visibility timeouts, receive counts and a redrive policy.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    fn name(&self) -> QueueName;

    /// The most messages one receive, send or acknowledgement call carries, where the queue
    /// has such a limit (SQS: 10), so that a worker can fill its batches in whole calls.
    fn per_call(&self) -> Option<usize> {
        None
    }

    async fn send_batch(&self, messages: Vec<OutgoingMessage>) -> Result<()>;

    /// Receives up to `max` messages, waiting up to `wait` for the first (long poll). Each is
    /// invisible to other receivers for the queue's visibility timeout. A message past
    /// `max_receives` moves to the queue's DLQ instead of being returned.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>>;

    /// As [`WorkQueue::receive`], each message hidden for `hidden` rather than the queue's
    /// visibility timeout: an operator's pass over a queue holds what it looked at to its end,
    /// so that what it passed over does not come round again while it runs.
    async fn receive_hidden(&self, max: usize, wait: Duration, hidden: Duration) -> Result<Vec<ReceivedMessage>>;

    /// Deletes received messages. Call only once their downstream writes are durable.
    async fn ack(&self, receipts: &[Receipt]) -> Result<()>;

    /// Whether [`WorkQueue::forward_and_ack`] is there: the queues' store commits sends and
    /// acknowledgements together (the embedded store; SQS has no transactions).
    fn forwards_with_ack(&self) -> bool {
        false
    }

    /// Sends each named queue's messages and acknowledges `receipts` of this queue as one
    /// transaction: all of it happens or none, so no crash between a stage's sends and its
    /// acknowledgement leaves the messages sent and the received ones to be redone, and sent
    /// again. Only where [`WorkQueue::forwards_with_ack`]; the queues named are this one's
    /// siblings on the same store.
    async fn forward_and_ack(
        &self,
        _sends: Vec<(QueueName, Vec<OutgoingMessage>)>,
        _receipts: &[Receipt],
    ) -> Result<()> {
        Err(SluiceError::permanent(
            ReasonCode::Internal,
            format!("{}: sends and acknowledgements cannot be committed together here", self.name()),
        ))
    }

    /// Keeps received messages invisible for `by` from now (heartbeat for long work).
    async fn extend_visibility(&self, receipts: &[Receipt], by: Duration) -> Result<()>;

    /// Makes received messages visible again after `delay`, to be retried.
    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<()>;

    async fn depth(&self) -> Result<QueueDepth>;

    /// Reads up to `max` messages without receiving them (for operators inspecting a DLQ).
    async fn peek(&self, max: usize) -> Result<Vec<ReceivedMessage>>;
}

/// Feature vectors by record id.
#[async_trait]
pub trait FeatureStore: Send + Sync {
    /// Writes each vector unless its record already has one (the first write wins).
    async fn put_if_absent(&self, items: Vec<(RecordId, FeatureVector)>) -> Result<()>;

    /// The vectors that exist among `ids`; missing ones are simply absent from the map. A vector
    /// that is stored but cannot be read (written by a newer build) is there as its error.
    async fn get_batch(&self, ids: &[RecordId]) -> Result<HashMap<RecordId, StoredVector>>;

    /// Starts the retention of the vectors of `ids` (those that exist) again from now: a replay
    /// of inference's DLQ sends their records to be read again, once nothing holds them any
    /// more (their entries gone) and perhaps past their first retention.
    async fn refresh(&self, ids: &[RecordId]) -> Result<()>;
}

/// A stored vector as read back: the vector, or why it cannot be read.
pub type StoredVector = std::result::Result<FeatureVector, SluiceError>;

/// What a conditional result write found.
#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    Inserted,
    /// The record already had a result; it is returned as stored.
    AlreadyPresent(Box<PredictionResult>),
}

/// What settling a review found.
#[derive(Debug, Clone, PartialEq)]
pub enum ReviewOutcome {
    /// It was waiting for review and is settled now; the result as stored.
    Resolved(Box<PredictionResult>),
    /// It was not waiting for review (settled already, or accepted from the start): unchanged.
    NotWaiting(Box<PredictionResult>),
    /// No result for that record.
    Missing,
}

/// What feeding back a record's true label found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackOutcome {
    /// The label is recorded (it had none, or another one).
    Recorded,
    /// It had that label already: nothing changed.
    Unchanged,
    /// No result for that record.
    Missing,
}

/// Which results to list, in the order they were stored (store time, then record id).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultQuery {
    pub status: Option<ResultStatus>,
    /// The predicted class.
    pub class: Option<String>,
    /// Stored at or after, in milliseconds since the epoch.
    pub since_ms: Option<u64>,
    pub min_confidence: Option<f32>,
    pub max_confidence: Option<f32>,
    pub limit: usize,
    /// Where the previous page ended.
    pub page_token: Option<PageToken>,
    /// The most results a page reads past its start (none: [`EXAMINE_AT_MOST`]).
    pub examine_at_most: Option<usize>,
}

/// The most results one page of a listing reads: a filter few results pass (a class, a
/// confidence band) ends its page early, with fewer results or none and a page token to go on
/// from, rather than read the whole store for one answer.
pub const EXAMINE_AT_MOST: usize = 10_000;

impl ResultQuery {
    /// How many results a page may read.
    pub fn examined_at_most(&self) -> usize {
        self.examine_at_most.unwrap_or(EXAMINE_AT_MOST).max(1)
    }

    /// Whether `result` passes the filters that are not part of the store order.
    pub fn matches(&self, result: &PredictionResult) -> bool {
        // With no status asked for, every result: a rejection's marker is none.
        self.status.map_or(result.status != ResultStatus::Rejected, |s| s == result.status)
            && self.class.as_ref().is_none_or(|c| *c == result.label)
            && self.min_confidence.is_none_or(|min| result.confidence >= min)
            && self.max_confidence.is_none_or(|max| result.confidence <= max)
    }

    /// The position to list from: after the page token, at or after `since_ms` (at most the
    /// largest 13-digit time: positions are written with 13 digits).
    pub fn start(&self) -> PageToken {
        let since = PageToken { stored_ms: self.since_ms.unwrap_or(0).min(MAX_STORED_MS), record_id: None };
        match &self.page_token {
            Some(token) if *token > since => token.clone(),
            _ => since,
        }
    }
}

/// The latest store time a position can name (13 digits of milliseconds: the year 2286).
pub const MAX_STORED_MS: u64 = 9_999_999_999_999;

/// A position in store order: handed back as a page's `next_page_token`, written
/// `<store ms, 13 digits>.<record id>`; the DynamoDB index sorts by its [`PageToken::key`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageToken {
    pub stored_ms: u64,
    /// `None`: before every record stored in that millisecond.
    pub record_id: Option<RecordId>,
}

impl PageToken {
    pub fn after(stored_ms: u64, record_id: &RecordId) -> Self {
        Self { stored_ms, record_id: Some(record_id.clone()) }
    }

    /// A token as [`Display`](std::fmt::Display) writes it (`<13-digit ms>.<record id>`), or as
    /// [`Self::key`] does (`#` for the `.`: tokens before 2026-12-08, and the DynamoDB index's
    /// sort keys).
    pub fn parse(raw: &str) -> Result<Self> {
        let bad = || {
            let hint = if raw.len() <= 14 && raw.bytes().all(|b| b.is_ascii_digit()) {
                " (cut short? a `#` in a URL must be written %23)"
            } else {
                ""
            };
            crate::error::SluiceError::permanent(
                ReasonCode::SchemaMismatch,
                format!("{raw:?} is not a page token{hint}"),
            )
        };
        let (ms, id) = match (raw.get(..13), raw.get(13..14), raw.get(14..)) {
            (Some(ms), Some("." | "#"), Some(id)) => (ms, id),
            _ => return Err(bad()),
        };
        let stored_ms = ms.parse().map_err(|_| bad())?;
        let record_id = if id.is_empty() { None } else { Some(RecordId::parse(id).map_err(|_| bad())?) };
        Ok(Self { stored_ms, record_id })
    }

    /// The position as the DynamoDB results index sorts it (its `created_key`): `#` between the
    /// time and the id, as tables written before 2026-12-08 hold it.
    pub fn key(&self) -> String {
        self.joined_by('#')
    }

    /// The time (13 digits) and the id, `separator` between them.
    fn joined_by(&self, separator: char) -> String {
        format!("{:013}{separator}{}", self.stored_ms, self.record_id.as_ref().map_or("", |id| id.as_str()))
    }
}

/// What listings hand out: `.`, not the `#` of [`PageToken::key`], which a URL reads as its
/// fragment. The id is as it is: in a URL, a token is percent-encoded as any query value (most
/// ids, sluice's own and stream positions, need none).
impl std::fmt::Display for PageToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.joined_by('.'))
    }
}

/// One page of a [`ResultQuery`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultPage {
    pub results: Vec<PredictionResult>,
    /// Present when there may be more: pass it as the next query's `page_token`.
    pub next_page_token: Option<PageToken>,
}

/// Counts of results by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResultCounts {
    pub accepted: u64,
    pub review: u64,
    pub reviewed: u64,
    /// Markers of records a reviewer rejected (their end is a DLQ entry, not a result).
    pub rejected: u64,
}

/// The one result per record.
#[async_trait]
pub trait ResultStore: Send + Sync {
    /// Writes each result unless its record already has one; one outcome per input, in order.
    async fn put_if_absent(&self, results: Vec<PredictionResult>) -> Result<Vec<PutOutcome>>;

    async fn get_batch(&self, ids: &[RecordId]) -> Result<HashMap<RecordId, PredictionResult>>;

    async fn counts(&self) -> Result<ResultCounts>;

    /// Takes the result of `id` away if, and only if, it is waiting for review (a reviewer sent
    /// the record to the DLQ instead): `Resolved` with the result as it was.
    async fn withdraw_review(&self, id: &RecordId) -> Result<ReviewOutcome>;

    /// Results matching `query`, in store order, a page at a time. Reads only what the order
    /// and the status narrow it to (an index on each backend), never the whole store.
    async fn query(&self, query: &ResultQuery) -> Result<ResultPage>;

    /// Settles the result of `id` if, and only if, it is waiting for review (a conditional
    /// write, so two reviewers or a retried call settle it once), moving the status counts with it.
    async fn resolve_review(&self, id: &RecordId, resolution: &Resolution) -> Result<ReviewOutcome>;

    /// Records `label` as the true label of `id`'s result (its `ground_truth`), whatever its
    /// status; the rest of the result is left as it is. Feeding the same label again changes
    /// nothing.
    async fn set_ground_truth(&self, id: &RecordId, label: &str) -> Result<FeedbackOutcome>;

    /// Up to `limit` results after `after` in record id order, optionally of one status.
    async fn scan(
        &self,
        after: Option<&RecordId>,
        limit: usize,
        status: Option<ResultStatus>,
    ) -> Result<Vec<PredictionResult>>;
}

/// Large payloads, referenced from envelopes by claim-check.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `data` and returns the reference to put in an envelope.
    async fn put(&self, data: Vec<u8>) -> Result<String>;

    /// Loads a referenced blob. A reference this store may not read is a permanent
    /// `claim_check_rejected`; a missing blob is `claim_check_missing`.
    async fn get(&self, reference: &str) -> Result<Vec<u8>>;

    /// As [`BlobStore::get`], but a blob of more than `limit` bytes is a permanent
    /// `payload_too_large`, refused before its bytes are read where the store can tell (S3
    /// says an object's size first): a producer's claim-check to a huge object must not take
    /// the worker's memory.
    async fn get_at_most(&self, reference: &str, limit: usize) -> Result<Vec<u8>> {
        let data = self.get(reference).await?;
        match data.len() {
            len if len > limit => Err(blob_too_large(reference, len as u64, limit)),
            _ => Ok(data),
        }
    }
}

/// The error of a blob over the `limit` a reader takes.
pub fn blob_too_large(reference: &str, len: u64, limit: usize) -> SluiceError {
    SluiceError::permanent(
        ReasonCode::PayloadTooLarge,
        format!("the claim-checked payload {reference} is {len} bytes; at most {limit} are taken"),
    )
}

/// The prediction capture log: JSON lines the results stage appends, the monitor reads.
#[async_trait]
pub trait CaptureLog: Send + Sync {
    /// Writes one chunk of captured lines (whole lines, each ending in a newline), written at
    /// `at_ms`: one file append on the embedded store, one S3 object on AWS.
    async fn append(&self, lines: Vec<u8>, at_ms: u64) -> Result<()>;

    /// The names of the chunks (files, objects) that may hold lines captured between `since_ms`
    /// and `until_ms`, oldest first; the caller filters the lines by their own time.
    async fn chunks(&self, since_ms: u64, until_ms: u64) -> Result<Vec<String>>;

    /// One chunk [`Self::chunks`] named; `None` if it has gone since (expired, deleted). A reader
    /// of a long window takes them one at a time, holding no more than one.
    async fn chunk(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// Every chunk that may hold lines captured between `since_ms` and `until_ms`, oldest first.
    async fn read(&self, since_ms: u64, until_ms: u64) -> Result<Vec<Vec<u8>>> {
        let mut chunks = Vec::new();
        for name in self.chunks(since_ms, until_ms).await? {
            chunks.extend(self.chunk(&name).await?);
        }
        Ok(chunks)
    }

    /// A small named document kept beside the capture (the monitor's alert state, its
    /// reference statistics); `None` when there is none yet.
    async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// Replaces a named document whole.
    async fn put_meta(&self, name: &str, data: Vec<u8>) -> Result<()>;

    /// Where the log is, for people: a directory or an `s3://` prefix.
    fn location(&self) -> String;
}

/// Where worker processes add up the AWS requests they send, so that any process (`sluice
/// stats`) can report requests per record. Backends that send none keep nothing.
#[async_trait]
pub trait RequestLedger: Send + Sync {
    /// Adds requests by `"Service.Operation"`.
    async fn add(&self, delta: BTreeMap<String, u64>) -> Result<()>;

    async fn totals(&self) -> Result<BTreeMap<String, u64>>;
}

/// Everything a worker needs from its backend, opened once.
#[derive(Clone)]
pub struct Backend {
    pub stream: Arc<dyn RecordStream>,
    pub features: Arc<dyn FeatureStore>,
    pub results: Arc<dyn ResultStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub requests: Arc<dyn RequestLedger>,
    pub capture: Arc<dyn CaptureLog>,
    queues: Arc<BTreeMap<QueueName, Arc<dyn WorkQueue>>>,
    kind: BackendKind,
}

impl Backend {
    /// Opens the configured backend for pipeline work. The embedded store is created if it
    /// does not exist; AWS resources must exist already (`sluice aws bootstrap`).
    pub async fn open(config: &StoreConfig) -> Result<Self> {
        Self::open_with(config, aws::requests().clone(), false).await
    }

    /// Opens the backend for watching the pipeline (stats, drain checks) and for operators'
    /// commands: its AWS requests are not counted as the pipeline's, and on the embedded store
    /// its reads (counts over whole tables) run on a connection of their own, beside the
    /// stages' one. An embedded store must exist already: a path mistyped is an error, not a
    /// new, empty store that looks like a healthy, idle pipeline.
    pub async fn open_observer(config: &StoreConfig) -> Result<Self> {
        if config.backend == BackendKind::Embedded && !config.path.exists() {
            return Err(SluiceError::permanent(
                ReasonCode::StoreUnavailable,
                format!(
                    "there is no store at {}: the workers, `sluice run`, `sluice produce` or `sluice demo` make one there \
                     (is --store, store.path or SLUICE__STORE__PATH right?)",
                    config.path.display()
                ),
            ));
        }
        Self::open_with(config, aws::RequestCounter::default(), true).await
    }

    /// Opens the backend for a process that watches the pipeline for as long as it runs (the API,
    /// `top`, `monitor --watch`), as [`open_observer`](Self::open_observer) does; but one started
    /// before the workers waits for them to make their embedded store, saying so once, rather
    /// than stop.
    pub async fn open_watcher(config: &StoreConfig) -> Result<Self> {
        if config.backend == BackendKind::Embedded && !config.path.exists() {
            tracing::info!(
                store = %config.path.display(),
                "waiting for the store to be made (by the workers, `sluice run` or `sluice demo`)"
            );
            while !config.path.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        Self::open_observer(config).await
    }

    /// Opens the backend for a producer (`sluice produce`): as [`open_observer`](Self::open_observer)
    /// (its AWS requests are the producer's, not the pipeline's), but an embedded store is
    /// created where there is none, so records can be written before the workers start.
    pub async fn open_to_produce(config: &StoreConfig) -> Result<Self> {
        Self::open_with(config, aws::RequestCounter::default(), true).await
    }

    /// Opens the backend as another process would: on the embedded store, on a connection of
    /// its own rather than the one every other handle in the process shares. For tests of
    /// concurrency between processes.
    pub async fn open_separate(config: &StoreConfig) -> Result<Self> {
        Self::open_with(config, aws::requests().clone(), true).await
    }

    async fn open_with(config: &StoreConfig, counter: aws::RequestCounter, separate: bool) -> Result<Self> {
        match config.backend {
            BackendKind::Embedded if separate => {
                embedded::EmbeddedStore::open_separate(config).map(|store| store.into_backend())
            }
            BackendKind::Embedded => embedded::EmbeddedStore::open(config).map(|store| store.into_backend()),
            BackendKind::Aws => aws::open(config, counter).await,
        }
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    pub fn queue(&self, name: QueueName) -> Arc<dyn WorkQueue> {
        Arc::clone(&self.queues[&name])
    }

    /// This backend with `queue` in place of the queue of its name: a wrapper that injects
    /// faults, for tests.
    pub fn with_queue(mut self, queue: Arc<dyn WorkQueue>) -> Self {
        let mut queues = (*self.queues).clone();
        queues.insert(queue.name(), queue);
        self.queues = Arc::new(queues);
        self
    }
}
