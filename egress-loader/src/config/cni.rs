//! The network configuration of the `egress-router` CNI plugin (OpenShift 4.x), as the cluster
//! network operator renders it into the NetworkAttachmentDefinition:
//!
//! ```json
//! { "cniVersion": "0.4.0", "type": "egress-router", "name": "egress-router-cni-nad",
//!   "ip": { "addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1",
//!           "destinations": ["80 UDP 10.100.3.0", "8443 TCP 203.0.113.27 443"],
//!           "fallbackIP": "203.0.113.30" },
//!   "interfaceType": "macvlan", "interfaceArgs": { "master": "ens4", "mode": "bridge", "mtu": "1500" },
//!   "log_file": "/tmp/egress-router-log", "log_level": "debug" }
//! ```
//!
//! Pure like the rest of `config`: the plugin-specific keys of the JSON in, the typed
//! configuration or every problem out, each naming the field (`ip.destinations[1]`), the value
//! and what was expected, with the CNI error code it is reported under. The rules go through the
//! EGRESS_DESTINATION parser (one element a line, `ip.fallbackIP` a last line), so they mean
//! and say the same.
use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf};

use serde_json::Value;

use super::{
    ConfigError, EgressSource, RedirectConfig,
    lines::{parse_ip, show},
    redirect::parse_redirect_at,
    source::{parse_gateway, parse_source},
};

/// CNI error code 2: a field the plugin does not support.
pub const UNSUPPORTED_FIELD: u32 = 2;
/// CNI error code 7: an invalid network configuration.
pub const INVALID_CONFIG: u32 = 7;

const SOURCE_EXPECTED: &str = "expected A.B.C.D/len or A.B.C.D, such as 192.168.12.99/24";
const GATEWAY_EXPECTED: &str = "expected an IPv4 address A.B.C.D, such as 192.168.12.1";

/// macvlan modes (`interfaceArgs.mode`), as `ip link` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacvlanMode {
    Private,
    Vepa,
    Bridge,
    Passthru,
}

impl MacvlanMode {
    const ALL: [MacvlanMode; 4] = [
        MacvlanMode::Bridge,
        MacvlanMode::Private,
        MacvlanMode::Vepa,
        MacvlanMode::Passthru,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MacvlanMode::Private => "private",
            MacvlanMode::Vepa => "vepa",
            MacvlanMode::Bridge => "bridge",
            MacvlanMode::Passthru => "passthru",
        }
    }
}

/// `log_level`: the upstream plugin's levels (`panic`, `error`, `verbose`, `debug`) and the
/// usual ones, as the `tracing` filter they mean.
fn log_filter(level: &str) -> Option<&'static str> {
    Some(match level.to_ascii_lowercase().as_str() {
        "panic" | "error" => "error",
        "warn" | "warning" => "warn",
        "verbose" | "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        _ => return None,
    })
}

/// The plugin's configuration, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniConfig {
    /// `ip.addresses[0]`: the egress address and the prefix it is added with.
    pub source: EgressSource,
    /// `ip.gateway`.
    pub gateway: Ipv4Addr,
    /// `ip.destinations` and `ip.fallbackIP`.
    pub redirect: RedirectConfig,
    /// `interfaceArgs.master`; None: the interface of the host's default route.
    pub master: Option<String>,
    /// `interfaceArgs.mode`, bridge by default.
    pub mode: MacvlanMode,
    /// `interfaceArgs.mtu`; None: the master's.
    pub mtu: Option<u32>,
    /// `log_file`; None: stderr (which the runtime logs).
    pub log_file: Option<PathBuf>,
    /// `log_level` as a `tracing` filter (`info` when absent).
    pub log_filter: &'static str,
}

/// One problem in the configuration: the CNI error code it is reported under and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniProblem {
    pub code: u32,
    pub message: String,
}

impl CniProblem {
    fn invalid(message: impl Into<String>) -> CniProblem {
        CniProblem {
            code: INVALID_CONFIG,
            message: message.into(),
        }
    }

    fn unsupported(message: impl Into<String>) -> CniProblem {
        CniProblem {
            code: UNSUPPORTED_FIELD,
            message: message.into(),
        }
    }
}

/// Keys of the upstream plugin that this one does not implement (it reads the pod's addresses
/// from a ConfigMap or per pod name); refused rather than ignored.
const UPSTREAM_ONLY: [(&str, &str); 2] = [
    ("podIP", "per-pod addresses"),
    ("ipConfig", "addresses read from a ConfigMap"),
];

