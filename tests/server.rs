//! HTTP contract tests: the real server (axum, batcher, worker thread, the real `Pipeline` on
//! the tiny fixture model, on CPU) on 127.0.0.1:0, spoken to over HTTP.
//!
//! Images are 64x64 with 1 step unless a test needs the device busy for a while; then a
//! "blocker" request of several larger, many-step images holds the single worker (one image
//! per batch) so later requests are still queued when the test acts on them. Tests wait on
//! metrics, never on the clock.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use candle_core::{DType, Device};
use image::{GenericImageView, RgbImage};
use reqwest::blocking::{Client, Response};
use reqwest::Method;
use serde_json::{json, Value};
use turbine::model::pipeline::{GeneratedBatch, GenerationSettings, ImageRequest, Pipeline};
use turbine::server::adapters::Adapters;
use turbine::server::auth::ApiKey;
use turbine::server::queue::Priority;
use turbine::server::stall::StallTimeout;
use turbine::server::{ImageBackend, ServerConfig, WorkerSpec};

#[path = "server/fuzz.rs"]
mod fuzz;
#[path = "server/otel.rs"]
mod otel;
#[path = "server/tls.rs"]
mod tls;

/// 64x64, one step, no guidance: a generation of the test server's default, or with `edit`,
/// `POST /v1/images/edits`' default (1 step at strength 0.5: diffusers' 2 steps at 0.5).
fn tiny_settings(edit: bool) -> GenerationSettings {
    let (steps, init_step) = if edit {
        let (steps, start) = turbine::model::pipeline::edit_schedule(1, 0.5).unwrap();
        (steps, Some(start))
    } else {
        (1, None)
    };
    GenerationSettings {
        width: 64,
        height: 64,
        steps,
        guidance_scale: 0.0,
        init_step,
        adapter: None,
    }
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

/// A blocker: enough work to keep one worker busy while the test queues, cancels or times out
/// other requests behind it (6 images of 256x256 at 4 steps, one per batch: seconds on a CPU).
fn blocker() -> Value {
    json!({"prompt": "blocker", "n": 6, "size": "256x256", "steps": 4, "seed": 1})
}

/// Test defaults: tiny images, one warm-up image.
fn test_config() -> ServerConfig {
    let mut c = ServerConfig::default();
    c.limits.min_side = 64;
    c.limits.max_side = 512;
    c.limits.default_size = (64, 64);
    c.batching.max_batch_size = 4;
    c.warmup_images = 1;
    c.shutdown_grace = Duration::from_secs(5);
    c
}

/// Wraps a worker's Pipeline into the backend it serves with.
type MakeBackend = Box<dyn FnOnce(Pipeline) -> Box<dyn ImageBackend> + Send>;

struct TestServer {
    base: String,
    client: Client,
    /// Each message is a stop signal (a second ends the drain at once).
    stop: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    fn start(config: ServerConfig) -> Self {
        Self::start_with(config, |p| Box::new(p))
    }

    /// A server whose one worker, "cpu", runs `backend(the tiny model's Pipeline)`.
    fn start_with(
        config: ServerConfig,
        backend: impl FnOnce(Pipeline) -> Box<dyn ImageBackend> + Send + 'static,
    ) -> Self {
        Self::start_devices(config, vec![("cpu", Box::new(backend))])
    }

    /// A server with one worker per (label, backend(the tiny model's Pipeline)).
    fn start_devices(config: ServerConfig, devices: Vec<(&'static str, MakeBackend)>) -> Self {
        let client = Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        Self::start_as(config, devices, "http://127.0.0.1", client)
    }

    /// A server spoken to at `origin` (scheme and host; the port is added) by `client`.
    fn start_as(
        config: ServerConfig,
        devices: Vec<(&'static str, MakeBackend)>,
        origin: &str,
        client: Client,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let dir = model_dir();
                let tokens = turbine::cli::serve::token_counter(&dir)?;
                let specs = devices
                    .into_iter()
                    .map(|(label, backend)| {
                        let dir = dir.clone();
                        WorkerSpec {
                            label: label.into(),
                            factory: Box::new(move || {
                                Ok(backend(Pipeline::load(&dir, &Device::Cpu, DType::F32)?))
                            }),
                        }
                    })
                    .collect();
                let stop = futures_util::stream::poll_fn(move |cx| stop_rx.poll_recv(cx));
                turbine::server::serve(config, listener.into(), None, specs, Some(tokens), stop)
                    .await
            })
        });
        let server = TestServer {
            base: format!("{origin}:{}", addr.port()),
            client,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        server.wait_healthy();
        server
    }

    fn wait_healthy(&self) {
        loop {
            if let Ok(r) = self.client.get(format!("{}/health", self.base)).send() {
                if r.status() == 200 {
                    return;
                }
            }
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                panic!("server exited during start-up (see stderr)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn generate(&self, body: &Value) -> Response {
        self.client
            .post(self.url("/v1/images/generations"))
            .json(body)
            .send()
            .unwrap()
    }

    fn generate_ok(&self, body: &Value) -> Value {
        let r = self.generate(body);
        let status = r.status();
        let text = r.text().unwrap();
        assert_eq!(status, 200, "{body}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// `POST path` with the JSON `body`.
    fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client.post(self.url(path)).json(body).send().unwrap()
    }

    /// `GET /v1/models`.
    fn models(&self) -> Value {
        self.client
            .get(self.url("/v1/models"))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// The value of a metric line (exact name and labels), 0 if absent.
    fn metric(&self, series: &str) -> f64 {
        metric_in(&self.metrics(), series)
    }

    /// Polls `/metrics` until `pred` holds for the series (a hang guard, not a timing check).
    fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.metric(series);
            if pred(v) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "gave up waiting on {series} (last {v})"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A response header that holds a whole number.
fn header_number(r: &Response, name: &str) -> u64 {
    let v = &r.headers()[name];
    v.to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}: {v:?} is not a number"))
}

fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn decode_b64(item: &Value) -> RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(item["b64_json"].as_str().expect("b64_json"))
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

fn images(resp: &Value) -> Vec<RgbImage> {
    resp["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(decode_b64)
        .collect()
}

fn assert_openai_error(
    status: u16,
    body: &str,
    want_status: u16,
    want_param: Option<&str>,
    what: &str,
) -> Value {
    assert_eq!(status, want_status, "{what}: {body}");
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    let err = &v["error"];
    let obj = err
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {body}"));
    for k in ["message", "type", "param", "code"] {
        assert!(obj.contains_key(k), "{what}: error lacks {k}: {body}");
    }
    assert!(!err["message"].as_str().unwrap().is_empty(), "{what}");
    assert_eq!(err["param"].as_str(), want_param, "{what}: {body}");
    v
}

#[test]
fn b64_json_response_has_the_openai_shape() {
    let s = TestServer::start(test_config());
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .header("x-request-id", "req-abc-123")
        .json(&json!({"prompt": "a red fox", "size": "64x64", "seed": 7, "model": "gpt-image-1"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-abc-123");
    // OpenAI's timing header: whole milliseconds, at least the generation's (a CPU image is
    // not instant).
    let ms = header_number(&r, "openai-processing-ms");
    assert!(ms > 0, "{ms}");
    assert!(
        r.headers().get("x-ratelimit-limit-requests").is_none(),
        "no limits configured"
    );
    let v: Value = r.json().unwrap();
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["size"], "64x64");
    assert_eq!(v["output_format"], "png");
    assert_eq!(v["quality"], "low");
    assert_eq!(v["background"], "opaque");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    let item = data[0].as_object().unwrap();
    assert!(item["revised_prompt"].is_null());
    assert_eq!(item["seed"], 7);
    assert!(!item.contains_key("url"));
    let img = decode_b64(&data[0]);
    assert_eq!(img.dimensions(), (64, 64));
    // "a red fox": BOS + 3 tokens + EOS; one output token per 8x8 patch.
    let usage = &v["usage"];
    assert_eq!(usage["input_tokens"], 5);
    assert_eq!(usage["input_tokens_details"]["text_tokens"], 5);
    assert_eq!(usage["output_tokens"], 64);
    assert_eq!(usage["total_tokens"], 69);

    // A server-made request id is 128 random bits in hex.
    let r = s.generate(&json!({"prompt": "a red fox", "seed": 7}));
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // Same prompt and seed, size "auto" (the configured default, 64x64): the same image.
    let again: Value = r.json().unwrap();
    assert_eq!(images(&again)[0], img);
}

/// Behind a proxy that terminates HTTPS (a peer of `--forwarded-allow-ips`, by default one on
/// the same host), image URLs are the ones the client can fetch: the proxy's scheme, host and
/// path prefix, and after the prefix the server's own path. A peer not in the list cannot
/// change them.
#[test]
fn image_urls_follow_a_trusted_proxys_forwarding_headers() {
    let url_of = |s: &TestServer, headers: &[(&str, &str)]| -> String {
        let mut r = s
            .client
            .post(s.url("/v1/images/generations"))
            .json(&json!({"prompt": "proxied", "response_format": "url"}));
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        let v: Value = r.send().unwrap().json().unwrap();
        v["data"][0]["url"].as_str().unwrap().to_string()
    };
    let s = TestServer::start(test_config());
    let url = url_of(
        &s,
        &[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "img.example.com"),
            ("x-forwarded-prefix", "/turbine"),
        ],
    );
    let path = url
        .strip_prefix("https://img.example.com/turbine")
        .unwrap_or_else(|| panic!("{url}"));
    // What the proxy passes on once it has taken its prefix off is the image's own URL here.
    let r = s.client.get(s.url(path)).send().unwrap();
    assert_eq!(r.status(), 200, "{path}");
    assert_eq!(r.headers()["content-type"], "image/png");
    let url = url_of(
        &s,
        &[(
            "forwarded",
            "for=198.51.100.7;proto=https;host=img.example.com",
        )],
    );
    assert!(
        url.starts_with("https://img.example.com/v1/images/files/img_"),
        "{url}"
    );
    let own = format!("{}/v1/images/files/img_", s.base);
    assert!(url_of(&s, &[]).starts_with(&own));
    drop(s);

    let mut config = test_config();
    config.forwarded_allow = turbine::server::config::ForwardedAllow::parse("10.0.0.0/8").unwrap();
    let s = TestServer::start(config);
    let own = format!("{}/v1/images/files/img_", s.base);
    let url = url_of(
        &s,
        &[
            ("forwarded", "proto=https;host=img.example.com"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "img.example.com"),
            ("x-forwarded-prefix", "/turbine"),
        ],
    );
    assert!(url.starts_with(&own), "{url}");
}

/// A compressed request body (`Content-Encoding: gzip`, as some HTTP clients and gateways
/// send) is refused as such: 415 `unsupported_content_encoding` with `Accept-Encoding:
/// identity` (RFC 7694), on any route, and the connection serves the next request. Before,
/// the gzip bytes were parsed as JSON: a 400 saying the JSON could not be parsed.
#[test]
fn compressed_request_bodies_are_refused_as_such() {
    let s = TestServer::start(test_config());
    let body = json!({"prompt": "compressed"}).to_string();
    let gzipped = {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body.as_bytes()).unwrap();
        gz.finish().unwrap()
    };
    for path in ["/v1/images/generations", "/v1/images/edits", "/v1/files"] {
        let r = s
            .client
            .post(s.url(path))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(gzipped.clone())
            .send()
            .unwrap();
        assert_eq!(r.headers()["accept-encoding"], "identity");
        let status = r.status().as_u16();
        let v = assert_openai_error(status, &r.text().unwrap(), 415, None, path);
        assert_eq!(v["error"]["code"], "unsupported_content_encoding", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("gzip"),
            "{v}"
        );
    }
    // `identity` is no encoding, and the pooled connection still serves.
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .header("content-type", "application/json")
        .header("content-encoding", "identity")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Servers behind one load balancer that share `--image-store-dir` answer each other's URLs,
/// and a restarted server its predecessor's. Before, a URL fetched through the balancer from
/// another server than the one that made it was a 404, and a restart lost every URL; a lone
/// server's 404 now says what to do.
#[test]
fn servers_sharing_an_image_store_dir_answer_each_others_urls() {
    let tmp = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = test_config();
        c.store.dir = Some(tmp.path().to_path_buf());
        c
    };
    let a = TestServer::start(config());
    let b = TestServer::start(config());
    let mut made = Vec::new();
    for (format, mime) in [("png", "image/png"), ("webp", "image/webp")] {
        let v = a.generate_ok(
            &json!({"prompt": "shared", "response_format": "url", "n": 2, "output_format": format}),
        );
        for item in v["data"].as_array().unwrap() {
            let url = item["url"].as_str().unwrap();
            let path = url.strip_prefix(&a.base).unwrap().to_string();
            let direct = a.client.get(url).send().unwrap().bytes().unwrap();
            let r = b.client.get(b.url(&path)).send().unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert_eq!(r.headers()["content-type"], mime);
            let age = r.headers()["cache-control"].to_str().unwrap().to_string();
            let secs: u64 = age
                .split("max-age=")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!((3500..=3600).contains(&secs), "{age}");
            assert_eq!(r.bytes().unwrap(), direct);
            made.push((path, direct));
        }
    }
    assert_eq!(
        a.metric("turbine_image_dir_writes_total{outcome=\"written\"}"),
        4.0
    );
    assert_eq!(
        a.metric("turbine_image_dir_writes_total{outcome=\"failed\"}"),
        0.0
    );
    // a had them in memory; b read every one from the directory.
    assert_eq!(a.metric("turbine_image_dir_reads_total"), 0.0);
    assert_eq!(b.metric("turbine_image_dir_reads_total"), 4.0);
    drop(a);
    // A restart: the new process has none of them in memory.
    let c = TestServer::start(config());
    for (path, bytes) in &made {
        let r = c.client.get(c.url(path)).send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(&r.bytes().unwrap(), bytes);
    }
    // Without the directory, the other server cannot have it, and its 404 says so.
    let lone = TestServer::start(test_config());
    let r = lone.client.get(lone.url(&made[0].0)).send().unwrap();
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 404, None, "elsewhere");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--image-store-dir"),
        "{v}"
    );
    // Ids that are not images' name no file.
    let r = c
        .client
        .get(c.url("/v1/images/files/..%2F..%2Fetc%2Fpasswd"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// Clients written for DALL·E (OpenAI's quickstart, LangChain's `DallEAPIWrapper`) send no
/// `response_format` and read `data[0].url`, OpenAI's default for those models; they got
/// `url: null` and failed. They now get URLs, at DALL·E 3's wide size too, while the GPT image
/// models' clients keep base64.
#[test]
fn dall_e_clients_get_urls_at_their_sizes() {
    let mut config = test_config();
    let defaults = ServerConfig::default().limits;
    (config.limits.max_side, config.limits.max_pixels) = (defaults.max_side, defaults.max_pixels);
    let s = TestServer::start(config);
    let fetch = |item: &Value| {
        let url = item["url"]
            .as_str()
            .unwrap_or_else(|| panic!("no url: {item}"));
        assert!(item.get("b64_json").is_none(), "{item}");
        let r = s.client.get(url).send().unwrap();
        assert_eq!(r.status(), 200, "{url}");
        image::load_from_memory(&r.bytes().unwrap()).unwrap()
    };
    let v = s.generate_ok(
        &json!({"prompt": "a white siamese cat", "model": "dall-e-3", "size": "1792x1024"}),
    );
    assert_eq!(v["size"], "1792x1024");
    assert_eq!(fetch(&v["data"][0]).dimensions(), (1792, 1024));
    let v = s.generate_ok(&json!({"prompt": "a white siamese cat", "model": "dall-e-2", "n": 2}));
    for item in v["data"].as_array().unwrap() {
        assert_eq!(fetch(item).dimensions(), (64, 64));
    }
    // DALL·E 2's edits too.
    let png = png_bytes(&edit_input());
    let fields = [
        ("prompt", "in winter"),
        ("model", "dall-e-2"),
        ("size", "64x64"),
    ];
    let v = s.edit_ok(&fields, &[("image", &png)]);
    assert_eq!(fetch(&v["data"][0]).dimensions(), (64, 64));
    // Asked for base64, or a GPT image model: base64.
    for body in [
        json!({"prompt": "p", "model": "dall-e-3", "response_format": "b64_json"}),
        json!({"prompt": "p", "model": "gpt-image-1"}),
        json!({"prompt": "p"}),
    ] {
        let v = s.generate_ok(&body);
        assert!(v["data"][0].get("url").is_none(), "{body}");
        decode_b64(&v["data"][0]);
    }
    // Past the pixel bound: the sides alone would pass.
    let r = s.generate(&json!({"prompt": "p", "model": "dall-e-3", "size": "1792x1792"}));
    let status = r.status().as_u16();
    let e = assert_openai_error(status, &r.text().unwrap(), 400, Some("size"), "1792x1792");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 2359296 pixels"), "{e}");
}

/// Azure OpenAI's paths and key header, as its SDK clients (`AzureOpenAI`) send them: the
/// deployment in the path names the model, the key comes as `api-key`, and its v1 API is this
/// API under `/openai`. They were all 404 `no route`.
#[test]
fn azure_openai_clients_reach_the_images_api() {
    let mut config = test_config();
    config.auth.keys = vec![ApiKey::plain("sk-az")];
    config.model.aliases.push("dalle3".into());
    let s = TestServer::start(config);
    let post = |path: &str, key: Option<&str>, body: &Value| {
        let mut r = s
            .client
            .post(s.url(&format!("{path}?api-version=2024-10-21")))
            .json(body);
        if let Some(key) = key {
            r = r.header("api-key", key);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    let generations =
        |deployment: &str| format!("/openai/deployments/{deployment}/images/generations");
    // The deployment is the model: its name, not the body's, decides, and a DALL·E deployment
    // answers with a URL as Azure's does.
    let body = json!({"prompt": "a white siamese cat", "model": "gpt-image-1", "seed": 3});
    let (status, v) = post(&generations("dalle3"), Some("sk-az"), &body);
    assert_eq!(status, 200, "{v}");
    let url = v["data"][0]["url"].as_str().unwrap();
    assert_eq!(s.client.get(url).send().unwrap().status(), 200);
    let (status, v) = post(&generations("gpt-image-1"), Some("sk-az"), &body);
    assert_eq!(status, 200, "{v}");
    let azure = decode_b64(&v["data"][0]);
    // The same image as the OpenAI path makes.
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .bearer_auth("sk-az")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(decode_b64(&r.json::<Value>().unwrap()["data"][0]), azure);
    // A deployment that is not the served model or an alias.
    let (status, v) = post(&generations("my-sdxl"), Some("sk-az"), &body);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{v}"
    );
    // The body's `model` is still checked as on the other routes (found by schemathesis:
    // `{}` was taken, overwritten by the deployment).
    let (status, v) = post(
        &generations("dalle3"),
        Some("sk-az"),
        &json!({"prompt": "a cat", "model": {}}),
    );
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("model")),
        "{v}"
    );
    // The key is checked as ever.
    let (status, v) = post(&generations("dalle3"), Some("sk-wrong"), &body);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{v}"
    );
    let (status, _) = post(&generations("dalle3"), None, &body);
    assert_eq!(status, 401);
    // Edits, as the SDK's multipart form.
    let png = png_bytes(&edit_input());
    let (ct, form) = multipart(
        &[("prompt", "in winter"), ("size", "64x64")],
        &[("image", &png)],
    );
    let r = s
        .client
        .post(s.url("/openai/deployments/gpt-image-1/images/edits?api-version=2025-04-01-preview"))
        .header("api-key", "sk-az")
        .header("content-type", ct)
        .body(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    decode_b64(&r.json::<Value>().unwrap()["data"][0]);
    // Azure's v1 API: the OpenAI paths under /openai.
    let (status, v) = post("/openai/v1/images/generations", Some("sk-az"), &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(decode_b64(&v["data"][0]), azure);
    let r = s
        .client
        .get(s.url("/openai/v1/models"))
        .header("api-key", "sk-az")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["data"][0]["id"], "sdxl-turbo");
}

/// SageMaker's model-container routes, as TGI and vLLM serve them: `GET /ping` is the health
/// check, `POST /invocations` takes what `InvokeEndpoint` (and its async variant) sends, a JSON
/// generation (often labelled `application/octet-stream`) or an edit, JSON or multipart. Both
/// were 404 `no route`.
#[test]
fn sagemaker_clients_reach_the_images_api() {
    let s = TestServer::start(test_config());
    let r = s.client.get(s.url("/ping")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["status"], "ok");
    let invoke = |content_type: &str, body: Vec<u8>| {
        let r = s
            .client
            .post(s.url("/invocations"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    // A generation: the same image as the OpenAI route's.
    let body = json!({"prompt": "a lighthouse", "seed": 4});
    let own = decode_b64(&s.generate_ok(&body)["data"][0]);
    for content_type in ["application/json", "application/octet-stream"] {
        let (status, v) = invoke(content_type, body.to_string().into_bytes());
        assert_eq!(status, 200, "{content_type}: {v}");
        assert_eq!(decode_b64(&v["data"][0]), own, "{content_type}");
    }
    // An edit, as JSON with its image inline, and as a form: the same image either way.
    let png = png_bytes(&edit_input());
    let edit = json!({"prompt": "in winter", "size": "64x64", "seed": 2,
                      "images": [{"image_url": data_url(&png)}]});
    let (status, v) = invoke("application/json", edit.to_string().into_bytes());
    assert_eq!(status, 200, "{v}");
    let json_edit = decode_b64(&v["data"][0]);
    let (ct, form) = multipart(
        &[("prompt", "in winter"), ("size", "64x64"), ("seed", "2")],
        &[("image", &png)],
    );
    let (status, v) = invoke(&ct, form);
    assert_eq!(status, 200, "{v}");
    assert_eq!(decode_b64(&v["data"][0]), json_edit);
    assert_ne!(json_edit, own);
    // A generation is held to its own bound, an edit's JSON to the uploads'.
    let big = json!({"prompt": "p", "negative_prompt": "x".repeat(2 << 20)});
    let (status, v) = invoke("application/json", big.to_string().into_bytes());
    assert_eq!(status, 413, "{v}");
    let (status, v) = invoke("application/json", b"{not json".to_vec());
    assert_eq!(status, 400, "{v}");
}

/// The XMP packet in an image file, as the `image` crate's decoder for `format` reads it.
fn xmp_of(bytes: &[u8], format: image::ImageFormat) -> String {
    use image::ImageDecoder;
    let cursor = std::io::Cursor::new(bytes);
    let xmp = match format {
        image::ImageFormat::Png => image::codecs::png::PngDecoder::new(cursor)
            .unwrap()
            .xmp_metadata(),
        image::ImageFormat::Jpeg => image::codecs::jpeg::JpegDecoder::new(cursor)
            .unwrap()
            .xmp_metadata(),
        image::ImageFormat::WebP => image::codecs::webp::WebPDecoder::new(cursor)
            .unwrap()
            .xmp_metadata(),
        other => panic!("{other:?}"),
    };
    String::from_utf8(xmp.unwrap().expect("an XMP packet")).unwrap()
}

#[test]
fn url_responses_serve_the_image_with_its_content_type() {
    let s = TestServer::start(test_config());
    for (format, mime, fmt) in [
        ("png", "image/png", image::ImageFormat::Png),
        ("jpeg", "image/jpeg", image::ImageFormat::Jpeg),
        ("webp", "image/webp", image::ImageFormat::WebP),
    ] {
        let v = s.generate_ok(&json!({"prompt": "a lighthouse", "response_format": "url", "output_format": format, "output_compression": 80, "n": 2}));
        assert_eq!(v["output_format"], format);
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        let mut urls = Vec::new();
        for item in data {
            assert!(item.get("b64_json").is_none());
            let url = item["url"].as_str().unwrap();
            assert!(
                url.starts_with(&format!("{}/v1/images/files/img_", s.base)),
                "{url}"
            );
            urls.push(url.to_string());
            // No API key needed, like OpenAI's signed URLs.
            let r = s.client.get(url).send().unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-type"], mime);
            let bytes = r.bytes().unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), fmt);
            assert_eq!(
                image::load_from_memory(&bytes).unwrap().dimensions(),
                (64, 64)
            );
            if format == "webp" {
                // output_compression 80: lossy WebP (a `VP8 ` chunk; lossless is `VP8L`),
                // after the `VP8X` chunk the XMP needs.
                assert_eq!(&bytes[12..16], b"VP8X");
                assert_eq!(&bytes[30..34], b"VP8 ");
            }
            // Each file says a model made it, and which (`--image-metadata provenance`, the
            // default), as the image crate's decoder for its format reads it.
            let xmp = xmp_of(&bytes, fmt);
            for part in [
                "digitalsourcetype/trainedAlgorithmicMedia</Iptc4xmpExt:DigitalSourceType>",
                "<Iptc4xmpExt:AISystemUsed>sdxl-turbo</Iptc4xmpExt:AISystemUsed>",
            ] {
                assert!(xmp.contains(part), "{format}: {xmp}");
            }
            assert!(!xmp.contains("a lighthouse"), "no prompt by default: {xmp}");
        }
        assert_ne!(urls[0], urls[1]);
    }
    let r = s
        .client
        .get(s.url("/v1/images/files/img_00000000000000000000000000000000"))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_openai_error(status, &r.text().unwrap(), 404, None, "unknown file id");
}

/// `--image-store-max-bytes` full: the images already fetched make room first, so a client that
/// fetches its URLs late keeps them while others fetch theirs at once. Those that must go
/// unfetched answer 404 saying why, and are counted; `Cache-Control` says how long an image
/// stays.
#[test]
fn a_full_url_store_evicts_fetched_images_before_unfetched_ones() {
    // The PNG of one default image (every seed's is about the same size).
    let probe = TestServer::start(test_config());
    let v = probe.generate_ok(&json!({"prompt": "a lighthouse", "n": 4, "seed": 1}));
    let size = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().unwrap())
                .unwrap()
                .len()
        })
        .max()
        .unwrap();
    drop(probe);
    // Room for about ten.
    let mut config = test_config();
    config.store.max_bytes = size * 21 / 2;
    let s = TestServer::start(config);
    let urls = |seed: u64, n: u64| -> Vec<String> {
        let v = s.generate_ok(
            &json!({"prompt": "a lighthouse", "response_format": "url", "n": n, "seed": seed}),
        );
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["url"].as_str().unwrap().to_string())
            .collect()
    };
    let fetch = |url: &str| s.client.get(url).send().unwrap();
    let slow = urls(1000, 3);
    // Thirty fetched at once by another client: two stores' worth.
    for seed in 0..30 {
        for url in urls(seed, 1) {
            let r = fetch(&url);
            assert_eq!(r.status(), 200);
            let cache = r.headers()["cache-control"].to_str().unwrap().to_string();
            assert!(
                [
                    "private, max-age=3600, immutable",
                    "private, max-age=3599, immutable"
                ]
                .contains(&cache.as_str()),
                "{cache}"
            );
        }
    }
    // The slow client's images were not the ones to go.
    for url in &slow {
        assert_eq!(fetch(url).status(), 200, "a late fetch");
    }
    let m = s.metrics();
    assert_eq!(
        metric_in(
            &m,
            "turbine_image_store_evictions_total{reason=\"unfetched\"}"
        ),
        0.0,
        "{m}"
    );
    assert!(
        metric_in(
            &m,
            "turbine_image_store_evictions_total{reason=\"fetched\"}"
        ) >= 20.0
    );
    // Thirty that nobody fetches: the oldest of them have to go.
    let gathered: Vec<String> = (100..130).flat_map(|seed| urls(seed, 1)).collect();
    let r = fetch(&gathered[0]);
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    assert_openai_error(status, &text, 404, None, "an image evicted unfetched");
    assert!(
        text.contains("evicted before anyone fetched it")
            && text.contains("--image-store-max-bytes"),
        "{text}"
    );
    assert_eq!(fetch(gathered.last().unwrap()).status(), 200);
    let m = s.metrics();
    let lost = metric_in(
        &m,
        "turbine_image_store_evictions_total{reason=\"unfetched\"}",
    );
    assert!((18.0..=22.0).contains(&lost), "{lost} {m}");
    let (bytes, max) = (
        metric_in(&m, "turbine_image_store_bytes"),
        metric_in(&m, "turbine_image_store_max_bytes"),
    );
    assert!(
        bytes <= max && max == (size * 21 / 2) as f64,
        "{bytes} {max}"
    );
    assert!((9.0..=11.0).contains(&metric_in(&m, "turbine_image_store_images")));
    // An id never given out says so.
    let r = fetch(&s.url("/v1/images/files/img_00000000000000000000000000000000"));
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    assert_openai_error(status, &text, 404, None, "unknown image id");
    assert!(text.contains("expire after 3600 s"), "{text}");
}

#[test]
fn seeded_images_are_reproducible_and_distinct() {
    let s = TestServer::start(test_config());
    let three = s.generate_ok(&json!({"prompt": "a castle at dusk", "n": 3, "seed": 100}));
    let seeds: Vec<u64> = three["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, [100, 101, 102]);
    let imgs = images(&three);
    assert_ne!(imgs[0], imgs[1]);
    assert_ne!(imgs[1], imgs[2]);
    assert_ne!(imgs[0], imgs[2]);
    assert_eq!(
        images(&s.generate_ok(&json!({"prompt": "a castle at dusk", "n": 3, "seed": 100}))),
        imgs
    );
    // Image i of a request with seed s is the image of seed s + i alone.
    let second = s.generate_ok(&json!({"prompt": "a castle at dusk", "seed": 101}));
    assert_eq!(images(&second)[0], imgs[1]);

    // The extensions reach the model: guidance with a negative prompt, and more steps, each
    // change the image (and guided requests batch under their own key).
    let guided = s.generate_ok(&json!({"prompt": "a castle at dusk", "seed": 100, "guidance_scale": 3.0, "negative_prompt": "fog"}));
    let stepped = s.generate_ok(&json!({"prompt": "a castle at dusk", "seed": 100, "steps": 3}));
    assert_ne!(images(&guided)[0], imgs[0]);
    assert_ne!(images(&stepped)[0], imgs[0]);

    // Without a seed the server draws one, reports it, and it reproduces the image.
    let drawn = s.generate_ok(&json!({"prompt": "a castle at dusk", "n": 2}));
    let d = drawn["data"].as_array().unwrap();
    let s0 = d[0]["seed"].as_u64().unwrap();
    assert_eq!(d[1]["seed"].as_u64().unwrap(), s0 + 1);
    let again = s.generate_ok(&json!({"prompt": "a castle at dusk", "seed": s0 + 1}));
    assert_eq!(images(&again)[0], images(&drawn)[1]);
}

/// `--default-steps` and `--default-guidance-scale`: a client that sends only the OpenAI fields
/// (as the SDKs do) gets the steps and guidance the server was started with, the image a
/// default server makes when asked for them explicitly; fields a request does send still win.
#[test]
fn the_servers_default_steps_and_guidance_apply_to_plain_requests() {
    let plain = TestServer::start(test_config());
    let mut config = test_config();
    config.limits.default_steps = 2;
    config.limits.default_guidance_scale = 3.0;
    let tuned = TestServer::start(config);
    let body = json!({"prompt": "a castle at dusk", "seed": 9});
    let got = tuned.generate_ok(&body);
    assert_eq!(got["quality"], "medium", "{got}");
    let explicit = plain.generate_ok(
        &json!({"prompt": "a castle at dusk", "seed": 9, "steps": 2, "guidance_scale": 3.0}),
    );
    assert_eq!(images(&got), images(&explicit));
    assert_ne!(images(&got), images(&plain.generate_ok(&body)));
    // A request's own quality and guidance override the server's.
    let own = tuned.generate_ok(
        &json!({"prompt": "a castle at dusk", "seed": 9, "quality": "low", "guidance_scale": 0}),
    );
    assert_eq!(own["quality"], "low");
    assert_eq!(images(&own), images(&plain.generate_ok(&body)));
}

/// `--allow-runtime-lora-updating`: vLLM's `POST /v1/load_lora_adapter` serves a LoRA under a
/// new name (the library's image with the LoRA fused), `/v1/unload_lora_adapter` stops serving
/// it while a request that named it before still gets its image, and frees its slot once that
/// request is done; bad loads are refused with what is wrong and change nothing.
#[test]
fn loras_are_loaded_and_unloaded_while_serving() {
    use turbine::model::lora::LoraSpec;
    use turbine::model::pipeline::LoadSpec;
    let fixture = |name: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/reference/lora_{name}.safetensors"))
    };
    let mut config = test_config();
    config.runtime_lora_updating = true;
    config.max_lora_modules = 2;
    // Long enough that a lone request is still queued when the unload below arrives.
    config.batching.max_batch_delay = Duration::from_millis(1500);
    let spec = LoadSpec {
        dir: model_dir(),
        runtime_adapters: true,
        ..Default::default()
    };
    let backend: MakeBackend =
        Box::new(move |_| Box::new(Pipeline::load_spec(&spec, &Device::Cpu, DType::F32).unwrap()));
    let s = Arc::new(TestServer::start_devices(config, vec![("cpu", backend)]));
    let post = |path: &str, body: Value| {
        let r = s.post_json(path, &body);
        let status = r.status().as_u16();
        (status, r.text().unwrap())
    };
    let error = |(status, text): (u16, String)| -> (u16, Value) {
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
        (status, v["error"].clone())
    };
    let listed = || -> Vec<String> {
        let models = s.models();
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["parent"] == "sdxl-turbo")
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let load = |name: &str, lora: &str| {
        post(
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": fixture(lora), "scale": 0.8}),
        )
    };

    let (status, text) = load("ink", "kohya");
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, "Success: LoRA adapter 'ink' added successfully.");
    assert_eq!(listed(), ["ink"]);

    // The library's image with the LoRA fused at load.
    let fused = {
        let spec = LoadSpec {
            dir: model_dir(),
            loras: vec![LoraSpec {
                path: fixture("kohya"),
                scale: 0.8,
            }],
            ..Default::default()
        };
        let p = Pipeline::load_spec(&spec, &Device::Cpu, DType::F32).unwrap();
        let item = ImageRequest {
            prompt: "a harbour".into(),
            negative_prompt: String::new(),
            seed: 7,
            init_image: None,
            partials: None,
        };
        p.generate(&tiny_settings(false), &[item], None)
            .unwrap()
            .images
            .remove(0)
    };
    let body = |model: &str| json!({"prompt": "a harbour", "seed": 7, "model": model, "response_format": "b64_json"});
    assert!(images(&s.generate_ok(&body("ink"))).remove(0) == fused);
    assert!(images(&s.generate_ok(&body("sdxl-turbo"))).remove(0) != fused);
    assert_eq!(s.metric("turbine_adapter_images_total{model=\"ink\"}"), 1.0);

    // Refused, changing nothing: the name taken, the model's own name, a file that is not
    // there, a LoRA for another model, fields missing or unknown.
    let (status, e) = error(load("ink", "diffusers"));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("lora_adapter_exists")),
        "{e}"
    );
    let (status, e) = error(load("dall-e-3", "diffusers"));
    assert_eq!(
        (status, e["param"].as_str()),
        (400, Some("lora_name")),
        "{e}"
    );
    let (status, e) = error(post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "gone", "lora_path": fixture("absent")}),
    ));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_lora_adapter")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("LoRA file not found"),
        "{e}"
    );
    let (status, e) = error(post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "model", "lora_path": model_dir().join("unet/diffusion_pytorch_model.safetensors")}),
    ));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("invalid_lora_adapter")),
        "{e}"
    );
    let (status, e) = error(post("/v1/load_lora_adapter", json!({"lora_name": "x"})));
    assert_eq!(
        (status, e["param"].as_str()),
        (400, Some("lora_path")),
        "{e}"
    );
    let (status, e) = error(post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "x", "lora_path": fixture("kohya"), "alpha": 1}),
    ));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("unknown_parameter")),
        "{e}"
    );
    assert_eq!(listed(), ["ink"]);
    assert_eq!(
        s.metric("turbine_adapter_updates_total{action=\"load\",outcome=\"failed\"}"),
        2.0
    );

    // Two held: a third waits for a slot.
    let (status, text) = load("wash", "diffusers");
    assert_eq!(status, 200, "{text}");
    let (status, e) = error(load("third", "kohya"));
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("too_many_lora_adapters")),
        "{e}"
    );

    // An unload while a request for the adapter waits in the queue: the request gets its
    // image, later ones get 404, and the slot is freed once the request is done.
    let waiting = {
        let s = s.clone();
        let body = body("ink");
        std::thread::spawn(move || images(&s.generate_ok(&body)).remove(0))
    };
    s.wait_metric("turbine_queue_images", |n| n >= 1.0);
    let (status, text) = post("/v1/unload_lora_adapter", json!({"lora_name": "ink"}));
    assert_eq!(
        (status, text.as_str()),
        (200, "Success: LoRA adapter 'ink' removed successfully.")
    );
    assert_eq!(listed(), ["wash"]);
    let r = s.generate(&body("ink"));
    assert_eq!(r.status(), 404);
    assert!(
        waiting.join().unwrap() == fused,
        "the queued ink image is not the fused model's"
    );
    let (status, e) = error(post("/v1/unload_lora_adapter", json!({"lora_name": "ink"})));
    assert_eq!(status, 404, "{e}");
    let start = Instant::now();
    let reloaded = loop {
        let (status, text) = load("ink", "kohya");
        if status == 200 || start.elapsed() > Duration::from_secs(60) {
            break (status, text);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(reloaded.0, 200, "{}", reloaded.1);
    assert!(images(&s.generate_ok(&body("ink"))).remove(0) == fused);
    assert_eq!(s.metric("turbine_adapter_images_total{model=\"ink\"}"), 3.0);
    assert_eq!(
        s.metric("turbine_adapter_updates_total{action=\"unload\",outcome=\"ok\"}"),
        1.0
    );
}

/// A backend whose device runs out of memory building any adapter, as CUDA reports it inside a
/// weights error.
struct AdapterOutOfMemory(Pipeline);

impl ImageBackend for AdapterOutOfMemory {
    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        self.0.generate(settings, items, None)
    }

    fn load_adapter(
        &mut self,
        _slot: usize,
        spec: &turbine::model::lora::AdapterSpec,
    ) -> anyhow::Result<()> {
        Err(turbine::model::loader::LoadError::Weights {
            path: spec.loras[0].path.clone(),
            message: "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        }
        .into())
    }
}

/// An adapter the device cannot build (out of memory; or a backend that builds none) is the
/// server's 500 `lora_adapter_not_built`, not the file's 400, and leaves nothing behind: the
/// name is free again, not listed, and the model still serves.
#[test]
fn an_adapter_the_device_cannot_build_is_a_500_that_leaves_nothing_behind() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/lora_kohya.safetensors");
    let body = json!({"lora_name": "ink", "lora_path": fixture});
    let config = || {
        let mut c = test_config();
        c.runtime_lora_updating = true;
        c.max_lora_modules = 1;
        c
    };
    let out_of_memory = TestServer::start_with(config(), |p| Box::new(AdapterOutOfMemory(p)));
    // Loaded without what runtime builds need.
    let cannot = TestServer::start(config());
    for (s, says) in [
        (&out_of_memory, "CUDA_ERROR_OUT_OF_MEMORY"),
        (&cannot, "cannot build adapters"),
    ] {
        // Twice: the first attempt left neither the name taken nor the one slot held.
        for _ in 0..2 {
            let r = s.post_json("/v1/load_lora_adapter", &body);
            assert_eq!(r.status(), 500);
            let e: Value = r.json().unwrap();
            assert_eq!(e["error"]["code"], "lora_adapter_not_built", "{e}");
            assert_eq!(e["error"]["type"], "server_error", "{e}");
            assert!(
                e["error"]["message"].as_str().unwrap().contains(says),
                "{e}"
            );
        }
        let models = s.models();
        assert!(!models.to_string().contains("\"ink\""), "{models}");
        assert_eq!(
            s.generate(&json!({"prompt": "x", "model": "ink"})).status(),
            404
        );
        s.generate_ok(&json!({"prompt": "still serving"}));
        assert_eq!(
            s.metric("turbine_adapter_updates_total{action=\"load\",outcome=\"failed\"}"),
            2.0
        );
    }
}

