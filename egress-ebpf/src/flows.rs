//! The connection tables: finding a live flow, creating one (with its reply entry and a free
//! source port) among the new flows, moving it to the answered ones on its first reply, and
//! keeping its timestamps and TCP close state.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use egress_common::{
    DIR_IN, DIR_OUT, DataplaneConfig, FLOW_CLOSING, FlowKey, FlowValue, PROTO_ICMP, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, RuleKey, Stats,
    packet::{
        HINT_SLOTS, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, candidate_port, hint_tag, idle_timeout_ns,
        is_expired,
    },
};

use crate::{
    entry::FlowEntry,
    error::Error,
    maps::{NewEntries, RULES, Table, hints, scratch},
    mem::clear,
    parse::Parsed,
};

/// Source ports tried for a new flow before giving up (the client's own, then random ones).
const PORT_TRIES: u32 = 8;

/// CLOCK_MONOTONIC at tick resolution: timeouts are in seconds, and the coarse clock is read
/// without touching the TSC (`bpf_ktime_get_ns` costs a few percent of a packet).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The entry for `key` if its flow is still live: an answered flow's, else a new one's.
#[inline(always)]
pub fn lookup_live(key: &FlowKey, cfg: &DataplaneConfig, now: u64) -> Option<FlowEntry> {
    live_in(Table::Answered, key, cfg, now).or_else(|| live_in(Table::New, key, cfg, now))
}

/// [`lookup_live`] for a packet from the cluster. A UDP flow no reply has answered yet is looked
/// up among the new flows first when this CPU's hint says so (`NEW_HINTS`). The hint follows the
/// lookup: set when the flow is found among the new flows or in neither table (a new flow's
/// first packet: `create` puts it among the new ones), cleared when it is found among the
/// answered ones. Either way both tables are consulted before a miss, so the hint decides only
/// which costs a lookup that misses.
#[inline(always)]
pub fn lookup_outbound(key: &FlowKey, cfg: &DataplaneConfig, now: u64) -> Option<FlowEntry> {
    if key.proto != PROTO_UDP {
        return lookup_live(key, cfg, now);
    }
    let Some(hints) = hints() else {
        return lookup_live(key, cfg, now); // cannot fail
    };
    let tag = hint_tag(key);
    let slot = &mut hints.tags[tag as usize % HINT_SLOTS];
    let (first, then) = if *slot == tag {
        (Table::New, Table::Answered)
    } else {
        (Table::Answered, Table::New)
    };
    if let Some(v) = live_in(first, key, cfg, now) {
        return Some(v);
    }
    let found = live_in(then, key, cfg, now);
    *slot = if found.is_some_and(|v| v.table() == Table::Answered) {
        0
    } else {
        tag
    };
    found
}

/// The entry for `key` in `table` if its flow is still live: idle time is measured from the
/// last packet in either direction, so the other direction's entry is consulted when this one
/// looks stale.
#[inline(always)]
fn live_in(table: Table, key: &FlowKey, cfg: &DataplaneConfig, now: u64) -> Option<FlowEntry> {
    let v = FlowEntry::find_in(table, key)?;
    let timeout = idle_timeout_ns(cfg, key.proto, v.flags());
    if !is_expired(now, v.last_seen_ns(), timeout) {
        return Some(v);
    }
    let peer = FlowEntry::find_in(table, &v.translated_key(key.proto).reversed())?;
    if is_expired(now, peer.last_seen_ns(), timeout) {
        None
    } else {
        Some(v)
    }
}

/// Where a new flow from the cluster goes: the rule for its protocol and port, else the
/// fallback (ports preserved), else nowhere.
#[inline(always)]
fn target(p: &Parsed, cfg: &DataplaneConfig) -> Result<([u8; 4], u16), Error> {
    let proto = p.key.proto;
    if proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP {
        let rk = RuleKey {
            port: p.key.dport,
            proto,
            generation: cfg.generation,
        };
        // SAFETY: the value is copied out at once.
        if let Some(t) = unsafe { RULES.get(&rk) } {
            return Ok((t.daddr, t.dport));
        }
    }
    // The router's own listener (metrics and health probes): neither the fallback's nor a
    // packet without a rule (each scrape would count as no_rule). Only packets that start no
    // flow of a rule get here: translated traffic never pays this.
    if proto == PROTO_TCP && cfg.local_tcp_port != 0 && p.key.dport == cfg.local_tcp_port {
        return Err(Error::NotOurs);
    }
    if cfg.has_fallback != 0 {
        return Ok((cfg.fallback, p.key.dport));
    }
    Err(Error::NoRule)
}

