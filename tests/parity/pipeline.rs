//! End to end against diffusers' `StableDiffusionXLPipeline` on the tiny model: same prompts,
//! same initial latents and ancestral noise (scripts/fixtures/ref_pipeline.py), 8-bit images
//! within 2/255 max and 0.5/255 mean. Plus batch invariance and half-precision runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use turbine::model::pipeline::{
    GenerationSettings, ImageRequest, NoiseOverride, Pipeline, PromptCounts,
};

use crate::common::{assert_close, fixtures, reference, tiny_model};

/// One case of `reference/pipeline_cases.json`.
#[derive(Deserialize)]
pub struct Case {
    pub prompts: Vec<String>,
    pub negative_prompts: Option<Vec<String>>,
    width: usize,
    height: usize,
    steps: usize,
    guidance_scale: f64,
}

impl Case {
    /// The case's requests, diffusers' latents and ancestral noise from its reference file, and
    /// its settings: what `generate` needs to reproduce diffusers' images.
    pub fn inputs(
        &self,
        refs: &HashMap<String, Tensor>,
    ) -> (Vec<ImageRequest>, NoiseOverride, GenerationSettings) {
        let items = self
            .prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| ImageRequest {
                prompt: prompt.clone(),
                negative_prompt: self
                    .negative_prompts
                    .as_ref()
                    .map(|v| v[i].clone())
                    .unwrap_or_default(),
                seed: 0,
                init_image: None,
                partials: None,
            })
            .collect();
        let noise = NoiseOverride {
            init_latents: Some(refs["latents"].clone()),
            step_noise: Some(
                (0..self.steps)
                    .map(|k| refs[&format!("step_noise_{k}")].clone())
                    .collect(),
            ),
            image_noise: None,
        };
        let settings = GenerationSettings {
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            init_step: None,
            adapter: None,
        };
        (items, noise, settings)
    }
}

pub fn cases() -> BTreeMap<String, Case> {
    let p = fixtures().join("reference/pipeline_cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn pipeline() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| Pipeline::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap())
}

pub fn u8_images(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// (max, mean) absolute difference in 8-bit levels.
pub fn pixel_diff(ours: &[u8], theirs: &[u8]) -> (u8, f64) {
    assert_eq!(ours.len(), theirs.len());
    let mut max = 0u8;
    let mut sum = 0u64;
    for (a, b) in ours.iter().zip(theirs) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / ours.len() as f64)
}

fn run_case(name: &str) {
    run_case_on(pipeline(), name, &format!("pipeline_{name}"));
}

/// Runs `case` of pipeline_cases.json on `p` against the reference file `reference_name`:
/// the prompt embeddings within 1e-4, the 8-bit images within 2/255 max and 0.5/255 mean.
pub fn run_case_on(p: &Pipeline, name: &str, reference_name: &str) {
    run_case_for(p, None, name, reference_name)
}

/// [`run_case_on`] with the `--lora-modules` adapter `adapter` of `p`.
pub fn run_case_for(p: &Pipeline, adapter: Option<usize>, name: &str, reference_name: &str) {
    let case = &cases()[name];
    let refs = reference(reference_name);
    let n = case.prompts.len();
    let (items, noise, mut settings) = case.inputs(&refs);
    settings.adapter = adapter;

    let prompts: Vec<&str> = case.prompts.iter().map(String::as_str).collect();
    let (embeds, pooled) = p.encode_prompts_for(adapter, &prompts).unwrap();
    assert_close(
        &format!("{name}/prompt_embeds"),
        &embeds,
        &refs["prompt_embeds"],
        1e-4,
    );
    assert_close(
        &format!("{name}/pooled"),
        &pooled,
        &refs["pooled_prompt_embeds"],
        1e-4,
    );
    if let Some(neg) = &case.negative_prompts {
        let neg: Vec<&str> = neg.iter().map(String::as_str).collect();
        let (e, p2) = p.encode_prompts_for(adapter, &neg).unwrap();
        assert_close(
            &format!("{name}/negative_embeds"),
            &e,
            &refs["negative_prompt_embeds"],
            1e-4,
        );
        assert_close(
            &format!("{name}/negative_pooled"),
            &p2,
            &refs["negative_pooled_prompt_embeds"],
            1e-4,
        );
    }

    let batch = p.generate(&settings, &items, Some(&noise)).unwrap();
    assert_eq!(batch.images.len(), n);
    let ours: Vec<u8> = batch
        .images
        .iter()
        .flat_map(|im| im.as_raw().iter().copied())
        .collect();
    let theirs = u8_images(&refs["image_u8"]);
    let (max, mean) = pixel_diff(&ours, &theirs);
    eprintln!("{name}: 8-bit image difference max {max}/255, mean {mean:.4}/255");
    assert!(max <= 2, "{name}: max pixel difference {max}/255 > 2");
    assert!(
        mean <= 0.5,
        "{name}: mean pixel difference {mean}/255 > 0.5"
    );
}

#[test]
fn e2e_one_prompt() {
    run_case("one_prompt");
}

#[test]
fn e2e_two_prompts() {
    run_case("two_prompts");
}

#[test]
fn e2e_non_square() {
    run_case("non_square");
}

#[test]
fn e2e_empty_prompt() {
    run_case("empty_prompt");
}

#[test]
fn e2e_long_prompt() {
    run_case("long_prompt");
}

#[test]
fn e2e_cfg_negative() {
    run_case("cfg_negative");
}

#[test]
fn e2e_cfg_no_negative() {
    run_case("cfg_no_negative");
}

#[test]
fn e2e_two_steps() {
    run_case("two_steps");
}

pub fn req(prompt: &str, seed: u64) -> ImageRequest {
    ImageRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        seed,
        init_image: None,
        partials: None,
    }
}