/// Without `--allow-runtime-lora-updating` the endpoints answer 404 saying how to turn them on.
#[test]
fn runtime_lora_updating_is_off_by_default() {
    let s = TestServer::start(test_config());
    for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
        let r = s.post_json(
            path,
            &json!({"lora_name": "ink", "lora_path": "/tmp/ink.safetensors"}),
        );
        assert_eq!(r.status(), 404);
        let e: Value = r.json().unwrap();
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--allow-runtime-lora-updating"),
            "{e}"
        );
    }
}

/// `--lora-modules`: a LoRA served under its own name. `GET /v1/models` lists it with the model
/// it adapts; a request naming it gets the image of the model with the LoRA fused, one naming
/// the model (or an alias) the model's own, and requests for both at once are batched apart
/// and still get exactly those.
#[test]
fn a_lora_module_is_served_under_its_own_name() {
    use turbine::model::lora::{AdapterSpec, LoraSpec};
    use turbine::model::pipeline::LoadSpec;
    let lora = LoraSpec {
        path: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/lora_kohya.safetensors"),
        scale: 0.8,
    };
    let spec = LoadSpec {
        dir: model_dir(),
        adapters: vec![AdapterSpec {
            name: "ink".into(),
            loras: vec![lora.clone()],
        }],
        ..Default::default()
    };
    let mut config = test_config();
    config.model.adapters = Adapters::new(vec!["ink".into()]);
    config.batching.max_batch_size = 8;
    config.batching.max_batch_delay = Duration::from_millis(100);
    let load = spec;
    let backend: MakeBackend =
        Box::new(move |_| Box::new(Pipeline::load_spec(&load, &Device::Cpu, DType::F32).unwrap()));
    let s = Arc::new(TestServer::start_devices(config, vec![("cpu", backend)]));

    let models = s.models();
    let ink = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "ink")
        .unwrap_or_else(|| panic!("{models}"));
    assert_eq!(ink["parent"], "sdxl-turbo");
    assert!(models["data"][0].get("parent").is_none(), "{models}");
    let one = s.client.get(s.url("/v1/models/ink")).send().unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().unwrap()["parent"], "sdxl-turbo");

    // What the library makes: the model, and the model loaded with `--lora`.
    let load = |loras: Vec<LoraSpec>| {
        let spec = LoadSpec {
            dir: model_dir(),
            loras,
            ..Default::default()
        };
        Pipeline::load_spec(&spec, &Device::Cpu, DType::F32).unwrap()
    };
    let with_lora = load(vec![lora]);
    let expected = |p: &Pipeline| -> Vec<RgbImage> {
        let settings = tiny_settings(false);
        (0..4)
            .map(|i| {
                let item = ImageRequest {
                    prompt: format!("a harbour, print {i}"),
                    negative_prompt: String::new(),
                    seed: 50 + i,
                    init_image: None,
                    partials: None,
                };
                p.generate(&settings, &[item], None)
                    .unwrap()
                    .images
                    .remove(0)
            })
            .collect()
    };
    let (own, fused) = (expected(&load(Vec::new())), expected(&with_lora));

    let batches_before = s.metric("turbine_batch_size_count");
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8u64)
        .map(|k| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                let (i, model) = (k % 4, ["ink", "dall-e-3"][(k / 4) as usize]);
                let body = json!({"prompt": format!("a harbour, print {i}"), "seed": 50 + i,
                                  "model": model, "response_format": "b64_json"});
                barrier.wait();
                images(&s.generate_ok(&body)).remove(0)
            })
        })
        .collect();
    let got: Vec<RgbImage> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for i in 0..4 {
        assert!(got[i] == fused[i], "ink image {i} is not the fused model's");
        assert!(
            got[4 + i] == own[i],
            "model image {i} is not the model's own"
        );
        assert!(fused[i] != own[i]);
    }
    // Eight images of two models: at least two batches; the adapter's four counted as its.
    assert!(s.metric("turbine_batch_size_count") - batches_before >= 2.0);
    assert_eq!(s.metric("turbine_adapter_images_total{model=\"ink\"}"), 4.0);

    // Edits and the Batch API's lines choose the adapter by `model` too: the same images as
    // the same requests made directly.
    let png = png_bytes(&edit_input());
    let edit = |model: &str| {
        let fields = [
            ("prompt", "in winter"),
            ("model", model),
            ("seed", "4"),
            ("size", "64x64"),
        ];
        images(&s.edit_ok(&fields, &[("image", &png)])).remove(0)
    };
    // The library's edit with the LoRA fused (1 step at the default strength 0.5).
    let fused_edit = {
        let item = ImageRequest {
            prompt: "in winter".into(),
            negative_prompt: String::new(),
            seed: 4,
            init_image: Some(turbine::model::pipeline::InitImage::new(
                turbine::server::upload::decode(&png, 64, 64).unwrap(),
            )),
            partials: None,
        };
        with_lora
            .generate(&tiny_settings(true), &[item], None)
            .unwrap()
            .images
            .remove(0)
    };
    assert!(
        edit("ink") == fused_edit,
        "the ink edit is not the fused model's"
    );
    assert!(edit("sdxl-turbo") != fused_edit);
    let g = "/v1/images/generations";
    let body = |i: usize, model: &str| json!({"prompt": format!("a harbour, print {i}"), "seed": 50 + i, "model": model});
    let jsonl = [
        batch_line("ink", g, body(0, "ink")),
        batch_line("own", g, body(0, "sdxl-turbo")),
    ]
    .join("\n");
    let batch = s.run_batch(None, g, &jsonl);
    assert_eq!(batch["status"], "completed", "{batch}");
    let output = s.file_lines(None, batch["output_file_id"].as_str().unwrap());
    let output = results_by_id(&output);
    let batched = |id: &str| images(&output[id]["response"]["body"]).remove(0);
    assert!(
        batched("ink") == fused[0],
        "the batch's ink image is not the fused model's"
    );
    assert!(batched("own") == own[0]);

    // A name that is neither: 404 in OpenAI's shape.
    let r = s.generate(&json!({"prompt": "p", "model": "inks"}));
    assert_eq!(r.status(), 404);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
}

#[test]
fn sixteen_concurrent_requests_batch_and_match_images_generated_alone() {
    let mut config = test_config();
    config.batching.max_batch_size = 8;
    config.batching.max_batch_delay = Duration::from_millis(50);
    let s = Arc::new(TestServer::start(config));
    let body =
        |i: usize| json!({"prompt": format!("prompt number {i}: a small boat"), "seed": 1000 + i});

    let barrier = Arc::new(Barrier::new(16));
    let start = Instant::now();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                s.generate_ok(&body(i))
            })
        })
        .collect();
    let batched: Vec<RgbImage> = handles
        .into_iter()
        .map(|h| images(&h.join().unwrap()).remove(0))
        .collect();
    let elapsed = start.elapsed();

    let m = s.metrics();
    let batches = metric_in(&m, "turbine_batch_size_count");
    let single = metric_in(&m, "turbine_batch_size_bucket{le=\"1\"}");
    let mut sizes = String::new();
    for le in ["1", "2", "4", "8"] {
        sizes += &format!(
            " le{le}={}",
            metric_in(&m, &format!("turbine_batch_size_bucket{{le=\"{le}\"}}"))
        );
    }
    println!(
        "16 concurrent clients: {batches} batches (cumulative{sizes}), {:.2} s, {:.2} images/s",
        elapsed.as_secs_f64(),
        16.0 / elapsed.as_secs_f64()
    );
    assert_eq!(metric_in(&m, "turbine_batch_size_sum"), 16.0);
    assert!(
        batches < 16.0 && single < batches,
        "no batch larger than 1:\n{m}"
    );

    let mut differing = Vec::new();
    for (i, img) in batched.iter().enumerate() {
        let alone = images(&s.generate_ok(&body(i))).remove(0);
        let diff = alone
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .filter(|(a, b)| a != b);
        let (count, max) = diff.fold((0, 0), |(n, m), (a, b)| (n + 1, m.max(a.abs_diff(*b))));
        if count > 0 {
            differing.push(format!(
                "image {i}: {count} bytes differ, by up to {max}/255"
            ));
        }
    }
    assert!(
        differing.is_empty(),
        "batched images differ from the same images generated alone:\n{}",
        differing.join("\n")
    );
}

#[test]
fn idle_request_overhead_is_measured() {
    // With the default batch delay (an idle request waits that long for company) and without.
    for delay_ms in [20, 0] {
        let mut config = test_config();
        config.batching.max_batch_delay = Duration::from_millis(delay_ms);
        let s = TestServer::start(config);
        let body = json!({"prompt": "a teapot", "seed": 3});
        s.generate_ok(&body);
        let before = s.metrics();
        let rounds = 10;
        let start = Instant::now();
        for _ in 0..rounds {
            s.generate_ok(&body);
        }
        let wall = start.elapsed().as_secs_f64() / rounds as f64;
        let after = s.metrics();
        let delta =
            |series: &str| (metric_in(&after, series) - metric_in(&before, series)) / rounds as f64;
        let stage = |name: &str| {
            delta(&format!(
                "turbine_stage_duration_seconds_sum{{stage=\"{name}\"}}"
            ))
        };
        let model = stage("text_encode") + stage("unet") + stage("vae_decode");
        println!(
            "idle, 64x64 png, batch delay {delay_ms} ms: wall {:.2} ms/request, model {:.2} ms, added {:.2} ms \
             (queue wait {:.2} ms, encode {:.2} ms, HTTP+JSON+base64 the rest)",
            wall * 1e3,
            model * 1e3,
            (wall - model) * 1e3,
            stage("queue_wait") * 1e3,
            stage("image_encode") * 1e3
        );
        assert_eq!(
            delta("turbine_stage_duration_seconds_count{stage=\"queue_wait\"}"),
            1.0
        );
        assert_eq!(delta("turbine_images_generated_total"), 1.0);
    }
}

