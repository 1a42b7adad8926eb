//! `turbine serve`: the OpenAI Images API over HTTP, feeding a dynamic batcher.
//!
//! ```text
//! HTTP (axum) ─ validate ─▶ Queue (queue::State: shape keys, priorities, expiry)
//!                              │  one batcher task per device forms batches,
//!                              ▼  prefetching one through a channel of size 1
//!                        worker thread per device (ImageBackend: the Pipeline)
//!                              │  RgbImage per item, back to its request
//!                              ▼
//!              encode on the blocking pool ─▶ b64_json, or url via the ImageStore
//! ```
//!
//! Modules: [`config`] (one `ServerConfig`), [`api`] (wire types), [`validate`] (raw JSON →
//! `ValidRequest`), [`error`] (error layers and the status table), [`queue`] (pure queue
//! logic), [`batcher`] and [`worker`] (the runtime around it), [`encode`], [`store`],
//! [`auth`], [`metrics`], [`routes`]; OpenAI's Files and Batch APIs in [`files`] and
//! [`batches`], whose requests go through the same queue at low priority, and [`webhooks`]
//! that tell a key's endpoints when its batches end.

pub mod adapters;
pub mod api;
pub mod auth;
pub mod batcher;
pub mod batches;
pub mod config;
pub mod encode;
pub mod error;
pub mod fds;
pub mod files;
pub mod image_dir;
pub mod inputs;
pub mod listen;
pub mod lora_updates;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod provenance;
pub mod queue;
pub mod routes;
pub mod stall;
pub mod store;
pub mod tls;
pub mod upload;
pub mod uploads;
pub mod validate;
pub mod webhooks;
pub mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify};

pub use config::ServerConfig;
pub use worker::{
    BackendFactory, DeviceHealth, FailedDevice, ImageBackend, WarmupSizes, WorkerSpec,
};

use auth::Authenticator;
use batcher::Queue;
use error::BackendError;
use metrics::Metrics;
use queue::{Guidance, QueuePolicy, ShapeKey};
use store::ImageStore;
use worker::{Warmup, WorkerContext};

/// Counts a prompt's CLIP tokens (for `usage`) and says where CLIP stops reading it; `None` in
/// the server means "unknown" (0 tokens, all read).
pub type TokenCounter = Arc<dyn Fn(&str) -> PromptTokens + Send + Sync>;

/// What the first CLIP tokenizer makes of a prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptTokens {
    /// Its tokens as CLIP reads them: BOS, the prompt's own (at most 75), EOS.
    pub count: usize,
    /// Where the part CLIP reads ends, in bytes of the prompt, when the rest is cut off.
    pub read_up_to: Option<usize>,
}

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Weights loading or warm-up running: `/health` 503, generation 503.
    Loading = 0,
    Ready = 1,
    /// SIGTERM/SIGINT received: draining; `/health` and new generation requests 503.
    ShuttingDown = 2,
    /// Every device became unusable: `/health` and generation 503 (`device_failed`) while the
    /// server drains, then `serve` returns an error (the process exits 1, so a supervisor
    /// restarts it with fresh CUDA contexts).
    Failed = 3,
    /// SIGTERM/SIGINT received with `--shutdown-delay-secs`: `/health` 503, so that load
    /// balancers stop sending requests, while the requests still sent are served as before;
    /// the drain ([`Phase::ShuttingDown`]) follows the delay.
    Leaving = 4,
}

/// How many edit uploads are decoded at once. A 1024x1024 upload takes 14-18 ms of a CPU core
/// to be ready at 512x512 (`cargo bench --bench encode -- cpu/decode`, benches/RESULTS.md), so 4
/// at once make well over 200 a second, above the GPU's edit rate, while a burst of small files
/// that each claim an 8192x8192 image cannot hold gigabytes together.
pub const UPLOAD_DECODE_SLOTS: usize = 4;

/// Shared state of the HTTP layer.
pub struct App {
    pub config: ServerConfig,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub auth: Authenticator,
    pub store: Mutex<ImageStore>,
    /// `--image-store-dir`: the URL images' copies every server using it reads.
    pub image_dir: Option<Arc<image_dir::ImageDir>>,
    pub tokens: Option<TokenCounter>,
    /// The devices whose workers stopped (`/health` lists them).
    pub health: Arc<DeviceHealth>,
    /// Unix time the server started (the models' `created`).
    pub started: u64,
    /// Edit uploads decoded at once ([`UPLOAD_DECODE_SLOTS`]): a small file may claim a large
    /// image, and each decode holds up to [`upload::MAX_INPUT_ALLOC`] plus its copies.
    pub upload_decodes: Arc<tokio::sync::Semaphore>,
    /// Request bodies and edit images held in memory (`--max-buffered-input-bytes`).
    pub inputs: inputs::InputMemory,
    /// The Files API's files (`--files-dir`).
    pub files: files::FileStore,
    pub batches: batches::Batches,
    /// The Uploads API's uploads under way (a file sent in parts).
    pub uploads: uploads::Uploads,
    /// Webhook endpoints, told when their key's batches end.
    pub webhooks: Arc<webhooks::Webhooks>,
    /// Requests of all running batches in flight at once: two full batches per device, so a
    /// device finds the next batch queued while one runs, and the rest of the queue's capacity
    /// stays with interactive requests.
    pub batch_slots: Arc<tokio::sync::Semaphore>,
    /// Cancelled when a shutdown stops waiting for the work under way (its grace ran out, or a
    /// second stop signal came): requests still waiting for their images answer 503
    /// `shutting_down` then, rather than losing their connection unanswered.
    pub abandoned: tokio_util::sync::CancellationToken,
    phase: AtomicU8,
    next_request: AtomicU64,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Each device's batcher, which passes changes to its adapters ([`lora_updates`]) on to
    /// its worker between batches.
    adapter_commands: std::sync::OnceLock<Vec<mpsc::UnboundedSender<worker::AdapterCommand>>>,
}

