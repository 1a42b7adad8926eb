//! Fused GEGLU, the activation of diffusers' `FeedForward` in every SDXL transformer block:
//! `hidden, gate = proj(x).chunk(2, dim=-1); hidden * F.gelu(gate)` with the exact (erf) GELU.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice};

/// `x[..., :d] * gelu_erf(x[..., d:])` for `x` of shape `[..., 2d]`; the result is `[..., d]`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let width = checked_width(x, "geglu")?;
    if x.elem_count() == 0 {
        return x.narrow(x.rank() - 1, 0, width / 2);
    }
    x.contiguous()?.apply_op1_no_bwd(&GegluOp)
}

/// `geglu(x + bias)` in one pass, `bias` `[2d]` (converted to `x`'s dtype): the feed-forward
/// projection's bias added here, in f32, so its GEMM runs without it and no pass over the
/// projection's output is spent on the bias alone.
pub fn geglu_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let width = checked_width(x, "geglu_bias")?;
    if bias.dims() != [width] {
        bail!(
            "geglu_bias: bias has shape {:?}, expected [{width}] for input {:?}",
            bias.shape(),
            x.shape()
        );
    }
    check_float_dtype(bias.dtype(), "geglu_bias", "bias")?;
    if x.elem_count() == 0 {
        return geglu(x);
    }
    let bias = bias.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(&bias, &GegluBiasOp)
}

/// What both entry points check of `x`: a float dtype and an even last dimension (the two
/// halves), which is returned.
fn checked_width(x: &Tensor, op: &str) -> Result<usize> {
    let Some(&width) = x.dims().last() else {
        bail!("{op}: input must have at least one dimension, got a scalar");
    };
    if width % 2 != 0 {
        bail!(
            "{op}: the last dimension of input {:?} must be even (two halves)",
            x.shape()
        );
    }
    check_float_dtype(x.dtype(), op, "input")?;
    Ok(width)
}

/// The custom op behind [`geglu`]; its input must be contiguous.
#[derive(Debug, Clone, Copy)]
pub struct GegluOp;

/// The custom op behind [`geglu_bias`]: (input, bias), both contiguous and of one dtype.
#[derive(Debug, Clone, Copy)]
pub struct GegluBiasOp;

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

/// The reference: `y[r, j] = (x[r, j] + b[j]) * gelu(x[r, d + j] + b[d + j])` in f64.
fn cpu_run<T: WithDType>(x: &[T], bias: Option<&[T]>, d: usize) -> CpuStorage {
    // NaN-filled, so an element the loop below missed cannot pass for a result.
    let mut y = vec![T::from_f64(f64::NAN); x.len() / 2];
    let b = |j: usize| bias.map_or(0.0, |b| b[j].to_f64());
    y.par_chunks_mut(d)
        .zip(x.par_chunks(2 * d))
        .for_each(|(yr, xr)| {
            let (a, gate) = xr.split_at(d);
            for (j, ((yv, av), gv)) in yr.iter_mut().zip(a).zip(gate).enumerate() {
                let (av, gv) = (av.to_f64() + b(j), gv.to_f64() + b(d + j));
                *yv = T::from_f64(av * gelu_erf(gv));
            }
        });
    T::to_cpu_storage_owned(y)
}

fn cpu_fwd(
    x: (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (shape, d) = out_shape(x.1.shape())?;
    fn run<T: WithDType>(
        (s, l): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
        d: usize,
    ) -> Result<CpuStorage> {
        let x = contiguous_slice::<T>(s, l, "geglu input")?;
        let b = bias
            .map(|(bs, bl)| contiguous_slice::<T>(bs, bl, "geglu bias"))
            .transpose()?;
        Ok(cpu_run(x, b, d))
    }
    let y = match x.0.dtype() {
        DType::F32 => run::<f32>(x, bias, d)?,
        DType::F16 => run::<half::f16>(x, bias, d)?,
        DType::BF16 => run::<half::bf16>(x, bias, d)?,
        DType::F64 => run::<f64>(x, bias, d)?,
        other => bail!("geglu: unsupported dtype {other:?}"),
    };
    Ok((y, shape))
}

#[cfg(feature = "cuda")]
fn cuda_fwd(
    x: (&candle_core::CudaStorage, &Layout),
    bias: Option<(&candle_core::CudaStorage, &Layout)>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use super::cuda::{self, to_i32, to_u32};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};

    const THREADS: usize = 256;

    fn run<T: CudaDType + DeviceRepr + WithDType>(
        (s, l): (&candle_core::CudaStorage, &Layout),
        bias: Option<(&candle_core::CudaStorage, &Layout)>,
        d: usize,
    ) -> Result<candle_core::CudaStorage> {
        let dev = s.device();
        let x = cuda::contiguous_view::<T>(s, l, "geglu input")?;
        let b = bias
            .map(|(bs, bl)| cuda::contiguous_view::<T>(bs, bl, "geglu bias"))
            .transpose()?;
        let rows = l.shape().elem_count() / (2 * d);
        // SAFETY: the kernel writes all rows * d elements.
        let y = unsafe { dev.alloc::<T>(rows * d)? };
        let base = if b.is_some() { "geglu_bias" } else { "geglu" };
        let f = cuda::func(dev, &cuda::GEGLU, base, T::DTYPE)?;
        let d_arg = to_i32(d, "geglu width")?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&f);
        launch.arg(&x);
        if let Some(b) = &b {
            launch.arg(b);
        }
        launch.arg(&y).arg(&d_arg);
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(rows, "geglu rows")?,
                to_u32(d.div_ceil(THREADS), "geglu column blocks")?,
                1,
            ),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches geglu_* (x, y, d) or geglu_bias_* (x, bias, y, d) in
        // kernels/geglu.cu; x holds rows * 2d elements, bias 2d (checked by `geglu_bias`).
        unsafe { launch.launch(cfg) }.w()?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    let (shape, d) = out_shape(x.1.shape())?;
    let y = match x.0.dtype() {
        DType::F32 => run::<f32>(x, bias, d)?,
        DType::F16 => run::<half::f16>(x, bias, d)?,
        DType::BF16 => run::<half::bf16>(x, bias, d)?,
        other => bail!("geglu: no CUDA kernel for dtype {other:?}"),
    };
    Ok((y, shape))
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "turbine-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_fwd((s, l), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_fwd((s, l), None)
    }
}

/// [`GegluBiasOp`] called directly (not through [`geglu_bias`]): the bias must already have
/// the input's dtype and one value per input column.
fn check_raw_bias((dtype, l): (DType, &Layout), (bias_dtype, bl): (DType, &Layout)) -> Result<()> {
    if bias_dtype != dtype
        || bl.shape().elem_count() != l.shape().dims().last().copied().unwrap_or(0)
    {
        bail!("geglu_bias: the bias must have the input's dtype and last dimension");
    }
    Ok(())
}

impl CustomOp2 for GegluBiasOp {
    fn name(&self) -> &'static str {
        "turbine-geglu-bias"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_raw_bias((s.dtype(), l), (bs.dtype(), bl))?;
        cpu_fwd((s, l), Some((bs, bl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        check_raw_bias((s.dtype(), l), (bs.dtype(), bl))?;
        cuda_fwd((s, l), Some((bs, bl)))
    }
}
