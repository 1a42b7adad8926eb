//! `turbine serve`: the OpenAI Images API over HTTP (see [`crate::server`]).
//!
//! Every option is also read from a `TURBINE_*` environment variable (container deployments).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::cli::UsageError;
use crate::hub::ModelArgs;
use crate::model::tokenizer::ClipTokenizer;
use crate::server::api::DefaultResponseFormat;
use crate::server::auth::{read_keys_file, ApiKey};
use crate::server::config::{
    Adapters, AuthConfig, BatchingConfig, FilesConfig, ModelIdentity, RequestLimits, ServerConfig,
    StoreConfig, DEFAULT_MAX_IMAGE_PIXELS,
};
use crate::server::stall::StallTimeout;
use crate::server::tls::TlsConfig;
use crate::server::{ImageBackend, TokenCounter, WarmupSizes, WorkerSpec};
use std::sync::Arc;

/// The option groups are boxed so the `Command` enum of `main` stays small.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: Box<ModelArgs>,
    #[command(flatten)]
    pub devices: Box<DeviceArgs>,
    #[command(flatten)]
    pub http: Box<HttpArgs>,
    #[command(flatten)]
    pub batching: Box<BatchingArgs>,
    #[command(flatten)]
    pub limits: Box<LimitArgs>,
    #[command(flatten)]
    pub auth: Box<AuthArgs>,
    #[command(flatten)]
    pub files: Box<FilesArgs>,
}

/// OpenAI's Files and Batch APIs (`/v1/files`, `/v1/batches`).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Files and batches")]
pub struct FilesArgs {
    /// Directory that keeps the files (`/v1/files`) and batches (`/v1/batches`) across
    /// restarts: they are read back at start-up and unfinished batches resume; one server per
    /// directory (a lock says so). Without it they live in a directory of the process's own in
    /// the system's temporary directory, removed when the server stops. A batch's output holds
    /// its images as base64 JSON, about 0.5 MB per 512x512 PNG.
    #[arg(long, env = "TURBINE_FILES_DIR")]
    pub files_dir: Option<PathBuf>,
    /// Largest `POST /v1/files` upload in bytes (OpenAI: 200 MB for a batch input file).
    #[arg(long, env = "TURBINE_MAX_FILE_BYTES", default_value_t = 200 << 20)]
    pub max_file_bytes: u64,
    /// Free space to keep on the disk of the files directory: an upload (`/v1/files`,
    /// `/v1/uploads`) that would leave less is refused with 507 `insufficient_storage`, so that
    /// running batches can still write their results (0: no check).
    #[arg(long, env = "TURBINE_MIN_FREE_DISK_BYTES", default_value_t = 128 << 20)]
    pub min_free_disk_bytes: u64,
    /// Most requests (lines) in one batch (OpenAI: 50,000).
    #[arg(long, env = "TURBINE_MAX_BATCH_REQUESTS", default_value_t = 50_000)]
    pub max_batch_requests: usize,
    /// Days a batch that ended (completed, failed, cancelled, expired) stays listed and
    /// retrievable before its record is removed; its output and error files expire on their own
    /// (`output_expires_after`, 30 days by default).
    #[arg(long, env = "TURBINE_BATCH_RETENTION_DAYS", default_value_t = 30)]
    pub batch_retention_days: u64,
    /// CA certificates (PEM) that webhook deliveries trust besides the public ones: for
    /// receivers on an internal network whose HTTPS certificate a private CA signed.
    #[arg(long, env = "TURBINE_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<PathBuf>,
}

/// Where to run the model and what to call it.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Devices")]
pub struct DeviceArgs {
    /// Device to run a model worker on: `cpu`, `cuda` or `cuda:N`. Repeat (or separate with
    /// commas) for one worker per GPU, all fed from the same queue. Default: cuda:0 when this
    /// build has CUDA and a GPU is present, else cpu.
    #[arg(long = "device", env = "TURBINE_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Weights dtype: f32, f16 or bf16. Default: f32 on CPU, bf16 on CUDA.
    #[arg(long, env = "TURBINE_DTYPE")]
    pub dtype: Option<String>,
    #[command(flatten)]
    pub kernels: crate::cli::KernelArgs,
    /// Prompts whose text embeddings each worker keeps on its device, least recently used out
    /// first (0: none). A prompt seen again (another seed, another size) skips both text
    /// encoders; about 318 KB of device memory each in bf16. Repeats within one batch (`n` > 1)
    /// are encoded once whatever this is.
    #[arg(long, env = "TURBINE_PROMPT_CACHE_ENTRIES", default_value_t = 256)]
    pub prompt_cache_entries: usize,
    /// The model id that `/v1/models` lists and requests name in `model`.
    #[arg(long, env = "TURBINE_SERVED_MODEL_NAME", default_value = "sdxl-turbo")]
    pub served_model_name: String,
    /// Other model names that also mean the served model, so clients written for OpenAI work
    /// unchanged. One ending in `*` matches by prefix (`gpt-image-*`: every GPT image model and
    /// snapshot; `*`: any name). Pass an empty value to accept only the served name.
    #[arg(
        long = "model-alias",
        env = "TURBINE_MODEL_ALIASES",
        value_delimiter = ',',
        default_value = "gpt-image-*,chatgpt-image-*,dall-e-2,dall-e-3"
    )]
    pub model_aliases: Vec<String>,
    /// Serve a LoRA under its own model name next to the model, as NAME=FILE or
    /// NAME=FILE:SCALE (vLLM's flag): a request whose `model` is NAME gets images with the LoRA,
    /// other requests the model's own. Repeat it (or separate with commas) for more; one NAME
    /// given twice stacks both LoRAs. Each adapter is fused in at load into its own copy of the
    /// weights its LoRAs adapt (device memory about their size; no cost per image) and shares
    /// the rest; a batch holds one adapter's images.
    #[arg(long = "lora-modules", env = "TURBINE_LORA_MODULES", value_delimiter = ',',
          value_parser = crate::model::lora::AdapterSpec::parse)]
    pub lora_modules: Vec<crate::model::lora::AdapterSpec>,
    /// Let clients load and unload LoRA adapters while serving, with vLLM's endpoints: POST
    /// /v1/load_lora_adapter {"lora_name": NAME, "lora_path": FILE} serves the LoRA in the
    /// server's FILE as the model NAME (as --lora-modules NAME=FILE does), POST
    /// /v1/unload_lora_adapter {"lora_name": NAME} stops serving it. Any API key may call them,
    /// and FILE is read with the server's rights: turn it on only where the keys' holders may
    /// change what the server serves. Keeps what adapters are built from (device memory: the
    /// UNet's attention query weights, about 0.4 GB for SDXL in bf16).
    #[arg(long, env = "TURBINE_ALLOW_RUNTIME_LORA_UPDATING")]
    pub allow_runtime_lora_updating: bool,
    /// The most LoRA adapters held at once, --lora-modules included: each holds a copy of the
    /// weights its LoRAs adapt. An unloaded adapter counts until the requests that named it
    /// are done.
    #[arg(long, env = "TURBINE_MAX_LORA_MODULES",
          default_value_t = crate::server::config::DEFAULT_MAX_LORA_MODULES)]
    pub max_lora_modules: usize,
}

