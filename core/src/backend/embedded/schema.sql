-- The embedded store: one SQLite file in WAL mode, shared by every worker process.
-- A change here (or to what a table's rows hold) is a new layout: raise `LAYOUT` in mod.rs.

CREATE TABLE IF NOT EXISTS stream_records (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    shard         INTEGER NOT NULL,
    partition_key TEXT    NOT NULL,
    data          BLOB    NOT NULL,
    arrived_ms    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_records_by_shard ON stream_records (shard, seq);

-- One row per shard: its lease, its checkpoint (the last sequence durably handled) and how many
-- records it has taken in (replays not counted): records checkpointed and older than
-- `store.stream_retention_hours` are deleted, so the log cannot count them. A store made before
-- 2026-12-07 has no `arrived`: `connect` adds it, counted from the log.
CREATE TABLE IF NOT EXISTS stream_shards (
    shard            INTEGER PRIMARY KEY,
    lease_owner      TEXT,
    lease_counter    INTEGER NOT NULL DEFAULT 0,
    lease_expires_ms INTEGER NOT NULL DEFAULT 0,
    checkpoint       INTEGER NOT NULL DEFAULT 0,
    arrived          INTEGER NOT NULL DEFAULT 0
);

-- The work queues (queue.rs): each send's messages packed in one batch row, written once; what is
-- left of a batch to deliver in runs, each a stretch of a batch's messages with one visibility
-- time and receive count. A store made before them (late 2026-12-05) had a row per message
-- (`messages`); `connect` moves them.
CREATE TABLE IF NOT EXISTS queue_batches (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    data BLOB    NOT NULL
);

CREATE TABLE IF NOT EXISTS queue_runs (
    batch             INTEGER NOT NULL,
    first             INTEGER NOT NULL,
    count             INTEGER NOT NULL,
    queue             TEXT    NOT NULL,
    receive_count     INTEGER NOT NULL DEFAULT 0,
    visible_at_ms     INTEGER NOT NULL,
    sent_at_ms        INTEGER NOT NULL,
    first_received_ms INTEGER,
    -- Set on a DLQ entry sent with a key (its record id): one entry a record.
    dedup_key         TEXT,
    PRIMARY KEY (batch, first)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_runs_ready ON queue_runs (queue, visible_at_ms);
CREATE UNIQUE INDEX IF NOT EXISTS queue_runs_dedup ON queue_runs (queue, dedup_key) WHERE dedup_key IS NOT NULL;

-- The feature store and the results: rows in the order they arrive (rowid tables), record ids in a
-- unique index. Record ids come in no order the table could follow (content hashes, shard
-- positions, replays), so a table keyed by them (as before 2026-12-05, `WITHOUT ROWID`) took each
-- row of a batch into a different page and every commit rewrote a page per result; appended,
-- a batch's rows share a few pages, and only the index's small entries land apart (pages a
-- digits result wrote: 2.0 before, 0.47 after). `connect` moves a store of the earlier layout.
CREATE TABLE IF NOT EXISTS features (
    record_id  TEXT    NOT NULL UNIQUE,
    vector     BLOB    NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS results (
    record_id  TEXT    NOT NULL UNIQUE,
    status     TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
);
-- Listing by time (`sluice results`, the API), with or without a status; counting by status
-- scans the second. A store made before 2026-11-28 also has results_by_status (status,
-- record_id), which no query used and every result write kept up to date: it goes (an older
-- build opening the store builds it again; docs/operations.md says to run one version at a time).
CREATE INDEX IF NOT EXISTS results_by_time ON results (created_ms, record_id);
CREATE INDEX IF NOT EXISTS results_by_status_time ON results (status, created_ms, record_id);
DROP INDEX IF EXISTS results_by_status;

-- Claim-checked payloads (blobs.rs), named by their content's hash, in the order stored (rowid): one
-- stored again (the same content) moves to the end. Those older than `store.feature_retention_days`
-- that nothing refers to any more are deleted as later ones are stored. A store made before
-- 2026-12-08 kept them keyed by id (`WITHOUT ROWID`) and undated: `connect` moves them, dated then.
CREATE TABLE IF NOT EXISTS blobs (
    id        TEXT    NOT NULL UNIQUE,
    data      BLOB    NOT NULL,
    stored_ms INTEGER NOT NULL
);
