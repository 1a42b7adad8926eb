//! OpenAI's Uploads API: a file sent in parts, for clients that send large files that way
//! (the Python SDK's `client.uploads.upload_file_chunked`, 64 MB parts). `POST /v1/uploads`
//! announces a file (`bytes`, `filename`, `mime_type`, `purpose`), `POST
//! /v1/uploads/{id}/parts` adds a part (a form field `data`, up to 64 MiB), and `POST
//! /v1/uploads/{id}/complete` joins the parts it names, in that order, into a File of the Files
//! API (its bytes must add up to the announced `bytes`; an `md5` given is checked), which the
//! Batch API and edits then use as any uploaded file. `POST /v1/uploads/{id}/cancel` drops an
//! upload. An upload that is not completed within an hour expires.
//!
//! Parts wait on disk in `DIR/uploads/{upload}/{part}` (DIR the files directory), in memory
//! otherwise: an upload under way does not survive a restart (its parts are removed at start),
//! and is started again. An upload belongs to the key that made it: other keys get 404.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use md5::{Digest, Md5};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::Caller;
use super::error::ApiError;
use super::files::http::{
    expires_after_json, multipart_error, storage_error, Partial, FORM_OVERHEAD, MAX_FILENAME_BYTES,
    UPLOAD_PURPOSES,
};
use super::files::{new_id, unix_now, FileObject, Owner, DEFAULT_TTL_SECS};
use super::routes::{self, PathId};
use super::validate::Fields;
use super::App;

/// OpenAI's limit on one part.
pub const MAX_PART_BYTES: u64 = 64 << 20;
/// An upload not completed within this many seconds expires (OpenAI's hour).
pub const UPLOAD_TTL_SECS: u64 = 3600;
/// How long an upload that ended (completed, cancelled, expired) stays known after its expiry
/// time, so that a client that asks again about it gets its status, not a 404.
const ENDED_KEPT_SECS: u64 = 3600;

/// OpenAI's Upload object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UploadObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: u64,
    pub expires_at: u64,
    pub filename: String,
    pub purpose: String,
    /// `pending`, `completed`, `cancelled` or `expired`.
    pub status: &'static str,
    /// The File the parts became, once completed.
    pub file: Option<FileObject>,
}

/// OpenAI's Upload Part object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: u64,
    pub upload_id: String,
}

struct Upload {
    object: UploadObject,
    owner: Owner,
    /// The File's lifetime (`expires_after`), seconds.
    file_ttl: u64,
    /// The parts received, by id: their sizes.
    parts: HashMap<String, u64>,
    /// A completion is joining the parts: no part, completion or cancel meanwhile.
    completing: bool,
}

/// The uploads under way and those ended within the last while.
pub struct Uploads {
    dir: PathBuf,
    index: Mutex<HashMap<String, Upload>>,
}

impl Uploads {
    /// Uploads whose parts wait in `dir`; what a previous process left there goes.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Uploads {
            dir,
            index: Mutex::new(HashMap::new()),
        })
    }

    /// No uploads and no directory (see [`super::files::FileStore::without_disk`]).
    pub fn without_disk(dir: PathBuf) -> Self {
        Uploads {
            dir,
            index: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Upload>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn part_path(&self, upload: &str, part: &str) -> PathBuf {
        self.dir.join(upload).join(part)
    }

    /// Turns a pending upload past its hour `expired` and removes its parts.
    fn expire_if_due(&self, upload: &mut Upload, now: u64) {
        if upload.object.status == "pending"
            && !upload.completing
            && now >= upload.object.expires_at
        {
            upload.object.status = "expired";
            upload.parts.clear();
            let _ = std::fs::remove_dir_all(self.dir.join(&upload.object.id));
        }
    }

    /// The upload `id` of `owner`, expired first if it is due.
    fn get<'a>(
        &self,
        index: &'a mut HashMap<String, Upload>,
        owner: &Owner,
        id: &str,
        now: u64,
    ) -> Result<&'a mut Upload, ApiError> {
        let upload = index
            .get_mut(id)
            .filter(|u| &u.owner == owner)
            .ok_or_else(|| ApiError::NotFound(format!("No such Upload object: {id}")))?;
        self.expire_if_due(upload, now);
        Ok(upload)
    }

    /// [`Self::get`], when the upload can still `action` (take parts, be completed): pending
    /// and not being completed.
    fn pending<'a>(
        &self,
        index: &'a mut HashMap<String, Upload>,
        owner: &Owner,
        id: &str,
        action: &str,
    ) -> Result<&'a mut Upload, ApiError> {
        let upload = self.get(index, owner, id, unix_now())?;
        if upload.object.status != "pending" || upload.completing {
            return Err(not_pending(&upload.object, action));
        }
        Ok(upload)
    }

    /// Expires pending uploads past their hour and forgets ended ones an hour after that; how
    /// many were forgotten. The server's sweep runs this every few minutes.
    pub fn sweep(&self, now: u64) -> usize {
        let mut index = self.lock();
        for upload in index.values_mut() {
            self.expire_if_due(upload, now);
        }
        let before = index.len();
        index.retain(|_, u| {
            u.object.status == "pending" || now < u.object.expires_at + ENDED_KEPT_SECS
        });
        before - index.len()
    }
}

