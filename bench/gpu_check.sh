#!/usr/bin/env bash
# The GPU check: build sluice with `cuda`, check that Candle's CUDA and CPU outputs agree, and
# print, for both architectures and every precision (f32, tf32, f16, bf16), Candle CUDA against
# Candle CPU (every core) and against PyTorch eager on the same GPU (bench/torch_runner.py with
# the machine's own PyTorch and torchvision), by batch size, with each precision's agreement with
# the CPU's f32 outputs (max relative error, top-1 agreement). About 2-3 minutes on an H100.
#
#   bench/gpu_check.sh             build, then run (a machine with Rust, the CUDA toolkit and a GPU)
#   bench/gpu_check.sh build       build only: target/gpu-check/sluice, and sluice.gz to carry
#   bench/gpu_check.sh clippy      lint the `cuda` build's code (no GPU needed)
#   bench/gpu_check.sh run [BIN]   run a binary (or its .gz) built elsewhere (a GPU machine
#                                  without Rust), from the repository root
#   bench/gpu_check.sh pipeline [BIN]  the whole pipeline with inference on CUDA against its bare
#                                  loop, store on disk and on tmpfs (issue 13; see pipeline())
#
# Building needs nvcc, the CUDA libraries and cuDNN 9. Without a system toolkit the script installs
# them from PyPI into target/gpu-check/cuda (CUDA 13.0: the newest a 13.0 driver runs), and builds
# for CUDA_COMPUTE_CAP (default 90, H100/H200). On a machine without the NVIDIA driver, the
# binary is linked against a stub libcuda made from cuda.h (as the toolkit's own stubs are); the
# GPU machine's driver is what it loads. Running needs the CUDA 13 libraries (cuBLAS, cuRAND,
# NVRTC, runtime) and cuDNN 9: the script looks in a system toolkit, then in any Python's nvidia
# packages (PyTorch's wheels carry them).
# Extra arguments after `run BIN` go to `sluice bench cuda` (e.g. --batches 1,32 --json).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check
mode="${1:-all}"

cuda_wheels() {
  python3 -m venv "$out/cuda"
  "$out/cuda/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*" \
    "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cudnn-cu13==9.*"  # nvcc does not pin its own parts
}

