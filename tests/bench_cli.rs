//! `turbine bench` end to end on the tiny fixture model: the table, the JSON report, warm-up
//! exclusion, saved images, `--init-latents`, `--random-weights`, and usage errors. No timing
//! is asserted (speed is for benchmarks); only that the figures are consistent with each other.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use turbine::cli::bench::Report;
use turbine::ops::Kernels;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    root().join("tests/fixtures/tiny-sdxl")
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turbine"))
        .arg("bench")
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("running turbine bench")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pixels(p: &Path) -> image::RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

/// A sweep of one batch of 1 (no warm-up, one run) on the tiny model at 64x64, plus `extra`;
/// the run must succeed. Returns its output and JSON report.
fn one_quick_batch(extra: &[&str]) -> (Output, Report) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let tiny = tiny();
    let mut args = vec![
        "--model-dir",
        tiny.to_str().unwrap(),
        "--size",
        "64x64",
        "--batch-sizes",
        "1",
        "--warmup",
        "0",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = bench(&args);
    assert!(o.status.success(), "{}", text(&o));
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (o, report)
}

#[test]
fn sweep_writes_table_json_and_images() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out/report.json");
    let images = dir.path().join("images");
    let o = bench(&[
        "--model-dir",
        tiny().to_str().unwrap(),
        "--size",
        "64x64",
        "--batch-sizes",
        "1,3",
        "--warmup",
        "1",
        "--runs",
        "2",
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue sphere",
        "--json",
        json.to_str().unwrap(),
        "--save-images",
        images.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let table: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(table.len(), 3, "header + 2 rows:\n{stdout}");
    assert!(table[0].contains("images/s") && table[0].contains("unet ms"));
    assert!(table[1].starts_with("| 1 | 2 |") && table[2].starts_with("| 3 | 2 |"));

    let report: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report.tool, "turbine bench");
    assert_eq!(
        (report.device.as_str(), report.dtype.as_str()),
        ("cpu", "f32")
    );
    assert_eq!(
        (report.size.as_str(), report.steps, report.warmup),
        ("64x64", 1, 1)
    );
    assert!(!report.commit.is_empty() && report.machine.cores >= 1 && report.threads >= 1);
    assert_eq!(report.rows.len(), 2);
    for (row, b) in report.rows.iter().zip([1usize, 3]) {
        assert_eq!(row.batch, b);
        // Warm-up runs are not among the timed ones.
        assert_eq!((row.runs, row.seconds.len()), (2, 2));
        assert!(row.min_s <= row.median_s && row.median_s <= row.max_s);
        assert!((row.images_per_s - b as f64 / row.median_s).abs() < 1e-9 * row.images_per_s);
        assert!(row.unet_ms > 0.0 && row.vae_decode_ms > 0.0 && row.text_encode_ms > 0.0);
        assert!(row.finished_unix_s > row.started_unix_s);
        // The timed runs' window (what gpu_check reads the GPU's busy share over) lies inside
        // the whole window, after the warm-up, and holds at least the timed runs' time.
        assert!(row.started_unix_s < row.timed_started_unix_s, "{row:?}");
        assert!(row.timed_finished_unix_s <= row.finished_unix_s, "{row:?}");
        let timed: f64 = row.seconds.iter().sum();
        assert!(
            row.timed_finished_unix_s - row.timed_started_unix_s >= timed * 0.99,
            "{row:?}"
        );
        // `all` includes OVERLAP, but on the CPU a batch is done when `launch` returns: nothing
        // overlaps, each timed run is a whole batch (its latency), and no batch is queued
        // behind another.
        assert_eq!(row.latency_s, Some(row.median_s), "{row:?}");
        assert_eq!(row.host_queue_ms, None, "{row:?}");
    }
    // One PNG per distinct prompt, of the requested size.
    for name in ["bs1_0.png", "bs3_0.png", "bs3_1.png"] {
        assert_eq!(pixels(&images.join(name)).dimensions(), (64, 64), "{name}");
    }
    assert!(!images.join("bs1_1.png").exists() && !images.join("bs3_2.png").exists());
}

