//! `egress-router status`: the counters and the live connection table, read from the pinned
//! maps (no running egress-router needed).
use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use egress_common::{
    DIR_OUT, FLOW_CLOSING, FlowKey, FlowValue, MAP_FLOWS, MAP_STATS, PROTO_ICMP, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, Stats,
};
use serde::Serialize;

use super::{DataplaneOptions, pindir};

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let p = dir.join(name);
    MapData::from_pin(&p).with_context(|| {
        format!(
            "cannot open pinned map {} (is the redirect dataplane loaded with this --bpffs-dir?)",
            p.display()
        )
    })
}

/// Sums the per-CPU counters.
pub fn read_stats(dir: &Path) -> Result<Stats> {
    let map = PerCpuArray::<MapData, Stats>::try_from(Map::PerCpuArray(open(dir, MAP_STATS)?))?;
    let mut total = Stats::default();
    for s in map.get(&0, 0)?.iter() {
        total.accumulate(s);
    }
    Ok(total)
}

pub fn read_flows(dir: &Path) -> Result<Vec<(FlowKey, FlowValue)>> {
    let map =
        HashMap::<MapData, FlowKey, FlowValue>::try_from(Map::LruHashMap(open(dir, MAP_FLOWS)?))?;
    let mut v: Vec<_> = map.iter().filter_map(|e| e.ok()).collect();
    v.sort_by_key(|(k, _)| (k.proto, k.saddr, k.sport, k.daddr, k.dport));
    Ok(v)
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        PROTO_ICMP => "icmp",
        _ => "?",
    }
}

#[derive(Serialize)]
struct FlowJson {
    proto: &'static str,
    direction: &'static str,
    from: String,
    to: String,
    translated_from: String,
    translated_to: String,
    closing: bool,
    idle_seconds: f64,
    packets: u64,
    bytes: u64,
    /// The FIB answer last cached in the entry (the program reuses it for ROUTE_CACHE_NS).
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<RouteJson>,
}

#[derive(Serialize)]
struct RouteJson {
    ifindex: u32,
    next_hop_mac: String,
    mtu: u32,
    age_seconds: f64,
}

#[derive(Serialize)]
struct StatusJson {
    /// The pin directory of this network namespace's router (or the one given).
    bpffs_dir: String,
    counters: serde_json::Map<String, serde_json::Value>,
    flows: Vec<FlowJson>,
}

pub fn monotonic_ns() -> u64 {
    // Same clock as bpf_ktime_get_ns().
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

fn flow_json(k: &FlowKey, v: &FlowValue, now: u64) -> FlowJson {
    let ep = |a: [u8; 4], p: u16| format!("{}:{}", Ipv4Addr::from(a), p);
    FlowJson {
        proto: proto_name(k.proto),
        direction: if v.direction == DIR_OUT { "out" } else { "in" },
        from: ep(k.saddr, k.sport),
        to: ep(k.daddr, k.dport),
        translated_from: ep(v.saddr, v.sport),
        translated_to: ep(v.daddr, v.dport),
        closing: v.flags & FLOW_CLOSING != 0,
        idle_seconds: now.saturating_sub(v.last_seen_ns) as f64 / 1e9,
        packets: v.packets,
        bytes: v.bytes,
        route: (v.route.at_ns != 0).then(|| RouteJson {
            ifindex: v.route.ifindex,
            next_hop_mac: v.route.dmac.map(|b| format!("{b:02x}")).join(":"),
            mtu: v.route.mtu,
            age_seconds: now.saturating_sub(v.route.at_ns) as f64 / 1e9,
        }),
    }
}

/// The counters in the order they are shown, with the names bpftool shows.
pub fn counters(s: &Stats) -> [(&'static str, u64); 19] {
    [
        ("eth0_rx_packets", s.eth0_rx_packets),
        ("eth0_rx_bytes", s.eth0_rx_bytes),
        ("macvlan_rx_packets", s.macvlan_rx_packets),
        ("macvlan_rx_bytes", s.macvlan_rx_bytes),
        ("out_packets", s.out_packets),
        ("out_bytes", s.out_bytes),
        ("in_packets", s.in_packets),
        ("in_bytes", s.in_bytes),
        ("new_flows", s.new_flows),
        ("no_rule", s.no_rule),
        ("fib_pass", s.fib_pass),
        ("fib_lookups", s.fib_lookups),
        ("flows_restored", s.flows_restored),
        ("drop_table_full", s.drop_table_full),
        ("drop_port_exhausted", s.drop_port_exhausted),
        ("drop_malformed", s.drop_malformed),
        ("drop_unsolicited", s.drop_unsolicited),
        ("drop_fragment", s.drop_fragment),
        ("drop_ttl", s.drop_ttl),
    ]
}

/// Prints the status, as text or JSON.
pub fn print(opts: &DataplaneOptions, json: bool) -> Result<()> {
    let dir = pindir::resolve(opts.bpffs_dir.as_deref())?;
    let stats = read_stats(&dir)?;
    let flows = read_flows(&dir)?;
    let now = monotonic_ns();
    let flows: Vec<FlowJson> = flows.iter().map(|(k, v)| flow_json(k, v, now)).collect();
    let counters = counters(&stats);
    if json {
        let counters = counters
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        let status = StatusJson {
            bpffs_dir: dir.display().to_string(),
            counters,
            flows,
        };
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("bpffs directory: {}", dir.display());
    println!("counters (all CPUs):");
    for (k, v) in counters {
        println!("  {k:<20} {v}");
    }
    println!("connection table: {} entries (two per flow)", flows.len());
    if !flows.is_empty() {
        println!(
            "  {:<5} {:<4} {:<21} {:<21} {:<21} {:<21} {:>8} {:>8} {:>10}",
            "proto",
            "dir",
            "from",
            "to",
            "rewritten from",
            "rewritten to",
            "idle(s)",
            "packets",
            "bytes"
        );
    }
    for f in &flows {
        println!(
            "  {:<5} {:<4} {:<21} {:<21} {:<21} {:<21} {:>8.1} {:>8} {:>10}{}",
            f.proto,
            f.direction,
            f.from,
            f.to,
            f.translated_from,
            f.translated_to,
            f.idle_seconds,
            f.packets,
            f.bytes,
            if f.closing { " closing" } else { "" }
        );
    }
    Ok(())
}