# A libcuda.so exporting every driver function of cuda.h as an empty one, to link against.
libcuda_stub() {
  local dir="$out/stubs"
  mkdir -p "$dir"
  echo '#include <cuda.h>' | cc -E -P ${CPATH:+-I${CPATH//:/ -I}} - |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
    awk '{ print "void " $1 "(void) {}" }' >"$dir/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$dir/libcuda.c"
  echo "$dir"
}

# Directories of the nvidia-* wheels in the given Python's site-packages.
nvidia_libs() {
  "$1" - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
for root in nvidia.__path__:
    for d in sorted(glob.glob(os.path.join(root, "*"))):
        print(d)
PY
}

# The toolkit (a system one, or the wheels) and a libcuda to link against, in the environment.
cuda_env() {
  mkdir -p "$out"
  if ! command -v nvcc >/dev/null; then
    [ -x "$out/cuda/bin/python" ] || cuda_wheels
    local dirs
    dirs=$(nvidia_libs "$out/cuda/bin/python")
    for d in $dirs; do
      [ -d "$d/bin" ] && export PATH="$d/bin:$PATH"
      [ -d "$d/include" ] && export CPATH="$d/include${CPATH:+:$CPATH}"
      if [ -d "$d/lib" ]; then
        # The wheels ship versioned sonames only; the linker wants the plain names.
        for so in "$d"/lib/lib*.so.*; do
          [ -e "$so" ] || continue
          plain="${so%%.so.*}.so"
          [ -e "$plain" ] || ln -s "$(basename "$so")" "$plain"
        done
        export LIBRARY_PATH="$d/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
        export LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      fi
    done
    CUDA_ROOT="$(dirname "$(dirname "$(command -v nvcc)")")"
    export CUDA_ROOT CUDA_HOME="$CUDA_ROOT"
  fi
  # The driver library is only linked against here; the GPU machine's own driver is loaded at run time.
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
    stubs=$(find /usr/local/cuda*/ -path '*stubs/libcuda.so' 2>/dev/null | head -n1 || true)
    if [ -n "$stubs" ]; then stubs=$(dirname "$stubs"); else stubs=$(libcuda_stub); fi
    export LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
}

build() {
  cuda_env
  cargo build --release --locked --features cuda --bin sluice
  cp "${CARGO_TARGET_DIR:-target}/release/sluice" "$out/sluice"
  # Stripped and compressed (about 30 MB) it travels to a GPU machine that cannot build it.
  strip "$out/sluice"
  gzip -1 -k -f "$out/sluice"
  echo "built $out/sluice and $out/sluice.gz"
}

# The binary to run: `$1`, unpacked where it is a .gz (into the variable `bin`), with the CUDA
# libraries it loads found.
runtime_env() {
  bin="$1"
  if [[ "$bin" == *.gz ]]; then
    gunzip -c "$bin" >"${TMPDIR:-/tmp}/sluice-cuda" && chmod +x "${TMPDIR:-/tmp}/sluice-cuda"
    bin="${TMPDIR:-/tmp}/sluice-cuda"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: no NVIDIA driver here" >&2
  for python in python3 "$out/cuda/bin/python"; do
    command -v "$python" >/dev/null || continue
    for d in $(nvidia_libs "$python"); do
      [ -d "$d/lib" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d/lib"
    done
  done
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
  done
  if ldd "$bin" | grep 'not found'; then
    echo "$bin needs the CUDA libraries above; install the CUDA 13 toolkit and cuDNN 9 or their wheels (pip install nvidia-cublas==13.0.* nvidia-curand==10.4.0.* nvidia-cuda-runtime==13.0.* nvidia-cudnn-cu13==9.*), or set LD_LIBRARY_PATH" >&2
    exit 1
  fi
}

run() {
  runtime_env "${1:-$out/sluice}"
  shift || true
  # One second a batch size and runtime keeps the whole run inside a device session's budget;
  # a --min-seconds among the extra arguments replaces it (clap takes the option once).
  local min_seconds=(--min-seconds 1)
  [[ " $* " == *" --min-seconds"* ]] && min_seconds=()
  RUST_LOG=warn "$bin" bench cuda --threads "$(nproc)" ${min_seconds[@]+"${min_seconds[@]}"} "$@"
}

# Issue 13 on the GPU machine: the whole pipeline against its bare loop with inference on CUDA,
# ResNet-18 (torchvision's seeded random initialisation, made with the machine's PyTorch) on
# photo-sized JPEGs and the digits CNN on its PNGs, with the store on the machine's disk and then on tmpfs (/dev/shm), and the disk's
# sequential write speed and fsync time beside them: a pipeline that speeds up on tmpfs waits on
# the disk. About 2-3 minutes on an H100 before the photos (RESNET_RECORDS=3000, DIGITS_RECORDS=10000
# a run); a ResNet-18 run on photos writes ~2 GB to the store (645 KiB a record): lower
# RESNET_RECORDS if the device time is short.
pipeline() {
  runtime_env "${1:-$out/sluice}"
  local dir store
  dir=$(mktemp -d)
  # Expanded now: the function's locals are gone by the time the script exits.
  trap "rm -rf -- '$dir'" EXIT
  python3 - "$dir" <<'PY'
import sys, torch, torchvision
from safetensors.torch import save_file
torch.manual_seed(0)
m = torchvision.models.resnet18()
save_file({k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}, f"{sys.argv[1]}/w.safetensors")
open(f"{sys.argv[1]}/labels.txt", "w").write("".join(f"class{i}\n" for i in range(1000)))
PY
  "$bin" bundle resnet18 --weights "$dir/w.safetensors" --labels "$dir/labels.txt" --out "$dir/r18" >/dev/null
  python3 - "${TMPDIR:-/tmp}" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "sluice-disk-check")
with open(path, "wb") as f:
    start = time.monotonic()
    for _ in range(256):
        f.write(b"\0" * (1 << 20))
    os.fsync(f.fileno())
    mib_s = 256 / (time.monotonic() - start)
    start = time.monotonic()
    for _ in range(100):
        f.write(b"\0" * 4096)
        os.fsync(f.fileno())
    fsync_ms = (time.monotonic() - start) * 10
os.remove(path)
print(f"disk under {sys.argv[1]}: {mib_s:.0f} MiB/s written (256 MiB, one fsync), {fsync_ms:.2f} ms a 4 KiB write + fsync")
PY
  for store in "${TMPDIR:-/tmp}" /dev/shm; do
    # Which file system the store is on (where /tmp is itself tmpfs, both runs are).
    df -T "$store" | tail -n 1
    # ResNet-18 on photo-sized JPEGs (480×360, ~90 KB: what it is fed), the digits on their PNGs.
    echo "== store under $store, ResNet-18, photos"
    TMPDIR=$store SLUICE__MODEL__DIR="$dir/r18" RUST_LOG=warn "$bin" bench pipeline --photos --records "${RESNET_RECORDS:-3000}"
    echo "== store under $store, digits"
    TMPDIR=$store SLUICE__MODEL__DIR=models/digits RUST_LOG=warn "$bin" bench pipeline --records "${DIGITS_RECORDS:-10000}"
  done
}

case "$mode" in
  build) build ;;
  # The GPU code's lints (it is not compiled without `cuda`); release, to reuse the build's kernels.
  clippy) cuda_env && cargo clippy --release --locked --features cuda -p sluice-inference -p sluice-cli -- -D warnings ;;
  run) shift; run "$@" ;;
  pipeline) shift; pipeline "$@" ;;
  all) build && run "$out/sluice" ;;
  *) echo "usage: $0 [build | clippy | run [BINARY] [bench args] | pipeline [BINARY]]" >&2; exit 2 ;;
esac
