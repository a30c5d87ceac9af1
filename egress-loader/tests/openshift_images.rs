//! OpenShift's unit tests of its three images (openshift/images: egress/router, egress/http-proxy,
//! egress/dns-proxy), as cases of our own: the same inputs, the outputs OpenShift's tests expect,
//! compared the way they compare them. Each run is the binary with exactly the test's variables
//! (no other environment) and stdout and stderr in one stream, as Go's CombinedOutput gives
//! them: success cases compare the whole stream (nothing may be logged), error cases need a
//! non-zero exit and OpenShift's message as the last line.
//!
//! Every case also runs as OpenShift's tests run their image's script: the two-line wrapper of
//! deploy/openshift-images for that image, with nothing but the test's variables, so that the
//! shell finds `egress-router` on its default PATH (here /usr/local/bin, in a mount namespace of
//! the case's own); it must print and exit exactly as the binary does.
use std::{
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

/// Runs egress-router with only `vars`, directly and through its image's wrapper; both must
/// give the same. Returns the exit status and everything written, in order.
fn combined(vars: &[(&str, &str)]) -> (ExitStatus, String) {
    let direct = run_captured(Command::new(env!("CARGO_BIN_EXE_egress-router")), vars);
    let wrapped = run_captured(through_wrapper(vars), vars);
    assert_eq!(
        (wrapped.0.code(), &wrapped.1),
        (direct.0.code(), &direct.1),
        "{} with {vars:?} differs from the binary run directly",
        wrapper(vars).display()
    );
    direct
}

/// The wrapper that replaces the script of the image these variables are for.
fn wrapper(vars: &[(&str, &str)]) -> PathBuf {
    let has = |k: &str| vars.iter().any(|(name, _)| *name == k);
    let image = if has("EGRESS_HTTP_PROXY_DESTINATION") {
        "http-proxy/egress-http-proxy.sh"
    } else if has("EGRESS_DNS_PROXY_DESTINATION") {
        "dns-proxy/egress-dns-proxy.sh"
    } else {
        "router/egress-router.sh"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/openshift-images")
        .join(image)
}

/// The wrapper run with an empty environment but `vars` (added by [`run_captured`]), in a mount
/// namespace whose /usr/local/bin holds only egress-router (needs root, as `cargo xtask test`).
fn through_wrapper(vars: &[(&str, &str)]) -> Command {
    let bin = std::env::temp_dir().join(format!("er-openshift-images-bin-{}", std::process::id()));
    if !bin.join("egress-router").exists() {
        std::fs::create_dir_all(&bin).unwrap();
        let _ = std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_egress-router"),
            bin.join("egress-router"),
        );
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(r#"mount --bind "$0" /usr/local/bin && exec /usr/bin/env -i "$@""#)
        .arg(&bin);
    cmd.args(vars.iter().map(|(k, v)| format!("{k}={v}")))
        .arg(wrapper(vars));
    cmd
}

/// Runs `cmd` with only `vars`, stdout and stderr into one file.
fn run_captured(mut cmd: Command, vars: &[(&str, &str)]) -> (ExitStatus, String) {
    let dir = std::env::temp_dir().join(format!("er-openshift-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:?}.out", std::thread::current().id()));
    let out = File::create(&path).unwrap();
    let status = cmd
        .env_clear()
        .envs(vars.iter().copied())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .expect("egress-router runs");
    let mut text = String::new();
    File::open(&path)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    (status, text)
}

/// An error case: a non-zero exit, the stream ends with a newline, and its last line is `want`.
fn assert_last_line(vars: &[(&str, &str)], want: &str) {
    let (status, out) = combined(vars);
    assert!(!status.success(), "{vars:?} should fail, printed {out:?}");
    assert!(
        out.ends_with('\n'),
        "{vars:?}: {out:?} does not end with a newline"
    );
    let last = out.trim_end_matches('\n').rsplit('\n').next().unwrap();
    assert_eq!(last, want, "{vars:?}: the whole output was {out:?}");
}

// ---------------------------------------------------------------------------------------------
// egress/router: EGRESS_ROUTER_MODE=unit-test prints the nftables rules.

const SNAT: &str = "add rule ip nat postrouting oifname \"macvlan0\" snat to 1.2.3.4\n";

fn router(source: &str, gateway: &str, dest: &str) -> Vec<(&'static str, String)> {
    vec![
        ("EGRESS_ROUTER_MODE", "unit-test".to_string()),
        ("EGRESS_SOURCE", source.to_string()),
        ("EGRESS_GATEWAY", gateway.to_string()),
        ("EGRESS_DESTINATION", dest.to_string()),
    ]
}

fn refs<'a>(v: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

const ROUTER_COMMENTED: &str = "
# My egress-router rules

# Port 80 forwards to 10.4.5.6
80 tcp 10.4.5.6

# Port 8080 forwards to port 80 on 10.7.8.9
8080 tcp 10.7.8.9 80

# Skip this rule for now
# 8443 tcp 10.7.8.9 443

# Add new rules here

# Fallback; don't add anything after this
10.1.2.3

# No, seriously, don't add anything here
";

#[test]
fn router_unit_test_prints_openshifts_nftables_rules() {
    let fallback = "add rule ip nat prerouting iifname \"eth0\" dnat to 10.1.2.3\n";
    let r80 = "add rule ip nat prerouting iifname \"eth0\" tcp dport 80 dnat to 10.4.5.6\n";
    let r8080 = "add rule ip nat prerouting iifname \"eth0\" tcp dport 8080 dnat to 10.7.8.9:80\n";
    let cases: &[(&str, &str, String)] = &[
        ("1.2.3.4", "10.1.2.3", format!("{fallback}{SNAT}")),
        ("1.2.3.4/24", "10.1.2.3", format!("{fallback}{SNAT}")),
        ("1.2.3.4", "10.1.2.3\n", format!("{fallback}{SNAT}")),
        ("1.2.3.4", "80 tcp 10.4.5.6", format!("{r80}{SNAT}")),
        ("1.2.3.4", "8080 tcp 10.7.8.9 80", format!("{r8080}{SNAT}")),
        (
            "1.2.3.4",
            "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80",
            format!("{r80}{r8080}{SNAT}"),
        ),
        (
            "1.2.3.4",
            "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3",
            format!("{r80}{r8080}{fallback}{SNAT}"),
        ),
        (
            "1.2.3.4",
            ROUTER_COMMENTED,
            format!("{r80}{r8080}{fallback}{SNAT}"),
        ),
    ];
    for (source, dest, want) in cases {
        let vars = router(source, "1.1.1.1", dest);
        let (status, out) = combined(&refs(&vars));
        assert!(status.success(), "{dest:?}: {out}");
        assert_eq!(&out, want, "{source} / {dest:?}");
    }
}

#[test]
fn router_errors_end_with_openshifts_message() {
    let cases = [
        (
            "not an IP address",
            "1.1.1.1",
            "10.1.2.3",
            "EGRESS_SOURCE unspecified or invalid",
        ),
        (
            "not\nan\nIP\naddress",
            "1.1.1.1",
            "10.1.2.3",
            "EGRESS_SOURCE unspecified or invalid",
        ),
        (
            "1.2.3.4",
            "not an IP address",
            "10.1.2.3",
            "EGRESS_GATEWAY unspecified or invalid",
        ),
        ("1.2.3.4", "1.1.1.1", "", "EGRESS_DESTINATION unspecified"),
        (
            "1.2.3.4",
            "1.1.1.1",
            "not an IP address",
            "EGRESS_DESTINATION value 'not an IP address' is invalid",
        ),
        (
            "1.2.3.4",
            "1.1.1.1",
            "10.1.2.3\n80 tcp 10.4.5.6",
            "EGRESS_DESTINATION fallback IP must be the last line",
        ),
        (
            "1.2.3.4",
            "1.1.1.1",
            "10.1.2.3\n10.4.5.6",
            "EGRESS_DESTINATION fallback IP must be the last line",
        ),
        (
            "1.2.3.4",
            "1.1.1.1",
            "80 tcp 10.4.5.6\n10.1.2.3\n8080 tcp 10.7.8.9 80",
            "EGRESS_DESTINATION fallback IP must be the last line",
        ),
        (
            "1.2.3.4",
            "1.1.1.1",
            "80 tcp 10.4.5.6\ninvalid\n8080 tcp 10.7.8.9 80",
            "EGRESS_DESTINATION value 'invalid' is invalid",
        ),
        (
            "1.2.3.4",
            "1.1.1.1",
            "80 sctp 10.4.5.6",
            "EGRESS_DESTINATION value '80 sctp 10.4.5.6' is invalid",
        ),
        (
            "1.2.3.4",
            "1.1.1.1",
            "800000 tcp 10.4.5.6",
            "Invalid port: 800000, must be in the range 1 to 65535",
        ),
        (
            "1.2.3.4",
            "1.1.1.1",
            "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n80 tcp 10.7.8.9 900",
            "EGRESS_DESTINATION localport 80 is already used, must be unique for each destination",
        ),
    ];
    for (source, gateway, dest, want) in cases {
        let vars = router(source, gateway, dest);
        assert_last_line(&refs(&vars), want);
    }
}

/// Our own line comes first and says more; OpenShift's follows as the last line.
#[test]
fn our_precise_line_comes_before_openshifts() {
    let vars = router("1.2.3.4", "1.1.1.1", "80 tcp 10.4.5.300");
    let (_, out) = combined(&refs(&vars));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("EGRESS_DESTINATION line 1: '80 tcp 10.4.5.300': ")
            && lines[0].contains("10.4.5.300 is not an IPv4 address"),
        "{out}"
    );
    assert_eq!(
        lines[1],
        "EGRESS_DESTINATION value '80 tcp 10.4.5.300' is invalid"
    );
}

// ---------------------------------------------------------------------------------------------
// egress/http-proxy: EGRESS_HTTP_PROXY_MODE=unit-test prints squid's ACLs.

fn http(dest: &str) -> [(&str, &str); 2] {
    [
        ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
        ("EGRESS_HTTP_PROXY_DESTINATION", dest),
    ]
}

#[test]
fn http_proxy_unit_test_prints_openshifts_squid_acls() {
    let cases = [
        ("*", "\nhttp_access allow all\n"),
        (
            "example.com",
            "\nacl dest1 dstdomain example.com\nhttp_access allow dest1\n\nhttp_access deny all\n",
        ),
        (
            "!example.com",
            "\nacl dest1 dstdomain example.com\nhttp_access deny dest1\n\nhttp_access deny all\n",
        ),
        (
            "*.example.com",
            "\nacl dest1 dstdomain .example.com\nhttp_access allow dest1\n\nhttp_access deny all\n",
        ),
        (
            "192.168.1.1",
            "\nacl dest1 dst 192.168.1.1\nhttp_access allow dest1\n\nhttp_access deny all\n",
        ),
        (
            "192.168.1.0/24",
            "\nacl dest1 dst 192.168.1.0/24\nhttp_access allow dest1\n\nhttp_access deny all\n",
        ),
        (
            "\n!*.example.net\n*\n",
            "\nacl dest1 dstdomain .example.net\nhttp_access deny dest1\n\nhttp_access allow all\n",
        ),
        (
            "\n# HTTP proxy config\n\n!*.bad.example.com\n*.example.com\n\n192.168.0.0/16\nfe80::/10\n\n# end\n",
            "\nacl dest1 dstdomain .bad.example.com\nhttp_access deny dest1\n\
             \nacl dest2 dstdomain .example.com\nhttp_access allow dest2\n\
             \nacl dest3 dst 192.168.0.0/16\nhttp_access allow dest3\n\
             \nacl dest4 dst fe80::/10\nhttp_access allow dest4\n\
             \nhttp_access deny all\n",
        ),
    ];
    for (dest, want) in cases {
        let (status, out) = combined(&http(dest));
        assert!(status.success(), "{dest:?}: {out}");
        assert_eq!(out, want, "{dest:?}");
    }
}

#[test]
fn http_proxy_errors_end_with_openshifts_message() {
    for (dest, want) in [
        ("", "No EGRESS_HTTP_PROXY_DESTINATION specified"),
        ("*\nexample.com", "Wildcard must be last rule, if present"),
        ("foo bar", "Bad destination 'foo bar'"),
    ] {
        assert_last_line(&http(dest), want);
    }
}

// ---------------------------------------------------------------------------------------------
// egress/dns-proxy: EGRESS_DNS_PROXY_MODE=unit-test prints haproxy.cfg.

fn dns<'a>(dest: &'a str, servers: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("EGRESS_DNS_PROXY_DESTINATION", dest),
        ("EGRESS_DNS_PROXY_MODE", "unit-test"),
        ("EGRESS_DNS_SERVERS", servers),
    ]
}

