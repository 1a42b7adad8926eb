//! Traces to an OpenTelemetry collector (`--otlp-endpoint`), on the real binary: a collector
//! look-alike here takes OTLP/HTTP exports and decodes them with the protocol's own types.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message as _;
use reqwest::blocking::Client;
use serde_json::{json, Value};

use super::ServerProcess;

/// One export the collector received: its headers (lower-case names) and what it said.
struct Export {
    headers: HashMap<String, String>,
    request: ExportTraceServiceRequest,
}

/// A span as the collector saw it, with its service's name.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, AnyValue>,
    status: i32,
    /// Its resource's attributes (service.name among them).
    resource: HashMap<String, AnyValue>,
}

/// An OTLP/HTTP collector on a free port: `POST /v1/traces` with a protobuf body, answered 200.
struct Collector {
    url: String,
    exports: Arc<Mutex<Vec<Export>>>,
}

impl Collector {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let exports = Arc::new(Mutex::new(Vec::new()));
        let kept = exports.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let kept = kept.clone();
                std::thread::spawn(move || serve(stream, kept));
            }
        });
        Collector { url, exports }
    }

    fn spans(&self) -> Vec<Seen> {
        let exports = self.exports.lock().unwrap();
        let mut seen = Vec::new();
        for export in exports.iter() {
            for resource in &export.request.resource_spans {
                let attrs = attributes(
                    &resource
                        .resource
                        .as_ref()
                        .map(|r| r.attributes.clone())
                        .unwrap_or_default(),
                );
                let service = match attrs.get("service.name") {
                    Some(AnyValue::StringValue(s)) => s.clone(),
                    other => panic!("service.name: {other:?}"),
                };
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        seen.push(Seen {
                            service: service.clone(),
                            name: span.name.clone(),
                            kind: span.kind,
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_span_id: hex(&span.parent_span_id),
                            attributes: attributes(&span.attributes),
                            status: span.status.as_ref().map_or(0, |s| s.code),
                            resource: attrs.clone(),
                        });
                    }
                }
            }
        }
        seen
    }
}

/// Answers the exports on one connection (the exporter keeps it alive).
fn serve(stream: std::net::TcpStream, exports: Arc<Mutex<Vec<Export>>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let (headers, body) = super::read_head_and_body(&mut reader);
        assert_eq!(path, "/v1/traces");
        assert_eq!(headers["content-type"], "application/x-protobuf");
        let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        exports.lock().unwrap().push(Export { headers, request });
        out.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(list: &[KeyValue]) -> HashMap<String, AnyValue> {
    list.iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?.value?)))
        .collect()
}

fn number(v: Option<&AnyValue>) -> f64 {
    match v {
        Some(AnyValue::IntValue(i)) => *i as f64,
        Some(AnyValue::DoubleValue(d)) => *d,
        other => panic!("not a number: {other:?}"),
    }
}

fn text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

