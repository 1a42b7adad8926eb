//! Which of turbine's own kernels the models use, so that every speed lever can be switched off
//! and measured against candle's ops (`--kernels` on `generate`, `bench` and `serve`;
//! `scripts/gpu_check.sh` times the ablations side by side).
//!
//! The choice is process-wide, set once at start-up; [`with_kernels`] overrides it for the
//! current thread only, so tests running in parallel can compare two choices without racing.
//! Model code asks [`enabled`] at each call site; a lever that does not apply to a device
//! (a CUDA-only kernel on the CPU) is the call site's business, not this module's.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// A set of levers, as a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernels(u32);

impl Kernels {
    /// Fused GroupNorm (+ SiLU) instead of candle's composition (~13 kernels, f32 temporaries).
    pub const GROUP_NORM: Self = Self(1);
    /// Fused GEGLU (`a * gelu(gate)`) in the UNet's feed-forwards.
    pub const GEGLU: Self = Self(1 << 1);
    /// Attention through [`crate::ops::attention`] (cuBLAS GEMMs + fused f32 softmax on CUDA)
    /// instead of candle matmul + softmax with a materialised f32 copy of the scores.
    pub const ATTENTION: Self = Self(1 << 2);
    /// turbine's cuDNN convolution (algorithm chosen once per shape, workspace reused, bias and
    /// residual fused) instead of candle's `conv2d` + separate bias add.
    pub const CONV: Self = Self(1 << 3);
    /// The VAE decoder in channels-last (NHWC) layout, so cuDNN's tensor-core convolutions need
    /// no layout transposes. Takes effect only with [`Self::CONV`] too (candle's convolution is
    /// NCHW only), on CUDA, in f16/bf16 and in a `cudnn` build: measure it as `all` against
    /// `all,-channels-last`.
    pub const CHANNELS_LAST: Self = Self(1 << 4);
    /// Bias and residual adds fused into one pass after the UNet's GEMMs.
    pub const BIAS_RESIDUAL: Self = Self(1 << 5);
    /// VAE output → 8-bit RGB on the device (one kernel, a quarter of the bytes copied back).
    pub const POSTPROCESS: Self = Self(1 << 6);
    /// Flash attention (`kernels/flash_attn.cu`: the scores stay in shared memory) for the
    /// [`crate::ops::multi_head_attention`] calls it covers, the UNet's: CUDA, f16/bf16, head
    /// dim 64, not causal. Others (CLIP's causal attention, f32) keep the cuBLAS path. Takes
    /// effect only with [`Self::ATTENTION`] too (the models call that op only then): measure it
    /// as `all` against `all,-flash`.
    pub const FLASH: Self = Self(1 << 7);
    /// Adjacent batches overlap: the batch's one copy back is queued into page-locked memory
    /// (`ops::copy_to_host`) instead of waited for, so `turbine bench` and the server's worker
    /// queue the next batch (tokenising, the text encoders' ~1000 small kernels) while the GPU
    /// still runs this one, and collect this one's images after. Takes effect with
    /// [`Self::POSTPROCESS`] (the copy is of the u8 images); a batch's images do not change.
    pub const OVERLAP: Self = Self(1 << 8);
    /// Nearest 2x upsampling + 3x3 convolution (the UNet's and the VAE decoder's upsamplers) as
    /// one 2x2 convolution of the low-resolution input with four output phases, then one copy
    /// that interleaves them ([`crate::ops::upsample_conv_phases`]): 4/9 of the FLOPs, and the
    /// upsampled tensor is never written. The phase weights are built at load when the lever is
    /// on then; on every device and with either convolution.
    pub const UPSAMPLE_CONV: Self = Self(1 << 9);
    /// turbine's cuDNN convolution also weighs cuDNN's graph (backend) API: per shape, the
    /// engines its heuristic ranks first (pre-compiled ones) are checked against the legacy
    /// algorithm's output and timed beside it, and the faster runs. The graph API is what
    /// PyTorch's convolutions call; the legacy one may not reach every Hopper engine. Takes
    /// effect only with [`Self::CONV`] too, on CUDA, in f16/bf16 and in a `cudnn` build: measure
    /// it as `all` against `all,-conv-graph`.
    pub const CONV_GRAPH: Self = Self(1 << 10);
    /// Allocations on a device skip cudarc's per-buffer events
    /// ([`crate::device::apply_stream_order`]): candle runs each device on the calling thread's
    /// default stream, where cudarc never waits on or records those events (they serve its
    /// multi-stream mode, which that stream does not enter), yet it creates two per allocation
    /// and destroys them at the free: four driver calls per op on the host, for nothing. Host
    /// time only (batch-1 latency, the text encoders' small ops); CUDA.
    pub const STREAM_ORDER: Self = Self(1 << 11);

