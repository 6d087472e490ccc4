//! Embedded work queues: visibility times, receive counts, and a redrive to the queue's DLQ after
//! `max_receives`.
//!
//! A send writes its messages once, packed together in one row of `queue_batches`; what is left
//! of a batch to deliver is kept in `queue_runs`: messages next to each other in one batch that
//! share a visibility time and a receive count. Receives, acknowledgements and delays touch a row
//! per run, not a row per message; one that takes part of a run splits it. (A row per message,
//! written by its send, its receive and its acknowledgement, each in three B-trees, cost ~21 µs of
//! the store's one connection a message and a queue: docs/benchmarks.md, 2026-12-05.)
//!
//! A message is named by its batch and its place there; a receipt adds the receive count, so a
//! receipt goes stale when its message is received again. Batch ids are never reused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message as _;
use rusqlite::{OptionalExtension, params};

use super::Db;
use crate::backend::{OutgoingMessage, QueueDepth, Receipt, ReceivedMessage, WorkQueue};
use crate::config::StoreConfig;
use crate::envelope::now_ms;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::record::DlqEntry;
use crate::topology::{QueueName, StageName};

/// How often a long poll looks again while the queue is empty.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(25);

pub struct EmbeddedQueue {
    db: Db,
    name: QueueName,
    visibility_ms: u64,
    max_receives: u32,
}

/// One message as a batch row holds it. Protocol Buffers through `prost` (in the tree already,
/// through OpenTelemetry's protocol): bodies are bytes, and a batch is read back whole.
#[derive(Clone, PartialEq, prost::Message)]
struct PackedMessage {
    #[prost(bytes = "vec", tag = "1")]
    body: Vec<u8>,
    #[prost(btree_map = "string, string", tag = "2")]
    attributes: BTreeMap<String, String>,
    /// Kept for a redrive, whose DLQ entry names the record.
    #[prost(string, optional, tag = "3")]
    dedup_key: Option<String>,
}

/// The messages of one send to one queue, in the order sent.
#[derive(Clone, PartialEq, prost::Message)]
struct PackedBatch {
    #[prost(message, repeated, tag = "1")]
    messages: Vec<PackedMessage>,
}

/// A run's row in `queue_runs`.
#[derive(Debug, Clone)]
struct Run {
    batch: i64,
    first: i64,
    count: i64,
    queue: String,
    receive_count: u32,
    visible_at_ms: i64,
    sent_at_ms: i64,
    first_received_ms: Option<i64>,
    dedup_key: Option<String>,
}

const RUN_COLUMNS: &str =
    "batch, first, count, queue, receive_count, visible_at_ms, sent_at_ms, first_received_ms, dedup_key";

