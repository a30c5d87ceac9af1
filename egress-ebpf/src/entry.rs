//! The one accessor of connection-table entries.
//!
//! A FLOWS value is shared memory: other CPUs update its timestamp, counters, flags and route
//! cache while this program holds a pointer to it, and this program writes the route cache
//! while it still reads the tuple. A Rust reference (`&FlowValue`, `&mut FlowValue`) to it
//! would promise the compiler that nothing else writes it for as long as the reference lives,
//! which is false here (undefined behaviour, and LLVM may act on it: cache a field across a
//! helper call, or merge two loads). So an entry is only ever a raw pointer, and every field is
//! read and written through it, one access each, never through a reference. Fields other CPUs
//! write are accessed with volatile loads and stores, the equivalent of the kernel's
//! READ_ONCE/WRITE_ONCE: no torn, merged, repeated or elided access. The tuple (addresses and
//! ports) is written only when the entry is inserted, so plain reads suffice for it.
use core::ptr::{addr_of, addr_of_mut, copy_nonoverlapping, read, read_volatile, write_volatile};

use egress_common::{FlowKey, FlowValue, RouteCache};

use crate::maps::Table;

/// An entry of FLOWS or NEW_FLOWS, and which. The pointer stays valid memory for the rest of
/// this program run (the map's elements are preallocated and RCU-protected); an entry deleted
/// or replaced meanwhile may be reused for another key, which is the kernel's hash map contract
/// for every BPF program.
#[derive(Clone, Copy)]
pub struct FlowEntry(*mut FlowValue, Table);

/// A cached FIB answer, as `FlowEntry::cached_route` reads it.
pub struct CachedRoute {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

impl FlowEntry {
    /// The entry stored under `key` in `table`, if any.
    #[inline(always)]
    pub fn find_in(table: Table, key: &FlowKey) -> Option<FlowEntry> {
        table.get_ptr_mut(key).map(|p| FlowEntry(p, table))
    }

    /// The table holding this entry (and, but for an eviction, its peer).
    #[inline(always)]
    pub fn table(self) -> Table {
        self.1
    }

    /// A copy of the whole entry into `slot` (this CPU's scratch), made without a reference to
    /// the shared value; fields other CPUs write meanwhile may be copied from either moment.
    #[inline(always)]
    pub fn copy_to(self, slot: &mut FlowValue) {
        // SAFETY: a valid map value pointer (see the type), read as bytes into a slot no one
        // else touches.
        unsafe { copy_nonoverlapping(self.0, slot, 1) }
    }

    /// The translated tuple (what a packet matching the key is rewritten to) as a key: for an
    /// outbound entry, the key its replies arrive with.
    #[inline(always)]
    pub fn translated_key(self, proto: u8) -> FlowKey {
        let v = self.0;
        // SAFETY: a valid map value pointer (see the type); fields read in place.
        unsafe {
            FlowKey {
                saddr: read(addr_of!((*v).saddr)),
                daddr: read(addr_of!((*v).daddr)),
                sport: read(addr_of!((*v).sport)),
                dport: read(addr_of!((*v).dport)),
                proto,
                _pad0: 0,
                _pad1: 0,
            }
        }
    }

    #[inline(always)]
    pub fn direction(self) -> u8 {
        // SAFETY: as in `translated_key`.
        unsafe { read(addr_of!((*self.0).direction)) }
    }

    #[inline(always)]
    pub fn last_seen_ns(self) -> u64 {
        // SAFETY: as in `translated_key`; other CPUs write it.
        unsafe { read_volatile(addr_of!((*self.0).last_seen_ns)) }
    }

    #[inline(always)]
    pub fn flags(self) -> u8 {
        // SAFETY: as in `last_seen_ns`.
        unsafe { read_volatile(addr_of!((*self.0).flags)) }
    }

    #[inline(always)]
    pub fn set_flags(self, flags: u8) {
        // SAFETY: as in `last_seen_ns`.
        unsafe { write_volatile(addr_of_mut!((*self.0).flags), flags) }
    }

    /// Records a `len`-byte packet at `now`. The per-flow counters are informational
    /// (status): the BPF target has no fetch_add in Rust, so a rare concurrent update may be
    /// lost; the exact totals are the per-CPU STATS.
    #[inline(always)]
    pub fn count(self, now: u64, len: u64) {
        let v = self.0;
        // SAFETY: as in `last_seen_ns`.
        unsafe {
            write_volatile(addr_of_mut!((*v).last_seen_ns), now);
            let packets = addr_of_mut!((*v).packets);
            write_volatile(packets, read_volatile(packets) + 1);
            let bytes = addr_of_mut!((*v).bytes);
            write_volatile(bytes, read_volatile(bytes) + len);
        }
    }

    /// The cached route, if it stands for a lookup of a `frame_len`-byte frame at `now`
    /// (`RouteCache::usable`). The MACs are read only once the rest says the answer is usable.
    #[inline(always)]
    pub fn cached_route(self, frame_len: u32, now: u64) -> Option<CachedRoute> {
        let c = self.route();
        // SAFETY: as in `last_seen_ns`.
        let (at_ns, ifindex, mtu) = unsafe {
            (
                read_volatile(addr_of!((*c).at_ns)),
                read_volatile(addr_of!((*c).ifindex)),
                read_volatile(addr_of!((*c).mtu)),
            )
        };
        if !RouteCache::fresh(at_ns, ifindex, mtu, now, frame_len) {
            return None;
        }
        // SAFETY: as above. Plain reads: a volatile six-byte load has no single instruction,
        // and a MAC written by another CPU's lookup at the same moment is the same answer.
        let (smac, dmac) = unsafe { (read(addr_of!((*c).smac)), read(addr_of!((*c).dmac))) };
        Some(CachedRoute {
            ifindex,
            smac,
            dmac,
        })
    }

    /// Caches a direct FIB answer made at `now`. Two CPUs caching at once write the same
    /// answer; `at_ns` goes last, so a reader never takes a half-written entry as fresh on a
    /// strongly ordered CPU, and elsewhere at worst uses another moment's answer of the same
    /// lookup.
    #[inline(always)]
    pub fn cache_route(self, ifindex: u32, mtu: u32, smac: &[u8; 6], dmac: &[u8; 6], now: u64) {
        let c = self.route();
        // SAFETY: as in `last_seen_ns`. The MACs are copied, not assigned: an array
        // assignment is a memmove call on this target.
        unsafe {
            write_volatile(addr_of_mut!((*c).ifindex), ifindex);
            write_volatile(addr_of_mut!((*c).mtu), mtu);
            copy_nonoverlapping(smac, addr_of_mut!((*c).smac), 1);
            copy_nonoverlapping(dmac, addr_of_mut!((*c).dmac), 1);
            write_volatile(addr_of_mut!((*c).at_ns), now);
        }
    }

    #[inline(always)]
    fn route(self) -> *mut RouteCache {
        // SAFETY: a field of a valid map value; no reference is made.
        unsafe { addr_of_mut!((*self.0).route) }
    }
}