impl App {
    /// Where to send changes to the adapters of the devices still running (their batchers).
    pub fn adapter_commands(&self) -> Vec<mpsc::UnboundedSender<worker::AdapterCommand>> {
        self.adapter_commands
            .get()
            .into_iter()
            .flatten()
            .filter(|tx| !tx.is_closed())
            .cloned()
            .collect()
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            2 => Phase::ShuttingDown,
            4 => Phase::Leaving,
            _ => Phase::Failed,
        }
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// What requests get once no device is usable: the failed devices and why.
    pub fn device_failed(&self) -> BackendError {
        let failed = self.health.failed();
        let join =
            |f: fn(&FailedDevice) -> &str| failed.iter().map(f).collect::<Vec<_>>().join("; ");
        BackendError::DeviceFailed {
            device: join(|d| d.device.as_str()),
            message: join(|d| d.message.as_str()),
        }
    }

    pub fn next_request_id(&self) -> queue::RequestId {
        queue::RequestId(self.next_request.fetch_add(1, Ordering::Relaxed))
    }

    /// Marks a generation request as in flight until the guard drops (shutdown waits for 0).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.metrics.in_flight(1);
        InFlight(self.clone())
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// How long a changed keys file must read the same before the periodic check uses it.
const KEYS_FILE_SETTLE: Duration = Duration::from_millis(200);

/// Reads the keys file again (off the async workers: a small read, and a short settle) and
/// counts what became of it.
async fn reload_keys(app: &Arc<App>, force: bool) {
    let app2 = app.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        app2.auth
            .reload(force, KEYS_FILE_SETTLE, std::time::Instant::now())
    })
    .await;
    match outcome {
        Ok(auth::KeysReload::Loaded) => {
            app.metrics.api_key_reload(true);
            app.metrics.api_keys(app.auth.key_count());
        }
        Ok(auth::KeysReload::Failed) => app.metrics.api_key_reload(false),
        Ok(auth::KeysReload::Unchanged) | Err(_) => {}
    }
}

/// Runs `each` every `period`, the first time one period from now; a run that takes longer
/// delays the next rather than bunching them up. Runs until dropped.
async fn every<F: Future<Output = ()>>(period: Duration, mut each: impl FnMut() -> F) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        each().await;
    }
}

/// Whether a warning last given at `last` may be given again at `now` (at most one a minute, so
/// that a condition that lasts does not flood the log); if so, `last` becomes `now`.
pub(crate) fn warning_due(last: &mut Option<Instant>, now: Instant) -> bool {
    let due = last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60));
    if due {
        *last = Some(now);
    }
    due
}

/// How long an idle thread of the runtime's blocking pool lives before it exits (tokio's
/// default, set explicitly on `serve`'s runtime).
pub const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Keeps at least one thread in the runtime's blocking pool (which encodes images, tokenises
/// prompts and waits on the disk). When the process is at its limit on threads (a container's
/// pids limit, `ulimit -u`), tokio queues a blocking task on the threads it has, but panics
/// when it has none, and an idle server's pool empties after [`BLOCKING_THREAD_KEEP_ALIVE`]: the
/// next request would then fail. A no-op task more often than that keeps one thread alive.
async fn keep_a_blocking_thread() {
    let keep = || {
        let spawned = std::panic::catch_unwind(|| drop(tokio::task::spawn_blocking(|| {})));
        if spawned.is_err() {
            tracing::warn!(
                "cannot start a thread: the process is at its limit on threads or processes \
                 (a container's pids limit, ulimit -u)"
            );
        }
        std::future::ready(())
    };
    keep().await;
    every(BLOCKING_THREAD_KEEP_ALIVE / 3, keep).await
}

/// Looks at `--api-keys-file` every `keys_reload_interval` and uses it once it changed.
async fn watch_keys_file(app: Arc<App>) {
    every(app.config.auth.keys_reload_interval, || {
        reload_keys(&app, false)
    })
    .await
}

