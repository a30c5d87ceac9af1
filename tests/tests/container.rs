//! The redirect dataplane as pods run it: egress-router started as a container runtime starts
//! it ([`Netns::spawn_container`]: own mount namespace, a /sys without bpffs, so whatever it pins
//! goes with it), or sharing the harness's bpffs on /sys/fs/bpf ([`Netns::spawn`]: a pod that
//! mounts the host's /sys/fs/bpf). What init mode leaves behind must keep forwarding, a restart
//! must keep established connections, and routers of different pods must not meet.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use egress_tests::{
    DEST_IP, EGRESS_SOURCE, EchoServer, HOST_BPFFS, POD_IP, PinDir, Proc, Topology, kernel_has_tcx,
    pinned_link_ifindex, router_bin, router_command, udp_roundtrip,
};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(5);
const RULES: &str = "80 tcp 203.0.113.25\n53 udp 203.0.113.25";

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// How egress-router is started in the router namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// As a container runtime starts it: no bpffs that outlives it.
    Container,
    /// Sharing the harness's bpffs, as in a pod that mounts the host's /sys/fs/bpf.
    HostBpffs,
}

/// A topology whose router pins into its default directory (removed afterwards).
struct Lab {
    topo: Topology,
    /// The router's default pin directory on the harness's bpffs.
    pins: PinDir,
}

impl Lab {
    fn new() -> Lab {
        let topo = Topology::new().expect("building the namespace topology");
        let pins = PinDir(topo.router.default_pin_dir().unwrap());
        Lab { topo, pins }
    }

    fn dir(&self) -> &Path {
        &self.pins.0
    }

    fn spawn(&self, start: Start, cmd: Command) -> Proc {
        match start {
            Start::Container => self.topo.router.spawn_container(cmd),
            Start::HostBpffs => self.topo.router.spawn(cmd),
        }
        .unwrap()
    }

    /// egress-router in `mode` with [`RULES`], extra `args` and `env`.
    fn command(&self, mode: &str, args: &[&str], env: &[(&str, &Path)]) -> Command {
        let mut cmd = router_command(mode);
        cmd.env("EGRESS_DESTINATION", RULES).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs init mode to the end.
    fn run_init(&self, start: Start, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let p = self.spawn(start, self.command("init", args, env));
        p.output(Duration::from_secs(30)).unwrap()
    }

    /// Runs init mode, asserts it exited 0, returns its log.
    fn init(&self, start: Start, args: &[&str], env: &[(&str, &Path)]) -> String {
        let out = self.run_init(start, args, env);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "egress-router init ({start:?}, {args:?}) failed: {}\n{log}",
            out.status
        );
        log
    }

