//! A model of the redirect dataplane's NAT, for the program fuzzer and the host tests: given a
//! frame as it arrives on one side, the configuration and the flow state as the caller knows
//! it, what the tc program must do with it -- leave it to the stack, drop it, or rewrite it, and
//! then into exactly which bytes.
//!
//! It is written from the contract (SPEC section 6, the comments of `egress-ebpf`), not from
//! the eBPF code: its own header decoding, its own rule matching over a plain list of rules,
//! and every checksum recomputed from scratch over the rewritten bytes (IPv4 header, TCP and
//! UDP over the pseudo-header, ICMP over its message, SCTP's CRC32c), never by the incremental
//! arithmetic the programs use. A packet that arrived with a wrong checksum must leave wrong by
//! the same error (a receiver still discards it; the router verifies nothing): the model adds
//! the input's error to the recomputed value, which for a valid input is zero.
//!
//! What the model does not decide is the one free choice of the dataplane: the source port of
//! a new flow whose client port is taken, drawn at random from the configured range. It says
//! what the choice may be ([`PortChoice`]) and checks the one made ([`NewFlow::accepts`]).
//!
//! The flow state is the caller's ([`FlowState`]): the program fuzzer keeps its own record of
//! the flows it made, from this model's answers, never from the program's maps. The model has
//! no clock: the state holds live flows only (the fuzzer configures timeouts longer than its
//! runs), and no LRU eviction (the fuzzer empties the tables before they fill).

use crate::{
    PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    sctp::{SCTP_CSUM_OFF, checksum_field},
};

const ETH: usize = 14;

/// A redirect rule: TCP/UDP/SCTP traffic to the router's `port` goes to `daddr:dport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub port: u16,
    pub proto: u8,
    pub daddr: [u8; 4],
    pub dport: u16,
}

/// The dataplane's configuration as the model needs it.
#[derive(Clone, Copy, Debug)]
pub struct Config<'a> {
    pub egress_source: [u8; 4],
    pub fallback: Option<[u8; 4]>,
    pub rules: &'a [Rule],
    /// The router's own TCP listener (never sent to the fallback); 0: none.
    pub local_tcp_port: u16,
    pub port_min: u16,
    pub port_max: u16,
}

/// Where a frame arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// eth0: from client pods.
    Cluster,
    /// macvlan0: from outside.
    Outside,
}

/// A 5-tuple as on the wire (ports in host order; ICMP echo: the identifier is the source
/// port of requests and the destination port of replies, the other one 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    pub const fn reversed(&self) -> Tuple {
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// Which side's packets an entry translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A client's packets (arriving on eth0).
    Out,
    /// The outside's replies (arriving on macvlan0).
    In,
}

/// One direction of a flow: packets arriving with the entry's key are rewritten to `tuple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub direction: Direction,
    pub tuple: Tuple,
}

/// The identity of a fragmented datagram (its later fragments carry no ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragId {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub id: u16,
    pub proto: u8,
}

/// The flow state the model reads: the caller's record of live entries, not the program's
/// maps.
pub trait FlowState {
    /// The live entry under `key`, if any.
    fn entry(&self, key: &Tuple) -> Option<Entry>;
    /// The ports a translated first fragment recorded for its datagram's later fragments.
    fn fragment(&self, id: &FragId) -> Option<(u16, u16)>;
}

/// Why a frame is passed or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Not IPv4 (or shorter than an Ethernet header).
    NotIpv4,
    /// Truncated or inconsistent headers.
    Malformed,
    /// macvlan0: unicast to another address than EGRESS_SOURCE, or not a reply of a flow.
    Unsolicited,
    /// A packet shaped like the other side's half of a live flow.
    OtherSidesHalf,
    /// Multicast or broadcast to macvlan0; ICMP types the stack answers; errors about nothing
    /// translated; pings to EGRESS_SOURCE; protocols without ports not in a flow.
    NotOurs,
    /// eth0: no rule and no fallback.
    NoRule,
    /// eth0: TCP to the router's own listener.
    LocalPort,
    /// A later fragment of a datagram that is translated but whose ports are unknown.
    Fragment,
    /// A first fragment of an SCTP packet whose ports change.
    SctpFragment,
    TtlExpired,
    /// A protocol with one port to try, taken.
    PortExhausted,
}

/// What the program must do.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// TC_ACT_OK, the frame untouched.
    Pass(Why),
    /// TC_ACT_SHOT.
    Drop(Why),
    /// Rewritten (see [`Rewrite::apply`]) and sent on: TC_ACT_OK to the stack when the FIB has
    /// no direct path, TC_ACT_REDIRECT otherwise.
    Translate(Rewrite),
}

/// The model's answer for one frame.
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub outcome: Outcome,
    /// The flow this frame creates (eth0), whatever the outcome says next: its two entries are
    /// in the tables afterwards (an SCTP first fragment is dropped after its flow is made).
    pub new_flow: Option<NewFlow>,
    /// When translated: the ports this first fragment records for its later fragments.
    pub remember: Option<(FragId, (u16, u16))>,
}

impl Decision {
    fn just(outcome: Outcome) -> Decision {
        Decision {
            outcome,
            new_flow: None,
            remember: None,
        }
    }
}

/// How a new flow's source port is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortChoice {
    /// The client's own port is free: the flow keeps it.
    Original,
    /// Taken: the program draws ports from [min, max] a bounded number of times and takes the
    /// first free one, or drops the packet (port exhaustion) when every draw was taken.
    Drawn { min: u16, max: u16 },
}

/// A flow made by a client's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewFlow {
    /// The client's tuple (the outbound entry's key).
    pub key: Tuple,
    /// What it is translated to; `sport` is the client's port until a drawn one is known
    /// ([`NewFlow::with_port`]).
    pub tuple: Tuple,
    pub port: PortChoice,
}

/// How many ports the dataplane draws before it gives up (besides the client's own).
pub const PORT_DRAWS: u32 = 7;

impl NewFlow {
    /// The reply key for source port `port`.
    fn reply_key(&self, port: u16) -> Tuple {
        Tuple {
            sport: port,
            ..self.tuple
        }
        .reversed()
    }

    /// Whether the dataplane may have given this flow source port `port`.
    pub fn accepts(&self, port: u16, state: &impl FlowState) -> bool {
        match self.port {
            PortChoice::Original => port == self.key.sport,
            PortChoice::Drawn { min, max } => {
                (min..=max).contains(&port) && state.entry(&self.reply_key(port)).is_none()
            }
        }
    }

