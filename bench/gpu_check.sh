#!/usr/bin/env bash
# The GPU check: build sluice with `cuda`, check that Candle's CUDA and CPU outputs agree, and
# print Candle's throughput on the GPU (against the CPU) by batch size, for both architectures.
#
#   bench/gpu_check.sh             build, then run (a machine with Rust, the CUDA toolkit and a GPU)
#   bench/gpu_check.sh build       build only; the binary lands in target/gpu-check/sluice
#   bench/gpu_check.sh run [BIN]   run a binary built elsewhere (a GPU machine without Rust)
#
# Building needs nvcc and the CUDA libraries. Without a system toolkit the script installs them
# from PyPI into target/gpu-check/cuda (CUDA 12.x, which a 12.x or 13.0 driver runs), and builds
# PTX for CUDA_COMPUTE_CAP (default 90, H100/H200). Running needs the same libraries: the script
# looks in a system toolkit, then in any Python's nvidia-* packages (PyTorch ships them).
# Extra arguments after `run BIN` go to `sluice bench cuda` (e.g. --batches 1,32 --json).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check
mode="${1:-all}"

cuda_wheels() {
  python3 -m venv "$out/cuda"
  "$out/cuda/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc-cu12==12.8.*" "nvidia-cuda-runtime-cu12==12.8.*" "nvidia-cublas-cu12==12.8.*" \
    "nvidia-curand-cu12==10.3.9.*" "nvidia-cuda-nvrtc-cu12==12.8.*" "nvidia-cuda-cccl-cu12==12.8.*"
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

build() {
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
    export CUDA_ROOT="$(dirname "$(dirname "$(command -v nvcc)")")"
  fi
  # The driver library is only linked against here; the GPU machine's own driver is loaded at run time.
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
    stubs=$(find "$out/cuda" /usr/local/cuda* -path '*stubs/libcuda.so' 2>/dev/null | head -n1 || true)
    [ -n "$stubs" ] && export LIBRARY_PATH="$(dirname "$stubs")${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
  CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" cargo build --release --locked --features cuda --bin sluice
  cp "${CARGO_TARGET_DIR:-target}/release/sluice" "$out/sluice"
  echo "built $out/sluice"
}

run() {
  local bin="${1:-$out/sluice}"
  shift || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
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
    echo "$bin needs the CUDA libraries above; install them (e.g. pip install nvidia-cublas-cu12) or set LD_LIBRARY_PATH" >&2
    exit 1
  fi
  RUST_LOG=warn "$bin" bench cuda --threads "$(nproc)" "$@"
}

case "$mode" in
  build) build ;;
  run) shift; run "$@" ;;
  all) build && run "$out/sluice" ;;
  *) echo "usage: $0 [build | run [BINARY] [bench args]]" >&2; exit 2 ;;
esac
