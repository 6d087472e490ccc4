//! What operators do with dead letters and review items: list, show, count, replay, purge,
//! each under the same filters, on either backend.
//!
//! Replay and purge read a batch (which hides it from others for the visibility timeout), act on
//! what matches, and give the rest back. A replayed entry is deleted only after its copy is
//! durably sent, so stopping a replay at any point loses nothing; a copy sent twice is harmless,
//! because every sink is idempotent by record id. (SQS's StartMessageMoveTask cannot filter.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::{
    Backend, OutgoingMessage, PutOutcome, Receipt, ReceivedMessage, ReviewOutcome, StreamInput, WorkQueue,
};
use crate::config::BackendKind;
use crate::envelope::{Envelope, RecordId, now_ms};
use crate::error::{ReasonCode, Result, SluiceError};
use crate::model::ModelManifest;
use crate::record::{DlqEntry, InferredRecord, PredictionResult, Resolution, ResultStatus};
use crate::topology::{QueueName, StageName};

/// Most messages one read of a queue looks at (`list`, `show`, `stats`).
pub const PEEK_MAX: usize = 100_000;
/// Messages moved per round of replay or purge.
const BATCH: usize = 100;

/// A dead-letter queue: a stage's, or the review queue (results waiting for a person).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Letters {
    Stage(StageName),
    Review,
}

impl Letters {
    pub const ALL: [Letters; 5] = [
        Self::Stage(StageName::Ingest),
        Self::Stage(StageName::Features),
        Self::Stage(StageName::Inference),
        Self::Stage(StageName::Results),
        Self::Review,
    ];

    pub fn queue(self) -> QueueName {
        match self {
            Self::Stage(stage) => stage.dlq(),
            Self::Review => QueueName::Review,
        }
    }

    /// The stage whose failures (or, for review, whose results) these are.
    pub fn stage(self) -> StageName {
        match self {
            Self::Stage(stage) => stage,
            Self::Review => StageName::Results,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage(stage) => stage.as_str(),
            Self::Review => "review",
        }
    }
}

impl Serialize for Letters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Letters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Letters {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a stage (ingest, features, inference, results) nor review"))
    }
}

/// The model's verdict a review item carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub label: String,
    pub confidence: f32,
    pub probabilities: Vec<f32>,
}

/// One entry as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub queue: Letters,
    #[serde(flatten)]
    pub entry: DlqEntry,
    /// The record's own attributes (its envelope's, or the message's for a raw record).
    pub attributes: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// The stored result, for a review item.
    #[serde(skip)]
    pub result: Option<PredictionResult>,
    #[serde(skip)]
    message_attributes: BTreeMap<String, String>,
}

impl Item {
    pub fn from_message(queue: Letters, message: ReceivedMessage) -> Self {
        let ReceivedMessage { body, attributes, receive_count, sent_at_ms, .. } = message;
        let mut result = None;
        let (record_attributes, verdict) = match queue {
            Letters::Review => {
                result = serde_json::from_slice::<PredictionResult>(&body).ok();
                let verdict = result.as_ref().map(|r| Verdict {
                    label: r.label.clone(),
                    confidence: r.confidence,
                    probabilities: r.probabilities.clone(),
                });
                (result.as_ref().map(|r| r.attributes.clone()).unwrap_or_default(), verdict)
            }
            Letters::Stage(_) => {
                let attributes = match InferredRecord::from_json(&body) {
                    Ok(inferred) => inferred.envelope.attributes,
                    Err(_) => match Envelope::from_json(&body) {
                        Ok(envelope) => envelope.attributes,
                        Err(_) => record_message_attributes(&attributes),
                    },
                };
                (attributes, None)
            }
        };
        // A review item failed nothing: its receives are people's and tools' looks (each one a
        // receive on SQS), no attempts.
        let attempts = if queue == Letters::Review { 0 } else { receive_count };
        let entry = DlqEntry::from_message(queue.stage(), body, &attributes, attempts, sent_at_ms);
        Self { queue, entry, attributes: record_attributes, verdict, result, message_attributes: attributes }
    }

    /// Whether a replay can send this entry back to work. Not a queue's unreadable stored batch
    /// (no record at all), nor a message whose body could not be read back (what it holds is
    /// not what was sent), nor a record a reviewer rejected (its body is the review item, which
    /// no stage reads, and a person judged it unfit for a result), nor one whose reason this
    /// build does not know (a newer build's, which may be one of those): those can only be kept
    /// or purged (or replayed by the newer build).
    pub fn replayable(&self) -> bool {
        self.entry.stored_batch.is_none()
            && !self.message_attributes.contains_key(crate::record::dlq_attr::UNREADABLE)
            && !matches!(self.entry.reason, ReasonCode::RejectedInReview | ReasonCode::Unrecognised)
    }

