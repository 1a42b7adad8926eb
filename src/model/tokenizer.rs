//! The CLIP BPE tokenizer, as transformers' `CLIPTokenizer` (v5) builds it and as diffusers' SDXL
//! pipeline calls it: `tokenizer(prompts, padding="max_length", max_length=model_max_length,
//! truncation=True)`, i.e. `<|startoftext|>`, at most `max_length - 2` prompt tokens,
//! `<|endoftext|>`, then the pad token up to `max_length`.
//!
//! A tokenizer folder holds either `tokenizer.json` (a serialised `tokenizers` pipeline, loaded
//! as is) or `vocab.json` + `merges.txt`, from which the pipeline is rebuilt the way
//! `transformers/models/clip/tokenization_clip.py` does. `tokenizer_config.json` (and, for
//! configs without `added_tokens_decoder`, `special_tokens_map.json`) give the special tokens,
//! `model_max_length` and the pad token: SDXL's first tokenizer pads with `<|endoftext|>`, the
//! second with `!` (id 0).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::loader::{read_json, LoadError, LoadResult};

/// `CLIPTokenizer`'s pre-tokeniser pattern (transformers v5): the two special tokens, the
/// contractions, runs of letters, single digits, runs of other non-space symbols.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Named special-token fields in the order transformers registers them
/// (`PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`); the order decides which flags win
/// when two of them share a content (see [`special_tokens_to_add`]).
const SPECIAL_TOKEN_FIELDS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The fields of `tokenizer_config.json` that matter for encoding.
#[derive(Debug, Deserialize)]
struct TokenizerConfigFile {
    model_max_length: Option<Value>,
    #[serde(default)]
    added_tokens_decoder: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// A CLIP tokenizer producing fixed-length id rows.
pub struct ClipTokenizer {
    dir: PathBuf,
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("dir", &self.dir)
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder (`tokenizer/` or `tokenizer_2/` of the diffusers layout).
    pub fn from_dir(dir: &Path) -> LoadResult<Self> {
        if !dir.is_dir() {
            return Err(LoadError::MissingDir(dir.to_path_buf()));
        }
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfigFile = read_json(&config_path)?;
        let max_length = parse_max_length(&config_path, config.model_max_length.as_ref())?;

        let json_path = dir.join("tokenizer.json");
        let mut tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| LoadError::Config {
                path: json_path.clone(),
                message: format!("not a readable tokenizers file: {e}"),
            })?
        } else {
            build_from_vocab(dir)?
        };

        let named = named_special_tokens(dir, &config_path, &config)?;
        let decoder = added_tokens_decoder(&config_path, config.added_tokens_decoder.as_ref())?;
        let existing: HashSet<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .collect();
        let to_add = special_tokens_to_add(&existing, decoder, &named);
        tokenizer
            .add_tokens(to_add)
            .map_err(|e| LoadError::Config {
                path: config_path.clone(),
                message: format!("cannot register the special tokens: {e}"),
            })?;

        if !json_path.is_file() {
            let processor = post_processor(&tokenizer, &named, &config_path)?;
            tokenizer.with_post_processor(Some(processor));
        }

