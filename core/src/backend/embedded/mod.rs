//! The embedded backend: every trait over one SQLite file (WAL), safe for several worker
//! processes at once. SQLite serialises writers; each operation is one short transaction, and
//! `BEGIN IMMEDIATE` takes the write lock up front so concurrent receivers never hand out the
//! same message twice.
//!
//! Within one process every handle on a file shares one connection (its page cache stays warm,
//! and stages take turns on a mutex instead of SQLite's sleeping busy handler), and a thread of
//! its own copies the write-ahead log into the database file (checkpoints), so that no writer
//! waits for that copy and its file syncs.

mod blobs;
mod capture;
mod queue;
mod stores;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::{Backend, WorkQueue};
use crate::config::StoreConfig;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::topology::QueueName;

pub use queue::EmbeddedQueue;

const SCHEMA: &str = include_str!("schema.sql");

/// A handle on the store file. Cheap to clone; every handle on one file in a process shares one
/// connection, except those opened [`EmbeddedStore::open_separate`].
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Db,
    config: StoreConfig,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `config.path`, on the connection the process
    /// already has to it, if any.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let db = Db::open(config)?;
        Ok(Self { db, config: config.clone() })
    }

    /// Opens the store on a connection of its own, as another process would: for observers
    /// whose long reads (counts over whole tables) must not hold up the stages' connection, and
    /// for tests of concurrency between processes.
    pub fn open_separate(config: &StoreConfig) -> Result<Self> {
        let db = Db::open_separate(config)?;
        Ok(Self { db, config: config.clone() })
    }

    /// Writes a consistent copy of the store to `to` (`VACUUM INTO`: one read transaction, so
    /// workers may run meanwhile), which must not exist yet. A copy of the file (`cp`) is not one:
    /// the store is in WAL mode, and what was committed since the last checkpoint is in the `-wal`
    /// file beside it, or half in each if the checkpoint ran during the copy. The prediction
    /// capture files (`store.capture.dir`) are files of their own, not in the copy.
    pub async fn backup(&self, to: &std::path::Path) -> Result<()> {
        if to.exists() {
            return Err(SluiceError::permanent(
                ReasonCode::Misconfigured,
                format!("{} exists: a backup is written to a new file", to.display()),
            ));
        }
        let target = to.to_string_lossy().into_owned();
        self.db.call(move |conn| conn.execute("VACUUM INTO ?1", [target]).map(|_| ())).await
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
            features: Arc::new(stores::EmbeddedFeatureStore::new(self.db.clone(), &self.config)),
            results: Arc::new(stores::EmbeddedResultStore::new(self.db.clone())),
            blobs: Arc::new(blobs::EmbeddedBlobStore::new(self.db.clone(), &self.config)),
            requests: Arc::new(NoRequests),
            capture: Arc::new(capture::CaptureFiles::new(&self.config)),
            queues: Arc::new(queues),
            kind: crate::config::BackendKind::Embedded,
        }
    }
}

/// How often what is kept past its retention is deleted (a consumer its shards' stream records,
/// the feature store its vectors), and how much at most in one transaction (every writer waits
/// while it runs): what is left goes at the next chance.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const SWEEP_RECORDS: i64 = 1_000;
const SWEEP_BYTES: i64 = 16 << 20;

/// What a sweep's look at the oldest rows found.
struct Oldest {
    /// The rows to delete: past the retention, and not held.
    gone: Vec<i64>,
    /// The rows past the retention that something still holds.
    held: Vec<i64>,
    /// The last row looked at, if any.
    last: Option<i64>,
    /// Whether the look stopped at its limit: more past the retention may follow `last`.
    full: bool,
}

/// Reads `rows` — (key, written ms, bytes, held), in the order written, at most `limit` of them
/// — up to the first one written at or after `before` or until [`SWEEP_BYTES`] are to go: no
/// more is read than goes. A held row is looked at but kept.
fn oldest_past(mut rows: rusqlite::Rows<'_>, before: i64, limit: i64) -> rusqlite::Result<Oldest> {
    let (mut gone, mut held, mut last, mut looked, mut bytes) = (Vec::new(), Vec::new(), None, 0, 0);
    let full = loop {
        let Some(row) = rows.next()? else { break looked == limit };
        if row.get::<_, i64>(1)? >= before {
            break false;
        }
        if bytes >= SWEEP_BYTES {
            break true;
        }
        let key = row.get(0)?;
        last = Some(key);
        looked += 1;
        if row.get::<_, bool>(3)? {
            held.push(key);
        } else {
            gone.push(key);
            bytes += row.get::<_, i64>(2)?;
        }
    };
    Ok(Oldest { gone, held, last, full })
}

