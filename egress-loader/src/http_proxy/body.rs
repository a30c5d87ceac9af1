//! Bodies passed through the proxy (streamed frame by frame, never buffered whole) and the
//! per-request debug log line, written when the response body ends.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::{
    Method, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
};

use prometheus_client::metrics::counter::Counter;

use super::pool::Lease;

/// What the proxy answers with: the upstream's body, or a short text of its own.
pub struct ResBody {
    inner: Inner,
    log: Option<Box<RequestLog>>,
    /// The upstream connection the body comes from: back to the pool if the body ends cleanly.
    lease: Option<Lease>,
    /// Counts the upstream's body bytes (the proxy's own texts are not counted).
    bytes: Option<Counter>,
    /// The body ended (`None` seen) or failed.
    ended: bool,
    failed: bool,
}

enum Inner {
    Upstream(Incoming),
    Text(Option<Bytes>),
}

impl ResBody {
    pub fn upstream(
        body: Incoming,
        log: Option<Box<RequestLog>>,
        lease: Option<Lease>,
        bytes: Counter,
    ) -> Self {
        ResBody {
            inner: Inner::Upstream(body),
            log,
            lease,
            bytes: Some(bytes),
            ended: false,
            failed: false,
        }
    }

    pub fn text(text: impl Into<Bytes>, log: Option<Box<RequestLog>>) -> Self {
        let text = text.into();
        ResBody {
            inner: Inner::Text((!text.is_empty()).then_some(text)),
            log,
            lease: None,
            bytes: None,
            ended: false,
            failed: false,
        }
    }
}

impl Drop for ResBody {
    /// hyper drops the body once it is sent in full (often without polling it to `None`: it asks
    /// `is_end_stream`), or when the client went away.
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && !self.failed
            && (self.ended || self.is_end_stream())
        {
            lease.release();
        }
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = match &mut this.inner {
            Inner::Upstream(body) => std::task::ready!(Pin::new(body).poll_frame(cx)),
            Inner::Text(text) => text.take().map(|t| Ok(Frame::data(t))),
        };
        match &frame {
            None => this.ended = true,
            Some(Err(_)) => this.failed = true,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(log) = &mut this.log {
                        log.down += data.len() as u64;
                    }
                    if let Some(bytes) = &this.bytes {
                        bytes.inc_by(data.len() as u64);
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Text(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Text(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

/// A client's request body on its way upstream; counts its bytes (`bytes`, and for the debug
/// log `count`).
pub struct ReqBody {
    inner: Incoming,
    count: Option<Arc<AtomicU64>>,
    bytes: Counter,
}

impl ReqBody {
    pub fn new(inner: Incoming, count: Option<Arc<AtomicU64>>, bytes: Counter) -> Self {
        ReqBody {
            inner,
            count,
            bytes,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            self.bytes.inc_by(data.len() as u64);
            if let Some(count) = &self.count {
                count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One line per request, logged when dropped (when the response body has been sent, or the
/// client went away).
pub struct RequestLog {
    pub client: SocketAddr,
    pub method: Method,
    pub target: String,
    pub rule: String,
    pub status: StatusCode,
    pub start: Instant,
    /// Request body bytes, counted as they go upstream.
    pub up: Option<Arc<AtomicU64>>,
    /// Response body bytes.
    pub down: u64,
    /// Why the proxy answered itself, if it did.
    pub reason: Option<String>,
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let up = self.up.as_ref().map_or(0, |c| c.load(Ordering::Relaxed));
        tracing::info!(
            client = %self.client,
            method = %self.method,
            request_target = %self.target,
            rule = %self.rule,
            status = self.status.as_u16(),
            bytes_up = up,
            bytes_down = self.down,
            duration_ms = self.start.elapsed().as_secs_f64() * 1e3,
            reason = self.reason.as_deref().unwrap_or(""),
            "http-proxy request"
        );
    }
}
