//! Fused GroupNorm with optional SiLU: torch's `F.group_norm` (biased variance, affine), followed
//! by `F.silu` when `silu` is set, as diffusers' ResnetBlock2D does after every norm.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{check_float_dtype, contiguous_slice};

/// `silu(group_norm(x))` (or just the norm) for `x` of shape `[N, C, ...]`, `weight`/`bias` of
/// shape `[C]`. Statistics are computed in f32 or better whatever the dtype, and the result is
/// rounded to `x`'s dtype once.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!(
            "group_norm: input must be [N, C, ...], got shape {:?}",
            x.shape()
        );
    }
    let channels = dims[1];
    if groups == 0 || !channels.is_multiple_of(groups) {
        bail!("group_norm: {groups} groups do not divide the input's {channels} channels");
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [channels] {
            bail!(
                "group_norm: {name} has shape {:?}, expected [{channels}] for input {:?}",
                t.shape(),
                x.shape()
            );
        }
    }
    check_float_dtype(x.dtype(), "group_norm", "input")?;
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let x = x.contiguous()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    let bias = bias.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_no_bwd(&weight, &bias, &GroupNormOp { groups, eps, silu })
}

/// The custom op behind [`group_norm`]: inputs `(x, weight, bias)`, all contiguous and of one
/// dtype (the wrapper sees to that).
#[derive(Debug, Clone, Copy)]
pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

/// `[N, C, HW]` view of an `[N, C, ...]` input.
struct Dims {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    n: usize,
    c: usize,
    hw: usize,
}

impl Dims {
    fn of(shape: &Shape) -> Result<Self> {
        let d = shape.dims();
        if d.len() < 2 {
            bail!("group_norm: input must be [N, C, ...], got shape {shape:?}");
        }
        Ok(Self {
            n: d[0],
            c: d[1],
            hw: d[2..].iter().product(),
        })
    }
}

