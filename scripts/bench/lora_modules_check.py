#!/usr/bin/env python3
"""`serve --lora-modules` on the real SDXL-Turbo architecture, without the real weights.

Uses the random float16 weights of scripts/bench/single_file_check.py (a diffusers-layout
folder; written unless --reuse finds them) and its random rank-16 kohya LoRA over every
attention and feed-forward module of the UNet's transformer blocks and of both text encoders
(964 modules). Then:

1. `turbine serve` of the model alone: its load time (start to healthy), its resident memory
   once loaded and its peak (VmRSS, VmHWM from /proc), and one image;
2. `turbine serve --lora-modules style=LORA`: the same, the image of the model and the image of
   `model: "style"`;
3. `turbine generate --lora LORA`: the image of the model with the LoRA fused at load;
4. `turbine serve --allow-runtime-lora-updating` of the model alone: its memory (what the flag
   keeps for building adapters later); then `POST /v1/load_lora_adapter` of the same LoRA as
   `style` (its time and the memory after), the image of `model: "style"`, and `POST
   /v1/unload_lora_adapter` (the memory after: the adapter's weights freed).

It checks that the model's image is the same pixels with and without the adapter beside it,
that the adapter's image is the pixels of `generate --lora` (the same fused weights), loaded at
start or while serving, and that the LoRA changed the image; and it prints the memory an adapter
costs next to what it predicts, the bytes of the weights the LoRA adapts in the run dtype, and
what the flag costs next to its prediction: the UNet's `to_q` weights, which the model holds
only with the attention's scale folded in (on the CPU; a CUDA build keeps the upsamplers'
convolutions too).

Needs torch (target/fixtures-venv), Pillow, about 15 GB of disk and 20 GB of memory.

  target/fixtures-venv/bin/python scripts/bench/lora_modules_check.py --reuse --dtype bf16
"""

import argparse
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from single_file_check import REAL, ROOT, kohya_lora, read_json, run, write  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk"
SEED = 7


def adapted_bytes(lora: Path, dtype: str) -> int:
    """The bytes of the model's weights the LoRA's modules adapt, in the run dtype."""
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        modules = {k.removesuffix(".lora_down.weight") for k in f.keys() if k.endswith(".lora_down.weight")}
    listing = read_json(REAL / "tensors.json")
    size = {"f32": 4, "bf16": 2, "f16": 2}[dtype]
    total = 0
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"),
                         ("text_encoder_2", "lora_te2_")):
        n = sum(1 for m in modules if m.startswith(prefix))
        if n == 0:
            continue
        # The LoRA names the UNet's modules in the original layout; count by shape instead of
        # by name: every 2-D weight of the listed kinds in the transformer blocks.
        leaves = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "q_proj",
                  "k_proj", "v_proj", "out_proj", "fc1", "fc2")
        picked = [s for name, s in listing[comp].items()
                  if len(s) == 2 and name.removesuffix(".weight").endswith(leaves)
                  and (comp != "unet" or "transformer_blocks" in name)]
        assert len(picked) == n, (comp, len(picked), n)
        total += sum(s[0] * s[1] for s in picked) * size
    return total


def kept_bytes(dtype: str) -> int:
    """What --allow-runtime-lora-updating keeps on the CPU beyond the model: the UNet's unscaled
    `to_q` weights (the model holds them scaled by 1/8), in the run dtype."""
    listing = read_json(REAL / "tensors.json")
    size = {"f32": 4, "bf16": 2, "f16": 2}[dtype]
    return sum(s[0] * s[1] for name, s in listing["unet"].items()
               if name.endswith("to_q.weight")) * size


def post(base: str, path: str, body: dict) -> tuple:
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def diff(x: bytes, y: bytes) -> list:
    """Largest and mean absolute difference of two images' 8-bit values."""
    d = [abs(p - q) for p, q in zip(x, y)]
    return [max(d), round(sum(d) / len(d), 3)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1])


