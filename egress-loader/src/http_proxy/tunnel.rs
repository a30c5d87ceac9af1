//! CONNECT tunnels: bytes moved both ways until both sides finish, or nothing moves for the idle
//! timeout. The client's own socket is taken back from hyper so that the DNS proxy's engine
//! ([`crate::relay`]: small chunks copied, bulk spliced, half-close) carries the tunnel.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::Instant,
};

use crate::relay::{self, Engine, PipePool};

/// Buffer per direction when copying through hyper's upgraded stream (the fallback): tokio's
/// default of 8 KiB costs four times the system calls per byte.
const COPY_BUF: usize = 64 * 1024;

/// How a tunnel ended.
#[derive(Debug)]
pub struct TunnelEnd {
    /// Bytes client to upstream, upstream to client.
    pub up: u64,
    pub down: u64,
    /// None: both sides closed. Some: an error or the idle timeout.
    pub error: Option<io::Error>,
}

/// Carries the tunnel between the upgraded client connection and `upstream` until both
/// directions are done; gives up when no byte has moved either way for `idle`. `pipes` lends
/// the splice pipes.
pub async fn run(
    client: TokioIo<Upgraded>,
    upstream: TcpStream,
    idle: Duration,
    pipes: &PipePool,
) -> TunnelEnd {
    match client_socket(client.into_inner()) {
        Ok((client, early)) => relay(client, early, upstream, idle, pipes).await,
        Err(upgraded) => {
            tracing::debug!(
                "CONNECT: the upgraded connection is not a TcpStream; copying through hyper"
            );
            copy(TokioIo::new(upgraded), upstream, idle).await
        }
    }
}

/// The client's socket, and the bytes hyper read from it past the CONNECT request (a client may
/// send its first bytes, e.g. a TLS ClientHello, without waiting for the 200).
fn client_socket(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>()?;
    Ok((parts.io.into_inner(), parts.read_buf))
}

async fn relay(
    client: TcpStream,
    early: Bytes,
    mut upstream: TcpStream,
    idle: Duration,
    pipes: &PipePool,
) -> TunnelEnd {
    // What hyper read along with the request head, no more than its read buffer (8 KiB unless the
    // head was larger): the upstream socket's send buffer normally takes it at once.
    if !early.is_empty() {
        let error = match tokio::time::timeout(idle, upstream.write_all(&early)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(io::Error::new(e.kind(), format!("upstream: {e}"))),
            Err(_) => Some(idle_error(idle)),
        };
        if error.is_some() {
            return TunnelEnd {
                up: 0,
                down: 0,
                error,
            };
        }
    }
    let t = relay::forward(
        &client,
        &upstream,
        Engine::Auto,
        pipes,
        idle,
        std::future::pending(),
    )
    .await;
    let error = match t.end {
        relay::End::Closed => None,
        relay::End::Idle => Some(idle_error(idle)),
        relay::End::Error(side, e) => Some(io::Error::new(e.kind(), format!("{side}: {e}"))),
        // No stop signal is passed; shutdown drops the tunnel instead.
        relay::End::Shutdown => Some(io::Error::other("proxy shutdown")),
    };
    TunnelEnd {
        up: early.len() as u64 + t.sent,
        down: t.received,
        error,
    }
}

fn idle_error(idle: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("tunnel idle for {idle:?}"))
}

/// Copies between `client` and `upstream` until both directions are done; gives up when no byte
/// has moved either way for `idle`.
async fn copy<C, U>(client: C, upstream: U, idle: Duration) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut client = Watched {
        io: client,
        activity: activity.clone(),
        bytes: 0,
    };
    let mut upstream = Watched {
        io: upstream,
        activity: activity.clone(),
        bytes: 0,
    };
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUF, COPY_BUF) => r.err(),
        () = activity.idle_for(idle) => Some(idle_error(idle)),
    };
    // Bytes read from each side, counted as they arrive (also when the copy failed).
    TunnelEnd {
        up: client.bytes,
        down: upstream.bytes,
        error: result,
    }
}

