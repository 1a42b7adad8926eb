//! Model manifests (`models/<name>/manifest.json`): which Hub repository, which revision and
//! exactly which files make up a model directory, plus optional extras such as another VAE.
//!
//! A manifest lists files rather than "everything in the repo" because Hub repos carry several
//! copies of the same weights (fp32 and fp16 variants, single-file checkpoints, ONNX exports):
//! `stabilityai/sdxl-turbo` is about 27 GB in all, the fp16 diffusers files about 7 GB.
//!
//! The checked-in manifests are also compiled into the binary, so `turbine` finds them when run
//! from outside the repository; a `manifest.json` on disk under the models root wins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::HubError;

/// Manifests compiled in: (name, JSON).
const BUILTIN: &[(&str, &str)] = &[(
    "sdxl-turbo",
    include_str!("../../models/sdxl-turbo/manifest.json"),
)];

/// Name of the manifest file inside `models/<name>/`.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The folder name under the models root; also what `--model` takes.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Hub repository id, `owner/name`.
    pub repo: String,
    /// Branch, tag or commit; the commit it resolves to is recorded in the lock file.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Paths inside the repository, in the diffusers layout the loader reads.
    pub files: Vec<String>,
    /// Replacement VAEs, by the value `--vae` (or `--preview-vae`) takes.
    #[serde(default)]
    pub vae: BTreeMap<String, Extra>,
}

/// Files from another repository that land in a sub-folder of the model directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extra {
    #[serde(default)]
    pub description: String,
    pub repo: String,
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Sub-folder of the model directory (one path component) the files are written to.
    pub dir: String,
    pub files: Vec<String>,
}

fn default_revision() -> String {
    "main".into()
}

/// One repository to fetch files from, and where they go.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// `None` for the model's own repository; the extra's folder name otherwise (lock key).
    pub extra: Option<String>,
    pub repo: String,
    pub revision: String,
    /// Sub-folder of the model directory; empty for the model's own repository.
    pub subdir: String,
    /// Exact files, or `None` to pick the diffusers files from the repository's listing.
    pub files: Option<Vec<String>>,
}

impl Source {
    /// Where a repository file lands, relative to the model directory (also its lock key).
    pub fn local_name(&self, file: &str) -> String {
        if self.subdir.is_empty() {
            file.to_string()
        } else {
            format!("{}/{file}", self.subdir)
        }
    }
}

/// Everything one `turbine download` fetches into one model directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Model name, recorded in the lock and used in messages.
    pub name: String,
    pub dir: PathBuf,
    pub sources: Vec<Source>,
    /// The `turbine download ...` command that fetches this plan (for error messages).
    pub command: String,
}

impl Manifest {
    pub fn parse(json: &str, origin: &str) -> Result<Self, HubError> {
        let m: Manifest = serde_json::from_str(json)
            .map_err(|e| HubError::Usage(format!("invalid manifest {origin}: {e}")))?;
        m.validate(origin)?;
        Ok(m)
    }

