#!/usr/bin/env python3
"""The measuring half of scripts/gpu_check.sh: turbine vs diffusers on one GPU, in one call.

Steps, each bounded by what is left of --budget-s:
 0. the carried CUDA kernel tests (--tests-dir); a lever whose tests fail alone is left out of
    turbine's kernels (--kernels auto);
 1. the device's two ceilings (bf16 matrix rate, copy bandwidth), measured;
 2. diffusers writes the full architecture of --config-dir with fixed-seed random weights
    (initialised on the device, stored as the Hub's fp16 variant files);
 3. `turbine bench` loads those files and sweeps the batch sizes end to end (text encoders,
    UNet, VAE decode, 8-bit images) from the same prompts and initial latents as diffusers,
    with device memory sampled through NVML; then, at --ablate-batch, one batch profiled by
    kind of layer (its kernels, and candle's ops) and every kernel set (candle's ops only, all
    of turbine's kernels, each lever alone, all but each lever), each set's images compared
    with candle's, against the predictions in benches/levers.json;
 3b. where the ablation found levers whose removal sped its batch up by more than 2%, the
    sweep's best batch size once more without them (the tuned run); turbine's peak is the
    better of the two, and the table says which kernel set it ran;
 4. diffusers eager (SDPA) sweeps the same, in its own process, and profiles one batch of
    --ablate-batch with torch.profiler;
 5. the pixel difference between turbine's and diffusers' images of the same batch;
 6. diffusers + torch.compile at eager's and turbine's best batch sizes (static shapes), in its
    own process, in the time set aside for it (--compile-s) and what is left;
 7. one table (markdown) and every figure (JSON) under --out.

With --device cpu (scripts/gpu_check.sh --dry-run) the same steps run on the CPU at a tiny
size, so the whole flow is exercised without a GPU; no figure of such a run means anything.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bench_prompts import PROMPTS  # noqa: E402

START = time.time()


def log(*a):
    t = time.time() - START
    print(f"[{t:6.1f}s]", *a, file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds):
        self.deadline = START + seconds

    def left(self):
        return self.deadline - time.time()


def run(cmd, timeout=None, env=None, check=True):
    cmd = [str(c) for c in cmd]
    log("+ " + " ".join(cmd))
    try:
        r = subprocess.run(cmd, timeout=max(1, timeout) if timeout else None, env=env)
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout:.0f} s: {cmd[0]} {cmd[1] if len(cmd) > 1 else ''}")
        return 124
    if check and r.returncode != 0:
        log(f"failed ({r.returncode})")
    return r.returncode


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def gb(b):
    return f"{b / 2**30:.1f}" if b else "-"


def best(rows):
    ok = [r for r in rows or [] if "images_per_s" in r]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def row_at(rows, b):
    return next((r for r in rows or [] if r.get("batch") == b and "images_per_s" in r), None)


# Which `--kernels` lever each CUDA test of tests/ops.rs exercises: the first pattern found in the
# test's name wins (so `group_norm_channels_last_*` is channels-last, not group-norm).
LEVER_OF_TEST = [
    ("flash", "flash"),
    ("channels_last", "channels-last"),
    ("upsample_conv", "upsample-conv"),
    ("interleave_phases", "upsample-conv"),
    ("upsample", "channels-last"),
    ("group_norm", "group-norm"),
    ("geglu", "geglu"),
    ("bias_residual", "bias-residual"),
    ("conv_graph", "conv-graph"),
    ("conv2d", "conv"),
    ("attention", "attention"),
    ("to_rgb8", "postprocess"),
    ("stream_order", "stream-order"),
    ("copy_to_host", "overlap"),
    ("upload_f32", "overlap"),
]


def lever_of(test):
    return next((lever for pat, lever in LEVER_OF_TEST if pat in test), None)


def libtest_results(text):
    """`test NAME ... ok|FAILED|ignored` lines of a libtest run: {name: outcome}; a test that
    started and never finished (the binary was stopped while it ran: a hang) is `started`."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "test" and parts[2] == "...":
            if len(parts) == 3:
                out[parts[1]] = "started"
            elif parts[3] in ("ok", "FAILED", "ignored"):
                out[parts[1]] = parts[3]
    return out


