//! Packet tests of the tc programs through BPF_PROG_TEST_RUN: every packet class, translated
//! and checked byte by byte (addresses, ports, checksums), plus malformed input.
//!
//! Needs root (loading BPF programs, bpffs). Most tests make the FIB lookup fail on purpose (the
//! configured interface indexes do not exist), so translated packets come back with TC_ACT_OK
//! and their rewritten bytes. The forwarding path (TTL, MACs, TC_ACT_REDIRECT) is checked byte
//! for byte by the tests at the end, run in a namespace topology whose FIB resolves.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

mod frames;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use egress_common::{
    DIR_IN, DIR_OUT, FLOW_CLOSING, FlowKey, FlowValue, FragKey, FragValue, MAP_FRAGS, MAP_RULES,
    PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS, PROTO_UDP, RULES_MAX, RuleKey, RuleTarget, Stats,
    packet::{HINT_SLOTS, hint_tag},
};
use egress_router::{
    config::{Mode, Protocol, RedirectConfig, RedirectRule},
    dataplane::{Dataplane, DataplaneOptions, DataplaneSettings, status},
};
use egress_tests::{CLIENT_IF, LAN_IF, MACVLAN, ROUTER_ETH0, Topology};
use etherparse::{
    Icmpv4Type, IpNumber, Ipv4Header, PacketBuilder, UdpHeader, icmpv4::DestUnreachableHeader,
};
use frames::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: [u8; 4] = [10, 128, 0, 10];
const CLIENT2: [u8; 4] = [10, 128, 0, 11];
const POD: [u8; 4] = [10, 128, 0, 5];
const SOURCE: [u8; 4] = [192, 168, 12, 99];
const GATEWAY: [u8; 4] = [192, 168, 12, 1];
const DEST: [u8; 4] = [203, 0, 113, 25];
const FALLBACK: [u8; 4] = [203, 0, 113, 26];
/// Interface indexes that exist nowhere, so the FIB lookup fails and packets come back.
const NO_IFINDEX: (u32, u32) = (0x7fff_0001, 0x7fff_0002);

struct Dp {
    dp: Dataplane,
    dir: PathBuf,
}

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rule(local_port: u16, protocol: Protocol, dest: [u8; 4], remote_port: u16) -> RedirectRule {
    RedirectRule {
        local_port,
        protocol,
        destination: Ipv4Addr::from(dest).into(),
        remote_port,
        line: 1,
    }
}

/// Loads the programs as a legacy-mode router would, attaching nothing.
fn load(opts: &DataplaneOptions) -> anyhow::Result<Dataplane> {
    Dataplane::load(opts, Dataplane::preflight(opts, Mode::Legacy)?)
}

impl Dp {
    fn new(
        rules: Vec<RedirectRule>,
        fallback: Option<[u8; 4]>,
        tweak: impl FnOnce(&mut DataplaneOptions),
    ) -> Dp {
        Dp::on(NO_IFINDEX, rules, fallback, tweak)
    }

    /// A dataplane configured with these (eth0, macvlan0) interface indexes.
    fn on(
        ifindex: (u32, u32),
        rules: Vec<RedirectRule>,
        fallback: Option<[u8; 4]>,
        tweak: impl FnOnce(&mut DataplaneOptions),
    ) -> Dp {
        assert!(
            nix::unistd::geteuid().is_root(),
            "eBPF packet tests need root (BPF_PROG_LOAD, bpffs)"
        );
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/egress-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut opts = DataplaneOptions {
            bpffs_dir: Some(dir.clone()),
            ..Default::default()
        };
        tweak(&mut opts);
        let mut dp = load(&opts).expect("load the eBPF dataplane");
        let redirect = RedirectConfig {
            rules,
            fallback: fallback.map(|a| Ipv4Addr::from(a).into()),
        };
        let settings = DataplaneSettings::new(
            &redirect,
            Ipv4Addr::from(SOURCE),
            ifindex.0,
            ifindex.1,
            &opts,
        )
        .unwrap();
        dp.configure(&settings).unwrap();
        Dp { dp, dir }
    }

    fn standard() -> Dp {
        Dp::new(
            vec![
                rule(80, Protocol::Tcp, DEST, 80),
                rule(8080, Protocol::Tcp, DEST, 80),
                rule(53, Protocol::Udp, DEST, 5353),
            ],
            None,
            |_| {},
        )
    }

    /// Runs a program on a frame; returns the verdict and the frame as the program left it.
    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(prog, frame).expect("BPF_PROG_TEST_RUN")
    }

    fn try_run(
        &self,
        prog: &str,
        frame: &[u8],
    ) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let p: &SchedClassifier = self.dp.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn out(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(PROG_ETH0_INGRESS, frame)
    }

    fn back(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(PROG_MACVLAN_INGRESS, frame)
    }

    fn stats(&self) -> Stats {
        status::StatusMaps::pinned(&self.dir)
            .and_then(|m| m.stats())
            .unwrap()
    }

    /// Entries in the fragment table.
    fn frags(&self) -> usize {
        let map = self.dp.ebpf.map(MAP_FRAGS).expect("the FRAGS map");
        let frags: aya::maps::HashMap<_, FragKey, FragValue> = map.try_into().unwrap();
        frags.keys().count()
    }

    fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        status::StatusMaps::pinned(&self.dir)
            .and_then(|m| m.flows())
            .unwrap()
    }

    /// The entries of the answered flows (FLOWS) and of the new ones (NEW_FLOWS).
    fn flow_tables(&self) -> status::FlowTables {
        status::StatusMaps::pinned(&self.dir)
            .and_then(|m| m.flow_tables())
            .unwrap()
    }
}

/// Asserts the IPv4 header checksum and, for TCP/UDP (over `datagram`, the whole L4 part when
/// the packet is one of several fragments) and ICMP, the L4 checksum.
fn assert_checksums(frame: &[u8], datagram: Option<&[u8]>) {
    let h = &ip(frame)[..ihl(frame)];
    assert_eq!(sum(&[h]), 0, "IPv4 header checksum of {frame:02x?}");
    let proto = h[9];
    let seg = datagram.unwrap_or(l4(frame));
    match proto {
        6 | 17 => {
            if proto == 17 && seg[6..8] == [0, 0] {
                return; // no UDP checksum
            }
            let pseudo = [&h[12..20], &[0, proto], &(seg.len() as u16).to_be_bytes()].concat();
            assert_eq!(sum(&[&pseudo, seg]), 0, "L4 checksum of {frame:02x?}");
        }
        1 => assert_eq!(sum(&[seg]), 0, "ICMP checksum of {frame:02x?}"),
        _ => {}
    }
}

#[test]
fn tcp_rule_is_translated_both_ways_with_valid_checksums() {
    let dp = Dp::standard();
    let syn = tcp(CLIENT, POD, 40000, 8080, "S", b"");
    let (v, out) = dp.out(&syn);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((saddr(&out), daddr(&out)), (SOURCE, DEST));
    assert_eq!(
        (sport(&out), dport(&out)),
        (40000, 80),
        "client port kept, remote port mapped"
    );
    assert_checksums(&out, None);
    assert_eq!(l4(&out)[13], 0x02, "flags untouched");

    let reply = tcp(DEST, SOURCE, 80, 40000, "SA", b"");
    let (v, back) = dp.back(&reply);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((saddr(&back), daddr(&back)), (POD, CLIENT));
    assert_eq!((sport(&back), dport(&back)), (8080, 40000));
    assert_checksums(&back, None);

    let data = tcp(CLIENT, POD, 40000, 8080, "A", b"GET / HTTP/1.1\r\n\r\n");
    let (_, out) = dp.out(&data);
    assert_eq!(
        &l4(&out)[20..],
        b"GET / HTTP/1.1\r\n\r\n",
        "payload untouched"
    );
    assert_checksums(&out, None);

    let s = dp.stats();
    assert_eq!((s.out_packets, s.in_packets, s.new_flows), (2, 1, 1));
    assert_eq!(s.eth0_rx_packets, 2);
    assert_eq!(s.macvlan_rx_packets, 1);
    let flows = dp.flows();
    assert_eq!(flows.len(), 2, "one entry per direction");
    let out_entry = flows.iter().find(|(_, v)| v.direction == DIR_OUT).unwrap();
    assert_eq!(
        (out_entry.0.saddr, out_entry.0.sport, out_entry.1.daddr),
        (CLIENT, 40000, DEST)
    );
    assert_eq!(out_entry.1.packets, 2);
    let in_entry = flows.iter().find(|(_, v)| v.direction == DIR_IN).unwrap();
    assert_eq!(
        (in_entry.0.saddr, in_entry.0.daddr, in_entry.0.dport),
        (DEST, SOURCE, 40000)
    );
}

