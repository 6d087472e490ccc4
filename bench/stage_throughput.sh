#!/usr/bin/env bash
# Per-task throughput of each stage, the figure docs/deploy.md sizes ECS services from: one
# worker process of one stage at a time drains the backlog the stage before it left, digits
# model. Prints records/s per stage and, on AWS, the stage's AWS requests per record (JSON with
# --json).
#
#   bench/stage_throughput.sh [BIN_DIR] [--json]    (BIN_DIR default target/release;
#                                                     REPEAT=30: 30 × 355 held-out digits)
#
# PHOTOS=1 writes the digits as photo-sized JPEGs (`sluice produce --photos`), for an image model
# such as ResNet-18 (SLUICE__MODEL__DIR); STAGES="ingest features" runs only those stages.
#
# On the embedded store by default; with SLUICE_BENCH_AWS_ENDPOINT=http://127.0.0.1:PORT (moto
# server), on fresh AWS resources there (keep REPEAT small: moto's SQS is slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-target}/release}
json=false
[[ "${2:-}" == --json || "${1:-}" == --json ]] && json=true
[[ "$bin" == --json ]] && bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
export SLUICE__STORE__PATH="$dir/stages.sqlite" RUST_LOG=warn
if [[ -n "${SLUICE_BENCH_AWS_ENDPOINT:-}" ]]; then
  export SLUICE__STORE__BACKEND=aws SLUICE__STORE__AWS__ENDPOINT_URL="$SLUICE_BENCH_AWS_ENDPOINT" \
    SLUICE__STORE__AWS__PREFIX="bench-stages-$RANDOM$RANDOM" AWS_ACCESS_KEY_ID=testing \
    AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
  "$bin/sluice" aws bootstrap >/dev/null
fi
requests() { "$bin/sluice" stats --json | python3 -c 'import json,sys; print(sum(json.load(sys.stdin).get("aws_requests", {}).values()))'; }

photos=()
[[ "${PHOTOS:-0}" == 1 ]] && photos=(--photos)
"$bin/sluice" produce --digits test ${photos[@]+"${photos[@]}"} --repeat "${REPEAT:-30}" >/dev/null
records=$("$bin/sluice" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["stream"]["pending"])')

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
for stage in ${STAGES:-ingest features inference results}; do
  before=$(requests)
  start=$(date +%s.%N)
  "$bin/sluice-$stage" &
  pid=$!
  until drained "$stage"; do
    kill -0 "$pid" 2>/dev/null || { echo "sluice-$stage (in $bin) stopped before its input was used up" >&2; exit 1; }
    sleep 0.1
  done
  end=$(date +%s.%N)
  kill -TERM "$pid"
  wait "$pid"
  rate=$(python3 -c "print(round($records / ($end - $start)))")
  per_record=$(python3 -c "print(round(($(requests) - $before) / $records, 3))")
  results+=("\"$stage\": {\"records_per_s\": $rate, \"aws_requests_per_record\": $per_record}")
  $json || printf '%-10s %8s records/s  %6s AWS requests/record  (%s records, one process, %s cores)\n' \
    "$stage" "$rate" "$per_record" "$records" "$(nproc)"
done
$json && echo "{\"records\": $records, \"cores\": $(nproc), $(IFS=,; echo "${results[*]}")}"
exit 0
