//! Outgoing connections of the proxies: from EGRESS_SOURCE, with a connect timeout.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

/// Connects to `to`, bound to `source` (port chosen by the kernel) when given.
pub async fn connect(
    source: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = source.filter(|s| s.is_ipv4() == to.is_ipv4()) {
        // Pick the source port at connect time, per destination: bound first, every outgoing
        // connection of the router would share one pool of ephemeral ports.
        if to.is_ipv4() {
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(io::Error::from)?;
        }
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(to)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {to} timed out after {timeout:?}"),
        )),
    }
}
