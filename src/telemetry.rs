//! Traces to an OpenTelemetry collector (`--otlp-endpoint`): each HTTP request is a server span,
//! the child of the caller's span when the request carries a W3C `traceparent` (a gateway's, an
//! SDK's instrumented client), and each of its images a child span covering its batch on the
//! device, with the queue wait, the batch and the stage times as attributes. Spans go out over
//! OTLP/HTTP (protobuf) from the SDK's own thread in batches; a collector that is slow or gone
//! costs the requests nothing (spans past the SDK's queue of 2048 are dropped).
//!
//! Without `--otlp-endpoint` nothing here runs and the logs are as they were: the fields this
//! module adds to the request span are recorded only while traces are exported.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether spans are exported (set once, when the layer is made).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Exports (batches of spans) the collector took, and those that failed.
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// When a failed export was last warned about: once a minute at most, as a collector that is
/// down fails every export (one each 5 s by default).
static WARNED: Mutex<Option<Instant>> = Mutex::new(None);

/// The provider, for [`shutdown`] to export what is still queued.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// How long one export may take before it is given up (the SDK's default is 10 s): the
/// collector is usually on the same machine or network, and the process waits for the last
/// export at exit.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether spans are exported to a collector.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Exports the collector took so far, and those that failed (`turbine_trace_exports_total`).
pub fn exports() -> (&'static AtomicU64, &'static AtomicU64) {
    (&EXPORTED, &FAILED)
}

/// The OTLP exporter, counting its exports and warning (at most once a minute) when the
/// collector refuses them or cannot be reached: otherwise a collector that is down or
/// misaddressed would lose every trace without a word.
#[derive(Debug)]
struct Reporting<E>(E);

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Reporting<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.0.export(batch).await;
        match &result {
            Ok(()) => {
                EXPORTED.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                FAILED.fetch_add(1, Ordering::Relaxed);
                let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
                if crate::server::warning_due(&mut warned, Instant::now()) {
                    tracing::warn!(
                        spans,
                        "traces: an export to the OTLP collector failed, its spans are lost (said at \
                     most once a minute; turbine_trace_exports_total counts them): {e}"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(
        &mut self,
        timeout: Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource)
    }
}

/// Where spans go, and under which service name.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    /// The collector's URL for spans.
    pub url: String,
    /// What set it, for messages: `--otlp-endpoint`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub source: &'static str,
    /// `service.name`; `None` where `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` gives it
    /// (the SDK reads them).
    pub service_name: Option<String>,
    /// What to warn about once the log is up.
    pub warnings: Vec<String>,
}

/// Where traces go: `--otlp-endpoint` (and `--otlp-service-name`) when given, else the
/// variables every OpenTelemetry SDK reads, which platforms set for the services they run (the
/// OpenTelemetry Operator's injection, a namespace's shared settings):
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the URL as is), `OTEL_EXPORTER_OTLP_ENDPOINT` (a base,
/// `/v1/traces` appended), `OTEL_SDK_DISABLED=true` (none of them), `OTEL_SERVICE_NAME` and the
/// `service.name` of `OTEL_RESOURCE_ATTRIBUTES` (else `turbine`), and the protocol variables
/// (`grpc` is warned about: this exporter speaks OTLP/HTTP). `env` reads a variable.
pub fn destination(
    endpoint: Option<&str>,
    service_name: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<Destination>> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let (url, source) = match endpoint {
        Some(e) => (traces_url(e, "--otlp-endpoint", true)?, "--otlp-endpoint"),
        None if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) => {
            return Ok(None)
        }
        None => {
            // The signal's own variable is a whole URL; the general one a base.
            let set = [
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", false),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", true),
            ]
            .into_iter()
            .find_map(|(name, append)| env(name).map(|e| (name, e, append)));
            let Some((name, e, append)) = set else {
                return Ok(None);
            };
            (traces_url(&e, name, append)?, name)
        }
    };
    let named_by_env = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
            attrs.split(',').any(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, _)| k.trim() == "service.name")
            })
        });
    let service_name = match service_name {
        Some(name) => Some(name.to_string()),
        None if named_by_env => None,
        None => Some("turbine".to_string()),
    };
    let mut warnings = Vec::new();
    if reqwest::Url::parse(&url).is_ok_and(|u| u.port() == Some(4317)) {
        warnings.push(format!(
            "{source} {url} has port 4317, OTLP/gRPC's; turbine sends OTLP/HTTP (protobuf), \
             which collectors take on port 4318"
        ));
    }
    // The signal's own protocol variable, else the general one.
    let protocol = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|name| env(name).map(|p| (name, p)));
    if let Some((name, _)) = protocol.filter(|(_, p)| p.trim() == "grpc") {
        warnings.push(format!(
            "{name}=grpc: turbine sends OTLP/HTTP (protobuf) to {url} whatever it says; a \
             collector takes that on its OTLP/HTTP port (4318)"
        ));
    }
    Ok(Some(Destination {
        url,
        source,
        service_name,
        warnings,
    }))
}