def kernel_tests(tests_dir, budget, rerun_s=90.0, reserve_s=300.0):
    """Runs every carried test binary with TURBINE_REQUIRE_GPU=1. A binary that fails has each of
    its tests that did not pass rerun alone, in a fresh process: a kernel that corrupts memory
    leaves the CUDA context unusable, so the tests after it fail too, and only a rerun tells the
    broken kernel from its victims. Returns the summary and the levers whose tests failed alone.

    The reruns together get `rerun_s` seconds: where most tests fail for one cause (a driver or
    module-load error, a kernel that hangs in every test that calls it), rerunning each of them
    for up to a minute would eat the time of the measuring. A failed test left without its rerun
    counts as failed, to be safe; one that never ran counts as not run. `reserve_s` of the budget
    is kept for the measuring after the tests: a binary gets at most what is left beyond it
    (200 s at most, 10 s at least), and no rerun starts within 30 s of it.

    The tests' default kernel set (TURBINE_KERNELS) leaves out conv-graph: the graph-API
    convolution plans run only in their own test (which asks for them explicitly), so a fault
    there is charged to conv-graph alone, never to the levers whose tests call a convolution."""
    env = dict(os.environ, TURBINE_REQUIRE_GPU="1", TURBINE_KERNELS="all,-conv-graph")
    bins = sorted(p for p in Path(tests_dir).iterdir() if p.is_file() and os.access(p, os.X_OK))
    res = {"binaries": [], "failed": [], "victims": [], "not_run": [], "not_rerun": [], "levers": []}
    rerun_deadline = None  # set at the first rerun
    for b in bins:
        log(f"== CUDA kernel tests: {b}")
        try:
            r = subprocess.run([b, "--test-threads=1"], env=env, capture_output=True, text=True,
                               timeout=max(10, min(200, budget.left() - reserve_s)))
            text, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            # (TimeoutExpired keeps bytes even with text=True)
            out = e.stdout or b""
            text, rc = (out.decode(errors="replace") if isinstance(out, bytes) else out), 124
        print(text, file=sys.stderr, flush=True)
        outcome = libtest_results(text)
        entry = {"binary": b.name, "rc": rc, "passed": sum(v == "ok" for v in outcome.values()),
                 "failed": sorted(k for k, v in outcome.items() if v == "FAILED")}
        res["binaries"].append(entry)
        if rc == 0:
            continue
        try:
            listed = subprocess.run([b, "--list", "--format", "terse"], capture_output=True, text=True,
                                    timeout=30).stdout
        except (subprocess.TimeoutExpired, OSError) as e:
            log(f"listing the tests of {b.name} failed ({e!r}); only those that ran are judged")
            listed = ""
        names = [ln[: -len(": test")] for ln in listed.splitlines() if ln.endswith(": test")]
        names += [n for n in outcome if n not in names]
        for name in names:
            if outcome.get(name) in ("ok", "ignored"):
                continue
            if outcome.get(name) == "started":
                # It was running when the binary was stopped: a hang, not rerun (another minute).
                log(f"   {name} never finished (hung): FAILED")
                res["failed"].append(name)
                continue
            if rerun_deadline is None:
                rerun_deadline = time.time() + rerun_s
            rerun_left = rerun_deadline - time.time()
            if budget.left() < reserve_s + 30 or rerun_left <= 0:
                # A test that failed cannot be told from a victim without its rerun: its lever is
                # left out, to be safe. One that never ran says nothing about its lever.
                why = "no time left" if budget.left() < reserve_s + 30 else f"the reruns' {rerun_s:g} s are spent"
                log(f"{why}: {name} not rerun alone")
                if outcome.get(name) == "FAILED":
                    res["failed"].append(name)
                    res["not_rerun"].append(name)
                else:
                    res["not_run"].append(name)
                continue
            try:
                alone = subprocess.run([b, "--exact", name, "--test-threads=1"], env=env, capture_output=True,
                                       text=True, timeout=max(1.0, min(60.0, rerun_left)))
                ok = alone.returncode == 0
                if not ok:
                    print(alone.stdout + alone.stderr, file=sys.stderr, flush=True)
            except subprocess.TimeoutExpired:
                ok = False
            log(f"   alone: {name} {'ok (failed only after another test)' if ok else 'FAILED'}")
            res["victims" if ok else "failed"].append(name)
    res["levers"] = sorted({lever_of(t) for t in res["failed"]} - {None})
    res["unmapped"] = [t for t in res["failed"] if lever_of(t) is None]
    passed = sum(e["rc"] == 0 for e in res["binaries"])
    line = f"{passed} of {len(res['binaries'])} test binaries passed (TURBINE_REQUIRE_GPU=1)"
    alone = [t for t in res["failed"] if t not in res["not_rerun"]]
    if alone:
        line += f"; failed alone: {', '.join(alone)}"
    if res["not_rerun"]:
        line += f"; failed, not rerun alone (no time): {', '.join(res['not_rerun'])}"
    if res["failed"]:
        line += f" (levers left out: {', '.join(res['levers']) or 'none mapped'})"
    if res["victims"]:
        line += f"; failed only after another test: {', '.join(res['victims'])}"
    if res["not_run"]:
        line += f"; never ran (no time): {', '.join(res['not_run'])}"
    res["summary"] = line
    log("== CUDA kernel tests: " + line)
    return res


def sweep_kernels(asked, failed_levers):
    """`auto`: every lever but those whose kernel tests failed; anything else as given."""
    if asked != "auto":
        return asked
    return ",".join(["all"] + [f"-{lever}" for lever in failed_levers])


def turbine_peaks(report, sampler):
    """Attributes NVML samples to each batch size by the wall-clock windows turbine reports:
    the peak memory over the batch size's whole window, how busy the GPU was over its timed
    runs (back to back)."""
    for r in report.get("rows", []):
        r["peak_bytes"] = sampler.peak(r["started_unix_s"], r["finished_unix_s"])
        if r.get("timed_started_unix_s"):
            r["gpu_busy_pct"] = sampler.busy(r["timed_started_unix_s"], r["timed_finished_unix_s"])


