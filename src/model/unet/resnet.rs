//! Residual block and the 2x resamplers shared by the UNet and the VAE (diffusers
//! `models/resnet.py` `ResnetBlock2D`, `models/downsampling.py` `Downsample2D`,
//! `models/upsampling.py` `Upsample2D`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Conv2d, GroupNorm, Linear, UpsampleConv};
use crate::model::profile::span;

/// Shape of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE, whose resnets are unconditioned.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    /// Groups of the second norm; diffusers defaults it to `groups`.
    pub groups_out: usize,
    pub eps: f64,
    /// The block's output is divided by this (1 everywhere in SDXL).
    pub output_scale_factor: f64,
}

/// GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus a 1x1-conv
/// shortcut when the channel count changes. Dropout is the identity at inference.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 0, 1)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), cfg.groups_out, cout, cfg.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb_act` is the time embedding *after* the SiLU that diffusers applies inside every
    /// resnet: the UNet computes it once per forward instead of once per block.
    pub fn forward(&self, xs: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward_silu(xs)?;
        let mut h = self.conv1.forward(&h)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb_act) {
            let t = proj.forward(temb)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.norm2.forward_silu(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        if self.output_scale_factor == 1.0 {
            // SDXL's case: the residual add is folded into conv2 (with the `conv` lever on CUDA,
            // into cuDNN's epilogue instead of a separate pass over the output).
            return self.conv2.forward_residual(&h, Some(&shortcut));
        }
        let out = (shortcut + self.conv2.forward(&h)?)?;
        out.affine(1.0 / self.output_scale_factor, 0.0)
    }
}

/// Stride-2 3x3 convolution (tensor `conv`, as diffusers names it for `name="op"`).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// diffusers' `padding=0` variant (the VAE encoder) pads one zero row and column on the
    /// bottom/right only, so odd sizes round the same way as the symmetric `padding=1` variant.
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, out_channels, 3, padding, 2)?,
            pad_bottom_right: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling followed by a 3x3 convolution (tensor `conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    up: UpsampleConv,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            up: UpsampleConv::new(Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 1, 1)?)?,
        })
    }

    /// Doubles height and width, or resizes to `output_size` when given: the UNet passes the
    /// size of the matching skip connection when the latent is not divisible by 2^upsamplers
    /// (e.g. 5 → 3 → 2 on the way down, 2 → 3 → 5 on the way up), as diffusers'
    /// `upsample_size` does. candle's nearest index `floor(dst * in / out)` is torch's.
    pub fn forward(&self, xs: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        match output_size {
            Some((oh, ow)) if (oh, ow) != (2 * h, 2 * w) => {
                let xs = span("upsample", || xs.upsample_nearest2d(oh, ow))?;
                self.up.conv().forward(&xs)
            }
            _ => self.up.forward(xs),
        }
    }
}