#[test]
fn init_latents_fix_the_image_whatever_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let lat = dir.path().join("lat.safetensors");
    let noise =
        turbine::model::noise::batch_noise(&[7, 8], 0, (4, 8, 8), &candle_core::Device::Cpu)
            .unwrap();
    candle_core::safetensors::save(&[("latents", noise)].into_iter().collect(), &lat).unwrap();
    let run = |seed: &str, images: &Path| {
        let o = bench(&[
            "--model-dir",
            tiny().to_str().unwrap(),
            "--size",
            "64x64",
            "--batch-sizes",
            "1,2",
            "--warmup",
            "0",
            "--runs",
            "1",
            "--prompt",
            "a red cube",
            "--init-latents",
            lat.to_str().unwrap(),
            "--seed",
            seed,
            "--save-images",
            images.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run("1", &a);
    run("999", &b);
    // With the initial latents given, the seed no longer matters (one step adds no noise).
    assert_eq!(pixels(&a.join("bs2_0.png")), pixels(&b.join("bs2_0.png")));
    // Row 0 of the latents alone and inside a batch of two: the same image (within one 8-bit
    // step, for batched-kernel rounding).
    let (x, y) = (pixels(&a.join("bs1_0.png")), pixels(&a.join("bs2_0.png")));
    let worst = x
        .as_raw()
        .iter()
        .zip(y.as_raw())
        .map(|(p, q)| p.abs_diff(*q))
        .max()
        .unwrap();
    assert!(worst <= 1, "batch changed image 0 by {worst}");
    // The two latent rows give two different images.
    assert_ne!(pixels(&a.join("bs2_0.png")), pixels(&a.join("bs2_1.png")));
}

#[test]
fn random_weights_from_configs() {
    let o = bench(&[
        "--random-weights",
        "--model-dir",
        tiny().to_str().unwrap(),
        "--size",
        "64x64",
        "--batch-sizes",
        "2",
        "--warmup",
        "0",
        "--runs",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("random weights from"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("| 2 | 1 |")),
        "{stdout}"
    );
}

#[test]
fn usage_errors_exit_2_and_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let bad_lat = dir.path().join("lat.safetensors");
    let t = candle_core::Tensor::zeros(
        (1, 4, 3, 3),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(&[("latents", t)].into_iter().collect(), &bad_lat).unwrap();
    let model = tiny();
    let m = model.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--model-dir", m, "--batch-sizes", "1,0"],
            "--batch-sizes",
        ),
        (vec!["--model-dir", m, "--runs", "0"], "--runs"),
        (vec!["--model-dir", m, "--size", "65x64"], "--size"),
        (vec!["--model-dir", m, "--min-time=-1"], "--min-time"),
        (vec!["--model-dir", m, "--dtype", "f8"], "dtype"),
        (
            vec![
                "--model-dir",
                m,
                "--size",
                "64x64",
                "--init-latents",
                bad_lat.to_str().unwrap(),
            ],
            "--init-latents",
        ),
        (
            vec!["--model-dir", m, "--random-weights=maybe"],
            "--random-weights",
        ),
    ] {
        let o = bench(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{args:?} should name {needle}: {}",
            text(&o)
        );
    }
}

/// `--ablate`: one row per kernel set (none, all, each lever alone, all but each lever), every
/// set's images compared with those of `none`. On the CPU in f32 the levers that apply here
/// (fused GroupNorm, GEGLU, attention, convolution, 8-bit postprocess) compute the same
/// functions as candle's ops, so the pictures may differ by rounding only.
#[test]
fn ablation_measures_every_kernel_set_and_compares_pictures() {
    let (o, report) = one_quick_batch(&["--ablate", "2"]);
    assert_eq!(report.kernels, "all");
    let names: Vec<&str> = report.ablation.iter().map(|r| r.kernels.as_str()).collect();
    let levers = Kernels::NAMED.len();
    let independent = Kernels::NAMED
        .iter()
        .filter(|(_, k)| k.prerequisites() == Kernels::NONE)
        .count();
    assert_eq!(names.len(), 2 + levers + independent, "{names:?}");
    let roles: Vec<(&str, Option<&str>)> = report
        .ablation
        .iter()
        .map(|r| (r.role.as_str(), r.lever.as_deref()))
        .collect();
    assert_eq!(
        &roles[..3],
        [
            ("none", None),
            ("all", None),
            ("without", Some("group-norm"))
        ]
    );
    let all_but_group_norm = Kernels::ALL.without(Kernels::GROUP_NORM).to_string();
    assert!(all_but_group_norm.starts_with("geglu,attention,conv,channels-last,"));
    assert_eq!(&names[..3], ["none", "all", all_but_group_norm.as_str()]);
    assert_eq!(roles[2 + levers], ("alone", Some("group-norm")));
    assert_eq!(names[2 + levers], "group-norm");
    for r in &report.ablation {
        assert_eq!(r.row.batch, 2);
        assert!(r.row.images_per_s > 0.0, "{r:?}");
        assert!(
            r.max_diff_vs_none.is_some_and(|m| m <= 2)
                && r.mean_diff_vs_none.is_some_and(|m| m < 0.05),
            "kernels {} changed the pictures: max {:?} mean {:?}",
            r.kernels,
            r.max_diff_vs_none,
            r.mean_diff_vs_none
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| set | kernels | batch | images/s | vs none |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| all but group-norm | geglu,attention,"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| none | 2 |") && stdout.contains("1.00x"),
        "{stdout}"
    );
}

#[test]
fn bad_kernels_and_ablate_values_are_usage_errors() {
    let model = tiny();
    for args in [
        &["--kernels", "group-norm,warp-drive"][..],
        &["--kernels", ""][..],
        &["--ablate", "0"][..],
    ] {
        let mut all = vec!["--model-dir", model.to_str().unwrap()];
        all.extend_from_slice(args);
        let o = bench(&all);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("kernel") || err.contains("--ablate"),
            "{args:?}: {err}"
        );
    }
}