/// A short name of a JSON value's type, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A string field, or a problem naming it.
fn string<'a>(field: &str, v: &'a Value, errors: &mut Vec<CniProblem>) -> Option<&'a str> {
    match v {
        Value::String(s) => Some(s),
        other => {
            errors.push(CniProblem::invalid(format!(
                "{field} must be a string, not {} ({other})",
                kind(other)
            )));
            None
        }
    }
}

/// An array of strings, or a problem naming the field or the element.
fn strings<'a>(field: &str, v: &'a Value, errors: &mut Vec<CniProblem>) -> Option<Vec<&'a str>> {
    let Value::Array(items) = v else {
        errors.push(CniProblem::invalid(format!(
            "{field} must be an array of strings, not {} ({v})",
            kind(v)
        )));
        return None;
    };
    let before = errors.len();
    let out: Vec<&str> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| string(&format!("{field}[{i}]"), item, errors))
        .collect();
    (errors.len() == before).then_some(out)
}

/// Parses the plugin's keys of the network configuration (`custom`: every key but the CNI
/// spec's own, as the runtime passed them). On error, every problem found.
pub fn parse_cni(custom: &HashMap<String, Value>) -> Result<CniConfig, Vec<CniProblem>> {
    let mut errors = Vec::new();
    for (key, what) in UPSTREAM_ONLY {
        if custom.contains_key(key) {
            errors.push(CniProblem::unsupported(format!(
                "{key} is not supported by this egress-router ({what}, an option of the upstream \
                 plugin that the cluster network operator never renders): give the address in \
                 ip.addresses"
            )));
        }
    }
    let (source, gateway, redirect) = match custom.get("ip") {
        None | Some(Value::Null) => {
            errors.push(CniProblem::invalid(
                "ip is missing: the egress router needs ip.addresses (its egress address) and \
                 ip.gateway",
            ));
            (None, None, None)
        }
        Some(Value::Object(ip)) => parse_ip_section(ip, &mut errors),
        Some(other) => {
            errors.push(CniProblem::invalid(format!(
                "ip must be an object with addresses, gateway and destinations, not {}",
                kind(other)
            )));
            (None, None, None)
        }
    };
    match custom.get("interfaceType") {
        None | Some(Value::Null) => {}
        Some(v) => {
            if let Some(t) = string("interfaceType", v, &mut errors)
                && !t.is_empty()
                && t != "macvlan"
            {
                errors.push(CniProblem::unsupported(format!(
                    "interfaceType '{}' is not supported: this egress-router creates a macvlan \
                     interface (interfaceType macvlan, the default)",
                    show(t)
                )));
            }
        }
    }
    let (master, mode, mtu) = match custom.get("interfaceArgs") {
        None | Some(Value::Null) => (None, MacvlanMode::Bridge, None),
        Some(Value::Object(args)) => parse_interface_args(args, &mut errors),
        Some(other) => {
            errors.push(CniProblem::invalid(format!(
                "interfaceArgs must be an object (master, mode, mtu), not {}",
                kind(other)
            )));
            (None, MacvlanMode::Bridge, None)
        }
    };
    let log_file = match custom.get("log_file") {
        None | Some(Value::Null) => None,
        Some(v) => match string("log_file", v, &mut errors) {
            Some("") => None,
            Some(p) if !p.starts_with('/') => {
                errors.push(CniProblem::invalid(format!(
                    "log_file '{}' is not an absolute path (the plugin runs with the \
                     runtime's working directory)",
                    show(p)
                )));
                None
            }
            Some(p) => Some(PathBuf::from(p)),
            None => None,
        },
    };
    let log_filter = match custom.get("log_level") {
        None | Some(Value::Null) => "info",
        Some(v) => match string("log_level", v, &mut errors) {
            Some("") | None => "info",
            Some(l) => log_filter(l).unwrap_or_else(|| {
                errors.push(CniProblem::invalid(format!(
                    "log_level '{}' is invalid (expected panic, error, warn, verbose, info, \
                     debug or trace)",
                    show(l)
                )));
                "info"
            }),
        },
    };
    match (source, gateway, redirect) {
        (Some(source), Some(gateway), Some(redirect)) if errors.is_empty() => Ok(CniConfig {
            source,
            gateway,
            redirect,
            master,
            mode,
            mtu,
            log_file,
            log_filter,
        }),
        _ => Err(errors),
    }
}

type IpSection = (
    Option<EgressSource>,
    Option<Ipv4Addr>,
    Option<RedirectConfig>,
);

