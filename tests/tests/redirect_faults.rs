//! The redirect dataplane under faults while traffic runs (legacy mode, the long-running
//! router, pinning on the harness's bpffs as a node's): restarts, by SIGTERM and SIGKILL, under
//! a running iperf3 and a running stream, and rules replaced (validly and invalidly) under
//! established connections. No connection may be lost; nothing may be half-applied.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use egress_tests::{
    DEST_IP, POD_IP, PinDir, Proc, Topology, router_bin, router_command, tcp_roundtrip,
};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(5);

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Lab {
    // Drop order: the pins after the namespaces' processes.
    topo: Topology,
    pins: PinDir,
}

impl Lab {
    fn new() -> Lab {
        let topo = Topology::new().expect("building the namespace topology");
        let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}bpf", topo.prefix())));
        Lab { topo, pins }
    }

    /// A legacy router for `destination`, its log in `log`.
    fn legacy(&self, destination: &str, log: &std::path::Path) -> Proc {
        let mut cmd = router_command("legacy");
        cmd.env("EGRESS_BPFFS_DIR", &self.pins.0)
            .env("EGRESS_DESTINATION", destination)
            .env("EGRESS_METRICS_ADDRESS", "off")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        self.topo.router.spawn(cmd).unwrap()
    }

    /// A legacy router for `destination`, returned once it says its dataplane runs (set up and
    /// attached, rules written).
    fn legacy_running(&self, destination: &str) -> Proc {
        let log = std::env::temp_dir().join(format!(
            "{}legacy-{}.log",
            self.topo.prefix(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let p = self.legacy(destination, &log);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("redirect dataplane running") {
                let _ = std::fs::remove_file(&log);
                return p;
            }
            assert!(p.is_running(), "the legacy router exited:\n{text}");
            assert!(
                Instant::now() < deadline,
                "the legacy router never ran:\n{text}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let mut cmd = Command::new(router_bin());
        cmd.args(["status", "--json", "--bpffs-dir"])
            .arg(&self.pins.0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = self.topo.router.spawn(cmd).ok()?.output(T).ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    fn client_tcp(&self, port: u16) -> std::io::Result<TcpStream> {
        self.topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((POD_IP, port)), T))
    }
}

/// An HTTP server on the destination's `port` whose every response is an endless body of 8-byte
/// big-endian counters, sent a little at a time until the client goes.
fn counter_stream_server(lab: &Lab, port: u16) {
    let l = lab
        .topo
        .dest
        .tcp_listen(SocketAddr::from((DEST_IP, port)))
        .unwrap();
    thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            thread::spawn(move || {
                // The request head, then a response whose body ends with the connection.
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read_exact(&mut b).is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                if c
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
                    .is_err()
                {
                    return;
                }
                let mut n = 0u64;
                loop {
                    let mut chunk = Vec::with_capacity(8 * 512);
                    for _ in 0..512 {
                        chunk.extend_from_slice(&n.to_be_bytes());
                        n += 1;
                    }
                    if c.write_all(&chunk).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(2));
                }
            });
        }
    });
}

/// Downloads the counter stream over HTTP through the router until `stop`, checking that every
/// counter follows the last: a lost, reset or corrupted connection fails. Returns the body bytes
/// read.
fn read_counters(
    mut c: TcpStream,
    stop: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
) -> Result<u64, String> {
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(format!("GET /counters HTTP/1.1\r\nHost: {DEST_IP}\r\n\r\n").as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b)
            .map_err(|e| format!("reading the response head: {e}"))?;
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!("response: {}", String::from_utf8_lossy(&head)));
    }
    let mut expect = 0u64;
    let mut buf = [0u8; 8];
    while !stop.load(Ordering::Relaxed) {
        c.read_exact(&mut buf)
            .map_err(|e| format!("the stream broke after {expect} counters: {e}"))?;
        let got = u64::from_be_bytes(buf);
        if got != expect {
            return Err(format!("counter {got} where {expect} was due"));
        }
        expect += 1;
        read.store(expect * 8, Ordering::Relaxed);
    }
    Ok(expect * 8)
}