impl Run {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            batch: r.get(0)?,
            first: r.get(1)?,
            count: r.get(2)?,
            queue: r.get(3)?,
            receive_count: r.get(4)?,
            visible_at_ms: r.get(5)?,
            sent_at_ms: r.get(6)?,
            first_received_ms: r.get(7)?,
            dedup_key: r.get(8)?,
        })
    }

    fn insert(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        tx.prepare_cached(&format!(
            "INSERT INTO queue_runs ({RUN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ))?
        .execute(params![
            self.batch,
            self.first,
            self.count,
            self.queue,
            self.receive_count,
            self.visible_at_ms,
            self.sent_at_ms,
            self.first_received_ms,
            self.dedup_key
        ])?;
        Ok(())
    }

    fn delete(&self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        tx.prepare_cached("DELETE FROM queue_runs WHERE batch = ?1 AND first = ?2")?
            .execute([self.batch, self.first])?;
        Ok(())
    }

    /// This run's part `[first, first + count)` with its own visibility, receive count and start.
    fn part(&self, first: i64, count: i64) -> Self {
        Self { first, count, ..self.clone() }
    }
}

/// Messages handed out by a receive (or shown by a peek): a run's place in its batch and the
/// batch's bytes, unpacked off the connection.
struct Taken {
    batch: i64,
    first: i64,
    count: i64,
    receive_count: u32,
    sent_at_ms: i64,
    first_received_ms: Option<i64>,
    data: Arc<Vec<u8>>,
}

/// A batch's stored bytes; none (and so unreadable) where its row is missing.
fn batch_data(tx: &rusqlite::Connection, batch: i64) -> rusqlite::Result<Vec<u8>> {
    let data = tx.prepare_cached("SELECT data FROM queue_batches WHERE id = ?1")?.query_row([batch], |r| r.get(0));
    Ok(data.optional()?.unwrap_or_default())
}

/// The messages at places `[first, first + count)` of a batch's stored bytes, or why they cannot
/// be read: the bytes do not decode, or hold fewer messages than that.
fn messages_at(data: &[u8], first: i64, count: i64) -> std::result::Result<Vec<PackedMessage>, String> {
    let mut messages = PackedBatch::decode(data).map_err(|e| e.to_string())?.messages;
    places(&mut messages, first, count)?;
    Ok(messages.drain(first as usize..(first + count) as usize).collect())
}

/// Every run left of `batch`, in any queue.
fn runs_of(tx: &rusqlite::Transaction<'_>, batch: i64) -> rusqlite::Result<Vec<Run>> {
    tx.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM queue_runs WHERE batch = ?1"))?
        .query_map([batch], Run::from_row)?
        .collect()
}

/// Places `[first, first + count)` of a batch's messages, or why it has no such places.
fn places(messages: &mut [PackedMessage], first: i64, count: i64) -> std::result::Result<&mut [PackedMessage], String> {
    let held = messages.len();
    let end = (first + count) as usize;
    messages.get_mut(first as usize..end).ok_or_else(|| format!("it holds {held} messages, fewer than its queue names"))
}

/// The batches one call has read, each read once however many of its runs the call takes.
#[derive(Default)]
struct Batches(HashMap<i64, Arc<Vec<u8>>>);

impl Batches {
    fn get(&mut self, conn: &rusqlite::Connection, batch: i64) -> rusqlite::Result<Arc<Vec<u8>>> {
        if let Some(data) = self.0.get(&batch) {
            return Ok(Arc::clone(data));
        }
        let data = Arc::new(batch_data(conn, batch)?);
        self.0.insert(batch, Arc::clone(&data));
        Ok(data)
    }
}

/// Unpacks what was taken from `queue` into messages, each named by `receipt(batch, place,
/// receive count)`. A batch that cannot be read: in a work queue its messages are passed over,
/// logged: they stay taken until their visibility runs out, and the receive that finds them
/// received too often moves their whole batch to the DLQ (see [`redrive`]), so that they hold up
/// no other message. A DLQ or the review queue redrives nowhere: there the batch is handed out
/// as one entry (see [`unreadable_entry`]) for an operator to look at and purge.
fn unpack(taken: Vec<Taken>, queue: QueueName, receipt: impl Fn(i64, i64, u32) -> Receipt) -> Vec<ReceivedMessage> {
    let mut out = Vec::with_capacity(taken.iter().map(|t| t.count as usize).sum());
    // Each batch decoded once, however many of its runs were taken.
    let mut decoded: HashMap<i64, std::result::Result<Vec<PackedMessage>, String>> = HashMap::new();
    let mut unreadable: BTreeMap<i64, (String, Vec<Taken>)> = BTreeMap::new();
    for t in taken {
        let batch = decoded.entry(t.batch).or_insert_with(|| {
            PackedBatch::decode(t.data.as_slice()).map(|batch| batch.messages).map_err(|e| e.to_string())
        });
        let run = match batch {
            Ok(messages) => places(messages, t.first, t.count),
            Err(why) => Err(why.clone()),
        };
        let run = match run {
            Ok(run) => run,
            Err(why) if queue.redrive_target().is_none() => {
                unreadable.entry(t.batch).or_insert_with(|| (why, Vec::new())).1.push(t);
                continue;
            }
            Err(why) => {
                tracing::error!(batch = t.batch, %why, "a queue batch is unreadable: its messages are passed over until their redrive");
                continue;
            }
        };
        // Runs of one batch never overlap: each message is taken out once.
        out.extend(run.iter_mut().zip(t.first..).map(|(m, place)| ReceivedMessage {
            id: format!("{}:{place}", t.batch),
            body: std::mem::take(&mut m.body),
            attributes: std::mem::take(&mut m.attributes),
            receipt: receipt(t.batch, place, t.receive_count),
            receive_count: t.receive_count,
            sent_at_ms: t.sent_at_ms as u64,
            first_received_ms: t.first_received_ms.map(|ms| ms as u64),
        }));
    }
    for (batch, (why, runs)) in unreadable {
        tracing::error!(batch, %why, %queue, "a queue batch is unreadable: handed out as one malformed_message entry");
        out.push(unreadable_entry(queue, batch, &why, &runs, receipt(batch, WHOLE_BATCH, 0)));
    }
    out
}

/// The place a receipt names to mean every message of its batch, whatever its receive count:
/// an unreadable batch's one entry (see [`unreadable_entry`]).
const WHOLE_BATCH: i64 = -1;

/// The one entry an unreadable batch of a DLQ or the review queue is handed out as: reason
/// `malformed_message`, its body the batch's bytes as stored, its receipt naming the whole batch
/// (an acknowledgement deletes every message of it, a release or a longer visibility applies to
/// them all). Its attributes name the batch alone, not the part of it one receive took, and stay
/// the same from one receive to the next (no attempts, failure times those of the send), so that
/// a purge or replay reading the queue in rounds knows it when another part comes round.
fn unreadable_entry(queue: QueueName, batch: i64, why: &str, runs: &[Taken], receipt: Receipt) -> ReceivedMessage {
    let sent_at_ms = runs.iter().map(|t| t.sent_at_ms).min().unwrap_or_default();
    let detail = format!(
        "queue batch {batch} of {queue} is unreadable ({why}); this one entry stands for every message of it \
         in the queue, and its body is the batch's stored bytes"
    );
    let stage = queue.dlq_stage().unwrap_or(StageName::Results);
    let mut entry =
        DlqEntry::new(stage, &SluiceError::permanent(ReasonCode::MalformedMessage, detail), 0, None, Vec::new());
    (entry.first_failure_ms, entry.last_failure_ms) = (sent_at_ms as u64, sent_at_ms as u64);
    entry.stored_batch = Some(batch);
    let mut attributes = entry.attributes();
    attributes.remove(crate::record::dlq_attr::ATTEMPTS);
    ReceivedMessage {
        id: format!("{batch}:whole"),
        body: runs[0].data.to_vec(),
        attributes,
        receipt,
        receive_count: runs.iter().map(|t| t.receive_count).max().unwrap_or_default(),
        sent_at_ms: sent_at_ms as u64,
        first_received_ms: None,
    }
}

impl EmbeddedQueue {
    pub(super) fn new(db: Db, name: QueueName, config: &StoreConfig) -> Self {
        Self { db, name, visibility_ms: config.visibility_timeout_ms, max_receives: config.max_receives.max(1) }
    }

    /// A read-only look, so idle receivers poll without taking the write lock.
    async fn has_visible(&self) -> Result<bool> {
        let queue = self.name;
        self.db
            .call(move |conn| {
                conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM queue_runs WHERE queue = ?1 AND visible_at_ms <= ?2)",
                )?
                .query_row(params![queue.as_str(), now_ms() as i64], |r| r.get(0))
            })
            .await
    }

    async fn try_receive(&self, max: usize, visibility_ms: u64) -> Result<Vec<ReceivedMessage>> {
        if !self.has_visible().await? {
            return Ok(Vec::new());
        }
        let queue = self.name;
        let visibility_ms = i64::try_from(visibility_ms).unwrap_or(i64::MAX);
        let max_receives = self.max_receives;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let taken = self
            .db
            .write(move |tx| {
                let now = now_ms() as i64;
                let mut out: Vec<Taken> = Vec::new();
                let mut taken = 0;
                let mut batches = Batches::default();
                let mut gone = HashSet::new();
                // Redriven runs leave the batch short; look again until full or empty.
                loop {
                    // With no visibility timeout the runs just taken are visible again: passed over.
                    let runs: Vec<Run> = tx
                        .prepare_cached(&format!(
                            "SELECT {RUN_COLUMNS} FROM queue_runs WHERE queue = ?1 AND visible_at_ms <= ?2 \
                             ORDER BY visible_at_ms, batch, first LIMIT ?3"
                        ))?
                        .query_map(params![queue.as_str(), now, max - taken + out.len() as i64], Run::from_row)?
                        .filter(|run| {
                            run.as_ref()
                                .map_or(true, |run| !out.iter().any(|t| (t.batch, t.first) == (run.batch, run.first)))
                        })
                        .collect::<rusqlite::Result<_>>()?;
                    if runs.is_empty() {
                        break;
                    }
                    let mut redriven = false;
                    for run in runs {
                        if taken >= max {
                            break;
                        }
                        if gone.contains(&run.batch) {
                            continue;
                        }
                        if let Some(dlq) = queue.redrive_target().filter(|_| run.receive_count >= max_receives) {
                            if redrive(tx, queue, dlq, &run, now)? {
                                // Unreadable: every run of its batch went with it.
                                gone.insert(run.batch);
                            }
                            redriven = true;
                            continue;
                        }
                        let count = run.count.min(max - taken);
                        if count < run.count {
                            // The rest stays as it was, a run of its own.
                            run.part(run.first + count, run.count - count).insert(tx)?;
                        }
                        let receive_count = run.receive_count + 1;
                        tx.prepare_cached(
                            "UPDATE queue_runs SET count = ?1, receive_count = ?2, visible_at_ms = ?3, \
                             first_received_ms = COALESCE(first_received_ms, ?4) WHERE batch = ?5 AND first = ?6",
                        )?
                        .execute(params![
                            count,
                            receive_count,
                            now + visibility_ms,
                            now,
                            run.batch,
                            run.first
                        ])?;
                        out.push(Taken {
                            batch: run.batch,
                            first: run.first,
                            count,
                            receive_count,
                            sent_at_ms: run.sent_at_ms,
                            first_received_ms: Some(run.first_received_ms.unwrap_or(now)),
                            data: batches.get(tx, run.batch)?,
                        });
                        taken += count;
                    }
                    // Without a redrive a short batch is all the queue had: another look would find
                    // nothing (or, with no visibility timeout, the messages just taken, twice).
                    if taken >= max || !redriven {
                        break;
                    }
                }
                Ok(out)
            })
            .await?;
        // Unpacked off the connection, which every stage waits for.
        Ok(unpack(taken, queue, receipt))
    }

    /// Makes the messages that `receipts` name visible `from_now` from now.
    async fn set_visible_at(&self, receipts: &[Receipt], from_now: Duration) -> Result<()> {
        let named = parse_receipts(receipts);
        self.db
            .write(move |tx| {
                settle(tx, named, Settle::VisibleAt(now_ms() as i64 + from_now.as_millis() as i64)).map(drop)
            })
            .await
    }
}

