//! HTTP proxy mode (SPEC section 4) against real servers on loopback: dnsmasq as the DNS server
//! (one per test, on port 53 of its own address in 127.200.0.0-127.249.255.255, since resolv.conf
//! cannot name a port; the address derives from the process id and a counter, and a taken one is
//! detected and skipped), hyper origin servers, plain TCP servers and `openssl s_server` behind
//! CONNECT. Servers listen on ephemeral ports of 127.0.0.2-127.0.1.255, so tests run in parallel.
//!
//! The proxy's EGRESS_SOURCE is 127.0.0.99 and clients connect from 127.0.0.1, so an origin
//! seeing 127.0.0.99 proves the upstream connection left from EGRESS_SOURCE.
//!
//! Needs root (dnsmasq binds port 53) and the Debian packages dnsmasq-base and openssl.
use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use egress_router::{
    config::{Config, EgressSource, HttpMatch, HttpRule, Mode, Role},
    http_proxy::{self, HttpProxyOptions},
    listener,
    metrics::http::HttpMetrics,
    protected::Protected,
    resolver::ResolverOptions,
};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    client::conn::http1::SendRequest,
    header::HeaderValue,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use ipnet::{IpNet, Ipv4Net};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

const SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 99);
const TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// EGRESS_HTTP_PROXY_DESTINATION lines as the config parser produces them (built here so these
/// tests do not depend on the parser).
fn rules(lines: &[&str]) -> Vec<HttpRule> {
    lines
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let (allow, m) = match text.strip_prefix('!') {
                Some(rest) => (false, rest),
                None => (true, *text),
            };
            let matcher = if m == "*" {
                HttpMatch::Any
            } else if let Some(d) = m.strip_prefix("*.") {
                HttpMatch::Domain(d.to_ascii_lowercase())
            } else if let Ok(n) = m.parse::<IpNet>() {
                HttpMatch::Net(n)
            } else if let Ok(ip) = m.parse::<IpAddr>() {
                HttpMatch::Net(IpNet::from(ip))
            } else {
                HttpMatch::Host(m.to_ascii_lowercase())
            };
            HttpRule {
                allow,
                matcher,
                text: text.to_string(),
                line: i + 1,
            }
        })
        .collect()
}

fn config(lines: &[&str], debug: bool) -> Config {
    Config {
        role: Role::Proxy,
        mode: Mode::HttpProxy,
        source: EgressSource {
            addr: SOURCE,
            net: Ipv4Net::new(SOURCE, 32).unwrap(),
        },
        gateway: Ipv4Addr::new(127, 0, 0, 1),
        debug,
        redirect: None,
        http: Some(rules(lines)),
        dns: None,
        dns_server_counts: Default::default(),
        proxy_unit_test: false,
        dns_debug: false,
    }
}

/// The origins here are on loopback, which a real proxy protects: these options protect
/// nothing. The tests of the protection use [`protected_opts`].
fn opts() -> HttpProxyOptions {
    HttpProxyOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        connect_timeout: Duration::from_secs(5),
        protected: Some(Protected::nothing()),
        ..Default::default()
    }
}

