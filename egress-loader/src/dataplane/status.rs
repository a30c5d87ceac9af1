//! `egress-router status`: the counters and the live connection table, read from the pinned
//! maps, or, where the pins are out of sight (another container of the pod, a dataplane whose
//! pins went with its container), from the maps of our program attached to the cluster
//! interface. Read-only: it pins and mounts nothing. No running egress-router is needed.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapType, PerCpuArray};
use egress_common::{
    DIR_OUT, DataplaneConfig, FLOW_CLOSING, FlowKey, FlowValue, MAP_CONFIG, MAP_FLOWS,
    MAP_GENERATION, MAP_NEW_FLOWS, MAP_RULES, MAP_STATS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, RuleKey, RuleTarget, Stats,
};
use serde::Serialize;

use super::{DataplaneOptions, entries::entries, fill, pindir, recover};

/// Entries of the answered flows' table and of the new flows' table.
pub type FlowTables = (Vec<(FlowKey, FlowValue)>, Vec<(FlowKey, FlowValue)>);

/// The maps every reader of the dataplane opens (status, the metrics of legacy mode and of the
/// exporter), and where they were found. Every reader outside the loader goes through here, so
/// that how the maps are found lives in one place. Reading needs no capability to load or
/// attach anything: the right to open the pins, or, without them, to open maps by id.
pub struct StatusMaps {
    stats: Map,
    flows: Map,
    /// The flows not answered yet (None: a dataplane of a version without that table).
    new_flows: Option<Map>,
    config: Map,
    /// The generation in force (None: a dataplane of a version with one configuration).
    generation: Option<Map>,
    rules: Map,
    flows_max: u32,
    /// The pin directory this network namespace's router uses (or the one given).
    pub dir: PathBuf,
    /// "pinned in DIR" or "the tcx program on eth0 (...)".
    pub from: String,
}

fn open_pin(dir: &Path, name: &str) -> Result<MapData> {
    let p = dir.join(name);
    MapData::from_pin(&p).with_context(|| format!("cannot open pinned map {}", p.display()))
}

impl StatusMaps {
    fn new(
        [stats, flows, config, rules]: [MapData; 4],
        [new_flows, generation]: [Option<MapData>; 2],
        dir: PathBuf,
        from: String,
    ) -> Result<StatusMaps> {
        let flows_max = flows
            .info()
            .with_context(|| format!("reading the {MAP_FLOWS} map's size"))?
            .max_entries();
        // A hash map: the CONFIG of an earlier build, pinned, with its one configuration under
        // key 0 (as is an older build's array of one, whose rules read as generation 0).
        let config = match config
            .info()
            .with_context(|| format!("reading the {MAP_CONFIG} map's type"))?
            .map_type()
        {
            Ok(MapType::Hash) => Map::HashMap(config),
            _ => Map::Array(config),
        };
        Ok(StatusMaps {
            stats: Map::PerCpuArray(stats),
            flows: Map::LruHashMap(flows),
            new_flows: new_flows.map(Map::LruHashMap),
            config,
            generation: generation.map(Map::Array),
            rules: Map::HashMap(rules),
            flows_max,
            dir,
            from,
        })
    }

    /// The maps pinned in `dir`.
    pub fn pinned(dir: &Path) -> Result<StatusMaps> {
        let maps = [MAP_STATS, MAP_FLOWS, MAP_CONFIG, MAP_RULES].map(|m| open_pin(dir, m));
        let [stats, flows, config, rules] = maps;
        StatusMaps::new(
            [stats?, flows?, config?, rules?],
            [MAP_NEW_FLOWS, MAP_GENERATION].map(|m| open_pin(dir, m).ok()),
            dir.to_path_buf(),
            format!("pinned in {}", dir.display()),
        )
    }

    /// The maps pinned in the directory `opts` names, else those of the dataplane attached to
    /// the cluster interface.
    pub fn find(opts: &DataplaneOptions) -> Result<StatusMaps> {
        let dir = pindir::resolve(opts.bpffs_dir.as_deref())?;
        if dir.join(MAP_STATS).exists() && dir.join(MAP_FLOWS).exists() {
            return Self::pinned(&dir);
        }
        let found = recover::find(&opts.cluster_interface, &opts.macvlan_interface)?;
        let Some(mut found) = found else {
            bail!(
                "no redirect dataplane found: no maps pinned in {} (in this mount namespace), \
                 and no egress-router program attached to {} ingress in this network namespace",
                dir.display(),
                opts.cluster_interface
            );
        };
        let mut take = |name| {
            found.take(name).with_context(|| {
                format!("the dataplane attached here has no compatible {name} map")
            })
        };
        let maps = [
            take(MAP_STATS)?,
            take(MAP_FLOWS)?,
            take(MAP_CONFIG)?,
            take(MAP_RULES)?,
        ];
        let optional = [MAP_NEW_FLOWS, MAP_GENERATION].map(|m| found.take(m));
        let from = format!(
            "{} (no pins in {} in this mount namespace)",
            found.from,
            dir.display()
        );
        StatusMaps::new(maps, optional, dir, from)
    }

