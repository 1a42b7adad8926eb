//! 2-D convolution with its bias and an optional residual in one op:
//! `y = conv(x, w) + bias (+ residual)`, in NCHW or channels-last (NHWC) layout.
//!
//! Every convolution of the UNet and the VAE is followed by its bias add, and the second
//! convolution of every resnet by the block's residual add. candle runs those as separate passes
//! over the output (each reads and writes it once more), and its cuDNN call builds every
//! descriptor, asks cuDNN's heuristic for an algorithm and allocates and zeroes a fresh workspace
//! on each call. Here the CUDA path (with the `cudnn` feature) keeps one plan per shape and folds
//! bias and residual into the convolution (see below).
//!
//! On the CPU (and on CUDA without the `cudnn` feature) the op is candle's `conv2d` followed by
//! the adds. Half-precision CPU inputs are computed in f32 (candle's CPU backend has no bf16
//! GEMM) with bias and residual added before the one rounding, the arithmetic of a fused GEMM
//! epilogue; channels-last inputs are permuted to NCHW around candle's convolution.
//!
//! # The CUDA path
//!
//! See `conv/cudnn.rs`: per (device, dtype, layout, N, C, H, W, O, kh, kw, padding, stride,
//! residual) one plan: descriptors built once, tensor-op math for half dtypes with f32
//! accumulation, the algorithm chosen once by timing them (`cudnnFindConvolutionForwardAlgorithmEx`,
//! what `torch.backends.cudnn.benchmark` does), and one workspace per device that only grows.

use candle_core::{bail, Result, Shape, Tensor};

use super::check_float_dtype;
use super::select::with_thread_value;

#[cfg(feature = "cudnn")]
mod cudnn;
mod plan_cache;

/// How a convolution is laid out and strided. Dilation is 1 and groups 1 everywhere in SDXL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvParams {
    /// Zero padding on every side of both spatial dims.
    pub padding: usize,
    /// The same stride on both spatial dims.
    pub stride: usize,
    /// `x` is `[N, H, W, C]`, `weight` `[O, kh, kw, I]` (cuDNN's KRSC), `y` `[N, H', W', O]`;
    /// otherwise `x` `[N, C, H, W]`, `weight` `[O, I, kh, kw]`, `y` `[N, O, H', W']`.
    pub channels_last: bool,
}

/// How the CUDA path applies bias and residual (the `cudnn` module docs weigh the two).
/// [`Measure`](Self::Measure), the default, times both once per shape and keeps the faster;
/// the other two force one, so that tests cover both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConvEpilogue {
    #[default]
    Measure,
    /// `cudnnConvolutionBiasActivationForward` with an identity activation (bias and residual in
    /// the convolution's epilogue); falls back to `Prefill` where cuDNN does not support it.
    Fused,
    /// `y` filled with `bias (+ residual)` by our kernel, then the convolution accumulates into
    /// it (`beta = 1`) with the fastest algorithm.
    Prefill,
    /// `Prefill` with a plan of cuDNN's graph API (the fastest of those whose output agrees
    /// with the legacy algorithm's), whatever its time; the legacy `Prefill` where no graph plan
    /// is usable (the plan summary says why). f16/bf16 only: f32 runs `Prefill`. Under
    /// `Measure`, the `conv-graph` lever weighs the same plans by time.
    Graph,
}

thread_local! {
    static EPILOGUE: std::cell::Cell<ConvEpilogue> =
        const { std::cell::Cell::new(ConvEpilogue::Measure) };
}

/// Runs `f` with the CUDA epilogue forced to `e` on this thread (restored afterwards, also on
/// panic). Without the `cudnn` feature there is only one path and this changes nothing.
pub fn with_conv_epilogue<R>(e: ConvEpilogue, f: impl FnOnce() -> R) -> R {
    with_thread_value(&EPILOGUE, e, f)
}

