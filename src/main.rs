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
    let cli = Cli::parse();
    turbine::cli::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Generate(a) => turbine::cli::generate::run(*a),
        Command::Serve(a) => turbine::cli::serve::run(a),
        Command::Download(a) => turbine::cli::download::run(a),
        Command::Bench(a) => turbine::cli::bench::run(*a),
    };
    turbine::cli::exit_code(result)
}
