//! EGRESS_HTTP_PROXY_DESTINATION: the HTTP proxy rules (SPEC section 4).
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    ConfigError,
    lines::{looks_like_ipv4, parse_host_name, parse_ip, parse_prefix_len, rule_lines, show},
    types::{HttpMatch, HttpRule},
};

const VAR: &str = "EGRESS_HTTP_PROXY_DESTINATION";
pub(crate) const EXPECTED: &str = "expected a host name, *.<domain>, an IP address or <ip>/<len>, \
     each optionally preceded by ! to deny, or * as the last rule";

impl HttpMatch {
    /// The canonical rule text (without `!`).
    pub fn rule_text(&self) -> String {
        match self {
            HttpMatch::Host(h) => h.clone(),
            HttpMatch::Domain(d) => format!("*.{d}"),
            HttpMatch::Net(n) if n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
            HttpMatch::Net(n) => n.to_string(),
            HttpMatch::Any => "*".to_string(),
        }
    }
}

impl HttpRule {
    /// The canonical rule text, `!` included for a deny rule.
    pub fn rule_text(&self) -> String {
        let bang = if self.allow { "" } else { "!" };
        format!("{bang}{}", self.matcher.rule_text())
    }
}

/// What a rule (after the optional `!`) matches.
fn matcher(text: &str) -> Result<HttpMatch, String> {
    if text.split_ascii_whitespace().nth(1).is_some() {
        return Err("a rule is a single host, domain, address or CIDR".to_string());
    }
    if text == "*" {
        return Ok(HttpMatch::Any);
    }
    if let Some((scheme, _)) = text.split_once("://") {
        return Err(format!(
            "a URL scheme ('{}://') is not allowed: write the host name alone",
            show(scheme)
        ));
    }
    if let Some(domain) = text.strip_prefix("*.") {
        return parse_host_name(domain).map(HttpMatch::Domain);
    }
    if text.contains('*') {
        return Err("'*' is allowed only alone or as the '*.' of '*.<domain>'".to_string());
    }
    if let Some((addr, len)) = text.split_once('/') {
        let ip_like = addr.contains(':') || looks_like_ipv4(addr);
        if !ip_like {
            return Err(format!(
                "a path is not allowed: write the host name alone ('{}')",
                show(addr)
            ));
        }
        let ip = parse_ip(addr)?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = parse_prefix_len(len, max)?;
        let net = IpNet::new(ip, len).map_err(|e| e.to_string())?;
        return Ok(HttpMatch::Net(net.trunc()));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(HttpMatch::Net(IpNet::from(ip)));
    }
    if let Some((host, port)) = text.rsplit_once(':')
        && !host.contains(':')
    {
        return Err(format!(
            "a port (':{}') is not allowed: rules match the host on any port; write '{}'",
            show(port),
            show(host)
        ));
    }
    if text.contains(':') {
        return parse_ip(text).map(|ip| HttpMatch::Net(IpNet::from(ip)));
    }
    parse_host_name(text).map(HttpMatch::Host)
}

/// Parses EGRESS_HTTP_PROXY_DESTINATION (`None` or empty: unset). On error, one message per
/// problem, for every line.
pub fn parse_http(value: Option<&str>) -> Result<Vec<HttpRule>, Vec<ConfigError>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Err(vec![ConfigError::new(
            format!("No {VAR} specified: not set ({EXPECTED}; one rule a line)"),
            format!("No {VAR} specified"),
        )]);
    };
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    let mut wildcard_line: Option<usize> = None;
    for line in rule_lines(value) {
        let n = line.number;
        let prefix = format!("{VAR} line {n}: '{}': ", show(line.text));
        if let Some(at) = wildcard_line {
            errors.push(ConfigError::new(
                format!("{prefix}Wildcard must be last rule, if present (the * is on line {at})"),
                "Wildcard must be last rule, if present",
            ));
        }
        let (allow, rest) = match line.text.strip_prefix('!') {
            Some(rest) => (false, rest.trim_start_matches([' ', '\t'])),
            None => (true, line.text),
        };
        match matcher(rest) {
            Ok(m) => {
                if m == HttpMatch::Any {
                    wildcard_line.get_or_insert(n);
                }
                rules.push(HttpRule {
                    allow,
                    matcher: m,
                    text: line.text.to_string(),
                    line: n,
                });
            }
            Err(why) => {
                let openshift = format!("Bad destination '{}'", show(rest));
                errors.push(ConfigError::new(
                    format!("{prefix}{openshift}: {why} ({EXPECTED})"),
                    openshift,
                ))
            }
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}