fn frontend(n: usize, port: u16) -> String {
    format!("\nfrontend fe{n}\n    bind :{port}\n    default_backend be{n}")
}

fn backend(n: usize, server: &str) -> String {
    format!("\nbackend be{n}\n    {server}")
}

/// Each frontend and backend appears, and no other (OpenShift's test counts them).
fn assert_blocks(dest: &str, servers: &str, frontends: &[String], backends: &[String]) {
    let (status, out) = combined(&dns(dest, servers));
    assert!(status.success(), "{dest:?}: {out}");
    for want in frontends.iter().chain(backends) {
        assert!(
            out.contains(want.as_str()),
            "{dest:?}: {want:?} missing from {out}"
        );
    }
    assert_eq!(out.matches("\nfrontend ").count(), frontends.len(), "{out}");
    assert_eq!(out.matches("\nbackend ").count(), backends.len(), "{out}");
}

#[test]
fn dns_proxy_unit_test_prints_openshifts_frontends_and_backends() {
    let ip = |n, target: &str| backend(n, &format!("server dest1 {target} check"));
    let name = |n, server: &str, target: &str| {
        backend(
            n,
            &format!("{server} {target} check resolvers dns-resolver"),
        )
    };
    assert_blocks(
        "80 11.12.13.14",
        "",
        &[frontend(1, 80)],
        &[ip(1, "11.12.13.14:80")],
    );
    assert_blocks(
        "80 11.12.13.14\n8080 21.22.23.24 100",
        "",
        &[frontend(1, 80), frontend(2, 8080)],
        &[ip(1, "11.12.13.14:80"), ip(2, "21.22.23.24:100")],
    );
    assert_blocks(
        "80 example.com",
        "example.com:1;",
        &[frontend(1, 80)],
        &[name(1, "server dest1", "example.com:80")],
    );
    assert_blocks(
        "80 example.com\n8080 foo.com 100",
        "foo.com:1;example.com:1;",
        &[frontend(1, 80), frontend(2, 8080)],
        &[
            name(1, "server dest1", "example.com:80"),
            name(2, "server dest1", "foo.com:100"),
        ],
    );
    let mixed = [
        ip(1, "11.12.13.14:80"),
        name(2, "server dest1", "example.com:100"),
    ];
    assert_blocks(
        "80 11.12.13.14\n8080 example.com 100",
        "example.com:1;",
        &[frontend(1, 80), frontend(2, 8080)],
        &mixed,
    );
    assert_blocks(
        "\n# My DNS proxy egress router rules\n\n# Port 80 forwards to 11.12.13.14\n80 11.12.13.14\n\n\
         # Port 8080 forwards to port 100 on example.com\n8080 example.com 100\n\n\
         # Skip this rule for now\n# 9000 foo.com 200\n\n# End\n",
        "example.com:1;",
        &[frontend(1, 80), frontend(2, 8080)],
        &mixed,
    );
    assert_blocks(
        "\n# Port 8080 forwards to port 100 on example.com\n8080 example.com 100\n",
        "example.com:3;",
        &[frontend(1, 8080)],
        &[name(1, "server-template dest 3", "example.com:100")],
    );
    assert_blocks(
        "\n80 11.12.13.14\n9000 foo.com 200\n8080 example.com 100\n8081 bar.com 100\n",
        "bar.com:1;foo.com:2;example.com:1;",
        &[
            frontend(1, 80),
            frontend(2, 9000),
            frontend(3, 8080),
            frontend(4, 8081),
        ],
        &[
            ip(1, "11.12.13.14:80"),
            name(2, "server-template dest 2", "foo.com:200"),
            name(3, "server dest1", "example.com:100"),
            name(4, "server dest1", "bar.com:100"),
        ],
    );
}

