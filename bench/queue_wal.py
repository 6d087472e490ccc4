#!/usr/bin/env python3
"""How many bytes of write-ahead log one queue hop costs on the embedded store, by phase.

A hop is a send (insert), a receive (update: receive count, visibility) and an acknowledgement
(delete), in transactions of 200 messages (the features and results stages' batch size), over
three queues, with messages the size of the digits pipeline's (a 500-byte body, a traceparent
attribute) and timestamps in epoch milliseconds. Compares the store's queues since late
2026-12-05 (core/src/backend/embedded/schema.sql: a send's messages packed in one batch row,
delivered in runs) with the row per message they had before (`messages`), and with that
layout's bodies in a table of their own, so that a receive rewrites only small rows.

    python3 bench/queue_wal.py                  # bodies of 500 bytes
    python3 bench/queue_wal.py --body-bytes 300

Python's sqlite3 runs the same statements as the store, on the SQLite Python was built with
(3.40 here; the store bundles 3.54), so the bytes are those of the schema and the statements, not
of one SQLite build to the byte; its timings are Python's, not the store's, so only the log bytes
are printed.
"""

import argparse
import os
import sqlite3
import tempfile
from pathlib import Path

SCHEMA = (Path(__file__).resolve().parent.parent / "core/src/backend/embedded/schema.sql").read_text()

# The store's queues before late 2026-12-05: a row per message.
ROWS = """
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, body BLOB NOT NULL,
    attributes TEXT NOT NULL, dedup_key TEXT, receive_count INTEGER NOT NULL DEFAULT 0,
    visible_at_ms INTEGER NOT NULL, sent_at_ms INTEGER NOT NULL, first_received_ms INTEGER);
CREATE INDEX messages_ready ON messages (queue, visible_at_ms, id);
CREATE UNIQUE INDEX messages_dedup ON messages (queue, dedup_key) WHERE dedup_key IS NOT NULL;
"""

SPLIT = """
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, dedup_key TEXT,
    receive_count INTEGER NOT NULL DEFAULT 0, visible_at_ms INTEGER NOT NULL, sent_at_ms INTEGER NOT NULL,
    first_received_ms INTEGER);
CREATE TABLE bodies (id INTEGER PRIMARY KEY, body BLOB NOT NULL, attributes TEXT NOT NULL);
CREATE INDEX messages_ready ON messages (queue, visible_at_ms, id);
CREATE UNIQUE INDEX messages_dedup ON messages (queue, dedup_key) WHERE dedup_key IS NOT NULL;
"""

BATCH, CYCLES, QUEUES = 200, 60, ("features", "inference", "results")
ATTRIBUTES = '{"traceparent":"00-69e1689207d64328a66bcde53cb02253-bc15b6c709a1477f-01"}'


def hop_bytes(layout: str, body: bytes) -> dict:
    split, runs = layout == "split", layout == "runs"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "queue.db")
        conn = sqlite3.connect(path, isolation_level=None)
        # secure_delete as the store has it (SQLite's default, off); Debian builds Python's with it on,
        # which writes every freed page and overstated deletes before 2026-12-05.
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-16384", "wal_autocheckpoint=0",
                       "secure_delete=0"):
            conn.execute(f"PRAGMA {pragma}")
        conn.executescript({"rows": ROWS, "split": SPLIT, "runs": SCHEMA}[layout])
        log = lambda: os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
        phases = {"send": 0, "receive": 0, "ack": 0}

        def transaction(phase, work):
            before = log()
            conn.execute("BEGIN IMMEDIATE")
            result = work()
            conn.execute("COMMIT")
            phases[phase] += log() - before
            return result

        sent, now = 0, 1_764_300_000_000
        for _ in range(CYCLES):
            for queue in QUEUES:
                def send():
                    nonlocal sent
                    if runs:
                        # One batch: the messages packed (lengths and bytes, as protobuf has them).
                        packed = b"".join(len(body).to_bytes(2, "little") + body + ATTRIBUTES.encode()
                                          for _ in range(BATCH))
                        sent += BATCH
                        cur = conn.execute("INSERT INTO queue_batches (data) VALUES (?)", (packed,))
                        conn.execute("INSERT INTO queue_runs (batch, first, count, queue, visible_at_ms, sent_at_ms) "
                                     "VALUES (?, 0, ?, ?, ?, ?)", (cur.lastrowid, BATCH, queue, now, now))
                        return
                    for _ in range(BATCH):
                        key = f"digits-84f8aab7-test-{sent:06d}-0"
                        sent += 1
                        if split:
                            cur = conn.execute(
                                "INSERT INTO messages (queue, dedup_key, visible_at_ms, sent_at_ms) VALUES (?, ?, ?, ?)",
                                (queue, key, now, now))
                            conn.execute("INSERT INTO bodies (id, body, attributes) VALUES (?, ?, ?)",
                                         (cur.lastrowid, body, ATTRIBUTES))
                        else:
                            conn.execute(
                                "INSERT INTO messages (queue, body, attributes, dedup_key, visible_at_ms, sent_at_ms) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (queue, body, ATTRIBUTES, key, now, now))
                transaction("send", send)
            now += 1
            for queue in QUEUES:
                def receive():
                    if runs:
                        taken = conn.execute(
                            "SELECT batch, first, receive_count FROM queue_runs WHERE queue = ? AND visible_at_ms <= ? "
                            "ORDER BY visible_at_ms, batch, first LIMIT ?", (queue, now, BATCH)).fetchall()
                        for batch, first, count in taken:
                            conn.execute("SELECT data FROM queue_batches WHERE id = ?", (batch,)).fetchone()
                            conn.execute(
                                "UPDATE queue_runs SET receive_count = ?, visible_at_ms = ?, "
                                "first_received_ms = COALESCE(first_received_ms, ?) WHERE batch = ? AND first = ?",
                                (count + 1, now + 30_000, now, batch, first))
                        return taken
                    rows = conn.execute(
                        "SELECT id, receive_count FROM messages WHERE queue = ? AND visible_at_ms <= ? "
                        "ORDER BY visible_at_ms, id LIMIT ?", (queue, now, BATCH)).fetchall()
                    for id_, count in rows:
                        conn.execute(
                            "UPDATE messages SET receive_count = ?, visible_at_ms = ?, "
                            "first_received_ms = COALESCE(first_received_ms, ?) WHERE id = ?",
                            (count + 1, now + 30_000, now, id_))
                    return rows
                rows = transaction("receive", receive)

                def ack():
                    if runs:
                        for batch, first, _ in rows:
                            conn.execute("DELETE FROM queue_runs WHERE batch = ? AND first = ?", (batch, first))
                            conn.execute("DELETE FROM queue_batches WHERE id = ?", (batch,))
                        return
                    for id_, count in rows:
                        conn.execute("DELETE FROM messages WHERE id = ? AND receive_count = ?", (id_, count + 1))
                        if split:
                            conn.execute("DELETE FROM bodies WHERE id = ?", (id_,))
                transaction("ack", ack)
        conn.close()
        return {phase: total // sent for phase, total in phases.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body-bytes", type=int, default=500, help="each message's body (default 500)")
    body = b"x" * parser.parse_args().body_bytes
    layouts = (("batches and runs (the store's)", "runs"), ("a row per message (before)", "rows"),
               ("rows, bodies split out", "split"))
    for name, layout in layouts:
        phases = hop_bytes(layout, body)
        detail = ", ".join(f"{phase} {size}" for phase, size in phases.items())
        print(f"{name:30} {sum(phases.values()):5} log bytes per message and hop ({detail})")
