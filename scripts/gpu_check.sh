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
#                                    CPU build of turbine (target/release/turbine), torch.compile
#                                    included (GPU_CHECK_DRY_COMPILE=0 leaves it out), into
#                                    target/gpu-check-dry/; with GPU_CHECK_DRY_FULL=1 instead, the
#                                    full architecture from fp16 variant files, bf16, 64x64, the
#                                    parity target judged (target/gpu-check-dry-full/)
#   scripts/gpu_check.sh --rehearse  here, without a GPU: the device machine's own steps up to the
#                                    measuring, with the python of scripts/bench/device_env.sh
#                                    (the device image's versions) as its python3 and the CUDA
#                                    toolkit's libcuda stub as its driver: unpack and check the
#                                    carry, install the wheel, import the reference, find every
#                                    CUDA library in that torch venv, start the CUDA binary (on the
#                                    CPU; on cuda:0 it must fail cleanly) and list the kernel tests
#   scripts/gpu_check.sh             on the device machine (what the `run` call executes)
#   scripts/gpu_check.sh --serve     on the device machine, instead of the above: `turbine serve`
#                                    end to end (scripts/bench/serve_check.py): a random model,
#                                    the time to /health 200 with the warm-up of every batch
#                                    size, the first requests after it, then images/s and p50/
#                                    p95/p99 at 1, 8, 32 and 64 concurrent clients with the mean
#                                    batch the server formed, one streamed 4-step request with two
#                                    previews, then 1000 requests as one Batch API batch whose
#                                    signed webhook is checked; serve_check.md and .json in $OUT
#                                    (budget GPU_CHECK_BUDGET_S, default 240 s here;
#                                    GPU_SERVE_ARGS adds serve_check.py arguments, e.g.
#                                    "--max-batch-size 32 --levels 1,32,64")
#
# The `run` call (timeout_s 600; the script stops itself at $GPU_CHECK_BUDGET_S, default 555, and
# writes gpu_check.md after every step, so even a run cut short leaves what it measured):
#   command: bash scripts/gpu_check.sh
#   carry:   ["target/gpu-check"]
# The carried CUDA kernel tests run first; a lever whose test fails (alone, in a fresh process) is
# left out of turbine's sweep and ablation, so one broken kernel costs its own figures only. The
# reruns get 90 s in all (gpu_check.py --rerun-s); a failed test not rerun by then counts as failed.
# GPU_CHECK_KERNELS (default auto: all but those levers) sets turbine's --kernels instead, e.g.
# `all,-flash`. If turbine measures nothing with its kernels, it runs again with candle's ops
# (`--kernels none`) so that the baseline figure is there. GPU_CHECK_ARGS adds arguments of
# scripts/bench/gpu_check.py (split at spaces), for a shorter run when less device time is left:
#   GPU_CHECK_BUDGET_S=270 GPU_CHECK_ARGS="--skip-compile --ablate-batch 0 --batch-sizes 1,4,8,16,32
#   --rerun-s 20 --tests-reserve-s 170 --eager-s 50" bash scripts/gpu_check.sh
# (no torch.compile, no ablation or profiles: turbine's sweep, eager's, the kernel tests and the
# pixel comparison, about 200 s). `--edit-parity` in GPU_CHECK_ARGS compares an edit with diffusers'
# img2img (the same input and noise, one step at strength 0.5; both sides load the model once
# more: about a minute). `--edit-batch-sizes 1,32` in GPU_CHECK_ARGS also times turbine's
# edits (`bench --edit-strength 0.5`) at those sizes after its sweep (--edit-s, 45 s at most).
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=target/gpu-check
MODE=device
case "${1:-}" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry-run ;;
    --rehearse) MODE=rehearse ;;
    --serve) MODE=serve ;;
    "") ;;
    -h|--help) sed -n '2,56p' "$0"; exit 0 ;;
    *) echo "usage: scripts/gpu_check.sh [--prepare|--dry-run|--rehearse|--serve]" >&2; exit 2 ;;
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
    # The reference's diffusers version is pinned once, in scripts/bench/requirements.txt.
    pin=$(grep -m1 '^diffusers==' scripts/bench/requirements.txt) || die "no diffusers pin in scripts/bench/requirements.txt"
    if ! ls "$CARRY"/wheels/diffusers-"${pin#diffusers==}"-*.whl >/dev/null 2>&1; then
        # diffusers is the one package of the reference that the device image lacks (its torch,
        # transformers, accelerate, safetensors and nvidia-ml-py are there); python 3.12 there.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" "$pin" \
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

