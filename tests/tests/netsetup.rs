//! macvlan0 setup (egress_router::netsetup) in the router namespace of the reference topology:
//! address, link, routes, idempotence, reachability from EGRESS_SOURCE, the gratuitous ARPs seen
//! from the gateway's side, forwarding sysctls, and the errors for a missing interface or
//! privilege (with nothing applied).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use egress_router::{config::Config, netsetup};
use egress_tests::{
    ARP_REPLY, ARP_REQUEST, Arp, DEST_IP, EGRESS_SOURCE, GATEWAY_IP, LAN_IF, MACVLAN, Netns,
    Topology, netlink, tcp_roundtrip,
};
use ipnet::Ipv4Net;

const T: Duration = Duration::from_secs(5);

fn config(source: &str) -> Config {
    let vars: BTreeMap<String, String> = [
        ("EGRESS_SOURCE", source),
        ("EGRESS_GATEWAY", "192.168.12.1"),
        ("EGRESS_DESTINATION", "80 tcp 203.0.113.25"),
        ("EGRESS_ROUTER_MODE", "init"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    egress_router::config::parse(&vars).unwrap()
}

fn apply(ns: &Netns, source: &str, iface: &str) -> anyhow::Result<()> {
    let cfg = config(source);
    ns.run(|| netsetup::apply(&cfg, iface))
}

/// What the router namespace looks like: macvlan0's addresses and state, all main-table routes.
#[derive(Debug, PartialEq)]
struct State {
    macvlan_index: u32,
    addrs: Vec<Ipv4Net>,
    up: bool,
    routes: Vec<netlink::Route>,
}

fn state(ns: &Netns) -> State {
    ns.netlink(|h| async move {
        let idx = netlink::link_index(&h, MACVLAN).await?;
        Ok(State {
            macvlan_index: idx,
            addrs: netlink::addresses(&h, idx).await?,
            up: netlink::link_is_up(&h, MACVLAN).await?,
            routes: netlink::routes(&h).await?,
        })
    })
    .unwrap()
}

fn assert_set_up(s: &State, source: Ipv4Net) {
    assert_eq!(s.addrs, vec![source], "{s:#?}");
    assert!(s.up, "{s:#?}");
    let gw = Ipv4Net::new(GATEWAY_IP, 32).unwrap();
    assert!(
        s.routes.iter().any(|r| r.dst == gw
            && r.gateway.is_none()
            && r.oif == Some(s.macvlan_index)
            && r.scope == netlink_packet_route::route::RouteScope::Link),
        "no /32 route to the gateway on macvlan0: {s:#?}"
    );
    let defaults: Vec<_> = s
        .routes
        .iter()
        .filter(|r| r.dst.prefix_len() == 0)
        .collect();
    assert_eq!(
        defaults.len(),
        1,
        "the eth0 default route must be replaced: {s:#?}"
    );
    assert_eq!(defaults[0].gateway, Some(GATEWAY_IP));
    assert_eq!(defaults[0].oif, Some(s.macvlan_index));
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddrV4::new(ip, port).into()
}

/// The router reaches the gateway and the destination, which sees EGRESS_SOURCE.
fn assert_reaches_dest_as_egress_source(topo: &Topology) {
    topo.router.ping(GATEWAY_IP, T).unwrap();
    let server = topo.dest.tcp_echo(sa(DEST_IP, 80)).unwrap();
    let conn = topo.router.tcp_connect(server.addr(), T).unwrap();
    assert_eq!(tcp_roundtrip(conn, b"ping", T).unwrap(), b"ping");
    assert_eq!(server.wait_for_peers(1, T).unwrap()[0].ip(), EGRESS_SOURCE);
}

#[test]
fn sets_up_macvlan0_idempotently() {
    let topo = Topology::new().unwrap();
    let source: Ipv4Net = "192.168.12.99/24".parse().unwrap();
    apply(&topo.router, "192.168.12.99/24", MACVLAN).unwrap();
    let first = state(&topo.router);
    assert_set_up(&first, source);
    assert_reaches_dest_as_egress_source(&topo);

    // A restarted container in the same namespace finds everything in place.
    apply(&topo.router, "192.168.12.99/24", MACVLAN).unwrap();
    let second = state(&topo.router);
    assert_eq!(first, second);
    assert_reaches_dest_as_egress_source(&topo);
}

#[test]
fn bare_source_is_a_host_address_and_a_changed_prefix_replaces_the_old_one() {
    let topo = Topology::new().unwrap();
    apply(&topo.router, "192.168.12.99/24", MACVLAN).unwrap();
    // Restarted with EGRESS_SOURCE without a prefix: /32, the /24 goes.
    apply(&topo.router, "192.168.12.99", MACVLAN).unwrap();
    let s = state(&topo.router);
    assert_set_up(&s, "192.168.12.99/32".parse().unwrap());
    // No connected /24 any more: the gateway is reached through the /32 route alone.
    assert!(
        !s.routes
            .iter()
            .any(|r| r.dst.prefix_len() == 24 && r.oif == Some(s.macvlan_index))
    );
    assert_reaches_dest_as_egress_source(&topo);
}

#[test]
fn works_when_called_inside_a_tokio_runtime() {
    let topo = Topology::new().unwrap();
    let cfg = config("192.168.12.99/24");
    topo.router
        .block_on(|| async { netsetup::apply(&cfg, MACVLAN) })
        .unwrap();
    assert_set_up(&state(&topo.router), "192.168.12.99/24".parse().unwrap());
}

fn is_announcement(a: &Arp) -> bool {
    a.is_gratuitous() && a.sender_ip == EGRESS_SOURCE
}

#[test]
fn announces_egress_source_with_gratuitous_arp() {
    let topo = Topology::new().unwrap();
    let mac = topo.router.mac(MACVLAN).unwrap();
    let capture = topo.lan.capture(LAN_IF, libc::ETH_P_ARP as u16).unwrap();

    let start = Instant::now();
    apply(&topo.router, "192.168.12.99/24", MACVLAN).unwrap();
    let setup_time = start.elapsed();
    assert!(
        setup_time < Duration::from_secs(1),
        "setup waited for the delayed announcement: {setup_time:?}"
    );

    let seen = capture.arp_until(Duration::from_secs(6), |a| {
        is_announcement(a) && a.op == ARP_REQUEST
    });
    let ours: Vec<&Arp> = seen.iter().filter(|a| is_announcement(a)).collect();
    assert_eq!(ours.len(), 2, "{seen:#?}");
    let (reply, request) = (ours[0], ours[1]);

    for a in [reply, request] {
        assert_eq!(a.eth_dst, [0xff; 6], "broadcast: {a:?}");
        assert_eq!(a.eth_src, mac);
        assert_eq!(a.sender_mac, mac);
        assert_eq!(a.sender_ip, EGRESS_SOURCE);
        assert_eq!(a.target_ip, EGRESS_SOURCE);
    }
    assert_eq!(reply.op, ARP_REPLY);
    assert_eq!(reply.target_mac, mac);
    assert!(
        reply.at - start < Duration::from_secs(1),
        "reply late: {:?}",
        reply.at - start
    );
    assert_eq!(request.op, ARP_REQUEST);
    assert_eq!(request.target_mac, [0; 6]);
    let gap = request.at - reply.at;
    assert!(
        gap >= Duration::from_millis(1500) && gap <= Duration::from_millis(3500),
        "request {gap:?} after the reply, expected about 2 s"
    );
}

#[test]
fn missing_interface_is_a_clear_error_and_changes_nothing() {
    let topo = Topology::new().unwrap();
    let before = state(&topo.router);
    let err = apply(&topo.router, "192.168.12.99/24", "macvlan7").unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("error: {msg}");
    assert!(msg.starts_with("interface macvlan7 not found: "), "{msg}");
    assert_eq!(state(&topo.router), before);
}

/// Linux capability sets of one thread (capget/capset, version 3).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops capabilities from the calling thread's effective set (the process keeps them).
fn drop_effective_caps(caps: &[u32]) {
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data structs, as version 3 expects.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()),
            0
        );
        for c in caps {
            data[(*c / 32) as usize].effective &= !(1 << (c % 32));
        }
        assert_eq!(libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()), 0);
    }
}

