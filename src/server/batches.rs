//! OpenAI's Batch API for image requests: `POST /v1/batches` over an uploaded JSONL file of
//! `/v1/images/generations` or `/v1/images/edits` requests, `GET /v1/batches[/{id}]`,
//! `POST /v1/batches/{id}/cancel`; the results come back as an output file (and an error file)
//! of the Files API, one JSON line per request, as at OpenAI.
//!
//! A batch is background work: its images enter the same queue as everyone's, at priority
//! `low`, and all running batches together hold at most [`App::batch_slots`] requests in
//! flight, so interactive requests keep the queue's capacity and go first (until a batch image
//! has waited past the priority aging, so batches never starve). A request that meets a full
//! queue or times out in it is retried, with its seed kept, until the batch's completion window
//! ends; the key's images-per-minute limit is waited for, not failed. A line that is invalid
//! (bad fields, an undecodable image) fails alone, into the error file.
//!
//! Statuses: `validating` (every line read: JSON, a unique `custom_id`, `POST`, the batch's
//! `url`, a `body`; any error fails the batch with the lines at fault) → `in_progress` →
//! `finalizing` → `completed`; `cancelling` → `cancelled` and `expired` keep what finished, and
//! list every request that did not run in the error file (`batch_cancelled`, `batch_expired`).
//! Batches live in memory: a restart ends them with the files.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Seek};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::api::ImagesResponse;
use super::auth::Caller;
use super::error::{ApiError, InferError};
use super::files::http::{expires_after, storage_error, ListParams};
use super::files::{new_id, no_such_file, unix_now, FileObject, ListPage, Owner, DEFAULT_TTL_SECS};
use super::metrics::BatchRequestOutcome;
use super::queue::Priority;
use super::validate::{json_kind, validate, ValidRequest};
use super::{routes, App, Phase};

/// The endpoints a batch may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Generations,
    Edits,
}

impl Endpoint {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "/v1/images/generations" => Some(Endpoint::Generations),
            "/v1/images/edits" => Some(Endpoint::Edits),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Generations => "/v1/images/generations",
            Endpoint::Edits => "/v1/images/edits",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// One reason a batch failed validation (OpenAI's `BatchError`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LineError {
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line of the input file.
    pub line: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchErrors {
    pub object: &'static str,
    pub data: Vec<LineError>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CachedTokens {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReasoningTokens {
    pub reasoning_tokens: u64,
}

/// The batch's tokens so far: the sums of its images' `usage`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BatchUsage {
    pub input_tokens: u64,
    pub input_tokens_details: CachedTokens,
    pub output_tokens: u64,
    pub output_tokens_details: ReasoningTokens,
    pub total_tokens: u64,
}

/// OpenAI's batch object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: &'static str,
    pub model: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: &'static str,
    pub status: Status,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub usage: BatchUsage,
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// How a batch's run ended, for its final status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Done,
    Cancelled,
    Expired,
}

impl BatchObject {
    pub fn start(&mut self, now: u64, total: u64) {
        if self.status == Status::Validating {
            self.status = Status::InProgress;
        }
        self.in_progress_at = Some(now);
        self.request_counts.total = total;
    }

    pub fn fail(&mut self, now: u64, errors: Vec<LineError>) {
        self.status = Status::Failed;
        self.failed_at = Some(now);
        self.errors = Some(BatchErrors {
            object: "list",
            data: errors,
        });
    }

    /// Asked to cancel: from `validating` or `in_progress`, `cancelling` (what runs finishes);
    /// again while cancelling, nothing changes. A batch past that cannot be cancelled.
    pub fn cancel(&mut self, now: u64) -> Result<(), ApiError> {
        match self.status {
            Status::Validating | Status::InProgress => {
                self.status = Status::Cancelling;
                self.cancelling_at = Some(now);
                Ok(())
            }
            Status::Cancelling => Ok(()),
            other => Err(ApiError::invalid(
                "batch_id",
                "invalid_state",
                format!("Cannot cancel a batch with status '{}'.", other.as_str()),
            )),
        }
    }

    pub fn finalizing(&mut self, now: u64) {
        if self.status == Status::InProgress {
            self.status = Status::Finalizing;
        }
        self.finalizing_at = Some(now);
    }

