//! The routes that keep things on disk, for the document: OpenAI's Files API (`/v1/files`), its
//! Uploads API (`/v1/uploads`), its Batch API (`/v1/batches`) and its webhook endpoints
//! (`/v1/webhook_endpoints`, `/v1/webhook_event_types`), as `files`, `uploads`, `batches` and
//! `webhooks` implement them. Request schemas are closed where the handlers refuse unknown
//! fields (all of them here), and `null` is "not given" where the handlers read it so. Every one
//! of these routes but `/v1/webhook_event_types` answers 503 `files_unavailable` while the
//! server has no files directory.

use serde_json::{json, Map, Value};

use super::{error_response, json_response, path_parameter, schema_ref};

use crate::server::files::http::{MAX_FILENAME_BYTES, UPLOAD_PURPOSES};
use crate::server::files::{DEFAULT_TTL_SECS, MAX_TTL_SECS, MIN_TTL_SECS};
use crate::server::uploads::{MAX_PART_BYTES, UPLOAD_TTL_SECS};
use crate::server::webhooks::{EVENT_TYPES, MAX_ENDPOINTS_PER_KEY};

/// The path items of the files, uploads, batches and webhook routes, keyed by path
/// ("/v1/files", "/v1/files/{id}", ...).
pub(super) fn paths() -> Map<String, Value> {
    let mut p = Map::new();
    p.insert(
        "/v1/files".into(),
        json!({
            "post": linked(create_file(), &["retrieve_file", "download_file", "delete_file"]),
            "get": list_files(),
        }),
    );
    p.insert(
        "/v1/files/{id}".into(),
        json!({ "get": retrieve_file(), "delete": delete_file() }),
    );
    p.insert(
        "/v1/files/{id}/content".into(),
        json!({ "get": download_file() }),
    );
    p.insert(
        "/v1/uploads".into(),
        json!({ "post": linked(
            example(
                create_upload(),
                json!({
                    "bytes": 1024, "filename": "batch.jsonl",
                    "mime_type": "application/jsonl", "purpose": "batch",
                }),
            ),
            &["add_upload_part", "complete_upload", "cancel_upload"],
        ) }),
    );
    p.insert(
        "/v1/uploads/{id}/parts".into(),
        json!({ "post": add_upload_part() }),
    );
    p.insert(
        "/v1/uploads/{id}/complete".into(),
        json!({ "post": complete_upload() }),
    );
    p.insert(
        "/v1/uploads/{id}/cancel".into(),
        json!({ "post": cancel_upload() }),
    );
    p.insert(
        "/v1/batches".into(),
        json!({
            "post": linked(create_batch(), &["retrieve_batch", "cancel_batch"]),
            "get": list_batches(),
        }),
    );
    p.insert(
        "/v1/batches/{id}".into(),
        json!({ "get": retrieve_batch() }),
    );
    p.insert(
        "/v1/batches/{id}/cancel".into(),
        json!({ "post": cancel_batch() }),
    );
    p.insert(
        "/v1/webhook_endpoints".into(),
        json!({
            "post": linked(
                example(
                    create_webhook_endpoint(),
                    json!({
                        "name": "batches", "url": "https://hooks.example.com/turbine",
                        "event_types": ["batch.completed", "batch.failed"],
                    }),
                ),
                &[
                    "retrieve_webhook_endpoint",
                    "update_webhook_endpoint",
                    "delete_webhook_endpoint",
                    "rotate_webhook_endpoint_secret",
                    "test_webhook_endpoint",
                ],
            ),
            "get": list_webhook_endpoints(),
        }),
    );
    p.insert(
        "/v1/webhook_endpoints/{id}".into(),
        json!({
            "get": retrieve_webhook_endpoint(),
            "post": update_webhook_endpoint(),
            "delete": delete_webhook_endpoint(),
        }),
    );
    p.insert(
        "/v1/webhook_endpoints/{id}/rotate_secret".into(),
        json!({ "post": rotate_webhook_endpoint_secret() }),
    );
    p.insert(
        "/v1/webhook_endpoints/{id}/test".into(),
        json!({ "post": test_webhook_endpoint() }),
    );
    p.insert(
        "/v1/webhook_event_types".into(),
        json!({ "get": list_webhook_event_types() }),
    );
    p
}