def serve(turbine: str, common: list, extra: list, models: list, size: str, logs: Path,
          runtime_lora: Path = None) -> dict:
    port = free_port()
    cmd = [turbine, "serve", "--offline", *common, "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--min-image-side", "64", "--default-size", "64x64",
           "--warmup-images", "1", *extra]
    env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
    log = open(logs / f"serve-{'runtime' if runtime_lora else len(extra)}.log", "w")
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if p.poll() is not None:
                sys.exit(f"{' '.join(cmd)} exited {p.returncode}: see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        ready_s = time.monotonic() - start
        out = {"ready_s": round(ready_s, 1),
               "rss_gib": round(status_kib(p.pid, "VmRSS") / 2**20, 2),
               "peak_rss_gib": round(status_kib(p.pid, "VmHWM") / 2**20, 2), "images": {}}
        if runtime_lora:
            t = time.monotonic()
            status, text = post(base, "/v1/load_lora_adapter",
                                {"lora_name": "style", "lora_path": str(runtime_lora)})
            if status != 200:
                sys.exit(f"load_lora_adapter: {status} {text}")
            out["load_s"] = round(time.monotonic() - t, 1)
            out["rss_loaded_gib"] = round(status_kib(p.pid, "VmRSS") / 2**20, 2)
        for model in models:
            body = json.dumps({"prompt": PROMPT, "seed": SEED, "model": model, "size": size,
                               "response_format": "b64_json"}).encode()
            req = urllib.request.Request(base + "/v1/images/generations", body,
                                         {"Content-Type": "application/json"})
            t = time.monotonic()
            with urllib.request.urlopen(req, timeout=3600) as r:
                data = json.load(r)
            out[f"{model}_s"] = round(time.monotonic() - t, 1)
            png = base64.b64decode(data["data"][0]["b64_json"])
            out["images"][model] = Image.open(io.BytesIO(png)).convert("RGB").tobytes()
        out["rss_after_gib"] = round(status_kib(p.pid, "VmRSS") / 2**20, 2)
        out["peak_rss_after_gib"] = round(status_kib(p.pid, "VmHWM") / 2**20, 2)
        if runtime_lora:
            status, text = post(base, "/v1/unload_lora_adapter", {"lora_name": "style"})
            if status != 200:
                sys.exit(f"unload_lora_adapter: {status} {text}")
            # Freed on the worker once its last request is done (none is left here).
            time.sleep(2)
            out["rss_unloaded_gib"] = round(status_kib(p.pid, "VmRSS") / 2**20, 2)
        return out
    finally:
        p.terminate()
        p.wait()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--turbine", default=str(ROOT / "target" / "debug" / "turbine"))
    ap.add_argument("--dir", default=str(ROOT / "target" / "single-file-check"))
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--reuse", action="store_true", help="use the weights a --keep run left")
    a = ap.parse_args()
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (a.reuse and (out / "diffusers" / "unet").is_dir()):
        write(out)
    lora = kohya_lora(out)
    predicted = adapted_bytes(lora, a.dtype)
    print(f"predicted: an adapter holds {predicted / 2**30:.2f} GiB of fused weights", flush=True)
    common = ["--model-dir", str(out / "diffusers"), "--dtype", a.dtype]
    alone = serve(a.turbine, common, [], ["sdxl-turbo"], a.size, out)
    print({k: v for k, v in alone.items() if k != "images"}, flush=True)
    adapter = serve(a.turbine, common, ["--lora-modules", f"style={lora}"],
                    ["sdxl-turbo", "style"], a.size, out)
    print({k: v for k, v in adapter.items() if k != "images"}, flush=True)
    runtime = serve(a.turbine, common, ["--allow-runtime-lora-updating"], ["sdxl-turbo", "style"],
                    a.size, out, runtime_lora=lora)
    print({k: v for k, v in runtime.items() if k != "images"}, flush=True)
    fused = run(a.turbine, [*common, "--lora", str(lora), a.size], out / "fused.png")
    fused_pixels = Image.open(out / "fused.png").convert("RGB").tobytes()
    style, own = adapter["images"]["style"], adapter["images"]["sdxl-turbo"]
    wh = tuple(int(v) for v in a.size.split("x"))
    for name, pixels in (("adapter", style), ("model", own)):
        Image.frombytes("RGB", wh, pixels).save(out / f"{name}.png")
    to_fused, own_to_fused = diff(style, fused_pixels), diff(own, fused_pixels)
    checks = {
        "model_image_unchanged_by_the_adapter": alone["images"]["sdxl-turbo"] == own,
        # The same fused weights (the LoRA fused into the file's weights, then rounded to the
        # run dtype once), so the same pixels.
        "adapter_image_is_generate_lora": style == fused_pixels,
        "lora_changed_the_image": style != own,
        "runtime_adapter_image_is_generate_lora": runtime["images"]["style"] == fused_pixels,
        "model_image_unchanged_by_the_flag": runtime["images"]["sdxl-turbo"] == own,
    }
    for r in (alone, adapter, runtime):
        del r["images"]
    print(json.dumps({"size": a.size, "dtype": a.dtype,
                      "adapter_vs_generate_lora_max_mean_diff": to_fused,
                      "model_vs_generate_lora_max_mean_diff": own_to_fused,
                      "predicted_adapter_gib": round(predicted / 2**30, 2),
                      "adapter_rss_gib": round(adapter["rss_gib"] - alone["rss_gib"], 2),
                      "predicted_flag_gib": round(kept_bytes(a.dtype) / 2**30, 2),
                      "flag_rss_gib": round(runtime["rss_gib"] - alone["rss_gib"], 2),
                      "runtime_adapter_rss_gib": round(runtime["rss_loaded_gib"]
                                                       - runtime["rss_gib"], 2),
                      "model_alone": alone, "with_adapter": adapter,
                      "runtime_loaded": runtime,
                      "generate_lora": fused, **checks}, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
