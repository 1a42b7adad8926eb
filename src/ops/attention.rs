//! Scaled dot-product attention, `softmax(scale · Q·Kᵀ [+ causal mask]) · V`, for the UNet's
//! transformer blocks (head dim 64 in SDXL) and CLIP's causal self-attention.
//!
//! The CUDA path is cuBLAS batched GEMMs around our own softmax kernel rather than a
//! flash-attention kernel. Why:
//! - The two GEMMs run at cuBLAS's tensor-core rate; a hand-written flash kernel only beats that
//!   with careful mma/ldmatrix tiling, which cannot be written and tested without a GPU at hand.
//! - The cost a flash kernel saves is the score matrix. At 512x512 the longest sequence is 1024
//!   tokens: batch·heads·1024² f32 scores + bf16 probabilities are 60 MiB per image at the
//!   10-head level, small next to the VAE decoder's activations (~64 MiB per image per tensor at
//!   full resolution), and [`AttentionOp::chunk_bytes`] caps them by chunking the batch.
//! - Q·Kᵀ is written as f32 (bf16 inputs, f32 accumulate and output), so the logits are never
//!   rounded to bf16, which is the precision flash attention keeps; the softmax runs in f32 and
//!   only the probabilities are rounded, as flash attention does before its P·V product.
//!
//! Cross-attention (77 keys) and sequences up to 4096 (1024x1024 images) go through the same path.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice};

/// Attention for `q: [..., Lq, D]`, `k: [..., Lk, D]`, `v: [..., Lk, Dv]` with equal leading
/// (batch, head) dims and one dtype; returns `[..., Lq, Dv]`. `causal` hides key `j` from query
/// `i` when `j > i` (top-left aligned, as torch's `is_causal`). On CUDA this is the fused op; on
/// the CPU it is candle's matmul and softmax, which are faster there than the reference loops.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let dims = Dims::check(q.shape(), k.shape(), v.shape())?;
    check_dtypes(q, k, v)?;
    if q.device().is_cuda() {
        return apply(q, k, v, scale, causal, &dims);
    }
    composed(q, k, v, scale, causal, &dims)
}

/// [`attention`] through the custom op on any device: the cuBLAS + kernel path on CUDA, the
/// reference loops (f64 accumulation) on the CPU. The CPU half exists to be compared with the
/// CUDA half and with [`attention`]'s composed path; it is too slow for the models.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let dims = Dims::check(q.shape(), k.shape(), v.shape())?;
    check_dtypes(q, k, v)?;
    apply(q, k, v, scale, causal, &dims)
}

fn apply(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool, d: &Dims) -> Result<Tensor> {
    if d.batch * d.lq * d.dv == 0 {
        return Tensor::zeros(d.out_shape.clone(), q.dtype(), q.device());
    }
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &AttentionOp::new(scale, causal),
    )
}

/// The CPU path, in f32 whatever the dtype: candle's CPU matmul has no faster half-precision
/// kernel, and rounding the logits to bf16 would cost accuracy for nothing.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    d: &Dims,
) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let scores = f32(q)?.matmul(&f32(k)?.t()?)?;
    let mut scores = (scores * scale)?;
    if causal {
        let mask: Vec<f32> = (0..d.lq)
            .flat_map(|i| (0..d.lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (d.lq, d.lk), q.device())?;
        scores = scores.broadcast_add(&mask)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)?
        .matmul(&f32(v)?)?
        .to_dtype(q.dtype())
}

fn check_dtypes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    check_float_dtype(q.dtype(), "attention", "q")?;
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "attention: q, k, v must share a dtype, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    Ok(())
}

/// Sizes of one attention call: `batch` is the product of the leading (batch, head) dims.
struct Dims {
    batch: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    out_shape: Shape,
}