/// Moves a run whose messages were received too often to `dlq`, bodies untouched, reason
/// attached. Where its batch cannot be read, the batch goes whole, every run of it: what is
/// stored cannot be told apart into messages, so it becomes one entry whose body is the batch's
/// bytes as stored, for an operator to look at, rather than stay in the queue. Returns whether
/// the whole batch went.
fn redrive(
    tx: &rusqlite::Transaction<'_>,
    from: QueueName,
    dlq: QueueName,
    run: &Run,
    now: i64,
) -> rusqlite::Result<bool> {
    let stage = dlq.dlq_stage().expect("a redrive target is a stage DLQ");
    let entry = |code, detail, stored_batch| {
        let mut entry =
            DlqEntry::new(stage, &SluiceError::permanent(code, detail), run.receive_count, None, Vec::new());
        entry.first_failure_ms = run.first_received_ms.unwrap_or(run.sent_at_ms) as u64;
        entry.stored_batch = stored_batch;
        entry.attributes()
    };
    let data = batch_data(tx, run.batch)?;
    let (redriven, gone, whole) = match messages_at(&data, run.first, run.count) {
        Ok(messages) => {
            let attributes = entry(
                ReasonCode::MaxReceivesExceeded,
                format!("received {} times from {from} without being acknowledged", run.receive_count),
                None,
            );
            let messages = messages.into_iter().map(|mut message| {
                message.attributes.extend(attributes.clone());
                if let Some(key) = &message.dedup_key {
                    message.attributes.insert(crate::record::dlq_attr::RECORD_ID.to_owned(), key.clone());
                }
                message
            });
            (messages.collect(), vec![run.clone()], false)
        }
        Err(why) => {
            let runs = runs_of(tx, run.batch)?;
            let left: i64 = runs.iter().map(|r| r.count).sum();
            let detail = format!(
                "queue batch {} of {from} is unreadable ({why}); the {left} messages of it still queued end here \
                 as this one entry, whose body is the batch's stored bytes",
                run.batch
            );
            let message = PackedMessage {
                body: data,
                attributes: entry(ReasonCode::MalformedMessage, detail, Some(run.batch)),
                dedup_key: run.dedup_key.clone(),
            };
            (vec![message], runs, true)
        }
    };
    Outgoing::packed(dlq, redriven).insert(tx, now)?;
    for run in &gone {
        run.delete(tx)?;
    }
    drop_batch_if_done(tx, run.batch)?;
    Ok(whole)
}