    pub fn finish(&mut self, now: u64, ending: Ending) {
        let (status, at) = match ending {
            _ if self.status == Status::Cancelling => (Status::Cancelled, &mut self.cancelled_at),
            Ending::Cancelled => (Status::Cancelled, &mut self.cancelled_at),
            Ending::Expired => (Status::Expired, &mut self.expired_at),
            Ending::Done => (Status::Completed, &mut self.completed_at),
        };
        *at = Some(now);
        self.status = status;
    }

    /// Counts one request's outcome; `usage` for one that made images.
    pub fn record(&mut self, ok: bool, usage: Option<&super::api::Usage>) {
        if ok {
            self.request_counts.completed += 1;
        } else {
            self.request_counts.failed += 1;
        }
        if let Some(u) = usage {
            self.usage.input_tokens += u.input_tokens;
            self.usage.output_tokens += u.output_tokens;
            self.usage.total_tokens += u.total_tokens;
        }
    }
}

struct Entry {
    object: BatchObject,
    owner: Owner,
    seq: u64,
    cancel: CancellationToken,
}

/// Every batch of this process, by id.
#[derive(Default)]
pub struct Batches {
    inner: Mutex<(HashMap<String, Entry>, u64)>,
}

impl Batches {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Entry>, u64)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, object: BatchObject, owner: Owner, cancel: CancellationToken) {
        let mut inner = self.lock();
        let seq = inner.1;
        inner.1 += 1;
        inner.0.insert(
            object.id.clone(),
            Entry {
                object,
                owner,
                seq,
                cancel,
            },
        );
    }

    pub fn get(&self, owner: Owner, id: &str) -> Result<BatchObject, ApiError> {
        self.lock()
            .0
            .get(id)
            .filter(|e| e.owner == owner)
            .map(|e| e.object.clone())
            .ok_or_else(|| ApiError::NotFound(format!("No such Batch object: {id}")))
    }

    /// The owner's batches, newest first.
    pub fn list(&self, owner: Owner) -> Vec<BatchObject> {
        let inner = self.lock();
        let mut entries: Vec<&Entry> = inner.0.values().filter(|e| e.owner == owner).collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.seq));
        entries.into_iter().map(|e| e.object.clone()).collect()
    }

    /// Changes batch `id` (a no-op if it is gone) and returns it as changed.
    fn update<R>(&self, id: &str, f: impl FnOnce(&mut BatchObject) -> R) -> Option<R> {
        self.lock().0.get_mut(id).map(|e| f(&mut e.object))
    }

    pub fn cancel(&self, owner: Owner, id: &str, now: u64) -> Result<BatchObject, ApiError> {
        let mut inner = self.lock();
        let entry = inner
            .0
            .get_mut(id)
            .filter(|e| e.owner == owner)
            .ok_or_else(|| ApiError::NotFound(format!("No such Batch object: {id}")))?;
        entry.object.cancel(now)?;
        entry.cancel.cancel();
        Ok(entry.object.clone())
    }

    /// Stops every running batch (at shutdown).
    pub fn stop_all(&self) {
        for e in self.lock().0.values() {
            e.cancel.cancel();
        }
    }
}

/// A request line of the input file, as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 1-based.
    pub number: u64,
    pub custom_id: String,
    pub body: Value,
}

/// At most this many validation errors are reported (the first ones).
const MAX_REPORTED_ERRORS: usize = 100;
/// The longest `custom_id` (OpenAI's bound is not documented; this keeps output lines sane).
const MAX_CUSTOM_ID_CHARS: usize = 512;

