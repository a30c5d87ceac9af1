//! Listening sockets of the proxies, and the open-files limit they need.
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// A listening TCP socket on `addr` (SO_REUSEADDR, so a restarted proxy binds at once).
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
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