    /// Whether a drop for port exhaustion is believable: every draw hits a taken port with
    /// probability (taken / range)^PORT_DRAWS, so with fewer than one port in fifty of the
    /// range taken (below 1e-12) it is a defect, not bad luck.
    pub fn exhaustion_plausible(&self, state: &impl FlowState) -> bool {
        let PortChoice::Drawn { min, max } = self.port else {
            return false;
        };
        if max < min {
            return true; // no range: only the client's port, taken
        }
        let span = (max - min) as u32 + 1;
        let taken = (min..=max)
            .filter(|&p| state.entry(&self.reply_key(p)).is_some())
            .count() as u32;
        taken * 50 >= span
    }

    /// This flow with source port `port` (a drawn one).
    pub fn with_port(self, port: u16) -> NewFlow {
        NewFlow {
            tuple: Tuple {
                sport: port,
                ..self.tuple
            },
            ..self
        }
    }

    /// The two entries the dataplane holds for this flow, in the order it inserts them (the
    /// reply entry first: when the client's tuple is its own reply key, the outbound entry
    /// replaces it).
    pub fn entries(&self) -> [(Tuple, Entry); 2] {
        [
            (
                self.tuple.reversed(),
                Entry {
                    direction: Direction::In,
                    tuple: self.key.reversed(),
                },
            ),
            (
                self.key,
                Entry {
                    direction: Direction::Out,
                    tuple: self.tuple,
                },
            ),
        ]
    }
}

/// Where a translated frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To the kernel stack (no direct FIB answer): TTL and MACs left to it.
    Stack,
    /// Forwarded by the program: TTL decremented, these MACs written.
    Direct { smac: [u8; 6], dmac: [u8; 6] },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// A packet of a flow; `l4`: it carries its L4 header (not a later fragment).
    Flow { l4: bool, icmp_type: u8 },
    /// An ICMP error quoting a packet of a flow.
    IcmpError {
        quoted_ip: usize,
        quoted_l4: usize,
        quoted_proto: u8,
        quoted_type: u8,
    },
}

/// How a frame is rewritten: to `tuple` (outer addresses and ports; for an ICMP error, the
/// quoted packet becomes the one the other side sent, `tuple` reversed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub tuple: Tuple,
    shape: Shape,
    /// Offsets in the frame.
    l4: usize,
    end: usize,
    ttl: u8,
}

impl Rewrite {
    /// This rewrite with source port `port` (a new flow's drawn port).
    pub fn with_sport(self, port: u16) -> Rewrite {
        Rewrite {
            tuple: Tuple {
                sport: port,
                ..self.tuple
            },
            ..self
        }
    }

    /// Where a new flow's source port shows in the rewritten frame, if it does (TCP, UDP and
    /// SCTP ports, an echo request's identifier; an echo reply from the cluster keeps its
    /// identifier, and so hides it).
    pub fn chosen_port(&self, out: &[u8]) -> Option<u16> {
        let Shape::Flow {
            l4: true,
            icmp_type,
        } = self.shape
        else {
            return None;
        };
        let at = match self.tuple.proto {
            PROTO_TCP | PROTO_UDP | PROTO_SCTP => self.l4,
            PROTO_ICMP if icmp_type == ICMP_ECHO_REQUEST => self.l4 + 4,
            _ => return None,
        };
        out.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// The offsets of the one's-complement checksum fields this rewrite recomputes, where
    /// 0x0000 and 0xffff are the same number (RFC 1624): the program's incremental helpers
    /// leave a field they have nothing to change as it came. Not UDP's: there 0 means none.
    pub fn ones_complement_fields(&self) -> [Option<usize>; 3] {
        let ip = Some(ETH + 10);
        match self.shape {
            Shape::Flow { l4: true, .. } => match self.tuple.proto {
                PROTO_TCP => [ip, Some(self.l4 + 16), None],
                PROTO_ICMP => [ip, Some(self.l4 + 2), None],
                _ => [ip, None, None],
            },
            Shape::Flow { l4: false, .. } => [ip, None, None],
            Shape::IcmpError { quoted_ip, .. } => [ip, Some(self.l4 + 2), Some(quoted_ip + 10)],
        }
    }

    /// Writes into `out` (as long as `frame`) the frame the program must leave.
    pub fn apply(&self, frame: &[u8], out: &mut [u8], route: Route) {
        out.copy_from_slice(frame);
        let t = &self.tuple;
        match self.shape {
            Shape::Flow { l4: false, .. } => {}
            Shape::Flow {
                l4: true,
                icmp_type,
            } => match t.proto {
                PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
                    put16(out, self.l4, t.sport);
                    put16(out, self.l4 + 2, t.dport);
                }
                PROTO_ICMP => {
                    let id = if icmp_type == ICMP_ECHO_REQUEST {
                        t.sport
                    } else {
                        t.dport
                    };
                    put16(out, self.l4 + 4, id);
                }
                _ => {}
            },
            Shape::IcmpError {
                quoted_ip,
                quoted_l4,
                quoted_proto,
                quoted_type,
            } => {
                // The quoted packet went the other way: (t.daddr:t.dport -> t.saddr:t.sport).
                match quoted_proto {
                    PROTO_ICMP => {
                        let id = if quoted_type == ICMP_ECHO_REQUEST {
                            t.dport
                        } else {
                            t.sport
                        };
                        put16(out, quoted_l4 + 4, id);
                    }
                    PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
                        put16(out, quoted_l4, t.dport);
                        put16(out, quoted_l4 + 2, t.sport);
                    }
                    _ => {}
                }
                out[quoted_ip + 12..quoted_ip + 16].copy_from_slice(&t.daddr);
                out[quoted_ip + 16..quoted_ip + 20].copy_from_slice(&t.saddr);
                let qhlen = ((frame[quoted_ip] & 0x0f) as usize) * 4;
                ones_field(
                    frame,
                    out,
                    quoted_ip..quoted_ip + qhlen,
                    quoted_ip + 10,
                    0,
                    0,
                );
            }
        }
        out[ETH + 12..ETH + 16].copy_from_slice(&t.saddr);
        out[ETH + 16..ETH + 20].copy_from_slice(&t.daddr);
        if let Route::Direct { smac, dmac } = route {
            out[0..6].copy_from_slice(&dmac);
            out[6..12].copy_from_slice(&smac);
            out[ETH + 8] = self.ttl - 1;
        }
        // The L4 checksums, over the rewritten bytes and addresses.
        let l4 = self.l4..self.end;
        match (self.shape, t.proto) {
            (Shape::Flow { l4: true, .. }, PROTO_TCP) => {
                let (pi, po) = (pseudo(frame, self), pseudo(out, self));
                ones_field(frame, out, l4, self.l4 + 16, pi, po);
            }
            (Shape::Flow { l4: true, .. }, PROTO_UDP) => {
                let f = self.l4 + 6;
                // A zero UDP checksum means none, and stays zero; a computed zero is sent as
                // 0xffff (RFC 768).
                if frame[f..f + 2] != [0, 0] {
                    let (pi, po) = (pseudo(frame, self), pseudo(out, self));
                    if ones_field(frame, out, l4, f, pi, po) == 0 {
                        put16(out, f, 0xffff);
                    }
                }
            }
            (Shape::Flow { l4: true, .. }, PROTO_ICMP) | (Shape::IcmpError { .. }, _) => {
                ones_field(frame, out, l4, self.l4 + 2, 0, 0);
            }
            (Shape::Flow { l4: true, .. }, PROTO_SCTP) => {
                // CRC32c over the SCTP packet; a zero field is left to checksum offload.
                let f = self.l4 + SCTP_CSUM_OFF;
                if frame[f..f + 4] != [0; 4] {
                    let err = xor4(
                        frame[f..f + 4].try_into().unwrap(),
                        checksum_field(&frame[l4.clone()]),
                    );
                    let field = xor4(checksum_field(&out[l4]), err);
                    out[f..f + 4].copy_from_slice(&field);
                }
            }
            _ => {}
        }
        let hlen = self.l4 - ETH;
        ones_field(frame, out, ETH..ETH + hlen, ETH + 10, 0, 0);
    }

    /// Compares the program's frame with the model's: Ok, or the first offset that differs.
    /// Byte for byte, but for a one's-complement checksum of 0x0000 where the model has 0xffff
    /// or the reverse (the same number).
    pub fn compare(&self, expected: &[u8], actual: &[u8]) -> Result<(), usize> {
        if expected.len() != actual.len() {
            return Err(expected.len().min(actual.len()));
        }
        let same_zero = |at: usize| {
            let e = [expected[at], expected[at + 1]];
            let a = [actual[at], actual[at + 1]];
            e == a || matches!((e, a), ([0, 0], [0xff, 0xff]) | ([0xff, 0xff], [0, 0]))
        };
        let fields = self.ones_complement_fields();
        let mut i = 0;
        while i < expected.len() {
            if let Some(&Some(f)) = fields.iter().find(|f| **f == Some(i)) {
                if !same_zero(f) {
                    return Err(if expected[i] != actual[i] { i } else { i + 1 });
                }
                i += 2;
                continue;
            }
            if expected[i] != actual[i] {
                return Err(i);
            }
            i += 1;
        }
        Ok(())
    }
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn xor4(a: [u8; 4], b: [u8; 4]) -> [u8; 4] {
    [a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2], a[3] ^ b[3]]
}

