#!/usr/bin/env bash
# Builds the stripped release `turbine` binary with CUDA + cuDNN for one GPU architecture, on a
# machine with or without a GPU, and prints its size.
#
#   [CUDA_COMPUTE_CAP=90] bash scripts/build_cuda.sh [--with-tests]
#     -> target/cuda-release/turbine, and with --with-tests target/cuda-release/tests/ops: the
#        tests/ops.rs binary, whose CUDA half compares our kernels with candle compositions
#        (scripts/gpu_check.sh carries and runs target/cuda-release/tests/*; by hand, run it on
#        the GPU machine as `TURBINE_REQUIRE_GPU=1 target/cuda-release/tests/ops`,
#        so that a missing GPU fails instead of skipping; it needs no file from the source tree).
#
# CUDA_COMPUTE_CAP names the GPU the binary is for: 90 (default) for H100/H200, 89 for the
# RTX 4090/L40 class, 80 for A100. candle's kernels are compiled for exactly that architecture
# (sm_90a for 90), and turbine refuses at start-up to run on a GPU of another capability, saying
# which build to make. The CUDA 13.0 toolchain comes from scripts/setup_cuda_toolkit.sh (run here
# if missing). Artifacts go to target/cuda-build, apart from the CPU build's target/{debug,release}.
#
# The binary links dynamically against the CUDA 13 libraries (libcudart, libcublas, libcublasLt,
# libcurand, libnvrtc .so.13/.so.10, libcudnn.so.9) and the driver's libcuda.so.1. On a GPU
# machine without a system toolkit, PyTorch's cu13 wheels carry the same libraries:
#   export LD_LIBRARY_PATH=$(python3 -c 'import nvidia, os; p = list(nvidia.__path__)[0]; \
#     print(":".join(os.path.join(p, d, "lib") for d in sorted(os.listdir(p))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
#   target/cuda-release/turbine generate --device cuda:0 ...
# The GPU test machine has no Rust toolchain, so the binaries are built here and carried there,
# and a carry holds 64 MiB in all: each binary is also written gzipped (`.gz`, about a third of
# its size: most of it is PTX text), to carry and `gunzip` there. The gzipped files together must
# stay under 60 MiB; the script fails otherwise.
set -euo pipefail
WITH_TESTS=0
if [ "${1:-}" = "--with-tests" ]; then
  WITH_TESTS=1
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
bash scripts/setup_cuda_toolkit.sh
# shellcheck source=/dev/null
source target/cuda13/env.sh

CARGO_ARGS=(--release --locked --features cuda,cudnn --target-dir target/cuda-build)
mkdir -p target/cuda-release

CARRY_BYTES=0
# Strips $1 into target/cuda-release/$2 (and $2.gz, not executable, so that whoever collects
# the executables there skips it) and reports the sizes.
install_stripped() {
  mkdir -p "$(dirname "target/cuda-release/$2")"
  strip -o "target/cuda-release/$2" "$1"
  gzip -1 -kf "target/cuda-release/$2"
  chmod -x "target/cuda-release/$2.gz"
  local size gz
  size=$(stat -c %s "target/cuda-release/$2")
  gz=$(stat -c %s "target/cuda-release/$2.gz")
  CARRY_BYTES=$((CARRY_BYTES + gz))
  echo "built target/cuda-release/$2 for CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP: $((size / 1024 / 1024)) MiB ($size bytes), gzipped $((gz / 1024 / 1024)) MiB"
  if [ "$CARRY_BYTES" -gt $((60 * 1024 * 1024)) ]; then
    echo "error: the gzipped binaries are over 60 MiB together and cannot be carried to the GPU machine" >&2
    exit 1
  fi
}

# The commit the binaries are built from, read by scripts/gpu_check.sh --prepare (HEAD at
# packing time may be later than the build).
BUILD_COMMIT="$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- src kernels build.rs Cargo.toml Cargo.lock 2>/dev/null || echo -dirty)"
cargo build "${CARGO_ARGS[@]}" --bin turbine
echo "$BUILD_COMMIT" > target/cuda-release/BUILD_COMMIT
install_stripped target/cuda-build/release/turbine turbine

if [ "$WITH_TESTS" = 1 ]; then
  # The test executable's name carries a hash: take it from cargo's JSON messages.
  exe=$(cargo test "${CARGO_ARGS[@]}" --test ops --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ops" and m.get("executable"):
        print(m["executable"])')
  if [ -z "$exe" ]; then
    echo "error: cargo reported no executable for tests/ops.rs" >&2
    exit 1
  fi
  install_stripped "$exe" tests/ops
fi