    pub const NONE: Self = Self(0);
    pub const ALL: Self = Self((1 << 12) - 1);

    /// Every lever with its `--kernels` name, in a stable order (new levers go last, so earlier
    /// ablation tables keep their row order).
    pub const NAMED: [(&'static str, Self); 12] = [
        ("group-norm", Self::GROUP_NORM),
        ("geglu", Self::GEGLU),
        ("attention", Self::ATTENTION),
        ("conv", Self::CONV),
        ("channels-last", Self::CHANNELS_LAST),
        ("bias-residual", Self::BIAS_RESIDUAL),
        ("postprocess", Self::POSTPROCESS),
        ("flash", Self::FLASH),
        ("overlap", Self::OVERLAP),
        ("upsample-conv", Self::UPSAMPLE_CONV),
        ("conv-graph", Self::CONV_GRAPH),
        ("stream-order", Self::STREAM_ORDER),
    ];

    /// The levers these take effect only with, beyond themselves: `conv` for `channels-last`
    /// and `conv-graph`, `attention` for `flash`, `postprocess` for `overlap`.
    pub fn prerequisites(self) -> Self {
        let mut needs = Self::NONE;
        for (lever, needed) in [
            (Self::CHANNELS_LAST, Self::CONV),
            (Self::CONV_GRAPH, Self::CONV),
            (Self::FLASH, Self::ATTENTION),
            (Self::OVERLAP, Self::POSTPROCESS),
        ] {
            if self.contains(lever) {
                needs = needs.union(needed);
            }
        }
        needs.without(self)
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// Parses `all`, `none`, or a comma-separated list of lever names, where `-name` removes a
    /// lever from what the items before it selected (`all,-attention`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut set = Self::NONE;
        let mut any = false;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            any = true;
            let (remove, name) = match item.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            let lever = match name {
                "all" => Self::ALL,
                "none" => Self::NONE,
                _ => Self::NAMED
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, k)| *k)
                    .ok_or_else(|| {
                        format!(
                            "unknown kernel {name:?}: expected all, none or a comma-separated \
                             list of {} (prefix a name with - to remove it)",
                            Self::NAMED.map(|(n, _)| n).join(", ")
                        )
                    })?,
            };
            set = if remove {
                set.without(lever)
            } else {
                set.union(lever)
            };
        }
        if !any {
            return Err("--kernels is empty: expected all, none or a list of kernel names".into());
        }
        Ok(set)
    }
}

impl fmt::Display for Kernels {
    /// `all`, `none`, or the names of the levers that are on.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::ALL {
            return f.write_str("all");
        }
        if *self == Self::NONE {
            return f.write_str("none");
        }
        let names: Vec<&str> = Self::NAMED
            .iter()
            .filter(|(_, k)| self.contains(*k))
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kernels({self})")
    }
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// The process-wide choice; [`UNSET`] until [`set_kernels`] or the first [`kernels`] call.
static PROCESS: AtomicU32 = AtomicU32::new(UNSET);

/// No set has every bit: `ALL` leaves the high bits clear.
const UNSET: u32 = u32::MAX;

/// The default before any [`set_kernels`]: `TURBINE_KERNELS` from the environment (what
/// `--kernels` reads too, so a library user, a test binary or `gpu_check.sh`'s kernel tests can
/// narrow it without code), else [`Kernels::ALL`]. An unparsable value is reported and ignored.
fn default_kernels() -> Kernels {
    kernels_from_env(std::env::var("TURBINE_KERNELS").ok().as_deref())
}

fn kernels_from_env(value: Option<&str>) -> Kernels {
    match value {
        Some(v) => Kernels::parse(v).unwrap_or_else(|e| {
            tracing::warn!("TURBINE_KERNELS={v:?} ignored ({e}); using all");
            Kernels::ALL
        }),
        None => Kernels::ALL,
    }
}

