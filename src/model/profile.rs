//! Where one batch's device time goes, by stage and kind of layer (`turbine bench --profile B`).
//!
//! The ablation says what each lever gains; this says where the remaining time is, which is
//! what picks the next lever. The models wrap each layer call in [`span`] (linear, conv,
//! group-norm, layer-norm, attention, geglu, upsample); while [`record`] runs on this thread a
//! span marks its start and end on the device's timeline, CUDA events on the stream (the host
//! never waits for the GPU) or the wall clock on the CPU. Spans inside spans count for the
//! outer one, so a kind's time is never counted twice; what a stage spends outside every span
//! (casts, residual adds, the scheduler, embeddings) is its `other`.
//!
//! Two events per layer call (~6000 a batch) cost the host ~3 us each: where the host limits
//! (small batches), the GPU idles inside spans and they read long. Profile a batch big enough
//! for the GPU to be the bottleneck. Without [`record`] a span is one thread-local read.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// A point on the device's timeline: a CUDA event recorded on the stream, or the wall clock on
/// the CPU, where every op has finished when it returns.
pub(crate) enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

impl Mark {
    pub(crate) fn now(device: &Device) -> anyhow::Result<Self> {
        Ok(match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                // Timing events (cudarc's default flags disable timing).
                Mark::Cuda(
                    dev.cuda_stream()
                        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(candle_core::Error::wrap)?,
                )
            }
            _ => Mark::Host(Instant::now()),
        })
    }

    /// The time from `self` to `later` (on CUDA, once both events have passed).
    pub(crate) fn until(&self, later: &Mark) -> anyhow::Result<Duration> {
        match (self, later) {
            (Mark::Host(a), Mark::Host(b)) => Ok(b.saturating_duration_since(*a)),
            #[cfg(feature = "cuda")]
            (Mark::Cuda(a), Mark::Cuda(b)) => {
                let ms = a.elapsed_ms(b).map_err(candle_core::Error::wrap)?;
                Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
            }
            #[cfg(feature = "cuda")]
            _ => anyhow::bail!("a host mark and a device mark cannot be compared (this is a bug)"),
        }
    }
}

/// The time one (stage, kind) took in a recorded batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    pub stage: String,
    pub kind: String,
    pub ms: f64,
    pub calls: usize,
}

struct Span {
    stage: &'static str,
    kind: &'static str,
    start: Mark,
    end: Mark,
}

struct Recorder {
    device: Device,
    stage: &'static str,
    depth: usize,
    spans: Vec<Span>,
    /// The first failure to place a mark (the profile is then refused, the batch is not).
    error: Option<String>,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Runs `f` (a layer call) as one span of `kind` when a batch is being recorded on this thread.
pub fn span<R>(kind: &'static str, f: impl FnOnce() -> R) -> R {
    let start = RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        let rec = r.as_mut()?;
        rec.depth += 1;
        (rec.depth == 1).then(|| mark(rec)).flatten()
    });
    let out = f();
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            rec.depth = rec.depth.saturating_sub(1);
            if let Some(start) = start {
                if let Some(end) = mark(rec) {
                    let stage = rec.stage;
                    rec.spans.push(Span {
                        stage,
                        kind,
                        start,
                        end,
                    });
                }
            }
        }
    });
    out
}

fn mark(rec: &mut Recorder) -> Option<Mark> {
    match Mark::now(&rec.device) {
        Ok(m) => Some(m),
        Err(e) => {
            rec.error.get_or_insert_with(|| format!("{e:#}"));
            None
        }
    }
}

/// A layer norm as a span of its own.
pub fn layer_norm(
    norm: &candle_nn::LayerNorm,
    xs: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::Module;
    span("layer-norm", || norm.forward(xs))
}

/// Names the stage the following spans belong to (the pipeline calls it at its stage clock's
/// marks); nothing when no batch is recorded.
pub fn set_stage(stage: &'static str) {
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            rec.stage = stage;
        }
    });
}

/// Runs `f` (one batch, which must have finished on the device when it returns, as
/// `Pipeline::generate` has) with every span recorded, and sums the spans by stage and kind.
pub fn record<R>(
    device: &Device,
    f: impl FnOnce() -> anyhow::Result<R>,
) -> anyhow::Result<(R, Vec<ProfileEntry>)> {
    RECORDER.with(|r| -> anyhow::Result<()> {
        let mut r = r.borrow_mut();
        anyhow::ensure!(
            r.is_none(),
            "a profile is already being recorded on this thread"
        );
        *r = Some(Recorder {
            device: device.clone(),
            stage: "-",
            depth: 0,
            spans: Vec::new(),
            error: None,
        });
        Ok(())
    })?;
    // Removes the recorder however `f` ends, a panic included.
    struct Uninstall;
    impl Drop for Uninstall {
        fn drop(&mut self) {
            RECORDER.with(|r| r.borrow_mut().take());
        }
    }
    let _uninstall = Uninstall;
    let out = f();
    let rec = RECORDER
        .with(|r| r.borrow_mut().take())
        .ok_or_else(|| anyhow::anyhow!("the profile recorder vanished (this is a bug)"))?;
    let out = out?;
    if let Some(e) = rec.error {
        anyhow::bail!("profiling: could not place a timing mark: {e}");
    }
    device.synchronize()?;
    let mut sums: BTreeMap<(&str, &str), (Duration, usize)> = BTreeMap::new();
    for s in &rec.spans {
        let e = sums.entry((s.stage, s.kind)).or_default();
        e.0 += s.start.until(&s.end)?;
        e.1 += 1;
    }
    let entries = sums
        .into_iter()
        .map(|((stage, kind), (d, calls))| ProfileEntry {
            stage: stage.into(),
            kind: kind.into(),
            ms: d.as_secs_f64() * 1e3,
            calls,
        })
        .collect();
    Ok((out, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_sum_by_stage_and_kind_and_nested_ones_count_once() {
        let ((), entries) = record(&Device::Cpu, || {
            set_stage("unet");
            for _ in 0..3 {
                span("conv", || std::thread::sleep(Duration::from_millis(2)));
            }
            span("attention", || {
                // Inside another span: its time is the attention's.
                span("linear", || std::thread::sleep(Duration::from_millis(2)));
            });
            set_stage("vae_decode");
            span("conv", || ());
            Ok(())
        })
        .unwrap();
        let got: Vec<(&str, &str, usize)> = entries
            .iter()
            .map(|e| (e.stage.as_str(), e.kind.as_str(), e.calls))
            .collect();
        assert_eq!(
            got,
            [
                ("unet", "attention", 1),
                ("unet", "conv", 3),
                ("vae_decode", "conv", 1)
            ]
        );
        assert!(entries[0].ms >= 2.0 && entries[1].ms >= 6.0, "{entries:?}");
        // Not recording: spans only run their closure.
        assert_eq!(span("conv", || 7), 7);
        assert!(RECORDER.with(|r| r.borrow().is_none()));
    }

    #[test]
    fn a_failing_batch_fails_the_profile_and_leaves_no_recorder() {
        let err = record(&Device::Cpu, || -> anyhow::Result<()> {
            span("conv", || ());
            anyhow::bail!("out of memory")
        })
        .unwrap_err();
        assert!(err.to_string().contains("out of memory"));
        assert!(RECORDER.with(|r| r.borrow().is_none()));
        // Recording again works.
        assert!(record(&Device::Cpu, || Ok(())).is_ok());
    }
}