/// Deletes a batch none of whose messages is left in a queue.
fn drop_batch_if_done(tx: &rusqlite::Transaction<'_>, batch: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "DELETE FROM queue_batches WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM queue_runs WHERE batch = ?1)",
    )?
    .execute([batch])?;
    Ok(())
}

/// Messages on their way into one queue, packed already: off the connection, which every stage
/// waits for. Into a DLQ, a message with a deduplication key goes in a batch of its own, so that
/// the queue can refuse a second entry for the record; elsewhere keys are not looked at (as on
/// SQS standard queues: every sink is idempotent), and a send is one batch.
pub(super) struct Outgoing {
    queue: QueueName,
    /// The packed batch and how many messages it holds.
    batch: Option<(Vec<u8>, i64)>,
    /// Packed batches of one message each, with their keys.
    keyed: Vec<(Vec<u8>, String)>,
}

impl Outgoing {
    pub(super) fn new(queue: QueueName, messages: Vec<OutgoingMessage>) -> Self {
        let messages = messages
            .into_iter()
            .map(|m| PackedMessage { body: m.body, attributes: m.attributes, dedup_key: m.dedup_key })
            .collect();
        Self::packed(queue, messages)
    }

    fn packed(queue: QueueName, messages: Vec<PackedMessage>) -> Self {
        let (keyed, plain): (Vec<_>, Vec<_>) =
            messages.into_iter().partition(|m| keeps_keys(queue) && m.dedup_key.is_some());
        let keyed = keyed
            .into_iter()
            .map(|m| {
                let key = m.dedup_key.clone().expect("partitioned by key");
                (PackedBatch { messages: vec![m] }.encode_to_vec(), key)
            })
            .collect();
        let count = plain.len() as i64;
        let batch = (count > 0).then(|| (PackedBatch { messages: plain }.encode_to_vec(), count));
        Self { queue, batch, keyed }
    }