/// The component schemas those paths reference (`#/components/schemas/NAME`), keyed by NAME;
/// `max_file_bytes` is `--max-file-bytes`.
pub(super) fn schemas(max_file_bytes: u64) -> Map<String, Value> {
    let mut s = Map::new();
    // Files.
    s.insert("FileObject".into(), file_object());
    s.insert(
        "FileList".into(),
        list_of("FileObject", "A page of the key's files"),
    );
    s.insert(
        "FileDeleted".into(),
        response_object(vec![
            ("id", text()),
            ("object", json!({ "const": "file" })),
            ("deleted", json!({ "const": true })),
        ]),
    );
    s.insert("CreateFileForm".into(), create_file_form(max_file_bytes));
    // Uploads.
    s.insert("Upload".into(), upload_object());
    s.insert(
        "UploadPart".into(),
        response_object(vec![
            ("id", text()),
            ("object", json!({ "const": "upload.part" })),
            ("created_at", unix_time("When the part was received")),
            ("upload_id", text()),
        ]),
    );
    s.insert(
        "CreateUploadRequest".into(),
        create_upload_request(max_file_bytes),
    );
    s.insert(
        "UploadPartForm".into(),
        object(
            vec![(
                "data",
                json!({
                    "type": "string", "format": "binary",
                    "description": format!("The part's bytes, at most {} MiB (413 beyond)",
                        MAX_PART_BYTES >> 20),
                }),
            )],
            &["data"],
            true,
        ),
    );
    s.insert(
        "CompleteUploadRequest".into(),
        object(
            vec![
                (
                    "part_ids",
                    json!({
                        "type": "array", "items": { "type": "string" },
                        "minItems": 1, "uniqueItems": true,
                        "description": "The upload's parts in the file's order, each once; \
                            their sizes must add up to the upload's `bytes`",
                    }),
                ),
                (
                    "md5",
                    json!({
                        "type": ["string", "null"],
                        "description": "The file's MD5 in hex (any case), checked against the \
                            joined parts: a mismatch is a 400 and the upload stays pending",
                    }),
                ),
            ],
            &["part_ids"],
            true,
        ),
    );
    // Batches.
    s.insert("Batch".into(), batch_object());
    s.insert(
        "BatchList".into(),
        list_of("Batch", "A page of the key's batches, newest first"),
    );
    s.insert(
        "BatchRequestCounts".into(),
        response_object(vec![
            ("total", count("The input's requests (0 while validating)")),
            ("completed", count("Requests that made their images")),
            (
                "failed",
                count("Requests that failed, cancelled and expired ones included"),
            ),
        ]),
    );
    s.insert("BatchUsage".into(), batch_usage());
    s.insert(
        "BatchError".into(),
        response_object(vec![
            (
                "code",
                json!({
                    "type": "string",
                    "description": "`invalid_json_line`, `invalid_custom_id`, \
                        `duplicate_custom_id`, `invalid_method`, `mismatched_endpoint`, \
                        `invalid_body`, `too_many_requests`, `empty_file`; `server_error`, \
                        `api_key_removed` for a batch that could not run",
                }),
            ),
            ("message", text()),
            ("param", json!({ "type": ["string", "null"] })),
            (
                "line",
                json!({ "type": ["integer", "null"], "minimum": 1,
                        "description": "The input file's line at fault, from 1" }),
            ),
        ]),
    );
    s.insert("CreateBatchRequest".into(), create_batch_request());
    // Webhooks.
    s.insert(
        "WebhookEndpoint".into(),
        response_object(webhook_endpoint_properties()),
    );
    s.insert("WebhookEndpointWithSecret".into(), {
        let mut properties = webhook_endpoint_properties();
        properties.push((
            "signing_secret",
            json!({
                "type": "string",
                "description": "`whsec_` and base64: the key of the deliveries' signatures \
                    (Standard Webhooks). Shown at creation and rotation only",
            }),
        ));
        response_object(properties)
    });
    s.insert(
        "WebhookEndpointList".into(),
        list_of(
            "WebhookEndpoint",
            "A page of the key's endpoints, newest first",
        ),
    );
    s.insert(
        "WebhookEndpointDeleted".into(),
        response_object(vec![
            ("id", text()),
            ("object", json!({ "const": "webhook_endpoint.deleted" })),
            ("deleted", json!({ "const": true })),
        ]),
    );
    s.insert(
        "WebhookEndpointTestResult".into(),
        response_object(vec![
            ("object", json!({ "const": "webhook_endpoint.test" })),
            ("webhook_endpoint_id", text()),
            ("event_type", json!({ "enum": EVENT_TYPES })),
            (
                "status_code",
                json!({ "type": "integer", "minimum": 100, "maximum": 999,
                        "description": "The HTTP status the endpoint answered" }),
            ),
            (
                "success",
                json!({ "type": "boolean",
                        "description": "The endpoint answered the sample event with a 2xx" }),
            ),
        ]),
    );
    s.insert(
        "WebhookEventTypeList".into(),
        response_object(vec![
            ("object", json!({ "const": "list" })),
            (
                "data",
                json!({ "type": "array", "items": { "enum": EVENT_TYPES } }),
            ),
        ]),
    );
    s.insert(
        "CreateWebhookEndpointRequest".into(),
        object(
            vec![
                ("name", webhook_name(false)),
                ("url", webhook_url(false)),
                ("event_types", webhook_event_types(false)),
            ],
            &["name", "url", "event_types"],
            true,
        ),
    );
    s.insert(
        "UpdateWebhookEndpointRequest".into(),
        object(
            vec![
                ("name", webhook_name(true)),
                ("url", webhook_url(true)),
                ("event_types", webhook_event_types(true)),
            ],
            &[],
            true,
        ),
    );
    s.insert(
        "RotateWebhookSecretRequest".into(),
        object(
            vec![(
                "keep_old_secret_active_for_24_hours",
                json!({
                    "type": ["boolean", "null"], "default": false,
                    "description": "The old secret goes on signing (a second signature in \
                        `webhook-signature`) for 24 hours",
                }),
            )],
            &[],
            true,
        ),
    );
    s.insert(
        "TestWebhookEndpointRequest".into(),
        object(
            vec![(
                "event_type",
                json!({ "enum": EVENT_TYPES, "description": "The sample event's type" }),
            )],
            &["event_type"],
            true,
        ),
    );
    s
}

