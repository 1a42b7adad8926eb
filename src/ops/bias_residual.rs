//! Bias + residual in one pass after a GEMM that ran without its bias: the UNet's `to_out`,
//! feed-forward and `proj_out` layers are each a Linear followed by a residual add, which candle
//! runs as three passes over the output (GEMM, bias broadcast-add, residual add); this makes it
//! two (GEMM, this op).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice};

/// `y + bias + residual`, computed in f32 or better and rounded once to `y`'s dtype.
///
/// `y` and `residual` share shape and dtype. `bias` is one vector broadcast as numpy would:
/// shape `[C]` for a bias on `y`'s last dim (a Linear's `[..., C]` output), or `[C, 1, ..., 1]`
/// for a bias on an inner dim (`[C, 1]` on `[B, C, HW]`: a per-channel bias on NCHW data). Its
/// dtype may differ from `y`'s: it is converted (a no-op when they match, as in the models).
pub fn bias_residual(y: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    if y.shape() != residual.shape() {
        bail!(
            "bias_residual: y {:?} and residual {:?} differ in shape",
            y.shape(),
            residual.shape()
        );
    }
    check_float_dtype(y.dtype(), "bias_residual", "y")?;
    if residual.dtype() != y.dtype() {
        bail!(
            "bias_residual: residual has dtype {:?}, y has {:?}",
            residual.dtype(),
            y.dtype()
        );
    }
    let inner = inner_len(y.dims(), bias.dims())?;
    if y.elem_count() == 0 {
        return Ok(y.clone());
    }
    let bias = bias.to_dtype(y.dtype())?.contiguous()?;
    y.contiguous()?
        .apply_op3_no_bwd(&bias, &residual.contiguous()?, &BiasResidualOp { inner })
}

/// The number of elements after the bias's channel dim in `y`, checking that `bias` is `[C]` or
/// `[C, 1, ..., 1]` and lines up with a dim of size `C` in `y`.
fn inner_len(y: &[usize], bias: &[usize]) -> Result<usize> {
    let Some((&channels, ones)) = bias.split_first() else {
        bail!("bias_residual: bias must be [C] or [C, 1, ..., 1], got a scalar");
    };
    if ones.iter().any(|&d| d != 1) {
        bail!("bias_residual: bias must be [C] or [C, 1, ..., 1], got {bias:?}");
    }
    if y.len() < bias.len() || y[y.len() - bias.len()] != channels {
        bail!("bias_residual: bias {bias:?} does not broadcast onto y {y:?}");
    }
    Ok(y[y.len() - ones.len()..].iter().product())
}

/// The custom op behind [`bias_residual`]: inputs `(y, bias, residual)`, contiguous, one dtype;
/// `y` is seen as `[outer, C, inner]` with `C` the bias's length.
#[derive(Debug, Clone, Copy)]
pub struct BiasResidualOp {
    pub inner: usize,
}

impl BiasResidualOp {
    /// Elements per independent span: a row of `C` (bias per column) when `inner` is 1, else one
    /// channel plane of `inner` elements (one bias value).
    fn plane_len(&self, channels: usize) -> usize {
        if self.inner == 1 {
            channels
        } else {
            self.inner
        }
    }

    fn check(&self, y: &Shape, bias: &Shape, residual: &Shape) -> Result<usize> {
        let channels = bias.elem_count();
        if y != residual {
            bail!("bias_residual: y {y:?} and residual {residual:?} differ in shape");
        }
        if channels == 0 || self.inner == 0 || !y.elem_count().is_multiple_of(channels * self.inner)
        {
            bail!(
                "bias_residual: y {y:?} is not [outer, {channels}, {}] for bias {bias:?}",
                self.inner
            );
        }
        Ok(channels)
    }

