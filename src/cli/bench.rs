//! `turbine bench`: end-to-end images/s and per-stage milliseconds over a sweep of batch sizes.
//!
//! Each batch size gets `--warmup` untimed runs first (allocator growth, cuBLAS/cuDNN algorithm
//! choice and page faults land there), then at least `--runs` timed runs, and more until
//! `--min-time` seconds of timed runs have passed. A run is one `Pipeline::generate` call: text
//! encoders, UNet steps, VAE decode and the conversion to 8-bit images, timed on the host from
//! the call to the images in memory; the per-stage times are the GPU's own (events on the
//! stream, no synchronisation between stages) on CUDA, wall time on the CPU. Medians are reported, so one
//! disturbed run does not move the figure.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ops::Kernels;

use crate::cli::generate::{load_init_latents, parse_size};
use crate::cli::UsageError;
use crate::device::{parse_device, parse_dtype};
use crate::hub::ModelArgs;
use crate::model::pipeline::{GenerationSettings, ImageRequest, NoiseOverride, Partials};
use crate::model::profile::{self, ProfileEntry};

/// Prompts cycled over a batch when none are given: varied lengths, so tokenisation and the
/// text encoders see realistic padding (SDXL always pads to 77 tokens, so the cost is equal).
pub const DEFAULT_PROMPTS: [&str; 4] = [
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolour painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting, 35mm",
    "an isometric pixel-art city at night",
];

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image size as WIDTHxHEIGHT; both multiples of 8.
    #[arg(long, default_value = "512x512")]
    pub size: String,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 1)]
    pub steps: usize,
    /// Classifier-free guidance scale; above 1 the UNet runs on twice the batch.
    #[arg(long, default_value_t = 0.0)]
    pub guidance: f64,
    /// Measure edits (POST /v1/images/edits) instead of generations: every image edits a
    /// synthetic input image of --size at this strength, --steps steps run (the edit endpoint's
    /// default is 1 step at 0.5). The VAE encoder's time is in the `unet` column.
    #[arg(long)]
    pub edit_strength: Option<f64>,
    /// Previews per image, as a stream's `partial_images` asks for them (0-3 in the API; any
    /// count here): each image is decoded after that many of the steps before its last and
    /// handed out as an 8-bit image, as the server does before it encodes the preview. Their
    /// decodes are timed in the `unet` column. With --preview-vae taesdxl TAESD decodes them.
    #[arg(long, default_value_t = 0)]
    pub partial_images: usize,
    /// f32, f16 or bf16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub kernels: crate::cli::KernelArgs,
    /// Batch sizes to measure, in order, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub batch_sizes: Vec<usize>,
    /// Untimed runs before the timed ones, per batch size.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs per batch size (at least).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Keep adding timed runs until they add up to this many seconds (at most 1000 runs).
    #[arg(long, default_value_t = 0.0)]
    pub min_time: f64,
    /// A prompt; repeat for several. Cycled over each batch (default: four built-in prompts),
    /// and from the second round on each gets `, variation K`: every image of a batch has its
    /// own prompt, so the text encoders run the whole batch (the pipeline encodes a repeated
    /// prompt once) and a comparison with diffusers compares the same work.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A safetensors file with one tensor `latents` `[n, 4, h/8, w/8]` (unscaled standard
    /// normal) to start every batch from; rows are cycled over a batch. Lets another
    /// implementation start from exactly the same noise.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Write the images of the last timed run of each batch size here as PNGs
    /// (`bs{B}_{i}.png`, one per distinct prompt/latent row).
    #[arg(long)]
    pub save_images: Option<PathBuf>,
    /// Also write the results as JSON (with machine, device, dtype and commit) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the first image's noise (image i gets seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// After the sweep, measure this batch size once per kernel set — `none` (candle's ops),
    /// the --kernels set, the set without each of its levers, then each lever alone (except
    /// those that take effect only with another); one warm-up and --runs timed runs each — and
    /// compare every set's images with those of `none`: what each lever gains, and that it
    /// does not change the pictures. A set that fails is listed and the others still run.
    #[arg(long)]
    pub ablate: Option<usize>,
    /// After the sweep, record where one batch of this size spends its device time, by stage
    /// and kind of layer (linear, conv, group-norm, layer-norm, attention, geglu, upsample,
    /// other), under --kernels and under candle's ops (`none`). Pick a batch big enough that
    /// the GPU, not the host, is the bottleneck: the timing marks cost the host ~3 us each.
    #[arg(long)]
    pub profile: Option<usize>,
}

/// One timed `generate` call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSample {
    pub total: Duration,
    pub text_encode: Duration,
    pub unet: Duration,
    pub vae_decode: Duration,
}

/// The figures of one batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub batch: usize,
    pub runs: usize,
    /// Median wall time of one batch, seconds.
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub images_per_s: f64,
    pub ms_per_image: f64,
    /// Median time from handing a batch to the pipeline to its images on the host, with no
    /// other batch in flight, seconds. Without the OVERLAP lever each timed run is such a run
    /// and this is `median_s`; with it the timed runs overlap (the next batch is queued before
    /// this one's images are collected), `median_s` is the interval between batches and this
    /// is measured by separate runs.
    #[serde(default)]
    pub latency_s: Option<f64>,
    /// With the OVERLAP lever, the median host time to queue one batch behind the one still
    /// running (`Pipeline::launch` returns without waiting for the GPU), milliseconds. Well
    /// below `median_s`, the GPU sets the pace. Near it, either the host does (launch overhead,
    /// the case for CUDA graphs) or the GPU is so far behind that the driver's queue of pending
    /// launches filled and held the host: only the profile tells which.
    #[serde(default)]
    pub host_queue_ms: Option<f64>,
    /// Medians of the stages, milliseconds per batch.
    pub text_encode_ms: f64,
    pub unet_ms: f64,
    pub vae_decode_ms: f64,
    /// Every timed run, seconds.
    pub seconds: Vec<f64>,
    /// Wall-clock window of the warm-up and timed runs, so an outside sampler (GPU memory in
    /// scripts/gpu_check.sh) can attribute its samples to a batch size.
    pub started_unix_s: f64,
    pub finished_unix_s: f64,
    /// Wall-clock window of the timed runs alone (no warm-up, no batch-alone latency runs):
    /// where an outside sampler reads how busy the GPU was while batches ran back to back.
    #[serde(default)]
    pub timed_started_unix_s: f64,
    #[serde(default)]
    pub timed_finished_unix_s: f64,
    /// Peak resident memory of the process during this batch size (Linux; the peak is reset
    /// before each batch size where the kernel allows it).
    pub peak_rss_bytes: Option<u64>,
}

/// One kernel set of `--ablate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationRow {
    /// The set, as `--kernels` would take it.
    pub kernels: String,
    /// What the set is ([`AblationSet::role`]): `none`, `all` (the run's `--kernels`),
    /// `without` (that set less `lever`) or `alone` (`lever` by itself).
    #[serde(default)]
    pub role: String,
    /// The lever a `without` or `alone` set is about.
    #[serde(default)]
    pub lever: Option<String>,
    pub row: Row,
    /// 8-bit difference of this set's images from those of `none`, all images of the batch
    /// (absent when `none` itself failed: there is nothing to compare with).
    pub max_diff_vs_none: Option<u8>,
    pub mean_diff_vs_none: Option<f64>,
}

