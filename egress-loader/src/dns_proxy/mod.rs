//! DNS proxy mode (SPEC section 5): one TCP listener per EGRESS_DNS_PROXY_DESTINATION line, each
//! accepted connection forwarded from EGRESS_SOURCE to the line's address or DNS name.
//!
//! Layout:
//! - [`names`]: one small task per DNS name keeps its current address set in a watch channel
//!   (re-resolved as the TTL runs out, within a floor and a ceiling); a [`names::Destination`]
//!   spreads connections round robin over the current set and holds off addresses that failed.
//! - [`crate::relay`]: the bytes of one connection: small chunks copied, bulk data spliced
//!   through pipes lent by a bounded pool, half-close, idle timeout.
//! - here: options, listeners, the per-connection task, drain on shutdown.
//!
//! A connection is a tokio task; nothing blocks a thread. A name that does not resolve only makes
//! its own listener reset connections (logged, rate-limited) until it resolves.
pub mod names;

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

pub use crate::relay::Engine;
use names::{Addrs, Destination, Refresh};

use crate::{
    config::{Config, DnsTarget},
    listener,
    metrics::{
        self, Health, MetricsOptions, Role,
        dns::{DnsMetrics, LineMetrics, NameMetrics},
    },
    protected::Protected,
    ratelimit::RateLimit,
    relay,
    resolver::ResolverOptions,
    upstream,
};

/// Settings of the DNS proxy beyond the OpenShift contract. Durations take `ms`, `s`, `m` or `h`
/// suffixes (a bare number is seconds).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct DnsProxyOptions {
    /// Address the DNS proxy listeners bind to (each on its rule's local port).
    #[arg(
        id = "dns_proxy_listen_address",
        long = "dns-proxy-listen-address",
        env = "EGRESS_DNS_PROXY_LISTEN_ADDRESS",
        value_name = "IP",
        default_value = "0.0.0.0"
    )]
    pub listen_address: IpAddr,
    /// Time allowed to connect to a destination address.
    #[arg(
        id = "dns_proxy_connect_timeout",
        long = "dns-proxy-connect-timeout",
        env = "EGRESS_DNS_PROXY_CONNECT_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = crate::duration::parse_duration
    )]
    pub connect_timeout: Duration,
    /// A proxied connection with no byte either way for this long is closed.
    #[arg(
        id = "dns_proxy_idle_timeout",
        long = "dns-proxy-idle-timeout",
        env = "EGRESS_DNS_PROXY_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "1m",
        value_parser = crate::duration::parse_duration
    )]
    pub idle_timeout: Duration,
    /// A name is re-resolved when its TTL runs out, but never sooner than this...
    #[arg(
        id = "dns_proxy_min_ttl",
        long = "dns-proxy-min-ttl",
        env = "EGRESS_DNS_PROXY_MIN_TTL",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = crate::duration::parse_duration
    )]
    pub min_ttl: Duration,
    /// ...and never later than this (OpenShift's HAProxy held answers for 10 s).
    #[arg(
        id = "dns_proxy_max_ttl",
        long = "dns-proxy-max-ttl",
        env = "EGRESS_DNS_PROXY_MAX_TTL",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = crate::duration::parse_duration
    )]
    pub max_ttl: Duration,
    /// When the DNS server does not answer (timeout, SERVFAIL), the last answer is kept this long
    /// after it was obtained. NXDOMAIN or an empty answer count at once.
    #[arg(
        id = "dns_proxy_stale_hold",
        long = "dns-proxy-stale-hold",
        env = "EGRESS_DNS_PROXY_STALE_HOLD",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = crate::duration::parse_duration
    )]
    pub stale_hold: Duration,
    /// An address that failed to connect is tried last for this long, when others exist.
    #[arg(
        id = "dns_proxy_holdoff",
        long = "dns-proxy-holdoff",
        env = "EGRESS_DNS_PROXY_HOLDOFF",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = crate::duration::parse_duration
    )]
    pub holdoff: Duration,
    /// On SIGTERM: stop accepting, then let open connections finish for up to this long.
    #[arg(
        id = "dns_proxy_drain_timeout",
        long = "dns-proxy-drain-timeout",
        env = "EGRESS_DNS_PROXY_DRAIN_TIMEOUT",
        value_name = "DURATION",
        default_value = "20s",
        value_parser = crate::duration::parse_duration
    )]
    pub drain_timeout: Duration,
    /// How bytes are moved: auto (copy small chunks, splice bulk data), splice (zero-copy through
    /// a pipe, always) or copy (user-space buffer, always).
    #[arg(
        id = "dns_proxy_engine",
        long = "dns-proxy-engine",
        env = "EGRESS_DNS_PROXY_ENGINE",
        value_name = "ENGINE",
        value_enum,
        default_value_t = Engine::default()
    )]
    pub engine: Engine,
    /// For splicing: at most this many 1 MiB pipes, shared by all connections and held only while
    /// data is in flight (their capacity counts against the user's fs.pipe-user-pages-soft, 64 MiB
    /// by default, shared by every process of the same uid). When all are busy, chunks are copied.
    #[arg(
        id = "dns_proxy_max_pipes",
        long = "dns-proxy-max-pipes",
        env = "EGRESS_DNS_PROXY_MAX_PIPES",
        value_name = "N",
        default_value_t = relay::DEFAULT_MAX_PIPES
    )]
    pub max_pipes: usize,
    /// Destinations reached only through an address rule that names them. None (always, from
    /// the command line): this network namespace's own addresses, loopback and link-local.
    /// In-process tests whose servers are on loopback set their own.
    #[arg(skip)]
    pub protected: Option<Protected>,
}

