//! Nearest-neighbour 2x upsampling followed by a 3x3 convolution (padding 1, stride 1), the
//! upsamplers of the UNet and the VAE decoder, computed as four 2x2 convolutions on the
//! low-resolution input: 4 taps per output pixel instead of 9, and no upsampled tensor.
//!
//! Output pixel `(2i+a, 2j+b)` of `conv3x3(upsample2x(x))` reads upsampled rows `2i+a-1 ..=
//! 2i+a+1`, which are input rows `i-1, i, i` for `a = 0` and `i, i, i+1` for `a = 1` (likewise
//! for columns): two distinct input rows, the 3x3 kernel's rows summed where they land on the
//! same one (`[k0, k1+k2]` and `[k0+k1, k2]`). So each of the four phases `p = 2a + b` is a 2x2
//! convolution of `x`, and all four are one convolution of `x` with padding 1 and `4*O` output
//! channels ([`upsample_conv_phases`] builds its weight and bias once, at load), whose
//! `(H+1) x (W+1)` output holds phase `p` of output pixel `(2i+a, 2j+b)` at pixel `(i+a, j+b)`,
//! channels `p*O ..`. [`interleave_phases`] gathers those into the `2H x 2W` result: one copy,
//! the bytes the upsampling itself wrote before.
//!
//! The arithmetic: the summed weights are added in f32 and rounded once to the model dtype; a
//! bf16 model's result differs from diffusers' order of operations by about one bf16 rounding of
//! the weights (tests/ops.rs bounds it with the usual tolerances). What it saves: the SDXL VAE
//! decoder's three upsampling convolutions are 695 of its 2515 GFLOP per 512x512 image, and
//! this computes them in 4/9 of the FLOPs (a little more: the `(H+1) x (W+1)` border).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice};

/// The weight and bias of the phase convolution that, followed by [`interleave_phases`], equals
/// `conv(upsample_nearest2x(x), weight, padding 1) + bias`. `weight` is `[O, I, 3, 3]`, or KRSC
/// `[O, 3, 3, I]` when `channels_last`; the result is `[4O, I, 2, 2]` (`[4O, 2, 2, I]`) in
/// `weight`'s dtype, and `bias` `[O]` repeated to `[4O]`. Convolve with padding 1, stride 1.
pub fn upsample_conv_phases(
    weight: &Tensor,
    bias: &Tensor,
    channels_last: bool,
) -> Result<(Tensor, Tensor)> {
    let (o, i, kh, kw) = channels_first_dims(
        weight.shape(),
        channels_last,
        "upsample_conv_phases",
        "weight",
    )?;
    if (kh, kw) != (3, 3) {
        bail!(
            "upsample_conv_phases: the kernel must be 3x3, weight {:?} is {kh}x{kw}",
            weight.shape()
        );
    }
    if bias.dims() != [o] {
        bail!(
            "upsample_conv_phases: bias has shape {:?}, expected [{o}]",
            bias.shape()
        );
    }
    check_float_dtype(weight.dtype(), "upsample_conv_phases", "weight")?;
    let bias4 = Tensor::cat(&[bias, bias, bias, bias], 0)?;
    let shape = if channels_last {
        (4 * o, 2, 2, i)
    } else {
        (4 * o, i, 2, 2)
    };
    // A broadcast weight (the recording backend's zeros, when a model is only listed) stays a
    // broadcast: listing allocates nothing.
    if weight.stride().iter().all(|&s| s == 0) {
        let zero = Tensor::zeros((), weight.dtype(), weight.device())?;
        return Ok((zero.broadcast_as(shape)?, bias4));
    }
    let (row_dim, col_dim) = if channels_last { (1, 2) } else { (2, 3) };
    // The two taps of phase 0 (`[k0, k1 + k2]`) or 1 (`[k0 + k1, k2]`) along `dim`.
    let taps = |t: &Tensor, dim: usize, phase: usize| -> Result<Tensor> {
        let k = |j: usize| t.narrow(dim, j, 1);
        let pair = if phase == 0 {
            [k(0)?, (k(1)? + k(2)?)?]
        } else {
            [(k(0)? + k(1)?)?, k(2)?]
        };
        Tensor::cat(&pair, dim)
    };
    let w = weight.to_dtype(DType::F32)?;
    let mut phases = Vec::with_capacity(4);
    for a in 0..2 {
        let rows = taps(&w, row_dim, a)?;
        for b in 0..2 {
            phases.push(taps(&rows, col_dim, b)?);
        }
    }
    let w4 = Tensor::cat(&phases, 0)?
        .to_dtype(weight.dtype())?
        .contiguous()?;
    debug_assert_eq!(w4.dims(), Shape::from(shape).dims());
    Ok((w4, bias4))
}

