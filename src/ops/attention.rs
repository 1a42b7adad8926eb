//! Scaled dot-product attention, `softmax(scale · Q·Kᵀ [+ causal mask]) · V`, for the UNet's
//! transformer blocks (head dim 64 in SDXL), CLIP's causal self-attention and the VAE's
//! single-head mid-block attention.
//!
//! Two layouts: [`attention`] takes heads already split out, `[..., L, D]`;
//! [`multi_head_attention`] takes the projections as they come out of `to_q`/`to_k`/`to_v`,
//! `[B, L, H·D]` with the heads interleaved, and returns `[B, Lq, H·Dv]`, which is what `to_out`
//! reads. On CUDA the latter needs no head-split copies of q, k, v nor a merge copy of the output:
//! cuBLAS addresses one image's heads with a stride of D elements and a leading dimension of H·D.
//!
//! The CUDA path is cuBLAS batched GEMMs around our own softmax kernel rather than a
//! flash-attention kernel. Why:
//! - The two GEMMs run at cuBLAS's tensor-core rate; a hand-written flash kernel only beats that
//!   with careful mma/ldmatrix tiling, which cannot be written and tested without a GPU at hand.
//! - The cost a flash kernel saves is the score matrix. At 512x512 the longest sequence is 1024
//!   tokens: batch·heads·1024² f32 scores + bf16 probabilities are 60 MiB per image at the
//!   10-head level, small next to the VAE decoder's activations (~64 MiB per image per tensor at
//!   full resolution), and [`AttentionOp::chunk_bytes`] caps them: by (batch, head) slices, and
//!   by query rows when one slice alone is over the budget (the VAE's 16384-token attention at
//!   1024x1024 would need 1.5 GiB of scores for one image).
//! - Q·Kᵀ is written as f32 (bf16 inputs, f32 accumulate and output), so the logits are never
//!   rounded to bf16, which is the precision flash attention keeps; the softmax runs in f32 and
//!   only the probabilities are rounded, as flash attention does before its P·V product.
//!
//! Cross-attention (77 keys) and sequences up to 4096 (1024x1024 images) go through the same path.
//!
//! One case has a flash kernel all the same: under [`Kernels::FLASH`], [`multi_head_attention`]
//! hands the UNet's attention (CUDA, f16/bf16, head dim 64, not causal) to
//! [`super::flash_attention`], written for exactly that shape and checked by emulating it on the
//! host, which keeps the scores on chip and so saves the ~12 bytes per score this path moves.
//! Everything else stays here.
//!
//! The composed forms ([`attention_composed`], [`multi_head_attention_composed`]) are candle's
//! ops, the baseline that `--kernels -attention` measures, and the CPU path of both layouts.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice, flash, Kernels};

/// Attention for `q: [..., Lq, D]`, `k: [..., Lk, D]`, `v: [..., Lk, Dv]` with equal leading
/// (batch, head) dims and one dtype; returns `[..., Lq, Dv]`. `causal` hides key `j` from query
/// `i` when `j > i` (top-left aligned, as torch's `is_causal`). On CUDA this is the fused op; on
/// the CPU it is [`attention_composed`], faster there than the reference loops.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let dims = Dims::split(q.shape(), k.shape(), v.shape())?;
    check_dtypes(q, k, v)?;
    if q.device().is_cuda() {
        return apply(q, k, v, &AttentionOp::new(scale, causal), &dims);
    }
    composed(q, k, v, scale, causal, &dims, COMPOSED_CHUNK_BYTES)
}

/// [`attention`] through the custom op on any device: the cuBLAS + kernel path on CUDA, the
/// reference loops (f64 accumulation) on the CPU. The CPU half exists to be compared with the
/// CUDA half and with the composed path; it is too slow for the models.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let dims = Dims::split(q.shape(), k.shape(), v.shape())?;
    check_dtypes(q, k, v)?;
    apply(q, k, v, &AttentionOp::new(scale, causal), &dims)
}