/// Why an upload in `status` takes no part, completion or cancel.
fn not_pending(upload: &UploadObject, action: &str) -> ApiError {
    let why = match upload.status {
        "completed" => "it is completed",
        "cancelled" => "it was cancelled",
        "expired" => "it expired (an upload must be completed within an hour of its creation)",
        _ => "it is being completed",
    };
    ApiError::invalid(
        "upload_id",
        "invalid_upload_state",
        format!("upload {} cannot {action}: {why}", upload.id),
    )
}

/// The MIME types an upload of `purpose` may announce (compared without parameters and case).
fn mime_types(purpose: &str) -> &'static [&'static str] {
    match purpose {
        "batch" => &[
            "application/jsonl",
            "application/x-jsonlines",
            "application/x-ndjson",
            "application/json",
            "text/jsonl",
            "text/plain",
            "application/octet-stream",
            // As some clients write it (the SDK's own docstring passes `mime_type="pdf"`).
            "jsonl",
            "json",
        ],
        _ => &[
            "image/png",
            "image/jpeg",
            "image/webp",
            "application/octet-stream",
            "png",
            "jpeg",
            "jpg",
            "webp",
        ],
    }
}

/// `POST /v1/uploads`.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<UploadObject>, ApiError> {
    const FIELDS: &[&str] = &["bytes", "filename", "mime_type", "purpose", "expires_after"];
    let fields = routes::json_object(
        &app,
        &headers,
        body,
        app.config.limits.max_body_bytes,
        FIELDS,
    )
    .await?;
    let f = Fields(&fields);
    let limit = app.config.files.max_file_bytes;
    let bytes = match fields.get("bytes") {
        Some(Value::Number(n)) => n.as_u64().filter(|&b| b >= 1),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "bytes",
                "missing_required_parameter",
                "Missing required parameter: 'bytes'.",
            ))
        }
        Some(_) => None,
    }
    .ok_or_else(|| {
        ApiError::invalid(
            "bytes",
            "invalid_value",
            "bytes must be the file's size, a whole number of at least 1",
        )
    })?;
    if bytes > limit {
        return Err(ApiError::invalid(
            "bytes",
            "invalid_value",
            format!(
                "this server takes files of at most {limit} bytes (--max-file-bytes), not {bytes}"
            ),
        ));
    }
    let filename = f.required_string("filename")?;
    if filename.is_empty() || filename.len() > MAX_FILENAME_BYTES {
        return Err(ApiError::invalid(
            "filename",
            "invalid_value",
            format!("filename must have 1 to {MAX_FILENAME_BYTES} bytes"),
        ));
    }
    let purpose = f.required_string("purpose")?;
    if !UPLOAD_PURPOSES.contains(&purpose) {
        return Err(ApiError::invalid(
            "purpose",
            "invalid_value",
            format!(
                "purpose must be batch, vision or user_data (the files this server uses), got {:?}",
                purpose.chars().take(64).collect::<String>()
            ),
        ));
    }
    let mime_type = f.required_string("mime_type")?;
    let essence = mime_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let allowed = mime_types(purpose);
    if !allowed.contains(&essence.as_str()) {
        return Err(ApiError::invalid(
            "mime_type",
            "invalid_value",
            format!(
                "a file of purpose {purpose} is one of {}, not {:?}",
                allowed.join(", "),
                mime_type.chars().take(64).collect::<String>()
            ),
        ));
    }
    let file_ttl = expires_after_json(fields.get("expires_after"), "expires_after")?;
    let now = unix_now();
    let object = UploadObject {
        id: new_id("upload_"),
        object: "upload",
        bytes,
        created_at: now,
        expires_at: now + UPLOAD_TTL_SECS,
        filename: filename.to_string(),
        purpose: purpose.to_string(),
        status: "pending",
        file: None,
    };
    // Room for the parts, which the completion copies into the file.
    app.files
        .check_space(bytes, app.config.files.min_free_bytes)?;
    let uploads = &app.uploads;
    std::fs::create_dir_all(uploads.dir.join(&object.id)).map_err(storage_error)?;
    uploads.lock().insert(
        object.id.clone(),
        Upload {
            object: object.clone(),
            owner: caller.owner(),
            file_ttl: file_ttl.unwrap_or(DEFAULT_TTL_SECS),
            parts: HashMap::new(),
            completing: false,
        },
    );
    tracing::info!(upload = %object.id, bytes, purpose, "upload created");
    Ok(Json(object))
}

