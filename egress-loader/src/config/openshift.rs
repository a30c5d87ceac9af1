//! The configuration as OpenShift's images write it for the same variables: the nftables rules
//! of egress-router.sh, the squid.conf of egress-http-proxy.sh and the haproxy.cfg of
//! egress-dns-proxy.sh, byte for byte. Their unit-test modes print these (our own description
//! is `egress-router check`), and the benchmarks run squid and HAProxy with them.
use std::{fmt::Write as _, net::IpAddr};

use super::types::{Config, DnsTarget, HttpMatch, Mode};

/// The rules OpenShift's script generates for this configuration, one a line, in rule order:
/// exactly what its `unit-test` mode prints. Empty when the configuration has no redirect rules
/// (a proxy mode).
///
/// A rule without a remote port is written `dnat to <ip>` as OpenShift does; the parsed value
/// does not keep whether a remote port equal to the local one was written, so `80 tcp 10.1.2.3 80`
/// also comes out as `dnat to 10.1.2.3` (the same rule for nftables).
pub fn nft_ruleset(cfg: &Config) -> String {
    let Some(redirect) = &cfg.redirect else {
        return String::new();
    };
    let mut out = String::new();
    for r in &redirect.rules {
        let _ = write!(
            out,
            "add rule ip nat prerouting iifname \"eth0\" {} dport {} dnat to {}",
            r.protocol, r.local_port, r.destination
        );
        if r.remote_port != r.local_port {
            let _ = write!(out, ":{}", r.remote_port);
        }
        out.push('\n');
    }
    if let Some(ip) = redirect.fallback {
        let _ = writeln!(
            out,
            "add rule ip nat prerouting iifname \"eth0\" dnat to {ip}"
        );
    }
    let _ = writeln!(
        out,
        "add rule ip nat postrouting oifname \"macvlan0\" snat to {}",
        cfg.source.addr
    );
    out
}

/// The table OpenShift's script declares and flushes before its rules.
const NFT_TABLE: &str = "\
table ip nat {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
  }
}
flush table ip nat
";

/// The whole `nft -f` input OpenShift's script applies: the table and its two NAT chains, a
/// flush, then [`nft_ruleset`]. Empty when the configuration has no redirect rules.
pub fn nft_script(cfg: &Config) -> String {
    if cfg.redirect.is_none() {
        return String::new();
    }
    format!("{NFT_TABLE}{}", nft_ruleset(cfg))
}

/// The ACL part of squid.conf for the HTTP proxy rules: what egress-http-proxy.sh's unit-test mode
/// prints. Each rule (but `*`) is an `acl destN` line (`dst` for an address or network,
/// `dstdomain` for a name, with the leading dot of a `*.` domain) and its `http_access` line,
/// after an empty line; then `http_access allow all` after a `*`, else `deny all`.
pub fn squid_acls(cfg: &Config) -> String {
    let rules = cfg.http.as_deref().unwrap_or_default();
    let mut out = String::new();
    let mut wildcard = false;
    for (i, rule) in rules.iter().enumerate() {
        // The rule as written, without its `!`: squid gets the text, as OpenShift hands it.
        let text = rule
            .text
            .strip_prefix('!')
            .unwrap_or(&rule.text)
            .trim_start_matches([' ', '\t']);
        let acl = match &rule.matcher {
            HttpMatch::Any => {
                wildcard = true;
                continue;
            }
            HttpMatch::Net(_) => format!("dst {text}"),
            HttpMatch::Domain(_) => format!("dstdomain {}", text.trim_start_matches('*')),
            HttpMatch::Host(_) => format!("dstdomain {text}"),
        };
        let n = i + 1;
        let access = if rule.allow { "allow" } else { "deny" };
        let _ = write!(out, "\nacl dest{n} {acl}\nhttp_access {access} dest{n}\n");
    }
    out.push('\n');
    out.push_str(if wildcard {
        "http_access allow all\n"
    } else {
        "http_access deny all\n"
    });
    out
}

/// The fixed head of egress-http-proxy.sh's squid.conf.
const SQUID_HEAD: &str = "http_port 8080\ncache deny all\naccess_log none all\ndebug_options ALL,0\nshutdown_lifetime 0\n";

