//! TODO: tokenizer
