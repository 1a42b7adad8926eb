//! Flash attention for the UNet: `softmax(scale · Q·Kᵀ)·V` on `[B, L, H·64]` projections in one
//! kernel (`kernels/flash_attn.cu`), the scores kept in shared memory.
//!
//! Why a second attention path: the cuBLAS one ([`super::multi_head_attention`] without
//! [`Kernels::FLASH`](super::Kernels::FLASH)) writes Q·Kᵀ in f32 and the probabilities in 16 bits
//! and reads both back, ~12 bytes of memory traffic per score. SDXL's UNet at 512x512 has ~215M
//! scores per image (self-attention over 1024 and 256 tokens, cross-attention over 77), so
//! ~2.6 GB per image that this kernel never moves. It covers exactly the UNet's case: head dim 64
//! (q, k and v), not causal, f16 or bf16 (the tensor cores' input types); everything else (CLIP's
//! causal attention, the VAE's 512-wide single head, f32) stays on the cuBLAS path.
//!
//! Numerics match that path: logits accumulated in f32 and never rounded, softmax in f32 (base 2,
//! online over key tiles of 64), probabilities rounded to the storage dtype for P·V, output
//! normalised and rounded once. On the CPU the op is the reference loops of
//! [`MultiHeadAttentionOp`] (f64), which the CUDA tests compare with.

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{AttentionOp, MultiHeadAttentionOp};

/// The head dim the kernel is written for (of q/k and of v): SDXL's UNet uses 64 at every level.
pub const FLASH_HEAD_DIM: usize = 64;

/// CUDA's limit on grid y and z, which carry the heads and the batch.
const MAX_GRID_YZ: usize = 65535;

/// Longest Lq or Lk: the kernel steps an i32 by 64 up to L, and 2^30 keeps that far from
/// overflow (far beyond any image size: 2^30 tokens of one head is 128 GiB of bf16).
const MAX_LEN: usize = 1 << 30;

thread_local! {
    static LAUNCHES: Cell<u64> = const { Cell::new(0) };
}

/// How many flash kernels this thread has launched. The flash path and the cuBLAS path compute
/// the same values, so a test can only tell which one [`super::multi_head_attention`] took by
/// counting (per thread, so tests running in parallel do not see each other's launches).
pub fn flash_launches() -> u64 {
    LAUNCHES.with(Cell::get)
}

/// Whether this build has the flash kernel: kernels/flash_attn.cu's wmma on bf16 needs
/// compute capability 8.0, so a CUDA build for an older GPU leaves it out (the CPU reference is
/// always there).
fn built_with_flash() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::device::BUILD_COMPUTE_CAP
            .parse::<u32>()
            .is_ok_and(|cc| cc >= 80)
    }
    #[cfg(not(feature = "cuda"))]
    true
}

/// Whether the flash kernel covers a multi-head attention call: 16-bit dtype, head dims
/// `(d, dv)` both 64, not causal, and `(batch, heads)` within the launch grid. The device and the
/// lever are the caller's business.
pub(crate) fn supports(
    dtype: DType,
    causal: bool,
    (d, dv): (usize, usize),
    (batch, heads): (usize, usize),
) -> bool {
    built_with_flash()
        && matches!(dtype, DType::F16 | DType::BF16)
        && !causal
        && d == FLASH_HEAD_DIM
        && dv == FLASH_HEAD_DIM
        && batch <= MAX_GRID_YZ
        && heads <= MAX_GRID_YZ
}

/// Flash attention over `heads` interleaved heads of 64: `q: [B, Lq, H·64]`,
/// `k, v: [B, Lk, H·64]`, all f16 or all bf16; returns `[B, Lq, H·64]`, head `h` in columns
/// `h·64..(h+1)·64`, as [`super::multi_head_attention`] does. On CUDA the kernel; on the CPU the
/// reference loops (slow: for tests).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let dims = FlashDims::new(q.shape(), k.shape(), v.shape(), heads)?;
    check_dtypes(q.dtype(), k.dtype(), v.dtype())?;
    if !scale.is_finite() {
        bail!("flash attention: scale {scale} is not finite");
    }
    if dims.batch * dims.lq == 0 {
        return Tensor::zeros(q.shape(), q.dtype(), q.device());
    }
    let op = FlashAttentionOp { heads, scale };
    aligned(q)?.apply_op3_no_bwd(&aligned(k)?, &aligned(v)?, &op)
}

