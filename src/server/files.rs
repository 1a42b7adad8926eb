//! OpenAI's Files API, as far as the Batch API and edits need it: uploads with purpose `batch`
//! (a batch's JSONL input) or `vision`/`user_data` (an image that JSON edits, a batch's among
//! them, name by `file_id`), the batches' output and error files (purpose `batch_output`), and
//! `GET /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.
//!
//! Contents live on disk, each file next to a small JSON record of its object and owner:
//! `DIR/files/{id}` and `DIR/files/{id}.json`, written before the file is listed. With
//! `--files-dir DIR` they survive restarts (the records are read back at start-up, and a lock
//! file keeps a second server out of the directory); without it DIR is a directory of this
//! process's own in the system's temporary directory, removed when the server stops. A file
//! belongs to the API key that made it: another key gets 404 for it, as for a file that does not
//! exist. Files expire when their `expires_after` says (OpenAI's default for batch files: 30
//! days): at once invisible, and removed from the disk by the server's sweep every few minutes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// OpenAI's default lifetime of batch input and output files, and its bounds for
/// `expires_after.seconds` (one hour to 30 days).
pub const DEFAULT_TTL_SECS: u64 = 30 * 24 * 3600;
pub const MIN_TTL_SECS: u64 = 3600;
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

/// OpenAI's file object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub status_details: Option<String>,
}

impl FileObject {
    /// A processed file made now, of `bytes` bytes, expiring after `ttl` seconds.
    pub fn new(id: String, filename: String, purpose: &str, bytes: u64, ttl: u64) -> Self {
        let now = unix_now();
        FileObject {
            id,
            object: "file".into(),
            bytes,
            created_at: now,
            expires_at: Some(now + ttl),
            filename,
            purpose: purpose.into(),
            status: "processed".into(),
            status_details: None,
        }
    }
}

/// Who a file or batch belongs to: the fingerprint of the API key that made it
/// ([`super::auth::Caller::owner`]); `None` on an open server, where everything is everyone's.
pub type Owner = Option<String>;

/// A file's record on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    object: FileObject,
    owner: Owner,
}

impl Stored {
    /// Not expired at `now`.
    fn visible_at(&self, now: u64) -> bool {
        self.object.expires_at.is_none_or(|t| t > now)
    }
}

#[derive(Debug, Default)]
struct Index {
    /// With their creation order, for lists (`created_at` has whole seconds only).
    files: HashMap<String, (Stored, u64)>,
    next_seq: u64,
}

/// The files and the directory behind them.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    /// Whether the directory outlives the process (`--files-dir`).
    persistent: bool,
    index: Mutex<Index>,
    /// Held open while the server runs: its exclusive lock keeps other servers out. `None`:
    /// the store has no directory ([`FileStore::without_disk`]).
    _lock: Option<std::fs::File>,
}

