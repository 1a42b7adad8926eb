//! `turbine download`: fetch a model's files from the Hugging Face Hub (or a mirror set in
//! `HF_ENDPOINT`) into `models/<name>/`, resuming and verifying; `--offline` re-hashes what
//! is there against `turbine-lock.json` without touching the network.

use std::path::{Path, PathBuf};

use crate::hub::{self, HubConfig, HubError, Manifest, Plan, PreviewVae, VaeVariant};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Model to fetch, by the name of its manifest (models/NAME/manifest.json; built in:
    /// sdxl-turbo, about 7 GB of fp16 weights). Default: sdxl-turbo; --repo takes precedence.
    #[arg(long, env = "TURBINE_MODEL")]
    pub model: Option<String>,

    /// A Hub repository (OWNER/NAME) in the diffusers layout, without a manifest: its
    /// model_index.json, configs, tokenizers and safetensors weights (the fp16 variant where
    /// there is one). Goes to MODELS_ROOT/NAME unless --dir.
    #[arg(long, env = "TURBINE_REPO")]
    pub repo: Option<String>,

    /// Branch, tag or commit (default: the manifest's, else `main`). The commit it resolves to
    /// is recorded in DIR/turbine-lock.json.
    #[arg(long, env = "TURBINE_REVISION")]
    pub revision: Option<String>,

    /// Where to put the files (default: MODELS_ROOT/NAME).
    #[arg(long, env = "TURBINE_DOWNLOAD_DIR")]
    pub dir: Option<PathBuf>,

    /// Folder holding one folder per model, and where manifests are looked up.
    #[arg(long, env = "TURBINE_MODELS_ROOT", default_value = "models")]
    pub models_root: PathBuf,

    /// Also fetch a replacement VAE from the manifest (fp16-fix: madebyollin/sdxl-vae-fp16-fix,
    /// about 335 MB, into DIR/vae-fp16-fix/; taesdxl: madebyollin/taesdxl, about 10 MB, into
    /// DIR/vae-taesdxl/).
    #[arg(long, env = "TURBINE_VAE", value_enum)]
    pub vae: Option<VaeVariant>,

    /// Also fetch the tiny decoder `serve --preview-vae` decodes stream previews with
    /// (taesdxl: madebyollin/taesdxl, about 10 MB, into DIR/vae-taesdxl/).
    #[arg(long, env = "TURBINE_PREVIEW_VAE", value_enum)]
    pub preview_vae: Option<PreviewVae>,

    /// Do not use the network: re-hash every file against turbine-lock.json and report what
    /// is missing or corrupt. HF_HUB_OFFLINE=1 does the same.
    #[arg(long, env = "TURBINE_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,
}

/// The plan these arguments describe.
pub fn plan(args: &Args) -> Result<Plan, HubError> {
    match &args.repo {
        Some(repo) => {
            let extra = match (args.vae, args.preview_vae) {
                (Some(v), _) => Some(format!("--vae {}", v.key())),
                (None, Some(v)) => Some(format!("--preview-vae {}", v.key())),
                (None, None) => None,
            };
            if let Some(extra) = extra {
                return Err(HubError::Usage(format!(
                    "{extra} comes from a model's manifest; use it with --model, not --repo"
                )));
            }
            let name = repo.rsplit('/').next().unwrap_or(repo);
            let dir = args
                .dir
                .clone()
                .unwrap_or_else(|| args.models_root.join(name));
            Plan::for_repo(repo, args.revision.as_deref().unwrap_or("main"), &dir)
        }
        None => {
            let name = args.model.as_deref().unwrap_or("sdxl-turbo");
            let manifest = Manifest::find(&args.models_root, name)?;
            let dir = args
                .dir
                .clone()
                .unwrap_or_else(|| args.models_root.join(&manifest.name));
            manifest.plan(
                &dir,
                args.revision.as_deref(),
                args.vae.map(VaeVariant::key),
                args.preview_vae.map(PreviewVae::key),
                args.dir.is_some() || args.models_root != Path::new("models"),
            )
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    run_with(&args, &HubConfig::from_env())?;
    Ok(())
}

/// Runs the command with explicit Hub settings; prints a one-line summary on stdout.
pub fn run_with(args: &Args, cfg: &HubConfig) -> Result<hub::DownloadReport, HubError> {
    let plan = plan(args)?;
    let report = if args.offline || cfg.offline {
        let r = hub::verify_offline(&plan, cfg.progress)?;
        println!(
            "{}: {} file(s), {} verified offline against {}",
            plan.dir.display(),
            r.files,
            hub::error::human_bytes(r.verified_bytes),
            hub::LOCK_FILE
        );
        hub::DownloadReport {
            dir: plan.dir.clone(),
            files: r.files,
            already_present: r.files,
            total_bytes: r.verified_bytes,
            commits: r.commits,
            ..Default::default()
        }
    } else {
        let r = hub::download_blocking(&plan, cfg)?;
        let commits: Vec<String> = r
            .commits
            .iter()
            .map(|(repo, c)| format!("{repo}@{}", &c[..c.len().min(12)]))
            .collect();
        println!(
            "{}: {} file(s), {} in all, {} fetched ({}), {} already present and verified [{}]",
            plan.dir.display(),
            r.files,
            hub::error::human_bytes(r.total_bytes),
            r.fetched.len(),
            hub::error::human_bytes(r.fetched_bytes),
            r.already_present,
            commits.join(", ")
        );
        r
    };
    Ok(report)
}