    pub(super) fn insert(self, tx: &rusqlite::Transaction<'_>, now: i64) -> rusqlite::Result<()> {
        let queue = self.queue.as_str();
        // A batch just sent: all of it one run, visible now.
        let sent = |count, dedup_key| Run {
            batch: 0,
            first: 0,
            count,
            queue: queue.to_owned(),
            receive_count: 0,
            visible_at_ms: now,
            sent_at_ms: now,
            first_received_ms: None,
            dedup_key,
        };
        if let Some((data, count)) = self.batch {
            insert_batch(tx, data, sent(count, None))?;
        }
        for (data, key) in self.keyed {
            // Only an entry nobody holds now stands for the record: one held may be on its way
            // out (a replay sends a copy back to work, then deletes the entry; should the copy
            // fail again before that delete, its new entry is all that is left of it). The held
            // one gives its key up to the new one (one key a queue), and is an entry like any
            // other should it come back.
            let queued: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM queue_runs WHERE queue = ?1 AND dedup_key = ?2 \
                     AND visible_at_ms <= ?3)",
                )?
                .query_row(params![queue, key, now], |r| r.get(0))?;
            if !queued {
                tx.prepare_cached("UPDATE queue_runs SET dedup_key = NULL WHERE queue = ?1 AND dedup_key = ?2")?
                    .execute(params![queue, key])?;
                insert_batch(tx, data, sent(1, Some(key)))?;
            }
        }
        Ok(())
    }
}

/// Whether `queue` keeps deduplication keys: a DLQ does (one entry a record), as a batch of one
/// for each keyed message.
fn keeps_keys(queue: QueueName) -> bool {
    queue.dlq_stage().is_some()
}

/// Writes a batch and `run`, all of its messages, under the batch's new id.
fn insert_batch(tx: &rusqlite::Transaction<'_>, data: Vec<u8>, run: Run) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO queue_batches (data) VALUES (?1)")?.execute([data])?;
    Run { batch: tx.last_insert_rowid(), ..run }.insert(tx)
}

/// What becomes of the messages receipts name.
#[derive(Clone, Copy)]
enum Settle {
    /// Acknowledged: gone from the queue.
    Delete,
    /// Visible again (or still hidden) until then.
    VisibleAt(i64),
}

