//! The server's configuration as one value (built from the CLI by `turbine serve`, or directly
//! by tests), with the defaults of SDXL-Turbo and of OpenAI's API.

use std::time::Duration;

use anyhow::{bail, ensure};

pub use super::adapters::{AdapterLease, Adapters};
use super::api::DefaultResponseFormat;
use super::auth::ApiKey;
use super::worker::WarmupSizes;

/// `--max-image-pixels`' default: 1536x1536, gpt-image-1's largest sizes and DALL·E 3's
/// 1792x1024 fit under it.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 1536 * 1536;

/// The longest adapter name (`--lora-modules`, `lora_name`): a model name clients send and
/// `/v1/models` lists.
pub const MAX_ADAPTER_NAME_BYTES: usize = 256;

/// The most images one request may ask for (OpenAI's bound for `n`).
pub const MAX_N: u32 = 10;

/// The model names that mean the served model by default: OpenAI's image models, so clients
/// written for OpenAI work unchanged. The GPT image models as prefixes, since OpenAI adds
/// versions and dated snapshots (`gpt-image-2.5-flare-2026-09-08`) and retires older ones
/// (the official SDK's list in November 2026: `gpt-image-1`, `-1-mini`, `-1.5`, `-2`, `-2.5-*`,
/// `-2.6-*`, `chatgpt-image-latest`, `dall-e-2`, `dall-e-3`).
pub const DEFAULT_MODEL_ALIASES: &[&str] =
    &["gpt-image-*", "chatgpt-image-*", "dall-e-2", "dall-e-3"];

/// The served model's identity.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    /// What `GET /v1/models` lists and what `model` in a request normally names.
    pub id: String,
    /// Other names that mean the served model, so OpenAI-shaped clients work unchanged. One
    /// ending in `*` is a prefix: it matches every name that starts with what comes before the
    /// `*` (`*` alone: any name).
    pub aliases: Vec<String>,
    /// The LoRA adapters served next to it (`--lora-modules`, and those loaded while serving),
    /// shared by every clone.
    pub adapters: Adapters,
}

impl ModelIdentity {
    /// What `model` selects: `Some(None)` the model itself, `Some(Some(a))` the adapter `a`
    /// holds, `None` nothing served here. An adapter's exact name wins over an alias's prefix.
    pub fn resolve(&self, name: &str) -> Option<Option<AdapterLease>> {
        if name == self.id {
            return Some(None);
        }
        if let Some(lease) = self.adapters.resolve(name) {
            return Some(Some(lease));
        }
        self.matches(name).then_some(None)
    }

    /// Why `name` cannot name an adapter (`what`: the flag or field that gave it), if it
    /// cannot: it must not be the model's own name or an exact alias, nor read as a prefix.
    pub fn adapter_name_problem(&self, name: &str, what: &str) -> Option<String> {
        if name.is_empty()
            || name.len() > MAX_ADAPTER_NAME_BYTES
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Some(format!(
                "{what} {:?}: a name must be 1 to {MAX_ADAPTER_NAME_BYTES} bytes, without \
                 spaces",
                super::validate::echoed(name)
            ));
        }
        if name.ends_with('*') {
            return Some(format!(
                "{what} {name}: a name ending in `*` would read as a prefix; name it plainly"
            ));
        }
        if name == self.id || self.aliases.iter().any(|a| a == name) {
            return Some(format!(
                "{what} {name}: the name is already the served model's (--served-model-name, \
                 --model-alias); give the adapter its own"
            ));
        }
        None
    }

    pub fn matches(&self, name: &str) -> bool {
        self.id == name
            || self.aliases.iter().any(|a| match a.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => a == name,
            })
    }

    /// The names `GET /v1/models` lists: the id, then the aliases that are names rather than
    /// prefixes.
    pub fn listed(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(
            self.aliases
                .iter()
                .filter(|a| !a.ends_with('*'))
                .map(String::as_str),
        )
    }
}

