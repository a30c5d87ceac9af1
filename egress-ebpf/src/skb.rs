//! The one packet accessor: every read and write goes through the kernel helpers, which check
//! bounds and keep the checksum state of the skb right (also for partially checksummed packets
//! from pods on the same node).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::error::Error;

pub struct Skb<'a> {
    pub ctx: &'a TcContext,
}

impl<'a> Skb<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        Skb { ctx }
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.ctx.len() as usize
    }

    #[inline(always)]
    pub fn load<T>(&self, off: usize) -> Result<T, Error> {
        self.ctx.load(off).map_err(|_| Error::Malformed)
    }

    #[inline(always)]
    pub fn store<T>(&self, off: usize, v: &T) -> Result<(), Error> {
        self.ctx.store(off, v, 0).map_err(|_| Error::Helper)
    }

    /// Rewrites a 4-byte address field (raw network order) and fixes the IPv4 header checksum
    /// at `csum_off`.
    #[inline(always)]
    pub fn set_addr(&self, off: usize, csum_off: usize, old: u32, new: u32) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        self.ctx
            .l3_csum_replace(csum_off, old as u64, new as u64, 4)
            .map_err(|_| Error::Helper)?;
        self.store(off, &new)
    }

    /// Adjusts an L4 checksum for a changed address (part of the pseudo header).
    /// `udp`: a zero UDP checksum means "none" and stays zero.
    #[inline(always)]
    pub fn l4_addr_changed(
        &self,
        csum_off: usize,
        old: u32,
        new: u32,
        udp: bool,
    ) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        let flags = BPF_F_PSEUDO_HDR as u64 | 4 | if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        self.ctx
            .l4_csum_replace(csum_off, old as u64, new as u64, flags)
            .map_err(|_| Error::Helper)
    }

    /// Rewrites a 16-bit field covered by the L4 checksum at `csum_off` (a port or ICMP id).
    /// `old`/`new` are host order.
    #[inline(always)]
    pub fn set_l4_u16(
        &self,
        off: usize,
        csum_off: usize,
        old: u16,
        new: u16,
        udp: bool,
    ) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        let (old, new) = (old.to_be(), new.to_be());
        let flags = 2 | if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        self.ctx
            .l4_csum_replace(csum_off, old as u64, new as u64, flags)
            .map_err(|_| Error::Helper)?;
        self.store(off, &new)
    }

    /// Rewrites a 16-bit field inside an ICMP error's quoted packet: only the outer ICMP
    /// checksum covers it (no pseudo header).
    #[inline(always)]
    pub fn set_quoted_u16(
        &self,
        off: usize,
        icmp_csum_off: usize,
        old: u16,
        new: u16,
    ) -> Result<(), Error> {
        self.set_l4_u16(off, icmp_csum_off, old, new, false)
    }
}
