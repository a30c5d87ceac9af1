//! `cargo xtask soak [--minutes N]`: the three modes under a steady mixed load for N minutes,
//! each on its own reference topology (SPEC section 7; loopback-free, namespaces only), with
//! the bench's servers and router environment:
//!
//! - redirect (legacy mode, the long-running process): a long-lived TCP echo connection, new
//!   TCP connections in a loop, UDP datagrams from a new source port each time;
//! - HTTP proxy (one process): keep-alive GETs on one connection, a GET per new connection, a
//!   long-lived CONNECT tunnel echoing;
//! - DNS proxy (one process): a long-lived echo connection and new connections in a loop.
//!
//! Every 10 s it samples each router's resident memory and open descriptors, and the redirect
//! dataplane's flow-table entries. It fails on any lost connection or failed request, and on a
//! leak: memory or descriptors still growing over the second half of the run beyond what noise
//! explains. The figures go to target/soak/SOAK.md (RELIABILITY.md quotes them).
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::{DEST_IP, EchoServer, Netns, POD_IP, Proc, Topology};

use crate::{
    bench::{
        self, BpffsDir, proxies,
        servers::{ECHO_PORT, HTTP_PORT, Servers},
        sys,
    },
    setup, util,
};

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const PROXY_PORT: u16 = 8080;

/// What the load of one mode did: operations that worked and failed, by kind.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, what: &str, r: Result<()>) {
        match r {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap();
                first.get_or_insert_with(|| format!("{what}: {e:#}"));
            }
        }
    }
}