fn process_kernels() -> Kernels {
    let v = PROCESS.load(Ordering::Relaxed);
    if v != UNSET {
        return Kernels(v);
    }
    // A racing set_kernels wins over the default.
    let _ = PROCESS.compare_exchange(
        UNSET,
        default_kernels().0,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    Kernels(PROCESS.load(Ordering::Relaxed))
}

thread_local! {
    static THREAD: Cell<Option<Kernels>> = const { Cell::new(None) };
}

/// Sets the process-wide choice (start-up, before any model runs).
pub fn set_kernels(k: Kernels) {
    PROCESS.store(k.0, Ordering::Relaxed);
}

/// The choice in force on this thread.
pub fn kernels() -> Kernels {
    THREAD.with(Cell::get).unwrap_or_else(process_kernels)
}

/// Whether `lever` is on for this thread.
pub fn enabled(lever: Kernels) -> bool {
    kernels().contains(lever)
}

/// Runs `f` with `k` in force on this thread only (restored afterwards, also on panic).
pub fn with_kernels<R>(k: Kernels, f: impl FnOnce() -> R) -> R {
    with_thread_value(&THREAD, Some(k), f)
}

/// Runs `f` with the thread-local `cell` set to `value`, and puts the old value back afterwards,
/// also when `f` panics: the per-thread overrides of the ops (`with_kernels`, the conv ones).
pub(crate) fn with_thread_value<T: Copy + 'static, R>(
    cell: &'static std::thread::LocalKey<Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(cell, cell.with(|c| c.replace(value)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_lists_and_removals() {
        assert_eq!(Kernels::parse("all").unwrap(), Kernels::ALL);
        assert_eq!(Kernels::parse("none").unwrap(), Kernels::NONE);
        assert_eq!(
            Kernels::parse("group-norm, geglu").unwrap(),
            Kernels::GROUP_NORM.union(Kernels::GEGLU)
        );
        let k = Kernels::parse("all,-attention").unwrap();
        assert!(!k.contains(Kernels::ATTENTION));
        assert!(k.contains(Kernels::CONV));
        assert_eq!(k.to_string().split(',').count(), Kernels::NAMED.len() - 1);
        for (name, lever) in Kernels::NAMED {
            assert_eq!(Kernels::parse(name).unwrap(), lever);
            assert_eq!(lever.to_string(), name);
        }
    }

    #[test]
    fn rejects_unknown_and_empty() {
        let e = Kernels::parse("group-norm,warp-drive").unwrap_err();
        assert!(
            e.contains("\"warp-drive\"") && e.contains("channels-last") && e.contains("flash"),
            "{e}"
        );
        assert!(Kernels::parse(" , ").is_err());
    }

    #[test]
    fn prerequisites_of_the_levers_that_need_another() {
        assert_eq!(Kernels::CHANNELS_LAST.prerequisites(), Kernels::CONV);
        assert_eq!(Kernels::CONV_GRAPH.prerequisites(), Kernels::CONV);
        assert_eq!(Kernels::FLASH.prerequisites(), Kernels::ATTENTION);
        assert_eq!(Kernels::OVERLAP.prerequisites(), Kernels::POSTPROCESS);
        assert_eq!(Kernels::GROUP_NORM.prerequisites(), Kernels::NONE);
        // What a set holds already is not a prerequisite.
        assert_eq!(Kernels::ALL.prerequisites(), Kernels::NONE);
        assert_eq!(
            Kernels::FLASH.union(Kernels::OVERLAP).prerequisites(),
            Kernels::ATTENTION.union(Kernels::POSTPROCESS)
        );
    }

    #[test]
    fn default_comes_from_the_environment_value() {
        assert_eq!(kernels_from_env(None), Kernels::ALL);
        assert_eq!(
            kernels_from_env(Some("all,-conv-graph")),
            Kernels::ALL.without(Kernels::CONV_GRAPH)
        );
        assert_eq!(kernels_from_env(Some("none")), Kernels::NONE);
        // Unparsable: ignored (and logged), not a panic in library code.
        assert_eq!(kernels_from_env(Some("warp-drive")), Kernels::ALL);
        assert_ne!(Kernels::ALL.0, UNSET);
    }

    #[test]
    fn thread_override_is_scoped_to_the_thread() {
        let before = kernels();
        with_kernels(Kernels::NONE, || {
            assert_eq!(kernels(), Kernels::NONE);
            // Another thread still sees the process-wide choice.
            let other = std::thread::spawn(kernels).join().unwrap();
            assert_eq!(other, process_kernels());
            with_kernels(Kernels::GEGLU, || assert!(enabled(Kernels::GEGLU)));
            assert_eq!(kernels(), Kernels::NONE);
        });
        assert_eq!(kernels(), before);
    }
}