#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn conv_epilogue() -> ConvEpilogue {
    EPILOGUE.with(std::cell::Cell::get)
}

/// One line per cuDNN plan this thread has built (shape, algorithm, epilogue, measured times,
/// or [`CONV_FALLBACK`] and why for a shape cuDNN could not plan) and follow-up lines
/// ([`is_conv_plan_followup`]), the newest `2 * MAX_CONV_PLANS` of them, for tests and
/// benchmarks to print; empty without the `cudnn` feature.
pub fn conv_plans() -> Vec<String> {
    #[cfg(feature = "cudnn")]
    {
        cudnn::plan_summaries()
    }
    #[cfg(not(feature = "cudnn"))]
    {
        Vec::new()
    }
}

/// Marks a [`conv_plans`] line of a shape that runs candle's ops because cuDNN could not plan it.
pub const CONV_FALLBACK: &str = "fallback to candle's ops";

/// Marks a [`conv_plans`] line of a shape whose plan was built (its own line says how) but whose
/// first call failed: it runs candle's ops from then on (the line also carries
/// [`CONV_FALLBACK`]).
pub const CONV_FIRST_CALL_FAILED: &str = "the plan's first call failed";

/// Marks a [`conv_plans`] line of a shape whose chosen graph-API plan failed at a later call: it
/// runs its legacy algorithm from then on.
pub const CONV_GRAPH_FAILED_LATER: &str = "legacy from now on";

/// Marks a [`conv_plans`] line of a batch shape that runs as several calls of fewer images (its
/// fast algorithms' workspace, which grows with the batch, is over the cap for the whole batch):
/// each sub-batch has a plan line of its own.
pub const CONV_SUB_BATCHES: &str = "in sub-batches of";

/// Marks a [`conv_plans`] line of a plan dropped to keep the plans of a device within
/// [`MAX_CONV_PLANS`] (the least recently used goes): its shape plans again if it comes back.
pub const CONV_PLAN_EVICTED: &str = "plan dropped, least recently used";

/// Whether a [`conv_plans`] line is not a plan of its own: a second line about a plan already
/// listed (its first call failed, or its graph plan failed later, or it was dropped), or a batch
/// shape's split into sub-batches ([`CONV_SUB_BATCHES`]).
pub fn is_conv_plan_followup(line: &str) -> bool {
    line.contains(CONV_FIRST_CALL_FAILED)
        || line.contains(CONV_GRAPH_FAILED_LATER)
        || line.contains(CONV_SUB_BATCHES)
        || line.contains(CONV_PLAN_EVICTED)
}

/// The most cuDNN plans a device's worker keeps (and as many sub-batch decisions): one plan per
/// convolution shape, and SDXL-Turbo has about 44 shapes per (image size, batch size) (the H200
/// run's 222 plans for five batch sizes at 512x512), so a server that sees every batch size up to
/// 32 at one image size holds about 1400, and 4096 is nearly three times that. Without a bound a
/// client that walks through image sizes (any multiple of 8 within the limits) grows the plans,
/// their cuDNN descriptors and graph-API execution plans, for as long as the server runs. Over
/// the bound the least recently used plan is dropped ([`CONV_PLAN_EVICTED`]); its shape pays the
/// algorithm search again if it returns. PyTorch bounds its cuDNN execution-plan cache the same
/// way (`TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT`, 10000).
pub const MAX_CONV_PLANS: usize = 4096;

/// Lines kept for [`conv_plans`] per device and thread, the oldest dropped first: a plan line
/// and a follow-up for each of [`MAX_CONV_PLANS`].
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
const MAX_CONV_PLAN_LINES: usize = 2 * MAX_CONV_PLANS;