/// Five restarts of the legacy router (SIGTERM and SIGKILL in turn, each followed by a new
/// router on the same pins) while iperf3 runs and an HTTP download of a counter stream flows:
/// iperf3 ends without an error, the download never breaks nor skips, and both carry data
/// after the last restart.
#[test]
fn five_restarts_under_iperf3_and_an_http_download_lose_no_connection() {
    let lab = Lab::new();
    let rules = format!("5201 tcp {DEST_IP}\n9100 tcp {DEST_IP}");
    counter_stream_server(&lab, 9100);
    let mut iperf_server = Command::new("iperf3");
    iperf_server.args(["-s", "-B", &DEST_IP.to_string(), "-p", "5201"]);
    let _iperf_server = lab.topo.dest.spawn(iperf_server).unwrap();
    let mut router = lab.legacy_running(&rules);

    let stop = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    let stream = lab.client_tcp(9100).unwrap();
    let reader = {
        let (stop, read) = (stop.clone(), read.clone());
        thread::spawn(move || read_counters(stream, stop, read))
    };
    // Wait for the iperf3 server to listen, then run the client for the whole test.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.client_tcp(5201).is_err() {
        assert!(Instant::now() < deadline, "iperf3 -s never listened");
        thread::sleep(Duration::from_millis(100));
    }
    let mut iperf = Command::new("iperf3");
    iperf.args([
        "-c",
        &POD_IP.to_string(),
        "-p",
        "5201",
        "-t",
        "24",
        "-b",
        "200M",
        "-J",
    ]);
    iperf
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let iperf = lab.topo.client.spawn(iperf).unwrap();

    for i in 0..5 {
        thread::sleep(Duration::from_secs(3));
        let sig = if i % 2 == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        router.signal(sig).unwrap();
        router
            .wait_timeout(T)
            .unwrap()
            .unwrap_or_else(|| panic!("restart {}: the router did not exit on {sig}", i + 1));
        router = lab.legacy_running(&rules);
        eprintln!(
            "restart {} ({sig}): {} bytes of the stream so far",
            i + 1,
            read.load(Ordering::Relaxed)
        );
    }
    let at_last_restart = read.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let total = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the stream: {e}"));
    assert!(
        total > at_last_restart,
        "the stream carried on after the last restart"
    );

    let out = iperf.output(Duration::from_secs(40)).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 -J: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        out.status.success() && report.get("error").is_none(),
        "iperf3 lost its connection: {}",
        report.get("error").unwrap_or(&report["end"])
    );
    let intervals = report["intervals"].as_array().unwrap();
    let last = &intervals[intervals.len() - 1]["sum"];
    assert!(
        last["bytes"].as_u64().unwrap_or(0) > 0,
        "iperf3 carried data to the end: {last}"
    );
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    eprintln!("iperf3: {sent} bytes in 24 s across 5 restarts; the stream: {total} bytes");
    router.signal(Signal::SIGTERM).unwrap();
}

