//! Fused GroupNorm with optional SiLU: torch's `F.group_norm` (biased variance, affine), followed
//! by `F.silu` when `silu` is set, as diffusers' ResnetBlock2D does after every norm. Two layouts:
//! channels first (`[N, C, ...]`, PyTorch's) and channels last (`[N, ..., C]`, the VAE decoder's
//! NHWC path, where cuDNN's tensor-core convolutions need no transposes).

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
    run(x, groups, weight, bias, eps, silu, false)
}

/// [`group_norm`] for channels-last input `[N, ..., C]`: group `g` is channels
/// `[g*C/groups, (g+1)*C/groups)` of every position, as it is of every plane in `[N, C, ...]`,
/// so the result is the channels-first norm of the same tensor, permuted.
pub fn group_norm_channels_last(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    run(x, groups, weight, bias, eps, silu, true)
}

fn run(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
    channels_last: bool,
) -> Result<Tensor> {
    let d = Dims::of(x.shape(), channels_last)?;
    let channels = d.c;
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
    let op = GroupNormOp {
        groups,
        eps,
        silu,
        channels_last,
    };
    x.apply_op3_no_bwd(&weight, &bias, &op)
}

/// The custom op behind [`group_norm`]: inputs `(x, weight, bias)`, all contiguous and of one
/// dtype (the wrapper sees to that).
#[derive(Debug, Clone, Copy)]
pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
    /// `x` is `[N, ..., C]` rather than `[N, C, ...]`.
    pub channels_last: bool,
}

/// Batch, channels and positions per channel (`HW`) of an input in either layout.
struct Dims {
    n: usize,
    c: usize,
    hw: usize,
}

impl Dims {
    fn of(shape: &Shape, channels_last: bool) -> Result<Self> {
        let d = shape.dims();
        if d.len() < 2 {
            let layout = if channels_last {
                "[N, ..., C]"
            } else {
                "[N, C, ...]"
            };
            bail!("group_norm: input must be {layout}, got shape {shape:?}");
        }
        let (c, rest) = if channels_last {
            (d[d.len() - 1], &d[1..d.len() - 1])
        } else {
            (d[1], &d[2..])
        };
        Ok(Self {
            n: d[0],
            c,
            hw: rest.iter().product(),
        })
    }
}

impl GroupNormOp {
    fn cpu<T: WithDType>(&self, x: &[T], w: &[T], b: &[T], d: &Dims) -> Vec<T> {
        if self.channels_last {
            self.cpu_channels_last(x, w, b, d)
        } else {
            self.cpu_channels_first(x, w, b, d)
        }
    }

