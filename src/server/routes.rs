//! The HTTP routes and middleware.
//!
//! Layers, outermost first: `x-request-id` (echo or create; a span per request), request
//! metrics (by route and status, errors by type), then per route: API-key check and rate
//! limits (`/v1/images/generations`, `/v1/images/edits`, `/v1/models*`, `/v1/files*`,
//! `/v1/batches*`), in-flight tracking for images (what shutdown waits for; a batch's requests
//! are not waited for, they resume after a restart). `/health`, `/metrics`, `/openapi.json` and `/v1/images/files/{id}` need no key: probes
//! and scrapers carry none, and file ids are unguessable, like OpenAI's signed URLs.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http_body_util::BodyExt;
use rand::Rng;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::api::{
    EventImage, ImageData, ImagesResponse, Model, ModelList, OutputFormat, PartialImage,
    ResponseFormat, StreamedImage, Usage,
};
use super::auth::Caller;
use super::batcher::{Item, ItemOutcome, Queue};
use super::batches;
use super::encode::{spawn_encode, EncodeTask, Encoded};
use super::error::{ApiError, BackendError, ErrorMetric, InferError};
use super::files::http as files;
use super::files::{unix_now, Owner};
use super::inputs;
use super::metrics::{DropReason, Stage};
use super::provenance::{ImageFacts, ImageMetadata, Marks, SourceType};
use super::queue::{Entry, RequestId};
use super::store::{Lookup, StoredImage};
use super::upload::{EditFiles, ImageSource};
use super::uploads;
use super::validate::{form_value, json_kind, validate, validate_edit, ValidRequest};
use super::webhooks;
use super::{lora_updates, App, Phase};
use crate::model::pipeline::{ImageRequest, Partials};

/// The `{id}` of a route. axum's own `Path` answers an id that is not UTF-8 once
/// percent-decoded (`/v1/files/%FF`) with a plain-text 400; no object has such an id, so this
/// answers it as OpenAI answers any unknown id: a 404 in the error shape.
pub struct PathId(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            Err(e) => Err(ApiError::NotFound(format!(
                "nothing has the id in {}: {}",
                parts.uri.path(),
                e.body_text()
            ))),
        }
    }
}

/// The `x-request-id` of a request (echoed from the client, or created).
#[derive(Debug, Clone)]
pub struct XRequestId(pub String);

/// Answers 503 `files_unavailable` for the routes that need the files directory when the
/// server has none (after the key is checked: a caller without one learns nothing of it).
async fn require_files(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !app.files.available() {
        return ApiError::FilesUnavailable.into_response();
    }
    next.run(req).await
}

pub fn router(app: Arc<App>) -> Router {
    let generations =
        post(generations).layer(middleware::from_fn_with_state(app.clone(), track_in_flight));
    let edits = post(edits).layer(middleware::from_fn_with_state(app.clone(), track_in_flight));
    // The routes that need the files directory (see `FileStore::available`).
    let stored = Router::new()
        .route("/v1/files", post(files::create).get(files::list))
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/uploads", post(uploads::create))
        .route("/v1/uploads/{id}/parts", post(uploads::add_part))
        .route("/v1/uploads/{id}/complete", post(uploads::complete))
        .route("/v1/uploads/{id}/cancel", post(uploads::cancel))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route(
            "/v1/webhook_endpoints",
            post(webhooks::create).get(webhooks::list),
        )
        .route(
            "/v1/webhook_endpoints/{id}",
            get(webhooks::retrieve)
                .post(webhooks::update)
                .delete(webhooks::delete),
        )
        .route(
            "/v1/webhook_endpoints/{id}/rotate_secret",
            post(webhooks::rotate_secret),
        )
        .route("/v1/webhook_endpoints/{id}/test", post(webhooks::test))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_files));
    let authed = Router::new()
        .route("/v1/images/generations", generations.clone())
        .route("/v1/images/edits", edits.clone())
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/webhook_event_types", get(webhooks::event_types))
        .merge(stored);
    // SageMaker's route for a model container's requests (see `invocations`).
    let sagemaker = Router::new().route(
        "/invocations",
        post(invocations).layer(middleware::from_fn_with_state(app.clone(), track_in_flight)),
    );
    // Azure OpenAI's paths, for clients written for its image deployments (the SDKs'
    // `AzureOpenAI`): `/openai/deployments/{deployment}/images/...`, where the deployment
    // names the model, and its v1 API, the same API as here under `/openai`.
    let azure = Router::new()
        .route(
            "/openai/deployments/{deployment}/images/generations",
            generations,
        )
        .route("/openai/deployments/{deployment}/images/edits", edits)
        .nest("/openai", authed.clone());
    let authed = authed
        .merge(azure)
        .merge(sagemaker)
        // vLLM's (`--allow-runtime-lora-updating`).
        .route("/v1/load_lora_adapter", post(lora_updates::load))
        .route("/v1/unload_lora_adapter", post(lora_updates::unload))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    let router = Router::new()
        .merge(authed)
        .route("/v1/images/files/{id}", get(get_file))
        .route("/health", get(health))
        // What load balancers check when not told otherwise: AWS's ALB, Google Cloud's and
        // Azure's Application Gateway `GET /`, HAProxy's `option httpchk` `OPTIONS /`.
        .route("/", get(health).options(health))
        // SageMaker's health check of a model container.
        .route("/ping", get(health))
        .route("/livez", get(livez))
        // This server's API as an OpenAPI document (see `openapi`): no key, as the probes'.
        .route("/openapi.json", get(openapi_document))
        .route(
            "/metrics",
            if app.config.metrics_port.is_some() {
                get(metrics_elsewhere)
            } else {
                get(metrics)
            },
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(catch_panic))
        .layer(middleware::from_fn_with_state(app.clone(), watch_body))
        .layer(middleware::from_fn_with_state(app.clone(), count_requests));
    // Without origins no CORS layer at all: no headers added, and OPTIONS stays a 405.
    let router = match cors(&app.config.cors_allow_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(middleware::from_fn(request_id))
        .with_state(app)
}

/// The response headers a browser page may read besides the simple ones: the request id to
/// quote, and the backoff and rate-limit headers the SDKs act on.
const EXPOSED_HEADERS: &[&str] = &[
    "x-request-id",
    "openai-processing-ms",
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-images",
    "x-ratelimit-remaining-images",
    "x-ratelimit-reset-images",
];

/// CORS for `--cors-allow-origin`: preflights (`OPTIONS`) are answered here, before the key is
/// checked (browsers send none on them); other responses to an allowed origin say so. No
/// origins: none, so browsers keep refusing cross-origin calls.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Checked at start-up (`ServerConfig::check`): each parses as a header value.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        // The SDKs send their own headers (`x-stainless-*`, `openai-*`) besides the key's.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(
            EXPOSED_HEADERS
                .iter()
                .map(|h| header::HeaderName::from_static(h))
                .collect::<Vec<_>>(),
        )
        .max_age(std::time::Duration::from_secs(600));
    Some(layer)
}

/// A handler that panics still answers, in OpenAI's shape, rather than closing its connection
/// with no response: 503 with `Retry-After` when the panic is the runtime failing to start a
/// thread (the process at its pids or thread limit: tokio panics where it has no thread at all
/// to run a blocking task on), 500 for anything else (a bug). Other requests are not affected
/// either way.
async fn catch_panic(req: Request, next: Next) -> Response {
    match CatchUnwind(Box::pin(next.run(req))).await {
        Ok(response) => response,
        Err(panic) => {
            let message = super::worker::panic_message(&panic);
            if message.contains("can't spawn worker thread") {
                tracing::warn!("{message}: refused the request with 503");
                ApiError::NoThreads.into_response()
            } else {
                ApiError::Panicked(message).into_response()
            }
        }
    }
}

/// A future that gives a panic of its poll back as an error.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