#[test]
fn dns_proxy_errors_end_with_openshifts_message() {
    for (dest, want) in [
        ("", "Must specify EGRESS_DNS_PROXY_DESTINATION"),
        ("80 11.12.13.14\ninvalid", "Bad destination 'invalid'"),
        (
            "80 11.12.13.14\n8080 invalid",
            "Bad destination '8080 invalid'",
        ),
        (
            "99999 11.12.13.14",
            "Invalid port: 99999, must be in the range 1 to 65535",
        ),
        (
            "80 11.12.13.14 88888",
            "Invalid port: 88888, must be in the range 1 to 65535",
        ),
        (
            "80 11.12.13.14\n80 21.22.23.24 100",
            "Proxy port 80 already used, must be unique for each destination",
        ),
    ] {
        // OpenShift's error test leaves EGRESS_DNS_SERVERS out altogether.
        assert_last_line(&dns(dest, "")[..2], want);
    }
    assert_last_line(
        &dns("80 11.12.13.14", "bad"),
        "Invalid server entry in EGRESS_DNS_SERVERS: bad",
    );
}

/// The global and defaults sections, verbatim.
#[test]
fn dns_proxy_unit_test_prints_openshifts_haproxy_defaults() {
    const DEFAULTS: &str = "
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
    let (status, out) = combined(&dns("80 11.12.13.14", "")[..2]);
    assert!(status.success(), "{out}");
    assert!(out.contains(DEFAULTS), "{out}");
}

