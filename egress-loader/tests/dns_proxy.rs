//! DNS proxy mode end to end on loopback: real sockets, a real DNS server (dnsmasq) whose answers
//! change while the proxy runs.
//!
//! Needs root and dnsmasq (Debian package `dnsmasq-base`): a resolv.conf cannot name a port, so
//! every test runs its own dnsmasq on port 53 of a dedicated loopback address. Each test owns the
//! addresses `127.77.<slot>.0/24` (DNS server .53, proxy listeners .1, upstream servers .10 and up),
//! so tests run in parallel without sharing anything but the EGRESS_SOURCE address 127.0.0.99,
//! which every upstream server checks its peers against. dnsmasq serves the names of a hosts file
//! in a `--hostsdir` it watches with inotify, with a 1 s TTL; `.test` is local, so other names get
//! NXDOMAIN.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use egress_router::{
    config::{Config, DnsRule, DnsTarget, EgressSource, Mode, Role},
    dns_proxy::{DnsProxy, DnsProxyOptions, Engine},
    metrics::dns::DnsMetrics,
    protected::Protected,
    resolver::ResolverOptions,
};
use hickory_resolver::TokioResolver;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::oneshot,
    task::JoinHandle,
};

const SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 99);

static NEXT_SLOT: AtomicU8 = AtomicU8::new(1);

/// The loopback /24 one test owns.
struct Slot(u8);

