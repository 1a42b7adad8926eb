//! The tiny model as a single-file checkpoint (the original SGM layout, float16), written from
//! tests/fixtures/tiny-sdxl by the recipe scripts/fixtures/ref_single_file.py checked against
//! diffusers' converter (tests/fixtures/reference/single_file_recipe.json), and checked here
//! against the digest the script recorded: the file is the one diffusers' references came from.
//! (It is made at test time because tests/fixtures keeps to a 25 MB budget.)
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize)]
struct Recipe {
    constants: HashMap<String, f64>,
    sha256: String,
    tensors: Vec<Vec<String>>,
}

/// A component's tensors, from its `{stem}.safetensors` or `{stem}.fp16.safetensors`.
fn component(name: &str) -> HashMap<String, Tensor> {
    let stem = if name.starts_with("text_encoder") {
        "model"
    } else {
        "diffusion_pytorch_model"
    };
    let dir = fixtures().join("tiny-sdxl").join(name);
    let file = [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ]
    .into_iter()
    .map(|f| dir.join(f))
    .find(|p| p.is_file())
    .unwrap_or_else(|| panic!("no weights in {}", dir.display()));
    candle_core::safetensors::load(&file, &Device::Cpu).unwrap()
}

/// The recipe's tensors (float16), by original name.
pub fn tiny_checkpoint_tensors() -> HashMap<String, Tensor> {
    let p = fixtures().join("reference/single_file_recipe.json");
    let recipe: Recipe = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let mut components: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    let mut out = HashMap::new();
    for row in &recipe.tensors {
        let [name, op, comp, sources @ ..] = row.as_slice() else {
            panic!("bad recipe row {row:?}");
        };
        let tensors = components
            .entry(comp.clone())
            .or_insert_with(|| component(comp));
        let ts: Vec<Tensor> = sources
            .iter()
            .map(|s| tensors[s].to_dtype(DType::F16).unwrap())
            .collect();
        let t = match op.as_str() {
            "copy" => ts[0].clone(),
            "cat" => Tensor::cat(&ts, 0).unwrap(),
            "t" => ts[0].t().unwrap().contiguous().unwrap(),
            "conv" => {
                let (o, i) = ts[0].dims2().unwrap();
                ts[0].reshape((o, i, 1, 1)).unwrap()
            }
            other => panic!("unknown recipe op {other}"),
        };
        out.insert(name.clone(), t);
    }
    for (name, value) in &recipe.constants {
        let t = Tensor::new(*value as f32, &Device::Cpu).unwrap();
        out.insert(name.clone(), t.to_dtype(DType::F16).unwrap());
    }
    assert_eq!(
        digest(&out),
        recipe.sha256,
        "the checkpoint made from the recipe is not the one diffusers' references came from"
    );
    out
}

/// SHA-256 over every tensor in name order: name, 0, its dims (u64 LE), its values as f32 LE
/// (what ref_single_file.py's `digest` computes).
fn digest(tensors: &HashMap<String, Tensor>) -> String {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        let t = &tensors[name];
        h.update(name.as_bytes());
        h.update([0u8]);
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let values = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// `tiny_sdxl_turbo_fp16.safetensors`, written once per test process into cargo's temporary
/// folder for integration tests (target/tmp), under a private name then renamed into place, so
/// test processes running at once each see a whole file.
pub fn tiny_checkpoint() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tiny_sdxl_turbo_fp16.safetensors");
        let partial = dir.join(format!(
            "tiny_sdxl_turbo_fp16.{}.partial",
            std::process::id()
        ));
        candle_core::safetensors::save(&tiny_checkpoint_tensors(), &partial).unwrap();
        std::fs::rename(&partial, &p).unwrap();
        p
    })
}
