//! Fuzzing the two tc programs through BPF_PROG_TEST_RUN: frames generated from seeds of every
//! class the packet tests use (TCP with flags and options, UDP with and without a checksum,
//! ICMP echo and errors quoting a header, fragments, IP options, SCTP, truncations), mutated
//! (bit flips, field overwrites aimed at the parser, truncation, extension, splicing) and fed
//! to both programs, with the flow table filled by what the eth0 program creates on the way.
//! Every output is checked against invariants:
//!
//! - the run succeeds and the verdict is TC_ACT_OK or TC_ACT_SHOT (the FIB resolves nothing
//!   here, so a translated frame goes to the stack, never TC_ACT_REDIRECT);
//! - the verdict class (left to the stack, dropped, translated) is the one the NAT model of
//!   egress-common (`nat_model`) gives, and a translated frame is byte for byte the model's:
//!   addresses, ports, ICMP identifier, the quoted headers of ICMP errors, and every checksum
//!   (IPv4 header, TCP, UDP with its zero, ICMP, SCTP CRC32c) recomputed from scratch by the
//!   model, plus the error the input carried. A new flow's source port is the one choice the
//!   program makes: the client's own if free, else one of the range no live flow holds;
//! - valid IPv4, TCP, UDP, ICMP and SCTP checksums in give valid checksums out, checked on
//!   their own; a frame never changes length;
//! - nothing unsolicited is translated into the cluster: macvlan0 rewrites only packets to
//!   EGRESS_SOURCE, towards a client and from the address of a flow that client opened.
//!
//! The model reads the fuzzer's own record of the flows (and first fragments) it made, kept
//! from the model's answers, never the program's maps; the tables are emptied before they
//! fill (LRU eviction is not modelled), and then the program's tables must hold exactly the
//! record's keys. Timeouts are set longer than any run (the model has no clock).
//!
//! BPF programs give no coverage feedback to user space, so this is a mutation fuzzer, not a
//! coverage-guided one. `EGRESS_FUZZ_SECONDS` bounds the run (default 45; `cargo xtask fuzz`
//! gives its --seconds), `EGRESS_FUZZ_SEED` replays a run; a violation panics with the seed
//! and the frames in hex, with the bytes that differ from the model's marked. Needs root.
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

mod frames;

