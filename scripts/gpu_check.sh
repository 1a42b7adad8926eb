#!/usr/bin/env bash
# turbine vs diffusers on one GPU, side by side, in ONE call of the `device` tool (H200: no Rust,
# no network, PyTorch in a venv there, 64 MiB carried, 10-minute command limit, 15 minutes of
# device time a session). Everything it measures lands in $OUT: gpu_check.md (the table for
# benches/RESULTS.md), gpu_check.json (every figure), gpu_check.log, and one image of each side.
#
#   scripts/gpu_check.sh --prepare   here: xz the CUDA binary (scripts/build_cuda.sh makes
#                                    target/cuda-release/turbine) and every other executable in
#                                    target/cuda-release/ (the CUDA kernel-test binaries, e.g.
#                                    ops-test) into target/gpu-check/, add the diffusers wheel,
#                                    record the commit and sha256, check the size of what
#                                    travels (the checkout the session started in, plus the
#                                    carry), print the `run` call
#   scripts/gpu_check.sh --dry-run   here, without a GPU: the carry checks, then the whole
#                                    measuring flow on the CPU with the tiny fixture model and a
#                                    CPU build of turbine (target/release/turbine), into
#                                    target/gpu-check-dry/
#   scripts/gpu_check.sh             on the device machine (what the `run` call executes)
#
# The `run` call (timeout_s 600; the script stops itself at $GPU_CHECK_BUDGET_S, default 555, and
# writes gpu_check.md after every step, so even a run cut short leaves what it measured):
#   command: bash scripts/gpu_check.sh
#   carry:   ["target/gpu-check"]
# The carried CUDA kernel tests run first; a lever whose test fails (alone, in a fresh process) is
# left out of turbine's sweep and ablation, so one broken kernel costs its own figures only.
# GPU_CHECK_KERNELS (default auto: all but those levers) sets turbine's --kernels instead, e.g.
# `all,-flash`. If turbine measures nothing with its kernels, it runs again with candle's ops
# (`--kernels none`) so that the baseline figure is there.
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=target/gpu-check
MODE=device
case "${1:-}" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry-run ;;
    "") ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
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

# An x86-64 ELF executable (e_machine 0x3e) built with CUDA (it links libcudart; cuBLAS, cuRAND,
# NVRTC and cuDNN are opened at run time, so ldd does not list them).
binary_check() {
    [ "$(od -An -tx1 -j0 -N5 "$1" | tr -d ' ')" = 7f454c4602 ] \
        && [ "$(od -An -tx1 -j18 -N1 "$1" | tr -d ' ')" = 3e ] \
        || die "$1 is not an x86-64 ELF executable"
    # (ldd's output is captured first: under pipefail, grep -q closing the pipe early fails it.)
    local deps
    deps=$(ldd "$1" 2>&1)
    [[ "$deps" == *libcudart* ]] || die "$1 does not link libcudart: not a --features cuda build"
}

# xz-compressed binaries travel (PTX-heavy CUDA builds shrink ~8x: 38 MB -> 4.6 MB), so the
# binary, the kernel-test binaries and the diffusers wheel fit beside a 25 MB working tree.
# Python's lzma unpacks them there (no assumption that xz is installed).
unxz_to() {
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2" \
        && chmod +x "$2" || die "cannot unpack $1"
}

# The carry dir must hold the compressed CUDA build, its build info and the diffusers wheel.
carry_check() {
    [ -f "$CARRY/turbine.xz" ] || die "$CARRY/turbine.xz missing: run scripts/build_cuda.sh, then scripts/gpu_check.sh --prepare"
    ls "$CARRY"/wheels/diffusers-*.whl >/dev/null 2>&1 || die "$CARRY/wheels has no diffusers wheel: run --prepare"
    [ -f "$CARRY/BUILD_INFO" ] || die "$CARRY/BUILD_INFO missing: run --prepare"
    # There is no git checkout on the device machine; the size was checked before it travelled.
    [ "$MODE" = device ] || travel_size_check
}