/// As the binary runs: this namespace's addresses, loopback and link-local protected.
fn protected_opts() -> HttpProxyOptions {
    HttpProxyOptions {
        protected: None,
        ..opts()
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "egress-http-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// DNS: dnsmasq
// ---------------------------------------------------------------------------------------------

/// A dnsmasq answering only from a hosts file (exact names; a name listed twice has two
/// addresses) and NXDOMAIN for every other `*.test` name.
struct Dns {
    child: Child,
    resolv: PathBuf,
    _dir: TempDir,
}

impl Dns {
    fn start(hosts: &[(&str, &str)]) -> Dns {
        let dir = TempDir::new("dns");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let probe = format!("ready-{}-{n}.test", std::process::id());
        let mut file = format!("127.0.0.1 {probe}\n");
        for (name, ip) in hosts {
            file.push_str(&format!("{ip} {name}\n"));
        }
        let hosts_path = dir.0.join("hosts");
        std::fs::write(&hosts_path, file).unwrap();
        let log = dir.0.join("dnsmasq.log");
        let pid = std::process::id();
        for attempt in 0..40 {
            let addr = Ipv4Addr::new(
                127,
                200 + ((n + attempt) % 50) as u8,
                (pid >> 8) as u8,
                pid as u8,
            );
            let mut child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--conf-file=/dev/null",
                    "--pid-file=",
                    "--bind-interfaces",
                    "--port=53",
                    "--cache-size=0",
                    "--local=/test/",
                    "--log-facility=-",
                    "--user=root",
                ])
                .arg(format!("--listen-address={addr}"))
                .arg(format!("--addn-hosts={}", hosts_path.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("dnsmasq (Debian package dnsmasq-base) must be installed");
            if dns_ready(addr, &probe, &mut child) {
                let resolv = dir.0.join("resolv.conf");
                std::fs::write(
                    &resolv,
                    format!("nameserver {addr}\noptions timeout:2 attempts:2\n"),
                )
                .unwrap();
                return Dns {
                    child,
                    resolv,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "dnsmasq did not start (needs root for port 53): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks `addr` for the A record of `probe` (a name only this instance knows) until it answers.
fn dns_ready(addr: Ipv4Addr, probe: &str, child: &mut Child) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in probe.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false; // e.g. the address is taken by another test's dnsmasq
        }
        let _ = sock.send_to(&query, (addr, 53));
        let mut buf = [0u8; 512];
        if let Ok((len, _)) = sock.recv_from(&mut buf) {
            // Our id, rcode 0 (NOERROR), at least one answer.
            if len > 12 && buf[..2] == [0x12, 0x34] && buf[3] & 0x0f == 0 && buf[7] > 0 {
                return true;
            }
            return false;
        }
    }
    false
}

/// A resolv.conf for tests that resolve nothing.
fn no_dns() -> (TempDir, PathBuf) {
    let dir = TempDir::new("resolv");
    let path = dir.0.join("resolv.conf");
    std::fs::write(&path, "nameserver 127.0.0.1\n").unwrap();
    (dir, path)
}

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

struct Proxy {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: JoinHandle<anyhow::Result<()>>,
}

impl Proxy {
    async fn start(lines: &[&str], resolv: &Path, opts: HttpProxyOptions) -> Proxy {
        Self::start_cfg(config(lines, false), resolv, opts).await
    }

    async fn start_cfg(cfg: Config, resolv: &Path, opts: HttpProxyOptions) -> Proxy {
        // The proxy's own listener (TCP_NODELAY for the connections it accepts).
        let listener = listener::listen(opts.listen, 1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let ropts = ResolverOptions {
            resolv_conf: resolv.to_path_buf(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let metrics = HttpMetrics::new(&mut Registry::default(), &[]);
            http_proxy::serve(listener, &cfg, &opts, &ropts, metrics, async {
                let _ = stopped.await;
            })
            .await
        });
        Proxy {
            addr,
            stop: Some(stop),
            done,
        }
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.done.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Origin servers
// ---------------------------------------------------------------------------------------------

/// What an origin server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    peer: SocketAddr,
    method: Method,
    uri: String,
    headers: HeaderMap,
}

type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A hyper HTTP/1.1 server. Paths: `/echo` streams the request body back as it arrives, `/hop`
/// answers with hop-by-hop fields, `/slow` answers after 600 ms; anything else answers
/// `hello <peer> <method> <uri>`. Every response has `x-served-by: <local address>`.
struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    async fn start(ip: &str) -> Origin {
        Self::on(TcpListener::bind((ip, 0)).await.unwrap())
    }

    fn on(listener: TcpListener) -> Origin {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(origin_respond(req, peer, addr, &log).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.addr.port())
    }
}

async fn origin_respond(
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    log: &Mutex<Vec<Seen>>,
) -> Response<TestBody> {
    log.lock().unwrap().push(Seen {
        peer,
        method: req.method().clone(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    let mut res = match req.uri().path() {
        "/echo" => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(data) = frame.into_data()
                        && tx.send(Ok(Frame::data(data))).await.is_err()
                    {
                        break;
                    }
                }
            });
            Response::new(channel_body(rx))
        }
        "/hop" => {
            let mut res = Response::new(text_body("hop"));
            let h = res.headers_mut();
            for (k, v) in [
                ("connection", "x-bar"),
                ("x-bar", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic realm=x"),
                ("proxy-connection", "keep-alive"),
                ("trailer", "x-t"),
                ("x-keep-resp", "yes"),
            ] {
                h.append(
                    hyper::header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                );
            }
            res
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            Response::new(text_body("slow done"))
        }
        _ => Response::new(text_body(format!(
            "hello {peer} {} {}",
            req.method(),
            req.uri()
        ))),
    };
    res.headers_mut().insert(
        "x-served-by",
        HeaderValue::from_str(&local.to_string()).unwrap(),
    );
    res
}

fn text_body(s: impl Into<Bytes>) -> TestBody {
    http_body_util::Full::new(s.into())
        .map_err(|e| match e {})
        .boxed()
}

fn empty() -> TestBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

fn channel_body(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> TestBody {
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    StreamBody::new(stream).map_err(|e| match e {}).boxed()
}

/// Accepts connections, tells each peer its address (`peer=<addr>\n`), then echoes.
async fn echo_server(ip: &str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.write_all(format!("peer={peer}\n").as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

async fn client(proxy: SocketAddr) -> SendRequest<TestBody> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn request(method: Method, url: &str, body: TestBody) -> Request<TestBody> {
    let uri: hyper::Uri = url.parse().unwrap();
    let host = uri.authority().unwrap().as_str().to_string();
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
        .body(body)
        .unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(sender: &mut SendRequest<TestBody>, req: Request<TestBody>) -> Answer {
    let res = tokio::time::timeout(TIMEOUT, async {
        sender.ready().await.unwrap();
        let res = sender.send_request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await;
    res.expect("proxy answered in time")
}

/// GET `url` through the proxy on a new connection.
async fn get(proxy: SocketAddr, url: &str) -> Answer {
    let mut c = client(proxy).await;
    send(&mut c, request(Method::GET, url, empty())).await
}

/// Writes `raw` and reads until the proxy closes the connection.
async fn raw(proxy: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("proxy closed in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// Sends `CONNECT target` and reads the response head; the stream is then the tunnel.
async fn connect(proxy: SocketAddr, target: &str) -> (u16, String, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut s = BufReader::new(s);
    let mut head = String::new();
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
    })
    .await
    .expect("CONNECT answered in time");
    let status = status_of(&head);
    // Error responses carry a body (content-length); read it.
    let mut body = String::new();
    if status != 200
        && let Some(len) = head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
    {
        let mut buf = vec![0; len.trim().parse().unwrap()];
        s.read_exact(&mut buf).await.unwrap();
        body = String::from_utf8(buf).unwrap();
    }
    (status, body, s)
}

fn peer_ip(s: &Seen) -> IpAddr {
    s.peer.ip()
}

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn names_wildcards_and_apex() {
    let origin = Origin::start("127.0.0.2").await;
    let names = [
        "www.allowed.test",
        "allowed.test",
        "deep.sub.allowed.test",
        "bad.allowed.test",
        "exact.test",
        "sub.exact.test",
        "other.test",
    ];
    let hosts: Vec<_> = names.iter().map(|n| (*n, "127.0.0.2")).collect();
    let dns = Dns::start(&hosts);
    let proxy = Proxy::start(
        &["!bad.allowed.test", "*.allowed.test", "exact.test"],
        &dns.resolv,
        opts(),
    )
    .await;

    for host in [
        "www.allowed.test",
        "allowed.test",
        "deep.sub.allowed.test",
        "WWW.Allowed.TEST.",
        "exact.test",
    ] {
        let a = get(proxy.addr, &origin.url(host, "/x?y=1")).await;
        assert_eq!(a.status, 200, "{host}: {}", a.body);
        assert!(
            a.body.starts_with("hello 127.0.0.99:"),
            "{host}: {}",
            a.body
        );
        assert!(
            a.body.ends_with("GET /x?y=1"),
            "origin-form upstream: {}",
            a.body
        );
    }
    let seen = origin.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|s| peer_ip(s) == IpAddr::V4(SOURCE)));
    assert_eq!(
        seen[0].headers["host"],
        format!("www.allowed.test:{}", origin.addr.port()).as_str()
    );

    let a = get(proxy.addr, &origin.url("bad.allowed.test", "/")).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "denied by rule 1 (line 1): !bad.allowed.test\n");
    let a = get(proxy.addr, &origin.url("sub.exact.test", "/")).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "no rule allows sub.exact.test\n");
    let a = get(proxy.addr, &origin.url("other.test", "/")).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "no rule allows other.test\n");
    assert_eq!(
        origin.seen().len(),
        5,
        "denied requests never reach the origin"
    );
}

#[tokio::test]
async fn addresses_and_cidrs_literal_and_resolved() {
    let good = Origin::start("127.0.0.2").await;
    let bad = Origin::start("127.0.0.3").await;
    let far = Origin::start("127.0.1.2").await;
    let dns = Dns::start(&[
        ("good.test", "127.0.0.2"),
        ("bad.test", "127.0.0.3"),
        ("far.test", "127.0.1.2"),
    ]);
    let proxy = Proxy::start(&["!127.0.0.3", "127.0.0.0/24"], &dns.resolv, opts()).await;

    // Literals.
    let a = get(proxy.addr, &good.url("127.0.0.2", "/")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = get(proxy.addr, &bad.url("127.0.0.3", "/")).await;
    assert_eq!(
        (a.status.as_u16(), a.body.as_str()),
        (403, "denied by rule 1 (line 1): !127.0.0.3\n")
    );
    let a = get(proxy.addr, &far.url("127.0.1.2", "/")).await;
    assert_eq!(
        (a.status.as_u16(), a.body.as_str()),
        (403, "no rule allows 127.0.1.2\n")
    );

    // Through resolution.
    let a = get(proxy.addr, &good.url("good.test", "/")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = get(proxy.addr, &bad.url("bad.test", "/")).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.body,
        "denied by rule 1 (line 1): !127.0.0.3 (bad.test resolves to 127.0.0.3)\n"
    );
    let a = get(proxy.addr, &far.url("far.test", "/")).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "no rule allows far.test (resolves to 127.0.1.2)\n");

    assert_eq!(good.seen().len(), 2);
    assert!(good.seen().iter().all(|s| peer_ip(s) == IpAddr::V4(SOURCE)));
    assert!(bad.seen().is_empty() && far.seen().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Protected destinations and IPv6
// ---------------------------------------------------------------------------------------------

/// The router pod's loopback (and link-local, unspecified, its own addresses) is not the outside
/// world: `*` and name rules never reach it, in any spelling, by name or CONNECT.
#[tokio::test]
async fn the_pods_loopback_and_link_local_are_not_reached_through_star_or_names() {
    let origin = Origin::start("127.0.0.2").await;
    let port = origin.addr.port();
    let dns = Dns::start(&[
        ("inside.test", "127.0.0.2"),
        ("metadata.test", "169.254.169.254"),
    ]);
    let p = Proxy::start(&["*"], &dns.resolv, protected_opts()).await;
    let how = "the proxy reaches it only through an address rule that names it";
    let a = get(p.addr, &origin.url("127.0.0.2", "/")).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(
        a.body,
        format!(
            "127.0.0.2 is the router pod's loopback: {how} (such as 127.0.0.0/8), not through \
             rule 1 (line 1): *\n"
        )
    );
    let a = get(p.addr, &origin.url("inside.test", "/")).await;
    assert_eq!(
        (a.status.as_u16(), a.body.as_str()),
        (
            403,
            &*format!(
                "inside.test resolves to 127.0.0.2, the router pod's loopback: {how} (such as \
                 127.0.0.0/8), not through rule 1 (line 1): *\n"
            )
        )
    );
    for url in [
        format!("http://[::ffff:127.0.0.2]:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://0.0.0.0:{port}/"),
        format!("http://169.254.169.254:{port}/"),
        format!("http://metadata.test:{port}/"),
    ] {
        let a = get(p.addr, &url).await;
        assert_eq!(a.status, 403, "{url}: {}", a.body);
        assert!(a.body.contains(how), "{url}: {}", a.body);
    }
    let (status, body, _) = connect(p.addr, &format!("127.0.0.2:{port}")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("the router pod's loopback"), "{body}");
    assert!(
        origin.seen().is_empty(),
        "nothing reached the pod's loopback"
    );
    drop(p);

    // A name rule is no more than `*`; an address rule no wider than loopback names it.
    let p = Proxy::start(&["*.test"], &dns.resolv, protected_opts()).await;
    assert_eq!(
        get(p.addr, &origin.url("inside.test", "/")).await.status,
        403
    );
    drop(p);
    let p = Proxy::start(&["0.0.0.0/0"], &dns.resolv, protected_opts()).await;
    assert_eq!(get(p.addr, &origin.url("127.0.0.2", "/")).await.status, 403);
    drop(p);
    let p = Proxy::start(&["127.0.0.2", "*"], &dns.resolv, protected_opts()).await;
    let a = get(p.addr, &origin.url("127.0.0.2", "/")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = get(p.addr, &origin.url("inside.test", "/")).await;
    assert_eq!(
        a.status, 200,
        "an address rule before * is checked per address: {}",
        a.body
    );
    assert_eq!(origin.seen().len(), 2);
}

/// Connections leave only from EGRESS_SOURCE (IPv4): an IPv6 destination, literal or a name
/// with only an AAAA record, is a 502 saying why, never a fetch from another address of the
/// pod. Here ::1 would answer: before, the proxy fetched it from ::1.
#[tokio::test]
async fn ipv6_destinations_are_refused_not_fetched_from_another_source() {
    let origin = Origin::start("::1").await;
    let port = origin.addr.port();
    let dns = Dns::start(&[
        ("six.test", "::1"),
        ("both.test", "::1"),
        ("both.test", "127.0.0.7"),
    ]);
    let p = Proxy::start(&["*"], &dns.resolv, opts()).await;
    let why = format!(
        "::1 is an IPv6 address and connections leave only from EGRESS_SOURCE {SOURCE}: IPv6 \
         egress is not supported"
    );
    let a = get(p.addr, &format!("http://[::1]:{port}/")).await;
    assert_eq!(
        (a.status.as_u16(), a.body.as_str()),
        (502, &*format!("cannot connect to [::1]:{port}: {why}\n"))
    );
    let a = get(p.addr, &format!("http://six.test:{port}/")).await;
    assert_eq!(
        (a.status.as_u16(), a.body.as_str()),
        (502, &*format!("cannot connect to [::1]:{port}: {why}\n"))
    );
    let (status, body, _) = connect(p.addr, &format!("[::1]:{port}")).await;
    assert_eq!(
        (status, body.as_str()),
        (502, &*format!("cannot connect to [::1]:{port}: {why}\n"))
    );
    // A name with both: only its IPv4 address is tried (nothing listens there: refused).
    let a = get(p.addr, &format!("http://both.test:{port}/")).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.body
            .starts_with(&format!("connecting to 127.0.0.7:{port}: ")),
        "{}",
        a.body
    );
    assert!(origin.seen().is_empty(), "nothing was fetched over IPv6");
}

#[tokio::test]
async fn rule_order_name_rules_and_address_rules() {
    let near = Origin::start("127.0.0.2").await;
    let far = Origin::start("127.0.1.5").await;
    let dns = Dns::start(&[("a.mix.test", "127.0.0.2"), ("b.mix.test", "127.0.1.5")]);

    // A name rule first decides before resolution.
    let p = Proxy::start(&["*.mix.test", "!127.0.0.0/24"], &dns.resolv, opts()).await;
    let a = get(p.addr, &near.url("a.mix.test", "/")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    drop(p);

    // An address rule first is checked against what the name resolves to.
    let p = Proxy::start(&["!127.0.0.0/24", "*.mix.test"], &dns.resolv, opts()).await;
    let a = get(p.addr, &near.url("a.mix.test", "/")).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.body,
        "denied by rule 1 (line 1): !127.0.0.0/24 (a.mix.test resolves to 127.0.0.2)\n"
    );
    let a = get(p.addr, &far.url("b.mix.test", "/")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    drop(p);

    // A denying name rule first answers without a DNS lookup: a name that does not resolve is
    // denied (403), not a DNS failure (502).
    let p = Proxy::start(&["!*.mix.test", "127.0.0.0/8"], &dns.resolv, opts()).await;
    let a = get(p.addr, &near.url("nx.mix.test", "/")).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "denied by rule 1 (line 1): !*.mix.test\n");
    // `*` last allows what nothing before denied.
    drop(p);
    let p = Proxy::start(&["!b.mix.test", "*"], &dns.resolv, opts()).await;
    assert_eq!(get(p.addr, &near.url("a.mix.test", "/")).await.status, 200);
    assert_eq!(get(p.addr, &far.url("127.0.1.5", "/")).await.status, 200);
    assert_eq!(get(p.addr, &far.url("b.mix.test", "/")).await.status, 403);
}

#[tokio::test]
async fn several_addresses_connects_only_to_passing_ones() {
    // Two origins on the same port: the denied address and the allowed one.
    let (allowed, denied) = loop {
        let a = TcpListener::bind("127.0.0.9:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(d) = TcpListener::bind(("127.0.0.8", port)).await {
            break (Origin::on(a), Origin::on(d));
        }
    };
    let dns = Dns::start(&[
        ("multi.test", "127.0.0.8"),
        ("multi.test", "127.0.0.9"),
        ("none.test", "127.0.0.8"),
        ("none.test", "127.0.0.10"),
    ]);
    let proxy = Proxy::start(
        &["!127.0.0.8", "!127.0.0.10", "*.test"],
        &dns.resolv,
        opts(),
    )
    .await;
    for _ in 0..5 {
        let a = get(proxy.addr, &allowed.url("multi.test", "/")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.headers["x-served-by"], allowed.addr.to_string().as_str());
    }
    assert!(
        denied.seen().is_empty(),
        "never connects to a denied address"
    );
    // None passes: the reason is the verdict for the first address the resolver returned.
    let a = get(proxy.addr, &allowed.url("none.test", "/")).await;
    assert_eq!(a.status, 403);
    assert!(
        [
            "denied by rule 1 (line 1): !127.0.0.8 (none.test resolves to 127.0.0.8)\n",
            "denied by rule 2 (line 2): !127.0.0.10 (none.test resolves to 127.0.0.10)\n"
        ]
        .contains(&a.body.as_str()),
        "{}",
        a.body
    );
}

// ---------------------------------------------------------------------------------------------
// CONNECT
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connect_tunnel_from_egress_source() {
    let (echo, _t) = echo_server("127.0.0.3").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["!127.0.0.4", "127.0.0.3"], &resolv, opts()).await;

    let (status, _, mut s) = connect(proxy.addr, &echo.to_string()).await;
    assert_eq!(status, 200);
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("peer=127.0.0.99:"), "{line}");
    for msg in ["ping", "a longer message through the tunnel"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0; msg.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg.as_bytes());
    }

    let (status, body, _) = connect(proxy.addr, "127.0.0.4:443").await;
    assert_eq!(
        (status, body.as_str()),
        (403, "denied by rule 1 (line 1): !127.0.0.4\n")
    );
    let (status, body, _) = connect(proxy.addr, "127.0.0.5:443").await;
    assert_eq!((status, body.as_str()), (403, "no rule allows 127.0.0.5\n"));
}

/// Bytes the client sends in the same write as the CONNECT request reach the destination first;
/// bulk data crosses both ways, and a half-close: the client's EOF reaches the destination, whose
/// answer after it still reaches the client.
#[tokio::test]
async fn connect_tunnel_pipelined_bytes_and_half_close() {
    let listener = TcpListener::bind(("127.0.0.3", 0)).await.unwrap();
    let dest = listener.local_addr().unwrap();
    // Greets, reads to EOF, then sends back all it got.
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"hi\n").await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&got).await.unwrap();
        got
    });
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["127.0.0.3"], &resolv, opts()).await;

    let mut s = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\nearly ").as_bytes())
        .await
        .unwrap();
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let back = tokio::time::timeout(TIMEOUT, async {
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(status_of(&line), 200, "{line}");
        while line != "\r\n" {
            line.clear();
            s.read_line(&mut line).await.unwrap();
        }
        line.clear();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(line, "hi\n");
        s.write_all(&payload).await.unwrap();
        s.get_mut().shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        back
    })
    .await
    .expect("tunnel answered in time");
    let got = server.await.unwrap();
    assert!(
        got.starts_with(b"early "),
        "{:?}",
        &got[..got.len().min(16)]
    );
    assert!(got[6..] == payload[..], "{} bytes arrived", got.len());
    assert!(back == got, "{} bytes back of {}", back.len(), got.len());
}

