//! API keys: lookup in constant time, per-key priority and per-minute limits, and the
//! `x-ratelimit-*` headers OpenAI sends.
//!
//! Keys come from `--api-key`/`TURBINE_API_KEYS` (priority `normal`, no limits) and from
//! `--api-keys-file`, one key per line:
//!
//! ```text
//! # comment
//! sk-team-a  name=team-a  priority=high  requests_per_minute=600  images_per_minute=2000
//! sk-batch   name=batch   priority=low   images_per_minute=100
//! ```
//!
//! A key's `name` labels its requests in the log and its usage in the metrics (several keys may
//! share one: a team's old and new key while it rotates them); a key without one is labelled
//! `key-` and the first 8 hex digits of its SHA-256, which tells keys apart without showing them.
//!
//! Limits are token buckets refilled continuously at `limit` per minute, so a client may burst
//! up to `limit` and then proceeds at the average rate; `x-ratelimit-reset-*` is the time until
//! the bucket is full again (OpenAI's meaning: "until the limit resets to its initial state").

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::error::ApiError;
use super::queue::Priority;

/// One configured key.
#[derive(Clone)]
pub struct ApiKey {
    pub key: String,
    /// What its requests and usage are labelled with (`name=`); `None`: `key-` + a fingerprint.
    pub name: Option<String>,
    pub priority: Priority,
    pub requests_per_minute: Option<u32>,
    pub images_per_minute: Option<u32>,
}

impl std::fmt::Debug for ApiKey {
    /// Never prints the key itself (configs end up in logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("key", &"<redacted>")
            .field("name", &self.name)
            .field("priority", &self.priority)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("images_per_minute", &self.images_per_minute)
            .finish()
    }
}

impl ApiKey {
    /// A key with normal priority and no limits.
    pub fn plain(key: impl Into<String>) -> Self {
        ApiKey {
            key: key.into(),
            name: None,
            priority: Priority::Normal,
            requests_per_minute: None,
            images_per_minute: None,
        }
    }
}

/// Reads an `--api-keys-file` (format in the module doc); errors name the file and line.
/// With the `inline` keys (`--api-key`) before the file's; an error if that makes none.
pub fn read_keys_file(inline: &[ApiKey], path: &Path) -> anyhow::Result<Vec<ApiKey>> {
    file_keys(inline, path, &read_bytes(path)?)
}

fn read_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read API keys file {}", path.display()))
}

pub fn parse_keys(text: &str) -> anyhow::Result<Vec<ApiKey>> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lineno = i + 1;
        let mut words = line.split_whitespace();
        let Some(key) = words.next() else { continue };
        let mut k = ApiKey::plain(key);
        for word in words {
            let Some((name, value)) = word.split_once('=') else {
                bail!("line {lineno}: expected name=value after the key, got {word:?}");
            };
            let limit = || -> anyhow::Result<Option<u32>> {
                match value.parse::<u32>() {
                    Ok(v) if v > 0 => Ok(Some(v)),
                    _ => bail!("line {lineno}: {name} must be a positive integer, got {value:?}"),
                }
            };
            match name {
                "priority" => {
                    k.priority = Priority::parse(value).with_context(|| {
                        format!(
                            "line {lineno}: priority must be high, normal or low, got {value:?}"
                        )
                    })?
                }
                "requests_per_minute" => k.requests_per_minute = limit()?,
                "images_per_minute" => k.images_per_minute = limit()?,
                "name" => {
                    // A metric label and a log field as it is: short, and nothing to escape.
                    let ok = (1..=64).contains(&value.len())
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                    if !ok {
                        bail!(
                            "line {lineno}: name must be 1 to 64 letters, digits, '.', '_' or \
                             '-', got {value:?}"
                        );
                    }
                    k.name = Some(value.to_string());
                }
                other => bail!(
                    "line {lineno}: unknown setting {other:?} (expected name, priority, \
                     requests_per_minute or images_per_minute)"
                ),
            }
        }
        keys.push(k);
    }
    Ok(keys)
}

/// A token bucket holding up to `limit` tokens, refilled at `limit` per minute.
#[derive(Debug, Clone)]
pub struct Bucket {
    limit: u32,
    tokens: f64,
    updated: Instant,
}

