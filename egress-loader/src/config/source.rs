//! The single-value variables (EGRESS_ROUTER_MODE, EGRESS_SOURCE, EGRESS_GATEWAY, the proxy
//! modes and debug switches) and the whole-environment parse that ties everything together.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::Ipv4Net;

use super::{
    ConfigErrors,
    dns::parse_dns,
    http::parse_http,
    lines::{parse_ipv4, parse_prefix_len, show, unusable_target},
    redirect::parse_redirect,
    types::{Config, EgressSource, Mode},
};

const SOURCE_EXPECTED: &str = "expected A.B.C.D or A.B.C.D/len, such as 192.168.12.99/24";
const GATEWAY_EXPECTED: &str = "expected an IPv4 address A.B.C.D, such as 192.168.12.1";

impl Mode {
    /// The EGRESS_ROUTER_MODE value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Init => "init",
            Mode::Legacy => "legacy",
            Mode::HttpProxy => "http-proxy",
            Mode::DnsProxy => "dns-proxy",
            Mode::UnitTest => "unit-test",
        }
    }

    /// Parses an EGRESS_ROUTER_MODE value (exact, lowercase; surrounding blanks ignored).
    pub fn parse(text: &str) -> Option<Mode> {
        [
            Mode::Init,
            Mode::Legacy,
            Mode::HttpProxy,
            Mode::DnsProxy,
            Mode::UnitTest,
        ]
        .into_iter()
        .find(|m| text.trim() == m.as_str())
    }

    /// Init, legacy and unit-test: the modes that read EGRESS_DESTINATION.
    pub fn is_redirect(self) -> bool {
        matches!(self, Mode::Init | Mode::Legacy | Mode::UnitTest)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EgressSource {
    /// What proxy unit-test modes hold when EGRESS_SOURCE is not set (they set up nothing).
    pub const UNSET: EgressSource = EgressSource {
        addr: Ipv4Addr::UNSPECIFIED,
        net: match Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 32) {
            Ok(n) => n,
            Err(_) => panic!("/32 is a valid prefix"),
        },
    };

    /// False for [`EgressSource::UNSET`].
    pub fn is_set(&self) -> bool {
        !self.addr.is_unspecified()
    }
}

/// Why an address cannot be an interface address or a gateway (None when it can).
fn unusable_host(a: Ipv4Addr) -> Option<&'static str> {
    unusable_target(IpAddr::V4(a)).or(a.is_loopback().then_some("a loopback address"))
}

/// EGRESS_SOURCE: `A.B.C.D` (added as /32) or `A.B.C.D/len`.
pub fn parse_source(text: &str) -> Result<EgressSource, String> {
    let t = text.trim();
    let (addr, len) = match t.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (t, None),
    };
    let addr = parse_ipv4(addr)?;
    if let Some(why) = unusable_host(addr) {
        return Err(format!("{addr} is {why}, not an address for macvlan0"));
    }
    let len = len.map_or(Ok(32), |l| parse_prefix_len(l, 32))?;
    let net = Ipv4Net::new(addr, len).map_err(|e| e.to_string())?;
    Ok(EgressSource { addr, net })
}

/// EGRESS_GATEWAY: a bare IPv4 address.
pub fn parse_gateway(text: &str) -> Result<Ipv4Addr, String> {
    let t = text.trim();
    if t.contains('/') {
        return Err(format!(
            "'{}' has a prefix length: the gateway is a bare address",
            show(t)
        ));
    }
    let a = parse_ipv4(t)?;
    match unusable_host(a) {
        Some(why) => Err(format!("{a} is {why}, not a gateway")),
        None => Ok(a),
    }
}

