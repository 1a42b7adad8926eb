//! One OS thread per device runs the model: the model never runs on a tokio worker, where a
//! multi-second batch would stall every connection. The thread builds its backend itself (so
//! the weights live on the thread that uses them), runs a warm-up batch, then takes batches
//! from its batcher and sends each image back to its request. On a GPU with the OVERLAP lever a
//! batch that is already waiting is queued behind the running one before the running one's
//! images are collected, so the GPU does not idle between batches under load.
//!
//! A failing batch fails only its own requests (500); a panic in the model is caught, reported
//! to those requests and logged, and the thread keeps serving. A batch that runs out of device
//! memory is not failed: it runs again in halves, down to single images, so a request for large
//! images cannot take the images of the requests batched with it down with its own; only an
//! image that does not fit alone fails. The worker then keeps batches of that shape at the size
//! that fitted.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::batcher::{fail_all, Item, ItemOutcome, Queue};
use super::error::BackendError;
use super::metrics::{DropReason, Metrics, Stage};
use super::queue::{Batch, Entry, ShapeKey};
use super::stall::{work_units, Bounds, Liveness, StallTimeout};
use crate::model::lora::AdapterSpec;
use crate::model::pipeline::{
    GeneratedBatch, GenerationSettings, ImageRequest, PendingBatch, Pipeline,
};

/// The seam between the batcher and a model: a batch of images of one shape in, images out.
pub trait ImageBackend: Send + 'static {
    /// Generates one image per item, in order, all with `settings`.
    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch>;

    /// Whether the device can still be used after a batch failed. On CUDA a fault (an illegal
    /// address, a failed launch) poisons the context for the rest of the process: every later
    /// call fails, and a synchronise is the cheapest call that says so. The CPU always can.
    fn healthy(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Whether the first batch of each size costs more than later ones because the backend
    /// plans per batch size: cuDNN's convolution plans (measured on an H200: 1.5-4 s for a new
    /// batch size's first batch, 0.04-0.4 s for later ones). [`WarmupSizes::Auto`] then warms up
    /// every size.
    fn plans_per_batch_size(&self) -> bool {
        false
    }

    /// The least time a call into this backend may run before its device counts as stalled,
    /// for `--device-stall-timeout auto` (see [`super::stall`]): none where a call may
    /// legitimately run for a very long time (the CPU).
    fn stall_timeout(&self) -> Option<Duration> {
        None
    }

    /// Decodes previews of `images` images of `settings`' size on their own, where previews
    /// have a decoder of their own (`--preview-vae`) that the warm-up's batches never run: its
    /// per-size planning is then done before `/health` turns 200, not at a stream's first
    /// preview. False when there is no such decoder.
    fn warm_up_previews(
        &mut self,
        _settings: &GenerationSettings,
        _images: usize,
    ) -> anyhow::Result<bool> {
        Ok(false)
    }

    /// Queues a batch and returns what collects its images, so the worker can queue the next
    /// batch before it waits for this one. A backend that cannot queue runs the batch here.
    fn launch(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<Launched> {
        self.generate(settings, items).map(Launched::Done)
    }

    /// Builds the LoRA adapter `spec` describes into `slot` (a free one), for batches whose
    /// [`GenerationSettings::adapter`] names it.
    fn load_adapter(&mut self, _slot: usize, _spec: &AdapterSpec) -> anyhow::Result<()> {
        anyhow::bail!("this backend cannot load adapters")
    }

    /// Frees the adapter in `slot`; `false` if there was none.
    fn unload_adapter(&mut self, _slot: usize) -> bool {
        false
    }
}

/// What a worker takes from its channel: batches from its batcher, and changes to its adapters
/// (run between batches, once the batch before them is collected).
pub enum Work {
    Batch(Batch<Item>),
    Adapter(AdapterCommand),
}

/// A change to a worker's adapters ([`super::adapters`]), answered on `done`.
pub enum AdapterCommand {
    Load {
        slot: u16,
        spec: AdapterSpec,
        done: oneshot::Sender<anyhow::Result<()>>,
    },
    Unload {
        slot: u16,
        done: oneshot::Sender<()>,
    },
}

/// A batch handed to a backend: done, or still running on its device.
pub enum Launched {
    Done(GeneratedBatch),
    Queued(Box<dyn PendingImages>),
}

/// What collects a queued batch's images.
pub trait PendingImages {
    fn wait(self: Box<Self>) -> anyhow::Result<GeneratedBatch>;
}

impl PendingImages for PendingBatch {
    fn wait(self: Box<Self>) -> anyhow::Result<GeneratedBatch> {
        PendingBatch::wait(*self)
    }
}

impl Launched {
    fn wait(self) -> anyhow::Result<GeneratedBatch> {
        match self {
            Launched::Done(out) => Ok(out),
            Launched::Queued(pending) => pending.wait(),
        }
    }
}

impl ImageBackend for Pipeline {
    fn healthy(&mut self) -> anyhow::Result<()> {
        Ok(self.device().synchronize()?)
    }

    fn plans_per_batch_size(&self) -> bool {
        cfg!(feature = "cudnn") && self.device().is_cuda()
    }

    fn warm_up_previews(
        &mut self,
        settings: &GenerationSettings,
        images: usize,
    ) -> anyhow::Result<bool> {
        Pipeline::warm_up_previews(self, settings, images)
    }

    fn stall_timeout(&self) -> Option<Duration> {
        self.device()
            .is_cuda()
            .then_some(super::stall::DEFAULT_GPU_STALL_TIMEOUT)
    }

    fn generate(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<GeneratedBatch> {
        Pipeline::generate(self, settings, items, None)
    }

    fn launch(
        &mut self,
        settings: &GenerationSettings,
        items: &[ImageRequest],
    ) -> anyhow::Result<Launched> {
        let pending = Pipeline::launch(self, settings, items, None)?;
        Ok(if pending.is_queued() {
            Launched::Queued(Box::new(pending))
        } else {
            Launched::Done(pending.wait()?)
        })
    }

    fn load_adapter(&mut self, slot: usize, spec: &AdapterSpec) -> anyhow::Result<()> {
        Pipeline::load_adapter(self, slot, spec)
    }

    fn unload_adapter(&mut self, slot: usize) -> bool {
        Pipeline::unload_adapter(self, slot)
    }
}

/// Builds a device's backend, on that device's thread.
pub type BackendFactory = Box<dyn FnOnce() -> anyhow::Result<Box<dyn ImageBackend>> + Send>;

/// One device to serve from.
pub struct WorkerSpec {
    /// For logs and errors (`cpu`, `cuda:0`).
    pub label: String,
    pub factory: BackendFactory,
}

/// The warm-up batch every worker runs before the server reports healthy.
#[derive(Debug, Clone)]
pub struct Warmup {
    pub key: ShapeKey,
    pub images: usize,
    /// Which smaller batches follow it.
    pub sizes: WarmupSizes,
    /// Edits too (`--warmup-edits`): an edit batch at each warmed size (SDXL-Turbo's one step at
    /// strength 0.5), so that the first edits do not plan the VAE encoder's convolutions.
    pub edits: bool,
    /// Image sizes (width, height) warmed after the key's (`--warmup-image-sizes`), each at
    /// every warmed batch size: a size's convolutions are planned per image size too.
    pub image_sizes: Vec<(u32, u32)>,
}

/// The warm-up's edit batches: `steps` run at strength 0.5 from a mid-grey image.
fn warmup_edit(
    settings: &GenerationSettings,
    items: &[ImageRequest],
) -> anyhow::Result<(GenerationSettings, Vec<ImageRequest>)> {
    let (steps, start) = crate::model::pipeline::edit_schedule(settings.steps, 0.5)?;
    let image = crate::model::pipeline::InitImage::new(image::RgbImage::from_pixel(
        settings.width as u32,
        settings.height as u32,
        image::Rgb([128, 128, 128]),
    ));
    let edit = GenerationSettings {
        steps,
        init_step: Some(start),
        ..*settings
    };
    let items = items
        .iter()
        .map(|i| ImageRequest {
            init_image: Some(image.clone()),
            ..i.clone()
        })
        .collect();
    Ok((edit, items))
}

/// The batch sizes a worker warms up (`--warmup-batch-sizes`): the warm-up batch, then, for
/// `all`, one batch of each smaller size, so that no request after `/health` turns 200 waits
/// for a size's first-batch planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WarmupSizes {
    /// `all` where the backend plans per batch size (CUDA with cuDNN), `largest` elsewhere.
    #[default]
    Auto,
    /// Every size from the warm-up batch's down to 1.
    All,
    /// The warm-up batch alone.
    Largest,
}

impl Warmup {
    /// The sizes after the warm-up batch, largest first.
    fn smaller_sizes(&self, backend: &dyn ImageBackend) -> std::ops::Range<usize> {
        let all = match self.sizes {
            WarmupSizes::All => true,
            WarmupSizes::Largest => false,
            WarmupSizes::Auto => backend.plans_per_batch_size(),
        };
        if all {
            1..self.images
        } else {
            0..0
        }
    }
}

/// How the warm-up went.
#[derive(Debug, Clone, Copy)]
pub struct WarmupReport {
    pub images: usize,
    pub elapsed: Duration,
}

/// What a worker needs besides its spec.
pub struct WorkerContext {
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub max_batch: usize,
    pub warmup: Warmup,
    /// Where the worker reports that its device became unusable.
    pub health: Arc<DeviceHealth>,
    /// Set when a batch failed: the worker then checks that its device is still usable.
    pub suspect: Cell<bool>,
    /// `--device-stall-timeout`, resolved against the backend's own bound at start.
    pub stall_timeout: StallTimeout,
    /// The call under way, for the stall watch; shared with the batcher and the watch.
    pub liveness: Arc<Liveness>,
}

/// A device whose worker stopped because the device became unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedDevice {
    pub device: String,
    pub message: String,
}

