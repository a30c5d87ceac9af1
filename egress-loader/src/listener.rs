//! Listening sockets of the proxies, and the open-files limit they need.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::warn;

use crate::ratelimit::RateLimit;

/// A listening TCP socket on `addr` (SO_REUSEADDR, so a restarted proxy binds at once). TCP_NODELAY
/// is set on it, and every accepted connection inherits it: the proxies pass small writes on at
/// once, without a system call per connection to say so.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    TcpListener::from_std(bound(addr, backlog, false)?)
}

/// `n` listening sockets on `addr` as [`listen`] makes them, one for each proxy thread
/// (`workers`), not yet registered with a runtime: each is turned into a tokio listener on its
/// own thread. More than one make an SO_REUSEPORT group, over which the kernel spreads new
/// connections by their addresses and ports. A port some socket listens on already is refused,
/// as for one listener: SO_REUSEPORT alone would let a second proxy of the same user (in the
/// same pod) share the port, each getting part of the connections, without a word.
pub fn listen_each(
    addr: SocketAddr,
    backlog: u32,
    n: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    if n <= 1 {
        return Ok(vec![bound(addr, backlog, false)?]);
    }
    if addr.port() != 0 {
        // Without SO_REUSEPORT, binding conflicts with any socket listening on the port.
        let probe = socket(addr, false)?;
        probe.bind(&addr.into()).map_err(|e| bind_error(e, addr))?;
        drop(probe);
    }
    let first = bound(addr, backlog, true)?;
    // The group's port: the one the kernel picked when `addr` names port 0.
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bound(addr, backlog, true)?);
    }
    Ok(all)
}

