//! Relaying the bytes of one proxied TCP connection (the DNS proxy's connections, the HTTP proxy's
//! CONNECT tunnels): both directions in one task, with an idle timeout, half-close (EOF on one side
//! shuts down the write side of the other, the other direction keeps going) and byte counts.
//!
//! Bytes move by splice(2) through a pipe (zero-copy) taken from a bounded [`PipePool`] only while
//! data is in flight, as HAProxy does: an idle connection holds no pipe, and the pipes' capacity,
//! which the kernel counts against the user's `fs.pipe-user-pages-soft` budget (shared by every
//! process of that uid on the node), stays bounded. When the pool is empty, or with
//! [`Engine::Copy`], a chunk goes through a user-space buffer that likewise lives only while that
//! chunk is in flight: readiness is awaited before it is allocated. The default, [`Engine::Auto`],
//! copies small chunks (cheaper than splicing them) and splices bulk data.
mod pipe;

use std::{
    future::Future,
    io,
    net::Shutdown,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};

pub use pipe::PipePool;
use pipe::{PooledPipe, splice};

/// How the bytes are moved.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Engine {
    /// Copy small chunks; splice once a read fills the copy buffer (bulk data), until the chunks
    /// get small again.
    #[default]
    Auto,
    /// splice(2) socket -> pipe -> socket for everything: the data never enters user space.
    Splice,
    /// read(2)/write(2) through a user-space buffer.
    Copy,
}

/// Size of a copy buffer (allocated per chunk, once the source is readable). With
/// [`Engine::Auto`], a read that fills it switches the direction to splice, and a splice that moves
/// less switches it back.
const CHUNK: usize = 32 * 1024;
/// Default bound of a [`PipePool`]: 32 pipes of 1 MiB are half of the default
/// fs.pipe-user-pages-soft (64 MiB).
pub const DEFAULT_MAX_PIPES: usize = 32;

/// Which side of the connection an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// The proxy stopped (drain time over).
    Shutdown,
    /// A read or write failed on that side.
    Error(Side, io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Idle => f.write_str("idle timeout"),
            End::Shutdown => f.write_str("proxy shutdown"),
            End::Error(side, e) => write!(f, "{side} error: {e}"),
        }
    }
}

/// What [`forward`] reports.
#[derive(Debug)]
pub struct Transfer {
    /// Client to upstream.
    pub sent: u64,
    /// Upstream to client.
    pub received: u64,
    pub end: End,
    /// Of `sent + received`, the bytes moved by splice (the rest was copied).
    pub spliced: u64,
}

/// Last time a byte moved, as milliseconds since `start`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Returns once nothing has moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Forwards between `client` and `upstream` until both directions are done, one fails, nothing
/// moves for `idle`, or `stop` completes. Splices through pipes of `pipes` as `engine` says.
///
/// EOF from one side shuts down the other's write side while the other direction still runs
/// (half-close). The direction that finishes last leaves its destination open: the caller closes
/// both sockets when this returns, and that close sends the FIN (both receive queues are empty
/// by then, so it is a FIN, not a reset), a system call per connection fewer, as HAProxy does.
pub async fn forward(
    client: &TcpStream,
    upstream: &TcpStream,
    engine: Engine,
    pipes: &PipePool,
    idle: Duration,
    stop: impl Future<Output = ()>,
) -> Transfer {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let spliced = AtomicU64::new(0);
    let up = Pump {
        src: client,
        dst: upstream,
        engine,
        pipes,
        count: &sent,
        spliced: &spliced,
        activity: &activity,
    };
    let down = Pump {
        src: upstream,
        dst: client,
        engine,
        pipes,
        count: &received,
        spliced: &spliced,
        activity: &activity,
    };
    let up = up.run();
    let down = down.run();
    tokio::pin!(up, down, stop);
    let (mut up_done, mut down_done) = (false, false);
    let end = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r.and_then(|()| half_close(upstream, down_done)) {
                Ok(()) => up_done = true,
                Err(e) => break End::Error(e.side(Side::Client, Side::Upstream), e.into_inner()),
            },
            r = &mut down, if !down_done => match r.and_then(|()| half_close(client, up_done)) {
                Ok(()) => down_done = true,
                Err(e) => break End::Error(e.side(Side::Upstream, Side::Client), e.into_inner()),
            },
            _ = activity.idle(idle) => break End::Idle,
            () = &mut stop => break End::Shutdown,
        }
        if up_done && down_done {
            break End::Closed;
        }
    };
    Transfer {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        end,
        spliced: spliced.load(Ordering::Relaxed),
    }
}

