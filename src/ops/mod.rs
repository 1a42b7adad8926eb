//! Fused operations the models call (each behind its [`Kernels`] lever): on CUDA they run turbine's own kernels
//! (`kernels/*.cu`, compiled to PTX by `build.rs`), on the CPU a reference implementation or
//! candle's own ops.
//!
//! - [`group_norm`]: GroupNorm with optional SiLU, f32 statistics, one rounding to the storage
//!   dtype (diffusers' UNet calls GroupNorm 46 times per pass; candle composes it from ~13
//!   kernels with f32 temporaries); [`group_norm_channels_last`] for `[N, ..., C]` input.
//! - [`geglu`]: `a * gelu_erf(gate)` on the two halves of the feed-forward projection;
//!   [`geglu_bias`] adds the projection's bias in the same pass.
//! - [`attention`]: softmax(scale · Q·Kᵀ)·V with the logits in f32, optionally causal;
//!   [`multi_head_attention`] on `[B, L, H·D]` projections, without splitting the heads apart.
//! - [`flash_attention`]: the UNet's case of it (head dim 64, not causal, 16-bit) in one kernel
//!   that keeps the scores on chip; [`multi_head_attention`] takes it under [`Kernels::FLASH`].
//! - [`bias_residual`]: `y + bias + residual` in one pass after a GEMM run without its bias.
//! - [`conv2d`]: convolution + bias (+ residual), NCHW or channels-last; on CUDA cuDNN with one
//!   plan per shape (algorithm timed once, workspace reused) and bias/residual fused.
//! - [`to_rgb8`]: the VAE's output to 8-bit NHWC RGB, diffusers' postprocess in one pass.
//! - [`upsample_nearest2x_channels_last`]: the VAE decoder's nearest 2x upsampling in NHWC.
//! - [`upsample_conv_phases`] + [`interleave_phases`]: nearest 2x upsampling followed by a 3x3
//!   convolution as four 2x2 convolutions of the low-resolution input (4/9 of the FLOPs).
//! - [`copy_to_host`]: a batch's bytes to the host, queued rather than waited for;
//!   [`upload_f32`]: host values to the device, queued the same way.
//!
//! Which of them the models use is chosen by [`Kernels`] (`--kernels`).
//!
//! Each op is a candle custom op carrying both a CPU reference (`cpu_fwd`) and the CUDA path
//! (`cuda_fwd`); `tests/ops.rs` checks both against plain compositions of candle ops.

mod attention;
mod bias_residual;
mod conv;
#[cfg(feature = "cuda")]
mod cuda;
mod flash;
mod geglu;
mod group_norm;
mod host_copy;
mod postprocess;
mod select;
mod upsample;
mod upsample_conv;

pub use attention::{
    attention, attention_composed, fused_attention, fused_multi_head_attention,
    multi_head_attention, multi_head_attention_composed, AttentionOp, MultiHeadAttentionOp,
};
pub use bias_residual::{bias_residual, BiasResidualOp};
pub use conv::{
    conv2d, conv2d_composed, conv_plans, is_conv_plan_followup, with_conv_epilogue,
    with_conv_plan_limit, with_conv_sub_batch_cap, ConvEpilogue, ConvParams, CONV_FALLBACK,
    CONV_FIRST_CALL_FAILED, CONV_GRAPH_FAILED_LATER, CONV_PLAN_EVICTED, CONV_SUB_BATCHES,
    MAX_CONV_PLANS,
};
pub use flash::{flash_attention, flash_launches, FlashAttentionOp, FLASH_HEAD_DIM};
pub use geglu::{geglu, geglu_bias, GegluBiasOp, GegluOp};
pub use group_norm::{group_norm, group_norm_channels_last, GroupNormOp};
pub use host_copy::{copy_to_host, upload_f32, HostCopy};
pub use postprocess::to_rgb8;
pub use select::{enabled, kernels, set_kernels, with_kernels, Kernels};
pub use upsample::{upsample_nearest2x_channels_last, UpsampleNearest2xNhwc};
pub use upsample_conv::{interleave_phases, upsample_conv_phases, InterleavePhases};

use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor, WithDType};

/// The contiguous part of a CPU storage that `layout` describes; the public wrappers make their
/// inputs contiguous, so a strided layout here is a bug in the caller of the raw op.
fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!(
            "{what} must be contiguous (got strides {:?})",
            layout.stride()
        ),
    }
}

/// Rejects dtypes the kernels are not instantiated for, naming the op and the tensor.
fn check_float_dtype(dtype: DType, op: &str, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(()),
        other => bail!("{op}: {what} has dtype {other:?}; expected f32, f16 or bf16"),
    }
}

/// The dtype products of `t` are taken in: f32 for a half-precision tensor on the CPU (candle's
/// CPU backend has no half-precision GEMM or convolution; computing in f32 and rounding once is
/// what CUDA's half GEMMs do too), `t`'s own dtype everywhere else.
pub(crate) fn gemm_dtype(t: &Tensor) -> DType {
    match t.dtype() {
        DType::BF16 | DType::F16 if t.device().is_cpu() => DType::F32,
        dt => dt,
    }
}