async fn request_id(mut req: Request, next: Next) -> Response {
    // Echo only what can go back unchanged into a header and a log line.
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let mut raw = [0u8; 16];
            rand::rng().fill(&mut raw);
            hex::encode(raw)
        });
    req.extensions_mut().insert(XRequestId(id.clone()));
    // `key`: the API key's label, once `authenticate` knows it. `client`: the address the
    // request came from, as a proxy of `--forwarded-allow-ips` says, else the connection's.
    // `adapter`: the `--lora-modules` adapter a request's `model` named, once validated.
    // `trace_id` and the `otel.*` fields: only with --otlp-endpoint (`crate::telemetry`).
    macro_rules! request_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "request",
                id = %id,
                client = tracing::field::Empty,
                key = tracing::field::Empty,
                adapter = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                otel.name = tracing::field::Empty,
                otel.kind = tracing::field::Empty,
            )
        };
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    // Probes and scrapers poll (a liveness and a readiness probe every few seconds, each
    // scrape): their spans are at `debug`, so that neither the log's lines nor the collector's
    // traces drown the API's. `/` is a load balancer's default check.
    let probe = matches!(
        path.as_str(),
        "/health" | "/livez" | "/metrics" | "/" | "/ping"
    );
    let span = if probe {
        request_span!(tracing::Level::DEBUG)
    } else {
        request_span!(tracing::Level::INFO)
    };
    let client = Forwarding::of(req.headers())
        .client
        .or_else(|| req.extensions().get::<Peer>().map(|p| p.ip));
    if let Some(client) = client {
        span.record("client", tracing::field::display(client));
    }
    crate::telemetry::start_request(&span, req.headers(), method.as_str(), &path);
    let start = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let (status, secs) = (response.status().as_u16(), start.elapsed().as_secs_f64());
    span.in_scope(|| {
        if probe {
            tracing::debug!(%method, path, status, secs, "request done")
        } else {
            tracing::info!(%method, path, status, secs, "request done")
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    // OpenAI's own timing header, which gateways log as the provider's latency: the time to the
    // response's head (for a stream, to its start).
    response.headers_mut().insert(
        "openai-processing-ms",
        HeaderValue::from(start.elapsed().as_millis() as u64),
    );
    response
}

/// What became of a request's body, as [`Watched`] saw it.
#[derive(Default)]
struct BodyState {
    /// Read to its end.
    done: AtomicBool,
    /// Went longer than `--request-body-timeout` without a byte; the reader got an error.
    stalled: AtomicBool,
    /// HTTP/1: the small rest of a body the handler dropped unread, for [`watch_body`] to read.
    unread: std::sync::Mutex<Option<Body>>,
}

fn lock_unread(state: &BodyState) -> std::sync::MutexGuard<'_, Option<Body>> {
    state.unread.lock().unwrap_or_else(|p| p.into_inner())
}

/// The most of an HTTP/1 body left unread that is read anyway to keep its connection (OpenAI's
/// JSON requests are far smaller; an upload answered early is not worth reading).
const KEEP_ALIVE_DRAIN: u64 = 64 << 10;

/// How long the response to such a request waits for the rest of its body.
const KEEP_ALIVE_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// What becomes of what the handler left of a body when it drops it unread.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// HTTP/2: read and dropped in the background.
    Drain,
    /// HTTP/1: kept for [`watch_body`] if small, else dropped (the connection then closes).
    Keep,
    Drop,
}

/// A request body that notes when it has been read to its end, and fails (once) when it goes
/// `idle` without a frame arriving.
struct Watched {
    inner: Body,
    state: Arc<BodyState>,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// What becomes of what the handler leaves unread ([`Drop`]).
    rest: Rest,
}

impl Watched {
    fn new(inner: Body, state: Arc<BodyState>, idle: Duration, rest: Rest) -> Self {
        Watched {
            inner,
            state,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            rest,
        }
    }
}

