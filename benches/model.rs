//! Per-stage and whole-pipeline benchmarks, named `{device}/{stage}/bs{N}`.
//!
//! Default: the tiny fixture model (tests/fixtures/tiny-sdxl) on the CPU in f32, so
//! `cargo bench` runs anywhere in a few minutes. With `--features cuda` and
//! `TURBINE_BENCH_DEVICE=cuda:0`: the full SDXL-Turbo architecture from models/sdxl-turbo with
//! random weights, in bf16, at 512x512.
//!
//! Overrides: `TURBINE_BENCH_MODEL` (a model directory to load instead), `TURBINE_BENCH_DTYPE`
//! (f32|f16|bf16), `TURBINE_BENCH_SIZE` (WIDTHxHEIGHT; default 128x128 for the tiny model, where
//! larger sizes spend the time budget in the VAE, and 512x512 otherwise).
//!
//! Every timing is taken with `iter_custom` and a device synchronise before each clock read:
//! candle's CUDA ops are asynchronous, so a bare `iter` would time kernel launches only.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use turbine::cli::generate::parse_size;
use turbine::device::{parse_device, parse_dtype};
use turbine::model::lora::{AdapterSpec, LoraSpec};
use turbine::model::pipeline::{
    edit_schedule, GenerationSettings, ImageRequest, InitImage, LoadSpec, Pipeline,
};

/// The SDXL-Turbo timestep of a 1-step run (trailing spacing: the last of 1000 training steps).
const TURBO_TIMESTEP: f64 = 999.0;

struct Setup {
    prefix: &'static str,
    /// The tiny fixture model (whose fixture LoRAs fit it).
    tiny: bool,
    device: Device,
    dtype: DType,
    pipeline: Pipeline,
    width: usize,
    height: usize,
}

