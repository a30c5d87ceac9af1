//! The parsed configuration: plain typed values, no globals. Parsing (in the sibling modules)
//! turns the OpenShift environment into these; the dataplane and the proxies take them as input.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{IpNet, Ipv4Net};

/// EGRESS_ROUTER_MODE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Set up, exit 0; the dataplane keeps working without the process.
    Init,
    /// Set up and stay until SIGTERM (the default).
    Legacy,
    HttpProxy,
    DnsProxy,
    /// Print what would be applied, change nothing.
    UnitTest,
}

/// Which container of OpenShift's pod specs this process is (SPEC section 9): the binary takes
/// the role from the environment the container has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The router image: `mode` says what it does. In http-proxy and dns-proxy it sets up
    /// macvlan0 and exits: it is the init container of the proxy pods.
    Router,
    /// A proxy image's container (egress-http-proxy or egress-dns-proxy, by `mode`), with only
    /// the proxy's variables: serves the rules through the route its init container set, as any
    /// non-root user without capabilities.
    Proxy,
    /// Both in one process, asked for explicitly (EGRESS_ONE_PROCESS with EGRESS_ROUTER_MODE
    /// http-proxy or dns-proxy): set up macvlan0, then serve.
    RouterAndProxy,
}

/// EGRESS_SOURCE: the address (the SNAT source) and the prefix it is added with (/32 when the
/// variable has no `/len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressSource {
    pub addr: Ipv4Addr,
    pub net: Ipv4Net,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// One `<localport> <proto> <ip> [<remoteport>]` line of EGRESS_DESTINATION.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectRule {
    pub local_port: u16,
    pub protocol: Protocol,
    pub destination: IpAddr,
    /// Equal to `local_port` when the line has no remote port.
    pub remote_port: u16,
    /// 1-based line number in the variable, for messages.
    pub line: usize,
}

/// EGRESS_DESTINATION parsed: rules in order and the optional fallback (last line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    pub rules: Vec<RedirectRule>,
    pub fallback: Option<IpAddr>,
}

/// What an EGRESS_HTTP_PROXY_DESTINATION line matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpMatch {
    /// `example.com`: exactly that host (lowercase, no trailing dot).
    Host(String),
    /// `*.example.com`: the domain (stored without `*.`, lowercase) and every subdomain.
    Domain(String),
    /// `192.168.1.1`, `192.168.1.0/24`, `fe80::/10` (a bare address is a /32 or /128).
    Net(IpNet),
    /// `*`: everything; only as the last rule.
    Any,
}

/// One line of EGRESS_HTTP_PROXY_DESTINATION: `[!]<match>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRule {
    pub allow: bool,
    pub matcher: HttpMatch,
    /// The line as written (trimmed), for 403 bodies and logs.
    pub text: String,
    pub line: usize,
}

/// Where an EGRESS_DNS_PROXY_DESTINATION line forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsTarget {
    Addr(IpAddr),
    /// A DNS name (contains a dot), lowercase, no trailing dot; re-resolved while running.
    Name(String),
}

/// One `<localport> <ip or name> [<remoteport>]` line of EGRESS_DNS_PROXY_DESTINATION.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsRule {
    pub local_port: u16,
    pub target: DnsTarget,
    /// Equal to `local_port` when the line has no remote port.
    pub remote_port: u16,
    pub line: usize,
}

/// The whole validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub role: Role,
    /// EGRESS_ROUTER_MODE in the router roles; which proxy (HttpProxy or DnsProxy) in the
    /// proxy role.
    pub mode: Mode,
    pub source: EgressSource,
    pub gateway: Ipv4Addr,
    pub debug: bool,
    /// Set in redirect modes (init, legacy, unit-test).
    pub redirect: Option<RedirectConfig>,
    /// Set in http-proxy mode when EGRESS_HTTP_PROXY_DESTINATION is (always when serving).
    pub http: Option<Vec<HttpRule>>,
    /// Set in dns-proxy mode when EGRESS_DNS_PROXY_DESTINATION is (always when serving).
    pub dns: Option<Vec<DnsRule>>,
    /// EGRESS_DNS_SERVERS (`name:count;...`): how many addresses each name of the DNS rules
    /// has, standing in for the lookups OpenShift's image makes to write `server-template`
    /// lines; only the printed HAProxy configuration uses it.
    pub dns_server_counts: BTreeMap<String, u32>,
    /// EGRESS_HTTP_PROXY_MODE / EGRESS_DNS_PROXY_MODE = unit-test.
    pub proxy_unit_test: bool,
    /// EGRESS_DNS_PROXY_DEBUG.
    pub dns_debug: bool,
}