// Building blocks.

/// `op` with links from its 200's `id` to the `targets` operations' `id` parameter: what a
/// client (and schemathesis' stateful phase) does next with what it made.
fn linked(mut op: Value, targets: &[&str]) -> Value {
    let links: Map<String, Value> = targets
        .iter()
        .map(|target| {
            (
                target.to_string(),
                json!({ "operationId": target, "parameters": { "id": "$response.body#/id" } }),
            )
        })
        .collect();
    op["responses"]["200"]["links"] = Value::Object(links);
    op
}

/// The 200 whose body is the component `schema` as JSON, and the error shape for the rest.
fn json_responses(description: &str, schema: &str) -> Value {
    json!({ "200": json_response(description, schema), "default": error_response() })
}

/// The path parameter `id`.
fn id_parameter(description: &str) -> Value {
    path_parameter("id", description)
}

fn query_parameter(name: &str, description: &str, schema: Value) -> Value {
    json!({
        "name": name, "in": "query", "required": false, "description": description,
        "schema": schema,
    })
}

/// A list's `limit` (1 to `max`, `default` when absent) and `after`.
fn page_parameters(default: u64, max: u64, what: &str) -> Vec<Value> {
    vec![
        query_parameter(
            "limit",
            &format!("At most this many {what} (1 to {max}, {default} by default)"),
            json!({ "type": "integer", "minimum": 1, "maximum": max, "default": default }),
        ),
        query_parameter(
            "after",
            &format!(
                "The id of the last of the {what} before: the page after it (an id no longer \
                 listed ends the list)"
            ),
            json!({ "type": "string" }),
        ),
    ]
}

/// `op` with `value` as its JSON body's example: what a client starts from, and what
/// schemathesis sends first (so that its stateful phase has an object to go on with).
fn example(mut op: Value, value: Value) -> Value {
    op["requestBody"]["content"]["application/json"]["examples"] =
        json!({ "example": { "value": value } });
    op
}

/// A JSON request body of the component `schema`; one that is not `required` may be empty.
fn json_body(required: bool, schema: &str) -> Value {
    json!({
        "required": required,
        "content": { "application/json": { "schema": schema_ref(schema) } },
    })
}

fn form_body(schema: &str) -> Value {
    json!({
        "required": true,
        "content": { "multipart/form-data": { "schema": schema_ref(schema) } },
    })
}

fn operation(
    id: &str,
    tag: &str,
    summary: &str,
    description: &str,
    parameters: Vec<Value>,
    request_body: Option<Value>,
    responses: Value,
) -> Value {
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "description": description,
        "tags": [tag],
        "responses": responses,
    });
    if !parameters.is_empty() {
        op["parameters"] = Value::Array(parameters);
    }
    if let Some(body) = request_body {
        op["requestBody"] = body;
    }
    op
}

/// An object of `properties`, the `required` ones always there; `closed`: no other fields.
fn object(properties: Vec<(&str, Value)>, required: &[&str], closed: bool) -> Value {
    let properties: Map<String, Value> = properties
        .into_iter()
        .map(|(name, schema)| (name.to_string(), schema))
        .collect();
    let mut schema = json!({ "type": "object", "properties": properties });
    if !required.is_empty() {
        schema["required"] = json!(required);
    }
    if closed {
        schema["additionalProperties"] = Value::Bool(false);
    }
    schema
}