use aya::{
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use egress_common::{
    FlowKey, FlowValue, FragKey, FragValue, MAP_FLOWS, MAP_FRAGS, MAP_NEW_FLOWS, PROG_ETH0_INGRESS,
    PROG_MACVLAN_INGRESS, PROTO_TCP, PROTO_UDP,
    nat_model::{
        self, Direction, Entry, FlowState, FragId, NewFlow, Outcome, PortChoice, Route, Side, Tuple,
    },
};
use egress_router::{
    config::{Mode, Protocol, RedirectConfig, RedirectRule},
    dataplane::{Dataplane, DataplaneOptions, DataplaneSettings},
};
use etherparse::checksum::Sum16BitWords;
use frames::{echo, raw_ipv4, tcp, udp};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: [u8; 4] = [10, 128, 0, 10];
const POD: [u8; 4] = [10, 128, 0, 5];
const SOURCE: [u8; 4] = [192, 168, 12, 99];
const DEST: [u8; 4] = [203, 0, 113, 25];
const FALLBACK: [u8; 4] = [203, 0, 113, 26];
const OTHER: [u8; 4] = [192, 168, 12, 7];
/// Rules: (local port, protocol, destination, remote port).
const RULES: [(u16, u8, [u8; 4], u16); 3] = [
    (80, PROTO_TCP, DEST, 80),
    (8080, PROTO_TCP, DEST, 8081),
    (53, PROTO_UDP, DEST, 5353),
];
/// The router's own TCP listener (metrics and health): never the fallback's.
const LOCAL_TCP_PORT: u16 = 9100;
/// Longer than any run: the model has no clock.
const NO_TIMEOUT: u32 = 86_400;
/// The source port range (the loader's default).
const PORT_RANGE: (u16, u16) = (1024, 65535);
/// Flow entries (two per flow) and fragment records at which the fuzzer empties the tables,
/// far below their sizes (65536 and 4096): LRU eviction starts before a table is full, and it
/// is not modelled.
const MAX_ENTRIES: usize = 16_384;
const MAX_FRAGS: usize = 1_024;

/// Interface indexes that exist nowhere: the FIB lookup fails and rewritten frames come back.
const NO_IFINDEX: (u32, u32) = (0x7fff_0001, 0x7fff_0002);

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

struct Dp {
    dp: Dataplane,
    dir: PathBuf,
    settings: DataplaneSettings,
}

impl Drop for Dp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Dp {
    fn new() -> Dp {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the program fuzzer needs root (BPF_PROG_LOAD, bpffs)"
        );
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/egress-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let opts = DataplaneOptions {
            bpffs_dir: Some(dir.clone()),
            port_range: PORT_RANGE,
            tcp_timeout: NO_TIMEOUT,
            tcp_closing_timeout: NO_TIMEOUT,
            udp_timeout: NO_TIMEOUT,
            icmp_timeout: NO_TIMEOUT,
            ..Default::default()
        };
        let mut dp = Dataplane::load(&opts, Dataplane::preflight(&opts, Mode::Legacy).unwrap())
            .expect("loading the eBPF dataplane");
        let rules = RULES
            .iter()
            .map(|&(local_port, proto, dest, remote_port)| RedirectRule {
                local_port,
                protocol: if proto == PROTO_TCP {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                destination: Ipv4Addr::from(dest).into(),
                remote_port,
                line: 1,
            })
            .collect();
        let redirect = RedirectConfig {
            rules,
            fallback: Some(Ipv4Addr::from(FALLBACK).into()),
        };
        let mut settings = DataplaneSettings::new(
            &redirect,
            Ipv4Addr::from(SOURCE),
            NO_IFINDEX.0,
            NO_IFINDEX.1,
            &opts,
        )
        .unwrap();
        settings.config.local_tcp_port = LOCAL_TCP_PORT;
        dp.configure(&settings).unwrap();
        Dp { dp, dir, settings }
    }

    /// Writes the same configuration again: its rules go under the other generation, so the
    /// programs are fuzzed looking rules up under both. Returns the generation now in force.
    fn rewrite(&mut self) -> u8 {
        let staged = self.dp.stage(&self.settings).unwrap();
        self.dp.switch(&staged).unwrap();
        staged.generation()
    }

    /// Runs `prog` on `frame`: its verdict and the frame it left, or None when the kernel
    /// refused the input before running the program (test_run's own checks on the frame: the
    /// program cannot make the call fail).
    fn run(&self, prog: &str, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        let p: &SchedClassifier = self.dp.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        match p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        }) {
            Ok(r) => {
                out.truncate(r.data_size_out as usize);
                Some((r.return_value, out))
            }
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                None
            }
            Err(e) => panic!("BPF_PROG_TEST_RUN failed on {}: {e:?}", hex(frame)),
        }
    }

    fn table(&self, name: &str) -> HashMap<&aya::maps::MapData, FlowKey, FlowValue> {
        HashMap::try_from(self.dp.ebpf.map(name).unwrap()).unwrap()
    }

    /// Entries of both connection tables.
    fn flow_count(&self) -> usize {
        [MAP_FLOWS, MAP_NEW_FLOWS]
            .map(|t| self.table(t).keys().count())
            .iter()
            .sum()
    }

    /// The entry for `k` as the programs find it: an answered flow's, else a new one's.
    fn flow(&self, k: &FlowKey) -> Option<FlowValue> {
        let answered = self.table(MAP_FLOWS).get(k, 0).ok();
        answered.or_else(|| self.table(MAP_NEW_FLOWS).get(k, 0).ok())
    }

    fn frags(&self) -> HashMap<&aya::maps::MapData, FragKey, FragValue> {
        HashMap::try_from(self.dp.ebpf.map(MAP_FRAGS).unwrap()).unwrap()
    }

    /// Checks that the tables hold exactly the record's flows and fragments, then empties
    /// both.
    fn reset(&mut self, record: &mut Record) -> Result<(), String> {
        let mut keys = HashSet::new();
        for t in [MAP_FLOWS, MAP_NEW_FLOWS] {
            for k in self.table(t).keys() {
                keys.insert(tuple(&k.unwrap()));
            }
        }
        let want: HashSet<Tuple> = record.flows.keys().copied().collect();
        if keys != want {
            let extra: Vec<_> = keys.difference(&want).take(4).collect();
            let missing: Vec<_> = want.difference(&keys).take(4).collect();
            return Err(format!(
                "the tables hold {} entries, the model's record {}: not predicted {extra:?}, \
                 missing {missing:?}",
                keys.len(),
                want.len()
            ));
        }
        let frags: HashSet<FragId> = self
            .frags()
            .keys()
            .map(|k| {
                let k = k.unwrap();
                FragId {
                    saddr: k.saddr,
                    daddr: k.daddr,
                    id: k.id,
                    proto: k.proto,
                }
            })
            .collect();
        let want: HashSet<FragId> = record.frags.keys().copied().collect();
        if frags != want {
            return Err(format!(
                "FRAGS holds {} datagrams, the model's record {}",
                frags.len(),
                want.len()
            ));
        }
        for t in [MAP_FLOWS, MAP_NEW_FLOWS] {
            let mut m: HashMap<&mut aya::maps::MapData, FlowKey, FlowValue> =
                HashMap::try_from(self.dp.ebpf.map_mut(t).unwrap()).unwrap();
            let all: Vec<FlowKey> = m.keys().map(Result::unwrap).collect();
            for k in all {
                m.remove(&k).unwrap();
            }
        }
        let mut m: HashMap<&mut aya::maps::MapData, FragKey, FragValue> =
            HashMap::try_from(self.dp.ebpf.map_mut(MAP_FRAGS).unwrap()).unwrap();
        let all: Vec<FragKey> = m.keys().map(Result::unwrap).collect();
        for k in all {
            m.remove(&k).unwrap();
        }
        *record = Record::default();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The fuzzer's own record of the flows, kept from the model's answers

#[derive(Default)]
struct Record {
    flows: StdHashMap<Tuple, Entry>,
    frags: StdHashMap<FragId, (u16, u16)>,
    /// (saddr, daddr) of the inbound entries' translations: from a flow's destination as the
    /// client knows it, to the client.
    towards_clients: StdHashMap<([u8; 4], [u8; 4]), usize>,
}

impl FlowState for Record {
    fn entry(&self, key: &Tuple) -> Option<Entry> {
        self.flows.get(key).copied()
    }
    fn fragment(&self, id: &FragId) -> Option<(u16, u16)> {
        self.frags.get(id).copied()
    }
}

impl Record {
    fn add(&mut self, nf: &NewFlow) {
        for (k, e) in nf.entries() {
            if let Some(old) = self.flows.insert(k, e) {
                self.forget(&old);
            }
            if e.direction == Direction::In {
                *self
                    .towards_clients
                    .entry((e.tuple.saddr, e.tuple.daddr))
                    .or_default() += 1;
            }
        }
    }

    fn forget(&mut self, e: &Entry) {
        if e.direction == Direction::In {
            let k = (e.tuple.saddr, e.tuple.daddr);
            if let Some(n) = self.towards_clients.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.towards_clients.remove(&k);
                }
            }
        }
    }
}