/// Over HTTP/2 a request body the handler dropped unread makes hyper reset the stream, and
/// clients (curl, for one) then drop the response that was already on its way: a 415 for a
/// large upload of the wrong type never arrives. So the rest is read and dropped in the
/// background instead, up to [`DRAIN_CAP`] bytes and while it keeps arriving. HTTP/1 reads a
/// small rest before the response, or closes the connection (see [`watch_body`]).
impl Drop for Watched {
    fn drop(&mut self) {
        if self.rest == Rest::Drop
            || self.state.done.load(Ordering::Relaxed)
            || self.state.stalled.load(Ordering::Relaxed)
        {
            return;
        }
        let inner = std::mem::replace(&mut self.inner, Body::empty());
        if self.rest == Rest::Keep {
            use http_body::Body as _;
            if inner
                .size_hint()
                .upper()
                .is_some_and(|n| n <= KEEP_ALIVE_DRAIN)
            {
                *lock_unread(&self.state) = Some(inner);
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let rest = Watched::new(inner, self.state.clone(), self.idle, Rest::Drop);
        runtime.spawn(drain(Body::new(rest), 0));
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // A reader may stop at the last frame (a form's closing boundary) without
                // asking for the end that follows it: a body whose length is used up is read.
                if frame.is_none() || self.inner.is_end_stream() {
                    self.state.done.store(true, Ordering::Relaxed);
                }
                let next = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if self.state.stalled.load(Ordering::Relaxed)
                    || self.timer.as_mut().poll(cx).is_pending()
                {
                    return Poll::Pending;
                }
                self.state.stalled.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(axum::Error::new(format!(
                    "nothing of the body arrived for {} s",
                    self.idle.as_secs()
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Watches each request's body.
///
/// A body that stalls for `--request-body-timeout` fails its reader, and whatever the handler
/// made of that becomes a 408: the client learns why, and the handler's task and in-flight
/// count do not wait on it for ever.
///
/// A request answered before its body was read (a 401, a 429 of the request limit, a 415)
/// keeps its HTTP/1 connection when the rest of the body is small: the rest (at most
/// [`KEEP_ALIVE_DRAIN`] bytes by its `Content-Length`) is read and dropped before the response
/// goes, for at most [`KEEP_ALIVE_DRAIN_WAIT`]. A gateway retrying 429s over HTTPS then pays no
/// new handshake per retry.
///
/// A response to a request whose body was still not read to its end (a larger or chunked one,
/// or a 408) closes the connection and says so. hyper does not keep such a
/// connection, but without `Connection: close` the client does not know it: it pools the
/// connection, and its next request on it fails with the connection closed under it (an error
/// the caller sees, or a retry a gateway counts against this server). That header is HTTP/1's:
/// over HTTP/2 the stall timeout holds as well, and the unread rest of the body is drained
/// rather than the stream reset (see [`Watched`]'s `Drop`).
async fn watch_body(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    use http_body::Body as _;
    // HTTP/2 sends the host as `:authority`, which hyper leaves in the URI, not as a Host
    // header: give the request one, so that what reads Host (image URLs) finds it either way.
    if !req.headers().contains_key(header::HOST) {
        let host = req.uri().authority().and_then(|a| {
            let host = match a.port() {
                Some(port) => format!("{}:{port}", a.host()),
                None => a.host().to_string(),
            };
            HeaderValue::from_str(&host).ok()
        });
        if let Some(host) = host {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    let http1 = req.version() <= axum::http::Version::HTTP_11;
    // A server leaving its balancers (`--shutdown-delay-secs`) closes its HTTP/1 connections
    // after each response, so that pooled clients reconnect, through the balancer, elsewhere.
    let leaving = http1 && app.phase() == Phase::Leaving;
    let close = |mut response: Response| {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    };
    if req.body().is_end_stream() {
        let response = next.run(req).await;
        return if leaving { close(response) } else { response };
    }
    let state = Arc::new(BodyState::default());
    let idle = app.config.limits.body_timeout;
    let (parts, inner) = req.into_parts();
    let rest = if http1 { Rest::Keep } else { Rest::Drain };
    let body = Body::new(Watched::new(inner, state.clone(), idle, rest));
    // No route reads a compressed body: refused as such (a 415, RFC 7694), not as the JSON or
    // form it does not look like. Its rest is then drained or the connection closed, as for
    // any body answered unread.
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let mut response = match encoded {
        Some(coding) => {
            drop(body);
            let mut refused = ApiError::UnsupportedEncoding(coding).into_response();
            refused.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            refused
        }
        None => next.run(Request::from_parts(parts, body)).await,
    };
    if state.stalled.load(Ordering::Relaxed) {
        response = ApiError::BodyTimeout { after: idle }.into_response();
    }
    let unread = lock_unread(&state).take();
    // A server shutting down closes the connection after this response anyway: the response
    // goes at once (the 503s of a drain that gave up have only a moment to go out).
    let going_on = matches!(app.phase(), Phase::Loading | Phase::Ready | Phase::Leaving);
    if let Some(unread) = unread.filter(|_| going_on) {
        let rest = Watched::new(unread, state.clone(), idle, Rest::Drop);
        tokio::select! {
            _ = tokio::time::timeout(KEEP_ALIVE_DRAIN_WAIT, drain(Body::new(rest), 0)) => {}
            () = app.abandoned.cancelled() => {}
        }
    }
    if leaving || (http1 && !state.done.load(Ordering::Relaxed)) {
        return close(response);
    }
    response
}

/// Records a request's duration when its response body is dropped: once hyper has written its
/// last byte, or when the client left before that.
struct Timing {
    app: Arc<App>,
    route: String,
    start: Instant,
}

impl Drop for Timing {
    fn drop(&mut self) {
        self.app
            .metrics
            .request_duration(&self.route, self.start.elapsed());
    }
}

/// Where `authenticate` leaves the label of the request's key, for [`count_requests`] to count
/// the request under once its final status is known (a 408 from [`watch_body`] included).
#[derive(Clone, Default)]
struct KeySlot(Arc<std::sync::OnceLock<Arc<str>>>);

async fn count_requests(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let span = tracing::Span::current();
    crate::telemetry::route_request(&span, req.method().as_str(), matched.as_deref());
    let route = matched.unwrap_or_else(|| "unmatched".to_string());
    let key = KeySlot::default();
    req.extensions_mut().insert(key.clone());
    let response = next.run(req).await;
    crate::telemetry::finish_request(&span, response.status().as_u16());
    app.metrics.request(&route, response.status().as_u16());
    if let Some(label) = key.0.get() {
        app.metrics.key_request(label, response.status().as_u16());
    }
    if let Some(ErrorMetric(kind)) = response.extensions().get::<ErrorMetric>() {
        app.metrics.error(kind);
    }
    let timing = Timing { app, route, start };
    // The body owns the timing: a stream's duration runs to its last event.
    response.map(|inner| {
        Body::new(Timed {
            inner,
            _timing: timing,
        })
    })
}

/// A response body that holds its request's [`Timing`] until it is dropped; otherwise the body
/// itself (its length too, so a sized response keeps its `content-length`).
struct Timed {
    inner: Body,
    _timing: Timing,
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn authenticate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let caller = match app.auth.authenticate(req.headers()) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Some(label) = app.auth.label(&caller) {
        tracing::Span::current().record("key", &*label);
        if let Some(KeySlot(slot)) = req.extensions().get::<KeySlot>() {
            let _ = slot.set(label);
        }
    }
    let mut response = match app.auth.consume(&caller, 1, 0, Instant::now()) {
        Ok(()) => {
            req.extensions_mut().insert(caller.clone());
            next.run(req).await
        }
        Err(e) => e.into_response(),
    };
    for (name, value) in app.auth.rate_limit_headers(&caller, Instant::now()) {
        response.headers_mut().insert(name, value);
    }
    response
}

async fn track_in_flight(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let _in_flight = app.enter();
    next.run(req).await
}

/// `/health`'s word for each phase.
fn phase_status(phase: Phase) -> &'static str {
    match phase {
        Phase::Ready => "ok",
        Phase::Loading => "loading",
        Phase::ShuttingDown | Phase::Leaving => "shutting_down",
        Phase::Failed => "device_failed",
    }
}

/// Readiness: 200 only while the server takes requests.
async fn health(State(app): State<Arc<App>>) -> Response {
    let phase = app.phase();
    let status = match phase {
        Phase::Ready => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let text = phase_status(phase);
    let mut body = serde_json::json!({ "status": text });
    // With several devices the server keeps serving on the others; it says which stopped.
    let failed = app.health.failed();
    if !failed.is_empty() {
        body["failed_devices"] = failed
            .iter()
            .map(|d| serde_json::json!({ "device": d.device, "message": d.message }))
            .collect();
    }
    (status, Json(body)).into_response()
}

/// Liveness: 200 while the process does what it should, loading (a download of the weights
/// included) and draining too, so that a liveness check (Kubernetes' `livenessProbe`, a
/// container health check) does not restart a server for being busy starting or stopping;
/// 503 once every device failed (the server is exiting to be restarted anyway).
async fn livez(State(app): State<Arc<App>>) -> Response {
    let phase = app.phase();
    let status = match phase {
        Phase::Failed => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    (
        status,
        Json(serde_json::json!({ "status": phase_status(phase) })),
    )
        .into_response()
}

async fn openapi_document(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(super::openapi::document(&app))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// `/metrics` on the API's port when `--metrics-port` serves them: not here, where whoever
/// reaches the API would read every key's name and use.
async fn metrics_elsewhere() -> ApiError {
    ApiError::NotFound(
        "metrics are served on the metrics port (--metrics-port), not on the API's".into(),
    )
}

/// The metrics port's (`--metrics-port`) router: `GET /metrics`, and nothing else.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(catch_panic))
        .layer(middleware::from_fn(request_id))
        .with_state(app)
}

/// `id`'s model object; an adapter's (`--lora-modules`, or loaded while serving) names the
/// model it adapts as its `parent`, as vLLM lists its LoRA modules.
fn model_object(app: &App, id: &str) -> Model {
    let model = &app.config.model;
    Model {
        id: id.to_string(),
        object: "model".into(),
        created: app.started,
        owned_by: "turbine".into(),
        parent: matches!(model.resolve(id), Some(Some(_))).then(|| model.id.clone()),
    }
}

async fn list_models(State(app): State<Arc<App>>) -> Json<ModelList> {
    let model = &app.config.model;
    let adapters = model.adapters.names();
    let data = model
        .listed()
        .chain(adapters.iter().map(String::as_str))
        .map(|id| model_object(&app, id))
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

async fn get_model(
    State(app): State<Arc<App>>,
    PathId(id): PathId,
) -> Result<Json<Model>, ApiError> {
    if app.config.model.resolve(&id).is_some() {
        Ok(Json(model_object(&app, &id)))
    } else {
        Err(ApiError::ModelNotFound(id))
    }
}

/// Keeps `image` for a `url` response; its id. Images that had to go unfetched to make room
/// are counted, and said in a warning at most once a minute. With `--image-store-dir` it is
/// written there too before its URL goes out (a failure there is warned about, not the
/// request's: this server still has it).
async fn store_url_image(
    app: &App,
    bytes: Bytes,
    format: OutputFormat,
    now: Instant,
) -> Result<String, ApiError> {
    let image = StoredImage {
        bytes: bytes.clone(),
        content_type: format.content_type(),
    };
    let id = keep_url_image(app, image, now)?;
    if let Some(dir) = &app.image_dir {
        let _ = dir.put(&id, format, bytes).await;
    }
    Ok(id)
}

fn keep_url_image(app: &App, image: StoredImage, now: Instant) -> Result<String, ApiError> {
    let mut store = app.store.lock().unwrap_or_else(|p| p.into_inner());
    let (id, made) = store
        .insert(image, now)
        .map_err(|e| InferError::Store(e.to_string()))?;
    app.metrics.image_store(&store);
    if made.unfetched > 0 && store.warning_due(now) {
        let lost = store.evictions().unfetched;
        let kept = made.kept_for.unwrap_or_default().as_secs_f64();
        drop(store);
        tracing::warn!(
            images_lost = lost,
            kept_secs = kept,
            "images behind url responses were evicted before anyone fetched them, after \
             {kept:.1} s of the {} s their URLs promise: --image-store-max-bytes ({} MiB) \
             holds no more at this rate. Raise it, fetch url images sooner, or ask for \
             b64_json ({lost} lost so far)",
            app.config.store.ttl.as_secs(),
            app.config.store.max_bytes >> 20,
        );
    }
    Ok(id)
}

async fn get_file(
    State(app): State<Arc<App>>,
    method: Method,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let found = {
        let mut store = app.store.lock().unwrap_or_else(|p| p.into_inner());
        let found = store.get(&id, Instant::now(), method != Method::HEAD);
        app.metrics.image_store(&store);
        found
    };
    // Not here: another server's (or an earlier process's), or evicted from memory, but in
    // --image-store-dir.
    let from_dir = match (&found, &app.image_dir) {
        (Lookup::Found(..), _) | (_, None) => None,
        (_, Some(dir)) => dir.get(&id).await,
    };
    let (image, left) = match (found, from_dir) {
        (_, Some(f)) => (
            StoredImage {
                bytes: f.bytes,
                content_type: f.content_type,
            },
            f.left,
        ),
        (Lookup::Found(image, left), None) => (image, left),
        (Lookup::Evicted, None) => {
            return Err(ApiError::NotFound(format!(
                "image {id:?} is gone: it was evicted before anyone fetched it, within its \
                 time, to make room for newer images (--image-store-max-bytes is full at this \
                 rate). Fetch url images as they come, or ask for b64_json"
            )))
        }
        (Lookup::Missing, None) => {
            let elsewhere = if app.image_dir.is_some() {
                ""
            } else {
                "; behind a load balancer, only the server that made an image has it, unless \
                 the servers share --image-store-dir"
            };
            return Err(ApiError::NotFound(format!(
                "no image with id {id:?} (images behind url responses expire after {} s{elsewhere})",
                app.config.store.ttl.as_secs()
            )));
        }
    };
    let cache = format!("private, max-age={}, immutable", left.as_secs());
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(image.content_type),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_str(&cache).expect("an ASCII header value"),
            ),
        ],
        image.bytes,
    )
        .into_response())
}

async fn not_found(uri: Uri) -> ApiError {
    if uri.path() == "/v1/images/variations" {
        // The SDKs still have `images.create_variation`; say what to use instead.
        return ApiError::NotFound(
            "/v1/images/variations is not served: OpenAI retired it with dall-e-2. Send the \
             image to /v1/images/edits with a prompt (and the strength extension) to make a \
             variation of it"
                .into(),
        );
    }
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// Requests are refused before their body is read unless the server is serving.
fn check_serving(app: &App) -> Result<(), ApiError> {
    match app.phase() {
        Phase::Ready | Phase::Leaving => Ok(()),
        Phase::Loading => Err(InferError::NotReady.into()),
        Phase::ShuttingDown => Err(InferError::ShuttingDown.into()),
        Phase::Failed => Err(app.device_failed().into()),
    }
}

async fn generations(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    deployment: Option<Path<String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_serving(&app)?;
    check_json_content_type(&headers)?;
    let body = read_body(&app, body, &headers, app.config.limits.max_body_bytes).await?;
    let value = parse_json(&body.bytes)?;
    generation(
        &app,
        &caller,
        &headers,
        (value, body),
        deployment.map(|Path(d)| d),
    )
    .await
}

/// A generation run from its JSON body, parsed and as read: both (the bytes and their share of
/// the input budget) are let go once it is validated, not held while its images are made.
/// `deployment` (Azure's path) names the model over the body's `model`.
async fn generation(
    app: &Arc<App>,
    caller: &Caller,
    headers: &HeaderMap,
    (mut value, body): (serde_json::Value, Buffered),
    deployment: Option<String>,
) -> Result<Response, ApiError> {
    if let (Some(deployment), Some(fields)) = (deployment, value.as_object_mut()) {
        name_deployment(fields, deployment)?;
    }
    let req = validate(&value, &app.config.limits, &app.config.model)?;
    drop((value, body));
    app.auth.consume(caller, 0, req.n, Instant::now())?;
    run_request(app, caller, headers, req).await
}

/// Azure's deployment as the request's `model`, over the body's, which must still be a string
/// (or null) as on the other routes: a client sending something else has a bug to hear of.
fn name_deployment(
    fields: &mut serde_json::Map<String, serde_json::Value>,
    deployment: String,
) -> Result<(), ApiError> {
    super::validate::Fields(fields).string("model")?;
    fields.insert("model".into(), deployment.into());
    Ok(())
}

/// SageMaker's inference route (`POST /invocations`, what `InvokeEndpoint` and its async
/// variant call; no key comes with it unless the server has keys and the caller sends one): a
/// multipart body is an edit, a JSON body with `image` or `images` an edit, any other JSON body
/// a generation (SageMaker's clients often label JSON `application/octet-stream`).
async fn invocations(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if content_type_is(&headers, "multipart/form-data") {
        return edits(State(app), Extension(caller), None, headers, body).await;
    }
    check_serving(&app)?;
    let limits = &app.config.limits;
    // An edit's JSON carries its image: read up to the uploads' bound, then hold a generation
    // to its own.
    let body = read_body(
        &app,
        body,
        &headers,
        limits.max_upload_bytes.max(limits.max_body_bytes),
    )
    .await?;
    let value = parse_json(&body.bytes)?;
    if value.get("image").is_some() || value.get("images").is_some() {
        let Buffered { bytes, share } = body;
        drop(bytes);
        let input = JsonEdit::parse(value)?
            .resolve(&app, &caller.owner())
            .await?;
        return edit(&app, &caller, &headers, input, share, None).await;
    }
    if body.bytes.len() > limits.max_body_bytes {
        return Err(ApiError::PayloadTooLarge {
            limit: limits.max_body_bytes,
        });
    }
    generation(&app, &caller, &headers, (value, body), None).await
}

/// `POST /v1/images/edits`: OpenAI's multipart form (`image`, `prompt`, and the generation
/// fields as text), run as SDXL-Turbo image-to-image, or inpainting with a `mask`. The input
/// image (PNG, JPEG or WebP; its alpha channel dropped) is resized to the request's `size`, or
/// kept at its aspect ratio.
async fn edits(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    deployment: Option<Path<String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_serving(&app)?;
    let limit = app.config.limits.max_upload_bytes;
    let (input, body_share) = if content_type_is(&headers, "application/json") {
        let body = read_body(&app, body, &headers, limit).await?;
        let edit = JsonEdit::parse(parse_json(&body.bytes)?)?;
        (edit.resolve(&app, &caller.owner()).await?, body.share)
    } else {
        let boundary = multipart_boundary(
            &headers,
            "multipart/form-data with a boundary, or application/json",
        )?;
        let body = read_body(&app, body, &headers, limit).await?;
        let form = EditForm::parse(body.bytes, boundary).await?;
        (form.into_input()?, body.share)
    };
    edit(
        &app,
        &caller,
        &headers,
        input,
        body_share,
        deployment.map(|Path(d)| d),
    )
    .await
}

/// An edit's input (its body's share of the input budget kept until its image is decoded)
/// run; `deployment` (Azure's path) names the model over the fields' `model`.
async fn edit(
    app: &Arc<App>,
    caller: &Caller,
    headers: &HeaderMap,
    mut input: EditInput,
    body_share: inputs::Held,
    deployment: Option<String>,
) -> Result<Response, ApiError> {
    input.shares.push(body_share);
    if let Some(deployment) = deployment {
        name_deployment(&mut input.fields, deployment)?;
    }
    let req = prepare_edit(app, input, |req| {
        // The key's image quota before the decoding work, as for a generation before its
        // queueing.
        app.auth.consume(caller, 0, req.n, Instant::now())
    })
    .await?;
    run_request(app, caller, headers, req).await
}

/// An edit's fields and files made a request: the files' headers checked, the fields
/// validated against them, `admit` asked (the key's quota), then the upload decoded in a slot of
/// the bounded decoder. Waiting for a slot holds only the upload's bytes; the slot is given back
/// once the upload is decoded (moved into the blocking task), not held while queued.
pub(super) async fn prepare_edit(
    app: &App,
    input: EditInput,
    admit: impl FnOnce(&ValidRequest) -> Result<(), ApiError>,
) -> Result<ValidRequest, ApiError> {
    // Its shares of the input budget are given back when this returns: the upload decoded.
    let EditInput {
        fields,
        uploads,
        shares: _shares,
    } = input;
    let dims = uploads.files().check()?;
    let mut req = validate_edit(
        &serde_json::Value::Object(fields),
        dims,
        &app.config.limits,
        &app.config.model,
    )?;
    admit(&req)?;
    let (w, h) = (req.width, req.height);
    let decode_failed = |e: String| InferError::Encode {
        format: "the input image",
        message: e,
    };
    let slot = unless_abandoned(app, async {
        let slot = app.upload_decodes.clone().acquire_owned().await;
        slot.map_err(|e| decode_failed(e.to_string()).into())
    })
    .await?;
    let init = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        uploads.files().init_image(dims, w, h)
    })
    .await
    .map_err(|e| decode_failed(e.to_string()))??;
    if let Some(edit) = req.edit.as_mut() {
        edit.image = Some(init);
    }
    Ok(req)
}

/// What an edit sends, from either body: its fields as JSON values, and its files.
pub(super) struct EditInput {
    pub(super) fields: serde_json::Map<String, serde_json::Value>,
    pub(super) uploads: EditUploads,
    /// The shares of the input budget taken by its body and the files it names, held until
    /// [`prepare_edit`] has decoded `uploads`.
    pub(super) shares: Vec<inputs::Held>,
}

/// An edit's files as received: its image, and its mask or markup.
pub(super) struct EditUploads {
    image: Bytes,
    mask: Option<Bytes>,
    markup: Option<Bytes>,
}

impl EditUploads {
    fn files(&self) -> EditFiles<'_> {
        EditFiles {
            image: &self.image,
            mask: self.mask.as_deref(),
            markup: self.markup.as_deref(),
        }
    }
}

/// OpenAI's JSON edit as received: its fields and its image references, the files among them
/// not read yet.
pub(super) struct JsonEdit {
    fields: serde_json::Map<String, serde_json::Value>,
    image: ImageSource,
    mask: Option<ImageSource>,
    markup: Option<ImageSource>,
}

/// The purposes of the files an image reference may name (OpenAI's for image inputs).
const IMAGE_FILE_PURPOSES: &[&str] = &["vision", "user_data"];

impl JsonEdit {
    /// `images`, one image reference (`{"image_url": "data:..."}` or `{"file_id": ...}`), an
    /// optional `mask` or `markup` reference, and the other fields as for a form.
    pub(super) fn parse(value: serde_json::Value) -> Result<Self, ApiError> {
        let serde_json::Value::Object(mut fields) = value else {
            return Err(ApiError::NotAnObject(json_kind(&value)));
        };
        let images =
            match fields.remove("images") {
                Some(serde_json::Value::Array(images)) => images,
                Some(_) => return Err(ApiError::invalid(
                    "images",
                    "invalid_type",
                    "images must be an array of image references ({\"image_url\": \"data:...\"} \
                     or {\"file_id\": \"file-...\"})",
                )),
                None => Vec::new(),
            };
        let image =
            match images.as_slice() {
                [one] => super::upload::image_reference("images", one)?,
                [] => return Err(ApiError::invalid(
                    "images",
                    "missing_required_parameter",
                    "images is required: one image reference, {\"image_url\": \"data:image/png;\
                     base64,...\"} or {\"file_id\": \"file-...\"}",
                )),
                more => {
                    return Err(ApiError::invalid(
                        "images",
                        "invalid_value",
                        format!(
                            "this server edits one image per request, got {}: send each in a \
                         request of its own",
                            more.len()
                        ),
                    ))
                }
            };
        let mut reference = |name: &str| match fields.remove(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(r) => super::upload::image_reference(name, &r).map(Some),
        };
        let (mask, markup) = (reference("mask")?, reference("markup")?);
        Ok(JsonEdit {
            fields,
            image,
            mask,
            markup,
        })
    }

    /// Reads the references that name files: the owner's, of purpose vision or user_data, at
    /// most `--max-upload-bytes` (as an upload would be).
    pub(super) async fn resolve(self, app: &App, owner: &Owner) -> Result<EditInput, ApiError> {
        let mut shares = Vec::new();
        let mut read = async |param: &'static str, source: ImageSource| {
            let id = match source {
                ImageSource::Inline(bytes) => return Ok(Bytes::from(bytes)),
                ImageSource::File(id) => id,
            };
            let bad = |m: String| ApiError::invalid(param, "invalid_value", m);
            let file = app
                .files
                .get(owner, &id, unix_now())
                .map_err(|e| bad(format!("{param}: {e}")))?;
            if !IMAGE_FILE_PURPOSES.contains(&file.purpose.as_str()) {
                return Err(bad(format!(
                    "{param}: file {id} has purpose {}; images are uploaded with purpose vision \
                     or user_data",
                    file.purpose
                )));
            }
            let limit = app.config.limits.max_upload_bytes;
            if file.bytes > limit as u64 {
                return Err(bad(format!(
                    "{param}: file {id} is {} bytes; an image may have at most {limit}",
                    file.bytes
                )));
            }
            shares.push(unless_abandoned(app, app.inputs.hold(file.bytes)).await?);
            tokio::fs::read(app.files.path(&id))
                .await
                .map(Bytes::from)
                .map_err(super::files::http::storage_error)
        };
        let image = read("images", self.image).await?;
        let mask = match self.mask {
            Some(m) => Some(read("mask", m).await?),
            None => None,
        };
        let markup = match self.markup {
            Some(m) => Some(read("markup", m).await?),
            None => None,
        };
        Ok(EditInput {
            fields: self.fields,
            uploads: EditUploads {
                image,
                mask,
                markup,
            },
            shares,
        })
    }
}

/// An edit's multipart form: its text fields (as JSON values, [`form_value`]) and its files.
struct EditForm {
    fields: serde_json::Map<String, serde_json::Value>,
    images: Vec<Bytes>,
    masks: Vec<Bytes>,
    markups: Vec<Bytes>,
}

impl EditForm {
    async fn parse(body: Bytes, boundary: String) -> Result<Self, ApiError> {
        let bad = |e: multer::Error| {
            ApiError::invalid(
                "body",
                "invalid_multipart",
                format!("could not read the multipart form: {e}"),
            )
        };
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut multipart = multer::Multipart::new(stream, boundary);
        let mut form = EditForm {
            fields: serde_json::Map::new(),
            images: Vec::new(),
            masks: Vec::new(),
            markups: Vec::new(),
        };
        while let Some(field) = multipart.next_field().await.map_err(bad)? {
            let name = field.name().unwrap_or_default().to_string();
            if name.len() > 64 {
                // Never echoed: no field of the API has a name this long.
                return Err(ApiError::invalid(
                    "body",
                    "unknown_parameter",
                    format!(
                        "a form field has a name of {} bytes; none of this API's is over 64",
                        name.len()
                    ),
                ));
            }
            match name.as_str() {
                "image" | "image[]" => form.images.push(field.bytes().await.map_err(bad)?),
                "mask" => form.masks.push(field.bytes().await.map_err(bad)?),
                "markup" => form.markups.push(field.bytes().await.map_err(bad)?),
                _ if field.file_name().is_some() => {
                    return Err(ApiError::invalid(
                        &name,
                        "unknown_parameter",
                        format!(
                            "unexpected file field {name}: send the image to edit as image, and \
                             its mask as mask or its markup as markup"
                        ),
                    ))
                }
                _ => {
                    let bytes = field.bytes().await.map_err(bad)?;
                    let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                        ApiError::invalid(
                            &name,
                            "invalid_value",
                            format!("{name} must be UTF-8 text"),
                        )
                    })?;
                    if form
                        .fields
                        .insert(name.clone(), form_value(&name, &text))
                        .is_some()
                    {
                        return Err(ApiError::invalid(
                            &name,
                            "invalid_value",
                            format!("{name} was given more than once"),
                        ));
                    }
                }
            }
        }
        Ok(form)
    }

    fn into_input(self) -> Result<EditInput, ApiError> {
        Ok(EditInput {
            uploads: EditUploads {
                image: self.image()?,
                mask: at_most_one("mask", &self.masks)?,
                markup: at_most_one("markup", &self.markups)?,
            },
            fields: self.fields,
            shares: Vec::new(),
        })
    }

    /// The one input image.
    fn image(&self) -> Result<Bytes, ApiError> {
        match self.images.as_slice() {
            [image] => Ok(image.clone()),
            [] => Err(ApiError::invalid(
                "image",
                "missing_required_parameter",
                "image is required: send the image to edit as a file field named image",
            )),
            more => Err(ApiError::invalid(
                "image",
                "invalid_value",
                format!(
                    "this server edits one image per request, got {}: send each in a request \
                     of its own",
                    more.len()
                ),
            )),
        }
    }
}

/// The one file sent as `name`, if any.
fn at_most_one(name: &str, files: &[Bytes]) -> Result<Option<Bytes>, ApiError> {
    match files {
        [] => Ok(None),
        [file] => Ok(Some(file.clone())),
        more => Err(ApiError::invalid(
            name,
            "invalid_value",
            format!("one {name} per request, got {}", more.len()),
        )),
    }
}

/// The boundary of a `multipart/form-data` body, or a 415 that says the route takes `expected`.
pub(super) fn multipart_boundary(
    headers: &HeaderMap,
    expected: &'static str,
) -> Result<String, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE);
    ct.and_then(|v| v.to_str().ok())
        .filter(|_| content_type_is(headers, "multipart/form-data"))
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| ApiError::UnsupportedMediaType {
            got: ct.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            expected,
        })
}

