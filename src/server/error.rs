//! Errors in three layers (TEI's shape): [`BackendError`] (the model failed), [`InferError`]
//! (the request could not be served: queue, timeout, shutdown, backend), [`ApiError`] (what
//! the HTTP layer answers). [`ApiError::info`] is the one table from error kind to HTTP
//! status, OpenAI error `type`/`code` and metrics label; every error response goes through it
//! and carries OpenAI's body `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The model failed on a batch. Cloned to every request of that batch, hence text only.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("image generation failed on {device}: {message}")]
    Failed { device: String, message: String },
    #[error("the model worker on {device} panicked: {message}")]
    Panicked { device: String, message: String },
    #[error("the model worker stopped before generating this image")]
    WorkerGone,
    /// The image ran out of the device's memory in a batch of its own: sent again, it would
    /// fail the same way (and, batched with others, make their batch run out of memory first).
    #[error("image generation failed on {device}: {message}")]
    DoesNotFit { device: String, message: String },
    /// Every device failed in a way that leaves it unusable (a CUDA fault poisons its context
    /// until the process exits): the image never ran and the server is stopping.
    #[error("no device of this server is usable any more ({device}: {message}); retry on another server or after this one restarts")]
    DeviceFailed { device: String, message: String },
}

/// A valid request that could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error(
        "the server is at capacity: {queued} images are queued (at most {capacity}) and this \
         request needs {requested}; retry after {} s",
        retry_after.as_secs()
    )]
    QueueFull {
        queued: usize,
        requested: usize,
        capacity: usize,
        retry_after: Duration,
    },
    #[error("the request timed out after {} s before all its images were generated", after.as_secs())]
    Timeout { after: Duration },
    #[error("the model is still loading; retry shortly")]
    NotReady,
    /// `--max-buffered-input-bytes` stayed taken by other requests' bodies for as long as a
    /// body may stall (`--request-body-timeout`).
    #[error(
        "the server is overloaded: other requests' bodies and images fill the {} MiB it holds \
         in memory at once, and this request's body could not be read within {} s; retry \
         after {} s",
        max_bytes >> 20,
        waited.as_secs(),
        super::inputs::RETRY_AFTER.as_secs()
    )]
    InputMemoryFull { max_bytes: u64, waited: Duration },
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
    /// The shutdown stopped waiting for the work under way (its grace ran out, or a second
    /// stop signal came) before this request's images were done.
    #[error(
        "the server is shutting down and stopped before this request's images were done; retry"
    )]
    StoppedFirst,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("encoding the image as {format} failed: {message}")]
    Encode {
        format: &'static str,
        message: String,
    },
    #[error("cannot store the image for its URL: {0}")]
    Store(String),
    /// Reading or writing a file of the Files API (`--files-dir`) failed.
    #[error("file storage failed: {0}")]
    Files(String),
    /// An upload would leave the files directory's disk with less free space than the server
    /// keeps (`--min-free-disk-bytes`).
    #[error(
        "the server's file storage is nearly full: {available} bytes are free, and this upload \
         of {incoming} bytes would leave less than the {keep_free} it keeps free for running \
         batches; delete files you no longer need (DELETE /v1/files/{{id}}) or retry later"
    )]
    StorageFull {
        available: u64,
        incoming: u64,
        keep_free: u64,
    },
    /// A write to the files directory failed for want of space (its disk or quota is full).
    #[error(
        "the server's file storage is full ({0}); delete files you no longer need \
         (DELETE /v1/files/{{id}}) or retry later"
    )]
    DiskFull(String),
}

