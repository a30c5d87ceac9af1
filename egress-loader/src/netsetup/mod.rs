//! macvlan0 setup (SPEC section 2) and the forwarding sysctls of redirect mode.
//!
//! [`apply`] checks everything it can first (the interface exists and has an Ethernet address,
//! the process holds CAP_NET_ADMIN and CAP_NET_RAW, a packet socket opens), then, over rtnetlink:
//! adds EGRESS_SOURCE with its prefix, brings the link up, adds a /32 route to the gateway on the
//! interface and replaces the default route by one via the gateway on it. Last it announces the
//! address: an unsolicited ARP reply at once, a gratuitous ARP request about 2 s later from a
//! background thread ([`wait_for_announcements`] waits for it before a short-lived process exits).
//!
//! Everything is idempotent: a restarted container in the same network namespace finds the
//! address and routes in place and carries on.
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, anyhow, bail};
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags},
    route::RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info};

use crate::config::Config;

mod garp;
mod sysctl;

pub use garp::{ANNOUNCE_DELAY, arp_frame, wait_for_announcements};
pub use sysctl::{allow_unprivileged_ports, enable_forwarding};

/// The first IPv4 address of `iface` in this network namespace (None when it has none, or does
/// not exist); needs no privilege.
pub fn interface_ipv4(iface: &str) -> Result<Option<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing the interface addresses")?;
    Ok(addrs
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip())))
}

/// Whether any interface of this network namespace has `addr`; needs no privilege.
pub fn has_address(addr: Ipv4Addr) -> Result<bool> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing the interface addresses")?;
    Ok(addrs
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .any(|a| a == addr))
}

/// What [`apply`] sets up on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Wanted {
    /// EGRESS_SOURCE with the prefix it is added with.
    source: Ipv4Net,
    gateway: Ipv4Addr,
}

/// Sets up `macvlan` (normally `macvlan0`) from EGRESS_SOURCE and EGRESS_GATEWAY, in the calling
/// thread's network namespace. Safe to run again on an interface already set up.
pub fn apply(cfg: &Config, macvlan: &str) -> Result<()> {
    let want = Wanted {
        source: Ipv4Net::new(cfg.source.addr, cfg.source.net.prefix_len())
            .context("EGRESS_SOURCE prefix")?,
        gateway: cfg.gateway,
    };
    // Network namespaces are per thread; a thread started here inherits this one's, whoever
    // calls us, and gets a runtime of its own even if the caller already runs inside one.
    let announcer = std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the netlink runtime")?
                .block_on(configure(macvlan, want))
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })?;
    garp::announce(announcer);
    Ok(())
}

async fn configure(iface: &str, want: Wanted) -> Result<garp::Announcer> {
    let (conn, h, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    let conn = tokio::spawn(conn);
    let out = configure_with(&h, iface, want).await;
    conn.abort();
    out
}

async fn configure_with(h: &Handle, iface: &str, want: Wanted) -> Result<garp::Announcer> {
    // Checks first: nothing is changed unless all of them pass.
    let (index, mac) = find_link(h, iface).await?;
    check_capabilities()?;
    let announcer = garp::Announcer::open(iface, index, mac, want.source.addr())?;

    ensure_address(h, iface, index, want.source).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("bringing {iface} up"))?;
    let gw_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(want.gateway, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    h.route()
        .add(gw_route)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding the route {}/32 dev {iface}", want.gateway))?;
    // Replace, not add: the pod already has a default route (on eth0).
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(want.gateway)
        .output_interface(index)
        .build();
    h.route()
        .add(default)
        .replace()
        .execute()
        .await
        .with_context(|| {
            format!(
                "replacing the default route by one via {} dev {iface}",
                want.gateway
            )
        })?;
    info!(
        interface = iface,
        address = %want.source,
        gateway = %want.gateway,
        "interface set up: address, link up, /32 route to the gateway, default route via it"
    );
    Ok(announcer)
}

/// The interface's index and MAC address, or an error that says it is missing.
async fn find_link(h: &Handle, iface: &str) -> Result<(u32, [u8; 6])> {
    let link = match h
        .link()
        .get()
        .match_name(iface.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(Some(link)) => link,
        Ok(None) => bail!("interface {iface} not found: the kernel returned no such link"),
        Err(e) if errno(&e) == Some(libc::ENODEV) => bail!(
            "interface {iface} not found: there is no such interface in this network namespace \
             (the egress router pod needs the macvlan interface its network plugin adds; \
             EGRESS_MACVLAN_INTERFACE names another)"
        ),
        Err(e) => return Err(anyhow!(e).context(format!("looking up interface {iface}"))),
    };
    let mac = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        })
        .with_context(|| format!("interface {iface} has no Ethernet address"))?;
    if link.header.flags.contains(LinkFlags::Loopback) {
        bail!("interface {iface} is a loopback interface, not the macvlan interface");
    }
    Ok((link.header.index, mac))
}

/// Adds the address unless it is there; removes the same address with another prefix (left by
/// an earlier run with a different EGRESS_SOURCE prefix).
async fn ensure_address(h: &Handle, iface: &str, index: u32, source: Ipv4Net) -> Result<()> {
    let present: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("listing the addresses of {iface}"))?;
    let same_ip: Vec<&AddressMessage> = present
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter(|m| {
            m.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Local(std::net::IpAddr::V4(ip)) if *ip == source.addr())
            })
        })
        .collect();
    if same_ip
        .iter()
        .any(|m| m.header.prefix_len == source.prefix_len())
    {
        debug!(interface = iface, address = %source, "address already present");
    } else {
        match h
            .address()
            .add(index, source.addr().into(), source.prefix_len())
            .execute()
            .await
        {
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            r => r.with_context(|| format!("adding {source} to {iface}"))?,
        }
    }
    for stale in same_ip
        .into_iter()
        .filter(|m| m.header.prefix_len != source.prefix_len())
    {
        info!(
            interface = iface,
            address = %source.addr(),
            old_prefix = stale.header.prefix_len,
            "removing the address with the prefix of an earlier configuration"
        );
        h.address()
            .del(stale.clone())
            .execute()
            .await
            .with_context(|| {
                format!(
                    "removing {}/{} from {iface}",
                    source.addr(),
                    stale.header.prefix_len
                )
            })?;
    }
    Ok(())
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

/// Fails, naming them, if the effective capabilities lack CAP_NET_ADMIN (addresses, routes,
/// links) or CAP_NET_RAW (the ARP announcements). Skipped if /proc cannot tell.
fn check_capabilities() -> Result<()> {
    let Some(eff) = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .as_deref()
        .and_then(effective_capabilities)
    else {
        return Ok(());
    };
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_NET_RAW, "CAP_NET_RAW"),
    ]
    .into_iter()
    .filter(|(bit, _)| eff & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        bail!(
            "missing privilege: setting up the macvlan interface needs CAP_NET_ADMIN and \
             CAP_NET_RAW, and this process lacks {} (run as root, or add them to the \
             container's securityContext.capabilities)",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// The CapEff mask of a /proc/<pid>/status text.
fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x3000));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }
}
