//! `turbine generate`: prompts in, PNG files out, without a server.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};

use crate::cli::UsageError;
use crate::device::{parse_device, parse_dtype};
use crate::hub::ModelArgs;
use crate::model::pipeline::{
    edit_schedule, GenerationSettings, ImageRequest, InitImage, NoiseOverride,
};
use crate::server::api::OutputFormat;
use crate::server::provenance::{ImageFacts, ImageMetadata, Marks, SourceType};
use crate::server::upload;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A prompt; repeat the flag for several images in one batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Negative prompt (used when --guidance > 1): once for every prompt, or once per prompt.
    #[arg(long)]
    pub negative_prompt: Vec<String>,
    /// Image size as WIDTHxHEIGHT; both multiples of 8.
    #[arg(long, default_value = "512x512")]
    pub size: String,
    /// Denoising steps (SDXL-Turbo is trained for 1 to 4).
    #[arg(long, default_value_t = 1)]
    pub steps: usize,
    /// Classifier-free guidance scale; guidance runs only above 1 (SDXL-Turbo uses 0).
    #[arg(long, default_value_t = 0.0)]
    pub guidance: f64,
    /// Seed of the first image; image i gets seed + i. Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// f32, f16 or bf16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub kernels: crate::cli::KernelArgs,
    /// A safetensors file with one tensor `latents` of shape [n_prompts, 4, h/8, w/8]
    /// (unscaled standard normal, diffusers' `latents=` convention) to start from. With
    /// --image, it is the noise added to the image's latents, and the file may also hold
    /// `image_noise` of the same shape: the normals that sample the VAE encoder's posterior
    /// (diffusers' `latent_dist.sample`; without it they come from the seeds).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Edit this image (PNG, JPEG or WebP; resized to --size) instead of starting from noise:
    /// SDXL-Turbo image-to-image, what `POST /v1/images/edits` runs. Every prompt edits it.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// With --image: an OpenAI mask of the image's size whose transparent areas are repainted
    /// and opaque areas kept (inpainting).
    #[arg(long, requires = "image")]
    pub mask: Option<PathBuf>,
    /// With --image: an OpenAI markup, a partly transparent image of the image's size laid
    /// over it before the edit (a sketch or colour patch to guide it); not with --mask.
    #[arg(long, requires = "image", conflicts_with = "mask")]
    pub markup: Option<PathBuf>,
    /// With --image: how far the image is noised, in (0, 1]; --steps steps run (diffusers'
    /// `num_inference_steps=2, strength=0.5` is `--steps 1 --strength 0.5`).
    #[arg(long, requires = "image", default_value_t = 0.5)]
    pub strength: f64,
    /// Output PNG path; with several prompts, `-0`, `-1`, ... go before the extension.
    #[arg(long)]
    pub out: PathBuf,
    /// What each PNG states about itself, as `serve --image-metadata` (`provenance`: that a
    /// generative model made it, and which; `parameters`: also the prompts, seed and
    /// settings; `none`).
    #[arg(long, env = "TURBINE_IMAGE_METADATA", value_enum, default_value_t)]
    pub image_metadata: ImageMetadata,
}

/// Parses `WIDTHxHEIGHT`.
pub fn parse_size(s: &str) -> Result<(usize, usize), UsageError> {
    let bad = || {
        UsageError(format!(
            "invalid --size '{s}': expected WIDTHxHEIGHT, e.g. 512x512"
        ))
    };
    let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    if w == 0 || h == 0 || !w.is_multiple_of(8) || !h.is_multiple_of(8) {
        return Err(UsageError(format!(
            "invalid --size '{s}': width and height must be positive multiples of 8"
        )));
    }
    if w > 4096 || h > 4096 {
        return Err(UsageError(format!(
            "invalid --size '{s}': each side must be at most 4096"
        )));
    }
    Ok((w, h))
}

/// The file for image `i` of `n`: `PATH` itself for one image, else `stem-i.ext`.
pub fn output_path(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let name = match out.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}-{i}.{ext}"),
        None => format!("{stem}-{i}"),
    };
    out.with_file_name(name)
}

pub fn load_init_latents(path: &Path, device: &Device) -> anyhow::Result<candle_core::Tensor> {
    Ok(load_noise(path, device)?.0)
}

/// `--init-latents`' `latents`, and its `image_noise` if it has one.
fn load_noise(
    path: &Path,
    device: &Device,
) -> anyhow::Result<(candle_core::Tensor, Option<candle_core::Tensor>)> {
    let mut tensors = candle_core::safetensors::load(path, device).map_err(|e| {
        UsageError(format!(
            "cannot read --init-latents {}: {e}",
            path.display()
        ))
    })?;
    let latents = tensors.remove("latents").ok_or_else(|| {
        UsageError(format!(
            "--init-latents {} has no tensor named `latents`",
            path.display()
        ))
    })?;
    Ok((latents, tensors.remove("image_noise")))
}

