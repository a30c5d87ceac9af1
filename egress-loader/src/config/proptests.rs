//! Property tests: any valid configuration, rendered to variable text, parses back to itself;
//! decorating the text (comments, blank lines, CRLF, tabs, case) changes nothing but line numbers.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net};
use proptest::prelude::*;

use super::*;

/// An IPv4 address a redirect may target (not 0/8, loopback, multicast or broadcast).
fn target_v4() -> impl Strategy<Value = Ipv4Addr> {
    (1u8..=223, any::<u8>(), any::<u8>(), any::<u8>())
        .prop_filter("usable", |(a, ..)| *a != 127)
        .prop_map(|(a, b, c, d)| Ipv4Addr::new(a, b, c, d))
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        Just(Protocol::Tcp),
        Just(Protocol::Udp),
        Just(Protocol::Sctp)
    ]
}

fn redirect_config() -> impl Strategy<Value = RedirectConfig> {
    let rule = (1u16.., protocol(), target_v4(), 1u16..);
    (
        prop::collection::vec(rule, 0..8),
        prop::option::of(target_v4()),
    )
        .prop_map(|(rules, fallback)| {
            let mut seen = BTreeSet::new();
            let rules: Vec<RedirectRule> = rules
                .into_iter()
                .filter(|(lp, proto, ..)| seen.insert((*lp, *proto)))
                .enumerate()
                .map(|(i, (local_port, protocol, ip, rp))| RedirectRule {
                    local_port,
                    protocol,
                    destination: IpAddr::V4(ip),
                    remote_port: rp,
                    line: i + 1,
                })
                .collect();
            RedirectConfig {
                rules,
                fallback: fallback.map(IpAddr::V4),
            }
        })
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9_][a-z0-9_-]{0,10}"
}

fn host_name() -> impl Strategy<Value = String> {
    (prop::collection::vec(label(), 0..3), "[a-z][a-z0-9-]{0,6}").prop_map(|(mut labels, tld)| {
        labels.push(tld);
        labels.join(".")
    })
}

fn ip_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap()).trunc()),
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| {
            IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), l)
                .unwrap()
                .trunc()
        }),
    ]
}

fn http_rules() -> impl Strategy<Value = Vec<HttpRule>> {
    let matcher = prop_oneof![
        host_name().prop_map(HttpMatch::Host),
        host_name().prop_map(HttpMatch::Domain),
        ip_net().prop_map(HttpMatch::Net),
    ];
    (
        prop::collection::vec((any::<bool>(), matcher), 0..8),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(rules, any_last)| {
            let mut rules: Vec<(bool, HttpMatch)> = rules;
            if let Some(allow) = any_last {
                rules.push((allow, HttpMatch::Any));
            }
            rules
                .into_iter()
                .enumerate()
                .map(|(i, (allow, matcher))| {
                    let mut r = HttpRule {
                        allow,
                        matcher,
                        text: String::new(),
                        line: i + 1,
                    };
                    r.text = r.rule_text();
                    r
                })
                .collect()
        })
}

fn dns_rules() -> impl Strategy<Value = Vec<DnsRule>> {
    let target = prop_oneof![
        target_v4().prop_map(|a| DnsTarget::Addr(IpAddr::V4(a))),
        any::<u128>()
            .prop_filter("usable", |a| {
                let a = Ipv6Addr::from(*a);
                !a.is_unspecified() && !a.is_multicast()
            })
            .prop_map(|a| DnsTarget::Addr(IpAddr::V6(Ipv6Addr::from(a)))),
        (label(), host_name()).prop_map(|(l, h)| DnsTarget::Name(format!("{l}.{h}"))),
    ];
    prop::collection::vec((1u16.., target, prop::option::of(1u16..)), 0..6).prop_map(|v| {
        let mut seen = BTreeSet::new();
        v.into_iter()
            .filter(|(lp, ..)| seen.insert(*lp))
            .enumerate()
            .map(|(i, (local_port, target, rp))| DnsRule {
                local_port,
                target,
                remote_port: rp.unwrap_or(local_port),
                line: i + 1,
            })
            .collect()
    })
}

fn source() -> impl Strategy<Value = EgressSource> {
    (target_v4(), prop::option::of(0u8..=32)).prop_map(|(addr, len)| EgressSource {
        addr,
        net: Ipv4Net::new(addr, len.unwrap_or(32)).unwrap(),
    })
}

fn config() -> impl Strategy<Value = Config> {
    let mode = prop_oneof![
        Just(Mode::Init),
        Just(Mode::Legacy),
        Just(Mode::UnitTest),
        Just(Mode::HttpProxy),
        Just(Mode::DnsProxy),
    ];
    let counts = prop::collection::btree_map("[a-z]{1,8}\\.com", 0u32..5, 0..3);
    (
        (mode, 0usize..3),
        source(),
        target_v4(),
        any::<(bool, bool, bool, bool)>(),
        redirect_config(),
        http_rules(),
        dns_rules(),
        counts,
    )
        .prop_filter("gateway is not the source", |(_, s, g, ..)| s.addr != *g)
        .prop_filter(
            "unit-test mode has no SCTP",
            |((mode, _), _, _, _, r, ..)| {
                *mode != Mode::UnitTest || r.rules.iter().all(|r| r.protocol != Protocol::Sctp)
            },
        )
        .prop_map(
            |((mode, pick), source, gateway, (debug, dns_debug, unit, given), r, h, d, counts)| {
                let proxy = matches!(mode, Mode::HttpProxy | Mode::DnsProxy);
                let proxy_unit_test = unit && proxy;
                let role = match (proxy, proxy_unit_test) {
                    (false, _) => Role::Router,
                    (true, true) => Role::Proxy,
                    (true, false) => [Role::Router, Role::Proxy, Role::RouterAndProxy][pick],
                };
                // A proxy container may leave source and gateway unset.
                let (source, gateway) = if role == Role::Proxy && debug {
                    (EgressSource::UNSET, Ipv4Addr::UNSPECIFIED)
                } else {
                    (source, gateway)
                };
                // The router's init container has the proxy rules only when they are given.
                let rules = role != Role::Router || given;
                Config {
                    role,
                    mode,
                    source,
                    gateway,
                    debug,
                    redirect: mode.is_redirect().then_some(r),
                    http: (mode == Mode::HttpProxy && rules).then_some(h),
                    dns: (mode == Mode::DnsProxy && rules).then_some(d),
                    dns_server_counts: if mode == Mode::DnsProxy {
                        counts
                    } else {
                        Default::default()
                    },
                    proxy_unit_test,
                    dns_debug,
                }
            },
        )
}