First, here, with the CUDA toolkit's env.sh sourced (its libcuda stub stands in for the driver):
  bash scripts/bench/device_env.sh && bash scripts/gpu_check.sh --rehearse
Then, with the device tool (one call; nothing else runs there):
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
    set -o pipefail
    if [ "${GPU_CHECK_DRY_FULL:-0}" = 1 ]; then
        # The full SDXL-Turbo architecture (random weights, written as the fp16 variant files the
        # device run uses), bf16 on both sides, at 64x64 so that the CPU gets through it: the
        # loading of those files and the parity target. ~15 GB of memory, a few minutes.
        out=target/gpu-check-dry-full
        rm -rf "$out"
        mkdir -p "$out"
        "$py" scripts/bench/gpu_check.py --turbine "$bin" --out "$out" --work "$out/work" \
            --config-dir models/sdxl-turbo --device cpu --dtype bf16 --size 64x64 --batch-sizes 4 \
            --diff-batch 4 --ablate-batch 0 --budget-s 1200 --min-time 0 --skip-compile --edit-parity \
            --commit "$(git rev-parse --short=12 HEAD)" 2>&1 | tee "$out/gpu_check.log"
        rc=$?
        [ "$rc" = 0 ] || exit "$rc"
        grep -q "(target: mean <= [0-9.]*: met)" "$out/gpu_check.md" \
            || die "full-architecture dry run: turbine's bf16 images are outside the parity target"
        grep -q "edits, turbine vs diffusers.*(bound: mean <= [0-9.]*: met)" "$out/gpu_check.md" \
            || die "full-architecture dry run: turbine's bf16 edits are outside the parity bound"
        grep "pixels, turbine vs diffusers\|edits, turbine vs diffusers" "$out/gpu_check.md"
        exit 0
    fi
    out=target/gpu-check-dry
    rm -rf "$out"
    mkdir -p "$out"
    # A fake kernel-test binary with one failing lever (geglu) and one victim test (conv).
    mkdir -p "$out/tests"
    cp scripts/bench/fake_libtest.sh "$out/tests/ops-fake"
    # torch.compile on the CPU: a cold inductor compile of the tiny model takes about a minute a
    # batch size on 2 cores, hence its own 300 s (and 900 s in all).
    compile_args=(--compile-s 300)
    [ "${GPU_CHECK_DRY_COMPILE:-1}" = 0 ] && compile_args=(--skip-compile)
    "$py" scripts/bench/gpu_check.py --turbine "$bin" --out "$out" --work target/gpu-check-dry/work \
        --config-dir tests/fixtures/tiny-sdxl --device cpu --dtype f32 --size 64x64 \
        --batch-sizes 1,2,4 --diff-batch 4 --budget-s 900 --min-time 0 "${compile_args[@]}" \
        --edit-batch-sizes 1,2 --edit-parity \
        --tests-dir "$out/tests" --commit "$(git rev-parse --short=12 HEAD)" 2>&1 | tee "$out/gpu_check.log"
    rc=$?
    echo "dry run: exit $rc; files in $out: $(ls "$out" | tr '\n' ' ')"
    [ "$rc" = 0 ] || exit "$rc"
    # The failing lever was left out of the sweep and the ablation, the victim was not.
    "$py" - "$out/gpu_check.json" "${GPU_CHECK_DRY_COMPILE:-1}" <<'PY' || exit 1
