//! SCTP's checksum after a port change, for the eBPF programs and tested on the host.
//!
//! SCTP (RFC 9260) protects its packet (common header and chunks, not the IP header) with a
//! CRC32c, which the kernel's one's-complement helpers cannot update. It does not need a pass
//! over the payload either: a CRC is linear over GF(2), so for two packets of the same length
//! `crc(a) ^ crc(b)` depends only on `a ^ b`. Changing the ports changes the first four bytes
//! by `d`, so the new checksum is the old one XORed with the CRC register that `d` followed
//! by `len - 4` zero bytes leaves (no initial value, no final XOR): `d * x^(8 len) mod P`
//! in the reflected representation. That costs two 32-step GF(2) multiplications and two
//! table lookups whatever the packet's size, reads no byte past the SCTP common header (so paged,
//! non-linear packets need no pull), and keeps the packet's checksum exactly as right or as
//! wrong as it arrived: a corrupted packet stays detectably corrupted for the receiver,
//! as TCP and UDP packets do under the incremental helpers (the router verifies no L4
//! checksum; end hosts do).
//!
//! The checksum field is little-endian on the wire: the kernel stores `cpu_to_le32(crc)`.

/// CRC32c's polynomial, bit-reflected (Castagnoli).
pub const CRC32C_POLY: u32 = 0x82f6_3b78;

/// Offsets in the SCTP common header.
pub const SCTP_PORTS_OFF: usize = 0;
pub const SCTP_CSUM_OFF: usize = 8;

/// `1`, the polynomial x^0, in the reflected representation.
const ONE: u32 = 1 << 31;

/// `a * b mod P` for polynomials over GF(2) in the reflected representation (zlib's
/// `multmodp`), in exactly 32 steps and without a branch: BPF has no conditional move, and a
/// branch per bit would give the verifier two paths per bit to walk.
#[inline(always)]
pub const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    let mut i = 0;
    while i < 32 {
        p ^= b & ((a >> (31 - i)) & 1).wrapping_neg();
        b = (b >> 1) ^ (CRC32C_POLY & (b & 1).wrapping_neg());
        i += 1;
    }
    p
}

/// `t[i] = x^(8 * step * i) mod P`: advancing a CRC register over `step * i` zero bytes is a
/// multiplication by it.
const fn powers(step_bytes: usize) -> [u32; 256] {
    // x^(8 * step): x^8 (the bit for degree 8, counted from the top in the reflected
    // representation) raised to the power `step` by repeated multiplication.
    let mut x = ONE;
    let mut n = 0;
    while n < step_bytes {
        x = multmodp(x, ONE >> 8);
        n += 1;
    }
    let mut t = [0u32; 256];
    t[0] = ONE;
    let mut i = 1;
    while i < 256 {
        t[i] = multmodp(t[i - 1], x);
        i += 1;
    }
    t
}

/// `x^(8 n) mod P` for n < 256, and for n a multiple of 256 below 65536: two tables of 1 KiB,
/// read-only data of the eBPF programs, so that any length takes one multiplication.
static X8N_LO: [u32; 256] = powers(1);
static X8N_HI: [u32; 256] = powers(256);

/// `x^(8 len) mod P`, for a length up to 65535 bytes (an IPv4 datagram's).
#[inline(always)]
pub fn x8n_mod_p(len: u16) -> u32 {
    multmodp(X8N_HI[(len >> 8) as usize], X8N_LO[(len & 0xff) as usize])
}

/// What the checksum field of an SCTP packet of `sctp_len` bytes (its IP payload: common
/// header and chunks) must become when its port word (source and destination port, the
/// four bytes as on the wire) changes from `old_ports` to `new_ports`. `field` is the field
/// as it arrived.
///
/// `None`: leave the field as it is. That is when nothing changes, and when the field is
/// zero: a packet the sender's stack leaves for checksum offload (CHECKSUM_PARTIAL, as
/// SCTP sockets send through a veth, and every SCTP GSO packet) carries a zero field, which
/// the device or the GSO segmentation later fills in over the bytes as they then are -- a
/// value written now would be folded into that computation and break it. A tc program
/// cannot read the skb's checksum state, so the zero field is the sign. (A computed CRC32c
/// is zero for one packet in 2^32; such a packet then arrives with a bad checksum and
/// SCTP retransmits it.)
#[inline(always)]
pub fn checksum_after_port_change(
    field: [u8; 4],
    old_ports: [u8; 4],
    new_ports: [u8; 4],
    sctp_len: u16,
) -> Option<[u8; 4]> {
    let d = u32::from_le_bytes(old_ports) ^ u32::from_le_bytes(new_ports);
    let old = u32::from_le_bytes(field);
    if d == 0 || old == 0 {
        return None;
    }
    Some((old ^ multmodp(x8n_mod_p(sctp_len), d)).to_le_bytes())
}

/// CRC32c of `data`, bit by bit: the reference the dataplane's arithmetic is checked against
/// on the host (and by the packet tests). Not used by the eBPF programs.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The checksum field an SCTP packet (`pkt`: common header and chunks) should carry: the
/// CRC32c of the packet with the field zeroed, little-endian. Host side (tests, tools).
pub fn checksum_field(pkt: &[u8]) -> [u8; 4] {
    let mut crc = !0u32;
    for (i, &b) in pkt.iter().enumerate() {
        let b = if (SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4).contains(&i) {
            0
        } else {
            b
        };
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
        }
    }
    (!crc).to_le_bytes()
}

