//! OpenShift's documented pod specs, container by container (SPEC section 9): each container is
//! the egress-router binary run with no arguments and exactly that container's environment, as
//! its own process in its own mount namespace (`Netns::spawn_container`: a /sys without bpffs,
//! as a container runtime gives it); the proxy containers run as a non-root user without any
//! capability or privilege escalation. A real DNS server (dnsmasq) and servers in the destination
//! namespace, clients in the client namespace; servers must only see EGRESS_SOURCE.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use egress_tests::{
    DEST_IP, EGRESS_SOURCE, POD_IP, Proc, Topology, router_bin, tcp_roundtrip, udp_roundtrip,
    unprivileged_command,
};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(5);
/// The proxy containers' user: any non-root UID (OpenShift assigns an arbitrary one).
const PROXY_UID: u32 = 1000680000;

struct Lab {
    topo: Topology,
    dir: PathBuf,
    /// The binary as the image holds it: a copy any user can run.
    image: PathBuf,
    _dns: Proc,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["init.log", "proxy.log", "router.log"] {
                if let Ok(text) = std::fs::read_to_string(self.dir.join(log)) {
                    eprintln!("== {log}:\n{text}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A container's command (the image's binary, no arguments) with only `env` (and PATH, which
/// every image sets).
fn container(env: &[(&str, &str)], mut cmd: Command) -> Command {
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    cmd
}

impl Lab {
    /// The topology, dnsmasq on the destination server's address answering `*.web.test` with
    /// it, and an HTTP server on port 80 that answers every request with the client address it
    /// saw.
    fn new() -> Lab {
        let topo = Topology::new().expect("topology");
        let dir = std::env::temp_dir().join(format!("{}pods", topo.prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("egress-router");
        std::fs::copy(router_bin(), &image).unwrap();
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {DEST_IP}\n")).unwrap();
        let mut dnsmasq = Command::new("dnsmasq");
        dnsmasq
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--port=53",
            ])
            .arg(format!("--listen-address={DEST_IP}"))
            .arg(format!("--address=/web.test/{DEST_IP}"))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let dns = topo
            .dest
            .spawn(dnsmasq)
            .expect("dnsmasq must be installed (cargo xtask setup)");
        // dnsmasq serves TCP too: once port 53 accepts, it answers.
        let deadline = Instant::now() + T;
        while topo
            .dest
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((DEST_IP, 53)), T))
            .is_err()
        {
            assert!(
                dns.is_running() && Instant::now() < deadline,
                "dnsmasq did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let listener = topo
            .dest
            .tcp_listen(SocketAddr::from((DEST_IP, 80)))
            .unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || who_am_i(conn));
            }
        });
        Lab {
            topo,
            dir,
            image,
            _dns: dns,
        }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.dir.join(name)).unwrap()
    }

    /// The router image's environment in a pod spec: EGRESS_SOURCE, EGRESS_GATEWAY and `more`.
    fn router_env<'a>(
        &self,
        source: &'a str,
        more: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![
            ("EGRESS_SOURCE", source),
            ("EGRESS_GATEWAY", "192.168.12.1"),
        ];
        env.extend_from_slice(more);
        env
    }

    /// A privileged container of the router image with `env`, started (not waited for).
    fn router_container(&self, env: &[(&str, &str)], log: &str) -> Proc {
        let mut cmd = container(env, Command::new(&self.image));
        cmd.stdout(self.log(&format!("{log}.out")))
            .stderr(self.log(log));
        self.topo.router.spawn_container(cmd).unwrap()
    }

    /// The pod's init container: runs to completion, and must exit 0.
    fn init_container(&self, env: &[(&str, &str)]) -> Output {
        let out = self
            .router_container(env, "init.log")
            .output(Duration::from_secs(30))
            .unwrap();
        let log = std::fs::read_to_string(self.dir.join("init.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "the init container failed: {}\n{log}",
            out.status
        );
        out
    }

    /// The proxy container: the image run as a non-root user without capabilities, with only
    /// `env`, the pod's resolv.conf mounted as a runtime mounts it; waits until `port` accepts.
    fn proxy_container(&self, env: &[(&str, &str)], port: u16) -> Proc {
        let mut cmd = container(env, unprivileged_command(&self.image, PROXY_UID));
        cmd.stderr(self.log("proxy.log"));
        let resolv = self.dir.join("resolv.conf");
        let p = self
            .topo
            .router
            .spawn_container_with(cmd, &[(&resolv, Path::new("/etc/resolv.conf"))])
            .unwrap();
        self.wait_listening(&p, port);
        p
    }

    fn wait_listening(&self, p: &Proc, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.connect(port).is_err() {
            assert!(
                p.is_running(),
                "the container exited before listening on {port}: {:?}",
                p.try_wait()
            );
            assert!(Instant::now() < deadline, "nothing listened on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
        self.topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((POD_IP, port)), T))
    }
}

/// The real user and effective capabilities of a running process.
fn uid_and_caps(p: &Proc) -> (u32, String) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let uid = field("Uid:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (uid, field("CapEff:"))
}

/// A minimal HTTP/1.1 origin: one request per connection, the body is the client's address.
fn who_am_i(mut c: TcpStream) {
    let peer = c
        .peer_addr()
        .map(|p| p.ip().to_string())
        .unwrap_or_default();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let _ = write!(
        c,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{peer}",
        peer.len()
    );
}

