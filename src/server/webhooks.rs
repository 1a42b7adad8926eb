//! OpenAI's webhook endpoints (`/v1/webhook_endpoints`, `/v1/webhook_event_types`): a key
//! registers URLs to be told when its batches end (`batch.completed`, `batch.failed`,
//! `batch.cancelled`, `batch.expired`) instead of polling `GET /v1/batches/{id}`.
//!
//! Deliveries are signed as OpenAI signs them (Standard Webhooks): `webhook-id` (the event's
//! id, the same on every retry), `webhook-timestamp`, and `webhook-signature: v1,<base64
//! HMAC-SHA256 of "id.timestamp.body">` keyed with the endpoint's `whsec_` secret (one
//! signature per secret while a rotated one is still active), which the SDKs'
//! `client.webhooks.unwrap` verifies. A delivery that does not get a 2xx back is retried with
//! exponential backoff for up to 72 hours. Each delivery is written down before its first
//! attempt and removed once it is done (delivered, given up, or its endpoint deleted): with
//! `--files-dir`, deliveries a restart interrupted go on after it, within the same 72 hours.
//!
//! Endpoints belong to the key that made them, as files and batches do, and are told of that
//! key's batches only. With `--files-dir` they are kept there (secrets included, readable by
//! the server's user only) across restarts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::Sha256;

use super::auth::Caller;
use super::batches::{BatchObject, Status};
use super::error::ApiError;
use super::files::http::{storage_error, ListParams};
use super::files::{
    blocking, new_id, read_records, sync_dir_of, unix_now, write_private_record, write_record,
    ListPage, Owner,
};
use super::metrics::{Metrics, WebhookOutcome};
use super::routes;
use super::validate::{json_kind, Fields};
use super::App;

/// The events this server sends: its batches' ends.
pub const EVENT_TYPES: &[&str] = &[
    "batch.cancelled",
    "batch.completed",
    "batch.expired",
    "batch.failed",
];

/// Endpoints one key may have.
pub const MAX_ENDPOINTS_PER_KEY: usize = 20;

/// How long a rotated secret keeps signing when asked to (`keep_old_secret_active_for_24_hours`).
const OLD_SECRET_SECS: u64 = 24 * 3600;

/// When deliveries are tried again, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The wait after the first failed attempt; each later wait doubles, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// No attempt starts later than this after the first.
    pub give_up_after: Duration,
    /// One attempt's limit, connection to response.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    /// OpenAI's: retried with exponential backoff for up to 72 hours.
    fn default() -> Self {
        RetryPolicy {
            first_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(72 * 3600),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

/// OpenAI's webhook endpoint object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookEndpoint {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub name: String,
    pub url: String,
    pub event_types: Vec<String>,
    /// The secret's last four characters, for telling secrets apart.
    pub signing_secret_hint: String,
}

/// The endpoint with its secret: only when it is created and when its secret is rotated.
#[derive(Debug, Serialize)]
pub struct WithSecret {
    #[serde(flatten)]
    pub endpoint: WebhookEndpoint,
    pub signing_secret: String,
}

/// An endpoint as kept (on disk with `--files-dir`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    endpoint: WebhookEndpoint,
    owner: Owner,
    secret: String,
    /// The secret before the last rotation and the unix time until which it still signs.
    old_secret: Option<(String, u64)>,
}

impl Stored {
    /// The secrets that sign a delivery at `now`: the current one, and a rotated one still
    /// active.
    fn secrets(&self, now: u64) -> Vec<String> {
        let mut secrets = vec![self.secret.clone()];
        if let Some((old, until)) = &self.old_secret {
            if now < *until {
                secrets.push(old.clone());
            }
        }
        secrets
    }
}

struct Inner {
    endpoints: HashMap<String, (Stored, u64)>,
    next_seq: u64,
}

/// A delivery still to be made, as kept in `pending/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    endpoint: String,
    event_id: String,
    body: String,
    /// Unix milliseconds of the event's first attempt: its retries end 72 hours after it, across
    /// restarts.
    since_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every key's webhook endpoints, and their deliveries.
