//! The embedded stream: a log table split into shards, with one lease row per shard.
//!
//! All workers share one machine and so one clock, so lease expiry is a wall-clock time here.
//! (The Kinesis consumer cannot do that across machines and judges expiry by counters.)

use std::collections::BTreeMap;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::Db;
use super::queue::Outgoing;
use crate::backend::{
    Checkpoint, OutgoingMessage, PutReport, RecordStream, StreamConsumer, StreamInput, StreamRecord, StreamStats,
};
use crate::config::StoreConfig;
use crate::envelope::{REPLAY_KEY_PREFIX, now_ms};
use crate::error::{ReasonCode, Result, SluiceError};
use crate::telemetry::metrics::metrics;
use crate::topology::QueueName;

pub(super) struct EmbeddedStream {
    db: Db,
    lease_ms: u64,
    retention_ms: u64,
}

impl EmbeddedStream {
    pub(super) fn new(db: Db, config: &StoreConfig) -> Self {
        Self {
            db,
            lease_ms: config.lease_duration_ms,
            retention_ms: config.stream_retention_hours.saturating_mul(3_600_000),
        }
    }
}

use super::{SWEEP_EVERY, SWEEP_RECORDS, oldest_past};

/// Gives a store made before shards counted their arrivals the count: what lies at or below each
/// checkpoint, less replays, which arrived before (a [`REPLAY_KEY_PREFIX`] partition key).
pub(super) fn count_arrivals(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let counted: bool =
        tx.query_row("SELECT COUNT(*) FROM pragma_table_info('stream_shards') WHERE name = 'arrived'", [], |r| {
            r.get::<_, i64>(0).map(|n| n > 0)
        })?;
    if counted {
        return Ok(());
    }
    tx.execute_batch("ALTER TABLE stream_shards ADD COLUMN arrived INTEGER NOT NULL DEFAULT 0")?;
    tx.execute(
        "UPDATE stream_shards SET arrived = (SELECT COUNT(*) FROM stream_records r \
           WHERE r.shard = stream_shards.shard AND r.seq <= stream_shards.checkpoint \
           AND r.partition_key NOT LIKE ?1)",
        [replays()],
    )?;
    Ok(())
}

/// The partition keys of replays, as a `LIKE` pattern: arrivals leave them out.
fn replays() -> String {
    format!("{REPLAY_KEY_PREFIX}%")
}

fn shard_name(shard: i64) -> String {
    format!("shard-{shard:04}")
}