fn setup() -> Setup {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let spec = std::env::var("TURBINE_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = parse_device(&spec).expect("TURBINE_BENCH_DEVICE");
    let dtype = parse_dtype(
        std::env::var("TURBINE_BENCH_DTYPE").ok().as_deref(),
        &device,
    )
    .expect("TURBINE_BENCH_DTYPE");
    let model = std::env::var_os("TURBINE_BENCH_MODEL").map(PathBuf::from);
    let tiny = model.is_none() && !device.is_cuda();
    let pipeline = match (&model, tiny) {
        (Some(dir), _) => Pipeline::load(dir, &device, dtype).expect("loading TURBINE_BENCH_MODEL"),
        (None, true) => Pipeline::load(&root.join("tests/fixtures/tiny-sdxl"), &device, dtype)
            .expect("loading tests/fixtures/tiny-sdxl"),
        (None, false) => Pipeline::random(&root.join("models/sdxl-turbo"), &device, dtype, 0)
            .expect("building the full architecture from models/sdxl-turbo"),
    };
    let default_size = if tiny { "128x128" } else { "512x512" };
    let size = std::env::var("TURBINE_BENCH_SIZE").unwrap_or_else(|_| default_size.into());
    let (width, height) = parse_size(&size).expect("TURBINE_BENCH_SIZE");
    let prefix = if device.is_cuda() { "cuda" } else { "cpu" };
    eprintln!(
        "benchmarking on {spec} in {dtype:?} at {width}x{height}: {}",
        match (&model, tiny) {
            (Some(d), _) => d.display().to_string(),
            (None, true) => "tiny fixture model".into(),
            (None, false) => "SDXL-Turbo architecture, random weights".into(),
        }
    );
    Setup {
        prefix,
        tiny,
        device,
        dtype,
        pipeline,
        width,
        height,
    }
}

/// Times `iters` calls of `f`, synchronising the device before each clock read.
fn timed<T>(device: &Device, iters: u64, mut f: impl FnMut() -> T) -> Duration {
    device.synchronize().expect("device synchronize");
    let start = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    device.synchronize().expect("device synchronize");
    start.elapsed()
}

/// `n` distinct prompts (the pipeline encodes a repeated prompt once): `turbine bench`'s rule.
fn prompts(n: usize) -> Vec<String> {
    let p: Vec<String> = [
        "a photograph of an astronaut riding a horse on the moon",
        "a watercolour painting of a lighthouse at dawn",
        "a bowl of ramen, studio lighting, 35mm",
        "an isometric pixel-art city at night",
    ]
    .map(String::from)
    .to_vec();
    turbine::cli::bench::batch_items(&p, n, 0)
        .into_iter()
        .map(|i| i.prompt)
        .collect()
}

fn stages(c: &mut Criterion) {
    let s = setup();
    let p = &s.pipeline;
    let dev = &s.device;
    let settings = GenerationSettings {
        width: s.width,
        height: s.height,
        steps: 1,
        guidance_scale: 0.0,
        init_step: None,
        adapter: None,
    };
    let (lc, lh, lw) = p.latent_shape(&settings);

    let mut g = c.benchmark_group(format!("{}/tokenize", s.prefix));
    for bs in [1, 8] {
        let owned = prompts(bs);
        let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
        g.throughput(Throughput::Elements(bs as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("bs{bs}")), |b| {
            b.iter_custom(|iters| {
                timed(dev, iters, || {
                    let (t1, t2) = p.tokenizers();
                    let a = t1.encode_batch(&texts, dev).expect("tokenize");
                    let b = t2.encode_batch(&texts, dev).expect("tokenize 2");
                    (a, b)
                })
            })
        });
    }
    g.finish();

    for (name, second) in [("text_encoder", false), ("text_encoder_2", true)] {
        let mut g = c.benchmark_group(format!("{}/{name}", s.prefix));
        for bs in [1, 4] {
            let owned = prompts(bs);
            let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
            let ((t1, t2), (e1, e2)) = (p.tokenizers(), p.text_encoders());
            let (tok, enc) = if second { (t2, e2) } else { (t1, e1) };
            let ids = tok.encode_ids(&texts).expect("tokenize");
            g.throughput(Throughput::Elements(bs as u64));
            // What the pipeline runs: host ids, and only the first encoder's penultimate layer.
            g.bench_function(BenchmarkId::from_parameter(format!("bs{bs}")), |b| {
                b.iter_custom(|iters| {
                    timed(dev, iters, || {
                        if second {
                            enc.forward_ids(&ids, bs, dev).expect(name).penultimate
                        } else {
                            enc.penultimate_ids(&ids, bs, dev).expect(name)
                        }
                    })
                })
            });
        }
        g.finish();
    }

    let mut g = c.benchmark_group(format!("{}/unet", s.prefix));
    for bs in [1, 4] {
        let owned = prompts(bs);
        let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
        let (embeds, pooled) = p.encode_prompts(&texts).expect("encode prompts");
        let latents = Tensor::randn(0f32, 1.0, (bs, lc, lh, lw), dev)
            .and_then(|t| t.to_dtype(s.dtype))
            .expect("latents");
        let (h, w) = (s.height as f32, s.width as f32);
        let time_ids = Tensor::new(&[h, w, 0.0, 0.0, h, w], dev)
            .and_then(|t| t.to_dtype(s.dtype)?.reshape((1, 6))?.repeat((bs, 1)))
            .expect("time ids");
        g.throughput(Throughput::Elements(bs as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("bs{bs}")), |b| {
            b.iter_custom(|iters| {
                timed(dev, iters, || {
                    p.unet()
                        .forward(&latents, TURBO_TIMESTEP, &embeds, &pooled, &time_ids)
                        .expect("unet")
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("{}/vae_decode", s.prefix));
    for bs in [1, 4] {
        let latents = Tensor::randn(0f32, 1.0, (bs, lc, lh, lw), dev).expect("latents");
        g.throughput(Throughput::Elements(bs as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("bs{bs}")), |b| {
            b.iter_custom(|iters| {
                timed(dev, iters, || {
                    p.decode_latents(&latents).expect("vae decode")
                })
            })
        });
    }
    g.finish();
}

/// Whole-pipeline batch scaling: text encoders, one UNet step, VAE decode and the conversion
/// to 8-bit images, per batch; throughput in images.
fn pipeline(c: &mut Criterion) {
    let s = setup();
    let settings = GenerationSettings {
        width: s.width,
        height: s.height,
        steps: 1,
        guidance_scale: 0.0,
        init_step: None,
        adapter: None,
    };
    batch_scaling(c, &s, &s.pipeline, "pipeline", &settings, None);

    // The same through a `--lora-modules` adapter (the fixture kohya LoRA, on the tiny model):
    // fused at load, so the same work per image as `pipeline`.
    if s.tiny {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let spec = LoadSpec {
            dir: root.join("tests/fixtures/tiny-sdxl"),
            adapters: vec![AdapterSpec {
                name: "kohya".into(),
                loras: vec![LoraSpec {
                    path: root.join("tests/fixtures/reference/lora_kohya.safetensors"),
                    scale: 0.8,
                }],
            }],
            ..Default::default()
        };
        let served = Pipeline::load_spec(&spec, &s.device, s.dtype).expect("loading the adapter");
        let adapter = GenerationSettings {
            adapter: Some(0),
            ..settings
        };
        batch_scaling(c, &s, &served, "pipeline_adapter", &adapter, None);
    }

    // Edits (POST /v1/images/edits' default: one step at strength 0.5, the second of a
    // two-step schedule): the same work plus the VAE encoder and its posterior sample, per
    // batch; throughput in images. The `pipeline` group beside it is the generation.
    let (steps, start) = edit_schedule(1, 0.5).expect("edit schedule");
    let edit = GenerationSettings {
        steps,
        init_step: Some(start),
        ..settings
    };
    let input = InitImage::new(image::RgbImage::from_fn(
        s.width as u32,
        s.height as u32,
        |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8]),
    ));
    batch_scaling(c, &s, &s.pipeline, "edit", &edit, Some(&input));
}

/// `{device}/{name}/bs{1,2,4,8}`: one `generate` call of `pipeline` per batch of distinct
/// prompts, each image editing `input` when given.
fn batch_scaling(
    c: &mut Criterion,
    s: &Setup,
    pipeline: &Pipeline,
    name: &str,
    settings: &GenerationSettings,
    input: Option<&InitImage>,
) {
    let mut g = c.benchmark_group(format!("{}/{name}", s.prefix));
    for bs in [1, 2, 4, 8] {
        let items: Vec<ImageRequest> = prompts(bs)
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| ImageRequest {
                prompt,
                negative_prompt: String::new(),
                seed: i as u64,
                init_image: input.cloned(),
                partials: None,
            })
            .collect();
        g.throughput(Throughput::Elements(bs as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("bs{bs}")), |b| {
            b.iter_custom(|iters| {
                timed(&s.device, iters, || {
                    pipeline.generate(settings, &items, None).expect("generate")
                })
            })
        });
    }
    g.finish();
}

/// The SDXL UNet's and VAE decoder's upsamplers (nearest 2x + 3x3 convolution) at their real
/// channel counts and the bench's image size, random weights, one image: with the
/// `upsample-conv` lever (`phases`: one 2x2 convolution of the low-resolution input, 4/9 of the
/// FLOPs) and without it (`plain`: the upsampled tensor, then the 3x3 convolution), every other
/// lever on. On CUDA the VAE's run channels-last, as the decoder does there.
fn upsamplers(c: &mut Criterion) {
    use turbine::model::loader::RandomWeights;
    use turbine::model::unet::layers::{Conv2d, UpsampleConv};
    use turbine::ops::{with_kernels, Kernels};

    let s = setup();
    let dev = &s.device;
    let (lh, lw) = (s.height / 8, s.width / 8);
    // (name, channels, low-resolution height and width, channels-last on CUDA)
    let layers = [
        ("unet_up0_1280ch", 1280, lh / 4, lw / 4, false),
        ("unet_up1_640ch", 640, lh / 2, lw / 2, false),
        ("vae_up0_512ch", 512, lh, lw, true),
        ("vae_up1_512ch", 512, 2 * lh, 2 * lw, true),
        ("vae_up2_256ch", 256, 4 * lh, 4 * lw, true),
    ];
    let mut g = c.benchmark_group(format!("{}/upsampler", s.prefix));
    for (name, ch, h, w, vae) in layers {
        let channels_last = vae && dev.is_cuda();
        let vb = RandomWeights::new(0).into_var_builder(s.dtype, dev);
        let mut conv = Conv2d::new(vb.pp(name), ch, ch, 3, 1, 1).expect("conv");
        if channels_last {
            conv = conv.to_channels_last().expect("channels-last conv");
        }
        let up = with_kernels(Kernels::ALL, || UpsampleConv::new(conv)).expect("upsampler");
        let shape = if channels_last {
            (1, h, w, ch)
        } else {
            (1, ch, h, w)
        };
        let x = Tensor::randn(0f32, 1.0, shape, dev)
            .and_then(|t| t.to_dtype(s.dtype))
            .expect("input");
        for (variant, kernels) in [
            ("plain", Kernels::ALL.without(Kernels::UPSAMPLE_CONV)),
            ("phases", Kernels::ALL),
        ] {
            let id = format!("{name}_{h}x{w}/{variant}");
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter_custom(|iters| {
                    with_kernels(kernels, || {
                        timed(dev, iters, || up.forward(&x).expect("upsampler"))
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Few samples and short windows: whole-pipeline runs take up to seconds on a CPU, and the
    // suite must finish in minutes.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = stages, pipeline, upsamplers
}
criterion_main!(benches);