/// The devices whose workers stopped, shared by the workers, the server and `/health`.
#[derive(Debug)]
pub struct DeviceHealth(watch::Sender<Vec<FailedDevice>>);

impl Default for DeviceHealth {
    fn default() -> Self {
        DeviceHealth(watch::channel(Vec::new()).0)
    }
}

impl DeviceHealth {
    pub fn failed(&self) -> Vec<FailedDevice> {
        self.0.borrow().clone()
    }

    /// Adds `device` to the list, unless a device of its name is there already (a device
    /// declared stalled whose worker stops later).
    pub(crate) fn mark_failed(&self, device: FailedDevice) {
        self.0.send_if_modified(|failed| {
            if failed.iter().any(|d| d.device == device.device) {
                return false;
            }
            failed.push(device);
            true
        });
    }

    /// Follows the list as devices fail.
    pub fn subscribe(&self) -> watch::Receiver<Vec<FailedDevice>> {
        self.0.subscribe()
    }
}

/// See `spawn`.
struct ForgetHeld(Arc<Liveness>);

impl Drop for ForgetHeld {
    fn drop(&mut self) {
        self.0.forget_held();
    }
}

/// Starts the worker thread. `ready` gets the warm-up's result (or why loading failed).
pub fn spawn(
    spec: WorkerSpec,
    ctx: WorkerContext,
    batches: mpsc::Receiver<Work>,
    ready: oneshot::Sender<anyhow::Result<WarmupReport>>,
) -> std::io::Result<JoinHandle<()>> {
    let label = spec.label.clone();
    std::thread::Builder::new()
        .name(format!("turbine-{label}"))
        .spawn(move || {
            let mut backend = match start(spec.factory, &label, &ctx) {
                Ok((backend, report)) => {
                    let _ = ready.send(Ok(report));
                    backend
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            // However the worker ends, the stall watch lets go of its images' channels: a
            // request whose images it never answered then sees it gone.
            let _forget = ForgetHeld(ctx.liveness.clone());
            serve(&mut *backend, &label, &ctx, batches);
            tracing::debug!(device = %label, "worker stopped");
        })
}

fn start(
    factory: BackendFactory,
    label: &str,
    ctx: &WorkerContext,
) -> anyhow::Result<(Box<dyn ImageBackend>, WarmupReport)> {
    let t = Instant::now();
    let mut backend = catch_unwind(AssertUnwindSafe(factory)).map_err(|p| {
        anyhow::anyhow!(
            "loading the model on {label} panicked: {}",
            panic_message(&p)
        )
    })??;
    tracing::info!(device = %label, secs = t.elapsed().as_secs_f64(), "model loaded");
    // A distinct prompt per image, as under load, so that the text encoders run the whole
    // batch (a repeated prompt is encoded once) and nothing comes from the prompt cache.
    let warmup_items = |run: &str| -> Vec<ImageRequest> {
        (0..ctx.warmup.images as u64)
            .map(|seed| ImageRequest {
                prompt: format!("warm-up {run} {seed}"),
                negative_prompt: String::new(),
                seed,
                init_image: None,
                partials: None,
            })
            .collect()
    };
    let items = warmup_items("first");
    let settings = ctx.warmup.key.settings();
    let elapsed = warm_up_batch(
        &mut *backend,
        &settings,
        &items,
        &format!("the warm-up batch on {label}"),
    )?;
    let report = WarmupReport {
        images: items.len(),
        elapsed,
    };
    tracing::info!(
        device = %label,
        images = report.images,
        width = settings.width,
        height = settings.height,
        secs = report.elapsed.as_secs_f64(),
        "warm-up batch done"
    );
    let smaller = ctx.warmup.smaller_sizes(&*backend);
    let calibration = if smaller.is_empty() {
        report.elapsed
    } else {
        let t = Instant::now();
        for n in smaller.clone().rev() {
            warm_up_batch(
                &mut *backend,
                &settings,
                &items[..n],
                &format!("the warm-up batch of {n} on {label}"),
            )?;
        }
        tracing::info!(
            device = %label,
            sizes = %format!("{}-{}", smaller.start, smaller.end - 1),
            secs = t.elapsed().as_secs_f64(),
            "warm-up of the smaller batch sizes done (--warmup-batch-sizes)"
        );
        // The first batch planned its size, so its time says little about the next ones: the
        // throughput estimate (Retry-After) starts from the same batch run again, planned.
        warm_up_batch(
            &mut *backend,
            &settings,
            &warmup_items("planned"),
            &format!("the warm-up batch on {label}, planned"),
        )?
    };
    // Every batch size warmed, largest first.
    let sizes: Vec<usize> = std::iter::once(items.len()).chain(smaller.rev()).collect();
    warm_up_previews_and_edits(&mut *backend, &settings, &sizes, label, ctx, || {
        warmup_items("edit")
    })?;
    // The other image sizes asked for, each as the default one: its batch sizes, largest
    // first (which also proves the largest fits in memory), then its previews and edits.
    for &(width, height) in &ctx.warmup.image_sizes {
        let t = Instant::now();
        let other = GenerationSettings {
            width: width as usize,
            height: height as usize,
            ..settings
        };
        let other_items = warmup_items(&format!("{width}x{height}"));
        for &n in &sizes {
            warm_up_batch(
                &mut *backend,
                &other,
                &other_items[..n],
                &format!("the warm-up batch of {n} at {width}x{height} on {label}"),
            )?;
        }
        warm_up_previews_and_edits(&mut *backend, &other, &sizes, label, ctx, || {
            warmup_items(&format!("{width}x{height} edit"))
        })?;
        tracing::info!(
            device = %label,
            width,
            height,
            batches = sizes.len(),
            secs = t.elapsed().as_secs_f64(),
            "warm-up of another image size done (--warmup-image-sizes)"
        );
    }
    ctx.metrics
        .calibrate(report.images, calibration, ctx.queue.workers());
    let floor = ctx.stall_timeout.resolve(backend.stall_timeout());
    let units = work_units(&ctx.warmup.key, report.images, &ctx.warmup.key);
    let bounds = floor.map(|floor| Bounds {
        floor,
        unit: calibration.as_secs_f64() / units.max(1.0),
    });
    if let Some(b) = bounds {
        tracing::info!(
            device = %label,
            floor_secs = b.floor.as_secs_f64(),
            unit_secs = b.unit,
            "a call into the model that runs past the longer of {:.0} s and ten times its \
             estimated time counts as stalled (--device-stall-timeout)",
            b.floor.as_secs_f64()
        );
    }
    ctx.liveness.set_bounds(bounds);
    Ok((backend, report))
}

/// The preview decoder (where it plans per batch size) and, with `--warmup-edits`, an edit
/// batch at each of `sizes` batch sizes of `settings`' image size, on the device `label`;
/// `items` makes the edit batch's requests.
fn warm_up_previews_and_edits(
    backend: &mut dyn ImageBackend,
    settings: &GenerationSettings,
    sizes: &[usize],
    label: &str,
    ctx: &WorkerContext,
    items: impl FnOnce() -> Vec<ImageRequest>,
) -> anyhow::Result<()> {
    let (width, height) = (settings.width, settings.height);
    let at = format!("{width}x{height} on {label}");
    if backend.plans_per_batch_size() {
        // The preview decoder at the warmed sizes (a stream's previews are decoded for the rows
        // that ask, so any size up to the batch's); nothing where previews have none.
        let t = Instant::now();
        let mut warmed = false;
        for &n in sizes {
            let what = format!("the preview warm-up of {n} at {at}");
            warmed |= catch_unwind(AssertUnwindSafe(|| backend.warm_up_previews(settings, n)))
                .map_err(|p| anyhow::anyhow!("{what} panicked: {}", panic_message(&p)))?
                .map_err(|e| e.context(format!("{what} failed")))?;
        }
        if warmed {
            tracing::info!(
                device = %label,
                width,
                height,
                sizes = sizes.len(),
                secs = t.elapsed().as_secs_f64(),
                "warm-up of the preview decoder done (--preview-vae)"
            );
        }
    }
    if ctx.warmup.edits {
        let t = Instant::now();
        let (edit, edit_items) = warmup_edit(settings, &items())?;
        for &n in sizes {
            warm_up_batch(
                backend,
                &edit,
                &edit_items[..n],
                &format!("the warm-up edit batch of {n} at {at}"),
            )?;
        }
        tracing::info!(
            device = %label,
            width,
            height,
            batches = sizes.len(),
            secs = t.elapsed().as_secs_f64(),
            "warm-up of edits done (--warmup-edits)"
        );
    }
    Ok(())
}

/// One warm-up batch of `items`, named `what` in its errors; returns how long it took. Out of
/// memory gets the flags that size the warm-up in its message.
fn warm_up_batch(
    backend: &mut dyn ImageBackend,
    settings: &GenerationSettings,
    items: &[ImageRequest],
    what: &str,
) -> anyhow::Result<Duration> {
    let n = items.len();
    let t = Instant::now();
    let out = catch_unwind(AssertUnwindSafe(|| backend.generate(settings, items)))
        .map_err(|p| anyhow::anyhow!("{what} panicked: {}", panic_message(&p)))?
        .map_err(|e| {
            let hint = if out_of_memory(&e) {
                format!(
                    " (out of memory: {n} images of {}x{} at once; lower --max-batch-size, which \
                     sets the warm-up's size unless --warmup-images does, or warm a smaller \
                     image size: --default-size, --warmup-image-sizes)",
                    settings.width, settings.height
                )
            } else {
                String::new()
            };
            e.context(format!("{what} failed{hint}"))
        })?;
    anyhow::ensure!(
        out.images.len() == n,
        "{what} returned {} images for {n} requests",
        out.images.len()
    );
    Ok(t.elapsed())
}

/// Takes batches until the batcher is gone. While a batch is still running on the device (the
/// OVERLAP lever), a batch that is already waiting is launched before the running one is
/// collected, so the device has the next batch queued behind the current one; an idle worker
/// takes one batch at a time, so a lone request's latency does not change, and a batch that
/// ran to completion in `launch` (the CPU) is answered before the next starts. Batches that ran
/// out of memory (at launch or when collected) run again in parts, one part at a time, once the
/// batch before them is collected.
fn serve(
    backend: &mut dyn ImageBackend,
    label: &str,
    ctx: &WorkerContext,
    mut batches: mpsc::Receiver<Work>,
) {
    let mut in_flight: Option<InFlight> = None;
    let mut last_done: Option<Instant> = None;
    let mut caps = BatchCaps::default();
    loop {
        let received = match &in_flight {
            Some(InFlight {
                launched: Launched::Queued(_),
                ..
            }) => batches.try_recv().ok(),
            Some(_) => None,
            None => match batches.blocking_recv() {
                Some(work) => Some(work),
                None => break,
            },
        };
        // A change to the adapters waits for the batch in flight, collected below.
        let (next, command) = match received {
            Some(Work::Batch(batch)) => (Some(batch), None),
            Some(Work::Adapter(command)) => (None, Some(command)),
            None => (None, None),
        };
        let launched = next.and_then(|batch| launch_batch(backend, label, ctx, &caps, batch));
        let mut retry = Vec::new();
        if let Some(batch) = in_flight.take() {
            let (done, again) = finish_batch(label, ctx, batch, last_done);
            last_done = Some(done);
            retry.extend(again);
        }
        match launched {
            Some(Launch::Running(batch)) => in_flight = Some(batch),
            Some(Launch::InParts(parts)) => retry.push(parts),
            None => {}
        }
        for parts in retry {
            last_done = Some(run_in_parts(backend, label, ctx, &mut caps, parts));
        }
        if let Some(command) = command {
            change_adapters(backend, label, command);
        }
        if ctx.suspect.take() {
            let probed = {
                let _call = ctx
                    .liveness
                    .begin(0.0, || "the device check after a failed batch".into());
                probe(backend)
            };
            if let Err(message) = probed {
                stop(label, ctx, in_flight.take(), batches, message);
                return;
            }
        }
        if ctx.liveness.stalled() {
            // The call the watch gave up on returned after all: what it ran is answered, and
            // the rest goes to the other devices.
            let message = "declared stalled by --device-stall-timeout".to_string();
            stop(label, ctx, in_flight.take(), batches, message);
            return;
        }
    }
}

/// Runs `command` on the worker's thread (where its model's weights live). A build is not
/// watched for stalls: it reads the adapted weights from disk, which may legitimately take
/// longer than any batch.
fn change_adapters(backend: &mut dyn ImageBackend, label: &str, command: AdapterCommand) {
    match command {
        AdapterCommand::Load { slot, spec, done } => {
            let t = Instant::now();
            let built = catch_unwind(AssertUnwindSafe(|| {
                backend.load_adapter(usize::from(slot), &spec)
            }))
            .unwrap_or_else(|p| {
                Err(anyhow::anyhow!(
                    "building the adapter {:?} panicked: {}",
                    spec.name,
                    panic_message(&p)
                ))
            });
            match &built {
                Ok(()) => tracing::info!(
                    device = %label,
                    adapter = %spec.name,
                    slot,
                    secs = t.elapsed().as_secs_f64(),
                    "adapter loaded"
                ),
                Err(e) => tracing::warn!(
                    device = %label,
                    adapter = %spec.name,
                    "adapter not loaded: {e:#}"
                ),
            }
            let _ = done.send(built);
        }
        AdapterCommand::Unload { slot, done } => {
            if backend.unload_adapter(usize::from(slot)) {
                tracing::info!(device = %label, slot, "adapter unloaded");
            }
            let _ = done.send(());
        }
    }
}

/// After a failed batch: `Err` (why) when the device is no longer usable.
fn probe(backend: &mut dyn ImageBackend) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| backend.healthy())) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(format!(
            "the health check panicked: {}",
            panic_message(&panic)
        )),
    }
}

