//! The SDXL-Turbo text-to-image pipeline: prompts + seeds of one shape in, 8-bit RGB out.

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

/// Settings shared by every image of a batch (the batch key).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationSettings {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance runs when this is > 1 (as in diffusers).
    pub guidance_scale: f64,
}

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    /// Empty means "no negative prompt" (zero embeddings when the model forces zeros).
    pub negative_prompt: String,
    pub seed: u64,
}

/// Noise supplied by the caller instead of drawing it from each image's seed (diffusers'
/// `latents=` convention: unscaled standard normal; the pipeline multiplies by the
/// scheduler's initial sigma).
#[derive(Debug, Clone, Default)]
pub struct NoiseOverride {
    /// `[n, 4, h/8, w/8]`.
    pub init_latents: Option<Tensor>,
    /// One `[n, 4, h/8, w/8]` tensor per denoising step.
    pub step_noise: Option<Vec<Tensor>>,
}

/// Wall time per stage of one batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimings {
    pub text_encode: Duration,
    pub unet: Duration,
    pub vae_decode: Duration,
}

/// The decoded images of one batch, in request order.
#[derive(Debug)]
pub struct GeneratedBatch {
    pub images: Vec<image::RgbImage>,
    pub timings: StageTimings,
}

/// Loaded SDXL-Turbo models on one device.
pub struct Pipeline {
    device: Device,
    dtype: DType,
}

impl Pipeline {
    /// Loads a model directory in the Hub's diffusers layout.
    pub fn load(model_dir: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        let _ = model_dir;
        Ok(Self {
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Generates one image per request, all with the same settings, in one batch.
    pub fn generate(
        &self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
        noise: Option<&NoiseOverride>,
    ) -> anyhow::Result<GeneratedBatch> {
        let _ = (settings, items, noise);
        anyhow::bail!("pipeline not implemented yet")
    }
}
