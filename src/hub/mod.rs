//! Getting model weights onto the machine: manifests (`models/<name>/manifest.json`), the
//! download from the Hugging Face Hub or a mirror (`turbine download`), and [`ModelArgs`], the
//! options `generate` / `serve` / `bench` share to find the model directory they load.
//!
//! A model directory is the Hub's diffusers layout (what [`crate::model::loader::ModelDir`]
//! reads) plus `turbine-lock.json`, which records where each file came from and its SHA-256.

pub mod download;
pub mod error;
pub mod lock;
pub mod manifest;

use std::fmt;
use std::path::{Path, PathBuf};

pub use download::{
    download, download_blocking, local_status, verify_offline, DownloadReport, HubConfig,
    LocalStatus,
};
pub use error::{HubError, TokenSource};
pub use lock::{Lock, LOCK_FILE};
pub use manifest::{Manifest, Plan};

/// A replacement VAE from the model's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VaeVariant {
    /// madebyollin/sdxl-vae-fp16-fix: the SDXL VAE fine-tuned so that decoding in float16 does
    /// not overflow (the stock VAE gives NaN, i.e. black images, in fp16 unless upcast).
    #[value(name = "fp16-fix")]
    Fp16Fix,
    /// madebyollin/taesdxl: TAESD, a tiny decoder trained on SDXL's latents (about 10 MB):
    /// decodes with a small fraction of the VAE's work, less faithfully in fine detail. It
    /// replaces the decoder only; the model's VAE still encodes edits' input images.
    #[value(name = "taesdxl")]
    Taesdxl,
}

impl VaeVariant {
    /// The key of this variant in a manifest's `vae` table.
    pub fn key(self) -> &'static str {
        match self {
            VaeVariant::Fp16Fix => "fp16-fix",
            VaeVariant::Taesdxl => "taesdxl",
        }
    }
}

/// A decoder for stream previews only (`--preview-vae`), from the model's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewVae {
    /// madebyollin/taesdxl: TAESD's tiny decoder decodes the previews of streamed images
    /// (`partial_images`) while the VAE (or `--vae`) still decodes the images themselves.
    #[value(name = "taesdxl")]
    Taesdxl,
}

impl PreviewVae {
    /// The key of this decoder in a manifest's `vae` table.
    pub fn key(self) -> &'static str {
        match self {
            PreviewVae::Taesdxl => "taesdxl",
        }
    }
}

/// Which model to load, shared by `generate`, `serve` and `bench` (flatten it into their Args).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ModelArgs {
    /// Model to load, by the name of its manifest (models/NAME/manifest.json; built in:
    /// sdxl-turbo). Its files live in MODELS_ROOT/NAME/; missing ones are downloaded on first
    /// use (about 7 GB for sdxl-turbo) unless --offline.
    #[arg(long, env = "TURBINE_MODEL", default_value = "sdxl-turbo")]
    pub model: String,

    /// Folder holding one folder per model, relative to the working directory.
    #[arg(long, env = "TURBINE_MODELS_ROOT", default_value = "models")]
    pub models_root: PathBuf,

    /// Load this diffusers-layout directory as is, without manifest, download or check (for
    /// example a snapshot from Python's huggingface_hub cache:
    /// ~/.cache/huggingface/hub/models--stabilityai--sdxl-turbo/snapshots/COMMIT).
    #[arg(long, env = "TURBINE_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,

    /// Hub branch, tag or commit to fetch when files are missing (default: the manifest's,
    /// `main`). A directory downloaded at another revision counts as missing.
    #[arg(long, env = "TURBINE_REVISION")]
    pub revision: Option<String>,

    /// Never use the network: when files are missing, fail with their list and the command
    /// that fetches them. HF_HUB_OFFLINE=1 does the same.
    #[arg(long, env = "TURBINE_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,

    /// Build the full architecture with deterministic random weights from the configs alone
    /// (benchmarks on machines without the weights; the images are noise). Nothing is
    /// downloaded; the configs come from --model-dir or MODELS_ROOT/NAME.
    #[arg(long, env = "TURBINE_RANDOM_WEIGHTS", value_parser = clap::builder::BoolishValueParser::new())]
    pub random_weights: bool,

    /// Replace the model's VAE: fp16-fix (madebyollin/sdxl-vae-fp16-fix, about 335 MB, kept
    /// in MODEL_DIR/vae-fp16-fix/) decodes in float16 without overflowing; taesdxl
    /// (madebyollin/taesdxl, about 10 MB, in MODEL_DIR/vae-taesdxl/) decodes with TAESD's tiny
    /// decoder: far less work per image, less faithful in fine detail.
    #[arg(long, env = "TURBINE_VAE", value_enum)]
    pub vae: Option<VaeVariant>,

    /// Load the weights from this single-file checkpoint (one .safetensors in the original
    /// layout: Stability AI's sd_xl_turbo_1.0_fp16.safetensors, or an SDXL model shared for
    /// A1111 / ComfyUI / Civitai) with the configs and tokenizers of --model-dir, else
    /// MODELS_ROOT/NAME, whose weights are neither read nor downloaded.
    #[arg(long, env = "TURBINE_CHECKPOINT", conflicts_with = "random_weights")]
    pub checkpoint: Option<PathBuf>,

    /// Fuse a LoRA into the weights as they load: FILE or FILE:SCALE (default scale 1), in
    /// kohya's layout (A1111, ComfyUI, Civitai: lora_unet_..., lora_te1_..., lora_te2_...) or
    /// diffusers' (unet.*.lora_A/lora_B); repeat it (or separate with commas) for several.
    /// Every module of the file must fit the model, or the model does not load.
    #[arg(long = "lora", env = "TURBINE_LORA", value_delimiter = ',',
          value_parser = crate::model::lora::LoraSpec::parse)]
    pub loras: Vec<crate::model::lora::LoraSpec>,

    /// Decode stream previews (`partial_images`) with TAESD's tiny decoder (taesdxl:
    /// madebyollin/taesdxl, about 10 MB, in MODEL_DIR/vae-taesdxl/), a small fraction of a VAE
    /// decode each, while the VAE (or --vae) still decodes the images themselves.
    #[arg(long, env = "TURBINE_PREVIEW_VAE", value_enum)]
    pub preview_vae: Option<PreviewVae>,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            model: "sdxl-turbo".into(),
            models_root: PathBuf::from("models"),
            model_dir: None,
            revision: None,
            offline: false,
            random_weights: false,
            vae: None,
            preview_vae: None,
            checkpoint: None,
            loras: Vec::new(),
        }
    }
}