/// Parses and validates every variable of the environment contract; on error, every problem.
pub fn parse_vars(vars: &BTreeMap<String, String>) -> Result<Config, ConfigErrors> {
    // Unset and empty mean the same, as `${VAR:-}` does in OpenShift's scripts.
    let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let mut errors = Vec::new();

    let mode = match get("EGRESS_ROUTER_MODE") {
        None => Some(Mode::Legacy),
        Some(v) => Mode::parse(v).or_else(|| {
            errors.push(format!(
                "Unrecognized EGRESS_ROUTER_MODE '{}' (expected init, legacy, http-proxy, \
                 dns-proxy or unit-test; unset means legacy)",
                show(v)
            ));
            None
        }),
    };

    let mut proxy_mode = |var: &str| match get(var) {
        None => false,
        Some(v) if v.trim() == "unit-test" => true,
        Some(v) => {
            errors.push(format!(
                "{var} '{}' is invalid (expected unit-test, or unset)",
                show(v)
            ));
            false
        }
    };
    let http_unit_test = proxy_mode("EGRESS_HTTP_PROXY_MODE");
    let dns_unit_test = proxy_mode("EGRESS_DNS_PROXY_MODE");
    let proxy_unit_test = match mode {
        Some(Mode::HttpProxy) => http_unit_test,
        Some(Mode::DnsProxy) => dns_unit_test,
        _ => false,
    };

    // Every mode sets up macvlan0 (or, in unit-test, prints rules that use EGRESS_SOURCE), except
    // the proxy unit-test modes, which only validate and print their rules: OpenShift's proxy
    // scripts never read EGRESS_SOURCE or EGRESS_GATEWAY. Given there, they are still checked.
    let need_network = !proxy_unit_test;
    let source = match get("EGRESS_SOURCE") {
        Some(v) => parse_source(v)
            .map_err(|why| {
                errors.push(format!(
                    "EGRESS_SOURCE unspecified or invalid: '{}': {why} ({SOURCE_EXPECTED})",
                    show(v)
                ))
            })
            .ok(),
        None if need_network => {
            errors.push(format!(
                "EGRESS_SOURCE unspecified or invalid: not set ({SOURCE_EXPECTED})"
            ));
            None
        }
        None => Some(EgressSource::UNSET),
    };
    let gateway = match get("EGRESS_GATEWAY") {
        Some(v) => parse_gateway(v)
            .map_err(|why| {
                errors.push(format!(
                    "EGRESS_GATEWAY unspecified or invalid: '{}': {why} ({GATEWAY_EXPECTED})",
                    show(v)
                ))
            })
            .ok(),
        None if need_network => {
            errors.push(format!(
                "EGRESS_GATEWAY unspecified or invalid: not set ({GATEWAY_EXPECTED})"
            ));
            None
        }
        None => Some(Ipv4Addr::UNSPECIFIED),
    };
    if let (Some(s), Some(g)) = (source, gateway)
        && s.is_set()
        && s.addr == g
    {
        errors.push(format!(
            "EGRESS_GATEWAY unspecified or invalid: '{g}': it is EGRESS_SOURCE itself \
             ({GATEWAY_EXPECTED}, the router of EGRESS_SOURCE's network)"
        ));
    }

    let mut redirect = None;
    let mut http = None;
    let mut dns = None;
    match mode {
        Some(m) if m.is_redirect() => match parse_redirect(get("EGRESS_DESTINATION")) {
            Ok(r) => redirect = Some(r),
            Err(mut e) => {
                if get("EGRESS_DESTINATION").is_none() {
                    let hint = [
                        ("EGRESS_HTTP_PROXY_DESTINATION", "http-proxy"),
                        ("EGRESS_DNS_PROXY_DESTINATION", "dns-proxy"),
                    ]
                    .into_iter()
                    .find(|(var, _)| get(var).is_some());
                    if let (Some((var, proxy)), Some(first)) = (hint, e.first_mut()) {
                        first.push_str(&format!(
                            "; {var} is set: for the proxy, set EGRESS_ROUTER_MODE={proxy} \
                             (EGRESS_ROUTER_MODE is {m})"
                        ));
                    }
                }
                errors.append(&mut e);
            }
        },
        Some(Mode::HttpProxy) => match parse_http(get("EGRESS_HTTP_PROXY_DESTINATION")) {
            Ok(r) => http = Some(r),
            Err(mut e) => errors.append(&mut e),
        },
        Some(Mode::DnsProxy) => match parse_dns(get("EGRESS_DNS_PROXY_DESTINATION")) {
            Ok(r) => dns = Some(r),
            Err(mut e) => errors.append(&mut e),
        },
        // An unknown mode: which rules it would read is unknown; the mode error says it all.
        _ => {}
    }

    match (mode, source, gateway) {
        (Some(mode), Some(source), Some(gateway)) if errors.is_empty() => Ok(Config {
            mode,
            source,
            gateway,
            debug: get("EGRESS_ROUTER_DEBUG").is_some(),
            redirect,
            http,
            dns,
            proxy_unit_test,
            dns_debug: get("EGRESS_DNS_PROXY_DEBUG").is_some(),
        }),
        _ => Err(ConfigErrors(errors)),
    }
}