/// A new flow's entries wait in NEW_FLOWS; its first reply moves both to FLOWS, where a flood
/// of new flows cannot evict them. A reset answers nothing: a SYN refused stays new.
#[test]
fn a_reply_moves_a_new_flow_to_the_connection_table_and_a_reset_does_not() {
    let dp = Dp::standard();
    let tuples = |t: &[(FlowKey, FlowValue)]| -> Vec<(u8, [u8; 4], u16)> {
        t.iter()
            .map(|(k, v)| (v.direction, k.saddr, k.sport))
            .collect()
    };
    dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    let (answered, new) = dp.flow_tables();
    assert!(answered.is_empty(), "{answered:?}");
    assert_eq!(
        tuples(&new),
        [(DIR_OUT, CLIENT, 40000), (DIR_IN, DEST, 80)],
        "both entries of the new flow"
    );
    let (v, out) = dp.back(&tcp(DEST, SOURCE, 80, 40000, "SA", b""));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((daddr(&out), dport(&out)), (CLIENT, 40000), "translated");
    let (answered, new) = dp.flow_tables();
    assert!(new.is_empty(), "moved, not copied: {new:?}");
    assert_eq!(
        tuples(&answered),
        [(DIR_OUT, CLIENT, 40000), (DIR_IN, DEST, 80)]
    );
    let out_entry = answered
        .iter()
        .find(|(_, v)| v.direction == DIR_OUT)
        .unwrap();
    assert_eq!(out_entry.1.packets, 1, "its counters moved with it");
    // The answered flow goes on from the connection table.
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40000, 80, "A", b"GET"));
    assert_eq!(daddr(&out), DEST);
    assert_eq!(dp.flow_tables().0.len(), 2);
    assert!(dp.flow_tables().1.is_empty());

    // Refused: the reset is translated back, and the flow stays among the new ones.
    dp.out(&tcp(CLIENT, POD, 40001, 8080, "S", b""));
    let (v, out) = dp.back(&tcp(DEST, SOURCE, 80, 40001, "RA", b""));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(
        (daddr(&out), dport(&out)),
        (CLIENT, 40001),
        "the reset reaches the client"
    );
    let (answered, new) = dp.flow_tables();
    assert_eq!(answered.len(), 2, "only the first flow is answered");
    assert_eq!(tuples(&new), [(DIR_OUT, CLIENT, 40001), (DIR_IN, DEST, 80)]);

    // UDP: the first datagram back answers the flow.
    dp.out(&udp(CLIENT, POD, 5000, 53, b"query"));
    assert_eq!(dp.flow_tables().1.len(), 4);
    dp.back(&udp(DEST, SOURCE, 5353, 5000, b"answer"));
    let (answered, new) = dp.flow_tables();
    assert_eq!((answered.len(), new.len()), (4, 2));
}

/// NEW_HINTS as the programs lay it out (one per CPU).
#[repr(C)]
#[derive(Clone, Copy)]
struct Hints([u32; HINT_SLOTS]);
// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for Hints {}

/// A one-way UDP flow (syslog, metrics) is looked up among the new flows first: its first packet
/// puts its tag in this CPU's NEW_HINTS slot. Its first reply moves it to the connection table;
/// its next packet, found there after one miss among the new flows, clears the slot. Every
/// packet is translated the same throughout, and counted in the entry it was found in.
#[test]
fn a_one_way_udp_flow_is_looked_up_among_the_new_flows_first_until_answered() {
    // BPF_PROG_TEST_RUN runs on the calling CPU: stay on one, to read its slot.
    let cpu = unsafe { libc::sched_getcpu() };
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu as usize).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    let dp = Dp::standard();
    let key = FlowKey {
        saddr: CLIENT,
        daddr: POD,
        sport: 5000,
        dport: 53,
        proto: PROTO_UDP,
        _pad0: 0,
        _pad1: 0,
    };
    let tag = hint_tag(&key);
    let slot = |dp: &Dp| -> u32 {
        let map = dp.dp.ebpf.map("NEW_HINTS").expect("the NEW_HINTS map");
        let hints: aya::maps::PerCpuArray<_, Hints> = map.try_into().unwrap();
        hints.get(&0, 0).unwrap()[cpu as usize].0[tag as usize % HINT_SLOTS]
    };
    assert_eq!(slot(&dp), 0);
    let mut port = None;
    for n in 1..=3u64 {
        let (_, out) = dp.out(&udp(CLIENT, POD, 5000, 53, b"log line"));
        assert_eq!(sent_as(&out), (SOURCE, DEST, 5353), "datagram {n}");
        assert_eq!(*port.get_or_insert(sport(&out)), sport(&out));
        assert_eq!(slot(&dp), tag, "after datagram {n}");
        let (answered, new) = dp.flow_tables();
        assert!(answered.is_empty(), "{answered:?}");
        let out_entry = new.iter().find(|(k, _)| *k == key).expect("among the new");
        assert_eq!(out_entry.1.packets, n);
    }
    let port = port.unwrap();
    let (v, back) = dp.back(&udp(DEST, SOURCE, 5353, port, b"ack"));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((daddr(&back), dport(&back)), (CLIENT, 5000));
    let (answered, new) = dp.flow_tables();
    assert!(new.is_empty(), "{new:?}");
    assert_eq!(answered.len(), 2);
    assert_eq!(slot(&dp), tag, "the reply leaves the outbound hint alone");

    let (_, out) = dp.out(&udp(CLIENT, POD, 5000, 53, b"log line"));
    assert_eq!(sent_as(&out), (SOURCE, DEST, 5353));
    assert_eq!(sport(&out), port);
    assert_eq!(
        slot(&dp),
        0,
        "found among the answered flows: the hint is cleared"
    );
    let (answered, _) = dp.flow_tables();
    let out_entry = answered.iter().find(|(k, _)| *k == key).unwrap();
    assert_eq!(out_entry.1.packets, 4);
}

/// A flow whose outbound entry the LRU evicted alone, in the connection table, gets it back
/// there (not among the new flows) from its next packet, on the same source port.
#[test]
fn an_answered_flow_that_lost_its_outbound_entry_stays_answered() {
    let dp = Dp::standard();
    dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    dp.back(&tcp(DEST, SOURCE, 80, 40000, "SA", b""));
    let flows = aya::maps::MapData::from_pin(dp.dir.join("FLOWS")).unwrap();
    let mut flows: aya::maps::HashMap<_, FlowKey, FlowValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(flows)).unwrap();
    let out_key = FlowKey {
        saddr: CLIENT,
        daddr: POD,
        sport: 40000,
        dport: 80,
        proto: 6,
        _pad0: 0,
        _pad1: 0,
    };
    flows.remove(&out_key).unwrap();
    drop(flows);
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40000, 80, "A", b"GET"));
    assert_eq!(
        (saddr(&out), sport(&out), daddr(&out)),
        (SOURCE, 40000, DEST)
    );
    let (answered, new) = dp.flow_tables();
    assert_eq!(answered.len(), 2, "{answered:?}");
    assert!(new.is_empty(), "{new:?}");
}

#[test]
fn unmatched_traffic_without_fallback_goes_to_the_local_stack_untouched() {
    let dp = Dp::standard();
    for frame in [
        tcp(CLIENT, POD, 40000, 81, "S", b""),
        udp(CLIENT, POD, 5000, 80, b"x"),
        echo(CLIENT, POD, true, 9),
    ] {
        let (v, out) = dp.out(&frame);
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(out, frame, "not translated");
    }
    let s = dp.stats();
    assert_eq!((s.no_rule, s.out_packets, s.new_flows), (3, 0, 0));
    assert!(dp.flows().is_empty());
}

#[test]
fn fallback_takes_everything_else_with_ports_preserved() {
    let dp = Dp::new(
        vec![rule(80, Protocol::Tcp, DEST, 80)],
        Some(FALLBACK),
        |_| {},
    );
    let (_, out) = dp.out(&udp(CLIENT, POD, 5000, 9999, b"hello"));
    assert_eq!(
        (saddr(&out), daddr(&out), sport(&out), dport(&out)),
        (SOURCE, FALLBACK, 5000, 9999)
    );
    assert_checksums(&out, None);
    let (_, out) = dp.out(&tcp(CLIENT, POD, 5001, 80, "S", b""));
    assert_eq!(daddr(&out), DEST, "a rule wins over the fallback");
    let (_, out) = dp.out(&echo(CLIENT, POD, true, 77));
    assert_eq!(
        (saddr(&out), daddr(&out)),
        (SOURCE, FALLBACK),
        "ICMP echo follows the fallback"
    );
    assert_eq!(icmp_id(&out), 77);
    assert_checksums(&out, None);
    let (v, back) = dp.back(&echo(FALLBACK, SOURCE, false, 77));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(
        (saddr(&back), daddr(&back), icmp_id(&back)),
        (POD, CLIENT, 77)
    );
    assert_checksums(&back, None);
}

#[test]
fn udp_zero_checksum_stays_zero_and_set_checksum_is_fixed() {
    let dp = Dp::standard();
    let mut frame = udp(CLIENT, POD, 5000, 53, b"query");
    let (_, out) = dp.out(&frame);
    assert_eq!((daddr(&out), dport(&out)), (DEST, 5353));
    assert_checksums(&out, None);
    assert_ne!(l4(&out)[6..8], [0, 0]);
    // Same flow, checksum 0 ("none"): must stay 0 after translation.
    let off = 14 + 20 + 6;
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let (_, out) = dp.out(&frame);
    assert_eq!(l4(&out)[6..8], [0, 0], "zero UDP checksum kept");
    assert_eq!((saddr(&out), dport(&out)), (SOURCE, 5353));
    assert_checksums(&out, None);
}

#[test]
fn two_clients_with_the_same_source_port_get_distinct_ports() {
    let dp = Dp::standard();
    let (_, a) = dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    let (_, b) = dp.out(&tcp(CLIENT2, POD, 40000, 80, "S", b""));
    assert_eq!(sport(&a), 40000);
    assert_ne!(sport(&b), 40000, "second client must get another port");
    assert!(sport(&b) >= 1024);
    assert_checksums(&b, None);
    let (_, back_a) = dp.back(&tcp(DEST, SOURCE, 80, sport(&a), "SA", b""));
    let (_, back_b) = dp.back(&tcp(DEST, SOURCE, 80, sport(&b), "SA", b""));
    assert_eq!((daddr(&back_a), dport(&back_a)), (CLIENT, 40000));
    assert_eq!((daddr(&back_b), dport(&back_b)), (CLIENT2, 40000));
    assert_checksums(&back_b, None);
}

#[test]
fn port_exhaustion_is_counted_and_dropped() {
    let dp = Dp::new(vec![rule(80, Protocol::Tcp, DEST, 80)], None, |o| {
        o.port_range = (2000, 2000)
    });
    let clients = [[10, 128, 0, 20], [10, 128, 0, 21], [10, 128, 0, 22]];
    let (_, a) = dp.out(&tcp(clients[0], POD, 1000, 80, "S", b""));
    let (_, b) = dp.out(&tcp(clients[1], POD, 1000, 80, "S", b""));
    assert_eq!((sport(&a), sport(&b)), (1000, 2000));
    let (v, _) = dp.out(&tcp(clients[2], POD, 1000, 80, "S", b""));
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(dp.stats().drop_port_exhausted, 1);
}

