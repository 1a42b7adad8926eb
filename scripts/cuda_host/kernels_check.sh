#!/usr/bin/env bash
# Runs every kernel in kernels/ but flash_attn.cu (flash_attn_check.sh has that one) on the host,
# no GPU needed: the kernels' own sources with CUDA's features emulated (scripts/cuda_host/*.h),
# launched as src/ops launches them, against double-precision references of their ops, through
# the f32, f16 and bf16 entry points. Three builds: plain (-O2), AddressSanitizer with UBSan
# (every global and shared-memory access in bounds, every vector access aligned, no signed
# overflow) and ThreadSanitizer (no race inside a block nor between blocks; the cases marked
# small in kernels_check.cpp, which still take every code path). One line per case.
#
# What it checks: indexing, chunking and tails, the reductions and their merges, barrier and
# shuffle placement, shared-memory sizing, the launch arithmetic of src/ops (repeated in
# kernels_check.cpp) and the numerics against the reference. What it cannot: nvcc's code
# generation and FMA contraction, the device's math functions (exp2f, erff, __expf are a few
# ulp from the host's), warp interleavings finer than a barrier, and speed: the CUDA half of
# tests/ops.rs on a GPU does those.
#
#   scripts/cuda_host/kernels_check.sh      (needs g++ >= 12 for _Float16, and x86-64: the
#                                           fibers of host_runtime.h switch stacks in asm)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$here/host_source.sh"

mkdir "$work/kernels"
for k in attn_softmax bias_residual conv_prefill geglu group_norm postprocess upsample; do
    host_kernel_source "$root/kernels/$k.cu" "$work/kernels/$k.cu"
done

build() {
    g++ -std=c++20 -ffp-contract=off -Wall -Wno-unknown-pragmas -include "$here/cuda_mock.h" \
        -I"$here" -I"$work/kernels" -I"$root/kernels" "$@" "$here/kernels_check.cpp"
}
# In parallel: the ASan build alone takes ~20 s.
pids=()
build -O2 -o "$work/plain" & pids+=($!)
build -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -o "$work/asan" & pids+=($!)
build -O1 -g -fsanitize=thread -o "$work/tsan" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done

echo "== plain"; "$work/plain"
echo "== AddressSanitizer + UBSan"; UBSAN_OPTIONS=print_stacktrace=1 "$work/asan"
echo "== ThreadSanitizer"; TSAN_OPTIONS=halt_on_error=1 "$work/tsan" --small
