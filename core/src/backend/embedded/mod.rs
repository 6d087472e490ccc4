//! The embedded backend: every trait over one SQLite file (WAL), safe for several worker
//! processes at once. SQLite serialises writers; each operation is one short transaction, and
//! `BEGIN IMMEDIATE` takes the write lock up front so concurrent receivers never hand out the
//! same message twice.

mod blobs;
mod capture;
mod queue;
mod stores;
mod stream;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::{Backend, WorkQueue};
use crate::config::StoreConfig;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::topology::QueueName;

pub use queue::EmbeddedQueue;

const SCHEMA: &str = include_str!("schema.sql");

/// A handle on the store file. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Db,
    config: StoreConfig,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `config.path`.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let db = Db::open(config)?;
        Ok(Self { db, config: config.clone() })
    }

    pub fn into_backend(self) -> Backend {
        let queues = QueueName::ALL
            .into_iter()
            .map(|name| {
                let queue: Arc<dyn WorkQueue> = Arc::new(EmbeddedQueue::new(self.db.clone(), name, &self.config));
                (name, queue)
            })
            .collect::<BTreeMap<_, _>>();
        Backend {
            stream: Arc::new(stream::EmbeddedStream::new(self.db.clone(), &self.config)),
            features: Arc::new(stores::EmbeddedFeatureStore::new(self.db.clone())),
            results: Arc::new(stores::EmbeddedResultStore::new(self.db.clone())),
            blobs: Arc::new(blobs::EmbeddedBlobStore::new(self.db.clone())),
            requests: Arc::new(NoRequests),
            capture: Arc::new(capture::CaptureFiles::new(&self.config)),
            queues: Arc::new(queues),
            kind: crate::config::BackendKind::Embedded,
        }
    }
}

/// The embedded store sends no AWS requests, so it keeps no ledger of them.
struct NoRequests;

#[async_trait::async_trait]
impl super::RequestLedger for NoRequests {
    async fn add(&self, _delta: BTreeMap<String, u64>) -> Result<()> {
        Ok(())
    }

    async fn totals(&self) -> Result<BTreeMap<String, u64>> {
        Ok(BTreeMap::new())
    }
}

/// One SQLite connection, used from blocking threads so async workers never stall on a lock.
#[derive(Clone)]
pub(crate) struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    fn open(config: &StoreConfig) -> Result<Self> {
        if let Some(parent) = config.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                SluiceError::permanent(ReasonCode::StoreUnavailable, format!("{}: {e}", parent.display()))
            })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&config.path, flags).map_err(classify)?;
        conn.busy_timeout(Duration::from_millis(config.busy_timeout_ms)).map_err(classify)?;
        // WAL lets readers run beside the one writer. NORMAL syncs at checkpoints, not every
        // commit: a killed process loses nothing committed; only power loss can lose the last
        // commits.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(classify)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(classify)?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(classify)?;
        tx.execute_batch(SCHEMA).map_err(classify)?;
        let existing: i64 = tx.query_row("SELECT COUNT(*) FROM stream_shards", [], |r| r.get(0)).map_err(classify)?;
        if existing == 0 {
            for shard in 0..config.shards.max(1) {
                tx.execute("INSERT INTO stream_shards (shard) VALUES (?1)", [shard]).map_err(classify)?;
            }
        }
        tx.commit().map_err(classify)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `f` on the connection on a blocking thread.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| SluiceError::retryable(ReasonCode::Internal, format!("store task: {e}")))?
        .map_err(classify)
    }

    /// Runs `f` inside a write transaction taken up front.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await
    }
}

/// Every SQLite failure is worth retrying: locks clear, disks get space back. A malformed
/// database is not, but retrying it costs only time and then the message is redriven.
fn classify(error: rusqlite::Error) -> SluiceError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            SluiceError::retryable(ReasonCode::StoreBusy, error.to_string())
        }
        _ => SluiceError::retryable(ReasonCode::StoreUnavailable, error.to_string()),
    }
}

/// `?1, ?2, …, ?n` for an `IN (…)` list.
pub(crate) fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
}
