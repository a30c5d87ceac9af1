//! egress-router tc programs (SPEC section 6):
//! - `eth0_ingress`: traffic from client pods; DNAT to the rule's destination, SNAT to
//!   EGRESS_SOURCE, forward out of macvlan0. Unmatched traffic is left to the local stack.
//! - `macvlan_ingress`: replies; reverse NAT and forward out of eth0. Nothing that is not a
//!   reply to a flow a client opened is ever translated into the cluster.
#![no_std]
#![no_main]
// Map calls take keys and values by reference on purpose: copies cost BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod error;
mod flows;
mod forward;
mod maps;
mod mem;
mod parse;
mod rewrite;
mod sctp;
mod skb;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use egress_common::{
    DataplaneConfig, FlowValue, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Stats,
    packet::ICMP_ECHO_REQUEST,
};

use crate::{
    error::Error,
    flows::{create, lookup_live, now_ns, restore_peer, touch},
    forward::Route,
    parse::{Kind, Parsed, parse},
    skb::Skb,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Arrived on eth0 (cluster side).
    Cluster,
    /// Arrived on macvlan0 (outside).
    Outside,
}

#[classifier]
pub fn eth0_ingress(ctx: TcContext) -> i32 {
    let Some(stats) = maps::stats() else {
        return TC_ACT_OK; // cannot happen: a one-slot per-CPU array
    };
    stats.eth0_rx_packets += 1;
    stats.eth0_rx_bytes += ctx.len() as u64;
    handle(&ctx, Side::Cluster, stats).unwrap_or_else(|e| e.verdict(stats))
}

#[classifier]
pub fn macvlan_ingress(ctx: TcContext) -> i32 {
    let Some(stats) = maps::stats() else {
        return TC_ACT_OK;
    };
    stats.macvlan_rx_packets += 1;
    stats.macvlan_rx_bytes += ctx.len() as u64;
    handle(&ctx, Side::Outside, stats).unwrap_or_else(|e| e.verdict(stats))
}

#[inline(always)]
fn handle(ctx: &TcContext, side: Side, stats: &mut Stats) -> Result<i32, Error> {
    let cfg = maps::config().ok_or(Error::NotOurs)?;
    if cfg.eth0_ifindex == 0 {
        return Err(Error::NotOurs); // not configured yet
    }
    let skb = Skb::new(ctx);
    let now = now_ns();
    let p = parse(&skb, now)?;
    if side == Side::Outside && p.key.daddr != cfg.egress_source {
        // The router forwards (redirect mode needs it), so unicast for any other address --
        // the pod IP, a cluster address -- would be routed into the cluster: never let it.
        // Multicast and broadcast stay the stack's, which does not forward them.
        return Err(if p.key.daddr[0] >= 224 {
            Error::NotOurs
        } else {
            Error::Unsolicited
        });
    }
    match p.kind {
        Kind::OtherIcmp => Err(Error::NotOurs),
        Kind::IcmpError => icmp_error(&skb, &p, cfg, side, now, stats),
        Kind::Flow => flow(&skb, &p, cfg, side, now, stats),
    }
}

#[inline(always)]
fn flow(
    skb: &Skb,
    p: &Parsed,
    cfg: &DataplaneConfig,
    side: Side,
    now: u64,
    stats: &mut Stats,
) -> Result<i32, Error> {
    let len = skb.len() as u64;
    let (val, entry) = match (lookup_live(&p.key, cfg, now), side) {
        (Some(v), _) => {
            check_ttl(p)?;
            touch(v, p, now, len);
            // SAFETY: a valid map value pointer. Read in place: a copy costs stack and, at
            // this size, a memmove call, and would not make the read atomic either.
            (unsafe { &*v }, Some(v))
        }
        // A new flow's first packet is looked up, not cached: its entry is written already.
        (None, Side::Cluster) => {
            check_ttl(p)?;
            (create(p, cfg, now, len, stats)?, None)
        }
        // Pings to EGRESS_SOURCE are answered by the router itself.
        (None, Side::Outside) if p.key.proto == PROTO_ICMP && p.icmp_type == ICMP_ECHO_REQUEST => {
            return Err(Error::NotOurs);
        }
        (None, Side::Outside) => {
            return Err(match p.key.proto {
                PROTO_TCP | PROTO_UDP | PROTO_SCTP | PROTO_ICMP => Error::Unsolicited,
                _ => Error::NotOurs,
            });
        }
    };
    let route = match forward::cached(val, len as u32, now) {
        Some(r) => r,
        None => {
            // With each lookup (see restore_peer), check the flow's other entry too.
            if let Some(e) = entry {
                // SAFETY: a valid map value pointer.
                restore_peer(&p.key, unsafe { &*e }, now, stats);
            }
            lookup_route(skb, val, entry, p, cfg, side, now, stats)
        }
    };
    rewrite::flow(skb, p, val, route.forwards())?;
    count_out(side, len, stats);
    forward::send(skb, route)
}

#[inline(always)]
fn icmp_error(
    skb: &Skb,
    p: &Parsed,
    cfg: &DataplaneConfig,
    side: Side,
    now: u64,
    stats: &mut Stats,
) -> Result<i32, Error> {
    let q = rewrite::quoted(skb, p)?;
    // Errors about anything but a translated flow are the stack's (the router's own traffic).
    let v = lookup_live(&q.reply_key, cfg, now).ok_or(Error::NotOurs)?;
    check_ttl(p)?;
    // SAFETY: a valid map value pointer.
    let val = unsafe { &*v };
    let route = match forward::cached(val, skb.len() as u32, now) {
        Some(r) => r,
        None => lookup_route(skb, val, Some(v), p, cfg, side, now, stats),
    };
    rewrite::icmp_error(skb, p, &q, val, route.forwards())?;
    count_out(side, skb.len() as u64, stats);
    forward::send(skb, route)
}

/// Fails before anything is rewritten if the packet cannot be forwarded.
#[inline(always)]
fn check_ttl(p: &Parsed) -> Result<(), Error> {
    if p.ip.ttl <= 1 {
        Err(Error::TtlExpired)
    } else {
        Ok(())
    }
}

/// A FIB lookup from the interface the packet arrived on.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lookup_route(
    skb: &Skb,
    v: &FlowValue,
    entry: Option<*mut FlowValue>,
    p: &Parsed,
    cfg: &DataplaneConfig,
    side: Side,
    now: u64,
    stats: &mut Stats,
) -> Route {
    let in_ifindex = match side {
        Side::Cluster => cfg.eth0_ifindex,
        Side::Outside => cfg.macvlan_ifindex,
    };
    forward::lookup(skb, v, entry, p.ip.proto, in_ifindex, now, stats)
}

#[inline(always)]
fn count_out(side: Side, len: u64, s: &mut Stats) {
    match side {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
