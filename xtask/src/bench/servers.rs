//! The destination servers (in the dest namespace): echo, HTTP, byte sink, UDP sink, iperf3.
//! The listening sockets are made inside the namespace; the tokio runtime serving them may run
//! anywhere (a socket stays in the namespace it was created in).
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use egress_tests::{DEST_IP, Netns, Proc};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::sys;

/// Echo server: connections/s (one byte each way) and request/response latency.
pub const ECHO_PORT: u16 = 7000;
/// HTTP/1.1 origin server behind the proxies.
pub const HTTP_PORT: u16 = 80;
/// Discards what it receives and counts it: CONNECT throughput.
pub const SINK_PORT: u16 = 9001;
/// UDP packets/s are counted at this (never read) socket.
pub const UDP_PORT: u16 = 9000;
/// iperf3 server: TCP throughput.
pub const IPERF_PORT: u16 = 5201;
/// A redirect rule used only by the BPF_PROG_TEST_RUN packets (nothing listens).
pub const TESTRUN_PORT: u16 = 9999;

/// Body of every HTTP response.
pub const HTTP_BODY: &[u8] = &[b'x'; 128];

pub struct Servers {
    rt: Option<tokio::runtime::Runtime>,
    peers: Arc<Mutex<HashSet<IpAddr>>>,
    sink_bytes: Arc<AtomicU64>,
    _udp: UdpSocket,
    iperf: Proc,
}

impl Servers {
    pub fn start(dest: &Netns, log: &std::path::Path) -> Result<Servers> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(sys::online_cpus().max(2))
            .thread_name("bench-dest")
            .enable_all()
            .build()?;
        let peers: Arc<Mutex<HashSet<IpAddr>>> = Arc::default();
        let sink_bytes = Arc::new(AtomicU64::new(0));
        let listen = |port: u16| -> Result<tokio::net::TcpListener> {
            let addr = SocketAddr::from((DEST_IP, port));
            let l = dest.run(|| {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.set_reuseaddr(true)?;
                s.bind(addr)?;
                // The std listener is converted inside the runtime below.
                Ok::<_, std::io::Error>(s)
            });
            let s = l.with_context(|| format!("binding {addr} in {}", dest.name()))?;
            let _guard = rt.enter();
            Ok(s.listen(4096)?)
        };
        let echo = listen(ECHO_PORT)?;
        let http = listen(HTTP_PORT)?;
        let sink = listen(SINK_PORT)?;
        rt.spawn(accept_loop(echo, Arc::clone(&peers), echo_conn));
        rt.spawn(accept_loop(http, Arc::clone(&peers), http_conn));
        {
            let bytes = Arc::clone(&sink_bytes);
            rt.spawn(accept_loop(sink, Arc::clone(&peers), move |c| {
                sink_conn(c, Arc::clone(&bytes))
            }));
        }
        let udp = dest.udp_bind(SocketAddr::from((DEST_IP, UDP_PORT)))?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log.join("iperf3-server.log"))?)
            .stderr(Stdio::inherit());
        let iperf = dest.spawn(cmd)?;
        Ok(Servers {
            rt: Some(rt),
            peers,
            sink_bytes,
            _udp: udp,
            iperf,
        })
    }

    /// The iperf3 server's process.
    pub fn iperf_pid(&self) -> u32 {
        self.iperf.pid()
    }

    /// Distinct peer addresses the TCP servers have seen.
    pub fn peers(&self) -> HashSet<IpAddr> {
        self.peers.lock().unwrap().clone()
    }

    pub fn clear_peers(&self) {
        self.peers.lock().unwrap().clear();
    }

    /// The source of the next datagram the UDP socket receives.
    /// Discards every datagram queued at the destination's UDP socket.
    pub fn udp_drain(&self) -> Result<()> {
        self._udp.set_nonblocking(true)?;
        let mut buf = [0u8; 2048];
        while self._udp.recv_from(&mut buf).is_ok() {}
        self._udp.set_nonblocking(false)?;
        Ok(())
    }

    pub fn udp_peer(&self, timeout: Duration) -> Result<SocketAddr> {
        self._udp.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 2048];
        let (_, peer) = self
            ._udp
            .recv_from(&mut buf)
            .context("no UDP datagram reached the destination")?;
        Ok(peer)
    }

    pub fn sink_bytes(&self) -> u64 {
        self.sink_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop<F, Fut>(l: tokio::net::TcpListener, peers: Arc<Mutex<HashSet<IpAddr>>>, f: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match l.accept().await {
            Ok((c, peer)) => {
                {
                    let mut p = peers.lock().unwrap();
                    if p.len() < 64 {
                        p.insert(peer.ip());
                    }
                }
                let _ = c.set_nodelay(true);
                tokio::spawn(f(c));
            }
            // Out of descriptors or a reset before accept: keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A connection whose first byte is this is served by a thread of its own that busy-polls
/// (the latency figure: no wake-up from idle on the server side).
pub const SPIN_MARK: u8 = b'S';

async fn echo_conn(mut c: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut first = true;
    loop {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if first && buf[0] == SPIN_MARK && sys::online_cpus() >= 2 {
            let c = c.into_std()?;
            buf.truncate(n);
            std::thread::spawn(move || spin_echo(c, buf));
            return Ok(());
        }
        first = false;
        c.write_all(&buf[..n]).await?;
    }
}

/// Echoes with non-blocking reads in a loop until the peer closes or 30 s without data.
fn spin_echo(mut c: std::net::TcpStream, pending: Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let _ = c.set_nonblocking(false);
    if c.write_all(&pending).is_err() {
        return;
    }
    let _ = c.set_nonblocking(true);
    let mut buf = vec![0u8; 16 * 1024];
    let mut idle_since = std::time::Instant::now();
    loop {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut off = 0;
                while off < n {
                    match c.write(&buf[off..n]) {
                        Ok(w) => off += w,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::hint::spin_loop()
                        }
                        Err(_) => return,
                    }
                }
                idle_since = std::time::Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if idle_since.elapsed() > Duration::from_secs(30) {
                    return;
                }
                std::hint::spin_loop();
            }
            Err(_) => return,
        }
    }
}

async fn sink_conn(mut c: tokio::net::TcpStream, bytes: Arc<AtomicU64>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A minimal HTTP/1.1 origin: every request (GET, no body expected; a Content-Length body is
/// skipped) gets 200 with a 128-byte body; keep-alive unless the request says close.
async fn http_conn(mut c: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    let mut out = Vec::with_capacity(512);
    loop {
        // Answer every complete request in the buffer (pipelining included), then read more.
        let mut close = false;
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = &buf[..end];
            let (mut conn_close, mut body_len) = (false, 0usize);
            for line in head.split(|&b| b == b'\n').skip(1) {
                let line = String::from_utf8_lossy(line);
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                if k == "connection" && v.contains("close") {
                    conn_close = true;
                } else if k == "content-length" {
                    body_len = v.parse().unwrap_or(0);
                }
            }
            let total = end + 4 + body_len;
            if buf.len() < total {
                break;
            }
            buf.drain(..total);
            out.extend_from_slice(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ",
            );
            out.extend_from_slice(HTTP_BODY.len().to_string().as_bytes());
            if conn_close {
                out.extend_from_slice(b"\r\nConnection: close");
            }
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(HTTP_BODY);
            if conn_close {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            c.write_all(&out).await?;
            out.clear();
        }
        if close {
            let _ = c.shutdown().await;
            return Ok(());
        }
        let n = c.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
