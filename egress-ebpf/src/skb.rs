//! The one packet accessor. Reads and writes are direct, bounds-checked against data_end
//! (headers outside the linear part are pulled in on demand). Checksums change only through
//! the kernel helpers: a change is computed once (`packet::csum_diff`), and
//! `bpf_l3/l4_csum_replace` apply it and keep the checksum state of the skb right
//! (CHECKSUM_PARTIAL packets from pods on the same node, CHECKSUM_COMPLETE from NICs). Every access takes fresh data pointers, so a
//! helper that moves the data in between cannot stale them.
//!
//! Direct writes are safe to mix with the helpers: the verifier makes a program that writes
//! packet data unclone the head before it runs, and every byte changed here is covered by a
//! checksum update of equal and opposite weight (so skb->csum of CHECKSUM_COMPLETE packets
//! stays right), except the pseudo-header addresses, which the helpers' BPF_F_PSEUDO_HDR path
//! accounts for. Fields no one's-complement checksum covers (SCTP's ports and CRC32c) are
//! written with `store`, whose helper keeps skb->csum right by itself.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
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
    /// Whether the kernel segments this packet when it is sent (`skb_is_gso`: a GSO size is
    /// set), as it does with a local TCP stack's 64 KB sends.
    #[inline(always)]
    pub fn is_gso(&self) -> bool {
        // SAFETY: the program's own context, whose gso_size tc programs may read.
        unsafe { (*self.ctx.skb.skb).gso_size != 0 }
    }

    #[inline(always)]
    pub fn load<T: Copy>(&self, off: usize) -> Result<T, Error> {
        if let Some(p) = self.ptr::<T>(off) {
            // SAFETY: bounds checked against the current data_end.
            return Ok(unsafe { p.read_unaligned() });
        }
        let need = off + core::mem::size_of::<T>().max(2);
        if need > self.len() {
            return Err(Error::Malformed);
        }
        self.ctx
            .pull_data(need as u32)
            .map_err(|_| Error::Malformed)?;
        let p = self.ptr::<T>(off).ok_or(Error::Malformed)?;
        // SAFETY: as above.
        Ok(unsafe { p.read_unaligned() })
    }

    /// Writes a `T` at `off`. Only header fields already read (hence linear) are written.
    #[inline(always)]
    pub fn write<T: Copy>(&self, off: usize, v: T) -> Result<(), Error> {
        let p = self.ptr::<T>(off).ok_or(Error::Helper)?;
        // SAFETY: bounds checked against the current data_end; the head is writable (above).
        unsafe { p.write_unaligned(v) };
        Ok(())
    }

    /// Writes a `T` at `off` through `bpf_skb_store_bytes`, which also updates skb->csum of
    /// CHECKSUM_COMPLETE packets for the bytes changed: for fields that no checksum helper
    /// accounts for (SCTP's ports and its CRC32c field).
    #[inline(always)]
    pub fn store<T: Copy>(&self, off: usize, v: T) -> Result<(), Error> {
        self.ctx
            .store(off, &v, BPF_F_RECOMPUTE_CSUM as u64)
            .map_err(|_| Error::Helper)
    }

    #[inline(always)]
    fn ptr<T>(&self, off: usize) -> Option<*mut T> {
        // The check must be on the very pointer that is used, for the verifier to see it. For
        // one-byte accesses LLVM turns `p + 1 > end` into `p >= end`, which the verifier does
        // not credit with a range; checking two bytes keeps the `p + n > end` form. Every
        // one-byte field we touch has more header after it, so this rejects nothing valid.
        let p = self.ctx.data() + off;
        if p + core::mem::size_of::<T>().max(2) > self.ctx.data_end() {
            return None;
        }
        Some(p as *mut T)
    }

    /// Applies a checksum difference (from `csum_diff`) to the IPv4 header checksum at `off`.
    #[inline(always)]
    pub fn l3_csum_add(&self, off: usize, diff: u32) -> Result<(), Error> {
        self.ctx
            .l3_csum_replace(off, 0, diff as u64, 0)
            .map_err(|_| Error::Helper)
    }

    /// Applies a difference of pseudo-header fields (the addresses) to the L4 checksum at
    /// `off`. `udp`: a zero UDP checksum means "none" and stays zero.
    #[inline(always)]
    pub fn l4_pseudo_csum_add(&self, off: usize, diff: u32, udp: bool) -> Result<(), Error> {
        let flags = BPF_F_PSEUDO_HDR as u64 | mangled_0(udp);
        self.ctx
            .l4_csum_replace(off, 0, diff as u64, flags)
            .map_err(|_| Error::Helper)
    }

    /// Rewrites a 4-byte field covered by the L4 checksum at `csum_off` (both ports at once).
    /// `old`/`new` are raw (network order).
    #[inline(always)]
    pub fn set_l4_u32(
        &self,
        off: usize,
        csum_off: usize,
        old: u32,
        new: u32,
        udp: bool,
    ) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        self.ctx
            .l4_csum_replace(csum_off, old as u64, new as u64, 4 | mangled_0(udp))
            .map_err(|_| Error::Helper)?;
        self.write(off, new)
    }

    /// Rewrites a 16-bit field covered by the L4 checksum at `csum_off` (an ICMP id, or a port
    /// inside an ICMP error's quoted packet, which only the outer ICMP checksum covers).
    /// `old`/`new` are host order.
    #[inline(always)]
    pub fn set_l4_u16(&self, off: usize, csum_off: usize, old: u16, new: u16) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        let (old, new) = (old.to_be(), new.to_be());
        self.ctx
            .l4_csum_replace(csum_off, old as u64, new as u64, 2)
            .map_err(|_| Error::Helper)?;
        self.write(off, new)
    }
}

#[inline(always)]
fn mangled_0(udp: bool) -> u64 {
    if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}
