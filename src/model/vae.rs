//! SDXL's VAE, mirroring diffusers 0.42.1 `AutoencoderKL`
//! (`models/autoencoders/autoencoder_kl.py`, `Encoder`/`Decoder` in
//! `models/autoencoders/vae.py`), built from the UNet's resnet, resampler and attention
//! layers, plus the mid-block's spatial self-attention, which only the VAE has.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::model::chunks::{map_runs, MAX_TENSOR_ELEMENTS};
use crate::model::loader::{self, LoadError, LoadResult, ModelDir};
use crate::model::profile::span;
use crate::model::unet::attention::{to_tokens, Attention};
use crate::model::unet::layers::{group_norm_composed, Conv2d, GroupNorm, UpsampleConv};
use crate::model::unet::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::ops::{self, Kernels};

/// diffusers' `Encoder`/`Decoder` hard-code this epsilon for every norm of the VAE.
const VAE_EPS: f64 = 1e-6;

/// Whether the levers of the channels-last decoder are on: [`Kernels::CHANNELS_LAST`], and
/// [`Kernels::CONV`], whose convolution it is a layout of.
fn channels_last_levers() -> bool {
    ops::enabled(Kernels::CHANNELS_LAST) && ops::enabled(Kernels::CONV)
}

/// The `vae/config.json` of a diffusers checkpoint; field names and defaults are those of
/// [`AutoencoderKL.__init__`](https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl.py)
/// (SDXL-Turbo's file: <https://huggingface.co/stabilityai/sdxl-turbo/blob/main/vae/config.json>).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub scaling_factor: f64,
    /// Used by SD3/Flux pipelines only; the SDXL pipeline ignores it.
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics; when present the SDXL pipeline un-normalises with them
    /// (`z * std / scaling_factor + mean`) instead of dividing by `scaling_factor` alone.
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs this VAE in f32 even in a half-precision pipeline when set (the stock
    /// SDXL VAE overflows in f16).
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_BLOCK.to_string()],
            up_block_types: vec![UP_BLOCK.to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

impl AutoencoderKLConfig {
    /// Reads and validates `vae/config.json`.
    pub fn from_file(path: &Path) -> LoadResult<Self> {
        let cfg: Self = loader::read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// An upper bound on the elements of the decoder's largest activation for one image, per
    /// latent pixel: every map is `channels x (h << level) x (w << level)`, so the largest is
    /// the widest of `conv_in`/the mid-block's, each up block's input and output, and each
    /// upsampler's output (which is also the size of the four-phase output of the
    /// `upsample-conv` lever). The mid-block attention's scores are chunked by the attention op
    /// itself and are not counted.
    pub fn decoder_elements_per_latent_pixel(&self) -> usize {
        let ch = &self.block_out_channels;
        let Some(&last) = ch.last() else {
            return 0;
        };
        let mut widest = last.max(self.latent_channels);
        let n = ch.len();
        for (i, (cin, cout)) in up_block_channels(self).into_iter().enumerate() {
            let area = 1usize << (2 * i);
            widest = widest.max(cin.max(cout) * area);
            if i + 1 < n {
                widest = widest.max(cout * area * 4);
            }
        }
        widest.max(self.out_channels << (2 * (n - 1)))
    }

    /// Rejects configurations this implementation does not build, naming the field.
    pub fn validate(&self, path: &Path) -> LoadResult<()> {
        let unsupported = |field: String, value: String, why: &str| LoadError::Unsupported {
            path: path.to_path_buf(),
            field,
            value,
            why: why.to_string(),
        };
        let invalid = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(invalid("`block_out_channels` is empty".into()));
        }
        for (field, types, allowed) in [
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
            ("up_block_types", &self.up_block_types, UP_BLOCK),
        ] {
            if types.len() != n {
                return Err(invalid(format!(
                    "`{field}` has {} entries but `block_out_channels` has {n}",
                    types.len()
                )));
            }
            if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != allowed) {
                return Err(unsupported(
                    format!("{field}[{i}]"),
                    format!("{t:?}"),
                    &format!("only {allowed} is implemented"),
                ));
            }
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(unsupported(
                "act_fn".into(),
                format!("{:?}", self.act_fn),
                "only silu is implemented",
            ));
        }
        let g = self.norm_num_groups;
        if let Some((i, c)) = self
            .block_out_channels
            .iter()
            .enumerate()
            .find(|(_, &c)| g == 0 || !c.is_multiple_of(g))
        {
            return Err(invalid(format!(
                "`block_out_channels[{i}]` = {c} is not divisible by `norm_num_groups` = {g}"
            )));
        }
        Ok(())
    }
}