pub struct Webhooks {
    dir: PathBuf,
    /// Deliveries read back at start-up, until [`Webhooks::resume`] starts them.
    interrupted: Mutex<Vec<Pending>>,
    inner: Mutex<Inner>,
    /// Held by each change of the endpoints (create, update, delete) for its whole length, its
    /// write to the disk included, so that the changes take turns; `inner` is held only to read
    /// and to apply them, so that deliveries and reads do not wait for the disk.
    changes: Mutex<()>,
    client: reqwest::Client,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
}

/// A new signing secret: `whsec_` and 32 random bytes in base64, as OpenAI's look.
fn new_secret() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// The secret's last four characters (base64: ASCII), to tell secrets apart.
fn hint(secret: &str) -> String {
    format!("whsec_...{}", &secret[secret.len().saturating_sub(4)..])
}

/// Standard Webhooks' signature of `body` sent as event `id` at `timestamp`: base64 of the
/// HMAC-SHA256 of `"{id}.{timestamp}.{body}"`, keyed with the secret's bytes (the base64
/// after `whsec_`; a secret without the prefix is used as it is).
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &str) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => engine
            .decode(b64)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    };
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC accepts any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    engine.encode(mac.finalize().into_bytes())
}

/// OpenAI's event object: `{"id", "object": "event", "created_at", "type", "data": {"id"}}`.
fn event_body(event_id: &str, kind: &str, created_at: u64, batch_id: &str) -> String {
    json!({
        "id": event_id,
        "object": "event",
        "created_at": created_at,
        "type": kind,
        "data": {"id": batch_id},
    })
    .to_string()
}

/// The event a batch's end is.
fn event_type(status: Status) -> Option<&'static str> {
    match status {
        Status::Completed => Some("batch.completed"),
        Status::Failed => Some("batch.failed"),
        Status::Cancelled => Some("batch.cancelled"),
        Status::Expired => Some("batch.expired"),
        _ => None,
    }
}

/// The certificates of `--webhook-ca-file` (PEM), for the delivery client to trust.
pub fn read_ca_file(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("--webhook-ca-file {}: cannot read it", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        anyhow::anyhow!(
            "--webhook-ca-file {}: not a readable PEM file: {e}",
            path.display()
        )
    })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "--webhook-ca-file {}: no certificate in it (expected PEM blocks BEGIN CERTIFICATE)",
        path.display()
    );
    Ok(certs)
}