/// Rules replaced under established connections: the new set takes effect whole (a removed
/// port is refused, an added one works, `status` lists exactly the new rules) and established
/// flows carry on, as under conntrack; an invalid replacement is refused and changes nothing.
#[test]
fn rules_replaced_under_traffic_take_effect_whole_and_invalid_ones_not_at_all() {
    let lab = Lab::new();
    let _echo = [80, 81, 82].map(|p| {
        lab.topo
            .dest
            .tcp_echo(SocketAddr::from((DEST_IP, p)))
            .unwrap()
    });
    let a = format!("80 tcp {DEST_IP}\n8080 tcp {DEST_IP} 81");
    let b = format!("80 tcp {DEST_IP}\n9090 tcp {DEST_IP} 82");
    let router = lab.legacy_running(&a);
    let mut c80 = lab.client_tcp(80).unwrap();
    let mut c8080 = lab.client_tcp(8080).unwrap();
    let roundtrip = |c: &mut TcpStream, what: &str| {
        c.set_read_timeout(Some(T)).unwrap();
        c.write_all(what.as_bytes()).unwrap();
        let mut back = vec![0u8; what.len()];
        c.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(back, what.as_bytes());
    };
    roundtrip(&mut c80, "80 before");
    roundtrip(&mut c8080, "8080 before");

    router.signal(Signal::SIGTERM).unwrap();
    router.wait_timeout(T).unwrap().expect("exits on SIGTERM");
    let router = lab.legacy_running(&b);
    let rules = |lab: &Lab| -> Vec<u64> {
        let s = lab.status().expect("status");
        let mut ports: Vec<u64> = s["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["local_port"].as_u64().unwrap_or(0))
            .collect();
        ports.sort_unstable();
        ports
    };
    assert_eq!(rules(&lab), [80, 9090], "exactly the new rules");
    roundtrip(&mut c80, "80 after");
    roundtrip(&mut c8080, "8080 established, after its rule went");
    assert!(
        lab.client_tcp(8080)
            .map_err(anyhow::Error::from)
            .and_then(|c| tcp_roundtrip(c, b"new", T))
            .is_err(),
        "a new connection to the removed port is not forwarded"
    );
    let c = lab.client_tcp(9090).expect("the added rule forwards");
    assert_eq!(tcp_roundtrip(c, b"9090", T).unwrap(), b"9090");

    // An invalid replacement: refused with the reason, the running rules untouched.
    router.signal(Signal::SIGTERM).unwrap();
    router.wait_timeout(T).unwrap().expect("exits on SIGTERM");
    let mut cmd = router_command("legacy");
    cmd.env("EGRESS_BPFFS_DIR", &lab.pins.0).env(
        "EGRESS_DESTINATION",
        format!("80 tcp {DEST_IP}\n7070 tcp 300.1.1.1"),
    );
    let out = lab
        .topo
        .router
        .spawn(cmd)
        .unwrap()
        .output(Duration::from_secs(20))
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an invalid configuration is refused: {err}"
    );
    assert!(err.contains("300.1.1.1"), "{err}");
    assert_eq!(
        rules(&lab),
        [80, 9090],
        "nothing of the invalid rules was applied"
    );
    roundtrip(&mut c80, "80 after the refusal");
    let c = lab.client_tcp(9090).unwrap();
    assert_eq!(tcp_roundtrip(c, b"9090 again", T).unwrap(), b"9090 again");
}

/// Addresses of the destination namespace besides DEST_IP: the fallbacks of the two rule sets
/// of [`rules_replaced_again_and_again_under_new_connections_each_land_on_one_set_whole`].
const DEST2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 26);
const DEST3: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 27);

/// What the probing clients open: (protocol, router port).
const PROBES: [(&str, u16); 4] = [("tcp", 80), ("tcp", 90), ("udp", 53), ("udp", 54)];

/// One EGRESS_DESTINATION of that test and where each of [`PROBES`] lands under it.
struct RuleSet {
    name: &'static str,
    text: String,
    rules: usize,
    lands: [SocketAddr; 4],
}

/// `filler` rules on ports from `base` (never probed: they make the set big, so that writing
/// it takes a while), then `probed` rules, then the fallback.
fn rule_set(
    name: &'static str,
    base: u16,
    filler: u16,
    probed: &[&str],
    fallback: Ipv4Addr,
    lands: [SocketAddr; 4],
) -> RuleSet {
    let mut lines: Vec<String> = (0..filler)
        .map(|i| format!("{} tcp {DEST_IP} 9", base + i))
        .collect();
    lines.extend(probed.iter().map(|l| l.to_string()));
    let rules = lines.len();
    lines.push(fallback.to_string());
    RuleSet {
        name,
        text: lines.join("\n"),
        rules,
        lands,
    }
}