/// The VAE mid-block's attention: GroupNorm, single-head self-attention over all pixels
/// (`to_q`/`to_k`/`to_v` with bias, `to_out.0`), residual. diffusers builds it with
/// `attention_head_dim = channels` (one head) and the mid-block's `output_scale_factor` of 1 as
/// `rescale_output_factor`, so neither is a parameter here. (Checkpoints older than diffusers
/// 0.14 name these `query`/`key`/`value`/`proj_attn`; they are not supported.)
#[derive(Debug, Clone)]
struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl SpatialSelfAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, VAE_EPS)?,
            attn: Attention::new(vb, channels, None, 1, channels, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.group_norm.forward(xs)?;
        let out = self.attn.forward(&to_tokens(&normed)?, None)?;
        out.reshape((b, h, w, c))?.permute((0, 3, 1, 2))? + xs
    }
}

/// `UNetMidBlock2D` without time embedding: `resnets.0`, then (`attentions.0`, `resnets.1`).
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialSelfAttention>,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let rcfg = unconditioned(channels, channels, groups);
        let rvb = vb.pp("resnets");
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(rvb.pp(i.to_string()), &rcfg))
            .collect::<Result<Vec<_>>>()?;
        let attentions = if add_attention {
            vec![SpatialSelfAttention::new(
                vb.pp("attentions").pp("0"),
                channels,
                groups,
            )?]
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, None)?;
        if let Some(attn) = self.attentions.first() {
            xs = attn.forward(&xs)?;
        }
        self.resnets[1].forward(&xs, None)
    }
}

fn unconditioned(in_channels: usize, out_channels: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        groups_out: groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
    }
}

/// `resnets.*` then an optional resampler: `DownEncoderBlock2D` / `UpDecoderBlock2D`.
#[derive(Debug, Clone)]
struct ResnetStack {
    resnets: Vec<ResnetBlock2D>,
}