/// A batch size of the sweep or a kernel set of the ablation that failed. The others are still
/// measured: a GPU run is one try, and an out-of-memory batch size or one broken kernel must not
/// cost the remaining figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// `sweep` or `ablation`.
    pub stage: String,
    pub batch: usize,
    /// The kernel set it ran with, as `--kernels` would take it.
    pub kernels: String,
    /// The error with its causes.
    pub error: String,
}

/// Where and on what the benchmark ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub host: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_bytes: Option<u64>,
    pub os: String,
}

/// The whole `--json` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub commit: String,
    pub date_utc: String,
    pub machine: Machine,
    pub device: String,
    pub dtype: String,
    /// `--kernels` as given (`all`, `none` or the list of levers on).
    #[serde(default)]
    pub kernels: String,
    pub threads: usize,
    pub model: String,
    pub size: String,
    pub steps: usize,
    pub guidance: f64,
    /// `--edit-strength`: the rows are edits at this strength (`steps` run), not generations.
    #[serde(default)]
    pub edit_strength: Option<f64>,
    /// `--partial-images`: previews decoded per image (their decodes are in `unet_ms`).
    #[serde(default)]
    pub partial_images: usize,
    pub warmup: usize,
    pub load_s: f64,
    pub rows: Vec<Row>,
    /// `--ablate`'s rows (empty without it).
    #[serde(default)]
    pub ablation: Vec<AblationRow>,
    /// `--profile`'s runs (empty without it).
    #[serde(default)]
    pub profiles: Vec<ProfileRun>,
    /// What failed, in the order it ran (the exit status is non-zero when this is not empty).
    #[serde(default)]
    pub failures: Vec<Failure>,
    /// The cuDNN convolution plans the run built, one line per (shape, kernel set) as
    /// `ops::conv_plans` gives them: the legacy algorithm or graph-API engine each shape runs
    /// and the timings it was chosen by. Empty without the `cudnn` feature.
    #[serde(default)]
    pub conv_plans: Vec<String>,
}

/// One line on the cuDNN plans of a run: how many shapes run a graph-API engine, a legacy
/// algorithm, or candle's ops, and how many graph plans failed after they were chosen. `None`
/// when no plan was built (the CPU, or a build without `cudnn`).
pub fn summarize_conv_plans(plans: &[String]) -> Option<String> {
    if plans.is_empty() {
        return None;
    }
    use crate::ops::{CONV_FALLBACK, CONV_FIRST_CALL_FAILED, CONV_GRAPH_FAILED_LATER};
    let count = |lines: &[&String], mark: &str| lines.iter().filter(|p| p.contains(mark)).count();
    let all: Vec<&String> = plans.iter().collect();
    // Lines about a plan already counted: a graph plan that failed later, or a plan whose
    // first call failed (candle's ops since).
    let failed = count(&all, CONV_GRAPH_FAILED_LATER);
    let first_failed = count(&all, CONV_FIRST_CALL_FAILED);
    let built: Vec<&String> = plans
        .iter()
        .filter(|p| !crate::ops::is_conv_plan_followup(p))
        .collect();
    let graph = count(&built, ": Graph engine");
    let fallback = count(&built, CONV_FALLBACK);
    let weighed = count(&built, " graph=true");
    Some(format!(
        "cuDNN convolution plans: {} built; {graph} run a graph-API engine, {} a legacy \
         algorithm, {fallback} candle's ops; graph engines weighed for {weighed}{}{}",
        built.len(),
        built.len() - graph - fallback,
        if failed > 0 {
            format!("; {failed} graph plan(s) failed after being chosen")
        } else {
            String::new()
        },
        if first_failed > 0 {
            format!("; {first_failed} plan(s) failed at their first call (candle's ops since)")
        } else {
            String::new()
        }
    ))
}

/// One batch of `--profile`: its stages' device times and where they went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileRun {
    pub kernels: String,
    pub batch: usize,
    pub text_encode_ms: f64,
    pub unet_ms: f64,
    pub vae_decode_ms: f64,
    /// Time inside the spans of each (stage, kind); a stage's remainder is its `other`.
    pub entries: Vec<ProfileEntry>,
}

impl ProfileRun {
    fn stage_ms(&self, stage: &str) -> f64 {
        match stage {
            "text_encode" => self.text_encode_ms,
            "unet" => self.unet_ms,
            "vae_decode" => self.vae_decode_ms,
            _ => 0.0,
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn median_of(samples: &[RunSample], f: impl Fn(&RunSample) -> Duration) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|s| f(s).as_secs_f64()).collect();
    v.sort_by(f64::total_cmp);
    median(&v)
}

/// Reduces the timed runs of one batch size to its row; `None` without runs.
pub fn summarize(batch: usize, samples: &[RunSample]) -> Option<Row> {
    if samples.is_empty() || batch == 0 {
        return None;
    }
    let seconds: Vec<f64> = samples.iter().map(|s| s.total.as_secs_f64()).collect();
    let med = median_of(samples, |s| s.total);
    Some(Row {
        batch,
        runs: samples.len(),
        median_s: med,
        min_s: seconds.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: seconds.iter().copied().fold(0.0, f64::max),
        images_per_s: batch as f64 / med,
        ms_per_image: med * 1e3 / batch as f64,
        latency_s: Some(med),
        host_queue_ms: None,
        text_encode_ms: median_of(samples, |s| s.text_encode) * 1e3,
        unet_ms: median_of(samples, |s| s.unet) * 1e3,
        vae_decode_ms: median_of(samples, |s| s.vae_decode) * 1e3,
        seconds,
        started_unix_s: 0.0,
        finished_unix_s: 0.0,
        timed_started_unix_s: 0.0,
        timed_finished_unix_s: 0.0,
        peak_rss_bytes: None,
    })
}

/// The table printed to stdout.
pub fn render_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| batch | runs | ms/batch | ms/image | images/s | text enc ms | unet ms | vae ms | peak RSS GB | latency ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let rss = r
            .peak_rss_bytes
            .map(|b| format!("{:.2}", b as f64 / 1e9))
            .unwrap_or_else(|| "-".into());
        let latency = r
            .latency_s
            .map(|l| format!("{:.1}", l * 1e3))
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
            r.batch,
            r.runs,
            r.median_s * 1e3,
            r.ms_per_image,
            r.images_per_s,
            r.text_encode_ms,
            r.unet_ms,
            r.vae_decode_ms,
            rss,
            latency
        ));
    }
    s
}

/// One kernel set of `--ablate` and what it measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AblationSet {
    pub kernels: Kernels,
    /// `none`, `all`, `without` or `alone` (see [`AblationRow::role`]).
    pub role: &'static str,
    pub lever: Option<&'static str>,
}

