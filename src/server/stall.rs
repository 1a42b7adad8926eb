//! A device that stops answering: a call into the model that never returns (a GPU hung by its
//! driver, a kernel that never ends) leaves the worker thread blocked, and nothing in the
//! process fails. Without a watch, `/health` stays 200, the load balancer keeps sending, and
//! every image waits for `--request-timeout`. With `--device-stall-timeout`, a worker whose
//! current call has run past its bound is marked failed like a device after a CUDA fault: the
//! requests whose images are on it get 503 `device_failed` at once, its batcher stops handing it
//! batches, `/health` names it, and when no device is left the server fails the queue and exits
//! 1 for its supervisor to start a fresh process.
//!
//! A call's bound is the flag's seconds or ten times what the call's work should take at the
//! rate the warm-up measured, whichever is longer: a batch of many large images with many steps
//! legitimately runs far longer than a default one, and declaring a working device stalled
//! would stop a healthy server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::batcher::{Item, ItemOutcome};
use super::error::BackendError;
use super::metrics::Metrics;
use super::queue::{Entry, Guidance, ShapeKey};
use super::worker::{DeviceHealth, FailedDevice};

/// How long one call into the model may run before its device counts as stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StallTimeout {
    /// The backend's own bound ([`DEFAULT_GPU_STALL_TIMEOUT`] on a GPU, none on the CPU, where a
    /// large batch of the real model legitimately runs for many minutes).
    #[default]
    Auto,
    Off,
    After(Duration),
}

/// `auto`'s bound on a GPU: 120 s, for calls whose work the warm-up's rate puts under 12 s. On
/// an H200 a default batch (eight 512x512 images, one step) took 0.1 s, and a new shape's first
/// batch plans its convolutions for 1.5-4 s more.
pub const DEFAULT_GPU_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A call may run this many times its estimated time before it counts as stalled.
pub const STALL_FACTOR: f64 = 10.0;

impl StallTimeout {
    /// `auto`, `off` (or `0`), or a number of seconds.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(StallTimeout::Auto),
            "off" | "0" => Ok(StallTimeout::Off),
            n => match n.parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 1e9 => {
                    Ok(StallTimeout::After(Duration::from_secs_f64(secs)))
                }
                _ => Err(format!(
                    "expected `auto`, `off` or a number of seconds above 0, got {s:?}"
                )),
            },
        }
    }

    /// The bound for a backend whose own is `backend_default`.
    pub fn resolve(self, backend_default: Option<Duration>) -> Option<Duration> {
        match self {
            StallTimeout::Auto => backend_default,
            StallTimeout::Off => None,
            StallTimeout::After(d) => Some(d),
        }
    }
}

/// What one worker is doing, shared with its batcher and the stall watch: the call into the
/// backend under way (since when, and what it is), and whether the device was declared stalled.
#[derive(Debug, Default)]
pub struct Liveness {
    /// Since when, what, and its work in units of [`Bounds::unit`].
    call: Mutex<Option<(Instant, String, f64)>>,
    /// Set by the worker once warmed up (`None` inside: not watched).
    bounds: OnceLock<Option<Bounds>>,
    stalled: AtomicBool,
    stall: Notify,
    /// The images handed to the device and not yet answered, and those of the batch waiting
    /// for the worker, by batch: where they go (their requests' channels and their places
    /// there), to be told when the device is declared stalled instead of waiting for a call
    /// that may never return.
    on_device: Mutex<HashMap<u64, Vec<Reply>>>,
    next_batch: AtomicU64,
}

/// Where one image's outcome goes: its request's channel and its place there.
type Reply = (mpsc::UnboundedSender<ItemOutcome>, usize);

/// A worker's stall bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// The least a call may run (`--device-stall-timeout`'s seconds).
    pub floor: Duration,
    /// Seconds one unit of work took in the warm-up: one image of the warm-up's size through
    /// one UNet run, with its share of the text encoders and the decoder.
    pub unit: f64,
}

impl Bounds {
    /// How long a call of `units` of work may run.
    pub fn allowed(&self, units: f64) -> Duration {
        let scaled = STALL_FACTOR * units * self.unit;
        if scaled.is_finite() && scaled > self.floor.as_secs_f64() {
            Duration::from_secs_f64(scaled.min(1e9))
        } else {
            self.floor
        }
    }
}

/// Ends the call [`Liveness::begin`] started when dropped.
pub struct Call<'a>(&'a Liveness);

