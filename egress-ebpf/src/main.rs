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
mod parse;
mod rewrite;
mod skb;

use aya_ebpf::{macros::classifier, programs::TcContext};
use egress_common::{
    DataplaneConfig, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, packet::ICMP_ECHO_REQUEST,
};

use crate::{
    error::Error,
    flows::{create, lookup_live, now_ns, touch},
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
    let len = ctx.len() as u64;
    maps::with_stats(|s| {
        s.eth0_rx_packets += 1;
        s.eth0_rx_bytes += len;
    });
    handle(&ctx, Side::Cluster).unwrap_or_else(Error::verdict)
}

#[classifier]
pub fn macvlan_ingress(ctx: TcContext) -> i32 {
    let len = ctx.len() as u64;
    maps::with_stats(|s| {
        s.macvlan_rx_packets += 1;
        s.macvlan_rx_bytes += len;
    });
    handle(&ctx, Side::Outside).unwrap_or_else(Error::verdict)
}

#[inline(always)]
fn handle(ctx: &TcContext, side: Side) -> Result<i32, Error> {
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
        Kind::IcmpError => icmp_error(&skb, &p, cfg, side),
        Kind::Flow => flow(&skb, &p, cfg, side, now),
    }
}

#[inline(always)]
fn flow(skb: &Skb, p: &Parsed, cfg: &DataplaneConfig, side: Side, now: u64) -> Result<i32, Error> {
    let v = match (lookup_live(&p.key, cfg, now), side) {
        (Some(v), _) => v,
        (None, Side::Cluster) => create(p, cfg, now)?,
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
    forward::check_ttl(skb)?;
    let len = skb.len() as u64;
    touch(v, p, now, len);
    // SAFETY: a valid map value pointer; copied so a concurrent update cannot tear the rewrite.
    let val = unsafe { *v };
    rewrite::flow(skb, p, &val)?;
    out(
        skb,
        &val,
        p.key.proto,
        p.ip.total_len as u16,
        cfg,
        side,
        len,
    )
}

#[inline(always)]
fn icmp_error(skb: &Skb, p: &Parsed, cfg: &DataplaneConfig, side: Side) -> Result<i32, Error> {
    let q = rewrite::quoted(skb, p)?;
    // Errors about anything but a translated flow are the stack's (the router's own traffic).
    let v = lookup_live(&q.reply_key, cfg, now_ns()).ok_or(Error::NotOurs)?;
    forward::check_ttl(skb)?;
    // SAFETY: a valid map value pointer.
    let val = unsafe { *v };
    rewrite::icmp_error(skb, p, &q, &val)?;
    out(
        skb,
        &val,
        PROTO_ICMP,
        p.ip.total_len as u16,
        cfg,
        side,
        skb.len() as u64,
    )
}

#[inline(always)]
fn out(
    skb: &Skb,
    v: &egress_common::FlowValue,
    proto: u8,
    tot_len: u16,
    cfg: &DataplaneConfig,
    side: Side,
    len: u64,
) -> Result<i32, Error> {
    let in_ifindex = match side {
        Side::Cluster => {
            maps::with_stats(|s| {
                s.out_packets += 1;
                s.out_bytes += len;
            });
            cfg.eth0_ifindex
        }
        Side::Outside => {
            maps::with_stats(|s| {
                s.in_packets += 1;
                s.in_bytes += len;
            });
            cfg.macvlan_ifindex
        }
    };
    forward::forward(
        skb,
        u32::from_ne_bytes(v.saddr),
        u32::from_ne_bytes(v.daddr),
        proto,
        tot_len,
        in_ifindex,
    )
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