/// Each request is a server span named by its route, the child of the caller's span when the
/// request sends a W3C `traceparent`, with one child span per image for its batch on the device
/// (queue wait, batch size, stage times); the request's JSON log lines carry its trace id; the
/// collector's headers come from `OTEL_EXPORTER_OTLP_HEADERS`; probes and scrapes are not
/// traced (nor logged at `info`); and the spans still queued when
/// the server is stopped are exported before it exits (the export interval here is longer
/// than the test, so nothing else sends them).
#[test]
fn requests_are_traced_to_an_otlp_collector() {
    let collector = Collector::start();
    let headers = std::ffi::OsString::from("x-collector-key=secret-1");
    let delay = std::ffi::OsString::from("600000");
    let mut p = ServerProcess::start_with(
        &[
            "--otlp-endpoint",
            &collector.url,
            "--otlp-service-name",
            "turbine-under-test",
            "--log-format",
            "json",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_HEADERS", &headers),
            ("OTEL_BSP_SCHEDULE_DELAY", &delay),
        ],
    );
    let client = Client::new();
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = client
        .post(format!("{}/v1/images/generations", p.base))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .header("x-request-id", "traced-1")
        .json(&json!({"prompt": "a traced fox", "n": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{}/v1/images/generations", p.base))
        .header("x-request-id", "untraced-2")
        .json(&json!({"prompt": "a fox of its own", "size": "8x8"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        client
            .get(format!("{}/v1/files/file-abc", p.base))
            .send()
            .unwrap()
            .status(),
        404
    );
    // Probes and scrapes (start_with polled /health until it was ready): neither spans nor
    // `info` lines.
    for probe in ["/livez", "/metrics", "/health", "/"] {
        assert_eq!(
            client
                .get(format!("{}{probe}", p.base))
                .send()
                .unwrap()
                .status(),
            200
        );
    }
    // Nothing exported yet: the interval is ten minutes.
    std::thread::sleep(Duration::from_millis(300));
    assert!(collector.spans().is_empty());
    p.terminate();
    assert_eq!(p.exit_code(), Some(0));

    let spans = collector.spans();
    for export in collector.exports.lock().unwrap().iter() {
        assert_eq!(export.headers["x-collector-key"], "secret-1");
    }
    assert!(spans.iter().all(|s| s.service == "turbine-under-test"));
    let requests: Vec<&Seen> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    // The three API requests, and no probe.
    assert_eq!(requests.len(), 3, "{requests:#?}");
    let traced = requests
        .iter()
        .find(|s| s.trace_id == caller_trace)
        .unwrap_or_else(|| panic!("no span in the caller's trace: {spans:#?}"));
    assert_eq!(traced.name, "POST /v1/images/generations");
    assert_eq!(traced.parent_span_id, caller_span);
    assert_eq!(
        number(traced.attributes.get("http.response.status_code")),
        200.0
    );
    assert_eq!(
        text(traced.attributes.get("http.route")),
        "/v1/images/generations"
    );
    assert_eq!(traced.status, StatusCode::Unset as i32);
    let images: Vec<&Seen> = spans
        .iter()
        .filter(|s| s.name == "image" && s.parent_span_id == traced.span_id)
        .collect();
    assert_eq!(images.len(), 2, "{spans:#?}");
    let mut indices: Vec<f64> = images
        .iter()
        .map(|s| number(s.attributes.get("turbine.index")))
        .collect();
    indices.sort_by(f64::total_cmp);
    assert_eq!(indices, [0.0, 1.0]);
    for image in &images {
        assert_eq!(image.trace_id, caller_trace);
        assert_eq!(text(image.attributes.get("turbine.device")), "cpu");
        assert_eq!(text(image.attributes.get("turbine.kind")), "generation");
        assert_eq!(number(image.attributes.get("turbine.width")), 64.0);
        assert_eq!(number(image.attributes.get("turbine.batch_size")), 2.0);
        assert!(number(image.attributes.get("turbine.queue_wait_ms")) >= 0.0);
        for stage in ["text_encode", "unet", "vae_decode", "batch"] {
            let ms = number(image.attributes.get(&format!("turbine.{stage}_ms")));
            assert!(ms > 0.0, "{stage}: {ms}");
        }
    }
    // Without a traceparent: a trace of its own, the request its root.
    let refused = requests
        .iter()
        .find(|s| number(s.attributes.get("http.response.status_code")) == 400.0)
        .unwrap();
    assert_eq!(refused.name, "POST /v1/images/generations");
    assert_ne!(refused.trace_id, caller_trace);
    assert_eq!(refused.parent_span_id, "");
    // Span names carry the route, not the ids in the path.
    let missing = requests
        .iter()
        .find(|s| number(s.attributes.get("http.response.status_code")) == 404.0)
        .unwrap();
    assert_eq!(missing.name, "GET /v1/files/{id}");
    // The request's log lines carry its trace id beside its request id.
    let log = p.log.lock().unwrap();
    let done: Vec<Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "request done")
        .collect();
    let line = |id: &str| {
        done.iter()
            .find(|l| l["span"]["id"] == id)
            .unwrap_or_else(|| panic!("no request done line for {id}"))
            .clone()
    };
    assert_eq!(line("traced-1")["span"]["trace_id"], caller_trace);
    assert_eq!(line("untraced-2")["span"]["trace_id"], refused.trace_id);
    assert_eq!(done.len(), 3, "{done:#?}");
}

/// A collector that is down costs the requests nothing, is warned about once and counted, and
/// the server still stops; a value that is no collector's URL is refused at start.
#[test]
fn a_collector_that_is_down_or_misnamed() {
    // Nothing listens there (the port was just freed).
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let delay = std::ffi::OsString::from("50");
    let mut p = ServerProcess::start_with(
        &["--otlp-endpoint", &dead],
        &[("OTEL_BSP_SCHEDULE_DELAY", &delay)],
    );
    let client = Client::new();
    for i in 0..3 {
        let r = client
            .post(format!("{}/v1/images/generations", p.base))
            .json(&json!({"prompt": format!("unobserved {i}")}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(p.health(), 200);
    // Said once (not at every export), and counted.
    p.wait_for_log(0, "an export to the OTLP collector failed");
    let failed = "turbine_trace_exports_total{outcome=\"failed\"}";
    while super::metric_in(&p.metrics(), failed) < 2.0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let warned = p
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("an export to the OTLP collector failed"))
        .count();
    assert_eq!(warned, 1);
    p.terminate();
    assert_eq!(p.exit_code(), Some(0));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["serve", "--otlp-endpoint", "collector:4318"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--otlp-endpoint must be an http:// or https:// URL"),
        "{err}"
    );
}

/// With no `--otlp-endpoint`, the variables every OpenTelemetry SDK reads (what the
/// OpenTelemetry Operator and shared namespace settings give a pod) send the traces: the
/// endpoint, the service's name and the resource's attributes. Before, they were ignored and
/// nothing was traced.
#[test]
fn the_opentelemetry_variables_send_traces_without_the_flags() {
    let collector = Collector::start();
    let endpoint = std::ffi::OsString::from(&collector.url);
    let name = std::ffi::OsString::from("imagegen");
    let attrs = std::ffi::OsString::from("k8s.pod.name=imagegen-7f9c,deployment.environment=prod");
    let delay = std::ffi::OsString::from("600000");
    let mut p = ServerProcess::start_with(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", &name),
            ("OTEL_RESOURCE_ATTRIBUTES", &attrs),
            ("OTEL_BSP_SCHEDULE_DELAY", &delay),
        ],
    );
    let r = Client::new()
        .post(format!("{}/v1/images/generations", p.base))
        .json(&json!({"prompt": "a fox seen by the operator"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    p.wait_for_log(0, "traces go to an OTLP collector");
    p.terminate();
    assert_eq!(p.exit_code(), Some(0));
    let spans = collector.spans();
    let request = spans
        .iter()
        .find(|s| s.name == "POST /v1/images/generations")
        .unwrap_or_else(|| panic!("no request span: {spans:#?}"));
    assert_eq!(request.service, "imagegen");
    assert_eq!(text(request.resource.get("k8s.pod.name")), "imagegen-7f9c");
    assert_eq!(text(request.resource.get("deployment.environment")), "prod");
    assert!(
        spans.iter().any(|s| s.name != request.name),
        "no image span: {spans:#?}"
    );

    // OTEL_SDK_DISABLED turns them off.
    let off = std::ffi::OsString::from("true");
    let mut p = ServerProcess::start_with(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SDK_DISABLED", &off),
        ],
    );
    assert_eq!(p.health(), 200);
    assert!(!p
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("traces go to")));
    p.terminate();
    assert_eq!(p.exit_code(), Some(0));
}