impl Slot {
    fn new() -> Slot {
        assert!(
            nix::unistd::geteuid().is_root(),
            "DNS proxy tests need root (dnsmasq on port 53 of a loopback address)"
        );
        Slot(NEXT_SLOT.fetch_add(1, Ordering::Relaxed))
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 77, self.0, host)
    }

    /// A port free on `ip` right now.
    fn free_port(&self, ip: Ipv4Addr) -> u16 {
        std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

// ---------------------------------------------------------------------------------------------
// dnsmasq

struct Dnsmasq {
    child: Child,
    dir: PathBuf,
    resolv_conf: PathBuf,
    checker: TokioResolver,
}

impl Dnsmasq {
    /// Starts dnsmasq on `<ip>:53` serving `records`; returns once it answers.
    async fn start(ip: Ipv4Addr, records: &[(&str, &[Ipv4Addr])]) -> Dnsmasq {
        let dir = std::env::temp_dir().join(format!("egress-dns-test-{}-{ip}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("hosts")).unwrap();
        let resolv_conf = dir.join("resolv.conf");
        std::fs::write(
            &resolv_conf,
            format!("nameserver {ip}\noptions timeout:1 attempts:2\n"),
        )
        .unwrap();
        write_hosts(&dir, records);
        let child = Command::new(dnsmasq_path())
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--pid-file=",
                "--bind-interfaces",
                "--port=53",
                "--local-ttl=1",
                "--local=/test/",
                "--log-queries",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--hostsdir={}", dir.join("hosts").display()))
            .arg(format!(
                "--log-facility={}",
                dir.join("dnsmasq.log").display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting dnsmasq");
        let checker = egress_router::resolver::build_with(
            &ResolverOptions {
                resolv_conf: resolv_conf.clone(),
            },
            |o| o.cache_size = 0,
        )
        .unwrap();
        let dns = Dnsmasq {
            child,
            dir,
            resolv_conf,
            checker,
        };
        for (name, addrs) in records {
            dns.wait_for(name, addrs).await;
        }
        dns
    }

    /// Replaces every record, then waits until dnsmasq serves them.
    async fn set(&self, records: &[(&str, &[Ipv4Addr])]) {
        write_hosts(&self.dir, records);
        for (name, addrs) in records {
            self.wait_for(name, addrs).await;
        }
    }

    async fn wait_for(&self, name: &str, want: &[Ipv4Addr]) {
        let mut want: Vec<IpAddr> = want.iter().map(|a| IpAddr::V4(*a)).collect();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: Vec<IpAddr> = match self.checker.lookup_ip(name).await {
                Ok(l) => {
                    let mut v: Vec<IpAddr> = l.iter().collect();
                    v.sort();
                    v
                }
                Err(_) => vec![],
            };
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq never served {name} = {want:?} (last answer {got:?}); log in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn resolver_options(&self) -> ResolverOptions {
        ResolverOptions {
            resolv_conf: self.resolv_conf.clone(),
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn dnsmasq_path() -> &'static str {
    for p in ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"] {
        if std::path::Path::new(p).exists() {
            return p;
        }
    }
    panic!("dnsmasq not found: install the Debian package dnsmasq-base");
}

/// Writes the hosts file atomically (dnsmasq sees one IN_MOVED_TO and re-reads it).
fn write_hosts(dir: &std::path::Path, records: &[(&str, &[Ipv4Addr])]) {
    let mut text = String::new();
    for (name, addrs) in records {
        for a in *addrs {
            text += &format!("{a} {name}\n");
        }
    }
    let tmp = dir.join("hosts.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("hosts").join("hosts")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// upstream servers

/// A server that greets each connection with its id, echoes until EOF, then says "bye" and closes;
/// it records the peer address of every connection.
struct Server {
    id: String,
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = addr.to_string();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (id2, peers2) = (id.clone(), peers.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, peer)) = listener.accept().await else {
                    continue;
                };
                peers2.lock().unwrap().push(peer);
                let id = id2.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(format!("{id}\n").as_bytes()).await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.write_all(b"bye\n").await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Server {
            id,
            addr,
            peers,
            task,
        }
    }

    fn count(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    /// Every connection it got came from EGRESS_SOURCE.
    fn assert_from_source(&self) {
        let peers = self.peers.lock().unwrap();
        assert!(!peers.is_empty(), "{} got no connection", self.id);
        for p in peers.iter() {
            assert_eq!(
                p.ip(),
                IpAddr::V4(SOURCE),
                "{} got a connection from {p}",
                self.id
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One exchange through the proxy: reads the greeting, sends `payload`, shuts down its write side,
/// reads the echo and "bye". Returns the id of the server reached.
async fn talk(to: SocketAddr, payload: &[u8]) -> io::Result<String> {
    let s = TcpStream::connect(to).await?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut id = String::new();
    r.read_line(&mut id).await?;
    if id.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"));
    }
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        w.shutdown().await?;
        io::Result::Ok(w)
    });
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await?;
    writer.await.unwrap()?;
    if rest.ends_with(b"bye\n") {
        Ok(id.trim().to_string())
    } else {
        Err(io::Error::other(format!(
            "reply without bye ({} bytes)",
            rest.len()
        )))
    }
}

/// Like [`talk`], checking the echo is the payload.
async fn talk_checked(to: SocketAddr, payload: &[u8]) -> String {
    let s = TcpStream::connect(to).await.expect("connect to proxy");
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut id = String::new();
    r.read_line(&mut id).await.unwrap();
    assert!(!id.is_empty(), "no greeting through {to}");
    let p = payload.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&p).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    writer.await.unwrap();
    let mut want = payload.to_vec();
    want.extend_from_slice(b"bye\n");
    assert!(
        rest == want,
        "echo through {to} differs ({} bytes back)",
        rest.len()
    );
    id.trim().to_string()
}

/// The proxy refuses: the connection is reset or closed without a byte.
async fn assert_refused(to: SocketAddr) {
    let t0 = Instant::now();
    match TcpStream::connect(to).await {
        // On loopback the reset can beat the connect's completion.
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
        Ok(mut s) => {
            let mut buf = [0u8; 16];
            let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("a refused connection is closed promptly");
            match r {
                Ok(0) => {}
                Ok(n) => panic!("{n} bytes from a destination that should be refused"),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            }
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// the proxy

fn config(rules: Vec<DnsRule>) -> Config {
    Config {
        role: Role::Proxy,
        mode: Mode::DnsProxy,
        source: EgressSource {
            addr: SOURCE,
            net: ipnet::Ipv4Net::new(SOURCE, 32).unwrap(),
        },
        gateway: Ipv4Addr::new(127, 0, 0, 1),
        debug: true,
        redirect: None,
        http: None,
        dns: Some(rules),
        dns_server_counts: Default::default(),
        proxy_unit_test: false,
        dns_debug: true,
    }
}

fn rule(local_port: u16, target: DnsTarget, remote_port: u16) -> DnsRule {
    DnsRule {
        local_port,
        target,
        remote_port,
        line: 1,
    }
}

fn name(n: &str) -> DnsTarget {
    DnsTarget::Name(n.to_string())
}

fn addr(a: Ipv4Addr) -> DnsTarget {
    DnsTarget::Addr(IpAddr::V4(a))
}

/// Options for tests: listen on the slot's .1, re-resolve within 0.2..1 s.
fn options(slot: &Slot) -> DnsProxyOptions {
    DnsProxyOptions {
        listen_address: IpAddr::V4(slot.ip(1)),
        min_ttl: Duration::from_millis(200),
        max_ttl: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(3),
        // The upstream servers are on loopback, which a real proxy protects.
        protected: Some(Protected::nothing()),
        ..DnsProxyOptions::default()
    }
}

struct Proxy {
    addrs: Vec<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Proxy {
    async fn start(cfg: Config, opts: DnsProxyOptions, resolver: ResolverOptions) -> Proxy {
        let proxy = DnsProxy::bind(
            &cfg,
            &opts,
            &resolver,
            DnsMetrics::default(),
            &[Handle::current()],
        )
        .await
        .unwrap();
        let addrs = proxy.local_addrs();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(async {
            let _ = rx.await;
        }));
        Proxy {
            addrs,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("proxy stops")
            .unwrap()
            .unwrap();
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EGRESS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------------
// tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_destinations_and_remote_ports() {
    init_logs();
    let slot = Slot::new();
    // One server on its own port; another on the port the proxy listens on (no remote port).
    let a = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let same = slot.free_port(slot.ip(1));
    let b = Server::start(SocketAddr::new(slot.ip(11).into(), same)).await;
    let dead_port = slot.free_port(slot.ip(12));
    let (la, ld) = (slot.free_port(slot.ip(1)), slot.free_port(slot.ip(1)));
    let cfg = config(vec![
        rule(la, addr(slot.ip(10)), a.addr.port()),
        rule(same, addr(slot.ip(11)), same),
        rule(ld, addr(slot.ip(12)), dead_port),
    ]);
    let proxy = Proxy::start(cfg, options(&slot), ResolverOptions::default()).await;
    assert_eq!(proxy.addrs.len(), 3);
    for _ in 0..3 {
        assert_eq!(talk_checked(proxy.addrs[0], b"hello a").await, a.id);
        assert_eq!(talk_checked(proxy.addrs[1], b"hello b").await, b.id);
    }
    // Nothing listens behind the third rule: the client is reset, the others carry on.
    assert_refused(proxy.addrs[2]).await;
    assert_eq!(talk_checked(proxy.addrs[0], b"still there").await, a.id);
    a.assert_from_source();
    b.assert_from_source();
    assert_eq!(a.count(), 4);
    assert_eq!(b.count(), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_that_moves() {
    init_logs();
    let slot = Slot::new();
    let a = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let port = a.addr.port();
    let b = Server::start(SocketAddr::new(slot.ip(11).into(), port)).await;
    let dns = Dnsmasq::start(slot.ip(53), &[("mover.test", &[slot.ip(10)])]).await;
    let listen = slot.free_port(slot.ip(1));
    let cfg = config(vec![rule(listen, name("mover.test"), port)]);
    let proxy = Proxy::start(cfg, options(&slot), dns.resolver_options()).await;
    let to = proxy.addrs[0];
    for _ in 0..3 {
        assert_eq!(talk_checked(to, b"x").await, a.id);
    }
    dns.set(&[("mover.test", &[slot.ip(11)])]).await;
    let changed = Instant::now();
    // Within the TTL ceiling (1 s) plus a lookup, new connections go to the new address.
    loop {
        let id = talk_checked(to, b"y").await;
        if id == b.id {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "still going to the old address"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = changed.elapsed();
    for _ in 0..5 {
        assert_eq!(talk_checked(to, b"z").await, b.id);
    }
    eprintln!("moved after {took:?}");
    a.assert_from_source();
    b.assert_from_source();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_with_several_addresses_spreads_over_the_current_set() {
    init_logs();
    let slot = Slot::new();
    let s10 = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let port = s10.addr.port();
    let mut servers = vec![s10];
    for h in 11..=13 {
        servers.push(Server::start(SocketAddr::new(slot.ip(h).into(), port)).await);
    }
    let first: &[Ipv4Addr] = &[slot.ip(10), slot.ip(11), slot.ip(12)];
    let dns = Dnsmasq::start(slot.ip(53), &[("multi.test", first)]).await;
    let listen = slot.free_port(slot.ip(1));
    let cfg = config(vec![rule(listen, name("multi.test"), port)]);
    let proxy = Proxy::start(cfg, options(&slot), dns.resolver_options()).await;
    let to = proxy.addrs[0];

    let mut hits = std::collections::HashMap::<String, usize>::new();
    for _ in 0..30 {
        *hits.entry(talk_checked(to, b"m").await).or_default() += 1;
    }
    // Strict round robin over three addresses.
    for s in &servers[..3] {
        assert_eq!(hits.get(&s.id), Some(&10), "{hits:?}");
    }
    assert_eq!(servers[3].count(), 0);

    // A new set: .10 and .13. Connections go over exactly the new set.
    let second: &[Ipv4Addr] = &[slot.ip(10), slot.ip(13)];
    dns.set(&[("multi.test", second)]).await;
    let t0 = Instant::now();
    while servers[3].count() == 0 {
        talk_checked(to, b"w").await;
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "new address never used"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One more TTL so that no lookup is in flight with the old answer.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before: Vec<usize> = servers.iter().map(Server::count).collect();
    for _ in 0..20 {
        talk_checked(to, b"v").await;
    }
    let delta: Vec<usize> = servers
        .iter()
        .zip(&before)
        .map(|(s, b)| s.count() - b)
        .collect();
    assert_eq!(delta, vec![10, 0, 0, 10], "spread after the change");
    for s in &servers {
        s.assert_from_source();
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_that_does_not_resolve() {
    init_logs();
    let slot = Slot::new();
    let ok = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let port = ok.addr.port();
    let late = Server::start(SocketAddr::new(slot.ip(11).into(), port)).await;
    let dns = Dnsmasq::start(slot.ip(53), &[("ok.test", &[slot.ip(10)])]).await;
    let (l_never, l_ok) = (slot.free_port(slot.ip(1)), slot.free_port(slot.ip(1)));
    let cfg = config(vec![
        rule(l_never, name("late.test"), port),
        rule(l_ok, name("ok.test"), port),
    ]);
    let proxy = Proxy::start(cfg, options(&slot), dns.resolver_options()).await;
    // The name is NXDOMAIN: its listener resets connections, the other one works, repeatedly.
    for _ in 0..5 {
        assert_refused(proxy.addrs[0]).await;
        assert_eq!(talk_checked(proxy.addrs[1], b"fine").await, ok.id);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_refused(proxy.addrs[0]).await;

    // Once it resolves, its listener forwards.
    dns.set(&[("ok.test", &[slot.ip(10)]), ("late.test", &[slot.ip(11)])])
        .await;
    let t0 = Instant::now();
    loop {
        if let Ok(id) = talk(proxy.addrs[0], b"now?").await {
            assert_eq!(id, late.id);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "never started working"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And back to NXDOMAIN: refused again.
    dns.set(&[("ok.test", &[slot.ip(10)])]).await;
    let t0 = Instant::now();
    while talk(proxy.addrs[0], b"gone?").await.is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(5), "still forwarding");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_refused(proxy.addrs[0]).await;
    assert_eq!(talk_checked(proxy.addrs[1], b"fine").await, ok.id);
    late.assert_from_source();
    proxy.stop().await;
}

/// As the binary runs (the pod's loopback, link-local and own addresses protected): a name
/// that resolves to the pod's loopback is refused, while a rule with that address itself names
/// it and forwards. An IPv6 destination is refused, never reached from another address than
/// EGRESS_SOURCE: here [::1] answers, and before it was reached from ::1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_by_name_and_ipv6_destinations_are_refused() {
    init_logs();
    let slot = Slot::new();
    let inside = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let port = inside.addr.port();
    let six = Server::start("[::1]:0".parse().unwrap()).await;
    let dns = Dnsmasq::start(slot.ip(53), &[("inside.test", &[slot.ip(10)])]).await;
    let ports: Vec<u16> = (0..3).map(|_| slot.free_port(slot.ip(1))).collect();
    let cfg = config(vec![
        rule(ports[0], name("inside.test"), port),
        rule(ports[1], addr(slot.ip(10)), port),
        rule(
            ports[2],
            DnsTarget::Addr("::1".parse().unwrap()),
            six.addr.port(),
        ),
    ]);
    let opts = DnsProxyOptions {
        protected: None,
        ..options(&slot)
    };
    let proxy = Proxy::start(cfg, opts, dns.resolver_options()).await;
    assert_eq!(talk_checked(proxy.addrs[1], b"named").await, inside.id);
    // Give the name its first answer, then it must still be refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_refused(proxy.addrs[0]).await;
        assert_refused(proxy.addrs[2]).await;
    }
    assert_eq!(
        inside.count(),
        1,
        "only the rule with the address reached it"
    );
    assert_eq!(six.count(), 0, "nothing reached the IPv6 destination");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_server_outage_keeps_the_last_answer_for_a_while() {
    init_logs();
    let slot = Slot::new();
    let a = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let port = a.addr.port();
    let records: &[(&str, &[Ipv4Addr])] = &[("steady.test", &[slot.ip(10)])];
    let dns = Dnsmasq::start(slot.ip(53), records).await;
    let listen = slot.free_port(slot.ip(1));
    let cfg = config(vec![rule(listen, name("steady.test"), port)]);
    let opts = DnsProxyOptions {
        stale_hold: Duration::from_secs(3),
        ..options(&slot)
    };
    let proxy = Proxy::start(cfg, opts, dns.resolver_options()).await;
    let to = proxy.addrs[0];
    assert_eq!(talk_checked(to, b"up").await, a.id);

    // The DNS server goes away: the last answer is still used...
    drop(dns);
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(1000) {
        assert_eq!(talk_checked(to, b"still").await, a.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...until the stale hold is over; then the name counts as unresolvable.
    while talk(to, b"now?").await.is_ok() {
        assert!(down.elapsed() < Duration::from_secs(15), "kept forever");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        down.elapsed() >= Duration::from_secs(2),
        "{:?}",
        down.elapsed()
    );
    assert_refused(to).await;

    // The server comes back: so does the destination.
    let _dns = Dnsmasq::start(slot.ip(53), records).await;
    let back = Instant::now();
    while talk(to, b"back?").await.is_err() {
        assert!(back.elapsed() < Duration::from_secs(10), "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.assert_from_source();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_every_engine() {
    init_logs();
    let slot = Slot::new();
    // An upstream that reads everything, then replies a lot after the client's EOF.
    let up = TcpListener::bind((slot.ip(10), 0)).await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = up.accept().await.unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                let reply: Vec<u8> = got.iter().rev().copied().cycle().take(1 << 20).collect();
                s.write_all(&reply).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    for engine in [Engine::Auto, Engine::Splice, Engine::Copy] {
        let listen = slot.free_port(slot.ip(1));
        let cfg = config(vec![rule(listen, addr(slot.ip(10)), up_addr.port())]);
        let opts = DnsProxyOptions {
            engine,
            ..options(&slot)
        };
        let proxy = Proxy::start(cfg, opts, ResolverOptions::default()).await;
        let mut c = TcpStream::connect(proxy.addrs[0]).await.unwrap();
        let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&msg).await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        let want: Vec<u8> = msg.iter().rev().copied().cycle().take(1 << 20).collect();
        assert!(reply == want, "{engine:?}: {} bytes back", reply.len());
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_address_is_skipped_for_a_while() {
    init_logs();
    let slot = Slot::new();
    let good = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let port = good.addr.port();
    // .11 is in DNS but nothing listens there yet: it refuses.
    let dns = Dnsmasq::start(slot.ip(53), &[("flaky.test", &[slot.ip(10), slot.ip(11)])]).await;
    let listen = slot.free_port(slot.ip(1));
    let cfg = config(vec![rule(listen, name("flaky.test"), port)]);
    let holdoff = Duration::from_secs(2);
    let opts = DnsProxyOptions {
        holdoff,
        ..options(&slot)
    };
    let proxy = Proxy::start(cfg, opts, dns.resolver_options()).await;
    let to = proxy.addrs[0];
    // Every connection is served (a refusal moves on to the next address at once).
    let t0 = Instant::now();
    for _ in 0..6 {
        assert_eq!(talk_checked(to, b"a").await, good.id);
    }
    // .11 comes up, but it is held off: still everything to .10.
    let back = Server::start(SocketAddr::new(slot.ip(11).into(), port)).await;
    for _ in 0..6 {
        assert_eq!(talk_checked(to, b"b").await, good.id);
    }
    assert!(
        t0.elapsed() < holdoff,
        "test too slow to observe the hold-off"
    );
    assert_eq!(back.count(), 0);
    // After the hold-off it is back in the rotation.
    tokio::time::sleep(holdoff + Duration::from_millis(300)).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(talk_checked(to, b"c").await);
    }
    assert_eq!(ids.iter().filter(|i| **i == back.id).count(), 3, "{ids:?}");
    back.assert_from_source();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections() {
    init_logs();
    let slot = Slot::new();
    let a = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let port = a.addr.port();
    let b = Server::start(SocketAddr::new(slot.ip(11).into(), port)).await;
    let dns = Dnsmasq::start(slot.ip(53), &[("many.test", &[slot.ip(10), slot.ip(11)])]).await;
    // The default, splice with a pool far too small (chunks fall back to copying), plain copy.
    for (engine, max_pipes) in [(Engine::Auto, 32), (Engine::Splice, 2), (Engine::Copy, 0)] {
        let listen = slot.free_port(slot.ip(1));
        let cfg = Config {
            dns_debug: false,
            ..config(vec![rule(listen, name("many.test"), port)])
        };
        let opts = DnsProxyOptions {
            engine,
            max_pipes,
            ..options(&slot)
        };
        let proxy = Proxy::start(cfg, opts, dns.resolver_options()).await;
        let to = proxy.addrs[0];
        let payload: Arc<Vec<u8>> = Arc::new((0..64 * 1024u32).map(|i| (i * 7) as u8).collect());
        let (a0, b0) = (a.count(), b.count());
        let clients: Vec<_> = (0..200)
            .map(|_| {
                let p = payload.clone();
                tokio::spawn(async move { talk_checked(to, &p).await })
            })
            .collect();
        let mut per = std::collections::HashMap::<String, usize>::new();
        for c in clients {
            *per.entry(c.await.unwrap()).or_default() += 1;
        }
        assert_eq!(per.values().sum::<usize>(), 200);
        assert_eq!(
            per.get(&a.id),
            Some(&100),
            "{engine:?} {max_pipes}: {per:?}"
        );
        assert_eq!(
            per.get(&b.id),
            Some(&100),
            "{engine:?} {max_pipes}: {per:?}"
        );
        assert_eq!((a.count() - a0, b.count() - b0), (100, 100));
        proxy.stop().await;
    }
    a.assert_from_source();
    b.assert_from_source();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains() {
    init_logs();
    let slot = Slot::new();
    let a = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let listen = slot.free_port(slot.ip(1));
    let cfg = config(vec![rule(listen, addr(slot.ip(10)), a.addr.port())]);
    let opts = DnsProxyOptions {
        drain_timeout: Duration::from_secs(10),
        ..options(&slot)
    };
    let mut proxy = Proxy::start(cfg.clone(), opts, ResolverOptions::default()).await;
    let to = proxy.addrs[0];

    // An open connection, greeted.
    let s = TcpStream::connect(to).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut id = String::new();
    r.read_line(&mut id).await.unwrap();
    assert_eq!(id.trim(), a.id);

    let _ = proxy.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No new connections...
    let e = TcpStream::connect(to).await.expect_err("listener closed");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    assert!(!proxy.task.is_finished(), "returned before the drain");
    // ...but the open one finishes its exchange.
    w.write_all(b"late data").await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"late databye\n");
    tokio::time::timeout(Duration::from_secs(2), &mut proxy.task)
        .await
        .expect("serve returns once drained")
        .unwrap()
        .unwrap();

    // A connection that does not finish is cut at the end of the drain time.
    let listen = slot.free_port(slot.ip(1));
    let cfg = config(vec![rule(listen, addr(slot.ip(10)), a.addr.port())]);
    let opts = DnsProxyOptions {
        drain_timeout: Duration::from_millis(300),
        ..options(&slot)
    };
    let proxy = Proxy::start(cfg, opts, ResolverOptions::default()).await;
    let mut idle = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(n > 0);
    let t0 = Instant::now();
    proxy.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let r = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
        .await
        .expect("cut connection is closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    init_logs();
    let slot = Slot::new();
    let a = Server::start(SocketAddr::new(slot.ip(10).into(), 0)).await;
    let listen = slot.free_port(slot.ip(1));
    let cfg = config(vec![rule(listen, addr(slot.ip(10)), a.addr.port())]);
    let opts = DnsProxyOptions {
        idle_timeout: Duration::from_millis(500),
        ..options(&slot)
    };
    let proxy = Proxy::start(cfg, opts, ResolverOptions::default()).await;
    let mut c = TcpStream::connect(proxy.addrs[0]).await.unwrap();
    let t0 = Instant::now();
    let mut buf = vec![0u8; 64];
    let n = c.read(&mut buf).await.unwrap();
    assert!(n > 0);
    // Activity keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.write_all(b"ping").await.unwrap();
        let n = c.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
    }
    assert!(t0.elapsed() > Duration::from_millis(900));
    // ...silence closes it.
    let t1 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
        .await
        .expect("idle connection closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let quiet = t1.elapsed();
    assert!(
        quiet >= Duration::from_millis(400) && quiet < Duration::from_millis(1500),
        "{quiet:?}"
    );
    proxy.stop().await;
}