#[test]
fn unsolicited_inbound_is_never_translated() {
    let dp = Dp::standard();
    for frame in [
        tcp(DEST, SOURCE, 80, 40000, "SA", b""),
        udp(DEST, SOURCE, 53, 5000, b"x"),
        echo(DEST, SOURCE, false, 3),
    ] {
        let (v, _) = dp.back(&frame);
        assert_eq!(v, TC_ACT_SHOT, "unsolicited {frame:02x?}");
    }
    assert_eq!(dp.stats().drop_unsolicited, 3);
    // A ping to EGRESS_SOURCE is the router's to answer.
    let ping = echo(GATEWAY, SOURCE, true, 5);
    assert_eq!(dp.back(&ping), (TC_ACT_OK, ping.clone()));
    // Unicast for any other address (a cluster address, the pod IP) would be forwarded into
    // the cluster by the kernel: dropped. Multicast is left to the stack.
    for to in [[10, 128, 0, 10], POD, GATEWAY] {
        assert_eq!(
            dp.back(&tcp(DEST, to, 80, 4000, "S", b"")).0,
            TC_ACT_SHOT,
            "to {to:?}"
        );
    }
    let mdns = udp(DEST, [224, 0, 0, 251], 5353, 5353, b"m");
    assert_eq!(dp.back(&mdns), (TC_ACT_OK, mdns.clone()));
    // Nothing arriving from outside creates a flow, even on a rule's port.
    let inbound = tcp(DEST, SOURCE, 4000, 80, "S", b"");
    assert_eq!(dp.back(&inbound).0, TC_ACT_SHOT);
    assert!(dp.flows().is_empty());
}

#[test]
fn icmp_error_about_a_flow_is_rewritten_inside_and_out() {
    let dp = Dp::standard();
    let syn = tcp(CLIENT, POD, 40000, 8080, "S", &[7u8; 100]);
    let (_, out) = dp.out(&syn);
    // The gateway says "fragmentation needed" about the translated packet.
    let quoted = &ip(&out)[..20 + 28];
    let mut err = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(GATEWAY, SOURCE, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut err, quoted)
        .unwrap();
    let (v, back) = dp.back(&err);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((saddr(&back), daddr(&back)), (POD, CLIENT), "outer header");
    let inner = &l4(&back)[8..];
    assert_eq!(inner[12..16], CLIENT, "quoted source is the client again");
    assert_eq!(inner[16..20], POD, "quoted destination is the pod IP again");
    assert_eq!(u16::from_be_bytes([inner[20], inner[21]]), 40000);
    assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), 8080);
    assert_eq!(sum(&[&inner[..20]]), 0, "quoted IPv4 header checksum");
    assert_eq!(
        u16::from_be_bytes([l4(&back)[6], l4(&back)[7]]),
        1400,
        "MTU kept"
    );
    assert_checksums(&back, None);

    // An error about a flow we do not know is left to the stack untouched.
    let mut stray = Vec::new();
    let unknown = tcp(SOURCE, DEST, 1, 2, "S", b"");
    let other = &ip(&unknown)[..28];
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(GATEWAY, SOURCE, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut stray, other)
        .unwrap();
    assert_eq!(dp.back(&stray), (TC_ACT_OK, stray.clone()));
}

#[test]
fn icmp_error_from_the_client_about_a_reply_goes_out_translated() {
    let dp = Dp::standard();
    let (_, out) = dp.out(&udp(CLIENT, POD, 5000, 53, b"q"));
    let (_, reply) = dp.back(&udp(DEST, SOURCE, 5353, sport(&out), b"answer"));
    // The client's port is closed: it sends port unreachable quoting the reply it got.
    let mut err = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, POD, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut err, &ip(&reply)[..28])
        .unwrap();
    let (v, o) = dp.out(&err);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((saddr(&o), daddr(&o)), (SOURCE, DEST));
    let inner = &l4(&o)[8..];
    assert_eq!(
        (inner[12..16].to_vec(), inner[16..20].to_vec()),
        (DEST.to_vec(), SOURCE.to_vec())
    );
    assert_eq!(u16::from_be_bytes([inner[20], inner[21]]), 5353);
    assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), 5000);
    assert_checksums(&o, None);
}

#[test]
fn ip_options_are_honoured() {
    let dp = Dp::standard();
    let inner = udp(CLIENT, POD, 5000, 53, b"with options");
    let l4b = l4(&inner).to_vec();
    // Four NOPs: IHL 6. The UDP checksum covers only the pseudo header and the datagram.
    let frame = raw_ipv4(17, CLIENT, POD, 1, false, 0, &[1, 1, 1, 1], &l4b);
    let (v, out) = dp.out(&frame);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(ihl(&out), 24);
    assert_eq!(
        (saddr(&out), daddr(&out), sport(&out), dport(&out)),
        (SOURCE, DEST, 5000, 5353)
    );
    assert_eq!(&ip(&out)[20..24], &[1, 1, 1, 1]);
    assert_checksums(&out, None);
}

#[test]
fn fragments_follow_their_first_fragment() {
    let dp = Dp::standard();
    let payload: Vec<u8> = (0..40u8).collect();
    let ip_h = Ipv4Header::new(0, 64, IpNumber::UDP, CLIENT, POD).unwrap();
    let udp_h = UdpHeader::with_ipv4_checksum(5000, 53, &ip_h, &payload).unwrap();
    let datagram = [udp_h.to_bytes().to_vec(), payload].concat(); // 48 bytes
    let first = raw_ipv4(17, CLIENT, POD, 0x4242, true, 0, &[], &datagram[..24]);
    let second = raw_ipv4(17, CLIENT, POD, 0x4242, false, 3, &[], &datagram[24..]);
    let (v1, o1) = dp.out(&first);
    let (v2, o2) = dp.out(&second);
    assert_eq!((v1, v2), (TC_ACT_OK, TC_ACT_OK));
    for o in [&o1, &o2] {
        assert_eq!((saddr(o), daddr(o)), (SOURCE, DEST));
        assert_eq!(sum(&[&ip(o)[..20]]), 0);
    }
    assert_eq!(l4(&o2), &datagram[24..], "later fragment payload untouched");
    let whole = [l4(&o1), l4(&o2)].concat();
    assert_eq!(u16::from_be_bytes([whole[2], whole[3]]), 5353);
    // Checksum over the reassembled datagram with the new pseudo header.
    let pseudo = [
        &SOURCE[..],
        &DEST[..],
        &[0, 17],
        &(whole.len() as u16).to_be_bytes(),
    ]
    .concat();
    assert_eq!(sum(&[&pseudo, &whole]), 0, "reassembled UDP checksum");
    assert_eq!(dp.frags(), 1, "the translated datagram is recorded");
    // The reply, fragmented too, comes back the same way.
    let reply_h = Ipv4Header::new(0, 64, IpNumber::UDP, DEST, SOURCE).unwrap();
    let reply_udp = UdpHeader::with_ipv4_checksum(5353, 5000, &reply_h, &datagram[8..]).unwrap();
    let reply = [reply_udp.to_bytes().to_vec(), datagram[8..].to_vec()].concat();
    let r1 = raw_ipv4(17, DEST, SOURCE, 0x0101, true, 0, &[], &reply[..24]);
    let r2 = raw_ipv4(17, DEST, SOURCE, 0x0101, false, 3, &[], &reply[24..]);
    let (_, b1) = dp.back(&r1);
    let (v2, b2) = dp.back(&r2);
    assert_eq!(v2, TC_ACT_OK);
    for b in [&b1, &b2] {
        assert_eq!((saddr(b), daddr(b)), (POD, CLIENT));
    }
    let whole = [l4(&b1), l4(&b2)].concat();
    assert_eq!(u16::from_be_bytes([whole[0], whole[1]]), 53);
    let s = dp.stats();
    assert_eq!((s.out_packets, s.in_packets, s.drop_fragment), (2, 2, 0));
}

/// A later fragment whose first fragment was not translated (not seen yet, or not ours) goes
/// where that first fragment goes: to the stack, which reassembles what is addressed to the
/// router and forwards nothing from macvlan0 that is not for EGRESS_SOURCE. Nothing is
/// recorded for datagrams that are not translated.
#[test]
fn later_fragments_whose_first_was_not_translated_are_left_to_the_stack() {
    let dp = Dp::standard(); // rules only, no fallback
    let payload = [9u8; 40];
    // Reordered: a later fragment first; its ports (its rule) are unknown.
    let orphan = raw_ipv4(17, CLIENT, POD, 0x7001, false, 3, &[], &payload);
    assert_eq!(dp.out(&orphan), (TC_ACT_OK, orphan.clone()), "reordered");
    // A datagram for the router itself (no rule for its port), in order.
    let first = raw_ipv4(
        17,
        CLIENT,
        POD,
        0x7002,
        true,
        0,
        &[],
        &udp_l4(5000, 7777, 16),
    );
    let second = raw_ipv4(17, CLIENT, POD, 0x7002, false, 3, &[], &payload);
    assert_eq!(dp.out(&first), (TC_ACT_OK, first.clone()));
    assert_eq!(
        dp.out(&second),
        (TC_ACT_OK, second.clone()),
        "follows its first"
    );
    assert_eq!(dp.frags(), 0, "nothing recorded for untranslated traffic");
    // On macvlan0: a big ping to EGRESS_SOURCE (the router answers it), a reordered reply,
    // and multicast: all the stack's.
    let ping = raw_ipv4(1, GATEWAY, SOURCE, 0x7003, true, 0, &[], &echo_l4(8, 5, 16));
    let ping2 = raw_ipv4(1, GATEWAY, SOURCE, 0x7003, false, 3, &[], &payload);
    let mcast = raw_ipv4(17, DEST, [239, 1, 2, 3], 0x7004, false, 3, &[], &payload);
    let reordered = raw_ipv4(17, DEST, SOURCE, 0x7005, false, 3, &[], &payload);
    for (what, f) in [
        ("ping", ping),
        ("ping fragment", ping2),
        ("multicast", mcast),
        ("reordered reply", reordered),
    ] {
        assert_eq!(dp.back(&f), (TC_ACT_OK, f.clone()), "{what}");
    }
    assert_eq!(dp.frags(), 0, "nothing recorded for untranslated traffic");
    // Unicast for another address is still refused (it would be routed into the cluster).
    let stray = raw_ipv4(17, DEST, POD, 0x7006, false, 3, &[], &payload);
    assert_eq!(dp.back(&stray).0, TC_ACT_SHOT);
    let s = dp.stats();
    assert_eq!(
        (
            s.drop_fragment,
            s.drop_unsolicited,
            s.out_packets,
            s.in_packets
        ),
        (0, 1, 0, 0),
        "{s:?}"
    );
}

