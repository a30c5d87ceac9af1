//! OpenShift's documented pod specs, container by container (SPEC section 9): each container is
//! the egress-router binary run with no arguments and exactly that container's environment, in
//! a mount namespace of its own (a /sys without bpffs, as a container runtime gives it); the
//! proxy containers as a non-root UID without any capability or privilege escalation. Each pod
//! runs twice: as processes (`_as_processes`) and as real rootful podman containers of the image
//! `cargo xtask image` built (`_in_podman`). Servers must only see EGRESS_SOURCE.
use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use egress_tests::{
    DEST_IP, EGRESS_SOURCE, NodeBpffs, POD_IP, kernel_has_tcx,
    pod::{Container, PROXY_UID, PodLab, Runtime, exchange, get},
    tcp_roundtrip, udp_roundtrip,
};

const T: Duration = Duration::from_secs(5);
const NO_CAPS: &str = "0000000000000000";

/// The HTTP proxy pod: the router image as a privileged init container with EGRESS_SOURCE,
/// EGRESS_GATEWAY and EGRESS_ROUTER_MODE=http-proxy, which sets up macvlan0 and exits 0; then the
/// proxy container with EGRESS_HTTP_PROXY_DESTINATION only, unprivileged, whose requests leave
/// from EGRESS_SOURCE through the route the init container set.
fn http_proxy_pod(runtime: Runtime) {
    let lab = PodLab::new(runtime);
    lab.init_container(&lab.router_env(&[("EGRESS_ROUTER_MODE", "http-proxy")]));
    let p = lab.proxy_container(
        &[(
            "EGRESS_HTTP_PROXY_DESTINATION",
            "!deny.web.test\n*.web.test",
        )],
        8080,
    );
    assert_eq!(
        p.uid_and_caps().unwrap(),
        (PROXY_UID, NO_CAPS.to_string()),
        "the proxy container runs as a non-root user without capabilities"
    );
    let ok = exchange(
        lab.connect(8080).unwrap(),
        &get("http://www.web.test/", "www.web.test"),
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.ends_with(&EGRESS_SOURCE.to_string()),
        "the origin saw: {ok}"
    );
    assert!(
        ok.to_ascii_lowercase().contains("via:"),
        "a Via header: {ok}"
    );
    let apex = exchange(
        lab.connect(8080).unwrap(),
        &get("http://web.test/", "web.test"),
    );
    assert!(
        apex.starts_with("HTTP/1.1 200"),
        "the wildcard covers its apex: {apex}"
    );
    let denied = exchange(
        lab.connect(8080).unwrap(),
        &get("http://deny.web.test/", "deny.web.test"),
    );
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied.contains("deny.web.test"),
        "the 403 names the rule: {denied}"
    );
    let literal = exchange(
        lab.connect(8080).unwrap(),
        &get(&format!("http://{DEST_IP}/"), &DEST_IP.to_string()),
    );
    assert!(
        literal.starts_with("HTTP/1.1 403"),
        "name rules do not match an IP literal: {literal}"
    );
    // CONNECT, then HTTP inside the tunnel.
    let mut t = lab.connect(8080).unwrap();
    t.set_read_timeout(Some(T)).unwrap();
    t.write_all(b"CONNECT www.web.test:80 HTTP/1.1\r\nHost: www.web.test:80\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    t.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "CONNECT accepted");
    let mut rest = Vec::new();
    let mut b = [0u8; 1];
    while !rest.ends_with(b"\r\n\r\n") {
        t.read_exact(&mut b).unwrap();
        rest.push(b[0]);
    }
    let inner = exchange(t, &get("/", "www.web.test"));
    assert!(
        inner.ends_with(&EGRESS_SOURCE.to_string()),
        "through the tunnel the origin saw: {inner}"
    );
}

#[test]
fn http_proxy_pod_as_processes() {
    http_proxy_pod(Runtime::Processes);
}

