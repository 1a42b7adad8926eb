//! Device and dtype selection from user-facing strings (`cpu`, `cuda:0`; `f32|f16|bf16`).

use candle_core::{DType, Device};

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = if s.eq_ignore_ascii_case("cuda") {
        0
    } else if let Some(n) = s.strip_prefix("cuda:") {
        n.parse::<usize>()
            .map_err(|_| anyhow::anyhow!("invalid device '{s}': expected cpu, cuda or cuda:N"))?
    } else {
        anyhow::bail!("invalid device '{s}': expected cpu, cuda or cuda:N");
    };
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!(
            "device '{s}' requested but this turbine binary was built without CUDA support \
             (rebuild with `cargo build --release --features cuda,cudnn`)"
        );
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Parses `f32|f16|bf16`; `None` picks the default for the device (f32 on CPU, bf16 on CUDA).
pub fn parse_dtype(s: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    match s.map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }),
        Some(s) => match s.as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => anyhow::bail!("invalid dtype '{other}': expected f32, f16 or bf16"),
        },
    }
}