/// The directory to load, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    /// A directory in the diffusers layout. With `random_weights`, only its configs and
    /// tokenizer files are read.
    pub dir: PathBuf,
    /// A VAE folder (config.json + weights) that replaces `dir/vae`, when `--vae` asked for one.
    pub vae_dir: Option<PathBuf>,
    /// The tiny decoder's folder that decodes previews, when `--preview-vae` asked for one.
    pub preview_vae_dir: Option<PathBuf>,
    /// Build the models with [`crate::model::loader::RandomWeights`] instead of reading weights.
    pub random_weights: bool,
    /// A single-file checkpoint the weights come from (`dir` then gives configs and tokenizers).
    pub checkpoint: Option<PathBuf>,
    /// LoRAs fused into the weights as they load (`--lora`).
    pub loras: Vec<crate::model::lora::LoraSpec>,
    /// (repository, commit) of each source, from the lock; empty for `--model-dir`.
    pub origin: Vec<(String, String)>,
}

impl fmt::Display for ResolvedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dir.display())?;
        if self.random_weights {
            write!(f, " (configs only: random weights)")?;
        }
        if let Some(c) = &self.checkpoint {
            write!(f, " (configs) with weights from {}", c.display())?;
        }
        for l in &self.loras {
            write!(f, " + LoRA {} at {}", l.path.display(), l.scale)?;
        }
        for (repo, commit) in &self.origin {
            write!(f, " [{repo}@{}]", &commit[..commit.len().min(12)])?;
        }
        if let Some(v) = &self.vae_dir {
            write!(f, " with VAE {}", v.display())?;
        }
        if let Some(v) = &self.preview_vae_dir {
            write!(f, " with previews by {}", v.display())?;
        }
        Ok(())
    }
}

impl ModelArgs {
    /// The model directory to load, downloading what is missing (see [`Self::resolve_with`]),
    /// with the Hub settings from the environment (`HF_ENDPOINT`, `HF_TOKEN`, ...).
    pub fn resolve(&self) -> anyhow::Result<ResolvedModel> {
        Ok(self.resolve_with(&HubConfig::from_env())?)
    }