/// The phase convolution's output to the upsampled convolution's: `[N, 4O, H+1, W+1]` to
/// `[N, O, 2H, 2W]`, or channels-last `[N, H+1, W+1, 4O]` to `[N, 2H, 2W, O]`; output pixel
/// `(2i+a, 2j+b)` is channels `(2a+b)*O ..` of input pixel `(i+a, j+b)`. A copy, exact.
pub fn interleave_phases(y: &Tensor, channels_last: bool) -> Result<Tensor> {
    let (n, c4, h1, w1) =
        channels_first_dims(y.shape(), channels_last, "interleave_phases", "input")?;
    if c4 == 0 || !c4.is_multiple_of(4) || h1 < 2 || w1 < 2 {
        bail!(
            "interleave_phases: input {:?} must have a multiple of 4 channels (four phases) and \
             at least 2x2 pixels",
            y.shape()
        );
    }
    check_float_dtype(y.dtype(), "interleave_phases", "input")?;
    let op = InterleavePhases { channels_last };
    if n == 0 {
        let (_, shape) = op.dims(y.layout())?;
        return Tensor::zeros(shape, y.dtype(), y.device());
    }
    y.contiguous()?.apply_op1_no_bwd(&op)
}

/// The four dims of `shape` in channels-first order (`[N, C, H, W]`, or a weight's
/// `[O, I, kh, kw]`), read from a channels-last tensor (`[N, H, W, C]`, KRSC) when
/// `channels_last`.
fn channels_first_dims(
    shape: &Shape,
    channels_last: bool,
    op: &str,
    what: &str,
) -> Result<(usize, usize, usize, usize)> {
    let d = shape.dims4().map_err(|_| {
        candle_core::Error::Msg(format!("{op}: {what} must be 4-D, got shape {shape:?}"))
    })?;
    Ok(if channels_last {
        (d.0, d.3, d.1, d.2)
    } else {
        d
    })
}

/// The op behind [`interleave_phases`], on a contiguous input.
#[derive(Debug, Clone, Copy)]
pub struct InterleavePhases {
    pub channels_last: bool,
}

/// Sizes of one interleave: `n` images of `o` output channels, `h x w` the low resolution (the
/// input has `(h+1) x (w+1)` pixels, the output `2h x 2w`).
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    o: usize,
    h: usize,
    w: usize,
}

impl InterleavePhases {
    fn dims(&self, l: &Layout) -> Result<(Dims, Shape)> {
        let (n, c4, h1, w1) =
            channels_first_dims(l.shape(), self.channels_last, "interleave_phases", "input")?;
        let dims = Dims {
            n,
            o: c4 / 4,
            h: h1 - 1,
            w: w1 - 1,
        };
        let shape = if self.channels_last {
            Shape::from((n, 2 * dims.h, 2 * dims.w, dims.o))
        } else {
            Shape::from((n, dims.o, 2 * dims.h, 2 * dims.w))
        };
        Ok((dims, shape))
    }