/// `POST /v1/uploads/{id}/parts`: a form with the part as its field `data`, streamed to disk.
pub async fn add_part(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    PathId(upload_id): PathId,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PartObject>, ApiError> {
    let uploads = &app.uploads;
    let owner = caller.owner();
    uploads.pending(&mut uploads.lock(), &owner, &upload_id, "take parts")?;
    let boundary = routes::multipart_boundary(&headers, "multipart/form-data with a boundary")?;
    let declared = routes::declared_length(&headers);
    app.files
        .check_space(declared.unwrap_or(0), app.config.files.min_free_bytes)?;
    let mut form = multer::Multipart::with_constraints(
        body.into_data_stream(),
        boundary,
        multer::Constraints::new()
            .size_limit(multer::SizeLimit::new().whole_stream(MAX_PART_BYTES + FORM_OVERHEAD)),
    );
    let bad = |e| multipart_error(e, MAX_PART_BYTES);
    let id = new_id("part_");
    let path = uploads.part_path(&upload_id, &id);
    let mut partial = Partial(None);
    let mut bytes = None;
    while let Some(mut field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        if name != "data" {
            let shown: String = name.chars().take(64).collect();
            return Err(ApiError::invalid(
                &shown,
                "unknown_parameter",
                format!("Unknown parameter: '{shown}' (a part is sent as the form field data)"),
            ));
        }
        if bytes.is_some() {
            return Err(ApiError::invalid(
                "data",
                "invalid_value",
                "one data field per part",
            ));
        }
        partial.0 = Some(path.clone());
        let mut out = match tokio::fs::File::create(&path).await {
            Ok(out) => out,
            Err(e) => {
                // Cancelled or expired meanwhile: its directory went.
                let mut index = uploads.lock();
                let upload = uploads.get(&mut index, &owner, &upload_id, unix_now())?;
                if upload.object.status != "pending" {
                    return Err(not_pending(&upload.object, "take parts"));
                }
                return Err(storage_error(e));
            }
        };
        let mut n = 0u64;
        while let Some(chunk) = field.chunk().await.map_err(bad)? {
            n += chunk.len() as u64;
            if n > MAX_PART_BYTES {
                return Err(ApiError::PayloadTooLarge {
                    limit: MAX_PART_BYTES as usize,
                });
            }
            out.write_all(&chunk).await.map_err(storage_error)?;
        }
        out.flush().await.map_err(storage_error)?;
        bytes = Some(n);
    }
    let bytes = bytes.ok_or_else(|| {
        ApiError::invalid(
            "data",
            "missing_required_parameter",
            "data is required: the part's bytes, as a file field named data",
        )
    })?;
    let mut index = uploads.lock();
    let upload = uploads.pending(&mut index, &owner, &upload_id, "take parts")?;
    let received: u64 = upload.parts.values().sum();
    if received + bytes > upload.object.bytes {
        return Err(ApiError::invalid(
            "data",
            "invalid_value",
            format!(
                "the parts would hold {} bytes, more than the {} the upload announced",
                received + bytes,
                upload.object.bytes
            ),
        ));
    }
    upload.parts.insert(id.clone(), bytes);
    partial.0 = None;
    Ok(Json(PartObject {
        id,
        object: "upload.part",
        created_at: unix_now(),
        upload_id,
    }))
}

/// `POST /v1/uploads/{id}/complete`: `part_ids` in the file's order, optionally its `md5`.
pub async fn complete(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    PathId(upload_id): PathId,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<UploadObject>, ApiError> {
    let fields = routes::json_object(
        &app,
        &headers,
        body,
        app.config.limits.max_body_bytes,
        &["part_ids", "md5"],
    )
    .await?;
    let part_ids: Vec<String> = match fields.get("part_ids") {
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ApiError::invalid("part_ids", "invalid_type", "part_ids must be strings")
            })?,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "part_ids",
                "missing_required_parameter",
                "Missing required parameter: 'part_ids'.",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "part_ids",
                "invalid_type",
                "part_ids must be an array of part ids",
            ))
        }
    };
    let md5 = Fields(&fields).string("md5")?.map(str::to_ascii_lowercase);
    let uploads = &app.uploads;
    let owner = caller.owner();
    let (object, file_ttl) = {
        let mut index = uploads.lock();
        let upload = uploads.pending(&mut index, &owner, &upload_id, "be completed")?;
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        for id in &part_ids {
            let Some(&n) = upload.parts.get(id) else {
                return Err(ApiError::invalid(
                    "part_ids",
                    "invalid_value",
                    format!(
                        "{:?} is not a part of upload {upload_id}",
                        id.chars().take(64).collect::<String>()
                    ),
                ));
            };
            if !seen.insert(id) {
                return Err(ApiError::invalid(
                    "part_ids",
                    "invalid_value",
                    format!("part {id} is listed twice"),
                ));
            }
            total += n;
        }
        if total != upload.object.bytes {
            return Err(ApiError::invalid(
                "part_ids",
                "invalid_value",
                format!(
                    "the parts listed hold {total} bytes; the upload announced {}",
                    upload.object.bytes
                ),
            ));
        }
        app.files
            .check_space(upload.object.bytes, app.config.files.min_free_bytes)?;
        upload.completing = true;
        (upload.object.clone(), upload.file_ttl)
    };
    let joined = join_parts(&app, &object, &part_ids, md5.as_deref(), file_ttl, &owner).await;
    let mut index = uploads.lock();
    let upload = index
        .get_mut(&upload_id)
        .ok_or_else(|| ApiError::NotFound(format!("No such Upload object: {upload_id}")))?;
    upload.completing = false;
    let file = joined?;
    upload.object.status = "completed";
    upload.object.file = Some(file);
    upload.parts.clear();
    let _ = std::fs::remove_dir_all(uploads.dir.join(&upload_id));
    tracing::info!(upload = %upload_id, file = %upload.object.file.as_ref().map_or("", |f| &f.id), "upload completed");
    Ok(Json(upload.object.clone()))
}

