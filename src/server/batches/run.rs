//! Running a batch: its requests through the server's queue, its results into the output and
//! error files, line by line, so that a batch stopped by a restart goes on where it stopped.
//!
//! A running batch keeps, in the batches directory: `{id}.input.jsonl` (a hard link to its
//! input file, so deleting that file does not take it from the batch), and `{id}.output.jsonl`
//! and `{id}.error.jsonl` (each result appended and flushed as it comes). When it ends, those
//! two become files of the Files API and the link goes. Resuming, the lines already in them are
//! counted and skipped; a last line cut off by a crash is dropped and its request runs again.

use std::collections::HashSet;
use std::io::{BufRead, Seek};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::input::{read_lines, Line};
use super::{BatchUsage, Ending, Endpoint, LineError, Record, Status};
use crate::server::api::{ImagesResponse, ResponseFormat, Usage};
use crate::server::auth::Caller;
use crate::server::error::{ApiError, BackendError, InferError};
use crate::server::files::http::is_disk_full;
use crate::server::files::{new_id, unix_now, FileObject};
use crate::server::metrics::BatchRequestOutcome;
use crate::server::queue::Priority;
use crate::server::validate::{validate, ValidRequest};
use crate::server::{routes, App, Phase};

/// The first wait before a result that could not be written is written again; each failure
/// doubles it, up to [`WRITE_RETRY_MAX`].
const WRITE_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries to write a result: how long a batch may stay paused
/// after its disk has room again.
const WRITE_RETRY_MAX: Duration = Duration::from_secs(30);

/// The tries of a write that failed (a full disk): the wait before each next one, and how
/// many failed so far.
struct Retries {
    delay: Duration,
    failures: u32,
}

impl Retries {
    fn new() -> Self {
        Retries {
            delay: WRITE_RETRY_FIRST,
            failures: 0,
        }
    }

    /// Counts a failed try (and `turbine_batch_api_write_errors_total`); the wait before the
    /// next.
    fn failed(&mut self, app: &App) -> Duration {
        self.failures += 1;
        app.metrics.batch_api_write_error();
        let delay = self.delay;
        self.delay = (delay * 2).min(WRITE_RETRY_MAX);
        delay
    }
}

/// What the operator can do about a write to the files directory that failed with `e`.
fn remedy(e: &std::io::Error) -> &'static str {
    if is_disk_full(e) {
        "free space on the files directory's disk"
    } else {
        "check the files directory's disk (the kernel's log tells of an I/O error or a \
         read-only remount)"
    }
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

/// What becomes of one request.
enum Outcome {
    Done(Box<ImagesResponse>),
    Failed(ApiError),
    NotRun(Ending),
    /// The server is stopping: nothing is written, and the request runs when the batch resumes.
    Stopped,
}

/// The files of a batch in the batches directory.
pub(super) struct Paths {
    pub input: PathBuf,
    output: PathBuf,
    errors: PathBuf,
}

impl Paths {
    pub fn of(app: &App, id: &str) -> Self {
        let dir = app.files.batches_dir();
        Paths {
            input: dir.join(format!("{id}.input.jsonl")),
            output: dir.join(format!("{id}.output.jsonl")),
            errors: dir.join(format!("{id}.error.jsonl")),
        }
    }
}

/// What a results file held when the batch (re)started.
#[derive(Default)]
struct Scanned {
    custom_ids: Vec<String>,
    bytes: u64,
    usage: BatchUsage,
}

/// The fields of a results line that resuming needs (the images are skipped).
#[derive(Deserialize)]
struct SeenLine {
    custom_id: String,
    response: Option<SeenResponse>,
}

#[derive(Deserialize)]
struct SeenResponse {
    body: Option<SeenBody>,
}

#[derive(Deserialize)]
struct SeenBody {
    usage: Option<Usage>,
}

/// Reads a results file from before a restart; a last line without its newline (cut off by a
/// crash) is cut from the file.
fn scan(path: &std::path::Path) -> std::io::Result<Scanned> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scanned::default()),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(&file);
    let mut scanned = Scanned::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        let complete = line.last() == Some(&b'\n');
        let seen = complete
            .then(|| serde_json::from_slice::<SeenLine>(&line).ok())
            .flatten();
        let Some(seen) = seen else {
            // Cut off (or garbled) by a crash: drop it and everything after it.
            file.set_len(scanned.bytes)?;
            break;
        };
        if let Some(u) = seen.response.and_then(|r| r.body).and_then(|b| b.usage) {
            scanned.usage.add(&u);
        }
        scanned.custom_ids.push(seen.custom_id);
        scanned.bytes += n as u64;
    }
    Ok(scanned)
}