/// The whole squid.conf OpenShift's HTTP proxy image writes: its head, then [`squid_acls`].
pub fn squid_conf(cfg: &Config) -> String {
    format!("{SQUID_HEAD}{}", squid_acls(cfg))
}

/// The global and defaults sections of egress-dns-proxy.sh's haproxy.cfg.
const HAPROXY_DEFAULTS: &str = "
global
    log         127.0.0.1 local2

    pidfile     /var/lib/haproxy/run/haproxy.pid
    maxconn     4000
    user        haproxy
    group       haproxy

defaults
    log                     global
    mode                    tcp
    option                  dontlognull
    option                  tcplog
    option                  redispatch
    retries                 3
    timeout http-request    100s
    timeout queue           1m
    timeout connect         10s
    timeout client          1m
    timeout server          1m
    timeout http-keep-alive 100s
    timeout check           10s

";

/// The haproxy.cfg OpenShift's DNS proxy image writes, which its unit-test mode prints: the
/// defaults, a resolvers section with `nameservers` (the pod's /etc/resolv.conf, in order), then
/// a frontend and a backend per listener. A name's backend is a `server-template` of as many
/// servers as EGRESS_DNS_SERVERS gives it (the image counts them with dig), `server dest1`
/// below two.
pub fn haproxy_cfg(cfg: &Config, nameservers: &[String]) -> String {
    let mut out = String::from(HAPROXY_DEFAULTS);
    out.push_str("resolvers dns-resolver\n");
    for (i, ns) in nameservers.iter().enumerate() {
        let _ = writeln!(out, "    nameserver ns{} {ns}:53", i + 1);
    }
    out.push_str(
        "    resolve_retries      3\n    timeout retry        1s\n    hold valid           10s\n\n",
    );
    for (i, rule) in cfg.dns.as_deref().unwrap_or_default().iter().enumerate() {
        let n = i + 1;
        let port = rule.remote_port;
        let (server, target, resolvers) = match &rule.target {
            DnsTarget::Addr(IpAddr::V4(a)) => {
                ("server dest1".to_string(), format!("{a}:{port}"), "")
            }
            DnsTarget::Addr(IpAddr::V6(a)) => {
                ("server dest1".to_string(), format!("[{a}]:{port}"), "")
            }
            DnsTarget::Name(name) => {
                let count = cfg.dns_server_counts.get(name).copied().unwrap_or(1);
                let server = if count > 1 {
                    format!("server-template dest {count}")
                } else {
                    "server dest1".to_string()
                };
                (
                    server,
                    format!("{name}:{port}"),
                    "resolvers dns-resolver resolve-prefer ipv4",
                )
            }
        };
        let _ = write!(
            out,
            "\nfrontend fe{n}\n    bind :{}\n    default_backend be{n}\n\nbackend be{n}\n    {server} {target} check {resolvers}\n\n",
            rule.local_port
        );
    }
    out
}

/// The nameservers of a resolv.conf, in order, as OpenShift's DNS image reads them (the second
/// field of each `nameserver` line).
pub fn resolv_conf_nameservers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            (f.next() == Some("nameserver"))
                .then(|| f.next().map(str::to_string))
                .flatten()
        })
        .collect()
}

/// What the unit-test mode of OpenShift's image for this configuration prints: the router's
/// nftables rules, the HTTP proxy's squid ACLs, or the DNS proxy's haproxy.cfg.
pub fn unit_test_output(cfg: &Config, nameservers: &[String]) -> String {
    match cfg.mode {
        Mode::HttpProxy if cfg.proxy_unit_test => squid_acls(cfg),
        Mode::DnsProxy if cfg.proxy_unit_test => haproxy_cfg(cfg, nameservers),
        _ => nft_ruleset(cfg),
    }
}

/// The whole file OpenShift's image writes for this configuration (`egress-router check
/// --openshift`): the `nft -f` script in the redirect modes, squid.conf or haproxy.cfg in the
/// proxy modes.
pub fn openshift_config(cfg: &Config, nameservers: &[String]) -> String {
    match cfg.mode {
        Mode::HttpProxy => squid_conf(cfg),
        Mode::DnsProxy => haproxy_cfg(cfg, nameservers),
        _ => nft_script(cfg),
    }
}