fn tuple(k: &FlowKey) -> Tuple {
    Tuple {
        saddr: k.saddr,
        daddr: k.daddr,
        sport: k.sport,
        dport: k.dport,
        proto: k.proto,
    }
}

fn flow_key(t: &Tuple) -> FlowKey {
    FlowKey {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        _pad0: 0,
        _pad1: 0,
    }
}

fn model_rules() -> Vec<nat_model::Rule> {
    RULES
        .iter()
        .map(|&(port, proto, daddr, dport)| nat_model::Rule {
            port,
            proto,
            daddr,
            dport,
        })
        .collect()
}

fn model_config(rules: &[nat_model::Rule]) -> nat_model::Config<'_> {
    nat_model::Config {
        egress_source: SOURCE,
        fallback: Some(FALLBACK),
        rules,
        local_tcp_port: LOCAL_TCP_PORT,
        port_min: PORT_RANGE.0,
        port_max: PORT_RANGE.1,
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds

const PAYLOAD: &[u8] = b"payload of a segment";

/// A UDP frame, with its checksum zeroed (none) when `zero_csum`.
fn udp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, zero_csum: bool) -> Vec<u8> {
    let mut v = udp(src, dst, sport, dport, PAYLOAD);
    if zero_csum {
        v[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    }
    v
}

fn raw(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    mf: bool,
    frag: u16,
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    raw_ipv4(proto, src, dst, 0x1234, mf, frag, options, l4)
}

/// An ICMP destination-unreachable (fragmentation needed) from `from` to `to` quoting the IP
/// header and first 8 bytes of `quoted`'s packet.
fn icmp_error(from: [u8; 4], to: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let q = &quoted[14..14 + 28];
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend_from_slice(q);
    let c = Sum16BitWords::new().add_slice(&icmp).ones_complement();
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    raw(1, from, to, false, 0, &[], &icmp)
}

/// The seed frames and the program each is meant for (true: eth0).
fn seeds() -> Vec<(bool, Vec<u8>)> {
    let mut s = Vec::new();
    for &(port, proto, _, _) in &RULES {
        for sport in [40000, 1024] {
            if proto == PROTO_TCP {
                for flags in ["S", "A", "FA", "R", "SA"] {
                    s.push((true, tcp(CLIENT, POD, sport, port, flags, PAYLOAD)));
                }
            } else {
                s.push((true, udp_frame(CLIENT, POD, sport, port, false)));
                s.push((true, udp_frame(CLIENT, POD, sport, port, true)));
            }
        }
    }
    // Fallback traffic, ICMP echo, SCTP, fragments, options.
    s.push((true, tcp(CLIENT, POD, 40001, 443, "S", PAYLOAD)));
    s.push((true, udp_frame(CLIENT, POD, 40002, 9999, false)));
    s.push((true, echo(CLIENT, POD, true, 0x4242)));
    let sctp = [
        0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0x10, 0, 0,
        1, 0, 1, 0, 0, 0, 1,
    ];
    s.push((true, raw(132, CLIENT, POD, false, 0, &[], &sctp)));
    // SCTP with its CRC32c filled in, and its reply.
    let mut crc = sctp;
    crc[0..2].copy_from_slice(&40010u16.to_be_bytes());
    let c = egress_common::sctp::checksum_field(&crc);
    crc[8..12].copy_from_slice(&c);
    s.push((true, raw(132, CLIENT, POD, false, 0, &[], &crc)));
    let mut back = crc;
    back[0..4].copy_from_slice(&[0, 0x50, 0x9c, 0x4a]);
    let c = egress_common::sctp::checksum_field(&back);
    back[8..12].copy_from_slice(&c);
    s.push((false, raw(132, FALLBACK, SOURCE, false, 0, &[], &back)));
    // A protocol without ports (GRE), and the router's own listener.
    s.push((
        true,
        raw(47, CLIENT, POD, false, 0, &[], &[0, 0, 0x08, 0, 1, 2, 3, 4]),
    ));
    s.push((true, tcp(CLIENT, POD, 40005, LOCAL_TCP_PORT, "S", PAYLOAD)));
    let udp_l4 = &udp_frame(CLIENT, POD, 40003, 53, false)[34..];
    s.push((true, raw(17, CLIENT, POD, true, 0, &[], &udp_l4[..16])));
    s.push((true, raw(17, CLIENT, POD, false, 2, &[], &udp_l4[16..])));
    s.push((
        true,
        raw(
            6,
            CLIENT,
            POD,
            false,
            0,
            &[1, 1, 1, 0],
            &tcp(CLIENT, POD, 40004, 80, "S", PAYLOAD)[34..],
        ),
    ));
    // Replies and unsolicited traffic on macvlan0, ICMP errors about flows both ways.
    for &(_, proto, dest, rport) in &RULES {
        for dport in [40000, 1024, 33000] {
            if proto == PROTO_TCP {
                s.push((false, tcp(dest, SOURCE, rport, dport, "SA", PAYLOAD)));
                s.push((false, tcp(dest, SOURCE, rport, dport, "R", PAYLOAD)));
            } else {
                s.push((false, udp_frame(dest, SOURCE, rport, dport, false)));
            }
        }
    }
    s.push((false, tcp(FALLBACK, SOURCE, 443, 40001, "SA", PAYLOAD)));
    s.push((false, echo(DEST, SOURCE, false, 0x4242)));
    s.push((false, tcp(DEST, OTHER, 80, 40000, "SA", PAYLOAD)));
    s.push((false, udp_frame(DEST, CLIENT, 5353, 40000, false)));
    let out = tcp(SOURCE, DEST, 40000, 80, "S", PAYLOAD);
    s.push((false, icmp_error(OTHER, SOURCE, &out)));
    let back = tcp(POD, CLIENT, 80, 40000, "SA", PAYLOAD);
    s.push((true, icmp_error(CLIENT, POD, &back)));
    // Errors about an echo request and a UDP datagram.
    let ping = echo(SOURCE, FALLBACK, true, 0x4242);
    s.push((false, icmp_error(OTHER, SOURCE, &ping)));
    let dns = udp_frame(SOURCE, DEST, 40000, 5353, false);
    s.push((false, icmp_error(OTHER, SOURCE, &dns)));
    s.push((
        false,
        raw(
            47,
            FALLBACK,
            SOURCE,
            false,
            0,
            &[],
            &[0, 0, 0x08, 0, 1, 2, 3, 4],
        ),
    ));
    s
}

// ---------------------------------------------------------------------------------------------
// Mutations

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, other: &[u8]) {
    let interesting_u16: [u16; 10] = [0, 1, 53, 80, 8080, 1024, 40000, 0xffff, 0x8000, 9100];
    for _ in 0..=rng.below(3) {
        if frame.is_empty() {
            // A truncation took everything: start again from one byte.
            frame.push(rng.next() as u8);
        }
        let len = frame.len();
        match rng.below(10) {
            // A bit flip anywhere.
            0 | 1 => {
                let i = rng.below(len);
                frame[i] ^= 1 << rng.below(8);
            }
            // A byte of the IPv4 header: version/IHL, TOS, length, id, flags and fragment
            // offset, TTL, protocol, checksum.
            2 => {
                let i = 14 + rng.below(12);
                if i < len {
                    frame[i] = rng.next() as u8;
                }
            }
            // An address set to one the programs care about.
            3 => {
                let a = rng.pick(&[
                    CLIENT,
                    POD,
                    SOURCE,
                    DEST,
                    FALLBACK,
                    OTHER,
                    [0, 0, 0, 0],
                    [255; 4],
                ]);
                let at = 14 + 12 + 4 * rng.below(2);
                if at + 4 <= len {
                    frame[at..at + 4].copy_from_slice(&a);
                }
            }
            // A port (or the bytes after the IP header) set to an interesting value.
            4 => {
                let at = 34 + 2 * rng.below(4);
                if at + 2 <= len {
                    frame[at..at + 2].copy_from_slice(&rng.pick(&interesting_u16).to_be_bytes());
                }
            }
            // The protocol byte.
            5 => {
                if len > 23 {
                    frame[23] = rng.pick(&[1, 6, 17, 132, 0, 255]);
                }
            }
            // Truncation.
            6 => frame.truncate(rng.below(len + 1)),
            // Extension with garbage or zeroes.
            7 => {
                let n = rng.below(64);
                for _ in 0..n {
                    frame.push(rng.next() as u8);
                }
            }
            // Splice the tail of another seed.
            8 => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                frame.truncate(cut);
                frame.extend_from_slice(&other[from..]);
            }
            // The EtherType.
            _ => {
                if len > 13 {
                    let t: u16 = rng.pick(&[0x0800, 0x86dd, 0x0806, 0x8100]);
                    frame[12..14].copy_from_slice(&t.to_be_bytes());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Invariants

struct View {
    ihl: usize,
    total: usize,
    proto: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
    fragment: bool,
}

/// The IPv4 header of a frame, if it has a well-formed one that covers the frame's IP part.
fn view(f: &[u8]) -> Option<View> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
        return None;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    if ihl < 20 || total < ihl || 14 + total > f.len() {
        return None;
    }
    let frag = u16::from_be_bytes([f[20], f[21]]);
    Some(View {
        ihl,
        total,
        proto: f[23],
        saddr: f[26..30].try_into().unwrap(),
        daddr: f[30..34].try_into().unwrap(),
        fragment: frag & 0x3fff != 0,
    })
}

fn ip_csum_ok(f: &[u8], v: &View) -> bool {
    Sum16BitWords::new()
        .add_slice(&f[14..14 + v.ihl])
        .ones_complement()
        == 0
}

/// Whether the L4 checksum of an unfragmented TCP, UDP, ICMP or SCTP packet is valid (true
/// for a zero UDP checksum, which means none, and a zero SCTP one, left to offload; for an
/// ICMP error, the quoted IPv4 header's checksum too); None for other protocols and fragments.
fn l4_csum_ok(f: &[u8], v: &View) -> Option<bool> {
    let min = match v.proto {
        6 => 20,
        17 | 1 => 8,
        132 => 12,
        _ => return None,
    };
    let l4 = &f[14 + v.ihl..14 + v.total];
    if v.fragment || l4.len() < min {
        return None;
    }
    Some(match v.proto {
        132 => l4[8..12] == [0; 4] || l4[8..12] == egress_common::sctp::checksum_field(l4),
        1 => {
            let quoted_ok = !matches!(l4[0], 3 | 11 | 12)
                || l4.len() < 28
                || l4[8] >> 4 != 4
                || l4.len() < 8 + ((l4[8] & 0x0f) as usize) * 4
                || Sum16BitWords::new()
                    .add_slice(&l4[8..8 + ((l4[8] & 0x0f) as usize) * 4])
                    .ones_complement()
                    == 0;
            quoted_ok && Sum16BitWords::new().add_slice(l4).ones_complement() == 0
        }
        _ if v.proto == 17 && l4[6..8] == [0, 0] => true,
        _ => {
            Sum16BitWords::new()
                .add_slice(&v.saddr)
                .add_slice(&v.daddr)
                .add_slice(&[0, v.proto])
                .add_slice(&(l4.len() as u16).to_be_bytes())
                .add_slice(l4)
                .ones_complement()
                == 0
        }
    })
}

/// The classes of packets translated and compared with the model, counted so that a run
/// that never translated one of them fails instead of passing blind.
const CLASSES: [&str; 7] = [
    "TCP",
    "UDP",
    "SCTP",
    "ICMP echo",
    "ICMP error",
    "later fragment",
    "other protocol",
];

fn class(f: &[u8]) -> &'static str {
    let v = view(f).expect("a translated frame has an IPv4 header");
    if u16::from_be_bytes([f[20], f[21]]) & 0x1fff != 0 {
        return CLASSES[5];
    }
    match v.proto {
        6 => CLASSES[0],
        17 => CLASSES[1],
        132 => CLASSES[2],
        1 if matches!(f[14 + v.ihl], 3 | 11 | 12) => CLASSES[4],
        1 => CLASSES[3],
        _ => CLASSES[6],
    }
}

/// What a run did, as the model predicted it.
#[derive(Debug)]
enum Seen {
    Passed,
    Dropped,
    Translated(&'static str),
}

/// Checks one run against the invariants and the model, and records the flows it made; Err
/// says which invariant broke.
fn check(
    dp: &Dp,
    record: &mut Record,
    cfg: &nat_model::Config,
    eth0: bool,
    input: &[u8],
    verdict: u32,
    out: &[u8],
) -> Result<Seen, String> {
    match verdict {
        TC_ACT_OK | TC_ACT_SHOT => {}
        TC_ACT_REDIRECT => return Err("TC_ACT_REDIRECT, with a FIB that resolves nothing".into()),
        v => return Err(format!("verdict {v}")),
    }
    let rewritten = verdict == TC_ACT_OK && out != input;
    if rewritten {
        // On their own, whatever the model says.
        if out.len() != input.len() {
            return Err(format!("length {} -> {}", input.len(), out.len()));
        }
        let (Some(vi), Some(vo)) = (view(input), view(out)) else {
            return Err("a frame without a well-formed IPv4 header was rewritten".into());
        };
        if ip_csum_ok(input, &vi) && !ip_csum_ok(out, &vo) {
            return Err("a valid IPv4 checksum became invalid".into());
        }
        if l4_csum_ok(input, &vi) == Some(true) && l4_csum_ok(out, &vo) == Some(false) {
            return Err(format!("a valid {} checksum became invalid", class(input)));
        }
        // Nothing unsolicited into the cluster: by the fuzzer's record, not the program's maps.
        if !eth0
            && (vi.daddr != SOURCE || !record.towards_clients.contains_key(&(vo.saddr, vo.daddr)))
        {
            return Err(format!(
                "macvlan0: a packet to {:?} was translated to {:?} -> {:?}, which no flow a \
                 client opened goes to (unsolicited)",
                vi.daddr, vo.saddr, vo.daddr
            ));
        }
    }
    let side = if eth0 { Side::Cluster } else { Side::Outside };
    let d = nat_model::decide(input, side, cfg, record);
    // A new flow's drawn port, once known.
    let mut drawn = None;
    let seen = match d.outcome {
        Outcome::Pass(why) => {
            if rewritten || verdict != TC_ACT_OK {
                return Err(format!(
                    "the model leaves this frame to the stack ({why:?}); the program {}",
                    if verdict == TC_ACT_SHOT {
                        "dropped it"
                    } else {
                        "rewrote it"
                    }
                ));
            }
            return Ok(Seen::Passed);
        }
        Outcome::Drop(why) => {
            if verdict != TC_ACT_SHOT {
                return Err(format!(
                    "the model drops this frame ({why:?}); the program {}",
                    if rewritten {
                        "rewrote it"
                    } else {
                        "left it to the stack"
                    }
                ));
            }
            Seen::Dropped
        }
        Outcome::Translate(rw) => {
            let mut rw = rw;
            if let Some(nf) = d.new_flow
                && nf.port != PortChoice::Original
                && verdict == TC_ACT_SHOT
            {
                // The one drop a translation allows: every port drawn was taken.
                if nf.exhaustion_plausible(record) {
                    return Ok(Seen::Dropped);
                }
                return Err(format!(
                    "a new flow from {:?} was dropped (port exhaustion?) while its range is \
                     nearly free",
                    nf.key
                ));
            }
            if verdict != TC_ACT_OK {
                return Err(format!(
                    "the model translates this frame; the program dropped it ({:?})",
                    rw.tuple
                ));
            }
            if let Some(nf) = d.new_flow
                && nf.port != PortChoice::Original
            {
                let port = learn_port(dp, record, &nf, rw.chosen_port(out))?;
                drawn = Some(port);
                rw = rw.with_sport(port);
            }
            let mut expected = vec![0u8; input.len()];
            rw.apply(input, &mut expected, Route::Stack);
            if let Err(at) = rw.compare(&expected, out) {
                return Err(format!(
                    "the translated frame differs from the model's at byte {at} ({:?})\n{}model: {}",
                    rw.tuple,
                    diff(&expected, out),
                    hex(&expected)
                ));
            }
            Seen::Translated(class(input))
        }
    };
    // The flow made (also by a dropped SCTP first fragment), as the model says.
    if let Some(nf) = d.new_flow {
        let nf = match (nf.port, drawn) {
            (PortChoice::Original, _) => nf,
            (_, Some(port)) => nf.with_port(port),
            (_, None) => match dp.flow(&flow_key(&nf.key)) {
                Some(_) => nf.with_port(learn_port(dp, record, &nf, None)?),
                None if nf.exhaustion_plausible(record) => return Ok(seen),
                None => return Err(format!("no flow was made for {:?}", nf.key)),
            },
        };
        record.add(&nf);
    }
    if let (Some((id, ports)), Seen::Translated(_)) = (d.remember, &seen) {
        record.frags.insert(id, ports);
    }
    Ok(seen)
}

/// The source port the program drew for a new flow: where the frame shows it, else (an echo
/// reply's, a dropped SCTP fragment's) in the flow's entry. Either way the model checks it.
fn learn_port(dp: &Dp, record: &Record, nf: &NewFlow, shown: Option<u16>) -> Result<u16, String> {
    let port = match shown {
        Some(p) => p,
        None => {
            dp.flow(&flow_key(&nf.key))
                .ok_or_else(|| format!("no entry for the new flow {:?}", nf.key))?
                .sport
        }
    };
    if !nf.accepts(port, record) {
        return Err(format!(
            "new flow {:?}: source port {port} is neither its own (free) nor a free one of the \
             range {PORT_RANGE:?}",
            nf.key
        ));
    }
    Ok(port)
}

/// The rows of two frames that differ, 16 bytes each, the differing bytes marked.
fn diff(expected: &[u8], actual: &[u8]) -> String {
    let mut s = String::new();
    let rows = expected.len().max(actual.len()).div_ceil(16);
    for r in 0..rows {
        let (a, b) = (r * 16, r * 16 + 16);
        let row = |f: &[u8]| f.get(a..b.min(f.len())).unwrap_or(&[]).to_vec();
        let (e, g) = (row(expected), row(actual));
        if e == g {
            continue;
        }
        let fmt = |v: &[u8]| v.iter().map(|x| format!("{x:02x} ")).collect::<String>();
        let marks: String = (0..16)
            .map(|i| if e.get(i) != g.get(i) { "^^ " } else { "   " })
            .collect();
        s += &format!(
            "{a:04x}  model   {}\n      program {}\n              {}\n",
            fmt(&e),
            fmt(&g),
            marks.trim_end()
        );
    }
    s
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Found by the fuzzer: each program uses only the entries of its own direction. A packet on
/// eth0 shaped like an outside reply of a live flow (spoofed from the destination to
/// EGRESS_SOURCE) was translated as that reply, towards the flow's client; and on macvlan0 a
/// packet shaped like the client's side of a flow would be translated as the client's.
#[test]
fn a_packet_shaped_like_the_other_sides_half_of_a_flow_is_not_translated() {
    let dp = Dp::new();
    let (v, _) = dp
        .run(
            PROG_ETH0_INGRESS,
            &tcp(CLIENT, POD, 40001, 443, "S", PAYLOAD),
        )
        .unwrap();
    assert_eq!(v, TC_ACT_OK, "the fallback flow is made");
    let (v, _) = dp
        .run(
            PROG_MACVLAN_INGRESS,
            &tcp(FALLBACK, SOURCE, 443, 40001, "SA", PAYLOAD),
        )
        .unwrap();
    assert_eq!(v, TC_ACT_OK, "its reply is translated");
    let before = dp.flow_count();
    // The reply's shape, arriving from the cluster.
    let spoofed = tcp(FALLBACK, SOURCE, 443, 40001, "A", PAYLOAD);
    let (v, out) = dp.run(PROG_ETH0_INGRESS, &spoofed).unwrap();
    assert!(
        v == TC_ACT_SHOT || out == spoofed,
        "eth0 translated an outside reply's shape: {}",
        hex(&out)
    );
    // The client's shape, arriving from outside.
    let spoofed = tcp(CLIENT, POD, 40001, 443, "A", PAYLOAD);
    let (v, out) = dp.run(PROG_MACVLAN_INGRESS, &spoofed).unwrap();
    assert!(
        v == TC_ACT_SHOT || out == spoofed,
        "macvlan0 translated a client's shape: {}",
        hex(&out)
    );
    assert_eq!(dp.flow_count(), before, "no entry was made or replaced");
}

/// Found by the fuzzer: an ICMP error whose IP total length ends before the quoted headers,
/// the frame's padding holding what looks like them, is not treated as quoting anything.
#[test]
fn an_icmp_error_too_short_to_quote_a_header_is_not_translated() {
    let dp = Dp::new();
    let (v, _) = dp
        .run(
            PROG_ETH0_INGRESS,
            &tcp(CLIENT, POD, 40000, 80, "S", PAYLOAD),
        )
        .unwrap();
    assert_eq!(v, TC_ACT_OK, "the flow is made");
    let out = tcp(SOURCE, DEST, 40000, 80, "S", PAYLOAD);
    let whole = icmp_error(DEST, SOURCE, &out);
    let (_, translated) = dp.run(PROG_MACVLAN_INGRESS, &whole).unwrap();
    assert_ne!(
        translated, whole,
        "a whole error about the flow is translated"
    );
    // The same frame with a total length of the IP header and 9 bytes of ICMP.
    let mut short = whole.clone();
    short[16..18].copy_from_slice(&29u16.to_be_bytes());
    short[24..26].copy_from_slice(&[0, 0]);
    let c = Sum16BitWords::new()
        .add_slice(&short[14..34])
        .ones_complement();
    short[24..26].copy_from_slice(&c.to_be_bytes());
    let (v, after) = dp.run(PROG_MACVLAN_INGRESS, &short).unwrap();
    assert!(
        v == TC_ACT_SHOT || after == short,
        "padding was rewritten as a quoted packet: {}",
        hex(&after)
    );
}

/// The model check fails on a wrong output, where the old invariants passed: the program's
/// real translations, then each with one thing wrong and every checksum still valid.
#[test]
fn the_model_check_rejects_a_wrong_translation() {
    let dp = Dp::new();
    let rules = model_rules();
    let cfg = model_config(&rules);
    let mut record = Record::default();
    let icmp_fixed = |mut f: Vec<u8>| {
        f[36..38].copy_from_slice(&[0, 0]);
        let c = Sum16BitWords::new().add_slice(&f[34..]).ones_complement();
        f[36..38].copy_from_slice(&c.to_be_bytes());
        f
    };
    let syn = tcp(CLIENT, POD, 40000, 8080, "S", PAYLOAD);
    let (v, out) = dp.run(PROG_ETH0_INGRESS, &syn).unwrap();
    // The rule's local port kept (8080, not 8081), checksum fixed: a valid packet to the
    // rule's destination.
    let wrong = tcp(SOURCE, DEST, 40000, 8080, "S", PAYLOAD);
    let why = check(&dp, &mut Record::default(), &cfg, true, &syn, v, &wrong).unwrap_err();
    assert!(why.contains("differs from the model's at byte 37"), "{why}");
    // Another source port than the client's own, free one.
    let wrong = tcp(SOURCE, DEST, 40001, 8081, "S", PAYLOAD);
    let why = check(&dp, &mut Record::default(), &cfg, true, &syn, v, &wrong).unwrap_err();
    assert!(why.contains("differs from the model's at byte 35"), "{why}");
    assert!(matches!(
        check(&dp, &mut record, &cfg, true, &syn, v, &out),
        Ok(Seen::Translated("TCP"))
    ));
    // An ICMP error about the flow: its quoted destination port left as it came (8081), the
    // ICMP checksum fixed.
    let err = icmp_error(OTHER, SOURCE, &out);
    let (v, eout) = dp.run(PROG_MACVLAN_INGRESS, &err).unwrap();
    let mut wrong = eout.clone();
    wrong[64..66].copy_from_slice(&8081u16.to_be_bytes());
    let why = check(&dp, &mut record, &cfg, false, &err, v, &icmp_fixed(wrong)).unwrap_err();
    // (The first byte to differ is the ICMP checksum's, recomputed over the wrong port.)
    assert!(why.contains("differs from the model's at byte 37"), "{why}");
    assert!(
        why.contains("0040  model   1f 90") && why.contains("program 1f 91"),
        "the diff shows the quoted port: {why}"
    );
    assert!(matches!(
        check(&dp, &mut record, &cfg, false, &err, v, &eout),
        Ok(Seen::Translated("ICMP error"))
    ));
    // The reply, judged by a record without the flow: unsolicited, whatever the maps hold.
    let reply = tcp(DEST, SOURCE, 8081, 40000, "SA", PAYLOAD);
    let (v, rout) = dp.run(PROG_MACVLAN_INGRESS, &reply).unwrap();
    let why = check(&dp, &mut Record::default(), &cfg, false, &reply, v, &rout).unwrap_err();
    assert!(why.contains("unsolicited"), "{why}");
    assert!(check(&dp, &mut record, &cfg, false, &reply, v, &rout).is_ok());
}

#[test]
fn both_programs_hold_their_invariants_on_mutated_frames() {
    let seconds: u64 = std::env::var("EGRESS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let seed: u64 = std::env::var("EGRESS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("program fuzzer: {seconds} s, EGRESS_FUZZ_SEED={seed}");
    let mut dp = Dp::new();
    let rules = model_rules();
    let cfg = model_config(&rules);
    let mut record = Record::default();
    let mut translated: StdHashMap<&str, u64> = StdHashMap::new();
    let seeds = seeds();
    // The seeds as they are first: replies find the flows their requests made.
    for (eth0, f) in &seeds {
        let prog = if *eth0 {
            PROG_ETH0_INGRESS
        } else {
            PROG_MACVLAN_INGRESS
        };
        let (v, out) = dp.run(prog, f).expect("the kernel runs every seed");
        match check(&dp, &mut record, &cfg, *eth0, f, v, &out) {
            Ok(Seen::Translated(c)) => *translated.entry(c).or_default() += 1,
            Ok(_) => {}
            Err(why) => panic!("{prog}, seed: {why}\n in: {}\nout: {}", hex(f), hex(&out)),
        }
    }
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut runs, mut dropped, mut refused, mut resets) = (0u64, 0u64, 0u64, 0u64);
    // The same rules are written again now and then, under the other generation: the model's
    // configuration stays the one in force.
    let mut generations = [false; 2];
    let mut batch = 0u64;
    while Instant::now() < deadline {
        // Now and then the configuration is written again, to the other generation of rules.
        if batch % 16 == 15 {
            generations[dp.rewrite() as usize] = true;
        }
        batch += 1;
        for _ in 0..256 {
            let (eth0, base) = &seeds[rng.below(seeds.len())];
            let other = &seeds[rng.below(seeds.len())].1;
            let mut f = base.clone();
            mutate(&mut rng, &mut f, other);
            // Now and then a frame goes to the other program than its seed's.
            let eth0 = if rng.below(8) == 0 { !eth0 } else { *eth0 };
            let prog = if eth0 {
                PROG_ETH0_INGRESS
            } else {
                PROG_MACVLAN_INGRESS
            };
            let Some((v, out)) = dp.run(prog, &f) else {
                refused += 1;
                continue;
            };
            match check(&dp, &mut record, &cfg, eth0, &f, v, &out) {
                Ok(Seen::Translated(c)) => *translated.entry(c).or_default() += 1,
                Ok(Seen::Dropped) => dropped += 1,
                Ok(Seen::Passed) => {}
                Err(why) => panic!(
                    "{prog}: {why}\n(EGRESS_FUZZ_SEED={seed}, case {runs}: the frame after {runs} \
                     runs)\n in: {}\nout: {}",
                    hex(&f),
                    hex(&out)
                ),
            }
            runs += 1;
        }
        if record.flows.len() > MAX_ENTRIES || record.frags.len() > MAX_FRAGS {
            if let Err(why) = dp.reset(&mut record) {
                panic!("{why} (EGRESS_FUZZ_SEED={seed}, after {runs} runs)");
            }
            resets += 1;
        }
    }
    if let Err(why) = dp.reset(&mut record) {
        panic!("{why} (EGRESS_FUZZ_SEED={seed}, after {runs} runs)");
    }
    let changed: u64 = translated.values().sum();
    eprintln!(
        "program fuzzer: {runs} runs, {changed} translated and equal to the model's ({}), \
         {dropped} dropped, {refused} frames the kernel refused to run, tables emptied \
         {resets} times; no invariant broken",
        CLASSES
            .iter()
            .map(|c| format!("{c} {}", translated.get(c).unwrap_or(&0)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(runs > 10_000, "too few runs to mean anything: {runs}");
    for c in CLASSES {
        assert!(
            translated.contains_key(c),
            "no {c} frame was ever translated: the fuzzer is blind to them"
        );
    }
    assert!(
        generations == [true, true],
        "the rules were looked up under both generations: {generations:?}"
    );
}