thread_local! {
    static PLAN_LIMIT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's bound on cuDNN plans set to `plans` (restored afterwards, also on
/// panic) instead of [`MAX_CONV_PLANS`], so that tests reach eviction with a few shapes. Without
/// the `cudnn` feature there are no plans and this changes nothing.
pub fn with_conv_plan_limit<R>(plans: usize, f: impl FnOnce() -> R) -> R {
    with_thread_value(&PLAN_LIMIT, Some(plans), f)
}

#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn conv_plan_limit() -> usize {
    PLAN_LIMIT
        .with(std::cell::Cell::get)
        .unwrap_or(MAX_CONV_PLANS)
}

thread_local! {
    static SUB_BATCH_CAP: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the workspace cap that decides sub-batches ([`CONV_SUB_BATCHES`]) set to
/// `bytes` on this thread (restored afterwards, also on panic), so that tests reach the split on
/// small shapes. Plans themselves keep the usual cap. Without the `cudnn` feature nothing splits
/// and this changes nothing.
pub fn with_conv_sub_batch_cap<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    with_thread_value(&SUB_BATCH_CAP, Some(bytes), f)
}

#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn sub_batch_cap() -> Option<usize> {
    SUB_BATCH_CAP.with(std::cell::Cell::get)
}

/// Images per call for a convolution of `n` images whose fast algorithm needs `bytes` of
/// workspace for all of them, when a call may use `cap`: all `n` if that fits; otherwise the
/// largest power of two whose share fits (the workspace grows with the batch: cuDNN's implicit
/// precomputed GEMM keeps per-pixel offsets), at least one. Powers of two, so that the batch
/// sizes a server runs (1, 2, 4, ... up to its maximum) share their sub-batches' plans.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn sub_batch(n: usize, bytes: usize, cap: usize) -> usize {
    if n <= 1 || bytes <= cap {
        return n.max(1);
    }
    let per_image = bytes.div_ceil(n).max(1);
    let fit = (cap / per_image).max(1);
    let pow2 = 1usize << (usize::BITS - 1 - fit.leading_zeros());
    pow2.min(n)
}

/// `(first image, images)` of each call when `n` images run `per_call` at a time, in order; the
/// last call takes what is left.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn sub_batches(n: usize, per_call: usize) -> impl Iterator<Item = (usize, usize)> {
    let per_call = per_call.max(1);
    (0..n)
        .step_by(per_call)
        .map(move |start| (start, per_call.min(n - start)))
}

/// `conv(x, weight) + bias (+ residual)`; shapes as in [`ConvParams::channels_last`], `bias`
/// `[O]`, `residual` the output's shape. `weight` and `residual` must have `x`'s dtype; `bias` is
/// converted to it. On CUDA with the `cudnn` feature this is the planned cuDNN path for f32,
/// f16 and bf16 (candle's ops for a shape cuDNN cannot plan), elsewhere candle's ops
/// ([`conv2d_composed`]).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    params: ConvParams,
) -> Result<Tensor> {
    let geometry = Geometry::check(x, weight, bias, residual, &params)?;
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && cudnn::supports(x.dtype()) && geometry.elems_out() > 0 {
        if let Some(y) = cudnn::conv2d(x, weight, bias, residual, params, &geometry)? {
            return Ok(y);
        }
    }
    let _ = geometry; // only the cuDNN path needs it
    composed(x, weight, bias, residual, params)
}

/// [`conv2d`] with candle's ops on any device: the CPU path, and on CUDA the baseline the
/// `--kernels` lever is measured against (a channels-last layer with the lever off).
pub fn conv2d_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    params: ConvParams,
) -> Result<Tensor> {
    Geometry::check(x, weight, bias, residual, &params)?;
    composed(x, weight, bias, residual, params)
}

