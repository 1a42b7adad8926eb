#!/usr/bin/env python3
"""The diffusers side of the side-by-side benchmarks (scripts/compare_cpu.sh, scripts/gpu_check.sh).

Subcommands (all paths explicit; nothing is fetched from the Hub):

  make-model   the full architecture of a config directory (models/sdxl-turbo) with fixed-seed
               random weights, written in the Hub's diffusers layout, one component at a time
  latents      standard-normal initial latents `[n, 4, h/8, w/8]` (safetensors, tensor `latents`:
               the file `turbine generate/bench --init-latents` reads)
  generate     StableDiffusionXLPipeline on those latents: PNGs and per-run seconds (JSON)
  sweep        images/s, batch latency and peak memory over batch sizes (eager or torch.compile);
               prompts cycle over DEFAULT_PROMPTS, each image's distinct (`batch_prompts`), and
               latent rows cycle, as in `turbine bench`
  img2img      StableDiffusionXLImg2ImgPipeline (an edit, the default one step at strength 0.5) of
               a made input image, every random number it draws fixed and saved in the file
               `turbine generate --image --init-latents` reads (`latents`, `image_noise`)
  diff         max / mean absolute pixel difference between two sets of PNGs
  devinfo      the GPU's measured bf16 matrix rate and copy bandwidth (METHOD.md's two ceilings)

Timing: the device is synchronised before every clock read; warm-up runs are excluded.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_prompts import PROMPTS as DEFAULT_PROMPTS, batch_prompts  # noqa: E402
from gpu_sampler import GpuMemSampler  # noqa: E402

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- writing random models ---------------------------------------------------------------------


def save_safetensors(state, path: Path, dtype):
    """Writes a safetensors file tensor by tensor, so a 10 GB UNet never needs a second copy
    in memory (safetensors.torch.save_file serialises everything to bytes first)."""
    header, offset, items = {}, 0, []
    for name in sorted(state):
        t = state[name].detach().to(dtype).contiguous()
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": ST_DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
        items.append((name, t))
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            f.write(t.cpu().reshape(-1).view(torch.uint8).numpy().data)
    tmp.rename(path)


def make_model(a):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    src, out = Path(a.config_dir), Path(a.out)
    dtype = DTYPES[a.dtype]
    variant = ".fp16" if a.variant_fp16 else ""
    device = torch.device(a.device)
    out.mkdir(parents=True, exist_ok=True)
    for f in ["model_index.json"]:
        shutil.copy(src / f, out / f)
    for d in ["scheduler", "tokenizer", "tokenizer_2"]:
        shutil.copytree(src / d, out / d, dirs_exist_ok=True)

    def unet():
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))

    def vae():
        return AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))

    def te(cls):
        return lambda comp: cls(CLIPTextConfig.from_pretrained(src / comp))

    components = [
        ("text_encoder", te(CLIPTextModel), "model"),
        ("text_encoder_2", te(CLIPTextModelWithProjection), "model"),
        ("vae", lambda _: vae(), "diffusion_pytorch_model"),
        ("unet", lambda _: unet(), "diffusion_pytorch_model"),
    ]
    for i, (comp, build, stem) in enumerate(components):
        path = out / comp / f"{stem}{variant}.safetensors"
        if path.exists() and not a.force:
            log(f"{path} exists, kept")
            continue
        t0 = time.time()
        # One seed per component: each file is reproducible on its own.
        torch.manual_seed(a.seed + i)
        with device:
            model = build(comp)
        model.eval()
        (out / comp).mkdir(exist_ok=True)
        if hasattr(model, "save_config"):
            model.save_config(out / comp)
        else:
            model.config.save_pretrained(out / comp)
        save_safetensors(model.state_dict(), path, dtype)
        n = sum(p.numel() for p in model.parameters())
        log(f"{comp}: {n / 1e6:.1f} M params -> {path} ({path.stat().st_size / 1e9:.2f} GB, "
            f"{time.time() - t0:.1f} s)")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- latents -----------------------------------------------------------------------------------


def write_latents(a):
    from safetensors.torch import save_file

    w, h = parse_size(a.size)
    g = torch.Generator().manual_seed(a.seed)
    lat = torch.randn((a.n, 4, h // 8, w // 8), generator=g, dtype=torch.float32)
    save_file({"latents": lat}, a.out)
    log(f"latents {list(lat.shape)} -> {a.out}")


def read_latents(path, n, device):
    """Rows cycle when a batch is larger than the file, as in `turbine bench`."""
    from safetensors.torch import load_file

    lat = load_file(path)["latents"]
    idx = [i % lat.shape[0] for i in range(n)]
    return lat[idx].to(device)


# --- the pipeline ------------------------------------------------------------------------------


def parse_size(s):
    w, h = (int(x) for x in s.lower().split("x"))
    return w, h


def load_pipeline(model_dir, dtype, device, variant=None):
    from diffusers import StableDiffusionXLPipeline

    t0 = time.time()
    kw = {"variant": variant} if variant else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(
        model_dir, dtype=DTYPES[dtype], local_files_only=True, **kw
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    log(f"diffusers pipeline loaded in {time.time() - t0:.1f} s ({dtype}, {device})")
    return pipe


def run_batch(pipe, prompts, latents, w, h, steps, device):
    """One end-to-end batch (text encoders, UNet steps, VAE decode, 8-bit images)."""
    sync(device)
    t0 = time.perf_counter()
    images = pipe(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=0.0,
        width=w,
        height=h,
        latents=latents,
        output_type="pil",
    ).images
    sync(device)
    return images, time.perf_counter() - t0


# The kind of layer each aten op's kernels belong to, as turbine's `bench --profile` names them;
# the first pattern found in the op's name wins.
KINDS = [
    ("conv", "conv"), ("cudnn", "conv"),
    ("scaled_dot_product", "attention"), ("flash", "attention"), ("efficient_attention", "attention"),
    ("softmax", "attention"), ("baddbmm", "attention"), ("bmm", "attention"),
    ("addmm", "linear"), ("::mm", "linear"), ("matmul", "linear"), ("linear", "linear"),
    ("group_norm", "group-norm"), ("layer_norm", "layer-norm"), ("gelu", "geglu"),
    ("upsample", "upsample"),
]


def kind_of(op):
    op = op.lower()
    return next((k for pat, k in KINDS if pat in op), "other")


def profile_batch(pipe, prompts, latents, w, h, steps, device):
    """One batch under torch.profiler: the device time of the kernels each aten op launched (its
    own, not its children's), summed by kind of layer; on the CPU, the ops' own CPU time. The
    sum over ops is checked against the sum over kernels: what no op claims is `unattributed`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    run_batch(pipe, prompts, latents, w, h, steps, device)
    with profile(activities=acts) as prof:
        _, dt = run_batch(pipe, prompts, latents, w, h, steps, device)
    kinds, kernels_us = {}, 0.0
    for e in prof.key_averages():
        on_host = str(e.device_type).endswith("CPU")
        if cuda:
            t = getattr(e, "self_device_time_total", None)
            t = getattr(e, "self_cuda_time_total", 0.0) if t is None else t
            if not on_host:
                kernels_us += t
                continue
        else:
            t = e.self_cpu_time_total if on_host else 0.0
        if t:
            kind = kind_of(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + t
    out = {"batch": len(prompts), "wall_ms": dt * 1e3, "kinds_ms": {k: v / 1e3 for k, v in kinds.items()}}
    if cuda:
        out["kernels_ms"] = kernels_us / 1e3
        out["kinds_ms"]["unattributed"] = max(0.0, (kernels_us - sum(kinds.values())) / 1e3)
    return out


def variant_of(model_dir):
    unet = Path(model_dir) / "unet"
    if (unet / "diffusion_pytorch_model.safetensors").exists():
        return None
    return "fp16"


def generate(a):
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    w, h = parse_size(a.size)
    prompts = a.prompt or DEFAULT_PROMPTS[:1]
    pipe = load_pipeline(a.model_dir, a.dtype, device, variant_of(a.model_dir))
    latents = read_latents(a.latents, len(prompts), device)
    runs = []
    for i in range(a.warmup + a.runs):
        images, dt = run_batch(pipe, prompts, latents, w, h, a.steps, device)
        kind = "warm-up" if i < a.warmup else "timed"
        log(f"diffusers {kind} run {i}: {dt:.3f} s for {len(images)} image(s)")
        if i >= a.warmup:
            runs.append(dt)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(out / f"{i}.png")
    result = {
        "impl": "diffusers",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": a.dtype,
        "device": str(device),
        "images_per_run": len(prompts),
        "seconds": runs,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


# --- an edit, with the noise it draws fixed --------------------------------------------------


def edit_input(w, h, seed):
    """The edit's input: smooth colour waves over the frame with some grain, [H, W, 3] u8 (the
    same picture at any size, so 64x64 and 512x512 runs edit the same thing)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = u / w, v / h
    a, b, c = rng.uniform(1.0, 4.0, size=3)
    base = np.stack([
        128 + 100 * np.sin(2 * np.pi * (a * u + b * v)),
        128 + 100 * np.cos(2 * np.pi * (b * u - c * v)),
        128 + 100 * np.sin(2 * np.pi * c * (u + v)),
    ], axis=-1)
    base += rng.normal(0, 12, size=base.shape)
    return np.clip(np.round(base), 0, 255).astype(np.uint8)


def img2img(a):
    """diffusers' SDXL img2img of one made input, one edit per prompt. diffusers draws three
    kinds of noise (the VAE posterior's sample, the noise added at the start step, each
    Euler-ancestral step's); all are drawn here from --seed and handed back to it in order, and
    the first two are saved for turbine. The last step's noise is scaled by 0 (no sigma after
    it), so with one step run the two files give both sides the same numbers."""
    from PIL import Image
    from safetensors.torch import save_file
    from diffusers import StableDiffusionXLImg2ImgPipeline
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as i2i
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    device = torch.device(a.device)
    w, h = parse_size(a.size)
    prompts = a.prompt or DEFAULT_PROMPTS[:2]
    run = min(int(a.steps * a.strength), a.steps)
    if run != 1:
        raise SystemExit(f"img2img: num_inference_steps {a.steps} at strength {a.strength} runs {run} "
                         "steps; turbine can be handed the noise of one step only")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = edit_input(w, h, a.seed)
    Image.fromarray(pixels).save(out / "input.png")
    shape = (len(prompts), 4, h // 8, w // 8)
    gen = torch.Generator().manual_seed(a.seed)
    image_noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    latents = torch.randn(shape, generator=gen, dtype=torch.float32)
    step_noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    save_file({"latents": latents.contiguous(), "image_noise": image_noise.contiguous()}, a.noise)
    queues = {"vae": [image_noise], "pipeline": [latents], "scheduler": [step_noise]}

    def saved(which):
        def draw(shape_, generator=None, device=None, dtype=None, layout=None):
            if not queues[which]:
                raise SystemExit(f"img2img: diffusers drew more {which} noise than was saved")
            t = queues[which].pop(0)
            if tuple(shape_) != tuple(t.shape):
                raise SystemExit(f"img2img: {which} noise of shape {tuple(shape_)}, saved {tuple(t.shape)}")
            return t.to(device=device, dtype=dtype or t.dtype)
        return draw

    t0 = time.time()
    variant = variant_of(a.model_dir)
    kw = {"variant": variant} if variant else {}
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        a.model_dir, dtype=DTYPES[a.dtype], local_files_only=True, **kw
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    log(f"diffusers img2img pipeline loaded in {time.time() - t0:.1f} s ({a.dtype}, {device})")
    originals = (vae_mod.randn_tensor, i2i.randn_tensor, ea.randn_tensor)
    try:
        vae_mod.randn_tensor = saved("vae")
        i2i.randn_tensor = saved("pipeline")
        ea.randn_tensor = saved("scheduler")
        t0 = time.perf_counter()
        with torch.no_grad():
            images = pipe(
                prompt=prompts, image=[Image.fromarray(pixels)] * len(prompts),
                num_inference_steps=a.steps, strength=a.strength, guidance_scale=0.0, output_type="pil",
            ).images
        sync(device)
        dt = time.perf_counter() - t0
    finally:
        vae_mod.randn_tensor, i2i.randn_tensor, ea.randn_tensor = originals
    left = {k: len(q) for k, q in queues.items() if q}
    if left:
        raise SystemExit(f"img2img: saved noise not drawn: {left}")
    for i, img in enumerate(images):
        img.save(out / f"{i}.png")
    changed = float(np.mean([np.abs(np.asarray(im, dtype=np.int16) - pixels).mean() for im in images]))
    result = {"impl": "diffusers img2img", "dtype": a.dtype, "device": str(device), "size": a.size,
              "num_inference_steps": a.steps, "strength": a.strength, "prompts": prompts, "seconds": dt,
              "mean_abs_change_from_input": changed}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


# --- throughput sweep on a GPU -----------------------------------------------------------------


def sweep(a):
    device = torch.device(a.device)
    w, h = parse_size(a.size)
    t_called = time.time()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    sampler = GpuMemSampler() if device.type == "cuda" else None
    if sampler:
        sampler.__enter__()
    try:
        pipe = load_pipeline(a.model_dir, a.dtype, device, variant_of(a.model_dir))
        # The budget is for measuring: the load (tens of seconds for 7 GB) does not come off it,
        # as turbine's model load does not come off its step's. (The caller's timeout bounds
        # the whole process.)
        deadline = time.time() + a.budget_s if a.budget_s else None
        log(f"pipeline ready {time.time() - t_called:.1f} s after the start")
        mode = "eager"
        if a.compile:
            mode = "compile"
            # diffusers' documented recipe: channels_last + compile of the UNet and VAE decoder.
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            # dynamic=False: each batch size gets kernels for its own static shapes, as a server
            # compiled for its batch size would (by default the second shape recompiles with a
            # symbolic batch dimension, whose kernels are slower).
            pipe.unet = torch.compile(pipe.unet, mode=a.compile_mode, fullgraph=True, dynamic=False)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=a.compile_mode, fullgraph=True,
                                            dynamic=False)
        rows, profiled = [], None
        for b in batches:
            prompts = batch_prompts(b)
            latents = read_latents(a.latents, b, device).to(DTYPES[a.dtype])
            if deadline and time.time() > deadline:
                log(f"{mode}: time budget spent, stopping before batch {b}")
                break
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_start = time.time()
            try:
                for _ in range(a.warmup):
                    _, dt = run_batch(pipe, prompts, latents, w, h, a.steps, device)
                    log(f"{mode} bs{b} warm-up {dt:.3f} s")
                times = []
                t_timed = time.time()
                while len(times) < a.runs or (sum(times) < a.min_time and len(times) < 1000):
                    images, dt = run_batch(pipe, prompts, latents, w, h, a.steps, device)
                    times.append(dt)
                    if deadline and time.time() > deadline and len(times) >= 1:
                        break
                t_timed_end = time.time()
            except torch.OutOfMemoryError as e:
                log(f"{mode} bs{b}: out of memory ({e})")
                rows.append({"batch": b, "error": "out of memory"})
                break
            t_end = time.time()
            if a.save_images:
                # One file per distinct prompt/latent row, named as `turbine bench` names them.
                Path(a.save_images).mkdir(parents=True, exist_ok=True)
                for i, img in enumerate(images[: min(b, len(DEFAULT_PROMPTS))]):
                    img.save(Path(a.save_images) / f"bs{b}_{i}.png")
            med = float(np.median(times))
            row = {
                "batch": b,
                "runs": len(times),
                "median_s": med,
                "min_s": min(times),
                "images_per_s": b / med,
                "warmup_s": t_timed - t_start,
                "started_unix_s": t_start,
                "finished_unix_s": t_end,
            }
            if device.type == "cuda":
                row["torch_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                row["torch_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
                row["peak_bytes"] = sampler.peak(t_start, t_end)
                row["gpu_busy_pct"] = sampler.busy(t_timed, t_timed_end)
            log(f"{mode} bs{b}: {med * 1e3:.1f} ms/batch, {b / med:.2f} images/s "
                f"({len(times)} runs)")
            rows.append(row)
            write_sweep(a, device, mode, rows, sampler)
        if a.profile_batch and not (deadline and time.time() > deadline):
            b = a.profile_batch
            prompts = batch_prompts(b)
            latents = read_latents(a.latents, b, device).to(DTYPES[a.dtype])
            try:
                profiled = profile_batch(pipe, prompts, latents, w, h, a.steps, device)
                log(f"{mode} profile bs{b}: " + ", ".join(
                    f"{k} {v / b:.2f}" for k, v in sorted(profiled["kinds_ms"].items())) + " ms/image")
            except Exception as e:  # the profile is a diagnosis: its failure must not cost the sweep
                log(f"{mode} profile bs{b} failed: {e!r}")
                profiled = {"batch": b, "error": repr(e)}
    finally:
        if sampler:
            sampler.__exit__()
    write_sweep(a, device, mode, rows, sampler, profiled)


def write_sweep(a, device, mode, rows, sampler, profiled=None):
    """The sweep's JSON; written after every batch size too, so a sweep stopped from outside
    (gpu_check.py bounds torch.compile's, which compiles once per batch shape) keeps its rows."""
    result = {
        "impl": f"diffusers-{mode}",
        "torch": torch.__version__,
        "dtype": a.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": a.size,
        "steps": a.steps,
        "attention": "SDPA (AttnProcessor2_0)",
        "rows": rows,
    }
    if sampler:
        result["peak_bytes_overall"] = sampler.peak()
    if profiled:
        result["profile"] = profiled
    Path(a.json).write_text(json.dumps(result, indent=2))


# --- comparing images --------------------------------------------------------------------------


def pixel_diff(paths_a, paths_b):
    from PIL import Image

    if len(paths_a) != len(paths_b) or not paths_a:
        raise SystemExit(f"diff: {len(paths_a)} vs {len(paths_b)} images")
    worst, total, n, per = 0, 0.0, 0, []
    for pa, pb in zip(paths_a, paths_b):
        x = np.asarray(Image.open(pa).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(pb).convert("RGB"), dtype=np.int16)
        if x.shape != y.shape:
            raise SystemExit(f"diff: {pa} is {x.shape}, {pb} is {y.shape}")
        d = np.abs(x - y)
        per.append({"a": str(pa), "b": str(pb), "max": int(d.max()), "mean": float(d.mean()),
                    "std_a": float(x.std()), "std_b": float(y.std())})
        worst = max(worst, int(d.max()))
        total += float(d.sum())
        n += d.size
    return {"max": worst, "mean": total / n, "images": per}


def diff(a):
    r = pixel_diff(a.a, a.b)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    print(json.dumps({"max": r["max"], "mean": r["mean"]}))


# --- ceilings ------------------------------------------------------------------------------------


def devinfo(a):
    """The two ceilings of METHOD.md, measured: bf16 matrix rate on random data and a large
    device-to-device copy (bytes read + written)."""
    dev = torch.device("cuda")
    n = 8192
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        x @ y
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    tbps = 10 * 2 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e12
    p = torch.cuda.get_device_properties(dev)
    r = {"name": p.name, "sms": p.multi_processor_count, "memory_bytes": p.total_memory,
         "bf16_tflops": tflops, "copy_tbps": tbps, "torch": torch.__version__,
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    Path(a.json).write_text(json.dumps(r, indent=2))
    print(json.dumps(r))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-model")
    p.add_argument("--config-dir", default="models/sdxl-turbo")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="f32", help="dtype stored in the files")
    p.add_argument("--variant-fp16", action="store_true",
                   help="name the files *.fp16.safetensors (the Hub's fp16 variant)")
    p.add_argument("--device", default="cpu", help="where weights are initialised")
    p.add_argument("--force", action="store_true", help="rewrite files that exist")
    p.set_defaults(fn=make_model)

    p = sub.add_parser("latents")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--size", default="512x512")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=write_latents)

    p = sub.add_parser("generate")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--latents", required=True)
    p.add_argument("--prompt", action="append")
    p.add_argument("--size", default="512x512")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="f32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--json")
    p.set_defaults(fn=generate)

    p = sub.add_parser("sweep")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--latents", required=True)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--size", default="512x512")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed runs at least")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--budget-s", type=float, help="stop starting new batch sizes after this")
    p.add_argument("--save-images", help="PNGs of the last run of each batch size here")
    p.add_argument("--profile-batch", type=int,
                   help="after the sweep, one batch of this size under torch.profiler, by kind of layer")
    p.add_argument("--json", required=True)
    p.set_defaults(fn=sweep)

    p = sub.add_parser("img2img")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompt", action="append")
    p.add_argument("--size", default="512x512")
    p.add_argument("--steps", type=int, default=2, help="num_inference_steps (of which strength runs one)")
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--dtype", choices=DTYPES, default="f32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", required=True, help="safetensors written: latents, image_noise")
    p.add_argument("--out-dir", required=True, help="input.png and one PNG per prompt")
    p.add_argument("--json")
    p.set_defaults(fn=img2img)

    p = sub.add_parser("diff")
    p.add_argument("--a", nargs="+", required=True)
    p.add_argument("--b", nargs="+", required=True)
    p.add_argument("--json")
    p.set_defaults(fn=diff)

    p = sub.add_parser("devinfo")
    p.add_argument("--json", required=True)
    p.set_defaults(fn=devinfo)

    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
