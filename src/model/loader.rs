//! Reading a model directory in the Hugging Face Hub's diffusers layout.
//!
//! ```text
//! model_index.json
//! unet/config.json            unet/diffusion_pytorch_model[.fp16].safetensors
//! vae/config.json             vae/diffusion_pytorch_model[.fp16].safetensors
//! text_encoder/config.json    text_encoder/model[.fp16].safetensors
//! text_encoder_2/config.json  text_encoder_2/model[.fp16].safetensors
//! tokenizer/  tokenizer_2/    vocab.json + merges.txt (or tokenizer.json), tokenizer_config.json
//! scheduler/scheduler_config.json
//! ```
//!
//! Weights are memory-mapped and cast to the run dtype tensor by tensor as the model asks for
//! them. Every tensor a model asks for is recorded, so after construction the loader can tell
//! which tensors of a checkpoint went unused (a sign that the code and the checkpoint disagree).
//!
//! Besides real files there are two more backends behind the same `VarBuilder` seam:
//! [`RandomWeights`] (the full architecture from configs alone, for benchmarks on machines
//! without weights) and [`RecordingBackend`] (records names and shapes without allocating, for
//! the test that our code reads exactly the tensors of a real checkpoint).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

/// Errors that name the file, tensor or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model directory {0} does not exist or is not a directory")]
    MissingDir(PathBuf),
    #[error("missing file {path}: {what}")]
    MissingFile { path: PathBuf, what: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported value in {path}: field `{field}` = {value} ({why})")]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        why: String,
    },
    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
}

pub type LoadResult<T> = std::result::Result<T, LoadError>;

/// Parses a JSON config file into `T`, naming the file (and serde's field path) on error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> LoadResult<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            LoadError::MissingFile {
                path: path.to_path_buf(),
                what: "config file not found".into(),
            }
        } else {
            LoadError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A model directory in the diffusers layout.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
}

impl ModelDir {
    pub fn open(root: impl Into<PathBuf>) -> LoadResult<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(LoadError::MissingDir(root));
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of one component (`unet`, `vae`, `text_encoder`, ...); it must exist.
    pub fn component(&self, name: &str) -> LoadResult<PathBuf> {
        let p = self.root.join(name);
        if !p.is_dir() {
            return Err(LoadError::MissingFile {
                path: p,
                what: format!("component folder `{name}` is missing from the model directory"),
            });
        }
        Ok(p)
    }

    /// The weights file of a component: `{stem}.safetensors`, else `{stem}.fp16.safetensors`.
    pub fn weights(&self, component: &str, stem: &str) -> LoadResult<PathBuf> {
        find_weights(&self.component(component)?, stem)
    }
}

/// Finds `{stem}.safetensors` or its `.fp16` variant in `dir`.
pub fn find_weights(dir: &Path, stem: &str) -> LoadResult<PathBuf> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(LoadError::MissingFile {
        path: dir.join(format!("{stem}.safetensors")),
        what: format!("no weights: expected {stem}.safetensors or {stem}.fp16.safetensors"),
    })
}

/// Which tensor names a backend was asked for. Shared between the backend and whoever built it.
#[derive(Debug, Default, Clone)]
pub struct Requested(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl Requested {
    pub(crate) fn record(&self, name: &str, shape: &Shape) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(name.to_string(), shape.dims().to_vec());
        }
    }

    /// The names asked for so far, with the shape asked for.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<usize>> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Maps the safetensors file `path` read-only; a file that is not one is an error naming it,
/// its message ending with `hint`.
pub(crate) fn map_safetensors(
    path: &Path,
    hint: &str,
) -> LoadResult<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: the file is mapped read-only; turbine never writes model files while serving
    // them, and a user truncating weights under a running server is outside what we guard.
    unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
        LoadError::Weights {
            path: path.to_path_buf(),
            message: format!("not a readable safetensors file: {e}{hint}"),
        }
    })
}

/// Memory-mapped safetensors files, recording which tensors were read.
pub struct SafetensorsBackend {
    path: PathBuf,
    inner: candle_core::safetensors::MmapedSafetensors,
    requested: Requested,
}

