//! Integration-test harness: the reference topology of SPEC section 7 in network namespaces.
//!
//! ```text
//! client ns  c0 10.128.0.10/24 ── veth ── router ns eth0 10.128.0.5/24 (pod IP)
//! router ns  macvlan0 (bridge mode on ens0 of the node ns, moved in; down, no address)
//! node ns    ens0 ── veth ── lan ns lan0 192.168.12.1/24 (EGRESS_GATEWAY)
//! lan ns     d0 203.0.113.1/24 ── veth ── dest ns d1 203.0.113.25/24 (destination servers)
//! ```
//!
//! Routes: client default via 10.128.0.5; router default via 10.128.0.1 on eth0 (like a pod's,
//! so that egress-router has one to replace); dest default via 203.0.113.1; lan forwards and
//! reaches both its subnets directly. `macvlan0` is left for egress-router's own setup;
//! [`Topology::configure_macvlan`] does the same for tests that do not run it.
//!
//! The harness has a bpffs on /sys/fs/bpf, as a node does: a router started with
//! [`Netns::spawn`] shares it (setns only: it also shares the harness's mount namespace), one
//! started with [`Netns::spawn_container`] does not (a container without it), and one started
//! with [`Netns::spawn_with_host_bpffs`] has it bind-mounted into a mount namespace of its own
//! (a pod that mounts the host's /sys/fs/bpf, as a runtime runs it).
//!
//! Every topology gets uniquely named namespaces (`er-<pid>-<n>-<role>`, visible with
//! `ip netns`), so tests run in parallel. Dropping it (also while unwinding from a panic) kills the
//! processes started in it and removes its namespaces. Needs root; fails loudly otherwise.
use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

mod bpffs;
mod capture;
pub mod netlink;
mod netns;
pub mod pod;
pub mod podman;
mod proc;
mod router;
mod servers;

pub use bpffs::{
    DEFAULT_PIN_ROOT, HOST_BPFFS, NodeBpffs, PinDir, ensure_host_bpffs, is_bpffs, kernel_has_tcx,
    pinned_link_ifindex,
};
pub use capture::{ARP_REPLY, ARP_REQUEST, Arp, Capture};
pub use netns::{
    NAME_PREFIX, NETNS_DIR, Netns, list_harness_namespaces, remove_stale, require_root,
};
pub use proc::Proc;
pub use router::{router_bin, router_command, router_command_of, unprivileged_command};
pub use servers::{
    EchoServer, IcmpError, checksum, ping, ping_error, ping_with, send_udp_fragments,
    tcp_roundtrip, udp_roundtrip,
};

/// The client pod.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 10);
/// The router pod's IP on eth0.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 5);
/// The cluster network's (absent) gateway: the router pod's default route before setup.
pub const CLUSTER_GW: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);
/// Prefix length of the cluster network.
pub const CLUSTER_PREFIX: u8 = 24;
/// EGRESS_SOURCE (the address destination servers must see).
pub const EGRESS_SOURCE: Ipv4Addr = Ipv4Addr::new(192, 168, 12, 99);
/// EGRESS_SOURCE with the prefix the tests use: `EGRESS_SOURCE=192.168.12.99/24`.
pub const EGRESS_PREFIX: u8 = 24;
/// EGRESS_GATEWAY: lan0 in the lan namespace.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 12, 1);
/// lan's side of the destination network.
pub const LAN_DEST_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The destination server.
pub const DEST_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 25);
/// Prefix length of the destination network.
pub const DEST_PREFIX: u8 = 24;

/// Interface names.
pub const CLIENT_IF: &str = "c0";
pub const ROUTER_ETH0: &str = "eth0";
pub const MACVLAN: &str = "macvlan0";
pub const NODE_IF: &str = "ens0";
pub const LAN_IF: &str = "lan0";
pub const LAN_DEST_IF: &str = "d0";
pub const DEST_IF: &str = "d1";

fn net(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
    Ipv4Net::new(addr, prefix).expect("valid prefix")
}

/// The SPEC section 7 topology. Field order is drop order: the namespaces go away in turn, and
/// with them their processes and interfaces.
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub router: Netns,
    pub node: Netns,
    pub lan: Netns,
    pub dest: Netns,
    /// Extra namespaces made with [`Topology::add_netns`].
    pub extra: Vec<Netns>,
    prefix: String,
}

impl Topology {
    /// Builds the whole topology. Fails (never skips) when not root or when the kernel lacks
    /// something it needs (network namespaces, veth, macvlan), naming what is missing. Makes
    /// sure the harness has a bpffs on /sys/fs/bpf, as a node does ([`ensure_host_bpffs`]).
    pub fn new() -> Result<Topology> {
        require_root()?;
        Topology::around(None)
    }

    /// The topology with an existing network namespace as the router pod's (a pod that podman
    /// made with `--network none`): the same interfaces are built into it.
    pub fn with_router(router: &std::path::Path) -> Result<Topology> {
        require_root()?;
        Topology::around(Some(router))
    }