/// SIGHUP (`systemctl reload`) reads the keys file and the certificate files again at once.
/// Without a handler the signal would end the process, and every queued image with it.
async fn reload_on_hangup(app: Arc<App>, tls: Option<Arc<tls::Tls>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot handle SIGHUP: {e}");
                return;
            }
        };
        while hup.recv().await.is_some() {
            let mut what = Vec::new();
            if app.config.auth.keys_file.is_some() {
                what.push("the API keys file");
            }
            if tls.is_some() {
                what.push("the certificate files");
            }
            if what.is_empty() {
                tracing::info!("SIGHUP received: nothing to reload (no keys file, no HTTPS)");
                continue;
            }
            tracing::info!("SIGHUP received: reading {} again", what.join(" and "));
            reload_keys(&app, true).await;
            if let Some(tls) = &tls {
                tls.reload_off_thread(true).await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (app, tls);
}

/// See [`App::enter`].
pub struct InFlight(Arc<App>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight(-1);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The Files, Uploads, Batches and webhook endpoints APIs' state.
struct Storage {
    files: files::FileStore,
    batches: batches::Batches,
    uploads: uploads::Uploads,
    webhooks: Arc<webhooks::Webhooks>,
}

impl Storage {
    /// What lives in the directory of `files`, read back (or made there); on failure the
    /// directory is closed (a private one removed).
    fn open_in(
        files: files::FileStore,
        f: &config::FilesConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let rest = (|| -> anyhow::Result<_> {
            let batches = batches::Batches::open(files.batches_dir())?;
            let uploads = uploads::Uploads::open(files.uploads_dir()).with_context(|| {
                format!(
                    "cannot make the uploads directory {}",
                    files.uploads_dir().display()
                )
            })?;
            let webhooks = webhooks::Webhooks::open(
                files.webhooks_dir(),
                true,
                f.webhook_retry,
                f.webhook_ca_file.as_deref(),
                metrics,
            )?;
            Ok((batches, uploads, webhooks))
        })();
        match rest {
            Ok((batches, uploads, webhooks)) => Ok(Storage {
                files,
                batches,
                uploads,
                webhooks: Arc::new(webhooks),
            }),
            Err(e) => {
                files.close();
                Err(e)
            }
        }
    }

    /// Empty, with no directory (see [`files::FileStore::without_disk`]).
    fn without_disk(f: &config::FilesConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let root = std::env::temp_dir().join("turbine-files-unavailable");
        Ok(Storage {
            batches: batches::Batches::without_disk(root.join("batches")),
            uploads: uploads::Uploads::without_disk(root.join("uploads")),
            webhooks: Arc::new(webhooks::Webhooks::open(
                root.join("webhooks"),
                false,
                f.webhook_retry,
                f.webhook_ca_file.as_deref(),
                metrics,
            )?),
            files: files::FileStore::without_disk(root),
        })
    }
}

/// Opens the files directory (`--files-dir`, else one of this process's own in the system's
/// temporary directory) and what lives in it. A `--files-dir` that cannot be used stops the
/// server; a temporary directory that cannot be written (a container with a read-only root
/// filesystem and nothing mounted at /tmp) does not: images are what the server is for, and
/// only the routes that need the directory answer 503 `files_unavailable`, as the warning says.
fn open_storage(config: &ServerConfig, metrics: Arc<Metrics>) -> anyhow::Result<Storage> {
    let f = &config.files;
    let opened = files::FileStore::open(f.dir.as_deref())
        .and_then(|files| Storage::open_in(files, f, metrics.clone()));
    let storage = match opened {
        Ok(storage) => storage,
        Err(e) if f.dir.is_none() => {
            tracing::warn!(
                temp = %std::env::temp_dir().display(),
                "the temporary directory cannot be written ({e:#}): the Files, Uploads, Batches \
                 and webhook endpoints APIs answer 503 files_unavailable; images are served as \
                 usual. Set --files-dir (TURBINE_FILES_DIR) to a writable directory (a volume, \
                 an emptyDir), or TMPDIR, to have them"
            );
            return Storage::without_disk(f, metrics);
        }
        Err(e) => return Err(e),
    };
    let dir = storage.files.dir().display();
    if storage.files.persistent() {
        tracing::info!(%dir, "files and batches are kept here across restarts");
    } else {
        tracing::info!(%dir, "files and batches are kept here until the server stops (--files-dir keeps them across restarts)");
    }
    // A small filesystem (a container's `--tmpfs /tmp:size=64m`) under --min-free-disk-bytes
    // refuses every upload, however small: say so now, not at the first 507.
    if let Ok(free) = fs2::available_space(storage.files.dir()) {
        if free < f.min_free_bytes {
            let total = fs2::total_space(storage.files.dir()).unwrap_or(0);
            tracing::warn!(
                %dir,
                free_bytes = free,
                total_bytes = total,
                min_free_bytes = f.min_free_bytes,
                "the files directory's filesystem has less free space than \
                 --min-free-disk-bytes: every upload is refused (507) until it has more; give \
                 --files-dir a larger volume, or lower --min-free-disk-bytes"
            );
        }
    }
    Ok(storage)
}

/// Serves until `stop` yields (a stop signal), then drains (see [`Phase::ShuttingDown`]) for at
/// most `config.shutdown_grace` and returns; a second item from `stop` ends the drain at once.
/// Requests still waiting for images when the drain ends are answered 503 `shutting_down`
/// within [`answer_time`] of it. The listener accepts from the start, so `/health` answers 503
/// while the workers load their models and run their warm-up batch. Fails if a worker cannot
/// load its model.
pub async fn serve(
    config: ServerConfig,
    listener: listen::Listener,
    metrics_listener: Option<listen::Listener>,
    workers: Vec<WorkerSpec>,
    tokens: Option<TokenCounter>,
    stop: impl Stream<Item = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.check()?;
    anyhow::ensure!(!workers.is_empty(), "no device to serve from");
    let now = Instant::now();
    let metrics = Arc::new(Metrics::new());
    metrics.set_adapters(&config.model.adapters.names());
    let b = &config.batching;
    // Before anything else starts: a certificate that does not load stops the server here.
    let tls = match &config.tls {
        Some(t) => Some(Arc::new(tls::Tls::new(t.clone(), metrics.clone())?)),
        None => None,
    };
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch());
    }
    let queue = Arc::new(Queue::new(
        QueuePolicy {
            capacity: b.max_queued_images,
            aging: b.priority_aging,
            max_batch_delay: b.max_batch_delay,
        },
        metrics.clone(),
    ));
    queue.set_workers(workers.len());
    let auth = match &config.auth.keys_file {
        None => Authenticator::new(
            &config.auth.keys,
            config.auth.priority_header.as_deref(),
            now,
        )?,
        Some(path) => {
            metrics.keys_file();
            Authenticator::with_keys_file(
                &config.auth.keys,
                path,
                config.auth.priority_header.as_deref(),
                now,
            )?
        }
    };
    metrics.api_keys(auth.key_count());
    if auth.is_open() {
        tracing::warn!("no API keys configured: the API is open to anyone who can reach it");
    }
    let (w, h) = config.limits.default_size;
    // The warm-up runs what a request that asks for nothing runs.
    let warmup = Warmup {
        key: ShapeKey {
            width: w,
            height: h,
            steps: config.limits.default_steps,
            guidance: Guidance::from_scale(config.limits.default_guidance_scale),
            init_step: None,
            adapter: None,
        },
        images: if config.warmup_images == 0 {
            b.max_batch_size
        } else {
            config.warmup_images
        },
        sizes: config.warmup_batch_sizes,
        edits: config.warmup_edits,
        image_sizes: config
            .warmup_image_sizes
            .iter()
            .copied()
            .filter(|&size| size != (w, h))
            .collect(),
    };
    let max_batch = b.max_batch_size;
    let health = Arc::new(DeviceHealth::default());
    let Storage {
        files,
        batches,
        uploads,
        webhooks,
    } = open_storage(&config, metrics.clone())?;
    let batch_slots = 2 * max_batch * workers.len();
    let inputs = input_memory(&config, metrics.clone());
    let store = ImageStore::new(config.store.ttl, config.store.max_bytes);
    metrics.image_store(&store);
    let image_dir = match &config.store.dir {
        Some(dir) => {
            let dir = Arc::new(image_dir::ImageDir::open(
                dir,
                config.store.ttl,
                config.store.dir_max_bytes,
                metrics.clone(),
            )?);
            tracing::info!(dir = %dir.dir().display(), "images behind url responses are written here too, for every server using it");
            tokio::spawn(sweep_images(dir.clone()));
            Some(dir)
        }
        None => None,
    };
    let app = Arc::new(App {
        store: Mutex::new(store),
        image_dir,
        config,
        queue: queue.clone(),
        metrics: metrics.clone(),
        auth,
        tokens,
        health: health.clone(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        upload_decodes: Arc::new(tokio::sync::Semaphore::new(UPLOAD_DECODE_SLOTS)),
        inputs,
        files,
        batches,
        uploads,
        webhooks,
        batch_slots: Arc::new(tokio::sync::Semaphore::new(batch_slots)),
        abandoned: tokio_util::sync::CancellationToken::new(),
        phase: AtomicU8::new(Phase::Loading as u8),
        next_request: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
        adapter_commands: Default::default(),
    });

    // However `serve` returns, the batches stop (to resume after a restart with --files-dir)
    // and a private files directory leaves the disk.
    let _files = CloseFilesOnExit(app.clone());
    batches::resume(&app);
    app.webhooks.resume();
    tokio::spawn(sweep_files_and_batches(app.clone()));
    if app.config.auth.keys_file.is_some() {
        tokio::spawn(watch_keys_file(app.clone()));
    }
    tokio::spawn(reload_on_hangup(app.clone(), tls.clone()));
    tokio::spawn(keep_a_blocking_thread());

    let n_workers = workers.len();
    let mut ready = Vec::new();
    let mut senders = Vec::new();
    for spec in workers {
        let (tx, rx) = mpsc::channel(1);
        let (commands_tx, commands) = mpsc::unbounded_channel();
        senders.push(commands_tx);
        let (ready_tx, ready_rx) = oneshot::channel();
        let label = spec.label.clone();
        let liveness = Arc::new(stall::Liveness::default());
        let ctx = WorkerContext {
            queue: queue.clone(),
            metrics: metrics.clone(),
            max_batch,
            warmup: warmup.clone(),
            health: health.clone(),
            suspect: Default::default(),
            stall_timeout: app.config.device_stall_timeout,
            liveness: liveness.clone(),
        };
        worker::spawn(spec, ctx, rx, ready_tx)
            .with_context(|| format!("cannot start the worker thread for {label}"))?;
        tokio::spawn(batcher::run_batcher(
            queue.clone(),
            tx,
            commands,
            max_batch,
            liveness.clone(),
        ));
        ready.push((label, ready_rx, liveness));
    }
    let _ = app.adapter_commands.set(senders);

    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let router = routes::router(app.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    // A name's other addresses (`localhost`: `::1`, then `127.0.0.1`).
    let also: String = listener.local_addrs()?[1..]
        .iter()
        .map(|a| format!(" and {scheme}://{a}"))
        .collect();
    let max_connections = connection_limit(&app.config);
    let server = tokio::spawn(serve_http(
        listener,
        router,
        app.clone(),
        tls,
        max_connections,
        async {
            let _ = stop_rx.await;
        },
    ));
    tracing::info!("listening on {scheme}://{addr}{also}");
    // Stopped when `serve` returns, however it returns.
    let _metrics_server = match metrics_listener {
        Some(l) => {
            let urls: Vec<String> = l
                .local_addrs()?
                .iter()
                .map(|a| format!("http://{a}/metrics"))
                .collect();
            tracing::info!("metrics on {} (--metrics-port)", urls.join(" and "));
            Some(AbortOnDrop(tokio::spawn(serve_metrics(l, app.clone()))))
        }
        None => None,
    };
    let notify = |message: &str| {
        if let Some(socket) = &app.config.notify_socket {
            socket.notify(message);
        }
    };
    notify("STATUS=loading the model and warming up");
    if let (Some(socket), Some(interval)) = (
        app.config.notify_socket.clone(),
        app.config.systemd_watchdog,
    ) {
        // From the start on (systemd watches from READY=1), for as long as the runtime runs:
        // a process that stops answering, or hangs on its way out, goes quiet and is restarted.
        tracing::info!(
            interval_secs = interval.as_secs_f64(),
            "pinging systemd's watchdog (WatchdogSec)"
        );
        tokio::spawn(every(notify::watchdog_period(interval), move || {
            socket.notify("WATCHDOG=1");
            std::future::ready(())
        }));
    }

    let loaded = async {
        let mut watches = Vec::new();
        for (label, rx, liveness) in ready {
            match rx.await {
                Ok(Ok(_)) => watches.push((label, liveness)),
                // Getting the model (its download) is no device's doing: said as it is.
                Ok(Err(e)) if e.downcast_ref::<crate::hub::HubError>().is_some() => return Err(e),
                Ok(Err(e)) => return Err(e.context(format!("device {label}"))),
                Err(_) => anyhow::bail!("the worker thread for {label} exited during start-up"),
            }
        }
        // Watched from the end of their warm-up on (it plans every size, which takes long).
        for (label, liveness) in watches {
            tokio::spawn(stall::watch(
                label,
                liveness,
                health.clone(),
                metrics.clone(),
            ));
        }
        Ok(())
    };
    let mut stop = std::pin::pin!(stop);
    let mut all_failed = false;
    tokio::select! {
        r = loaded => {
            if let Err(e) = r {
                let _ = stop_tx.send(());
                return Err(e);
            }
            app.set_phase(Phase::Ready);
            tracing::info!("ready: serving the model as {:?}", app.config.model.id);
            notify(&format!(
                "READY=1\nSTATUS=serving {} on {scheme}://{addr}",
                app.config.model.id
            ));
            tokio::select! {
                Some(()) = stop.next() => {}
                _ = every_device_failed(&health, &queue, n_workers) => all_failed = true,
            }
        }
        Some(()) = stop.next() => {}
    }

    // With --shutdown-delay-secs, the server first leaves its balancers (`/health` 503) while
    // it goes on serving what they still send; a second signal cuts the delay and the drain.
    let mut cut_short = false;
    let delay = app.config.shutdown_delay;
    if !all_failed && !delay.is_zero() && app.phase() == Phase::Ready {
        app.set_phase(Phase::Leaving);
        notify(&format!(
            "STATUS=leaving: /health answers 503, serving {} s more before the drain",
            delay.as_secs()
        ));
        tracing::info!(
            delay_secs = delay.as_secs_f64(),
            "stop signal: /health answers 503 so that load balancers stop sending requests; \
             serving the requests still sent until the delay is over, then draining"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            Some(()) = stop.next() => cut_short = true,
            _ = every_device_failed(&health, &queue, n_workers) => all_failed = true,
        }
    }

    if all_failed {
        app.set_phase(Phase::Failed);
        let queued = queue.close(app.device_failed());
        tracing::error!(
            queued_images = queued,
            "every device is unusable: failing the queued images and stopping"
        );
    } else {
        app.set_phase(Phase::ShuttingDown);
    }
    notify(&format!(
        "STOPPING=1\nSTATUS={}: finishing {} queued images and the running work",
        if all_failed {
            "every device failed"
        } else {
            "shutting down"
        },
        queue.len()
    ));
    let grace = app.config.shutdown_grace;
    tracing::info!(
        queued_images = queue.len(),
        grace_secs = grace.as_secs_f64(),
        "shutting down: finishing queued and running work"
    );
    let deadline = Instant::now() + grace;
    let answer = answer_time(grace);
    // The work under way gets the grace but for the time to answer what it leaves.
    let hurried = cut_short
        || tokio::select! {
            idle = tokio::time::timeout_at((deadline - answer).into(), app.wait_idle()) => {
                if idle.is_err() {
                    tracing::warn!(
                        requests = app.in_flight.load(Ordering::Acquire),
                        "shutdown grace period over with requests still running: answering them 503 \
                         and exiting"
                    );
                }
                false
            }
            Some(()) = stop.next() => {
                tracing::warn!(
                    requests = app.in_flight.load(Ordering::Acquire),
                    "a second stop signal: not waiting for the running work; answering its requests \
                     503 and exiting"
                );
                true
            }
        };
    app.abandoned.cancel();
    let _ = stop_tx.send(());
    // The abandoned requests' answers go out, idle keep-alive connections close at once; what is
    // left is bounded by the grace period (by the time to answer after a second signal).
    let rest = if hurried {
        answer
    } else {
        deadline.saturating_duration_since(Instant::now())
    }
    .max(Duration::from_millis(100));
    match tokio::time::timeout(rest, server).await {
        Ok(Ok(Ok(()))) | Err(_) => {}
        Ok(Ok(Err(e))) => return Err(anyhow::Error::new(e).context("HTTP server failed")),
        Ok(Err(e)) => return Err(anyhow::anyhow!("HTTP server task failed: {e}")),
    }
    if all_failed {
        let why: Vec<String> = health
            .failed()
            .iter()
            .map(|d| format!("{}: {}", d.device, d.message))
            .collect();
        anyhow::bail!(
            "every device became unusable; restart turbine ({})",
            why.join("; ")
        );
    }
    tracing::info!("shut down");
    Ok(())
}

/// Sweeps `--image-store-dir` of expired images now and then, for as long as the runtime runs.
async fn sweep_images(dir: Arc<image_dir::ImageDir>) {
    let mut every = tokio::time::interval(dir.sweep_period());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let swept = dir.clone();
        match tokio::task::spawn_blocking(move || swept.sweep()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "expired images swept from --image-store-dir"),
            Err(e) => tracing::warn!(error = %e, "sweeping --image-store-dir failed"),
        }
    }
}