    pub fn record_id(&self) -> Option<&RecordId> {
        self.entry.record_id.as_ref().or(self.result.as_ref().map(|r| &r.record_id))
    }

    /// The message to send to put this entry back to work: the body as it was, the message's
    /// own attributes (the trace context, `traceparent`, among them), none of the DLQ's; sent
    /// afresh, its receive count starts again.
    fn replay_message(&self) -> OutgoingMessage {
        OutgoingMessage {
            body: self.entry.body.clone(),
            attributes: record_message_attributes(&self.message_attributes),
            dedup_key: self.record_id().map(|id| id.to_string()),
        }
    }
}

/// A message's attributes less the ones a DLQ added (`sluice.*`, but for those the stages send
/// each other: an inference entry replayed keeps the input its vector was made for).
fn record_message_attributes(attributes: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let kept = |k: &str| !k.starts_with("sluice.") || k == crate::record::message_attr::INPUT_SPEC;
    attributes.iter().filter(|(k, _)| kept(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Which entries an operation applies to; an unset field matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<ReasonCode>,
    /// A glob over record ids (`digits-*-0007-*`).
    pub record_id: Option<glob::Pattern>,
    /// The predicted class (review items only).
    pub class: Option<String>,
    pub min_confidence: Option<f32>,
    pub max_confidence: Option<f32>,
    /// Last failure at or after / before, in milliseconds since the epoch.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Only entries whose body is a queue's unreadable stored batch (see [`Item::replayable`]).
    pub stored_batches: bool,
}

impl Filter {
    pub fn matches(&self, item: &Item) -> bool {
        let entry = &item.entry;
        let verdict = item.verdict.as_ref();
        self.reason.is_none_or(|r| r == entry.reason)
            && self.record_id.as_ref().is_none_or(|p| item.record_id().is_some_and(|id| p.matches(id.as_str())))
            && self.class.as_ref().is_none_or(|c| verdict.is_some_and(|v| v.label == *c))
            && self.min_confidence.is_none_or(|min| verdict.is_some_and(|v| v.confidence >= min))
            && self.max_confidence.is_none_or(|max| verdict.is_some_and(|v| v.confidence <= max))
            && self.since_ms.is_none_or(|t| entry.last_failure_ms >= t)
            && self.until_ms.is_none_or(|t| entry.last_failure_ms < t)
            && (!self.stored_batches || entry.stored_batch.is_some())
    }
}

/// Up to `limit` entries of `letters` that match `filter`, oldest first, left where they are.
pub async fn list(backend: &Backend, letters: Letters, filter: &Filter, limit: usize) -> Result<Vec<Item>> {
    let mut items = look_at(backend, letters, filter).await?.0;
    items.truncate(limit);
    Ok(items)
}

/// What one look at a queue saw, beside what the queue holds.
#[derive(Debug)]
pub struct Look {
    /// Its entries that match, oldest first: of all of them, or of what one look reads (see
    /// `partial`).
    pub items: Vec<Item>,
    /// Messages the queue holds by its own count (approximate on SQS; on the embedded store an
    /// unreadable batch counts every message of it, where `items` holds it once).
    pub depth: u64,
    /// The look saw part of the queue only: it holds more than one look reads ([`PEEK_MAX`]),
    /// or, on SQS, more visible messages than the look's receives were shown.
    pub partial: bool,
}

/// One look at `letters`: its entries that match `filter` (see [`Look`]), left where they are.
pub async fn look(backend: &Backend, letters: Letters, filter: &Filter) -> Result<Look> {
    let (items, read) = look_at(backend, letters, filter).await?;
    let depth = backend.queue(letters.queue()).depth().await?;
    // SQS's receives never show what is in flight (a reviewer holds it), so a look there is
    // measured against the messages visible.
    let partial =
        depth.total() > PEEK_MAX as u64 || (backend.kind() == BackendKind::Aws && (read as u64) < depth.visible);
    Ok(Look { items, depth: depth.total(), partial })
}

/// The entries one look at `letters` reads that match `filter`, oldest first, and how many
/// messages it read.
async fn look_at(backend: &Backend, letters: Letters, filter: &Filter) -> Result<(Vec<Item>, usize)> {
    let _holding = crate::shutdown::Holding::start();
    let messages = backend.queue(letters.queue()).peek(PEEK_MAX).await?;
    let read = messages.len();
    let mut items: Vec<Item> =
        messages.into_iter().map(|m| Item::from_message(letters, m)).filter(|i| filter.matches(i)).collect();
    items.sort_by_key(|i| i.entry.first_failure_ms);
    Ok((items, read))
}

/// The entry for `record_id`, in `letters` or, without it, in any DLQ or the review queue.
pub async fn show(backend: &Backend, letters: Option<Letters>, record_id: &str) -> Result<Option<Item>> {
    let filter = only(record_id);
    for letters in letters.map_or(Letters::ALL.to_vec(), |l| vec![l]) {
        if let Some(item) = list(backend, letters, &filter, 1).await?.into_iter().next() {
            return Ok(Some(item));
        }
    }
    Ok(None)
}

/// One queue's entries by reason, and how old its oldest is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStats {
    pub queue: Letters,
    pub entries: u64,
    /// Distinct records among the entries: fewer than `entries` when a copy was written twice
    /// (on SQS, a worker killed between writing an entry and acknowledging its input writes it
    /// again; a replay of both copies still gives one result).
    pub records: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// Age of the oldest entry's first failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_ms: Option<u64>,
    /// Messages the queue holds by its own count (see [`Look`]).
    pub depth: u64,
    /// The counts above are of what one look saw, part of the queue only (see [`Look`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// Counts of every DLQ and the review queue.
pub async fn stats(backend: &Backend) -> Result<Vec<QueueStats>> {
    let now = now_ms();
    let mut out = Vec::new();
    for letters in Letters::ALL {
        let Look { items, depth, partial } = look(backend, letters, &Filter::default()).await?;
        let mut by_reason = BTreeMap::new();
        for item in &items {
            *by_reason.entry(item.entry.reason.as_str().to_owned()).or_default() += 1;
        }
        // An entry without a record id counts as a record of its own.
        let ids: BTreeSet<&RecordId> = items.iter().filter_map(Item::record_id).collect();
        let records = ids.len() + items.iter().filter(|i| i.record_id().is_none()).count();
        out.push(QueueStats {
            queue: letters,
            entries: items.len() as u64,
            records: records as u64,
            by_reason,
            oldest_age_ms: items.iter().map(|i| i.entry.first_failure_ms).min().map(|t| now.saturating_sub(t)),
            depth,
            partial,
        })
    }
    Ok(out)
}

/// Where a replay sends entries, and how fast.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// The stage to send them to; default, the stage that failed them.
    pub to: Option<StageName>,
    pub limit: Option<usize>,
    /// At most this many entries a second.
    pub rate: Option<f64>,
    /// Only entries sent before this (milliseconds since the epoch); default, when the run
    /// begins. A purge asks first, and takes only what was there when it asked.
    pub sent_before_ms: Option<u64>,
    /// Stop once this many of the entries there when the run began have been looked at: a
    /// label's search for its item, which may give up (see [`label`]).
    pub look_at_most: Option<u64>,
}

/// What a replay or purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Moved {
    pub moved: u64,
    /// Entries that matched and were left where they are: review items still under their
    /// threshold; in a stage's DLQ, entries no replay can send (see [`Item::replayable`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub kept: u64,
    /// Review items whose result was settled before (a copy of a record written twice, or one
    /// settled elsewhere): nothing left to do, taken off the queue.
    #[serde(skip_serializing_if = "is_zero")]
    pub stale: u64,
}