#[tokio::test]
async fn connect_tls_handshake_through_tunnel() {
    let dir = TempDir::new("tls");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=tls.test"])
        .args(["-addext", "subjectAltName=DNS:tls.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (Debian package openssl) must be installed");
    assert!(st.success());
    let mut server = tokio::process::Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            "127.0.0.7:0",
            "-www",
            "-naccept",
            "1",
        ])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // s_server prints `ACCEPT 127.0.0.7:<port>` once it listens.
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let port = tokio::time::timeout(TIMEOUT, async {
        loop {
            let mut line = String::new();
            assert!(
                out.read_line(&mut line).await.unwrap() > 0,
                "s_server exited"
            );
            if let Some(addr) = line.trim().strip_prefix("ACCEPT ") {
                break addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
            }
        }
    })
    .await
    .unwrap();
    let dns = Dns::start(&[("tls.test", "127.0.0.7")]);
    let proxy = Proxy::start(&["tls.test"], &dns.resolv, opts()).await;

    let mut client = tokio::process::Command::new("openssl")
        .arg("s_client")
        .args(["-proxy", &proxy.addr.to_string()])
        .args(["-connect", &format!("tls.test:{port}")])
        .args([
            "-servername",
            "tls.test",
            "-verify_return_error",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(&cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(TIMEOUT, client.wait_with_output())
        .await
        .expect("s_client finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "TLS handshake through the tunnel: {stdout}\n{stderr}"
    );
    assert!(stdout.contains("HTTP/1.0 200 ok"), "{stdout}\n{stderr}");
}

// ---------------------------------------------------------------------------------------------
// HTTP semantics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn chunked_bodies_stream_both_ways() {
    let origin = Origin::start("127.0.0.2").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["127.0.0.2"], &resolv, opts()).await;

    let mut c = client(proxy.addr).await;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"first chunk"))))
        .await
        .unwrap();
    let req = request(
        Method::POST,
        &origin.url("127.0.0.2", "/echo"),
        channel_body(rx),
    );
    let res = tokio::time::timeout(TIMEOUT, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    // Each chunk comes back before the next one is sent: neither direction is buffered whole.
    let mut expect = "first chunk";
    for next in ["second chunk", "third chunk", ""] {
        let mut got = Vec::new();
        while got.len() < expect.len() {
            let frame = tokio::time::timeout(TIMEOUT, body.frame())
                .await
                .expect("echoed chunk arrives while the request is still open")
                .expect("response body still open")
                .unwrap();
            got.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(got, expect.as_bytes());
        if next.is_empty() {
            break;
        }
        tx.send(Ok(Frame::data(Bytes::from(next)))).await.unwrap();
        expect = next;
    }
    drop(tx);
    let rest = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());
    let seen = origin.seen();
    assert_eq!(seen[0].headers["transfer-encoding"], "chunked");
    assert_eq!(seen[0].method, Method::POST);
}

