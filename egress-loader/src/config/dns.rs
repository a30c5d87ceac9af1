//! EGRESS_DNS_PROXY_DESTINATION: the DNS proxy listeners (SPEC section 5).
use std::collections::BTreeMap;

use super::{
    ConfigError,
    lines::{
        PortError, invalid_port_message, parse_host_name, parse_ip, parse_port, rule_lines, show,
        unusable_target,
    },
    types::{DnsRule, DnsTarget},
};

const VAR: &str = "EGRESS_DNS_PROXY_DESTINATION";
pub(crate) const EXPECTED: &str = "expected <localport> <ip or name> [<remoteport>]";

impl std::fmt::Display for DnsTarget {
    /// The target as a rule writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsTarget::Addr(a) => write!(f, "{a}"),
            DnsTarget::Name(n) => f.write_str(n),
        }
    }
}

fn target(text: &str) -> Result<DnsTarget, String> {
    if let Some((scheme, _)) = text.split_once("://") {
        return Err(format!(
            "a URL scheme ('{}://') is not allowed: write the name or address alone",
            show(scheme)
        ));
    }
    if text.contains(':') || text.parse::<std::net::IpAddr>().is_ok() {
        if let Some((host, port)) = text.rsplit_once(':')
            && !host.contains(':')
        {
            return Err(format!(
                "'{}' has a port: the remote port is a field of its own ('<localport> {} {}')",
                show(text),
                show(host),
                show(port)
            ));
        }
        let ip = parse_ip(text)?;
        return match unusable_target(ip) {
            Some(why) => Err(format!("{ip} is {why}, which cannot be connected to")),
            None => Ok(DnsTarget::Addr(ip)),
        };
    }
    let name = parse_host_name(text)?;
    if !name.contains('.') {
        return Err(format!(
            "'{}' has no dot: a DNS name must contain a dot (such as dns.example.com)",
            show(text)
        ));
    }
    Ok(DnsTarget::Name(name))
}

/// Parses EGRESS_DNS_PROXY_DESTINATION (`None` or empty: unset). On error, one message per
/// problem, for every line.
pub fn parse_dns(value: Option<&str>) -> Result<Vec<DnsRule>, Vec<ConfigError>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Err(vec![ConfigError::new(
            format!("Must specify {VAR}: not set ({EXPECTED}, one listener a line)"),
            format!("Must specify {VAR}"),
        )]);
    };
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    let mut used: BTreeMap<u16, usize> = BTreeMap::new();
    for line in rule_lines(value) {
        let n = line.number;
        let text = show(line.text);
        let prefix = format!("{VAR} line {n}: '{text}': ");
        let bad = |why: String| {
            ConfigError::new(
                format!("{prefix}Bad destination '{text}': {why} ({EXPECTED})"),
                format!("Bad destination '{text}'"),
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
                errs.push(bad(why));
                None
            }
        };
        let fields = line.fields();
        let (local_port, dest, remote_port) = match fields.as_slice() {
            [lport, dest, rest @ ..] if rest.len() <= 1 => {
                let local_port = port(lport, &mut line_errors);
                let dest = target(dest).map_err(|e| line_errors.push(bad(e))).ok();
                let remote_port = rest.first().map(|r| port(r, &mut line_errors));
                (local_port, dest, remote_port)
            }
            _ => {
                line_errors.push(bad(format!(
                    "{} field{}, a listener has 2 or 3",
                    fields.len(),
                    if fields.len() == 1 { "" } else { "s" }
                )));
                (None, None, None)
            }
        };
        if let Some(lp) = local_port {
            if let Some(first) = used.get(&lp) {
                let openshift =
                    format!("Proxy port {lp} already used, must be unique for each destination");
                line_errors.push(ConfigError::new(
                    format!("{prefix}{openshift} (port {lp} is on line {first})"),
                    openshift,
                ));
            } else {
                used.insert(lp, n);
            }
        }
        if line_errors.is_empty()
            && let (Some(local_port), Some(target)) = (local_port, dest)
        {
            rules.push(DnsRule {
                local_port,
                target,
                remote_port: remote_port.flatten().unwrap_or(local_port),
                line: n,
            });
        }
        errors.append(&mut line_errors);
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}
