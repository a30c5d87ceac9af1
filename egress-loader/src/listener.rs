//! Listening sockets of the proxies, and the open-files limit they need.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::warn;

use crate::ratelimit::RateLimit;

/// A listening TCP socket on `addr` (SO_REUSEADDR, so a restarted proxy binds at once). TCP_NODELAY
/// is set on it, and every accepted connection inherits it: the proxies pass small writes on at
/// once, without a system call per connection to say so.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied && addr.port() < 1024 {
            std::io::Error::new(
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
    })?;
    socket.listen(backlog)
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
}