impl Webhooks {
    /// Reads back the endpoints kept in `dir`, and the deliveries a restart interrupted
    /// ([`Webhooks::resume`] goes on with them). Deliveries trust the public CAs, and those of
    /// `ca_file` (`--webhook-ca-file`), which is read (a bad one said at start) even without
    /// `on_disk`: then there is no directory (see [`super::files::FileStore::without_disk`]),
    /// nothing is read back and no endpoint is ever made.
    pub fn open(
        dir: PathBuf,
        on_disk: bool,
        retry: RetryPolicy,
        ca_file: Option<&std::path::Path>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let (mut interrupted, mut stored): (Vec<Pending>, Vec<Stored>) = (Vec::new(), Vec::new());
        if on_disk {
            let pending_dir = dir.join("pending");
            std::fs::create_dir_all(&pending_dir).with_context(|| {
                format!(
                    "cannot make the webhooks directory {}",
                    pending_dir.display()
                )
            })?;
            interrupted = read_records(&pending_dir, "webhook delivery")?;
            stored = read_records(&dir, "webhook endpoint")?;
        }
        interrupted.sort_by_key(|p| p.since_ms);
        stored.sort_by(|a, b| {
            (a.endpoint.created_at, &a.endpoint.id).cmp(&(b.endpoint.created_at, &b.endpoint.id))
        });
        let mut inner = Inner {
            endpoints: HashMap::new(),
            next_seq: 0,
        };
        for s in stored {
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.endpoints.insert(s.endpoint.id.clone(), (s, seq));
        }
        let mut client = reqwest::Client::builder()
            .timeout(retry.attempt_timeout)
            .user_agent(concat!("turbine/", env!("CARGO_PKG_VERSION")))
            // A webhook answers where it is: a redirect is a failed delivery, not a new target.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = ca_file {
            for cert in read_ca_file(path)? {
                client = client.add_root_certificate(cert);
            }
        }
        let client = client.build().context("cannot build the webhook client")?;
        Ok(Webhooks {
            dir,
            interrupted: Mutex::new(interrupted),
            inner: Mutex::new(inner),
            changes: Mutex::new(()),
            client,
            retry,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn pending_path(&self, p: &Pending) -> PathBuf {
        self.dir
            .join("pending")
            .join(format!("{}.{}.json", p.event_id, p.endpoint))
    }

    /// Starts the deliveries a restart interrupted (`serve` calls it once, on its runtime).
    pub fn resume(self: &Arc<Self>) {
        let interrupted =
            std::mem::take(&mut *self.interrupted.lock().unwrap_or_else(|p| p.into_inner()));
        if !interrupted.is_empty() {
            tracing::info!(
                deliveries = interrupted.len(),
                "resuming webhook deliveries a restart interrupted"
            );
        }
        for p in interrupted {
            let this = self.clone();
            tokio::spawn(async move { this.deliver(p, true).await });
        }
    }

    /// Writes the endpoint's record, readable by the server's user only: it holds the secret.
    fn save(&self, stored: &Stored) -> std::io::Result<()> {
        write_private_record(&self.path(&stored.endpoint.id), stored)
    }

    fn get_stored(&self, owner: &Owner, id: &str) -> Result<Stored, ApiError> {
        self.lock()
            .endpoints
            .get(id)
            .filter(|(s, _)| &s.owner == owner)
            .map(|(s, _)| s.clone())
            .ok_or_else(|| no_such_endpoint(id))
    }

    /// Changes endpoint `id` of `owner` with `f` and writes it down; `f`'s `false` means
    /// nothing changed (nothing is written).
    fn modify(
        &self,
        owner: &Owner,
        id: &str,
        f: impl FnOnce(&mut Stored) -> bool,
    ) -> Result<Stored, ApiError> {
        let _turn = self.change();
        let mut changed = self.get_stored(owner, id)?;
        if f(&mut changed) {
            self.save(&changed).map_err(storage_error)?;
            if let Some((stored, _)) = self.lock().endpoints.get_mut(id) {
                *stored = changed.clone();
            }
        }
        Ok(changed)
    }

    /// The turn of one change of the endpoints (`changes`), waited for off the async runtime's
    /// workers.
    fn change(&self) -> std::sync::MutexGuard<'_, ()> {
        blocking(|| self.changes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn create(
        &self,
        owner: Owner,
        name: String,
        url: String,
        event_types: Vec<String>,
    ) -> Result<WithSecret, ApiError> {
        let _turn = self.change();
        let mine = self
            .lock()
            .endpoints
            .values()
            .filter(|(s, _)| s.owner == owner)
            .count();
        if mine >= MAX_ENDPOINTS_PER_KEY {
            return Err(ApiError::invalid(
                "url",
                "too_many_webhook_endpoints",
                format!(
                    "a key may have at most {MAX_ENDPOINTS_PER_KEY} webhook endpoints: delete \
                     one first"
                ),
            ));
        }
        let now = unix_now();
        let secret = new_secret();
        let endpoint = WebhookEndpoint {
            id: new_id("whe_"),
            object: "webhook_endpoint".into(),
            created_at: now,
            updated_at: now,
            name,
            url,
            event_types,
            signing_secret_hint: hint(&secret),
        };
        let stored = Stored {
            endpoint: endpoint.clone(),
            owner,
            secret: secret.clone(),
            old_secret: None,
        };
        self.save(&stored).map_err(storage_error)?;
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.endpoints.insert(endpoint.id.clone(), (stored, seq));
        Ok(WithSecret {
            endpoint,
            signing_secret: secret,
        })
    }

    /// The owner's endpoints, newest first.
    fn list(&self, owner: &Owner) -> Vec<WebhookEndpoint> {
        let inner = self.lock();
        let mut mine: Vec<&(Stored, u64)> = inner
            .endpoints
            .values()
            .filter(|(s, _)| &s.owner == owner)
            .collect();
        mine.sort_by_key(|(_, seq)| std::cmp::Reverse(*seq));
        mine.into_iter().map(|(s, _)| s.endpoint.clone()).collect()
    }

    fn delete(&self, owner: &Owner, id: &str) -> Result<(), ApiError> {
        let _turn = self.change();
        self.get_stored(owner, id)?;
        match std::fs::remove_file(self.path(id)) {
            // A deleted endpoint must not come back after a crash, and hear of batches again.
            Ok(()) => {
                if let Err(e) = sync_dir_of(&self.path(id)) {
                    tracing::warn!(endpoint = %id, "the endpoint is deleted, but its removal could not be made durable: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage_error(e)),
        }
        self.lock().endpoints.remove(id);
        Ok(())
    }

    /// Tells `owner`'s endpoints that listen for it that `batch` ended (a no-op while it runs).
    pub fn batch_ended(self: &Arc<Self>, owner: &Owner, batch: &BatchObject) {
        let (Some(kind), Some(at)) = (event_type(batch.status), batch.ended_at()) else {
            return;
        };
        let targets: Vec<String> = self
            .lock()
            .endpoints
            .values()
            .filter(|(s, _)| &s.owner == owner && s.endpoint.event_types.iter().any(|t| t == kind))
            .map(|(s, _)| s.endpoint.id.clone())
            .collect();
        for endpoint in targets {
            // One event per endpoint: each its own id, as each is its own delivery.
            let event_id = new_id("evt_");
            let pending = Pending {
                body: event_body(&event_id, kind, at, &batch.id),
                endpoint,
                event_id,
                since_ms: unix_ms(),
            };
            // Written down first: a restart before it is delivered makes it then.
            let written = match write_record(&self.pending_path(&pending), &pending) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(event = %pending.event_id, "cannot write down a webhook delivery (a full disk?): it is made, and written down at each retry until it can be; until then a restart loses it: {e}");
                    false
                }
            };
            tracing::debug!(batch = %batch.id, endpoint = %pending.endpoint, event = %pending.event_id, kind, "webhook queued");
            let this = self.clone();
            tokio::spawn(async move { this.deliver(pending, written).await });
        }
    }

    /// Sends the event until the endpoint answers 2xx, the retries run out, or the endpoint is
    /// deleted, then forgets it. Each attempt reads the endpoint afresh: a new URL or secret
    /// applies at once.
    async fn deliver(&self, pending: Pending, written: bool) {
        self.metrics.webhooks_pending(1);
        self.attempt_until_done(&pending, written).await;
        let _ = std::fs::remove_file(self.pending_path(&pending));
        self.metrics.webhooks_pending(-1);
    }

    /// `written`: whether `pending` is on the disk; if not (a full disk), writing it is tried
    /// again before each retry, so that a delivery that waits for its endpoint survives a
    /// restart once there is room.
    async fn attempt_until_done(&self, pending: &Pending, mut written: bool) {
        let Pending {
            endpoint: endpoint_id,
            event_id,
            body,
            since_ms,
        } = pending;
        let elapsed = || Duration::from_millis(unix_ms().saturating_sub(*since_ms));
        let mut delay = self.retry.first_delay;
        let mut attempts = 0u32;
        loop {
            let Some(stored) = self
                .lock()
                .endpoints
                .get(endpoint_id.as_str())
                .map(|(s, _)| s.clone())
            else {
                tracing::info!(endpoint = %endpoint_id, event = %event_id, "webhook endpoint deleted: delivery dropped");
                return;
            };
            attempts += 1;
            let failure = match self.send(&stored, event_id, body).await {
                Ok(status) if status.is_success() => {
                    self.metrics.webhook(WebhookOutcome::Delivered);
                    tracing::info!(endpoint = %endpoint_id, event = %event_id, attempts, "webhook delivered");
                    return;
                }
                Ok(status) => format!("the endpoint answered {status}"),
                Err(e) => format!("{e}"),
            };
            if elapsed() + delay > self.retry.give_up_after {
                self.metrics.webhook(WebhookOutcome::Abandoned);
                tracing::error!(endpoint = %endpoint_id, event = %event_id, attempts, "webhook not delivered, giving up: {failure}");
                return;
            }
            self.metrics.webhook(WebhookOutcome::Retried);
            tracing::warn!(endpoint = %endpoint_id, event = %event_id, attempts, retry_in_s = delay.as_secs_f64(), "webhook delivery failed: {failure}");
            if !written {
                written = write_record(&self.pending_path(pending), pending).is_ok();
                if written {
                    tracing::info!(event = %event_id, "the webhook delivery was written down after all");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.retry.max_delay);
        }
    }

    /// One signed POST of `body` to the endpoint; the status it answered.
    async fn send(
        &self,
        stored: &Stored,
        event_id: &str,
        body: &str,
    ) -> reqwest::Result<reqwest::StatusCode> {
        let now = unix_now();
        let signature = stored
            .secrets(now)
            .iter()
            .map(|s| format!("v1,{}", sign(s, event_id, now, body)))
            .collect::<Vec<_>>()
            .join(" ");
        let response = self
            .client
            .post(&stored.endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", event_id)
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", signature)
            .body(body.to_string())
            .send()
            .await?;
        Ok(response.status())
    }
}

fn no_such_endpoint(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).collect();
    ApiError::NotFound(format!("No such webhook endpoint: {shown}"))
}

/// `name`: 1 to 256 characters.
fn check_name(name: &str) -> Result<String, ApiError> {
    let n = name.chars().count();
    if n == 0 || n > 256 {
        return Err(ApiError::invalid(
            "name",
            "invalid_value",
            format!("name must be 1 to 256 characters, got {n}"),
        ));
    }
    Ok(name.to_string())
}

/// `url`: an absolute http(s) URL with a host and no credentials, at most 2048 bytes.
/// OpenAI takes HTTPS only; a self-hosted server's receivers are often on its own network, so
/// plain HTTP is taken too.
fn check_url(url: &str) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::invalid(
            "url",
            "invalid_url",
            format!(
                "url must be an absolute http or https URL ({why}), got {:?}",
                url.chars().take(128).collect::<String>()
            ),
        )
    };
    if url.len() > 2048 {
        return Err(bad("at most 2048 bytes"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("it needs a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("no credentials in it"));
    }
    Ok(parsed.to_string())
}

/// `event_types`: a non-empty array of the events this server sends, each once.
fn check_event_types(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = |msg: String| ApiError::invalid("event_types", "invalid_value", msg);
    let items = match value {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "event_types",
                "missing_required_parameter",
                "Missing required parameter: 'event_types'.",
            ))
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::invalid(
                "event_types",
                "invalid_type",
                format!(
                    "event_types must be an array of strings, got {}",
                    json_kind(other)
                ),
            ))
        }
    };
    if items.is_empty() {
        return Err(bad("event_types must name at least one event type".into()));
    }
    let mut types = Vec::new();
    for item in items {
        let Value::String(t) = item else {
            return Err(bad(format!(
                "event_types must be strings, got {}",
                json_kind(item)
            )));
        };
        if !EVENT_TYPES.contains(&t.as_str()) {
            return Err(bad(format!(
                "this server sends its batches' events only: event_types must be among {}, \
                 got {:?}",
                EVENT_TYPES.join(", "),
                t.chars().take(64).collect::<String>()
            )));
        }
        if types.contains(t) {
            return Err(bad(format!("{t} is listed twice")));
        }
        types.push(t.clone());
    }
    Ok(types)
}

fn limit(app: &App) -> usize {
    app.config.limits.max_body_bytes
}

/// `GET /v1/webhook_event_types`.
pub async fn event_types() -> Json<Value> {
    Json(json!({"object": "list", "data": EVENT_TYPES}))
}

/// The JSON fields of an endpoint's creation or change.
async fn endpoint_fields(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, ApiError> {
    routes::json_object(
        app,
        headers,
        body,
        limit(app),
        &["name", "url", "event_types"],
    )
    .await
}

/// `POST /v1/webhook_endpoints`: `{name, url, event_types}`; the answer holds the signing
/// secret, which is shown this once.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WithSecret>, ApiError> {
    let fields = endpoint_fields(&app, &headers, body).await?;
    let f = Fields(&fields);
    let name = check_name(f.required_string("name")?)?;
    let url = check_url(f.required_string("url")?)?;
    let event_types = check_event_types(fields.get("event_types"))?;
    let created = app
        .webhooks
        .create(caller.owner(), name, url, event_types)?;
    tracing::info!(endpoint = %created.endpoint.id, url = %created.endpoint.url, "webhook endpoint created");
    Ok(Json(created))
}

/// `GET /v1/webhook_endpoints`: newest first; `limit` (20 by default, at most 100), `after`.
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<WebhookEndpoint>>, ApiError> {
    let params = ListParams::parse(&query, (20, 100), &[])?;
    let all = app.webhooks.list(&caller.owner());
    Ok(Json(ListPage::of(
        all,
        |e| e.id.as_str(),
        params.after.as_deref(),
        params.limit,
    )))
}

/// `GET /v1/webhook_endpoints/{id}`.
pub async fn retrieve(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    routes::PathId(id): routes::PathId,
) -> Result<Json<WebhookEndpoint>, ApiError> {
    let stored = app.webhooks.get_stored(&caller.owner(), &id)?;
    Ok(Json(stored.endpoint))
}

/// `POST /v1/webhook_endpoints/{id}`: any of `name`, `url`, `event_types` (the whole new set).
/// `updated_at` moves only when something changed.
pub async fn update(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    routes::PathId(id): routes::PathId,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WebhookEndpoint>, ApiError> {
    let fields = endpoint_fields(&app, &headers, body).await?;
    let f = Fields(&fields);
    let name = f.string("name")?.map(check_name).transpose()?;
    let url = f.string("url")?.map(check_url).transpose()?;
    let event_types = match fields.get("event_types") {
        None | Some(Value::Null) => None,
        v => Some(check_event_types(v)?),
    };
    let stored = app.webhooks.modify(&caller.owner(), &id, |s| {
        let e = &mut s.endpoint;
        let before = e.clone();
        if let Some(name) = name {
            e.name = name;
        }
        if let Some(url) = url {
            e.url = url;
        }
        if let Some(types) = event_types {
            e.event_types = types;
        }
        let changed = *e != before;
        if changed {
            e.updated_at = unix_now();
        }
        changed
    })?;
    Ok(Json(stored.endpoint))
}

/// `DELETE /v1/webhook_endpoints/{id}`: deliveries still waiting for it are dropped.
pub async fn delete(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    routes::PathId(id): routes::PathId,
) -> Result<Json<Value>, ApiError> {
    app.webhooks.delete(&caller.owner(), &id)?;
    tracing::info!(endpoint = %id, "webhook endpoint deleted");
    Ok(Json(
        json!({"id": id, "object": "webhook_endpoint.deleted", "deleted": true}),
    ))
}

/// `POST /v1/webhook_endpoints/{id}/rotate_secret`: a new secret, shown this once; with
/// `keep_old_secret_active_for_24_hours` the old one signs too (a second signature) for a day.
pub async fn rotate_secret(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    routes::PathId(id): routes::PathId,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WithSecret>, ApiError> {
    let fields = routes::json_object(
        &app,
        &headers,
        body,
        limit(&app),
        &["keep_old_secret_active_for_24_hours"],
    )
    .await?;
    let keep_old = Fields(&fields)
        .boolean("keep_old_secret_active_for_24_hours")?
        .unwrap_or(false);
    let secret = new_secret();
    let stored = app.webhooks.modify(&caller.owner(), &id, |s| {
        let now = unix_now();
        let old = std::mem::replace(&mut s.secret, secret.clone());
        s.old_secret = keep_old.then(|| (old, now + OLD_SECRET_SECS));
        s.endpoint.signing_secret_hint = hint(&secret);
        s.endpoint.updated_at = now;
        true
    })?;
    tracing::info!(endpoint = %id, keep_old, "webhook secret rotated");
    Ok(Json(WithSecret {
        endpoint: stored.endpoint,
        signing_secret: secret,
    }))
}

/// `POST /v1/webhook_endpoints/{id}/test`: `{event_type}`; sends one sample event of that type
/// (a batch id that names no batch), once, and answers with the status the endpoint gave. An
/// endpoint that cannot be reached is a 400 saying why.
pub async fn test(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    routes::PathId(id): routes::PathId,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let fields = routes::json_object(&app, &headers, body, limit(&app), &["event_type"]).await?;
    let kind = Fields(&fields).required_string("event_type")?;
    if !EVENT_TYPES.contains(&kind) {
        return Err(ApiError::invalid(
            "event_type",
            "invalid_value",
            format!(
                "event_type must be one of {}, got {:?}",
                EVENT_TYPES.join(", "),
                kind.chars().take(64).collect::<String>()
            ),
        ));
    }
    let stored = app.webhooks.get_stored(&caller.owner(), &id)?;
    let event_id = new_id("evt_");
    let body = event_body(&event_id, kind, unix_now(), &new_id("batch_test_"));
    let status = app
        .webhooks
        .send(&stored, &event_id, &body)
        .await
        .map_err(|e| {
            ApiError::invalid(
                "url",
                "webhook_unreachable",
                format!(
                    "the test event could not be delivered to {}: {e}",
                    stored.endpoint.url
                ),
            )
        })?;
    Ok(Json(json!({
        "object": "webhook_endpoint.test",
        "webhook_endpoint_id": id,
        "event_type": kind,
        "status_code": status.as_u16(),
        // Delivered and taken: a receiver that answers an error did not take it.
        "success": status.is_success(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard Webhooks' reference vector (its specification's example), and the SDKs'
    /// reading of a secret without the `whsec_` prefix (its bytes as they are).
    #[test]
    fn signatures_are_standard_webhooks() {
        assert_eq!(
            sign(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                r#"{"test": 2432232314}"#
            ),
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let raw = sign("plain-secret", "evt_1", 5, "{}");
        let b64 = base64::engine::general_purpose::STANDARD.encode("plain-secret");
        assert_eq!(raw, sign(&format!("whsec_{b64}"), "evt_1", 5, "{}"));
        assert_ne!(raw, sign("plain-secret", "evt_1", 6, "{}"));
    }

    #[test]
    fn fields_are_checked() {
        assert!(check_url("https://hooks.example.com/turbine?x=1").is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        for bad in [
            "ftp://example.com/hook",
            "/relative",
            "https://user:pw@example.com/",
            "file:///etc/passwd",
            "",
        ] {
            let e = check_url(bad).unwrap_err();
            assert_eq!(e.info().status, 400, "{bad}");
        }
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(257)).is_err());
        let types = check_event_types(Some(&json!(["batch.completed", "batch.failed"]))).unwrap();
        assert_eq!(types, ["batch.completed", "batch.failed"]);
        for bad in [
            json!([]),
            json!(["response.completed"]),
            json!(["batch.completed", "batch.completed"]),
            json!("batch.completed"),
            json!([1]),
        ] {
            assert!(check_event_types(Some(&bad)).is_err(), "{bad}");
        }
        assert!(check_event_types(None).is_err());
    }

    #[test]
    fn a_rotated_secret_signs_until_its_time_is_up() {
        let stored = Stored {
            endpoint: WebhookEndpoint {
                id: "we_1".into(),
                object: "webhook_endpoint".into(),
                created_at: 0,
                updated_at: 0,
                name: "n".into(),
                url: "http://x/".into(),
                event_types: vec![],
                signing_secret_hint: String::new(),
            },
            owner: None,
            secret: "new".into(),
            old_secret: Some(("old".into(), 100)),
        };
        assert_eq!(stored.secrets(99), ["new", "old"]);
        assert_eq!(stored.secrets(100), ["new"]);
        let secret = new_secret();
        assert!(secret.starts_with("whsec_"));
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&secret[6..])
                .unwrap()
                .len(),
            32
        );
        assert_eq!(
            hint(&secret),
            format!("whsec_...{}", &secret[secret.len() - 4..])
        );
    }
}