impl SafetensorsBackend {
    pub fn open(path: &Path) -> LoadResult<Self> {
        if !path.is_file() {
            return Err(LoadError::MissingFile {
                path: path.to_path_buf(),
                what: "weights file not found".into(),
            });
        }
        let inner = map_safetensors(path, "")?;
        Ok(Self {
            path: path.to_path_buf(),
            inner,
            requested: Requested::default(),
        })
    }

    /// Names and shapes of every tensor in the file.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.inner
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect()
    }

    pub fn requested(&self) -> Requested {
        self.requested.clone()
    }
}

/// Tensors that checkpoints may carry but no model reads (non-persistent buffers that older
/// `transformers` versions saved).
fn ignorable(name: &str) -> bool {
    name.ends_with("embeddings.position_ids")
}

impl SimpleBackend for SafetensorsBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requested.record(name, &s);
        let view = self.inner.get(name).map_err(|_| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` (shape {s:?}) is missing from {}",
                self.path.display()
            ))
        })?;
        if view.shape() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has shape {:?}, but the config implies {:?}",
                self.path.display(),
                view.shape(),
                s.dims()
            )));
        }
        self.inner.load(name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.load(name, dev)?;
        self.requested.record(name, t.shape());
        t.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
}

/// A loaded weights file: the `VarBuilder` to construct a model from, and what to check after.
pub struct Weights<'a> {
    pub path: PathBuf,
    pub vb: VarBuilder<'a>,
    all: BTreeMap<String, Vec<usize>>,
    requested: Requested,
}

impl Weights<'_> {
    /// Memory-maps `path`; tensors are cast to `dtype` and placed on `device` when read.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> LoadResult<Self> {
        Self::open_wrapped(path, dtype, device, |b| b)
    }

    /// [`Weights::open`] with the file's backend wrapped by `wrap` (LoRAs fused in as tensors
    /// are read: [`crate::model::lora::LoraBackend`]).
    pub fn open_wrapped(
        path: &Path,
        dtype: DType,
        device: &Device,
        wrap: impl FnOnce(Box<dyn SimpleBackend>) -> Box<dyn SimpleBackend>,
    ) -> LoadResult<Self> {
        let backend = SafetensorsBackend::open(path)?;
        let all = backend.tensor_shapes();
        let requested = backend.requested();
        Ok(Self {
            path: path.to_path_buf(),
            vb: VarBuilder::from_backend(wrap(Box::new(backend)), dtype, device.clone()),
            all,
            requested,
        })
    }

    /// Tensors present in the file that the model never asked for.
    pub fn unused(&self) -> Vec<String> {
        let asked = self.requested.snapshot();
        self.all
            .keys()
            .filter(|n| !asked.contains_key(*n) && !ignorable(n))
            .cloned()
            .collect()
    }

    /// Fails, naming the tensors, when the model left part of the checkpoint unread.
    pub fn ensure_all_used(&self) -> LoadResult<()> {
        self.ensure_used_but(&[])
    }

    /// [`Weights::ensure_all_used`], but for the tensors under the `ignored` prefixes: parts
    /// of a checkpoint the model leaves out on purpose (TAESD's encoder, when only its decoder
    /// runs).
    pub fn ensure_used_but(&self, ignored: &[&str]) -> LoadResult<()> {
        let unused: Vec<String> = self
            .unused()
            .into_iter()
            .filter(|name| !ignored.iter().any(|p| name.starts_with(p)))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<_> = unused.iter().take(8).cloned().collect();
        Err(LoadError::Weights {
            path: self.path.clone(),
            message: format!(
                "{} tensor(s) were not used by the model built from the config (the config and \
                 the weights disagree): {}{}",
                unused.len(),
                shown.join(", "),
                if unused.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        })
    }
}

/// Builds a model from the weights file at `path` (cast to `dtype` on `device`), naming the
/// file on any error and refusing a checkpoint whose tensors the model did not all read.
pub fn build_checked<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> LoadResult<T> {
    build_checked_but(path, dtype, device, &[], build)
}

/// [`build_checked`], leaving the tensors under the `ignored` prefixes unread.
pub fn build_checked_but<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    ignored: &[&str],
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> LoadResult<T> {
    build_checked_wrapped(path, dtype, device, ignored, |b| b, build)
}

/// [`build_checked_but`] with the file's backend wrapped by `wrap` ([`Weights::open_wrapped`]).
pub fn build_checked_wrapped<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    ignored: &[&str],
    wrap: impl FnOnce(Box<dyn SimpleBackend>) -> Box<dyn SimpleBackend>,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> LoadResult<T> {
    let weights = Weights::open_wrapped(path, dtype, device, wrap)?;
    let model = build(weights.vb.clone()).map_err(|e| weights_error(path, e))?;
    weights.ensure_used_but(ignored)?;
    Ok(model)
}

/// Wraps a candle error raised while building a model from `path` so it names the file.
pub fn weights_error(path: &Path, e: candle_core::Error) -> LoadError {
    LoadError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Deterministic random weights for the whole architecture without a checkpoint.
///
/// Each tensor is drawn from its own stream, seeded by `seed` and a hash of the tensor's name,
/// so a tensor's values do not depend on construction order. Scales keep activations in range
/// through deep stacks: 1-D `weight`s (norm scales) are 1, biases small, matrices and conv
/// kernels normal with std 1/sqrt(fan_in).
pub struct RandomWeights {
    seed: u64,
    requested: Requested,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            requested: Requested::default(),
        }
    }

    pub fn requested(&self) -> Requested {
        self.requested.clone()
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn values(&self, name: &str, shape: &Shape) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let dims = shape.dims();
        let n = shape.elem_count();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(name));
        let is_bias = name.ends_with("bias");
        if dims.len() == 1 && !is_bias {
            return vec![1.0; n];
        }
        let fan_in: usize = if dims.len() > 1 {
            dims[1..].iter().product()
        } else {
            1
        };
        let std = if is_bias {
            0.02
        } else {
            1.0 / (fan_in.max(1) as f32).sqrt()
        };
        // Uniform with the same std: cheaper than normal and just as good for benchmarks.
        let a = std * 3f32.sqrt();
        (0..n).map(|_| rng.random_range(-a..a)).collect()
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requested.record(name, &s);
        let v = self.values(name, &s);
        Tensor::from_vec(v, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Records every tensor name and shape a model asks for, handing out zero-cost broadcast
/// zeros. Builds the full-size models on a laptop's memory to compare their tensor lists
/// with a real checkpoint's.
#[derive(Default)]
pub struct RecordingBackend {
    requested: Requested,
}

impl RecordingBackend {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn requested(&self) -> Requested {
        self.requested.clone()
    }

    pub fn into_var_builder(self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, Device::Cpu)
    }
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.requested.record(name, &s);
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "recording backend needs a shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Hands the memory malloc keeps from freed allocations back to the system (glibc's
/// `malloc_trim`): after a load, whose temporaries would otherwise stay resident.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of malloc's own heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

thread_local! {
    static DERIVED: std::cell::RefCell<Option<DerivedMemo>> = const { std::cell::RefCell::new(None) };
}

type DerivedMemo = std::collections::HashMap<(Vec<candle_core::TensorId>, String), Tensor>;

/// While alive, tensors that layers derive from their weights at build time on this thread
/// ([`derived`]: a transposed copy, a scaled one) are remembered, so that a second build from
/// the same weights (a `--lora-modules` adapter's, served from [`Kept`]) shares the first's
/// copies instead of making its own.
pub struct SharedDerivations(());

/// What a build derived, by the tensors it derived them from ([`SharedDerivations::snapshot`]).
#[derive(Clone, Default)]
pub struct Derivations(DerivedMemo);

impl SharedDerivations {
    pub fn start() -> Self {
        Self::resume(Derivations::default())
    }

    /// Shares what `earlier` holds, as if derived on this thread since a `start`.
    pub fn resume(earlier: Derivations) -> Self {
        DERIVED.with(|d| *d.borrow_mut() = Some(earlier.0));
        Self(())
    }

    /// What has been derived so far on this thread while sharing (none when not sharing).
    pub fn snapshot() -> Derivations {
        Derivations(DERIVED.with(|d| d.borrow().clone().unwrap_or_default()))
    }
}

impl Drop for SharedDerivations {
    fn drop(&mut self) {
        DERIVED.with(|d| *d.borrow_mut() = None);
    }
}

/// `make()`, a tensor derived from `from` as `how` says; while [`SharedDerivations`] is alive,
/// the one made earlier from the very same tensors the same way, if any.
pub fn derived(
    from: &[&Tensor],
    how: impl Into<String>,
    make: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let sharing = DERIVED.with(|d| d.borrow().is_some());
    if !sharing {
        return make();
    }
    let key = (from.iter().map(|t| t.id()).collect::<Vec<_>>(), how.into());
    if let Some(t) = DERIVED.with(|d| d.borrow().as_ref().and_then(|m| m.get(&key).cloned())) {
        return Ok(t);
    }
    let t = make()?;
    DERIVED.with(|d| {
        if let Some(m) = d.borrow_mut().as_mut() {
            m.insert(key, t.clone());
        }
    });
    Ok(t)
}

/// The tensors a component was built from, by name, as the model received them: another build
/// of the component (a `--lora-modules` adapter's) is served from these, sharing their memory,
/// instead of reading the weights again and holding a second copy.
#[derive(Clone, Default)]
pub struct Kept(Arc<Mutex<BTreeMap<String, Tensor>>>);

impl Kept {
    /// `inner`, with every tensor it hands out kept here. With `transposed_matrices`, each
    /// matrix is handed out (and kept) as a view of its transpose laid out contiguously: what
    /// the UNet's linear layers hold ([`crate::model::unet::layers::Linear`]), which then take
    /// it as it is instead of keeping a transposed copy beside the kept original.
    pub fn keeping(
        &self,
        inner: Box<dyn SimpleBackend>,
        transposed_matrices: bool,
    ) -> Box<dyn SimpleBackend> {
        Box::new(KeepBackend {
            inner,
            kept: self.clone(),
            transposed_matrices,
        })
    }

    /// A backend that hands out the kept tensors, and fails on a name that was not kept.
    pub fn backend(&self) -> Box<dyn SimpleBackend> {
        Box::new(KeptBackend(self.clone()))
    }

    fn insert(&self, name: &str, t: &Tensor) {
        if let Ok(mut kept) = self.0.lock() {
            kept.insert(name.to_string(), t.clone());
        }
    }

    fn get(&self, name: &str) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .ok()
            .and_then(|k| k.get(name).cloned())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "`{name}` was not read by the model's own build (this is a bug)"
                ))
            })
    }
}

struct KeepBackend {
    inner: Box<dyn SimpleBackend>,
    kept: Kept,
    transposed_matrices: bool,
}

impl KeepBackend {
    fn keep(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let t = if self.transposed_matrices && t.rank() == 2 && t.stride().iter().all(|&s| s > 0) {
            t.t()?.contiguous()?.t()?
        } else {
            t
        };
        self.kept.insert(name, &t);
        Ok(t)
    }
}

impl SimpleBackend for KeepBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, name, init, dtype, dev)?;
        self.keep(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.keep(name, t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

struct KeptBackend(Kept);

impl SimpleBackend for KeptBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.0.get(name)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "`{name}` was kept as {:?}, asked for as {:?} (this is a bug)",
                t.dims(),
                s.dims()
            )));
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0 .0.lock().is_ok_and(|k| k.contains_key(name))
    }
}

/// Names that appear in exactly one of two tensor lists, or with different shapes.
pub fn diff_tensor_lists(
    ours: &BTreeMap<String, Vec<usize>>,
    theirs: &BTreeMap<String, Vec<usize>>,
) -> Vec<String> {
    let names: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
    names
        .into_iter()
        .filter_map(|n| match (ours.get(n), theirs.get(n)) {
            (Some(a), Some(b)) if a == b => None,
            (Some(a), Some(b)) => Some(format!("{n}: ours {a:?}, checkpoint {b:?}")),
            (Some(a), None) => Some(format!("{n}: read by us {a:?}, absent from checkpoint")),
            (None, Some(b)) => Some(format!("{n}: in checkpoint {b:?}, never read by us")),
            (None, None) => None,
        })
        .collect()
}