/// The time of the last byte moved, as milliseconds since `base`.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that records activity on every read and write, and counts the bytes read from it.
struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
    bytes: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.bytes += n as u64;
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{convert::Infallible, sync::Mutex};

    use http_body_util::Empty;
    use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, BufReader},
        net::TcpListener,
        sync::oneshot,
    };

    /// Through hyper's server as the proxy runs it: the client's socket comes back with the bytes
    /// the client sent in the same write as the CONNECT request, and the relay carries both
    /// directions and a half-close.
    #[tokio::test]
    async fn relays_on_the_client_socket_with_pipelined_bytes() {
        // Upstream: greets, reads to EOF, then sends back all it got.
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = up.accept().await.unwrap();
            s.write_all(b"hi\n").await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got).await.unwrap();
            got.len()
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let (end_tx, end_rx) = oneshot::channel();
        let end_tx = Mutex::new(Some(end_tx));
        tokio::spawn(async move {
            let (s, _) = proxy.accept().await.unwrap();
            let service = service_fn(move |mut req: Request<Incoming>| {
                let on_upgrade = hyper::upgrade::on(&mut req);
                let end_tx = end_tx.lock().unwrap().take().expect("one request");
                tokio::spawn(async move {
                    let upgraded = on_upgrade.await.unwrap();
                    let (client, early) = client_socket(upgraded).expect("hyper's TcpStream");
                    assert_eq!(&early[..], b"early ");
                    let upstream = TcpStream::connect(up_addr).await.unwrap();
                    let pipes = PipePool::new(2);
                    let end = relay(client, early, upstream, Duration::from_secs(5), &pipes).await;
                    let _ = end_tx.send(end);
                });
                async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(s), service)
                .with_upgrades()
                .await;
        });

        let mut c = BufReader::new(TcpStream::connect(proxy_addr).await.unwrap());
        c.write_all(b"CONNECT up:1 HTTP/1.1\r\nHost: up:1\r\n\r\nearly ")
            .await
            .unwrap();
        let mut line = String::new();
        c.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        while line != "\r\n" {
            line.clear();
            c.read_line(&mut line).await.unwrap();
        }
        line.clear();
        c.read_line(&mut line).await.unwrap();
        assert_eq!(line, "hi\n");
        // Bulk, so that it is spliced.
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        c.write_all(&payload).await.unwrap();
        c.get_mut().shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert!(back.starts_with(b"early "));
        assert!(back[6..] == payload[..], "{} bytes back", back.len());

        let sent = 6 + payload.len();
        assert_eq!(server.await.unwrap(), sent);
        let end = end_rx.await.unwrap();
        assert!(end.error.is_none(), "{:?}", end.error);
        assert_eq!((end.up, end.down), (sent as u64, 3 + sent as u64));
    }

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (mut c, c_far) = tokio::io::duplex(64);
        let (mut u, u_far) = tokio::io::duplex(64);
        let t = tokio::spawn(copy(c_far, u_far, Duration::from_secs(5)));
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        u.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        u.write_all(b"world!").await.unwrap();
        let mut buf = [0; 6];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"world!");
        drop(c);
        drop(u);
        let end = t.await.unwrap();
        assert_eq!((end.up, end.down), (5, 6));
        assert!(end.error.is_none(), "{:?}", end.error);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_the_tunnel() {
        let (mut c, c_far) = tokio::io::duplex(64);
        let (_u, u_far) = tokio::io::duplex(64);
        let t = tokio::spawn(copy(c_far, u_far, Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_secs(50)).await;
        c.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(
            !t.is_finished(),
            "activity at 50 s must push the deadline to 110 s"
        );
        tokio::time::sleep(Duration::from_secs(15)).await;
        let end = t.await.unwrap();
        assert_eq!(end.error.unwrap().kind(), io::ErrorKind::TimedOut);
        assert_eq!(end.up, 1);
    }
}
