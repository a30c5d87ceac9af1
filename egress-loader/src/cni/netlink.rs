//! The few netlink operations the plugin makes itself: finding the master in the host's
//! namespace, creating the macvlan straight into the pod's, and looking at or removing it there.
//! Each takes a handle opened in the namespace it acts on (a netlink socket stays in the
//! namespace it was opened in, whatever the thread does afterwards).
use std::{net::Ipv4Addr, os::fd::RawFd};

use anyhow::{Context as _, Result, anyhow};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, MacVlanMode},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
};
use rtnetlink::{Handle, LinkMacVlan, RouteMessageBuilder};

use crate::config::cni::MacvlanMode as Mode;

pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The link named `name`, None if there is none.
pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("looking up interface {name}"))),
    }
}

pub async fn link_by_index(h: &Handle, index: u32) -> Result<Option<LinkMessage>> {
    match h.link().get().match_index(index).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("looking up interface {index}"))),
    }
}

pub fn name_of(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

pub fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub fn mac_of(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) if m.len() == 6 => Some(
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        _ => None,
    })
}

/// Whether the link is a macvlan.
pub fn is_macvlan(l: &LinkMessage) -> bool {
    l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::MacVlan))),
        _ => false,
    })
}

/// The IPv4 default routes of the main table: (gateway, output interface).
pub async fn default_routes(h: &Handle) -> Result<Vec<(Option<Ipv4Addr>, Option<u32>)>> {
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .context("listing the IPv4 routes")?;
    Ok(msgs
        .iter()
        .filter(|m| {
            m.header.address_family == AddressFamily::Inet
                && m.header.destination_prefix_length == 0
                && m.header.table == RouteHeader::RT_TABLE_MAIN
        })
        .map(|m| {
            let mut gw = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            (gw, oif)
        })
        .collect())
}

/// Creates the macvlan `name` on `master` directly in the namespace `netns` (so that its name
/// is checked there, and it never appears in the host's).
pub async fn create_macvlan(
    h: &Handle,
    name: &str,
    master: u32,
    mode: Mode,
    mtu: u32,
    netns: RawFd,
) -> Result<()> {
    let mode = match mode {
        Mode::Private => MacVlanMode::Private,
        Mode::Vepa => MacVlanMode::Vepa,
        Mode::Bridge => MacVlanMode::Bridge,
        Mode::Passthru => MacVlanMode::Passthrough,
    };
    h.link()
        .add(
            LinkMacVlan::new(name, master, mode)
                .mtu(mtu)
                .setns_by_fd(netns)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| match errno(&e) {
            Some(libc::EOPNOTSUPP) => {
                anyhow!("the kernel has no macvlan support (CONFIG_MACVLAN): {e}")
            }
            Some(libc::EEXIST) => anyhow!("an interface named {name} already exists: {e}"),
            _ => anyhow!("creating the macvlan interface {name}: {e}"),
        })
}

pub async fn delete(h: &Handle, index: u32) -> Result<()> {
    match h.link().del(index).execute().await {
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        r => r.with_context(|| format!("deleting interface {index}")),
    }
}

/// Adds the default route via `gateway` on `index` unless a default route exists.
pub async fn restore_default(h: &Handle, gateway: Ipv4Addr, index: u32) -> Result<bool> {
    if !default_routes(h).await?.is_empty() {
        return Ok(false);
    }
    h.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .output_interface(index)
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("putting back the default route via {gateway}"))?;
    Ok(true)
}
