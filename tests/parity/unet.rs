//! UNet parity with diffusers' `UNet2DConditionModel` on the tiny model
//! (reference: `scripts/fixtures/ref_unet.py`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use turbine::model::loader::{find_weights, LoadError, ModelDir, Weights};
use turbine::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};

use crate::common;

fn build(dtype: DType) -> (UNet2DConditionModel, Weights<'static>) {
    let dir = common::tiny_model().join("unet");
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let path = find_weights(&dir, "diffusion_pytorch_model").unwrap();
    let weights = Weights::open(&path, dtype, &Device::Cpu).unwrap();
    let unet = UNet2DConditionModel::new(weights.vb.clone(), &cfg).unwrap();
    (unet, weights)
}

/// Runs reference case `name`; returns (ours as f32, diffusers').
fn run_case(
    unet: &UNet2DConditionModel,
    refs: &HashMap<String, Tensor>,
    name: &str,
) -> (Tensor, Tensor) {
    let get = |k: &str| refs[&format!("{name}.{k}")].clone();
    let timestep = get("timestep").to_vec1::<f32>().unwrap()[0] as f64;
    let out = unet
        .forward(
            &get("sample"),
            timestep,
            &get("encoder_hidden_states"),
            &get("text_embeds"),
            &get("time_ids"),
        )
        .unwrap();
    assert_eq!(out.dtype(), unet.dtype());
    (out.to_dtype(DType::F32).unwrap(), get("out"))
}

#[test]
fn unet_batch2_8x8_t999_matches_diffusers() {
    let (unet, _) = build(DType::F32);
    let refs = common::reference("unet");
    let (ours, theirs) = run_case(&unet, &refs, "b2_8x8");
    common::assert_close("unet b2 8x8 t=999 f32", &ours, &theirs, 1e-4);
}

#[test]
fn unet_batch1_8x5_t250_matches_diffusers() {
    // 8x5 latents are not divisible by 2^2: the upsamplers get explicit sizes (2→3→5).
    let (unet, _) = build(DType::F32);
    let refs = common::reference("unet");
    let (ours, theirs) = run_case(&unet, &refs, "b1_8x5");
    common::assert_close("unet b1 8x5 t=250 f32", &ours, &theirs, 1e-4);
}

#[test]
fn unet_half_precision_stays_finite_and_close() {
    let refs = common::reference("unet");
    for dtype in [DType::BF16, DType::F16] {
        let (unet, _) = build(dtype);
        for case in ["b2_8x8", "b1_8x5"] {
            let (ours, theirs) = run_case(&unet, &refs, case);
            let finite = ours
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite());
            assert!(finite, "{dtype:?} {case}: non-finite output");
            common::assert_close(&format!("unet {case} {dtype:?}"), &ours, &theirs, 5e-2);
        }
    }
}

#[test]
fn unet_reads_the_whole_checkpoint() {
    let (_, weights) = build(DType::F32);
    weights.ensure_all_used().unwrap();
    // The one-call loader does the same check.
    let dir = ModelDir::open(common::tiny_model()).unwrap();
    UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn unet_wrong_shaped_tensor_is_named_in_the_error() {
    let src = common::tiny_model().join("unet");
    let tmp = tempfile::tempdir().unwrap();
    let unet_dir = tmp.path().join("unet");
    std::fs::create_dir(&unet_dir).unwrap();
    std::fs::copy(src.join("config.json"), unet_dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(
        find_weights(&src, "diffusion_pytorch_model").unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let (o, i) = tensors[name].dims2().unwrap();
    tensors.insert(
        name.to_string(),
        Tensor::zeros((o, i + 1), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(
        &tensors,
        unet_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();

    let dir = ModelDir::open(tmp.path()).unwrap();
    let err = UNet2DConditionModel::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, LoadError::Weights { .. }),
        "unexpected error kind: {err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(name), "error does not name the tensor: {msg}");
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors"),
        "error does not name the file: {msg}"
    );
}

#[test]
fn unet_unsupported_config_value_is_named() {
    let src = common::tiny_model().join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    cfg["addition_embed_type"] = "text_image".into();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    match UNet2DConditionConfig::from_file(&path) {
        Err(LoadError::Unsupported { field, value, .. }) => {
            assert_eq!(field, "addition_embed_type");
            assert!(value.contains("text_image"));
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// A batch run in runs of rows (`forward_within`, what `forward` does when a batch's largest
/// activation would outgrow 2^31 - 1 elements) gives the prediction of one call, each row with
/// its own conditioning.
#[test]
fn unet_in_runs_of_rows_matches_one_call_and_diffusers() {
    let (unet, _) = build(DType::F32);
    let refs = common::reference("unet");
    let get = |k: &str| refs[&format!("b2_8x8.{k}")].clone();
    let timestep = get("timestep").to_vec1::<f32>().unwrap()[0] as f64;
    let per_row = unet.elements_per_row(8, 8);
    let (ours, _) = run_case(&unet, &refs, "b2_8x8");
    let within = |limit: usize| {
        unet.forward_within(
            &get("sample"),
            timestep,
            &get("encoder_hidden_states"),
            &get("text_embeds"),
            &get("time_ids"),
            limit,
        )
    };
    let runs = within(per_row).unwrap();
    common::assert_close("unet b2 8x8 in runs of 1 vs one call", &runs, &ours, 1e-6);
    common::assert_close(
        "unet b2 8x8 in runs of 1 vs diffusers",
        &runs,
        &get("out"),
        1e-4,
    );
    let err = within(per_row - 1).unwrap_err().to_string();
    assert!(err.contains("latent in the UNet needs"), "{err}");
}