/// Reads the input file's lines in order, validating each (JSON, a unique non-empty
/// `custom_id`, `method` POST, `url` the batch's endpoint, a `body` object); blank lines are
/// skipped. `each` gets every valid line; a false return stops the reading early. The number
/// of requests, or the errors (at most [`MAX_REPORTED_ERRORS`]) with their lines.
pub fn read_lines(
    input: impl BufRead,
    endpoint: Endpoint,
    max_requests: usize,
    mut each: impl FnMut(Line) -> bool,
) -> Result<u64, Vec<LineError>> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut count = 0u64;
    let err = |code, line, param: Option<&str>, message: String| LineError {
        code,
        message,
        param: param.map(str::to_string),
        line: Some(line),
    };
    for (i, text) in input.lines().enumerate() {
        let number = i as u64 + 1;
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                errors.push(err(
                    "invalid_file",
                    number,
                    None,
                    format!("the file cannot be read as UTF-8 text: {e}"),
                ));
                break;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        count += 1;
        if count > max_requests as u64 {
            errors.push(err(
                "too_many_requests",
                number,
                None,
                format!("a batch holds at most {max_requests} requests"),
            ));
            break;
        }
        match check_line(&text, number, endpoint, &mut seen) {
            Ok(line) => {
                if errors.is_empty() && !each(line) {
                    return Ok(count);
                }
            }
            Err(e) => {
                errors.push(e);
                if errors.len() >= MAX_REPORTED_ERRORS {
                    break;
                }
            }
        }
    }
    if errors.is_empty() && count == 0 {
        errors.push(LineError {
            code: "empty_file",
            message: "the input file has no requests".into(),
            param: None,
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(count)
    } else {
        Err(errors)
    }
}

fn check_line(
    text: &str,
    number: u64,
    endpoint: Endpoint,
    seen: &mut HashSet<String>,
) -> Result<Line, LineError> {
    let err = |code, param: Option<&str>, message: String| LineError {
        code,
        message,
        param: param.map(str::to_string),
        line: Some(number),
    };
    let value: Value = serde_json::from_str(text).map_err(|e| {
        err(
            "invalid_json_line",
            None,
            format!("This line is not parseable as valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err(err(
            "invalid_json_line",
            None,
            format!(
                "a request line must be a JSON object, got {}",
                json_kind(&value)
            ),
        ));
    };
    let custom_id = match fields.remove("custom_id") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_CUSTOM_ID_CHARS => s,
        _ => {
            return Err(err(
                "invalid_custom_id",
                Some("custom_id"),
                format!("custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters"),
            ))
        }
    };
    if !seen.insert(custom_id.clone()) {
        return Err(err(
            "duplicate_custom_id",
            Some("custom_id"),
            format!("custom_id {custom_id:?} is used by an earlier line; each must be unique"),
        ));
    }
    match fields.remove("method") {
        Some(Value::String(m)) if m == "POST" => {}
        _ => {
            return Err(err(
                "invalid_method",
                Some("method"),
                "method must be POST".into(),
            ))
        }
    }
    match fields.remove("url") {
        Some(Value::String(u)) if u == endpoint.as_str() => {}
        other => {
            return Err(err(
                "mismatched_endpoint",
                Some("url"),
                format!(
                    "url must be the batch's endpoint {}, got {}",
                    endpoint.as_str(),
                    other.map_or("none".into(), |u| u.to_string())
                ),
            ))
        }
    }
    let body = match fields.remove("body") {
        Some(body @ Value::Object(_)) => body,
        _ => {
            return Err(err(
                "invalid_body",
                Some("body"),
                "body must be the request's JSON object".into(),
            ))
        }
    };
    if let Some(k) = fields.keys().next() {
        let shown: String = k.chars().take(64).collect();
        return Err(err(
            "unknown_parameter",
            Some(&shown),
            format!("unknown field {shown:?} (a line has custom_id, method, url and body)"),
        ));
    }
    Ok(Line {
        number,
        custom_id,
        body,
    })
}

/// One line of the output or error file.
#[derive(Debug, Serialize)]
struct OutputLine {
    id: String,
    custom_id: String,
    response: Option<LineResponse>,
    error: Option<NotRun>,
}

#[derive(Debug, Serialize)]
struct LineResponse {
    status_code: u16,
    request_id: String,
    body: Value,
}

/// Why a request did not run: `batch_cancelled` or `batch_expired`.
#[derive(Debug, Serialize)]
struct NotRun {
    code: &'static str,
    message: &'static str,
}

impl NotRun {
    fn of(ending: Ending) -> Self {
        match ending {
            Ending::Expired => NotRun {
                code: "batch_expired",
                message: "This request could not be executed before the completion window \
                          expired.",
            },
            _ => NotRun {
                code: "batch_cancelled",
                message: "This request was not executed because the batch was cancelled.",
            },
        }
    }
}

/// What became of one request.
enum Outcome {
    Done(Box<ImagesResponse>),
    Failed(ApiError),
    NotRun(Ending),
    /// The server is stopping: nothing is written.
    Stopped,
}

/// A running batch's shared state: what it needs to run a request and record it.
struct Run {
    app: Arc<App>,
    id: String,
    caller: Caller,
    endpoint: Endpoint,
    url_base: Option<String>,
    cancel: CancellationToken,
    deadline: Instant,
    output: tokio::sync::Mutex<Writer>,
    errors: tokio::sync::Mutex<Writer>,
}

/// An output or error file being written, registered as a file once the batch ends.
struct Writer {
    id: String,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    lines: u64,
    bytes: u64,
}

impl Writer {
    fn new() -> Self {
        Writer {
            id: new_id("file-"),
            file: None,
            lines: 0,
            bytes: 0,
        }
    }

    async fn write(&mut self, app: &App, line: &OutputLine) -> Result<(), ApiError> {
        if self.file.is_none() {
            let file = tokio::fs::File::create(app.files.path(&self.id))
                .await
                .map_err(storage_error)?;
            self.file = Some(tokio::io::BufWriter::with_capacity(1 << 20, file));
        }
        let mut text = serde_json::to_vec(line).map_err(storage_error)?;
        text.push(b'\n');
        if let Some(f) = self.file.as_mut() {
            f.write_all(&text).await.map_err(storage_error)?;
        }
        self.lines += 1;
        self.bytes += text.len() as u64;
        Ok(())
    }

    /// Flushes and registers the file if any line was written.
    async fn finish(
        &mut self,
        app: &App,
        owner: Owner,
        filename: String,
        ttl: u64,
    ) -> Result<Option<String>, ApiError> {
        let Some(mut f) = self.file.take() else {
            return Ok(None);
        };
        f.flush().await.map_err(storage_error)?;
        let now = unix_now();
        let object = FileObject {
            id: self.id.clone(),
            object: "file",
            bytes: self.bytes,
            created_at: now,
            expires_at: Some(now + ttl),
            filename,
            purpose: "batch_output",
            status: "processed",
            status_details: None,
        };
        app.files.insert(object, owner);
        Ok(Some(self.id.clone()))
    }
}

impl Run {
    /// Runs one request until it made its images or failed, retrying what the load caused (a
    /// full queue, a timeout in it) and waiting for the key's image quota, until the batch is
    /// cancelled or its window ends.
    async fn execute(&self, body: Value, seed: &mut Option<u64>) -> Outcome {
        let app = &self.app;
        let mut req = match self.prepare(body).await {
            Ok(req) => req,
            Err(e) => return Outcome::Failed(e),
        };
        loop {
            match app.auth.consume(&self.caller, 0, req.n, Instant::now()) {
                Ok(()) => break,
                Err(ApiError::RateLimited { retry_after, .. }) => {
                    if let Some(out) = self.wait(retry_after).await {
                        return out;
                    }
                }
                Err(e) => return Outcome::Failed(e),
            }
        }
        loop {
            if let Some(out) = self.ended() {
                return out;
            }
            if app.phase() == Phase::Loading {
                if let Some(out) = self.wait(Duration::from_millis(500)).await {
                    return out;
                }
                continue;
            }
            // A seed is drawn once: a retried request makes the same images.
            if seed.is_some() {
                req.seed = *seed;
            }
            let (first, tokens) = routes::start_request(app, &self.caller, &req);
            *seed = Some(first);
            let result = routes::images_response(
                app,
                &self.caller,
                &req,
                first,
                tokens,
                self.url_base.as_deref(),
            )
            .await;
            match result {
                Ok(resp) => return Outcome::Done(Box::new(resp)),
                Err(ApiError::Infer(InferError::QueueFull { retry_after, .. })) => {
                    if let Some(out) = self.wait(retry_after).await {
                        return out;
                    }
                }
                Err(ApiError::Infer(InferError::Timeout { .. } | InferError::NotReady)) => {}
                Err(ApiError::Infer(InferError::ShuttingDown)) => return Outcome::Stopped,
                Err(e) => return Outcome::Failed(e),
            }
        }
    }

    /// The line's body as a request (an edit's image decoded).
    async fn prepare(&self, body: Value) -> Result<ValidRequest, ApiError> {
        let app = &self.app;
        let req = match self.endpoint {
            Endpoint::Generations => validate(&body, &app.config.limits, &app.config.model)?,
            Endpoint::Edits => {
                let input = routes::EditInput::from_json(body)?;
                // The key's quota is waited for afterwards (as background work, not refused).
                routes::prepare_edit(app, input.fields, input.uploads, |_| Ok(())).await?
            }
        };
        if req.stream {
            return Err(ApiError::invalid(
                "stream",
                "invalid_value",
                "stream is not available in a batch: each request's response is a line of the \
                 output file",
            ));
        }
        Ok(req)
    }

    /// Why the batch runs no more requests, if it does not.
    fn ended(&self) -> Option<Outcome> {
        if self.app.phase() == Phase::ShuttingDown || self.app.phase() == Phase::Failed {
            Some(Outcome::Stopped)
        } else if self.cancel.is_cancelled() {
            Some(Outcome::NotRun(Ending::Cancelled))
        } else if Instant::now() >= self.deadline {
            Some(Outcome::NotRun(Ending::Expired))
        } else {
            None
        }
    }

    /// Waits `d`, unless the batch ends first (then why).
    async fn wait(&self, d: Duration) -> Option<Outcome> {
        let d = d.max(Duration::from_millis(50));
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.cancel.cancelled() => {}
            _ = tokio::time::sleep_until(self.deadline.into()) => {}
        }
        self.ended()
    }

    /// Runs one line and writes its result: a response to the output file, an error response
    /// or a request that did not run to the error file. False when the server is stopping.
    async fn run_line(&self, line: Line) -> bool {
        let mut seed = None;
        let outcome = match self.ended() {
            Some(out) => out,
            None => self.execute(line.body, &mut seed).await,
        };
        let request_id = new_id("req_");
        let (ok, response, error, usage) = match outcome {
            Outcome::Stopped => return false,
            Outcome::Done(resp) => {
                let body = serde_json::to_value(&*resp).unwrap_or_default();
                let response = LineResponse {
                    status_code: 200,
                    request_id,
                    body,
                };
                (true, Some(response), None, Some(resp.usage))
            }
            Outcome::Failed(e) => {
                tracing::info!(batch = %self.id, custom_id = %line.custom_id, "a batch request failed: {e}");
                let response = LineResponse {
                    status_code: e.info().status.as_u16(),
                    request_id,
                    body: serde_json::to_value(e.body()).unwrap_or_default(),
                };
                (false, Some(response), None, None)
            }
            Outcome::NotRun(ending) => (false, None, Some(NotRun::of(ending)), None),
        };
        let record = OutputLine {
            id: new_id("batch_req_"),
            custom_id: line.custom_id,
            response,
            error,
        };
        self.app
            .metrics
            .batch_api_request(match (ok, &record.error) {
                (true, _) => BatchRequestOutcome::Completed,
                (false, None) => BatchRequestOutcome::Failed,
                (false, Some(_)) => BatchRequestOutcome::NotRun,
            });
        let writer = if ok { &self.output } else { &self.errors };
        if let Err(e) = writer.lock().await.write(&self.app, &record).await {
            tracing::error!(batch = %self.id, "cannot write a batch result: {e}");
        }
        self.app
            .batches
            .update(&self.id, |b| b.record(ok, usage.as_ref()));
        true
    }
}

