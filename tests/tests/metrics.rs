//! The metrics and health listener of every long-running role, scraped by a real Prometheus
//! (Debian's `prometheus`) from the client namespace, as a cluster's Prometheus and the
//! kubelet's probes reach the pod IP, and checked through Prometheus's query API against the
//! traffic each test sent. Every endpoint's text output also passes `promtool check metrics`.
//!
//! Prometheus runs in the client namespace with its own configuration and data directory,
//! answering on 127.0.0.1 of that namespace; it scrapes POD_IP:9190 (the default listener).
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egress_tests::{
    DEST_IP, EGRESS_SOURCE, Netns, POD_IP, Proc, Topology, router_bin, router_command,
    tcp_roundtrip, unprivileged_command,
};

const T: Duration = Duration::from_secs(5);
/// How long Prometheus may take to start and to show a scraped value.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(90);
const METRICS_PORT: u16 = 9190;
/// The proxy containers' user: any non-root UID.
const PROXY_UID: u32 = 1000680000;
const SOURCE: &str = "192.168.12.99/24";

fn metrics_addr() -> SocketAddr {
    SocketAddr::from((POD_IP, METRICS_PORT))
}

/// A GET of `path` on `addr` from `ns`: (status, body); None if nothing answers.
fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut c = ns.run(|| TcpStream::connect_timeout(&addr, T)).ok()?;
    c.set_read_timeout(Some(T)).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The first answer of the metrics listener to `path`, polled every few milliseconds from the
