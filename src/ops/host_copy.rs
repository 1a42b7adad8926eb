//! A batch's one copy back to the host, queued on the device's stream rather than waited for.
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

#[cfg(feature = "cuda")]
use candle_core::Device;
use candle_core::{bail, DType, Result, Tensor};

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
    use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaEvent, PinnedHostSlice};
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
}
