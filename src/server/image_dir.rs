//! `--image-store-dir`: the images behind `url` responses written to a directory as well as
//! kept in memory, so that any server using the directory answers their URLs.
//!
//! The memory store ([`super::store`]) is per process: behind a load balancer spreading
//! requests over several servers, a URL fetched through the balancer reached the server that
//! made it only by chance (two servers: half the fetches were 404), and a restart lost every
//! URL. With a directory that the servers share (a volume mounted by each replica, or one
//! host's disk for a server that restarts), the server that gets a URL's fetch and does not
//! hold the image reads it from there.
//!
//! Each image is `DIR/<id>.<png|jpeg|webp>`, written to a temporary name and renamed, so no
//! server reads half a file. It expires with its URL: its modification time plus
//! `--image-url-ttl-secs`; every server sweeps expired files (and temporary files left by a
//! crash). Each server bounds what it wrote with `--image-store-dir-max-bytes`, deleting its
//! own oldest files first. The directory is a second copy: a write that fails (a full disk)
//! is warned about and counted, and the response still carries its URL, served from memory by
//! the server that made it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use axum::body::Bytes;

use super::api::OutputFormat;
use super::metrics::Metrics;

/// Temporary files older than this are a crashed write's, and swept.
const STALE_TEMPORARY: Duration = Duration::from_secs(600);