/// Bounds a request is validated against.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Smallest and largest image side in pixels (multiples of 8: the VAE's scale factor).
    pub min_side: u32,
    pub max_side: u32,
    /// Most pixels (width x height) an image may have: what bounds an image's memory, while
    /// the side bounds allow DALL·E 3's 1792x1024 and its like.
    pub max_pixels: u64,
    /// What `size: "auto"` (or no size) means.
    pub default_size: (u32, u32),
    pub max_prompt_chars: usize,
    pub max_steps: u32,
    pub max_guidance_scale: f64,
    /// The steps of a request that names neither `steps` nor a `quality` (or `quality:
    /// "auto"`): 1, as SDXL-Turbo runs; a fine-tune made for more sets more.
    pub default_steps: u32,
    /// The `guidance_scale` of a request that gives none: 0, as SDXL-Turbo runs.
    pub default_guidance_scale: f64,
    /// Request bodies above this are refused with 413 before parsing.
    pub max_body_bytes: usize,
    /// The same for `POST /v1/images/edits`' form uploads (the input image and the fields).
    pub max_upload_bytes: usize,
    /// The longest a request's body may go without a byte arriving (408 after).
    pub body_timeout: Duration,
    /// The longest a connection may take to send a request's head, from its start or from the
    /// head's first byte (closed after).
    pub header_timeout: Duration,
    /// The longest a keep-alive connection may stay idle between requests (closed after).
    pub keep_alive_timeout: Duration,
    pub default_response_format: DefaultResponseFormat,
}

impl RequestLimits {
    /// An error naming `option` unless a request could ask for `size` (width, height): sides
    /// multiples of 8 within the side bounds, pixels within the pixel bound.
    fn check_size(&self, option: &str, (w, h): (u32, u32)) -> anyhow::Result<()> {
        ensure!(
            u64::from(w) * u64::from(h) <= self.max_pixels,
            "{option} {w}x{h} has more than --max-image-pixels ({}) pixels",
            self.max_pixels
        );
        for side in [w, h] {
            ensure!(
                side.is_multiple_of(8) && side >= self.min_side && side <= self.max_side,
                "{option} {w}x{h} must have sides that are multiples of 8 between {} and {}",
                self.min_side,
                self.max_side
            );
        }
        Ok(())
    }
}

/// The batcher's knobs.
#[derive(Debug, Clone)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    pub max_queued_images: usize,
    /// Virtual-time gap between priority classes (see `queue`).
    pub priority_aging: Duration,
    /// A request not finished by then gets 503 and its unstarted images leave the queue.
    pub request_timeout: Duration,
}

/// The store behind `response_format: "url"`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub ttl: Duration,
    pub max_bytes: usize,
    /// `--image-store-dir`: where the images are written as well, for every server using it
    /// to answer their URLs ([`super::image_dir`]).
    pub dir: Option<std::path::PathBuf>,
    /// `--image-store-dir-max-bytes`: the most this server keeps written there.
    pub dir_max_bytes: u64,
}

