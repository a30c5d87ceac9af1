//! The redirect dataplane's metrics: its per-CPU counters and the connection table, read from
//! the pinned maps when Prometheus scrapes (the programs do no work for them), the same in
//! legacy mode and in the exporter that stands beside an init-mode dataplane.
use std::{
    collections::HashMap,
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Result;
use egress_common::{DataplaneConfig, FlowKey, Stats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
    },
    registry::Registry,
};
use tracing::warn;

use crate::dataplane::{
    DataplaneOptions,
    status::{self, StatusMaps},
};

/// What one scrape reads from the maps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The counters summed over the CPUs.
    pub stats: Stats,
    /// Entries in the connection table (two per flow), and its capacity.
    pub flow_entries: u64,
    pub flow_capacity: u64,
    /// Entries of the flows not answered yet (a table of the same capacity).
    pub new_flow_entries: u64,
    /// Flows to the destination (address, port, protocol) that has the most: each needs its
    /// own source port of EGRESS_SOURCE.
    pub busiest_destination_flows: u64,
    /// Source ports a new flow can be given (`--port-range`).
    pub port_range: u64,
    /// Redirect rules loaded, and whether a fallback is.
    pub rules: u64,
    pub fallback: bool,
}

impl Snapshot {
    pub fn read(maps: &StatusMaps) -> Result<Snapshot> {
        let config = maps.config()?;
        let (answered, new) = maps.flow_keys()?;
        Ok(Snapshot::new(
            maps.stats()?,
            &answered,
            &new,
            maps.flows_max(),
            &config,
            maps.rule_count()?,
        ))
    }

    pub fn new(
        stats: Stats,
        keys: &[FlowKey],
        new_keys: &[FlowKey],
        capacity: u32,
        config: &DataplaneConfig,
        rules: usize,
    ) -> Snapshot {
        Snapshot {
            stats,
            flow_entries: keys.len() as u64,
            flow_capacity: capacity.into(),
            new_flow_entries: new_keys.len() as u64,
            // New flows hold their source port as answered ones do.
            busiest_destination_flows: busiest_destination(
                &[keys, new_keys].concat(),
                config.egress_source,
            ),
            port_range: (u64::from(config.port_max) + 1).saturating_sub(config.port_min.into()),
            rules: rules as u64,
            fallback: config.has_fallback != 0,
        }
    }
}