/// What `POST /v1/batches` hands the runner.
struct Job {
    id: String,
    owner: Owner,
    endpoint: Endpoint,
    input: std::fs::File,
    output_ttl: u64,
}

/// Runs a batch: validates its input, runs its requests at most [`App::batch_slots`] at a
/// time across all batches, then registers its output and error files.
async fn run_batch(run: Arc<Run>, job: Job) {
    run.app.metrics.batch_api_running(1);
    let app = run.app.clone();
    run_batch_inner(run, job).await;
    app.metrics.batch_api_running(-1);
}

async fn run_batch_inner(run: Arc<Run>, job: Job) {
    let app = run.app.clone();
    let max = app.config.files.max_batch_requests;
    let endpoint = job.endpoint;
    let input = job.input;
    let checked = tokio::task::spawn_blocking(move || {
        let mut input = input;
        let counted = read_lines(std::io::BufReader::new(&input), endpoint, max, |_| true);
        (counted, input.rewind().map(|_| input))
    })
    .await;
    let (total, input) = match checked {
        Ok((Ok(total), Ok(input))) => (total, input),
        Ok((Err(errors), _)) => {
            tracing::info!(batch = %run.id, errors = errors.len(), "a batch failed validation");
            app.batches.update(&run.id, |b| b.fail(unix_now(), errors));
            return;
        }
        Ok((Ok(_), Err(e))) => {
            let e = storage_error(e);
            app.batches.update(&run.id, |b| {
                b.fail(
                    unix_now(),
                    vec![LineError {
                        code: "server_error",
                        message: e.to_string(),
                        param: None,
                        line: None,
                    }],
                )
            });
            return;
        }
        Err(e) => {
            tracing::error!(batch = %run.id, "the batch validation task failed: {e}");
            return;
        }
    };
    app.batches.update(&run.id, |b| b.start(unix_now(), total));
    tracing::info!(batch = %run.id, requests = total, endpoint = endpoint.as_str(), "batch started");

    // The lines again, one at a time through a channel: an input of 200 MB is never held whole.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Line>(1);
    let reader = tokio::task::spawn_blocking(move || {
        let _ = read_lines(std::io::BufReader::new(&input), endpoint, max, |line| {
            tx.blocking_send(line).is_ok()
        });
    });
    let mut running = tokio::task::JoinSet::new();
    let mut stopped = false;
    while let Some(line) = rx.recv().await {
        let slot = tokio::select! {
            slot = app.batch_slots.clone().acquire_owned() => slot.ok(),
            _ = run.cancel.cancelled() => None,
            _ = tokio::time::sleep_until(run.deadline.into()) => None,
        };
        let run = run.clone();
        running.spawn(async move {
            let _slot = slot;
            run.run_line(line).await
        });
        while let Some(done) = running.try_join_next() {
            stopped |= !done.unwrap_or(true);
        }
        if stopped {
            break;
        }
    }
    drop(rx);
    let _ = reader.await;
    while let Some(done) = running.join_next().await {
        stopped |= !done.unwrap_or(true);
    }
    if stopped {
        tracing::info!(batch = %run.id, "the server is stopping: the batch ends unfinished");
        return;
    }

    let ending = if run.cancel.is_cancelled() {
        Ending::Cancelled
    } else if Instant::now() >= run.deadline {
        Ending::Expired
    } else {
        Ending::Done
    };
    app.batches.update(&run.id, |b| b.finalizing(unix_now()));
    let output = run
        .output
        .lock()
        .await
        .finish(
            &app,
            job.owner,
            format!("{}_output.jsonl", job.id),
            job.output_ttl,
        )
        .await;
    let errors = run
        .errors
        .lock()
        .await
        .finish(
            &app,
            job.owner,
            format!("{}_error.jsonl", job.id),
            job.output_ttl,
        )
        .await;
    let now = unix_now();
    app.batches.update(&run.id, |b| {
        match (output, errors) {
            (Ok(output), Ok(errors)) => {
                b.output_file_id = output;
                b.error_file_id = errors;
                b.finish(now, ending);
            }
            (Err(e), _) | (_, Err(e)) => b.fail(
                now,
                vec![LineError {
                    code: "server_error",
                    message: e.to_string(),
                    param: None,
                    line: None,
                }],
            ),
        }
        tracing::info!(
            batch = %b.id,
            status = b.status.as_str(),
            completed = b.request_counts.completed,
            failed = b.request_counts.failed,
            "batch ended"
        );
    });
}