/// Stops a worker whose device is unusable: the batch still on the device is collected (it
/// fails, as everything there does now); the batch parked for this worker and anything that
/// would have run in parts go back to the queue for the other devices (the queue fails them
/// with [`BackendError::DeviceFailed`] when no device is left); and the device is reported
/// failed (the server stops when none is left).
fn stop(
    label: &str,
    ctx: &WorkerContext,
    in_flight: Option<InFlight>,
    mut batches: mpsc::Receiver<Work>,
    message: String,
) {
    tracing::error!(device = %label, "the device is unusable; its worker stops: {message}");
    let mut never_ran = Vec::new();
    if let Some(batch) = in_flight {
        let (_, parts) = finish_batch(label, ctx, batch, None);
        never_ran.extend(parts.map(|p| p.live).unwrap_or_default());
    }
    // The batcher sees the channel closed and lets go of it; whatever it sent before is here.
    batches.close();
    while let Some(work) = batches.blocking_recv() {
        match work {
            Work::Batch(batch) => {
                if let Some(token) = batch.parked {
                    ctx.liveness.release(token);
                }
                never_ran.extend(batch.entries);
            }
            // Dropped unanswered: the server sees this device gone.
            Work::Adapter(_) => {}
        }
    }
    ctx.queue.requeue(never_ran);
    ctx.health.mark_failed(FailedDevice {
        device: label.to_string(),
        message,
    });
}

/// The most images per batch known to fit, for shapes whose batches ran out of device memory.
#[derive(Default)]
struct BatchCaps(HashMap<ShapeKey, usize>);

impl BatchCaps {
    fn get(&self, key: &ShapeKey) -> Option<usize> {
        self.0.get(key).copied()
    }

    /// A batch of `images` of `key` ran out of memory: from now on at most half as many.
    fn lower(&mut self, key: ShapeKey, images: usize) -> usize {
        let cap = images.div_ceil(2).max(1);
        let cap = self.get(&key).map_or(cap, |old| old.min(cap));
        self.0.insert(key, cap);
        cap
    }
}

/// Whether a failure is the device running out of memory, which fewer images at once can
/// avoid: the CUDA driver's, cuBLAS's or cuDNN's status for it, in the error or its causes.
pub(crate) fn out_of_memory(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| crate::device::is_out_of_memory(&cause.to_string()))
}

/// Images to run again in smaller batches, and why.
struct Parts {
    key: ShapeKey,
    live: Vec<Entry<Item>>,
    /// The out-of-memory error that sent them here; `None` when the shape's cap did.
    cause: Option<String>,
}

/// What became of a batch handed to the backend.
enum Launch {
    Running(InFlight),
    InParts(Parts),
}

/// A launched batch and the requests waiting for it.
struct InFlight {
    launched: Launched,
    key: ShapeKey,
    live: Vec<Entry<Item>>,
    started: Instant,
    /// Its images' token with the stall watch ([`Liveness::hold`]).
    held: u64,
}

/// Tops the batch up from the queue (up to the shape's cap, if it has one), drops what nobody
/// waits for, and hands the rest to the backend; `None` when nothing was left to run or the
/// launch failed (its requests are answered then). A batch over its shape's cap, or one that
/// ran out of memory while it was queued, comes back to be run in parts.
fn launch_batch(
    backend: &mut dyn ImageBackend,
    label: &str,
    ctx: &WorkerContext,
    caps: &BatchCaps,
    mut batch: Batch<Item>,
) -> Option<Launch> {
    if let Some(token) = batch.parked.take() {
        ctx.liveness.release(token);
    }
    let cap = caps.get(&batch.key);
    let most = cap.map_or(ctx.max_batch, |c| c.min(ctx.max_batch));
    let room = most.saturating_sub(batch.entries.len());
    batch.entries.extend(ctx.queue.top_up(&batch.key, room));
    let now = Instant::now();
    let mut live = drop_unwanted(batch.entries, now, &ctx.metrics);
    if live.is_empty() {
        return None;
    }
    if cap.is_some_and(|c| live.len() > c) {
        return Some(Launch::InParts(Parts {
            key: batch.key,
            live,
            cause: None,
        }));
    }
    for e in &live {
        ctx.metrics
            .stage(Stage::QueueWait, now.saturating_duration_since(e.enqueued));
        tracing::debug!(parent: &e.payload.span, device = %label, batch = live.len(), "image started");
    }
    start_runs(&mut live, label, &batch.key, now);
    let settings = batch.key.settings();
    let requests: Vec<ImageRequest> = live.iter().map(|e| e.payload.image.clone()).collect();
    let started = Instant::now();
    let _call = begin_call(ctx, &batch.key, live.len());
    let held = ctx.liveness.hold(&live);
    let launched = catch_unwind(AssertUnwindSafe(|| backend.launch(&settings, &requests)));
    if !matches!(launched, Ok(Ok(_))) {
        ctx.liveness.release(held);
    }
    match launched {
        Ok(Ok(launched)) => Some(Launch::Running(InFlight {
            launched,
            key: batch.key,
            live,
            started,
            held,
        })),
        Ok(Err(e)) if live.len() > 1 && out_of_memory(&e) => Some(Launch::InParts(Parts {
            key: batch.key,
            live,
            cause: Some(format!("{e:#}")),
        })),
        Ok(Err(e)) => {
            fail_batch(label, ctx, live, failed(label, e));
            None
        }
        Err(panic) => {
            fail_batch(label, ctx, live, panicked(label, &panic));
            None
        }
    }
}

