//! Requests that are wrong, broken off or stalled.
//!
//! First the request fuzzer: thousands of requests, most of them wrong in one or several ways,
//! sent to every route of the real server (the tiny model, files, batches and webhooks enabled,
//! one key). Whatever a request sends, the server must answer it: never a dropped connection (a
//! handler that panicked), never a 5xx, and every error in OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`) as JSON. Afterwards every batch it made
//! has ended with whole results, and the server is still healthy and generates.
//!
//! Each run draws a fresh seed and prints it. Two threads send at once (`TURBINE_FUZZ_THREADS`),
//! each its own sequence from the seed; with one, `TURBINE_FUZZ_SEED=S` replays a run exactly
//! (with two, the sequences are the same but their interleaving is not).
//! `TURBINE_FUZZ_CASES=N` (default 1500, over all threads) sets its length,
//! `TURBINE_FUZZ_VERBOSE=1` prints every case and its answer (with `--nocapture`). A failure
//! names the case, the request and the answer, and the one before it.
//!
//! Then what the fuzzer found, and the rest of the abuse a server meets: bodies left unread,
//! clients that leave half-way, bodies that stall.

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::{data_url, metric_in, png_bytes, test_config, TestServer};
use turbine::server::auth::ApiKey;
use turbine::server::validate::{COMMON_FIELDS, EDIT_FIELDS, GENERATION_FIELDS};

const KEY: &str = "sk-fuzz";

/// Every field either image endpoint knows (the server's own lists, so that a new field is
/// fuzzed too), plus the edits' image references and a stranger.
static FIELDS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut fields: Vec<&str> = [COMMON_FIELDS, GENERATION_FIELDS, EDIT_FIELDS].concat();
    fields.extend(["image", "images", "mask", "markup", "no_such_field"]);
    fields.sort_unstable();
    fields.dedup();
    fields
});

/// Strings that mean something somewhere in the API, and strings that break things.
fn weird_str(rng: &mut StdRng) -> String {
    const WORDS: &[&str] = &[
        "",
        " ",
        "\0",
        "auto",
        "64x64",
        "128x64",
        "64X64",
        "0x0",
        "64x0",
        "-64x64",
        "64x",
        "x64",
        "64x64x64",
        "99999999999999999999x64",
        "4294967296x64",
        "64 x 64",
        "６４x64",
        "1e2x64",
        "url",
        "b64_json",
        "png",
        "jpeg",
        "webp",
        "gif",
        "low",
        "high",
        "hd",
        "max",
        "transparent",
        "batch",
        "batch_output",
        "24h",
        "1h",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/chat/completions",
        "\u{202e}gnirts",
        "true",
        "1.5",
        "-1",
        "NaN",
        "Infinity",
        "file-doesnotexist",
        "../../../etc/passwd",
        "data:image/png;base64,AAAA",
        "data:image/png;base64,",
        "data:,",
        "data:image/png;base64,!!!!",
        "http://127.0.0.1:1/hook",
        "batch.completed",
        "whe_0",
        "batch_0",
    ];
    match rng.random_range(0..6) {
        0 => "a".repeat(rng.random_range(0..40_000)),
        1 => "🦊".repeat(rng.random_range(1..3_000)),
        2 => (0..rng.random_range(1..64))
            .map(|_| char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('\u{fffd}'))
            .collect(),
        _ => WORDS.choose(rng).unwrap().to_string(),
    }
}

/// Any JSON value, biased to edges: limits, wrong types, deep nesting.
fn weird(rng: &mut StdRng) -> Value {
    match rng.random_range(0..11) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(*[
            0i64,
            1,
            -1,
            2,
            3,
            4,
            8,
            10,
            11,
            64,
            100,
            1000,
            i64::from(i32::MAX),
            i64::MAX,
            i64::MIN
        ]
        .choose(rng)
        .unwrap()),
        3 => json!(u64::MAX),
        4 => json!(*[
            0.0f64,
            -0.0,
            0.5,
            1.0,
            1.5,
            7.5,
            1e308,
            -1e308,
            1e-300,
            3.999_999_9
        ]
        .choose(rng)
        .unwrap()),
        5 | 6 => Value::String(weird_str(rng)),
        7 => Value::Array((0..rng.random_range(0..4)).map(|_| small(rng)).collect()),
        8 => {
            let mut m = Map::new();
            for _ in 0..rng.random_range(0..4) {
                m.insert(weird_str(rng), small(rng));
            }
            Value::Object(m)
        }
        9 => {
            // Deeper than serde_json's recursion limit, sometimes.
            let mut v = json!(1);
            for _ in 0..rng.random_range(1..300) {
                v = json!([v]);
            }
            v
        }
        _ => json!({"image_url": weird_str(rng)}),
    }
}

/// A scalar, so that arrays and objects of [`weird`] stay small.
fn small(rng: &mut StdRng) -> Value {
    match rng.random_range(0..4) {
        0 => Value::Null,
        1 => json!(rng.random_range(-5i64..20)),
        2 => json!(rng.random_bool(0.5)),
        _ => Value::String(weird_str(rng)),
    }
}

fn prompt(rng: &mut StdRng) -> Value {
    json!(
        *["a red fox", "a lighthouse at dusk", "crates", "🦊 in snow"]
            .choose(rng)
            .unwrap()
    )
}

/// A small valid image, RGB or RGBA, PNG or JPEG.
fn image_file(rng: &mut StdRng) -> Vec<u8> {
    let (w, h) = (rng.random_range(1..160), rng.random_range(1..160));
    let seed: u8 = rng.random();
    if rng.random_bool(0.3) {
        let rgba = image::RgbaImage::from_fn(w, h, |x, y| {
            let a = if (x + y) % 3 == 0 { 0 } else { 255 };
            image::Rgba([x as u8 ^ seed, y as u8, seed, a])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        rgba.write_to(&mut out, image::ImageFormat::Png).unwrap();
        return out.into_inner();
    }
    let rgb = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8 ^ seed, seed]));
    if rng.random_bool(0.3) {
        let mut out = std::io::Cursor::new(Vec::new());
        rgb.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        return out.into_inner();
    }
    png_bytes(&rgb)
}

/// An upload: mostly an image, sometimes a broken one or not an image at all.
fn upload_bytes(rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = image_file(rng);
    match rng.random_range(0..10) {
        0 => bytes.truncate(rng.random_range(0..bytes.len())),
        1 => {
            let i = rng.random_range(0..bytes.len());
            bytes[i] ^= 1 << rng.random_range(0..8);
        }
        2 => {
            bytes = (0..rng.random_range(0..300))
                .map(|_| rng.random())
                .collect()
        }
        3 => bytes = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
        _ => {}
    }
    bytes
}

/// A value that fits the field, so that mutations elsewhere reach the code behind it.
fn plausible(field: &str, rng: &mut StdRng) -> Value {
    let pick = |rng: &mut StdRng, options: &[&str]| json!(*options.choose(rng).unwrap());
    match field {
        "prompt" | "negative_prompt" => prompt(rng),
        "model" => pick(
            rng,
            &["sdxl-turbo", "gpt-image-1", "dall-e-3", "no-such-model"],
        ),
        "n" => json!(rng.random_range(1..4)),
        "size" => pick(
            rng,
            &["64x64", "128x64", "64x128", "96x96", "auto", "1024x1024"],
        ),
        "quality" => pick(rng, &["auto", "low", "standard", "medium", "high"]),
        "response_format" => pick(rng, &["url", "b64_json"]),
        "output_format" => pick(rng, &["png", "jpeg", "webp"]),
        "output_compression" => json!(rng.random_range(0..=100)),
        "background" => pick(rng, &["auto", "opaque", "transparent"]),
        "stream" => json!(rng.random_bool(0.5)),
        "partial_images" => json!(rng.random_range(0..=3)),
        "seed" => json!(rng.random::<u32>()),
        "steps" => json!(rng.random_range(1..=4)),
        "guidance_scale" => json!(rng.random_range(0.0..3.0)),
        "strength" => json!(rng.random_range(0.05..1.0)),
        "moderation" => pick(rng, &["auto", "low"]),
        "style" => pick(rng, &["vivid", "natural"]),
        "input_fidelity" => pick(rng, &["low", "high"]),
        "image" | "mask" | "markup" => json!({"image_url": data_url(&upload_bytes(rng))}),
        "images" => Value::Array(
            (0..if rng.random_bool(0.85) {
                1
            } else {
                rng.random_range(0..4)
            })
                .map(|_| json!({"image_url": data_url(&upload_bytes(rng))}))
                .collect(),
        ),
        _ => weird(rng),
    }
}

