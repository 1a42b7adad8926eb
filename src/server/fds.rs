//! File descriptors: the process's open-file limit, and how many connections it leaves room
//! for (`--max-connections`).
//!
//! Every open connection is a file descriptor. Linux starts a service with a soft limit of 1024
//! (systemd's default, and most shells'), while its hard limit is far higher (systemd: 524288):
//! a server behind a gateway with a few pools of keep-alive connections, plus the clients
//! waiting in the queue, can go past 1024. Then `accept` fails with EMFILE, and so does every
//! other open: an upload's temporary file, a batch's output, a webhook's connection. So `serve`
//! raises the soft limit to the hard one at start (as Go's runtime does for every program), and
//! takes no more connections than leave [`RESERVED_FDS`] of the limit for the rest: one over
//! that waits in the listen backlog until a connection closes, rather than being accepted and
//! starving the files that the requests already accepted need.

/// Descriptors kept for what is not a client connection: the model's files while they load,
/// the files and batches directories, batch input and output files, webhook deliveries'
/// connections, the CUDA driver's (a few dozen per device), the runtime's, stdio.
pub const RESERVED_FDS: u64 = 256;

/// The least `auto` gives, however low the open-file limit: a server that can take only a
/// handful of connections still takes them (and may then run out of descriptors, as before).
pub const MIN_AUTO_CONNECTIONS: usize = 32;

/// Without an open-file limit to read (not Unix), what `auto` gives.
pub const DEFAULT_CONNECTIONS: usize = 10_000;

/// The most any setting gives: far past what one process serves, and within what a tokio
/// semaphore counts (an unlimited open-file limit, as macOS allows, would not be).
pub const MAX_CONNECTIONS: usize = 1 << 24;

/// The soft and hard limits on open files (RLIMIT_NOFILE); `None` where there are none to read.
// rlim_t is u64 on Linux and macOS, not on every Unix.
#[allow(clippy::unnecessary_cast)]
pub fn open_file_limits() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given, which lives for the call.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0 {
            return Some((l.rlim_cur as u64, l.rlim_max as u64));
        }
        None
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Raises the soft open-file limit to the hard one. Returns the (old, new) soft limit, the same
/// twice when there was nothing to raise; `None` where there is no limit to raise, or the
/// system refused.
pub fn raise_open_file_limit() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let (soft, hard) = open_file_limits()?;
        if soft >= hard {
            return Some((soft, soft));
        }
        // macOS refuses a soft limit over OPEN_MAX (10240) even when the hard one is unlimited.
        let target = if cfg!(target_os = "macos") {
            hard.min(10_240)
        } else {
            hard
        };
        let l = libc::rlimit {
            rlim_cur: target as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            return None;
        }
        Some((soft, open_file_limits().map_or(target, |(s, _)| s)))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// How many connections to take at once: `asked` (`--max-connections`), or for `auto` (`None`)
/// what the soft open-file limit leaves after [`RESERVED_FDS`], at least
/// [`MIN_AUTO_CONNECTIONS`]; either way at most [`MAX_CONNECTIONS`].
pub fn connection_limit(asked: Option<usize>, soft_open_files: Option<u64>) -> usize {
    let n = match (asked, soft_open_files) {
        (Some(n), _) => n,
        (None, Some(limit)) => usize::try_from(limit.saturating_sub(RESERVED_FDS))
            .unwrap_or(usize::MAX)
            .max(MIN_AUTO_CONNECTIONS),
        (None, None) => DEFAULT_CONNECTIONS,
    };
    n.min(MAX_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_leaves_the_reserve_of_the_open_file_limit() {
        assert_eq!(connection_limit(None, Some(1024)), 768);
        assert_eq!(connection_limit(None, Some(524_288)), 524_032);
        // A limit too low for the reserve still takes a few connections.
        assert_eq!(connection_limit(None, Some(200)), MIN_AUTO_CONNECTIONS);
        // RLIM_INFINITY (all ones) neither overflows nor makes a semaphore too large to count.
        assert_eq!(connection_limit(None, Some(u64::MAX)), MAX_CONNECTIONS);
        assert_eq!(connection_limit(Some(usize::MAX), None), MAX_CONNECTIONS);
        let _ = tokio::sync::Semaphore::new(MAX_CONNECTIONS);
        assert_eq!(connection_limit(None, None), DEFAULT_CONNECTIONS);
        // Asked for: taken as it is, whatever the limit.
        assert_eq!(connection_limit(Some(5), Some(1024)), 5);
        assert_eq!(connection_limit(Some(100_000), Some(1024)), 100_000);
    }

    #[cfg(unix)]
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = open_file_limits().unwrap();
        assert!(soft <= hard, "{soft} > {hard}");
        // Lower the soft limit (the hard one stays, so it can be raised again), as a service
        // manager starts a process.
        let lower = soft.clamp(64, 512);
        let l = libc::rlimit {
            rlim_cur: lower as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) }, 0);
        let (before, after) = raise_open_file_limit().unwrap();
        assert_eq!(before, lower);
        let (now, hard_now) = open_file_limits().unwrap();
        assert_eq!(hard_now, hard);
        assert_eq!(now, after);
        if cfg!(target_os = "macos") {
            assert_eq!(after, hard.min(10_240));
        } else {
            assert_eq!(after, hard);
        }
        // Again: nothing left to raise.
        assert_eq!(raise_open_file_limit(), Some((after, after)));
    }
}