/// What the `x-ratelimit-*` headers of one kind say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketStatus {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

impl Bucket {
    const PERIOD: Duration = Duration::from_secs(60);

    pub fn new(limit: u32, now: Instant) -> Self {
        Bucket {
            limit,
            tokens: f64::from(limit),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let rate = f64::from(self.limit) / Self::PERIOD.as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.limit));
        self.updated = now;
    }

    /// How long until `need` tokens are there (zero: now).
    fn wait_for(&self, need: u32) -> Duration {
        let missing = f64::from(need) - self.tokens;
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        let rate = f64::from(self.limit) / Self::PERIOD.as_secs_f64();
        Duration::from_secs_f64(missing / rate)
    }

    pub fn status(&mut self, now: Instant) -> BucketStatus {
        self.refill(now);
        BucketStatus {
            limit: self.limit,
            remaining: self.tokens.floor().max(0.0) as u32,
            reset: self.wait_for(self.limit),
        }
    }
}

#[derive(Debug)]
struct Limits {
    requests: Option<Bucket>,
    images: Option<Bucket>,
}

impl Limits {
    fn new(key: &ApiKey, now: Instant) -> Self {
        Limits {
            requests: key.requests_per_minute.map(|l| Bucket::new(l, now)),
            images: key.images_per_minute.map(|l| Bucket::new(l, now)),
        }
    }

    /// A reload changed the key's limits: what is left of each bucket carries over (at most
    /// the new limit); a limit the key did not have starts full.
    fn retarget(&mut self, key: &ApiKey, now: Instant) {
        for (bucket, limit) in [
            (&mut self.requests, key.requests_per_minute),
            (&mut self.images, key.images_per_minute),
        ] {
            *bucket = match (bucket.take(), limit) {
                (Some(mut b), Some(limit)) => {
                    b.refill(now);
                    b.limit = limit;
                    b.tokens = b.tokens.min(f64::from(limit));
                    Some(b)
                }
                (None, Some(limit)) => Some(Bucket::new(limit, now)),
                (_, None) => None,
            };
        }
    }
}

/// A configured key as the server holds it.
struct Entry {
    digest: [u8; 32],
    /// The key's `name`, or `key-` + the first 8 hex digits of its SHA-256.
    label: Arc<str>,
    priority: Priority,
    /// Shared by the entries successive reloads make for the same key: its quota carries over.
    limits: Arc<Mutex<Limits>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("label", &self.label)
            .field("priority", &self.priority)
            .finish()
    }
}

impl Entry {
    fn fingerprint(&self) -> [u8; 16] {
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&self.digest[..16]);
        fingerprint
    }
}

/// Who sent a request (for an open server: nobody in particular).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's entry as it was when the request came; `None` on an open server.
    key: Option<Arc<Entry>>,
    pub priority: Priority,
}

impl Caller {
    /// Whose files and batches this caller sees: those of its key (`None` on an open server).
    /// The first half of the key's SHA-256: the same across restarts and reordered key files,
    /// without storing the key.
    pub fn owner(&self) -> Option<String> {
        self.key.as_ref().map(|e| hex::encode(e.fingerprint()))
    }
}

/// `--api-keys-file`: where the keys are read again from, and what was read last.
struct KeysFile {
    path: PathBuf,
    /// The `--api-key` keys, which a reload keeps.
    inline: Vec<ApiKey>,
    /// The file's bytes when it was last looked at (`None`: it could not be read).
    seen: Mutex<Option<Vec<u8>>>,
}

/// What became of looking at the keys file again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysReload {
    /// No keys file, or it has not changed.
    Unchanged,
    /// The new keys are in use.
    Loaded,
    /// The file does not load (unreadable, a bad line, no keys at all): the keys in use stay.
    Failed,
}

/// The configured keys and their limit state.
pub struct Authenticator {
    keys: RwLock<Arc<[Arc<Entry>]>>,
    /// No keys at all, and no file to read them from: anyone may call.
    open: bool,
    priority_header: Option<HeaderName>,
    file: Option<KeysFile>,
}

