//! HTTP proxy mode (SPEC section 4): a forward proxy for absolute-form HTTP/1.1 requests and
//! CONNECT tunnels, allowing destinations by EGRESS_HTTP_PROXY_DESTINATION.
//!
//! - [`rules`]: the allow/deny decision (pure; its module documentation defines the semantics).
//! - [`target`]: the destination of a request target (pure).
//! - [`headers`]: hop-by-hop removal and Via.
//! - `proxy`: per connection and per request: check, resolve once, connect from EGRESS_SOURCE,
//!   forward (streaming) or tunnel.
//! - `pool`: idle upstream connections shared by the client connections of one proxy thread.
//!
//! The proxy serves on one thread per CPU (`crate::workers`), each with its own listening socket,
//! upstream pool, resolver and tasks; they share the connection limit and the splice pipes.
//!
//! Names are resolved once per request with the pod's resolver (hickory, from resolv.conf): names
//! with a dot as absolute names (no search list, like squid), IPv4 addresses first (the upstream
//! socket is bound to the IPv4 EGRESS_SOURCE). Upstream connections go back to their thread's pool
//! when a response has been passed on in full, for the next request of any client of that thread
//! to the same admitted address and port (at most 256 idle, 32 per address, each for at most
//! 60 s, per thread); an idle client connection holds none.
//!
//! Status codes the proxy produces itself: 400 malformed request or a target that is not
//! absolute-form (hyper answers unparsable requests with 400 and oversized headers with 431),
//! 403 denied by the rules (the body names the rule), 501 `https://` URIs without CONNECT,
//! 502 DNS failure, refused or broken upstream connection, 504 DNS, connect or response timeout,
//! 508 a request that already passed through an egress-router (its Via), i.e. a forwarding loop.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use hickory_resolver::config::LookupIpStrategy;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::{net::TcpListener, runtime::Handle, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    metrics::{self, Health, MetricsOptions, Role, http::HttpMetrics},
    protected::Protected,
    ratelimit::RateLimit,
    relay::{self, PipePool},
    resolver::{self, ResolverOptions},
};

mod body;
pub mod headers;
mod pool;
mod proxy;
pub mod rules;
pub mod target;
mod tunnel;

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// Settings of the HTTP proxy beyond the OpenShift contract.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpProxyOptions {
    /// Address and port the HTTP proxy listens on.
    #[arg(long = "http-listen", env = "EGRESS_HTTP_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Time allowed for resolving a destination and, separately, for connecting to it
    /// (e.g. 10s, 500ms, 2m). 504 when exceeded.
    #[arg(long = "http-connect-timeout", env = "EGRESS_HTTP_CONNECT_TIMEOUT",
          default_value = "10s", value_parser = crate::duration::parse_duration)]
    pub connect_timeout: Duration,
    /// Time a client has to send a request's headers; also how long an idle kept-alive client
    /// connection stays open.
    #[arg(long = "http-header-timeout", env = "EGRESS_HTTP_HEADER_TIMEOUT",
          default_value = "30s", value_parser = crate::duration::parse_duration)]
    pub header_timeout: Duration,
    /// A CONNECT tunnel with no traffic either way for this long is closed; an upstream that
    /// sends no response headers for this long gets a 504.
    #[arg(long = "http-idle-timeout", env = "EGRESS_HTTP_IDLE_TIMEOUT",
          default_value = "5m", value_parser = crate::duration::parse_duration)]
    pub idle_timeout: Duration,
    /// Most client connections (tunnels included) served at once; more wait until one ends,
    /// in the listen backlog (each proxy thread holds one of them accepted, unread).
    #[arg(long = "http-max-connections", env = "EGRESS_HTTP_MAX_CONNECTIONS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Largest request header section accepted, in bytes; 431 beyond.
    #[arg(long = "http-max-header-bytes", env = "EGRESS_HTTP_MAX_HEADER_BYTES",
          default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_bytes: u32,
    /// On SIGTERM: stop accepting, then give running requests and tunnels this long to finish.
    #[arg(long = "http-shutdown-grace", env = "EGRESS_HTTP_SHUTDOWN_GRACE",
          default_value = "10s", value_parser = crate::duration::parse_duration)]
    pub shutdown_grace: Duration,
    /// Destinations reached only through an address rule that names them. None (always, from
    /// the command line): this network namespace's own addresses, loopback and link-local.
    /// In-process tests whose servers are on loopback set their own.
    #[arg(skip)]
    pub protected: Option<Protected>,
}

impl Default for HttpProxyOptions {
    fn default() -> Self {
        HttpProxyOptions {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            max_header_bytes: 65_536,
            shutdown_grace: Duration::from_secs(10),
            protected: None,
        }
    }
}

