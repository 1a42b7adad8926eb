#!/usr/bin/env bash
# Runs kernels/flash_attn.cu on the host, no GPU needed: the kernel's own source with CUDA's
# features emulated (scripts/cuda_host/*.h), against double-precision attention. Three builds:
# plain (-O2), AddressSanitizer with UBSan's alignment and other checks (every global read and
# write in bounds, every vector access aligned) and ThreadSanitizer (no shared-memory race
# between the kernel's barriers; a smaller set of shapes).
#
# What it checks: the indexing, tiling, masking, online softmax, barrier placement and wmma
# alignment of the source. What it cannot: nvcc's code generation and the hardware (the CUDA
# half of tests/ops.rs on a GPU does that).
#
#   scripts/cuda_host/flash_attn_check.sh      (needs g++ >= 12 for _Float16, and x86-64: the
#                                              fibers of host_runtime.h switch stacks in asm)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$here/host_source.sh"

host_kernel_source "$root/kernels/flash_attn.cu" "$work/flash_attn_host.cu"

build() {
    g++ -std=c++20 -ffp-contract=off -Wall -Wno-unknown-pragmas -include "$here/cuda_mock.h" \
        -I"$here" -I"$root/kernels" -DFLASH_ATTN_SOURCE="\"$work/flash_attn_host.cu\"" "$@" \
        "$here/flash_attn_check.cpp"
}
build -O2 -o "$work/plain"
build -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -o "$work/asan"
build -O1 -g -fsanitize=thread -o "$work/tsan"

echo "== plain"; "$work/plain"
echo "== AddressSanitizer + UBSan"; "$work/asan"
echo "== ThreadSanitizer"; TSAN_OPTIONS=halt_on_error=1 "$work/tsan" --small