/// The collector's URL for spans from `endpoint` (set by `source`): as given when `append` is
/// false or it already ends in `/v1/traces`, else with `/v1/traces` appended (OTLP/HTTP's path;
/// collectors listen on port 4318).
fn traces_url(endpoint: &str, source: &str, append: bool) -> anyhow::Result<String> {
    let endpoint = endpoint.trim();
    let url = reqwest::Url::parse(endpoint)
        .with_context(|| format!("{source} is not a URL: {endpoint:?}"))?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https") && url.host_str().is_some(),
        "{source} must be an http:// or https:// URL of a collector (OTLP/HTTP, usually port \
         4318), got {endpoint:?}"
    );
    if !append || url.path().trim_end_matches('/').ends_with("/v1/traces") {
        return Ok(endpoint.to_string());
    }
    Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
}

/// The layer that turns spans into OpenTelemetry spans exported to `to`. Headers for the
/// collector (an API key) come from `OTEL_EXPORTER_OTLP_HEADERS` (`key=value,key2=value2`), and
/// resource attributes from `OTEL_RESOURCE_ATTRIBUTES`, as for any OpenTelemetry SDK.
pub fn layer<S>(
    to: &Destination,
) -> anyhow::Result<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(to.url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .with_context(|| format!("cannot make the OTLP exporter for {}", to.source))?;
    let mut resource = Resource::builder();
    if let Some(name) = &to.service_name {
        resource = resource.with_service_name(name.clone());
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Reporting(exporter))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("turbine");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Entering a span would start it, and a started span's name is fixed: the request's
        // is named only once routing knows its route ([`route_request`]).
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false))
}

/// Exports the spans still queued, for at most `limit`, before the process exits.
pub fn shutdown(limit: Duration) {
    if let Some(provider) = PROVIDER.get() {
        if let Err(e) = provider.shutdown_with_timeout(limit) {
            eprintln!("traces: the last spans were not all exported: {e}");
        }
    }
}

/// The request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` (a request's) a server span and, when the request carries a valid W3C
/// `traceparent`, the child of the caller's span. Nothing without `--otlp-endpoint`.
pub fn start_request(span: &tracing::Span, headers: &HeaderMap, method: &str, path: &str) {
    if !enabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span.record("otel.kind", "server");
    span.set_attribute("http.request.method", method.to_string());
    span.set_attribute("url.path", path.to_string());
}

/// Names the request's span by its route once routing found it (`POST /v1/images/generations`,
/// ids left out; the method alone for a path no route has, as OpenTelemetry's HTTP conventions
/// say), and records the trace id on it, so that JSON logs carry it beside the request id.
/// Called before anything starts the span: a span's name is fixed when it starts (which the
/// layer does lazily, as its context activation is off). Nothing without `--otlp-endpoint`.
pub fn route_request(span: &tracing::Span, method: &str, route: Option<&str>) {
    if !enabled() {
        return;
    }
    match route {
        Some(route) => {
            span.record("otel.name", format!("{method} {route}"));
            span.set_attribute("http.route", route.to_string());
        }
        None => {
            span.record("otel.name", method.to_string());
        }
    }
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// Records the request's status; a 5xx marks its span as failed. Nothing without
/// `--otlp-endpoint`.
pub fn finish_request(span: &tracing::Span, status: u16) {
    if !enabled() {
        return;
    }
    span.set_attribute("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.set_status(opentelemetry::trace::Status::error(format!(
            "answered {status}"
        )));
    }
}