/// The most flows any one destination (address, port, protocol) has. A flow's reply entry is
/// keyed by the destination and the EGRESS_SOURCE port it was given, so the reply entries to
/// one destination are the ports in use towards it: the pool a new flow draws from.
pub fn busiest_destination(keys: &[FlowKey], egress_source: [u8; 4]) -> u64 {
    let mut per_destination: HashMap<([u8; 4], u16, u8), u64> = HashMap::new();
    for k in keys.iter().filter(|k| k.daddr == egress_source) {
        *per_destination
            .entry((k.saddr, k.sport, k.proto))
            .or_default() += 1;
    }
    per_destination.into_values().max().unwrap_or(0)
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(L, u64)],
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Writes the families of one snapshot.
pub fn encode_snapshot(s: &Snapshot, e: &mut DescriptorEncoder) -> fmt::Result {
    let st = &s.stats;
    counters(
        e,
        "redirect_packets",
        "Packets translated and forwarded: out = cluster to outside (DNAT and SNAT), in = replies",
        &[
            ([("direction", "out")], st.out_packets),
            ([("direction", "in")], st.in_packets),
        ],
    )?;
    counters(
        e,
        "redirect_bytes",
        "Bytes translated and forwarded, by direction (as redirect_packets)",
        &[
            ([("direction", "out")], st.out_bytes),
            ([("direction", "in")], st.in_bytes),
        ],
    )?;
    counters(
        e,
        "redirect_received_packets",
        "Every packet the programs saw, translated or not: interface cluster = eth0, outside = macvlan0",
        &[
            ([("interface", "cluster")], st.eth0_rx_packets),
            ([("interface", "outside")], st.macvlan_rx_packets),
        ],
    )?;
    counters(
        e,
        "redirect_received_bytes",
        "Bytes of every packet the programs saw, by interface (as redirect_received_packets)",
        &[
            ([("interface", "cluster")], st.eth0_rx_bytes),
            ([("interface", "outside")], st.macvlan_rx_bytes),
        ],
    )?;
    counters(
        e,
        "redirect_drops",
        "Packets not translated, by reason; all are dropped but no_rule (cluster traffic no rule \
         or fallback matches), which is left to the router's own stack, where nothing listens",
        &[
            ([("reason", "no_rule")], st.no_rule),
            ([("reason", "table_full")], st.drop_table_full),
            ([("reason", "port_exhausted")], st.drop_port_exhausted),
            ([("reason", "malformed")], st.drop_malformed),
            ([("reason", "unsolicited")], st.drop_unsolicited),
            ([("reason", "fragment")], st.drop_fragment),
            ([("reason", "ttl")], st.drop_ttl),
        ],
    )?;
    counter(
        e,
        "redirect_new_flows",
        "Flows created (among the new flows, until a reply answers them)",
        st.new_flows,
    )?;
    counter(
        e,
        "redirect_restored_flows",
        "Entries put back because the LRU had evicted one direction of a live flow alone",
        st.flows_restored,
    )?;
    counter(
        e,
        "redirect_fib_lookups",
        "FIB lookups made (other translated packets used their flow's cached route)",
        st.fib_lookups,
    )?;
    counter(
        e,
        "redirect_fib_passed",
        "Translated packets handed to the kernel stack: the FIB gave no direct path",
        st.fib_pass,
    )?;
    gauge(
        e,
        "redirect_flow_table_entries",
        "Entries in the connection table (two per flow)",
        s.flow_entries,
    )?;
    gauge(
        e,
        "redirect_flow_table_capacity",
        "Entries the connection table holds before the LRU evicts (--conntrack-size)",
        s.flow_capacity,
    )?;
    gauge(
        e,
        "redirect_flow_table_use_ratio",
        "Connection-table pressure: entries / capacity",
        ratio(s.flow_entries, s.flow_capacity),
    )?;
    gauge(
        e,
        "redirect_new_flow_table_entries",
        "Entries of flows not answered yet (two per flow; a table of the same capacity, which a \
         flood of new flows churns without touching the connection table)",
        s.new_flow_entries,
    )?;
    gauge(
        e,
        "redirect_port_pool_busiest_flows",
        "Flows to the destination (address, port, protocol) with the most flows",
        s.busiest_destination_flows,
    )?;
    gauge(
        e,
        "redirect_port_pool_size",
        "Source ports a new flow can be given (--port-range)",
        s.port_range,
    )?;
    gauge(
        e,
        "redirect_port_pool_use_ratio",
        "Source-port pressure of the busiest destination: its flows / the port range \
         (drop_port_exhausted starts near 1)",
        ratio(s.busiest_destination_flows, s.port_range),
    )?;
    let mut rules = e.encode_descriptor(
        "configured_rules",
        "Rules in the configuration, by kind",
        None,
        MetricType::Gauge,
    )?;
    for (kind, n) in [
        ("redirect", s.rules),
        ("redirect_fallback", u64::from(s.fallback)),
    ] {
        ConstGauge::new(n).encode(rules.encode_family(&[("kind", kind)])?)?;
    }
    Ok(())
}

/// The dataplane's metrics, read at each scrape from the maps `status` finds: pinned, or
/// through our program attached to the cluster interface (an exporter in another container).
#[derive(Debug)]
pub struct RedirectCollector {
    opts: DataplaneOptions,
    /// Whether the last scrape could read the maps (to log changes, not every scrape).
    readable: AtomicBool,
}

impl RedirectCollector {
    pub fn new(opts: DataplaneOptions) -> RedirectCollector {
        RedirectCollector {
            opts,
            readable: AtomicBool::new(true),
        }
    }
}

