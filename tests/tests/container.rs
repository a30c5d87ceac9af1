//! The redirect dataplane as pods run it: egress-router started as a container runtime starts
//! it, in a mount namespace of its own, either with a /sys without bpffs
//! ([`Netns::spawn_container`]: whatever it pins goes with it) or with the "host's" bpffs
//! bind-mounted at /sys/fs/bpf ([`Netns::spawn_with_host_bpffs`]: a pod that mounts hostPath
//! /sys/fs/bpf with HostToContainer propagation, as deploy/redirect-legacy does). The harness's
//! own bpffs stands for the host's; tests about what pods on one node do to each other's pins
//! give their pods a node of their own ([`NodeBpffs`], a directory of the harness's bpffs bound
//! at /sys/fs/bpf), so that no other test's router sees them. `status` and `tc` also run with
//! [`Netns::spawn`] (setns only, in the harness's mount namespace) where that is only a way to
//! look. What init mode leaves behind must keep forwarding, a restart must keep established
//! connections, and routers of different pods must not meet.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use egress_tests::{
    DEST_IP, EGRESS_SOURCE, EchoServer, HOST_BPFFS, NodeBpffs, POD_IP, PinDir, Proc, Topology,
    kernel_has_tcx, pinned_link_ifindex, router_bin, router_command, udp_roundtrip,
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
    /// As a container runtime starts it in a pod that mounts the host's /sys/fs/bpf: the lab's
    /// bpffs (the harness's, or its node's) bind-mounted at /sys/fs/bpf.
    Pod,
    /// Sharing the harness's mount namespace (setns only): for looking (`status`, `tc`).
    HostBpffs,
}

/// A topology whose router pins into its default directory (removed afterwards).
struct Lab {
    topo: Topology,
    /// What a [`Start::Pod`] container gets at /sys/fs/bpf, on the harness's side.
    bpffs: PathBuf,
    /// The router's default pin directory on that bpffs, on the harness's side.
    pins: PinDir,
}

impl Lab {
    /// A pod whose containers mount the harness's own bpffs (the "host's").
    fn new() -> Lab {
        let topo = Topology::new().expect("building the namespace topology");
        let pins = PinDir(topo.router.default_pin_dir().unwrap());
        Lab {
            topo,
            bpffs: PathBuf::from(HOST_BPFFS),
            pins,
        }
    }

    /// A pod on `node`: its containers mount the node's bpffs.
    fn on(node: &NodeBpffs) -> Lab {
        let topo = Topology::new().expect("building the namespace topology");
        let pins = PinDir(node.default_pin_dir(&topo.router).unwrap());
        Lab {
            topo,
            bpffs: node.path().to_path_buf(),
            pins,
        }
    }

    /// The default pin directory, on the harness's side.
    fn dir(&self) -> &Path {
        &self.pins.0
    }

    /// Deletes the pod (its namespaces), leaving its default pin directory on the node as a
    /// node does; returns where it is (the node's bpffs removes it in the end).
    fn delete_keeping_pins(self) -> PathBuf {
        let Lab { topo, pins, .. } = self;
        drop(topo);
        let dir = pins.0.clone();
        std::mem::forget(pins);
        dir
    }

    /// The default pin directory as the router in a [`Start::Pod`] container names it.
    fn pod_dir(&self) -> PathBuf {
        self.topo.router.default_pin_dir().unwrap()
    }

