//! Prometheus metrics in the text exposition format (version 0.0.4), written by hand: a few
//! counters, gauges and histograms do not need a registry crate.

use std::collections::BTreeMap;
use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::model::pipeline::PromptCounts;

/// Stages whose durations are histogrammed (the `stage` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    QueueWait,
    TextEncode,
    Unet,
    VaeDecode,
    ImageEncode,
}

impl Stage {
    const ALL: [Stage; 5] = [
        Stage::QueueWait,
        Stage::TextEncode,
        Stage::Unet,
        Stage::VaeDecode,
        Stage::ImageEncode,
    ];

    fn label(self) -> &'static str {
        match self {
            Stage::QueueWait => "queue_wait",
            Stage::TextEncode => "text_encode",
            Stage::Unet => "unet",
            Stage::VaeDecode => "vae_decode",
            Stage::ImageEncode => "image_encode",
        }
    }
}

/// Why queued images were dropped before running (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    ClientDisconnected,
    Timeout,
    /// Another image of the same request failed, so the request already got its error.
    RequestFailed,
    /// The device that was to run it became unusable (the request got `device_failed`).
    DeviceFailed,
    /// The server's shutdown stopped waiting for it (the request got `shutting_down`).
    Shutdown,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::ClientDisconnected => "client_disconnected",
            DropReason::Timeout => "timeout",
            DropReason::RequestFailed => "request_failed",
            DropReason::DeviceFailed => "device_failed",
            DropReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Batch sizes are powers of two in practice; 1 and 2 separated so "batches > 1" is visible.
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// From sub-millisecond (encode of a tiny image, idle queue) to minutes (a large batch on CPU).
const SECONDS_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// A request's whole time: a refusal in a millisecond to a queued image's `--request-timeout`
/// (300 s by default).
const REQUEST_SECONDS_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    /// Requests by key label (`name=` in the keys file) and status; images made for each.
    key_requests: BTreeMap<(Arc<str>, u16), u64>,
    key_images: BTreeMap<Arc<str>, u64>,
    /// The adapters' names by slot (`None`: a free slot).
    adapter_slots: Vec<Option<String>>,
    /// Images made by each adapter ever served, by name, in the order they were first served.
    adapter_images: Vec<(String, u64)>,
    /// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, by action and outcome.
    adapter_updates: BTreeMap<(&'static str, &'static str), u64>,
    /// Request durations, to the response's last byte, by route.
    durations: BTreeMap<String, Histogram>,
    errors: BTreeMap<&'static str, u64>,
    dropped: BTreeMap<DropReason, u64>,
    batch_size: Histogram,
    stages: BTreeMap<Stage, Histogram>,
    /// Images per second of the whole server, smoothed (for `Retry-After`).
    throughput: Option<f64>,
}

/// All of the server's metrics.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    images_generated: AtomicU64,
    images_enqueued: AtomicU64,
    /// Previews sent as `partial_image` events.
    partial_images: AtomicU64,
    batches_failed: AtomicU64,
    batches_split: AtomicU64,
    /// Devices declared stalled (`--device-stall-timeout`).
    device_stalls: AtomicU64,
    /// Prompt embeddings by where they came from: encoded, repeated, cached.
    prompts: [AtomicU64; 3],
    queue_images: AtomicI64,
    in_flight: AtomicI64,
    /// Open HTTP connections.
    connections: AtomicI64,
    /// The most connections taken at once (`--max-connections`); 0 until the server sets it.
    connections_max: AtomicU64,
    /// Times the server stopped accepting because that many were open.
    connection_limit_waits: AtomicU64,
    prompts_truncated: AtomicU64,
    /// Bytes of request bodies and edit images held in memory (`--max-buffered-input-bytes`).
    buffered_input: AtomicI64,
    buffered_input_max: AtomicU64,
    /// Times a request waited for that budget.
    buffered_input_waits: AtomicU64,
    /// The images behind `url` responses: bytes, count, the byte bound, and evictions by
    /// reason (expired, fetched, unfetched).
    image_store: [AtomicU64; 3],
    image_store_evictions: [AtomicU64; 3],
    /// `--image-store-dir`: images written there, writes that failed, and URLs answered from it.
    image_dir: [AtomicU64; 3],
    /// Requests of the Batch API by outcome: completed, failed, not run.
    batch_api_requests: [AtomicU64; 3],
    /// Failed tries to write a Batch API result (a full disk): each is tried again.
    batch_api_write_errors: AtomicU64,
    batch_api_running: AtomicI64,
    /// Webhook delivery attempts by outcome: delivered, retried, abandoned.
    webhooks: [AtomicU64; 3],
    webhooks_pending: AtomicI64,
    /// Whether the server speaks HTTPS (the TLS series are rendered only then).
    tls: AtomicBool,
    /// The certificate in use's `notAfter`, Unix seconds; `i64::MIN`: unknown.
    tls_not_after: AtomicI64,
    /// Certificate reloads by outcome: loaded, failed.
    tls_reloads: [AtomicU64; 2],
    /// Connections refused before HTTP by reason: plain HTTP, failed handshake, timeout.
    tls_refused: [AtomicU64; 3],
    /// API keys in use.
    api_keys: AtomicU64,
    /// Whether keys come from a file (the reload series are rendered only then).
    keys_file: AtomicBool,
    /// Keys file reloads by outcome: loaded, failed.
    api_key_reloads: [AtomicU64; 2],
}

