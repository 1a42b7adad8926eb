//! Parity with diffusers under both ends of the `--kernels` switch: every lever off (candle's
//! compositions, the baseline) and every lever on (turbine's fused ops, as far as they run on the
//! CPU: GroupNorm, GEGLU and bias + residual through their CPU implementations, attention through
//! the composed path the op takes there). Same references and bounds as the other parity tests:
//! f32 against diffusers' f32 outputs; bf16 against the same f32 references with the bf16 bounds
//! of `unet.rs` (relative 5e-2) and `pipeline.rs` (mean 6/255).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use turbine::model::loader::{find_weights, Weights};
use turbine::model::pipeline::Pipeline;
use turbine::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use turbine::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use turbine::ops::{with_kernels, Kernels};

use crate::common::{assert_close, reference, tiny_model};
use crate::pipeline::{cases, pixel_diff, u8_images, Case};

const SETTINGS: [(&str, Kernels); 2] = [("none", Kernels::NONE), ("all", Kernels::ALL)];

fn weights(component: &str, dtype: DType) -> Weights<'static> {
    let dir = tiny_model().join(component);
    let path = find_weights(&dir, "diffusion_pytorch_model").unwrap();
    Weights::open(&path, dtype, &Device::Cpu).unwrap()
}

#[test]
fn unet_matches_diffusers_with_kernels_off_and_on() {
    let cfg = UNet2DConditionConfig::from_file(&tiny_model().join("unet/config.json")).unwrap();
    let refs = reference("unet");
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
        let w = weights("unet", dtype);
        let unet = UNet2DConditionModel::new(w.vb.clone(), &cfg).unwrap();
        for case in ["b2_8x8", "b1_8x5"] {
            let get = |k: &str| refs[&format!("{case}.{k}")].clone();
            let timestep = get("timestep").to_vec1::<f32>().unwrap()[0] as f64;
            for (name, kernels) in SETTINGS {
                let out = with_kernels(kernels, || {
                    unet.forward(
                        &get("sample"),
                        timestep,
                        &get("encoder_hidden_states"),
                        &get("text_embeds"),
                        &get("time_ids"),
                    )
                })
                .unwrap();
                assert_eq!(out.dtype(), dtype);
                assert_close(
                    &format!("unet {case} {dtype:?} kernels={name}"),
                    &out,
                    &get("out"),
                    tol,
                );
            }
        }
    }
}

#[test]
fn vae_decode_matches_diffusers_with_kernels_off_and_on() {
    let cfg = AutoencoderKLConfig::from_file(&tiny_model().join("vae/config.json")).unwrap();
    let refs = reference("vae");
    let w = weights("vae", DType::F32);
    let vae = AutoencoderKL::new(w.vb.clone(), &cfg).unwrap();
    for case in ["decode_8x8", "decode_8x5"] {
        for (name, kernels) in SETTINGS {
            let out = with_kernels(kernels, || vae.decode(&refs[&format!("{case}.z")])).unwrap();
            assert_close(
                &format!("vae {case} f32 kernels={name}"),
                &out,
                &refs[&format!("{case}.out")],
                1e-4,
            );
        }
    }
}

/// Generates reference case `name` with diffusers' latents and noise under `kernels`; returns
/// the prompt embeddings and the 8-bit images.
fn generate(
    p: &Pipeline,
    case: &Case,
    refs: &HashMap<String, Tensor>,
    kernels: Kernels,
) -> (Tensor, Vec<u8>) {
    let (items, noise, settings) = case.inputs(refs);
    let prompts: Vec<&str> = case.prompts.iter().map(String::as_str).collect();
    with_kernels(kernels, || {
        let (embeds, _) = p.encode_prompts(&prompts).unwrap();
        let batch = p.generate(&settings, &items, Some(&noise)).unwrap();
        let pixels = batch
            .images
            .iter()
            .flat_map(|im| im.as_raw().iter().copied())
            .collect();
        (embeds, pixels)
    })
}

#[test]
fn pipeline_matches_diffusers_with_kernels_off_and_on() {
    let cases = cases();
    for dtype in [DType::F32, DType::BF16] {
        let p = Pipeline::load(&tiny_model(), &Device::Cpu, dtype).unwrap();
        // Two prompts (batch 2) and guidance with a negative prompt (batch doubled).
        for name in ["two_prompts", "cfg_negative"] {
            let case = &cases[name];
            let refs = reference(&format!("pipeline_{name}"));
            let theirs = u8_images(&refs["image_u8"]);
            for (kernels_name, kernels) in SETTINGS {
                let what = format!("{name} {dtype:?} kernels={kernels_name}");
                let (embeds, ours) = generate(&p, case, &refs, kernels);
                let (max, mean) = pixel_diff(&ours, &theirs);
                eprintln!("{what}: 8-bit image difference max {max}/255, mean {mean:.4}/255");
                if dtype == DType::F32 {
                    assert_close(
                        &format!("{what} prompt_embeds"),
                        &embeds,
                        &refs["prompt_embeds"],
                        1e-4,
                    );
                    assert!(max <= 2, "{what}: max pixel difference {max}/255 > 2");
                    assert!(
                        mean <= 0.5,
                        "{what}: mean pixel difference {mean}/255 > 0.5"
                    );
                } else {
                    assert!(mean < 6.0, "{what}: mean pixel difference {mean}/255 >= 6");
                }
            }
        }
    }
}