/// An image depends only on its own prompt, seed and settings: generated alone it equals the
/// same image inside a batch of 4 with other prompts and seeds, with and without guidance.
#[test]
fn batch_invariance() {
    let p = pipeline();
    for (steps, guidance) in [(1, 0.0), (2, 3.0)] {
        let settings = GenerationSettings {
            width: 64,
            height: 48,
            steps,
            guidance_scale: guidance,
            init_step: None,
            adapter: None,
        };
        let batch = vec![
            req("a red cube", 11),
            req("a blue sphere", 12),
            req("", 13),
            req("a green cone", 14),
        ];
        let together = p.generate(&settings, &batch, None).unwrap().images;
        for (i, item) in batch.iter().enumerate() {
            let alone = p
                .generate(&settings, std::slice::from_ref(item), None)
                .unwrap()
                .images;
            let (max, mean) = pixel_diff(alone[0].as_raw(), together[i].as_raw());
            eprintln!("steps {steps} guidance {guidance} image {i}: alone vs batch max {max} mean {mean:.4}");
            assert!(max <= 1, "image {i} differs alone vs in batch by {max}/255");
        }
        // Different seeds, same prompt: different images (the seed really drives the noise).
        let a = p.generate(&settings, &[req("x", 1)], None).unwrap().images;
        let b = p.generate(&settings, &[req("x", 2)], None).unwrap().images;
        assert!(pixel_diff(a[0].as_raw(), b[0].as_raw()).1 > 1.0);
    }
}

/// 64x48 generations of `steps` steps without guidance: the preview tests' settings.
pub fn preview_settings(steps: usize) -> GenerationSettings {
    GenerationSettings {
        width: 64,
        height: 48,
        steps,
        guidance_scale: 0.0,
        init_step: None,
        adapter: None,
    }
}

