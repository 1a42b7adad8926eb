//! The SDXL-Turbo pipeline: prompts + seeds of one shape in, 8-bit RGB out; from noise
//! (text-to-image), or from input images (edits: [`GenerationSettings::init_step`],
//! [`InitImage`]).
//!
//! Mirrors diffusers' `StableDiffusionXLPipeline.__call__` for what SDXL-Turbo uses:
//! both CLIP encoders (penultimate hidden states concatenated, pooled + projected output of the
//! second), micro-conditioning time ids `(h, w, 0, 0, h, w)`, classifier-free guidance when
//! `guidance_scale > 1` (zero embeddings for an empty negative prompt when the model forces
//! zeros), the Euler-ancestral scheduler, the VAE decoder and diffusers' 8-bit rounding. Edits
//! mirror `StableDiffusionXLImg2ImgPipeline` (the VAE encoder's posterior sample, noised to the
//! start step's sigma, the schedule's last steps), and with a mask
//! `StableDiffusionXLInpaintPipeline` as it runs a 4-channel UNet (the kept latents blended
//! back after every step).
//!
//! Every image depends only on its own prompt, negative prompt and seed: noise is drawn per
//! image from its seed ([`crate::model::noise`]) and nothing mixes across the batch dimension,
//! so an image generated alone is the same image generated inside a batch (bit for bit on the
//! CPU; on CUDA to a rounding step, since cuBLAS and cuDNN choose kernels, and so summation
//! orders, by the batch's shape).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::model::checkpoint::{Checkpoint, ComponentBackend, Layout, Part};
use crate::model::chunks::MAX_TENSOR_ELEMENTS;
use crate::model::clip::{ClipTextConfig, ClipTextModel};
use crate::model::loader::{
    build_checked_wrapped, find_weights, read_json, release_freed_memory, weights_error,
    Derivations, Kept, LoadError, LoadResult, ModelDir, RandomWeights, SafetensorsBackend,
    SharedDerivations,
};
use crate::model::lora::{AdapterSpec, Lora, LoraBackend, LoraSpec};
use crate::model::noise;
use crate::model::profile::{self, Mark};
use crate::model::prompt_cache::PromptCache;
use crate::model::scheduler::{EulerAncestralConfig, EulerAncestralScheduler};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::model::vae_tiny::{AutoencoderTinyConfig, DecoderTiny};
use crate::ops::{self, Kernels};
use candle_nn::var_builder::SimpleBackend;

/// Settings shared by every image of a batch (the batch key).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationSettings {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance runs when this is > 1 (as in diffusers).
    pub guidance_scale: f64,
    /// Image-to-image (diffusers' `StableDiffusionXLImg2ImgPipeline`): the images start from
    /// their [`ImageRequest::init_image`]'s latents, noised to the level of this step of the
    /// `steps`-step schedule (diffusers' `t_start`, [`img2img_start`]), and run the steps from
    /// there. `None`: text-to-image from pure noise.
    pub init_step: Option<usize>,
    /// The `--lora-modules` adapter the images are made with (an index into
    /// [`Pipeline::adapter_names`]); `None`: the model as loaded.
    pub adapter: Option<usize>,
}

impl GenerationSettings {
    /// Whether classifier-free guidance runs (diffusers: `guidance_scale > 1`).
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    /// Empty means "no negative prompt" (zero embeddings when the model forces zeros).
    pub negative_prompt: String,
    pub seed: u64,
    /// The image to edit, at the batch's size; required exactly when the settings have an
    /// [`GenerationSettings::init_step`].
    pub init_image: Option<InitImage>,
    /// Previews to hand out while the image is denoised (a stream's `partial_images`).
    pub partials: Option<Partials>,
}

/// Where an image's previews go while it is denoised: up to `count` of the model's denoised
/// estimates (diffusers' `pred_original_sample`), at the steps [`partial_steps`] spreads them
/// over, each decoded and handed to the sink with its 0-based index, in order, on the thread
/// that runs the batch. An image done in one step has no earlier estimate and gets none. Only
/// the images that ask for previews are decoded for them; the sink must not block.
#[derive(Clone)]
pub struct Partials {
    count: usize,
    sink: Arc<dyn Fn(usize, image::RgbImage) + Send + Sync>,
}

impl Partials {
    pub fn new(
        count: usize,
        sink: impl Fn(usize, image::RgbImage) + Send + Sync + 'static,
    ) -> Self {
        Partials {
            count,
            sink: Arc::new(sink),
        }
    }
}

impl PartialEq for Partials {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && Arc::ptr_eq(&self.sink, &other.sink)
    }
}

impl std::fmt::Debug for Partials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Partials({})", self.count)
    }
}

/// After which of a run's `steps` steps (0-based) each of `count` previews is made: evenly
/// spread over the steps before the last (whose result is the image itself), every one of them
/// when there are no more than `count`. Four steps and two previews: after the first and the
/// third; eight steps and three: after the second, fourth and sixth.
pub fn partial_steps(steps: usize, count: usize) -> Vec<usize> {
    let earlier = steps.saturating_sub(1);
    if count >= earlier {
        return (0..earlier).collect();
    }
    // With count < steps - 1 the spacing steps / (count + 1) exceeds 1: the rounded multiples
    // of it are distinct and within [1, steps - 1], so the positions within [0, steps - 2].
    (1..=count)
        .map(|j| ((j * steps) as f64 / (count + 1) as f64).round() as usize - 1)
        .collect()
}

/// An edit's input image, and optionally the mask of what to repaint, shared rather than copied
/// between the request and its batch.
#[derive(Clone, PartialEq)]
pub struct InitImage {
    image: Arc<image::RgbImage>,
    mask: Option<Arc<image::GrayImage>>,
}

impl InitImage {
    /// Image-to-image of the whole image (diffusers' `StableDiffusionXLImg2ImgPipeline`).
    pub fn new(image: image::RgbImage) -> Self {
        InitImage {
            image: Arc::new(image),
            mask: None,
        }
    }

    /// Inpainting (diffusers' `StableDiffusionXLInpaintPipeline` with SDXL-Turbo's 4-channel
    /// UNet): `mask` is diffusers' `mask_image`, the image's size, with values of 128 and up
    /// (white) where the image is repainted and below (black) where it is kept. The kept latents
    /// are put back after every step, noised to the next step's level.
    pub fn with_mask(image: image::RgbImage, mask: image::GrayImage) -> Self {
        InitImage {
            image: Arc::new(image),
            mask: Some(Arc::new(mask)),
        }
    }

    pub fn image(&self) -> &image::RgbImage {
        &self.image
    }

    pub fn mask(&self) -> Option<&image::GrayImage> {
        self.mask.as_deref()
    }
}

impl std::fmt::Debug for InitImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (w, h) = self.image.dimensions();
        let masked = if self.mask.is_some() { ", masked" } else { "" };
        write!(f, "InitImage({w}x{h}{masked})")
    }
}

/// diffusers' img2img `get_timesteps`: of a `num_inference_steps` schedule, an edit of
/// `strength` runs the last `min(int(num_inference_steps * strength), num_inference_steps)`
/// steps; the index of the first.
pub fn img2img_start(num_inference_steps: usize, strength: f64) -> usize {
    let run = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    num_inference_steps - run
}

/// The schedule of an edit that runs `steps` denoising steps at `strength` (in (0, 1]):
/// `(num_inference_steps, start)` with the smallest `num_inference_steps` for which diffusers'
/// img2img runs exactly `steps` ([`img2img_start`]). SDXL-Turbo's documented edit,
/// `num_inference_steps=2, strength=0.5`, is `steps` 1 at strength 0.5.
pub fn edit_schedule(steps: usize, strength: f64) -> Result<(usize, usize), InvalidInput> {
    if steps == 0 || !(strength > 0.0 && strength <= 1.0) {
        return Err(InvalidInput(format!(
            "an edit needs at least one step and a strength in (0, 1], got {steps} steps at \
             strength {strength}"
        )));
    }
    let first = ((steps as f64 / strength).floor() as usize).max(steps);
    (first..first + 3)
        .find(|&n| n - img2img_start(n, strength) == steps)
        .map(|n| (n, img2img_start(n, strength)))
        .ok_or_else(|| {
            InvalidInput(format!(
                "no schedule runs {steps} steps at strength {strength} (this is a bug)"
            ))
        })
}

/// Noise supplied by the caller instead of drawing it from each image's seed (diffusers'
/// `latents=` convention: unscaled standard normal; the pipeline multiplies by the
/// scheduler's initial sigma).
#[derive(Debug, Clone, Default)]
pub struct NoiseOverride {
    /// `[n, 4, h/8, w/8]`.
    pub init_latents: Option<Tensor>,
    /// One `[n, 4, h/8, w/8]` tensor per denoising step run.
    pub step_noise: Option<Vec<Tensor>>,
    /// Edits: the `[n, 4, h/8, w/8]` standard normals that sample the VAE encoder's posterior
    /// (diffusers' `latent_dist.sample`). With an edit, `init_latents` is the noise added to
    /// the image's latents (unscaled: the pipeline multiplies it by the start step's sigma).
    pub image_noise: Option<Tensor>,
}