/// An image request's fields: a valid core, then a few fields set to fitting or wild values.
fn image_fields(rng: &mut StdRng, edit: bool) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("prompt".into(), prompt(rng));
    o.insert("size".into(), json!("64x64"));
    if edit {
        o.insert("images".into(), plausible("images", rng));
    }
    for _ in 0..rng.random_range(0..5) {
        let field = *FIELDS.choose(rng).unwrap();
        let v = if rng.random_bool(0.6) {
            plausible(field, rng)
        } else {
            weird(rng)
        };
        o.insert(field.into(), v);
    }
    if rng.random_bool(0.08) {
        o.remove("prompt");
    }
    o
}

/// A JSON body, sometimes not an object, sometimes not JSON at all.
fn json_body(rng: &mut StdRng, value: Value) -> Vec<u8> {
    let mut bytes = match rng.random_range(0..20) {
        0 => weird(rng).to_string().into_bytes(),
        _ => value.to_string().into_bytes(),
    };
    match rng.random_range(0..14) {
        0 if !bytes.is_empty() => bytes.truncate(rng.random_range(0..bytes.len())),
        1 if !bytes.is_empty() => {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random();
        }
        2 => bytes.splice(0..0, *b"\xef\xbb\xbf").for_each(drop),
        3 => bytes.clear(),
        // A duplicated key: serde_json keeps the last, other parsers refuse.
        4 if bytes.last() == Some(&b'}') && bytes.len() > 2 => {
            bytes.pop();
            bytes.extend_from_slice(br#","n":2}"#);
        }
        _ => {}
    }
    bytes
}

/// One part of a form: (name, filename, content type, bytes).
type Part = (String, Option<String>, Option<String>, Vec<u8>);

/// A form body of `parts`, sometimes shuffled, with the boundary the content type names (or,
/// sometimes, another one).
fn form(rng: &mut StdRng, mut parts: Vec<Part>) -> (String, Vec<u8>) {
    if rng.random_bool(0.3) {
        rand::seq::SliceRandom::shuffle(&mut parts[..], rng);
    }
    let boundary = "fuzz-boundary-0c1e";
    let mut body = Vec::new();
    for (name, filename, ctype, bytes) in &parts {
        let mut head = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = filename {
            let _ = write!(head, "; filename=\"{f}\"");
        }
        if let Some(c) = ctype {
            let _ = write!(head, "\r\nContent-Type: {c}");
        }
        head.push_str("\r\n\r\n");
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let ctype = match rng.random_range(0..16) {
        0 => "multipart/form-data".to_string(),
        1 => "multipart/form-data; boundary=other".to_string(),
        2 => {
            body.truncate(rng.random_range(0..body.len()));
            format!("multipart/form-data; boundary={boundary}")
        }
        _ => format!("multipart/form-data; boundary={boundary}"),
    };
    (ctype, body)
}

fn text_part(name: &str, value: &Value) -> Part {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    (name.into(), None, None, text.into_bytes())
}

fn file_part(name: &str, bytes: Vec<u8>) -> Part {
    (
        name.into(),
        Some("upload.png".into()),
        Some("image/png".into()),
        bytes,
    )
}

/// An edit as a form: its fields as text parts and its images as files.
fn edit_form(rng: &mut StdRng) -> (String, Vec<u8>) {
    let mut parts = Vec::new();
    for (k, v) in image_fields(rng, false) {
        if !matches!(k.as_str(), "image" | "images" | "mask" | "markup") {
            parts.push(text_part(&k, &v));
        }
    }
    let images = match rng.random_range(0..20) {
        0 | 1 => 0,
        2..=4 => rng.random_range(2..4),
        _ => 1,
    };
    let name = if images > 1 || rng.random_bool(0.3) {
        "image[]"
    } else {
        "image"
    };
    for _ in 0..images {
        parts.push(file_part(name, upload_bytes(rng)));
    }
    for extra in ["mask", "markup", "file", "image"] {
        if rng.random_bool(0.15) {
            parts.push(file_part(extra, upload_bytes(rng)));
        }
    }
    form(rng, parts)
}

/// A batch input file: request lines, fitting or not.
fn batch_input(rng: &mut StdRng) -> Vec<u8> {
    // A batch has one endpoint: mostly generations, as in the batches made below.
    let edits = rng.random_bool(0.2);
    let mut lines = Vec::new();
    for i in 0..rng.random_range(0..4) {
        let (url, edit) = match rng.random_range(0..20) {
            0 => (weird(rng), false),
            _ if edits => (json!("/v1/images/edits"), true),
            _ => (json!("/v1/images/generations"), false),
        };
        let mut line = json!({
            "custom_id": format!("c{i}"),
            "method": "POST",
            "url": url,
            "body": Value::Object(image_fields(rng, edit)),
        });
        if rng.random_bool(0.2) {
            let field = *["custom_id", "method", "url", "body", "extra"]
                .choose(rng)
                .unwrap();
            line[field] = weird(rng);
        }
        lines.push(line.to_string());
    }
    if rng.random_bool(0.1) {
        lines.push(weird_str(rng));
    }
    lines.join("\n").into_bytes()
}

/// What the fuzzer has made so far, so that later cases can name real ids.
#[derive(Default)]
struct Made {
    files: Vec<String>,
    batches: Vec<String>,
    webhooks: Vec<String>,
    uploads: Vec<String>,
    parts: Vec<String>,
}

impl Made {
    /// A real id of the kind most of the time, else something else.
    fn id(&self, rng: &mut StdRng, of: &[String]) -> String {
        match of.choose(rng) {
            Some(id) if rng.random_bool(0.7) => id.clone(),
            _ => {
                let odd = [
                    "file-abc",
                    "batch_abc",
                    "whe_abc",
                    "%FF%FE",
                    "%00",
                    "..",
                    "a%2Fb",
                    "img_0",
                    "%E2%80%AE",
                ];
                if rng.random_bool(0.5) {
                    odd.choose(rng).unwrap().to_string()
                } else {
                    "x".repeat(rng.random_range(1..5000))
                }
            }
        }
    }
}

struct Request {
    method: Method,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Request {
    fn get(path: String) -> Self {
        Request {
            method: Method::GET,
            path,
            content_type: None,
            body: Vec::new(),
        }
    }

    fn json(rng: &mut StdRng, method: Method, path: &str, value: Value) -> Self {
        let content_type = match rng.random_range(0..16) {
            0 => None,
            1 => Some("text/plain".into()),
            2 => Some("application/json; charset=utf-16".into()),
            3 => Some("multipart/form-data; boundary=x".into()),
            _ => Some("application/json".into()),
        };
        Request {
            method,
            path: path.into(),
            content_type,
            body: json_body(rng, value),
        }
    }

    fn form(path: &str, (ctype, body): (String, Vec<u8>)) -> Self {
        Request {
            method: Method::POST,
            path: path.into(),
            content_type: Some(ctype),
            body,
        }
    }
}

fn query(rng: &mut StdRng) -> String {
    let mut q = Vec::new();
    for _ in 0..rng.random_range(0..3) {
        let k = *["limit", "after", "order", "purpose", "x", "limit"]
            .choose(rng)
            .unwrap();
        let v = *[
            "1", "0", "-1", "100", "10001", "abc", "", "%FF", "1e3", "file-x",
        ]
        .choose(rng)
        .unwrap();
        q.push(format!("{k}={v}"));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// The next request: every route, with what it takes mostly right and partly wrong.
fn next_request(rng: &mut StdRng, made: &Made) -> Request {
    match rng.random_range(0..108) {
        0..=29 => {
            let body = Value::Object(image_fields(rng, false));
            Request::json(rng, Method::POST, "/v1/images/generations", body)
        }
        30..=41 => Request::form("/v1/images/edits", edit_form(rng)),
        42..=49 => {
            let body = Value::Object(image_fields(rng, true));
            Request::json(rng, Method::POST, "/v1/images/edits", body)
        }
        50..=56 => {
            let purpose = if rng.random_bool(0.8) {
                json!("batch")
            } else {
                weird(rng)
            };
            let mut parts = vec![
                text_part("purpose", &purpose),
                (
                    "file".into(),
                    Some("in.jsonl".into()),
                    Some("application/jsonl".into()),
                    batch_input(rng),
                ),
            ];
            if rng.random_bool(0.1) {
                parts.push(text_part("expires_after", &weird(rng)));
            }
            Request::form("/v1/files", form(rng, parts))
        }
        57..=63 => {
            let endpoint = if rng.random_bool(0.8) {
                "/v1/images/generations"
            } else {
                "/v1/images/edits"
            };
            let mut body = json!({
                "input_file_id": made.id(rng, &made.files),
                "endpoint": endpoint,
                "completion_window": "24h",
            });
            for _ in 0..rng.random_range(0..3) {
                let field = *[
                    "input_file_id",
                    "endpoint",
                    "completion_window",
                    "metadata",
                    "x",
                ]
                .choose(rng)
                .unwrap();
                body[field] = weird(rng);
            }
            Request::json(rng, Method::POST, "/v1/batches", body)
        }
        64..=67 => {
            let id = made.id(rng, &made.batches);
            if rng.random_bool(0.5) {
                Request::get(format!("/v1/batches/{id}"))
            } else {
                Request::json(
                    rng,
                    Method::POST,
                    &format!("/v1/batches/{id}/cancel"),
                    json!({}),
                )
            }
        }
        68..=71 => {
            let id = made.id(rng, &made.files);
            match rng.random_range(0..3) {
                0 => Request::get(format!("/v1/files/{id}")),
                1 => Request::get(format!("/v1/files/{id}/content")),
                _ => Request {
                    method: Method::DELETE,
                    path: format!("/v1/files/{id}"),
                    content_type: None,
                    body: Vec::new(),
                },
            }
        }
        72..=77 => {
            let url = if rng.random_bool(0.7) {
                json!(format!(
                    "http://127.0.0.1:1/{}",
                    ["hook", "a?b=c", "%FF"].choose(rng).unwrap()
                ))
            } else {
                weird(rng)
            };
            let mut body = json!({"name": "fuzz", "url": url, "event_types": ["batch.completed"]});
            if rng.random_bool(0.4) {
                let field = *["name", "event_types", "url", "x"].choose(rng).unwrap();
                body[field] = weird(rng);
            }
            Request::json(rng, Method::POST, "/v1/webhook_endpoints", body)
        }
        78..=83 => {
            let id = made.id(rng, &made.webhooks);
            let path = format!("/v1/webhook_endpoints/{id}");
            match rng.random_range(0..5) {
                0 => Request::get(path),
                1 => {
                    let field = *["name", "event_types", "url", "status", "x"]
                        .choose(rng)
                        .unwrap();
                    let mut body = json!({});
                    body[field] = if field == "status" && rng.random_bool(0.5) {
                        json!(*["enabled", "disabled"].choose(rng).unwrap())
                    } else {
                        weird(rng)
                    };
                    Request::json(rng, Method::POST, &path, body)
                }
                2 => {
                    let body = json!({"keep_old_secret_active_for_24_hours": weird(rng)});
                    Request::json(rng, Method::POST, &format!("{path}/rotate_secret"), body)
                }
                3 => Request::json(rng, Method::POST, &format!("{path}/test"), json!({})),
                _ => Request {
                    method: Method::DELETE,
                    path,
                    content_type: None,
                    body: Vec::new(),
                },
            }
        }
        84..=89 => {
            let list = *[
                "/v1/files",
                "/v1/batches",
                "/v1/webhook_endpoints",
                "/v1/webhook_event_types",
                "/v1/models",
            ]
            .choose(rng)
            .unwrap();
            Request::get(format!("{list}{}", query(rng)))
        }
        90..=94 => {
            let id = made.id(rng, &[]);
            let path = *[
                "/v1/models/",
                "/v1/images/files/",
                "/v1/",
                "/",
                "/v1/images/",
            ]
            .choose(rng)
            .unwrap();
            Request::get(format!("{path}{id}"))
        }
        100..=102 => {
            let mut body = json!({
                "bytes": rng.random_range(1..600),
                "filename": "jobs.jsonl",
                "mime_type": *["text/jsonl", "application/jsonl", "image/png"].choose(rng).unwrap(),
                "purpose": *["batch", "vision", "batch"].choose(rng).unwrap(),
            });
            if rng.random_bool(0.4) {
                let field = *[
                    "bytes",
                    "filename",
                    "mime_type",
                    "purpose",
                    "expires_after",
                    "x",
                ]
                .choose(rng)
                .unwrap();
                body[field] = weird(rng);
            }
            Request::json(rng, Method::POST, "/v1/uploads", body)
        }
        103..=105 => {
            let id = made.id(rng, &made.uploads);
            let len = rng.random_range(0..300);
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let mut parts = vec![("data".into(), Some("part".into()), None, data)];
            if rng.random_bool(0.1) {
                parts.push(text_part(["data", "x"].choose(rng).unwrap(), &weird(rng)));
            }
            Request::form(&format!("/v1/uploads/{id}/parts"), form(rng, parts))
        }
        106..=107 => {
            let id = made.id(rng, &made.uploads);
            if rng.random_bool(0.2) {
                return Request::json(
                    rng,
                    Method::POST,
                    &format!("/v1/uploads/{id}/cancel"),
                    json!({}),
                );
            }
            let ids: Vec<String> = (0..rng.random_range(0..4))
                .map(|_| made.id(rng, &made.parts))
                .collect();
            let mut body = json!({"part_ids": ids});
            if rng.random_bool(0.3) {
                let field = *["part_ids", "md5", "x"].choose(rng).unwrap();
                body[field] = weird(rng);
            }
            Request::json(
                rng,
                Method::POST,
                &format!("/v1/uploads/{id}/complete"),
                body,
            )
        }
        _ => {
            // A known path with the wrong method, or an odd one.
            let path = *[
                "/v1/images/generations",
                "/v1/images/edits",
                "/v1/images/variations",
                "/v1/models",
                "/v1/batches",
                "/health",
                "/metrics",
                "/openapi.json",
            ]
            .choose(rng)
            .unwrap();
            let method = [
                Method::GET,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
                Method::POST,
            ]
            .choose(rng)
            .unwrap()
            .clone();
            Request {
                method,
                path: path.into(),
                content_type: None,
                body: Vec::new(),
            }
        }
    }
}

/// The Authorization header: the key mostly, else a wrong or malformed one.
fn authorization(rng: &mut StdRng) -> Option<Vec<u8>> {
    if rng.random_bool(0.92) {
        return Some(format!("Bearer {KEY}").into_bytes());
    }
    [
        None,
        Some(b"Bearer".to_vec()),
        Some(b"Bearer ".to_vec()),
        Some(b"Bearer sk-wrong".to_vec()),
        Some(b"bearer sk-fuzz".to_vec()),
        Some(b"Basic c2stZnV6ejo=".to_vec()),
        Some(b"Bearer sk-fuzz\xff".to_vec()),
    ]
    .choose(rng)
    .unwrap()
    .clone()
}

/// Checks one answer; returns its JSON body when it has one.
fn check(case: usize, what: &str, status: u16, ctype: &str, body: &[u8]) -> Option<Value> {
    let shown = String::from_utf8_lossy(&body[..body.len().min(600)]).into_owned();
    assert!(
        status < 500,
        "case {case}: {what} -> {status} (a server error): {shown}"
    );
    if ctype.starts_with("text/event-stream") {
        let text = std::str::from_utf8(body)
            .unwrap_or_else(|e| panic!("case {case}: {what}: a stream not UTF-8: {e}"));
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            let event: Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("case {case}: {what}: event not JSON ({e}): {data}"));
            assert!(event["type"].is_string(), "case {case}: {what}: {data}");
        }
        return None;
    }
    if status >= 400 {
        assert!(
            ctype.starts_with("application/json"),
            "case {case}: {what} -> {status} with content type {ctype:?}: {shown}"
        );
        let v: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("case {case}: {what} -> {status}, not JSON ({e}): {shown}"));
        let err = v["error"]
            .as_object()
            .unwrap_or_else(|| panic!("case {case}: {what} -> {status}, no error object: {shown}"));
        for k in ["message", "type", "param", "code"] {
            assert!(
                err.contains_key(k),
                "case {case}: {what}: error lacks {k}: {shown}"
            );
        }
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "case {case}: {what}: {shown}"
        );
        assert!(err["type"].is_string(), "case {case}: {what}: {shown}");
        // A message broken across source lines by mistake shows as a run of spaces.
        assert!(
            !err["message"].as_str().unwrap_or("").contains("   "),
            "case {case}: {what}: {shown}"
        );
        return Some(v);
    }
    if ctype.starts_with("application/json") {
        let v: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("case {case}: {what} -> {status}, not JSON ({e}): {shown}"));
        return Some(v);
    }
    None
}

