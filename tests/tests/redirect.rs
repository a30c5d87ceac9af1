//! Redirect mode end to end: the reference topology in network namespaces, egress-router run as
//! a process in the router namespace (init or legacy mode), real sockets on both sides. A
//! destination server must only ever see EGRESS_SOURCE.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use egress_tests::{
    DEST_IP, EGRESS_SOURCE, EchoServer, HOST_BPFFS, POD_IP, Proc, Topology, kernel_has_tcx, ping,
    router_bin, router_command, tcp_roundtrip, udp_roundtrip,
};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(5);

/// A topology with egress-router's pinned state in its own bpffs directory.
struct Lab {
    topo: Topology,
    bpffs: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

impl Lab {
    fn new() -> Lab {
        let topo = Topology::new().expect("building the namespace topology");
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/{}bpf", topo.prefix()));
        Lab { topo, bpffs }
    }

    fn command(&self, destination: &str, mode: &str, args: &[&str]) -> Command {
        let mut cmd = router_command(mode);
        cmd.env("EGRESS_BPFFS_DIR", &self.bpffs);
        cmd.env("EGRESS_DESTINATION", destination).args(args);
        cmd
    }

    /// Runs `egress-router` in init mode and asserts it set everything up and exited 0.
    fn init(&self, destination: &str, args: &[&str]) -> Output {
        let p = self
            .topo
            .router
            .spawn(self.command(destination, "init", args))
            .unwrap();
        Lab::succeeded(p)
    }

    /// [`Lab::init`] as a restart-safe pod runs it: in a mount namespace of its own with the
    /// harness's bpffs (the host's /sys/fs/bpf) bind-mounted at /sys/fs/bpf.
    fn init_in_pod(&self, destination: &str, args: &[&str]) -> Output {
        let p = self
            .topo
            .router
            .spawn_with_host_bpffs(
                self.command(destination, "init", args),
                Path::new(HOST_BPFFS),
            )
            .unwrap();
        Lab::succeeded(p)
    }

    fn succeeded(p: Proc) -> Output {
        let out = p.output(Duration::from_secs(30)).unwrap();
        assert!(
            out.status.success(),
            "egress-router init failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Legacy mode as a restart-safe pod runs it (see [`Lab::init_in_pod`]).
    fn legacy_in_pod(&self, destination: &str) -> Proc {
        self.topo
            .router
            .spawn_with_host_bpffs(
                self.command(destination, "legacy", &[]),
                Path::new(HOST_BPFFS),
            )
            .unwrap()
    }

    fn status(&self) -> serde_json::Value {
        let mut cmd = Command::new(router_bin());
        cmd.args(["status", "--json", "--bpffs-dir"])
            .arg(&self.bpffs)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = self.topo.router.spawn(cmd).unwrap().output(T).unwrap();
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name].as_u64().unwrap()
    }

    fn client_tcp(&self, port: u16) -> std::io::Result<TcpStream> {
        self.topo
            .client
            .run(|| TcpStream::connect_timeout(&sock(POD_IP, port), T))
    }

    fn dest_tcp_echo(&self, port: u16) -> EchoServer {
        self.topo.dest.tcp_echo(sock(DEST_IP, port)).unwrap()
    }
}

fn assert_all_from_egress_source(server: &EchoServer, n: usize) {
    let peers = server.wait_for_peers(n, T).unwrap();
    assert!(
        peers.iter().all(|p| p.ip() == EGRESS_SOURCE),
        "server saw {peers:?}"
    );
}

#[test]
fn tcp_rules_with_remote_ports_reach_the_server_from_egress_source() {
    let lab = Lab::new();
    let web = lab.dest_tcp_echo(80);
    lab.init("80 tcp 203.0.113.25\n8080 tcp 203.0.113.25 80", &[]);
    for port in [80, 8080] {
        let c = lab.client_tcp(port).expect("connect through the router");
        assert_eq!(
            c.peer_addr().unwrap(),
            sock(POD_IP, port),
            "the client talks to the pod IP"
        );
        assert_eq!(
            tcp_roundtrip(c, b"hello through eBPF", T).unwrap(),
            b"hello through eBPF"
        );
    }
    assert_all_from_egress_source(&web, 2);
    assert!(lab.counter("out_packets") > 0 && lab.counter("in_packets") > 0);
    assert_eq!(lab.counter("new_flows"), 2);
}

#[test]
fn udp_rule_and_fallback() {
    let lab = Lab::new();
    let dns = lab.topo.dest.udp_echo(sock(DEST_IP, 5353)).unwrap();
    let other = lab.topo.dest.udp_echo(sock(DEST_IP, 7000)).unwrap();
    lab.init("53 udp 203.0.113.25 5353\n203.0.113.25", &[]);
    let s = lab
        .topo
        .client
        .udp_bind(sock(Ipv4Addr::UNSPECIFIED, 0))
        .unwrap();
    assert_eq!(
        udp_roundtrip(&s, sock(POD_IP, 53), b"query", T).unwrap(),
        b"query"
    );
    assert_eq!(
        udp_roundtrip(&s, sock(POD_IP, 7000), b"fallback", T).unwrap(),
        b"fallback"
    );
    assert_all_from_egress_source(&dns, 1);
    assert_all_from_egress_source(&other, 1);
}

#[test]
fn icmp_echo_follows_the_fallback() {
    let lab = Lab::new();
    lab.init("203.0.113.25", &[]);
    lab.topo
        .client
        .run(|| ping(POD_IP, T))
        .expect("ping through the router");
    let flows = lab.status()["flows"].clone();
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["proto"] == "icmp"
                && f["translated_to"]
                    .as_str()
                    .unwrap()
                    .starts_with("203.0.113.25")),
        "an ICMP flow to the destination: {flows}"
    );
}