/// One page of a list: OpenAI's `{"object": "list", "data", "first_id", "last_id", "has_more"}`.
#[derive(Debug, Serialize)]
pub struct ListPage<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T> ListPage<T> {
    /// `items` in list order, of which `id` names each; the page is what follows `after` (or
    /// the start), at most `limit` long. An `after` that is no longer listed (deleted,
    /// expired) ends the list rather than starting it over, so a client paging on cannot loop.
    pub fn of(items: Vec<T>, id: impl Fn(&T) -> &str, after: Option<&str>, limit: usize) -> Self {
        let start = match after {
            None => 0,
            Some(a) => items
                .iter()
                .position(|item| id(item) == a)
                .map_or(items.len(), |i| i + 1),
        };
        let has_more = items.len() > start + limit;
        let data: Vec<T> = items.into_iter().skip(start).take(limit).collect();
        ListPage {
            object: "list",
            first_id: data.first().map(|d| id(d).to_string()),
            last_id: data.last().map(|d| id(d).to_string()),
            data,
            has_more,
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `prefix` + 96 random bits from the thread-local CSPRNG, as hex: ids are unguessable, so one
/// key cannot find another's files by counting.
pub fn new_id(prefix: &str) -> String {
    let mut raw = [0u8; 12];
    rand::rng().fill_bytes(&mut raw);
    format!("{prefix}{}", hex::encode(raw))
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so a crash leaves
/// the old record or the new one, never half of one; once it returns, the record is on the disk
/// (a power cut or a kernel panic right after keeps it).
pub fn write_record(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    write_json(path, value, false)
}

/// [`write_record`] for a record that holds a secret: readable by the server's user only, from
/// its first byte (on Unix).
pub fn write_private_record(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    write_json(path, value, true)
}

fn write_json(path: &Path, value: &impl Serialize, private: bool) -> std::io::Result<()> {
    blocking(|| {
        write_json_now(path, value, private)?;
        // And the name itself: a request is answered once its record is written, and what it
        // was told must hold after a crash.
        sync_dir_now(path)
    })
}

/// Runs `f`, which blocks on the disk (an fsync: milliseconds on a local SSD, up to seconds on a
/// throttled network volume), so that the async runtime's other tasks do not wait behind it: on
/// a worker of the multi-threaded runtime (the server's), the worker's tasks move to another
/// thread first ([`tokio::task::block_in_place`]); anywhere else it just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn write_json_now(path: &Path, value: &impl Serialize, private: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    // The contents reach the disk before the name does: without it, a crash can leave the name
    // on an empty file (the journal holds the rename; the data was still in memory).
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        // Half a record (a full disk) takes room and is of no use.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Makes the entries of the directory that holds `path` durable: a file created, renamed into
/// it or removed from it stays so after a crash (fsync of the directory; a no-op where there is
/// no such thing, off Unix).
pub fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    blocking(|| sync_dir_now(path))
}

fn sync_dir_now(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The JSON records (`*.json`) in `dir`, in no order; one that cannot be read or parsed is
/// skipped with a warning naming it as `what`.
pub fn read_records<T: serde::de::DeserializeOwned>(
    dir: &Path,
    what: &str,
) -> anyhow::Result<Vec<T>> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<T>(&b).ok())
        {
            Some(r) => records.push(r),
            None => tracing::warn!(path = %path.display(), "skipping an unreadable {what}"),
        }
    }
    Ok(records)
}

/// The name of a server's own files directory (without `--files-dir`) in the temporary
/// directory: this, its process id, `-`, 8 random hex digits.
const PRIVATE_DIR_PREFIX: &str = "turbine-files-";

/// Removes the private files directories in `temp` whose server is gone: its process no longer
/// runs (no `/proc/PID`), and the directory's lock is free. A server removes its own when it
/// stops, but not when it is killed (SIGKILL, the OOM killer), and a directory may hold uploads
/// and batch results of hundreds of MB: a server that crashes in a loop would fill the disk.
/// Where there is no `/proc` nothing is removed (a live server's directory must never be).
/// Returns how many went.
fn remove_stale_private_dirs(temp: &Path) -> usize {
    use fs2::FileExt;
    if !Path::new("/proc/self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(temp) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PRIVATE_DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // A live process (this one too, whose other servers share its id; or an unrelated
        // one that reused the id) keeps the directory.
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let free = std::fs::File::open(path.join(".lock"))
            .is_ok_and(|lock| lock.try_lock_exclusive().is_ok());
        if free && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl FileStore {
    /// Opens `dir` (`--files-dir`), reading back the files kept there, or makes a directory of
    /// this process's own in the system's temporary directory when `dir` is `None`; directories
    /// left there by servers that were killed go first ([`remove_stale_private_dirs`]).
    pub fn open(dir: Option<&Path>) -> anyhow::Result<Self> {
        use fs2::FileExt;
        let (root, persistent) = match dir {
            Some(d) => (d.to_path_buf(), true),
            None => {
                let temp = std::env::temp_dir();
                let n = remove_stale_private_dirs(&temp);
                if n > 0 {
                    tracing::info!(
                        dirs = n,
                        temp = %temp.display(),
                        "removed the files directories of turbine servers that were killed"
                    );
                }
                (
                    temp.join(format!(
                        "{PRIVATE_DIR_PREFIX}{}-{}",
                        std::process::id(),
                        &new_id("")[..8]
                    )),
                    false,
                )
            }
        };
        let flag = if persistent { " (--files-dir)" } else { "" };
        for d in [root.join("files"), root.join("batches")] {
            std::fs::create_dir_all(&d).with_context(|| {
                format!("cannot make the files directory {}{flag}", d.display())
            })?;
        }
        let lock_path = root.join(".lock");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        lock.try_lock_exclusive().with_context(|| {
            format!(
                "another turbine server uses {} (--files-dir): give each server its own",
                root.display()
            )
        })?;
        let store = FileStore {
            root,
            persistent,
            index: Mutex::new(Index::default()),
            _lock: Some(lock),
        };
        if let Err(e) = store.load() {
            store.close();
            return Err(e);
        }
        Ok(store)
    }

    /// An empty store with no directory: the server's temporary directory could not be
    /// written (a container's read-only root filesystem), and nothing reaches the store: the
    /// routes that would answer 503 first ([`FileStore::available`]).
    pub fn without_disk(root: PathBuf) -> Self {
        FileStore {
            root,
            persistent: false,
            index: Mutex::new(Index::default()),
            _lock: None,
        }
    }

    /// Reads the records back, oldest first; contents without a record (an upload cut off by a
    /// crash) and records without their contents are removed.
    fn load(&self) -> anyhow::Result<()> {
        let dir = self.root.join("files");
        let mut records = Vec::new();
        let mut contents = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => match std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Stored>(&b).ok())
                {
                    Some(stored) => records.push(stored),
                    None => {
                        tracing::warn!(path = %path.display(), "removing an unreadable file record");
                        let _ = std::fs::remove_file(&path);
                    }
                },
                Some(_) => {
                    let _ = std::fs::remove_file(&path);
                }
                None => contents.push(path),
            }
        }
        records.sort_by(|a, b| {
            (a.object.created_at, &a.object.id).cmp(&(b.object.created_at, &b.object.id))
        });
        let mut index = self.lock();
        for stored in records {
            let content = self.path(&stored.object.id);
            if std::fs::metadata(&content).map(|m| m.len()).ok() != Some(stored.object.bytes) {
                tracing::warn!(file = %stored.object.id, "removing a file whose contents are missing or cut short");
                let _ = std::fs::remove_file(self.record_path(&stored.object.id));
                let _ = std::fs::remove_file(&content);
                continue;
            }
            let seq = index.next_seq;
            index.next_seq += 1;
            index.files.insert(stored.object.id.clone(), (stored, seq));
        }
        for path in contents {
            let known = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|id| index.files.contains_key(id));
            if !known {
                let _ = std::fs::remove_file(&path);
            }
        }
        if !index.files.is_empty() {
            tracing::info!(files = index.files.len(), dir = %dir.display(), "files read back");
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Whether the store has its directory (see [`FileStore::without_disk`]).
    pub fn available(&self) -> bool {
        self._lock.is_some()
    }

    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Where the batches keep their records and their files in the making.
    pub fn batches_dir(&self) -> PathBuf {
        self.root.join("batches")
    }

    /// Where the webhook endpoints are kept.
    pub fn webhooks_dir(&self) -> PathBuf {
        self.root.join("webhooks")
    }

    /// Whether `incoming` more bytes leave at least `keep_free` free on the disk of the files
    /// directory: 507 `insufficient_storage` otherwise. A disk whose free space cannot be read
    /// is not refused for it.
    pub fn check_space(&self, incoming: u64, keep_free: u64) -> Result<(), ApiError> {
        if keep_free == 0 {
            return Ok(());
        }
        let available = match fs2::available_space(&self.root) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(dir = %self.root.display(), "cannot read the free space: {e}");
                return Ok(());
            }
        };
        if available >= incoming.saturating_add(keep_free) {
            return Ok(());
        }
        tracing::warn!(
            available,
            incoming,
            keep_free,
            dir = %self.root.display(),
            "upload refused: the files directory's disk is nearly full (--min-free-disk-bytes)"
        );
        Err(super::error::InferError::StorageFull {
            available,
            incoming,
            keep_free,
        }
        .into())
    }

    /// Where the parts of uploads under way wait (the Uploads API).
    pub fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    /// Where the contents of file `id` are (or will be) kept.
    pub fn path(&self, id: &str) -> PathBuf {
        self.root.join("files").join(id)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.root.join("files").join(format!("{id}.json"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a file whose contents are already at [`FileStore::path`]`(id)`, and on the
    /// disk (synced): its record is written first, so a listed file is a kept one, a crash
    /// included.
    pub fn insert(&self, object: FileObject, owner: Owner) -> std::io::Result<FileObject> {
        let stored = Stored {
            object: object.clone(),
            owner,
        };
        write_record(&self.record_path(&object.id), &stored)?;
        let mut index = self.lock();
        let seq = index.next_seq;
        index.next_seq += 1;
        index.files.insert(object.id.clone(), (stored, seq));
        Ok(object)
    }

    fn remove(&self, index: &mut Index, id: &str) {
        index.files.remove(id);
        let _ = std::fs::remove_file(self.record_path(id));
        let _ = std::fs::remove_file(self.path(id));
    }

    /// Removes every expired file from the index and the disk; how many went. The server runs
    /// this every few minutes; until then an expired file is already invisible (`visible`).
    pub fn remove_expired(&self, now: u64) -> usize {
        let mut index = self.lock();
        let expired: Vec<String> = index
            .files
            .values()
            .filter(|(f, _)| !f.visible_at(now))
            .map(|(f, _)| f.object.id.clone())
            .collect();
        for id in &expired {
            self.remove(&mut index, id);
        }
        expired.len()
    }

    /// The id of the owner's file whose contents are the very file at `path` (the same inode:
    /// another name of it, on Unix), named `filename`, of `purpose`: what a batch that a crash
    /// stopped as it ended already made of its results.
    pub fn same_contents(
        &self,
        owner: &Owner,
        filename: &str,
        purpose: &str,
        path: &Path,
    ) -> Option<String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let key = |m: std::fs::Metadata| (m.dev(), m.ino());
            let want = key(std::fs::metadata(path).ok()?);
            let candidates: Vec<String> = self
                .lock()
                .files
                .values()
                .filter(|(f, _)| {
                    &f.owner == owner
                        && f.object.filename == filename
                        && f.object.purpose == purpose
                })
                .map(|(f, _)| f.object.id.clone())
                .collect();
            candidates
                .into_iter()
                .find(|id| std::fs::metadata(self.path(id)).ok().map(key) == Some(want))
        }
        #[cfg(not(unix))]
        {
            let _ = (owner, filename, purpose, path);
            None
        }
    }

    /// The owner's file `id`, if it exists and has not expired.
    pub fn get(&self, owner: &Owner, id: &str, now: u64) -> Result<FileObject, ApiError> {
        Self::find(&self.lock(), owner, id, now)
    }

    /// The owner's file `id` in `index`, if it has not expired.
    fn find(index: &Index, owner: &Owner, id: &str, now: u64) -> Result<FileObject, ApiError> {
        index
            .files
            .get(id)
            .filter(|(f, _)| &f.owner == owner && f.visible_at(now))
            .map(|(f, _)| f.object.clone())
            .ok_or_else(|| no_such_file(id))
    }

    /// The owner's files, newest first (`asc`: oldest first), of `purpose` if given.
    pub fn list(
        &self,
        owner: &Owner,
        purpose: Option<&str>,
        ascending: bool,
        now: u64,
    ) -> Vec<FileObject> {
        let index = self.lock();
        let mut files: Vec<&(Stored, u64)> = index
            .files
            .values()
            .filter(|(f, _)| {
                &f.owner == owner
                    && f.visible_at(now)
                    && purpose.is_none_or(|p| f.object.purpose == p)
            })
            .collect();
        files.sort_by_key(|(_, seq)| *seq);
        if !ascending {
            files.reverse();
        }
        files.into_iter().map(|(f, _)| f.object.clone()).collect()
    }

    /// Removes the owner's file `id` from the index and the disk (a batch reading it has its
    /// own link to the contents).
    pub fn delete(&self, owner: &Owner, id: &str, now: u64) -> Result<FileObject, ApiError> {
        let mut index = self.lock();
        let object = Self::find(&index, owner, id, now)?;
        self.remove(&mut index, id);
        drop(index);
        // A deleted file must not come back after a crash.
        if let Err(e) = sync_dir_of(&self.record_path(id)) {
            tracing::warn!(file = %id, "the file is deleted, but its removal could not be made durable: {e}");
        }
        Ok(object)
    }

    /// At shutdown: removes the directory of a server without `--files-dir`.
    pub fn close(&self) {
        if self.persistent || !self.available() {
            return;
        }
        self.lock().files.clear();
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            tracing::warn!(dir = %self.root.display(), "could not remove the files directory: {e}");
        }
    }
}

