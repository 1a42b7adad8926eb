//! Linear, convolution and GroupNorm layers shared by the UNet and the VAE, with one matmul
//! seam.
//!
//! candle's CPU backend has no bf16 GEMM (neither `matmul` nor `conv2d`, which lowers to it).
//! On the CPU, half-precision products (bf16 and f16) are therefore computed in f32, bias
//! included, and rounded once to the model dtype, which is what CUDA's half GEMMs do too (f32
//! accumulation, one rounding in the epilogue): half-precision runs work on every device and
//! round alike. f32, and every dtype on CUDA, goes straight to candle.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::loader::derived;
use crate::model::profile::span;
use crate::ops::{self, ConvParams, Kernels};

/// The dtype to round results back to when `t` is a half-precision tensor on the CPU, whose
/// products we take in f32; `None` everywhere else.
fn cpu_half(t: &Tensor) -> Option<DType> {
    (ops::gemm_dtype(t) != t.dtype()).then_some(t.dtype())
}

/// Calls `f` on `args`, or, for half-precision CPU tensors, on their f32 copies, rounding the
/// result back once.
fn gemm_in_f32_on_cpu(
    args: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Tensor> {
    let half = args.first().and_then(|t| cpu_half(t));
    let args = args
        .iter()
        .map(|t| match half {
            Some(_) => t.to_dtype(DType::F32),
            None => Ok((*t).clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    let out = f(&args)?;
    match half {
        Some(dt) => out.to_dtype(dt),
        None => Ok(out),
    }
}

/// Batched `a @ b` (candle semantics), in f32 for half-precision CPU tensors.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    gemm_in_f32_on_cpu(&[a, b], |t| t[0].matmul(&t[1]))
}

/// SiLU taken in f32 and rounded once for half-precision input (candle's half SiLU rounds after
/// each of its three steps); for the small embedding vectors, where the cost is nil.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::BF16 | DType::F16 => xs.to_dtype(DType::F32)?.silu()?.to_dtype(xs.dtype()),
        _ => xs.silu(),
    }
}

/// `x @ wᵀ + b` with the weight stored `[out, in]` as in PyTorch checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`, laid out contiguously: candle's CPU GEMM on a transposed `[out, in]` view
    /// rounds differently depending on the number of rows, which made an image depend on the
    /// batch it ran in (by 1/255 here and there). A contiguous right-hand side does not.
    weight_t: Tensor,
    bias: Option<Tensor>,
}

/// `w.t()` laid out contiguously. A broadcast tensor (the recording backend's zeros, which
/// has no data) stays a view, so building the full-size model to list its tensors allocates
/// nothing for it.
fn transposed(w: &Tensor) -> Result<Tensor> {
    if w.stride().iter().all(|&s| s == 0) {
        w.t()
    } else {
        derived(&[w], "t", || w.t()?.contiguous())
    }
}

impl Linear {
    /// Reads `{vb}.weight` `[out, in]` and, when `bias`, `{vb}.bias` `[out]`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight_t = transposed(&vb.get((out_dim, in_dim), "weight")?)?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight_t, bias })
    }

    /// The same layer with weight and bias multiplied by `scale` (folds a constant factor on
    /// the output into the weights, for free at run time).
    pub fn scaled(&self, scale: f64) -> Result<Self> {
        let how = format!("x{scale}");
        let scaled = |t: &Tensor| derived(&[t], how.as_str(), || t.affine(scale, 0.0));
        Ok(Self {
            weight_t: scaled(&self.weight_t)?,
            bias: self.bias.as_ref().map(scaled).transpose()?,
        })
    }
}

