//! Sending a translated packet on: the FIB lookup (made before the rewrite, so that the TTL
//! and MACs are written in the same pass as the addresses), then the redirect. Anything the FIB
//! cannot resolve directly goes to the kernel stack, which routes it the same way (forwarding
//! is on) and decrements the TTL itself. A direct answer is kept in the flow entry for
//! ROUTE_CACHE_NS, and the flow's next packets that fit the MTU use it instead of a lookup.
use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
};
use egress_common::{FlowKey, Stats};

use crate::{entry::FlowEntry, error::Error, mem::zero, skb::Skb};

const AF_INET: u8 = 2;

/// Where a translated packet goes.
pub enum Route {
    /// Out of `ifindex` with these MACs.
    Direct {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Out of `ifindex` to next hop `nh`, whose MAC the kernel resolves.
    Neigh { ifindex: u32, nh: u32 },
    /// Handed to the kernel stack (no direct path: a local route, an MTU to enforce...).
    Stack,
}

impl Route {
    /// Whether this program forwards the packet (and so decrements its TTL).
    #[inline(always)]
    pub fn forwards(&self) -> bool {
        !matches!(self, Route::Stack)
    }
}

/// The entry's cached route, if it stands for a lookup of a `frame_len`-byte frame at `now`.
#[inline(always)]
pub fn cached(entry: FlowEntry, frame_len: u32, now: u64) -> Option<Route> {
    let c = entry.cached_route(frame_len, now)?;
    Some(Route::Direct {
        ifindex: c.ifindex,
        smac: c.smac,
        dmac: c.dmac,
    })
}

/// Looks up the route of a packet translated to the tuple `t` that arrived on `in_ifindex`; a
/// direct answer is cached in `entry`, the flow's entry (none for a new flow's first packet).
#[inline(always)]
pub fn lookup(
    skb: &Skb,
    t: &FlowKey,
    entry: Option<FlowEntry>,
    proto: u8,
    in_ifindex: u32,
    now: u64,
    stats: &mut Stats,
) -> Route {
    stats.fib_lookups += 1;
    let mut slot = MaybeUninit::uninit();
    // SAFETY: bpf_fib_lookup is plain data; zero is valid for every field.
    let params: &mut bpf_fib_lookup = unsafe { zero(&mut slot) };
    params.family = AF_INET;
    params.l4_protocol = proto;
    // tot_len stays 0: the kernel then checks the skb itself against the egress device's MTU
    // (is_skb_forwardable), which knows GSO. Given the IP total length, a GSO packet (up to
    // 64 KB) would fail the MTU check and every TCP segment in bulk would take the slow path
    // through the stack.
    params.ifindex = in_ifindex;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(t.saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(t.daddr);
    // SAFETY: params lives on the stack for the duration of the call.
    let rc = unsafe {
        fib_lookup(
            skb.ctx.as_ptr(),
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if let Some(e) = entry {
                // With tot_len 0 the lookup reports the egress device's MTU here (Linux 5.12
                // and later; 0 before, which disables the cache).
                // SAFETY: the lookup succeeded, so the union holds the MTU.
                let mtu = unsafe { params.__bindgen_anon_1.mtu_result } as u32;
                e.cache_route(params.ifindex, mtu, &params.smac, &params.dmac, now);
            }
            Route::Direct {
                ifindex: params.ifindex,
                smac: params.smac,
                dmac: params.dmac,
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::Neigh {
            ifindex: params.ifindex,
            // SAFETY: the lookup filled ipv4_dst with the next hop.
            nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
        },
        _ => {
            stats.fib_pass += 1;
            Route::Stack
        }
    }
}

/// Sends a rewritten packet along `route`.
#[inline(always)]
pub fn send(skb: &Skb, route: Route) -> Result<i32, Error> {
    match route {
        Route::Direct {
            ifindex,
            smac,
            dmac,
        } => {
            skb.write(0, dmac)?;
            skb.write(6, smac)?;
            // SAFETY: no preconditions.
            Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
        }
        Route::Neigh { ifindex, nh } => {
            let mut slot = MaybeUninit::uninit();
            // SAFETY: plain data.
            let p: &mut bpf_redir_neigh = unsafe { zero(&mut slot) };
            p.nh_family = AF_INET as u32;
            p.__bindgen_anon_1.ipv4_nh = nh;
            // SAFETY: p lives on the stack for the duration of the call.
            Ok(unsafe {
                bpf_redirect_neigh(
                    ifindex,
                    p,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            } as i32)
        }
        Route::Stack => Ok(TC_ACT_OK),
    }
}