/// What became of reloading changed certificate files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsReload {
    Loaded,
    /// They did not load; the previous pair stays in use.
    Failed,
}

/// Why a connection to the HTTPS port ended before its first request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRefusal {
    /// It spoke plain HTTP (and was told to use https://).
    PlainHttp,
    /// The handshake failed: no common protocol or cipher, a client certificate missing or
    /// refused, a client that hung up.
    Handshake,
    /// The handshake did not finish within `--header-read-timeout`.
    Timeout,
}

/// What became of one attempt to deliver a webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    Delivered,
    /// Failed; another attempt follows.
    Retried,
    /// Failed, and the retries ran out.
    Abandoned,
}

/// What became of one request of a Batch API batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchRequestOutcome {
    Completed,
    Failed,
    /// Cancelled or expired before it ran.
    NotRun,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                key_requests: BTreeMap::new(),
                key_images: BTreeMap::new(),
                adapter_slots: Vec::new(),
                adapter_images: Vec::new(),
                adapter_updates: BTreeMap::new(),
                durations: BTreeMap::new(),
                errors: BTreeMap::new(),
                dropped: BTreeMap::new(),
                batch_size: Histogram::new(BATCH_BOUNDS),
                stages: Stage::ALL
                    .iter()
                    .map(|s| (*s, Histogram::new(SECONDS_BOUNDS)))
                    .collect(),
                throughput: None,
            }),
            images_generated: AtomicU64::new(0),
            images_enqueued: AtomicU64::new(0),
            partial_images: AtomicU64::new(0),
            batches_failed: AtomicU64::new(0),
            batches_split: AtomicU64::new(0),
            device_stalls: AtomicU64::new(0),
            prompts: Default::default(),
            queue_images: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            connections: AtomicI64::new(0),
            connections_max: AtomicU64::new(0),
            connection_limit_waits: AtomicU64::new(0),
            prompts_truncated: AtomicU64::new(0),
            buffered_input: AtomicI64::new(0),
            buffered_input_max: AtomicU64::new(0),
            buffered_input_waits: AtomicU64::new(0),
            image_store: Default::default(),
            image_store_evictions: Default::default(),
            image_dir: Default::default(),
            batch_api_requests: Default::default(),
            batch_api_write_errors: AtomicU64::new(0),
            batch_api_running: AtomicI64::new(0),
            webhooks: Default::default(),
            webhooks_pending: AtomicI64::new(0),
            tls: AtomicBool::new(false),
            tls_not_after: AtomicI64::new(i64::MIN),
            tls_reloads: Default::default(),
            tls_refused: Default::default(),
            api_keys: AtomicU64::new(0),
            keys_file: AtomicBool::new(false),
            api_key_reloads: Default::default(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: a panic elsewhere while holding the lock leaves nothing inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self, route: &str, status: u16) {
        *self
            .inner()
            .requests
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// A request of the key labelled `key` answered with `status`.
    pub fn key_request(&self, key: &Arc<str>, status: u16) {
        *self
            .inner()
            .key_requests
            .entry((key.clone(), status))
            .or_default() += 1;
    }

    /// `n` images made for the key labelled `key` (generations, edits, the Batch API's).
    pub fn key_images(&self, key: &Arc<str>, n: u64) {
        *self.inner().key_images.entry(key.clone()).or_default() += n;
    }

    /// The `--lora-modules` adapters' names, in slot order (counted from 0 each).
    pub fn set_adapters(&self, names: &[String]) {
        let mut inner = self.inner();
        inner.adapter_slots = names.iter().cloned().map(Some).collect();
        inner.adapter_images = names.iter().map(|n| (n.clone(), 0)).collect();
    }

    /// The adapter `name` is served from `slot` (a name served before goes on counting).
    pub fn adapter_loaded(&self, slot: u16, name: &str) {
        let mut inner = self.inner();
        let i = usize::from(slot);
        if inner.adapter_slots.len() <= i {
            inner.adapter_slots.resize(i + 1, None);
        }
        inner.adapter_slots[i] = Some(name.to_string());
        if !inner.adapter_images.iter().any(|(n, _)| n == name) {
            inner.adapter_images.push((name.to_string(), 0));
        }
    }

    /// `slot` is free: its adapter unloaded and its last images made.
    pub fn adapter_slot_freed(&self, slot: u16) {
        if let Some(s) = self.inner().adapter_slots.get_mut(usize::from(slot)) {
            *s = None;
        }
    }

    /// One `action` (`load`, `unload`) on the adapters, with its `outcome` (`ok`, `failed`).
    pub fn adapter_update(&self, action: &'static str, outcome: &'static str) {
        *self
            .inner()
            .adapter_updates
            .entry((action, outcome))
            .or_default() += 1;
    }

    /// `n` images made by the adapter in slot `adapter` (`None`: the model itself, not
    /// counted here).
    pub fn adapter_images(&self, adapter: Option<u16>, n: usize) {
        let Some(slot) = adapter else { return };
        let mut inner = self.inner();
        let Some(Some(name)) = inner.adapter_slots.get(usize::from(slot)).cloned() else {
            return;
        };
        if let Some((_, count)) = inner.adapter_images.iter_mut().find(|(n, _)| *n == name) {
            *count += n as u64;
        }
    }

    /// A request's time from its arrival to the end of its response.
    pub fn request_duration(&self, route: &str, d: Duration) {
        let mut inner = self.inner();
        if let Some(h) = inner.durations.get_mut(route) {
            h.observe(d.as_secs_f64());
            return;
        }
        let mut h = Histogram::new(REQUEST_SECONDS_BOUNDS);
        h.observe(d.as_secs_f64());
        inner.durations.insert(route.to_string(), h);
    }

    pub fn error(&self, kind: &'static str) {
        *self.inner().errors.entry(kind).or_default() += 1;
    }

    pub fn dropped(&self, reason: DropReason, images: usize) {
        if images > 0 {
            *self.inner().dropped.entry(reason).or_default() += images as u64;
        }
    }

    pub fn stage(&self, stage: Stage, d: Duration) {
        if let Some(h) = self.inner().stages.get_mut(&stage) {
            h.observe(d.as_secs_f64());
        }
    }

    /// A finished batch: its size, and the rate it ran at for `Retry-After` estimates.
    pub fn batch_done(&self, images: usize, elapsed: Duration, workers: usize) {
        self.images_generated
            .fetch_add(images as u64, Ordering::Relaxed);
        let mut inner = self.inner();
        inner.batch_size.observe(images as f64);
        self.update_throughput(&mut inner, images, elapsed, workers);
    }

    /// A warm-up batch: calibrates the throughput estimate without counting as served work.
    pub fn calibrate(&self, images: usize, elapsed: Duration, workers: usize) {
        let mut inner = self.inner();
        self.update_throughput(&mut inner, images, elapsed, workers);
    }

    fn update_throughput(
        &self,
        inner: &mut Inner,
        images: usize,
        elapsed: Duration,
        workers: usize,
    ) {
        let secs = elapsed.as_secs_f64();
        if images == 0 || secs <= 0.0 {
            return;
        }
        // Each worker runs its batches one at a time; all workers together run `workers`x.
        let rate = images as f64 / secs * workers.max(1) as f64;
        // Weight 0.2: follows a change of load within ~5 batches, smooths single outliers.
        inner.throughput = Some(match inner.throughput {
            Some(old) => 0.8 * old + 0.2 * rate,
            None => rate,
        });
    }

    pub fn enqueued(&self, images: usize) {
        self.images_enqueued
            .fetch_add(images as u64, Ordering::Relaxed);
    }

    /// A preview went out as a stream's `partial_image` event.
    pub fn partial_image(&self) {
        self.partial_images.fetch_add(1, Ordering::Relaxed);
    }

    pub fn batch_failed(&self) {
        self.batches_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch that ran out of device memory and is run again in smaller parts.
    pub fn batch_split(&self) {
        self.batches_split.fetch_add(1, Ordering::Relaxed);
    }

    /// A device whose call into the model ran past its bound (`--device-stall-timeout`).
    pub fn device_stalled(&self) {
        self.device_stalls.fetch_add(1, Ordering::Relaxed);
    }

    /// Where a finished batch's prompt embeddings came from.
    pub fn prompts(&self, counts: PromptCounts) {
        for (counter, n) in
            self.prompts
                .iter()
                .zip([counts.encoded, counts.repeated, counts.cached])
        {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub fn throughput(&self) -> Option<f64> {
        self.inner().throughput
    }

    pub fn set_queue_images(&self, n: usize) {
        self.queue_images.store(n as i64, Ordering::Relaxed);
    }

    pub fn batch_api_request(&self, outcome: BatchRequestOutcome) {
        self.batch_api_requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn batch_api_write_error(&self) {
        self.batch_api_write_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhook(&self, outcome: WebhookOutcome) {
        self.webhooks[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A webhook delivery started (+1) or was done with (-1).
    pub fn webhooks_pending(&self, delta: i64) {
        self.webhooks_pending.fetch_add(delta, Ordering::Relaxed);
    }

    /// A Batch API batch started (+1) or ended (-1).
    pub fn batch_api_running(&self, delta: i64) {
        self.batch_api_running.fetch_add(delta, Ordering::Relaxed);
    }

    /// A certificate was loaded (at start or reloaded): the server speaks HTTPS.
    pub fn tls_not_after(&self, not_after: Option<i64>) {
        self.tls.store(true, Ordering::Relaxed);
        self.tls_not_after
            .store(not_after.unwrap_or(i64::MIN), Ordering::Relaxed);
    }

    /// How many API keys are in use.
    pub fn api_keys(&self, n: usize) {
        self.api_keys.store(n as u64, Ordering::Relaxed);
    }

    /// Keys come from `--api-keys-file`, which is read again when it changes.
    pub fn keys_file(&self) {
        self.keys_file.store(true, Ordering::Relaxed);
    }

    /// The keys file was read again after a change: `loaded` (its keys are in use) or not.
    pub fn api_key_reload(&self, loaded: bool) {
        self.api_key_reloads[usize::from(!loaded)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_reload(&self, outcome: TlsReload) {
        self.tls_reloads[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_refused(&self, why: TlsRefusal) {
        self.tls_refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection opened (+1) or closed (-1).
    pub fn connections(&self, delta: i64) {
        self.connections.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn set_connections_max(&self, n: usize) {
        self.connections_max.store(n as u64, Ordering::Relaxed);
    }

    /// The server stopped accepting: `--max-connections` are open.
    /// A prompt longer than CLIP reads: its rest was cut off.
    pub fn prompt_truncated(&self) {
        self.prompts_truncated.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_limit_wait(&self) {
        self.connection_limit_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes of request inputs taken (positive) or given back (negative).
    pub fn buffered_input(&self, delta: i64) {
        self.buffered_input.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn set_buffered_input_max(&self, bytes: u64) {
        self.buffered_input_max.store(bytes, Ordering::Relaxed);
    }

    /// A request waited for the input budget.
    /// The URL image store as it is now.
    pub fn image_store(&self, store: &crate::server::store::ImageStore) {
        let e = store.evictions();
        for (gauge, v) in
            self.image_store
                .iter()
                .zip([store.bytes(), store.len(), store.max_bytes()])
        {
            gauge.store(v as u64, Ordering::Relaxed);
        }
        for (counter, v) in
            self.image_store_evictions
                .iter()
                .zip([e.expired, e.fetched, e.unfetched])
        {
            counter.store(v, Ordering::Relaxed);
        }
    }

    /// An image written to `--image-store-dir` (`ok`), or a write there that failed.
    pub fn image_dir_write(&self, ok: bool) {
        self.image_dir[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// A URL answered from `--image-store-dir` (the image was not in this server's memory).
    pub fn image_dir_read(&self) {
        self.image_dir[2].fetch_add(1, Ordering::Relaxed);
    }

    pub fn buffered_input_wait(&self) {
        self.buffered_input_waits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let inner = self.inner();
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        // One series without labels.
        let single = |out: &mut String, name: &str, kind: &str, help: &str, value: &dyn Display| {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        // One series per value of `label`.
        let labelled = |out: &mut String,
                        name: &str,
                        help: &str,
                        label: &str,
                        series: &[(&str, &AtomicU64)]| {
            header(out, name, "counter", help);
            for (value, n) in series {
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
            }
        };

        header(
            &mut out,
            "turbine_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "turbine_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        header(
            &mut out,
            "turbine_key_requests_total",
            "counter",
            "Requests by API key (its name in the keys file, or key- and a fingerprint) and status.",
        );
        for ((key, status), n) in &inner.key_requests {
            let _ = writeln!(
                out,
                "turbine_key_requests_total{{key=\"{}\",status=\"{status}\"}} {n}",
                escape(key)
            );
        }
        header(
            &mut out,
            "turbine_key_images_total",
            "counter",
            "Images made for each API key: generations, edits and the Batch API's.",
        );
        for (key, n) in &inner.key_images {
            let _ = writeln!(
                out,
                "turbine_key_images_total{{key=\"{}\"}} {n}",
                escape(key)
            );
        }
        header(
            &mut out,
            "turbine_adapter_images_total",
            "counter",
            "Images made by each LoRA adapter (--lora-modules, or loaded while serving), by the \
             model name requests give it.",
        );
        for (name, n) in &inner.adapter_images {
            let _ = writeln!(
                out,
                "turbine_adapter_images_total{{model=\"{}\"}} {n}",
                escape(name)
            );
        }
        header(
            &mut out,
            "turbine_adapter_updates_total",
            "counter",
            "POST /v1/load_lora_adapter (action=load) and /v1/unload_lora_adapter (action=unload) \
             by outcome (ok, failed).",
        );
        for ((action, outcome), n) in &inner.adapter_updates {
            let _ = writeln!(
                out,
                "turbine_adapter_updates_total{{action=\"{action}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        header(
            &mut out,
            "turbine_http_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to the last byte of its response (a stream's last event; \
             for a client that left, until it left), by route.",
        );
        for (route, h) in &inner.durations {
            h.render(
                &mut out,
                "turbine_http_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        single(
            &mut out,
            "turbine_http_connections",
            "gauge",
            "Open HTTP connections (idle keep-alive ones too).",
            &self.connections.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_http_connections_max",
            "gauge",
            "The most HTTP connections open at once (--max-connections); more wait to be \
             accepted.",
            &self.connections_max.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_prompts_truncated_total",
            "counter",
            "Prompts longer than CLIP reads (75 tokens): the rest was cut off, and the images' revised_prompt is the part read.",
            &self.prompts_truncated.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_http_connection_limit_waits_total",
            "counter",
            "Times the server stopped accepting connections because --max-connections were open.",
            &self.connection_limit_waits.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_buffered_input_bytes",
            "gauge",
            "Bytes of request bodies and edit images held in memory.",
            &self.buffered_input.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_buffered_input_max_bytes",
            "gauge",
            "The most bytes of request bodies and edit images held in memory at once \
             (--max-buffered-input-bytes); more wait.",
            &self.buffered_input_max.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_buffered_input_waits_total",
            "counter",
            "Times a request waited for --max-buffered-input-bytes before its body was read.",
            &self.buffered_input_waits.load(Ordering::Relaxed),
        );
        for (gauge, (name, help)) in self.image_store.iter().zip([
            (
                "turbine_image_store_bytes",
                "Bytes of images kept for url responses.",
            ),
            (
                "turbine_image_store_images",
                "Images kept for url responses.",
            ),
            (
                "turbine_image_store_max_bytes",
                "The most bytes of images kept for url responses (--image-store-max-bytes).",
            ),
        ]) {
            single(
                &mut out,
                name,
                "gauge",
                help,
                &gauge.load(Ordering::Relaxed),
            );
        }
        labelled(
            &mut out,
            "turbine_image_store_evictions_total",
            "Images behind url responses that left the store: their time was up (expired), or \
             room was needed for newer ones after they were fetched (fetched) or before anyone \
             fetched them (unfetched: URLs that answered 404 within --image-url-ttl-secs).",
            "reason",
            &[
                ("expired", &self.image_store_evictions[0]),
                ("fetched", &self.image_store_evictions[1]),
                ("unfetched", &self.image_store_evictions[2]),
            ],
        );
        let (exports, failed) = crate::telemetry::exports();
        labelled(
            &mut out,
            "turbine_trace_exports_total",
            "Batches of spans sent to --otlp-endpoint, by outcome (a failed one's spans are lost).",
            "outcome",
            &[("ok", exports), ("failed", failed)],
        );
        single(
            &mut out,
            "turbine_log_lines_dropped_total",
            "counter",
            "Log lines dropped because stderr did not take them (--log-buffer-bytes were waiting).",
            &crate::logging::dropped(),
        );
        single(
            &mut out,
            "turbine_http_requests_in_flight",
            "gauge",
            "Image generation requests being served.",
            &self.in_flight.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_images_generated_total",
            "counter",
            "Images generated for requests.",
            &self.images_generated.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_images_enqueued_total",
            "counter",
            "Images accepted into the queue.",
            &self.images_enqueued.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_partial_images_total",
            "counter",
            "Previews of images being denoised sent to streams (partial_images).",
            &self.partial_images.load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "turbine_images_dropped_total",
            "counter",
            "Queued images dropped before running, by reason.",
        );
        for (reason, n) in &inner.dropped {
            let _ = writeln!(
                out,
                "turbine_images_dropped_total{{reason=\"{}\"}} {n}",
                reason.label()
            );
        }
        single(
            &mut out,
            "turbine_queue_images",
            "gauge",
            "Images waiting in the queue.",
            &self.queue_images.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_batches_failed_total",
            "counter",
            "Batches whose generation failed or panicked.",
            &self.batches_failed.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_batches_split_total",
            "counter",
            "Batches that ran out of device memory and were run again in smaller parts.",
            &self.batches_split.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_device_stalls_total",
            "counter",
            "Devices declared stalled: a call into the model ran past its bound \
             (--device-stall-timeout), and the device took no more batches.",
            &self.device_stalls.load(Ordering::Relaxed),
        );
        let [encoded, repeated, cached] = &self.prompts;
        labelled(
            &mut out,
            "turbine_prompt_embeddings_total",
            "Prompt embeddings of finished batches (negative prompts included) by source: run \
             through the text encoders, repeated from an earlier image of the batch, or kept \
             from an earlier batch (--prompt-cache-entries).",
            "source",
            &[
                ("encoded", encoded),
                ("repeated", repeated),
                ("cached", cached),
            ],
        );
        let [completed, failed, not_run] = &self.batch_api_requests;
        labelled(
            &mut out,
            "turbine_batch_api_requests_total",
            "Requests of Batch API batches (/v1/batches) by outcome: completed, failed, or not \
             run (the batch was cancelled or expired first).",
            "outcome",
            &[
                ("completed", completed),
                ("failed", failed),
                ("not_run", not_run),
            ],
        );
        single(
            &mut out,
            "turbine_batch_api_write_errors_total",
            "counter",
            "Failed tries to write a Batch API result to its output or error file (a full disk): \
             the batch pauses and tries again until it can.",
            &self.batch_api_write_errors.load(Ordering::Relaxed),
        );
        single(
            &mut out,
            "turbine_batch_api_running",
            "gauge",
            "Batch API batches validating or running.",
            &self.batch_api_running.load(Ordering::Relaxed),
        );
        let [written, failed, read] = &self.image_dir;
        labelled(
            &mut out,
            "turbine_image_dir_writes_total",
            "Images behind url responses written to --image-store-dir, by outcome (a failed one \
             is answered by its own server only).",
            "outcome",
            &[("written", written), ("failed", failed)],
        );
        single(
            &mut out,
            "turbine_image_dir_reads_total",
            "counter",
            "URLs answered from --image-store-dir: images this server did not hold (another \
             server's, an earlier process's, or evicted from memory).",
            &read.load(Ordering::Relaxed),
        );
        let [delivered, retried, abandoned] = &self.webhooks;
        labelled(
            &mut out,
            "turbine_webhook_deliveries_total",
            "Webhook delivery attempts (batch events) by outcome: delivered, failed and retried \
             later, failed with the retries run out.",
            "outcome",
            &[
                ("delivered", delivered),
                ("retried", retried),
                ("abandoned", abandoned),
            ],
        );
        single(
            &mut out,
            "turbine_webhook_deliveries_pending",
            "gauge",
            "Webhook deliveries under way: not yet delivered, given up or dropped.",
            &self.webhooks_pending.load(Ordering::Relaxed),
        );
        let keys = self.api_keys.load(Ordering::Relaxed);
        if keys > 0 {
            single(
                &mut out,
                "turbine_api_keys",
                "gauge",
                "API keys in use (--api-key and --api-keys-file).",
                &keys,
            );
        }
        if self.keys_file.load(Ordering::Relaxed) {
            let [loaded, failed] = &self.api_key_reloads;
            labelled(
                &mut out,
                "turbine_api_key_reloads_total",
                "The keys file read again after a change or on SIGHUP, by outcome: loaded (its \
                 keys are in use) or failed (the keys in use stay).",
                "outcome",
                &[("loaded", loaded), ("failed", failed)],
            );
        }
        if self.tls.load(Ordering::Relaxed) {
            let not_after = self.tls_not_after.load(Ordering::Relaxed);
            if not_after != i64::MIN {
                single(
                    &mut out,
                    "turbine_tls_certificate_expiry_timestamp_seconds",
                    "gauge",
                    "When the certificate in use expires (its notAfter), Unix seconds.",
                    &not_after,
                );
            }
            let [loaded, failed] = &self.tls_reloads;
            labelled(
                &mut out,
                "turbine_tls_reloads_total",
                "Changed certificate files read again, by outcome: loaded (new connections use \
                 them) or failed (the previous pair stays in use).",
                "outcome",
                &[("loaded", loaded), ("failed", failed)],
            );
            let [plain_http, handshake, timeout] = &self.tls_refused;
            labelled(
                &mut out,
                "turbine_tls_connections_refused_total",
                "Connections to the HTTPS port that ended before a request, by reason: plain \
                 HTTP, a failed handshake, or no handshake within --header-read-timeout.",
                "reason",
                &[
                    ("plain_http", plain_http),
                    ("handshake", handshake),
                    ("timeout", timeout),
                ],
            );
        }
        header(
            &mut out,
            "turbine_batch_size",
            "histogram",
            "Images per batch run on a device.",
        );
        inner.batch_size.render(&mut out, "turbine_batch_size", "");
        header(&mut out, "turbine_stage_duration_seconds", "histogram", "Duration of each stage: queue_wait and image_encode per image, the model stages per batch.");
        for (stage, h) in &inner.stages {
            h.render(
                &mut out,
                "turbine_stage_duration_seconds",
                &format!("stage=\"{}\"", stage.label()),
            );
        }
        header(
            &mut out,
            "turbine_errors_total",
            "counter",
            "Error responses by type.",
        );
        for (kind, n) in &inner.errors {
            let _ = writeln!(out, "turbine_errors_total{{type=\"{kind}\"}} {n}");
        }
        header(
            &mut out,
            "turbine_throughput_images_per_second",
            "gauge",
            "Smoothed images/s of all devices (drives Retry-After).",
        );
        let _ = writeln!(
            out,
            "turbine_throughput_images_per_second {}",
            inner.throughput.unwrap_or(0.0)
        );
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_gauges_and_cumulative_histograms() {
        let m = Metrics::new();
        m.request("/v1/images/generations", 200);
        m.request("/v1/images/generations", 200);
        m.request("/health", 503);
        let team: Arc<str> = "team-a".into();
        m.key_request(&team, 200);
        m.key_request(&team, 200);
        m.key_request(&"key-0a1b2c3d".into(), 429);
        m.key_images(&team, 3);
        m.key_images(&team, 1);
        m.error("queue_full");
        m.dropped(DropReason::ClientDisconnected, 3);
        m.set_queue_images(5);
        m.batch_done(1, Duration::from_secs(1), 1);
        m.batch_done(4, Duration::from_secs(1), 1);
        m.stage(Stage::Unet, Duration::from_millis(30));
        m.request_duration("/v1/images/generations", Duration::from_millis(400));
        m.request_duration("/v1/images/generations", Duration::from_secs(400));
        for _ in 0..2 {
            m.prompts(PromptCounts {
                encoded: 3,
                repeated: 5,
                cached: 1,
            });
        }
        let text = m.render();
        for line in [
            "turbine_http_requests_total{route=\"/v1/images/generations\",status=\"200\"} 2",
            "turbine_http_requests_total{route=\"/health\",status=\"503\"} 1",
            "turbine_key_requests_total{key=\"team-a\",status=\"200\"} 2",
            "turbine_key_requests_total{key=\"key-0a1b2c3d\",status=\"429\"} 1",
            "turbine_key_images_total{key=\"team-a\"} 4",
            "turbine_errors_total{type=\"queue_full\"} 1",
            "turbine_images_dropped_total{reason=\"client_disconnected\"} 3",
            "turbine_queue_images 5",
            "turbine_images_generated_total 5",
            "turbine_images_enqueued_total 0",
            "turbine_batch_size_bucket{le=\"1\"} 1",
            "turbine_batch_size_bucket{le=\"2\"} 1",
            "turbine_batch_size_bucket{le=\"4\"} 2",
            "turbine_batch_size_bucket{le=\"+Inf\"} 2",
            "turbine_batch_size_sum 5",
            "turbine_batch_size_count 2",
            "turbine_stage_duration_seconds_bucket{stage=\"unet\",le=\"0.025\"} 0",
            "turbine_stage_duration_seconds_bucket{stage=\"unet\",le=\"0.05\"} 1",
            "turbine_stage_duration_seconds_count{stage=\"unet\"} 1",
            "# TYPE turbine_batch_size histogram",
            "# TYPE turbine_http_request_duration_seconds histogram",
            "turbine_http_request_duration_seconds_bucket{route=\"/v1/images/generations\",le=\"0.25\"} 0",
            "turbine_http_request_duration_seconds_bucket{route=\"/v1/images/generations\",le=\"0.5\"} 1",
            "turbine_http_request_duration_seconds_bucket{route=\"/v1/images/generations\",le=\"300\"} 1",
            "turbine_http_request_duration_seconds_bucket{route=\"/v1/images/generations\",le=\"+Inf\"} 2",
            "turbine_http_request_duration_seconds_count{route=\"/v1/images/generations\"} 2",
            "turbine_prompt_embeddings_total{source=\"encoded\"} 6",
            "turbine_prompt_embeddings_total{source=\"repeated\"} 10",
            "turbine_prompt_embeddings_total{source=\"cached\"} 2",
            "# TYPE turbine_prompt_embeddings_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn throughput_is_smoothed_and_scaled_by_workers() {
        let m = Metrics::new();
        assert_eq!(m.throughput(), None);
        m.calibrate(4, Duration::from_secs(2), 2);
        assert_eq!(m.throughput(), Some(4.0));
        m.batch_done(8, Duration::from_secs(1), 2);
        assert!((m.throughput().unwrap() - (0.8 * 4.0 + 0.2 * 16.0)).abs() < 1e-9);
    }
}
