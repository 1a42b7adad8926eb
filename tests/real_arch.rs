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

/// What the model built from `component`'s config asks for: diffusers name → shape.
fn requested(build: impl FnOnce(candle_nn::VarBuilder<'static>)) -> BTreeMap<String, Vec<usize>> {
    let rec = RecordingBackend::new();
    let requested = rec.requested();
    build(rec.into_var_builder(DType::F16));
    requested.snapshot()
}

/// `--checkpoint` with the real model: every tensor the four components ask for comes from a
/// tensor of Stability AI's single-file layout (models/sdxl-turbo/single_file_tensors.json,
/// written by scripts/fixtures/ref_single_file.py and checked there against diffusers'
/// converter) and has the asked-for shape once sliced, transposed or squeezed; and every tensor
/// of that layout is read.
#[test]
fn a_single_file_checkpoint_gives_every_component_exactly_its_tensors() {
    use turbine::model::checkpoint::{original, Layout, Part};

    let p = real_dir().join("single_file_tensors.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let file: BTreeMap<String, Vec<usize>> = serde_json::from_str(&text).unwrap();

    let unet_cfg = UNet2DConditionConfig::from_file(&real_dir().join("unet/config.json")).unwrap();
    let vae_cfg = AutoencoderKLConfig::from_file(&real_dir().join("vae/config.json")).unwrap();
    let clip =
        |c: &str| ClipTextConfig::from_file(&real_dir().join(c).join("config.json")).unwrap();
    let (te_cfg, te2_cfg) = (clip("text_encoder"), clip("text_encoder_2"));
    let layout = Layout::from_configs(&unet_cfg, &vae_cfg).unwrap();
    let parts = [
        (
            Part::Unet,
            requested(|vb| drop(UNet2DConditionModel::new(vb, &unet_cfg).unwrap())),
        ),
        (
            Part::Vae,
            requested(|vb| drop(AutoencoderKL::new(vb, &vae_cfg).unwrap())),
        ),
        (
            Part::TextEncoder,
            requested(|vb| drop(ClipTextModel::new(vb, &te_cfg, false).unwrap())),
        ),
        (
            Part::TextEncoder2,
            requested(|vb| drop(ClipTextModel::new(vb, &te2_cfg, true).unwrap())),
        ),
    ];
    let mut read = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for (part, asked) in &parts {
        for (name, shape) in asked {
            let Some(how) = original(*part, name, &layout, "first_stage_model.") else {
                problems.push(format!("{part:?} {name}: no original name"));
                continue;
            };
            match file.get(how.source()) {
                None => problems.push(format!("{part:?} {name}: {how:?} is not in the file")),
                Some(stored) if how.shape(stored).as_ref() != Some(shape) => problems.push(
                    format!("{part:?} {name} {shape:?}: {how:?} stored as {stored:?}"),
                ),
                Some(_) => {
                    read.insert(how.source().to_string());
                }
            }
        }
    }
    let unread: Vec<_> = file.keys().filter(|k| !read.contains(*k)).collect();
    assert!(
        problems.is_empty() && unread.is_empty(),
        "{} mismatches:\n{}\nunread: {unread:?}",
        problems.len(),
        problems.join("\n")
    );
    let asked: usize = parts.iter().map(|(_, a)| a.len()).sum();
    eprintln!(
        "{asked} tensors asked for, read from all {} tensors of the single file",
        file.len()
    );
}
