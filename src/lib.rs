//! turbine: a self-hosted SDXL-Turbo image-generation server on candle, speaking the OpenAI
//! Images API.
//!
//! Layers, from the bottom up:
//! - [`model`]: the SDXL-Turbo models written here (tokenizers, both CLIP text encoders, the
//!   UNet, the VAE, the Euler-ancestral scheduler) and the [`model::pipeline::Pipeline`] that
//!   turns a batch of prompts + seeds of one shape into 8-bit RGB images.
//! - [`device`]: picking a candle device and dtype from user strings.
//! - [`server`]: the OpenAI Images API over HTTP, with a dynamic batcher feeding one model
//!   thread per device.
//! - [`ops`]: fused GroupNorm(+SiLU), GEGLU and attention: our CUDA kernels, CPU references.
//! - [`logging`]: log lines to stderr through a queue that never blocks the code that logs.
//! - [`telemetry`]: traces of the requests to an OpenTelemetry collector (`--otlp-endpoint`).
//! - [`hub`]: model manifests, `turbine download` from the Hugging Face Hub or a mirror, and
//!   [`hub::ModelArgs`], which finds (or fetches) the model directory to load.

pub mod cli;
pub mod device;
pub mod hub;
pub mod logging;
pub mod model;
pub mod ops;
pub mod server;
pub mod telemetry;