#[tokio::test]
async fn keep_alive_two_requests_on_one_connection() {
    let origin = Origin::start("127.0.0.2").await;
    let other = Origin::start("127.0.0.3").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["127.0.0.0/24"], &resolv, opts()).await;

    let mut c = client(proxy.addr).await;
    let a = send(
        &mut c,
        request(Method::GET, &origin.url("127.0.0.2", "/1"), empty()),
    )
    .await;
    assert_eq!(a.status, 200);
    let b = send(
        &mut c,
        request(Method::PUT, &origin.url("127.0.0.2", "/2"), text_body("x")),
    )
    .await;
    assert_eq!(b.status, 200);
    // A third request on the same client connection, to another server.
    let d = send(
        &mut c,
        request(Method::DELETE, &other.url("127.0.0.3", "/3"), empty()),
    )
    .await;
    assert_eq!(d.status, 200);
    assert!(d.body.ends_with("DELETE /3"));
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].method, Method::PUT);
    assert_eq!(seen[0].uri, "/1");
    // The upstream connection was kept too: same source port both times.
    assert_eq!(seen[0].peer, seen[1].peer);
}

#[tokio::test]
async fn upstream_connections_are_reused_across_client_connections() {
    let origin = Origin::start("127.0.0.2").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["127.0.0.2"], &resolv, opts()).await;

    // Two client connections in turn, the first one still open and idle.
    let mut first = client(proxy.addr).await;
    let a = send(
        &mut first,
        request(Method::GET, &origin.url("127.0.0.2", "/1"), empty()),
    )
    .await;
    assert_eq!(a.status, 200);
    let b = get(proxy.addr, &origin.url("127.0.0.2", "/2")).await;
    assert_eq!(b.status, 200);
    // Clients sending `Connection: close` reuse them as well.
    for path in ["/3", "/4"] {
        let url = origin.url("127.0.0.2", path);
        let res = raw(
            proxy.addr,
            format!("GET {url} HTTP/1.1\r\nHost: 127.0.0.2\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&res), 200, "{res}");
    }
    let seen = origin.seen();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter().all(|s| s.peer == seen[0].peer),
        "one upstream connection for all: {:?}",
        seen.iter().map(|s| s.peer).collect::<Vec<_>>()
    );

    // Two requests at the same time need two connections; both are kept afterwards.
    let slow = origin.url("127.0.0.2", "/slow");
    let (x, y) = tokio::join!(get(proxy.addr, &slow), get(proxy.addr, &slow));
    assert_eq!((x.status, y.status), (StatusCode::OK, StatusCode::OK));
    let (x, y) = tokio::join!(get(proxy.addr, &slow), get(proxy.addr, &slow));
    assert_eq!((x.status, y.status), (StatusCode::OK, StatusCode::OK));
    let peers: std::collections::HashSet<_> = origin.seen().iter().map(|s| s.peer).collect();
    assert_eq!(peers.len(), 2, "{peers:?}");
}

