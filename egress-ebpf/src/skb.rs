//! The one packet accessor. Reads are direct, bounds-checked against data_end (headers outside
//! the linear part are pulled in on demand); every write goes through the kernel helpers, which keep the
//! checksum state of the skb right (also for partially checksummed packets from pods on the
//! same node). Each read takes fresh data pointers, so writes in between cannot stale them.
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

    /// Reads a `T` at `off`. Headers are normally in the linear part; when one is not (a
    /// GSO packet's linear part can end right after the TCP header), just enough is pulled in
    /// and the read retried, so the common case costs no helper call.
    #[inline(always)]
    pub fn load<T: Copy>(&self, off: usize) -> Result<T, Error> {
        if let Some(v) = self.read(off) {
            return Ok(v);
        }
        let need = off + core::mem::size_of::<T>().max(2);
        if need > self.len() {
            return Err(Error::Malformed);
        }
        self.ctx
            .pull_data(need as u32)
            .map_err(|_| Error::Malformed)?;
        self.read(off).ok_or(Error::Malformed)
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        // The check must be on the very pointer that is read, for the verifier to see it. For
        // one-byte reads LLVM turns `p + 1 > end` into `p >= end`, which the verifier does not
        // credit with a range; checking two bytes keeps the `p + n > end` form. Every one-byte
        // field we read has more header after it, so this rejects nothing valid.
        let p = self.ctx.data() + off;
        if p + core::mem::size_of::<T>().max(2) > self.ctx.data_end() {
            return None;
        }
        // SAFETY: bounds checked just above against the current data_end.
        Some(unsafe { (p as *const T).read_unaligned() })
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
