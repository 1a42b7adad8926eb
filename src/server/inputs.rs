//! Request inputs held in memory (`--max-buffered-input-bytes`): the bodies being read whole
//! (a generation's JSON, an edit's form with its image) and the image files an edit names by
//! `file_id`, all together.
//!
//! Each request's body is bounded (`--max-body-bytes`, `--max-upload-bytes`), but the number
//! of requests is not: forty 30 MB edits sent at once took 1.2 GB, and a server in a container
//! with a 1 GiB memory limit was killed by the kernel mid-burst, every request it was serving
//! lost with it (`scripts/memory_limit_check.sh`). So a request takes its share of a budget
//! before its body is read (its `Content-Length`, or its limit when it sends none) and keeps it
//! until what it read is decoded. One that finds the budget taken waits, its body unread (the
//! client's sends wait on TCP), until others give theirs back; one that waits longer than
//! `--request-body-timeout` gets 503 `server_overloaded` with `Retry-After`. Uploads to the
//! Files and Uploads APIs stream to disk and take none of it.
//!
//! Waits are first come, first served, so a large edit is not passed over for ever; but a
//! generation's few hundred bytes would then wait behind every edit queued before it (in that
//! burst, a generation took 1.6 s instead of 50 ms). So shares of at most [`SMALL_SHARE`] (the
//! JSON requests) come from a sixteenth of the budget kept for them, and never wait behind
//! large ones.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{ApiError, InferError};
use super::metrics::Metrics;

/// The budget is counted in KiB: a tokio semaphore takes at most `u32` permits at once.
const UNIT: u64 = 1024;

/// The share of the memory the process may use that `auto` gives to inputs.
pub const AUTO_SHARE: u64 = 4;

/// What one request may hold at most, as a multiple of `--max-upload-bytes`: an edit's body
/// and the files it names (image, mask, markup). The budget is never less, so a request alone
/// always fits.
pub const LARGEST_REQUEST_UPLOADS: u64 = 4;

/// How long a client that was refused should wait before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Shares of at most this many bytes come from the part of the budget kept for small ones (or
/// of a sixteenth of that part, if less: a budget set very low).
pub const SMALL_SHARE: u64 = 64 << 10;

/// The part of the budget kept for small shares: one in this many of its bytes.
const SMALL_PART: u64 = 16;

/// The budget, shared by every request.
pub struct InputMemory {
    /// For shares of at most [`SMALL_SHARE`], and for the others.
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    small_units: u64,
    large_units: u64,
    /// The largest share that is small.
    small_share: u64,
    wait: Duration,
    metrics: Arc<Metrics>,
    /// When a wait was last logged: once a minute at most.
    logged: Mutex<Option<Instant>>,
}

/// A request's share, given back when dropped (once what it holds is dropped or decoded).
#[must_use = "the share is given back as soon as it is dropped"]
pub struct Held {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.buffered_input(-(self.bytes as i64));
    }
}

impl InputMemory {
    /// A budget of `max_bytes`; a request waits at most `wait` for its share.
    pub fn new(max_bytes: u64, wait: Duration, metrics: Arc<Metrics>) -> Self {
        let units = (max_bytes / UNIT).clamp(2 * SMALL_PART, 2 * u64::from(u32::MAX));
        let small_units = (units / SMALL_PART).min(u64::from(u32::MAX));
        let large_units = (units - small_units).min(u64::from(u32::MAX));
        metrics.set_buffered_input_max((small_units + large_units) * UNIT);
        Self {
            small: Arc::new(Semaphore::new(small_units as usize)),
            large: Arc::new(Semaphore::new(large_units as usize)),
            small_units,
            large_units,
            small_share: SMALL_SHARE.min(small_units * UNIT / SMALL_PART),
            wait,
            metrics,
            logged: Mutex::new(None),
        }
    }

    /// The whole budget, in bytes.
    pub fn max_bytes(&self) -> u64 {
        (self.small_units + self.large_units) * UNIT
    }