fn field<'a>(
    fields: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::invalid(
            name,
            "invalid_type",
            format!("{name} must be a string, got {}", json_kind(other)),
        )),
    }
}

fn required<'a>(
    fields: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<&'a str, ApiError> {
    field(fields, name)?.ok_or_else(|| {
        ApiError::invalid(
            name,
            "missing_required_parameter",
            format!("Missing required parameter: '{name}'."),
        )
    })
}

/// OpenAI's metadata: at most 16 pairs, keys up to 64 characters, string values up to 512.
fn metadata(value: Option<&Value>) -> Result<Option<serde_json::Map<String, Value>>, ApiError> {
    let bad = |message: String| ApiError::invalid("metadata", "invalid_value", message);
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if map.len() > 16 {
                return Err(bad(format!(
                    "metadata has at most 16 pairs, got {}",
                    map.len()
                )));
            }
            for (k, v) in map {
                let ok = k.chars().count() <= 64
                    && matches!(v, Value::String(s) if s.chars().count() <= 512);
                if !ok {
                    return Err(bad(
                        "metadata keys are at most 64 characters and values strings of at most \
                         512"
                        .into(),
                    ));
                }
            }
            Ok(Some(map.clone()))
        }
        Some(other) => Err(bad(format!(
            "metadata must be an object, got {}",
            json_kind(other)
        ))),
    }
}