fn parse_shard(name: &str) -> Result<i64> {
    name.strip_prefix("shard-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| SluiceError::permanent(ReasonCode::Internal, format!("not an embedded shard id: {name}")))
}

fn parse_sequence(sequence: &str) -> Result<i64> {
    sequence
        .parse()
        .map_err(|_| SluiceError::permanent(ReasonCode::Internal, format!("not an embedded sequence: {sequence}")))
}

/// Stable across processes and releases, like Kinesis's MD5 of the partition key.
fn shard_for(partition_key: &str, shards: i64) -> i64 {
    let digest = Sha256::digest(partition_key.as_bytes());
    let hash = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (hash % shards as u64) as i64
}

#[async_trait]
impl RecordStream for EmbeddedStream {
    async fn put_records(&self, records: Vec<StreamInput>) -> Result<PutReport> {
        let report = PutReport { records: records.len() as u64, ..PutReport::default() };
        self.db
            .write(move |tx| {
                let shards: i64 = tx.query_row("SELECT COUNT(*) FROM stream_shards", [], |r| r.get(0))?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO stream_records (shard, partition_key, data, arrived_ms) VALUES (?1, ?2, ?3, ?4)",
                )?;
                let now = now_ms() as i64;
                for record in &records {
                    insert.execute(params![
                        shard_for(&record.partition_key, shards),
                        record.partition_key,
                        record.data,
                        now
                    ])?;
                }
                Ok(())
            })
            .await?;
        Ok(report)
    }

    async fn consumer(&self, worker_id: &str) -> Result<Box<dyn StreamConsumer>> {
        Ok(Box::new(EmbeddedConsumer {
            db: self.db.clone(),
            owner: worker_id.to_owned(),
            lease_ms: self.lease_ms,
            positions: BTreeMap::new(),
            balanced: None,
            turn: 0,
            retention_ms: self.retention_ms,
            swept: None,
            sweep_left: false,
        }))
    }

    async fn stats(&self) -> Result<StreamStats> {
        self.db
            .call(|conn| {
                let shards: i64 = conn.query_row("SELECT COUNT(*) FROM stream_shards", [], |r| r.get(0))?;
                // What ingest has taken in, counted as it checkpointed (replays not counted).
                let mut by_shard = conn.prepare("SELECT shard, arrived FROM stream_shards")?;
                let arrived: BTreeMap<String, u64> = by_shard
                    .query_map([], |r| Ok((shard_name(r.get(0)?), r.get::<_, i64>(1)? as u64)))?
                    .collect::<rusqlite::Result<_>>()?;
                let pending: i64 = conn.query_row(
                    "SELECT COUNT(*) FROM stream_records r JOIN stream_shards s ON r.shard = s.shard \
                     WHERE r.seq > s.checkpoint",
                    [],
                    |r| r.get(0),
                )?;
                let mut owners = conn.prepare(
                    "SELECT lease_owner, COUNT(*) FROM stream_shards \
                     WHERE lease_owner IS NOT NULL AND lease_expires_ms > ?1 GROUP BY lease_owner",
                )?;
                let leases = owners
                    .query_map([now_ms() as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
                    .collect::<rusqlite::Result<_>>()?;
                Ok(StreamStats {
                    shards: shards as usize,
                    records: arrived.values().sum(),
                    arrived,
                    pending: pending as u64,
                    pending_at_least: false,
                    millis_behind_latest: None,
                    leases,
                })
            })
            .await
    }
}

/// A consumer's view: the shards it holds and how far it has read in each.
struct EmbeddedConsumer {
    db: Db,
    owner: String,
    lease_ms: u64,
    /// Shard → last sequence read (not necessarily checkpointed).
    positions: BTreeMap<i64, i64>,
    /// When the leases were last renewed and balanced.
    balanced: Option<std::time::Instant>,
    /// Which held shard the next poll reads first: each in turn, so that a shard with a backlog
    /// of more than a poll takes does not keep the others unread.
    turn: usize,
    /// `store.stream_retention_hours`, and when this consumer last deleted what its shards hold
    /// past it.
    retention_ms: u64,
    swept: Option<std::time::Instant>,
    /// The last sweep stopped at its limit: the next poll sweeps on.
    sweep_left: bool,
}

impl EmbeddedConsumer {
    /// How often the leases are renewed and balanced: every tenth of a lease, at the next poll.
    /// A worker that polls renews its leases about nine times before they could run out (a batch
    /// may take 0.9 of a lease, not all of it, between its poll and its checkpoint), takes its
    /// share after a worker stopped or joined within a tenth of a lease, and notices a shard
    /// taken from it as late (reading it meanwhile: copies the sinks absorb; its checkpoint
    /// there is refused).
    fn rebalance_every(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lease_ms / 10)
    }

    /// Balances the leases (see [`Self::balance_leases`]) when a tenth of a lease has passed
    /// since the last time. A worker that holds no shard looks no more often: every poll (every
    /// 25 ms while idle) would take the store's write lock, for ever where there are more
    /// workers than shards.
    async fn keep_leases(&mut self) -> Result<()> {
        let due = self.balanced.is_none_or(|at| at.elapsed() >= self.rebalance_every());
        if due {
            self.balance_leases().await?;
            self.balanced = Some(std::time::Instant::now());
        }
        let due = self.swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY);
        if self.retention_ms > 0 && (due || self.sweep_left) {
            self.swept = Some(std::time::Instant::now());
            self.sweep_left = self.sweep().await?;
        }
        Ok(())
    }

    /// Deletes the records of the shards held that are checkpointed and older than the
    /// retention, the oldest first, a shard a transaction, as much as [`oldest_past`] lets go
    /// each; whether more is left to delete.
    async fn sweep(&self) -> Result<bool> {
        let before = now_ms().saturating_sub(self.retention_ms) as i64;
        let mut left = false;
        for &shard in self.positions.keys() {
            let (deleted, full) = self
                .db
                .write(move |tx| {
                    // The oldest checkpointed records first (records arrive in sequence order);
                    // none is held. A blob's length is in its row's header: its pages are not
                    // read to know it.
                    let mut oldest = tx.prepare_cached(
                        "SELECT seq, arrived_ms, length(data), 0 FROM stream_records WHERE shard = ?1 AND seq <= \
                         (SELECT checkpoint FROM stream_shards WHERE shard = ?1) ORDER BY seq LIMIT ?2",
                    )?;
                    let oldest = oldest_past(oldest.query(params![shard, SWEEP_RECORDS])?, before, SWEEP_RECORDS)?;
                    let Some(upto) = oldest.last else { return Ok((0, false)) };
                    let deleted = tx
                        .prepare_cached("DELETE FROM stream_records WHERE shard = ?1 AND seq <= ?2")?
                        .execute(params![shard, upto])?;
                    Ok((deleted, oldest.full))
                })
                .await?;
            if deleted > 0 {
                tracing::debug!(shard, deleted, "stream records past the retention deleted");
            }
            left |= full;
        }
        Ok(left)
    }

    /// Renews held leases and takes a fair share of the rest: free and expired shards first,
    /// then one from the most loaded worker if this one holds less than its share.
    async fn balance_leases(&mut self) -> Result<()> {
        let owner = self.owner.clone();
        let lease_ms = self.lease_ms as i64;
        let held: Vec<(i64, i64)> = self
            .db
            .write(move |tx| {
                let now = now_ms() as i64;
                tx.execute(
                    "UPDATE stream_shards SET lease_expires_ms = ?1, lease_counter = lease_counter + 1 \
                     WHERE lease_owner = ?2",
                    params![now + lease_ms, owner],
                )?;
                let total: i64 = tx.query_row("SELECT COUNT(*) FROM stream_shards", [], |r| r.get(0))?;
                let others: i64 = tx.query_row(
                    "SELECT COUNT(DISTINCT lease_owner) FROM stream_shards \
                     WHERE lease_owner IS NOT NULL AND lease_owner != ?1 AND lease_expires_ms > ?2",
                    params![owner, now],
                    |r| r.get(0),
                )?;
                let target = (total + others) / (others + 1); // ceil(total / workers)
                let mine: i64 =
                    tx.query_row("SELECT COUNT(*) FROM stream_shards WHERE lease_owner = ?1", params![owner], |r| {
                        r.get(0)
                    })?;
                let wanted = target - mine;
                if wanted > 0 {
                    tx.execute(
                        "UPDATE stream_shards SET lease_owner = ?1, lease_expires_ms = ?2, \
                         lease_counter = lease_counter + 1 WHERE shard IN (SELECT shard FROM stream_shards \
                         WHERE lease_owner IS NULL OR lease_expires_ms <= ?3 ORDER BY shard LIMIT ?4)",
                        params![owner, now + lease_ms, now, wanted],
                    )?;
                    let mine_now: i64 = tx.query_row(
                        "SELECT COUNT(*) FROM stream_shards WHERE lease_owner = ?1",
                        params![owner],
                        |r| r.get(0),
                    )?;
                    if mine_now < target {
                        steal_one(tx, &owner, target, now + lease_ms)?;
                    }
                }
                let mut stmt =
                    tx.prepare("SELECT shard, checkpoint FROM stream_shards WHERE lease_owner = ?1 ORDER BY shard")?;
                let rows = stmt.query_map(params![owner], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await?;
        let mut positions = BTreeMap::new();
        for (shard, checkpoint) in held {
            // Keep the read position of shards already held, unless another worker checkpointed
            // past it meanwhile (the shard was lost and taken back); a new one starts at its
            // checkpoint.
            positions.insert(shard, self.positions.get(&shard).map_or(checkpoint, |&kept| kept.max(checkpoint)));
        }
        self.positions = positions;
        Ok(())
    }
}

/// Takes one shard from the worker holding the most, if it holds more than `target`.
fn steal_one(tx: &rusqlite::Transaction<'_>, owner: &str, target: i64, expires: i64) -> rusqlite::Result<()> {
    let victim: Option<i64> = tx
        .query_row(
            "SELECT MAX(shard) FROM stream_shards WHERE lease_owner = \
             (SELECT lease_owner FROM stream_shards WHERE lease_owner IS NOT NULL AND lease_owner != ?1 \
              GROUP BY lease_owner HAVING COUNT(*) > ?2 ORDER BY COUNT(*) DESC LIMIT 1)",
            params![owner, target],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    if let Some(shard) = victim {
        tx.execute(
            "UPDATE stream_shards SET lease_owner = ?1, lease_expires_ms = ?2, lease_counter = lease_counter + 1 \
             WHERE shard = ?3",
            params![owner, expires, shard],
        )?;
    }
    Ok(())
}

#[async_trait]
impl StreamConsumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize) -> Result<Vec<StreamRecord>> {
        // A write each poll held every stage up (a tenth of a busy ingest's store time); leases
        // are renewed (and checkpoints extend them) well before they run out.
        self.keep_leases().await?;
        let mut positions: Vec<(i64, i64)> = self.positions.iter().map(|(&s, &p)| (s, p)).collect();
        if !positions.is_empty() {
            let first = self.turn % positions.len();
            positions.rotate_left(first);
            self.turn = self.turn.wrapping_add(1);
        }
        // Each shard read, and whether its read stopped at the limit (so more may wait there).
        let (records, visited): (Vec<StreamRecord>, Vec<(i64, bool)>) = self
            .db
            .call(move |conn| {
                let (mut out, mut visited) = (Vec::new(), Vec::new());
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, partition_key, data, arrived_ms FROM stream_records \
                     WHERE shard = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                for (shard, after) in positions {
                    let remaining = max.saturating_sub(out.len());
                    if remaining == 0 {
                        break;
                    }
                    let before = out.len();
                    let rows = stmt.query_map(params![shard, after, remaining as i64], |r| {
                        Ok(StreamRecord {
                            shard: shard_name(shard),
                            sequence: r.get::<_, i64>(0)?.to_string(),
                            partition_key: r.get(1)?,
                            data: r.get(2)?,
                            arrived_ms: r.get::<_, i64>(3)? as u64,
                        })
                    })?;
                    for row in rows {
                        out.push(row?);
                    }
                    visited.push((shard, out.len() - before == remaining));
                }
                Ok((out, visited))
            })
            .await?;
        let mut last_arrived: BTreeMap<i64, u64> = BTreeMap::new();
        for record in &records {
            let shard = parse_shard(&record.shard)?;
            self.positions.insert(shard, parse_sequence(&record.sequence)?);
            last_arrived.insert(shard, record.arrived_ms);
        }
        // A shard read to its end is caught up; one whose read stopped at the limit is behind by
        // the age of the last record read (the embedded log keeps no "millis behind latest" of
        // its own). Shards not read this time keep what they last reported.
        for (shard, stopped_at_limit) in visited {
            let lag = match last_arrived.get(&shard) {
                Some(&arrived) if stopped_at_limit => now_ms().saturating_sub(arrived),
                _ => 0,
            };
            metrics().stream_lag(&shard_name(shard), lag);
        }
        Ok(records)
    }

    async fn checkpoint(&mut self, shard: &str, sequence: &str, records: u64) -> Result<()> {
        let checkpoint = Checkpoint { shard: shard.to_owned(), sequence: sequence.to_owned(), records };
        if self.forward_and_checkpoint(Vec::new(), &[checkpoint]).await? == [true] {
            return Ok(());
        }
        Err(SluiceError::retryable(ReasonCode::LeaseLost, format!("{shard} is now held by another worker")))
    }

    fn forwards_with_checkpoint(&self) -> bool {
        true
    }

    async fn forward_and_checkpoint(
        &mut self,
        sends: Vec<(QueueName, Vec<OutgoingMessage>)>,
        checkpoints: &[Checkpoint],
    ) -> Result<Vec<bool>> {
        let at: Vec<(i64, i64)> = checkpoints
            .iter()
            .map(|c| Ok((parse_shard(&c.shard)?, parse_sequence(&c.sequence)?)))
            .collect::<Result<_>>()?;
        // Packed before taking the connection, which every stage waits for.
        let outgoing: Vec<Outgoing> =
            sends.into_iter().map(|(queue, messages)| Outgoing::new(queue, messages)).collect();
        let shards: Vec<i64> = at.iter().map(|&(shard, _)| shard).collect();
        let owner = self.owner.clone();
        let lease_ms = self.lease_ms as i64;
        let recorded = self
            .db
            .write(move |tx| {
                let now = now_ms() as i64;
                for messages in outgoing {
                    messages.insert(tx, now)?;
                }
                // Arrivals: the records the checkpoint moves past, counted in the log (the row's
                // `checkpoint` is read as it was), replays not counted. Not the worker's count:
                // one whose read position lagged a checkpoint another worker made meanwhile
                // would count some twice.
                let mut update = tx.prepare_cached(
                    "UPDATE stream_shards SET checkpoint = MAX(checkpoint, ?1), lease_expires_ms = ?2, \
                     arrived = arrived + (SELECT COUNT(*) FROM stream_records r WHERE r.shard = ?3 \
                       AND r.seq > stream_shards.checkpoint AND r.seq <= ?1 \
                       AND r.partition_key NOT LIKE ?5) \
                     WHERE shard = ?3 AND lease_owner = ?4",
                )?;
                let replays = replays();
                at.iter()
                    .map(|&(shard, seq)| Ok(update.execute(params![seq, now + lease_ms, shard, owner, replays])? == 1))
                    .collect::<rusqlite::Result<Vec<bool>>>()
            })
            .await?;
        for (shard, _) in shards.iter().zip(&recorded).filter(|(_, held)| !**held) {
            self.positions.remove(shard);
        }
        Ok(recorded)
    }

    async fn rewind(&mut self, shard: &str) -> Result<()> {
        let shard_id = parse_shard(shard)?;
        let checkpoint = self
            .db
            .call(move |conn| {
                conn.query_row("SELECT checkpoint FROM stream_shards WHERE shard = ?1", [shard_id], |r| r.get(0))
            })
            .await;
        match checkpoint {
            Ok(checkpoint) => {
                if let Some(position) = self.positions.get_mut(&shard_id) {
                    *position = checkpoint;
                }
                Ok(())
            }
            Err(e) => {
                // Never read on past what was not settled: without its position, the shard goes
                // on from its stored checkpoint once the leases are next looked at.
                self.positions.remove(&shard_id);
                Err(e)
            }
        }
    }

    async fn renew_leases(&mut self) -> Result<()> {
        self.keep_leases().await
    }

    async fn release(&mut self) -> Result<()> {
        let owner = self.owner.clone();
        self.db
            .write(move |tx| {
                tx.execute(
                    "UPDATE stream_shards SET lease_owner = NULL, lease_expires_ms = 0 WHERE lease_owner = ?1",
                    [owner],
                )
            })
            .await?;
        self.positions.clear();
        Ok(())
    }

    fn shards(&self) -> Vec<String> {
        self.positions.keys().map(|&s| shard_name(s)).collect()
    }

    /// A read of the local log is one indexed query: as often as the embedded queues look again.
    fn idle_poll(&self) -> std::time::Duration {
        super::queue::POLL_INTERVAL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_keys_spread_over_shards_stably() {
        let mut counts = [0; 4];
        for i in 0..1000 {
            counts[shard_for(&format!("key-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
        assert_eq!(shard_for("abc", 4), shard_for("abc", 4));
    }
}