/// After EOF from the other side: shuts down `dst`'s write side, unless `other_done` (the caller's
/// close will send the FIN, see [`forward`]).
fn half_close(dst: &TcpStream, other_done: bool) -> Result<(), PumpError> {
    if other_done {
        return Ok(());
    }
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        // The peer may already be gone; that is the other direction's business.
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(PumpError::Write(e)),
    }
}

/// A failure of one direction: on reading its source or writing its destination.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl PumpError {
    fn side(&self, src: Side, dst: Side) -> Side {
        match self {
            PumpError::Read(_) => src,
            PumpError::Write(_) => dst,
        }
    }

    fn into_inner(self) -> io::Error {
        match self {
            PumpError::Read(e) | PumpError::Write(e) => e,
        }
    }
}

/// One direction of a connection.
struct Pump<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    engine: Engine,
    pipes: &'a PipePool,
    count: &'a AtomicU64,
    spliced: &'a AtomicU64,
    activity: &'a Activity,
}

impl Pump<'_> {
    /// `src` to `dst` until EOF on `src`.
    async fn run(self) -> Result<(), PumpError> {
        let mut bulk = self.engine == Engine::Splice;
        loop {
            self.src.readable().await.map_err(PumpError::Read)?;
            let pipe = if bulk { self.pipes.get() } else { None };
            let moved = match pipe {
                Some(pipe) => {
                    let moved = self.splice_chunk(pipe).await?;
                    if self.engine == Engine::Auto && moved.is_some_and(|n| n < CHUNK) {
                        bulk = false;
                    }
                    moved
                }
                None => {
                    let moved = self.copy_chunk().await?;
                    if self.engine == Engine::Auto && moved.is_some_and(|n| n >= CHUNK) {
                        bulk = true;
                    }
                    moved
                }
            };
            if moved == Some(0) {
                return Ok(());
            }
        }
    }

    /// Moves what `src` has through `pipe` to `dst`. None: nothing to read after all; Some(0):
    /// EOF.
    async fn splice_chunk(&self, pipe: PooledPipe<'_>) -> Result<Option<usize>, PumpError> {
        // The pipe is empty, so EAGAIN can only mean the socket has nothing to read.
        let n = match self.src.try_io(Interest::READABLE, || {
            splice(self.src.as_raw_fd(), pipe.write_fd(), pipe.capacity())
        }) {
            Ok(n) => n,
            Err(e) if retry(&e) => {
                pipe.release();
                return Ok(None);
            }
            Err(e) => {
                pipe.release();
                return Err(PumpError::Read(e));
            }
        };
        if n == 0 {
            pipe.release();
            return Ok(Some(0));
        }
        self.activity.touch();
        // Drain the pipe completely; EAGAIN now means the socket's send buffer is full. On an error
        // or cancellation the pipe still holds data and is closed (PooledPipe's drop).
        let mut left = n;
        while left > 0 {
            self.dst.writable().await.map_err(PumpError::Write)?;
            match self.dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read_fd(), self.dst.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    self.count.fetch_add(m as u64, Ordering::Relaxed);
                    self.spliced.fetch_add(m as u64, Ordering::Relaxed);
                    self.activity.touch();
                }
                Err(e) if retry(&e) => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        pipe.release();
        Ok(Some(n))
    }

    /// Moves what `src` has, up to [`CHUNK`], to `dst`. None: nothing to read after all; Some(0):
    /// EOF. The buffer lives for this chunk only (1,000 idle connections holding 32 KiB per
    /// direction made most of the proxy's memory); while `dst` is blocked, only the unwritten rest
    /// is kept.
    async fn copy_chunk(&self) -> Result<Option<usize>, PumpError> {
        let mut buf = Vec::with_capacity(CHUNK);
        let n = match read_draining(self.src, &mut buf) {
            Ok(n) => n,
            Err(e) if retry(&e) => return Ok(None),
            Err(e) => return Err(PumpError::Read(e)),
        };
        if n == 0 {
            return Ok(Some(0));
        }
        self.activity.touch();
        let mut off = 0;
        while off < buf.len() {
            match self.dst.try_write(&buf[off..]) {
                Ok(m) => {
                    off += m;
                    self.count.fetch_add(m as u64, Ordering::Relaxed);
                    self.activity.touch();
                }
                Err(e) if retry(&e) => {
                    keep_rest(&mut buf, off);
                    off = 0;
                    self.dst.writable().await.map_err(PumpError::Write)?;
                }
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        Ok(Some(n))
    }
}

/// Reads what `src` has into the spare capacity of `buf` (no zeroing), up to that capacity.
/// A read that does not fill it has emptied the socket's receive queue (TCP copies all it has
/// up to the length asked), so `src`'s readiness is cleared with it, as tokio's own
/// `poll_read` does on epoll: the next read waits for the next edge instead of trying and
/// failing with EAGAIN, one system call per message saved. (The edge-triggered epoll reports
/// data arriving after this read; tokio keeps a readiness set since the read began, and an EOF
/// already seen stays set.) Not for splice, which can stop short of what the socket has when
/// the pipe runs out of slots.
fn read_draining(src: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let want = buf.capacity() - buf.len();
    let mut got = None;
    let r = src.try_io(Interest::READABLE, || {
        let n = socket2::SockRef::from(src).recv(buf.spare_capacity_mut())?;
        got = Some(n);
        if 0 < n && n < want {
            Err(io::ErrorKind::WouldBlock.into()) // clears the readiness; n is in `got`
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => {
            // SAFETY: recv initialised the first n bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Ok(n)
        }
        None => r,
    }
}

/// Drops the written part `..off` of `buf`, and hands the spare capacity back to the allocator
/// when that frees at least half of it.
fn keep_rest(buf: &mut Vec<u8>, off: usize) {
    buf.drain(..off);
    if buf.capacity() >= 2 * buf.len() {
        buf.shrink_to_fit();
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// client <-> [proxy_c | proxy_u] <-> server, with `forward` in the middle; returns the
    /// bytes spliced.
    async fn run(engine: Engine, pipes: Arc<PipePool>) -> u64 {
        let (mut client, proxy_c) = pair().await;
        let (proxy_u, mut server) = pair().await;
        let fwd = tokio::spawn(async move {
            forward(
                &proxy_c,
                &proxy_u,
                engine,
                &pipes,
                Duration::from_secs(5),
                std::future::pending(),
            )
            .await
        });
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let p2 = payload.clone();
        let srv = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, p2);
            // Half-close: the client has shut its write side and still gets this.
            server.write_all(b"reply after eof").await.unwrap();
            server.shutdown().await.unwrap();
        });
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after eof");
        srv.await.unwrap();
        let t = fwd.await.unwrap();
        assert!(matches!(t.end, End::Closed), "{:?}", t.end);
        assert_eq!(t.sent, payload.len() as u64);
        assert_eq!(t.received, 15);
        t.spliced
    }

    /// A read that does not fill the buffer clears the readiness: the next wait is for new
    /// data, not an immediate wake-up to a read failing with EAGAIN. A full read keeps it.
    /// Whether `s` is readable within 50 ms.
    async fn ready_now(s: &TcpStream) -> bool {
        tokio::time::timeout(Duration::from_millis(50), s.readable())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    #[tokio::test]
    async fn a_short_read_clears_the_readiness_and_a_full_one_keeps_it() {
        let (mut a, b) = pair().await;
        a.write_all(b"abc").await.unwrap();
        b.readable().await.unwrap();
        let mut buf = Vec::with_capacity(CHUNK);
        assert_eq!(read_draining(&b, &mut buf).unwrap(), 3);
        assert_eq!(buf, b"abc");
        assert!(!ready_now(&b).await, "readiness kept after a short read");
        // New data wakes it again.
        a.write_all(b"d").await.unwrap();
        assert!(ready_now(&b).await, "new data is seen");
        // A read that fills the buffer leaves the readiness: more may be queued.
        a.write_all(&[7; 64]).await.unwrap();
        let mut small = Vec::with_capacity(2);
        let n = read_draining(&b, &mut small).unwrap();
        assert_eq!(n, small.capacity(), "a full read");
        assert!(ready_now(&b).await, "still readable");
    }

    /// Small messages, each read short (which clears the source's readiness): the next one
    /// still arrives, and so does an EOF queued right behind the last message, each way.
    #[tokio::test]
    async fn short_reads_wait_for_the_next_message_and_see_an_eof_queued_behind_one() {
        let (mut client, proxy_c) = pair().await;
        let (proxy_u, mut server) = pair().await;
        let pipes = PipePool::new(0);
        let fwd = forward(
            &proxy_c,
            &proxy_u,
            Engine::Copy,
            &pipes,
            Duration::from_secs(5),
            std::future::pending(),
        );
        let talk = async {
            for i in 0..20u8 {
                client.write_all(&[i; 3]).await.unwrap();
                let mut got = [0; 3];
                server.read_exact(&mut got).await.unwrap();
                assert_eq!(got, [i; 3]);
                server.write_all(&[i; 2]).await.unwrap();
                let mut back = [0; 2];
                client.read_exact(&mut back).await.unwrap();
                assert_eq!(back, [i; 2]);
            }
            // The last message with its EOF behind it, written before the relay reads either.
            server.write_all(b"bye").await.unwrap();
            server.shutdown().await.unwrap();
            client.write_all(b"end").await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = [0; 3];
            client.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"bye");
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"end");
        };
        let (t, ()) = tokio::join!(fwd, talk);
        assert!(matches!(t.end, End::Closed), "{:?}", t.end);
        assert_eq!((t.sent, t.received), (20 * 3 + 3, 20 * 2 + 3));
        // Whichever EOF came last is passed on by the close.
        drop((proxy_c, proxy_u));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test]
    async fn splice_forwards_and_half_closes() {
        let pool = Arc::new(PipePool::new(4));
        assert_eq!(run(Engine::Splice, pool.clone()).await, 3_000_015);
        // Every pipe lent came back.
        let (total, free) = pool.counts();
        assert!((1..=2).contains(&total), "{total}");
        assert_eq!(free, total);
    }

    #[tokio::test]
    async fn copy_forwards_and_half_closes() {
        let pool = Arc::new(PipePool::new(4));
        assert_eq!(run(Engine::Copy, pool.clone()).await, 0);
        assert_eq!(pool.counts(), (0, 0));
    }

    /// The side that closes first gets its EOF passed on at once (half-close); the other side's
    /// EOF is passed on by the caller's close after `forward` returns, as a FIN, not a reset.
    #[tokio::test]
    async fn the_last_eof_is_passed_on_by_the_close() {
        for client_first in [true, false] {
            let (mut client, proxy_c) = pair().await;
            let (proxy_u, mut server) = pair().await;
            let pipes = PipePool::new(1);
            let fwd = forward(
                &proxy_c,
                &proxy_u,
                Engine::Auto,
                &pipes,
                Duration::from_secs(5),
                std::future::pending(),
            );
            let (first, last) = if client_first {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            let peers = async {
                first.write_all(b"q").await.unwrap();
                first.shutdown().await.unwrap();
                let mut got = Vec::new();
                last.read_to_end(&mut got).await.unwrap();
                assert_eq!(
                    got, b"q",
                    "half-close passed on (client first: {client_first})"
                );
                last.write_all(b"a").await.unwrap();
                last.shutdown().await.unwrap();
                let mut got = [0u8; 1];
                first.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"a");
            };
            let (t, ()) = tokio::join!(fwd, peers);
            assert!(matches!(t.end, End::Closed), "{:?}", t.end);
            let mut rest = [0u8; 1];
            let early = tokio::time::timeout(Duration::from_millis(100), first.read(&mut rest));
            assert!(
                early.await.is_err(),
                "no EOF before the close (client first: {client_first})"
            );
            drop((proxy_c, proxy_u));
            assert_eq!(
                first.read(&mut rest).await.unwrap(),
                0,
                "a clean EOF (client first: {client_first})"
            );
        }
    }

    #[tokio::test]
    async fn auto_splices_bulk_and_copies_small() {
        let pool = Arc::new(PipePool::new(4));
        let spliced = run(Engine::Auto, pool.clone()).await;
        // The 3 MB upload mostly spliced; the 15-byte reply copied.
        assert!(spliced > 2_000_000 && spliced <= 3_000_000, "{spliced}");
    }

    #[tokio::test]
    async fn empty_pool_copies() {
        let pool = Arc::new(PipePool::new(0));
        assert_eq!(run(Engine::Splice, pool.clone()).await, 0);
        assert_eq!(pool.counts(), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_pool_shared_by_many() {
        let pool = Arc::new(PipePool::new(1));
        let runs: Vec<_> = (0..8)
            .map(|_| tokio::spawn(run(Engine::Splice, pool.clone())))
            .collect();
        let mut spliced = 0;
        for r in runs {
            spliced += r.await.unwrap();
        }
        assert!(spliced > 0);
        assert_eq!(pool.counts(), (1, 1));
    }

    #[test]
    fn blocked_writer_keeps_only_the_rest() {
        let mut buf = Vec::with_capacity(CHUNK);
        buf.extend((0..CHUNK).map(|i| i as u8));
        // Most written: the rest moves to the front and the spare memory goes back.
        keep_rest(&mut buf, CHUNK - 100);
        assert_eq!(
            buf,
            (CHUNK - 100..CHUNK).map(|i| i as u8).collect::<Vec<_>>()
        );
        assert!(buf.capacity() < CHUNK / 2, "{}", buf.capacity());
        // Little written: no reallocation for a small saving.
        let mut buf = Vec::with_capacity(CHUNK);
        buf.extend((0..CHUNK).map(|i| i as u8));
        keep_rest(&mut buf, 100);
        assert_eq!(buf.len(), CHUNK - 100);
        assert_eq!(buf[0], 100);
        assert_eq!(buf.capacity(), CHUNK);
    }

    /// A reader that starts late makes the copy block mid-chunk, over and over; every byte still
    /// arrives once and in order.
    #[tokio::test]
    async fn copy_with_a_slow_reader() {
        let (mut client, proxy_c) = pair().await;
        let (proxy_u, mut server) = pair().await;
        let fwd = tokio::spawn(async move {
            let pool = PipePool::new(0);
            forward(
                &proxy_c,
                &proxy_u,
                Engine::Copy,
                &pool,
                Duration::from_secs(5),
                std::future::pending(),
            )
            .await
        });
        let payload: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&p2).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        let mut chunk = vec![0; 4096];
        loop {
            // Small reads, with pauses, so the proxy's writes keep blocking.
            let n = server.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() % (512 * 1024) < 4096 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert!(got == payload, "{} bytes of {}", got.len(), payload.len());
        drop(server);
        drop(writer.await.unwrap());
        let t = fwd.await.unwrap();
        assert_eq!(t.sent, payload.len() as u64);
    }

    #[tokio::test]
    async fn idle_timeout() {
        let (_client, proxy_c) = pair().await;
        let (proxy_u, _server) = pair().await;
        let t0 = Instant::now();
        let pool = PipePool::new(2);
        let t = forward(
            &proxy_c,
            &proxy_u,
            Engine::Auto,
            &pool,
            Duration::from_millis(200),
            std::future::pending(),
        )
        .await;
        assert!(matches!(t.end, End::Idle), "{:?}", t.end);
        assert!(t0.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn stop_ends_it() {
        let (_client, proxy_c) = pair().await;
        let (proxy_u, _server) = pair().await;
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(async move {
            let pool = PipePool::new(0);
            forward(
                &proxy_c,
                &proxy_u,
                Engine::Copy,
                &pool,
                Duration::from_secs(60),
                async {
                    let _ = stop.await;
                },
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(()).unwrap();
        let t = h.await.unwrap();
        assert!(matches!(t.end, End::Shutdown), "{:?}", t.end);
    }
}
