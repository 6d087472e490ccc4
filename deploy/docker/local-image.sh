#!/usr/bin/env bash
# Builds the image of deploy/docker/Dockerfile (its runtime stage, verbatim) with podman on a
# machine that can pull no image, and runs the four workers in it against a local AWS stand-in:
# the base is Debian 12 made by debootstrap (distroless's cc-debian12 is Debian 12 too), the
# binaries are built outside (`cargo build --release --workspace`). The containers run as ECS
# runs the tasks: read-only root, a tmpfs on /tmp, user 65532, configuration by environment
# only; they drain a pipeline, pass their health check, and exit 0 on `podman stop` (SIGTERM).
#
#   deploy/docker/local-image.sh [BIN_DIR]     (default ${CARGO_TARGET_DIR:-target}/release)
#
# Needs, as root on Debian: apt-get install podman runc debootstrap; moto_server on PATH
# (scripts/test installs it in ~/.cache/sluice-tools/aws). Not part of scripts/test: it fetches
# a Debian base system and needs a container runtime.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release}")
cache="${SLUICE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice-tools}/image"
# runc, not crun: crun refuses hybrid cgroup v1/v2 hosts (this sandbox is one). The ulimits stay
# under the host's hard limits, which podman's defaults exceed here.
podman=(podman --runtime runc)
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
base=localhost/sluice-base:bookworm
image=localhost/sluice:local
work=$(mktemp -d)
names=()
cleanup() {
  ((${#names[@]})) && "${podman[@]}" rm -f "${names[@]}" >/dev/null 2>&1
  [[ -n "${moto:-}" ]] && kill "$moto" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

if ! "${podman[@]}" image exists "$base"; then
  mkdir -p "$cache"
  [[ -x "$cache/rootfs/bin/sh" ]] ||
    debootstrap --variant=minbase --include=ca-certificates bookworm "$cache/rootfs" http://deb.debian.org/debian
  tar -C "$cache/rootfs" -c . | "${podman[@]}" import - "$base" >/dev/null
fi

# The binaries as an image of their own, where the Dockerfile's runtime stage takes them from.
mkdir -p "$work/out/bin"
for binary in sluice sluice-ingest sluice-features sluice-inference sluice-results sluice-api; do
  strip -o "$work/out/bin/$binary" "$bin/$binary" # as the Dockerfile's release profile does
done
printf 'FROM scratch\nCOPY out/ /out/\n' | "${podman[@]}" build -q -t localhost/sluice-binaries:local -f - "$work" >/dev/null
"${podman[@]}" build -q --target runtime --build-arg RUNTIME_BASE="$base" \
  --build-arg BINARIES=localhost/sluice-binaries:local -f deploy/docker/Dockerfile -t "$image" . >/dev/null
echo "built $image from deploy/docker/Dockerfile (runtime stage): $("${podman[@]}" image inspect --format '{{.Size}}' "$image") bytes"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
for _ in $(seq 1 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
prefix="local-image-$RANDOM"
aws=(--backend aws --endpoint-url "http://127.0.0.1:$port" --prefix "$prefix")
"$bin/sluice" aws bootstrap "${aws[@]}" >/dev/null 2>&1
"$bin/sluice" produce "${aws[@]}" --digits test >/dev/null 2>&1

environment=(-e SLUICE__STORE__AWS__ENDPOINT_URL="http://127.0.0.1:$port" -e SLUICE__STORE__AWS__PREFIX="$prefix"
  -e SLUICE__STORE__AWS__REGION=us-east-1 -e SLUICE__WORKER__SHUTDOWN_GRACE_MS=20000
  -e AWS_ACCESS_KEY_ID=testing -e AWS_SECRET_ACCESS_KEY=testing -e RUST_LOG=info)
for stage in ingest features inference results; do
  names+=("sluice-local-$stage")
  "${podman[@]}" run -d --name "sluice-local-$stage" --network host --read-only --tmpfs /tmp "${limits[@]}" \
    "${environment[@]}" "$image" "/usr/local/bin/sluice-$stage" >/dev/null
done

for attempt in $(seq 1 600); do
  stats=$("$bin/sluice" stats "${aws[@]}" --json 2>/dev/null)
  if python3 -c 'import json, sys
s = json.loads(sys.argv[1])
done = s["results"] + s["review"] + sum(s["dlq"].values())
sys.exit(0 if s["records_in"] > 0 and done == s["records_in"] else 1)' "$stats"; then break; fi
  if ((attempt == 600)); then echo "the pipeline did not drain within 5 minutes: $stats" >&2; exit 1; fi
  sleep 0.5
done
echo "pipeline: $(python3 -c 'import json, sys; s = json.loads(sys.argv[1]); print(s["records_in"], "in,", s["results"], "results,", s["review"], "review,", sum(s["dlq"].values()), "DLQ")' "$stats")"

for stage in ingest features inference results; do
  name="sluice-local-$stage"
  user=$("${podman[@]}" inspect --format '{{.Config.User}}' "$name")
  "${podman[@]}" exec "$name" "/usr/local/bin/sluice-$stage" --healthcheck
  if "${podman[@]}" exec "$name" /usr/bin/touch /probe 2>/dev/null; then echo "$name: / is writable" >&2; exit 1; fi
  started=$(date +%s.%N)
  "${podman[@]}" stop -t 30 "$name" >/dev/null
  code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$name")
  took=$(python3 -c "print(round($(date +%s.%N) - $started, 1))")
  echo "$name: user $user, health check passed, / read-only, exit $code ${took}s after SIGTERM"
  [[ "$code" == 0 ]] || { "${podman[@]}" logs "$name" | tail -20 >&2; exit 1; }
done