    fn spawn(&self, start: Start, cmd: Command) -> Proc {
        match start {
            Start::Container => self.topo.router.spawn_container(cmd),
            Start::Pod => self.topo.router.spawn_with_host_bpffs(cmd, &self.bpffs),
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
    let before = tcp_source(&lab.status(Start::Pod, &[]));
    let log = lab.init(second, args, &[]);
    ping_pong(&mut c, b"after the restart");
    let status = lab.status(Start::Pod, &[]);
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

/// The one line of a router on a persistent bpffs, for `dir` as the router names it.
fn persistent_note(dir: &Path) -> String {
    if persistent_method() == "tcx" {
        format!(
            "tcx links pinned in {}, a bpffs that outlives this process: a restarted router \
             reopens them and keeps established connections",
            dir.display()
        )
    } else {
        format!(
            "maps pinned in {}, a bpffs that outlives this process",
            dir.display()
        )
    }
}

#[test]
fn a_restart_on_a_persistent_bpffs_reopens_the_pinned_tcx_links() {
    // Both runs as a restart-safe pod runs them: the host's /sys/fs/bpf bind-mounted.
    let lab = Lab::new();
    let log = restart_under_a_live_connection(&lab, Start::Pod, Start::Pod, &[]);
    let method = persistent_method();
    assert_log(
        &log,
        &[
            &persistent_note(&lab.pod_dir()),
            &format!("attach=\"{method}\""),
            "maps=\"reused the pins\"",
            "replaced=true",
        ],
    );
    let status = lab.status(Start::Pod, &[]);
    assert_eq!(status["bpffs_dir"], lab.pod_dir().display().to_string());
    assert_eq!(attachments(&status), attached_with(method), "{status:#}");
    if method == "tcx" {
        // The links are pinned on the host's bpffs, and attached.
        for pin in ["link_eth0_ingress_eth0", "link_macvlan_ingress_macvlan0"] {
            assert_ne!(
                pinned_link_ifindex(&lab.dir().join(pin)).unwrap(),
                0,
                "{pin}"
            );
        }
    }
}

#[test]
fn switching_from_clsact_in_a_container_to_tcx_keeps_connections_and_one_program() {
    // (Without tcx in the kernel: from a private bpffs to a persistent one, both clsact.)
    let lab = Lab::new();
    // First without the host's bpffs (clsact), then with it (tcx): the maps come from the
    // clsact filter, and the filter goes once the tcx link is in place.
    let log = restart_under_a_live_connection(&lab, Start::Container, Start::Pod, &[]);
    let method = persistent_method();
    assert_log(
        &log,
        &[
            &format!("attach=\"{method}\""),
            "maps=\"recovered from the clsact filter on eth0\"",
        ],
    );
    let status = lab.status(Start::Pod, &[]);
    assert_eq!(attachments(&status), attached_with(method), "{status:#}");
}

#[test]
fn switching_from_tcx_to_clsact_keeps_connections_and_one_program() {
    let lab = Lab::new();
    let log =
        restart_under_a_live_connection(&lab, Start::Pod, Start::Pod, &["--attach", "clsact"]);
    assert_log(&log, &["attach=\"clsact\"", "maps=\"reused the pins\""]);
    let status = lab.status(Start::Pod, &[]);
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

/// Starts legacy mode as `start` says and waits until its dataplane runs.
fn legacy(lab: &Lab, start: Start) -> (Proc, LogWatch) {
    let p = lab.spawn(start, lab.command("legacy", &[], &[]));
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
    let (first, log) = legacy(&lab, Start::Container);
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"first router");
    sigterm(&first, &log);
    // What it says stays, stays.
    assert_log(
        &log.text(),
        &["signal received, exiting; the clsact filters stay on eth0 and macvlan0"],
    );
    ping_pong(&mut c, b"no router process");
    let (second, log2) = legacy(&lab, Start::Container);
    assert_log(
        &log2.text(),
        &["maps=\"recovered from the clsact filter on eth0\""],
    );
    ping_pong(&mut c, b"second router");
    sigterm(&second, &log2);
    ping_pong(&mut c, b"after the second router");
    assert_eq!(echo.peers().len(), 1, "one connection: {:?}", echo.peers());
}

/// The restart-safe legacy pod (deploy/redirect-legacy): the host's /sys/fs/bpf mounted, tcx
/// links and maps pinned there; what the last line says stays, stays, and the next container
/// reopens the pins under the live connection.
#[test]
fn legacy_mode_in_a_pod_with_the_hosts_bpffs_keeps_connections_across_a_restart() {
    let lab = Lab::new();
    let echo = lab.dest_tcp_echo();
    let (first, log) = legacy(&lab, Start::Pod);
    let method = persistent_method();
    assert_log(
        &log.text(),
        &[
            &persistent_note(&lab.pod_dir()),
            &format!("attach=\"{method}\""),
            "maps=\"new\"",
        ],
    );
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"first router");
    sigterm(&first, &log);
    let stays = if method == "tcx" {
        format!(
            "signal received, exiting; the tcx links pinned in {} stay: the dataplane keeps working",
            lab.pod_dir().display()
        )
    } else {
        "signal received, exiting; the clsact filters stay on eth0 and macvlan0".to_string()
    };
    assert_log(&log.text(), &[&stays]);
    ping_pong(&mut c, b"no router process");
    let (second, log2) = legacy(&lab, Start::Pod);
    assert_log(
        &log2.text(),
        &[
            &format!("attach=\"{method}\""),
            "maps=\"reused the pins\"",
            "replaced=true",
        ],
    );
    ping_pong(&mut c, b"second router");
    sigterm(&second, &log2);
    assert_log(&log2.text(), &[&stays]);
    ping_pong(&mut c, b"after the second router");
    assert_eq!(echo.peers().len(), 1, "one connection: {:?}", echo.peers());
    let status = lab.status(Start::Pod, &[]);
    assert_eq!(status["counters"]["new_flows"], 1, "one flow: {status:#}");
    assert_eq!(attachments(&status), attached_with(method), "{status:#}");
}

/// On a kernel without tcx, asking for it is refused with the reason and what to use instead.
fn tcx_is_refused_without_tcx(lab: &Lab) {
    let out = lab.run_init(Start::Pod, &["--attach", "tcx"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_log(&err, &["no tcx", "--attach clsact"]);
}

/// Waits until the kernel has severed the links pinned in `dir` (their namespace deleted: it
/// unregisters the interfaces one after the other).
fn wait_until_severed(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for pin in ["link_eth0_ingress_eth0", "link_macvlan_ingress_macvlan0"] {
        let pin = dir.join(pin);
        while pinned_link_ifindex(&pin).unwrap() != 0 {
            assert!(
                Instant::now() < deadline,
                "the kernel never severed {} after its namespace was deleted",
                pin.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A directory given with EGRESS_BPFFS_DIR, the same for a pod and the one that replaces it
/// (the default is one per namespace, so only an explicit directory is reused): the links the
/// deleted pod left there are severed, and the new pod replaces them and starts afresh.
#[test]
fn a_stale_tcx_link_pin_from_a_deleted_namespace_is_replaced() {
    let node = NodeBpffs::new(&format!("er-{}-stale-node", std::process::id())).unwrap();
    let first = Lab::on(&node);
    if !kernel_has_tcx() {
        return tcx_is_refused_without_tcx(&first);
    }
    let inside = Path::new(HOST_BPFFS).join("egress-router-stale");
    let dir = node.path().join("egress-router-stale");
    let explicit = [("EGRESS_BPFFS_DIR", inside.as_path())];
    first.init(Start::Pod, &[], &explicit);
    let pin = dir.join("link_eth0_ingress_eth0");
    assert_ne!(pinned_link_ifindex(&pin).unwrap(), 0, "attached to eth0");
    // The pod goes (its namespaces with it); its pins stay on the node's bpffs.
    drop(first);
    wait_until_severed(&dir);
    // A new pod with the same directory.
    let second = Lab::on(&node);
    let log = second.init(Start::Pod, &[], &explicit);
    assert_log(
        &log,
        &[
            "pinned tcx link is severed",
            "links are all severed",
            "maps=\"new\"",
            "attach=\"tcx\"",
            &format!("tcx links pinned in {}", inside.display()),
        ],
    );
    assert_forwarding(&second);
    let status = second.status(Start::Pod, &["--bpffs-dir", inside.to_str().unwrap()]);
    assert_eq!(
        status["counters"]["new_flows"], 2,
        "fresh counters, the two flows of this pod only: {status:#}"
    );
}

/// The pin files of `dir`, sorted.
fn pins_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Each recreated pod gets a new default directory (a new namespace, a new cookie): the one
/// of the deleted pod, whose links are all severed, would keep its programs and both 65,536-entry
/// tables forever. The next router on the node removes it, saying so, and leaves alone the
/// directory of a live pod and its own.
#[test]
fn a_deleted_pods_default_pin_directory_is_removed_by_the_next_router_on_the_node() {
    let node = NodeBpffs::new(&format!("er-{}-sweep-node", std::process::id())).unwrap();
    let gone = Lab::on(&node);
    if !kernel_has_tcx() {
        return tcx_is_refused_without_tcx(&gone);
    }
    let live = Lab::on(&node);
    let echo = live.dest_tcp_echo();
    gone.init(Start::Pod, &[], &[]);
    live.init(Start::Pod, &[], &[]);
    let mut c = live.client_tcp(80);
    ping_pong(&mut c, b"live pod");
    let gone_inside = gone.pod_dir();
    let live_pins = pins_in(live.dir());
    assert!(
        live_pins.contains(&"link_eth0_ingress_eth0".to_string()),
        "{live_pins:?}"
    );
    let gone_dir = gone.delete_keeping_pins();
    wait_until_severed(&gone_dir);
    assert!(
        gone_dir.join("FLOWS").exists(),
        "the dead pod's maps stay pinned"
    );
    // A new pod on the node.
    let next = Lab::on(&node);
    let log = next.init(Start::Pod, &[], &[]);
    assert_log(
        &log,
        &[
            &format!(
                "pin directory of a network namespace that is gone (its 2 tcx links are all \
                 severed): removing it, and with it the programs and maps only its pins kept \
                 alive dir={}",
                gone_inside.display()
            ),
            &persistent_note(&next.pod_dir()),
            "maps=\"new\"",
        ],
    );
    assert_eq!(
        log.matches("pin directory of a network namespace that is gone")
            .count(),
        1,
        "one line, for the one dead directory:\n{log}"
    );
    assert!(!gone_dir.exists(), "{} is still there", gone_dir.display());
    assert_eq!(pins_in(live.dir()), live_pins, "the live pod's pins stay");
    ping_pong(&mut c, b"live pod, after the next router started");
    assert_eq!(echo.peers().len(), 1, "{:?}", echo.peers());
    assert_forwarding(&next);
    // Restarting the new router removes nothing: no other directory is dead, its own is live.
    let log = next.init(Start::Pod, &[], &[]);
    assert_log(&log, &["maps=\"reused the pins\"", "replaced=true"]);
    assert!(!log.contains("removing"), "{log}");
    assert_eq!(pins_in(live.dir()), live_pins);
}

/// A link in an explicit directory that is attached in another namespace is another router's,
/// or one of a namespace the kernel is still tearing down: the router waits for the kernel to
/// sever it (TEARDOWN_GRACE, 10 s) and carries on if it does; if not, it stops before changing
/// anything, saying that another router uses the directory.
#[test]
fn a_link_of_a_namespace_being_deleted_is_waited_for_and_another_routers_is_refused() {
    let node = NodeBpffs::new(&format!("er-{}-teardown-node", std::process::id())).unwrap();
    let first = Lab::on(&node);
    if !kernel_has_tcx() {
        return tcx_is_refused_without_tcx(&first);
    }
    let inside = Path::new(HOST_BPFFS).join("shared");
    let dir = node.path().join("shared");
    let explicit = [("EGRESS_BPFFS_DIR", inside.as_path())];
    first.init(Start::Pod, &[], &explicit);
    let second = Lab::on(&node);
    // While the first pod lives: refused, after the grace, and nothing of the first touched.
    let started = Instant::now();
    let out = second.run_init(Start::Pod, &[], &explicit);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_log(
        &err,
        &[
            "waiting up to 10s for it to be severed",
            "still after 10s",
            "another egress-router uses this --bpffs-dir",
        ],
    );
    assert!(started.elapsed() >= Duration::from_secs(10), "{err}");
    for pin in ["link_eth0_ingress_eth0", "link_macvlan_ingress_macvlan0"] {
        assert_ne!(pinned_link_ifindex(&dir.join(pin)).unwrap(), 0, "{pin}");
    }
    assert_forwarding(&first);
    // The first pod is deleted while the second router waits: it goes on.
    let p = second.spawn(Start::Pod, second.command("init", &[], &explicit));
    let log = LogWatch::new(&p);
    log.wait_for("waiting up to 10s for it to be severed", &p);
    drop(first);
    let status = p
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("init finishes");
    // The reader thread may still be collecting the last lines.
    std::thread::sleep(Duration::from_millis(200));
    let text = log.text();
    assert!(status.success(), "{status}\n{text}");
    assert_log(
        &text,
        &[
            "pinned tcx link is severed",
            "links are all severed",
            "maps=\"new\"",
            "attach=\"tcx\"",
        ],
    );
    assert_forwarding(&second);
}

/// A link in this namespace's own default directory (named by its cookie: only routers of this
/// namespace pin there) that is attached to an interface no longer here (eth0 moved to another
/// namespace, a new eth0 in its place) is a leftover of ours: detached from the interface that
/// left and replaced, instead of being taken for another router's.
#[test]
fn a_link_of_our_own_directory_on_an_interface_that_left_is_detached_and_replaced() {
    let mut lab = Lab::new();
    if !kernel_has_tcx() {
        return tcx_is_refused_without_tcx(&lab);
    }
    let _echo = lab.dest_tcp_echo();
    lab.init(Start::Pod, &[], &[]);
    lab.topo.add_netns("away").unwrap();
    let away = lab.topo.extra.last().unwrap();
    let away_fd = std::os::fd::AsRawFd::as_raw_fd(&away.fd());
    lab.topo
        .router
        .netlink(|h| async move {
            let idx = egress_tests::netlink::link_index(&h, "eth0").await?;
            egress_tests::netlink::move_link(&h, idx, away_fd).await
        })
        .unwrap();
    // The pod gets a new eth0 to the client (whose old peer went away with the old one).
    lab.topo
        .router
        .add_veth_to("eth0", &lab.topo.client, "c1")
        .unwrap();
    lab.topo
        .router
        .add_addr("eth0", "10.128.0.5/24".parse().unwrap())
        .unwrap();
    for (dst, via) in [("10.128.0.5/32", None), ("0.0.0.0/0", Some(POD_IP))] {
        lab.topo
            .client
            .add_route(dst.parse().unwrap(), via, "c1")
            .unwrap();
    }
    let log = lab.init(Start::Pod, &[], &[]);
    assert_log(
        &log,
        &[
            "pinned tcx link of this network namespace's directory is attached to an interface that is not here",
            "attach=\"tcx\"",
            "maps=\"reused the pins\"",
        ],
    );
    let status = lab.status(Start::Pod, &[]);
    assert_eq!(attachments(&status), attached_with("tcx"), "{status:#}");
    // Nothing of ours is left on the eth0 that went away.
    let mut cmd = Command::new(router_bin());
    cmd.args(["status", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let away = lab.topo.extra.last().unwrap();
    let out = away.spawn(cmd).unwrap().output(T).unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("no egress-router program attached to eth0"),
        "status on the eth0 that went away: {text}"
    );
    let mut c = lab.client_tcp(80);
    ping_pong(&mut c, b"through the new eth0");
}

#[test]
fn two_routers_on_one_node_keep_to_their_own_pins() {
    let node = NodeBpffs::new(&format!("er-{}-two-node", std::process::id())).unwrap();
    let a = Lab::on(&node);
    let b = Lab::on(&node);
    let (echo_a, echo_b) = (a.dest_tcp_echo(), b.dest_tcp_echo());
    for lab in [&a, &b] {
        let log = lab.init(Start::Pod, &[], &[]);
        assert_log(
            &log,
            &[
                &persistent_note(&lab.pod_dir()),
                &format!("attach=\"{}\"", persistent_method()),
                "maps=\"new\"",
            ],
        );
    }
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
    let b_before = b.status(Start::Pod, &[]);
    assert_eq!(b_before["bpffs_dir"], b.pod_dir().display().to_string());
    let b_pins = pins_in(b.dir());
    // Restarting a leaves b alone.
    let log = a.init(Start::Pod, &[], &[]);
    assert_log(&log, &["maps=\"reused the pins\"", "replaced=true"]);
    assert!(!log.contains("removing"), "{log}");
    ping_pong(&mut cb, b"b, after a's restart");
    ping_pong(&mut ca, b"a, after its restart");
    let b_after = b.status(Start::Pod, &[]);
    assert_eq!(
        b_after["attached"], b_before["attached"],
        "b's programs and links are the ones it made"
    );
    assert_eq!(pins_in(b.dir()), b_pins, "b's pins stay");
    for (lab, echo) in [(&a, &echo_a), (&b, &echo_b)] {
        let status = lab.status(Start::Pod, &[]);
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
    assert_eq!(status["bpffs_dir"], lab.pod_dir().display().to_string());
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
    status_in_a_container_next_to(Start::Pod, &through);
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
