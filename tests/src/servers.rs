//! Echo servers that record who connected, and ping.
use std::{
    io::{self, Read as _, Write as _},
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const POLL: Duration = Duration::from_millis(50);

/// A TCP or UDP echo server running on its own threads. It echoes every byte (every datagram)
/// back and records the peer address it saw, which is how tests check that a destination server
/// sees `EGRESS_SOURCE` and never a cluster address. Stops when dropped.
pub struct EchoServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn tcp(listener: TcpListener) -> Result<EchoServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (peers, stop) = (Arc::default(), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (peers, stop): (Arc<Mutex<Vec<SocketAddr>>>, Arc<AtomicBool>) =
                (Arc::clone(&peers), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            peers.lock().unwrap().push(peer);
                            let stop = Arc::clone(&stop);
                            std::thread::spawn(move || echo_tcp(conn, &stop));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => {
                            eprintln!("egress-tests: echo server {addr}: accept: {e}");
                            std::thread::sleep(POLL);
                        }
                    }
                }
            })
        };
        Ok(EchoServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        })
    }

    pub fn udp(socket: UdpSocket) -> Result<EchoServer> {
        let addr = socket.local_addr()?;
        socket.set_read_timeout(Some(POLL))?;
        let (peers, stop) = (Arc::default(), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (peers, stop): (Arc<Mutex<Vec<SocketAddr>>>, Arc<AtomicBool>) =
                (Arc::clone(&peers), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                        peers.lock().unwrap().push(peer);
                        let _ = socket.send_to(&buf[..n], peer);
                    }
                }
            })
        };
        Ok(EchoServer {
            addr,
            peers,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every peer seen so far (one per TCP connection or UDP datagram), oldest first.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Waits until at least `n` peers have been seen.
    pub fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<Vec<SocketAddr>> {
        let deadline = Instant::now() + timeout;
        loop {
            let peers = self.peers();
            if peers.len() >= n {
                return Ok(peers);
            }
            if Instant::now() >= deadline {
                bail!(
                    "echo server {}: saw {peers:?}, expected {n} peers",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_tcp(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Sends one TCP message to an echo server and returns the reply (connect, write, read back
/// as many bytes, close).
pub fn tcp_roundtrip(mut conn: TcpStream, msg: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    conn.read_exact(&mut got).context("reading the echo")?;
    Ok(got)
}

/// Sends one UDP datagram and waits for the reply.
pub fn udp_roundtrip(
    socket: &UdpSocket,
    to: SocketAddr,
    msg: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(msg, to)?;
    let mut buf = vec![0u8; 65536];
    let (n, _) = socket
        .recv_from(&mut buf)
        .context("waiting for the UDP echo")?;
    buf.truncate(n);
    Ok(buf)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP echo from the calling thread's namespace (raw socket; needs CAP_NET_RAW). Retries every
/// 200 ms until a reply from `dst` arrives or `timeout` passes; returns the round-trip time.
pub fn ping(dst: Ipv4Addr, timeout: Duration) -> Result<Duration> {
    ping_with(dst, b"egress-tests ping", timeout)
}

/// `ping` with this payload: one bigger than the path MTU is sent fragmented (and its reply,
/// reassembled, must carry the same payload back).
pub fn ping_with(dst: Ipv4Addr, payload: &[u8], timeout: Duration) -> Result<Duration> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .context("opening a raw ICMP socket")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let id = (std::process::id() as u16) ^ (rand_u16());
    let to = SockAddr::from(SocketAddrV4::new(dst, 0));
    let deadline = Instant::now() + timeout;
    let mut seq: u16 = 0;
    while Instant::now() < deadline {
        seq = seq.wrapping_add(1);
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(payload);
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let sent = Instant::now();
        // Unreachable destinations may fail the send itself; keep trying until the deadline.
        let _ = sock.send_to(&pkt, &to);
        let wait_until = (sent + Duration::from_millis(200)).min(deadline);
        while Instant::now() < wait_until {
            let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            // SAFETY: recv_from initialised the first n bytes.
            let buf: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let ihl = ((buf.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
            let icmp = buf.get(ihl..).unwrap_or_default();
            let from_dst = from.as_socket_ipv4().map(|a| *a.ip()) == Some(dst);
            if from_dst
                && icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
                && icmp[8..] == *payload
            {
                return Ok(sent.elapsed());
            }
        }
    }
    bail!("no ICMP echo reply from {dst} within {timeout:?}")
}

/// An ICMP error about a ping: what a hop sent back for an echo request too big for it.
#[derive(Debug)]
pub struct IcmpError {
    /// The outer source address.
    pub from: Ipv4Addr,
    /// The ICMP message, from its type byte on (the quoted packet included).
    pub icmp: Vec<u8>,
}

/// Pings `dst` from the calling thread's namespace with `payload_len` bytes and the don't-
/// fragment bit (IP_PMTUDISC_DO), every 200 ms, until an ICMP error quoting one of these
/// requests arrives (raw socket; CAP_NET_RAW), and returns it. Fails after `timeout`, or when
/// an echo reply arrives instead (nothing on the path was too small).
pub fn ping_error(dst: Ipv4Addr, payload_len: usize, timeout: Duration) -> Result<IcmpError> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .context("opening a raw ICMP socket")?;
    let df = libc::IP_PMTUDISC_DO;
    // SAFETY: setsockopt with a c_int option value that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            &df as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("IP_MTU_DISCOVER");
    }
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let id = (std::process::id() as u16) ^ rand_u16();
    let to = SockAddr::from(SocketAddrV4::new(dst, 0));
    let deadline = Instant::now() + timeout;
    let mut seq: u16 = 0;
    while Instant::now() < deadline {
        seq = seq.wrapping_add(1);
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.resize(8 + payload_len, 0xa5);
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // Once the error is taken, the kernel itself refuses (EMSGSIZE) the next big sends.
        let _ = sock.send_to(&pkt, &to);
        let wait_until = (Instant::now() + Duration::from_millis(200)).min(deadline);
        while Instant::now() < wait_until {
            let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            // SAFETY: recv_from initialised the first n bytes.
            let buf: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let ihl = ((buf.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
            let icmp = buf.get(ihl..).unwrap_or_default().to_vec();
            let from = from.as_socket_ipv4().map(|a| *a.ip());
            if icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                bail!(
                    "an echo reply from {from:?}: nothing on the way refused {payload_len} bytes"
                );
            }
            // An error quotes the request's IP header and at least 8 bytes of it.
            let quoted = icmp.get(8..).unwrap_or_default();
            let qihl = ((quoted.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
            let quoted_echo = quoted.get(qihl..qihl + 8).unwrap_or_default();
            if matches!(icmp.first(), Some(3 | 11 | 12))
                && quoted_echo.len() == 8
                && quoted_echo[0] == 8
                && quoted_echo[4..6] == id.to_be_bytes()
            {
                return Ok(IcmpError {
                    from: from.context("the error's source")?,
                    icmp,
                });
            }
        }
    }
    bail!("no ICMP error about a {payload_len}-byte ping to {dst} within {timeout:?}")
}

/// Sends one UDP datagram from the calling thread's namespace as IPv4 fragments that carry at
/// most `frag_len` bytes of it each (a multiple of 8), in the order `order` gives (indexes of
/// the fragments; `[1, 0]`: the second first). A raw socket with IP_HDRINCL (CAP_NET_RAW),
/// out of `dev`; the kernel fills in the header checksum. The UDP checksum is 0 (none).
pub fn send_udp_fragments(
    dev: &str,
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    id: u16,
    payload: &[u8],
    frag_len: usize,
    order: &[usize],
) -> Result<()> {
    assert!(
        frag_len.is_multiple_of(8) && frag_len > 0,
        "fragment size {frag_len}"
    );
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&sport.to_be_bytes());
    datagram.extend_from_slice(&dport.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    let frags: Vec<&[u8]> = datagram.chunks(frag_len).collect();
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .context("opening a raw socket")?;
    sock.set_header_included_v4(true)?;
    sock.bind_device(Some(dev.as_bytes()))
        .with_context(|| format!("binding the raw socket to {dev}"))?;
    let to = SockAddr::from(SocketAddrV4::new(dst, 0));
    for &i in order {
        let chunk = frags
            .get(i)
            .with_context(|| format!("fragment {i} of {}", frags.len()))?;
        let more = i + 1 < frags.len();
        let flags_off = ((i * frag_len / 8) as u16) | if more { 0x2000 } else { 0 };
        let mut pkt = vec![0x45, 0];
        pkt.extend_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&flags_off.to_be_bytes());
        pkt.extend_from_slice(&[64, 17, 0, 0]);
        pkt.extend_from_slice(&src.octets());
        pkt.extend_from_slice(&dst.octets());
        pkt.extend_from_slice(chunk);
        sock.send_to(&pkt, &to)
            .with_context(|| format!("sending fragment {i} to {dst}"))?;
    }
    Ok(())
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(Instant::now()) as u16
}