impl DeviceArgs {
    /// `--lora-modules`, one adapter per name.
    pub fn adapters(&self) -> Vec<crate::model::lora::AdapterSpec> {
        crate::model::lora::AdapterSpec::merged(&self.lora_modules)
    }
}

/// Listening and request lifetime.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// Address to listen on: `::` (every IPv6 and IPv4 address; 0.0.0.0 on a host without
    /// IPv6), 0.0.0.0 (every IPv4 address), 127.0.0.1 or ::1 (this machine only), or a name.
    #[arg(long, env = "TURBINE_HOST", default_value = "::")]
    pub host: String,
    /// Port to listen on (0: any free port; the log says which). Default: `PORT` when the
    /// environment sets it, as Cloud Run, Knative and other platforms that run containers do
    /// (and expect the server on it), else 8000.
    #[arg(long, env = "TURBINE_PORT")]
    pub port: Option<u16>,
    /// Serve `GET /metrics` on this port instead (on --host, plain HTTP, no API key), and not on
    /// the API's port, where whoever reaches the API would read every key's name and use; for a
    /// scraper on the inside (0: any free port; the log says which).
    #[arg(long, env = "TURBINE_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Base of the URLs returned for `response_format: "url"`, e.g. https://images.example.com
    /// behind a proxy. Default: http:// (https:// with --tls-cert-file) + the Host header of the
    /// request, or what a proxy of --forwarded-allow-ips says in its forwarding headers.
    #[arg(long, env = "TURBINE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Proxies whose forwarding headers (`Forwarded`, or `X-Forwarded-For`, `X-Forwarded-Proto`,
    /// `X-Forwarded-Host` and `X-Forwarded-Prefix`) say who the client is (for the log) and how
    /// it reached the server (for the URLs of `response_format: "url"` behind a proxy that
    /// terminates HTTPS): addresses and networks, comma-separated (10.0.0.0/8,::1), or * for any
    /// peer. Other peers' such headers are ignored. The default: the loopback addresses (a proxy
    /// or sidecar on the same host).
    #[arg(
        long,
        env = "TURBINE_FORWARDED_ALLOW_IPS",
        default_value = crate::server::config::DEFAULT_FORWARDED_ALLOW,
        value_parser = crate::server::config::ForwardedAllow::parse
    )]
    pub forwarded_allow_ips: crate::server::config::ForwardedAllow,
    /// Serve HTTPS with this certificate (PEM: the server's certificate, then its chain); needs
    /// --tls-key-file. The files are read again when they change (checked every 10 s, and on
    /// SIGHUP), so a renewed certificate needs no restart.
    #[arg(long, env = "TURBINE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of --tls-cert-file's certificate (PEM: PKCS#8, RSA or EC).
    #[arg(long, env = "TURBINE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// With HTTPS, require clients to present a certificate signed by one of these CAs (PEM):
    /// mutual TLS, e.g. for a gateway that holds a client certificate.
    #[arg(long, env = "TURBINE_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Largest accepted request body in bytes (larger: 413). The default fits the longest
    /// prompt and negative prompt (32000 characters each, up to 4 bytes per character).
    #[arg(long, env = "TURBINE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest accepted `POST /v1/images/edits` upload in bytes, the input image and the form
    /// fields together (larger: 413). OpenAI takes images up to 50 MB; photos are far smaller.
    #[arg(long, env = "TURBINE_MAX_UPLOAD_BYTES", default_value_t = 32 << 20)]
    pub max_upload_bytes: usize,
    /// Seconds a request's body may go without a byte arriving (counted from its head); after
    /// that it gets 408 and the connection closes. A client that stalls mid-upload then holds
    /// no task, and does not hold up a shutdown's drain.
    #[arg(long, env = "TURBINE_REQUEST_BODY_TIMEOUT", default_value_t = 60)]
    pub request_body_timeout: u64,
    /// Seconds a connection may take to send a request's head (HTTP/1), from its start or from
    /// the head's first byte, or a TLS handshake; after that it is closed. Bounds connections
    /// that open and send nothing, or a head byte by byte; a request being served is not cut.
    /// HTTP/2 connections with requests open are pinged every half of it; HTTP/1 ones get TCP
    /// keep-alive probes (a vanished client is dropped within about this). On Linux, a client
    /// that takes none of its response for this long is disconnected too (TCP_USER_TIMEOUT).
    #[arg(long, env = "TURBINE_HEADER_READ_TIMEOUT", default_value_t = 60)]
    pub header_read_timeout: u64,
    /// Seconds a keep-alive connection may stay idle between requests (HTTP/1), or with no
    /// request open (HTTP/2), before the server closes it. Longer than the idle timeout of
    /// what sits in front (AWS ALB: 60 s; nginx upstream keep-alive: 60 s; Google Cloud's load
    /// balancers want over 600 s), so that the balancer, not the server, closes an idle
    /// connection.
    #[arg(long, env = "TURBINE_KEEP_ALIVE_TIMEOUT", default_value_t = 75)]
    pub keep_alive_timeout: u64,
    /// Seconds a generation request may take from arrival to its last image; after that it
    /// gets 503 and its images that have not started leave the queue.
    #[arg(long, env = "TURBINE_REQUEST_TIMEOUT", default_value_t = 300)]
    pub request_timeout: u64,
    /// After SIGTERM/SIGINT: seconds to finish queued and running work (new requests get 503)
    /// before exiting.
    #[arg(long, env = "TURBINE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// After SIGTERM/SIGINT and before the drain: seconds of serving as usual with /health
    /// answering 503, so that load balancers (a Kubernetes Service's endpoints, which follow
    /// the pod's deletion a few seconds late) stop sending requests before new ones are
    /// refused. A second signal cuts it short. 0: the drain starts at once.
    #[arg(long, env = "TURBINE_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,
    /// A web origin (https://app.example.com) whose pages may call the API from a browser
    /// (CORS: preflights answered without a key, the responses readable by the page); repeat
    /// it, or `*` for any origin. None: no CORS headers.
    #[arg(
        long = "cors-allow-origin",
        env = "TURBINE_CORS_ALLOW_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_allow_origins: Vec<String>,
    /// The most connections open at once (idle keep-alive ones count); past it, new ones wait
    /// to be accepted until one closes. `auto`: what the open-file limit leaves after 256
    /// descriptors for files and devices (`serve` first raises the soft limit to the hard one).
    #[arg(long, env = "TURBINE_MAX_CONNECTIONS", default_value = "auto", value_parser = connection_limit)]
    pub max_connections: ConnectionLimit,
    /// The most bytes of request bodies (an edit's upload, a generation's JSON) and of the
    /// image files edits name, held in memory at once; past it, new requests wait with their
    /// bodies unread, and one that waits --request-body-timeout gets 503. `auto`: a quarter of
    /// the memory the process may use (its cgroup's limit, or the machine's), at least four
    /// times --max-upload-bytes.
    #[arg(long, env = "TURBINE_MAX_BUFFERED_INPUT_BYTES", default_value = "auto", value_parser = byte_budget)]
    pub max_buffered_input_bytes: ByteBudget,
}