import json, sys
r = json.load(open(sys.argv[1]))
if sys.argv[2] != "0":
    # torch.compile measured two batch sizes (fullgraph: a graph break would have failed it).
    c = r.get("compile") or {}
    assert r.get("compile_rc") == 0 and len([x for x in c.get("rows", []) if "images_per_s" in x]) == 2, c
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
# The edit step (--edit-batch-sizes 1,2): a report of edits with a row per batch size.
e = r.get("edits") or {}
assert r.get("edits_rc") == 0 and e.get("edit_strength") == 0.5, (r.get("edits_rc"), e.get("edit_strength"))
assert [x["batch"] for x in e["rows"]] == [1, 2], e["rows"]
# The edit parity step (--edit-parity): f32 on the tiny model, so within a level or two.
d = r.get("edit_pixel_diff") or {}
assert len(d.get("images", [])) == 2 and d["max"] <= 2 and d["mean"] <= 0.5, d
print("dry run: kernel tests, lever exclusion, ablation sets, the edit step and edit parity as expected")
PY
    exit 0
fi

if [ "$MODE" = rehearse ]; then
    py="${TURBINE_BENCH_PYTHON:-target/device-venv/bin/python}"
    [ -x "$py" ] || die "$py missing: run scripts/bench/device_env.sh (a venv of the device image's packages)"
    stub="${CUDA_HOME:-}/lib/stubs/libcuda.so"
    [ -f "$stub" ] || die "no libcuda stub at '$stub': source the CUDA toolkit's env.sh (scripts/setup_cuda_toolkit.sh)"
    carry_check || exit 1
    r=$PWD/target/gpu-check-rehearse
    rm -rf "$r"
    mkdir -p "$r/bin" "$r/driver" "$r/out"
    # The device's `python3` is its torch venv's; its libcuda.so.1 is the driver's (here a stub
    # that links but finds no device).
    # (the venv's own path: resolving its symlink would leave the venv)
    printf '#!/bin/sh\nexec %s "$@"\n' "$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" > "$r/bin/python3"
    chmod +x "$r/bin/python3"
    ln -s "$(realpath "$stub")" "$r/driver/libcuda.so.1"
    env -u LD_LIBRARY_PATH -u PYTHONPATH -u RUST_BACKTRACE OUT="$r/out" PATH="$r/bin:$PATH" GPU_CHECK_REHEARSE="$r" \
        GPU_CHECK_DRIVER_LIBS="$r/driver" bash "$0"
    rc=$?
    echo "rehearsal: exit $rc; log in $r/out/gpu_check.log"
    exit "$rc"
fi

# --- on the device machine ---------------------------------------------------------------------
: "${OUT:?OUT is not set: this mode runs inside the device tool (use --dry-run here)}"
if [ "$MODE" = serve ]; then
    BUDGET="${GPU_CHECK_BUDGET_S:-240}"
    exec > >(tee "$OUT/serve_check.log") 2>&1
else
    BUDGET="${GPU_CHECK_BUDGET_S:-555}"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== $(date -u) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv || true
ldd --version 2>&1 | head -1
carry_check || exit 1
cat "$CARRY/BUILD_INFO"
commit=$(sed -n 's/^commit=//p' "$CARRY/BUILD_INFO")
# (--rehearse runs these steps here, in its own folder.)
REHEARSE="${GPU_CHECK_REHEARSE:-}"
BIN=${REHEARSE:-/tmp}/turbine-bin
SITE_DIR=${REHEARSE:-/tmp}/site
rm -rf "$BIN"
mkdir -p "$BIN/tests"
unxz_to "$CARRY/turbine.xz" "$BIN/turbine"
[ "$(sha256sum "$BIN/turbine" | cut -d' ' -f1)" = "$(sed -n 's/^sha256=//p' "$CARRY/BUILD_INFO")" ] \
    || die "$BIN/turbine does not match the sha256 in BUILD_INFO"
