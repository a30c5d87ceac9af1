//! The proxy pods (SPEC section 9, as processes: the init container, then the unprivileged proxy
//! container) under faults and load: the open-files limit reached, slow clients (slowhttptest's
//! slowloris, slow POST and slow read), thousands of idle connections, the proxy threads
//! (`EGRESS_PROXY_THREADS`) sharing a connection limit and a port. Each test has a bound on
//! time, and a normal client must keep getting answers within a bound while the fault lasts.
//! Clients are in the client namespace, origins on the destination server.
//!
//! Needs root and slowhttptest (`cargo xtask setup`).
use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use egress_tests::{
    DEST_IP, EchoServer, POD_IP,
    pod::{Container, PodLab, Runtime},
};

/// The tests holding thousands of client sockets run one at a time: together they would pass
/// this process's open-files limit.
static MANY_SOCKETS: Mutex<()> = Mutex::new(());

/// Polls `f` every 50 ms until it holds; panics with `what` after `limit`.
fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP/1.1 origin on the destination server's `port`, answering every request (keep-alive)
/// with `body_len` bytes, after reading a body announced by Content-Length.
fn origin(lab: &PodLab, port: u16, body_len: usize) -> SocketAddr {
    let addr = SocketAddr::from((DEST_IP, port));
    let l = lab.topo.dest.tcp_listen(addr).unwrap();
    let body = Arc::new(vec![b'x'; body_len]);
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            let body = body.clone();
            thread::spawn(move || serve_http(c, &body));
        }
    });
    addr
}

fn serve_http(c: TcpStream, body: &[u8]) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    loop {
        let mut len = 0u64;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        if io::copy(&mut (&mut r).take(len), &mut io::sink()).is_err() {
            return;
        }
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        if w.write_all(head.as_bytes()).is_err() || w.write_all(body).is_err() {
            return;
        }
    }
}

/// The HTTP proxy pod with `*` and room for 10,100 clients at once (the default, 10,000, would
/// hold the 10,001st in the backlog); the proxy container's open-files limit at `nofile` if
/// given.
fn http_pod(nofile: Option<u64>) -> (PodLab, Container) {
    http_pod_with(nofile, &[("EGRESS_HTTP_MAX_CONNECTIONS", "10100")])
}

/// The HTTP proxy pod with `*` and `more` in the proxy container's environment.
fn http_pod_with(nofile: Option<u64>, more: &[(&str, &str)]) -> (PodLab, Container) {
    let lab = PodLab::new(Runtime::Processes);
    lab.init_container(&lab.router_env(&[("EGRESS_ROUTER_MODE", "http-proxy")]));
    let mut env = vec![("EGRESS_HTTP_PROXY_DESTINATION", "*")];
    env.extend_from_slice(more);
    let proxy = match nofile {
        Some(n) => lab.proxy_container_with_nofile(&env, 8080, n),
        None => lab.proxy_container(&env, 8080),
    };
    (lab, proxy)
}

/// The DNS proxy pod with its init container done, and an echo server on the destination's
/// port 7.
fn dns_pod() -> (PodLab, EchoServer) {
    let lab = PodLab::new(Runtime::Processes);
    let echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 7)))
        .unwrap();
    lab.init_container(&lab.router_env(&[("EGRESS_ROUTER_MODE", "dns-proxy")]));
    (lab, echo)
}

/// One GET through the proxy on a new connection from the client: its status line and how
/// long it took.
fn get_through(
    lab: &PodLab,
    origin: SocketAddr,
    timeout: Duration,
) -> io::Result<(String, Duration)> {
    let t0 = Instant::now();
    let mut c = lab.connect(8080)?;
    c.set_read_timeout(Some(timeout))?;
    write!(
        c,
        "GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut status = String::new();
    BufReader::new(&mut c).read_line(&mut status)?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)?;
    Ok((status.trim_end().to_string(), t0.elapsed()))
}

/// The value of the sample `name` (labels included, as exposed) on the pod's /metrics.
fn metric(lab: &PodLab, name: &str) -> Option<f64> {
    let mut c = lab.connect(9190).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: {POD_IP}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn rss_kib(c: &Container) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid().unwrap())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// `n` idle connections from the client to the router pod's `port`.
