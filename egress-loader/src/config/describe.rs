//! The configuration in words: what `egress-router check` and the proxy unit-test modes print.
use std::{fmt::Write as _, net::IpAddr};

use super::types::{Config, DnsTarget, HttpMatch, Mode, Role};

fn addr_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn mode_meaning(cfg: &Config) -> &'static str {
    match (cfg.role, cfg.mode) {
        (_, Mode::HttpProxy) if cfg.proxy_unit_test => {
            "EGRESS_HTTP_PROXY_MODE=unit-test: print the squid ACLs OpenShift's image generates, \
             change nothing"
        }
        (_, Mode::DnsProxy) if cfg.proxy_unit_test => {
            "EGRESS_DNS_PROXY_MODE=unit-test: print the haproxy.cfg OpenShift's image generates, \
             change nothing"
        }
        (_, Mode::Init) => "set up the network and the eBPF redirect, then exit",
        (_, Mode::Legacy) => "set up the network and the eBPF redirect, then stay until SIGTERM",
        (_, Mode::UnitTest) => "print the equivalent nftables rules, change nothing",
        (Role::Router, Mode::HttpProxy) => {
            "the HTTP proxy pod's init container: set up the network, then exit"
        }
        (Role::Router, Mode::DnsProxy) => {
            "the DNS proxy pod's init container: set up the network, then exit"
        }
        (Role::Proxy, Mode::HttpProxy) => {
            "the HTTP proxy container: run the proxy on port 8080 through the pod's route"
        }
        (Role::Proxy, Mode::DnsProxy) => {
            "the DNS proxy container: run the listeners through the pod's route"
        }
        (Role::RouterAndProxy, Mode::HttpProxy) => {
            "one process: set up the network, then run the HTTP proxy on port 8080"
        }
        (Role::RouterAndProxy, Mode::DnsProxy) => {
            "one process: set up the network, then run the DNS proxy listeners"
        }
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The configuration as parsed: a header (mode, source, gateway, debug), then one line per rule
/// in order with its meaning.
pub fn describe(cfg: &Config) -> String {
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(o, "mode: {} ({})", cfg.mode, mode_meaning(cfg));
    if cfg.source.is_set() {
        let _ = writeln!(
            o,
            "source: {} (macvlan0 address {}, the source address outside)",
            cfg.source.addr, cfg.source.net
        );
    } else {
        let _ = writeln!(
            o,
            "source: not set (a proxy container leaves from the address on macvlan0)"
        );
    }
    if cfg.gateway.is_unspecified() {
        let _ = writeln!(o, "gateway: not set (the init container's route is used)");
    } else {
        let _ = writeln!(o, "gateway: {} (default route via macvlan0)", cfg.gateway);
    }
    let _ = writeln!(o, "debug: {}", if cfg.debug { "on" } else { "off" });

    if let Some(r) = &cfg.redirect {
        let _ = writeln!(
            o,
            "EGRESS_DESTINATION: {}{}",
            plural(r.rules.len(), "rule", "rules"),
            if r.fallback.is_some() {
                " and a fallback"
            } else {
                ", no fallback"
            }
        );
        for (i, rule) in r.rules.iter().enumerate() {
            let _ = writeln!(
                o,
                "rule {} (line {}): {} port {} -> {}",
                i + 1,
                rule.line,
                rule.protocol,
                rule.local_port,
                addr_port(rule.destination, rule.remote_port)
            );
        }
        match r.fallback {
            Some(ip) => {
                let _ = writeln!(
                    o,
                    "fallback: everything else -> {ip} (any protocol, same port)"
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "no fallback: everything else is not forwarded (it reaches the router itself, \
                     where nothing listens)"
                );
            }
        }
    }

    if let Some(rules) = &cfg.http {
        let _ = writeln!(
            o,
            "EGRESS_HTTP_PROXY_DESTINATION: {}, checked in order, first match wins",
            plural(rules.len(), "rule", "rules")
        );
        for (i, rule) in rules.iter().enumerate() {
            let meaning = match &rule.matcher {
                HttpMatch::Host(_) => "exactly that host".to_string(),
                HttpMatch::Domain(_) => "the domain and every subdomain".to_string(),
                HttpMatch::Net(n) if n.prefix_len() == n.max_prefix_len() => {
                    "that destination address".to_string()
                }
                HttpMatch::Net(_) => "destination addresses in that network".to_string(),
                HttpMatch::Any => "everything".to_string(),
            };
            let _ = writeln!(
                o,
                "rule {} (line {}): {} {} ({meaning})",
                i + 1,
                rule.line,
                if rule.allow { "allow" } else { "deny" },
                rule.matcher.rule_text()
            );
        }
        if !rules.last().is_some_and(|r| r.matcher == HttpMatch::Any) {
            let _ = writeln!(o, "otherwise: deny (403 Forbidden)");
        }
    }

    if let Some(rules) = &cfg.dns {
        let _ = writeln!(
            o,
            "EGRESS_DNS_PROXY_DESTINATION: {} (TCP)",
            plural(rules.len(), "listener", "listeners")
        );
        for (i, rule) in rules.iter().enumerate() {
            let (dest, note) = match &rule.target {
                DnsTarget::Addr(a) => (addr_port(*a, rule.remote_port), ""),
                DnsTarget::Name(n) => (format!("{n}:{}", rule.remote_port), " (re-resolved)"),
            };
            let _ = writeln!(
                o,
                "listener {} (line {}): port {} -> {dest}{note}",
                i + 1,
                rule.line,
                rule.local_port
            );
        }
        let _ = writeln!(
            o,
            "dns proxy debug: {}",
            if cfg.dns_debug {
                "on (every connection logged)"
            } else {
                "off"
            }
        );
    }
    out
}
