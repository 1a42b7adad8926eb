#!/usr/bin/env python3
"""`--checkpoint` on the real SDXL-Turbo architecture, without the real weights.

Draws random float16 weights for every tensor of SDXL-Turbo (models/sdxl-turbo/tensors.json)
and writes them twice: as a diffusers-layout directory (the configs and tokenizers of
models/sdxl-turbo plus the four components' weights files) and as one single-file checkpoint in
Stability AI's original layout (by the recipe scripts/fixtures/ref_single_file.py checks against
diffusers' converter). Then it runs `turbine generate` on each, with the same prompt and seed,
and reports each load time, peak memory and whether the two images are identical, as they must
be: the same weights, read from the two layouts. A third run adds a rank-16 LoRA in kohya's
layout over every attention and feed-forward module of the UNet's transformer blocks and of
the text encoders (964 modules, 113 MB), to time its fusing at load.

Needs torch (target/fixtures-venv) and about 15 GB of disk and memory; writes under --dir.

  target/fixtures-venv/bin/python scripts/bench/single_file_check.py --turbine target/debug/turbine
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "fixtures"))
from ref_single_file import execute, read_json, recipe, unet_name  # noqa: E402

REAL = ROOT / "models" / "sdxl-turbo"
FILES = {"unet": "diffusion_pytorch_model.fp16.safetensors",
         "vae": "diffusion_pytorch_model.fp16.safetensors",
         "text_encoder": "model.fp16.safetensors",
         "text_encoder_2": "model.fp16.safetensors"}


def random_weights(shapes: dict, gen: torch.Generator) -> dict:
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and name.endswith("weight"):  # norm scales
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.randn(shape, generator=gen) * 0.01
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
            t = torch.randn(shape, generator=gen) / fan_in ** 0.5
        out[name] = t.to(torch.float16)
    return out


def write(out: Path) -> Path:
    listing = read_json(REAL / "tensors.json")
    gen = torch.Generator().manual_seed(0)
    model = out / "diffusers"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(REAL, model, ignore=shutil.ignore_patterns(
        "*.safetensors", "tensors.json", "single_file_tensors.json", "manifest.json", "SOURCES.md",
        "vae-*", "turbine-lock.json"))
    components = {}
    for comp, file in FILES.items():
        components[comp] = random_weights(listing[comp], gen)
        save_file(components[comp], model / comp / file, metadata={"format": "pt"})
    rows = recipe({c: sorted(sd) for c, sd in components.items()},
                  read_json(REAL / "unet" / "config.json"), read_json(REAL / "vae" / "config.json"),
                  read_json(REAL / "text_encoder_2" / "config.json")["num_hidden_layers"])
    ckpt = {k: v.contiguous() for k, v in execute(rows, components).items()}
    ckpt["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    expected = read_json(REAL / "single_file_tensors.json")
    assert {k: list(v.shape) for k, v in ckpt.items() if k in expected} == expected
    path = out / "sd_xl_turbo_random_fp16.safetensors"
    save_file(ckpt, path, metadata={"format": "pt"})
    return path


def kohya_lora(out: Path, rank: int = 16) -> Path:
    """A random kohya-layout LoRA for the real architecture (UNet modules by their SGM names)."""
    listing = read_json(REAL / "tensors.json")
    unet_cfg = read_json(REAL / "unet" / "config.json")
    gen = torch.Generator().manual_seed(1)
    sd = {}
    leaves = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "q_proj", "k_proj",
              "v_proj", "out_proj", "fc1", "fc2")
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"),
                         ("text_encoder_2", "lora_te2_")):
        for name, shape in listing[comp].items():
            module = name.removesuffix(".weight")
            if name == module or len(shape) != 2 or not module.endswith(leaves):
                continue
            if comp == "unet":
                if "transformer_blocks" not in module:
                    continue
                module = unet_name(name, unet_cfg).removesuffix(".weight")
            key = prefix + module.replace(".", "_")
            sd[key + ".lora_down.weight"] = (torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5).half()
            sd[key + ".lora_up.weight"] = (torch.randn(shape[0], rank, generator=gen) * 0.01).half()
            sd[key + ".alpha"] = torch.tensor(float(rank)).half()
    path = out / "kohya_random_lora.safetensors"
    save_file(sd, path)
    print(f"{path.name}: {len(sd) // 3} modules, {path.stat().st_size / 1e6:.0f} MB", flush=True)
    return path


def run(turbine: str, args: list, out: Path) -> dict:
    cmd = ["/usr/bin/time", "-v", turbine, "generate", "--offline", "--prompt",
           "a lighthouse on a cliff at dusk", "--seed", "7", "--size", args[-1], "--out", str(out),
           *args[:-1]]
    start = time.monotonic()
    env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    loaded = re.search(r"model loaded elapsed=([\d.]+)(m?s)", p.stderr)
    load_s = float(loaded[1]) / (1000 if loaded[2] == "ms" else 1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)[1])
    return {"wall_s": round(wall, 1), "load_s": round(load_s, 1), "peak_rss_gib": round(rss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--turbine", default=str(ROOT / "target" / "debug" / "turbine"))
    ap.add_argument("--dir", default=str(ROOT / "target" / "single-file-check"))
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--keep", action="store_true", help="keep the 14 GB of weights written")
    ap.add_argument("--dtype", default="f32", help="turbine's --dtype (bf16 halves the memory)")
    ap.add_argument("--reuse", action="store_true", help="use the weights a --keep run left")
    a = ap.parse_args()
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    ckpt = out / "sd_xl_turbo_random_fp16.safetensors"
    if not (a.reuse and ckpt.is_file()):
        ckpt = write(out)
    print(f"weights in {out}/diffusers and {ckpt.name} ({time.monotonic() - t:.0f} s)", flush=True)
    lora = kohya_lora(out)
    common = ["--model-dir", str(out / "diffusers"), "--dtype", a.dtype]
    results = {
        "diffusers directory": run(a.turbine, [*common, a.size], out / "dir.png"),
        "single file": run(a.turbine, [*common, "--checkpoint", str(ckpt), a.size],
                           out / "ckpt.png"),
        "single file + LoRA": run(a.turbine, [*common, "--checkpoint", str(ckpt), "--lora",
                                              str(lora), a.size], out / "lora.png"),
    }
    same = (out / "dir.png").read_bytes() == (out / "ckpt.png").read_bytes()
    changed = (out / "lora.png").read_bytes() != (out / "ckpt.png").read_bytes()
    print(json.dumps({"size": a.size, "dtype": a.dtype, "identical_png": same,
                      "lora_changed_the_image": changed, **results}, indent=1))
    if not a.keep:
        shutil.rmtree(out / "diffusers")
        ckpt.unlink()
    sys.exit(0 if same and changed else 1)


if __name__ == "__main__":
    main()