/// A path with its ids and query left out: `/v1/files/{id}/content`.
fn route_of(path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.split('/').collect();
    let known = |s: &str| {
        s.is_empty()
            || s == "v1"
            || [
                "images",
                "generations",
                "edits",
                "variations",
                "files",
                "batches",
                "cancel",
                "content",
                "models",
                "webhook_endpoints",
                "webhook_event_types",
                "rotate_secret",
                "test",
                "health",
                "metrics",
            ]
            .contains(&s)
    };
    segments
        .iter()
        .map(|s| if known(s) { *s } else { "{id}" })
        .collect::<Vec<_>>()
        .join("/")
}

type Tally = std::collections::BTreeMap<(String, String, u16), usize>;

/// One fuzzing thread's share: its requests, each checked, against what all threads made.
struct Run<'a> {
    s: &'a TestServer,
    client: &'a reqwest::blocking::Client,
    made: &'a std::sync::Mutex<Made>,
    tally: &'a std::sync::Mutex<Tally>,
    verbose: bool,
    /// How to replay it, for the failure messages.
    label: String,
}

impl Run<'_> {
    fn cases(&self, mut rng: StdRng, cases: usize) {
        let mut previous = String::from("none");
        for case in 0..cases {
            let req = next_request(&mut rng, &self.made.lock().unwrap());
            let what = format!(
                "{} {} ({} bytes, {:?}) [{}]",
                req.method,
                req.path.chars().take(120).collect::<String>(),
                req.body.len(),
                req.content_type,
                self.label
            );
            let mut r = self
                .client
                .request(req.method.clone(), self.s.url(&req.path));
            if let Some(auth) = authorization(&mut rng) {
                if let Ok(v) = HeaderValue::from_bytes(&auth) {
                    r = r.header(reqwest::header::AUTHORIZATION, v);
                }
            }
            if let Some(ct) = &req.content_type {
                r = r.header(reqwest::header::CONTENT_TYPE, ct);
            }
            if rng.random_bool(0.05) {
                let id: String = (0..rng.random_range(0..300))
                    .map(|_| *['a', '-', '\u{e9}', ' ', '9'].choose(&mut rng).unwrap())
                    .collect();
                if let Ok(v) = HeaderValue::from_bytes(id.as_bytes()) {
                    r = r.header(HeaderName::from_static("x-request-id"), v);
                }
            }
            if rng.random_bool(0.1) {
                // What a proxy says of the client (this client, on 127.0.0.1, is a trusted
                // peer by default): any value, for the image URLs and the log.
                let name = *[
                    "forwarded",
                    "x-forwarded-for",
                    "x-forwarded-proto",
                    "x-forwarded-host",
                    "x-forwarded-prefix",
                ]
                .choose(&mut rng)
                .unwrap();
                if let Ok(v) = HeaderValue::from_bytes(weird_str(&mut rng).as_bytes()) {
                    r = r.header(HeaderName::from_static(name), v);
                }
            }
            if !req.body.is_empty() {
                r = r.body(req.body);
            }
            let resp = r.send().unwrap_or_else(|e| {
                panic!("case {case}: {what}: no answer: {e:?} (after {previous})")
            });
            let status = resp.status().as_u16();
            let ctype = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = resp
                .bytes()
                .unwrap_or_else(|e| panic!("case {case}: {what}: body broke off: {e}"));
            *self
                .tally
                .lock()
                .unwrap()
                .entry((req.method.to_string(), route_of(&req.path), status))
                .or_default() += 1;
            if self.verbose {
                let message = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or_default();
                eprintln!("case {case}: {what} -> {status} {message}");
            }
            previous = format!(
                "{what} -> {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
            let Some(v) = check(case, &what, status, &ctype, &body) else {
                continue;
            };
            if status != 200 || req.method != Method::POST {
                continue;
            }
            let id = v["id"].as_str().unwrap_or("").to_string();
            let mut made = self.made.lock().unwrap();
            match req.path.as_str() {
                "/v1/files" => made.files.push(id),
                "/v1/batches" => made.batches.push(id),
                "/v1/webhook_endpoints" => made.webhooks.push(id),
                "/v1/uploads" => made.uploads.push(id),
                p if p.ends_with("/parts") => made.parts.push(id),
                p if p.starts_with("/v1/images/") => {
                    let data = v["data"].as_array();
                    assert!(
                        data.is_some_and(|d| !d.is_empty()
                            && d.iter()
                                .all(|i| i["b64_json"].is_string() || i["url"].is_string())),
                        "case {case}: {what}: 200 without images: {v}"
                    );
                }
                _ => {}
            }
        }
    }
}