/// When a store that sweeps as it writes (see [`SWEEP_EVERY`]) sweeps: its retention, when it
/// last swept, and whether it stopped at its limit, and where.
struct Sweeps {
    retention_ms: u64,
    swept_ms: AtomicU64,
    /// The last sweep stopped at its limit: the next write sweeps on at once…
    more: AtomicBool,
    /// …after this row.
    after: AtomicI64,
}

/// A sweep a write is to make: of what was written before `before` (ms), from the row after
/// `after`.
struct Sweep {
    before: i64,
    after: i64,
}

impl Sweeps {
    /// `retention_days`: 0 keeps everything.
    fn new(retention_days: u64) -> Self {
        Self {
            retention_ms: retention_days.saturating_mul(24 * 3_600_000),
            swept_ms: AtomicU64::new(0),
            more: AtomicBool::new(false),
            after: AtomicI64::new(0),
        }
    }

    /// The sweep a write at `now` makes too, if one is due (and notes that it is made).
    fn due(&self, now: u64) -> Option<Sweep> {
        let due = self.retention_ms > 0
            && (self.more.load(Ordering::Relaxed)
                || now.saturating_sub(self.swept_ms.load(Ordering::Relaxed)) >= SWEEP_EVERY.as_millis() as u64);
        due.then(|| {
            self.swept_ms.store(now, Ordering::Relaxed);
            Sweep { before: now.saturating_sub(self.retention_ms) as i64, after: self.after.load(Ordering::Relaxed) }
        })
    }

    /// A sweep made: where it stopped at its limit, if it did (the next write goes on after that
    /// row); else the next sweep starts from the oldest again (what was kept may have been let go
    /// meanwhile).
    fn stopped(&self, at: Option<i64>) {
        self.more.store(at.is_some(), Ordering::Relaxed);
        self.after.store(at.unwrap_or(0), Ordering::Relaxed);
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

/// The connection to one store file that every handle in the process shares, used from blocking
/// threads so async workers never stall on a lock.
#[derive(Clone)]
pub(crate) struct Db {
    shared: Arc<Shared>,
}

struct Shared {
    conn: Mutex<Connection>,
    /// Held for its `Drop`.
    _checkpoints: Checkpoints,
}

/// The checkpoint thread of a connection; stopped, and waited for, with the last handle, so
/// that no thread outlives the handles and the last connection to close removes the log file.
struct Checkpoints {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The open store files of this process, by absolute path.
static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<Shared>>>> = LazyLock::new(Mutex::default);

/// A writer checkpoints by itself only past this many log pages (256 MiB of 4 KiB pages): a
/// backstop for when no checkpoint thread keeps up, so the log cannot grow without end.
const WRITER_CHECKPOINT_PAGES: i64 = 65_536;

/// Past this many pages (64 MiB) the checkpoint thread also starts the log over from its
/// beginning, which holds writers up while it waits for readers of the old end (at most
/// `RESTART_WAIT`); below it, a passive checkpoint holds nobody up.
const RESTART_PAST_PAGES: i64 = 16_384;
const RESTART_WAIT: Duration = Duration::from_millis(100);
/// The bytes of write-ahead log kept on disk once it starts over (the restart threshold's 64 MiB).
const JOURNAL_SIZE_LIMIT: i64 = RESTART_PAST_PAGES * 4096;
/// After a restart that readers kept from finishing, the next waits at least this long.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);

impl Db {
    fn open(config: &StoreConfig) -> Result<Self> {
        let key = std::path::absolute(&config.path).map_err(|e| {
            SluiceError::permanent(ReasonCode::StoreUnavailable, format!("{}: {e}", config.path.display()))
        })?;
        let mut open = OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        open.retain(|_, shared| shared.strong_count() > 0);
        if let Some(shared) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(Self { shared });
        }
        let db = Self::open_separate(config)?;
        open.insert(key, Arc::downgrade(&db.shared));
        Ok(db)
    }

    /// A connection of its own, shared with no other `open`.
    fn open_separate(config: &StoreConfig) -> Result<Self> {
        if let Some(parent) = config.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                SluiceError::permanent(ReasonCode::StoreUnavailable, format!("{}: {e}", parent.display()))
            })?;
        }
        let conn = connect(config)?;
        let shards: u32 = conn.query_row("SELECT COUNT(*) FROM stream_shards", [], |r| r.get(0)).map_err(classify)?;
        // Said where someone asked for other shards; the default asks for nothing (every command
        // opening a store made with 8 would say it again).
        if shards != config.shards && config.shards != StoreConfig::default().shards {
            tracing::info!(
                store = %config.path.display(),
                shards,
                configured = config.shards,
                "the store keeps the shards it was made with: store.shards counts only for a new store"
            );
        }
        let checkpointer = connect(config)?;
        checkpointer.busy_timeout(RESTART_WAIT).map_err(classify)?;
        let checkpoints = spawn_checkpoints(checkpointer, Duration::from_millis(config.checkpoint_interval_ms.max(1)))?;
        Ok(Self { shared: Arc::new(Shared { conn: Mutex::new(conn), _checkpoints: checkpoints }) })
    }

    /// Runs `f` on the connection on a blocking thread.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            let mut guard = shared.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
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