impl Linear {
    /// Runs `f` on `xs` flattened to `[rows, in]` and gives its `[rows, out]` result `xs`'s
    /// leading dims back: one 2-D GEMM over all leading dimensions (candle's batched matmul with
    /// a broadcast weight is much slower); reshape is free on contiguous input.
    fn on_rows(&self, xs: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dims = xs.dims();
        let in_dim = dims.last().copied().unwrap_or(1);
        let rows = xs.elem_count() / in_dim.max(1);
        let out = f(&xs.reshape((rows, in_dim))?)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight_t.dim(1)?;
        }
        out.reshape(out_dims)
    }

    /// `x @ wᵀ`, without the bias.
    fn gemm(&self, xs: &Tensor) -> Result<Tensor> {
        self.on_rows(xs, |flat| matmul(flat, &self.weight_t))
    }

    /// `x @ wᵀ` and the bias it leaves out, for an op that adds the bias in its own pass
    /// ([`ops::geglu_bias`]).
    pub fn forward_unbiased(&self, xs: &Tensor) -> Result<(Tensor, Option<&Tensor>)> {
        Ok((span("linear", || self.gemm(xs))?, self.bias.as_ref()))
    }

    /// `forward(xs) + residual`. With [`Kernels::BIAS_RESIDUAL`] the GEMM runs without its bias
    /// and [`ops::bias_residual`] adds bias and residual in one pass (two passes over the output
    /// instead of three).
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        span("linear", || match &self.bias {
            Some(b) if ops::enabled(Kernels::BIAS_RESIDUAL) => {
                ops::bias_residual(&self.gemm(xs)?, b, residual)
            }
            _ => self.forward(xs)? + residual,
        })
    }

    /// `forward(xs) + residual` for tokens `xs` `[B, S, in]` whose output goes back to a
    /// channels-first residual `[B, out, ...]` with `S` positions (a spatial transformer's
    /// `proj_out`). With [`Kernels::BIAS_RESIDUAL`] the GEMM is taken transposed, `w · xsᵀ` per
    /// image, so it writes `[B, out, S]` directly and no transpose copy is needed before the one
    /// bias + residual pass; otherwise the residual add reads the `[B, S, out]` output through a
    /// transposed view, which is where candle's composition does the layout change.
    pub fn forward_channels_first_residual(
        &self,
        xs: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        span("linear", || self.channels_first_residual(xs, residual))
    }

    fn channels_first_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let out_dim = self.weight_t.dim(1)?;
        let res = residual.reshape((b, out_dim, s))?;
        let out = match &self.bias {
            Some(bias) if ops::enabled(Kernels::BIAS_RESIDUAL) => {
                // `[out, in]` as a transposed view of the stored `[in, out]`: cuBLAS and the CPU
                // GEMM both take it as an operand transpose, no copy. One GEMM per image, so an
                // image's result does not depend on the batch it runs in.
                let y = gemm_in_f32_on_cpu(&[&self.weight_t, xs], |t| {
                    t[0].t()?.broadcast_left(b)?.matmul(&t[1].transpose(1, 2)?)
                })?;
                ops::bias_residual(&y, &bias.reshape((out_dim, 1))?, &res)?
            }
            _ => (self.forward(xs)?.transpose(1, 2)? + res)?,
        };
        out.reshape(residual.shape())
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let Some(b) = &self.bias else {
            return span("linear", || self.gemm(xs));
        };
        // On the CPU the bias is added before the single rounding to a half dtype, as a fused
        // GEMM epilogue does; on CUDA candle's GEMM rounds its product first (the
        // `bias-residual` and `geglu` levers move most biases into their f32 passes).
        span("linear", || {
            self.on_rows(xs, |flat| {
                gemm_in_f32_on_cpu(&[flat, &self.weight_t, b], |t| {
                    t[0].matmul(&t[1])?.broadcast_add(&t[2])
                })
            })
        })
    }
}