/// `--max-buffered-input-bytes`: `auto` (`None`) or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteBudget(pub Option<u64>);

fn byte_budget(s: &str) -> Result<ByteBudget, String> {
    auto_or_positive(s, "a positive number of bytes").map(ByteBudget)
}

/// `--max-connections`: `auto` (`None`) or a number of connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimit(pub Option<usize>);

fn connection_limit(s: &str) -> Result<ConnectionLimit, String> {
    auto_or_positive(s, "a positive number").map(ConnectionLimit)
}

/// `auto` (`None`), or a number above 0 (`what` names it in the error).
fn auto_or_positive<T: std::str::FromStr + Default + PartialOrd>(
    s: &str,
    what: &str,
) -> Result<Option<T>, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    match s.parse::<T>() {
        Ok(n) if n > T::default() => Ok(Some(n)),
        _ => Err(format!("expected auto or {what}, got {s:?}")),
    }
}

/// The dynamic batcher.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Batching")]
pub struct BatchingArgs {
    /// Most images per batch on one device (images of one size, step count and guidance).
    #[arg(long, env = "TURBINE_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,
    /// Longest wait, in ms, for more images of the same shape when the device is idle.
    #[arg(long, env = "TURBINE_MAX_BATCH_DELAY_MS", default_value_t = 20)]
    pub max_batch_delay_ms: u64,
    /// Most images waiting in the queue; requests beyond it get 429 with Retry-After.
    #[arg(long, env = "TURBINE_MAX_QUEUED_IMAGES", default_value_t = 256)]
    pub max_queued_images: usize,
    /// Seconds of waiting that lift a request by one priority class (low never starves).
    #[arg(long, env = "TURBINE_PRIORITY_AGING_SECS", default_value_t = 30)]
    pub priority_aging_secs: u64,
    /// Images in each device's warm-up batch, run before /health reports ready (0: the
    /// maximum batch size, which also proves the largest batch fits in memory).
    #[arg(long, env = "TURBINE_WARMUP_IMAGES", default_value_t = 0)]
    pub warmup_images: usize,
    /// Batch sizes warmed up after that batch: `all` runs one batch of each smaller size too,
    /// so that no request waits for a size's first-batch planning (cuDNN's convolution plans:
    /// 1.5-4 s per new size on an H200); `auto` does so on CUDA with cuDNN only.
    #[arg(long, env = "TURBINE_WARMUP_BATCH_SIZES", value_enum, default_value_t = WarmupSizes::Auto)]
    pub warmup_batch_sizes: WarmupSizes,
    /// Also run an edit batch (POST /v1/images/edits) at each warmed batch size, so that the
    /// first edits of each size do not wait for the VAE encoder's convolution plans. Off by
    /// default: it lengthens the start for servers that take no edits.
    #[arg(long, env = "TURBINE_WARMUP_EDITS")]
    pub warmup_edits: bool,
    /// Image sizes (WxH, comma-separated) warmed besides --default-size, each at every warmed
    /// batch size (and with --warmup-edits, as edits): cuDNN plans each image size's
    /// convolutions at its first batch too, so the first requests of a size the clients use
    /// (OpenAI's default 1024x1024, say) would wait seconds for it. Each size lengthens the
    /// start by a warm-up of its own.
    #[arg(long, env = "TURBINE_WARMUP_IMAGE_SIZES", value_delimiter = ',')]
    pub warmup_image_sizes: Vec<String>,
    /// When a device counts as stalled: a call into the model that runs past the longer of
    /// this many seconds and ten times its estimated time (from the warm-up's rate) marks the
    /// device failed, as a CUDA fault does (with no device left: the queue fails with 503 and
    /// the process exits 1 for its supervisor to restart it). `auto`: 120 s on a GPU, off on
    /// the CPU (where a large batch legitimately runs for many minutes); `off` (or 0); SECS.
    #[arg(long, env = "TURBINE_DEVICE_STALL_TIMEOUT", default_value = "auto", value_parser = StallTimeout::parse)]
    pub device_stall_timeout: StallTimeout,
}