/// `--image` (and `--mask` or `--markup`) read as the server reads an edit's uploads, at
/// `width` x `height`.
fn read_init_image(
    args: &Args,
    path: &Path,
    width: usize,
    height: usize,
) -> anyhow::Result<InitImage> {
    let read = |flag: &str, p: &Path| {
        std::fs::read(p).map_err(|e| UsageError(format!("cannot read {flag} {}: {e}", p.display())))
    };
    // The error's `param` says which upload it is about.
    let bad = |e: crate::server::error::ApiError| match (e.param(), &args.mask, &args.markup) {
        (Some("mask"), Some(m), _) => UsageError(format!("--mask {}: {e}", m.display())),
        (Some("markup"), _, Some(m)) => UsageError(format!("--markup {}: {e}", m.display())),
        _ => UsageError(format!("--image {}: {e}", path.display())),
    };
    let bytes = read("--image", path)?;
    let mask = args
        .mask
        .as_deref()
        .map(|m| read("--mask", m))
        .transpose()?;
    let markup = args
        .markup
        .as_deref()
        .map(|m| read("--markup", m))
        .transpose()?;
    let files = upload::EditFiles {
        image: &bytes,
        mask: mask.as_deref(),
        markup: markup.as_deref(),
    };
    let dims = files.check().map_err(bad)?;
    files
        .init_image(dims, width as u32, height as u32)
        .map_err(|e| bad(e).into())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.kernels.apply();
    let (width, height) = parse_size(&args.size)?;
    let device = parse_device(&args.device).map_err(|e| UsageError(e.to_string()))?;
    let dtype: DType =
        parse_dtype(args.dtype.as_deref(), &device).map_err(|e| UsageError(e.to_string()))?;
    let n = args.prompt.len();
    let negatives: Vec<String> = match args.negative_prompt.len() {
        0 => vec![String::new(); n],
        1 => vec![args.negative_prompt[0].clone(); n],
        k if k == n => args.negative_prompt.clone(),
        k => {
            return Err(UsageError(format!(
            "--negative-prompt given {k} times for {n} prompts: give it once, or once per prompt"
        ))
            .into())
        }
    };
    if args.steps == 0 || args.steps > 1000 {
        return Err(UsageError(format!(
            "--steps must be between 1 and 1000, got {}",
            args.steps
        ))
        .into());
    }
    if !args.guidance.is_finite() || args.guidance < 0.0 {
        return Err(UsageError(format!(
            "--guidance must be a finite number >= 0, got {}",
            args.guidance
        ))
        .into());
    }
    let init_image = match &args.image {
        Some(path) => Some(read_init_image(&args, path, width, height)?),
        None => None,
    };
    let (schedule_steps, init_step) = match &init_image {
        Some(_) => {
            let (n, start) =
                edit_schedule(args.steps, args.strength).map_err(|e| UsageError(e.0))?;
            (n, Some(start))
        }
        None => (args.steps, None),
    };
    let base_seed = args.seed.unwrap_or_else(rand::random);
    let items: Vec<ImageRequest> = args
        .prompt
        .iter()
        .zip(negatives)
        .enumerate()
        .map(|(i, (p, neg))| ImageRequest {
            prompt: p.clone(),
            negative_prompt: neg,
            seed: base_seed.wrapping_add(i as u64),
            init_image: init_image.clone(),
            partials: None,
        })
        .collect();
    let noise = match &args.init_latents {
        Some(p) => {
            let (latents, image_noise) = load_noise(p, &device)?;
            if image_noise.is_some() && init_image.is_none() {
                return Err(UsageError(format!(
                    "--init-latents {} has `image_noise`, which only an edit (--image) uses",
                    p.display()
                ))
                .into());
            }
            Some(NoiseOverride {
                init_latents: Some(latents),
                step_noise: None,
                image_noise,
            })
        }
        None => None,
    };

    let mut model = args.model.clone();
    if let Some(v) = model.preview_vae.take() {
        // Nothing to fetch or load for it: generate makes no previews.
        tracing::warn!(
            "--preview-vae {} decodes a stream's previews, and generate makes none: ignored",
            v.key()
        );
    }
    let started = std::time::Instant::now();
    let pipeline = crate::cli::load_pipeline(&model, &device, dtype)?;
    tracing::info!(elapsed = ?started.elapsed(), ?dtype, "model loaded");

    let settings = GenerationSettings {
        width,
        height,
        steps: schedule_steps,
        guidance_scale: args.guidance,
        init_step,
        adapter: None,
    };
    pipeline
        .validate(&settings, n)
        .map_err(|e| UsageError(e.to_string()))?;
    let started = std::time::Instant::now();
    let batch = pipeline
        .generate(&settings, &items, noise.as_ref())
        .map_err(
            |e| match e.downcast::<crate::model::pipeline::InvalidInput>() {
                Ok(bad) => UsageError(bad.0).into(),
                Err(e) => e,
            },
        )?;
    let t = batch.timings;
    tracing::info!(
        total = ?started.elapsed(),
        text_encode = ?t.text_encode,
        unet = ?t.unet,
        vae_decode = ?t.vae_decode,
        "generated {n} image(s)"
    );
    for (i, (img, item)) in batch.images.iter().zip(&items).enumerate() {
        let path = output_path(&args.out, i, n);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let facts = ImageFacts {
            model: &args.model.model,
            adapter: None,
            source: SourceType::of(init_image.as_ref()),
            prompt: &item.prompt,
            negative_prompt: &item.negative_prompt,
            seed: item.seed,
            steps: schedule_steps as u32,
            guidance_scale: args.guidance,
            width: width as u32,
            height: height as u32,
            strength: init_image.as_ref().map(|_| args.strength),
        };
        let marks = Marks::new(args.image_metadata, &facts);
        let png = crate::server::encode::encode(img, OutputFormat::Png, 100, marks.as_ref())
            .with_context(|| format!("encoding {}", path.display()))?;
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        println!("{} seed={}", path.display(), item.seed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512x512").unwrap(), (512, 512));
        assert_eq!(parse_size("64X40").unwrap(), (64, 40));
        for bad in ["", "abc", "512", "0x512", "513x512", "512x-8", "8192x8192"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn output_paths() {
        let p = Path::new("out/cat.png");
        assert_eq!(output_path(p, 0, 1), PathBuf::from("out/cat.png"));
        assert_eq!(output_path(p, 1, 3), PathBuf::from("out/cat-1.png"));
        assert_eq!(output_path(Path::new("cat"), 2, 3), PathBuf::from("cat-2"));
    }
}