/// 2-D convolution (dilation 1, one group) with bias, weight `[out, in, k, k]`, or KRSC
/// `[out, k, k, in]` for channels-last input (see [`Conv2d::to_channels_last`]).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    params: ConvParams,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self::nchw(weight, bias, padding, stride))
    }

    /// A convolution without bias (TAESD's after an upsampling): a zero bias, so that it runs
    /// as every other convolution does.
    pub fn new_without_bias(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = Tensor::zeros(out_channels, weight.dtype(), weight.device())?;
        Ok(Self::nchw(weight, bias, padding, stride))
    }

    fn nchw(weight: Tensor, bias: Tensor, padding: usize, stride: usize) -> Self {
        Self {
            weight,
            bias,
            params: ConvParams {
                padding,
                stride,
                channels_last: false,
            },
        }
    }

    /// The same layer for `[N, H, W, C]` input and output, its weight permuted to KRSC
    /// `[out, k, k, in]` here, once at load, so no call pays for the transpose. (A broadcast
    /// weight, the recording backend's zeros, stays a view: listing the model allocates nothing.)
    pub fn to_channels_last(&self) -> Result<Self> {
        if self.params.channels_last {
            return Ok(self.clone());
        }
        let krsc = self.weight.permute((0, 2, 3, 1))?;
        let weight = if krsc.stride().iter().all(|&s| s == 0) {
            krsc
        } else {
            krsc.contiguous()?
        };
        Ok(Self {
            weight,
            bias: self.bias.clone(),
            params: ConvParams {
                channels_last: true,
                ..self.params
            },
        })
    }

    /// Whether this layer takes `[N, H, W, C]` input.
    pub fn is_channels_last(&self) -> bool {
        self.params.channels_last
    }

    /// `conv(xs) + bias + residual`. With the `conv` lever the residual is folded into the
    /// convolution ([`ops::conv2d`]: on CUDA in cuDNN's epilogue, no separate pass over the
    /// output); without it, candle's conv and adds (the baseline).
    pub fn forward_residual(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        span("conv", || self.conv_residual(xs, residual))
    }

    fn conv_residual(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (w, b, p) = (&self.weight, &self.bias, self.params);
        if ops::enabled(Kernels::CONV) {
            return ops::conv2d(xs, w, b, residual, p);
        }
        if p.channels_last {
            return ops::conv2d_composed(xs, w, b, residual, p);
        }
        let out = gemm_in_f32_on_cpu(&[xs, w, b], |t| {
            t[0].conv2d(&t[1], p.padding, p.stride, 1, 1)?
                .broadcast_add(&t[2].reshape((1, (), 1, 1))?)
        })?;
        match residual {
            Some(r) => out + r,
            None => Ok(out),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_residual(xs, None)
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 convolution with padding 1 and stride 1,
/// in the convolution's layout: the upsamplers of the UNet (NCHW) and the VAE decoder (NCHW or
/// channels-last).
///
/// With [`Kernels::UPSAMPLE_CONV`] it runs as one 2x2 convolution of the low-resolution input
/// with four output phases and one copy that interleaves them ([`ops::upsample_conv_phases`]:
/// 4/9 of the FLOPs, no upsampled tensor); the phase weights are built here, at load, only when
/// that lever is on then (a second copy of 16/9 of the convolution's weight: ~85 MB in bf16 for
/// SDXL's UNet and VAE together). Without it, or where the phases were not built, the upsampled
/// tensor is made and convolved as diffusers does.
#[derive(Debug, Clone)]
pub struct UpsampleConv {
    conv: Conv2d,
    phases: Option<Conv2d>,
}

impl UpsampleConv {
    /// Wraps `conv`, which must be 3x3 with padding 1 and stride 1.
    pub fn new(conv: Conv2d) -> Result<Self> {
        let p = conv.params;
        let k = if p.channels_last {
            conv.weight.dims4()?.1
        } else {
            conv.weight.dims4()?.2
        };
        if (k, p.padding, p.stride) != (3, 1, 1) {
            candle_core::bail!(
                "an upsampler's convolution must be 3x3 with padding 1 and stride 1, got \
                 weight {:?}, padding {}, stride {}",
                conv.weight.shape(),
                p.padding,
                p.stride
            );
        }
        let phases = if ops::enabled(Kernels::UPSAMPLE_CONV) {
            let from = [&conv.weight, &conv.bias];
            let phases = || ops::upsample_conv_phases(&conv.weight, &conv.bias, p.channels_last);
            let weight = derived(&from, "phases.weight", || Ok(phases()?.0))?;
            let bias = derived(&from, "phases.bias", || Ok(phases()?.1))?;
            Some(Conv2d {
                weight,
                bias,
                params: p,
            })
        } else {
            None
        };
        Ok(Self { conv, phases })
    }

    /// The plain 3x3 convolution, for an upsampling to another size than 2x.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// `conv(upsample_nearest2x(xs))`, `xs` `[N, C, H, W]` (`[N, H, W, C]` channels-last).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let channels_last = self.conv.params.channels_last;
        if let Some(phases) = self
            .phases
            .as_ref()
            .filter(|_| ops::enabled(Kernels::UPSAMPLE_CONV))
        {
            let ys = phases.forward(xs)?;
            return span("upsample", || ops::interleave_phases(&ys, channels_last));
        }
        let up = if channels_last {
            span("upsample", || ops::upsample_nearest2x_channels_last(xs))?
        } else {
            let (_, _, h, w) = xs.dims4()?;
            span("upsample", || xs.upsample_nearest2d(2 * h, 2 * w))?
        };
        self.conv.forward(&up)
    }
}

/// GroupNorm over `[B, C, ...]` with all arithmetic in f32 and a single rounding to the input
/// dtype at the end.
///
/// For half dtypes this matters twice: the statistics of a 128x128x512 feature map would lose
/// their low bits in bf16, and applying the affine weight and bias after rounding (as candle's
/// `GroupNorm` does) adds two more bf16 roundings per element.
///
/// With [`Kernels::GROUP_NORM`] this is one [`ops::group_norm`] call (two reads and one write of
/// the input on CUDA; on the CPU too it is faster than the composition: 1.1 against 4.4 ms on a
/// `[1, 320, 64, 64]` f32 map, 78 against 160 ms on `[1, 128, 512, 512]`). Otherwise it is
/// composed from candle ops, where the per-channel weight and bias are kept in f32 and folded
/// with each group's 1/std into one scale, so the big tensor sees one multiply and one add.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// `[1, G, C/G, 1]` f32, for the composition.
    weight: Tensor,
    /// `[1, G, C/G, 1]` f32, for the composition.
    bias: Tensor,
    /// `[C]` in the model dtype, for the op, which takes them in the input's dtype: holding that
    /// copy means nothing is converted per call. (The model-dtype values are what the checkpoint
    /// holds once loaded, and what diffusers computes with, so both copies hold the same values.)
    weight_op: Tensor,
    bias_op: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, num_groups: usize, num_channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "{}: {num_groups} groups do not divide {num_channels} channels",
                vb.prefix()
            );
        }
        let weight_op = vb.get(num_channels, "weight")?;
        let bias_op = vb.get(num_channels, "bias")?;
        let composed = |t: &Tensor| -> Result<Tensor> {
            t.to_dtype(DType::F32)?
                .reshape((1, num_groups, num_channels / num_groups, 1))
        };
        Ok(Self {
            weight: composed(&weight_op)?,
            bias: composed(&bias_op)?,
            weight_op,
            bias_op,
            num_groups,
            eps,
        })
    }
}