fn parse_ip_section(
    ip: &serde_json::Map<String, Value>,
    errors: &mut Vec<CniProblem>,
) -> IpSection {
    for key in ip.keys() {
        if !matches!(
            key.as_str(),
            "addresses" | "gateway" | "destinations" | "fallbackIP"
        ) {
            let hint = if key.eq_ignore_ascii_case("fallbackip") {
                " (did you mean fallbackIP?)"
            } else {
                ""
            };
            errors.push(CniProblem::unsupported(format!(
                "ip.{} is not a field of ip (addresses, gateway, destinations, fallbackIP){hint}",
                show(key)
            )));
        }
    }
    let source = match ip.get("addresses") {
        None | Some(Value::Null) => {
            errors.push(CniProblem::invalid(format!(
                "ip.addresses is missing: the egress address goes there ({SOURCE_EXPECTED})"
            )));
            None
        }
        Some(v) => match strings("ip.addresses", v, errors).as_deref() {
            Some([]) => {
                errors.push(CniProblem::invalid(format!(
                    "ip.addresses is empty: the egress address goes there ({SOURCE_EXPECTED})"
                )));
                None
            }
            Some([one]) => parse_source(one)
                .map_err(|why| {
                    errors.push(CniProblem::invalid(format!(
                        "ip.addresses[0] '{}' is invalid: {why} ({SOURCE_EXPECTED})",
                        show(one)
                    )))
                })
                .ok(),
            Some(many) => {
                errors.push(CniProblem::unsupported(format!(
                    "ip.addresses has {} addresses ({}): the egress router has one egress \
                     address, the one its rules translate to",
                    many.len(),
                    many.iter().map(|a| show(a)).collect::<Vec<_>>().join(", ")
                )));
                None
            }
            None => None,
        },
    };
    let gateway = match ip.get("gateway") {
        None | Some(Value::Null) => {
            errors.push(CniProblem::invalid(format!(
                "ip.gateway is missing: the default route goes through it ({GATEWAY_EXPECTED})"
            )));
            None
        }
        Some(v) => string("ip.gateway", v, errors).and_then(|g| {
            parse_gateway(g)
                .map_err(|why| {
                    errors.push(CniProblem::invalid(format!(
                        "ip.gateway '{}' is invalid: {why} ({GATEWAY_EXPECTED})",
                        show(g)
                    )))
                })
                .ok()
        }),
    };
    if let (Some(s), Some(g)) = (source, gateway)
        && s.addr == g
    {
        errors.push(CniProblem::invalid(format!(
            "ip.gateway {g} is the egress address ip.addresses[0] itself"
        )));
    }
    let destinations = match ip.get("destinations") {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(v) => strings("ip.destinations", v, errors),
    };
    let fallback = match ip.get("fallbackIP") {
        None | Some(Value::Null) => Some(None),
        Some(v) => match string("ip.fallbackIP", v, errors) {
            Some(f) if f.trim().is_empty() => Some(None),
            Some(f) => match parse_ip(f.trim()) {
                Ok(_) => Some(Some(f.trim())),
                Err(why) => {
                    errors.push(CniProblem::invalid(format!(
                        "ip.fallbackIP '{}' is invalid: {why} (expected a bare IPv4 address, \
                         where everything no rule matches goes)",
                        show(f)
                    )));
                    None
                }
            },
            None => None,
        },
    };
    let redirect = match (destinations, fallback) {
        (Some(d), Some(f)) => parse_rules(&d, f, errors),
        _ => None,
    };
    (source, gateway, redirect)
}

