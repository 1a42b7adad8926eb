//! The real SDXL-Turbo architecture without weights: the tensor names and shapes our code reads
//! for the Hub's configs (models/sdxl-turbo) are exactly those of the checkpoint diffusers /
//! transformers write for those configs (models/sdxl-turbo/tensors.json, produced by
//! scripts/fixtures/real_manifest.py on the meta device). Almost nothing is allocated (the models are
//! built on a recording backend that hands out broadcast zeros; only weights the model transforms
//! at build time, like the attention scale folded into `to_q`, are materialised).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::DType;
use turbine::model::clip::{ClipTextConfig, ClipTextModel};
use turbine::model::loader::{diff_tensor_lists, RecordingBackend};
use turbine::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use turbine::model::vae::{AutoencoderKL, AutoencoderKLConfig};

type Manifest = BTreeMap<String, BTreeMap<String, Vec<usize>>>;

fn real_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/sdxl-turbo")
}

fn manifest() -> Manifest {
    let p = real_dir().join("tensors.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn check(component: &str, build: impl FnOnce(candle_nn::VarBuilder<'static>)) {
    let manifest = manifest();
    let theirs = manifest
        .get(component)
        .unwrap_or_else(|| panic!("tensors.json has no `{component}`"));
    let rec = RecordingBackend::new();
    let requested = rec.requested();
    build(rec.into_var_builder(DType::F16));
    let ours = requested.snapshot();
    let diff = diff_tensor_lists(&ours, theirs);
    assert!(
        diff.is_empty(),
        "{component}: {} differences between the tensors we read and the checkpoint:\n{}",
        diff.len(),
        diff.join("\n")
    );
    eprintln!(
        "{component}: {} tensors, all read, all shapes equal",
        ours.len()
    );
}

#[test]
fn unet_reads_exactly_the_checkpoint() {
    let cfg = UNet2DConditionConfig::from_file(&real_dir().join("unet/config.json")).unwrap();
    check("unet", |vb| {
        UNet2DConditionModel::new(vb, &cfg).unwrap();
    });
}

#[test]
fn vae_reads_exactly_the_checkpoint() {
    let cfg = AutoencoderKLConfig::from_file(&real_dir().join("vae/config.json")).unwrap();
    check("vae", |vb| {
        AutoencoderKL::new(vb, &cfg).unwrap();
    });
}

#[test]
fn text_encoders_read_exactly_the_checkpoint() {
    for (component, projection) in [("text_encoder", false), ("text_encoder_2", true)] {
        let cfg =
            ClipTextConfig::from_file(&real_dir().join(component).join("config.json")).unwrap();
        check(component, |vb| {
            ClipTextModel::new(vb, &cfg, projection).unwrap();
        });
    }
}
