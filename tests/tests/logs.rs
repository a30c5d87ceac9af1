//! The operator's log events, as JSON lines (`--log-format json` / EGRESS_LOG_FORMAT=json):
//! every line a process writes must parse as one JSON object, and each event class an operator
//! needs is there with its fields: the startup summary with every rule, a denial with its rule
//! line, an upstream failure, a DNS name re-resolved with its old and new addresses, and new
//! flows dropped for want of room (logged by the exporter for an init-mode dataplane, by the
//! same code as legacy mode).
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egress_tests::{
    DEST_IP, DEST_PREFIX, POD_IP, Topology,
    pod::{Container, PodLab, Runtime},
    router_bin, router_command,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(5);

/// Every line of `text`, each parsed as a JSON object (a line that is not fails the test).
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}\nin:\n{text}"));
            assert!(v.is_object(), "a log line is not a JSON object: {l}");
            assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
            // A field named as the formatter's own keys (target, level...) would be written
            // twice, and a reader would keep only one of them.
            for key in v.as_object().unwrap().keys() {
                assert_eq!(
                    l.matches(&format!("\"{key}\":")).count(),
                    1,
                    "the key {key} twice in: {l}"
                );
            }
            v
        })
        .collect()
}

/// The first event of `log` (re-read until `timeout`) whose message starts with `message` and
/// for which `ok` holds.
fn wait_event(
    log: impl Fn() -> String,
    message: &str,
    ok: impl Fn(&Value) -> bool,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let text = log();
        if let Some(e) = json_lines(&text).into_iter().find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
                && ok(e)
        }) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no \"{message}\" event as expected in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn any(_: &Value) -> bool {
    true
}

/// The startup summary's `config`: the lines of `egress-router check`'s description, joined
/// by "; ".
fn summary_lines(e: &Value) -> Vec<String> {
    e["config"]
        .as_str()
        .unwrap_or_else(|| panic!("the startup summary has no config string: {e}"))
        .split("; ")
        .map(String::from)
        .collect()
}

fn assert_has(lines: &[String], want: &str) {
    assert!(
        lines.iter().any(|l| l == want),
        "no line `{want}` in {lines:#?}"
    );
}

fn json_env<'a>(lab: &PodLab, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = lab.router_env(more);
    env.push(("EGRESS_LOG_FORMAT", "json"));
    env
}

fn proxy_log(c: &Container) -> impl Fn() -> String + '_ {
    || c.log()
}

