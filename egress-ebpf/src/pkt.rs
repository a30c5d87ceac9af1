//! The context of one packet on the fast path (firezone relay's model): what the packet is,
//! the side it arrived on, the configuration and clock it is handled with, and the counters it
//! moves. Passed down as one value instead of the same six arguments to every step.
//!
//! It holds references only, never the parsed headers themselves: every step is inlined, so
//! the fields become the registers and stack slots the separate arguments were, and the object
//! keeps its instructions. (Moving `Parsed` into it changed the stack layout, and Linux 6.1's
//! verifier then refused a register spill in the SCTP checksum store.)
use egress_common::{DIR_IN, DIR_OUT, DataplaneConfig, Stats};

use crate::{parse::Parsed, skb::Skb};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Arrived on the cluster interface (eth0).
    Cluster,
    /// Arrived on the outside interface (macvlan0).
    Outside,
}

impl Side {
    /// The direction of the flow entries packets arriving on this side use: a client's
    /// packets go out, the outside's replies come in.
    #[inline(always)]
    pub fn direction(self) -> u8 {
        match self {
            Side::Cluster => DIR_OUT,
            Side::Outside => DIR_IN,
        }
    }
}

pub struct Pkt<'a> {
    pub skb: &'a Skb<'a>,
    pub p: &'a Parsed,
    pub cfg: &'a DataplaneConfig,
    pub side: Side,
    /// The coarse clock, read once per packet (`flows::now_ns`).
    pub now: u64,
    pub stats: &'a mut Stats,
}

impl Pkt<'_> {
    /// The interface the packet arrived on: FIB lookups are made from it.
    #[inline(always)]
    pub fn in_ifindex(&self) -> u32 {
        match self.side {
            Side::Cluster => self.cfg.eth0_ifindex,
            Side::Outside => self.cfg.macvlan_ifindex,
        }
    }

    /// Counts the packet (`len` bytes) as sent on, in its direction.
    #[inline(always)]
    pub fn count_out(&mut self, len: u64) {
        let s = &mut *self.stats;
        match self.side {
            Side::Cluster => {
                s.out_packets += 1;
                s.out_bytes += len;
            }
            Side::Outside => {
                s.in_packets += 1;
                s.in_bytes += len;
            }
        }
    }
}