/// Applies `settle` to the messages that `named` (batch, place, receive count) name, where no
/// later receive made the receipt stale (a [`WHOLE_BATCH`] place: every message of the batch).
/// A run that is named, wholly or in part, is written again as runs each named wholly or not at
/// all (the named ones deleted, or with their new visibility). Returns how many of `named`
/// named nothing: stale (received again since, or redriven to the DLQ).
fn settle(tx: &rusqlite::Transaction<'_>, named: Vec<(i64, i64, u32)>, settle: Settle) -> rusqlite::Result<usize> {
    let mut stale = 0;
    let mut by_batch: BTreeMap<i64, Vec<(i64, u32)>> = BTreeMap::new();
    for (batch, place, count) in named {
        by_batch.entry(batch).or_default().push((place, count));
    }
    for (batch, named) in by_batch {
        let whole = named.iter().any(|&(place, _)| place == WHOLE_BATCH);
        let mut found = vec![false; named.len()];
        for run in runs_of(tx, batch)? {
            let end = run.first + run.count;
            let mut hit = vec![whole; run.count as usize];
            for (n, &(place, count)) in named.iter().enumerate() {
                if place == WHOLE_BATCH {
                    found[n] = true;
                } else if count == run.receive_count && (run.first..end).contains(&place) {
                    hit[(place - run.first) as usize] = true;
                    found[n] = true;
                }
            }
            if !hit.contains(&true) {
                continue;
            }
            run.delete(tx)?;
            // Each stretch of messages named, or not, becomes a run of its own.
            let mut start = run.first;
            for stretch in hit.chunk_by(|a, b| a == b) {
                let part = run.part(start, stretch.len() as i64);
                start += part.count;
                match (stretch[0], settle) {
                    (false, _) => part.insert(tx)?,
                    (true, Settle::Delete) => {}
                    (true, Settle::VisibleAt(at)) => Run { visible_at_ms: at, ..part }.insert(tx)?,
                }
            }
        }
        if matches!(settle, Settle::Delete) {
            drop_batch_if_done(tx, batch)?;
        }
        stale += found.iter().filter(|f| !**f).count();
    }
    Ok(stale)
}

/// A receipt names one receive of one message: `batch:place:receive count` (the place
/// [`WHOLE_BATCH`]: every message of the batch).
fn receipt(batch: i64, place: i64, receive_count: u32) -> Receipt {
    Receipt(format!("{batch}:{place}:{receive_count}"))
}