impl Collector for RedirectCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let snapshot = StatusMaps::find(&self.opts).and_then(|m| Snapshot::read(&m));
        let ok = snapshot.is_ok();
        if self.readable.swap(ok, Ordering::Relaxed) != ok {
            match &snapshot {
                Err(err) => warn!("the dataplane's maps cannot be read: {err:#}"),
                Ok(_) => warn!("the dataplane's maps can be read again"),
            }
        }
        gauge(
            &mut e,
            "redirect_maps_readable",
            "1 when this scrape could read the dataplane's pinned maps (the other redirect \
             metrics are missing otherwise)",
            i64::from(ok),
        )?;
        match snapshot {
            Ok(s) => encode_snapshot(&s, &mut e),
            Err(_) => Ok(()),
        }
    }
}

/// Readiness of the dataplane: its maps can be read, the loader has configured it, and our
/// programs are still attached to both interfaces (where this process may list them: the
/// exporter with only CAP_BPF may not, and then the maps are all it checks).
pub fn ready(opts: &DataplaneOptions) -> Result<(), String> {
    let maps = StatusMaps::find(opts)
        .map_err(|e| format!("the dataplane's maps cannot be read: {e:#}"))?;
    let config = maps
        .config()
        .map_err(|e| format!("the dataplane's configuration cannot be read: {e:#}"))?;
    if config.eth0_ifindex == 0 {
        return Err(format!(
            "the dataplane ({}) is not configured yet",
            maps.from
        ));
    }
    for iface in [&opts.cluster_interface, &opts.macvlan_interface] {
        match status::programs_attached(iface) {
            Ok(0) => {
                return Err(format!(
                    "no egress-router program is attached to {iface} ingress any more (the \
                     maps are there, but no traffic is translated): restart the router to \
                     attach it again"
                ));
            }
            Ok(_) => {}
            Err(e) if permission_denied(&e) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "cannot list the programs attached to {iface}: {e:#}"
                ));
            }
        }
    }
    Ok(())
}

/// Whether `e` is the kernel refusing for want of a capability.
fn permission_denied(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    })
}

/// Legacy mode's garbage collection, which only a long-running process does.
#[derive(Clone, Debug, Default)]
pub struct GcMetrics {
    pub runs: Counter,
    pub removed: Counter,
    pub failures: Counter,
}