#[test]
fn http_proxy_pod_in_podman() {
    http_proxy_pod(Runtime::podman());
}

/// An allow-all HTTP proxy (`*`) still does not open the router pod itself: a server on the
/// pod's loopback, or on its eth0 or EGRESS_SOURCE address, is never reached through it, and the
/// 403 says why. The world outside is (the origin on the destination network answers).
#[test]
fn an_allow_all_http_proxy_pod_does_not_open_the_pod_itself() {
    let lab = PodLab::new(Runtime::Processes);
    let inside = lab
        .topo
        .router
        .tcp_listen(SocketAddr::from(([0, 0, 0, 0], 9099)))
        .unwrap();
    inside.set_nonblocking(true).unwrap();
    lab.init_container(&lab.router_env(&[("EGRESS_ROUTER_MODE", "http-proxy")]));
    lab.proxy_container(&[("EGRESS_HTTP_PROXY_DESTINATION", "*")], 8080);
    let ok = exchange(
        lab.connect(8080).unwrap(),
        &get("http://www.web.test/", "www.web.test"),
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    for host in [
        "127.0.0.1".to_string(),
        POD_IP.to_string(),
        EGRESS_SOURCE.to_string(),
        "[::1]".to_string(),
    ] {
        let url = format!("http://{host}:9099/");
        let r = exchange(lab.connect(8080).unwrap(), &get(&url, &host));
        assert!(r.starts_with("HTTP/1.1 403"), "{url}: {r}");
        assert!(
            r.contains("the proxy reaches it only through an address rule that names it"),
            "{url}: {r}"
        );
    }
    assert!(
        inside
            .accept()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "a server in the router pod was reached through the proxy"
    );
}

/// The DNS proxy pod, with a listener on port 80 as OpenShift documents it (which an unprivileged
/// HAProxy could only bind through its image's cap_net_bind_service).
fn dns_proxy_pod(runtime: Runtime) {
    let lab = PodLab::new(runtime);
    let echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 7)))
        .unwrap();
    let port_start = "net.ipv4.ip_unprivileged_port_start";
    assert_eq!(lab.topo.router.sysctl(port_start).unwrap().trim(), "1024");
    lab.init_container(&lab.router_env(&[("EGRESS_ROUTER_MODE", "dns-proxy")]));
    assert_eq!(
        lab.topo.router.sysctl(port_start).unwrap().trim(),
        "0",
        "the DNS proxy pod's init container lets its unprivileged proxy listen below 1024"
    );
    let rules = format!("80 web.test 80\n9001 {DEST_IP} 7\n9002 nowhere.invalid 80");
    let p = lab.proxy_container(
        &[
            ("EGRESS_DNS_PROXY_DESTINATION", &rules),
            ("EGRESS_DNS_PROXY_DEBUG", "1"),
        ],
        80,
    );
    assert_eq!(p.uid_and_caps().unwrap(), (PROXY_UID, NO_CAPS.to_string()));
    let by_name = exchange(lab.connect(80).unwrap(), &get("/", "web.test"));
    assert!(
        by_name.ends_with(&EGRESS_SOURCE.to_string()),
        "the origin saw: {by_name}"
    );
    let c = lab.connect(9001).unwrap();
    assert_eq!(tcp_roundtrip(c, b"ping", T).unwrap(), b"ping");
    let peers = echo.wait_for_peers(1, T).unwrap();
    assert!(peers.iter().all(|p| p.ip() == EGRESS_SOURCE), "{peers:?}");
    // A name that does not resolve: its connections end without data, the others keep working.
    if let Ok(mut c) = lab.connect(9002) {
        c.set_read_timeout(Some(T)).unwrap();
        let _ = c.write_all(b"hello"); // the reset may already have come
        let mut buf = [0u8; 16];
        let got = c.read(&mut buf);
        assert!(matches!(got, Ok(0) | Err(_)), "nothing comes back: {got:?}");
    }
    let again = exchange(lab.connect(80).unwrap(), &get("/", "web.test"));
    assert!(again.ends_with(&EGRESS_SOURCE.to_string()), "{again}");
}