fn composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    p: ConvParams,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let wide = super::gemm_dtype(x);
    let (mut xs, mut ws) = (x.to_dtype(wide)?, weight.to_dtype(wide)?);
    if p.channels_last {
        xs = xs.permute((0, 3, 1, 2))?.contiguous()?;
        ws = ws.permute((0, 3, 1, 2))?.contiguous()?;
    }
    let b = bias.to_dtype(wide)?.reshape((1, (), 1, 1))?;
    let mut y = xs
        .conv2d(&ws, p.padding, p.stride, 1, 1)?
        .broadcast_add(&b)?;
    if p.channels_last {
        y = y.permute((0, 2, 3, 1))?.contiguous()?;
    }
    if let Some(r) = residual {
        y = (y + r.to_dtype(wide)?)?;
    }
    y.to_dtype(dtype)
}

/// The sizes of one convolution, whatever its layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn check(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        residual: Option<&Tensor>,
        p: &ConvParams,
    ) -> Result<Self> {
        let layout = if p.channels_last {
            "channels-last: x [N, H, W, C], weight [O, kh, kw, C]"
        } else {
            "NCHW: x [N, C, H, W], weight [O, C, kh, kw]"
        };
        let (Ok(xd), Ok(wd)) = (x.dims4(), weight.dims4()) else {
            bail!(
                "conv2d: x {:?} and weight {:?} must both be 4-D ({layout})",
                x.shape(),
                weight.shape()
            );
        };
        let ((n, c, h, w), (o, wc, kh, kw)) = if p.channels_last {
            ((xd.0, xd.3, xd.1, xd.2), (wd.0, wd.3, wd.1, wd.2))
        } else {
            (xd, wd)
        };
        if wc != c {
            bail!(
                "conv2d: weight {:?} has {wc} input channels, x {:?} has {c} ({layout})",
                weight.shape(),
                x.shape()
            );
        }
        if p.stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        if kh == 0 || kw == 0 || h + 2 * p.padding < kh || w + 2 * p.padding < kw {
            bail!(
                "conv2d: kernel {kh}x{kw} does not fit input {h}x{w} with padding {}",
                p.padding
            );
        }
        if bias.dims() != [o] {
            bail!(
                "conv2d: bias has shape {:?}, expected [{o}] for weight {:?}",
                bias.shape(),
                weight.shape()
            );
        }
        let g = Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh: (h + 2 * p.padding - kh) / p.stride + 1,
            ow: (w + 2 * p.padding - kw) / p.stride + 1,
        };
        check_float_dtype(x.dtype(), "conv2d", "x")?;
        check_float_dtype(bias.dtype(), "conv2d", "bias")?;
        if weight.dtype() != x.dtype() {
            bail!(
                "conv2d: weight has dtype {:?}, x has {:?}",
                weight.dtype(),
                x.dtype()
            );
        }
        if let Some(r) = residual {
            let want = g.out_shape(p.channels_last);
            if r.shape() != &want {
                bail!(
                    "conv2d: residual has shape {:?}, the output has {want:?}",
                    r.shape()
                );
            }
            if r.dtype() != x.dtype() {
                bail!(
                    "conv2d: residual has dtype {:?}, x has {:?}",
                    r.dtype(),
                    x.dtype()
                );
            }
        }
        Ok(g)
    }

    fn out_shape(&self, channels_last: bool) -> Shape {
        if channels_last {
            Shape::from_dims(&[self.n, self.oh, self.ow, self.o])
        } else {
            Shape::from_dims(&[self.n, self.o, self.oh, self.ow])
        }
    }

    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    fn elems_out(&self) -> usize {
        self.n * self.o * self.oh * self.ow
    }
}

/// The byte alignment cuDNN graph-API plans declare for their tensors (the `conv-graph` lever);
/// calls whose pointers miss it run the legacy algorithm.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
const GRAPH_ALIGNMENT: u64 = 16;

/// Whether every device pointer meets [`GRAPH_ALIGNMENT`].
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn aligned(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % GRAPH_ALIGNMENT == 0)
}

