//! The metrics and health listener of every long-running role (legacy redirect, the exporter,
//! the HTTP and DNS proxies, the one-process forms): `/metrics` (Prometheus text format, or
//! OpenMetrics when the scraper asks for it), `/healthz` (the process answers) and `/readyz`
//! (the role is doing its job; 503 saying what is missing otherwise).
//!
//! - here: the option, the registry every role starts from (build info), readiness.
//! - [`server`]: the hyper listener.
//! - [`redirect`]: the dataplane's counters, read from the pinned maps at scrape time.
//! - [`http`], [`dns`]: the proxies' counters, kept where the events happen.
//!
//! Metric names start with `egress_router_`. Labels are bounded: a rule is named by its line
//! number, a DNS proxy name is one from the configuration; never a client address or a host
//! a request asked for.
use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Result, bail};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::warn;

use crate::config::{Config, Protocol};

pub mod dns;
pub mod http;
pub mod redirect;
mod server;

pub use server::Endpoint;

/// The default listener. Port 9190: off every rule port OpenShift's documentation and our
/// tests use (80, 443, 53, 8080, 8443...), outside the ephemeral range, and not a port of the
/// common exporters (node exporter 9100, Prometheus 9090, HAProxy's 8404): a scrape of the pod
/// IP is not mistaken for traffic to redirect. A rule that uses it anyway wins (the listener is
/// then off, with a warning) unless the port was asked for explicitly.
pub const DEFAULT_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9190);

/// `--metrics-address`: where the listener is, or `off`.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsOptions {
    /// The metrics and health listener (/metrics, /healthz, /readyz) as IP:PORT, or `off`
    /// [default: 0.0.0.0:9190]. With a redirect fallback, this TCP port of the pod IP stays the
    /// router's; in init mode, give the same value to the init container and the exporter.
    #[arg(
        long = "metrics-address",
        env = "EGRESS_METRICS_ADDRESS",
        value_name = "IP:PORT|off",
        value_parser = parse_address,
        global = true
    )]
    pub address: Option<Listen>,
}

/// A listener address, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    At(SocketAddr),
    Off,
}

fn parse_address(s: &str) -> Result<Listen, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(Listen::Off);
    }
    s.parse()
        .map(Listen::At)
        .map_err(|_| format!("'{s}' is not IP:PORT (e.g. 0.0.0.0:9190) or 'off'"))
}

impl MetricsOptions {
    /// The address to listen on, or None when off. `taken` says what else uses a TCP port in
    /// this role, if anything: the listener then steps aside (with a warning) when it was only
    /// the default, and the configuration is refused when the port was asked for.
    pub fn address(&self, taken: impl Fn(u16) -> Option<String>) -> Result<Option<SocketAddr>> {
        match self.address {
            Some(Listen::Off) => Ok(None),
            Some(Listen::At(addr)) => match taken(addr.port()) {
                Some(what) => bail!(
                    "EGRESS_METRICS_ADDRESS {addr}: port {} is {what}; choose another port, or \
                     'off'",
                    addr.port()
                ),
                None => Ok(Some(addr)),
            },
            None => match taken(DEFAULT_ADDRESS.port()) {
                Some(what) => {
                    warn!(
                        "the metrics listener is off: its default port {} is {what} (set \
                         EGRESS_METRICS_ADDRESS to another port to have metrics)",
                        DEFAULT_ADDRESS.port()
                    );
                    Ok(None)
                }
                None => Ok(Some(DEFAULT_ADDRESS)),
            },
        }
    }
}

/// Starts the listener of a role at `addr` (from [`MetricsOptions::address`]; None: off) on
/// the current tokio runtime; it serves until the runtime ends, and answers /readyz with 503
/// once `shutdown` is cancelled. Returns the bound address.
pub fn listen(
    addr: Option<SocketAddr>,
    registry: Registry,
    health: Arc<Health>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Option<SocketAddr>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    server::start(
        addr,
        Endpoint {
            registry,
            health,
            shutdown: shutdown.clone(),
        },
    )
    .map(Some)
}

/// What already uses TCP `port` in the role `cfg` describes: a TCP redirect rule (traffic to it
/// is redirected before any listener of the router sees it), the HTTP proxy's own port, or a
/// DNS proxy listener.
pub fn port_taken(cfg: &Config, http_listen: Option<SocketAddr>, port: u16) -> Option<String> {
    if let Some(r) = &cfg.redirect
        && let Some(rule) = r
            .rules
            .iter()
            .find(|r| r.protocol == Protocol::Tcp && r.local_port == port)
    {
        return Some(format!(
            "redirected by EGRESS_DESTINATION line {}",
            rule.line
        ));
    }
    if let Some(rules) = &cfg.dns
        && let Some(rule) = rules.iter().find(|r| r.local_port == port)
    {
        return Some(format!(
            "a listener of EGRESS_DNS_PROXY_DESTINATION line {}",
            rule.line
        ));
    }
    if http_listen.is_some_and(|a| a.port() == port) {
        return Some("the HTTP proxy's port (--http-listen)".to_string());
    }
    None
}

