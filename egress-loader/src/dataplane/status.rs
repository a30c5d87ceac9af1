//! `egress-router status`: the counters and the live connection table, read from the pinned
//! maps (no running egress-router needed).
use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use egress_common::{
    DIR_OUT, DataplaneConfig, FLOW_CLOSING, FlowKey, FlowValue, MAP_CONFIG, MAP_FLOWS, MAP_RULES,
    MAP_STATS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, RuleKey, RuleTarget, Stats,
};
use serde::Serialize;

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

/// The maps a reader of the dataplane needs (the metrics of legacy mode and of the exporter),
/// opened from their pins under `dir`. Every reader outside the loader goes through here, so
/// that how the pins are found lives in one place.
pub struct PinnedMaps {
    stats: PerCpuArray<MapData, Stats>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    flows_max: u32,
    config: Array<MapData, DataplaneConfig>,
    rules: HashMap<MapData, RuleKey, RuleTarget>,
}

/// Opens the counters, the connection table, the configuration and the rules. Needs nothing
/// but the right to open the pins (no capability to load or attach anything).
pub fn open_maps(dir: &Path) -> Result<PinnedMaps> {
    let flows = open(dir, MAP_FLOWS)?;
    let flows_max = flows
        .info()
        .with_context(|| format!("reading the {MAP_FLOWS} map's size"))?
        .max_entries();
    Ok(PinnedMaps {
        stats: PerCpuArray::try_from(Map::PerCpuArray(open(dir, MAP_STATS)?))?,
        flows: HashMap::try_from(Map::LruHashMap(flows))?,
        flows_max,
        config: Array::try_from(Map::Array(open(dir, MAP_CONFIG)?))?,
        rules: HashMap::try_from(Map::HashMap(open(dir, MAP_RULES)?))?,
    })
}

impl PinnedMaps {
    /// The counters summed over the CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let mut total = Stats::default();
        for s in self.stats.get(&0, 0)?.iter() {
            total.accumulate(s);
        }
        Ok(total)
    }

    /// The connection table's keys, each once, read without the values (one system call per
    /// entry). The table changes meanwhile: at most its capacity is read.
    pub fn flow_keys(&self) -> Vec<FlowKey> {
        let mut seen = std::collections::HashSet::new();
        self.flows
            .keys()
            .take(self.flows_max as usize)
            .filter_map(|k| k.ok())
            .filter(|k| seen.insert(*k))
            .collect()
    }

    /// The connection table's capacity in entries.
    pub fn flows_max(&self) -> u32 {
        self.flows_max
    }

    /// The configuration the loader wrote (all zero before it did).
    pub fn config(&self) -> Result<DataplaneConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// How many redirect rules are loaded (the fallback is in the configuration).
    pub fn rule_count(&self) -> usize {
        self.rules.keys().filter(|k| k.is_ok()).count()
    }
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
pub fn print(dir: &Path, json: bool) -> Result<()> {
    let stats = read_stats(dir)?;
    let flows = read_flows(dir)?;
    let now = monotonic_ns();
    let flows: Vec<FlowJson> = flows.iter().map(|(k, v)| flow_json(k, v, now)).collect();
    let counters = counters(&stats);
    if json {
        let counters = counters
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&StatusJson { counters, flows })?
        );
        return Ok(());
    }
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