/// A validated request (a generation, or an edit with its decoded image) whose images the key's
/// limit has taken, queued and answered: JSON with every image, or an event stream.
async fn run_request(
    app: &Arc<App>,
    caller: &Caller,
    headers: &HeaderMap,
    req: ValidRequest,
) -> Result<Response, ApiError> {
    if let Some(name) = req
        .adapter
        .as_ref()
        .and_then(|a| app.config.model.adapters.name_of(a.slot()))
    {
        tracing::Span::current().record("adapter", tracing::field::display(name));
    }
    let (seed, token_count) = start_request(app, caller, &req);
    if req.stream {
        return stream_images(app, caller, req, seed, token_count);
    }
    let base = (req.response_format == ResponseFormat::Url).then(|| url_base(app, headers));
    let response = images_response(app, caller, &req, seed, token_count, base.as_deref()).await?;
    Ok(Json(response).into_response())
}

/// The request's first seed (drawn when it has none), logged with the request; and its prompt's
/// token count, counted alongside the generation.
pub(super) fn start_request(
    app: &App,
    caller: &Caller,
    req: &ValidRequest,
) -> (u64, tokio::task::JoinHandle<ReadPrompt>) {
    // 32-bit random seeds: easy to read back and type in again.
    let seed = req
        .seed
        .unwrap_or_else(|| rand::rng().random_range(0..=u64::from(u32::MAX)));
    tracing::info!(
        user = req.user.as_deref().unwrap_or(""),
        n = req.n,
        width = req.width,
        height = req.height,
        steps = req.steps,
        seed,
        priority = caller.priority.as_str(),
        strength = req.edit.as_ref().map(|e| e.strength),
        "{}",
        if req.edit.is_some() {
            "editing"
        } else {
            "generating"
        }
    );
    // Tokenising a 32000-character prompt takes milliseconds: off the async workers.
    let tokens = app.tokens.clone();
    let metrics = app.metrics.clone();
    let (prompt, negative) = (req.prompt.clone(), req.negative_prompt.clone());
    let read = tokio::task::spawn_blocking(move || {
        let read = |s: &str| tokens.as_ref().map_or_else(Default::default, |t| t(s));
        let positive = read(&prompt);
        let negative = if negative.is_empty() {
            Default::default()
        } else {
            read(&negative)
        };
        let revised_prompt = positive.read_up_to.map(|end| prompt[..end].to_string());
        if revised_prompt.is_some() {
            metrics.prompt_truncated();
        }
        ReadPrompt {
            tokens: (positive.count + negative.count) as u64,
            revised_prompt,
        }
    });
    (seed, read)
}