/// Time per stage of one batch: the device's own timestamps on CUDA (events between stages, no
/// synchronisation), wall time on the CPU. `vae_decode` includes the conversion to 8-bit.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimings {
    pub text_encode: Duration,
    pub unet: Duration,
    pub vae_decode: Duration,
}

/// Where a batch's prompt embeddings came from, one count per prompt (negative prompts
/// included when guidance runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptCounts {
    /// Run through the text encoders.
    pub encoded: usize,
    /// The same prompt as an earlier image of the batch: encoded once for all of them.
    pub repeated: usize,
    /// Kept from an earlier batch ([`Pipeline::set_prompt_cache_entries`]).
    pub cached: usize,
}

impl PromptCounts {
    fn add(&mut self, other: PromptCounts) {
        self.encoded += other.encoded;
        self.repeated += other.repeated;
        self.cached += other.cached;
    }
}

/// The decoded images of one batch, in request order.
#[derive(Debug)]
pub struct GeneratedBatch {
    pub images: Vec<image::RgbImage>,
    pub timings: StageTimings,
    pub prompts: PromptCounts,
}

/// Invalid generation input; the message names the parameter.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// The pipeline-level config diffusers keeps in `model_index.json`.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(default = "default_true")]
    force_zeros_for_empty_prompt: bool,
}

fn default_true() -> bool {
    true
}

/// Where component weights come from.
#[derive(Clone)]
enum Source {
    /// The component weights files of the model directory.
    Files,
    /// Deterministic random weights from this seed (configs and tokenizers still from disk).
    Random(u64),
    /// The four components from one single-file checkpoint (configs and tokenizers still from
    /// the directory; a `--vae` and TAESD from their folders).
    Checkpoint(Arc<Checkpoint>),
}

/// Where a pipeline's parts come from ([`Pipeline::load_spec`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadSpec {
    /// The diffusers-layout directory: configs and tokenizers, and the weights unless
    /// `checkpoint` or `random_seed` says otherwise.
    pub dir: PathBuf,
    /// A single-file checkpoint the four components' weights come from.
    pub checkpoint: Option<PathBuf>,
    /// A VAE (or TAESD) folder, as [`Pipeline::load_with_vae`] takes it.
    pub vae_dir: Option<PathBuf>,
    /// TAESD's folder for the previews, as [`Pipeline::load_with_vaes`] takes it.
    pub preview_dir: Option<PathBuf>,
    /// LoRAs fused into the weights as they load, in order.
    pub loras: Vec<LoraSpec>,
    /// Deterministic random weights from this seed instead of the directory's.
    pub random_seed: Option<u64>,
    /// LoRAs served under their own names next to the model (`--lora-modules`), each fused
    /// into its own copy of the weights it adapts; the rest is shared with the model.
    pub adapters: Vec<AdapterSpec>,
    /// Keep what adapters are built from, so that more can be built while serving
    /// ([`Pipeline::load_adapter`], `--allow-runtime-lora-updating`).
    pub runtime_adapters: bool,
}

/// The LoRAs of a load: fused into the model, and served next to it.
#[derive(Clone, Copy)]
struct Loras<'a> {
    fused: &'a [LoraSpec],
    adapters: &'a [AdapterSpec],
    /// [`LoadSpec::runtime_adapters`].
    runtime: bool,
}

impl Loras<'_> {
    const NONE: Self = Loras {
        fused: &[],
        adapters: &[],
        runtime: false,
    };
}

/// Loaded SDXL-Turbo models on one device.
pub struct Pipeline {
    device: Device,
    dtype: DType,
    vae_dtype: DType,
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    vae_config: AutoencoderKLConfig,
    /// `--vae taesdxl`: TAESD's decoder makes the images (and previews) instead of the VAE's,
    /// which then only encodes edits' inputs.
    tiny_decoder: Option<DecoderTiny>,
    /// `--preview-vae taesdxl`: TAESD's decoder makes the previews only.
    preview_decoder: Option<DecoderTiny>,
    scheduler_config: EulerAncestralConfig,
    force_zeros_for_empty_prompt: bool,
    latent_channels: usize,
    prompt_cache: PromptCache,
    /// The entries each prompt cache keeps ([`Pipeline::set_prompt_cache_entries`]).
    prompt_cache_entries: usize,
    /// The adapters by slot ([`GenerationSettings::adapter`]); `None`: a slot unloaded.
    adapters: Vec<Option<Adapter>>,
    /// What adapters are built from, kept for those loaded while serving
    /// ([`LoadSpec::runtime_adapters`]).
    adapter_builder: Option<AdapterBuilder>,
}

/// A `--lora-modules` adapter: the text encoders and UNet with its LoRAs fused in, sharing
/// every tensor they leave alone with the model's own (see [`Kept`]).
struct Adapter {
    name: String,
    /// Its own text encoders (and prompt cache) when its LoRAs adapt either; else the model's.
    text: Option<(ClipTextModel, ClipTextModel, PromptCache)>,
    /// Its own UNet when its LoRAs adapt it; else the model's.
    unet: Option<UNet2DConditionModel>,
}

/// What one batch runs through: the model's own parts or an adapter's.
#[derive(Clone, Copy)]
struct Parts<'a> {
    text_encoder: &'a ClipTextModel,
    text_encoder_2: &'a ClipTextModel,
    prompt_cache: &'a PromptCache,
    unet: &'a UNet2DConditionModel,
}

impl Pipeline {
    /// Loads a model directory in the Hub's diffusers layout.
    pub fn load(model_dir: &Path, device: &Device, dtype: DType) -> LoadResult<Self> {
        Self::load_with_vae(model_dir, None, device, dtype)
    }

