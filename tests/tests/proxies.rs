//! HTTP and DNS proxy modes end to end: egress-router run as a process in the router namespace
//! (it sets up macvlan0 itself), a real DNS server (dnsmasq) and servers in the destination
//! namespace, clients in the client namespace. Servers must only see EGRESS_SOURCE.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egress_tests::{DEST_IP, EGRESS_SOURCE, POD_IP, Proc, Topology, router_command, tcp_roundtrip};

const T: Duration = Duration::from_secs(5);

struct Lab {
    topo: Topology,
    dir: PathBuf,
    _dns: Proc,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("router.log")).unwrap_or_default();
            eprintln!("egress-router's log:\n{log}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    /// The topology, dnsmasq on the destination server's address answering `*.web.test` with
    /// it, and an HTTP server on port 80 that answers every request with the client address it
    /// saw.
    fn new() -> Lab {
        let topo = Topology::new().expect("topology");
        let dir = std::env::temp_dir().join(format!("{}proxies", topo.prefix()));
        std::fs::create_dir_all(&dir).unwrap();
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
            _dns: dns,
        }
    }

    /// Starts egress-router in `mode` with `var` = `rules` and waits until `port` accepts.
    fn start(&self, mode: &str, var: &str, rules: &str, port: u16) -> Proc {
        let mut cmd = router_command(mode);
        cmd.env("EGRESS_DNS_PROXY_DEBUG", "1")
            .env("EGRESS_ROUTER_DEBUG", "1")
            .stderr(std::fs::File::create(self.dir.join("router.log")).unwrap());
        cmd.env(var, rules)
            .env("EGRESS_RESOLV_CONF", self.dir.join("resolv.conf"));
        let p = self.topo.router.spawn(cmd).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.connect(port).is_err() {
            assert!(
                p.is_running(),
                "egress-router {mode} exited: {:?}",
                p.output(T)
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            );
            assert!(
                Instant::now() < deadline,
                "egress-router {mode} never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
        self.topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((POD_IP, port)), T))
    }
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

#[test]
fn http_proxy_mode_forwards_allowed_names_from_egress_source() {
    let lab = Lab::new();
    let _p = lab.start(
        "http-proxy",
        "EGRESS_HTTP_PROXY_DESTINATION",
        "!deny.web.test\n*.web.test",
        8080,
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
fn dns_proxy_mode_forwards_to_names_and_addresses_from_egress_source() {
    let lab = Lab::new();
    let echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 7)))
        .unwrap();
    let _p = lab.start(
        "dns-proxy",
        "EGRESS_DNS_PROXY_DESTINATION",
        &format!("9000 web.test 80\n9001 {DEST_IP} 7\n9002 nowhere.invalid 80"),
        9000,
    );
    let by_name = exchange(lab.connect(9000).unwrap(), &get("/", "web.test"));
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
    let again = exchange(lab.connect(9000).unwrap(), &get("/", "web.test"));
    assert!(again.ends_with(&EGRESS_SOURCE.to_string()), "{again}");
}