/// A response's object, which always carries every one of its `properties`.
fn response_object(properties: Vec<(&str, Value)>) -> Value {
    let required: Vec<&str> = properties.iter().map(|(name, _)| *name).collect();
    object(properties, &required, false)
}

/// One page of a list: `{"object": "list", "data", "first_id", "last_id", "has_more"}`.
fn list_of(item: &str, description: &str) -> Value {
    let mut schema = response_object(vec![
        ("object", json!({ "const": "list" })),
        (
            "data",
            json!({ "type": "array", "items": schema_ref(item) }),
        ),
        (
            "first_id",
            json!({ "type": ["string", "null"], "description": "null on an empty page" }),
        ),
        (
            "last_id",
            json!({ "type": ["string", "null"],
                    "description": "The next page's `after`; null on an empty page" }),
        ),
        ("has_more", json!({ "type": "boolean" })),
    ]);
    schema["description"] = json!(description);
    schema
}

fn text() -> Value {
    json!({ "type": "string" })
}

fn count(description: &str) -> Value {
    json!({ "type": "integer", "minimum": 0, "description": description })
}

fn unix_time(description: &str) -> Value {
    json!({ "type": "integer", "minimum": 0, "description": format!("{description} (unix seconds)") })
}

fn nullable_unix_time(description: &str) -> Value {
    json!({ "type": ["integer", "null"], "minimum": 0,
            "description": format!("{description} (unix seconds)") })
}

/// OpenAI's `expires_after` in a JSON body: `null` or absent is the default.
fn expires_after(description: &str) -> Value {
    json!({
        "type": ["object", "null"],
        "description": description,
        "required": ["anchor", "seconds"],
        "properties": {
            "anchor": { "enum": ["created_at"] },
            "seconds": {
                "type": ["integer", "string"],
                "minimum": MIN_TTL_SECS,
                "maximum": MAX_TTL_SECS,
                "description": format!("{MIN_TTL_SECS} (one hour) to {MAX_TTL_SECS} (30 days); \
                    its decimal text is taken too"),
            },
        },
    })
}

// Files.

fn file_object() -> Value {
    let mut purposes: Vec<&str> = UPLOAD_PURPOSES.to_vec();
    purposes.push("batch_output");
    let mut schema = response_object(vec![
        ("id", text()),
        ("object", json!({ "const": "file" })),
        ("bytes", count("The contents' size")),
        ("created_at", unix_time("When it was uploaded or made")),
        (
            "expires_at",
            nullable_unix_time("When it expires: from then on it is gone"),
        ),
        (
            "filename",
            json!({ "type": "string",
                    "description": "The upload's file name; a batch's results: \
                        `{batch_id}_output.jsonl` or `{batch_id}_error.jsonl`" }),
        ),
        (
            "purpose",
            json!({ "enum": purposes,
                    "description": "`batch_output`: a batch's output or error file" }),
        ),
        ("status", json!({ "const": "processed" })),
        (
            "status_details",
            json!({ "type": ["string", "null"], "description": "Always null" }),
        ),
    ]);
    schema["description"] = json!("OpenAI's file object");
    schema
}

fn create_file_form(max_file_bytes: u64) -> Value {
    let mut schema = object(
        vec![
            (
                "file",
                json!({
                    "type": "string", "format": "binary",
                    "description": format!("The contents, at most {max_file_bytes} bytes \
                        (`--max-file-bytes`; 413 beyond). The part's filename is the file's \
                        `filename` (`upload.jsonl` without one), cut to \
                        {MAX_FILENAME_BYTES} bytes"),
                }),
            ),
            (
                "purpose",
                json!({
                    "enum": UPLOAD_PURPOSES,
                    "description": "`batch`: a batch's JSONL input; `vision` or `user_data`: \
                        an image that edits name by `file_id`",
                }),
            ),
            (
                "expires_after[anchor]",
                json!({ "enum": ["created_at"],
                        "description": "Given with `expires_after[seconds]`, or neither" }),
            ),
            (
                "expires_after[seconds]",
                json!({
                    "type": "integer", "minimum": MIN_TTL_SECS, "maximum": MAX_TTL_SECS,
                    "description": format!("The file's lifetime from its upload, one hour to \
                        30 days ({} days without it); given with `expires_after[anchor]`, or \
                        neither", DEFAULT_TTL_SECS / 86_400),
                }),
            ),
        ],
        &["file", "purpose"],
        true,
    );
    schema["description"] = json!("OpenAI's upload form: one `file`, each field once");
    schema
}

