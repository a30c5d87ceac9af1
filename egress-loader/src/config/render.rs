//! The inverse of parsing: a configuration written back as variable text, in canonical form. A
//! valid configuration rendered and parsed again gives the same value (line numbers are those of
//! the rendered text: rules on lines 1, 2, ...).
use std::collections::BTreeMap;

use super::types::{Config, DnsRule, HttpRule, Mode, RedirectConfig, Role};

/// EGRESS_DESTINATION text: one rule a line, the fallback last.
pub fn render_redirect(r: &RedirectConfig) -> String {
    let mut out = String::new();
    for rule in &r.rules {
        out.push_str(&format!(
            "{} {} {}",
            rule.local_port, rule.protocol, rule.destination
        ));
        if rule.remote_port != rule.local_port {
            out.push_str(&format!(" {}", rule.remote_port));
        }
        out.push('\n');
    }
    if let Some(ip) = r.fallback {
        out.push_str(&format!("{ip}\n"));
    }
    or_comment(out)
}

/// A variable with no rules is written as a comment: an empty one would mean unset.
fn or_comment(text: String) -> String {
    if text.is_empty() {
        "# no rules\n".to_string()
    } else {
        text
    }
}

/// EGRESS_HTTP_PROXY_DESTINATION text: one rule a line.
pub fn render_http(rules: &[HttpRule]) -> String {
    or_comment(rules.iter().map(|r| r.rule_text() + "\n").collect())
}

/// EGRESS_DNS_PROXY_DESTINATION text: one listener a line.
pub fn render_dns(rules: &[DnsRule]) -> String {
    or_comment(
        rules
            .iter()
            .map(|r| {
                if r.remote_port == r.local_port {
                    format!("{} {}\n", r.local_port, r.target)
                } else {
                    format!("{} {} {}\n", r.local_port, r.target, r.remote_port)
                }
            })
            .collect(),
    )
}

/// The variables that parse to `cfg`.
pub fn render(cfg: &Config) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        vars.insert(k.to_string(), v);
    };
    // A proxy container is told by its proxy variables alone.
    if cfg.role != Role::Proxy {
        set("EGRESS_ROUTER_MODE", cfg.mode.as_str().to_string());
    }
    if cfg.role == Role::RouterAndProxy {
        set("EGRESS_ONE_PROCESS", "true".to_string());
    }
    if !cfg.dns_server_counts.is_empty() {
        let entries: Vec<String> = cfg
            .dns_server_counts
            .iter()
            .map(|(name, n)| format!("{name}:{n};"))
            .collect();
        set("EGRESS_DNS_SERVERS", entries.concat());
    }
    if cfg.source.is_set() {
        let s = cfg.source;
        if s.net.prefix_len() == 32 {
            set("EGRESS_SOURCE", s.addr.to_string());
        } else {
            set("EGRESS_SOURCE", s.net.to_string());
        }
    }
    if !cfg.gateway.is_unspecified() {
        set("EGRESS_GATEWAY", cfg.gateway.to_string());
    }
    if cfg.debug {
        set("EGRESS_ROUTER_DEBUG", "true".to_string());
    }
    if cfg.dns_debug {
        set("EGRESS_DNS_PROXY_DEBUG", "true".to_string());
    }
    if let Some(r) = &cfg.redirect {
        set("EGRESS_DESTINATION", render_redirect(r));
    }
    if let Some(h) = &cfg.http {
        set("EGRESS_HTTP_PROXY_DESTINATION", render_http(h));
    }
    if let Some(d) = &cfg.dns {
        set("EGRESS_DNS_PROXY_DESTINATION", render_dns(d));
    }
    if cfg.proxy_unit_test {
        match cfg.mode {
            Mode::HttpProxy => set("EGRESS_HTTP_PROXY_MODE", "unit-test".to_string()),
            Mode::DnsProxy => set("EGRESS_DNS_PROXY_MODE", "unit-test".to_string()),
            _ => {}
        }
    }
    vars
}
