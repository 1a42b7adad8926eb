//! TODO: clip