/// `POST /v1/batches`.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchObject>, ApiError> {
    match app.phase() {
        Phase::ShuttingDown => return Err(InferError::ShuttingDown.into()),
        Phase::Failed => return Err(app.device_failed().into()),
        Phase::Loading | Phase::Ready => {}
    }
    routes::check_json_content_type(&headers)?;
    let bytes = routes::read_body(body, &headers, app.config.limits.max_body_bytes).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::InvalidJson(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    let Value::Object(fields) = value else {
        return Err(ApiError::NotAnObject(json_kind(&value)));
    };
    const FIELDS: &[&str] = &[
        "input_file_id",
        "endpoint",
        "completion_window",
        "metadata",
        "output_expires_after",
    ];
    if let Some(k) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        let shown: String = k.chars().take(64).collect();
        return Err(ApiError::invalid(
            &shown,
            "unknown_parameter",
            format!("Unknown parameter: '{shown}'."),
        ));
    }
    let endpoint_name = required(&fields, "endpoint")?;
    let endpoint = Endpoint::parse(endpoint_name).ok_or_else(|| {
        ApiError::invalid(
            "endpoint",
            "invalid_value",
            format!(
                "this server batches image requests: endpoint must be /v1/images/generations \
                 or /v1/images/edits, got {:?}",
                endpoint_name.chars().take(64).collect::<String>()
            ),
        )
    })?;
    if required(&fields, "completion_window")? != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            "invalid_value",
            "completion_window must be 24h",
        ));
    }
    let metadata = metadata(fields.get("metadata"))?;
    let output_ttl = match fields.get("output_expires_after") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => {
            let text = |k: &str| match o.get(k) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            expires_after(
                text("anchor").as_deref(),
                text("seconds").as_deref(),
                "output_expires_after",
            )?
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "output_expires_after",
                "invalid_type",
                format!(
                    "output_expires_after must be an object, got {}",
                    json_kind(other)
                ),
            ))
        }
    };
    let input_file_id = required(&fields, "input_file_id")?;
    let now = unix_now();
    let owner = caller.owner();
    let input = app.files.get(owner, input_file_id, now).map_err(|_| {
        ApiError::invalid(
            "input_file_id",
            "invalid_value",
            no_such_file(input_file_id).to_string(),
        )
    })?;
    if input.purpose != "batch" {
        return Err(ApiError::invalid(
            "input_file_id",
            "invalid_value",
            format!(
                "the input file must have purpose batch, {} has {}",
                input.id, input.purpose
            ),
        ));
    }
    // Opened now: deleting the file later does not take it from the batch.
    let file = std::fs::File::open(app.files.path(&input.id)).map_err(storage_error)?;
    let window = app.config.files.completion_window;
    let id = new_id("batch_");
    let object = BatchObject {
        id: id.clone(),
        object: "batch",
        endpoint: endpoint.as_str(),
        model: app.config.model.id.clone(),
        errors: None,
        input_file_id: input.id.clone(),
        completion_window: "24h",
        status: Status::Validating,
        output_file_id: None,
        error_file_id: None,
        created_at: now,
        in_progress_at: None,
        expires_at: Some(now + window.as_secs()),
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        usage: BatchUsage::default(),
        metadata,
    };
    let cancel = CancellationToken::new();
    app.batches.insert(object.clone(), owner, cancel.clone());
    let mut background = caller;
    background.priority = Priority::Low;
    let url_base = Some(routes::url_base(&app, &headers));
    let run = Arc::new(Run {
        app: app.clone(),
        id: id.clone(),
        caller: background,
        endpoint,
        url_base,
        cancel,
        deadline: Instant::now() + window,
        output: tokio::sync::Mutex::new(Writer::new()),
        errors: tokio::sync::Mutex::new(Writer::new()),
    });
    let job = Job {
        id,
        owner,
        endpoint,
        input: file,
        output_ttl: output_ttl.unwrap_or(DEFAULT_TTL_SECS),
    };
    tracing::info!(batch = %job.id, input = %input.id, "batch created");
    tokio::spawn(run_batch(run, job));
    Ok(Json(object))
}

