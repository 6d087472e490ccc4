//! Embedded work queues: one `messages` table, a visibility time per message, receive counts,
//! and a redrive to the queue's DLQ after `max_receives`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;

use super::Db;
use crate::backend::{OutgoingMessage, QueueDepth, Receipt, ReceivedMessage, WorkQueue};
use crate::config::StoreConfig;
use crate::envelope::now_ms;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::record::DlqEntry;
use crate::topology::QueueName;

/// How often a long poll looks again while the queue is empty.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(25);

pub struct EmbeddedQueue {
    db: Db,
    name: QueueName,
    visibility_ms: u64,
    max_receives: u32,
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
                conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM messages WHERE queue = ?1 AND visible_at_ms <= ?2)")?
                    .query_row(params![queue.as_str(), now_ms() as i64], |r| r.get(0))
            })
            .await
    }

    async fn try_receive(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        if !self.has_visible().await? {
            return Ok(Vec::new());
        }
        let queue = self.name;
        let visibility_ms = self.visibility_ms as i64;
        let max_receives = self.max_receives;
        let taken = self
            .db
            .write(move |tx| {
                let now = now_ms() as i64;
                let mut out = Vec::new();
                let mut select = tx.prepare_cached(
                    "SELECT id, body, attributes, receive_count, sent_at_ms, first_received_ms, dedup_key \
                     FROM messages WHERE queue = ?1 AND visible_at_ms <= ?2 ORDER BY visible_at_ms, id LIMIT ?3",
                )?;
                let mut received = tx.prepare_cached(
                    "UPDATE messages SET receive_count = ?1, visible_at_ms = ?2, \
                     first_received_ms = COALESCE(first_received_ms, ?3) WHERE id = ?4",
                )?;
                // Redriven messages leave the batch short; look again until full or empty.
                loop {
                    let want = max - out.len();
                    let rows: Vec<Row> = select
                        .query_map(params![queue.as_str(), now, want as i64], |r| {
                            Ok(Row {
                                id: r.get(0)?,
                                body: r.get(1)?,
                                attributes: r.get(2)?,
                                receive_count: r.get(3)?,
                                sent_at_ms: r.get(4)?,
                                first_received_ms: r.get(5)?,
                                dedup_key: r.get(6)?,
                            })
                        })?
                        .collect::<rusqlite::Result<_>>()?;
                    if rows.is_empty() {
                        break;
                    }
                    let mut redriven = false;
                    for row in rows {
                        match queue.redrive_target().filter(|_| row.receive_count >= max_receives) {
                            Some(dlq) => {
                                redrive(tx, queue, dlq, &row, now)?;
                                redriven = true;
                            }
                            None => {
                                let count = row.receive_count + 1;
                                received.execute(params![count, now + visibility_ms, now, row.id])?;
                                out.push((row, count));
                            }
                        }
                    }
                    // Without a redrive a short batch is all the queue had: another look would find
                    // nothing (or, with no visibility timeout, the messages just taken, twice).
                    if out.len() >= max || !redriven {
                        break;
                    }
                }
                Ok(out)
            })
            .await?;
        // Attributes are parsed off the connection, which every stage waits for.
        Ok(taken
            .into_iter()
            .map(|(row, count)| ReceivedMessage {
                attributes: serde_json::from_str(&row.attributes).unwrap_or_default(),
                body: row.body,
                receipt: receipt(row.id, count),
                receive_count: count,
                sent_at_ms: row.sent_at_ms as u64,
            })
            .collect())
    }
}

struct Row {
    id: i64,
    body: Vec<u8>,
    attributes: String,
    receive_count: u32,
    sent_at_ms: i64,
    first_received_ms: Option<i64>,
    dedup_key: Option<String>,
}

/// Moves a message that was received too often to `dlq`, body untouched, reason attached.
fn redrive(
    tx: &rusqlite::Transaction<'_>,
    from: QueueName,
    dlq: QueueName,
    row: &Row,
    now: i64,
) -> rusqlite::Result<()> {
    let stage = dlq.dlq_stage().expect("a redrive target is a stage DLQ");
    let error = SluiceError::permanent(
        ReasonCode::MaxReceivesExceeded,
        format!("received {} times from {from} without being acknowledged", row.receive_count),
    );
    let mut entry = DlqEntry::new(stage, &error, row.receive_count, None, Vec::new());
    entry.first_failure_ms = row.first_received_ms.unwrap_or(row.sent_at_ms) as u64;
    let mut attributes: BTreeMap<String, String> = serde_json::from_str(&row.attributes).unwrap_or_default();
    attributes.extend(entry.attributes());
    if let Some(key) = &row.dedup_key {
        attributes.insert(crate::record::dlq_attr::RECORD_ID.to_owned(), key.clone());
    }
    tx.execute(
        "INSERT OR IGNORE INTO messages (queue, body, attributes, dedup_key, visible_at_ms, sent_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        params![
            dlq.as_str(),
            row.body,
            serde_json::to_string(&attributes).expect("map serialises"),
            row.dedup_key,
            now
        ],
    )?;
    tx.execute("DELETE FROM messages WHERE id = ?1", [row.id])?;
    Ok(())
}

