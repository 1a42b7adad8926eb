//! `GET /openapi.json`: an OpenAPI 3.1 document of the API this server serves, made from its
//! configuration, so that the bounds it states (sizes, steps, prompt length, guidance) and the
//! routes it lists (the LoRA endpoints only with `--allow-runtime-lora-updating`) are this
//! server's. Client generators, API gateways (Kong, Azure API Management, AWS API Gateway import
//! it), Postman and fuzzers read it; `scripts/test_openapi.sh` runs schemathesis against the real
//! server with it, which checks the document and the server against each other.
//!
//! Request schemas say what the validators accept: an unknown field is refused
//! (`additionalProperties: false`), and `null` means "not given" as it does in the validators.
//! Response schemas require what every response carries.

mod stored;

use serde_json::{json, Map, Value};

use super::config::RequestLimits;
use super::validate::{MAX_SEED, QUALITY_STEPS};
use super::App;
use crate::server::config::MAX_N;

/// The document for `app`'s configuration.
pub fn document(app: &App) -> Value {
    let config = &app.config;
    let mut paths = Map::new();
    let limits = &config.limits;
    paths.insert(
        "/v1/images/generations".into(),
        json!({ "post": generations_operation(None) }),
    );
    paths.insert(
        "/v1/images/edits".into(),
        json!({ "post": edits_operation(None) }),
    );
    for (kind, mut op) in [
        (
            "generations",
            generations_operation(Some("azure_create_image")),
        ),
        ("edits", edits_operation(Some("azure_edit_image"))),
    ] {
        op["parameters"] = azure_parameters(&config.model.id);
        paths.insert(
            format!("/openai/deployments/{{deployment}}/images/{kind}"),
            json!({ "post": op }),
        );
    }
    paths.insert("/invocations".into(), json!({ "post": invocations() }));
    paths.insert("/v1/models".into(), json!({ "get": list_models() }));
    paths.insert("/v1/models/{id}".into(), json!({ "get": retrieve_model() }));
    paths.extend(stored::paths());
    if config.runtime_lora_updating {
        paths.extend(lora_paths());
    }
    paths.insert(
        "/v1/images/files/{id}".into(),
        json!({ "get": image_file() }),
    );
    for (path, id) in [("/health", "health"), ("/", "root"), ("/ping", "ping")] {
        let mut item = json!({ "get": health(&format!("{id}_get")) });
        if path == "/" {
            item["options"] = health("root_options");
        }
        paths.insert(path.into(), item);
    }
    paths.insert("/livez".into(), json!({ "get": livez() }));
    if config.metrics_port.is_none() {
        paths.insert("/metrics".into(), json!({ "get": metrics() }));
    }
    paths.insert("/openapi.json".into(), json!({ "get": openapi() }));

    let mut schemas = core_schemas(limits, &config.model.id);
    schemas.extend(stored::schemas(config.files.max_file_bytes));
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "turbine",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "A self-hosted SDXL-Turbo image-generation server speaking the OpenAI \
                        Images API",
            "description": format!(
                "OpenAI's Images API (generations, edits), its Files, Uploads, Batch and \
                 webhook APIs for bulk jobs, and the server's own routes, as this server is \
                 configured: the model `{model}`, sizes with sides that are multiples of 8 \
                 from {min} to {max} and at most {pixels} pixels, up to {steps} steps. Errors \
                 have OpenAI's shape. Every `/v1/...` route is also served under `/openai` \
                 (Azure OpenAI's v1 API), with the same key.",
                model = config.model.id,
                min = limits.min_side,
                max = limits.max_side,
                pixels = limits.max_pixels,
                steps = limits.max_steps,
            ),
            "license": {
                "name": env!("CARGO_PKG_LICENSE"),
                "identifier": env!("CARGO_PKG_LICENSE"),
            },
        },
        "tags": [
            { "name": "Images", "description": "OpenAI's image generations and edits" },
            { "name": "Models" },
            { "name": "Files" },
            { "name": "Uploads" },
            { "name": "Batches" },
            { "name": "Webhooks" },
            { "name": "LoRA adapters", "description": "vLLM's runtime adapter routes \
                (`--allow-runtime-lora-updating`)" },
            { "name": "Azure OpenAI", "description": "Azure OpenAI's deployment paths" },
            { "name": "SageMaker", "description": "Amazon SageMaker's model container routes" },
            { "name": "Operations", "description": "Health, liveness, metrics, this document" },
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                "Error": {
                    "description": "An error in OpenAI's shape: 400 (a field missing, of the \
                        wrong type, out of bounds or unknown), 401, 404, 408, 409, 413, 415, \
                        422, 429 (with `Retry-After`), 500, 503 (with `Retry-After` where a \
                        retry helps), 507",
                    "content": { "application/json": { "schema": {
                        "$ref": "#/components/schemas/Error" } } },
                },
            },
            "headers": {
                "x-request-id": {
                    "description": "The request's id: the client's `x-request-id` when it sent \
                        one, else made here. Every response carries it",
                    "required": true,
                    "schema": { "type": "string" },
                },
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer KEY`, a key of `--api-key` or \
                        `--api-keys-file`",
                },
                "api_key": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "api-key",
                    "description": "Azure OpenAI's header, the same keys",
                },
            },
        },
    });
    if !app.auth.is_open() {
        doc["security"] = json!([{ "bearer": [] }, { "api_key": [] }]);
    }
    if let Some(url) = &config.public_url {
        doc["servers"] = json!([{ "url": url }]);
    }
    doc
}

/// `schema` that may also be `null` (not given).
fn nullable(mut schema: Value) -> Value {
    match schema.get("type").cloned() {
        Some(Value::String(t)) => schema["type"] = json!([t, "null"]),
        _ => {
            if let Some(values) = schema.get_mut("enum").and_then(Value::as_array_mut) {
                values.push(Value::Null);
            }
        }
    }
    schema
}

/// The fields of a generation or an edit (`edit`) under `b`'s bounds for the served `model`, as
/// JSON schemas; `form`: as multipart text fields, where nothing is `null`.
fn image_fields(b: &RequestLimits, model: &str, edit: bool, form: bool) -> Map<String, Value> {
    let qualities: Vec<&str> = QUALITY_STEPS.iter().map(|q| q.0).collect();
    let (dw, dh) = b.default_size;
    let mut fields = vec![
        (
            "prompt",
            json!({
                "type": "string", "minLength": 1, "maxLength": b.max_prompt_chars,
                "description": "What to draw; not only whitespace. CLIP reads its first 75 \
                    tokens; a prompt cut so comes back as each image's `revised_prompt`",
            }),
        ),
        (
            "model",
            json!({
                "type": "string",
                "description": format!("`{}`, one of its aliases (`GET /v1/models`) or an \
                    adapter's name; anything else is a 404 `model_not_found`", model),
            }),
        ),
        (
            "n",
            json!({ "type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1 }),
        ),
        (
            "size",
            json!({
                "type": "string", "pattern": "^(auto|[0-9]{1,6}x[0-9]{1,6})$",
                "default": "auto",
                "description": format!("`WIDTHxHEIGHT`, both sides multiples of 8 from {} to \
                    {}, at most {} pixels in all; `auto`: {}", b.min_side, b.max_side,
                    b.max_pixels, if edit {
                        format!("the input's aspect ratio at about {dw}x{dh}'s area")
                    } else {
                        format!("{dw}x{dh}")
                    }),
            }),
        ),
        (
            "quality",
            json!({
                "enum": qualities, "default": "auto",
                "description": "Steps: `auto` the server's default, `low` 1, `standard` and \
                    `medium` 2, `high` and `hd` 4, `xhigh` 6, `max` 8 (at most the server's \
                    maximum)",
            }),
        ),
        (
            "response_format",
            json!({
                "enum": ["b64_json", "url"],
                "description": "Without it the server's default (`url` for the DALL·E model \
                    names, else `b64_json`). A `url` is `GET /v1/images/files/{id}`, kept for \
                    a while; not with `stream`",
            }),
        ),
        (
            "output_format",
            json!({ "enum": ["png", "jpeg", "webp"], "default": "png" }),
        ),
        (
            "output_compression",
            json!({
                "type": "integer", "minimum": 0, "maximum": 100, "default": 100,
                "description": "JPEG quality; WebP lossless at 100, lossy below; PNG ignores it",
            }),
        ),
        (
            "background",
            json!({ "enum": ["auto", "opaque"], "default": "auto" }),
        ),
        ("complexity", json!({ "enum": ["low", "medium", "high"] })),
        (
            "user",
            json!({ "type": "string", "description": "Logged; echoed as `safety_identifier`" }),
        ),
        (
            "safety_identifier",
            json!({ "type": "string", "description": "Logged and echoed; over `user`" }),
        ),
        (
            "stream",
            json!({
                "type": "boolean", "default": false,
                "description": "Server-sent events, one `image_generation.completed` \
                    (`image_edit.completed`) per image as it is done",
            }),
        ),
        (
            "partial_images",
            json!({
                "type": "integer", "minimum": 0, "maximum": 3, "default": 0,
                "description": "Previews per streamed image, one per step before the last at \
                    most; only with `stream`",
            }),
        ),
        (
            "seed",
            json!({
                "type": "integer", "minimum": 0, "maximum": MAX_SEED,
                "description": "Image i gets `seed + i` (so `seed + n - 1` must stay within \
                    bounds); without it the server draws one. Each image carries its seed",
            }),
        ),
        (
            "steps",
            json!({
                "type": "integer", "minimum": 1, "maximum": b.max_steps,
                "description": "Denoising steps; over `quality`",
            }),
        ),
        (
            "guidance_scale",
            json!({
                "type": "number", "minimum": 0, "maximum": b.max_guidance_scale,
                "description": "Classifier-free guidance runs above 1",
            }),
        ),
        (
            "negative_prompt",
            json!({
                "type": "string", "maxLength": b.max_prompt_chars,
                "description": "Used when guidance runs",
            }),
        ),
    ];
    if edit {
        fields.push((
            "strength",
            json!({
                "type": "number", "minimum": 0.01, "maximum": 1, "default": 0.5,
                "description": "How far the input is noised before it is denoised \
                    (diffusers' meaning)",
            }),
        ));
        fields.push(("input_fidelity", json!({ "enum": ["low", "high"] })));
    } else {
        fields.push(("moderation", json!({ "enum": ["auto", "low"] })));
        fields.push(("style", json!({ "enum": ["vivid", "natural"] })));
    }
    fields
        .into_iter()
        .map(|(name, schema)| {
            let schema = if form { schema } else { nullable(schema) };
            (name.to_string(), schema)
        })
        .collect()
}

/// An object schema of `properties` that refuses other fields.
fn closed_object(properties: Map<String, Value>, required: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// A reference to the component schema `name`.
fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A response whose body is `schema` (a component's name) as JSON.
fn json_response(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "headers": { "x-request-id": { "$ref": "#/components/headers/x-request-id" } },
        "content": { "application/json": { "schema": schema_ref(schema) } },
    })
}

/// Every operation's answer besides its successes: OpenAI's error body.
fn error_response() -> Value {
    json!({ "$ref": "#/components/responses/Error" })
}

/// The path parameter `name`.
fn path_parameter(name: &str, description: &str) -> Value {
    json!({
        "name": name, "in": "path", "required": true, "description": description,
        "schema": { "type": "string" },
    })
}

/// Azure OpenAI's deployment parameters: the deployment names the model (`model`, or any name
/// it answers to), `api-version` is sent by Azure's clients and not read by this server.
fn azure_parameters(model: &str) -> Value {
    let mut deployment = path_parameter("deployment", "Names the model, over the body's `model`");
    deployment["example"] = json!(model);
    json!([
        deployment,
        {
            "name": "api-version", "in": "query", "required": false,
            "description": "Sent by Azure OpenAI's clients; any version is served alike",
            "schema": { "type": "string" },
        },
    ])
}

/// An images route's success: JSON, or with `stream` an event stream.
fn images_success(kind: &str) -> Value {
    json!({
        "description": format!("The images; with `stream`, a `text/event-stream` of \
            `image_{kind}.partial_image` and `image_{kind}.completed` events (each data line \
            an `ImageEvent`), or an `error` event"),
        "headers": { "x-request-id": { "$ref": "#/components/headers/x-request-id" } },
        "content": {
            "application/json": { "schema": { "$ref": "#/components/schemas/ImagesResponse" } },
            "text/event-stream": { "schema": {
                "$ref": "#/components/schemas/ImageStreamEvent" } },
        },
    })
}

fn generations_operation(azure: Option<&str>) -> Value {
    json!({
        "operationId": azure.unwrap_or("create_image"),
        "summary": "Create images from a prompt",
        "tags": [if azure.is_some() { "Azure OpenAI" } else { "Images" }],
        "requestBody": {
            "required": true,
            "content": { "application/json": {
                "schema": { "$ref": "#/components/schemas/CreateImageRequest" },
                "examples": { "fox": { "value": {
                    "prompt": "a cinematic photo of a red fox in snow", "n": 2, "seed": 42,
                } } },
            } },
        },
        "responses": { "200": images_success("generation"), "default": error_response() },
    })
}

fn edits_operation(azure: Option<&str>) -> Value {
    json!({
        "operationId": azure.unwrap_or("edit_image"),
        "summary": "Edit an image (image-to-image, or inpainting with a mask)",
        "tags": [if azure.is_some() { "Azure OpenAI" } else { "Images" }],
        "requestBody": {
            "required": true,
            "content": {
                "multipart/form-data": { "schema": {
                    "$ref": "#/components/schemas/EditImageForm" } },
                "application/json": { "schema": {
                    "$ref": "#/components/schemas/EditImageRequest" } },
            },
        },
        "responses": { "200": images_success("edit"), "default": error_response() },
    })
}

/// SageMaker's inference route: a generation's JSON, an edit's JSON or form.
fn invocations() -> Value {
    json!({
        "operationId": "sagemaker_invoke",
        "summary": "SageMaker's InvokeEndpoint: a generation, or an edit (a form, or JSON with \
            `images`)",
        "tags": ["SageMaker"],
        "requestBody": {
            "required": true,
            "content": {
                "application/json": { "schema": { "oneOf": [
                    { "$ref": "#/components/schemas/CreateImageRequest" },
                    { "$ref": "#/components/schemas/EditImageRequest" },
                ] } },
                "multipart/form-data": { "schema": {
                    "$ref": "#/components/schemas/EditImageForm" } },
            },
        },
        "responses": { "200": images_success("generation"), "default": error_response() },
    })
}

fn list_models() -> Value {
    json!({
        "operationId": "list_models",
        "summary": "The served model, its aliases and its adapters",
        "tags": ["Models"],
        "responses": {
            "200": json_response("The models", "ModelList"),
            "default": error_response(),
        },
    })
}

fn retrieve_model() -> Value {
    json!({
        "operationId": "retrieve_model",
        "summary": "A model by any name it answers to",
        "tags": ["Models"],
        "parameters": [path_parameter("id", "A model's name or alias")],
        "responses": {
            "200": json_response("The model", "Model"),
            "default": error_response(),
        },
    })
}

fn lora_paths() -> Map<String, Value> {
    let text = |what: &str| {
        json!({
            "description": what,
            "headers": { "x-request-id": { "$ref": "#/components/headers/x-request-id" } },
            "content": { "text/plain": { "schema": { "type": "string" } } },
        })
    };
    let mut load = Map::new();
    load.insert(
        "lora_name".into(),
        json!({ "type": "string", "description": "The model name it will be served as" }),
    );
    load.insert(
        "lora_path".into(),
        json!({ "type": "string", "description": "A `.safetensors` LoRA file on the server, \
            or a folder holding one" }),
    );
    load.insert(
        "scale".into(),
        json!({ "type": ["number", "null"], "minimum": -1e6, "maximum": 1e6, "default": 1 }),
    );
    load.insert(
        "load_inplace".into(),
        json!({ "type": ["boolean", "null"], "description": "`true` is refused" }),
    );
    let mut unload = Map::new();
    unload.insert("lora_name".into(), json!({ "type": "string" }));
    let mut paths = Map::new();
    paths.insert(
        "/v1/load_lora_adapter".into(),
        json!({ "post": {
            "operationId": "load_lora_adapter",
            "summary": "Build a LoRA adapter on every device and serve it as a model name",
            "tags": ["LoRA adapters"],
            "requestBody": { "required": true, "content": { "application/json": {
                "schema": closed_object(load, &["lora_name", "lora_path"]) } } },
            "responses": {
                "200": text("`Success: LoRA adapter 'NAME' added successfully.`"),
                "default": error_response(),
            },
        } }),
    );
    paths.insert(
        "/v1/unload_lora_adapter".into(),
        json!({ "post": {
            "operationId": "unload_lora_adapter",
            "summary": "Stop serving an adapter; requests that named it still get their images",
            "tags": ["LoRA adapters"],
            "requestBody": { "required": true, "content": { "application/json": {
                "schema": closed_object(unload, &["lora_name"]) } } },
            "responses": {
                "200": text("`Success: LoRA adapter 'NAME' removed successfully.`"),
                "default": error_response(),
            },
        } }),
    );
    paths
}

fn image_file() -> Value {
    let binary = json!({ "schema": { "type": "string", "format": "binary" } });
    json!({
        "operationId": "retrieve_image_file",
        "summary": "An image of a `url` response (no key: the id is unguessable)",
        "tags": ["Images"],
        "security": [],
        "parameters": [path_parameter("id", "The id in the response's `url`")],
        "responses": {
            "200": {
                "description": "The image, with `Cache-Control: max-age` its time left",
                "content": {
                    "image/png": binary.clone(),
                    "image/jpeg": binary.clone(),
                    "image/webp": binary,
                },
            },
            "default": error_response(),
        },
    })
}

fn health(operation_id: &str) -> Value {
    json!({
        "operationId": operation_id,
        "summary": "Readiness: 200 while serving, 503 while loading, draining or failed",
        "tags": ["Operations"],
        "security": [],
        "responses": {
            "200": json_response("Serving", "Health"),
            "503": json_response("Not serving", "Health"),
        },
    })
}

fn livez() -> Value {
    json!({
        "operationId": "livez",
        "summary": "Liveness: 200 while loading, serving and draining; 503 once every device \
            failed",
        "tags": ["Operations"],
        "security": [],
        "responses": {
            "200": json_response("Alive", "Health"),
            "503": json_response("Every device failed", "Health"),
        },
    })
}

fn metrics() -> Value {
    json!({
        "operationId": "metrics",
        "summary": "Prometheus metrics",
        "tags": ["Operations"],
        "security": [],
        "responses": {
            "200": {
                "description": "The Prometheus text format",
                "content": { "text/plain": { "schema": { "type": "string" } } },
            },
        },
    })
}

fn openapi() -> Value {
    json!({
        "operationId": "openapi",
        "summary": "This document",
        "tags": ["Operations"],
        "security": [],
        "responses": {
            "200": {
                "description": "The OpenAPI 3.1 document of this server",
                "content": { "application/json": { "schema": { "type": "object" } } },
            },
        },
    })
}

/// The schemas of the image, model and health routes, under `b`'s bounds for the served `model`.
fn core_schemas(b: &RequestLimits, model: &str) -> Map<String, Value> {
    let mut s = Map::new();
    s.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": { "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": { "type": "string" },
                    "type": { "type": "string" },
                    "param": { "type": ["string", "null"],
                        "description": "The field at fault" },
                    "code": { "type": ["string", "null"] },
                },
            } },
        }),
    );
    s.insert(
        "CreateImageRequest".into(),
        closed_object(image_fields(b, model, false, false), &["prompt"]),
    );
    let reference = json!({
        "description": "An image: a base64 `data:` URL (no web URLs are fetched), or the id \
            of a file uploaded with purpose `vision` or `user_data`",
        "oneOf": [
            {
                "type": "object",
                "required": ["image_url"],
                "properties": { "image_url": { "type": "string", "pattern": "^data:" } },
            },
            {
                "type": "object",
                "required": ["file_id"],
                "properties": { "file_id": { "type": "string", "minLength": 1 } },
                "additionalProperties": false,
            },
        ],
    });
    s.insert("ImageReference".into(), reference);
    let reference = json!({ "$ref": "#/components/schemas/ImageReference" });
    let mut edit = image_fields(b, model, true, false);
    edit.insert(
        "images".into(),
        json!({ "type": "array", "items": reference, "minItems": 1, "maxItems": 1,
                "description": "The image to edit (one)" }),
    );
    for name in ["mask", "markup"] {
        edit.insert(
            name.into(),
            json!({ "anyOf": [reference, { "type": "null" }] }),
        );
    }
    s.insert(
        "EditImageRequest".into(),
        closed_object(edit, &["prompt", "images"]),
    );
    let file = |description: &str| json!({ "type": "string", "format": "binary", "description": description });
    let mut form = image_fields(b, model, true, true);
    form.insert(
        "image".into(),
        file("One PNG, JPEG or WebP, at most 8192 pixels a side"),
    );
    form.insert(
        "mask".into(),
        file("PNG or WebP with alpha, the input's size: transparent areas are repainted"),
    );
    form.insert(
        "markup".into(),
        file("An overlay with alpha, the input's size, laid over the input first"),
    );
    s.insert("EditImageForm".into(), {
        let mut schema = closed_object(form, &["prompt", "image"]);
        schema["description"] = json!("The SDKs' form; `image[]` is taken for `image`");
        schema
    });
    let tokens = |details: &[&str]| {
        let mut props = Map::new();
        for d in details {
            props.insert(d.to_string(), json!({ "type": "integer", "minimum": 0 }));
        }
        json!({ "type": "object", "required": details, "properties": props })
    };
    s.insert(
        "Usage".into(),
        json!({
            "type": "object",
            "required": ["input_tokens", "input_tokens_details", "output_tokens",
                         "output_tokens_details", "total_tokens"],
            "properties": {
                "input_tokens": { "type": "integer", "minimum": 0 },
                "input_tokens_details": tokens(&["image_tokens", "text_tokens"]),
                "output_tokens": { "type": "integer", "minimum": 0 },
                "output_tokens_details": tokens(&["image_tokens", "text_tokens"]),
                "total_tokens": { "type": "integer", "minimum": 0 },
            },
            "description": "Text tokens: the prompts' CLIP tokens per image; image tokens: one \
                per 8x8 pixel patch per image (input for an edit's input image)",
        }),
    );
    let quality_levels = json!(["low", "medium", "high", "xhigh", "max"]);
    s.insert(
        "Image".into(),
        json!({
            "type": "object",
            "required": ["revised_prompt", "seed"],
            "properties": {
                "b64_json": { "type": "string", "contentEncoding": "base64" },
                "url": { "type": "string" },
                "revised_prompt": { "type": ["string", "null"],
                    "description": "The part of a long prompt that was read; null when read \
                        whole" },
                "seed": { "type": "integer", "minimum": 0, "maximum": MAX_SEED },
            },
            "oneOf": [{ "required": ["b64_json"] }, { "required": ["url"] }],
        }),
    );
    s.insert(
        "ImagesResponse".into(),
        json!({
            "type": "object",
            "required": ["created", "data", "background", "output_format", "quality", "size",
                         "usage"],
            "properties": {
                "created": { "type": "integer" },
                "data": { "type": "array", "items": { "$ref": "#/components/schemas/Image" } },
                "background": { "enum": ["opaque"] },
                "output_format": { "enum": ["png", "jpeg", "webp"] },
                "quality": { "enum": quality_levels },
                "size": { "type": "string", "pattern": "^[0-9]+x[0-9]+$" },
                "usage": { "$ref": "#/components/schemas/Usage" },
                "safety_identifier": { "type": "string" },
            },
        }),
    );
    s.insert(
        "ImageEvent".into(),
        json!({
            "type": "object",
            "description": "A streamed event's data",
            "required": ["type", "b64_json", "created_at", "size", "quality", "background",
                         "output_format", "seed"],
            "properties": {
                "type": { "enum": ["image_generation.partial_image",
                    "image_generation.completed", "image_edit.partial_image",
                    "image_edit.completed"] },
                "b64_json": { "type": "string", "contentEncoding": "base64" },
                "created_at": { "type": "integer" },
                "size": { "type": "string" },
                "quality": { "enum": quality_levels },
                "background": { "enum": ["opaque"] },
                "output_format": { "enum": ["png", "jpeg", "webp"] },
                "seed": { "type": "integer" },
                "partial_image_index": { "type": "integer", "minimum": 0,
                    "description": "Partial images only" },
                "usage": { "$ref": "#/components/schemas/Usage",
                    "description": "Completed images only" },
                "safety_identifier": { "type": "string" },
            },
        }),
    );
    s.insert(
        "ImageStreamEvent".into(),
        json!({
            "type": "object",
            "description": "One server-sent event of a stream: an image's (`ImageEvent`), or \
                `error` with an `Error` body, after which the stream ends",
            "required": ["event", "data"],
            "properties": {
                "event": { "enum": ["image_generation.partial_image",
                    "image_generation.completed", "image_edit.partial_image",
                    "image_edit.completed", "error"] },
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": { "anyOf": [
                        { "$ref": "#/components/schemas/ImageEvent" },
                        { "$ref": "#/components/schemas/Error" },
                    ] },
                },
            },
        }),
    );
    s.insert(
        "Model".into(),
        json!({
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": { "type": "string" },
                "object": { "const": "model" },
                "created": { "type": "integer" },
                "owned_by": { "type": "string" },
                "parent": { "type": "string", "description": "An adapter's: the model it \
                    adapts" },
            },
        }),
    );
    s.insert(
        "ModelList".into(),
        json!({
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": { "const": "list" },
                "data": { "type": "array", "items": { "$ref": "#/components/schemas/Model" } },
            },
        }),
    );
    s.insert(
        "Health".into(),
        json!({
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": { "enum": ["ok", "loading", "shutting_down", "device_failed"] },
                "failed_devices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["device", "message"],
                        "properties": {
                            "device": { "type": "string" },
                            "message": { "type": "string" },
                        },
                    },
                },
            },
        }),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nullable_adds_null_to_a_type_or_an_enum() {
        assert_eq!(
            nullable(json!({"type": "integer", "minimum": 1})),
            json!({"type": ["integer", "null"], "minimum": 1})
        );
        assert_eq!(
            nullable(json!({"enum": ["a", "b"]})),
            json!({"enum": ["a", "b", null]})
        );
    }
}
