//! Claim-check blobs inside the store file, named by the hash of their content, kept as long as
//! feature vectors (`store.feature_retention_days`) and for as long after that as something
//! refers to them.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{Db, Sweeps, oldest_past};
use crate::backend::{BlobStore, blob_too_large};
use crate::config::StoreConfig;
use crate::envelope::{RecordId, now_ms};
use crate::error::{ReasonCode, Result, SluiceError};

const SCHEME: &str = "blob:";

/// The most blobs a sweep looks at: each one past the retention is looked for in every message
/// and stream record still to be read.
const SWEEP_BLOBS: i64 = 16;

pub(super) struct EmbeddedBlobStore {
    db: Db,
    /// `store.feature_retention_days`: a blob is what its record's features are made from.
    sweeps: Sweeps,
}

impl EmbeddedBlobStore {
    pub(super) fn new(db: Db, config: &StoreConfig) -> Self {
        Self { db, sweeps: Sweeps::new(config.feature_retention_days) }
    }
}

/// Deletes the oldest blobs stored before `before` (ms), as much as [`oldest_past`] lets go of
/// [`SWEEP_BLOBS`]; whether it stopped at that limit. One something still refers to — a stream
/// record not yet checkpointed, a message in any queue, a DLQ entry, whose bytes hold its
/// reference — is stored anew instead: kept another retention, and not looked for again before
/// then (rows are in store order, and the sweep starts from the oldest each time).
fn sweep_blobs(tx: &rusqlite::Transaction<'_>, before: i64, now: i64) -> rusqlite::Result<bool> {
    // Looked for only past the retention: the first young row, where the sweep stops, is read
    // too, and the look reads every message and unread stream record.
    let mut oldest = tx.prepare_cached(
        "SELECT b.rowid, b.stored_ms, length(b.data), CASE WHEN b.stored_ms < ?3 THEN ( \
         EXISTS (SELECT 1 FROM queue_batches q WHERE instr(q.data, CAST(?2 || b.id AS BLOB)) > 0) \
         OR EXISTS (SELECT 1 FROM stream_shards h JOIN stream_records s ON s.shard = h.shard \
                    AND s.seq > h.checkpoint WHERE instr(s.data, CAST(?2 || b.id AS BLOB)) > 0)) ELSE 0 END \
         FROM blobs b ORDER BY b.rowid LIMIT ?1",
    )?;
    let oldest = oldest_past(oldest.query(params![SWEEP_BLOBS, SCHEME, before])?, before, SWEEP_BLOBS)?;
    for rowid in &oldest.held {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO blobs (id, data, stored_ms) SELECT id, data, ?2 FROM blobs WHERE rowid = ?1",
        )?
        .execute(params![rowid, now])?;
    }
    let mut delete = tx.prepare_cached("DELETE FROM blobs WHERE rowid = ?1")?;
    for rowid in &oldest.gone {
        delete.execute([rowid])?;
    }
    if !oldest.gone.is_empty() || !oldest.held.is_empty() {
        tracing::debug!(
            deleted = oldest.gone.len(),
            kept = oldest.held.len(),
            "claim-checked payloads past the retention"
        );
    }
    Ok(oldest.full)
}

#[async_trait]
impl BlobStore for EmbeddedBlobStore {
    /// Stored again, the same content moves to the end of the table (its retention starts again).
    async fn put(&self, data: Vec<u8>) -> Result<String> {
        let id = RecordId::from_content(&data).to_string();
        let reference = format!("{SCHEME}{id}");
        let now = now_ms();
        // Now and then the write deletes what is past the retention too, in its transaction.
        let sweep = self.sweeps.due(now);
        let more = self
            .db
            .write(move |tx| {
                tx.prepare_cached("INSERT OR REPLACE INTO blobs (id, data, stored_ms) VALUES (?1, ?2, ?3)")?
                    .execute(params![id, data, now as i64])?;
                sweep.map(|sweep| sweep_blobs(tx, sweep.before, now as i64)).transpose()
            })
            .await?;
        if let Some(more) = more {
            // Stopped at its limit: the next put sweeps on, from the oldest (what it looked at
            // was deleted or moved to the end).
            self.sweeps.stopped(more.then_some(0));
        }
        Ok(reference)
    }

    async fn get(&self, reference: &str) -> Result<Vec<u8>> {
        self.get_at_most(reference, usize::MAX).await
    }

    /// The blob's length is read first (SQLite keeps it in the row's header): one over `limit`
    /// is refused without its bytes being read.
    async fn get_at_most(&self, reference: &str, limit: usize) -> Result<Vec<u8>> {
        let Some(id) = reference.strip_prefix(SCHEME).map(str::to_owned) else {
            return Err(SluiceError::permanent(
                ReasonCode::ClaimCheckRejected,
                format!("{reference:?} is not a blob reference of this store (expected {SCHEME}<id>)"),
            ));
        };
        let most = i64::try_from(limit).unwrap_or(i64::MAX);
        let found = self
            .db
            .call(move |conn| {
                conn.query_row(
                    "SELECT length(data), CASE WHEN length(data) <= ?2 THEN data END FROM blobs WHERE id = ?1",
                    params![id, most],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?)),
                )
                .optional()
            })
            .await?;
        match found {
            None => Err(SluiceError::permanent(ReasonCode::ClaimCheckMissing, format!("no blob {reference}"))),
            Some((len, None)) => Err(blob_too_large(reference, len.max(0) as u64, limit)),
            Some((_, Some(data))) => Ok(data),
        }
    }
}
