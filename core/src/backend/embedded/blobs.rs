//! Claim-check blobs inside the store file, named by the hash of their content.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::Db;
use crate::backend::{BlobStore, blob_too_large};
use crate::envelope::RecordId;
use crate::error::{ReasonCode, Result, SluiceError};

const SCHEME: &str = "blob:";

pub(super) struct EmbeddedBlobStore {
    db: Db,
}

impl EmbeddedBlobStore {
    pub(super) fn new(db: Db) -> Self {
        Self { db }
    }
}

#[async_trait]
impl BlobStore for EmbeddedBlobStore {
    async fn put(&self, data: Vec<u8>) -> Result<String> {
        let id = RecordId::from_content(&data).to_string();
        let reference = format!("{SCHEME}{id}");
        self.db
            .write(move |tx| tx.execute("INSERT OR IGNORE INTO blobs (id, data) VALUES (?1, ?2)", params![id, data]))
            .await?;
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
