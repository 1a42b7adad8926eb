//! Command-line entry points. Each subcommand owns its `Args` (clap) and `run`.

pub mod bench;
pub mod download;
pub mod generate;
pub mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use candle_core::{DType, Device};

use crate::hub::ModelArgs;
use crate::model::pipeline::Pipeline;

/// Resolves `--model/--model-dir/--checkpoint/--random-weights/--vae/--preview-vae` (downloading missing weights unless
/// offline) and loads the pipeline: the one way every command gets its model.
pub fn load_pipeline(model: &ModelArgs, device: &Device, dtype: DType) -> anyhow::Result<Pipeline> {
    load_resolved(&model.resolve()?, &[], false, device, dtype)
}

/// The pipeline of a model already resolved, with `adapters` (`--lora-modules`) next to it;
/// with `runtime_adapters`, able to build more while serving (`--allow-runtime-lora-updating`).
pub fn load_resolved(
    m: &crate::hub::ResolvedModel,
    adapters: &[crate::model::lora::AdapterSpec],
    runtime_adapters: bool,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<Pipeline> {
    let spec = crate::model::pipeline::LoadSpec {
        dir: m.dir.clone(),
        checkpoint: m.checkpoint.clone(),
        vae_dir: m.vae_dir.clone(),
        preview_dir: m.preview_vae_dir.clone(),
        loras: m.loras.clone(),
        random_seed: m.random_weights.then_some(0),
        adapters: adapters.to_vec(),
        runtime_adapters,
    };
    Ok(Pipeline::load_spec(&spec, device, dtype)?)
}

/// `--kernels`, shared by every command that runs the model.
#[derive(Debug, Clone, clap::Args)]
pub struct KernelArgs {
    /// turbine's own kernels to use: `all`, `none` (candle's ops only, the baseline), or a
    /// comma-separated list of group-norm, geglu, attention, conv, channels-last,
    /// bias-residual, postprocess, flash, overlap, upsample-conv, conv-graph, stream-order;
    /// `-name` removes one (`all,-flash`).
    #[arg(long, env = "TURBINE_KERNELS", default_value = "all", value_parser = crate::ops::Kernels::parse)]
    pub kernels: crate::ops::Kernels,
}

impl KernelArgs {
    /// Makes the choice process-wide; call before the model runs.
    pub fn apply(&self) {
        crate::ops::set_kernels(self.kernels);
    }
}

/// An error caused by the user's input (bad flag value, missing file): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, message, the event's fields, and
    /// the request span's `id` and its API key's `key` label), for log collectors.
    Json,
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Logs go to stderr, through a queue of at most `buffer_bytes` that never blocks the code
/// that logs ([`crate::logging`]); `RUST_LOG` overrides the default `info` level.
pub fn init_tracing(
    format: LogFormat,
    buffer_bytes: usize,
    otlp: Option<&crate::telemetry::Destination>,
) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let _ = LOG_FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(colour_logs(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(crate::logging::QueuedStderr::start(buffer_bytes));
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    // RUST_LOG sets what the log shows; the collector gets turbine's own spans and events at
    // `info` and above, whatever the log's level (not hyper's or the HTTP client's).
    let (traces, failed) = match otlp {
        Some(o) => match crate::telemetry::layer(o) {
            Ok(layer) => (
                Some(
                    layer.with_filter(
                        tracing_subscriber::filter::Targets::new()
                            .with_target("turbine", tracing::Level::INFO),
                    ),
                ),
                None,
            ),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(traces)
        .try_init();
    for warning in otlp.iter().flat_map(|o| &o.warnings) {
        tracing::warn!("{warning}");
    }
    if let Some(o) = otlp {
        tracing::info!(url = %o.url, set_by = o.source, "traces go to an OTLP collector");
    }
    match failed {
        Some(e) => Err(UsageError(format!("{e:#}")).into()),
        None => Ok(()),
    }
}

/// Whether text logs carry colours (ANSI escapes): only on a terminal, and not with
/// `NO_COLOR` set to anything (<https://no-color.org>). Elsewhere the escapes are noise: journald
/// stores such a line as a byte array (`journalctl` shows `[N blob data]`), and `docker logs`,
/// `kubectl logs` and the collectors behind them keep the bytes in every line.
fn colour_logs(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The longest the process waits at exit for its queued log lines to be written: stderr may be
/// the one that stopped reading.
pub const EXIT_FLUSH: Duration = Duration::from_secs(5);

/// Maps a command's result to the process exit code: 0 ok, 2 usage error, 1 anything else.
/// The spans and log lines still queued are written first (for at most [`EXIT_FLUSH`] each).
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    // The spans of the last requests, still queued for the collector.
    crate::telemetry::shutdown(EXIT_FLUSH);
    match result {
        Ok(()) => {
            crate::logging::flush(EXIT_FLUSH);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let json = LOG_FORMAT.get() == Some(&LogFormat::Json);
            if json {
                // A collector that reads JSON lines gets the reason too.
                tracing::error!(error = %format!("{e:#}"), "exiting");
            }
            crate::logging::flush(EXIT_FLUSH);
            if !json {
                eprintln!("error: {e:#}");
            }
            // Distinct codes per cause (network, token, disk...) for scripts/download_weights.sh.
            if let Some(h) = e.downcast_ref::<crate::hub::HubError>() {
                return ExitCode::from(h.exit_code());
            }
            if e.downcast_ref::<UsageError>().is_some()
                || e.downcast_ref::<crate::model::loader::LoadError>()
                    .is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