/// `x` contiguous and starting at a multiple of 8 elements, as the kernel's 16-byte loads need
/// (rows are H·64 elements apart, so then every row is 16-byte aligned). A contiguous view at an
/// odd offset (a narrow of a larger buffer) is copied; `contiguous()` would keep its offset.
fn aligned(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() && x.layout().start_offset().is_multiple_of(8) {
        Ok(x.clone())
    } else {
        x.force_contiguous()
    }
}

fn check_dtypes(q: DType, k: DType, v: DType) -> Result<()> {
    if !matches!(q, DType::F16 | DType::BF16) {
        bail!("flash attention: q has dtype {q:?}; the kernel takes f16 or bf16");
    }
    if k != q || v != q {
        bail!("flash attention: q, k, v must share a dtype, got {q:?}, {k:?}, {v:?}");
    }
    Ok(())
}

/// Sizes of one flash attention call, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlashDims {
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
}

impl FlashDims {
    fn new(q: &Shape, k: &Shape, v: &Shape, heads: usize) -> Result<Self> {
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        if qd.len() != 3 || kd.len() != 3 || vd.len() != 3 {
            bail!("flash attention: q {q:?}, k {k:?}, v {v:?} must be [B, L, heads * 64]");
        }
        if heads == 0 || heads > MAX_GRID_YZ {
            bail!("flash attention: heads must be between 1 and {MAX_GRID_YZ}, got {heads}");
        }
        let width = heads * FLASH_HEAD_DIM;
        for (name, s, w) in [("q", q, qd[2]), ("k", k, kd[2]), ("v", v, vd[2])] {
            if w != width {
                bail!(
                    "flash attention: {name} {s:?} has width {w}, expected {heads} heads * \
                     {FLASH_HEAD_DIM} = {width}"
                );
            }
        }
        if kd[0] != qd[0] || vd[0] != qd[0] {
            bail!("flash attention: q {q:?}, k {k:?}, v {v:?} differ in batch size");
        }
        if vd[1] != kd[1] {
            bail!(
                "flash attention: v {v:?} has {} positions, k {k:?} has {}",
                vd[1],
                kd[1]
            );
        }
        let (batch, lq, lk) = (qd[0], qd[1], kd[1]);
        if lk == 0 && lq > 0 {
            bail!("flash attention: k {k:?} has no positions to attend to");
        }
        if batch > MAX_GRID_YZ {
            bail!("flash attention: batch {batch} is above the kernel's {MAX_GRID_YZ}");
        }
        if lq > MAX_LEN || lk > MAX_LEN {
            bail!("flash attention: q {q:?} or k {k:?} is longer than {MAX_LEN} positions");
        }
        Ok(Self {
            batch,
            heads,
            lq,
            lk,
        })
    }
}

/// The custom op behind [`flash_attention`]: inputs `(q, k, v)` as there, contiguous (and, on
/// CUDA, starting 16-byte aligned).
#[derive(Debug, Clone, Copy)]
pub struct FlashAttentionOp {
    pub heads: usize,
    pub scale: f64,
}

impl FlashAttentionOp {
    fn reference(&self) -> MultiHeadAttentionOp {
        MultiHeadAttentionOp {
            heads: self.heads,
            attention: AttentionOp::new(self.scale, false),
        }
    }
}