impl Drop for Call<'_> {
    fn drop(&mut self) {
        *self.0.call.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Liveness {
    /// A call into the backend of `units` of work starts; `what` says which (for the log and
    /// `/health`).
    pub fn begin(&self, units: f64, what: impl FnOnce() -> String) -> Call<'_> {
        *self.call.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), what(), units));
        Call(self)
    }

    /// The worker's bounds, once (`None`: not watched).
    pub fn set_bounds(&self, bounds: Option<Bounds>) {
        let _ = self.bounds.set(bounds);
    }

    /// The bounds the worker set (`None` before it started, or when not watched).
    pub fn bounds(&self) -> Option<Bounds> {
        self.bounds.get().copied().flatten()
    }

    /// The images of `entries` are on the device until [`Self::release`] with the token this
    /// returns.
    pub fn hold(&self, entries: &[Entry<Item>]) -> u64 {
        let token = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let replies = entries
            .iter()
            .map(|e| (e.payload.reply.clone(), e.payload.index))
            .collect();
        self.held().insert(token, replies);
        token
    }

    pub fn release(&self, token: u64) {
        self.held().remove(&token);
    }

    /// Lets go of every image held (the worker is gone: their requests see their channels
    /// close).
    pub fn forget_held(&self) {
        self.held().clear();
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Reply>>> {
        self.on_device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every image on the device that it failed with `failure`; how many were told. Their
    /// requests answer at once (a gateway tries another server); should the device answer
    /// after all, nobody listens any more.
    pub fn fail_held(&self, failure: &BackendError) -> usize {
        let held = std::mem::take(&mut *self.held());
        let mut n = 0;
        for (reply, index) in held.into_values().flatten() {
            n += 1;
            let _ = reply.send(ItemOutcome {
                index,
                result: Err(failure.clone()),
                partial: None,
            });
        }
        n
    }

    /// Declares the device stalled; true the first time.
    pub fn mark_stalled(&self) -> bool {
        let first = !self.stalled.swap(true, Ordering::SeqCst);
        if first {
            self.stall.notify_waiters();
        }
        first
    }

    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Returns once the device is declared stalled.
    pub async fn wait_stalled(&self) {
        loop {
            let notified = self.stall.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stalled() {
                return;
            }
            notified.await;
        }
    }

    /// The process did not run from `from` to `to` (it was paused, or starved of CPU): the
    /// call under way is not charged for the part of that time it spent under way, as if it
    /// had begun that much later. Returns how much was taken off (zero without a call).
    pub fn excuse(&self, from: Instant, to: Instant) -> Duration {
        let mut call = self.call.lock().unwrap_or_else(|e| e.into_inner());
        let Some((since, _, _)) = call.as_mut() else {
            return Duration::ZERO;
        };
        let lost = to.saturating_duration_since(from.max(*since));
        *since += lost;
        lost
    }

    /// The call under way at `now` if it has run past its bound: (how long it ran, what it is,
    /// its bound).
    pub fn overdue(&self, now: Instant) -> Option<(Duration, String, Duration)> {
        let bounds = self.bounds()?;
        let call = self.call.lock().unwrap_or_else(|e| e.into_inner());
        let (since, what, units) = call.as_ref()?;
        let (age, allowed) = (
            now.saturating_duration_since(*since),
            bounds.allowed(*units),
        );
        (age > allowed).then(|| (age, what.clone(), allowed))
    }
}

/// The work of a call on `images` images of `key` in units of one image of `base` (the
/// warm-up's shape) through one UNet run: the UNet runs of the steps run (twice over with
/// guidance), with the pixels' ratio to the power 1.5 for size, as attention grows faster than
/// the pixels. The text encoders and the decoder come with each unit, which overstates a
/// many-step call: a bound can only be generous.
pub fn work_units(key: &ShapeKey, images: usize, base: &ShapeKey) -> f64 {
    let runs = |k: &ShapeKey| {
        let steps = k.steps.saturating_sub(k.init_step.unwrap_or(0)).max(1);
        let guided = if matches!(k.guidance, Guidance::Off) {
            1
        } else {
            2
        };
        f64::from(steps * guided)
    };
    let pixels = |k: &ShapeKey| f64::from(k.width) * f64::from(k.height);
    let size = (pixels(key) / pixels(base).max(1.0)).powf(1.5);
    images as f64 * runs(key) / runs(base) * size
}

/// How often the watch looks at a worker bounded by `timeout`: a tenth of it, between 50 ms and
/// 5 s, so a stall is seen within about a tenth of the bound past it.
pub fn check_period(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Watches the worker of device `label` from the time it is warmed up: once its call under way
/// runs past its bound, declares the device stalled (the requests of the images on it are
/// failed with `device_failed`, its batcher stops, its worker stops once the call returns, if
/// ever) and reports it failed, which `/health` shows and which stops the
/// server when no device is left. Returns then, when the device failed otherwise, or at once
/// when the worker is not watched.
///
/// Time the whole process did not run is not a stall: a process stopped (`docker pause`, a
/// frozen cgroup, SIGSTOP, a debugger) or a virtual machine held by its host stops the worker
/// and its device's call with it, and on waking the call would look as old as the pause. So a
/// look that comes more than a period late takes the time it was late off the call under way,
/// as the pause monitors of JVM servers do, rather than failing a healthy device (and with the
/// last one, the server and every request queued on it).
pub async fn watch(
    label: String,
    liveness: Arc<Liveness>,
    health: Arc<DeviceHealth>,
    metrics: Arc<Metrics>,
) {
    let Some(bounds) = liveness.bounds() else {
        return;
    };
    let period = check_period(bounds.floor);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let due = last + period;
        last = now;
        if liveness.stalled() || health.failed().iter().any(|d| d.device == label) {
            return;
        }
        if let Some(late) = now
            .checked_duration_since(due)
            .filter(|late| *late > period)
        {
            let excused = liveness.excuse(due, now);
            tracing::warn!(
                device = %label,
                secs = late.as_secs_f64(),
                call_excused_secs = excused.as_secs_f64(),
                "turbine did not run for {:.1} s (its process was paused or starved of CPU); \
                 the device's call under way is not charged for that time \
                 (--device-stall-timeout)",
                late.as_secs_f64()
            );
        }
        let Some((age, what, allowed)) = liveness.overdue(Instant::now()) else {
            continue;
        };
        liveness.mark_stalled();
        let message = format!(
            "stalled: {what} has run for {:.1} s without returning, past its bound of {:.1} s \
             (--device-stall-timeout); the device takes no more batches",
            age.as_secs_f64(),
            allowed.as_secs_f64()
        );
        let failure = BackendError::DeviceFailed {
            device: label.clone(),
            message: message.clone(),
        };
        let told = liveness.fail_held(&failure);
        tracing::error!(device = %label, images_failed = told, "{message}");
        metrics.device_stalled();
        health.mark_failed(FailedDevice {
            device: label,
            message,
        });
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_parses() {
        assert_eq!(StallTimeout::parse("auto"), Ok(StallTimeout::Auto));
        assert_eq!(StallTimeout::parse("off"), Ok(StallTimeout::Off));
        assert_eq!(StallTimeout::parse("0"), Ok(StallTimeout::Off));
        assert_eq!(
            StallTimeout::parse("90"),
            Ok(StallTimeout::After(Duration::from_secs(90)))
        );
        assert_eq!(
            StallTimeout::parse("0.5"),
            Ok(StallTimeout::After(Duration::from_millis(500)))
        );
        for bad in ["-1", "nan", "inf", "soon", "", "1e10"] {
            assert!(StallTimeout::parse(bad).is_err(), "{bad}");
        }
        let gpu = Some(DEFAULT_GPU_STALL_TIMEOUT);
        assert_eq!(StallTimeout::Auto.resolve(gpu), gpu);
        assert_eq!(StallTimeout::Auto.resolve(None), None);
        assert_eq!(StallTimeout::Off.resolve(gpu), None);
        let one = Duration::from_secs(1);
        assert_eq!(StallTimeout::After(one).resolve(None), Some(one));
    }

    /// A call may run for the floor, or ten times its work at the warm-up's rate when longer.
    #[test]
    fn a_calls_bound_grows_with_its_work() {
        let b = Bounds {
            floor: Duration::from_secs(120),
            unit: 0.02,
        };
        assert_eq!(b.allowed(0.0), Duration::from_secs(120));
        assert_eq!(b.allowed(8.0), Duration::from_secs(120));
        // 800 units (eight large images, many steps): 10 x 16 s.
        assert_eq!(b.allowed(800.0), Duration::from_secs(160));
        assert_eq!(b.allowed(f64::INFINITY), Duration::from_secs(120));
    }

    #[test]
    fn work_grows_with_images_steps_guidance_and_size() {
        let base = ShapeKey {
            width: 512,
            height: 512,
            steps: 1,
            guidance: Guidance::Off,
            init_step: None,
            adapter: None,
        };
        assert_eq!(work_units(&base, 1, &base), 1.0);
        assert_eq!(work_units(&base, 8, &base), 8.0);
        let big = ShapeKey {
            width: 1024,
            height: 1024,
            steps: 4,
            guidance: Guidance::from_scale(5.0),
            init_step: None,
            adapter: None,
        };
        // 4 steps x 2 for guidance x 4^1.5 for the size.
        assert_eq!(work_units(&big, 2, &base), 2.0 * 8.0 * 8.0);
        // An edit runs its steps from init_step on.
        let edit = ShapeKey {
            steps: 2,
            init_step: Some(1),
            ..base
        };
        assert_eq!(work_units(&edit, 1, &base), 1.0);
    }

    #[test]
    fn a_call_is_overdue_only_past_the_bound_and_only_while_it_runs() {
        let l = Liveness::default();
        let t0 = Instant::now();
        {
            let _call = l.begin(1.0, || "a batch".into());
            // Not watched until the worker set its bounds.
            assert_eq!(l.overdue(t0 + Duration::from_secs(1000)), None);
            l.set_bounds(Some(Bounds {
                floor: Duration::from_secs(10),
                unit: 0.5,
            }));
            assert_eq!(l.overdue(t0 + Duration::from_secs(5)), None);
            let (age, what, allowed) = l.overdue(t0 + Duration::from_secs(11)).unwrap();
            assert!(age > Duration::from_secs(10) && what == "a batch");
            assert_eq!(allowed, Duration::from_secs(10));
        }
        {
            // 4 units at 0.5 s: 20 s allowed.
            let _call = l.begin(4.0, || "a bigger batch".into());
            assert_eq!(l.overdue(t0 + Duration::from_secs(15)), None);
            assert!(l.overdue(t0 + Duration::from_secs(25)).is_some());
        }
        assert_eq!(l.overdue(t0 + Duration::from_secs(1000)), None);
        assert_eq!(
            check_period(Duration::from_secs(120)),
            Duration::from_secs(5)
        );
        assert_eq!(
            check_period(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(
            check_period(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
    }

    /// Time the process did not run is taken off the call under way: the part of it after the
    /// call began, once.
    #[test]
    fn a_pause_is_not_charged_to_the_call_under_way() {
        let s = Duration::from_secs;
        let l = Liveness::default();
        let t0 = Instant::now();
        assert_eq!(l.excuse(t0, t0 + s(5)), Duration::ZERO, "no call");
        l.set_bounds(Some(Bounds {
            floor: s(10),
            unit: 0.0,
        }));
        {
            let began = Instant::now();
            let _call = l.begin(1.0, || "a batch".into());
            // Paused from 2 s to 32 s into the call: at 35 s it has run for 5 s.
            assert!(l.overdue(began + s(35)).is_some());
            assert_eq!(l.excuse(began + s(2), began + s(32)), s(30));
            assert_eq!(l.overdue(began + s(35)), None);
            let (age, _, _) = l.overdue(began + s(41)).unwrap();
            assert!(
                age > Duration::from_millis(10_900) && age <= s(11),
                "{age:?}"
            );
        }
        {
            // A pause that began before the call (its start was late) counts from its start.
            let began = Instant::now();
            let _call = l.begin(1.0, || "another".into());
            let lost = l.excuse(began - s(3), began + s(4));
            assert!(
                lost > Duration::from_millis(3_900) && lost <= s(4),
                "{lost:?}"
            );
            assert_eq!(l.overdue(began + s(13)), None);
            assert!(l.overdue(began + s(15)).is_some());
            // One that ended before the call began takes nothing off.
            assert_eq!(l.excuse(began - s(3), began - s(1)), Duration::ZERO);
        }
    }

    #[tokio::test]
    async fn waiting_for_a_stall_sees_one_marked_before_or_after() {
        let l = std::sync::Arc::new(Liveness::default());
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.wait_stalled().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert!(l.mark_stalled());
        assert!(!l.mark_stalled());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // Already stalled: returns at once.
        tokio::time::timeout(Duration::from_secs(5), l.wait_stalled())
            .await
            .unwrap();
    }
}
