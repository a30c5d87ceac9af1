//! Sending a translated packet on: FIB lookup, TTL, MACs, redirect. Anything the FIB cannot
//! resolve directly goes to the kernel stack, which routes it the same way (forwarding is on).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
};
use egress_common::packet::{ETH_HLEN, IP_CSUM_OFF, IP_TTL_OFF};

use crate::{error::Error, maps::with_stats, skb::Skb};

const AF_INET: u8 = 2;

/// Fails with `TtlExpired` before anything is rewritten if the packet cannot be forwarded.
#[inline(always)]
pub fn check_ttl(skb: &Skb) -> Result<(), Error> {
    let ttl: u8 = skb.load(ETH_HLEN + IP_TTL_OFF)?;
    if ttl <= 1 {
        Err(Error::TtlExpired)
    } else {
        Ok(())
    }
}

#[inline(always)]
fn decrement_ttl(skb: &Skb) -> Result<(), Error> {
    let off = ETH_HLEN + IP_TTL_OFF;
    // TTL and protocol form one 16-bit word of the header checksum.
    let old: u16 = skb.load(off)?;
    let bytes = old.to_ne_bytes();
    let new = u16::from_ne_bytes([bytes[0].wrapping_sub(1), bytes[1]]);
    skb.ctx
        .l3_csum_replace(ETH_HLEN + IP_CSUM_OFF, old as u64, new as u64, 2)
        .map_err(|_| Error::Helper)?;
    skb.store(off, &new)
}

/// Forwards a packet already rewritten to (saddr -> daddr). `in_ifindex` is the interface it
/// arrived on.
#[inline(always)]
pub fn forward(
    skb: &Skb,
    saddr: u32,
    daddr: u32,
    proto: u8,
    tot_len: u16,
    in_ifindex: u32,
) -> Result<i32, Error> {
    // SAFETY: bpf_fib_lookup is plain data; zero is a valid value for every field.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = in_ifindex;
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: params lives on the stack for the duration of the call.
    let rc = unsafe {
        fib_lookup(
            skb.ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            decrement_ttl(skb)?;
            skb.store(0, &params.dmac)?;
            skb.store(6, &params.smac)?;
            // SAFETY: no preconditions.
            Ok(unsafe { bpf_redirect(params.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            decrement_ttl(skb)?;
            // SAFETY: plain data.
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = AF_INET as u32;
            // SAFETY: the lookup filled ipv4_dst with the next hop.
            nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
            // SAFETY: nh lives on the stack for the duration of the call.
            Ok(unsafe {
                bpf_redirect_neigh(
                    params.ifindex,
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            } as i32)
        }
        _ => {
            with_stats(|s| s.fib_pass += 1);
            Ok(TC_ACT_OK)
        }
    }
}
