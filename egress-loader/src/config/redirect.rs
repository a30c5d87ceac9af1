//! EGRESS_DESTINATION: the redirect rules (SPEC section 3).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use super::{
    ConfigError,
    lines::{
        PortError, invalid_port_message, parse_ip, parse_port, rule_lines, show, unusable_target,
    },
    types::{Protocol, RedirectConfig, RedirectRule},
};

const VAR: &str = "EGRESS_DESTINATION";
pub(crate) const EXPECTED: &str =
    "expected <localport> <tcp|udp|sctp> <ip> [<remoteport>] or a fallback <ip>";

impl Protocol {
    /// The lowercase name, as nftables and the rules write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// `tcp`, `udp` or `sctp` in any case.
    pub fn parse(text: &str) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| text.eq_ignore_ascii_case(p.as_str()))
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A redirect destination: IPv4 only (the eBPF dataplane is IPv4-only), and an address packets
/// can be forwarded to out of macvlan0.
fn destination(text: &str) -> Result<Ipv4Addr, String> {
    let a = match parse_ip(text)? {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => {
            return Err(format!(
                "{} is an IPv6 address, but the eBPF redirect dataplane is IPv4-only",
                show(text)
            ));
        }
    };
    let why = unusable_target(IpAddr::V4(a)).or(a.is_loopback().then_some("a loopback address"));
    match why {
        Some(why) => Err(format!(
            "{a} is {why}, which traffic cannot be forwarded to out of macvlan0"
        )),
        None => Ok(a),
    }
}

/// What one line says, as far as it could be read.
enum Parsed {
    Fallback(Option<Ipv4Addr>),
    Rule {
        local_port: Option<u16>,
        protocol: Option<Protocol>,
        destination: Option<Ipv4Addr>,
        remote_port: Option<Option<u16>>,
    },
}

/// Parses EGRESS_DESTINATION (`None` or empty: unset). On error, one message per problem, for
/// every line.
pub fn parse_redirect(value: Option<&str>) -> Result<RedirectConfig, Vec<ConfigError>> {
    parse_redirect_at(value, &|n| format!("{VAR} line {n}"))
}