    /// - `--random-weights`: the configs directory (`--model-dir`, else MODELS_ROOT/NAME), no
    ///   network.
    /// - `--model-dir DIR`: DIR as is.
    /// - otherwise MODELS_ROOT/NAME from the manifest: complete and recorded in the lock (by
    ///   size; `turbine download` re-hashes) → used without network; missing or unverified
    ///   files → downloaded, or with `--offline` an error listing them with the command to
    ///   fetch them (files present without a lock record are used offline, with a warning).
    pub fn resolve_with(&self, hub: &HubConfig) -> Result<ResolvedModel, HubError> {
        if self.random_weights {
            let dir = self
                .model_dir
                .clone()
                .unwrap_or_else(|| self.models_root.join(&self.model));
            if !dir.join("model_index.json").is_file() && !dir.join("unet").is_dir() {
                return Err(HubError::Usage(format!(
                    "--random-weights needs the model's config files, but {} has no \
                     model_index.json or unet/ (use --model-dir with a diffusers-layout \
                     directory)",
                    dir.display()
                )));
            }
            // The replacement VAE's config, from its folder (committed for taesdxl).
            let (vae_dir, preview_vae_dir) = self.extra_dirs_in(&dir)?;
            return Ok(ResolvedModel {
                dir,
                vae_dir,
                preview_vae_dir,
                random_weights: true,
                checkpoint: None,
                loras: self.loras.clone(),
                origin: Vec::new(),
            });
        }

        if let Some(checkpoint) = &self.checkpoint {
            return self.resolve_checkpoint(checkpoint, hub);
        }

        if let Some(dir) = &self.model_dir {
            if !dir.is_dir() {
                return Err(HubError::Usage(format!(
                    "--model-dir {} is not a directory",
                    dir.display()
                )));
            }
            let (vae_dir, preview_vae_dir) = self.extra_dirs_in(dir)?;
            let origin = Lock::read(dir)
                .map(|l| {
                    std::iter::once(&l.main)
                        .chain(l.extras.values())
                        .map(|r| (r.repo.clone(), r.commit.clone()))
                        .collect()
                })
                .unwrap_or_default();
            return Ok(ResolvedModel {
                dir: dir.clone(),
                vae_dir,
                preview_vae_dir,
                random_weights: false,
                checkpoint: None,
                loras: self.loras.clone(),
                origin,
            });
        }

        let (dir, plan, vae_dir, preview_vae_dir) = self.manifest_plan()?;
        let origin = self.fetch_missing(&plan, hub)?;
        Ok(ResolvedModel {
            dir,
            vae_dir,
            preview_vae_dir,
            random_weights: false,
            checkpoint: None,
            loras: self.loras.clone(),
            origin,
        })
    }

    /// `--checkpoint FILE`: the weights from FILE, the configs and tokenizers from `--model-dir`
    /// as is, else from MODELS_ROOT/NAME, fetching the missing ones but none of the model's
    /// weights (a `--vae` or `--preview-vae` is fetched whole, as without a checkpoint).
    fn resolve_checkpoint(
        &self,
        checkpoint: &Path,
        hub: &HubConfig,
    ) -> Result<ResolvedModel, HubError> {
        if !checkpoint.is_file() {
            return Err(HubError::Usage(format!(
                "--checkpoint {} is not a file",
                checkpoint.display()
            )));
        }
        if let Some(dir) = &self.model_dir {
            if !dir.join("model_index.json").is_file() && !dir.join("unet").is_dir() {
                return Err(HubError::Usage(format!(
                    "--checkpoint takes its configs and tokenizers from --model-dir, but {} has \
                     no model_index.json or unet/ (a diffusers-layout directory; its weights are \
                     not needed)",
                    dir.display()
                )));
            }
            let (vae_dir, preview_vae_dir) = self.extra_dirs_in(dir)?;
            return Ok(ResolvedModel {
                dir: dir.clone(),
                vae_dir,
                preview_vae_dir,
                random_weights: false,
                checkpoint: Some(checkpoint.to_path_buf()),
                loras: self.loras.clone(),
                origin: Vec::new(),
            });
        }
        let (dir, mut plan, vae_dir, preview_vae_dir) = self.manifest_plan()?;
        for source in plan.sources.iter_mut().filter(|s| s.extra.is_none()) {
            if let Some(files) = &mut source.files {
                files.retain(|f| !manifest::is_weights_file(f));
            }
        }
        // Configs already on disk are used as they are, recorded in the lock or not (the
        // repository's own models/sdxl-turbo holds them committed): a checkpoint needs no
        // network unless a file is missing or another revision is asked for.
        let status = local_status(&plan);
        let present = status.missing.is_empty()
            && status.other_revision.is_empty()
            && self.revision.is_none()
            && self.vae.is_none()
            && self.preview_vae.is_none();
        let origin = if present {
            status.commits
        } else {
            self.fetch_missing(&plan, hub)?
        };
        Ok(ResolvedModel {
            dir,
            vae_dir,
            preview_vae_dir,
            random_weights: false,
            checkpoint: Some(checkpoint.to_path_buf()),
            loras: self.loras.clone(),
            origin,
        })
    }

