//! The listening sockets for `--host` and `--port`.
//!
//! `::`, the default, listens on every address of both families: one IPv6 socket that also
//! takes IPv4 connections (as IPv4-mapped addresses, which the server canonicalises). A host
//! whose kernel has no IPv6 at all gets `0.0.0.0` instead, with a warning. So the same default
//! serves an IPv4 network, a dual-stack one and an IPv6-only one (an IPv6-only Kubernetes
//! cluster, whose pods have no IPv4 address), and `localhost` whichever address a client
//! resolves it to. `0.0.0.0` is IPv4 only, as everywhere.
//!
//! A name listens on every address it resolves to, at one port, as nginx's `listen` does:
//! `localhost` on Debian's and Ubuntu's `/etc/hosts` is `::1` first and `127.0.0.1` second,
//! and listening on the first only (what binding a name usually does) left a proxy or a probe
//! that reaches the server at `127.0.0.1` refused.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use anyhow::Context;

/// The connections waiting to be accepted (tokio's own `bind` asks for as many).
const BACKLOG: i32 = 1024;

/// How often a free port (`--port 0`) is drawn again when another address of the name has it
/// taken already.
const PORT_DRAWS: usize = 8;

/// The sockets the server accepts connections on: one, or one per address of a name.
#[derive(Debug)]
pub struct Listener {
    /// Never empty: made from one socket, or from the addresses that were bound (none is an
    /// error of `listen`).
    sockets: Vec<tokio::net::TcpListener>,
    /// The socket to look at first on the next accept, so that none is starved.
    next: AtomicUsize,
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(socket: tokio::net::TcpListener) -> Self {
        Listener {
            sockets: vec![socket],
            next: AtomicUsize::new(0),
        }
    }
}