impl ResnetStack {
    fn new(vb: &VarBuilder, cin: usize, cout: usize, layers: usize, groups: usize) -> Result<Self> {
        let rvb = vb.pp("resnets");
        let resnets = (0..layers)
            .map(|i| {
                let c = if i == 0 { cin } else { cout };
                ResnetBlock2D::new(rvb.pp(i.to_string()), &unconditioned(c, cout, groups))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { resnets })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward(&xs, None)?;
        }
        Ok(xs)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(ResnetStack, Option<Downsample2D>)>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (n, g) = (ch.len(), cfg.norm_num_groups);
        let dvb = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let bvb = dvb.pp(i.to_string());
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let stack = ResnetStack::new(&bvb, cin, ch[i], cfg.layers_per_block, g)?;
            // The encoder's downsamplers use padding 0 (pad bottom/right by one, then conv).
            let down = if i + 1 < n {
                Some(Downsample2D::new(
                    bvb.pp("downsamplers").pp("0"),
                    ch[i],
                    ch[i],
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push((stack, down));
        }
        let last = ch[n - 1];
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, last, VAE_EPS)?,
            // double_z: the encoder emits mean and log-variance.
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for (stack, down) in &self.down_blocks {
            xs = stack.forward(&xs)?;
            if let Some(d) = down {
                xs = d.forward(&xs)?;
            }
        }
        let xs = self.mid_block.forward(&xs)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<(ResnetStack, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// The encoder's widest map at each resolution level: `conv_in` and the first block at full
/// resolution; each later block's input (its predecessor's downsampled output) and output.
fn encoder_widths(cfg: &AutoencoderKLConfig) -> Vec<usize> {
    let ch = &cfg.block_out_channels;
    (0..ch.len())
        .map(|i| {
            let input = if i == 0 { cfg.in_channels } else { ch[i - 1] };
            input.max(ch[i]).max(2 * cfg.latent_channels)
        })
        .collect()
}

/// `(in, out)` channels of each of the decoder's `up_blocks`, in order (widest first); every
/// block but the last ends with an upsampler.
fn up_block_channels(cfg: &AutoencoderKLConfig) -> Vec<(usize, usize)> {
    let ch = &cfg.block_out_channels;
    let mut prev = ch[ch.len() - 1];
    ch.iter()
        .rev()
        .map(|&c| (std::mem::replace(&mut prev, c), c))
        .collect()
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (n, g) = (ch.len(), cfg.norm_num_groups);
        let last = ch[n - 1];
        let uvb = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        for (i, (cin, cout)) in up_block_channels(cfg).into_iter().enumerate() {
            let bvb = uvb.pp(i.to_string());
            let stack = ResnetStack::new(&bvb, cin, cout, cfg.layers_per_block + 1, g)?;
            let up = if i + 1 < n {
                Some(Upsample2D::new(bvb.pp("upsamplers").pp("0"), cout, cout)?)
            } else {
                None
            };
            up_blocks.push((stack, up));
        }
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, last, 3, 1, 1)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, ch[0], VAE_EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for (stack, up) in &self.up_blocks {
            xs = stack.forward(&xs)?;
            if let Some(u) = up {
                xs = u.forward(&xs, None)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

// ---- The decoder in channels-last (NHWC) layout ----
//
// cuDNN's tensor-core convolutions compute in NHWC; handed NCHW bf16 tensors, they transpose the
// input and the output of every convolution. The decoder is most of an image's FLOPs and
// activation bytes (3x3 convolutions of 128..512 channels at 64^2..512^2), so on CUDA it runs
// NHWC from end to end: the latents are transposed once on the way in (4 channels), and the
// image leaves as an NCHW view of the NHWC result. The layers below read the same checkpoint
// tensors as the NCHW ones, with the convolution weights permuted once to KRSC `[O, kh, kw, I]`,
// and are built only where this path runs (see `AutoencoderKL::new`).
//
// The path is a layout for turbine's convolution ([`Kernels::CONV`]): candle's is NCHW only, so
// without that lever every convolution here would be wrapped in the very transposes the path
// exists to remove, and `decode` takes it only with both levers on. What it saves is measured as
// `--kernels all` against `all,-channels-last`.

/// A stride-1 convolution on `[N, H, W, C]` (weight `[O, kh, kw, I]`), read from `vb`.
fn conv_nhwc(vb: VarBuilder, cin: usize, cout: usize, kernel: usize, pad: usize) -> Result<Conv2d> {
    Conv2d::new(vb, cin, cout, kernel, pad, 1)?.to_channels_last()
}

/// GroupNorm (+ SiLU) on `[N, H, W, C]`, weight and bias in the model dtype (what diffusers
/// holds in a half-precision pipeline), statistics in f32: one [`ops::group_norm_channels_last`]
/// call with [`Kernels::GROUP_NORM`], otherwise composed from candle ops in NHWC as
/// [`GroupNorm`] composes it in NCHW (so that `all,-group-norm` measures the lever here too).
#[derive(Debug, Clone)]
struct GroupNormNhwc {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNormNhwc {
    fn new(vb: VarBuilder, groups: usize, channels: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
        })
    }

    fn forward(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        span("group-norm", || {
            if ops::enabled(Kernels::GROUP_NORM) {
                ops::group_norm_channels_last(
                    xs,
                    self.groups,
                    &self.weight,
                    &self.bias,
                    VAE_EPS,
                    silu,
                )
            } else {
                self.composed(xs, silu)
            }
        })
    }

    /// The f32 composition ([`group_norm_composed`]) on `[N, H·W, G, C/G]`, one rounding at
    /// the end.
    fn composed(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let (n, h, w, c) = xs.dims4()?;
        let g = self.groups;
        let per_group = |t: &Tensor| t.to_dtype(DType::F32)?.reshape((1, 1, g, c / g));
        let x = xs.to_dtype(DType::F32)?.reshape((n, h * w, g, c / g))?;
        let (weight, bias) = (per_group(&self.weight)?, per_group(&self.bias)?);
        group_norm_composed(&x, &[1, 3], &weight, &bias, VAE_EPS, silu)?
            .to_dtype(xs.dtype())?
            .reshape((n, h, w, c))
    }
}

/// [`ResnetBlock2D`] as the VAE builds it (no time embedding, output scale 1), with the
/// shortcut added inside `conv2`.
#[derive(Debug, Clone)]
struct ResnetNhwc {
    norm1: GroupNormNhwc,
    conv1: Conv2d,
    norm2: GroupNormNhwc,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetNhwc {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv_nhwc(vb.pp("conv_shortcut"), cin, cout, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNormNhwc::new(vb.pp("norm1"), groups, cin)?,
            conv1: conv_nhwc(vb.pp("conv1"), cin, cout, 3, 1)?,
            norm2: GroupNormNhwc::new(vb.pp("norm2"), groups, cout)?,
            conv2: conv_nhwc(vb.pp("conv2"), cout, cout, 3, 1)?,
            conv_shortcut,
        })
    }

    /// `layers` resnets under `{vb}.resnets.*`, the first taking `cin` channels.
    fn stack(
        vb: &VarBuilder,
        cin: usize,
        cout: usize,
        layers: usize,
        groups: usize,
    ) -> Result<Vec<Self>> {
        let rvb = vb.pp("resnets");
        (0..layers)
            .map(|i| {
                let c = if i == 0 { cin } else { cout };
                Self::new(rvb.pp(i.to_string()), c, cout, groups)
            })
            .collect()
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(xs, true)?)?;
        let h = self.norm2.forward(&h, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        self.conv2.forward_residual(&h, Some(&shortcut))
    }
}

/// [`SpatialSelfAttention`] on `[N, H, W, C]`: the pixels are already tokens `[N, HW, C]`, so
/// the two transposes around the attention disappear.
#[derive(Debug, Clone)]
struct SpatialSelfAttentionNhwc {
    group_norm: GroupNormNhwc,
    /// The NCHW block's projections (shared tensors: they do not depend on the layout).
    attn: Attention,
}

impl SpatialSelfAttentionNhwc {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let tokens = self.group_norm.forward(xs, false)?.reshape((b, h * w, c))?;
        self.attn.forward(&tokens, None)?.reshape((b, h, w, c))? + xs
    }
}

/// The [`Decoder`] in channels-last layout.
#[derive(Debug, Clone)]
struct DecoderNhwc {
    conv_in: Conv2d,
    mid_resnets: [ResnetNhwc; 2],
    mid_attention: Option<SpatialSelfAttentionNhwc>,
    /// Each up block's resnets, then its upsampler.
    up_blocks: Vec<(Vec<ResnetNhwc>, Option<UpsampleConv>)>,
    conv_norm_out: GroupNormNhwc,
    conv_out: Conv2d,
}

impl DecoderNhwc {
    /// `nchw` is the decoder already built from `vb`: its attention projections are reused.
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig, nchw: &Decoder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (n, g) = (ch.len(), cfg.norm_num_groups);
        let last = ch[n - 1];
        let mvb = vb.pp("mid_block");
        let mid_resnet =
            |i: usize| ResnetNhwc::new(mvb.pp("resnets").pp(i.to_string()), last, last, g);
        let mid_attention = match nchw.mid_block.attentions.first() {
            Some(a) => Some(SpatialSelfAttentionNhwc {
                group_norm: GroupNormNhwc::new(
                    mvb.pp("attentions").pp("0").pp("group_norm"),
                    g,
                    last,
                )?,
                attn: a.attn.clone(),
            }),
            None => None,
        };
        let uvb = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        for (i, (cin, cout)) in up_block_channels(cfg).into_iter().enumerate() {
            let bvb = uvb.pp(i.to_string());
            let resnets = ResnetNhwc::stack(&bvb, cin, cout, cfg.layers_per_block + 1, g)?;
            let up = if i + 1 < n {
                let conv = conv_nhwc(bvb.pp("upsamplers").pp("0").pp("conv"), cout, cout, 3, 1)?;
                Some(UpsampleConv::new(conv)?)
            } else {
                None
            };
            up_blocks.push((resnets, up));
        }
        Ok(Self {
            conv_in: conv_nhwc(vb.pp("conv_in"), cfg.latent_channels, last, 3, 1)?,
            mid_resnets: [mid_resnet(0)?, mid_resnet(1)?],
            mid_attention,
            up_blocks,
            conv_norm_out: GroupNormNhwc::new(vb.pp("conv_norm_out"), g, ch[0])?,
            conv_out: conv_nhwc(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1)?,
        })
    }

    /// `[N, h, w, latent]` to `[N, H, W, out_channels]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_resnets[0].forward(&xs)?;
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs)?;
        }
        xs = self.mid_resnets[1].forward(&xs)?;
        for (resnets, up) in &self.up_blocks {
            for r in resnets {
                xs = r.forward(&xs)?;
            }
            if let Some(up) = up {
                xs = up.forward(&xs)?;
            }
        }
        let xs = self.conv_norm_out.forward(&xs, true)?;
        self.conv_out.forward(&xs)
    }
}