fn hold(lab: &PodLab, port: u16, n: usize) -> Vec<TcpStream> {
    lab.topo.client.run(|| {
        (0..n)
            .map(|i| {
                TcpStream::connect_timeout(
                    &SocketAddr::from((POD_IP, port)),
                    Duration::from_secs(10),
                )
                .unwrap_or_else(|e| panic!("connection {i} to {port}: {e}"))
            })
            .collect()
    })
}

/// At its open-files limit the proxy says so, once, with the limit and what to do; a client
/// arriving meanwhile waits in the backlog (neither answered nor refused) and is served as soon
/// as descriptors free up.
#[test]
fn http_proxy_at_its_open_files_limit_says_why_and_serves_again() {
    let (lab, proxy) = http_pod(Some(64));
    let origin = origin(&lab, 8000, 2);
    let held = hold(&lab, 8080, 100);
    let said = "HTTP proxy cannot accept: this process has all the files it may open (its \
                open-files limit, 64)";
    wait_until(Duration::from_secs(10), "the limit is logged", || {
        proxy.log().contains(said)
    });
    let mut waiting = lab.connect(8080).unwrap();
    write!(
        waiting,
        "GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let e = waiting
        .read(&mut [0u8; 1])
        .expect_err("answered while out of descriptors");
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    drop(held);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (status, _) = get_through(&lab, origin, Duration::from_secs(5)).unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        proxy.log().matches(said).count(),
        1,
        "logged once per 10 s, not once per failed accept:\n{}",
        proxy.log()
    );
    assert!(proxy.is_running(), "{}", proxy.log());
}

/// slowhttptest's three slow attacks through the proxy, 400 connections each for 8 s: while
/// each runs, every request of a normal client is answered within 2 s.
#[test]
fn slow_clients_do_not_keep_others_waiting() {
    let (lab, proxy) = http_pod(None);
    let origin = origin(&lab, 8000, 256 * 1024);
    let gauge = "egress_router_http_active_connections";
    for (attack, flags) in [
        ("slowloris", &["-H"][..]),
        ("slow POST", &["-B", "-s", "100000"][..]),
        (
            "slow read",
            &[
                "-X", "-k", "4", "-n", "1", "-w", "16", "-y", "64", "-z", "32",
            ][..],
        ),
    ] {
        let mut cmd = Command::new("slowhttptest");
        cmd.args(flags)
            .args(["-c", "400", "-r", "400", "-i", "1", "-l", "8", "-p", "2"])
            .args(["-u", &format!("http://{origin}/")])
            .args(["-d", &format!("{POD_IP}:8080")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let slow = lab
            .topo
            .client
            .spawn(cmd)
            .expect("slowhttptest (Debian package slowhttptest, `cargo xtask setup`)");
        wait_until(
            Duration::from_secs(6),
            &format!("{attack}: slowhttptest holds 200 connections on the proxy"),
            || metric(&lab, gauge).unwrap_or(0.0) >= 200.0,
        );
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let (status, took) = get_through(&lab, origin, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("{attack}: a normal request failed: {e}"));
            assert_eq!(status, "HTTP/1.1 200 OK", "{attack}");
            slowest = slowest.max(took);
            thread::sleep(Duration::from_millis(100));
        }
        let held = metric(&lab, gauge).unwrap_or(0.0);
        eprintln!("{attack}: {held} connections held, slowest normal request {slowest:?}");
        if slow
            .wait_timeout(Duration::from_secs(20))
            .unwrap()
            .is_none()
        {
            slow.kill().unwrap();
        }
        assert!(proxy.is_running(), "{attack}: {}", proxy.log());
    }
}

/// 10,000 idle client connections on the HTTP proxy: all accepted, a new client answered within
/// 2 s, and all let go once they close.
#[test]
fn http_proxy_holds_ten_thousand_idle_connections() {
    let _one = MANY_SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, proxy) = http_pod(None);
    let origin = origin(&lab, 8000, 2);
    let rss0 = rss_kib(&proxy);
    let held = hold(&lab, 8080, 10_000);
    let gauge = "egress_router_http_active_connections";
    wait_until(
        Duration::from_secs(30),
        "10,000 connections accepted",
        || metric(&lab, gauge) == Some(10_000.0),
    );
    let rss = rss_kib(&proxy);
    let (status, took) = get_through(&lab, origin, Duration::from_secs(2)).unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    eprintln!(
        "HTTP proxy, 10,000 idle connections: resident {rss0} KiB -> {rss} KiB ({} bytes each); a new request took {took:?}",
        (rss.saturating_sub(rss0)) * 1024 / 10_000
    );
    drop(held);
    wait_until(
        Duration::from_secs(30),
        "the connections are let go",
        || metric(&lab, gauge) == Some(0.0),
    );
    assert!(proxy.is_running(), "{}", proxy.log());
}