#[test]
fn dns_proxy_pod_as_processes() {
    dns_proxy_pod(Runtime::Processes);
}

#[test]
fn dns_proxy_pod_in_podman() {
    dns_proxy_pod(Runtime::podman());
}

/// The one-process form, asked for explicitly: set up macvlan0 and serve in one container.
#[test]
fn one_process_form_sets_up_and_serves_in_one_container() {
    let lab = PodLab::new(Runtime::Processes);
    let resolv = lab.dir.join("resolv.conf").to_string_lossy().into_owned();
    let p = lab.router_container(
        &lab.router_env(&[
            ("EGRESS_ROUTER_MODE", "http-proxy"),
            ("EGRESS_ONE_PROCESS", "true"),
            ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
            ("EGRESS_RESOLV_CONF", &resolv),
        ]),
        &[],
    );
    lab.wait_listening(&p, 8080);
    let ok = exchange(
        lab.connect(8080).unwrap(),
        &get("http://www.web.test/", "www.web.test"),
    );
    assert!(ok.ends_with(&EGRESS_SOURCE.to_string()), "{ok}");
}

/// A proxy container whose pod has no init container (no EGRESS_SOURCE on macvlan0) refuses to
/// start rather than send requests from the pod's own address.
#[test]
fn a_proxy_container_without_its_init_container_says_why_and_exits() {
    let lab = PodLab::new(Runtime::Processes);
    let c = lab.start_proxy_container(&[("EGRESS_HTTP_PROXY_DESTINATION", "*")]);
    assert_eq!(c.wait(T).unwrap(), Some(1), "{}", c.log());
    let err = c.log();
    assert!(
        err.contains("macvlan0 has no IPv4 address")
            && err.contains("EGRESS_ROUTER_MODE=http-proxy"),
        "{err}"
    );
    // Nor with an EGRESS_SOURCE that no interface of the pod has.
    let c = lab.start_proxy_container(&[
        ("EGRESS_DNS_PROXY_DESTINATION", "9001 203.0.113.25 7"),
        ("EGRESS_SOURCE", "192.168.12.99"),
    ]);
    assert_eq!(c.wait(T).unwrap(), Some(1), "{}", c.log());
    let err = c.log();
    assert!(
        err.contains("EGRESS_SOURCE 192.168.12.99 is not an address of this pod")
            && err.contains("EGRESS_ROUTER_MODE=dns-proxy"),
        "{err}"
    );
}

/// The redirect pod: the init container (EGRESS_ROUTER_MODE=init) sets up and exits 0 in its
/// own mount namespace, and the pod's other container does nothing: the dataplane keeps
/// forwarding after the container that made it is gone.
fn redirect_pod(runtime: Runtime) {
    let lab = PodLab::new(runtime);
    let web = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 8000)))
        .unwrap();
    let dns = lab
        .topo
        .dest
        .udp_echo(SocketAddr::from((DEST_IP, 5353)))
        .unwrap();
    let init = lab.init_container(&lab.router_env(&[
        ("EGRESS_ROUTER_MODE", "init"),
        (
            "EGRESS_DESTINATION",
            "80 tcp 203.0.113.25 8000\n53 udp 203.0.113.25 5353",
        ),
    ]));
    drop(init);
    let c = lab
        .connect(80)
        .expect("the redirect after the init container exited");
    assert_eq!(tcp_roundtrip(c, b"hello", T).unwrap(), b"hello");
    let udp = lab
        .topo
        .client
        .udp_bind(SocketAddr::from(([0, 0, 0, 0], 0)))
        .unwrap();
    assert_eq!(
        udp_roundtrip(&udp, SocketAddr::from((POD_IP, 53)), b"q", T).unwrap(),
        b"q"
    );
    let peers = web.wait_for_peers(1, T).unwrap();
    assert!(peers.iter().all(|p| p.ip() == EGRESS_SOURCE), "{peers:?}");
    let peers = dns.wait_for_peers(1, T).unwrap();
    assert!(peers.iter().all(|p| p.ip() == EGRESS_SOURCE), "{peers:?}");
}