    /// The reference: two-pass f64 statistics per group, parallel over groups.
    fn cpu_channels_first<T: WithDType>(&self, x: &[T], w: &[T], b: &[T], d: &Dims) -> Vec<T> {
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

    /// The channels-last reference: the same two-pass f64 statistics, gathered from the
    /// strided channels of each group; then one pass over positions with a per-(n, channel)
    /// scale and shift.
    fn cpu_channels_last<T: WithDType>(&self, x: &[T], w: &[T], b: &[T], d: &Dims) -> Vec<T> {
        let (c, hw, cpg) = (d.c, d.hw, d.c / self.groups);
        let group_elems = |index: usize| {
            let (n, g) = (index / self.groups, index % self.groups);
            (0..hw).flat_map(move |p| {
                let row = (n * hw + p) * c + g * cpg;
                x[row..row + cpg].iter().map(|v| v.to_f64())
            })
        };
        let len = (cpg * hw) as f64;
        // (scale, shift) per (n, channel).
        let affine: Vec<(f64, f64)> = (0..d.n * self.groups)
            .into_par_iter()
            .flat_map_iter(|index| {
                let mean = group_elems(index).sum::<f64>() / len;
                let var = group_elems(index).map(|v| (v - mean).powi(2)).sum::<f64>() / len;
                let rstd = 1.0 / (var + self.eps).sqrt();
                let g = index % self.groups;
                (g * cpg..(g + 1) * cpg).map(move |ch| {
                    let scale = rstd * w[ch].to_f64();
                    (scale, b[ch].to_f64() - mean * scale)
                })
            })
            .collect();
        let mut y = vec![T::from_f64(f64::NAN); x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let n = row / hw;
                let coeffs = &affine[n * c..(n + 1) * c];
                for ((yv, xv), (scale, shift)) in yr.iter_mut().zip(xr).zip(coeffs) {
                    let mut v = xv.to_f64() * scale + shift;
                    if self.silu {
                        v /= 1.0 + (-v).exp();
                    }
                    *yv = T::from_f64(v);
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

        // Channels first: 8192 elements per stats block (32 per thread), enough work per block
        // to hide memory latency, and ~4000 blocks for the VAE's largest norms, so batch 1 still
        // fills the GPU.
        const STATS_CHUNK: usize = 8192;
        // 4096 elements per apply block (16 per thread); chunks per plane go on grid y (<= 65535).
        const APPLY_CHUNK: usize = 4096;
        // Channels last: at most 16384 elements per stats block (64 per thread), and at least
        // ~1024 blocks per sample when there are enough positions (the VAE mid-block's 64x64x512
        // gets 1024 blocks of 4 positions): every block writes G partials, which one
        // gn_finalize block per group then merges, so the bound keeps both the partials'
        // writes (G*12 bytes per block, <10% of the block's reads) and the merge short.
        const CL_STATS_ELEMS: usize = 16384;
        const CL_STATS_BLOCKS: usize = 1024;
        // 8192 elements per channels-last apply block (32 per thread).
        const CL_APPLY_ELEMS: usize = 8192;
        // The channels-last stats kernel keeps one 12-byte accumulator per group in dynamic
        // shared memory, next to 6 KB of static: 2048 groups (24 KB) stays well inside the
        // 48 KB a launch may use without opting in.
        const CL_MAX_GROUPS: usize = 2048;
        // gn_cl_* put the batch on grid y.
        const MAX_GRID_Y: usize = 65535;
        const THREADS: u32 = 256;
        // Matches GN_FIN_THREADS in kernels/group_norm.cu.
        const FIN_THREADS: u32 = 128;

        let x = cuda::contiguous_view::<T>(xs, xl, "group_norm input")?;
        let w = cuda::contiguous_view::<T>(ws, wl, "group_norm weight")?;
        let b = cuda::contiguous_view::<T>(bs, bl, "group_norm bias")?;
        let stream = dev.cuda_stream();

        let cpg = d.c / self.groups;
        let num_groups = d.n * self.groups;
        let channels_arg = to_i32(d.c, "group_norm channels")?;
        let cpg_arg = to_i32(cpg, "group_norm channels per group")?;
        let silu_arg = i32::from(self.silu);
        // SAFETY: every element is written by the apply kernel below.
        let y = unsafe { dev.alloc::<T>(d.n * d.c * d.hw)? };
        // Channels last: the 16-byte-vector kernels where the layout allows them.
        let (vec_stats, vec_apply) = if self.channels_last {
            use candle_core::cuda_backend::cudarc::driver::DevicePtr;
            let (xp, _x_done) = x.device_ptr(&stream);
            let (yp, _y_done) = y.device_ptr(&stream);
            let fits = vector_layout(T::DTYPE.size_in_bytes(), d.c, cpg, xp | yp);
            (fits.stats, fits.apply)
        } else {
            (false, false)
        };

        // 1. Partials, [N*G][splits][3] in both layouts.
        let (partial, splits) = if self.channels_last {
            if self.groups > CL_MAX_GROUPS {
                bail!(
                    "group_norm: {} groups exceed the {CL_MAX_GROUPS} the channels-last CUDA \
                     kernel supports",
                    self.groups
                );
            }
            if d.n > MAX_GRID_Y {
                bail!(
                    "group_norm: batch {} exceeds the {MAX_GRID_Y} the channels-last CUDA kernel \
                     supports",
                    d.n
                );
            }
            let rows = (CL_STATS_ELEMS / d.c)
                .min(d.hw.div_ceil(CL_STATS_BLOCKS))
                .max(1);
            let splits = d.hw.div_ceil(rows);
            // SAFETY: gn_cl_stats writes all G partials of each of its N*splits blocks.
            let partial = unsafe { dev.alloc::<f32>(num_groups * splits * 3)? };
            let kernel = if vec_stats {
                "gn_cl_stats_vec"
            } else {
                "gn_cl_stats"
            };
            let f = cuda::func(dev, &cuda::GROUP_NORM, kernel, T::DTYPE)?;
            let hw_arg = d.hw as i64;
            let rows_arg = to_i32(rows, "group_norm rows per block")?;
            let splits_arg = to_i32(splits, "group_norm splits")?;
            let mut launch = stream.launch_builder(&f);
            launch.arg(&x).arg(&partial).arg(&hw_arg).arg(&channels_arg);
            launch.arg(&cpg_arg).arg(&rows_arg).arg(&splits_arg);
            let cfg = LaunchConfig {
                grid_dim: (
                    to_u32(splits, "group_norm stats blocks")?,
                    to_u32(d.n, "group_norm batch")?,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: to_u32(self.groups * 12, "group_norm shared memory")?,
            };
            // SAFETY: argument list matches gn_cl_stats_*; dynamic shared memory holds one
            // 12-byte Partial per group.
            unsafe { launch.launch(cfg) }.w()?;
            (partial, splits)
        } else {
            let group_len = cpg * d.hw;
            let splits = group_len.div_ceil(STATS_CHUNK);
            let stats_chunk = group_len.div_ceil(splits);
            // SAFETY: gn_stats writes one partial per block, N*G*splits blocks.
            let partial = unsafe { dev.alloc::<f32>(num_groups * splits * 3)? };
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
            (partial, splits)
        };

        // 2. (mean, 1/std) per group.
        // SAFETY: gn_finalize writes both values of every group.
        let stats = unsafe { dev.alloc::<f32>(num_groups * 2)? };
        let f = cuda::func_untyped(dev, &cuda::GROUP_NORM, "gn_finalize")?;
        let groups_arg = to_i32(num_groups, "group_norm groups")?;
        let splits_arg = to_i32(splits, "group_norm splits")?;
        let eps_arg = self.eps as f32;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&partial).arg(&stats).arg(&groups_arg);
        launch.arg(&splits_arg).arg(&eps_arg);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(num_groups, "group_norm groups")?, 1, 1),
            block_dim: (FIN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches gn_finalize; one block of FIN_THREADS per group.
        unsafe { launch.launch(cfg) }.w()?;

        // 3. y = x * scale + shift (+ SiLU).
        if self.channels_last {
            let rows = (CL_APPLY_ELEMS / d.c).max(1);
            let kernel = if vec_apply {
                "gn_cl_apply_vec"
            } else {
                "gn_cl_apply"
            };
            let f = cuda::func(dev, &cuda::GROUP_NORM, kernel, T::DTYPE)?;
            let hw_arg = d.hw as i64;
            let rows_arg = to_i32(rows, "group_norm rows per block")?;
            let mut launch = stream.launch_builder(&f);
            launch.arg(&x).arg(&stats).arg(&w).arg(&b).arg(&y);
            launch.arg(&hw_arg).arg(&channels_arg).arg(&cpg_arg);
            launch.arg(&rows_arg).arg(&silu_arg);
            let cfg = LaunchConfig {
                grid_dim: (
                    to_u32(d.hw.div_ceil(rows), "group_norm apply blocks")?,
                    to_u32(d.n, "group_norm batch")?,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument list matches gn_cl_apply_*; y has n*hw*c elements.
            unsafe { launch.launch(cfg) }.w()?;
        } else {
            let apply_chunk = APPLY_CHUNK.max(d.hw.div_ceil(65535));
            let f = cuda::func(dev, &cuda::GROUP_NORM, "gn_apply", T::DTYPE)?;
            let (hw_arg, apply_chunk_arg) = (d.hw as i64, apply_chunk as i64);
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
        }
        Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

/// Which of the channels-last 16-byte-vector kernels (`gn_cl_stats_vec`, `gn_cl_apply_vec` in
/// kernels/group_norm.cu) a tensor can take: a vector is 16 bytes of consecutive channels, so
/// both need `C` a multiple of its elements and 16-byte aligned pointers (`ptr_bits`: the
/// pointers or'ed together); the statistics also need each vector inside one group or over at
/// most `GN_VEC_SLOTS` (2) whole groups.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) struct VectorLayout {
    pub stats: bool,
    pub apply: bool,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn vector_layout(
    elem_bytes: usize,
    c: usize,
    cpg: usize,
    ptr_bits: u64,
) -> VectorLayout {
    // GN_VEC_SLOTS in kernels/group_norm.cu.
    const SLOTS: usize = 2;
    let vec = 16 / elem_bytes;
    let apply = elem_bytes <= 16
        && 16 % elem_bytes == 0
        && c.is_multiple_of(vec)
        && ptr_bits.is_multiple_of(16);
    let groups_fit =
        cpg > 0 && (cpg.is_multiple_of(vec) || (vec.is_multiple_of(cpg) && vec / cpg <= SLOTS));
    VectorLayout {
        stats: apply && groups_fit,
        apply,
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
        let d = Dims::of(xl.shape(), self.channels_last)?;
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
        let d = Dims::of(xl.shape(), self.channels_last)?;
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

#[cfg(test)]
mod tests {
    use super::{vector_layout, VectorLayout};

    #[test]
    fn vector_kernels_need_whole_vectors_aligned_pointers_and_fitting_groups() {
        let both = VectorLayout {
            stats: true,
            apply: true,
        };
        // The VAE decoder's norms, bf16 (8 channels a vector): groups of 4, 8 and 16 channels.
        for (c, cpg) in [(128, 4), (256, 8), (512, 16)] {
            assert_eq!(
                vector_layout(2, c, cpg, 0x7f00_0000_0100),
                both,
                "{c} {cpg}"
            );
        }
        // f32 vectors are 4 channels: groups of 2 (2 a vector) and 12 (3 vectors a group).
        assert_eq!(vector_layout(4, 64, 2, 0), both);
        assert_eq!(vector_layout(4, 48, 12, 0), both);
        // A view 2 bytes into its buffer, or 8: the scalar kernels.
        for misaligned in [2, 8] {
            assert_eq!(
                vector_layout(2, 128, 4, 0x1000 | misaligned),
                VectorLayout {
                    stats: false,
                    apply: false
                }
            );
        }
        // Channels not a whole number of vectors.
        assert!(!vector_layout(2, 12, 4, 0).apply);
        assert!(vector_layout(4, 12, 4, 0).apply);
        // Groups a vector cannot be split along: 10 channels (320 = 32 groups), 3, or 1
        // channel (8 groups a bf16 vector, over the 2 slots). The apply pass still vectorises.
        for (c, cpg) in [(320, 10), (48, 3), (2048, 1)] {
            assert_eq!(
                vector_layout(2, c, cpg, 0),
                VectorLayout {
                    stats: false,
                    apply: true
                },
                "{c} {cpg}"
            );
        }
    }
}