impl GroupNorm {
    /// `silu(group_norm(x))`, the pairing of every resnet and output head, with the SiLU also
    /// taken in f32 before the one rounding (candle's half SiLU rounds three times).
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.normalize(xs, true)
    }

    fn normalize(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        span("group-norm", || self.normalize_unprofiled(xs, silu))
    }

    fn normalize_unprofiled(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = xs.dims();
        if dims.len() < 3 {
            candle_core::bail!("GroupNorm expects [B, C, ...], got {:?}", dims);
        }
        if ops::enabled(Kernels::GROUP_NORM) {
            return ops::group_norm(
                xs,
                self.num_groups,
                &self.weight_op,
                &self.bias_op,
                self.eps,
                silu,
            );
        }
        let (b, c) = (dims[0], dims[1]);
        let g = self.num_groups;
        let x = xs.to_dtype(DType::F32)?.reshape((b, g, c / g, ()))?;
        group_norm_composed(&x, &[2, 3], &self.weight, &self.bias, self.eps, silu)?
            .to_dtype(xs.dtype())?
            .reshape(dims)
    }
}

/// GroupNorm's f32 arithmetic from candle ops, for either layout: `x` (f32) is shaped so that
/// one group's elements are its `group_dims` (`[B, G, C/G, H·W]` over dims 2 and 3 in NCHW,
/// `[N, H·W, G, C/G]` over 1 and 3 in NHWC), and `weight` and `bias` (f32) broadcast to it per
/// channel. The mean, then the two-pass variance (E[(x - mean)^2] stays accurate when
/// |mean| >> std); each group's 1/std is folded with the weight into one scale, so the big
/// tensor sees one multiply and one add; SiLU in f32 too. The caller rounds once.
pub(crate) fn group_norm_composed(
    x: &Tensor,
    group_dims: &[usize],
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(group_dims)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(group_dims)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    let scale = inv_std.broadcast_mul(weight)?;
    let out = centered.broadcast_mul(&scale)?.broadcast_add(bias)?;
    if silu {
        out.silu()
    } else {
        Ok(out)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.normalize(xs, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// Where a CPU tensor's data starts.
    fn data(t: &Tensor) -> usize {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => {
                s.as_slice::<f32>().unwrap()[layout.start_offset()..].as_ptr() as usize
            }
            _ => unreachable!("a CPU test"),
        }
    }

    /// A second build from kept weights (a `--lora-modules` adapter's) holds the very data of
    /// the first: a linear layer's weight kept as the transposed view it holds, and its scaled
    /// copy (the attention's `to_q`) shared while derivations are.
    #[test]
    fn a_build_from_kept_weights_shares_the_first_builds_data() {
        use crate::model::loader::{Kept, RandomWeights, SharedDerivations};
        let vb = |b| VarBuilder::from_backend(b, DType::F32, Device::Cpu);
        let twice = |transposed: bool| -> (Linear, Linear) {
            let kept = Kept::default();
            let random = Box::new(RandomWeights::new(7));
            let first = Linear::new(vb(kept.keeping(random, transposed)), 4, 3, true).unwrap();
            let second = Linear::new(vb(kept.backend()), 4, 3, true).unwrap();
            (first, second)
        };
        let (a, b) = twice(false);
        assert_ne!(data(&a.weight_t), data(&b.weight_t));
        let (a, b) = twice(true);
        assert_eq!(data(&a.weight_t), data(&b.weight_t));
        assert_eq!(
            a.weight_t.to_vec2::<f32>().unwrap(),
            b.weight_t.to_vec2::<f32>().unwrap()
        );
        assert!(a.weight_t.is_contiguous() && a.weight_t.dims() == [4, 3]);
        let (x, y) = (a.scaled(0.125).unwrap(), b.scaled(0.125).unwrap());
        assert_ne!(data(&x.weight_t), data(&y.weight_t));

        let sharing = SharedDerivations::start();
        let (a, b) = twice(true);
        let (x, y) = (a.scaled(0.125).unwrap(), b.scaled(0.125).unwrap());
        assert_eq!(data(&x.weight_t), data(&y.weight_t));
        let bias = |l: &Linear| data(l.bias.as_ref().unwrap());
        assert_eq!(bias(&x), bias(&y));
        drop(sharing);
        // A name the first build did not read is a bug, said as one.
        let e = Linear::new(vb(Kept::default().backend()), 4, 3, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("was not read by the model's own build"), "{e}");
    }

    /// A `kernel` x `kernel` convolution (padding 1) of `cin` → `cout` channels with random
    /// weights, NCHW.
    fn conv(cin: usize, cout: usize, kernel: usize) -> Conv2d {
        let dev = Device::Cpu;
        let tensors = HashMap::from([
            (
                "weight".to_string(),
                Tensor::randn(0f32, 1., (cout, cin, kernel, kernel), &dev).unwrap(),
            ),
            (
                "bias".to_string(),
                Tensor::randn(0f32, 1., cout, &dev).unwrap(),
            ),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        Conv2d::new(vb, cin, cout, kernel, 1, 1).unwrap()
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale
    }

    #[test]
    fn upsample_conv_phases_are_built_with_the_lever_and_agree_with_the_plain_path() {
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 4), &Device::Cpu).unwrap();
        for channels_last in [false, true] {
            let c = if channels_last {
                conv(3, 6, 3).to_channels_last().unwrap()
            } else {
                conv(3, 6, 3)
            };
            let xs = if channels_last {
                x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
            } else {
                x.clone()
            };
            let off = ops::with_kernels(Kernels::NONE, || UpsampleConv::new(c.clone())).unwrap();
            assert!(off.phases.is_none(), "built with the lever off");
            let on = ops::with_kernels(Kernels::ALL, || UpsampleConv::new(c.clone())).unwrap();
            assert!(on.phases.is_some(), "not built with the lever on");
            let plain = ops::with_kernels(Kernels::NONE, || on.forward(&xs)).unwrap();
            // Without phases, the lever at call time changes nothing.
            let unbuilt = ops::with_kernels(Kernels::ALL, || off.forward(&xs)).unwrap();
            assert_eq!(max_rel_diff(&unbuilt, &plain), 0.0);
            let want_dims = if channels_last {
                [2, 10, 8, 6]
            } else {
                [2, 6, 10, 8]
            };
            assert_eq!(plain.dims(), want_dims);
            // The phases with turbine's convolution and with candle's.
            for k in [Kernels::ALL, Kernels::UPSAMPLE_CONV] {
                let got = ops::with_kernels(k, || on.forward(&xs)).unwrap();
                let err = max_rel_diff(&got, &plain);
                assert!(err < 1e-5, "{k}, channels_last={channels_last}: {err}");
            }
        }
    }

    #[test]
    fn upsample_conv_rejects_other_convolutions() {
        let e = UpsampleConv::new(conv(3, 4, 1)).unwrap_err().to_string();
        assert!(e.contains("must be 3x3 with padding 1 and stride 1"), "{e}");
    }
}
