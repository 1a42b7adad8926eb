//! VAE parity with diffusers' `AutoencoderKL` on the tiny model
//! (reference: `scripts/fixtures/ref_vae.py`).

use candle_core::{DType, Device, Tensor};

use turbine::model::loader::{find_weights, ModelDir, Weights};
use turbine::model::vae::{AutoencoderKL, AutoencoderKLConfig};

use crate::common;

fn build(dtype: DType) -> (AutoencoderKL, Weights<'static>) {
    let dir = common::tiny_model().join("vae");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let path = find_weights(&dir, "diffusion_pytorch_model").unwrap();
    let weights = Weights::open(&path, dtype, &Device::Cpu).unwrap();
    let vae = AutoencoderKL::new(weights.vb.clone(), &cfg).unwrap();
    (vae, weights)
}

fn all_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite())
}

#[test]
fn vae_decode_matches_diffusers() {
    let (vae, _) = build(DType::F32);
    let refs = common::reference("vae");
    for case in ["decode_8x8", "decode_8x5"] {
        let out = vae.decode(&refs[&format!("{case}.z")]).unwrap();
        common::assert_close(
            &format!("vae {case} f32"),
            &out,
            &refs[&format!("{case}.out")],
            1e-4,
        );
    }
}

#[test]
fn vae_encode_matches_diffusers() {
    let (vae, _) = build(DType::F32);
    let refs = common::reference("vae");
    let x = &refs["encode.x"];
    common::assert_close(
        "vae encode mean f32",
        &vae.encode(x).unwrap(),
        &refs["encode.mean"],
        1e-4,
    );
    common::assert_close(
        "vae encode moments f32",
        &vae.encode_moments(x).unwrap(),
        &refs["encode.moments"],
        1e-4,
    );
}

#[test]
fn vae_bf16_decode_stays_finite_and_close() {
    let (vae, _) = build(DType::BF16);
    let refs = common::reference("vae");
    for case in ["decode_8x8", "decode_8x5"] {
        let out = vae.decode(&refs[&format!("{case}.z")]).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        assert!(all_finite(&out), "bf16 {case}: non-finite output");
        common::assert_close(
            &format!("vae {case} bf16"),
            &out,
            &refs[&format!("{case}.out")],
            5e-2,
        );
    }
}

#[test]
fn vae_reads_the_whole_checkpoint_and_reports_its_scales() {
    let (vae, weights) = build(DType::F32);
    weights.ensure_all_used().unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::tiny_model().join("vae/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        vae.scaling_factor(),
        cfg["scaling_factor"].as_f64().unwrap()
    );
    let levels = cfg["block_out_channels"].as_array().unwrap().len();
    assert_eq!(vae.scale_factor(), 1 << (levels - 1));
    let dir = ModelDir::open(common::tiny_model()).unwrap();
    AutoencoderKL::load(&dir, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn vae_wrong_shaped_tensor_is_named_in_the_error() {
    let src = common::tiny_model().join("vae");
    let mut tensors = candle_core::safetensors::load(
        find_weights(&src, "diffusion_pytorch_model").unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let name = "decoder.mid_block.attentions.0.to_k.weight";
    let (o, i) = tensors[name].dims2().unwrap();
    tensors.insert(
        name.to_string(),
        Tensor::zeros((o + 1, i), DType::F32, &Device::Cpu).unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let cfg = AutoencoderKLConfig::from_file(&src.join("config.json")).unwrap();
    let weights = Weights::open(&path, DType::F32, &Device::Cpu).unwrap();
    let err = AutoencoderKL::new(weights.vb.clone(), &cfg).unwrap_err();
    assert!(
        err.to_string().contains(name),
        "error does not name the tensor: {err}"
    );
}

/// A batch decoded in runs of images (`decode_within`, what `decode` does when a batch's
/// largest map would outgrow 2^31 - 1 elements) gives the images of one call.
#[test]
fn vae_decode_in_runs_matches_one_call() {
    let (vae, _) = build(DType::F32);
    let refs = common::reference("vae");
    for case in ["decode_8x8", "decode_8x5"] {
        let z = &refs[&format!("{case}.z")];
        let (_, _, h, w) = z.dims4().unwrap();
        let per_image = vae.decoder_elements_at(h, w);
        // The reference's 2 images one at a time, against diffusers.
        let runs_of_one = vae.decode_within(z, per_image).unwrap();
        common::assert_close(
            &format!("vae {case} in runs of 1"),
            &runs_of_one,
            &refs[&format!("{case}.out")],
            1e-4,
        );
        // 5 images (the 2 and their negations, then the first again) in runs of 2, 2, 1.
        let z5 = Tensor::cat(&[z, &z.neg().unwrap(), &z.narrow(0, 0, 1).unwrap()], 0).unwrap();
        let whole = vae.decode(&z5).unwrap();
        let runs = vae.decode_within(&z5, 2 * per_image + 1).unwrap();
        assert_eq!(runs.dims(), whole.dims());
        common::assert_close(&format!("vae {case} in runs of 2"), &runs, &whole, 1e-6);
        // One image over the limit is an error, not a wrong image.
        let err = vae.decode_within(z, per_image - 1).unwrap_err().to_string();
        assert!(err.contains("image in the VAE decoder needs"), "{err}");
    }
}