/// The directory, and what this server wrote to it (oldest first) for its byte bound.
pub struct ImageDir {
    dir: PathBuf,
    ttl: Duration,
    max_bytes: u64,
    written: Mutex<Written>,
    /// When a failed write was last warned about: once a minute at most.
    warned: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Written {
    files: VecDeque<(PathBuf, u64)>,
    bytes: u64,
}

/// An image read back from the directory, and how long its URL has left.
pub struct Found {
    pub bytes: Bytes,
    pub content_type: &'static str,
    pub left: Duration,
}

impl ImageDir {
    /// Opens (making it if needed) `dir`, and checks that this server can write to it.
    pub fn open(
        dir: &Path,
        ttl: Duration,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot make the URL image directory {} (--image-store-dir)",
                dir.display()
            )
        })?;
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .with_context(|| {
                format!(
                    "cannot write to the URL image directory {} (--image-store-dir)",
                    dir.display()
                )
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ttl,
            max_bytes,
            written: Mutex::new(Written::default()),
            warned: Mutex::new(None),
            metrics,
        })
    }

    /// The file of image `id` in `format` (its `output_format` name is the extension).
    fn path(&self, id: &str, format: OutputFormat) -> PathBuf {
        self.dir.join(format!("{id}.{}", format.as_str()))
    }

    /// The formats an image may have.
    fn formats() -> impl Iterator<Item = OutputFormat> {
        OutputFormat::NAMES
            .iter()
            .filter_map(|n| OutputFormat::parse(n))
    }

    /// Writes image `id` in `format`; a failure is warned about and returned, and the caller
    /// goes on without the copy.
    pub async fn put(&self, id: &str, format: OutputFormat, bytes: Bytes) -> std::io::Result<()> {
        let path = self.path(id, format);
        let temporary = self.dir.join(format!(".{id}.{}.tmp", format.as_str()));
        let size = bytes.len() as u64;
        let written = {
            let (path, temporary) = (path.clone(), temporary.clone());
            tokio::task::spawn_blocking(move || {
                let done = std::fs::write(&temporary, &bytes)
                    .and_then(|()| std::fs::rename(&temporary, &path));
                if done.is_err() {
                    let _ = std::fs::remove_file(&temporary);
                }
                done
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        };
        self.metrics.image_dir_write(written.is_ok());
        if let Err(e) = &written {
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            if super::warning_due(&mut warned, Instant::now()) {
                tracing::warn!(
                    dir = %self.dir.display(),
                    error = %e,
                    "cannot write an image behind a url response to --image-store-dir: its URL \
                     is answered only by this server, from memory"
                );
            }
            return written;
        }
        // This server's own oldest files go to keep it within its bound.
        let evicted: Vec<PathBuf> = {
            let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
            w.files.push_back((path, size));
            w.bytes += size;
            let mut evicted = Vec::new();
            while w.bytes > self.max_bytes {
                let Some((old, size)) = w.files.pop_front() else {
                    break;
                };
                w.bytes -= size;
                evicted.push(old);
            }
            evicted
        };
        if !evicted.is_empty() {
            tokio::task::spawn_blocking(move || {
                for path in evicted {
                    let _ = std::fs::remove_file(path);
                }
            });
        }
        Ok(())
    }

    /// Image `id`, if the directory has it and its time is not up (an expired one is removed).
    pub async fn get(&self, id: &str) -> Option<Found> {
        if !is_image_id(id) {
            return None;
        }
        let candidates: Vec<(PathBuf, &'static str)> = Self::formats()
            .map(|format| (self.path(id, format), format.content_type()))
            .collect();
        let ttl = self.ttl;
        let found = tokio::task::spawn_blocking(move || {
            for (path, content_type) in candidates {
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok())
                    .unwrap_or_default();
                let Some(left) = ttl.checked_sub(age).filter(|l| !l.is_zero()) else {
                    let _ = std::fs::remove_file(&path);
                    return None;
                };
                let bytes = std::fs::read(&path).ok()?;
                return Some(Found {
                    bytes: Bytes::from(bytes),
                    content_type,
                    left,
                });
            }
            None
        })
        .await
        .ok()
        .flatten();
        if found.is_some() {
            self.metrics.image_dir_read();
        }
        found
    }

    /// Removes expired images and stale temporary files, whoever wrote them; returns how many.
    pub fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let limit = if name.starts_with('.') && name.ends_with(".tmp") {
                STALE_TEMPORARY
            } else if name
                .rsplit_once('.')
                .is_some_and(|(id, ext)| is_image_id(id) && OutputFormat::parse(ext).is_some())
            {
                self.ttl
            } else {
                continue;
            };
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok());
            if age.is_some_and(|age| age >= limit) && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
            let Written { files, bytes } = &mut *w;
            files.retain(|(path, size)| {
                let kept = path.exists();
                if !kept {
                    *bytes -= size;
                }
                kept
            });
        }
        removed
    }

    /// How often [`ImageDir::sweep`] runs: a quarter of the URLs' time, at most a minute.
    pub fn sweep_period(&self) -> Duration {
        (self.ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether `id` is one [`super::store::ImageStore::new_id`] makes (`img_` and 32 hex digits):
/// nothing else names a file.
fn is_image_id(id: &str) -> bool {
    id.strip_prefix("img_")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new())
    }

    #[test]
    fn only_image_ids_name_files() {
        let id = super::super::store::ImageStore::new_id();
        assert!(is_image_id(&id), "{id}");
        for bad in [
            "img_../../etc/passwd",
            "img_",
            "../img_00",
            "img_0123456789abcdef0123456789abcdeg",
        ] {
            assert!(!is_image_id(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn images_are_read_back_until_their_time_is_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir =
            ImageDir::open(tmp.path(), Duration::from_secs(3600), 1 << 20, metrics()).unwrap();
        let id = super::super::store::ImageStore::new_id();
        dir.put(&id, OutputFormat::Webp, Bytes::from_static(b"webp bytes"))
            .await
            .unwrap();
        let found = dir.get(&id).await.unwrap();
        assert_eq!(&found.bytes[..], b"webp bytes");
        assert_eq!(found.content_type, "image/webp");
        assert!(found.left > Duration::from_secs(3590));
        assert!(dir
            .get(&super::super::store::ImageStore::new_id())
            .await
            .is_none());
        // Another server's view of the same directory, whose URLs last no time: gone.
        let other = ImageDir::open(tmp.path(), Duration::ZERO, 1 << 20, metrics()).unwrap();
        assert!(other.get(&id).await.is_none());
        assert!(!tmp.path().join(format!("{id}.webp")).exists());
    }

    #[tokio::test]
    async fn a_failed_write_is_counted_and_returned() {
        let tmp = tempfile::tempdir().unwrap();
        let gone = tmp.path().join("gone");
        let m = metrics();
        let dir = ImageDir::open(&gone, Duration::from_secs(3600), 1 << 20, m.clone()).unwrap();
        std::fs::remove_dir(&gone).unwrap();
        let id = super::super::store::ImageStore::new_id();
        assert!(dir
            .put(&id, OutputFormat::Png, Bytes::from_static(b"png"))
            .await
            .is_err());
        let text = m.render();
        assert!(
            text.contains("turbine_image_dir_writes_total{outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn a_server_keeps_what_it_wrote_within_its_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ImageDir::open(tmp.path(), Duration::from_secs(3600), 25, metrics()).unwrap();
        let ids: Vec<String> = (0..3)
            .map(|_| super::super::store::ImageStore::new_id())
            .collect();
        for id in &ids {
            dir.put(id, OutputFormat::Png, Bytes::from(vec![7u8; 10]))
                .await
                .unwrap();
        }
        // 30 bytes written, 25 allowed: the oldest went.
        for _ in 0..100 {
            if !tmp.path().join(format!("{}.png", ids[0])).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(dir.get(&ids[0]).await.is_none());
        assert!(dir.get(&ids[1]).await.is_some());
        assert!(dir.get(&ids[2]).await.is_some());
    }

    #[tokio::test]
    async fn the_sweep_removes_expired_images_and_crashed_writes_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir =
            ImageDir::open(tmp.path(), Duration::from_secs(3600), 1 << 20, metrics()).unwrap();
        let (old, new) = (
            super::super::store::ImageStore::new_id(),
            super::super::store::ImageStore::new_id(),
        );
        for id in [&old, &new] {
            dir.put(id, OutputFormat::Png, Bytes::from_static(b"png"))
                .await
                .unwrap();
        }
        let crashed = tmp.path().join(format!(".{old}.png.tmp"));
        std::fs::write(&crashed, b"half").unwrap();
        let unrelated = tmp.path().join("notes.txt");
        std::fs::write(&unrelated, b"keep").unwrap();
        let long_ago = SystemTime::now() - Duration::from_secs(7200);
        for path in [
            tmp.path().join(format!("{old}.png")),
            crashed.clone(),
            unrelated.clone(),
        ] {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        assert_eq!(dir.sweep(), 2);
        assert!(!crashed.exists() && unrelated.exists());
        assert!(dir.get(&old).await.is_none());
        assert!(dir.get(&new).await.is_some());
    }
}