/// The DNS proxy with 9,000 idle connections, each also one to the destination: 18,000 sockets
/// in the proxy, under the 20,000 open files this machine's hard limit allows a process (no
/// CAP_SYS_RESOURCE to raise it). All forwarded, a new one echoed within 2 s, all let go after.
#[test]
fn dns_proxy_holds_nine_thousand_idle_connections() {
    let _one = MANY_SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 9_000;
    let lab = PodLab::new(Runtime::Processes);
    // The echo server is a process of its own: with the clients here, this one would pass its
    // open-files limit.
    let mut echo = Command::new("python3");
    echo.args([
        "-c",
        "import asyncio\n\
         async def echo(r, w):\n    \
             while data := await r.read(65536):\n        w.write(data); await w.drain()\n    \
             w.close()\n\
         async def main():\n    \
             s = await asyncio.start_server(echo, '0.0.0.0', 7000, backlog=4096)\n    \
             await s.serve_forever()\n\
         asyncio.run(main())",
    ]);
    let _echo = lab.topo.dest.spawn(echo).unwrap();
    lab.init_container(&lab.router_env(&[("EGRESS_ROUTER_MODE", "dns-proxy")]));
    let rules = format!("9000 {DEST_IP} 7000");
    let proxy = lab.proxy_container(&[("EGRESS_DNS_PROXY_DESTINATION", &rules)], 9000);
    let rss0 = rss_kib(&proxy);
    let held = hold(&lab, 9000, N);
    let gauge = "egress_router_dns_active_connections{line=\"1\"}";
    wait_until(
        Duration::from_secs(60),
        "9,000 connections forwarded",
        || metric(&lab, gauge) == Some(N as f64),
    );
    let rss = rss_kib(&proxy);
    let t0 = Instant::now();
    let mut c = lab.connect(9000).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    eprintln!(
        "DNS proxy, {N} idle connections: resident {rss0} KiB -> {rss} KiB ({} bytes each); a new one echoed in {:?}",
        (rss.saturating_sub(rss0)) * 1024 / N as u64,
        t0.elapsed()
    );
    drop((held, c));
    wait_until(
        Duration::from_secs(30),
        "the connections are let go",
        || metric(&lab, gauge) == Some(0.0),
    );
    assert!(proxy.is_running(), "{}", proxy.log());
}

/// The DNS proxy at an open-files limit of 64 (each forwarded connection holds two): it says
/// so once, and a client arriving meanwhile is forwarded once descriptors free up. (Before,
/// accepted clients took the descriptors their upstreams needed: one was reset now and then,
/// or all waited out their connect timeouts.)
#[test]
fn dns_proxy_at_its_open_files_limit_says_why_and_serves_again() {
    let (lab, _echo) = dns_pod();
    let rules = format!("9000 {DEST_IP} 7");
    let proxy =
        lab.proxy_container_with_nofile(&[("EGRESS_DNS_PROXY_DESTINATION", &rules)], 9000, 64);
    let held = hold(&lab, 9000, 60);
    let said = "DNS proxy cannot accept: this process has all the files it may open (its \
                open-files limit, 64)";
    wait_until(Duration::from_secs(10), "the limit is logged", || {
        proxy.log().contains(said)
    });
    let mut waiting = lab.connect(9000).unwrap();
    waiting.write_all(b"waiting").unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let e = waiting
        .read(&mut [0u8; 1])
        .expect_err("forwarded while out of descriptors");
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    drop(held);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut back = [0u8; 7];
    waiting.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"waiting");
    assert_eq!(proxy.log().matches(said).count(), 1, "{}", proxy.log());
    // Only as many clients are accepted as have room for their upstream sockets too: none is
    // reset for the want of one, none waits for one until its connect timeout.
    assert!(
        !proxy.log().contains("cannot connect to the destination"),
        "{}",
        proxy.log()
    );
    assert!(proxy.is_running(), "{}", proxy.log());
}