impl Dims {
    fn check(q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        let rank = qd.len();
        if rank < 2 || kd.len() != rank || vd.len() != rank {
            bail!("attention: q {q:?}, k {k:?}, v {v:?} must be [..., L, D] of one rank >= 2");
        }
        let lead = &qd[..rank - 2];
        if &kd[..rank - 2] != lead || &vd[..rank - 2] != lead {
            bail!(
                "attention: q {q:?}, k {k:?}, v {v:?} differ in their leading (batch, head) dims"
            );
        }
        let (lq, d) = (qd[rank - 2], qd[rank - 1]);
        let (lk, dk) = (kd[rank - 2], kd[rank - 1]);
        let (lv, dv) = (vd[rank - 2], vd[rank - 1]);
        if dk != d {
            bail!("attention: k {k:?} has head dim {dk}, q {q:?} has {d}");
        }
        if lv != lk {
            bail!("attention: v {v:?} has {lv} positions, k {k:?} has {lk}");
        }
        if lk == 0 && lq > 0 {
            bail!("attention: k {k:?} has no positions to attend to");
        }
        let mut out = lead.to_vec();
        out.extend([lq, dv]);
        Ok(Self {
            batch: lead.iter().product(),
            lq,
            lk,
            d,
            dv,
            out_shape: Shape::from_dims(&out),
        })
    }

    fn of(q: &Layout, k: &Layout, v: &Layout) -> Result<Self> {
        Self::check(q.shape(), k.shape(), v.shape())
    }
}

/// The custom op behind [`attention`] on CUDA: inputs `(q, k, v)`, contiguous, one dtype.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOp {
    pub scale: f64,
    pub causal: bool,
    /// Bytes of f32 scores + probabilities the CUDA path may hold at once; larger batches are
    /// processed in chunks of (batch·head) slices that reuse the same buffers.
    pub chunk_bytes: usize,
}

impl AttentionOp {
    /// 512 MiB: 85 images' worth at 512x512's 1024-token level, well below the VAE decoder's
    /// peak, so chunking never raises the pipeline's peak memory.
    pub const DEFAULT_CHUNK_BYTES: usize = 512 << 20;

    pub fn new(scale: f64, causal: bool) -> Self {
        Self {
            scale,
            causal,
            chunk_bytes: Self::DEFAULT_CHUNK_BYTES,
        }
    }

    /// The reference: one query row at a time, scores and sums in f64.
    fn cpu<T: WithDType>(&self, q: &[T], k: &[T], v: &[T], dims: &Dims) -> Vec<T> {
        let Dims { lq, lk, d, dv, .. } = *dims;
        let mut out = vec![T::from_f64(f64::NAN); dims.batch * lq * dv];
        out.par_chunks_mut(dv).enumerate().for_each(|(row, o)| {
            let (b, i) = (row / lq, row % lq);
            let qi = &q[row * d..(row + 1) * d];
            let visible = if self.causal { lk.min(i + 1) } else { lk };
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let kj = &k[(b * lk + j) * d..(b * lk + j + 1) * d];
                    self.scale
                        * qi.iter()
                            .zip(kj)
                            .map(|(a, c)| a.to_f64() * c.to_f64())
                            .sum::<f64>()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for (c, oc) in o.iter_mut().enumerate() {
                let acc: f64 = exps
                    .iter()
                    .enumerate()
                    .map(|(j, e)| e * v[(b * lk + j) * dv + c].to_f64())
                    .sum();
                *oc = T::from_f64(acc / sum);
            }
        });
        out
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "turbine-attention"
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
        let dims = Dims::of(ql, kl, vl)?;
        fn run<T: WithDType>(
            op: &AttentionOp,
            (qs, ql): (&CpuStorage, &Layout),
            (ks, kl): (&CpuStorage, &Layout),
            (vs, vl): (&CpuStorage, &Layout),
            dims: &Dims,
        ) -> Result<CpuStorage> {
            let q = contiguous_slice::<T>(qs, ql, "attention q")?;
            let k = contiguous_slice::<T>(ks, kl, "attention k")?;
            let v = contiguous_slice::<T>(vs, vl, "attention v")?;
            Ok(T::to_cpu_storage_owned(op.cpu(q, k, v, dims)))
        }
        let args = ((qs, ql), (ks, kl), (vs, vl));
        let out = match qs.dtype() {
            DType::F32 => run::<f32>(self, args.0, args.1, args.2, &dims)?,
            DType::F16 => run::<half::f16>(self, args.0, args.1, args.2, &dims)?,
            DType::BF16 => run::<half::bf16>(self, args.0, args.1, args.2, &dims)?,
            DType::F64 => run::<f64>(self, args.0, args.1, args.2, &dims)?,
            other => bail!("attention: unsupported dtype {other:?}"),
        };
        Ok((out, dims.out_shape))
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
        let dims = Dims::of(ql, kl, vl)?;
        let args = ((qs, ql), (ks, kl), (vs, vl));
        let out = match qs.dtype() {
            DType::F32 => cuda_impl::run::<f32>(self, args.0, args.1, args.2, &dims)?,
            DType::F16 => cuda_impl::run::<half::f16>(self, args.0, args.1, args.2, &dims)?,
            DType::BF16 => cuda_impl::run::<half::bf16>(self, args.0, args.1, args.2, &dims)?,
            other => bail!("attention: no CUDA kernel for dtype {other:?}"),
        };
        Ok((out, dims.out_shape))
    }
}