/// What an action did with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Acted on (sent, deleted, settled): it leaves its queue.
    Done,
    /// A review item whose result was settled before: nothing to do, and it leaves its queue.
    Stale,
    /// Left where it is.
    Kept,
}

impl Fate {
    fn leaves(self) -> bool {
        self != Self::Kept
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What to do with each matching entry of a round: `true` to take it off its queue.
#[async_trait::async_trait]
pub trait Action: Send + Sync {
    async fn apply(&self, backend: &Backend, items: &[Item]) -> Result<Vec<Fate>>;
}

/// Where a replay of `failed`'s DLQ entries goes: to `failed` itself, or to `to` where that stage
/// reads what the entries hold. Each DLQ holds what its stage received: ingest's the stream's
/// records, features' envelopes with their payloads (which ingest takes too, and checks again),
/// inference's envelopes without them and results' inferred records (which only their own stage
/// reads).
pub fn replay_target(failed: StageName, to: Option<StageName>) -> std::result::Result<StageName, String> {
    match to {
        None => Ok(failed),
        Some(to) if to == failed || (failed == StageName::Features && to == StageName::Ingest) => Ok(to),
        Some(to) => Err(format!(
            "the {failed} DLQ's entries cannot go to {to}: it does not read what they hold (only the features \
             DLQ's envelopes can go elsewhere, to ingest)"
        )),
    }
}

/// Sends entries back to work: to a stage's input queue, or ingest's stream. An entry whose body
/// is a queue's unreadable stored batch, not a record, stays where it is (see
/// [`Item::replayable`]): sent back, it would only be dead-lettered again, or, sent to the
/// stream, read as a new record.
pub struct SendTo(pub StageName);

impl SendTo {
    /// Whether a replay would send `item` rather than keep it (for a dry run).
    pub fn sends(&self, item: &Item) -> bool {
        item.replayable() && (self.0.input_queue().is_some() || stream_record(item).fits())
    }
}

#[async_trait::async_trait]
impl Action for SendTo {
    async fn apply(&self, backend: &Backend, items: &[Item]) -> Result<Vec<Fate>> {
        let Some(queue) = self.0.input_queue() else { return replay_to_the_stream(backend, items).await };
        let sent: Vec<Fate> = items.iter().map(|item| if self.sends(item) { Fate::Done } else { Fate::Kept }).collect();
        if self.0 == StageName::Inference {
            // Inference reads their vectors: once their entries are gone nothing holds those
            // from the store's retention, and they may be past it already.
            let ids: Vec<RecordId> = items
                .iter()
                .zip(&sent)
                .filter(|(_, sent)| sent.leaves())
                .filter_map(|(item, _)| item.record_id().cloned())
                .collect();
            backend.features.refresh(&ids).await?;
        }
        let messages: Vec<OutgoingMessage> =
            items.iter().zip(&sent).filter(|(_, sent)| sent.leaves()).map(|(item, _)| item.replay_message()).collect();
        if !messages.is_empty() {
            backend.queue(queue).send_batch(messages).await?;
        }
        Ok(sent)
    }
}

/// Puts ingest's entries back on the stream. The partition key says "a replay of this record":
/// ingest gives it back its id and does not count it as a new arrival. A record too large for
/// a stream record with that key (its raw record filled one, under a shorter key) stays: the
/// stream would refuse the whole put, and every replay after would stop at it.
async fn replay_to_the_stream(backend: &Backend, items: &[Item]) -> Result<Vec<Fate>> {
    let mut fates = Vec::with_capacity(items.len());
    let mut records = Vec::new();
    for item in items {
        let record = stream_record(item);
        if !item.replayable() {
            fates.push(Fate::Kept);
        } else if !record.fits() {
            tracing::warn!(
                record_id = item.record_id().map(RecordId::as_str),
                bytes = record.data.len(),
                "too large for a stream record with its replay key (1 MiB): the entry stays, to purge"
            );
            fates.push(Fate::Kept);
        } else {
            fates.push(Fate::Done);
            records.push(record);
        }
    }
    if !records.is_empty() {
        backend.stream.put_records(records).await?;
    }
    Ok(fates)
}

/// `item` as a stream record, its partition key saying "a replay of this record".
fn stream_record(item: &Item) -> StreamInput {
    StreamInput {
        partition_key: item.record_id().map(RecordId::replay_partition_key).unwrap_or_else(|| {
            let original = item.message_attributes.get(crate::worker::PARTITION_KEY);
            original.cloned().unwrap_or_else(|| "replay".to_owned())
        }),
        data: item.entry.body.clone(),
    }
}

/// Deletes entries.
pub struct Delete;

#[async_trait::async_trait]
impl Action for Delete {
    async fn apply(&self, _backend: &Backend, items: &[Item]) -> Result<Vec<Fate>> {
        Ok(vec![Fate::Done; items.len()])
    }
}

/// How far SQS's clock (a message's `SentTimestamp`) may be ahead of this machine's.
const SENT_CLOCK_SKEW_MS: u64 = 5_000;

/// How long an operator's receive waits for a message: SQS may answer a short poll with nothing
/// while messages wait, so there a short long poll.
pub fn pass_wait(backend: &Backend) -> Duration {
    if backend.kind() == BackendKind::Aws { Duration::from_secs(1) } else { Duration::ZERO }
}

/// A pass holds what it looked at at least this long (see [`held_for`]).
const HELD_AT_LEAST: Duration = Duration::from_secs(300);

/// A pass's time per entry, as it plans how long to hold them: SQS reads, sends and deletes a
/// round of ten in tens of milliseconds.
const PASS_PER_ENTRY: Duration = Duration::from_millis(20);

/// How long a pass over `depth` entries at `rate` a second hides each entry it looks at: twice
/// the time the pass should take, at least [`HELD_AT_LEAST`], at most SQS's 12 hours. What it
/// passed over then does not come round again while it runs, and it gives all of it back at its
/// end (interrupted too); killed, what it held shows again after this.
fn held_for(depth: u64, rate: Option<f64>) -> Duration {
    let per_entry = rate.filter(|r| *r > 0.0).map_or(PASS_PER_ENTRY, |r| Duration::from_secs_f64(1.0 / r));
    let planned = per_entry.mul_f64(2.0 * depth as f64);
    planned.clamp(HELD_AT_LEAST, Duration::from_secs(43_200))
}

/// Reads `letters` in batches and applies `action` to the entries matching `filter` (up to
/// `limit`, at most `rate` a second), taking off the queue those it says; the rest go back.
/// Entries sent after it began are given back unjudged, and it ends once rounds bring none of
/// the entries that were there when it began: a queue that keeps filling (the review queue of a
/// running pipeline) does not keep it going. `progress` hears how many moved after each round.
pub async fn apply(
    backend: &Backend,
    letters: Letters,
    filter: &Filter,
    action: &dyn Action,
    options: &ReplayOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Moved> {
    let queue: Arc<dyn WorkQueue> = backend.queue(letters.queue());
    let limit = options.limit.unwrap_or(usize::MAX);
    let started = Instant::now();
    // Interrupted, a run stops between rounds and gives back what it holds, as at its end.
    let _holding = crate::shutdown::Holding::start();
    let mut done = Moved::default();
    let mut given_back = GivenBack { queue: queue.clone(), receipts: Vec::new() };
    // Entries already looked at, by message id: one that comes round again once its visibility
    // ends is given back unjudged, so nothing is acted on twice and the run ends when the queue
    // has nothing unseen left to show. Two copies of one entry (a record written twice) are two
    // messages, and each is judged.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let aws = backend.kind() == BackendKind::Aws;
    let wait = pass_wait(backend);
    let there = queue.depth().await?.visible;
    let hidden = held_for(there, options.rate);
    // Entries of its own looked at, and new ones (sent since it began) met since the last of those.
    let (mut looked_at, mut new_in_a_row) = (0_u64, 0_usize);
    // Entries written after the run began are not its own: a replayed copy that failed again
    // (a new message) would otherwise be replayed again and again while the workers run, and a
    // purge would take what arrived after its question. The run acts only once the clock has
    // passed the millisecond it began in, so that all it causes is stamped later. SQS stamps a
    // message with its own clock: a margin covers the skew, within which a copy that failed again
    // may be replayed again.
    let begun_ms = options.sent_before_ms.unwrap_or_else(now_ms);
    while now_ms() <= begun_ms {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let begun_ms = begun_ms + if aws { SENT_CLOCK_SKEW_MS } else { 0 };
    let result = async {
        let look_at_most = options.look_at_most.unwrap_or(u64::MAX);
        while (done.moved as usize) < limit && looked_at < look_at_most && !crate::shutdown::interrupted() {
            // A whole round even when fewer entries are wanted: what was looked at stays hidden
            // to the end either way, and a search for one entry (a label, a reject) then reads a
            // deep queue in rounds of BATCH rather than a message a round.
            let want = options.rate.map_or(BATCH, |r| BATCH.min(r.ceil().max(1.0) as usize));
            let batch = queue.receive_hidden(want, wait, hidden).await?;
            let mut matching = Vec::new();
            let (mut fresh_ones, mut new_ones) = (0, 0);
            for message in batch {
                let receipt = message.receipt.clone();
                let unseen = seen.insert(message.id.clone());
                let fresh = unseen && message.sent_at_ms <= begun_ms;
                fresh_ones += usize::from(fresh);
                new_ones += usize::from(unseen && !fresh);
                let item = Item::from_message(letters, message);
                if fresh && filter.matches(&item) {
                    matching.push((item, receipt));
                } else {
                    given_back.receipts.push(receipt);
                }
            }
            looked_at += fresh_ones as u64;
            new_in_a_row = if fresh_ones > 0 { 0 } else { new_in_a_row + new_ones };
            // Ends on a round that brings nothing unseen (empty, or only what it holds shown
            // again once its hold ended), and on one of only entries sent since it began once it
            // has looked at as many as were there, or met a good many new ones in a row: SQS hands
            // out messages in no strict order, and a queue that keeps filling would keep it going.
            let ended = fresh_ones == 0 && (new_ones == 0 || looked_at >= there || new_in_a_row >= NEW_IN_A_ROW_TO_END);
            if ended {
                break;
            }
            // In turns of as many as the limit still allows: an entry the action keeps does not
            // count, so the next turn judges the next ones, and none is passed over unjudged.
            let mut matching = matching.into_iter();
            while (done.moved as usize) < limit {
                let (take, receipts): (Vec<Item>, Vec<Receipt>) =
                    matching.by_ref().take(limit - done.moved as usize).unzip();
                if take.is_empty() {
                    break;
                }
                let turn = async {
                    let verdicts = action.apply(backend, &take).await?;
                    if verdicts.len() != take.len() {
                        let detail = format!("an action judged {} of {} entries", verdicts.len(), take.len());
                        return Err(SluiceError::permanent(ReasonCode::Internal, detail));
                    }
                    let gone: Vec<Receipt> =
                        receipts.iter().zip(&verdicts).filter(|(_, v)| v.leaves()).map(|(r, _)| r.clone()).collect();
                    // Only now that the copies are durable do the entries leave.
                    queue.ack(&gone).await?;
                    Ok(verdicts)
                };
                let verdicts = match turn.await {
                    Ok(verdicts) => verdicts,
                    Err(e) => {
                        // Nothing of this turn or the rest of the round stays hidden for the error.
                        given_back.receipts.extend(receipts);
                        given_back.receipts.extend(matching.map(|(_, r)| r));
                        return Err(e);
                    }
                };
                let count = |which: Fate| verdicts.iter().filter(|v| **v == which).count() as u64;
                done.moved += count(Fate::Done);
                done.stale += count(Fate::Stale);
                done.kept += count(Fate::Kept);
                given_back
                    .receipts
                    .extend(receipts.into_iter().zip(verdicts).filter(|(_, v)| !v.leaves()).map(|(r, _)| r));
                progress(done.moved);
            }
            // Past the limit: looked at, not judged.
            given_back.receipts.extend(matching.map(|(_, r)| r));
            if let Some(rate) = options.rate.filter(|r| *r > 0.0) {
                let due = Duration::from_secs_f64(done.moved as f64 / rate);
                tokio::select! {
                    () = tokio::time::sleep(due.saturating_sub(started.elapsed())) => {}
                    () = crate::shutdown::until_interrupted() => {}
                }
            }
        }
        Ok::<(), SluiceError>(())
    }
    .await;
    given_back.now().await;
    result.map(|()| done)
}

/// Entries sent since a pass began that it meets in a row, with none of its own, before it ends.
const NEW_IN_A_ROW_TO_END: usize = 2 * BATCH;

/// What a pass holds and gives back at its end, however it ends: dropped half way (an API
/// client gone during a label's search), the release goes on in a task of its own, rather than
/// leave the entries hidden for the pass's whole hold.
struct GivenBack {
    queue: Arc<dyn WorkQueue>,
    receipts: Vec<Receipt>,
}

impl GivenBack {
    /// Best effort: a receipt gone stale (its message came round again) cannot be released, and
    /// its message is visible again after its hold anyway.
    async fn now(mut self) {
        release(self.queue.clone(), std::mem::take(&mut self.receipts)).await;
    }
}

impl Drop for GivenBack {
    fn drop(&mut self) {
        if self.receipts.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release(self.queue.clone(), std::mem::take(&mut self.receipts)));
        }
    }
}

async fn release(queue: Arc<dyn WorkQueue>, receipts: Vec<Receipt>) {
    if !receipts.is_empty()
        && let Err(e) = queue.release(&receipts, Duration::ZERO).await
    {
        tracing::warn!(error = %e, "some entries looked at stay hidden until their hold ends");
    }
}

/// Replays review items under the bundle's current thresholds: one whose confidence now clears
/// its class threshold is accepted and leaves the review queue; the rest stay for a person.
pub struct Rejudge(pub ModelManifest);

impl Rejudge {
    /// Whether a review item's prediction clears its class's threshold in `manifest`. One made
    /// over other labels than the bundle's (another model's, the bundle at `[model] dir` not the
    /// one that served it) clears none: the bundle's thresholds say nothing of it.
    pub fn clears(manifest: &ModelManifest, item: &Item) -> bool {
        item.verdict.as_ref().is_some_and(|v| {
            v.probabilities.len() == manifest.labels.len()
                && manifest.labels.contains(&v.label)
                && v.confidence >= manifest.threshold(&v.label)
        })
    }

    /// What a replay would do with each of `items` (for a dry run), reading the results and
    /// changing nothing: as [`Action::apply`] would decide, an item whose result is settled
    /// already stale, and of those that clear, the first copy of a record whose result waits
    /// accepted and the others stale.
    pub async fn preview(&self, backend: &Backend, items: &[Item]) -> Result<Vec<Fate>> {
        let results = Self::results_of(backend, items).await?;
        let mut accepted = BTreeSet::new();
        Ok(items
            .iter()
            .map(|item| match item.record_id().map(|id| (id, results.get(id))) {
                Some((_, Some(r))) if r.status != ResultStatus::Review => Fate::Stale,
                Some((id, Some(_))) if Self::clears(&self.0, item) => {
                    if accepted.insert(id.clone()) {
                        Fate::Done
                    } else {
                        Fate::Stale
                    }
                }
                // Waiting and not clearing; or no result (a rejection stopped halfway, below).
                _ => Fate::Kept,
            })
            .collect())
    }

    async fn results_of(backend: &Backend, items: &[Item]) -> Result<HashMap<RecordId, PredictionResult>> {
        let ids: BTreeSet<RecordId> = items.iter().filter_map(|i| i.record_id().cloned()).collect();
        backend.results.get_batch(&ids.into_iter().collect::<Vec<_>>()).await
    }
}

#[async_trait::async_trait]
impl Action for Rejudge {
    async fn apply(&self, backend: &Backend, items: &[Item]) -> Result<Vec<Fate>> {
        // An item whose result was settled before (labelled by id while a copy waited, or
        // accepted) has nothing left to wait for, whether or not it clears.
        let results = Self::results_of(backend, items).await?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(match item.record_id() {
                Some(id) if results.get(id).is_some_and(|r| r.status != ResultStatus::Review) => Fate::Stale,
                Some(id) if Self::clears(&self.0, item) => {
                    match backend.results.resolve_review(id, &Resolution::Accept).await? {
                        ReviewOutcome::Resolved(_) => Fate::Done,
                        // Settled since it was read (or by a copy before it in this batch).
                        ReviewOutcome::NotWaiting(_) => Fate::Stale,
                        // A rejection stopped halfway (the result withdrawn, its DLQ entry perhaps
                        // not yet written): the item stays, for `reject` to finish, so that the
                        // record is not left with neither.
                        ReviewOutcome::Missing => Fate::Kept,
                    }
                }
                _ => Fate::Kept,
            });
        }
        Ok(out)
    }
}

/// A person's label for `id`: settles its result (a conditional write: the first label wins)
/// and takes its item off the review queue. What the result store answered is the answer.
///
/// Only a label that settled the result searches the queue for its item, and looks at no more
/// than [`LABEL_SEARCH`] items: each search reads the queue from its front, showing every item
/// before the one wanted to this process and counting a receive of each, so a deep queue (or a
/// second click on a label given already) would make every label a walk of it all. An item left
/// behind waits for nothing: its result is settled, the next review replay or walk takes it off
/// unseen, and `GET /review` lists results, not items.
pub async fn label(backend: &Backend, id: &RecordId, label: &str) -> Result<ReviewOutcome> {
    let outcome = backend.results.resolve_review(id, &Resolution::Label(label.to_owned())).await?;
    let search = ReplayOptions { look_at_most: Some(LABEL_SEARCH), ..one() };
    if matches!(outcome, ReviewOutcome::Resolved(_))
        && let Err(error) = apply(backend, Letters::Review, &only(id.as_str()), &Delete, &search, &|_| {}).await
    {
        tracing::warn!(record_id = %id, %error, "labelled; its review item stays in the queue for now");
    }
    Ok(outcome)
}

/// The most review items a label's search looks at for its item (see [`label`]): fifty rounds,
/// a few seconds on SQS, well inside the API's time for a request.
pub const LABEL_SEARCH: u64 = 500;

/// The filter for one record's entries.
fn only(id: &str) -> Filter {
    Filter { record_id: glob::Pattern::new(&glob::Pattern::escape(id)).ok(), ..Filter::default() }
}

fn one() -> ReplayOptions {
    ReplayOptions { limit: Some(1), ..ReplayOptions::default() }
}

/// A reviewer's "not fit for a result": the record's result is taken away (if it still waits
/// for review) and it goes to the results DLQ (reason `rejected_in_review`, the review item's
/// body as it was), so it ends in exactly one DLQ entry; a `rejected` marker takes the result's
/// place (see [`send_rejected`]). Stopped between the steps, the item is still in review with no
/// result, and a second `reject` finishes the job.
pub struct Reject;

#[async_trait::async_trait]
impl Action for Reject {
    async fn apply(&self, backend: &Backend, items: &[Item]) -> Result<Vec<Fate>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Some(id) = item.record_id() else {
                out.push(Fate::Kept);
                continue;
            };
            out.push(match backend.results.withdraw_review(id).await? {
                // Settled by someone else in the meantime (or rejected: a copy of this item):
                // nothing to reject, nothing to wait for.
                ReviewOutcome::NotWaiting(_) => Fate::Stale,
                outcome @ (ReviewOutcome::Resolved(_) | ReviewOutcome::Missing) => {
                    // The result as it was, or (withdrawn by a rejection stopped halfway) as the
                    // item carries it.
                    let result = match outcome {
                        ReviewOutcome::Resolved(result) => Some(*result),
                        _ => serde_json::from_slice(&item.entry.body).ok(),
                    };
                    send_rejected(backend, id, item.entry.body.clone(), item.entry.attempts, result).await?;
                    Fate::Done
                }
            });
        }
        Ok(out)
    }
}