/// moment the process starts (to catch what it says while it sets up).
fn first_answer(ns: &Netns, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(answer) = http_get(ns, metrics_addr(), path) {
            return answer;
        }
        assert!(Instant::now() < deadline, "{path} never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `path` of the metrics listener from `ns` until `want` holds for the answer.
fn wait_probe(ns: &Netns, path: &str, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        if let Some((status, body)) = http_get(ns, metrics_addr(), path) {
            if want(status, &body) {
                return (status, body);
            }
            last = Some((status, body));
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered as expected; last answer: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The endpoint's text exposition (what curl and promtool get), checked by `promtool check
/// metrics`.
fn promtool_checked(ns: &Netns) -> String {
    let (status, body) = http_get(ns, metrics_addr(), "/metrics").expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\non:\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var_os("EGRESS_TEST_SHOW_METRICS").is_some() {
        eprintln!("== /metrics:\n{body}");
    }
    body
}

/// A Prometheus server in `ns` scraping POD_IP:9190 every second.
struct Prometheus<'a> {
    ns: &'a Netns,
    web: SocketAddr,
    dir: PathBuf,
    proc: Proc,
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.dir.join("prometheus.log"))
        {
            eprintln!("== prometheus.log:\n{log}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl<'a> Prometheus<'a> {
    fn start(ns: &'a Netns, dir: &Path) -> Prometheus<'a> {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: egress-router\n    static_configs:\n\
                 \x20     - targets: ['{}']\n",
                metrics_addr()
            ),
        )
        .unwrap();
        // A free port on the namespace's loopback.
        let web = ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .local_addr()
            .unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap());
        let proc = ns
            .spawn(cmd)
            .expect("prometheus (Debian's package; cargo xtask setup installs it)");
        let p = Prometheus { ns, web, dir, proc };
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        while p.get("/-/ready").is_none_or(|(s, _)| s != 200) {
            assert!(p.proc.is_running(), "prometheus exited");
            assert!(Instant::now() < deadline, "prometheus never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.ns, self.web, path)
    }

    /// The value of the one series `query` selects, if Prometheus has it.
    fn query(&self, query: &str) -> Option<f64> {
        let (status, body) = self.get(&format!("/api/v1/query?query={}", encode(query)))?;
        assert_eq!(status, 200, "query {query}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{query} selects several series: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Polls until `query`'s value is `want`; fails with the last value and the scrape state.
    fn expect(&self, query: &str, want: f64) {
        self.expect_that(query, |v| v == want, &format!("= {want}"));
    }

    fn expect_that(&self, query: &str, ok: impl Fn(f64) -> bool, what: &str) {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            let v = self.query(query);
            if v.is_some_and(&ok) {
                return;
            }
            if Instant::now() >= deadline {
                let targets = self.get("/api/v1/targets").map(|(_, b)| b);
                panic!("Prometheus never had {query} {what}; last: {v:?}; targets: {targets:?}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Percent-encodes a query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The reference topology with a scratch directory (and a bpffs directory for redirect).
struct Lab {
    topo: Topology,
    dir: PathBuf,
    bpffs: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["router.log", "init.log", "proxy.log", "exporter.log"] {
                if let Ok(text) = std::fs::read_to_string(self.dir.join(log)) {
                    eprintln!("== {log}:\n{text}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

impl Lab {
    fn new() -> Lab {
        let topo = Topology::new().expect("topology");
        let dir = std::env::temp_dir().join(format!("{}metrics", topo.prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/{}bpf", topo.prefix()));
        Lab { topo, dir, bpffs }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.dir.join(name)).unwrap()
    }

    fn client_tcp(&self, port: u16) -> TcpStream {
        self.topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((POD_IP, port)), T))
            .unwrap_or_else(|e| panic!("connecting to the pod's port {port}: {e}"))
    }

    /// The image's binary as a container runs it: only `env` (and PATH).
    fn container(&self, env: &[(&str, &str)], mut cmd: Command, log: &str) -> Command {
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log(log));
        cmd
    }

    /// A proxy pod's init container (EGRESS_ROUTER_MODE http-proxy or dns-proxy): exits 0.
    fn proxy_init(&self, mode: &str) {
        let cmd = self.container(
            &[
                ("EGRESS_SOURCE", SOURCE),
                ("EGRESS_GATEWAY", "192.168.12.1"),
                ("EGRESS_ROUTER_MODE", mode),
            ],
            Command::new(router_bin()),
            "init.log",
        );
        let out = self
            .topo
            .router
            .spawn_container(cmd)
            .unwrap()
            .output(Duration::from_secs(30))
            .unwrap();
        assert!(out.status.success(), "init container: {}", out.status);
    }

    /// A proxy container: unprivileged, only `env`, the pod's resolv.conf (`nameserver`).
    fn proxy(&self, env: &[(&str, &str)], nameserver: Ipv4Addr) -> Proc {
        let resolv = self.dir.join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {nameserver}\n")).unwrap();
        let image = self.dir.join("egress-router");
        std::fs::copy(router_bin(), &image).unwrap();
        let cmd = self.container(env, unprivileged_command(&image, PROXY_UID), "proxy.log");
        self.topo
            .router
            .spawn_container_with(cmd, &[(&resolv, Path::new("/etc/resolv.conf"))])
            .unwrap()
    }
}

fn assert_healthy(ns: &Netns) {
    assert_eq!(
        http_get(ns, metrics_addr(), "/healthz"),
        Some((200, "ok\n".to_string()))
    );
}

/// Detaches our program from `iface` behind the router's back, as an operator's `bpftool link
/// detach` or `tc filter del` would: the maps stay, the traffic is no longer translated.
fn detach(lab: &Lab, iface: &str) {
    let mut status = Command::new(router_bin());
    status
        .args(["status", "--json", "--bpffs-dir"])
        .arg(&lab.bpffs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = lab.topo.router.spawn(status).unwrap().output(T).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let on = status["attached"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["interface"] == iface)
        .unwrap_or_else(|| panic!("nothing attached to {iface}: {status:#}"));
    let mut cmd = match on["method"].as_str().unwrap() {
        "tcx" => {
            let mut c = Command::new("bpftool");
            c.args(["link", "detach", "id", &on["link_id"].to_string()]);
            c
        }
        _ => {
            let mut c = Command::new("tc");
            c.args(["filter", "del", "dev", iface, "ingress"]);
            c
        }
    };
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = lab.topo.router.spawn(cmd).unwrap().output(T).unwrap();
    assert!(
        out.status.success(),
        "detaching from {iface}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Legacy mode with a fallback: the scrapes and probes of the pod IP reach the router's own
/// listener (the fallback takes every other port), and Prometheus counts the flows the test
/// made; no scrape shows up as traffic without a rule. Once our program is detached from
/// macvlan0 behind its back, /readyz says so (503) while /healthz still answers.
///
/// Before setup: legacy mode's listener is up before the dataplane, and answers 503 while the
/// programs load (the verifier takes most of a second here; the test polls every 5 ms from the
/// start, so it sees that answer first).
#[test]
fn legacy_redirect_counters_reach_prometheus_and_scrapes_stay_the_routers() {
    let lab = Lab::new();
    let echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 8000)))
        .unwrap();
    let mut cmd = router_command("legacy");
    cmd.env("EGRESS_BPFFS_DIR", &lab.bpffs);
    // Closed flows stay in the table for the test's length (the garbage collection runs).
    cmd.env(
        "EGRESS_DESTINATION",
        "80 tcp 203.0.113.25 8000\n203.0.113.26",
    )
    .args(["--tcp-closing-timeout", "600"])
    .stdout(Stdio::null())
    .stderr(lab.log("router.log"));
    let router = lab.topo.router.spawn(cmd).unwrap();
    assert_eq!(
        first_answer(&lab.topo.client, "/readyz"),
        (
            503,
            "not ready: the dataplane is not attached yet\n".to_string()
        )
    );
    assert_healthy(&lab.topo.client);
    wait_probe(&lab.topo.client, "/readyz", |s, _| s == 200);
    assert_healthy(&lab.topo.client);
    let prom = Prometheus::start(&lab.topo.client, &lab.dir);
    prom.expect("egress_router_build_info{role=\"legacy\"}", 1.0);
    for i in 0..3u8 {
        let msg = [b'a' + i; 10];
        assert_eq!(tcp_roundtrip(lab.client_tcp(80), &msg, T).unwrap(), msg);
    }
    assert!(echo.peers().iter().all(|p| p.ip() == EGRESS_SOURCE));
    prom.expect("egress_router_redirect_new_flows_total", 3.0);
    prom.expect_that(
        "egress_router_redirect_packets_total{direction=\"out\"}",
        |v| v >= 3.0 * 4.0,
        ">= 4 packets a connection (SYN, ACK, data, FIN)",
    );
    prom.expect_that(
        "egress_router_redirect_packets_total{direction=\"in\"}",
        |v| v >= 3.0 * 3.0,
        ">= 3 a connection",
    );
    prom.expect("egress_router_redirect_flow_table_entries", 6.0);
    prom.expect("egress_router_configured_rules{kind=\"redirect\"}", 1.0);
    prom.expect(
        "egress_router_configured_rules{kind=\"redirect_fallback\"}",
        1.0,
    );
    prom.expect(
        "egress_router_redirect_drops_total{reason=\"no_rule\"}",
        0.0,
    );
    prom.expect("egress_router_redirect_maps_readable", 1.0);
    let text = promtool_checked(&lab.topo.client);
    assert!(
        text.contains("egress_router_redirect_gc_runs_total"),
        "{text}"
    );
    detach(&lab, "macvlan0");
    let (_, why) = wait_probe(&lab.topo.client, "/readyz", |s, _| s == 503);
    assert!(
        why.starts_with("not ready: no egress-router program is attached to macvlan0 ingress"),
        "{why}"
    );
    assert_healthy(&lab.topo.client);
    assert!(router.is_running());
}

/// Init mode in the lab's router namespace, pinned in the lab's bpffs directory, with one rule
/// (port 80 to the destination's 8000); it must exit 0.
fn init_dataplane(lab: &Lab) {
    let mut init = router_command("init");
    init.env("EGRESS_BPFFS_DIR", &lab.bpffs);
    init.env("EGRESS_DESTINATION", "80 tcp 203.0.113.25 8000");
    let out = lab
        .topo
        .router
        .spawn(init)
        .unwrap()
        .output(Duration::from_secs(30))
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Init mode exits; `egress-router exporter`, with no capability but CAP_BPF, serves its
/// dataplane's counters. Not ready before the dataplane exists, ready once init mode made it.
#[test]
fn the_exporter_serves_an_init_mode_dataplane() {
    let lab = Lab::new();
    let _echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 8000)))
        .unwrap();
    let mut exporter = Command::new("setpriv");
    exporter
        .args(["--bounding-set=-all,+bpf", "--inh-caps=-all", "--"])
        .arg(router_bin())
        .arg("exporter")
        .arg("--bpffs-dir")
        .arg(&lab.bpffs)
        .env_clear()
        // Without PATH, execvp would look in /bin first (busybox's setpriv in the VM tests).
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(lab.log("exporter.log"));
    let exporter = lab.topo.router.spawn(exporter).unwrap();
    let (_, why) = wait_probe(&lab.topo.client, "/readyz", |s, _| s == 503);
    assert!(
        why.starts_with("not ready: the dataplane's maps cannot be read"),
        "{why}"
    );
    assert_healthy(&lab.topo.client);

    init_dataplane(&lab);
    wait_probe(&lab.topo.client, "/readyz", |s, _| s == 200);
    let prom = Prometheus::start(&lab.topo.client, &lab.dir);
    for _ in 0..2 {
        assert_eq!(tcp_roundtrip(lab.client_tcp(80), b"hi", T).unwrap(), b"hi");
    }
    prom.expect("egress_router_build_info{role=\"exporter\"}", 1.0);
    prom.expect("egress_router_redirect_new_flows_total", 2.0);
    prom.expect("egress_router_configured_rules{kind=\"redirect\"}", 1.0);
    prom.expect(
        "egress_router_configured_rules{kind=\"redirect_fallback\"}",
        0.0,
    );
    // The scrapes of the pod IP are the router's own: no rule, and not counted as such...
    prom.expect(
        "egress_router_redirect_drops_total{reason=\"no_rule\"}",
        0.0,
    );
    // ...while a port no rule has is.
    assert!(
        lab.topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((POD_IP, 81)), T))
            .is_err(),
        "nothing listens on port 81"
    );
    prom.expect_that(
        "egress_router_redirect_drops_total{reason=\"no_rule\"}",
        |v| v >= 1.0,
        ">= 1",
    );
    promtool_checked(&lab.topo.client);
    assert!(exporter.is_running());
    let status = std::fs::read_to_string(format!("/proc/{}/status", exporter.pid())).unwrap();
    let caps = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert_eq!(
        caps.split_whitespace().nth(1),
        Some("0000008000000000"),
        "the exporter runs with CAP_BPF alone"
    );
}

/// The exporter with the capabilities that let it list the programs attached to the interfaces
/// (the manifests' CAP_SYS_ADMIN, and CAP_NET_ADMIN, which querying a tcx chain needs on kernels
/// before CAP_SYS_ADMIN was enough for it): ready beside init mode's dataplane, not ready once
/// our program is detached from eth0, with the reason.
#[test]
fn the_exporter_is_not_ready_once_its_dataplane_is_detached() {
    let lab = Lab::new();
    init_dataplane(&lab);
    let mut exporter = Command::new("setpriv");
    exporter
        .args([
            "--bounding-set=-all,+sys_admin,+net_admin",
            "--inh-caps=-all",
            "--",
        ])
        .arg(router_bin())
        .arg("exporter")
        .arg("--bpffs-dir")
        .arg(&lab.bpffs)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(lab.log("exporter.log"));
    let exporter = lab.topo.router.spawn(exporter).unwrap();
    wait_probe(&lab.topo.client, "/readyz", |s, _| s == 200);
    detach(&lab, "eth0");
    let (_, why) = wait_probe(&lab.topo.client, "/readyz", |s, _| s == 503);
    assert!(
        why.starts_with("not ready: no egress-router program is attached to eth0 ingress"),
        "{why}"
    );
    assert_healthy(&lab.topo.client);
    assert!(exporter.is_running());
}

/// A CONNECT tunnel through the HTTP proxy on the pod's port 8080 to `target`, once the
/// proxy's 200 is read.
fn connect_tunnel(lab: &Lab, target: &str) -> TcpStream {
    let mut c = lab.client_tcp(8080);
    c.set_read_timeout(Some(T)).unwrap();
    write!(c, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(c.read(&mut b).unwrap(), 1, "the proxy closed: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c
}

/// A forward request through the HTTP proxy on the pod's port 8080: the whole answer.
fn proxy_get(lab: &Lab, target: &str) -> String {
    let mut c = lab.client_tcp(8080);
    c.set_read_timeout(Some(T)).unwrap();
    write!(
        c,
        "GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

/// An HTTP server on DEST_IP:80 answering every request `200 ok`.
fn web_server(lab: &Lab) {
    let web = lab
        .topo
        .dest
        .tcp_listen(SocketAddr::from((DEST_IP, 80)))
        .unwrap();
    std::thread::spawn(move || {
        for mut c in web.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
}

/// The HTTP proxy pod: requests by kind and decision, responses by class, denials by rule line,
/// upstream connect errors by reason, a CONNECT tunnel (counted while open, its bytes once it
/// ends).
///
/// Probes: the proxy binds port 8080 right after the metrics listener, in the same task with
/// nothing awaited in between (and exits if that bind fails), so there is no moment a probe
/// could see "not listening yet"; what the test asserts is that /readyz says 200 only with
/// 8080 accepting, and, after SIGTERM while a tunnel drains, 503 "shutting down" with /healthz
/// still 200.
#[test]
fn http_proxy_container_counters_reach_prometheus() {
    let lab = Lab::new();
    let _echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 7)))
        .unwrap();
    web_server(&lab);
    lab.proxy_init("http-proxy");
    // Line 1 denies .26, line 2 allows the rest of the destination network.
    let p = lab.proxy(
        &[(
            "EGRESS_HTTP_PROXY_DESTINATION",
            "!203.0.113.26\n203.0.113.0/24",
        )],
        Ipv4Addr::LOCALHOST,
    );
    wait_probe(&lab.topo.client, "/readyz", |s, _| s == 200);
    // Ready means listening.
    drop(lab.client_tcp(8080));
    assert_healthy(&lab.topo.client);
    let prom = Prometheus::start(&lab.topo.client, &lab.dir);
    let request = |target: &str| proxy_get(&lab, target);
    let ok = request("203.0.113.25");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let denied = request("203.0.113.26");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    // The gateway: no rule matches it, so the proxy denies it without connecting.
    let no_rule = request("192.168.12.1");
    assert!(no_rule.starts_with("HTTP/1.1 403"), "{no_rule}");
    // Allowed, but nothing listens there: refused.
    let refused = request("203.0.113.25:81");
    assert!(refused.starts_with("HTTP/1.1 502"), "{refused}");

    prom.expect("egress_router_build_info{role=\"http-proxy\"}", 1.0);
    prom.expect(
        "egress_router_http_requests_total{kind=\"forward\",decision=\"allowed\"}",
        2.0,
    );
    prom.expect(
        "egress_router_http_requests_total{kind=\"forward\",decision=\"denied\"}",
        2.0,
    );
    prom.expect("egress_router_http_responses_total{class=\"2xx\"}", 1.0);
    prom.expect("egress_router_http_responses_total{class=\"4xx\"}", 2.0);
    prom.expect("egress_router_http_responses_total{class=\"5xx\"}", 1.0);
    prom.expect("egress_router_http_denials_total{line=\"1\"}", 1.0);
    prom.expect("egress_router_http_denials_total{line=\"none\"}", 1.0);
    prom.expect(
        "egress_router_http_upstream_connect_errors_total{reason=\"refused\"}",
        1.0,
    );
    prom.expect(
        "egress_router_http_request_errors_total{reason=\"connect_failure\"}",
        1.0,
    );
    prom.expect("egress_router_http_upstream_connect_seconds_count", 1.0);
    prom.expect("egress_router_http_response_seconds_count", 4.0);
    prom.expect(
        "egress_router_http_bytes_total{direction=\"downstream\"}",
        2.0,
    );
    prom.expect("egress_router_configured_rules{kind=\"http_deny\"}", 1.0);

    // A CONNECT tunnel to the echo server: 7 bytes each way.
    let mut tunnel = connect_tunnel(&lab, "203.0.113.25:7");
    assert_eq!(tcp_roundtrip_on(&mut tunnel, b"tunnel!"), b"tunnel!");
    prom.expect(
        "egress_router_http_requests_total{kind=\"connect\",decision=\"allowed\"}",
        1.0,
    );
    prom.expect("egress_router_http_active_tunnels", 1.0);
    drop(tunnel);
    prom.expect("egress_router_http_active_tunnels", 0.0);
    prom.expect(
        "egress_router_http_bytes_total{direction=\"upstream\"}",
        7.0,
    );
    prom.expect(
        "egress_router_http_bytes_total{direction=\"downstream\"}",
        2.0 + 7.0,
    );
    prom.expect("egress_router_http_responses_total{class=\"2xx\"}", 2.0);
    prom.expect("egress_router_http_active_connections", 0.0);
    promtool_checked(&lab.topo.client);
    assert!(p.is_running());

    // SIGTERM with a tunnel open: the proxy drains it, not ready meanwhile, still alive.
    let mut draining = connect_tunnel(&lab, "203.0.113.25:7");
    p.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let (_, why) = wait_probe(&lab.topo.client, "/readyz", |s, _| s == 503);
    assert_eq!(why, "not ready: shutting down\n");
    assert_healthy(&lab.topo.client);
    assert_eq!(tcp_roundtrip_on(&mut draining, b"still"), b"still");
    drop(draining);
    assert!(
        p.wait_timeout(Duration::from_secs(15)).unwrap().is_some(),
        "the proxy did not exit once its last tunnel ended"
    );
}

/// Writes `msg` on `c` and reads as many bytes back.
fn tcp_roundtrip_on(c: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    c.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).unwrap();
    back
}

/// The one-process form of the HTTP proxy (EGRESS_ROUTER_MODE=http-proxy with
/// EGRESS_ONE_PROCESS=true, privileged: it sets up macvlan0 itself, then serves): the same
/// listener, scraped by Prometheus, counts its requests.
#[test]
fn http_proxy_one_process_counters_reach_prometheus() {
    let lab = Lab::new();
    web_server(&lab);
    let mut cmd = router_command("http-proxy");
    cmd.env("EGRESS_ONE_PROCESS", "true")
        .env("EGRESS_HTTP_PROXY_DESTINATION", "203.0.113.25")
        .stdout(Stdio::null())
        .stderr(lab.log("router.log"));
    let router = lab.topo.router.spawn(cmd).unwrap();
    wait_probe(&lab.topo.client, "/readyz", |s, _| s == 200);
    assert_healthy(&lab.topo.client);
    let prom = Prometheus::start(&lab.topo.client, &lab.dir);
    for _ in 0..3 {
        let ok = proxy_get(&lab, "203.0.113.25");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }
    let denied = proxy_get(&lab, "203.0.113.26");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    prom.expect("egress_router_build_info{role=\"http-proxy\"}", 1.0);
    prom.expect(
        "egress_router_http_requests_total{kind=\"forward\",decision=\"allowed\"}",
        3.0,
    );
    prom.expect(
        "egress_router_http_requests_total{kind=\"forward\",decision=\"denied\"}",
        1.0,
    );
    prom.expect("egress_router_http_responses_total{class=\"2xx\"}", 3.0);
    prom.expect("egress_router_http_denials_total{line=\"none\"}", 1.0);
    prom.expect("egress_router_configured_rules{kind=\"http_allow\"}", 1.0);
    promtool_checked(&lab.topo.client);
    assert!(router.is_running());
}

/// The DNS proxy pod: not ready while its name does not resolve (no DNS server yet), ready once
/// it does; connections per rule line, bytes, the addresses the name has.
#[test]
fn dns_proxy_container_is_ready_once_its_name_resolves_and_counts_per_line() {
    let lab = Lab::new();
    let web = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 80)))
        .unwrap();
    let _echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 7)))
        .unwrap();
    lab.proxy_init("dns-proxy");
    let p = lab.proxy(
        &[
            (
                "EGRESS_DNS_PROXY_DESTINATION",
                "80 web.test 80\n9001 203.0.113.25 7",
            ),
            ("EGRESS_DNS_PROXY_MIN_TTL", "200ms"),
            ("EGRESS_DNS_PROXY_MAX_TTL", "1s"),
        ],
        DEST_IP,
    );
    // Before its listeners are bound (seen on slow machines) and until the name resolves: 503.
    let (_, why) = wait_probe(&lab.topo.client, "/readyz", |s, b| {
        s == 503 && !b.contains("listeners are not bound yet")
    });
    assert_eq!(
        why,
        "not ready: EGRESS_DNS_PROXY_DESTINATION names not resolved yet: web.test (line 1)\n"
    );
    assert_healthy(&lab.topo.client);
    // The first lookups fail (nothing answers DNS yet), and are counted so.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(&lab.topo.client, metrics_addr(), "/metrics").is_some_and(|(_, m)| {
        m.contains("egress_router_dns_resolutions_total{name=\"web.test\",result=\"failed\"} ")
            && !m.contains(
                "egress_router_dns_resolutions_total{name=\"web.test\",result=\"failed\"} 0\n",
            )
    }) {
        assert!(Instant::now() < deadline, "no failed lookup counted");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(wait_probe(&lab.topo.client, "/readyz", |_, _| true).0, 503);
    // Now the DNS server starts.
    let _dns = egress_tests::pod::start_dnsmasq(&lab.topo, &lab.dir);
    wait_probe(&lab.topo.client, "/readyz", |s, _| s == 200);
    let prom = Prometheus::start(&lab.topo.client, &lab.dir);
    for _ in 0..2 {
        assert_eq!(
            tcp_roundtrip(lab.client_tcp(80), b"by name", T).unwrap(),
            b"by name"
        );
    }
    assert_eq!(
        tcp_roundtrip(lab.client_tcp(9001), b"ping", T).unwrap(),
        b"ping"
    );
    assert!(web.peers().iter().all(|p| p.ip() == EGRESS_SOURCE));

    prom.expect("egress_router_build_info{role=\"dns-proxy\"}", 1.0);
    prom.expect("egress_router_dns_connections_total{line=\"1\"}", 2.0);
    prom.expect("egress_router_dns_connections_total{line=\"2\"}", 1.0);
    prom.expect("egress_router_dns_active_connections{line=\"1\"}", 0.0);
    prom.expect(
        "egress_router_dns_bytes_total{line=\"2\",direction=\"upstream\"}",
        4.0,
    );
    prom.expect(
        "egress_router_dns_bytes_total{line=\"1\",direction=\"downstream\"}",
        14.0,
    );
    prom.expect(
        "egress_router_dns_resolved_addresses{line=\"1\",name=\"web.test\"}",
        1.0,
    );
    prom.expect_that(
        "egress_router_dns_resolutions_total{name=\"web.test\",result=\"ok\"}",
        |v| v >= 1.0,
        ">= 1",
    );
    prom.expect_that(
        "egress_router_dns_resolutions_total{name=\"web.test\",result=\"failed\"}",
        |v| v >= 1.0,
        ">= 1 (before dnsmasq started)",
    );
    prom.expect("egress_router_configured_rules{kind=\"dns\"}", 2.0);
    promtool_checked(&lab.topo.client);
    assert!(p.is_running());
}