/// With a fallback (and no port of the router's own), every UDP and TCP datagram to the router
/// is translated: a later fragment whose first was not seen is provably the fallback's, and is
/// dropped rather than handed to a stack that would forward it untranslated (or hold it in a
/// reassembly that never ends). ICMP is not provable (errors and other types are the stack's).
#[test]
fn a_later_fragment_for_the_fallback_whose_first_was_not_seen_is_dropped() {
    let dp = Dp::new(vec![], Some(FALLBACK), |_| {});
    let payload = [1u8; 40];
    for proto in [17, 6] {
        let orphan = raw_ipv4(proto, CLIENT, POD, 0x7101, false, 3, &[], &payload);
        assert_eq!(dp.out(&orphan).0, TC_ACT_SHOT, "protocol {proto}");
    }
    assert_eq!(dp.stats().drop_fragment, 2);
    let icmp = raw_ipv4(1, CLIENT, POD, 0x7102, false, 3, &[], &payload);
    assert_eq!(dp.out(&icmp), (TC_ACT_OK, icmp.clone()), "ICMP");
    assert_eq!(dp.stats().drop_fragment, 2);
}

/// An SCTP packet: the common header (ports, verification tag, checksum) and `chunks`, with
/// its CRC32c computed from scratch (the bitwise reference, not the dataplane's arithmetic).
fn sctp(sport: u16, dport: u16, vtag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(chunks);
    let crc = egress_common::sctp::crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// An INIT (type 1) or INIT ACK (type 2) chunk without parameters.
fn init_chunk(kind: u8, tag: u32, tsn: u32) -> Vec<u8> {
    let mut c = vec![kind, 0, 0, 20];
    c.extend_from_slice(&tag.to_be_bytes());
    c.extend_from_slice(&106_496u32.to_be_bytes()); // a_rwnd
    c.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    c.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    c.extend_from_slice(&tsn.to_be_bytes());
    c
}

/// A DATA chunk (unfragmented user message), padded to four bytes.
fn data_chunk(tsn: u32, payload: &[u8]) -> Vec<u8> {
    let mut c = vec![0, 0x03];
    c.extend_from_slice(&((16 + payload.len()) as u16).to_be_bytes());
    c.extend_from_slice(&tsn.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, 0]); // stream 0, sequence 0
    c.extend_from_slice(&0u32.to_be_bytes()); // payload protocol id
    c.extend_from_slice(payload);
    c.resize(c.len().next_multiple_of(4), 0);
    c
}

fn sctp_frame(src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    raw_ipv4(132, src, dst, 0x5c7b, false, 0, &[], l4)
}

fn crc_valid(frame: &[u8]) -> bool {
    let pkt = l4(frame);
    egress_common::sctp::checksum_field(pkt) == pkt[8..12]
}

/// OpenShift's QE rule `8080 SCTP 203.0.113.26 80`: the association's packets, INIT and DATA
/// each way, come out as the same packets built from scratch with the translated addresses
/// and ports: every byte equal, the CRC32c valid.
#[test]
fn sctp_with_a_remote_port_gets_its_ports_and_crc32c_rewritten_both_ways() {
    let dp = Dp::new(vec![rule(8080, Protocol::Sctp, FALLBACK, 80)], None, |_| {});
    let payload: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
    let out_chunks = [init_chunk(1, 0x1111_2222, 7), data_chunk(7, &payload)];
    let back_chunks = [init_chunk(2, 0x3333_4444, 900), data_chunk(900, b"pong")];
    for (i, (out_c, back_c)) in out_chunks.iter().zip(&back_chunks).enumerate() {
        let vtag = if i == 0 { 0 } else { 0x3333_4444 };
        let frame = sctp_frame(CLIENT, POD, &sctp(40000, 8080, vtag, out_c));
        let (v, out) = dp.out(&frame);
        assert_eq!(v, TC_ACT_OK);
        let want = sctp_frame(SOURCE, FALLBACK, &sctp(40000, 80, vtag, out_c));
        assert_eq!(out, want, "chunk {i} out: {out:02x?}");
        assert!(crc_valid(&out));
        assert_checksums(&out, None);

        let frame = sctp_frame(FALLBACK, SOURCE, &sctp(80, 40000, 0x1111_2222, back_c));
        let (v, back) = dp.back(&frame);
        assert_eq!(v, TC_ACT_OK);
        let want = sctp_frame(POD, CLIENT, &sctp(8080, 40000, 0x1111_2222, back_c));
        assert_eq!(back, want, "chunk {i} back: {back:02x?}");
        assert!(crc_valid(&back));
    }
    let s = dp.stats();
    assert_eq!((s.out_packets, s.in_packets, s.new_flows), (2, 2, 1));
}

/// Address-only SCTP rules leave the SCTP packet alone: the CRC32c covers no IP field (the
/// checksum here is not even valid, and stays as it was).
#[test]
fn sctp_keeping_its_port_is_translated_by_address_only() {
    let dp = Dp::new(vec![rule(9000, Protocol::Sctp, DEST, 9000)], None, |_| {});
    let mut pkt = vec![0u8; 12];
    pkt[0..2].copy_from_slice(&7000u16.to_be_bytes());
    pkt[2..4].copy_from_slice(&9000u16.to_be_bytes());
    pkt[8..12].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let (v, out) = dp.out(&sctp_frame(CLIENT, POD, &pkt));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((saddr(&out), daddr(&out)), (SOURCE, DEST));
    assert_eq!(l4(&out), &pkt[..], "SCTP header and CRC untouched");
    assert_checksums(&out, None);
}

/// A second association from another client on the same source port gets another port, its
/// CRC32c following, and its replies find their way back.
#[test]
fn a_second_sctp_association_on_the_same_port_gets_another_port() {
    let dp = Dp::new(vec![rule(9000, Protocol::Sctp, DEST, 9000)], None, |_| {});
    let init = init_chunk(1, 5, 1);
    let (_, a) = dp.out(&sctp_frame(CLIENT, POD, &sctp(7000, 9000, 0, &init)));
    let (v, b) = dp.out(&sctp_frame(CLIENT2, POD, &sctp(7000, 9000, 0, &init)));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(sport(&a), 7000, "the first keeps its port");
    let port = sport(&b);
    assert_ne!(port, 7000, "the second gets another");
    assert_eq!(b, sctp_frame(SOURCE, DEST, &sctp(port, 9000, 0, &init)));
    let ack = init_chunk(2, 6, 1);
    let (_, back) = dp.back(&sctp_frame(DEST, SOURCE, &sctp(9000, port, 5, &ack)));
    assert_eq!(back, sctp_frame(POD, CLIENT2, &sctp(9000, 7000, 5, &ack)));
    assert_eq!(dp.stats().drop_port_exhausted, 0);
}

/// A packet that arrives with a bad CRC32c is translated, and leaves wrong by exactly what it
/// arrived wrong by: the router verifies no L4 checksum (the receiver discards it, as it
/// would have without the router), and never makes a corrupted packet look valid.
#[test]
fn a_bad_sctp_checksum_stays_bad_by_the_same_error() {
    let dp = Dp::new(vec![rule(8080, Protocol::Sctp, DEST, 80)], None, |_| {});
    let chunk = data_chunk(1, b"corrupted in flight");
    let mut pkt = sctp(40000, 8080, 9, &chunk);
    let error = 0x0400_0001u32;
    let good = u32::from_le_bytes(pkt[8..12].try_into().unwrap());
    pkt[8..12].copy_from_slice(&(good ^ error).to_le_bytes());
    let (v, out) = dp.out(&sctp_frame(CLIENT, POD, &pkt));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(dport(&out), 80);
    assert!(!crc_valid(&out), "a bad checksum must not come out valid");
    let right = sctp(40000, 80, 9, &chunk);
    let got = u32::from_le_bytes(l4(&out)[8..12].try_into().unwrap());
    assert_eq!(
        got ^ u32::from_le_bytes(right[8..12].try_into().unwrap()),
        error
    );
    assert_eq!(&l4(&out)[12..], &right[12..], "chunks untouched");
}

/// A zero checksum field is what a sender that leaves the CRC32c to offload (CHECKSUM_PARTIAL,
/// every SCTP socket sending through a veth) hands over: the ports change, the field stays
/// zero for the device or the GSO segmentation to fill in over the rewritten packet.
#[test]
fn a_zero_sctp_checksum_is_left_for_offload() {
    let dp = Dp::new(vec![rule(8080, Protocol::Sctp, DEST, 80)], None, |_| {});
    let mut pkt = sctp(40000, 8080, 9, &data_chunk(1, b"offloaded"));
    pkt[8..12].fill(0);
    let (v, out) = dp.out(&sctp_frame(CLIENT, POD, &pkt));
    assert_eq!(v, TC_ACT_OK);
    let mut want = pkt.clone();
    want[2..4].copy_from_slice(&80u16.to_be_bytes());
    assert_eq!(l4(&out), &want[..]);
}