/// The part of a shutdown's grace kept for answering the requests the drain gives up on (their
/// 503 to write, their connections to close): a second, or a quarter of a shorter grace.
fn answer_time(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(1))
}

/// `--max-buffered-input-bytes` as it applies here: `auto` resolved against the memory the
/// process may use, and said.
fn input_memory(config: &ServerConfig, metrics: Arc<Metrics>) -> inputs::InputMemory {
    let l = &config.limits;
    let memory = inputs::memory_limit();
    let budget = inputs::input_budget(
        config.max_buffered_input,
        memory,
        l.max_upload_bytes as u64,
        l.max_body_bytes as u64,
    );
    let of = match (config.max_buffered_input, memory) {
        (None, Some(m)) => format!(": a quarter of the {} MiB this process may use", m >> 20),
        _ => String::new(),
    };
    tracing::info!(
        "holding at most {} MiB of request bodies and edit images in memory at once \
         (--max-buffered-input-bytes{of})",
        budget >> 20
    );
    inputs::InputMemory::new(budget, l.body_timeout, metrics)
}

/// `--max-connections` as it applies here: `auto` resolved against the open-file limit, and a
/// warning when the number asked for leaves too little of that limit for files.
fn connection_limit(config: &ServerConfig) -> usize {
    let soft = fds::open_file_limits().map(|(soft, _)| soft);
    let n = fds::connection_limit(config.max_connections, soft);
    match (config.max_connections, soft) {
        (Some(asked), Some(soft)) if asked as u64 > soft.saturating_sub(fds::RESERVED_FDS) => {
            tracing::warn!(
                "--max-connections {asked} leaves less than {} of the open-file limit ({soft}) \
                 for files: under load, uploads, batch files and connections may fail with \
                 \"too many open files\"",
                fds::RESERVED_FDS
            );
        }
        _ => tracing::info!(
            "taking at most {n} connections at once (--max-connections; open-file limit {})",
            soft.map_or("none".to_string(), |s| s.to_string())
        ),
    }
    n
}