#[test]
fn missing_privilege_is_a_clear_error_and_changes_nothing() {
    let topo = Topology::new().unwrap();
    let before = state(&topo.router);
    let cfg = config("192.168.12.99/24");
    for (caps, name) in [(&[12u32][..], "CAP_NET_ADMIN"), (&[13], "CAP_NET_RAW")] {
        let err = topo
            .router
            .run(|| {
                drop_effective_caps(caps);
                netsetup::apply(&cfg, MACVLAN)
            })
            .unwrap_err();
        let msg = format!("{err:#}");
        eprintln!("error: {msg}");
        assert!(
            msg.contains("missing privilege") && msg.contains(name),
            "{msg}"
        );
        assert_eq!(state(&topo.router), before);
    }
}

#[test]
fn forwarding_sysctls() {
    let topo = Topology::new().unwrap();
    let r = &topo.router;
    // A new namespace inherits the host's IPv4 settings, and the host may forward already
    // (podman turns it on): start from forwarding off, so that turning it on is what is tested.
    r.set_sysctl("net.ipv4.ip_forward", "0").unwrap();
    assert_eq!(
        r.sysctl("net.ipv4.conf.eth0.forwarding").unwrap().trim(),
        "0"
    );
    r.set_sysctl("net.ipv4.conf.all.rp_filter", "1").unwrap();
    r.set_sysctl("net.ipv4.conf.eth0.rp_filter", "1").unwrap();
    r.set_sysctl("net.ipv4.conf.macvlan0.rp_filter", "0")
        .unwrap();
    for _ in 0..2 {
        r.run(netsetup::enable_forwarding).unwrap();
        for (key, want) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.forwarding", "1"),
            ("net.ipv4.conf.eth0.forwarding", "1"),
            ("net.ipv4.conf.macvlan0.forwarding", "1"),
            ("net.ipv4.conf.all.accept_local", "1"),
            ("net.ipv4.conf.all.rp_filter", "2"),
            ("net.ipv4.conf.eth0.rp_filter", "2"),
            ("net.ipv4.conf.macvlan0.rp_filter", "0"),
        ] {
            assert_eq!(r.sysctl(key).unwrap(), want, "{key}");
        }
    }
    // Only the router namespace changed.
    assert_eq!(topo.client.sysctl("net.ipv4.ip_forward").unwrap(), "0");
}
