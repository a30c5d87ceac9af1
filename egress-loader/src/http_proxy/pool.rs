//! Idle upstream connections, shared by all client connections and keyed by upstream address.
//!
//! A connection is checked out for one request and comes back only once its response body ended
//! cleanly, so idle clients hold no upstream connection and `Connection: close` clients reuse
//! them too. Bounded in total and per address; entries idle longer than [`IDLE_TIMEOUT`] are
//! dropped when met and by one periodic sweep (like squid's `server_idle_pconn_timeout`).
//!
//! Our own and not hyper-util's legacy `Client`, since that one connects by itself while upstream
//! connections must be made by [`crate::upstream::connect`] (bound to EGRESS_SOURCE).
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::body::ReqBody;

/// Most idle upstream connections kept, all addresses together.
pub const MAX_IDLE: usize = 256;
/// Most idle upstream connections kept to one address.
pub const MAX_IDLE_PER_ADDR: usize = 32;
/// Idle upstream connections older than this are closed (squid's `server_idle_pconn_timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a returned connection may take to become ready for its next request (hyper marks it
/// ready just after handing over the end of the response body, sometimes on another thread).
const READY_WAIT: Duration = Duration::from_millis(500);

/// A connection that may be idle in the pool.
pub trait Reusable {
    /// Open and able to take a request right now.
    fn is_ready(&self) -> bool;
}

impl<B> Reusable for SendRequest<B> {
    fn is_ready(&self) -> bool {
        SendRequest::is_ready(self)
    }
}

pub struct Limits {
    pub max_idle: usize,
    pub max_per_addr: usize,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_idle: MAX_IDLE,
            max_per_addr: MAX_IDLE_PER_ADDR,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

pub struct Pool<T> {
    limits: Limits,
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    /// Per address, oldest first: taken from the back (the most recently used connection, the
    /// one least likely to have been closed by the server), expired from the front.
    idle: HashMap<SocketAddr, VecDeque<(Instant, T)>>,
    total: usize,
}

impl<T: Reusable> Pool<T> {
    pub fn new(limits: Limits) -> Self {
        Pool {
            limits,
            inner: Mutex::new(Inner {
                idle: HashMap::new(),
                total: 0,
            }),
        }
    }

    /// Checks out the most recently returned live connection to `addr`, if any; expired and
    /// closed ones met on the way are dropped.
    pub fn take(&self, addr: SocketAddr) -> Option<T> {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let mut inner = self.inner.lock().unwrap();
        let Inner { idle, total } = &mut *inner;
        let list = idle.get_mut(&addr)?;
        let mut found = None;
        while let Some((since, conn)) = list.pop_back() {
            *total -= 1;
            if now.duration_since(since) >= self.limits.idle_timeout {
                // Everything older is expired too.
                *total -= list.len();
                dropped.push(conn);
                dropped.extend(list.drain(..).map(|(_, c)| c));
                break;
            }
            if conn.is_ready() {
                found = Some(conn);
                break;
            }
            dropped.push(conn);
        }
        if list.is_empty() {
            idle.remove(&addr);
        }
        drop(inner);
        // Closing connections outside the lock.
        drop(dropped);
        found
    }

    /// Puts `conn` back as idle; dropped (closed) instead when it is not ready or the pool is
    /// full. True when kept.
    pub fn put(&self, addr: SocketAddr, conn: T) -> bool {
        if !conn.is_ready() {
            return false;
        }
        let mut inner = self.inner.lock().unwrap();
        if inner.total >= self.limits.max_idle {
            return false;
        }
        let list = inner.idle.entry(addr).or_default();
        if list.len() >= self.limits.max_per_addr {
            return false;
        }
        list.push_back((Instant::now(), conn));
        inner.total += 1;
        true
    }

    /// Drops expired connections and those the server closed.
    pub fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.limits.idle_timeout;
        let mut dropped = Vec::new();
        let mut inner = self.inner.lock().unwrap();
        let Inner { idle, total } = &mut *inner;
        idle.retain(|_, list| {
            for (since, conn) in std::mem::take(list) {
                if now.duration_since(since) < timeout && conn.is_ready() {
                    list.push_back((since, conn));
                } else {
                    *total -= 1;
                    dropped.push(conn);
                }
            }
            !list.is_empty()
        });
        drop(inner);
        drop(dropped);
    }

    /// Idle connections held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().total
    }
}

/// The pool of the proxy's upstream connections.
pub type Upstreams = Pool<SendRequest<ReqBody>>;