impl Authenticator {
    pub fn new(
        keys: &[ApiKey],
        priority_header: Option<&str>,
        now: Instant,
    ) -> anyhow::Result<Self> {
        let priority_header = priority_header
            .map(|h| {
                HeaderName::try_from(h)
                    .with_context(|| format!("--priority-header {h:?} is not a valid header name"))
            })
            .transpose()?;
        Ok(Authenticator {
            keys: RwLock::new(entries(keys, &[], now).into()),
            open: keys.is_empty(),
            priority_header,
            file: None,
        })
    }

    /// The `inline` keys and those of the keys file at `path`, which [`Self::reload`] reads
    /// again. The file must hold at least one key (or `inline` some): a keys file never leaves
    /// the API open.
    pub fn with_keys_file(
        inline: &[ApiKey],
        path: &Path,
        priority_header: Option<&str>,
        now: Instant,
    ) -> anyhow::Result<Self> {
        let bytes = read_bytes(path)?;
        let keys = file_keys(inline, path, &bytes)?;
        let mut auth = Self::new(&keys, priority_header, now)?;
        auth.file = Some(KeysFile {
            path: path.to_path_buf(),
            inline: inline.to_vec(),
            seen: Mutex::new(Some(bytes)),
        });
        Ok(auth)
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// How many keys are in use.
    pub fn key_count(&self) -> usize {
        self.current_keys().len()
    }

    fn current_keys(&self) -> Arc<[Arc<Entry>]> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The caller's key as configured now: a reload since the request came may have changed
    /// its limits or name. `Ok(None)` on an open server; an error if the key is gone.
    fn current(&self, caller: &Caller) -> Result<Option<Arc<Entry>>, ApiError> {
        let Some(held) = &caller.key else {
            return Ok(None);
        };
        self.current_keys()
            .iter()
            .find(|e| e.digest == held.digest)
            .cloned()
            .map(Some)
            .ok_or(ApiError::KeyRemoved)
    }

    /// What the caller's requests and usage are labelled with: its key's name or fingerprint
    /// label (as configured now, or when the request came if a reload removed the key since);
    /// `None` on an open server.
    pub fn label(&self, caller: &Caller) -> Option<Arc<str>> {
        match self.current(caller) {
            Ok(entry) => entry.map(|e| e.label.clone()),
            Err(_) => caller.key.as_ref().map(|e| e.label.clone()),
        }
    }

    /// Checks the key (`Authorization: Bearer KEY`, or Azure OpenAI's `api-key: KEY`, which its
    /// clients send instead) and the trusted priority header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let mut caller = if self.is_open() {
            Caller {
                key: None,
                priority: Priority::Normal,
            }
        } else {
            let presented = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (scheme, rest) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
                })
                .filter(|k| !k.is_empty())
                .or_else(|| {
                    let key = headers.get("api-key")?.to_str().ok()?.trim();
                    (!key.is_empty()).then_some(key)
                })
                .ok_or(ApiError::MissingApiKey)?;
            let entry = self.lookup(presented).ok_or(ApiError::InvalidApiKey)?;
            Caller {
                priority: entry.priority,
                key: Some(entry),
            }
        };
        if let Some(name) = &self.priority_header {
            if let Some(value) = headers.get(name) {
                caller.priority =
                    value
                        .to_str()
                        .ok()
                        .and_then(Priority::parse)
                        .ok_or_else(|| ApiError::InvalidRequest {
                            message: format!("header {name} must be high, normal or low"),
                            param: None,
                            code: "invalid_value",
                        })?;
            }
        }
        Ok(caller)
    }

    /// The caller a batch runs as after a restart: the configured key whose fingerprint is
    /// `owner` (at normal priority; the batch lowers it), or `None` if that key is gone. A batch
    /// of an open server runs as nobody in particular while the server stays open.
    pub fn caller_for(&self, owner: &Option<String>) -> Option<Caller> {
        match owner {
            None => self.is_open().then_some(Caller {
                key: None,
                priority: Priority::Normal,
            }),
            Some(hex_print) => self
                .current_keys()
                .iter()
                .find(|e| hex::encode(e.fingerprint()) == *hex_print)
                .map(|e| Caller {
                    key: Some(e.clone()),
                    priority: Priority::Normal,
                }),
        }
    }

    /// Compares the presented key's SHA-256 with every configured key's, in constant time and
    /// without early exit, so neither timing nor key length tells how close a guess was.
    fn lookup(&self, presented: &str) -> Option<Arc<Entry>> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let keys = self.current_keys();
        let mut found = 0u64;
        for (i, e) in keys.iter().enumerate() {
            let hit = e.digest.ct_eq(&digest);
            found = u64::conditional_select(&found, &(i as u64 + 1), hit);
        }
        (found > 0).then(|| keys[found as usize - 1].clone())
    }

    /// Takes `requests` requests and `images` images from the caller's buckets, or nothing if
    /// either would go below zero. The middleware takes the request (every request counts, as
    /// at OpenAI); the handler takes the images once it knows `n`. A key a reload removed since
    /// the request came takes nothing more ([`ApiError::KeyRemoved`]).
    pub fn consume(
        &self,
        caller: &Caller,
        requests: u32,
        images: u32,
        now: Instant,
    ) -> Result<(), ApiError> {
        let Some(entry) = self.current(caller)? else {
            return Ok(());
        };
        let mut limits = lock(&entry.limits);
        let requests_needed = requests;
        let Limits {
            requests,
            images: image_bucket,
        } = &mut *limits;
        let mut checks = [
            (requests.as_mut(), "requests", requests_needed),
            (image_bucket.as_mut(), "images", images),
        ];
        for (bucket, kind, need) in checks.iter_mut() {
            if let Some(b) = bucket {
                b.refill(now);
                if *kind == "images" && *need > b.limit {
                    return Err(ApiError::invalid(
                        "n",
                        "integer_above_max_value",
                        format!(
                            "this request needs {need} images but this API key may generate \
                             at most {} images per minute",
                            b.limit
                        ),
                    ));
                }
                let wait = b.wait_for(*need);
                if !wait.is_zero() {
                    return Err(ApiError::RateLimited {
                        kind,
                        limit: b.limit,
                        needed: *need,
                        retry_after: wait,
                    });
                }
            }
        }
        for (bucket, _, need) in checks.iter_mut() {
            if let Some(b) = bucket {
                b.tokens -= f64::from(*need);
            }
        }
        Ok(())
    }

    /// The `x-ratelimit-*` headers for the caller's configured limits (none if it has none).
    pub fn rate_limit_headers(
        &self,
        caller: &Caller,
        now: Instant,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let Ok(Some(entry)) = self.current(caller) else {
            return Vec::new();
        };
        let mut limits = lock(&entry.limits);
        let Limits { requests, images } = &mut *limits;
        let mut out = Vec::new();
        for (bucket, kind) in [(requests.as_mut(), "requests"), (images.as_mut(), "images")] {
            if let Some(b) = bucket {
                let s = b.status(now);
                let mut push = |what: &str, value: String| {
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")),
                        HeaderValue::try_from(value),
                    ) {
                        out.push((n, v));
                    }
                };
                push("limit", s.limit.to_string());
                push("remaining", s.remaining.to_string());
                push("reset", format_reset(s.reset));
            }
        }
        out
    }

    /// Reads the keys file again and, if it changed since it was last read (`force`: in any
    /// case), puts its keys in use: requests that arrive from then on are checked against them.
    /// A key kept keeps what is left of its quota; one removed takes no more requests or images,
    /// and those under way finish. A file that does not load leaves the keys in use as they are
    /// and is not tried again until it changes once more.
    ///
    /// Without `force` (the periodic check) a change must read the same twice, `settle` apart,
    /// so that a file caught half written by an editor is left for the next check.
    pub fn reload(&self, force: bool, settle: Duration, now: Instant) -> KeysReload {
        let Some(file) = &self.file else {
            return KeysReload::Unchanged;
        };
        let mut read = read_bytes(&file.path);
        if !force {
            if lock(&file.seen).as_ref() == read.as_ref().ok() {
                return KeysReload::Unchanged;
            }
            std::thread::sleep(settle);
            let again = read_bytes(&file.path);
            if again.as_ref().ok() != read.as_ref().ok() {
                return KeysReload::Unchanged;
            }
            read = again;
        }
        *lock(&file.seen) = read.as_ref().ok().cloned();
        let loaded = read.and_then(|bytes| file_keys(&file.inline, &file.path, &bytes));
        let keys = match loaded {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "API keys file: it does not load; the keys in use stay"
                );
                return KeysReload::Failed;
            }
        };
        let mut table = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let new: Arc<[Arc<Entry>]> = entries(&keys, &table, now).into();
        let labels = |from: &[Arc<Entry>], not_in: &[Arc<Entry>]| {
            from.iter()
                .filter(|e| !not_in.iter().any(|o| o.digest == e.digest))
                .map(|e| e.label.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        tracing::info!(
            file = %file.path.display(),
            keys = new.len(),
            added = labels(&new, &table),
            removed = labels(&table, &new),
            "API keys reloaded: requests from now on are checked against them"
        );
        *table = new;
        KeysReload::Loaded
    }
}