#[cfg(feature = "cuda")]
mod cuda_impl {
    use super::{AttentionOp, Dims};
    use crate::ops::cuda::{self, to_i32, to_u32};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, DType, Layout, Result, WithDType};

    const SOFTMAX_ROWS_PER_BLOCK: usize = 4;

    fn data_type(dtype: DType) -> Result<sys::cudaDataType_t> {
        Ok(match dtype {
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            other => bail!("attention: no cuBLAS type for {other:?}"),
        })
    }

    fn view<'a, T>(
        v: &CudaView<'a, T>,
        start: usize,
        len: usize,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        v.try_slice(start..start + len).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "attention: {what} slice {start}..{} out of bounds ({})",
                start + len,
                v.len()
            ))
        })
    }

    pub(super) fn run<T: CudaDType + DeviceRepr + WithDType>(
        op: &AttentionOp,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        dims: &Dims,
    ) -> Result<CudaStorage> {
        let Dims {
            batch,
            lq,
            lk,
            d,
            dv,
            ..
        } = *dims;
        let dev = qs.device();
        let stream = dev.cuda_stream();
        let blas_handle = dev.cublas_handle();
        let handle = *blas_handle.handle();
        let q = cuda::contiguous_view::<T>(qs, ql, "attention q")?;
        let k = cuda::contiguous_view::<T>(ks, kl, "attention k")?;
        let v = cuda::contiguous_view::<T>(vs, vl, "attention v")?;

        let per_slice = lq * lk * (4 + T::DTYPE.size_in_bytes());
        let chunk = (op.chunk_bytes / per_slice).clamp(1, batch);
        // SAFETY (all three): written by the GEMMs / kernel below before being read.
        let mut scores = unsafe { dev.alloc::<f32>(chunk * lq * lk)? };
        let mut probs = unsafe { dev.alloc::<T>(chunk * lq * lk)? };
        let mut out = unsafe { dev.alloc::<T>(batch * lq * dv)? };

        let ty = data_type(T::DTYPE)?;
        let compute =
            if T::DTYPE == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            };
        let softmax = cuda::func(dev, &cuda::ATTN_SOFTMAX, "attn_softmax", T::DTYPE)?;
        let (one, zero) = (1f32, 0f32);
        let (lq_i, lk_i, d_i, dv_i) = (
            to_i32(lq, "attention Lq")?,
            to_i32(lk, "attention Lk")?,
            to_i32(d, "attention head dim")?,
            to_i32(dv, "attention value dim")?,
        );
        let scale = op.scale as f32;
        let causal = i32::from(op.causal);

        let mut start = 0;
        while start < batch {
            let n = chunk.min(batch - start);
            let n_i = to_i32(n, "attention batch chunk")?;
            let qc = view(&q, start * lq * d, n * lq * d, "q")?;
            let kc = view(&k, start * lk * d, n * lk * d, "k")?;
            let vc = view(&v, start * lk * dv, n * lk * dv, "v")?;
            {
                // Row-major S[Lq, Lk] = Q·Kᵀ is column-major Sᵀ[Lk, Lq] = K·Qᵀ: A = K read as
                // column-major [D, Lk] and transposed, B = Q read as column-major [D, Lq].
                let (kp, _k_guard) = kc.device_ptr(&stream);
                let (qp, _q_guard) = qc.device_ptr(&stream);
                let (sp, _s_guard) = scores.device_ptr_mut(&stream);
                // SAFETY: pointers cover n slices of the strides given; the handle is bound to
                // `stream`, the stream every buffer here is used on.
                unsafe {
                    blas::gemm_strided_batched_ex(
                        handle,
                        sys::cublasOperation_t::CUBLAS_OP_T,
                        sys::cublasOperation_t::CUBLAS_OP_N,
                        lk_i,
                        lq_i,
                        d_i,
                        (&one) as *const f32 as *const _,
                        kp as *const _,
                        ty,
                        d_i,
                        (lk * d) as i64,
                        qp as *const _,
                        ty,
                        d_i,
                        (lq * d) as i64,
                        (&zero) as *const f32 as *const _,
                        sp as *mut _,
                        sys::cudaDataType_t::CUDA_R_32F,
                        lk_i,
                        (lq * lk) as i64,
                        n_i,
                        compute,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .w()?;
            }

            let rows = n * lq;
            let rows_arg = rows as i64;
            let mut launch = stream.launch_builder(&softmax);
            launch.arg(&scores).arg(&mut probs).arg(&rows_arg);
            launch.arg(&lq_i).arg(&lk_i).arg(&scale).arg(&causal);
            let cfg = LaunchConfig {
                grid_dim: (
                    to_u32(rows.div_ceil(SOFTMAX_ROWS_PER_BLOCK), "attention rows")?,
                    1,
                    1,
                ),
                block_dim: (32 * SOFTMAX_ROWS_PER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument list matches attn_softmax_* in kernels/attn_softmax.cu.
            unsafe { launch.launch(cfg) }.w()?;

            {
                // Row-major O[Lq, Dv] = P·V is column-major Oᵀ[Dv, Lq] = Vᵀ·Pᵀ: A = V read as
                // column-major [Dv, Lk], B = P read as column-major [Lk, Lq].
                let mut oc = out
                    .try_slice_mut(start * lq * dv..(start + n) * lq * dv)
                    .ok_or_else(|| {
                        candle_core::Error::Msg("attention: output chunk out of bounds".into())
                    })?;
                let (vp, _v_guard) = vc.device_ptr(&stream);
                let (pp, _p_guard) = probs.device_ptr(&stream);
                let (op_, _o_guard) = oc.device_ptr_mut(&stream);
                // SAFETY: as above.
                unsafe {
                    blas::gemm_strided_batched_ex(
                        handle,
                        sys::cublasOperation_t::CUBLAS_OP_N,
                        sys::cublasOperation_t::CUBLAS_OP_N,
                        dv_i,
                        lq_i,
                        lk_i,
                        (&one) as *const f32 as *const _,
                        vp as *const _,
                        ty,
                        dv_i,
                        (lk * dv) as i64,
                        pp as *const _,
                        ty,
                        lk_i,
                        (lq * lk) as i64,
                        (&zero) as *const f32 as *const _,
                        op_ as *mut _,
                        ty,
                        dv_i,
                        (lq * dv) as i64,
                        n_i,
                        compute,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .w()?;
            }
            start += n;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
