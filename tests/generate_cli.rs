//! `turbine generate` end to end: the real binary on the tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "support/checkpoint.rs"]
mod tiny_checkpoint;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

fn turbine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turbine"))
        .arg("generate")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("failed to run turbine")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn dims(p: &Path) -> (u32, u32) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (img.width(), img.height())
}

#[test]
fn one_prompt_writes_the_png_and_prints_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let o = turbine(&[
        "--model-dir",
        tiny().to_str().unwrap(),
        "--prompt",
        "a cat",
        "--size",
        "64x40",
        "--seed",
        "7",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(dims(&out), (64, 40));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("seed=7"), "stdout: {stdout}");
}

/// The XMP packet in a PNG, as the `image` crate's decoder finds it.
fn xmp(p: &Path) -> Option<String> {
    use image::ImageDecoder;
    let file = std::io::BufReader::new(std::fs::File::open(p).unwrap());
    let mut decoder = image::codecs::png::PngDecoder::new(file).unwrap();
    decoder
        .xmp_metadata()
        .unwrap()
        .map(|x| String::from_utf8(x).unwrap())
}

/// The PNG says a model made it (IPTC's digital source type), and with `--image-metadata
/// parameters` the prompt too; `none` writes no metadata, and the pixels are the same.
#[test]
fn the_png_says_a_model_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = |level: Option<&str>, name: &str| {
        let out = dir.path().join(name);
        let (model, file) = (tiny(), out.to_str().unwrap().to_string());
        let mut args = vec![
            "--model-dir",
            model.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--size",
            "64x40",
            "--seed",
            "7",
            "--out",
            &file,
        ];
        if let Some(level) = level {
            args.extend(["--image-metadata", level]);
        }
        let o = turbine(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let default = run(None, "default.png");
    let xmp_default = xmp(&default).expect("XMP in the default PNG");
    assert!(
        xmp_default.contains(
            "<Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/\
             trainedAlgorithmicMedia</Iptc4xmpExt:DigitalSourceType>"
        ),
        "{xmp_default}"
    );
    assert!(!xmp_default.contains("a cat"), "{xmp_default}");
    let parameters = run(Some("parameters"), "parameters.png");
    let xmp_parameters = xmp(&parameters).unwrap();
    assert!(
        xmp_parameters
            .contains("<Iptc4xmpExt:AIPromptInformation>a cat</Iptc4xmpExt:AIPromptInformation>"),
        "{xmp_parameters}"
    );
    let none = run(Some("none"), "none.png");
    assert_eq!(xmp(&none), None);
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8();
    assert_eq!(pixels(&default), pixels(&none));
    assert_eq!(pixels(&parameters), pixels(&none));
}

/// `--preview-vae` (shared with `serve`) decodes previews, which `generate` does not make: it
/// says so and neither needs nor loads the decoder (this model directory has no TAESD).
#[test]
fn preview_vae_is_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    for entry in std::fs::read_dir(tiny()).unwrap().flatten() {
        if entry.file_name() != "vae-taesdxl" {
            copy_tree(&entry.path(), &model.join(entry.file_name()));
        }
    }
    let out = dir.path().join("cat.png");
    let o = turbine(&[
        "--model-dir",
        model.to_str().unwrap(),
        "--preview-vae",
        "taesdxl",
        "--prompt",
        "a cat",
        "--size",
        "64x40",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(dims(&out), (64, 40));
    assert!(
        stderr(&o).contains(
            "--preview-vae taesdxl decodes a stream's previews, and generate makes none: ignored"
        ),
        "{}",
        stderr(&o)
    );
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn several_prompts_get_numbered_files_and_consecutive_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let o = turbine(&[
        "--model-dir",
        tiny().to_str().unwrap(),
        "--prompt",
        "a cat",
        "--prompt",
        "a dog",
        "--size",
        "64x64",
        "--seed",
        "100",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = image::open(dir.path().join("img-0.png")).unwrap().to_rgb8();
    let b = image::open(dir.path().join("img-1.png")).unwrap().to_rgb8();
    assert_ne!(
        a, b,
        "different prompts and seeds must give different images"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("seed=100") && stdout.contains("seed=101"),
        "{stdout}"
    );

    // The same seed and prompt again, alone: the same image as inside the batch.
    let single = dir.path().join("single.png");
    let o = turbine(&[
        "--model-dir",
        tiny().to_str().unwrap(),
        "--prompt",
        "a dog",
        "--size",
        "64x64",
        "--seed",
        "101",
        "--out",
        single.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = image::open(&single).unwrap().to_rgb8();
    let max = b
        .as_raw()
        .iter()
        .zip(c.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(max <= 1, "batched vs alone differ by {max}/255");
}

#[test]
fn invalid_input_exits_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = tiny();
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--model-dir",
                m,
                "--prompt",
                "x",
                "--size",
                "513x512",
                "--out",
                o,
            ],
            "multiples of 8",
        ),
        (
            vec![
                "--model-dir",
                m,
                "--prompt",
                "x",
                "--size",
                "abc",
                "--out",
                o,
            ],
            "WIDTHxHEIGHT",
        ),
        (
            vec![
                "--model-dir",
                m,
                "--prompt",
                "x",
                "--steps",
                "0",
                "--out",
                o,
            ],
            "--steps",
        ),
        (
            vec![
                "--model-dir",
                m,
                "--prompt",
                "x",
                "--dtype",
                "f8",
                "--out",
                o,
            ],
            "dtype",
        ),
        (
            vec![
                "--model-dir",
                m,
                "--prompt",
                "x",
                "--device",
                "tpu",
                "--out",
                o,
            ],
            "device",
        ),
        (
            vec![
                "--model-dir",
                "/nonexistent/model",
                "--prompt",
                "x",
                "--out",
                o,
            ],
            "/nonexistent/model",
        ),
        (
            vec![
                "--model-dir",
                m,
                "--prompt",
                "x",
                "--init-latents",
                "/nonexistent.safetensors",
                "--out",
                o,
            ],
            "init-latents",
        ),
        (
            vec![
                "--model-dir",
                m,
                "--prompt",
                "a",
                "--prompt",
                "b",
                "--negative-prompt",
                "1",
                "--negative-prompt",
                "2",
                "--negative-prompt",
                "3",
                "--out",
                o,
            ],
            "negative-prompt",
        ),
    ];
    for (args, needle) in cases {
        let r = turbine(&args);
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    assert!(!out.exists());
}

#[test]
fn init_latents_of_the_wrong_shape_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lat = dir.path().join("lat.safetensors");
    let t = candle_core::Tensor::zeros(
        (1, 4, 4, 4),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), t)]),
        &lat,
    )
    .unwrap();
    let out = dir.path().join("x.png");
    let r = turbine(&[
        "--model-dir",
        tiny().to_str().unwrap(),
        "--prompt",
        "x",
        "--size",
        "64x64",
        "--init-latents",
        lat.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&r);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("[1, 4, 8, 8]"), "{err}");
}