for t in "$CARRY"/tests/*.xz; do
    [ -f "$t" ] && unxz_to "$t" "$BIN/tests/$(basename "$t" .xz)"
done

# diffusers into a private target dir; everything else is the image's own torch venv.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE_DIR" "$CARRY"/wheels/*.whl || die "installing the carried wheels failed"
export PYTHONPATH=$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}
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
export LD_LIBRARY_PATH="$libs${GPU_CHECK_DRIVER_LIBS:+:$GPU_CHECK_DRIVER_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== ldd $BIN/turbine (LD_LIBRARY_PATH: $LD_LIBRARY_PATH)"
ldd "$BIN/turbine"
missing=0
[[ "$(ldd "$BIN/turbine" 2>&1)" == *"not found"* ]] && { missing=1; echo "WARNING: unresolved libraries above: turbine will not start"; }
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9; do
    found=$(IFS=:; for d in $LD_LIBRARY_PATH; do ls "$d/$lib" 2>/dev/null; done | head -1)
    echo "  $lib => ${found:-NOT FOUND}"
    [ -n "$found" ] || missing=1
done

if [ -n "$REHEARSE" ]; then
    # Here the measuring cannot run; what can is checked instead, and the rehearsal ends.
    [ "$missing" = 0 ] || die "rehearsal: a CUDA library is missing from the torch venv's path"
    cpu_run=(--model-dir tests/fixtures/tiny-sdxl --size 64x64 --batch-sizes 1 --warmup 0 --runs 1
             --min-time 0 --dtype f32)
    "$BIN/turbine" bench --device cpu "${cpu_run[@]}" --json "$REHEARSE/cpu.json" >"$REHEARSE/cpu.log" 2>&1 \
        || { cat "$REHEARSE/cpu.log"; die "rehearsal: the CUDA build failed to run on the CPU"; }
    echo "rehearsal: the CUDA build ran bench --device cpu on the tiny model"
    "$BIN/turbine" bench --device cuda:0 "${cpu_run[@]}" >"$REHEARSE/cuda.log" 2>&1
    rc=$?
    cat "$REHEARSE/cuda.log"
    # The stub driver has no device: a clean error (non-zero exit, no panic) naming what to check.
    if [ "$rc" = 0 ] || grep -q "panicked" "$REHEARSE/cuda.log" || ! grep -q "cannot open CUDA device 0" "$REHEARSE/cuda.log"; then
        die "rehearsal: without a usable driver, --device cuda:0 should fail cleanly (exit $rc)"
    fi
    echo "rehearsal: --device cuda:0 without a GPU fails cleanly (exit $rc)"
    for t in "$BIN"/tests/*; do
        [ -x "$t" ] || continue
        n=$("$t" --list --format terse 2>/dev/null | grep -c ': test$')
        [ "$n" -gt 0 ] || die "rehearsal: $t lists no tests"
        echo "rehearsal: kernel tests $(basename "$t"): $n listed"
    done
    echo "rehearsal: the device machine's steps before the measuring all passed"
    exit 0
fi

# What the steps above spent comes off the budget.
used=$SECONDS
# (GPU_SERVE_ARGS and GPU_CHECK_ARGS are split at spaces on purpose.)
if [ "$MODE" = serve ]; then
    # shellcheck disable=SC2086
    python3 scripts/bench/serve_check.py --turbine "$BIN/turbine" --out "$OUT" \
        --budget-s $((BUDGET - used)) --commit "$commit" --batch-requests 1000 ${GPU_SERVE_ARGS:-}
else
    # shellcheck disable=SC2086
    python3 scripts/bench/gpu_check.py --turbine "$BIN/turbine" --out "$OUT" --work /tmp/turbine-gpu-check \
        --budget-s $((BUDGET - used)) --commit "$commit" --tests-dir "$BIN/tests" \
        --kernels "${GPU_CHECK_KERNELS:-auto}" ${GPU_CHECK_ARGS:-}
fi
rc=$?
echo "== done in $SECONDS s, exit $rc"
exit $rc
