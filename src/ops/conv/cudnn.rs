//! The cuDNN path of [`super::conv2d`]: one plan per shape, bias and residual fused.
//!
//! # Plans
//!
//! A plan is built the first time a (device, dtype, layout, N, C, H, W, O, kh, kw, padding,
//! stride, residual) combination is seen on a thread, and reused for every later call:
//! - the tensor, filter, convolution and activation descriptors, built once;
//! - the math type: tensor-op math for f16/bf16 with f32 accumulation (cuDNN's PSEUDO_HALF and
//!   PSEUDO_BFLOAT16 configurations, one rounding of the output, as the CPU path computes);
//!   FMA math for f32, so f32 stays f32 (no TF32);
//! - the algorithm, chosen by `cudnnFindConvolutionForwardAlgorithmEx`, which runs every algorithm
//!   on the shape and returns them by measured time (what `torch.backends.cudnn.benchmark = True`
//!   does). cuDNN's heuristic (`cudnnGetConvolutionForwardAlgorithm_v7`, what candle asks on every
//!   call) guesses from the shape alone; timing costs a few milliseconds per shape once, at the
//!   server's warm-up batch for its batch size, and a shape's first batch for other sizes.
//!   The search runs on the call's own x, w and y and a workspace of at most [`MAX_WORKSPACE`]
//!   that is freed after it, so it costs no memory beyond that: the variant without `Ex`
//!   allocates its own x, y and workspace, several GiB at once for the VAE decoder's largest
//!   maps at batch 16-32, a spike any measurement of peak memory sees. An algorithm that needs
//!   more workspace than the search gets (`find_workspace_bytes`: 4x the shape's x and y, 16 MiB
//!   to [`MAX_WORKSPACE`]) reports `ALLOC_FAILED` there and is passed over;
//! - the epilogue (below), measured too.
//!
//! The workspace is one buffer per device and thread that only grows, shared by every plan (the
//! convolutions of a thread run one after another on one stream): no allocation and no zeroing
//! per call, where candle allocates and memsets a fresh one each time.
//!
//! cuDNN handles are not `Send`; like candle's, ours live in a thread-local map keyed by device
//! (turbine runs one worker thread per device), and the plans and workspace with them.
//!
//! # Bias and residual: the bytes
//!
//! Let |y| be the bytes of the output (the residual has the same size). The unfused form
//! (candle's conv, then `broadcast_add(bias)`, then `+ residual`) moves 2|y| for the bias pass
//! (read y, write y) and 3|y| for the residual pass (read both, write the sum) beyond the
//! convolution's own write of y.
//! - [`Epilogue::Fused`]: `cudnnConvolutionBiasActivationForward` with an identity activation
//!   computes `y = conv(x, w) + 1·z + bias` in the convolution's epilogue, z = the residual: the
//!   extra traffic is one read of z (|y|) with a residual, nothing without (the bias is a vector).
//!   Saves 4|y| (residual) or 2|y| (bias only). Its catch: cuDNN runs an identity activation only
//!   with `IMPLICIT_PRECOMP_GEMM`, which may not be the fastest algorithm for the shape.
//! - [`Epilogue::Prefill`]: our kernel writes `bias (+ residual)` into y (|y| written, |y| read
//!   with a residual), then the fastest algorithm accumulates with `beta = 1` (one more read of
//!   y): 3|y| with a residual, 2|y| without. Saves 2|y| (residual) and nothing but a kernel
//!   launch without; it rounds twice (the prefill, then the sum), which is within bf16's bound.
//!
//! So the fused call wins on bytes everywhere, by 2|y| per convolution, unless
//! `IMPLICIT_PRECOMP_GEMM` is slower than the best algorithm by more than moving 2|y| costs, or
//! cuDNN does not support the fused call for the dtype/layout (it then returns
//! `CUDNN_STATUS_NOT_SUPPORTED`, which we catch). Rather than guess, the plan times both once
//! (CUDA events, after a warm-up call) and keeps the faster; [`super::with_conv_epilogue`]
//! forces one, for the tests.
//!
//! # Graph-API plans (the `conv-graph` lever)
//!
//! cuDNN's legacy call reaches the engines it maps to its algorithm enums; its graph API (what
//! PyTorch's convolutions call) lists engines by its own heuristic, and on a new GPU the two sets
//! need not be the same. With the lever (and [`ConvEpilogue::Measure`], f16/bf16), a plan also
//! builds up to [`MAX_GRAPH_CANDIDATES`] graph-API plans (`graph.rs`: heuristic mode A, then
//! its fallback list, pre-compiled engines only), runs each once on the call's buffers with the
//! `Prefill` epilogue and compares [`GRAPH_PROBE`] elements of its output, spread over the whole
//! tensor, with the legacy choice's, times those that agree (as the legacy choice is timed:
//! behind an untimed call), and keeps the fastest if it beats the legacy choice.
//! Anything that goes wrong on the way (no engine, a refused finalize, a disagreeing output, a
//! failed call later) leaves the legacy choice, which also runs any call whose pointers miss
//! the graph plans' declared alignment. [`ConvEpilogue::Graph`] forces the graph plan, for the
//! tests.
//!
//! Without a residual, the fused call is given z = y with `alpha2 = 0`: cuDNN does not read z
//! when its scale is zero (TensorFlow's fused convolution relies on the same), and the tests run
//! this on outputs poisoned with NaN.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::cudnn::{result as dnn, sys, CudnnError};
use candle_core::cuda_backend::cudarc::driver::result::memset_d8_async;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Storage, Tensor, WithDType};

use super::plan_cache::PlanCache;
use super::{
    aligned, conv_epilogue, conv_plan_limit, disagreement, probe_ranges, sub_batch, sub_batch_cap,
    sub_batches, ConvEpilogue, ConvParams, Geometry, CONV_FALLBACK as FALLBACK,
    CONV_FIRST_CALL_FAILED, CONV_GRAPH_FAILED_LATER, CONV_PLAN_EVICTED, CONV_SUB_BATCHES,
    MAX_CONV_PLAN_LINES,
};
use crate::ops::cuda::{contiguous_view, to_i32, to_u32};
use crate::ops::select::{enabled, Kernels};

mod graph;

/// Largest workspace a plan may use, and the most the algorithm search is given: 256 MiB, 2% of
/// the VAE decoder's activations at batch 16 and 1% of a 24 GB card. The workspace is memory the
/// server holds (peak GPU memory is one of its targets), so it is capped, not free. The fast
/// tensor-core algorithms' workspace grows with the batch (the H200's first gpu_check run: 33 MiB
/// an image for the VAE decoder's 512-channel 128x128 convolution, 192 MiB for its 256->128 one
/// at 512x512), so a batch whose share is over the cap runs in sub-batches
/// ([`DeviceState::sub_batch`]) rather than with an algorithm that needs none.
const MAX_WORKSPACE: usize = 256 << 20;

/// The algorithm search's workspace for a shape: four times its x and y together (no fast
/// algorithm needs that much), at least 16 MiB, at most [`MAX_WORKSPACE`].
fn find_workspace_bytes(g: &Geometry, elem_bytes: usize) -> usize {
    let xy = (g.n * g.c * g.h * g.w + g.elems_out()) * elem_bytes;
    xy.saturating_mul(4).clamp(16 << 20, MAX_WORKSPACE)
}

