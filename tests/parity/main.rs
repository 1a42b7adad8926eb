//! Parity with diffusers/transformers on the tiny random model in `tests/fixtures/tiny-sdxl`.
//! Reference outputs come from `scripts/make_fixtures.sh` (see `scripts/fixtures/`).

mod clip;
mod common;
mod img2img;
mod kernels;
mod lora;
mod pipeline;
mod scheduler;
mod single_file;
#[path = "../support/checkpoint.rs"]
mod tiny_checkpoint;
mod tokenizer;
mod unet;
mod vae;
mod vae_channels_last;
mod vae_tiny;
