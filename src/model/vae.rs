//! TODO: vae