/// `--image` (and `--mask` or `--markup`): the server's edit from the command line, reproducible by seed, and
/// another image than a generation of the same prompt and seed.
#[test]
fn an_image_is_edited_and_a_mask_inpaints() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.png");
    image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
    })
    .save(&input)
    .unwrap();
    let mask = dir.path().join("mask.png");
    image::RgbaImage::from_fn(96, 64, |x, _| {
        image::Rgba([0, 0, 0, if x < 48 { 0 } else { 255 }])
    })
    .save(&mask)
    .unwrap();
    let m = tiny();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "--model-dir",
            m.to_str().unwrap(),
            "--prompt",
            "snow",
            "--size",
            "64x64",
            "--seed",
            "5",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = turbine(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert_eq!(dims(&out), (64, 64));
        image::open(&out).unwrap().to_rgb8()
    };
    let img = input.to_str().unwrap();
    let edited = run("edit.png", &["--image", img]);
    assert!(run("again.png", &["--image", img, "--strength", "0.5"]) == edited);
    assert!(run("generated.png", &[]) != edited, "--image was ignored");
    let masked = run(
        "masked.png",
        &["--image", img, "--mask", mask.to_str().unwrap()],
    );
    assert!(masked != edited, "--mask was ignored");
    // The mask's image as a markup: its opaque (black) right half drawn over the input.
    let marked = run(
        "marked.png",
        &["--image", img, "--markup", mask.to_str().unwrap()],
    );
    assert!(marked != edited && marked != masked, "--markup was ignored");

    let out = dir.path().join("x.png");
    for (extra, want) in [
        (
            vec!["--image", img, "--strength", "0"],
            "strength in (0, 1]",
        ),
        (vec!["--mask", img], "--image"),
        (vec!["--image", "/no/such.png"], "cannot read --image"),
        (vec!["--image", img, "--mask", img], "alpha channel"),
        (vec!["--image", img, "--markup", img], "--markup"),
        (
            vec!["--image", img, "--mask", img, "--markup", img],
            "cannot be used with",
        ),
    ] {
        let mut args = vec![
            "--model-dir",
            m.to_str().unwrap(),
            "--prompt",
            "x",
            "--size",
            "64x64",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(&extra);
        let o = turbine(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{extra:?}: {}", stderr(&o));
    }
}

/// With `--image`, `--init-latents` may also carry `image_noise` (the VAE posterior's normals):
/// the edit is then the library's with exactly that noise, as a comparison with diffusers
/// needs; without `--image` the tensor is refused.
#[test]
fn an_edits_noise_can_all_be_given() {
    use candle_core::{DType, Device, Tensor};
    use turbine::model::pipeline::{
        edit_schedule, GenerationSettings, ImageRequest, InitImage, NoiseOverride, Pipeline,
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.png");
    let rgb = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 3) as u8, ((x * y) % 256) as u8])
    });
    rgb.save(&input).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let image_noise = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let noise_file = dir.path().join("noise.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("latents".to_string(), latents.clone()),
            ("image_noise".to_string(), image_noise.clone()),
        ]),
        &noise_file,
    )
    .unwrap();
    let m = tiny();
    let out = dir.path().join("edit.png");
    let args = |with_image: bool| {
        let mut a = vec![
            "--model-dir",
            m.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--prompt",
            "snow",
            "--size",
            "64x64",
            "--seed",
            "3",
            "--init-latents",
            noise_file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if with_image {
            a.extend(["--image", input.to_str().unwrap()]);
        }
        a
    };
    let o = turbine(&args(true));
    assert!(o.status.success(), "{}", stderr(&o));

    let p = Pipeline::load(&m, &Device::Cpu, DType::F32).unwrap();
    let (steps, start) = edit_schedule(1, 0.5).unwrap();
    let settings = GenerationSettings {
        width: 64,
        height: 64,
        steps,
        guidance_scale: 0.0,
        init_step: Some(start),
        adapter: None,
    };
    let items: Vec<ImageRequest> = ["a photo of a cat", "snow"]
        .iter()
        .enumerate()
        .map(|(i, prompt)| ImageRequest {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            seed: 3 + i as u64,
            init_image: Some(InitImage::new(rgb.clone())),
            partials: None,
        })
        .collect();
    let noise = NoiseOverride {
        init_latents: Some(latents),
        step_noise: None,
        image_noise: Some(image_noise),
    };
    let expected = p.generate(&settings, &items, Some(&noise)).unwrap().images;
    for (i, want) in expected.iter().enumerate() {
        let got = image::open(dir.path().join(format!("edit-{i}.png")))
            .unwrap()
            .to_rgb8();
        assert!(
            got == *want,
            "image {i} is not the pipeline's with that noise"
        );
    }
    // The seeds' own posterior noise gives other images.
    let seeded = p
        .generate(
            &settings,
            &items,
            Some(&NoiseOverride {
                image_noise: None,
                ..noise
            }),
        )
        .unwrap()
        .images;
    assert!(seeded[0] != expected[0], "image_noise changed nothing");

    let o = turbine(&args(false));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("only an edit"), "{}", stderr(&o));
}