/// How often expired files leave the disk when nobody lists or reads them, and batches past
/// their retention are forgotten.
const FILE_SWEEP_INTERVAL: Duration = Duration::from_secs(300);

/// How often batch records that a full disk kept from being written are tried again.
const RECORD_RETRY_INTERVAL: Duration = Duration::from_secs(5);

async fn sweep_files_and_batches(app: Arc<App>) {
    let mut every = tokio::time::interval(FILE_SWEEP_INTERVAL);
    let mut records = tokio::time::interval(RECORD_RETRY_INTERVAL);
    let retention = app.config.files.batch_retention.as_secs();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = records.tick() => {
                app.batches.save_unsaved();
                continue;
            }
        }
        let now = files::unix_now();
        app.uploads.sweep(now);
        let n = app.files.remove_expired(now);
        if n > 0 {
            tracing::info!(files = n, "expired files removed");
        }
        let n = app
            .batches
            .remove_ended_before(now.saturating_sub(retention));
        if n > 0 {
            tracing::info!(batches = n, "batches past --batch-retention-days removed");
        }
    }
}

/// See `serve`.
struct CloseFilesOnExit(Arc<App>);

impl Drop for CloseFilesOnExit {
    fn drop(&mut self) {
        // Batches still running see the server stopping: they write nothing more and, with
        // --files-dir, resume after a restart.
        if self.0.phase() != Phase::Failed {
            self.0.set_phase(Phase::ShuttingDown);
        }
        if self.0.batches.save_unsaved() > 0 {
            tracing::error!("some batch records could not be written before the stop: those batches resume from their last written status");
        }
        self.0.files.close();
    }
}

