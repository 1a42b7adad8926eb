//! TAESD's decoder (`--vae taesdxl`) against diffusers' `AutoencoderTiny` on a tiny random one
//! (reference: `scripts/fixtures/ref_vae_tiny.py`).

use candle_core::{DType, Device};

use turbine::model::loader::{find_weights, Weights};
use turbine::model::vae_tiny::{AutoencoderTinyConfig, DecoderTiny};

use crate::common;

fn build(dtype: DType) -> (DecoderTiny, Weights<'static>) {
    let dir = common::tiny_model().join("vae-taesdxl");
    assert!(AutoencoderTinyConfig::is_tiny(&dir).unwrap());
    assert!(!AutoencoderTinyConfig::is_tiny(&common::tiny_model().join("vae")).unwrap());
    let cfg = AutoencoderTinyConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.scale_factor(), 8);
    let path = find_weights(&dir, "diffusion_pytorch_model").unwrap();
    let weights = Weights::open(&path, dtype, &Device::Cpu).unwrap();
    let decoder = DecoderTiny::new(weights.vb.clone(), &cfg).unwrap();
    (decoder, weights)
}

#[test]
fn tiny_decoder_matches_diffusers() {
    let refs = common::reference("vae_tiny");
    let (decoder, _) = build(DType::F32);
    let out = decoder.decode(&refs["decode.z"]).unwrap();
    common::assert_close("taesd decode f32", &out, &refs["decode.out"], 1e-5);
    // bf16 weights and activations: within bf16's rounding over eleven layers.
    let (decoder, _) = build(DType::BF16);
    let out = decoder
        .decode(&refs["decode.z"].to_dtype(DType::BF16).unwrap())
        .unwrap();
    common::assert_close("taesd decode bf16", &out, &refs["decode.out"], 3e-2);
}

/// The whole pipeline with `--vae taesdxl`'s layout (the tiny model's `vae-taesdxl/`): the
/// `one_prompt` case's images are TAESD's decode of diffusers' final latents, as
/// `StableDiffusionXLPipeline` with this `AutoencoderTiny` makes them, to the same 8-bit bounds
/// as the full VAE's case. The VAE's own decode gives other images.
#[test]
fn the_pipeline_decodes_with_taesd_when_given_it() {
    use turbine::model::pipeline::Pipeline;

    use crate::pipeline::{cases, pixel_diff};

    let model = common::tiny_model();
    let p = Pipeline::load_with_vae(
        &model,
        Some(&model.join("vae-taesdxl")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let case = &cases()["one_prompt"];
    let refs = common::reference("pipeline_one_prompt");
    let (items, noise, settings) = case.inputs(&refs);
    let batch = p.generate(&settings, &items, Some(&noise)).unwrap();
    let ours: Vec<u8> = batch.images[0].as_raw().to_vec();
    let theirs: Vec<u8> = common::reference("vae_tiny")["pipeline.image_float"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| (v * 255.0).round_ties_even() as u8)
        .collect();
    let (max, mean) = pixel_diff(&ours, &theirs);
    eprintln!("taesd one_prompt: 8-bit difference max {max}/255, mean {mean:.4}/255");
    assert!(max <= 2 && mean <= 0.5, "max {max}, mean {mean}");
    let full = crate::pipeline::u8_images(&refs["image_u8"]);
    let (_, mean_vs_full) = pixel_diff(&ours, &full);
    assert!(
        mean_vs_full > 5.0,
        "TAESD's images are the VAE's: {mean_vs_full}"
    );
}

/// `--preview-vae taesdxl`: a stream's previews are TAESD's decodes of the estimates (the first
/// is the one-step image of a pipeline that decodes with TAESD), while the images stay the
/// VAE's, bit for bit those of a pipeline without it.
#[test]
fn previews_decode_with_taesd_and_the_images_with_the_vae() {
    use std::sync::{Arc, Mutex};
    use turbine::model::pipeline::{Partials, Pipeline};

    use crate::pipeline::{pipeline, req};

    let model = common::tiny_model();
    let taesd = model.join("vae-taesdxl");
    let cpu = Device::Cpu;
    let previewed = Pipeline::load_with_vaes(&model, None, Some(&taesd), &cpu, DType::F32).unwrap();
    let tiny = Pipeline::load_with_vae(&model, Some(&taesd), &cpu, DType::F32).unwrap();
    let settings = crate::pipeline::preview_settings;
    let got: Arc<Mutex<Vec<(usize, image::RgbImage)>>> = Arc::default();
    let mut asking = req("a lighthouse", 21);
    let sink = got.clone();
    asking.partials = Some(Partials::new(3, move |k, image| {
        sink.lock().unwrap().push((k, image));
    }));
    let batch = vec![asking.clone(), req("a barn", 22)];
    let images = previewed
        .generate(&settings(4), &batch, None)
        .unwrap()
        .images;
    let plain = [req("a lighthouse", 21), req("a barn", 22)];
    assert_eq!(
        images,
        pipeline()
            .generate(&settings(4), &plain, None)
            .unwrap()
            .images,
        "the images are the VAE's"
    );
    let got = got.lock().unwrap();
    assert_eq!(got.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [0, 1, 2]);
    let by_taesd = tiny
        .generate(&settings(1), &plain[..1], None)
        .unwrap()
        .images;
    assert_eq!(
        got[0].1, by_taesd[0],
        "the first preview is TAESD's one-step image"
    );
    let by_vae = pipeline()
        .generate(&settings(1), &plain[..1], None)
        .unwrap()
        .images;
    let (_, mean) = crate::pipeline::pixel_diff(got[0].1.as_raw(), by_vae[0].as_raw());
    assert!(mean > 5.0, "the preview is the VAE's decode: {mean}");

    // The warm-up decodes previews with it, and with no preview decoder does nothing.
    assert!(previewed.warm_up_previews(&settings(1), 2).unwrap());
    assert!(!pipeline().warm_up_previews(&settings(1), 2).unwrap());

    // Only a tiny decoder decodes previews.
    let err = Pipeline::load_with_vaes(&model, None, Some(&model.join("vae")), &cpu, DType::F32)
        .err()
        .expect("the VAE is no preview decoder");
    assert!(err.to_string().contains("not an AutoencoderTiny"), "{err}");
}