    /// The reference, one output row at a time.
    fn cpu<T: WithDType>(&self, x: &[T], d: Dims) -> Vec<T> {
        let Dims { o, h, w, .. } = d;
        let (h1, w1) = (h + 1, w + 1);
        if self.channels_last {
            let out_row = 2 * w * o;
            let mut y = vec![T::zero(); d.n * 2 * h * out_row];
            y.par_chunks_mut(out_row)
                .enumerate()
                .for_each(|(row, out)| {
                    let (n, oh) = (row / (2 * h), row % (2 * h));
                    let (a, si) = (oh % 2, oh / 2 + oh % 2);
                    for (ow, px) in out.chunks_mut(o).enumerate() {
                        let (b, sj) = (ow % 2, ow / 2 + ow % 2);
                        let src = (((n * h1 + si) * w1 + sj) * 4 + 2 * a + b) * o;
                        px.copy_from_slice(&x[src..src + o]);
                    }
                });
            y
        } else {
            let out_row = 2 * w;
            let mut y = vec![T::zero(); d.n * o * 2 * h * out_row];
            y.par_chunks_mut(out_row)
                .enumerate()
                .for_each(|(row, out)| {
                    let (plane, oh) = (row / (2 * h), row % (2 * h));
                    let (n, c) = (plane / o, plane % o);
                    let (a, si) = (oh % 2, oh / 2 + oh % 2);
                    for (ow, v) in out.iter_mut().enumerate() {
                        let (b, sj) = (ow % 2, ow / 2 + ow % 2);
                        let src_plane = n * 4 * o + (2 * a + b) * o + c;
                        *v = x[(src_plane * h1 + si) * w1 + sj];
                    }
                });
            y
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(
        &self,
        dev: &candle_core::CudaDevice,
        s: &candle_core::CudaStorage,
        l: &Layout,
        d: Dims,
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
        let Dims { n, o, h, w } = d;
        let elem = T::DTYPE.size_in_bytes();
        let x = cuda::contiguous_view::<T>(s, l, "interleave_phases input")?;
        let out_elems = n * o * 4 * h * w;
        // SAFETY: the kernel writes every element of the output.
        let y = unsafe { dev.alloc::<T>(out_elems)? };
        let stream = dev.cuda_stream();
        let height = to_i32(h, "interleave_phases height")?;
        let width = to_i32(w, "interleave_phases width")?;
        // The kernels index within an output row in 32 bits, and every source index in 64.
        let (f, rows, row_len, last_arg) = if self.channels_last {
            let pixel_bytes = o * elem;
            let unit =
                super::upsample::copy_unit(&x, &y, &stream, pixel_bytes, "interleave_phases")?;
            let units = pixel_bytes / unit;
            let f = cuda::func_untyped(dev, &cuda::UPSAMPLE, &format!("phases_nhwc_u{unit}"))?;
            (f, n * 2 * h, 2 * w * units, units)
        } else {
            let f = cuda::func_untyped(dev, &cuda::UPSAMPLE, &format!("phases_nchw_u{elem}"))?;
            (f, n * o * 2 * h, 2 * w, o)
        };
        to_i32(row_len, "interleave_phases row length")?;
        let last_arg = to_i32(last_arg, "interleave_phases units or channels")?;
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(rows, "interleave_phases output rows")?,
                to_u32(
                    row_len.div_ceil(THREADS),
                    "interleave_phases blocks per row",
                )?,
                1,
            ),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if cfg.grid_dim.0 > i32::MAX as u32 || cfg.grid_dim.1 > 65535 {
            bail!(
                "interleave_phases: {:?} is too large for one launch",
                l.shape()
            );
        }
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(&x)
            .arg(&y)
            .arg(&height)
            .arg(&width)
            .arg(&last_arg);
        // SAFETY: argument list matches phases_nhwc_u* / phases_nchw_u* in kernels/upsample.cu;
        // x holds n*(h+1)*(w+1)*4*o elements and y n*o*4*h*w, both aligned to the unit (NHWC)
        // or element (NCHW) the kernel moves.
        unsafe { launch.launch(cfg) }.w()?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

impl CustomOp1 for InterleavePhases {
    fn name(&self) -> &'static str {
        "turbine-interleave-phases"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d, shape) = self.dims(l)?;
        const WHAT: &str = "interleave_phases input";
        let y = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.cpu(contiguous_slice::<f32>(s, l, WHAT)?, d)),
            DType::F16 => CpuStorage::F16(self.cpu(contiguous_slice(s, l, WHAT)?, d)),
            DType::BF16 => CpuStorage::BF16(self.cpu(contiguous_slice(s, l, WHAT)?, d)),
            DType::F64 => CpuStorage::F64(self.cpu(contiguous_slice::<f64>(s, l, WHAT)?, d)),
            other => bail!("interleave_phases: unsupported dtype {other:?}"),
        };
        Ok((y, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d, shape) = self.dims(l)?;
        let dev = s.device();
        let y = match s.dtype() {
            DType::F32 => self.cuda::<f32>(dev, s, l, d)?,
            DType::F16 => self.cuda::<half::f16>(dev, s, l, d)?,
            DType::BF16 => self.cuda::<half::bf16>(dev, s, l, d)?,
            other => bail!("interleave_phases: no CUDA kernel for dtype {other:?}"),
        };
        Ok((y, shape))
    }
}