/// One mode's router with its topology and servers, and the load running against it.
struct Lab {
    name: &'static str,
    // Drop order: load threads stop first (the flag), then the servers, bpffs, namespaces.
    router: Proc,
    _servers: (Servers, Option<EchoServer>),
    bpffs: Option<BpffsDir>,
    topo: Topology,
    tallies: Vec<(&'static str, Arc<Tally>)>,
    samples: Vec<Sample>,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    flows: Option<usize>,
}

pub fn run(minutes: u64) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask soak needs root: it creates network namespaces and loads eBPF programs");
    }
    setup::run()?;
    let bin = bench::router_bin(false)?;
    sys::raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("egress-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let length = Duration::from_secs(minutes * 60);
    println!(
        "== cargo xtask soak: {minutes} minute(s), all three modes at once; logs in {}",
        dir.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut labs = vec![
        redirect(&bin, &dir, &stop)?,
        http(&bin, &dir, &stop)?,
        dns(&bin, &dir, &stop)?,
    ];
    let started = Instant::now();
    let mut next = started;
    while started.elapsed() < length {
        for lab in &mut labs {
            if let Some(st) = lab.router.try_wait()? {
                stop.store(true, Ordering::Relaxed);
                bail!(
                    "the {} router exited ({st}) after {:?}",
                    lab.name,
                    started.elapsed()
                );
            }
            let s = sample(lab, started.elapsed())?;
            lab.samples.push(s);
        }
        print_progress(&labs, started.elapsed());
        next += SAMPLE_EVERY;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    stop.store(true, Ordering::Relaxed);
    // Let the load threads notice and finish their operation in flight.
    thread::sleep(Duration::from_secs(2));
    for lab in &mut labs {
        let s = sample(lab, started.elapsed())?;
        lab.samples.push(s);
    }
    let (mut report, problems) = report(&labs, minutes);
    // What the dataplane counted: drops by reason, flows made and restored after an eviction.
    if let Some(lab) = labs.iter().find(|l| l.bpffs.is_some())
        && let Ok(text) = scrape(&lab.topo.router)
    {
        report.push_str("\nThe redirect dataplane's counters at the end:\n\n```\n");
        for l in text.lines().filter(|l| {
            l.starts_with("egress_router_redirect_drops")
                || l.starts_with("egress_router_redirect_new_flows")
                || l.starts_with("egress_router_redirect_restored_flows")
                || l.starts_with("egress_router_redirect_flow_table_")
        }) {
            report.push_str(l);
            report.push('\n');
        }
        report.push_str("```\n");
    }
    let out = util::target_dir()?.join("soak");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("SOAK.md"), &report)?;
    println!("{report}");
    println!("   written to {}", out.join("SOAK.md").display());
    ensure!(
        problems.is_empty(),
        "the soak failed:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

fn sample(lab: &Lab, at: Duration) -> Result<Sample> {
    let pid = lab.router.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    // Scraped as Prometheus would, from the router's own metrics listener: the scrape is part
    // of the soak, and it reads the table's size without listing it.
    let metrics = scrape(&lab.topo.router).context("scraping /metrics")?;
    let flows = lab
        .bpffs
        .is_some()
        .then(|| sample_value(&metrics, "egress_router_redirect_flow_table_entries"))
        .flatten()
        .map(|v| v as usize);
    Ok(Sample {
        at,
        rss_kib: sys::tree_rss_kib(pid)?,
        fds,
        flows,
    })
}

/// GET /metrics on the router's metrics listener (port 9190 of the router namespace).
fn scrape(router: &Netns) -> Result<String> {
    router.run(|| {
        let mut c = connect(SocketAddr::from(([127, 0, 0, 1], 9190)))?;
        write!(
            c,
            "GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        ensure!(
            text.starts_with("HTTP/1.1 200"),
            "{}",
            text.lines().next().unwrap_or("")
        );
        Ok(text)
    })
}

fn sample_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn print_progress(labs: &[Lab], at: Duration) {
    let mut line = format!("  {:>5}s", at.as_secs());
    for lab in labs {
        let s = lab.samples.last().expect("sampled");
        let (ok, failed) = lab.tallies.iter().fold((0, 0), |(o, f), (_, t)| {
            (
                o + t.ok.load(Ordering::Relaxed),
                f + t.failed.load(Ordering::Relaxed),
            )
        });
        let _ = write!(
            line,
            " | {} {} KiB {} fds{} {ok} ok {failed} failed",
            lab.name,
            s.rss_kib,
            s.fds,
            s.flows.map_or(String::new(), |f| format!(" {f} flows"))
        );
    }
    println!("{line}");
}

// ---------------------------------------------------------------------------------------------
// The three labs

fn start_lab(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    mode: &str,
    env: &[(&str, String)],
    bpffs: bool,
    port: u16,
) -> Result<(Proc, Servers, Option<BpffsDir>, Topology)> {
    let topo = Topology::new().context("building the topology")?;
    bench::tune(&topo)?;
    let servers = Servers::start(&topo.dest, dir)?;
    let log = format!("{name}.log");
    let mut cmd = bench::router_command(bin, dir, mode, &log)?;
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let bpffs = bpffs.then(|| BpffsDir::new(&topo));
    if let Some(d) = &bpffs {
        cmd.env("EGRESS_BPFFS_DIR", &d.0);
    }
    let router = topo.router.spawn(cmd)?;
    bench::wait_listening(&topo.client, SocketAddr::from((POD_IP, port)), &router).with_context(
        || {
            format!(
                "the {name} router did not start (log: {})",
                dir.join(&log).display()
            )
        },
    )?;
    Ok((router, servers, bpffs, topo))
}

/// The UDP echo server of the redirect soak (the bench's UDP server only counts).
const UDP_ECHO_PORT: u16 = 7001;

fn redirect(bin: &Path, dir: &Path, stop: &Arc<AtomicBool>) -> Result<Lab> {
    let rules = format!(
        "{}{UDP_ECHO_PORT} udp {DEST_IP}\n",
        bench::redirect::destination()
    );
    let env = [("EGRESS_DESTINATION", rules)];
    let (router, servers, bpffs, topo) =
        start_lab("redirect", bin, dir, "legacy", &env, true, ECHO_PORT)?;
    let udp_echo = topo
        .dest
        .udp_echo(SocketAddr::from((DEST_IP, UDP_ECHO_PORT)))
        .context("the UDP echo server")?;
    let echo = SocketAddr::from((POD_IP, ECHO_PORT));
    let tallies = vec![
        (
            "long-lived TCP echo",
            spawn_loop(&topo.client, stop, long_lived_echo(echo)),
        ),
        (
            "new TCP connections",
            spawn_loop(&topo.client, stop, new_echo_connections(echo)),
        ),
        (
            "UDP from new source ports",
            spawn_loop(
                &topo.client,
                stop,
                udp_new_flows(SocketAddr::from((POD_IP, UDP_ECHO_PORT))),
            ),
        ),
    ];
    Ok(Lab {
        name: "redirect",
        router,
        _servers: (servers, Some(udp_echo)),
        bpffs,
        topo,
        tallies,
        samples: Vec::new(),
    })
}

fn http(bin: &Path, dir: &Path, stop: &Arc<AtomicBool>) -> Result<Lab> {
    let env = [
        (
            "EGRESS_HTTP_PROXY_DESTINATION",
            proxies::HTTP_RULES.to_string(),
        ),
        ("EGRESS_ONE_PROCESS", "true".to_string()),
    ];
    let (router, servers, bpffs, topo) = start_lab(
        "http-proxy",
        bin,
        dir,
        "http-proxy",
        &env,
        false,
        PROXY_PORT,
    )?;
    let proxy = SocketAddr::from((POD_IP, PROXY_PORT));
    let url = format!("http://{DEST_IP}:{HTTP_PORT}/");
    let tallies = vec![
        (
            "keep-alive GETs",
            spawn_loop(&topo.client, stop, keep_alive_gets(proxy, url.clone())),
        ),
        (
            "a GET per connection",
            spawn_loop(&topo.client, stop, gets_per_connection(proxy, url)),
        ),
        (
            "long-lived CONNECT tunnel",
            spawn_loop(
                &topo.client,
                stop,
                connect_tunnel(proxy, SocketAddr::from((DEST_IP, ECHO_PORT))),
            ),
        ),
    ];
    Ok(Lab {
        name: "http-proxy",
        router,
        _servers: (servers, None),
        bpffs,
        topo,
        tallies,
        samples: Vec::new(),
    })
}

fn dns(bin: &Path, dir: &Path, stop: &Arc<AtomicBool>) -> Result<Lab> {
    let env = [
        ("EGRESS_DNS_PROXY_DESTINATION", proxies::dns_rules()),
        ("EGRESS_ONE_PROCESS", "true".to_string()),
    ];
    let (router, servers, bpffs, topo) =
        start_lab("dns-proxy", bin, dir, "dns-proxy", &env, false, ECHO_PORT)?;
    let echo = SocketAddr::from((POD_IP, ECHO_PORT));
    let tallies = vec![
        (
            "long-lived echo",
            spawn_loop(&topo.client, stop, long_lived_echo(echo)),
        ),
        (
            "new connections",
            spawn_loop(&topo.client, stop, new_echo_connections(echo)),
        ),
    ];
    Ok(Lab {
        name: "dns-proxy",
        router,
        _servers: (servers, None),
        bpffs,
        topo,
        tallies,
        samples: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// The load: each a step run in a loop, in the client namespace, until the soak ends

type Step = Box<dyn FnMut() -> Result<()> + Send>;

/// Runs `make()`'s step in a thread of `ns` until `stop`, tallying each run.
fn spawn_loop(
    ns: &Netns,
    stop: &Arc<AtomicBool>,
    make: impl FnOnce() -> Step + Send + 'static,
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let (t, stop) = (tally.clone(), stop.clone());
    let fd = ns.fd().try_clone_to_owned().expect("the namespace's fd");
    thread::spawn(move || {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the namespace");
        let mut step = make();
        while !stop.load(Ordering::Relaxed) {
            t.record("step", step());
            thread::sleep(Duration::from_millis(5));
        }
    });
    tally
}

fn echo_once(c: &mut TcpStream, msg: &[u8]) -> Result<()> {
    c.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    ensure!(back == msg, "the echo differs");
    Ok(())
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let c = TcpStream::connect_timeout(&to, IO_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// One connection for the whole soak: a step is one round trip on it; once it fails, every
/// later step fails too (the connection was lost).
fn long_lived_echo(to: SocketAddr) -> impl FnOnce() -> Step + Send {
    move || {
        let mut c = connect(to);
        Box::new(move || match &mut c {
            Ok(s) => echo_once(s, b"soak-long-lived").context("the long-lived connection"),
            Err(e) => bail!("the long-lived connection never opened: {e:#}"),
        })
    }
}

fn new_echo_connections(to: SocketAddr) -> impl FnOnce() -> Step + Send {
    move || Box::new(move || echo_once(&mut connect(to)?, b"soak-new"))
}

fn udp_new_flows(to: SocketAddr) -> impl FnOnce() -> Step + Send {
    move || {
        Box::new(move || {
            // A new socket, so a new source port: a new flow every time.
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.send_to(b"soak-udp", to)?;
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf).context("no UDP reply")?;
            ensure!(&buf[..n] == b"soak-udp", "the UDP echo differs");
            Ok(())
        })
    }
}

fn http_get(c: &mut TcpStream, url: &str, close: bool) -> Result<()> {
    let conn = if close { "close" } else { "keep-alive" };
    write!(
        c,
        "GET {url} HTTP/1.1\r\nHost: {DEST_IP}\r\nConnection: {conn}\r\n\r\n"
    )?;
    let status = bench::load::read_http_response(c)?;
    ensure!(status == 200, "HTTP status {status}");
    Ok(())
}

fn keep_alive_gets(proxy: SocketAddr, url: String) -> impl FnOnce() -> Step + Send {
    move || {
        let mut c = connect(proxy);
        Box::new(move || match &mut c {
            Ok(s) => http_get(s, &url, false).context("the keep-alive connection"),
            Err(e) => bail!("the keep-alive connection never opened: {e:#}"),
        })
    }
}

fn gets_per_connection(proxy: SocketAddr, url: String) -> impl FnOnce() -> Step + Send {
    move || Box::new(move || http_get(&mut connect(proxy)?, &url, true))
}

fn connect_tunnel(proxy: SocketAddr, target: SocketAddr) -> impl FnOnce() -> Step + Send {
    move || {
        let open = || -> Result<TcpStream> {
            let mut c = connect(proxy)?;
            write!(c, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                c.read_exact(&mut b)?;
                head.push(b[0]);
            }
            ensure!(
                head.starts_with(b"HTTP/1.1 200"),
                "CONNECT: {}",
                String::from_utf8_lossy(&head)
            );
            Ok(c)
        };
        let mut c = open();
        Box::new(move || match &mut c {
            Ok(s) => echo_once(s, b"soak-tunnel").context("the long-lived tunnel"),
            Err(e) => bail!("the tunnel never opened: {e:#}"),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The verdict and the report

/// Memory may rise by this much over the second half of the run (allocator arenas settling,
/// buffers of the load in flight) before it counts as a leak.
const RSS_SLACK_KIB: u64 = 4096;
const FD_SLACK: usize = 16;

fn report(labs: &[Lab], minutes: u64) -> (String, Vec<String>) {
    let mut problems = Vec::new();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Soak of {}: `cargo xtask soak --minutes {minutes}`, {} x{} (load {}).\n",
        util::output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .unwrap_or_default()
            .trim(),
        sys::machine().1,
        sys::machine().2,
        sys::loadavg()
    );
    let _ = writeln!(
        md,
        "| mode | load | operations | failed | resident memory, KiB (start → half → end) | open descriptors (start → half → end) | flow-table entries (min–max) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for lab in labs {
        let first = lab.samples.first().copied();
        let half = lab.samples.get(lab.samples.len() / 2).copied();
        let last = lab.samples.last().copied();
        let (Some(first), Some(half), Some(last)) = (first, half, last) else {
            problems.push(format!("{}: no samples", lab.name));
            continue;
        };
        let flows = lab.samples.iter().filter_map(|s| s.flows);
        let flows = match (flows.clone().min(), flows.max()) {
            (Some(a), Some(b)) => format!("{a}–{b}"),
            _ => "—".to_string(),
        };
        for (i, (what, t)) in lab.tallies.iter().enumerate() {
            let (ok, failed) = (
                t.ok.load(Ordering::Relaxed),
                t.failed.load(Ordering::Relaxed),
            );
            let figures = if i == 0 {
                format!(
                    "{} → {} → {} | {} → {} → {} | {flows}",
                    first.rss_kib, half.rss_kib, last.rss_kib, first.fds, half.fds, last.fds
                )
            } else {
                "| |".to_string()
            };
            let name = if i == 0 { lab.name } else { "" };
            let _ = writeln!(md, "| {name} | {what} | {ok} | {failed} | {figures} |");
            if failed > 0 {
                let why = t.first_error.lock().unwrap().clone().unwrap_or_default();
                problems.push(format!(
                    "{} / {what}: {failed} failed; the first: {why}",
                    lab.name
                ));
            }
            if ok == 0 {
                problems.push(format!("{} / {what}: nothing succeeded", lab.name));
            }
        }
        if last.rss_kib > half.rss_kib + half.rss_kib / 10 + RSS_SLACK_KIB {
            problems.push(format!(
                "{}: resident memory grew from {} KiB at {:?} to {} KiB at {:?} (a leak?)",
                lab.name, half.rss_kib, half.at, last.rss_kib, last.at
            ));
        }
        if last.fds > half.fds + FD_SLACK {
            problems.push(format!(
                "{}: open descriptors grew from {} to {} over the second half (a leak?)",
                lab.name, half.fds, last.fds
            ));
        }
    }
    let _ = writeln!(
        md,
        "\nA leak fails the soak: resident memory up by more than 10 % + {RSS_SLACK_KIB} KiB, or descriptors by more than {FD_SLACK}, from half-time to the end. {}",
        if problems.is_empty() {
            "Verdict: passed.".to_string()
        } else {
            format!("Verdict: FAILED: {}", problems.join("; "))
        }
    );
    (md, problems)
}
