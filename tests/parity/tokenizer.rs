//! Token ids vs transformers' `CLIPTokenizer` (scripts/fixtures/ref_tokenizer.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Deserialize;
use turbine::model::loader::LoadError;
use turbine::model::tokenizer::ClipTokenizer;

use crate::common;

#[derive(Deserialize)]
struct Expected {
    max_length: usize,
    pad_token_id: u32,
    /// Rows without their trailing padding.
    ids: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<String>,
    tokenizers: std::collections::BTreeMap<String, Expected>,
}

fn reference() -> Reference {
    let p = common::fixtures().join("reference/tokenizer.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/make_fixtures.sh)", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn check_dir(name: &str, dir: &Path) {
    let r = reference();
    let exp = &r.tokenizers[name];
    let tok = ClipTokenizer::from_dir(dir).unwrap();
    assert_eq!(tok.max_length(), exp.max_length);
    assert_eq!(tok.pad_id(), exp.pad_token_id);
    assert!(r.prompts.len() >= 200);
    let mut mismatches = Vec::new();
    for (prompt, row) in r.prompts.iter().zip(&exp.ids) {
        let mut want = row.clone();
        want.resize(exp.max_length, exp.pad_token_id);
        let got = tok.encode(prompt).unwrap();
        assert_eq!(got.len(), exp.max_length);
        if got != want {
            mismatches.push(format!("{prompt:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    eprintln!(
        "{name}: {}/{} prompts identical",
        r.prompts.len() - mismatches.len(),
        r.prompts.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));

    // The batch tensor is the rows stacked.
    let texts: Vec<&str> = r.prompts.iter().take(5).map(String::as_str).collect();
    let t = tok.encode_batch(&texts, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[5, exp.max_length]);
    assert_eq!(t.dtype(), DType::U32);
    let rows: Vec<Vec<u32>> = t.to_vec2().unwrap();
    for (text, row) in texts.iter().zip(rows) {
        assert_eq!(row, tok.encode(text).unwrap());
    }
}

#[test]
fn tokenizer_matches_transformers() {
    check_dir("tokenizer", &common::tiny_model().join("tokenizer"));
}

#[test]
fn tokenizer_2_matches_transformers() {
    check_dir("tokenizer_2", &common::tiny_model().join("tokenizer_2"));
}

/// A folder holding only transformers' `tokenizer.json` serialisation (+ config).
#[test]
fn tokenizer_json_matches_transformers() {
    let dir = common::fixtures().join("reference/tokenizer_json");
    assert!(dir.join("tokenizer.json").is_file());
    assert!(!dir.join("vocab.json").exists());
    check_dir("tokenizer_json", &dir);
}

fn copy_without(src: &Path, skip: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        if path.file_name().unwrap() != skip {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    tmp
}

#[test]
fn missing_vocab_files_are_named() {
    let src = common::tiny_model().join("tokenizer");
    for file in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        let tmp = copy_without(&src, file);
        let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err();
        assert!(
            matches!(err, LoadError::MissingFile { .. }),
            "{file}: unexpected error {err}"
        );
        assert!(err.to_string().contains(file), "{file}: {err}");
    }
}