#[test]
fn redirect_pod_as_processes() {
    redirect_pod(Runtime::Processes);
}

#[test]
fn redirect_pod_in_podman() {
    redirect_pod(Runtime::podman());
}

/// The legacy pod: one privileged container, EGRESS_ROUTER_MODE unset, which stays until
/// SIGTERM; after it exits the dataplane keeps forwarding.
fn legacy_redirect_pod(runtime: Runtime) {
    let lab = PodLab::new(runtime);
    let _web = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 8000)))
        .unwrap();
    let p = lab.router_container(
        &lab.router_env(&[("EGRESS_DESTINATION", "80 tcp 203.0.113.25 8000")]),
        &[],
    );
    let c = lab
        .connect_within(80, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the legacy container never forwarded: {e}\n{}", p.log()));
    assert!(p.is_running(), "{}", p.log());
    assert_eq!(tcp_roundtrip(c, b"one", T).unwrap(), b"one");
    // Debugging next to the running router, from containers of their own.
    let (code, status) = lab.debug_container(false, &["status"]);
    assert_eq!(code, 0, "{status}");
    assert!(
        status.contains("203.0.113.25:8000") && status.contains("192.168.12.99:"),
        "status shows the connection: {status}"
    );
    let (code, net) = lab.debug_container(true, &["net", "show", "dev", "eth0"]);
    assert_eq!(code, 0, "{net}");
    assert!(
        net.contains("eth0_ingress"),
        "bpftool sees the program: {net}"
    );
    let (code, prog) = lab.debug_container(true, &["prog", "show", "name", "eth0_ingress"]);
    assert_eq!(code, 0, "{prog}");
    assert!(prog.contains("sched_cls"), "{prog}");
    p.terminate().unwrap();
    assert_eq!(
        p.wait(Duration::from_secs(10)).unwrap(),
        Some(0),
        "legacy mode exits 0 on SIGTERM:\n{}",
        p.log()
    );
    let c = lab
        .connect(80)
        .expect("the redirect after the legacy container exited");
    assert_eq!(tcp_roundtrip(c, b"two", T).unwrap(), b"two");
}

#[test]
fn legacy_redirect_pod_as_processes() {
    legacy_redirect_pod(Runtime::Processes);
}

#[test]
fn legacy_redirect_pod_in_podman() {
    legacy_redirect_pod(Runtime::podman());
}

/// One message over a live connection to the echo server, echoed back.
fn ping_pong(c: &mut std::net::TcpStream, msg: &[u8], log: impl Fn() -> String) {
    c.write_all(msg).expect("writing on the live connection");
    let mut got = vec![0u8; msg.len()];
    if let Err(e) = c.read_exact(&mut got) {
        panic!(
            "the live connection carries no data through the router ({e}) at {:?}:\n{}",
            String::from_utf8_lossy(msg),
            log()
        );
    }
    assert_eq!(got, msg);
}