/// Calls per candidate when timing the epilogues and graph plans (after one untimed warm-up
/// call). A small UNet convolution runs in tens of microseconds, so a few calls more keep one
/// slow call from deciding; the largest (~10 ms) are planned once per batch size.
const TIMED_RUNS: usize = 5;

/// Graph-API plans checked and timed per shape (`conv-graph`), the heuristic's best first. Each
/// costs four runs of the convolution at planning time (the VAE decoder's largest at batch 32
/// is ~10 ms a run on an H200), once per shape and batch size.
const MAX_GRAPH_CANDIDATES: usize = 2;

/// Elements of y compared when a graph plan is checked against the legacy choice, in
/// [`PROBE_RUNS`] runs spread evenly over y (so that every part of the batch and, in NCHW, of the
/// channels is looked at).
const GRAPH_PROBE: usize = 1 << 15;
const PROBE_RUNS: usize = 64;

const PREFILL_MODULE: &str = "turbine_conv_prefill";
const PREFILL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_prefill.ptx"));

pub(super) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// A failed cuDNN call as a candle error naming the op and the call.
fn failed(call: &'static str) -> impl FnOnce(CudnnError) -> candle_core::Error {
    move |e| candle_core::Error::Msg(format!("conv2d: {call} failed: {e:?}"))
}

/// RAII owners of cuDNN objects (destroy errors are ignored: there is nothing to do about them
/// in a destructor).
macro_rules! cudnn_object {
    ($name:ident, $raw:ty, $destroy:path) => {
        struct $name($raw);
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created by the matching cudnnCreate* call and destroyed only here.
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}

unsafe fn destroy_handle(h: sys::cudnnHandle_t) -> sys::cudnnStatus_t {
    sys::cudnnDestroy(h)
}
unsafe fn destroy_tensor(d: sys::cudnnTensorDescriptor_t) -> sys::cudnnStatus_t {
    sys::cudnnDestroyTensorDescriptor(d)
}
unsafe fn destroy_filter(d: sys::cudnnFilterDescriptor_t) -> sys::cudnnStatus_t {
    sys::cudnnDestroyFilterDescriptor(d)
}
unsafe fn destroy_conv(d: sys::cudnnConvolutionDescriptor_t) -> sys::cudnnStatus_t {
    sys::cudnnDestroyConvolutionDescriptor(d)
}
unsafe fn destroy_activation(d: sys::cudnnActivationDescriptor_t) -> sys::cudnnStatus_t {
    sys::cudnnDestroyActivationDescriptor(d)
}

cudnn_object!(Handle, sys::cudnnHandle_t, destroy_handle);
cudnn_object!(TensorDesc, sys::cudnnTensorDescriptor_t, destroy_tensor);
cudnn_object!(FilterDesc, sys::cudnnFilterDescriptor_t, destroy_filter);
cudnn_object!(ConvDesc, sys::cudnnConvolutionDescriptor_t, destroy_conv);
cudnn_object!(
    ActivationDesc,
    sys::cudnnActivationDescriptor_t,
    destroy_activation
);

/// cuDNN 9.0.0 as `cudnnGetVersion` reports it (major * 10000 + minor * 100 + patch).
const CUDNN_MAJOR_MIN: usize = 90_000;
/// The cuDNN release whose headers cudarc's bindings were generated from (its `cudnn-09021`
/// feature, which candle's `cudnn` feature selects).
const CUDNN_BINDINGS: usize = 92_100;

impl Handle {
    fn new(stream: &CudaStream) -> Result<Self> {
        // cudarc's bindings (cuDNN 9.21's headers) read every returned status as their enum, so
        // a library of another major version, whose codes differ, is refused before any call
        // returns one; a later 9.x is only warned about (new codes are rare and not expected
        // from the calls used here).
        let version = dnn::get_version();
        if !(CUDNN_MAJOR_MIN..CUDNN_MAJOR_MIN + 10_000).contains(&version) {
            bail!(
                "conv2d: the loaded cuDNN is version {version}; turbine's convolutions need \
                 cuDNN 9 (libcudnn.so.9)"
            );
        }
        tracing::info!(version, "cuDNN loaded");
        if version > CUDNN_BINDINGS {
            tracing::warn!(
                version,
                "cuDNN is newer than the bindings turbine was built with ({CUDNN_BINDINGS})"
            );
        }
        stream.context().bind_to_thread().w()?;
        let handle = Self(dnn::create_handle().map_err(failed("cudnnCreate"))?);
        // SAFETY: both are live; cuDNN then enqueues everything on candle's stream for the
        // device, in order with candle's own kernels.
        unsafe { dnn::set_stream(handle.0, stream.cu_stream() as sys::cudaStream_t) }
            .map_err(failed("cudnnSetStream"))?;
        Ok(handle)
    }
}

fn data_type(dtype: DType) -> Result<sys::cudnnDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        other => bail!("conv2d: no cuDNN path for dtype {other:?}"),
    })
}

fn tensor_desc(
    dtype: sys::cudnnDataType_t,
    format: sys::cudnnTensorFormat_t,
    dims: [i32; 4],
) -> Result<TensorDesc> {
    let d =
        TensorDesc(dnn::create_tensor_descriptor().map_err(failed("cudnnCreateTensorDescriptor"))?);
    // SAFETY: `d` is a live descriptor.
    unsafe { dnn::set_tensor4d_descriptor(d.0, format, dtype, dims) }
        .map_err(failed("cudnnSetTensor4dDescriptor"))?;
    Ok(d)
}

/// The descriptors of one shape.
struct Descriptors {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    bias: TensorDesc,
    conv: ConvDesc,
    act: ActivationDesc,
}