fn create_file() -> Value {
    operation(
        "create_file",
        "Files",
        "Upload a file",
        "A multipart form, streamed to disk. The file belongs to the key that uploaded it \
         (other keys get 404) and expires after `expires_after` (30 days by default). An upload \
         that would leave less than `--min-free-disk-bytes` free on the files directory's disk \
         is a 507 `insufficient_storage`",
        vec![],
        Some(form_body("CreateFileForm")),
        json_responses("The file", "FileObject"),
    )
}

fn list_files() -> Value {
    let mut parameters = vec![
        query_parameter(
            "purpose",
            "Only the files of this purpose (`batch`, `batch_output`, `vision`, `user_data`; \
             any other lists none)",
            json!({ "type": "string" }),
        ),
        query_parameter(
            "order",
            "By creation: `desc` newest first, `asc` oldest first",
            json!({ "enum": ["asc", "desc"], "default": "desc" }),
        ),
    ];
    parameters.extend(page_parameters(10_000, 10_000, "files"));
    operation(
        "list_files",
        "Files",
        "The key's files",
        "Files not expired, of the key that asks. Unknown query parameters are a 400",
        parameters,
        None,
        json_responses("A page of files", "FileList"),
    )
}

fn retrieve_file() -> Value {
    operation(
        "retrieve_file",
        "Files",
        "A file's object",
        "Another key's file, or an expired one, is a 404",
        vec![id_parameter("The file's id")],
        None,
        json_responses("The file", "FileObject"),
    )
}

fn delete_file() -> Value {
    operation(
        "delete_file",
        "Files",
        "Delete a file",
        "Its contents leave the disk at once; a batch that reads it as its input keeps its own \
         copy",
        vec![id_parameter("The file's id")],
        None,
        json_responses("The file is deleted", "FileDeleted"),
    )
}

fn download_file() -> Value {
    operation(
        "download_file",
        "Files",
        "A file's contents",
        "The bytes as uploaded or made, streamed from disk (a batch's output: one JSON line per \
         request), with their `Content-Length`",
        vec![id_parameter("The file's id")],
        None,
        json!({
            "200": {
                "description": "The contents",
                "headers": { "x-request-id": { "$ref": "#/components/headers/x-request-id" } },
                "content": { "application/octet-stream": {
                    "schema": { "type": "string", "format": "binary" } } },
            },
            "default": error_response(),
        }),
    )
}

// Uploads.

fn upload_object() -> Value {
    let mut schema = response_object(vec![
        ("id", text()),
        ("object", json!({ "const": "upload" })),
        ("bytes", count("The announced size")),
        ("created_at", unix_time("When it was created")),
        (
            "expires_at",
            unix_time(&format!(
                "When a pending upload expires, {} hour after its creation",
                UPLOAD_TTL_SECS / 3600
            )),
        ),
        ("filename", text()),
        ("purpose", json!({ "enum": UPLOAD_PURPOSES })),
        (
            "status",
            json!({
                "enum": ["pending", "completed", "cancelled", "expired"],
                "description": "`pending` until it is completed, cancelled, or expires",
            }),
        ),
        (
            "file",
            json!({
                "anyOf": [schema_ref("FileObject"), { "type": "null" }],
                "description": "The File the parts became, once completed; null before",
            }),
        ),
    ]);
    schema["description"] = json!("OpenAI's upload object");
    schema
}

fn create_upload_request(max_file_bytes: u64) -> Value {
    object(
        vec![
            (
                "bytes",
                json!({
                    "type": "integer", "minimum": 1, "maximum": max_file_bytes,
                    "description": "The file's size, at most `--max-file-bytes`: the parts \
                        must add up to it",
                }),
            ),
            (
                "filename",
                json!({ "type": "string", "minLength": 1, "maxLength": MAX_FILENAME_BYTES,
                        "description": format!("The File's name, 1 to {MAX_FILENAME_BYTES} \
                            bytes") }),
            ),
            (
                "mime_type",
                json!({
                    "type": "string",
                    "description": "Compared without parameters and case. Purpose `batch`: \
                        `application/jsonl`, `application/x-jsonlines`, \
                        `application/x-ndjson`, `application/json`, `text/jsonl`, \
                        `text/plain`, `application/octet-stream`, `jsonl` or `json`; `vision` \
                        and `user_data`: `image/png`, `image/jpeg`, `image/webp`, \
                        `application/octet-stream`, `png`, `jpeg`, `jpg` or `webp`. Anything \
                        else is a 400",
                }),
            ),
            (
                "purpose",
                json!({ "enum": UPLOAD_PURPOSES, "description": "As for `POST /v1/files`" }),
            ),
            (
                "expires_after",
                expires_after("The File's lifetime from its completion (30 days by default)"),
            ),
        ],
        &["bytes", "filename", "mime_type", "purpose"],
        true,
    )
}

