#!/usr/bin/env python3
"""Where `sluice bench pipeline`'s CPU went while its pipeline ran, from a perf profile.

    perf record -o perf.data -F 1999 --call-graph dwarf,16384 \
        target/release/sluice bench pipeline --records 20000
    perf script -i perf.data --no-inline -F comm,tid,time,ip,sym > perf.txt
    python3 bench/perf_shares.py perf.txt --records 20000

Only the samples between the first and the last one inside a worker's batch (`run_once`) count:
the bare loop and producing the records come before, reading the results back after. Each
sample goes to the first group below whose pattern one of its frames matches, in this order
(the store first: a JSON call under SQLite is SQLite's); what matches none of them goes by its
leaf frame (allocation and copies), then to the scheduler or tokio. `--group NAME` lists that group's most
common leaf frames.
"""

import argparse
import collections
import re

GROUPS = [
    ("bench observer", r"wait_accounted"),
    ("store: checkpoint thread", r"embedded::checkpoint|spawn_checkpoints"),
    ("store: file writes (kernel)", r"(sqlite3|rusqlite)(?s:.*)(pwrite|vfs_write|ext4|copy_folio|filemap)"),
    ("store: SQLite", r"sqlite3|rusqlite"),
    ("model", r"gemm|pulp|direct::kernel|winograd|CandleClassifier|candle_core|candle_nn|sluice_inference::model"),
    ("images: decode, preprocess", r"png::|image::|fdeflate|zune|fast_image_resize|sluice_core::image|vectorise"),
    ("queues: packing (prost)", r"prost|PackedMessage|PackedBatch"),
    ("JSON, base64", r"serde_json|serde_core|serde::|base64"),
    ("metrics, traces", r"metrics|prometheus|tracing"),
]
# After those: a leaf frame that allocates or copies, then the scheduler, then tokio's own.
ALLOC = r"malloc|free|_int_|realloc|memcpy|memmove|memset"
LATER = [
    ("kernel: scheduling, futexes", r"futex|schedule|finish_task_switch|_raw_spin|sched|syscall|epoll|irq"),
    ("tokio", r"tokio"),
]


def samples(path):
    """(time, frames leaf first) for every sample of `perf script`'s output."""
    frames, at = None, None
    for line in open(path, errors="replace"):
        if not line.strip():
            if frames is not None:
                yield at, frames
            frames = None
        elif not line[0].isspace():
            at, frames = float(line.split()[2].rstrip(":")), []
        else:
            parts = line.split(None, 1)
            frames.append(re.sub(r"::h[0-9a-f]{16}$", "", parts[-1].strip()))
    if frames is not None:
        yield at, frames


def group(frames):
    joined = "\n".join(frames)
    for name, pattern in GROUPS:
        if re.search(pattern, joined):
            return name
    if frames and re.search(ALLOC, frames[0]):
        return "allocation, copies"
    for name, pattern in LATER:
        if re.search(pattern, joined):
            return name
    return "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("perf_script_output")
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1999, help="perf record's -F")
    parser.add_argument("--group", help="list this group's most common leaf frames")
    args = parser.parse_args()
    all_samples = list(samples(args.perf_script_output))
    inside = [t for t, frames in all_samples if any("Worker::run_once" in f for f in frames)]
    if not inside:
        raise SystemExit("no sample inside a worker's batch: was it `sluice bench pipeline`, with call graphs?")
    start, end = min(inside), max(inside)
    window = [frames for t, frames in all_samples if start <= t <= end]
    seconds = len(window) / args.rate
    print(f"pipeline {end - start:.2f} s, {seconds / (end - start):.2f} cores busy, "
          f"{1e6 * seconds / args.records:.1f} µs of CPU a record")
    counts = collections.Counter(group(frames) for frames in window)
    for name, n in counts.most_common():
        print(f"  {100 * n / len(window):5.1f}%  {1e6 * n / args.rate / args.records:6.2f} µs a record  {name}")
    if args.group:
        leaves = collections.Counter(frames[0] for frames in window if frames and group(frames) == args.group)
        for leaf, n in leaves.most_common(20):
            print(f"{n:6d}  {leaf[:120]}")


if __name__ == "__main__":
    main()
