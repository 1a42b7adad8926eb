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
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    {
        let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        check_compute_capability(BUILD_COMPUTE_CAP, (major, minor), &format!("{s} ({name})"))?;
        keep_freed_memory(&ctx)?;
    }
    Ok(device)
}

/// Keeps memory freed by dropped tensors in the device's stream-ordered pool instead of handing
/// it back to the driver at every synchronisation.
///
/// candle allocates through cudarc's `cuMemAllocAsync` on the device's default pool, whose release
/// threshold is 0: each `synchronize` (one per batch at least, for the images' copy back) returns
/// every free block to the driver, and the next batch maps its ~GBs of activations afresh. With the
/// threshold at "never", the pool behaves like PyTorch's caching allocator: after the first batch of
/// a shape, allocation is a pool lookup. The memory stays reserved by this process, which is what a
/// dedicated inference server wants.
#[cfg(feature = "cuda")]
fn keep_freed_memory(
    ctx: &candle_core::cuda_backend::cudarc::driver::CudaContext,
) -> anyhow::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    if !ctx.has_async_alloc() {
        // Synchronous cuMemAlloc: no pool to configure.
        return Ok(());
    }
    ctx.bind_to_thread()?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the device comes from a live context; the attribute takes a u64 (cuuint64_t).
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device())?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )?;
    }
    Ok(())
}

/// The `CUDA_COMPUTE_CAP` this binary's kernels were compiled for (e.g. "90"), recorded by
/// `build.rs`.
#[cfg(feature = "cuda")]
pub const BUILD_COMPUTE_CAP: &str = env!("TURBINE_CUDA_COMPUTE_CAP");

/// Refuses a GPU whose compute capability differs from the build's. candle's kernels are built
/// for the exact architecture (`sm_90a` for 90), which no other GPU can load, and a mismatch would
/// otherwise surface as an obscure PTX/module error at the first kernel launch, mid-request.
pub fn check_compute_capability(
    built: &str,
    (major, minor): (i32, i32),
    device: &str,
) -> anyhow::Result<()> {
    let actual = format!("{major}{minor}");
    if built == actual {
        return Ok(());
    }
    anyhow::bail!(
        "{device} has compute capability {major}.{minor}, but this turbine binary was built for \
         CUDA_COMPUTE_CAP={built}; rebuild for this GPU with \
         `CUDA_COMPUTE_CAP={actual} scripts/build_cuda.sh`"
    )
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

#[cfg(test)]
mod tests {
    use super::check_compute_capability;

    #[test]
    fn compute_capability_must_match_the_build() {
        assert!(check_compute_capability("90", (9, 0), "cuda:0 (H200)").is_ok());
        let err = check_compute_capability("90", (8, 9), "cuda:0 (RTX 4090)")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cuda:0 (RTX 4090) has compute capability 8.9"),
            "{err}"
        );
        assert!(err.contains("CUDA_COMPUTE_CAP=90"), "{err}");
        assert!(
            err.contains("CUDA_COMPUTE_CAP=89 scripts/build_cuda.sh"),
            "{err}"
        );
    }
}