/// The parts, in order, into a new File of the upload's name and purpose, checked against
/// `md5` when given.
async fn join_parts(
    app: &App,
    upload: &UploadObject,
    part_ids: &[String],
    md5: Option<&str>,
    file_ttl: u64,
    owner: &Owner,
) -> Result<FileObject, ApiError> {
    let id = new_id("file-");
    let path = app.files.path(&id);
    let mut partial = Partial(Some(path.clone()));
    let mut out = tokio::fs::File::create(&path)
        .await
        .map_err(storage_error)?;
    let mut hash = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    for part in part_ids {
        let mut input = tokio::fs::File::open(app.uploads.part_path(&upload.id, part))
            .await
            .map_err(storage_error)?;
        loop {
            let n = input.read(&mut buf).await.map_err(storage_error)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            out.write_all(&buf[..n]).await.map_err(storage_error)?;
        }
    }
    out.flush().await.map_err(storage_error)?;
    // On the disk before its record names it (`FileStore::insert`).
    out.sync_all().await.map_err(storage_error)?;
    if let Some(expected) = md5 {
        let got = hex::encode(hash.finalize());
        if got != expected {
            return Err(ApiError::invalid(
                "md5",
                "invalid_value",
                format!("the parts' MD5 is {got}, not {expected}"),
            ));
        }
    }
    let object = FileObject::new(
        id,
        upload.filename.clone(),
        &upload.purpose,
        upload.bytes,
        file_ttl,
    );
    let object = app
        .files
        .insert(object, owner.clone())
        .map_err(storage_error)?;
    partial.0 = None;
    Ok(object)
}