/// Returns once all `workers` devices have failed; until then keeps the queue's worker count
/// (its throughput and `Retry-After` estimates) at the devices still serving.
async fn every_device_failed(health: &DeviceHealth, queue: &Queue, workers: usize) {
    let mut rx = health.subscribe();
    loop {
        let failed = rx.borrow_and_update().len();
        if failed >= workers {
            return;
        }
        queue.set_workers(workers - failed);
        if rx.changed().await.is_err() {
            // The sender lives in `App` as long as `serve` runs.
            std::future::pending::<()>().await;
        }
    }
}

/// The HTTP server: axum's `serve` loop, with a timer given to hyper so that its header read
/// timeout applies. A connection that does not send a whole request head within
/// `--header-read-timeout` is closed: one that sends its head byte by byte, one that opens and sends
/// nothing, and a keep-alive connection left idle that long between requests. (axum's `serve`
/// gives hyper no timer, so such connections stay open for as long as their peer likes.) A
/// request being served is not cut: the timeout runs only while a head is awaited.
///
/// With `tls`, each connection is first a TLS handshake (within the same timeout), then HTTP/2
/// or HTTP/1.1 as its ALPN chose; one that speaks plain HTTP is answered 400 `https_required`.
///
/// At most `max_connections` are open at once: at that many the loop stops accepting, and the
/// connections that come meanwhile wait in the kernel's listen backlog (their requests are
/// answered late, not refused) until one closes.
///
/// Shutdown as axum's: once `stop` resolves no connection is accepted, each open one finishes
/// the requests it has and closes, and this returns when all have.
async fn serve_http(
    listener: listen::Listener,
    router: Router,
    app: Arc<App>,
    tls: Option<Arc<tls::Tls>>,
    max_connections: usize,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let header_timeout = app.config.limits.header_timeout;
    let timeouts = Timeouts::of(&app.config);
    app.metrics.set_connections_max(max_connections);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    // When the limit was last logged: once a minute at most, however often it is reached.
    let mut limit_logged: Option<Instant> = None;

    // Each connection holds a receiver; `closed()` on the sender resolves when all are gone.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                app.metrics.connection_limit_wait();
                if warning_due(&mut limit_logged, Instant::now()) {
                    tracing::warn!(
                        "{max_connections} connections open (--max-connections): new ones wait \
                         to be accepted until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => {
                        slot.expect("the connection slots are never closed: this is a bug")
                    }
                    () = &mut stop => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.next("the API's port") => match accepted {
                Some(accepted) => accepted,
                None => continue,
            },
            () = &mut stop => break,
        };
        tcp_keepalive(&stream, header_timeout);
        let ip = peer.ip().to_canonical();
        let peer = routes::Peer {
            ip,
            forwarded: app.config.forwarded_allow.allows(ip),
        };
        let router = router.clone();
        let mut closing = closing_rx.clone();
        let open = Connection::open(app.clone());
        let tls = tls.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _open = (open, slot);
            // hyper's own timeout starts once it knows the protocol; until then it is ours,
            // and a shutdown does not wait for a connection that has not begun a request.
            let Some(tls) = tls else {
                let h2 = tokio::select! {
                    known = tokio::time::timeout(header_timeout, protocol_known(&stream)) => {
                        match known {
                            Ok(Some(h2)) => h2,
                            Ok(None) | Err(_) => return,
                        }
                    }
                    _ = closing.changed() => return,
                };
                return serve_connection(stream, router, h2, peer, timeouts, closing).await;
            };
            let mut plain = false;
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(
                    header_timeout,
                    accept_tls(stream, &tls, &app, &mut plain),
                ) => accepted,
                _ = closing.changed() => return,
            };
            let accepted = match accepted {
                Ok(Some(stream)) => stream,
                Ok(None) => return,
                // A plain HTTP client too slow to be answered is counted as plain HTTP only.
                Err(_) if plain => return,
                Err(_) => {
                    app.metrics.tls_refused(metrics::TlsRefusal::Timeout);
                    return;
                }
            };
            let h2 = accepted.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_connection(accepted, router, h2, peer, timeouts, closing).await;
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drop(closing_rx);
    closing_tx.closed().await;
    Ok(())
}

/// Once a shutdown began, how long an HTTP/1 connection with no request open may still take to
/// send the head it began.
const SHUTDOWN_HEAD_WAIT: Duration = Duration::from_secs(2);

/// At most this many connections on the metrics port at once: it is for scrapers.
const METRICS_CONNECTIONS: usize = 16;

/// A task stopped when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `GET /metrics` on the metrics port (`--metrics-port`), plain HTTP/1, with the API's
/// header and keep-alive timeouts and at most [`METRICS_CONNECTIONS`] connections; until
/// aborted.
async fn serve_metrics(listener: listen::Listener, app: Arc<App>) {
    let router = routes::metrics_router(app.clone());
    let timeouts = Timeouts::of(&app.config);
    // Never changed: the connections end with their requests, or with the process.
    let (_closing_tx, closing) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the metrics connection slots are never closed: this is a bug");
        let Some((stream, peer)) = listener.next("the metrics port").await else {
            continue;
        };
        tcp_keepalive(&stream, timeouts.head);
        let peer = routes::Peer {
            ip: peer.ip().to_canonical(),
            forwarded: false,
        };
        let (router, closing) = (router.clone(), closing.clone());
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, router, false, peer, timeouts, closing).await;
        });
    }
}