/// "Fragmentation needed" about a translated SCTP packet reaches the client about the packet
/// it sent: quoted addresses and ports back to the client's (SCTP's path-MTU discovery
/// matches the error to its association by them and the verification tag; the quoted CRC32c
/// covers bytes the quote cuts off and stays as quoted).
#[test]
fn icmp_error_about_an_sctp_flow_quotes_the_clients_ports() {
    let dp = Dp::new(vec![rule(8080, Protocol::Sctp, DEST, 80)], None, |_| {});
    let (_, out) = dp.out(&sctp_frame(
        CLIENT,
        POD,
        &sctp(40000, 8080, 0x0a0b_0c0d, &data_chunk(1, &[9; 1200])),
    ));
    let quoted = &ip(&out)[..20 + 28];
    let mut err = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(GATEWAY, SOURCE, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1000 },
        ))
        .write(&mut err, quoted)
        .unwrap();
    let (v, back) = dp.back(&err);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!((saddr(&back), daddr(&back)), (POD, CLIENT));
    let inner = &l4(&back)[8..];
    assert_eq!((&inner[12..16], &inner[16..20]), (&CLIENT[..], &POD[..]));
    assert_eq!(u16::from_be_bytes([inner[20], inner[21]]), 40000);
    assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), 8080);
    assert_eq!(
        inner[24..28],
        0x0a0b_0c0du32.to_be_bytes(),
        "verification tag"
    );
    assert_eq!(
        inner[28..],
        quoted[28..],
        "the quoted CRC32c and chunk bytes as quoted"
    );
    assert_eq!(sum(&[&inner[..20]]), 0, "quoted IPv4 header checksum");
    assert_checksums(&back, None);
}

/// The first fragment of an SCTP packet whose ports change is dropped (counted with the
/// fragments): its CRC32c covers the whole datagram, whose length it does not tell.
#[test]
fn a_fragmented_sctp_packet_that_changes_port_is_dropped() {
    let dp = Dp::new(vec![rule(8080, Protocol::Sctp, DEST, 80)], None, |_| {});
    let pkt = sctp(40000, 8080, 9, &data_chunk(1, &[7; 64]));
    let first = raw_ipv4(132, CLIENT, POD, 0x77, true, 0, &[], &pkt[..48]);
    assert_eq!(dp.out(&first).0, TC_ACT_SHOT);
    let s = dp.stats();
    assert_eq!((s.drop_fragment, s.out_packets), (1, 0));
}

#[test]
fn malformed_and_truncated_packets_are_never_translated() {
    let dp = Dp::standard();
    let good = tcp(CLIENT, POD, 40000, 80, "S", b"");
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // (A frame shorter than an IPv4 header is refused by BPF_PROG_TEST_RUN itself, so the
    // header-longer-than-the-packet case stands for it.)
    let mut long_ihl = good.clone();
    long_ihl[14] = 0x4f;
    cases.push(("IHL beyond the packet", long_ihl));
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    cases.push(("IHL below 5", bad_ihl));
    let mut long_total = good.clone();
    long_total[14 + 2..14 + 4].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("total length beyond the packet", long_total));
    let mut short_total = good.clone();
    short_total[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("TCP header beyond total length", short_total));
    cases.push(("truncated TCP header", good[..14 + 20 + 10].to_vec()));
    let mut v6 = good.clone();
    v6[14] = 0x65;
    cases.push(("IP version 6 in an IPv4 frame", v6));
    for (what, frame) in &cases {
        let (v, out) = match dp.try_run(PROG_ETH0_INGRESS, frame) {
            Ok(r) => r,
            Err(e) => panic!("{what}: {e:?}"),
        };
        assert!(
            v == TC_ACT_SHOT || (v == TC_ACT_OK && out == *frame),
            "{what}: verdict {v}, mistranslated?"
        );
        assert!(
            out.len() < 14 + 20 || saddr(&out) != SOURCE,
            "{what}: translated"
        );
    }
    assert!(dp.stats().drop_malformed >= 5, "{:?}", dp.stats());
    assert!(dp.flows().is_empty(), "no flow from malformed input");
    // Not IPv4 at all (ARP): passed untouched, not counted as malformed.
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let before = dp.stats().drop_malformed;
    assert_eq!(dp.out(&arp), (TC_ACT_OK, arp.clone()));
    assert_eq!(dp.stats().drop_malformed, before);
}

#[test]
fn ttl_one_is_dropped_not_forwarded() {
    let dp = Dp::standard();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, POD, 1)
        .udp(5000, 53)
        .write(&mut frame, b"x")
        .unwrap();
    assert_eq!(dp.out(&frame).0, TC_ACT_SHOT);
    assert_eq!(dp.stats().drop_ttl, 1);
}

#[test]
fn tcp_close_marks_both_directions_and_idle_flows_expire() {
    let dp = Dp::new(
        vec![
            rule(80, Protocol::Tcp, DEST, 80),
            rule(53, Protocol::Udp, DEST, 53),
        ],
        None,
        |o| {
            o.udp_timeout = 0;
        },
    );
    dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    dp.out(&tcp(CLIENT, POD, 40000, 80, "FA", b""));
    let flows = dp.flows();
    assert_eq!(flows.len(), 2);
    assert!(
        flows.iter().all(|(_, v)| v.flags & FLOW_CLOSING != 0),
        "FIN marks both entries closing"
    );
    // A new SYN on the same tuple revives it.
    dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    assert!(dp.flows().iter().all(|(_, v)| v.flags & FLOW_CLOSING == 0));

    // UDP with a zero idle timeout: the reply finds the flow expired and is refused.
    let (_, out) = dp.out(&udp(CLIENT, POD, 5000, 53, b"q"));
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (v, _) = dp.back(&udp(DEST, SOURCE, 53, sport(&out), b"late"));
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(dp.stats().drop_unsolicited, 1);
}

/// The router's own listener (the metrics port) is neither the fallback's nor counted as a
/// packet without a rule; UDP on that port and every other port still follow the fallback.
#[test]
fn the_routers_own_tcp_port_stays_local_even_with_a_fallback() {
    let mut dp = Dp::new(vec![], Some(FALLBACK), |_| {});
    let opts = DataplaneOptions {
        bpffs_dir: Some(dp.dir.clone()),
        ..Default::default()
    };
    let redirect = RedirectConfig {
        rules: vec![],
        fallback: Some(Ipv4Addr::from(FALLBACK).into()),
    };
    let mut s = DataplaneSettings::new(
        &redirect,
        Ipv4Addr::from(SOURCE),
        NO_IFINDEX.0,
        NO_IFINDEX.1,
        &opts,
    )
    .unwrap();
    s.config.local_tcp_port = 9190;
    dp.dp.configure(&s).unwrap();
    let scrape = tcp(CLIENT, POD, 40000, 9190, "S", b"");
    assert_eq!(
        dp.out(&scrape),
        (TC_ACT_OK, scrape.clone()),
        "left to the stack"
    );
    let (_, out) = dp.out(&udp(CLIENT, POD, 5000, 9190, b"x"));
    assert_eq!(daddr(&out), FALLBACK, "UDP on that port is the fallback's");
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40001, 9191, "S", b""));
    assert_eq!(daddr(&out), FALLBACK);
    let st = dp.stats();
    assert_eq!((st.no_rule, st.new_flows), (0, 2), "{st:?}");
}

#[test]
fn rules_are_replaced_without_leftovers() {
    let mut dp = Dp::standard();
    let opts = DataplaneOptions {
        bpffs_dir: Some(dp.dir.clone()),
        ..Default::default()
    };
    let redirect = RedirectConfig {
        rules: vec![rule(81, Protocol::Tcp, FALLBACK, 81)],
        fallback: None,
    };
    let s = DataplaneSettings::new(
        &redirect,
        Ipv4Addr::from(SOURCE),
        NO_IFINDEX.0,
        NO_IFINDEX.1,
        &opts,
    )
    .unwrap();
    dp.dp.configure(&s).unwrap();
    let syn80 = tcp(CLIENT, POD, 40000, 80, "S", b"");
    assert_eq!(dp.out(&syn80), (TC_ACT_OK, syn80.clone()), "old rule gone");
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40000, 81, "S", b""));
    assert_eq!(daddr(&out), FALLBACK);
}

// Replacements of the configuration: the programs see the old one or the new one, whole.

const SOURCE2: [u8; 4] = [192, 168, 12, 98];
const FALLBACK2: [u8; 4] = [203, 0, 113, 27];
const DEST2: [u8; 4] = [203, 0, 113, 28];

