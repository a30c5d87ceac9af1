//! Fuzzing the two tc programs through BPF_PROG_TEST_RUN: frames generated from seeds of every
//! class the packet tests use (TCP with flags and options, UDP with and without a checksum,
//! ICMP echo and errors quoting a header, fragments, IP options, SCTP, truncations), mutated
//! (bit flips, field overwrites aimed at the parser, truncation, extension, splicing) and fed
//! to both programs, with the flow table filled by what the eth0 program creates on the way.
//! Every output is checked against invariants:
//!
//! - the run succeeds and the verdict is TC_ACT_OK, TC_ACT_SHOT or TC_ACT_REDIRECT;
//! - a frame never changes length, and outside the IPv4 and L4 headers never changes at all;
//! - valid IPv4 and L4 checksums in give valid checksums out (a zero UDP checksum stays zero);
//! - eth0 (client to outside): a rewritten packet leaves from EGRESS_SOURCE to a rule's
//!   destination and remote port (or the fallback, port kept);
//! - macvlan0 (outside to client): a rewritten packet was addressed to EGRESS_SOURCE and is the
//!   reply of a flow in the table, rewritten to exactly what that flow's entry says: nothing
//!   unsolicited is translated into the cluster.
//!
//! BPF programs give no coverage feedback to user space, so this is a mutation fuzzer, not a
//! coverage-guided one. `EGRESS_FUZZ_SECONDS` bounds the run (default 45; `cargo xtask fuzz`
//! gives its --seconds), `EGRESS_FUZZ_SEED` replays a run; a violation panics with the seed
//! and the frame in hex. Needs root.
use std::{
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
    FlowKey, FlowValue, MAP_FLOWS, MAP_NEW_FLOWS, PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS,
    PROTO_TCP, PROTO_UDP,
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
        let settings = DataplaneSettings::new(
            &redirect,
            Ipv4Addr::from(SOURCE),
            NO_IFINDEX.0,
            NO_IFINDEX.1,
            &opts,
        )
        .unwrap();
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
    s
}