        let pad = named
            .iter()
            .find(|(field, _)| *field == "pad_token")
            .map(|(_, t)| t.content.clone())
            .ok_or_else(|| LoadError::Config {
                path: config_path.clone(),
                message: "field `pad_token` is missing (needed to pad to model_max_length)".into(),
            })?;
        let pad_id = tokenizer
            .token_to_id(&pad)
            .ok_or_else(|| LoadError::Unsupported {
                path: config_path.clone(),
                field: "pad_token".into(),
                value: format!("{pad:?}"),
                why: "the pad token is not in the vocabulary".into(),
            })?;

        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| LoadError::Config {
                path: config_path.clone(),
                message: format!("cannot truncate to model_max_length {max_length}: {e}"),
            })?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad,
        }));

        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            max_length,
            pad_id,
        })
    }

    /// The fixed number of ids per prompt (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Exactly `max_length` ids: BOS, the prompt's tokens (truncated), EOS, padding.
    pub fn encode(&self, text: &str) -> candle_core::Result<Vec<u32>> {
        Ok(self.encode_reading(text)?.0)
    }

    /// [`Self::encode`], and where the part of `text` this tokenizer reads ends, in bytes,
    /// when the rest is cut off (its tokens past `max_length - 2`; `None` when all is read).
    pub fn encode_reading(&self, text: &str) -> candle_core::Result<(Vec<u32>, Option<usize>)> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| {
            candle_core::Error::Msg(format!(
                "tokenizer {}: cannot encode the prompt: {e}",
                self.dir.display()
            ))
        })?;
        let ids = encoding.get_ids();
        if ids.len() != self.max_length {
            return Err(candle_core::Error::Msg(format!(
                "tokenizer {}: produced {} ids instead of model_max_length {} (its tokenizer.json \
                 overrides truncation or padding)",
                self.dir.display(),
                ids.len(),
                self.max_length
            )));
        }
        let read_up_to = if encoding.get_overflowing().is_empty() {
            None
        } else {
            // The end of the last token kept that is the prompt's own (not BOS, EOS, padding).
            let end = encoding
                .get_offsets()
                .iter()
                .zip(encoding.get_special_tokens_mask())
                .filter(|(_, &special)| special == 0)
                .map(|(&(_, end), _)| end)
                .max()
                .unwrap_or(0);
            // Offsets are bytes of `text`; keep to a character boundary all the same.
            let mut end = end.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Some(end)
        };
        Ok((ids.to_vec(), read_up_to))
    }

    /// A `u32` tensor `[texts.len(), max_length]` on `device`.
    pub fn encode_batch(&self, texts: &[&str], device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            self.encode_ids(texts)?,
            (texts.len(), self.max_length),
            device,
        )
    }

    /// [`Self::encode_batch`]'s ids on the host: `texts.len()` rows of `max_length`, flat.
    pub fn encode_ids(&self, texts: &[&str]) -> candle_core::Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(texts.len() * self.max_length);
        for text in texts {
            ids.extend(self.encode(text)?);
        }
        Ok(ids)
    }
}

fn parse_max_length(path: &Path, value: Option<&Value>) -> LoadResult<usize> {
    let value = value.ok_or_else(|| LoadError::Config {
        path: path.to_path_buf(),
        message: "field `model_max_length` is missing".into(),
    })?;
    // transformers writes 1e30 ("no limit") for tokenizers without one; CLIP's positional
    // embedding table makes a real bound necessary, so such configs are refused.
    match value.as_u64() {
        Some(n) if (3..=1_000_000).contains(&n) => Ok(n as usize),
        _ => Err(LoadError::Unsupported {
            path: path.to_path_buf(),
            field: "model_max_length".into(),
            value: value.to_string(),
            why: "expected the encoder's sequence length (77 for CLIP)".into(),
        }),
    }
}

