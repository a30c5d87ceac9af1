//! The single-value variables (EGRESS_ROUTER_MODE, EGRESS_SOURCE, EGRESS_GATEWAY, the proxy
//! modes and debug switches) and the whole-environment parse that ties everything together.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::Ipv4Net;

use super::{
    ConfigError, ConfigErrors,
    dns::parse_dns,
    http::parse_http,
    lines::{parse_ipv4, parse_prefix_len, rule_lines, show, unusable_target},
    redirect::parse_redirect,
    types::{Config, EgressSource, Mode, Protocol, RedirectConfig, Role},
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

/// The proxy image variables of each proxy mode (the destination, then the unit-test switch).
const HTTP_VARS: [&str; 2] = ["EGRESS_HTTP_PROXY_DESTINATION", "EGRESS_HTTP_PROXY_MODE"];
const DNS_VARS: [&str; 2] = ["EGRESS_DNS_PROXY_DESTINATION", "EGRESS_DNS_PROXY_MODE"];

/// Which container this is (SPEC section 9), from the variables it was given: a set
/// EGRESS_ROUTER_MODE is the router image; without it, a proxy image's variables are that proxy's
/// container, and nothing is the router in legacy mode (OpenShift's default).
fn role<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
    errors: &mut Vec<ConfigError>,
) -> Option<(Role, Mode)> {
    let one_process = match get("EGRESS_ONE_PROCESS").map(str::trim) {
        None | Some("false" | "0" | "no") => false,
        Some("true" | "1" | "yes") => true,
        Some(v) => {
            errors.push(ConfigError::ours(format!(
                "EGRESS_ONE_PROCESS '{}' is invalid (expected true or false)",
                show(v)
            )));
            false
        }
    };
    let http = HTTP_VARS.iter().any(|v| get(v).is_some());
    let dns = DNS_VARS.iter().any(|v| get(v).is_some());
    let unit_test = |var: &str| get(var).is_some_and(|v| v.trim() == "unit-test");
    let Some(v) = get("EGRESS_ROUTER_MODE") else {
        if one_process {
            errors.push(ConfigError::ours(
                "EGRESS_ONE_PROCESS is set but EGRESS_ROUTER_MODE is not: the one-process form \
                 is EGRESS_ROUTER_MODE=http-proxy or dns-proxy with EGRESS_ONE_PROCESS=true",
            ));
            return None;
        }
        let proxy = match (http, dns) {
            (false, false) => return Some((Role::Router, Mode::Legacy)),
            (true, true) => {
                errors.push(ConfigError::ours(
                    "both HTTP proxy (EGRESS_HTTP_PROXY_*) and DNS proxy (EGRESS_DNS_PROXY_*) \
                     variables are set and EGRESS_ROUTER_MODE is not: a proxy container runs one \
                     of them",
                ));
                return None;
            }
            (true, false) => Mode::HttpProxy,
            (false, true) => Mode::DnsProxy,
        };
        if get("EGRESS_DESTINATION").is_some() {
            errors.push(ConfigError::ours(format!(
                "EGRESS_ROUTER_MODE is unset and both EGRESS_DESTINATION (the router in legacy \
                 mode) and {} (the {proxy} container) are set: set EGRESS_ROUTER_MODE for the \
                 router, or leave EGRESS_DESTINATION out of the proxy container",
                if proxy == Mode::HttpProxy {
                    "EGRESS_HTTP_PROXY_*"
                } else {
                    "EGRESS_DNS_PROXY_*"
                }
            )));
            return None;
        }
        return Some((Role::Proxy, proxy));
    };
    let Some(mode) = Mode::parse(v) else {
        errors.push(ConfigError::new(
            format!(
                "Unrecognized EGRESS_ROUTER_MODE '{}' (expected init, legacy, http-proxy, \
                 dns-proxy or unit-test; unset means legacy)",
                show(v)
            ),
            format!("Unrecognized EGRESS_ROUTER_MODE '{v}'"),
        ));
        return None;
    };
    let proxy_unit_test = match mode {
        Mode::HttpProxy => unit_test(HTTP_VARS[1]),
        Mode::DnsProxy => unit_test(DNS_VARS[1]),
        _ => false,
    };
    Some(match mode {
        // The proxy image's unit-test mode prints the proxy's configuration, whichever
        // container it is given to.
        _ if proxy_unit_test => (Role::Proxy, mode),
        Mode::HttpProxy | Mode::DnsProxy if one_process => (Role::RouterAndProxy, mode),
        _ if one_process => {
            errors.push(ConfigError::ours(format!(
                "EGRESS_ONE_PROCESS applies to EGRESS_ROUTER_MODE http-proxy and dns-proxy, not \
                 {mode}"
            )));
            return None;
        }
        _ => (Role::Router, mode),
    })
}