/// OpenAI's Files and Batch APIs (`/v1/files`, `/v1/batches`).
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Where files and batches are kept across restarts (`--files-dir`). `None`: a directory
    /// of this process's own in the system's temporary directory, removed at exit.
    pub dir: Option<std::path::PathBuf>,
    /// The largest upload (OpenAI's limit for a batch input file: 200 MB).
    pub max_file_bytes: u64,
    /// Uploads that would leave less free space than this on the files directory's disk are
    /// refused with 507 (`--min-free-disk-bytes`; 0: no check).
    pub min_free_bytes: u64,
    /// The most requests (lines) in one batch (OpenAI's: 50,000).
    pub max_batch_requests: usize,
    /// How long a batch may run before it expires (`completion_window: "24h"`).
    pub completion_window: Duration,
    /// How long a batch that ended stays listed (`--batch-retention-days`).
    pub batch_retention: Duration,
    /// When webhook deliveries (batch events) are retried.
    pub webhook_retry: super::webhooks::RetryPolicy,
    /// CA certificates (PEM) webhook deliveries trust besides the public ones
    /// (`--webhook-ca-file`).
    pub webhook_ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `--api-key`; with no `keys_file` either, the API is open.
    pub keys: Vec<ApiKey>,
    /// `--api-keys-file`: more keys, read again when it changes (checked every
    /// `keys_reload_interval`) and on SIGHUP.
    pub keys_file: Option<std::path::PathBuf>,
    pub keys_reload_interval: Duration,
    /// A header whose value (`high|normal|low`) sets a request's priority; only for
    /// deployments where a trusted proxy sets it.
    pub priority_header: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys: Vec::new(),
            keys_file: None,
            keys_reload_interval: Duration::from_secs(10),
            priority_header: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model: ModelIdentity,
    pub limits: RequestLimits,
    pub batching: BatchingConfig,
    pub store: StoreConfig,
    pub files: FilesConfig,
    pub auth: AuthConfig,
    /// Base of the URLs returned for `response_format: "url"` (e.g. `https://img.example.com`);
    /// `None`: `http://` (`https://` with `tls`) + the request's `Host` header, or what a
    /// proxy in `forwarded_allow` says in its forwarding headers.
    pub public_url: Option<String>,
    /// `--metrics-port`: `/metrics` is served there (plain HTTP, no key), and not on the API's
    /// port. `None`: on the API's port.
    pub metrics_port: Option<u16>,
    /// The peers whose `Forwarded` / `X-Forwarded-For`, `-Proto`, `-Host` and `-Prefix` headers
    /// are believed (`--forwarded-allow-ips`); everyone else's are removed from their requests.
    pub forwarded_allow: ForwardedAllow,
    /// HTTPS: the certificate and key (`--tls-cert-file`, `--tls-key-file`); `None`: plain HTTP.
    pub tls: Option<super::tls::TlsConfig>,
    /// After SIGTERM/SIGINT, how long queued and running work may take before the server exits.
    pub shutdown_grace: Duration,
    /// `--shutdown-delay-secs`: after SIGTERM/SIGINT and before the drain, how long the server
    /// goes on serving with `/health` 503 (for load balancers to stop sending it requests).
    pub shutdown_delay: Duration,
    /// Images in the warm-up batch each worker runs before `/health` turns 200 (0: the batch
    /// size limit, which also proves the largest batch fits in device memory).
    pub warmup_images: usize,
    /// Which smaller batch sizes each worker warms up after that batch.
    pub warmup_batch_sizes: WarmupSizes,
    /// Whether each worker also runs edit batches at those sizes.
    pub warmup_edits: bool,
    /// Image sizes (width, height) each worker also warms, at every warmed batch size
    /// (`--warmup-image-sizes`); the default size is always warmed.
    pub warmup_image_sizes: Vec<(u32, u32)>,
    /// `--device-stall-timeout`: when a device whose call into the model does not return
    /// counts as failed ([`super::stall`]).
    pub device_stall_timeout: super::stall::StallTimeout,
    /// Web origins (`https://app.example.com`) whose pages may call the API from a browser
    /// (CORS); `*`: any origin; empty: no CORS headers, so browsers refuse cross-origin calls.
    pub cors_allow_origins: Vec<String>,
    /// The most connections open at once (`--max-connections`); more wait in the listen
    /// backlog. `None`: what the open-file limit leaves ([`super::fds::connection_limit`]).
    pub max_connections: Option<usize>,
    /// The most bytes of request bodies and edit images held in memory at once
    /// (`--max-buffered-input-bytes`); more wait. `None`: a quarter of the memory the process
    /// may use ([`super::inputs::input_budget`]).
    pub max_buffered_input: Option<u64>,
    /// systemd's `NOTIFY_SOCKET`, told when the server is ready and when it stops.
    pub notify_socket: Option<super::notify::NotifySocket>,
    /// systemd's watchdog interval (`WatchdogSec=`, from `WATCHDOG_USEC`): with a notify
    /// socket, `WATCHDOG=1` goes there twice per interval while the process runs.
    pub systemd_watchdog: Option<Duration>,
    /// `--allow-runtime-lora-updating`: `POST /v1/load_lora_adapter` and
    /// `/v1/unload_lora_adapter` add and remove adapters while serving.
    pub runtime_lora_updating: bool,
    /// `--max-lora-modules`: the most adapters held at once (each holds its own copy of the
    /// weights its LoRAs adapt), those still finishing their requests after an unload included.
    pub max_lora_modules: usize,
    /// `--image-metadata`: what each image file states about itself.
    pub image_metadata: super::provenance::ImageMetadata,
}