/// Strides, in elements, of a tensor with logical dims `[a, b, c, d]` (N, C, H, W for data;
/// O, C, kh, kw for a filter) as cuDNN's backend API takes them: stored in that order, or
/// channels-last (N, H, W, C, the filter KRSC: dim 1 innermost).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn backend_strides(dims: [i64; 4], channels_last: bool) -> [i64; 4] {
    let [_, c, h, w] = dims;
    if channels_last {
        [h * w * c, 1, w * c, c]
    } else {
        [c * h * w, h * w, w, 1]
    }
}

/// How the `Prefill` epilogue's kernel (kernels/conv_prefill.cu) is launched for an output.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
struct PrefillLaunch {
    /// `conv_prefill_rows` (channels last) or `conv_prefill_planes` (NCHW), `_vec` for the
    /// 16-byte-vector form; the dtype suffix is added by the caller.
    kernel: &'static str,
    grid: (usize, usize),
    /// Rows per block (rows) or elements per chunk (planes): the kernel's `rows_per_block` or
    /// `chunk_len` argument.
    per_block: usize,
}

/// Threads per prefill block (PF_THREADS in kernels/conv_prefill.cu).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
const PREFILL_THREADS: usize = 256;

/// The prefill's launch for an output of geometry `g`: channels last, `[rows = N*H'*W', O]` in
/// blocks of about 8192 elements (whole rows); NCHW, one block row per `[N*O]` plane of H'W'
/// elements, in chunks of at least 4096 (more when a plane would need over 65535 chunks).
/// `ptr_bits` is y's address or'ed with the residual's (when there is one): the vector form
/// needs it 16-byte aligned and the rows' channels (or the planes and chunks) whole 16-byte
/// vectors of `elem_bytes` elements.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn prefill_launch(
    g: &Geometry,
    channels_last: bool,
    elem_bytes: usize,
    ptr_bits: u64,
) -> PrefillLaunch {
    const ROW_BLOCK_ELEMS: usize = 8192;
    const PLANE_CHUNK: usize = 4096;
    const MAX_GRID_Y: usize = 65535;
    let vec = 16 / elem_bytes;
    let aligned = ptr_bits.is_multiple_of(16);
    if channels_last {
        let rows = g.n * g.oh * g.ow;
        let per_block = (ROW_BLOCK_ELEMS / g.o).max(1);
        let v = aligned && g.o.is_multiple_of(vec);
        PrefillLaunch {
            kernel: if v {
                "conv_prefill_rows_vec"
            } else {
                "conv_prefill_rows"
            },
            grid: (rows.div_ceil(per_block), 1),
            per_block,
        }
    } else {
        let plane_len = g.oh * g.ow;
        let v = aligned && plane_len.is_multiple_of(vec);
        let unit = if v { vec } else { 1 };
        let chunk = PLANE_CHUNK
            .max(plane_len.div_ceil(MAX_GRID_Y))
            .next_multiple_of(unit);
        PrefillLaunch {
            kernel: if v {
                "conv_prefill_planes_vec"
            } else {
                "conv_prefill_planes"
            },
            grid: (g.n * g.o, plane_len.div_ceil(chunk)),
            per_block: chunk,
        }
    }
}

/// `runs` ranges of `n` elements in all (at most `len`), spread evenly over `0..len`, in order
/// and disjoint, the first at 0 and the last at the end: the elements of a convolution's output
/// read back to compare two plans, so that every image of the batch and every part of it (in
/// NCHW, of its channels) is looked at, not only the two ends.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn probe_ranges(len: usize, n: usize, runs: usize) -> Vec<std::ops::Range<usize>> {
    let n = n.min(len);
    let runs = runs.clamp(1, n.max(1));
    let each = n / runs;
    if each == 0 {
        return Vec::new();
    }
    // Run i starts at i/(runs-1) of the room left once the runs are laid end to end.
    let room = len - each * runs;
    (0..runs)
        .map(|i| {
            let start = i * each + if runs > 1 { room * i / (runs - 1) } else { 0 };
            start..start + each
        })
        .collect()
}