/// Sends `id`, its result withdrawn, to the results DLQ, then leaves `result` marked
/// [`ResultStatus::Rejected`] in the result store: a copy of the record reaching the results stage
/// later (at-least-once delivery, a replay) finds the marker and is given no result, and a copy
/// of its review item met later is stale, not rejected twice. Stopped before the marker, the
/// item is still in the queue with no result, and rejecting it again sends it again (one entry
/// on the embedded store, which keeps one a record; two on SQS).
async fn send_rejected(
    backend: &Backend,
    id: &RecordId,
    body: Vec<u8>,
    attempts: u32,
    result: Option<PredictionResult>,
) -> Result<()> {
    let error =
        SluiceError::permanent(ReasonCode::RejectedInReview, "a reviewer sent it to the DLQ instead of labelling it");
    let entry = DlqEntry::new(StageName::Results, &error, attempts, Some(id.clone()), Vec::new());
    let message = OutgoingMessage { body, attributes: entry.attributes(), dedup_key: Some(id.to_string()) };
    backend.queue(StageName::Results.dlq()).send_batch(vec![message]).await?;
    let Some(result) = result.filter(|r| r.record_id == *id) else {
        tracing::warn!(record_id = %id, "rejected with no result to leave a marker of: a later copy of it may be given one");
        return Ok(());
    };
    match backend.results.put_if_absent(vec![result.rejected()]).await?.pop() {
        Some(PutOutcome::AlreadyPresent(now)) if now.status != ResultStatus::Rejected => tracing::warn!(
            record_id = %id,
            status = now.status.as_str(),
            "a copy of the record was given a result while it was being rejected: it has that result and a DLQ entry"
        ),
        _ => {}
    }
    Ok(())
}