/// A TCP server on `addr` that answers every connection with its own address and the peer's IP
/// ("203.0.113.25:81 192.168.12.99"), then closes; and a UDP one answering each datagram so.
fn identity_servers(lab: &Lab, addr: SocketAddr) {
    let l = lab.topo.dest.tcp_listen(addr).unwrap();
    thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let peer = c
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = c.write_all(format!("{addr} {peer}").as_bytes());
        }
    });
    let u = lab.topo.dest.udp_bind(addr).unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = u.recv_from(&mut buf) {
            let _ = u.send_to(format!("{addr} {}", peer.ip()).as_bytes(), peer);
        }
    });
}

/// One probe: a new TCP connection or a datagram to the pod IP's `port` from the client's
/// `local` port, which no other probe uses (a tuple reused while the flow of an earlier probe
/// lives would follow that flow, as under conntrack); what answered ("<server address> <the
/// source it saw>"). A lost datagram is sent again (from the same socket: the same flow). None:
/// the local port is taken.
fn probe(proto: &str, port: u16, local: u16) -> Option<Result<String, String>> {
    use socket2::{Domain, Socket, Type};
    let to = SocketAddr::from((POD_IP, port));
    let from = SocketAddr::from((Ipv4Addr::UNSPECIFIED, local));
    let mut answer = Vec::new();
    if proto == "tcp" {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&from.into()).ok()?;
        if let Err(e) = sock.connect_timeout(&to.into(), T) {
            return Some(Err(format!("connect: {e}")));
        }
        let mut c: TcpStream = sock.into();
        c.set_read_timeout(Some(T)).unwrap();
        if let Err(e) = c.read_to_end(&mut answer) {
            return Some(Err(format!("read: {e}")));
        }
    } else {
        let u = std::net::UdpSocket::bind(from).ok()?;
        u.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 64];
        let mut tries = 0;
        loop {
            if let Err(e) = u.send_to(b"who", to) {
                return Some(Err(format!("send: {e}")));
            }
            match u.recv_from(&mut buf) {
                Ok((n, _)) => {
                    answer.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(e) if tries < 4 => {
                    tries += 1;
                    eprintln!("udp {port}: no answer ({e}), sent again");
                }
                Err(e) => return Some(Err(format!("no answer after {tries} retries: {e}"))),
            }
        }
    }
    Some(Ok(String::from_utf8_lossy(&answer).into_owned()))
}

/// A probe's record: when it ran, which of [`PROBES`], and what answered.
struct Probed {
    started: Instant,
    ended: Instant,
    which: usize,
    answer: Result<String, String>,
}