/// `--ablate`'s kernel sets within `within` (the `--kernels` of the run): the baseline first
/// (the others' images are compared with it), then `within`, `within` without each of its
/// levers (what each lever is worth among the others: the figures the tuned run of
/// scripts/gpu_check.sh acts on, so they come before the rest, should time run out), then each
/// lever alone, except those that take effect only with another lever
/// ([`Kernels::prerequisites`]: alone they would time `none` again); no set twice. A lever left
/// out of `--kernels` (say its kernel test failed on this GPU) is left out of the ablation too,
/// so it cannot take the other sets' figures down with it.
pub fn ablation_sets(within: Kernels) -> Vec<AblationSet> {
    let levers: Vec<(&'static str, Kernels)> = Kernels::NAMED
        .iter()
        .copied()
        .filter(|(_, k)| within.contains(*k))
        .collect();
    let set = |kernels, role, lever| AblationSet {
        kernels,
        role,
        lever,
    };
    let mut sets = vec![set(Kernels::NONE, "none", None), set(within, "all", None)];
    sets.extend(
        levers
            .iter()
            .map(|&(name, k)| set(within.without(k), "without", Some(name))),
    );
    sets.extend(
        levers
            .iter()
            .filter(|(_, k)| k.prerequisites() == Kernels::NONE)
            .map(|&(name, k)| set(k, "alone", Some(name))),
    );
    let mut seen = Vec::with_capacity(sets.len());
    sets.retain(|s| {
        let new = !seen.contains(&s.kernels);
        seen.push(s.kernels);
        new
    });
    sets
}

/// Max and mean absolute 8-bit difference over all bytes of two equally long image lists (255
/// when the lists or sizes differ: nothing to compare is a failure, not a match).
pub fn image_diff(a: &[image::RgbImage], b: &[image::RgbImage]) -> (u8, f64) {
    if a.len() != b.len()
        || a.iter()
            .zip(b)
            .any(|(x, y)| x.dimensions() != y.dimensions())
    {
        return (255, 255.0);
    }
    let (mut max, mut sum, mut n) = (0u8, 0u64, 0u64);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.as_raw().iter().zip(y.as_raw()) {
            let d = p.abs_diff(*q);
            max = max.max(d);
            sum += u64::from(d);
            n += 1;
        }
    }
    (max, if n == 0 { 0.0 } else { sum as f64 / n as f64 })
}

/// The ablation as a markdown table, with each set's speed relative to `none`.
pub fn render_ablation(rows: &[AblationRow]) -> String {
    let base = rows
        .iter()
        .find(|r| r.kernels == "none")
        .map(|r| r.row.images_per_s);
    let mut s = String::from(
        "| set | kernels | batch | images/s | vs none | text enc ms | unet ms | vae ms | max diff vs none | mean diff vs none |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let set = match (r.role.as_str(), &r.lever) {
            ("without", Some(l)) => format!("all but {l}"),
            ("alone", Some(l)) => format!("{l} alone"),
            ("", _) => "-".to_string(),
            (role, _) => role.to_string(),
        };
        let rel = base
            .filter(|b| *b > 0.0)
            .map(|b| format!("{:.2}x", r.row.images_per_s / b))
            .unwrap_or_else(|| "-".into());
        let max = r.max_diff_vs_none.map_or("-".into(), |m| m.to_string());
        let mean = r
            .mean_diff_vs_none
            .map_or("-".into(), |m| format!("{m:.3}"));
        s.push_str(&format!(
            "| {set} | {} | {} | {:.2} | {} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
            r.kernels,
            r.row.batch,
            r.row.images_per_s,
            rel,
            r.row.text_encode_ms,
            r.row.unet_ms,
            r.row.vae_decode_ms,
            max,
            mean
        ));
    }
    s
}

/// `--profile`'s runs as one markdown table: per stage and kind, milliseconds per image under
/// each kernel set, and the share of the stage (the first set's).
pub fn render_profiles(runs: &[ProfileRun]) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for stage in ["text_encode", "unet", "vae_decode"] {
        let mut kinds: Vec<String> = runs
            .iter()
            .flat_map(|r| r.entries.iter())
            .filter(|e| e.stage == stage)
            .map(|e| e.kind.clone())
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds.push("other".into());
        rows.extend(kinds.into_iter().map(|k| (stage.to_string(), k)));
    }
    let ms = |r: &ProfileRun, stage: &str, kind: &str| -> f64 {
        let inside = |k: Option<&str>| -> f64 {
            r.entries
                .iter()
                .filter(|e| e.stage == stage && k.is_none_or(|k| e.kind == k))
                .map(|e| e.ms)
                .sum()
        };
        if kind == "other" {
            (r.stage_ms(stage) - inside(None)).max(0.0)
        } else {
            inside(Some(kind))
        }
    };
    let mut s = String::from("| stage | kind |");
    for r in runs {
        s.push_str(&format!(" ms/image ({}) |", r.kernels));
    }
    s.push_str(" share of stage | calls |\n|---|---|");
    s.push_str(&"---:|".repeat(runs.len() + 2));
    s.push('\n');
    for (stage, kind) in rows {
        s.push_str(&format!("| {stage} | {kind} |"));
        for r in runs {
            s.push_str(&format!(
                " {:.3} |",
                ms(r, &stage, &kind) / r.batch.max(1) as f64
            ));
        }
        let total = first.stage_ms(&stage);
        let share = if total > 0.0 {
            format!("{:.0}%", 100.0 * ms(first, &stage, &kind) / total)
        } else {
            "-".into()
        };
        let calls = first
            .entries
            .iter()
            .find(|e| e.stage == stage && e.kind == kind)
            .map_or("-".into(), |e| e.calls.to_string());
        s.push_str(&format!(" {share} | {calls} |\n"));
    }
    s
}

/// The failures as a markdown list, one line each.
pub fn render_failures(failures: &[Failure]) -> String {
    failures
        .iter()
        .map(|f| {
            format!(
                "- {} batch {} with --kernels {}: {}\n",
                f.stage, f.batch, f.kernels, f.error
            )
        })
        .collect()
}

/// `f`, with a panic (a CUDA library missing a symbol, say) turned into an error: it fails its
/// figure, not the whole run.
fn caught<R>(f: impl FnOnce() -> anyhow::Result<R>) -> anyhow::Result<R> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(anyhow::anyhow!(
            "panicked: {}",
            crate::server::worker::panic_message(&p)
        ))
    })
}

/// What the failure recorded when the device cannot be used after another failure says (a
/// CUDA fault poisons the context for the rest of the process).
pub const DEVICE_UNUSABLE: &str = "the device is unusable";

/// How one batch size is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Timing {
    warmup: usize,
    /// Timed runs, at least.
    runs: usize,
    /// Timed seconds, at least.
    min_time: f64,
    /// With the overlap lever, also a batch alone `runs` times (its latency): the sweep's rows
    /// report it, the ablation's do not need it.
    latency: bool,
}

/// What [`measure_all`] measures: the sweep's batch sizes, the batch sizes of `--profile` and
/// `--ablate`, and how.
struct Plan<'a> {
    batches: &'a [usize],
    profile: Option<usize>,
    ablate: Option<usize>,
    timing: Timing,
}

/// One `generate` measurement: (batch size, whether it is the first of the process, how) to the
/// row and the last run's images.
type Measure<'a> =
    dyn FnMut(usize, bool, Timing) -> anyhow::Result<(Row, Vec<image::RgbImage>)> + 'a;

