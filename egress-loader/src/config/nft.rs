//! The nftables form of the redirect rules, as OpenShift's egress-router script generates it.
use std::fmt::Write as _;

use super::types::Config;

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