/// [`parse_redirect`] for rules that come from somewhere else than the variable (the CNI
/// plugin's `ip.destinations`, one rule an element): `place(n)` names line `n` (1-based) at the
/// start of each message, instead of `EGRESS_DESTINATION line <n>`. The rest of each message,
/// OpenShift's wording included, is the same.
pub fn parse_redirect_at(
    value: Option<&str>,
    place: &dyn Fn(usize) -> String,
) -> Result<RedirectConfig, Vec<ConfigError>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Err(vec![ConfigError::new(
            format!("{VAR} unspecified: not set ({EXPECTED}, one rule a line)"),
            format!("{VAR} unspecified"),
        )]);
    };
    let mut errors = Vec::new();
    let mut config = RedirectConfig::default();
    let mut fallback_line: Option<(Ipv4Addr, usize)> = None;
    let mut used: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();

    for line in rule_lines(value) {
        let n = line.number;
        let text = show(line.text);
        let prefix = format!("{}: '{text}': ", place(n));
        let openshift_invalid = format!("{VAR} value '{text}' is invalid");
        let invalid = |detail: String| {
            ConfigError::new(
                format!("{prefix}{openshift_invalid}: {detail} ({EXPECTED})"),
                openshift_invalid.clone(),
            )
        };
        let mut line_errors = Vec::new();
        let port = |field: &str, errs: &mut Vec<ConfigError>| match parse_port(field) {
            Ok(p) => Some(p),
            Err(PortError::Range) => {
                let openshift = invalid_port_message(field);
                errs.push(ConfigError::new(
                    format!("{prefix}{openshift} ({EXPECTED})"),
                    openshift,
                ));
                None
            }
            Err(PortError::Syntax(why)) => {
                errs.push(invalid(why));
                None
            }
        };

        let fields = line.fields();
        let parsed = match fields.as_slice() {
            [ip] => Parsed::Fallback(
                destination(ip)
                    .map_err(|e| line_errors.push(invalid(e)))
                    .ok(),
            ),
            [first, _] => {
                let why = if parse_ip(first).is_ok() {
                    "a fallback is an IP address alone, without a port".to_string()
                } else {
                    "2 fields, a rule needs at least 3".to_string()
                };
                line_errors.push(invalid(why));
                Parsed::Rule {
                    local_port: None,
                    protocol: None,
                    destination: None,
                    remote_port: None,
                }
            }
            // Neither a port nor a protocol where they go: not a rule at all; one message.
            [lport, proto, _, rest @ ..]
                if rest.len() <= 1
                    && matches!(parse_port(lport), Err(PortError::Syntax(_)))
                    && Protocol::parse(proto).is_none() =>
            {
                line_errors.push(invalid(
                    "it is neither a rule (it does not start with a port and a protocol) nor a \
                     fallback (a single IP address)"
                        .to_string(),
                ));
                Parsed::Rule {
                    local_port: None,
                    protocol: None,
                    destination: None,
                    remote_port: None,
                }
            }
            [lport, proto, ip, rest @ ..] if rest.len() <= 1 => {
                let local_port = port(lport, &mut line_errors);
                let protocol = Protocol::parse(proto);
                if protocol.is_none() {
                    line_errors.push(invalid(format!(
                        "unknown protocol '{}' (tcp, udp or sctp, in any case)",
                        show(proto)
                    )));
                }
                let destination = destination(ip)
                    .map_err(|e| line_errors.push(invalid(e)))
                    .ok();
                let remote_port = rest.first().map(|r| port(r, &mut line_errors));
                Parsed::Rule {
                    local_port,
                    protocol,
                    destination,
                    remote_port,
                }
            }
            _ => {
                line_errors.push(invalid(format!(
                    "{} fields, a rule has at most 4",
                    fields.len()
                )));
                Parsed::Rule {
                    local_port: None,
                    protocol: None,
                    destination: None,
                    remote_port: None,
                }
            }
        };

        if let Some((ip, at)) = fallback_line {
            let what = if matches!(parsed, Parsed::Fallback(_)) {
                format!("a second fallback; the first, {ip}, is on line {at}")
            } else {
                format!("the fallback {ip} is on line {at}")
            };
            let openshift = format!("{VAR} fallback IP must be the last line");
            line_errors.push(ConfigError::new(
                format!("{prefix}{openshift} ({what})"),
                openshift,
            ));
        }

        match parsed {
            Parsed::Fallback(ip) => {
                if let (Some(ip), None) = (ip, fallback_line) {
                    fallback_line = Some((ip, n));
                    config.fallback = Some(IpAddr::V4(ip));
                }
            }
            Parsed::Rule {
                local_port,
                protocol,
                destination,
                remote_port,
            } => {
                if let (Some(lp), Some(proto)) = (local_port, protocol) {
                    if let Some(first) = used.get(&(lp, proto)) {
                        let openshift = format!(
                            "{VAR} localport {lp} is already used, must be unique for each \
                             destination"
                        );
                        line_errors.push(ConfigError::new(
                            format!(
                                "{prefix}{openshift} ({proto} port {lp} is on line {first}; the \
                                 same port with another protocol is allowed)"
                            ),
                            openshift,
                        ));
                    } else {
                        used.insert((lp, proto), n);
                    }
                }
                if line_errors.is_empty()
                    && let (Some(local_port), Some(protocol), Some(dest)) =
                        (local_port, protocol, destination)
                {
                    config.rules.push(RedirectRule {
                        local_port,
                        protocol,
                        destination: IpAddr::V4(dest),
                        remote_port: remote_port.flatten().unwrap_or(local_port),
                        line: n,
                    });
                }
            }
        }
        errors.append(&mut line_errors);
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}