#[test]
fn unmatched_ports_are_refused_by_the_router() {
    let lab = Lab::new();
    let _web = lab.dest_tcp_echo(80);
    lab.init("80 tcp 203.0.113.25", &[]);
    let err = lab.client_tcp(81).expect_err("port 81 has no rule");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(lab.counter("no_rule") > 0);
}

#[test]
fn two_clients_with_the_same_source_port() {
    let lab = Lab::new();
    let web = lab.dest_tcp_echo(80);
    // A second pod address on the cluster network: both clients come in on eth0.
    let client2 = Ipv4Addr::new(10, 128, 0, 11);
    lab.topo
        .client
        .add_addr(egress_tests::CLIENT_IF, "10.128.0.11/24".parse().unwrap())
        .unwrap();
    lab.init("80 tcp 203.0.113.25", &[]);
    let connect_from = |ns: &egress_tests::Netns, ip: Ipv4Addr| {
        ns.run(|| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&sock(ip, 40000).into()).unwrap();
            s.connect_timeout(&sock(POD_IP, 80).into(), T)
                .expect("connect");
            TcpStream::from(s)
        })
    };
    let a = connect_from(&lab.topo.client, egress_tests::CLIENT_IP);
    let b = connect_from(&lab.topo.client, client2);
    assert_eq!(tcp_roundtrip(a, b"from a", T).unwrap(), b"from a");
    assert_eq!(tcp_roundtrip(b, b"from b", T).unwrap(), b"from b");
    let peers = web.wait_for_peers(2, T).unwrap();
    assert!(peers.iter().all(|p| p.ip() == EGRESS_SOURCE));
    assert_ne!(
        peers[0].port(),
        peers[1].port(),
        "distinct source ports: {peers:?}"
    );
    assert!(
        peers.iter().any(|p| p.port() == 40000),
        "the first keeps its port: {peers:?}"
    );
}

#[test]
fn unsolicited_inbound_traffic_never_reaches_the_cluster() {
    let lab = Lab::new();
    let _web = lab.dest_tcp_echo(80);
    lab.init("80 tcp 203.0.113.25\n203.0.113.25", &[]);
    // A client listening on the port the outside side would have to guess.
    let listener = lab
        .topo
        .client
        .tcp_listen(sock(Ipv4Addr::UNSPECIFIED, 40000))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    // Dropped by the dataplane, not refused by the router's own stack (a reset would fail the
    // connect too): the SYN times out and each packet is counted.
    let attempt = lab
        .topo
        .lan
        .run(|| TcpStream::connect_timeout(&sock(EGRESS_SOURCE, 40000), Duration::from_secs(2)));
    let err = attempt.expect_err("an unsolicited SYN must not be answered");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let after_syn = lab.counter("drop_unsolicited");
    assert!(after_syn >= 1, "{}", lab.status());
    let u = lab
        .topo
        .lan
        .udp_bind(sock(Ipv4Addr::UNSPECIFIED, 0))
        .unwrap();
    u.send_to(b"knock", sock(EGRESS_SOURCE, 40000)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(listener.accept().is_err(), "nothing reached the client");
    assert_eq!(
        lab.counter("drop_unsolicited"),
        after_syn + 1,
        "the UDP knock is dropped by the dataplane: {}",
        lab.status()
    );
    // Pings to EGRESS_SOURCE are answered by the router itself.
    lab.topo
        .lan
        .run(|| ping(EGRESS_SOURCE, T))
        .expect("the router answers pings to EGRESS_SOURCE");
}

fn set_mtu(ns: &egress_tests::Netns, iface: &'static str, mtu: u32) {
    ns.netlink(|h| async move {
        let idx = egress_tests::netlink::link_index(&h, iface).await?;
        h.link()
            .set(rtnetlink::LinkUnspec::new_with_index(idx).mtu(mtu).build())
            .execute()
            .await?;
        Ok(())
    })
    .unwrap();
}

/// A TCP sink in the destination namespace: reads to EOF, answers with the byte count.
fn sink(lab: &Lab, port: u16) -> std::thread::JoinHandle<()> {
    let l = lab.topo.dest.tcp_listen(sock(DEST_IP, port)).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let mut n = 0u64;
            let mut buf = [0u8; 65536];
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = c.write_all(n.to_string().as_bytes());
        }
    })
}