/// Why `got` is not the same convolution output as `want` (the same elements of two plans'
/// outputs), if it is not: each element within 0.4% of `want`'s largest finite magnitude plus
/// 0.8% of itself, and finite wherever `want` is. Both plans sum the same products in f32 in
/// different orders and round once to 16 bits, so they differ by at most about one bf16 step
/// (2^-8 relative) where the sum is not cancelling; the bound is twice that. A plan that
/// dropped the prefilled bias (ignored beta) is off by the bias everywhere, which the absolute
/// term catches wherever the bias is over 0.4% of the output's range.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
fn disagreement(want: &[f64], got: &[f64]) -> Option<String> {
    if want.len() != got.len() {
        return Some(format!("{} elements against {}", got.len(), want.len()));
    }
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(v.abs()));
    want.iter()
        .zip(got)
        .enumerate()
        .filter(|(_, (w, _))| w.is_finite())
        .find(|(_, (w, g))| {
            // A NaN difference (g non-finite) disagrees too.
            let err = (*g - *w).abs();
            err.is_nan() || err > 4e-3 * scale + 8e-3 * w.abs()
        })
        .map(|(i, (w, g))| format!("element {i} is {g}, the legacy plan's {w}"))
}

#[cfg(test)]
mod prefill_tests {
    use super::{prefill_launch, Geometry, PrefillLaunch};

    fn out(n: usize, o: usize, oh: usize, ow: usize) -> Geometry {
        Geometry {
            n,
            c: 1,
            h: oh,
            w: ow,
            o,
            kh: 1,
            kw: 1,
            oh,
            ow,
        }
    }