/// Rewrites rule text the ways people write it: comments and blank lines around rules, CRLF,
/// tabs or runs of spaces between fields, trailing comments, any case for protocols.
fn decorate(text: &str, seed: &[u8]) -> String {
    let mut out = String::from("# rules\n\n");
    for (i, line) in text.lines().enumerate() {
        let s = seed.get(i).copied().unwrap_or(0);
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let sep = if s & 1 == 1 { "\t" } else { "   " };
        let fields: Vec<String> = line
            .split(' ')
            .map(|f| match (f, s & 2 == 2) {
                ("tcp" | "udp" | "sctp", true) => f.to_uppercase(),
                _ => f.to_string(),
            })
            .collect();
        if s & 4 == 4 {
            out.push_str("  # a comment line\n");
        }
        if s & 8 == 8 {
            out.push('\t');
        }
        out.push_str(&fields.join(sep));
        if s & 16 == 16 {
            out.push_str(" # trailing");
        }
        out.push_str(if s & 32 == 32 { "\r\n" } else { "\n" });
    }
    out.push_str("\n\n");
    out
}

fn without_lines_redirect(mut r: RedirectConfig) -> RedirectConfig {
    r.rules.iter_mut().for_each(|r| r.line = 0);
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_round_trips(cfg in config()) {
        let vars = render(&cfg);
        prop_assert_eq!(parse(&vars), Ok(cfg));
    }

    #[test]
    fn redirect_round_trips(r in redirect_config()) {
        prop_assert_eq!(parse_redirect(Some(&render_redirect(&r))), Ok(r));
    }

    #[test]
    fn http_round_trips(rules in http_rules()) {
        prop_assert_eq!(parse_http(Some(&render_http(&rules))), Ok(rules));
    }

    #[test]
    fn dns_round_trips(rules in dns_rules()) {
        prop_assert_eq!(parse_dns(Some(&render_dns(&rules))), Ok(rules));
    }

    #[test]
    fn redirect_decoration_changes_nothing(r in redirect_config(), seed in prop::collection::vec(any::<u8>(), 16)) {
        let text = decorate(&render_redirect(&r), &seed);
        let got = parse_redirect(Some(&text)).map_err(|e| format!("{text:?}: {e:?}"));
        prop_assert_eq!(got.map(without_lines_redirect), Ok(without_lines_redirect(r)));
    }

    #[test]
    fn dns_decoration_changes_nothing(rules in dns_rules(), seed in prop::collection::vec(any::<u8>(), 16)) {
        let text = decorate(&render_dns(&rules), &seed);
        let got = parse_dns(Some(&text)).map_err(|e| format!("{text:?}: {e:?}"));
        let strip = |v: Vec<DnsRule>| v.into_iter().map(|mut r| { r.line = 0; r }).collect::<Vec<_>>();
        prop_assert_eq!(got.map(strip), Ok(strip(rules)));
    }

    #[test]
    fn http_decoration_changes_nothing(rules in http_rules(), seed in prop::collection::vec(any::<u8>(), 16)) {
        let text = decorate(&render_http(&rules), &seed);
        let got = parse_http(Some(&text)).map_err(|e| format!("{text:?}: {e:?}"));
        let strip = |v: Vec<HttpRule>| v.into_iter().map(|mut r| { r.line = 0; r.text = r.rule_text(); r }).collect::<Vec<_>>();
        prop_assert_eq!(got.map(strip), Ok(strip(rules)));
    }

    /// Arbitrary text never panics, and whatever parses renders to text that parses the same.
    #[test]
    fn arbitrary_text_never_panics(text in "[0-9a-zA-Z .:/*!#\t\r\n_-]{0,80}") {
        if let Ok(r) = parse_redirect(Some(&text)) {
            let again = parse_redirect(Some(&render_redirect(&r))).unwrap();
            prop_assert_eq!(without_lines_redirect(again), without_lines_redirect(r));
        }
        if let Ok(h) = parse_http(Some(&text)) {
            let strip = |v: Vec<HttpRule>| v.into_iter().map(|mut r| { r.line = 0; r.text = r.rule_text(); r }).collect::<Vec<_>>();
            prop_assert_eq!(strip(parse_http(Some(&render_http(&h))).unwrap()), strip(h));
        }
        if let Ok(d) = parse_dns(Some(&text)) {
            let strip = |v: Vec<DnsRule>| v.into_iter().map(|mut r| { r.line = 0; r }).collect::<Vec<_>>();
            prop_assert_eq!(strip(parse_dns(Some(&render_dns(&d))).unwrap()), strip(d));
        }
    }
}