pub async fn retrieve(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    app.batches.get(caller.owner(), &id).map(Json)
}

/// `GET /v1/batches`: the key's batches, newest first (`after`, `limit` 1-100, default 20).
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<BatchObject>>, ApiError> {
    let mut params = ListParams::parse(&query, 100, &[])?;
    if query.contains_key("order") {
        return Err(ApiError::invalid(
            "order",
            "unknown_parameter",
            "Unknown parameter: 'order' (batches are listed newest first)",
        ));
    }
    if !query.contains_key("limit") {
        params.limit = 20;
    }
    let batches = app.batches.list(caller.owner());
    Ok(Json(ListPage::of(
        batches,
        |b| &b.id,
        params.after.as_deref(),
        params.limit,
    )))
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` at once; requests already running finish,
/// the rest are listed in the error file as `batch_cancelled`, then `cancelled`.
pub async fn cancel(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let object = app.batches.cancel(caller.owner(), &id, unix_now())?;
    tracing::info!(batch = %id, "batch cancelling");
    Ok(Json(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str, max: usize) -> Result<Vec<Line>, Vec<LineError>> {
        let mut out = Vec::new();
        read_lines(text.as_bytes(), Endpoint::Generations, max, |l| {
            out.push(l);
            true
        })?;
        Ok(out)
    }

    fn line(id: &str, url: &str) -> String {
        serde_json::json!({"custom_id": id, "method": "POST", "url": url, "body": {"prompt": id}})
            .to_string()
    }

    #[test]
    fn valid_lines_are_read_in_order_and_blank_lines_skipped() {
        let g = "/v1/images/generations";
        let text = format!("{}\n\n{}\n", line("a", g), line("b", g));
        let got = lines(&text, 10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].number, got[0].custom_id.as_str()), (1, "a"));
        assert_eq!((got[1].number, got[1].custom_id.as_str()), (3, "b"));
        assert_eq!(got[1].body, serde_json::json!({"prompt": "b"}));
    }

    #[test]
    fn every_invalid_line_is_reported_with_its_number() {
        let g = "/v1/images/generations";
        let text = [
            line("a", g),
            "{not json".to_string(),
            line("a", g),
            line("c", "/v1/images/edits"),
            r#"{"custom_id": "d", "method": "GET", "url": "/v1/images/generations", "body": {}}"#
                .into(),
            r#"{"custom_id": "e", "method": "POST", "url": "/v1/images/generations"}"#.into(),
            r#"{"custom_id": "", "method": "POST", "url": "/v1/images/generations", "body": {}}"#
                .into(),
            "[1]".into(),
        ]
        .join("\n");
        let errors = lines(&text, 100).unwrap_err();
        let got: Vec<(&str, Option<u64>)> = errors.iter().map(|e| (e.code, e.line)).collect();
        assert_eq!(
            got,
            [
                ("invalid_json_line", Some(2)),
                ("duplicate_custom_id", Some(3)),
                ("mismatched_endpoint", Some(4)),
                ("invalid_method", Some(5)),
                ("invalid_body", Some(6)),
                ("invalid_custom_id", Some(7)),
                ("invalid_json_line", Some(8)),
            ]
        );
    }

    #[test]
    fn empty_and_oversized_inputs_fail() {
        assert_eq!(lines("\n  \n", 10).unwrap_err()[0].code, "empty_file");
        let g = "/v1/images/generations";
        let text = [line("a", g), line("b", g), line("c", g)].join("\n");
        let errors = lines(&text, 2).unwrap_err();
        assert_eq!(
            (errors[0].code, errors[0].line),
            ("too_many_requests", Some(3))
        );
        assert!(lines(&text, 3).is_ok());
    }

    fn batch() -> BatchObject {
        BatchObject {
            id: "batch_1".into(),
            object: "batch",
            endpoint: "/v1/images/generations",
            model: "sdxl-turbo".into(),
            errors: None,
            input_file_id: "file-1".into(),
            completion_window: "24h",
            status: Status::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at: 1,
            in_progress_at: None,
            expires_at: Some(86401),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            usage: BatchUsage::default(),
            metadata: None,
        }
    }

    #[test]
    fn statuses_move_as_openai_documents_them() {
        let mut b = batch();
        b.start(2, 3);
        assert_eq!((b.status, b.request_counts.total), (Status::InProgress, 3));
        b.record(true, None);
        b.record(false, None);
        b.finalizing(3);
        b.finish(4, Ending::Done);
        assert_eq!((b.status, b.completed_at), (Status::Completed, Some(4)));
        assert_eq!(
            (b.request_counts.completed, b.request_counts.failed),
            (1, 1)
        );
        assert!(
            b.cancel(5).is_err(),
            "a completed batch cannot be cancelled"
        );

        let mut b = batch();
        b.start(2, 3);
        b.cancel(3).unwrap();
        b.cancel(4).unwrap();
        assert_eq!((b.status, b.cancelling_at), (Status::Cancelling, Some(3)));
        b.finalizing(5);
        assert_eq!(b.status, Status::Cancelling);
        b.finish(6, Ending::Done);
        assert_eq!((b.status, b.cancelled_at), (Status::Cancelled, Some(6)));

        let mut b = batch();
        b.start(2, 3);
        b.finish(7, Ending::Expired);
        assert_eq!((b.status, b.expired_at), (Status::Expired, Some(7)));
    }
}
