//! Pure packet and flow logic shared by the eBPF programs and tested on the host.

use crate::{DataplaneConfig, FLOW_CLOSING, FlowKey, PROTO_ICMP, PROTO_TCP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_HLEN: usize = 20;
/// IPv4 header offsets (from the start of the IP header).
pub const IP_TTL_OFF: usize = 8;
pub const IP_PROTO_OFF: usize = 9;
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Checksum offsets inside the L4 header.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
pub const ICMP_CSUM_OFF: usize = 2;
pub const SCTP_HLEN: usize = 12;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Why a packet was not parsed; mapped to one verdict per program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than its headers say, or a header field out of range.
    Malformed,
    /// Not something this dataplane translates (not IPv4, or an ICMP type we leave alone).
    NotOurs,
}

/// The fields of an IPv4 header this dataplane needs, decoded from its first 20 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    /// Header length in bytes (IHL * 4): IP options are honoured, never assumed absent.
    pub hlen: usize,
    pub total_len: usize,
    pub id: u16,
    pub ttl: u8,
    pub proto: u8,
    /// Fragment offset in bytes; non-zero means no L4 header in this packet.
    pub frag_off: usize,
    pub more_frags: bool,
}

impl Ipv4Info {
    /// Decodes and checks the fixed IPv4 header. `avail` is how many bytes of the packet exist
    /// from the start of the IP header.
    #[inline(always)]
    pub fn parse(h: &[u8; IPV4_MIN_HLEN], avail: usize) -> Result<Ipv4Info, ParseError> {
        if h[0] >> 4 != 4 {
            return Err(ParseError::Malformed);
        }
        let hlen = ((h[0] & 0x0f) as usize) * 4;
        let total_len = u16::from_be_bytes([h[2], h[3]]) as usize;
        if hlen < IPV4_MIN_HLEN || total_len < hlen || total_len > avail {
            return Err(ParseError::Malformed);
        }
        let frag = u16::from_be_bytes([h[6], h[7]]);
        Ok(Ipv4Info {
            hlen,
            total_len,
            id: u16::from_be_bytes([h[4], h[5]]),
            ttl: h[IP_TTL_OFF],
            proto: h[IP_PROTO_OFF],
            frag_off: ((frag & 0x1fff) as usize) * 8,
            more_frags: frag & 0x2000 != 0,
        })
    }

    /// Decodes the IPv4 header quoted inside an ICMP error: the quoted packet is truncated, so
    /// its total length is not checked against what is present.
    #[inline(always)]
    pub fn parse_quoted(h: &[u8; IPV4_MIN_HLEN]) -> Result<Ipv4Info, ParseError> {
        if h[0] >> 4 != 4 || ((h[0] & 0x0f) as usize) * 4 < IPV4_MIN_HLEN {
            return Err(ParseError::Malformed);
        }
        let frag = u16::from_be_bytes([h[6], h[7]]);
        Ok(Ipv4Info {
            hlen: ((h[0] & 0x0f) as usize) * 4,
            total_len: u16::from_be_bytes([h[2], h[3]]) as usize,
            id: u16::from_be_bytes([h[4], h[5]]),
            ttl: h[IP_TTL_OFF],
            proto: h[IP_PROTO_OFF],
            frag_off: ((frag & 0x1fff) as usize) * 8,
            more_frags: frag & 0x2000 != 0,
        })
    }

    pub fn is_fragment(&self) -> bool {
        self.more_frags || self.frag_off != 0
    }

    /// Whether this packet carries the L4 header (unfragmented, or the first fragment).
    pub fn has_l4_header(&self) -> bool {
        self.frag_off == 0
    }
}

/// The 16-bit header word holding TTL and protocol, as it sits in memory (zero-extended):
/// the unit the header checksum covers them in.
#[inline(always)]
pub fn ttl_proto_word(ttl: u8, proto: u8) -> u32 {
    u16::from_ne_bytes([ttl, proto]) as u32
}