/// Creates both entries of a new outbound flow, its first packet (`len` bytes) counted, and
/// returns the outbound entry's translated tuple.
#[inline(always)]
pub fn create(
    p: &Parsed,
    cfg: &DataplaneConfig,
    now: u64,
    len: u64,
    stats: &mut Stats,
) -> Result<FlowKey, Error> {
    if !p.ip.has_l4_header() {
        return Err(Error::Fragment);
    }
    let (daddr, dport) = target(p, cfg)?;
    let proto = p.key.proto;
    // Protocols without ports keep the client's own (SCTP's CRC32c follows a port change:
    // see sctp.rs).
    let tries =
        if proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_ICMP || proto == PROTO_SCTP {
            PORT_TRIES
        } else {
            1
        };
    // A flow may start closing (a lone FIN or RST): it then gets the short timeout at once.
    let flags = if proto == PROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        FLOW_CLOSING
    } else {
        0
    };
    let NewEntries { a: reply, b: out } = scratch().ok_or(Error::TableFull)?; // cannot fail
    peer_value(reply, &p.key, DIR_IN, flags, now);
    let reply = &*reply;
    let mut chosen: Option<(u16, FlowKey, Table)> = None;
    for attempt in 0..PORT_TRIES {
        if attempt >= tries {
            break;
        }
        // SAFETY: no preconditions.
        let port = candidate_port(attempt, p.key.sport, unsafe { bpf_get_prandom_u32() }, cfg);
        let rkey = FlowKey {
            saddr: daddr,
            daddr: cfg.egress_source,
            sport: dport,
            dport: port,
            proto,
            _pad0: 0,
            _pad1: 0,
        };
        let table = match FlowEntry::find_in(Table::Answered, &rkey) {
            // The surviving reply entry of this very flow (the LRU evicted its outbound entry
            // alone): the flow stays answered, on the same port.
            Some(e) if answers(e, &p.key) => Table::Answered,
            // A live answered flow's port.
            Some(_) if live_in(Table::Answered, &rkey, cfg, now).is_some() => continue,
            _ => Table::New,
        };
        if table.insert(&rkey, reply, BPF_NOEXIST as u64).is_ok()
            || (reusable(table, &rkey, &p.key, cfg, now)
                && table.insert(&rkey, reply, BPF_ANY as u64).is_ok())
        {
            chosen = Some((port, rkey, table));
            break;
        }
    }
    let (sport, rkey, table) = chosen.ok_or(Error::PortExhausted)?;
    // In this CPU's scratch slot: only this program run touches it.
    let out: &FlowValue = {
        // SAFETY: plain data.
        let o = unsafe { clear(out) };
        o.saddr = cfg.egress_source;
        o.daddr = daddr;
        o.sport = sport;
        o.dport = dport;
        o.direction = DIR_OUT;
        o.flags = flags;
        o.last_seen_ns = now;
        o.packets = 1;
        o.bytes = len;
        o
    };
    if table.insert(&p.key, out, BPF_ANY as u64).is_err() {
        table.remove(&rkey);
        return Err(Error::TableFull);
    }
    // A full LRU table evicts in batches, which can take the reply entry just made; without it
    // the flow's replies would be refused as unsolicited.
    if !table.contains(&rkey) && table.insert(&rkey, reply, BPF_ANY as u64).is_err() {
        table.remove(&p.key);
        return Err(Error::TableFull);
    }
    stats.new_flows += 1;
    Ok(rkey.reversed())
}