/// Accepts connections and answers each one's first request with `response`, then closes it
/// (after a `Connection: close` response, or silently, as a server ending an idle keep-alive
/// connection does). Returns the number of connections accepted so far.
async fn one_shot_server(ip: &str, response: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let mut line = String::new();
                // The request head (the proxy sends no body here).
                loop {
                    let n = s.read_line(&mut line).await.unwrap_or(0);
                    if n == 0 || line.ends_with("\r\n\r\n") {
                        break;
                    }
                }
                let _ = s.get_mut().write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_closing_its_idle_connection_gets_a_new_one() {
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["127.0.0.2"], &resolv, opts()).await;
    for response in [
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        "HTTP/1.0 200 OK\r\n\r\nok",
    ] {
        let (addr, accepted) = one_shot_server("127.0.0.2", response).await;
        let url = format!("http://{addr}/");
        for n in 1..=3 {
            let a = get(proxy.addr, &url).await;
            assert_eq!(
                (a.status.as_u16(), a.body.as_str()),
                (200, "ok"),
                "{response:?}"
            );
            assert_eq!(accepted.load(Ordering::SeqCst), n, "{response:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn hop_by_hop_fields_removed_and_via_added() {
    let origin = Origin::start("127.0.0.2").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["127.0.0.2"], &resolv, opts()).await;

    let url = origin.url("127.0.0.2", "/hop");
    let req = format!(
        "GET {url} HTTP/1.1\r\n\
         Host: wrong.example\r\n\
         Connection: close, X-Foo\r\n\
         X-Foo: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic eDp5\r\n\
         TE: trailers\r\n\
         Trailer: x-t\r\n\
         Upgrade: websocket\r\n\
         Via: 1.0 client-side\r\n\
         X-Keep: yes\r\n\r\n"
    );
    let res = raw(proxy.addr, req.as_bytes()).await;
    assert_eq!(status_of(&res), 200, "{res}");
    let head = res.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    for gone in [
        "x-bar:",
        "keep-alive:",
        "proxy-authenticate:",
        "proxy-connection:",
        "trailer:",
    ] {
        assert!(!head.contains(gone), "response still has {gone}\n{head}");
    }
    assert!(head.contains("x-keep-resp: yes"), "{head}");
    assert!(head.contains("via: 1.1 egress-router"), "{head}");

    let seen = &origin.seen()[0];
    for gone in [
        "x-foo",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "upstream got {gone}: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["x-keep"], "yes");
    let via: Vec<_> = seen.headers.get_all("via").iter().collect();
    assert_eq!(via, ["1.0 client-side", "1.1 egress-router"]);
    // Host comes from the request target, not from the client's Host header.
    assert_eq!(
        seen.headers["host"],
        format!("127.0.0.2:{}", origin.addr.port()).as_str()
    );
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_requests_and_oversized_headers_do_not_disturb_others() {
    let origin = Origin::start("127.0.0.2").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["*"], &resolv, opts()).await;

    // A kept-alive connection that must survive everything below.
    let mut held = client(proxy.addr).await;
    let a = send(
        &mut held,
        request(Method::GET, &origin.url("127.0.0.2", "/a"), empty()),
    )
    .await;
    assert_eq!(a.status, 200);

    let res = raw(
        proxy.addr,
        b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.2\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 400, "origin-form: {res}");
    assert!(res.contains("absolute URI"), "{res}");

    let res = raw(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 400, "asterisk-form: {res}");

    let res = raw(proxy.addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert_eq!(status_of(&res), 400, "garbage: {res}");

    let res = raw(
        proxy.addr,
        b"CONNECT 127.0.0.2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 400, "CONNECT without port: {res}");

    let big = "a".repeat(100 * 1024);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n",
        origin.url("127.0.0.2", "/")
    );
    let res = raw(proxy.addr, req.as_bytes()).await;
    assert_eq!(status_of(&res), 431, "{res}");

    let res = raw(
        proxy.addr,
        b"GET https://127.0.0.2/ HTTP/1.1\r\nHost: 127.0.0.2\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&res), 501, "{res}");

    let b = send(
        &mut held,
        request(Method::GET, &origin.url("127.0.0.2", "/b"), empty()),
    )
    .await;
    assert_eq!(b.status, 200, "the kept-alive connection still works");
    assert_eq!(origin.seen().len(), 2);
}

#[tokio::test]
async fn upstream_failures_are_502_and_504() {
    let dns = Dns::start(&[("exists.test", "127.0.0.2")]);
    // A port nobody listens on: refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        l.local_addr().unwrap()
    };
    // A listener whose accept queue is full: SYNs are dropped, connecting times out.
    let full = TcpSocket::new_v4().unwrap();
    full.bind("127.0.0.4:0".parse().unwrap()).unwrap();
    let full = full.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap();
    let _filler = TcpStream::connect(full_addr).await.unwrap();
    // A server that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.5:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });

    let proxy = Proxy::start(
        &["*"],
        &dns.resolv,
        HttpProxyOptions {
            connect_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(500),
            ..opts()
        },
    )
    .await;

    let a = get(proxy.addr, &format!("http://{closed}/")).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.body.starts_with(&format!("connecting to {closed}: ")),
        "{}",
        a.body
    );
    assert!(a.body.contains("refused"), "{}", a.body);

    let a = get(proxy.addr, "http://nope.test/").await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(a.body, "cannot resolve nope.test: no such name\n");

    let t = Instant::now();
    let a = get(proxy.addr, &format!("http://{full_addr}/")).await;
    assert_eq!(a.status, 504, "{}", a.body);
    assert_eq!(
        a.body,
        format!("connecting to {full_addr} timed out after 500ms\n")
    );
    assert!(t.elapsed() >= Duration::from_millis(450));

    let a = get(proxy.addr, &format!("http://{silent_addr}/")).await;
    assert_eq!(a.status, 504, "{}", a.body);
    assert_eq!(
        a.body,
        format!("upstream {silent_addr} sent no response within 500ms\n")
    );

    // The same failures through CONNECT.
    let (status, body, _) = connect(proxy.addr, &closed.to_string()).await;
    assert_eq!(status, 502, "{body}");
    let (status, body, _) = connect(proxy.addr, "nope.test:443").await;
    assert_eq!(
        (status, body.as_str()),
        (502, "cannot resolve nope.test: no such name\n")
    );
    let (status, body, _) = connect(proxy.addr, &full_addr.to_string()).await;
    assert_eq!(status, 504, "{body}");
}

/// A server on `ip` that answers each connection's request with `respond` (after reading the
/// request head).
async fn scripted_server<F, Fut>(ip: &str, respond: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let respond = respond.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                respond(r.into_inner()).await;
            });
        }
    });
    addr
}