/// Waits until a container's log holds `needle`.
fn wait_for_log(c: &Container, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !c.log().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline && c.is_running(),
            "no {needle:?} in the log (running: {}):\n{}",
            c.is_running(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The legacy pod's router container deleted and created again (`podman stop`: SIGTERM, then
/// `podman rm`, then `podman run` of the same spec) under an established TCP connection from
/// the client through the router, which must exchange data after the container is gone and
/// after the new one has set up.
///
/// With `node` (a bpffs directory of the test's own, standing for the node's /sys/fs/bpf)
/// mounted at /sys/fs/bpf as deploy/redirect-legacy mounts the host's (hostPath,
/// HostToContainer): tcx links and maps pinned there, on the node, and the new container
/// reopens them. Without it: clsact filters, which the kernel keeps on eth0 and macvlan0 after
/// the container's private bpffs is gone, and the new container finds the maps through them.
/// Both keep the connection; only the mount puts the pins on the node.
fn legacy_pod_restart(node: Option<&NodeBpffs>) {
    let lab = PodLab::new(Runtime::podman());
    let echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 8000)))
        .unwrap();
    let env = lab.router_env(&[("EGRESS_DESTINATION", "80 tcp 203.0.113.25 8000")]);
    let start = || match node {
        Some(n) => lab.router_container_with_bpffs(&env, n.path()),
        None => lab.router_container(&env, &[]),
    };
    let persistent = node.is_some();
    let tcx = persistent && kernel_has_tcx();
    let method = if tcx { "tcx" } else { "clsact" };
    let inside = lab.topo.router.default_pin_dir().unwrap();
    let first = start();
    wait_for_log(&first, "redirect dataplane running");
    let log = first.log();
    assert!(log.contains(&format!("attach=\"{method}\"")), "{log}");
    assert!(log.contains("maps=\"new\""), "{log}");
    let mut c = lab
        .connect_within(80, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the legacy container never forwarded: {e}\n{log}"));
    c.set_read_timeout(Some(T)).unwrap();
    ping_pong(&mut c, b"first container", || first.log());
    assert_eq!(
        first.stop(Duration::from_secs(10)).unwrap(),
        0,
        "legacy mode exits 0 on SIGTERM:\n{}",
        first.log()
    );
    let stays = if tcx {
        format!(
            "signal received, exiting; the tcx links pinned in {} stay: the dataplane keeps working",
            inside.display()
        )
    } else {
        "signal received, exiting; the clsact filters stay on eth0 and macvlan0".to_string()
    };
    let log = first.log();
    assert!(log.contains(&stays), "the log lacks {stays:?}:\n{log}");
    first.remove().unwrap();
    ping_pong(&mut c, b"no container", || log.clone());
    match node {
        Some(n) => {
            let dir = n.default_pin_dir(&lab.topo.router).unwrap();
            let mut wanted = vec!["FLOWS", "NEW_FLOWS"];
            if tcx {
                wanted.extend(["link_eth0_ingress_eth0", "link_macvlan_ingress_macvlan0"]);
            }
            for pin in wanted {
                assert!(
                    dir.join(pin).exists(),
                    "{pin} is not pinned on the node's bpffs in {}",
                    dir.display()
                );
            }
        }
        None => {
            // The host's default directory for this namespace: nothing there.
            let on_host = lab.topo.router.default_pin_dir().unwrap();
            assert!(
                !on_host.exists(),
                "without the mount nothing is pinned outside the container: {}",
                on_host.display()
            );
        }
    }
    let second = start();
    wait_for_log(&second, "redirect dataplane running");
    let log = second.log();
    let maps = if persistent {
        "maps=\"reused the pins\"".to_string()
    } else {
        "maps=\"recovered from the clsact filter on eth0\"".to_string()
    };
    for needle in [
        format!("attach=\"{method}\""),
        maps,
        "replaced=true".to_string(),
    ] {
        assert!(log.contains(&needle), "the log lacks {needle:?}:\n{log}");
    }
    ping_pong(&mut c, b"second container", || second.log());
    assert_eq!(
        second.stop(Duration::from_secs(10)).unwrap(),
        0,
        "{}",
        second.log()
    );
    ping_pong(&mut c, b"second container gone", || second.log());
    assert_eq!(echo.peers().len(), 1, "one connection: {:?}", echo.peers());
}

#[test]
fn legacy_redirect_pod_with_the_nodes_bpffs_keeps_a_connection_across_a_container_restart_in_podman()
 {
    let node = NodeBpffs::new(&format!("er-{}-podman-node", std::process::id())).unwrap();
    legacy_pod_restart(Some(&node));
}

#[test]
fn legacy_redirect_pod_without_the_nodes_bpffs_keeps_forwarding_and_the_connection_in_podman() {
    legacy_pod_restart(None);
}