    /// Sums the per-CPU counters.
    pub fn stats(&self) -> Result<Stats> {
        let map = PerCpuArray::<&MapData, Stats>::try_from(&self.stats)?;
        let mut total = Stats::default();
        for s in map.get(&0, 0)?.iter() {
            total.accumulate(s);
        }
        Ok(total)
    }

    /// Every entry of both connection tables.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        let (mut all, new) = self.flow_tables()?;
        all.extend(new);
        all.sort_by_key(|(k, _)| (k.proto, k.saddr, k.sport, k.daddr, k.dport));
        Ok(all)
    }

    /// The entries of the answered flows, and of those not answered yet.
    pub fn flow_tables(&self) -> Result<FlowTables> {
        let sorted = |m: &Map| -> Result<Vec<(FlowKey, FlowValue)>> {
            let mut v = entries::<FlowKey, FlowValue>(m)?;
            v.sort_by_key(|(k, _)| (k.proto, k.saddr, k.sport, k.daddr, k.dport));
            Ok(v)
        };
        let new = self.new_flows.as_ref().map(sorted).transpose()?;
        Ok((sorted(&self.flows)?, new.unwrap_or_default()))
    }

    /// The keys of the answered flows' table, and of the new flows' table, each once.
    pub fn flow_keys(&self) -> Result<(Vec<FlowKey>, Vec<FlowKey>)> {
        let keys = |m: &Map| -> Result<Vec<FlowKey>> {
            Ok(entries::<FlowKey, FlowValue>(m)?
                .into_iter()
                .map(|(k, _)| k)
                .collect())
        };
        let new = self.new_flows.as_ref().map(keys).transpose()?;
        Ok((keys(&self.flows)?, new.unwrap_or_default()))
    }

    /// The capacity in entries of the connection table (and of the new flows' table).
    pub fn flows_max(&self) -> u32 {
        self.flows_max
    }

    /// The configuration the loader wrote (all zero before it did).
    pub fn config(&self) -> Result<DataplaneConfig> {
        match (&self.config, &self.generation) {
            (Map::Array(_), Some(generation)) => Ok(fill::in_force(&self.config, generation)?
                .config
                .unwrap_or_default()),
            (Map::Array(_), None) => {
                let map = Array::<&MapData, DataplaneConfig>::try_from(&self.config)?;
                Ok(map.get(&0, 0)?)
            }
            _ => Ok(fill::hash_config(&self.config)?.unwrap_or_default()),
        }
    }

    /// How many redirect rules are in force (the fallback is in the configuration).
    pub fn rule_count(&self) -> Result<usize> {
        let generation = self.config()?.generation;
        let map = HashMap::<&MapData, RuleKey, RuleTarget>::try_from(&self.rules)?;
        Ok(map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.generation == generation)
            .count())
    }

    /// The redirect rules in force, by protocol and port: those of the generation the
    /// configuration names (the other holds the rules it replaced, or a replacement's being
    /// written).
    pub fn rules(&self) -> Result<Vec<(RuleKey, RuleTarget)>> {
        let generation = self.config()?.generation;
        let map = HashMap::<&MapData, RuleKey, RuleTarget>::try_from(&self.rules)?;
        let mut v: Vec<_> = map
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, _)| k.generation == generation)
            .collect();
        v.sort_by_key(|(k, _)| (k.proto, k.port));
        Ok(v)
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
    /// A reply has come: the flow is in the connection table (FLOWS), not among the new flows
    /// (NEW_FLOWS), which a flood of new flows churns.
    answered: bool,
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
struct AttachedJson {
    interface: String,
    /// "tcx" or "clsact".
    method: &'static str,
    program: String,
    program_id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_id: Option<u32>,
}

/// How many of our programs are attached to `iface`'s ingress (0 also when there is no such
/// interface). Listing them needs CAP_NET_ADMIN or CAP_SYS_ADMIN (an EPERM in the error's
/// chain says so).
pub fn programs_attached(iface: &str) -> Result<usize> {
    Ok(recover::attached(iface)?.len())
}