/// A request flood (wrk, 200 connections, keep-alive, as fast as it can) and a header flood
/// (clients sending 100 KB header sections, each answered 431) through the HTTP proxy: a normal
/// client's requests are each answered within 2 s meanwhile.
#[test]
fn request_and_header_floods_do_not_keep_others_waiting() {
    let (lab, proxy) = http_pod(None);
    let origin = origin(&lab, 8000, 128);
    // wrk sends origin-form requests to the host it connects to; through the proxy they must be
    // absolute: a Lua script sets the path to the whole URL and connects to the proxy.
    let script = lab.dir.join("flood.lua");
    std::fs::write(
        &script,
        format!("wrk.path = \"http://{origin}/\"\nwrk.headers[\"Host\"] = \"{origin}\"\n"),
    )
    .unwrap();
    let mut wrk = Command::new("wrk");
    wrk.args(["-t", "2", "-c", "200", "-d", "8s", "-s"])
        .arg(&script)
        .arg(format!("http://{POD_IP}:8080/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let flood = lab.topo.client.spawn(wrk).expect("wrk (cargo xtask setup)");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let headers = {
        let stop = stop.clone();
        let client = lab.topo.client.path();
        thread::spawn(move || {
            let ns = std::fs::File::open(client).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let big = format!("X-Flood: {}\r\n", "a".repeat(1000)).repeat(100);
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut c) = TcpStream::connect((POD_IP, 8080)) else {
                    continue;
                };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(
                    c,
                    "GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n{big}\r\n"
                );
                let mut status = String::new();
                if BufReader::new(&mut c).read_line(&mut status).is_ok()
                    && status.starts_with("HTTP/1.1 431")
                {
                    answered += 1;
                }
            }
            answered
        })
    };
    thread::sleep(Duration::from_secs(1));
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let (status, took) = get_through(&lab, origin, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a normal request during the floods failed: {e}"));
        assert_eq!(status, "HTTP/1.1 200 OK");
        slowest = slowest.max(took);
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rejected = headers.join().unwrap();
    let out = flood.output(Duration::from_secs(30)).unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let requests = report
        .lines()
        .find(|l| l.contains("requests in"))
        .unwrap_or("")
        .trim()
        .to_string();
    eprintln!(
        "floods: wrk {requests}; {rejected} header floods answered 431; slowest normal request {slowest:?}"
    );
    assert!(rejected > 0, "the header flood was never answered 431");
    assert!(!requests.is_empty(), "wrk ran: {report}");
    assert!(proxy.is_running(), "{}", proxy.log());
}

/// The proxy's threads (SPEC: one per CPU, `EGRESS_PROXY_THREADS`): the main thread (worker 0)
/// and the `proxy-N` ones, as (name, tid).
fn proxy_threads(c: &Container) -> Vec<(String, u32)> {
    let pid = c.pid().unwrap();
    let mut threads: Vec<(String, u32)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let name = name.trim().to_string();
            (tid == pid || name.starts_with("proxy-")).then_some((name, tid))
        })
        .collect();
    threads.sort();
    threads
}

/// How many times each of the proxy's threads has run on a CPU (the third field of
/// /proc/<pid>/task/<tid>/schedstat): a thread that serves connections wakes for each.
fn runs(c: &Container) -> Vec<(String, u64)> {
    let pid = c.pid().unwrap();
    proxy_threads(c)
        .into_iter()
        .map(|(name, tid)| {
            let stat =
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).unwrap();
            let n = stat.split_whitespace().nth(2).unwrap().parse().unwrap();
            (name, n)
        })
        .collect()
}

/// Asserts that each of `before`'s threads ran at least `min` more times in `after`.
fn every_thread_served(before: &[(String, u64)], after: &[(String, u64)], min: u64, log: &str) {
    assert_eq!(before.len(), after.len(), "threads came or went: {log}");
    for ((name, b), (_, a)) in before.iter().zip(after) {
        assert!(
            a - b >= min,
            "thread {name} ran {} times while serving (before {b}, after {a}): the kernel \
             spreads connections over every thread's listener",
            a - b
        );
    }
}

