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
//!
//! Each batch's record (`{id}.json` in the batches directory, written at every change of
//! status) and its results, appended as they come (`run`), let a server with `--files-dir`
//! resume its unfinished batches after a restart.

mod input;
mod run;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use input::{read_lines, Line};

use super::api::Usage;
use super::auth::Caller;
use super::error::{ApiError, InferError};
use super::files::http::{expires_after_json, storage_error, ListParams};
use super::files::{
    blocking, new_id, no_such_file, read_records, unix_now, write_record, ListPage, Owner,
    DEFAULT_TTL_SECS,
};
use super::validate::{json_kind, Fields};
use super::webhooks::Webhooks;
use super::{routes, App, Phase};

/// The endpoints a batch may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    #[serde(rename = "/v1/images/generations")]
    Generations,
    #[serde(rename = "/v1/images/edits")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Whether the batch still has work to do (a restart resumes it).
    fn running(self) -> bool {
        matches!(
            self,
            Status::Validating | Status::InProgress | Status::Finalizing | Status::Cancelling
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// One reason a batch failed validation (OpenAI's `BatchError`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line of the input file.
    pub line: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchErrors {
    pub object: String,
    pub data: Vec<LineError>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CachedTokens {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReasoningTokens {
    pub reasoning_tokens: u64,
}

/// The batch's tokens so far: the sums of its images' `usage`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchUsage {
    pub input_tokens: u64,
    pub input_tokens_details: CachedTokens,
    pub output_tokens: u64,
    pub output_tokens_details: ReasoningTokens,
    pub total_tokens: u64,
}

impl BatchUsage {
    pub fn add(&mut self, u: &Usage) {
        self.input_tokens += u.input_tokens;
        self.output_tokens += u.output_tokens;
        self.total_tokens += u.total_tokens;
    }
}

/// OpenAI's batch object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchObject {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub model: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
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
    /// A batch just created (`validating`), expiring at `expires_at`.
    pub fn new(
        id: String,
        endpoint: Endpoint,
        model: String,
        input_file_id: String,
        created_at: u64,
        expires_at: u64,
        metadata: Option<serde_json::Map<String, Value>>,
    ) -> Self {
        BatchObject {
            id,
            object: "batch".into(),
            endpoint: endpoint.as_str().into(),
            model,
            errors: None,
            input_file_id,
            completion_window: "24h".into(),
            status: Status::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at,
            in_progress_at: None,
            expires_at: Some(expires_at),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            usage: BatchUsage::default(),
            metadata,
        }
    }

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
            object: "list".into(),
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

    /// When the batch ended (completed, failed, cancelled or expired); `None` while it runs.
    pub fn ended_at(&self) -> Option<u64> {
        if self.status.running() {
            return None;
        }
        [
            self.completed_at,
            self.failed_at,
            self.cancelled_at,
            self.expired_at,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Counts one request's outcome; `usage` for one that made images.
    pub fn record(&mut self, ok: bool, usage: Option<&Usage>) {
        if ok {
            self.request_counts.completed += 1;
        } else {
            self.request_counts.failed += 1;
        }
        if let Some(u) = usage {
            self.usage.add(u);
        }
    }
}

/// A batch as kept on disk: its object and what running it needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub object: BatchObject,
    pub owner: Owner,
    pub endpoint: Endpoint,
    /// Seconds the output and error files are kept (`output_expires_after`).
    pub output_ttl: u64,
    /// The batch ended and its webhook events are queued (their deliveries are kept with the
    /// webhooks): a batch that ended without it (a crash in between) is told of at start-up.
    /// Records from before webhooks count as told.
    #[serde(default = "told")]
    pub notified: bool,
}

fn told() -> bool {
    true
}

struct Entry {
    record: Record,
    seq: u64,
    cancel: CancellationToken,
    /// Bumped by each change of `record` that is to be written; `written` is the last one that
    /// reached the disk. Written outside the index's lock (an fsync takes up to seconds on a
    /// throttled network volume, and every request that reads a batch would wait behind it),
    /// one write at a time per batch through `writer`, each of the record as it is when its
    /// turn comes: the last write holds the last change.
    version: u64,
    written: u64,
    writer: Arc<Mutex<()>>,
    /// The last write failed (a full disk): [`Batches::save_unsaved`] tries again, so that a
    /// restart does not find an older status than the batch had.
    unsaved: bool,
    /// Its webhook events are being queued ([`Batches::notify_ended`]).
    notifying: bool,
}

/// Removes batch `id`'s input, output and error files from the batches directory `dir` (its
/// results, if any, are files of the Files API by then: other names of the same contents).
fn remove_working_files(dir: &std::path::Path, id: &str) {
    for kind in ["input", "output", "error"] {
        let _ = std::fs::remove_file(dir.join(format!("{id}.{kind}.jsonl")));
    }
}

/// Every batch, by id, and the directory of their records.
pub struct Batches {
    dir: PathBuf,
    inner: Mutex<(HashMap<String, Entry>, u64)>,
}

impl Batches {
    /// Reads back the records in `dir`, oldest first.
    pub fn open(dir: PathBuf) -> anyhow::Result<Self> {
        let mut records: Vec<Record> = read_records(&dir, "batch record")?;
        records.sort_by(|a, b| {
            (a.object.created_at, &a.object.id).cmp(&(b.object.created_at, &b.object.id))
        });
        // What an ended batch left behind (the server stopped before they went): its record is
        // all that stays.
        for record in records.iter().filter(|r| !r.object.status.running()) {
            remove_working_files(&dir, &record.object.id);
        }
        let batches = Batches {
            dir,
            inner: Mutex::new((HashMap::new(), 0)),
        };
        for record in records {
            batches.add(record, CancellationToken::new());
        }
        Ok(batches)
    }

    /// No batches and no directory (see [`super::files::FileStore::without_disk`]).
    pub fn without_disk(dir: PathBuf) -> Self {
        Batches {
            dir,
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Entry>, u64)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, record: Record, cancel: CancellationToken) {
        let mut inner = self.lock();
        let seq = inner.1;
        inner.1 += 1;
        inner.0.insert(
            record.object.id.clone(),
            Entry {
                record,
                seq,
                cancel,
                version: 0,
                written: 0,
                writer: Arc::default(),
                unsaved: false,
                notifying: false,
            },
        );
    }

    fn save(&self, record: &Record) -> std::io::Result<()> {
        write_record(&self.dir.join(format!("{}.json", record.object.id)), record)
    }

    /// A new batch, written down before it is listed.
    fn insert(&self, record: Record, cancel: CancellationToken) -> std::io::Result<()> {
        self.save(&record)?;
        self.add(record, cancel);
        Ok(())
    }

    pub fn get(&self, owner: &Owner, id: &str) -> Result<BatchObject, ApiError> {
        self.lock()
            .0
            .get(id)
            .filter(|e| &e.record.owner == owner)
            .map(|e| e.record.object.clone())
            .ok_or_else(|| ApiError::NotFound(format!("No such Batch object: {id}")))
    }

    /// The owner's batches, newest first.
    pub fn list(&self, owner: &Owner) -> Vec<BatchObject> {
        let inner = self.lock();
        let mut entries: Vec<&Entry> = inner
            .0
            .values()
            .filter(|e| &e.record.owner == owner)
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.seq));
        entries
            .into_iter()
            .map(|e| e.record.object.clone())
            .collect()
    }

    /// Changes batch `id`'s counts in memory (a no-op if it is gone): a restart recounts them
    /// from the results.
    fn update(&self, id: &str, f: impl FnOnce(&mut BatchObject)) {
        if let Some(e) = self.lock().0.get_mut(id) {
            f(&mut e.record.object);
        }
    }

    /// Changes batch `id`'s status and writes its record (returning once it is written, or
    /// marked to be written again).
    fn transition(&self, id: &str, f: impl FnOnce(&mut BatchObject)) {
        {
            let mut inner = self.lock();
            let Some(e) = inner.0.get_mut(id) else { return };
            f(&mut e.record.object);
            e.version += 1;
        }
        self.persist(id);
    }

    /// Writes batch `id`'s record as it is now, unless a write since its last change already
    /// did; a write that fails marks it to be written again. Once the record of an ended batch
    /// is on the disk, its working files go: not before, so that a batch that a crash leaves
    /// `finalizing` still finds its input and results when it resumes.
    ///
    /// The index's lock is held only to copy the record and to note the outcome: requests that
    /// read batches, and the runs that count their lines, do not wait for the disk. Writes of
    /// one batch take turns (`Entry::writer`, waited for off the async runtime's workers), so
    /// two changes at once (a cancel as the batch ends) reach the disk in the order they were
    /// made.
    fn persist(&self, id: &str) {
        let Some(writer) = self.lock().0.get(id).map(|e| e.writer.clone()) else {
            return;
        };
        let _turn = blocking(|| writer.lock().unwrap_or_else(|p| p.into_inner()));
        let (record, version) = {
            let inner = self.lock();
            match inner.0.get(id) {
                Some(e) if e.written != e.version => (e.record.clone(), e.version),
                _ => return,
            }
        };
        let saved = self.save(&record);
        let mut inner = self.lock();
        let Some(e) = inner.0.get_mut(id) else { return };
        match saved {
            Ok(()) => {
                e.written = version;
                e.unsaved = false;
                drop(inner);
                if !record.object.status.running() {
                    remove_working_files(&self.dir, id);
                }
            }
            Err(err) => {
                if !e.unsaved {
                    tracing::error!(batch = %id, "cannot write the batch's record (tried again every few seconds): {err}");
                }
                e.unsaved = true;
            }
        }
    }

    /// Writes again the records whose last change could not be written; how many are still
    /// unwritten. The server runs this every few seconds and as it stops.
    pub fn save_unsaved(&self) -> usize {
        let ids: Vec<String> = self
            .lock()
            .0
            .iter()
            .filter(|(_, e)| e.unsaved)
            .map(|(id, _)| id.clone())
            .collect();
        let mut left = 0;
        for id in ids {
            self.persist(&id);
            match self.lock().0.get(&id) {
                Some(e) if e.unsaved => left += 1,
                Some(_) => {
                    tracing::info!(batch = %id, "the batch's record was written after all")
                }
                None => {}
            }
        }
        left
    }

    pub fn cancel(&self, owner: &Owner, id: &str, now: u64) -> Result<BatchObject, ApiError> {
        let object = {
            let mut inner = self.lock();
            let entry = inner
                .0
                .get_mut(id)
                .filter(|e| &e.record.owner == owner)
                .ok_or_else(|| ApiError::NotFound(format!("No such Batch object: {id}")))?;
            entry.record.object.cancel(now)?;
            entry.cancel.cancel();
            entry.version += 1;
            entry.record.object.clone()
        };
        // The cancel took effect, so a record the disk has no room for is written later, not
        // the cancel refused.
        self.persist(id);
        Ok(object)
    }

    /// Tells `owner`'s webhook endpoints that batch `id` ended, once: queues the events (kept
    /// on disk with the webhooks) and then marks the batch's record told. A no-op for a batch
    /// still running or already told.
    pub fn notify_ended(&self, id: &str, webhooks: &Arc<Webhooks>) {
        let (owner, object) = {
            let mut inner = self.lock();
            let Some(e) = inner.0.get_mut(id) else { return };
            if e.record.notified || e.notifying || e.record.object.ended_at().is_none() {
                return;
            }
            e.notifying = true;
            (e.record.owner.clone(), e.record.object.clone())
        };
        // Outside the lock: the events are written down, each with its fsync.
        webhooks.batch_ended(&owner, &object);
        {
            let mut inner = self.lock();
            let Some(e) = inner.0.get_mut(id) else { return };
            e.notifying = false;
            e.record.notified = true;
            e.version += 1;
        }
        self.persist(id);
    }

    /// The batches that ended but whose webhook events were never queued (the server stopped
    /// in between).
    fn untold(&self) -> Vec<String> {
        self.lock()
            .0
            .values()
            .filter(|e| !e.record.notified && e.record.object.ended_at().is_some())
            .map(|e| e.record.object.id.clone())
            .collect()
    }

    /// Forgets the batches that ended before `cutoff` (unix seconds), records and all
    /// (`--batch-retention-days`); returns how many. Their output and error files are the Files
    /// API's, kept until they expire.
    pub fn remove_ended_before(&self, cutoff: u64) -> usize {
        let mut inner = self.lock();
        let old: Vec<String> = inner
            .0
            .values()
            .filter(|e| e.record.object.ended_at().is_some_and(|t| t < cutoff))
            .map(|e| e.record.object.id.clone())
            .collect();
        let mut removed = 0;
        for id in &old {
            let path = self.dir.join(format!("{id}.json"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Kept listed: a restart would read the record back.
                Err(e) => {
                    tracing::error!(batch = %id, "cannot remove the batch's record: {e}");
                    continue;
                }
            }
            inner.0.remove(id);
            removed += 1;
        }
        removed
    }

    /// The batches a restart interrupted, with their cancellation tokens (already cancelled for
    /// one that was cancelling).
    fn unfinished(&self) -> Vec<(Record, CancellationToken)> {
        let inner = self.lock();
        let mut entries: Vec<&Entry> = inner
            .0
            .values()
            .filter(|e| e.record.object.status.running())
            .collect();
        entries.sort_by_key(|e| e.seq);
        entries
            .into_iter()
            .map(|e| {
                if e.record.object.status == Status::Cancelling {
                    e.cancel.cancel();
                }
                (e.record.clone(), e.cancel.clone())
            })
            .collect()
    }
}

/// Resumes the batches a restart interrupted (`serve` calls it once the server is up; their
/// requests wait for the model to load).
pub fn resume(app: &Arc<App>) {
    for id in app.batches.untold() {
        tracing::info!(batch = %id, "telling webhooks of a batch that ended before a restart");
        app.batches.notify_ended(&id, &app.webhooks);
    }
    for (record, cancel) in app.batches.unfinished() {
        tracing::info!(batch = %record.object.id, status = record.object.status.as_str(), "resuming a batch");
        run::spawn(app, &record, cancel);
    }
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
        Phase::Loading | Phase::Ready | Phase::Leaving => {}
    }
    const FIELDS: &[&str] = &[
        "input_file_id",
        "endpoint",
        "completion_window",
        "metadata",
        "output_expires_after",
    ];
    let limit = app.config.limits.max_body_bytes;
    let fields = routes::json_object(&app, &headers, body, limit, FIELDS).await?;
    let f = Fields(&fields);
    let endpoint_name = f.required_string("endpoint")?;
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
    if f.required_string("completion_window")? != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            "invalid_value",
            "completion_window must be 24h",
        ));
    }
    let metadata = metadata(fields.get("metadata"))?;
    let output_ttl =
        expires_after_json(fields.get("output_expires_after"), "output_expires_after")?;
    let input_file_id = f.required_string("input_file_id")?;
    let now = unix_now();
    let owner = caller.owner();
    let input = app.files.get(&owner, input_file_id, now).map_err(|_| {
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
    let id = new_id("batch_");
    // The batch's own link to the input: deleting the file later does not take it away.
    let paths = run::Paths::of(&app, &id);
    let source = app.files.path(&input.id);
    // A copy's bytes are on the disk before the batch's record (which makes the link's name
    // durable too) says there is a batch.
    run::link_or_copy(&source, &paths.input)
        .await
        .map_err(storage_error)?;
    let window = app.config.files.completion_window;
    let object = BatchObject::new(
        id.clone(),
        endpoint,
        app.config.model.id.clone(),
        input.id.clone(),
        now,
        now + window.as_secs(),
        metadata,
    );
    let record = Record {
        object: object.clone(),
        owner,
        endpoint,
        output_ttl: output_ttl.unwrap_or(DEFAULT_TTL_SECS),
        notified: false,
    };
    let cancel = CancellationToken::new();
    if let Err(e) = app.batches.insert(record.clone(), cancel.clone()) {
        let _ = std::fs::remove_file(&paths.input);
        return Err(storage_error(e));
    }
    tracing::info!(batch = %id, input = %input.id, "batch created");
    run::spawn(&app, &record, cancel);
    Ok(Json(object))
}

pub async fn retrieve(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    routes::PathId(id): routes::PathId,
) -> Result<Json<BatchObject>, ApiError> {
    app.batches.get(&caller.owner(), &id).map(Json)
}

/// `GET /v1/batches`: the key's batches, newest first (`after`, `limit` 1-100, default 20).
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ListPage<BatchObject>>, ApiError> {
    // OpenAI's batch list has no `order`: newest first.
    let params = ListParams::parse(&query, (20, 100), &[])?;
    let batches = app.batches.list(&caller.owner());
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
    routes::PathId(id): routes::PathId,
) -> Result<Json<BatchObject>, ApiError> {
    let object = app.batches.cancel(&caller.owner(), &id, unix_now())?;
    tracing::info!(batch = %id, "batch cancelling");
    Ok(Json(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> BatchObject {
        BatchObject::new(
            "batch_1".into(),
            Endpoint::Generations,
            "sdxl-turbo".into(),
            "file-1".into(),
            1,
            86401,
            None,
        )
    }

    /// Key `k`'s batch `id` in `status`.
    fn record(id: &str, status: Status) -> Record {
        let mut object = batch();
        object.id = id.into();
        object.status = status;
        Record {
            object,
            owner: Some("k".into()),
            endpoint: Endpoint::Generations,
            output_ttl: 3600,
            notified: false,
        }
    }

    /// Batch `id`'s record as it is on the disk in `dir`.
    fn on_disk(dir: &std::path::Path, id: &str) -> Record {
        serde_json::from_slice(&std::fs::read(dir.join(format!("{id}.json"))).unwrap()).unwrap()
    }

    #[test]
    fn records_are_read_back_and_ended_batches_leave_no_working_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Batches::open(dir.path().to_path_buf()).unwrap();
        store
            .insert(
                record("batch_done", Status::Completed),
                CancellationToken::new(),
            )
            .unwrap();
        store
            .insert(
                record("batch_running", Status::InProgress),
                CancellationToken::new(),
            )
            .unwrap();
        for id in ["batch_done", "batch_running"] {
            std::fs::write(dir.path().join(format!("{id}.output.jsonl")), "x").unwrap();
        }
        drop(store);
        let store = Batches::open(dir.path().to_path_buf()).unwrap();
        let owner = Some("k".to_string());
        assert_eq!(store.list(&owner).len(), 2);
        assert!(!dir.path().join("batch_done.output.jsonl").exists());
        assert!(dir.path().join("batch_running.output.jsonl").exists());
        let unfinished: Vec<String> = store
            .unfinished()
            .into_iter()
            .map(|(r, _)| r.object.id)
            .collect();
        assert_eq!(unfinished, ["batch_running"]);
        assert!(store.get(&None, "batch_done").is_err(), "another owner's");
    }

    /// Batches that ended before the cutoff are forgotten, on disk too; running ones and those
    /// that ended later stay.
    #[test]
    fn batches_ended_long_ago_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Batches::open(dir.path().to_path_buf()).unwrap();
        let owner = Some("k".to_string());
        let add = |id: &str, f: &dyn Fn(&mut BatchObject)| {
            let mut object = batch();
            object.id = id.into();
            f(&mut object);
            let record = Record {
                object,
                owner: owner.clone(),
                endpoint: Endpoint::Generations,
                output_ttl: 3600,
                notified: false,
            };
            store.insert(record, CancellationToken::new()).unwrap();
        };
        add("batch_done_early", &|b| {
            b.start(2, 1);
            b.finish(100, Ending::Done);
        });
        add("batch_failed_early", &|b| b.fail(50, vec![]));
        add("batch_cancelled_late", &|b| {
            b.start(2, 1);
            b.cancel(10).unwrap();
            b.finish(500, Ending::Done);
        });
        add("batch_running", &|b| b.start(2, 1));
        add("batch_cancelling", &|b| {
            b.start(2, 1);
            b.cancel(10).unwrap();
        });
        assert_eq!(store.remove_ended_before(101), 2);
        assert_eq!(store.remove_ended_before(101), 0);
        let ids = |store: &Batches| -> Vec<String> {
            let mut ids: Vec<String> = store.list(&owner).into_iter().map(|b| b.id).collect();
            ids.sort();
            ids
        };
        let left = ["batch_cancelled_late", "batch_cancelling", "batch_running"];
        assert_eq!(ids(&store), left);
        assert!(store.get(&owner, "batch_done_early").is_err());
        assert!(!dir.path().join("batch_done_early.json").exists());
        drop(store);
        let store = Batches::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(ids(&store), left);
        assert_eq!(store.remove_ended_before(u64::MAX), 1);
        assert_eq!(ids(&store), ["batch_cancelling", "batch_running"]);
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

    /// A status change the disk had no room for is written once there is: a restart must not
    /// find the batch where it was before (a finished batch back in `in_progress`).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_record_a_full_disk_refused_is_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Batches::open(dir.path().to_path_buf()).unwrap();
        store
            .insert(
                record("batch_1", Status::InProgress),
                CancellationToken::new(),
            )
            .unwrap();
        let status = || on_disk(dir.path(), "batch_1").object.status;
        // The record's temporary file is /dev/full: its write fails with ENOSPC (and the failed
        // write removes it, so the next try has room).
        let full = || {
            std::os::unix::fs::symlink("/dev/full", dir.path().join("batch_1.json.tmp")).unwrap()
        };
        full();
        store.transition("batch_1", |b| b.finalizing(5));
        assert_eq!(status(), Status::InProgress);
        full();
        assert_eq!(store.save_unsaved(), 1);
        assert_eq!(status(), Status::InProgress);
        assert_eq!(store.save_unsaved(), 0);
        assert_eq!(status(), Status::Finalizing);
        // A cancel the disk cannot record still takes effect, and is written later.
        let cancel = CancellationToken::new();
        store
            .insert(record("batch_2", Status::InProgress), cancel.clone())
            .unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join("batch_2.json.tmp")).unwrap();
        let got = store.cancel(&Some("k".into()), "batch_2", 6).unwrap();
        assert_eq!(got.status, Status::Cancelling);
        assert!(cancel.is_cancelled());
        assert_eq!(store.save_unsaved(), 0);
        assert_eq!(
            on_disk(dir.path(), "batch_2").object.status,
            Status::Cancelling
        );
        assert!(!dir.path().join("batch_2.json.tmp").exists());
    }

    /// A batch's record is written without the index's lock: while a write waits for the disk
    /// (here: for its turn, held by the test), the batch reads with its new status, other
    /// batches change, and the change reaches the disk once the write goes on.
    #[test]
    fn reads_do_not_wait_for_a_record_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Batches::open(dir.path().to_path_buf()).unwrap());
        let owner: Owner = Some("k".into());
        for id in ["batch_1", "batch_2"] {
            store
                .insert(record(id, Status::InProgress), CancellationToken::new())
                .unwrap();
        }
        let on_disk = |id: &str| {
            let r = on_disk(dir.path(), id);
            (r.object.status, r.object.request_counts.completed)
        };
        let writer = store.lock().0["batch_1"].writer.clone();
        let turn = writer.lock().unwrap();
        let changing = {
            let store = store.clone();
            std::thread::spawn(move || store.transition("batch_1", |b| b.finalizing(5)))
        };
        let t0 = std::time::Instant::now();
        while store.get(&owner, "batch_1").unwrap().status != Status::Finalizing {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "the change never showed"
            );
            std::thread::yield_now();
        }
        assert_eq!(store.list(&owner).len(), 2);
        // Counted meanwhile: the waiting write writes the record as its turn finds it.
        store.update("batch_1", |b| b.record(true, None));
        store.transition("batch_2", |b| b.finalizing(6));
        assert_eq!(on_disk("batch_2"), (Status::Finalizing, 0));
        assert_eq!(
            on_disk("batch_1"),
            (Status::InProgress, 0),
            "its write waits"
        );
        assert!(!changing.is_finished());
        drop(turn);
        changing.join().unwrap();
        assert_eq!(on_disk("batch_1"), (Status::Finalizing, 1));
    }

    /// Changes of one batch made from many threads at once: the record on the disk ends as the
    /// last of them left it, though each is written outside the index's lock.
    #[test]
    fn the_last_change_of_a_batch_is_the_one_on_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Batches::open(dir.path().to_path_buf()).unwrap());
        store
            .insert(
                record("batch_1", Status::InProgress),
                CancellationToken::new(),
            )
            .unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        store.transition("batch_1", |b| b.record(true, None));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let counted = |store: &Batches| {
            let batch = store.get(&Some("k".into()), "batch_1").unwrap();
            batch.request_counts.completed
        };
        assert_eq!(counted(&store), 200);
        drop(store);
        assert_eq!(
            counted(&Batches::open(dir.path().to_path_buf()).unwrap()),
            200
        );
    }
}