    /// Takes `bytes` of the budget (rounded up to whole KiB; at most its part of the budget),
    /// waiting for other requests to give theirs back if needed.
    pub async fn hold(&self, bytes: u64) -> Result<Held, ApiError> {
        let (permits, most) = if bytes <= self.small_share {
            (&self.small, self.small_units)
        } else {
            (&self.large, self.large_units)
        };
        let units = bytes.div_ceil(UNIT).clamp(1, most) as u32;
        let held = |permit| {
            let bytes = u64::from(units) * UNIT;
            self.metrics.buffered_input(bytes as i64);
            Held {
                _permit: permit,
                bytes,
                metrics: self.metrics.clone(),
            }
        };
        if let Ok(permit) = permits.clone().try_acquire_many_owned(units) {
            return Ok(held(permit));
        }
        self.metrics.buffered_input_wait();
        {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            if super::warning_due(&mut logged, Instant::now()) {
                tracing::warn!(
                    "{} MiB of request bodies and edit images are in memory \
                     (--max-buffered-input-bytes): new requests wait before their bodies are read",
                    self.max_bytes() >> 20
                );
            }
        }
        match tokio::time::timeout(self.wait, permits.clone().acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Ok(held(permit)),
            Ok(Err(_)) => unreachable!("the input budget is never closed"),
            Err(_) => Err(InferError::InputMemoryFull {
                max_bytes: self.max_bytes(),
                waited: self.wait,
            }
            .into()),
        }
    }
}

/// `--max-buffered-input-bytes`: the number asked for, or for `auto` (`None`) a quarter of
/// `memory` (what the process may use, [`memory_limit`]), and never less than what one request
/// may hold ([`LARGEST_REQUEST_UPLOADS`] uploads, or one body).
pub fn input_budget(
    asked: Option<u64>,
    memory: Option<u64>,
    max_upload: u64,
    max_body: u64,
) -> u64 {
    let least = (LARGEST_REQUEST_UPLOADS * max_upload).max(max_body);
    match asked {
        Some(n) => n.max(least),
        None => memory.map_or(least, |m| m / AUTO_SHARE).max(least),
    }
}

/// The memory this process may use: the least of the machine's (`MemTotal`) and its cgroup's
/// limit (v2 `memory.max`, or v1 `memory.limit_in_bytes`, on its own group and those above it:
/// a container's, or a systemd unit's `MemoryMax=`). `None` where none can be read.
pub fn memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    memory_limit_in(std::path::Path::new("/sys/fs/cgroup"), &cgroups, &meminfo)
}