/// The HTTP proxy container: its summary, a denial by line 1, and a refused upstream.
#[test]
fn http_proxy_logs_its_rules_a_denial_and_an_upstream_failure_as_json() {
    let lab = PodLab::new(Runtime::Processes);
    let init = lab.init_container(&json_env(&lab, &[("EGRESS_ROUTER_MODE", "http-proxy")]));
    json_lines(&init.log());
    let rules = "!203.0.113.26\n203.0.113.0/24";
    let proxy = lab.proxy_container(
        &[
            ("EGRESS_HTTP_PROXY_DESTINATION", rules),
            ("EGRESS_LOG_FORMAT", "json"),
        ],
        8080,
    );
    let request = |target: &str| {
        let mut c = lab.connect(8080).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        write!(
            c,
            "GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    let denied = request("203.0.113.26");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    let refused = request("203.0.113.25:81");
    assert!(refused.starts_with("HTTP/1.1 502"), "{refused}");

    let log = proxy_log(&proxy);
    let start = wait_event(&log, "egress-router starting", any, T);
    assert_eq!(start["mode"], "http-proxy", "{start}");
    let lines = summary_lines(&start);
    assert_has(
        &lines,
        "rule 1 (line 1): deny 203.0.113.26 (that destination address)",
    );
    assert_has(
        &lines,
        "rule 2 (line 2): allow 203.0.113.0/24 (destination addresses in that network)",
    );
    let denial = wait_event(&log, "request denied", any, T);
    assert_eq!(denial["level"], "INFO", "{denial}");
    assert_eq!(denial["rule_line"], 1, "{denial}");
    assert_eq!(denial["method"], "GET", "{denial}");
    assert_eq!(denial["request_target"], "http://203.0.113.26/", "{denial}");
    let failure = wait_event(&log, "upstream failure", any, T);
    assert_eq!(failure["level"], "WARN", "{failure}");
    assert_eq!(failure["status"], 502, "{failure}");
    assert_eq!(failure["error"], "connect_failure", "{failure}");
    assert_eq!(
        failure["request_target"], "http://203.0.113.25:81/",
        "{failure}"
    );
    assert!(proxy.is_running());
}

/// The DNS proxy container: a name whose address changes in DNS is re-resolved, and the log
/// says so with the old and the new address.
#[test]
fn dns_proxy_logs_a_name_re_resolved_with_old_and_new_addresses_as_json() {
    let lab = PodLab::new(Runtime::Processes);
    let moved = Ipv4Addr::new(203, 0, 113, 27);
    lab.topo
        .dest
        .add_addr(
            egress_tests::DEST_IF,
            ipnet::Ipv4Net::new(moved, DEST_PREFIX).unwrap(),
        )
        .unwrap();
    egress_tests::pod::set_dns_hosts(&lab.dir, &[("moving.test", DEST_IP)]);
    lab.init_container(&json_env(&lab, &[("EGRESS_ROUTER_MODE", "dns-proxy")]));
    let proxy = lab.proxy_container(
        &[
            ("EGRESS_DNS_PROXY_DESTINATION", "80 moving.test 80"),
            ("EGRESS_DNS_PROXY_MIN_TTL", "200ms"),
            ("EGRESS_DNS_PROXY_MAX_TTL", "1s"),
            ("EGRESS_LOG_FORMAT", "json"),
        ],
        80,
    );
    let log = proxy_log(&proxy);
    let start = wait_event(&log, "egress-router starting", any, T);
    assert_has(
        &summary_lines(&start),
        "listener 1 (line 1): port 80 -> moving.test:80 (re-resolved)",
    );
    let first = wait_event(&log, "name resolved", any, Duration::from_secs(20));
    assert_eq!(first["name"], "moving.test", "{first}");
    assert_eq!(first["addresses"], format!("[{DEST_IP}]"), "{first}");

    egress_tests::pod::set_dns_hosts(&lab.dir, &[("moving.test", moved)]);
    let moved_event = wait_event(
        &log,
        "name re-resolved",
        |e| e["name"] == "moving.test",
        Duration::from_secs(20),
    );
    assert_eq!(moved_event["level"], "INFO", "{moved_event}");
    assert_eq!(moved_event["old"], format!("[{DEST_IP}]"), "{moved_event}");
    assert_eq!(moved_event["new"], format!("[{moved}]"), "{moved_event}");
    assert!(proxy.is_running());
}

/// Init mode's summary with every rule, then the exporter beside its dataplane (init mode's
/// process is gone): new flows dropped for want of room are logged by the exporter as legacy
/// mode logs them (one check every 30 s, saying how many since the last).
///
/// Source ports run out for real: one port in `--port-range`, and one client port towards two
/// rules of the same destination. The connection table cannot be filled by traffic: its LRU
/// tables evict instead of refusing (2,000 SYNs through a 4-entry table drop none), so the
/// dataplane's `drop_table_full` counter is raised in its pinned map, as the programs would
/// raise it, to see the exporter say "flow table full".
#[test]
fn the_exporter_logs_new_flows_dropped_for_want_of_room_as_json() {
    let topo = Topology::new().expect("topology");
    let dir = std::env::temp_dir().join(format!("{}logs", topo.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/{}bpf", topo.prefix()));
    let _cleanup = Cleanup(vec![dir.clone(), bpffs.clone()]);
    let rules = format!("80 tcp {DEST_IP}\n9000 udp {DEST_IP} 9000\n9001 udp {DEST_IP} 9000");
    let mut init = router_command("init");
    init.env("EGRESS_BPFFS_DIR", &bpffs)
        .env("EGRESS_DESTINATION", &rules)
        .env("EGRESS_LOG_FORMAT", "json")
        .args(["--port-range", "40000-40000"]);
    let out = topo
        .router
        .spawn(init)
        .unwrap()
        .output(Duration::from_secs(30))
        .unwrap();
    let init_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "init: {init_log}");
    let start = wait_event(|| init_log.clone(), "egress-router starting", any, T);
    assert_eq!(start["mode"], "init", "{start}");
    let lines = summary_lines(&start);
    assert_has(
        &lines,
        &format!("rule 1 (line 1): tcp port 80 -> {DEST_IP}:80"),
    );
    assert_has(
        &lines,
        &format!("rule 2 (line 2): udp port 9000 -> {DEST_IP}:9000"),
    );
    assert_has(
        &lines,
        &format!("rule 3 (line 3): udp port 9001 -> {DEST_IP}:9000"),
    );

    let exporter_log = dir.join("exporter.log");
    let mut exporter = Command::new(router_bin());
    exporter
        .args(["exporter", "--log-format", "json", "--bpffs-dir"])
        .arg(&bpffs)
        .env_clear()
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&exporter_log).unwrap());
    let exporter = topo.router.spawn(exporter).unwrap();
    let log = || std::fs::read_to_string(&exporter_log).unwrap_or_default();
    wait_event(log, "exporting the redirect dataplane's metrics", any, T);
    // The exporter's first check (at once) is where it starts counting.
    std::thread::sleep(Duration::from_millis(500));

    // drop_table_full (the 11th counter) at 1 on every CPU, the other counters at 0.
    let mut value = vec!["0"; std::mem::size_of::<egress_common::Stats>()];
    value[10 * 8] = "1";
    let stats = bpffs.join(egress_common::MAP_STATS);
    let bumped = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&stats)
        .args(["key", "0", "0", "0", "0", "value"])
        .args(&value)
        .output()
        .expect("bpftool");
    assert!(
        bumped.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&bumped.stderr)
    );
    // One client port to two rules of one destination: the second flow has no port left.
    let udp = topo
        .client
        .udp_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 40000)))
        .unwrap();
    for port in [9000, 9001] {
        udp.send_to(b"x", SocketAddr::from((POD_IP, port))).unwrap();
    }

    let checks = Duration::from_secs(45);
    let full = wait_event(log, "flow table full", any, checks);
    assert_eq!(full["level"], "WARN", "{full}");
    assert!(full["dropped"].as_u64().unwrap() >= 1, "{full}");
    assert_eq!(full["capacity"], egress_common::DEFAULT_FLOWS_MAX, "{full}");
    assert!(full["entries"].is_u64(), "{full}");
    let ports = wait_event(log, "source ports exhausted", any, checks);
    assert_eq!(ports["level"], "WARN", "{ports}");
    assert_eq!(ports["dropped"], 1, "{ports}");
    json_lines(&log());
    assert!(exporter.is_running());
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