/// Sets an attribute on `span` for the collector only (logs don't show it).
pub fn attribute(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if enabled() {
        span.set_attribute(key, value);
    }
}

/// Marks `span` as failed with `message`.
pub fn fail(span: &tracing::Span, message: String) {
    if enabled() {
        span.set_status(opentelemetry::trace::Status::error(message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_appended_unless_given() {
        let flag = |e: &str| destination(Some(e), None, |_| None);
        let url = |e: &str| flag(e).unwrap().unwrap().url;
        assert_eq!(
            url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("https://otel.example.com/"),
            "https://otel.example.com/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/v1/traces"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(url("http://gw:8080/otlp"), "http://gw:8080/otlp/v1/traces");
        let warnings = |e: &str| flag(e).unwrap().unwrap().warnings;
        assert!(warnings("http://collector:4317")[0].contains("port 4318"));
        assert!(warnings("http://collector:4318").is_empty());
        assert!(warnings("https://otel.example.com").is_empty());
        for bad in ["collector:4318", "grpc://collector:4317", "http://", ""] {
            let e = flag(bad).unwrap_err().to_string();
            assert!(e.contains("--otlp-endpoint"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_opentelemetry_variables_are_read_when_the_flags_are_not_given() {
        let with = |vars: &[(&str, &str)], endpoint: Option<&str>, service: Option<&str>| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            destination(endpoint, service, move |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
        };
        // Nothing set: no traces.
        assert_eq!(with(&[], None, None).unwrap(), None);
        assert_eq!(
            with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")], None, None).unwrap(),
            None
        );
        // The base endpoint gets the signal's path; the traces endpoint is used as it is.
        let d = with(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")],
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (d.url.as_str(), d.source, d.service_name.as_deref()),
            (
                "http://c:4318/v1/traces",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                Some("turbine")
            )
        );
        let both = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/custom"),
        ];
        let d = with(&both, None, None).unwrap().unwrap();
        assert_eq!(
            (d.url.as_str(), d.source),
            ("http://t:4318/custom", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        );
        // The flag wins over the variables.
        let d = with(&both, Some("http://f:4318"), Some("mine"))
            .unwrap()
            .unwrap();
        assert_eq!(d.url, "http://f:4318/v1/traces");
        assert_eq!(d.service_name.as_deref(), Some("mine"));
        // OTEL_SDK_DISABLED turns the variables off, not the flag.
        let off = [both[0], ("OTEL_SDK_DISABLED", "TRUE")];
        assert_eq!(with(&off, None, None).unwrap(), None);
        assert!(with(&off, Some("http://f:4318"), None).unwrap().is_some());
        // A service name from the environment is left to the SDK.
        for named in [
            ("OTEL_SERVICE_NAME", "imagegen"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.pod.name=p-1, service.name=imagegen",
            ),
        ] {
            let d = with(&[both[0], named], None, None).unwrap().unwrap();
            assert_eq!(d.service_name, None, "{named:?}");
        }
        let d = with(
            &[both[0], ("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=p-1")],
            None,
            None,
        );
        assert_eq!(d.unwrap().unwrap().service_name.as_deref(), Some("turbine"));
        // gRPC asked for: warned about, not failed.
        let grpc = [both[0], ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
        let d = with(&grpc, None, None).unwrap().unwrap();
        assert!(
            d.warnings[0].contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
            "{:?}",
            d.warnings
        );
        let grpc = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        let d = with(&grpc, None, None).unwrap().unwrap();
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert!(d.warnings[0]
            .contains("OTEL_EXPORTER_OTLP_ENDPOINT http://c:4317/v1/traces has port 4317"));
        // A bad URL names the variable it came from.
        let e = with(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
    }
}