/// [`memory_limit`] over a cgroup mount at `root`, `/proc/self/cgroup`'s text, and
/// `/proc/meminfo`'s.
fn memory_limit_in(root: &std::path::Path, cgroups: &str, meminfo: &str) -> Option<u64> {
    let total = meminfo.lines().find_map(|l| {
        let kib = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok().map(|k| k * 1024)
    });
    let mut least = total;
    let mut take = |limit: Option<u64>| {
        if let Some(limit) = limit {
            least = Some(least.map_or(limit, |l| l.min(limit)));
        }
    };
    for line in cgroups.lines() {
        // hierarchy-id:controllers:path
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (dir, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        // The group and each above it: a limit on a parent bounds its children.
        let mut group = std::path::PathBuf::from(path.trim_start_matches('/'));
        loop {
            let text = std::fs::read_to_string(dir.join(&group).join(file)).ok();
            // v2 writes "max" for none; v1 a number near 2^63.
            take(text.and_then(|t| t.trim().parse::<u64>().ok()));
            if !group.pop() {
                break;
            }
        }
    }
    least
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &std::path::Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    const MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:         1000 kB\n";

    #[test]
    fn the_memory_limit_is_the_least_of_the_machine_and_its_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // No cgroup files: the machine's memory.
        assert_eq!(
            memory_limit_in(root, "0::/system.slice/turbine.service\n", MEMINFO),
            Some(24_000_000 * 1024)
        );
        // v2: the unit's own limit is "max", its slice's is 2 GiB.
        write(
            &root.join("system.slice/turbine.service/memory.max"),
            "max\n",
        );
        write(&root.join("system.slice/memory.max"), "2147483648\n");
        assert_eq!(
            memory_limit_in(root, "0::/system.slice/turbine.service\n", MEMINFO),
            Some(2 << 30)
        );
        // A container's namespace shows its own group as the root.
        write(&root.join("memory.max"), "1073741824\n");
        assert_eq!(memory_limit_in(root, "0::/\n", MEMINFO), Some(1 << 30));
        // v1: the memory controller's hierarchy, "unlimited" a number near 2^63.
        let v1 = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n";
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            &root.join("memory/docker/abc/memory.limit_in_bytes"),
            "536870912\n",
        );
        write(
            &root.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        assert_eq!(memory_limit_in(root, v1, MEMINFO), Some(512 << 20));
        // Nothing to read at all.
        assert_eq!(memory_limit_in(root, "", ""), None);
    }

    #[test]
    fn auto_takes_a_quarter_of_the_memory_and_never_less_than_one_request() {
        let (upload, body) = (32 << 20, 1 << 20);
        assert_eq!(input_budget(None, Some(24 << 30), upload, body), 6 << 30);
        // A small container still takes one edit with its files.
        assert_eq!(input_budget(None, Some(256 << 20), upload, body), 128 << 20);
        assert_eq!(input_budget(None, None, upload, body), 128 << 20);
        assert_eq!(input_budget(Some(1 << 30), None, upload, body), 1 << 30);
        assert_eq!(
            input_budget(Some(1), Some(1 << 40), upload, body),
            128 << 20
        );
        assert_eq!(input_budget(None, Some(1 << 30), 1024, 4 << 20), 256 << 20);
        assert_eq!(input_budget(Some(0), None, 1024, 4 << 20), 4 << 20);
    }

    #[tokio::test]
    async fn a_request_waits_for_the_budget_and_is_refused_past_the_wait() {
        let metrics = Arc::new(Metrics::new());
        // 1 MiB: 64 KiB kept for small shares, 960 KiB for the rest.
        let budget = Arc::new(InputMemory::new(
            1024 * UNIT,
            Duration::from_millis(300),
            metrics.clone(),
        ));
        assert_eq!(budget.max_bytes(), 1 << 20);
        let first = budget.hold(600 * UNIT).await.unwrap();
        let second = budget.hold(360 * UNIT - 100).await.unwrap();
        assert!(metrics
            .render()
            .contains("turbine_buffered_input_bytes 983040"));
        // The large part is full; a small share still does not wait.
        let small = budget.hold(2 * UNIT).await.unwrap();
        // A large one waits, and gets its share once the first is dropped.
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.hold(100 * UNIT).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        drop(first);
        let third = waiting.await.unwrap().unwrap();
        // One that is never given room is refused after the wait, as a 503 with Retry-After.
        let rest = budget.hold(500 * UNIT).await.unwrap();
        let t0 = Instant::now();
        let refused = budget.hold(100 * UNIT).await.err().unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(refused.info().status.as_u16(), 503);
        assert_eq!(refused.info().code, Some("server_overloaded"));
        assert_eq!(refused.retry_after(), Some(RETRY_AFTER));
        drop((second, third, small));
        let text = metrics.render();
        assert!(
            text.contains("turbine_buffered_input_bytes 512000"),
            "{text}"
        );
        assert!(
            text.contains("turbine_buffered_input_max_bytes 1048576"),
            "{text}"
        );
        assert!(
            text.contains("turbine_buffered_input_waits_total 2"),
            "{text}"
        );
        // More than its part takes the whole part, rather than never fitting.
        drop(rest);
        let all = budget.hold(1 << 30).await.unwrap();
        assert_eq!(budget.large.available_permits(), 0);
        drop(all);
        assert_eq!(budget.large.available_permits(), 960);
        assert_eq!(budget.small.available_permits(), 64);
        assert!(metrics.render().contains("turbine_buffered_input_bytes 0"));
    }
}
