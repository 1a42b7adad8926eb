//! The VAE decoder's channels-last path (`AutoencoderKL::decode_channels_last`, what `decode`
//! runs on CUDA under `Kernels::CHANNELS_LAST` and `Kernels::CONV`) on the CPU, against
//! diffusers' reference images and against the NCHW decoder, with the bounds of `vae.rs`.

use candle_core::{DType, Device, Tensor};

use turbine::model::loader::{find_weights, Weights};
use turbine::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use turbine::ops::{self, Kernels};

use crate::common;

const CASES: [&str; 2] = ["decode_8x8", "decode_8x5"];

fn build(dtype: DType, channels_last: bool) -> (AutoencoderKL, Weights<'static>) {
    let dir = common::tiny_model().join("vae");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let path = find_weights(&dir, "diffusion_pytorch_model").unwrap();
    let weights = Weights::open(&path, dtype, &Device::Cpu).unwrap();
    let vae =
        AutoencoderKL::new_with_channels_last(weights.vb.clone(), &cfg, channels_last).unwrap();
    (vae, weights)
}

#[test]
fn channels_last_decode_matches_diffusers_and_nchw_f32() {
    let (vae, weights) = build(DType::F32, true);
    weights.ensure_all_used().unwrap();
    let refs = common::reference("vae");
    for case in CASES {
        let z = &refs[&format!("{case}.z")];
        let out = vae.decode_channels_last(z).unwrap();
        let (b, c, h, w) = out.dims4().unwrap();
        // An NCHW view of NHWC memory: channels have stride 1.
        assert_eq!(out.stride(), [h * w * c, 1, w * c, c], "{case}: layout");
        assert_eq!(out.dtype(), DType::F32);
        common::assert_close(
            &format!("vae channels-last {case} f32 vs diffusers"),
            &out,
            &refs[&format!("{case}.out")],
            1e-4,
        );
        let nchw = ops::with_kernels(Kernels::ALL, || vae.decode(z)).unwrap();
        assert!(
            nchw.is_contiguous(),
            "{case}: decode on the CPU is the NCHW path"
        );
        assert_eq!(nchw.dims(), [b, c, h, w]);
        common::assert_close(
            &format!("vae channels-last {case} f32 vs NCHW"),
            &out,
            &nchw,
            1e-5,
        );
    }
}

/// Without the `group-norm` lever the channels-last decoder composes its norms from candle ops
/// (in NHWC): the same images as the fused op's, to f32 rounding.
#[test]
fn channels_last_decode_without_the_group_norm_lever_matches() {
    let (vae, _) = build(DType::F32, true);
    let refs = common::reference("vae");
    for case in CASES {
        let z = &refs[&format!("{case}.z")];
        let fused = ops::with_kernels(Kernels::ALL, || vae.decode_channels_last(z)).unwrap();
        let composed = ops::with_kernels(Kernels::ALL.without(Kernels::GROUP_NORM), || {
            vae.decode_channels_last(z)
        })
        .unwrap();
        common::assert_close(
            &format!("vae channels-last {case}: composed vs fused group norm"),
            &composed,
            &fused,
            1e-5,
        );
        common::assert_close(
            &format!("vae channels-last {case}: composed group norm vs diffusers"),
            &composed,
            &refs[&format!("{case}.out")],
            1e-4,
        );
    }
}

#[test]
fn channels_last_decode_matches_diffusers_and_nchw_bf16() {
    let (vae, _) = build(DType::BF16, true);
    let refs = common::reference("vae");
    for case in CASES {
        let z = &refs[&format!("{case}.z")];
        let out = vae.decode_channels_last(z).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        common::assert_close(
            &format!("vae channels-last {case} bf16 vs diffusers"),
            &out,
            &refs[&format!("{case}.out")],
            5e-2,
        );
        let nchw = vae.decode(z).unwrap();
        // Two bf16 paths, each within the bf16 bound of the f32 reference; they round at
        // different points (f32 vs bf16 norm weights, fused vs separate residual add).
        common::assert_close(
            &format!("vae channels-last {case} bf16 vs NCHW bf16"),
            &out,
            &nchw,
            5e-2,
        );
    }
}

#[test]
fn channels_last_weights_are_built_only_when_asked_for() {
    // On the CPU `new` leaves them out (the NCHW path is the only one that runs there), and the
    // channels-last entry point says what is missing instead of decoding something else.
    let dir = common::tiny_model().join("vae");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let path = find_weights(&dir, "diffusion_pytorch_model").unwrap();
    let weights = Weights::open(&path, DType::F32, &Device::Cpu).unwrap();
    let vae = ops::with_kernels(Kernels::ALL, || {
        AutoencoderKL::new(weights.vb.clone(), &cfg)
    })
    .unwrap();
    let z = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode_channels_last(&z).unwrap_err().to_string();
    assert!(err.contains("channels-last decoder weights"), "{err}");
    assert!(vae.decode(&z).is_ok());
}

/// The channels-last decoder in runs of images: the same images as one call, still one NCHW
/// view of NHWC memory (the runs are joined before the permute).
#[test]
fn channels_last_decode_in_runs_matches_one_call() {
    let (vae, _) = build(DType::F32, true);
    let refs = common::reference("vae");
    for case in CASES {
        let z = &refs[&format!("{case}.z")];
        let (_, _, h, w) = z.dims4().unwrap();
        let z3 = Tensor::cat(&[z, &z.neg().unwrap()], 0).unwrap();
        let z3 = z3.narrow(0, 0, 3).unwrap();
        let whole = vae.decode_channels_last(&z3).unwrap();
        let runs = vae
            .decode_channels_last_within(&z3, vae.decoder_elements_at(h, w))
            .unwrap();
        let (b, c, oh, ow) = runs.dims4().unwrap();
        assert_eq!(b, 3);
        assert_eq!(runs.stride(), [oh * ow * c, 1, ow * c, c], "{case}: layout");
        common::assert_close(
            &format!("vae channels-last {case} in runs"),
            &runs,
            &whole,
            1e-6,
        );
        common::assert_close(
            &format!("vae channels-last {case} in runs vs diffusers"),
            &runs.narrow(0, 0, 2).unwrap(),
            &refs[&format!("{case}.out")],
            1e-4,
        );
    }
}
