//! The decoder of diffusers' `AutoencoderTiny` (TAESD; for SDXL, madebyollin/taesdxl): a stack
//! of plain 3x3 convolutions and ReLUs with three nearest-neighbour 2x upsamplings, trained to
//! decode SDXL's latents about as the full VAE does, with about 1/40 of its decoder's
//! convolution work per pixel.
//!
//! `--vae taesdxl` decodes with it (final images and stream previews); the full VAE still
//! encodes an edit's input image, since TAESD is trained on the same latent space.
//!
//! Layout of diffusers' `DecoderTiny` (v0.42.1, `models/autoencoders/vae.py`): `layers` is one
//! `nn.Sequential`, so the tensor names are positional: `decoder.layers.0` the input
//! convolution, `1` its ReLU, then per stage `num_decoder_blocks[i]` `AutoencoderTinyBlock`s
//! (`layers.K.conv.{0,2,4}`: three convolutions with ReLUs between, added to the block's input,
//! then a ReLU), then for all but the last stage an upsampling and a convolution without bias;
//! the last stage ends with the output convolution (with bias) instead.

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::model::loader::{self, LoadError, LoadResult};
use crate::model::profile::span;
use crate::model::unet::layers::Conv2d;

/// An `AutoencoderTiny`'s `config.json`: the fields its decoder reads, with the defaults of
/// [`AutoencoderTiny.__init__`](https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_tiny.py),
/// which are madebyollin/taesdxl's values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub out_channels: usize,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub latent_channels: usize,
    pub upsampling_scaling_factor: usize,
    pub act_fn: String,
    pub upsample_fn: String,
    /// The pipeline divides latents by this before decoding: 1.0, as TAESD decodes the UNet's
    /// latents as they are.
    pub scaling_factor: f64,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self {
            out_channels: 3,
            decoder_block_out_channels: vec![64; 4],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            act_fn: "relu".into(),
            upsample_fn: "nearest".into(),
            scaling_factor: 1.0,
        }
    }
}

impl AutoencoderTinyConfig {
    /// Reads and checks a `config.json` whose `_class_name` is `AutoencoderTiny`.
    pub fn from_file(path: &Path) -> LoadResult<Self> {
        let cfg: Self = loader::read_json(path)?;
        let bad = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        if cfg.act_fn != "relu" || cfg.upsample_fn != "nearest" {
            return Err(bad(format!(
                "only act_fn \"relu\" and upsample_fn \"nearest\" are supported (TAESD's), got \
                 {:?} and {:?}",
                cfg.act_fn, cfg.upsample_fn
            )));
        }
        let stages = cfg.decoder_block_out_channels.len();
        if stages == 0 || stages != cfg.num_decoder_blocks.len() {
            return Err(bad(format!(
                "decoder_block_out_channels and num_decoder_blocks must be as long (and not \
                 empty), got {stages} and {}",
                cfg.num_decoder_blocks.len()
            )));
        }
        if cfg.upsampling_scaling_factor < 1
            || cfg.scaling_factor.is_nan()
            || cfg.scaling_factor <= 0.0
        {
            return Err(bad(
                "upsampling_scaling_factor and scaling_factor must be positive".into(),
            ));
        }
        Ok(cfg)
    }

    /// Whether `config.json` in `dir` describes an `AutoencoderTiny`.
    pub fn is_tiny(dir: &Path) -> LoadResult<bool> {
        #[derive(Deserialize)]
        struct Class {
            #[serde(rename = "_class_name", default)]
            class_name: String,
        }
        let class: Class = loader::read_json(&dir.join("config.json"))?;
        Ok(class.class_name == "AutoencoderTiny")
    }

    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        self.upsampling_scaling_factor
            .pow(self.decoder_block_out_channels.len() as u32 - 1)
    }
}

/// diffusers' `AutoencoderTinyBlock`: `relu(conv(relu(conv(relu(conv(x))))) + x)` (the skip
/// is the identity: the decoder's blocks keep their channel count).
#[derive(Debug, Clone)]
struct Block {
    convs: [Conv2d; 3],
}

impl Block {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let conv = |i: usize| Conv2d::new(vb.pp("conv").pp(i), channels, channels, 3, 1, 1);
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.convs[0].forward(xs)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        self.convs[2].forward_residual(&h, Some(xs))?.relu()
    }
}

#[derive(Debug, Clone)]
enum Layer {
    /// A convolution, then a ReLU when `relu`.
    Conv {
        conv: Conv2d,
        relu: bool,
    },
    Block(Block),
    Upsample(usize),
}

/// `AutoencoderTiny`'s decoder.
#[derive(Debug, Clone)]
pub struct DecoderTiny {
    layers: Vec<Layer>,
    scaling_factor: f64,
}

impl DecoderTiny {
    /// `vb` at the checkpoint's root (the tensors are under `decoder.layers.*`).
    pub fn new(vb: VarBuilder, cfg: &AutoencoderTinyConfig) -> Result<Self> {
        let vb = vb.pp("decoder").pp("layers");
        let ch = &cfg.decoder_block_out_channels;
        let mut layers = vec![Layer::Conv {
            conv: Conv2d::new(vb.pp(0), cfg.latent_channels, ch[0], 3, 1, 1)?,
            relu: true,
        }];
        // Index 1 is the ReLU above.
        let mut index = 2;
        let last = ch.len() - 1;
        for (i, (&channels, &blocks)) in ch.iter().zip(&cfg.num_decoder_blocks).enumerate() {
            for _ in 0..blocks {
                layers.push(Layer::Block(Block::new(vb.pp(index), channels)?));
                index += 1;
            }
            let conv = if i == last {
                Conv2d::new(vb.pp(index), channels, cfg.out_channels, 3, 1, 1)?
            } else {
                layers.push(Layer::Upsample(cfg.upsampling_scaling_factor));
                index += 1;
                Conv2d::new_without_bias(vb.pp(index), channels, channels, 3, 1, 1)?
            };
            layers.push(Layer::Conv { conv, relu: false });
            index += 1;
        }
        Ok(Self {
            layers,
            scaling_factor: cfg.scaling_factor,
        })
    }

    /// What the pipeline divides latents by before [`DecoderTiny::decode`].
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// Latents `[B, C, h, w]` (already divided by the scaling factor) → images `[B, 3, 8h, 8w]`
    /// nominally in [-1, 1], as `AutoencoderTiny.decode(z).sample`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        // TAESD's input clamp: tanh(z / 3) * 3.
        let mut xs = ((z / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            xs = match layer {
                Layer::Conv { conv, relu } => {
                    let out = conv.forward(&xs)?;
                    if *relu {
                        out.relu()?
                    } else {
                        out
                    }
                }
                Layer::Block(block) => block.forward(&xs)?,
                Layer::Upsample(f) => {
                    let (_, _, h, w) = xs.dims4()?;
                    span("upsample", || xs.upsample_nearest2d(h * f, w * f))?
                }
            };
        }
        // From [0, 1] to diffusers' [-1, 1].
        (xs * 2.0)? - 1.0
    }
}

impl Module for DecoderTiny {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(z)
    }
}