/// Previews come for the images that ask, with their indices in order, and only for them, also
/// from a batch where other images ask for none or for another count; the first preview is the
/// one-step image of the same seed (every trailing schedule starts at t = 999, where the step to
/// sigma 0 is the denoised estimate), and previews change nothing of the images.
#[test]
fn previews_go_to_the_images_that_ask() {
    use std::sync::{Arc, Mutex};
    use turbine::model::pipeline::Partials;
    let p = pipeline();
    let settings = preview_settings;
    let got: Arc<Mutex<Vec<(u64, usize, image::RgbImage)>>> = Arc::default();
    let asking = |seed: u64, count: usize| {
        let got = got.clone();
        let mut r = req("a lighthouse", seed);
        r.partials = Some(Partials::new(count, move |k, image| {
            got.lock().unwrap().push((seed, k, image));
        }));
        r
    };
    let batch = vec![
        req("a lighthouse", 20),
        asking(21, 2),
        req("a barn", 22),
        asking(23, 3),
    ];
    let images = p.generate(&settings(4), &batch, None).unwrap().images;
    let plain: Vec<ImageRequest> = batch
        .iter()
        .map(|r| ImageRequest {
            partials: None,
            ..r.clone()
        })
        .collect();
    assert_eq!(
        images,
        p.generate(&settings(4), &plain, None).unwrap().images,
        "previews change nothing of the images"
    );
    let got = got.lock().unwrap();
    let order: Vec<(u64, usize)> = got.iter().map(|(s, k, _)| (*s, *k)).collect();
    // Seed 21 after steps 1 and 3, seed 23 after steps 1, 2 and 3: in the order made.
    assert_eq!(order, [(21, 0), (23, 0), (23, 1), (21, 1), (23, 2)]);
    let one_step = p
        .generate(
            &settings(1),
            &[req("a lighthouse", 21), req("a lighthouse", 23)],
            None,
        )
        .unwrap()
        .images;
    assert_eq!(got[0].2, one_step[0]);
    assert_eq!(got[1].2, one_step[1]);
    // The last preview is not yet the image.
    assert_ne!(got[4].2, images[3]);
}

/// f16 and bf16 runs give finite images close to the f32 run (the VAE is upcast for f16).
#[test]
fn half_precision_close_to_f32() {
    let settings = GenerationSettings {
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 0.0,
        init_step: None,
        adapter: None,
    };
    let items = vec![req("a lighthouse at dusk", 5), req("a bowl of fruit", 6)];
    let reference = pipeline().generate(&settings, &items, None).unwrap().images;
    for dtype in [DType::F16, DType::BF16] {
        let p = Pipeline::load(&tiny_model(), &Device::Cpu, dtype).unwrap();
        let images = p.generate(&settings, &items, None).unwrap().images;
        for (a, b) in images.iter().zip(&reference) {
            let (max, mean) = pixel_diff(a.as_raw(), b.as_raw());
            eprintln!("{dtype:?} vs f32: max {max}/255 mean {mean:.3}/255");
            assert!(
                mean < 6.0,
                "{dtype:?}: mean difference {mean}/255 too large"
            );
        }
    }
}

/// An image too large for one call of the models is refused up front, naming its size, before
/// anything runs (a batch is split into runs that fit, but one image cannot be).
#[test]
fn too_large_an_image_is_invalid_input() {
    let p = pipeline();
    // The tiny VAE's widest full-resolution map has 16 channels: 2^32 elements at 16384^2.
    let settings = GenerationSettings {
        width: 16384,
        height: 16384,
        steps: 1,
        guidance_scale: 0.0,
        init_step: None,
        adapter: None,
    };
    let err = p.validate(&settings, 1).unwrap_err().to_string();
    assert!(
        err.contains("a 16384x16384 image is too large for this model"),
        "{err}"
    );
    let ok = GenerationSettings {
        width: 1024,
        height: 1024,
        ..settings
    };
    assert!(p.validate(&ok, 64).is_ok());
}

fn settings_64(steps: usize, guidance_scale: f64) -> GenerationSettings {
    GenerationSettings {
        width: 64,
        height: 64,
        steps,
        guidance_scale,
        init_step: None,
        adapter: None,
    }
}

fn reqs(prompts: &[&str]) -> Vec<ImageRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| req(p, 100 + i as u64))
        .collect()
}

