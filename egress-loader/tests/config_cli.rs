//! The configuration as the binary sees it: run `egress-router` with a clean environment and the
//! OpenShift variables, and check what it prints and how it exits. Needs no root: only modes and
//! commands that change nothing are run.
use std::process::{Command, Output};

fn run(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egress-router"))
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .expect("egress-router runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const TYPICAL: &str = "\
# Port 80 to the web server
80 tcp 203.0.113.25
# 8080 to its port 80
8080\tTCP 203.0.113.25 80   # tabs, case, trailing comment
53 udp 203.0.113.53\r
53 tcp 203.0.113.53
# everything else
203.0.113.26
";

#[test]
fn unit_test_mode_prints_the_nftables_rules() {
    let o = run(
        &[],
        &[
            ("EGRESS_ROUTER_MODE", "unit-test"),
            ("EGRESS_SOURCE", "192.168.12.99/24"),
            ("EGRESS_GATEWAY", "192.168.12.1"),
            ("EGRESS_DESTINATION", TYPICAL),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "add rule ip nat prerouting iifname \"eth0\" tcp dport 80 dnat to 203.0.113.25\n\
         add rule ip nat prerouting iifname \"eth0\" tcp dport 8080 dnat to 203.0.113.25:80\n\
         add rule ip nat prerouting iifname \"eth0\" udp dport 53 dnat to 203.0.113.53\n\
         add rule ip nat prerouting iifname \"eth0\" tcp dport 53 dnat to 203.0.113.53\n\
         add rule ip nat prerouting iifname \"eth0\" dnat to 203.0.113.26\n\
         add rule ip nat postrouting oifname \"macvlan0\" snat to 192.168.12.99\n"
    );
}

#[test]
fn unit_test_mode_matches_openshift_output() {
    // OpenShift's egress_router_test.go, its commented example.
    let dest = "\n# My egress-router rules\n\n# Port 80 forwards to 10.4.5.6\n80 tcp 10.4.5.6\n\n\
                # Port 8080 forwards to port 80 on 10.7.8.9\n8080 tcp 10.7.8.9 80\n\n\
                # Skip this rule for now\n# 8443 tcp 10.7.8.9 443\n\n# Add new rules here\n\n\
                # Fallback; don't add anything after this\n10.1.2.3\n\n\
                # No, seriously, don't add anything here\n";
    let o = run(
        &[],
        &[
            ("EGRESS_ROUTER_MODE", "unit-test"),
            ("EGRESS_SOURCE", "1.2.3.4"),
            ("EGRESS_GATEWAY", "1.1.1.1"),
            ("EGRESS_DESTINATION", dest),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "add rule ip nat prerouting iifname \"eth0\" tcp dport 80 dnat to 10.4.5.6\n\
         add rule ip nat prerouting iifname \"eth0\" tcp dport 8080 dnat to 10.7.8.9:80\n\
         add rule ip nat prerouting iifname \"eth0\" dnat to 10.1.2.3\n\
         add rule ip nat postrouting oifname \"macvlan0\" snat to 1.2.3.4\n"
    );
}

#[test]
fn check_describes_the_configuration() {
    let o = run(
        &["check"],
        &[
            ("EGRESS_SOURCE", "192.168.12.99/24"),
            ("EGRESS_GATEWAY", "192.168.12.1"),
            ("EGRESS_DESTINATION", TYPICAL),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "mode: legacy (set up the network and the eBPF redirect, then stay until SIGTERM)\n\
         source: 192.168.12.99 (macvlan0 address 192.168.12.99/24, the source address outside)\n\
         gateway: 192.168.12.1 (default route via macvlan0)\n\
         debug: off\n\
         EGRESS_DESTINATION: 4 rules and a fallback\n\
         rule 1 (line 2): tcp port 80 -> 203.0.113.25:80\n\
         rule 2 (line 4): tcp port 8080 -> 203.0.113.25:80\n\
         rule 3 (line 5): udp port 53 -> 203.0.113.53:53\n\
         rule 4 (line 6): tcp port 53 -> 203.0.113.53:53\n\
         fallback: everything else -> 203.0.113.26 (any protocol, same port)\n"
    );
}

#[test]
fn flags_work_like_the_variables() {
    let o = run(
        &[
            "--egress-source",
            "10.0.0.5",
            "--egress-gateway",
            "10.0.0.1",
            "--egress-destination",
            "10.9.9.9",
            "check",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("fallback: everything else -> 10.9.9.9"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn invalid_input_exits_1_with_every_error() {
    let o = run(
        &["check"],
        &[
            ("EGRESS_SOURCE", "192.168.12.99/24"),
            ("EGRESS_GATEWAY", "192.168.12.1"),
            (
                "EGRESS_DESTINATION",
                "# rules\n80 tcp 203.0.113.25\n80 tcp 10.0.0.300\n8080 tcp 203.0.113.25 99999\n\
                 203.0.113.26\n443 tcp 203.0.113.25\n",
            ),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "", "nothing printed on stdout");
    let err = stderr(&o);
    let want = [
        "EGRESS_DESTINATION line 3: '80 tcp 10.0.0.300': EGRESS_DESTINATION value '80 tcp \
         10.0.0.300' is invalid: 10.0.0.300 is not an IPv4 address (expected <localport> \
         <tcp|udp|sctp> <ip> [<remoteport>] or a fallback <ip>)",
        "EGRESS_DESTINATION line 3: '80 tcp 10.0.0.300': EGRESS_DESTINATION localport 80 is \
         already used, must be unique for each destination",
        "EGRESS_DESTINATION line 4: '8080 tcp 203.0.113.25 99999': Invalid port: 99999, must be \
         in the range 1 to 65535",
        "EGRESS_DESTINATION line 6: '443 tcp 203.0.113.25': EGRESS_DESTINATION fallback IP must \
         be the last line",
    ];
    for w in want {
        assert!(err.contains(w), "{err}\ndoes not contain\n{w}");
    }
    // Then OpenShift's own line for the first problem, last, as its runbooks and tests read it.
    assert_eq!(
        err.lines().filter(|l| !l.is_empty()).count(),
        want.len() + 1,
        "{err}"
    );
    assert_eq!(
        err.lines().last(),
        Some("EGRESS_DESTINATION value '80 tcp 10.0.0.300' is invalid"),
        "{err}"
    );
}

#[test]
fn missing_and_invalid_variables() {
    let o = run(&["check"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    for w in [
        "EGRESS_SOURCE unspecified or invalid",
        "EGRESS_GATEWAY unspecified or invalid",
        "EGRESS_DESTINATION unspecified",
    ] {
        assert!(err.contains(w), "{err}");
    }

    let o = run(
        &[],
        &[
            ("EGRESS_ROUTER_MODE", "bogus"),
            ("EGRESS_SOURCE", "1.2.3.4"),
            ("EGRESS_GATEWAY", "1.1.1.1"),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Unrecognized EGRESS_ROUTER_MODE 'bogus'"));

    let o = run(
        &[],
        &[
            ("EGRESS_ROUTER_MODE", "unit-test"),
            ("EGRESS_SOURCE", "1.2.3.4"),
            ("EGRESS_GATEWAY", "1.1.1.1"),
            (
                "EGRESS_DESTINATION",
                "80 sctp 10.0.0.1 0\n80 tcp 2001:db8::1",
            ),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("Invalid port: 0, must be in the range 1 to 65535"),
        "{err}"
    );
    assert!(err.contains("IPv4-only"), "{err}");
    assert_eq!(stdout(&o), "");
}

/// `check` describes the rules in words (unit-test mode prints squid's ACLs instead, as
/// OpenShift's image does: tests/openshift_images.rs).
#[test]
fn check_describes_the_http_proxy_rules() {
    let o = run(
        &["check"],
        &[
            ("EGRESS_ROUTER_MODE", "http-proxy"),
            ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
            (
                "EGRESS_HTTP_PROXY_DESTINATION",
                "# allowed\nwww.example.com\n!*.example.com\n192.168.1.0/24\n!fe80::/10\n*\n",
            ),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for w in [
        "mode: http-proxy",
        "rule 1 (line 2): allow www.example.com (exactly that host)\n",
        "rule 2 (line 3): deny *.example.com (the domain and every subdomain)\n",
        "rule 3 (line 4): allow 192.168.1.0/24 (destination addresses in that network)\n",
        "rule 4 (line 5): deny fe80::/10 (destination addresses in that network)\n",
        "rule 5 (line 6): allow * (everything)\n",
    ] {
        assert!(out.contains(w), "{out}\ndoes not contain {w}");
    }
}

#[test]
fn http_proxy_unit_test_errors() {
    let o = run(
        &[],
        &[
            ("EGRESS_ROUTER_MODE", "http-proxy"),
            ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
            ("EGRESS_HTTP_PROXY_DESTINATION", "http://x\n*\nx.com:80"),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("line 1: 'http://x': Bad destination 'http://x'"),
        "{err}"
    );
    assert!(
        err.contains("line 3: 'x.com:80': Wildcard must be last rule, if present"),
        "{err}"
    );
    assert!(
        err.contains("line 3: 'x.com:80': Bad destination 'x.com:80'"),
        "{err}"
    );

    let o = run(
        &[],
        &[
            ("EGRESS_ROUTER_MODE", "http-proxy"),
            ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("No EGRESS_HTTP_PROXY_DESTINATION specified"));
}

#[test]
fn check_describes_the_dns_proxy_rules() {
    let o = run(
        &["check"],
        &[
            ("EGRESS_ROUTER_MODE", "dns-proxy"),
            ("EGRESS_DNS_PROXY_MODE", "unit-test"),
            (
                "EGRESS_DNS_PROXY_DESTINATION",
                "53 dns.example.com\n80 11.12.13.14 8080\n",
            ),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("listener 1 (line 1): port 53 -> dns.example.com:53 (re-resolved)\n"),
        "{out}"
    );
    assert!(
        out.contains("listener 2 (line 2): port 80 -> 11.12.13.14:8080\n"),
        "{out}"
    );

    let o = run(
        &[],
        &[
            ("EGRESS_ROUTER_MODE", "dns-proxy"),
            ("EGRESS_DNS_PROXY_MODE", "unit-test"),
            ("EGRESS_DNS_PROXY_DESTINATION", "80 11.12.13.14\n80 dns\n"),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("Proxy port 80 already used, must be unique for each destination"),
        "{err}"
    );
    assert!(err.contains("Bad destination '80 dns'"), "{err}");
}

/// `--log-format json` (or EGRESS_LOG_FORMAT=json): every log line is one JSON object with the
/// event's fields at the top level. The exporter, which needs no root, logs at start and on
/// SIGTERM, then exits 0.
#[test]
fn json_logs_are_one_object_a_line() {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_egress-router"))
        .args([
            "exporter",
            "--bpffs-dir",
            "/nonexistent/egress-router",
            "--metrics-address",
            "127.0.0.1:0",
        ])
        .env_clear()
        .env("EGRESS_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut objects = Vec::new();
    for line in lines.by_ref().take(2) {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        objects.push(v);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        objects[0]["message"],
        "metrics and health listener: /metrics /healthz /readyz"
    );
    assert!(
        objects[0]["listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(objects[1]["level"], "WARN");
    assert_eq!(objects[1]["bpffs"], "/nonexistent/egress-router");
    assert!(
        rest.iter()
            .any(|l| l.contains("\"SIGTERM received: shutting down\"")),
        "{rest:?}"
    );
}