/// Everything `run` measures after loading: the sweep over `batches`, then (with `ablate`) one
/// batch size under every kernel set. A failure is recorded in `report.failures` and the next
/// figure is measured anyway, unless `healthy` (a device synchronise) then fails too: a CUDA
/// fault poisons the context, every later call would fail at once, so the rest is recorded as
/// not measured, with the reason. `save` gets the report after every figure, so a run stopped
/// from outside (scripts/gpu_check.sh bounds the whole bench) keeps what it measured.
#[allow(clippy::too_many_arguments)]
fn measure_all(
    report: &mut Report,
    plan: &Plan<'_>,
    measure: &mut Measure<'_>,
    profile: &mut dyn FnMut(usize) -> anyhow::Result<ProfileRun>,
    keep_images: &mut dyn FnMut(usize, &[image::RgbImage]) -> anyhow::Result<()>,
    save: &mut dyn FnMut(&Report) -> anyhow::Result<()>,
    healthy: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let timing = plan.timing;
    // Records a failure; false when the device is unusable after it (measuring stops).
    let mut failed =
        |report: &mut Report, stage: &str, batch: usize, kernels: Kernels, e: anyhow::Error| {
            let kernels = kernels.to_string();
            tracing::error!(stage, batch, %kernels, "measurement failed: {e:#}");
            report.failures.push(Failure {
                stage: stage.into(),
                batch,
                kernels: kernels.clone(),
                error: format!("{e:#}"),
            });
            match healthy() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("the device is unusable, nothing more is measured: {e:#}");
                    report.failures.push(Failure {
                        stage: "device".into(),
                        batch,
                        kernels,
                        error: format!(
                            "{DEVICE_UNUSABLE} after this set's failure, nothing more was \
                             measured: {e:#}"
                        ),
                    });
                    false
                }
            }
        };
    let mut guarded = |b: usize, first: bool, t: Timing| caught(|| measure(b, first, t));
    for &b in plan.batches {
        match guarded(b, report.rows.is_empty(), timing) {
            Ok((row, images)) => {
                keep_images(b, &images)?;
                report.rows.push(row);
            }
            Err(e) => {
                if !failed(report, "sweep", b, crate::ops::kernels(), e) {
                    return save(report);
                }
            }
        }
        save(report)?;
    }
    if let Some(b) = plan.profile {
        let run_kernels = crate::ops::kernels();
        let mut sets = vec![run_kernels];
        if run_kernels != Kernels::NONE {
            sets.push(Kernels::NONE);
        }
        for set in sets {
            let result = crate::ops::with_kernels(set, || caught(|| profile(b)));
            match result {
                Ok(run) => report.profiles.push(run),
                Err(e) => {
                    if !failed(report, "profile", b, set, e) {
                        return save(report);
                    }
                }
            }
            save(report)?;
        }
    }
    let Some(b) = plan.ablate else {
        return Ok(());
    };
    let mut baseline: Option<Vec<image::RgbImage>> = None;
    for AblationSet {
        kernels: set,
        role,
        lever,
    } in ablation_sets(crate::ops::kernels())
    {
        // Lighter than the sweep (~20 sets): one warm-up (the first of a set builds its plans
        // and kernels), then the timed runs, no latency runs.
        let light = Timing {
            warmup: 1,
            min_time: 0.0,
            latency: false,
            ..timing
        };
        match crate::ops::with_kernels(set, || guarded(b, false, light)) {
            Ok((row, images)) => {
                let (max, mean) = if set == Kernels::NONE {
                    baseline = Some(images);
                    (Some(0), Some(0.0))
                } else if let Some(base) = &baseline {
                    let (max, mean) = image_diff(base, &images);
                    (Some(max), Some(mean))
                } else {
                    (None, None)
                };
                report.ablation.push(AblationRow {
                    kernels: set.to_string(),
                    role: role.to_string(),
                    lever: lever.map(str::to_string),
                    row,
                    max_diff_vs_none: max,
                    mean_diff_vs_none: mean,
                });
            }
            Err(e) => {
                if !failed(report, "ablation", b, set, e) {
                    return save(report);
                }
            }
        }
        save(report)?;
    }
    Ok(())
}

/// Requests of one batch, image i seeded `seed + i`: prompts cycled, each distinct (image i
/// gets `prompts[i % P]`, with `, variation K` appended from the second round on, K = i / P).
/// `scripts/bench/diffusers_ref.py` names its batches' prompts by the same rule.
pub fn batch_items(prompts: &[String], batch: usize, seed: u64) -> Vec<ImageRequest> {
    (0..batch)
        .map(|i| ImageRequest {
            prompt: match i / prompts.len() {
                0 => prompts[i].clone(),
                k => format!("{}, variation {k}", prompts[i % prompts.len()]),
            },
            negative_prompt: String::new(),
            seed: seed.wrapping_add(i as u64),
            init_image: None,
            partials: None,
        })
        .collect()
}

/// `batch` rows of `latents` `[n, ...]`, cycling through its rows.
pub fn cycle_rows(latents: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
    let n = latents.dim(0)?;
    let idx: Vec<u32> = (0..batch).map(|i| (i % n) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), latents.device())?;
    latents.index_select(&idx, 0)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for a unix time (civil-from-days, proleptic Gregorian).
