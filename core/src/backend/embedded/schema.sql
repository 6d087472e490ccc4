-- The embedded store: one SQLite file in WAL mode, shared by every worker process.

CREATE TABLE IF NOT EXISTS stream_records (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    shard         INTEGER NOT NULL,
    partition_key TEXT    NOT NULL,
    data          BLOB    NOT NULL,
    arrived_ms    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_records_by_shard ON stream_records (shard, seq);

-- One row per shard: its lease and its checkpoint (the last sequence durably handled).
CREATE TABLE IF NOT EXISTS stream_shards (
    shard            INTEGER PRIMARY KEY,
    lease_owner      TEXT,
    lease_counter    INTEGER NOT NULL DEFAULT 0,
    lease_expires_ms INTEGER NOT NULL DEFAULT 0,
    checkpoint       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS messages (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    queue             TEXT    NOT NULL,
    body              BLOB    NOT NULL,
    attributes        TEXT    NOT NULL,
    dedup_key         TEXT,
    receive_count     INTEGER NOT NULL DEFAULT 0,
    visible_at_ms     INTEGER NOT NULL,
    sent_at_ms        INTEGER NOT NULL,
    first_received_ms INTEGER
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at_ms, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages (queue, dedup_key) WHERE dedup_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS features (
    record_id  TEXT PRIMARY KEY,
    vector     BLOB    NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS results (
    record_id  TEXT PRIMARY KEY,
    status     TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
-- Listing by time (`sluice results`, the API), with or without a status; counting by status
-- scans the second. A store made before 2026-11-28 also has results_by_status (status,
-- record_id), which no query used and every result write kept up to date: it goes (an older
-- build opening the store builds it again; docs/operations.md says to run one version at a time).
CREATE INDEX IF NOT EXISTS results_by_time ON results (created_ms, record_id);
CREATE INDEX IF NOT EXISTS results_by_status_time ON results (status, created_ms, record_id);
DROP INDEX IF EXISTS results_by_status;

CREATE TABLE IF NOT EXISTS blobs (
    id   TEXT PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