/// A request's prompts as CLIP reads them: their tokens (for `usage`), and, when the prompt is
/// longer than CLIP reads (75 tokens), the part it read: the images' `revised_prompt`, OpenAI's
/// field for "the prompt that was used to generate the image", so that a client sees what was
/// cut off. diffusers cuts the same way, with a warning in its log.
#[derive(Debug, Clone, Default)]
pub(super) struct ReadPrompt {
    pub(super) tokens: u64,
    pub(super) revised_prompt: Option<String>,
}

/// Generates a (non-streamed) request's images and makes its response: base64 images, or with
/// `url_base` URLs of images kept in the store.
pub(super) async fn images_response(
    app: &Arc<App>,
    caller: &Caller,
    req: &ValidRequest,
    seed: u64,
    read: tokio::task::JoinHandle<ReadPrompt>,
    url_base: Option<&str>,
) -> Result<ImagesResponse, ApiError> {
    let encoded = generate(app, caller, req, seed).await?;
    let read = read.await.unwrap_or_default();
    let now = Instant::now();
    let mut data = Vec::with_capacity(encoded.len());
    for (i, task) in encoded.into_iter().enumerate() {
        let (out, took) = task.finish().await?;
        app.metrics.stage(Stage::ImageEncode, took);
        let (b64_json, url) = match (out, url_base) {
            (Encoded::Base64(text), _) => (Some(text), None),
            (Encoded::Bytes(bytes), Some(base)) => {
                let id = store_url_image(app, Bytes::from(bytes), req.output_format, now).await?;
                (None, Some(format!("{base}/v1/images/files/{id}")))
            }
            (Encoded::Bytes(_), None) => {
                return Err(InferError::Store(
                    "no URL base for a url response (this is a bug)".into(),
                )
                .into())
            }
        };
        data.push(ImageData {
            b64_json,
            url,
            revised_prompt: read.revised_prompt.clone(),
            seed: seed + i as u64,
        });
    }
    let text_tokens = read.tokens;
    Ok(ImagesResponse {
        created: unix_now(),
        data,
        background: "opaque".into(),
        output_format: req.output_format.as_str().into(),
        quality: req.quality.into(),
        size: format!("{}x{}", req.width, req.height),
        usage: usage(req, text_tokens, req.n),
        safety_identifier: req.user.clone(),
    })
}