/// An output or error file being written; it becomes a file of the Files API when the batch
/// ends.
struct Writer {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    lines: u64,
    bytes: u64,
    /// What [`Writer::finish`] made of the results, once it has.
    finished: Option<Option<String>>,
}

impl Writer {
    fn new(path: PathBuf, scanned: &Scanned) -> Self {
        Writer {
            path,
            file: None,
            lines: scanned.custom_ids.len() as u64,
            bytes: scanned.bytes,
            finished: None,
        }
    }

    /// Appends a line and flushes it: what a crash leaves behind is every finished result. A
    /// write that fails (a full disk) leaves the file as it was: the part of the line that got
    /// in is cut off again, so that the next line does not follow half of this one.
    async fn write(&mut self, line: &OutputLine) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        if let Err(e) = self.append(&text).await {
            self.recover().await;
            return Err(e);
        }
        self.lines += 1;
        self.bytes += text.len() as u64;
        Ok(())
    }

    /// After a failed write: cuts off what got in of the line, and lets the next write open
    /// the file again (the handle's state after a failed write is not known).
    async fn recover(&mut self) {
        self.file = None;
        if let Err(e) = self.cut_back().await {
            tracing::error!(path = %self.path.display(), "cannot cut a half-written result off: {e}");
        }
    }

    async fn append(&mut self, text: &[u8]) -> std::io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await?,
            ),
        };
        file.write_all(text).await?;
        file.flush().await
    }

    /// Cuts the file back to the lines written whole (shrinking a file takes no space).
    async fn cut_back(&self) -> std::io::Result<()> {
        let file = match tokio::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .await
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        file.set_len(self.bytes).await
    }

    /// Makes the results a file of the Files API if there are any; returns its id. Can be
    /// called again after it failed (a full disk): the results are then where they were.
    async fn finish(
        &mut self,
        app: &App,
        record: &Record,
        filename: String,
    ) -> std::io::Result<Option<String>> {
        if let Some(done) = &self.finished {
            return Ok(done.clone());
        }
        if let Some(f) = self.file.take() {
            f.sync_all().await?;
        }
        if self.lines == 0 {
            let _ = tokio::fs::remove_file(&self.path).await;
            self.finished = Some(None);
            return Ok(None);
        }
        // A crash (or a stop) after the File was written down and before the batch's record
        // said so: that File is these results, under another name.
        if let Some(id) =
            app.files
                .same_contents(&record.owner, &filename, "batch_output", &self.path)
        {
            self.finished = Some(Some(id.clone()));
            return Ok(Some(id));
        }
        let id = new_id("file-");
        let path = app.files.path(&id);
        // A second name for the results, not a move: the batch's own stays where a resumed
        // batch reads them until its record says it ended (the batches store removes it then).
        // A crash or a stop anywhere in here costs nothing: a moved file whose record was not
        // written yet would be removed at the next start as an upload cut off, results and all.
        link_or_copy(&self.path, &path).await?;
        let object = FileObject::new(
            id.clone(),
            filename,
            "batch_output",
            self.bytes,
            record.output_ttl,
        );
        if let Err(e) = app.files.insert(object, record.owner.clone()) {
            // The file's record could not be written: the next try (or, after a restart, the
            // resumed batch) makes another.
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        self.finished = Some(Some(id.clone()));
        Ok(Some(id))
    }
}