/// Request bounds and the URL image store.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Request limits")]
pub struct LimitArgs {
    /// Smallest image side in pixels (a multiple of 8).
    #[arg(long, env = "TURBINE_MIN_IMAGE_SIDE", default_value_t = 256)]
    pub min_image_side: u32,
    /// Largest image side in pixels (a multiple of 8): by default 1792, for DALL·E 3's
    /// 1792x1024 and 1024x1792. Batches of large images are split to keep every tensor under
    /// 2^31 elements, but one image must fit: SDXL's VAE decoder holds square images up to 2896
    /// pixels a side; a larger one fails with a message that says so.
    #[arg(long, env = "TURBINE_MAX_IMAGE_SIDE", default_value_t = 1792)]
    pub max_image_side: u32,
    /// Most pixels (width x height) an image may have, which is what its memory and time grow
    /// with; by default 1536x1536's, so that the largest image is as large as when the sides
    /// were bounded at 1536 (1792x1024 fits, 1792x1792 does not).
    #[arg(long, env = "TURBINE_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// What `size: "auto"` (or no size) means, WIDTHxHEIGHT; also the warm-up batch's size.
    #[arg(long, env = "TURBINE_DEFAULT_SIZE", default_value = "512x512")]
    pub default_size: String,
    /// Longest prompt (and negative prompt) in characters.
    #[arg(long, env = "TURBINE_MAX_PROMPT_CHARS", default_value_t = 32_000)]
    pub max_prompt_chars: usize,
    /// Most denoising steps a request may ask for with `steps`.
    #[arg(long, env = "TURBINE_MAX_STEPS", default_value_t = 50)]
    pub max_steps: u32,
    /// Largest `guidance_scale` a request may ask for.
    #[arg(long, env = "TURBINE_MAX_GUIDANCE_SCALE", default_value_t = 30.0)]
    pub max_guidance_scale: f64,
    /// Denoising steps of a request that asks for none (no `steps`, `quality` absent or
    /// `auto`): 1 for SDXL-Turbo; a fine-tune made for more steps (a --checkpoint from
    /// Civitai that recommends 6, say) sets its own, so that clients sending only the OpenAI
    /// fields get good images. Also the warm-up's steps.
    #[arg(long, env = "TURBINE_DEFAULT_STEPS", default_value_t = 1)]
    pub default_steps: u32,
    /// `guidance_scale` of a request that gives none: 0 for SDXL-Turbo (no classifier-free
    /// guidance); above 1 runs it, as some fine-tunes want (at twice the UNet work). Also the
    /// warm-up's.
    #[arg(long, env = "TURBINE_DEFAULT_GUIDANCE_SCALE", default_value_t = 0.0)]
    pub default_guidance_scale: f64,
    /// `response_format` when a request gives none: `auto` (OpenAI's default for the model
    /// the request names: `url` for `dall-e-2` and `dall-e-3`, whose clients read
    /// `data[].url`; `b64_json` for the GPT image models and for a request that names none),
    /// `b64_json` or `url` (every request).
    #[arg(long, env = "TURBINE_DEFAULT_RESPONSE_FORMAT", default_value = "auto")]
    pub default_response_format: String,
    /// What each image file states about itself, as XMP metadata: `provenance` (that a
    /// generative model made it, and which: IPTC's digital source type
    /// `trainedAlgorithmicMedia`, the model's name, turbine's version; what image platforms
    /// read to label AI images); `parameters` (that, plus the prompts, and in PNGs the
    /// `parameters` text Stable Diffusion tools read back: prompt, seed, steps, guidance,
    /// size); `none` (no metadata).
    #[arg(long, env = "TURBINE_IMAGE_METADATA", value_enum, default_value_t)]
    pub image_metadata: crate::server::provenance::ImageMetadata,
    /// Seconds an image behind a `url` response stays available (OpenAI: 60 minutes).
    #[arg(long, env = "TURBINE_IMAGE_URL_TTL_SECS", default_value_t = 3600)]
    pub image_url_ttl_secs: u64,
    /// Bytes of encoded images kept for `url` responses; the oldest go first.
    #[arg(long, env = "TURBINE_IMAGE_STORE_MAX_BYTES", default_value_t = 512 << 20)]
    pub image_store_max_bytes: usize,
    /// Also write the images behind `url` responses to this directory, and answer URLs from
    /// it: servers behind one load balancer that share it (a volume each replica mounts)
    /// answer each other's URLs, and a restarted server its predecessor's. Files expire with
    /// their URLs.
    #[arg(long, env = "TURBINE_IMAGE_STORE_DIR")]
    pub image_store_dir: Option<PathBuf>,
    /// The most bytes this server keeps written to --image-store-dir (its oldest go first).
    #[arg(long, env = "TURBINE_IMAGE_STORE_DIR_MAX_BYTES", default_value_t = 8 << 30)]
    pub image_store_dir_max_bytes: u64,
}

