//! Single-file checkpoints (`--checkpoint`): the tiny model in the original layout (made by
//! tests/support/checkpoint.rs from the recipe scripts/fixtures/ref_single_file.py checked
//! against diffusers' converter) gives diffusers' `from_single_file` images;
//! and files that are not such a checkpoint, or do not fit the configs, are refused with a
//! message that says why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use turbine::model::pipeline::Pipeline;

use crate::common::tiny_model;
use crate::pipeline::run_case_on;
use crate::tiny_checkpoint::tiny_checkpoint;

fn checkpoint() -> PathBuf {
    tiny_checkpoint().to_path_buf()
}

fn from_checkpoint() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        Pipeline::load_checkpoint(
            &tiny_model(),
            &checkpoint(),
            None,
            None,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
    })
}

#[test]
fn single_file_one_prompt_matches_diffusers_from_single_file() {
    run_case_on(from_checkpoint(), "one_prompt", "single_file_one_prompt");
}

#[test]
fn single_file_cfg_negative_matches_diffusers_from_single_file() {
    run_case_on(
        from_checkpoint(),
        "cfg_negative",
        "single_file_cfg_negative",
    );
}

/// The checkpoint's tensors, to write altered copies of.
fn tensors() -> HashMap<String, Tensor> {
    crate::tiny_checkpoint::tiny_checkpoint_tensors()
}

fn save(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let p = dir.join(name);
    candle_core::safetensors::save(tensors, &p).unwrap();
    p
}

fn load_err(config_dir: &Path, file: &Path, vae_dir: Option<&Path>) -> String {
    match Pipeline::load_checkpoint(config_dir, file, vae_dir, None, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", file.display()),
        Err(e) => e.to_string(),
    }
}

fn image(p: &Pipeline) -> Vec<u8> {
    crate::common::bicycle(p)
}

#[test]
fn files_that_are_not_an_sdxl_checkpoint_are_refused_with_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("model.ckpt");
    std::fs::write(&garbage, b"PK\x03\x04 a pickled torch checkpoint").unwrap();
    let err = load_err(&tiny_model(), &garbage, None);
    assert!(
        err.contains("not a readable safetensors file") && err.contains(".ckpt"),
        "{err}"
    );

    let missing = load_err(&tiny_model(), &tmp.path().join("absent.safetensors"), None);
    assert!(missing.contains("checkpoint file not found"), "{missing}");

    // SD 1.5's layout: one text encoder under cond_stage_model.
    let t = |dims: &[usize]| Tensor::ones(dims, DType::F16, &Device::Cpu).unwrap();
    let sd15: HashMap<String, Tensor> = [
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            t(&[320, 4, 3, 3]),
        ),
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            t(&[768]),
        ),
        (
            "first_stage_model.decoder.conv_in.weight",
            t(&[512, 4, 3, 3]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let err = load_err(
        &tiny_model(),
        &save(tmp.path(), "sd15.safetensors", &sd15),
        None,
    );
    assert!(err.contains("Stable Diffusion 1.x/2.x"), "{err}");

    // One component of a diffusers directory, given as if it were the whole model.
    let unet = tiny_model().join("unet/diffusion_pytorch_model.safetensors");
    let err = load_err(&tiny_model(), &unet, None);
    assert!(
        err.contains("diffusers layout") && err.contains("--model-dir"),
        "{err}"
    );

    // Something else entirely: the names it holds are shown.
    let other: HashMap<String, Tensor> = [("lora_unet_down.alpha".to_string(), t(&[1]))].into();
    let err = load_err(
        &tiny_model(),
        &save(tmp.path(), "lora.safetensors", &other),
        None,
    );
    assert!(
        err.contains("not an SDXL single-file checkpoint") && err.contains("lora_unet_down.alpha"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_that_does_not_fit_the_configs_names_the_tensor() {
    // The real SDXL-Turbo configs with the tiny checkpoint: the first tensor read has the tiny
    // width, and the message names it in both layouts.
    let real = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/sdxl-turbo");
    let err = load_err(&real, &checkpoint(), None);
    assert!(
        err.contains("conditioner.embedders.0.transformer.") && err.contains("the config implies"),
        "{err}"
    );

    // A tensor in a component's part of the file that the model does not read.
    let tmp = tempfile::tempdir().unwrap();
    let mut extra = tensors();
    let stray = Tensor::zeros((4, 4), DType::F16, &Device::Cpu).unwrap();
    extra.insert(
        "model.diffusion_model.input_blocks.9.0.stray.weight".into(),
        stray,
    );
    let err = load_err(
        &tiny_model(),
        &save(tmp.path(), "extra.safetensors", &extra),
        None,
    );
    assert!(
        err.contains("1 tensor(s) were not used")
            && err.contains("model.diffusion_model.input_blocks.9.0.stray.weight"),
        "{err}"
    );

    // A missing one is named, with the name the model asked for.
    let mut short = tensors();
    short.remove("model.diffusion_model.out.2.weight");
    let err = load_err(
        &tiny_model(),
        &save(tmp.path(), "short.safetensors", &short),
        None,
    );
    assert!(
        err.contains("model.diffusion_model.out.2.weight") && err.contains("conv_out.weight"),
        "{err}"
    );
}

#[test]
fn tensors_outside_the_pipeline_are_left_alone() {
    // Training leftovers (EMA copies, schedules) and OpenCLIP's logit_scale are not the
    // pipeline's: the checkpoint loads and makes the same image.
    let tmp = tempfile::tempdir().unwrap();
    let mut more = tensors();
    let t = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
    more.insert("model_ema.decay".into(), t.clone());
    more.insert("denoiser.sigmas".into(), t);
    assert!(more.contains_key("conditioner.embedders.1.model.logit_scale"));
    let file = save(tmp.path(), "more.safetensors", &more);
    let p = Pipeline::load_checkpoint(&tiny_model(), &file, None, None, &Device::Cpu, DType::F32)
        .unwrap();
    assert!(image(&p) == image(from_checkpoint()));
}

#[test]
fn a_checkpoint_without_a_vae_needs_one_from_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let mut no_vae = tensors();
    no_vae.retain(|k, _| !k.starts_with("first_stage_model."));
    let file = save(tmp.path(), "no_vae.safetensors", &no_vae);
    let err = load_err(&tiny_model(), &file, None);
    assert!(err.contains("has no VAE") && err.contains("--vae"), "{err}");

    // A VAE folder (what --vae fp16-fix resolves to) supplies it: the same image as the
    // checkpoint's own VAE when it holds the same weights.
    let vae = tmp.path().join("vae");
    std::fs::create_dir(&vae).unwrap();
    std::fs::copy(
        tiny_model().join("vae/config.json"),
        vae.join("config.json"),
    )
    .unwrap();
    let vae_weights: HashMap<String, Tensor> = candle_core::safetensors::load(
        tiny_model().join("vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
    .collect();
    save(&vae, "diffusion_pytorch_model.safetensors", &vae_weights);
    let p = Pipeline::load_checkpoint(
        &tiny_model(),
        &file,
        Some(&vae),
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(image(&p) == image(from_checkpoint()));

    // With a full checkpoint and a --vae folder, the checkpoint's VAE is left unread.
    Pipeline::load_checkpoint(
        &tiny_model(),
        &checkpoint(),
        Some(&vae),
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
}