/// `--log-format json` (or `TURBINE_LOG_FORMAT=json`): every line on stderr is one JSON object
/// with a timestamp, level, target and message, the event's fields beside them; a failure
/// leaves its reason as such a line too (and still exits 2).
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let tiny = tiny();
    let run = |extra: &[&str], env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_turbine"));
        c.arg("generate")
            .args(["--model-dir", tiny.to_str().unwrap(), "--size", "64x64"])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("TURBINE_LOG_FORMAT");
        if let Some(format) = env {
            c.env("TURBINE_LOG_FORMAT", format);
        }
        c.output().unwrap()
    };
    let objects = |o: &Output| -> Vec<serde_json::Value> {
        stderr(o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };

    for (extra, env) in [
        (&["--prompt", "a fox", "--log-format", "json"][..], None),
        (&["--prompt", "a fox"][..], Some("json")),
    ] {
        let o = run(extra, env);
        assert!(o.status.success(), "{}", stderr(&o));
        let lines = objects(&o);
        let done = lines
            .iter()
            .find(|l| l["message"] == "generated 1 image(s)")
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert_eq!(done["level"], "INFO");
        assert_eq!(done["target"], "turbine::cli::generate");
        assert!(done["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(done["unet"].is_string(), "{done}");
    }

    let o = run(
        &["--prompt", "a fox", "--steps", "0", "--log-format", "json"],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let lines = objects(&o);
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR");
    assert!(last["error"].as_str().unwrap().contains("steps"), "{last}");

    // The default stays text.
    let o = run(&["--prompt", "a fox"], None);
    assert!(o.status.success());
    assert!(
        stderr(&o).lines().all(|l| !l.starts_with('{')),
        "{}",
        stderr(&o)
    );
}

/// Text logs carry colours only for a person at a terminal. Written to a pipe or a file (a
/// supervisor, journald, `docker logs`) they are plain text: an escape code makes journald keep a
/// line as bytes (`journalctl` shows `[N blob data]`) and is noise in every collector. `NO_COLOR`
/// turns them off at a terminal too.
#[test]
fn text_logs_are_coloured_only_at_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let tiny = tiny();
    let command = |no_color: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_turbine"));
        c.arg("generate")
            .args(["--model-dir", tiny.to_str().unwrap(), "--size", "64x64"])
            .args(["--prompt", "a fox", "--out", out.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .env_remove("TURBINE_LOG_FORMAT")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        c
    };
    let logged = |text: &str| {
        assert!(text.contains("generated 1 image(s)"), "{text}");
        text.contains('\x1b')
    };

    // To a pipe: no escapes, with or without NO_COLOR.
    for no_color in [None, Some("1")] {
        let o = command(no_color).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!logged(&stderr(&o)), "{:?}", stderr(&o));
    }

    // To a terminal (a pseudo-terminal here): coloured, unless NO_COLOR is set and not empty.
    for (no_color, coloured) in [(None, true), (Some(""), true), (Some("1"), false)] {
        let text = on_a_terminal(command(no_color));
        assert_eq!(logged(&text), coloured, "NO_COLOR={no_color:?}: {text:?}");
    }
}

/// Runs `c` with its stderr on a new pseudo-terminal and returns what it wrote there.
fn on_a_terminal(mut c: Command) -> String {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut primary, secondary) = {
        let (mut p, mut s) = (-1, -1);
        // SAFETY: openpty writes two new descriptors into p and s; the name, termios and
        // window size are optional and not asked for.
        let rc = unsafe {
            libc::openpty(
                &mut p,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are open and owned by nothing else.
        unsafe { (std::fs::File::from_raw_fd(p), OwnedFd::from_raw_fd(s)) }
    };
    let mut child = c
        .stdout(std::process::Stdio::null())
        .stderr(secondary)
        .spawn()
        .unwrap();
    // The command's copy of the secondary end went with it: once it exits, reading the primary
    // end ends (EIO) after what it wrote.
    drop(c);
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match primary.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("reading the terminal: {e}"),
        }
    }
    assert!(
        child.wait().unwrap().success(),
        "{}",
        String::from_utf8_lossy(&text)
    );
    String::from_utf8_lossy(&text).into_owned()
}

/// `--checkpoint`: the weights from one single-file checkpoint, the configs and tokenizers from
/// a directory that holds no weights at all.
#[test]
fn a_single_file_checkpoint_makes_the_image_with_configs_from_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let configs = dir.path().join("configs");
    copy_tree(&tiny(), &configs);
    for entry in walk(&configs) {
        if entry.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(entry).unwrap();
        }
    }
    let checkpoint = tiny_checkpoint::tiny_checkpoint();
    let out = dir.path().join("ck.png");
    let o = turbine(&[
        "--model-dir",
        configs.to_str().unwrap(),
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--size",
        "64x64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(dims(&out), (64, 64));

    // Without --model-dir the configs are the real SDXL-Turbo's (models/sdxl-turbo), which the
    // tiny checkpoint does not fit: a clear error, no image.
    let out = dir.path().join("none.png");
    let o = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["generate", "--offline", "--checkpoint"])
        .arg(checkpoint)
        .args(["--prompt", "a cat", "--out"])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("tiny_sdxl_turbo_fp16.safetensors") && err.contains("the config implies"),
        "{err}"
    );
    assert!(!out.exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `--lora FILE:SCALE`: fused in at load (the log says so), a different image than without it;
/// a file that is not a LoRA stops the command with the reason.
#[test]
fn a_lora_is_fused_in_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let lora = tiny().with_file_name("reference/lora_kohya.safetensors");
    let model = tiny();
    let run = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "--model-dir",
            model.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--size",
            "64x64",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_turbine"))
            .arg("generate")
            .args(&args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let (with, without) = (dir.path().join("with.png"), dir.path().join("without.png"));
    let spec = format!("{}:0.8", lora.display());
    let o = run(&["--lora", &spec], &with);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("lora_kohya.safetensors: 217 modules fused"),
        "{}",
        stderr(&o)
    );
    assert!(run(&[], &without).status.success());
    assert!(std::fs::read(&with).unwrap() != std::fs::read(&without).unwrap());

    let not_a_lora = tiny().join("unet/diffusion_pytorch_model.safetensors");
    let o = run(
        &["--lora", not_a_lora.to_str().unwrap()],
        &dir.path().join("x.png"),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a LoRA this server reads"),
        "{}",
        stderr(&o)
    );
}