/// The request counters of 5xx answers.
fn server_errors(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("turbine_http_requests_total") && l.contains("status=\"5"))
        .map(str::to_string)
        .collect()
}

#[test]
fn no_request_can_break_the_server() {
    let seed = std::env::var("TURBINE_FUZZ_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("TURBINE_FUZZ_SEED: an integer"))
        .unwrap_or_else(rand::random);
    let cases = std::env::var("TURBINE_FUZZ_CASES")
        .ok()
        .map(|s| s.parse::<usize>().expect("TURBINE_FUZZ_CASES: an integer"))
        .unwrap_or(1500);
    let threads = std::env::var("TURBINE_FUZZ_THREADS")
        .ok()
        .map(|s| {
            s.parse::<usize>()
                .expect("TURBINE_FUZZ_THREADS: an integer")
        })
        .unwrap_or(2)
        .max(1);
    let verbose = std::env::var_os("TURBINE_FUZZ_VERBOSE").is_some();
    eprintln!(
        "request fuzzer: TURBINE_FUZZ_SEED={seed} TURBINE_FUZZ_CASES={cases} \
         TURBINE_FUZZ_THREADS={threads}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    // Small images and few steps: the requests that are valid stay cheap on a CPU.
    config.limits.max_side = 128;
    config.limits.max_steps = 4;
    config.files.dir = Some(dir.path().to_path_buf());
    config.auth.keys = vec![ApiKey::plain(KEY)];
    let s = TestServer::start(config);
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let before = server_errors(&s.metrics());
    let made = std::sync::Mutex::new(Made::default());
    // (method, route, status) -> count: what the run reached, printed at the end.
    let tally = std::sync::Mutex::new(Tally::new());
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (s, client, made, tally) = (&s, &client, &made, &tally);
            let rng = StdRng::seed_from_u64(seed.wrapping_add(t as u64));
            let label =
                format!("TURBINE_FUZZ_SEED={seed} TURBINE_FUZZ_THREADS={threads}, thread {t}");
            scope.spawn(move || {
                let run = Run {
                    s,
                    client,
                    made,
                    tally,
                    verbose,
                    label,
                };
                run.cases(rng, cases / threads);
            });
        }
    });
    let made = made.into_inner().unwrap();
    let tally = tally.into_inner().unwrap();
    eprintln!(
        "request fuzzer: {cases} cases; made {} files, {} batches, {} webhook endpoints, {} \
         uploads with {} parts",
        made.files.len(),
        made.batches.len(),
        made.webhooks.len(),
        made.uploads.len(),
        made.parts.len()
    );
    for ((method, route, status), count) in &tally {
        eprintln!("  {method:6} {route:40} {status} x{count}");
    }

    // Every batch it made ends, and its results are whole: a line per request, each with its
    // custom_id and an answer.
    let mut ended = std::collections::BTreeMap::<String, usize>::new();
    for id in &made.batches {
        let start = std::time::Instant::now();
        let batch = loop {
            let b: Value = client
                .get(s.url(&format!("/v1/batches/{id}")))
                .bearer_auth(KEY)
                .send()
                .unwrap()
                .json()
                .unwrap();
            if ["completed", "failed", "cancelled", "expired"]
                .contains(&b["status"].as_str().unwrap())
            {
                break b;
            }
            assert!(
                start.elapsed().as_secs() < 300,
                "batch {id} never ended: {b}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let counts = &batch["request_counts"];
        *ended
            .entry(format!(
                "{} ({} requests)",
                batch["status"], counts["total"]
            ))
            .or_default() += 1;
        if verbose {
            eprintln!("batch {id}: {batch}");
        }
        let mut lines = 0;
        for file in ["output_file_id", "error_file_id"] {
            let Some(file_id) = batch[file].as_str() else {
                continue;
            };
            let text = client
                .get(s.url(&format!("/v1/files/{file_id}/content")))
                .bearer_auth(KEY)
                .send()
                .unwrap()
                .text()
                .unwrap();
            for line in text.lines() {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("batch {id}: {file} line not JSON ({e}): {line}"));
                assert!(v["custom_id"].is_string(), "batch {id}: {line}");
                assert!(
                    v["response"]["status_code"].is_u64() || v["error"].is_object(),
                    "batch {id}: {line}"
                );
                lines += 1;
            }
        }
        if batch["status"] == "completed" {
            assert_eq!(
                counts["completed"].as_u64().unwrap() + counts["failed"].as_u64().unwrap(),
                counts["total"].as_u64().unwrap(),
                "batch {id}: {batch}"
            );
            assert_eq!(
                lines,
                counts["total"].as_u64().unwrap(),
                "batch {id}: {batch}"
            );
        }
    }

    eprintln!("request fuzzer: the batches ended {ended:?}");

    // Still serving, and no server error counted but the 503s of `/health` while it started.
    assert_eq!(server_errors(&s.metrics()), before);
    let r = s.client.get(s.url("/health")).send().unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "after the fuzz", "size": "64x64", "seed": 1}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