    fn around(router: Option<&std::path::Path>) -> Result<Topology> {
        ensure_host_bpffs();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "{NAME_PREFIX}{}-{}-",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns = |role: &str| Netns::create(&format!("{prefix}{role}"));
        let router = match router {
            Some(path) => Netns::adopt(&format!("{prefix}router"), path)?,
            None => ns("router")?,
        };
        let topo = Topology {
            client: ns("client")?,
            router,
            node: ns("node")?,
            lan: ns("lan")?,
            dest: ns("dest")?,
            extra: Vec::new(),
            prefix,
        };
        topo.build().context("building the test topology")?;
        Ok(topo)
    }

    fn build(&self) -> Result<()> {
        for ns in self.all() {
            ns.link_up("lo")?;
        }
        // client <-> router (the cluster network).
        self.client
            .add_veth_to(CLIENT_IF, &self.router, ROUTER_ETH0)?;
        self.client
            .add_addr(CLIENT_IF, net(CLIENT_IP, CLUSTER_PREFIX))?;
        self.router
            .add_addr(ROUTER_ETH0, net(POD_IP, CLUSTER_PREFIX))?;
        self.client
            .add_route(Ipv4Net::default(), Some(POD_IP), CLIENT_IF)?;
        self.router
            .add_route(Ipv4Net::default(), Some(CLUSTER_GW), ROUTER_ETH0)?;
        // node <-> lan (the physical network), and the macvlan the network plugin would make.
        self.node.add_veth_to(NODE_IF, &self.lan, LAN_IF)?;
        self.lan.add_addr(LAN_IF, net(GATEWAY_IP, EGRESS_PREFIX))?;
        let router_fd = std::os::fd::AsRawFd::as_raw_fd(&self.router.fd());
        self.node
            .netlink(|h| async move {
                let lower = netlink::link_index(&h, NODE_IF).await?;
                let mv = netlink::add_macvlan(&h, MACVLAN, lower).await?;
                netlink::move_link(&h, mv, router_fd).await
            })
            .context("creating macvlan0 on ens0 and moving it into the router namespace")?;
        // lan <-> dest.
        self.lan.add_veth_to(LAN_DEST_IF, &self.dest, DEST_IF)?;
        self.lan
            .add_addr(LAN_DEST_IF, net(LAN_DEST_GW, DEST_PREFIX))?;
        self.dest.add_addr(DEST_IF, net(DEST_IP, DEST_PREFIX))?;
        self.dest
            .add_route(Ipv4Net::default(), Some(LAN_DEST_GW), DEST_IF)?;
        self.lan.set_sysctl("net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    /// The five namespaces of the reference topology.
    pub fn all(&self) -> [&Netns; 5] {
        [
            &self.client,
            &self.router,
            &self.node,
            &self.lan,
            &self.dest,
        ]
    }

    /// Every namespace name of this topology, extra ones included.
    pub fn names(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .chain(&self.extra)
            .map(|n| n.name().to_string())
            .collect()
    }

    /// The name prefix shared by this topology's namespaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Adds an empty namespace (lo up) that lives and dies with the topology (kept in
    /// [`Topology::extra`]). Wire it with [`Netns::add_veth_to`].
    pub fn add_netns(&mut self, role: &str) -> Result<&Netns> {
        let ns = Netns::create(&format!("{}{role}", self.prefix))?;
        ns.link_up("lo")?;
        self.extra.push(ns);
        Ok(self.extra.last().unwrap())
    }

    /// Adds another client: a namespace with `c0` = `ip`/24 on a veth whose other end,
    /// `router_if`, sits in the router namespace (unaddressed), default route via the pod IP.
    /// For a second client on the same cluster subnet, give `router_if` a /32 route there:
    /// `topo.router.add_route("10.128.0.11/32".parse()?, None, router_if)`.
    pub fn add_client(&mut self, role: &str, ip: Ipv4Addr, router_if: &str) -> Result<&Netns> {
        let ns = Netns::create(&format!("{}{role}", self.prefix))?;
        ns.link_up("lo")?;
        ns.add_veth_to(CLIENT_IF, &self.router, router_if)?;
        ns.add_addr(CLIENT_IF, net(ip, 32))?;
        ns.add_route(net(POD_IP, 32), None, CLIENT_IF)?;
        ns.add_route(Ipv4Net::default(), Some(POD_IP), CLIENT_IF)?;
        self.router.add_route(net(ip, 32), None, router_if)?;
        self.extra.push(ns);
        Ok(self.extra.last().unwrap())
    }

    /// Configures macvlan0 the way egress-router's setup does, for tests that do not run it:
    /// EGRESS_SOURCE/24 on macvlan0, link up, a /32 route to the gateway and the default route
    /// replaced by one via the gateway on macvlan0. Forwarding sysctls are left alone.
    pub fn configure_macvlan(&self) -> Result<()> {
        self.router
            .netlink(|h| async move {
                let idx = netlink::link_index(&h, MACVLAN).await?;
                netlink::add_addr(&h, idx, net(EGRESS_SOURCE, EGRESS_PREFIX)).await?;
                netlink::set_up(&h, idx).await?;
                netlink::replace_route(&h, net(GATEWAY_IP, 32), None, idx).await?;
                netlink::replace_route(&h, Ipv4Net::default(), Some(GATEWAY_IP), idx).await
            })
            .context("configuring macvlan0")
    }
}