/// [`attention`] as candle ops, on any device: the GEMMs in the inputs' dtype (in f32 on the CPU
/// for half dtypes, which candle's CPU backend has no fast GEMM for), so on CUDA the logits are
/// rounded once to that dtype as the GEMM writes them; the scaling and softmax in f32, query rows
/// in chunks so that the f32 scores stay within 512 MiB. (This is candle's way, the baseline;
/// [`attention`] keeps the logits f32 from the GEMM on.)
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let dims = Dims::split(q.shape(), k.shape(), v.shape())?;
    check_dtypes(q, k, v)?;
    composed(q, k, v, scale, causal, &dims, COMPOSED_CHUNK_BYTES)
}

/// Attention over `heads` heads interleaved in the last dim: `q: [B, Lq, H·D]`,
/// `k: [B, Lk, H·D]`, `v: [B, Lk, H·Dv]`, head `h` being columns `h·D..(h+1)·D`; returns
/// `[B, Lq, H·Dv]` in the same layout. On CUDA [`super::flash_attention`] under
/// [`Kernels::FLASH`] where it applies (f16/bf16, head dim 64, not causal), else the fused op; on
/// the CPU [`multi_head_attention_composed`].
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let dims = Dims::interleaved(q.shape(), k.shape(), v.shape(), heads)?;
    check_dtypes(q, k, v)?;
    if !q.device().is_cuda() {
        return multi_head_attention_composed(q, k, v, heads, scale, causal);
    }
    if uses_flash(q.dtype(), &dims, causal) {
        return super::flash_attention(q, k, v, heads, scale);
    }
    if dims.heads > 1
        && dims.batch > LOOP_MAX_BATCH
        && dims.lq * dims.lk * dims.heads < LOOP_MIN_SCORES
    {
        // Small problems at large batch: the interleaved op runs one GEMM pair per image, and
        // launching those would cost more than copying the heads apart once.
        let op = AttentionOp::new(scale, causal);
        let out = apply(
            &split_heads(q, heads)?,
            &split_heads(k, heads)?,
            &split_heads(v, heads)?,
            &op,
            &Dims::split_of_interleaved(&dims),
        )?;
        return merge_heads(&out, dims.batch, heads);
    }
    let op = MultiHeadAttentionOp {
        heads,
        attention: AttentionOp::new(scale, causal),
    };
    apply(q, k, v, &op, &dims)
}

/// Whether [`multi_head_attention`] on CUDA runs the flash kernel: [`Kernels::FLASH`] is on for
/// this thread and the kernel covers the call.
fn uses_flash(dtype: DType, dims: &Dims, causal: bool) -> bool {
    super::enabled(Kernels::FLASH)
        && flash::supports(dtype, causal, (dims.d, dims.dv), (dims.batch, dims.heads))
}

/// Above this batch, [`multi_head_attention`] on CUDA splits the heads of small problems apart
/// (one batched GEMM pair for all images) instead of running the interleaved op (one GEMM pair
/// and one softmax per image). Three launches per extra image (~4 µs of host time each) against
/// four copy kernels: the copies win from three images up.
const LOOP_MAX_BATCH: usize = 2;

/// Score elements per image (Lq·Lk·H) from which one image's GEMMs and softmax take longer on the
/// GPU (~6 µs: 24 MiB of f32 scores and bf16 probabilities at ~4 TB/s) than their launches take
/// on the host, so looping over the images costs nothing and the copies would: 2^22.
const LOOP_MIN_SCORES: usize = 1 << 22;

/// [`multi_head_attention`] through the custom op on any device (the reference loops on the CPU),
/// with the heads left interleaved: what the CUDA half of the tests compares.
pub fn fused_multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let dims = Dims::interleaved(q.shape(), k.shape(), v.shape(), heads)?;
    check_dtypes(q, k, v)?;
    let op = MultiHeadAttentionOp {
        heads,
        attention: AttentionOp::new(scale, causal),
    };
    apply(q, k, v, &op, &dims)
}

/// [`multi_head_attention`] as candle ops: heads copied apart to `[B·H, L, D]`,
/// [`attention_composed`], and the result copied back to `[B, Lq, H·Dv]`.
pub fn multi_head_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let dims = Dims::interleaved(q.shape(), k.shape(), v.shape(), heads)?;
    check_dtypes(q, k, v)?;
    let out = composed(
        &split_heads(q, heads)?,
        &split_heads(k, heads)?,
        &split_heads(v, heads)?,
        scale,
        causal,
        &Dims::split_of_interleaved(&dims),
        COMPOSED_CHUNK_BYTES,
    )?;
    merge_heads(&out, dims.batch, heads)
}

