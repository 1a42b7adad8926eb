#!/usr/bin/env bash
# turbine vs diffusers on the CPU, side by side: the full SDXL-Turbo architecture with the same
# fixed-seed random weights (diffusers writes them in the Hub layout under target/, ~14 GB of
# f32; turbine loads those files, which doubles as the full-size loading test), 512x512, 1 step,
# f32, the same prompt, initial latents and thread count, alternating runs. Prints seconds per
# image for each, the ratio, and the max/mean pixel difference between the two images.
#
#   scripts/compare_cpu.sh [--threads N] [--rounds R] [--runs N] [--warmup N] [--append-results]
#
# Python: $TURBINE_BENCH_PYTHON when set (e.g. /work/pyenv/bin/python), else a venv in
# target/bench-venv made once from scripts/bench/requirements.txt. turbine: built here with
# `cargo build --release` unless $TURBINE_BIN points at a binary. --append-results appends the
# result block to benches/RESULTS.md. Needs ~16 GB free disk and ~15 GB free memory (one
# implementation is loaded at a time). Takes ~30-60 minutes on 2 cores (diffusers: ~3 min per image there).
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
append=0
for a in "$@"; do
    case "$a" in
        --append-results) append=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) args+=("$a") ;;
    esac
done

if [[ -n "${TURBINE_BENCH_PYTHON:-}" ]]; then
    py="$TURBINE_BENCH_PYTHON"
else
    venv=target/bench-venv
    if [[ ! -x "$venv/bin/python" ]] || ! cmp -s scripts/bench/requirements.txt "$venv/requirements.txt"; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --upgrade pip
        "$venv/bin/pip" install --quiet -r scripts/bench/requirements.txt
        cp scripts/bench/requirements.txt "$venv/requirements.txt"
    fi
    py="$venv/bin/python"
fi
"$py" -c "import torch, diffusers, transformers" || {
    echo "error: $py lacks torch/diffusers/transformers" >&2; exit 1; }

if [[ -n "${TURBINE_BIN:-}" ]]; then
    bin="$TURBINE_BIN"
else
    cargo build --release --bin turbine
    bin=target/release/turbine
fi

extra=()
if [[ $append == 1 ]]; then
    extra+=(--append-results benches/RESULTS.md)
fi
cmdline="scripts/compare_cpu.sh${*:+ $*}"
exec python3 scripts/bench/compare_cpu.py --python "$py" --turbine "$bin" \
    --command-line "$cmdline" "${args[@]}" "${extra[@]}"
