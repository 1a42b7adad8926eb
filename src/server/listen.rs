//! The listening socket for `--host` and `--port`.
//!
//! `::`, the default, listens on every address of both families: one IPv6 socket that also
//! takes IPv4 connections (as IPv4-mapped addresses, which the server canonicalises). A host
//! whose kernel has no IPv6 at all gets `0.0.0.0` instead, with a warning. So the same default
//! serves an IPv4 network, a dual-stack one and an IPv6-only one (an IPv6-only Kubernetes
//! cluster, whose pods have no IPv4 address), and `localhost` whichever address a client
//! resolves it to. `0.0.0.0` is IPv4 only, as everywhere.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context;

/// The connections waiting to be accepted (tokio's own `bind` asks for as many).
const BACKLOG: i32 = 1024;

/// Listens on `host` (an address, bracketed or not, or a name to resolve) and `port`.
pub async fn listen(host: &str, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let Ok(ip) = bare.parse::<IpAddr>() else {
        // A name: the first of its addresses that can be bound, as tokio does.
        return tokio::net::TcpListener::bind((bare, port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"));
    };
    let addr = SocketAddr::new(ip, port);
    let bound = if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        match bind(addr, Some(false)) {
            Err(e) if no_ipv6(&e) => {
                tracing::warn!(
                    error = %e,
                    "this host has no IPv6: listening on IPv4 addresses only (0.0.0.0)"
                );
                bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), None)
            }
            other => other,
        }
    } else {
        bind(addr, None)
    };
    let listener = bound.with_context(|| format!("cannot listen on {addr}"))?;
    tokio::net::TcpListener::from_std(listener).context("cannot register the listening socket")
}

/// A listening socket at `addr`; `only_v6`, for an IPv6 address, whether it refuses IPv4
/// (`Some(false)`: it takes both, whatever the system's default, `net.ipv6.bindv6only`, is).
fn bind(addr: SocketAddr, only_v6: Option<bool>) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A restarted server can listen again at once while the old connections time out.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    if let Some(only) = only_v6 {
        socket.set_only_v6(only)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Whether `e`, from making or binding an IPv6 socket, means the system has no IPv6 (a kernel
/// started with `ipv6.disable=1`, or built without it), not that the port is taken.
fn no_ipv6(e: &io::Error) -> bool {
    #[cfg(unix)]
    if matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
    ) {
        return true;
    }
    // EADDRNOTAVAIL, and its like elsewhere.
    e.kind() == io::ErrorKind::AddrNotAvailable
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Whether this machine has an IPv6 loopback address to test with (a container may not).
    fn ipv6_loopback() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    /// Connects to `ip` at `listener`'s port and has it accepted: the peer address it saw.
    async fn connect(listener: &tokio::net::TcpListener, ip: IpAddr) -> io::Result<SocketAddr> {
        let port = listener.local_addr()?.port();
        let connect = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect((ip, port))?;
            s.write_all(b"x")?;
            let mut b = [0; 1];
            let _ = s.read(&mut b);
            io::Result::Ok(())
        });
        let (mut stream, peer) =
            tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept())
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "not accepted"))??;
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"y").await?;
        connect.await.unwrap()?;
        Ok(peer)
    }

    #[tokio::test]
    async fn the_unspecified_ipv6_address_takes_both_families() {
        let listener = listen("::", 0).await.unwrap();
        let local = listener.local_addr().unwrap();
        if !ipv6_loopback() && local.is_ipv4() {
            eprintln!("no IPv6 on this machine: only the IPv4 fallback was checked");
        } else {
            assert_eq!(local.ip(), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        }
        // IPv4 arrives IPv4-mapped on the IPv6 socket; canonical, it is the client's address.
        let peer = connect(&listener, Ipv4Addr::LOCALHOST.into())
            .await
            .unwrap();
        assert_eq!(peer.ip().to_canonical(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        if ipv6_loopback() {
            let peer = connect(&listener, Ipv6Addr::LOCALHOST.into())
                .await
                .unwrap();
            assert_eq!(peer.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        } else {
            eprintln!("no IPv6 loopback on this machine: IPv6 connections were not checked");
        }
        // Bracketed, as in a URL, it is the same.
        let listener = listen("[::]", 0).await.unwrap();
        connect(&listener, Ipv4Addr::LOCALHOST.into())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_ipv4_address_and_a_name_listen_as_given() {
        let listener = listen("0.0.0.0", 0).await.unwrap();
        assert!(listener.local_addr().unwrap().is_ipv4());
        connect(&listener, Ipv4Addr::LOCALHOST.into())
            .await
            .unwrap();
        if ipv6_loopback() {
            let port = listener.local_addr().unwrap().port();
            assert!(std::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port)).is_err());
        }
        let listener = listen("localhost", 0).await.unwrap();
        let ip = listener.local_addr().unwrap().ip();
        assert!(ip.is_loopback(), "{ip}");
        connect(&listener, ip).await.unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_not_a_fallback() {
        let taken = listen("::", 0).await.unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = listen("::", port).await.unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("cannot listen on [::]:{port}")),
            "{e:#}"
        );
        let e = listen("no such host.invalid", 8000).await.unwrap_err();
        assert!(format!("{e:#}").contains("cannot listen on no such host.invalid:8000"));
    }

    #[cfg(unix)]
    #[test]
    fn only_a_missing_address_family_falls_back() {
        assert!(no_ipv6(&io::Error::from_raw_os_error(libc::EAFNOSUPPORT)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EADDRINUSE)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EACCES)));
    }
}
