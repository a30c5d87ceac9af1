//! Load generators run from the client namespace: connection loops, ping-pong latency, idle
//! connections, CONNECT streams (Rust, here), and wrappers around iperf3, wrk and trafgen.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::Netns;

use super::{
    servers::{SPIN_MARK, find},
    sys,
};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// New TCP connections per second: `threads` loops of connect, one byte each way, close
/// (the client closes first), for `dur`.
pub fn tcp_crr(client: &Netns, addr: SocketAddr, threads: usize, dur: Duration) -> Result<f64> {
    let (ok, elapsed) = tcp_crr_count(client, addr, threads, dur)?;
    Ok(ok as f64 / elapsed.as_secs_f64())
}

/// [`tcp_crr`]'s connections made and the time they took.
pub fn tcp_crr_count(
    client: &Netns,
    addr: SocketAddr,
    threads: usize,
    dur: Duration,
) -> Result<(u64, Duration)> {
    let results = client.run(|| {
        let start = Barrier::new(threads + 1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let deadline = Instant::now() + dur;
                        let (mut ok, mut failed, mut first_err) = (0u64, 0u64, None);
                        while Instant::now() < deadline {
                            match one_crr(addr) {
                                Ok(()) => ok += 1,
                                Err(e) => {
                                    failed += 1;
                                    first_err.get_or_insert(e);
                                }
                            }
                        }
                        (ok, failed, first_err)
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            let r: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            (r, t0.elapsed())
        })
    });
    let (per_thread, elapsed) = results;
    let ok: u64 = per_thread.iter().map(|r| r.0).sum();
    let failed: u64 = per_thread.iter().map(|r| r.1).sum();
    if failed * 100 > ok {
        let e = per_thread.into_iter().find_map(|r| r.2).unwrap();
        bail!(
            "{failed} of {} connections to {addr} failed: {e:#}",
            ok + failed
        );
    }
    Ok((ok, elapsed))
}

fn one_crr(addr: SocketAddr) -> Result<()> {
    let mut c = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.write_all(&[1])?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b).context("reading the echo")?;
    Ok(())
}

