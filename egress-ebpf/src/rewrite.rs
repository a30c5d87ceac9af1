//! Header rewrites: fields written directly, checksums through the helpers (see skb.rs), one
//! checksum update per header for the addresses and TTL together.
use egress_common::{
    FlowKey, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    packet::{
        ETH_HLEN, ICMP_CSUM_OFF, ICMP_ECHO_REQUEST, IP_CSUM_OFF, IP_SADDR_OFF, IP_TTL_OFF,
        IPV4_MIN_HLEN, Ipv4Info, TCP_CSUM_OFF, UDP_CSUM_OFF, csum_diff, icmp_echo_ports,
        ports_word, ttl_proto_word,
    },
};

use crate::{error::Error, parse::Parsed, sctp, skb::Skb};

#[inline(always)]
fn raw(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// Rewrites a packet of a flow to its entry's translated tuple `v`: L4 first (ports, ids and the pseudo-header
/// part of the checksum), then the IP header. `forwarding`: this program sends the packet on,
/// so it decrements the TTL (the stack does that for packets it is handed). Later fragments
/// carry no L4 header; their datagram's checksum was fixed in the first fragment.
#[inline(always)]
pub fn flow(skb: &Skb, p: &Parsed, v: &FlowKey, forwarding: bool) -> Result<(), Error> {
    let old = [p.saddr, p.daddr];
    let new = [raw(v.saddr), raw(v.daddr)];
    let addr_diff = csum_diff(&old, &new, 0);
    if p.ip.has_l4_header() {
        match p.key.proto {
            PROTO_TCP | PROTO_UDP => {
                let udp = p.key.proto == PROTO_UDP;
                let csum = p.l4 + if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
                skb.l4_pseudo_csum_add(csum, addr_diff, udp)?;
                let (old_ports, new_ports) = (
                    ports_word(p.key.sport, p.key.dport),
                    ports_word(v.sport, v.dport),
                );
                skb.set_l4_u32(p.l4, csum, old_ports, new_ports, udp)?;
            }
            PROTO_ICMP => {
                // Echo: the identifier is the sport of requests and the dport of replies.
                let (old, new) = if p.icmp_type == ICMP_ECHO_REQUEST {
                    (p.key.sport, v.sport)
                } else {
                    (p.key.dport, v.dport)
                };
                skb.set_l4_u16(p.l4 + 4, p.l4 + ICMP_CSUM_OFF, old, new)?;
            }
            // The CRC32c covers no addresses, only the ports.
            PROTO_SCTP => sctp::set_ports(skb, p, v.sport, v.dport)?,
            // Others: addresses only.
            _ => {}
        }
    }
    outer_ip(skb, p, new, addr_diff, forwarding)
}

/// The outer IPv4 header: new addresses (`addr_diff` being their checksum change) and, when
/// forwarding, the decremented TTL, under one header checksum update.
#[inline(always)]
fn outer_ip(
    skb: &Skb,
    p: &Parsed,
    new: [u32; 2],
    addr_diff: u32,
    forwarding: bool,
) -> Result<(), Error> {
    let diff = if forwarding {
        let ttl = p.ip.ttl;
        let old_word = ttl_proto_word(ttl, p.ip.proto);
        let new_word = ttl_proto_word(ttl.wrapping_sub(1), p.ip.proto);
        csum_diff(&[old_word], &[new_word], addr_diff)
    } else {
        addr_diff
    };
    skb.l3_csum_add(ETH_HLEN + IP_CSUM_OFF, diff)?;
    skb.write(ETH_HLEN + IP_SADDR_OFF, new)?;
    if forwarding {
        skb.write(ETH_HLEN + IP_TTL_OFF, p.ip.ttl.wrapping_sub(1))?;
    }
    Ok(())
}

/// The packet an ICMP error quotes, and the flow key of the direction that would answer it.
pub struct Quoted {
    ip: usize,
    l4: usize,
    proto: u8,
    icmp_type: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    pub reply_key: FlowKey,
}

#[inline(always)]
pub fn quoted(skb: &Skb, p: &Parsed) -> Result<Quoted, Error> {
    let ip = p.l4 + 8;
    // The quoted headers must lie within the error's IP total length: bytes past it are the
    // frame's padding, not part of the packet (found by the program fuzzer: a truncated
    // error had its padding rewritten as if quoted).
    let end = ETH_HLEN + p.ip.total_len;
    if ip + IPV4_MIN_HLEN > end {
        return Err(Error::NotOurs);
    }
    let hdr: [u8; IPV4_MIN_HLEN] = skb.load(ip)?;
    let info = Ipv4Info::parse_quoted(&hdr).map_err(|_| Error::Malformed)?;
    let l4 = ip + info.hlen;
    if l4 + 8 > end {
        return Err(Error::NotOurs);
    }
    let saddr = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let daddr = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let mut q = Quoted {
        ip,
        l4,
        proto: info.proto,
        icmp_type: 0,
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        reply_key: FlowKey::default(),
    };
    if info.frag_off != 0 {
        return Err(Error::NotOurs);
    }
    // Every error quotes at least 8 bytes of L4: the ports of TCP, UDP and SCTP, or the ICMP
    // header with the echo identifier.
    let h: [u8; 8] = skb.load(l4)?;
    if info.proto == PROTO_ICMP {
        q.icmp_type = h[0];
        (q.sport, q.dport) =
            icmp_echo_ports(h[0], u16::from_be_bytes([h[4], h[5]])).ok_or(Error::NotOurs)?;
    } else {
        q.sport = u16::from_be_bytes([h[0], h[1]]);
        q.dport = u16::from_be_bytes([h[2], h[3]]);
    }
    // The quoted packet went (s -> d); its flow's entry on this side is keyed by (d -> s).
    q.reply_key = FlowKey {
        saddr: daddr.to_ne_bytes(),
        daddr: saddr.to_ne_bytes(),
        sport: q.dport,
        dport: q.sport,
        proto: info.proto,
        _pad0: 0,
        _pad1: 0,
    };
    Ok(q)
}

/// Rewrites an ICMP error about a translated flow, `v` being the translated tuple of the entry
/// found with `q.reply_key`: the outer header goes (v.saddr -> v.daddr) and the quoted packet becomes
/// the one the other side sent, (v.daddr:v.dport -> v.saddr:v.sport). The quoted IP header
/// keeps a valid checksum, so the ICMP checksum only follows the quoted ports. (A quoted
/// SCTP header's CRC32c stays as quoted: it covers bytes the quote cuts off, and the stack
/// matches an error to its association by ports and verification tag.)
#[inline(always)]
pub fn icmp_error(
    skb: &Skb,
    p: &Parsed,
    q: &Quoted,
    v: &FlowKey,
    forwarding: bool,
) -> Result<(), Error> {
    let icmp_csum = p.l4 + ICMP_CSUM_OFF;
    match q.proto {
        PROTO_ICMP => {
            let (old, new) = if q.icmp_type == ICMP_ECHO_REQUEST {
                (q.sport, v.dport)
            } else {
                (q.dport, v.sport)
            };
            skb.set_l4_u16(q.l4 + 4, icmp_csum, old, new)?;
        }
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            skb.set_l4_u16(q.l4, icmp_csum, q.sport, v.dport)?;
            skb.set_l4_u16(q.l4 + 2, icmp_csum, q.dport, v.sport)?;
        }
        _ => {}
    }
    // The quoted header: its own checksum follows its addresses.
    let quoted_new = [raw(v.daddr), raw(v.saddr)];
    let quoted_diff = csum_diff(&[q.saddr, q.daddr], &quoted_new, 0);
    skb.l3_csum_add(q.ip + IP_CSUM_OFF, quoted_diff)?;
    skb.write(q.ip + IP_SADDR_OFF, quoted_new)?;
    let new = [raw(v.saddr), raw(v.daddr)];
    outer_ip(
        skb,
        p,
        new,
        csum_diff(&[p.saddr, p.daddr], &new, 0),
        forwarding,
    )
}