// ---------------------------------------------------------------------------------------------
// deploy/'s Pod manifests, played unchanged by `podman kube play` (the Deployments too would
// need a podman that plays a Deployment with init containers; podman 4.3 loops on them).

fn manifest(dir: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(dir)
        .join("openshift-pod.yaml")
}

/// GET `path` on the pod's metrics listener (port 9190) from the client: the status line and
/// the body.
fn metrics_get(lab: &PodLab, path: &str) -> String {
    let c = lab
        .connect_within(9190, Duration::from_secs(30))
        .expect("the metrics listener");
    exchange(
        c,
        &format!("GET {path} HTTP/1.1\r\nHost: {POD_IP}\r\nConnection: close\r\n\r\n"),
    )
}

/// The readiness probe of the manifest's container answers 200 within `timeout`.
fn assert_ready(lab: &PodLab, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let r = metrics_get(lab, "/readyz");
        if r.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kube-played pod's running container (its init container has exited) runs as the
/// manifest's non-root UID with no capability, and its liveness probe answers.
fn assert_proxy_container_unprivileged(lab: &PodLab) {
    let running: Vec<String> = lab
        .kube_containers()
        .into_iter()
        .filter(|c| {
            egress_tests::podman::podman_output(&["inspect", "-f", "{{.State.Running}}", c])
                .is_ok_and(|r| r.trim() == "true")
        })
        .collect();
    assert_eq!(running.len(), 1, "one running container: {running:?}");
    let pid =
        egress_tests::podman::podman_output(&["inspect", "-f", "{{.State.Pid}}", &running[0]])
            .unwrap();
    let (uid, caps) = egress_tests::pod::uid_and_caps(pid.trim().parse().unwrap()).unwrap();
    assert_eq!((uid, caps.as_str()), (PROXY_UID, NO_CAPS));
    let live = metrics_get(lab, "/healthz");
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
}

#[test]
fn kube_play_of_the_http_proxy_pod_manifest() {
    let lab = PodLab::kube_play(&manifest("http-proxy"));
    let c = lab
        .connect_within(8080, Duration::from_secs(30))
        .expect("the proxy container listens");
    // The manifest's rules end with '*' after denying *.example.com.
    let ok = exchange(c, &get(&format!("http://{DEST_IP}/"), &DEST_IP.to_string()));
    assert!(ok.ends_with(&EGRESS_SOURCE.to_string()), "{ok}");
    let denied = exchange(
        lab.connect(8080).unwrap(),
        &get("http://www.example.com/", "www.example.com"),
    );
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert_ready(&lab, T);
    let metrics = metrics_get(&lab, "/metrics");
    assert!(
        metrics.contains("egress_router_http_denials_total{line=\"1\"} 1"),
        "{metrics}"
    );
    assert_proxy_container_unprivileged(&lab);
}

#[test]
fn kube_play_of_the_dns_proxy_pod_manifest() {
    let lab = PodLab::kube_play(&manifest("dns-proxy"));
    // Its first rule: port 80 to 203.0.113.25, the origin.
    let c = lab
        .connect_within(80, Duration::from_secs(30))
        .expect("the DNS proxy container listens on port 80");
    let ok = exchange(c, &get("/", "web.test"));
    assert!(ok.ends_with(&EGRESS_SOURCE.to_string()), "{ok}");
    // Its readiness probe answers, and says what keeps it from ready: a pod played with
    // `--network none` gets no resolv.conf from podman (the kubelet always writes one), so the
    // manifest's two names stay unresolved.
    let probe = metrics_get(&lab, "/readyz");
    assert!(
        probe.starts_with("HTTP/1.1 503")
            && probe.ends_with(
                "not ready: EGRESS_DNS_PROXY_DESTINATION names not resolved yet: \
                 example.com (line 3), foobar.com (line 5)\n"
            ),
        "{probe}"
    );
    // The connection is counted on its rule's line (line 1 of the value is a comment).
    let metrics = metrics_get(&lab, "/metrics");
    assert!(
        metrics.contains("egress_router_dns_connections_total{line=\"2\"} 1"),
        "{metrics}"
    );
    assert_proxy_container_unprivileged(&lab);
}

#[test]
fn kube_play_of_the_redirect_pod_manifest() {
    let lab = PodLab::kube_play(&manifest("redirect"));
    // Its ConfigMap's first rule: port 80 to 203.0.113.25:80, the origin.
    let c = lab
        .connect_within(80, Duration::from_secs(30))
        .expect("the redirect after the init container");
    let ok = exchange(c, &get("/", "web.test"));
    assert!(ok.ends_with(&EGRESS_SOURCE.to_string()), "{ok}");
    // The exporter in the pause container's place: ready, and it counts that flow.
    assert_ready(&lab, Duration::from_secs(30));
    let metrics = metrics_get(&lab, "/metrics");
    assert!(
        metrics.contains("egress_router_redirect_new_flows_total 1"),
        "{metrics}"
    );
}

/// The restart-safe legacy pod mounts the node's /sys/fs/bpf: its pins land there, in the
/// directory of its own network namespace. Checked once the router says it is ready (set-up
/// done): traffic flows as soon as eth0's program is attached, a moment before its link is
/// pinned. Only that directory is looked at and removed: other tests' routers pin beside it.
#[test]
fn kube_play_of_the_legacy_redirect_pod_manifest_pins_on_the_nodes_bpffs() {
    let lab = PodLab::kube_play(&manifest("redirect-legacy"));
    let dir = egress_tests::PinDir(lab.topo.router.default_pin_dir().unwrap());
    let c = lab
        .connect_within(80, Duration::from_secs(30))
        .expect("the legacy router forwards");
    let ok = exchange(c, &get("/", "web.test"));
    assert!(ok.ends_with(&EGRESS_SOURCE.to_string()), "{ok}");
    assert_ready(&lab, Duration::from_secs(30));
    let pins: std::collections::BTreeSet<String> = std::fs::read_dir(&dir.0)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut wanted = vec![
        "FLOWS",
        "link_macvlan_ingress_macvlan0",
        "link_eth0_ingress_eth0",
    ];
    if !egress_tests::kernel_has_tcx() {
        // Before Linux 6.6 the kernel keeps clsact filters; only the maps are pinned.
        wanted.retain(|p| !p.starts_with("link_"));
    }
    let logs: String = lab
        .kube_containers()
        .iter()
        .map(|c| egress_tests::podman::podman_logs(c))
        .collect();
    drop(lab);
    for pin in wanted {
        assert!(
            pins.contains(pin),
            "{pin} is not pinned on the node's bpffs in {}: {pins:?}\nthe router said:\n{logs}",
            dir.0.display()
        );
    }
}

/// The image `cargo xtask image` wrote: labelled with its version and source revision, its
/// entrypoint the binary, and the binary static (the image holds nothing else to link against).
#[test]
fn the_image_is_labelled_and_runs_its_static_binary() {
    let image = egress_tests::podman::load_image(false).unwrap();
    let inspect = |format: &str| {
        egress_tests::podman::podman_output(&["image", "inspect", "-f", format, &image]).unwrap()
    };
    let labels = inspect("{{json .Labels}}");
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION"),
        "{labels}"
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap_or("");
    assert!(
        revision.len() >= 40 && revision[..40].chars().all(|c| c.is_ascii_hexdigit()),
        "the source revision: {labels}"
    );
    assert!(
        inspect("{{json .Config.Entrypoint}}").contains("/usr/bin/egress-router"),
        "{labels}"
    );
    let out = egress_tests::podman::podman_output(&[
        "run",
        "--rm",
        "--network",
        "none",
        &image,
        "--version",
    ])
    .unwrap();
    assert!(out.starts_with("egress-router "), "{out}");
}