/// http-proxy mode: listens on `opts.listen` with one socket per proxy thread of `workers`
/// until SIGTERM (or SIGINT), then shuts down gracefully; metrics and health probes on
/// `metrics_opts`' listener meanwhile.
pub async fn run(
    cfg: &Config,
    opts: &HttpProxyOptions,
    resolver: &ResolverOptions,
    metrics_opts: &MetricsOptions,
    workers: &[Handle],
) -> Result<()> {
    crate::listener::raise_fd_limit();
    let shutdown = crate::shutdown::on_signal()?;
    let mut registry = metrics::registry(Role::HttpProxy);
    let counters = HttpMetrics::new(&mut registry, cfg.http.as_deref().unwrap_or_default());
    let health = Health::new("the HTTP proxy is not listening yet");
    metrics::listen(
        metrics_opts.address(|port| metrics::port_taken(cfg, Some(opts.listen), port))?,
        registry,
        health.clone(),
        &shutdown,
    )?;
    let listeners = crate::listener::listen_each(opts.listen, 4096, workers.len())
        .with_context(|| format!("listening on {} for the HTTP proxy", opts.listen))?;
    tracing::info!(listen = %opts.listen, threads = workers.len(), "HTTP proxy listening");
    health.ready();
    let common = Common::new(opts);
    crate::workers::run_each(workers, listeners, |listener| {
        let (cfg, opts, resolver) = (cfg.clone(), opts.clone(), resolver.clone());
        let (counters, common, stop) = (counters.clone(), common.clone(), shutdown.clone());
        async move {
            let listener = TcpListener::from_std(listener)?;
            let stop = stop.cancelled_owned();
            serve_with(listener, &cfg, &opts, &resolver, counters, common, stop).await
        }
    })
    .await
}

/// What the proxy threads share: the connection limit, the splice pipes and the log limit of
/// failed accepts. Each thread has its own upstream pool, resolver and tasks, so that a
/// request never waits on another thread.
#[derive(Clone)]
struct Common {
    limit: Arc<Semaphore>,
    pipes: Arc<PipePool>,
    accept_log: Arc<RateLimit>,
}

impl Common {
    fn new(opts: &HttpProxyOptions) -> Common {
        Common {
            limit: Arc::new(Semaphore::new(opts.max_connections as usize)),
            pipes: Arc::new(PipePool::new(relay::DEFAULT_MAX_PIPES)),
            accept_log: Arc::new(RateLimit::new(Duration::from_secs(10))),
        }
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves, counting in `metrics`; then stops
/// accepting, lets running requests and tunnels finish for `opts.shutdown_grace`, drops what is
/// left and returns.
pub async fn serve(
    listener: TcpListener,
    cfg: &Config,
    opts: &HttpProxyOptions,
    resolver: &ResolverOptions,
    metrics: HttpMetrics,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let common = Common::new(opts);
    serve_with(listener, cfg, opts, resolver, metrics, common, shutdown).await
}

/// [`serve`] as one of the proxy threads, sharing `common` with the others.
async fn serve_with(
    listener: TcpListener,
    cfg: &Config,
    opts: &HttpProxyOptions,
    resolver: &ResolverOptions,
    metrics: HttpMetrics,
    common: Common,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let resolver = resolver::build_with(resolver, |o| {
        o.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    })?;
    let rules = rules::RuleSet::new(cfg.http.as_deref().unwrap_or_default());
    let mut server = http1::Builder::new();
    server
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout)
        .max_header_size(opts.max_header_bytes as usize)
        .keep_alive(true);
    if opts.max_header_bytes as usize > 400 * 1024 {
        server.max_buf_size(opts.max_header_bytes as usize + 8192);
    }
    let pool = Arc::new(pool::Upstreams::new(pool::Limits::default()));
    let shared = Arc::new(proxy::Shared {
        rules,
        protected: match &opts.protected {
            Some(p) => p.clone(),
            None => Protected::of_this_namespace().context("listing this pod's addresses")?,
        },
        resolver,
        source: Some(cfg.source.addr.into()),
        connect_timeout: opts.connect_timeout,
        idle_timeout: opts.idle_timeout,
        debug: cfg.debug,
        server,
        client: hyper::client::conn::http1::Builder::new(),
        pool: pool.clone(),
        pipes: common.pipes,
        draining: CancellationToken::new(),
        abort: CancellationToken::new(),
        tasks: TaskTracker::new(),
        metrics,
    });
    tokio::spawn(pool::sweep_until(
        Arc::downgrade(&pool),
        shared.abort.clone(),
    ));
    drop(pool);
    let limit = common.limit;
    let accept_log = common.accept_log;
    tokio::pin!(shutdown);
    loop {
        // Accepted first, then admitted: every proxy thread has its own listener, so a thread
        // that took a free place before a connection came would keep it from a connection
        // waiting on another thread's listener. At the limit, each thread holds at most one
        // accepted connection, unread, until a place frees.
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            c = crate::listener::accept(&listener, &accept_log, "HTTP proxy") => c,
        };
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        shared.tasks.spawn(proxy::serve_connection(
            shared.clone(),
            stream,
            peer,
            permit,
        ));
    }

    drop(listener);
    shared.draining.cancel();
    shared.tasks.close();
    let running = shared.tasks.len();
    if running > 0 {
        tracing::info!(
            connections = running,
            grace = ?opts.shutdown_grace,
            "HTTP proxy stopped accepting; letting running requests finish"
        );
    }
    if tokio::time::timeout(opts.shutdown_grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = shared.tasks.len(),
            "HTTP proxy grace period over; closing what is still running"
        );
        shared.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.tasks.wait()).await;
    }
    shared.abort.cancel();
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        http: HttpProxyOptions,
    }

    #[test]
    fn default_matches_clap_defaults() {
        let parsed = Cli::try_parse_from(["x"]).unwrap().http;
        assert_eq!(parsed, HttpProxyOptions::default());
    }
}