impl CustomOp3 for FlashAttentionOp {
    fn name(&self) -> &'static str {
        "turbine-flash-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        FlashDims::new(ql.shape(), kl.shape(), vl.shape(), self.heads)?;
        check_dtypes(qs.dtype(), ks.dtype(), vs.dtype())?;
        self.reference().cpu_fwd(qs, ql, ks, kl, vs, vl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = FlashDims::new(ql.shape(), kl.shape(), vl.shape(), self.heads)?;
        check_dtypes(qs.dtype(), ks.dtype(), vs.dtype())?;
        let args = ((qs, ql), (ks, kl), (vs, vl));
        let out = match qs.dtype() {
            DType::F16 => cuda_impl::run::<half::f16>(self, args.0, args.1, args.2, &dims)?,
            DType::BF16 => cuda_impl::run::<half::bf16>(self, args.0, args.1, args.2, &dims)?,
            other => bail!("flash attention: no CUDA kernel for dtype {other:?}"),
        };
        Ok((out, ql.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::{FlashAttentionOp, FlashDims, FLASH_HEAD_DIM, LAUNCHES};
    use crate::ops::cuda::{self, to_i32, to_u32};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result, WithDType};

    /// Query rows per block (4 warps of 16): FA_BQ in the kernel.
    const QUERY_ROWS: usize = 64;
    /// FA_THREADS in the kernel, whose tile loads assume exactly this many threads.
    const THREADS: u32 = 128;

    pub(super) fn run<T: CudaDType + DeviceRepr + WithDType>(
        op: &FlashAttentionOp,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        dims: &FlashDims,
    ) -> Result<CudaStorage> {
        let FlashDims {
            batch,
            heads,
            lq,
            lk,
        } = *dims;
        let dev = qs.device();
        let stream = dev.cuda_stream();
        let q = cuda::contiguous_view::<T>(qs, ql, "flash attention q")?;
        let k = cuda::contiguous_view::<T>(ks, kl, "flash attention k")?;
        let v = cuda::contiguous_view::<T>(vs, vl, "flash attention v")?;
        for (name, view) in [("q", &q), ("k", &k), ("v", &v)] {
            let (ptr, _guard) = view.device_ptr(&stream);
            if !ptr.is_multiple_of(16) {
                bail!(
                    "flash attention: {name} starts at device address {ptr:#x}, not 16-byte \
                     aligned (flash_attention copies such inputs; this is a bug in the caller)"
                );
            }
        }
        // SAFETY: the kernel writes every element: each (batch, head, query tile) block writes
        // its rows below Lq, all 64 columns of its head.
        let mut out = unsafe { dev.alloc::<T>(batch * lq * heads * FLASH_HEAD_DIM)? };
        let f = cuda::func(dev, &cuda::FLASH_ATTN, "flash_attn", T::DTYPE)?;
        let heads_i = to_i32(heads, "flash attention heads")?;
        let lq_i = to_i32(lq, "flash attention Lq")?;
        let lk_i = to_i32(lk, "flash attention Lk")?;
        let scale_log2 = (op.scale * std::f64::consts::LOG2_E) as f32;
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(lq.div_ceil(QUERY_ROWS), "flash attention query tiles")?,
                to_u32(heads, "flash attention heads")?,
                to_u32(batch, "flash attention batch")?,
            ),
            block_dim: (THREADS, 1, 1),
            // The kernel's 44 KiB are static.
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&q).arg(&k).arg(&v).arg(&mut out);
        launch.arg(&heads_i).arg(&lq_i).arg(&lk_i).arg(&scale_log2);
        // SAFETY: argument list matches flash_attn_* in kernels/flash_attn.cu (q, k, v, o, heads,
        // lq, lk, scale_log2); FlashDims bounded heads and batch to grid y/z and the lengths to
        // 2^30; the views hold batch·L·heads·64 elements each (the shapes were checked).
        unsafe { launch.launch(cfg) }.w()?;
        LAUNCHES.with(|c| c.set(c.get() + 1));
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supports_exactly_the_unets_case() {
        let ok = |dtype, causal, d, batch| supports(dtype, causal, d, batch);
        assert!(ok(DType::BF16, false, (64, 64), (2, 10)));
        assert!(ok(DType::F16, false, (64, 64), (1, 20)));
        assert!(!ok(DType::F32, false, (64, 64), (2, 10)), "f32");
        assert!(!ok(DType::F64, false, (64, 64), (2, 10)), "f64");
        assert!(!ok(DType::BF16, true, (64, 64), (2, 10)), "causal");
        assert!(!ok(DType::BF16, false, (32, 32), (2, 10)), "head dim 32");
        assert!(!ok(DType::BF16, false, (64, 32), (2, 10)), "value dim 32");
        assert!(
            !ok(DType::BF16, false, (512, 512), (1, 1)),
            "the VAE's head"
        );
        assert!(ok(DType::BF16, false, (64, 64), (65535, 65535)));
        assert!(
            !ok(DType::BF16, false, (64, 64), (65536, 1)),
            "batch above grid z"
        );
        assert!(
            !ok(DType::BF16, false, (64, 64), (1, 65536)),
            "heads above grid y"
        );
    }

    #[test]
    fn dims_name_the_bad_tensor() {
        let s = |d: &[usize]| Shape::from_dims(d);
        let err = |q: &[usize], k: &[usize], v: &[usize], h| {
            FlashDims::new(&s(q), &s(k), &s(v), h)
                .unwrap_err()
                .to_string()
        };
        let e = err(&[2, 5, 128], &[2, 7, 128], &[2, 7, 96], 2);
        assert!(
            e.contains("v [2, 7, 96] has width 96") && e.contains("= 128"),
            "{e}"
        );
        let e = err(&[2, 5, 192], &[2, 7, 128], &[2, 7, 128], 2);
        assert!(e.contains("q [2, 5, 192]"), "{e}");
        let e = err(&[2, 5, 128], &[3, 7, 128], &[3, 7, 128], 2);
        assert!(e.contains("batch size"), "{e}");
        let e = err(&[2, 5, 128], &[2, 7, 128], &[2, 6, 128], 2);
        assert!(e.contains("v [2, 6, 128] has 6 positions"), "{e}");
        let e = err(&[2, 5, 128], &[2, 0, 128], &[2, 0, 128], 2);
        assert!(e.contains("no positions"), "{e}");
        let e = err(&[5, 128], &[7, 128], &[7, 128], 2);
        assert!(e.contains("must be [B, L, heads * 64]"), "{e}");
        let e = err(&[2, 5, 0], &[2, 7, 0], &[2, 7, 0], 0);
        assert!(e.contains("heads must be between 1"), "{e}");
        let e = err(&[65536, 1, 64], &[65536, 1, 64], &[65536, 1, 64], 1);
        assert!(e.contains("batch 65536"), "{e}");
        let d = FlashDims::new(&s(&[3, 5, 320]), &s(&[3, 77, 320]), &s(&[3, 77, 320]), 5).unwrap();
        assert_eq!(
            d,
            FlashDims {
                batch: 3,
                heads: 5,
                lq: 5,
                lk: 77
            }
        );
        // No queries: nothing to attend from, so no keys is fine.
        assert!(FlashDims::new(&s(&[1, 0, 64]), &s(&[1, 0, 64]), &s(&[1, 0, 64]), 1).is_ok());
    }

    #[test]
    fn dtypes_must_be_16_bit_and_shared() {
        assert!(check_dtypes(DType::BF16, DType::BF16, DType::BF16).is_ok());
        assert!(check_dtypes(DType::F16, DType::F16, DType::F16).is_ok());
        let e = check_dtypes(DType::F32, DType::F32, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("q has dtype F32"), "{e}");
        let e = check_dtypes(DType::BF16, DType::F16, DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("share a dtype"), "{e}");
    }

    #[test]
    fn misaligned_views_are_copied_and_aligned_ones_kept() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let flat = Tensor::arange(0f32, 3.0 + 2.0 * 4.0 * 64.0, &dev)?;
        let odd = flat.narrow(0, 3, 2 * 4 * 64)?.reshape((2, 4, 64))?;
        assert_eq!(odd.layout().start_offset(), 3);
        let fixed = aligned(&odd)?;
        assert_eq!(fixed.layout().start_offset(), 0);
        assert!(fixed.is_contiguous());
        let diff: f32 = (&fixed - &odd)?.abs()?.max_all()?.to_scalar()?;
        assert_eq!(diff, 0.0);
        let even = flat.narrow(0, 8, 64)?;
        assert_eq!(aligned(&even)?.layout().start_offset(), 8);
        let strided = flat.narrow(0, 0, 128)?.reshape((2, 64))?.t()?;
        assert!(aligned(&strided)?.is_contiguous());
        Ok(())
    }
}