// ---------------------------------------------------------------------------------------------
// Mutations

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, other: &[u8]) {
    let interesting_u16: [u16; 9] = [0, 1, 53, 80, 8080, 1024, 40000, 0xffff, 0x8000];
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

/// Whether the TCP or UDP checksum over the pseudo-header is valid (true for a zero UDP
/// checksum, which means none); None for other protocols and fragments.
fn l4_csum_ok(f: &[u8], v: &View) -> Option<bool> {
    if v.fragment || !(v.proto == 6 || v.proto == 17) {
        return None;
    }
    let l4 = &f[14 + v.ihl..14 + v.total];
    let min = if v.proto == 6 { 20 } else { 8 };
    if l4.len() < min {
        return None;
    }
    if v.proto == 17 && l4[6..8] == [0, 0] {
        return Some(true);
    }
    let pseudo = Sum16BitWords::new()
        .add_slice(&v.saddr)
        .add_slice(&v.daddr)
        .add_slice(&[0, v.proto])
        .add_slice(&(l4.len() as u16).to_be_bytes())
        .add_slice(l4)
        .ones_complement();
    Some(pseudo == 0)
}

fn ports(f: &[u8], v: &View) -> Option<(u16, u16)> {
    let l4 = &f[14 + v.ihl..];
    (l4.len() >= 4 && !v.fragment && (v.proto == 6 || v.proto == 17)).then(|| {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    })
}

/// Checks one run; Err says which invariant broke.
fn check(dp: &Dp, eth0: bool, input: &[u8], verdict: u32, out: &[u8]) -> Result<(), String> {
    if ![TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict) {
        return Err(format!("verdict {verdict}"));
    }
    if verdict == TC_ACT_SHOT || out == input {
        return Ok(());
    }
    if out.len() != input.len() {
        return Err(format!("length {} -> {}", input.len(), out.len()));
    }
    let (Some(vi), Some(vo)) = (view(input), view(out)) else {
        return Err("a frame without a well-formed IPv4 header was rewritten".into());
    };
    // Only the IP header and the L4 header may change (ICMP errors: the quoted headers too).
    let headers_end = 14 + vi.ihl + if vi.proto == 1 { 8 + 60 + 8 } else { 20 };
    let tail = headers_end.min(14 + vi.total);
    if input[tail..] != out[tail..] {
        return Err("bytes beyond the headers changed".into());
    }
    if ip_csum_ok(input, &vi) && !ip_csum_ok(out, &vo) {
        return Err("a valid IPv4 checksum became invalid".into());
    }
    if l4_csum_ok(input, &vi) == Some(true) && l4_csum_ok(out, &vo) == Some(false) {
        return Err("a valid L4 checksum became invalid".into());
    }
    if vi.proto == 17 && !vi.fragment && input.len() >= 14 + vi.ihl + 8 {
        let at = 14 + vi.ihl + 6;
        if input[at..at + 2] == [0, 0] && out[at..at + 2] != [0, 0] {
            return Err("a zero UDP checksum was set".into());
        }
    }
    if eth0 {
        if vo.saddr != SOURCE {
            return Err(format!("eth0: rewritten to leave from {:?}", vo.saddr));
        }
        if vo.daddr != FALLBACK && !RULES.iter().any(|r| r.2 == vo.daddr) {
            return Err(format!("eth0: rewritten to {:?}", vo.daddr));
        }
        if let (Some((_, din)), Some((_, dout))) = (ports(input, &vi), ports(out, &vo)) {
            let rule = RULES.iter().find(|r| r.0 == din && r.1 == vi.proto);
            let want = match rule {
                Some(r) if vo.daddr == r.2 => r.3,
                _ => din,
            };
            if dout != want {
                return Err(format!("eth0: port {din} rewritten to {dout}, not {want}"));
            }
        }
    } else {
        if vi.daddr != SOURCE {
            return Err(format!(
                "macvlan0: a packet to {:?} was translated",
                vi.daddr
            ));
        }
        if let Some((sport, dport)) = ports(input, &vi) {
            let key = FlowKey {
                saddr: vi.saddr,
                daddr: vi.daddr,
                sport,
                dport,
                proto: vi.proto,
                _pad0: 0,
                _pad1: 0,
            };
            // The reply of a flow a client opened, rewritten to what that flow's entry says.
            let Some(entry) = dp.flow(&key) else {
                return Err("macvlan0: translated a packet of no flow (unsolicited)".into());
            };
            let (osport, odport) = ports(out, &vo).expect("same protocol out");
            let got = (vo.saddr, vo.daddr, osport, odport);
            let want = (entry.saddr, entry.daddr, entry.sport, entry.dport);
            if got != want {
                return Err(format!(
                    "macvlan0: rewritten to {got:?}, the flow says {want:?}"
                ));
            }
        }
    }
    Ok(())
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
    let seeds = seeds();
    // The seeds as they are first: replies find the flows their requests made.
    for (eth0, f) in &seeds {
        let prog = if *eth0 {
            PROG_ETH0_INGRESS
        } else {
            PROG_MACVLAN_INGRESS
        };
        let (v, out) = dp.run(prog, f).expect("the kernel runs every seed");
        if let Err(why) = check(&dp, *eth0, f, v, &out) {
            panic!(
                "seed {}: {why}\n in: {}\nout: {}",
                hex(f),
                hex(f),
                hex(&out)
            );
        }
    }
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut runs, mut changed, mut dropped, mut refused) = (0u64, 0u64, 0u64, 0u64);
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
            if let Err(why) = check(&dp, eth0, &f, v, &out) {
                panic!(
                    "{prog}: {why} (EGRESS_FUZZ_SEED={seed}, after {runs} runs)\n in: {}\nout: {}",
                    hex(&f),
                    hex(&out)
                );
            }
            runs += 1;
            changed += u64::from(out != f && v != TC_ACT_SHOT);
            dropped += u64::from(v == TC_ACT_SHOT);
        }
    }
    eprintln!(
        "program fuzzer: {runs} runs, {changed} rewritten, {dropped} dropped, {refused} frames \
         the kernel refused to run; no invariant broken"
    );
    assert!(runs > 10_000, "too few runs to mean anything: {runs}");
    assert!(
        generations == [true, true],
        "the rules were looked up under both generations: {generations:?}"
    );
    assert!(
        changed > 0,
        "no mutated frame was ever translated: the fuzzer is blind"
    );
}