/// Rebuilds `CLIPTokenizer`'s pipeline from `vocab.json` + `merges.txt`.
fn build_from_vocab(dir: &Path) -> LoadResult<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for (path, what) in [(&vocab, "vocab.json"), (&merges, "merges.txt")] {
        if !path.is_file() {
            return Err(LoadError::MissingFile {
                path: path.clone(),
                what: format!("tokenizer folder has neither tokenizer.json nor {what}"),
            });
        }
    }
    let bad = |message: String| LoadError::Config {
        path: dir.to_path_buf(),
        message,
    };
    let (vocab_s, merges_s) = match (vocab.to_str(), merges.to_str()) {
        (Some(v), Some(m)) => (v, m),
        _ => return Err(bad("tokenizer path is not valid UTF-8".into())),
    };
    let unk = "<|endoftext|>".to_string();
    let model = BPE::from_file(vocab_s, merges_s)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .unk_token(unk)
        .build()
        .map_err(|e| bad(format!("cannot read vocab.json / merges.txt: {e}")))?;

    let mut tokenizer = Tokenizer::new(model);
    let replace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| bad(format!("normaliser: {e}")))?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            replace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| bad(format!("normaliser: {e}")))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| bad(format!("pre-tokeniser: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// `RobertaProcessing(eos, bos)` as `CLIPTokenizer` sets it: `<bos> tokens <eos>`.
fn post_processor(
    tokenizer: &Tokenizer,
    named: &[(&'static str, AddedToken)],
    config_path: &Path,
) -> LoadResult<RobertaProcessing> {
    let id_of = |field: &str| -> LoadResult<(String, u32)> {
        let content = named
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, t)| t.content.clone())
            .ok_or_else(|| LoadError::Config {
                path: config_path.to_path_buf(),
                message: format!("field `{field}` is missing"),
            })?;
        let id = tokenizer
            .token_to_id(&content)
            .ok_or_else(|| LoadError::Unsupported {
                path: config_path.to_path_buf(),
                field: field.into(),
                value: format!("{content:?}"),
                why: "the token is not in the vocabulary".into(),
            })?;
        Ok((content, id))
    };
    Ok(
        RobertaProcessing::new(id_of("eos_token")?, id_of("bos_token")?)
            .trim_offsets(false)
            .add_prefix_space(false),
    )
}

/// Reads an `AddedToken` as transformers serialises it: a plain string (a special token,
/// not normalised) or an object with `content` and flags. Absent flags take Python
/// `AddedToken`'s defaults: `special` false and `normalized = not special`, except that
/// `special_tokens_map.json` objects are made special before the default applies.
fn parse_added_token(
    path: &Path,
    field: &str,
    value: &Value,
    forced_special: bool,
) -> LoadResult<AddedToken> {
    match value {
        Value::String(s) => Ok(AddedToken::from(s.clone(), true)),
        Value::Object(m) => {
            let content =
                m.get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| LoadError::Config {
                        path: path.to_path_buf(),
                        message: format!("field `{field}` has no string `content`"),
                    })?;
            let flag = |name: &str| m.get(name).and_then(Value::as_bool);
            let special = forced_special || flag("special").unwrap_or(false);
            Ok(AddedToken::from(content, special)
                .single_word(flag("single_word").unwrap_or(false))
                .lstrip(flag("lstrip").unwrap_or(false))
                .rstrip(flag("rstrip").unwrap_or(false))
                .normalized(flag("normalized").unwrap_or(!special)))
        }
        other => Err(LoadError::Config {
            path: path.to_path_buf(),
            message: format!("field `{field}` must be a string or a token object, got {other}"),
        }),
    }
}

/// The named special tokens (bos, eos, unk, pad ...) in registration order. Configs without
/// `added_tokens_decoder` are the legacy layout, where `special_tokens_map.json` overrides
/// `tokenizer_config.json` (transformers' `_from_pretrained`).
fn named_special_tokens(
    dir: &Path,
    config_path: &Path,
    config: &TokenizerConfigFile,
) -> LoadResult<Vec<(&'static str, AddedToken)>> {
    let map_path = dir.join("special_tokens_map.json");
    let legacy_map: Option<serde_json::Map<String, Value>> =
        if config.added_tokens_decoder.is_none() && map_path.is_file() {
            Some(read_json(&map_path)?)
        } else {
            None
        };
    let mut out = Vec::new();
    for field in SPECIAL_TOKEN_FIELDS {
        let from_map = legacy_map.as_ref().and_then(|m| m.get(field));
        let token = match (from_map, config.rest.get(field)) {
            (Some(v), _) if !v.is_null() => parse_added_token(&map_path, field, v, true)?,
            (_, Some(v)) if !v.is_null() => parse_added_token(config_path, field, v, false)?,
            _ => continue,
        };
        // Named tokens are special whatever their object says (transformers sets the flag
        // after the `normalized` default was taken).
        let token = token.special(true);
        out.push((field, token));
    }
    Ok(out)
}

/// `added_tokens_decoder` of `tokenizer_config.json`, sorted by id.
fn added_tokens_decoder(
    path: &Path,
    decoder: Option<&serde_json::Map<String, Value>>,
) -> LoadResult<Vec<AddedToken>> {
    let Some(decoder) = decoder else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::with_capacity(decoder.len());
    for (id, value) in decoder {
        let id: u32 = id.parse().map_err(|_| LoadError::Config {
            path: path.to_path_buf(),
            message: format!("added_tokens_decoder key {id:?} is not a token id"),
        })?;
        let field = format!("added_tokens_decoder.{id}");
        entries.push((id, parse_added_token(path, &field, value, false)?));
    }
    entries.sort_by_key(|(id, _)| *id);
    Ok(entries.into_iter().map(|(_, t)| t).collect())
}

/// The added tokens in the order `TokenizersBackend.__init__` registers them: the config's
/// `added_tokens_decoder`, then each named special token unless its content was already
/// registered before this step or an identical token (content and flags) is already queued.
///
/// Two named tokens with one content but different flags are both queued and the later one's
/// flags win. This is why SDXL's first tokenizer (whose `pad_token` is a non-normalised
/// `<|endoftext|>`) does not match `<|ENDOFTEXT|>` as EOS while the second one does.
fn special_tokens_to_add(
    existing: &HashSet<String>,
    decoder: Vec<AddedToken>,
    named: &[(&'static str, AddedToken)],
) -> Vec<AddedToken> {
    let known: HashSet<String> = existing
        .iter()
        .cloned()
        .chain(decoder.iter().map(|t| t.content.clone()))
        .collect();
    let mut out = decoder;
    for (_, token) in named {
        if !known.contains(&token.content) && !out.contains(token) {
            out.push(token.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> ClipTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-sdxl/tokenizer");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    /// A prompt past CLIP's 75 tokens is read up to the end of its 75th; the part read is
    /// itself read whole.
    #[test]
    fn the_part_of_a_long_prompt_that_is_read() {
        let t = fixture();
        let read_up_to = |text: &str| t.encode_reading(text).unwrap().1;
        assert_eq!(read_up_to("a red fox in the snow"), None);
        let seventy_five = vec!["fox"; 75].join(" ");
        assert_eq!(read_up_to(&seventy_five), None);
        let long = format!("{seventy_five} and a hare in a field");
        let end = read_up_to(&long).unwrap();
        assert_eq!(&long[..end], seventy_five);
        assert_eq!(read_up_to(&long[..end]), None);
        // Multi-byte text: the end is a character boundary of the prompt.
        let accents = vec!["café"; 120].join(" ");
        let end = read_up_to(&accents).unwrap();
        assert!(accents.is_char_boundary(end) && end < accents.len());
        assert!(accents[..end].ends_with("café"), "{}", &accents[..end]);
    }

    fn tok(content: &str, normalized: bool) -> AddedToken {
        AddedToken::from(content, true).normalized(normalized)
    }

    #[test]
    fn later_named_token_with_other_flags_is_queued() {
        let named = vec![
            ("bos_token", tok("<s>", true)),
            ("eos_token", tok("</s>", true)),
            ("unk_token", tok("</s>", true)),
            ("pad_token", tok("</s>", false)),
        ];
        let out = special_tokens_to_add(&HashSet::new(), Vec::new(), &named);
        assert_eq!(
            out,
            vec![tok("<s>", true), tok("</s>", true), tok("</s>", false)]
        );
    }

    #[test]
    fn tokens_already_known_are_skipped() {
        let existing: HashSet<String> = ["<s>".to_string()].into_iter().collect();
        let decoder = vec![tok("!", false)];
        let named = vec![
            ("bos_token", tok("<s>", false)),
            ("pad_token", tok("!", true)),
        ];
        let out = special_tokens_to_add(&existing, decoder, &named);
        assert_eq!(out, vec![tok("!", false)]);
    }

    #[test]
    fn max_length_bounds() {
        let p = Path::new("tokenizer_config.json");
        assert_eq!(parse_max_length(p, Some(&Value::from(77))).unwrap(), 77);
        assert!(parse_max_length(p, None).is_err());
        let huge: Value = serde_json::from_str("1000000000000000019884624838656").unwrap();
        let err = parse_max_length(p, Some(&huge)).unwrap_err().to_string();
        assert!(err.contains("model_max_length"), "{err}");
    }
}