/// While a request waits for its images: when dropped before `done`, its images still in the
/// queue are dropped (the client went away, the request timed out or already failed).
struct QueuedRequest {
    queue: Arc<Queue>,
    id: RequestId,
    /// Why the remaining images are dropped if this guard drops now; `None` once all came back.
    reason: Option<DropReason>,
}

impl Drop for QueuedRequest {
    fn drop(&mut self) {
        if let Some(reason) = self.reason {
            let n = self.queue.cancel(self.id, reason);
            if n > 0 {
                tracing::info!(
                    images = n,
                    ?reason,
                    "dropped queued images of an unfinished request"
                );
            }
        }
    }
}

/// A request's images, queued: where they come back, and what drops those still queued if the
/// request goes away first.
struct Submitted {
    rx: mpsc::UnboundedReceiver<ItemOutcome>,
    guard: QueuedRequest,
    deadline: Instant,
}

/// What image `seed` of `req` states about itself in its file (`--image-metadata`).
fn image_marks(app: &App, req: &ValidRequest, seed: u64) -> Option<Marks> {
    let level = app.config.image_metadata;
    if level == ImageMetadata::None {
        return None;
    }
    let adapter = req
        .adapter
        .as_ref()
        .and_then(|a| app.config.model.adapters.name_of(a.slot()));
    let facts = ImageFacts {
        model: &app.config.model.id,
        adapter: adapter.as_deref(),
        source: SourceType::of(req.edit.as_ref().and_then(|e| e.image.as_ref())),
        prompt: &req.prompt,
        negative_prompt: &req.negative_prompt,
        seed,
        steps: req.edit.as_ref().map_or(req.steps, |e| e.schedule_steps),
        guidance_scale: req.guidance_scale,
        width: req.width,
        height: req.height,
        strength: req.edit.as_ref().map(|e| e.strength),
    };
    Marks::new(level, &facts)
}

/// Queues the request's `n` images (image i seeded `seed + i`).
fn submit(
    app: &Arc<App>,
    caller: &Caller,
    req: &ValidRequest,
    seed: u64,
) -> Result<Submitted, ApiError> {
    let n = req.n as usize;
    let now = Instant::now();
    let deadline = now + app.config.batching.request_timeout;
    let id = app.next_request_id();
    let key = req.key();
    let (tx, rx) = mpsc::unbounded_channel::<ItemOutcome>();
    // Validation allows previews only with `stream`.
    let previews = usize::from(req.partial_images);
    let entries = (0..n)
        .map(|i| Entry {
            request: id,
            key,
            priority: caller.priority,
            enqueued: now,
            deadline,
            payload: Item {
                index: i,
                image: ImageRequest {
                    prompt: req.prompt.clone(),
                    negative_prompt: req.negative_prompt.clone(),
                    seed: seed + i as u64,
                    init_image: req.edit.as_ref().and_then(|e| e.image.clone()),
                    partials: (previews > 0).then(|| {
                        let tx = tx.clone();
                        Partials::new(previews, move |k, image| {
                            let _ = tx.send(ItemOutcome {
                                index: i,
                                result: Ok(image),
                                partial: Some(k),
                            });
                        })
                    }),
                },
                reply: tx.clone(),
                span: tracing::Span::current(),
                run: tracing::Span::none(),
            },
        })
        .collect();
    // Only the queued items hold senders now (their previews' sinks too): `recv` ends if they
    // all disappear.
    drop(tx);
    app.queue.submit(entries)?;
    Ok(Submitted {
        rx,
        guard: QueuedRequest {
            queue: app.queue.clone(),
            id,
            reason: Some(DropReason::ClientDisconnected),
        },
        deadline,
    })
}

/// Queues the request's images and starts encoding each one as it comes back.
async fn generate(
    app: &Arc<App>,
    caller: &Caller,
    req: &ValidRequest,
    seed: u64,
) -> Result<Vec<EncodeTask>, ApiError> {
    let n = req.n as usize;
    let timeout = app.config.batching.request_timeout;
    let Submitted {
        mut rx,
        mut guard,
        deadline,
    } = submit(app, caller, req, seed)?;

    let base64 = req.response_format == ResponseFormat::B64Json;
    let key = app.auth.label(caller);
    let mut tasks: Vec<Option<EncodeTask>> = (0..n).map(|_| None).collect();
    let collect = async {
        let mut left = n;
        while left > 0 {
            match rx.recv().await {
                // Previews are for streams only; none is asked for here.
                Some(ItemOutcome {
                    partial: Some(_), ..
                }) => continue,
                Some(ItemOutcome {
                    index,
                    result: Ok(image),
                    partial: None,
                }) => {
                    left -= 1;
                    if let Some(key) = &key {
                        app.metrics.key_images(key, 1);
                    }
                    if let Some(slot) = tasks.get_mut(index) {
                        *slot = Some(spawn_encode(
                            image,
                            req.output_format,
                            req.output_compression,
                            image_marks(app, req, seed + index as u64),
                            base64,
                        ));
                    }
                }
                Some(ItemOutcome { result: Err(e), .. }) => return Err(ApiError::from(e)),
                None if Instant::now() >= deadline => break,
                None => return Err(BackendError::WorkerGone.into()),
            }
        }
        Ok(())
    };
    let collected = tokio::select! {
        collected = tokio::time::timeout_at(deadline.into(), collect) => collected,
        () = app.abandoned.cancelled() => {
            guard.reason = Some(DropReason::Shutdown);
            return Err(InferError::StoppedFirst.into());
        }
    };
    match collected {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            guard.reason = Some(DropReason::RequestFailed);
            return Err(e);
        }
        Err(_) => {
            guard.reason = Some(DropReason::Timeout);
            return Err(InferError::Timeout { after: timeout }.into());
        }
    }
    let tasks: Option<Vec<EncodeTask>> = tasks.into_iter().collect();
    match tasks {
        Some(tasks) => {
            guard.reason = None;
            Ok(tasks)
        }
        None => {
            guard.reason = Some(DropReason::Timeout);
            Err(InferError::Timeout { after: timeout }.into())
        }
    }
}