impl TestServer {
    /// A raw connection to the server, whose reads give up after 120 s: a hang guard far
    /// above any timeout these tests wait out.
    fn raw(&self) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(self.base.trim_start_matches("http://")).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .unwrap();
        stream
    }
}

/// The head of an HTTP/1.1 POST of `len` bytes of `ctype` to `path`, with `key` when given.
fn post_head(path: &str, key: Option<&str>, ctype: &str, len: usize) -> String {
    let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\n{auth}content-type: {ctype}\r\n\
         content-length: {len}\r\n\r\n"
    )
}

/// A whole POST: [`post_head`] (no key) and `body`.
fn post(path: &str, ctype: &str, body: &[u8]) -> Vec<u8> {
    let mut request = post_head(path, None, ctype, body.len()).into_bytes();
    request.extend_from_slice(body);
    request
}

/// One request on an open connection and its answer: (head, lowercased; body).
fn exchange(
    conn: &mut std::io::BufReader<std::net::TcpStream>,
    request: &[u8],
) -> (String, Vec<u8>) {
    use std::io::{BufRead, Read, Write};
    conn.get_mut().write_all(request).unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            conn.read_line(&mut line).unwrap() > 0,
            "closed mid-answer: {head}"
        );
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; length];
    conn.read_exact(&mut body).unwrap();
    (head, body)
}

/// What the fuzzer found first: a request refused before its body was read (a 415 for a large
/// body of the wrong type) left the connection half-used; hyper dropped it without saying so,
/// the client pooled it, and the client's next request failed. The answer now says
/// `connection: close` (and the server closes it), while a request whose body was read keeps its
/// connection for the next one.
#[test]
fn a_body_left_unread_closes_its_connection_and_says_so() {
    use std::io::Read;
    let s = TestServer::start(test_config());
    let open = || std::io::BufReader::new(s.raw());
    let g = "/v1/images/generations";

    // Read bodies, refused or served, keep the connection: three answers on one.
    let mut conn = open();
    let bad = json!({"prompt": "x", "n": 99}).to_string();
    let good = json!({"prompt": "kept alive", "size": "64x64"}).to_string();
    for (body, want) in [(&bad, "400"), (&good, "200"), (&bad, "400")] {
        let (head, _) = exchange(&mut conn, &post(g, "application/json", body.as_bytes()));
        assert!(head.starts_with(&format!("http/1.1 {want}")), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }

    // So does an edit's form, read to its closing boundary.
    let (ctype, form) = super::multipart(
        &[("prompt", "kept alive"), ("size", "64x64")],
        &[("image", &png_bytes(&super::edit_input()))],
    );
    let request = post("/v1/images/edits", &ctype, &form);
    for _ in 0..2 {
        let (head, _) = exchange(&mut conn, &request);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }

    // A 415 answered before 256 KiB of body: said to close, and closed.
    let mut conn = open();
    let (head, body) = exchange(&mut conn, &post(g, "text/plain", &vec![b'x'; 256 << 10]));
    assert!(head.starts_with("http/1.1 415"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));

    // A GET carries no body to leave unread.
    let mut conn = open();
    for _ in 0..2 {
        let (head, _) = exchange(&mut conn, b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n");
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
}

/// A request refused before its body was read, a 401 or a 429 of the key's request limit (what
/// a gateway retries), keeps its connection when the body is small: the server reads the rest
/// before it answers. A large unread body still closes it, and so does a small one that does
/// not arrive.
#[test]
fn a_small_body_refused_unread_keeps_its_connection() {
    use std::io::{Read, Write};
    let mut config = test_config();
    config.auth.keys = turbine::server::auth::parse_keys("sk-a requests_per_minute=2\n").unwrap();
    let s = TestServer::start(config);
    let g = "/v1/images/generations";
    let body = json!({"prompt": "kept alive", "size": "64x64"}).to_string();
    let with_key = |key: Option<&str>, ctype: &str, body: &[u8]| {
        let mut r = post_head(g, key, ctype, body.len()).into_bytes();
        r.extend_from_slice(body);
        r
    };
    let mut conn = std::io::BufReader::new(s.raw());
    for (key, ctype, want) in [
        (None, "application/json", "401"),
        (Some("sk-wrong"), "application/json", "401"),
        (Some("sk-a"), "text/plain", "415"),
        (Some("sk-a"), "application/json", "200"),
        (Some("sk-a"), "application/json", "429"),
        (Some("sk-a"), "application/json", "429"),
    ] {
        let (head, _) = exchange(&mut conn, &with_key(key, ctype, body.as_bytes()));
        assert!(head.starts_with(&format!("http/1.1 {want}")), "{head}");
        assert!(!head.contains("connection: close"), "{want}: {head}");
    }

    // 128 KiB unread: said to close, and closed.
    let big = vec![b'x'; 128 << 10];
    let (head, _) = exchange(&mut conn, &with_key(None, "application/json", &big));
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));

    // A small body half sent: answered once the wait for the rest is over, and closed.
    let mut stream = s.raw();
    let request = with_key(None, "application/json", body.as_bytes());
    stream.write_all(&request[..request.len() - 5]).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let lower = answer.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 401"), "{answer}");
    assert!(lower.contains("connection: close"), "{answer}");
}

/// What an abandoning client does to its connection.
#[derive(Clone, Copy, Debug)]
enum Abandon {
    /// Sends the head and half the body, then closes.
    MidBody,
    /// Sends a whole request of several images, then closes without reading once they are
    /// likely queued or running.
    Queued,
    /// Asks for a stream, reads its first bytes, then closes.
    MidStream,
    /// Sends half a head, then closes.
    MidHead,
}

fn abandon(s: &TestServer, how: Abandon, seed: u64) {
    use std::io::{Read, Write};
    let mut stream = s.raw();
    let body = match how {
        Abandon::MidStream => json!({"prompt": "left", "n": 2, "steps": 3, "size": "128x128",
                                     "stream": true, "partial_images": 2, "seed": seed % 1000}),
        _ => json!({"prompt": "left", "n": 3, "steps": 4, "size": "128x128", "seed": seed % 1000}),
    }
    .to_string();
    let head = post_head(
        "/v1/images/generations",
        Some(KEY),
        "application/json",
        body.len(),
    );
    // A peer that already closed may reset these writes; the point is what the server does.
    let _ = match how {
        Abandon::MidHead => stream.write_all(&head.as_bytes()[..head.len() / 2]),
        Abandon::MidBody => stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(&body.as_bytes()[..body.len() / 2])),
        Abandon::Queued | Abandon::MidStream => stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes())),
    };
    match how {
        Abandon::MidStream => {
            let mut first = [0u8; 64];
            let _ = stream.read(&mut first);
        }
        Abandon::Queued => std::thread::sleep(std::time::Duration::from_millis(20 + seed % 200)),
        _ => {}
    }
    drop(stream);
}