/// A connection's timers: `--header-read-timeout` and `--keep-alive-timeout`.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// The longest a request's head may take, from the connection's start or from the first
    /// byte after it was idle.
    head: Duration,
    /// The longest a connection may stay idle (no request open, nothing sent) after a request.
    keep_alive: Duration,
}

impl Timeouts {
    fn of(config: &ServerConfig) -> Self {
        Timeouts {
            head: config.limits.header_timeout,
            keep_alive: config.limits.keep_alive_timeout,
        }
    }
}

/// Serves one connection's requests, in HTTP/2 if `h2` (its preface or its ALPN said so) or
/// HTTP/1.1, until it closes, or until `closing` changes and its requests under way are done.
/// Its requests carry `peer`'s address; unless the peer is in `--forwarded-allow-ips`, their
/// forwarding headers are removed.
///
/// Idle time and a head's time are bounded apart, as nginx's `keepalive_timeout` and
/// `client_header_timeout` (and Go's `IdleTimeout` and `ReadHeaderTimeout`) are. A keep-alive
/// connection may idle between requests for `keep_alive` (longer than the load balancers'
/// own idle timeouts by default, so that they, not the server, close an idle connection: a
/// server that closes first races the balancer's next request on it, which the balancer then
/// answers 502); a request's head must come whole within `head` of the connection's start or
/// of its first byte (a connection that sends nothing, or a head byte by byte, is closed). In
/// HTTP/1 both are this function's ([`Activity::h1_expired`]; hyper's own header timer counts idle time
/// as head time); in HTTP/2 a connection with no request open for `keep_alive` gets a GOAWAY and
/// closes, as nginx's and envoy's idle timeouts do (clients open a new one when they need it).
/// An HTTP/2 connection is also pinged every half of `head`, and closed if an answer takes over
/// a third of it: a client that vanished (its host gone, no FIN) is noticed within a minute by
/// default, and its queued images are dropped as for a client that hung up, instead of after
/// TCP's retransmission timeout (about 15 minutes). (HTTP/1 has no ping: its connections get
/// TCP keep-alive instead, [`tcp_keepalive`].)
async fn serve_connection<I>(
    stream: I,
    router: Router,
    h2: bool,
    peer: routes::Peer,
    timeouts: Timeouts,
    mut closing: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let activity = Arc::new(Activity::default());
    let io = hyper_util::rt::TokioIo::new(Reads {
        inner: stream,
        activity: activity.clone(),
    });
    let service = hyper_util::service::TowerToHyperService::new(Tracked {
        router,
        activity: activity.clone(),
        peer,
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder = if h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(timeouts.head / 2)
        .keep_alive_timeout(timeouts.head / 3);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    if !h2 {
        let expired = activity.h1_expired(timeouts);
        tokio::pin!(expired);
        tokio::select! {
            _ = conn.as_mut() => return,
            () = &mut expired => return,
            _ = closing.changed() => conn.as_mut().graceful_shutdown(),
        }
        // Shutting down: a request open runs to its end; a connection with none open (hyper
        // closes an idle one at once) whose head is still on its way gets
        // [`SHUTDOWN_HEAD_WAIT`] for it, not the rest of its head's time: a stalled client must
        // not hold up the drain for the whole grace.
        tokio::select! {
            _ = conn.as_mut() => {}
            () = expired => {}
            () = activity.idle_for(SHUTDOWN_HEAD_WAIT) => {}
        }
        return;
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = closing.changed() => conn.as_mut().graceful_shutdown(),
        () = activity.idle_for(timeouts.keep_alive) => {
            tracing::debug!("closing an HTTP/2 connection idle for --keep-alive-timeout");
            conn.as_mut().graceful_shutdown();
            // HTTP/2's graceful close waits for the client to answer a ping; one that does not
            // (mute, or gone) would hold the connection until the keep-alive timeout. It is
            // dropped once idle that long again (a request it opened meanwhile runs to its end).
            tokio::select! {
                _ = conn.as_mut() => {}
                () = activity.idle_for(timeouts.head) => {}
            }
            return;
        }
    }
    let _ = conn.await;
}

/// A connection's transport, telling its [`Activity`] of the bytes read.
struct Reads<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Reads<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Reads<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The requests a connection has open: from the call of the service to the drop of the
/// response's body (its last byte sent, or the stream reset).
struct Activity {
    open: AtomicUsize,
    changed: Notify,
    /// Since when the connection has had no request open (its start, at first), and since when
    /// the head of its next request has been due (`None`: no byte of it since; a new
    /// connection's first head is due from its start).
    times: std::sync::Mutex<(Instant, Option<Instant>)>,
}

impl Default for Activity {
    fn default() -> Self {
        let start = Instant::now();
        Activity {
            open: AtomicUsize::new(0),
            changed: Notify::new(),
            times: std::sync::Mutex::new((start, Some(start))),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.times().1 = None;
        self.changed.notify_waiters();
        ActiveRequest(self.clone())
    }

    fn times(&self) -> std::sync::MutexGuard<'_, (Instant, Option<Instant>)> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes arrived: with no request open, a next request's head has begun.
    fn read(&self) {
        if self.open.load(Ordering::Acquire) == 0 {
            let mut times = self.times();
            if times.1.is_none() {
                times.1 = Some(Instant::now());
                drop(times);
                self.changed.notify_waiters();
            }
        }
    }

    /// Resolves once an HTTP/1 connection should be closed: a head not whole within
    /// `timeouts.head` of the connection's start (its first head) or of its first byte (a later
    /// one), or no request within `timeouts.keep_alive` of the last one's end. Never while a
    /// request is open.
    async fn h1_expired(&self, timeouts: Timeouts) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let deadline = match *self.times() {
                (_, Some(head_since)) => head_since + timeouts.head,
                (idle_since, None) => idle_since + timeouts.keep_alive,
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => return,
                _ = changed => {}
            }
        }
    }

    /// Resolves once no request has been open for `d`.
    async fn idle_for(&self, d: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(d) => return,
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// See [`Activity`].
struct ActiveRequest(Arc<Activity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let mut times = self.0.times();
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *times = (Instant::now(), None);
        }
        drop(times);
        self.0.changed.notify_waiters();
    }
}

/// The router, counting the connection's open requests in its [`Activity`].
#[derive(Clone)]
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
    peer: routes::Peer,
}