impl Default for DnsProxyOptions {
    fn default() -> Self {
        DnsProxyOptions {
            listen_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(10),
            stale_hold: Duration::from_secs(30),
            holdoff: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(20),
            engine: Engine::default(),
            max_pipes: relay::DEFAULT_MAX_PIPES,
            protected: None,
        }
    }
}

/// Runs the DNS proxy on the proxy threads `workers` until SIGTERM (or SIGINT), then drains;
/// metrics and health probes on `metrics_opts`' listener meanwhile (ready once every listener is
/// bound and every name has resolved once).
pub async fn run(
    cfg: &Config,
    opts: &DnsProxyOptions,
    resolver: &ResolverOptions,
    metrics_opts: &MetricsOptions,
    workers: &[Handle],
) -> Result<()> {
    crate::listener::raise_fd_limit();
    let shutdown = crate::shutdown::on_signal()?;
    let mut registry = metrics::registry(Role::DnsProxy);
    let counters = DnsMetrics::new(&mut registry, cfg.dns.as_deref().unwrap_or_default());
    let health = Health::new("the DNS proxy listeners are not bound yet");
    metrics::listen(
        metrics_opts.address(|port| metrics::port_taken(cfg, None, port))?,
        registry,
        health.clone(),
        &shutdown,
    )?;
    let proxy = DnsProxy::bind(cfg, opts, resolver, counters, workers).await?;
    let names = proxy.names.clone();
    health.ready_when(move || unresolved(&names));
    proxy.serve(shutdown.cancelled_owned()).await
}

/// Err naming the names that have not resolved yet.
fn unresolved(names: &[(String, Vec<usize>, NameMetrics)]) -> Result<(), String> {
    let missing: Vec<String> = names
        .iter()
        .filter(|(_, _, m)| !m.ever_resolved())
        .map(|(name, lines, _)| format!("{name} (line {})", join(lines)))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "EGRESS_DNS_PROXY_DESTINATION names not resolved yet: {}",
            missing.join(", ")
        ))
    }
}

fn join(lines: &[usize]) -> String {
    let v: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    v.join(", ")
}

/// The proxy with its listeners bound and its name watchers started, not yet accepting.
pub struct DnsProxy {
    /// Per rule: one listening socket for each of `workers`, its destination, its counters.
    listeners: Vec<(Vec<std::net::TcpListener>, Arc<Destination>, LineMetrics)>,
    /// The proxy threads (`crate::workers`) that accept and serve the connections.
    workers: Vec<Handle>,
    /// Each name, the lines that use it, its lookups.
    names: Vec<(String, Vec<usize>, NameMetrics)>,
    watchers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    drain_timeout: Duration,
    stop_tx: watch::Sender<bool>,
}