    #[test]
    fn prefill_launches_by_layout_vectors_and_alignment() {
        // The VAE's channels-last outputs, bf16: 8192 / 128 = 64 rows a block, 16-byte vectors.
        let vae = out(8, 128, 512, 512);
        assert_eq!(
            prefill_launch(&vae, true, 2, 0x7f00_0000_0000),
            PrefillLaunch {
                kernel: "conv_prefill_rows_vec",
                grid: (8 * 512 * 512 / 64, 1),
                per_block: 64,
            }
        );
        // A residual view 2 bytes into its buffer, or channels that are not whole vectors.
        assert_eq!(prefill_launch(&vae, true, 2, 2).kernel, "conv_prefill_rows");
        assert_eq!(
            prefill_launch(&out(1, 12, 5, 5), true, 2, 0).kernel,
            "conv_prefill_rows"
        );
        // f32 vectors are 4 channels; more channels than a block's 8192 elements: a row a block.
        assert_eq!(
            prefill_launch(&out(1, 12, 5, 5), true, 4, 0).kernel,
            "conv_prefill_rows_vec"
        );
        assert_eq!(
            prefill_launch(&out(2, 10000, 3, 3), true, 2, 0).per_block,
            1
        );
        // The UNet's NCHW outputs: one plane of 64x64 per block row, one chunk each.
        assert_eq!(
            prefill_launch(&out(2, 320, 64, 64), false, 2, 0),
            PrefillLaunch {
                kernel: "conv_prefill_planes_vec",
                grid: (640, 1),
                per_block: 4096,
            }
        );
        // 7x7 planes: not whole vectors. 363x363 planes: 33 chunks of 4096 (the last short).
        assert_eq!(
            prefill_launch(&out(1, 4, 7, 7), false, 2, 0).kernel,
            "conv_prefill_planes"
        );
        let big = prefill_launch(&out(1, 3, 363, 363), false, 2, 0);
        assert_eq!(big.kernel, "conv_prefill_planes");
        assert_eq!(big.grid, (3, (363usize * 363).div_ceil(4096)));
        // A plane over 65535 chunks of 4096 gets longer chunks, still whole vectors.
        let huge = prefill_launch(&out(1, 1, 1 << 14, 1 << 14), false, 2, 0);
        assert!(
            huge.grid.1 <= 65535 && huge.per_block.is_multiple_of(8),
            "{huge:?}"
        );
        assert!(huge.grid.1 * huge.per_block >= 1 << 28);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_batches_keep_the_workspace_under_the_cap() {
        const MIB: usize = 1 << 20;
        // Fits: the whole batch in one call.
        assert_eq!(sub_batch(8, 100 * MIB, 256 * MIB), 8);
        assert_eq!(sub_batch(8, 256 * MIB, 256 * MIB), 8);
        assert_eq!(sub_batch(1, 900 * MIB, 256 * MIB), 1);
        assert_eq!(sub_batch(4, 0, 0), 4);
        // The H200's first run: the VAE's 512-channel 128x128 convolution at bs8 wanted 260 MiB
        // (32.5 per image), its 256->128 3x3 at 512x512 192 MiB per image, the UNet's 960->320
        // 3x3 at 64x64 325 MiB at bs32.
        assert_eq!(sub_batch(8, 260 * MIB, 256 * MIB), 4);
        assert_eq!(sub_batch(32, 32 * 192 * MIB, 256 * MIB), 1);
        assert_eq!(sub_batch(32, 325 * MIB, 256 * MIB), 16);
        // A power of two at most n, even where more would fit; never zero.
        assert_eq!(sub_batch(6, 7 * MIB, 6 * MIB), 4);
        assert_eq!(sub_batch(3, 1000 * MIB, 1), 1);
        for n in 1..40 {
            for bytes in [1, 7 * MIB, 300 * MIB, 5000 * MIB] {
                let m = sub_batch(n, bytes, 256 * MIB);
                assert!(m >= 1 && m <= n, "n {n} bytes {bytes}: {m}");
                assert!(m == n || m.is_power_of_two(), "n {n} bytes {bytes}: {m}");
                // The share of a sub-batch fits, unless one image alone is over the cap.
                let share = bytes.div_ceil(n) * m;
                assert!(
                    share <= 256 * MIB || m == 1 || m == n,
                    "n {n} bytes {bytes}: {m}"
                );
            }
        }
    }

    #[test]
    fn sub_batches_cover_the_batch_once_in_order() {
        assert_eq!(
            sub_batches(5, 2).collect::<Vec<_>>(),
            [(0, 2), (2, 2), (4, 1)]
        );
        assert_eq!(sub_batches(8, 4).collect::<Vec<_>>(), [(0, 4), (4, 4)]);
        assert_eq!(sub_batches(3, 8).collect::<Vec<_>>(), [(0, 3)]);
        assert_eq!(sub_batches(2, 0).collect::<Vec<_>>(), [(0, 1), (1, 1)]);
        for n in 1..20 {
            for m in 1..=n {
                let mut next = 0;
                for (start, len) in sub_batches(n, m) {
                    assert_eq!(start, next);
                    assert!(len >= 1 && len <= m);
                    next += len;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn backend_strides_of_both_layouts() {
        // x [N=2, C=3, H=4, W=5], NCHW: (n, c, h, w) at ((n*C + c)*H + h)*W + w.
        assert_eq!(backend_strides([2, 3, 4, 5], false), [60, 20, 5, 1]);
        // NHWC: (n, c, h, w) at ((n*H + h)*W + w)*C + c.
        assert_eq!(backend_strides([2, 3, 4, 5], true), [60, 1, 15, 3]);
        // A KRSC filter [O=8, C=3, kh=3, kw=3]: (o, c, r, s) at ((o*kh + r)*kw + s)*C + c.
        assert_eq!(backend_strides([8, 3, 3, 3], true), [27, 1, 9, 3]);
        // The strides address every element of a candle tensor of the same layout exactly once.
        let t = Tensor::arange(0u32, 120, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((2, 4, 5, 3))
            .unwrap(); // NHWC storage of logical [2, 3, 4, 5]
        let s = backend_strides([2, 3, 4, 5], true);
        let v = t.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        for (n, c, h, w) in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3), (1, 0, 3, 1)] {
            let at = (n * s[0] + c * s[1] + h * s[2] + w * s[3]) as usize;
            let want = t
                .get(n as usize)
                .unwrap()
                .get(h as usize)
                .unwrap()
                .get(w as usize)
                .unwrap()
                .get(c as usize)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            assert_eq!(v[at], want, "(n, c, h, w) = ({n}, {c}, {h}, {w})");
        }
    }

    #[test]
    fn alignment_of_pointers() {
        assert!(aligned(&[0, 16, 4096, 1 << 40]));
        assert!(!aligned(&[16, 8]));
        assert!(!aligned(&[2]));
        assert!(aligned(&[]));
    }

    #[test]
    fn disagreement_tolerates_rounding_and_refuses_the_rest() {
        let want = [1.0, -2.0, 0.5, 100.0, f64::NAN];
        // One bf16 rounding (2^-8 relative) on every element, and any value where want is NaN.
        let close: Vec<f64> = want.iter().map(|v| v * (1.0 + 1.0 / 256.0)).collect();
        let mut close_nan = close.clone();
        close_nan[4] = 7.0;
        assert_eq!(disagreement(&want, &close), None);
        assert_eq!(disagreement(&want, &close_nan), None);
        // Off by 2% of the probe's largest magnitude: refused, and the message names the element.
        // So is a missing bias of 1% of it on a small element.
        let mut no_bias = close.clone();
        no_bias[0] -= 1.0;
        assert!(disagreement(&want, &no_bias)
            .unwrap()
            .starts_with("element 0"));
        let mut off = close.clone();
        off[2] = 0.5 + 2.0;
        let why = disagreement(&want, &off).unwrap();
        assert!(why.starts_with("element 2 is 2.5"), "{why}");
        // Non-finite where want is finite.
        for bad in [f64::NAN, f64::INFINITY] {
            let mut b = close.clone();
            b[0] = bad;
            assert!(disagreement(&want, &b).unwrap().starts_with("element 0"));
        }
        // A permutation (a layout bug) is refused.
        let permuted = [100.0, -2.0, 0.5, 1.0, 0.0];
        assert!(disagreement(&want, &permuted).is_some());
        assert!(disagreement(&want, &want[..3]).is_some());
    }

    #[test]
    fn probe_ranges_cover_the_whole_output() {
        for (len, n, runs) in [
            (1 << 20, 1 << 15, 64),
            (100_000, 1 << 15, 64),
            (1000, 1 << 15, 64),
            (7, 1 << 15, 64),
            (1 << 15, 1 << 15, 64),
            (10, 4, 1),
        ] {
            let r = probe_ranges(len, n, runs);
            let total: usize = r.iter().map(|r| r.len()).sum();
            assert!(total <= n.min(len) && total > 0, "{len} {n} {runs}: {r:?}");
            assert_eq!(r[0].start, 0, "{len} {n} {runs}");
            if r.len() > 1 {
                assert_eq!(r.last().unwrap().end, len, "{len} {n} {runs}");
            }
            for w in r.windows(2) {
                assert!(w[0].end <= w[1].start, "{len} {n} {runs}: {r:?}");
            }
        }
        // A large output: 64 runs of 512, one every 16384 elements.
        let r = probe_ranges(1 << 20, 1 << 15, 64);
        assert_eq!(r.len(), 64);
        assert!(r.iter().all(|r| r.len() == 512));
        let gaps: Vec<usize> = r.windows(2).map(|w| w[1].start - w[0].start).collect();
        let (lo, hi) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
        assert!(hi - lo <= 1 && *lo > (1 << 20) / 64, "{gaps:?}");
        assert!(probe_ranges(0, 16, 4).is_empty());
    }
}
