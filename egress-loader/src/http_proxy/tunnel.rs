//! CONNECT tunnels: bytes copied both ways until both sides finish, or nothing moves for the
//! idle timeout.
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

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// How a tunnel ended.
#[derive(Debug)]
pub struct TunnelEnd {
    /// Bytes client to upstream, upstream to client.
    pub up: u64,
    pub down: u64,
    /// None: both sides closed. Some: an error or the idle timeout.
    pub error: Option<io::Error>,
}

/// Copies between `client` and `upstream` until both directions are done; gives up when no byte
/// has moved either way for `idle`.
pub async fn run<C, U>(client: C, upstream: U, idle: Duration) -> TunnelEnd
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
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r.err(),
        () = activity.idle_for(idle) => Some(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("tunnel idle for {idle:?}"),
        )),
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (mut c, c_far) = tokio::io::duplex(64);
        let (mut u, u_far) = tokio::io::duplex(64);
        let t = tokio::spawn(run(c_far, u_far, Duration::from_secs(5)));
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
        let t = tokio::spawn(run(c_far, u_far, Duration::from_secs(60)));
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