/// The settings a router with these rules, fallback and EGRESS_SOURCE writes into `dir`'s maps.
fn settings(
    dir: &std::path::Path,
    rules: Vec<RedirectRule>,
    fallback: Option<[u8; 4]>,
    source: [u8; 4],
) -> DataplaneSettings {
    let opts = DataplaneOptions {
        bpffs_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    let redirect = RedirectConfig {
        rules,
        fallback: fallback.map(|a| Ipv4Addr::from(a).into()),
    };
    DataplaneSettings::new(
        &redirect,
        Ipv4Addr::from(source),
        NO_IFINDEX.0,
        NO_IFINDEX.1,
        &opts,
    )
    .unwrap()
}

/// Where the eth0 program sent a frame: (source, destination, destination port).
fn sent_as(out: &[u8]) -> ([u8; 4], [u8; 4], u16) {
    (saddr(out), daddr(out), dport(out))
}

/// A rule as `status` lists it: ((protocol, local port), (destination, remote port)).
type Listed = ((u8, u16), ([u8; 4], u16));

impl Dp {
    /// The rules `status` lists.
    fn rules_in_force(&self) -> Vec<Listed> {
        status::StatusMaps::pinned(&self.dir)
            .and_then(|m| m.rules())
            .unwrap()
            .iter()
            .map(|(k, t)| ((k.proto, k.port), (t.daddr, t.dport)))
            .collect()
    }

    /// Entries of the RULES map, of every generation.
    fn rule_entries(&self) -> usize {
        let map = self.dp.ebpf.map(MAP_RULES).expect("the RULES map");
        let rules: aya::maps::HashMap<_, RuleKey, RuleTarget> = map.try_into().unwrap();
        rules.keys().count()
    }
}

/// A replacement written but not switched to is invisible: packets follow the old rules, the
/// old EGRESS_SOURCE and the old fallback (none), and `status` lists the old rules. After the
/// switch every new flow follows the new configuration whole. The rules replaced stay until
/// the next replacement clears them before writing its own, so the map never holds more than
/// two sets.
#[test]
fn a_staged_replacement_is_not_seen_until_its_switch_and_then_whole() {
    let mut dp = Dp::standard();
    let before = dp.rules_in_force();
    let b = settings(
        &dp.dir,
        vec![
            rule(80, Protocol::Tcp, FALLBACK, 81),
            rule(9090, Protocol::Tcp, DEST, 9091),
        ],
        Some(FALLBACK2),
        SOURCE2,
    );
    let staged = dp.dp.stage(&b).unwrap();
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    assert_eq!(
        sent_as(&out),
        (SOURCE, DEST, 80),
        "the old rule, the old source"
    );
    let syn = tcp(CLIENT, POD, 40001, 9090, "S", b"");
    assert_eq!(
        dp.out(&syn),
        (TC_ACT_OK, syn.clone()),
        "no rule and no fallback yet"
    );
    let (_, out) = dp.out(&udp(CLIENT, POD, 5000, 53, b"q"));
    assert_eq!(sent_as(&out), (SOURCE, DEST, 5353));
    assert_eq!(
        dp.rules_in_force(),
        before,
        "status lists the rules in force"
    );

    dp.dp.switch(&staged).unwrap();
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40010, 80, "S", b""));
    assert_eq!(sent_as(&out), (SOURCE2, FALLBACK, 81), "80: the new rule");
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40011, 9090, "S", b""));
    assert_eq!(sent_as(&out), (SOURCE2, DEST, 9091), "9090: the added rule");
    let (_, out) = dp.out(&udp(CLIENT, POD, 5010, 53, b"q"));
    assert_eq!(
        sent_as(&out),
        (SOURCE2, FALLBACK2, 53),
        "udp 53: its rule went, the new fallback takes it"
    );
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40012, 8080, "S", b""));
    assert_eq!(sent_as(&out), (SOURCE2, FALLBACK2, 8080));
    assert_eq!(
        dp.rules_in_force(),
        [((6, 80), (FALLBACK, 81)), ((6, 9090), (DEST, 9091))]
    );

    // Another replacement: the rules of two replacements ago are cleared first.
    let c = settings(
        &dp.dir,
        vec![rule(81, Protocol::Tcp, DEST, 82)],
        None,
        SOURCE,
    );
    dp.dp.configure(&c).unwrap();
    assert_eq!(dp.rules_in_force(), [((6, 81), (DEST, 82))]);
    assert_eq!(
        dp.rule_entries(),
        2 + 1,
        "the set replaced (2) and the one in force (1)"
    );
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40020, 81, "S", b""));
    assert_eq!(sent_as(&out), (SOURCE, DEST, 82));
    let syn = tcp(CLIENT, POD, 40021, 9090, "S", b"");
    assert_eq!(
        dp.out(&syn),
        (TC_ACT_OK, syn.clone()),
        "the replaced rule is gone"
    );
}

/// Packets run while another loader (a restarted router on the same pins) replaces the
/// configuration again and again, between two that differ in everything: EGRESS_SOURCE, the
/// fallback, and rules (1,000 each, the probed ones written last). Every new flow follows one
/// configuration whole: never a rule of one with the source or fallback of the other, nor the
/// fallback of one where its own rule is not written yet. (Written in place, in the order
/// CONFIG then rules, hundreds of flows in a run were a mix.)
#[test]
fn packets_racing_replacements_each_follow_one_configuration_whole() {
    const FILLER: u16 = 1000;
    const ROUNDS: u32 = 60;
    let set = |base: u16, dest: [u8; 4], probe: (u16, [u8; 4], u16)| {
        let mut v: Vec<RedirectRule> = (0..FILLER)
            .map(|i| rule(base + i, Protocol::Tcp, dest, 7))
            .collect();
        v.push(rule(probe.0, Protocol::Tcp, probe.1, probe.2));
        v
    };
    let a_rules = set(10000, DEST, (80, DEST, 81));
    let dp = Dp::new(a_rules.clone(), Some(FALLBACK), |_| {});
    let dir = dp.dir.clone();
    let a = settings(&dir, a_rules, Some(FALLBACK), SOURCE);
    let b = settings(
        &dir,
        set(20000, DEST2, (90, DEST2, 91)),
        Some(FALLBACK2),
        SOURCE2,
    );
    // (port probed, what A makes of it, what B makes of it)
    let probes = [
        (80, (SOURCE, DEST, 81), (SOURCE2, FALLBACK2, 80)),
        (90, (SOURCE, FALLBACK, 90), (SOURCE2, DEST2, 91)),
        (5000, (SOURCE, FALLBACK, 5000), (SOURCE2, FALLBACK2, 5000)),
    ];
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut seen = [0u64; 2];
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let opts = DataplaneOptions {
                bpffs_dir: Some(dir.clone()),
                ..Default::default()
            };
            let result = load(&opts).and_then(|mut w| {
                for i in 0..ROUNDS {
                    w.configure(if i % 2 == 0 { &b } else { &a })?;
                }
                Ok(())
            });
            done.store(true, Ordering::SeqCst);
            result
        });
        let mut i = 0u32;
        while !done.load(Ordering::SeqCst) {
            let (port, in_a, in_b) = probes[(i % 3) as usize];
            let client = [10, 130 + (i / 60000) as u8, 0, 10];
            let sport = 1024 + (i % 60000) as u16;
            let (v, out) = dp.out(&tcp(client, POD, sport, port, "S", b""));
            let got = sent_as(&out);
            assert_eq!(v, TC_ACT_OK, "flow {i} to port {port}");
            if got == in_a {
                seen[0] += 1;
            } else if got == in_b {
                seen[1] += 1;
            } else {
                done.store(true, Ordering::SeqCst);
                panic!(
                    "flow {i} to port {port} left as {got:?}: neither the first \
                     configuration's {in_a:?} nor the second's {in_b:?}"
                );
            }
            i += 1;
        }
        writer.join().unwrap().expect("the replacements");
    });
    eprintln!(
        "flows under the first configuration: {}, the second: {}",
        seen[0], seen[1]
    );
    assert!(
        seen[0] > 0 && seen[1] > 0,
        "packets ran under both configurations: {seen:?}"
    );
}

/// A configuration of RULES_MAX rules replaces another of RULES_MAX different ones (the map
/// holds two sets), and back; one rule more is refused before anything is written, the rules
/// in force untouched.
#[test]
fn a_full_set_of_rules_replaces_another_full_set_and_one_more_is_refused_whole() {
    let n = RULES_MAX as u16;
    let tcp_rules = |base: u16| -> Vec<RedirectRule> {
        (0..n)
            .map(|i| rule(base + i, Protocol::Tcp, DEST, 80))
            .collect()
    };
    let mut dp = Dp::new(tcp_rules(1000), None, |_| {});
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40000, 1000 + n - 1, "S", b""));
    assert_eq!(sent_as(&out), (SOURCE, DEST, 80));
    let b = settings(&dp.dir, tcp_rules(20000), None, SOURCE);
    dp.dp
        .configure(&b)
        .expect("a full set replaces another full set");
    assert_eq!(dp.rules_in_force().len(), n as usize);
    let syn = tcp(CLIENT, POD, 40001, 1000 + n - 1, "S", b"");
    assert_eq!(
        dp.out(&syn),
        (TC_ACT_OK, syn.clone()),
        "the old rule is not in force"
    );
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40002, 20000 + n - 1, "S", b""));
    assert_eq!(sent_as(&out), (SOURCE, DEST, 80), "the new one is");
    let a = settings(&dp.dir, tcp_rules(1000), None, SOURCE);
    dp.dp.configure(&a).expect("and back");
    assert_eq!(dp.rules_in_force().len(), n as usize);
    assert_eq!(dp.rule_entries(), 2 * n as usize);

    // One rule too many: refused when the settings are made, and by the writer too.
    let mut too_many = tcp_rules(20000);
    too_many.push(rule(9, Protocol::Udp, DEST, 9));
    let redirect = RedirectConfig {
        rules: too_many,
        fallback: None,
    };
    let err = DataplaneSettings::new(
        &redirect,
        Ipv4Addr::from(SOURCE2),
        NO_IFINDEX.0,
        NO_IFINDEX.1,
        &DataplaneOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(&format!("at most {RULES_MAX}")),
        "{err}"
    );
    let mut s = settings(&dp.dir, vec![], Some(FALLBACK), SOURCE2);
    s.rules = b.rules.clone();
    s.rules.push(a.rules[0]);
    assert!(
        dp.dp.configure(&s).is_err(),
        "the writer refuses it as well"
    );
    let before = dp.rules_in_force();
    assert_eq!(before.len(), n as usize);
    assert_eq!(
        before[0],
        ((6, 1000), (DEST, 80)),
        "the rules in force are untouched"
    );
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40003, 1000, "S", b""));
    assert_eq!(
        sent_as(&out),
        (SOURCE, DEST, 80),
        "and so are the source and fallback"
    );
    let syn = tcp(CLIENT, POD, 40004, 7, "S", b"");
    assert_eq!(dp.out(&syn), (TC_ACT_OK, syn.clone()), "no fallback");
}