/// Rules replaced again and again (a legacy router restarted with the other EGRESS_DESTINATION,
/// six times) while clients open new TCP connections and send UDP datagrams from new sockets
/// without a pause. The two sets differ in every probed port's outcome, rule and fallback, and
/// each is big (1,500 rules, the probed ones written last): every probe lands where one set
/// sends it, never where a mix would (one set's fallback with the other's rules, or where
/// neither set sends it), always from EGRESS_SOURCE; and once a router says it runs, every
/// probe lands on its set. Then two replacements that cannot be applied (more rules than the
/// dataplane takes, with the probed ones first; an invalid address) are refused and change
/// nothing while the probes go on.
#[test]
fn rules_replaced_again_and_again_under_new_connections_each_land_on_one_set_whole() {
    const FILLER: u16 = 1500;
    // A router may be collecting expired flows when SIGTERM comes (thousands here): on an
    // emulated CPU that takes more than T.
    const EXIT: Duration = Duration::from_secs(30);
    let lab = Lab::new();
    for ip in [DEST2, DEST3] {
        lab.topo
            .dest
            .add_addr(egress_tests::DEST_IF, Ipv4Net::new(ip, 24).unwrap())
            .unwrap();
    }
    for ip in [DEST_IP, DEST2, DEST3] {
        for port in [80, 81, 90, 91, 53, 54, 5301, 5401] {
            identity_servers(&lab, SocketAddr::from((ip, port)));
        }
    }
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    let a = rule_set(
        "A",
        20000,
        FILLER,
        &[
            &format!("80 tcp {DEST_IP} 81"),
            &format!("53 udp {DEST_IP} 5301"),
        ],
        DEST2,
        [
            at(DEST_IP, 81),
            at(DEST2, 90),
            at(DEST_IP, 5301),
            at(DEST2, 54),
        ],
    );
    let b = rule_set(
        "B",
        30000,
        FILLER,
        &[
            &format!("90 tcp {DEST_IP} 91"),
            &format!("54 udp {DEST_IP} 5401"),
        ],
        DEST3,
        [
            at(DEST3, 80),
            at(DEST_IP, 91),
            at(DEST3, 53),
            at(DEST_IP, 5401),
        ],
    );
    let sets = [&a, &b];
    // The rules in force, read as `status` reads them (`status` itself lists every flow too:
    // thousands here, slow on an emulated CPU).
    let rule_count = |lab: &Lab| -> usize {
        egress_router::dataplane::status::StatusMaps::pinned(&lab.pins.0)
            .and_then(|m| m.rules())
            .expect("reading the rules in force")
            .len()
    };

    let mut router = lab.legacy_running(&a.text);
    assert_eq!(rule_count(&lab), a.rules);
    // (replacement began, the new router runs, the set now in force)
    let mut phases: Vec<(Instant, Instant, usize)> = vec![(Instant::now(), Instant::now(), 0)];
    let stop = AtomicBool::new(false);
    let next_port = std::sync::atomic::AtomicU32::new(1024);
    let mut refusals_began = None;
    let records: Vec<Probed> = thread::scope(|s| {
        // The probes stop however this ends (a failed assertion too: the scope waits for them).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let (lab, stop, next_port) = (&lab, &stop, &next_port);
                s.spawn(move || {
                    lab.topo.client.run(|| {
                        let mut out = Vec::new();
                        let mut i = c;
                        while !stop.load(Ordering::Relaxed) {
                            let local = next_port.fetch_add(1, Ordering::Relaxed);
                            let Ok(local) = u16::try_from(local) else {
                                break; // every port used once
                            };
                            let which = i % PROBES.len();
                            let (proto, port) = PROBES[which];
                            let started = Instant::now();
                            let Some(answer) = probe(proto, port, local) else {
                                continue;
                            };
                            out.push(Probed {
                                started,
                                ended: Instant::now(),
                                which,
                                answer,
                            });
                            i += 1;
                            thread::sleep(Duration::from_millis(5));
                        }
                        out
                    })
                })
            })
            .collect();

        thread::sleep(Duration::from_secs(1));
        for round in 1..=8 {
            let next = round % 2;
            let began = Instant::now();
            router.signal(Signal::SIGTERM).unwrap();
            router
                .wait_timeout(EXIT)
                .unwrap()
                .expect("exits on SIGTERM");
            router = lab.legacy_running(&sets[next].text);
            phases.push((began, Instant::now(), next));
            eprintln!("replacement {round}: set {} in force", sets[next].name);
            assert_eq!(
                rule_count(&lab),
                sets[next].rules,
                "status: the set in force"
            );
            thread::sleep(Duration::from_millis(700));
        }
        let last = phases.last().unwrap().2;
        refusals_began = Some(Instant::now());

        // Replacements that cannot be applied, while the probes go on: the set in force stays.
        router.signal(Signal::SIGTERM).unwrap();
        router
            .wait_timeout(EXIT)
            .unwrap()
            .expect("exits on SIGTERM");
        let too_many = rule_set(
            "too many",
            40000,
            egress_common::RULES_MAX as u16,
            &[],
            DEST3,
            a.lands,
        );
        let probed_first = format!(
            "90 tcp {DEST3} 91\n80 tcp {DEST3} 81\n54 udp {DEST3} 5401\n53 udp {DEST3} 5301\n{}",
            too_many.text
        );
        let invalid = format!(
            "{}\n7070 tcp 300.1.1.1\n{DEST3}",
            b.text.lines().take(10).collect::<Vec<_>>().join("\n")
        );
        for (what, text, says) in [
            (
                "too many rules",
                probed_first,
                format!("at most {}", egress_common::RULES_MAX),
            ),
            ("an invalid address", invalid, "300.1.1.1".to_string()),
        ] {
            let mut cmd = router_command("legacy");
            cmd.env("EGRESS_BPFFS_DIR", &lab.pins.0)
                .env("EGRESS_METRICS_ADDRESS", "off")
                .env("EGRESS_DESTINATION", text);
            let out = lab
                .topo
                .router
                .spawn(cmd)
                .unwrap()
                .output(Duration::from_secs(30))
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what} is refused: {err}");
            assert!(err.contains(&says), "{what}: the reason is given: {err}");
            assert_eq!(
                rule_count(&lab),
                sets[last].rules,
                "{what}: nothing of it was applied"
            );
            thread::sleep(Duration::from_millis(700));
        }
        stop.store(true, Ordering::Relaxed);
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });

    // Every probe landed where one set sends it, from EGRESS_SOURCE; a probe made wholly
    // between a router's start and the next replacement landed where that router's set sends it.
    let mut problems = Vec::new();
    let mut landed = [0usize; 2];
    for r in &records {
        let (proto, port) = PROBES[r.which];
        let what = format!(
            "{proto} {port} at {:.2?}..{:.2?}",
            r.started.duration_since(phases[0].0),
            r.ended.duration_since(phases[0].0),
        );
        let answer = match &r.answer {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                continue;
            }
        };
        let Some((server, source)) = answer.split_once(' ') else {
            problems.push(format!("{what}: answered '{answer}'"));
            continue;
        };
        if source != egress_tests::EGRESS_SOURCE.to_string() {
            problems.push(format!("{what}: the destination saw {source}"));
        }
        let Some(set) = sets
            .iter()
            .position(|s| s.lands[r.which].to_string() == server)
        else {
            problems.push(format!(
                "{what}: landed on {server}, where neither set sends it (A: {}, B: {})",
                a.lands[r.which], b.lands[r.which]
            ));
            continue;
        };
        landed[set] += 1;
        // The phase the probe ran in wholly, if it did: after one router started, before the
        // next replacement began.
        let stable = phases.iter().enumerate().find(|(i, (_, ran, _))| {
            r.started >= *ran
                && phases
                    .get(i + 1)
                    .is_none_or(|(next, _, _)| r.ended <= *next)
        });
        if let Some((_, (_, _, in_force))) = stable
            && *in_force != set
        {
            problems.push(format!(
                "{what}: landed on set {}'s {server} while set {} was in force",
                sets[set].name, sets[*in_force].name
            ));
        }
    }
    let t0 = phases[0].0;
    for (began, ran, set) in &phases {
        eprintln!(
            "set {} from {:.2?} (replacement began at {:.2?})",
            sets[*set].name,
            ran.duration_since(t0),
            began.duration_since(t0)
        );
    }
    eprintln!(
        "{} probes: {} landed on set A, {} on set B; {} problems",
        records.len(),
        landed[0],
        landed[1],
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} of {} probes went wrong:\n{}",
        problems.len(),
        records.len(),
        problems[..problems.len().min(20)].join("\n")
    );
    assert!(
        landed[0] > 100 && landed[1] > 100,
        "probes ran under both sets: {landed:?}"
    );
    let refusals_began = refusals_began.unwrap();
    assert!(
        records
            .iter()
            .filter(|r| r.started > refusals_began)
            .count()
            > 100,
        "probes ran during the refused replacements"
    );
    router.signal(Signal::SIGTERM).ok();
}