    /// The reference: f64 arithmetic, one rounding, parallel over planes.
    fn cpu<T: WithDType>(&self, y: &[T], b: &[T], r: &[T]) -> Vec<T> {
        let channels = b.len();
        let plane = self.plane_len(channels);
        let per_column = self.inner == 1;
        // NaN-filled, so an element the loop below missed cannot pass for a result.
        let mut out = vec![T::from_f64(f64::NAN); y.len()];
        out.par_chunks_mut(plane)
            .zip(y.par_chunks(plane))
            .zip(r.par_chunks(plane))
            .enumerate()
            // Short rows (a Linear's 320..1280 columns) in batches of ~64k elements per task.
            .with_min_len((1 << 16) / plane + 1)
            .for_each(|(p, ((o, yp), rp))| {
                let sum = |(ov, (yv, rv)): (&mut T, (&T, &T)), bv: f64| {
                    *ov = T::from_f64(yv.to_f64() + bv + rv.to_f64());
                };
                let elems = o.iter_mut().zip(yp.iter().zip(rp));
                if per_column {
                    elems.zip(b).for_each(|(e, bv)| sum(e, bv.to_f64()));
                } else {
                    let bv = b[p % channels].to_f64();
                    elems.for_each(|e| sum(e, bv));
                }
            });
        out
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(
        &self,
        (ys, yl): (&candle_core::CudaStorage, &Layout),
        (bs, bl): (&candle_core::CudaStorage, &Layout),
        (rs, rl): (&candle_core::CudaStorage, &Layout),
        channels: usize,
    ) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + WithDType,
    {
        use super::cuda::{self, to_i32, to_u32};
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        // 4096 elements per block (16 per thread) within a plane; longer planes are split over
        // grid y, whose 65535 limit raises the chunk for planes beyond 268M elements.
        const CHUNK: usize = 4096;
        const THREADS: u32 = 256;

        let dev = ys.device();
        let y = cuda::contiguous_view::<T>(ys, yl, "bias_residual y")?;
        let b = cuda::contiguous_view::<T>(bs, bl, "bias_residual bias")?;
        let r = cuda::contiguous_view::<T>(rs, rl, "bias_residual residual")?;
        let n = yl.shape().elem_count();
        let plane_len = self.plane_len(channels);
        let planes = n / plane_len;
        let chunk_len = CHUNK.max(plane_len.div_ceil(65535));
        // SAFETY: the kernel writes all n elements (planes * plane_len, `check` saw to that).
        let out = unsafe { dev.alloc::<T>(n)? };

        let f = cuda::func(dev, &cuda::BIAS_RESIDUAL, "bias_residual", T::DTYPE)?;
        let channels_arg = to_i32(channels, "bias_residual channels")?;
        let (inner_arg, plane_arg, chunk_arg) =
            (self.inner as i64, plane_len as i64, chunk_len as i64);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&f);
        launch.arg(&y).arg(&b).arg(&r).arg(&out);
        launch
            .arg(&channels_arg)
            .arg(&inner_arg)
            .arg(&plane_arg)
            .arg(&chunk_arg);
        let cfg = LaunchConfig {
            grid_dim: (
                // Grid x allows 2^31 - 1 blocks: i32's range.
                to_i32(planes, "bias_residual planes")? as u32,
                to_u32(plane_len.div_ceil(chunk_len), "bias_residual chunks")?,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches bias_residual_* in kernels/bias_residual.cu.
        unsafe { launch.launch(cfg) }.w()?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for BiasResidualOp {
    fn name(&self) -> &'static str {
        "turbine-bias-residual"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(yl.shape(), bl.shape(), rl.shape())?;
        fn run<T: WithDType>(
            op: &BiasResidualOp,
            (ys, yl): (&CpuStorage, &Layout),
            (bs, bl): (&CpuStorage, &Layout),
            (rs, rl): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let y = contiguous_slice::<T>(ys, yl, "bias_residual y")?;
            let b = contiguous_slice::<T>(bs, bl, "bias_residual bias")?;
            let r = contiguous_slice::<T>(rs, rl, "bias_residual residual")?;
            Ok(T::to_cpu_storage_owned(op.cpu(y, b, r)))
        }
        let args = ((ys, yl), (bs, bl), (rs, rl));
        let out = match ys.dtype() {
            DType::F32 => run::<f32>(self, args.0, args.1, args.2)?,
            DType::F16 => run::<half::f16>(self, args.0, args.1, args.2)?,
            DType::BF16 => run::<half::bf16>(self, args.0, args.1, args.2)?,
            DType::F64 => run::<f64>(self, args.0, args.1, args.2)?,
            other => bail!("bias_residual: unsupported dtype {other:?}"),
        };
        Ok((out, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let channels = self.check(yl.shape(), bl.shape(), rl.shape())?;
        let args = ((ys, yl), (bs, bl), (rs, rl));
        let out = match ys.dtype() {
            DType::F32 => self.cuda::<f32>(args.0, args.1, args.2, channels)?,
            DType::F16 => self.cuda::<half::f16>(args.0, args.1, args.2, channels)?,
            DType::BF16 => self.cuda::<half::bf16>(args.0, args.1, args.2, channels)?,
            other => bail!("bias_residual: no CUDA kernel for dtype {other:?}"),
        };
        Ok((out, yl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::inner_len;

    #[test]
    fn bias_lines_up_with_last_or_inner_dim() {
        assert_eq!(inner_len(&[2, 7, 5], &[5]).unwrap(), 1);
        assert_eq!(inner_len(&[2, 5, 7], &[5, 1]).unwrap(), 7);
        assert_eq!(inner_len(&[2, 5, 3, 4], &[5, 1, 1]).unwrap(), 12);
        assert!(inner_len(&[2, 7, 5], &[7]).is_err());
        assert!(inner_len(&[2, 7, 5], &[5, 2]).is_err());
        assert!(inner_len(&[5], &[5, 1]).is_err());
        assert!(inner_len(&[2, 5], &[]).is_err());
    }
}
