//! SCTP port rewrites. The checksum is a CRC32c over the whole SCTP packet, which the
//! one's-complement helpers cannot update; `egress_common::sctp` derives the new one from the
//! old one and the changed ports (CRC linearity), so no byte past the common header is read,
//! whatever the packet's size or layout (paged skbs, GSO). Address-only changes need nothing:
//! the CRC covers no IP header field.
use egress_common::{
    packet::ports_word,
    sctp::{SCTP_CSUM_OFF, SCTP_PORTS_OFF, checksum_after_port_change},
};

use crate::{error::Error, parse::Parsed, skb::Skb};

/// Rewrites the ports of the SCTP packet `p` to `sport`/`dport` (host order), with its
/// checksum field as `checksum_after_port_change` says (left alone when the sender's stack
/// left it to offload, that is zero).
#[inline(always)]
pub fn set_ports(skb: &Skb, p: &Parsed, sport: u16, dport: u16) -> Result<(), Error> {
    let old = ports_word(p.key.sport, p.key.dport).to_ne_bytes();
    let new = ports_word(sport, dport).to_ne_bytes();
    if old == new {
        return Ok(());
    }
    // The CRC covers the whole datagram, whose length a first fragment does not tell.
    if p.ip.more_frags {
        return Err(Error::SctpFragment);
    }
    let field: [u8; 4] = skb.load(p.l4 + SCTP_CSUM_OFF)?;
    // parse() checked hlen <= total_len <= 65535.
    let sctp_len = (p.ip.total_len - p.ip.hlen) as u16;
    let csum = checksum_after_port_change(field, old, new, sctp_len);
    skb.store(p.l4 + SCTP_PORTS_OFF, new)?;
    if let Some(f) = csum {
        skb.store(p.l4 + SCTP_CSUM_OFF, f)?;
    }
    Ok(())
}