/// Sends `len` bytes through a `9000 tcp` rule to a sink and returns the router's status after.
fn bulk_transfer(lab: &Lab, len: usize) -> serde_json::Value {
    let srv = sink(lab, 9000);
    lab.init("9000 tcp 203.0.113.25", &[]);
    let c = lab.client_tcp(9000).unwrap();
    assert_eq!(send_all(c, len), len.to_string());
    srv.join().unwrap();
    lab.status()
}

fn send_all(mut c: TcpStream, len: usize) -> String {
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(&vec![0x5a; len]).expect("bulk send");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).expect("count from the sink");
    reply
}

#[test]
fn path_mtu_discovery_works_through_the_translation() {
    let lab = Lab::new();
    // The link into the destination network takes only 1400 bytes: lan answers bigger DF packets
    // with "fragmentation needed" to EGRESS_SOURCE, which must reach the client translated.
    set_mtu(&lab.topo.lan, egress_tests::LAN_DEST_IF, 1400);
    let status = bulk_transfer(&lab, 300_000);
    assert!(
        status["counters"]["in_packets"].as_u64().unwrap() > 0,
        "{status}"
    );
}

/// The path MTU the client's kernel has learnt for the pod IP (`ip route get`), if any.
fn client_path_mtu(lab: &Lab) -> Option<u32> {
    let mut cmd = Command::new("ip");
    cmd.args(["-4", "route", "get", &POD_IP.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = lab.topo.client.spawn(cmd).unwrap().output(T).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "ip route get: {text}");
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu")?;
    Some(words.next()?.parse().unwrap())
}

/// The kernel selftest conntrack_icmp_related, ported: a hop with a 1280-byte MTU behind the
/// router. A ping and TCP bigger than that get their "fragmentation needed" back to the client
/// through the router as errors about the client's own packets, and the client's kernel takes
/// them: its path MTU to the pod IP becomes 1280, and the TCP transfer completes (TCP accepts
/// such an error only when the quoted segment is one of its connection's, in its window).
#[test]
fn icmp_errors_from_a_1280_byte_hop_behind_the_router_reach_the_client() {
    let lab = Lab::new();
    set_mtu(&lab.topo.lan, egress_tests::LAN_DEST_IF, 1280);
    let srv = sink(&lab, 9000);
    lab.init("9000 tcp 203.0.113.25\n203.0.113.25", &[]);

    // ICMP echo through the fallback: 1300 bytes of payload, don't fragment.
    let err = lab
        .topo
        .client
        .run(|| egress_tests::ping_error(POD_IP, 1300, T))
        .expect("the error about the big ping reaches the client");
    let icmp = &err.icmp;
    assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed: {err:?}");
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1280, "{err:?}");
    assert_eq!(
        err.from, POD_IP,
        "the error comes from the address the client pinged"
    );
    let quoted = &icmp[8..];
    assert_eq!(
        (&quoted[12..16], &quoted[16..20]),
        (&egress_tests::CLIENT_IP.octets()[..], &POD_IP.octets()[..]),
        "it quotes the client's own request: {err:?}"
    );
    assert_eq!(
        client_path_mtu(&lab),
        Some(1280),
        "the client took the error"
    );

    // TCP, from a clean route cache: the client's segments are too big for the hop, the errors
    // about them must come back for the transfer to go on.
    let mut cmd = Command::new("ip");
    cmd.args(["route", "flush", "cache"]);
    assert!(
        lab.topo
            .client
            .spawn(cmd)
            .unwrap()
            .output(T)
            .unwrap()
            .status
            .success()
    );
    assert_eq!(client_path_mtu(&lab), None, "the route cache was flushed");
    let c = lab.client_tcp(9000).unwrap();
    assert_eq!(send_all(c, 300_000), "300000");
    srv.join().unwrap();
    assert_eq!(
        client_path_mtu(&lab),
        Some(1280),
        "TCP's errors reached the client"
    );
    let status = lab.status();
    assert_eq!(status["counters"]["drop_unsolicited"], 0, "{status}");

    // An error about no flow of the client's (a UDP datagram EGRESS_SOURCE never sent) is
    // related to nothing translated: it stays with the router's stack, and the client sees
    // nothing of it.
    let raw_icmp = || {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::ICMPV4),
        )
    };
    let before = lab.status();
    let count = |s: &serde_json::Value, k: &str| s["counters"][k].as_u64().unwrap();
    let client_icmp = lab.topo.client.run(raw_icmp).unwrap();
    client_icmp
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut quoted = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0];
    quoted.extend(EGRESS_SOURCE.octets());
    quoted.extend(DEST_IP.octets());
    let c = egress_tests::checksum(&quoted);
    quoted[10..12].copy_from_slice(&c.to_be_bytes());
    quoted.extend([0, 1, 0, 9, 0, 8, 0, 0]); // UDP 1 -> 9
    let mut err = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00]; // fragmentation needed, MTU 1280
    err.extend(&quoted);
    let c = egress_tests::checksum(&err);
    err[2..4].copy_from_slice(&c.to_be_bytes());
    lab.topo
        .lan
        .run(|| raw_icmp()?.send_to(&err, &sock(EGRESS_SOURCE, 0).into()))
        .expect("sending the unrelated error from lan");
    std::thread::sleep(Duration::from_millis(100));
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    let got = client_icmp.recv(&mut buf);
    assert!(got.is_err(), "the client received ICMP: {got:?}");
    let status = lab.status();
    assert!(
        count(&status, "macvlan_rx_packets") > count(&before, "macvlan_rx_packets"),
        "the error reached the dataplane: {status}"
    );
    assert_eq!(
        count(&status, "in_packets"),
        count(&before, "in_packets"),
        "nothing translated: {status}"
    );
}

