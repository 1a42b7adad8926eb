//! Nearest-neighbour 2x upsampling in channels-last layout (`[N, H, W, C]` → `[N, 2H, 2W, C]`),
//! the VAE decoder's upsampler on its NHWC path: `F.interpolate(scale_factor=2.0,
//! mode="nearest")` on the NCHW view of the same tensor.
//!
//! On CUDA one kernel copies each source pixel's channel vector to its four destinations in
//! 16-byte units; candle's alternative, a contiguous copy of a rank-6 broadcast view, does 64-bit
//! index division per element and dimension, and the VAE's three upsamplers write 109M elements
//! per 512x512 image.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice};

/// `x` `[N, H, W, C]` to `[N, 2H, 2W, C]`, output pixel `(n, i, j)` = input pixel
/// `(n, i/2, j/2)`.
pub fn upsample_nearest2x_channels_last(x: &Tensor) -> Result<Tensor> {
    x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "upsample_nearest2x_channels_last: input must be [N, H, W, C], got shape {:?}",
            x.shape()
        ))
    })?;
    check_float_dtype(x.dtype(), "upsample_nearest2x_channels_last", "input")?;
    if x.elem_count() == 0 {
        let (n, h, w, c) = x.dims4()?;
        return Tensor::zeros((n, 2 * h, 2 * w, c), x.dtype(), x.device());
    }
    x.contiguous()?.apply_op1_no_bwd(&UpsampleNearest2xNhwc)
}

#[derive(Debug, Clone, Copy)]
pub struct UpsampleNearest2xNhwc;

impl UpsampleNearest2xNhwc {
    /// The reference: one output row at a time, each source pixel's channels copied twice.
    fn cpu<T: WithDType>(x: &[T], (n, h, w, c): (usize, usize, usize, usize)) -> Vec<T> {
        let out_row = 2 * w * c;
        let mut y = vec![T::zero(); n * 2 * h * out_row];
        y.par_chunks_mut(out_row)
            .enumerate()
            .for_each(|(row, out)| {
                let src = &x[(row / 2) * w * c..(row / 2 + 1) * w * c];
                for (j, px) in out.chunks_mut(c).enumerate() {
                    px.copy_from_slice(&src[(j / 2) * c..(j / 2 + 1) * c]);
                }
            });
        y
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(
        dev: &candle_core::CudaDevice,
        s: &candle_core::CudaStorage,
        l: &Layout,
        (n, h, w, c): (usize, usize, usize, usize),
    ) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + WithDType,
    {
        use super::cuda::{self, to_i32, to_u32};
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        // Matches NU_THREADS in kernels/upsample.cu.
        const THREADS: usize = 256;
        let x = cuda::contiguous_view::<T>(s, l, "upsample input")?;
        // SAFETY: the kernel writes every unit of every output pixel.
        let y = unsafe { dev.alloc::<T>(n * 4 * h * w * c)? };
        let stream = dev.cuda_stream();
        let pixel_bytes = c * T::DTYPE.size_in_bytes();
        let unit = copy_unit(
            &x,
            &y,
            &stream,
            pixel_bytes,
            "upsample_nearest2x_channels_last",
        )?;
        let units = pixel_bytes / unit;
        let row_units = 2 * w * units;
        let f = cuda::func_untyped(dev, &cuda::UPSAMPLE, &format!("nearest2x_nhwc_u{unit}"))?;
        let width_arg = to_i32(w, "upsample width")?;
        let units_arg = to_i32(units, "upsample units per pixel")?;
        // The kernel indexes a row's units in 32 bits.
        to_i32(row_units, "upsample units per output row")?;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&x).arg(&y).arg(&width_arg).arg(&units_arg);
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(n * 2 * h, "upsample output rows")?,
                to_u32(row_units.div_ceil(THREADS), "upsample blocks per row")?,
                1,
            ),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if cfg.grid_dim.0 > i32::MAX as u32 || cfg.grid_dim.1 > 65535 {
            bail!(
                "upsample_nearest2x_channels_last: {:?} is too large for one launch",
                l.shape()
            );
        }
        // SAFETY: argument list matches nearest2x_nhwc_u* in kernels/upsample.cu; x and y are
        // `unit`-aligned and hold n*h*w and n*4*h*w pixels of `units` units.
        unsafe { launch.launch(cfg) }.w()?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

/// The widest unit (16, 8, 4 or 2 bytes) that divides a pixel's bytes and both base addresses
/// (the input may be a view at an offset into its allocation): the unit the copy kernels of
/// kernels/upsample.cu move a channels-last pixel in.
#[cfg(feature = "cuda")]
pub(super) fn copy_unit<T>(
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    y: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    pixel_bytes: usize,
    op: &str,
) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let align = {
        let (xp, _) = x.device_ptr(stream);
        let (yp, _) = y.device_ptr(stream);
        (xp | yp) as usize
    };
    [16, 8, 4, 2]
        .into_iter()
        .find(|u| pixel_bytes.is_multiple_of(*u) && align.is_multiple_of(*u))
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{op}: {pixel_bytes}-byte pixels at address alignment {align:#x} fit no copy \
                 unit (this is a bug)"
            ))
        })
}

fn out_shape(l: &Layout) -> Result<((usize, usize, usize, usize), Shape)> {
    let d = l.shape().dims4()?;
    Ok((d, Shape::from((d.0, 2 * d.1, 2 * d.2, d.3))))
}

impl CustomOp1 for UpsampleNearest2xNhwc {
    fn name(&self) -> &'static str {
        "turbine-upsample-nearest2x-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = out_shape(l)?;
        const WHAT: &str = "upsample input";
        let y = match s.dtype() {
            DType::F32 => CpuStorage::F32(Self::cpu(contiguous_slice::<f32>(s, l, WHAT)?, d)),
            DType::F16 => CpuStorage::F16(Self::cpu(contiguous_slice(s, l, WHAT)?, d)),
            DType::BF16 => CpuStorage::BF16(Self::cpu(contiguous_slice(s, l, WHAT)?, d)),
            DType::F64 => CpuStorage::F64(Self::cpu(contiguous_slice::<f64>(s, l, WHAT)?, d)),
            other => bail!("upsample_nearest2x_channels_last: unsupported dtype {other:?}"),
        };
        Ok((y, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d, shape) = out_shape(l)?;
        let dev = s.device();
        let y = match s.dtype() {
            DType::F32 => Self::cuda::<f32>(dev, s, l, d)?,
            DType::F16 => Self::cuda::<half::f16>(dev, s, l, d)?,
            DType::BF16 => Self::cuda::<half::bf16>(dev, s, l, d)?,
            other => bail!("upsample_nearest2x_channels_last: no CUDA kernel for dtype {other:?}"),
        };
        Ok((y, shape))
    }
}