    /// MODELS_ROOT/NAME from the manifest: the directory, the plan that fills it (with the
    /// extras `--vae` and `--preview-vae` ask for) and those extras' folders.
    fn manifest_plan(&self) -> Result<(PathBuf, Plan, Option<PathBuf>, Option<PathBuf>), HubError> {
        let manifest = Manifest::find(&self.models_root, &self.model)?;
        let dir = self.models_root.join(&manifest.name);
        let plan = manifest.plan(
            &dir,
            self.revision.as_deref(),
            self.vae.map(VaeVariant::key),
            self.preview_vae.map(PreviewVae::key),
            self.models_root != Path::new("models"),
        )?;
        let extra_dir = |key: Option<&str>| -> Result<Option<PathBuf>, HubError> {
            Ok(match key {
                Some(key) => Some(dir.join(&manifest.vae_extra(key)?.dir)),
                None => None,
            })
        };
        let vae_dir = extra_dir(self.vae.map(VaeVariant::key))?;
        let preview_vae_dir = extra_dir(self.preview_vae.map(PreviewVae::key))?;
        Ok((dir, plan, vae_dir, preview_vae_dir))
    }

    /// The plan's files on disk: those complete and recorded in the lock are used as they are;
    /// missing or unverified ones are downloaded, or with `--offline` an error lists them.
    /// Returns the (repository, commit) of each source.
    fn fetch_missing(
        &self,
        plan: &Plan,
        hub: &HubConfig,
    ) -> Result<Vec<(String, String)>, HubError> {
        let dir = &plan.dir;
        let status = local_status(plan);
        let offline = self.offline || hub.offline;
        let origin = if status.is_complete() {
            status.commits
        } else if offline {
            let fatal = !status.missing.is_empty() || !status.other_revision.is_empty();
            if fatal {
                return Err(HubError::Offline {
                    model: plan.name.clone(),
                    dir: plan.dir.clone(),
                    problems: status.problems(),
                    command: plan.command.clone(),
                });
            }
            tracing::warn!(
                "offline: using {} although {} (run `{}` with network access to check them)",
                dir.display(),
                status.problems().join("; "),
                plan.command
            );
            status.commits
        } else {
            tracing::info!(
                "{}: {}; fetching from {}",
                dir.display(),
                status.problems().join("; "),
                hub.endpoint
            );
            download_blocking(plan, hub)?.commits
        };
        Ok(origin)
    }

    /// The folders of `--vae`'s and `--preview-vae`'s extras inside a user-supplied directory.
    fn extra_dirs_in(&self, dir: &Path) -> Result<(Option<PathBuf>, Option<PathBuf>), HubError> {
        if self.vae.is_none() && self.preview_vae.is_none() {
            return Ok((None, None));
        }
        let manifest = Manifest::find(&self.models_root, &self.model)?;
        let vae = match self.vae {
            Some(v) => Some(extra_dir_in(&manifest, dir, "--vae", v.key())?),
            None => None,
        };
        let preview = match self.preview_vae {
            Some(v) => Some(extra_dir_in(&manifest, dir, "--preview-vae", v.key())?),
            None => None,
        };
        Ok((vae, preview))
    }
}

/// The folder of `manifest`'s extra `key` (asked for by `flag`) inside a user-supplied
/// directory.
fn extra_dir_in(
    manifest: &Manifest,
    dir: &Path,
    flag: &str,
    key: &str,
) -> Result<PathBuf, HubError> {
    let vae_dir = dir.join(&manifest.vae_extra(key)?.dir);
    if !vae_dir.join("config.json").is_file() {
        return Err(HubError::Usage(format!(
            "{flag} {key} with --model-dir: {} has no config.json. Fetch it with `turbine \
             download --model {} --dir {} {flag} {key}`",
            vae_dir.display(),
            manifest.name,
            manifest::shell_quote(&dir.display().to_string()),
        )));
    }
    Ok(vae_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
    }

    #[test]
    fn model_args_parse_and_default_to_sdxl_turbo() {
        let a = Cli::try_parse_from(["t"]).unwrap().model;
        assert_eq!(a.model, "sdxl-turbo");
        assert_eq!(a.models_root, PathBuf::from("models"));
        assert!(!a.offline && !a.random_weights && a.vae.is_none());
        let a = Cli::try_parse_from([
            "t",
            "--model-dir",
            "/m",
            "--revision",
            "abc",
            "--offline",
            "--random-weights",
            "--vae",
            "fp16-fix",
        ])
        .unwrap()
        .model;
        assert_eq!(a.model_dir, Some(PathBuf::from("/m")));
        assert_eq!(a.revision.as_deref(), Some("abc"));
        assert!(a.offline && a.random_weights);
        assert_eq!(a.vae, Some(VaeVariant::Fp16Fix));
        assert!(Cli::try_parse_from(["t", "--vae", "other"]).is_err());
    }
}