/// The entries for `keys`, reusing the limit state of those already in `old`.
fn entries(keys: &[ApiKey], old: &[Arc<Entry>], now: Instant) -> Vec<Arc<Entry>> {
    keys.iter()
        .map(|k| {
            let digest: [u8; 32] = Sha256::digest(k.key.as_bytes()).into();
            let label = match &k.name {
                Some(name) => name.clone(),
                None => format!("key-{}", hex::encode(&digest[..4])),
            };
            let limits = match old.iter().find(|e| e.digest == digest) {
                Some(e) => {
                    lock(&e.limits).retarget(k, now);
                    e.limits.clone()
                }
                None => Arc::new(Mutex::new(Limits::new(k, now))),
            };
            Arc::new(Entry {
                digest,
                label: label.into(),
                priority: k.priority,
                limits,
            })
        })
        .collect()
}

/// The `inline` keys and those of a keys file's `bytes`; an error if that makes none.
pub fn file_keys(inline: &[ApiKey], path: &Path, bytes: &[u8]) -> anyhow::Result<Vec<ApiKey>> {
    let text = std::str::from_utf8(bytes)
        .with_context(|| format!("API keys file {} is not UTF-8 text", path.display()))?;
    let mut keys = inline.to_vec();
    keys.extend(parse_keys(text).with_context(|| format!("in API keys file {}", path.display()))?);
    if keys.is_empty() {
        bail!(
            "API keys file {} has no keys: the API would be open to anyone (leave out \
             --api-keys-file for an open server)",
            path.display()
        );
    }
    Ok(keys)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the buckets inconsistent (plain numbers).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// OpenAI's duration style: `20ms`, `12s`, `1m30s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn keys_file_parses_priorities_and_limits() {
        let keys = parse_keys(
            "# team keys\n\nsk-a priority=high requests_per_minute=60\n  sk-b  images_per_minute=5 priority=low\nsk-c\n",
        )
        .unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].key, "sk-a");
        assert_eq!(keys[0].priority, Priority::High);
        assert_eq!(keys[0].requests_per_minute, Some(60));
        assert_eq!(keys[1].priority, Priority::Low);
        assert_eq!(keys[1].images_per_minute, Some(5));
        assert_eq!(keys[2].priority, Priority::Normal);
        assert!(!format!("{:?}", keys[0]).contains("sk-a"));
    }

    #[test]
    fn keys_are_labelled_by_name_or_by_fingerprint() {
        let keys = parse_keys("sk-a name=team-a\nsk-a2 name=team-a priority=high\nsk-b\n").unwrap();
        assert_eq!(keys[0].name.as_deref(), Some("team-a"));
        assert!(format!("{:?}", keys[0]).contains("team-a"));
        let auth = Authenticator::new(&keys, None, Instant::now()).unwrap();
        let label = |key: &str| {
            let c = auth
                .authenticate(&headers(Some(&format!("Bearer {key}"))))
                .unwrap();
            auth.label(&c).unwrap().to_string()
        };
        // Two keys of one team (a rotation) share its label.
        assert_eq!(label("sk-a"), "team-a");
        assert_eq!(label("sk-a2"), "team-a");
        // Unnamed: the first 4 bytes of the key's SHA-256, not the key.
        let digest = Sha256::digest(b"sk-b");
        assert_eq!(label("sk-b"), format!("key-{}", hex::encode(&digest[..4])));
        // An open server has no labels.
        let open = Authenticator::new(&[], None, Instant::now()).unwrap();
        assert_eq!(
            open.label(&open.authenticate(&headers(None)).unwrap()),
            None
        );
        for bad in [
            "name=",
            "name=tëam",
            "name=\"x\"",
            "name=team/a",
            &format!("name={}", "a".repeat(65)),
        ] {
            let e = parse_keys(&format!("sk-a {bad}")).unwrap_err();
            assert!(format!("{e:#}").contains("name must be"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn keys_file_errors_name_the_line() {
        let e = parse_keys("sk-a\nsk-b priority=urgent\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        let e = parse_keys("sk-a requests_per_minute=0").unwrap_err();
        assert!(format!("{e:#}").contains("positive integer"), "{e:#}");
        let e = parse_keys("sk-a rpm=3").unwrap_err();
        assert!(format!("{e:#}").contains("unknown setting"), "{e:#}");
    }

    #[test]
    fn open_server_lets_everyone_in_with_normal_priority() {
        let auth = Authenticator::new(&[], None, Instant::now()).unwrap();
        let caller = auth.authenticate(&headers(None)).unwrap();
        assert_eq!(caller.priority, Priority::Normal);
        assert!(auth.rate_limit_headers(&caller, Instant::now()).is_empty());
    }

    #[test]
    fn missing_and_wrong_keys_are_refused_and_the_right_one_found() {
        let mut high = ApiKey::plain("sk-high");
        high.priority = Priority::High;
        let keys = [ApiKey::plain("sk-one"), high];
        let auth = Authenticator::new(&keys, None, Instant::now()).unwrap();
        assert!(matches!(
            auth.authenticate(&headers(None)),
            Err(ApiError::MissingApiKey)
        ));
        assert!(matches!(
            auth.authenticate(&headers(Some("Basic sk-one"))),
            Err(ApiError::MissingApiKey)
        ));
        assert!(matches!(
            auth.authenticate(&headers(Some("Bearer sk-on"))),
            Err(ApiError::InvalidApiKey)
        ));
        assert!(matches!(
            auth.authenticate(&headers(Some("Bearer sk-one-more"))),
            Err(ApiError::InvalidApiKey)
        ));
        let owner = |key: &str| Some(hex::encode(&Sha256::digest(key.as_bytes())[..16]));
        let c = auth.authenticate(&headers(Some("Bearer sk-high"))).unwrap();
        assert_eq!((c.owner(), c.priority), (owner("sk-high"), Priority::High));
        let c = auth
            .authenticate(&headers(Some("bearer  sk-one ")))
            .unwrap();
        assert_eq!(c.owner(), owner("sk-one"));
        // Azure OpenAI's clients send the key as `api-key`; a bearer key, when sent, is the one
        // checked.
        let api_key = |auth_header: Option<&str>, key: &str| {
            let mut h = headers(auth_header);
            h.insert("api-key", HeaderValue::from_str(key).unwrap());
            h
        };
        let c = auth.authenticate(&api_key(None, "sk-high")).unwrap();
        assert_eq!((c.owner(), c.priority), (owner("sk-high"), Priority::High));
        let c = auth
            .authenticate(&api_key(Some("Basic x"), " sk-one"))
            .unwrap();
        assert_eq!(c.owner(), owner("sk-one"));
        assert!(matches!(
            auth.authenticate(&api_key(None, "sk-on")),
            Err(ApiError::InvalidApiKey)
        ));
        assert!(matches!(
            auth.authenticate(&api_key(None, " ")),
            Err(ApiError::MissingApiKey)
        ));
        assert!(matches!(
            auth.authenticate(&api_key(Some("Bearer sk-on"), "sk-one")),
            Err(ApiError::InvalidApiKey)
        ));
    }

    #[test]
    fn a_changed_keys_file_adds_removes_and_changes_keys_and_quotas_carry_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let t0 = Instant::now();
        let settle = Duration::ZERO;
        std::fs::write(&path, "sk-a name=team-a requests_per_minute=2\nsk-b\n").unwrap();
        let inline = [ApiKey::plain("sk-inline")];
        let auth = Authenticator::with_keys_file(&inline, &path, None, t0).unwrap();
        assert_eq!(auth.key_count(), 3);
        let bearer = |k: &str| headers(Some(&format!("Bearer {k}")));
        let a = auth.authenticate(&bearer("sk-a")).unwrap();
        let b = auth.authenticate(&bearer("sk-b")).unwrap();
        auth.consume(&a, 1, 0, t0).unwrap();
        assert_eq!(auth.reload(false, settle, t0), KeysReload::Unchanged);

        // sk-a renamed with a higher limit, sk-b gone, sk-c new.
        std::fs::write(
            &path,
            "# rotated\nsk-a name=team-x requests_per_minute=5 priority=high\nsk-c name=c\n",
        )
        .unwrap();
        assert_eq!(auth.reload(false, settle, t0), KeysReload::Loaded);
        assert_eq!(auth.key_count(), 3, "sk-inline, sk-a, sk-c");
        assert!(matches!(
            auth.authenticate(&bearer("sk-b")),
            Err(ApiError::InvalidApiKey)
        ));
        // A request of sk-b under way takes nothing more, and keeps its label.
        assert!(matches!(
            auth.consume(&b, 0, 1, t0),
            Err(ApiError::KeyRemoved)
        ));
        let b_label = format!("key-{}", hex::encode(&Sha256::digest(b"sk-b")[..4]));
        assert_eq!(auth.label(&b).as_deref(), Some(b_label.as_str()));
        assert!(auth.rate_limit_headers(&b, t0).is_empty());
        let c = auth.authenticate(&bearer("sk-c")).unwrap();
        assert_eq!(auth.label(&c).as_deref(), Some("c"));
        assert!(auth.authenticate(&bearer("sk-inline")).is_ok());
        // sk-a: the new name and priority; the one request it took still counts, under the
        // new limit, also for the request that authenticated before the reload.
        let a2 = auth.authenticate(&bearer("sk-a")).unwrap();
        assert_eq!(a2.priority, Priority::High);
        assert_eq!(auth.label(&a).as_deref(), Some("team-x"));
        assert_eq!(a.owner(), a2.owner());
        let remaining = |caller: &Caller| {
            auth.rate_limit_headers(caller, t0)
                .into_iter()
                .find(|(n, _)| n == "x-ratelimit-remaining-requests")
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(remaining(&a).as_deref(), Some("1"));
        auth.consume(&a, 1, 0, t0).unwrap();
        assert_eq!(remaining(&a2).as_deref(), Some("0"));

        // A file that does not load leaves the keys as they are, once per change.
        for bad in [&b"sk-a priority=urgent\n"[..], b"sk-a\xff\n"] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(auth.reload(false, settle, t0), KeysReload::Failed);
            assert_eq!(auth.reload(false, settle, t0), KeysReload::Unchanged);
            assert!(auth.authenticate(&bearer("sk-c")).is_ok());
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(auth.reload(false, settle, t0), KeysReload::Failed);
        assert!(auth.authenticate(&bearer("sk-c")).is_ok());
        // SIGHUP reads it in any case.
        std::fs::write(&path, "sk-d\n").unwrap();
        assert_eq!(auth.reload(true, settle, t0), KeysReload::Loaded);
        assert_eq!(auth.reload(true, settle, t0), KeysReload::Loaded);
        assert!(auth.authenticate(&bearer("sk-c")).is_err());
        assert!(auth.authenticate(&bearer("sk-d")).is_ok());
        assert!(!auth.is_open());
    }

    #[test]
    fn a_keys_file_never_leaves_the_api_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# no keys yet\n").unwrap();
        let now = Instant::now();
        let e = Authenticator::with_keys_file(&[], &path, None, now)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("has no keys"), "{e:#}");
        assert!(read_keys_file(&[], &path).is_err());
        // Nor does a reload that would leave no keys.
        std::fs::write(&path, "sk-a\n").unwrap();
        let auth = Authenticator::with_keys_file(&[], &path, None, now).unwrap();
        for empty in ["# every key commented out\n", ""] {
            std::fs::write(&path, empty).unwrap();
            assert_eq!(
                auth.reload(true, Duration::ZERO, now),
                KeysReload::Failed,
                "{empty:?}"
            );
            assert!(auth.authenticate(&headers(Some("Bearer sk-a"))).is_ok());
            assert!(matches!(
                auth.authenticate(&headers(None)),
                Err(ApiError::MissingApiKey)
            ));
        }
        // With an --api-key besides, an empty file is fine.
        let inline = [ApiKey::plain("sk-x")];
        let auth = Authenticator::with_keys_file(&inline, &path, None, now).unwrap();
        assert!(!auth.is_open());
        assert!(matches!(
            auth.authenticate(&headers(None)),
            Err(ApiError::MissingApiKey)
        ));
        std::fs::write(&path, [0xff, 0xfe, b'\n']).unwrap();
        let e = read_keys_file(&inline, &path).unwrap_err();
        assert!(format!("{e:#}").contains("not UTF-8"), "{e:#}");
    }

    /// The periodic check leaves a file that changes between its two reads (an editor writing
    /// it) for the next check.
    #[test]
    fn a_file_caught_while_it_changes_waits_for_the_next_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "sk-a\n").unwrap();
        let now = Instant::now();
        let auth = Authenticator::with_keys_file(&[], &path, None, now).unwrap();
        std::fs::write(&path, "sk-a\nsk-").unwrap();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                std::fs::write(&path, "sk-a\nsk-b\n").unwrap();
            })
        };
        // First read now ("sk-"), the second after the writer finished: they differ.
        assert_eq!(
            auth.reload(false, Duration::from_secs(3), now),
            KeysReload::Unchanged
        );
        writer.join().unwrap();
        assert!(auth.authenticate(&headers(Some("Bearer sk-"))).is_err());
        assert_eq!(auth.reload(false, Duration::ZERO, now), KeysReload::Loaded);
        assert!(auth.authenticate(&headers(Some("Bearer sk-b"))).is_ok());
    }

    #[test]
    fn trusted_priority_header_overrides_the_key() {
        let auth = Authenticator::new(&[], Some("x-priority"), Instant::now()).unwrap();
        let mut h = headers(None);
        h.insert("x-priority", HeaderValue::from_static("low"));
        assert_eq!(auth.authenticate(&h).unwrap().priority, Priority::Low);
        h.insert("x-priority", HeaderValue::from_static("bogus"));
        assert!(auth.authenticate(&h).is_err());
    }

    #[test]
    fn request_and_image_limits_refill_continuously() {
        let t0 = Instant::now();
        let mut k = ApiKey::plain("k");
        k.requests_per_minute = Some(2);
        k.images_per_minute = Some(6);
        let auth = Authenticator::new(&[k], None, t0).unwrap();
        let c = auth.authenticate(&headers(Some("Bearer k"))).unwrap();
        auth.consume(&c, 1, 4, t0).unwrap();
        // 2 images left: a request for 3 waits for one image token (10 s at 6/min).
        match auth.consume(&c, 1, 3, t0) {
            Err(ApiError::RateLimited {
                kind, retry_after, ..
            }) => {
                assert_eq!(kind, "images");
                assert_eq!(retry_after.as_secs_f64().round(), 10.0);
            }
            other => panic!("{other:?}"),
        }
        auth.consume(&c, 1, 2, t0).unwrap();
        // Requests bucket is now empty: 30 s per request at 2/min.
        match auth.consume(&c, 1, 0, t0) {
            Err(ApiError::RateLimited {
                kind, retry_after, ..
            }) => {
                assert_eq!(kind, "requests");
                assert_eq!(retry_after.as_secs_f64().round(), 30.0);
            }
            other => panic!("{other:?}"),
        }
        let hdrs = auth.rate_limit_headers(&c, t0 + Duration::from_secs(30));
        let get = |n: &str| {
            hdrs.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("x-ratelimit-limit-requests").as_deref(), Some("2"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("1"));
        assert_eq!(get("x-ratelimit-reset-requests").as_deref(), Some("30s"));
        assert_eq!(get("x-ratelimit-limit-images").as_deref(), Some("6"));
        assert_eq!(get("x-ratelimit-remaining-images").as_deref(), Some("3"));
        assert_eq!(get("x-ratelimit-reset-images").as_deref(), Some("30s"));
        auth.consume(&c, 1, 1, t0 + Duration::from_secs(30))
            .unwrap();
        // More images than the per-minute limit can never succeed: a 400, not a 429.
        assert!(matches!(
            auth.consume(&c, 0, 7, t0 + Duration::from_secs(600)),
            Err(ApiError::InvalidRequest { .. })
        ));
    }

    #[test]
    fn reset_durations_use_openai_style() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1200)), "2s");
        assert_eq!(format_reset(Duration::from_secs(90)), "1m30s");
    }
}