impl Listener {
    /// The first socket's address (all have the same port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sockets[0].local_addr()
    }

    /// Every socket's address.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.sockets.iter().map(|s| s.local_addr()).collect()
    }

    /// The next connection, or `None` when accepting one failed: out of file descriptors and
    /// the like, after a second's wait rather than a spin (a peer that reset before it was
    /// accepted is no reason to wait). `what` names the port in the warning's `on`.
    pub async fn next(&self, what: &str) -> Option<(tokio::net::TcpStream, SocketAddr)> {
        match self.accept().await {
            Ok(accepted) => Some(accepted),
            Err(e) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) {
                    tracing::warn!(error = %e, on = what, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                None
            }
        }
    }

    /// The next connection on any of the sockets (cancel-safe, as tokio's `accept`).
    pub async fn accept(&self) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
        std::future::poll_fn(|cx| {
            let n = self.sockets.len();
            let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
            for i in 0..n {
                if let Poll::Ready(accepted) = self.sockets[(first + i) % n].poll_accept(cx) {
                    return Poll::Ready(accepted);
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Listens on `host` (an address, bracketed or not, or a name to resolve) and `port`.
pub async fn listen(host: &str, port: u16) -> anyhow::Result<Listener> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let Ok(ip) = bare.parse::<IpAddr>() else {
        let resolved = tokio::net::lookup_host((bare, port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}: cannot resolve {bare}"))?;
        let mut addrs: Vec<IpAddr> = Vec::new();
        for addr in resolved {
            if !addrs.contains(&addr.ip()) {
                addrs.push(addr.ip());
            }
        }
        return listen_all(host, &addrs, port);
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
    registered(vec![listener])
}

/// Listens on each of `addrs`, the addresses `host` resolved to, at one port (`port`, or with
/// 0 one that is free at all of them). An address this machine does not have (or an IPv6 one
/// on a kernel without IPv6) is skipped with a warning, so long as another one is listened
/// on; any other failure (the port taken at one of them) is an error, not a fallback to the
/// rest.
fn listen_all(host: &str, addrs: &[IpAddr], requested: u16) -> anyhow::Result<Listener> {
    anyhow::ensure!(
        !addrs.is_empty(),
        "cannot listen on {host}:{requested}: it resolves to no address"
    );
    let mut draws = 0;
    loop {
        let mut port = requested;
        let mut bound = Vec::new();
        let mut skipped = Vec::new();
        let mut taken = None;
        for &ip in addrs {
            let addr = SocketAddr::new(ip, port);
            // Each IPv6 socket IPv6 only, so that `::` beside `0.0.0.0` does not collide.
            let only_v6 = (addrs.len() > 1 && ip.is_ipv6()).then_some(true);
            match bind(addr, only_v6) {
                Ok(socket) => {
                    if port == 0 {
                        port = socket.local_addr()?.port();
                    }
                    bound.push(socket);
                }
                Err(e) if no_ipv6(&e) => skipped.push((addr, e)),
                Err(e) => {
                    taken = Some((addr, e));
                    break;
                }
            }
        }
        match taken {
            // The free port drawn at the first address is taken at another: draw again.
            Some((_, e))
                if e.kind() == io::ErrorKind::AddrInUse && requested == 0 && draws < PORT_DRAWS =>
            {
                draws += 1;
                continue;
            }
            Some((addr, e)) => {
                return Err(e).with_context(|| format!("cannot listen on {addr} ({host})"));
            }
            None => {}
        }
        if bound.is_empty() {
            let (addr, e) = skipped.swap_remove(0);
            return Err(e).with_context(|| format!("cannot listen on {addr} ({host})"));
        }
        for (addr, e) in skipped {
            tracing::warn!(error = %e, "{host} resolves to {addr} too, which cannot be listened on: listening on its other addresses");
        }
        return registered(bound);
    }
}

fn registered(sockets: Vec<std::net::TcpListener>) -> anyhow::Result<Listener> {
    let sockets = sockets
        .into_iter()
        .map(tokio::net::TcpListener::from_std)
        .collect::<io::Result<_>>()
        .context("cannot register the listening socket")?;
    Ok(Listener {
        sockets,
        next: AtomicUsize::new(0),
    })
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

/// Whether `e`, from making or binding a socket, means the address cannot be had here: the
/// system has no IPv6 (a kernel started with `ipv6.disable=1`, or built without it), or the
/// address is not one of this machine's; not that the port is taken.
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
    async fn connect(listener: &Listener, ip: IpAddr) -> io::Result<SocketAddr> {
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

    /// A name listens on every address it resolves to, at one port: `localhost` on this
    /// machine's `/etc/hosts`, and the two loopbacks as Debian's `/etc/hosts` gives them
    /// (`::1` first), where listening on the first only refused `127.0.0.1`.
    #[tokio::test]
    async fn a_name_listens_on_every_address_it_resolves_to() {
        let listener = listen("localhost", 0).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut resolved: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", port))
            .await
            .unwrap()
            .collect();
        resolved.dedup();
        assert_eq!(listener.local_addrs().unwrap(), resolved);
        for addr in resolved {
            assert_eq!(connect(&listener, addr.ip()).await.unwrap().ip(), addr.ip());
        }

        if !ipv6_loopback() {
            eprintln!("no IPv6 loopback on this machine: two families were not checked");
            return;
        }
        let both = [Ipv6Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into()];
        let listener = listen_all("localhost", &both, 0).unwrap();
        let addrs = listener.local_addrs().unwrap();
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs[0].port(), addrs[1].port());
        // Either socket, many times over: none is left unaccepted.
        for _ in 0..3 {
            for ip in both {
                assert_eq!(connect(&listener, ip).await.unwrap().ip(), ip);
            }
        }

        // The port taken at one of them is an error naming it, not a fallback to the other.
        let port = addrs[0].port();
        drop(listener);
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        let e = listen_all("localhost", &both, port).unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("cannot listen on 127.0.0.1:{port} (localhost)")),
            "{e:#}"
        );
        drop(taken);
    }

    /// An address of the name that this machine does not have is skipped while another one
    /// is listened on; with none left it is the error.
    #[tokio::test]
    async fn an_address_this_machine_lacks_is_skipped_unless_it_is_the_only_one() {
        // TEST-NET-1 (RFC 5737): never a local address.
        let elsewhere: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
        let listener = listen_all("name", &[elsewhere, Ipv4Addr::LOCALHOST.into()], 0).unwrap();
        let addrs = listener.local_addrs().unwrap();
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        connect(&listener, Ipv4Addr::LOCALHOST.into())
            .await
            .unwrap();
        let e = listen_all("name", &[elsewhere], 8000).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot listen on 192.0.2.1:8000 (name)"),
            "{e:#}"
        );
        assert!(listen_all("name", &[], 8000).is_err());
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