/// Runs bpftool, returning its standard output; fails the test with its error output.
fn bpftool<'a>(args: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let args: Vec<&str> = args.into_iter().collect();
    let out = Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool must be installed (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// bpftool reads the pinned maps with BTF: named fields, readable values.
#[test]
fn bpftool_shows_named_fields_of_pinned_maps() {
    let dp = Dp::standard();
    dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    let dump = |map: &str| -> serde_json::Value {
        let path = dp.dir.join(map);
        let out = bpftool(["--json", "map", "dump", "pinned", path.to_str().unwrap()]);
        serde_json::from_slice(&out).unwrap()
    };
    let stats = dump("STATS");
    let text = stats.to_string();
    assert!(text.contains("\"eth0_rx_packets\""), "{text}");
    assert!(text.contains("\"drop_unsolicited\""), "{text}");
    // Exactly one CPU saw the packet.
    let seen: u64 = stats[0]["formatted"]["values"]
        .as_array()
        .expect("per-CPU values")
        .iter()
        .map(|c| c["value"]["out_packets"].as_u64().unwrap())
        .sum();
    assert_eq!(seen, 1, "{text}");
    let check = |flows: String| {
        for field in [
            "\"saddr\"",
            "\"sport\"",
            "\"last_seen_ns\"",
            "\"direction\"",
        ] {
            assert!(flows.contains(field), "{field} in {flows}");
        }
        assert!(flows.contains("40000"), "ports in host order: {flows}");
    };
    // Not answered yet, then answered.
    check(dump("NEW_FLOWS").to_string());
    dp.back(&tcp(DEST, SOURCE, 80, 40000, "SA", b""));
    check(dump("FLOWS").to_string());
    let config = dump("CONFIG").to_string();
    assert!(
        config.contains("\"egress_source\"") && config.contains("99"),
        "{config}"
    );
}

/// A pinned map left by a build with another layout is replaced, not misread.
#[test]
fn incompatible_pinned_maps_are_replaced() {
    let dp = Dp::standard();
    let dir = dp.dir.clone();
    std::mem::forget(dp); // keep the directory; the maps stay pinned
    // Swap FLOWS for a map with another value size, CONFIG for the hash map of one value of
    // the same sizes and RULES for one of the same sizes with room for one generation, as
    // older versions left.
    for (map, kind, key, value, entries) in [
        ("FLOWS", "lru_hash", "16", "8", "16"),
        ("CONFIG", "hash", "4", "44", "1"),
        ("RULES", "hash", "4", "8", "4096"),
    ] {
        std::fs::remove_file(dir.join(map)).unwrap();
        let pin = dir.join(map);
        bpftool([
            "map",
            "create",
            pin.to_str().unwrap(),
            "type",
            kind,
            "key",
            key,
            "value",
            value,
            "entries",
            entries,
            "name",
            map,
        ]);
    }
    let mut opts = DataplaneOptions {
        bpffs_dir: Some(dir.clone()),
        ..Default::default()
    };
    opts.conntrack_size = 1024;
    let dp = Dp {
        dp: load(&opts).expect("load over an incompatible pin"),
        dir,
    };
    let settings = DataplaneSettings::new(
        &RedirectConfig {
            rules: vec![rule(80, Protocol::Tcp, DEST, 80)],
            fallback: None,
        },
        Ipv4Addr::from(SOURCE),
        NO_IFINDEX.0,
        NO_IFINDEX.1,
        &opts,
    )
    .unwrap();
    let mut dp = dp;
    dp.dp.configure(&settings).unwrap();
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40000, 80, "S", b""));
    assert_eq!(daddr(&out), DEST);
    assert_eq!(dp.flows().len(), 2, "the new FLOWS map works");
    let info = |map: &str| {
        aya::maps::MapData::from_pin(dp.dir.join(map))
            .unwrap()
            .info()
            .unwrap()
    };
    assert_eq!(
        info("CONFIG").map_type().unwrap(),
        aya::maps::MapType::Array
    );
    assert_eq!(info("CONFIG").max_entries(), 2);
    assert_eq!(info("RULES").max_entries(), 2 * RULES_MAX);
    assert_eq!(dp.rules_in_force(), [((6, 80), (DEST, 80))]);
}

/// `status` of a dataplane pinned by an earlier build, without GENERATION and with CONFIG as
/// its one value in a hash map, or as the one slot of an array: it reads that configuration,
/// and the rules of the generation that configuration names.
#[test]
fn status_reads_the_configuration_earlier_layouts_pinned() {
    let dp = Dp::standard();
    let cfg = status::StatusMaps::pinned(&dp.dir)
        .unwrap()
        .config()
        .unwrap();
    assert_eq!(cfg.egress_source, SOURCE);
    assert_eq!(
        cfg.generation, 1,
        "a first configuration is written to the slot GENERATION does not name"
    );
    for kind in ["hash", "array"] {
        pin_earlier_config(&dp.dir, kind, &cfg);
        let st = status::StatusMaps::pinned(&dp.dir).unwrap();
        assert_eq!(st.config().unwrap(), cfg, "CONFIG as a {kind} of one");
        assert_eq!(st.rule_count().unwrap(), 3, "CONFIG as a {kind} of one");
    }
}

/// Pins of the build before this one, CONFIG a hash map naming generation 1: this build
/// replaces CONFIG and writes its first configuration under generation 0, leaving the rules
/// the earlier build's programs (attached until this build's replace them) look up under 1.
#[test]
fn an_upgrade_from_the_hash_config_writes_the_generation_the_earlier_programs_do_not_use() {
    let dp = Dp::standard();
    let dir = dp.dir.clone();
    let cfg = status::StatusMaps::pinned(&dir).unwrap().config().unwrap();
    assert_eq!(cfg.generation, 1);
    let mut earlier = dp.rules_in_force();
    earlier.sort();
    std::mem::forget(dp);
    pin_earlier_config(&dir, "hash", &cfg);
    let mut opts = DataplaneOptions {
        bpffs_dir: Some(dir.clone()),
        ..Default::default()
    };
    opts.conntrack_size = 1024;
    let mut dp = Dp {
        dp: load(&opts).expect("load over the earlier build's pins"),
        dir,
    };
    let b = settings(
        &dp.dir,
        vec![rule(90, Protocol::Tcp, DEST, 91)],
        None,
        SOURCE,
    );
    let staged = dp.dp.stage(&b).unwrap();
    assert_eq!(staged.generation(), 0);
    let rules = dp.dp.ebpf.map(MAP_RULES).expect("the RULES map");
    let rules: aya::maps::HashMap<_, RuleKey, RuleTarget> = rules.try_into().unwrap();
    let mut under_1: Vec<Listed> = rules
        .iter()
        .map(Result::unwrap)
        .filter(|(k, _)| k.generation == 1)
        .map(|(k, t)| ((k.proto, k.port), (t.daddr, t.dport)))
        .collect();
    under_1.sort();
    assert_eq!(
        under_1, earlier,
        "the earlier programs' rules are untouched"
    );
    dp.dp.switch(&staged).unwrap();
    assert_eq!(dp.rules_in_force(), [((6, 90), (DEST, 91))]);
    let (_, out) = dp.out(&tcp(CLIENT, POD, 40000, 90, "S", b""));
    assert_eq!(sent_as(&out), (SOURCE, DEST, 91));
}

/// Replaces the pins of CONFIG and GENERATION with the one CONFIG an earlier build pinned: a
/// `kind` ("hash" or "array") of one value, `cfg`.
fn pin_earlier_config(dir: &std::path::Path, kind: &str, cfg: &egress_common::DataplaneConfig) {
    // SAFETY: DataplaneConfig is plain #[repr(C)] data without padding holes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (cfg as *const egress_common::DataplaneConfig).cast::<u8>(),
            std::mem::size_of_val(cfg),
        )
    };
    let value: Vec<String> = bytes.iter().map(u8::to_string).collect();
    let config = dir.join("CONFIG");
    let config = config.to_str().unwrap();
    let _ = std::fs::remove_file(dir.join("GENERATION"));
    std::fs::remove_file(config).unwrap();
    let size = bytes.len().to_string();
    bpftool([
        "map", "create", config, "type", kind, "key", "4", "value", &size, "entries", "1", "name",
        "CONFIG",
    ]);
    let mut update = vec!["map", "update", "pinned", config, "key", "0", "0", "0", "0"];
    update.push("value");
    update.extend(value.iter().map(String::as_str));
    bpftool(update);
}

// The forwarding path, with a FIB that resolves.

/// The router namespace of a reference topology, set up as egress-router leaves it (macvlan0
/// configured, forwarding on) with permanent neighbours for the gateway and the client, so that
/// every FIB lookup from it resolves and a translated packet takes the program's own forwarding
/// path: TTL decremented, MACs rewritten, TC_ACT_REDIRECT.
struct Lan {
    topo: Topology,
    l2: L2,
}

/// Interface indexes and MACs of the router namespace and its neighbours.
#[derive(Clone, Copy)]
struct L2 {
    eth0: u32,
    macvlan: u32,
    eth0_mac: [u8; 6],
    macvlan_mac: [u8; 6],
    gw_mac: [u8; 6],
    client_mac: [u8; 6],
}

/// The hops of a translated flow: client -> eth0, macvlan0 -> gateway, and back.
impl L2 {
    fn client_in(&self) -> Hop {
        Hop {
            src: self.client_mac,
            dst: self.eth0_mac,
            ttl: 64,
        }
    }
    fn gateway_out(&self) -> Hop {
        Hop {
            src: self.macvlan_mac,
            dst: self.gw_mac,
            ttl: 63,
        }
    }
    fn gateway_in(&self) -> Hop {
        Hop {
            src: self.gw_mac,
            dst: self.macvlan_mac,
            ttl: 64,
        }
    }
    fn client_out(&self) -> Hop {
        Hop {
            src: self.eth0_mac,
            dst: self.client_mac,
            ttl: 63,
        }
    }
}