def table(res, batches):
    t, e, c = (res.get(k) or {} for k in ("turbine", "eager", "compile"))
    lines = [
        "| batch | turbine img/s | turbine ms/batch | turbine peak GiB | diffusers eager img/s "
        "| eager ms/batch | eager peak GiB | diffusers compile img/s | compile ms/batch "
        "| compile peak GiB | turbine / eager | turbine / compile |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in batches:
        rt, re_, rc = row_at(t.get("rows"), b), row_at(e.get("rows"), b), row_at(c.get("rows"), b)

        def cells(r):
            if not r:
                return ["-", "-", "-"]
            return [f"{r['images_per_s']:.2f}", f"{r['median_s'] * 1e3:.1f}", gb(r.get("peak_bytes"))]

        ratio = lambda x, y: f"{x['images_per_s'] / y['images_per_s']:.2f}" if x and y else "-"  # noqa
        lines.append("| " + " | ".join([str(b)] + cells(rt) + cells(re_) + cells(rc)
                                       + [ratio(rt, re_), ratio(rt, rc)]) + " |")
    return "\n".join(lines)


def ablation_table(res):
    """turbine's kernel ablation: each set's speed, and on the rows of one lever (`all but X`,
    `X alone`) what that lever saved next to its prediction."""
    rows = (res.get("turbine") or {}).get("ablation") or []
    if not rows:
        return ""
    preds = load(ROOT / "benches" / "levers.json") or {}
    by = {r["kernels"]: r["row"] for r in rows}
    # The second set is the run's --kernels (`all`, or all but the levers left out).
    none, every = by.get("none"), (rows[1]["row"] if len(rows) > 1 else None)
    without = without_rows(rows)
    lines = ["| set | kernels | batch | images/s | vs none | ms/image | text ms | unet ms | vae ms "
             "| max diff vs none | mean diff vs none | lever alone saves ms/image | lever in all saves "
             "ms/image | predicted ms/image |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        row, k = r["row"], r["kernels"]
        role, lever = row_role(r, rows)
        rel = f"{row['images_per_s'] / none['images_per_s']:.2f}x" if none else "-"
        alone = in_all = pred = "-"
        if lever:
            pred = f"{(preds.get(lever) or {}).get('predicted_ms_per_image', '-')}"
        if role == "alone" and none:
            alone = f"{none['ms_per_image'] - row['ms_per_image']:.2f}"
        if role in ("alone", "without") and lever in without and every:
            in_all = f"{without[lever]['ms_per_image'] - every['ms_per_image']:.2f}"
        label = {"without": f"all but {lever}", "alone": f"{lever} alone"}.get(role, role)
        lines.append(f"| {label} | {k} | {row['batch']} | {row['images_per_s']:.2f} | {rel} "
                     f"| {row['ms_per_image']:.2f} | {row['text_encode_ms']:.1f} | {row['unet_ms']:.1f} "
                     f"| {row['vae_decode_ms']:.1f} | {dash(r['max_diff_vs_none'])} "
                     f"| {dash(r['mean_diff_vs_none'], '.3f')} | {alone} | {in_all} | {pred} |")
    return "\n".join(lines)


def profile_table(res):
    """Where a batch's device time goes, by kind of layer: turbine under its kernels and under
    candle's ops (`bench --profile`), diffusers eager (torch.profiler), ms per image."""
    runs = (res.get("turbine") or {}).get("profiles") or []
    eager = (res.get("eager") or {}).get("profile") or {}
    if not runs and not eager.get("kinds_ms"):
        return ""
    cols = []
    for r in runs:
        kinds = {}
        for e in r["entries"]:
            kinds[e["kind"]] = kinds.get(e["kind"], 0.0) + e["ms"]
        total = r["text_encode_ms"] + r["unet_ms"] + r["vae_decode_ms"]
        kinds["other"] = max(0.0, total - sum(kinds.values()))
        cols.append((f"turbine `{r['kernels']}`", r["batch"], kinds, total))
    if eager.get("kinds_ms"):
        k = eager["kinds_ms"]
        cols.append(("diffusers eager", eager["batch"], k, eager.get("kernels_ms", sum(k.values()))))
    names = sorted({n for _, _, k, _ in cols for n in k}, key=lambda n: (n in ("other", "unattributed"), n))
    lines = ["| kind | " + " | ".join(f"{c[0]} ms/image (bs{c[1]})" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for n in names + ["total"]:
        cells = [(c[3] if n == "total" else c[2].get(n, 0.0)) / c[1] for c in cols]
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def dash(v, fmt=""):
    return "-" if v is None else format(v, fmt)


def compile_order(batches, res):
    """torch.compile compiles per batch shape and the time left rarely covers the whole sweep, so
    the batch sizes most likely to hold its peak go first (eager's best, then turbine's, then
    the rest from the largest down): its peak must not be judged from the small batches alone."""
    first = [r["batch"] for r in (best((res.get("eager") or {}).get("rows")),
                                  best((res.get("turbine") or {}).get("rows"))) if r]
    rest = sorted(batches, reverse=True)
    return list(dict.fromkeys([b for b in first if b in batches] + rest))


def row_role(r, rows):
    """(role, lever) of an ablation row: `turbine bench` names them (`none`, `all`, `without`,
    `alone`); reports from before it did are read by their kernel strings (a single name is that
    lever alone, the set of all levers but one is `without` that one)."""
    if r.get("role"):
        return r["role"], r.get("lever")
    k = r["kernels"]
    if k == "none":
        return "none", None
    if rows and r is rows[1]:
        return "all", None
    names = [x["kernels"] for x in rows if x["kernels"] not in ("none", "all") and "," not in x["kernels"]]
    if k in names:
        return "alone", k
    for lever in names:
        if k == (",".join(n for n in names if n != lever) or "none"):
            return "without", lever
    return "", None


def without_rows(rows):
    """lever -> the ablation row of the run's set without that lever."""
    out = {}
    for r in rows:
        role, lever = row_role(r, rows)
        if role == "without" and lever:
            out[lever] = r["row"]
    return out


def slower_levers(res, margin=0.02):
    """The levers whose removal made the ablation's batch faster by more than `margin` (the set
    without the lever against the run's whole set): what the tuned run leaves out."""
    rows = (res.get("turbine") or {}).get("ablation") or []
    if len(rows) < 2:
        return []
    every = rows[1]["row"]
    return [lever for lever, without in without_rows(rows).items()
            if without["images_per_s"] > every["images_per_s"] * (1 + margin)]


def turbine_best(res):
    """turbine's best row over its sweep and the tuned run, with the kernel set it ran."""
    cands = []
    for key in ("turbine", "tuned"):
        rep = res.get(key) or {}
        b = best(rep.get("rows"))
        if b:
            kernels = (res.get("tuned_kernels") if key == "tuned" else rep.get("kernels")) or res.get("kernels")
            cands.append(dict(b, kernels=kernels, run=key))
    return max(cands, key=lambda r: r["images_per_s"]) if cands else None


# The parity target: the mean absolute difference, in 8-bit levels, between turbine's and
# diffusers' images of the same batch, both in the run's dtype. Set on 2026-11-29, before any GPU
# run, from the full SDXL-Turbo architecture on the CPU (random weights from the fp16 variant
# files, 64x64, bf16 on both sides): mean 0.48, max 4. A broken layer moves these noise-like images
# (std ~41) by tens of levels; bf16's own rounding, a fraction of one.
PIXEL_MEAN_BOUND = 2.0


def targets(res):
    """Issue 6's targets, each with the figures it was judged on."""
    t, e, c = (res.get(k) or {} for k in ("turbine", "eager", "compile"))
    bt, be, bc = turbine_best(res), best(e.get("rows")), best(c.get("rows"))
    out = []
    if bt and bt["run"] == "tuned":
        out.append(f"- turbine's peak is from the tuned run, `--kernels {bt['kernels']}` (the levers whose "
                   f"removal sped up the ablation's batch left out); the sweep's own peak with "
                   f"`{res.get('kernels')}`: {best(t.get('rows'))['images_per_s']:.2f} images/s")

    def verdict(ok):
        return "met" if ok else "NOT met"

    if bt and be:
        r = bt["images_per_s"] / be["images_per_s"]
        out.append(f"- peak images/s vs diffusers eager: turbine {bt['images_per_s']:.2f} (bs{bt['batch']}) "
                   f"/ eager {be['images_per_s']:.2f} (bs{be['batch']}) = {r:.2f}x (target >= 1.5x: {verdict(r >= 1.5)})")
    if bt and bc:
        r = bt["images_per_s"] / bc["images_per_s"]
        out.append(f"- peak images/s vs diffusers + torch.compile: {bt['images_per_s']:.2f} / "
                   f"{bc['images_per_s']:.2f} (bs{bc['batch']}) = {r:.2f}x (target >= 1.0x: {verdict(r >= 1.0)})")
    elif bt:
        why = ("did not finish in the time left" if "compile_rc" in res
               else "skipped: too little time left, or --skip-compile")
        out.append(f"- diffusers + torch.compile: no figure ({why})")
    t1, e1 = row_at(t.get("rows"), 1), row_at(e.get("rows"), 1)
    if t1 and e1:
        # turbine's latency_s: a batch alone (with OVERLAP its median_s is the interval between
        # overlapping batches, not a latency).
        lat = t1.get("latency_s") or t1["median_s"]
        out.append(f"- batch-1 latency: turbine {lat * 1e3:.1f} ms, eager {e1['median_s'] * 1e3:.1f} ms "
                   f"(target <=: {verdict(lat <= e1['median_s'])})")
    if bt and be and bt.get("peak_bytes") and be.get("peak_bytes"):
        # Judged at turbine's best batch size against diffusers at the same batch size, where
        # eager measured it (memory grows with the batch, so two different best batch sizes
        # would compare batch sizes, not implementations); eager's own best is printed too.
        same = row_at(e.get("rows"), bt["batch"])
        if same and same.get("peak_bytes"):
            out.append(f"- peak GPU memory at turbine's best batch size (bs{bt['batch']}): turbine "
                       f"{gb(bt['peak_bytes'])} GiB, eager {gb(same['peak_bytes'])} GiB at the same batch size "
                       f"(target <=: {verdict(bt['peak_bytes'] <= same['peak_bytes'])}); eager at its own best "
                       f"(bs{be['batch']}): {gb(be['peak_bytes'])} GiB")
        else:
            out.append(f"- peak GPU memory at the best batch size: turbine {gb(bt['peak_bytes'])} GiB "
                       f"(bs{bt['batch']}), eager {gb(be['peak_bytes'])} GiB (bs{be['batch']}; eager has no "
                       f"figure at bs{bt['batch']}) (target <=: {verdict(bt['peak_bytes'] <= be['peak_bytes'])})")
    d = res.get("pixel_diff")
    if d:
        out.append(f"- pixels, turbine vs diffusers eager, both {res['dtype']}, {len(d['images'])} images of batch "
                   f"{res.get('diff_batch')}: max {d['max']}, mean {d['mean']:.3f} (8-bit) "
                   f"(target: mean <= {PIXEL_MEAN_BOUND}: {verdict(d['mean'] <= PIXEL_MEAN_BOUND)})")
    d = res.get("edit_pixel_diff")
    if d:
        out.append(f"- edits, turbine vs diffusers img2img (one step at strength 0.5, the same input and noise), "
                   f"both {res['dtype']}, {len(d['images'])} images: max {d['max']}, mean {d['mean']:.3f} (8-bit) "
                   f"(bound: mean <= {PIXEL_MEAN_BOUND}: {verdict(d['mean'] <= PIXEL_MEAN_BOUND)})")
    elif "edit_pixel_diff" in res:
        out.append("- edits against diffusers: no figure (a side failed; see gpu_check.log)")
    return "\n".join(out)


def edit_parity(a, ref, model, kernels, seconds):
    """diffusers' img2img of a made input (its noise saved), then turbine's edit of the same
    input with that noise, both at the run's size and dtype, two prompts; the pixel difference
    (diffusers_ref.py diff's JSON), or None when a side failed."""
    work = a.work / "edit-parity"
    noise = work / "noise.safetensors"
    dref, tdir = work / "diffusers", work / "turbine"
    tdir.mkdir(parents=True, exist_ok=True)
    prompts = PROMPTS[:2]
    t0 = time.time()
    cmd = ref + ["img2img", "--model-dir", model, "--size", a.size, "--dtype", a.dtype, "--device", a.device,
                 "--seed", "7", "--noise", noise, "--out-dir", dref, "--json", work / "diffusers.json"]
    for p in prompts:
        cmd += ["--prompt", p]
    if run(cmd, timeout=seconds * 0.6) != 0:
        log("edit parity: diffusers' img2img failed")
        return None
    device = a.device if a.device != "cuda" else "cuda:0"
    cmd = [a.turbine, "generate", "--model-dir", model, "--device", device, "--dtype", a.dtype,
           "--size", a.size, "--kernels", kernels, "--image", dref / "input.png", "--init-latents", noise,
           "--steps", "1", "--strength", "0.5", "--seed", "0", "--out", tdir / "edit.png"]
    for p in prompts:
        cmd += ["--prompt", p]
    if run(cmd, timeout=max(30.0, seconds - (time.time() - t0))) != 0:
        log("edit parity: turbine generate --image failed")
        return None
    names = [f"edit-{i}.png" for i in range(len(prompts))]
    run(ref + ["diff", "--a"] + [tdir / n for n in names] + ["--b"] + [dref / f"{i}.png" for i in range(len(prompts))]
        + ["--json", work / "diff.json"])
    d = load(work / "diff.json")
    if d:
        shutil.copy(tdir / names[0], a.out / "turbine_edit_0.png")
        shutil.copy(dref / "0.png", a.out / "diffusers_edit_0.png")
        shutil.copy(dref / "input.png", a.out / "edit_input.png")
    return d


def conv_plan_summary(plans):
    """One line on turbine's cuDNN plans (`bench --json`'s conv_plans): of the shapes whose plan
    weighed graph-API engines (the conv-graph lever), how many run one; None without plans."""
    if not plans:
        return None
    # Lines that are not a plan of their own (src/ops/conv.rs is_conv_plan_followup): a graph
    # plan that failed later, a plan whose first call failed, a batch shape run in sub-batches
    # (each has its own plan line), a plan dropped over MAX_CONV_PLANS (CONV_GRAPH_FAILED_LATER,
    # CONV_FIRST_CALL_FAILED, CONV_SUB_BATCHES, CONV_PLAN_EVICTED).
    later = [p for p in plans if "legacy from now on" in p]
    first = [p for p in plans if "the plan's first call failed" in p]
    split = [p for p in plans if "in sub-batches of" in p]
    dropped = [p for p in plans if "plan dropped, least recently used" in p]
    followups = later + first + split + dropped
    built = [p for p in plans if p not in followups]
    weighed = [p for p in built if " graph=true" in p and "mode=Measure" in p]
    won = sum(": Graph engine" in p for p in weighed)
    line = (f"cuDNN plans: {len(built)} built; graph-API engines weighed for {len(weighed)}, "
            f"faster than the legacy algorithm (so chosen) for {won}")
    if later:
        line += f"; {len(later)} graph plan(s) failed after being chosen (legacy from then on)"
    if first:
        line += f"; {len(first)} plan(s) failed at their first call (candle's ops from then on)"
    if split:
        line += f"; {len(split)} batch shape(s) run in sub-batches"
    if dropped:
        line += f"; {len(dropped)} plan(s) dropped over the limit of plans held"
    return line + " (every plan line is in gpu_check.json, turbine.conv_plans)"


def fp16_files(a, gpu):
    """The model is written as the Hub's fp16 variant files (what SDXL-Turbo users download) on
    the GPU and for any half-precision run; as f32 files for an f32 run on the CPU."""
    return gpu or a.dtype != "f32"


def edits_line(res):
    """The edits' figures (`--edit-batch-sizes`) against the sweep's generations at the same batch sizes."""
    if "edits" not in res and "edits_rc" not in res:
        return None
    rows = (res.get("edits") or {}).get("rows") or []
    if not rows:
        return f"- edits (strength 0.5): no figure (exit {res.get('edits_rc')})"
    gen = {r["batch"]: r for r in (res.get("turbine") or {}).get("rows") or []}
    parts = []
    for r in rows:
        g = gen.get(r["batch"])
        vs = (f" against {g['images_per_s']:.2f} generating ({g['images_per_s'] / r['images_per_s']:.2f}x the time)"
              if g else "")
        parts.append(f"bs{r['batch']} {r['images_per_s']:.2f} images/s{vs}")
    return ("- edits (`bench --edit-strength 0.5`: the VAE encoder on top of the same steps; predicted about 1.2x "
            "a generation's time per image): " + "; ".join(parts))


def render_md(res, a, batches, gpu):
    """gpu_check.md from what `res` holds so far: written at every step, so a run stopped from
    outside still leaves the figures it measured."""
    di = res.get("devinfo") or {}
    kernels = res.get("kernels", a.kernels)
    t = res.get("turbine") or {}
    hdr = [f"### gpu_check.sh ({res['started_utc']})", ""]
    hdr.append(f"- device: {t.get('device', a.device)}"
               + (f"; measured bf16 matmul {di['bf16_tflops']:.0f} TFLOP/s, copy {di['copy_tbps']:.2f} TB/s; "
                  f"torch {di['torch']}, CUDA {di['cuda']}, cuDNN {di['cudnn']}" if di else ""))
    if t.get("machine"):
        m = t["machine"]
        hdr.append(f"- machine: {m['cpu']}, {m['cores']} cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB ({m['host']})")
    hdr.append(f"- commit: {a.commit}; command: `scripts/gpu_check.sh` (budget {a.budget_s:.0f} s, used "
               f"{time.time() - START:.0f} s)")
    arch = ("full SDXL-Turbo architecture" if a.config_dir.name == "sdxl-turbo"
            else f"architecture of {a.config_dir}")
    files = "fp16 variant files" if fp16_files(a, gpu) else "f32 files"
    hdr.append(f"- setting: {arch}, random weights (diffusers, seed 0, {files}), "
               f"{a.size}, {a.steps} step, {a.dtype}, guidance 0, end to end incl. VAE decode and 8-bit images; "
               f"{len(PROMPTS)} prompts cycled over each batch, every image's its own (\", variation K\" from the "
               f"second round on), and {len(PROMPTS)} initial latents cycled; warm-up excluded, median of "
               f">= 3 runs and >= {a.min_time:g} s per batch size; peak = NVML device memory above the idle "
               f"baseline, per batch size")
    hdr.append("- diffusers: PyTorch's defaults (SDPA attention, cuDNN heuristics: `cudnn.benchmark` off); "
               "compile = UNet and VAE decoder in channels_last, `torch.compile(mode=default, fullgraph=True, "
               "dynamic=False)`, at most two batch sizes (eager's best first), compile time excluded")
    ran = t.get("kernels", "")  # as turbine prints the set: `all` or the levers' names
    overlapped = any(r.get("host_queue_ms") is not None for r in t.get("rows") or [])
    if (ran == "all" or "overlap" in ran.split(",")) and overlapped:
        hdr.append("- with turbine's overlap lever its ms/batch is the interval between back-to-back batches (the "
                   "next one queued before this one's images are collected, as its server does under load) and "
                   "its batch-1 latency a batch alone; diffusers runs its batches one after another")
    if res.get("floors"):
        fl = res["floors"]
        hdr.append(f"- floor: {sum(fl['flops'].values()) / 1e12:.2f} TFLOP/image -> {fl['flop_floor_ms']:.2f} ms "
                   f"= {1e3 / fl['flop_floor_ms']:.0f} images/s at {fl['tflops']:g} TFLOP/s")
        bt = best(t.get("rows"))
        if bt:
            hdr.append(f"- turbine's best: {bt['images_per_s']:.2f} images/s = "
                       f"{100 * bt['images_per_s'] * fl['flop_floor_ms'] / 1e3:.1f}% of the floor")
    hdr.append(f"- turbine's kernels in the sweep and the ablation: `--kernels {kernels}`"
               + (f" (asked: {a.kernels})" if a.kernels != kernels else ""))
    if res.get("tuned_kernels"):
        tr = best((res.get("tuned") or {}).get("rows"))
        got = (f"{tr['images_per_s']:.2f} images/s at bs{tr['batch']}, peak {gb(tr.get('peak_bytes'))} GiB"
               if tr else f"no figure (exit {res.get('tuned_rc')})")
        hdr.append(f"- tuned run: `--kernels {res['tuned_kernels']}` (the ablation's batch ran faster without "
                   f"those levers) at the sweep's best batch size: {got}")
    if res.get("turbine_first"):
        f = res["turbine_first"]
        hdr.append(f"- turbine with `--kernels {f['kernels']}` measured nothing (exit {f['rc']}); "
                   f"the figures are candle's ops alone")
    queued = [r for r in t.get("rows") or [] if r.get("host_queue_ms") is not None]
    if queued:
        hdr.append("- turbine's host time to queue one batch behind the running one against its ms/batch (well "
                   "below it: the GPU sets the pace; close to it: the host does, or the driver's launch queue "
                   "filled behind a busy GPU, which the GPU busy share below tells apart): "
                   + ", ".join(f"bs{r['batch']} {r['host_queue_ms']:.1f} of {r['median_s'] * 1e3:.1f} ms"
                               for r in queued))
    busy = []
    for name in ("turbine", "eager", "compile"):
        rows = [r for r in (res.get(name) or {}).get("rows") or [] if r.get("gpu_busy_pct") is not None]
        if rows:
            busy.append(f"{name} " + ", ".join(f"bs{r['batch']} {r['gpu_busy_pct']:.0f}%" for r in rows))
    if busy:
        hdr.append("- GPU busy over the timed runs (NVML utilisation, the share of time a kernel ran; well under "
                   "100%: the GPU waited for the host, launch overhead or host work between batches, where CUDA "
                   "graphs or less host work pay; about 100%: the GPU sets the pace): " + "; ".join(busy))
    ed = edits_line(res)
    if ed:
        hdr.append(ed)
    cps = conv_plan_summary(t.get("conv_plans"))
    if cps:
        hdr.append(f"- {cps}")
    kt = res.get("kernel_tests")
    if kt:
        hdr.append(f"- CUDA kernel tests: {kt['summary']}")
    elif a.tests_dir:
        hdr.append(f"- CUDA kernel tests: none carried in {a.tests_dir}")
    first = (res.get("turbine_first") or {}).get("report") or {}
    fails = (first.get("failures") or []) + (t.get("failures") or [])
    for f in fails:
        err = f["error"] if len(f["error"]) < 300 else f["error"][:300] + "..."
        hdr.append(f"- turbine failed: {f['stage']} batch {f['batch']} with `--kernels {f['kernels']}`: {err}")
    for k in ("turbine_rc", "tuned_rc", "edits_rc", "eager_rc", "compile_rc"):
        if res.get(k) not in (None, 0):
            hdr.append(f"- {k.split('_')[0]} exited with {res[k]} (see gpu_check.log)")
    md = "\n".join(hdr) + "\n\n" + table(res, batches) + "\n\n" + targets(res) + "\n"
    prof = profile_table(res)
    if prof:
        md += ("\nWhere one batch's device time goes, by kind of layer (turbine: `bench --profile`, CUDA events "
               "around each layer call, `other` = the stages' time outside them; diffusers: torch.profiler, "
               "each aten op's own kernel time):\n\n" + prof + "\n")
    abl = ablation_table(res)
    if abl:
        md += ("\nturbine's kernels, one set at a time (`turbine bench --ablate`; 'diff vs none' is the 8-bit "
               "difference from candle's ops, all images of the batch):\n\n" + abl + "\n")
    if not res.get("finished"):
        md = ("**Unfinished run**: stopped before its last step (the figures below are what it measured; "
              "see gpu_check.log).\n\n" + md)
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turbine", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/turbine-gpu-check"))
    ap.add_argument("--config-dir", type=Path, default=ROOT / "models" / "sdxl-turbo")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--diff-batch", type=int, default=4, help="batch whose images are compared")
    ap.add_argument("--kernels", default="auto",
                    help="turbine's --kernels for the sweep and the ablation; auto: all but the levers "
                         "whose CUDA kernel tests failed")
    ap.add_argument("--tests-dir", type=Path,
                    help="CUDA kernel-test binaries to run first (TURBINE_REQUIRE_GPU=1)")
    ap.add_argument("--ablate-batch", type=int, default=8,
                    help="batch size of turbine's kernel ablation (0: none)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="whole run, seconds")
    ap.add_argument("--compile-reserve-s", type=float, default=20.0,
                    help="seconds kept back for the table after torch.compile")
    ap.add_argument("--compile-s", type=float, default=170.0,
                    help="seconds set aside for the torch.compile step (its pipeline load, a cold "
                         "inductor compile of the UNet and the VAE decoder, its runs) before the "
                         "turbine and eager steps are given theirs")
    ap.add_argument("--eager-s", type=float, default=70.0,
                    help="seconds set aside for the diffusers eager sweep before turbine's step is "
                         "given its share")
    ap.add_argument("--min-time", type=float, default=2.0, help="timed seconds per batch size")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--tests-reserve-s", type=float, default=300.0,
                    help="seconds of the budget kept for the measuring while the kernel tests run")
    ap.add_argument("--rerun-s", type=float, default=90.0,
                    help="seconds for rerunning failed kernel tests alone, all of them together")
    ap.add_argument("--edit-batch-sizes", default="",
                    help="also time turbine's edits (bench --edit-strength 0.5, --steps run) at these "
                         "batch sizes, after its sweep, in at most --edit-s seconds (default: none)")
    ap.add_argument("--edit-s", type=float, default=45.0, help="seconds for the edit step")
    ap.add_argument("--edit-parity", action="store_true",
                    help="after the pixel comparison, an edit (img2img, one step at strength 0.5) of "
                         "the same input and noise by both sides, pixels compared (loads each model "
                         "once more)")
    a = ap.parse_args()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    if not batches or min(batches) < 1 or a.diff_batch not in batches:
        raise SystemExit(f"--batch-sizes {a.batch_sizes} must be positive and hold --diff-batch {a.diff_batch}")
    budget = Budget(a.budget_s)
    gpu = a.device.startswith("cuda")
    py = sys.executable
    ref = [py, HERE / "diffusers_ref.py"]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    res = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": a.commit, "device": a.device, "dtype": a.dtype, "size": a.size,
           "steps": a.steps, "batches": batches, "diff_batch": a.diff_batch,
           "kernels_asked": a.kernels}

    def save():
        (a.out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
        md = render_md(res, a, batches, gpu)
        (a.out / "gpu_check.md").write_text(md)
        return md

    # 0. the CUDA kernel tests; a lever whose tests fail is left out of the sweep (--kernels auto)
    failed_levers = []
    if a.tests_dir and a.tests_dir.is_dir():
        res["kernel_tests"] = kernel_tests(a.tests_dir, budget, a.rerun_s, a.tests_reserve_s)
        failed_levers = res["kernel_tests"]["levers"]
    res["kernels"] = kernels = sweep_kernels(a.kernels, failed_levers)
    save()

    # 1. ceilings
    if gpu:
        run(ref + ["devinfo", "--json", a.work / "devinfo.json"], timeout=min(60, budget.left()))
        res["devinfo"] = load(a.work / "devinfo.json")
    di = res.get("devinfo") or {}
    fl_cmd = [py, ROOT / "scripts" / "floors.py", "--model-dir",
              a.config_dir, "--size", a.size, "--steps", str(a.steps), "--json", a.work / "floors.json"]
    if di.get("bf16_tflops"):
        fl_cmd += ["--tflops", f"{di['bf16_tflops']:.0f}", "--tbps", f"{di['copy_tbps']:.2f}"]
    subprocess.run([str(c) for c in fl_cmd], stdout=subprocess.DEVNULL)
    res["floors"] = load(a.work / "floors.json")
    save()

    # 2. the model, random weights, fp16 variant files
    model = a.work / "model"
    mk = ref + ["make-model", "--config-dir", a.config_dir, "--out", model, "--seed", "0",
                "--device", a.device]
    mk += ["--dtype", "f16", "--variant-fp16"] if fp16_files(a, gpu) else ["--dtype", "f32"]
    t0 = time.time()
    if run(mk, timeout=budget.left() - 60) != 0:
        res["error"] = "writing the random model failed"
        save()
        raise SystemExit(1)
    res["make_model_s"] = time.time() - t0
    lat = a.work / "latents.safetensors"
    run(ref + ["latents", "--out", lat, "--n", len(PROMPTS), "--size", a.size, "--seed", "1"])

    # 3. turbine
    env = dict(os.environ, TURBINE_COMMIT=a.commit)
    timg = a.work / "turbine-images"
    tjson = a.work / "turbine.json"
    tcmd = [a.turbine, "bench", "--model-dir", model, "--device", a.device if a.device != "cuda" else "cuda:0",
            "--dtype", a.dtype, "--size", a.size, "--steps", a.steps, "--batch-sizes", a.batch_sizes,
            "--warmup", "2", "--runs", "3", "--min-time", a.min_time, "--init-latents", lat,
            "--save-images", timg, "--json", tjson]
    for p in PROMPTS:
        tcmd += ["--prompt", p]

    def turbine(kernels, ablate, seconds, batch_sizes=None, json_path=tjson, images=timg, extra=()):
        cmd = list(tcmd) + list(extra)
        cmd[cmd.index("--json") + 1] = json_path
        cmd[cmd.index("--save-images") + 1] = images
        if batch_sizes:
            cmd[cmd.index("--batch-sizes") + 1] = ",".join(map(str, batch_sizes))
        cmd += ["--kernels", kernels] + (["--ablate", ablate] if ablate else [])
        cmd += ["--profile", a.ablate_batch] if a.ablate_batch and not batch_sizes else []
        if json_path.exists():
            json_path.unlink()
        if gpu:
            from gpu_sampler import GpuMemSampler

            with GpuMemSampler() as sampler:
                rc = run(cmd, timeout=seconds, env=env)
            rep = load(json_path)
            if rep:
                turbine_peaks(rep, sampler)
                rep["peak_bytes_overall"] = sampler.peak()
        else:
            rc = run(cmd, timeout=seconds, env=env)
            rep = load(json_path)
        return rc, rep

    # What the later steps need is set aside first: eager's sweep, torch.compile's step (a cold
    # compile of the UNet takes minutes), the table. turbine's step gets 80% of the rest, the
    # tuned run what is left after it.
    compile_s = 0.0 if a.skip_compile else a.compile_s
    later = a.compile_reserve_s + compile_s + a.eager_s
    res["turbine_rc"], res["turbine"] = turbine(kernels, a.ablate_batch, max(60.0, (budget.left() - later) * 0.8))
    if not best((res["turbine"] or {}).get("rows")) and kernels != "none":
        # Nothing measured with our kernels: candle's ops alone still give the baseline figure.
        log(f"turbine measured nothing with --kernels {kernels}; once more with --kernels none")
        res["turbine_first"] = {"kernels": kernels, "rc": res["turbine_rc"], "report": res["turbine"]}
        res["kernels"] = kernels = "none"
        res["turbine_rc"], res["turbine"] = turbine("none", 0, max(45.0, budget.left() * 0.2))
    save()

    # 3b. the tuned set: where the ablation found levers that slow the batch down, the sweep's
    # best batch size once more without them (reported as such, next to the sweep's own peak)
    drop = slower_levers(res)
    bt0 = best((res.get("turbine") or {}).get("rows"))
    tuned_s = min(60.0, budget.left() - later)
    if drop and bt0 and tuned_s >= 30:
        res["tuned_kernels"] = ",".join([kernels] + [f"-{lever}" for lever in drop])
        log(f"levers that slowed the ablation's batch: {drop}; bs{bt0['batch']} once more with "
            f"--kernels {res['tuned_kernels']}")
        res["tuned_rc"], res["tuned"] = turbine(res["tuned_kernels"], 0, tuned_s,
                                                batch_sizes=[bt0["batch"]], json_path=a.work / "tuned.json",
                                                images=a.work / "tuned-images")
        save()

    # 3c. edits, when asked: the same sweep of edits at strength 0.5 (the VAE encoder on top)
    edit_sizes = [int(b) for b in a.edit_batch_sizes.split(",") if b.strip()]
    edit_s = min(a.edit_s, budget.left() - later)
    if edit_sizes and edit_s >= 20:
        res["edits_rc"], res["edits"] = turbine(kernels, 0, edit_s, batch_sizes=edit_sizes,
                                                json_path=a.work / "edits.json", images=a.work / "edit-images",
                                                extra=["--edit-strength", "0.5"])
        save()
    elif edit_sizes:
        log(f"edits skipped: {edit_s:.0f} s left for them")

    # 4. diffusers eager
    eimg = a.work / "eager-images"
    ejson = a.work / "eager.json"
    common = ["--model-dir", model, "--latents", lat, "--batch-sizes", a.batch_sizes, "--size", a.size,
              "--steps", a.steps, "--dtype", a.dtype, "--device", a.device, "--min-time", a.min_time]
    e_budget = max(60.0, budget.left() - a.compile_reserve_s - compile_s - 10)
    eprof = ["--profile-batch", a.ablate_batch] if a.ablate_batch else []
    # (--budget-s counts from the pipeline's load on; the timeout bounds the whole process.)
    res["eager_rc"] = run(ref + ["sweep", "--json", ejson, "--save-images", eimg, "--budget-s",
                                 e_budget - 40] + eprof + common, timeout=e_budget)
    res["eager"] = load(ejson)
    save()

    # 5. pixels
    names = [f"bs{a.diff_batch}_{i}.png" for i in range(min(a.diff_batch, len(PROMPTS)))]
    if all((timg / n).exists() and (eimg / n).exists() for n in names):
        run(ref + ["diff", "--a"] + [timg / n for n in names] + ["--b"] + [eimg / n for n in names]
            + ["--json", a.work / "diff.json"])
        res["pixel_diff"] = load(a.work / "diff.json")
        shutil.copy(timg / names[0], a.out / "turbine_0.png")
        shutil.copy(eimg / names[0], a.out / "diffusers_0.png")
    else:
        log("images for the pixel comparison are missing")
    save()

    # 5b. edits against diffusers, when asked: the same input image and noise through diffusers'
    # img2img and `turbine generate --image` (one step at strength 0.5), pixels compared
    if a.edit_parity:
        left = budget.left() - a.compile_reserve_s - compile_s
        if left >= 60:
            res["edit_pixel_diff"] = edit_parity(a, ref, model, kernels, left)
        else:
            log(f"edit parity skipped: {left:.0f} s left for it")
        save()

    # 6. torch.compile with what is left
    c_budget = budget.left() - a.compile_reserve_s
    if a.skip_compile:
        log("torch.compile skipped (--skip-compile)")
    elif c_budget < 60:
        log(f"torch.compile skipped: {c_budget:.0f} s left")
    else:
        cjson = a.work / "compile.json"
        # Each batch size is a full recompile (static shapes, as a deployment would compile):
        # the two most likely to hold the peak, eager's best first.
        order = compile_order(batches, res)[:2]
        log(f"torch.compile batch sizes, in the order the time allows: {order}")
        ccommon = list(common)
        ccommon[ccommon.index("--batch-sizes") + 1] = ",".join(map(str, order))
        res["compile_rc"] = run(ref + ["sweep", "--compile", "--json", cjson, "--budget-s",
                                       c_budget - 45] + ccommon, timeout=c_budget)
        res["compile"] = load(cjson)
    save()

    # 7. the table
    res["finished"] = True
    md = save()
    print("\n" + md, flush=True)
    if res.get("turbine_rc") != 0 or not res.get("turbine"):
        sys.exit(1)


if __name__ == "__main__":
    main()