/// What every connection task needs.
struct Shared {
    source: IpAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    engine: Engine,
    pipes: relay::PipePool,
    /// Connections open at once (two sockets each), within the open-files limit.
    budget: listener::Budget,
    debug: bool,
    /// Turns true when the drain time is over: open connections end.
    stop: watch::Receiver<bool>,
    active: AtomicUsize,
}

impl DnsProxy {
    /// Binds one listener per rule and proxy thread of `workers` on `opts.listen_address` and
    /// starts resolving names, counting in `metrics`.
    pub async fn bind(
        cfg: &Config,
        opts: &DnsProxyOptions,
        resolver_opts: &ResolverOptions,
        metrics: DnsMetrics,
        workers: &[Handle],
    ) -> Result<DnsProxy> {
        let rules = match &cfg.dns {
            Some(rules) if !rules.is_empty() => rules,
            _ => bail!("EGRESS_DNS_PROXY_DESTINATION has no rules"),
        };
        let refresh = Refresh {
            min_ttl: opts.min_ttl,
            max_ttl: opts.max_ttl,
            stale_hold: opts.stale_hold,
        };
        let resolver = if rules.iter().any(|r| matches!(r.target, DnsTarget::Name(_))) {
            Some(
                crate::resolver::build_with(resolver_opts, |o| {
                    // This proxy keeps its own answers (the watch channels) and re-asks on its own
                    // schedule, so hickory's cache would only serve stale data.
                    o.cache_size = 0;
                    // Connections leave from EGRESS_SOURCE, an IPv4 address.
                    o.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4Only;
                })
                .context("DNS proxy resolver")?,
            )
        } else {
            None
        };

        let protected = Arc::new(match &opts.protected {
            Some(p) => p.clone(),
            None => Protected::of_this_namespace().context("listing this pod's addresses")?,
        });
        let mut watchers = Vec::new();
        let mut names: HashMap<String, watch::Receiver<Addrs>> = HashMap::new();
        let mut name_lines: Vec<(String, Vec<usize>, NameMetrics)> = Vec::new();
        // Rules with the same target and remote port share one destination (rotation, hold-offs).
        let mut dests: HashMap<(String, u16), Arc<Destination>> = HashMap::new();
        let mut listeners = Vec::new();
        for rule in rules {
            let dest = dests
                .entry((target_key(&rule.target), rule.remote_port))
                .or_insert_with(|| {
                    let (label, addrs) = match &rule.target {
                        DnsTarget::Addr(ip) => {
                            if ip.is_ipv6() {
                                warn!(
                                    line = rule.line,
                                    "IPv6 destination {ip}: connections leave only from EGRESS_SOURCE (IPv4), so every connection to this rule is refused"
                                );
                            }
                            (
                                SocketAddr::new(*ip, rule.remote_port).to_string(),
                                names::fixed(*ip),
                            )
                        }
                        DnsTarget::Name(name) => {
                            let rx = names.entry(name.clone()).or_insert_with(|| {
                                let resolver = resolver.clone().expect("resolver built for names");
                                let (rx, task) = names::watch_name(
                                    resolver,
                                    name.clone(),
                                    refresh,
                                    metrics.name(name),
                                    protected.clone(),
                                );
                                watchers.push(task);
                                rx
                            });
                            (format!("{name}:{}", rule.remote_port), rx.clone())
                        }
                    };
                    Arc::new(Destination::new(label, rule.remote_port, addrs, opts.holdoff))
                })
                .clone();
            let addr = SocketAddr::new(opts.listen_address, rule.local_port);
            let listener =
                crate::listener::listen_each(addr, 1024, workers.len()).with_context(|| {
                    format!(
                        "listening on {addr} (EGRESS_DNS_PROXY_DESTINATION line {})",
                        rule.line
                    )
                })?;
            info!(listen = %addr, to = %dest.label, line = rule.line, "DNS proxy rule");
            if let DnsTarget::Name(name) = &rule.target {
                metrics.watch(rule.line, name, names[name].clone());
                match name_lines.iter_mut().find(|(n, _, _)| n == name) {
                    Some((_, lines, _)) => lines.push(rule.line),
                    None => name_lines.push((name.clone(), vec![rule.line], metrics.name(name))),
                }
            }
            listeners.push((listener, dest, metrics.line(rule.line)));
        }
        let (stop_tx, stop) = watch::channel(false);
        Ok(DnsProxy {
            listeners,
            workers: workers.to_vec(),
            names: name_lines,
            watchers,
            shared: Arc::new(Shared {
                source: IpAddr::V4(cfg.source.addr),
                connect_timeout: opts.connect_timeout,
                idle_timeout: opts.idle_timeout,
                engine: opts.engine,
                pipes: relay::PipePool::new(opts.max_pipes),
                // A pipe is two descriptors; each proxy thread may hold one accepted
                // connection while it waits for a share.
                budget: listener::Budget::of_fd_limit(
                    2,
                    2 * opts.max_pipes as u64 + workers.len() as u64,
                ),
                debug: cfg.dns_debug,
                stop,
                active: AtomicUsize::new(0),
            }),
            drain_timeout: opts.drain_timeout,
            stop_tx,
        })
    }