fn parse_receipts(receipts: &[Receipt]) -> Vec<(i64, i64, u32)> {
    receipts
        .iter()
        .filter_map(|r| {
            let mut parts = r.0.splitn(3, ':');
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect()
}

#[async_trait]
impl WorkQueue for EmbeddedQueue {
    fn name(&self) -> QueueName {
        self.name
    }

    async fn send_batch(&self, messages: Vec<OutgoingMessage>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        self.forward_and_ack(vec![(self.name, messages)], &[]).await
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        self.receive_hidden(max, wait, Duration::from_millis(self.visibility_ms)).await
    }

    async fn receive_hidden(&self, max: usize, wait: Duration, hidden: Duration) -> Result<Vec<ReceivedMessage>> {
        let deadline = tokio::time::Instant::now() + wait;
        let hidden_ms = u64::try_from(hidden.as_millis()).unwrap_or(u64::MAX);
        loop {
            let batch = self.try_receive(max.max(1), hidden_ms).await?;
            let now = tokio::time::Instant::now();
            if !batch.is_empty() || now >= deadline {
                return Ok(batch);
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<()> {
        let named = parse_receipts(receipts);
        self.db.write(move |tx| settle(tx, named, Settle::Delete)).await.map(drop)
    }

    fn forwards_with_ack(&self) -> bool {
        true
    }

    async fn forward_and_ack(&self, sends: Vec<(QueueName, Vec<OutgoingMessage>)>, receipts: &[Receipt]) -> Result<()> {
        let outgoing: Vec<Outgoing> =
            sends.into_iter().map(|(queue, messages)| Outgoing::new(queue, messages)).collect();
        let named = parse_receipts(receipts);
        let stale = self
            .db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let now = now_ms() as i64;
                for messages in outgoing {
                    messages.insert(&tx, now)?;
                }
                let stale = settle(&tx, named, Settle::Delete)?;
                // A message whose receipt went stale is another worker's now, or in the DLQ:
                // its sends must not go too (a result beside its DLQ entry). Nothing is kept.
                if stale == 0 {
                    tx.commit()?;
                }
                Ok(stale)
            })
            .await?;
        if stale > 0 {
            return Err(SluiceError::retryable(
                ReasonCode::StoreBusy,
                format!(
                    "{}: {stale} of the batch's messages were received again or dead-lettered while it ran \
                     (their visibility ran out): nothing sent, the batch is redone",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    async fn extend_visibility(&self, receipts: &[Receipt], by: Duration) -> Result<()> {
        self.set_visible_at(receipts, by).await
    }

    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<()> {
        self.set_visible_at(receipts, delay).await
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let queue = self.name;
        self.db
            .call(move |conn| {
                conn.prepare_cached(
                    "SELECT COALESCE(SUM(CASE WHEN visible_at_ms <= ?2 THEN count END), 0), \
                     COALESCE(SUM(CASE WHEN visible_at_ms > ?2 THEN count END), 0) FROM queue_runs WHERE queue = ?1",
                )?
                .query_row(params![queue.as_str(), now_ms() as i64], |r| {
                    Ok(QueueDepth { visible: r.get::<_, i64>(0)? as u64, in_flight: r.get::<_, i64>(1)? as u64 })
                })
            })
            .await
    }

    async fn peek(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let queue = self.name;
        let taken = self
            .db
            .call(move |conn| {
                let mut runs = conn.prepare_cached(
                    "SELECT batch, first, count, receive_count, sent_at_ms, first_received_ms FROM queue_runs \
                     WHERE queue = ?1 \
                     ORDER BY batch, first",
                )?;
                let mut rows = runs.query([queue.as_str()])?;
                let mut out = Vec::new();
                let mut seen = 0;
                let mut batches = Batches::default();
                while let Some(r) = rows.next()? {
                    if seen >= max {
                        break;
                    }
                    let (batch, first, count) = (r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?);
                    let count = count.min((max - seen) as i64);
                    seen += count as usize;
                    let data = batches.get(conn, batch)?;
                    out.push(Taken {
                        batch,
                        first,
                        count,
                        receive_count: r.get(3)?,
                        sent_at_ms: r.get(4)?,
                        first_received_ms: r.get(5)?,
                        data,
                    });
                }
                Ok(out)
            })
            .await?;
        Ok(unpack(taken, queue, |batch, place, _| Receipt(format!("peek:{batch}:{place}"))))
    }
}

/// Moves the messages of a store made before the batched queues (late 2026-12-05: a `messages`
/// table, a row per message) into batches of one, each keeping its receive count, visibility and
/// deduplication key, and drops the table. In the caller's transaction, after the schema is
/// applied.
pub(super) fn move_message_rows(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let old: Option<String> = tx
        .query_row("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'messages'", [], |r| r.get(0))
        .optional()?;
    if old.is_none() {
        return Ok(());
    }
    tracing::info!("moving queued messages to the batched layout");
    // A row at a time, written as it is read: a store's backlog (a deep DLQ) need not fit in memory.
    let mut select = tx.prepare(
        "SELECT queue, body, attributes, dedup_key, receive_count, visible_at_ms, sent_at_ms, first_received_ms \
         FROM messages ORDER BY id",
    )?;
    let mut rows = select.query([])?;
    let mut moved = 0_u64;
    while let Some(r) = rows.next()? {
        let dedup_key: Option<String> = r.get(3)?;
        let attributes: String = r.get(2)?;
        let queue: String = r.get(0)?;
        let keyed = QueueName::ALL.into_iter().find(|q| q.as_str() == queue).is_some_and(keeps_keys);
        let run = Run {
            batch: 0,
            first: 0,
            count: 1,
            queue,
            receive_count: r.get(4)?,
            visible_at_ms: r.get(5)?,
            sent_at_ms: r.get(6)?,
            first_received_ms: r.get(7)?,
            dedup_key: dedup_key.clone().filter(|_| keyed),
        };
        let message = PackedMessage {
            body: r.get(1)?,
            attributes: serde_json::from_str(&attributes).unwrap_or_default(),
            dedup_key,
        };
        insert_batch(tx, PackedBatch { messages: vec![message] }.encode_to_vec(), run)?;
        moved += 1;
    }
    drop(rows);
    drop(select);
    tracing::info!(messages = moved, "queued messages moved to the batched layout");
    tx.execute_batch("DROP TABLE messages")
}
