//! Outgoing connections of the proxies: from EGRESS_SOURCE, with a connect timeout.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

/// Why `to` cannot be reached from `source`: the firewall allow-lists EGRESS_SOURCE alone, so a
/// destination of the other address family (an IPv6 one, EGRESS_SOURCE being IPv4) is never
/// connected to from some other address of the pod.
pub fn unreachable_from(source: Option<IpAddr>, to: IpAddr) -> Option<String> {
    let src = canonical(source?);
    let to = canonical(to);
    (src.is_ipv4() != to.is_ipv4()).then(|| {
        format!(
            "{to} is an {f} address and connections leave only from EGRESS_SOURCE {src}: \
             {f} egress is not supported",
            f = family(to),
        )
    })
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Connects to `to`, bound to `source` (port chosen by the kernel) when given; refuses a
/// destination that cannot be reached from `source` ([`unreachable_from`]). `timeout` bounds
/// the whole attempt, the wait for a free descriptor included.
pub async fn connect(
    source: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    if let Some(why) = unreachable_from(source, to.ip()) {
        return Err(io::Error::new(io::ErrorKind::Unsupported, why));
    }
    let to = SocketAddr::new(canonical(to.ip()), to.port());
    match tokio::time::timeout(timeout, connect_from(source, to)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {to} timed out after {timeout:?}"),
        )),
    }
}

async fn connect_from(source: Option<IpAddr>, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = new_socket(to).await?;
    if let Some(src) = source {
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
    socket.connect(to).await
}

/// A socket for `to`. At the open-files limit (or out of socket memory) it waits for one to
/// free up, as the listeners' accept does: the client, accepted with the last descriptor,
/// waits for its upstream instead of being reset.
async fn new_socket(to: SocketAddr) -> io::Result<TcpSocket> {
    loop {
        let made = if to.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        match made {
            Err(e) if is_shortage(&e) => tokio::time::sleep(Duration::from_millis(50)).await,
            r => return r,
        }
    }
}

/// Whether `e` says the process or the system is out of descriptors or socket memory.
pub fn is_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_family_of_egress_source_is_reached() {
        let v4 = Some("192.168.12.99".parse().unwrap());
        assert_eq!(unreachable_from(v4, "203.0.113.25".parse().unwrap()), None);
        assert_eq!(
            unreachable_from(v4, "::ffff:203.0.113.25".parse().unwrap()),
            None
        );
        assert_eq!(
            unreachable_from(v4, "2001:db8::1".parse().unwrap()).as_deref(),
            Some(
                "2001:db8::1 is an IPv6 address and connections leave only from EGRESS_SOURCE \
                 192.168.12.99: IPv6 egress is not supported"
            )
        );
        assert_eq!(unreachable_from(None, "2001:db8::1".parse().unwrap()), None);
    }
}
