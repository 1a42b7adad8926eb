//! `turbine-lock.json`: what a model directory was downloaded from (repository, requested
//! revision, resolved commit) and the size and SHA-256 of every file, so that a later start can
//! check the directory without the network and `turbine download --offline` can re-hash it.
//!
//! The lock is rewritten (atomically) after each file, so an interrupted download keeps the
//! record of the files it finished. A file is only in the lock once its hash has been checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::HubError;

pub const LOCK_FILE: &str = "turbine-lock.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lock {
    pub version: u32,
    /// Model name (manifest name, or the repository's name for `--repo`).
    pub model: String,
    /// The Hub endpoint (or mirror) the files came from.
    pub endpoint: String,
    /// The model's own repository.
    #[serde(flatten)]
    pub main: LockedRepo,
    /// Extras by folder name (e.g. `vae-fp16-fix`); their file keys include that folder.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extras: BTreeMap<String, LockedRepo>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LockedRepo {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    /// By path relative to the model directory.
    pub files: BTreeMap<String, LockedFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedFile {
    pub size: u64,
    pub sha256: String,
    /// The Hub's ETag for the file (LFS: its SHA-256; otherwise its git blob SHA-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

impl Lock {
    pub fn new(model: &str, endpoint: &str) -> Self {
        Self {
            version: VERSION,
            model: model.to_string(),
            endpoint: endpoint.to_string(),
            main: LockedRepo::default(),
            extras: BTreeMap::new(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(LOCK_FILE)
    }

    /// The lock of `dir`, `None` when there is none. An unreadable lock counts as none (with a
    /// warning): it only records what can be checked again, so losing it costs a re-hash.
    pub fn read(dir: &Path) -> Option<Self> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str::<Lock>(&text) {
            Ok(l) if l.version == VERSION => Some(l),
            Ok(l) => {
                tracing::warn!(
                    "{}: lock version {} is not {VERSION}; ignoring it",
                    path.display(),
                    l.version
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    "{}: unreadable lock file ({e}); ignoring it",
                    path.display()
                );
                None
            }
        }
    }

    /// Writes through a temporary file and a rename, so a crash never leaves half a lock.
    pub fn write(&self, dir: &Path) -> Result<(), HubError> {
        let path = Self::path(dir);
        let tmp = dir.join(format!("{LOCK_FILE}.tmp"));
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| HubError::io(&path, std::io::Error::other(e)))?;
        text.push('\n');
        std::fs::write(&tmp, text).map_err(|e| HubError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| HubError::io(&path, e))
    }

    /// The record of one source: the main repository (`None`) or an extra by folder name.
    pub fn repo(&self, extra: Option<&str>) -> Option<&LockedRepo> {
        match extra {
            None => (!self.main.repo.is_empty()).then_some(&self.main),
            Some(k) => self.extras.get(k),
        }
    }

    pub fn repo_mut(&mut self, extra: Option<&str>) -> &mut LockedRepo {
        match extra {
            None => &mut self.main,
            Some(k) => self.extras.entry(k.to_string()).or_default(),
        }
    }
}