/// Round-trip times of `size`-byte ping-pongs on one connection for `dur`: (p50, p99) in µs.
///
/// With `spin` (and two or more CPUs) both ends busy-poll (non-blocking reads in a loop; the
/// echo server gives such a connection a thread of its own), so that the figure is the kernel
/// path's latency and not a virtual CPU's wake-up from idle. Only for paths without a process
/// in between: two spinning ends would take both CPUs from a proxy.
pub fn tcp_rr(
    client: &Netns,
    addr: SocketAddr,
    size: usize,
    dur: Duration,
    spin: bool,
) -> Result<(f64, f64)> {
    let mut c = client.tcp_connect(addr, IO_TIMEOUT)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    let spin = spin && sys::online_cpus() >= 2;
    let msg = vec![if spin { SPIN_MARK } else { 7u8 }; size];
    let mut back = vec![0u8; size];
    // Warm up the path (ARP, flow entries, TCP window) before recording.
    c.write_all(&msg)?;
    c.read_exact(&mut back)?;
    c.set_nonblocking(spin)?;
    let mut roundtrip = |c: &mut TcpStream| -> Result<()> {
        c.write_all(&msg)?;
        if !spin {
            return Ok(c.read_exact(&mut back)?);
        }
        let (mut got, t) = (0, Instant::now());
        while got < size {
            match c.read(&mut back[got..]) {
                Ok(0) => bail!("the echo server closed the connection"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(t.elapsed() < IO_TIMEOUT, "no echo within {IO_TIMEOUT:?}");
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    };
    for _ in 0..100 {
        roundtrip(&mut c)?;
    }
    let mut rtts: Vec<u32> = Vec::with_capacity(1 << 20);
    let deadline = Instant::now() + dur;
    while Instant::now() < deadline {
        let t = Instant::now();
        roundtrip(&mut c).context("ping-pong")?;
        rtts.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    ensure!(!rtts.is_empty(), "no round trip completed");
    rtts.sort_unstable();
    Ok((
        percentile(&rtts, 0.50) / 1000.0,
        percentile(&rtts, 0.99) / 1000.0,
    ))
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i] as f64
}

/// What an idle connection does once before going idle.
pub enum Warm<'a> {
    /// One byte each way (through a TCP forwarder to the echo server).
    Echo,
    /// One keep-alive HTTP request through a forward proxy, for this absolute URL.
    Http { url: &'a str, host: &'a str },
}

/// Opens `n` connections to `addr` from the client namespace, uses each once, and returns them
/// open and idle.
pub fn idle_connections(
    client: &Netns,
    addr: SocketAddr,
    n: usize,
    warm: &Warm,
) -> Result<Vec<TcpStream>> {
    client.run(|| {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let mut c = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .with_context(|| format!("idle connection {i} to {addr}"))?;
            c.set_read_timeout(Some(IO_TIMEOUT))?;
            match warm {
                Warm::Echo => {
                    c.write_all(&[1])?;
                    c.read_exact(&mut [0u8; 1])
                        .with_context(|| format!("echo on idle connection {i}"))?;
                }
                Warm::Http { url, host } => {
                    write!(c, "GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
                    let status = read_http_response(&mut c)
                        .with_context(|| format!("request on idle connection {i}"))?;
                    ensure!(status == 200, "idle connection {i}: HTTP status {status}");
                }
            }
            conns.push(c);
        }
        Ok(conns)
    })
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns its status.
pub(crate) fn read_http_response(c: &mut TcpStream) -> Result<u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(e) = find(&buf, b"\r\n\r\n") {
            break e;
        }
        let n = c.read(&mut chunk)?;
        ensure!(n > 0, "connection closed before the response headers");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - end - 4;
    while have < len {
        let n = c.read(&mut chunk)?;
        ensure!(n > 0, "connection closed in the response body");
        have += n;
    }
    Ok(status)
}

/// CONNECT throughput: one tunnel through `proxy` to `target`, written to as fast as possible;
/// the bytes the destination's sink counted per second, as Gbit/s.
pub fn connect_stream(
    client: &Netns,
    proxy: SocketAddr,
    target: SocketAddr,
    warmup: Duration,
    dur: Duration,
    sink_bytes: impl Fn() -> u64,
) -> Result<f64> {
    let mut c = client.tcp_connect(proxy, IO_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(c, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(e) = find(&buf, b"\r\n\r\n") {
            break e;
        }
        let n = c.read(&mut chunk)?;
        ensure!(n > 0, "proxy closed the CONNECT request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    ensure!(
        head.split_whitespace().nth(1) == Some("200"),
        "CONNECT {target} refused: {head:?}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let mut c = c.try_clone()?;
        std::thread::spawn(move || {
            let data = vec![0x5au8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                if c.write_all(&data).is_err() {
                    break;
                }
            }
            let _ = c.shutdown(Shutdown::Write);
        })
    };
    std::thread::sleep(warmup);
    let (b0, t0) = (sink_bytes(), Instant::now());
    std::thread::sleep(dur);
    let (b1, t1) = (sink_bytes(), Instant::now());
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    drop(c);
    ensure!(b1 > b0, "no bytes reached the sink through the tunnel");
    Ok((b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64() / 1e9)
}

/// iperf3, one TCP stream from the client namespace to `addr`, `secs` measured after `omit`
/// seconds of warm-up: received Gbit/s.
pub fn iperf3(client: &Netns, addr: SocketAddr, secs: u32, omit: u32) -> Result<f64> {
    let v = iperf3_json(client, addr, secs, omit)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("no end.sum_received in iperf3 output: {v}"))
}

/// Bytes one iperf3 stream of `secs` (no warm-up left out) delivered.
pub fn iperf3_bytes(client: &Netns, addr: SocketAddr, secs: u32) -> Result<u64> {
    let v = iperf3_json(client, addr, secs, 0)?;
    v["end"]["sum_received"]["bytes"]
        .as_u64()
        .with_context(|| format!("no end.sum_received.bytes in iperf3 output: {v}"))
}

fn iperf3_json(
    client: &Netns,
    addr: SocketAddr,
    secs: u32,
    omit: u32,
) -> Result<serde_json::Value> {
    let run = || -> Result<serde_json::Value> {
        let mut cmd = Command::new("iperf3");
        cmd.args([
            "-J",
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
        ])
        .args(["-t", &secs.to_string(), "-O", &omit.to_string()]);
        let out = sys::ns_output(client, cmd, Duration::from_secs((secs + omit + 30).into()))?;
        serde_json::from_str(&out).context("iperf3 JSON")
    };
    // The server may still be finishing the previous test: one retry.
    run().or_else(|_| {
        std::thread::sleep(Duration::from_millis(500));
        run()
    })
}

pub struct HttpLoad {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// wrk through the forward proxy at `proxy`: absolute-form GETs of `url`, `conns` connections,
/// with or without keep-alive.
#[expect(clippy::too_many_arguments, reason = "each is one of wrk's settings")]
pub fn wrk(
    client: &Netns,
    dir: &Path,
    proxy: SocketAddr,
    url: &str,
    host: &str,
    keepalive: bool,
    conns: usize,
    dur: Duration,
) -> Result<HttpLoad> {
    let script = dir.join(if keepalive {
        "wrk-keepalive.lua"
    } else {
        "wrk-close.lua"
    });
    let close = if keepalive {
        ""
    } else {
        "wrk.headers[\"Connection\"] = \"close\"\n"
    };
    std::fs::write(
        &script,
        format!(
            r#"wrk.method = "GET"
wrk.path = "{url}"
wrk.headers["Host"] = "{host}"
{close}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d sockerr=%d status=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50.0), latency:percentile(99.0)))
end
"#
        ),
    )?;
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", "1", "-c", &conns.to_string()])
        .args(["-d", &format!("{}s", dur.as_secs().max(1))])
        .args(["--timeout", "5s", "-s"])
        .arg(&script)
        .arg(format!("http://{proxy}/"));
    let out = sys::ns_output(client, cmd, dur + Duration::from_secs(30))?;
    let line = out
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .with_context(|| format!("no result line in wrk output:\n{out}"))?;
    let field = |k: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {k} in {line}"))
    };
    let (requests, secs) = (field("requests")?, field("duration_us")? / 1e6);
    let (sockerr, status) = (field("sockerr")?, field("status")?);
    ensure!(requests > 0.0, "wrk completed no request: {out}");
    ensure!(
        status == 0.0,
        "wrk got {status} non-2xx/3xx responses of {requests}: the proxy refused requests"
    );
    // A few resets at the end of a run are normal with Connection: close; many are not.
    ensure!(
        sockerr <= requests / 100.0,
        "wrk: {sockerr} socket errors for {requests} requests:\n{out}"
    );
    Ok(HttpLoad {
        rps: requests / secs,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}

/// A UDP flood from the client namespace: prebuilt Ethernet frames written to AF_PACKET sockets
/// on `dev` in batches with sendmmsg(2), bypassing the qdisc, by one thread pinned to each of
/// the given CPUs. Blocking, with a forced 16 MiB send buffer: frames waiting in the receiving
/// CPU's backlog throttle it instead of failing it; frames the backlog drops are counted as
/// offered.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    handles: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Flood {
    pub fn start(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>, cpus: &[usize]) -> Result<Flood> {
        let ifindex = ns.ifindex(dev)?;
        let frames = Arc::new(frames);
        let mut flood = Flood {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            handles: Vec::new(),
        };
        for &cpu in cpus {
            let fd = ns.fd().try_clone_to_owned()?;
            let (s, n, f) = (
                Arc::clone(&flood.stop),
                Arc::clone(&flood.sent),
                Arc::clone(&frames),
            );
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("bench-flood-{cpu}"))
                .spawn(move || {
                    let r = flood_setup(&fd, ifindex, cpu);
                    drop(fd);
                    let sock = match r {
                        Ok(sock) => {
                            let _ = ready_tx.send(Ok(()));
                            sock
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:#}")));
                            return Err(e);
                        }
                    };
                    flood_loop(&sock, &f, &s, &n)
                })?;
            flood.handles.push(handle);
            // On failure, dropping `flood` stops the threads already started.
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("UDP flood on CPU {cpu}: {e}"),
                Err(_) => bail!("UDP flood thread for CPU {cpu} died"),
            }
        }
        Ok(flood)
    }

    /// Frames handed to the interface so far (including those its peer's backlog dropped).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.handles) {
            h.join()
                .map_err(|_| anyhow::anyhow!("UDP flood thread panicked"))??;
        }
        Ok(self.sent())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in std::mem::take(&mut self.handles) {
            let _ = h.join();
        }
    }
}