/// Waits for a launched batch and answers its requests, or hands back a batch that ran out of
/// memory to be run in parts. Returns when it finished, so the next batch's busy time starts
/// there: batches that overlap must not count their shared time twice in the throughput
/// estimate.
fn finish_batch(
    label: &str,
    ctx: &WorkerContext,
    batch: InFlight,
    last_done: Option<Instant>,
) -> (Instant, Option<Parts>) {
    let InFlight {
        launched,
        key,
        live,
        started,
        held,
    } = batch;
    let result = {
        let _call = begin_call(ctx, &key, live.len());
        catch_unwind(AssertUnwindSafe(|| launched.wait()))
    };
    ctx.liveness.release(held);
    let done = Instant::now();
    let busy_from = last_done.map_or(started, |t| t.max(started));
    let elapsed = done.saturating_duration_since(busy_from);
    let failure = match result {
        Ok(Ok(out)) if out.images.len() == live.len() => {
            answer(label, ctx, &key, live, out, elapsed);
            return (done, None);
        }
        Ok(Ok(out)) => wrong_count(label, out.images.len(), live.len()),
        Ok(Err(e)) if live.len() > 1 && out_of_memory(&e) => {
            let cause = Some(format!("{e:#}"));
            return (done, Some(Parts { key, live, cause }));
        }
        Ok(Err(e)) => failed(label, e),
        Err(panic) => panicked(label, &panic),
    };
    fail_batch(label, ctx, live, failure);
    (done, None)
}

/// Runs images that did not fit in one batch, synchronously, in batches of at most the shape's
/// cap (lowered here at every out-of-memory), halving any part that still runs out of memory;
/// an image that runs out of memory alone fails with that error. Returns when the last part
/// finished.
fn run_in_parts(
    backend: &mut dyn ImageBackend,
    label: &str,
    ctx: &WorkerContext,
    caps: &mut BatchCaps,
    parts: Parts,
) -> Instant {
    let Parts {
        key,
        mut live,
        cause,
    } = parts;
    match &cause {
        Some(cause) => split(label, ctx, caps, key, live.len(), cause),
        None => {
            // Sent here by the cap before `launch_batch` counted their wait.
            let now = Instant::now();
            for e in &live {
                ctx.metrics
                    .stage(Stage::QueueWait, now.saturating_duration_since(e.enqueued));
            }
        }
    }
    let settings = key.settings();
    let cap = caps.get(&key).unwrap_or(live.len()).max(1);
    let mut todo = VecDeque::new();
    while live.len() > cap {
        let rest = live.split_off(cap);
        todo.push_back(std::mem::replace(&mut live, rest));
    }
    todo.push_back(live);
    let mut last_done = Instant::now();
    while let Some(part) = todo.pop_front() {
        let now = Instant::now();
        let mut part = drop_unwanted(part, now, &ctx.metrics);
        if part.is_empty() {
            continue;
        }
        start_runs(&mut part, label, &key, now);
        let requests: Vec<ImageRequest> = part.iter().map(|e| e.payload.image.clone()).collect();
        let result = {
            let _call = begin_call(ctx, &key, part.len());
            let held = ctx.liveness.hold(&part);
            let result = catch_unwind(AssertUnwindSafe(|| backend.generate(&settings, &requests)));
            ctx.liveness.release(held);
            result
        };
        last_done = Instant::now();
        let failure = match result {
            Ok(Ok(out)) if out.images.len() == part.len() => {
                answer(
                    label,
                    ctx,
                    &key,
                    part,
                    out,
                    last_done.saturating_duration_since(now),
                );
                continue;
            }
            Ok(Ok(out)) => wrong_count(label, out.images.len(), part.len()),
            Ok(Err(e)) if part.len() > 1 && out_of_memory(&e) => {
                split(label, ctx, caps, key, part.len(), &format!("{e:#}"));
                let mut first = part;
                let second = first.split_off(first.len().div_ceil(2));
                todo.push_front(second);
                todo.push_front(first);
                continue;
            }
            Ok(Err(e)) if out_of_memory(&e) => failed(
                label,
                e.context(format!(
                    "one {}x{} image does not fit in {label}'s free memory",
                    key.width, key.height
                )),
            ),
            Ok(Err(e)) => failed(label, e),
            Err(panic) => panicked(label, &panic),
        };
        fail_batch(label, ctx, part, failure);
    }
    last_done
}

/// A batch of `images` ran out of memory and runs again in parts: counts it, lowers the
/// shape's cap and says so.
fn split(
    label: &str,
    ctx: &WorkerContext,
    caps: &mut BatchCaps,
    key: ShapeKey,
    images: usize,
    cause: &str,
) {
    ctx.metrics.batch_split();
    let cap = caps.lower(key, images);
    tracing::warn!(
        device = %label,
        images,
        width = key.width,
        height = key.height,
        "batch ran out of device memory; running it again in batches of at most {cap}, as this \
         size's batches from now on (a lower --max-batch-size avoids the retry): {cause}"
    );
}

/// Tells the stall watch that a call on `images` images of `key` runs until the guard drops.
fn begin_call<'a>(ctx: &'a WorkerContext, key: &ShapeKey, images: usize) -> super::stall::Call<'a> {
    let units = work_units(key, images, &ctx.warmup.key);
    ctx.liveness.begin(units, || {
        let (w, h, steps) = (key.width, key.height, key.steps);
        let kind = if key.init_step.is_some() {
            "edit"
        } else {
            "generation"
        };
        format!("a {kind} batch of {images} {w}x{h} image(s) with a {steps}-step schedule")
    })
}

/// With `--otlp-endpoint`: opens each image's span for its run on the device, the child of its
/// request's span (images of background work without one get none), with `live`'s size as
/// the batch's. An image that runs again after an out-of-memory split keeps the span it has.
fn start_runs(live: &mut [Entry<Item>], label: &str, key: &ShapeKey, now: Instant) {
    if !crate::telemetry::enabled() {
        return;
    }
    let batch = live.len() as i64;
    for e in live {
        if e.payload.span.is_none() || !e.payload.run.is_none() {
            continue;
        }
        let run = tracing::info_span!(parent: &e.payload.span, "image");
        let kind = if key.init_step.is_some() {
            "edit"
        } else {
            "generation"
        };
        let queued = now.saturating_duration_since(e.enqueued);
        for (name, value) in [
            (
                "turbine.device",
                opentelemetry::Value::from(label.to_string()),
            ),
            ("turbine.kind", kind.into()),
            ("turbine.index", (e.payload.index as i64).into()),
            ("turbine.width", i64::from(key.width).into()),
            ("turbine.height", i64::from(key.height).into()),
            ("turbine.steps", (key.steps as i64).into()),
            ("turbine.batch_size", batch.into()),
            ("turbine.queue_wait_ms", (queued.as_secs_f64() * 1e3).into()),
        ] {
            crate::telemetry::attribute(&run, name, value);
        }
        e.payload.run = run;
    }
}

/// Sends each image of a finished batch to its request and counts the batch.
fn answer(
    label: &str,
    ctx: &WorkerContext,
    key: &ShapeKey,
    live: Vec<Entry<Item>>,
    out: GeneratedBatch,
    elapsed: Duration,
) {
    ctx.metrics
        .batch_done(live.len(), elapsed, ctx.queue.workers());
    ctx.metrics.adapter_images(key.adapter, live.len());
    ctx.metrics
        .stage(Stage::TextEncode, out.timings.text_encode);
    ctx.metrics.stage(Stage::Unet, out.timings.unet);
    ctx.metrics.stage(Stage::VaeDecode, out.timings.vae_decode);
    ctx.metrics.prompts(out.prompts);
    tracing::debug!(device = %label, images = live.len(), secs = elapsed.as_secs_f64(), "batch done");
    for (e, image) in live.into_iter().zip(out.images) {
        let run = &e.payload.run;
        for (name, d) in [
            ("turbine.text_encode_ms", out.timings.text_encode),
            ("turbine.unet_ms", out.timings.unet),
            ("turbine.vae_decode_ms", out.timings.vae_decode),
            ("turbine.batch_ms", elapsed),
        ] {
            crate::telemetry::attribute(run, name, d.as_secs_f64() * 1e3);
        }
        // A closed channel means the request is gone; nothing to do.
        let _ = e.payload.reply.send(ItemOutcome {
            index: e.payload.index,
            result: Ok(image),
            partial: None,
        });
    }
}

fn wrong_count(label: &str, images: usize, batch: usize) -> BackendError {
    BackendError::Failed {
        device: label.to_string(),
        message: format!("the model returned {images} images for a batch of {batch}"),
    }
}

/// The failure of a batch; one that ran out of memory is an image alone (a larger batch runs
/// again in parts instead), which does not fit.
fn failed(label: &str, e: anyhow::Error) -> BackendError {
    let device = label.to_string();
    let message = format!("{e:#}");
    if out_of_memory(&e) {
        BackendError::DoesNotFit { device, message }
    } else {
        BackendError::Failed { device, message }
    }
}

fn panicked(label: &str, panic: &Box<dyn std::any::Any + Send>) -> BackendError {
    BackendError::Panicked {
        device: label.to_string(),
        message: panic_message(panic),
    }
}