/// EGRESS_DNS_SERVERS: `name:count` entries separated by `;` or blanks.
fn parse_dns_servers(value: &str) -> Result<BTreeMap<String, u32>, ConfigError> {
    let mut counts = BTreeMap::new();
    for entry in value
        .split(|c: char| c == ';' || c.is_ascii_whitespace())
        .filter(|e| !e.is_empty())
    {
        let openshift = format!("Invalid server entry in EGRESS_DNS_SERVERS: {entry}");
        let bad = |why: &str| {
            ConfigError::new(
                format!(
                    "EGRESS_DNS_SERVERS: '{}': {openshift}: {why} (expected <name>:<count>;...)",
                    show(entry)
                ),
                openshift.clone(),
            )
        };
        match entry.split(':').collect::<Vec<_>>().as_slice() {
            [name, count] => {
                let count = count
                    .parse::<u32>()
                    .map_err(|_| bad("the count is not a whole number"))?;
                counts.insert(name.to_string(), count);
            }
            _ => return Err(bad("one ':' between the name and the count")),
        }
    }
    Ok(counts)
}

/// OpenShift's router image has no SCTP, and its unit-test mode prints that image's nftables
/// rules: an SCTP rule is refused there as the image refuses it (init and legacy accept it).
fn refuse_sctp_in_unit_test(value: &str, rules: &RedirectConfig) -> Vec<ConfigError> {
    rules
        .rules
        .iter()
        .filter(|r| r.protocol == Protocol::Sctp)
        .map(|r| {
            let text = rule_lines(value)
                .find(|l| l.number == r.line)
                .map(|l| show(l.text))
                .unwrap_or_default();
            let openshift = format!("EGRESS_DESTINATION value '{text}' is invalid");
            ConfigError::new(
                format!(
                    "EGRESS_DESTINATION line {}: '{text}': {openshift}: OpenShift's router image \
                     has no SCTP, and unit-test mode prints that image's nftables rules (init and \
                     legacy accept SCTP rules; `egress-router check` shows them)",
                    r.line
                ),
                openshift,
            )
        })
        .collect()
}

/// A variable's value; unset and empty mean the same, as `${VAR:-}` does in OpenShift's scripts.
fn lookup<'a>(vars: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    vars.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

