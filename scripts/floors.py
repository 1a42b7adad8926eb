#!/usr/bin/env python3
"""The two speed floors of one SDXL-Turbo image: arithmetic over the matrix rate, bytes over
memory bandwidth. Counted by walking the model's own config.json files, never guessed.

    python3 scripts/floors.py [--model-dir models/sdxl-turbo] [--size 512x512] [--steps 1]
                              [--tflops 790] [--tbps 4.8] [--batch 1,8,32] [--json PATH]
                              [--check-manifest] [--check-torch]

What is counted (per image, batch rows independent):
- FLOPs of every matrix product and convolution (2 per multiply-add): both CLIP text encoders
  at 77 tokens (the first one's last layer is skipped: SDXL reads its penultimate hidden state;
  the second one runs all layers, its pooled output needs the last), the UNet at the latent
  size once per step, the VAE decoder at the image size. Attention counts QK^T and AV.
  Norms, softmax, activations and residual adds are elementwise and not in this number (they
  are memory traffic, below).
- Bytes: the weights the image needs, read once per batch (bf16, 2 bytes a parameter; of the
  token-embedding tables only the 77 rows used), plus activations: each matrix-product /
  convolution output written once and read once (bf16), i.e. every elementwise op fused into a
  neighbour and attention scores never stored. That is a floor, not an estimate of real traffic.

The floor of one image at batch B is max(FLOPs / rate, (weights / B + activations) / bandwidth).
Defaults are the H200 figures of this workplace: ~790 TFLOP/s dense bf16 (an 8192^3 bf16
product measured 769-798 TFLOP/s) and the 4.8 TB/s datasheet bandwidth (a device copy measured
~4.3 TB/s).

--check-manifest compares the parameter counts with models/sdxl-turbo/tensors.json (the tensor
list diffusers/transformers write for these configs); --check-torch counts the same FLOPs with
torch.utils.flop_counter on diffusers/transformers models built on the meta device (needs
torch, diffusers and transformers; nothing is allocated).
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

BF16 = 2
CLIP_TOKENS = 77


class Counter:
    """FLOPs, parameters and activation elements, by component and by kind of op."""

    def __init__(self):
        self.flops = defaultdict(float)
        self.params = defaultdict(int)
        self.read_params = defaultdict(int)  # parameters an image actually reads
        self.act = defaultdict(int)  # output elements of matrix products / convolutions
        self.by_kind = defaultdict(float)
        # Elements that elementwise work touches, by (component, what): what each of turbine's
        # kernel levers saves passes over (see levers()).
        self.elems = defaultdict(int)

    def tally(self, comp, what, n):
        self.elems[(comp, what)] += n

    def linear(self, comp, tokens, cin, cout, bias=True, kind="linear"):
        p = cin * cout + (cout if bias else 0)
        self.params[comp] += p
        self.read_params[comp] += p
        self.flops[comp] += 2 * tokens * cin * cout
        self.by_kind[(comp, kind)] += 2 * tokens * cin * cout
        self.act[comp] += tokens * cout

    def conv(self, comp, h, w, cin, cout, k, kind="conv"):
        """A k x k convolution producing an h x w map (stride already applied to h, w)."""
        p = cin * cout * k * k + cout
        self.params[comp] += p
        self.read_params[comp] += p
        f = 2 * h * w * cin * cout * k * k
        self.flops[comp] += f
        self.by_kind[(comp, kind)] += f
        self.act[comp] += h * w * cout
        self.tally(comp, "conv_out", h * w * cout)
        self.tally(comp, "conv_in", h * w * cin)
        self.tally(comp, "conv_flops", f)
        if kind == "upsample":
            # upsample-conv: the same output from one 2x2 convolution of the (h/2) x (w/2) input
            # with padding 1 ((h/2+1) x (w/2+1) pixels) and 4 x cout channels.
            lh, lw = h // 2, w // 2
            self.tally(comp, "upsample_flops_saved", f - 2 * (lh + 1) * (lw + 1) * cin * 4 * cout * 4)
            # Elements moved (2 B each) before: upsampling reads the input and writes 4x it, the
            # convolution reads that and writes its output; after: the convolution reads the
            # input and writes the phases, the interleave reads them and writes the output.
            before = lh * lw * cin + 2 * h * w * cin + h * w * cout
            after = lh * lw * cin + 2 * (lh + 1) * (lw + 1) * 4 * cout + h * w * cout
            self.tally(comp, "upsample_elems_saved", before - after)

    def attention(self, comp, nq, nk, dim):
        """Scores and weighted sum over all heads (head count does not change the FLOPs)."""
        f = 2 * 2 * nq * nk * dim
        self.flops[comp] += f
        self.by_kind[(comp, "attention")] += f
        self.act[comp] += nq * dim

    def norm(self, comp, channels):
        self.params[comp] += 2 * channels
        self.read_params[comp] += 2 * channels

    def embedding(self, comp, rows, dim, used_rows):
        self.params[comp] += rows * dim
        self.read_params[comp] += used_rows * dim


# --- CLIP text encoders (transformers CLIPTextModel / CLIPTextModelWithProjection) -----------


def clip_text(c, comp, cfg, projection, layers_run):
    d, inter, n = cfg["hidden_size"], cfg["intermediate_size"], CLIP_TOKENS
    c.embedding(comp, cfg["vocab_size"], d, n)
    c.embedding(comp, cfg["max_position_embeddings"], d, cfg["max_position_embeddings"])
    for layer in range(cfg["num_hidden_layers"]):
        if layer >= layers_run:
            # Present in the checkpoint (weights count) but its output is never needed.
            c.params[comp] += 4 * (d * d + d) + 2 * 2 * d + d * inter + inter + inter * d + d
            continue
        c.tally(comp, "launches", CLIP_LAUNCHES_PER_LAYER)
        c.norm(comp, d)
        for _ in range(3):
            c.linear(comp, n, d, d)
        c.attention(comp, n, n, d)
        c.linear(comp, n, d, d)
        c.norm(comp, d)
        c.linear(comp, n, d, inter, kind="mlp")
        c.linear(comp, n, inter, d, kind="mlp")
    c.norm(comp, d)  # final_layer_norm
    if projection:
        # Applied to the pooled (end-of-text) token only.
        c.linear(comp, 1, d, cfg["projection_dim"], bias=False)


# --- UNet2DConditionModel (diffusers), SDXL's block types --------------------------------------


def unet(c, cfg, lh, lw, context_len):
    comp = "unet"
    boc = cfg["block_out_channels"]
    temb = boc[0] * 4
    cross = cfg["cross_attention_dim"]
    lpb = cfg["layers_per_block"]
    tlpb = cfg["transformer_layers_per_block"]
    if isinstance(tlpb, int):
        tlpb = [tlpb] * len(boc)
    if cfg.get("addition_embed_type") != "text_time":
        raise SystemExit("unet: only addition_embed_type text_time (SDXL) is counted")
    if not cfg.get("use_linear_projection", False):
        raise SystemExit("unet: only use_linear_projection=true (SDXL) is counted")

    # Time embedding: sinusoid(boc[0]) -> temb -> temb; text_time: 6 ids x addition_time_embed_dim
    # sinusoids + pooled text embedding -> temb -> temb.
    c.linear(comp, 1, boc[0], temb, kind="embedding")
    c.linear(comp, 1, temb, temb, kind="embedding")
    c.linear(comp, 1, cfg["projection_class_embeddings_input_dim"], temb, kind="embedding")
    c.linear(comp, 1, temb, temb, kind="embedding")

    def resnet(h, w, cin, cout):
        c.norm(comp, cin)
        c.tally(comp, "gn_silu", h * w * cin)
        c.conv(comp, h, w, cin, cout, 3, kind="resnet")
        c.linear(comp, 1, temb, cout, kind="resnet")  # time_emb_proj
        c.norm(comp, cout)
        c.tally(comp, "gn_silu", h * w * cout)
        c.conv(comp, h, w, cout, cout, 3, kind="resnet")
        c.tally(comp, "conv_residual", h * w * cout)
        if cin != cout:
            c.conv(comp, h, w, cin, cout, 1, kind="resnet")

    def transformer(h, w, ch, layers):
        n = h * w
        heads = ch // 64  # SDXL's heads are 64 wide
        c.norm(comp, ch)
        c.tally(comp, "gn", n * ch)
        c.linear(comp, n, ch, ch, kind="proj")  # proj_in
        for _ in range(layers):
            c.norm(comp, ch)
            for _ in range(3):
                c.linear(comp, n, ch, ch, bias=False, kind="attn1")
            c.attention(comp, n, n, ch)
            c.tally(comp, "scores", heads * n * n)
            c.linear(comp, n, ch, ch, kind="attn1")
            c.tally(comp, "linear_residual", n * ch)
            c.norm(comp, ch)
            c.linear(comp, n, ch, ch, bias=False, kind="attn2")
            c.linear(comp, context_len, cross, ch, bias=False, kind="attn2")
            c.linear(comp, context_len, cross, ch, bias=False, kind="attn2")
            c.attention(comp, n, context_len, ch)
            c.tally(comp, "scores", heads * n * context_len)
            c.linear(comp, n, ch, ch, kind="attn2")
            c.tally(comp, "linear_residual", n * ch)
            c.norm(comp, ch)
            c.linear(comp, n, ch, 8 * ch, kind="ff")  # GEGLU: value and gate
            c.tally(comp, "geglu_out", n * 4 * ch)
            c.linear(comp, n, 4 * ch, ch, kind="ff")
            c.tally(comp, "linear_residual", n * ch)
        c.linear(comp, n, ch, ch, kind="proj")  # proj_out
        c.tally(comp, "linear_residual", n * ch)

    h, w = lh, lw
    c.conv(comp, h, w, cfg["in_channels"], boc[0], cfg.get("conv_in_kernel", 3))
    skips = [boc[0]]
    out_ch = boc[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        in_ch, out_ch = out_ch, boc[i]
        for j in range(lpb):
            resnet(h, w, in_ch if j == 0 else out_ch, out_ch)
            if kind.startswith("CrossAttn"):
                transformer(h, w, out_ch, tlpb[i])
            skips.append(out_ch)
        if i < len(boc) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            c.conv(comp, h, w, out_ch, out_ch, 3, kind="downsample")
            skips.append(out_ch)

    mid = boc[-1]
    resnet(h, w, mid, mid)
    transformer(h, w, mid, tlpb[-1])
    resnet(h, w, mid, mid)

    rev = list(reversed(boc))
    rev_tlpb = list(reversed(tlpb))
    out_ch = rev[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        prev_out, out_ch = out_ch, rev[i]
        for j in range(lpb + 1):
            skip = skips.pop()
            resnet(h, w, (prev_out if j == 0 else out_ch) + skip, out_ch)
            if kind.startswith("CrossAttn"):
                transformer(h, w, out_ch, rev_tlpb[i])
        if i < len(boc) - 1:
            h, w = h * 2, w * 2
            c.conv(comp, h, w, out_ch, out_ch, 3, kind="upsample")
    c.norm(comp, boc[0])
    c.tally(comp, "gn_silu", h * w * boc[0])
    c.conv(comp, h, w, boc[0], cfg["out_channels"], cfg.get("conv_out_kernel", 3))


# --- AutoencoderKL decoder (diffusers) ----------------------------------------------------------


def vae_decoder(c, cfg, lh, lw):
    comp = "vae_decoder"
    boc = cfg["block_out_channels"]
    lc = cfg["latent_channels"]
    if cfg.get("use_post_quant_conv", True):
        c.conv(comp, lh, lw, lc, lc, 1)

    def resnet(h, w, cin, cout):
        c.norm(comp, cin)
        c.tally(comp, "gn_silu", h * w * cin)
        c.conv(comp, h, w, cin, cout, 3, kind="resnet")
        c.norm(comp, cout)
        c.tally(comp, "gn_silu", h * w * cout)
        c.conv(comp, h, w, cout, cout, 3, kind="resnet")
        c.tally(comp, "conv_residual", h * w * cout)
        if cin != cout:
            c.conv(comp, h, w, cin, cout, 1, kind="resnet")

    h, w = lh, lw
    top = boc[-1]
    c.conv(comp, h, w, lc, top, 3)
    resnet(h, w, top, top)
    c.norm(comp, top)
    c.tally(comp, "gn", h * w * top)
    for _ in range(3):
        c.linear(comp, h * w, top, top, kind="attention")
    c.attention(comp, h * w, h * w, top)
    c.tally(comp, "scores", h * w * h * w)  # one head
    c.linear(comp, h * w, top, top, kind="attention")
    resnet(h, w, top, top)
    rev = list(reversed(boc))
    out_ch = rev[0]
    for i in range(len(boc)):
        prev, out_ch = out_ch, rev[i]
        for j in range(cfg["layers_per_block"] + 1):
            resnet(h, w, prev if j == 0 else out_ch, out_ch)
        if i < len(boc) - 1:
            h, w = h * 2, w * 2
            c.conv(comp, h, w, out_ch, out_ch, 3, kind="upsample")
    c.norm(comp, boc[0])
    c.tally(comp, "gn_silu", h * w * boc[0])
    c.conv(comp, h, w, boc[0], cfg["out_channels"], 3)
    c.tally(comp, "rgb", h * w * cfg["out_channels"])
    return h, w


def count(model_dir: Path, width: int, height: int, steps: int) -> Counter:
    def cfg(name, file="config.json"):
        return json.loads((model_dir / name / file).read_text())

    vae_cfg = cfg("vae")
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if width % f or height % f:
        raise SystemExit(f"--size {width}x{height}: sides must be multiples of {f}")
    lh, lw = height // f, width // f

    te1, te2, unet_cfg = cfg("text_encoder"), cfg("text_encoder_2"), cfg("unet")
    c = Counter()
    # SDXL reads the penultimate hidden state of the first encoder: its last layer is dead work.
    clip_text(c, "text_encoder", te1, False, te1["num_hidden_layers"] - 1)
    clip_text(c, "text_encoder_2", te2, True, te2["num_hidden_layers"])
    context = te1["hidden_size"] + te2["hidden_size"]
    if context != unet_cfg["cross_attention_dim"]:
        raise SystemExit(
            f"unet cross_attention_dim {unet_cfg['cross_attention_dim']} != text hidden sizes "
            f"{context}"
        )
    one_step = Counter()
    unet(one_step, unet_cfg, lh, lw, CLIP_TOKENS)
    for k in one_step.flops:
        c.flops[k] += steps * one_step.flops[k]
        c.act[k] += steps * one_step.act[k]
    for k, v in one_step.by_kind.items():
        c.by_kind[k] += steps * v
    for k, v in one_step.elems.items():
        c.elems[k] += steps * v
    for k in one_step.params:
        c.params[k] += one_step.params[k]
        c.read_params[k] += one_step.read_params[k]
    oh, ow = vae_decoder(c, vae_cfg, lh, lw)
    if (oh, ow) != (height, width):
        raise SystemExit(f"vae decoder output {ow}x{oh} != requested {width}x{height}")
    return c


# Bytes per element that each lever saves, bf16 activations (2 B), from what the code paths do
# (`--kernels none` is candle's ops as turbine composes them):
# - group-norm: layers::GroupNorm's composition reads bf16 and writes f32 (6), mean (4),
#   sub (8), sqr (8), mean (4), scale (8), bias (8), [SiLU (8)], back to bf16 (6): 52 B, 60
#   with SiLU; the fused op reads twice and writes once: 6 B.
# - geglu: the projection's bias add over both halves (r2 w2 per projection element: 8 B per
#   output), gelu on the strided gate half (r2 w2), then value * gelu (r4 w2): 18 B per output;
#   fused (bias, GELU and product in one pass after a GEMM without its bias): 6 B.
# - attention: scores written by the GEMM in bf16 (2), to f32 (r2 w4), softmax (r4 w4), to bf16
#   (r4 w2), read by the second GEMM (2): 24 B per score; the op: f32 scores (4), softmax (r4
#   w2), read (2): 12 B.
# - conv: the bias add after every convolution (r2 w2) disappears into the conv's epilogue, and
#   the resnet's residual add (r4 w2) becomes one extra read in it (2): 4 B per conv output + 4 B
#   per resnet output.
# - channels-last: cuDNN's tensor-core kernels want NHWC; given NCHW it transposes the input
#   (r2 w2) and the output (r2 w2) of each convolution: 4 B per input + 4 B per output element,
#   VAE decoder only (the UNet stays NCHW). The least certain figure: how much of it cuDNN 9
#   avoids with native NCHW kernels is what the measurement will tell.
# - bias-residual: a Linear's bias add (r2 w2) folded into the residual add that follows: 4 B.
# - flash (on top of attention): the f32 scores written and read back (8) and the probabilities
#   written and read (4) never leave the kernel: 12 B per score.
# - postprocess: f32 NCHW -> host (12 B per pixel over PCIe, pageable ~10 GB/s) becomes u8 (3 B).
LEVER_BYTES = {
    "group-norm": [("gn_silu", 60 - 6), ("gn", 52 - 6)],
    "geglu": [("geglu_out", 18 - 6)],
    "attention": [("scores", 24 - 12)],
    "conv": [("conv_out", 4), ("conv_residual", 4)],
    "channels-last": [("conv_in", 4), ("conv_out", 4)],
    "bias-residual": [("linear_residual", 4)],
    "flash": [("scores", 12)],
}
CHANNELS_LAST_COMPONENTS = ("vae_decoder",)
PCIE_BPS = 10e9

# overlap: the GPU idles between batches while the host queues the next batch's text encoders,
# whose small kernels the GPU runs faster than candle can queue them (CLIP, per layer: 2 layer
# norms, 4 Linears of matmul + bias add, attention's 2 GEMMs + softmax, 2 residual adds, the MLP's
# 2 Linears and its activation (up to 3 ops): ~22 launches), and while it turns the last batch's
# bytes into images. candle's host cost per CUDA op (allocation + launch) ~7 us; the GPU's own
# time on the text encoders is subtracted. Saved once per batch, so per image it shrinks with the
# batch: predicted at the ablation's batch size.
# upsample-conv: the FLOPs the phases save, at the share of the bf16 matrix rate turbine's
# convolutions are assumed to reach (RESULTS.md's 50-60%), less the time of the bytes it adds.
CONV_MATRIX_EFFICIENCY = 0.55
# conv-graph: the share of the matrix rate assumed for the graph API's best engines where they
# beat the legacy algorithms (Hopper-specific kernels the legacy enums may not reach). A guess
# to be measured: if the legacy call already reaches the same engines the saving is zero.
GRAPH_CONV_EFFICIENCY = 0.60
CLIP_LAUNCHES_PER_LAYER = 22
HOST_US_PER_LAUNCH = 7.0
HOST_IMAGE_BYTES_PER_S = 5e9  # bytes -> RgbImage copies on the host


def levers(c: Counter, tbps: float, tflops: float = 790.0, batch: int = 8) -> dict:
    """Predicted ms saved per image by each lever, at `tbps` for elementwise kernels (overlap at
    `batch` images per batch, `tflops` for the text encoders' GPU time)."""
    out = {}
    for lever, parts in LEVER_BYTES.items():
        b = 0
        for (comp, what), n in c.elems.items():
            if lever == "channels-last" and comp not in CHANNELS_LAST_COMPONENTS:
                continue
            b += sum(per * n for w, per in parts if w == what)
        out[lever] = {"bytes": b, "ms": b / (tbps * 1e12) * 1e3}
    rgb = sum(n for (comp, what), n in c.elems.items() if what == "rgb")
    out["postprocess"] = {"bytes": rgb * (4 - 1), "ms": rgb * (4 - 1) / PCIE_BPS * 1e3}
    launches = sum(n for (comp, what), n in c.elems.items() if what == "launches")
    text_gpu_ms = sum(v for comp, v in c.flops.items() if comp.startswith("text_encoder")) * batch / (tflops * 1e12) * 1e3
    idle_ms = max(0.0, launches * HOST_US_PER_LAUNCH / 1e3 - text_gpu_ms) + rgb * batch / HOST_IMAGE_BYTES_PER_S * 1e3
    out["overlap"] = {"bytes": 0, "ms": idle_ms / batch, "launches_per_batch": launches}
    saved_flops = sum(n for (comp, what), n in c.elems.items() if what == "upsample_flops_saved")
    saved_bytes = 2 * sum(n for (comp, what), n in c.elems.items() if what == "upsample_elems_saved")
    out["upsample-conv"] = {
        "bytes": saved_bytes,
        "ms": (saved_flops / (tflops * 1e12 * CONV_MATRIX_EFFICIENCY) + saved_bytes / (tbps * 1e12)) * 1e3,
        "flops_saved": saved_flops,
    }
    conv_flops = sum(n for (comp, what), n in c.elems.items() if what == "conv_flops") - saved_flops
    out["conv-graph"] = {
        "bytes": 0,
        "ms": conv_flops / (tflops * 1e12) * (1 / CONV_MATRIX_EFFICIENCY - 1 / GRAPH_CONV_EFFICIENCY) * 1e3,
        "conv_flops": conv_flops,
    }
    # stream-order: host time only (two CUDA events created and destroyed per allocation); at the
    # ablation's batch the GPU sets the pace and overlap hides the host, so nothing per image.
    # RESULTS.md gives its expected effect on the host's time per batch (batch-1 latency).
    out["stream-order"] = {"bytes": 0, "ms": 0.0}
    return out


def check_manifest(c: Counter, model_dir: Path) -> list:
    manifest = json.loads((model_dir / "tensors.json").read_text())
    rows = []
    for comp, prefix_ok in [
        ("text_encoder", None),
        ("text_encoder_2", None),
        ("unet", None),
        ("vae_decoder", ("decoder.", "post_quant_conv.")),
    ]:
        tensors = manifest["vae" if comp == "vae_decoder" else comp]
        n = sum(
            math.prod(s)
            for name, s in tensors.items()
            if prefix_ok is None or name.startswith(prefix_ok)
        )
        rows.append((comp, c.params[comp], n))
    return rows


def torch_flops(model_dir: Path, width: int, height: int) -> dict:
    """FLOPs by torch's own counter, on meta-device diffusers/transformers models."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = {}
    meta = torch.device("meta")
    with meta:
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(model_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(model_dir / "text_encoder_2")
        )
        unet_m = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(model_dir / "unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir / "vae"))
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    ids = torch.zeros((1, CLIP_TOKENS), dtype=torch.long, device=meta)

    def measure(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    out["text_encoder"] = measure(lambda: te1(ids, output_hidden_states=True))
    out["text_encoder_2"] = measure(lambda: te2(ids, output_hidden_states=True))
    ctx = te1.config.hidden_size + te2.config.hidden_size
    out["unet"] = measure(
        lambda: unet_m(
            torch.zeros((1, 4, height // f, width // f), device=meta),
            torch.tensor([999.0], device=meta),
            encoder_hidden_states=torch.zeros((1, CLIP_TOKENS, ctx), device=meta),
            added_cond_kwargs={
                "text_embeds": torch.zeros((1, te2.config.projection_dim), device=meta),
                "time_ids": torch.zeros((1, 6), device=meta),
            },
        )
    )
    out["vae_decoder"] = measure(
        lambda: vae.decode(torch.zeros((1, 4, height // f, width // f), device=meta))
    )
    return out


def main():
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=root / "models" / "sdxl-turbo")
    ap.add_argument("--size", default="512x512", help="WIDTHxHEIGHT")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--tflops", type=float, default=790.0, help="dense bf16 matrix rate")
    ap.add_argument("--tbps", type=float, default=4.8, help="memory bandwidth, TB/s")
    ap.add_argument("--batch", default="1,8,32", help="batch sizes for the bytes floor")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--check-manifest", action="store_true")
    ap.add_argument("--check-torch", action="store_true")
    ap.add_argument("--levers", action="store_true",
                    help="print each kernel lever's predicted saving (see LEVER_BYTES)")
    ap.add_argument("--elementwise-tbps", type=float, default=3.0,
                    help="bandwidth candle's elementwise kernels reach, TB/s (for --levers)")
    ap.add_argument("--levers-json", type=Path,
                    help="write the predictions in benches/levers.json's format here")
    ap.add_argument("--levers-batch", type=int, default=8,
                    help="batch size of the overlap prediction (gpu_check.sh's ablation batch)")
    a = ap.parse_args()
    try:
        width, height = (int(x) for x in a.size.lower().split("x"))
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        sys.exit(f"bad --size '{a.size}' or --batch '{a.batch}'")
    if a.steps < 1 or any(b < 1 for b in batches):
        sys.exit("--steps and every --batch must be >= 1")

    c = count(a.model_dir, width, height, a.steps)
    comps = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    total_flops = sum(c.flops[k] for k in comps)
    weight_bytes = sum(c.read_params[k] for k in comps) * BF16
    act_bytes = sum(c.act[k] for k in comps) * 2 * BF16  # written once, read once
    t_flops = total_flops / (a.tflops * 1e12)

    print(f"SDXL-Turbo, {width}x{height}, {a.steps} step(s), per image, from {a.model_dir}")
    print()
    print("| component | params | weights read (bf16) | GFLOP | activations (bf16, w+r) |")
    print("|---|---:|---:|---:|---:|")
    for k in comps:
        label = k if k != "unet" else f"unet (x{a.steps} step)"
        print(
            f"| {label} | {c.params[k] / 1e6:.1f} M | {c.read_params[k] * BF16 / 1e9:.3f} GB "
            f"| {c.flops[k] / 1e9:.1f} | {c.act[k] * 2 * BF16 / 1e9:.3f} GB |"
        )
    print(
        f"| **total** | {sum(c.params[k] for k in comps) / 1e6:.1f} M | "
        f"{weight_bytes / 1e9:.3f} GB | {total_flops / 1e9:.1f} | {act_bytes / 1e9:.3f} GB |"
    )
    print()
    print(
        f"FLOP floor: {total_flops / 1e12:.3f} TFLOP / {a.tflops:g} TFLOP/s = "
        f"{t_flops * 1e3:.2f} ms per image ({1 / t_flops:.0f} images/s)"
    )
    rows = []
    for b in batches:
        t_bytes = (weight_bytes / b + act_bytes) / (a.tbps * 1e12)
        floor = max(t_flops, t_bytes)
        rows.append(
            {"batch": b, "bytes_ms": t_bytes * 1e3, "floor_ms": floor * 1e3,
             "images_per_s": 1 / floor}
        )
        print(
            f"bytes floor at batch {b}: ({weight_bytes / 1e9:.2f} GB / {b} + "
            f"{act_bytes / 1e9:.2f} GB) / {a.tbps:g} TB/s = {t_bytes * 1e3:.2f} ms per image; "
            f"floor {floor * 1e3:.2f} ms = {1 / floor:.0f} images/s "
            f"({'arithmetic' if t_flops >= t_bytes else 'memory'}-bound)"
        )
    print()
    print("Matrix FLOPs by kind of op:")
    for (comp, kind), v in sorted(c.by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {comp:15s} {kind:10s} {v / 1e9:10.1f} GFLOP  {100 * v / total_flops:5.1f}%")

    if a.levers or a.levers_json:
        pred = levers(c, a.elementwise_tbps, a.tflops, a.levers_batch)
        print()
        print(f"Predicted saving per image by kernel lever (elementwise at {a.elementwise_tbps:g} TB/s, "
              f"PCIe {PCIE_BPS / 1e9:g} GB/s):")
        print("| lever | GB saved | ms saved |")
        print("|---|---:|---:|")
        for k, v in pred.items():
            print(f"| {k} | {v['bytes'] / 1e9:.2f} | {v['ms']:.2f} |")
        if a.levers_json:
            a.levers_json.write_text(json.dumps({
                "_about": "Predicted ms saved per image by each turbine kernel lever against candle's "
                          f"ops, {width}x{height}, {a.steps} step(s), bf16, written by `scripts/floors.py "
                          f"--levers-json` (bytes per element: LEVER_BYTES there; elementwise kernels at "
                          f"{a.elementwise_tbps:g} TB/s; overlap at batch {a.levers_batch}: "
                          "CLIP_LAUNCHES_PER_LAYER, HOST_US_PER_LAUNCH there; upsample-conv: the "
                          f"FLOPs saved at {CONV_MATRIX_EFFICIENCY:g} of {a.tflops:g} TFLOP/s; conv-graph: "
                          f"the convolutions' FLOPs at {GRAPH_CONV_EFFICIENCY:g} instead of "
                          f"{CONV_MATRIX_EFFICIENCY:g}, a guess the ablation measures). "
                          "scripts/bench/gpu_check.py prints them next to "
                          "the measured ablation.",
                **{k: {"predicted_ms_per_image": round(v["ms"], 2), "bytes_saved": v["bytes"]}
                   for k, v in pred.items()},
            }, indent=2) + "\n")

    ok = True
    if a.check_manifest:
        print()
        for comp, ours, theirs in check_manifest(c, a.model_dir):
            same = ours == theirs
            ok &= same
            print(f"params {comp}: counted {ours}, tensors.json {theirs}: "
                  f"{'equal' if same else 'DIFFERENT'}")
    if a.check_torch:
        print()
        theirs = torch_flops(a.model_dir, width, height)
        for comp in comps:
            ours = c.flops[comp] / (a.steps if comp == "unet" else 1)
            rel = (ours - theirs[comp]) / theirs[comp]
            print(f"flops {comp}: counted {ours / 1e9:.2f} G, torch counter "
                  f"{theirs[comp] / 1e9:.2f} G ({100 * rel:+.2f}%)")
    if a.json:
        a.json.write_text(json.dumps({
            "size": [width, height], "steps": a.steps, "tflops": a.tflops, "tbps": a.tbps,
            "flops": {k: c.flops[k] for k in comps}, "params": {k: c.params[k] for k in comps},
            "weight_bytes": weight_bytes, "activation_bytes": act_bytes,
            "flop_floor_ms": t_flops * 1e3, "by_batch": rows,
        }, indent=2))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