/// Messages on their way into one queue, their attributes written out already: off the
/// connection, which every stage waits for.
struct Outgoing {
    queue: QueueName,
    /// Body, attributes as JSON, deduplication key.
    messages: Vec<(Vec<u8>, String, Option<String>)>,
}

impl Outgoing {
    fn new(queue: QueueName, messages: Vec<OutgoingMessage>) -> Self {
        let messages = messages
            .into_iter()
            .map(|m| (m.body, serde_json::to_string(&m.attributes).expect("map serialises"), m.dedup_key))
            .collect();
        Self { queue, messages }
    }

    fn insert(self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let now = now_ms() as i64;
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO messages (queue, body, attributes, dedup_key, visible_at_ms, sent_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        )?;
        for (body, attributes, dedup_key) in self.messages {
            insert.execute(params![self.queue.as_str(), body, attributes, dedup_key, now])?;
        }
        Ok(())
    }
}

/// Deletes the messages that `receipts` (id, receive count) name, where no later receive made
/// the receipt stale.
fn delete_received(tx: &rusqlite::Transaction<'_>, receipts: Vec<(i64, u32)>) -> rusqlite::Result<()> {
    let mut delete = tx.prepare_cached("DELETE FROM messages WHERE id = ?1 AND receive_count = ?2")?;
    for (id, count) in receipts {
        delete.execute(params![id, count])?;
    }
    Ok(())
}

/// A receipt names one receive of one message; it goes stale when the message is received again.
fn receipt(id: i64, receive_count: u32) -> Receipt {
    Receipt(format!("{id}:{receive_count}"))
}

fn parse_receipts(receipts: &[Receipt]) -> Vec<(i64, u32)> {
    receipts
        .iter()
        .filter_map(|r| {
            let (id, count) = r.0.split_once(':')?;
            Some((id.parse().ok()?, count.parse().ok()?))
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
        let outgoing = Outgoing::new(self.name, messages);
        self.db.write(move |tx| outgoing.insert(tx)).await
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let batch = self.try_receive(max.max(1)).await?;
            let now = tokio::time::Instant::now();
            if !batch.is_empty() || now >= deadline {
                return Ok(batch);
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<()> {
        let parsed = parse_receipts(receipts);
        self.db.write(move |tx| delete_received(tx, parsed)).await
    }

    fn forwards_with_ack(&self) -> bool {
        true
    }

    async fn forward_and_ack(&self, sends: Vec<(QueueName, Vec<OutgoingMessage>)>, receipts: &[Receipt]) -> Result<()> {
        let outgoing: Vec<Outgoing> =
            sends.into_iter().map(|(queue, messages)| Outgoing::new(queue, messages)).collect();
        let parsed = parse_receipts(receipts);
        self.db
            .write(move |tx| {
                for messages in outgoing {
                    messages.insert(tx)?;
                }
                delete_received(tx, parsed)
            })
            .await
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
                conn.query_row(
                    "SELECT COALESCE(SUM(visible_at_ms <= ?2), 0), COALESCE(SUM(visible_at_ms > ?2), 0) \
                     FROM messages WHERE queue = ?1",
                    params![queue.as_str(), now_ms() as i64],
                    |r| Ok(QueueDepth { visible: r.get::<_, i64>(0)? as u64, in_flight: r.get::<_, i64>(1)? as u64 }),
                )
            })
            .await
    }

    async fn peek(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let queue = self.name;
        self.db
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, body, attributes, receive_count, sent_at_ms FROM messages \
                     WHERE queue = ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![queue.as_str(), max as i64], |r| {
                    Ok(ReceivedMessage {
                        receipt: Receipt(format!("peek:{}", r.get::<_, i64>(0)?)),
                        body: r.get(1)?,
                        attributes: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                        receive_count: r.get(3)?,
                        sent_at_ms: r.get::<_, i64>(4)? as u64,
                    })
                })?;
                rows.collect()
            })
            .await
    }
}

impl EmbeddedQueue {
    async fn set_visible_at(&self, receipts: &[Receipt], from_now: Duration) -> Result<()> {
        let parsed = parse_receipts(receipts);
        self.db
            .write(move |tx| {
                let at = now_ms() as i64 + from_now.as_millis() as i64;
                let mut update =
                    tx.prepare_cached("UPDATE messages SET visible_at_ms = ?1 WHERE id = ?2 AND receive_count = ?3")?;
                for (id, count) in parsed {
                    update.execute(params![at, id, count])?;
                }
                Ok(())
            })
            .await
    }
}