/// Clients that give up half-way (mid-head, mid-body, queued, mid-stream) while others are
/// served: every well-behaved request still gets all its images, and once the dust settles
/// nothing is left counted in flight or queued (a leak would hold shutdown's drain and skew
/// `Retry-After`), and the server still serves.
#[test]
fn abandoned_requests_cost_the_others_nothing() {
    let mut config = test_config();
    config.limits.max_side = 128;
    config.auth.keys = vec![ApiKey::plain(KEY)];
    let s = std::sync::Arc::new(TestServer::start(config));
    let seed: u64 = rand::random();
    eprintln!("abandoned requests: seed {seed}");

    let enqueued_before = s.metric("turbine_images_enqueued_total");
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let s = s.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ t);
            let mut asked = 0;
            for i in 0..6 {
                let n = rng.random_range(1..4u64);
                let stream = rng.random_bool(0.3);
                let body = json!({"prompt": format!("kept {t} {i}"), "n": n, "size": "64x64",
                                  "stream": stream, "seed": rng.random::<u32>()});
                let r = s
                    .client
                    .post(s.url("/v1/images/generations"))
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .unwrap();
                assert_eq!(r.status(), 200, "{body}");
                let text = r.text().unwrap();
                let images = if stream {
                    text.lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .map(|d| serde_json::from_str::<Value>(d).unwrap())
                        .filter(|e| e["type"] == "image_generation.completed")
                        .count()
                } else {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    v["data"].as_array().unwrap().len()
                };
                assert_eq!(images as u64, n, "{body}: {text:.300}");
                asked += n;
            }
            asked
        }));
    }
    for t in 0..2u64 {
        let s = s.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ (100 + t));
            for i in 0..10 {
                let how = *[
                    Abandon::MidBody,
                    Abandon::Queued,
                    Abandon::MidStream,
                    Abandon::MidHead,
                ]
                .choose(&mut rng)
                .unwrap();
                abandon(&s, how, rng.random::<u64>() ^ i);
                std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..80)));
            }
            0
        }));
    }
    let asked: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    s.wait_metric("turbine_http_requests_in_flight", |v| v == 0.0);
    s.wait_metric("turbine_queue_images", |v| v == 0.0);
    // The abandoned requests did reach the queue (not all refused or cut before it).
    let enqueued = s.metric("turbine_images_enqueued_total") - enqueued_before;
    eprintln!(
        "abandoned requests: {enqueued} images enqueued for {asked} asked by the clients that \
         stayed; {} dropped for clients gone",
        s.metric("turbine_images_dropped_total{reason=\"client_disconnected\"}"),
    );
    assert!(enqueued > asked as f64, "{enqueued} {asked}");
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "after", "size": "64x64"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A body that stops arriving fails after `--request-body-timeout` with a 408 in OpenAI's
/// shape, whichever route reads it (JSON, an edit's form, a file upload); the connection
/// closes and nothing stays in flight. A body that keeps arriving, however slowly, is read.
#[test]
fn a_stalled_body_gets_408_and_a_slow_one_is_read() {
    use std::io::{Read, Write};
    let mut config = test_config();
    config.limits.body_timeout = std::time::Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    config.files.dir = Some(dir.path().to_path_buf());
    let s = TestServer::start(config);
    let connect = || s.raw();
    let head = |path: &str, ctype: &str, len: usize| post_head(path, None, ctype, len);
    let json_body = json!({"prompt": "slow", "size": "64x64", "seed": 5}).to_string();
    let (form_type, form) = super::multipart(
        &[("prompt", "slow"), ("size", "64x64")],
        &[("image", &png_bytes(&super::edit_input()))],
    );
    let (file_type, file) = super::multipart(&[("purpose", "batch")], &[("file", b"{}")]);
    let cases = [
        (
            "/v1/images/generations",
            "application/json",
            json_body.as_bytes(),
        ),
        ("/v1/images/edits", form_type.as_str(), &form[..]),
        ("/v1/files", file_type.as_str(), &file[..]),
    ];
    for (n, (path, ctype, body)) in cases.iter().enumerate() {
        let mut stream = connect();
        stream
            .write_all(head(path, ctype, body.len()).as_bytes())
            .unwrap();
        stream.write_all(&body[..body.len() / 2]).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let lower = answer.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 408"), "{path}: {answer}");
        assert!(lower.contains("connection: close"), "{path}: {answer}");
        let json_start = answer.find("\r\n\r\n").unwrap() + 4;
        let v: Value = serde_json::from_str(&answer[json_start..]).unwrap();
        assert_eq!(v["error"]["code"], "request_body_timeout", "{path}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(
            s.metric("turbine_errors_total{type=\"body_timeout\"}"),
            (n + 1) as f64
        );
        assert_eq!(
            s.metric(&format!(
                "turbine_http_requests_total{{route=\"{path}\",status=\"408\"}}"
            )),
            1.0
        );
    }
    s.wait_metric("turbine_http_requests_in_flight", |v| v == 0.0);

    // 20 pieces 200 ms apart: 4 s in all, twice the timeout, never 2 s without a byte.
    for (path, ctype, body) in cases {
        let mut stream = connect();
        stream
            .write_all(head(path, ctype, body.len()).as_bytes())
            .unwrap();
        for piece in body.chunks(body.len().div_ceil(20)) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            stream.write_all(piece).unwrap();
        }
        let mut conn = std::io::BufReader::new(stream);
        let mut status = String::new();
        std::io::BufRead::read_line(&mut conn, &mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{path}: {status}");
    }
}

/// A server whose `--header-read-timeout` and `--keep-alive-timeout` are 1 s and whose batches
/// take 150 ms (one image each), so that a request of ten images outlasts the timeouts.
fn slow_server_timing_out_in_a_second() -> TestServer {
    let mut config = test_config();
    config.limits.header_timeout = std::time::Duration::from_secs(1);
    config.limits.keep_alive_timeout = std::time::Duration::from_secs(1);
    config.batching.max_batch_size = 1;
    TestServer::start_with(config, |p| Box::new(super::Slow(p)))
}

/// Runs a test's HTTP/2 client: an HTTP/2 connection (prior knowledge) to `s`, the client half
/// and the connection's future to drive, handed to `f` with the server's address.
fn with_h2<F, Fut>(s: &TestServer, f: F)
where
    F: FnOnce(String, h2::client::SendRequest<axum::body::Bytes>, H2Connection) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let addr = s.base.trim_start_matches("http://").to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        f(addr, client, connection).await
    });
}

type H2Connection = h2::client::Connection<tokio::net::TcpStream, axum::body::Bytes>;

/// A POST of `body` (of `ctype`, the whole of it unless `more` says more follows) to
/// `/v1/images/generations` on the HTTP/2 connection to `addr`.
async fn h2_post(
    client: h2::client::SendRequest<axum::body::Bytes>,
    addr: &str,
    ctype: &str,
    body: Vec<u8>,
    more: bool,
) -> (
    h2::client::SendRequest<axum::body::Bytes>,
    h2::client::ResponseFuture,
    h2::SendStream<axum::body::Bytes>,
) {
    let mut client = client.ready().await.unwrap();
    let request = axum::http::Request::post(format!("http://{addr}/v1/images/generations"))
        .header("content-type", ctype)
        .body(())
        .unwrap();
    let (response, mut upload) = client.send_request(request, false).unwrap();
    upload.send_data(body.into(), !more).unwrap();
    (client, response, upload)
}

/// An HTTP/2 response's status and body, read to its end.
async fn h2_body(response: h2::client::ResponseFuture) -> (u16, Vec<u8>) {
    let response = response.await.unwrap();
    (response.status().as_u16(), h2_read(response).await)
}

async fn h2_read(response: axum::http::Response<h2::RecvStream>) -> Vec<u8> {
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    text
}

/// Over HTTP/2 (prior knowledge, as a gateway may speak to its upstreams) a request refused
/// before its body is read gets its answer, and the upload goes on to its end: the server reads
/// and drops the rest rather than resetting the stream under the response (curl, for one, then
/// reports the reset and drops the answer). Then the same connection generates.
#[test]
fn http2_refusals_let_the_upload_finish() {
    use axum::body::Bytes;
    use std::future::poll_fn;
    let s = TestServer::start(test_config());
    with_h2(&s, |addr, client, connection| async move {
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let (client, response, mut upload) =
            h2_post(client, &addr, "text/plain", vec![b'x'; 1024], true).await;
        let response = response.await.unwrap();
        assert_eq!(response.status(), 415);
        // 2 MiB more, sent as the server's flow control allows: only a server that reads on
        // grants the window for it, and a reset shows as an error here.
        let mut left = 2 << 20;
        while left > 0 {
            upload.reserve_capacity(left);
            let granted = poll_fn(|cx| upload.poll_capacity(cx))
                .await
                .expect("the stream ended under the upload")
                .unwrap_or_else(|e| panic!("the upload was reset with {left} bytes left: {e}"));
            let n = granted.min(left);
            upload.send_data(Bytes::from(vec![b'x'; n]), false).unwrap();
            left -= n;
        }
        upload.send_data(Bytes::new(), true).unwrap();
        let v: Value = serde_json::from_slice(&h2_read(response).await).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");

        let json = serde_json::to_vec(&json!({"prompt": "over h2", "size": "64x64"})).unwrap();
        let (_client, response, _) = h2_post(client, &addr, "application/json", json, false).await;
        assert_eq!(h2_body(response).await.0, 200);
    });
}

