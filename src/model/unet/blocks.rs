//! The UNet's down, mid and up blocks (diffusers `models/unets/unet_2d_blocks.py`).
//!
//! `DownBlock2D` and `CrossAttnDownBlock2D` differ only in the spatial transformer after each
//! resnet, so one [`DownBlock2D`] type serves both (its `attentions` are empty for the plain
//! kind); likewise [`UpBlock2D`] serves `UpBlock2D` and `CrossAttnUpBlock2D`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Transformer2DConfig, Transformer2DModel};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

/// The spatial transformers of a cross-attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttnSpec {
    pub heads: usize,
    /// `BasicTransformerBlock`s per `Transformer2DModel`.
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

/// What every UNet block shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: usize,
    /// Resnets in the block (`layers_per_block`, plus one for up blocks).
    pub num_layers: usize,
    pub groups: usize,
    pub eps: f64,
    /// `None`: `DownBlock2D` / `UpBlock2D`; `Some`: the `CrossAttn` kinds.
    pub attn: Option<AttnSpec>,
}

impl BlockConfig {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            groups_out: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }

    fn transformers(&self, vb: &VarBuilder, channels: usize) -> Result<Vec<Transformer2DModel>> {
        let Some(spec) = self.attn else {
            return Ok(Vec::new());
        };
        let cfg = Transformer2DConfig {
            channels,
            heads: spec.heads,
            num_layers: spec.transformer_layers,
            cross_attention_dim: spec.cross_attention_dim,
            norm_num_groups: self.groups,
            use_linear_projection: spec.use_linear_projection,
        };
        let vb = vb.pp("attentions");
        (0..self.num_layers)
            .map(|i| Transformer2DModel::new(vb.pp(i.to_string()), &cfg))
            .collect()
    }
}

/// `resnets.*` (each followed by `attentions.*` in the cross-attention kind), then an optional
/// stride-2 `downsamplers.0`.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsamplers: Option<Downsample2D>,
}

impl DownBlock2D {
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        add_downsample: bool,
        downsample_padding: usize,
    ) -> Result<Self> {
        let rvb = vb.pp("resnets");
        let resnets = (0..cfg.num_layers)
            .map(|i| {
                let cin = if i == 0 {
                    cfg.in_channels
                } else {
                    cfg.out_channels
                };
                ResnetBlock2D::new(rvb.pp(i.to_string()), &cfg.resnet(cin, cfg.out_channels))
            })
            .collect::<Result<Vec<_>>>()?;
        let downsamplers = if add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp("0"),
                cfg.out_channels,
                cfg.out_channels,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            attentions: cfg.transformers(&vb, cfg.out_channels)?,
            resnets,
            downsamplers,
        })
    }

    /// Returns the block output; pushes every intermediate state that the up path consumes as
    /// a skip connection onto `skips`.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsamplers {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn`: `resnets.0`, then (`attentions.i`, `resnets.i+1`) pairs.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    /// `cfg.num_layers` counts the transformer/resnet pairs after the first resnet (1 in every
    /// diffusers UNet); `output_scale_factor` is the config's `mid_block_scale_factor`.
    pub fn new(vb: VarBuilder, cfg: &BlockConfig, output_scale_factor: f64) -> Result<Self> {
        let c = cfg.in_channels;
        let rcfg = ResnetConfig {
            output_scale_factor,
            ..cfg.resnet(c, c)
        };
        let rvb = vb.pp("resnets");
        let resnets = (0..=cfg.num_layers)
            .map(|i| ResnetBlock2D::new(rvb.pp(i.to_string()), &rcfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            attentions: cfg.transformers(&vb, c)?,
            resnets,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            if i > 0 {
                if let Some(attn) = self.attentions.get(i - 1) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            xs = resnet.forward(&xs, Some(temb_act))?;
        }
        Ok(xs)
    }
}

/// `resnets.*` on the input concatenated with a popped skip connection (each followed by
/// `attentions.*` in the cross-attention kind), then an optional `upsamplers.0`.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsamplers: Option<Upsample2D>,
}

impl UpBlock2D {
    /// `cfg.in_channels` is the width of the down block this one mirrors (its last skip);
    /// `prev_output_channel` is the width of the incoming hidden states.
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        prev_output_channel: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let rvb = vb.pp("resnets");
        let out = cfg.out_channels;
        let resnets = (0..cfg.num_layers)
            .map(|i| {
                let skip = if i + 1 == cfg.num_layers {
                    cfg.in_channels
                } else {
                    out
                };
                let cin = if i == 0 { prev_output_channel } else { out };
                ResnetBlock2D::new(rvb.pp(i.to_string()), &cfg.resnet(cin + skip, out))
            })
            .collect::<Result<Vec<_>>>()?;
        let upsamplers = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp("0"), out, out)?)
        } else {
            None
        };
        Ok(Self {
            attentions: cfg.transformers(&vb, out)?,
            resnets,
            upsamplers,
        })
    }

    /// The number of skip connections this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Pops one skip connection per resnet from the end of `skips`.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb_act: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("UNet up block ran out of skip connections (this is a bug)");
            };
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            xs = resnet.forward(&xs, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsamplers {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}