/// API keys.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthArgs {
    /// An accepted API key (Authorization: Bearer KEY), normal priority, no limits. Repeat, or
    /// separate with commas in the environment variable. No keys at all: the API is open.
    #[arg(
        long = "api-key",
        env = "TURBINE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// File of API keys, one per line: `KEY [name=NAME] [priority=high|normal|low]
    /// [requests_per_minute=N] [images_per_minute=N]`; `#` starts a comment. NAME labels the
    /// key's requests in the log and its usage in /metrics. Read again when it changes (checked
    /// every 10 s) and on SIGHUP: keys are added, removed or changed without a restart.
    #[arg(long, env = "TURBINE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Header whose value (high|normal|low) sets a request's priority. Only for deployments
    /// where a trusted proxy sets it: any client could otherwise claim high priority.
    #[arg(long, env = "TURBINE_PRIORITY_HEADER")]
    pub priority_header: Option<String>,
}

impl Args {
    /// The server configuration these options describe.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        let default_size = parse_size(&self.limits.default_size).ok_or_else(|| {
            UsageError(format!(
                "--default-size must be WIDTHxHEIGHT, got {:?}",
                self.limits.default_size
            ))
        })?;
        let warmup_image_sizes = trimmed(&self.batching.warmup_image_sizes)
            .iter()
            .map(|s| {
                parse_size(s).ok_or_else(|| {
                    UsageError(format!(
                        "--warmup-image-sizes takes WIDTHxHEIGHT sizes, got {s:?}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let default_response_format = DefaultResponseFormat::parse(
            &self.limits.default_response_format,
        )
        .ok_or_else(|| {
            UsageError(format!(
                "--default-response-format must be auto, b64_json or url, got {:?}",
                self.limits.default_response_format
            ))
        })?;
        let keys: Vec<ApiKey> = trimmed(&self.auth.api_keys)
            .into_iter()
            .map(ApiKey::plain)
            .collect();
        // Checked here, to fail before the model loads; the server reads it again at start
        // and whenever it changes.
        if let Some(path) = &self.auth.api_keys_file {
            read_keys_file(&keys, path).map_err(|e| UsageError(format!("{e:#}")))?;
        }
        let config = ServerConfig {
            model: ModelIdentity {
                id: self.devices.served_model_name.clone(),
                aliases: trimmed(&self.devices.model_aliases),
                adapters: Adapters::new(
                    self.devices
                        .adapters()
                        .into_iter()
                        .map(|a| a.name)
                        .collect(),
                ),
            },
            limits: RequestLimits {
                min_side: self.limits.min_image_side,
                max_side: self.limits.max_image_side,
                max_pixels: self.limits.max_image_pixels,
                default_size,
                max_prompt_chars: self.limits.max_prompt_chars,
                max_steps: self.limits.max_steps,
                max_guidance_scale: self.limits.max_guidance_scale,
                default_steps: self.limits.default_steps,
                default_guidance_scale: self.limits.default_guidance_scale,
                max_body_bytes: self.http.max_body_bytes,
                max_upload_bytes: self.http.max_upload_bytes,
                body_timeout: Duration::from_secs(self.http.request_body_timeout),
                header_timeout: Duration::from_secs(self.http.header_read_timeout),
                keep_alive_timeout: Duration::from_secs(self.http.keep_alive_timeout),
                default_response_format,
            },
            batching: BatchingConfig {
                max_batch_size: self.batching.max_batch_size,
                max_batch_delay: Duration::from_millis(self.batching.max_batch_delay_ms),
                max_queued_images: self.batching.max_queued_images,
                priority_aging: Duration::from_secs(self.batching.priority_aging_secs),
                request_timeout: Duration::from_secs(self.http.request_timeout),
            },
            store: StoreConfig {
                ttl: Duration::from_secs(self.limits.image_url_ttl_secs),
                max_bytes: self.limits.image_store_max_bytes,
                dir: self.limits.image_store_dir.clone(),
                dir_max_bytes: self.limits.image_store_dir_max_bytes,
            },
            files: FilesConfig {
                dir: self.files.files_dir.clone(),
                max_file_bytes: self.files.max_file_bytes,
                min_free_bytes: self.files.min_free_disk_bytes,
                max_batch_requests: self.files.max_batch_requests,
                completion_window: ServerConfig::default().files.completion_window,
                batch_retention: Duration::from_secs(
                    self.files.batch_retention_days.saturating_mul(24 * 3600),
                ),
                webhook_retry: Default::default(),
                webhook_ca_file: self.files.webhook_ca_file.clone(),
            },
            auth: AuthConfig {
                keys,
                keys_file: self.auth.api_keys_file.clone(),
                priority_header: self.auth.priority_header.clone(),
                ..AuthConfig::default()
            },
            public_url: self.http.public_url.clone(),
            metrics_port: self.http.metrics_port,
            forwarded_allow: self.http.forwarded_allow_ips.clone(),
            tls: match (&self.http.tls_cert_file, &self.http.tls_key_file) {
                (Some(cert), Some(key)) => Some(TlsConfig {
                    client_ca_file: self.http.tls_client_ca_file.clone(),
                    ..TlsConfig::new(cert, key)
                }),
                _ => None,
            },
            cors_allow_origins: trimmed(&self.http.cors_allow_origins),
            max_connections: self.http.max_connections.0,
            max_buffered_input: self.http.max_buffered_input_bytes.0,
            // From the environment, by `run`.
            notify_socket: None,
            systemd_watchdog: None,
            shutdown_grace: Duration::from_secs(self.http.shutdown_grace_secs),
            shutdown_delay: Duration::from_secs(self.http.shutdown_delay_secs),
            warmup_images: self.batching.warmup_images,
            warmup_batch_sizes: self.batching.warmup_batch_sizes,
            warmup_edits: self.batching.warmup_edits,
            warmup_image_sizes,
            image_metadata: self.limits.image_metadata,
            runtime_lora_updating: self.devices.allow_runtime_lora_updating,
            max_lora_modules: self.devices.max_lora_modules,
            device_stall_timeout: self.batching.device_stall_timeout,
        };
        config.check().map_err(|e| UsageError(format!("{e:#}")))?;
        Ok(config)
    }
}

fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.trim().split_once('x')?;
    Some((w.parse().ok()?, h.parse().ok()?))
}

/// One worker per `--device`, each resolving and loading the model on its own thread (so
/// `/health` answers 503 meanwhile).
/// A comma-separated option's values, trimmed, the empty ones dropped (so `--opt ""` means none).
fn trimmed(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

/// The server's workers. Each resolves the model (downloading what is missing: one worker at a
/// time, the others then find it in place) and loads it on its device; the first to resolve it
/// fills `tokens`, the token counter for `usage`, if given (requests are refused until a
/// worker is ready, so none is counted without it).
pub fn worker_specs(
    model: &ModelArgs,
    devices: &DeviceArgs,
    tokens: Option<Arc<std::sync::OnceLock<TokenCounter>>>,
) -> anyhow::Result<Vec<WorkerSpec>> {
    let labels = if devices.devices.is_empty() {
        vec![if candle_core::utils::cuda_is_available() {
            "cuda:0"
        } else {
            "cpu"
        }
        .to_string()]
    } else {
        devices.devices.clone()
    };
    labels
        .iter()
        .map(|label| {
            let device = crate::device::parse_device(label)
                .map_err(|e| UsageError(format!("--device: {e:#}")))?;
            let dtype = crate::device::parse_dtype(devices.dtype.as_deref(), &device)
                .map_err(|e| UsageError(format!("--dtype: {e:#}")))?;
            let (model, tokens) = (model.clone(), tokens.clone());
            let prompt_cache_entries = devices.prompt_cache_entries;
            let adapters = devices.adapters();
            let runtime_adapters = devices.allow_runtime_lora_updating;
            let factory: crate::server::BackendFactory = Box::new(move || {
                let resolved = model.resolve()?;
                if let Some(tokens) = tokens.filter(|t| t.get().is_none()) {
                    tracing::info!("model: {resolved}; kernels: {}", crate::ops::kernels());
                    let _ = tokens.set(token_counter(&resolved.dir)?);
                }
                let mut pipeline = crate::cli::load_resolved(
                    &resolved,
                    &adapters,
                    runtime_adapters,
                    &device,
                    dtype,
                )?;
                pipeline.set_prompt_cache_entries(prompt_cache_entries);
                Ok(Box::new(pipeline) as Box<dyn ImageBackend>)
            });
            Ok(WorkerSpec {
                label: label.trim().to_string(),
                factory,
            })
        })
        .collect()
}

/// Counts a prompt's tokens as the first CLIP tokenizer sees them (BOS, the prompt's tokens
/// after truncation to 77, EOS), for `usage`, and where the part it reads ends when the rest is
/// cut off. That tokenizer pads with EOS, so the count is the position of the first pad id plus
/// one, or the full length when nothing is padded.
pub fn token_counter(model_dir: &std::path::Path) -> anyhow::Result<TokenCounter> {
    let tokenizer = ClipTokenizer::from_dir(&model_dir.join("tokenizer"))?;
    Ok(Arc::new(move |text: &str| {
        match tokenizer.encode_reading(text) {
            Ok((ids, read_up_to)) => crate::server::PromptTokens {
                count: ids
                    .iter()
                    .position(|&id| id == tokenizer.pad_id())
                    .map_or(ids.len(), |i| i + 1),
                read_up_to,
            },
            Err(_) => crate::server::PromptTokens::default(),
        }
    }))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // First, before any thread: it takes the variable out of the environment.
    let notify_socket = crate::server::notify::NotifySocket::take_from_env();
    let systemd_watchdog = crate::server::notify::take_watchdog_from_env();
    args.devices.kernels.apply();
    let config = ServerConfig {
        notify_socket,
        systemd_watchdog,
        ..args.config()?
    };
    // Connections are file descriptors: take the room the hard limit allows (see fds).
    match crate::server::fds::raise_open_file_limit() {
        Some((old, new)) if new > old => {
            tracing::info!("open-file limit raised from {old} to {new} (its hard limit)")
        }
        Some((_, n)) => tracing::debug!("open-file limit: {n}"),
        None if cfg!(unix) => tracing::warn!("cannot raise the open-file limit"),
        None => {}
    }
    // The model is resolved (and its missing files downloaded, which can take many minutes)
    // by the workers as they load it, while the server listens: `/livez` answers 200 and
    // `/health` 503 meanwhile, so a liveness check does not restart the server mid-download.
    let counter = Arc::new(std::sync::OnceLock::new());
    let workers = worker_specs(&args.model, &args.devices, Some(counter.clone()))?;
    let tokens: crate::server::TokenCounter = Arc::new(move |text: &str| {
        counter
            .get()
            .map_or_else(Default::default, |count: &TokenCounter| count(text))
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("turbine-http")
        .thread_keep_alive(crate::server::BLOCKING_THREAD_KEEP_ALIVE)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // First: a port already taken is said at once, not after a download.
        let port = listen_port(args.http.port, std::env::var("PORT").ok())?;
        let listener = crate::server::listen::listen(&args.http.host, port).await?;
        let metrics_listener = match args.http.metrics_port {
            Some(port) => Some(
                crate::server::listen::listen(&args.http.host, port)
                    .await
                    .context("--metrics-port")?,
            ),
            None => None,
        };
        crate::server::serve(
            config,
            listener,
            metrics_listener,
            workers,
            Some(tokens),
            stop_signals(),
        )
        .await
    })
}

/// SIGINT (Ctrl-C) and SIGTERM, an item each time one comes: the first stops the server, a
/// second ends its drain at once (as a second Ctrl-C is expected to). Listening starts here,
/// so a signal that comes before the server polls the stream is kept.
fn stop_signals() -> impl futures_util::Stream<Item = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for {name}: {e}");
                None
            }
        };
        async fn next(s: &mut Option<Signal>) -> Option<()> {
            match s {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        }
        let signals = (
            listen(SignalKind::interrupt(), "SIGINT"),
            listen(SignalKind::terminate(), "SIGTERM"),
        );
        futures_util::stream::unfold(signals, |(mut int, mut term)| async move {
            let name = tokio::select! {
                Some(()) = next(&mut int) => "SIGINT",
                Some(()) = next(&mut term) => "SIGTERM",
                else => return None,
            };
            tracing::info!("{name} received");
            Some(((), (int, term)))
        })
    }
    #[cfg(not(unix))]
    futures_util::stream::unfold((), |()| async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            return None;
        }
        tracing::info!("Ctrl-C received");
        Some(((), ()))
    })
}