/// What rejecting one record came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejected {
    /// It is in the results DLQ now, its result gone.
    Rejected,
    /// Its result does not wait for review (settled already): left as it is.
    NotWaiting(Box<PredictionResult>),
    /// Neither a result waiting for review nor an item in the review queue.
    Missing,
    /// Its item is not in the review queue now, and this many items are held (by a reviewer's
    /// walk, a look): nothing changed. Its item may be among them, and rejected here, its holder
    /// would be left an item with no result, and a second DLQ entry if they rejected it too.
    Held(u64),
}

/// Deletes the review items left for `id` once it is rejected, or found settled: copies of its
/// item (a record written twice has one a copy), which with its result withdrawn nothing could
/// tell from a rejection stopped halfway. Reads the whole review queue.
pub async fn take_off_copies(backend: &Backend, id: &RecordId) -> Result<u64> {
    Ok(apply(backend, Letters::Review, &only(id.as_str()), &Delete, &ReplayOptions::default(), &|_| {}).await?.moved)
}

/// Rejects `id` in review (see [`Reject`]), whether or not its item is in the queue now.
pub async fn reject(backend: &Backend, id: &RecordId) -> Result<Rejected> {
    let before = backend.results.get_batch(std::slice::from_ref(id)).await?.remove(id);
    if let Some(result) = before.filter(|r| r.status != ResultStatus::Review) {
        // Settled already: an item of it left behind has nothing to wait for (as `label` does).
        take_off_copies(backend, id).await?;
        return Ok(Rejected::NotWaiting(Box::new(result)));
    }
    // Asked before the search, which holds the queue while it reads (and SQS's count lags).
    let held = backend.queue(Letters::Review.queue()).depth().await?.in_flight;
    let searched = apply(backend, Letters::Review, &only(id.as_str()), &Reject, &one(), &|_| {}).await?;
    if searched.moved == 1 {
        take_off_copies(backend, id).await?;
        return Ok(Rejected::Rejected);
    }
    if crate::shutdown::interrupted() {
        // The search stopped short: its item may well be in the queue still, and what follows is
        // only for an item another reviewer holds.
        return Err(SluiceError::permanent(
            ReasonCode::Internal,
            "interrupted while looking for its review item: nothing changed",
        ));
    }
    // Found settled meanwhile (stale), it is no longer waiting: the withdrawal below says so.
    if held > 0 && searched.stale == 0 {
        return Ok(Rejected::Held(held));
    }
    // Not in the queue at all (purged, say): the result's own body goes to the DLQ.
    match backend.results.withdraw_review(id).await? {
        ReviewOutcome::Resolved(result) => {
            let body = serde_json::to_vec(&result).expect("a result serialises");
            send_rejected(backend, id, body, 0, Some(*result)).await?;
            Ok(Rejected::Rejected)
        }
        ReviewOutcome::NotWaiting(result) => Ok(Rejected::NotWaiting(result)),
        ReviewOutcome::Missing => Ok(Rejected::Missing),
    }
}