/// An upstream that resets in the middle of a body: the client gets the bytes sent so far and
/// then the end of its connection (never a body that looks complete), within a bound; the
/// proxy goes on serving.
#[tokio::test]
async fn upstream_reset_in_the_middle_of_a_body_ends_the_client_connection() {
    let dns = Dns::start(&[]);
    let cut = scripted_server("127.0.0.12", |mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            .await;
        let _ = s.write_all(&[b'a'; 1000]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SO_LINGER 0: close sends a reset.
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    })
    .await;
    let good = Origin::start("127.0.0.13").await;
    let proxy = Proxy::start(&["*"], &dns.resolv, opts()).await;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("GET http://{cut}/ HTTP/1.1\r\nHost: {cut}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut got))
        .await
        .expect("the client connection ends");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    assert!(
        body < 100_000,
        "a truncated body must not arrive whole ({body} bytes, end {end:?})"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let a = get(proxy.addr, &good.url("127.0.0.13", "/")).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

/// An upstream that half-closes after its response (shutdown of its sending side, still
/// reading), and one whose body ends with its connection (no length): both arrive whole.
#[tokio::test]
async fn upstream_half_close_and_close_delimited_bodies_arrive_whole() {
    let dns = Dns::start(&[]);
    let half = scripted_server("127.0.0.14", |mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .await;
        let _ = s.shutdown().await;
        // Still reading: the proxy must not wait for more than the response.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let until_close = scripted_server("127.0.0.15", |mut s| async move {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
        for _ in 0..10 {
            let _ = s.write_all(&[b'z'; 1000]).await;
        }
        let _ = s.shutdown().await;
    })
    .await;
    let proxy = Proxy::start(&["*"], &dns.resolv, opts()).await;
    let a = get(proxy.addr, &format!("http://{half}/")).await;
    assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "hello"));
    let a = get(proxy.addr, &format!("http://{until_close}/")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 10_000, "the whole close-delimited body");
}