/// The resolvers section lists the pod's nameservers, in order: the machine's /etc/resolv.conf
/// as OpenShift's test reads it, and a given one (EGRESS_RESOLV_CONF) exactly.
#[test]
fn dns_proxy_unit_test_lists_the_pods_nameservers() {
    let system = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(
        system.lines().any(|l| l.starts_with("nameserver")),
        "this machine's /etc/resolv.conf has no nameserver line, which OpenShift's resolver \
         test needs: {system:?}"
    );
    let (status, out) = combined(&dns("80 11.12.13.14", "")[..2]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("resolvers dns-resolver\n    nameserver ns1 "),
        "{out}"
    );

    let file = std::env::temp_dir().join(format!("er-resolv-{}.conf", std::process::id()));
    std::fs::write(
        &file,
        "search example.com\nnameserver 10.0.0.53\n# a comment\nnameserver 10.0.1.53\n",
    )
    .unwrap();
    let path = file.to_string_lossy().into_owned();
    let mut vars = dns("80 11.12.13.14", "")[..2].to_vec();
    vars.push(("EGRESS_RESOLV_CONF", &path));
    let (status, out) = combined(&vars);
    let _ = std::fs::remove_file(&file);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(
            "resolvers dns-resolver\n    nameserver ns1 10.0.0.53:53\n    nameserver ns2 \
             10.0.1.53:53\n    resolve_retries      3\n    timeout retry        1s\n    \
             hold valid           10s\n\n"
        ),
        "{out}"
    );
}