/// `--profile`: one recorded batch under `--kernels` and one under `none`, its device time by
/// stage and kind of layer; every model layer kind shows up where it runs, the spans fit in
/// their stage, and the table is printed.
#[test]
fn profile_splits_each_stage_by_kind_of_layer() {
    let (o, report) = one_quick_batch(&["--profile", "2"]);
    let sets: Vec<&str> = report.profiles.iter().map(|p| p.kernels.as_str()).collect();
    assert_eq!(sets, ["all", "none"]);
    for p in &report.profiles {
        assert_eq!(p.batch, 2);
        let kinds = |stage: &str| -> Vec<&str> {
            p.entries
                .iter()
                .filter(|e| e.stage == stage)
                .map(|e| e.kind.as_str())
                .collect()
        };
        assert_eq!(
            kinds("text_encode"),
            ["attention", "layer-norm", "linear"],
            "{p:?}"
        );
        assert_eq!(
            kinds("unet"),
            [
                "attention",
                "conv",
                "geglu",
                "group-norm",
                "layer-norm",
                "linear",
                "upsample"
            ],
            "{p:?}"
        );
        assert_eq!(
            kinds("vae_decode"),
            ["attention", "conv", "group-norm", "linear", "upsample"],
            "{p:?}"
        );
        for (stage, total) in [
            ("text_encode", p.text_encode_ms),
            ("unet", p.unet_ms),
            ("vae_decode", p.vae_decode_ms),
        ] {
            let inside: f64 = p
                .entries
                .iter()
                .filter(|e| e.stage == stage)
                .map(|e| e.ms)
                .sum();
            assert!(
                inside > 0.0 && inside <= total * 1.001 + 0.01,
                "{stage}: spans {inside} ms of a {total} ms stage"
            );
            assert!(p.entries.iter().all(|e| e.calls > 0 && e.ms >= 0.0));
        }
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(
            "| stage | kind | ms/image (all) | ms/image (none) | share of stage | calls |"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("| unet | other |"), "{stdout}");
}

/// `--edit-strength`: the sweep measures edits (the report says so), whose images are the
/// library's edits of the bench's synthetic input, and differ from the generation's.
#[test]
fn edits_are_benched_with_edit_strength() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let images = dir.path().join(name);
        let mut args = vec!["--save-images", images.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (o, report) = one_quick_batch(&args);
        (o, report, pixels(&images.join("bs1_0.png")))
    };
    let (o, report, edited) = run("edit", &["--edit-strength", "0.5"]);
    assert_eq!(report.edit_strength, Some(0.5));
    assert_eq!(report.rows.len(), 1);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("of edits at strength 0.5"), "{}", text(&o));
    let (_, report, generated) = run("generate", &[]);
    assert_eq!(report.edit_strength, None);
    assert!(edited != generated, "--edit-strength changed nothing");
    let (_, _, again) = run("again", &["--edit-strength", "0.5"]);
    assert!(again == edited, "a seeded edit bench is reproducible");

    let o = bench(&[
        "--model-dir",
        tiny().to_str().unwrap(),
        "--size",
        "64x64",
        "--edit-strength",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--edit-strength"), "{}", text(&o));
}