/// `n` > 1 asks for the same prompt n times: each distinct prompt of a batch runs through the
/// text encoders once, and the rows of its repeats are its rows, bit for bit what encoding
/// every prompt gives (on the CPU, where rows do not depend on the batch's shape).
#[test]
fn a_repeated_prompt_is_encoded_once_with_the_same_rows() {
    let p = pipeline();
    let prompts = [
        "a red cube",
        "a blue sphere",
        "a red cube",
        "a red cube",
        "",
        "a blue sphere",
    ];
    let (embeds, pooled) = p.encode_prompts(&prompts).unwrap();
    let (each_embeds, each_pooled) = p.encode_prompts_uncached(&prompts).unwrap();
    assert_eq!(embeds.dims(), each_embeds.dims());
    assert_eq!(pooled.dims(), each_pooled.dims());
    assert_close("deduplicated embeds", &embeds, &each_embeds, 0.0);
    assert_close("deduplicated pooled", &pooled, &each_pooled, 0.0);

    let out = p
        .generate(&settings_64(1, 0.0), &reqs(&prompts), None)
        .unwrap();
    assert_eq!(
        out.prompts,
        PromptCounts {
            encoded: 3,
            repeated: 3,
            cached: 0
        }
    );
    // With guidance the negative prompts count too: four empty ones, encoded once.
    let out = p
        .generate(&settings_64(1, 3.0), &reqs(&prompts[..4]), None)
        .unwrap();
    assert_eq!(
        out.prompts,
        PromptCounts {
            encoded: 3,
            repeated: 5,
            cached: 0
        }
    );
}

/// Runs `prompts` on `cached` and asserts its images are `plain`'s (which keeps no prompts),
/// returns where the prompt embeddings came from.
fn run_both(
    cached: &Pipeline,
    plain: &Pipeline,
    settings: &GenerationSettings,
    prompts: &[&str],
) -> PromptCounts {
    let items = reqs(prompts);
    let out = cached.generate(settings, &items, None).unwrap();
    let expected = plain.generate(settings, &items, None).unwrap().images;
    assert_eq!(out.images.len(), expected.len());
    for (i, (a, b)) in out.images.iter().zip(&expected).enumerate() {
        // Bit for bit: on the CPU a prompt's rows do not depend on the batch they ran in.
        let (max, mean) = pixel_diff(a.as_raw(), b.as_raw());
        assert!(
            max == 0,
            "image {i} of {prompts:?} differs with the cache: max {max}, mean {mean}"
        );
    }
    out.prompts
}

fn counts(encoded: usize, repeated: usize, cached: usize) -> PromptCounts {
    PromptCounts {
        encoded,
        repeated,
        cached,
    }
}

/// A prompt kept from an earlier batch skips the encoders, and the images are the ones a
/// pipeline without the cache makes; the least recently used prompt goes first when it is full.
#[test]
fn the_prompt_cache_reuses_recent_prompts_and_changes_no_image() {
    let plain = pipeline();
    let mut cached = Pipeline::load(&tiny_model(), &Device::Cpu, DType::F32).unwrap();
    cached.set_prompt_cache_entries(2);
    let s = settings_64(1, 0.0);
    assert_eq!(run_both(&cached, plain, &s, &["a", "b"]), counts(2, 0, 0));
    // "b" is read, so "a" is the least recently used when "c" comes in.
    assert_eq!(
        run_both(&cached, plain, &s, &["b", "c", "b"]),
        counts(1, 1, 1)
    );
    assert_eq!(cached.prompt_cache_len(), 2);
    assert_eq!(run_both(&cached, plain, &s, &["a"]), counts(1, 0, 0));
    // "a" pushed out "b"; "c" and "a" are kept.
    assert_eq!(run_both(&cached, plain, &s, &["c", "a"]), counts(0, 0, 2));
    assert_eq!(run_both(&cached, plain, &s, &["b"]), counts(1, 0, 0));

    // With guidance the negative prompts are kept too.
    cached.set_prompt_cache_entries(8);
    assert_eq!(cached.prompt_cache_len(), 0);
    let g = settings_64(1, 3.0);
    assert_eq!(run_both(&cached, plain, &g, &["x", "y"]), counts(3, 1, 0));
    assert_eq!(run_both(&cached, plain, &g, &["y", "z"]), counts(1, 1, 2));
}