/// Sends `request` on `c` and returns the whole response (the server closes).
fn exchange(mut c: TcpStream, request: &str) -> String {
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

fn get(url: &str, host: &str) -> String {
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

const SOURCE: &str = "192.168.12.99/24";

/// The HTTP proxy pod: the router image as a privileged init container with EGRESS_SOURCE,
/// EGRESS_GATEWAY and EGRESS_ROUTER_MODE=http-proxy, which sets up macvlan0 and exits 0; then the
/// proxy container with EGRESS_HTTP_PROXY_DESTINATION only, unprivileged, whose requests leave
/// from EGRESS_SOURCE through the route the init container set.
#[test]
fn http_proxy_pod_init_container_then_unprivileged_proxy_container() {
    let lab = Lab::new();
    lab.init_container(&lab.router_env(SOURCE, &[("EGRESS_ROUTER_MODE", "http-proxy")]));
    let p = lab.proxy_container(
        &[(
            "EGRESS_HTTP_PROXY_DESTINATION",
            "!deny.web.test\n*.web.test",
        )],
        8080,
    );
    assert_eq!(
        uid_and_caps(&p),
        (PROXY_UID, "0000000000000000".to_string()),
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
fn dns_proxy_pod_init_container_then_unprivileged_proxy_container_on_port_80() {
    let lab = Lab::new();
    let echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 7)))
        .unwrap();
    let port_start = "net.ipv4.ip_unprivileged_port_start";
    assert_eq!(lab.topo.router.sysctl(port_start).unwrap().trim(), "1024");
    lab.init_container(&lab.router_env(SOURCE, &[("EGRESS_ROUTER_MODE", "dns-proxy")]));
    assert_eq!(
        lab.topo.router.sysctl(port_start).unwrap().trim(),
        "0",
        "the DNS proxy pod's init container lets its unprivileged proxy listen below 1024"
    );
    // As OpenShift documents it: a listener on port 80, which an unprivileged HAProxy could
    // only bind through its image's cap_net_bind_service.
    let rules = format!("80 web.test 80\n9001 {DEST_IP} 7\n9002 nowhere.invalid 80");
    let p = lab.proxy_container(
        &[
            ("EGRESS_DNS_PROXY_DESTINATION", &rules),
            ("EGRESS_DNS_PROXY_DEBUG", "1"),
        ],
        80,
    );
    assert_eq!(
        uid_and_caps(&p),
        (PROXY_UID, "0000000000000000".to_string())
    );
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

/// The one-process form, asked for explicitly: set up macvlan0 and serve in one container.
#[test]
fn one_process_form_sets_up_and_serves_in_one_container() {
    let lab = Lab::new();
    let p = lab.router_container(
        &lab.router_env(
            SOURCE,
            &[
                ("EGRESS_ROUTER_MODE", "http-proxy"),
                ("EGRESS_ONE_PROCESS", "true"),
                ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
                (
                    "EGRESS_RESOLV_CONF",
                    &lab.dir.join("resolv.conf").to_string_lossy(),
                ),
            ],
        ),
        "router.log",
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
    let lab = Lab::new();
    let mut cmd = container(
        &[("EGRESS_HTTP_PROXY_DESTINATION", "*")],
        unprivileged_command(&lab.image, PROXY_UID),
    );
    cmd.stderr(Stdio::piped());
    let out = lab
        .topo
        .router
        .spawn_container(cmd)
        .unwrap()
        .output(T)
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("macvlan0 has no IPv4 address")
            && err.contains("EGRESS_ROUTER_MODE=http-proxy"),
        "{err}"
    );
}

/// The redirect pod: the init container (EGRESS_ROUTER_MODE=init) sets up and exits 0 in its
/// own mount namespace, and the pod's pause container does nothing: the dataplane keeps
/// forwarding after the container that made it is gone.
#[test]
fn redirect_pod_keeps_forwarding_after_its_init_container_exits() {
    let lab = Lab::new();
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
    lab.init_container(&lab.router_env(
        SOURCE,
        &[
            ("EGRESS_ROUTER_MODE", "init"),
            (
                "EGRESS_DESTINATION",
                "80 tcp 203.0.113.25 8000\n53 udp 203.0.113.25 5353",
            ),
        ],
    ));
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

/// The legacy pod: one privileged container, EGRESS_ROUTER_MODE unset, which stays until
/// SIGTERM; after it exits the dataplane keeps forwarding.
#[test]
fn legacy_redirect_pod_serves_until_sigterm_and_the_dataplane_stays() {
    let lab = Lab::new();
    let _web = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 8000)))
        .unwrap();
    let p = lab.router_container(
        &lab.router_env(
            SOURCE,
            &[("EGRESS_DESTINATION", "80 tcp 203.0.113.25 8000")],
        ),
        "router.log",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let c = loop {
        if let Ok(c) = lab.connect(80) {
            break c;
        }
        assert!(
            p.is_running() && Instant::now() < deadline,
            "the legacy container never forwarded"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(tcp_roundtrip(c, b"one", T).unwrap(), b"one");
    p.signal(Signal::SIGTERM).unwrap();
    let st = p.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        st.is_some_and(|s| s.success()),
        "legacy mode exits 0 on SIGTERM: {st:?}"
    );
    let c = lab
        .connect(80)
        .expect("the redirect after the legacy container exited");
    assert_eq!(tcp_roundtrip(c, b"two", T).unwrap(), b"two");
}
