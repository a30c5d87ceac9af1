//! Small rtnetlink helpers used by the harness and by tests that inspect what egress-router set
//! up. Each takes a [`Handle`] connected to the namespace of interest (see [`Netns::netlink`]).
//!
//! [`Netns::netlink`]: crate::Netns::netlink
use std::{net::Ipv4Addr, os::fd::RawFd};

use anyhow::{Context as _, Result, anyhow};
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage, MacVlanMode},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope},
};
use rtnetlink::{Handle, LinkMacVlan, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

/// The errno of a netlink error reply, if that is what `e` is.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Turns "operation not supported" on link creation into a message naming the kernel feature.
fn link_kind_error(e: rtnetlink::Error, kind: &str, config: &str) -> anyhow::Error {
    if errno(&e) == Some(libc::EOPNOTSUPP) {
        anyhow!(
            "the kernel has no {kind} support ({config}; `modprobe {kind}` if it is a module): {e}"
        )
    } else {
        anyhow!("creating a {kind} interface: {e}")
    }
}

pub async fn link(h: &Handle, name: &str) -> Result<LinkMessage> {
    h.link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("interface {name} not found"))?
        .with_context(|| format!("interface {name} not found"))
}

pub async fn link_index(h: &Handle, name: &str) -> Result<u32> {
    Ok(link(h, name).await?.header.index)
}

pub async fn link_mac(h: &Handle, name: &str) -> Result<[u8; 6]> {
    link(h, name)
        .await?
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
            _ => None,
        })
        .with_context(|| format!("interface {name} has no MAC address"))
}

/// Whether the interface is administratively up.
pub async fn link_is_up(h: &Handle, name: &str) -> Result<bool> {
    Ok(link(h, name).await?.header.flags.contains(LinkFlags::Up))
}

pub async fn set_up(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("bringing up interface {index}"))
}

/// Adds an IPv4 address; an identical address already present is fine.
pub async fn add_addr(h: &Handle, index: u32, addr: Ipv4Net) -> Result<()> {
    h.address()
        .add(index, addr.addr().into(), addr.prefix_len())
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding {addr} to interface {index}"))
}

/// The IPv4 addresses of an interface.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<Ipv4Net>> {
    let msgs: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .context("listing addresses")?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(std::net::IpAddr::V4(ip)) => {
                    Ipv4Net::new(*ip, m.header.prefix_len).ok()
                }
                _ => None,
            })
        })
        .collect())
}

/// Adds or replaces a route to `dst` out of `index`, via `gateway` if given (scope link
/// without one).
pub async fn replace_route(
    h: &Handle,
    dst: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    index: u32,
) -> Result<()> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(index);
    b = match gateway {
        Some(gw) => b.gateway(gw),
        None => b.scope(RouteScope::Link),
    };
    h.route()
        .add(b.build())
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding route {dst} via {gateway:?} dev {index}"))
}

/// An IPv4 route of the main table, simplified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
    pub priority: u32,
}

/// The IPv4 routes of the main table.
pub async fn routes(h: &Handle) -> Result<Vec<Route>> {
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .context("listing routes")?;
    Ok(msgs.iter().filter_map(route_of).collect())
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut table = m.header.table as u32;
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let (mut gateway, mut oif, mut priority) = (None, None, 0);
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    if table != RouteHeader::RT_TABLE_MAIN as u32 {
        return None;
    }
    Some(Route {
        dst: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
        gateway,
        oif,
        scope: m.header.scope,
        priority,
    })
}

/// Creates a veth pair: `name` in the handle's namespace, `peer` in the namespace `peer_ns`.
pub async fn add_veth(h: &Handle, name: &str, peer: &str, peer_ns: RawFd) -> Result<()> {
    let peer_msg = LinkUnspec::new_with_name(peer).setns_by_fd(peer_ns).build();
    let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(name.to_string())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| link_kind_error(e, "veth", "CONFIG_VETH"))
}

/// Creates a bridge-mode macvlan `name` on the interface `lower`.
pub async fn add_macvlan(h: &Handle, name: &str, lower: u32) -> Result<u32> {
    h.link()
        .add(LinkMacVlan::new(name, lower, MacVlanMode::Bridge).build())
        .execute()
        .await
        .map_err(|e| link_kind_error(e, "macvlan", "CONFIG_MACVLAN"))?;
    link_index(h, name).await
}

/// Moves an interface into the namespace `ns`.
pub async fn move_link(h: &Handle, index: u32, ns: RawFd) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).setns_by_fd(ns).build())
        .execute()
        .await
        .with_context(|| format!("moving interface {index} to another namespace"))
}
