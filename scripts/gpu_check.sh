#!/usr/bin/env bash
# turbine vs diffusers on one GPU, side by side, in ONE call of the `device` tool (H200: no Rust,
# no network, PyTorch in a venv there, 64 MiB carried, 10-minute command limit, 15 minutes of
# device time a session). Everything it measures lands in $OUT: gpu_check.md (the table for
# benches/RESULTS.md), gpu_check.json (every figure), gpu_check.log, and one image of each side.
#
#   scripts/gpu_check.sh --prepare   here: copy the CUDA binary (scripts/build_cuda.sh makes
#                                    target/cuda-release/turbine), the CUDA kernel-test binaries
#                                    (target/cuda-release/tests/*, if any) and the diffusers wheel
#                                    into target/gpu-check/, record the commit, check the size of
#                                    what travels, print the `run` call
#   scripts/gpu_check.sh --dry-run   here, without a GPU: the carry checks, then the whole
#                                    measuring flow on the CPU with the tiny fixture model and a
#                                    CPU build of turbine (target/release/turbine), into
#                                    target/gpu-check-dry/
#   scripts/gpu_check.sh             on the device machine (what the `run` call executes)
#
# The `run` call (timeout_s 480; the script stops itself at $GPU_CHECK_BUDGET_S, default 420):
#   command: bash scripts/gpu_check.sh
#   carry:   ["target/gpu-check"]
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=target/gpu-check
MODE=device
case "${1:-}" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry-run ;;
    "") ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "usage: scripts/gpu_check.sh [--prepare|--dry-run]" >&2; exit 2 ;;
esac

die() { echo "error: $*" >&2; exit 1; }

# Bytes that travel: the working tree (tracked + untracked-not-ignored files) plus the carry dir.
travel_size_check() {
    local tree carry total limit=$((64 * 1024 * 1024))
    tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
    carry=$(find "$CARRY" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    total=$((tree + carry))
    awk -v t="$tree" -v c="$carry" -v d="$CARRY" 'BEGIN {
        printf "travels: working tree %.1f MiB + %s %.1f MiB = %.1f MiB (limit 64 MiB)\n",
            t / 1048576, d, c / 1048576, (t + c) / 1048576 }'
    [ "$total" -lt "$limit" ] || die "what travels is over 64 MiB: strip the binary or carry less"
}

# The carry dir must hold a CUDA build and the diffusers wheel.
carry_check() {
    [ -x "$CARRY/turbine" ] || die "$CARRY/turbine missing: run scripts/build_cuda.sh, then scripts/gpu_check.sh --prepare"
    ls "$CARRY"/wheels/diffusers-*.whl >/dev/null 2>&1 || die "$CARRY/wheels has no diffusers wheel: run --prepare"
    [ -f "$CARRY/BUILD_INFO" ] || die "$CARRY/BUILD_INFO missing: run --prepare"
    # ELF, 64-bit, x86-64 (e_machine 0x3e): what the device machine runs.
    [ "$(od -An -tx1 -j0 -N5 "$CARRY/turbine" | tr -d ' ')" = 7f454c4602 ] \
        && [ "$(od -An -tx1 -j18 -N1 "$CARRY/turbine" | tr -d ' ')" = 3e ] \
        || die "$CARRY/turbine is not an x86-64 ELF executable"
    # A CUDA build links the CUDA libraries; a CPU build here would measure nothing there.
    ldd "$CARRY/turbine" | grep -q "libcublas" || die "$CARRY/turbine does not link cuBLAS: not a --features cuda build"
    # There is no git checkout on the device machine; the size was checked before it travelled.
    [ "$MODE" = device ] || travel_size_check
}

if [ "$MODE" = prepare ]; then
    src=target/cuda-release/turbine
    [ -x "$src" ] || die "$src missing: run scripts/build_cuda.sh first"
    rm -rf "$CARRY/tests"
    mkdir -p "$CARRY/wheels" "$CARRY/tests"
    cp "$src" "$CARRY/turbine"
    strip "$CARRY/turbine" 2>/dev/null || true
    if [ -d target/cuda-release/tests ]; then
        find target/cuda-release/tests -maxdepth 1 -type f -executable -exec cp {} "$CARRY/tests/" \;
    fi
    if ! ls "$CARRY"/wheels/diffusers-0.42.1-*.whl >/dev/null 2>&1; then
        # diffusers is the one package of the reference that the device image lacks (its torch,
        # transformers, accelerate, safetensors and nvidia-ml-py are there); python 3.12 there.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" diffusers==0.42.1 \
            || die "downloading the diffusers wheel failed"
    fi
    {
        echo "commit=$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- . ':!benches/RESULTS.md' || echo -dirty)"
        echo "built=$(date -u -r "$src" '+%Y-%m-%d %H:%M UTC')"
        echo "sha256=$(sha256sum "$CARRY/turbine" | cut -d' ' -f1)"
    } > "$CARRY/BUILD_INFO"
    cat "$CARRY/BUILD_INFO"
    echo "kernel tests carried: $(ls "$CARRY/tests" | wc -l)"
    carry_check
    cat <<'EOF'

