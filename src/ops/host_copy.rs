//! A batch's one copy back to the host, queued on the device's stream rather than waited for;
//! and its uploads ([`upload_f32`]), queued the same way.
//!
//! `Tensor::to_vec1` on CUDA copies into pageable memory and returns when the copy is done, so
//! the host sits idle until the GPU has finished the whole batch, and then the GPU idles while
//! the host prepares the next one: tokenising and queueing the text encoders' ~1000 small
//! kernels, which the GPU runs faster than the host can queue them. [`copy_to_host`] queues the
//! copy into page-locked memory and returns at once; the caller queues the next batch behind
//! it and collects these bytes with [`HostCopy::wait_with`] when it needs them (the
//! [`Kernels::OVERLAP`](super::Kernels::OVERLAP) lever). On the CPU the bytes are there at once.
//!
//! Page-locked buffers are slow to allocate (the driver pins every page), so they are kept in a
//! small pool and reused; a copy must fill its buffer exactly (cudarc copies the destination's
//! length), so buffers are matched by exact size, which repeats from batch to batch of one shape.
//!
//! Uploads need the same care for the opposite reason: a copy from pageable memory to the device
//! may wait for everything already queued on the stream (CUDA's "API synchronization behavior":
//! the driver may synchronise with the stream to stage pageable memory), so a batch's noise
//! uploaded while the previous batch still runs could hold the host until that batch is done,
//! which is what [`Kernels::OVERLAP`](super::Kernels::OVERLAP) exists to avoid. [`upload_f32`]
//! stages the bytes in page-locked memory of its own pool, whose copies are always queued.

use candle_core::{bail, DType, Device, Result, Shape, Tensor};

/// Bytes on their way to the host.
pub struct HostCopy {
    inner: Inner,
}

enum Inner {
    Ready(Vec<u8>),
    #[cfg(feature = "cuda")]
    Pinned(Option<cuda::Pinned>),
}

/// Starts copying a u8 tensor's bytes (in its logical, row-major order) to the host.
pub fn copy_to_host(t: &Tensor) -> Result<HostCopy> {
    if t.dtype() != DType::U8 {
        bail!("copy_to_host: u8 tensors only, got {:?}", t.dtype());
    }
    let t = t.contiguous()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = t.device() {
        if t.elem_count() > 0 {
            let inner = Inner::Pinned(Some(cuda::start(dev, &t)?));
            return Ok(HostCopy { inner });
        }
    }
    let inner = Inner::Ready(t.flatten_all()?.to_vec1()?);
    Ok(HostCopy { inner })
}

impl HostCopy {
    /// Whether the copy was queued on a device (rather than done at once).
    pub fn is_pending(&self) -> bool {
        !matches!(self.inner, Inner::Ready(_))
    }

    /// Waits for the copy to finish and hands the bytes to `f`.
    pub fn wait_with<R>(self, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        match &self.inner {
            Inner::Ready(bytes) => Ok(f(bytes)),
            #[cfg(feature = "cuda")]
            Inner::Pinned(Some(p)) => Ok(f(p.wait()?)),
            #[cfg(feature = "cuda")]
            Inner::Pinned(None) => bail!("copy_to_host: the buffer is gone (this is a bug)"),
        }
    }
}

/// `data` as an f32 tensor of `shape` on `device`. On CUDA with
/// [`Kernels::OVERLAP`](super::Kernels::OVERLAP) (the lever that queues a batch behind the one
/// still running) through page-locked memory, the copy queued on the device's stream: the call
/// never waits for the device. Otherwise candle's upload from pageable memory.
pub fn upload_f32(data: &[f32], shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    if shape.elem_count() != data.len() {
        bail!("upload_f32: {} values for shape {shape:?}", data.len());
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if !data.is_empty() && super::enabled(super::Kernels::OVERLAP) {
            let storage =
                candle_core::CudaStorage::wrap_cuda_slice(cuda::upload(dev, data)?, dev.clone());
            return Ok(Tensor::from_storage(
                candle_core::Storage::Cuda(storage),
                shape,
                candle_core::op::BackpropOp::none(),
                false,
            ));
        }
    }
    Tensor::from_slice(data, shape, device)
}

/// Elements of the staging buffer an upload of `len` f32 values takes: powers of two of at least
/// 64 KiB, so that batches of varying sizes reuse buffers instead of pinning and freeing memory
/// each time (both are slow, and freeing page-locked memory may synchronise the device).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn staging_elements(len: usize) -> usize {
    len.next_power_of_two().max(1 << 14)
}