/// `[B, L, H·D]` to contiguous `[B·H, L, D]` (a free reshape for one head).
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, width) = x.dims3()?;
    let d = width / heads;
    if heads == 1 {
        return x.contiguous();
    }
    x.reshape((b, l, heads, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, l, d))
}

/// `[B·H, L, D]` to contiguous `[B, L, H·D]`.
fn merge_heads(x: &Tensor, batch: usize, heads: usize) -> Result<Tensor> {
    let (_, l, d) = x.dims3()?;
    if heads == 1 {
        return x.reshape((batch, l, d));
    }
    x.reshape((batch, heads, l, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch, l, heads * d))
}

/// The budget of the composed path's f32 scores and probabilities (8 bytes per score), the same
/// as the fused op's default: 2^26 scores, as many as the VAE's 4096-token attention for 4 images.
const COMPOSED_CHUNK_BYTES: usize = AttentionOp::DEFAULT_CHUNK_BYTES;

fn apply(q: &Tensor, k: &Tensor, v: &Tensor, op: &impl CustomOp3, d: &Dims) -> Result<Tensor> {
    if d.batch * d.lq * d.dv == 0 {
        return Tensor::zeros(d.out_shape.clone(), q.dtype(), q.device());
    }
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, op)
}

/// The composed path on `[..., L, D]` inputs (`d` from [`Dims::split`]), `rows` query rows of
/// every slice at a time so that the f32 scores and probabilities of one chunk stay within
/// `chunk_bytes` (each row's softmax is independent, so chunking changes no result).
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    d: &Dims,
    chunk_bytes: usize,
) -> Result<Tensor> {
    if d.batch * d.lq * d.dv == 0 {
        return Tensor::zeros(d.out_shape.clone(), q.dtype(), q.device());
    }
    let work = match q.dtype() {
        DType::F16 | DType::BF16 if q.device().is_cpu() => DType::F32,
        dt => dt,
    };
    let (qw, kw, vw) = (q.to_dtype(work)?, k.to_dtype(work)?, v.to_dtype(work)?);
    let kt = kw.t()?;
    let row_dim = q.rank() - 2;
    let per_row = d.batch * d.lk * 8;
    let rows = (chunk_bytes / per_row.max(1)).clamp(1, d.lq);
    let mut outs = Vec::with_capacity(d.lq.div_ceil(rows));
    let mut start = 0;
    while start < d.lq {
        let n = rows.min(d.lq - start);
        let qc = if n == d.lq {
            qw.clone()
        } else {
            qw.narrow(row_dim, start, n)?
        };
        let mut scores = qc.matmul(&kt)?.to_dtype(DType::F32)?;
        if scale != 1.0 {
            scores = (scores * scale)?;
        }
        if causal {
            scores = scores.broadcast_add(&causal_mask(start, n, d.lk, q.device())?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(work)?;
        outs.push(probs.matmul(&vw)?);
        start += n;
    }
    let out = match outs.len() {
        1 => outs.swap_remove(0),
        _ => Tensor::cat(&outs, row_dim)?,
    };
    out.to_dtype(q.dtype())
}

/// Additive `[n, lk]` mask for query rows `start..start + n`: 0 where key `j <= row`, -inf above.
fn causal_mask(start: usize, n: usize, lk: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (start..start + n)
        .flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, lk), device)
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

/// Sizes of one attention call over `batch` independent (batch, head-group) rows of `heads`
/// interleaved heads: element `(b, i, h, x)` of q is at `((b·Lq + i)·H + h)·D + x`. The split
/// layout `[..., L, D]` is the case `heads == 1`, `batch` = the product of the leading dims.
#[derive(Debug, Clone)]
struct Dims {
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    out_shape: Shape,
}

impl Dims {
    /// `[..., L, D]` inputs with equal leading dims.
    fn split(q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
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
        let mut out = lead.to_vec();
        out.extend([qd[rank - 2], vd[rank - 1]]);
        Self::new(
            lead.iter().product(),
            1,
            (qd[rank - 2], qd[rank - 1]),
            (kd[rank - 2], kd[rank - 1]),
            (vd[rank - 2], vd[rank - 1]),
            (q, k, v),
            Shape::from_dims(&out),
        )
    }

    /// `[B, L, H·D]` inputs.
    fn interleaved(q: &Shape, k: &Shape, v: &Shape, heads: usize) -> Result<Self> {
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        if qd.len() != 3 || kd.len() != 3 || vd.len() != 3 {
            bail!("attention: q {q:?}, k {k:?}, v {v:?} must be [B, L, heads * D]");
        }
        if kd[0] != qd[0] || vd[0] != qd[0] {
            bail!("attention: q {q:?}, k {k:?}, v {v:?} differ in batch size");
        }
        if heads == 0 {
            bail!("attention: heads must be at least 1");
        }
        for (name, s, width) in [("q", q, qd[2]), ("k", k, kd[2]), ("v", v, vd[2])] {
            if !width.is_multiple_of(heads) {
                bail!("attention: {name} {s:?} has width {width}, not a multiple of {heads} heads");
            }
        }
        Self::new(
            qd[0],
            heads,
            (qd[1], qd[2] / heads),
            (kd[1], kd[2] / heads),
            (vd[1], vd[2] / heads),
            (q, k, v),
            Shape::from_dims(&[qd[0], qd[1], vd[2]]),
        )
    }

    /// The split layout `[B·H, L, D]` of the same problem.
    fn split_of_interleaved(d: &Self) -> Self {
        Self {
            batch: d.batch * d.heads,
            heads: 1,
            out_shape: Shape::from_dims(&[d.batch * d.heads, d.lq, d.dv]),
            ..d.clone()
        }
    }

    fn new(
        batch: usize,
        heads: usize,
        (lq, d): (usize, usize),
        (lk, dk): (usize, usize),
        (lv, dv): (usize, usize),
        (q, k, v): (&Shape, &Shape, &Shape),
        out_shape: Shape,
    ) -> Result<Self> {
        if dk != d {
            bail!("attention: k {k:?} has head dim {dk}, q {q:?} has {d}");
        }
        if lv != lk {
            bail!("attention: v {v:?} has {lv} positions, k {k:?} has {lk}");
        }
        if lk == 0 && lq > 0 {
            bail!("attention: k {k:?} has no positions to attend to");
        }
        Ok(Self {
            batch,
            heads,
            lq,
            lk,
            d,
            dv,
            out_shape,
        })
    }
}

/// The custom op behind [`attention`] on CUDA: inputs `(q, k, v)` in the split layout
/// `[..., L, D]`, contiguous, one dtype.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOp {
    pub scale: f64,
    pub causal: bool,
    /// Bytes of f32 scores + probabilities the CUDA path may hold at once; larger problems are
    /// processed in chunks of (batch·head) slices, or of query rows of one slice, that reuse the
    /// same buffers.
    pub chunk_bytes: usize,
}

