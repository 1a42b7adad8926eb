//! systemd's readiness protocol (`sd_notify`): under a unit with `Type=notify`, systemd passes
//! a datagram socket in `NOTIFY_SOCKET`, and the service says there when it is ready (`READY=1`)
//! and when it is stopping (`STOPPING=1`), with a `STATUS=` line for `systemctl status`.
//!
//! With `WatchdogSec=` in the unit, systemd also expects `WATCHDOG=1` at least that often, and
//! kills and restarts a service that goes quiet: a process wedged as a whole (a deadlock, an
//! exit that hangs in a driver) which no check of its own can report.
//!
//! turbine is ready when `/health` turns 200: the weights loaded and the warm-up batches run on
//! every device, which is minutes after the process starts on a first download. With this,
//! `systemctl start turbine` returns then, and units ordered after it (a gateway, a load
//! balancer's registration) start against a server that answers.

use std::ffi::OsString;
use std::time::Duration;

/// Where systemd listens: a path, or `@name` for a socket in Linux's abstract namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySocket(pub OsString);

impl NotifySocket {
    /// `NOTIFY_SOCKET` from the environment, which it leaves (as `sd_notify`'s
    /// `unset_environment`), so that no process started from here talks to systemd for us.
    pub fn take_from_env() -> Option<Self> {
        let v = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty())?;
        // `turbine serve` calls this first thing, before it starts any thread that could read
        // the environment meanwhile.
        std::env::remove_var("NOTIFY_SOCKET");
        Some(NotifySocket(v))
    }

    /// Sends `message` (`KEY=VALUE` lines); a failure is logged, never fatal: the server serves
    /// whether or not its supervisor hears.
    pub fn notify(&self, message: &str) {
        if let Err(e) = self.send(message) {
            tracing::warn!(socket = ?self.0, "cannot notify systemd: {e}");
        }
    }

    #[cfg(unix)]
    fn send(&self, message: &str) -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::UnixDatagram;
        let socket = UnixDatagram::unbound()?;
        let target = self.0.as_bytes();
        let sent = match target.strip_prefix(b"@") {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)?
            }
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            Some(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "abstract sockets are Linux's",
                ))
            }
            None => socket.send_to(message.as_bytes(), std::path::Path::new(&self.0))?,
        };
        if sent != message.len() {
            return Err(std::io::Error::other("the message was cut short"));
        }
        Ok(())
    }

    #[cfg(not(unix))]
    fn send(&self, _message: &str) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "sd_notify is a Unix protocol",
        ))
    }
}

/// systemd's watchdog interval (`WatchdogSec=`): `WATCHDOG_USEC` when `WATCHDOG_PID` is unset or
/// names this process, as `sd_watchdog_enabled` reads them. Both leave the environment, as
/// `NOTIFY_SOCKET` does, so that no child process takes the pings for its own.
pub fn take_watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    std::env::remove_var("WATCHDOG_USEC");
    std::env::remove_var("WATCHDOG_PID");
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// How often to send `WATCHDOG=1` for a watchdog of `interval`: twice per interval, as
/// systemd's documentation advises, so one late ping is no kill.
pub fn watchdog_period(interval: Duration) -> Duration {
    (interval / 2).max(Duration::from_millis(1))
}

#[cfg(test)]
mod watchdog_tests {
    use super::*;

    #[test]
    fn the_interval_is_read_as_sd_watchdog_enabled_reads_it() {
        let me = 4242;
        assert_eq!(
            watchdog_interval(Some("30000000"), None, me),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("500000"), Some("4242"), me),
            Some(Duration::from_millis(500))
        );
        // Another process's watchdog, none, zero or garbage: no pings.
        assert_eq!(watchdog_interval(Some("500000"), Some("17"), me), None);
        assert_eq!(watchdog_interval(Some("500000"), Some("x"), me), None);
        assert_eq!(watchdog_interval(None, Some("4242"), me), None);
        assert_eq!(watchdog_interval(Some("0"), None, me), None);
        assert_eq!(watchdog_interval(Some("soon"), None, me), None);
        assert_eq!(
            watchdog_period(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_socket_path() {
        let dir = std::env::temp_dir().join(format!("turbine-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        let target = NotifySocket(path.clone().into_os_string());
        target.notify("READY=1\nSTATUS=serving");
        assert_eq!(received(&socket), "READY=1\nSTATUS=serving");
        // Nobody listening any more: logged, not a panic or an error to the caller.
        drop(socket);
        std::fs::remove_file(&path).unwrap();
        assert!(target.send("STOPPING=1").is_err());
        target.notify("STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("turbine-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        NotifySocket(format!("@{name}").into()).notify("STOPPING=1");
        assert_eq!(received(&socket), "STOPPING=1");
    }
}
