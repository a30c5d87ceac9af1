//! Packet classification: where the headers are and the flow key a packet belongs to.
use egress_common::{
    FlowKey, FragKey, FragValue, PROTO_ICMP, PROTO_TCP,
    packet::{
        ETH_HLEN, ETH_P_IP, IPV4_MIN_HLEN, Ipv4Info, icmp_echo_ports, is_icmp_error, l4_min_len,
    },
};

use crate::{error::Error, maps::FRAGS, skb::Skb};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP, UDP, SCTP, ICMP echo, or another protocol translated by address.
    Flow,
    /// An ICMP error quoting a packet of some flow.
    IcmpError,
    /// An ICMP message we leave to the stack.
    OtherIcmp,
    /// A later IPv4 fragment whose first fragment was not translated (not seen yet, or not
    /// ours): its ports, and so its flow, are unknown. See `main.rs` for where it goes.
    OrphanFragment,
}

pub struct Parsed {
    pub ip: Ipv4Info,
    /// Offset of the L4 header.
    pub l4: usize,
    /// Raw (network order) addresses as in the header.
    pub saddr: u32,
    pub daddr: u32,
    pub key: FlowKey,
    pub kind: Kind,
    pub tcp_flags: u8,
    pub icmp_type: u8,
}

#[inline(always)]
pub fn parse(skb: &Skb, now: u64) -> Result<Parsed, Error> {
    let ethertype: [u8; 2] = skb.load(12).map_err(|_| Error::NotOurs)?;
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return Err(Error::NotOurs);
    }
    let hdr: [u8; IPV4_MIN_HLEN] = skb.load(ETH_HLEN)?;
    let ip =
        Ipv4Info::parse(&hdr, skb.len().saturating_sub(ETH_HLEN)).map_err(|_| Error::Malformed)?;
    let saddr = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let daddr = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let l4 = ETH_HLEN + ip.hlen;
    let mut p = Parsed {
        ip,
        l4,
        saddr,
        daddr,
        key: FlowKey {
            saddr: saddr.to_ne_bytes(),
            daddr: daddr.to_ne_bytes(),
            sport: 0,
            dport: 0,
            proto: ip.proto,
            _pad0: 0,
            _pad1: 0,
        },
        kind: Kind::Flow,
        tcp_flags: 0,
        icmp_type: 0,
    };
    if !ip.has_l4_header() {
        // A later fragment: its ports were recorded from the first one, if that was translated.
        let Some(f) = FRAGS.get_ptr_mut(&frag_key(&p)) else {
            p.kind = Kind::OrphanFragment;
            return Ok(p);
        };
        // SAFETY: a valid map value pointer, shared with other CPUs: accessed in place
        // through the pointer, never through a reference (see entry.rs).
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*f).last_seen_ns), now);
            p.key.sport = core::ptr::read(core::ptr::addr_of!((*f).sport));
            p.key.dport = core::ptr::read(core::ptr::addr_of!((*f).dport));
        }
        return Ok(p);
    }
    let need = l4_min_len(ip.proto);
    if l4 + need > ETH_HLEN + ip.total_len {
        return Err(Error::Malformed);
    }
    if ip.proto == PROTO_TCP {
        let h: [u8; 14] = skb.load(l4)?;
        p.key.sport = u16::from_be_bytes([h[0], h[1]]);
        p.key.dport = u16::from_be_bytes([h[2], h[3]]);
        p.tcp_flags = h[13];
    } else if ip.proto == PROTO_ICMP {
        let h: [u8; 8] = skb.load(l4)?;
        p.icmp_type = h[0];
        if is_icmp_error(h[0]) {
            p.kind = Kind::IcmpError;
            return Ok(p);
        }
        match icmp_echo_ports(h[0], u16::from_be_bytes([h[4], h[5]])) {
            Some((s, d)) => (p.key.sport, p.key.dport) = (s, d),
            None => p.kind = Kind::OtherIcmp,
        }
    } else if need != 0 {
        // UDP and SCTP: the ports lead the header.
        let h: [u8; 4] = skb.load(l4)?;
        p.key.sport = u16::from_be_bytes([h[0], h[1]]);
        p.key.dport = u16::from_be_bytes([h[2], h[3]]);
    }
    Ok(p)
}

#[inline(always)]
fn frag_key(p: &Parsed) -> FragKey {
    FragKey {
        saddr: p.key.saddr,
        daddr: p.key.daddr,
        id: p.ip.id,
        proto: p.ip.proto,
        _pad: 0,
    }
}

/// Records the ports of a translated first fragment (`p` as parsed, before the rewrite), so
/// that the datagram's later fragments follow it. Only translated datagrams are recorded: the
/// later fragments of anything else find no entry and go where their first fragment went.
#[inline(always)]
pub fn remember_fragment(p: &Parsed, now: u64) {
    if !p.ip.more_frags || !p.ip.has_l4_header() {
        return;
    }
    let v = FragValue {
        sport: p.key.sport,
        dport: p.key.dport,
        _pad: 0,
        last_seen_ns: now,
    };
    // Best effort: if this fails, later fragments are orphans (main.rs).
    let _ = FRAGS.insert(&frag_key(p), &v, 0);
}