/// What the HTTP layer answers with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A field is missing, of the wrong type, out of bounds, unknown or unsupported.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("{0}")]
    InvalidJson(String),
    #[error("the request body must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error(
        "The model `{}` does not exist or you do not have access to it.",
        super::validate::echoed(.0)
    )]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error(
        "the request body stalled: nothing of it arrived for {} s; send the whole body at once",
        after.as_secs()
    )]
    BodyTimeout { after: Duration },
    /// A compressed request body (`Content-Encoding: gzip` and the like).
    #[error(
        "Content-Encoding {0} is not supported: send the request body uncompressed (without a \
         Content-Encoding header)"
    )]
    UnsupportedEncoding(String),
    #[error("Content-Type must be {expected}, got {}", got.as_deref().unwrap_or("none"))]
    UnsupportedMediaType {
        got: Option<String>,
        expected: &'static str,
    },
    #[error(
        "You didn't provide an API key. Provide it in the Authorization header with Bearer \
         auth (Authorization: Bearer YOUR_KEY)."
    )]
    MissingApiKey,
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    #[error(
        "The API key of this request is no longer configured: it was removed from the keys file \
         while the request was under way."
    )]
    KeyRemoved,
    #[error(
        "rate limit reached for {kind} per minute: limit {limit}, this request needs {needed}; \
         retry after {} s",
        retry_after.as_secs()
    )]
    RateLimited {
        kind: &'static str,
        limit: u32,
        needed: u32,
        retry_after: Duration,
    },
    /// The runtime could not start a thread for the request (the process is at its limit on
    /// threads: a container's pids limit, `ulimit -u`).
    #[error(
        "the server could not start a thread for this request: its process is at its limit on \
         threads or processes (a container's pids limit, ulimit -u); retry after {} s",
        NO_THREADS_RETRY_AFTER.as_secs()
    )]
    NoThreads,
    /// The files directory could not be made (the server's temporary directory is not
    /// writable, and `--files-dir` was not given): the routes that need it answer this.
    #[error(
        "the Files, Uploads, Batches and webhook endpoints APIs are unavailable on this server: \
         it has no writable directory for them (its operator can set --files-dir); image \
         generations and edits are served"
    )]
    FilesUnavailable,
    /// The request's handler panicked: a bug, answered rather than left as a closed connection.
    #[error(
        "the server failed while handling this request ({0}); this is a bug in turbine, please \
         report it with the x-request-id"
    )]
    Panicked(String),
    /// A LoRA adapter could not be built on the devices for a reason not in the request (out of
    /// device memory, a device failed): `POST /v1/load_lora_adapter`.
    #[error("{0}")]
    AdapterNotBuilt(String),
    #[error(transparent)]
    Infer(#[from] InferError),
}

/// How long a request refused for want of threads is asked to wait.
pub const NO_THREADS_RETRY_AFTER: Duration = Duration::from_secs(1);

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        ApiError::Infer(InferError::Backend(e))
    }
}

/// One row of the status table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorInfo {
    pub status: StatusCode,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// OpenAI's error `code` (when the kind has a fixed one).
    pub code: Option<&'static str>,
    /// The `type` label of `turbine_errors_total`.
    pub metric: &'static str,
}

const INVALID: &str = "invalid_request_error";
const SERVER: &str = "server_error";

