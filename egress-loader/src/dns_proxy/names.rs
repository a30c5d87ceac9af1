//! Destinations: the current address set of each configured target, kept by one small task per
//! DNS name, and the choice of an address for each connection.
//!
//! A watcher task owns a `watch::Sender<Addrs>`: it resolves the name, publishes the answer, sleeps
//! for the answer's TTL (clamped to a floor and a ceiling) and starts again. Listeners only read the
//! latest value. Address targets get a channel holding their one address and no task.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_resolver::TokioResolver;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    metrics::dns::{NameMetrics, Resolution},
    protected::Protected,
};

/// What is known about a target's addresses right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addrs {
    /// The first lookup has not answered yet.
    Pending,
    /// The current address set (sorted, not empty).
    Ready(Arc<[IpAddr]>),
    /// The name does not resolve; the reason, for logs.
    Failed(Arc<str>),
}

/// How long an answer is used, and how long a previous answer is kept while the DNS server does
/// not answer at all (timeouts, refusals: not NXDOMAIN or an empty answer, which count at once).
#[derive(Clone, Copy, Debug)]
pub struct Refresh {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub stale_hold: Duration,
}

/// How often a name that keeps failing is logged again.
const FAILING_LOG_EVERY: Duration = Duration::from_secs(60);

/// Removes from `addrs` those the proxy does not reach through a name (the router pod's own,
/// loopback, link-local: only a rule with the address itself reaches them); returns why the
/// first was removed, for the log.
fn unprotected(name: &str, addrs: &mut Vec<IpAddr>, protected: &Protected) -> Option<String> {
    let mut first = None;
    addrs.retain(|&ip| match protected.admits(ip, None) {
        Ok(()) => true,
        Err(p) => {
            first.get_or_insert_with(|| {
                format!(
                    "{name} resolves to {ip}, {p}: no connection is made to it (a rule with \
                     the address instead of the name would)"
                )
            });
            false
        }
    });
    first
}

/// A channel that always holds `addr`.
pub fn fixed(addr: IpAddr) -> watch::Receiver<Addrs> {
    let (tx, rx) = watch::channel(Addrs::Ready(Arc::from([addr])));
    // The value never changes; keeping the sender alive is not needed for `borrow`.
    drop(tx);
    rx
}

/// Starts the watcher of `name`, counting its lookups in `metrics`; it stops when every
/// receiver is gone.
pub fn watch_name(
    resolver: TokioResolver,
    name: String,
    refresh: Refresh,
    metrics: NameMetrics,
    protected: Arc<Protected>,
) -> (watch::Receiver<Addrs>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Addrs::Pending);
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = watcher(&resolver, &name, refresh, &tx, &metrics, &protected) => {}
            _ = tx.closed() => {}
        }
    });
    (rx, task)
}

