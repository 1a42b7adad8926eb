//! The `turbine` command: `generate`, `serve`, `download`, `bench`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "turbine",
    version,
    about = "Self-hosted SDXL-Turbo image generation, speaking the OpenAI Images API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr: `text`, or `json` (one object per line, for log
    /// collectors). `RUST_LOG` sets the level (default `info`).
    #[arg(
        long,
        env = "TURBINE_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    log_format: turbine::cli::LogFormat,
    /// Bytes of log lines that may wait for stderr while its reader is slow or blocked (a
    /// Docker log driver, journald); past them, lines are dropped and counted
    /// (`turbine_log_lines_dropped_total`) rather than the server waiting.
    #[arg(
        long,
        env = "TURBINE_LOG_BUFFER_BYTES",
        default_value_t = turbine::logging::DEFAULT_BUFFER_BYTES,
        global = true
    )]
    log_buffer_bytes: usize,
    /// An OpenTelemetry collector to send traces to, over OTLP/HTTP (`http://collector:4318`;
    /// `/v1/traces` is appended unless the URL ends with it). Each request is a span, the
    /// child of the caller's when it sends a W3C `traceparent`, with a child span per image
    /// for its batch on the device (queue wait, batch size, stage times). Headers for the
    /// collector: `OTEL_EXPORTER_OTLP_HEADERS`, resource attributes: `OTEL_RESOURCE_ATTRIBUTES`.
    /// Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (with
    /// `/v1/traces`), as any OpenTelemetry SDK reads them (not with `OTEL_SDK_DISABLED=true`);
    /// none of them: no traces.
    #[arg(long, env = "TURBINE_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
    /// The `service.name` the traces carry (default: `OTEL_SERVICE_NAME`, or the `service.name`
    /// of `OTEL_RESOURCE_ATTRIBUTES`, else `turbine`).
    #[arg(long, env = "TURBINE_OTLP_SERVICE_NAME", global = true)]
    otlp_service_name: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from prompts and write them as PNG files.
    Generate(Box<turbine::cli::generate::Args>),
    /// Serve the OpenAI Images API over HTTP.
    Serve(turbine::cli::serve::Args),
    /// Download a model's weights from the Hugging Face Hub (or a mirror).
    Download(turbine::cli::download::Args),
    /// Measure end-to-end images/s and per-stage times over a sweep of batch sizes.
    Bench(Box<turbine::cli::bench::Args>),
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let otlp = match turbine::telemetry::destination(
        cli.otlp_endpoint.as_deref(),
        cli.otlp_service_name.as_deref(),
        |name| std::env::var(name).ok(),
    ) {
        Ok(otlp) => otlp,
        Err(e) => {
            return turbine::cli::exit_code(Err(turbine::cli::UsageError(format!("{e:#}")).into()))
        }
    };
    if let Err(e) = turbine::cli::init_tracing(cli.log_format, cli.log_buffer_bytes, otlp.as_ref())
    {
        return turbine::cli::exit_code(Err(e));
    }
    let result = match cli.command {
        Command::Generate(a) => turbine::cli::generate::run(*a),
        Command::Serve(a) => turbine::cli::serve::run(a),
        Command::Download(a) => turbine::cli::download::run(a),
        Command::Bench(a) => turbine::cli::bench::run(*a),
    };
    turbine::cli::exit_code(result)
}

/// At most 2 of glibc's malloc arenas (`MALLOC_ARENA_MAX=2`), unless the environment sets its
/// own `MALLOC_ARENA_MAX`. By default glibc gives threads that allocate at once arenas of their
/// own, up to 8 per core, and each keeps what its requests freed (an image's pixels, its PNG,
/// its base64) scattered in its heap instead of returning it. Under 8 minutes of mixed requests
/// on 2 cores the server's least resident memory was 211 MiB and crept up 28 MiB; with 2
/// arenas it was 108 MiB and stayed there, as many requests were served, and the peak fell from
/// 1081 to 650 MiB (`scripts/bench/soak.py`, benches/RESULTS.md). A GPU machine's 16+ cores
/// would allow 128+ such arenas. Called first, before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets one of malloc's parameters; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