impl GroupNormOp {
    /// The reference: two-pass f64 statistics per group, parallel over groups.
    fn cpu<T: WithDType>(&self, x: &[T], w: &[T], b: &[T], d: &Dims) -> Vec<T> {
        let cpg = d.c / self.groups;
        let group_len = cpg * d.hw;
        let hw = d.hw;
        // NaN-filled, so an element the loops below missed cannot pass for a result.
        let mut y = vec![T::from_f64(f64::NAN); x.len()];
        y.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(index, (yg, xg))| {
                let g = index % self.groups;
                let len = group_len as f64;
                let mean = xg.iter().map(|v| v.to_f64()).sum::<f64>() / len;
                let var = xg.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / len;
                let rstd = 1.0 / (var + self.eps).sqrt();
                for (k, (yc, xc)) in yg.chunks_mut(hw).zip(xg.chunks(hw)).enumerate() {
                    let ch = g * cpg + k;
                    let scale = rstd * w[ch].to_f64();
                    let shift = b[ch].to_f64() - mean * scale;
                    for (yv, xv) in yc.iter_mut().zip(xc) {
                        let mut v = xv.to_f64() * scale + shift;
                        if self.silu {
                            v /= 1.0 + (-v).exp();
                        }
                        *yv = T::from_f64(v);
                    }
                }
            });
        y
    }

    #[cfg(feature = "cuda")]
    fn cuda<T>(
        &self,
        dev: &candle_core::CudaDevice,
        (xs, xl): (&candle_core::CudaStorage, &Layout),
        (ws, wl): (&candle_core::CudaStorage, &Layout),
        (bs, bl): (&candle_core::CudaStorage, &Layout),
        d: &Dims,
    ) -> Result<candle_core::CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + WithDType,
    {
        use super::cuda::{self, to_i32, to_u32};
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        // 8192 elements per stats block (32 per thread): enough work per block to hide memory
        // latency, and ~4000 blocks for the VAE's largest norms, so batch 1 still fills the GPU.
        const STATS_CHUNK: usize = 8192;
        // 4096 elements per apply block (16 per thread); chunks per plane go on grid y (<= 65535).
        const APPLY_CHUNK: usize = 4096;
        const THREADS: u32 = 256;

        let x = cuda::contiguous_view::<T>(xs, xl, "group_norm input")?;
        let w = cuda::contiguous_view::<T>(ws, wl, "group_norm weight")?;
        let b = cuda::contiguous_view::<T>(bs, bl, "group_norm bias")?;
        let stream = dev.cuda_stream();

        let cpg = d.c / self.groups;
        let num_groups = d.n * self.groups;
        let group_len = cpg * d.hw;
        let splits = group_len.div_ceil(STATS_CHUNK);
        let stats_chunk = group_len.div_ceil(splits);

        // SAFETY (all three): every element is written by the kernels below before it is read.
        let partial = unsafe { dev.alloc::<f32>(num_groups * splits * 3)? };
        let stats = unsafe { dev.alloc::<f32>(num_groups * 2)? };
        let y = unsafe { dev.alloc::<T>(d.n * d.c * d.hw)? };

        let f = cuda::func(dev, &cuda::GROUP_NORM, "gn_stats", T::DTYPE)?;
        let (group_len_arg, chunk_arg) = (group_len as i64, stats_chunk as i64);
        let splits_arg = to_i32(splits, "group_norm splits")?;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&x).arg(&partial).arg(&group_len_arg);
        launch.arg(&chunk_arg).arg(&splits_arg);
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(num_groups * splits, "group_norm stats blocks")?,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches gn_stats_* in kernels/group_norm.cu.
        unsafe { launch.launch(cfg) }.w()?;

        let f = cuda::func_untyped(dev, &cuda::GROUP_NORM, "gn_finalize")?;
        let groups_arg = to_i32(num_groups, "group_norm groups")?;
        let eps_arg = self.eps as f32;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&partial).arg(&stats).arg(&groups_arg);
        launch.arg(&splits_arg).arg(&eps_arg);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(num_groups.div_ceil(128), "group_norm groups")?, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches gn_finalize.
        unsafe { launch.launch(cfg) }.w()?;

        let apply_chunk = APPLY_CHUNK.max(d.hw.div_ceil(65535));
        let f = cuda::func(dev, &cuda::GROUP_NORM, "gn_apply", T::DTYPE)?;
        let channels_arg = to_i32(d.c, "group_norm channels")?;
        let cpg_arg = to_i32(cpg, "group_norm channels per group")?;
        let (hw_arg, apply_chunk_arg) = (d.hw as i64, apply_chunk as i64);
        let silu_arg = i32::from(self.silu);
        let mut launch = stream.launch_builder(&f);
        launch.arg(&x).arg(&stats).arg(&w).arg(&b).arg(&y);
        launch.arg(&channels_arg).arg(&cpg_arg).arg(&hw_arg);
        launch.arg(&apply_chunk_arg).arg(&silu_arg);
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(d.n * d.c, "group_norm planes")?,
                to_u32(d.hw.div_ceil(apply_chunk), "group_norm chunks")?,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches gn_apply_*; y has n*c*hw elements.
        unsafe { launch.launch(cfg) }.w()?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "turbine-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(xl.shape())?;
        fn run<T: WithDType>(
            op: &GroupNormOp,
            (xs, xl): (&CpuStorage, &Layout),
            (ws, wl): (&CpuStorage, &Layout),
            (bs, bl): (&CpuStorage, &Layout),
            d: &Dims,
        ) -> Result<CpuStorage> {
            let x = contiguous_slice::<T>(xs, xl, "group_norm input")?;
            let w = contiguous_slice::<T>(ws, wl, "group_norm weight")?;
            let b = contiguous_slice::<T>(bs, bl, "group_norm bias")?;
            Ok(T::to_cpu_storage_owned(op.cpu(x, w, b, d)))
        }
        let args = ((xs, xl), (ws, wl), (bs, bl));
        let y = match xs.dtype() {
            DType::F32 => run::<f32>(self, args.0, args.1, args.2, &d)?,
            DType::F16 => run::<half::f16>(self, args.0, args.1, args.2, &d)?,
            DType::BF16 => run::<half::bf16>(self, args.0, args.1, args.2, &d)?,
            DType::F64 => run::<f64>(self, args.0, args.1, args.2, &d)?,
            other => bail!("group_norm: unsupported dtype {other:?}"),
        };
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let d = Dims::of(xl.shape())?;
        let dev = xs.device();
        let args = ((xs, xl), (ws, wl), (bs, bl));
        let y = match xs.dtype() {
            DType::F32 => self.cuda::<f32>(dev, args.0, args.1, args.2, &d)?,
            DType::F16 => self.cuda::<half::f16>(dev, args.0, args.1, args.2, &d)?,
            DType::BF16 => self.cuda::<half::bf16>(dev, args.0, args.1, args.2, &d)?,
            other => bail!("group_norm: no CUDA kernel for dtype {other:?}"),
        };
        Ok((y, xl.shape().clone()))
    }
}