/// `POST /v1/uploads/{id}/cancel`.
pub async fn cancel(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    PathId(upload_id): PathId,
) -> Result<Json<UploadObject>, ApiError> {
    let uploads = &app.uploads;
    let mut index = uploads.lock();
    let upload = uploads.get(&mut index, &caller.owner(), &upload_id, unix_now())?;
    match upload.object.status {
        "cancelled" => {}
        "pending" if !upload.completing => {
            upload.object.status = "cancelled";
            upload.parts.clear();
            let _ = std::fs::remove_dir_all(uploads.dir.join(&upload_id));
            tracing::info!(upload = %upload_id, "upload cancelled");
        }
        _ => return Err(not_pending(&upload.object, "be cancelled")),
    }
    Ok(Json(upload.object.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(uploads: &Uploads, id: &str, created_at: u64) {
        std::fs::create_dir_all(uploads.dir.join(id)).unwrap();
        std::fs::write(uploads.part_path(id, "part_1"), b"abc").unwrap();
        uploads.lock().insert(
            id.into(),
            Upload {
                object: UploadObject {
                    id: id.into(),
                    object: "upload",
                    bytes: 10,
                    created_at,
                    expires_at: created_at + UPLOAD_TTL_SECS,
                    filename: "f".into(),
                    purpose: "batch".into(),
                    status: "pending",
                    file: None,
                },
                owner: Some("k".into()),
                file_ttl: DEFAULT_TTL_SECS,
                parts: HashMap::from([("part_1".to_string(), 3)]),
                completing: false,
            },
        );
    }

    /// A pending upload expires at its hour (its parts leave the disk), an ended one is
    /// forgotten an hour later, and an upload being completed never expires under it.
    #[test]
    fn uploads_expire_after_an_hour_and_are_forgotten_an_hour_later() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("uploads");
        std::fs::create_dir_all(dir.join("upload_left_over")).unwrap();
        let uploads = Uploads::open(dir.clone()).unwrap();
        assert!(
            !dir.join("upload_left_over").exists(),
            "a previous run's parts go"
        );
        let t0 = 1_000_000;
        pending(&uploads, "upload_a", t0);
        pending(&uploads, "upload_b", t0);
        uploads.lock().get_mut("upload_b").unwrap().completing = true;
        let owner = Some("k".to_string());

        assert_eq!(uploads.sweep(t0 + UPLOAD_TTL_SECS - 1), 0);
        {
            let mut index = uploads.lock();
            let a = uploads
                .get(&mut index, &owner, "upload_a", t0 + 10)
                .unwrap();
            assert_eq!(a.object.status, "pending");
            assert!(uploads
                .get(&mut index, &Some("other".into()), "upload_a", t0)
                .is_err());
        }
        assert_eq!(uploads.sweep(t0 + UPLOAD_TTL_SECS), 0);
        {
            let mut index = uploads.lock();
            let a = uploads
                .get(&mut index, &owner, "upload_a", t0 + UPLOAD_TTL_SECS)
                .unwrap();
            assert_eq!(a.object.status, "expired");
            assert!(a.parts.is_empty());
            let b = uploads
                .get(&mut index, &owner, "upload_b", t0 + UPLOAD_TTL_SECS)
                .unwrap();
            assert_eq!(b.object.status, "pending");
        }
        assert!(!dir.join("upload_a").exists());
        assert!(dir.join("upload_b").join("part_1").exists());
        let later = t0 + UPLOAD_TTL_SECS + ENDED_KEPT_SECS;
        assert_eq!(uploads.sweep(later), 1);
        let mut index = uploads.lock();
        assert!(uploads.get(&mut index, &owner, "upload_a", later).is_err());
        assert!(uploads.get(&mut index, &owner, "upload_b", later).is_ok());
    }
}