    /// The bound listener addresses, in rule order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _, _)| l.first()?.local_addr().ok())
            .collect()
    }

    /// Accepts and forwards until `shutdown` completes; then closes the listeners and lets open
    /// connections finish for up to the drain timeout before cutting them.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        info!(
            connections = self.shared.budget.connections(),
            "DNS proxy: connections open at once, as many as the open-files limit has room for"
        );
        let (accept_stop_tx, accept_stop) = watch::channel(false);
        // Every connection task holds a clone; recv() returns None once they are all gone.
        let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
        let mut accepters: Vec<JoinHandle<()>> = Vec::new();
        for (listeners, dest, line) in self.listeners {
            // A line's log limits are the line's, whichever thread logs.
            let limits = Arc::new(Limits::new());
            for (listener, worker) in listeners.into_iter().zip(&self.workers) {
                let (dest, line, shared) = (dest.clone(), line.clone(), self.shared.clone());
                let (limits, stop, drain) = (limits.clone(), accept_stop.clone(), drain_tx.clone());
                // Registered with the worker's own runtime, where its connections then run.
                accepters.push(worker.spawn(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => accept_loop(l, dest, line, limits, shared, stop, drain).await,
                        Err(e) => {
                            warn!(error = %e, "DNS proxy: a listener could not be registered")
                        }
                    }
                }));
            }
        }
        drop(drain_tx);

        shutdown.await;
        let _ = accept_stop_tx.send(true);
        for a in accepters {
            let _ = a.await;
        }
        let open = self.shared.active.load(Ordering::Relaxed);
        info!(
            open,
            drain = ?self.drain_timeout,
            "DNS proxy stopped accepting; draining open connections"
        );
        if tokio::time::timeout(self.drain_timeout, drain_rx.recv())
            .await
            .is_err()
        {
            let left = self.shared.active.load(Ordering::Relaxed);
            warn!(left, "drain time over; closing the remaining connections");
            let _ = self.stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), drain_rx.recv()).await;
        }
        for w in self.watchers {
            w.abort();
        }
        info!("DNS proxy stopped");
        Ok(())
    }
}

fn target_key(t: &DnsTarget) -> String {
    match t {
        DnsTarget::Addr(ip) => ip.to_string(),
        DnsTarget::Name(n) => n.clone(),
    }
}

async fn accept_loop(
    listener: TcpListener,
    dest: Arc<Destination>,
    line: LineMetrics,
    limits: Arc<Limits>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        // Accepted first, then given its share (see the HTTP proxy's accept loop: each proxy
        // thread has its own listener); the budget keeps a descriptor for each thread's one.
        let (client, peer) = tokio::select! {
            _ = stopped(&mut stop) => return,
            c = listener::accept(&listener, &limits.accept, "DNS proxy") => c,
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            share = shared.budget.take(&limits.accept, "DNS proxy", port) => {
                let (dest, shared, limits, guard, line) =
                    (dest.clone(), shared.clone(), limits.clone(), drain.clone(), line.clone());
                tokio::spawn(async move {
                    let _share = share;
                    let _open = line.accepted();
                    shared.active.fetch_add(1, Ordering::Relaxed);
                    handle(client, peer, port, &dest, &shared, &limits, &line).await;
                    shared.active.fetch_sub(1, Ordering::Relaxed);
                    drop(guard);
                });
            }
        }
    }
}