/// `--header-read-timeout` over HTTP/2: a connection with no request open for that long (here
/// 1 s) gets a GOAWAY and is closed, one that sent the preface and nothing more too; a
/// request that takes longer than that (ten 150 ms batches) is not cut, nor is the connection
/// while it runs. The waits are hang guards of 120 s.
#[test]
fn http2_connections_left_idle_are_closed() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let s = slow_server_timing_out_in_a_second();

    // The preface's magic, then silence: no SETTINGS, and no answer to the ping of the
    // GOAWAY that closes it, so it is dropped after a second timeout.
    let mut mute = s.raw();
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = mute.read_to_end(&mut rest);

    with_h2(&s, |addr, mut client, connection| async move {
        let connection = tokio::spawn(connection);
        let json =
            serde_json::to_vec(&json!({"prompt": "long", "n": 10, "size": "64x64"})).unwrap();
        for _ in 0..2 {
            let (next, response, _) =
                h2_post(client, &addr, "application/json", json.clone(), false).await;
            client = next;
            let (status, text) = h2_body(response).await;
            assert_eq!(status, 200);
            let v: Value = serde_json::from_slice(&text).unwrap();
            assert_eq!(v["data"].as_array().unwrap().len(), 10);
        }
        // Idle now: the server ends the connection (GOAWAY, then close), which ends the
        // client's connection task.
        let ended = tokio::time::timeout(Duration::from_secs(120), connection).await;
        assert!(ended.is_ok(), "the idle HTTP/2 connection was not closed");
        drop(client);
    });
    s.wait_metric("turbine_http_connections", |v| v == 1.0);
}

/// An HTTP/2 client that stops answering while its request is queued (its host gone, the
/// connection never closed) is found out by the server's pings (every half of
/// `--header-read-timeout`, here 0.5 s): the connection is closed and the request's images that
/// have not started are dropped, as for a client that hung up.
#[test]
fn a_vanished_http2_client_is_found_by_pings() {
    use std::time::Duration;
    let s = slow_server_timing_out_in_a_second();
    let metrics = s.url("/metrics");
    with_h2(&s, |addr, client, connection| async move {
        let (vanish, vanished) = tokio::sync::oneshot::channel::<()>();
        let connection = tokio::spawn(async move {
            let mut connection = Box::pin(connection);
            tokio::select! {
                r = connection.as_mut() => panic!("the connection ended early: {r:?}"),
                _ = vanished => {}
            }
            // Never polled again, never dropped: the socket stays open, and nothing on this
            // side reads or answers what the server sends.
            std::mem::forget(connection);
        });
        let json = json!({"prompt": "gone", "n": 10, "size": "64x64"}).to_string();
        let sent = h2_post(client, &addr, "application/json", json.into_bytes(), false).await;
        // Queued (the scrape is another connection), then the client goes quiet.
        let enqueued = tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            loop {
                let text = reqwest::blocking::get(&metrics).unwrap().text().unwrap();
                if super::metric_in(&text, "turbine_images_enqueued_total") >= 10.0 {
                    return;
                }
                assert!(start.elapsed() < Duration::from_secs(300), "never queued");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        enqueued.await.unwrap();
        vanish.send(()).unwrap();
        connection.await.unwrap();
        std::mem::forget(sent);
    });
    // A few of the ten ran before the pings gave up on the client; the rest were dropped.
    s.wait_metric(
        "turbine_images_dropped_total{reason=\"client_disconnected\"}",
        |v| v >= 1.0,
    );
    assert!(s.metric("turbine_images_generated_total") < 10.0);
}

/// `--header-read-timeout`: a connection that sends nothing, one that sends part of HTTP/2's
/// preface, one that sends half a head and stalls, and a keep-alive connection left idle after
/// its answer are all closed by the server
/// (here after 1 s; the reads wait up to 120 s, a hang guard). A request whose answer takes
/// longer than that (ten 150 ms batches) is not cut, and its connection serves the next; nor is
/// a stream that long.
#[test]
fn idle_and_stalled_connections_are_closed() {
    use std::io::{Read, Write};
    let s = slow_server_timing_out_in_a_second();
    let connect = || s.raw();
    // Read until the server closes (a reset too: it had unread bytes); a read timeout (the
    // hang guard) fails the test.
    let until_closed = |stream: &mut std::net::TcpStream| {
        let mut rest = Vec::new();
        if let Err(e) = stream.read_to_end(&mut rest) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "not closed: {e}"
            );
        }
    };

    // Three connections that send nothing are counted open, then closed.
    let mut silent: Vec<_> = (0..3).map(|_| connect()).collect();
    s.wait_metric("turbine_http_connections", |v| v >= 4.0);
    for c in &mut silent {
        until_closed(c);
    }
    // The start of HTTP/2's preface, which leaves the protocol open.
    let mut undecided = connect();
    undecided.write_all(b"PRI * HTTP/2").unwrap();
    until_closed(&mut undecided);

    let mut half = connect();
    half.write_all(b"POST /v1/images/generations HTTP/1.1\r\nhost: t\r\ncontent-")
        .unwrap();
    until_closed(&mut half);

    // Ten images one per batch: over a second and a half of serving, then the same
    // connection asks again and gets its answer, then it idles and is closed.
    let body = json!({"prompt": "long", "n": 10, "size": "64x64"}).to_string();
    let request = post(
        "/v1/images/generations",
        "application/json",
        body.as_bytes(),
    );
    let mut conn = std::io::BufReader::new(connect());
    for _ in 0..2 {
        let (head, answer) = exchange(&mut conn, &request);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let v: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 10);
    }
    until_closed(conn.get_mut());

    // A stream that outlasts the timeout as well: its events flow to the last.
    let r = s.generate(&json!({"prompt": "long", "n": 10, "size": "64x64", "stream": true}));
    assert_eq!(r.status(), 200);
    let completed = super::sse_events(&r.text().unwrap())
        .iter()
        .filter(|(_, e)| e["type"] == "image_generation.completed")
        .count();
    assert_eq!(completed, 10);

    // Every connection but the scrape's own is closed once idle.
    s.wait_metric("turbine_http_connections", |v| v == 1.0);
}

/// `--keep-alive-timeout` apart from `--header-read-timeout` (here 3 s and 1 s): a keep-alive
/// connection idle for longer than the head's bound but within its own serves its next request
/// (a load balancer whose idle timeout is the server's head bound would otherwise race the
/// server's close with its next request, and answer 502); one idle past it is closed; a head
/// begun after idling must still come whole within 1 s of its first byte, and a new connection
/// that sends nothing is closed after 1 s. Over HTTP/2, the GOAWAY comes after the keep-alive
/// time too.
#[test]
fn keep_alive_idle_time_is_bounded_apart_from_a_heads_time() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let mut config = test_config();
    config.limits.header_timeout = Duration::from_secs(1);
    config.limits.keep_alive_timeout = Duration::from_secs(3);
    let s = TestServer::start(config);
    let closed_after = |stream: &mut std::net::TcpStream, since: Instant| {
        let mut rest = Vec::new();
        if let Err(e) = stream.read_to_end(&mut rest) {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        since.elapsed()
    };
    let get = b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n";

    // Idle 2 s between requests: past the head's bound, within keep-alive. Served.
    let mut conn = std::io::BufReader::new(s.raw());
    let (head, _) = exchange(&mut conn, get);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    std::thread::sleep(Duration::from_secs(2));
    let (head, _) = exchange(&mut conn, get);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Then half a head, after a short idle: closed about 1 s after its first byte.
    std::thread::sleep(Duration::from_millis(500));
    conn.get_mut()
        .write_all(b"GET /health HTTP/1.1\r\nhost:")
        .unwrap();
    let took = closed_after(conn.get_mut(), Instant::now());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );

    // Idle after its answer: closed once the keep-alive time is up.
    let mut conn = std::io::BufReader::new(s.raw());
    let (head, _) = exchange(&mut conn, get);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let took = closed_after(conn.get_mut(), Instant::now());
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // A new connection that sends nothing: the head's bound.
    let started = Instant::now();
    let took = closed_after(&mut s.raw(), started);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );

    // HTTP/2: idle after its request, the GOAWAY comes after the keep-alive time.
    with_h2(&s, |addr, client, connection| async move {
        let connection = tokio::spawn(connection);
        let json = serde_json::to_vec(&json!({"prompt": "h2", "size": "64x64"})).unwrap();
        let (client, response, _) = h2_post(client, &addr, "application/json", json, false).await;
        assert_eq!(h2_body(response).await.0, 200);
        let idle = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(120), connection).await;
        assert!(ended.is_ok(), "the idle HTTP/2 connection was not closed");
        let took = idle.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_secs(10),
            "{took:?}"
        );
        drop(client);
    });
}

