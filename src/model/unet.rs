//! TODO: unet
