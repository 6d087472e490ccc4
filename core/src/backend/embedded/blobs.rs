//! Claim-check blobs inside the store file, named by the hash of their content.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::Db;
use crate::backend::BlobStore;
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
        let Some(id) = reference.strip_prefix(SCHEME).map(str::to_owned) else {
            return Err(SluiceError::permanent(
                ReasonCode::ClaimCheckRejected,
                format!("{reference:?} is not a blob reference of this store (expected {SCHEME}<id>)"),
            ));
        };
        let found = self
            .db
            .call(move |conn| conn.query_row("SELECT data FROM blobs WHERE id = ?1", [id], |r| r.get(0)).optional())
            .await?;
        found.ok_or_else(|| SluiceError::permanent(ReasonCode::ClaimCheckMissing, format!("no blob {reference}")))
    }
}
