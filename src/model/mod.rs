//! The SDXL-Turbo models, written here against diffusers/transformers semantics.
//!
//! One concept per file; struct and field names follow the checkpoint's tensor names so
//! `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` maps to code directly.

pub mod checkpoint;
pub mod chunks;
pub mod clip;
pub mod loader;
pub mod lora;
pub mod noise;
pub mod pipeline;
pub mod profile;
pub mod prompt_cache;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_tiny;
