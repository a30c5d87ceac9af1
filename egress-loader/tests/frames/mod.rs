//! Frames for the packet tests and the program fuzzer, built with etherparse, and the fields
//! they read back. Each test target uses a part of them.
#![allow(
    dead_code,
    reason = "each test target that includes this module uses a part of it"
)]

use etherparse::{IpNumber, Ipv4Header, Ipv4Options, PacketBuilder, checksum::Sum16BitWords};

pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// The Ethernet addresses and TTL of a frame: where it is on its way.
#[derive(Clone, Copy)]
pub struct Hop {
    pub src: [u8; 6],
    pub dst: [u8; 6],
    pub ttl: u8,
}

/// What the tests without a FIB send.
pub const TEST_HOP: Hop = Hop {
    src: MAC_A,
    dst: MAC_B,
    ttl: 64,
};

pub fn tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    tcp_via(TEST_HOP, src, dst, sport, dport, flags, payload)
}

pub fn tcp_via(
    hop: Hop,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(hop.src, hop.dst)
        .ipv4(src, dst, hop.ttl)
        .tcp(sport, dport, 1000, 65000);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            'R' => b.rst(),
            _ => b,
        };
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

pub fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp_via(TEST_HOP, src, dst, sport, dport, payload)
}

pub fn udp_via(
    hop: Hop,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(hop.src, hop.dst)
        .ipv4(src, dst, hop.ttl)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
}

pub fn echo(src: [u8; 4], dst: [u8; 4], request: bool, id: u16) -> Vec<u8> {
    echo_via(TEST_HOP, src, dst, request, id)
}

pub fn echo_via(hop: Hop, src: [u8; 4], dst: [u8; 4], request: bool, id: u16) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(hop.src, hop.dst).ipv4(src, dst, hop.ttl);
    let b = if request {
        b.icmpv4_echo_request(id, 1)
    } else {
        b.icmpv4_echo_reply(id, 1)
    };
    b.write(&mut v, b"ping payload").unwrap();
    v
}

/// The first fragment's part of a UDP datagram (checksum 0: none): the header and `len`
/// bytes, of a datagram whose later fragment carries 40 more.
pub fn udp_l4(sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&((8 + len + 40) as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend(std::iter::repeat_n(0x55, len));
    v
}

/// The first `8 + len` bytes of an ICMP echo message of type `icmp_type`.
pub fn echo_l4(icmp_type: u8, id: u16, len: usize) -> Vec<u8> {
    let mut v = vec![icmp_type, 0, 0, 0];
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&[0, 1]);
    v.extend(std::iter::repeat_n(0x66, len));
    v
}

/// A frame with a hand-made IPv4 header (options, fragments) around raw L4 bytes.
#[expect(
    clippy::too_many_arguments,
    reason = "each is one header field a test varies"
)]
pub fn raw_ipv4(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    id: u16,
    mf: bool,
    frag_units: u16,
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    let mut h = Ipv4Header::new(l4.len() as u16, 64, IpNumber(proto), src, dst).unwrap();
    h.identification = id;
    h.more_fragments = mf;
    h.fragment_offset = frag_units.try_into().unwrap();
    h.options = Ipv4Options::try_from(options).unwrap();
    h.total_len = (h.header_len() + l4.len()) as u16;
    h.header_checksum = h.calc_header_checksum();
    let mut v = Vec::new();
    v.extend_from_slice(&MAC_B);
    v.extend_from_slice(&MAC_A);
    v.extend_from_slice(&0x0800u16.to_be_bytes());
    h.write(&mut v).unwrap();
    v.extend_from_slice(l4);
    v
}

pub fn ip(frame: &[u8]) -> &[u8] {
    &frame[14..]
}
pub fn ihl(frame: &[u8]) -> usize {
    ((ip(frame)[0] & 0x0f) * 4) as usize
}
pub fn l4(frame: &[u8]) -> &[u8] {
    let total = u16::from_be_bytes([ip(frame)[2], ip(frame)[3]]) as usize;
    &ip(frame)[ihl(frame)..total]
}
pub fn saddr(f: &[u8]) -> [u8; 4] {
    ip(f)[12..16].try_into().unwrap()
}
pub fn daddr(f: &[u8]) -> [u8; 4] {
    ip(f)[16..20].try_into().unwrap()
}
pub fn sport(f: &[u8]) -> u16 {
    u16::from_be_bytes([l4(f)[0], l4(f)[1]])
}
pub fn dport(f: &[u8]) -> u16 {
    u16::from_be_bytes([l4(f)[2], l4(f)[3]])
}
pub fn icmp_id(f: &[u8]) -> u16 {
    u16::from_be_bytes([l4(f)[4], l4(f)[5]])
}

pub fn sum(parts: &[&[u8]]) -> u16 {
    parts
        .iter()
        .fold(Sum16BitWords::new(), |s, p| s.add_slice(p))
        .ones_complement()
}
