//! Fused GEGLU, the activation of diffusers' `FeedForward` in every SDXL transformer block:
//! `hidden, gate = proj(x).chunk(2, dim=-1); hidden * F.gelu(gate)` with the exact (erf) GELU.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice};

/// `x[..., :d] * gelu_erf(x[..., d:])` for `x` of shape `[..., 2d]`; the result is `[..., d]`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let Some(&last) = x.dims().last() else {
        bail!("geglu: input must have at least one dimension, got a scalar");
    };
    if last % 2 != 0 {
        bail!(
            "geglu: the last dimension of input {:?} must be even (two halves)",
            x.shape()
        );
    }
    check_float_dtype(x.dtype(), "geglu", "input")?;
    if x.elem_count() == 0 {
        return x.narrow(x.rank() - 1, 0, last / 2);
    }
    x.contiguous()?.apply_op1_no_bwd(&GegluOp)
}

/// The custom op behind [`geglu`]; its input must be contiguous.
#[derive(Debug, Clone, Copy)]
pub struct GegluOp;

fn out_shape(shape: &Shape) -> Result<(Shape, usize)> {
    let mut dims = shape.dims().to_vec();
    let Some(last) = dims.last_mut() else {
        bail!("geglu: input must have at least one dimension");
    };
    if *last % 2 != 0 {
        bail!("geglu: the last dimension of input {shape:?} must be even");
    }
    *last /= 2;
    let d = *last;
    Ok((Shape::from_dims(&dims), d))
}

/// GELU as torch computes it with approximate="none": 0.5·g·(1 + erf(g/√2)).
fn gelu_erf(g: f64) -> f64 {
    0.5 * g * (1.0 + candle_core::cpu::erf::erf_f64(g * std::f64::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "turbine-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shape, d) = out_shape(l.shape())?;
        fn run<T: WithDType>(s: &CpuStorage, l: &Layout, d: usize) -> Result<CpuStorage> {
            let x = contiguous_slice::<T>(s, l, "geglu input")?;
            // NaN-filled, so an element the loop below missed cannot pass for a result.
            let mut y = vec![T::from_f64(f64::NAN); x.len() / 2];
            y.par_chunks_mut(d)
                .zip(x.par_chunks(2 * d))
                .for_each(|(yr, xr)| {
                    let (a, gate) = xr.split_at(d);
                    for ((yv, av), gv) in yr.iter_mut().zip(a).zip(gate) {
                        *yv = T::from_f64(av.to_f64() * gelu_erf(gv.to_f64()));
                    }
                });
            Ok(T::to_cpu_storage_owned(y))
        }
        let y = match s.dtype() {
            DType::F32 => run::<f32>(s, l, d)?,
            DType::F16 => run::<half::f16>(s, l, d)?,
            DType::BF16 => run::<half::bf16>(s, l, d)?,
            DType::F64 => run::<f64>(s, l, d)?,
            other => bail!("geglu: unsupported dtype {other:?}"),
        };
        Ok((y, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, to_i32, to_u32};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};

        const THREADS: usize = 256;

        fn run<T: CudaDType + DeviceRepr + WithDType>(
            s: &candle_core::CudaStorage,
            l: &Layout,
            d: usize,
        ) -> Result<candle_core::CudaStorage> {
            let dev = s.device();
            let x = cuda::contiguous_view::<T>(s, l, "geglu input")?;
            let rows = l.shape().elem_count() / (2 * d);
            // SAFETY: the kernel writes all rows * d elements.
            let y = unsafe { dev.alloc::<T>(rows * d)? };
            let f = cuda::func(dev, &cuda::GEGLU, "geglu", T::DTYPE)?;
            let d_arg = to_i32(d, "geglu width")?;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&f);
            launch.arg(&x).arg(&y).arg(&d_arg);
            let cfg = LaunchConfig {
                grid_dim: (
                    to_u32(rows, "geglu rows")?,
                    to_u32(d.div_ceil(THREADS), "geglu column blocks")?,
                    1,
                ),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument list matches geglu_* in kernels/geglu.cu.
            unsafe { launch.launch(cfg) }.w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }

        let (shape, d) = out_shape(l.shape())?;
        let y = match s.dtype() {
            DType::F32 => run::<f32>(s, l, d)?,
            DType::F16 => run::<half::f16>(s, l, d)?,
            DType::BF16 => run::<half::bf16>(s, l, d)?,
            other => bail!("geglu: no CUDA kernel for dtype {other:?}"),
        };
        Ok((y, shape))
    }
}
