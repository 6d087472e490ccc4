#!/usr/bin/env python3
"""What the embedded store's write-ahead log holds: its frames (page images) by the kind of page,
and so by table or index, a record.

A frame is a page written by a commit; a page written by ten commits is ten frames. Each frame is
told by its own content (the b-tree page type and the column types of its first cell), so pages
freed and reused by another table are counted as what they were when written. Keep the log of a
run whole: no checkpoint may start it over while it runs, and the store deletes it on closing, so
link it while the run is on:

    SLUICE__STORE__CHECKPOINT_INTERVAL_MS=100000000 SLUICE__MODEL__DIR=models/digits RUST_LOG=warn \\
        target/release/sluice bench pipeline --records 20000 --json > run.json &
    until ln /tmp/.tmp*/bench.sqlite-wal bench.wal 2>/dev/null; do sleep 0.05; done; wait
    python3 bench/wal_pages.py bench.wal --records 20000

(The log then also holds the stream the bench writes before its pipeline starts: "stream
records" and its index.)
"""

import argparse
import collections
import struct

# The first cell's column types (N null, I integer, T text, B blob) of each b-tree of
# core/src/backend/embedded/schema.sql; an index entry ends in the row's rowid.
KINDS = {
    "index leaf TI": "features and results: record-id indexes (unique)",
    "index interior TI": "features and results: record-id indexes (upper levels)",
    "table leaf TBI": "features: rows",
    "table leaf TTTI": "results: rows",
    "index leaf ITI": "results: by time",
    "index leaf TITI": "results: by status and time",
    "table leaf NB": "queues: batches (rows)",
    "overflow or free": "queues: batches' message bodies (overflow pages), free pages",
    "index leaf IIITIIINN": "queues: runs",
    "index leaf IIITIIIIN": "queues: runs",
    "index leaf TIII": "queues: runs ready",
    "table leaf NITBI": "stream records (the producer, before the pipeline)",
    "index leaf III": "stream records by shard",
    "table leaf NTIII": "stream shards (leases, checkpoints)",
    "table leaf TTTIT": "page 1 (schema and file header)",
    "table leaf TI": "sqlite_sequence (AUTOINCREMENT)",
}


def varint(b, i):
    v = 0
    for k in range(9):
        c = b[i + k]
        if k == 8:
            return (v << 8) | c, i + 9
        v = (v << 7) | (c & 0x7F)
        if c < 0x80:
            return v, i + k + 1
    raise ValueError("varint")


def column_types(page, cell, table_leaf):
    _, i = varint(page, cell)  # payload size
    if table_leaf:
        _, i = varint(page, i)  # rowid
    header, j = varint(page, i)
    end, kinds = i + header, []
    while j < end and len(kinds) < 12:
        t, j = varint(page, j)
        kinds.append("N" if t == 0 else "I" if t < 10 else "B" if t % 2 == 0 else "T")
    return "".join(kinds)


def kind(page, number):
    at = 100 if number == 1 else 0
    page_type = page[at]
    names = {0x0D: "table leaf", 0x05: "table interior", 0x0A: "index leaf", 0x02: "index interior"}
    if page_type not in names:
        return "overflow or free"
    cells = struct.unpack(">H", page[at + 3 : at + 5])[0]
    if page_type == 0x05 or cells == 0:
        return names[page_type] + ("" if cells else " (empty)")
    header = 8 if page_type in (0x0A, 0x0D) else 12
    cell = struct.unpack(">H", page[at + header : at + header + 2])[0]
    if page_type == 0x02:
        cell += 4  # the left child's page number
    return f"{names[page_type]} {column_types(page, cell, page_type == 0x0D)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wal")
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    data = open(args.wal, "rb").read()
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    frames, pages, commits = collections.Counter(), collections.defaultdict(set), 0
    at = 32
    # Frames past the last whole one, or of an earlier use of the file (other salts), do not count.
    while at + 24 + page_size <= len(data) and data[at + 8 : at + 16] == salts:
        number, commit_size = struct.unpack(">II", data[at : at + 8])
        k = kind(data[at + 24 : at + 24 + page_size], number)
        frames[k] += 1
        pages[k].add(number)
        commits += commit_size != 0
        at += 24 + page_size
    total = sum(frames.values())
    print(f"{total} frames of {page_size} bytes in {commits} commits: {total / args.records:.2f} pages a record")
    print(f"{'frames':>8} {'a record':>9} {'pages':>7}  what")
    for k, n in frames.most_common():
        print(f"{n:8d} {n / args.records:9.3f} {len(pages[k]):7d}  {KINDS.get(k, k)}")


if __name__ == "__main__":
    main()