/// With `EGRESS_PROXY_THREADS=4` the HTTP proxy has four threads, each with its own listener on
/// port 8080, and all four serve: 200 connections of one request each, spread by the kernel.
#[test]
fn http_proxy_serves_on_every_thread() {
    let (lab, proxy) = http_pod_with(None, &[("EGRESS_PROXY_THREADS", "4")]);
    let origin = origin(&lab, 8000, 128);
    let names: Vec<String> = proxy_threads(&proxy).into_iter().map(|t| t.0).collect();
    assert_eq!(
        names,
        ["egress-router", "proxy-1", "proxy-2", "proxy-3"],
        "{}",
        proxy.log()
    );
    assert!(
        proxy.log().contains("threads=4"),
        "the start says how many threads: {}",
        proxy.log()
    );
    let before = runs(&proxy);
    for i in 0..200 {
        let (status, _) = get_through(&lab, origin, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(status, "HTTP/1.1 200 OK", "request {i}");
    }
    every_thread_served(&before, &runs(&proxy), 10, &proxy.log());
}

/// The same for the DNS proxy, with two lines: every thread accepts on every line's port.
#[test]
fn dns_proxy_serves_on_every_thread() {
    let (lab, _echo) = dns_pod();
    let rules = format!("9000 {DEST_IP} 7\n9001 {DEST_IP} 7");
    let proxy = lab.proxy_container(
        &[
            ("EGRESS_DNS_PROXY_DESTINATION", &rules),
            ("EGRESS_PROXY_THREADS", "3"),
        ],
        9001,
    );
    assert_eq!(proxy_threads(&proxy).len(), 3, "{}", proxy.log());
    let before = runs(&proxy);
    for port in [9000, 9001] {
        for i in 0..150 {
            let mut c = lab.connect(port).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b)
                .unwrap_or_else(|e| panic!("port {port}, connection {i}: {e}"));
            assert_eq!(&b, b"ping");
        }
    }
    every_thread_served(&before, &runs(&proxy), 10, &proxy.log());
}

/// A connection limit is the proxy's, not a thread's: at `EGRESS_HTTP_MAX_CONNECTIONS=1` with
/// two threads, clients waiting on either thread's listener are served in turn as the place
/// frees. (A thread that took the free place before a connection came would keep it from a
/// connection waiting on the other thread's listener: accepted first, admitted then.)
#[test]
fn a_connection_limit_shared_by_the_threads_serves_every_waiting_client() {
    let (lab, proxy) = http_pod_with(
        None,
        &[
            ("EGRESS_PROXY_THREADS", "2"),
            ("EGRESS_HTTP_MAX_CONNECTIONS", "1"),
        ],
    );
    let origin = origin(&lab, 8000, 128);
    // The one place, held by a kept-alive connection that has made a request.
    let mut first = lab.connect(8080).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        first,
        "GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n\r\n"
    )
    .unwrap();
    let mut status = String::new();
    BufReader::new(&mut first).read_line(&mut status).unwrap();
    assert_eq!(status.trim_end(), "HTTP/1.1 200 OK");
    let lab = Arc::new(lab);
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let lab = lab.clone();
            thread::spawn(move || get_through(&lab, origin, Duration::from_secs(20)))
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "a client was served beyond the limit"
    );
    drop(first);
    for (i, w) in waiting.into_iter().enumerate() {
        let (status, _) = w
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("waiting client {i} was not served: {e}"));
        assert_eq!(status, "HTTP/1.1 200 OK", "waiting client {i}");
    }
    assert!(proxy.is_running(), "{}", proxy.log());
}

/// SO_REUSEPORT lets sockets of the same user share a port, so a second proxy in the same pod
/// (same network namespace, same user) could silently take part of the first one's
/// connections. It is refused as a second proxy on one listener would be, and the first keeps
/// every connection.
#[test]
fn a_second_proxy_on_the_same_port_is_refused() {
    let (lab, proxy) = http_pod_with(None, &[("EGRESS_PROXY_THREADS", "2")]);
    let origin = origin(&lab, 8000, 128);
    let second = lab.start_proxy_container(&[
        ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
        ("EGRESS_PROXY_THREADS", "2"),
        ("EGRESS_METRICS_ADDRESS", "0.0.0.0:9191"),
    ]);
    let code = second.wait(Duration::from_secs(20)).unwrap();
    let log = second.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("listening on 0.0.0.0:8080 for the HTTP proxy")
            && log.contains("Address already in use"),
        "{log}"
    );
    for i in 0..50 {
        let (status, _) = get_through(&lab, origin, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(status, "HTTP/1.1 200 OK", "request {i}");
    }
    assert!(proxy.is_running(), "{}", proxy.log());
}