/// A nonblocking listening socket on `addr`, in an SO_REUSEPORT group if `reuseport`.
fn bound(addr: SocketAddr, backlog: u32, reuseport: bool) -> io::Result<std::net::TcpListener> {
    let s = socket(addr, reuseport)?;
    s.bind(&addr.into()).map_err(|e| bind_error(e, addr))?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

fn socket(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

fn bind_error(e: io::Error, addr: SocketAddr) -> io::Error {
    if e.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        io::Error::new(
            e.kind(),
            format!(
                "{e}: port {} is below 1024, which needs CAP_NET_BIND_SERVICE or \
                 net.ipv4.ip_unprivileged_port_start at most {} in this network namespace \
                 (the pod's init container, EGRESS_ROUTER_MODE=dns-proxy, sets it to 0)",
                addr.port(),
                addr.port()
            ),
        )
    } else {
        e
    }
}

/// Raises the soft open-files limit to the hard one: every proxied connection holds two
/// sockets (and, when the DNS proxy splices, two pipes).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Descriptors kept out of a [`Budget`] for everything but the connections: the metrics
/// server's connections, the resolver's sockets, log files.
const SPARE_FDS: u64 = 16;

/// How many connections a proxy holds at once: as many as its open-files limit has room for,
/// each taking `per_connection` descriptors, after those open now and `reserved` (a pipe pool's)
/// and [`SPARE_FDS`]. Accepting beyond it would hand the descriptor an accepted connection
/// needs for its upstream to yet another client: each would wait for one that never frees (the
/// waiting ones do not read their clients, so closed ones go unnoticed) until their connect
/// timeouts. HAProxy derives its maxconn from the limit the same way.
pub struct Budget {
    permits: Arc<Semaphore>,
    connections: u64,
    per_connection: u64,
    limit: u64,
}

impl Budget {
    /// The budget of this process's soft open-files limit, as it stands now.
    pub fn of_fd_limit(per_connection: u64, reserved: u64) -> Budget {
        use nix::sys::resource::{Resource, getrlimit};
        let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        let open = std::fs::read_dir("/proc/self/fd").map_or(SPARE_FDS, |d| d.count() as u64);
        let connections = (limit.saturating_sub(open + reserved + SPARE_FDS) / per_connection)
            .clamp(1, Semaphore::MAX_PERMITS as u64);
        Budget {
            permits: Arc::new(Semaphore::new(connections as usize)),
            connections,
            per_connection,
            limit,
        }
    }

    /// How many connections it allows.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// A connection's share, held for as long as it is open. When none is left, says why
    /// through `log` (at most once per its interval) and waits: new connections wait in the
    /// backlog meanwhile.
    pub async fn take(&self, log: &RateLimit, what: &str, port: u16) -> OwnedSemaphorePermit {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return p;
        }
        if let Some(suppressed) = log.check() {
            let (n, per) = (self.connections, self.per_connection);
            warn!(
                port,
                suppressed,
                "{what} cannot accept: {}",
                files_exhausted(
                    self.limit,
                    &format!(", {n} connections of {per} descriptors each")
                )
            );
        }
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

/// The next connection on `listener`. A failed accept is retried after 50 ms, so a shortage
/// neither spins nor drops anything: connections wait in the backlog and are taken as soon as
/// descriptors free up. The failure is logged through `log` (at most once per its interval).
pub async fn accept(
    listener: &TcpListener,
    log: &RateLimit,
    what: &str,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(ok) => return ok,
            Err(e) => {
                if let Some(suppressed) = log.check() {
                    let port = listener.local_addr().map_or(0, |a| a.port());
                    warn!(port, error = %e, suppressed, "{what} cannot accept: {}", why(&e));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn why(e: &std::io::Error) -> String {
    use nix::sys::resource::{Resource, getrlimit};
    match e.raw_os_error() {
        Some(libc::EMFILE) => files_exhausted(
            getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft),
            "",
        ),
        Some(libc::ENFILE) => "the system-wide open-files limit (fs.file-max) is reached; new \
             connections wait in the backlog"
            .to_string(),
        Some(libc::ENOBUFS | libc::ENOMEM) => {
            "out of memory for sockets; new connections wait in the backlog".to_string()
        }
        _ => "retrying".to_string(),
    }
}

/// What the proxies say at their open-files limit (`limit`), the budget or the kernel telling
/// them, with `detail` after the limit.
fn files_exhausted(limit: u64, detail: &str) -> String {
    format!(
        "this process has all the files it may open (its open-files limit, {limit}){detail}; new \
         connections wait in the backlog until open ones close (raise the container's nofile \
         limit to serve more at once)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_tcp_nodelay() {
        let l = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// The sockets of a group share one port (the kernel's pick for port 0), and connections to
    /// it reach each of them.
    #[tokio::test]
    async fn a_group_shares_one_port_and_every_socket_accepts() {
        let group = listen_each("127.0.0.1:0".parse().unwrap(), 64, 3).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let listeners: Vec<TcpListener> = group
            .into_iter()
            .map(|l| TcpListener::from_std(l).unwrap())
            .collect();
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
        // 60 connections from as many source ports: a socket the kernel never chose would be
        // a 1 in 10^10 draw.
        let clients: Vec<TcpStream> =
            futures::future::try_join_all((0..60).map(|_| TcpStream::connect(addr)))
                .await
                .unwrap();
        let mut accepted = Vec::new();
        for l in &listeners {
            let mut n = 0;
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), l.accept()).await
            {
                n += 1;
            }
            accepted.push(n);
        }
        assert_eq!(
            accepted.iter().sum::<usize>(),
            clients.len(),
            "{accepted:?}"
        );
        assert!(accepted.iter().all(|&n| n > 0), "{accepted:?}");
    }

    /// A port something listens on already is refused, by one listener or a group, even when
    /// that something is a group of the same user (which SO_REUSEPORT alone would let share it).
    #[tokio::test]
    async fn a_port_in_use_is_refused_even_by_a_group_of_the_same_user() {
        let first = listen_each("127.0.0.1:0".parse().unwrap(), 16, 2).unwrap();
        let addr = first[0].local_addr().unwrap();
        for n in [1, 2, 4] {
            let e = listen_each(addr, 16, n).expect_err("bound a port in use");
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{n} sockets: {e}");
        }
        let plain = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let e = listen_each(plain.local_addr().unwrap(), 16, 2).expect_err("bound a port in use");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    }
}