fn addr(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// The sum of `b` as big-endian 16-bit words (an odd last byte padded with zero).
fn sum16(b: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < b.len() {
        s += get16(b, i) as u64;
        i += 2;
    }
    if i < b.len() {
        s += (b[i] as u64) << 8;
    }
    s
}

/// A sum's residue modulo 0xffff: the one's-complement number it stands for (0 and 0xffff
/// alike).
fn residue(s: u64) -> u64 {
    s % 0xffff
}

/// The TCP/UDP pseudo-header of a frame's current addresses, as a sum. Its length is the L4
/// bytes of this packet: for a first fragment that is not the datagram's, but the same length
/// enters the input's error and the output's sum, so it cancels.
fn pseudo(frame: &[u8], r: &Rewrite) -> u64 {
    sum16(&frame[ETH + 12..ETH + 20]) + r.tuple.proto as u64 + (r.end - r.l4) as u64
}

/// Recomputes the one's-complement checksum at `field` over `out[range]` (and a pseudo-header
/// sum), plus the error the input's field had over `frame[range]`; writes it in canonical form
/// (0x0000 for zero) and returns it. Over a region without all of its datagram (a first
/// fragment), the missing bytes are the same in and out, so the error carries them.
fn ones_field(
    frame: &[u8],
    out: &mut [u8],
    range: core::ops::Range<usize>,
    field: usize,
    pseudo_in: u64,
    pseudo_out: u64,
) -> u16 {
    // 0 when the input verifies: its words, field included, sum to one's-complement zero.
    let error = residue(sum16(&frame[range.clone()]) + pseudo_in);
    put16(out, field, 0);
    let s = residue(sum16(&out[range]) + pseudo_out);
    let c = ((error + 0xffff - s) % 0xffff) as u16;
    put16(out, field, c);
    c
}

/// The IPv4 header, decoded.
struct Ip {
    hlen: usize,
    total: usize,
    id: u16,
    ttl: u8,
    proto: u8,
    frag_off: usize,
    more_frags: bool,
    saddr: [u8; 4],
    daddr: [u8; 4],
}

fn ipv4(frame: &[u8]) -> Result<Ip, Outcome> {
    if frame.len() < ETH || get16(frame, 12) != 0x0800 {
        return Err(Outcome::Pass(Why::NotIpv4));
    }
    let malformed = Err(Outcome::Drop(Why::Malformed));
    if frame.len() < ETH + 20 || frame[ETH] >> 4 != 4 {
        return malformed;
    }
    let hlen = ((frame[ETH] & 0x0f) as usize) * 4;
    let total = get16(frame, ETH + 2) as usize;
    if hlen < 20 || total < hlen || ETH + total > frame.len() {
        return malformed;
    }
    let frag = get16(frame, ETH + 6);
    Ok(Ip {
        hlen,
        total,
        id: get16(frame, ETH + 4),
        ttl: frame[ETH + 8],
        proto: frame[ETH + 9],
        frag_off: ((frag & 0x1fff) as usize) * 8,
        more_frags: frag & 0x2000 != 0,
        saddr: addr(frame, ETH + 12),
        daddr: addr(frame, ETH + 16),
    })
}

fn is_icmp_error(t: u8) -> bool {
    matches!(t, 3 | 11 | 12)
}

/// What the dataplane must do with `frame` arriving on `side`.
pub fn decide(frame: &[u8], side: Side, cfg: &Config, state: &impl FlowState) -> Decision {
    let ip = match ipv4(frame) {
        Ok(ip) => ip,
        Err(o) => return Decision::just(o),
    };
    let l4 = ETH + ip.hlen;
    let end = ETH + ip.total;
    let mut key = Tuple {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: ip.proto,
    };
    let mut icmp_type = 0;
    enum Kind {
        Flow,
        IcmpError,
        OtherIcmp,
        Orphan,
    }
    let kind = if ip.frag_off != 0 {
        let id = FragId {
            saddr: ip.saddr,
            daddr: ip.daddr,
            id: ip.id,
            proto: ip.proto,
        };
        match state.fragment(&id) {
            Some((s, d)) => {
                (key.sport, key.dport) = (s, d);
                Kind::Flow
            }
            None => Kind::Orphan,
        }
    } else {
        let need = match ip.proto {
            PROTO_TCP => 20,
            PROTO_UDP | PROTO_ICMP => 8,
            PROTO_SCTP => 12,
            _ => 0,
        };
        if l4 + need > end {
            return Decision::just(Outcome::Drop(Why::Malformed));
        }
        match ip.proto {
            PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
                (key.sport, key.dport) = (get16(frame, l4), get16(frame, l4 + 2));
                Kind::Flow
            }
            PROTO_ICMP => {
                icmp_type = frame[l4];
                let id = get16(frame, l4 + 4);
                match icmp_type {
                    t if is_icmp_error(t) => Kind::IcmpError,
                    ICMP_ECHO_REQUEST => {
                        key.sport = id;
                        Kind::Flow
                    }
                    ICMP_ECHO_REPLY => {
                        key.dport = id;
                        Kind::Flow
                    }
                    _ => Kind::OtherIcmp,
                }
            }
            _ => Kind::Flow,
        }
    };
    if side == Side::Outside && ip.daddr != cfg.egress_source {
        // Never routed into the cluster; multicast and broadcast are the stack's.
        return Decision::just(if ip.daddr[0] >= 224 {
            Outcome::Pass(Why::NotOurs)
        } else {
            Outcome::Drop(Why::Unsolicited)
        });
    }
    let at = Offsets {
        l4,
        end,
        ttl: ip.ttl,
    };
    match kind {
        Kind::OtherIcmp => Decision::just(Outcome::Pass(Why::NotOurs)),
        Kind::Orphan => {
            let maybe_local =
                ip.proto == PROTO_ICMP || (ip.proto == PROTO_TCP && cfg.local_tcp_port != 0);
            Decision::just(
                if side == Side::Cluster && cfg.fallback.is_some() && !maybe_local {
                    Outcome::Drop(Why::Fragment)
                } else {
                    Outcome::Pass(Why::NotOurs)
                },
            )
        }
        Kind::IcmpError => Decision::just(icmp_error(frame, side, state, at)),
        Kind::Flow => flow(&ip, key, icmp_type, side, cfg, state, at),
    }
}