/// The rules: each element of `ip.destinations` a line of EGRESS_DESTINATION, `ip.fallbackIP`
/// the last one.
fn parse_rules(
    destinations: &[&str],
    fallback: Option<&str>,
    errors: &mut Vec<CniProblem>,
) -> Option<RedirectConfig> {
    let mut ok = true;
    for (i, d) in destinations.iter().enumerate() {
        if d.contains(['\n', '\r']) {
            errors.push(CniProblem::invalid(format!(
                "ip.destinations[{i}] '{}' has a line break: one rule an element",
                show(d)
            )));
            ok = false;
        } else if d.trim().is_empty() {
            errors.push(CniProblem::invalid(format!(
                "ip.destinations[{i}] is empty (expected <port> <tcp|udp|sctp> <ip> \
                 [<remoteport>] or a fallback <ip>)"
            )));
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let lines: Vec<&str> = destinations.iter().copied().chain(fallback).collect();
    if lines.is_empty() {
        return Some(RedirectConfig::default());
    }
    let n = destinations.len();
    let place = move |line: usize| {
        if line > n {
            "ip.fallbackIP".to_string()
        } else {
            format!("ip.destinations[{}]", line - 1)
        }
    };
    parse_redirect_at(Some(&lines.join("\n")), &place)
        .map_err(|es: Vec<ConfigError>| {
            errors.extend(es.into_iter().map(|e| CniProblem::invalid(e.message)));
        })
        .ok()
}

fn parse_interface_args(
    args: &serde_json::Map<String, Value>,
    errors: &mut Vec<CniProblem>,
) -> (Option<String>, MacvlanMode, Option<u32>) {
    for key in args.keys() {
        if !matches!(key.as_str(), "master" | "mode" | "mtu") {
            errors.push(CniProblem::unsupported(format!(
                "interfaceArgs.{} is not supported (master, mode and mtu are)",
                show(key)
            )));
        }
    }
    let master = match args.get("master") {
        None | Some(Value::Null) => None,
        Some(v) => match string("interfaceArgs.master", v, errors) {
            Some("") | None => None,
            Some(m) if m.len() > 15 || m.contains(['/', ' ', '\t', '\n', ':']) || m == "." => {
                errors.push(CniProblem::invalid(format!(
                    "interfaceArgs.master '{}' is not an interface name (at most 15 characters, \
                     no '/', ':' or blanks)",
                    show(m)
                )));
                None
            }
            Some(m) => Some(m.to_string()),
        },
    };
    let mode = match args.get("mode") {
        None | Some(Value::Null) => MacvlanMode::Bridge,
        Some(v) => match string("interfaceArgs.mode", v, errors) {
            Some("") | None => MacvlanMode::Bridge,
            Some(m) => MacvlanMode::ALL
                .into_iter()
                .find(|x| x.as_str() == m)
                .unwrap_or_else(|| {
                    errors.push(CniProblem::invalid(format!(
                        "interfaceArgs.mode '{}' is not a macvlan mode (expected bridge, \
                         private, vepa or passthru)",
                        show(m)
                    )));
                    MacvlanMode::Bridge
                }),
        },
    };
    let mtu_text = match args.get("mtu") {
        None | Some(Value::Null) => None,
        // The upstream plugin's interfaceArgs are strings; a number means the same.
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(v) => string("interfaceArgs.mtu", v, errors).map(str::to_string),
    };
    let mtu = match mtu_text.as_deref() {
        None | Some("") => None,
        Some(t) => match t.parse::<u32>() {
            Ok(m) if (68..=65535).contains(&m) => Some(m),
            _ => {
                errors.push(CniProblem::invalid(format!(
                    "interfaceArgs.mtu '{}' is invalid (expected a number from 68 to 65535, at \
                     most the master's MTU; leave it out for the master's)",
                    show(t)
                )));
                None
            }
        },
    };
    (master, mode, mtu)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn parse(json: &str) -> Result<CniConfig, Vec<CniProblem>> {
        let map: HashMap<String, Value> = serde_json::from_str(json).unwrap();
        parse_cni(&map)
    }

    fn problems(json: &str) -> Vec<(u32, String)> {
        parse(json)
            .expect_err("must be refused")
            .into_iter()
            .map(|p| (p.code, p.message))
            .collect()
    }

    #[test]
    fn the_operator_rendered_config_is_read_whole() {
        let cfg = parse(
            r#"{"ip": {"addresses": ["192.168.3.10/24"],
                       "destinations": ["80 UDP 10.100.3.0", "8443 TCP 203.0.113.27 443"],
                       "fallbackIP": "203.0.113.30", "gateway": "192.168.3.1"},
                "log_file": "/tmp/egress-router-log", "log_level": "debug"}"#,
        )
        .unwrap();
        assert_eq!(cfg.source.addr, Ipv4Addr::new(192, 168, 3, 10));
        assert_eq!(cfg.source.net.prefix_len(), 24);
        assert_eq!(cfg.gateway, Ipv4Addr::new(192, 168, 3, 1));
        assert_eq!(cfg.redirect.rules.len(), 2);
        assert_eq!(cfg.redirect.rules[1].remote_port, 443);
        assert_eq!(
            cfg.redirect.fallback,
            Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 30)))
        );
        assert_eq!(cfg.log_filter, "debug");
        assert_eq!(cfg.log_file, Some(PathBuf::from("/tmp/egress-router-log")));
        assert_eq!(
            (cfg.master, cfg.mode, cfg.mtu),
            (None, MacvlanMode::Bridge, None)
        );
    }

    #[test]
    fn interface_args_as_the_upstream_plugin_writes_them() {
        let cfg = parse(
            r#"{"ip": {"addresses": ["192.168.3.10"], "gateway": "192.168.3.1"},
                "interfaceType": "macvlan",
                "interfaceArgs": {"master": "ens4", "mode": "private", "mtu": "1400"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.source.net.prefix_len(), 32);
        assert_eq!(cfg.master.as_deref(), Some("ens4"));
        assert_eq!(cfg.mode, MacvlanMode::Private);
        assert_eq!(cfg.mtu, Some(1400));
        assert!(cfg.redirect.rules.is_empty() && cfg.redirect.fallback.is_none());
    }

    #[test]
    fn rule_errors_name_the_element_and_keep_the_openshift_wording() {
        let p = problems(
            r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1",
                       "destinations": ["80 tcp 10.0.0.1", "70000 tcp 10.0.0.2"]}}"#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, INVALID_CONFIG);
        assert!(
            p[0].1
                .starts_with("ip.destinations[1]: '70000 tcp 10.0.0.2': ")
                && p[0]
                    .1
                    .contains("Invalid port: 70000, must be in the range 1 to 65535"),
            "{p:?}"
        );
    }

    #[test]
    fn a_fallback_in_both_places_is_named_as_fallbackip() {
        let p = problems(
            r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1",
                       "destinations": ["203.0.113.9"], "fallbackIP": "203.0.113.10"}}"#,
        );
        assert!(
            p[0].1.starts_with("ip.fallbackIP: '203.0.113.10': ")
                && p[0].1.contains("fallback IP must be the last line"),
            "{p:?}"
        );
    }

    #[test]
    fn every_field_names_itself() {
        let cases: &[(&str, u32, &str)] = &[
            (r#"{}"#, 7, "ip is missing"),
            (
                r#"{"ip": {"gateway": "192.168.3.1"}}"#,
                7,
                "ip.addresses is missing",
            ),
            (
                r#"{"ip": {"addresses": [], "gateway": "192.168.3.1"}}"#,
                7,
                "ip.addresses is empty",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.300/24"], "gateway": "192.168.3.1"}}"#,
                7,
                "ip.addresses[0] '192.168.3.300/24' is invalid",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24", "192.168.3.11/24"], "gateway": "192.168.3.1"}}"#,
                2,
                "ip.addresses has 2 addresses",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"]}}"#,
                7,
                "ip.gateway is missing",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1/24"}}"#,
                7,
                "ip.gateway '192.168.3.1/24' is invalid",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": 5}}"#,
                7,
                "ip.gateway must be a string, not a number",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1", "fallbackIP": "x"}}"#,
                7,
                "ip.fallbackIP 'x' is invalid",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1", "fallbackIp": "1.2.3.4"}}"#,
                2,
                "ip.fallbackIp is not a field of ip (addresses, gateway, destinations, fallbackIP) (did you mean fallbackIP?)",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1", "destinations": "80 tcp 1.2.3.4"}}"#,
                7,
                "ip.destinations must be an array of strings, not a string",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "interfaceType": "ipvlan"}"#,
                2,
                "interfaceType 'ipvlan' is not supported",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "interfaceArgs": {"mode": "bridged"}}"#,
                7,
                "interfaceArgs.mode 'bridged' is not a macvlan mode",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "interfaceArgs": {"mtu": "9x"}}"#,
                7,
                "interfaceArgs.mtu '9x' is invalid",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "interfaceArgs": {"master": "a/b"}}"#,
                7,
                "interfaceArgs.master 'a/b' is not an interface name",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "interfaceArgs": {"vlan": "4"}}"#,
                2,
                "interfaceArgs.vlan is not supported",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "log_level": "loud"}"#,
                7,
                "log_level 'loud' is invalid",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "log_file": "log.txt"}"#,
                7,
                "log_file 'log.txt' is not an absolute path",
            ),
            (
                r#"{"ip": {"addresses": ["192.168.3.10/24"], "gateway": "192.168.3.1"}, "podIP": {}}"#,
                2,
                "podIP is not supported",
            ),
        ];
        for (json, code, start) in cases {
            let p = problems(json);
            assert!(
                p.iter().any(|(c, m)| c == code && m.starts_with(start)),
                "{json}: expected code {code} and a message starting with {start:?}, got {p:?}"
            );
        }
    }
}