/// The custom op behind [`multi_head_attention`] on CUDA: inputs `(q, k, v)` in the interleaved
/// layout `[B, L, heads·D]`, contiguous, one dtype.
#[derive(Debug, Clone, Copy)]
pub struct MultiHeadAttentionOp {
    pub heads: usize,
    pub attention: AttentionOp,
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

    /// The reference: one (row, head) at a time, scores and sums in f64.
    fn cpu<T: WithDType>(&self, q: &[T], k: &[T], v: &[T], dims: &Dims) -> Vec<T> {
        let Dims {
            heads,
            lq,
            lk,
            d,
            dv,
            ..
        } = *dims;
        let (hd, hdv) = (heads * d, heads * dv);
        let mut out = vec![T::from_f64(f64::NAN); dims.batch * lq * hdv];
        out.par_chunks_mut(dv).enumerate().for_each(|(index, o)| {
            let (row, h) = (index / heads, index % heads);
            let (b, i) = (row / lq, row % lq);
            let qi = &q[row * hd + h * d..][..d];
            let visible = if self.causal { lk.min(i + 1) } else { lk };
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let kj = &k[(b * lk + j) * hd + h * d..][..d];
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
                    .map(|(j, e)| e * v[(b * lk + j) * hdv + h * dv + c].to_f64())
                    .sum();
                *oc = T::from_f64(acc / sum);
            }
        });
        out
    }

    fn cpu_fwd_dims(
        &self,
        (qs, ql): (&CpuStorage, &Layout),
        (ks, kl): (&CpuStorage, &Layout),
        (vs, vl): (&CpuStorage, &Layout),
        dims: Dims,
    ) -> Result<(CpuStorage, Shape)> {
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
    fn cuda_fwd_dims(
        &self,
        (qs, ql): (&candle_core::CudaStorage, &Layout),
        (ks, kl): (&candle_core::CudaStorage, &Layout),
        (vs, vl): (&candle_core::CudaStorage, &Layout),
        dims: Dims,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
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
        let dims = Dims::split(ql.shape(), kl.shape(), vl.shape())?;
        self.cpu_fwd_dims((qs, ql), (ks, kl), (vs, vl), dims)
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
        let dims = Dims::split(ql.shape(), kl.shape(), vl.shape())?;
        self.cuda_fwd_dims((qs, ql), (ks, kl), (vs, vl), dims)
    }
}

