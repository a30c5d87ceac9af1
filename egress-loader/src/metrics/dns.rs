//! The DNS proxy's metrics: per rule line (its listener), and per configured name (its
//! resolutions and the addresses it has now).
use std::{
    fmt,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

use super::{Active, ConnectError, http::Direction, label_values};
use crate::{
    config::{DnsRule, DnsTarget},
    dns_proxy::names::Addrs,
};

label_values! {
    /// How one lookup of a name ended.
    pub enum Resolution {
        Ok => "ok",
        /// The name does not exist.
        NxDomain => "nxdomain",
        /// An answer without (IPv4) addresses.
        NoAddresses => "no_addresses",
        /// No usable answer (timeout, SERVFAIL, refused), the previous addresses kept.
        FailedKeptPrevious => "failed_kept_previous",
        /// No usable answer, and none kept.
        Failed => "failed",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LineLabels {
    line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    line: usize,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    line: usize,
    direction: Direction,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NameLabels {
    name: String,
    result: Resolution,
}

/// Why a connection could not be forwarded: the connect errors' reasons, and `unresolved` (the
/// line's name has no addresses).
const UNRESOLVED: &str = "unresolved";

/// Every counter of the DNS proxy; clones share them.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    connections: Family<LineLabels, Counter>,
    active: Family<LineLabels, Gauge>,
    connect_errors: Family<ErrorLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    resolutions: Family<NameLabels, Counter>,
    addresses: Addresses,
}

/// A rule line, its name, and the name's current addresses.
type Watched = (usize, String, watch::Receiver<Addrs>);

/// The names' current address sets, read at scrape time.
#[derive(Clone, Debug, Default)]
struct Addresses(Arc<Mutex<Vec<Watched>>>);

impl Collector for Addresses {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let mut m = e.encode_descriptor(
            "dns_resolved_addresses",
            "Addresses a rule line's name resolves to now (0: not resolved)",
            None,
            MetricType::Gauge,
        )?;
        for (line, name, rx) in self.0.lock().unwrap().iter() {
            let n = match &*rx.borrow() {
                Addrs::Ready(list) => list.len(),
                Addrs::Pending | Addrs::Failed(_) => 0,
            };
            let labels = [("line", line.to_string()), ("name", name.clone())];
            ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// One rule line's counters, for its accept loop.
#[derive(Clone, Debug)]
pub struct LineMetrics {
    line: usize,
    connections: Counter,
    active: Gauge,
    upstream: Counter,
    downstream: Counter,
    errors: Family<ErrorLabels, Counter>,
}

impl LineMetrics {
    /// A connection accepted: counted, and open while the guard lives.
    pub fn accepted(&self) -> Active {
        self.connections.inc();
        Active::new(&self.active)
    }

    pub fn connect_failed(&self, e: &std::io::Error) {
        self.error(super::connect_error_reason(e).as_str());
    }

    /// A connection refused because the line's name has no addresses.
    pub fn unresolved(&self) {
        self.error(UNRESOLVED);
    }

    fn error(&self, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                line: self.line,
                reason,
            })
            .inc();
    }

    /// Bytes client to upstream and back, of one finished connection.
    pub fn transferred(&self, up: u64, down: u64) {
        self.upstream.inc_by(up);
        self.downstream.inc_by(down);
    }
}

/// One name's lookups.
#[derive(Clone, Debug)]
pub struct NameMetrics {
    name: String,
    resolutions: Family<NameLabels, Counter>,
}

impl NameMetrics {
    pub fn resolved(&self, result: Resolution) {
        self.resolutions
            .get_or_create(&NameLabels {
                name: self.name.clone(),
                result,
            })
            .inc();
    }

    /// Whether a lookup has ever given addresses.
    pub fn ever_resolved(&self) -> bool {
        self.resolutions
            .get(&NameLabels {
                name: self.name.clone(),
                result: Resolution::Ok,
            })
            .is_some_and(|c| c.get() > 0)
    }
}

impl DnsMetrics {
    /// The metrics for `rules`, every series created at zero, registered in `registry`.
    pub fn new(registry: &mut Registry, rules: &[DnsRule]) -> DnsMetrics {
        let m = DnsMetrics::default();
        for r in rules {
            let line = r.line;
            m.connections.get_or_create_owned(&LineLabels { line });
            m.active.get_or_create_owned(&LineLabels { line });
            for reason in ConnectError::ALL.iter().map(|c| c.as_str()) {
                m.connect_errors
                    .get_or_create_owned(&ErrorLabels { line, reason });
            }
            if let DnsTarget::Name(name) = &r.target {
                m.connect_errors.get_or_create_owned(&ErrorLabels {
                    line,
                    reason: UNRESOLVED,
                });
                for &result in Resolution::ALL {
                    m.resolutions.get_or_create_owned(&NameLabels {
                        name: name.clone(),
                        result,
                    });
                }
            }
            for &direction in Direction::ALL {
                m.bytes
                    .get_or_create_owned(&BytesLabels { line, direction });
            }
        }
        registry.register(
            "dns_connections",
            "Connections accepted, by rule line",
            m.connections.clone(),
        );
        registry.register(
            "dns_active_connections",
            "Connections open now, by rule line",
            m.active.clone(),
        );
        registry.register(
            "dns_connect_errors",
            "Connections that could not be forwarded, by rule line and reason (unresolved: the \
             line's name has no addresses; the others: the last connection attempt's error)",
            m.connect_errors.clone(),
        );
        registry.register(
            "dns_bytes",
            "Bytes forwarded, by rule line and direction (upstream = client to destination), \
             counted when a connection ends",
            m.bytes.clone(),
        );
        registry.register(
            "dns_resolutions",
            "Lookups of each configured name, by result",
            m.resolutions.clone(),
        );
        registry.register_collector(Box::new(m.addresses.clone()));
        let names = rules
            .iter()
            .filter(|r| matches!(r.target, DnsTarget::Name(_)))
            .count();
        super::register_rule_counts(registry, &[("dns", rules.len()), ("dns_by_name", names)]);
        m
    }

    pub fn line(&self, line: usize) -> LineMetrics {
        let bytes = |direction| {
            self.bytes
                .get_or_create_owned(&BytesLabels { line, direction })
        };
        LineMetrics {
            line,
            connections: self.connections.get_or_create_owned(&LineLabels { line }),
            active: self.active.get_or_create_owned(&LineLabels { line }),
            upstream: bytes(Direction::Upstream),
            downstream: bytes(Direction::Downstream),
            errors: self.connect_errors.clone(),
        }
    }

    pub fn name(&self, name: &str) -> NameMetrics {
        NameMetrics {
            name: name.to_string(),
            resolutions: self.resolutions.clone(),
        }
    }

    /// Shows the addresses of `line`'s name `name` (as `rx` holds them) at each scrape.
    pub fn watch(&self, line: usize, name: &str, rx: watch::Receiver<Addrs>) {
        self.addresses
            .0
            .lock()
            .unwrap()
            .push((line, name.to_string(), rx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: usize, port: u16, target: DnsTarget) -> DnsRule {
        DnsRule {
            local_port: port,
            target,
            remote_port: port,
            line,
        }
    }

    #[test]
    fn per_line_and_per_name_series() {
        let mut r = crate::metrics::registry(crate::metrics::Role::DnsProxy);
        let rules = [
            rule(1, 80, DnsTarget::Name("web.test".into())),
            rule(3, 7, DnsTarget::Addr("203.0.113.25".parse().unwrap())),
        ];
        let m = DnsMetrics::new(&mut r, &rules);
        let (tx, rx) = watch::channel(Addrs::Pending);
        m.watch(1, "web.test", rx);
        let name = m.name("web.test");
        assert!(!name.ever_resolved());
        name.resolved(Resolution::NxDomain);
        assert!(!name.ever_resolved());
        name.resolved(Resolution::Ok);
        assert!(name.ever_resolved());
        tx.send(Addrs::Ready(Arc::from(
            [
                "203.0.113.25".parse().unwrap(),
                "203.0.113.26".parse().unwrap(),
            ]
            .as_slice(),
        )))
        .unwrap();
        let l1 = m.line(1);
        let guard = l1.accepted();
        l1.unresolved();
        let l3 = m.line(3);
        drop(l3.accepted());
        l3.connect_failed(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        l3.transferred(4, 6);
        let text = crate::metrics::encode(&r, "").0;
        for line in [
            "egress_router_dns_connections_total{line=\"1\"} 1",
            "egress_router_dns_connections_total{line=\"3\"} 1",
            "egress_router_dns_active_connections{line=\"1\"} 1",
            "egress_router_dns_active_connections{line=\"3\"} 0",
            "egress_router_dns_connect_errors_total{line=\"1\",reason=\"unresolved\"} 1",
            "egress_router_dns_connect_errors_total{line=\"3\",reason=\"refused\"} 1",
            "egress_router_dns_connect_errors_total{line=\"3\",reason=\"timeout\"} 0",
            "egress_router_dns_bytes_total{line=\"3\",direction=\"upstream\"} 4",
            "egress_router_dns_bytes_total{line=\"3\",direction=\"downstream\"} 6",
            "egress_router_dns_resolutions_total{name=\"web.test\",result=\"ok\"} 1",
            "egress_router_dns_resolutions_total{name=\"web.test\",result=\"nxdomain\"} 1",
            "egress_router_dns_resolutions_total{name=\"web.test\",result=\"failed\"} 0",
            "egress_router_dns_resolved_addresses{line=\"1\",name=\"web.test\"} 2",
            "egress_router_configured_rules{kind=\"dns\"} 2",
            "egress_router_configured_rules{kind=\"dns_by_name\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}`:\n{text}");
        }
        assert!(
            !text.contains("line=\"3\",reason=\"unresolved\""),
            "an address line never waits for a name"
        );
        drop(guard);
    }
}