impl ApiError {
    pub fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
            code,
        }
    }

    /// The status table.
    pub fn info(&self) -> ErrorInfo {
        use StatusCode as S;
        let row = |status, kind, code, metric| ErrorInfo {
            status,
            kind,
            code,
            metric,
        };
        match self {
            ApiError::InvalidRequest { code, .. } => {
                row(S::BAD_REQUEST, INVALID, Some(*code), "invalid_request")
            }
            ApiError::InvalidJson(_) => row(S::BAD_REQUEST, INVALID, None, "invalid_json"),
            ApiError::NotAnObject(_) => row(S::UNPROCESSABLE_ENTITY, INVALID, None, "invalid_json"),
            ApiError::ModelNotFound(_) => row(
                S::NOT_FOUND,
                INVALID,
                Some("model_not_found"),
                "model_not_found",
            ),
            ApiError::NotFound(_) => row(S::NOT_FOUND, INVALID, None, "not_found"),
            ApiError::MethodNotAllowed { .. } => {
                row(S::METHOD_NOT_ALLOWED, INVALID, None, "method_not_allowed")
            }
            ApiError::PayloadTooLarge { .. } => {
                row(S::PAYLOAD_TOO_LARGE, INVALID, None, "payload_too_large")
            }
            ApiError::BodyTimeout { .. } => row(
                S::REQUEST_TIMEOUT,
                INVALID,
                Some("request_body_timeout"),
                "body_timeout",
            ),
            ApiError::UnsupportedMediaType { .. } => row(
                S::UNSUPPORTED_MEDIA_TYPE,
                INVALID,
                None,
                "unsupported_media_type",
            ),
            ApiError::UnsupportedEncoding(_) => row(
                S::UNSUPPORTED_MEDIA_TYPE,
                INVALID,
                Some("unsupported_content_encoding"),
                "unsupported_encoding",
            ),
            ApiError::MissingApiKey => row(
                S::UNAUTHORIZED,
                INVALID,
                Some("missing_api_key"),
                "unauthorized",
            ),
            ApiError::InvalidApiKey => row(
                S::UNAUTHORIZED,
                INVALID,
                Some("invalid_api_key"),
                "unauthorized",
            ),
            ApiError::KeyRemoved => row(
                S::UNAUTHORIZED,
                INVALID,
                Some("api_key_removed"),
                "unauthorized",
            ),
            ApiError::RateLimited { kind, .. } => row(
                S::TOO_MANY_REQUESTS,
                kind,
                Some("rate_limit_exceeded"),
                "rate_limited",
            ),
            ApiError::NoThreads => row(
                S::SERVICE_UNAVAILABLE,
                SERVER,
                Some("server_overloaded"),
                "no_threads",
            ),
            ApiError::FilesUnavailable => row(
                S::SERVICE_UNAVAILABLE,
                SERVER,
                Some("files_unavailable"),
                "files_unavailable",
            ),
            ApiError::Panicked(_) => row(S::INTERNAL_SERVER_ERROR, SERVER, None, "panic"),
            ApiError::AdapterNotBuilt(_) => row(
                S::INTERNAL_SERVER_ERROR,
                SERVER,
                Some("lora_adapter_not_built"),
                "lora_adapter_not_built",
            ),
            ApiError::Infer(e) => match e {
                InferError::QueueFull { .. } => row(
                    S::TOO_MANY_REQUESTS,
                    SERVER,
                    Some("queue_full"),
                    "queue_full",
                ),
                InferError::Timeout { .. } => {
                    row(S::SERVICE_UNAVAILABLE, SERVER, Some("timeout"), "timeout")
                }
                InferError::NotReady => row(
                    S::SERVICE_UNAVAILABLE,
                    SERVER,
                    Some("model_loading"),
                    "not_ready",
                ),
                InferError::InputMemoryFull { .. } => row(
                    S::SERVICE_UNAVAILABLE,
                    SERVER,
                    Some("server_overloaded"),
                    "input_memory_full",
                ),
                InferError::ShuttingDown | InferError::StoppedFirst => row(
                    S::SERVICE_UNAVAILABLE,
                    SERVER,
                    Some("shutting_down"),
                    "shutting_down",
                ),
                InferError::Backend(BackendError::DeviceFailed { .. }) => row(
                    S::SERVICE_UNAVAILABLE,
                    SERVER,
                    Some("device_failed"),
                    "device_failed",
                ),
                InferError::Backend(BackendError::Panicked { .. }) => {
                    row(S::INTERNAL_SERVER_ERROR, SERVER, None, "backend_panic")
                }
                InferError::Backend(BackendError::DoesNotFit { .. }) => {
                    row(S::INTERNAL_SERVER_ERROR, SERVER, None, "does_not_fit")
                }
                InferError::Backend(_) => row(S::INTERNAL_SERVER_ERROR, SERVER, None, "backend"),
                InferError::Encode { .. } => row(S::INTERNAL_SERVER_ERROR, SERVER, None, "encode"),
                InferError::Store(_) => row(S::INTERNAL_SERVER_ERROR, SERVER, None, "store"),
                InferError::Files(_) => row(S::INTERNAL_SERVER_ERROR, SERVER, None, "files"),
                InferError::StorageFull { .. } | InferError::DiskFull(_) => row(
                    S::INSUFFICIENT_STORAGE,
                    SERVER,
                    Some("insufficient_storage"),
                    "storage_full",
                ),
            },
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// How long a client should wait before retrying, where that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after, .. }
            | ApiError::Infer(InferError::QueueFull { retry_after, .. }) => Some(*retry_after),
            ApiError::Infer(InferError::NotReady) => Some(Duration::from_secs(1)),
            ApiError::NoThreads => Some(NO_THREADS_RETRY_AFTER),
            ApiError::Infer(InferError::InputMemoryFull { .. }) => Some(super::inputs::RETRY_AFTER),
            _ => None,
        }
    }

    /// Whether a retry would come back the same, so the response says `x-should-retry: false`
    /// where the status alone would mislead a client. OpenAI's SDKs (and the gateways built on
    /// them) retry every 5xx, 408, 409 and 429, twice by default with backoff, unless told so;
    /// for these a retry only costs: an upload sent again in full, or an image that does not
    /// fit run again (batched with others, it makes their batch run out of memory and split
    /// first).
    pub fn retry_is_futile(&self) -> bool {
        matches!(
            self,
            ApiError::Panicked(_)
                | ApiError::FilesUnavailable
                | ApiError::Infer(
                    InferError::Backend(BackendError::DoesNotFit { .. })
                        | InferError::StorageFull { .. }
                        | InferError::DiskFull(_),
                )
        )
    }

    /// A 5xx that says what state the server is in (loading, draining, at a limit it keeps),
    /// not that something failed: logged as a warning. Under a rolling update or a burst, every
    /// request answered so logged an error, and alerts on error lines fired for servers doing
    /// what they should.
    pub fn is_expected_state(&self) -> bool {
        matches!(
            self,
            ApiError::NoThreads
                | ApiError::FilesUnavailable
                | ApiError::Infer(
                    InferError::NotReady
                        | InferError::ShuttingDown
                        | InferError::StoppedFirst
                        | InferError::InputMemoryFull { .. }
                        | InferError::Timeout { .. },
                )
        )
    }

    pub fn body(&self) -> ErrorBody {
        let info = self.info();
        ErrorBody {
            error: ErrorObject {
                message: self.to_string(),
                kind: info.kind.to_string(),
                param: self.param().map(str::to_string),
                code: info.code.map(str::to_string),
            },
        }
    }
}

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Put on error responses so the metrics layer can count errors by type.
#[derive(Debug, Clone, Copy)]
pub struct ErrorMetric(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let info = self.info();
        if info.status.is_server_error() && self.is_expected_state() {
            tracing::warn!(status = info.status.as_u16(), "{self}");
        } else if info.status.is_server_error() {
            tracing::error!(status = info.status.as_u16(), "{self}");
        } else {
            tracing::debug!(status = info.status.as_u16(), "{self}");
        }
        let mut response = (info.status, axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up, never 0 (clients treat 0 as "retry at once").
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            let headers = response.headers_mut();
            headers.insert("retry-after", HeaderValue::from(secs.max(1)));
            headers.insert(
                "retry-after-ms",
                HeaderValue::from(after.as_millis().max(1) as u64),
            );
        }
        if self.retry_is_futile() {
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if matches!(self, ApiError::PayloadTooLarge { .. }) {
            // The unread rest of the body makes the connection unusable: tell the client not
            // to send its next request on it.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
        }
        response.extensions_mut().insert(ErrorMetric(info.metric));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_covers_the_statuses_the_sdks_map() {
        let cases: Vec<(ApiError, u16)> = vec![
            (ApiError::invalid("n", "integer_above_max_value", "n"), 400),
            (ApiError::InvalidJson("bad".into()), 400),
            (ApiError::NotAnObject("an array"), 422),
            (ApiError::MissingApiKey, 401),
            (ApiError::InvalidApiKey, 401),
            (ApiError::KeyRemoved, 401),
            (ApiError::ModelNotFound("x".into()), 404),
            (ApiError::PayloadTooLarge { limit: 10 }, 413),
            (ApiError::UnsupportedEncoding("gzip".into()), 415),
            (
                ApiError::UnsupportedMediaType {
                    got: None,
                    expected: "application/json",
                },
                415,
            ),
            (
                ApiError::RateLimited {
                    kind: "requests",
                    limit: 1,
                    needed: 1,
                    retry_after: Duration::from_millis(1500),
                },
                429,
            ),
            (
                InferError::QueueFull {
                    queued: 1,
                    requested: 1,
                    capacity: 1,
                    retry_after: Duration::from_secs(3),
                }
                .into(),
                429,
            ),
            (BackendError::WorkerGone.into(), 500),
            (
                BackendError::DeviceFailed {
                    device: "cuda:0".into(),
                    message: "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS)".into(),
                }
                .into(),
                503,
            ),
            (InferError::ShuttingDown.into(), 503),
            (InferError::StoppedFirst.into(), 503),
            (InferError::NotReady.into(), 503),
            (
                InferError::InputMemoryFull {
                    max_bytes: 1 << 30,
                    waited: Duration::from_secs(60),
                }
                .into(),
                503,
            ),
        ];
        for (err, status) in cases {
            assert_eq!(err.info().status.as_u16(), status, "{err:?}");
        }
    }

    #[test]
    fn the_server_errors_of_a_state_are_warnings_and_failures_errors() {
        let states: Vec<ApiError> = vec![
            InferError::NotReady.into(),
            InferError::ShuttingDown.into(),
            InferError::StoppedFirst.into(),
            InferError::InputMemoryFull {
                max_bytes: 1 << 30,
                waited: Duration::from_secs(60),
            }
            .into(),
            ApiError::NoThreads,
            ApiError::FilesUnavailable,
        ];
        for err in states {
            assert!(err.info().status.is_server_error(), "{err:?}");
            assert!(err.is_expected_state(), "{err:?}");
        }
        let failures: Vec<ApiError> = vec![
            BackendError::WorkerGone.into(),
            BackendError::DeviceFailed {
                device: "cuda:0".into(),
                message: "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS)".into(),
            }
            .into(),
            ApiError::Panicked("boom".into()),
        ];
        for err in failures {
            assert!(!err.is_expected_state(), "{err:?}");
        }
    }

    #[test]
    fn body_has_openai_shape_and_param() {
        let err = ApiError::invalid("size", "invalid_value", "size must be WxH, got \"abc\"");
        let json = serde_json::to_value(err.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "size must be WxH, got \"abc\"",
                "type": "invalid_request_error",
                "param": "size",
                "code": "invalid_value",
            }})
        );
    }

    #[test]
    fn retry_after_is_rounded_up_to_whole_seconds() {
        let err = ApiError::RateLimited {
            kind: "images",
            limit: 4,
            needed: 2,
            retry_after: Duration::from_millis(1200),
        };
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1200");
    }

    /// `x-should-retry: false` on the errors a retry cannot fix, none elsewhere: the SDKs then
    /// go by the status (they retry 408, 409, 429 and 5xx).
    #[test]
    fn errors_a_retry_cannot_fix_say_so() {
        let header = |e: ApiError| {
            let response = e.into_response();
            let value = response.headers().get("x-should-retry").cloned();
            (response.status().as_u16(), value)
        };
        let no = Some(HeaderValue::from_static("false"));
        let does_not_fit = BackendError::DoesNotFit {
            device: "cuda:0".into(),
            message: "one 1536x1536 image does not fit in cuda:0's free memory: \
                      CUDA_ERROR_OUT_OF_MEMORY"
                .into(),
        };
        assert_eq!(header(does_not_fit.into()), (500, no.clone()));
        assert_eq!(header(ApiError::Panicked("boom".into())), (500, no.clone()));
        assert_eq!(header(ApiError::FilesUnavailable), (503, no.clone()));
        let full = InferError::StorageFull {
            available: 1,
            incoming: 2,
            keep_free: 3,
        };
        assert_eq!(header(full.into()), (507, no.clone()));
        assert_eq!(
            header(InferError::DiskFull("ENOSPC".into()).into()),
            (507, no)
        );
        // Worth retrying, on this server or another: the status says it.
        let failed = BackendError::Failed {
            device: "cuda:0".into(),
            message: "device lost".into(),
        };
        let device_failed = BackendError::DeviceFailed {
            device: "cuda:0".into(),
            message: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
        };
        let queue_full = InferError::QueueFull {
            queued: 1,
            requested: 1,
            capacity: 1,
            retry_after: Duration::from_secs(3),
        };
        for (e, status) in [
            (failed.into(), 500),
            (device_failed.into(), 503),
            (queue_full.into(), 429),
            (
                InferError::Timeout {
                    after: Duration::from_secs(300),
                }
                .into(),
                503,
            ),
            (InferError::ShuttingDown.into(), 503),
            (
                ApiError::BodyTimeout {
                    after: Duration::from_secs(60),
                },
                408,
            ),
            (ApiError::invalid("n", "integer_above_max_value", "n"), 400),
        ] {
            assert_eq!(header(e), (status, None));
        }
    }
}