fn check(r: libc::c_int, what: &str) -> Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error()).with_context(|| what.to_string())
    } else {
        Ok(())
    }
}

fn flood_setup(
    netns: &std::os::fd::OwnedFd,
    ifindex: u32,
    cpu: usize,
) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: plain system calls on valid descriptors and local structs.
    unsafe {
        check(libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET), "setns")?;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        check(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            "pinning the flood thread",
        )?;
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        check(fd, "AF_PACKET socket")?;
        let sock = std::os::fd::OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        check(
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            ),
            "PACKET_QDISC_BYPASS",
        )?;
        let buf: libc::c_int = 16 << 20;
        check(
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &buf as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            ),
            "SO_SNDBUFFORCE",
        )?;
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        check(
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ),
            "binding the AF_PACKET socket",
        )?;
        Ok(sock)
    }
}

fn flood_loop(
    sock: &std::os::fd::OwnedFd,
    frames: &[Vec<u8>],
    stop: &AtomicBool,
    sent: &std::sync::atomic::AtomicU64,
) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    const BATCH: usize = 256;
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|i| {
            let f = &frames[i % frames.len()];
            libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            }
        })
        .collect();
    // SAFETY: zeroed msghdrs are valid; each points at one iovec that outlives the loop.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() })
        .collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut start = 0usize;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs[start..] are valid mmsghdrs.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[start..].as_mut_ptr(),
                (BATCH - start) as u32,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The receiving backlog was full: that frame was dropped; go on after it.
                Some(libc::ENOBUFS) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                    start += 1;
                }
                Some(libc::EINTR) | Some(libc::EAGAIN) => {}
                _ => return Err(e).context("sendmmsg on the AF_PACKET socket"),
            }
        } else {
            sent.fetch_add(n as u64, Ordering::Relaxed);
            start += n as usize;
        }
        if start >= BATCH {
            start = 0;
        }
    }
    Ok(())
}