/// The KL autoencoder: `encoder.*`, `quant_conv`, `post_quant_conv`, `decoder.*`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    /// The decoder's channels-last twin, where that path can run.
    decoder_nhwc: Option<DecoderNhwc>,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    latent_channels: usize,
    scaling_factor: f64,
    scale_factor: usize,
    /// [`AutoencoderKLConfig::decoder_elements_per_latent_pixel`].
    decoder_width: usize,
    /// The encoder's widest channel count at each resolution level, full resolution first
    /// ([`AutoencoderKL::encoder_elements_at`]).
    encoder_widths: Vec<usize>,
    dtype: DType,
}

impl AutoencoderKL {
    /// Builds the model from a validated config; tensors are read from `vb` (in its dtype and
    /// on its device) under the checkpoint's names.
    ///
    /// On CUDA with [`Kernels::CHANNELS_LAST`] and [`Kernels::CONV`] on, the decoder's
    /// channels-last layers are built too (a second copy of the decoder's convolution weights,
    /// ~100 MB in bf16 for SDXL), so that [`AutoencoderKL::decode`] can take that path. Only in
    /// half precision: the transposes it saves are those of cuDNN's tensor-core kernels, while
    /// f32 convolutions run FMA math (no TF32) on NCHW natively (an f16 pipeline decodes in f32
    /// when the VAE's `force_upcast` is set). And only with the `cudnn` feature: without it
    /// `ops::conv2d` is candle's NCHW convolution between two transposes.
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let channels_last = cfg!(feature = "cudnn")
            && vb.device().is_cuda()
            && matches!(vb.dtype(), DType::BF16 | DType::F16)
            && channels_last_levers();
        Self::new_with_channels_last(vb, cfg, channels_last)
    }

    /// [`AutoencoderKL::new`] with the choice made by the caller: `channels_last` builds the
    /// decoder's channels-last weights on any device, for
    /// [`AutoencoderKL::decode_channels_last`].
    pub fn new_with_channels_last(
        vb: VarBuilder,
        cfg: &AutoencoderKLConfig,
        channels_last: bool,
    ) -> Result<Self> {
        // `from_file` has validated already; a config built in code gets the same checks.
        cfg.validate(Path::new("vae/config.json"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 0, 1)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 0, 1)?)
        } else {
            None
        };
        let decoder = Decoder::new(vb.pp("decoder"), cfg)?;
        let decoder_nhwc = if channels_last {
            Some(DecoderNhwc::new(vb.pp("decoder"), cfg, &decoder)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder,
            decoder_nhwc,
            quant_conv,
            post_quant_conv,
            latent_channels: l,
            scaling_factor: cfg.scaling_factor,
            scale_factor: cfg.scale_factor(),
            decoder_width: cfg.decoder_elements_per_latent_pixel(),
            encoder_widths: encoder_widths(cfg),
            dtype: vb.dtype(),
        })
    }

    /// Reads `vae/config.json` and `vae/diffusion_pytorch_model[.fp16].safetensors` from a
    /// model directory, and checks that every tensor of the file was used.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> LoadResult<Self> {
        let cfg = AutoencoderKLConfig::from_file(&dir.component("vae")?.join("config.json"))?;
        loader::build_checked(
            &dir.weights("vae", "diffusion_pytorch_model")?,
            dtype,
            device,
            |vb| Self::new(vb, &cfg),
        )
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The config's `scaling_factor` (0.13025 for SDXL).
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// Image pixels per latent pixel along each side: 2^(len(block_out_channels) - 1).
    pub fn scale_factor(&self) -> usize {
        self.scale_factor
    }

    /// Latents `z` `[B, latent, h, w]` (already divided by `scaling_factor`, as diffusers'
    /// `vae.decode` takes them) to images `[B, out_channels, h*f, w*f]` in about [-1, 1].
    ///
    /// On CUDA, with [`Kernels::CHANNELS_LAST`] and [`Kernels::CONV`] on and the channels-last
    /// weights built, this is [`AutoencoderKL::decode_channels_last`], whose result is an NCHW
    /// view of NHWC memory; otherwise the NCHW decoder, with a contiguous result. A batch whose
    /// largest map would outgrow [`MAX_TENSOR_ELEMENTS`] is decoded in runs of images
    /// ([`AutoencoderKL::decode_within`]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_within(z, MAX_TENSOR_ELEMENTS)
    }

    /// [`AutoencoderKL::decode`] with no decoder activation over `max_elements`: the batch
    /// runs in the fewest even runs of images that keep within it (the same images, since the
    /// decoder treats each image on its own). Fails when one image alone is over it.
    pub fn decode_within(&self, z: &Tensor, max_elements: usize) -> Result<Tensor> {
        if self.decoder_nhwc.is_some() && z.device().is_cuda() && channels_last_levers() {
            return self.decode_channels_last_within(z, max_elements);
        }
        let (per_image, what) = self.run_bound(z)?;
        map_runs(z, per_image, max_elements, &what, |z, _, _| {
            self.decoder.forward(&self.post_quant(z)?)
        })
    }

    /// [`AutoencoderKL::decode`] through the channels-last decoder, on any device: the same
    /// images `[B, out_channels, H, W]`, as a permuted view of an `[B, H, W, out_channels]`
    /// tensor (consumers that want NHWC pixels read it without a copy). Its convolutions follow
    /// [`Kernels::CONV`] like every [`Conv2d`] (candle's between transposes when it is off).
    /// Fails when the model was built without the channels-last weights.
    pub fn decode_channels_last(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_channels_last_within(z, MAX_TENSOR_ELEMENTS)
    }

    /// [`AutoencoderKL::decode_channels_last`] in runs of images, as
    /// [`AutoencoderKL::decode_within`]; the runs are joined in NHWC, so the result is still one
    /// permuted view.
    pub fn decode_channels_last_within(&self, z: &Tensor, max_elements: usize) -> Result<Tensor> {
        let decoder = self.decoder_nhwc.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "vae: decode_channels_last needs the channels-last decoder weights; build the \
                 model with AutoencoderKL::new_with_channels_last(.., true)"
                    .into(),
            )
        })?;
        let (per_image, what) = self.run_bound(z)?;
        let nhwc = map_runs(z, per_image, max_elements, &what, |z, _, _| {
            // post_quant_conv is a 1x1 convolution over the 4 latent channels: it stays NCHW,
            // and the transpose of its small output is the path's only one on the way in.
            let z = self.post_quant(z)?.permute((0, 2, 3, 1))?.contiguous()?;
            decoder.forward(&z)
        })?;
        nhwc.permute((0, 3, 1, 2))
    }

    /// Elements of the decoder's largest map for one image of `z`'s latent size, and "a WxH
    /// image" for [`crate::model::chunks::batch_runs`]' error.
    fn run_bound(&self, z: &Tensor) -> Result<(usize, String)> {
        let (_, _, h, w) = z.dims4()?;
        let f = self.scale_factor;
        let what = format!("a {}x{} image in the VAE decoder", w * f, h * f);
        Ok((self.decoder_elements_at(h, w), what))
    }

    /// Elements of the decoder's largest map for one image of an `h x w` latent (an upper
    /// bound: [`AutoencoderKLConfig::decoder_elements_per_latent_pixel`]).
    pub fn decoder_elements_at(&self, h: usize, w: usize) -> usize {
        self.decoder_width.saturating_mul(h).saturating_mul(w)
    }

    /// `z` in the model dtype, through `post_quant_conv` when the checkpoint has one.
    fn post_quant(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        match &self.post_quant_conv {
            Some(c) => c.forward(&z),
            None => Ok(z),
        }
    }

    /// Elements of the encoder's largest map for one `height x width` image (an upper bound:
    /// each down block's widest map at its resolution, one row and column more for the
    /// downsamplers' bottom/right padding).
    pub fn encoder_elements_at(&self, height: usize, width: usize) -> usize {
        self.encoder_widths
            .iter()
            .enumerate()
            .map(|(level, &c)| {
                c.saturating_mul((height >> level) + 1)
                    .saturating_mul((width >> level) + 1)
            })
            .max()
            .unwrap_or(0)
    }

    /// The posterior's parameters `[B, 2*latent, H/f, W/f]` (mean, then log-variance before
    /// diffusers' clamp to [-30, 20]) for images `[B, in_channels, H, W]` in [-1, 1]. A batch
    /// whose largest map would outgrow [`MAX_TENSOR_ELEMENTS`] runs in runs of images, as
    /// [`AutoencoderKL::decode`] does.
    pub fn encode_moments(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let what = format!("a {w}x{h} image in the VAE encoder");
        map_runs(
            xs,
            self.encoder_elements_at(h, w),
            MAX_TENSOR_ELEMENTS,
            &what,
            |xs, _, _| {
                let xs = self.encoder.forward(&xs.to_dtype(self.dtype)?)?;
                match &self.quant_conv {
                    Some(c) => c.forward(&xs),
                    None => Ok(xs),
                }
            },
        )
    }

    /// The posterior mean (diffusers' `latent_dist.mode()`), unscaled.
    pub fn encode(&self, xs: &Tensor) -> Result<Tensor> {
        self.encode_moments(xs)?.narrow(1, 0, self.latent_channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::chunks::batch_runs;

    /// SDXL-Turbo's decoder (models/sdxl-turbo/vae/config.json): its largest maps are the 256
    /// channels at full resolution (up block 2's upsampler output, up block 3's input), 2^26
    /// elements for a 512x512 image. 32 of them are exactly 2^31 and must run as 2 x 16; 8
    /// images of 1024x1024 likewise as 2 x 4.
    #[test]
    fn sdxl_decoder_bound_and_runs() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sdxl-turbo/vae/config.json");
        let cfg = AutoencoderKLConfig::from_file(&path).unwrap();
        assert_eq!(cfg.decoder_elements_per_latent_pixel(), 256 * 64);
        let per_image = cfg.decoder_elements_per_latent_pixel() * 64 * 64;
        assert_eq!(per_image, 1 << 26);
        let runs = |n, per| batch_runs(n, per, MAX_TENSOR_ELEMENTS, "x").unwrap();
        assert_eq!(runs(31, per_image), vec![(0, 31)]);
        assert_eq!(runs(32, per_image), vec![(0, 16), (16, 16)]);
        assert_eq!(runs(8, 4 * per_image), vec![(0, 4), (4, 4)]);
        // The server's largest side by default, 1536: 3 images a run.
        assert_eq!(runs(8, 9 * per_image).len(), 3);
    }

    #[test]
    fn defaults_match_diffusers_and_errors_name_fields() {
        let cfg: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, AutoencoderKLConfig::default());
        assert_eq!(cfg.scale_factor(), 1);
        let cfg: AutoencoderKLConfig = serde_json::from_str(
            r#"{"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                     "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                                   "UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}"#,
        )
        .unwrap();
        assert_eq!(cfg.scale_factor(), 8);
        match cfg.validate(Path::new("vae/config.json")) {
            Err(LoadError::Unsupported { field, .. }) => assert_eq!(field, "up_block_types[3]"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
}