/// A SYN flood from 20,000 source ports through 1,024-entry tables while an established
/// connection exchanges a message every 10 ms: new flows wait in their own table until a reply
/// answers them (the flood's are refused with resets), so the flood churns only that one and
/// never evicts the flow in use; the connection never stalls, and the tables stay within their
/// size. (In one LRU table, the kernel's approximate eviction took the established flow's
/// entries in about one run in seven.)
#[test]
fn a_syn_flood_through_a_small_table_does_not_evict_an_established_flow() {
    let lab = Lab::new();
    let _echo = lab
        .topo
        .dest
        .tcp_echo(SocketAddr::from((DEST_IP, 80)))
        .unwrap();
    // Port 81 has no listener: the destination answers the SYNs with resets.
    let rules = format!("80 tcp {DEST_IP}\n81 tcp {DEST_IP}");
    let log = std::env::temp_dir().join(format!("{}flood.log", lab.topo.prefix()));
    let mut cmd = router_command("init");
    cmd.env("EGRESS_BPFFS_DIR", &lab.pins.0)
        .env("EGRESS_DESTINATION", &rules)
        .args(["--conntrack-size", "1024"])
        .stderr(std::fs::File::create(&log).unwrap());
    let out = lab
        .topo
        .router
        .spawn(cmd)
        .unwrap()
        .output(Duration::from_secs(30))
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = std::fs::remove_file(&log);

    let mut c = lab.client_tcp(80).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let client = lab.topo.client.path();
        thread::spawn(move || {
            let ns = std::fs::File::open(client).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let to: socket2::SockAddr = SocketAddr::from((POD_IP, 81)).into();
            let mut sent = 0u32;
            for port in 20_000u16..40_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // A non-blocking connect sends one SYN; the socket is then dropped.
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.set_nonblocking(true).unwrap();
                // A port the established connection (or a socket just closed) holds is
                // skipped.
                if s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                    .is_err()
                {
                    continue;
                }
                let _ = s.connect(&to);
                sent += 1;
            }
            sent
        })
    };
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut exchanges = 0;
    while !flood.is_finished() || exchanges < 100 {
        let t = Instant::now();
        c.write_all(b"established").unwrap();
        let mut back = [0u8; 11];
        if let Err(e) = c.read_exact(&mut back) {
            stop.store(true, Ordering::Relaxed);
            panic!(
                "the established flow broke after {exchanges} exchanges: {e}; the dataplane: {}",
                lab.status()
                    .map_or("no status".to_string(), |s| s["counters"].to_string())
            );
        }
        assert_eq!(&back, b"established");
        slowest = slowest.max(t.elapsed());
        exchanges += 1;
        thread::sleep(Duration::from_millis(10));
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the flood did not end"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let status = lab.status().expect("status");
    let new_flows = status["counters"]["new_flows"].as_u64().unwrap();
    let restored = status["counters"]["flows_restored"].as_u64().unwrap();
    let flows = status["flows"].as_array().unwrap();
    let answered: Vec<_> = flows.iter().filter(|f| f["answered"] == true).collect();
    let entries = flows.len() - answered.len();
    eprintln!(
        "{sent} SYNs, {new_flows} new flows, {entries} entries in a 1,024-entry table of new \
         flows; {exchanges} exchanges on the established flow, the slowest {slowest:?}; \
         {restored} entries restored"
    );
    // The SYNs were refused (reset): only the established flow was ever answered.
    assert_eq!(answered.len(), 2, "{answered:?}");
    assert!(
        answered
            .iter()
            .all(|f| f["to"].as_str().unwrap().ends_with(":80")
                || f["from"].as_str().unwrap().ends_with(":80")),
        "{answered:?}"
    );
    assert_eq!(
        restored, 0,
        "the established flow was evicted (and restored)"
    );
    assert!(sent > 19_000, "the flood sent only {sent} SYNs");
    assert!(
        new_flows > 10_000,
        "the flood went through the dataplane: {new_flows}"
    );
    assert!(entries <= 1024, "{entries}");
    assert!(
        slowest < Duration::from_secs(1),
        "the established flow stalled: {slowest:?}"
    );
}