pub fn utc_date(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The commit this binary measures: `TURBINE_COMMIT` at run time (set by scripts that run a
/// binary away from its checkout), else `TURBINE_GIT_COMMIT` at build time, else
/// `git rev-parse` in the current directory, else "unknown".
pub fn commit() -> String {
    if let Ok(c) = std::env::var("TURBINE_COMMIT") {
        if !c.trim().is_empty() {
            return c.trim().to_string();
        }
    }
    if let Some(c) = option_env!("TURBINE_GIT_COMMIT") {
        return c.to_string();
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) if !c.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        _ => "unknown".into(),
    }
}

fn read_proc_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

fn kib_field(path: &str, key: &str) -> Option<u64> {
    read_proc_field(path, key)?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

pub fn machine() -> Machine {
    let os_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Machine {
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        cpu: read_proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_bytes: kib_field("/proc/meminfo", "MemTotal:"),
        os: format!("{} {}", std::env::consts::OS, os_release)
            .trim()
            .to_string(),
    }
}

/// The model in words, from the flags (the pipeline has resolved the same flags).
fn describe_model(m: &ModelArgs) -> String {
    let dir = match &m.model_dir {
        Some(d) => d.display().to_string(),
        None => m.models_root.join(&m.model).display().to_string(),
    };
    let model = if m.random_weights {
        format!("random weights from the configs in {dir}")
    } else {
        dir
    };
    let mut model = match m.vae {
        Some(v) => format!("{model}, with --vae {}", v.key()),
        None => model,
    };
    if let Some(v) = m.preview_vae {
        model += &format!(", with --preview-vae {}", v.key());
    }
    model
}

/// The device in words: `cpu`, or `cuda:N (name)` from nvidia-smi when it is there.
fn describe_device(spec: &str, device: &Device) -> String {
    if !device.is_cuda() {
        return "cpu".into();
    }
    let ordinal = spec.rsplit_once(':').map(|(_, n)| n).unwrap_or("0");
    let name = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version",
            "--format=csv,noheader",
            "-i",
            ordinal,
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match name {
        Some(n) if !n.is_empty() => format!("cuda:{ordinal} ({n})"),
        _ => format!("cuda:{ordinal}"),
    }
}

/// Resets the process's peak-RSS counter (Linux >= 4.0: writing 5 to clear_refs); returns
/// whether it worked, so a peak read later belongs to this batch size alone.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss() -> Option<u64> {
    kib_field("/proc/self/status", "VmHWM:")
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.kernels.apply();
    let (width, height) = parse_size(&args.size)?;
    if args.batch_sizes.is_empty() || args.batch_sizes.contains(&0) {
        return Err(UsageError(format!(
            "--batch-sizes must be positive integers, got {:?}",
            args.batch_sizes
        ))
        .into());
    }
    if args.ablate == Some(0) {
        return Err(UsageError("--ablate must be a batch size of at least 1, got 0".into()).into());
    }
    if args.runs == 0 {
        return Err(UsageError("--runs must be at least 1, got 0".into()).into());
    }
    if !args.min_time.is_finite() || args.min_time < 0.0 {
        return Err(UsageError(format!(
            "--min-time must be a number of seconds >= 0, got {}",
            args.min_time
        ))
        .into());
    }
    if args.steps == 0 {
        return Err(UsageError("--steps must be at least 1, got 0".into()).into());
    }
    if !args.guidance.is_finite() || args.guidance < 0.0 {
        return Err(UsageError(format!(
            "--guidance must be a finite number >= 0, got {}",
            args.guidance
        ))
        .into());
    }
    let device = parse_device(&args.device).map_err(|e| UsageError(e.to_string()))?;
    let dtype =
        parse_dtype(args.dtype.as_deref(), &device).map_err(|e| UsageError(e.to_string()))?;
    let prompts: Vec<String> = if args.prompt.is_empty() {
        DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        args.prompt.clone()
    };
    let init_latents = match &args.init_latents {
        Some(p) => Some(load_init_latents(p, &device)?),
        None => None,
    };
    let (schedule_steps, init_step) = match args.edit_strength {
        Some(strength) => {
            let (n, start) = crate::model::pipeline::edit_schedule(args.steps, strength)
                .map_err(|e| UsageError(format!("--edit-strength: {}", e.0)))?;
            (n, Some(start))
        }
        None => (args.steps, None),
    };
    let settings = GenerationSettings {
        width,
        height,
        steps: schedule_steps,
        guidance_scale: args.guidance,
        init_step,
        adapter: None,
    };
    // Edits: one input image for every image, smooth gradients (a photo's statistics matter
    // little to the encoder's time).
    let edit_input = init_step.map(|_| {
        crate::model::pipeline::InitImage::new(image::RgbImage::from_fn(
            width as u32,
            height as u32,
            |x, y| {
                image::Rgb([
                    (x * 255 / width.max(1) as u32) as u8,
                    (y * 255 / height.max(1) as u32) as u8,
                    ((x + y) % 256) as u8,
                ])
            },
        ))
    });
    let items_for = |b: usize| -> Vec<ImageRequest> {
        let mut items = batch_items(&prompts, b, args.seed);
        for item in &mut items {
            item.init_image.clone_from(&edit_input);
            if args.partial_images > 0 {
                // The server's sink hands the image to an encoder thread; this one drops it.
                item.partials = Some(Partials::new(args.partial_images, |_, image| drop(image)));
            }
        }
        items
    };

    let started = Instant::now();
    let pipeline = crate::cli::load_pipeline(&args.model, &device, dtype)?;
    let model = describe_model(&args.model);
    device.synchronize()?;
    let load_s = started.elapsed().as_secs_f64();
    tracing::info!(load_s, dtype = dtype_name(dtype), "model loaded");
    pipeline
        .validate(&settings, 1)
        .map_err(|e| UsageError(e.to_string()))?;
    if let Some(l) = &init_latents {
        let (c, h, w) = pipeline.latent_shape(&settings);
        if l.rank() != 4 || l.dims()[1..] != [c, h, w] {
            return Err(UsageError(format!(
                "--init-latents must have shape [n, {c}, {h}, {w}] for --size {}, got {:?}",
                args.size,
                l.dims()
            ))
            .into());
        }
    }
    let distinct = prompts
        .len()
        .max(init_latents.as_ref().map_or(1, |l| l.dims()[0]));

    let noise_for = |b: usize| -> anyhow::Result<Option<NoiseOverride>> {
        Ok(match &init_latents {
            Some(l) => Some(NoiseOverride {
                init_latents: Some(cycle_rows(l, b)?),
                step_noise: None,
                image_noise: None,
            }),
            None => None,
        })
    };
    let mut measure = |b: usize,
                       first: bool,
                       Timing {
                           warmup,
                           runs,
                           min_time,
                           latency,
                       }: Timing|
     -> anyhow::Result<(Row, Vec<image::RgbImage>)> {
        let items = items_for(b);
        let noise = noise_for(b)?;
        let rss_reset = reset_peak_rss();
        let window_start = unix_now();
        for i in 0..warmup {
            let t = Instant::now();
            pipeline.generate(&settings, &items, noise.as_ref())?;
            tracing::info!(
                batch = b,
                run = i,
                secs = t.elapsed().as_secs_f64(),
                "warm-up"
            );
        }
        let mut samples = Vec::new();
        let mut timed = 0.0;
        let mut last = Vec::new();
        // The host's time to queue a batch behind the one still running (overlap only).
        let mut queue_s = Vec::new();
        let launch = || {
            pipeline
                .launch(&settings, &items, noise.as_ref())
                .with_context(|| format!("generating a batch of {b}"))
        };
        // Whether another run follows `done` runs that took `timed` seconds.
        let more = |done: usize, timed: f64| done < runs || (timed < min_time && done < 1000);
        // A run's time is from the previous run's images to its own: without overlap that is
        // one whole batch; with it (the OVERLAP lever, when the batch's copy back was only
        // queued: it also needs POSTPROCESS) the next batch is queued before this one's images
        // are collected, as the server's worker does under load, and it is the interval
        // between batches. The first overlapped batch has nothing queued ahead of it, so its
        // time is a whole batch's: it leads in and is not a sample.
        let timed_start = unix_now();
        let mut previous = Instant::now();
        let first_batch = launch()?;
        let overlap = first_batch.is_queued();
        let mut lead_in = overlap;
        let mut pending = Some(first_batch);
        while let Some(batch) = pending.take() {
            // (This run counts as done, unless it leads in: the next one is queued before it
            // is collected.)
            let done = samples.len() + usize::from(!lead_in);
            if overlap && more(done, timed + previous.elapsed().as_secs_f64()) {
                let t = Instant::now();
                pending = Some(launch()?);
                queue_s.push(t.elapsed().as_secs_f64());
            }
            let out = batch
                .wait()
                .with_context(|| format!("generating a batch of {b}"))?;
            let now = Instant::now();
            let total = now - previous;
            previous = now;
            if std::mem::take(&mut lead_in) {
                last = out.images;
                continue;
            }
            timed += total.as_secs_f64();
            samples.push(RunSample {
                total,
                text_encode: out.timings.text_encode,
                unet: out.timings.unet,
                vae_decode: out.timings.vae_decode,
            });
            last = out.images;
            if !overlap && more(samples.len(), timed) {
                previous = Instant::now();
                pending = Some(launch()?);
            }
        }
        let timed_end = unix_now();
        let mut row = summarize(b, &samples)
            .ok_or_else(|| anyhow::anyhow!("no timed runs for batch {b} (this is a bug)"))?;
        row.timed_started_unix_s = timed_start;
        row.timed_finished_unix_s = timed_end;
        if overlap && latency {
            let mut alone = Vec::with_capacity(runs);
            for _ in 0..runs {
                let t = Instant::now();
                launch()?.wait()?;
                alone.push(t.elapsed().as_secs_f64());
            }
            alone.sort_by(f64::total_cmp);
            row.latency_s = Some(median(&alone));
        }
        if !queue_s.is_empty() {
            queue_s.sort_by(f64::total_cmp);
            row.host_queue_ms = Some(median(&queue_s) * 1e3);
        }
        let window_end = unix_now();
        row.started_unix_s = window_start;
        row.finished_unix_s = window_end;
        row.peak_rss_bytes = if rss_reset || first { peak_rss() } else { None };
        tracing::info!(
            batch = b,
            kernels = %crate::ops::kernels(),
            images_per_s = row.images_per_s,
            ms_per_batch = row.median_s * 1e3,
            "measured"
        );
        Ok((row, last))
    };

    let mut report = Report {
        tool: "turbine bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        commit: commit(),
        date_utc: utc_date(unix_now() as u64),
        machine: machine(),
        device: describe_device(&args.device, &device),
        dtype: dtype_name(dtype).into(),
        kernels: args.kernels.kernels.to_string(),
        threads: candle_core::utils::get_num_threads(),
        model,
        size: format!("{width}x{height}"),
        steps: args.steps,
        guidance: args.guidance,
        edit_strength: args.edit_strength,
        partial_images: args.partial_images,
        warmup: args.warmup,
        load_s,
        rows: Vec::new(),
        ablation: Vec::new(),
        profiles: Vec::new(),
        failures: Vec::new(),
        conv_plans: Vec::new(),
    };
    let mut profile_run = |b: usize| -> anyhow::Result<ProfileRun> {
        let items = items_for(b);
        let noise = noise_for(b)?;
        // A warm-up first: the set's plans and kernels are built outside the recorded batch.
        pipeline.generate(&settings, &items, noise.as_ref())?;
        let (out, entries) = profile::record(&device, || {
            pipeline.generate(&settings, &items, noise.as_ref())
        })?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok(ProfileRun {
            kernels: crate::ops::kernels().to_string(),
            batch: b,
            text_encode_ms: ms(out.timings.text_encode),
            unet_ms: ms(out.timings.unet),
            vae_decode_ms: ms(out.timings.vae_decode),
            entries,
        })
    };
    let plan = Plan {
        batches: &args.batch_sizes,
        profile: args.profile,
        ablate: args.ablate,
        timing: Timing {
            warmup: args.warmup,
            runs: args.runs,
            min_time: args.min_time,
            latency: true,
        },
    };
    measure_all(
        &mut report,
        &plan,
        &mut measure,
        &mut profile_run,
        &mut |b, images| match &args.save_images {
            Some(dir) => save_images(dir, b, &images[..b.min(distinct).min(images.len())]),
            None => Ok(()),
        },
        &mut |report| match &args.json {
            Some(path) => {
                // The plans built so far go with every save: a run cut short keeps them too.
                let mut r = report.clone();
                r.conv_plans = crate::ops::conv_plans();
                write_json(path, &r)
            }
            None => Ok(()),
        },
        &mut || Ok(device.synchronize()?),
    )?;
    report.conv_plans = crate::ops::conv_plans();

    println!(
        "turbine bench: {} on {}, {}, {} {} step(s){}{}, guidance {}, kernels {}, commit {}, model {} (loaded in {:.1} s)",
        report.dtype,
        report.device,
        report.machine.cpu,
        report.size,
        report.steps,
        report
            .edit_strength
            .map_or(String::new(), |s| format!(" of edits at strength {s}")),
        match report.partial_images {
            0 => String::new(),
            n => format!(" with {n} preview(s) per image"),
        },
        report.guidance,
        report.kernels,
        report.commit,
        report.model,
        report.load_s
    );
    print!("{}", render_table(&report.rows));
    if !report.ablation.is_empty() {
        print!("\n{}", render_ablation(&report.ablation));
    }
    if !report.profiles.is_empty() {
        print!("\n{}", render_profiles(&report.profiles));
    }
    if let Some(line) = summarize_conv_plans(&report.conv_plans) {
        println!("\n{line}");
    }
    if !report.failures.is_empty() {
        print!("\nfailed:\n{}", render_failures(&report.failures));
        anyhow::bail!(
            "{} of the measurements failed (listed above; the others are in the table{})",
            report.failures.len(),
            if args.json.is_some() {
                " and --json"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn write_json(path: &Path, report: &Report) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let text = serde_json::to_string_pretty(report)?;
    // Written beside it and renamed over it: the bench is saved after every figure and may be
    // killed at any moment (scripts/gpu_check.sh bounds it), which must never leave half a file.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing --json {}", path.display()))
}

fn save_images(dir: &Path, batch: usize, images: &[image::RgbImage]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, img) in images.iter().enumerate() {
        let path = dir.join(format!("bs{batch}_{i}.png"));
        img.save_with_format(&path, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        warmup: 1,
        runs: 1,
        min_time: 0.0,
        latency: true,
    };

    fn sample(total_ms: u64) -> RunSample {
        RunSample {
            total: Duration::from_millis(total_ms),
            text_encode: Duration::from_millis(total_ms / 10),
            unet: Duration::from_millis(total_ms / 2),
            vae_decode: Duration::from_millis(total_ms / 4),
        }
    }

    #[test]
    fn summary_takes_medians_and_rates() {
        let r = summarize(4, &[sample(300), sample(100), sample(200)]).unwrap();
        assert_eq!(r.runs, 3);
        assert!((r.median_s - 0.2).abs() < 1e-12);
        assert!((r.min_s - 0.1).abs() < 1e-12 && (r.max_s - 0.3).abs() < 1e-12);
        assert!((r.images_per_s - 20.0).abs() < 1e-9);
        assert!((r.ms_per_image - 50.0).abs() < 1e-9);
        assert!((r.unet_ms - 100.0).abs() < 1e-9);
        assert_eq!(r.seconds, vec![0.3, 0.1, 0.2]);
        // An even count averages the middle two.
        let r = summarize(1, &[sample(100), sample(400), sample(200), sample(300)]).unwrap();
        assert!((r.median_s - 0.25).abs() < 1e-12);
        assert!(summarize(1, &[]).is_none());
        assert!(summarize(0, &[sample(1)]).is_none());
    }

    #[test]
    fn the_model_line_names_the_decoder() {
        use crate::hub::{ModelArgs, VaeVariant};
        let mut m = ModelArgs {
            random_weights: true,
            ..ModelArgs::default()
        };
        assert_eq!(
            describe_model(&m),
            "random weights from the configs in models/sdxl-turbo"
        );
        m.vae = Some(VaeVariant::Taesdxl);
        assert_eq!(
            describe_model(&m),
            "random weights from the configs in models/sdxl-turbo, with --vae taesdxl"
        );
        m.vae = None;
        m.preview_vae = Some(crate::hub::PreviewVae::Taesdxl);
        assert_eq!(
            describe_model(&m),
            "random weights from the configs in models/sdxl-turbo, with --preview-vae taesdxl"
        );
    }

    #[test]
    fn table_has_a_line_per_batch() {
        let rows: Vec<Row> = [1, 8]
            .iter()
            .map(|&b| summarize(b, &[sample(100)]).unwrap())
            .collect();
        let t = render_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(
            lines[2].starts_with("| 1 | 1 | 100.0 | 100.0 | 10.00 |"),
            "{t}"
        );
        assert!(
            lines[3].starts_with("| 8 | 1 | 100.0 | 12.5 | 80.00 |"),
            "{t}"
        );
    }

    #[test]
    fn items_cycle_distinct_prompts_and_latent_rows_cycle() -> candle_core::Result<()> {
        let prompts = vec!["a".to_string(), "b".to_string()];
        let items = batch_items(&prompts, 5, 10);
        let p: Vec<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
        assert_eq!(
            p,
            [
                "a",
                "b",
                "a, variation 1",
                "b, variation 1",
                "a, variation 2"
            ]
        );
        assert_eq!(items[4].seed, 14);
        let lat = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((3, 2))?;
        let got: Vec<Vec<f32>> = cycle_rows(&lat, 5)?.to_vec2()?;
        assert_eq!(
            got,
            vec![
                vec![0., 1.],
                vec![2., 3.],
                vec![4., 5.],
                vec![0., 1.],
                vec![2., 3.]
            ]
        );
        Ok(())
    }

    fn no_profile(_: usize) -> anyhow::Result<ProfileRun> {
        panic!("no --profile was asked for")
    }

    fn levers_in(k: Kernels) -> usize {
        Kernels::NAMED
            .iter()
            .filter(|(_, l)| k.contains(*l))
            .count()
    }

    #[test]
    fn conv_plan_summary_counts_each_kind() {
        assert_eq!(summarize_conv_plans(&[]), None);
        let key = "BF16 NHWC x[n=8 c=128 h=512 w=512] o=128 k=3x3 pad=1 stride=1 residual=false";
        let plans = vec![
            format!("{key} mode=Measure graph=true: Graph engine 12 (mode A #0) workspace 0 KiB (legacy fallback: Prefill ...)"),
            format!("{key} mode=Measure graph=true: Fused CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM ..."),
            format!("{key} mode=Measure graph=false: Prefill CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM ..."),
            format!("{key} mode=Measure graph=true: {}: no plan", crate::ops::CONV_FALLBACK),
            format!("{key} mode=Measure graph=true: graph plan engine 12 (mode A #0) failed, legacy from now on: x"),
            format!(
                "{key} mode=Measure graph=false: {}: {}: x",
                crate::ops::CONV_FALLBACK,
                crate::ops::CONV_FIRST_CALL_FAILED
            ),
        ];
        let line = summarize_conv_plans(&plans).unwrap();
        assert_eq!(
            line,
            "cuDNN convolution plans: 4 built; 1 run a graph-API engine, 2 a legacy algorithm, \
             1 candle's ops; graph engines weighed for 3; 1 graph plan(s) failed after being \
             chosen; 1 plan(s) failed at their first call (candle's ops since)"
        );
    }

    fn empty_report() -> Report {
        Report {
            tool: "turbine bench".into(),
            version: "0".into(),
            commit: "c".into(),
            date_utc: utc_date(0),
            machine: machine(),
            device: "cpu".into(),
            dtype: "f32".into(),
            kernels: "all".into(),
            threads: 1,
            model: "m".into(),
            size: "8x8".into(),
            steps: 1,
            guidance: 0.0,
            edit_strength: None,
            partial_images: 0,
            warmup: 0,
            load_s: 0.0,
            rows: Vec::new(),
            ablation: Vec::new(),
            profiles: Vec::new(),
            failures: Vec::new(),
            conv_plans: Vec::new(),
        }
    }

    /// A failing batch size and a failing kernel set are recorded, everything else is still
    /// measured, each figure is saved as it comes, and images are compared with `none`'s.
    /// A failure after which the device cannot even synchronise (a CUDA fault poisons the
    /// context) stops the measuring: the rest would fail at once, and the report says why it
    /// ends there. The ablation asks for no latency runs, the sweep does.
    #[test]
    fn an_unusable_device_stops_the_measuring() {
        let mut report = empty_report();
        let mut calls = Vec::new();
        let poisoned = std::cell::Cell::new(false);
        let mut measure = |b: usize, _first: bool, t: Timing| {
            let k = crate::ops::kernels();
            calls.push((b, k.to_string(), t.latency));
            if k == Kernels::ALL.without(Kernels::GEGLU) {
                poisoned.set(true);
                anyhow::bail!("CUDA_ERROR_ILLEGAL_ADDRESS");
            }
            let img = image::RgbImage::new(1, 1);
            Ok((summarize(b, &[sample(100)]).unwrap(), vec![img; b]))
        };
        crate::ops::with_kernels(Kernels::ALL, || {
            measure_all(
                &mut report,
                &Plan {
                    batches: &[1, 2],
                    profile: None,
                    ablate: Some(4),
                    timing: TIMING,
                },
                &mut measure,
                &mut no_profile,
                &mut |_, _| Ok(()),
                &mut |_| Ok(()),
                &mut || {
                    anyhow::ensure!(!poisoned.get(), "CUDA_ERROR_ILLEGAL_ADDRESS (sticky)");
                    Ok(())
                },
            )
        })
        .unwrap();
        assert_eq!(
            calls.iter().map(|c| c.2).collect::<Vec<_>>()[..3],
            [true, true, false],
            "{calls:?}"
        );
        let sets: Vec<String> = ablation_sets(Kernels::ALL)
            .iter()
            .map(|s| s.kernels.to_string())
            .collect();
        let stop = sets
            .iter()
            .position(|k| *k == Kernels::ALL.without(Kernels::GEGLU).to_string())
            .unwrap();
        // Nothing after the poisoned set ran.
        assert_eq!(calls.len(), 2 + stop + 1);
        assert_eq!(report.ablation.len(), stop);
        let stages: Vec<&str> = report.failures.iter().map(|f| f.stage.as_str()).collect();
        assert_eq!(stages, ["ablation", "device"]);
        assert!(report.failures[1].error.contains(DEVICE_UNUSABLE));
        assert!(report.failures[1].error.contains("sticky"));
    }

    #[test]
    fn failures_are_recorded_and_the_rest_still_measured() {
        let mut report = empty_report();
        let mut calls = Vec::new();
        let mut measure = |b: usize, _first: bool, _t: Timing| {
            let k = crate::ops::kernels();
            calls.push((b, k.to_string()));
            if b == 2 {
                anyhow::bail!("out of memory at batch {b}");
            }
            if crate::ops::enabled(Kernels::GEGLU) && k != Kernels::ALL {
                anyhow::bail!("geglu kernel failed");
            }
            if k == Kernels::GROUP_NORM {
                panic!("group-norm kernel panicked");
            }
            // One pixel per set: 10 + its lever count.
            let v = 10 + levers_in(k) as u8;
            let img = image::RgbImage::from_pixel(1, 1, image::Rgb([v, v, v]));
            Ok((summarize(b, &[sample(100)]).unwrap(), vec![img; b]))
        };
        let mut kept = Vec::new();
        let mut saves = Vec::new();
        crate::ops::with_kernels(Kernels::ALL, || {
            measure_all(
                &mut report,
                &Plan {
                    batches: &[1, 2, 4],
                    profile: None,
                    ablate: Some(4),
                    timing: TIMING,
                },
                &mut measure,
                &mut no_profile,
                &mut |b, images| {
                    kept.push((b, images.len()));
                    Ok(())
                },
                &mut |r| {
                    saves.push((r.rows.len(), r.ablation.len(), r.failures.len()));
                    Ok(())
                },
                &mut || Ok(()),
            )
        })
        .unwrap();
        // The sweep went on past batch 2.
        let batches: Vec<usize> = report.rows.iter().map(|r| r.batch).collect();
        assert_eq!(batches, [1, 4]);
        assert_eq!(kept, [(1, 1), (4, 4)]);
        // Every set ran; the ones with geglu (other than `all`) failed and `group-norm` alone
        // panicked, and both were recorded.
        let sets: Vec<Kernels> = ablation_sets(Kernels::ALL)
            .iter()
            .map(|s| s.kernels)
            .collect();
        assert_eq!(calls.len(), 3 + sets.len());
        let failed: Vec<(&str, usize, &str)> = report
            .failures
            .iter()
            .map(|f| (f.stage.as_str(), f.batch, f.kernels.as_str()))
            .collect();
        assert_eq!(failed[0], ("sweep", 2, "all"));
        assert!(report.failures[0]
            .error
            .contains("out of memory at batch 2"));
        let failing_sets: Vec<String> = sets
            .iter()
            .filter(|k| {
                (k.contains(Kernels::GEGLU) && **k != Kernels::ALL) || **k == Kernels::GROUP_NORM
            })
            .map(|k| k.to_string())
            .collect();
        assert_eq!(
            failed[1..].iter().map(|f| f.2).collect::<Vec<_>>(),
            failing_sets
        );
        assert!(failed[1..].iter().all(|f| f.0 == "ablation" && f.1 == 4));
        let panicked = report
            .failures
            .iter()
            .find(|f| f.kernels == "group-norm")
            .unwrap();
        assert_eq!(panicked.error, "panicked: group-norm kernel panicked");
        assert_eq!(report.ablation.len(), sets.len() - failing_sets.len());
        // Diffs against `none`: one pixel value per lever.
        for r in &report.ablation {
            let levers = levers_in(r.kernels.parse().unwrap());
            assert_eq!(r.max_diff_vs_none, Some(levers as u8), "{}", r.kernels);
            assert_eq!(r.mean_diff_vs_none, Some(levers as f64), "{}", r.kernels);
        }
        // Saved after each of the 3 batch sizes and each of the sets.
        assert_eq!(saves.len(), 3 + sets.len());
        assert_eq!(saves[2], (2, 0, 1));
        assert_eq!(
            *saves.last().unwrap(),
            (2, report.ablation.len(), report.failures.len())
        );
        let listed = render_failures(&report.failures);
        assert_eq!(listed.lines().count(), report.failures.len());
        assert!(listed.starts_with("- sweep batch 2 with --kernels all: out of memory"));
    }

    #[test]
    fn ablation_sets_stay_within_the_kernels_asked_for() {
        let kernels = |sets: &[AblationSet]| sets.iter().map(|s| s.kernels).collect::<Vec<_>>();
        let levers = Kernels::NAMED.len();
        let independent = Kernels::NAMED
            .iter()
            .filter(|(_, k)| k.prerequisites() == Kernels::NONE)
            .count();
        assert_eq!(independent, levers - 4);
        let all = ablation_sets(Kernels::ALL);
        assert_eq!(all.len(), 2 + levers + independent);
        assert_eq!(kernels(&all[..2]), [Kernels::NONE, Kernels::ALL]);
        assert_eq!((all[0].role, all[1].role), ("none", "all"));
        // Every set without one lever comes before any lever alone.
        for (i, (name, k)) in Kernels::NAMED.iter().enumerate() {
            let s = all[2 + i];
            assert_eq!(
                (s.kernels, s.role, s.lever),
                (Kernels::ALL.without(*k), "without", Some(*name))
            );
        }
        let alone: Vec<&str> = all[2 + levers..].iter().map(|s| s.lever.unwrap()).collect();
        assert!(all[2 + levers..].iter().all(|s| s.role == "alone"));
        for name in ["channels-last", "conv-graph", "flash", "overlap"] {
            assert!(!alone.contains(&name), "{name} alone times none again");
        }
        assert_eq!(alone[0], "group-norm");

        let some: Kernels = "all,-flash,-conv".parse().unwrap();
        let sets = ablation_sets(some);
        assert!(sets
            .iter()
            .all(|s| !s.kernels.contains(Kernels::FLASH) && !s.kernels.contains(Kernels::CONV)));
        assert_eq!(sets[1].kernels, some);
        assert!(kernels(&sets).contains(&some.without(Kernels::GEGLU)));
        // One lever: the set and the lever alone are the same, the set without it is `none`.
        assert_eq!(
            kernels(&ablation_sets(Kernels::GEGLU)),
            [Kernels::NONE, Kernels::GEGLU]
        );
        assert_eq!(kernels(&ablation_sets(Kernels::NONE)), [Kernels::NONE]);
    }

    /// `--profile` runs after the sweep, under the run's kernels and then `none`; a failing
    /// profile is a failure like any other.
    #[test]
    fn profiles_follow_the_sweep_and_fail_alone() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut report = empty_report();
        let mut measure = |b: usize, _first: bool, _t: Timing| {
            order.borrow_mut().push(format!("measure {b}"));
            let img = image::RgbImage::new(1, 1);
            Ok((summarize(b, &[sample(100)]).unwrap(), vec![img; b]))
        };
        let mut profile = |b: usize| {
            let k = crate::ops::kernels();
            order.borrow_mut().push(format!("profile {b} {k}"));
            anyhow::ensure!(k != Kernels::NONE, "no timing events");
            Ok(ProfileRun {
                kernels: k.to_string(),
                batch: b,
                text_encode_ms: 1.0,
                unet_ms: 10.0,
                vae_decode_ms: 5.0,
                entries: vec![ProfileEntry {
                    stage: "unet".into(),
                    kind: "conv".into(),
                    ms: 4.0,
                    calls: 3,
                }],
            })
        };
        crate::ops::with_kernels(Kernels::ALL, || {
            measure_all(
                &mut report,
                &Plan {
                    batches: &[1],
                    profile: Some(2),
                    ablate: None,
                    timing: TIMING,
                },
                &mut measure,
                &mut profile,
                &mut |_, _| Ok(()),
                &mut |_| Ok(()),
                &mut || Ok(()),
            )
        })
        .unwrap();
        assert_eq!(
            *order.borrow(),
            ["measure 1", "profile 2 all", "profile 2 none"]
        );
        assert_eq!(report.profiles.len(), 1);
        let f = &report.failures[0];
        assert_eq!(
            (f.stage.as_str(), f.batch, f.kernels.as_str()),
            ("profile", 2, "none")
        );
        let table = render_profiles(&report.profiles);
        // conv 4 of the UNet's 10 ms; the other 6 ms are its `other`; per image (batch 2).
        assert!(
            table.contains("| unet | conv | 2.000 | 40% | 3 |"),
            "{table}"
        );
        assert!(
            table.contains("| unet | other | 3.000 | 60% | - |"),
            "{table}"
        );
        assert!(
            table.contains("| text_encode | other | 0.500 | 100% | - |"),
            "{table}"
        );
        assert_eq!(render_profiles(&[]), "");
    }

    /// Without `none`'s images there is nothing to compare with: the diff is absent, not 0.
    #[test]
    fn ablation_without_a_baseline_has_no_diffs() {
        let mut report = empty_report();
        let mut measure = |b: usize, _first: bool, _t: Timing| {
            if crate::ops::kernels() == Kernels::NONE {
                anyhow::bail!("baseline failed");
            }
            let img = image::RgbImage::new(1, 1);
            Ok((summarize(b, &[sample(100)]).unwrap(), vec![img; b]))
        };
        measure_all(
            &mut report,
            &Plan {
                batches: &[],
                profile: None,
                ablate: Some(1),
                timing: TIMING,
            },
            &mut measure,
            &mut no_profile,
            &mut |_, _| Ok(()),
            &mut |_| Ok(()),
            &mut || Ok(()),
        )
        .unwrap();
        assert_eq!(report.failures.len(), 1);
        assert_eq!(report.ablation.len(), ablation_sets(Kernels::ALL).len() - 1);
        assert!(report
            .ablation
            .iter()
            .all(|r| r.max_diff_vs_none.is_none() && r.mean_diff_vs_none.is_none()));
        assert!(render_ablation(&report.ablation).contains("| - | - |"));
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc_date(4_107_542_399), "2100-02-28 23:59:59");
    }

    #[test]
    fn machine_is_described() {
        let m = machine();
        assert!(m.cores >= 1);
        assert!(!m.host.is_empty() && !m.cpu.is_empty());
    }
}
