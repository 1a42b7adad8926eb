//! Timestep and SDXL micro-conditioning embeddings (diffusers `models/embeddings.py`:
//! `Timesteps`, `TimestepEmbedding`, and the `text_time` addition embedding of
//! `UNet2DConditionModel`).

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Module, VarBuilder};

use super::layers::{silu, Linear};

/// Sinusoidal projection of scalar positions (timesteps or SDXL's size/crop ids).
///
/// Always computed in f32, whatever the model dtype: at t = 999 the sine argument of the
/// lowest frequency is ~1e3, where f16 would keep barely one correct digit. diffusers does the
/// same (`get_timestep_embedding` calls `.float()`) and casts the result to the model dtype.
#[derive(Debug, Clone)]
pub struct Timesteps {
    num_channels: usize,
    flip_sin_to_cos: bool,
    /// `[1, num_channels / 2]` f32 frequencies `exp(-ln(10000) * i / (half - shift))`.
    freqs: Tensor,
}

impl Timesteps {
    pub fn new(
        num_channels: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f64,
        device: &Device,
    ) -> Result<Self> {
        let half = num_channels / 2;
        // 10000 is diffusers' `max_period`. The table is computed in f32 in torch's order (scale
        // the index, divide, exponentiate), so it matches diffusers to the last bit or so.
        let log_max_period = -(10000f64.ln()) as f32;
        let denom = (half as f64 - downscale_freq_shift) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (log_max_period * i as f32 / denom).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), device)?;
        Ok(Self {
            num_channels,
            flip_sin_to_cos,
            freqs,
        })
    }

    /// `[n]` positions (any float dtype) to `[n, num_channels]` f32 embeddings.
    pub fn forward(&self, positions: &Tensor) -> Result<Tensor> {
        let n = positions.dim(0)?;
        let t = positions.to_dtype(DType::F32)?.reshape((n, 1))?;
        let args = t.broadcast_mul(&self.freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], D::Minus1)?
        } else {
            Tensor::cat(&[sin, cos], D::Minus1)?
        };
        if !self.num_channels.is_multiple_of(2) {
            emb.pad_with_zeros(D::Minus1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// Two linear layers with a SiLU between them (`linear_1`, `linear_2`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_channels, time_embed_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(xs)?)?)
    }
}

/// SDXL's `text_time` addition embedding: the pooled text embedding concatenated with the
/// sinusoidal projection of the six size/crop ids, projected to the time embedding width.
/// Tensor names: `add_embedding.linear_{1,2}` (`add_time_proj` has no weights).
#[derive(Debug, Clone)]
pub struct TextTimeEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

impl TextTimeEmbedding {
    /// `vb` is the UNet's root: the weights live at `add_embedding.*`.
    pub fn new(
        vb: &VarBuilder,
        addition_time_embed_dim: usize,
        projection_input_dim: usize,
        time_embed_dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
    ) -> Result<Self> {
        Ok(Self {
            add_time_proj: Timesteps::new(
                addition_time_embed_dim,
                flip_sin_to_cos,
                freq_shift,
                vb.device(),
            )?,
            add_embedding: TimestepEmbedding::new(
                vb.pp("add_embedding"),
                projection_input_dim,
                time_embed_dim,
            )?,
        })
    }

    /// `text_embeds` `[B, proj]` and `time_ids` `[B, n_ids]` to `[B, time_embed_dim]` in `dtype`.
    pub fn forward(&self, text_embeds: &Tensor, time_ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let b = text_embeds.dim(0)?;
        let time_embeds = self
            .add_time_proj
            .forward(&time_ids.flatten_all()?)?
            .reshape((b, ()))?;
        // diffusers concatenates the model-dtype text embeds with the f32 time embeds (torch
        // promotes to f32) and then casts to the model dtype: casting the time part first gives
        // the same values, since the text part round-trips through f32 exactly.
        let add_embeds = Tensor::cat(
            &[text_embeds.to_dtype(dtype)?, time_embeds.to_dtype(dtype)?],
            D::Minus1,
        )?;
        self.add_embedding.forward(&add_embeds)
    }
}
