#!/usr/bin/env python3
"""Orchestrates scripts/compare_cpu.sh: turbine and diffusers side by side on the CPU.

Both run the full SDXL-Turbo architecture from the same random-weight files (diffusers wrote
them in the Hub layout; turbine loading them is the full-size loading test), 512x512, 1 step,
f32, the same prompt and initial latents, the same thread count. Each run is its own process
and only one model is in memory at a time (f32 weights are ~14 GB and the machine has 24 GB).
Rounds alternate ABBA (diffusers, turbine, turbine, diffusers, ...) so drift in the machine's
speed falls on both. Warm-up runs (--warmup, none by default) are excluded from the timings.

This file uses the standard library only; the diffusers side runs under --python.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, env=None, **kw):
    log("+ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], env=env, **kw)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(str(c) for c in cmd)}")
    return r


def timed_process(cmd, env):
    """Runs cmd to completion; returns its peak resident memory in bytes (wait4's rusage of
    that one child)."""
    log("+ " + " ".join(str(c) for c in cmd))
    p = subprocess.Popen([str(c) for c in cmd], env=env)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(str(c) for c in cmd)}")
    return usage.ru_maxrss * 1024


def machine():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "os": platform.platform()}


def commit():
    try:
        c = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", required=True, help="python with torch/diffusers/transformers")
    ap.add_argument("--turbine", required=True, help="the turbine binary (release build)")
    ap.add_argument("--work", type=Path, default=ROOT / "target" / "compare-cpu")
    ap.add_argument("--config-dir", type=Path, default=ROOT / "models" / "sdxl-turbo")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2, help="processes per implementation")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per process")
    # A full-size f32 image takes minutes on a small CPU: a warm-up run (first-touch page faults,
    # allocator growth) would change the figure by well under a percent and double the time.
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--min-free-gb", type=float, default=16.0)
    ap.add_argument("--append-results", type=Path, help="append the result block to this file")
    ap.add_argument("--command-line", default="scripts/compare_cpu.sh",
                    help="the command recorded in the results block")
    a = ap.parse_args()
    if a.rounds < 1 or a.runs < 1 or a.warmup < 0 or a.threads < 1:
        raise SystemExit("--rounds, --runs, --threads must be >= 1 and --warmup >= 0")

    # Taken before anything runs: the checkout may move while the run takes its half hour.
    commit_at_start = commit()
    if os.environ.get("TURBINE_BIN"):
        commit_at_start += f" (checkout; the turbine binary was given: {a.turbine})"
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    model = work / "sdxl-turbo-random"
    stamp = model / ".complete"
    ref = [a.python, HERE / "diffusers_ref.py"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               RAYON_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")

    if not stamp.exists() or stamp.read_text().strip() != str(a.seed):
        st = os.statvfs(work)
        free = st.f_bavail * st.f_frsize / 1e9
        if free < a.min_free_gb:
            raise SystemExit(f"{free:.1f} GB free under {work}; the f32 model needs ~14 GB "
                             f"(--min-free-gb {a.min_free_gb})")
        t0 = time.time()
        run(ref + ["make-model", "--config-dir", a.config_dir, "--out", model, "--dtype", "f32",
                   "--seed", a.seed, "--force"], env=env)
        stamp.write_text(str(a.seed))
        log(f"random model written in {time.time() - t0:.0f} s")
    size_gb = sum(p.stat().st_size for p in model.rglob("*.safetensors")) / 1e9

    lat = work / "latents.safetensors"
    run(ref + ["latents", "--out", lat, "--n", 1, "--size", a.size, "--seed", 1], env=env)

    d_times, t_times, d_rss, t_rss = [], [], [], []
    stages = []
    for r in range(a.rounds):
        order = ["diffusers", "turbine"] if r % 2 == 0 else ["turbine", "diffusers"]
        for impl in order:
            out = work / f"{impl}-{r}"
            if impl == "diffusers":
                rss = timed_process(ref + [
                    "generate", "--model-dir", model, "--latents", lat, "--prompt", PROMPT,
                    "--size", a.size, "--steps", a.steps, "--dtype", "f32", "--device", "cpu",
                    "--threads", a.threads, "--warmup", a.warmup, "--runs", a.runs,
                    "--out-dir", out, "--json", work / f"diffusers-{r}.json"], env)
                d_times += json.loads((work / f"diffusers-{r}.json").read_text())["seconds"]
                d_rss.append(rss)
            else:
                rss = timed_process([
                    a.turbine, "bench", "--model-dir", model, "--device", "cpu", "--dtype", "f32",
                    "--size", a.size, "--steps", a.steps, "--batch-sizes", "1",
                    "--warmup", a.warmup, "--runs", a.runs, "--prompt", PROMPT,
                    "--init-latents", lat, "--save-images", out,
                    "--json", work / f"turbine-{r}.json"], env)
                j = json.loads((work / f"turbine-{r}.json").read_text())
                row = j["rows"][0]
                t_times += row["seconds"]
                stages.append(row)
                t_rss.append(rss)

    diff_json = work / "diff.json"
    run(ref + ["diff", "--a", work / "diffusers-0" / "0.png", "--b", work / "turbine-0" / "bs1_0.png",
               "--json", diff_json], env=env)
    diff = json.loads(diff_json.read_text())

    d = statistics.median(d_times)
    t = statistics.median(t_times)
    m = machine()
    gb = lambda xs: ", ".join(f"{x / 1e9:.1f}" if x else "?" for x in xs)  # noqa: E731
    stage_ms = {k: statistics.median(s[k] for s in stages)
                for k in ("text_encode_ms", "unet_ms", "vae_decode_ms")}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"""
### CPU side by side with diffusers ({now})

- machine: {m['cpu']}, {m['cores']} cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB ({m['host']}, {m['os']})
- command: `{a.command_line}` (threads {a.threads}, {a.rounds} process(es) per implementation alternating ABBA, {a.warmup} warm-up + {a.runs} timed run(s) each)
- commit: {commit_at_start}
- model: full SDXL-Turbo architecture, random weights (seed {a.seed}) written by diffusers in the Hub layout, {size_gb:.1f} GB of f32 safetensors; turbine loaded the same files
- setting: {a.size}, {a.steps} step, f32, guidance 0, one prompt, the same initial latents
- memory: one implementation in memory at a time (separate processes); peak RSS diffusers {gb(d_rss)} GB, turbine {gb(t_rss)} GB

| | s/image (median) | runs (s) |
|---|---:|---|
| diffusers {json.loads((work / 'diffusers-0.json').read_text())['torch']} | {d:.2f} | {', '.join(f'{x:.2f}' for x in d_times)} |
| turbine | {t:.2f} | {', '.join(f'{x:.2f}' for x in t_times)} |
| **turbine / diffusers time** | **{t / d:.2f}** | |

turbine stages (median ms): text encoders {stage_ms['text_encode_ms']:.0f}, UNet {stage_ms['unet_ms']:.0f}, VAE decode {stage_ms['vae_decode_ms']:.0f}.
Pixel difference turbine vs diffusers (8-bit RGB, 512x512): max {diff['max']}, mean {diff['mean']:.3f} (image std: diffusers {diff['images'][0]['std_a']:.1f}, turbine {diff['images'][0]['std_b']:.1f}).
"""
    print(block)
    (work / "result.md").write_text(block)
    if a.append_results:
        with open(a.append_results, "a") as f:
            f.write(block)
        log(f"appended to {a.append_results}")


if __name__ == "__main__":
    main()