/// `stream: true`: the images as server-sent events, one `image_generation.completed` per image
/// as soon as it is generated and encoded (in the order they finish), with OpenAI's fields plus
/// the `seed` extension. Once the events have started, an error (a failed batch, the request's
/// timeout) is an `error` event carrying OpenAI's error body, and the stream ends. A client that
/// goes away drops its images still in the queue, as for any request.
fn stream_images(
    app: &Arc<App>,
    caller: &Caller,
    req: ValidRequest,
    seed: u64,
    token_count: tokio::task::JoinHandle<ReadPrompt>,
) -> Result<Response, ApiError> {
    let submitted = submit(app, caller, &req, seed)?;
    let stream = ImageStream {
        app: app.clone(),
        key: app.auth.label(caller),
        // The response outlives the handler: shutdown waits for the stream, not the handler.
        _in_flight: app.enter(),
        submitted,
        left: req.n as usize,
        previews: vec![Some(0); req.n as usize],
        req,
        seed,
        token_count: TokenCount::Pending(token_count),
        ended: false,
        span: tracing::Span::current(),
    };
    let events = futures_util::stream::unfold(stream, |mut s| async move {
        let event = s.next_event().await?;
        Some((Ok::<_, std::convert::Infallible>(event), s))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    // nginx (and proxies that follow it) hold a proxied response's small writes until a buffer
    // fills: the headers and the keep-alive comments would reach the client only with the first
    // image, and a client or balancer in front with a read timeout shorter than the queue's wait
    // gives up on a stream that is alive. This header turns that buffering off for the response.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// A server-sent event named `kind` with `body` as its JSON data.
fn event(kind: &str, body: &impl serde::Serialize) -> Result<Event, (DropReason, ApiError)> {
    Event::default().event(kind).json_data(body).map_err(|e| {
        (
            DropReason::RequestFailed,
            InferError::Encode {
                format: "an event",
                message: e.to_string(),
            }
            .into(),
        )
    })
}

/// The prompt's token count for `usage`, counted alongside the generation.
enum TokenCount {
    Pending(tokio::task::JoinHandle<ReadPrompt>),
    Done(u64),
}

/// What a streamed request still waits for.
struct ImageStream {
    app: Arc<App>,
    /// The label its images are counted under (`None` on an open server).
    key: Option<Arc<str>>,
    _in_flight: super::InFlight,
    submitted: Submitted,
    /// Images not sent yet.
    left: usize,
    /// Per image, the index of the next preview to send, `None` once the image was sent. An
    /// image's batch that runs again (in parts, after running out of memory) makes its previews
    /// again: those already sent are skipped.
    previews: Vec<Option<usize>>,
    req: ValidRequest,
    seed: u64,
    token_count: TokenCount,
    /// An error event was sent: nothing follows it.
    ended: bool,
    /// The request's span (its id), for what is logged after the handler returned.
    span: tracing::Span,
}

impl ImageStream {
    /// The next event, or `None` once every image (or an error) was sent.
    async fn next_event(&mut self) -> Option<Event> {
        if self.ended || self.left == 0 {
            return None;
        }
        let deadline = self.submitted.deadline;
        let timeout = self.app.config.batching.request_timeout;
        let outcome = loop {
            let outcome = tokio::select! {
                outcome = tokio::time::timeout_at(deadline.into(), self.submitted.rx.recv()) => {
                    outcome
                }
                () = self.app.abandoned.cancelled() => {
                    self.ended = true;
                    self.submitted.guard.reason = Some(DropReason::Shutdown);
                    return Some(self.error_event(&InferError::StoppedFirst.into()));
                }
            };
            if let Ok(Some(ItemOutcome {
                index,
                result: Ok(_),
                partial: Some(k),
            })) = &outcome
            {
                match self.previews.get_mut(*index) {
                    Some(Some(next)) if *next == *k => *next += 1,
                    // Sent already, or its image was.
                    _ => continue,
                }
            }
            break outcome;
        };
        let result = match outcome {
            Ok(Some(ItemOutcome {
                index,
                result: Ok(image),
                partial: Some(k),
            })) => match self.preview(index, k, image).await {
                // Not an image: `left` stays.
                Ok(event) => return Some(event),
                Err(e) => Err(e),
            },
            Ok(Some(ItemOutcome {
                index,
                result: Ok(image),
                partial: None,
            })) => {
                if let Some(slot) = self.previews.get_mut(index) {
                    *slot = None;
                }
                if let Some(key) = &self.key {
                    self.app.metrics.key_images(key, 1);
                }
                self.completed(index, image).await
            }
            Ok(Some(ItemOutcome { result: Err(e), .. })) => {
                Err((DropReason::RequestFailed, e.into()))
            }
            Ok(None) if Instant::now() < deadline => {
                Err((DropReason::RequestFailed, BackendError::WorkerGone.into()))
            }
            Ok(None) | Err(_) => Err((
                DropReason::Timeout,
                InferError::Timeout { after: timeout }.into(),
            )),
        };
        match result {
            Ok(event) => {
                self.left -= 1;
                if self.left == 0 {
                    self.submitted.guard.reason = None;
                }
                Some(event)
            }
            Err((reason, e)) => {
                self.ended = true;
                self.submitted.guard.reason = Some(reason);
                Some(self.error_event(&e))
            }
        }
    }

    /// Image `index`'s preview `k` as a `partial_image` event.
    async fn preview(
        &mut self,
        index: usize,
        k: usize,
        image: image::RgbImage,
    ) -> Result<Event, (DropReason, ApiError)> {
        let body = PartialImage {
            kind: self.kind("image_generation.partial_image", "image_edit.partial_image"),
            image: self.event_image(index, image).await?,
            partial_image_index: k,
        };
        self.app.metrics.partial_image();
        event(body.kind, &body)
    }

    async fn completed(
        &mut self,
        index: usize,
        image: image::RgbImage,
    ) -> Result<Event, (DropReason, ApiError)> {
        let image = self.event_image(index, image).await?;
        let text_tokens = match &mut self.token_count {
            TokenCount::Done(n) => *n,
            TokenCount::Pending(handle) => {
                let n = handle.await.map_or(0, |read| read.tokens);
                self.token_count = TokenCount::Done(n);
                n
            }
        };
        let req = &self.req;
        let body = StreamedImage {
            kind: self.kind("image_generation.completed", "image_edit.completed"),
            image,
            usage: usage(req, text_tokens, 1),
            safety_identifier: req.user.clone(),
        };
        event(body.kind, &body)
    }

    /// The event type for a generation, or for an edit.
    fn kind(&self, generation: &'static str, edit: &'static str) -> &'static str {
        if self.req.edit.is_some() {
            edit
        } else {
            generation
        }
    }

    /// Image `index`, encoded, with what every event says of it.
    async fn event_image(
        &self,
        index: usize,
        image: image::RgbImage,
    ) -> Result<EventImage, (DropReason, ApiError)> {
        let failed = |e: ApiError| (DropReason::RequestFailed, e);
        let req = &self.req;
        let marks = image_marks(&self.app, req, self.seed + index as u64);
        let (out, took) = spawn_encode(
            image,
            req.output_format,
            req.output_compression,
            marks,
            true,
        )
        .finish()
        .await
        .map_err(|e| failed(e.into()))?;
        self.app.metrics.stage(Stage::ImageEncode, took);
        let Encoded::Base64(b64_json) = out else {
            return Err(failed(
                InferError::Encode {
                    format: "base64",
                    message: "the encoder returned bytes (this is a bug)".into(),
                }
                .into(),
            ));
        };
        Ok(EventImage {
            b64_json,
            created_at: unix_now(),
            size: format!("{}x{}", req.width, req.height),
            quality: req.quality,
            background: "opaque",
            output_format: req.output_format.as_str(),
            seed: self.seed + index as u64,
        })
    }

    /// OpenAI's error body as an `error` event (the SDKs raise it as an API error), counted and
    /// logged like an error response.
    fn error_event(&self, e: &ApiError) -> Event {
        let info = e.info();
        self.app.metrics.error(info.metric);
        self.span.in_scope(|| {
            tracing::error!(
                status = info.status.as_u16(),
                "the stream ends with an error: {e}"
            )
        });
        let mut body = serde_json::to_value(e.body()).unwrap_or_default();
        body["type"] = "error".into();
        Event::default()
            .event("error")
            .json_data(&body)
            .unwrap_or_else(|_| Event::default().event("error").data("{}"))
    }
}

/// `usage` for `n` of the request's images; an edit also counts its input image, once per
/// image made from it, as one token per 8x8 patch like the output.
fn usage(req: &ValidRequest, text_tokens: u64, n: u32) -> Usage {
    let mut usage = Usage::new(text_tokens, n, req.width, req.height);
    if req.edit.is_some() {
        let input = usage.output_tokens;
        usage.input_tokens += input;
        usage.input_tokens_details.image_tokens += input;
        usage.total_tokens += input;
    }
    usage
}

/// Whether the request's `Content-Type` is `mime` (parameters such as `charset` aside).
fn content_type_is(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(mime))
}

pub(super) fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    if content_type_is(headers, "application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType {
            got: headers
                .get(header::CONTENT_TYPE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            expected: "application/json",
        })
    }
}

/// A request body as JSON.
pub(super) fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::InvalidJson(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })
}

/// The JSON object of a request's body, of at most `limit` bytes, whose fields are all among
/// `known` (anything else is refused, as OpenAI does, rather than ignored). An empty body is
/// an empty object: a POST whose fields are all optional may send none.
pub(super) async fn json_object(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    known: &[&str],
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let body = read_body(app, body, headers, limit).await?;
    if body.bytes.is_empty() {
        return Ok(serde_json::Map::new());
    }
    check_json_content_type(headers)?;
    let value = parse_json(&body.bytes)?;
    let serde_json::Value::Object(fields) = value else {
        return Err(ApiError::NotAnObject(json_kind(&value)));
    };
    if let Some(k) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        let shown: String = k.chars().take(64).collect();
        return Err(ApiError::invalid(
            &shown,
            "unknown_parameter",
            format!("Unknown parameter: '{shown}'."),
        ));
    }
    Ok(fields)
}

/// A body over the limit is still read and dropped up to this many bytes, so a client that is
/// still sending receives the 413 instead of a connection reset; past it the connection closes.
const DRAIN_CAP: usize = 16 << 20;

/// The body's length as its `Content-Length` declares it, if it does.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// A request's body read whole, with its share of `--max-buffered-input-bytes`: keep the
/// share for as long as what was read (or made of it) is held.
pub(super) struct Buffered {
    pub(super) bytes: Bytes,
    pub(super) share: inputs::Held,
}

/// `work`, unless a shutdown gives up on the requests under way first (its grace ran out, or a
/// second stop signal came): then the 503 that says so, in the time kept for answering.
pub(super) async fn unless_abandoned<T>(
    app: &App,
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::select! {
        done = work => done,
        () = app.abandoned.cancelled() => Err(InferError::StoppedFirst.into()),
    }
}