impl<B> tower::Service<axum::http::Request<B>> for Tracked
where
    B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;
        if !self.peer.forwarded {
            for name in routes::FORWARDING_HEADERS {
                req.headers_mut().remove(name);
            }
        }
        req.extensions_mut().insert(self.peer);
        let active = self.activity.begin();
        let response = self.router.clone().oneshot(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _open = &active;
                    frame
                }))
            }))
        })
    }
}

/// The TLS handshake of a connection to the HTTPS port; `None` if it closed first, failed, or
/// spoke plain HTTP (answered 400 `https_required`, so that a client configured with `http://`
/// is told what is wrong instead of seeing its connection cut; `plain` is set then).
async fn accept_tls(
    stream: tokio::net::TcpStream,
    tls: &tls::Tls,
    app: &App,
    plain: &mut bool,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    /// A TLS handshake record's first byte (RFC 8446 5.1, `ContentType.handshake`).
    const HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => {}
        _ => return None,
    }
    if first[0] != HANDSHAKE {
        *plain = true;
        app.metrics.tls_refused(metrics::TlsRefusal::PlainHttp);
        refuse_plain_http(stream).await;
        return None;
    }
    match tls.acceptor().accept(stream).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            // Scanners and clients that do not trust the certificate end here: not worth more
            // than a debug line each, and the counter.
            tracing::debug!(error = %e, "TLS handshake failed");
            app.metrics.tls_refused(metrics::TlsRefusal::Handshake);
            None
        }
    }
}

/// Answers a plain HTTP request sent to the HTTPS port: 400 in OpenAI's error shape, naming the
/// URL to use, then closes. The request's head is read first (up to 16 KiB) and what follows is
/// drained for a moment after the answer, so that closing does not reset the connection under
/// it.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while head.len() < 16 << 10 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()));
    let message = match host {
        Some(host) => format!(
            "This port speaks HTTPS: send the request to https://{host}{path} (the client was \
             given an http:// URL)."
        ),
        None => "This port speaks HTTPS: use an https:// URL (the client was given an http:// \
                 URL)."
            .to_string(),
    };
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": null,
        "code": "https_required",
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut drained = 0;
        while drained < 1 << 20 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Whether the connection speaks HTTP/2 (its first bytes are HTTP/2's preface) or HTTP/1, once
/// its first bytes tell (hyper's own timeouts start only after that); `None` if it closed
/// first. The bytes are only peeked at: hyper reads them again.
async fn protocol_known(stream: &tokio::net::TcpStream) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; PREFACE.len()];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) if buf[..n] != PREFACE[..n] => return Some(false),
            Ok(n) if n == PREFACE.len() => return Some(true),
            // A part of the preface: `peek` answers at once until more arrives.
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Turns on TCP keep-alive for an accepted connection: after `after / 2` without traffic the
/// kernel probes the peer every `after / 6` (at least a second each), and after 3 unanswered
/// probes the connection fails. A client whose host vanished while its HTTP/1 request waited
/// (HTTP/1 has no ping of its own) is then noticed within about `after`, and its queued images
/// are dropped as for a client that hung up, not after TCP's retransmission timeout (~15 min)
/// or never, if nothing is written to it meanwhile.
///
/// On Linux, `TCP_USER_TIMEOUT` bounds the other way a peer can hold a connection for ever:
/// one that is alive but reads nothing of its response (a client stuck in a deadlock or a
/// debugger, a gateway's leaked connection). Its receive window stays shut, the kernel's window
/// probes are answered, and the response (megabytes of base64 images) waited in memory for as
/// long as the process ran. Now, when what was written is neither taken nor acknowledged for
/// `after`, the connection fails, as nginx's `send_timeout` (60 s) does; a reader that is slow
/// but reading takes some of it every round trip and is not cut.
fn tcp_keepalive(stream: &tokio::net::TcpStream, after: Duration) {
    let at_least_a_second = |d: Duration| d.max(Duration::from_secs(1));
    let params = socket2::TcpKeepalive::new()
        .with_time(at_least_a_second(after / 2))
        .with_interval(at_least_a_second(after / 6))
        .with_retries(3);
    let socket = socket2::SockRef::from(stream);
    if let Err(e) = socket.set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "cannot turn on TCP keep-alive");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = socket.set_tcp_user_timeout(Some(at_least_a_second(after))) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Counts a connection in `turbine_http_connections` while it lives.
struct Connection(Arc<App>);

impl Connection {
    fn open(app: Arc<App>) -> Self {
        app.metrics.connections(1);
        Connection(app)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.metrics.connections(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_probe_their_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let probe = |stream: &tokio::net::TcpStream| {
            let s = socket2::SockRef::from(stream);
            (
                s.keepalive().unwrap(),
                s.tcp_keepalive_time().unwrap(),
                s.tcp_keepalive_interval().unwrap(),
                s.tcp_keepalive_retries().unwrap(),
            )
        };
        assert!(!probe(&stream).0);
        #[cfg(target_os = "linux")]
        let unread = |stream: &tokio::net::TcpStream| {
            socket2::SockRef::from(stream).tcp_user_timeout().unwrap()
        };
        #[cfg(target_os = "linux")]
        assert_eq!(unread(&stream), None);
        tcp_keepalive(&stream, Duration::from_secs(60));
        let secs = Duration::from_secs;
        assert_eq!(probe(&stream), (true, secs(30), secs(10), 3));
        #[cfg(target_os = "linux")]
        assert_eq!(unread(&stream), Some(secs(60)));
        // Short timeouts (the tests' 1 s) stay within what the kernel takes: whole seconds.
        tcp_keepalive(&stream, Duration::from_secs(1));
        assert_eq!(probe(&stream), (true, secs(1), secs(1), 3));
    }
}