#[test]
fn models_health_metrics_and_unknown_routes() {
    let s = TestServer::start(test_config());
    let v = s.models();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // The prefix aliases (gpt-image-*, chatgpt-image-*) match names but are not listed.
    assert_eq!(ids, ["sdxl-turbo", "dall-e-2", "dall-e-3"]);
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model");
        assert!(m["created"].as_u64().is_some());
        assert_eq!(m["owned_by"], "turbine");
    }
    let m: Value = s
        .client
        .get(s.url("/v1/models/dall-e-3"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(m["id"], "dall-e-3");
    // OpenAI's current image models and snapshots, through the default gpt-image-* alias.
    for name in [
        "gpt-image-2.5-flare-2026-09-08",
        "gpt-image-1",
        "chatgpt-image-latest",
    ] {
        let r = s
            .client
            .get(s.url(&format!("/v1/models/{name}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.json::<Value>().unwrap()["id"], name);
    }
    let r = s.client.get(s.url("/v1/models/gpt-5")).send().unwrap();
    let status = r.status().as_u16();
    let v = assert_openai_error(
        status,
        &r.text().unwrap(),
        404,
        Some("model"),
        "unknown model",
    );
    assert_eq!(v["error"]["code"], "model_not_found");

    let r = s.client.get(s.url("/health")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["status"], "ok");
    // `/` answers as `/health`: what load balancers check when not told otherwise (GET / for
    // AWS's, Google Cloud's and Azure's; OPTIONS / for HAProxy's `option httpchk`).
    for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
        let r = s.client.request(method.clone(), s.url("/")).send().unwrap();
        assert_eq!(r.status(), 200, "{method}");
        if method != Method::HEAD {
            assert_eq!(r.json::<Value>().unwrap()["status"], "ok", "{method}");
        }
    }

    let r = s
        .client
        .get(s.url("/nope"))
        .header("x-request-id", "abc")
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc");
    let status = r.status().as_u16();
    assert_openai_error(status, &r.text().unwrap(), 404, None, "unknown route");
    // OpenAI's retired variations endpoint: a 404 that says what to use instead.
    let r = s
        .client
        .post(s.url("/v1/images/variations"))
        .body("x")
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 404, None, "variations");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/images/edits"),
        "{v}"
    );
    let r = s
        .client
        .get(s.url("/v1/images/generations"))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_openai_error(status, &r.text().unwrap(), 405, None, "wrong method");

    let r = s.client.get(s.url("/metrics")).send().unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = r.text().unwrap();
    for line in [
        // One from `wait_healthy`, one above.
        "turbine_http_requests_total{route=\"/health\",status=\"200\"} 2",
        "turbine_http_requests_total{route=\"/v1/models/{id}\",status=\"404\"} 1",
        "turbine_http_requests_total{route=\"unmatched\",status=\"404\"} 2",
        "turbine_errors_total{type=\"model_not_found\"} 1",
        "turbine_errors_total{type=\"method_not_allowed\"} 1",
        "turbine_queue_images 0",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    for name in [
        "queue_wait",
        "text_encode",
        "unet",
        "vae_decode",
        "image_encode",
    ] {
        assert!(
            m.contains(&format!(
                "turbine_stage_duration_seconds_count{{stage=\"{name}\"}}"
            )),
            "{name}"
        );
    }
}

/// A malformed request: how it is sent and what must come back.
struct Bad {
    what: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    param: Option<&'static str>,
}

fn bad(what: &'static str, body: Value, status: u16, param: Option<&'static str>) -> Bad {
    Bad {
        what,
        content_type: Some("application/json"),
        body: serde_json::to_vec(&body).unwrap(),
        status,
        param,
    }
}

fn bad_raw(
    what: &'static str,
    content_type: Option<&'static str>,
    body: &[u8],
    status: u16,
) -> Bad {
    Bad {
        what,
        content_type,
        body: body.to_vec(),
        status,
        param: None,
    }
}

#[test]
fn malformed_requests_get_the_right_status_and_the_server_keeps_serving() {
    let s = TestServer::start(test_config());
    let p = |extra: Value| {
        let mut v = json!({"prompt": "a cat"});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    let huge_prompt = "a".repeat((1 << 20) + 10);
    let cases = vec![
        bad("missing prompt", json!({}), 400, Some("prompt")),
        bad("null prompt", json!({"prompt": null}), 400, Some("prompt")),
        bad("empty prompt", json!({"prompt": ""}), 400, Some("prompt")),
        bad(
            "blank prompt",
            json!({"prompt": "   "}),
            400,
            Some("prompt"),
        ),
        bad("number prompt", json!({"prompt": 42}), 400, Some("prompt")),
        bad(
            "array prompt",
            json!({"prompt": ["a", "b"]}),
            400,
            Some("prompt"),
        ),
        bad(
            "40k-char prompt",
            json!({"prompt": "b".repeat(40_000)}),
            400,
            Some("prompt"),
        ),
        bad("1 MB prompt", json!({"prompt": huge_prompt}), 413, None),
        bad("n = 0", p(json!({"n": 0})), 400, Some("n")),
        bad("n = 11", p(json!({"n": 11})), 400, Some("n")),
        bad("n = -1", p(json!({"n": -1})), 400, Some("n")),
        bad("n string", p(json!({"n": "2"})), 400, Some("n")),
        bad("n float", p(json!({"n": 1.5})), 400, Some("n")),
        bad("size abc", p(json!({"size": "abc"})), 400, Some("size")),
        bad("size 0x0", p(json!({"size": "0x0"})), 400, Some("size")),
        bad(
            "size 513x512",
            p(json!({"size": "513x512"})),
            400,
            Some("size"),
        ),
        bad(
            "size 100000x100000",
            p(json!({"size": "100000x100000"})),
            400,
            Some("size"),
        ),
        bad(
            "size above max",
            p(json!({"size": "1024x1024"})),
            400,
            Some("size"),
        ),
        bad(
            "size below min",
            p(json!({"size": "56x64"})),
            400,
            Some("size"),
        ),
        bad("size number", p(json!({"size": 512})), 400, Some("size")),
        bad(
            "size 3 sides",
            p(json!({"size": "64x64x64"})),
            400,
            Some("size"),
        ),
        bad("negative seed", p(json!({"seed": -5})), 400, Some("seed")),
        bad(
            "huge seed",
            p(json!({"seed": 18446744073709551615u64})),
            400,
            Some("seed"),
        ),
        bad(
            "seed beyond 64 bits",
            p(json!({"seed": 1e25})),
            400,
            Some("seed"),
        ),
        bad("seed string", p(json!({"seed": "42"})), 400, Some("seed")),
        bad(
            "unknown output_format",
            p(json!({"output_format": "bmp"})),
            400,
            Some("output_format"),
        ),
        bad(
            "output_compression 101",
            p(json!({"output_compression": 101})),
            400,
            Some("output_compression"),
        ),
        bad(
            "transparent background",
            p(json!({"background": "transparent"})),
            400,
            Some("background"),
        ),
        bad(
            "unknown response_format",
            p(json!({"response_format": "xml"})),
            400,
            Some("response_format"),
        ),
        bad(
            "unknown quality",
            p(json!({"quality": "ultra"})),
            400,
            Some("quality"),
        ),
        bad(
            "unknown model",
            p(json!({"model": "midjourney"})),
            404,
            Some("model"),
        ),
        bad("steps 0", p(json!({"steps": 0})), 400, Some("steps")),
        bad(
            "steps above max",
            p(json!({"steps": 51})),
            400,
            Some("steps"),
        ),
        bad(
            "guidance string",
            p(json!({"guidance_scale": "high"})),
            400,
            Some("guidance_scale"),
        ),
        bad(
            "negative guidance",
            p(json!({"guidance_scale": -2})),
            400,
            Some("guidance_scale"),
        ),
        bad(
            "negative_prompt number",
            p(json!({"negative_prompt": 5})),
            400,
            Some("negative_prompt"),
        ),
        bad(
            "user object",
            p(json!({"user": {"id": 1}})),
            400,
            Some("user"),
        ),
        bad(
            "unknown field",
            p(json!({"temperature": 0.7})),
            400,
            Some("temperature"),
        ),
        bad("stream", p(json!({"stream": "yes"})), 400, Some("stream")),
        bad(
            "url stream",
            p(json!({"stream": true, "response_format": "url"})),
            400,
            Some("response_format"),
        ),
        bad(
            "partial images without a stream",
            p(json!({"partial_images": 1})),
            400,
            Some("partial_images"),
        ),
        bad("style", p(json!({"style": "cartoon"})), 400, Some("style")),
        bad_raw(
            "invalid JSON",
            Some("application/json"),
            br#"{"prompt": "a cat""#,
            400,
        ),
        bad_raw(
            "trailing garbage",
            Some("application/json"),
            br#"{"prompt": "a cat"} x"#,
            400,
        ),
        bad_raw("empty body", Some("application/json"), b"", 400),
        bad_raw(
            "not UTF-8",
            Some("application/json"),
            b"{\"prompt\": \"\xff\xfe\"}",
            400,
        ),
        bad_raw("JSON array", Some("application/json"), br#"["a cat"]"#, 422),
        bad_raw("JSON string", Some("application/json"), br#""a cat""#, 422),
        bad_raw(
            "text/plain",
            Some("text/plain"),
            br#"{"prompt": "a cat"}"#,
            415,
        ),
        bad_raw(
            "form",
            Some("application/x-www-form-urlencoded"),
            b"prompt=a+cat",
            415,
        ),
        bad_raw("no content type", None, br#"{"prompt": "a cat"}"#, 415),
    ];
    assert!(cases.len() >= 30);
    let valid = json!({"prompt": "a cat", "seed": 5});
    let reference = images(&s.generate_ok(&valid)).remove(0);
    for (i, case) in cases.iter().enumerate() {
        let mut req = s
            .client
            .post(s.url("/v1/images/generations"))
            .body(case.body.clone());
        if let Some(ct) = case.content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().unwrap();
        let status = r.status().as_u16();
        assert_openai_error(
            status,
            &r.text().unwrap(),
            case.status,
            case.param,
            case.what,
        );
        // Every few cases, a valid request still gets the same image.
        if i % 8 == 7 || i == cases.len() - 1 {
            assert_eq!(
                images(&s.generate_ok(&valid)).remove(0),
                reference,
                "after {}",
                case.what
            );
        }
    }
    // Over the limit without a declared length (chunked): counted while reading, still a 413.
    let chunked =
        std::io::Cursor::new(format!("{{\"prompt\": \"{}\"}}", "c".repeat(2 << 20)).into_bytes());
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .header("content-type", "application/json")
        .body(reqwest::blocking::Body::new(chunked))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_openai_error(status, &r.text().unwrap(), 413, None, "chunked 2 MB body");
    assert_eq!(
        images(&s.generate_ok(&valid)).remove(0),
        reference,
        "after the chunked body"
    );

    let invalid = cases
        .iter()
        .filter(|c| c.status == 400 && c.param.is_some())
        .count();
    let m = s.metrics();
    assert_eq!(
        metric_in(&m, "turbine_errors_total{type=\"invalid_request\"}"),
        invalid as f64,
        "{m}"
    );
}

#[test]
fn api_keys_priorities_and_rate_limits() {
    let mut config = test_config();
    let mut limited = ApiKey::plain("sk-limited");
    limited.priority = Priority::Low;
    limited.requests_per_minute = Some(2);
    limited.images_per_minute = Some(3);
    config.auth.keys = vec![ApiKey::plain("sk-open"), limited];
    let s = TestServer::start(config);
    let body = json!({"prompt": "a cat", "n": 2});
    let post = |key: Option<&str>| {
        let mut req = s.client.post(s.url("/v1/images/generations")).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().unwrap()
    };

    let r = post(None);
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 401, None, "no key");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = post(Some("sk-wrong"));
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 401, None, "wrong key");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = s.client.get(s.url("/v1/models")).send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.client.get(s.url("/health")).send().unwrap().status(), 200);

    let r = post(Some("sk-open"));
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-limit-requests").is_none());

    let r = post(Some("sk-limited"));
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-limit-images"], "3");
    assert_eq!(h["x-ratelimit-remaining-images"], "1");
    assert!(h["x-ratelimit-reset-requests"]
        .to_str()
        .unwrap()
        .ends_with('s'));
    assert!(h["x-ratelimit-reset-images"]
        .to_str()
        .unwrap()
        .ends_with('s'));

    // Two more images than the bucket holds: 429 on images, with Retry-After.
    let r = post(Some("sk-limited"));
    assert_eq!(r.status(), 429);
    let retry = header_number(&r, "retry-after");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let v = assert_openai_error(429, &r.text().unwrap(), 429, None, "images limit");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "images");
    // Both requests of the minute are used: 429 on requests.
    let r = post(Some("sk-limited"));
    assert_eq!(r.status(), 429);
    let v = assert_openai_error(429, &r.text().unwrap(), 429, None, "requests limit");
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(post(Some("sk-open")).status(), 200);
}

/// `--cors-allow-origin`: a page of an allowed origin may call the API from a browser (its
/// preflight answered without a key, every response readable by it, errors included); other
/// origins, and a server without the option, get no CORS headers.
#[test]
fn cors_lets_allowed_origins_call_from_a_browser() {
    let mut config = test_config();
    config.auth.keys = vec![ApiKey::plain("sk-web")];
    config.cors_allow_origins = vec!["https://app.example".into()];
    let s = TestServer::start(config);
    let url = s.url("/v1/images/generations");
    let preflight = |origin: &str| {
        s.client
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-stainless-os",
            )
            .send()
            .unwrap()
    };
    let header = |r: &Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
    };
    let r = preflight("https://app.example");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    // DELETE: a page may delete its files (`DELETE /v1/files/{id}`).
    let methods = header(&r, "access-control-allow-methods").unwrap();
    assert!(
        methods.contains("post") && methods.contains("delete"),
        "{methods}"
    );
    let allowed = header(&r, "access-control-allow-headers").unwrap();
    for h in ["authorization", "content-type", "x-stainless-os"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    assert_eq!(header(&r, "access-control-max-age").as_deref(), Some("600"));
    let r = preflight("https://elsewhere.example");
    assert_eq!(header(&r, "access-control-allow-origin"), None);

    // The call itself, and an error the page must be able to read.
    let post = |key: Option<&str>| {
        let mut req = s
            .client
            .post(&url)
            .header("origin", "https://app.example")
            .json(&json!({"prompt": "a kite", "size": "64x64"}));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().unwrap()
    };
    for (key, status) in [(Some("sk-web"), 200), (None, 401)] {
        let r = post(key);
        assert_eq!(r.status().as_u16(), status);
        assert_eq!(
            header(&r, "access-control-allow-origin").as_deref(),
            Some("https://app.example")
        );
        let exposed = header(&r, "access-control-expose-headers").unwrap();
        for h in [
            "x-request-id",
            "retry-after",
            "x-ratelimit-remaining-requests",
        ] {
            assert!(exposed.contains(h), "{exposed}");
        }
    }
    drop(s);

    // Without the option: no CORS headers, and OPTIONS is not a method of the API.
    let s = TestServer::start(test_config());
    let r = s
        .client
        .post(s.url("/v1/images/generations"))
        .header("origin", "https://app.example")
        .json(&json!({"prompt": "a kite", "size": "64x64"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/images/generations"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(header(&r, "access-control-allow-origin"), None);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    config.batching.max_queued_images = 10;
    let s = Arc::new(TestServer::start(config));
    let blocker = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.generate_ok(&json!({"prompt": "blocker", "n": 10, "size": "256x256", "steps": 8}))
        })
    };
    // The blocker's images are queued (some may already run): at least 7 of 10 slots taken.
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 10.0);
    let r = s.generate(&json!({"prompt": "one too many", "n": 4}));
    assert_eq!(r.status(), 429);
    let retry = header_number(&r, "retry-after");
    assert!(retry >= 1);
    let v = assert_openai_error(429, &r.text().unwrap(), 429, None, "queue full");
    assert_eq!(v["error"]["code"], "queue_full");
    assert_eq!(
        blocker.join().unwrap()["data"].as_array().unwrap().len(),
        10
    );
    // Once drained, the same request is served.
    s.generate_ok(&json!({"prompt": "one too many", "n": 4}));
    assert_eq!(s.metric("turbine_errors_total{type=\"queue_full\"}"), 1.0);
}

/// Sends a generation request on a raw connection, so the test can hang up mid-request.
/// The tiny model, except that a batch prompting "fault" waits for `release`, then fails as a
/// CUDA fault does and leaves the device unusable: every later call fails, the health check
/// too.
struct FaultyDevice {
    inner: Pipeline,
    release: std::sync::mpsc::Receiver<()>,
    poisoned: bool,
}

const CUDA_FAULT: &str =
    "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")";

impl ImageBackend for FaultyDevice {
    fn healthy(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.poisoned, "{CUDA_FAULT}");
        Ok(())
    }

    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        if items.iter().any(|i| i.prompt == "fault") {
            let _ = self.release.recv_timeout(Duration::from_secs(300));
            self.poisoned = true;
        }
        anyhow::ensure!(!self.poisoned, "{CUDA_FAULT}");
        self.inner.generate(settings, items, None)
    }
}