pub fn no_such_file(id: &str) -> ApiError {
    ApiError::NotFound(format!("No such File object: {id}"))
}

/// The handlers of `/v1/files`.
pub mod http {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::server::routes::PathId;
    use axum::body::Body;
    use axum::extract::{Query, State};
    use axum::http::{header, HeaderMap};
    use axum::response::{IntoResponse, Response};
    use axum::{Extension, Json};
    use tokio::io::AsyncWriteExt;

    use super::{unix_now, FileObject, ListPage, DEFAULT_TTL_SECS, MAX_TTL_SECS, MIN_TTL_SECS};
    use crate::server::auth::Caller;
    use crate::server::error::{ApiError, InferError};
    use crate::server::App;

    /// What may be uploaded: a batch's input, or an image an edit names by `file_id`.
    pub(crate) const UPLOAD_PURPOSES: &[&str] = &["batch", "vision", "user_data"];

    /// What a form carries besides the file: its fields and their boundaries.
    pub(crate) const FORM_OVERHEAD: u64 = 64 << 10;
    /// The longest text field this form has (`purpose`, `expires_after[...]`) is a few bytes.
    const FIELD_LIMIT: u64 = 256;
    /// OpenAI's limit on a file name.
    pub(crate) const MAX_FILENAME_BYTES: usize = 255;