fn create_upload() -> Value {
    operation(
        "create_upload",
        "Uploads",
        "Announce a file sent in parts",
        "Its parts follow (`POST /v1/uploads/{id}/parts`), then `complete` joins them into a \
         File. An upload not completed within an hour expires; one under way does not survive \
         a restart. It belongs to the key that made it (other keys get 404). 507 \
         `insufficient_storage` when the disk lacks room for `bytes` and \
         `--min-free-disk-bytes`",
        vec![],
        Some(json_body(true, "CreateUploadRequest")),
        json_responses("The upload, `pending`", "Upload"),
    )
}

fn add_upload_part() -> Value {
    operation(
        "add_upload_part",
        "Uploads",
        "Add a part to an upload",
        "A multipart form with the part as its field `data`, streamed to disk. Parts may come \
         in any order, several at once; together they may not hold more than the upload's \
         `bytes`. An upload that is not pending is a 400 `invalid_upload_state`",
        vec![id_parameter("The upload's id")],
        Some(form_body("UploadPartForm")),
        json_responses("The part", "UploadPart"),
    )
}

fn complete_upload() -> Value {
    operation(
        "complete_upload",
        "Uploads",
        "Join an upload's parts into a File",
        "The parts listed, in that order, become a File of the upload's name and purpose, \
         returned as the upload's `file`. An upload that is not pending is a 400 \
         `invalid_upload_state`",
        vec![id_parameter("The upload's id")],
        Some(json_body(true, "CompleteUploadRequest")),
        json_responses("The upload, `completed`", "Upload"),
    )
}

fn cancel_upload() -> Value {
    operation(
        "cancel_upload",
        "Uploads",
        "Cancel an upload",
        "Its parts are dropped. A cancelled upload is answered as it is; a completed or expired \
         one (or one being completed) is a 400 `invalid_upload_state`",
        vec![id_parameter("The upload's id")],
        None,
        json_responses("The upload, `cancelled`", "Upload"),
    )
}

// Batches.

fn batch_usage() -> Value {
    let details = |name: &str| object(vec![(name, count("Always 0"))], &[name], false);
    let mut schema = response_object(vec![
        (
            "input_tokens",
            count("The prompts' and input images' tokens"),
        ),
        ("input_tokens_details", details("cached_tokens")),
        ("output_tokens", count("The images' tokens")),
        ("output_tokens_details", details("reasoning_tokens")),
        ("total_tokens", count("input_tokens + output_tokens")),
    ]);
    schema["description"] = json!("The sums of the batch's images' `usage` so far");
    schema
}

fn batch_object() -> Value {
    let mut schema = response_object(vec![
        ("id", text()),
        ("object", json!({ "const": "batch" })),
        (
            "endpoint",
            json!({ "enum": ["/v1/images/generations", "/v1/images/edits"] }),
        ),
        (
            "model",
            json!({ "type": "string", "description": "The served model" }),
        ),
        (
            "errors",
            json!({
                "type": ["object", "null"],
                "description": "Why the batch failed (its input's faults, line by line, or why it \
                    could not run); null otherwise",
                "required": ["object", "data"],
                "properties": {
                    "object": { "const": "list" },
                    "data": { "type": "array", "items": schema_ref("BatchError") },
                },
            }),
        ),
        ("input_file_id", text()),
        ("completion_window", json!({ "const": "24h" })),
        (
            "status",
            json!({
                "enum": ["validating", "failed", "in_progress", "finalizing", "completed",
                         "expired", "cancelling", "cancelled"],
                "description": "`validating` → `in_progress` → `finalizing` → `completed`; \
                    `failed` (its input did not validate, or it could not run), \
                    `cancelling` → `cancelled`, `expired`",
            }),
        ),
        (
            "output_file_id",
            json!({ "type": ["string", "null"],
                    "description": "The results of the requests that made their images \
                        (purpose `batch_output`), once the batch ends" }),
        ),
        (
            "error_file_id",
            json!({ "type": ["string", "null"],
                    "description": "The requests that failed, were cancelled or expired, once \
                        the batch ends with any" }),
        ),
        ("created_at", unix_time("When it was created")),
        ("in_progress_at", nullable_unix_time("When it started")),
        (
            "expires_at",
            nullable_unix_time("The end of its completion window"),
        ),
        (
            "finalizing_at",
            nullable_unix_time("When it started finalizing"),
        ),
        ("completed_at", nullable_unix_time("When it completed")),
        ("failed_at", nullable_unix_time("When it failed")),
        ("expired_at", nullable_unix_time("When it expired")),
        (
            "cancelling_at",
            nullable_unix_time("When it was asked to cancel"),
        ),
        (
            "cancelled_at",
            nullable_unix_time("When it ended cancelled"),
        ),
        ("request_counts", schema_ref("BatchRequestCounts")),
        ("usage", schema_ref("BatchUsage")),
        (
            "metadata",
            json!({
                "type": ["object", "null"],
                "additionalProperties": { "type": "string" },
                "description": "As given at creation",
            }),
        ),
    ]);
    schema["description"] = json!("OpenAI's batch object");
    schema
}

