//! Shared helpers for the parity tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny random SDXL-shaped model in the Hub layout.
pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-sdxl")
}

/// Loads `tests/fixtures/reference/{name}.safetensors` on the CPU.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures()
        .join("reference")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "cannot load {}: {e} (run scripts/make_fixtures.sh)",
            p.display()
        )
    })
}

/// max |a-b| / max(max |b|, 1e-6): the relative error used by the component parity tests.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff: f32 = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = b.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    diff / scale.max(1e-6)
}

/// Asserts the relative error is within `tol`, printing the figure either way.
pub fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor, tol: f32) {
    let e = rel_err(ours, theirs);
    eprintln!("{what}: relative error {e:.3e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// The 8-bit pixels of one 64x64 one-step image of "a red bicycle" (seed 11) from `p`: for
/// tests that compare what two ways of loading weights make.
pub fn bicycle(p: &turbine::model::pipeline::Pipeline) -> Vec<u8> {
    bicycle_for(p, None)
}

/// [`bicycle_for`]'s settings: 64x64, one step, no guidance, through `adapter`.
pub fn bicycle_settings(adapter: Option<usize>) -> turbine::model::pipeline::GenerationSettings {
    turbine::model::pipeline::GenerationSettings {
        width: 64,
        height: 64,
        steps: 1,
        guidance_scale: 0.0,
        init_step: None,
        adapter,
    }
}

/// [`bicycle`] with `p`'s `--lora-modules` adapter `adapter`.
pub fn bicycle_for(p: &turbine::model::pipeline::Pipeline, adapter: Option<usize>) -> Vec<u8> {
    use turbine::model::pipeline::ImageRequest;
    let settings = bicycle_settings(adapter);
    let item = ImageRequest {
        prompt: "a red bicycle".into(),
        negative_prompt: String::new(),
        seed: 11,
        init_image: None,
        partials: None,
    };
    p.generate(&settings, &[item], None).unwrap().images[0]
        .as_raw()
        .clone()
}