/// `--max-lora-modules`' default.
pub const DEFAULT_MAX_LORA_MODULES: usize = 8;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model: ModelIdentity {
                id: "sdxl-turbo".into(),
                aliases: DEFAULT_MODEL_ALIASES
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                adapters: Adapters::default(),
            },
            limits: RequestLimits {
                min_side: 256,
                max_side: 1792,
                max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
                default_size: (512, 512),
                max_prompt_chars: 32_000,
                max_steps: 50,
                max_guidance_scale: 30.0,
                default_steps: 1,
                default_guidance_scale: 0.0,
                max_body_bytes: 1 << 20,
                max_upload_bytes: 32 << 20,
                body_timeout: Duration::from_secs(60),
                header_timeout: Duration::from_secs(60),
                keep_alive_timeout: Duration::from_secs(75),
                default_response_format: DefaultResponseFormat::Auto,
            },
            batching: BatchingConfig {
                max_batch_size: 8,
                max_batch_delay: Duration::from_millis(20),
                max_queued_images: 256,
                priority_aging: Duration::from_secs(30),
                request_timeout: Duration::from_secs(300),
            },
            store: StoreConfig {
                ttl: Duration::from_secs(3600),
                max_bytes: 512 << 20,
                dir: None,
                dir_max_bytes: 8 << 30,
            },
            files: FilesConfig {
                dir: None,
                max_file_bytes: 200 << 20,
                min_free_bytes: 0,
                max_batch_requests: 50_000,
                completion_window: Duration::from_secs(24 * 3600),
                batch_retention: Duration::from_secs(30 * 24 * 3600),
                webhook_retry: Default::default(),
                webhook_ca_file: None,
            },
            auth: AuthConfig::default(),
            public_url: None,
            metrics_port: None,
            forwarded_allow: ForwardedAllow::default(),
            tls: None,
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            warmup_images: 0,
            warmup_batch_sizes: WarmupSizes::Auto,
            warmup_edits: false,
            warmup_image_sizes: Vec::new(),
            device_stall_timeout: Default::default(),
            cors_allow_origins: Vec::new(),
            max_connections: None,
            max_buffered_input: None,
            notify_socket: None,
            systemd_watchdog: None,
            runtime_lora_updating: false,
            max_lora_modules: DEFAULT_MAX_LORA_MODULES,
            image_metadata: Default::default(),
        }
    }
}

