#!/usr/bin/env bash
# Builds the stripped release `turbine` binary with CUDA + cuDNN for one GPU architecture, on a
# machine with or without a GPU, and prints its size.
#
#   [CUDA_COMPUTE_CAP=90] bash scripts/build_cuda.sh      # -> target/cuda-release/turbine
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
# Its size must stay well under the 64 MiB that can be carried to the GPU test machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
bash scripts/setup_cuda_toolkit.sh
# shellcheck source=/dev/null
source target/cuda13/env.sh

cargo build --release --locked --features cuda,cudnn --target-dir target/cuda-build --bin turbine
mkdir -p target/cuda-release
strip -o target/cuda-release/turbine target/cuda-build/release/turbine
size=$(stat -c %s target/cuda-release/turbine)
echo "built target/cuda-release/turbine for CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP: $((size / 1024 / 1024)) MiB ($size bytes)"
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
  echo "error: the binary is over 60 MiB and cannot be carried to the GPU machine" >&2
  exit 1
fi