#[derive(Clone, Copy)]
struct Offsets {
    l4: usize,
    end: usize,
    ttl: u8,
}

fn own_direction(side: Side) -> Direction {
    match side {
        Side::Cluster => Direction::Out,
        Side::Outside => Direction::In,
    }
}

fn flow(
    ip: &Ip,
    key: Tuple,
    icmp_type: u8,
    side: Side,
    cfg: &Config,
    state: &impl FlowState,
    at: Offsets,
) -> Decision {
    let has_l4 = ip.frag_off == 0;
    let (tuple, new_flow) = match (state.entry(&key), side) {
        (Some(e), _) if e.direction != own_direction(side) => {
            return Decision::just(Outcome::Drop(Why::OtherSidesHalf));
        }
        (Some(_), _) | (None, Side::Cluster) if at.ttl <= 1 => {
            return Decision::just(Outcome::Drop(Why::TtlExpired));
        }
        (Some(e), _) => (e.tuple, None),
        (None, Side::Cluster) => match create(ip, key, cfg, state) {
            Ok(nf) => (nf.tuple, Some(nf)),
            Err(o) => return Decision::just(o),
        },
        (None, Side::Outside) => {
            return Decision::just(match key.proto {
                PROTO_ICMP if icmp_type == ICMP_ECHO_REQUEST => Outcome::Pass(Why::NotOurs),
                PROTO_TCP | PROTO_UDP | PROTO_SCTP | PROTO_ICMP => Outcome::Drop(Why::Unsolicited),
                _ => Outcome::Pass(Why::NotOurs),
            });
        }
    };
    // SCTP's CRC32c covers the whole datagram, which a first fragment does not hold. A drawn
    // port always differs from the client's.
    let ports_change = (key.sport, key.dport) != (tuple.sport, tuple.dport)
        || new_flow.is_some_and(|n| n.port != PortChoice::Original);
    if key.proto == PROTO_SCTP && has_l4 && ip.more_frags && ports_change {
        return Decision {
            outcome: Outcome::Drop(Why::SctpFragment),
            new_flow,
            remember: None,
        };
    }
    let remember = (ip.more_frags && has_l4).then_some((
        FragId {
            saddr: ip.saddr,
            daddr: ip.daddr,
            id: ip.id,
            proto: ip.proto,
        },
        (key.sport, key.dport),
    ));
    Decision {
        outcome: Outcome::Translate(Rewrite {
            tuple,
            shape: Shape::Flow {
                l4: has_l4,
                icmp_type,
            },
            l4: at.l4,
            end: at.end,
            ttl: at.ttl,
        }),
        new_flow,
        remember,
    }
}

/// A client's first packet: where its rule (or the fallback) sends it and from which port.
fn create(ip: &Ip, key: Tuple, cfg: &Config, state: &impl FlowState) -> Result<NewFlow, Outcome> {
    if ip.frag_off != 0 {
        return Err(Outcome::Drop(Why::Fragment));
    }
    let proto = key.proto;
    let rule = matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
        .then(|| {
            cfg.rules
                .iter()
                .find(|r| r.proto == proto && r.port == key.dport)
        })
        .flatten();
    let (daddr, dport) = if let Some(r) = rule {
        (r.daddr, r.dport)
    } else if proto == PROTO_TCP && cfg.local_tcp_port != 0 && key.dport == cfg.local_tcp_port {
        return Err(Outcome::Pass(Why::LocalPort));
    } else if let Some(f) = cfg.fallback {
        (f, key.dport)
    } else {
        return Err(Outcome::Pass(Why::NoRule));
    };
    let nf = NewFlow {
        key,
        tuple: Tuple {
            saddr: cfg.egress_source,
            daddr,
            sport: key.sport,
            dport,
            proto,
        },
        port: PortChoice::Original,
    };
    if state.entry(&nf.reply_key(key.sport)).is_none() {
        return Ok(nf);
    }
    // Protocols without ports have one try.
    if !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_SCTP) {
        return Err(Outcome::Drop(Why::PortExhausted));
    }
    Ok(NewFlow {
        port: PortChoice::Drawn {
            min: cfg.port_min,
            max: cfg.port_max,
        },
        ..nf
    })
}