impl ServerConfig {
    /// Rejects inconsistent settings at start-up, naming the option at fault.
    pub fn check(&self) -> anyhow::Result<()> {
        let m = &self.model;
        let names = m.adapters.names();
        for (i, name) in names.iter().enumerate() {
            if let Some(problem) = m.adapter_name_problem(name, "--lora-modules") {
                bail!("{problem}");
            }
            ensure!(
                !names[..i].contains(name),
                "--lora-modules {name}: named twice (this is a bug: the names are merged)"
            );
        }
        ensure!(
            names.len() <= self.max_lora_modules,
            "--lora-modules names {} adapters, over --max-lora-modules {}",
            names.len(),
            self.max_lora_modules
        );
        ensure!(
            self.store.dir.is_none() || self.store.dir_max_bytes >= 64 << 20,
            "--image-store-dir-max-bytes must be at least 64 MiB (a few large images), got {}",
            self.store.dir_max_bytes
        );
        let l = &self.limits;
        for (name, v) in [
            ("--min-image-side", l.min_side),
            ("--max-image-side", l.max_side),
        ] {
            ensure!(
                v >= 8 && v.is_multiple_of(8),
                "{name} must be a positive multiple of 8 (the VAE's scale factor), got {v}"
            );
        }
        ensure!(
            l.min_side <= l.max_side,
            "--min-image-side ({}) must not exceed --max-image-side ({})",
            l.min_side,
            l.max_side
        );
        ensure!(
            l.max_pixels >= u64::from(l.min_side) * u64::from(l.min_side),
            "--max-image-pixels ({}) must allow at least a --min-image-side square ({}x{})",
            l.max_pixels,
            l.min_side,
            l.min_side
        );
        l.check_size("--default-size", l.default_size)?;
        for &size in &self.warmup_image_sizes {
            l.check_size("--warmup-image-sizes", size)?;
        }
        ensure!(l.max_steps >= 1, "--max-steps must be at least 1");
        ensure!(
            (1..=l.max_steps).contains(&l.default_steps),
            "--default-steps must be from 1 to --max-steps ({}), got {}",
            l.max_steps,
            l.default_steps
        );
        ensure!(
            (0.0..=l.max_guidance_scale).contains(&l.default_guidance_scale),
            "--default-guidance-scale must be from 0 to --max-guidance-scale ({}), got {}",
            l.max_guidance_scale,
            l.default_guidance_scale
        );
        ensure!(
            self.max_connections != Some(0),
            "--max-connections must be at least 1 (or auto)"
        );
        ensure!(
            l.max_body_bytes >= 1024,
            "--max-body-bytes must be at least 1024"
        );
        ensure!(
            l.max_upload_bytes >= 1024,
            "--max-upload-bytes must be at least 1024"
        );
        if let Some(n) = self.max_buffered_input {
            let least = super::inputs::input_budget(
                Some(0),
                None,
                l.max_upload_bytes as u64,
                l.max_body_bytes as u64,
            );
            ensure!(
                n >= least,
                "--max-buffered-input-bytes must be at least {least} (or auto): one edit's body \
                 and the files it names may take {} times --max-upload-bytes",
                super::inputs::LARGEST_REQUEST_UPLOADS
            );
        }
        ensure!(
            l.body_timeout >= Duration::from_secs(1),
            "--request-body-timeout must be at least 1 second"
        );
        ensure!(
            l.header_timeout >= Duration::from_secs(1),
            "--header-read-timeout must be at least 1 second"
        );
        ensure!(
            l.keep_alive_timeout >= Duration::from_secs(1),
            "--keep-alive-timeout must be at least 1 second"
        );
        ensure!(
            self.files.max_file_bytes >= 1024,
            "--max-file-bytes must be at least 1024"
        );
        ensure!(
            self.files.max_batch_requests >= 1,
            "--max-batch-requests must be at least 1"
        );
        ensure!(
            self.files.batch_retention >= Duration::from_secs(24 * 3600),
            "--batch-retention-days must be at least 1"
        );
        let b = &self.batching;
        ensure!(b.max_batch_size >= 1, "--max-batch-size must be at least 1");
        ensure!(
            b.max_queued_images >= MAX_N as usize,
            "--max-queued-images must be at least {MAX_N} (the largest n), got {}",
            b.max_queued_images
        );
        ensure!(
            !b.request_timeout.is_zero(),
            "--request-timeout must be positive"
        );
        // Deadlines are `Instant + Duration`, which panics on overflow: keep durations sane.
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        for (name, d) in [
            ("--request-timeout", b.request_timeout),
            ("--request-body-timeout", l.body_timeout),
            ("--header-read-timeout", l.header_timeout),
            ("--keep-alive-timeout", l.keep_alive_timeout),
            ("--max-batch-delay-ms", b.max_batch_delay),
            ("--priority-aging-secs", b.priority_aging),
            ("--image-url-ttl-secs", self.store.ttl),
            ("--shutdown-grace-secs", self.shutdown_grace),
            ("the batch completion window", self.files.completion_window),
        ] {
            ensure!(
                d <= YEAR,
                "{name} must be at most a year, got {} s",
                d.as_secs()
            );
        }
        ensure!(
            !self.model.id.is_empty() && !self.model.id.contains('*'),
            "--served-model-name must not be empty or contain *, got {:?}",
            self.model.id
        );
        for alias in &self.model.aliases {
            ensure!(
                alias.find('*').is_none_or(|i| i + 1 == alias.len()),
                "--model-alias {alias:?}: a * may only end an alias (a prefix: gpt-image-*)"
            );
        }
        for origin in &self.cors_allow_origins {
            let bare = origin.split_once("://").is_some_and(|(scheme, host)| {
                matches!(scheme, "http" | "https") && !host.is_empty() && !host.contains('/')
            });
            ensure!(
                origin == "*" || (bare && axum::http::HeaderValue::from_str(origin).is_ok()),
                "--cors-allow-origin {origin:?} must be an origin as browsers send it, \
                 scheme://host[:port] with no path or trailing slash (https://app.example.com), \
                 or * for any"
            );
        }
        // The files named are read here too, so that a bad one stops `serve` before the model
        // loads (a download of gigabytes on a first start).
        if let Some(tls) = &self.tls {
            super::tls::load(tls)?;
        }
        if let Some(path) = &self.files.webhook_ca_file {
            super::webhooks::read_ca_file(path)?;
        }
        if let Some(url) = &self.public_url {
            ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "--public-url must start with http:// or https://, got {url}"
            );
        }
        Ok(())
    }
}

/// `--forwarded-allow-ips`' default: the loopback addresses.
pub const DEFAULT_FORWARDED_ALLOW: &str = "127.0.0.0/8,::1";

/// The peers whose forwarding headers say how clients reached the server
/// (`--forwarded-allow-ips`): `*`, or addresses and networks. As uvicorn's and gunicorn's
/// option of the same name, the default is a proxy on the same host: any loopback address
/// (127.0.0.0/8, ::1), as a sidecar may connect from another one than 127.0.0.1 (Istio's
/// passthrough comes from 127.0.0.6); only the host's own processes have those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardedAllow {
    Any,
    Nets(Vec<ipnet::IpNet>),
}