fn create_batch_request() -> Value {
    object(
        vec![
            (
                "input_file_id",
                json!({
                    "type": "string",
                    "description": "A file of the key's, of purpose `batch`: one JSON request \
                        per line, `{\"custom_id\", \"method\": \"POST\", \"url\", \"body\"}`, \
                        `url` the batch's `endpoint`, `custom_id`s unique. A missing file is a \
                        400",
                }),
            ),
            (
                "endpoint",
                json!({ "enum": ["/v1/images/generations", "/v1/images/edits"] }),
            ),
            (
                "completion_window",
                json!({ "enum": ["24h"],
                        "description": "Requests not run within it are `batch_expired`" }),
            ),
            (
                "metadata",
                json!({
                    "type": ["object", "null"],
                    "maxProperties": 16,
                    "propertyNames": { "maxLength": 64 },
                    "additionalProperties": { "type": "string", "maxLength": 512 },
                    "description": "Up to 16 pairs: keys of up to 64 characters, string values \
                        of up to 512",
                }),
            ),
            (
                "output_expires_after",
                expires_after(
                    "The output and error files' lifetime from their making (30 days \
                     by default)",
                ),
            ),
        ],
        &["input_file_id", "endpoint", "completion_window"],
        true,
    )
}

fn create_batch() -> Value {
    operation(
        "create_batch",
        "Batches",
        "Create a batch",
        "The batch starts `validating` at once and runs in the background, its images at \
         priority `low`; it belongs to the key that made it (other keys get 404). The whole \
         input is checked first: any malformed line fails the batch, with each fault in \
         `errors`. 503 while the server shuts down, or once its devices failed",
        vec![],
        Some(json_body(true, "CreateBatchRequest")),
        json_responses("The batch, `validating`", "Batch"),
    )
}

fn list_batches() -> Value {
    operation(
        "list_batches",
        "Batches",
        "The key's batches",
        "Newest first (no `order`). An ended batch stays listed for `--batch-retention-days` \
         (30). Unknown query parameters are a 400",
        page_parameters(20, 100, "batches"),
        None,
        json_responses("A page of batches", "BatchList"),
    )
}

fn retrieve_batch() -> Value {
    operation(
        "retrieve_batch",
        "Batches",
        "A batch",
        "`request_counts` and `usage` grow as it runs",
        vec![id_parameter("The batch's id")],
        None,
        json_responses("The batch", "Batch"),
    )
}

fn cancel_batch() -> Value {
    operation(
        "cancel_batch",
        "Batches",
        "Cancel a batch",
        "A `validating` or `in_progress` batch is `cancelling` at once (one already cancelling \
         is answered as it is): requests already running finish, the rest go to the error file \
         as `batch_cancelled`, and it ends `cancelled`. Any other status is a 400 \
         `invalid_state`",
        vec![id_parameter("The batch's id")],
        None,
        json_responses("The batch", "Batch"),
    )
}

// Webhooks.

fn webhook_endpoint_properties() -> Vec<(&'static str, Value)> {
    vec![
        ("id", text()),
        ("object", json!({ "const": "webhook_endpoint" })),
        ("created_at", unix_time("When it was created")),
        (
            "updated_at",
            unix_time("When its name, URL, event types or secret last changed"),
        ),
        ("name", text()),
        (
            "url",
            json!({ "type": "string", "description": "As parsed (a bare host gains `/`)" }),
        ),
        (
            "event_types",
            json!({ "type": "array", "items": { "enum": EVENT_TYPES } }),
        ),
        (
            "signing_secret_hint",
            json!({ "type": "string",
                    "description": "`whsec_...` and the secret's last four characters" }),
        ),
    ]
}