/// An ICMP error: translated when it quotes a packet of a flow whose entry on this side
/// answers it.
fn icmp_error(frame: &[u8], side: Side, state: &impl FlowState, at: Offsets) -> Outcome {
    let qip = at.l4 + 8;
    if qip + 20 > at.end {
        return Outcome::Pass(Why::NotOurs);
    }
    if frame[qip] >> 4 != 4 || ((frame[qip] & 0x0f) as usize) * 4 < 20 {
        return Outcome::Drop(Why::Malformed);
    }
    let ql4 = qip + ((frame[qip] & 0x0f) as usize) * 4;
    if ql4 + 8 > at.end || get16(frame, qip + 6) & 0x1fff != 0 {
        return Outcome::Pass(Why::NotOurs);
    }
    let qproto = frame[qip + 9];
    let qtype = frame[ql4];
    let (sport, dport) = if qproto == PROTO_ICMP {
        let id = get16(frame, ql4 + 4);
        match qtype {
            ICMP_ECHO_REQUEST => (id, 0),
            ICMP_ECHO_REPLY => (0, id),
            _ => return Outcome::Pass(Why::NotOurs),
        }
    } else {
        (get16(frame, ql4), get16(frame, ql4 + 2))
    };
    // The quoted packet went (s -> d); this side's entry of its flow is keyed (d -> s).
    let reply_key = Tuple {
        saddr: addr(frame, qip + 16),
        daddr: addr(frame, qip + 12),
        sport: dport,
        dport: sport,
        proto: qproto,
    };
    let Some(e) = state
        .entry(&reply_key)
        .filter(|e| e.direction == own_direction(side))
    else {
        return Outcome::Pass(Why::NotOurs);
    };
    if at.ttl <= 1 {
        return Outcome::Drop(Why::TtlExpired);
    }
    Outcome::Translate(Rewrite {
        tuple: e.tuple,
        shape: Shape::IcmpError {
            quoted_ip: qip,
            quoted_l4: ql4,
            quoted_proto: qproto,
            quoted_type: qtype,
        },
        l4: at.l4,
        end: at.end,
        ttl: at.ttl,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::HashMap, vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    const CLIENT: [u8; 4] = [10, 128, 0, 10];
    const CLIENT2: [u8; 4] = [10, 128, 0, 11];
    const POD: [u8; 4] = [10, 128, 0, 5];
    const SOURCE: [u8; 4] = [192, 168, 12, 99];
    const DEST: [u8; 4] = [203, 0, 113, 25];
    const FALLBACK: [u8; 4] = [203, 0, 113, 26];
    const HOP: [u8; 4] = [192, 168, 12, 1];
    const RULES: [Rule; 2] = [
        Rule {
            port: 8080,
            proto: PROTO_TCP,
            daddr: DEST,
            dport: 8081,
        },
        Rule {
            port: 53,
            proto: PROTO_UDP,
            daddr: DEST,
            dport: 5353,
        },
    ];

    fn cfg() -> Config<'static> {
        Config {
            egress_source: SOURCE,
            fallback: Some(FALLBACK),
            rules: &RULES,
            local_tcp_port: 9100,
            port_min: 1024,
            port_max: 65535,
        }
    }

    #[derive(Default)]
    struct Record {
        flows: HashMap<Tuple, Entry>,
        frags: HashMap<FragId, (u16, u16)>,
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
                self.flows.insert(k, e);
            }
        }
    }

    // Frames built from scratch, checksums by the textbook definition.

    fn fold(mut s: u64) -> u16 {
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn words(b: &[u8]) -> u64 {
        b.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64)
            .sum()
    }

    fn checksum(parts: &[&[u8]]) -> u16 {
        !fold(parts.iter().map(|p| words(p)).sum())
    }

    fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&src);
        v.extend_from_slice(&dst);
        v.extend_from_slice(&[0, proto]);
        v.extend_from_slice(&(len as u16).to_be_bytes());
        v
    }

    struct Ipv4 {
        proto: u8,
        src: [u8; 4],
        dst: [u8; 4],
        ttl: u8,
        mf: bool,
        frag_units: u16,
    }

    fn ip4(proto: u8, src: [u8; 4], dst: [u8; 4]) -> Ipv4 {
        Ipv4 {
            proto,
            src,
            dst,
            ttl: 64,
            mf: false,
            frag_units: 0,
        }
    }

    fn ip_header(h: &Ipv4, l4_len: usize) -> Vec<u8> {
        let mut v = vec![0x45, 0];
        v.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        v.extend_from_slice(&0x1234u16.to_be_bytes());
        let frag = (h.mf as u16) << 13 | h.frag_units;
        v.extend_from_slice(&frag.to_be_bytes());
        v.extend_from_slice(&[h.ttl, h.proto, 0, 0]);
        v.extend_from_slice(&h.src);
        v.extend_from_slice(&h.dst);
        let c = checksum(&[&v]);
        v[10..12].copy_from_slice(&c.to_be_bytes());
        v
    }

    fn frame(h: &Ipv4, l4: &[u8]) -> Vec<u8> {
        let mut v = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        v.extend(ip_header(h, l4.len()));
        v.extend_from_slice(l4);
        v
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&[
            0, 0, 3, 0xe8, 0, 0, 0, 0, 0x50, 0x02, 0xfd, 0xe8, 0, 0, 0, 0,
        ]);
        l4.extend_from_slice(b"a segment's payload");
        let c = checksum(&[&pseudo(src, dst, PROTO_TCP, l4.len()), &l4]);
        l4[16..18].copy_from_slice(&c.to_be_bytes());
        frame(&ip4(PROTO_TCP, src, dst), &l4)
    }

    fn udp_l4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(payload);
        let c = match checksum(&[&pseudo(src, dst, PROTO_UDP, l4.len()), &l4]) {
            0 => 0xffff,
            c => c,
        };
        l4[6..8].copy_from_slice(&c.to_be_bytes());
        l4
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        frame(
            &ip4(PROTO_UDP, src, dst),
            &udp_l4(src, dst, sport, dport, payload),
        )
    }

    fn echo(src: [u8; 4], dst: [u8; 4], t: u8, id: u16) -> Vec<u8> {
        let mut l4 = vec![t, 0, 0, 0];
        l4.extend_from_slice(&id.to_be_bytes());
        l4.extend_from_slice(&[0, 1]);
        l4.extend_from_slice(b"ping");
        let c = checksum(&[&l4]);
        l4[2..4].copy_from_slice(&c.to_be_bytes());
        frame(&ip4(PROTO_ICMP, src, dst), &l4)
    }

    fn sctp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, h: Option<Ipv4>) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
        l4.extend_from_slice(&[
            1, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 1, 0, 1, 0, 0, 0, 1,
        ]);
        let c = crc32c::crc32c(&l4);
        l4[8..12].copy_from_slice(&c.to_le_bytes());
        frame(&h.unwrap_or(ip4(PROTO_SCTP, src, dst)), &l4)
    }

    /// A destination-unreachable from `from` to `to` quoting 28 bytes of `quoted`.
    fn icmp_error(from: [u8; 4], to: [u8; 4], quoted: &[u8]) -> Vec<u8> {
        let mut l4 = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
        l4.extend_from_slice(&quoted[14..14 + 28]);
        let c = checksum(&[&l4]);
        l4[2..4].copy_from_slice(&c.to_be_bytes());
        frame(&ip4(PROTO_ICMP, from, to), &l4)
    }

    /// Whether every checksum of a frame verifies, by the textbook definition.
    fn verifies(f: &[u8]) -> bool {
        let hlen = ((f[14] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([f[16], f[17]]) as usize;
        let (ip, l4) = (&f[14..14 + hlen], &f[14 + hlen..14 + total]);
        let (src, dst): ([u8; 4], [u8; 4]) = (
            ip[12..16].try_into().unwrap(),
            ip[16..20].try_into().unwrap(),
        );
        let l4_ok = match ip[9] {
            PROTO_TCP => checksum(&[&pseudo(src, dst, PROTO_TCP, l4.len()), l4]) == 0,
            PROTO_UDP => {
                l4[6..8] == [0, 0] || checksum(&[&pseudo(src, dst, PROTO_UDP, l4.len()), l4]) == 0
            }
            PROTO_ICMP => {
                let quoted_ok = !is_icmp_error(l4[0]) || checksum(&[&l4[8..28]]) == 0;
                checksum(&[l4]) == 0 && quoted_ok
            }
            PROTO_SCTP => {
                let mut z = l4.to_vec();
                z[8..12].fill(0);
                l4[8..12] == crc32c::crc32c(&z).to_le_bytes()
            }
            _ => true,
        };
        checksum(&[ip]) == 0 && l4_ok
    }

    fn translate(f: &[u8], side: Side, rec: &Record, route: Route) -> (Decision, Rewrite, Vec<u8>) {
        let d = decide(f, side, &cfg(), rec);
        let Outcome::Translate(r) = d.outcome else {
            panic!("not translated: {:?}", d.outcome);
        };
        let mut out = vec![0; f.len()];
        r.apply(f, &mut out, route);
        (d, r, out)
    }

    #[test]
    fn a_client_packet_to_a_rule_leaves_as_a_new_flow_from_egress_source() {
        let rec = Record::default();
        let (d, r, out) = translate(
            &tcp(CLIENT, POD, 40000, 8080),
            Side::Cluster,
            &rec,
            Route::Stack,
        );
        let nf = d.new_flow.unwrap();
        assert_eq!(nf.port, PortChoice::Original);
        assert_eq!((nf.tuple.saddr, nf.tuple.daddr), (SOURCE, DEST));
        assert_eq!((nf.tuple.sport, nf.tuple.dport), (40000, 8081));
        // Every byte is that of the packet built from scratch with the translated tuple.
        assert_eq!(out, tcp(SOURCE, DEST, 40000, 8081));
        assert_eq!(r.compare(&tcp(SOURCE, DEST, 40000, 8081), &out), Ok(()));
        // The fallback keeps the port; UDP rules map theirs.
        let (_, _, out) = translate(
            &tcp(CLIENT, POD, 40000, 443),
            Side::Cluster,
            &rec,
            Route::Stack,
        );
        assert_eq!(out, tcp(SOURCE, FALLBACK, 40000, 443));
        let (_, _, out) = translate(
            &udp(CLIENT, POD, 40000, 53, b"q"),
            Side::Cluster,
            &rec,
            Route::Stack,
        );
        assert_eq!(out, udp(SOURCE, DEST, 40000, 5353, b"q"));
    }

    #[test]
    fn replies_go_back_to_their_client_and_nothing_else_comes_in() {
        let mut rec = Record::default();
        let d = decide(&tcp(CLIENT, POD, 40000, 8080), Side::Cluster, &cfg(), &rec);
        rec.add(&d.new_flow.unwrap());
        let (d, _, out) = translate(
            &tcp(DEST, SOURCE, 8081, 40000),
            Side::Outside,
            &rec,
            Route::Stack,
        );
        assert!(d.new_flow.is_none());
        assert_eq!(out, tcp(POD, CLIENT, 8080, 40000));
        let drop = |f: &[u8], side| match decide(f, side, &cfg(), &rec).outcome {
            Outcome::Drop(w) => Some(w),
            _ => None,
        };
        let pass =
            |f: &[u8], side| matches!(decide(f, side, &cfg(), &rec).outcome, Outcome::Pass(_));
        assert_eq!(
            drop(&tcp(DEST, SOURCE, 8081, 40001), Side::Outside),
            Some(Why::Unsolicited)
        );
        assert_eq!(
            drop(&tcp(DEST, POD, 8081, 40000), Side::Outside),
            Some(Why::Unsolicited)
        );
        assert!(pass(&tcp(DEST, [224, 0, 0, 1], 8081, 40000), Side::Outside));
        assert!(
            pass(&echo(DEST, SOURCE, 8, 7), Side::Outside),
            "pings to EGRESS_SOURCE"
        );
        assert_eq!(
            drop(&echo(DEST, SOURCE, 0, 7), Side::Outside),
            Some(Why::Unsolicited)
        );
        // Each side's half only from its own side.
        assert_eq!(
            drop(&tcp(DEST, SOURCE, 8081, 40000), Side::Cluster),
            Some(Why::OtherSidesHalf)
        );
        let mut spoofed = tcp(CLIENT, SOURCE, 40000, 8080);
        spoofed[30..34].copy_from_slice(&POD); // the client's tuple, checksum aside
        assert!(matches!(
            decide(&spoofed, Side::Outside, &cfg(), &rec).outcome,
            Outcome::Drop(Why::Unsolicited)
        ));
        // The router's own port, and no rule without a fallback.
        assert!(matches!(
            decide(&tcp(CLIENT, POD, 1, 9100), Side::Cluster, &cfg(), &rec).outcome,
            Outcome::Pass(Why::LocalPort)
        ));
        let strict = Config {
            fallback: None,
            ..cfg()
        };
        assert!(matches!(
            decide(&tcp(CLIENT, POD, 1, 443), Side::Cluster, &strict, &rec).outcome,
            Outcome::Pass(Why::NoRule)
        ));
    }

    #[test]
    fn a_taken_port_is_drawn_from_the_range_never_a_live_flows() {
        let mut rec = Record::default();
        let first = decide(&tcp(CLIENT, POD, 40000, 8080), Side::Cluster, &cfg(), &rec);
        rec.add(&first.new_flow.unwrap());
        let d = decide(&tcp(CLIENT2, POD, 40000, 8080), Side::Cluster, &cfg(), &rec);
        let nf = d.new_flow.unwrap();
        assert_eq!(
            nf.port,
            PortChoice::Drawn {
                min: 1024,
                max: 65535
            }
        );
        assert!(!nf.accepts(40000, &rec), "the first flow's port");
        assert!(!nf.accepts(1023, &rec), "out of range");
        assert!(nf.accepts(40001, &rec));
        assert!(!nf.exhaustion_plausible(&rec), "one port of 64512 taken");
        let nf = nf.with_port(40001);
        let Outcome::Translate(r) = d.outcome else {
            panic!()
        };
        let f = tcp(CLIENT2, POD, 40000, 8080);
        let mut out = vec![0; f.len()];
        r.with_sport(40001).apply(&f, &mut out, Route::Stack);
        assert_eq!(out, tcp(SOURCE, DEST, 40001, 8081));
        assert_eq!(r.with_sport(40001).chosen_port(&out), Some(40001));
        rec.add(&nf);
        // A range of one taken port: exhaustion is the only outcome left.
        let tiny = Config {
            port_min: 40001,
            port_max: 40001,
            ..cfg()
        };
        let d = decide(
            &tcp([10, 128, 0, 12], POD, 40000, 8080),
            Side::Cluster,
            &tiny,
            &rec,
        );
        assert!(d.new_flow.unwrap().exhaustion_plausible(&rec));
        assert!(!d.new_flow.unwrap().accepts(40001, &rec));
    }

    #[test]
    fn udp_keeps_a_zero_checksum_and_sends_a_computed_zero_as_ffff() {
        let rec = Record::default();
        let mut f = udp(CLIENT, POD, 40000, 53, b"q");
        f[40..42].fill(0);
        let (_, _, out) = translate(&f, Side::Cluster, &rec, Route::Stack);
        assert_eq!(out[40..42], [0, 0]);
        // Find a payload whose translated datagram sums to zero.
        let hit = (0..=0xffffu16).find_map(|v| {
            let f = udp(CLIENT, POD, 40000, 53, &v.to_be_bytes());
            let (_, _, out) = translate(&f, Side::Cluster, &rec, Route::Stack);
            let mut z = out[34..].to_vec();
            z[6..8].fill(0);
            (checksum(&[&pseudo(SOURCE, DEST, PROTO_UDP, z.len()), &z]) == 0).then_some(out)
        });
        let out = hit.expect("some payload sums to zero");
        assert_eq!(out[40..42], [0xff, 0xff]);
        assert!(verifies(&out));
    }

    #[test]
    fn echo_keeps_its_identifier_and_errors_rewrite_the_quoted_packet() {
        let mut rec = Record::default();
        let (d, _, out) = translate(
            &echo(CLIENT, POD, 8, 0x4242),
            Side::Cluster,
            &rec,
            Route::Stack,
        );
        assert_eq!(out, echo(SOURCE, FALLBACK, 8, 0x4242));
        rec.add(&d.new_flow.unwrap());
        let (_, _, out) = translate(
            &echo(FALLBACK, SOURCE, 0, 0x4242),
            Side::Outside,
            &rec,
            Route::Stack,
        );
        assert_eq!(out, echo(POD, CLIENT, 0, 0x4242));
        // An error about the echo request, from a hop outside.
        let err = icmp_error(HOP, SOURCE, &echo(SOURCE, FALLBACK, 8, 0x4242));
        let (_, _, out) = translate(&err, Side::Outside, &rec, Route::Stack);
        assert_eq!(out, icmp_error(POD, CLIENT, &echo(CLIENT, POD, 8, 0x4242)));
        // Errors about TCP both ways.
        let d = decide(&tcp(CLIENT, POD, 40000, 8080), Side::Cluster, &cfg(), &rec);
        rec.add(&d.new_flow.unwrap());
        let err = icmp_error(HOP, SOURCE, &tcp(SOURCE, DEST, 40000, 8081));
        let (_, r, out) = translate(&err, Side::Outside, &rec, Route::Stack);
        let want = icmp_error(POD, CLIENT, &tcp(CLIENT, POD, 40000, 8080));
        assert_eq!(r.compare(&want, &out), Ok(()));
        assert!(verifies(&out));
        let err = icmp_error(CLIENT, POD, &tcp(POD, CLIENT, 8080, 40000));
        let (_, _, out) = translate(&err, Side::Cluster, &rec, Route::Stack);
        assert_eq!(
            out,
            icmp_error(SOURCE, DEST, &tcp(DEST, SOURCE, 8081, 40000))
        );
        // About no flow: the stack's.
        let err = icmp_error(HOP, SOURCE, &tcp(SOURCE, DEST, 40009, 8081));
        assert!(matches!(
            decide(&err, Side::Outside, &cfg(), &rec).outcome,
            Outcome::Pass(Why::NotOurs)
        ));
    }

    #[test]
    fn sctp_gets_a_recomputed_crc32c_and_a_first_fragment_cannot_change_its_ports() {
        let mut rec = Record::default();
        let f = sctp(CLIENT, POD, 40000, 80, None);
        let (d, _, out) = translate(&f, Side::Cluster, &rec, Route::Stack);
        assert_eq!(out, sctp(SOURCE, FALLBACK, 40000, 80, None));
        rec.add(&d.new_flow.unwrap());
        let f2 = sctp(CLIENT2, POD, 40000, 80, None);
        let d = decide(&f2, Side::Cluster, &cfg(), &rec);
        let Outcome::Translate(r) = d.outcome else {
            panic!()
        };
        let mut out = vec![0; f2.len()];
        r.with_sport(5000).apply(&f2, &mut out, Route::Stack);
        assert_eq!(out, sctp(SOURCE, FALLBACK, 5000, 80, None));
        // Left to offload: stays zero.
        let mut z = f2.clone();
        z[42..46].fill(0);
        r.with_sport(5000).apply(&z, &mut out, Route::Stack);
        assert_eq!(out[42..46], [0; 4]);
        // A first fragment: its flow is made, the packet dropped.
        let mut h = ip4(PROTO_SCTP, CLIENT2, POD);
        h.mf = true;
        let d = decide(
            &sctp(CLIENT2, POD, 40000, 80, Some(h)),
            Side::Cluster,
            &cfg(),
            &rec,
        );
        assert!(matches!(d.outcome, Outcome::Drop(Why::SctpFragment)));
        assert!(d.new_flow.is_some());
    }

    #[test]
    fn later_fragments_follow_their_first_or_are_not_translated() {
        let mut rec = Record::default();
        let l4 = udp_l4(CLIENT, POD, 40000, 53, &[0x55; 16]);
        let mut first = ip4(PROTO_UDP, CLIENT, POD);
        first.mf = true;
        let (d, _, out) = translate(&frame(&first, &l4[..16]), Side::Cluster, &rec, Route::Stack);
        assert_eq!(
            &out[34..38],
            &[0x9c, 0x40, 0x14, 0xe9],
            "ports 40000 -> 5353"
        );
        let (id, ports) = d.remember.unwrap();
        assert_eq!(ports, (40000, 53));
        rec.add(&d.new_flow.unwrap());
        let mut later = ip4(PROTO_UDP, CLIENT, POD);
        later.frag_units = 2;
        let lf = frame(&later, &l4[16..]);
        let orphan = decide(&lf, Side::Cluster, &cfg(), &rec);
        assert!(matches!(orphan.outcome, Outcome::Drop(Why::Fragment)));
        let strict = Config {
            fallback: None,
            ..cfg()
        };
        assert!(matches!(
            decide(&lf, Side::Cluster, &strict, &rec).outcome,
            Outcome::Pass(_)
        ));
        rec.frags.insert(id, ports);
        let (_, _, out) = translate(&lf, Side::Cluster, &rec, Route::Stack);
        let mut want = later;
        (want.src, want.dst) = (SOURCE, DEST);
        assert_eq!(out, frame(&want, &l4[16..]), "addresses only");
    }

    #[test]
    fn forwarding_decrements_the_ttl_and_sets_the_macs_and_ttl_one_is_dropped() {
        let rec = Record::default();
        let f = tcp(CLIENT, POD, 40000, 8080);
        let route = Route::Direct {
            smac: [2, 9, 9, 9, 9, 1],
            dmac: [2, 9, 9, 9, 9, 2],
        };
        let (_, _, out) = translate(&f, Side::Cluster, &rec, route);
        assert_eq!(out[..12], [2, 9, 9, 9, 9, 2, 2, 9, 9, 9, 9, 1]);
        assert_eq!(out[22], 63);
        assert!(verifies(&out));
        let mut h = ip4(PROTO_TCP, CLIENT, POD);
        h.ttl = 1;
        let f = frame(&h, &tcp(CLIENT, POD, 40000, 8080)[34..]);
        assert!(matches!(
            decide(&f, Side::Cluster, &cfg(), &rec).outcome,
            Outcome::Drop(Why::TtlExpired)
        ));
    }

    /// The comparison the fuzzer relies on fails on a wrong output: a port, a checksum, a byte
    /// past the headers; and takes 0x0000 for 0xffff only where the two are the same number.
    #[test]
    fn the_comparison_catches_a_wrong_output() {
        let rec = Record::default();
        let f = tcp(CLIENT, POD, 40000, 8080);
        let (_, r, want) = translate(&f, Side::Cluster, &rec, Route::Stack);
        let mut bad = want.clone();
        bad[35] ^= 1; // source port
        assert_eq!(r.compare(&want, &bad), Err(35));
        let mut bad = want.clone();
        bad[51] = bad[51].wrapping_add(1); // TCP checksum
        assert_eq!(r.compare(&want, &bad), Err(51));
        let mut bad = want.clone();
        *bad.last_mut().unwrap() ^= 0x80;
        assert_eq!(r.compare(&want, &bad), Err(want.len() - 1));
        let mut w = want.clone();
        w[50..52].copy_from_slice(&[0, 0]);
        let mut a = w.clone();
        a[50..52].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(r.compare(&w, &a), Ok(()), "TCP: 0x0000 is 0xffff");
        let f = udp(CLIENT, POD, 40000, 53, b"q");
        let (_, r, mut w) = translate(&f, Side::Cluster, &rec, Route::Stack);
        w[40..42].copy_from_slice(&[0xff, 0xff]);
        let mut a = w.clone();
        a[40..42].copy_from_slice(&[0, 0]);
        assert_eq!(r.compare(&w, &a), Err(40), "UDP: 0 means no checksum");
    }

    fn any_frame() -> impl Strategy<Value = Vec<u8>> {
        let payload = proptest::collection::vec(any::<u8>(), 0..64);
        (
            0..4u8,
            any::<u16>(),
            payload,
            prop::sample::select(vec![53u16, 80, 8080, 443]),
        )
            .prop_map(|(kind, sport, payload, dport)| match kind {
                0 => {
                    let mut f = tcp(CLIENT, POD, sport, dport);
                    f.truncate(54);
                    let mut l4 = f[34..].to_vec();
                    l4.extend_from_slice(&payload);
                    l4[16..18].fill(0);
                    let c = checksum(&[&pseudo(CLIENT, POD, PROTO_TCP, l4.len()), &l4]);
                    l4[16..18].copy_from_slice(&c.to_be_bytes());
                    frame(&ip4(PROTO_TCP, CLIENT, POD), &l4)
                }
                1 => udp(CLIENT, POD, sport, dport, &payload),
                2 => echo(CLIENT, POD, 8, sport),
                _ => sctp(CLIENT, POD, sport, dport, None),
            })
    }

    proptest! {
        /// Valid checksums in, valid checksums out, for every protocol, new port or not.
        #[test]
        fn valid_checksums_stay_valid(f in any_frame(), port in 1024u16..) {
            let rec = Record::default();
            let d = decide(&f, Side::Cluster, &cfg(), &rec);
            let Outcome::Translate(r) = d.outcome else { panic!("{:?}", d.outcome) };
            let mut out = vec![0; f.len()];
            r.with_sport(port).apply(&f, &mut out, Route::Stack);
            prop_assert!(verifies(&out));
        }

        /// A wrong checksum leaves wrong by the same error: what it lacks to verify is the same.
        #[test]
        fn a_wrong_checksum_stays_wrong_by_its_error(f in any_frame(), err in 1u16..0xffff) {
            let rec = Record::default();
            let mut bad = f.clone();
            let proto = f[23];
            let at = 34 + match proto { PROTO_TCP => 16, PROTO_UDP => 6, PROTO_ICMP => 2, _ => 8 };
            let old = u16::from_be_bytes([f[at], f[at + 1]]);
            prop_assume!(proto != PROTO_UDP || old != 0);
            bad[at..at + 2].copy_from_slice(&old.wrapping_add(err).to_be_bytes());
            prop_assume!(proto != PROTO_UDP || bad[at..at + 2] != [0, 0]);
            let e_in = (old.wrapping_add(err) as u32 + 0xffff - old as u32) % 0xffff;
            prop_assume!(proto == PROTO_SCTP || e_in != 0, "0x0000 for 0xffff is no error");
            let Outcome::Translate(r) = decide(&bad, Side::Cluster, &cfg(), &rec).outcome else { panic!() };
            let (mut good_out, mut bad_out) = (vec![0; f.len()], vec![0; f.len()]);
            r.apply(&f, &mut good_out, Route::Stack);
            r.apply(&bad, &mut bad_out, Route::Stack);
            prop_assert!(!verifies(&bad_out));
            let g = u16::from_be_bytes([good_out[at], good_out[at + 1]]);
            let b = u16::from_be_bytes([bad_out[at], bad_out[at + 1]]);
            if proto == PROTO_SCTP {
                prop_assert_eq!(
                    u32::from_le_bytes(good_out[42..46].try_into().unwrap()) ^ u32::from_le_bytes(bad_out[42..46].try_into().unwrap()),
                    u32::from_le_bytes(f[42..46].try_into().unwrap()) ^ u32::from_le_bytes(bad[42..46].try_into().unwrap())
                );
            } else {
                // The field's error as one's-complement numbers, in and out.
                prop_assert_eq!((b as u32 + 0xffff - g as u32) % 0xffff, e_in);
            }
        }
    }
}