/// The log limits of a line: refused and failed connections, failed accepts.
struct Limits {
    rejected: RateLimit,
    failed: RateLimit,
    accept: RateLimit,
}

impl Limits {
    fn new() -> Limits {
        let every = Duration::from_secs(10);
        Limits {
            rejected: RateLimit::new(every),
            failed: RateLimit::new(every),
            accept: RateLimit::new(every),
        }
    }
}

/// At most this many addresses are tried for one connection.
const MAX_ATTEMPTS: usize = 3;

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    dest: &Destination,
    shared: &Shared,
    limits: &Limits,
    line: &LineMetrics,
) {
    let started = Instant::now();
    let log_end = |upstream: Option<SocketAddr>, t: (u64, u64, u64), end: &str| {
        if shared.debug {
            let upstream = upstream.map_or_else(|| "-".to_string(), |a| a.to_string());
            let (sent, received, spliced) = t;
            info!(
                "conn client={peer} port={port} dest={} upstream={upstream} sent={sent} received={received} spliced={spliced} duration={:.3}s end={end}",
                dest.label,
                started.elapsed().as_secs_f64(),
            );
        }
    };

    let candidates = match dest.candidates(shared.connect_timeout).await {
        Ok(c) => c,
        Err(why) => {
            line.unresolved();
            if let Some(n) = limits.rejected.check() {
                warn!(
                    port,
                    dest = %dest.label,
                    suppressed = n,
                    "connection refused: {why}"
                );
            }
            reset(&client);
            log_end(None, (0, 0, 0), &format!("refused: {why}"));
            return;
        }
    };

    let mut last_err = None;
    let mut upstream = None;
    for addr in candidates.into_iter().take(MAX_ATTEMPTS) {
        match upstream::connect(Some(shared.source), addr, shared.connect_timeout).await {
            Ok(s) => {
                dest.release(addr.ip());
                upstream = Some((s, addr));
                break;
            }
            Err(e) => {
                debug!(dest = %dest.label, %addr, error = %e, "connect failed");
                dest.hold_off(addr.ip());
                last_err = Some((addr, e));
            }
        }
    }
    let Some((upstream, addr)) = upstream else {
        let (addr, e) = last_err.expect("at least one candidate");
        line.connect_failed(&e);
        if let Some(n) = limits.failed.check() {
            warn!(port, dest = %dest.label, %addr, error = %e, suppressed = n, "cannot connect to the destination");
        }
        reset(&client);
        log_end(Some(addr), (0, 0, 0), &format!("connect failed: {e}"));
        return;
    };

    let mut stop = shared.stop.clone();
    let t = relay::forward(
        &client,
        &upstream,
        shared.engine,
        &shared.pipes,
        shared.idle_timeout,
        stopped(&mut stop),
    )
    .await;
    line.transferred(t.sent, t.received);
    // Pass a reset on: the other side sees one too, instead of a clean close.
    if let relay::End::Error(side, e) = &t.end
        && e.kind() == std::io::ErrorKind::ConnectionReset
    {
        match side {
            relay::Side::Client => reset(&upstream),
            relay::Side::Upstream => reset(&client),
        }
    }
    log_end(
        Some(addr),
        (t.sent, t.received, t.spliced),
        &t.end.to_string(),
    );
}

/// Returns once `stop` is true (or its sender is gone). The `Ref` that `wait_for` returns is not
/// `Send`, so it must not live in a `select!` of a spawned task.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Makes the coming close an RST.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: DnsProxyOptions,
    }

    #[test]
    fn default_matches_clap_defaults() {
        let parsed = Cli::try_parse_from(["x"]).unwrap().o;
        assert_eq!(parsed, DnsProxyOptions::default());
    }

    #[test]
    fn options_from_flags() {
        let o = Cli::try_parse_from([
            "x",
            "--dns-proxy-listen-address",
            "127.0.0.1",
            "--dns-proxy-idle-timeout",
            "90s",
            "--dns-proxy-engine",
            "copy",
        ])
        .unwrap()
        .o;
        assert_eq!(o.listen_address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(o.idle_timeout, Duration::from_secs(90));
        assert_eq!(o.engine, Engine::Copy);
    }
}
