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
    let device = Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!(
            "cannot open CUDA device {ordinal} ('{s}'): {e}. Is the NVIDIA driver loaded and the \
             GPU visible (`nvidia-smi`, CUDA_VISIBLE_DEVICES)?"
        )
    })?;
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

/// Applies the [`Kernels::STREAM_ORDER`](crate::ops::Kernels::STREAM_ORDER) lever of this
/// thread's kernel set to `device` (call before queueing a batch; nothing on the CPU).
///
/// candle runs a device on the calling thread's default stream (`CU_STREAM_PER_THREAD`), which
/// leaves cudarc out of its multi-stream mode: it then never waits on or records the read and
/// write events it gives every buffer, and stream order alone orders every use and every
/// stream-ordered free. It still creates the two events at each allocation and destroys them
/// at the free while "event tracking" is on, its default; with the lever it is off and those
/// calls are gone. Buffers made while it was on keep their (unused) events. (The page-locked
/// copy back of [`crate::ops::copy_to_host`] records an event of its own either way.)
pub fn apply_stream_order(device: &Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let ctx = d.cuda_stream().context().clone();
        let untracked = crate::ops::enabled(crate::ops::Kernels::STREAM_ORDER);
        if untracked == ctx.is_event_tracking() {
            // SAFETY: outside cudarc's multi-stream mode (turbine creates no stream of its own;
            // see above) the tracked events are never waited on or recorded, so turning tracking
            // off or on changes no synchronisation, only whether new buffers carry them.
            unsafe {
                if untracked {
                    ctx.disable_event_tracking()
                } else {
                    ctx.enable_event_tracking()
                }
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}

/// Whether cudarc tracks the uses of `device`'s buffers with events (CUDA; `false` elsewhere).
pub fn tracks_events(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d.is_event_tracking();
    }
    let _ = device;
    false
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

/// Whether an error message is the device running out of memory: the CUDA driver's
/// (`CUDA_ERROR_OUT_OF_MEMORY`), cuBLAS's or cuDNN's (`*_STATUS_ALLOC_FAILED`) status for it,
/// as cudarc prints them, or a message that says so. Such a failure is not the input's fault
/// and fewer images at once may avoid it, so callers neither cache it as a verdict nor fail
/// other work for it.
pub fn is_out_of_memory(message: &str) -> bool {
    message.contains("OUT_OF_MEMORY")
        || message.contains("ALLOC_FAILED")
        || message.to_ascii_lowercase().contains("out of memory")
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