/// The only device faults: the faulting request gets a 500 with the driver's error, the one
/// queued behind it and any sent later a 503 `device_failed`, `/health` 503 `device_failed`
/// naming the device while the server drains, and `serve` then returns an error (the process
/// exits 1 for its supervisor to restart it).
#[test]
fn a_device_left_unusable_fails_fast_and_stops_the_server() {
    let (release, rx) = std::sync::mpsc::channel();
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(120);
    let mut server = TestServer::start_with(config, move |inner| {
        Box::new(FaultyDevice {
            inner,
            release: rx,
            poisoned: false,
        })
    });
    let served = server.generate_ok(&json!({"prompt": "fine", "seed": 1}));
    assert_eq!(images(&served).len(), 1);

    // A request whose body is still arriving holds the drain open, so /health can be seen.
    let (partial, tail) = partial_request(&server.base);

    let send = |prompt: &'static str, size: &'static str| {
        let (client, url) = (server.client.clone(), server.url("/v1/images/generations"));
        std::thread::spawn(move || {
            let r = client
                .post(url)
                .json(&json!({"prompt": prompt, "size": size, "seed": 2}))
                .send()
                .unwrap();
            (r.status().as_u16(), r.text().unwrap())
        })
    };
    let faulting = send("fault", "64x64");
    server.wait_metric("turbine_images_enqueued_total", |v| v >= 2.0);
    server.wait_metric("turbine_queue_images", |v| v == 0.0);
    // Another shape, so it cannot join the faulting batch: it waits in the queue or is parked
    // for the worker.
    let behind = send("behind", "128x128");
    server.wait_metric("turbine_images_enqueued_total", |v| v >= 3.0);
    release.send(()).unwrap();

    let (status, text) = faulting.join().unwrap();
    assert_openai_error(status, &text, 500, None, "the faulting batch");
    assert!(text.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{text}");
    let (status, text) = behind.join().unwrap();
    let v = assert_openai_error(status, &text, 503, None, "queued behind the fault");
    assert_eq!(v["error"]["code"], "device_failed");
    assert!(text.contains("is usable any more (cpu: "), "{text}");

    let health: Value = loop {
        let r = server.client.get(server.url("/health")).send().unwrap();
        if r.status() == 503 {
            break r.json().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(health["status"], "device_failed", "{health}");
    assert_eq!(health["failed_devices"][0]["device"], "cpu", "{health}");
    assert!(health["failed_devices"][0]["message"]
        .as_str()
        .unwrap()
        .contains("ILLEGAL_ADDRESS"));
    let r = server.generate(&json!({"prompt": "too late"}));
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 503, None, "after the fault");
    assert_eq!(v["error"]["code"], "device_failed");

    // The request that began before the fault is refused at once, not left to time out.
    let response = finish_partial(partial, &tail);
    assert!(response.starts_with("HTTP/1.1 503"), "{response:.300}");
    assert!(response.contains("device_failed"), "{response:.300}");

    let err = server.exit_error();
    assert!(
        err.contains("every device became unusable") && err.contains("cpu"),
        "{err}"
    );
}

/// Of two devices one faults: the server keeps serving on the other, every request after the
/// fault included (images parked for the failed device go back to the queue), and `/health`
/// stays 200 but names the failed device.
#[test]
fn with_two_devices_one_fault_leaves_the_other_serving() {
    let (release, rx) = std::sync::mpsc::channel();
    release.send(()).unwrap();
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    let faulty: MakeBackend = Box::new(move |inner| {
        Box::new(FaultyDevice {
            inner,
            release: rx,
            poisoned: false,
        })
    });
    let plain: MakeBackend = Box::new(|p| Box::new(p));
    let server = TestServer::start_devices(config, vec![("cpu:0", faulty), ("cpu:1", plain)]);

    // "fault" runs on whichever device takes it; on cpu:1 it is an ordinary image.
    let mut faulted = false;
    let mut seed = 0;
    while !faulted {
        seed += 1;
        assert!(seed < 200, "cpu:0 never took a \"fault\" request");
        let r = server.generate(&json!({"prompt": "fault", "seed": seed}));
        faulted = r.status() == 500;
    }
    let health: Value = loop {
        let r = server.client.get(server.url("/health")).send().unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().unwrap();
        if v.get("failed_devices").is_some() {
            break v;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(health["status"], "ok");
    assert_eq!(health["failed_devices"][0]["device"], "cpu:0", "{health}");

    // Several at once, so some would have been parked for cpu:0 had it still taken any.
    let sent: Vec<_> = (0..6)
        .map(|i| {
            let (client, url) = (server.client.clone(), server.url("/v1/images/generations"));
            std::thread::spawn(move || {
                let r = client
                    .post(url)
                    .json(&json!({"prompt": format!("after {i}"), "n": 2}))
                    .send()
                    .unwrap();
                (r.status().as_u16(), r.text().unwrap())
            })
        })
        .collect();
    for h in sent {
        let (status, text) = h.join().unwrap();
        assert_eq!(status, 200, "{text}");
    }
}

/// The tiny model, except that a batch prompting "hang" does not return until `release`: a
/// device whose call never comes back, as a hung GPU's.
struct HangingDevice {
    inner: Pipeline,
    release: std::sync::mpsc::Receiver<()>,
}

impl ImageBackend for HangingDevice {
    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        if items.iter().any(|i| i.prompt == "hang") {
            let _ = self.release.recv_timeout(Duration::from_secs(300));
        }
        self.inner.generate(settings, items, None)
    }
}

/// Waits (a minute at most) for `/health` to answer `status` with a `failed_devices` list.
fn health_with_failed_device(server: &TestServer, status: u16) -> Value {
    let start = Instant::now();
    loop {
        let r = server.client.get(server.url("/health")).send().unwrap();
        let code = r.status().as_u16();
        let v: Value = r.json().unwrap();
        if code == status && v.get("failed_devices").is_some() {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{code} {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `--device-stall-timeout`: the only device's call does not return past its bound, so the
/// device is declared stalled. The hung request gets 503 `device_failed` then, without waiting
/// for the call (a gateway tries another server), `/health` answers 503 naming the device and
/// why, requests after it get 503 `device_failed` at once, and the stall is counted. Then
/// `serve` returns an error, and the process exits 1 for its supervisor to restart it.
#[test]
fn a_stalled_device_is_failed_and_the_server_stops() {
    let (release, rx) = std::sync::mpsc::channel();
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(120);
    config.device_stall_timeout = StallTimeout::After(Duration::from_millis(300));
    let mut server = TestServer::start_with(config, move |inner| {
        Box::new(HangingDevice { inner, release: rx })
    });
    server.generate_ok(&json!({"prompt": "fine", "seed": 1}));
    // A request whose body is still arriving holds the drain open, so what follows can be seen.
    let (partial, tail) = partial_request(&server.base);
    let started = Instant::now();
    let r = server.generate(&json!({"prompt": "hang", "seed": 2}));
    let (status, text) = (r.status().as_u16(), r.text().unwrap());
    let v = assert_openai_error(status, &text, 503, None, "the hung request");
    assert_eq!(v["error"]["code"], "device_failed");
    assert!(
        text.contains("stalled: a generation batch of 1 64x64 image(s)"),
        "{text}"
    );
    let health = health_with_failed_device(&server, 503);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(health["status"], "device_failed", "{health}");
    assert_eq!(health["failed_devices"][0]["device"], "cpu", "{health}");
    let message = health["failed_devices"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("stalled: a generation batch of 1 64x64 image(s)")
            && message.contains("--device-stall-timeout"),
        "{message}"
    );
    assert!(server.metrics().contains("turbine_device_stalls_total 1\n"));
    let r = server.generate(&json!({"prompt": "too late"}));
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 503, None, "after the stall");
    assert_eq!(v["error"]["code"], "device_failed");

    // The call returns after all: nobody waits for its image any more.
    release.send(()).unwrap();
    let response = finish_partial(partial, &tail);
    assert!(response.starts_with("HTTP/1.1 503"), "{response:.300}");
    let err = server.exit_error();
    assert!(
        err.contains("every device became unusable") && err.contains("stalled"),
        "{err}"
    );
}

/// A server on two devices, one image per batch, stalls declared after 300 ms: cpu:0 hangs on
/// a "hang" prompt until the sender releases it, cpu:1 serves everything.
fn two_devices_one_hanging() -> (TestServer, std::sync::mpsc::Sender<()>) {
    let (release, rx) = std::sync::mpsc::channel();
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    config.device_stall_timeout = StallTimeout::After(Duration::from_millis(300));
    let hanging: MakeBackend =
        Box::new(move |inner| Box::new(HangingDevice { inner, release: rx }));
    let plain: MakeBackend = Box::new(|p| Box::new(p));
    let server = TestServer::start_devices(config, vec![("cpu:0", hanging), ("cpu:1", plain)]);
    (server, release)
}

/// Of two devices one stalls: its request gets 503 `device_failed`, it is named in `/health`
/// (200, as the other serves), and its batcher hands it nothing more, so every request after
/// the stall is served by the other.
#[test]
fn with_two_devices_a_stalled_one_gets_no_more_work() {
    let (server, release) = two_devices_one_hanging();

    // "hang" hangs on cpu:0; on cpu:1 it is an ordinary image. Sent one at a time until one
    // is stuck on cpu:0 (it comes back as a 503 when cpu:0 is declared stalled), so that
    // nothing else waits for cpu:0 then (its batcher holds an empty slot for it).
    let mut sent = 0;
    let (status, text) = loop {
        sent += 1;
        assert!(sent < 200, "cpu:0 never took a \"hang\" request");
        let r = server.generate(&json!({"prompt": "hang"}));
        let status = r.status().as_u16();
        if status != 200 {
            break (status, r.text().unwrap());
        }
    };
    let v = assert_openai_error(status, &text, 503, None, "the request stuck on cpu:0");
    assert_eq!(v["error"]["code"], "device_failed");
    let health = health_with_failed_device(&server, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["failed_devices"][0]["device"], "cpu:0", "{health}");
    assert!(health["failed_devices"][0]["message"]
        .as_str()
        .unwrap()
        .starts_with("stalled: "));

    // Several at once, while cpu:0 is still stuck: all served by cpu:1 (one handed to cpu:0
    // would wait there for the release, which comes only after these: the time limit fails it).
    let sent: Vec<_> = (0..6)
        .map(|i| {
            let (client, url) = (server.client.clone(), server.url("/v1/images/generations"));
            std::thread::spawn(move || {
                client
                    .post(url)
                    .timeout(Duration::from_secs(60))
                    .json(&json!({"prompt": format!("after {i}"), "n": 2}))
                    .send()
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for h in sent {
        assert_eq!(h.join().unwrap(), Ok(200));
    }
    release.send(()).unwrap();
}

/// A Batch API line whose images were on a device declared stalled is not reported failed: it
/// runs again on the other device, with its seed, and the batch completes whole.
#[test]
fn a_batch_line_on_a_stalled_device_runs_again_on_another() {
    let (server, release) = two_devices_one_hanging();
    let g = "/v1/images/generations";
    // Twenty lines over two devices: cpu:0 takes one of them (and hangs on it) all but surely.
    let jsonl = (0..20)
        .map(|i| {
            batch_line(
                &format!("line-{i}"),
                g,
                json!({"prompt": "hang", "seed": i}),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let batch = server.run_batch(None, g, &jsonl);
    let health = health_with_failed_device(&server, 200);
    assert!(
        health["failed_devices"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("stalled: "),
        "{health}"
    );
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 20, "completed": 20, "failed": 0}),
        "{batch}"
    );
    let out = server.file_lines(None, batch["output_file_id"].as_str().unwrap());
    let mut seeds: Vec<u64> = out
        .iter()
        .map(|l| l["response"]["body"]["data"][0]["seed"].as_u64().unwrap())
        .collect();
    seeds.sort();
    assert_eq!(
        seeds,
        (0..20).collect::<Vec<u64>>(),
        "each line with its own seed"
    );
    release.send(()).unwrap();
}

/// A generation request whose body has only begun to arrive (the server counts it in flight,
/// so a drain waits for it), and the rest of its body for the test to send when it likes.
fn partial_request(base: &str) -> (TcpStream, String) {
    let mut partial = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    let body = json!({"prompt": "late body", "seed": 9}).to_string();
    let (head, tail) = body.split_at(5);
    write!(
        partial,
        "POST /v1/images/generations HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    partial.flush().unwrap();
    (partial, tail.to_string())
}

/// Sends the rest of a [`partial_request`]'s body and reads its whole response.
fn finish_partial(mut partial: TcpStream, tail: &str) -> String {
    partial.write_all(tail.as_bytes()).unwrap();
    let mut response = String::new();
    partial.read_to_string(&mut response).unwrap();
    response
}

impl TestServer {
    /// Waits for `serve` to end with an error, and returns it with its causes.
    fn exit_error(&mut self) -> String {
        let result = self.thread.take().unwrap().join().unwrap();
        format!("{:#}", result.unwrap_err())
    }
}

fn raw_request(addr: &str, body: &Value) -> TcpStream {
    let mut stream = TcpStream::connect(addr.trim_start_matches("http://")).unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST /v1/images/generations HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

/// A server running one image per batch whose worker is busy with the blocker's six images
/// (queued once this returns), and the thread waiting for the blocker's response.
fn server_busy_with_a_blocker() -> (Arc<TestServer>, JoinHandle<Value>) {
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    let s = Arc::new(TestServer::start(config));
    let blocker_thread = {
        let s = s.clone();
        std::thread::spawn(move || s.generate_ok(&blocker()))
    };
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 6.0);
    (s, blocker_thread)
}

#[test]
fn a_disconnected_clients_images_never_run() {
    let (s, blocker_thread) = server_busy_with_a_blocker();
    let gone = raw_request(
        &s.base,
        &json!({"prompt": "never mind", "n": 3, "size": "64x64"}),
    );
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 9.0);
    // Its images wait behind the blocker's (first come, first served): hang up now.
    drop(gone);
    s.wait_metric(
        "turbine_images_dropped_total{reason=\"client_disconnected\"}",
        |v| v >= 3.0,
    );
    assert_eq!(
        blocker_thread.join().unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    let m = s.metrics();
    assert_eq!(metric_in(&m, "turbine_images_generated_total"), 6.0, "{m}");
    assert_eq!(
        metric_in(
            &m,
            "turbine_images_dropped_total{reason=\"client_disconnected\"}"
        ),
        3.0
    );
    assert_eq!(metric_in(&m, "turbine_queue_images"), 0.0);
    s.generate_ok(&json!({"prompt": "still serving"}));
}

#[test]
fn a_request_past_its_timeout_gets_503_and_its_unstarted_images_are_dropped() {
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    config.batching.request_timeout = Duration::from_secs(1);
    let s = TestServer::start(config);
    // One image of these alone takes over a second on a CPU (about 1.5 s here).
    let r = s.generate(&json!({"prompt": "slow", "n": 6, "size": "256x256", "steps": 8}));
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 503, None, "timeout");
    assert_eq!(v["error"]["code"], "timeout");
    // The images that were running or prefetched finish or get dropped after the response;
    // wait until all six are accounted for, then the idle server still serves.
    let accounted = |m: &str| {
        metric_in(m, "turbine_images_generated_total")
            + metric_in(m, "turbine_images_dropped_total{reason=\"timeout\"}")
    };
    while accounted(&s.metrics()) < 6.0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = s.metrics();
    let dropped = metric_in(&m, "turbine_images_dropped_total{reason=\"timeout\"}");
    assert!(dropped >= 1.0, "{m}");
    assert_eq!(
        accounted(&m),
        6.0,
        "every image either ran or was dropped, once:\n{m}"
    );
    assert_eq!(metric_in(&m, "turbine_queue_images"), 0.0);
    println!(
        "timeout: {} of 6 images ran ({:.2} s in the UNet), {dropped} dropped",
        metric_in(&m, "turbine_images_generated_total"),
        metric_in(&m, "turbine_stage_duration_seconds_sum{stage=\"unet\"}")
    );
    s.generate_ok(&json!({"prompt": "fast"}));
}

/// The events of a `text/event-stream` body: (event name, JSON data).
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            (!data.is_empty()).then(|| (name, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

/// `stream: true`: one `image_generation.completed` event per image, with OpenAI's fields and
/// the seed, carrying the image the same request gives without streaming.
/// A prompt longer than CLIP reads (75 tokens) is cut off, as diffusers cuts it; the images'
/// `revised_prompt` (OpenAI's "prompt that was used to generate the image") is the part read,
/// so that a client sees it, and `turbine_prompts_truncated_total` counts it. Before, it was
/// always null and the cut was silent. A prompt read whole keeps it null.
#[test]
fn a_prompt_longer_than_clip_reads_comes_back_as_the_part_read() {
    let s = TestServer::start(test_config());
    let read = vec!["fox"; 75].join(" ");
    let long = format!("{read} in the snow, at dusk, with a lantern");
    let v = s.generate_ok(&json!({"prompt": long, "n": 2, "size": "64x64", "seed": 3}));
    for image in v["data"].as_array().unwrap() {
        assert_eq!(image["revised_prompt"], read.as_str(), "{image}");
    }
    assert_eq!(v["usage"]["input_tokens_details"]["text_tokens"], 77 * 2);
    // The part read makes the same images as the whole prompt.
    let same = s.generate_ok(&json!({"prompt": read, "n": 2, "size": "64x64", "seed": 3}));
    assert_eq!(same["data"][0]["revised_prompt"], Value::Null);
    assert_eq!(same["data"][0]["b64_json"], v["data"][0]["b64_json"]);
    assert_eq!(same["data"][1]["b64_json"], v["data"][1]["b64_json"]);
    assert_eq!(
        metric_in(&s.metrics(), "turbine_prompts_truncated_total"),
        1.0
    );
}

#[test]
fn a_streamed_request_sends_each_image_as_an_event() {
    let s = TestServer::start(test_config());
    let plain = s.generate_ok(&json!({"prompt": "a streamed fox", "n": 3, "seed": 5}));
    let r = s.generate(&json!({
        "prompt": "a streamed fox", "n": 3, "seed": 5, "stream": true, "partial_images": 2
    }));
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    // Not held by a buffering proxy (nginx) until the first image.
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let events = sse_events(&r.text().unwrap());
    assert_eq!(events.len(), 3, "{events:?}");
    let mut seeds = Vec::new();
    for (name, e) in &events {
        assert_eq!(name, "image_generation.completed");
        assert_eq!(e["type"], "image_generation.completed");
        assert_eq!(
            (
                &e["size"],
                &e["quality"],
                &e["background"],
                &e["output_format"]
            ),
            (
                &json!("64x64"),
                &json!("low"),
                &json!("opaque"),
                &json!("png")
            )
        );
        assert!(e["created_at"].as_u64().unwrap() > 1_700_000_000);
        // One image per event: 8x8 latent positions out, the prompt's CLIP tokens in.
        assert_eq!(e["usage"]["output_tokens"], 64);
        assert!(e["usage"]["input_tokens"].as_u64().unwrap() > 2);
        let seed = e["seed"].as_u64().unwrap();
        seeds.push(seed);
        let i = (seed - 5) as usize;
        assert_eq!(
            decode_b64(e).as_raw(),
            decode_b64(&plain["data"][i]).as_raw(),
            "image of seed {seed}"
        );
    }
    seeds.sort();
    assert_eq!(seeds, [5, 6, 7]);
    let m = s.metrics();
    assert_eq!(
        metric_in(
            &m,
            "turbine_http_requests_total{route=\"/v1/images/generations\",status=\"200\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(metric_in(&m, "turbine_http_requests_in_flight"), 0.0, "{m}");
}

/// `partial_images` with more than one step: each image's previews (the denoised estimates of
/// the steps before its last) come as `partial_image` events before its completed event, as
/// many as asked for, at most one per such step. A one-step schedule and every longer one
/// start at t = 999, and the step to sigma 0 is the denoised estimate: the preview made after
/// the first step is the one-step image of the same seed.
#[test]
fn a_stream_sends_previews_before_each_image() {
    let s = TestServer::start(test_config());
    let prompt = "a lighthouse at dusk";
    let one_step = s.generate_ok(&json!({"prompt": prompt, "n": 2, "seed": 21}));
    let four_steps =
        s.generate_ok(&json!({"prompt": prompt, "n": 2, "seed": 21, "quality": "high"}));
    let r = s.generate(&json!({
        "prompt": prompt, "n": 2, "seed": 21, "quality": "high", "stream": true,
        "partial_images": 2
    }));
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().unwrap());
    assert_eq!(events.len(), 6, "{events:?}");
    for i in 0..2usize {
        let seed = 21 + i as u64;
        let mine: Vec<&(String, Value)> =
            events.iter().filter(|(_, e)| e["seed"] == seed).collect();
        let names: Vec<&str> = mine.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "image_generation.partial_image",
                "image_generation.partial_image",
                "image_generation.completed"
            ],
            "seed {seed}"
        );
        for (k, (name, e)) in mine[..2].iter().enumerate() {
            assert_eq!(e["type"], *name);
            assert_eq!(e["partial_image_index"], k);
            assert_eq!(
                (
                    &e["size"],
                    &e["quality"],
                    &e["background"],
                    &e["output_format"]
                ),
                (
                    &json!("64x64"),
                    &json!("high"),
                    &json!("opaque"),
                    &json!("png")
                )
            );
            assert!(e["created_at"].as_u64().unwrap() > 1_700_000_000);
            assert!(e.get("usage").is_none(), "a preview is not billed: {e}");
        }
        let first = decode_b64(&mine[0].1);
        let second = decode_b64(&mine[1].1);
        assert_eq!(first, decode_b64(&one_step["data"][i]), "seed {seed}");
        assert_ne!(
            first, second,
            "seed {seed}: the third step's estimate is another image"
        );
        assert_eq!(decode_b64(&mine[2].1), decode_b64(&four_steps["data"][i]));
    }

    // Two steps have one step before the last: one preview of the three asked for.
    let r = s.generate(&json!({
        "prompt": prompt, "seed": 21, "steps": 2, "stream": true, "partial_images": 3
    }));
    let events = sse_events(&r.text().unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    assert_eq!(decode_b64(&events[0].1), decode_b64(&one_step["data"][0]));
    assert_eq!(s.metric("turbine_partial_images_total"), 5.0);
}

/// A backend that fails every batch holding the prompt "fail".
struct FailsOnPrompt(Pipeline);

impl ImageBackend for FailsOnPrompt {
    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        anyhow::ensure!(
            items.iter().all(|i| i.prompt != "fail"),
            "the model failed on purpose"
        );
        self.0.generate(settings, items, None)
    }
}

/// Once a stream has started, a failure is an `error` event with OpenAI's error body (what the
/// SDKs raise), the stream ends, and the error is counted.
#[test]
fn a_failure_ends_the_stream_with_an_error_event() {
    let s = TestServer::start_with(test_config(), |p| Box::new(FailsOnPrompt(p)));
    let r = s.generate(&json!({"prompt": "fail", "n": 2, "stream": true}));
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().unwrap());
    assert_eq!(events.len(), 1, "{events:?}");
    let (name, e) = &events[0];
    assert_eq!(name, "error");
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "server_error");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("the model failed on purpose"), "{message}");
    assert_eq!(s.metric("turbine_errors_total{type=\"backend\"}"), 1.0);
    s.generate_ok(&json!({"prompt": "still serving"}));
}

/// A streaming client that hangs up before its images ran: they are dropped from the queue.
#[test]
fn a_disconnected_streams_images_never_run() {
    let (s, blocker_thread) = server_busy_with_a_blocker();
    let mut gone = raw_request(
        &s.base,
        &json!({"prompt": "never mind", "n": 3, "size": "64x64", "stream": true}),
    );
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 9.0);
    // The stream's head has come back (the events have not: they wait behind the blocker).
    let mut head = [0u8; 12];
    gone.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(gone);
    s.wait_metric(
        "turbine_images_dropped_total{reason=\"client_disconnected\"}",
        |v| v >= 3.0,
    );
    assert_eq!(images(&blocker_thread.join().unwrap()).len(), 6);
    assert_eq!(s.metric("turbine_images_generated_total"), 6.0);
}

/// The real binary, for signals.
struct ServerProcess {
    child: Child,
    base: String,
    /// Its log lines so far.
    log: Arc<Mutex<Vec<String>>>,
    /// While set, its log is not read (as a log reader that stopped).
    log_paused: Arc<std::sync::atomic::AtomicBool>,
}

impl ServerProcess {
    /// Started, and healthy (its warm-up done).
    fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, &[])
    }

    /// As `start`, with `envs` too.
    fn start_with(extra: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> Self {
        let p = Self::spawn(extra, envs);
        let client = Client::new();
        while client
            .get(format!("{}/health", p.base))
            .send()
            .map_or(true, |r| r.status() != 200)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// Started with `envs` too, and listening (not yet warmed up).
    fn spawn(extra: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> Self {
        Self::spawn_on(Some("127.0.0.1"), extra, envs)
    }

    /// As `spawn`, listening on `host` (None: the default, `--host` not given). `base` is on
    /// 127.0.0.1 when it listens on every address.
    fn spawn_on(host: Option<&str>, extra: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_turbine"))
            .args(["serve", "--model-dir"])
            .arg(model_dir())
            .args(["--device", "cpu", "--port", "0", "--min-image-side", "64"])
            .args(host.map(|h| ["--host", h]).iter().flatten())
            .args(if extra.contains(&"--default-size") {
                &["--warmup-images", "1"][..]
            } else {
                &["--default-size", "64x64", "--warmup-images", "1"][..]
            })
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut early = Vec::new();
        let addr: SocketAddr = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            eprintln!("[server] {line}");
            early.push(line.clone());
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_hexdigit() || ".:[]".contains(*c))
                    .collect();
                let addr: SocketAddr = addr.parse().unwrap();
                break if addr.ip().is_unspecified() {
                    SocketAddr::from(([127, 0, 0, 1], addr.port()))
                } else {
                    addr
                };
            }
        };
        // Keep draining the log, unless a test pauses it.
        let log = Arc::new(Mutex::new(early));
        let log_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kept, paused) = (log.clone(), log_paused.clone());
        std::thread::spawn(move || loop {
            while paused.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let Some(Ok(line)) = lines.next() else {
                return;
            };
            eprintln!("[server] {line}");
            kept.lock().unwrap().push(line);
        });
        ServerProcess {
            child,
            base: format!("http://{addr}"),
            log,
            log_paused,
        }
    }

    /// Waits (two minutes at most) for a log line containing `text` after the first `from`
    /// lines; returns the number of lines up to and including it.
    fn wait_for_log(&self, from: usize, text: &str) -> usize {
        let start = Instant::now();
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(i) = log.iter().skip(from).position(|l| l.contains(text)) {
                    return from + i + 1;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no log line with {text:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status `/health` answers with.
    fn health(&self) -> u16 {
        Client::new()
            .get(format!("{}/health", self.base))
            .send()
            .unwrap()
            .status()
            .as_u16()
    }

    fn metrics(&self) -> String {
        Client::new()
            .get(format!("{}/metrics", self.base))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, as systemd and Kubernetes stop a service.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (a hang guard of two minutes) and returns its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "server did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number after `key=` in the first of `p`'s log lines that has it.
fn logged_number(p: &ServerProcess, key: &str) -> f64 {
    let line = p.wait_for_log(0, key);
    let log = p.log.lock().unwrap();
    let rest = log[line - 1].split(key).nth(1).unwrap();
    let n: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    n.parse().unwrap()
}

/// Each request's log lines name its client: the address a proxy of `--forwarded-allow-ips`
/// gives in `X-Forwarded-For` (or `Forwarded: for=`), else the connection's own.
#[test]
fn request_logs_name_the_client() {
    let client = Client::new();
    let logged_client = |p: &ServerProcess, id: &str, headers: &[(&str, &str)]| {
        let mut r = client
            .get(format!("{}/v1/models", p.base))
            .header("x-request-id", id);
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        assert_eq!(r.send().unwrap().status(), 200);
        let line = p.wait_for_log(0, &format!("id={id}"));
        let log = p.log.lock().unwrap();
        let rest = log[line - 1].split("client=").nth(1).unwrap_or_default();
        rest.split([' ', '}']).next().unwrap().to_string()
    };
    let p = ServerProcess::start(&[]);
    let xff = [("x-forwarded-for", "203.0.113.9, 10.0.0.2")];
    assert_eq!(logged_client(&p, "direct", &[]), "127.0.0.1");
    assert_eq!(logged_client(&p, "proxied", &xff), "203.0.113.9");
    let forwarded = [("forwarded", "for=\"[2001:db8::1]:4711\"")];
    assert_eq!(logged_client(&p, "rfc7239", &forwarded), "2001:db8::1");
    drop(p);
    // From a peer outside the list, the header is not believed.
    let p = ServerProcess::start(&["--forwarded-allow-ips", "10.0.0.0/8"]);
    assert_eq!(logged_client(&p, "untrusted", &xff), "127.0.0.1");
}

/// `--metrics-port`: `/metrics` on a port of its own (for a scraper on the inside), and no longer
/// on the API's port, where anyone who reached the API read every key's name and use: here a
/// caller without a key saw `turbine_key_requests_total{key="acme-corp",...}`.
#[test]
fn metrics_on_a_port_of_their_own_leave_the_apis_port() {
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), "sk-a name=acme-corp\n").unwrap();
    let keys = keys.path().to_str().unwrap();
    let p = ServerProcess::start(&["--api-keys-file", keys, "--metrics-port", "0"]);
    let at = p.wait_for_log(0, "metrics on http://");
    let line = p.log.lock().unwrap()[at - 1].clone();
    let metrics_url = line
        .split("metrics on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(metrics_url.ends_with("/metrics"), "{line}");
    let client = Client::new();
    let r = client
        .post(format!("{}/v1/images/generations", p.base))
        .bearer_auth("sk-a")
        .json(&json!({"prompt": "a fox", "size": "64x64"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = client.get(format!("{}/metrics", p.base)).send().unwrap();
    assert_eq!(r.status(), 404);
    let body = r.text().unwrap();
    assert!(
        body.contains("--metrics-port") && !body.contains("acme-corp"),
        "{body}"
    );

    let r = client.get(&metrics_url).send().unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().unwrap();
    assert_eq!(
        metric_in(
            &text,
            "turbine_key_requests_total{key=\"acme-corp\",status=\"200\"}"
        ),
        1.0,
        "{text}"
    );
    // Only the metrics there: not the API, with or without a key.
    let base = metrics_url.trim_end_matches("/metrics");
    for path in ["/v1/models", "/health", "/"] {
        let r = client
            .get(format!("{base}{path}"))
            .bearer_auth("sk-a")
            .send()
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

/// Without `--port`, the port is `PORT` when the environment sets it: Cloud Run, Knative and
/// other platforms that run containers set it and wait for the server there (Cloud Run's
/// deployment fails when nothing listens on it). Before, the server took 8000 regardless.
#[test]
fn the_platforms_port_variable_is_the_default_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["serve", "--model-dir"])
        .arg(model_dir())
        .args([
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--min-image-side",
            "64",
        ])
        .args(["--default-size", "64x64", "--warmup-images", "1"])
        .env("PORT", port.to_string())
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let listening = stderr
        .lines()
        .map(Result::unwrap)
        .find(|l| l.contains("listening on http://"))
        .expect("server exited before listening");
    assert!(
        listening.contains(&format!("http://127.0.0.1:{port}")),
        "{listening}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// By default the server listens on every address of both families: an IPv6-only network
/// (an IPv6-only Kubernetes cluster's pods have no IPv4 address) reaches it, and so does a
/// client that resolves `localhost` to ::1. IPv4 clients arrive IPv4-mapped on that socket and
/// are still who they are: 127.0.0.1 is in the log and is the trusted proxy of the default
/// `--forwarded-allow-ips`. Before, the default was 0.0.0.0, and nothing over IPv6 connected.
#[test]
fn the_default_host_listens_on_ipv6_and_ipv4() {
    let p = ServerProcess::spawn_on(None, &[], &[]);
    let port = p.base.rsplit(':').next().unwrap().to_string();
    let listening = p.wait_for_log(0, "listening on http://");
    let line = p.log.lock().unwrap()[listening - 1].clone();
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    if ipv6 {
        assert!(
            line.contains(&format!("listening on http://[::]:{port}")),
            "{line}"
        );
    } else {
        // A kernel without IPv6 gets 0.0.0.0 (the unit tests check the choice); a container
        // whose loopback has no ::1 still listens on [::].
        eprintln!("no IPv6 loopback on this machine: connections over IPv6 are not checked");
    }
    let client = Client::new();
    let mut origins = vec![format!("http://127.0.0.1:{port}")];
    if ipv6 {
        origins.push(format!("http://[::1]:{port}"));
    }
    for (i, origin) in origins.iter().enumerate() {
        while client
            .get(format!("{origin}/health"))
            .send()
            .map_or(true, |r| r.status() != 200)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let r: Value = client
            .post(format!("{origin}/v1/images/generations"))
            .header("x-forwarded-proto", "https")
            .header("x-request-id", format!("family-{i}"))
            .json(&json!({"prompt": "both families", "response_format": "url"}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        // From this machine the peer is a trusted proxy, so its scheme is believed.
        let url = r["data"][0]["url"].as_str().unwrap();
        assert!(
            url.starts_with(&format!("https://{}/v1/images/files/", &origin[7..])),
            "{url}"
        );
        let logged = p.wait_for_log(0, &format!("id=family-{i} "));
        let line = p.log.lock().unwrap()[logged - 1].clone();
        let want = if origin.contains('[') {
            "::1"
        } else {
            "127.0.0.1"
        };
        assert!(line.contains(&format!("client={want}}}")), "{line}");
    }
}

/// A server whose process is stopped while its device is in a call (`docker pause`, a frozen
/// cgroup, SIGSTOP, a virtual machine held by its host) has not seen its device stall: on
/// waking, the call under way is not charged for the pause, its request is answered, and the
/// server goes on. Before, the call looked as old as the pause, so the server declared its only
/// device stalled, failed its requests and exited.
#[test]
fn a_paused_server_does_not_declare_its_device_stalled() {
    for attempt in 1.. {
        // One 256x256 image per call; the bound is the longer of 0.5 s and ten times the
        // warm-up's (the same work as each call), and the pause is longer than that.
        let p = ServerProcess::start(&[
            "--default-size",
            "256x256",
            "--max-image-side",
            "256",
            "--max-batch-size",
            "1",
            "--device-stall-timeout",
            "0.5",
        ]);
        let unit = logged_number(&p, "unit_secs=");
        let bound = (10.0 * unit).max(0.5);
        let pause = Duration::from_secs_f64(bound + 1.5);
        let base = p.base.clone();
        let request = std::thread::spawn(move || {
            Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap()
                .post(format!("{base}/v1/images/generations"))
                .json(&json!({"prompt": "paused", "n": 8, "seed": 3}))
                .send()
                .unwrap()
        });
        // Into the calls (eight, one after another), then stopped for longer than the bound.
        std::thread::sleep(Duration::from_secs_f64(unit * 2.5));
        p.signal("STOP");
        std::thread::sleep(pause);
        p.signal("CONT");
        let r = request.join().unwrap();
        assert_eq!(r.status(), 200, "the paused request");
        let v: Value = r.json().unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 8);
        let excused = logged_number(&p, "call_excused_secs=");
        let log = p.log.lock().unwrap().join("\n");
        assert!(log.contains("turbine did not run for"), "{log}");
        assert!(!log.contains("stalled:"), "{log}");
        drop(log);
        assert_eq!(p.health(), 200);
        assert!(p.metrics().contains("turbine_device_stalls_total 0\n"));
        if excused > bound {
            // The stop came during a call that it would have made overdue.
            return;
        }
        // It came between two calls: nothing was tested.
        assert!(attempt < 3, "the stop never came during a call");
    }
}

/// `--prompt-cache-entries`: a prompt runs through the text encoders once, whether it comes
/// back within a request (`n` > 1) or in a later one, and `/metrics` says where each prompt's
/// embeddings came from; the images are the same as with nothing kept.
#[test]
fn a_prompt_seen_before_skips_the_text_encoders() {
    let p = ServerProcess::start(&["--prompt-cache-entries", "4"]);
    let client = Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let generate = |body: Value| -> Value {
        let r = client
            .post(format!("{}/v1/images/generations", p.base))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().unwrap()
    };
    let first = generate(json!({"prompt": "a kept prompt", "n": 3, "seed": 7}));
    let again = generate(json!({"prompt": "a kept prompt", "n": 1, "seed": 8}));
    let m = client
        .get(format!("{}/metrics", p.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let source = |s: &str| {
        metric_in(
            &m,
            &format!("turbine_prompt_embeddings_total{{source=\"{s}\"}}"),
        )
    };
    // However the four images were batched, only the first of them ran the encoders.
    assert_eq!(source("encoded"), 1.0, "{m}");
    assert_eq!(source("repeated") + source("cached"), 3.0, "{m}");
    assert!(source("cached") >= 1.0, "{m}");
    // Seed 8 is the second image of the first request: the same image, from kept embeddings.
    assert_eq!(
        decode_b64(&first["data"][1]).as_raw(),
        decode_b64(&again["data"][0]).as_raw()
    );
}

#[test]
fn sigterm_stops_accepting_and_drains_queued_work_then_exits_zero() {
    let mut p = ServerProcess::start(&["--max-batch-size", "2", "--shutdown-grace-secs", "120"]);
    let client = Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let metrics = || p.metrics();

    // A request whose body is still arriving when the signal comes: it holds the drain open,
    // so the test can see the draining server answer 503 however fast the queue empties.
    let (partial, tail) = partial_request(&p.base);

    let queued: Vec<_> = (0..4)
        .map(|i| {
            let (client, base) = (client.clone(), p.base.clone());
            std::thread::spawn(move || {
                client
                    .post(format!("{base}/v1/images/generations"))
                    .json(&json!({"prompt": format!("queued {i}"), "n": 2, "size": "256x256", "steps": 4}))
                    .send()
                    .unwrap()
            })
        })
        .collect();
    while metric_in(&metrics(), "turbine_http_requests_in_flight") < 5.0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    p.terminate();

    while client
        .get(format!("{}/health", p.base))
        .send()
        .unwrap()
        .status()
        != 503
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = client
        .post(format!("{}/v1/images/generations", p.base))
        .json(&json!({"prompt": "too late"}))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let v = assert_openai_error(status, &r.text().unwrap(), 503, None, "while draining");
    assert_eq!(v["error"]["code"], "shutting_down");

    for h in queued {
        let r = h.join().unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
    }
    // The request that began before the signal is still served.
    let response = finish_partial(partial, &tail);
    assert!(response.starts_with("HTTP/1.1 200"), "{response:.200}");
    assert_eq!(p.exit_code(), Some(0));
}

/// Ctrl-C twice: the first drains, the second stops the process at once (not after the
/// `--shutdown-grace-secs` of 600 here), answering the request under way 503.
#[test]
fn a_second_ctrl_c_stops_the_server_at_once() {
    let mut p = ServerProcess::start(&["--shutdown-grace-secs", "600", "--max-image-side", "512"]);
    let base = p.base.clone();
    // Tens of seconds of work for the tiny model on a CPU.
    let request = std::thread::spawn(move || {
        let r = Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap()
            .post(format!("{base}/v1/images/generations"))
            .json(&json!({"prompt": "interrupted", "n": 4, "size": "512x512", "steps": 50}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    while metric_in(&p.metrics(), "turbine_http_requests_in_flight") < 1.0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    p.signal("INT");
    while p.health() != 503 {
        std::thread::sleep(Duration::from_millis(5));
    }
    p.signal("INT");
    let (status, body) = request.join().unwrap();
    let v = assert_openai_error(status, &body, 503, None, "after a second Ctrl-C");
    assert_eq!(v["error"]["code"], "shutting_down");
    assert_eq!(p.exit_code(), Some(0));
    let log = p.log.lock().unwrap().join("\n");
    assert!(log.contains("a second stop signal"), "{log}");
}

/// A shutdown is not held up by connections with no request open: an idle keep-alive one closes
/// at once, and one whose head is still on its way (a stalled or slow client) gets 2 s for it.
/// Before, a stalled head held the drain for the whole `--shutdown-grace-secs`.
#[test]
fn a_stalled_head_does_not_hold_up_a_shutdown() {
    let mut p = ServerProcess::start(&["--shutdown-grace-secs", "120"]);
    let addr = p.base.trim_start_matches("http://").to_string();
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let mut half = TcpStream::connect(&addr).unwrap();
    half.write_all(b"POST /v1/images/generations HTTP/1.1\r\nhost: t\r\ncontent-")
        .unwrap();
    // Both accepted (the scrape's own connection is the third).
    while metric_in(&p.metrics(), "turbine_http_connections") < 3.0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let signalled = Instant::now();
    p.terminate();
    assert_eq!(p.exit_code(), Some(0));
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(20), "the shutdown took {took:?}");
}

/// Under a systemd unit with `Type=notify`: the server says READY=1 when it is (its `/health`
/// answers 200 from then on), and STOPPING=1 when SIGTERM comes, each with a STATUS line for
/// `systemctl status`.
#[cfg(unix)]
#[test]
fn systemd_is_told_when_the_server_is_ready_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let heard = || {
        let mut buf = [0u8; 1024];
        let n = systemd
            .recv(&mut buf)
            .expect("nothing heard from the server");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let mut p = ServerProcess::spawn(&[], &[("NOTIFY_SOCKET", path.as_os_str())]);
    assert_eq!(heard(), "STATUS=loading the model and warming up");
    let ready = heard();
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=serving sdxl-turbo on {}", p.base)
    );
    // Ready means ready: no poll, the first look at /health finds it so.
    assert_eq!(p.health(), 200);

    p.terminate();
    assert_eq!(
        heard(),
        "STOPPING=1\nSTATUS=shutting down: finishing 0 queued images and the running work"
    );
    assert_eq!(p.exit_code(), Some(0));
}

/// Under a unit with `WatchdogSec=`: the server sends `WATCHDOG=1` twice per interval
/// (`WATCHDOG_USEC`), from loading on and while it serves, and none for another process's
/// watchdog (`WATCHDOG_PID`).
#[cfg(unix)]
#[test]
fn systemd_watchdog_is_pinged_twice_per_interval() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let heard_for = |pid: Option<&str>| -> Vec<String> {
        let path = dir.path().join(format!("notify-{}", pid.unwrap_or("any")));
        let systemd = UnixDatagram::bind(&path).unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let usec = std::ffi::OsString::from("400000");
        let mut envs = vec![
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", usec.as_os_str()),
        ];
        let pid = pid.map(std::ffi::OsString::from);
        if let Some(pid) = &pid {
            envs.push(("WATCHDOG_PID", pid.as_os_str()));
        }
        let mut p = ServerProcess::spawn(&[], &envs);
        let mut heard = Vec::new();
        let mut ready_at = None;
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < Duration::from_secs(300), "{heard:?}");
            let mut buf = [0u8; 1024];
            if let Ok(n) = systemd.recv(&mut buf) {
                let message = String::from_utf8(buf[..n].to_vec()).unwrap();
                if message.starts_with("READY=1") {
                    ready_at = Some(Instant::now());
                }
                heard.push(message);
            }
            // Two seconds of serving: five intervals of 0.4 s.
            if ready_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                break;
            }
        }
        p.terminate();
        assert_eq!(p.exit_code(), Some(0));
        heard
    };
    let heard = heard_for(None);
    let ready = heard.iter().position(|m| m.starts_with("READY=1")).unwrap();
    let pings_after = heard[ready..].iter().filter(|m| *m == "WATCHDOG=1").count();
    // One each 0.2 s: about ten in two seconds (fewer on a machine busy with other tests).
    assert!((3..=12).contains(&pings_after), "{heard:?}");
    assert!(heard
        .iter()
        .all(|m| m == "WATCHDOG=1" || m.starts_with("READY=1") || m.starts_with("STATUS=")));
    let heard = heard_for(Some("1"));
    assert!(!heard.iter().any(|m| m == "WATCHDOG=1"), "{heard:?}");
}

/// `systemctl reload` (SIGHUP) reads `--api-keys-file` again at once: a key added works, a
/// key removed is refused, a file that does not load leaves the keys as they were. The server
/// goes on serving throughout.
#[cfg(unix)]
#[test]
fn sighup_reads_the_keys_file_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(&path, "sk-old name=old\n").unwrap();
    let mut p = ServerProcess::start(&["--api-keys-file", path.to_str().unwrap()]);
    let client = Client::new();
    let models = |key: &str| {
        client
            .get(format!("{}/v1/models", p.base))
            .bearer_auth(key)
            .send()
            .unwrap()
            .status()
    };
    let metrics = || p.metrics();
    assert_eq!(models("sk-old"), 200);
    assert_eq!(models("sk-new"), 401);

    std::fs::write(&path, "sk-new name=new\n").unwrap();
    let seen = p.log_len();
    p.signal("HUP");
    let seen = p.wait_for_log(seen, "SIGHUP received: reading the API keys file again");
    let seen = p.wait_for_log(seen, "API keys reloaded");
    assert_eq!(models("sk-new"), 200);
    assert_eq!(models("sk-old"), 401);
    let m = metrics();
    assert!(
        m.contains("turbine_api_key_reloads_total{outcome=\"loaded\"} 1"),
        "{m}"
    );
    assert!(m.contains("turbine_api_keys 1"), "{m}");

    // A line that does not parse: the keys in use stay.
    std::fs::write(&path, "sk-new priority=urgent\n").unwrap();
    p.signal("HUP");
    p.wait_for_log(seen, "it does not load; the keys in use stay");
    assert_eq!(models("sk-new"), 200);
    assert!(metrics().contains("turbine_api_key_reloads_total{outcome=\"failed\"} 1"));

    p.terminate();
    assert_eq!(p.exit_code(), Some(0));
}

/// SIGHUP with nothing to reload (no keys file, plain HTTP) is not the end of the server:
/// without a handler, the signal's default would kill it with every queued image.
#[cfg(unix)]
#[test]
fn sighup_never_ends_the_server() {
    let mut p = ServerProcess::start(&[]);
    let seen = p.log_len();
    p.signal("HUP");
    p.wait_for_log(seen, "SIGHUP received: nothing to reload");
    assert_eq!(p.health(), 200);
    p.terminate();
    assert_eq!(p.exit_code(), Some(0));
}

/// `serve --preview-vae taesdxl`: a stream's previews are TAESD's decodes (the first one is the
/// one-step image of a pipeline that decodes with TAESD, not the VAE's), and its image is the
/// VAE's, the one a request without a stream gets.
#[test]
fn serve_decodes_previews_with_taesd_when_asked() {
    let p = ServerProcess::start(&["--preview-vae", "taesdxl"]);
    let client = Client::new();
    let post = |body: Value| {
        client
            .post(format!("{}/v1/images/generations", p.base))
            .json(&body)
            .send()
            .unwrap()
    };
    let prompt = "a lighthouse at dusk";
    let one_step: Value = post(json!({"prompt": prompt, "seed": 21})).json().unwrap();
    let four_steps: Value = post(json!({"prompt": prompt, "seed": 21, "quality": "high"}))
        .json()
        .unwrap();
    let r = post(json!({
        "prompt": prompt, "seed": 21, "quality": "high", "stream": true, "partial_images": 3
    }));
    let events = sse_events(&r.text().unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    assert_eq!(decode_b64(&events[3].1), decode_b64(&four_steps["data"][0]));
    let taesd = Pipeline::load_with_vae(
        &model_dir(),
        Some(&model_dir().join("vae-taesdxl")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let settings = tiny_settings(false);
    let item = ImageRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        seed: 21,
        init_image: None,
        partials: None,
    };
    let by_taesd = taesd.generate(&settings, &[item], None).unwrap().images;
    let preview = decode_b64(&events[0].1);
    assert_eq!(preview, by_taesd[0], "the first preview is TAESD's");
    assert_ne!(preview, decode_b64(&one_step["data"][0]), "not the VAE's");
}

/// The server looks at `--api-keys-file` every `keys_reload_interval` and uses it once it
/// changed: keys are added and removed without a signal or a restart, and a removed key's work
/// under way takes no more images: its running batch's lines fail with `api_key_removed`.
#[test]
fn a_changed_keys_file_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(&path, "sk-a name=team-a\nsk-b name=team-b\n").unwrap();
    let mut config = test_config();
    config.auth.keys_file = Some(path.clone());
    config.auth.keys_reload_interval = Duration::from_millis(100);
    config.batching.max_batch_size = 1;
    let s = TestServer::start_with(config, |p| Box::new(Slow(p)));
    let status = |key: &str| {
        s.client
            .post(s.url("/v1/images/generations"))
            .bearer_auth(key)
            .json(&json!({"prompt": "a"}))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(status("sk-a"), 200);
    assert_eq!(status("sk-c"), 401);
    // Polls until the server has taken the change (a fraction of a second in fact).
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(60), "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // team-b's batch of 60 lines (150 ms an image, two at a time) is under way...
    let g = "/v1/images/generations";
    let jsonl: Vec<String> = (0..60)
        .map(|i| batch_line(&format!("l{i}"), g, json!({"prompt": "b"})))
        .collect();
    let (code, file) = s.upload(Some("sk-b"), &jsonl.join("\n"));
    assert_eq!(code, 200, "{file}");
    let (code, batch) = s.call(
        "POST",
        "/v1/batches",
        Some("sk-b"),
        Some(json!({"input_file_id": file["id"], "endpoint": g, "completion_window": "24h"})),
    );
    assert_eq!(code, 200, "{batch}");
    let completed = "turbine_batch_api_requests_total{outcome=\"completed\"}";
    s.wait_metric(completed, |v| v >= 2.0);
    // ... when team-b's key goes and team-c's comes.
    std::fs::write(&path, "sk-a name=team-a\nsk-c name=team-c\n").unwrap();
    until("sk-c never worked", &|| status("sk-c") == 200);
    assert_eq!(status("sk-b"), 401);
    assert_eq!(status("sk-a"), 200);
    let m = s.metrics();
    assert!(
        m.contains("turbine_api_key_reloads_total{outcome=\"loaded\"} 1"),
        "{m}"
    );
    assert!(m.contains("turbine_api_keys 2"), "{m}");
    assert!(
        m.contains("turbine_key_images_total{key=\"team-c\"} 1"),
        "{m}"
    );
    s.wait_metric("turbine_batch_api_running", |v| v == 0.0);

    // The batch ended with the lines it ran, the rest failed. Its owner sees it again once
    // the key is back.
    std::fs::write(&path, "sk-b name=team-b\n").unwrap();
    until("sk-b never came back", &|| status("sk-b") == 200);
    let batch = s.wait_batch(Some("sk-b"), batch["id"].as_str().unwrap());
    assert_eq!(batch["status"], "completed", "{batch}");
    let counts = &batch["request_counts"];
    let (done, failed) = (
        counts["completed"].as_u64().unwrap(),
        counts["failed"].as_u64().unwrap(),
    );
    assert!(done >= 2 && failed >= 1 && done + failed == 60, "{batch}");
    let errors = s.file_lines(Some("sk-b"), batch["error_file_id"].as_str().unwrap());
    assert_eq!(errors.len() as u64, failed);
    for e in &errors {
        let body = &e["response"]["body"]["error"];
        assert_eq!(body["code"], "api_key_removed", "{e}");
        assert_eq!(e["response"]["status_code"], 401, "{e}");
    }
}

/// A `multipart/form-data` body by hand (text fields, then files), and its content type.
fn multipart(fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "turbine-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                 filename=\"input.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A base64 `data:` URL of PNG bytes, as OpenAI's JSON image references carry them.
fn data_url(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// An 80x48 input with structure in every channel.
fn edit_input() -> RgbImage {
    RgbImage::from_fn(80, 48, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    })
}

/// An OpenAI mask for `edit_input()`: a transparent rectangle (repaint) in an opaque frame.
fn edit_mask(w: u32, h: u32) -> Vec<u8> {
    let rgba = image::RgbaImage::from_fn(w, h, |x, y| {
        let inside = x >= w / 4 && x < 3 * w / 4 && y >= h / 4 && y < 3 * h / 4;
        image::Rgba([0, 0, 0, if inside { 0 } else { 255 }])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    rgba.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

impl TestServer {
    fn edit(&self, fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> (u16, String) {
        self.edit_as(None, fields, files)
    }

    /// [`TestServer::edit`] with `key` as the bearer token when given.
    fn edit_as(
        &self,
        key: Option<&str>,
        fields: &[(&str, &str)],
        files: &[(&str, &[u8])],
    ) -> (u16, String) {
        let (ct, body) = multipart(fields, files);
        let mut r = self
            .client
            .post(self.url("/v1/images/edits"))
            .header("content-type", ct)
            .body(body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        let r = r.send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    fn edit_ok(&self, fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> Value {
        let (status, text) = self.edit(fields, files);
        assert_eq!(status, 200, "{fields:?}: {text}");
        serde_json::from_str(&text).unwrap()
    }
}

/// `POST /v1/images/edits`: OpenAI's multipart form in, the generation response shape out, and
/// the images are the library's image-to-image of the same input, prompt, seed and strength.
#[test]
fn edits_take_a_multipart_image_and_match_the_pipeline() {
    use turbine::model::pipeline::InitImage;

    // With the edits' warm-up: the real pipeline's edit batches before /health turns 200.
    let mut config = test_config();
    config.warmup_edits = true;
    let s = TestServer::start(config);
    let png = png_bytes(&edit_input());
    let fields = [
        ("prompt", "the same scene in winter"),
        ("model", "gpt-image-1"),
        ("size", "64x64"),
        ("n", "2"),
        ("seed", "11"),
        ("input_fidelity", "high"),
    ];
    let resp = s.edit_ok(&fields, &[("image", &png)]);
    assert_eq!(resp["size"], "64x64");
    assert_eq!(resp["quality"], "low");
    let data = resp["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (data[0]["seed"].as_u64(), data[1]["seed"].as_u64()),
        (Some(11), Some(12))
    );
    // Usage: the input image counts as 8x8 patches per image made, like the output.
    let usage = &resp["usage"];
    assert_eq!(usage["output_tokens"], 128);
    assert_eq!(usage["input_tokens_details"]["image_tokens"], 128);
    let text = usage["input_tokens_details"]["text_tokens"]
        .as_u64()
        .unwrap();
    assert!(text > 2);
    assert_eq!(usage["input_tokens"].as_u64().unwrap(), 128 + text);

    // The library's edit: 1 step at the default strength 0.5 (diffusers' 2 steps at 0.5), of
    // the input resized by the server's own decoder.
    let init = InitImage::new(turbine::server::upload::decode(&png, 64, 64).unwrap());
    let settings = tiny_settings(true);
    let items: Vec<ImageRequest> = (11..13)
        .map(|seed| ImageRequest {
            prompt: "the same scene in winter".into(),
            negative_prompt: String::new(),
            seed,
            init_image: Some(init.clone()),
            partials: None,
        })
        .collect();
    let p = Pipeline::load(&model_dir(), &Device::Cpu, DType::F32).unwrap();
    let expected = p.generate(&settings, &items, None).unwrap().images;
    let got = images(&resp);
    assert_eq!(got[0], expected[0], "the served edit is the pipeline's");
    assert_eq!(got[1], expected[1]);

    // Another strength is another image (0.3: one step from timestep 249 of a 4-step schedule,
    // where 0.5 starts from 499 of 2), unless diffusers' schedule rounds it to the same one
    // (0.9: still one step from 499 of 2); a text-to-image of the prompt is another still.
    let with_strength = |strength: &str| {
        images(&s.edit_ok(
            &[
                ("prompt", "the same scene in winter"),
                ("size", "64x64"),
                ("seed", "11"),
                ("strength", strength),
            ],
            &[("image", &png)],
        ))
        .remove(0)
    };
    assert!(
        with_strength("0.3") != got[0],
        "strength 0.3 changed nothing"
    );
    assert!(
        with_strength("0.9") == got[0],
        "strength 0.9 is 0.5's schedule with one step"
    );
    let generated =
        s.generate_ok(&json!({"prompt": "the same scene in winter", "size": "64x64", "seed": 11}));
    assert!(
        images(&generated)[0] != got[0],
        "the edit ignored its image"
    );

    // With a mask: the library's inpainting of the same image and mask.
    let mask_png = edit_mask(80, 48);
    let masked = s.edit_ok(
        &[
            ("prompt", "the same scene in winter"),
            ("size", "64x64"),
            ("seed", "11"),
        ],
        &[("image", &png), ("mask", &mask_png)],
    );
    let mask = turbine::server::upload::decode_mask(&mask_png, (80, 48), 64, 64).unwrap();
    let masked_init = InitImage::with_mask(init.image().clone(), mask);
    let expected_masked = p
        .generate(
            &settings,
            &[ImageRequest {
                init_image: Some(masked_init),
                ..items[0].clone()
            }],
            None,
        )
        .unwrap()
        .images;
    assert!(
        images(&masked)[0] == expected_masked[0],
        "the served inpainting is the pipeline's"
    );
    assert!(images(&masked)[0] != got[0], "the mask changed nothing");

    // The same edits as OpenAI's JSON body, with base64 data URLs: the same images.
    let json_edit = |mask: Option<&[u8]>| {
        let mut body = json!({
            "prompt": "the same scene in winter",
            "size": "64x64",
            "seed": 11,
            "images": [{"image_url": data_url(&png)}],
        });
        if let Some(m) = mask {
            body["mask"] = json!({"image_url": data_url(m)});
        }
        let r = s
            .client
            .post(s.url("/v1/images/edits"))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        images(&r.json::<Value>().unwrap()).remove(0)
    };
    assert!(json_edit(None) == got[0], "a JSON edit is the form's");
    assert!(
        json_edit(Some(&mask_png)) == images(&masked)[0],
        "a JSON inpainting is the form's"
    );

    // No size: the input's aspect ratio at about --default-size's area (64x64 here), each side
    // at least --min-image-side: 80x48 → 80x64.
    let auto = s.edit_ok(&[("prompt", "winter"), ("seed", "3")], &[("image", &png)]);
    assert_eq!(auto["size"], "80x64");
    assert_eq!(images(&auto)[0].dimensions(), (80, 64));

    // Streamed: image_edit.completed events with the same images.
    let stream_edit = |fields: &[(&str, &str)]| {
        let mut all = vec![
            ("prompt", "the same scene in winter"),
            ("size", "64x64"),
            ("seed", "11"),
            ("stream", "true"),
        ];
        all.extend_from_slice(fields);
        let (ct, body) = multipart(&all, &[("image", &png)]);
        let r = s
            .client
            .post(s.url("/v1/images/edits"))
            .header("content-type", ct)
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        sse_events(&r.text().unwrap())
    };
    let events = stream_edit(&[("n", "2")]);
    assert_eq!(events.len(), 2, "{events:?}");
    for (name, e) in &events {
        assert_eq!(name, "image_edit.completed");
        assert_eq!(e["type"], "image_edit.completed");
        let i = (e["seed"].as_u64().unwrap() - 11) as usize;
        assert_eq!(decode_b64(e), got[i]);
        assert_eq!(e["usage"]["input_tokens_details"]["image_tokens"], 64);
    }
    // Two steps of an edit: one preview each, as image_edit.partial_image.
    let events = stream_edit(&[("steps", "2"), ("partial_images", "2")]);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["image_edit.partial_image", "image_edit.completed"]);
    assert_eq!(events[0].1["partial_image_index"], 0);
    assert_ne!(decode_b64(&events[0].1), decode_b64(&events[1].1));
    let m = s.metrics();
    assert_eq!(
        metric_in(
            &m,
            "turbine_http_requests_total{route=\"/v1/images/edits\",status=\"200\"}"
        ),
        9.0,
        "{m}"
    );
}

/// `image` as a PNG whose EXIF says to show it turned a quarter clockwise (orientation 6), as
/// a phone stores a portrait photo.
fn png_turned_a_quarter(image: &RgbImage) -> Vec<u8> {
    use image::ImageEncoder as _;
    // Little-endian TIFF, one IFD entry: Orientation (0x0112), SHORT, 1 value, 6.
    let mut tiff = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
    tiff.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
    let mut out = Vec::new();
    let mut e = image::codecs::png::PngEncoder::new(&mut out);
    e.set_exif_metadata(tiff).unwrap();
    e.write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

/// What OpenAI's newer clients send to edits: a photo with an EXIF orientation, a `markup`, a
/// GPT Image 2.5 model name, `quality: "xhigh"`, a `safety_identifier`.
#[test]
fn edits_read_photos_upright_and_lay_markups_over_them() {
    use turbine::model::pipeline::{edit_schedule, InitImage};
    let s = TestServer::start(test_config());
    let p = Pipeline::load(&model_dir(), &Device::Cpu, DType::F32).unwrap();
    let library = |init: InitImage, steps: usize, seed: u64, prompt: &str| {
        let (schedule, start) = edit_schedule(steps, 0.5).unwrap();
        let (w, h) = init.image().dimensions();
        let settings = GenerationSettings {
            width: w as usize,
            height: h as usize,
            steps: schedule,
            guidance_scale: 0.0,
            init_step: Some(start),
            adapter: None,
        };
        let item = ImageRequest {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seed,
            init_image: Some(init),
            partials: None,
        };
        p.generate(&settings, &[item], None)
            .unwrap()
            .images
            .remove(0)
    };

    // Stored 80x48 and tagged to be shown turned: the server edits the upright 48x80 image,
    // so the automatic size is portrait (64x80 at the default area, sides at least 64).
    let turned = png_turned_a_quarter(&edit_input());
    let resp = s.edit_ok(
        &[("prompt", "winter"), ("seed", "5")],
        &[("image", &turned)],
    );
    assert_eq!(resp["size"], "64x80");
    let upright = image::imageops::rotate90(&edit_input());
    let expected = library(
        InitImage::new(image::imageops::resize(
            &upright,
            64,
            80,
            image::imageops::FilterType::Lanczos3,
        )),
        1,
        5,
        "winter",
    );
    assert!(images(&resp)[0] == expected, "not the upright image's edit");

    // A markup: a red bar drawn over the image (transparent elsewhere) guides the edit. The
    // served image is the library's edit of the composite, not of the bare image.
    let png = png_bytes(&edit_input());
    let markup = image::RgbaImage::from_fn(80, 48, |x, _| {
        image::Rgba([255, 0, 0, if (30..50).contains(&x) { 255 } else { 0 }])
    });
    let mut markup_png = std::io::Cursor::new(Vec::new());
    markup
        .write_to(&mut markup_png, image::ImageFormat::Png)
        .unwrap();
    let markup_png = markup_png.into_inner();
    let fields = [
        ("prompt", "winter"),
        ("size", "64x64"),
        ("seed", "9"),
        ("model", "gpt-image-2.5-flare"),
        ("quality", "xhigh"),
        ("safety_identifier", "user-1234"),
    ];
    let marked = s.edit_ok(&fields, &[("image", &png), ("markup", &markup_png)]);
    assert_eq!(marked["quality"], "xhigh");
    assert_eq!(marked["safety_identifier"], "user-1234");
    let composite = turbine::server::upload::overlay(&png, &markup_png, (80, 48)).unwrap();
    assert_eq!(composite.get_pixel(40, 10).0, [255, 0, 0]);
    assert_eq!(composite.get_pixel(10, 10), edit_input().get_pixel(10, 10));
    let resized =
        image::imageops::resize(&composite, 64, 64, image::imageops::FilterType::Lanczos3);
    // xhigh: 6 steps, of a 12-step schedule at strength 0.5.
    let expected = library(InitImage::new(resized), 6, 9, "winter");
    assert!(images(&marked)[0] == expected, "not the composite's edit");
    let plain = s.edit_ok(&fields, &[("image", &png)]);
    assert!(
        images(&plain)[0] != images(&marked)[0],
        "the markup changed nothing"
    );
    assert!(plain.get("safety_identifier").is_some());

    // The same markup in OpenAI's JSON edit.
    let r = s
        .client
        .post(s.url("/v1/images/edits"))
        .json(&json!({
            "prompt": "winter", "size": "64x64", "seed": 9, "quality": "xhigh",
            "images": [{"image_url": data_url(&png)}],
            "markup": {"image_url": data_url(&markup_png)},
        }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert!(images(&v)[0] == expected, "a JSON markup is the form's");
    assert!(v.get("safety_identifier").is_none(), "none was given");

    // More edits at once than the decoder has slots: every one is served, and is the image it
    // is alone.
    let k = 2 * turbine::server::UPLOAD_DECODE_SLOTS;
    let edit_seed = |seed: usize| {
        let seed = seed.to_string();
        images(&s.edit_ok(
            &[("prompt", "winter"), ("size", "64x64"), ("seed", &seed)],
            &[("image", &turned)],
        ))
        .remove(0)
    };
    let together: Vec<RgbImage> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..k)
            .map(|i| scope.spawn(move || edit_seed(100 + i)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, image) in together.iter().enumerate() {
        assert!(*image == edit_seed(100 + i), "edit {i} of {k}");
    }
}

/// Edits waiting in the queue do not hold the upload decoder's slots: behind a busy worker, more
/// edits than it has slots are all decoded and queued at once.
#[test]
fn queued_edits_do_not_hold_the_upload_decoder() {
    let (s, blocker_thread) = server_busy_with_a_blocker();
    let k = 2 * turbine::server::UPLOAD_DECODE_SLOTS;
    let png = png_bytes(&edit_input());
    let edits: Vec<_> = (0..k)
        .map(|i| {
            let (s, png) = (s.clone(), png.clone());
            std::thread::spawn(move || {
                let seed = i.to_string();
                s.edit_ok(
                    &[("prompt", "winter"), ("size", "64x64"), ("seed", &seed)],
                    &[("image", &png)],
                )
            })
        })
        .collect();
    s.wait_metric("turbine_images_enqueued_total", |v| v >= (6 + k) as f64);
    // Were the slots held until an edit's images were made, the last edits would only be
    // queued after the blocker's 6 images and the first edits' had been generated.
    let generated = s.metric("turbine_images_generated_total");
    assert!(
        generated < (6 + turbine::server::UPLOAD_DECODE_SLOTS) as f64,
        "{generated} images were made before every edit was queued"
    );
    for e in edits {
        assert_eq!(e.join().unwrap()["data"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        blocker_thread.join().unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
}

/// (what, text fields, files, status, param).
type BadEdit = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    Vec<(&'static str, Vec<u8>)>,
    u16,
    Option<&'static str>,
);

/// Bad edits get OpenAI's error shape with the field at fault, and the server keeps serving.
#[test]
fn malformed_edits_get_the_right_status() {
    let mut config = test_config();
    config.limits.max_upload_bytes = 64 << 10;
    let s = TestServer::start(config);
    let png = png_bytes(&edit_input());
    let prompt = [("prompt", "winter")];
    let cases: Vec<BadEdit> = vec![
        ("no image", prompt.to_vec(), vec![], 400, Some("image")),
        (
            "no prompt",
            vec![],
            vec![("image", png.clone())],
            400,
            Some("prompt"),
        ),
        (
            "two images",
            prompt.to_vec(),
            vec![("image[]", png.clone()), ("image[]", png.clone())],
            400,
            Some("image"),
        ),
        (
            "a mask without alpha",
            prompt.to_vec(),
            vec![("image", png.clone()), ("mask", png.clone())],
            400,
            Some("mask"),
        ),
        (
            "a mask of another size",
            prompt.to_vec(),
            vec![("image", png.clone()), ("mask", edit_mask(40, 24))],
            400,
            Some("mask"),
        ),
        (
            "two masks",
            prompt.to_vec(),
            vec![
                ("image", png.clone()),
                ("mask", edit_mask(80, 48)),
                ("mask", edit_mask(80, 48)),
            ],
            400,
            Some("mask"),
        ),
        (
            "not an image",
            prompt.to_vec(),
            vec![("image", b"GIF89a, or so it says".to_vec())],
            400,
            Some("image"),
        ),
        (
            "strength out of range",
            vec![("prompt", "winter"), ("strength", "1.5")],
            vec![("image", png.clone())],
            400,
            Some("strength"),
        ),
        (
            "a generation-only field",
            vec![("prompt", "winter"), ("style", "vivid")],
            vec![("image", png.clone())],
            400,
            Some("style"),
        ),
        (
            "n as words",
            vec![("prompt", "winter"), ("n", "two")],
            vec![("image", png.clone())],
            400,
            Some("n"),
        ),
        (
            "a field twice",
            vec![("prompt", "winter"), ("prompt", "summer")],
            vec![("image", png.clone())],
            400,
            Some("prompt"),
        ),
        (
            "a markup and a mask",
            prompt.to_vec(),
            vec![
                ("image", png.clone()),
                ("mask", edit_mask(80, 48)),
                ("markup", edit_mask(80, 48)),
            ],
            400,
            Some("markup"),
        ),
        (
            "a markup without alpha",
            prompt.to_vec(),
            vec![("image", png.clone()), ("markup", png.clone())],
            400,
            Some("markup"),
        ),
        (
            "a markup of another size",
            prompt.to_vec(),
            vec![("image", png.clone()), ("markup", edit_mask(40, 24))],
            400,
            Some("markup"),
        ),
        (
            "an upload over --max-upload-bytes",
            prompt.to_vec(),
            vec![("image", vec![7u8; 100 << 10])],
            413,
            None,
        ),
    ];
    for (what, fields, files, status, param) in cases {
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let (got, body) = s.edit(&fields, &files);
        assert_openai_error(got, &body, status, param, what);
    }
    // A field name too long to echo back.
    let long = "x".repeat(5000);
    let (got, body) = s.edit(
        &[("prompt", "winter"), (long.as_str(), "1")],
        &[("image", &png)],
    );
    assert_openai_error(got, &body, 400, Some("body"), "a very long field name");
    assert!(!body.contains(&long[..100]), "the name was echoed");
    // Another file field than image and mask.
    let (got, body) = s.edit(&prompt, &[("image", &png), ("file", &png)]);
    assert_openai_error(got, &body, 400, Some("file"), "a file named file");
    // A form cut off before its closing boundary.
    let (ct, full) = multipart(&prompt, &[("image", &png)]);
    let r = s
        .client
        .post(s.url("/v1/images/edits"))
        .header("content-type", ct)
        .body(full[..full.len() - 30].to_vec())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().unwrap();
    assert_openai_error(status, &body, 400, Some("body"), "a truncated form");
    // OpenAI's JSON edit: image references that are not base64 data URLs, or none.
    let post_json = |body: Value| {
        let r = s
            .client
            .post(s.url("/v1/images/edits"))
            .json(&body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    for (what, body, param) in [
        ("json without images", json!({"prompt": "winter"}), "images"),
        (
            "json with a web URL",
            json!({"prompt": "winter", "images": [{"image_url": "https://example.com/a.png"}]}),
            "images",
        ),
        (
            "json with an unknown file id",
            json!({"prompt": "winter", "images": [{"file_id": "file-1"}]}),
            "images",
        ),
        (
            "json with a bad mask",
            json!({"prompt": "winter", "images": [{"image_url": data_url(&png)}],
                   "mask": {"image_url": "data:image/png;base64,!!"}}),
            "mask",
        ),
        (
            "json with a form field's type",
            json!({"prompt": "winter", "images": [{"image_url": data_url(&png)}], "n": "2"}),
            "n",
        ),
    ] {
        let (status, body) = post_json(body);
        assert_openai_error(status, &body, 400, Some(param), what);
    }
    // Neither a form nor JSON.
    let r = s
        .client
        .post(s.url("/v1/images/edits"))
        .header("content-type", "text/plain")
        .body("winter")
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().unwrap();
    let v = assert_openai_error(status, &body, 415, None, "text to edits");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("multipart/form-data") && message.contains("application/json"),
        "{body}"
    );
    // Still serving.
    let ok = s.edit_ok(
        &[("prompt", "winter"), ("size", "64x64")],
        &[("image", &png)],
    );
    assert_eq!(images(&ok)[0].dimensions(), (64, 64));
}

// --- The Batch API: /v1/files and /v1/batches ---

impl TestServer {
    /// `POST /v1/files` with purpose batch, as `key` (none: no Authorization header).
    fn upload(&self, key: Option<&str>, jsonl: &str) -> (u16, Value) {
        self.upload_as(key, "batch", jsonl.as_bytes())
    }

    fn upload_as(&self, key: Option<&str>, purpose: &str, bytes: &[u8]) -> (u16, Value) {
        let (ct, body) = multipart(&[("purpose", purpose)], &[("file", bytes)]);
        let mut r = self
            .client
            .post(self.url("/v1/files"))
            .header("content-type", ct)
            .body(body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self.client.request(method.parse().unwrap(), self.url(path));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        if let Some(body) = body {
            r = r.json(&body);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    fn file_lines(&self, key: Option<&str>, id: &str) -> Vec<Value> {
        let mut r = self
            .client
            .get(self.url(&format!("/v1/files/{id}/content")));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        let r = r.send().unwrap();
        assert_eq!(r.status(), 200);
        r.text()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Creates a batch over `jsonl` and polls it until it ends (a hang guard, not a timing check).
    fn run_batch(&self, key: Option<&str>, endpoint: &str, jsonl: &str) -> Value {
        let (status, file) = self.upload(key, jsonl);
        assert_eq!(status, 200, "{file}");
        let (status, batch) = self.call(
            "POST",
            "/v1/batches",
            key,
            Some(json!({"input_file_id": file["id"], "endpoint": endpoint,
                        "completion_window": "24h", "metadata": {"job": "test"}})),
        );
        assert_eq!(status, 200, "{batch}");
        assert_eq!(batch["status"], "validating");
        self.wait_batch(key, batch["id"].as_str().unwrap())
    }

    fn wait_batch(&self, key: Option<&str>, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let (status, batch) = self.call("GET", &format!("/v1/batches/{id}"), key, None);
            assert_eq!(status, 200, "{batch}");
            if ["completed", "failed", "cancelled", "expired"]
                .contains(&batch["status"].as_str().unwrap())
            {
                return batch;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "batch never ended: {batch}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Keys named in the keys file (`name=`) label their requests and images in `/metrics`: direct
/// generations, streams, edits and the Batch API's lines count as images of the key; requests
/// by final status, a rate limit's 429 included; an unnamed key under `key-` and a fingerprint,
/// and a request with no valid key under none.
#[test]
fn usage_is_counted_per_key() {
    let mut config = test_config();
    let keys =
        "sk-a1 name=team-a\nsk-a2 name=team-a\nsk-b name=team-b requests_per_minute=2\nsk-anon\n";
    config.auth.keys = turbine::server::auth::parse_keys(keys).unwrap();
    let s = TestServer::start(config);
    let post = |key: &str, body: Value| {
        s.client
            .post(s.url("/v1/images/generations"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap()
    };
    // team-a, with either of its keys: 2 + 1 images, a stream of 2, an edit of 1.
    assert_eq!(post("sk-a1", json!({"prompt": "a", "n": 2})).status(), 200);
    assert_eq!(post("sk-a2", json!({"prompt": "a"})).status(), 200);
    let r = post("sk-a1", json!({"prompt": "a", "n": 2, "stream": true}));
    assert_eq!(r.status(), 200);
    assert_eq!(sse_events(&r.text().unwrap()).len(), 2);
    let (status, _) = s.edit_as(
        Some("sk-a2"),
        &[("prompt", "a cat"), ("size", "64x64")],
        &[("image", &png_bytes(&edit_input()))],
    );
    assert_eq!(status, 200);
    // team-b: a 200, a 400 (validated after the key), then its limit of 2 requests a minute.
    assert_eq!(post("sk-b", json!({"prompt": "b"})).status(), 200);
    assert_eq!(post("sk-b", json!({"prompt": "b", "n": 11})).status(), 400);
    assert_eq!(post("sk-b", json!({"prompt": "b"})).status(), 429);
    // No valid key: counted nowhere by key.
    assert_eq!(post("sk-nobody", json!({"prompt": "c"})).status(), 401);
    // The unnamed key, through the Batch API: its two lines' three images.
    let g = "/v1/images/generations";
    let jsonl = [
        batch_line("one", g, json!({"prompt": "d", "n": 2})),
        batch_line("two", g, json!({"prompt": "e"})),
    ]
    .join("\n");
    let batch = s.run_batch(Some("sk-anon"), g, &jsonl);
    assert_eq!(batch["status"], "completed", "{batch}");

    let anon = {
        use sha2::Digest;
        format!(
            "key-{}",
            hex::encode(&sha2::Sha256::digest(b"sk-anon")[..4])
        )
    };
    let m = s.metrics();
    let images = |key: &str| metric_in(&m, &format!("turbine_key_images_total{{key=\"{key}\"}}"));
    let requests = |key: &str, status: u16| {
        metric_in(
            &m,
            &format!("turbine_key_requests_total{{key=\"{key}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(images("team-a"), 6.0, "{m}");
    assert_eq!(images("team-b"), 1.0, "{m}");
    assert_eq!(images(&anon), 3.0, "{m}");
    assert_eq!(requests("team-a", 200), 4.0, "{m}");
    assert_eq!(requests("team-b", 200), 1.0, "{m}");
    assert_eq!(requests("team-b", 400), 1.0, "{m}");
    assert_eq!(requests("team-b", 429), 1.0, "{m}");
    // The unnamed key's upload, batch creation and polls are requests of its own.
    assert!(requests(&anon, 200) >= 3.0, "{m}");
    assert!(!m.contains("sk-"), "a key in the metrics");
    assert!(!m.contains("turbine_key_requests_total{key=\"\""), "{m}");
}

fn batch_line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

/// The results of a batch by custom_id: (status code, body) from the output and error files.
fn results_by_id(lines: &[Value]) -> std::collections::HashMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

impl TestServer {
    /// `POST /v1/uploads/{upload}/parts` with `data` as the part, as `key`.
    fn upload_part(&self, key: &str, upload: &Value, data: &[u8]) -> (u16, Value) {
        let (ct, body) = multipart(&[], &[("data", data)]);
        let path = format!("/v1/uploads/{}/parts", upload["id"].as_str().unwrap());
        let r = self
            .client
            .post(self.url(&path))
            .bearer_auth(key)
            .header("content-type", ct)
            .body(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }
}

/// The Uploads API: a file sent in parts, in any order, becomes a File once completed (the
/// parts joined in the order named, their MD5 checked), which a batch then runs. Another key
/// sees none of it; a completed or cancelled upload takes nothing more; parts that do not add
/// up, and announcements the server cannot take, are refused in OpenAI's error shape.
#[test]
fn an_upload_in_parts_becomes_a_file_a_batch_runs() {
    use md5::Digest as _;
    let mut config = test_config();
    config.auth.keys = turbine::server::auth::parse_keys("sk-a\nsk-b\n").unwrap();
    config.files.max_file_bytes = 100_000;
    let s = TestServer::start(config);
    let g = "/v1/images/generations";
    let jsonl = [
        batch_line("one", g, json!({"prompt": "a red fox", "seed": 5})),
        batch_line("two", g, json!({"prompt": "a boat", "seed": 6})),
        batch_line("three", g, json!({"prompt": "a lighthouse", "seed": 7})),
    ]
    .join("\n");
    let bytes = jsonl.as_bytes();
    let n = bytes.len();
    let (status, upload) = s.call(
        "POST",
        "/v1/uploads",
        Some("sk-a"),
        Some(
            json!({"bytes": n, "filename": "jobs.jsonl", "mime_type": "text/jsonl",
                    "purpose": "batch"}),
        ),
    );
    assert_eq!(status, 200, "{upload}");
    assert_eq!(upload["object"], "upload");
    assert_eq!(upload["status"], "pending");
    assert_eq!(upload["bytes"], n);
    assert_eq!(upload["file"], Value::Null);
    assert!(upload["id"].as_str().unwrap().starts_with("upload_"));
    assert_eq!(
        upload["expires_at"].as_u64().unwrap(),
        upload["created_at"].as_u64().unwrap() + 3600
    );
    let id = upload["id"].as_str().unwrap().to_string();

    // The parts arrive out of order.
    let pieces = [&bytes[..10], &bytes[10..n / 2], &bytes[n / 2..]];
    let mut part_ids = vec![String::new(); 3];
    for i in [2, 0, 1] {
        let (status, part) = s.upload_part("sk-a", &upload, pieces[i]);
        assert_eq!(status, 200, "{part}");
        assert_eq!(part["object"], "upload.part");
        assert_eq!(part["upload_id"], id.as_str());
        part_ids[i] = part["id"].as_str().unwrap().to_string();
    }
    // Another key: no such upload.
    let (status, _) = s.upload_part("sk-b", &upload, b"x");
    assert_eq!(status, 404);
    let complete = |key: &str, body: Value| {
        s.call(
            "POST",
            &format!("/v1/uploads/{id}/complete"),
            Some(key),
            Some(body),
        )
    };
    let (status, _) = complete("sk-b", json!({"part_ids": part_ids}));
    assert_eq!(status, 404);

    // Refused completions leave the upload as it was.
    let refused = |body: Value, param: &str| {
        let (status, v) = complete("sk-a", body);
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    };
    refused(json!({"part_ids": &part_ids[..2]}), "part_ids");
    refused(
        json!({"part_ids": [&part_ids[0], &part_ids[0], &part_ids[2]]}),
        "part_ids",
    );
    refused(json!({"part_ids": ["part_nope"]}), "part_ids");
    refused(json!({"part_ids": "part_nope"}), "part_ids");
    refused(json!({}), "part_ids");
    refused(
        json!({"part_ids": part_ids, "md5": "0123456789abcdef0123456789abcdef"}),
        "md5",
    );
    let md5 = hex::encode(md5::Md5::digest(bytes));
    let (status, done) = complete("sk-a", json!({"part_ids": part_ids, "md5": md5}));
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["status"], "completed");
    let file = &done["file"];
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["bytes"], n);
    assert_eq!(file["filename"], "jobs.jsonl");
    let file_id = file["id"].as_str().unwrap();
    let r = s
        .client
        .get(s.url(&format!("/v1/files/{file_id}/content")))
        .bearer_auth("sk-a")
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), jsonl);
    let (status, _) = s.call("GET", &format!("/v1/files/{file_id}"), Some("sk-b"), None);
    assert_eq!(status, 404);

    // Completed: no part, completion or cancel more.
    let (status, v) = s.upload_part("sk-a", &upload, b"x");
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_upload_state");
    let (status, _) = complete("sk-a", json!({"part_ids": part_ids}));
    assert_eq!(status, 400);
    let (status, _) = s.call(
        "POST",
        &format!("/v1/uploads/{id}/cancel"),
        Some("sk-a"),
        None,
    );
    assert_eq!(status, 400);

    // The File is a batch's input like any uploaded file.
    let (status, batch) = s.call(
        "POST",
        "/v1/batches",
        Some("sk-a"),
        Some(json!({"input_file_id": file_id, "endpoint": g, "completion_window": "24h"})),
    );
    assert_eq!(status, 200, "{batch}");
    let batch = s.wait_batch(Some("sk-a"), batch["id"].as_str().unwrap());
    assert_eq!(
        batch["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );

    // Cancelled: its parts go, and it takes nothing more; cancelling again says so again.
    let (_, other) = s.call(
        "POST",
        "/v1/uploads",
        Some("sk-a"),
        Some(
            json!({"bytes": 5, "filename": "a.png", "mime_type": "image/png",
                    "purpose": "vision"}),
        ),
    );
    // A part larger than the upload announced is refused.
    let (status, v) = s.upload_part("sk-a", &other, b"123456");
    assert_eq!((status, &v["error"]["param"]), (400, &json!("data")), "{v}");
    let (status, part) = s.upload_part("sk-a", &other, b"12");
    assert_eq!(status, 200, "{part}");
    let cancel = format!("/v1/uploads/{}/cancel", other["id"].as_str().unwrap());
    for _ in 0..2 {
        let (status, v) = s.call("POST", &cancel, Some("sk-a"), None);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["status"], "cancelled");
    }
    let (status, _) = s.upload_part("sk-a", &other, b"345");
    assert_eq!(status, 400);

    // Announcements the server cannot take.
    let create = |body: Value, param: &str, code: &str| {
        let (status, v) = s.call("POST", "/v1/uploads", Some("sk-a"), Some(body));
        assert_eq!(status, 400, "{v}");
        assert_eq!(
            (&v["error"]["param"], &v["error"]["code"]),
            (&json!(param), &json!(code)),
            "{v}"
        );
    };
    let ok = json!({"bytes": 10, "filename": "f.jsonl", "mime_type": "application/jsonl",
                    "purpose": "batch"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    create(with("bytes", json!(0)), "bytes", "invalid_value");
    create(with("bytes", json!(100_001)), "bytes", "invalid_value");
    create(with("bytes", json!("10")), "bytes", "invalid_value");
    create(
        with("purpose", json!("fine-tune")),
        "purpose",
        "invalid_value",
    );
    create(
        with("mime_type", json!("image/png")),
        "mime_type",
        "invalid_value",
    );
    create(with("filename", json!("")), "filename", "invalid_value");
    create(with("color", json!("red")), "color", "unknown_parameter");
    let mut missing = ok.clone();
    missing.as_object_mut().unwrap().remove("filename");
    create(missing, "filename", "missing_required_parameter");
    let (status, v) = s.call("POST", "/v1/uploads", None, Some(ok.clone()));
    assert_eq!(status, 401, "{v}");
    let (status, v) = s.call(
        "POST",
        "/v1/uploads/upload_nope/complete",
        Some("sk-a"),
        Some(json!({"part_ids": []})),
    );
    assert_eq!(status, 404, "{v}");
}

/// `--min-free-disk-bytes`: an upload that would leave less free space on the files
/// directory's disk is refused with 507 `insufficient_storage` in OpenAI's error shape, before
/// anything is written, and with `x-should-retry: false`: here the server keeps more free than
/// any disk has.
#[test]
fn uploads_that_would_fill_the_disk_are_refused_with_507() {
    let mut config = test_config();
    config.files.min_free_bytes = u64::MAX / 4;
    let s = TestServer::start(config);
    let (status, v) = s.upload(None, "{}");
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_storage", "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("nearly full") && message.contains("DELETE /v1/files/{id}"),
        "{message}"
    );
    let r = s
        .client
        .post(s.url("/v1/uploads"))
        .json(
            &json!({"bytes": 10, "filename": "f.jsonl", "mime_type": "text/jsonl",
                      "purpose": "batch"}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 507);
    // The SDKs retry a 5xx unless told not to: a retry would find the disk as full.
    assert_eq!(r.headers()["x-should-retry"], "false");
    let (status, v) = s.call("GET", "/v1/files", None, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"], json!([]), "nothing was stored");
    assert_eq!(
        metric_in(&s.metrics(), "turbine_errors_total{type=\"storage_full\"}"),
        2.0
    );
}

/// A temporary directory that cannot be written (a container's read-only root filesystem with
/// nothing mounted at /tmp; here TMPDIR names a file, which no one, root included, can make a
/// directory in) no longer stops the server: it warns, serves images, and the routes that need
/// the files directory answer 503 `files_unavailable` with `x-should-retry: false`, after the
/// key. Before, it exited 1 at start. A files directory with less free space than
/// `--min-free-disk-bytes` (a small tmpfs) is warned about at start, as every upload will be
/// refused. An unusable `--files-dir`, asked for, still stops it.
#[test]
fn a_temporary_directory_that_cannot_be_written_leaves_images_served() {
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let tmpdir = not_a_dir.path().as_os_str();
    let p = ServerProcess::start_with(&["--api-key", "sk-a"], &[("TMPDIR", tmpdir)]);
    let warned = p.wait_for_log(0, "the temporary directory cannot be written");
    let line = p.log.lock().unwrap()[warned - 1].clone();
    assert!(
        line.contains("--files-dir") && !line.contains("(--files-dir)"),
        "{line}"
    );
    let client = Client::new();
    let r = client
        .post(format!("{}/v1/images/generations", p.base))
        .bearer_auth("sk-a")
        .json(&json!({"prompt": "a fox", "size": "64x64"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/v1/webhook_event_types", p.base))
        .bearer_auth("sk-a")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "a fixed list, no directory needed");
    for (method, path) in [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files/file-abc/content"),
        ("POST", "/v1/uploads"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches/batch_abc"),
        ("GET", "/v1/webhook_endpoints"),
        ("POST", "/v1/webhook_endpoints/we_abc/test"),
    ] {
        let url = format!("{}{path}", p.base);
        let r = client
            .request(method.parse().unwrap(), &url)
            .send()
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path}: the key first");
        let r = client
            .request(method.parse().unwrap(), &url)
            .bearer_auth("sk-a")
            .json(&json!({}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 503, "{method} {path}");
        assert_eq!(r.headers()["x-should-retry"], "false");
        let v: Value = r.json().unwrap();
        assert_eq!(v["error"]["code"], "files_unavailable", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--files-dir"),
            "{v}"
        );
    }
    assert_eq!(
        metric_in(
            &client
                .get(format!("{}/metrics", p.base))
                .send()
                .unwrap()
                .text()
                .unwrap(),
            "turbine_errors_total{type=\"files_unavailable\"}"
        ),
        8.0
    );
    drop(p);

    // A filesystem with less free space than --min-free-disk-bytes (a small tmpfs at /tmp)
    // refuses every upload: the start says so.
    let p = ServerProcess::start(&["--min-free-disk-bytes", "1000000000000000000"]);
    let warned = p.wait_for_log(0, "less free space than --min-free-disk-bytes");
    let line = p.log.lock().unwrap()[warned - 1].clone();
    assert!(line.contains("every upload is refused"), "{line}");
    drop(p);

    // Asked for by name, a files directory that cannot be made stops the server.
    let dir = not_a_dir.path().join("files");
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["serve", "--model-dir"])
        .arg(model_dir())
        .args(["--device", "cpu", "--host", "127.0.0.1", "--port", "0"])
        .arg("--files-dir")
        .arg(&dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot make the files directory") && stderr.contains("(--files-dir)"),
        "{stderr}"
    );
}

#[test]
fn a_batch_of_generations_makes_the_same_images_as_direct_requests() {
    let s = TestServer::start(test_config());
    let g = "/v1/images/generations";
    let jsonl = [
        batch_line("fox", g, json!({"prompt": "a red fox", "seed": 5, "n": 2})),
        batch_line("bad-size", g, json!({"prompt": "x", "size": "13x13"})),
        batch_line(
            "boat",
            g,
            json!({"model": "gpt-image-1", "prompt": "a boat", "seed": 9,
                                     "output_format": "jpeg"}),
        ),
        batch_line("streamed", g, json!({"prompt": "x", "stream": true})),
        batch_line(
            "as-url",
            g,
            json!({"prompt": "x", "response_format": "url"}),
        ),
    ]
    .join("\n");
    let batch = s.run_batch(None, g, &jsonl);
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["endpoint"], g);
    assert_eq!(batch["metadata"], json!({"job": "test"}));
    assert_eq!(
        batch["request_counts"],
        json!({"total": 5, "completed": 2, "failed": 3})
    );
    for t in [
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "expires_at",
    ] {
        assert!(batch[t].as_u64().is_some(), "{t}: {batch}");
    }
    // Three images of 64x64: 64 output tokens each.
    assert_eq!(batch["usage"]["output_tokens"], 3 * 64);
    assert!(batch["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let m = s.metrics();
    for (outcome, n) in [("completed", 2.0), ("failed", 3.0), ("not_run", 0.0)] {
        let series = format!("turbine_batch_api_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric_in(&m, &series), n, "{series}");
    }
    s.wait_metric("turbine_batch_api_running", |v| v == 0.0);
    let output = s.file_lines(None, batch["output_file_id"].as_str().unwrap());
    let errors = s.file_lines(None, batch["error_file_id"].as_str().unwrap());
    let (output, errors) = (results_by_id(&output), results_by_id(&errors));
    assert_eq!(output.len(), 2);
    assert_eq!(errors.len(), 3);
    for (id, body) in [
        ("fox", json!({"prompt": "a red fox", "seed": 5, "n": 2})),
        (
            "boat",
            json!({"prompt": "a boat", "seed": 9, "output_format": "jpeg"}),
        ),
    ] {
        let line = &output[id];
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(line["error"].is_null());
        assert_eq!(line["response"]["status_code"], 200);
        let got = &line["response"]["body"];
        let direct = s.generate_ok(&body);
        assert_eq!(
            got["data"].as_array().unwrap().len(),
            direct["data"].as_array().unwrap().len()
        );
        assert_eq!(got["output_format"], direct["output_format"]);
        // The same seeds, the same pictures (the batch ran them at low priority, in other
        // batches of the device).
        for (a, b) in got["data"]
            .as_array()
            .unwrap()
            .iter()
            .zip(direct["data"].as_array().unwrap())
        {
            assert_eq!(a["seed"], b["seed"]);
            assert!(decode_b64(a) == decode_b64(b), "{id}: the images differ");
        }
    }
    let bad = &errors["bad-size"]["response"];
    assert_eq!(bad["status_code"], 400);
    assert_eq!(bad["body"]["error"]["param"], "size");
    for (id, param) in [("streamed", "stream"), ("as-url", "response_format")] {
        let response = &errors[id]["response"];
        assert_eq!(response["status_code"], 400);
        assert_eq!(response["body"]["error"]["param"], param);
    }

    // The files: input, output and error, newest first; the output is batch_output.
    let (_, list) = s.call("GET", "/v1/files", None, None);
    let purposes: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["purpose"].as_str().unwrap())
        .collect();
    assert_eq!(purposes, ["batch_output", "batch_output", "batch"]);
    let (_, list) = s.call("GET", "/v1/batches?limit=1", None, None);
    assert_eq!(list["data"][0]["id"], batch["id"]);
    assert_eq!(list["has_more"], false);

    // Deleted, a file is gone; the batch keeps naming it, as at OpenAI.
    let out_id = batch["output_file_id"].as_str().unwrap();
    let (status, deleted) = s.call("DELETE", &format!("/v1/files/{out_id}"), None, None);
    assert_eq!((status, &deleted["deleted"]), (200, &json!(true)));
    let (status, e) = s.call("GET", &format!("/v1/files/{out_id}/content"), None, None);
    assert_openai_error(status, &e.to_string(), 404, None, "batch API");
}

#[test]
fn a_batch_of_edits_edits_like_a_direct_request() {
    let s = TestServer::start(test_config());
    let e = "/v1/images/edits";
    let png = png_bytes(&edit_input());
    let body = json!({"prompt": "the same scene at dusk", "images": [{"image_url": data_url(&png)}],
                      "seed": 3, "strength": 0.6, "size": "64x64"});
    // The same image uploaded once and named by file_id, as bulk edits would.
    let (status, photo) = s.upload_as(None, "vision", &png);
    assert_eq!(status, 200, "{photo}");
    assert_eq!(photo["purpose"], "vision");
    let mut by_id = body.clone();
    by_id["images"] = json!([{"file_id": photo["id"]}]);
    let jsonl = [
        batch_line("dusk", e, body.clone()),
        batch_line("dusk-by-id", e, by_id.clone()),
        batch_line("no-image", e, json!({"prompt": "x"})),
    ]
    .join("\n");
    let batch = s.run_batch(None, e, &jsonl);
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1})
    );
    let output = results_by_id(&s.file_lines(None, batch["output_file_id"].as_str().unwrap()));
    let direct = |body: &Value| -> Value {
        let r = s
            .client
            .post(s.url("/v1/images/edits"))
            .json(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().unwrap()
    };
    let want = decode_b64(&direct(&body)["data"][0]);
    assert!(
        decode_b64(&direct(&by_id)["data"][0]) == want,
        "an edit of a file by id differs from the same edit with the image inline"
    );
    for id in ["dusk", "dusk-by-id"] {
        assert!(
            decode_b64(&output[id]["response"]["body"]["data"][0]) == want,
            "{id}: the batch's edit differs from the same edit sent directly"
        );
    }
    let errors = s.file_lines(None, batch["error_file_id"].as_str().unwrap());
    assert_eq!(errors[0]["response"]["body"]["error"]["param"], "images");
}

/// A `file_id` must name an image file (purpose vision or user_data) of the caller's key.
#[test]
fn edits_name_only_their_own_image_files_by_id() {
    let mut config = test_config();
    config.auth.keys = vec![ApiKey::plain("sk-a"), ApiKey::plain("sk-b")];
    let s = TestServer::start(config);
    let png = png_bytes(&edit_input());
    let (_, photo) = s.upload_as(Some("sk-a"), "user_data", &png);
    let (_, jsonl) = s.upload(Some("sk-a"), "{}");
    let edit = |key: &str, reference: Value| {
        let r = s
            .client
            .post(s.url("/v1/images/edits"))
            .bearer_auth(key)
            .json(&json!({"prompt": "p", "images": [reference], "size": "64x64"}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (status, text) = edit("sk-a", json!({"file_id": photo["id"]}));
    assert_eq!(status, 200, "{text}");
    for (key, reference, why) in [
        ("sk-b", json!({"file_id": photo["id"]}), "No such File"),
        ("sk-a", json!({"file_id": jsonl["id"]}), "purpose batch"),
        ("sk-a", json!({"file_id": "file-none"}), "No such File"),
    ] {
        let (status, text) = edit(key, reference);
        assert_openai_error(status, &text, 400, Some("images"), why);
        assert!(text.contains(why), "{text}");
    }
}

#[test]
fn invalid_batches_and_files_are_refused_with_the_lines_at_fault() {
    let mut config = test_config();
    config.auth.keys = vec![ApiKey::plain("sk-a"), ApiKey::plain("sk-b")];
    config.files.max_file_bytes = 4096;
    let s = TestServer::start(config);
    let (a, b) = (Some("sk-a"), Some("sk-b"));
    let g = "/v1/images/generations";

    // Validation fails the whole batch and says where.
    let jsonl = [
        batch_line("one", g, json!({"prompt": "x"})),
        batch_line("one", g, json!({"prompt": "y"})),
        "not json".to_string(),
        batch_line("three", "/v1/chat/completions", json!({})),
    ]
    .join("\n");
    let batch = s.run_batch(a, g, &jsonl);
    assert_eq!(batch["status"], "failed");
    assert!(batch["failed_at"].as_u64().is_some());
    let errors: Vec<(String, u64)> = batch["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap().into(),
                e["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            ("duplicate_custom_id".into(), 2),
            ("invalid_json_line".into(), 3),
            ("mismatched_endpoint".into(), 4)
        ]
    );
    assert!(batch["output_file_id"].is_null());

    // A file and a batch belong to their key: another key gets 404.
    let (_, file) = s.upload(a, &batch_line("x", g, json!({"prompt": "x"})));
    let id = file["id"].as_str().unwrap();
    assert_eq!(
        file["bytes"].as_u64().unwrap() as usize,
        batch_line("x", g, json!({"prompt": "x"})).len()
    );
    assert_eq!(s.call("GET", &format!("/v1/files/{id}"), a, None).0, 200);
    assert_eq!(s.call("GET", &format!("/v1/files/{id}"), b, None).0, 404);
    let (_, listed) = s.call("GET", "/v1/files", b, None);
    assert_eq!(listed["data"], json!([]));
    let batch_id = batch["id"].as_str().unwrap();
    assert_eq!(
        s.call("GET", &format!("/v1/batches/{batch_id}"), b, None).0,
        404
    );
    let create = |key, body: Value| s.call("POST", "/v1/batches", key, Some(body));
    let (status, e) = create(
        b,
        json!({"input_file_id": id, "endpoint": g, "completion_window": "24h"}),
    );
    assert_openai_error(
        status,
        &e.to_string(),
        400,
        Some("input_file_id"),
        "batch API",
    );
    assert_eq!(s.call("GET", "/v1/files", None, None).0, 401);

    // Bad batch fields.
    for (body, param) in [
        (
            json!({"input_file_id": id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": id, "endpoint": g, "completion_window": "48h"}),
            "completion_window",
        ),
        (
            json!({"input_file_id": id, "endpoint": g}),
            "completion_window",
        ),
        (
            json!({"endpoint": g, "completion_window": "24h"}),
            "input_file_id",
        ),
        (
            json!({"input_file_id": id, "endpoint": g, "completion_window": "24h", "metadata": {"k": 1}}),
            "metadata",
        ),
        (
            json!({"input_file_id": id, "endpoint": g, "completion_window": "24h", "priority": 1}),
            "priority",
        ),
        (
            json!({"input_file_id": id, "endpoint": g, "completion_window": "24h",
                "output_expires_after": {"anchor": "created_at", "seconds": 60}}),
            "output_expires_after.seconds",
        ),
    ] {
        let (status, e) = create(a, body.clone());
        assert_openai_error(status, &e.to_string(), 400, Some(param), "batch API");
    }

    // Bad uploads.
    let upload = |fields: &[(&str, &str)], files: &[(&str, &[u8])]| {
        let (ct, body) = multipart(fields, files);
        let r = s
            .client
            .post(s.url("/v1/files"))
            .bearer_auth("sk-a")
            .header("content-type", ct)
            .body(body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (status, e) = upload(&[("purpose", "fine-tune")], &[("file", b"{}")]);
    assert_openai_error(status, &e, 400, Some("purpose"), "batch API");
    let (status, e) = upload(&[("purpose", "batch")], &[]);
    assert_openai_error(status, &e, 400, Some("file"), "batch API");
    let (status, e) = upload(
        &[
            ("purpose", "batch"),
            ("expires_after[anchor]", "created_at"),
        ],
        &[("file", b"{}")],
    );
    assert_openai_error(status, &e, 400, Some("expires_after"), "batch API");
    let big = vec![b'x'; 5000];
    let (status, e) = upload(&[("purpose", "batch")], &[("file", &big)]);
    assert_openai_error(status, &e, 413, None, "batch API");
    // Nothing of the refused uploads is left: only the two files of this test's key.
    let (_, listed) = s.call("GET", "/v1/files", a, None);
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed}");
    let (status, e) = s.call("POST", &format!("/v1/batches/{batch_id}/cancel"), a, None);
    assert_openai_error(status, &e.to_string(), 400, Some("batch_id"), "batch API");
}

#[test]
fn a_cancelled_batch_keeps_what_ran_and_lists_what_did_not() {
    // One image per device batch, so the batch holds two requests in flight; the worker is
    // busy with the blocker, so the other requests wait for a slot when the cancel comes.
    let (s, blocker_thread) = server_busy_with_a_blocker();
    let g = "/v1/images/generations";
    let jsonl: Vec<String> = (0..6)
        .map(|i| {
            batch_line(
                &format!("r{i}"),
                g,
                json!({"prompt": format!("p{i}"), "seed": i}),
            )
        })
        .collect();
    let (_, file) = s.upload(None, &jsonl.join("\n"));
    let (_, batch) = s.call(
        "POST",
        "/v1/batches",
        None,
        Some(json!({"input_file_id": file["id"], "endpoint": g, "completion_window": "24h"})),
    );
    let id = batch["id"].as_str().unwrap();
    // Cancel once the batch's first requests are queued behind the blocker.
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 8.0);
    let (status, cancelling) = s.call("POST", &format!("/v1/batches/{id}/cancel"), None, None);
    assert_eq!(status, 200, "{cancelling}");
    assert_eq!(cancelling["status"], "cancelling");
    let batch = s.wait_batch(None, id);
    blocker_thread.join().unwrap();
    assert_eq!(batch["status"], "cancelled", "{batch}");
    assert!(batch["cancelled_at"].as_u64().is_some());
    let counts = &batch["request_counts"];
    assert_eq!(counts["total"], 6);
    assert_eq!(
        counts["completed"].as_u64().unwrap() + counts["failed"].as_u64().unwrap(),
        6
    );
    let ran = counts["completed"].as_u64().unwrap();
    assert!((1..=2).contains(&ran), "{batch}");
    let errors = s.file_lines(None, batch["error_file_id"].as_str().unwrap());
    assert_eq!(errors.len() as u64, 6 - ran);
    assert_eq!(
        s.metric("turbine_batch_api_requests_total{outcome=\"not_run\"}"),
        (6 - ran) as f64
    );
    for e in &errors {
        assert!(e["response"].is_null());
        assert_eq!(e["error"]["code"], "batch_cancelled");
    }
    let output = s.file_lines(None, batch["output_file_id"].as_str().unwrap());
    let mut ids: Vec<String> = output
        .iter()
        .chain(&errors)
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4", "r5"]);
}

/// Records the prompts of every batch the device runs, in order.
struct RecordsPrompts(Pipeline, Arc<std::sync::Mutex<Vec<String>>>);

impl ImageBackend for RecordsPrompts {
    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        let mut seen = self.1.lock().unwrap();
        seen.extend(items.iter().map(|i| i.prompt.clone()));
        drop(seen);
        self.0.generate(settings, items, None)
    }
}

/// A batch is background work: its images wait at low priority, so an interactive request
/// that arrives after them still runs first.
#[test]
fn interactive_requests_go_before_a_batch_s_queued_images() {
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = {
        let seen = seen.clone();
        Arc::new(TestServer::start_with(config, move |p| {
            Box::new(RecordsPrompts(p, seen))
        }))
    };
    let blocker_thread = {
        let s = s.clone();
        std::thread::spawn(move || s.generate_ok(&blocker()))
    };
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 6.0);
    let g = "/v1/images/generations";
    let jsonl = [
        batch_line("b0", g, json!({"prompt": "batch 0"})),
        batch_line("b1", g, json!({"prompt": "batch 1"})),
    ]
    .join("\n");
    let (_, file) = s.upload(None, &jsonl);
    let (_, batch) = s.call(
        "POST",
        "/v1/batches",
        None,
        Some(json!({"input_file_id": file["id"], "endpoint": g, "completion_window": "24h"})),
    );
    // Both batch images queued behind the blocker, then the interactive request.
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 8.0);
    s.generate_ok(&json!({"prompt": "interactive"}));
    let batch = s.wait_batch(None, batch["id"].as_str().unwrap());
    blocker_thread.join().unwrap();
    assert_eq!(batch["status"], "completed");
    let seen = seen.lock().unwrap().clone();
    let at = |p: &str| seen.iter().position(|s| s == p).unwrap();
    assert!(
        at("interactive") < at("batch 0") && at("interactive") < at("batch 1"),
        "{seen:?}"
    );
}

/// Takes a while over every batch, so a batch is still running when its server stops.
struct Slow(Pipeline);

impl ImageBackend for Slow {
    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        std::thread::sleep(Duration::from_millis(150));
        self.0.generate(settings, items, None)
    }
}

/// A server whose batches after the warm-up's wait at the [`Gated`] gate it returns, shut.
fn gated_server(config: ServerConfig) -> (TestServer, Arc<std::sync::atomic::AtomicBool>) {
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let s = {
        let gate = gate.clone();
        TestServer::start_with(config, move |p| Box::new(Gated(p, gate)))
    };
    gate.store(false, std::sync::atomic::Ordering::Release);
    (s, gate)
}

/// Stop signals the test sends itself; returns once the server's `serve` has returned.
impl TestServer {
    fn signal_stop(&self) {
        self.stop.as_ref().unwrap().send(()).unwrap();
    }

    fn wait_stopped(&mut self) {
        let result = self.thread.take().unwrap().join().unwrap();
        result.unwrap();
    }
}

/// Sends a generation (plain or streamed) from a thread; returns its status and body.
fn send_in_background(s: &TestServer, body: Value) -> JoinHandle<(u16, String)> {
    send_in_background_to(s, "/v1/images/generations", body)
}

/// [`send_in_background`] to the route at `path`.
fn send_in_background_to(s: &TestServer, path: &str, body: Value) -> JoinHandle<(u16, String)> {
    let (client, url) = (s.client.clone(), s.url(path));
    std::thread::spawn(move || {
        let r = client.post(url).json(&body).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    })
}

/// A request's body (its bytes and its share of `--max-buffered-input-bytes`) is let go once the
/// request is validated (an edit's once its image is decoded), whichever route it came by: the
/// requests waiting for images hold none of the budget.
#[test]
fn requests_waiting_for_images_hold_none_of_the_input_budget() {
    let (s, gate) = gated_server(test_config());
    let post = |path: &str, body: Value| send_in_background_to(&s, path, body);
    let png = png_bytes(&edit_input());
    let waiting = [
        post("/v1/images/generations", json!({"prompt": "one"})),
        post(
            "/openai/deployments/gpt-image-1/images/generations",
            json!({"prompt": "two"}),
        ),
        post("/invocations", json!({"prompt": "three"})),
        post(
            "/invocations",
            json!({"prompt": "four", "images": [{"image_url": data_url(&png)}]}),
        ),
    ];
    s.wait_metric("turbine_images_enqueued_total", |v| v >= 4.0);
    assert_eq!(s.metric("turbine_http_requests_in_flight"), 4.0);
    assert_eq!(s.metric("turbine_buffered_input_bytes"), 0.0);
    gate.store(true, std::sync::atomic::Ordering::Release);
    for w in waiting {
        let (status, text) = w.join().unwrap();
        assert_eq!(status, 200, "{text}");
    }
}

/// When the shutdown's grace runs out, the requests still waiting for images are answered: 503
/// `shutting_down` for a plain request, an `error` event ending a stream. Before, the process
/// left with their connections closed unanswered, which a client cannot tell from a crash and
/// most will not retry for a POST. The server stops while the batch still runs.
#[test]
fn requests_left_when_the_grace_runs_out_are_answered() {
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(2);
    let (mut s, gate) = gated_server(config);
    let plain = send_in_background(&s, json!({"prompt": "left", "n": 2}));
    let streamed = send_in_background(&s, json!({"prompt": "left", "stream": true}));
    s.wait_metric("turbine_http_requests_in_flight", |v| v == 2.0);
    s.signal_stop();
    // The batch never runs: the gate stays shut until the server has stopped.
    s.wait_stopped();

    let (status, body) = plain.join().unwrap();
    let v = assert_openai_error(status, &body, 503, None, "left by the shutdown");
    assert_eq!(v["error"]["code"], "shutting_down");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped before"),
        "{v}"
    );
    let (status, body) = streamed.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "error");
    assert_eq!(events[0].1["error"]["code"], "shutting_down");
    gate.store(true, std::sync::atomic::Ordering::Release);
}

/// `--shutdown-delay-secs`: after a stop signal `/health` answers 503 at once, so that load
/// balancers stop sending requests, while the requests still sent are served, each HTTP/1
/// connection closed after its response so that pooled clients reconnect elsewhere; the usual
/// drain follows the delay, and a second signal cuts it short. Without it, the requests of the
/// seconds a Kubernetes Service's endpoints take to follow a pod's deletion got 503.
#[test]
fn a_shutdown_delay_serves_while_the_balancers_catch_up() {
    let mut config = test_config();
    config.shutdown_delay = Duration::from_secs(3600);
    let mut s = TestServer::start(config);
    s.signal_stop();
    loop {
        let r = s.client.get(s.url("/health")).send().unwrap();
        if r.status() == 503 {
            assert_eq!(r.json::<Value>().unwrap()["status"], "shutting_down");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // A balancer's default check of `/` sees it too.
    for method in [Method::GET, Method::OPTIONS] {
        let r = s.client.request(method, s.url("/")).send().unwrap();
        assert_eq!(r.status(), 503);
    }
    assert_eq!(s.client.get(s.url("/livez")).send().unwrap().status(), 200);
    let r = s.generate(&json!({"prompt": "still served", "seed": 5}));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(
        r.json::<Value>().unwrap()["data"].as_array().unwrap().len(),
        1
    );
    let r = s.client.get(s.url("/v1/models")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    // A second signal does not wait out the hour.
    s.signal_stop();
    s.wait_stopped();

    // A short delay, then the drain as usual: the server stops once idle.
    let mut config = test_config();
    config.shutdown_delay = Duration::from_secs(1);
    let mut s = TestServer::start(config);
    let start = Instant::now();
    s.signal_stop();
    assert_eq!(s.generate(&json!({"prompt": "in the delay"})).status(), 200);
    s.wait_stopped();
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// A second stop signal (a second Ctrl-C, `systemctl kill`, a supervisor that signals again)
/// ends the drain at once instead of after the whole `--shutdown-grace-secs`: the requests
/// under way are answered 503 and the server stops.
#[test]
fn a_second_stop_signal_ends_the_drain() {
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(3600);
    let (mut s, gate) = gated_server(config);
    let plain = send_in_background(&s, json!({"prompt": "second"}));
    s.wait_metric("turbine_http_requests_in_flight", |v| v == 1.0);
    s.signal_stop();
    // Draining: the request waits for its batch.
    while s.client.get(s.url("/health")).send().unwrap().status() != 503 {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!plain.is_finished());
    s.signal_stop();
    s.wait_stopped();
    let (status, body) = plain.join().unwrap();
    let v = assert_openai_error(status, &body, 503, None, "after a second stop signal");
    assert_eq!(v["error"]["code"], "shutting_down");
    gate.store(true, std::sync::atomic::Ordering::Release);
}

/// Requests whose bodies are still arriving, or that wait for room in the input budget
/// (`--max-buffered-input-bytes`) before reading them, are answered 503 too when the drain
/// ends, not cut off: a slow upload over a poor link is a request under way like any other.
#[test]
fn bodies_still_arriving_when_the_drain_ends_are_answered() {
    let mut config = test_config();
    config.shutdown_grace = Duration::from_secs(3600);
    config.limits.max_upload_bytes = 64 << 10;
    config.limits.max_body_bytes = 64 << 10;
    // The least budget: four uploads' worth, 15/16 of it for shares as large as these.
    config.max_buffered_input = Some(256 << 10);
    let mut s = TestServer::start(config);
    // Each declares a whole upload and sends a byte of it.
    let stalled_edit = || {
        let mut c = TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
        write!(
            c,
            "POST /v1/images/edits HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\
             content-type: multipart/form-data; boundary=b\r\ncontent-length: {}\r\n\r\n-",
            64 << 10
        )
        .unwrap();
        c.flush().unwrap();
        c
    };
    let mut stalled: Vec<TcpStream> = (0..3).map(|_| stalled_edit()).collect();
    s.wait_metric("turbine_buffered_input_bytes", |v| {
        v == (3 * (64 << 10)) as f64
    });
    // A fourth finds no room and waits, its body unread; a generation's body is arriving.
    stalled.push(stalled_edit());
    s.wait_metric("turbine_buffered_input_waits_total", |v| v == 1.0);
    let (partial, _) = partial_request(&s.base);
    stalled.push(partial);
    s.wait_metric("turbine_http_requests_in_flight", |v| v == 5.0);
    s.signal_stop();
    while s.client.get(s.url("/health")).send().unwrap().status() != 503 {
        std::thread::sleep(Duration::from_millis(5));
    }
    s.signal_stop();
    s.wait_stopped();
    for (i, mut c) in stalled.into_iter().enumerate() {
        let mut response = String::new();
        let _ = c.read_to_string(&mut response);
        assert!(
            response.starts_with("HTTP/1.1 503"),
            "request {i}: {response:?}"
        );
        assert!(
            response.contains("\"shutting_down\""),
            "request {i}: {response}"
        );
    }
}

/// `turbine_http_request_duration_seconds` times a request to its response's last byte: a
/// stream's runs to its last event (two 150 ms batches here), not to its head, which goes out
/// at once.
#[test]
fn request_durations_run_to_the_last_byte() {
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    let s = TestServer::start_with(config, |p| Box::new(Slow(p)));
    let route = "route=\"/v1/images/generations\"";
    let count = format!("turbine_http_request_duration_seconds_count{{{route}}}");
    let sum = format!("turbine_http_request_duration_seconds_sum{{{route}}}");
    assert_eq!(s.metric(&count), 0.0);

    let r = s.generate(&json!({"prompt": "timed", "n": 2, "stream": true}));
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().unwrap());
    assert_eq!(events.len(), 2);
    // Recorded when the server drops the finished body, a moment after the client read it.
    s.wait_metric(&count, |v| v == 1.0);
    let streamed = s.metric(&sum);
    assert!(streamed >= 0.3, "{streamed}");

    // A sized response keeps its content-length through the timing.
    let r = s.generate(&json!({"prompt": "timed", "seed": 3}));
    assert_eq!(r.status(), 200);
    let length = header_number(&r, "content-length") as usize;
    assert_eq!(r.bytes().unwrap().len(), length);
    s.wait_metric(&count, |v| v == 2.0);
    assert!(s.metric(&sum) >= streamed + 0.15);

    // Every route has its histogram; unknown paths share one.
    s.client.get(s.url("/nowhere")).send().unwrap();
    s.wait_metric(
        "turbine_http_request_duration_seconds_count{route=\"unmatched\"}",
        |v| v == 1.0,
    );
    let m = s.metrics();
    assert!(m.contains(
        "turbine_http_request_duration_seconds_bucket{route=\"/v1/images/generations\",le=\"+Inf\"} 2"
    ));
}

/// With `--files-dir`, a restart keeps the files and resumes an unfinished batch where it
/// stopped: every request's result exactly once, the same images as without the restart.
#[test]
fn a_batch_goes_on_after_a_restart_with_files_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    config.files.dir = Some(dir.path().to_path_buf());
    let g = "/v1/images/generations";
    let body = |i: u64| json!({"prompt": format!("crate {i}"), "seed": 40 + i});
    // 16 requests of 150 ms each, two at a time: over a second to stop the server half-way.
    let jsonl: Vec<String> = (0..16)
        .map(|i| batch_line(&format!("c{i}"), g, body(i)))
        .collect();
    let hooks = Receiver::start(vec![]);
    let (file_id, batch_id, secret) = {
        let s = TestServer::start_with(config.clone(), |p| Box::new(Slow(p)));
        // A webhook endpoint made before the restart hears of the batch's end after it.
        let (status, endpoint) = s.call(
            "POST",
            "/v1/webhook_endpoints",
            None,
            Some(json!({"name": "n", "url": hooks.url, "event_types": ["batch.completed"]})),
        );
        assert_eq!(status, 200, "{endpoint}");
        let secret = endpoint["signing_secret"].as_str().unwrap().to_string();
        let (_, file) = s.upload(None, &jsonl.join("\n"));
        let (_, batch) = s.call(
            "POST",
            "/v1/batches",
            None,
            Some(json!({"input_file_id": file["id"], "endpoint": g, "completion_window": "24h"})),
        );
        let id = batch["id"].as_str().unwrap().to_string();
        let start = Instant::now();
        loop {
            let (_, b) = s.call("GET", &format!("/v1/batches/{id}"), None, None);
            if b["request_counts"]["completed"].as_u64().unwrap() >= 1 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(300), "{b}");
            std::thread::sleep(Duration::from_millis(10));
        }
        (file["id"].as_str().unwrap().to_string(), id, secret)
    };
    // Stopped half-way: the record on disk says so, and some results are written.
    let record: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(format!("batches/{batch_id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(record["object"]["status"], "in_progress");
    let partial =
        std::fs::read_to_string(dir.path().join(format!("batches/{batch_id}.output.jsonl")))
            .unwrap();
    let before = partial.lines().count();
    assert!(
        (1..8).contains(&before),
        "{before} results before the restart"
    );

    let s = TestServer::start(config);
    let (status, file) = s.call("GET", &format!("/v1/files/{file_id}"), None, None);
    assert_eq!((status, &file["purpose"]), (200, &json!("batch")));
    let batch = s.wait_batch(None, &batch_id);
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 16, "completed": 16, "failed": 0})
    );
    assert_eq!(batch["usage"]["output_tokens"], 16 * 64);
    assert!(batch["error_file_id"].is_null());
    let output = s.file_lines(None, batch["output_file_id"].as_str().unwrap());
    let mut ids: Vec<String> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..16).map(|i| format!("c{i}")).collect();
    want.sort();
    assert_eq!(ids, want);
    for line in &output {
        let i: u64 = line["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        let direct = s.generate_ok(&body(i));
        assert!(
            decode_b64(&line["response"]["body"]["data"][0]) == decode_b64(&direct["data"][0]),
            "c{i}: the image differs from the same request sent directly"
        );
    }
    // The batch's working files are gone; its results are files of the Files API.
    let left: Vec<String> = std::fs::read_dir(dir.path().join("batches"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [format!("{batch_id}.json")]);
    let got = hooks.wait_for(1);
    check_signed(&got[0], &[&secret]);
    assert_eq!(got[0].event["data"]["id"], json!(batch_id));
    assert_eq!(got.len(), 1);
    // The endpoint's record holds its secret: the server's user alone may read it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let records: Vec<std::fs::Metadata> = std::fs::read_dir(dir.path().join("webhooks"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap())
            .filter(|m| m.is_file())
            .collect();
        assert_eq!(records.len(), 1, "the endpoint's record");
        assert_eq!(records[0].permissions().mode() & 0o777, 0o600);
    }
}

/// A batch still running when its completion window ends expires: what ran is kept, the rest
/// is listed as `batch_expired`.
#[test]
fn a_batch_past_its_completion_window_expires() {
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    config.files.completion_window = Duration::from_secs(1);
    let s = TestServer::start_with(config, |p| Box::new(Slow(p)));
    let g = "/v1/images/generations";
    let jsonl: Vec<String> = (0..12)
        .map(|i| batch_line(&format!("e{i}"), g, json!({"prompt": "late", "seed": i})))
        .collect();
    let batch = s.run_batch(None, g, &jsonl.join("\n"));
    assert_eq!(batch["status"], "expired", "{batch}");
    assert!(batch["expired_at"].as_u64().is_some());
    let counts = &batch["request_counts"];
    let ran = counts["completed"].as_u64().unwrap();
    assert_eq!(
        (counts["total"].as_u64(), counts["failed"].as_u64()),
        (Some(12), Some(12 - ran))
    );
    assert!(ran < 12, "{batch}");
    let errors = s.file_lines(None, batch["error_file_id"].as_str().unwrap());
    assert_eq!(errors.len() as u64, 12 - ran);
    assert!(errors.iter().all(|e| e["error"]["code"] == "batch_expired"));
}

/// Generates only while its gate is open: a test holds the device's work back until it has set
/// the stage for it.
struct Gated(Pipeline, Arc<std::sync::atomic::AtomicBool>);

impl ImageBackend for Gated {
    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        while !self.1.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.0.generate(settings, items, None)
    }
}

/// A full disk pauses a batch instead of losing its results: a result that cannot be written
/// (ENOSPC: the batch's output file is `/dev/full` here) is not counted done, and is written
/// again until it can be; once there is room the batch ends with every result in its output,
/// each once and whole, the images those of direct requests.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_pauses_a_batch_and_loses_no_result() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.batching.max_batch_size = 1;
    config.files.dir = Some(dir.path().to_path_buf());
    let gate = Arc::new(AtomicBool::new(true));
    let s = {
        let gate = gate.clone();
        TestServer::start_with(config, move |p| Box::new(Gated(p, gate)))
    };
    gate.store(false, Ordering::Release);
    let enqueued = s.metric("turbine_images_enqueued_total");
    let g = "/v1/images/generations";
    let body = |i: u64| json!({"prompt": format!("jar {i}"), "seed": 70 + i});
    let jsonl: Vec<String> = (0..4)
        .map(|i| batch_line(&format!("j{i}"), g, body(i)))
        .collect();
    let (_, file) = s.upload(None, &jsonl.join("\n"));
    let (status, batch) = s.call(
        "POST",
        "/v1/batches",
        None,
        Some(json!({"input_file_id": file["id"], "endpoint": g, "completion_window": "24h"})),
    );
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap().to_string();
    // Its first image waits at the gate, so the batch has looked for results of an earlier
    // run (none); then the disk fills up: every write of the output fails with ENOSPC.
    s.wait_metric("turbine_images_enqueued_total", |v| v > enqueued);
    let output = dir.path().join(format!("batches/{id}.output.jsonl"));
    std::os::unix::fs::symlink("/dev/full", &output).unwrap();
    gate.store(true, Ordering::Release);
    s.wait_metric("turbine_batch_api_write_errors_total", |v| v >= 2.0);
    let (_, paused) = s.call("GET", &format!("/v1/batches/{id}"), None, None);
    assert_eq!(paused["status"], "in_progress", "{paused}");
    assert_eq!(paused["request_counts"]["completed"], 0, "{paused}");
    assert_eq!(
        s.metric("turbine_batch_api_requests_total{outcome=\"completed\"}"),
        0.0
    );
    // Room again.
    std::fs::remove_file(&output).unwrap();
    let batch = s.wait_batch(None, &id);
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 4, "completed": 4, "failed": 0})
    );
    assert!(batch["error_file_id"].is_null(), "{batch}");
    let lines = s.file_lines(None, batch["output_file_id"].as_str().unwrap());
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["j0", "j1", "j2", "j3"]);
    for line in &lines {
        let i: u64 = line["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        let direct = s.generate_ok(&body(i));
        assert!(
            decode_b64(&line["response"]["body"]["data"][0]) == decode_b64(&direct["data"][0]),
            "j{i}: the image differs from the same request sent directly"
        );
    }
    assert_eq!(
        s.metric("turbine_batch_api_requests_total{outcome=\"completed\"}"),
        4.0
    );
}

/// A webhook receiver on 127.0.0.1: records each request's headers (lower-cased names) and body,
/// and answers each with the next of its statuses (200 once they run out).
struct Receiver {
    url: String,
    got: Arc<std::sync::Mutex<Vec<(Headers, String)>>>,
}

type Headers = std::collections::HashMap<String, String>;

/// The rest of an HTTP/1.1 request whose request line was read: its headers (names in lower
/// case) and its `content-length` bytes of body.
fn read_head_and_body(reader: &mut impl BufRead) -> (Headers, Vec<u8>) {
    let mut headers = Headers::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    (headers, body)
}

/// One request a [`Receiver`] got: its headers, its body's JSON, and the body as sent (what is
/// signed).
struct Delivery {
    headers: Headers,
    event: Value,
    raw: String,
}

/// A connection a [`Receiver`] reads a request from and answers on.
trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

impl Receiver {
    fn start(statuses: Vec<u16>) -> Self {
        Self::start_on("http", statuses, |tcp| Box::new(tcp))
    }

    /// A receiver at `{scheme}://localhost:PORT/hooks/turbine` whose connections are
    /// `wrap(the TCP stream)` (HTTPS: a TLS server stream).
    fn start_on(
        scheme: &str,
        statuses: Vec<u16>,
        wrap: impl Fn(std::net::TcpStream) -> Box<dyn Duplex> + Send + 'static,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = match scheme {
            "http" => listener.local_addr().unwrap().to_string(),
            _ => format!("localhost:{}", listener.local_addr().unwrap().port()),
        };
        let url = format!("{scheme}://{host}/hooks/turbine");
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = got.clone();
        std::thread::spawn(move || {
            let mut statuses = statuses.into_iter();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(wrap(stream));
                let mut line = String::new();
                // A client that gave up on the handshake (one that does not trust the
                // certificate) sends no request.
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let (headers, body) = read_head_and_body(&mut reader);
                record
                    .lock()
                    .unwrap()
                    .push((headers, String::from_utf8(body).unwrap()));
                let status = statuses.next().unwrap_or(200);
                let _ = reader.get_mut().write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
                let _ = reader.get_mut().flush();
            }
        });
        Receiver { url, got }
    }

    /// The requests received so far.
    fn requests(&self) -> Vec<Delivery> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(h, b)| Delivery {
                headers: h.clone(),
                event: serde_json::from_str(b).unwrap(),
                raw: b.clone(),
            })
            .collect()
    }

    /// Waits until `n` requests have come (a hang guard, not a timing check).
    fn wait_for(&self, n: usize) -> Vec<Delivery> {
        let start = Instant::now();
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{} of {n} webhook requests came",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The signatures of a delivery, checked against `secrets` (each must sign its body as sent,
/// in order).
fn check_signed(d: &Delivery, secrets: &[&str]) {
    let headers = &d.headers;
    let id = &headers["webhook-id"];
    assert_eq!(d.event["id"], json!(id));
    let ts: u64 = headers["webhook-timestamp"].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(ts <= now && now - ts < 300, "timestamp {ts}, now {now}");
    let want: Vec<String> = secrets
        .iter()
        .map(|s| format!("v1,{}", turbine::server::webhooks::sign(s, id, ts, &d.raw)))
        .collect();
    assert_eq!(headers["webhook-signature"], want.join(" "));
    assert_eq!(headers["content-type"], "application/json");
}

/// Webhook endpoints: a key's endpoints are told of its batches' ends, signed with their
/// secret, retried until they answer 2xx, and managed through OpenAI's endpoints (list,
/// update, rotate the secret, send a test event, delete); other keys see none of them.
#[test]
fn webhooks_tell_a_key_when_its_batches_end() {
    let mut config = test_config();
    config.auth.keys = vec![ApiKey::plain("sk-a"), ApiKey::plain("sk-b")];
    config.files.webhook_retry.first_delay = Duration::from_millis(20);
    config.files.webhook_retry.max_delay = Duration::from_millis(100);
    // Long enough for three attempts on a loaded machine; short for the test that gives up.
    config.files.webhook_retry.give_up_after = Duration::from_secs(3);
    let s = TestServer::start(config);
    let (a, b) = (Some("sk-a"), Some("sk-b"));
    let gen = "/v1/images/generations";

    let (status, types) = s.call("GET", "/v1/webhook_event_types", a, None);
    assert_eq!(status, 200);
    assert_eq!(
        types,
        json!({"object": "list", "data": ["batch.cancelled", "batch.completed", "batch.expired", "batch.failed"]})
    );

    // The first two attempts fail; the third is answered 200.
    let hooks = Receiver::start(vec![500, 503]);
    let (status, created) = s.call(
        "POST",
        "/v1/webhook_endpoints",
        a,
        Some(json!({"name": "ends", "url": hooks.url, "event_types": ["batch.completed", "batch.failed"]})),
    );
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["signing_secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(created["object"], "webhook_endpoint");
    assert_eq!(created["url"], json!(hooks.url));
    assert!(created["signing_secret_hint"]
        .as_str()
        .unwrap()
        .ends_with(&secret[secret.len() - 4..]));
    let (status, got) = s.call("GET", &format!("/v1/webhook_endpoints/{id}"), a, None);
    assert_eq!(status, 200);
    assert!(got.get("signing_secret").is_none(), "shown once: {got}");
    assert_eq!(got["updated_at"], created["created_at"]);
    // Another key's endpoints, and the events it listens for, are its own.
    let cancels = Receiver::start(vec![]);
    let (status, _) = s.call(
        "POST",
        "/v1/webhook_endpoints",
        a,
        Some(json!({"name": "cancels", "url": cancels.url, "event_types": ["batch.cancelled"]})),
    );
    assert_eq!(status, 200);
    let (status, _) = s.call("GET", &format!("/v1/webhook_endpoints/{id}"), b, None);
    assert_eq!(status, 404);
    let (_, list) = s.call("GET", "/v1/webhook_endpoints", b, None);
    assert_eq!(list["data"], json!([]));
    let (_, list) = s.call("GET", "/v1/webhook_endpoints?limit=1", a, None);
    assert_eq!(list["data"][0]["name"], "cancels", "newest first");
    assert_eq!(list["has_more"], true);

    let line = batch_line("one", gen, json!({"prompt": "a kite", "seed": 3}));
    let done = s.run_batch(a, gen, &line);
    assert_eq!(done["status"], "completed");
    let got = hooks.wait_for(3);
    let ids: Vec<&String> = got.iter().map(|d| &d.headers["webhook-id"]).collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one event, retried: {ids:?}"
    );
    check_signed(&got[2], &[&secret]);
    let event = &got[2].event;
    assert_eq!(event["type"], "batch.completed");
    assert_eq!(event["object"], "event");
    assert_eq!(event["data"], json!({"id": done["id"]}));
    assert_eq!(event["created_at"], done["completed_at"]);
    s.wait_metric(
        "turbine_webhook_deliveries_total{outcome=\"delivered\"}",
        |v| v == 1.0,
    );
    assert_eq!(
        s.metric("turbine_webhook_deliveries_total{outcome=\"retried\"}"),
        2.0
    );

    // Key b's batch is not a's to hear of; a's failed batch is.
    s.run_batch(b, gen, &line);
    let failed = s.run_batch(a, gen, &batch_line("bad", gen, json!({"prompt": 5})));
    let failed = if failed["status"] == "failed" {
        failed
    } else {
        // A line that fails alone completes the batch with an error line.
        assert_eq!(failed["status"], "completed");
        let (status, file) = s.upload(a, "not json\n");
        assert_eq!(status, 200);
        let (_, batch) = s.call(
            "POST",
            "/v1/batches",
            a,
            Some(json!({"input_file_id": file["id"], "endpoint": gen, "completion_window": "24h"})),
        );
        s.wait_batch(a, batch["id"].as_str().unwrap())
    };
    assert_eq!(failed["status"], "failed");
    let got = hooks.wait_for(5);
    let types: Vec<&Value> = got[3..].iter().map(|d| &d.event["type"]).collect();
    assert!(types.contains(&&json!("batch.failed")), "{types:?}");
    assert_eq!(got.len(), 5, "b's batch told a nothing");
    assert!(
        cancels.requests().is_empty(),
        "it listens for cancellations only"
    );

    // Updates: the same values change nothing; new ones move updated_at (seconds: wait one).
    let (status, same) = s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{id}"),
        a,
        Some(json!({"name": "ends"})),
    );
    assert_eq!(status, 200);
    assert_eq!(same["updated_at"], created["updated_at"]);
    std::thread::sleep(Duration::from_millis(1100));
    let (status, updated) = s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{id}"),
        a,
        Some(json!({"event_types": ["batch.completed"], "name": "completions"})),
    );
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["event_types"], json!(["batch.completed"]));
    assert!(updated["updated_at"].as_u64() > created["updated_at"].as_u64());

    // A rotated secret kept for a day: both sign.
    let (status, rotated) = s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{id}/rotate_secret"),
        a,
        Some(json!({"keep_old_secret_active_for_24_hours": true})),
    );
    assert_eq!(status, 200, "{rotated}");
    let new_secret = rotated["signing_secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    let (status, test) = s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{id}/test"),
        a,
        Some(json!({"event_type": "batch.expired"})),
    );
    assert_eq!(status, 200, "{test}");
    assert_eq!(
        (
            &test["object"],
            &test["status_code"],
            &test["success"],
            &test["event_type"]
        ),
        (
            &json!("webhook_endpoint.test"),
            &json!(200),
            &json!(true),
            &json!("batch.expired")
        )
    );
    let got = hooks.wait_for(6);
    check_signed(&got[5], &[&new_secret, &secret]);
    assert_eq!(got[5].event["type"], "batch.expired");
    // Without keeping it, the old secret stops signing at once.
    let (_, rotated) = s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{id}/rotate_secret"),
        a,
        None,
    );
    let newest = rotated["signing_secret"].as_str().unwrap().to_string();
    s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{id}/test"),
        a,
        Some(json!({"event_type": "batch.completed"})),
    );
    let got = hooks.wait_for(7);
    check_signed(&got[6], &[&newest]);

    // Bad input names its field.
    for (body, param) in [
        (
            json!({"name": "x", "url": "ftp://host/", "event_types": ["batch.completed"]}),
            "url",
        ),
        (
            json!({"name": "x", "url": hooks.url, "event_types": ["response.completed"]}),
            "event_types",
        ),
        (json!({"name": "x", "url": hooks.url}), "event_types"),
        (
            json!({"name": "x", "url": hooks.url, "event_types": ["batch.failed"], "secret": "s"}),
            "secret",
        ),
    ] {
        let (status, e) = s.call("POST", "/v1/webhook_endpoints", a, Some(body));
        assert_eq!(status, 400, "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }

    // A test to nowhere says so; a batch's event to nowhere is given up after its retries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let (_, gone) = s.call(
        "POST",
        "/v1/webhook_endpoints",
        a,
        Some(json!({"name": "gone", "url": nowhere, "event_types": ["batch.completed"]})),
    );
    let gone_id = gone["id"].as_str().unwrap();
    let (status, e) = s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{gone_id}/test"),
        a,
        Some(json!({"event_type": "batch.completed"})),
    );
    assert_eq!(
        (status, &e["error"]["code"]),
        (400, &json!("webhook_unreachable")),
        "{e}"
    );
    // A test the endpoint answers with an error is not a success (it was, whatever the
    // status, until the OpenAPI work looked at it).
    let failing = Receiver::start(vec![500]);
    let (_, down) = s.call(
        "POST",
        "/v1/webhook_endpoints",
        a,
        Some(json!({"name": "down", "url": failing.url, "event_types": ["batch.completed"]})),
    );
    let (status, test) = s.call(
        "POST",
        &format!(
            "/v1/webhook_endpoints/{}/test",
            down["id"].as_str().unwrap()
        ),
        a,
        Some(json!({"event_type": "batch.completed"})),
    );
    assert_eq!(status, 200, "{test}");
    assert_eq!(
        (&test["status_code"], &test["success"]),
        (&json!(500), &json!(false)),
        "{test}"
    );
    // Gone before the batch below, whose event it would otherwise be sent.
    let (status, _) = s.call(
        "DELETE",
        &format!("/v1/webhook_endpoints/{}", down["id"].as_str().unwrap()),
        a,
        None,
    );
    assert_eq!(status, 200);
    s.run_batch(a, gen, &line);
    s.wait_metric(
        "turbine_webhook_deliveries_total{outcome=\"abandoned\"}",
        |v| v == 1.0,
    );
    hooks.wait_for(8);

    // Deleted: gone from the list, 404 after.
    let (status, deleted) = s.call("DELETE", &format!("/v1/webhook_endpoints/{id}"), a, None);
    assert_eq!(status, 200);
    assert_eq!(
        deleted,
        json!({"id": id, "object": "webhook_endpoint.deleted", "deleted": true})
    );
    let (status, _) = s.call("GET", &format!("/v1/webhook_endpoints/{id}"), a, None);
    assert_eq!(status, 404);
    let (_, list) = s.call("GET", "/v1/webhook_endpoints", a, None);
    let names: Vec<&Value> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["name"])
        .collect();
    assert_eq!(names, [&json!("gone"), &json!("cancels")]);
}

/// With `--files-dir`, webhook deliveries outlive the server: one a restart interrupted is made
/// after it (the same event), and a batch that ended without its events queued (a crash in
/// between, made here by editing its record) is told of at start-up.
#[test]
fn webhook_deliveries_go_on_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.files.dir = Some(dir.path().to_path_buf());
    // The first life's retry would come an hour later.
    config.files.webhook_retry.first_delay = Duration::from_secs(3600);
    let hooks = Receiver::start(vec![500]);
    let gen = "/v1/images/generations";
    let pending = || -> usize {
        std::fs::read_dir(dir.path().join("webhooks/pending"))
            .unwrap()
            .count()
    };
    let (secret, batch_id) = {
        let s = TestServer::start(config.clone());
        let (status, endpoint) = s.call(
            "POST",
            "/v1/webhook_endpoints",
            None,
            Some(json!({"name": "n", "url": hooks.url, "event_types": ["batch.completed"]})),
        );
        assert_eq!(status, 200, "{endpoint}");
        let line = batch_line("one", gen, json!({"prompt": "a mill", "seed": 9}));
        let done = s.run_batch(None, gen, &line);
        hooks.wait_for(1);
        s.wait_metric(
            "turbine_webhook_deliveries_total{outcome=\"retried\"}",
            |v| v == 1.0,
        );
        assert_eq!(s.metric("turbine_webhook_deliveries_pending"), 1.0);
        (
            endpoint["signing_secret"].as_str().unwrap().to_string(),
            done["id"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(pending(), 1, "the failed delivery is kept");

    config.files.webhook_retry.first_delay = Duration::from_millis(20);
    {
        let s = TestServer::start(config.clone());
        let got = hooks.wait_for(2);
        assert_eq!(got[1].headers["webhook-id"], got[0].headers["webhook-id"]);
        check_signed(&got[1], &[&secret]);
        assert_eq!(got[1].event["data"]["id"], json!(batch_id));
        s.wait_metric(
            "turbine_webhook_deliveries_total{outcome=\"delivered\"}",
            |v| v == 1.0,
        );
        s.wait_metric("turbine_webhook_deliveries_pending", |v| v == 0.0);
        let start = Instant::now();
        while pending() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the delivery stays pending"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    let path = dir.path().join(format!("batches/{batch_id}.json"));
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(record["notified"], true);
    record["notified"] = json!(false);
    std::fs::write(&path, record.to_string()).unwrap();
    let _s = TestServer::start(config);
    let got = hooks.wait_for(3);
    assert_eq!(got[2].event["data"]["id"], json!(batch_id));
    assert_ne!(got[2].headers["webhook-id"], got[0].headers["webhook-id"]);
    check_signed(&got[2], &[&secret]);
    let record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(record["notified"], true);
    assert_eq!(hooks.requests().len(), 3);
}

/// The states a crash (or a stop) can leave a batch in as its results become a file of the
/// Files API, made on disk from two batches that completed: each record set back to
/// `finalizing`, the batch's own names of its input and results back in place (as the server
/// keeps them until the ended record is written), and for one of them the results' File
/// already written down (the crash came after it), for the other only its contents (it came
/// before the File's record: a leftover the next start removes). Both batches end `completed`
/// after the restart with every result: the first with the File it had made (not a second
/// one), the other with a new one; the batch directory then holds only their records.
#[test]
fn a_batch_a_crash_left_finalizing_ends_with_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.files.dir = Some(dir.path().to_path_buf());
    let gen = "/v1/images/generations";
    let path = |p: String| dir.path().join(p);
    let mut batches = Vec::new();
    {
        let s = TestServer::start(config.clone());
        for tag in ["after", "before"] {
            let lines: Vec<String> = (0..3)
                .map(|i| {
                    batch_line(
                        &format!("{tag}{i}"),
                        gen,
                        json!({"prompt": "a barn", "seed": i}),
                    )
                })
                .collect();
            let done = s.run_batch(None, gen, &lines.join("\n"));
            assert_eq!(done["status"], "completed", "{done}");
            batches.push((tag, done));
        }
    }
    let mut outputs = Vec::new();
    for (tag, done) in &batches {
        let id = done["id"].as_str().unwrap();
        let output = done["output_file_id"].as_str().unwrap();
        let input = done["input_file_id"].as_str().unwrap();
        let record_path = path(format!("batches/{id}.json"));
        let mut record: Value =
            serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
        for field in ["completed_at", "output_file_id"] {
            record["object"][field] = Value::Null;
        }
        record["object"]["status"] = json!("finalizing");
        record["notified"] = json!(false);
        std::fs::write(&record_path, record.to_string()).unwrap();
        std::fs::hard_link(
            path(format!("files/{input}")),
            path(format!("batches/{id}.input.jsonl")),
        )
        .unwrap();
        std::fs::hard_link(
            path(format!("files/{output}")),
            path(format!("batches/{id}.output.jsonl")),
        )
        .unwrap();
        if *tag == "before" {
            std::fs::remove_file(path(format!("files/{output}.json"))).unwrap();
        }
        outputs.push(std::fs::read(path(format!("files/{output}"))).unwrap());
    }

    let s = TestServer::start(config);
    for ((tag, done), before) in batches.iter().zip(&outputs) {
        let id = done["id"].as_str().unwrap();
        let old = done["output_file_id"].as_str().unwrap();
        let b = s.wait_batch(None, id);
        assert_eq!(b["status"], "completed", "{tag}: {b}");
        assert_eq!(
            b["request_counts"],
            json!({"total": 3, "completed": 3, "failed": 0})
        );
        let output = b["output_file_id"].as_str().unwrap();
        let r = s
            .client
            .get(s.url(&format!("/v1/files/{output}/content")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(&r.bytes().unwrap()[..], &before[..], "{tag}: the results");
        if *tag == "after" {
            assert_eq!(
                output, old,
                "the File made before the crash is the batch's output"
            );
        } else {
            assert_ne!(output, old);
            let (status, _) = s.call("GET", &format!("/v1/files/{old}"), None, None);
            assert_eq!(
                status, 404,
                "a File without its record is removed at the start"
            );
        }
    }
    let (_, files) = s.call("GET", "/v1/files?purpose=batch_output", None, None);
    assert_eq!(
        files["data"].as_array().unwrap().len(),
        2,
        "no second File: {files}"
    );
    let mut left: Vec<String> = std::fs::read_dir(path("batches".into()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want: Vec<String> = batches
        .iter()
        .map(|(_, b)| format!("{}.json", b["id"].as_str().unwrap()))
        .collect();
    want.sort();
    assert_eq!(left, want);
}

/// A delivery whose record the disk refused (here its directory is a file: every write of it
/// fails) is still made, and written down at its next retry once it can be: a restart after
/// that does not lose it.
#[test]
fn a_webhook_delivery_the_disk_refused_is_written_down_at_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.files.dir = Some(dir.path().to_path_buf());
    config.files.webhook_retry.first_delay = Duration::from_millis(200);
    config.files.webhook_retry.max_delay = Duration::from_millis(400);
    let failing = Receiver::start(vec![500; 10_000]);
    let gen = "/v1/images/generations";
    let pending_dir = dir.path().join("webhooks/pending");
    let (endpoint_id, event_id) = {
        let s = TestServer::start(config.clone());
        let (status, endpoint) = s.call(
            "POST",
            "/v1/webhook_endpoints",
            None,
            Some(json!({"name": "n", "url": failing.url, "event_types": ["batch.completed"]})),
        );
        assert_eq!(status, 200, "{endpoint}");
        std::fs::remove_dir(&pending_dir).unwrap();
        std::fs::write(&pending_dir, b"").unwrap();
        let line = batch_line("one", gen, json!({"prompt": "a mill", "seed": 9}));
        s.run_batch(None, gen, &line);
        let got = failing.wait_for(2);
        assert!(pending_dir.is_file(), "nothing could be written down");
        // Room again: the next retry writes the delivery down.
        std::fs::remove_file(&pending_dir).unwrap();
        std::fs::create_dir(&pending_dir).unwrap();
        let start = Instant::now();
        while std::fs::read_dir(&pending_dir).unwrap().count() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the delivery is never written down"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(s.metric("turbine_webhook_deliveries_pending"), 1.0);
        (
            endpoint["id"].as_str().unwrap().to_string(),
            got[0].headers["webhook-id"].clone(),
        )
    };

    // After a restart the delivery goes on, the same event, to the endpoint's new URL.
    let hooks = Receiver::start(vec![]);
    let s = TestServer::start(config);
    let (status, body) = s.call(
        "POST",
        &format!("/v1/webhook_endpoints/{endpoint_id}"),
        None,
        Some(json!({"url": hooks.url})),
    );
    assert_eq!(status, 200, "{body}");
    let got = hooks.wait_for(1);
    assert_eq!(got[0].headers["webhook-id"], event_id);
    s.wait_metric("turbine_webhook_deliveries_pending", |v| v == 0.0);
}

/// A log reader that stops reading (Docker's log driver on a full disk, a stalled journald, a
/// `| tee` onto a full disk) no longer stops the server. Before, every request's log line waited
/// for the full pipe (64 KiB) to drain, and after a few hundred requests nothing was answered,
/// `/health` included. Now the lines past `--log-buffer-bytes` are dropped and counted, every
/// request is answered, and once the log is read again a warning says how many were lost and
/// new lines follow.
#[test]
fn a_blocked_log_reader_does_not_stop_the_server() {
    use std::sync::atomic::Ordering;
    let p = ServerProcess::start(&["--log-buffer-bytes", "65536"]);
    p.log_paused.store(true, Ordering::Relaxed);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Each logs a line of about 200 bytes: the pipe and the queue hold a few hundred.
    for i in 0..2000 {
        let r = client
            .get(format!("{}/v1/models", p.base))
            .send()
            .unwrap_or_else(|e| panic!("request {i} was not answered: {e}"));
        assert_eq!(r.status(), 200);
    }
    assert_eq!(p.health(), 200);
    let metrics = client
        .get(format!("{}/metrics", p.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let dropped = metric_in(&metrics, "turbine_log_lines_dropped_total");
    assert!(dropped >= 500.0, "{dropped} lines dropped");

    let from = p.log.lock().unwrap().len();
    p.log_paused.store(false, Ordering::Relaxed);
    p.wait_for_log(from, "log lines were dropped");
    let r = client
        .get(format!("{}/v1/models/logged-again", p.base))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    p.wait_for_log(from, "logged-again");
}

/// The `$ref`s in `v` that do not resolve in `doc` (JSON pointers into the document).
fn unresolved_refs(doc: &Value, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let pointer = r.strip_prefix('#').unwrap_or(r);
                if doc.pointer(pointer).is_none() {
                    out.push(r.clone());
                }
            }
            map.values().for_each(|v| unresolved_refs(doc, v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| unresolved_refs(doc, v, out)),
        _ => {}
    }
}

/// The paths of the router's `.route(...)` calls, read from its source: what the OpenAPI
/// document must list.
fn routed_paths() -> Vec<String> {
    let source = include_str!("../src/server/routes.rs");
    let router = &source[source.find("pub fn router(").unwrap()..];
    let router = &router[..router.find("\n}\n").unwrap()];
    router
        .split(".route(")
        .skip(1)
        .map(|call| {
            let call = call.trim_start();
            assert!(
                call.starts_with('"'),
                "a route path that is not a literal: {call:.60}"
            );
            call[1..call[1..].find('"').unwrap() + 1].to_string()
        })
        .collect()
}

/// `GET /openapi.json` (no key) is an OpenAPI 3.1 document of this server: every route of the
/// router is in it (the LoRA routes only with `--allow-runtime-lora-updating`, as they are 404
/// without it), every operation in it is routed (neither the fallback's 404 nor a 405), every
/// `$ref` resolves, operation ids are unique, and the bounds it states are the configuration's.
/// `scripts/test_openapi.sh` checks the schemas against the server's answers (schemathesis).
#[test]
fn the_openapi_document_describes_every_route_as_configured() {
    let mut config = test_config();
    config.auth.keys = vec![ApiKey::plain("sk-doc")];
    config.limits.max_steps = 6;
    config.limits.max_prompt_chars = 500;
    let s = TestServer::start(config);
    let r = s.client.get(s.url("/openapi.json")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = r.json().unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let mut missing = Vec::new();
    unresolved_refs(&doc, &doc, &mut missing);
    assert!(missing.is_empty(), "unresolved: {missing:?}");

    let paths = doc["paths"].as_object().unwrap();
    for path in routed_paths() {
        let lora = path.contains("lora_adapter");
        assert_eq!(paths.contains_key(&path), !lora, "{path} in the document");
    }
    let mut ids = std::collections::HashSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            // The operation is routed: whatever it answers to an empty request, it is not the
            // fallback's "no route" nor a method the route lacks.
            let url = s.url(
                &path
                    .replace("{deployment}", "sdxl-turbo")
                    .replace("{id}", "nothing-has-this-id"),
            );
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = s
                .client
                .request(method.clone(), url)
                .bearer_auth("sk-doc")
                .send()
                .unwrap();
            let status = r.status();
            let text = r.text().unwrap();
            assert_ne!(status, 405, "{method} {path}: {text}");
            assert!(!text.contains("no route for"), "{method} {path}: {text}");
        }
    }
    // Security: a key is asked for (the server has keys), except where none is needed.
    assert_eq!(doc["security"], json!([{"bearer": []}, {"api_key": []}]));
    for open in [
        "/health",
        "/livez",
        "/openapi.json",
        "/v1/images/files/{id}",
    ] {
        assert_eq!(paths[open]["get"]["security"], json!([]), "{open}");
    }
    assert!(paths["/v1/images/generations"]["post"]
        .get("security")
        .is_none());

    // The configuration's bounds.
    let request = &doc["components"]["schemas"]["CreateImageRequest"];
    assert_eq!(request["additionalProperties"], false);
    assert_eq!(request["required"], json!(["prompt"]));
    let props = &request["properties"];
    assert_eq!(props["steps"]["maximum"], 6);
    assert_eq!(props["prompt"]["maxLength"], 500);
    assert_eq!(props["n"]["maximum"], 10);
    assert_eq!(props["n"]["type"], json!(["integer", "null"]));
    let size = props["size"]["description"].as_str().unwrap();
    assert!(size.contains("from 64 to 512"), "{size}");
    let form = &doc["components"]["schemas"]["EditImageForm"];
    assert_eq!(form["properties"]["strength"]["type"], "number");
    assert_eq!(form["properties"]["image"]["format"], "binary");

    // With the flag the LoRA routes are in it.
    drop(s);
    let mut config = test_config();
    config.runtime_lora_updating = true;
    let s = TestServer::start(config);
    let doc: Value = s
        .client
        .get(s.url("/openapi.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    for path in routed_paths() {
        assert!(doc["paths"].get(&path).is_some(), "{path} in the document");
    }
    // No keys: no security asked for.
    assert!(doc.get("security").is_none());
}