impl CustomOp3 for MultiHeadAttentionOp {
    fn name(&self) -> &'static str {
        "turbine-multi-head-attention"
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
        let dims = Dims::interleaved(ql.shape(), kl.shape(), vl.shape(), self.heads)?;
        self.attention
            .cpu_fwd_dims((qs, ql), (ks, kl), (vs, vl), dims)
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
        let dims = Dims::interleaved(ql.shape(), kl.shape(), vl.shape(), self.heads)?;
        self.attention
            .cuda_fwd_dims((qs, ql), (ks, kl), (vs, vl), dims)
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

    /// One call in GEMM batches. A slice is one (image, head) pair. With one head the images are
    /// the GEMM batch (slices a whole image apart); with several, one image's heads are (slices
    /// `D` columns apart, rows `H·D` apart) and the images are a loop. Within that, chunks of
    /// `slices` slices, or of `rows` query rows of one slice, keep the scores within
    /// `op.chunk_bytes`.
    pub(super) fn run<T: CudaDType + DeviceRepr + WithDType>(
        op: &AttentionOp,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        dims: &Dims,
    ) -> Result<CudaStorage> {
        let Dims {
            batch,
            heads,
            lq,
            lk,
            d,
            dv,
            ..
        } = *dims;
        if d == 0 {
            bail!("attention: q and k have head dim 0");
        }
        let (hd, hdv) = (heads * d, heads * dv);
        let dev = qs.device();
        let stream = dev.cuda_stream();
        let blas_handle = dev.cublas_handle();
        let handle = *blas_handle.handle();
        let q = cuda::contiguous_view::<T>(qs, ql, "attention q")?;
        let k = cuda::contiguous_view::<T>(ks, kl, "attention k")?;
        let v = cuda::contiguous_view::<T>(vs, vl, "attention v")?;

        let (images, inner) = if heads == 1 {
            (1, batch)
        } else {
            (batch, heads)
        };
        // Element distance between consecutive slices of a GEMM batch.
        let (q_step, k_step, v_step, o_step) = if heads == 1 {
            (lq * d, lk * d, lk * dv, lq * dv)
        } else {
            (d, d, dv, dv)
        };
        // ... and between images (used when heads > 1, where the images are a loop).
        let (q_image, k_image, v_image, o_image) = (lq * hd, lk * hd, lk * hdv, lq * hdv);

        let per_row = lk * (4 + T::DTYPE.size_in_bytes());
        let (slices, rows) = if lq * per_row <= op.chunk_bytes {
            ((op.chunk_bytes / (lq * per_row)).clamp(1, inner), lq)
        } else {
            (1, (op.chunk_bytes / per_row).clamp(1, lq))
        };
        // SAFETY (all three): written by the GEMMs / kernel below before being read.
        let mut scores = unsafe { dev.alloc::<f32>(slices * rows * lk)? };
        let mut probs = unsafe { dev.alloc::<T>(slices * rows * lk)? };
        let mut out = unsafe { dev.alloc::<T>(batch * lq * hdv)? };

        let ty = data_type(T::DTYPE)?;
        let compute =
            if T::DTYPE == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            };
        let softmax = cuda::func(dev, &cuda::ATTN_SOFTMAX, "attn_softmax", T::DTYPE)?;
        let (one, zero) = (1f32, 0f32);
        let (lk_i, d_i, dv_i) = (
            to_i32(lk, "attention Lk")?,
            to_i32(d, "attention head dim")?,
            to_i32(dv, "attention value dim")?,
        );
        let (hd_i, hdv_i) = (
            to_i32(hd, "attention q/k width")?,
            to_i32(hdv, "attention v width")?,
        );
        let scale = op.scale as f32;
        let causal = i32::from(op.causal);

