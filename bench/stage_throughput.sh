#!/usr/bin/env bash
# Per-task throughput of each stage, the figure docs/deploy.md sizes ECS services from: one
# worker process of one stage at a time drains the backlog the stage before it left, on the
# embedded store, digits model. Prints records/s per stage (and JSON with --json).
#
#   bench/stage_throughput.sh [BIN_DIR] [--json]    (BIN_DIR default target/release;
#                                                     REPEAT=30: 30 × 355 held-out digits)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-target}/release}
json=false
[[ "${2:-}" == --json || "${1:-}" == --json ]] && json=true
[[ "$bin" == --json ]] && bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
store="$dir/stages.sqlite"
export SLUICE__STORE__PATH="$store" RUST_LOG=warn

"$bin/sluice" produce --digits test --repeat "${REPEAT:-30}" >/dev/null
records=$("$bin/sluice" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["records_in"])')

# Whether the stage's input is used up (ingest: the stream; the others: their queue).
drained() {
  "$bin/sluice" stats --json | python3 -c '
import json, sys
stage, s = sys.argv[1], json.load(sys.stdin)
queue = {"features": "features", "inference": "inference", "results": "results"}.get(stage)
left = s["stream"]["pending"] if queue is None else sum(s["queues"][queue].values())
sys.exit(0 if left == 0 else 1)' "$1"
}

results=()
for stage in ingest features inference results; do
  start=$(date +%s.%N)
  "$bin/sluice-$stage" &
  pid=$!
  until drained "$stage"; do sleep 0.1; done
  end=$(date +%s.%N)
  kill -TERM "$pid"
  wait "$pid"
  rate=$(python3 -c "print(round($records / ($end - $start)))")
  results+=("\"$stage\": $rate")
  $json || printf '%-10s %8s records/s  (%s records, one process, %s cores)\n' "$stage" "$rate" "$records" "$(nproc)"
done
$json && echo "{\"records\": $records, \"cores\": $(nproc), $(IFS=,; echo "${results[*]}")}"
exit 0