/// Our programs attached to the cluster and macvlan interfaces.
fn attachments(opts: &DataplaneOptions) -> Result<Vec<AttachedJson>> {
    let mut all = Vec::new();
    for iface in [&opts.cluster_interface, &opts.macvlan_interface] {
        for a in recover::attached(iface)? {
            all.push(AttachedJson {
                interface: a.interface.clone(),
                method: a.method.name(),
                program: a.prog.name_as_str().unwrap_or("?").to_string(),
                program_id: a.prog.id(),
                link_id: a.link_id,
            });
        }
    }
    Ok(all)
}

/// A loaded redirect rule.
#[derive(Serialize)]
struct RuleJson {
    proto: &'static str,
    local_port: u16,
    to: String,
}

fn rule_json(k: &RuleKey, t: &RuleTarget) -> RuleJson {
    RuleJson {
        proto: proto_name(k.proto),
        local_port: k.port,
        to: format!("{}:{}", Ipv4Addr::from(t.daddr), t.dport),
    }
}

#[derive(Serialize)]
struct StatusJson {
    /// The pin directory of this network namespace's router (or the one given).
    bpffs_dir: String,
    /// Where the maps were found: pinned there, or through the attached program.
    maps: String,
    /// Our programs on the two interfaces, each ingress in the order they run.
    attached: Vec<AttachedJson>,
    /// The redirect rules the programs apply, and where unmatched traffic goes (None: to the
    /// router itself).
    rules: Vec<RuleJson>,
    fallback: Option<String>,
    counters: serde_json::Map<String, serde_json::Value>,
    flows: Vec<FlowJson>,
}

pub fn monotonic_ns() -> u64 {
    // Same clock as bpf_ktime_get_ns().
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

fn flow_json(k: &FlowKey, v: &FlowValue, answered: bool, now: u64) -> FlowJson {
    let ep = |a: [u8; 4], p: u16| format!("{}:{}", Ipv4Addr::from(a), p);
    FlowJson {
        proto: proto_name(k.proto),
        direction: if v.direction == DIR_OUT { "out" } else { "in" },
        from: ep(k.saddr, k.sport),
        to: ep(k.daddr, k.dport),
        translated_from: ep(v.saddr, v.sport),
        translated_to: ep(v.daddr, v.dport),
        answered,
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
    let maps = StatusMaps::find(opts)?;
    let stats = maps.stats()?;
    let (answered, new) = maps.flow_tables()?;
    let now = monotonic_ns();
    let mut flows: Vec<FlowJson> = answered
        .iter()
        .map(|(k, v)| flow_json(k, v, true, now))
        .chain(new.iter().map(|(k, v)| flow_json(k, v, false, now)))
        .collect();
    flows.sort_by(|a, b| (a.proto, &a.from, &a.to).cmp(&(b.proto, &b.from, &b.to)));
    let counters = counters(&stats);
    let attached = attachments(opts)?;
    let rules: Vec<RuleJson> = maps.rules()?.iter().map(|(k, t)| rule_json(k, t)).collect();
    let cfg = maps.config()?;
    let fallback = (cfg.has_fallback != 0).then(|| Ipv4Addr::from(cfg.fallback).to_string());
    if json {
        let counters = counters
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        let status = StatusJson {
            bpffs_dir: maps.dir.display().to_string(),
            maps: maps.from.clone(),
            attached,
            rules,
            fallback,
            counters,
            flows,
        };
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("bpffs directory: {}", maps.dir.display());
    println!("maps: {}", maps.from);
    for a in &attached {
        let link = a.link_id.map(|l| format!(", link {l}")).unwrap_or_default();
        println!(
            "attached: {} ingress: {} {} (program {}{link})",
            a.interface, a.method, a.program, a.program_id
        );
    }
    for r in &rules {
        println!("rule: {} {} -> {}", r.proto, r.local_port, r.to);
    }
    match &fallback {
        Some(f) => println!("fallback: everything else -> {f} (ports kept)"),
        None => println!("fallback: none (unmatched traffic is the router's own)"),
    }
    println!("counters (all CPUs):");
    for (k, v) in counters {
        println!("  {k:<20} {v}");
    }
    println!(
        "connection table: {} entries (two per flow); flows not answered yet: {} entries",
        answered.len(),
        new.len()
    );
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
            match (f.answered, f.closing) {
                (_, true) => " closing",
                (false, false) => " new",
                (true, false) => "",
            }
        );
    }
    Ok(())
}