/// The entry for the other direction of the flow whose packets arrive with `key`: it rewrites
/// back to `key`'s tuple, written into `slot` (zeroed in place: a literal's zero fields would
/// become a memset call).
#[inline(always)]
fn peer_value(slot: &mut FlowValue, key: &FlowKey, direction: u8, flags: u8, now: u64) {
    // SAFETY: plain data.
    let r = unsafe { clear(slot) };
    r.saddr = key.daddr;
    r.daddr = key.saddr;
    r.sport = key.dport;
    r.dport = key.sport;
    r.direction = direction;
    r.flags = flags;
    r.last_seen_ns = now;
}

/// Whether a new flow from `key` may take reply key `rkey` in `table`: it is free, expired, or
/// the surviving reply entry of this very flow (whose outbound entry the LRU evicted alone;
/// taking another port would change the flow's source port mid-connection).
#[inline(always)]
fn reusable(table: Table, rkey: &FlowKey, key: &FlowKey, cfg: &DataplaneConfig, now: u64) -> bool {
    FlowEntry::find_in(table, rkey).is_none_or(|e| answers(e, key))
        || live_in(table, rkey, cfg, now).is_none()
}

/// Whether reply entry `e` answers the flow whose packets arrive with `key`: it rewrites back
/// to exactly `key`'s tuple.
#[inline(always)]
fn answers(e: FlowEntry, key: &FlowKey) -> bool {
    e.translated_key(key.proto) == key.reversed()
}

/// Moves the new flow whose reply `v` (found under `key`) has just arrived to the answered
/// table, both entries, and returns its entry there; None (the flow stays where it is) if the
/// table refused them. A TCP reset answers nothing: the caller passes only other replies.
#[inline(always)]
pub fn answer(key: &FlowKey, v: FlowEntry, now: u64) -> Option<FlowEntry> {
    let out_key = v.translated_key(key.proto).reversed();
    let NewEntries { a: reply, b: out } = scratch()?;
    v.copy_to(reply);
    match FlowEntry::find_in(Table::New, &out_key) {
        Some(o) => o.copy_to(out),
        None => peer_value(out, key, DIR_OUT, v.flags(), now),
    }
    Table::Answered
        .insert(key, reply, BPF_ANY as u64)
        .and_then(|()| Table::Answered.insert(&out_key, out, BPF_ANY as u64))
        .ok()?;
    Table::New.remove(key);
    Table::New.remove(&out_key);
    FlowEntry::find_in(Table::Answered, key)
}

/// Puts back the other direction's entry of the live flow `v` (found under `key`) if it is
/// gone: the LRU evicts entries, not flows, and without it one direction would be dropped
/// until the remaining entry expired. Called whenever the flow's route is looked up: once per
/// ROUTE_CACHE_NS and direction for frames the cache takes, and for every bigger (GSO) frame,
/// so that a direction carrying only those keeps its peer too.
#[inline(always)]
pub fn restore_peer(key: &FlowKey, v: FlowEntry, now: u64, stats: &mut Stats) {
    let peer = v.translated_key(key.proto).reversed();
    let table = v.table();
    if table.contains(&peer) {
        return;
    }
    let direction = if v.direction() == DIR_OUT {
        DIR_IN
    } else {
        DIR_OUT
    };
    let Some(NewEntries { a: r, .. }) = scratch() else {
        return; // cannot happen: a one-slot per-CPU array
    };
    peer_value(r, key, direction, v.flags(), now);
    if table.insert(&peer, r, BPF_NOEXIST as u64).is_ok() {
        stats.flows_restored += 1;
    }
}

/// Records a packet on a flow entry: timestamp, counters, and TCP close state (FIN or RST
/// moves both directions to the short timeout; a new SYN on a closing tuple revives it).
#[inline(always)]
pub fn touch(v: FlowEntry, p: &Parsed, now: u64, len: u64) {
    v.count(now, len);
    if p.key.proto != PROTO_TCP {
        return;
    }
    let flags = v.flags();
    let closing = p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let reopening = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && flags & FLOW_CLOSING != 0;
    if !closing && !reopening {
        return;
    }
    let new_flags = if closing {
        flags | FLOW_CLOSING
    } else {
        flags & !FLOW_CLOSING
    };
    v.set_flags(new_flags);
    if let Some(peer) = FlowEntry::find_in(v.table(), &v.translated_key(PROTO_TCP).reversed()) {
        peer.set_flags(new_flags);
    }
}