impl GcMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "redirect_gc_runs",
            "Garbage collections of expired flows (legacy mode, every 30 s)",
            self.runs.clone(),
        );
        registry.register(
            "redirect_gc_removed_entries",
            "Expired connection-table entries the garbage collection removed",
            self.removed.clone(),
        );
        registry.register(
            "redirect_gc_failures",
            "Garbage collections that failed (logged)",
            self.failures.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: [u8; 4] = [192, 168, 12, 99];

    fn reply(dest: [u8; 4], dport: u16, port: u16) -> FlowKey {
        FlowKey {
            saddr: dest,
            daddr: SOURCE,
            sport: dport,
            dport: port,
            proto: 6,
            ..Default::default()
        }
    }

    fn client(sport: u16) -> FlowKey {
        FlowKey {
            saddr: [10, 128, 0, 10],
            daddr: [10, 128, 0, 5],
            sport,
            dport: 80,
            proto: 6,
            ..Default::default()
        }
    }

    #[test]
    fn the_busiest_destination_counts_reply_entries_per_destination() {
        let d = [203, 0, 113, 25];
        let keys = vec![
            client(1000),
            reply(d, 80, 1000),
            client(1001),
            reply(d, 80, 1001),
            reply(d, 443, 1002),
            reply([203, 0, 113, 26], 80, 1003),
        ];
        assert_eq!(busiest_destination(&keys, SOURCE), 2);
        assert_eq!(busiest_destination(&[client(1)], SOURCE), 0);
        let udp = FlowKey {
            proto: 17,
            ..reply(d, 80, 1004)
        };
        assert_eq!(
            busiest_destination(&[reply(d, 80, 1), udp], SOURCE),
            1,
            "another protocol is another pool"
        );
    }

    #[derive(Debug)]
    struct Fixed(Snapshot);

    impl Collector for Fixed {
        fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
            encode_snapshot(&self.0, &mut e)
        }
    }

    fn exposition(s: Snapshot) -> String {
        let mut r = crate::metrics::registry(crate::metrics::Role::Exporter);
        r.register_collector(Box::new(Fixed(s)));
        crate::metrics::encode(&r, "").0
    }

    #[test]
    fn every_counter_is_exported_with_its_labels() {
        let config = DataplaneConfig {
            egress_source: SOURCE,
            port_min: 1024,
            port_max: 65535,
            has_fallback: 1,
            ..Default::default()
        };
        let stats = Stats {
            out_packets: 9,
            in_packets: 6,
            out_bytes: 607,
            new_flows: 1,
            no_rule: 4,
            drop_table_full: 2,
            drop_ttl: 3,
            fib_lookups: 5,
            flows_restored: 7,
            ..Default::default()
        };
        let keys = [client(1000), reply([203, 0, 113, 25], 80, 1000)];
        // A new flow to the same destination holds a port of its pool too.
        let new = [client(1001), reply([203, 0, 113, 25], 80, 1001)];
        let text = exposition(Snapshot::new(stats, &keys, &new, 100, &config, 2));
        for line in [
            "egress_router_redirect_packets_total{direction=\"out\"} 9",
            "egress_router_redirect_packets_total{direction=\"in\"} 6",
            "egress_router_redirect_bytes_total{direction=\"out\"} 607",
            "egress_router_redirect_received_packets_total{interface=\"cluster\"} 0",
            "egress_router_redirect_drops_total{reason=\"no_rule\"} 4",
            "egress_router_redirect_drops_total{reason=\"table_full\"} 2",
            "egress_router_redirect_drops_total{reason=\"ttl\"} 3",
            "egress_router_redirect_drops_total{reason=\"unsolicited\"} 0",
            "egress_router_redirect_new_flows_total 1",
            "egress_router_redirect_restored_flows_total 7",
            "egress_router_redirect_fib_lookups_total 5",
            "egress_router_redirect_flow_table_entries 2",
            "egress_router_redirect_flow_table_capacity 100",
            "egress_router_redirect_flow_table_use_ratio 0.02",
            "egress_router_redirect_new_flow_table_entries 2",
            "egress_router_redirect_port_pool_busiest_flows 2",
            "egress_router_redirect_port_pool_size 64512",
            "egress_router_configured_rules{kind=\"redirect\"} 2",
            "egress_router_configured_rules{kind=\"redirect_fallback\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE egress_router_redirect_drops_total counter"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_table_has_no_pressure() {
        let text = exposition(Snapshot::default());
        assert!(
            text.contains("egress_router_redirect_flow_table_use_ratio 0.0\n"),
            "{text}"
        );
        assert!(text.contains("egress_router_redirect_port_pool_use_ratio 0.0\n"));
    }

    #[test]
    fn only_a_refusal_for_want_of_a_capability_skips_the_attachment_check() {
        let eperm = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EPERM))
            .context("querying the tcx programs on eth0 ingress");
        assert!(permission_denied(&eperm));
        let other = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENODEV))
            .context("querying the tcx programs on eth0 ingress");
        assert!(!permission_denied(&other));
    }

    #[test]
    fn unreadable_maps_say_so_and_leave_the_rest_out() {
        let mut r = crate::metrics::registry(crate::metrics::Role::Exporter);
        let opts = DataplaneOptions {
            bpffs_dir: Some("/nonexistent/egress-router".into()),
            cluster_interface: "nonexistent0".into(),
            ..DataplaneOptions::default()
        };
        r.register_collector(Box::new(RedirectCollector::new(opts.clone())));
        let text = crate::metrics::encode(&r, "").0;
        assert!(
            text.contains("egress_router_redirect_maps_readable 0\n"),
            "{text}"
        );
        assert!(!text.contains("redirect_packets"), "{text}");
        assert!(ready(&opts).is_err());
    }
}
