//! LoRAs (`--lora`): the tiny model with a kohya-layout LoRA (the UNet's modules under their
//! original SGM names, alpha = r/2, at scale 0.8) and with a diffusers-layout one (written by
//! diffusers' `save_lora_weights`) gives diffusers' images with `load_lora_weights` +
//! `fuse_lora` (scripts/fixtures/ref_lora.py); files that are not such a LoRA, or not one for
//! this model, are refused with what is wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use turbine::model::lora::{AdapterSpec, LoraSpec};
use turbine::model::pipeline::{LoadSpec, Pipeline};

use crate::common::{bicycle_for, bicycle_settings, fixtures, tiny_model};
use crate::pipeline::{run_case_for, run_case_on};

#[derive(Deserialize)]
struct Case {
    scale: f64,
}

fn lora_file(name: &str) -> PathBuf {
    fixtures().join(format!("reference/lora_{name}.safetensors"))
}

fn with_loras(loras: Vec<LoraSpec>) -> Result<Pipeline, String> {
    load(loras)
}

/// The error loading the tiny model with `loras` gives.
fn load_err(loras: Vec<LoraSpec>) -> String {
    match load(loras) {
        Ok(_) => panic!("the LoRA was accepted"),
        Err(e) => e,
    }
}

fn load(loras: Vec<LoraSpec>) -> Result<Pipeline, String> {
    let spec = LoadSpec {
        dir: tiny_model(),
        loras,
        ..Default::default()
    };
    Pipeline::load_spec(&spec, &Device::Cpu, DType::F32).map_err(|e| e.to_string())
}

fn run(name: &str) {
    let cases: HashMap<String, Case> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/lora_cases.json")).unwrap(),
    )
    .unwrap();
    let spec = LoraSpec {
        path: lora_file(name),
        scale: cases[name].scale,
    };
    let p = with_loras(vec![spec]).unwrap();
    run_case_on(&p, "one_prompt", &format!("lora_{name}_one_prompt"));
}

#[test]
fn a_kohya_lora_matches_diffusers_fuse_lora() {
    run("kohya");
}

#[test]
fn a_diffusers_lora_matches_diffusers_fuse_lora() {
    run("diffusers");
}

fn case_spec(name: &str) -> LoraSpec {
    let cases: HashMap<String, Case> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/lora_cases.json")).unwrap(),
    )
    .unwrap();
    LoraSpec {
        path: lora_file(name),
        scale: cases[name].scale,
    }
}

/// `--lora-modules kohya=... diffusers=...`: the tiny model with both LoRAs served next to it.
fn with_adapters() -> Pipeline {
    let spec = LoadSpec {
        dir: tiny_model(),
        adapters: ["kohya", "diffusers"]
            .map(|name| AdapterSpec {
                name: name.into(),
                loras: vec![case_spec(name)],
            })
            .into(),
        ..Default::default()
    };
    Pipeline::load_spec(&spec, &Device::Cpu, DType::F32).unwrap()
}

/// One pipeline, three models: each adapter gives diffusers' `fuse_lora` images and
/// embeddings, and the model itself still gives its own.
#[test]
fn lora_modules_match_diffusers_fuse_lora_next_to_the_model_itself() {
    let p = with_adapters();
    assert_eq!(
        p.adapter_names().collect::<Vec<_>>(),
        [Some("kohya"), Some("diffusers")]
    );
    run_case_for(&p, Some(0), "one_prompt", "lora_kohya_one_prompt");
    run_case_for(&p, Some(1), "one_prompt", "lora_diffusers_one_prompt");
    run_case_for(&p, None, "one_prompt", "pipeline_one_prompt");
}