/// Which process this is, for `egress_router_build_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Legacy,
    Exporter,
    HttpProxy,
    DnsProxy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Legacy => "legacy",
            Role::Exporter => "exporter",
            Role::HttpProxy => "http-proxy",
            Role::DnsProxy => "dns-proxy",
        }
    }
}

/// Label values that are one of a fixed set, spelled as Prometheus labels are.
macro_rules! label_values {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vm])* $variant),+ }
        impl $name {
            /// Every value, in order (to create each series at zero).
            #[allow(dead_code, reason = "not every label set is created in advance")]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
        impl prometheus_client::encoding::EncodeLabelValue for $name {
            fn encode(&self, e: &mut prometheus_client::encoding::LabelValueEncoder) -> std::fmt::Result {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    };
}
pub(crate) use label_values;

/// A rule's line number as a label value, or `none` (no rule decided).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Line(pub Option<usize>);

impl EncodeLabelValue for Line {
    fn encode(&self, e: &mut LabelValueEncoder) -> fmt::Result {
        match self.0 {
            Some(n) => fmt::Write::write_fmt(e, format_args!("{n}")),
            None => fmt::Write::write_str(e, "none"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    role: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RuleKindLabels {
    kind: &'static str,
}

/// The registry every role starts from: `egress_router_` names and the build information.
pub fn registry(role: Role) -> Registry {
    let mut registry = Registry::with_prefix("egress_router");
    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            role: role.as_str(),
        })
        .set(1);
    registry.register(
        "build_info",
        "The running egress-router: its version, and the role of this process (always 1)",
        build,
    );
    registry
}

/// Registers `egress_router_configured_rules{kind}`: how many rules of each kind the
/// configuration has (redirect rules count themselves, from the maps: see [`redirect`]).
pub fn register_rule_counts(registry: &mut Registry, counts: &[(&'static str, usize)]) {
    let family: Family<RuleKindLabels, Gauge> = Family::default();
    for (kind, n) in counts {
        family
            .get_or_create(&RuleKindLabels { kind })
            .set(*n as i64);
    }
    registry.register(
        "configured_rules",
        "Rules in the configuration, by kind",
        family,
    );
}

/// Whether the role is ready: `/readyz` answers 200 while [`Health::check`] is Ok, 503 with the
/// reason otherwise.
pub struct Health {
    state: Mutex<State>,
}

type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

enum State {
    /// Setting up; what is missing.
    Waiting(String),
    /// Set up; ready while the check passes.
    Running(Check),
}

impl Health {
    /// Not ready until [`Health::ready_when`]: `missing` says what is not done yet.
    pub fn new(missing: impl Into<String>) -> Arc<Health> {
        Arc::new(Health {
            state: Mutex::new(State::Waiting(missing.into())),
        })
    }

    /// From now on ready whenever `check` passes (it runs at each probe: keep it cheap).
    pub fn ready_when(&self, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        *self.state.lock().unwrap() = State::Running(Box::new(check));
    }

    /// Ready from now on.
    pub fn ready(&self) {
        self.ready_when(|| Ok(()));
    }

    /// Not ready: Err says what is missing.
    pub fn check(&self) -> Result<(), String> {
        match &*self.state.lock().unwrap() {
            State::Waiting(missing) => Err(missing.clone()),
            State::Running(check) => check(),
        }
    }
}

/// One more of something that is open while this lives (a connection, a tunnel).
pub struct Active(Gauge);

impl Active {
    pub fn new(gauge: &Gauge) -> Active {
        gauge.inc();
        Active(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why an upstream connection attempt failed, as a label.
pub fn connect_error_reason(e: &std::io::Error) -> ConnectError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => ConnectError::Refused,
        ErrorKind::TimedOut => ConnectError::Timeout,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => ConnectError::Unreachable,
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                ConnectError::Unreachable
            }
            _ => ConnectError::Other,
        },
    }
}

label_values! {
    /// Why an upstream connection could not be made.
    pub enum ConnectError {
        Refused => "refused",
        Timeout => "timeout",
        Unreachable => "unreachable",
        Other => "other",
    }
}

/// Encodes `registry` as a scraper asked (`accept`: its Accept header): OpenMetrics when it
/// asks for it (Prometheus does), else the Prometheus text format (what promtool, curl and
/// most tools read). Returns the body and its content type.
pub fn encode(registry: &Registry, accept: &str) -> (String, &'static str) {
    let mut body = String::new();
    if accept.contains("application/openmetrics-text") {
        // Writing into a String cannot fail; a collector that fails leaves its part out.
        let _ = prometheus_client::encoding::text::encode(&mut body, registry);
        (
            body,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut body, registry);
        (
            body,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn parse(vars: &[(&str, &str)]) -> Config {
        let map = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config::parse(&map).unwrap()
    }

    fn redirect(dest: &str) -> Config {
        parse(&[
            ("EGRESS_SOURCE", "192.168.12.99"),
            ("EGRESS_GATEWAY", "192.168.12.1"),
            ("EGRESS_DESTINATION", dest),
        ])
    }

    #[test]
    fn the_address_is_an_ip_and_port_or_off() {
        assert_eq!(parse_address("off"), Ok(Listen::Off));
        assert_eq!(parse_address(" OFF "), Ok(Listen::Off));
        assert_eq!(
            parse_address("127.0.0.1:9999"),
            Ok(Listen::At("127.0.0.1:9999".parse().unwrap()))
        );
        assert!(parse_address("9190").is_err());
        assert!(parse_address("localhost:9190").is_err());
    }

    #[test]
    fn a_rule_on_the_default_port_turns_the_listener_off_and_an_explicit_one_is_refused() {
        let cfg = redirect("80 tcp 203.0.113.25\n9190 tcp 203.0.113.25");
        let taken = |p| port_taken(&cfg, None, p);
        assert_eq!(MetricsOptions::default().address(taken).unwrap(), None);
        let explicit = MetricsOptions {
            address: Some(Listen::At("0.0.0.0:9190".parse().unwrap())),
        };
        let err = explicit.address(taken).unwrap_err().to_string();
        assert!(
            err.contains("EGRESS_DESTINATION line 2") && err.contains("9190"),
            "{err}"
        );
        let other = MetricsOptions {
            address: Some(Listen::At("0.0.0.0:9191".parse().unwrap())),
        };
        assert_eq!(
            other.address(taken).unwrap(),
            Some("0.0.0.0:9191".parse().unwrap())
        );
    }

    #[test]
    fn only_tcp_rules_and_proxy_listeners_take_a_port() {
        let udp = redirect("9190 udp 203.0.113.25\n203.0.113.26");
        assert_eq!(port_taken(&udp, None, 9190), None, "UDP and the fallback");
        assert_eq!(
            MetricsOptions::default()
                .address(|p| port_taken(&udp, None, p))
                .unwrap(),
            Some(DEFAULT_ADDRESS)
        );
        let dns = parse(&[(
            "EGRESS_DNS_PROXY_DESTINATION",
            "53 10.0.0.1\n9190 db.example.com",
        )]);
        assert_eq!(
            port_taken(&dns, None, 9190).as_deref(),
            Some("a listener of EGRESS_DNS_PROXY_DESTINATION line 2")
        );
        let http = parse(&[("EGRESS_HTTP_PROXY_DESTINATION", "*")]);
        assert!(port_taken(&http, Some("0.0.0.0:9190".parse().unwrap()), 9190).is_some());
        assert_eq!(
            port_taken(&http, Some("0.0.0.0:8080".parse().unwrap()), 9190),
            None
        );
    }

    #[test]
    fn off_is_off() {
        let o = MetricsOptions {
            address: Some(Listen::Off),
        };
        assert_eq!(o.address(|_| Some("x".into())).unwrap(), None);
    }

    #[test]
    fn build_info_and_rule_counts_in_both_formats() {
        let mut r = registry(Role::HttpProxy);
        register_rule_counts(&mut r, &[("http_allow", 2), ("http_deny", 1)]);
        let (text, ct) = encode(&r, "*/*");
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(
            text.contains(&format!(
                "egress_router_build_info{{version=\"{}\",role=\"http-proxy\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("egress_router_configured_rules{kind=\"http_deny\"} 1\n"));
        assert!(!text.contains("# EOF"));
        let (om, ct) = encode(
            &r,
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        );
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn readiness_says_what_is_missing_until_the_check_passes() {
        let h = Health::new("listeners not bound yet");
        assert_eq!(h.check(), Err("listeners not bound yet".to_string()));
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = flag.clone();
        h.ready_when(move || {
            if f.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(())
            } else {
                Err("name x not resolved".into())
            }
        });
        assert_eq!(h.check(), Err("name x not resolved".to_string()));
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(h.check(), Ok(()));
    }

    #[test]
    fn connect_errors_by_reason() {
        use std::io::{Error, ErrorKind};
        let r = |e: Error| connect_error_reason(&e).as_str();
        assert_eq!(r(Error::from(ErrorKind::ConnectionRefused)), "refused");
        assert_eq!(r(Error::new(ErrorKind::TimedOut, "x")), "timeout");
        assert_eq!(
            r(Error::from_raw_os_error(libc::EHOSTUNREACH)),
            "unreachable"
        );
        assert_eq!(
            r(Error::from_raw_os_error(libc::ENETUNREACH)),
            "unreachable"
        );
        assert_eq!(r(Error::from_raw_os_error(libc::EADDRNOTAVAIL)), "other");
    }

    #[test]
    fn an_active_guard_counts_while_it_lives() {
        let g = Gauge::default();
        let a = Active::new(&g);
        let b = Active::new(&g);
        assert_eq!(g.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(g.get(), 0);
    }
}