fn webhook_name(nullable: bool) -> Value {
    json!({
        "type": if nullable { json!(["string", "null"]) } else { json!("string") },
        "minLength": 1, "maxLength": 256,
    })
}

fn webhook_url(nullable: bool) -> Value {
    json!({
        "type": if nullable { json!(["string", "null"]) } else { json!("string") },
        "minLength": 1, "maxLength": 2048,
        "description": "An absolute `http` or `https` URL with a host and no credentials, at \
            most 2048 bytes. Deliveries are POSTs to it",
    })
}

fn webhook_event_types(nullable: bool) -> Value {
    json!({
        "type": if nullable { json!(["array", "null"]) } else { json!("array") },
        "items": { "enum": EVENT_TYPES },
        "minItems": 1, "uniqueItems": true,
        "description": "The events to be told of, each once (an update replaces the set)",
    })
}

fn create_webhook_endpoint() -> Value {
    operation(
        "create_webhook_endpoint",
        "Webhooks",
        "Register a webhook endpoint",
        &format!(
            "The endpoint hears of the batches of the key that made it, for the event types it \
             lists, by signed POSTs retried for up to 72 hours. The answer holds the signing \
             secret, shown this once. At most {MAX_ENDPOINTS_PER_KEY} endpoints per key (400 \
             `too_many_webhook_endpoints`)"
        ),
        vec![],
        Some(json_body(true, "CreateWebhookEndpointRequest")),
        json_responses("The endpoint with its secret", "WebhookEndpointWithSecret"),
    )
}

fn list_webhook_endpoints() -> Value {
    operation(
        "list_webhook_endpoints",
        "Webhooks",
        "The key's webhook endpoints",
        "Newest first (no `order`). Unknown query parameters are a 400",
        page_parameters(20, 100, "endpoints"),
        None,
        json_responses("A page of endpoints", "WebhookEndpointList"),
    )
}

fn retrieve_webhook_endpoint() -> Value {
    operation(
        "retrieve_webhook_endpoint",
        "Webhooks",
        "A webhook endpoint",
        "Without its secret",
        vec![id_parameter("The endpoint's id")],
        None,
        json_responses("The endpoint", "WebhookEndpoint"),
    )
}

fn update_webhook_endpoint() -> Value {
    operation(
        "update_webhook_endpoint",
        "Webhooks",
        "Change a webhook endpoint",
        "Sets any of `name`, `url`, `event_types` (null or absent: unchanged); `updated_at` \
         moves only when something changed. Deliveries under way use the new URL at their \
         next attempt",
        vec![id_parameter("The endpoint's id")],
        Some(json_body(false, "UpdateWebhookEndpointRequest")),
        json_responses("The endpoint", "WebhookEndpoint"),
    )
}

fn delete_webhook_endpoint() -> Value {
    operation(
        "delete_webhook_endpoint",
        "Webhooks",
        "Delete a webhook endpoint",
        "Deliveries still waiting for it are dropped",
        vec![id_parameter("The endpoint's id")],
        None,
        json_responses("The endpoint is deleted", "WebhookEndpointDeleted"),
    )
}

fn rotate_webhook_endpoint_secret() -> Value {
    operation(
        "rotate_webhook_endpoint_secret",
        "Webhooks",
        "Rotate a webhook endpoint's signing secret",
        "A new secret, shown this once, signs from now on; the old one stops at once, or with \
         `keep_old_secret_active_for_24_hours` signs too for 24 hours. The body may be empty",
        vec![id_parameter("The endpoint's id")],
        Some(json_body(false, "RotateWebhookSecretRequest")),
        json_responses(
            "The endpoint with its new secret",
            "WebhookEndpointWithSecret",
        ),
    )
}

fn test_webhook_endpoint() -> Value {
    operation(
        "test_webhook_endpoint",
        "Webhooks",
        "Send a sample event to a webhook endpoint",
        "One signed sample event of the type given (its `data.id` names no batch), sent once \
         with a 10-second limit, answered with the status the endpoint gave. An endpoint that \
         cannot be reached (refused, timed out, a certificate not trusted) is a 400 \
         `webhook_unreachable`",
        vec![id_parameter("The endpoint's id")],
        Some(json_body(true, "TestWebhookEndpointRequest")),
        json_responses("What the endpoint answered", "WebhookEndpointTestResult"),
    )
}

fn list_webhook_event_types() -> Value {
    operation(
        "list_webhook_event_types",
        "Webhooks",
        "The event types endpoints may listen for",
        "A batch's end: `batch.completed`, `batch.failed`, `batch.cancelled`, `batch.expired`",
        vec![],
        None,
        json_responses("The event types", "WebhookEventTypeList"),
    )
}