Now, with the device tool (one call; nothing else runs there):
  run(command="bash scripts/gpu_check.sh", carry=["target/gpu-check"], timeout_s=480)
then copy $files_at/gpu_check.md into benches/RESULTS.md.
EOF
    exit 0
fi

if [ "$MODE" = dry-run ]; then
    if [ -x "$CARRY/turbine" ]; then
        carry_check || exit 1
    else
        echo "note: $CARRY/turbine not prepared (no CUDA build yet): carry checks skipped" >&2
    fi
    py="${TURBINE_BENCH_PYTHON:-/work/pyenv/bin/python}"
    [ -x "$py" ] || py=target/bench-venv/bin/python
    "$py" -c "import torch, diffusers" || die "$py lacks torch/diffusers (set TURBINE_BENCH_PYTHON)"
    bin="${TURBINE_BIN:-target/release/turbine}"
    if [ -z "${TURBINE_BIN:-}" ]; then
        cargo build --release --bin turbine || die "cargo build --release failed"
    fi
    out=target/gpu-check-dry
    rm -rf "$out"
    mkdir -p "$out"
    set -o pipefail
    "$py" scripts/bench/gpu_check.py --turbine "$bin" --out "$out" --work target/gpu-check-dry/work \
        --config-dir tests/fixtures/tiny-sdxl --device cpu --dtype f32 --size 64x64 \
        --batch-sizes 1,2,4 --diff-batch 4 --budget-s 300 --min-time 0 --skip-compile \
        --commit "$(git rev-parse --short=12 HEAD)" 2>&1 | tee "$out/gpu_check.log"
    rc=$?
    echo "dry run: exit $rc; files in $out: $(ls "$out" | tr '\n' ' ')"
    exit $rc
fi

# --- on the device machine ---------------------------------------------------------------------
: "${OUT:?OUT is not set: this mode runs inside the device tool (use --dry-run here)}"
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== $(date -u) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv || true
carry_check || exit 1
commit=$(sed -n 's/^commit=//p' "$CARRY/BUILD_INFO")

# diffusers into a private target dir; everything else is the image's own torch venv.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/wheels/*.whl || die "installing the carried wheels failed"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, diffusers, transformers, pynvml; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
    || die "the device's python lacks a reference package"

# turbine links the CUDA libraries of the torch venv (cuBLAS, cuRAND, NVRTC, cuDNN).
SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
for d in "$SITE/nvidia/cu13/lib" "$SITE/nvidia/cudnn/lib"; do
    [ -d "$d" ] || echo "warning: $d missing" >&2
done
# cu13/lib and cudnn/lib first (cuBLAS, cuRAND, NVRTC, cudart; cuDNN), then any other wheel's lib.
libs="$SITE/nvidia/cu13/lib:$SITE/nvidia/cudnn/lib"
for d in "$SITE"/nvidia/*/lib; do
    case ":$libs:" in *":$d:"*) ;; *) libs="$libs:$d" ;; esac
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== ldd $CARRY/turbine"
ldd "$CARRY/turbine" | grep -E "cuda|cublas|curand|nvrtc|cudnn|not found"
if ldd "$CARRY/turbine" | grep -q "not found"; then
    die "unresolved libraries (above): the binary and the venv's CUDA libraries disagree"
fi

kernel=""
if ls "$CARRY"/tests/* >/dev/null 2>&1; then
    pass=0; fail=0
    for t in "$CARRY"/tests/*; do
        echo "== kernel tests: $t"
        if timeout 120 "$t" --test-threads=1 2>&1; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
    done
    kernel="$pass binaries passed, $fail failed"
    echo "== kernel tests: $kernel"
else
    kernel="not carried"
fi

# What the kernel tests spent comes off the budget.
used=$SECONDS
python3 scripts/bench/gpu_check.py --turbine "$CARRY/turbine" --out "$OUT" --work /tmp/turbine-gpu-check \
    --budget-s $((BUDGET - used)) --commit "$commit" --kernel-tests "$kernel"
rc=$?
echo "== done in $SECONDS s, exit $rc"
exit $rc