/// An adapter is exactly the model loaded with `--lora` (the LoRA fused into the file's weights,
/// not into the model's rounded ones: bit for bit on the CPU, in bf16 too), whatever ran before
/// it; one name given twice stacks its LoRAs; an adapter that does not exist is refused.
#[test]
fn an_adapter_is_the_model_with_the_lora_fused() {
    for dtype in [DType::F32, DType::BF16] {
        let load = |loras: Vec<LoraSpec>, adapters: Vec<AdapterSpec>| {
            let spec = LoadSpec {
                dir: tiny_model(),
                loras,
                adapters,
                ..Default::default()
            };
            Pipeline::load_spec(&spec, &Device::Cpu, dtype).unwrap()
        };
        let adapter = |name: &str| AdapterSpec {
            name: name.into(),
            loras: vec![case_spec(name)],
        };
        let p = load(Vec::new(), vec![adapter("kohya"), adapter("diffusers")]);
        let base = image(&load(Vec::new(), Vec::new()));
        let kohya = image(&load(vec![case_spec("kohya")], Vec::new()));
        let diffusers = image(&load(vec![case_spec("diffusers")], Vec::new()));
        for _ in 0..2 {
            assert!(bicycle_for(&p, Some(0)) == kohya, "{dtype:?}");
            assert!(bicycle_for(&p, None) == base, "{dtype:?}");
            assert!(bicycle_for(&p, Some(1)) == diffusers, "{dtype:?}");
        }
        assert!(kohya != base && diffusers != base);
        // With `--lora` fused into the model too, an adapter adds its LoRA on top.
        let both = load(vec![case_spec("diffusers")], vec![adapter("kohya")]);
        let fused_both = load(vec![case_spec("diffusers"), case_spec("kohya")], Vec::new());
        assert!(bicycle_for(&both, None) == diffusers, "{dtype:?}");
        let on_top = bicycle_for(&both, Some(0));
        assert!(on_top != diffusers && on_top != kohya, "{dtype:?}");
        if dtype == DType::F32 {
            // The same sum in another order: within a rounding of the LoRAs at once.
            let d = on_top
                .iter()
                .zip(image(&fused_both).iter())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(d <= 1, "{d}");
        }
    }
    let p = with_adapters();

    let stacked = AdapterSpec::merged(&[
        AdapterSpec::parse(&format!("both={}:0.8", lora_file("kohya").display())).unwrap(),
        AdapterSpec::parse(&format!("both={}", lora_file("diffusers").display())).unwrap(),
    ]);
    assert_eq!(stacked.len(), 1);
    let spec = LoadSpec {
        dir: tiny_model(),
        adapters: stacked,
        ..Default::default()
    };
    let both = Pipeline::load_spec(&spec, &Device::Cpu, DType::F32).unwrap();
    let fused = with_loras(vec![case_spec("kohya"), case_spec("diffusers")]).unwrap();
    assert!(bicycle_for(&both, Some(0)) == image(&fused));

    let e = p
        .validate(&bicycle_settings(Some(2)), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter 2 is not loaded"), "{e}");
}

/// Adapters built while serving (`--allow-runtime-lora-updating`) are the `--lora-modules`
/// ones bit for bit (f32 and bf16; over a directory and a single-file checkpoint; with `--lora`
/// fused into the model too); an unloaded slot serves nothing until a later load takes it; a
/// LoRA that does not load leaves the pipeline as it was; a pipeline loaded without the option
/// refuses to build any.
#[test]
fn adapters_loaded_while_serving_are_those_loaded_at_start() {
    let adapter = |name: &str| AdapterSpec {
        name: name.into(),
        loras: vec![case_spec(name)],
    };
    let checkpoint = crate::tiny_checkpoint::tiny_checkpoint().to_path_buf();
    for (dtype, checkpoint, fused) in [
        (DType::F32, None, Vec::new()),
        (DType::BF16, None, Vec::new()),
        (DType::F32, None, vec![case_spec("diffusers")]),
        (DType::BF16, Some(checkpoint), Vec::new()),
    ] {
        let case = format!(
            "{dtype:?}, checkpoint {}, --lora {}",
            checkpoint.is_some(),
            fused.len()
        );
        let load = |adapters: Vec<AdapterSpec>, runtime_adapters: bool| {
            let spec = LoadSpec {
                dir: tiny_model(),
                checkpoint: checkpoint.clone(),
                loras: fused.clone(),
                adapters,
                runtime_adapters,
                ..Default::default()
            };
            Pipeline::load_spec(&spec, &Device::Cpu, dtype).unwrap()
        };
        let at_start = load(vec![adapter("kohya"), adapter("diffusers")], false);
        let (kohya, diffusers) = (
            bicycle_for(&at_start, Some(0)),
            bicycle_for(&at_start, Some(1)),
        );
        let own = bicycle_for(&at_start, None);

        let mut p = load(Vec::new(), true);
        assert!(p.loads_adapters() && !at_start.loads_adapters());
        p.load_adapter(0, &adapter("kohya")).unwrap();
        p.load_adapter(1, &adapter("diffusers")).unwrap();
        assert!(bicycle_for(&p, Some(0)) == kohya, "{case}");
        assert!(bicycle_for(&p, Some(1)) == diffusers, "{case}");
        assert!(bicycle_for(&p, None) == own, "{case}");

        assert!(p.unload_adapter(0) && !p.unload_adapter(0));
        let e = p
            .validate(&bicycle_settings(Some(0)), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("adapter 0 is not loaded"), "{e}");
        assert_eq!(
            p.adapter_names().collect::<Vec<_>>(),
            [None, Some("diffusers")]
        );
        assert!(bicycle_for(&p, Some(1)) == diffusers, "{case}");
        // The freed slot takes the next adapter; a taken one is refused.
        p.load_adapter(0, &adapter("diffusers")).unwrap();
        assert!(bicycle_for(&p, Some(0)) == diffusers, "{case}");
        let e = p
            .load_adapter(1, &adapter("kohya"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("slot 1 is taken"), "{e}");
        // A LoRA that does not load changes nothing.
        let missing = AdapterSpec {
            name: "missing".into(),
            loras: vec![LoraSpec {
                path: fixtures().join("reference/absent.safetensors"),
                scale: 1.0,
            }],
        };
        let e = p.load_adapter(2, &missing).unwrap_err().to_string();
        assert!(e.contains("LoRA file not found"), "{e}");
        assert_eq!(
            p.adapter_names().collect::<Vec<_>>(),
            [Some("diffusers"), Some("diffusers")]
        );
        assert!(bicycle_for(&p, None) == own, "{case}");
        // Unloading the last slots shrinks the table.
        assert!(p.unload_adapter(1) && p.unload_adapter(0));
        assert_eq!(p.adapter_names().count(), 0);
    }
    let mut plain = Pipeline::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    let e = plain
        .load_adapter(0, &adapter("kohya"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("without runtime_adapters"), "{e}");
}

/// An adapter's LoRA that does not fit the model fails the load, naming the adapter's file.
#[test]
fn an_adapter_that_does_not_fit_fails_the_load() {
    let tmp = tempfile::tempdir().unwrap();
    let mut other = tensors("kohya");
    let stem = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q";
    let t = Tensor::ones((2, 8), DType::F16, &Device::Cpu).unwrap();
    other.insert(format!("{stem}.lora_down.weight"), t.clone());
    other.insert(format!("{stem}.lora_up.weight"), t.t().unwrap());
    let lora = write(tmp.path(), "other.safetensors", &other);
    let spec = LoadSpec {
        dir: tiny_model(),
        adapters: vec![AdapterSpec {
            name: "other".into(),
            loras: vec![lora],
        }],
        ..Default::default()
    };
    let e = match Pipeline::load_spec(&spec, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("the adapter was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("other.safetensors") && e.contains(stem) && e.contains("another model"),
        "{e}"
    );
}

fn image(p: &Pipeline) -> Vec<u8> {
    crate::common::bicycle(p)
}

#[test]
fn scale_zero_is_the_model_itself_and_loras_change_the_image() {
    let base = image(&Pipeline::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap());
    let spec = |name: &str, scale: f64| LoraSpec {
        path: lora_file(name),
        scale,
    };
    let zero = with_loras(vec![spec("kohya", 0.0)]).unwrap();
    assert!(image(&zero) == base);
    let one = image(&with_loras(vec![spec("kohya", 0.8)]).unwrap());
    assert!(one != base);
    // Two LoRAs add up: both at once differ from either alone.
    let both = image(&with_loras(vec![spec("kohya", 0.8), spec("diffusers", 1.0)]).unwrap());
    let other = image(&with_loras(vec![spec("diffusers", 1.0)]).unwrap());
    assert!(both != one && both != other);
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_file(name), &Device::Cpu).unwrap()
}

fn write(dir: &Path, name: &str, t: &HashMap<String, Tensor>) -> LoraSpec {
    let path = dir.join(name);
    candle_core::safetensors::save(t, &path).unwrap();
    LoraSpec { path, scale: 1.0 }
}

#[test]
fn loras_that_do_not_fit_are_refused_saying_why() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |t: &HashMap<String, Tensor>, name: &str| load_err(vec![write(tmp.path(), name, t)]);

    // A module the model does not have (an SD 1.5 LoRA's, say): named, nothing half applied.
    let mut other = tensors("kohya");
    let stem = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q";
    let t = Tensor::ones((2, 8), DType::F16, &Device::Cpu).unwrap();
    other.insert(format!("{stem}.lora_down.weight"), t.clone());
    other.insert(format!("{stem}.lora_up.weight"), t.t().unwrap());
    let e = err(&other, "other.safetensors");
    assert!(
        e.contains("1 of the LoRA's") && e.contains(stem) && e.contains("another model"),
        "{e}"
    );

    // A module whose shape is not the model's.
    let mut wide = tensors("kohya");
    let key = "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight";
    let rank = wide[key].dim(0).unwrap();
    wide.insert(
        key.into(),
        Tensor::ones((rank, 999), DType::F16, &Device::Cpu).unwrap(),
    );
    let e = err(&wide, "wide.safetensors");
    assert!(
        e.contains("lora_te1_text_model_encoder_layers_0_mlp_fc1") && e.contains("does not fit"),
        "{e}"
    );

    // Half a module.
    let mut half = tensors("kohya");
    half.remove("lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight");
    let e = err(&half, "half.safetensors");
    assert!(e.contains("lacks its down or its up weight"), "{e}");

    // LyCORIS' LoHa, and files that are no LoRA.
    let loha: HashMap<String, Tensor> = [(
        "lora_unet_input_blocks_4_1_proj_in.hada_w1_a".to_string(),
        t.clone(),
    )]
    .into();
    let e = err(&loha, "loha.safetensors");
    assert!(e.contains("LoHa") && e.contains("plain LoRAs"), "{e}");
    let model = tiny_model().join("vae/diffusion_pytorch_model.safetensors");
    let e = load_err(vec![LoraSpec {
        path: model,
        scale: 1.0,
    }]);
    assert!(e.contains("not a LoRA this server reads"), "{e}");
    let e = load_err(vec![LoraSpec {
        path: tmp.path().join("absent.safetensors"),
        scale: 1.0,
    }]);
    assert!(e.contains("LoRA file not found"), "{e}");
}

/// A folder names its LoRA as diffusers' `save_lora_weights` writes it
/// (`pytorch_lora_weights.safetensors`), or by being its only `.safetensors` file; the same
/// image as the file named. An empty folder, or one of several other files, is refused saying so.
#[test]
fn a_folder_names_its_lora_file() {
    let by_file = image(&with_loras(vec![case_spec("diffusers")]).unwrap());
    let scale = case_spec("diffusers").scale;
    let folder = |files: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        for name in files {
            std::fs::copy(lora_file("diffusers"), dir.path().join(name)).unwrap();
        }
        dir
    };
    let spec = |dir: &tempfile::TempDir| LoraSpec {
        path: dir.path().to_path_buf(),
        scale,
    };
    for files in [
        &["pytorch_lora_weights.safetensors", "other.safetensors"][..],
        &["style.safetensors"][..],
    ] {
        let dir = folder(files);
        std::fs::write(dir.path().join("README.md"), "a LoRA").unwrap();
        let p = with_loras(vec![spec(&dir)]).unwrap();
        assert!(image(&p) == by_file, "{files:?}");
    }
    let empty = folder(&[]);
    let e = load_err(vec![spec(&empty)]);
    assert!(e.contains("a folder without a LoRA"), "{e}");
    let two = folder(&["a.safetensors", "b.safetensors"]);
    let e = load_err(vec![spec(&two)]);
    assert!(
        e.contains("2 .safetensors files (a.safetensors, b.safetensors)"),
        "{e}"
    );
}

/// A LoRA applies to a single-file checkpoint's weights as to a directory's.
#[test]
fn a_lora_on_a_single_file_checkpoint() {
    let spec = LoadSpec {
        dir: tiny_model(),
        checkpoint: Some(crate::tiny_checkpoint::tiny_checkpoint().to_path_buf()),
        loras: vec![LoraSpec {
            path: lora_file("kohya"),
            scale: 0.8,
        }],
        ..Default::default()
    };
    let with = Pipeline::load_spec(&spec, &Device::Cpu, DType::F32).unwrap();
    let without = Pipeline::load_spec(
        &LoadSpec {
            loras: Vec::new(),
            ..spec.clone()
        },
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(image(&with) != image(&without));
    // Served as an adapter next to the checkpoint's own weights: the same image, bit for bit
    // in bf16 too (the adapter reads the weights it adapts from the checkpoint again).
    for dtype in [DType::F32, DType::BF16] {
        let load = |spec: &LoadSpec| Pipeline::load_spec(spec, &Device::Cpu, dtype).unwrap();
        let served = load(&LoadSpec {
            loras: Vec::new(),
            adapters: vec![AdapterSpec {
                name: "kohya".into(),
                loras: spec.loras.clone(),
            }],
            ..spec.clone()
        });
        let fused = load(&spec);
        let own = load(&LoadSpec {
            loras: Vec::new(),
            ..spec.clone()
        });
        assert!(bicycle_for(&served, Some(0)) == image(&fused), "{dtype:?}");
        assert!(bicycle_for(&served, None) == image(&own), "{dtype:?}");
    }
}
