//! Loading turbine's PTX kernels into a candle CUDA device and the per-dtype plumbing the custom
//! ops share.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, CudaStorage, DType, Layout, Result, WithDType};

/// One PTX module built by `build.rs` from `kernels/<name>.cu`.
pub struct Module {
    name: &'static str,
    ptx: &'static str,
}

pub const GROUP_NORM: Module = Module {
    name: "turbine_group_norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx")),
};
pub const UPSAMPLE: Module = Module {
    name: "turbine_upsample",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/upsample.ptx")),
};
pub const GEGLU: Module = Module {
    name: "turbine_geglu",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx")),
};
pub const POSTPROCESS: Module = Module {
    name: "turbine_postprocess",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/postprocess.ptx")),
};
pub const BIAS_RESIDUAL: Module = Module {
    name: "turbine_bias_residual",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/bias_residual.ptx")),
};
pub const ATTN_SOFTMAX: Module = Module {
    name: "turbine_attn_softmax",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attn_softmax.ptx")),
};
pub const FLASH_ATTN: Module = Module {
    name: "turbine_flash_attn",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx")),
};

/// The kernel `{base}_{f32|f16|bf16}` for `dtype`; the PTX is loaded once per device (candle
/// caches modules by name).
pub fn func(dev: &CudaDevice, module: &Module, base: &str, dtype: DType) -> Result<CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("{base}: no CUDA kernel for dtype {other:?} (f32, f16 or bf16)"),
    };
    func_untyped(dev, module, &format!("{base}_{suffix}"))
}

/// A dtype-independent kernel (no suffix) from `module`.
pub fn func_untyped(dev: &CudaDevice, module: &Module, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module.name, module.ptx)?
        .into_cuda_function())
}

/// The contiguous part of a CUDA storage that `layout` describes.
pub fn contiguous_view<'a, T: CudaDType + DeviceRepr + WithDType>(
    s: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => bail!(
            "{what} must be contiguous (got strides {:?})",
            layout.stride()
        ),
    }
}

/// Grid sizes and element counts are passed to the kernels as 32/64-bit integers; anything that
/// does not fit is an input far beyond what the kernels were sized for.
pub fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

pub fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds u32")))
}