impl Descriptors {
    fn new(dtype: DType, g: &Geometry, p: &ConvParams) -> Result<Self> {
        let dt = data_type(dtype)?;
        let format = if p.channels_last {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let i = |v: usize, what| to_i32(v, what);
        // cuDNN takes logical (N, C, H, W) sizes whatever the format; the format sets the strides.
        let x = tensor_desc(
            dt,
            format,
            [
                i(g.n, "batch")?,
                i(g.c, "channels")?,
                i(g.h, "height")?,
                i(g.w, "width")?,
            ],
        )?;
        let y = tensor_desc(
            dt,
            format,
            [
                i(g.n, "batch")?,
                i(g.o, "out channels")?,
                i(g.oh, "out height")?,
                i(g.ow, "out width")?,
            ],
        )?;
        let bias = tensor_desc(dt, format, [1, i(g.o, "out channels")?, 1, 1])?;

        let w = FilterDesc(
            dnn::create_filter_descriptor().map_err(failed("cudnnCreateFilterDescriptor"))?,
        );
        // NHWC filters are KRSC ([O, kh, kw, C]), the layout `ConvParams::channels_last` asks for.
        let dims = [
            i(g.o, "out channels")?,
            i(g.c, "channels")?,
            i(g.kh, "kernel")?,
            i(g.kw, "kernel")?,
        ];
        // SAFETY: `w` is a live descriptor.
        unsafe { dnn::set_filter4d_descriptor(w.0, dt, format, dims) }
            .map_err(failed("cudnnSetFilter4dDescriptor"))?;

        let conv = ConvDesc(
            dnn::create_convolution_descriptor()
                .map_err(failed("cudnnCreateConvolutionDescriptor"))?,
        );
        let (pad, stride) = (i(p.padding, "padding")?, i(p.stride, "stride")?);
        // SAFETY: `conv` is a live descriptor. Compute type f32 for every dtype.
        unsafe {
            dnn::set_convolution2d_descriptor(
                conv.0,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
        }
        .map_err(failed("cudnnSetConvolution2dDescriptor"))?;

        let act = ActivationDesc(
            dnn::create_activation_descriptor()
                .map_err(failed("cudnnCreateActivationDescriptor"))?,
        );
        // SAFETY: `act` is a live descriptor.
        unsafe {
            dnn::set_activation_descriptor(
                act.0,
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                0.0,
            )
        }
        .map_err(failed("cudnnSetActivationDescriptor"))?;
        Ok(Self {
            x,
            w,
            y,
            bias,
            conv,
            act,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Epilogue {
    Fused,
    Prefill,
}

/// What a plan runs.
#[derive(Debug, Clone, Copy)]
struct Choice {
    algo: sys::cudnnConvolutionFwdAlgo_t,
    math: sys::cudnnMathType_t,
    workspace: usize,
    epilogue: Epilogue,
}

struct Plan {
    desc: Descriptors,
    /// The legacy algorithm: what runs when there is no graph plan, or a call's pointers do not
    /// meet its alignment.
    choice: Choice,
    /// A graph-API plan that was checked against `choice`'s output and (unless forced by
    /// [`ConvEpilogue::Graph`]) measured faster; runs with the `Prefill` epilogue.
    graph: Option<graph::GraphPlan>,
    /// How the choice was made (timings, refusals, cuDNN's list), for [`plan_summaries`].
    note: String,
}

impl Plan {
    fn describe(&self) -> String {
        let c = &self.choice;
        let runs = match &self.graph {
            Some(g) => format!(
                "Graph {} workspace {} KiB (legacy fallback: ",
                g.name,
                g.workspace >> 10
            ),
            None => String::new(),
        };
        format!(
            "{runs}{:?} {:?} {:?} workspace {} KiB{};{}",
            c.epilogue,
            c.algo,
            c.math,
            c.workspace >> 10,
            if self.graph.is_some() { ")" } else { "" },
            self.note
        )
    }
}

fn describe(key: &PlanKey) -> String {
    let (g, p) = (&key.geometry, &key.params);
    format!(
        "{:?} {} x[n={} c={} h={} w={}] o={} k={}x{} pad={} stride={} residual={} mode={:?} \
         graph={}",
        key.dtype,
        if p.channels_last { "NHWC" } else { "NCHW" },
        g.n,
        g.c,
        g.h,
        g.w,
        g.o,
        g.kh,
        g.kw,
        p.padding,
        p.stride,
        key.residual,
        key.mode,
        key.graph,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    dtype: DType,
    geometry: Geometry,
    params: ConvParams,
    residual: bool,
    mode: ConvEpilogue,
    /// Graph-API plans are weighed: [`ConvEpilogue::Graph`], or the `conv-graph` lever with
    /// [`ConvEpilogue::Measure`]; half dtypes only.
    graph: bool,
}

/// One device's cuDNN state on this thread. Fields drop in declaration order: the plans (whose
/// graph-API execution plans were built on the handle) before the handle.
struct DeviceState {
    /// `None`: cuDNN could not plan the shape; it runs candle's ops. At most
    /// [`conv_plan_limit`] plans, the least recently used dropped first.
    plans: PlanCache<PlanKey, Option<Plan>>,
    /// Images per call of a batch shape, for the sub-batch cap it was decided under
    /// ([`DeviceState::sub_batch`]); bounded as the plans are.
    splits: PlanCache<(PlanKey, usize), usize>,
    /// The [`plan_summaries`] lines, at most [`MAX_CONV_PLAN_LINES`] (the oldest dropped).
    summaries: Summaries,
    /// Grows to the largest workspace any plan needs; never shrinks.
    workspace: Option<CudaSlice<u8>>,
    handle: Handle,
}

thread_local! {
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

/// Plan summary lines, the newest [`MAX_CONV_PLAN_LINES`] of them.
#[derive(Default)]
struct Summaries(VecDeque<String>);

impl Summaries {
    fn push(&mut self, line: String) {
        if self.0.len() >= MAX_CONV_PLAN_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line);
    }

    fn iter(&self) -> impl Iterator<Item = &String> {
        self.0.iter()
    }
}

pub(super) fn plan_summaries() -> Vec<String> {
    STATE.with(|s| {
        s.borrow()
            .values()
            .flat_map(|d| d.summaries.iter().cloned())
            .collect()
    })
}

/// The operands of one call, as views of candle's storage.
struct Operands<'a, T> {
    x: CudaView<'a, T>,
    w: CudaView<'a, T>,
    bias: CudaView<'a, T>,
    residual: Option<CudaView<'a, T>>,
}

/// The convolution through its plan, or `None` when cuDNN could not plan the shape (an error
/// while building it: the caller then runs candle's ops, and the plan summary says why).
/// Errors of an established plan are errors.
pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    params: ConvParams,
    g: &Geometry,
) -> Result<Option<Tensor>> {
    for (name, t) in [("weight", weight), ("bias", bias)]
        .into_iter()
        .chain(residual.map(|r| ("residual", r)))
    {
        if !t.device().same_device(x.device()) {
            bail!(
                "conv2d: {name} is on {:?}, x on {:?}",
                t.device().location(),
                x.device().location()
            );
        }
    }
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.to_dtype(x.dtype())?.contiguous()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;

    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let res = residual.as_ref().map(|r| r.storage_and_layout());
    let xs = (cuda(&xs, "x")?, xl);
    let ws = (cuda(&ws, "weight")?, wl);
    let bs = (cuda(&bs, "bias")?, bl);
    let rs = match &res {
        Some((s, l)) => Some((cuda(s, "residual")?, *l)),
        None => None,
    };
    let dev = xs.0.device().clone();
    let y = match x.dtype() {
        DType::F32 => run::<f32>(&dev, xs, ws, bs, rs, params, g)?,
        DType::F16 => run::<half::f16>(&dev, xs, ws, bs, rs, params, g)?,
        DType::BF16 => run::<half::bf16>(&dev, xs, ws, bs, rs, params, g)?,
        other => bail!("conv2d: no cuDNN path for dtype {other:?}"),
    };
    Ok(y.map(|y| {
        Tensor::from_storage(
            Storage::Cuda(y),
            g.out_shape(params.channels_last),
            BackpropOp::none(),
            false,
        )
    }))
}

type Operand<'a> = (&'a CudaStorage, &'a Layout);

fn cuda<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("conv2d: {what} is not in CUDA memory"),
    }
}

fn run<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    x: Operand,
    w: Operand,
    bias: Operand,
    residual: Option<Operand>,
    params: ConvParams,
    g: &Geometry,
) -> Result<Option<CudaStorage>> {
    let ops = Operands {
        x: contiguous_view::<T>(x.0, x.1, "conv2d x")?,
        w: contiguous_view::<T>(w.0, w.1, "conv2d weight")?,
        bias: contiguous_view::<T>(bias.0, bias.1, "conv2d bias")?,
        residual: residual
            .map(|r| contiguous_view::<T>(r.0, r.1, "conv2d residual"))
            .transpose()?,
    };
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    // SAFETY: every element is written: by cuDNN (beta = 0), or by the prefill kernel and then
    // cuDNN accumulating into it (beta = 1), one sub-batch after another when the batch is split.
    let mut y = unsafe { dev.alloc::<T>(g.elems_out())? };
    let mode = conv_epilogue();
    let key = PlanKey {
        dtype: T::DTYPE,
        geometry: *g,
        params,
        residual: ops.residual.is_some(),
        mode,
        graph: T::DTYPE != DType::F32
            && (mode == ConvEpilogue::Graph
                || (mode == ConvEpilogue::Measure && enabled(Kernels::CONV_GRAPH))),
    };
    let planned = STATE.with(|state| -> Result<bool> {
        let mut map = state.borrow_mut();
        let st = match map.entry(dev.id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(DeviceState {
                handle: Handle::new(&stream)?,
                workspace: None,
                plans: PlanCache::new(),
                splits: PlanCache::new(),
                summaries: Summaries::default(),
            }),
        };
        let per_call = st.sub_batch(&key);
        if per_call >= g.n {
            return call(dev, st, key, &ops, &mut y.as_view_mut());
        }
        // The batch in sub-batches, each on its slice of x, residual and y (the batch is the
        // outermost dimension in both layouts), with the plan of its own size.
        let (x_image, y_image) = (g.c * g.h * g.w, g.elems_out() / g.n);
        for (first, n) in sub_batches(g.n, per_call) {
            let (xr, yr) = (
                first * x_image..(first + n) * x_image,
                first * y_image..(first + n) * y_image,
            );
            let part = Operands {
                x: ops.x.slice(xr),
                w: ops.w.slice(..),
                bias: ops.bias.slice(..),
                residual: ops.residual.as_ref().map(|r| r.slice(yr.clone())),
            };
            let sub = PlanKey {
                geometry: Geometry { n, ..*g },
                ..key
            };
            // A sub-batch that cuDNN cannot plan sends the whole call to candle's ops.
            if !call(dev, st, sub, &part, &mut y.slice_mut(yr))? {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    Ok(planned.then(|| CudaStorage::wrap_cuda_slice(y, dev.clone())))
}

impl DeviceState {
    /// Images per call for `key`'s batch ([`sub_batch`]), decided once per shape from the
    /// workspace cuDNN's implicit precomputed GEMM asks for the whole batch: that algorithm, or
    /// the graph API's engine like it, is the fastest on tensor cores for nearly every shape of
    /// the model, and its workspace grows with the batch (on an H200 about 33 MiB an image for
    /// the VAE decoder's 512-channel 128x128 convolution, 192 MiB for its 256->128 one at
    /// 512x512). Over the cap, a plan for the whole batch could only pick the slow algorithms
    /// that need none (17.9 ms instead of 2 x 0.57 ms at batch 8, measured); sub-batches run
    /// the fast one at the same speed per image with a bounded workspace.
    fn sub_batch(&mut self, key: &PlanKey) -> usize {
        let n = key.geometry.n;
        let cap = sub_batch_cap().unwrap_or(MAX_WORKSPACE);
        if n <= 1 {
            return n;
        }
        if let Some(per_call) = self.splits.get_mut(&(*key, cap)) {
            return *per_call;
        }
        let per_call = self.decide_sub_batch(key, cap);
        // A dropped decision is made again (a workspace query) if its shape returns.
        self.splits.insert((*key, cap), per_call, conv_plan_limit());
        per_call
    }

    /// [`DeviceState::sub_batch`]'s decision for a shape it has not seen under `cap`.
    fn decide_sub_batch(&mut self, key: &PlanKey, cap: usize) -> usize {
        let n = key.geometry.n;
        let bytes = match precomp_gemm_workspace(&self.handle, key) {
            Ok(b) => b,
            // Nothing to go by: the plan decides for the whole batch, as without a split.
            Err(e) => {
                tracing::debug!("conv2d: {}: no workspace query: {e}", describe(key));
                return n;
            }
        };
        let per_call = sub_batch(n, bytes, cap);
        if per_call < n {
            let summary = format!(
                "{}: {CONV_SUB_BATCHES} {per_call} (implicit precomputed GEMM asks {} KiB of \
                 workspace for {n} images, the cap is {} KiB)",
                describe(key),
                bytes >> 10,
                cap >> 10
            );
            tracing::debug!("conv2d plan: {summary}");
            self.summaries.push(summary);
        }
        per_call
    }
}

/// The workspace `CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM` asks for `key`'s shape, in
/// the math a plan starts from ([`plan_math`]).
fn precomp_gemm_workspace(handle: &Handle, key: &PlanKey) -> Result<usize> {
    let desc = Descriptors::new(key.dtype, &key.geometry, &key.params)?;
    // SAFETY: live descriptor.
    unsafe { dnn::set_convolution_math_type(desc.conv.0, plan_math(key.dtype)) }
        .map_err(failed("cudnnSetConvolutionMathType"))?;
    workspace_size(
        handle,
        &desc,
        sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
    )
}

/// The math type a plan searches in: FMA for f32 (no TF32), tensor-op math for f16/bf16.
fn plan_math(dtype: DType) -> sys::cudnnMathType_t {
    if dtype == DType::F32 {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    }
}

/// The workspace cuDNN asks for `algo` on `desc`'s shape, in the math type set on its
/// convolution descriptor.
fn workspace_size(
    handle: &Handle,
    desc: &Descriptors,
    algo: sys::cudnnConvolutionFwdAlgo_t,
) -> Result<usize> {
    let mut bytes = 0usize;
    // SAFETY: live handle and descriptors, valid out pointer.
    unsafe {
        sys::cudnnGetConvolutionForwardWorkspaceSize(
            handle.0,
            desc.x.0,
            desc.w.0,
            desc.conv.0,
            desc.y.0,
            algo,
            &mut bytes,
        )
    }
    .result()
    .map_err(failed("cudnnGetConvolutionForwardWorkspaceSize"))?;
    Ok(bytes)
}

/// One call of `key`'s shape through its plan (built on the first call), writing all of `y`;
/// `Ok(false)` when cuDNN could not plan the shape (the caller runs candle's ops).
fn call<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    st: &mut DeviceState,
    key: PlanKey,
    ops: &Operands<T>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<bool> {
    let DeviceState {
        handle,
        workspace,
        plans,
        summaries,
        ..
    } = st;
    let (g, params) = (&key.geometry, key.params);
    let stream = dev.cuda_stream();
    // Whether this call builds the plan (its first call is the one below).
    let fresh = !plans.contains(&key);
    let plan = if !fresh {
        plans.get_mut(&key)
    } else {
        let planned = Descriptors::new(T::DTYPE, g, &params).and_then(|desc| {
            let (choice, graph, note) = choose(dev, handle, &desc, &key, ops, y, workspace)?;
            Ok(Plan {
                desc,
                choice,
                graph,
                note,
            })
        });
        let plan = match planned {
            // Out of memory says nothing about the shape: no verdict is kept, the batch
            // fails (the server runs it again in smaller parts) and the next call of this
            // shape plans again.
            Err(err) if crate::device::is_out_of_memory(&err.to_string()) => {
                return Err(err);
            }
            Ok(plan) => {
                let summary = format!("{}: {}", describe(&key), plan.describe());
                tracing::debug!("conv2d plan: {summary}");
                summaries.push(summary);
                Some(plan)
            }
            Err(err) => {
                let summary = format!("{}: {FALLBACK}: {err}", describe(&key));
                tracing::warn!("conv2d plan: {summary}");
                summaries.push(summary);
                None
            }
        };
        let limit = conv_plan_limit();
        let first_eviction = plans.evicted() == 0;
        let (plan, dropped) = plans.insert(key, plan, limit);
        if first_eviction && !dropped.is_empty() {
            tracing::info!(
                "conv2d: {limit} cuDNN plans held on {:?}; from now on the least recently \
                 used is dropped for each new shape (a shape that returns is planned again)",
                dev.location()
            );
        }
        for old in dropped {
            let summary = format!("{}: {CONV_PLAN_EVICTED} (limit {limit})", describe(&old));
            tracing::debug!("conv2d plan: {summary}");
            summaries.push(summary);
        }
        Some(plan)
    };
    // The outer `None` cannot happen (the key was found, or just inserted, and an insertion
    // keeps its own entry); the inner one is a shape cuDNN could not plan.
    let Some(Some(plan)) = plan else {
        return Ok(false);
    };
    if let Some(gp) = &plan.graph {
        if pointers_aligned(&stream, ops, y) {
            match launch_graph(dev, handle, gp, ops, y, workspace, g, &params) {
                Ok(()) => return Ok(true),
                // Keeps the graph plan: the engine did not fail, the memory ran out.
                Err(err) if crate::device::is_out_of_memory(&err.to_string()) => {
                    return Err(err);
                }
                Err(err) => {
                    // The legacy choice below overwrites all of y.
                    let summary = format!(
                        "{}: graph plan {} failed, {CONV_GRAPH_FAILED_LATER}: {err}",
                        describe(&key),
                        gp.name
                    );
                    tracing::warn!("conv2d plan: {summary}");
                    summaries.push(summary);
                    plan.graph = None;
                }
            }
        }
    }
    let launched = launch(
        dev,
        handle,
        &plan.desc,
        plan.choice,
        ops,
        y,
        workspace,
        g,
        &params,
    );
    match launched {
        Ok(()) => Ok(true),
        // The first call of a fresh plan (its choice ran once while planning, but on other
        // pointers, and a fused choice only in the NaN check): a failure drops the plan for
        // candle's ops instead of failing every call of the shape.
        Err(err) if fresh && !crate::device::is_out_of_memory(&err.to_string()) => {
            let summary = format!(
                "{}: {FALLBACK}: {CONV_FIRST_CALL_FAILED}: {err}",
                describe(&key)
            );
            tracing::warn!("conv2d plan: {summary}");
            summaries.push(summary);
            plans.insert(key, None, conv_plan_limit());
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

/// Makes `ws` hold at least `bytes`, rounded up to whole MiB so that a series of slightly larger
/// shapes does not reallocate each time.
fn grow_workspace(dev: &CudaDevice, ws: &mut Option<CudaSlice<u8>>, bytes: usize) -> Result<()> {
    if bytes == 0 || ws.as_ref().is_some_and(|w| w.len() >= bytes) {
        return Ok(());
    }
    // Freed first (stream-ordered, after the calls that used it), so the peak is the new size.
    *ws = None;
    // SAFETY: cuDNN scratch memory, never read before cuDNN writes it.
    *ws = Some(unsafe { dev.alloc::<u8>(bytes.next_multiple_of(1 << 20))? });
    Ok(())
}

/// `cudnnConvolutionFwdAlgoPerf_t` with its enums as plain integers, so that a value this cudarc
/// version does not know (a newer cuDNN's) cannot be read into a Rust enum.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AlgoPerf {
    algo: u32,
    status: u32,
    time: f32,
    memory: usize,
    determinism: u32,
    math_type: u32,
    reserved: [i32; 3],
}

const _: () = assert!(
    std::mem::size_of::<AlgoPerf>() == std::mem::size_of::<sys::cudnnConvolutionFwdAlgoPerf_t>()
        && std::mem::align_of::<AlgoPerf>()
            == std::mem::align_of::<sys::cudnnConvolutionFwdAlgoPerf_t>()
);

fn algo_from(v: u32) -> Option<sys::cudnnConvolutionFwdAlgo_t> {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    Some(match v {
        0 => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        1 => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        2 => A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        3 => A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        4 => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        5 => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        6 => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        7 => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        _ => return None,
    })
}

fn math_from(v: u32) -> Option<sys::cudnnMathType_t> {
    use sys::cudnnMathType_t as M;
    Some(match v {
        0 => M::CUDNN_DEFAULT_MATH,
        1 => M::CUDNN_TENSOR_OP_MATH,
        2 => M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        3 => M::CUDNN_FMA_MATH,
        _ => return None,
    })
}

/// Times every algorithm (`cudnnFindConvolutionForwardAlgorithmEx` on this call's x and w, with y
/// as its output and a scratch workspace of [`find_workspace_bytes`], freed afterwards) and
/// returns the usable ones, fastest first: succeeded, workspace within [`MAX_WORKSPACE`], and for
/// f32 FMA math only (the default math may run TF32 on tensor cores).
fn find<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    handle: &Handle,
    desc: &Descriptors,
    key: &PlanKey,
    ops: &Operands<T>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<(Vec<Choice>, String)> {
    let dtype = key.dtype;
    let mut max = 0i32;
    // SAFETY: live handle, valid out pointer.
    unsafe { sys::cudnnGetConvolutionForwardAlgorithmMaxCount(handle.0, &mut max) }
        .result()
        .map_err(failed("cudnnGetConvolutionForwardAlgorithmMaxCount"))?;
    let mut perf = vec![AlgoPerf::default(); max.max(1) as usize];
    let mut count = 0i32;
    let ws_bytes = find_workspace_bytes(&key.geometry, key.dtype.size_in_bytes());
    // SAFETY: scratch memory, never read before cuDNN writes it.
    let mut ws = unsafe { dev.alloc::<u8>(ws_bytes)? };
    let stream = dev.cuda_stream();
    {
        let (xp, _x_done) = ops.x.device_ptr(&stream);
        let (wp, _w_done) = ops.w.device_ptr(&stream);
        let (yp, _y_done) = y.device_ptr_mut(&stream);
        let (wsp, _ws_done) = ws.device_ptr_mut(&stream);
        // SAFETY: live handle and descriptors; x, w and y are live buffers of the sizes the
        // descriptors give (y is overwritten later by the real call), the workspace `ws_bytes`
        // long, all on the handle's stream; `perf` has room for `max` results, and AlgoPerf has
        // the layout of cudnnConvolutionFwdAlgoPerf_t (checked above).
        unsafe {
            sys::cudnnFindConvolutionForwardAlgorithmEx(
                handle.0,
                desc.x.0,
                xp as *const c_void,
                desc.w.0,
                wp as *const c_void,
                desc.conv.0,
                desc.y.0,
                yp as *mut c_void,
                perf.len() as i32,
                &mut count,
                perf.as_mut_ptr()
                    .cast::<sys::cudnnConvolutionFwdAlgoPerf_t>(),
                wsp as *mut c_void,
                ws_bytes,
            )
        }
        .result()
        .map_err(failed("cudnnFindConvolutionForwardAlgorithmEx"))?;
    }
    // Freed now (stream-ordered), before any plan's own workspace is grown.
    drop(ws);
    perf.truncate(count.clamp(0, perf.len() as i32) as usize);
    let report = perf
        .iter()
        .map(|p| match p.status {
            0 => format!(
                "{}:{:.3}ms/{}KiB/m{}",
                p.algo,
                p.time,
                p.memory >> 10,
                p.math_type
            ),
            s => format!("{}:status{s}", p.algo),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let usable = perf
        .iter()
        .filter(|p| p.status == 0 && p.memory <= MAX_WORKSPACE)
        .filter(|p| dtype != DType::F32 || p.math_type == 3)
        .filter_map(|p| {
            Some(Choice {
                algo: algo_from(p.algo)?,
                math: math_from(p.math_type)?,
                workspace: p.memory,
                epilogue: Epilogue::Prefill,
            })
        })
        .collect();
    Ok((usable, report))
}

/// Implicit GEMM with the workspace cuDNN asks for it, in `math`: the algorithm every
/// configuration supports, the last resort of [`choose`].
fn implicit_gemm_choice(
    handle: &Handle,
    desc: &Descriptors,
    math: sys::cudnnMathType_t,
) -> Result<Choice> {
    let algo = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
    let bytes = workspace_size(handle, desc, algo)?;
    Ok(Choice {
        algo,
        math,
        workspace: bytes,
        epilogue: Epilogue::Prefill,
    })
}

/// The plan's algorithm and epilogue for `key.mode`, and a note on how they were chosen; runs the
/// candidates on this call's buffers (`y` is overwritten afterwards by the real call).
#[allow(clippy::too_many_arguments)]
fn choose<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    handle: &Handle,
    desc: &Descriptors,
    key: &PlanKey,
    ops: &Operands<T>,
    y: &mut CudaViewMut<'_, T>,
    workspace: &mut Option<CudaSlice<u8>>,
) -> Result<(Choice, Option<graph::GraphPlan>, String)> {
    let initial = plan_math(key.dtype);
    // SAFETY: live descriptor.
    unsafe { dnn::set_convolution_math_type(desc.conv.0, initial) }
        .map_err(failed("cudnnSetConvolutionMathType"))?;
    let (usable, found) = find(dev, handle, desc, key, ops, y)?;
    let g = &key.geometry;
    let p = &key.params;
    let run = |c: Choice, y: &mut CudaViewMut<'_, T>, ws: &mut Option<CudaSlice<u8>>| {
        launch(dev, handle, desc, c, ops, y, ws, g, p)
    };
    // FindEx timed the algorithms with beta = 0; the plan runs its choice with beta = 1, onto
    // the prefill. The fastest that cuDNN runs so is the choice (as PyTorch walks its perf
    // results until one runs): each is tried once on this call's buffers, then implicit GEMM,
    // which supports every configuration, whatever its workspace. Only if none runs is the
    // shape left to candle's ops.
    let implicit_gemm = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
    let mut tries = usable.clone();
    if !usable.iter().any(|c| c.algo == implicit_gemm) {
        match implicit_gemm_choice(handle, desc, initial) {
            Ok(c) => tries.push(c),
            Err(e) => tracing::debug!("conv2d: no implicit-GEMM fallback: {e}"),
        }
    }
    let mut refused = Vec::new();
    let mut best = None;
    for c in tries {
        match run(c, y, workspace) {
            Ok(()) => {
                best = Some(c);
                break;
            }
            Err(e) => refused.push(format!("{}: {e}", c.algo as u32)),
        }
    }
    let refused = refused.join(", ");
    let Some(best) = best else {
        bail!("no algorithm runs onto the prefill (beta = 1): {refused}; find: {found}");
    };
    let prefill_note = if refused.is_empty() {
        String::new()
    } else {
        format!(" prefill refused: {refused};")
    };
    let fused = usable
        .iter()
        .find(|c| {
            c.algo
                == sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        })
        .map(|c| Choice {
            epilogue: Epilogue::Fused,
            ..*c
        });
    // The fused call is tried once before it may be chosen: cuDNN refuses configurations it
    // does not support, and without a residual `check_fused` also proves that z is not read.
    let (fused, mut note) = match (key.mode, fused) {
        (ConvEpilogue::Prefill | ConvEpilogue::Graph, _) | (_, None) => (None, String::new()),
        (_, Some(f)) => match check_fused(dev, y, key.residual, |y| run(f, y, workspace)) {
            Ok(None) => (Some(f), String::new()),
            Ok(Some(why)) => (None, format!(" fused refused: {why};")),
            Err(e) => (None, format!(" fused refused: {e};")),
        },
    };
    // The chosen legacy call's time, when it was measured (the graph plans are weighed against
    // it).
    let (choice, measured) = match (key.mode, fused) {
        (ConvEpilogue::Measure, Some(f)) => {
            let stream = dev.cuda_stream();
            let t_fused = time_ms(&stream, || run(f, y, workspace))?;
            let t_prefill = time_ms(&stream, || run(best, y, workspace))?;
            note = format!(" fused {t_fused:.3}ms, prefill {t_prefill:.3}ms;");
            if t_fused <= t_prefill {
                (f, Some(t_fused))
            } else {
                (best, Some(t_prefill))
            }
        }
        (_, Some(f)) => (f, None),
        (_, None) => (best, None),
    };
    // SAFETY: live descriptor.
    unsafe { dnn::set_convolution_math_type(desc.conv.0, choice.math) }
        .map_err(failed("cudnnSetConvolutionMathType"))?;
    // A graph plan's failure leaves the legacy choice, never the shape unplanned.
    let (graph, graph_note) = if key.graph {
        choose_graph(dev, handle, desc, key, ops, y, workspace, choice, measured)
            .unwrap_or_else(|e| (None, format!(" graph: failed ({e});")))
    } else {
        (None, String::new())
    };
    Ok((
        choice,
        graph,
        format!("{prefill_note}{note}{graph_note} find: {found}"),
    ))
}

/// The graph-API plan for the shape, if one passes: each candidate ([`graph::candidates`]) runs
/// once on this call's buffers and its output is compared with `legacy`'s ([`GRAPH_PROBE`]
/// elements of y, [`probe_ranges`]); those that agree are timed, and the fastest is kept if it
/// beats `legacy` (or in any case under [`ConvEpilogue::Graph`]), whose time is `legacy_ms` when
/// it was measured already. Returns it and a note.
#[allow(clippy::too_many_arguments)]
fn choose_graph<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    handle: &Handle,
    desc: &Descriptors,
    key: &PlanKey,
    ops: &Operands<T>,
    y: &mut CudaViewMut<'_, T>,
    workspace: &mut Option<CudaSlice<u8>>,
    legacy: Choice,
    legacy_ms: Option<f32>,
) -> Result<(Option<graph::GraphPlan>, String)> {
    let (g, p) = (&key.geometry, &key.params);
    let (candidates, listed) = match graph::candidates(
        handle.0,
        key.dtype,
        g,
        p,
        MAX_GRAPH_CANDIDATES,
        MAX_WORKSPACE,
    ) {
        Ok(c) => c,
        Err(e) => return Ok((None, format!(" graph: none ({e});"))),
    };
    if candidates.is_empty() {
        return Ok((None, format!(" graph: none usable ({listed});")));
    }
    let stream = dev.cuda_stream();
    if !pointers_aligned(&stream, ops, y) {
        return Ok((
            None,
            format!(
                " graph: not tried, this call's pointers are not {}-byte aligned;",
                graph::ALIGNMENT
            ),
        ));
    }
    launch(dev, handle, desc, legacy, ops, y, workspace, g, p)?;
    let reference = probe(&stream, y)?;
    let mut best: Option<(graph::GraphPlan, f32)> = None;
    let mut tried = Vec::new();
    for cand in candidates {
        let out = launch_graph(dev, handle, &cand, ops, y, workspace, g, p)
            .and_then(|()| probe(&stream, y));
        let why = match out {
            // Not the engine's fault: plan again when memory allows (see `conv2d`).
            Err(e) if crate::device::is_out_of_memory(&e.to_string()) => return Err(e),
            Err(e) => Some(e.to_string()),
            Ok(got) => disagreement(&reference, &got),
        };
        if let Some(why) = why {
            tried.push(format!("{}: refused, {why}", cand.name));
            continue;
        }
        // Timed as the legacy choice is: behind an untimed call, so that the host's time to
        // enqueue the first timed call is not counted (the check above ended in a sync).
        let t = time_ms(&stream, || {
            launch_graph(dev, handle, &cand, ops, y, workspace, g, p)
        })?;
        tried.push(format!("{} {t:.3}ms", cand.name));
        if best.as_ref().is_none_or(|(_, bt)| t < *bt) {
            best = Some((cand, t));
        }
    }
    let tried = tried.join(", ");
    let Some((plan, t_graph)) = best else {
        return Ok((None, format!(" graph: none agreed ({tried}; {listed});")));
    };
    let t_legacy = match legacy_ms {
        Some(t) => t,
        None => time_ms(&stream, || {
            launch(dev, handle, desc, legacy, ops, y, workspace, g, p)
        })?,
    };
    let forced = key.mode == ConvEpilogue::Graph;
    let use_graph = forced || t_graph < t_legacy;
    let note = format!(
        " graph {t_graph:.3}ms vs legacy {t_legacy:.3}ms: {}{} ({tried}; {listed});",
        if use_graph { "graph" } else { "legacy" },
        if forced { " (forced)" } else { "" },
    );
    Ok((use_graph.then_some(plan), note))
}

/// Whether x, w and y meet the alignment graph plans are built for.
fn pointers_aligned<T: CudaDType + DeviceRepr>(
    stream: &Arc<CudaStream>,
    ops: &Operands<T>,
    y: &CudaViewMut<'_, T>,
) -> bool {
    let (xp, _x) = ops.x.device_ptr(stream);
    let (wp, _w) = ops.w.device_ptr(stream);
    let (yp, _y) = y.device_ptr(stream);
    aligned(&[xp, wp, yp])
}

/// The [`probe_ranges`] of y, read back (waits for the stream).
fn probe<T: CudaDType + DeviceRepr + WithDType>(
    stream: &Arc<CudaStream>,
    y: &CudaViewMut<'_, T>,
) -> Result<Vec<f64>> {
    let mut v = Vec::with_capacity(GRAPH_PROBE);
    for r in probe_ranges(y.len(), GRAPH_PROBE, PROBE_RUNS) {
        v.extend(stream.clone_dtoh(&y.slice(r)).w()?);
    }
    stream.synchronize().w()?;
    Ok(v.iter().map(|x| x.to_f64()).collect())
}

/// Enqueues `plan` with the `Prefill` epilogue: our kernel writes `bias (+ residual)` into y,
/// then the graph plan accumulates the convolution onto it.
#[allow(clippy::too_many_arguments)]
fn launch_graph<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    handle: &Handle,
    plan: &graph::GraphPlan,
    ops: &Operands<T>,
    y: &mut CudaViewMut<'_, T>,
    workspace: &mut Option<CudaSlice<u8>>,
    g: &Geometry,
    p: &ConvParams,
) -> Result<()> {
    grow_workspace(dev, workspace, plan.workspace)?;
    prefill(dev, ops, y, g, p)?;
    let stream = dev.cuda_stream();
    let (xp, _x_done) = ops.x.device_ptr(&stream);
    let (wp, _w_done) = ops.w.device_ptr(&stream);
    let (yp, _y_done) = y.device_ptr_mut(&stream);
    if !aligned(&[xp, wp, yp]) {
        bail!("conv2d: a graph plan on unaligned pointers (this is a bug)");
    }
    let (ws_ptr, _ws_done) = workspace_ptr(workspace, plan.workspace, &stream)?;
    // SAFETY: x, w and y are live buffers of the plan's geometry (the plan key), checked aligned;
    // the workspace was grown to the plan's size above; the guards live until after the
    // enqueue, and everything runs on the handle's stream.
    unsafe { graph::execute(handle.0, plan, xp, wp, yp, ws_ptr) }
}

/// The device pointer of the shared workspace for a call that needs `bytes` of it (null when it
/// needs none), with its guard; the workspace must have been grown to `bytes` first.
fn workspace_ptr<'a>(
    workspace: &'a mut Option<CudaSlice<u8>>,
    bytes: usize,
    stream: &'a CudaStream,
) -> Result<(*mut c_void, Option<SyncOnDrop<'a>>)> {
    if bytes == 0 {
        return Ok((std::ptr::null_mut(), None));
    }
    match workspace.as_mut() {
        Some(ws) if ws.len() >= bytes => {
            let (ptr, done) = ws.device_ptr_mut(stream);
            Ok((ptr as *mut c_void, Some(done)))
        }
        ws => bail!(
            "conv2d: a workspace of {} bytes, the plan needs {bytes} (this is a bug)",
            ws.map_or(0, |w| w.len())
        ),
    }
}

/// Runs the fused call once (`run`). Without a residual, first fills y with NaN (all bits set):
/// z = y is passed with `alpha2 = 0`, and should cuDNN read it anyway, 0 · NaN would make the
/// output NaN, so the head of y is read back and checked (a NaN in x would refuse the fused call
/// too, which only costs speed). Returns why the fused call must not be used, if it must not.
fn check_fused<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    y: &mut CudaViewMut<'_, T>,
    residual: bool,
    run: impl FnOnce(&mut CudaViewMut<'_, T>) -> Result<()>,
) -> Result<Option<String>> {
    /// Elements read back: all of y is NaN if z is read, so a prefix tells.
    const PROBE: usize = 4096;
    let stream = dev.cuda_stream();
    if !residual {
        let bytes = y.num_bytes();
        let (ptr, _done) = y.device_ptr_mut(&stream);
        // SAFETY: `ptr` is y's allocation of `bytes` bytes, written on y's stream.
        unsafe { memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.w()?;
    }
    run(y)?;
    if residual {
        return Ok(None);
    }
    let head = stream.clone_dtoh(&y.slice(..y.len().min(PROBE))).w()?;
    stream.synchronize().w()?;
    Ok(if head.iter().all(|v| v.to_f64().is_finite()) {
        None
    } else {
        Some("the output came out non-finite from NaN-filled z at alpha2 = 0".to_string())
    })
}

/// Mean milliseconds of `f` over [`TIMED_RUNS`] calls after one warm-up call (which may build
/// and compile a kernel). The start event is recorded behind the warm-up, still queued, so the
/// device is busy from it on and the host's enqueueing is not timed.
fn time_ms(stream: &Arc<CudaStream>, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    f()?;
    let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(timed).w()?;
    for _ in 0..TIMED_RUNS {
        f()?;
    }
    let end = stream.record_event(timed).w()?;
    Ok(start.elapsed_ms(&end).w()? / TIMED_RUNS as f32)
}

/// Enqueues one convolution with `c` on the handle's stream (the device's): `y = conv(x, w) +
/// bias (+ residual)`.
#[allow(clippy::too_many_arguments)]
fn launch<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    handle: &Handle,
    desc: &Descriptors,
    c: Choice,
    ops: &Operands<T>,
    y: &mut CudaViewMut<'_, T>,
    workspace: &mut Option<CudaSlice<u8>>,
    g: &Geometry,
    p: &ConvParams,
) -> Result<()> {
    // Every caller's choice gets its workspace here (a no-op once the buffer is large enough):
    // the graph search runs the legacy choice before anything else has grown it.
    grow_workspace(dev, workspace, c.workspace)?;
    // SAFETY: live descriptor; the math type is a host-side setting read by the next call.
    unsafe { dnn::set_convolution_math_type(desc.conv.0, c.math) }
        .map_err(failed("cudnnSetConvolutionMathType"))?;
    if c.epilogue == Epilogue::Prefill {
        prefill(dev, ops, y, g, p)?;
    }
    let stream = dev.cuda_stream();
    let (xp, _x_done) = ops.x.device_ptr(&stream);
    let (wp, _w_done) = ops.w.device_ptr(&stream);
    let (bp, _b_done) = ops.bias.device_ptr(&stream);
    let residual = ops.residual.as_ref().map(|r| r.device_ptr(&stream));
    let (yp, _y_done) = y.device_ptr_mut(&stream);
    let (ws_ptr, _ws_done) = workspace_ptr(workspace, c.workspace, &stream)?;
    let ws_bytes = c.workspace;
    // Scaling factors are f32 for f32, f16 and bf16 data.
    let one = 1f32;
    let one_ptr = (&one as *const f32).cast::<c_void>();
    match c.epilogue {
        Epilogue::Fused => {
            let (z, alpha2) = match &residual {
                Some((r, _)) => (*r, 1f32),
                None => (yp, 0f32),
            };
            // SAFETY: the pointers are live device buffers of the sizes the descriptors give
            // (contiguous views of x, w, bias, residual; y allocated for the output; the
            // workspace at least `ws_bytes`), all used on the handle's stream, and their
            // SyncOnDrop guards live until after this call is enqueued.
            unsafe {
                dnn::convolution_bias_activation_forward(
                    handle.0,
                    one_ptr,
                    desc.x.0,
                    xp as *const c_void,
                    desc.w.0,
                    wp as *const c_void,
                    desc.conv.0,
                    c.algo,
                    ws_ptr,
                    ws_bytes,
                    (&alpha2 as *const f32).cast::<c_void>(),
                    desc.y.0,
                    z as *const c_void,
                    desc.bias.0,
                    bp as *const c_void,
                    desc.act.0,
                    desc.y.0,
                    yp as *mut c_void,
                )
            }
            .map_err(failed("cudnnConvolutionBiasActivationForward"))
        }
        Epilogue::Prefill => {
            // SAFETY: as above; beta = 1 accumulates onto the prefilled y.
            unsafe {
                dnn::convolution_forward(
                    handle.0,
                    one_ptr,
                    desc.x.0,
                    xp as *const c_void,
                    desc.w.0,
                    wp as *const c_void,
                    desc.conv.0,
                    c.algo,
                    ws_ptr,
                    ws_bytes,
                    one_ptr,
                    desc.y.0,
                    yp as *mut c_void,
                )
            }
            .map_err(failed("cudnnConvolutionForward"))
        }
    }
}

/// `y = bias[channel] (+ residual)` (kernels/conv_prefill.cu; launch by
/// [`super::prefill_launch`]).
fn prefill<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    ops: &Operands<T>,
    y: &mut CudaViewMut<'_, T>,
    g: &Geometry,
    p: &ConvParams,
) -> Result<()> {
    let suffix = match T::DTYPE {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("conv2d: no prefill kernel for dtype {other:?}"),
    };
    let stream = dev.cuda_stream();
    let ptr_bits = {
        let (yp, _y_done) = y.device_ptr(&stream);
        let rp = ops.residual.as_ref().map_or(0, |r| r.device_ptr(&stream).0);
        yp | rp
    };
    let pl = super::prefill_launch(g, p.channels_last, T::DTYPE.size_in_bytes(), ptr_bits);
    let f = dev
        .get_or_load_custom_func(
            &format!("{}_{suffix}", pl.kernel),
            PREFILL_MODULE,
            PREFILL_PTX,
        )?
        .into_cuda_function();
    let channels_arg = to_i32(g.o, "conv2d out channels")?;
    let has_residual = i32::from(ops.residual.is_some());
    // Without a residual the kernel never reads its residual argument; bias stands in for it.
    let residual = ops.residual.as_ref().unwrap_or(&ops.bias);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&ops.bias).arg(residual).arg(y);
    let (rows_arg, per_block_i32, plane_len_arg, chunk_arg);
    if p.channels_last {
        rows_arg = (g.n * g.oh * g.ow) as i64;
        per_block_i32 = to_i32(pl.per_block, "conv2d prefill rows per block")?;
        launch
            .arg(&rows_arg)
            .arg(&channels_arg)
            .arg(&per_block_i32)
            .arg(&has_residual);
    } else {
        plane_len_arg = (g.oh * g.ow) as i64;
        chunk_arg = pl.per_block as i64;
        launch
            .arg(&plane_len_arg)
            .arg(&channels_arg)
            .arg(&chunk_arg)
            .arg(&has_residual);
    }
    let blocks = to_i32(pl.grid.0, "conv2d prefill blocks")?;
    let chunks = to_u32(pl.grid.1, "conv2d prefill chunks")?;
    if chunks > 65535 {
        bail!("conv2d prefill: {chunks} chunks per plane exceed grid y's 65535");
    }
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, chunks, 1),
        block_dim: (super::PREFILL_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument lists match kernels/conv_prefill.cu: rows (const T* bias [O], const T*
    // residual [rows*O] (read only when has_residual), T* y, i64 rows, i32 channels, i32
    // rows_per_block, i32 has_residual); planes (bias, residual [N*O*plane_len], y, i64
    // plane_len, i32 channels, i64 chunk_len, i32 has_residual). y holds N*O*H'*W' elements;
    // the vector forms were chosen only for 16-byte-aligned y and residual and whole vectors
    // (`prefill_launch`).
    unsafe { launch.launch(cfg) }.w()?;
    Ok(())
}