async fn watcher(
    resolver: &TokioResolver,
    name: &str,
    refresh: Refresh,
    tx: &watch::Sender<Addrs>,
    metrics: &NameMetrics,
    protected: &Protected,
) {
    let mut last_ok: Option<Instant> = None;
    // Since when the name has been failing, and when that was last logged.
    let mut failing: Option<(Instant, Instant)> = None;
    loop {
        let result = resolver.lookup_ip(name).await;
        let now = Instant::now();
        let (next, wait) = match result {
            Ok(lookup) => {
                let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                addrs.sort();
                addrs.dedup();
                let ttl = lookup.valid_until().saturating_duration_since(now);
                let refused = unprotected(name, &mut addrs, protected);
                if addrs.is_empty()
                    && let Some(why) = refused
                {
                    metrics.resolved(Resolution::Ok);
                    (
                        Err(why),
                        ttl.clamp(refresh.min_ttl, refresh.max_ttl.max(refresh.min_ttl)),
                    )
                } else if addrs.is_empty() {
                    metrics.resolved(Resolution::NoAddresses);
                    (
                        Err("no addresses in the answer".to_string()),
                        refresh.min_ttl,
                    )
                } else {
                    metrics.resolved(Resolution::Ok);
                    (
                        Ok((addrs, refused)),
                        ttl.clamp(refresh.min_ttl, refresh.max_ttl.max(refresh.min_ttl)),
                    )
                }
            }
            Err(e) if e.is_nx_domain() => {
                metrics.resolved(Resolution::NxDomain);
                (
                    Err("NXDOMAIN (the name does not exist)".to_string()),
                    refresh.min_ttl,
                )
            }
            Err(e) if e.is_no_records_found() => {
                metrics.resolved(Resolution::NoAddresses);
                (
                    Err("no IPv4 address (empty answer)".to_string()),
                    refresh.min_ttl,
                )
            }
            Err(e) => {
                let keep = last_ok.is_some_and(|t| now.duration_since(t) < refresh.stale_hold)
                    && matches!(*tx.borrow(), Addrs::Ready(_));
                metrics.resolved(if keep {
                    Resolution::FailedKeptPrevious
                } else {
                    Resolution::Failed
                });
                if keep {
                    warn!(
                        name,
                        error = %e,
                        "DNS lookup failed; keeping the previous addresses for now"
                    );
                    tokio::time::sleep(refresh.min_ttl).await;
                    continue;
                }
                (Err(e.to_string()), refresh.min_ttl)
            }
        };
        match next {
            Ok((addrs, refused)) => {
                last_ok = Some(now);
                if let Some((since, _)) = failing.take() {
                    info!(
                        name,
                        addresses = ?addrs,
                        after = ?now.duration_since(since),
                        "name resolves again"
                    );
                }
                let addrs: Arc<[IpAddr]> = addrs.into();
                tx.send_if_modified(|cur| {
                    let old = match cur {
                        Addrs::Ready(old) if *old == addrs => return false,
                        Addrs::Ready(old) => Some(old.clone()),
                        Addrs::Pending | Addrs::Failed(_) => None,
                    };
                    if let Some(why) = &refused {
                        warn!(name, "{why}");
                    }
                    match old {
                        Some(old) => info!(
                            name,
                            old = ?old,
                            new = ?addrs,
                            "name re-resolved: its addresses changed"
                        ),
                        None => info!(name, addresses = ?addrs, "name resolved"),
                    }
                    *cur = Addrs::Ready(addrs.clone());
                    true
                });
            }
            Err(reason) => {
                match &mut failing {
                    None => {
                        warn!(
                            name,
                            error = %reason,
                            "name does not resolve; its connections are refused until it does"
                        );
                        failing = Some((now, now));
                    }
                    Some((since, logged)) if now.duration_since(*logged) >= FAILING_LOG_EVERY => {
                        warn!(
                            name,
                            error = %reason,
                            failing_for = ?now.duration_since(*since),
                            "name still does not resolve; its connections are refused"
                        );
                        *logged = now;
                    }
                    Some(_) => {}
                }
                let reason: Arc<str> = reason.into();
                tx.send_if_modified(|cur| {
                    if matches!(cur, Addrs::Failed(old) if *old == reason) {
                        return false;
                    }
                    *cur = Addrs::Failed(reason.clone());
                    true
                });
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// Why no upstream address can be offered.
#[derive(Debug, Clone)]
pub enum Unavailable {
    /// The first lookup did not answer within the wait.
    Pending,
    Failed(Arc<str>),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Pending => f.write_str("name not resolved yet"),
            Unavailable::Failed(r) => write!(f, "name does not resolve: {r}"),
        }
    }
}

/// One `<target> <remoteport>` destination: spreads connections over the current addresses and
/// skips, for `holdoff`, an address that failed to connect while others exist.
pub struct Destination {
    /// `name:port` or `ip:port`, for logs.
    pub label: String,
    port: u16,
    addrs: watch::Receiver<Addrs>,
    next: AtomicUsize,
    /// Addresses that failed to connect, and until when they are tried last.
    held: Mutex<HashMap<IpAddr, Instant>>,
    holdoff: Duration,
}

impl Destination {
    pub fn new(label: String, port: u16, addrs: watch::Receiver<Addrs>, holdoff: Duration) -> Self {
        Destination {
            label,
            port,
            addrs,
            next: AtomicUsize::new(0),
            held: Mutex::new(HashMap::new()),
            holdoff,
        }
    }

    /// The addresses to try for one connection, best first: the working addresses in round-robin
    /// order, then the held-off ones (soonest released first). Waits up to `wait` for the first
    /// answer of a name.
    pub async fn candidates(&self, wait: Duration) -> Result<Vec<SocketAddr>, Unavailable> {
        let mut rx = self.addrs.clone();
        if *rx.borrow() == Addrs::Pending {
            // Timeout, or the sender gone (the proxy is stopping): take what is there.
            let _ = tokio::time::timeout(wait, async {
                let _ = rx.wait_for(|a| *a != Addrs::Pending).await;
            })
            .await;
        }
        let current = rx.borrow().clone();
        let list = match current {
            Addrs::Ready(list) => list,
            Addrs::Pending => return Err(Unavailable::Pending),
            Addrs::Failed(r) => return Err(Unavailable::Failed(r)),
        };
        Ok(self.order(&list, Instant::now()))
    }

    fn order(&self, list: &[IpAddr], now: Instant) -> Vec<SocketAddr> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let mut held: Vec<(Instant, IpAddr)> = Vec::new();
        let mut good: Vec<IpAddr> = Vec::with_capacity(list.len());
        {
            let mut map = self.held.lock().unwrap();
            map.retain(|_, until| *until > now);
            for ip in list {
                match map.get(ip) {
                    Some(until) => held.push((*until, *ip)),
                    None => good.push(*ip),
                }
            }
        }
        if !good.is_empty() {
            let k = turn % good.len();
            good.rotate_left(k);
        }
        held.sort();
        good.into_iter()
            .chain(held.into_iter().map(|(_, ip)| ip))
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect()
    }

    /// `addr` failed to connect: try it last for a while.
    pub fn hold_off(&self, addr: IpAddr) {
        let until = Instant::now() + self.holdoff;
        self.held.lock().unwrap().insert(addr, until);
    }

    /// `addr` connected: stop holding it off.
    pub fn release(&self, addr: IpAddr) {
        let mut map = self.held.lock().unwrap();
        if !map.is_empty() {
            map.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn dest(list: &[&str]) -> Destination {
        let (tx, rx) = watch::channel(Addrs::Ready(ips(list).into()));
        std::mem::forget(tx);
        Destination::new("t".into(), 80, rx, Duration::from_secs(10))
    }

    #[test]
    fn round_robin_over_all() {
        let d = dest(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let list = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let firsts: Vec<IpAddr> = (0..6)
            .map(|_| d.order(&list, Instant::now())[0].ip())
            .collect();
        assert_eq!(firsts[..3], list[..]);
        assert_eq!(firsts[3..], list[..]);
        // Every attempt list holds every address once.
        assert_eq!(d.order(&list, Instant::now()).len(), 3);
    }

    #[test]
    fn held_off_address_goes_last() {
        let d = dest(&[]);
        let list = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        d.hold_off(list[1]);
        for _ in 0..6 {
            let order = d.order(&list, Instant::now());
            assert_eq!(order[2].ip(), list[1]);
        }
        // The two others still alternate.
        let a = d.order(&list, Instant::now())[0].ip();
        let b = d.order(&list, Instant::now())[0].ip();
        assert_ne!(a, b);
        // After the hold-off it is back in the rotation.
        let later = Instant::now() + Duration::from_secs(11);
        let firsts: Vec<IpAddr> = (0..3).map(|_| d.order(&list, later)[0].ip()).collect();
        assert!(firsts.contains(&list[1]));
        d.hold_off(list[0]);
        d.release(list[0]);
        assert!(!d.held.lock().unwrap().contains_key(&list[0]));
    }

    #[test]
    fn all_held_still_tried() {
        let d = dest(&[]);
        let list = ips(&["10.0.0.1", "10.0.0.2"]);
        d.hold_off(list[0]);
        d.hold_off(list[1]);
        let order = d.order(&list, Instant::now());
        assert_eq!(order.len(), 2);
        assert_eq!(order[0].ip(), list[0], "soonest released first");
    }

    #[tokio::test]
    async fn fixed_is_ready() {
        let d = Destination::new(
            "x".into(),
            443,
            fixed("192.0.2.1".parse().unwrap()),
            Duration::from_secs(1),
        );
        let c = d.candidates(Duration::from_millis(1)).await.unwrap();
        assert_eq!(c, vec!["192.0.2.1:443".parse().unwrap()]);
    }
}