/// Opens a connection in WAL mode and creates the schema where it is missing.
fn connect(config: &StoreConfig) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(&config.path, flags).map_err(classify)?;
    conn.busy_timeout(Duration::from_millis(config.busy_timeout_ms)).map_err(classify)?;
    // WAL lets readers run beside the one writer. NORMAL syncs at checkpoints, not every
    // commit: a killed process loses nothing committed; only power loss can lose the last
    // commits.
    conn.pragma_update(None, "journal_mode", "WAL").map_err(classify)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(classify)?;
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES).map_err(classify)?;
    // A log that grew during a backlog is cut back to this when it starts over, rather than
    // kept at its largest size on disk for good.
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT).map_err(classify)?;
    // 16 MiB of page cache (negative: KiB) against SQLite's 2 MiB, for the queues' and tables'
    // hot pages. Not more: each commit scans the cache's hash table for pages past the end of
    // the file, which showed in profiles at 64 MiB.
    conn.pragma_update(None, "cache_size", -16_384).map_err(classify)?;
    // One plan a statement whatever its bound values: else SQLite (3.54) plans a bound `LIMIT ?`
    // as the number bound at the time and re-prepares the statement whenever it is bound again —
    // every queue receive and stream poll, parsed and planned anew while the stages wait for the
    // connection (~4% of its time). No statement here has a plan that depends on its values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(classify)?;
    // Every handle in the process prepares its statements on this one connection (rusqlite
    // keeps 16 by default; the queues, stores and stream have more than that between them).
    conn.set_prepared_statement_cache_capacity(64);
    // `rarray(?)`: a list of any length bound as one value (the stores' look-ups by record id).
    rusqlite::vtab::array::load_module(&conn).map_err(classify)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(classify)?;
    let layout: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(classify)?;
    if layout > LAYOUT {
        return Err(SluiceError::permanent(
            ReasonCode::Misconfigured,
            format!(
                "{} was laid out by a newer sluice (layout {layout}; this build knows up to {LAYOUT}): open it with \
                 that build or a later one (an older one would misread it, or drop what it cannot write)",
                config.path.display()
            ),
        ));
    }
    apply_schema(&tx).map_err(classify)?;
    if layout < LAYOUT {
        tx.pragma_update(None, "user_version", LAYOUT).map_err(classify)?;
    }
    let existing: i64 = tx.query_row("SELECT COUNT(*) FROM stream_shards", [], |r| r.get(0)).map_err(classify)?;
    if existing == 0 {
        for shard in 0..config.shards.max(1) {
            tx.execute("INSERT INTO stream_shards (shard) VALUES (?1)", [shard]).map_err(classify)?;
        }
    }
    tx.commit().map_err(classify)?;
    Ok(conn)
}

