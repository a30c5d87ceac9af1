//! One error type for every way a packet leaves the translation path, mapped to a counter and
//! a tc verdict in one place.
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};

use egress_common::Stats;

#[derive(Clone, Copy)]
pub enum Error {
    /// Not something we translate (ARP, IPv6, traffic for the router itself): the stack has it.
    NotOurs,
    /// eth0 traffic matching no rule and no fallback: the local stack refuses it.
    NoRule,
    /// Truncated or inconsistent headers.
    Malformed,
    /// A helper failed mid-rewrite: drop rather than send a half-translated packet.
    Helper,
    TableFull,
    PortExhausted,
    /// On macvlan0: not a reply to a flow a client opened.
    Unsolicited,
    /// A later IPv4 fragment of a datagram that is translated, but whose ports are unknown: its
    /// first fragment was not seen (reordered or lost), or its flow is gone.
    Fragment,
    /// The first fragment of an SCTP packet whose ports change: its CRC32c covers the whole
    /// datagram, whose length no fragment but the last tells (SCTP sets DF and splits its own
    /// chunks, so it rarely comes to this). Counted with the fragments.
    SctpFragment,
    TtlExpired,
}

impl Error {
    #[inline(always)]
    pub fn verdict(self, s: &mut Stats) -> i32 {
        match self {
            Error::NotOurs => TC_ACT_OK,
            Error::NoRule => {
                s.no_rule += 1;
                TC_ACT_OK
            }
            Error::Malformed | Error::Helper => {
                s.drop_malformed += 1;
                TC_ACT_SHOT
            }
            Error::TableFull => {
                s.drop_table_full += 1;
                TC_ACT_SHOT
            }
            Error::PortExhausted => {
                s.drop_port_exhausted += 1;
                TC_ACT_SHOT
            }
            Error::Unsolicited => {
                s.drop_unsolicited += 1;
                TC_ACT_SHOT
            }
            Error::Fragment | Error::SctpFragment => {
                s.drop_fragment += 1;
                TC_ACT_SHOT
            }
            Error::TtlExpired => {
                s.drop_ttl += 1;
                TC_ACT_SHOT
            }
        }
    }
}