fn fail_batch(label: &str, ctx: &WorkerContext, live: Vec<Entry<Item>>, failure: BackendError) {
    ctx.suspect.set(true);
    ctx.metrics.batch_failed();
    tracing::error!(device = %label, images = live.len(), "batch failed: {failure}");
    fail_all(live, &failure);
}

/// Keeps the entries someone still waits for; counts the others as dropped.
fn drop_unwanted(entries: Vec<Entry<Item>>, now: Instant, metrics: &Metrics) -> Vec<Entry<Item>> {
    let (mut gone, mut expired) = (0, 0);
    let live = entries
        .into_iter()
        .filter(|e| {
            // Deadline first: a timed-out request has also closed its channel.
            if e.deadline <= now {
                expired += 1;
                false
            } else if e.payload.reply.is_closed() {
                gone += 1;
                false
            } else {
                true
            }
        })
        .collect();
    metrics.dropped(DropReason::ClientDisconnected, gone);
    metrics.dropped(DropReason::Timeout, expired);
    live
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

#[cfg(test)]
mod tests {
    //! The worker against a fake backend: the only place a fake model is used, to provoke
    //! failures the real pipeline cannot be made to produce on demand.
    use super::*;
    use crate::model::pipeline::{PromptCounts, StageTimings};
    use crate::server::batcher::run_batcher;
    use crate::server::queue::{Guidance, Priority, QueuePolicy, RequestId};
    use image::RgbImage;

    /// Paints each image with its seed; fails or panics on magic prompts.
    struct Fake;

    impl ImageBackend for Fake {
        fn generate(
            &mut self,
            s: &GenerationSettings,
            items: &[ImageRequest],
        ) -> anyhow::Result<GeneratedBatch> {
            if items.iter().any(|i| i.prompt == "fail") {
                anyhow::bail!("device lost (fake)");
            }
            if items.iter().any(|i| i.prompt == "panic") {
                panic!("index out of bounds (fake)");
            }
            let images = items
                .iter()
                .map(|i| {
                    RgbImage::from_pixel(
                        s.width as u32,
                        s.height as u32,
                        image::Rgb([i.seed as u8; 3]),
                    )
                })
                .collect();
            Ok(GeneratedBatch {
                images,
                timings: StageTimings::default(),
                prompts: PromptCounts::default(),
            })
        }
    }

    const KEY: ShapeKey = ShapeKey {
        width: 8,
        height: 8,
        steps: 1,
        guidance: Guidance::Off,
        init_step: None,
        adapter: None,
    };

    struct Harness {
        queue: Arc<Queue>,
        metrics: Arc<Metrics>,
        next: u64,
    }

    impl Harness {
        async fn start() -> Self {
            let metrics = Arc::new(Metrics::new());
            let policy = QueuePolicy {
                capacity: 64,
                aging: Duration::from_secs(10),
                max_batch_delay: Duration::from_millis(1),
            };
            let queue = Arc::new(Queue::new(policy, metrics.clone()));
            let (tx, rx) = mpsc::channel(1);
            let (ready_tx, ready_rx) = oneshot::channel();
            let liveness = Arc::new(Liveness::default());
            let ctx = WorkerContext {
                queue: queue.clone(),
                metrics: metrics.clone(),
                max_batch: 4,
                warmup: Warmup {
                    key: KEY,
                    images: 2,
                    sizes: WarmupSizes::Auto,
                    edits: false,
                    image_sizes: Vec::new(),
                },
                health: Default::default(),
                suspect: Default::default(),
                stall_timeout: StallTimeout::Off,
                liveness: liveness.clone(),
            };
            let spec = WorkerSpec {
                label: "fake".into(),
                factory: Box::new(|| Ok(Box::new(Fake) as Box<dyn ImageBackend>)),
            };
            spawn(spec, ctx, rx, ready_tx).unwrap();
            let report = ready_rx.await.unwrap().unwrap();
            assert_eq!(report.images, 2);
            // Shared, as in the server: what the batcher parks, the worker releases.
            let (_, commands) = mpsc::unbounded_channel();
            tokio::spawn(run_batcher(queue.clone(), tx, commands, 4, liveness));
            Harness {
                queue,
                metrics,
                next: 0,
            }
        }

        /// Submits one request of `n` images and returns its outcomes in index order.
        async fn request(&mut self, prompt: &str, n: usize) -> Vec<Result<u8, BackendError>> {
            self.next += 1;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let entries = (0..n)
                .map(|i| entry(self.next, i, prompt, 10 + i as u64, tx.clone()))
                .collect();
            drop(tx);
            self.queue.submit(entries).unwrap();
            let mut out: Vec<Option<Result<u8, BackendError>>> = (0..n).map(|_| None).collect();
            while let Some(o) = rx.recv().await {
                out[o.index] = Some(o.result.map(|img| img.get_pixel(0, 0)[0]));
            }
            out.into_iter()
                .map(|o| o.expect("every image gets an outcome"))
                .collect()
        }
    }

    #[tokio::test]
    async fn images_come_back_in_request_order() {
        let mut h = Harness::start().await;
        let out = h.request("a cat", 3).await;
        assert_eq!(
            out.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        assert!(h
            .metrics
            .render()
            .contains("turbine_images_generated_total 3"));
    }

    #[tokio::test]
    async fn a_failing_batch_fails_only_its_requests_and_the_worker_keeps_serving() {
        let mut h = Harness::start().await;
        let out = h.request("fail", 2).await;
        assert!(out.iter().all(|r| matches!(r, Err(BackendError::Failed { message, .. }) if message.contains("device lost"))));
        let out = h.request("fine", 1).await;
        assert_eq!(out[0].as_ref().unwrap(), &10);
    }

    #[tokio::test]
    async fn a_panic_is_caught_reported_and_the_worker_keeps_serving() {
        let mut h = Harness::start().await;
        let out = h.request("panic", 1).await;
        match &out[0] {
            Err(BackendError::Panicked { device, message }) => {
                assert_eq!(device, "fake");
                assert!(message.contains("index out of bounds"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let out = h.request("fine", 2).await;
        assert!(out.iter().all(|r| r.is_ok()));
        assert!(h
            .metrics
            .render()
            .contains("turbine_batches_failed_total 1"));
    }

    /// Records what a queued backend was asked to do, in order.
    type Log = Arc<std::sync::Mutex<Vec<String>>>;

    /// Like [`Fake`], but every batch stays "on the device" until collected (the OVERLAP
    /// path); prompts "fail-wait" fail when collected.
    struct Queued(Log);

    struct FakePending {
        log: Log,
        name: String,
        out: anyhow::Result<GeneratedBatch>,
    }

    impl PendingImages for FakePending {
        fn wait(self: Box<Self>) -> anyhow::Result<GeneratedBatch> {
            self.log.lock().unwrap().push(format!("wait {}", self.name));
            self.out
        }
    }

    impl ImageBackend for Queued {
        fn generate(
            &mut self,
            s: &GenerationSettings,
            items: &[ImageRequest],
        ) -> anyhow::Result<GeneratedBatch> {
            let name = format!("generate {} x{}", items[0].prompt, items.len());
            self.0.lock().unwrap().push(name);
            Fake.generate(s, items)
        }

        fn launch(
            &mut self,
            s: &GenerationSettings,
            items: &[ImageRequest],
        ) -> anyhow::Result<Launched> {
            let name = items[0].prompt.clone();
            self.0.lock().unwrap().push(format!("launch {name}"));
            let out = if name == "fail-wait" {
                Err(anyhow::anyhow!("device lost (fake)"))
            } else if name == "oom-wait" && items.len() > 1 {
                Err(anyhow::anyhow!(CUDA_OOM).context("vae decode"))
            } else {
                Fake.generate(s, items)
            };
            Ok(Launched::Queued(Box::new(FakePending {
                log: self.0.clone(),
                name,
                out,
            })))
        }
    }

    /// Image `index` of request `request`, due in a minute.
    fn entry(
        request: u64,
        index: usize,
        prompt: &str,
        seed: u64,
        reply: mpsc::UnboundedSender<ItemOutcome>,
    ) -> Entry<Item> {
        let now = Instant::now();
        Entry {
            request: RequestId(request),
            key: KEY,
            priority: Priority::Normal,
            enqueued: now,
            deadline: now + Duration::from_secs(60),
            payload: Item {
                index,
                image: ImageRequest {
                    prompt: prompt.into(),
                    negative_prompt: String::new(),
                    seed,
                    init_image: None,
                    partials: None,
                },
                reply,
                span: tracing::Span::none(),
                run: tracing::Span::none(),
            },
        }
    }

    /// A batch of one image of `prompt`, seeded with the prompt's length; returns the batch and
    /// what its request will receive.
    fn batch(prompt: &str) -> (Batch<Item>, mpsc::UnboundedReceiver<ItemOutcome>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let entries = vec![entry(1, 0, prompt, prompt.len() as u64, tx)];
        (
            Batch {
                key: KEY,
                entries,
                parked: None,
            },
            rx,
        )
    }

    fn context() -> WorkerContext {
        let metrics = Arc::new(Metrics::new());
        let policy = QueuePolicy {
            capacity: 16,
            aging: Duration::from_secs(10),
            max_batch_delay: Duration::from_millis(1),
        };
        WorkerContext {
            queue: Arc::new(Queue::new(policy, metrics.clone())),
            metrics,
            max_batch: 4,
            warmup: Warmup {
                key: KEY,
                images: 1,
                sizes: WarmupSizes::Auto,
                edits: false,
                image_sizes: Vec::new(),
            },
            health: Default::default(),
            suspect: Default::default(),
            stall_timeout: StallTimeout::Off,
            liveness: Default::default(),
        }
    }

    /// With batches still on the device, a waiting batch is launched before the running one is
    /// collected; every request gets its own images, and a batch that fails when collected
    /// fails alone.
    #[test]
    fn a_waiting_batch_is_launched_before_the_running_one_is_collected() {
        let log = Log::default();
        let (tx, rx) = mpsc::channel(8);
        let mut replies = Vec::new();
        for prompt in ["a", "fail-wait", "ccc"] {
            let (b, r) = batch(prompt);
            tx.try_send(Work::Batch(b)).ok().unwrap();
            replies.push(r);
        }
        drop(tx);
        let ctx = context();
        serve(&mut Queued(log.clone()), "fake", &ctx, rx);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "launch a",
                "launch fail-wait",
                "wait a",
                "launch ccc",
                "wait fail-wait",
                "wait ccc"
            ]
        );
        let got: Vec<Result<u8, BackendError>> = replies
            .iter_mut()
            .map(|r| r.try_recv().unwrap().result.map(|i| i.get_pixel(0, 0)[0]))
            .collect();
        assert_eq!(got[0].as_ref().unwrap(), &1);
        assert!(
            matches!(&got[1], Err(BackendError::Failed { message, .. }) if message.contains("device lost"))
        );
        assert_eq!(got[2].as_ref().unwrap(), &3);
        let m = ctx.metrics.render();
        assert!(m.contains("turbine_images_generated_total 2"), "{m}");
        assert!(m.contains("turbine_batches_failed_total 1"), "{m}");
    }

    /// How cudarc's out-of-memory error reads once candle has passed it on.
    const CUDA_OOM: &str = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";

    /// A batch of one image per request, request `i` prompting `prompts[i]` with seed `10 + i`;
    /// returns the batch and each request's receiver.
    fn batch_of(
        first_request: u64,
        prompts: &[&str],
    ) -> (Batch<Item>, Vec<mpsc::UnboundedReceiver<ItemOutcome>>) {
        let (entries, replies) = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let (tx, rx) = mpsc::unbounded_channel();
                let e = entry(first_request + i as u64, 0, prompt, 10 + i as u64, tx);
                (e, rx)
            })
            .unzip();
        (
            Batch {
                key: KEY,
                entries,
                parked: None,
            },
            replies,
        )
    }

    /// Each request's one outcome: its image's seed (the fake paints it), or its error.
    fn outcomes(replies: &mut [mpsc::UnboundedReceiver<ItemOutcome>]) -> Vec<Result<u8, String>> {
        replies
            .iter_mut()
            .map(|r| {
                let o = r.try_recv().expect("every image gets an outcome");
                o.result
                    .map(|img| img.get_pixel(0, 0)[0])
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Runs out of device memory for batches of more than `fits` images, and for any batch
    /// holding the prompt "huge"; logs the size of every batch it is given.
    struct Tight {
        fits: usize,
        sizes: Vec<usize>,
    }

    impl ImageBackend for Tight {
        fn generate(
            &mut self,
            s: &GenerationSettings,
            items: &[ImageRequest],
        ) -> anyhow::Result<GeneratedBatch> {
            self.sizes.push(items.len());
            if items.len() > self.fits || items.iter().any(|i| i.prompt == "huge") {
                return Err(anyhow::anyhow!(CUDA_OOM).context("unet forward"));
            }
            Fake.generate(s, items)
        }
    }

    #[test]
    fn out_of_memory_is_told_apart_from_other_failures() {
        let oom = [
            anyhow::anyhow!(CUDA_OOM),
            anyhow::anyhow!(CUDA_OOM).context("vae decode"),
            anyhow::anyhow!("CublasError(CUBLAS_STATUS_ALLOC_FAILED)"),
            anyhow::anyhow!("conv2d: CudnnError(CUDNN_STATUS_ALLOC_FAILED)"),
        ];
        assert!(oom.iter().all(out_of_memory));
        let other = [
            anyhow::anyhow!("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")"),
            anyhow::anyhow!("shape mismatch in matmul").context("unet forward"),
        ];
        assert!(!other.iter().any(out_of_memory));
    }

    /// Four requests share a batch too large for the device: the batch runs again in halves and
    /// every request gets its image; the next batch of that shape is split before it runs.
    #[test]
    fn a_batch_that_runs_out_of_memory_runs_again_in_halves_and_its_shape_keeps_the_size_that_fitted(
    ) {
        let (tx, rx) = mpsc::channel(8);
        let (b1, mut r1) = batch_of(1, &["a", "b", "c", "d"]);
        let (b2, mut r2) = batch_of(5, &["e", "f", "g"]);
        tx.try_send(Work::Batch(b1)).ok().unwrap();
        tx.try_send(Work::Batch(b2)).ok().unwrap();
        drop(tx);
        let ctx = context();
        let mut backend = Tight {
            fits: 2,
            sizes: Vec::new(),
        };
        serve(&mut backend, "fake", &ctx, rx);
        assert_eq!(backend.sizes, [4, 2, 2, 2, 1]);
        assert_eq!(outcomes(&mut r1), [Ok(10), Ok(11), Ok(12), Ok(13)]);
        assert_eq!(outcomes(&mut r2), [Ok(10), Ok(11), Ok(12)]);
        let m = ctx.metrics.render();
        assert!(m.contains("turbine_images_generated_total 7"), "{m}");
        assert!(m.contains("turbine_batches_split_total 1"), "{m}");
        assert!(m.contains("turbine_batches_failed_total 0"), "{m}");
    }

    /// One request's image does not fit even alone: it fails with a message that says so, and
    /// the three requests batched with it get their images.
    #[test]
    fn an_image_that_does_not_fit_alone_fails_alone() {
        let (tx, rx) = mpsc::channel(8);
        let (b, mut r) = batch_of(1, &["a", "huge", "b", "c"]);
        tx.try_send(Work::Batch(b)).ok().unwrap();
        drop(tx);
        let ctx = context();
        let mut backend = Tight {
            fits: 4,
            sizes: Vec::new(),
        };
        serve(&mut backend, "fake", &ctx, rx);
        assert_eq!(backend.sizes, [4, 2, 1, 1, 2]);
        let got = outcomes(&mut r);
        assert_eq!(got[0], Ok(10));
        assert_eq!(got[2..], [Ok(12), Ok(13)]);
        let err = got[1].as_ref().unwrap_err();
        assert!(
            err.contains("one 8x8 image does not fit") && err.contains("CUDA_ERROR_OUT_OF_MEMORY"),
            "{err}"
        );
        let m = ctx.metrics.render();
        assert!(m.contains("turbine_batches_split_total 2"), "{m}");
        assert!(m.contains("turbine_batches_failed_total 1"), "{m}");
    }

    /// An image that runs out of memory alone, in a batch of its own or in the last part of a
    /// split one, fails as one that does not fit (answered with `x-should-retry: false`); any
    /// other failure, and an out-of-memory in a batch that can still be split, does not.
    #[test]
    fn an_image_alone_out_of_memory_does_not_fit() {
        let (tx, rx) = mpsc::channel(8);
        let (b1, mut r1) = batch_of(1, &["huge"]);
        let (b2, mut r2) = batch_of(2, &["a", "huge"]);
        tx.try_send(Work::Batch(b1)).ok().unwrap();
        tx.try_send(Work::Batch(b2)).ok().unwrap();
        drop(tx);
        let ctx = context();
        let mut backend = Tight {
            fits: 4,
            sizes: Vec::new(),
        };
        serve(&mut backend, "fake", &ctx, rx);
        let mut results: Vec<_> = r1
            .iter_mut()
            .chain(r2.iter_mut())
            .map(|r| r.try_recv().expect("every image gets an outcome").result)
            .collect();
        // Batch 2's "a" (seed 10) is made.
        let a = results.remove(1).unwrap();
        assert_eq!(a.get_pixel(0, 0)[0], 10);
        for huge in results {
            match huge {
                Err(BackendError::DoesNotFit { device, message }) => {
                    assert_eq!(device, "fake");
                    assert!(message.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{message}");
                }
                other => panic!("{:?}", other.map(|_| "an image")),
            }
        }
        // Alone, then 2 split into 1 + 1.
        assert_eq!(backend.sizes, [1, 2, 1, 1]);
        let wrong = failed("fake", anyhow::anyhow!("device lost"));
        assert!(matches!(wrong, BackendError::Failed { .. }), "{wrong:?}");
    }

    /// A queued batch that runs out of memory when collected (OVERLAP) runs again in parts once
    /// it is collected, before the batch queued behind it is.
    #[test]
    fn a_queued_batch_that_runs_out_of_memory_runs_again_in_parts() {
        let log = Log::default();
        let (tx, rx) = mpsc::channel(8);
        let (b1, mut r1) = batch_of(1, &["a"]);
        let (b2, mut r2) = batch_of(2, &["oom-wait", "oom-wait"]);
        let (b3, mut r3) = batch_of(4, &["ccc"]);
        for b in [b1, b2, b3] {
            tx.try_send(Work::Batch(b)).ok().unwrap();
        }
        drop(tx);
        let ctx = context();
        serve(&mut Queued(log.clone()), "fake", &ctx, rx);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "launch a",
                "launch oom-wait",
                "wait a",
                "launch ccc",
                "wait oom-wait",
                "generate oom-wait x1",
                "generate oom-wait x1",
                "wait ccc"
            ]
        );
        assert_eq!(outcomes(&mut r1), [Ok(10)]);
        assert_eq!(outcomes(&mut r2), [Ok(10), Ok(11)]);
        assert_eq!(outcomes(&mut r3), [Ok(10)]);
        let m = ctx.metrics.render();
        assert!(m.contains("turbine_images_generated_total 4"), "{m}");
        assert!(m.contains("turbine_batches_split_total 1"), "{m}");
    }

    const CUDA_FAULT: &str =
        "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")";

    /// A device that a batch with the prompt "fault" poisons: that batch and every later call
    /// fail, the health check included, as after a CUDA fault. Logs each batch's first prompt.
    struct Poisonable {
        poisoned: bool,
        ran: Vec<String>,
    }

    impl ImageBackend for Poisonable {
        fn healthy(&mut self) -> anyhow::Result<()> {
            if self.poisoned {
                anyhow::bail!("{CUDA_FAULT}");
            }
            Ok(())
        }

        fn generate(
            &mut self,
            s: &GenerationSettings,
            items: &[ImageRequest],
        ) -> anyhow::Result<GeneratedBatch> {
            self.ran.push(items[0].prompt.clone());
            if self.poisoned || items[0].prompt == "fault" {
                self.poisoned = true;
                anyhow::bail!("{CUDA_FAULT}");
            }
            Fake.generate(s, items)
        }
    }

    /// After a failed batch the worker checks its device: a device that is still usable keeps
    /// serving; one that is not stops its worker, the batch parked for it goes back to the
    /// queue (for other devices), and the device is reported failed.
    #[test]
    fn a_device_left_unusable_by_a_failure_stops_its_worker() {
        let (tx, rx) = mpsc::channel(8);
        let mut replies = Vec::new();
        for prompt in ["fine", "fail", "fault", "after"] {
            let (b, r) = batch_of(replies.len() as u64 + 1, &[prompt]);
            tx.try_send(Work::Batch(b)).ok().unwrap();
            replies.push(r);
        }
        let ctx = context();
        // "fail" fails with the device still usable: the worker carries on.
        struct Both(Poisonable);
        impl ImageBackend for Both {
            fn healthy(&mut self) -> anyhow::Result<()> {
                self.0.healthy()
            }
            fn generate(
                &mut self,
                s: &GenerationSettings,
                items: &[ImageRequest],
            ) -> anyhow::Result<GeneratedBatch> {
                if items[0].prompt == "fail" {
                    self.0.ran.push("fail".into());
                    anyhow::bail!("shape mismatch (fake)");
                }
                self.0.generate(s, items)
            }
        }
        let mut backend = Both(Poisonable {
            poisoned: false,
            ran: Vec::new(),
        });
        drop(tx);
        serve(&mut backend, "cuda:7", &ctx, rx);
        assert_eq!(backend.0.ran, ["fine", "fail", "fault"]);
        let got: Vec<Result<u8, String>> =
            replies[..3].iter_mut().flat_map(|r| outcomes(r)).collect();
        assert_eq!(got[0], Ok(10));
        assert!(got[1].as_ref().unwrap_err().contains("shape mismatch"));
        assert!(got[2]
            .as_ref()
            .unwrap_err()
            .contains("CUDA_ERROR_ILLEGAL_ADDRESS"));
        // "after" never ran here and is waiting again, with no answer yet.
        assert!(replies[3][0].try_recv().is_err());
        assert_eq!(ctx.queue.len(), 1);
        let error = BackendError::DeviceFailed {
            device: "cuda:7".into(),
            message: CUDA_FAULT.into(),
        };
        // With no device left the server closes the queue, which answers it.
        assert_eq!(ctx.queue.close(error), 1);
        let parked = outcomes(&mut replies[3]).remove(0);
        let parked = parked.as_ref().unwrap_err();
        assert!(
            parked.contains("no device of this server is usable any more (cuda:7: ")
                && parked.contains("ILLEGAL_ADDRESS"),
            "{parked}"
        );
        let failed = ctx.health.failed();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].device, "cuda:7");
        assert!(failed[0].message.contains("ILLEGAL_ADDRESS"));
        let m = ctx.metrics.render();
        assert!(m.contains("turbine_batches_failed_total 2"), "{m}");
    }

    /// A backend that finishes in `launch` (the CPU) answers each batch before the next starts.
    #[test]
    fn a_finished_batch_is_answered_before_the_next_is_launched() {
        /// Notes, at each batch, how many images the worker had answered before it.
        struct Counting(Arc<Metrics>, Vec<bool>);
        impl ImageBackend for Counting {
            fn generate(
                &mut self,
                s: &GenerationSettings,
                items: &[ImageRequest],
            ) -> anyhow::Result<GeneratedBatch> {
                let answered = self.0.render().contains("turbine_images_generated_total 1");
                self.1.push(answered);
                Fake.generate(s, items)
            }
        }
        let (tx, rx) = mpsc::channel(8);
        let (b1, mut r1) = batch("a");
        let (b2, mut r2) = batch("bb");
        tx.try_send(Work::Batch(b1)).ok().unwrap();
        tx.try_send(Work::Batch(b2)).ok().unwrap();
        drop(tx);
        let ctx = context();
        let mut backend = Counting(ctx.metrics.clone(), Vec::new());
        serve(&mut backend, "fake", &ctx, rx);
        assert_eq!(backend.1, [false, true]);
        assert_eq!(r1.try_recv().unwrap().result.unwrap().get_pixel(0, 0)[0], 1);
        assert_eq!(r2.try_recv().unwrap().result.unwrap().get_pixel(0, 0)[0], 2);
    }

    /// A warm-up batch too large for the device fails start-up with what to change.
    #[tokio::test]
    async fn a_warm_up_that_runs_out_of_memory_says_which_flag_to_lower() {
        let ctx = context();
        let (_tx, rx) = mpsc::channel(1);
        let (ready_tx, ready_rx) = oneshot::channel();
        let spec = WorkerSpec {
            label: "cuda:0".into(),
            factory: Box::new(|| {
                Ok(Box::new(Tight {
                    fits: 0,
                    sizes: Vec::new(),
                }) as Box<dyn ImageBackend>)
            }),
        };
        spawn(spec, ctx, rx, ready_tx).unwrap();
        let err = format!("{:#}", ready_rx.await.unwrap().err().unwrap());
        assert!(
            err.contains(
                "the warm-up batch on cuda:0 failed (out of memory: 1 images of 8x8 at once"
            ) && err.contains("--max-batch-size")
                && err.contains("CUDA_ERROR_OUT_OF_MEMORY"),
            "{err}"
        );
    }

    /// Records each batch's size; plans per batch size or not; fails batches of `fail_at`.
    struct Sizes {
        plans: bool,
        fail_at: Option<usize>,
        seen: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl ImageBackend for Sizes {
        fn generate(
            &mut self,
            s: &GenerationSettings,
            items: &[ImageRequest],
        ) -> anyhow::Result<GeneratedBatch> {
            self.seen.lock().unwrap().push(items.len());
            if self.fail_at == Some(items.len()) {
                anyhow::bail!("no plan for {} images", items.len());
            }
            Fake.generate(s, items)
        }

        fn plans_per_batch_size(&self) -> bool {
            self.plans
        }
    }

    /// The warm-up batch, then (where the backend plans per size, or when asked) one batch of
    /// each smaller size, largest first, and the largest once more, planned, for the throughput
    /// estimate.
    #[test]
    fn the_warm_up_covers_every_batch_size_where_the_backend_plans_per_size() {
        use WarmupSizes::{All, Auto, Largest};
        for (sizes, plans, want) in [
            (Auto, true, vec![4, 3, 2, 1, 4]),
            (Auto, false, vec![4]),
            (All, false, vec![4, 3, 2, 1, 4]),
            (Largest, true, vec![4]),
        ] {
            let mut ctx = context();
            ctx.warmup = Warmup {
                key: KEY,
                images: 4,
                sizes,
                edits: false,
                image_sizes: Vec::new(),
            };
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let backend = Sizes {
                plans,
                fail_at: None,
                seen: seen.clone(),
            };
            let factory: BackendFactory = Box::new(move || Ok(Box::new(backend)));
            let (_, report) = start(factory, "fake", &ctx).unwrap();
            assert_eq!(*seen.lock().unwrap(), want, "{sizes:?}, plans {plans}");
            assert_eq!(report.images, 4);
        }
    }

    /// The throughput estimate (Retry-After's) comes from a planned batch, not the first one,
    /// which paid for the planning, when the warm-up covers the smaller sizes.
    #[test]
    fn the_throughput_estimate_starts_from_a_planned_batch() {
        /// Sleeps 300 ms in the first batch of each size (its planning).
        struct Planning(std::collections::HashSet<usize>);
        impl ImageBackend for Planning {
            fn generate(
                &mut self,
                s: &GenerationSettings,
                items: &[ImageRequest],
            ) -> anyhow::Result<GeneratedBatch> {
                if self.0.insert(items.len()) {
                    std::thread::sleep(Duration::from_millis(300));
                }
                Fake.generate(s, items)
            }
        }
        let throughput = |sizes| {
            let mut ctx = context();
            ctx.warmup = Warmup {
                key: KEY,
                images: 4,
                sizes,
                edits: false,
                image_sizes: Vec::new(),
            };
            let factory: BackendFactory = Box::new(|| Ok(Box::new(Planning(Default::default()))));
            let (_, report) = start(factory, "fake", &ctx).unwrap();
            assert!(report.elapsed >= Duration::from_millis(300));
            let m = ctx.metrics.render();
            let line = m
                .lines()
                .find(|l| l.starts_with("turbine_throughput_images_per_second "))
                .unwrap_or_else(|| panic!("{m}"))
                .to_string();
            line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
        };
        // The planned batch: 4 images in well under 300 ms.
        assert!(throughput(WarmupSizes::All) > 100.0);
        // Only the first batch: 4 images in at least 300 ms.
        assert!(throughput(WarmupSizes::Largest) <= 4.0 / 0.3);
    }

    /// The warm-up gives every image its own prompt, and the planned rerun new ones: the text
    /// encoders run the whole batch each time (a repeated prompt is encoded once, a kept one
    /// not at all), as under load with distinct prompts.
    #[test]
    fn warm_up_prompts_are_distinct_and_the_planned_run_repeats_none() {
        struct Prompts(Arc<std::sync::Mutex<Vec<Vec<String>>>>);
        impl ImageBackend for Prompts {
            fn generate(
                &mut self,
                s: &GenerationSettings,
                items: &[ImageRequest],
            ) -> anyhow::Result<GeneratedBatch> {
                let prompts = items.iter().map(|i| i.prompt.clone()).collect();
                self.0.lock().unwrap().push(prompts);
                Fake.generate(s, items)
            }
        }
        let mut ctx = context();
        ctx.warmup = Warmup {
            key: KEY,
            images: 3,
            sizes: WarmupSizes::All,
            edits: false,
            image_sizes: Vec::new(),
        };
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let backend = Prompts(seen.clone());
        let factory: BackendFactory = Box::new(move || Ok(Box::new(backend)));
        start(factory, "fake", &ctx).unwrap();
        let batches = seen.lock().unwrap().clone();
        assert_eq!(batches.len(), 4, "{batches:?}");
        for b in &batches {
            let distinct: std::collections::HashSet<_> = b.iter().collect();
            assert_eq!(distinct.len(), b.len(), "{b:?}");
        }
        let (first, planned) = (&batches[0], &batches[3]);
        assert_eq!(planned.len(), 3);
        assert!(planned.iter().all(|p| !first.contains(p)), "{batches:?}");
    }

    /// `--warmup-edits`: after the generations, an edit batch at each warmed size, largest
    /// first, each image with an input image of the batch's size and the edit's schedule.
    #[test]
    fn edits_are_warmed_up_at_every_warmed_size_when_asked() {
        type Seen = Arc<std::sync::Mutex<Vec<(usize, Option<usize>, usize, bool)>>>;
        struct Edits(Seen);
        impl ImageBackend for Edits {
            fn generate(
                &mut self,
                s: &GenerationSettings,
                items: &[ImageRequest],
            ) -> anyhow::Result<GeneratedBatch> {
                let sized = items.iter().all(|i| {
                    i.init_image.as_ref().is_some_and(|im| {
                        im.image().dimensions() == (s.width as u32, s.height as u32)
                    })
                });
                self.0
                    .lock()
                    .unwrap()
                    .push((items.len(), s.init_step, s.steps, sized));
                Fake.generate(s, items)
            }
        }
        for (sizes, edits, want) in [
            (
                WarmupSizes::All,
                true,
                vec![
                    (3, None, 1, false),
                    (2, None, 1, false),
                    (1, None, 1, false),
                    (3, None, 1, false),
                    // One step at strength 0.5: the second of a two-step schedule.
                    (3, Some(1), 2, true),
                    (2, Some(1), 2, true),
                    (1, Some(1), 2, true),
                ],
            ),
            (
                WarmupSizes::Largest,
                true,
                vec![(3, None, 1, false), (3, Some(1), 2, true)],
            ),
            (WarmupSizes::Largest, false, vec![(3, None, 1, false)]),
        ] {
            let mut ctx = context();
            ctx.warmup = Warmup {
                key: KEY,
                images: 3,
                sizes,
                edits,
                image_sizes: Vec::new(),
            };
            let seen: Seen = Default::default();
            let backend = Edits(seen.clone());
            let factory: BackendFactory = Box::new(move || Ok(Box::new(backend)));
            start(factory, "fake", &ctx).unwrap();
            assert_eq!(*seen.lock().unwrap(), want, "{sizes:?}, edits {edits}");
        }
    }

    /// `--warmup-image-sizes`: after the default size's warm-up, each other image size at every
    /// warmed batch size, largest first, then its edits when those are warmed.
    #[test]
    fn other_image_sizes_are_warmed_at_every_batch_size_when_asked() {
        type Seen = Arc<std::sync::Mutex<Vec<(usize, usize, usize, bool)>>>;
        struct Shapes(Seen);
        impl ImageBackend for Shapes {
            fn generate(
                &mut self,
                s: &GenerationSettings,
                items: &[ImageRequest],
            ) -> anyhow::Result<GeneratedBatch> {
                self.0.lock().unwrap().push((
                    items.len(),
                    s.width,
                    s.height,
                    s.init_step.is_some(),
                ));
                Fake.generate(s, items)
            }
        }
        for (edits, want) in [
            (
                false,
                vec![
                    (2, 8, 8, false),
                    (1, 8, 8, false),
                    (2, 8, 8, false),
                    (2, 16, 8, false),
                    (1, 16, 8, false),
                    (2, 24, 32, false),
                    (1, 24, 32, false),
                ],
            ),
            (
                true,
                vec![
                    (2, 8, 8, false),
                    (1, 8, 8, false),
                    (2, 8, 8, false),
                    (2, 8, 8, true),
                    (1, 8, 8, true),
                    (2, 16, 8, false),
                    (1, 16, 8, false),
                    (2, 16, 8, true),
                    (1, 16, 8, true),
                    (2, 24, 32, false),
                    (1, 24, 32, false),
                    (2, 24, 32, true),
                    (1, 24, 32, true),
                ],
            ),
        ] {
            let mut ctx = context();
            ctx.warmup = Warmup {
                key: KEY,
                images: 2,
                sizes: WarmupSizes::All,
                edits,
                image_sizes: vec![(16, 8), (24, 32)],
            };
            let seen: Seen = Default::default();
            let backend = Shapes(seen.clone());
            let factory: BackendFactory = Box::new(move || Ok(Box::new(backend)));
            let (_, report) = start(factory, "fake", &ctx).unwrap();
            assert_eq!(*seen.lock().unwrap(), want, "edits {edits}");
            // The throughput estimate is still the default size's.
            assert_eq!(report.images, 2);
        }
    }

    /// Where the backend plans per size, its preview decoder is warmed at every warmed size,
    /// largest first, after the generations; elsewhere, or with nothing to warm, not at all. A
    /// failure there fails start-up, naming the size.
    #[test]
    fn the_preview_decoder_is_warmed_at_the_warmed_sizes() {
        struct Previews {
            plans: bool,
            fail_at: Option<usize>,
            seen: Arc<std::sync::Mutex<Vec<usize>>>,
        }
        impl ImageBackend for Previews {
            fn generate(
                &mut self,
                s: &GenerationSettings,
                items: &[ImageRequest],
            ) -> anyhow::Result<GeneratedBatch> {
                Fake.generate(s, items)
            }
            fn plans_per_batch_size(&self) -> bool {
                self.plans
            }
            fn warm_up_previews(
                &mut self,
                s: &GenerationSettings,
                images: usize,
            ) -> anyhow::Result<bool> {
                assert_eq!(
                    (s.width, s.height),
                    (KEY.width as usize, KEY.height as usize)
                );
                self.seen.lock().unwrap().push(images);
                anyhow::ensure!(self.fail_at != Some(images), "no plan");
                Ok(true)
            }
        }
        let run = |sizes, plans, fail_at| {
            let mut ctx = context();
            ctx.warmup = Warmup {
                key: KEY,
                images: 3,
                sizes,
                edits: false,
                image_sizes: Vec::new(),
            };
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let backend = Previews {
                plans,
                fail_at,
                seen: seen.clone(),
            };
            let factory: BackendFactory = Box::new(move || Ok(Box::new(backend)));
            let result = start(factory, "fake", &ctx).map(|_| ());
            let seen = seen.lock().unwrap().clone();
            (result, seen)
        };
        let (result, seen) = run(WarmupSizes::Auto, true, None);
        assert!(result.is_ok());
        assert_eq!(seen, [3, 2, 1]);
        assert_eq!(run(WarmupSizes::Largest, true, None).1, [3]);
        assert!(run(WarmupSizes::Auto, false, None).1.is_empty());
        assert!(run(WarmupSizes::All, false, None).1.is_empty());
        let (result, seen) = run(WarmupSizes::Auto, true, Some(2));
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("the preview warm-up of 2 at 8x8 on fake failed"),
            "{err}"
        );
        assert_eq!(seen, [3, 2]);
    }

    #[test]
    fn a_failed_smaller_warm_up_batch_fails_start_up() {
        let mut ctx = context();
        ctx.warmup = Warmup {
            key: KEY,
            images: 3,
            sizes: WarmupSizes::All,
            edits: false,
            image_sizes: Vec::new(),
        };
        let backend = Sizes {
            plans: false,
            fail_at: Some(2),
            seen: Default::default(),
        };
        let factory: BackendFactory = Box::new(move || Ok(Box::new(backend)));
        let err = start(factory, "cuda:1", &ctx).err().unwrap();
        let err = format!("{err:#}");
        assert!(
            err.contains("the warm-up batch of 2 on cuda:1 failed")
                && err.contains("no plan for 2 images"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_model_that_fails_to_load_reports_why() {
        let ctx = context();
        let (_tx, rx) = mpsc::channel(1);
        let (ready_tx, ready_rx) = oneshot::channel();
        let spec = WorkerSpec {
            label: "fake".into(),
            factory: Box::new(|| anyhow::bail!("missing file unet/config.json")),
        };
        spawn(spec, ctx, rx, ready_tx).unwrap();
        let err = ready_rx.await.unwrap().err().unwrap();
        assert!(format!("{err:#}").contains("unet/config.json"));
    }
}