/// The layout of the store this build writes, kept in the file (`PRAGMA user_version`): one more
/// with each change to `schema.sql` or to what a table's rows hold, so that an older build opening
/// a store a newer one laid out refuses it rather than misread it. (Builds before 2026-12-08 wrote
/// none, and read none: layout 1 is theirs from 2026-12-08 on.)
const LAYOUT: i64 = 1;

/// A table that stores made before a date kept keyed by id (`WITHOUT ROWID`): `schema.sql` says why
/// each is a rowid table now.
struct OnceKeyed {
    table: &'static str,
    /// Its columns now…
    columns: &'static str,
    /// …what each is copied from, in the old table…
    from: &'static str,
    /// …and in what order rows are copied (the new table's rows are in that order).
    order: &'static str,
}

/// The tables of stores made before 2026-12-05 (features, results) and 2026-12-08 (blobs, which
/// had no time: they are dated as of the move).
const ONCE_KEYED: [OnceKeyed; 3] = [
    OnceKeyed {
        table: "features",
        columns: "record_id, vector, created_ms",
        from: "record_id, vector, created_ms",
        order: "created_ms, record_id",
    },
    OnceKeyed {
        table: "results",
        columns: "record_id, status, body, created_ms",
        from: "record_id, status, body, created_ms",
        order: "created_ms, record_id",
    },
    OnceKeyed {
        table: "blobs",
        columns: "id, data, stored_ms",
        from: "id, data, CAST(unixepoch('subsec') * 1000 AS INTEGER)",
        order: "id",
    },
];
const KEYED_SUFFIX: &str = "_keyed_by_id";

/// Creates what `schema.sql` has and the store lacks, in the caller's transaction, moving the rows
/// of any [`ONCE_KEYED`] table still keyed by record id into the schema's table of that name.
/// Another process opening the store meanwhile waits for the write lock and then finds the new
/// layout.
fn apply_schema(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let keyed = set_aside_keyed_tables(tx)?;
    tx.execute_batch(SCHEMA)?;
    queue::move_message_rows(tx)?;
    stream::count_arrivals(tx)?;
    for OnceKeyed { table, columns, from, order } in keyed {
        tx.execute_batch(&format!(
            "INSERT INTO {table} ({columns}) SELECT {from} FROM {table}{KEYED_SUFFIX} ORDER BY {order}; \
             DROP TABLE {table}{KEYED_SUFFIX};"
        ))?;
    }
    Ok(())
}

/// Renames those of [`ONCE_KEYED`] that are still keyed by record id out of the schema's way and
/// drops their indexes (the schema makes them again under the same names); returns them, for
/// [`apply_schema`] to copy their rows and drop them.
fn set_aside_keyed_tables(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Vec<&'static OnceKeyed>> {
    let mut keyed = Vec::new();
    for keyed_table in &ONCE_KEYED {
        let table = keyed_table.table;
        let sql: Option<String> = tx
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |r| r.get(0))
            .optional()?;
        if !sql.is_some_and(|sql| sql.to_ascii_uppercase().contains("WITHOUT ROWID")) {
            continue;
        }
        tx.execute_batch(&format!("ALTER TABLE {table} RENAME TO {table}{KEYED_SUFFIX}"))?;
        let indexes: Vec<String> = tx
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL")?
            .query_map([format!("{table}{KEYED_SUFFIX}")], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for index in indexes {
            tx.execute_batch(&format!("DROP INDEX \"{index}\""))?;
        }
        tracing::info!(table, "moving the table to the rowid layout (rows in arrival order, ids indexed)");
        keyed.push(keyed_table);
    }
    Ok(keyed)
}