    /// A failed read or write of the files directory; a full disk (or quota) is a 507
    /// `insufficient_storage`, as when `--min-free-disk-bytes` refuses an upload beforehand. A
    /// filesystem that turned read-only (ext4's `errors=remount-ro` after a disk error) is a
    /// 503 `files_unavailable`, which says not to retry: it stays so until its operator acts.
    pub fn storage_error(e: std::io::Error) -> ApiError {
        if is_disk_full(&e) {
            InferError::DiskFull(e.to_string()).into()
        } else if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
            tracing::error!(error = %e, "the files directory's filesystem is read-only: uploads, batches and webhook endpoints cannot be written");
            ApiError::FilesUnavailable
        } else {
            InferError::Files(e.to_string()).into()
        }
    }

    /// Whether `e` says the disk (or the user's quota on it) has no room left.
    pub fn is_disk_full(e: &std::io::Error) -> bool {
        matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    }

    /// Deletes an upload's partial contents unless it is registered (also a part of the
    /// Uploads API, and a file it is joining into).
    pub(crate) struct Partial(pub(crate) Option<std::path::PathBuf>);

    impl Drop for Partial {
        fn drop(&mut self) {
            if let Some(path) = self.0.take() {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    pub(crate) fn multipart_error(e: multer::Error, limit: u64) -> ApiError {
        match e {
            multer::Error::StreamSizeExceeded { .. } => ApiError::PayloadTooLarge {
                limit: limit as usize,
            },
            multer::Error::FieldSizeExceeded { field_name, .. } => {
                let name = field_name.unwrap_or_default();
                ApiError::invalid(
                    &name,
                    "invalid_value",
                    format!("{name} is over {FIELD_LIMIT} bytes"),
                )
            }
            e => ApiError::invalid(
                "body",
                "invalid_multipart",
                format!("could not read the multipart form: {e}"),
            ),
        }
    }

    /// `POST /v1/files`: OpenAI's upload form (`file`, `purpose`, optional
    /// `expires_after[anchor]` and `expires_after[seconds]`), streamed to disk as it arrives.
    /// Purposes: `batch` (a batch's JSONL input), `vision` or `user_data` (an image that edits
    /// name by `file_id`, read when an edit names it).
    pub async fn create(
        State(app): State<Arc<App>>,
        Extension(caller): Extension<Caller>,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Json<FileObject>, ApiError> {
        let limit = app.config.files.max_file_bytes;
        let boundary = crate::server::routes::multipart_boundary(
            &headers,
            "multipart/form-data with a boundary",
        )?;
        let declared = crate::server::routes::declared_length(&headers);
        if declared.is_some_and(|n| n > limit + FORM_OVERHEAD) {
            return Err(ApiError::PayloadTooLarge {
                limit: limit as usize,
            });
        }
        app.files
            .check_space(declared.unwrap_or(0), app.config.files.min_free_bytes)?;
        let sizes = multer::SizeLimit::new()
            .whole_stream(limit + FORM_OVERHEAD)
            .for_field("purpose", FIELD_LIMIT)
            .for_field("expires_after[anchor]", FIELD_LIMIT)
            .for_field("expires_after[seconds]", FIELD_LIMIT);
        let mut form = multer::Multipart::with_constraints(
            body.into_data_stream(),
            boundary,
            multer::Constraints::new().size_limit(sizes),
        );
        let id = super::new_id("file-");
        let path = app.files.path(&id);
        let mut partial = Partial(None);
        let mut file: Option<(String, u64)> = None;
        let mut fields: HashMap<String, String> = HashMap::new();
        let bad = |e| multipart_error(e, limit);
        while let Some(mut field) = form.next_field().await.map_err(bad)? {
            let name = field.name().unwrap_or_default().to_string();
            match name.as_str() {
                "file" => {
                    if file.is_some() {
                        return Err(ApiError::invalid(
                            "file",
                            "invalid_value",
                            "one file per upload",
                        ));
                    }
                    let mut filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                    while filename.len() > MAX_FILENAME_BYTES {
                        filename.pop();
                    }
                    partial.0 = Some(path.clone());
                    let mut out = tokio::fs::File::create(&path)
                        .await
                        .map_err(storage_error)?;
                    let mut bytes = 0u64;
                    while let Some(chunk) = field.chunk().await.map_err(bad)? {
                        bytes += chunk.len() as u64;
                        if bytes > limit {
                            return Err(ApiError::PayloadTooLarge {
                                limit: limit as usize,
                            });
                        }
                        out.write_all(&chunk).await.map_err(storage_error)?;
                    }
                    out.flush().await.map_err(storage_error)?;
                    // On the disk before its record names it (`FileStore::insert`).
                    out.sync_all().await.map_err(storage_error)?;
                    file = Some((filename, bytes));
                }
                "purpose" | "expires_after[anchor]" | "expires_after[seconds]" => {
                    let text = field.text().await.map_err(bad)?;
                    if fields.insert(name.clone(), text).is_some() {
                        return Err(ApiError::invalid(
                            &name,
                            "invalid_value",
                            format!("{name} was given more than once"),
                        ));
                    }
                }
                _ => {
                    let shown: String = name.chars().take(64).collect();
                    return Err(ApiError::invalid(
                        &shown,
                        "unknown_parameter",
                        format!(
                            "Unknown parameter: '{shown}' (an upload sends file, purpose and \
                             optionally expires_after[anchor] and expires_after[seconds])"
                        ),
                    ));
                }
            }
        }
        let (filename, bytes) = file.ok_or_else(|| {
            ApiError::invalid(
                "file",
                "missing_required_parameter",
                "file is required: the JSONL input of a batch, as a file field named file",
            )
        })?;
        let purpose = match fields.get("purpose").map(String::as_str) {
            Some(p) if UPLOAD_PURPOSES.contains(&p) => p,
            None => {
                return Err(ApiError::invalid(
                    "purpose",
                    "missing_required_parameter",
                    "purpose is required: batch (a batch's input), or vision or user_data (an \
                     image to edit by file_id)",
                ))
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "purpose",
                    "invalid_value",
                    format!(
                        "purpose must be batch, vision or user_data (the files this server \
                         uses), got {:?}",
                        other.chars().take(64).collect::<String>()
                    ),
                ))
            }
        };
        let ttl = expires_after(
            fields.get("expires_after[anchor]").map(String::as_str),
            fields.get("expires_after[seconds]").map(String::as_str),
            "expires_after",
        )?;
        let object = FileObject::new(
            id.clone(),
            filename,
            purpose,
            bytes,
            ttl.unwrap_or(DEFAULT_TTL_SECS),
        );
        let object = app
            .files
            .insert(object, caller.owner())
            .map_err(storage_error)?;
        partial.0 = None;
        tracing::info!(file = %id, bytes, "file uploaded");
        Ok(Json(object))
    }

    /// OpenAI's `expires_after` (`anchor` `created_at`, `seconds` one hour to 30 days) as
    /// seconds; `None` when absent. `param` names the object in errors.
    pub fn expires_after(
        anchor: Option<&str>,
        seconds: Option<&str>,
        param: &str,
    ) -> Result<Option<u64>, ApiError> {
        let (anchor, seconds) = match (anchor, seconds) {
            (None, None) => return Ok(None),
            (Some(a), Some(s)) => (a, s),
            _ => {
                return Err(ApiError::invalid(
                    param,
                    "missing_required_parameter",
                    format!("{param} needs both anchor (created_at) and seconds"),
                ))
            }
        };
        if anchor != "created_at" {
            return Err(ApiError::invalid(
                &format!("{param}.anchor"),
                "invalid_value",
                format!("{param}.anchor must be created_at"),
            ));
        }
        match seconds.trim().parse::<u64>() {
            Ok(s) if (MIN_TTL_SECS..=MAX_TTL_SECS).contains(&s) => Ok(Some(s)),
            _ => Err(ApiError::invalid(
                &format!("{param}.seconds"),
                "invalid_value",
                format!(
                    "{param}.seconds must be a whole number between {MIN_TTL_SECS} (one hour) \
                     and {MAX_TTL_SECS} (30 days), got {:?}",
                    seconds.chars().take(32).collect::<String>()
                ),
            )),
        }
    }

    /// A JSON body's `expires_after`-shaped field `param` (`{"anchor": "created_at",
    /// "seconds": N}`, the seconds as a number or text) as seconds; `None` when absent or null.
    pub fn expires_after_json(
        value: Option<&serde_json::Value>,
        param: &str,
    ) -> Result<Option<u64>, ApiError> {
        use serde_json::Value;
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => {
                let text = |k: &str| match o.get(k) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                };
                expires_after(text("anchor").as_deref(), text("seconds").as_deref(), param)
            }
            Some(other) => Err(ApiError::invalid(
                param,
                "invalid_type",
                format!(
                    "{param} must be an object with anchor and seconds, got {}",
                    crate::server::validate::json_kind(other)
                ),
            )),
        }
    }

    /// A list's `limit` (1 to `max`, `default` when absent), `after`, and `order` (`asc` or
    /// `desc`) where `others` (the list's parameters besides `limit` and `after`) has it.
    pub struct ListParams {
        pub limit: usize,
        pub ascending: bool,
        pub after: Option<String>,
    }

    impl ListParams {
        pub fn parse(
            query: &HashMap<String, String>,
            (default, max): (usize, usize),
            others: &[&str],
        ) -> Result<Self, ApiError> {
            let known = |k: &str| k == "limit" || k == "after" || others.contains(&k);
            if let Some(k) = query.keys().find(|k| !known(k)) {
                let shown: String = k.chars().take(64).collect();
                return Err(ApiError::invalid(
                    &shown,
                    "unknown_parameter",
                    format!("Unknown parameter: '{shown}'"),
                ));
            }
            let limit = match query.get("limit") {
                None => default,
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if (1..=max).contains(&n) => n,
                    _ => {
                        return Err(ApiError::invalid(
                            "limit",
                            "invalid_value",
                            format!("limit must be between 1 and {max}"),
                        ))
                    }
                },
            };
            let ascending = match query.get("order").map(String::as_str) {
                None | Some("desc") => false,
                Some("asc") => true,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "order",
                        "invalid_value",
                        "order must be asc or desc",
                    ))
                }
            };
            Ok(ListParams {
                limit,
                ascending,
                after: query.get("after").cloned(),
            })
        }
    }

    /// `GET /v1/files`: the key's files, newest first; `purpose`, `limit` (at most 10,000),
    /// `order` and `after` as at OpenAI.
    pub async fn list(
        State(app): State<Arc<App>>,
        Extension(caller): Extension<Caller>,
        Query(query): Query<HashMap<String, String>>,
    ) -> Result<Json<ListPage<FileObject>>, ApiError> {
        let params = ListParams::parse(&query, (10_000, 10_000), &["order", "purpose"])?;
        let files = app.files.list(
            &caller.owner(),
            query.get("purpose").map(String::as_str),
            params.ascending,
            unix_now(),
        );
        Ok(Json(ListPage::of(
            files,
            |f| &f.id,
            params.after.as_deref(),
            params.limit,
        )))
    }

    pub async fn retrieve(
        State(app): State<Arc<App>>,
        Extension(caller): Extension<Caller>,
        PathId(id): PathId,
    ) -> Result<Json<FileObject>, ApiError> {
        app.files.get(&caller.owner(), &id, unix_now()).map(Json)
    }

    /// `GET /v1/files/{id}/content`: the bytes, streamed from disk (a batch's output may be
    /// gigabytes of base64 images).
    pub async fn content(
        State(app): State<Arc<App>>,
        Extension(caller): Extension<Caller>,
        PathId(id): PathId,
    ) -> Result<Response, ApiError> {
        let object = app.files.get(&caller.owner(), &id, unix_now())?;
        let file = tokio::fs::File::open(app.files.path(&id))
            .await
            .map_err(storage_error)?;
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
        Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, object.bytes.to_string()),
            ],
            body,
        )
            .into_response())
    }

    /// OpenAI's answer to a delete.
    #[derive(serde::Serialize)]
    pub struct Deleted {
        id: String,
        object: &'static str,
        deleted: bool,
    }

    pub async fn delete(
        State(app): State<Arc<App>>,
        Extension(caller): Extension<Caller>,
        PathId(id): PathId,
    ) -> Result<Json<Deleted>, ApiError> {
        let object = app.files.delete(&caller.owner(), &id, unix_now())?;
        tracing::info!(file = %object.id, "file deleted");
        Ok(Json(Deleted {
            id: object.id,
            object: "file",
            deleted: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a failed write of the files directory is answered: a full disk 507, a filesystem
    /// turned read-only 503 `files_unavailable` (with `x-should-retry: false`: the SDKs would
    /// send an upload twice more, for nothing), anything else 500.
    #[cfg(unix)]
    #[test]
    fn storage_errors_are_answered_by_their_cause() {
        use axum::response::IntoResponse;
        use std::io::{Error, ErrorKind};
        let answer = |e: Error| {
            let r = http::storage_error(e).into_response();
            let retry = r.headers().get("x-should-retry").cloned();
            (
                r.status().as_u16(),
                retry.map(|v| v.to_str().unwrap().to_string()),
            )
        };
        let no = Some("false".to_string());
        assert_eq!(
            answer(Error::from(ErrorKind::StorageFull)),
            (507, no.clone())
        );
        assert_eq!(answer(Error::from_raw_os_error(libc::EROFS)), (503, no));
        assert_eq!(
            answer(Error::from(ErrorKind::PermissionDenied)),
            (500, None)
        );
    }

    fn object(id: &str, purpose: &str, expires_at: Option<u64>) -> FileObject {
        let mut f = FileObject::new(id.into(), "in.jsonl".into(), purpose, 3, 0);
        f.created_at = 100;
        f.expires_at = expires_at;
        f
    }

    #[test]
    fn files_belong_to_their_key_expire_and_leave_the_disk() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("files-dir");
        let store = FileStore::open(Some(&dir)).unwrap();
        let (a, b) = (Some("a".to_string()), Some("b".to_string()));
        for (id, owner, purpose, expires) in [
            ("file-a", &a, "batch", None),
            ("file-b", &a, "batch_output", Some(200)),
            ("file-c", &b, "batch", None),
        ] {
            std::fs::write(store.path(id), "abc").unwrap();
            store
                .insert(object(id, purpose, expires), owner.clone())
                .unwrap();
        }
        assert!(store.get(&a, "file-a", 150).is_ok());
        // Another key's file is as absent as a missing one.
        assert!(store.get(&b, "file-a", 150).is_err());
        let ids = |files: Vec<FileObject>| files.into_iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(ids(store.list(&a, None, false, 150)), ["file-b", "file-a"]);
        assert_eq!(ids(store.list(&a, None, true, 150)), ["file-a", "file-b"]);
        assert_eq!(ids(store.list(&a, Some("batch"), false, 150)), ["file-a"]);

        // A second server is kept out; once this one stops, the files are read back, and
        // contents without a record (an upload cut off) are removed.
        assert!(FileStore::open(Some(&dir)).is_err());
        std::fs::write(store.path("file-partial"), "ab").unwrap();
        drop(store);
        let store = FileStore::open(Some(&dir)).unwrap();
        assert_eq!(ids(store.list(&a, None, false, 150)), ["file-b", "file-a"]);
        assert_eq!(ids(store.list(&b, None, false, 150)), ["file-c"]);
        assert!(!store.path("file-partial").exists());

        // Expired: gone from the index and the disk, unasked.
        assert_eq!(store.remove_expired(199), 0);
        assert_eq!(store.remove_expired(200), 1);
        assert!(!store.path("file-b").exists());
        assert_eq!(ids(store.list(&a, None, false, 200)), ["file-a"]);
        store.delete(&a, "file-a", 200).unwrap();
        assert!(!store.path("file-a").exists());
        assert!(store.delete(&a, "file-a", 200).is_err());
        // A kept directory stays; a private one goes.
        store.close();
        assert!(dir.exists());
        let private = FileStore::open(None).unwrap();
        let private_dir = private.dir().to_path_buf();
        assert!(private_dir.exists());
        private.close();
        assert!(!private_dir.exists());
    }

    #[test]
    fn directories_of_killed_servers_are_removed_and_live_ones_kept() {
        let temp = tempfile::tempdir().unwrap();
        // A process that has exited: its id is free (reuse within the test is improbable, and
        // would only keep the directory).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let make = |name: &str| {
            let dir = temp.path().join(name);
            std::fs::create_dir_all(dir.join("files")).unwrap();
            std::fs::write(dir.join(".lock"), b"").unwrap();
            std::fs::write(dir.join("files/file-x"), b"a batch's results").unwrap();
            dir
        };
        let killed = make(&format!("turbine-files-{dead}-0123abcd"));
        let live = make(&format!("turbine-files-{}-89abcdef", std::process::id()));
        let other = make(&format!("turbine-filesystem-{dead}-x"));
        let odd = make("turbine-files-notapid-x");
        assert_eq!(remove_stale_private_dirs(temp.path()), 1);
        assert!(!killed.exists());
        for kept in [&live, &other, &odd] {
            assert!(kept.join("files/file-x").exists(), "{}", kept.display());
        }
        // A dead id whose lock is held (it cannot be, but if it were): kept.
        let locked = make(&format!("turbine-files-{dead}-feedface"));
        let lock = std::fs::File::open(locked.join(".lock")).unwrap();
        fs2::FileExt::try_lock_exclusive(&lock).unwrap();
        assert_eq!(remove_stale_private_dirs(temp.path()), 0);
        assert!(locked.exists());
    }

    #[test]
    fn list_pages_follow_after_and_limit() {
        let items: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let page = ListPage::of(items.clone(), |s| s, None, 2);
        assert_eq!(
            (page.data.as_slice(), page.has_more),
            (&["a".to_string(), "b".into()][..], true)
        );
        assert_eq!(page.last_id.as_deref(), Some("b"));
        let page = ListPage::of(items.clone(), |s| s, Some("b"), 2);
        assert_eq!((page.data.len(), page.has_more), (2, false));
        assert_eq!(page.first_id.as_deref(), Some("c"));
        for after in ["d", "gone"] {
            let page = ListPage::of(items.clone(), |s| s, Some(after), 2);
            assert!(page.data.is_empty() && page.first_id.is_none() && !page.has_more);
        }
    }

    /// A write that finds the disk (or quota) full is a 507 `insufficient_storage` telling the
    /// client what to do; any other failure of the files directory stays a 500.
    #[test]
    fn a_full_disk_is_insufficient_storage() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = http::storage_error(std::io::Error::from_raw_os_error(errno));
            let info = e.info();
            assert_eq!(info.status.as_u16(), 507, "{e}");
            assert_eq!(info.code, Some("insufficient_storage"));
            assert!(e.to_string().contains("DELETE /v1/files/{id}"), "{e}");
        }
        let e = http::storage_error(std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.info().status.as_u16(), 500, "{e}");
    }

    /// A record is written (and synced) wherever the server writes one: in the multi-threaded
    /// runtime's `block_on` and on its workers (moved aside for the fsync), on its blocking
    /// pool, on a current-thread runtime (where that move would panic) and outside any runtime;
    /// it leaves no temporary file behind, and replaces the one before.
    #[test]
    fn records_are_written_from_any_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let read = || -> u32 { serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap() };
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let p = path.clone();
        multi.block_on(async move {
            write_record(&p, &0u32).unwrap();
            let worker = tokio::spawn({
                let p = p.clone();
                async move { write_record(&p, &1u32) }
            });
            worker.await.unwrap().unwrap();
            tokio::task::spawn_blocking(move || write_record(&p, &2u32))
                .await
                .unwrap()
                .unwrap();
        });
        assert_eq!(read(), 2);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        current
            .block_on(async { write_record(&path, &3u32) })
            .unwrap();
        assert_eq!(read(), 3);
        write_record(&path, &4u32).unwrap();
        assert_eq!(read(), 4);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["r.json"]);
        sync_dir_of(&path).unwrap();
    }
}