    /// Like [`Pipeline::load`], with the VAE read from `vae_dir` (config.json + weights)
    /// instead of `model_dir/vae` when given (e.g. the fp16-safe `sdxl-vae-fp16-fix`). An
    /// `AutoencoderTiny` there (TAESD: `taesdxl`) replaces the decoder only: `model_dir/vae`
    /// still encodes edits' input images.
    pub fn load_with_vae(
        model_dir: &Path,
        vae_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> LoadResult<Self> {
        Self::load_with_vaes(model_dir, vae_dir, None, device, dtype)
    }

    /// Like [`Pipeline::load_with_vae`], with stream previews decoded by the `AutoencoderTiny`
    /// in `preview_dir` when given (`--preview-vae taesdxl`); the images keep their decoder.
    pub fn load_with_vaes(
        model_dir: &Path,
        vae_dir: Option<&Path>,
        preview_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> LoadResult<Self> {
        let dir = ModelDir::open(model_dir)?;
        Self::build(
            &dir,
            vae_dir,
            preview_dir,
            Source::Files,
            Loras::NONE,
            device,
            dtype,
        )
    }

    /// The pipeline `spec` describes: everything `--model-dir`, `--checkpoint`, `--vae`,
    /// `--preview-vae`, `--lora` and `--random-weights` resolve to.
    pub fn load_spec(spec: &LoadSpec, device: &Device, dtype: DType) -> LoadResult<Self> {
        let dir = ModelDir::open(&spec.dir)?;
        let source = match (&spec.checkpoint, spec.random_seed) {
            (Some(checkpoint), _) => Source::Checkpoint(Arc::new(Checkpoint::open(checkpoint)?)),
            (None, Some(seed)) => Source::Random(seed),
            (None, None) => Source::Files,
        };
        Self::build(
            &dir,
            spec.vae_dir.as_deref(),
            spec.preview_dir.as_deref(),
            source,
            Loras {
                fused: &spec.loras,
                adapters: &spec.adapters,
                runtime: spec.runtime_adapters,
            },
            device,
            dtype,
        )
    }

    /// The weights of a single-file checkpoint (the original SGM layout of
    /// `sd_xl_turbo_1.0_fp16.safetensors`, A1111 and ComfyUI; see [`crate::model::checkpoint`])
    /// with the configs and tokenizers of the diffusers-layout `config_dir` (its weights, if
    /// any, are not read). `vae_dir` and `preview_dir` as in [`Pipeline::load_with_vaes`]: a
    /// full VAE there replaces the checkpoint's.
    pub fn load_checkpoint(
        config_dir: &Path,
        checkpoint: &Path,
        vae_dir: Option<&Path>,
        preview_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> LoadResult<Self> {
        let dir = ModelDir::open(config_dir)?;
        let checkpoint = Arc::new(Checkpoint::open(checkpoint)?);
        Self::build(
            &dir,
            vae_dir,
            preview_dir,
            Source::Checkpoint(checkpoint),
            Loras::NONE,
            device,
            dtype,
        )
    }

    /// The full architecture described by the configs in `config_dir` (same layout, no weights
    /// needed) with deterministic random weights: for benchmarks on machines without weights.
    pub fn random(config_dir: &Path, device: &Device, dtype: DType, seed: u64) -> LoadResult<Self> {
        Self::random_with_vae(config_dir, None, device, dtype, seed)
    }

    /// [`Pipeline::random`] with the VAE's (or TAESD's) config from `vae_dir`, as
    /// [`Pipeline::load_with_vae`] reads it.
    pub fn random_with_vae(
        config_dir: &Path,
        vae_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> LoadResult<Self> {
        Self::random_with_vaes(config_dir, vae_dir, None, device, dtype, seed)
    }

    /// [`Pipeline::random_with_vae`] with a preview decoder's config from `preview_dir`, as
    /// [`Pipeline::load_with_vaes`] reads it.
    pub fn random_with_vaes(
        config_dir: &Path,
        vae_dir: Option<&Path>,
        preview_dir: Option<&Path>,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> LoadResult<Self> {
        let dir = ModelDir::open(config_dir)?;
        Self::build(
            &dir,
            vae_dir,
            preview_dir,
            Source::Random(seed),
            Loras::NONE,
            device,
            dtype,
        )
    }

    fn build(
        dir: &ModelDir,
        vae_dir: Option<&Path>,
        preview_dir: Option<&Path>,
        source: Source,
        loras: Loras<'_>,
        device: &Device,
        dtype: DType,
    ) -> LoadResult<Self> {
        let Loras {
            fused: loras,
            adapters,
            runtime,
        } = loras;
        let replaced_vae = vae_dir.is_some();
        let (vae_dir, tiny_dir) = match vae_dir {
            Some(d) => {
                let d = ModelDir::open(d)?.root().to_path_buf();
                if AutoencoderTinyConfig::is_tiny(&d)? {
                    (dir.component("vae")?, Some(d))
                } else {
                    (d, None)
                }
            }
            None => (dir.component("vae")?, None),
        };
        let index: ModelIndex = read_json(&dir.root().join("model_index.json"))?;
        let te_cfg =
            ClipTextConfig::from_file(&dir.component("text_encoder")?.join("config.json"))?;
        let te2_cfg =
            ClipTextConfig::from_file(&dir.component("text_encoder_2")?.join("config.json"))?;
        let unet_cfg =
            UNet2DConditionConfig::from_file(&dir.component("unet")?.join("config.json"))?;
        let vae_cfg = AutoencoderKLConfig::from_file(&vae_dir.join("config.json"))?;
        let scheduler_config: EulerAncestralConfig = EulerAncestralConfig::from_file(
            &dir.component("scheduler")?.join("scheduler_config.json"),
        )?;
        let tokenizer = ClipTokenizer::from_dir(&dir.component("tokenizer")?)?;
        let tokenizer_2 = ClipTokenizer::from_dir(&dir.component("tokenizer_2")?)?;
        // A replacement VAE (`--vae fp16-fix`) is read from its folder, not the checkpoint;
        // with TAESD (`--vae taesdxl`) the model's own VAE still encodes.
        let own_vae = !replaced_vae || tiny_dir.is_some();
        let loras = loras
            .iter()
            .map(|spec| Lora::open(spec).map(Arc::new))
            .collect::<LoadResult<Vec<_>>>()?;
        let layout = match &source {
            Source::Checkpoint(checkpoint) => {
                Some(checkpoint_layout(checkpoint, &unet_cfg, &vae_cfg, own_vae)?)
            }
            // kohya's SDXL LoRAs name the UNet's modules as the original layout does.
            _ if !loras.is_empty() || !adapters.is_empty() || runtime => {
                Layout::from_configs(&unet_cfg, &vae_cfg).ok()
            }
            _ => None,
        };
        // With adapters, the model's text encoders and UNet keep what they were built from,
        // for the adapters' builds to share (see `Adapter`).
        let kept = (!adapters.is_empty() || runtime).then(KeptParts::default);
        let _sharing = kept.is_some().then(SharedDerivations::start);
        let ctx = Adapt {
            layout: layout.as_ref(),
            loras: &loras,
            kept: kept.as_ref(),
        };
        let part = |part: Part| Some((part, &ctx));

        // The SDXL VAE overflows in f16 (diffusers upcasts it when `force_upcast` is set), so an
        // f16 run decodes in f32; bf16 has f32's range and is safe.
        let vae_dtype = if dtype == DType::F16 && vae_cfg.force_upcast {
            DType::F32
        } else {
            dtype
        };

        let folder_of = |part: Part| dir.component(component_weights(part).0);
        let text_encoder = load_component(
            &folder_of(Part::TextEncoder)?,
            &source,
            part(Part::TextEncoder),
            component_weights(Part::TextEncoder).1,
            dtype,
            device,
            |vb| ClipTextModel::new(vb, &te_cfg, false),
        )?;
        let text_encoder_2 = load_component(
            &folder_of(Part::TextEncoder2)?,
            &source,
            part(Part::TextEncoder2),
            component_weights(Part::TextEncoder2).1,
            dtype,
            device,
            |vb| ClipTextModel::new(vb, &te2_cfg, true),
        )?;
        let unet = load_component(
            &folder_of(Part::Unet)?,
            &source,
            part(Part::Unet),
            component_weights(Part::Unet).1,
            dtype,
            device,
            |vb| UNet2DConditionModel::new(vb, &unet_cfg),
        )?;
        let vae = load_component(
            &vae_dir,
            &source,
            if own_vae { part(Part::Vae) } else { None },
            "diffusion_pytorch_model",
            vae_dtype,
            device,
            |vb| AutoencoderKL::new(vb, &vae_cfg),
        )?;
        let tiny = |dir: &Path| load_tiny_decoder(dir, &source, &vae_cfg, vae_dtype, device);
        let tiny_decoder = tiny_dir.as_deref().map(tiny).transpose()?;
        let preview_decoder = match preview_dir {
            Some(d) => {
                let d = ModelDir::open(d)?.root().to_path_buf();
                if !AutoencoderTinyConfig::is_tiny(&d)? {
                    return Err(LoadError::Config {
                        path: d.join("config.json"),
                        message: "not an AutoencoderTiny: previews are decoded by a tiny \
                                  decoder (TAESD), which this folder does not hold"
                            .into(),
                    });
                }
                Some(tiny(&d)?)
            }
            None => None,
        };
        if let Source::Checkpoint(checkpoint) = &source {
            let skip: &[Part] = if own_vae { &[] } else { &[Part::Vae] };
            let other = checkpoint.ensure_used(skip)?;
            if !other.is_empty() {
                tracing::info!(
                    "{}: {} tensor(s) outside the pipeline's four components left unread \
                     (for example {})",
                    checkpoint.path().display(),
                    other.len(),
                    other[0]
                );
            }
        }
        for lora in &loras {
            lora.ensure_used()?;
            tracing::info!(
                "LoRA {}: {} modules fused",
                lora.path().display(),
                lora.module_count()
            );
        }
        let builder = kept.map(|kept| AdapterBuilder {
            kept,
            source: source.clone(),
            dir: dir.clone(),
            fused: loras,
            layout,
            te_cfg,
            te2_cfg,
            unet_cfg: unet_cfg.clone(),
            dtype,
            device: device.clone(),
            // What the model's build derived, for the adapters built while serving: their
            // own derivations stay out of it, so that unloading one frees them.
            derivations: SharedDerivations::snapshot(),
        });
        let adapters = match &builder {
            Some(build) => adapters
                .iter()
                .map(|spec| build.adapter(spec).map(Some))
                .collect::<LoadResult<Vec<_>>>()?,
            None => Vec::new(),
        };
        // What the adapters were built from, and the f32 temporaries of fusing: freed now
        // unless more adapters may be built while serving, and handed back to the system rather
        // than kept in malloc's heap (about 1 GiB of the resident memory of one adapter's load
        // on the CPU).
        let adapter_builder = builder.filter(|_| runtime);
        drop(_sharing);
        release_freed_memory();
        Ok(Self {
            device: device.clone(),
            dtype,
            vae_dtype,
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            tiny_decoder,
            preview_decoder,
            latent_channels: unet_cfg.in_channels,
            vae_config: vae_cfg,
            scheduler_config,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            prompt_cache: PromptCache::new(0),
            prompt_cache_entries: 0,
            adapters,
            adapter_builder,
        })
    }

    /// The adapters' names by slot, in the order [`GenerationSettings::adapter`] indexes them
    /// (`None`: a slot unloaded): the `--lora-modules` ones first, in their order.
    pub fn adapter_names(&self) -> impl Iterator<Item = Option<&str>> {
        self.adapters
            .iter()
            .map(|a| a.as_ref().map(|a| a.name.as_str()))
    }

    /// Whether [`Pipeline::load_adapter`] can build adapters ([`LoadSpec::runtime_adapters`]).
    pub fn loads_adapters(&self) -> bool {
        self.adapter_builder.is_some()
    }

    /// Builds the adapter `spec` describes into `slot` (a free one: unloaded, or past the
    /// last), as a `--lora-modules` adapter is built at load: the model's LoRAs (`--lora`) and
    /// its own fused into copies of the weights they adapt, the rest shared with the model.
    /// Needs a pipeline loaded with [`LoadSpec::runtime_adapters`].
    ///
    /// A LoRA file at fault is a [`LoadError`]; a pipeline that cannot build adapters here,
    /// or a slot already taken, is the caller's error, and fails otherwise.
    pub fn load_adapter(&mut self, slot: usize, spec: &AdapterSpec) -> anyhow::Result<()> {
        let Some(builder) = &self.adapter_builder else {
            anyhow::bail!(
                "this pipeline was loaded without runtime_adapters: it cannot build adapters"
            );
        };
        if self.adapters.get(slot).is_some_and(Option::is_some) {
            anyhow::bail!("adapter slot {slot} is taken (this is a bug)");
        }
        let built = {
            let _sharing = SharedDerivations::resume(builder.derivations.clone());
            builder.adapter(spec)
        };
        // The f32 temporaries of fusing, handed back to the system.
        release_freed_memory();
        let mut adapter = built?;
        if let Some((_, _, cache)) = &mut adapter.text {
            *cache = PromptCache::new(self.prompt_cache_entries);
        }
        if self.adapters.len() <= slot {
            self.adapters.resize_with(slot + 1, || None);
        }
        self.adapters[slot] = Some(adapter);
        Ok(())
    }

    /// Frees the adapter in `slot` (its copies of the weights it adapts, its prompt cache);
    /// `false` if there was none.
    pub fn unload_adapter(&mut self, slot: usize) -> bool {
        if self.adapters.get_mut(slot).and_then(Option::take).is_none() {
            return false;
        }
        while self.adapters.last().is_some_and(Option::is_none) {
            self.adapters.pop();
        }
        release_freed_memory();
        true
    }

    /// The parts a batch with `adapter` runs through.
    fn parts(&self, adapter: Option<usize>) -> Result<Parts<'_>, InvalidInput> {
        let own = Parts {
            text_encoder: &self.text_encoder,
            text_encoder_2: &self.text_encoder_2,
            prompt_cache: &self.prompt_cache,
            unet: &self.unet,
        };
        let Some(i) = adapter else {
            return Ok(own);
        };
        let a = self
            .adapters
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| InvalidInput(format!("adapter {i} is not loaded")))?;
        let (text_encoder, text_encoder_2, prompt_cache) = match &a.text {
            Some((te, te2, cache)) => (te, te2, cache),
            None => (own.text_encoder, own.text_encoder_2, own.prompt_cache),
        };
        Ok(Parts {
            text_encoder,
            text_encoder_2,
            prompt_cache,
            unet: a.unet.as_ref().unwrap_or(own.unet),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The components, for per-stage benchmarks (benches/model.rs) that time each one alone.
    pub fn tokenizers(&self) -> (&ClipTokenizer, &ClipTokenizer) {
        (&self.tokenizer, &self.tokenizer_2)
    }

    pub fn text_encoders(&self) -> (&ClipTextModel, &ClipTextModel) {
        (&self.text_encoder, &self.text_encoder_2)
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// Image sides must be multiples of this (the VAE's downsampling factor, 8 for SDXL).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// Checks settings and batch before any work; the message names the parameter.
    pub fn validate(&self, settings: &GenerationSettings, n: usize) -> Result<(), InvalidInput> {
        let f = self.vae_scale_factor();
        if n == 0 {
            return Err(InvalidInput("at least one image is required".into()));
        }
        for (name, v) in [("width", settings.width), ("height", settings.height)] {
            if v == 0 || v % f != 0 {
                return Err(InvalidInput(format!(
                    "{name} must be a positive multiple of {f}, got {v}"
                )));
            }
        }
        if settings.steps == 0 {
            return Err(InvalidInput("steps must be at least 1, got 0".into()));
        }
        self.parts(settings.adapter)?;
        // A batch is split into runs that fit 32-bit element counts (`model::chunks`), but
        // one image must fit on its own.
        let (_, lh, lw) = self.latent_shape(settings);
        let encoder = match settings.init_step {
            Some(_) => self
                .vae
                .encoder_elements_at(settings.height, settings.width),
            None => 0,
        };
        let largest = self
            .unet
            .elements_per_row(lh, lw)
            .max(self.vae.decoder_elements_at(lh, lw))
            .max(encoder);
        if largest > MAX_TENSOR_ELEMENTS {
            return Err(InvalidInput(format!(
                "a {}x{} image is too large for this model: one of its activations would hold \
                 {largest} elements, over the {MAX_TENSOR_ELEMENTS} a call can hold",
                settings.width, settings.height
            )));
        }
        if !settings.guidance_scale.is_finite() {
            return Err(InvalidInput(format!(
                "guidance_scale must be a finite number, got {}",
                settings.guidance_scale
            )));
        }
        Ok(())
    }

    /// Latent shape `[c, h/f, w/f]` for an image of the given size.
    pub fn latent_shape(&self, settings: &GenerationSettings) -> (usize, usize, usize) {
        let f = self.vae_scale_factor();
        (
            self.latent_channels,
            settings.height / f,
            settings.width / f,
        )
    }

    /// Keeps the embeddings of up to `entries` prompts on the device for later batches (least
    /// recently used out first; 0, the default, keeps none). Each holds `[S, H1+H2]` + `[P]`
    /// values in the run dtype (about 318 KB for SDXL in bf16). Replaces what was kept.
    pub fn set_prompt_cache_entries(&mut self, entries: usize) {
        self.prompt_cache = PromptCache::new(entries);
        self.prompt_cache_entries = entries;
        for a in self.adapters.iter_mut().flatten() {
            if let Some((_, _, cache)) = &mut a.text {
                *cache = PromptCache::new(entries);
            }
        }
    }

    /// How many prompts' embeddings are kept now.
    pub fn prompt_cache_len(&self) -> usize {
        self.prompt_cache.len()
    }

    /// Prompt embeddings `([B, S, H1+H2], pooled [B, P])` in run dtype, one row per prompt: each
    /// distinct prompt runs through the text encoders once (the rows of a repeated prompt are
    /// copies of its first), and a prompt kept from an earlier batch not at all. The rows equal
    /// [`Self::encode_prompts_uncached`]'s, to the rounding a different batch shape may bring
    /// on CUDA (bit for bit on the CPU).
    pub fn encode_prompts(&self, prompts: &[&str]) -> anyhow::Result<(Tensor, Tensor)> {
        self.encode_prompts_for(None, prompts)
    }

    /// [`Self::encode_prompts`] with the text encoders of `adapter`
    /// ([`GenerationSettings::adapter`]).
    pub fn encode_prompts_for(
        &self,
        adapter: Option<usize>,
        prompts: &[&str],
    ) -> anyhow::Result<(Tensor, Tensor)> {
        self.encode_prompts_counted(self.parts(adapter)?, prompts)
            .map(|(embeds, pooled, _)| (embeds, pooled))
    }

    fn encode_prompts_counted(
        &self,
        parts: Parts<'_>,
        prompts: &[&str],
    ) -> anyhow::Result<(Tensor, Tensor, PromptCounts)> {
        if prompts.is_empty() {
            let (embeds, pooled) = self.encode_with(parts, prompts)?;
            return Ok((embeds, pooled, PromptCounts::default()));
        }
        // The distinct prompts in first-seen order, and each prompt's index among them.
        let mut distinct: Vec<&str> = Vec::new();
        let mut index_of: std::collections::HashMap<&str, u32> = Default::default();
        let rows: Vec<u32> = prompts
            .iter()
            .map(|&p| {
                *index_of.entry(p).or_insert_with(|| {
                    distinct.push(p);
                    (distinct.len() - 1) as u32
                })
            })
            .collect();
        let kept: Vec<Option<(Tensor, Tensor)>> =
            distinct.iter().map(|p| parts.prompt_cache.get(p)).collect();
        let missing: Vec<&str> = distinct
            .iter()
            .zip(&kept)
            .filter(|(_, k)| k.is_none())
            .map(|(p, _)| *p)
            .collect();
        let counts = PromptCounts {
            encoded: missing.len(),
            repeated: prompts.len() - distinct.len(),
            cached: distinct.len() - missing.len(),
        };
        let fresh = if missing.is_empty() {
            None
        } else {
            let (embeds, pooled) = self.encode_with(parts, &missing)?;
            if parts.prompt_cache.capacity() > 0 {
                for (i, p) in missing.iter().enumerate() {
                    // Copies, so that a kept row does not keep its whole batch alive.
                    parts.prompt_cache.insert(
                        p,
                        (
                            embeds.narrow(0, i, 1)?.copy()?,
                            pooled.narrow(0, i, 1)?.copy()?,
                        ),
                    );
                }
            }
            Some((embeds, pooled))
        };
        let (embeds, pooled) = match fresh {
            Some(fresh) if counts.cached == 0 => fresh,
            fresh => {
                let mut next_fresh = 0;
                let mut embeds = Vec::with_capacity(distinct.len());
                let mut pooled = Vec::with_capacity(distinct.len());
                for k in kept {
                    let (e, p) = match k {
                        Some(rows) => rows,
                        None => {
                            let (fe, fp) = fresh.as_ref().ok_or_else(|| {
                                anyhow::anyhow!("a prompt neither kept nor encoded (this is a bug)")
                            })?;
                            next_fresh += 1;
                            (
                                fe.narrow(0, next_fresh - 1, 1)?,
                                fp.narrow(0, next_fresh - 1, 1)?,
                            )
                        }
                    };
                    embeds.push(e);
                    pooled.push(p);
                }
                (Tensor::cat(&embeds, 0)?, Tensor::cat(&pooled, 0)?)
            }
        };
        if counts.repeated == 0 {
            return Ok((embeds, pooled, counts));
        }
        let rows = Tensor::from_vec(rows, prompts.len(), &self.device)?;
        Ok((
            embeds.index_select(&rows, 0)?,
            pooled.index_select(&rows, 0)?,
            counts,
        ))
    }

    /// Encodes every prompt with both text encoders, repeats included, as one batch: `([B, S,
    /// H1+H2], pooled [B, P])` in run dtype.
    pub fn encode_prompts_uncached(&self, prompts: &[&str]) -> anyhow::Result<(Tensor, Tensor)> {
        self.encode_with(self.parts(None)?, prompts)
    }

    fn encode_with(&self, parts: Parts<'_>, prompts: &[&str]) -> anyhow::Result<(Tensor, Tensor)> {
        // The ids stay on the host for the pooling positions: reading them back from the GPU
        // would wait for the batch still running there (see `ClipTextModel::forward_ids`).
        let n = prompts.len();
        let ids = self.tokenizer.encode_ids(prompts)?;
        let ids_2 = self.tokenizer_2.encode_ids(prompts)?;
        // SDXL reads the first encoder's penultimate layer only (its pooled output is unused).
        let penultimate = parts.text_encoder.penultimate_ids(&ids, n, &self.device)?;
        let out_2 = parts.text_encoder_2.forward_ids(&ids_2, n, &self.device)?;
        let embeds = Tensor::cat(&[&penultimate, &out_2.penultimate], D::Minus1)?;
        Ok((embeds, out_2.pooled))
    }

    /// Prompt embeddings for a batch, with the negative (unconditional) half first when
    /// guidance runs, as diffusers concatenates them.
    fn text_conditioning(
        &self,
        parts: Parts<'_>,
        items: &[ImageRequest],
        guidance: bool,
    ) -> anyhow::Result<(Tensor, Tensor, PromptCounts)> {
        let prompts: Vec<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
        let (embeds, pooled, mut counts) = self.encode_prompts_counted(parts, &prompts)?;
        if !guidance {
            return Ok((embeds, pooled, counts));
        }
        let negatives: Vec<&str> = items.iter().map(|i| i.negative_prompt.as_str()).collect();
        let (mut neg_embeds, mut neg_pooled, neg_counts) =
            self.encode_prompts_counted(parts, &negatives)?;
        counts.add(neg_counts);
        if self.force_zeros_for_empty_prompt {
            // Per image: an empty negative prompt means zero embeddings (diffusers'
            // `negative_prompt=None` with force_zeros_for_empty_prompt).
            let keep: Vec<f32> = items
                .iter()
                .map(|i| {
                    if i.negative_prompt.is_empty() {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            let keep = Tensor::new(keep, &self.device)?.to_dtype(neg_embeds.dtype())?;
            neg_embeds = neg_embeds.broadcast_mul(&keep.reshape((items.len(), 1, 1))?)?;
            neg_pooled = neg_pooled.broadcast_mul(&keep.reshape((items.len(), 1))?)?;
        }
        Ok((
            Tensor::cat(&[&neg_embeds, &embeds], 0)?,
            Tensor::cat(&[&neg_pooled, &pooled], 0)?,
            counts,
        ))
    }

    /// Generates one image per request, all with the same settings, in one batch.
    pub fn generate(
        &self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
        noise: Option<&NoiseOverride>,
    ) -> anyhow::Result<GeneratedBatch> {
        self.launch(settings, items, noise)?.wait()
    }

    /// [`Self::generate`] up to the batch's copy back: with the [`Kernels::OVERLAP`] lever (and
    /// [`Kernels::POSTPROCESS`]) the copy is only queued, and the caller can queue the next
    /// batch behind it before it collects this one's images with [`PendingBatch::wait`];
    /// otherwise the images are already on the host.
    pub fn launch(
        &self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
        noise: Option<&NoiseOverride>,
    ) -> anyhow::Result<PendingBatch> {
        self.validate(settings, items.len())?;
        crate::device::apply_stream_order(&self.device)?;
        let n = items.len();
        let guidance = settings.uses_guidance();
        let (c, lh, lw) = self.latent_shape(settings);
        let seeds: Vec<u64> = items.iter().map(|i| i.seed).collect();
        let expect_shape = [n, c, lh, lw];
        let check = |what: &str, t: &Tensor| -> anyhow::Result<Tensor> {
            if t.dims() != expect_shape {
                return Err(InvalidInput(format!(
                    "{what} must have shape {expect_shape:?}, got {:?}",
                    t.dims()
                ))
                .into());
            }
            Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
        };

        let mut clock = StageClock::start(&self.device)?;
        let parts = self.parts(settings.adapter)?;
        let (embeds, pooled, prompts) = self.text_conditioning(parts, items, guidance)?;
        let rows = if guidance { 2 * n } else { n };
        let (h, w) = (settings.height as f32, settings.width as f32);
        let time_ids = Tensor::new(&[h, w, 0.0, 0.0, h, w], &self.device)?
            .to_dtype(self.dtype)?
            .reshape((1, 6))?
            .repeat((rows, 1))?;
        clock.mark()?;

        let scheduler = EulerAncestralScheduler::new(&self.scheduler_config, settings.steps)?;
        // diffusers' trailing spacing can give one more timestep than asked for (61, 103, ...
        // steps): noise is needed per timestep actually run.
        let n_timesteps = scheduler.timesteps().len();
        let start = settings.init_step.unwrap_or(0);
        if start >= n_timesteps {
            return Err(InvalidInput(format!(
                "an edit must start before the last of its schedule's {n_timesteps} steps, got \
                 step {start}"
            ))
            .into());
        }
        if let Some(steps) = noise.and_then(|o| o.step_noise.as_ref()) {
            if steps.len() != n_timesteps - start {
                return Err(InvalidInput(format!(
                    "step noise must have one tensor per denoising step run ({}), got {}",
                    n_timesteps - start,
                    steps.len()
                ))
                .into());
            }
        }
        let init = match noise.and_then(|o| o.init_latents.as_ref()) {
            Some(t) => check("init latents", t)?,
            None => noise::batch_noise(&seeds, 0, (c, lh, lw), &self.device)?,
        };
        // Latents stay in f32 across steps (the scheduler's arithmetic is f32 in diffusers
        // too); only the UNet's input is cast to the run dtype.
        let mut inpaint: Option<Inpaint> = None;
        let mut latents = match settings.init_step {
            None => (init * scheduler.init_noise_sigma())?,
            Some(_) => {
                let image_noise = match noise.and_then(|o| o.image_noise.as_ref()) {
                    Some(t) => check("image noise", t)?,
                    None => {
                        noise::batch_noise(&seeds, noise::IMAGE_STREAM, (c, lh, lw), &self.device)?
                    }
                };
                let image_latents = self.image_latents(settings, items, &image_noise)?;
                // The scheduler's `add_noise` at the start step.
                let noised = (&image_latents + (&init * scheduler.sigmas()[start])?)?;
                let masks = self.latent_masks(settings, items)?;
                let latents = match (&masks, start) {
                    // diffusers' inpainting at strength 1 starts its images from pure noise, as
                    // a generation does; img2img noises the image latents even then.
                    (Some(_), 0) => {
                        let masked: Vec<f32> = items
                            .iter()
                            .map(|i| f32::from(u8::from(item_mask(i).is_some())))
                            .collect();
                        let sel = Tensor::from_vec(masked, (n, 1, 1, 1), &self.device)?;
                        let pure = (&init * scheduler.init_noise_sigma())?;
                        (pure.broadcast_mul(&sel)? + noised.broadcast_mul(&(1.0 - &sel)?)?)?
                    }
                    _ => noised,
                };
                inpaint = match masks {
                    Some(repaint) => Some(Inpaint {
                        keep: (1.0 - &repaint)?,
                        repaint,
                        image_latents,
                        noise: init.clone(),
                    }),
                    None => None,
                };
                latents
            }
        };
        let previews: Vec<Vec<usize>> = items
            .iter()
            .map(|item| {
                item.partials
                    .as_ref()
                    .map_or_else(Vec::new, |p| partial_steps(n_timesteps - start, p.count))
            })
            .collect();
        for (i, &t) in scheduler.timesteps().iter().enumerate().skip(start) {
            let model_in = if guidance {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_in = scheduler
                .scale_model_input(&model_in, i)?
                .to_dtype(self.dtype)?;
            let pred = parts
                .unet
                .forward(&model_in, t, &embeds, &pooled, &time_ids)?
                .to_dtype(DType::F32)?;
            let pred = if guidance {
                let uncond = pred.narrow(0, 0, n)?;
                let cond = pred.narrow(0, n, n)?;
                (&uncond + ((cond - &uncond)? * settings.guidance_scale)?)?
            } else {
                pred
            };
            // The images that want a preview after this step: the estimate from before it.
            let wanted: Vec<usize> = (0..n)
                .filter(|&row| previews[row].contains(&(i - start)))
                .collect();
            let estimate = if wanted.is_empty() {
                None
            } else {
                Some(scheduler.denoised(&pred, i, &latents)?)
            };
            // The last step (SDXL-Turbo's only one) goes to sigma 0 and adds no noise: none is
            // drawn for it (an override's tensor is still checked).
            let step_noise = match noise.and_then(|o| o.step_noise.as_ref()) {
                Some(v) => Some(check("step noise", &v[i - start])?),
                None if scheduler.adds_noise(i)? => Some(noise::batch_noise(
                    &seeds,
                    i as u64 + 1,
                    (c, lh, lw),
                    &self.device,
                )?),
                None => None,
            };
            latents = scheduler.step(&pred, i, &latents, step_noise.as_ref())?;
            if let Some(p) = &inpaint {
                // The kept areas go back to the image's latents, noised to the next step's level
                // (not at all after the last): diffusers'
                // `(1 - mask) * init_latents_proper + mask * latents`.
                let proper = if i + 1 < n_timesteps {
                    (&p.image_latents + (&p.noise * scheduler.sigmas()[i + 1])?)?
                } else {
                    p.image_latents.clone()
                };
                latents = (proper.broadcast_mul(&p.keep)? + latents.broadcast_mul(&p.repaint)?)?;
            }
            if let Some(estimate) = estimate {
                // A masked edit's preview keeps the image where the image is kept.
                let estimate = match &inpaint {
                    Some(p) => {
                        (p.image_latents.broadcast_mul(&p.keep)?
                            + estimate.broadcast_mul(&p.repaint)?)?
                    }
                    None => estimate,
                };
                self.send_previews(&estimate, &wanted, i - start, items, &previews)?;
            }
        }
        clock.mark()?;

        let pixels = self.pixels(&latents)?;
        clock.mark()?;
        // The one copy back (and the one wait for the device) of the batch: queued with
        // OVERLAP, done here otherwise.
        let pixels = if ops::enabled(Kernels::OVERLAP) && pixels.dtype() == DType::U8 {
            let (b, h, w, c) = pixels.dims4()?;
            check_rgb(c)?;
            Pixels::Copy {
                copy: ops::copy_to_host(&pixels)?,
                dims: (b, h, w),
            }
        } else {
            Pixels::Images(rgb8_images(&pixels)?)
        };
        Ok(PendingBatch {
            pixels,
            clock,
            prompts,
        })
    }

    /// Edits: each image's latents as diffusers' img2img `prepare_latents` makes them before
    /// adding noise. The 8-bit pixels become `x / 255 * 2 - 1` (its `preprocess`), the VAE
    /// encoder gives the posterior, sampled with `noise` (`mean + exp(logvar / 2) * noise`,
    /// the log-variance clamped to [-30, 20]), and the sample is scaled into the UNet's
    /// latent space. f32 from the posterior on.
    fn image_latents(
        &self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
        noise: &Tensor,
    ) -> anyhow::Result<Tensor> {
        let (w, h) = (settings.width, settings.height);
        let mut bytes = Vec::with_capacity(items.len() * w * h * 3);
        for (i, item) in items.iter().enumerate() {
            let image = item.init_image.as_ref().ok_or_else(|| {
                InvalidInput(format!("image {i} of an edit batch has no input image"))
            })?;
            let (iw, ih) = image.image().dimensions();
            if (iw as usize, ih as usize) != (w, h) {
                return Err(InvalidInput(format!(
                    "image {i}'s input image is {iw}x{ih}, the batch's size is {w}x{h}"
                ))
                .into());
            }
            if let Some((mw, mh)) = image.mask().map(|m| m.dimensions()) {
                if (mw, mh) != (iw, ih) {
                    return Err(InvalidInput(format!(
                        "image {i}'s mask is {mw}x{mh}, its image {iw}x{ih}"
                    ))
                    .into());
                }
            }
            bytes.extend_from_slice(image.image().as_raw());
        }
        // Each byte's value through a table made on the host, with numpy's f32 arithmetic
        // (`x / 255` then `2 * x - 1`): the bytes cross to the device, not 4x as many floats.
        let table: Vec<f32> = (0..=255u8)
            .map(|b| (f32::from(b) / 255.0) * 2.0 - 1.0)
            .collect();
        let table = Tensor::new(table, &self.device)?;
        let bytes = Tensor::from_vec(bytes, items.len() * h * w * 3, &self.device)?;
        let pixels = table
            .index_select(&bytes, 0)?
            .reshape((items.len(), h, w, 3))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let moments = self
            .vae
            .encode_moments(&pixels.to_dtype(self.vae_dtype)?)?
            .to_dtype(DType::F32)?;
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let std = (moments.narrow(1, c, c)?.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
        let sample = (mean + (std * noise)?)?;
        let sf = self.vae_config.scaling_factor;
        Ok(match self.latent_stats()? {
            Some((mean, std)) => (sample.broadcast_sub(&mean)? * sf)?.broadcast_div(&std)?,
            None => (sample * sf)?,
        })
    }

    /// The VAE config's per-channel latent statistics `(mean, std)`, each `[1, C, 1, 1]` f32,
    /// when it has them (SDXL's has not).
    fn latent_stats(&self) -> anyhow::Result<Option<(Tensor, Tensor)>> {
        let cfg = &self.vae_config;
        let (Some(mean), Some(std)) = (&cfg.latents_mean, &cfg.latents_std) else {
            return Ok(None);
        };
        let column = |v: &[f64]| -> candle_core::Result<Tensor> {
            Tensor::new(v, &self.device)?
                .to_dtype(DType::F32)?
                .reshape((1, v.len(), 1, 1))
        };
        Ok(Some((column(mean)?, column(std)?)))
    }

    /// Edits with masks: `[n, 1, h/f, w/f]` f32, 1 where the latents are repainted and 0 where
    /// the image's are kept, as diffusers makes it: each mask binarised at 0.5 (`>= 128`), then
    /// sampled at the latent grid (`interpolate`'s default nearest mode reads pixel `(f*y, f*x)`).
    /// Images without a mask are repainted everywhere. `None` when no image of the batch has one.
    fn latent_masks(
        &self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<Option<Tensor>> {
        if !items.iter().any(|i| item_mask(i).is_some()) {
            return Ok(None);
        }
        let f = self.vae_scale_factor();
        let (lh, lw) = (settings.height / f, settings.width / f);
        let mut values = Vec::with_capacity(items.len() * lh * lw);
        for item in items {
            match item_mask(item) {
                Some(mask) => {
                    for y in 0..lh {
                        for x in 0..lw {
                            let v = mask.get_pixel((f * x) as u32, (f * y) as u32).0[0];
                            values.push(if v >= 128 { 1f32 } else { 0f32 });
                        }
                    }
                }
                None => values.extend(std::iter::repeat_n(1f32, lh * lw)),
            }
        }
        Ok(Some(Tensor::from_vec(
            values,
            (items.len(), 1, lh, lw),
            &self.device,
        )?))
    }

    /// Decodes the `rows` of the denoised `estimate` made after step `position` of the run and
    /// hands each to its image's sink with the preview's index. Its one copy back waits for
    /// the device: only streams that ask for previews pay for it.
    fn send_previews(
        &self,
        estimate: &Tensor,
        rows: &[usize],
        position: usize,
        items: &[ImageRequest],
        previews: &[Vec<usize>],
    ) -> anyhow::Result<()> {
        let selected = if rows.len() == items.len() {
            estimate.clone()
        } else {
            let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            estimate.index_select(&Tensor::new(index, &self.device)?, 0)?
        };
        let decoder = self.preview_decoder.as_ref().or(self.tiny_decoder.as_ref());
        let images = rgb8_images(&self.pixels_by(&selected, decoder)?)?;
        for (&row, image) in rows.iter().zip(images) {
            let nth = previews[row].iter().position(|&p| p == position);
            if let (Some(partials), Some(nth)) = (&items[row].partials, nth) {
                (partials.sink)(nth, image);
            }
        }
        Ok(())
    }

    /// Decodes `images` latents of `settings`' size with the preview decoder, as a stream's
    /// previews are decoded, so that its work per shape (cuDNN's plans) is done before a request
    /// waits for it. The batches' own decode never runs it. False, doing nothing, when the
    /// previews have no decoder of their own (`--preview-vae`).
    pub fn warm_up_previews(
        &self,
        settings: &GenerationSettings,
        images: usize,
    ) -> anyhow::Result<bool> {
        let Some(decoder) = &self.preview_decoder else {
            return Ok(false);
        };
        let (c, h, w) = self.latent_shape(settings);
        let latents = Tensor::zeros((images, c, h, w), DType::F32, &self.device)?;
        let decoded = rgb8_images(&self.pixels_by(&latents, Some(decoder))?)?;
        anyhow::ensure!(
            decoded.len() == images,
            "{} previews for {images}",
            decoded.len()
        );
        Ok(true)
    }

    /// Latents → `[B, H, W, 3]` pixels: u8 with the device-side postprocess
    /// ([`Kernels::POSTPROCESS`]), else f32 in [0, 1] to be quantised on the host.
    fn pixels(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        self.pixels_by(latents, self.tiny_decoder.as_ref())
    }

    /// [`Self::pixels`] decoded by `tiny` (TAESD) when given, else by the VAE.
    fn pixels_by(&self, latents: &Tensor, tiny: Option<&DecoderTiny>) -> anyhow::Result<Tensor> {
        let raw = self.decode_by(latents, tiny)?;
        Ok(if ops::enabled(Kernels::POSTPROCESS) {
            ops::to_rgb8(&raw)?
        } else {
            // The baseline: f32 [0, 1] NCHW, permuted and quantised on the host.
            postprocess(&raw)?.permute((0, 2, 3, 1))?
        })
    }

    /// Final latents → images in [0, 1], NCHW f32 (diffusers' `postprocess` before rounding).
    pub fn decode_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        postprocess(&self.vae_output(latents)?)
    }

    /// Final latents → the VAE decoder's output `[B, 3, H, W]` (nominally in [-1, 1]), in the
    /// VAE's dtype.
    fn vae_output(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        self.decode_by(latents, self.tiny_decoder.as_ref())
    }

    /// [`Self::vae_output`] by `tiny` (TAESD) when given, else by the VAE.
    fn decode_by(&self, latents: &Tensor, tiny: Option<&DecoderTiny>) -> anyhow::Result<Tensor> {
        if let Some(tiny) = tiny {
            // TAESD decodes the UNet's latents as they are (scaling factor 1.0).
            let z = (latents / tiny.scaling_factor())?.to_dtype(self.vae_dtype)?;
            return Ok(tiny.decode(&z)?);
        }
        let sf = self.vae_config.scaling_factor;
        let z = match self.latent_stats()? {
            Some((mean, std)) => latents.broadcast_mul(&(std / sf)?)?.broadcast_add(&mean)?,
            None => (latents / sf)?,
        };
        Ok(self.vae.decode(&z.to_dtype(self.vae_dtype)?)?)
    }
}

/// TAESD's decoder from `dir`, checked to decode the latents of the model's VAE (`vae_cfg`),
/// in the VAE's dtype so that the images come out of either decoder alike (the device-side
/// postprocess takes them as they are). Its encoder stays unread: the VAE encodes.
fn load_tiny_decoder(
    dir: &Path,
    source: &Source,
    vae_cfg: &AutoencoderKLConfig,
    vae_dtype: DType,
    device: &Device,
) -> LoadResult<DecoderTiny> {
    let path = dir.join("config.json");
    let cfg = AutoencoderTinyConfig::from_file(&path)?;
    if cfg.scale_factor() != vae_cfg.scale_factor()
        || cfg.latent_channels != vae_cfg.latent_channels
    {
        return Err(LoadError::Config {
            path,
            message: format!(
                "this AutoencoderTiny decodes {} latent channels at scale {}, the model's VAE {} \
                 at scale {}: not a decoder for this model",
                cfg.latent_channels,
                cfg.scale_factor(),
                vae_cfg.latent_channels,
                vae_cfg.scale_factor()
            ),
        });
    }
    load_component_but(
        dir,
        source,
        None,
        "diffusion_pytorch_model",
        &["encoder."],
        vae_dtype,
        device,
        |vb| DecoderTiny::new(vb, &cfg),
    )
}

/// diffusers' `(image / 2 + 0.5).clamp(0, 1)` in f32.
fn postprocess(image: &Tensor) -> anyhow::Result<Tensor> {
    Ok(((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// What a masked edit blends back after every step.
struct Inpaint {
    /// `[n, 1, h, w]`: 1 where the latents are repainted ([`Pipeline::latent_masks`]), and its
    /// complement.
    repaint: Tensor,
    keep: Tensor,
    /// The image latents and the noise they were noised with at the start.
    image_latents: Tensor,
    noise: Tensor,
}

/// An edit's mask, if the image has one.
fn item_mask(item: &ImageRequest) -> Option<&image::GrayImage> {
    item.init_image.as_ref().and_then(InitImage::mask)
}

/// A batch whose work is queued on the device ([`Pipeline::launch`]).
pub struct PendingBatch {
    pixels: Pixels,
    clock: StageClock,
    prompts: PromptCounts,
}

enum Pixels {
    Images(Vec<image::RgbImage>),
    Copy {
        copy: ops::HostCopy,
        /// (batch, height, width) of the RGB bytes.
        dims: (usize, usize, usize),
    },
}

impl PendingBatch {
    /// Whether the batch may still be running on the device (its copy back was only queued).
    pub fn is_queued(&self) -> bool {
        matches!(&self.pixels, Pixels::Copy { copy, .. } if copy.is_pending())
    }

    /// Waits for the batch's images (and its stage times, which its last event ends).
    pub fn wait(self) -> anyhow::Result<GeneratedBatch> {
        let images = match self.pixels {
            Pixels::Images(images) => images,
            Pixels::Copy {
                copy,
                dims: (b, h, w),
            } => copy.wait_with(|bytes| images_from_bytes(bytes, b, h, w))??,
        };
        let stages = self.clock.finish()?;
        Ok(GeneratedBatch {
            images,
            timings: StageTimings {
                text_encode: stages[0],
                unet: stages[1],
                vae_decode: stages[2],
            },
            prompts: self.prompts,
        })
    }
}

/// Stage boundaries of one batch, read once the batch is done.
///
/// On CUDA each mark is an event on the device's stream, so the host never waits for the GPU
/// between stages (it queues the UNet while the text encoders still run, and the GPU never idles
/// on a synchronisation); the durations are the GPU's own timestamps, read after the batch's one
/// copy back. On the CPU, where every op has finished when it returns, a wall clock. Each mark
/// also names the stage that follows for a profile being recorded ([`profile::set_stage`]).
struct StageClock {
    device: Device,
    marks: Vec<Mark>,
}

/// The stages in the order the pipeline runs them, as the profile names them.
const STAGES: [&str; 3] = ["text_encode", "unet", "vae_decode"];

impl StageClock {
    fn start(device: &Device) -> anyhow::Result<Self> {
        let mut clock = Self {
            device: device.clone(),
            marks: Vec::with_capacity(STAGES.len() + 1),
        };
        clock.mark()?;
        Ok(clock)
    }

    fn mark(&mut self) -> anyhow::Result<()> {
        self.marks.push(Mark::now(&self.device)?);
        profile::set_stage(STAGES.get(self.marks.len() - 1).copied().unwrap_or("-"));
        Ok(())
    }

    /// The time between consecutive marks (waits for the last CUDA event, which the batch's
    /// copy back has passed already).
    fn finish(&self) -> anyhow::Result<Vec<Duration>> {
        self.marks.windows(2).map(|w| w[0].until(&w[1])).collect()
    }
}

/// What the checkpoint's names depend on, from the configs; refuses what the original layout
/// cannot hold, and a checkpoint without the VAE the model needs.
fn checkpoint_layout(
    checkpoint: &Checkpoint,
    unet: &UNet2DConditionConfig,
    vae: &AutoencoderKLConfig,
    own_vae: bool,
) -> LoadResult<Layout> {
    if own_vae && !checkpoint.has_vae() {
        return Err(LoadError::Weights {
            path: checkpoint.path().to_path_buf(),
            message: "the checkpoint has no VAE (no first_stage_model.* tensors); give one \
                      with --vae fp16-fix"
                .into(),
        });
    }
    Layout::from_configs(unet, vae).map_err(|message| LoadError::Weights {
        path: checkpoint.path().to_path_buf(),
        message,
    })
}

/// What every component is adapted with: the layout of the original names (a checkpoint's,
/// kohya's LoRAs'), and the LoRAs fused in.
struct Adapt<'a> {
    layout: Option<&'a Layout>,
    loras: &'a [Arc<Lora>],
    /// Where the text encoders and UNet keep what they are built from, when adapters will
    /// share it.
    kept: Option<&'a KeptParts>,
}

/// What the model's text encoders and UNet were built from ([`Kept`]).
#[derive(Default)]
struct KeptParts {
    text_encoder: Kept,
    text_encoder_2: Kept,
    unet: Kept,
}

impl KeptParts {
    fn of(&self, part: Part) -> Option<&Kept> {
        match part {
            Part::TextEncoder => Some(&self.text_encoder),
            Part::TextEncoder2 => Some(&self.text_encoder_2),
            Part::Unet => Some(&self.unet),
            Part::Vae => None,
        }
    }
}

/// Builds adapters (`--lora-modules`, and those loaded while serving) from the model's kept
/// tensors.
struct AdapterBuilder {
    kept: KeptParts,
    /// Where the model's weights came from, and its folder: the weights an adapter's LoRAs
    /// adapt are read from there again, so that they fuse into the file's values as `--lora`
    /// does (the kept ones are already rounded to the run dtype).
    source: Source,
    dir: ModelDir,
    /// `--lora`: fused into the model, so into every adapter too.
    fused: Vec<Arc<Lora>>,
    layout: Option<Layout>,
    te_cfg: ClipTextConfig,
    te2_cfg: ClipTextConfig,
    unet_cfg: UNet2DConditionConfig,
    dtype: DType,
    device: Device,
    /// What the model's build derived from its weights ([`SharedDerivations`]), shared by
    /// the adapters built while serving.
    derivations: Derivations,
}

impl AdapterBuilder {
    fn adapter(&self, spec: &AdapterSpec) -> LoadResult<Adapter> {
        let loras = spec
            .loras
            .iter()
            .map(|l| Lora::open(l).map(Arc::new))
            .collect::<LoadResult<Vec<_>>>()?;
        let used = || loras.iter().map(|l| l.used_count()).sum::<usize>();
        let fail = |e: candle_core::Error| LoadError::Weights {
            path: spec
                .loras
                .first()
                .map(|l| l.path.clone())
                .unwrap_or_default(),
            message: format!("building the adapter {:?}: {e}", spec.name),
        };
        let vb = |part: Part, kept: &Kept| -> LoadResult<VarBuilder<'static>> {
            let original = self.original(part)?;
            let backend = LoraBackend::wrap_reading(
                kept.backend(),
                original,
                part,
                &loras,
                self.layout.as_ref(),
            );
            Ok(VarBuilder::from_backend(
                backend,
                self.dtype,
                self.device.clone(),
            ))
        };
        let k = &self.kept;
        let before = used();
        let te = ClipTextModel::new(vb(Part::TextEncoder, &k.text_encoder)?, &self.te_cfg, false)
            .map_err(fail)?;
        let te2 = ClipTextModel::new(
            vb(Part::TextEncoder2, &k.text_encoder_2)?,
            &self.te2_cfg,
            true,
        )
        .map_err(fail)?;
        let text = (used() > before).then(|| (te, te2, PromptCache::new(0)));
        let before = used();
        let unet =
            UNet2DConditionModel::new(vb(Part::Unet, &k.unet)?, &self.unet_cfg).map_err(fail)?;
        let unet = (used() > before).then_some(unet);
        for lora in &loras {
            lora.ensure_used()?;
        }
        let modules: usize = loras.iter().map(|l| l.module_count()).sum();
        let adapted: Vec<&str> = [(text.is_some(), "text encoders"), (unet.is_some(), "UNet")]
            .into_iter()
            .filter_map(|(own, what)| own.then_some(what))
            .collect();
        tracing::info!(
            "adapter {}: {modules} LoRA modules fused ({})",
            spec.name,
            adapted.join(", ")
        );
        Ok(Adapter {
            name: spec.name.clone(),
            text,
            unet,
        })
    }

    /// `part`'s weights as the model's build read them, `--lora` fused in (in f32).
    fn original(&self, part: Part) -> LoadResult<Box<dyn SimpleBackend>> {
        let raw: Box<dyn SimpleBackend> = match &self.source {
            Source::Checkpoint(checkpoint) => {
                Box::new(checkpoint_backend(checkpoint, part, self.layout.as_ref())?)
            }
            Source::Random(seed) => Box::new(RandomWeights::new(*seed)),
            Source::Files => {
                let (folder, stem) = component_weights(part);
                let path = find_weights(&self.dir.component(folder)?, stem)?;
                Box::new(SafetensorsBackend::open(&path)?)
            }
        };
        Ok(LoraBackend::wrap(
            raw,
            part,
            &self.fused,
            self.layout.as_ref(),
        ))
    }
}

/// `part`'s weights in a single-file checkpoint, under their diffusers names.
fn checkpoint_backend(
    checkpoint: &Checkpoint,
    part: Part,
    layout: Option<&Layout>,
) -> LoadResult<ComponentBackend> {
    let layout = layout.ok_or_else(|| LoadError::Weights {
        path: checkpoint.path().to_path_buf(),
        message: "no layout for the checkpoint's names".into(),
    })?;
    checkpoint.backend(part, layout)
}

/// The component folder and weights file stem of one of the pipeline's parts in the diffusers
/// layout (the VAE's folder may be `--vae`'s instead).
fn component_weights(part: Part) -> (&'static str, &'static str) {
    match part {
        Part::TextEncoder => ("text_encoder", "model"),
        Part::TextEncoder2 => ("text_encoder_2", "model"),
        Part::Unet => ("unet", "diffusion_pytorch_model"),
        Part::Vae => ("vae", "diffusion_pytorch_model"),
    }
}

/// Reads one component's weights (or draws random ones) and builds it, naming the file on error
/// and refusing a checkpoint whose tensors the model did not all read. `part`: which of the
/// pipeline's components this is (`None` for one read from its own folder as is, a `--vae` or
/// TAESD), with what adapts it.
fn load_component<T>(
    folder: &Path,
    source: &Source,
    part: Option<(Part, &Adapt)>,
    stem: &str,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> LoadResult<T> {
    load_component_but(folder, source, part, stem, &[], dtype, device, build)
}

/// [`load_component`], leaving the checkpoint's tensors under the `ignored` prefixes unread.
#[allow(clippy::too_many_arguments)]
fn load_component_but<T>(
    folder: &Path,
    source: &Source,
    part: Option<(Part, &Adapt)>,
    stem: &str,
    ignored: &[&str],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> LoadResult<T> {
    let wrap = |b: Box<dyn SimpleBackend>| match part {
        Some((p, adapt)) => {
            let b = LoraBackend::wrap(b, p, adapt.loras, adapt.layout);
            match adapt.kept.and_then(|k| k.of(p)) {
                // The UNet's linear layers hold their weights transposed; CLIP's as they are.
                Some(kept) => kept.keeping(b, p == Part::Unet),
                None => b,
            }
        }
        None => b,
    };
    match (source, part) {
        (Source::Checkpoint(checkpoint), Some((p, adapt))) => {
            let backend = wrap(Box::new(checkpoint_backend(checkpoint, p, adapt.layout)?));
            let vb = VarBuilder::from_backend(backend, dtype, device.clone());
            build(vb).map_err(|e| weights_error(checkpoint.path(), e))
        }
        (Source::Files | Source::Checkpoint(_), _) => build_checked_wrapped(
            &find_weights(folder, stem)?,
            dtype,
            device,
            ignored,
            wrap,
            build,
        ),
        (Source::Random(seed), _) => {
            let backend = wrap(Box::new(RandomWeights::new(*seed)));
            let vb = VarBuilder::from_backend(backend, dtype, device.clone());
            build(vb).map_err(|e| LoadError::Weights {
                path: folder.to_path_buf(),
                message: format!("building weights (random, with the LoRAs): {e}"),
            })
        }
    }
}

/// `[B, 3, H, W]` in [0, 1] → 8-bit images, rounding like diffusers' `numpy_to_pil`
/// (`(x * 255).round()`, numpy's round-half-to-even).
pub fn to_rgb8(images: &Tensor) -> anyhow::Result<Vec<image::RgbImage>> {
    rgb8_images(&images.permute((0, 2, 3, 1))?)
}

/// `[B, H, W, 3]` pixels → one image each, with one copy from the device for the whole batch:
/// u8 (the device-side postprocess) as they are, f32 in [0, 1] rounded like diffusers'
/// `numpy_to_pil` (`(x * 255).round()`, numpy's round-half-to-even).
fn rgb8_images(pixels: &Tensor) -> anyhow::Result<Vec<image::RgbImage>> {
    let (b, h, w, c) = pixels.dims4()?;
    check_rgb(c)?;
    let flat = pixels.contiguous()?.flatten_all()?;
    let bytes: Vec<u8> = match flat.dtype() {
        DType::U8 => flat.to_vec1()?,
        _ => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
            .collect(),
    };
    images_from_bytes(&bytes, b, h, w)
}

fn check_rgb(channels: usize) -> anyhow::Result<()> {
    if channels != 3 {
        anyhow::bail!("the VAE produced {channels} channels; expected 3 (RGB)");
    }
    Ok(())
}

/// `b` RGB images of `h` x `w` from their bytes, image after image.
fn images_from_bytes(
    bytes: &[u8],
    b: usize,
    h: usize,
    w: usize,
) -> anyhow::Result<Vec<image::RgbImage>> {
    if h * w == 0 || bytes.len() != b * h * w * 3 {
        anyhow::bail!(
            "{} bytes for {b} images of {w}x{h} (this is a bug)",
            bytes.len()
        );
    }
    bytes
        .chunks_exact(h * w * 3)
        .map(|img| {
            image::RgbImage::from_raw(w as u32, h as u32, img.to_vec())
                .ok_or_else(|| anyhow::anyhow!("image buffer size mismatch (this is a bug)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::partial_steps;

    #[test]
    fn previews_spread_over_the_steps_before_the_last() {
        // One step has nothing before its image.
        for count in 0..=3 {
            assert_eq!(partial_steps(1, count), Vec::<usize>::new());
            assert_eq!(partial_steps(0, count), Vec::<usize>::new());
        }
        assert_eq!(partial_steps(2, 3), [0]);
        assert_eq!(partial_steps(4, 3), [0, 1, 2]);
        assert_eq!(partial_steps(4, 2), [0, 2]);
        assert_eq!(partial_steps(4, 1), [1]);
        assert_eq!(partial_steps(8, 3), [1, 3, 5]);
        assert_eq!(partial_steps(6, 1), [2]);
        assert_eq!(partial_steps(8, 0), Vec::<usize>::new());
        for steps in 1..=100 {
            for count in 0..=3 {
                let at = partial_steps(steps, count);
                assert_eq!(at.len(), count.min(steps - 1), "{steps} steps, {count}");
                assert!(
                    at.windows(2).all(|w| w[0] < w[1]),
                    "{steps}, {count}: {at:?}"
                );
                assert!(
                    at.iter().all(|&s| s + 1 < steps),
                    "{steps}, {count}: {at:?}"
                );
            }
        }
    }
}