    fn status_output(&self, start: Start, args: &[&str]) -> Output {
        let mut cmd = Command::new(router_bin());
        cmd.args(["status", "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn(start, cmd).output(T).unwrap()
    }

    /// `egress-router status --json`, run as `start` says.
    fn status(&self, start: Start, args: &[&str]) -> serde_json::Value {
        let out = self.status_output(start, args);
        assert!(
            out.status.success(),
            "egress-router status ({start:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn client_tcp(&self, port: u16) -> TcpStream {
        let c = self
            .topo
            .client
            .run(|| TcpStream::connect_timeout(&sock(POD_IP, port), T))
            .expect("connecting through the router");
        c.set_read_timeout(Some(T)).unwrap();
        c
    }

    fn dest_tcp_echo(&self) -> EchoServer {
        self.topo.dest.tcp_echo(sock(DEST_IP, 80)).unwrap()
    }
}

/// One message over a live connection, echoed back.
fn ping_pong(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).expect("writing on the live connection");
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)
        .expect("the live connection still carries data through the router");
    assert_eq!(got, msg);
}

/// The source the destination sees for the only TCP flow (`translated_from` of its out entry).
fn tcp_source(status: &serde_json::Value) -> String {
    status["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["proto"] == "tcp" && f["direction"] == "out")
        .unwrap_or_else(|| panic!("no TCP flow in the table: {status:#}"))["translated_from"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (interface, method) of every attachment status reports.
fn attachments(status: &serde_json::Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = status["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["interface"].as_str().unwrap().to_string(),
                a["method"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// What auto attaches with on a persistent bpffs: tcx where the kernel has it.
fn persistent_method() -> &'static str {
    if kernel_has_tcx() { "tcx" } else { "clsact" }
}

fn attached_with(method: &str) -> Vec<(String, String)> {
    vec![
        ("eth0".to_string(), method.to_string()),
        ("macvlan0".to_string(), method.to_string()),
    ]
}

fn assert_log(log: &str, needles: &[&str]) {
    for n in needles {
        assert!(log.contains(n), "the log lacks {n:?}:\n{log}");
    }
}

/// TCP and UDP from the client reach the destination from EGRESS_SOURCE.
fn assert_forwarding(lab: &Lab) {
    let web = lab.dest_tcp_echo();
    let dns = lab.topo.dest.udp_echo(sock(DEST_IP, 53)).unwrap();
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"tcp after init exited");
    let u = lab
        .topo
        .client
        .udp_bind(sock(Ipv4Addr::UNSPECIFIED, 0))
        .unwrap();
    assert_eq!(
        udp_roundtrip(&u, sock(POD_IP, 53), b"udp after init exited", T).unwrap(),
        b"udp after init exited"
    );
    for (what, server) in [("tcp", &web), ("udp", &dns)] {
        let peers = server.wait_for_peers(1, T).unwrap();
        assert!(
            peers.iter().all(|p| p.ip() == EGRESS_SOURCE),
            "the {what} server saw {peers:?}, not EGRESS_SOURCE"
        );
    }
}

#[test]
fn init_in_a_container_keeps_forwarding_after_it_exits() {
    let lab = Lab::new();
    let log = lab.init(Start::Container, &[], &[]);
    // This kernel has tcx, but its links would go with the container's private bpffs.
    assert_log(
        &log,
        &[
            "clsact filters:",
            "private to this container",
            "attach=\"clsact\"",
        ],
    );
    assert_forwarding(&lab);
    assert!(
        !lab.dir().exists(),
        "a container's pins must not appear on the host's bpffs"
    );
}

#[test]
fn init_in_a_container_with_attach_clsact_keeps_forwarding_after_it_exits() {
    let lab = Lab::new();
    let log = lab.init(Start::Container, &["--attach", "clsact"], &[]);
    assert_log(&log, &["clsact filters:", "attach=\"clsact\""]);
    assert_forwarding(&lab);
}

#[test]
fn attach_tcx_in_a_container_without_a_persistent_bpffs_is_refused() {
    let lab = Lab::new();
    let out = lab.run_init(Start::Container, &["--attach", "tcx"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    if kernel_has_tcx() {
        assert_log(
            &err,
            &["--attach tcx", "init exits", "host's /sys/fs/bpf", "clsact"],
        );
    } else {
        assert_log(&err, &["--attach tcx", "no tcx", "--attach clsact"]);
    }
    // Nothing applied: no program of ours on eth0 (status finds none through tcx or clsact),
    // no clsact qdisc, macvlan0 untouched.
    let status = lab.status_output(Start::HostBpffs, &[]);
    let text = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success() && text.contains("no egress-router program attached to eth0"),
        "status after a refused init: {text}"
    );
    let mut tc = Command::new("tc");
    tc.args(["qdisc", "show", "dev", "eth0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let qdiscs = lab.spawn(Start::HostBpffs, tc).output(T).unwrap();
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        !qdiscs.contains("clsact"),
        "a clsact qdisc was added: {qdiscs}"
    );
    let addrs = lab
        .topo
        .router
        .netlink(|h| async move {
            let idx = egress_tests::netlink::link_index(&h, "macvlan0").await?;
            egress_tests::netlink::addresses(&h, idx).await
        })
        .unwrap();
    assert!(addrs.is_empty(), "macvlan0 was set up: {addrs:?}");
}

/// Init twice around a live connection; returns the second run's log.
fn restart_under_a_live_connection(
    lab: &Lab,
    first: Start,
    second: Start,
    args: &[&str],
) -> String {
    let echo = lab.dest_tcp_echo();
    lab.init(first, &[], &[]);
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"before the restart");
    let before = tcp_source(&lab.status(Start::HostBpffs, &[]));
    let log = lab.init(second, args, &[]);
    ping_pong(&mut c, b"after the restart");
    let status = lab.status(Start::HostBpffs, &[]);
    assert_eq!(
        tcp_source(&status),
        before,
        "the destination must see the same source: {status:#}"
    );
    assert_eq!(status["counters"]["new_flows"], 1, "one flow: {status:#}");
    assert_eq!(echo.peers().len(), 1, "one connection: {:?}", echo.peers());
    log
}

#[test]
fn a_restarted_container_recovers_the_maps_from_the_kernel() {
    let lab = Lab::new();
    let log = restart_under_a_live_connection(&lab, Start::Container, Start::Container, &[]);
    assert_log(
        &log,
        &[
            "maps=\"recovered from the clsact filter on eth0\"",
            "replaced=true",
        ],
    );
}

#[test]
fn a_restart_on_a_persistent_bpffs_reopens_the_pinned_tcx_links() {
    let lab = Lab::new();
    let log = restart_under_a_live_connection(&lab, Start::HostBpffs, Start::HostBpffs, &[]);
    let method = persistent_method();
    let pinned = if method == "tcx" {
        format!("tcx links pinned in {}", lab.dir().display())
    } else {
        format!("maps pinned in {}", lab.dir().display())
    };
    assert_log(
        &log,
        &[
            &pinned,
            &format!("attach=\"{method}\""),
            "maps=\"reused the pins\"",
            "replaced=true",
        ],
    );
    let status = lab.status(Start::HostBpffs, &[]);
    assert_eq!(status["bpffs_dir"], lab.dir().display().to_string());
    assert_eq!(attachments(&status), attached_with(method), "{status:#}");
}

#[test]
fn switching_from_clsact_in_a_container_to_tcx_keeps_connections_and_one_program() {
    // (Without tcx in the kernel: from a private bpffs to a persistent one, both clsact.)
    let lab = Lab::new();
    // First without the host's bpffs (clsact), then with it (tcx): the maps come from the
    // clsact filter, and the filter goes once the tcx link is in place.
    let log = restart_under_a_live_connection(&lab, Start::Container, Start::HostBpffs, &[]);
    let method = persistent_method();
    assert_log(
        &log,
        &[
            &format!("attach=\"{method}\""),
            "maps=\"recovered from the clsact filter on eth0\"",
        ],
    );
    let status = lab.status(Start::HostBpffs, &[]);
    assert_eq!(attachments(&status), attached_with(method), "{status:#}");
}

#[test]
fn switching_from_tcx_to_clsact_keeps_connections_and_one_program() {
    let lab = Lab::new();
    let log = restart_under_a_live_connection(
        &lab,
        Start::HostBpffs,
        Start::HostBpffs,
        &["--attach", "clsact"],
    );
    assert_log(&log, &["attach=\"clsact\"", "maps=\"reused the pins\""]);
    let status = lab.status(Start::HostBpffs, &[]);
    assert_eq!(attachments(&status), attached_with("clsact"), "{status:#}");
    let links: Vec<_> = std::fs::read_dir(lab.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .map(|e| e.path())
        .collect();
    assert!(links.is_empty(), "the detached links' pins stay: {links:?}");
}

/// A router's stderr, collected as it comes.
struct LogWatch {
    text: Arc<Mutex<String>>,
}

impl LogWatch {
    fn new(p: &Proc) -> LogWatch {
        let text = Arc::new(Mutex::new(String::new()));
        let stderr = p.take_stderr().expect("stderr piped");
        let sink = Arc::clone(&text);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut t = sink.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        LogWatch { text }
    }

    fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    fn wait_for(&self, needle: &str, p: &Proc) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text().contains(needle) {
            assert!(
                p.is_running() && Instant::now() < deadline,
                "no {needle:?} in the log (running: {}):\n{}",
                p.is_running(),
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts legacy mode in a container and waits until its dataplane runs.
fn legacy_in_a_container(lab: &Lab) -> (Proc, LogWatch) {
    let p = lab.spawn(Start::Container, lab.command("legacy", &[], &[]));
    let log = LogWatch::new(&p);
    log.wait_for("redirect dataplane running", &p);
    (p, log)
}

fn sigterm(p: &Proc, log: &LogWatch) {
    p.signal(Signal::SIGTERM).unwrap();
    let status = p
        .wait_timeout(T)
        .unwrap()
        .expect("legacy mode exits on SIGTERM");
    assert!(status.success(), "{status}\n{}", log.text());
}

#[test]
fn legacy_mode_in_a_container_keeps_connections_across_a_restart() {
    let lab = Lab::new();
    let echo = lab.dest_tcp_echo();
    let (first, log) = legacy_in_a_container(&lab);
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"first router");
    sigterm(&first, &log);
    // What it says stays, stays.
    assert_log(
        &log.text(),
        &["signal received, exiting; the clsact filters stay on eth0 and macvlan0"],
    );
    ping_pong(&mut c, b"no router process");
    let (second, log2) = legacy_in_a_container(&lab);
    assert_log(
        &log2.text(),
        &["maps=\"recovered from the clsact filter on eth0\""],
    );
    ping_pong(&mut c, b"second router");
    sigterm(&second, &log2);
    ping_pong(&mut c, b"after the second router");
    assert_eq!(echo.peers().len(), 1, "one connection: {:?}", echo.peers());
}

/// On a kernel without tcx, asking for it is refused with the reason and what to use instead.
fn tcx_is_refused_without_tcx(lab: &Lab) {
    let out = lab.run_init(Start::HostBpffs, &["--attach", "tcx"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_log(&err, &["no tcx", "--attach clsact"]);
}

#[test]
fn a_stale_tcx_link_pin_from_a_deleted_namespace_is_replaced() {
    let first = Lab::new();
    if !kernel_has_tcx() {
        return tcx_is_refused_without_tcx(&first);
    }
    let dir = PathBuf::from(format!("{HOST_BPFFS}/{}stale", first.topo.prefix()));
    let _dir = PinDir(dir.clone());
    let explicit = [("EGRESS_BPFFS_DIR", dir.as_path())];
    first.init(Start::HostBpffs, &[], &explicit);
    let pin = dir.join("link_eth0_ingress_eth0");
    assert_ne!(pinned_link_ifindex(&pin).unwrap(), 0, "attached to eth0");
    // The pod goes (its namespaces with it); its pins stay on the node's bpffs.
    drop(first);
    // The kernel severs each link as it unregisters that interface, one after the other.
    let deadline = Instant::now() + Duration::from_secs(30);
    for pin in [pin, dir.join("link_macvlan_ingress_macvlan0")] {
        while pinned_link_ifindex(&pin).unwrap() != 0 {
            assert!(
                Instant::now() < deadline,
                "the kernel never severed {} after its namespace was deleted",
                pin.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // A new pod with the same directory.
    let second = Lab::new();
    let log = second.init(Start::HostBpffs, &[], &explicit);
    assert_log(
        &log,
        &[
            "pinned tcx link is severed",
            "links are all severed",
            "maps=\"new\"",
            "attach=\"tcx\"",
        ],
    );
    assert_forwarding(&second);
    let status = second.status(Start::HostBpffs, &["--bpffs-dir", dir.to_str().unwrap()]);
    assert_eq!(
        status["counters"]["new_flows"], 2,
        "fresh counters, the two flows of this pod only: {status:#}"
    );
}

#[test]
fn two_routers_on_one_node_keep_to_their_own_pins() {
    let a = Lab::new();
    let b = Lab::new();
    let (echo_a, echo_b) = (a.dest_tcp_echo(), b.dest_tcp_echo());
    a.init(Start::HostBpffs, &[], &[]);
    b.init(Start::HostBpffs, &[], &[]);
    assert_ne!(a.dir(), b.dir(), "one directory per network namespace");
    // Link pins only where the links are tcx (clsact filters need none).
    let pins: &[&str] = if kernel_has_tcx() {
        &[
            "FLOWS",
            "link_eth0_ingress_eth0",
            "link_macvlan_ingress_macvlan0",
        ]
    } else {
        &["FLOWS"]
    };
    for lab in [&a, &b] {
        for pin in pins {
            assert!(
                lab.dir().join(pin).exists(),
                "{pin} missing in {}",
                lab.dir().display()
            );
        }
    }
    let (mut ca, mut cb) = (a.client_tcp(80), b.client_tcp(80));
    ping_pong(&mut ca, b"a");
    ping_pong(&mut cb, b"b");
    let b_before = b.status(Start::HostBpffs, &[]);
    assert_eq!(b_before["bpffs_dir"], b.dir().display().to_string());
    // Restarting a leaves b alone.
    let log = a.init(Start::HostBpffs, &[], &[]);
    assert_log(&log, &["maps=\"reused the pins\"", "replaced=true"]);
    ping_pong(&mut cb, b"b, after a's restart");
    ping_pong(&mut ca, b"a, after its restart");
    let b_after = b.status(Start::HostBpffs, &[]);
    assert_eq!(
        b_after["attached"], b_before["attached"],
        "b's programs and links are the ones it made"
    );
    for (lab, echo) in [(&a, &echo_a), (&b, &echo_b)] {
        let status = lab.status(Start::HostBpffs, &[]);
        assert_eq!(status["counters"]["new_flows"], 1, "{status:#}");
        assert_eq!(echo.peers().len(), 1, "{:?}", echo.peers());
    }
}

/// `status` in another container of the pod: it sees no pins, and finds the maps through the
/// program attached to eth0.
fn status_in_a_container_next_to(router: Start, found_through: &str) {
    let lab = Lab::new();
    let _echo = lab.dest_tcp_echo();
    lab.init(router, &[], &[]);
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"seen by status");
    let status = lab.status(Start::Container, &[]);
    let maps = status["maps"].as_str().unwrap();
    assert!(
        maps.starts_with(found_through),
        "status found the maps through {maps:?}"
    );
    assert_eq!(status["bpffs_dir"], lab.dir().display().to_string());
    assert_eq!(
        tcp_source(&status),
        format!("{EGRESS_SOURCE}:{}", c.local_addr().unwrap().port())
    );
}

#[test]
fn status_in_a_container_finds_a_clsact_dataplane_without_pins() {
    status_in_a_container_next_to(Start::Container, "the clsact filter on eth0");
}

#[test]
fn status_in_a_container_finds_a_tcx_dataplane_whose_pins_it_cannot_see() {
    let through = format!(
        "the {} on eth0",
        if kernel_has_tcx() {
            "tcx program"
        } else {
            "clsact filter"
        }
    );
    status_in_a_container_next_to(Start::HostBpffs, &through);
}

#[test]
fn legacy_mode_with_attach_tcx_in_a_container_says_the_dataplane_goes_with_it() {
    let lab = Lab::new();
    if !kernel_has_tcx() {
        return tcx_is_refused_without_tcx(&lab);
    }
    let p = lab.spawn(
        Start::Container,
        lab.command("legacy", &["--attach", "tcx"], &[]),
    );
    let log = LogWatch::new(&p);
    log.wait_for("redirect dataplane running", &p);
    assert_log(
        &log.text(),
        &[
            "WARN",
            "private to this container",
            "the dataplane stops when this process exits",
        ],
    );
    let _echo = lab.dest_tcp_echo();
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"while legacy mode runs");
    sigterm(&p, &log);
    assert_log(
        &log.text(),
        &["signal received, exiting; the tcx links go with this container's private bpffs"],
    );
    // And so they do, once the kernel has released the container's mounts: nothing of ours is
    // left on eth0.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = lab.status_output(Start::HostBpffs, &[]);
        if !status.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tcx links outlived the container: {}",
            String::from_utf8_lossy(&status.stdout)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