        for image in 0..images {
            let mut s0 = 0;
            while s0 < inner {
                let ns = slices.min(inner - s0);
                let ns_i = to_i32(ns, "attention slices per chunk")?;
                let mut r0 = 0;
                while r0 < lq {
                    let nr = rows.min(lq - r0);
                    let nr_i = to_i32(nr, "attention rows per chunk")?;
                    let row_offset = to_i32(r0, "attention row offset")?;
                    let chunk_scores = (nr * lk) as i64;
                    let qc = view(
                        &q,
                        image * q_image + s0 * q_step + r0 * hd,
                        (ns - 1) * q_step + (nr - 1) * hd + d,
                        "q",
                    )?;
                    let kc = view(
                        &k,
                        image * k_image + s0 * k_step,
                        (ns - 1) * k_step + (lk - 1) * hd + d,
                        "k",
                    )?;
                    let vc = view(
                        &v,
                        image * v_image + s0 * v_step,
                        (ns - 1) * v_step + (lk - 1) * hdv + dv,
                        "v",
                    )?;
                    {
                        // Row-major S[nr, Lk] = Q·Kᵀ is column-major Sᵀ[Lk, nr] = K·Qᵀ: A = K
                        // read as column-major [D, Lk] (columns H·D apart) and transposed, B = Q
                        // read as column-major [D, nr].
                        let (kp, _k_guard) = kc.device_ptr(&stream);
                        let (qp, _q_guard) = qc.device_ptr(&stream);
                        let (sp, _s_guard) = scores.device_ptr_mut(&stream);
                        // SAFETY: the views cover ns slices of the strides and leading dims
                        // given (`view` checked the bounds); the handle is bound to `stream`,
                        // the stream every buffer here is used on.
                        unsafe {
                            blas::gemm_strided_batched_ex(
                                handle,
                                sys::cublasOperation_t::CUBLAS_OP_T,
                                sys::cublasOperation_t::CUBLAS_OP_N,
                                lk_i,
                                nr_i,
                                d_i,
                                (&one) as *const f32 as *const _,
                                kp as *const _,
                                ty,
                                hd_i,
                                k_step as i64,
                                qp as *const _,
                                ty,
                                hd_i,
                                q_step as i64,
                                (&zero) as *const f32 as *const _,
                                sp as *mut _,
                                sys::cudaDataType_t::CUDA_R_32F,
                                lk_i,
                                chunk_scores,
                                ns_i,
                                compute,
                                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                            )
                        }
                        .w()?;
                    }

                    let softmax_rows = ns * nr;
                    let rows_arg = softmax_rows as i64;
                    let mut launch = stream.launch_builder(&softmax);
                    launch.arg(&scores).arg(&mut probs).arg(&rows_arg);
                    launch.arg(&nr_i).arg(&lk_i).arg(&scale).arg(&causal);
                    launch.arg(&row_offset);
                    let cfg = LaunchConfig {
                        grid_dim: (
                            to_u32(
                                softmax_rows.div_ceil(SOFTMAX_ROWS_PER_BLOCK),
                                "attention rows",
                            )?,
                            1,
                            1,
                        ),
                        block_dim: (32 * SOFTMAX_ROWS_PER_BLOCK as u32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: argument list matches attn_softmax_* in kernels/attn_softmax.cu.
                    unsafe { launch.launch(cfg) }.w()?;

                    {
                        // Row-major O[nr, Dv] = P·V is column-major Oᵀ[Dv, nr] = Vᵀ·Pᵀ: A = V
                        // read as column-major [Dv, Lk] (columns H·Dv apart), B = P read as
                        // column-major [Lk, nr], C = O with columns H·Dv apart.
                        let o_start = image * o_image + s0 * o_step + r0 * hdv;
                        let o_len = (ns - 1) * o_step + (nr - 1) * hdv + dv;
                        let mut oc =
                            out.try_slice_mut(o_start..o_start + o_len).ok_or_else(|| {
                                candle_core::Error::Msg(format!(
                                    "attention: output slice {o_start}..{} out of bounds",
                                    o_start + o_len
                                ))
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
                                nr_i,
                                lk_i,
                                (&one) as *const f32 as *const _,
                                vp as *const _,
                                ty,
                                hdv_i,
                                v_step as i64,
                                pp as *const _,
                                ty,
                                lk_i,
                                chunk_scores,
                                (&zero) as *const f32 as *const _,
                                op_ as *mut _,
                                ty,
                                hdv_i,
                                o_step as i64,
                                ns_i,
                                compute,
                                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                            )
                        }
                        .w()?;
                    }
                    r0 += nr;
                }
                s0 += ns;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn composed_in_row_chunks_equals_single_pass() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (3, 11, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (3, 11, 8), &dev)?;
        let dims = Dims::split(q.shape(), k.shape(), v.shape())?;
        for causal in [false, true] {
            let full = composed(&q, &k, &v, 0.3, causal, &dims, usize::MAX)?;
            // 8 bytes for each of 3 * 11 scores per row: 5 query rows at a time, last chunk of 2.
            let chunked = composed(&q, &k, &v, 0.3, causal, &dims, 3 * 11 * 8 * 5)?;
            let diff: f32 = (full - chunked)?.abs()?.max_all()?.to_scalar()?;
            assert!(
                diff < 1e-6,
                "chunked attention differs by {diff} (causal {causal})"
            );
        }
        Ok(())
    }

    #[test]
    fn flash_is_used_only_with_its_lever_and_where_it_applies() {
        use crate::ops::with_kernels;
        let s = |d: &[usize]| Shape::from_dims(d);
        let dims = |q: &[usize], kv: &[usize], heads| {
            Dims::interleaved(&s(q), &s(kv), &s(kv), heads).unwrap()
        };
        let unet = dims(&[2, 1024, 640], &[2, 1024, 640], 10);
        let cross = dims(&[2, 256, 1280], &[2, 77, 1280], 20);
        let clip = dims(&[2, 77, 768], &[2, 77, 768], 12);
        let vae = dims(&[1, 4096, 512], &[1, 4096, 512], 1);
        with_kernels(Kernels::ALL, || {
            assert!(uses_flash(DType::BF16, &unet, false));
            assert!(uses_flash(DType::F16, &cross, false));
            assert!(!uses_flash(DType::F32, &unet, false), "f32");
            assert!(!uses_flash(DType::BF16, &clip, true), "causal");
            assert!(!uses_flash(DType::BF16, &vae, false), "head dim 512");
        });
        with_kernels(Kernels::ALL.without(Kernels::FLASH), || {
            assert!(!uses_flash(DType::BF16, &unet, false));
        });
        // The lever alone decides here; that the models call this op only under ATTENTION is
        // theirs to decide.
        with_kernels(Kernels::FLASH, || {
            assert!(uses_flash(DType::BF16, &unet, false));
        });
    }

    #[test]
    fn interleaved_dims_name_the_bad_tensor() {
        let s = |d: &[usize]| Shape::from_dims(d);
        let err = Dims::interleaved(&s(&[2, 5, 12]), &s(&[2, 7, 12]), &s(&[2, 7, 10]), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("v [2, 7, 10]") && err.contains("4 heads"),
            "{err}"
        );
        let err = Dims::interleaved(&s(&[2, 5, 12]), &s(&[3, 7, 12]), &s(&[3, 7, 12]), 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch size"), "{err}");
        let d = Dims::interleaved(&s(&[2, 5, 12]), &s(&[2, 7, 12]), &s(&[2, 7, 8]), 4).unwrap();
        assert_eq!(
            (d.batch, d.heads, d.lq, d.lk, d.d, d.dv),
            (2, 4, 5, 7, 3, 2)
        );
        assert_eq!(d.out_shape.dims(), &[2, 5, 8]);
    }
}