impl Default for ForwardedAllow {
    fn default() -> Self {
        Self::parse(DEFAULT_FORWARDED_ALLOW).expect("the default parses: this is a bug")
    }
}

impl ForwardedAllow {
    /// `*`, or a comma-separated list of addresses (`10.0.0.5`, `::1`) and networks
    /// (`10.0.0.0/8`); an empty list trusts no one.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim() == "*" {
            return Ok(Self::Any);
        }
        let nets = s
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<ipnet::IpNet>()
                    .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!(
                            "{item:?} is not an IP address or network (e.g. 10.0.0.5, \
                             10.0.0.0/8, ::1), nor *"
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::Nets(nets))
    }

    /// Whether a connection from `peer` may say how the client reached the server (an IPv4
    /// peer on an IPv6 socket, `::ffff:a.b.c.d`, counts as its IPv4 address).
    pub fn allows(&self, peer: std::net::IpAddr) -> bool {
        match self {
            Self::Any => true,
            Self::Nets(nets) => {
                let peer = peer.to_canonical();
                nets.iter().any(|n| n.contains(&peer))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_allow_ips_take_addresses_networks_or_any() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let default = ForwardedAllow::default();
        assert!(default.allows(ip("127.0.0.1")));
        assert!(default.allows(ip("::1")));
        // A sidecar's other loopback address (Istio's passthrough), IPv4-mapped too.
        assert!(default.allows(ip("127.0.0.6")));
        assert!(default.allows(ip("::ffff:127.0.0.6")));
        assert!(!default.allows(ip("10.0.0.1")));
        assert!(!default.allows(ip("::2")));
        // An IPv4 client of a socket bound to `::`.
        assert!(default.allows(ip("::ffff:127.0.0.1")));
        assert!(!default.allows(ip("10.0.0.5")));

        let nets = ForwardedAllow::parse(" 10.0.0.0/8, 192.168.1.7 ,fd00::/8").unwrap();
        assert!(nets.allows(ip("10.200.3.4")));
        assert!(nets.allows(ip("192.168.1.7")));
        assert!(!nets.allows(ip("192.168.1.8")));
        assert!(nets.allows(ip("fd12::5")));
        assert!(!nets.allows(ip("127.0.0.1")));

        assert_eq!(ForwardedAllow::parse("*").unwrap(), ForwardedAllow::Any);
        assert!(ForwardedAllow::Any.allows(ip("203.0.113.9")));
        let none = ForwardedAllow::parse("").unwrap();
        assert!(!none.allows(ip("127.0.0.1")));
        let e = ForwardedAllow::parse("10.0.0.0/8,proxy.internal").unwrap_err();
        assert!(e.contains("\"proxy.internal\""), "{e}");
    }

    #[test]
    fn defaults_pass_and_bad_settings_name_their_option() {
        ServerConfig::default().check().unwrap();
        type Case = (fn(&mut ServerConfig), &'static str);
        let cases: Vec<Case> = vec![
            (|c| c.limits.min_side = 100, "--min-image-side"),
            (
                |c| c.limits.min_side = 2048,
                "--min-image-side (2048) must not exceed",
            ),
            (|c| c.limits.default_size = (520, 4), "--default-size"),
            (
                |c| c.warmup_image_sizes = vec![(1024, 1024), (1024, 1028)],
                "--warmup-image-sizes 1024x1028 must have sides that are multiples of 8",
            ),
            (
                |c| c.warmup_image_sizes = vec![(1792, 1792)],
                "--warmup-image-sizes 1792x1792 has more than --max-image-pixels",
            ),
            (
                |c| c.limits.max_pixels = 255 * 255,
                "--max-image-pixels (65025) must allow at least a --min-image-side square",
            ),
            (
                |c| c.limits.default_size = (1792, 1792),
                "--default-size 1792x1792 has more than --max-image-pixels (2359296)",
            ),
            (
                |c| c.limits.default_steps = 0,
                "--default-steps must be from 1 to --max-steps (50), got 0",
            ),
            (|c| c.limits.default_steps = 51, "--default-steps"),
            (
                |c| c.limits.default_guidance_scale = 31.0,
                "--default-guidance-scale must be from 0 to --max-guidance-scale (30), got 31",
            ),
            (
                |c| c.limits.default_guidance_scale = f64::NAN,
                "--default-guidance-scale",
            ),
            (|c| c.batching.max_batch_size = 0, "--max-batch-size"),
            (|c| c.batching.max_queued_images = 9, "--max-queued-images"),
            (|c| c.max_connections = Some(0), "--max-connections"),
            (
                |c| c.batching.request_timeout = Duration::from_secs(u64::MAX),
                "--request-timeout",
            ),
            (
                |c| c.limits.body_timeout = Duration::from_secs(u64::MAX),
                "--request-body-timeout",
            ),
            (
                |c| c.limits.body_timeout = Duration::from_millis(10),
                "--request-body-timeout",
            ),
            (
                |c| c.limits.header_timeout = Duration::from_secs(u64::MAX),
                "--header-read-timeout",
            ),
            (|c| c.public_url = Some("ftp://x".into()), "--public-url"),
            (
                |c| c.files.webhook_ca_file = Some("/no/such/ca.pem".into()),
                "--webhook-ca-file /no/such/ca.pem: cannot read it",
            ),
            (
                |c| c.files.webhook_ca_file = Some("Cargo.toml".into()),
                "--webhook-ca-file Cargo.toml: no certificate in it",
            ),
            (
                |c| c.files.batch_retention = Duration::ZERO,
                "--batch-retention-days",
            ),
            (
                |c| c.model.aliases.push("gpt-*-image".into()),
                "a * may only end an alias",
            ),
            (
                |c| c.model.aliases.push("gpt**".into()),
                "a * may only end an alias",
            ),
            (
                |c| c.cors_allow_origins = vec!["https://app.example.com/".into()],
                "--cors-allow-origin",
            ),
            (
                |c| c.cors_allow_origins = vec!["app.example.com".into()],
                "--cors-allow-origin",
            ),
            (
                |c| {
                    c.store.dir = Some("/tmp".into());
                    c.store.dir_max_bytes = 1 << 20;
                },
                "--image-store-dir-max-bytes must be at least 64 MiB",
            ),
        ];
        for (tweak, fragment) in cases {
            let mut c = ServerConfig::default();
            tweak(&mut c);
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains(fragment), "{e:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn a_model_name_selects_the_model_or_an_adapter() {
        let mut c = ServerConfig::default();
        c.model.adapters = Adapters::new(vec!["pixel".into(), "gpt-image-ink".into()]);
        let m = &c.model;
        let slot = |name| m.resolve(name).map(|a| a.map(|l| l.slot()));
        assert_eq!(slot("sdxl-turbo"), Some(None));
        assert_eq!(slot("dall-e-3"), Some(None));
        assert_eq!(slot("pixel"), Some(Some(0)));
        // An adapter's exact name wins over the `gpt-image-*` prefix.
        assert_eq!(slot("gpt-image-ink"), Some(Some(1)));
        assert_eq!(slot("gpt-image-1"), Some(None));
        assert_eq!(slot("pixels"), None);
        c.check().unwrap();
        c.max_lora_modules = 1;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("--max-lora-modules 1"), "{e}");
        for clash in ["sdxl-turbo", "dall-e-2", "ink*", "a b", ""] {
            let mut c = ServerConfig::default();
            c.model.adapters = Adapters::new(vec![clash.into()]);
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains("--lora-modules") && e.contains(clash), "{e}");
        }
    }

    #[test]
    fn aliases_are_names_or_prefixes() {
        let model = ServerConfig::default().model;
        for name in [
            "sdxl-turbo",
            "gpt-image-1",
            "gpt-image-2.5-flare-2026-09-08",
            "gpt-image-2.6-sunburst",
            "chatgpt-image-latest",
            "dall-e-3",
        ] {
            assert!(model.matches(name), "{name}");
        }
        for name in ["sdxl", "gpt-4o", "dall-e-4", "gpt-image", "GPT-IMAGE-1", ""] {
            assert!(!model.matches(name), "{name}");
        }
        let listed: Vec<&str> = model.listed().collect();
        assert_eq!(listed, ["sdxl-turbo", "dall-e-2", "dall-e-3"]);
        let any = ModelIdentity {
            id: "m".into(),
            aliases: vec!["*".into()],
            adapters: Adapters::default(),
        };
        assert!(any.matches("anything at all") && any.matches(""));
        assert_eq!(any.listed().collect::<Vec<_>>(), ["m"]);
    }
}