/// Checkpoints on a thread and connection of their own, `every` so long (`store.checkpoint_interval_ms`),
/// until the returned handle is dropped.
///
/// A checkpoint copies the log's pages into the database file and syncs both; left to the
/// writers (SQLite's default, every 1,000 pages), the writer whose commit crosses the mark does
/// it while every other stage waits on the connection — two thirds of the cost of a write here.
/// A passive checkpoint runs beside the writers.
fn spawn_checkpoints(conn: Connection, every: Duration) -> Result<Checkpoints> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("sluice-checkpoint".to_owned())
        .spawn(move || {
            // After a restart that found readers in the way, the next waits this long.
            let mut restart_not_before = Instant::now();
            loop {
                let last = matches!(stopped.recv_timeout(every), Err(RecvTimeoutError::Disconnected));
                match checkpoint(&conn, "PASSIVE") {
                    // Under a steady load a passive checkpoint never catches up with the end of
                    // the log, so the log never starts over; now and then start it over.
                    Ok((_, log_pages)) if log_pages > RESTART_PAST_PAGES && Instant::now() >= restart_not_before => {
                        match checkpoint(&conn, "RESTART") {
                            Ok((false, _)) => {}
                            Ok((true, _)) => restart_not_before = Instant::now() + RESTART_BACKOFF,
                            Err(e) => {
                                tracing::debug!(error = %e, "restarting the log failed; trying again later");
                                restart_not_before = Instant::now() + RESTART_BACKOFF;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "checkpoint failed; trying again"),
                }
                if last {
                    return;
                }
            }
        })
        .map_err(|e| SluiceError::retryable(ReasonCode::StoreUnavailable, format!("checkpoint thread: {e}")))?;
    Ok(Checkpoints { stop: Some(stop), thread: Some(thread) })
}

/// Runs one checkpoint; returns whether readers or writers kept it from finishing, and the
/// pages the log held.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(bool, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get::<_, i64>(0)? != 0, r.get(1)?)))
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

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;

    #[test]
    fn a_statement_bound_anew_is_not_prepared_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { path: dir.path().join("s.sqlite"), ..Default::default() };
        let conn = connect(&config).unwrap();
        // As a receive or a stream poll asks: each time for another number of rows.
        let sql = "SELECT seq FROM stream_records WHERE shard = ?1 ORDER BY seq LIMIT ?2";
        for limit in 1..=3 {
            let mut stmt = conn.prepare_cached(sql).unwrap();
            let rows = stmt.query_map(rusqlite::params![0, limit], |r| r.get::<_, i64>(0)).unwrap();
            assert_eq!(rows.count(), 0);
        }
        let stmt = conn.prepare_cached(sql).unwrap();
        assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "prepared again when bound anew");
    }

    /// A backup taken while the store is written holds what was committed, opens as a store, and
    /// is never written over an existing file.
    #[tokio::test]
    async fn a_backup_is_a_store_of_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { path: dir.path().join("s.sqlite"), ..Default::default() };
        let store = EmbeddedStore::open(&config).unwrap();
        let backend = store.clone().into_backend();
        let result = crate::testing::prediction_result("r-1", "cat", crate::record::ResultStatus::Accepted);
        backend.results.put_if_absent(vec![result.clone()]).await.unwrap();
        let copy = dir.path().join("backup.sqlite");
        store.backup(&copy).await.unwrap();
        // Written after the backup: not in it.
        let later = crate::testing::prediction_result("r-2", "cat", crate::record::ResultStatus::Accepted);
        backend.results.put_if_absent(vec![later]).await.unwrap();

        let restored = EmbeddedStore::open_separate(&StoreConfig { path: copy.clone(), ..Default::default() });
        let ids = [crate::envelope::RecordId::parse("r-1").unwrap(), crate::envelope::RecordId::parse("r-2").unwrap()];
        let found = restored.unwrap().into_backend().results.get_batch(&ids).await.unwrap();
        assert_eq!(found.values().collect::<Vec<_>>(), [&result]);
        let err = store.backup(&copy).await.unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
    }

    /// A store says which layout it has; one a newer build laid out is refused, not misread.
    #[test]
    fn a_store_a_newer_build_laid_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { path: dir.path().join("s.sqlite"), ..Default::default() };
        let conn = connect(&config).unwrap();
        let layout = |conn: &Connection| conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(layout(&conn), LAYOUT);
        conn.pragma_update(None, "user_version", LAYOUT + 1).unwrap();
        drop(conn);
        let err = connect(&config).unwrap_err();
        assert_eq!(err.code(), ReasonCode::Misconfigured, "{err}");
        assert!(err.to_string().contains("laid out by a newer sluice"), "{err}");
        // A store of a build that wrote no layout (0) is given this one.
        let conn = Connection::open(&config.path).unwrap();
        conn.pragma_update(None, "user_version", 0).unwrap();
        drop(conn);
        assert_eq!(layout(&connect(&config).unwrap()), LAYOUT);
    }
}