#[cfg(feature = "cuda")]
impl Drop for HostCopy {
    fn drop(&mut self) {
        if let Inner::Pinned(p) = &mut self.inner {
            if let Some(p) = p.take() {
                cuda::give_back(p);
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, Mutex};

    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::cudarc::driver::{
        result, CudaContext, CudaEvent, CudaSlice, DevicePtrMut, PinnedHostSlice,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{bail, Result, Storage, Tensor};

    /// How many idle buffers the pool keeps: two batches are in flight at most, of one or two
    /// shapes.
    const POOL_MAX: usize = 4;

    static POOL: Mutex<Vec<PinnedHostSlice<u8>>> = Mutex::new(Vec::new());

    /// A page-locked buffer with a copy queued into it, and an event recorded after the copy.
    pub struct Pinned(PinnedHostSlice<u8>, CudaEvent);

    impl Pinned {
        /// The bytes, once the copy is done (waits on the event recorded after it).
        pub fn wait(&self) -> Result<&[u8]> {
            self.1.synchronize().w()?;
            self.0.as_slice().w()
        }
    }

    pub fn start(dev: &CudaDevice, t: &Tensor) -> Result<Pinned> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            bail!("copy_to_host: the tensor is not on CUDA");
        };
        let src = super::super::cuda::contiguous_view::<u8>(s, layout, "copy_to_host tensor")?;
        let stream = dev.cuda_stream();
        let mut host = take(stream.context(), src.len())?;
        // Queued on the stream after the kernels that wrote `src`. cudarc records `host`'s own
        // event only in its multi-stream mode, which candle's per-thread stream never enters:
        // its `as_slice` would then return at once, before the copy has run. So the copy's end
        // gets an event of its own, which `wait` waits on. A later copy into the same buffer is
        // queued on the same stream, after this one.
        stream.memcpy_dtoh(&src, &mut host).w()?;
        let done = stream
            .record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .w()?;
        Ok(Pinned(host, done))
    }

    /// An idle pooled buffer of exactly `len` bytes in `ctx`, or a new one.
    fn take(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedHostSlice<u8>> {
        {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = pool
                .iter()
                .position(|h| h.len() == len && Arc::ptr_eq(h.context(), ctx))
            {
                return Ok(pool.swap_remove(i));
            }
        }
        // Flags 0: ordinary cached page-locked memory. cudarc's `alloc_pinned` asks for
        // write-combined memory, which the host reads very slowly, and reading is all the host
        // does with these bytes.
        // SAFETY: nothing reads the buffer before the copy into it is done (`wait` waits for
        // the copy's event).
        unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }.w()
    }

    /// Returns a buffer to the pool, once its copy is done.
    pub fn give_back(p: Pinned) {
        // A copy dropped unread may still be running: it ends before its buffer is reused or
        // freed (freeing page-locked memory under a running copy is undefined, and the
        // buffer's own event, which cudarc's free waits on, was never recorded). Immediate
        // when the bytes were read.
        let _ = p.1.synchronize();
        let evicted = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            pool.push(p.0);
            (pool.len() > POOL_MAX).then(|| pool.remove(0))
        };
        // Dropped outside the lock: freeing waits for the buffer's last copy.
        drop(evicted);
    }

    /// Staging buffers of uploads, oldest first, each with the event recorded after its last
    /// copy out of it.
    static UPLOADS: Mutex<Vec<(PinnedHostSlice<f32>, CudaEvent)>> = Mutex::new(Vec::new());

    /// Staging buffers the pool keeps; past it, buffers whose copy has run are freed. (A buffer
    /// whose copy is still queued is never freed to keep to it, unless the pool has grown to
    /// [`UPLOADS_HARD_MAX`]: freeing page-locked memory under a queued copy is undefined, and
    /// waiting for it is what staging avoids.)
    const UPLOADS_MAX: usize = 8;
    const UPLOADS_HARD_MAX: usize = 32;

    /// `data` in a new device buffer, copied through a page-locked staging buffer: the copy is
    /// queued on the stream and the call returns without waiting for the device.
    pub fn upload(dev: &CudaDevice, data: &[f32]) -> Result<CudaSlice<f32>> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let class = super::staging_elements(data.len());
        // A staging buffer of this class whose last copy has run (a buffer still being copied
        // from must not be overwritten), or a new one.
        let reused = {
            let mut pool = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .position(|(h, done)| {
                    h.len() == class && Arc::ptr_eq(h.context(), ctx) && done.is_complete()
                })
                .map(|i| pool.remove(i).0)
        };
        let mut staging = match reused {
            Some(h) => h,
            // Write-combined (cudarc's default for `alloc_pinned`): the host only writes it.
            // SAFETY: the elements copied out are written below before the copy is queued.
            None => unsafe { ctx.alloc_pinned::<f32>(class) }.w()?,
        };
        // (`as_mut_slice` waits on the buffer's own cudarc event, which candle's per-thread
        // stream never records: it returns at once; the copy it guards is this pool's event.)
        staging.as_mut_slice().w()?[..data.len()].copy_from_slice(data);
        // SAFETY: fully written by the copy queued next, before anything reads it.
        let mut dst = unsafe { dev.alloc::<f32>(data.len()) }?;
        {
            let host = &staging.as_slice().w()?[..data.len()];
            let (dst_ptr, _dst_done) = dst.device_ptr_mut(&stream);
            // SAFETY: `dst` holds `data.len()` elements; `host` is page-locked memory of this
            // context that is neither written nor freed before `done` (below) has completed.
            unsafe { result::memcpy_htod_async(dst_ptr, host, stream.cu_stream()) }.w()?;
        }
        let done = stream.record_event(None).w()?;
        let evicted = {
            let mut pool = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
            pool.push((staging, done));
            if pool.len() > UPLOADS_HARD_MAX {
                Some(pool.remove(0))
            } else if pool.len() > UPLOADS_MAX {
                pool.iter()
                    .position(|(_, done)| done.is_complete())
                    .map(|i| pool.remove(i))
            } else {
                None
            }
        };
        if let Some((buffer, done)) = evicted {
            // Immediate unless the pool outgrew its hard cap: freeing page-locked memory under
            // a queued copy is undefined.
            done.synchronize().w()?;
            drop(buffer);
        }
        Ok(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::staging_elements;

    #[test]
    fn staging_sizes_are_powers_of_two_of_at_least_64_kib() {
        assert_eq!(staging_elements(1), 1 << 14);
        assert_eq!(staging_elements(1 << 14), 1 << 14);
        assert_eq!(staging_elements((1 << 14) + 1), 1 << 15);
        // Batch 8 and batch 5 of 512x512 latents share a class.
        assert_eq!(staging_elements(8 * 16384), staging_elements(5 * 16384));
    }
}