/// Sweeps `pool` every half idle timeout until it is gone or `stop` fires: one task for the
/// whole pool, none per connection.
pub async fn sweep_until<T: Reusable>(pool: Weak<Pool<T>>, stop: CancellationToken) {
    let Some(every) = pool.upgrade().map(|p| p.limits.idle_timeout / 2) else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// An upstream connection checked out for one request and its response.
pub struct Lease {
    pool: Arc<Upstreams>,
    addr: SocketAddr,
    sender: SendRequest<ReqBody>,
}

impl Lease {
    pub fn new(pool: Arc<Upstreams>, addr: SocketAddr, sender: SendRequest<ReqBody>) -> Self {
        Lease { pool, addr, sender }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn sender(&mut self) -> &mut SendRequest<ReqBody> {
        &mut self.sender
    }

    /// The response body ended cleanly: offers the connection for the next request. Dropping a
    /// lease instead closes the connection (once hyper is done with it).
    pub fn release(self) {
        let Lease {
            pool,
            addr,
            mut sender,
        } = self;
        if sender.is_ready() {
            pool.put(addr, sender);
        } else if !sender.is_closed()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // Not ready yet: hyper is finishing the exchange (on another thread, or the request
            // body is still going up). A short task waits for it rather than losing it.
            rt.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                    pool.put(addr, sender);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A connection that is ready until its server "closes" it.
    #[derive(Clone)]
    struct Fake {
        id: u32,
        open: Arc<AtomicBool>,
    }

    impl Fake {
        fn new(id: u32) -> Self {
            Fake {
                id,
                open: Arc::new(AtomicBool::new(true)),
            }
        }
    }

    impl Reusable for Fake {
        fn is_ready(&self) -> bool {
            self.open.load(Ordering::Relaxed)
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 80))
    }

    fn pool(max_idle: usize, max_per_addr: usize) -> Pool<Fake> {
        Pool::new(Limits {
            max_idle,
            max_per_addr,
            idle_timeout: Duration::from_secs(60),
        })
    }

    #[test]
    fn checkout_is_exclusive_and_per_address() {
        let p = pool(10, 10);
        assert!(p.take(addr(1)).is_none());
        assert!(p.put(addr(1), Fake::new(1)));
        assert!(p.take(addr(2)).is_none(), "keyed by address");
        assert_eq!(p.take(addr(1)).map(|c| c.id), Some(1));
        assert!(p.take(addr(1)).is_none(), "checked out once only");
        assert_eq!(p.len(), 0);
        // Most recently returned first.
        p.put(addr(1), Fake::new(1));
        p.put(addr(1), Fake::new(2));
        assert_eq!(p.take(addr(1)).map(|c| c.id), Some(2));
        assert_eq!(p.take(addr(1)).map(|c| c.id), Some(1));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn caps_drop_extra_connections() {
        let p = pool(3, 2);
        assert!(p.put(addr(1), Fake::new(1)));
        assert!(p.put(addr(1), Fake::new(2)));
        assert!(!p.put(addr(1), Fake::new(3)), "per-address cap");
        assert!(p.put(addr(2), Fake::new(4)));
        assert!(!p.put(addr(3), Fake::new(5)), "total cap");
        assert_eq!(p.len(), 3);
        p.take(addr(2));
        assert!(p.put(addr(3), Fake::new(5)), "room again");
    }

    #[test]
    fn closed_connections_are_skipped_and_not_kept() {
        let p = pool(10, 10);
        let closed = Fake::new(9);
        closed.open.store(false, Ordering::Relaxed);
        assert!(!p.put(addr(1), closed.clone()));
        let a = Fake::new(1);
        let b = Fake::new(2);
        p.put(addr(1), a);
        p.put(addr(1), b.clone());
        b.open.store(false, Ordering::Relaxed);
        assert_eq!(
            p.take(addr(1)).map(|c| c.id),
            Some(1),
            "the closed one skipped"
        );
        assert_eq!(p.len(), 0);

        let c = Fake::new(3);
        p.put(addr(1), c.clone());
        p.put(addr(2), Fake::new(4));
        c.open.store(false, Ordering::Relaxed);
        p.sweep();
        assert_eq!(p.len(), 1);
        assert!(p.take(addr(1)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout() {
        let p = pool(10, 10);
        p.put(addr(1), Fake::new(1));
        p.put(addr(2), Fake::new(2));
        tokio::time::advance(Duration::from_secs(30)).await;
        p.put(addr(1), Fake::new(3));
        p.put(addr(2), Fake::new(4));
        tokio::time::advance(Duration::from_secs(31)).await;
        // Found on checkout: the fresh one is taken, then the expired one goes with the next.
        assert_eq!(p.take(addr(1)).map(|c| c.id), Some(3));
        assert!(p.take(addr(1)).is_none());
        // Swept.
        assert_eq!(p.len(), 2);
        p.sweep();
        assert_eq!(p.len(), 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        p.sweep();
        assert_eq!(p.len(), 0);
        assert!(p.take(addr(2)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_runs_until_the_pool_is_gone() {
        let p = Arc::new(pool(10, 10));
        p.put(addr(1), Fake::new(1));
        let task = tokio::spawn(sweep_until(Arc::downgrade(&p), CancellationToken::new()));
        tokio::time::sleep(Duration::from_secs(91)).await;
        assert_eq!(p.len(), 0);
        drop(p);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(task.is_finished());
    }
}