#[tokio::test]
async fn forwarding_loop_is_508() {
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(&["127.0.0.1"], &resolv, opts()).await;
    // The proxy allows its own address: the request comes back to it with its Via.
    let a = get(proxy.addr, &format!("http://{}/", proxy.addr)).await;
    assert_eq!(a.status, 508, "{}", a.body);
    assert!(a.body.starts_with("forwarding loop"), "{}", a.body);
}

// ---------------------------------------------------------------------------------------------
// Limits, timeouts, shutdown, logging
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connection_limit_holds_extra_clients_in_the_backlog() {
    let origin = Origin::start("127.0.0.2").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(
        &["*"],
        &resolv,
        HttpProxyOptions {
            max_connections: 1,
            ..opts()
        },
    )
    .await;
    let url = origin.url("127.0.0.2", "/");
    let mut first = client(proxy.addr).await;
    assert_eq!(
        send(&mut first, request(Method::GET, &url, empty()))
            .await
            .status,
        200
    );

    let second = tokio::spawn({
        let proxy = proxy.addr;
        let url = url.clone();
        async move { get(proxy, &url).await.status }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "served beyond the connection limit");
    drop(first);
    let status = tokio::time::timeout(TIMEOUT, second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn slow_request_headers_are_cut_off() {
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(
        &["*"],
        &resolv,
        HttpProxyOptions {
            header_timeout: Duration::from_millis(400),
            ..opts()
        },
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: 127.0.0.2\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("connection closed after the header timeout")
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let (echo, _t) = echo_server("127.0.0.3").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start(
        &["*"],
        &resolv,
        HttpProxyOptions {
            idle_timeout: Duration::from_millis(400),
            ..opts()
        },
    )
    .await;
    let (status, _, mut s) = connect(proxy.addr, &echo.to_string()).await;
    assert_eq!(status, 200);
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("idle tunnel closed")
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn shutdown_lets_running_requests_finish() {
    let origin = Origin::start("127.0.0.2").await;
    let (_d, resolv) = no_dns();
    let mut proxy = Proxy::start(&["*"], &resolv, opts()).await;
    let addr = proxy.addr;
    let url = origin.url("127.0.0.2", "/slow");
    // An idle kept-alive connection is closed at once.
    let idle = client(addr).await;
    let running = tokio::spawn(async move { get(addr, &url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
    let a = tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "slow done"));
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.done)
        .await
        .expect("serve returns once the running request is done")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut idle = idle;
        while idle.ready().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("idle connection closed");
}

#[tokio::test]
async fn shutdown_grace_is_bounded() {
    let (echo, _t) = echo_server("127.0.0.3").await;
    let (_d, resolv) = no_dns();
    let mut proxy = Proxy::start(
        &["*"],
        &resolv,
        HttpProxyOptions {
            shutdown_grace: Duration::from_millis(300),
            ..opts()
        },
    )
    .await;
    let (status, _, mut tunnel) = connect(proxy.addr, &echo.to_string()).await;
    assert_eq!(status, 200);
    let start = Instant::now();
    proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.done)
        .await
        .expect("serve returns after the grace period")
        .unwrap()
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(250));
    // The tunnel was closed.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest))
        .await
        .expect("tunnel closed")
        .unwrap();
}

/// Captures what tracing writes, for the current thread only.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn debug_logs_one_line_per_request() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let origin = Origin::start("127.0.0.2").await;
    let (_d, resolv) = no_dns();
    let proxy = Proxy::start_cfg(config(&["!127.0.0.3", "127.0.0.2"], true), &resolv, opts()).await;
    let url = origin.url("127.0.0.2", "/logged");
    let a = get(proxy.addr, &url).await;
    assert_eq!(a.status, 200);
    let denied = get(proxy.addr, "http://127.0.0.3:81/").await;
    assert_eq!(denied.status, 403);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<_> = text
        .lines()
        .filter(|l| l.contains("http-proxy request"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let ok = lines
        .iter()
        .find(|l| l.contains("/logged"))
        .expect("allowed request logged");
    for part in [
        "client=127.0.0.1:",
        "method=GET",
        &format!("request_target={url}"),
        "rule=rule 2 (line 2): 127.0.0.2",
        "status=200",
        &format!("bytes_down={}", a.body.len()),
        "duration_ms=",
    ] {
        assert!(ok.contains(part), "{part} missing in {ok}");
    }
    let no = lines.iter().find(|l| l.contains("status=403")).unwrap();
    assert!(no.contains("rule=rule 1 (line 1): !127.0.0.3"), "{no}");
}