    pub fn read(path: &Path) -> Result<Self, HubError> {
        let text = std::fs::read_to_string(path).map_err(|e| HubError::io(path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The manifest for `name`: `<models_root>/<name>/manifest.json` if present, else built in.
    pub fn find(models_root: &Path, name: &str) -> Result<Self, HubError> {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') || name.is_empty() {
            return Err(HubError::Usage(format!(
                "--model takes a model name such as `sdxl-turbo`, got `{name}`; for a Hub \
                 repository id use `turbine download --repo {name}`, for a directory --model-dir"
            )));
        }
        let on_disk = models_root.join(name).join(MANIFEST_FILE);
        if on_disk.is_file() {
            return Self::read(&on_disk);
        }
        if let Some((_, json)) = BUILTIN.iter().find(|(n, _)| *n == name) {
            return Self::parse(json, &format!("(built in) {name}"));
        }
        let known = known_models(models_root);
        Err(HubError::Usage(format!(
            "unknown model `{name}`: no {} and no built-in manifest of that name. Known models: \
             {}. Add a manifest there, or download a repository directly with `turbine download \
             --repo OWNER/NAME`.",
            on_disk.display(),
            known.join(", ")
        )))
    }

    fn validate(&self, origin: &str) -> Result<(), HubError> {
        let bad = |what: String| HubError::Usage(format!("invalid manifest {origin}: {what}"));
        check_component(&self.name).map_err(|e| bad(format!("name: {e}")))?;
        check_repo_id(&self.repo).map_err(|e| bad(format!("repo: {e}")))?;
        if self.files.is_empty() {
            return Err(bad("`files` is empty".into()));
        }
        for f in &self.files {
            check_relative_path(f).map_err(|e| bad(format!("files: {e}")))?;
        }
        for (key, extra) in &self.vae {
            check_repo_id(&extra.repo).map_err(|e| bad(format!("vae.{key}.repo: {e}")))?;
            check_component(&extra.dir).map_err(|e| bad(format!("vae.{key}.dir: {e}")))?;
            for f in &extra.files {
                check_relative_path(f).map_err(|e| bad(format!("vae.{key}.files: {e}")))?;
            }
        }
        Ok(())
    }

    /// The manifest's VAE extra `key`, or a usage error listing the ones it has.
    pub fn vae_extra(&self, key: &str) -> Result<&Extra, HubError> {
        self.vae.get(key).ok_or_else(|| {
            HubError::Usage(format!(
                "model `{}` has no VAE `{key}` in its manifest (available: {})",
                self.name,
                self.vae.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The plan for this model into `dir`, at `revision` (default: the manifest's), with the
    /// VAE extras `vae` (`--vae`) and `preview_vae` (`--preview-vae`) when asked for; one asked
    /// for twice is fetched once.
    pub fn plan(
        &self,
        dir: &Path,
        revision: Option<&str>,
        vae: Option<&str>,
        preview_vae: Option<&str>,
        explicit_dir: bool,
    ) -> Result<Plan, HubError> {
        let revision = revision.unwrap_or(&self.revision).to_string();
        let mut sources = vec![Source {
            extra: None,
            repo: self.repo.clone(),
            revision: revision.clone(),
            subdir: String::new(),
            files: Some(self.files.clone()),
        }];
        let mut command = format!("turbine download --model {}", self.name);
        if revision != self.revision {
            command += &format!(" --revision {revision}");
        }
        if explicit_dir {
            command += &format!(" --dir {}", shell_quote(&dir.display().to_string()));
        }
        for (flag, key) in [("--vae", vae), ("--preview-vae", preview_vae)] {
            let Some(key) = key else { continue };
            let extra = self.vae_extra(key)?;
            if !sources.iter().any(|s| s.extra.as_ref() == Some(&extra.dir)) {
                sources.push(Source {
                    extra: Some(extra.dir.clone()),
                    repo: extra.repo.clone(),
                    revision: extra.revision.clone(),
                    subdir: extra.dir.clone(),
                    files: Some(extra.files.clone()),
                });
            }
            command += &format!(" {flag} {key}");
        }
        Ok(Plan {
            name: self.name.clone(),
            dir: dir.to_path_buf(),
            sources,
            command,
        })
    }
}

impl Plan {
    /// A whole repository without a manifest: the diffusers files of its listing.
    pub fn for_repo(repo: &str, revision: &str, dir: &Path) -> Result<Self, HubError> {
        check_repo_id(repo).map_err(|e| HubError::Usage(format!("--repo: {e}")))?;
        let name = repo.rsplit('/').next().unwrap_or(repo).to_string();
        let mut command = format!(
            "turbine download --repo {repo} --dir {}",
            shell_quote(&dir.display().to_string())
        );
        if revision != "main" {
            command += &format!(" --revision {revision}");
        }
        Ok(Plan {
            name,
            dir: dir.to_path_buf(),
            sources: vec![Source {
                extra: None,
                repo: repo.to_string(),
                revision: revision.to_string(),
                subdir: String::new(),
                files: None,
            }],
            command,
        })
    }
}

/// Whether a repository file holds weights rather than configs or tokenizer files (what
/// `--checkpoint` leaves undownloaded).
pub fn is_weights_file(path: &str) -> bool {
    const WEIGHTS: [&str; 8] = [
        ".safetensors",
        ".bin",
        ".ckpt",
        ".pt",
        ".pth",
        ".onnx",
        ".msgpack",
        ".h5",
    ];
    WEIGHTS.iter().any(|ext| path.ends_with(ext))
}

/// Names of the models with a manifest (built in, or on disk under `models_root`).
pub fn known_models(models_root: &Path) -> Vec<String> {
    let mut names: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
    if let Ok(entries) = std::fs::read_dir(models_root) {
        for e in entries.flatten() {
            if e.path().join(MANIFEST_FILE).is_file() {
                if let Some(n) = e.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Picks the files of a diffusers pipeline from a repository listing, as diffusers'
/// `from_pretrained(variant="fp16")` would read them: `model_index.json` at the top (or, for a
/// single-model repository without one, its `config.json` and `diffusion_pytorch_model` /
/// `model` weights), and in each component folder the
/// configs / tokenizer files plus the safetensors weights, only the `.fp16.` variant where the
/// folder has one. Single-file checkpoints at the top, `.bin`/ONNX/Flax copies and deeper
/// folders are left out.
pub fn select_diffusers_files(listing: &[String]) -> Vec<String> {
    let is_config = |f: &str| {
        let ext = f.rsplit('.').next().unwrap_or("");
        matches!(ext, "json" | "txt" | "model") && !f.ends_with(".safetensors.index.json")
    };
    let has_index = listing.iter().any(|f| f == "model_index.json");
    let mut out = Vec::new();
    let mut by_folder: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in listing {
        match f.split_once('/') {
            None => {
                // Without model_index.json the top level is one model; other top-level
                // safetensors there are single-file copies for other tools (sdxl_vae.safetensors).
                let keep = if has_index {
                    f == "model_index.json"
                } else {
                    f == "config.json"
                        || (f.ends_with(".safetensors")
                            && (f.starts_with("diffusion_pytorch_model.")
                                || f.starts_with("model.")))
                };
                if keep {
                    by_folder.entry("").or_default().push(f);
                }
            }
            Some((folder, rest)) if has_index && !rest.contains('/') => {
                by_folder.entry(folder).or_default().push(f);
            }
            _ => {}
        }
    }
    for files in by_folder.values() {
        let weights: Vec<&str> = files
            .iter()
            .copied()
            .filter(|f| f.ends_with(".safetensors"))
            .collect();
        let fp16: Vec<&str> = weights
            .iter()
            .copied()
            .filter(|f| f.contains(".fp16."))
            .collect();
        let chosen = if fp16.is_empty() { weights } else { fp16 };
        for f in files {
            if is_config(f) || chosen.contains(f) {
                out.push(f.to_string());
            }
        }
    }
    out.sort();
    out
}

fn check_repo_id(repo: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = !parts.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{repo}` is not a Hub repository id (expected OWNER/NAME, e.g. stabilityai/sdxl-turbo)"
        ))
    }
}

fn check_component(c: &str) -> Result<(), String> {
    if c.is_empty()
        || c == "."
        || c == ".."
        || c.contains('/')
        || c.contains('\\')
        || c.starts_with('.')
    {
        return Err(format!("`{c}` must be a plain folder name"));
    }
    Ok(())
}

/// A repository path safe to join onto the model directory: relative, no `..`, no `.` parts.
/// Also applied to listings from the server, so a hostile mirror cannot write outside the dir.
pub fn check_relative_path(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{p}` is not a relative path inside the repository"
        ))
    }
}

/// Quotes a path for a shell command shown to the user, only when it needs it.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sdxl_turbo_manifest_parses_and_fetches_only_fp16_weights() {
        let m = Manifest::find(Path::new("/nonexistent"), "sdxl-turbo").unwrap();
        assert_eq!(m.repo, "stabilityai/sdxl-turbo");
        assert_eq!(m.revision, "main");
        let weights: Vec<_> = m
            .files
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .cloned()
            .collect();
        assert_eq!(
            weights,
            [
                "text_encoder/model.fp16.safetensors",
                "text_encoder_2/model.fp16.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ]
        );
        let fix = &m.vae["fp16-fix"];
        assert_eq!(fix.repo, "madebyollin/sdxl-vae-fp16-fix");
        assert!(fix
            .files
            .contains(&"diffusion_pytorch_model.safetensors".to_string()));
        // Every --vae choice has its entry.
        for v in [
            super::super::VaeVariant::Fp16Fix,
            super::super::VaeVariant::Taesdxl,
        ] {
            assert!(m.vae.contains_key(v.key()), "{}", v.key());
        }
        let tiny = &m.vae["taesdxl"];
        assert_eq!(
            (tiny.repo.as_str(), tiny.dir.as_str()),
            ("madebyollin/taesdxl", "vae-taesdxl")
        );
    }

    #[test]
    fn manifest_files_match_the_committed_config_files() {
        // Every config/tokenizer file committed under models/sdxl-turbo/ is in the manifest,
        // so a download verifies them and the loader finds each file the manifest promises.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sdxl-turbo");
        let m = Manifest::read(&root.join(MANIFEST_FILE)).unwrap();
        let mut committed = Vec::new();
        collect(&root, &root, &mut committed);
        // Top-level files other than model_index.json (manifest.json, tensors.json,
        // SOURCES.md) document the model for us; they are not part of the Hub layout.
        committed.retain(|f| {
            (f.contains('/') || f == "model_index.json")
                && !f.ends_with(".safetensors")
                && !m
                    .vae
                    .values()
                    .any(|x| f.starts_with(&format!("{}/", x.dir)))
        });
        for f in &committed {
            assert!(
                m.files.contains(f),
                "{f} is committed but not in the manifest"
            );
        }
        for f in m.files.iter().filter(|f| !f.ends_with(".safetensors")) {
            assert!(
                committed.contains(f),
                "{f} is in the manifest but not committed"
            );
        }
    }

    fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                collect(root, &p, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                if !rel.ends_with(".incomplete") && !rel.contains("turbine-lock") {
                    out.push(rel);
                }
            }
        }
    }

    #[test]
    fn plan_adds_the_vae_extra_and_builds_the_command() {
        let m = Manifest::find(Path::new("/nonexistent"), "sdxl-turbo").unwrap();
        let p = m
            .plan(
                Path::new("/data/m"),
                Some("v1"),
                Some("fp16-fix"),
                None,
                true,
            )
            .unwrap();
        assert_eq!(p.sources.len(), 2);
        assert_eq!(p.sources[1].subdir, "vae-fp16-fix");
        assert_eq!(
            p.sources[1].local_name("config.json"),
            "vae-fp16-fix/config.json"
        );
        assert_eq!(
            p.command,
            "turbine download --model sdxl-turbo --revision v1 --dir /data/m --vae fp16-fix"
        );
        let err = m
            .plan(Path::new("m"), None, Some("nope"), None, false)
            .unwrap_err();
        assert!(err.to_string().contains("fp16-fix"), "{err}");
    }

    #[test]
    fn plan_adds_the_preview_vae_once() {
        let m = Manifest::find(Path::new("/nonexistent"), "sdxl-turbo").unwrap();
        let p = m
            .plan(
                Path::new("m"),
                None,
                Some("fp16-fix"),
                Some("taesdxl"),
                false,
            )
            .unwrap();
        let subdirs: Vec<&str> = p.sources.iter().map(|s| s.subdir.as_str()).collect();
        assert_eq!(subdirs, ["", "vae-fp16-fix", "vae-taesdxl"]);
        assert_eq!(
            p.command,
            "turbine download --model sdxl-turbo --vae fp16-fix --preview-vae taesdxl"
        );
        // Asked for as both, TAESD is fetched once.
        let p = m
            .plan(
                Path::new("m"),
                None,
                Some("taesdxl"),
                Some("taesdxl"),
                false,
            )
            .unwrap();
        assert_eq!(p.sources.len(), 2);
        assert_eq!(
            p.command,
            "turbine download --model sdxl-turbo --vae taesdxl --preview-vae taesdxl"
        );
    }

    #[test]
    fn unknown_model_lists_known_ones_and_repo_ids_point_to_repo() {
        let err = Manifest::find(Path::new("/nonexistent"), "sdxl").unwrap_err();
        assert!(err.to_string().contains("sdxl-turbo"), "{err}");
        let err = Manifest::find(Path::new("/nonexistent"), "stabilityai/sdxl-turbo").unwrap_err();
        assert!(err.to_string().contains("--repo"), "{err}");
    }

    #[test]
    fn rejects_paths_that_escape_the_model_dir() {
        for p in ["../x", "/etc/passwd", "a/../b", "a//b", "a\\b", "", "./a"] {
            assert!(check_relative_path(p).is_err(), "{p}");
        }
        assert!(check_relative_path("unet/config.json").is_ok());
        let bad = r#"{"name":"x","repo":"a/b","files":["../../etc/x"]}"#;
        assert!(Manifest::parse(bad, "t").is_err());
    }

    #[test]
    fn diffusers_selection_prefers_fp16_and_skips_checkpoints() {
        let listing: Vec<String> = [
            "README.md",
            "model_index.json",
            "sd_xl_turbo_1.0_fp16.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.onnx",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "vae/config.json",
            "vae/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.safetensors",
            "images/a/b.png",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            select_diffusers_files(&listing),
            [
                "model_index.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/vocab.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ]
        );
        // A single-model repository (the fp16-fix VAE) has no model_index.json.
        let vae: Vec<String> = [
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
            "sdxl_vae.safetensors",
            "README.md",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            select_diffusers_files(&vae),
            ["config.json", "diffusion_pytorch_model.safetensors"]
        );
    }
}