/// Reads at most `limit` bytes: a larger declared or actual body is a 413, never buffered.
/// Before a byte is read, the body takes its share of the input budget ([`inputs`]): what its
/// `Content-Length` declares, or `limit` when it declares none (a chunked body). A body still
/// arriving, or waiting for its share, when a shutdown gives up is answered 503 then.
pub(super) async fn read_body(
    app: &App,
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Buffered, ApiError> {
    unless_abandoned(app, read_body_whole(app, body, headers, limit)).await
}

async fn read_body_whole(
    app: &App,
    mut body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Buffered, ApiError> {
    use http_body::Body as _;
    let declared = declared_length(headers);
    if declared.is_some_and(|len| len > limit as u64) {
        if declared.is_some_and(|len| len <= DRAIN_CAP as u64) {
            drain(body, 0).await;
        }
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let expected = if body.is_end_stream() {
        0
    } else {
        declared.unwrap_or(limit as u64)
    };
    let share = app.inputs.hold(expected).await?;
    // Its whole length at once: growing by doubling would hold up to twice it meanwhile.
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::InvalidJson(format!("could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                drain(body, buf.len() + data.len()).await;
                return Err(ApiError::PayloadTooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Buffered {
        bytes: Bytes::from(buf),
        share,
    })
}

async fn drain(mut body: Body, mut seen: usize) {
    while seen <= DRAIN_CAP {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// The headers in which a proxy says who the client is and how it reached the server: RFC
/// 7239's, and the de-facto `X-Forwarded-*` ones. Requests keep them only from a peer of
/// `--forwarded-allow-ips`.
pub(crate) const FORWARDING_HEADERS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-prefix",
];

/// Where a connection comes from; each of its requests carries it as an extension.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    /// Its address (an IPv4 peer of an IPv6 socket as its IPv4 address).
    pub ip: std::net::IpAddr,
    /// Whether it may say who the client is and how it reached the server (a proxy of
    /// `--forwarded-allow-ips`); if not, what its requests say so is removed
    /// ([`FORWARDING_HEADERS`]).
    pub forwarded: bool,
}

/// How the client reached the server, as the proxy nearest to it says (the first element or
/// value of each header: later ones are added by the proxies after it). A value that is not a
/// scheme, a host or a path is not used.
#[derive(Debug, Default, PartialEq)]
struct Forwarding {
    /// The client's address, for the log (an obfuscated or `unknown` one is not used).
    client: Option<std::net::IpAddr>,
    proto: Option<&'static str>,
    host: Option<String>,
    /// The path the proxy serves the API under (`/images`), without a trailing slash.
    prefix: Option<String>,
}

impl Forwarding {
    /// RFC 7239's `Forwarded` (`for=`, `proto=` and `host=` of its first element) where it
    /// says them, else `X-Forwarded-For`, `-Proto` and `-Host`; `X-Forwarded-Prefix` either way.
    fn of(headers: &HeaderMap) -> Self {
        let first = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let proto = |v: &str| match v.to_ascii_lowercase().as_str() {
            "http" => Some("http"),
            "https" => Some("https"),
            _ => None,
        };
        let host = |v: &str| {
            let ok = v.len() <= 261
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
            ok.then(|| v.to_string())
        };
        // `203.0.113.9`, `203.0.113.9:4711`, `"[2001:db8::1]:4711"`, `2001:db8::1`.
        let node = |v: &str| {
            let v = v.trim_matches('"');
            let ip = match v.strip_prefix('[') {
                Some(rest) => rest.split(']').next().unwrap_or_default(),
                None if v.matches(':').count() == 1 => v.split(':').next().unwrap_or_default(),
                None => v,
            };
            ip.parse::<std::net::IpAddr>().ok()
        };
        let (mut f_client, mut f_proto, mut f_host) = (None, None, None);
        if let Some(element) = first("forwarded") {
            for pair in element.split(';') {
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    "for" => f_client = node(value),
                    "proto" => f_proto = proto(value),
                    "host" => f_host = host(value),
                    _ => {}
                }
            }
        }
        let (proto, host) = if f_proto.is_some() || f_host.is_some() {
            (f_proto, f_host)
        } else {
            (
                first("x-forwarded-proto").and_then(proto),
                first("x-forwarded-host").and_then(host),
            )
        };
        let prefix = first("x-forwarded-prefix")
            .filter(|p| {
                p.starts_with('/')
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~/%".contains(&b))
            })
            .map(|p| p.trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty());
        Forwarding {
            client: f_client.or_else(|| first("x-forwarded-for").and_then(node)),
            proto,
            host,
            prefix,
        }
    }
}

/// `--public-url`; or the scheme and host the client used (as a trusted proxy says, else
/// `http://`, `https://` when the server speaks it, and the `Host` header), with the proxy's
/// path prefix.
fn url_base(app: &App, headers: &HeaderMap) -> String {
    if let Some(base) = &app.config.public_url {
        return base.trim_end_matches('/').to_string();
    }
    let forwarding = Forwarding::of(headers);
    let host = forwarding.host.unwrap_or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost")
            .to_string()
    });
    let scheme = forwarding.proto.unwrap_or(if app.config.tls.is_some() {
        "https"
    } else {
        "http"
    });
    let prefix = forwarding.prefix.unwrap_or_default();
    format!("{scheme}://{host}{prefix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        headers
    }

    /// What makes the URLs (the client is checked apart).
    fn forwarding(pairs: &[(&'static str, &str)]) -> Forwarding {
        Forwarding {
            client: None,
            ..Forwarding::of(&headers(pairs))
        }
    }

    /// What a proxy says of how the client reached the server: the nearest proxy's word (the
    /// first element or value), RFC 7239 before `X-Forwarded-*`, and nothing that is not a
    /// scheme, a host or a path.
    #[test]
    fn forwarding_headers_are_read_as_the_nearest_proxy_wrote_them() {
        let f =
            |proto: Option<&'static str>, host: Option<&str>, prefix: Option<&str>| Forwarding {
                client: None,
                proto,
                host: host.map(String::from),
                prefix: prefix.map(String::from),
            };
        assert_eq!(forwarding(&[]), Forwarding::default());
        assert_eq!(
            forwarding(&[
                ("x-forwarded-proto", "https, http"),
                ("x-forwarded-host", "img.example.com, 10.0.0.7:8000"),
                ("x-forwarded-prefix", "/images/"),
            ]),
            f(Some("https"), Some("img.example.com"), Some("/images"))
        );
        assert_eq!(
            forwarding(&[
                (
                    "forwarded",
                    "for=192.0.2.60;Proto=HTTPS;host=\"img.example.com:8443\", for=10.0.0.1"
                ),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "other.example.com"),
            ]),
            f(Some("https"), Some("img.example.com:8443"), None)
        );
        // A Forwarded that says neither leaves the X-Forwarded-* headers their say.
        assert_eq!(
            forwarding(&[
                ("forwarded", "for=192.0.2.60"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "[2001:db8::1]:443"),
            ]),
            f(Some("https"), Some("[2001:db8::1]:443"), None)
        );
        assert_eq!(
            forwarding(&[
                ("x-forwarded-proto", "javascript"),
                ("x-forwarded-host", "evil.example.com/path?x"),
                ("x-forwarded-prefix", "images"),
            ]),
            Forwarding::default()
        );
        assert_eq!(
            forwarding(&[("x-forwarded-prefix", "/a b")]),
            Forwarding::default()
        );
        assert_eq!(
            forwarding(&[("x-forwarded-prefix", "/")]),
            Forwarding::default()
        );

        // The client, for the log.
        let client = |pairs: &[(&'static str, &str)]| Forwarding::of(&headers(pairs)).client;
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(
            client(&[("x-forwarded-for", "203.0.113.9, 10.0.0.2")]),
            ip("203.0.113.9")
        );
        assert_eq!(
            client(&[("x-forwarded-for", "203.0.113.9:4711")]),
            ip("203.0.113.9")
        );
        assert_eq!(
            client(&[("x-forwarded-for", "2001:db8::1")]),
            ip("2001:db8::1")
        );
        assert_eq!(
            client(&[
                ("forwarded", "for=\"[2001:db8::1]:4711\";proto=https"),
                ("x-forwarded-for", "198.51.100.1")
            ]),
            ip("2001:db8::1")
        );
        // An obfuscated or unknown node says nothing; X-Forwarded-For then may.
        assert_eq!(
            client(&[
                ("forwarded", "for=_hidden"),
                ("x-forwarded-for", "198.51.100.1")
            ]),
            ip("198.51.100.1")
        );
        assert_eq!(client(&[("x-forwarded-for", "unknown")]), None);
    }

    /// A handler that panics is answered in OpenAI's shape: 503 with `Retry-After` when the
    /// runtime could not start a thread, 500 naming the panic otherwise.
    async fn no_thread() -> &'static str {
        panic!("OS can't spawn worker thread: Resource temporarily unavailable")
    }

    async fn bug() -> &'static str {
        panic!("index out of bounds")
    }

    #[tokio::test]
    async fn a_panicking_handler_still_answers() {
        let app = Router::new()
            .route("/threads", get(no_thread))
            .route("/bug", get(bug))
            .route("/fine", get(|| async { "fine" }))
            .layer(middleware::from_fn(catch_panic));
        let call = |path: &'static str| {
            let app = app.clone();
            async move {
                let r = app
                    .oneshot(Request::get(path).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get(header::RETRY_AFTER)
                    .map(|v| v.to_str().unwrap().to_string());
                let body = r.into_body().collect().await.unwrap().to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                (status, retry, v)
            }
        };
        let (status, retry, v) = call("/threads").await;
        assert_eq!((status, retry.as_deref()), (503, Some("1")), "{v}");
        assert_eq!(v["error"]["code"], "server_overloaded");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit on threads"));
        let (status, retry, v) = call("/bug").await;
        assert_eq!((status, retry), (500, None), "{v}");
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(index out of bounds)"));
        let (status, _, _) = call("/fine").await;
        assert_eq!(status, 200);
    }
}