fn mac_text(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

impl Lan {
    fn new() -> Lan {
        let topo = Topology::new().expect("building the namespace topology");
        topo.configure_macvlan().expect("configuring macvlan0");
        // Set, not assumed: the FIB answers only for interfaces that forward.
        topo.router
            .set_sysctl("net.ipv4.conf.all.forwarding", "1")
            .unwrap();
        let gw_mac = topo.lan.mac(LAN_IF).unwrap();
        let client_mac = topo.client.mac(CLIENT_IF).unwrap();
        for (ip, mac, dev) in [
            (GATEWAY, gw_mac, MACVLAN),
            (CLIENT, client_mac, ROUTER_ETH0),
        ] {
            let mut cmd = Command::new("ip");
            cmd.args(["neigh", "replace", &Ipv4Addr::from(ip).to_string()])
                .args(["lladdr", &mac_text(mac), "dev", dev, "nud", "permanent"])
                .stderr(std::process::Stdio::piped());
            let out = topo
                .router
                .spawn(cmd)
                .unwrap()
                .output(Duration::from_secs(10))
                .unwrap();
            assert!(
                out.status.success(),
                "ip neigh replace {ip:?} on {dev}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let l2 = L2 {
            eth0: topo.router.ifindex(ROUTER_ETH0).unwrap(),
            macvlan: topo.router.ifindex(MACVLAN).unwrap(),
            eth0_mac: topo.router.mac(ROUTER_ETH0).unwrap(),
            macvlan_mac: topo.router.mac(MACVLAN).unwrap(),
            gw_mac,
            client_mac,
        };
        Lan { topo, l2 }
    }

    /// Runs `f` with a dataplane configured for the router namespace's interfaces, on a thread
    /// inside that namespace: BPF_PROG_TEST_RUN makes the program's FIB lookups in the caller's.
    fn run<T: Send>(
        &self,
        rules: Vec<RedirectRule>,
        fallback: Option<[u8; 4]>,
        f: impl FnOnce(&Dp, L2) -> T + Send,
    ) -> T {
        let l2 = self.l2;
        self.topo.router.run(move || {
            let dp = Dp::on((l2.eth0, l2.macvlan), rules, fallback, |_| {});
            f(&dp, l2)
        })
    }
}

/// Asserts the program forwarded `frame` itself (TC_ACT_REDIRECT) as exactly `expected`.
fn assert_forwarded(got: (u32, Vec<u8>), expected: &[u8], what: &str) {
    assert_eq!(got.0, TC_ACT_REDIRECT, "{what}: verdict");
    assert_eq!(
        got.1, expected,
        "{what}: every byte (MACs, TTL, addresses, ports, checksums)"
    );
    assert_checksums(&got.1, None);
}

#[test]
fn forwarded_tcp_is_rewritten_byte_for_byte_and_redirected() {
    let lan = Lan::new();
    lan.run(vec![rule(8080, Protocol::Tcp, DEST, 80)], None, |dp, l2| {
        let syn = tcp_via(l2.client_in(), CLIENT, POD, 40000, 8080, "S", b"");
        let want = tcp_via(l2.gateway_out(), SOURCE, DEST, 40000, 80, "S", b"");
        assert_forwarded(dp.out(&syn), &want, "SYN out");
        let synack = tcp_via(l2.gateway_in(), DEST, SOURCE, 80, 40000, "SA", b"");
        let want = tcp_via(l2.client_out(), POD, CLIENT, 8080, 40000, "SA", b"");
        assert_forwarded(dp.back(&synack), &want, "SYN-ACK back");
        // A new flow's first packet is looked up without caching (its entry was just written
        // from scratch space): the second packet out looks up again and caches the answer.
        let body = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let data = tcp_via(l2.client_in(), CLIENT, POD, 40000, 8080, "A", body);
        let want = tcp_via(l2.gateway_out(), SOURCE, DEST, 40000, 80, "A", body);
        assert_forwarded(dp.out(&data), &want, "data out");
        assert_eq!(dp.stats().fib_lookups, 3);
        // From then on both directions take the cached route: the same bytes, no lookup.
        assert_forwarded(dp.out(&data), &want, "data out, cached route");
        let ack = tcp_via(l2.gateway_in(), DEST, SOURCE, 80, 40000, "A", b"");
        let want = tcp_via(l2.client_out(), POD, CLIENT, 8080, 40000, "A", b"");
        assert_forwarded(dp.back(&ack), &want, "ACK back, cached route");
        let s = dp.stats();
        assert_eq!(
            (s.fib_lookups, s.fib_pass, s.out_packets, s.in_packets),
            (3, 0, 3, 2),
            "{s:?}"
        );
        // Where each direction is redirected: the cached egress device and next hop.
        for (k, v) in dp.flows() {
            let (ifindex, dmac) = if v.direction == DIR_OUT {
                (l2.macvlan, l2.gw_mac)
            } else {
                (l2.eth0, l2.client_mac)
            };
            assert_eq!((v.route.ifindex, v.route.dmac), (ifindex, dmac), "{k:?}");
        }
    });
}

#[test]
fn forwarded_udp_and_icmp_echo_are_rewritten_byte_for_byte_and_redirected() {
    let lan = Lan::new();
    let rules = vec![rule(53, Protocol::Udp, DEST, 5353)];
    lan.run(rules, Some(FALLBACK), |dp, l2| {
        let q = udp_via(l2.client_in(), CLIENT, POD, 5000, 53, b"query");
        let want = udp_via(l2.gateway_out(), SOURCE, DEST, 5000, 5353, b"query");
        assert_forwarded(dp.out(&q), &want, "UDP out");
        let a = udp_via(l2.gateway_in(), DEST, SOURCE, 5353, 5000, b"answer");
        let want = udp_via(l2.client_out(), POD, CLIENT, 53, 5000, b"answer");
        assert_forwarded(dp.back(&a), &want, "UDP back");
        // A zero UDP checksum ("none") stays zero; a TTL of 2 leaves with 1.
        let csum = 14 + 20 + 6;
        let mut q = udp_via(l2.client_in(), CLIENT, POD, 5000, 53, b"query");
        q[csum..csum + 2].fill(0);
        let mut want = udp_via(l2.gateway_out(), SOURCE, DEST, 5000, 5353, b"query");
        want[csum..csum + 2].fill(0);
        assert_forwarded(dp.out(&q), &want, "UDP without checksum");
        let hop = Hop {
            ttl: 2,
            ..l2.client_in()
        };
        let q = udp_via(hop, CLIENT, POD, 5000, 53, b"query");
        let hop = Hop {
            ttl: 1,
            ..l2.gateway_out()
        };
        let want = udp_via(hop, SOURCE, DEST, 5000, 5353, b"query");
        assert_forwarded(dp.out(&q), &want, "TTL 2");
        // ICMP echo through the fallback, both ways.
        let ping = echo_via(l2.client_in(), CLIENT, POD, true, 77);
        let want = echo_via(l2.gateway_out(), SOURCE, FALLBACK, true, 77);
        assert_forwarded(dp.out(&ping), &want, "echo request out");
        let pong = echo_via(l2.gateway_in(), FALLBACK, SOURCE, false, 77);
        let want = echo_via(l2.client_out(), POD, CLIENT, false, 77);
        assert_forwarded(dp.back(&pong), &want, "echo reply back");
        assert_eq!(dp.stats().fib_pass, 0);
    });
}

/// "Fragmentation needed" from the gateway about a translated packet reaches the client as an
/// error about the packet it sent: outer and quoted headers rewritten, every byte checked.
#[test]
fn a_forwarded_icmp_error_is_rewritten_byte_for_byte_and_redirected() {
    let lan = Lan::new();
    lan.run(vec![rule(8080, Protocol::Tcp, DEST, 80)], None, |dp, l2| {
        let payload = [7u8; 100];
        let syn = tcp_via(l2.client_in(), CLIENT, POD, 40000, 8080, "S", &payload);
        let (v, out) = dp.out(&syn);
        assert_eq!(v, TC_ACT_REDIRECT);
        let frag_needed =
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1400,
            });
        let mut err = Vec::new();
        PacketBuilder::ethernet2(l2.gw_mac, l2.macvlan_mac)
            .ipv4(GATEWAY, SOURCE, 64)
            .icmpv4(frag_needed.clone())
            .write(&mut err, &ip(&out)[..20 + 28])
            .unwrap();
        // The quoted packet as the client sent it (with the TTL it left the router with), but
        // for its TCP checksum: only the outer ICMP checksum covers the quoted bytes, so the
        // translated packet's stays.
        let sent = tcp_via(
            Hop {
                ttl: 63,
                ..l2.client_in()
            },
            CLIENT,
            POD,
            40000,
            8080,
            "S",
            &payload,
        );
        let mut quoted = ip(&sent)[..20 + 28].to_vec();
        quoted[36..38].copy_from_slice(&ip(&out)[36..38]);
        let mut want = Vec::new();
        PacketBuilder::ethernet2(l2.eth0_mac, l2.client_mac)
            .ipv4(POD, CLIENT, 63)
            .icmpv4(frag_needed)
            .write(&mut want, &quoted)
            .unwrap();
        assert_forwarded(dp.back(&err), &want, "fragmentation needed back");
    });
}

/// A next hop without a neighbour entry: the kernel resolves it (bpf_redirect_neigh), so the
/// program leaves the MACs alone and still forwards the packet itself, TTL decremented.
#[test]
fn a_next_hop_without_a_neighbour_is_redirected_for_the_kernel_to_resolve() {
    let lan = Lan::new();
    lan.run(vec![rule(80, Protocol::Tcp, DEST, 80)], None, |dp, l2| {
        let syn = tcp_via(l2.client_in(), CLIENT2, POD, 40000, 80, "S", b"");
        dp.out(&syn);
        let synack = tcp_via(l2.gateway_in(), DEST, SOURCE, 80, 40000, "SA", b"");
        let (v, back) = dp.back(&synack);
        let hop = Hop {
            ttl: 63,
            ..l2.gateway_in()
        };
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(
            back,
            tcp_via(hop, POD, CLIENT2, 80, 40000, "SA", b""),
            "MACs as they came, the rest translated"
        );
        let s = dp.stats();
        assert_eq!((s.fib_pass, s.in_packets), (0, 1), "{s:?}");
    });
}