/// Gives the (synced) contents at `from` the name `to` as well: a hard link, or where the
/// filesystem has none, a synced copy (removed again if it could not be made whole).
pub(super) async fn link_or_copy(
    from: &std::path::Path,
    to: &std::path::Path,
) -> std::io::Result<()> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    tokio::task::spawn_blocking(move || {
        if std::fs::hard_link(&from, &to).is_ok() {
            return Ok(());
        }
        let copied = std::fs::copy(&from, &to).and_then(|_| std::fs::File::open(&to)?.sync_all());
        if copied.is_err() {
            let _ = std::fs::remove_file(&to);
        }
        copied
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A running batch: what it needs to run a request and write down what became of it.
struct Run {
    app: Arc<App>,
    id: String,
    caller: Caller,
    endpoint: Endpoint,
    cancel: CancellationToken,
    deadline: Instant,
    output: tokio::sync::Mutex<Writer>,
    errors: tokio::sync::Mutex<Writer>,
}

impl Run {
    /// Runs one request until it made its images or failed, retrying what the load caused (a
    /// full queue, a timeout in it, the memory for inputs taken) and what a failed device did
    /// to it while others serve, and waiting for the key's image quota, until the batch is
    /// cancelled or its window ends.
    async fn execute(&self, body: Value, seed: &mut Option<u64>) -> Outcome {
        let app = &self.app;
        let mut req = loop {
            match self.prepare(&body).await {
                Ok(req) => break req,
                // Other requests' bodies filled the memory for inputs: background work waits.
                Err(e @ ApiError::Infer(InferError::InputMemoryFull { .. })) => {
                    if let Some(out) = self.wait(e.retry_after().unwrap_or_default()).await {
                        return out;
                    }
                }
                Err(e) => return Outcome::Failed(e),
            }
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
            let result =
                routes::images_response(app, &self.caller, &req, first, tokens, None).await;
            match result {
                Ok(resp) => return Outcome::Done(Box::new(resp)),
                Err(ApiError::Infer(InferError::QueueFull { retry_after, .. })) => {
                    if let Some(out) = self.wait(retry_after).await {
                        return out;
                    }
                }
                Err(ApiError::Infer(InferError::Timeout { .. } | InferError::NotReady)) => {}
                Err(ApiError::Infer(InferError::ShuttingDown | InferError::StoppedFirst)) => {
                    return Outcome::Stopped
                }
                // The device it ran on failed (a fault, a stall): another device runs it again,
                // or, with none left, the server after its restart (the batch resumes there).
                Err(ApiError::Infer(InferError::Backend(BackendError::DeviceFailed {
                    ..
                }))) => {
                    if !matches!(app.phase(), Phase::Ready | Phase::Leaving) {
                        return Outcome::Stopped;
                    }
                }
                Err(e) => return Outcome::Failed(e),
            }
        }
    }

    /// The line's body as a request (an edit's image decoded). Borrowed, so that a request
    /// refused for want of room in the input budget can be prepared again.
    async fn prepare(&self, body: &Value) -> Result<ValidRequest, ApiError> {
        let app = &self.app;
        // A batch's images come back in its output file, never as URLs: a batch's worth of
        // images would push everyone's URL images out of the store long before anyone read them.
        if body.get("response_format").and_then(Value::as_str) == Some("url") {
            return Err(ApiError::invalid(
                "response_format",
                "invalid_value",
                "response_format url is not available in a batch: its images come back as \
                 b64_json in the output file",
            ));
        }
        let mut req = match self.endpoint {
            Endpoint::Generations => validate(body, &app.config.limits, &app.config.model)?,
            Endpoint::Edits => {
                let input = routes::JsonEdit::parse(body.clone())?
                    .resolve(app, &self.caller.owner())
                    .await?;
                // The key's quota is waited for afterwards (as background work, not refused).
                routes::prepare_edit(app, input, |_| Ok(())).await?
            }
        };
        req.response_format = ResponseFormat::B64Json;
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
        if matches!(self.app.phase(), Phase::ShuttingDown | Phase::Failed) {
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
        let (kind, response, error, usage) = match outcome {
            Outcome::Stopped => return false,
            Outcome::Done(resp) => {
                let body = serde_json::to_value(&*resp).unwrap_or_default();
                let response = LineResponse {
                    status_code: 200,
                    request_id,
                    body,
                };
                let usage = resp.usage;
                (
                    BatchRequestOutcome::Completed,
                    Some(response),
                    None,
                    Some(usage),
                )
            }
            Outcome::Failed(e) => {
                tracing::info!(batch = %self.id, custom_id = %line.custom_id, "a batch request failed: {e}");
                let response = LineResponse {
                    status_code: e.info().status.as_u16(),
                    request_id,
                    body: serde_json::to_value(e.body()).unwrap_or_default(),
                };
                (BatchRequestOutcome::Failed, Some(response), None, None)
            }
            Outcome::NotRun(ending) => (
                BatchRequestOutcome::NotRun,
                None,
                Some(NotRun::of(ending)),
                None,
            ),
        };
        let ok = kind == BatchRequestOutcome::Completed;
        let record = OutputLine {
            id: new_id("batch_req_"),
            custom_id: line.custom_id,
            response,
            error,
        };
        if !self.write_result(ok, &record).await {
            // Not in the files, so not counted: after a stop, the request runs again when the
            // batch resumes.
            return !matches!(self.ended(), Some(Outcome::Stopped));
        }
        self.app.metrics.batch_api_request(kind);
        self.app.batches.update(&self.id, |b| {
            b.record(ok, usage.as_ref());
        });
        true
    }

    /// Writes a request's result, again and again while that fails (a full disk), until it is
    /// in its file (true) or the batch ends or the server stops first (false). The batch's
    /// other results queue behind it meanwhile: a full disk pauses the batch, where writing on
    /// would lose one finished result after another while the batch still counted them done.
    async fn write_result(&self, ok: bool, line: &OutputLine) -> bool {
        let mut writer = if ok { &self.output } else { &self.errors }.lock().await;
        let mut retries = Retries::new();
        loop {
            let e = match writer.write(line).await {
                Ok(()) => {
                    if retries.failures > 0 {
                        tracing::info!(batch = %self.id, custom_id = %line.custom_id, failures = retries.failures, "a batch result was written after all: the batch goes on");
                    }
                    return true;
                }
                Err(e) => e,
            };
            let delay = retries.failed(&self.app);
            if retries.failures == 1 {
                tracing::error!(batch = %self.id, custom_id = %line.custom_id, "cannot write a batch result ({e}): the batch waits and tries again (every {} s at most) until it can, is cancelled or expires; {}", WRITE_RETRY_MAX.as_secs(), remedy(&e));
            } else {
                tracing::debug!(batch = %self.id, custom_id = %line.custom_id, failures = retries.failures, "a batch result still cannot be written: {e}");
            }
            if let Some(out) = self.wait(delay).await {
                if !matches!(out, Outcome::Stopped) {
                    tracing::warn!(batch = %self.id, custom_id = %line.custom_id, "the batch ended before a result of it could be written: that result is lost");
                }
                return false;
            }
        }
    }

    /// The output and error files' ids, as the Files API's files the results became.
    async fn finish_files(
        &self,
        record: &Record,
    ) -> std::io::Result<(Option<String>, Option<String>)> {
        let id = &self.id;
        let mut output = self.output.lock().await;
        let output = output
            .finish(&self.app, record, format!("{id}_output.jsonl"))
            .await?;
        let mut errors = self.errors.lock().await;
        let errors = errors
            .finish(&self.app, record, format!("{id}_error.jsonl"))
            .await?;
        Ok((output, errors))
    }
}

/// Starts (or, after a restart, resumes) the batch in `record` on its own task.
pub(super) fn spawn(app: &Arc<App>, record: &Record, cancel: CancellationToken) {
    let app = app.clone();
    let record = record.clone();
    tokio::spawn(async move {
        app.metrics.batch_api_running(1);
        let id = record.object.id.clone();
        if let Err(e) = run(app.clone(), record, cancel).await {
            tracing::error!(batch = %id, "the batch failed: {e:#}");
            app.batches.transition(&id, |b| {
                b.fail(
                    unix_now(),
                    vec![LineError {
                        code: "server_error".into(),
                        message: format!("{e:#}"),
                        param: None,
                        line: None,
                    }],
                )
            });
        }
        app.metrics.batch_api_running(-1);
        // Told only once it ended: a batch the server stopped goes on after a restart.
        app.batches.notify_ended(&id, &app.webhooks);
    });
}

/// Runs a batch from wherever its record says it is: validates its input, runs the requests
/// not yet in its results at most [`App::batch_slots`] at a time across all batches, then
/// makes its results files of the Files API.
async fn run(app: Arc<App>, record: Record, cancel: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    let id = record.object.id.clone();
    let paths = Paths::of(&app, &id);
    let Some(mut caller) = app.auth.caller_for(&record.owner) else {
        app.batches.transition(&id, |b| {
            b.fail(
                unix_now(),
                vec![LineError {
                    code: "api_key_removed".into(),
                    message: "the API key that created this batch is no longer configured".into(),
                    param: None,
                    line: None,
                }],
            )
        });
        return Ok(());
    };
    // Background work: below every interactive request of the same age.
    caller.priority = Priority::Low;
    let endpoint = record.endpoint;
    let max = app.config.files.max_batch_requests;
    let input = std::fs::File::open(&paths.input)
        .with_context(|| format!("cannot open the batch's input {}", paths.input.display()))?;

    let mut status = record.object.status;
    let input = if status == Status::Validating {
        let (counted, input) = tokio::task::spawn_blocking(move || {
            let mut input = input;
            let counted = read_lines(std::io::BufReader::new(&input), endpoint, max, |_| true);
            (counted, input.rewind().map(|_| input))
        })
        .await?;
        match counted {
            Ok(total) => {
                app.batches.transition(&id, |b| b.start(unix_now(), total));
                tracing::info!(batch = %id, requests = total, endpoint = endpoint.as_str(), "batch started");
                status = Status::InProgress;
                input?
            }
            Err(errors) => {
                tracing::info!(batch = %id, errors = errors.len(), "a batch failed validation");
                app.batches.transition(&id, |b| b.fail(unix_now(), errors));
                let _ = std::fs::remove_file(&paths.input);
                return Ok(());
            }
        }
    } else {
        input
    };
    run_requests(app, record, cancel, caller, paths, input, status).await
}

async fn run_requests(
    app: Arc<App>,
    record: Record,
    cancel: CancellationToken,
    caller: Caller,
    paths: Paths,
    input: std::fs::File,
    status: Status,
) -> anyhow::Result<()> {
    let id = record.object.id.clone();
    let endpoint = record.endpoint;
    let max = app.config.files.max_batch_requests;
    // What a run before a restart finished.
    let (output, errors) = {
        let (o, e) = (paths.output.clone(), paths.errors.clone());
        tokio::task::spawn_blocking(move || Ok::<_, std::io::Error>((scan(&o)?, scan(&e)?)))
            .await??
    };
    let done: HashSet<String> = output
        .custom_ids
        .iter()
        .chain(&errors.custom_ids)
        .cloned()
        .collect();
    if !done.is_empty() {
        tracing::info!(batch = %id, done = done.len(), "batch resumed");
        let (completed, failed) = (
            output.custom_ids.len() as u64,
            errors.custom_ids.len() as u64,
        );
        let usage = output.usage.clone();
        app.batches.update(&id, |b| {
            b.request_counts.completed = completed;
            b.request_counts.failed = failed;
            b.usage = usage;
        });
    }
    let left = record
        .object
        .expires_at
        .unwrap_or(0)
        .saturating_sub(unix_now());
    let run = Arc::new(Run {
        app: app.clone(),
        id: id.clone(),
        caller,
        endpoint,
        cancel,
        deadline: Instant::now() + Duration::from_secs(left),
        output: tokio::sync::Mutex::new(Writer::new(paths.output.clone(), &output)),
        errors: tokio::sync::Mutex::new(Writer::new(paths.errors.clone(), &errors)),
    });

    if status != Status::Finalizing {
        // The lines one at a time through a channel: an input of 200 MB is never held whole.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Line>(1);
        let reader = tokio::task::spawn_blocking(move || {
            let _ = read_lines(std::io::BufReader::new(&input), endpoint, max, |line| {
                done.contains(&line.custom_id) || tx.blocking_send(line).is_ok()
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
            match slot {
                Some(slot) => {
                    let run = run.clone();
                    running.spawn(async move {
                        let _slot = slot;
                        run.run_line(line).await
                    });
                }
                // Cancelled or expired: the line is written as not run, here, so the lines
                // left never pile up in memory.
                None => stopped |= !run.run_line(line).await,
            }
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
            tracing::info!(batch = %id, "the server is stopping: the batch goes on after a restart");
            return Ok(());
        }
    }

    let ending = if run.cancel.is_cancelled() {
        Ending::Cancelled
    } else if Instant::now() >= run.deadline {
        Ending::Expired
    } else {
        Ending::Done
    };
    app.batches.transition(&id, |b| b.finalizing(unix_now()));
    let mut retries = Retries::new();
    let (output, errors) = loop {
        let e = match run.finish_files(&record).await {
            Ok(files) => break files,
            Err(e) if is_disk_full(&e) => e,
            Err(e) => return Err(e.into()),
        };
        // As a result that cannot be written: the batch waits for room (a stop leaves it
        // finalizing, and it ends after the restart).
        let delay = retries.failed(&app);
        if retries.failures == 1 {
            tracing::error!(batch = %id, "cannot make the batch's results files ({e}): the batch waits and tries again (every {} s at most) until it can; {}", WRITE_RETRY_MAX.as_secs(), remedy(&e));
        } else {
            tracing::debug!(batch = %id, failures = retries.failures, "the batch's results files still cannot be made: {e}");
        }
        tokio::time::sleep(delay).await;
        if matches!(app.phase(), Phase::ShuttingDown | Phase::Failed) {
            return Ok(());
        }
    };
    // The input and results go with the ended record (`Batches::persist`).
    app.batches.transition(&id, |b| {
        b.output_file_id = output;
        b.error_file_id = errors;
        b.finish(unix_now(), ending);
        tracing::info!(
            batch = %b.id,
            status = b.status.as_str(),
            completed = b.request_counts.completed,
            failed = b.request_counts.failed,
            "batch ended"
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn a_results_file_is_read_back_without_a_line_cut_off_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.output.jsonl");
        let usage = |n: u64| {
            serde_json::json!({"input_tokens": n, "input_tokens_details": {"image_tokens": 0, "text_tokens": n},
                               "output_tokens": 64, "output_tokens_details": {"image_tokens": 64, "text_tokens": 0},
                               "total_tokens": n + 64})
        };
        let line = |id: &str, n: u64| {
            serde_json::json!({"id": "batch_req_1", "custom_id": id, "error": null,
                               "response": {"status_code": 200, "request_id": "req_1",
                                            "body": {"data": [{"b64_json": "AAAA"}], "usage": usage(n)}}})
            .to_string()
                + "\n"
        };
        let complete = line("a", 3) + &line("b", 5);
        let torn = &line("c", 7)[..40];
        std::fs::write(&path, format!("{complete}{torn}")).unwrap();
        let scanned = scan(&path).unwrap();
        assert_eq!(scanned.custom_ids, ["a", "b"]);
        assert_eq!(scanned.bytes, complete.len() as u64);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), complete);
        assert_eq!(
            (
                scanned.usage.input_tokens,
                scanned.usage.output_tokens,
                scanned.usage.total_tokens
            ),
            (8, 128, 136)
        );
        // Nothing written yet: nothing done.
        assert!(scan(&dir.path().join("none.jsonl"))
            .unwrap()
            .custom_ids
            .is_empty());
    }

    fn output_line(custom_id: &str) -> OutputLine {
        OutputLine {
            id: new_id("batch_req_"),
            custom_id: custom_id.into(),
            response: None,
            error: Some(NotRun::of(Ending::Cancelled)),
        }
    }

    /// A write a full disk cut short leaves the start of a line; the writer cuts it off before
    /// the next line, which would otherwise follow it on the same line and garble both.
    #[tokio::test]
    async fn a_result_written_in_part_is_cut_off_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.error.jsonl");
        let mut w = Writer::new(path.clone(), &Scanned::default());
        w.write(&output_line("a")).await.unwrap();
        let whole = std::fs::read(&path).unwrap();
        let mut torn = serde_json::to_vec(&output_line("b")).unwrap();
        torn.truncate(torn.len() / 2);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        w.recover().await;
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        w.write(&output_line("c")).await.unwrap();
        let scanned = scan(&path).unwrap();
        assert_eq!(scanned.custom_ids, ["a", "c"]);
        assert_eq!((w.lines, w.bytes), (2, scanned.bytes));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), scanned.bytes);
    }

    /// A result that cannot be written at all (ENOSPC: `/dev/full`) is an error, not counted.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_result_that_cannot_be_written_is_an_error_and_not_counted() {
        let mut w = Writer::new("/dev/full".into(), &Scanned::default());
        let e = w.write(&output_line("a")).await.unwrap_err();
        assert!(crate::server::files::http::is_disk_full(&e), "{e:?}");
        assert_eq!((w.lines, w.bytes), (0, 0));
        assert!(w.file.is_none());
    }
}