/// Source and destination port (host order) as the 32-bit word leading a TCP/UDP header, as it
/// sits in memory.
#[inline(always)]
pub fn ports_word(sport: u16, dport: u16) -> u32 {
    let (s, d) = (sport.to_be_bytes(), dport.to_be_bytes());
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// The one's-complement checksum difference of replacing the 32-bit words `from` by `to` (as
/// they sit in memory), added to `seed`: the value `bpf_csum_diff` returns, in the form
/// `bpf_l3_csum_replace`/`bpf_l4_csum_replace` apply with size 0. Computed here rather than
/// by that helper because each helper call costs a return thunk per packet; the checksums
/// themselves still change only through the two replace helpers (SPEC section 6).
#[inline(always)]
pub fn csum_diff<const N: usize>(from: &[u32; N], to: &[u32; N], seed: u32) -> u32 {
    let mut sum = seed as u64;
    let mut i = 0;
    while i < N {
        sum += (!from[i]) as u64 + to[i] as u64;
        i += 1;
    }
    // Fold the carries back in (end-around carry), twice: the first fold can carry again.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// Length of the L4 header part this dataplane reads and rewrites, or 0 for protocols it
/// translates by address only.
#[inline(always)]
pub fn l4_min_len(proto: u8) -> usize {
    match proto {
        PROTO_TCP => TCP_MIN_HLEN,
        crate::PROTO_UDP => UDP_HLEN,
        crate::PROTO_SCTP => SCTP_HLEN,
        PROTO_ICMP => ICMP_HLEN,
        _ => 0,
    }
}

/// Whether an ICMP type is an error that quotes the packet it is about.
#[inline(always)]
pub fn is_icmp_error(t: u8) -> bool {
    matches!(
        t,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

/// The (sport, dport) pair an ICMP echo message stands for in a flow key: the identifier is
/// the "source port" of requests and the "destination port" of replies, so that a reply's key
/// is the reversed key of its request. Other types carry no ports.
#[inline(always)]
pub fn icmp_echo_ports(icmp_type: u8, id: u16) -> Option<(u16, u16)> {
    match icmp_type {
        ICMP_ECHO_REQUEST => Some((id, 0)),
        ICMP_ECHO_REPLY => Some((0, id)),
        _ => None,
    }
}

/// Idle timeout in nanoseconds for a flow entry.
#[inline(always)]
pub fn idle_timeout_ns(cfg: &DataplaneConfig, proto: u8, flags: u8) -> u64 {
    let secs = match proto {
        PROTO_TCP if flags & FLOW_CLOSING != 0 => cfg.tcp_closing_timeout,
        PROTO_TCP => cfg.tcp_established_timeout,
        PROTO_ICMP => cfg.icmp_timeout,
        // UDP and SCTP (SCTP closes are not tracked: it keeps the UDP-like idle timeout).
        _ => cfg.udp_timeout,
    };
    secs as u64 * NS_PER_SEC
}

/// Whether an entry last seen at `last_seen_ns` has been idle too long at `now_ns`.
#[inline(always)]
pub fn is_expired(now_ns: u64, last_seen_ns: u64, timeout_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_ns
}

/// Slots of a CPU's table of one-way flow hints (`NEW_HINTS`): a power of two.
pub const HINT_SLOTS: usize = 256;

/// The hint tag of an outbound UDP flow key: its slot is `tag as usize % HINT_SLOTS`, and the
/// slot holds the tag while the flow is one no reply has answered yet. Never 0 (an empty slot).
/// Two flows may share a tag; a wrong hint only changes which table is looked up first.
#[inline(always)]
pub fn hint_tag(key: &FlowKey) -> u32 {
    let a = u32::from_ne_bytes(key.saddr);
    let b = u32::from_ne_bytes(key.daddr);
    let ports = key.sport as u32 | (key.dport as u32) << 16;
    let h =
        a.wrapping_mul(0x9e37_79b1) ^ b.wrapping_mul(0x85eb_ca77) ^ ports.wrapping_mul(0xc2b2_ae3d);
    (h ^ h >> 16) | 0x8000_0000
}

/// The source port to try on attempt `attempt` (0-based) of a new flow: first the client's own
/// port, then ports drawn from the configured range with `random`.
#[inline(always)]
pub fn candidate_port(attempt: u32, client_port: u16, random: u32, cfg: &DataplaneConfig) -> u16 {
    if attempt == 0 || cfg.port_max < cfg.port_min {
        return client_port;
    }
    let span = (cfg.port_max - cfg.port_min) as u32 + 1;
    cfg.port_min + (random % span) as u16
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// One client's flows to one destination, differing only in the source port (the UDP
    /// flood's 64, a pod's sockets), spread over the slots: a hint is rarely overwritten by
    /// another flow's.
    #[test]
    fn hint_tags_spread_one_clients_flows_over_the_slots() {
        let mut used = [false; HINT_SLOTS];
        for sport in 40000..40064u16 {
            let tag = hint_tag(&FlowKey {
                saddr: [10, 128, 0, 5],
                daddr: [10, 128, 0, 2],
                sport,
                dport: 9,
                proto: crate::PROTO_UDP,
                _pad0: 0,
                _pad1: 0,
            });
            assert_ne!(tag, 0);
            used[tag as usize % HINT_SLOTS] = true;
        }
        let slots = used.iter().filter(|u| **u).count();
        assert!(slots >= 48, "64 flows in {slots} slots");
    }

    fn header(ihl: u8, total: u16, frag: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x40 | ihl;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[9] = PROTO_TCP;
        h
    }

    #[test]
    fn parses_options_and_fragments() {
        let i = Ipv4Info::parse(&header(6, 60, 0x2000), 60).unwrap();
        assert_eq!(i.hlen, 24);
        assert!(i.more_frags && i.is_fragment() && i.has_l4_header());
        let i = Ipv4Info::parse(&header(5, 60, 0x0003), 60).unwrap();
        assert_eq!(i.frag_off, 24);
        assert!(i.is_fragment() && !i.has_l4_header());
        assert_eq!(i.id, 0x1234);
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(
            Ipv4Info::parse(&header(4, 60, 0), 60),
            Err(ParseError::Malformed)
        );
        assert_eq!(
            Ipv4Info::parse(&header(5, 61, 0), 60),
            Err(ParseError::Malformed)
        );
        assert_eq!(
            Ipv4Info::parse(&header(6, 20, 0), 60),
            Err(ParseError::Malformed)
        );
        let mut h = header(5, 20, 0);
        h[0] = 0x65;
        assert_eq!(Ipv4Info::parse(&h, 60), Err(ParseError::Malformed));
    }

    fn cfg() -> DataplaneConfig {
        DataplaneConfig {
            port_min: 1024,
            port_max: 1027,
            tcp_established_timeout: 100,
            tcp_closing_timeout: 10,
            udp_timeout: 30,
            icmp_timeout: 5,
            ..Default::default()
        }
    }

    #[test]
    fn timeouts_by_protocol_and_state() {
        let c = cfg();
        assert_eq!(idle_timeout_ns(&c, PROTO_TCP, 0), 100 * NS_PER_SEC);
        assert_eq!(
            idle_timeout_ns(&c, PROTO_TCP, FLOW_CLOSING),
            10 * NS_PER_SEC
        );
        assert_eq!(idle_timeout_ns(&c, crate::PROTO_UDP, 0), 30 * NS_PER_SEC);
        assert_eq!(idle_timeout_ns(&c, PROTO_ICMP, 0), 5 * NS_PER_SEC);
        assert!(
            !is_expired(10, 20, 5),
            "a clock behind last_seen is not expiry"
        );
        assert!(is_expired(100, 10, 89));
        assert!(!is_expired(100, 10, 90));
    }

    #[test]
    fn quoted_headers_skip_the_length_check() {
        let h = header(5, 1500, 0);
        assert!(Ipv4Info::parse(&h, 28).is_err());
        assert_eq!(Ipv4Info::parse_quoted(&h).unwrap().hlen, 20);
        assert!(Ipv4Info::parse_quoted(&header(3, 1500, 0)).is_err());
    }

    #[test]
    fn echo_ports_swap_between_request_and_reply() {
        assert_eq!(icmp_echo_ports(ICMP_ECHO_REQUEST, 7), Some((7, 0)));
        assert_eq!(icmp_echo_ports(ICMP_ECHO_REPLY, 7), Some((0, 7)));
        assert_eq!(icmp_echo_ports(ICMP_DEST_UNREACH, 7), None);
        assert!(is_icmp_error(ICMP_TIME_EXCEEDED) && !is_icmp_error(ICMP_ECHO_REPLY));
    }

    #[test]
    fn ports_first_own_then_in_range() {
        let c = cfg();
        assert_eq!(candidate_port(0, 40000, 7, &c), 40000);
        for r in 0..100 {
            let p = candidate_port(1, 40000, r, &c);
            assert!((1024..=1027).contains(&p));
        }
        let mut c2 = c;
        c2.port_min = 0;
        c2.port_max = u16::MAX;
        assert_eq!(candidate_port(3, 1, u32::MAX, &c2), u16::MAX);
    }

    #[test]
    fn header_words_are_the_bytes_on_the_wire() {
        let mut h = header(5, 40, 0);
        h[8] = 64;
        assert_eq!(Ipv4Info::parse(&h, 40).unwrap().ttl, 64);
        assert_eq!(
            ttl_proto_word(64, PROTO_TCP).to_ne_bytes(),
            [64, PROTO_TCP, 0, 0]
        );
        assert_eq!(ports_word(0x1234, 80).to_ne_bytes(), [0x12, 0x34, 0, 80]);
    }

    /// The kernel's `csum_replace_by_diff`: what bpf_l3_csum_replace does with a difference.
    fn replace_by_diff(check: u16, diff: u32) -> u16 {
        let mut s = diff as u64 + (!(check as u32)) as u64;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// A header checksum computed from scratch over memory-order 16-bit words.
    fn checksum(bytes: &[u8]) -> u16 {
        let mut s: u64 = 0;
        for c in bytes.chunks(2) {
            s += u16::from_ne_bytes([c[0], c[1]]) as u64;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    proptest::proptest! {
        /// Rewriting the addresses and the TTL of a valid IPv4 header and applying the one
        /// difference gives the checksum a full recomputation gives (the per-field helpers'
        /// result), including headers whose fields sum to the one's-complement zeros.
        #[test]
        fn one_difference_updates_the_header_checksum(
            mut hdr in proptest::array::uniform20(proptest::prelude::any::<u8>()),
            saddr in proptest::prelude::any::<[u8; 4]>(),
            daddr in proptest::prelude::any::<[u8; 4]>(),
            ttl in 2u8..,
        ) {
            hdr[IP_TTL_OFF] = ttl;
            hdr[IP_CSUM_OFF..IP_CSUM_OFF + 2].fill(0);
            let c = checksum(&hdr);
            hdr[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&c.to_ne_bytes());
            let word = |h: &[u8; 20], o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
            let old = [word(&hdr, IP_SADDR_OFF), word(&hdr, IP_DADDR_OFF)];
            let new = [u32::from_ne_bytes(saddr), u32::from_ne_bytes(daddr)];
            let proto = hdr[IP_PROTO_OFF];
            let diff = csum_diff(
                &[ttl_proto_word(ttl, proto)],
                &[ttl_proto_word(ttl - 1, proto)],
                csum_diff(&old, &new, 0),
            );
            let mut out = hdr;
            out[IP_SADDR_OFF..IP_SADDR_OFF + 4].copy_from_slice(&saddr);
            out[IP_DADDR_OFF..IP_DADDR_OFF + 4].copy_from_slice(&daddr);
            out[IP_TTL_OFF] = ttl - 1;
            let updated = replace_by_diff(c, diff);
            out[IP_CSUM_OFF..IP_CSUM_OFF + 2].fill(0);
            // Equal as one's-complement numbers: 0x0000 and 0xffff are the same value.
            let expected = checksum(&out);
            proptest::prop_assert!(
                updated == expected || (updated | expected) == 0xffff && (updated & expected) == 0,
                "updated {updated:#06x}, recomputed {expected:#06x}"
            );
            // And the updated header verifies.
            out[IP_CSUM_OFF..IP_CSUM_OFF + 2].copy_from_slice(&updated.to_ne_bytes());
            proptest::prop_assert_eq!(checksum(&out), 0);
        }
    }
}
