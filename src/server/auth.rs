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

use std::path::Path;
use std::sync::Mutex;
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
pub fn read_keys_file(path: &Path) -> anyhow::Result<Vec<ApiKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read API keys file {}", path.display()))?;
    parse_keys(&text).with_context(|| format!("in API keys file {}", path.display()))
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

struct Entry {
    digest: [u8; 32],
    /// The key's `name`, or `key-` + the first 8 hex digits of its SHA-256.
    label: std::sync::Arc<str>,
    priority: Priority,
    limits: Mutex<Limits>,
}

/// Who sent a request (for an open server: nobody in particular).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Index of the key, `None` on an open server.
    key: Option<usize>,
    /// The first half of the key's SHA-256: names the owner of its files and batches on disk,
    /// the same across restarts and reordered key files, without storing the key.
    fingerprint: Option<[u8; 16]>,
    pub priority: Priority,
}

impl Caller {
    /// Whose files and batches this caller sees: those of its key (`None` on an open server).
    pub fn owner(&self) -> Option<String> {
        self.fingerprint.map(hex::encode)
    }
}

/// The configured keys and their limit state.
pub struct Authenticator {
    entries: Vec<Entry>,
    priority_header: Option<HeaderName>,
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
        let entries = keys
            .iter()
            .map(|k| {
                let digest: [u8; 32] = Sha256::digest(k.key.as_bytes()).into();
                let label = match &k.name {
                    Some(name) => name.clone(),
                    None => format!("key-{}", hex::encode(&digest[..4])),
                };
                Entry {
                    digest,
                    label: label.into(),
                    priority: k.priority,
                    limits: Mutex::new(Limits {
                        requests: k.requests_per_minute.map(|l| Bucket::new(l, now)),
                        images: k.images_per_minute.map(|l| Bucket::new(l, now)),
                    }),
                }
            })
            .collect();
        Ok(Authenticator {
            entries,
            priority_header,
        })
    }

    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the caller's requests and usage are labelled with: its key's name or fingerprint
    /// label; `None` on an open server.
    pub fn label(&self, caller: &Caller) -> Option<std::sync::Arc<str>> {
        caller.key.map(|i| self.entries[i].label.clone())
    }

    /// Checks the `Authorization: Bearer KEY` header and the trusted priority header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let mut caller = if self.is_open() {
            Caller {
                key: None,
                fingerprint: None,
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
                .ok_or(ApiError::MissingApiKey)?;
            let index = self.lookup(presented).ok_or(ApiError::InvalidApiKey)?;
            let digest = &self.entries[index].digest;
            let mut fingerprint = [0u8; 16];
            fingerprint.copy_from_slice(&digest[..16]);
            Caller {
                key: Some(index),
                fingerprint: Some(fingerprint),
                priority: self.entries[index].priority,
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
                fingerprint: None,
                priority: Priority::Normal,
            }),
            Some(hex_print) => self.entries.iter().enumerate().find_map(|(i, e)| {
                (hex::encode(&e.digest[..16]) == *hex_print).then(|| {
                    let mut fingerprint = [0u8; 16];
                    fingerprint.copy_from_slice(&e.digest[..16]);
                    Caller {
                        key: Some(i),
                        fingerprint: Some(fingerprint),
                        priority: Priority::Normal,
                    }
                })
            }),
        }
    }

    /// Compares the presented key's SHA-256 with every configured key's, in constant time and
    /// without early exit, so neither timing nor key length tells how close a guess was.
    fn lookup(&self, presented: &str) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            let hit = e.digest.ct_eq(&digest);
            found = u64::conditional_select(&found, &(i as u64 + 1), hit);
        }
        (found > 0).then(|| found as usize - 1)
    }

    /// Takes `requests` requests and `images` images from the caller's buckets, or nothing if
    /// either would go below zero. The middleware takes the request (every request counts, as
    /// at OpenAI); the handler takes the images once it knows `n`.
    pub fn consume(
        &self,
        caller: &Caller,
        requests: u32,
        images: u32,
        now: Instant,
    ) -> Result<(), ApiError> {
        let Some(index) = caller.key else {
            return Ok(());
        };
        let mut limits = lock(&self.entries[index].limits);
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
        let Some(index) = caller.key else {
            return Vec::new();
        };
        let mut limits = lock(&self.entries[index].limits);
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
        let c = auth.authenticate(&headers(Some("Bearer sk-high"))).unwrap();
        assert_eq!((c.key, c.priority), (Some(1), Priority::High));
        let c = auth
            .authenticate(&headers(Some("bearer  sk-one ")))
            .unwrap();
        assert_eq!(c.key, Some(0));
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