/// `--max-connections`: with that many open (here 3: the test client's pooled one and two raw
/// ones), a new connection is not accepted, so its request waits in the listen backlog, not
/// refused; when one closes, it is accepted and answered. The metrics tell the limit and that
/// it was reached.
#[test]
fn connections_past_max_connections_wait_for_one_to_close() {
    use std::io::Write;
    let mut config = test_config();
    config.max_connections = Some(3);
    let s = TestServer::start(config);
    // The client's own connection (kept in its pool after this) is the first.
    assert_eq!(s.metric("turbine_http_connections_max"), 3.0);
    assert_eq!(s.metric("turbine_http_connection_limit_waits_total"), 0.0);
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").into_bytes();
    let mut open: Vec<_> = (0..2)
        .map(|_| {
            let mut conn = std::io::BufReader::new(s.raw());
            let (head, _) = exchange(&mut conn, &get("/health"));
            assert!(head.starts_with("http/1.1 200"), "{head}");
            conn
        })
        .collect();

    // The fourth: connected (the kernel's backlog), but not accepted, so not answered.
    let mut waiting = s.raw();
    waiting
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    waiting.write_all(&get("/metrics")).unwrap();
    let mut byte = [0u8; 1];
    let e = std::io::Read::read(&mut waiting, &mut byte).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "answered past the limit: {e}"
    );

    // One closes: the waiting one is accepted and its request (sent long before) answered.
    drop(open.pop());
    waiting
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut waiting = std::io::BufReader::new(waiting);
    let (head, body) = exchange(&mut waiting, b"");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let metrics = String::from_utf8(body).unwrap();
    assert!(metric_in(&metrics, "turbine_http_connection_limit_waits_total") >= 1.0);
    assert_eq!(metric_in(&metrics, "turbine_http_connections"), 3.0);
    assert_eq!(metric_in(&metrics, "turbine_http_connections_max"), 3.0);
}

/// `--max-buffered-input-bytes`: a body takes its share of the budget (its `Content-Length`)
/// before it is read, and an edit's file named by `file_id` its own before it is read. With four
/// edits' bodies half sent (and trickling, so none stalls), a fifth edit does not fit, nor does
/// the file of a JSON edit (whose small body does not wait behind the form): each waits, its
/// body unread, and past `--request-body-timeout` gets 503 `server_overloaded` with
/// `Retry-After`, while requests without a body are answered. One that waits while a holder
/// finishes gets that share and is served; every share comes back.
#[test]
fn bodies_past_the_input_budget_wait_unread_and_are_refused_past_the_body_timeout() {
    use std::io::{BufReader, Write};
    use std::time::{Duration, Instant};
    let mut config = test_config();
    config.limits.max_upload_bytes = 64 << 10;
    config.limits.max_body_bytes = 64 << 10;
    config.max_buffered_input = Some(256 << 10);
    config.limits.body_timeout = Duration::from_secs(2);
    let s = TestServer::start(config);
    assert_eq!(
        s.metric("turbine_buffered_input_max_bytes"),
        (256 << 10) as f64
    );
    let mut rng = StdRng::seed_from_u64(rand::random());
    let noise = image::RgbImage::from_fn(140, 140, |_, _| image::Rgb(rng.random()));
    let (ctype, form) = super::multipart(
        &[("prompt", "held"), ("size", "64x64")],
        &[("image", &png_bytes(&noise))],
    );
    // Four fit in the 240 KiB of the budget for large shares (16 are kept for small ones), a
    // fifth does not.
    assert!(
        form.len() > 48 << 10 && form.len() <= 60 << 10,
        "{}",
        form.len()
    );
    let share = (form.len().div_ceil(1024) * 1024) as f64;
    // The same image as a file that JSON edits name: reading it takes its share too.
    let (status, file) = s.upload_as(None, "vision", &png_bytes(&noise));
    assert_eq!(status, 200, "{file}");
    let by_id = json!({"prompt": "held", "size": "64x64", "images": [{"file_id": file["id"]}]});
    let head = post_head("/v1/images/edits", None, &ctype, form.len());
    let whole = [head.as_bytes(), &form].concat();
    let mut holders: Vec<(BufReader<std::net::TcpStream>, usize)> = (0..4)
        .map(|_| {
            let mut conn = s.raw();
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(&form[..form.len() / 2]).unwrap();
            (BufReader::new(conn), form.len() / 2)
        })
        .collect();
    s.wait_metric("turbine_buffered_input_bytes", |v| v == 4.0 * share);
    let trickle = |holders: &mut Vec<(BufReader<std::net::TcpStream>, usize)>| {
        for (conn, sent) in holders.iter_mut() {
            conn.get_mut().write_all(&form[*sent..*sent + 1]).unwrap();
            *sent += 1;
        }
    };
    let by_id_whole = post(
        "/v1/images/edits",
        "application/json",
        by_id.to_string().as_bytes(),
    );
    let send = |request: &[u8]| {
        let mut conn = BufReader::new(s.raw());
        let request = request.to_vec();
        std::thread::spawn(move || exchange(&mut conn, &request))
    };
    // A batch's edit by that file id waits too; refused, it tries again later rather than fail.
    let line = super::batch_line("held", "/v1/images/edits", by_id.clone());
    let (status, input) = s.upload(None, &line);
    assert_eq!(status, 200, "{input}");
    let (status, batch) = s.call(
        "POST",
        "/v1/batches",
        None,
        Some(
            json!({"input_file_id": input["id"], "endpoint": "/v1/images/edits",
                    "completion_window": "24h"}),
        ),
    );
    assert_eq!(status, 200, "{batch}");
    while s.metric("turbine_buffered_input_waits_total") < 1.0 {
        trickle(&mut holders);
        std::thread::sleep(Duration::from_millis(100));
    }
    // An edit's form, and a JSON edit whose small body fits but whose file does not.
    let refused = [send(&whole), send(&by_id_whole)];
    let t0 = Instant::now();
    while refused.iter().any(|r| !r.is_finished()) {
        trickle(&mut holders);
        // A request without a body takes no share.
        let health = s.client.get(s.url("/health")).send().unwrap();
        assert_eq!(health.status(), 200);
        std::thread::sleep(Duration::from_millis(300));
        assert!(t0.elapsed() < Duration::from_secs(60), "never answered");
    }
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    for refused in refused {
        let (answer, body) = refused.join().unwrap();
        assert!(answer.starts_with("http/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 5\r\n"), "{answer}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
        assert_eq!(v["error"]["type"], "server_error");
    }
    // The JSON edit's small body did not wait behind the form: its file did.
    assert_eq!(s.metric("turbine_buffered_input_waits_total"), 3.0);
    assert_eq!(
        s.metric("turbine_errors_total{type=\"input_memory_full\"}"),
        2.0
    );
    assert_eq!(s.metric("turbine_buffered_input_bytes"), 4.0 * share);

    // The next waits too, until the first holder's body is whole: then it has that share.
    let served = send(&whole);
    for _ in 0..3 {
        trickle(&mut holders);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!served.is_finished());
    assert_eq!(s.metric("turbine_buffered_input_waits_total"), 4.0);
    let finish = |(mut conn, sent): (BufReader<std::net::TcpStream>, usize)| {
        let (answer, body) = exchange(&mut conn, &form[sent..]);
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
    };
    finish(holders.remove(0));
    let (answer, _) = served.join().unwrap();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    for holder in holders {
        finish(holder);
    }
    s.wait_metric("turbine_buffered_input_bytes", |v| v == 0.0);
    s.wait_metric("turbine_http_requests_in_flight", |v| v == 0.0);
    // With the room back, the edit by file id is served, and the batch's when it tries again.
    let (answer, _) = send(&by_id_whole).join().unwrap();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    let batch = s.wait_batch(None, batch["id"].as_str().unwrap());
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 1, "completed": 1, "failed": 0})
    );
    assert_eq!(s.metric("turbine_buffered_input_bytes"), 0.0);
}

/// A client that reads nothing of its response (stuck, but its host alive: it answers TCP's
/// window probes) is disconnected once what the server wrote has gone untaken for
/// `--header-read-timeout` (TCP_USER_TIMEOUT), instead of holding the response, megabytes of
/// base64 images, for as long as the server runs. The response here is larger than the
/// kernel's buffers can take, so its writer waits on the client.
#[cfg(target_os = "linux")]
#[test]
fn a_client_that_reads_nothing_of_its_response_is_disconnected() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let mut config = test_config();
    config.limits.header_timeout = Duration::from_secs(2);
    let s = TestServer::start(config);
    let open = s.metric("turbine_http_connections");
    // A small receive buffer, set before connecting, keeps the window small.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stuck: std::net::TcpStream = socket.into();
    let body = json!({"prompt": "never read", "n": 10, "size": "512x512"}).to_string();
    stuck
        .write_all(&post(
            "/v1/images/generations",
            "application/json",
            body.as_bytes(),
        ))
        .unwrap();
    s.wait_metric("turbine_images_generated_total", |v| v >= 10.0);
    let t0 = Instant::now();
    s.wait_metric("turbine_http_connections", |v| {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the unread connection is still open"
        );
        v == open
    });
    drop(stuck);
}