/// Parses and validates every variable of the environment contract; on error, every problem.
pub fn parse_vars(vars: &BTreeMap<String, String>) -> Result<Config, ConfigErrors> {
    let get = |k: &str| lookup(vars, k);
    let mut errors = Vec::new();
    let role_mode = role(get, &mut errors);

    let mut proxy_mode = |var: &str| match get(var) {
        None => false,
        Some(v) if v.trim() == "unit-test" => true,
        Some(v) => {
            errors.push(ConfigError::ours(format!(
                "{var} '{}' is invalid (expected unit-test, or unset)",
                show(v)
            )));
            false
        }
    };
    let http_unit_test = proxy_mode(HTTP_VARS[1]);
    let dns_unit_test = proxy_mode(DNS_VARS[1]);
    let proxy_unit_test = match role_mode {
        Some((_, Mode::HttpProxy)) => http_unit_test,
        Some((_, Mode::DnsProxy)) => dns_unit_test,
        _ => false,
    };

    // The router roles set up macvlan0 (or, in unit-test, print rules that use EGRESS_SOURCE).
    // A proxy container only serves (or prints) its rules: OpenShift's proxy images never read
    // EGRESS_SOURCE or EGRESS_GATEWAY. Given there, they are still checked (the proxy then
    // binds its upstream connections to EGRESS_SOURCE).
    let need_network = match role_mode {
        Some((role, _)) => role != Role::Proxy,
        // The role is unknown: only a set EGRESS_ROUTER_MODE says a router was meant.
        None => get("EGRESS_ROUTER_MODE").is_some(),
    };
    let source = match get("EGRESS_SOURCE") {
        Some(v) => parse_source(v)
            .map_err(|why| {
                errors.push(ConfigError::new(
                    format!(
                        "EGRESS_SOURCE unspecified or invalid: '{}': {why} ({SOURCE_EXPECTED})",
                        show(v)
                    ),
                    "EGRESS_SOURCE unspecified or invalid",
                ))
            })
            .ok(),
        None if need_network => {
            errors.push(ConfigError::new(
                format!("EGRESS_SOURCE unspecified or invalid: not set ({SOURCE_EXPECTED})"),
                "EGRESS_SOURCE unspecified or invalid",
            ));
            None
        }
        None => Some(EgressSource::UNSET),
    };
    let gateway = match get("EGRESS_GATEWAY") {
        Some(v) => parse_gateway(v)
            .map_err(|why| {
                errors.push(ConfigError::new(
                    format!(
                        "EGRESS_GATEWAY unspecified or invalid: '{}': {why} ({GATEWAY_EXPECTED})",
                        show(v)
                    ),
                    "EGRESS_GATEWAY unspecified or invalid",
                ))
            })
            .ok(),
        None if need_network => {
            errors.push(ConfigError::new(
                format!("EGRESS_GATEWAY unspecified or invalid: not set ({GATEWAY_EXPECTED})"),
                "EGRESS_GATEWAY unspecified or invalid",
            ));
            None
        }
        None => Some(Ipv4Addr::UNSPECIFIED),
    };
    if let (Some(s), Some(g)) = (source, gateway)
        && s.is_set()
        && s.addr == g
    {
        errors.push(ConfigError::new(
            format!(
                "EGRESS_GATEWAY unspecified or invalid: '{g}': it is EGRESS_SOURCE itself \
                 ({GATEWAY_EXPECTED}, the router of EGRESS_SOURCE's network)"
            ),
            "EGRESS_GATEWAY unspecified or invalid",
        ));
    }

    let mut redirect = None;
    let mut http = None;
    let mut dns = None;
    // The proxy rules are required where they are served or printed, and checked wherever
    // they are given (the router's init container ignores them, as OpenShift's does, but a
    // mistake in them is still reported).
    let serves = !matches!(role_mode, Some((Role::Router, _)));
    let proxy_rules = |var: &str| get(var).is_some() || serves || proxy_unit_test;
    match role_mode {
        Some((_, m)) if m.is_redirect() => match parse_redirect(get("EGRESS_DESTINATION")) {
            Ok(r) => {
                if m == Mode::UnitTest {
                    errors.append(&mut refuse_sctp_in_unit_test(
                        get("EGRESS_DESTINATION").unwrap_or_default(),
                        &r,
                    ));
                }
                redirect = Some(r)
            }
            Err(mut e) => {
                if get("EGRESS_DESTINATION").is_none() {
                    let hint = [(HTTP_VARS[0], "http-proxy"), (DNS_VARS[0], "dns-proxy")]
                        .into_iter()
                        .find(|(var, _)| get(var).is_some());
                    if let (Some((var, proxy)), Some(first)) = (hint, e.first_mut()) {
                        first.message.push_str(&format!(
                            "; {var} is set: for the {proxy} container, leave \
                             EGRESS_ROUTER_MODE unset; for its init container, set \
                             EGRESS_ROUTER_MODE={proxy} (EGRESS_ROUTER_MODE is {m})"
                        ));
                    }
                }
                errors.append(&mut e);
            }
        },
        Some((_, Mode::HttpProxy)) if proxy_rules(HTTP_VARS[0]) => {
            match parse_http(get(HTTP_VARS[0])) {
                Ok(r) => http = Some(r),
                Err(mut e) => errors.append(&mut e),
            }
        }
        Some((_, Mode::DnsProxy)) if proxy_rules(DNS_VARS[0]) => {
            match parse_dns(get(DNS_VARS[0])) {
                Ok(r) => dns = Some(r),
                Err(mut e) => errors.append(&mut e),
            }
        }
        // An unknown mode or role: which rules it would read is unknown; its error says it all.
        _ => {}
    }
    // OpenShift's DNS image reads EGRESS_DNS_SERVERS before it looks at the rules: an invalid
    // entry comes first.
    let dns_server_counts = match get("EGRESS_DNS_SERVERS").map(parse_dns_servers) {
        None => BTreeMap::new(),
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            errors.insert(0, e);
            BTreeMap::new()
        }
    };

    match (role_mode, source, gateway) {
        (Some((role, mode)), Some(source), Some(gateway)) if errors.is_empty() => Ok(Config {
            role,
            mode,
            source,
            gateway,
            debug: get("EGRESS_ROUTER_DEBUG").is_some(),
            redirect,
            http,
            dns,
            dns_server_counts,
            proxy_unit_test,
            dns_debug: get("EGRESS_DNS_PROXY_DEBUG").is_some(),
        }),
        _ => Err(ConfigErrors(errors)),
    }
}