if [ "$MODE" = prepare ]; then
    src=target/cuda-release/turbine
    [ -x "$src" ] || die "$src missing: run scripts/build_cuda.sh first"
    binary_check "$src"
    rm -rf "$CARRY/tests" "$CARRY/turbine.xz"
    mkdir -p "$CARRY/wheels" "$CARRY/tests"
    xz -T0 -9 -c "$src" > "$CARRY/turbine.xz" || die "compressing $src failed"
    # Every other executable in target/cuda-release is a CUDA kernel-test binary (`cargo test
    # --no-run` output, e.g. ops-test): they run first there, with TURBINE_REQUIRE_GPU=1.
    ntests=0
    for t in target/cuda-release/* target/cuda-release/tests/*; do
        [ -f "$t" ] && [ -x "$t" ] && [ "$t" != "$src" ] || continue
        xz -T0 -9 -c "$t" > "$CARRY/tests/$(basename "$t").xz" || die "compressing $t failed"
        ntests=$((ntests + 1))
    done
    if ! ls "$CARRY"/wheels/diffusers-0.42.1-*.whl >/dev/null 2>&1; then
        # diffusers is the one package of the reference that the device image lacks (its torch,
        # transformers, accelerate, safetensors and nvidia-ml-py are there); python 3.12 there.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" diffusers==0.42.1 \
            || die "downloading the diffusers wheel failed"
    fi
    {
        # The commit scripts/build_cuda.sh built from (not HEAD now, which may be later).
        [ -f target/cuda-release/BUILD_COMMIT ] || die "target/cuda-release/BUILD_COMMIT missing: rebuild with scripts/build_cuda.sh"
        echo "commit=$(cat target/cuda-release/BUILD_COMMIT)"
        echo "built=$(date -u -r "$src" '+%Y-%m-%d %H:%M UTC')"
        echo "sha256=$(sha256sum "$src" | cut -d' ' -f1)"
    } > "$CARRY/BUILD_INFO"
    cat "$CARRY/BUILD_INFO"
    echo "kernel-test binaries carried: $ntests"
    carry_check
    cat <<'EOF'

Now, with the device tool (one call; nothing else runs there):
  run(command="bash scripts/gpu_check.sh", carry=["target/gpu-check"], timeout_s=600)
then copy $files_at/gpu_check.md into benches/RESULTS.md.
EOF
    exit 0
fi

if [ "$MODE" = dry-run ]; then
    if [ -f "$CARRY/turbine.xz" ]; then
        carry_check || exit 1
        unxz_to "$CARRY/turbine.xz" target/gpu-check-unpacked
        binary_check target/gpu-check-unpacked
        rm -f target/gpu-check-unpacked
        echo "carry: $CARRY/turbine.xz unpacks to a CUDA build; $(ls "$CARRY/tests" | wc -l) kernel-test binaries"
    else
        echo "note: $CARRY/turbine.xz not prepared (no CUDA build yet): carry checks skipped" >&2
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
    # A fake kernel-test binary with one failing lever (geglu) and one victim test (conv).
    mkdir -p "$out/tests"
    cp scripts/bench/fake_libtest.sh "$out/tests/ops-fake"
    "$py" scripts/bench/gpu_check.py --turbine "$bin" --out "$out" --work target/gpu-check-dry/work \
        --config-dir tests/fixtures/tiny-sdxl --device cpu --dtype f32 --size 64x64 \
        --batch-sizes 1,2,4 --diff-batch 4 --budget-s 600 --min-time 0 --skip-compile \
        --tests-dir "$out/tests" --commit "$(git rev-parse --short=12 HEAD)" 2>&1 | tee "$out/gpu_check.log"
    rc=$?
    echo "dry run: exit $rc; files in $out: $(ls "$out" | tr '\n' ' ')"
    [ "$rc" = 0 ] || exit "$rc"
    # The failing lever was left out of the sweep and the ablation, the victim was not.
    "$py" - "$out/gpu_check.json" <<'PY' || exit 1
import json, sys
r = json.load(open(sys.argv[1]))
kt = r["kernel_tests"]
assert kt["failed"] == ["geglu_matches_composition"] and kt["levers"] == ["geglu"], kt
assert kt["victims"] == ["conv2d_cuda_matches_cpu_reference"], kt
assert r["kernels"] == "all,-geglu", r["kernels"]
t = r["turbine"]
levers = t["kernels"].split(",")
assert "geglu" not in levers and "group-norm" in levers and "overlap" in levers, t["kernels"]
sets = [a["kernels"] for a in t["ablation"]]
assert not any("geglu" in s for s in sets), sets
# The run's set without each of its levers, then the levers that work alone.
without = [a["lever"] for a in t["ablation"] if a["role"] == "without"]
alone = [a["lever"] for a in t["ablation"] if a["role"] == "alone"]
assert without == levers, (without, levers)
assert set(alone) < set(levers) and "group-norm" in alone and "flash" not in alone, alone
assert len(sets) == 2 + len(without) + len(alone), sets
assert not t["failures"], t["failures"]
assert [p["kernels"] for p in t["profiles"]] == [t["kernels"], "none"], t["profiles"]
assert r["eager"]["profile"]["kinds_ms"]["conv"] > 0, r["eager"]["profile"]
print("dry run: kernel tests, lever exclusion and ablation sets as expected")
PY
    exit 0
fi

# --- on the device machine ---------------------------------------------------------------------
: "${OUT:?OUT is not set: this mode runs inside the device tool (use --dry-run here)}"
BUDGET="${GPU_CHECK_BUDGET_S:-555}"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== $(date -u) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv || true
carry_check || exit 1
cat "$CARRY/BUILD_INFO"
commit=$(sed -n 's/^commit=//p' "$CARRY/BUILD_INFO")
BIN=/tmp/turbine-bin
mkdir -p "$BIN/tests"
unxz_to "$CARRY/turbine.xz" "$BIN/turbine"
[ "$(sha256sum "$BIN/turbine" | cut -d' ' -f1)" = "$(sed -n 's/^sha256=//p' "$CARRY/BUILD_INFO")" ] \
    || die "$BIN/turbine does not match the sha256 in BUILD_INFO"
for t in "$CARRY"/tests/*.xz; do
    [ -f "$t" ] && unxz_to "$t" "$BIN/tests/$(basename "$t" .xz)"
done

# diffusers into a private target dir; everything else is the image's own torch venv.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/wheels/*.whl || die "installing the carried wheels failed"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, diffusers, transformers, pynvml; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
    || die "the device's python lacks a reference package"

# turbine uses the CUDA libraries of the torch venv: libcudart through the dynamic linker (ldd
# shows it), cuBLAS/cuBLASLt/cuRAND/NVRTC/cuDNN opened at run time (ldd cannot show them, so
# their files are looked for on the path below).
SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
libs="$SITE/nvidia/cu13/lib:$SITE/nvidia/cudnn/lib"
for d in "$SITE"/nvidia/*/lib; do
    case ":$libs:" in *":$d:"*) ;; *) libs="$libs:$d" ;; esac
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== ldd $BIN/turbine (LD_LIBRARY_PATH: $LD_LIBRARY_PATH)"
ldd "$BIN/turbine"
[[ "$(ldd "$BIN/turbine" 2>&1)" == *"not found"* ]] && echo "WARNING: unresolved libraries above: turbine will not start"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9; do
    found=$(IFS=:; for d in $LD_LIBRARY_PATH; do ls "$d/$lib" 2>/dev/null; done | head -1)
    echo "  $lib => ${found:-NOT FOUND}"
done

# What the steps above spent comes off the budget.
used=$SECONDS
python3 scripts/bench/gpu_check.py --turbine "$BIN/turbine" --out "$OUT" --work /tmp/turbine-gpu-check \
    --budget-s $((BUDGET - used)) --commit "$commit" --tests-dir "$BIN/tests" \
    --kernels "${GPU_CHECK_KERNELS:-auto}"
rc=$?
echo "== done in $SECONDS s, exit $rc"
exit $rc