/// The API's port: `--port` (`TURBINE_PORT`), else `PORT` (`env_port`) as platforms that run
/// containers set it (Cloud Run, Knative, and others after Heroku), else 8000.
fn listen_port(flag: Option<u16>, env_port: Option<String>) -> Result<u16, UsageError> {
    match (flag, env_port.as_deref().map(str::trim)) {
        (Some(port), _) => Ok(port),
        (None, None | Some("")) => Ok(8000),
        (None, Some(text)) => text.parse().map_err(|_| {
            UsageError(format!(
                "PORT must be a port number (0-65535), got {text:?}; or give --port"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::listen_port;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: super::Args,
    }

    #[test]
    fn the_cli_defaults_are_the_configs() {
        let cli = Cli::try_parse_from(["turbine"]).unwrap();
        let config = cli.serve.config().unwrap();
        let defaults = crate::server::config::ServerConfig::default();
        assert_eq!(config.model.id, defaults.model.id);
        assert_eq!(config.model.aliases, defaults.model.aliases);
        assert_eq!(config.max_connections, defaults.max_connections);
        assert_eq!(config.max_buffered_input, defaults.max_buffered_input);
        assert_eq!(config.forwarded_allow, defaults.forwarded_allow);
    }

    #[test]
    fn forwarded_allow_ips_parse_from_the_command_line() {
        use crate::server::config::ForwardedAllow;
        let parse = |args: &[&str]| config_of(args).map(|c| c.forwarded_allow);
        assert_eq!(
            parse(&["--forwarded-allow-ips", "*"]).unwrap(),
            ForwardedAllow::Any
        );
        assert_eq!(
            parse(&["--forwarded-allow-ips", "10.0.0.0/8,::1"]).unwrap(),
            ForwardedAllow::parse("10.0.0.0/8, ::1").unwrap()
        );
        let e = parse(&["--forwarded-allow-ips", "10.0.0.0/33"]).unwrap_err();
        assert!(e.contains("--forwarded-allow-ips"), "{e}");
    }

    /// The systemd unit in scripts/deploy names options and variables that exist: its
    /// ExecStart parses as `turbine serve`'s arguments, and each TURBINE_* it sets is one of
    /// serve's (or the global `TURBINE_LOG_FORMAT`).
    #[test]
    fn the_systemd_unit_names_real_options() {
        use clap::CommandFactory;
        let unit = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/deploy/turbine.service"
        ))
        .unwrap();
        let unit = unit.replace("\\\n", " ");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart line");
        let mut words = exec.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/turbine"));
        assert_eq!(words.next(), Some("serve"));
        let cli = Cli::try_parse_from(std::iter::once("turbine").chain(words))
            .unwrap_or_else(|e| panic!("ExecStart: {e}"));
        assert_eq!(listen_port(cli.serve.http.port, None).unwrap(), 8000);

        let known: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .chain(["TURBINE_LOG_FORMAT".to_string()])
            .collect();
        let set: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("Environment="))
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .filter(|k| k.starts_with("TURBINE_"))
            .collect();
        assert!(!set.is_empty());
        for var in set {
            assert!(
                known.iter().any(|k| k == var),
                "{var} is no option's variable"
            );
        }
    }

    #[test]
    fn the_port_is_the_flag_then_the_platforms_port_then_8000() {
        assert_eq!(listen_port(Some(9000), Some("8080".into())).unwrap(), 9000);
        assert_eq!(listen_port(None, Some("8080".into())).unwrap(), 8080);
        assert_eq!(listen_port(None, Some(" 8080\n".into())).unwrap(), 8080);
        assert_eq!(listen_port(None, Some(String::new())).unwrap(), 8000);
        assert_eq!(listen_port(None, None).unwrap(), 8000);
        for bad in ["http", "70000", "-1"] {
            let e = listen_port(None, Some(bad.into())).unwrap_err().to_string();
            assert!(
                e.contains("PORT must be a port number") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn max_connections_is_auto_or_a_positive_number() {
        let parse = |v: &str| {
            Cli::try_parse_from(["turbine".to_string(), format!("--max-connections={v}")])
                .map(|cli| cli.serve.config().unwrap().max_connections)
        };
        assert_eq!(parse("auto").unwrap(), None);
        assert_eq!(parse("AUTO").unwrap(), None);
        assert_eq!(parse("4096").unwrap(), Some(4096));
        for bad in ["0", "-1", "lots", ""] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("--max-connections"), "{bad}: {e}");
        }
    }

    /// `turbine ARGS`' server config, or the error that stops it.
    fn config_of(args: &[&str]) -> Result<crate::server::ServerConfig, String> {
        let mut argv = vec!["turbine"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())
            .and_then(|cli| cli.serve.config().map_err(|e| e.to_string()))
    }

    #[test]
    fn warmup_image_sizes_are_sizes_a_request_could_ask_for() {
        let parse = |args: &[&str]| config_of(args).map(|c| c.warmup_image_sizes);
        assert_eq!(parse(&[]).unwrap(), vec![]);
        assert_eq!(parse(&["--warmup-image-sizes", ""]).unwrap(), vec![]);
        assert_eq!(
            parse(&["--warmup-image-sizes", "1024x1024, 768x1344"]).unwrap(),
            vec![(1024, 1024), (768, 1344)]
        );
        for (bad, says) in [
            ("1024", "takes WIDTHxHEIGHT sizes, got \"1024\""),
            (
                "1024x1020",
                "1024x1020 must have sides that are multiples of 8",
            ),
            ("128x128", "between 256 and 1792"),
            ("1792x1792", "more than --max-image-pixels"),
        ] {
            let e = parse(&["--warmup-image-sizes", bad]).unwrap_err();
            assert!(
                e.contains("--warmup-image-sizes") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn max_buffered_input_bytes_is_auto_or_room_for_one_edit() {
        let parse = |args: &[&str]| config_of(args).map(|c| c.max_buffered_input);
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(
            parse(&["--max-buffered-input-bytes", "auto"]).unwrap(),
            None
        );
        let gib = (1u64 << 30).to_string();
        assert_eq!(
            parse(&["--max-buffered-input-bytes", &gib]).unwrap(),
            Some(1 << 30)
        );
        for bad in ["0", "-1", "lots"] {
            let arg = format!("--max-buffered-input-bytes={bad}");
            let e = parse(&[&arg]).unwrap_err();
            assert!(e.contains("--max-buffered-input-bytes"), "{bad}: {e}");
        }
        // Less than one edit with the files it names (4 x 32 MiB) could never be read.
        let e = parse(&["--max-buffered-input-bytes", "100000000"]).unwrap_err();
        assert!(e.contains("at least 134217728"), "{e}");
        assert_eq!(
            parse(&[
                "--max-buffered-input-bytes",
                "100000000",
                "--max-upload-bytes",
                "1000000"
            ])
            .unwrap(),
            Some(100_000_000)
        );
    }

    #[test]
    fn keep_alive_timeout_is_apart_from_the_header_read_timeout() {
        let parse = |args: &[&str]| {
            config_of(args).map(|c| (c.limits.header_timeout, c.limits.keep_alive_timeout))
        };
        let s = std::time::Duration::from_secs;
        assert_eq!(parse(&[]).unwrap(), (s(60), s(75)));
        assert_eq!(
            parse(&["--keep-alive-timeout", "620"]).unwrap(),
            (s(60), s(620))
        );
        let e = parse(&["--keep-alive-timeout", "0"]).unwrap_err();
        assert!(
            e.contains("--keep-alive-timeout must be at least 1 second"),
            "{e}"
        );
    }
}