#[test]
fn bulk_tcp_is_forwarded_by_the_program_gso_packets_included() {
    let lab = Lab::new();
    let status = bulk_transfer(&lab, 4_000_000);
    let n = |k: &str| status["counters"][k].as_u64().unwrap();
    // The client's TCP stack hands veth segments of up to 64 KB (GSO): an average above the
    // 1500-byte MTU shows the program saw them whole, and no FIB pass to the stack shows it
    // forwarded every one itself (an MTU check on their IP length would refuse them all).
    assert!(
        n("out_bytes") / n("out_packets") > 1500,
        "no GSO packets reached the program: {status}"
    );
    assert_eq!(n("fib_pass"), 0, "{status}");
    // They use the flow's cached route like any other packet (they were looked up one by one:
    // at least one lookup per GSO packet).
    assert!(
        n("fib_lookups") * 4 < n("out_packets"),
        "GSO packets skip the route cache: {status}"
    );
}

/// Runs `ip args` in `ns`.
fn ip(ns: &egress_tests::Netns, args: &[&str]) {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = ns.spawn(cmd).unwrap().output(T).unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` 64-byte ping-pongs on one connection, as fast as they go.
fn ping_pong(c: &mut TcpStream, n: usize) {
    c.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 64];
    for i in 0..n {
        c.write_all(&[i as u8; 64]).unwrap();
        c.read_exact(&mut buf).expect("echo through the router");
        assert_eq!(buf, [i as u8; 64]);
    }
}

fn mac_text(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// The status entry of the (only) TCP flow in `direction` ("out" or "in").
fn tcp_entry(status: &serde_json::Value, direction: &str) -> serde_json::Value {
    status["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["proto"] == "tcp" && f["direction"] == direction)
        .unwrap_or_else(|| panic!("no {direction} flow: {status}"))
        .clone()
}

/// The cached route of the flow entry in `direction`.
fn cached_route(status: &serde_json::Value, direction: &str) -> serde_json::Value {
    tcp_entry(status, direction)["route"].clone()
}

/// One TCP connection through a `7000 tcp` rule to an echo server, after `n` ping-pongs.
fn live_connection(lab: &Lab, n: usize) -> (EchoServer, TcpStream) {
    let echo = lab.dest_tcp_echo(7000);
    lab.init("7000 tcp 203.0.113.25", &[]);
    let mut c = lab.client_tcp(7000).unwrap();
    ping_pong(&mut c, n);
    (echo, c)
}

#[test]
fn established_flows_reuse_their_route_and_follow_a_neighbour_change() {
    let lab = Lab::new();
    let (_echo, mut c) = live_connection(&lab, 100);
    let status = lab.status();
    let n = |s: &serde_json::Value, k: &str| s["counters"][k].as_u64().unwrap();
    let translated = n(&status, "out_packets") + n(&status, "in_packets");
    // 200-odd packets in a few milliseconds: all but a handful use the cached route.
    assert!(
        n(&status, "fib_lookups") * 4 < translated,
        "the route cache is not used: {status}"
    );
    let gw_mac = lab.topo.lan.mac(egress_tests::LAN_IF).unwrap();
    let out = cached_route(&status, "out");
    assert_eq!(out["next_hop_mac"], mac_text(gw_mac), "{status}");
    assert_eq!(
        out["ifindex"],
        lab.topo.router.ifindex(egress_tests::MACVLAN).unwrap()
    );
    assert_eq!(out["mtu"], 1500);
    let back = cached_route(&status, "in");
    assert_eq!(
        back["next_hop_mac"],
        mac_text(lab.topo.client.mac(egress_tests::CLIENT_IF).unwrap())
    );

    // The gateway moves to another MAC (a failover), and the router learns it. Frames still
    // sent to the old MAC are dropped by lan, so the connection only goes on if the cached
    // route is given up.
    let new_mac = [0x02, 0xee, 0, 0, 0, 0x01];
    ip(
        &lab.topo.lan,
        &[
            "link",
            "set",
            egress_tests::LAN_IF,
            "address",
            &mac_text(new_mac),
        ],
    );
    let gw = egress_tests::GATEWAY_IP.to_string();
    ip(
        &lab.topo.router,
        &[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac_text(new_mac),
            "dev",
            egress_tests::MACVLAN,
        ],
    );
    std::thread::sleep(Duration::from_nanos(2 * egress_common::ROUTE_CACHE_NS));
    ping_pong(&mut c, 20);
    let status = lab.status();
    assert_eq!(
        cached_route(&status, "out")["next_hop_mac"],
        mac_text(new_mac),
        "{status}"
    );
}

/// Deletes the flow entry of the TCP flow in `direction` from the pinned table, as an LRU
/// eviction of that entry alone would.
fn evict_entry(lab: &Lab, direction: &str) {
    let f = tcp_entry(&lab.status(), direction);
    let ep = |k: &str| -> SocketAddrV4 { f[k].as_str().unwrap().parse().unwrap() };
    let (from, to) = (ep("from"), ep("to"));
    // FlowKey: addresses as on the wire, ports in host (little-endian) order, proto, padding.
    let mut key = Vec::new();
    key.extend(from.ip().octets());
    key.extend(to.ip().octets());
    key.extend(from.port().to_le_bytes());
    key.extend(to.port().to_le_bytes());
    key.extend([6, 0, 0, 0]);
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "delete", "pinned"])
        .arg(lab.bpffs.join("FLOWS"))
        .arg("key")
        .args(key.iter().map(|b| b.to_string()));
    let out = cmd
        .output()
        .expect("bpftool must be installed (cargo xtask setup)");
    assert!(
        out.status.success(),
        "bpftool map delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_flow_survives_the_eviction_of_either_of_its_entries() {
    let lab = Lab::new();
    let (echo, mut c) = live_connection(&lab, 10);
    // Without its reply entry, the flow's replies would be refused as unsolicited until the
    // outbound entry expired (hours for TCP): the next outbound packet that looks its route
    // up again (at most ROUTE_CACHE_NS later) puts it back.
    evict_entry(&lab, "in");
    std::thread::sleep(Duration::from_nanos(2 * egress_common::ROUTE_CACHE_NS));
    ping_pong(&mut c, 10);
    assert_eq!(lab.counter("flows_restored"), 1);
    assert_eq!(lab.counter("drop_unsolicited"), 0);
    // Without its outbound entry, the client's next packet makes a new one; it must take the
    // same source port (the surviving reply entry is this flow's own), or the destination
    // would see the connection jump ports.
    let before = tcp_entry(&lab.status(), "out")["translated_from"].clone();
    evict_entry(&lab, "out");
    ping_pong(&mut c, 10);
    let status = lab.status();
    assert_eq!(
        tcp_entry(&status, "out")["translated_from"],
        before,
        "{status}"
    );
    assert_eq!(status["flows"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(lab.counter("drop_unsolicited"), 0);
    assert_eq!(echo.peers().len(), 1, "one connection");
}

#[test]
fn fragmented_udp_datagrams_cross_both_ways() {
    let lab = Lab::new();
    let _echo = lab.topo.dest.udp_echo(sock(DEST_IP, 7000)).unwrap();
    lab.init("7000 udp 203.0.113.25", &[]);
    let s = lab
        .topo
        .client
        .udp_bind(sock(Ipv4Addr::UNSPECIFIED, 0))
        .unwrap();
    let big: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
    assert_eq!(udp_roundtrip(&s, sock(POD_IP, 7000), &big, T).unwrap(), big);
    assert_eq!(lab.counter("drop_fragment"), 0);
}

/// A UDP socket in `ns` bound to `addr`, reading with the test timeout.
fn receiver(ns: &egress_tests::Netns, addr: SocketAddr) -> std::net::UdpSocket {
    let s = ns.udp_bind(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn recv_datagram(s: &std::net::UdpSocket, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let (n, _) = s
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: no datagram within {T:?}: {e}"));
    buf.truncate(n);
    buf
}

/// Fragments of a datagram the router does not translate (no rule for its port) are the
/// router's own: they reach its stack and are reassembled there, whether the first fragment
/// comes first or last. The dataplane records nothing for them.
#[test]
fn fragmented_datagrams_for_the_router_itself_reach_it_in_order_or_not() {
    let lab = Lab::new();
    lab.init("7000 udp 203.0.113.25", &[]);
    let local = receiver(&lab.topo.router, sock(POD_IP, 7001));
    let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    for (id, order, what) in [
        (0x1001, &[0usize, 1, 2][..], "in order"),
        (0x1002, &[2, 1, 0][..], "last fragment first"),
    ] {
        lab.topo
            .client
            .run(|| {
                egress_tests::send_udp_fragments(
                    egress_tests::CLIENT_IF,
                    (egress_tests::CLIENT_IP, 5000),
                    (POD_IP, 7001),
                    id,
                    &big,
                    1480,
                    order,
                )
            })
            .unwrap();
        assert_eq!(recv_datagram(&local, what), big, "{what}");
    }
    let status = lab.status();
    assert_eq!(status["counters"]["drop_fragment"], 0, "{status}");
    assert_eq!(
        status["counters"]["no_rule"], 2,
        "two first fragments: {status}"
    );
}

/// Fragmented traffic on macvlan0 that the router does not translate: a big ping to
/// EGRESS_SOURCE (the router answers it) and a fragmented multicast datagram whose last
/// fragment comes first. Both reach the router's stack whole.
#[test]
fn fragments_on_macvlan0_that_are_not_replies_reach_the_router() {
    let lab = Lab::new();
    lab.init("7000 udp 203.0.113.25", &[]);
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    lab.topo
        .lan
        .run(|| egress_tests::ping_with(EGRESS_SOURCE, &payload, T))
        .expect("a 3000-byte ping to EGRESS_SOURCE, fragmented both ways, is answered");
    let group = Ipv4Addr::new(239, 1, 2, 3);
    let member = receiver(&lab.topo.router, sock(Ipv4Addr::UNSPECIFIED, 5000));
    member.join_multicast_v4(&group, &EGRESS_SOURCE).unwrap();
    lab.topo
        .lan
        .run(|| {
            egress_tests::send_udp_fragments(
                egress_tests::LAN_IF,
                (egress_tests::GATEWAY_IP, 5000),
                (group, 5000),
                0x2001,
                &payload,
                1480,
                &[2, 1, 0],
            )
        })
        .unwrap();
    assert_eq!(recv_datagram(&member, "multicast"), payload);
    let status = lab.status();
    let n = |k: &str| status["counters"][k].as_u64().unwrap();
    assert_eq!(
        (n("drop_fragment"), n("drop_unsolicited")),
        (0, 0),
        "{status}"
    );
}

/// Client pods on the same node send partially checksummed packets (the checksum is finished
/// by whoever transmits). Here macvlan0 computes it in software and the destination verifies
/// it, so a checksum the translation broke would lose the packets.
#[test]
fn partially_checksummed_packets_stay_correct() {
    let lab = Lab::new();
    let web = lab.dest_tcp_echo(80);
    let dns = lab.topo.dest.udp_echo(sock(DEST_IP, 53)).unwrap();
    lab.init("80 tcp 203.0.113.25\n53 udp 203.0.113.25", &[]);
    ethtool(&lab.topo.router, &["-K", "macvlan0", "tx", "off"]);
    ethtool(&lab.topo.dest, &["-K", "d1", "rx", "off"]);
    for full in [false, true] {
        // First as the client's kernel sends them (partial), then fully checksummed.
        if full {
            ethtool(&lab.topo.client, &["-K", "c0", "tx", "off"]);
        }
        let c = lab.client_tcp(80).unwrap();
        assert_eq!(tcp_roundtrip(c, &[1u8; 3000], T).unwrap(), vec![1u8; 3000]);
        let s = lab
            .topo
            .client
            .udp_bind(sock(Ipv4Addr::UNSPECIFIED, 0))
            .unwrap();
        assert_eq!(
            udp_roundtrip(&s, sock(POD_IP, 53), b"checksum me", T).unwrap(),
            b"checksum me"
        );
    }
    assert_all_from_egress_source(&web, 2);
    assert_all_from_egress_source(&dns, 2);
}

fn ethtool(ns: &egress_tests::Netns, args: &[&str]) {
    let mut cmd = Command::new("ethtool");
    cmd.args(args);
    let out = ns
        .spawn(cmd)
        .expect("ethtool must be installed (cargo xtask setup)")
        .output(T)
        .unwrap();
    assert!(
        out.status.success(),
        "ethtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Init twice, each time as a restart-safe pod runs it (the host's /sys/fs/bpf mounted),
/// around a live connection that carries data after the first one exited and after the second.
fn restart_keeps_live_connections(attach: &str) {
    let lab = Lab::new();
    let _web = lab.dest_tcp_echo(80);
    let args = ["--attach", attach];
    let out = lab.init_in_pod("80 tcp 203.0.113.25", &args);
    let log = String::from_utf8_lossy(&out.stderr);
    let note = if attach == "tcx" {
        format!(
            "tcx links pinned in {}, a bpffs that outlives this process: a restarted router \
             reopens them and keeps established connections",
            lab.bpffs.display()
        )
    } else {
        format!(
            "clsact filters on eth0 and macvlan0, maps pinned in {}, a bpffs that outlives this \
             process: a restarted router reopens the maps and keeps established connections",
            lab.bpffs.display()
        )
    };
    for needle in [
        note.as_str(),
        &format!("attach=\"{attach}\""),
        "maps=\"new\"",
        "replaced=false",
    ] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }
    let mut c = lab.client_tcp(80).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 5];
    c.write_all(b"one..").unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"one..");
    // The process is gone (init); run it again in a new container of the same pod: the
    // pinned maps and links are reused, the programs swapped in place.
    let out = lab.init_in_pod("80 tcp 203.0.113.25", &args);
    let log = String::from_utf8_lossy(&out.stderr);
    for needle in [
        note.as_str(),
        &format!("attach=\"{attach}\""),
        "maps=\"reused the pins\"",
        "replaced=true",
    ] {
        assert!(
            log.contains(needle),
            "the second run's log lacks {needle:?}:\n{log}"
        );
    }
    c.write_all(b"two..").unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two..");
    assert_eq!(lab.counter("new_flows"), 1, "the same flow carried on");
}

#[test]
fn restart_under_a_live_connection_tcx() {
    if kernel_has_tcx() {
        restart_keeps_live_connections("tcx");
        return;
    }
    // Without tcx, asking for it is refused with a message that says why and what to use.
    let lab = Lab::new();
    let p = lab
        .topo
        .router
        .spawn(lab.command("80 tcp 203.0.113.25", "init", &["--attach", "tcx"]))
        .unwrap();
    let out = p.output(Duration::from_secs(30)).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no tcx") && err.contains("--attach clsact"),
        "{err}"
    );
}

#[test]
fn restart_under_a_live_connection_clsact() {
    restart_keeps_live_connections("clsact");
}

#[test]
fn legacy_mode_stays_until_sigterm_and_leaves_the_dataplane_working() {
    // As the restart-safe legacy pod runs it: the host's /sys/fs/bpf mounted.
    let lab = Lab::new();
    let _web = lab.dest_tcp_echo(80);
    let p = lab.legacy_in_pod("80 tcp 203.0.113.25");
    // Ready when a connection goes through.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let c = loop {
        match lab.client_tcp(80) {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("legacy mode never started forwarding: {e}"),
        }
    };
    assert!(p.is_running(), "legacy mode stays");
    p.signal(Signal::SIGTERM).unwrap();
    let out = p.output(T).expect("exits on SIGTERM");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{log}", out.status);
    // Its last line says what stays, and so it does.
    let stays = if kernel_has_tcx() {
        format!(
            "signal received, exiting; the tcx links pinned in {} stay: the dataplane keeps \
             working",
            lab.bpffs.display()
        )
    } else {
        "signal received, exiting; the clsact filters stay on eth0 and macvlan0".to_string()
    };
    assert!(log.contains(&stays), "the log lacks {stays:?}:\n{log}");
    assert_eq!(tcp_roundtrip(c, b"still here", T).unwrap(), b"still here");
}

#[test]
fn a_full_connection_table_evicts_the_oldest_flows() {
    let lab = Lab::new();
    let _echo = lab.topo.dest.udp_echo(sock(DEST_IP, 7000)).unwrap();
    lab.init("7000 udp 203.0.113.25", &["--conntrack-size", "512"]);
    // 400 flows (800 entries) through a 512-entry table: every one still works.
    let flows = 400u32;
    for i in 0..flows {
        // Distinct source ports: a reused ephemeral port would be an old flow, not a new one.
        let s = lab
            .topo
            .client
            .udp_bind(sock(Ipv4Addr::UNSPECIFIED, 20000 + i as u16))
            .unwrap();
        let msg = i.to_be_bytes();
        assert_eq!(
            udp_roundtrip(&s, sock(POD_IP, 7000), &msg, T).unwrap(),
            msg,
            "flow {i}"
        );
    }
    let status = lab.status();
    let entries = status["flows"].as_array().unwrap().len();
    assert!(
        entries <= 512,
        "the table holds at most its size: {entries}"
    );
    assert!(
        entries < 2 * flows as usize,
        "old flows were evicted: {entries}"
    );
    assert_eq!(
        status["counters"]["new_flows"].as_u64().unwrap(),
        flows as u64
    );
    assert_eq!(status["counters"]["drop_table_full"].as_u64().unwrap(), 0);
}

#[test]
fn invalid_configuration_applies_nothing() {
    let lab = Lab::new();
    let p = lab
        .topo
        .router
        .spawn(lab.command("80 tcp 203.0.113.300", "init", &[]))
        .unwrap();
    let out = p.output(T).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("EGRESS_DESTINATION value '80 tcp 203.0.113.300' is invalid"),
        "{err}"
    );
    assert!(!lab.bpffs.exists(), "no BPF state was created");
    let addrs = lab
        .topo
        .router
        .netlink(|h| async move {
            let idx = egress_tests::netlink::link_index(&h, "macvlan0").await?;
            egress_tests::netlink::addresses(&h, idx).await
        })
        .unwrap();
    assert!(addrs.is_empty(), "macvlan0 untouched: {addrs:?}");
}

/// A LAN host that routes the cluster network via EGRESS_SOURCE must not reach it: the router
/// forwards (redirect mode needs it), but macvlan0 only takes replies and traffic for itself.
#[test]
fn the_lan_cannot_route_into_the_cluster_through_the_router() {
    let lab = Lab::new();
    lab.init("80 tcp 203.0.113.25", &[]);
    let listener = lab
        .topo
        .client
        .tcp_listen(sock(egress_tests::CLIENT_IP, 22))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    lab.topo
        .lan
        .add_route(
            "10.128.0.0/24".parse().unwrap(),
            Some(EGRESS_SOURCE),
            egress_tests::LAN_IF,
        )
        .unwrap();
    for target in [egress_tests::CLIENT_IP, POD_IP] {
        // Dropped by the dataplane: a reset from the router's own stack (the pod IP is its
        // address) would fail the connect too, so the SYN must time out and be counted.
        let before = lab.counter("drop_unsolicited");
        let r = lab
            .topo
            .lan
            .run(|| TcpStream::connect_timeout(&sock(target, 22), Duration::from_secs(1)));
        let Err(err) = r else {
            panic!("the LAN reached {target} through the router");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{target}: {err}");
        assert!(
            lab.counter("drop_unsolicited") > before,
            "{target}: {}",
            lab.status()
        );
    }
    assert!(listener.accept().is_err(), "nothing reached the client");
}

/// A one-to-one style SCTP socket (SOCK_STREAM, IPPROTO_SCTP) made in `ns`, or a failure that
/// says this kernel has no SCTP: the SCTP tests need it (Debian's kernels have it as a module;
/// `cargo xtask vm-test` loads it in its VMs). Reads and writes on it are those of a stream,
/// so the TCP helpers (echo server, round trip) serve it through std's socket types.
fn sctp_socket(ns: &egress_tests::Netns) -> socket2::Socket {
    ns.run(|| {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
        )
    })
    .unwrap_or_else(|e| {
        panic!(
            "this kernel ({}) has no SCTP: socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {e}; \
             SCTP tests need a kernel with SCTP (cargo xtask vm-test runs them on Debian's \
             6.1 and 6.12 kernels)",
            nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    })
}

/// SCTP through a rule that changes the port (OpenShift QE's `8080 SCTP 203.0.113.26 80`, to
/// this topology's destination): an association each way, first as the kernels send SCTP
/// through a veth (the CRC32c left to offload: a zero field, filled in by the first device
/// that cannot offload it), then with the senders computing it. No veth upgrades a packet to
/// "checksum verified" (rx checksumming off on every veth end), and the last device before
/// each receiver computes an offloaded CRC in software, so each end's SCTP checks every CRC
/// and a checksum the rewrite broke would lose the association (checked: without the CRC
/// update, the second half times out; with the zero field overwritten, the first). A
/// 3000-byte message is split over several packets (or one SCTP GSO packet, where the kernel
/// builds one).
#[test]
fn sctp_association_through_a_remote_port_rule_reaches_the_server_from_egress_source() {
    let lab = Lab::new();
    let t = &lab.topo;
    let listener = sctp_socket(&t.dest);
    listener.set_reuse_address(true).unwrap();
    listener.bind(&sock(DEST_IP, 80).into()).unwrap();
    listener.listen(16).unwrap();
    let server = EchoServer::tcp(std::net::TcpListener::from(listener)).unwrap();
    lab.init("8080 sctp 203.0.113.25 80", &[]);
    for (ns, iface) in [
        (&t.client, "c0"),
        (&t.router, "eth0"),
        (&t.node, "ens0"),
        (&t.lan, "lan0"),
        (&t.lan, "d0"),
        (&t.dest, "d1"),
    ] {
        ethtool(ns, &["-K", iface, "rx", "off"]);
    }
    // The last transmitter before each receiver: the LAN's veth to the destination, the
    // router's eth0 to the client.
    ethtool(&t.lan, &["-K", "d0", "tx-checksum-sctp", "off"]);
    ethtool(&t.router, &["-K", "eth0", "tx-checksum-sctp", "off"]);
    let mut peers = 0;
    for senders_compute in [false, true] {
        if senders_compute {
            ethtool(&t.client, &["-K", "c0", "tx-checksum-sctp", "off"]);
            ethtool(&t.dest, &["-K", "d1", "tx-checksum-sctp", "off"]);
        }
        for msg in [&b"hello over SCTP"[..], &[0x5a; 3000]] {
            let c = sctp_socket(&t.client);
            t.client
                .run(|| c.connect_timeout(&sock(POD_IP, 8080).into(), T))
                .unwrap_or_else(|e| {
                    panic!("SCTP association to {POD_IP}:8080 (senders compute the CRC: {senders_compute}): {e}; {}", lab.status())
                });
            let echoed = tcp_roundtrip(TcpStream::from(c), msg, T).unwrap_or_else(|e| {
                panic!(
                    "SCTP echo (senders compute the CRC: {senders_compute}): {e:#}; {}",
                    lab.status()
                )
            });
            assert_eq!(echoed, msg);
            peers += 1;
        }
    }
    assert_all_from_egress_source(&server, peers);
    let status = lab.status();
    let flows = status["flows"].as_array().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["proto"] == "sctp"
                && f["translated_to"].as_str().unwrap() == "203.0.113.25:80"),
        "an SCTP flow to port 80: {status}"
    );
    assert_eq!(lab.counter("drop_malformed"), 0, "{status}");
}
