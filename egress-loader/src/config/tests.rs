//! Table-driven tests of every rule form and every error message.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::IpNet;

use super::*;

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().unwrap())
}

/// A redirect rule as (local port, protocol, destination, remote port, line).
type R = (u16, Protocol, &'static str, u16, usize);

fn rules(r: &RedirectConfig) -> Vec<R> {
    r.rules
        .iter()
        .map(|r| {
            let ip: &'static str = Box::leak(r.destination.to_string().into_boxed_str());
            (r.local_port, r.protocol, ip, r.remote_port, r.line)
        })
        .collect()
}

use Protocol::{Sctp, Tcp, Udp};

#[test]
fn redirect_accepts_every_form() {
    let cases: &[(&str, &[R], Option<&str>)] = &[
        // OpenShift's own accepted inputs.
        ("10.1.2.3", &[], Some("10.1.2.3")),
        ("10.1.2.3\n", &[], Some("10.1.2.3")),
        ("80 tcp 10.4.5.6", &[(80, Tcp, "10.4.5.6", 80, 1)], None),
        (
            "8080 tcp 10.7.8.9 80",
            &[(8080, Tcp, "10.7.8.9", 80, 1)],
            None,
        ),
        (
            "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3",
            &[(80, Tcp, "10.4.5.6", 80, 1), (8080, Tcp, "10.7.8.9", 80, 2)],
            Some("10.1.2.3"),
        ),
        (
            "\n# My egress-router rules\n\n# Port 80 forwards to 10.4.5.6\n80 tcp 10.4.5.6\n\n\
             # Port 8080 forwards to port 80 on 10.7.8.9\n8080 tcp 10.7.8.9 80\n\n\
             # Skip this rule for now\n# 8443 tcp 10.7.8.9 443\n\n# Add new rules here\n\n\
             # Fallback; don't add anything after this\n10.1.2.3\n\n\
             # No, seriously, don't add anything here\n",
            &[(80, Tcp, "10.4.5.6", 80, 5), (8080, Tcp, "10.7.8.9", 80, 8)],
            Some("10.1.2.3"),
        ),
        ("53 udp 10.0.0.53", &[(53, Udp, "10.0.0.53", 53, 1)], None),
        (
            "  80   tcp   10.4.5.6  ",
            &[(80, Tcp, "10.4.5.6", 80, 1)],
            None,
        ),
        // Extensions: tabs, case, sctp, comments, CRLF, several trailing newlines.
        (
            "80\ttcp\t10.4.5.6\t81",
            &[(80, Tcp, "10.4.5.6", 81, 1)],
            None,
        ),
        ("80 TCP 10.4.5.6", &[(80, Tcp, "10.4.5.6", 80, 1)], None),
        ("80 Udp 10.4.5.6", &[(80, Udp, "10.4.5.6", 80, 1)], None),
        ("80 SCTP 10.4.5.6", &[(80, Sctp, "10.4.5.6", 80, 1)], None),
        (
            "80 sctp 10.4.5.6 80",
            &[(80, Sctp, "10.4.5.6", 80, 1)],
            None,
        ),
        // OpenShift's QE rule for the egress-router CNI plugin: SCTP to another port.
        (
            "8080 SCTP 203.0.113.26 80",
            &[(8080, Sctp, "203.0.113.26", 80, 1)],
            None,
        ),
        (
            "80 tcp 10.4.5.6 # web",
            &[(80, Tcp, "10.4.5.6", 80, 1)],
            None,
        ),
        (
            "80 tcp 10.4.5.6 81\t# web # more",
            &[(80, Tcp, "10.4.5.6", 81, 1)],
            None,
        ),
        ("10.1.2.3 # everything else", &[], Some("10.1.2.3")),
        (
            "80 tcp 10.4.5.6\r\n10.1.2.3\r\n",
            &[(80, Tcp, "10.4.5.6", 80, 1)],
            Some("10.1.2.3"),
        ),
        (
            "80 tcp 10.4.5.6\n\n\n\n",
            &[(80, Tcp, "10.4.5.6", 80, 1)],
            None,
        ),
        (
            "   # indented comment\n\t\n80 tcp 10.4.5.6",
            &[(80, Tcp, "10.4.5.6", 80, 3)],
            None,
        ),
        // The same local port with two protocols.
        (
            "53 tcp 10.0.0.53\n53 udp 10.0.0.54",
            &[(53, Tcp, "10.0.0.53", 53, 1), (53, Udp, "10.0.0.54", 53, 2)],
            None,
        ),
        (
            "1 tcp 10.0.0.1 65535",
            &[(1, Tcp, "10.0.0.1", 65535, 1)],
            None,
        ),
        // Only comments: no rules (OpenShift applied only the SNAT rule).
        ("# nothing yet", &[], None),
    ];
    for (input, want_rules, want_fallback) in cases {
        let got = parse_redirect(Some(input)).unwrap_or_else(|e| panic!("{input:?}: {e:?}"));
        assert_eq!(rules(&got), *want_rules, "{input:?}");
        assert_eq!(got.fallback, want_fallback.map(v4), "{input:?}");
    }
}

/// Each case: the input, then the messages expected (each a substring of one message, in order,
/// and exactly that many messages).
fn check_errors(
    parse: impl Fn(Option<&str>) -> Result<(), Vec<ConfigError>>,
    cases: &[(Option<&str>, &[&str])],
) {
    for (input, want) in cases {
        let errs = parse(*input).expect_err(&format!("{input:?} should be refused"));
        assert_eq!(errs.len(), want.len(), "{input:?}: {errs:#?}");
        for (e, w) in errs.iter().zip(want.iter()) {
            assert!(e.contains(w), "{input:?}: {e:?} does not contain {w:?}");
            assert!(!e.contains('\n'), "{e:?} spans lines");
        }
    }
}

#[test]
fn redirect_errors() {
    const EXP: &str =
        "(expected <localport> <tcp|udp|sctp> <ip> [<remoteport>] or a fallback <ip>)";
    let example = "EGRESS_DESTINATION line 3: '80 tcp 10.0.0.300': EGRESS_DESTINATION value '80 tcp \
                   10.0.0.300' is invalid: 10.0.0.300 is not an IPv4 address (expected \
                   <localport> <tcp|udp|sctp> <ip> [<remoteport>] or a fallback <ip>)";
    let cases: &[(Option<&str>, &[&str])] = &[
        (None, &["EGRESS_DESTINATION unspecified"]),
        (Some(""), &["EGRESS_DESTINATION unspecified"]),
        (Some("# a\n81 tcp 10.0.0.1\n80 tcp 10.0.0.300"), &[example]),
        // OpenShift's refused inputs, with its messages.
        (
            Some("not an IP address"),
            &["EGRESS_DESTINATION value 'not an IP address' is invalid: it is neither a rule"],
        ),
        (
            Some("10.1.2.3\n80 tcp 10.4.5.6"),
            &[
                "line 2: '80 tcp 10.4.5.6': EGRESS_DESTINATION fallback IP must be the last line (the fallback 10.1.2.3 is on line 1)",
            ],
        ),
        (
            Some("10.1.2.3\n10.4.5.6"),
            &[
                "EGRESS_DESTINATION fallback IP must be the last line (a second fallback; the first, 10.1.2.3, is on line 1)",
            ],
        ),
        (
            Some("80 tcp 10.4.5.6\n10.1.2.3\n8080 tcp 10.7.8.9 80"),
            &[
                "line 3: '8080 tcp 10.7.8.9 80': EGRESS_DESTINATION fallback IP must be the last line",
            ],
        ),
        (
            Some("80 tcp 10.4.5.6\ninvalid\n8080 tcp 10.7.8.9 80"),
            &[
                "line 2: 'invalid': EGRESS_DESTINATION value 'invalid' is invalid: invalid is not an IPv4 address",
            ],
        ),
        (
            Some("800000 tcp 10.4.5.6"),
            &[
                "line 1: '800000 tcp 10.4.5.6': Invalid port: 800000, must be in the range 1 to 65535 (expected",
            ],
        ),
        (
            Some("80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n80 tcp 10.7.8.9 900"),
            &[
                "line 3: '80 tcp 10.7.8.9 900': EGRESS_DESTINATION localport 80 is already used, must be unique for each destination (tcp port 80 is on line 1",
            ],
        ),
        // Ours.
        (
            Some("0 tcp 10.4.5.6"),
            &["Invalid port: 0, must be in the range 1 to 65535"],
        ),
        (
            Some("80 tcp 10.4.5.6 0"),
            &["Invalid port: 0, must be in the range 1 to 65535"],
        ),
        (
            Some("80 tcp 10.4.5.6 65536"),
            &["Invalid port: 65536, must be in the range 1 to 65535"],
        ),
        (
            Some("http tcp 10.4.5.6"),
            &["is invalid: 'http' is not a port number"],
        ),
        (Some("080 tcp 10.4.5.6"), &["port '080' has a leading zero"]),
        (Some("80 tcp 10.4.5.6 -1"), &["'-1' is not a port number"]),
        (
            Some("80 icmp 10.4.5.6"),
            &["unknown protocol 'icmp' (tcp, udp or sctp, in any case)"],
        ),
        (
            Some("80 tcp 10.4.5.256"),
            &["10.4.5.256 is not an IPv4 address"],
        ),
        (Some("80 tcp 10.4.5"), &["10.4.5 is not an IPv4 address"]),
        (
            Some("80 tcp 010.4.5.6"),
            &["010.4.5.6 is not an IPv4 address: leading zeros are ambiguous"],
        ),
        (
            Some("80 tcp example.com"),
            &["example.com is not an IPv4 address"],
        ),
        (
            Some("80 tcp 2001:db8::1"),
            &["2001:db8::1 is an IPv6 address, but the eBPF redirect dataplane is IPv4-only"],
        ),
        (
            Some("2001:db8::1"),
            &[
                "EGRESS_DESTINATION value '2001:db8::1' is invalid: 2001:db8::1 is an IPv6 address, but the eBPF redirect dataplane is IPv4-only",
            ],
        ),
        (
            Some("80 tcp 0.0.0.0"),
            &["0.0.0.0 is the unspecified address"],
        ),
        (
            Some("80 tcp 127.0.0.1"),
            &["127.0.0.1 is a loopback address"],
        ),
        (Some("224.0.0.1"), &["224.0.0.1 is a multicast address"]),
        (Some("255.255.255.255"), &["the broadcast address"]),
        (Some("80 tcp"), &["2 fields, a rule needs at least 3"]),
        (
            Some("10.1.2.3 80"),
            &["a fallback is an IP address alone, without a port"],
        ),
        (
            Some("80 tcp 10.4.5.6 81 82"),
            &["5 fields, a rule has at most 4"],
        ),
        (
            Some("80 tcp 10.4.5.6#x"),
            &["10.4.5.6#x is not an IPv4 address"],
        ),
        (
            Some("80 tcp 10.4.5.6\n80 TCP 10.4.5.7"),
            &["EGRESS_DESTINATION localport 80 is already used"],
        ),
        (
            Some("80 tcp 10.4.5.6 81\u{0}"),
            &["'81\\u{0}' is not a port number"],
        ),
        // Every invalid line, every problem of a line.
        (
            Some("0 foo 1.2.3.999 70000\nok\n10.1.2.3\n10.1.2.4"),
            &[
                "line 1: '0 foo 1.2.3.999 70000': Invalid port: 0,",
                "line 1: '0 foo 1.2.3.999 70000': EGRESS_DESTINATION value '0 foo 1.2.3.999 70000' is invalid: unknown protocol 'foo'",
                "1.2.3.999 is not an IPv4 address",
                "Invalid port: 70000,",
                "line 2: 'ok': EGRESS_DESTINATION value 'ok' is invalid: ok is not an IPv4 address",
                "line 4: '10.1.2.4': EGRESS_DESTINATION fallback IP must be the last line",
            ],
        ),
    ];
    check_errors(|v| parse_redirect(v).map(|_| ()), cases);
    // Every message of a line says what was expected.
    for (input, _) in cases
        .iter()
        .filter(|(i, _)| i.is_some_and(|i| !i.contains("10.1.2.3\n")))
    {
        for e in parse_redirect(*input).unwrap_err() {
            assert!(
                e.contains(EXP) || e.contains("localport") || e.contains("unspecified"),
                "{e}"
            );
        }
    }
}

fn http(allow: bool, matcher: HttpMatch, text: &str, line: usize) -> HttpRule {
    HttpRule {
        allow,
        matcher,
        text: text.to_string(),
        line,
    }
}

fn net(s: &str) -> HttpMatch {
    HttpMatch::Net(s.parse::<IpNet>().unwrap())
}

#[test]
fn http_accepts_every_form() {
    use HttpMatch::{Any, Domain, Host};
    let cases: Vec<(&str, Vec<HttpRule>)> = vec![
        (
            "www.example.com",
            vec![http(
                true,
                Host("www.example.com".into()),
                "www.example.com",
                1,
            )],
        ),
        (
            "WWW.Example.COM.",
            vec![http(
                true,
                Host("www.example.com".into()),
                "WWW.Example.COM.",
                1,
            )],
        ),
        (
            "*.example.com",
            vec![http(true, Domain("example.com".into()), "*.example.com", 1)],
        ),
        (
            "!*.example.com",
            vec![http(
                false,
                Domain("example.com".into()),
                "!*.example.com",
                1,
            )],
        ),
        (
            "! bad.com",
            vec![http(false, Host("bad.com".into()), "! bad.com", 1)],
        ),
        (
            "192.168.1.1",
            vec![http(true, net("192.168.1.1/32"), "192.168.1.1", 1)],
        ),
        (
            "192.168.1.0/24",
            vec![http(true, net("192.168.1.0/24"), "192.168.1.0/24", 1)],
        ),
        (
            "192.168.1.7/24",
            vec![http(true, net("192.168.1.0/24"), "192.168.1.7/24", 1)],
        ),
        (
            "0.0.0.0/0",
            vec![http(true, net("0.0.0.0/0"), "0.0.0.0/0", 1)],
        ),
        (
            "fe80::/10",
            vec![http(true, net("fe80::/10"), "fe80::/10", 1)],
        ),
        (
            "!2001:db8::1",
            vec![http(false, net("2001:db8::1/128"), "!2001:db8::1", 1)],
        ),
        (
            "localhost",
            vec![http(true, Host("localhost".into()), "localhost", 1)],
        ),
        ("*", vec![http(true, Any, "*", 1)]),
        ("!*", vec![http(false, Any, "!*", 1)]),
        (
            "# rules\r\n\r\nwww.example.com  # the site\r\n\t!*.evil.com\r\n10.0.0.0/8\n*\n\n",
            vec![
                http(true, Host("www.example.com".into()), "www.example.com", 3),
                http(false, Domain("evil.com".into()), "!*.evil.com", 4),
                http(true, net("10.0.0.0/8"), "10.0.0.0/8", 5),
                http(true, Any, "*", 6),
            ],
        ),
        ("# none yet", vec![]),
    ];
    for (input, want) in cases {
        assert_eq!(parse_http(Some(input)), Ok(want), "{input:?}");
    }
}

#[test]
fn http_errors() {
    let cases: &[(Option<&str>, &[&str])] = &[
        (None, &["No EGRESS_HTTP_PROXY_DESTINATION specified"]),
        (Some(""), &["No EGRESS_HTTP_PROXY_DESTINATION specified"]),
        (
            Some("*\nexample.com"),
            &[
                "EGRESS_HTTP_PROXY_DESTINATION line 2: 'example.com': Wildcard must be last rule, if present (the * is on line 1)",
            ],
        ),
        (Some("*\n*"), &["Wildcard must be last rule, if present"]),
        (
            Some("http://x"),
            &[
                "EGRESS_HTTP_PROXY_DESTINATION line 1: 'http://x': Bad destination 'http://x': a URL scheme ('http://') is not allowed",
            ],
        ),
        (
            Some("x.com:80"),
            &[
                "Bad destination 'x.com:80': a port (':80') is not allowed: rules match the host on any port; write 'x.com'",
            ],
        ),
        (
            Some("!http://x"),
            &["line 1: '!http://x': Bad destination 'http://x'"],
        ),
        (
            Some("x.com/path"),
            &["Bad destination 'x.com/path': a path is not allowed"],
        ),
        (
            Some("1.2.3.4/33"),
            &["prefix length /33 is greater than 32"],
        ),
        (
            Some("fe80::/129"),
            &["prefix length /129 is greater than 128"],
        ),
        (Some("1.2.3.4/"), &["'/' is not a prefix length"]),
        (Some("1.2.3.4/024"), &["leading zero"]),
        (
            Some("1.2.3.300"),
            &["Bad destination '1.2.3.300': 1.2.3.300 is not an IPv4 address"],
        ),
        (Some("1.2.3.300/24"), &["1.2.3.300 is not an IPv4 address"]),
        (Some("fe80::zz"), &["fe80::zz is not an IPv6 address"]),
        (Some("a b"), &["a rule is a single host"]),
        (
            Some("*.*.example.com"),
            &["'*.example.com' is not a host name"],
        ),
        (
            Some("foo*.com"),
            &["'*' is allowed only alone or as the '*.'"],
        ),
        (Some("*."), &["is not a host name"]),
        (Some("!"), &["Bad destination '': '' is not a host name"]),
        (Some("a..b"), &["empty label"]),
        (Some("exa_mple!.com"), &["the character '!' is not allowed"]),
        (Some("bücher.de"), &["xn--"]),
        (
            Some("ok.com\nhttp://x\n*\nnot ok\nfine.com"),
            &[
                "line 2: 'http://x'",
                "line 4: 'not ok': Wildcard must be last rule",
                "line 4: 'not ok': Bad destination 'not ok'",
                "line 5: 'fine.com': Wildcard must be last rule",
            ],
        ),
    ];
    check_errors(|v| parse_http(v).map(|_| ()), cases);
}

fn dns(local_port: u16, target: DnsTarget, remote_port: u16, line: usize) -> DnsRule {
    DnsRule {
        local_port,
        target,
        remote_port,
        line,
    }
}

#[test]
fn dns_accepts_every_form() {
    use DnsTarget::{Addr, Name};
    let name = |s: &str| Name(s.to_string());
    let cases: Vec<(&str, Vec<DnsRule>)> = vec![
        (
            "80 11.12.13.14",
            vec![dns(80, Addr(v4("11.12.13.14")), 80, 1)],
        ),
        (
            "80 11.12.13.14\n8080 21.22.23.24 100",
            vec![
                dns(80, Addr(v4("11.12.13.14")), 80, 1),
                dns(8080, Addr(v4("21.22.23.24")), 100, 2),
            ],
        ),
        ("80 example.com", vec![dns(80, name("example.com"), 80, 1)]),
        (
            "53 DNS.Example.COM. 5353",
            vec![dns(53, name("dns.example.com"), 5353, 1)],
        ),
        ("53 a.b", vec![dns(53, name("a.b"), 53, 1)]),
        (
            "53 2001:db8::1",
            vec![dns(53, Addr("2001:db8::1".parse().unwrap()), 53, 1)],
        ),
        (
            "53\t2001:db8::1\t54 # v6",
            vec![dns(53, Addr("2001:db8::1".parse().unwrap()), 54, 1)],
        ),
        ("53 127.0.0.1", vec![dns(53, Addr(v4("127.0.0.1")), 53, 1)]),
        (
            "\n# My DNS proxy egress router rules\n\n# Port 80 forwards to 11.12.13.14\n\
             80 11.12.13.14\n\n# Port 8080 forwards to port 100 on example.com\n\
             8080 example.com 100\n\n# Skip this rule for now\n# 9000 foo.com 200\n\n# End\n",
            vec![
                dns(80, Addr(v4("11.12.13.14")), 80, 5),
                dns(8080, name("example.com"), 100, 8),
            ],
        ),
        (
            "80 a.com\r\n81 b.com\r\n",
            vec![dns(80, name("a.com"), 80, 1), dns(81, name("b.com"), 81, 2)],
        ),
        ("# later", vec![]),
    ];
    for (input, want) in cases {
        assert_eq!(parse_dns(Some(input)), Ok(want), "{input:?}");
    }
}

#[test]
fn dns_errors() {
    const EXP: &str = "(expected <localport> <ip or name> [<remoteport>])";
    let cases: &[(Option<&str>, &[&str])] = &[
        (None, &["Must specify EGRESS_DNS_PROXY_DESTINATION"]),
        (Some(""), &["Must specify EGRESS_DNS_PROXY_DESTINATION"]),
        (
            Some("80 11.12.13.14\ninvalid"),
            &[
                "EGRESS_DNS_PROXY_DESTINATION line 2: 'invalid': Bad destination 'invalid': 1 field, a listener has 2 or 3",
            ],
        ),
        (
            Some("80 11.12.13.14\n8080 invalid"),
            &[
                "line 2: '8080 invalid': Bad destination '8080 invalid': 'invalid' has no dot: a DNS name must contain a dot",
            ],
        ),
        (
            Some("99999 11.12.13.14"),
            &["Invalid port: 99999, must be in the range 1 to 65535"],
        ),
        (
            Some("80 11.12.13.14 88888"),
            &["Invalid port: 88888, must be in the range 1 to 65535"],
        ),
        (
            Some("0 11.12.13.14"),
            &["Invalid port: 0, must be in the range 1 to 65535"],
        ),
        (
            Some("80 11.12.13.14\n80 21.22.23.24 100"),
            &[
                "line 2: '80 21.22.23.24 100': Proxy port 80 already used, must be unique for each destination (port 80 is on line 1)",
            ],
        ),
        (
            Some("80 11.12.13.256"),
            &["11.12.13.256 is not an IPv4 address"],
        ),
        (Some("80 x.com:53"), &["'x.com:53' has a port"]),
        (
            Some("80 http://x.com"),
            &["Bad destination '80 http://x.com'"],
        ),
        (Some("80 fe80::zz"), &["fe80::zz is not an IPv6 address"]),
        (Some("80 0.0.0.0"), &["0.0.0.0 is the unspecified address"]),
        (Some("80 ff02::1"), &["ff02::1 is a multicast address"]),
        (Some("80 a.com 53 54"), &["4 fields, a listener has 2 or 3"]),
        (Some("x a.com"), &["'x' is not a port number"]),
        (
            Some("80 a\n81 b.com 0\n80 c.com"),
            &[
                "line 1: '80 a': Bad destination '80 a': 'a' has no dot",
                "line 2: '81 b.com 0': Invalid port: 0",
                "line 3: '80 c.com': Proxy port 80 already used",
            ],
        ),
    ];
    check_errors(|v| parse_dns(v).map(|_| ()), cases);
    for (input, _) in cases.iter().filter(|(i, _)| i.is_some()) {
        for e in parse_dns(*input).unwrap_err() {
            assert!(
                e.contains(EXP) || e.contains("Proxy port") || e.contains("Must specify"),
                "{e}"
            );
        }
    }
}

const SRC: (&str, &str) = ("EGRESS_SOURCE", "192.168.12.99/24");
const GW: (&str, &str) = ("EGRESS_GATEWAY", "192.168.12.1");
const DEST: (&str, &str) = ("EGRESS_DESTINATION", "80 tcp 203.0.113.25");

#[test]
fn source_and_gateway() {
    let s = parse_source("1.2.3.4").unwrap();
    assert_eq!(s.addr, Ipv4Addr::new(1, 2, 3, 4));
    assert_eq!(s.net.to_string(), "1.2.3.4/32");
    let s = parse_source("1.2.3.4/24").unwrap();
    assert_eq!(
        (s.addr, s.net.to_string()),
        (Ipv4Addr::new(1, 2, 3, 4), "1.2.3.4/24".into())
    );
    assert_eq!(parse_source(" 1.2.3.4/0\n").unwrap().net.prefix_len(), 0);
    for (bad, why) in [
        ("not an IP address", "not an IPv4 address"),
        ("not\nan\nIP\naddress", "not an IPv4 address"),
        ("1.2.3.4/33", "greater than 32"),
        ("1.2.3.4/", "not a prefix length"),
        ("1.2.3.4/x", "not a prefix length"),
        ("1.2.3.4/24/1", "not a prefix length"),
        ("1.2.3.256", "not an IPv4 address"),
        ("2001:db8::1", "not an IPv4 address"),
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1/8", "loopback"),
    ] {
        let e = parse_source(bad).unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
    assert_eq!(
        parse_gateway("192.168.12.1\n"),
        Ok(Ipv4Addr::new(192, 168, 12, 1))
    );
    for bad in ["1.2.3.4/24", "x", "", "224.0.0.1", "1.1.1.01"] {
        assert!(parse_gateway(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn whole_environment() {
    let cfg = parse(&vars(&[SRC, GW, DEST])).unwrap();
    assert_eq!(cfg.mode, Mode::Legacy);
    assert_eq!(cfg.source.addr, Ipv4Addr::new(192, 168, 12, 99));
    assert_eq!(cfg.gateway, Ipv4Addr::new(192, 168, 12, 1));
    assert!(!cfg.debug && !cfg.dns_debug && !cfg.proxy_unit_test);
    assert_eq!(cfg.redirect.as_ref().unwrap().rules.len(), 1);
    assert!(cfg.http.is_none() && cfg.dns.is_none());

    for (mode, want) in [
        ("", Mode::Legacy),
        ("legacy", Mode::Legacy),
        ("init", Mode::Init),
        ("unit-test", Mode::UnitTest),
        (" init\n", Mode::Init),
    ] {
        let cfg = parse(&vars(&[SRC, GW, DEST, ("EGRESS_ROUTER_MODE", mode)])).unwrap();
        assert_eq!(cfg.mode, want);
        assert!(cfg.redirect.is_some());
    }
    let cfg = parse(&vars(&[
        SRC,
        GW,
        DEST,
        ("EGRESS_ROUTER_DEBUG", "0"),
        ("EGRESS_DNS_PROXY_DEBUG", ""),
    ]))
    .unwrap();
    assert!(cfg.debug && !cfg.dns_debug, "non-empty is true, even 0");

    // Proxies: their rules, not EGRESS_DESTINATION; source and gateway needed.
    let cfg = parse(&vars(&[
        SRC,
        GW,
        ("EGRESS_ROUTER_MODE", "http-proxy"),
        ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
    ]))
    .unwrap();
    assert!(cfg.redirect.is_none() && cfg.http.is_some() && !cfg.proxy_unit_test);
    let cfg = parse(&vars(&[
        SRC,
        GW,
        ("EGRESS_ROUTER_MODE", "dns-proxy"),
        ("EGRESS_DNS_PROXY_DESTINATION", "53 dns.example.com"),
        ("EGRESS_DNS_PROXY_DEBUG", "1"),
        // Meant for the other proxy: no effect here.
        ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
    ]))
    .unwrap();
    assert!(cfg.dns.is_some() && cfg.dns_debug && !cfg.proxy_unit_test);

    // Proxy unit-test modes need neither source nor gateway, as OpenShift's proxy scripts.
    let cfg = parse(&vars(&[
        ("EGRESS_ROUTER_MODE", "http-proxy"),
        ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
        ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
    ]))
    .unwrap();
    assert!(cfg.proxy_unit_test && !cfg.source.is_set() && cfg.gateway.is_unspecified());
    let cfg = parse(&vars(&[
        ("EGRESS_ROUTER_MODE", "dns-proxy"),
        ("EGRESS_DNS_PROXY_MODE", "unit-test"),
        ("EGRESS_DNS_PROXY_DESTINATION", "53 1.1.1.1"),
    ]))
    .unwrap();
    assert!(cfg.proxy_unit_test && cfg.source == EgressSource::UNSET);
}

const ONE: (&str, &str) = ("EGRESS_ONE_PROCESS", "true");

#[test]
fn whole_environment_errors() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[GW, DEST],
            &["EGRESS_SOURCE unspecified or invalid: not set (expected A.B.C.D or A.B.C.D/len"],
        ),
        (
            &[SRC, DEST],
            &["EGRESS_GATEWAY unspecified or invalid: not set"],
        ),
        (
            &[("EGRESS_SOURCE", "not an IP address"), GW, DEST],
            &[
                "EGRESS_SOURCE unspecified or invalid: 'not an IP address': not an IP address is not an IPv4 address",
            ],
        ),
        (
            &[SRC, ("EGRESS_GATEWAY", "not an IP address"), DEST],
            &["EGRESS_GATEWAY unspecified or invalid: 'not an IP address'"],
        ),
        (
            &[
                ("EGRESS_SOURCE", "1.2.3.4"),
                ("EGRESS_GATEWAY", "1.2.3.4"),
                DEST,
            ],
            &["EGRESS_GATEWAY unspecified or invalid: '1.2.3.4': it is EGRESS_SOURCE itself"],
        ),
        (&[SRC, GW], &["EGRESS_DESTINATION unspecified"]),
        (
            &[SRC, GW, ("EGRESS_DESTINATION", "")],
            &["EGRESS_DESTINATION unspecified"],
        ),
        (
            &[
                SRC,
                GW,
                ("EGRESS_ROUTER_MODE", "init"),
                ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
            ],
            &[
                "EGRESS_DESTINATION unspecified: not set (expected <localport> <tcp|udp|sctp> <ip> [<remoteport>] or a fallback <ip>, one rule a line); EGRESS_HTTP_PROXY_DESTINATION is set: for the http-proxy container, leave EGRESS_ROUTER_MODE unset; for its init container, set EGRESS_ROUTER_MODE=http-proxy (EGRESS_ROUTER_MODE is init)",
            ],
        ),
        // Which container is meant cannot be told: never guessed.
        (
            &[SRC, GW, DEST, ("EGRESS_HTTP_PROXY_DESTINATION", "*")],
            &[
                "EGRESS_ROUTER_MODE is unset and both EGRESS_DESTINATION (the router in legacy mode) and EGRESS_HTTP_PROXY_* (the http-proxy container) are set",
            ],
        ),
        (
            &[
                ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
                ("EGRESS_DNS_PROXY_DESTINATION", "80 1.2.3.4"),
            ],
            &[
                "both HTTP proxy (EGRESS_HTTP_PROXY_*) and DNS proxy (EGRESS_DNS_PROXY_*) variables are set",
            ],
        ),
        (
            &[SRC, GW, DEST, ("EGRESS_ONE_PROCESS", "true")],
            &["EGRESS_ONE_PROCESS is set but EGRESS_ROUTER_MODE is not"],
        ),
        (
            &[
                SRC,
                GW,
                DEST,
                ("EGRESS_ROUTER_MODE", "init"),
                ("EGRESS_ONE_PROCESS", "true"),
            ],
            &[
                "EGRESS_ONE_PROCESS applies to EGRESS_ROUTER_MODE http-proxy and dns-proxy, not init",
            ],
        ),
        (
            &[
                SRC,
                GW,
                ("EGRESS_ROUTER_MODE", "http-proxy"),
                ("EGRESS_ONE_PROCESS", "on"),
            ],
            &["EGRESS_ONE_PROCESS 'on' is invalid (expected true or false)"],
        ),
        (
            &[
                ("EGRESS_DNS_PROXY_MODE", "unit-test"),
                ("EGRESS_DNS_PROXY_DESTINATION", ""),
                ("EGRESS_DNS_SERVERS", "a.com:1;b.com"),
            ],
            &[
                "EGRESS_DNS_SERVERS: 'b.com': Invalid server entry in EGRESS_DNS_SERVERS: b.com",
                "Must specify EGRESS_DNS_PROXY_DESTINATION",
            ],
        ),
        (
            &[SRC, GW, DEST, ("EGRESS_ROUTER_MODE", "proxy")],
            &[
                "Unrecognized EGRESS_ROUTER_MODE 'proxy' (expected init, legacy, http-proxy, dns-proxy or unit-test",
            ],
        ),
        (
            &[SRC, GW, DEST, ("EGRESS_ROUTER_MODE", "LEGACY")],
            &["Unrecognized EGRESS_ROUTER_MODE 'LEGACY'"],
        ),
        (
            &[("EGRESS_ROUTER_MODE", "bogus")],
            &[
                "Unrecognized EGRESS_ROUTER_MODE 'bogus'",
                "EGRESS_SOURCE unspecified or invalid",
                "EGRESS_GATEWAY unspecified or invalid",
            ],
        ),
        (
            &[SRC, GW, ("EGRESS_ROUTER_MODE", "http-proxy"), ONE],
            &["No EGRESS_HTTP_PROXY_DESTINATION specified"],
        ),
        (
            &[SRC, GW, ("EGRESS_ROUTER_MODE", "dns-proxy"), ONE],
            &["Must specify EGRESS_DNS_PROXY_DESTINATION"],
        ),
        (
            &[
                ("EGRESS_ROUTER_MODE", "http-proxy"),
                ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
            ],
            &[
                "EGRESS_SOURCE unspecified or invalid: not set",
                "EGRESS_GATEWAY unspecified or invalid: not set",
            ],
        ),
        (
            &[
                ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
                ("EGRESS_HTTP_PROXY_MODE", "test"),
            ],
            &["EGRESS_HTTP_PROXY_MODE 'test' is invalid (expected unit-test, or unset)"],
        ),
        (
            &[
                ("EGRESS_DNS_PROXY_DESTINATION", "80 1.2.3.4"),
                ("EGRESS_DNS_PROXY_MODE", "yes"),
            ],
            &["EGRESS_DNS_PROXY_MODE 'yes' is invalid"],
        ),
        (
            // Given in a proxy unit-test mode, source and gateway are still checked.
            &[
                ("EGRESS_ROUTER_MODE", "http-proxy"),
                ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
                ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
                ("EGRESS_SOURCE", "1.2.3"),
            ],
            &["EGRESS_SOURCE unspecified or invalid: '1.2.3'"],
        ),
        (
            // Every variable's every problem at once.
            &[
                ("EGRESS_SOURCE", "1.2.3.4/40"),
                ("EGRESS_GATEWAY", "gw"),
                ("EGRESS_DESTINATION", "80 tcp x\n90 tcp y"),
            ],
            &[
                "EGRESS_SOURCE unspecified or invalid",
                "EGRESS_GATEWAY unspecified or invalid",
                "EGRESS_DESTINATION line 1",
                "EGRESS_DESTINATION line 2",
            ],
        ),
    ];
    for (pairs, want) in cases {
        let errs = parse(&vars(pairs))
            .expect_err(&format!("{pairs:?} should be refused"))
            .0;
        assert_eq!(errs.len(), want.len(), "{pairs:?}: {errs:#?}");
        for (e, w) in errs.iter().zip(want.iter()) {
            assert!(e.contains(w), "{pairs:?}: {e:?} does not contain {w:?}");
        }
    }
}

#[test]
fn errors_display_one_a_line() {
    let e = ConfigErrors(vec!["a".into(), "b".into()]);
    assert_eq!(e.to_string(), "a\nb");
}

/// OpenShift's own unit-test table (egress/router/egress_router_test.go): the same output.
#[test]
fn nft_ruleset_matches_openshift() {
    let cases = [
        (
            "1.2.3.4",
            "10.1.2.3",
            "add rule ip nat prerouting iifname \"eth0\" dnat to 10.1.2.3\n",
        ),
        (
            "1.2.3.4/24",
            "10.1.2.3",
            "add rule ip nat prerouting iifname \"eth0\" dnat to 10.1.2.3\n",
        ),
        (
            "1.2.3.4",
            "10.1.2.3\n",
            "add rule ip nat prerouting iifname \"eth0\" dnat to 10.1.2.3\n",
        ),
        (
            "1.2.3.4",
            "80 tcp 10.4.5.6",
            "add rule ip nat prerouting iifname \"eth0\" tcp dport 80 dnat to 10.4.5.6\n",
        ),
        (
            "1.2.3.4",
            "8080 tcp 10.7.8.9 80",
            "add rule ip nat prerouting iifname \"eth0\" tcp dport 8080 dnat to 10.7.8.9:80\n",
        ),
        (
            "1.2.3.4",
            "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3",
            "add rule ip nat prerouting iifname \"eth0\" tcp dport 80 dnat to 10.4.5.6\n\
             add rule ip nat prerouting iifname \"eth0\" tcp dport 8080 dnat to 10.7.8.9:80\n\
             add rule ip nat prerouting iifname \"eth0\" dnat to 10.1.2.3\n",
        ),
        (
            "1.2.3.4",
            "# rules\n80 TCP 10.4.5.6 # web\n53\tudp\t10.4.5.7\n",
            "add rule ip nat prerouting iifname \"eth0\" tcp dport 80 dnat to 10.4.5.6\n\
             add rule ip nat prerouting iifname \"eth0\" udp dport 53 dnat to 10.4.5.7\n",
        ),
        ("1.2.3.4", "# nothing", ""),
    ];
    for (source, dest, prerouting) in cases {
        let cfg = parse(&vars(&[
            ("EGRESS_ROUTER_MODE", "unit-test"),
            ("EGRESS_SOURCE", source),
            ("EGRESS_GATEWAY", "1.1.1.1"),
            ("EGRESS_DESTINATION", dest),
        ]))
        .unwrap();
        let want = format!(
            "{prerouting}add rule ip nat postrouting oifname \"macvlan0\" snat to 1.2.3.4\n"
        );
        assert_eq!(nft_ruleset(&cfg), want, "{dest:?}");
        assert!(nft_script(&cfg).starts_with("table ip nat {\n  chain prerouting {\n"));
        assert!(nft_script(&cfg).ends_with(&format!("flush table ip nat\n{want}")));
    }
    let proxy = parse(&vars(&[
        SRC,
        GW,
        ("EGRESS_ROUTER_MODE", "http-proxy"),
        ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
    ]))
    .unwrap();
    assert_eq!(nft_ruleset(&proxy), "");
    assert_eq!(nft_script(&proxy), "");
}

/// OpenShift's router image has no SCTP: its unit-test mode refuses an SCTP rule (as its own
/// test table expects), with our reason first and its line last; init and legacy accept it, and
/// its nftables form is what `check --openshift` prints for them.
#[test]
fn sctp_rules_are_refused_only_in_unit_test_mode() {
    let dest = ("EGRESS_DESTINATION", "80 tcp 10.4.5.6\n80 sctp 10.4.5.6");
    // With a remote port, too: only the dataplane learnt to change SCTP ports.
    let remote = ("EGRESS_DESTINATION", "8080 sctp 203.0.113.26 80");
    let e = parse(&vars(&[
        ("EGRESS_ROUTER_MODE", "unit-test"),
        SRC,
        GW,
        remote,
    ]))
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("OpenShift's router image has no SCTP")
            && e.to_string()
                .ends_with("EGRESS_DESTINATION value '8080 sctp 203.0.113.26 80' is invalid"),
        "{e}"
    );
    let e = parse(&vars(&[("EGRESS_ROUTER_MODE", "unit-test"), SRC, GW, dest])).unwrap_err();
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("OpenShift's router image has no SCTP"),
        "{text}"
    );
    assert_eq!(
        lines[1],
        "EGRESS_DESTINATION value '80 sctp 10.4.5.6' is invalid"
    );
    for mode in ["init", "legacy"] {
        let cfg = parse(&vars(&[("EGRESS_ROUTER_MODE", mode), SRC, GW, dest])).unwrap();
        assert!(
            nft_script(&cfg).contains("iifname \"eth0\" sctp dport 80 dnat to 10.4.5.6\n"),
            "{mode}"
        );
        let cfg = parse(&vars(&[("EGRESS_ROUTER_MODE", mode), SRC, GW, remote])).unwrap();
        assert!(
            nft_script(&cfg).contains("iifname \"eth0\" sctp dport 8080 dnat to 203.0.113.26:80\n"),
            "{mode}: {}",
            nft_script(&cfg)
        );
    }
}

#[test]
fn describe_redirect() {
    let cfg = parse(&vars(&[
        SRC,
        GW,
        (
            "EGRESS_DESTINATION",
            "# web\n80 tcp 203.0.113.25\n8080 tcp 203.0.113.25 80\n53 UDP 203.0.113.53\n203.0.113.26\n",
        ),
    ]))
    .unwrap();
    assert_eq!(
        describe(&cfg),
        "mode: legacy (set up the network and the eBPF redirect, then stay until SIGTERM)\n\
         source: 192.168.12.99 (macvlan0 address 192.168.12.99/24, the source address outside)\n\
         gateway: 192.168.12.1 (default route via macvlan0)\n\
         debug: off\n\
         EGRESS_DESTINATION: 3 rules and a fallback\n\
         rule 1 (line 2): tcp port 80 -> 203.0.113.25:80\n\
         rule 2 (line 3): tcp port 8080 -> 203.0.113.25:80\n\
         rule 3 (line 4): udp port 53 -> 203.0.113.53:53\n\
         fallback: everything else -> 203.0.113.26 (any protocol, same port)\n"
    );
    let cfg = parse(&vars(&[
        SRC,
        GW,
        ("EGRESS_DESTINATION", "1 sctp 203.0.113.25"),
        ("EGRESS_ROUTER_DEBUG", "1"),
    ]))
    .unwrap();
    let d = describe(&cfg);
    assert!(d.contains("debug: on\n"), "{d}");
    assert!(
        d.contains("EGRESS_DESTINATION: 1 rule, no fallback\n"),
        "{d}"
    );
    assert!(
        d.contains("rule 1 (line 1): sctp port 1 -> 203.0.113.25:1\n"),
        "{d}"
    );
    assert!(
        d.contains("no fallback: everything else is not forwarded"),
        "{d}"
    );
}

#[test]
fn describe_proxies() {
    let cfg = parse(&vars(&[
        ("EGRESS_ROUTER_MODE", "http-proxy"),
        ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
        (
            "EGRESS_HTTP_PROXY_DESTINATION",
            "www.example.com\n!10.0.0.1\n# x\n!*.Example.com\n192.168.1.0/24\n",
        ),
    ]))
    .unwrap();
    assert_eq!(
        describe(&cfg),
        "mode: http-proxy (EGRESS_HTTP_PROXY_MODE=unit-test: print the squid ACLs OpenShift's \
         image generates, change nothing)\n\
         source: not set (a proxy container leaves from the address on macvlan0)\n\
         gateway: not set (the init container's route is used)\n\
         debug: off\n\
         EGRESS_HTTP_PROXY_DESTINATION: 4 rules, checked in order, first match wins\n\
         rule 1 (line 1): allow www.example.com (exactly that host)\n\
         rule 2 (line 2): deny 10.0.0.1 (that destination address)\n\
         rule 3 (line 4): deny *.example.com (the domain and every subdomain)\n\
         rule 4 (line 5): allow 192.168.1.0/24 (destination addresses in that network)\n\
         otherwise: deny (403 Forbidden)\n"
    );
    let cfg = parse(&vars(&[
        SRC,
        GW,
        ("EGRESS_ROUTER_MODE", "http-proxy"),
        ("EGRESS_HTTP_PROXY_DESTINATION", "!*.example.com\n*"),
    ]))
    .unwrap();
    let d = describe(&cfg);
    assert!(d.contains("rule 2 (line 2): allow * (everything)\n"), "{d}");
    assert!(!d.contains("otherwise"), "{d}");
    assert!(
        d.contains("the HTTP proxy pod's init container: set up the network, then exit"),
        "{d}"
    );

    let cfg = parse(&vars(&[
        ("EGRESS_ROUTER_MODE", "dns-proxy"),
        ("EGRESS_DNS_PROXY_MODE", "unit-test"),
        (
            "EGRESS_DNS_PROXY_DESTINATION",
            "53 dns.example.com\n80 11.12.13.14 8080\n81 2001:db8::1",
        ),
    ]))
    .unwrap();
    let d = describe(&cfg);
    assert!(
        d.contains("EGRESS_DNS_PROXY_DESTINATION: 3 listeners (TCP)\n"),
        "{d}"
    );
    assert!(
        d.contains("listener 1 (line 1): port 53 -> dns.example.com:53 (re-resolved)\n"),
        "{d}"
    );
    assert!(
        d.contains("listener 2 (line 2): port 80 -> 11.12.13.14:8080\n"),
        "{d}"
    );
    assert!(
        d.contains("listener 3 (line 3): port 81 -> [2001:db8::1]:81\n"),
        "{d}"
    );
}

#[test]
fn render_examples() {
    let cfg = parse(&vars(&[
        SRC,
        GW,
        ("EGRESS_ROUTER_MODE", "init"),
        (
            "EGRESS_DESTINATION",
            "# c\n80 TCP 10.0.0.1 80\n81\tudp 10.0.0.2 82 # x\n10.0.0.3\r\n",
        ),
    ]))
    .unwrap();
    let v = render(&cfg);
    assert_eq!(
        v["EGRESS_DESTINATION"],
        "80 tcp 10.0.0.1\n81 udp 10.0.0.2 82\n10.0.0.3\n"
    );
    assert_eq!(v["EGRESS_SOURCE"], "192.168.12.99/24");
    assert_eq!(v["EGRESS_ROUTER_MODE"], "init");
    let again = parse(&v).unwrap();
    assert_eq!(
        again.redirect.unwrap().fallback,
        cfg.redirect.unwrap().fallback
    );
    assert_eq!(render_http(&[]), "# no rules\n");
    assert_eq!(parse_http(Some(&render_http(&[]))), Ok(vec![]));
}
