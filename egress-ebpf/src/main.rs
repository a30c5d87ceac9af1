//! egress-router tc programs (SPEC section 6):
//! - `eth0_ingress`: traffic from client pods; DNAT to the rule's destination, SNAT to
//!   EGRESS_SOURCE, forward out of macvlan0. Unmatched traffic is left to the local stack.
//! - `macvlan_ingress`: replies; reverse NAT and forward out of eth0. Nothing that is not a
//!   reply to a flow a client opened is ever translated into the cluster.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map calls take keys and values by reference on purpose: copies cost BPF stack"
)]

mod entry;
mod error;
mod flows;
mod forward;
mod maps;
mod mem;
mod parse;
mod pkt;
mod rewrite;
mod sctp;
mod skb;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use egress_common::{
    FlowKey, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Stats,
    packet::{ICMP_ECHO_REQUEST, TCP_RST},
};

use crate::{
    entry::FlowEntry,
    error::Error,
    flows::{answer, create, lookup_live, lookup_outbound, now_ns, restore_peer, touch},
    forward::Route,
    maps::Table,
    parse::{Kind, Parsed, parse, remember_fragment},
    pkt::{Pkt, Side},
    skb::Skb,
};

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
    let mut pkt = Pkt {
        skb: &skb,
        p: &p,
        cfg,
        side,
        now,
        stats,
    };
    match p.kind {
        Kind::OtherIcmp => Err(Error::NotOurs),
        Kind::OrphanFragment => Err(orphan_fragment(&pkt)),
        Kind::IcmpError => icmp_error(&mut pkt),
        Kind::Flow => flow(&mut pkt),
    }
}

#[inline(always)]
fn flow(pkt: &mut Pkt) -> Result<i32, Error> {
    let (skb, p, cfg, side, now) = (pkt.skb, pkt.p, pkt.cfg, pkt.side, pkt.now);
    let len = skb.len() as u64;
    // The translated tuple, copied out of the entry: the entry itself is only ever accessed
    // through FlowEntry (other CPUs write it meanwhile, and so does the route cache below).
    let found = match side {
        Side::Cluster => lookup_outbound(&p.key, cfg, now),
        Side::Outside => lookup_live(&p.key, cfg, now),
    };
    let (tuple, entry) = match (found, side) {
        // The other side's half of a flow (a packet from the cluster shaped like an outside
        // reply, or the reverse): translating it would inject it into that flow, and making a
        // new flow would overwrite the entry. Found by the program fuzzer.
        (Some(v), _) if v.direction() != side.direction() => return Err(Error::Unsolicited),
        (Some(v), _) => {
            check_ttl(p)?;
            let v = if v.table() == Table::New && side == Side::Outside && !resets(p) {
                answer(&p.key, v, now).unwrap_or(v)
            } else {
                v
            };
            touch(v, p, now, len);
            (v.translated_key(p.key.proto), Some(v))
        }
        // A new flow's first packet is looked up, not cached: its entry is written already.
        (None, Side::Cluster) => {
            check_ttl(p)?;
            (create(p, cfg, now, len, pkt.stats)?, None)
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
    // A GSO packet leaves as segments of its GSO size, and the FIB lookup does not check its
    // length either (is_skb_forwardable lets any GSO packet through): the cached answer
    // stands for it as a lookup would. Only a frame that would be sent whole must fit.
    let fit_len = if skb.is_gso() { 0 } else { len as u32 };
    let route = match entry.and_then(|e| forward::cached(e, fit_len, now)) {
        Some(r) => r,
        None => {
            // With each lookup (see restore_peer), check the flow's other entry too.
            if let Some(e) = entry {
                restore_peer(&p.key, e, now, pkt.stats);
            }
            lookup_route(pkt, &tuple, entry)
        }
    };
    rewrite::flow(skb, p, &tuple, route.forwards())?;
    remember_fragment(p, now);
    pkt.count_out(len);
    forward::send(skb, route)
}

#[inline(always)]
fn icmp_error(pkt: &mut Pkt) -> Result<i32, Error> {
    let (skb, p, side, now) = (pkt.skb, pkt.p, pkt.side, pkt.now);
    let q = rewrite::quoted(skb, p)?;
    // Errors about anything but a translated flow are the stack's (the router's own traffic).
    let v = lookup_live(&q.reply_key, pkt.cfg, now)
        .filter(|v| v.direction() == side.direction())
        .ok_or(Error::NotOurs)?;
    check_ttl(p)?;
    let tuple = v.translated_key(q.reply_key.proto);
    let route = match forward::cached(v, skb.len() as u32, now) {
        Some(r) => r,
        None => lookup_route(pkt, &tuple, Some(v)),
    };
    rewrite::icmp_error(skb, p, &q, &tuple, route.forwards())?;
    pkt.count_out(skb.len() as u64);
    forward::send(skb, route)
}

/// Where a later fragment goes whose first fragment was not translated (it has not come yet, or
/// it was not ours): its ports, and so its flow, are unknown, and this program cannot hold it
/// until they are (the kernel's NAT reassembles first, in conntrack's defrag; a tc program
/// cannot). So it goes where a packet that is not ours goes, to the stack, unless it provably
/// belongs to a datagram this program translates:
/// - macvlan0: only fragments for EGRESS_SOURCE get here (`handle` refused other unicast). That
///   address is the router's own, so the stack reassembles them and forwards nothing into the
///   cluster. It receives the router's own traffic too (pings to EGRESS_SOURCE), so a fragment
///   is not provably a reply's.
/// - eth0 with a fallback: every datagram is translated except TCP to the router's own port
///   and ICMP that is not echo, so any other protocol is provably ours. Handed to the stack, it
///   would wait in a reassembly that never completes (the pod IP) or be forwarded untranslated
///   (another address): dropped and counted instead, as the datagram is lost either way.
/// - eth0 otherwise: the rules name ports, which a later fragment lacks, so nothing is
///   provable; the stack takes it as it takes the unmatched traffic its first fragment may be.
///   (A reordered datagram of a rule is then lost in the stack's reassembly, as it would be
///   dropped here.)
#[inline(always)]
fn orphan_fragment(pkt: &Pkt) -> Error {
    let (proto, cfg) = (pkt.p.key.proto, pkt.cfg);
    let maybe_local = proto == PROTO_ICMP || (proto == PROTO_TCP && cfg.local_tcp_port != 0);
    if pkt.side == Side::Cluster && cfg.has_fallback != 0 && !maybe_local {
        Error::Fragment
    } else {
        Error::NotOurs
    }
}

/// A TCP reset: the one reply that does not make a new flow answered (a SYN to a closed port,
/// as a flood's are, is answered with one).
#[inline(always)]
fn resets(p: &Parsed) -> bool {
    p.key.proto == PROTO_TCP && p.tcp_flags & TCP_RST != 0
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
fn lookup_route(pkt: &mut Pkt, t: &FlowKey, entry: Option<FlowEntry>) -> Route {
    forward::lookup(
        pkt.skb,
        t,
        entry,
        pkt.p.ip.proto,
        pkt.in_ifindex(),
        pkt.now,
        pkt.stats,
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