/// What the dataplane makes of an SCTP packet whose ports become `sport`/`dport` (host
/// order): the ports written and the checksum field as `checksum_after_port_change` says.
/// The model the packet tests compare the programs' output with.
pub fn rewrite_ports(pkt: &mut [u8], sport: u16, dport: u16) {
    let mut old = [0u8; 4];
    old.copy_from_slice(&pkt[SCTP_PORTS_OFF..SCTP_PORTS_OFF + 4]);
    let s = sport.to_be_bytes();
    let d = dport.to_be_bytes();
    let new = [s[0], s[1], d[0], d[1]];
    let mut field = [0u8; 4];
    field.copy_from_slice(&pkt[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4]);
    pkt[SCTP_PORTS_OFF..SCTP_PORTS_OFF + 4].copy_from_slice(&new);
    if let Some(f) = checksum_after_port_change(field, old, new, pkt.len() as u16) {
        pkt[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4].copy_from_slice(&f);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    /// A valid SCTP packet: the common header, then `body`, with its checksum filled in.
    fn packet(sport: u16, dport: u16, vtag: u32, body: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&vtag.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(body);
        let c = crc32c::crc32c(&p);
        p[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4].copy_from_slice(&c.to_le_bytes());
        p
    }

    fn valid(p: &[u8]) -> bool {
        checksum_field(p) == p[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4]
    }

    #[test]
    fn the_bitwise_crc_is_crc32c() {
        // RFC 3720's check value, and the crate's.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b""), crc32c::crc32c(b""));
    }

    #[test]
    fn powers_of_x_advance_over_zero_bytes() {
        // Advancing a register over n zero bytes, step by step, against the power of x.
        for (reg, n) in [
            (0x1234_5678u32, 1u16),
            (0xdead_beef, 4),
            (1, 1500),
            (ONE, 65535),
        ] {
            let mut r = reg;
            for _ in 0..n as u32 * 8 {
                r = if r & 1 != 0 {
                    (r >> 1) ^ CRC32C_POLY
                } else {
                    r >> 1
                };
            }
            assert_eq!(
                multmodp(x8n_mod_p(n), reg),
                r,
                "register {reg:#x}, {n} bytes"
            );
        }
        assert_eq!(x8n_mod_p(0), ONE);
    }

    #[test]
    fn an_init_chunk_redirected_to_port_80_gets_a_valid_checksum() {
        // An INIT chunk (type 1, length 20: initiate tag, a_rwnd, streams, initial TSN) to
        // port 8080, redirected to port 80.
        let init = [
            0x01, 0x00, 0x00, 0x14, 0x11, 0x22, 0x33, 0x44, 0x00, 0x01, 0xa0, 0x00, 0x00, 0x0a,
            0xff, 0xff, 0x5e, 0x3d, 0x7a, 0x01,
        ];
        let mut p = packet(40000, 8080, 0, &init);
        rewrite_ports(&mut p, 40000, 80);
        assert_eq!(p[0..4], [0x9c, 0x40, 0x00, 0x50]);
        assert_eq!(p, packet(40000, 80, 0, &init), "ports and a valid CRC32c");
    }

    #[test]
    fn a_zero_field_is_left_for_offload_and_no_change_changes_nothing() {
        let ports = [1, 2, 3, 4];
        assert_eq!(
            checksum_after_port_change([0; 4], ports, [1, 2, 0, 80], 100),
            None
        );
        assert_eq!(
            checksum_after_port_change([9, 9, 9, 9], ports, ports, 100),
            None
        );
        let mut p = packet(1, 2, 3, b"abcd");
        p[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4].fill(0);
        rewrite_ports(&mut p, 5, 6);
        assert_eq!(p[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4], [0; 4]);
        assert_eq!(p[0..4], [0, 5, 0, 6]);
    }

    proptest! {
        /// Any valid packet, any length an IPv4 datagram can carry in a frame, any new ports:
        /// the adjusted checksum is the one a full recomputation (the crc32c crate) gives.
        #[test]
        fn port_change_gives_the_recomputed_crc32c(
            sport in any::<u16>(),
            dport in any::<u16>(),
            vtag in any::<u32>(),
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            new_sport in any::<u16>(),
            new_dport in any::<u16>(),
        ) {
            let mut p = packet(sport, dport, vtag, &body);
            prop_assume!(p[SCTP_CSUM_OFF..SCTP_CSUM_OFF + 4] != [0; 4]);
            rewrite_ports(&mut p, new_sport, new_dport);
            prop_assert_eq!(p, packet(new_sport, new_dport, vtag, &body));
        }

        /// A packet that arrives with a bad checksum leaves with a bad one, wrong by exactly
        /// what it was wrong by: the receiver still discards it.
        #[test]
        fn a_bad_checksum_stays_bad_by_the_same_error(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            error in 1u32..,
            new_dport in any::<u16>(),
        ) {
            let mut p = packet(40000, 8080, 7, &body);
            let good = u32::from_le_bytes(p[8..12].try_into().unwrap());
            prop_assume!(good ^ error != 0);
            p[8..12].copy_from_slice(&(good ^ error).to_le_bytes());
            rewrite_ports(&mut p, 40000, new_dport);
            prop_assert!(!valid(&p));
            let want = packet(40000, new_dport, 7, &body);
            let got = u32::from_le_bytes(p[8..12].try_into().unwrap());
            let right = u32::from_le_bytes(want[8..12].try_into().unwrap());
            prop_assert_eq!(got ^ right, error);
        }

        /// Large lengths (GSO-sized, up to the IPv4 limit) through the power table.
        #[test]
        fn long_packets_too(len in 2048usize..65515, new_dport in any::<u16>()) {
            let body = std::vec![0x5a; len - 12];
            let mut p = packet(9, 10, 11, &body);
            prop_assume!(p[8..12] != [0; 4]);
            rewrite_ports(&mut p, 9, new_dport);
            prop_assert!(valid(&p));
        }
    }
}
