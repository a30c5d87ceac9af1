//! One client connection: each request checked against the rules, resolved once, and forwarded
//! (or tunnelled, for CONNECT) from EGRESS_SOURCE.
use std::{
    borrow::Cow,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use hickory_resolver::{TokioResolver, net::NetError};
use hyper::{
    Method, Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    header::{CONTENT_TYPE, HOST, HeaderValue},
    http::request::Parts,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::OwnedSemaphorePermit};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    body::{ReqBody, RequestLog, ResBody},
    headers::{add_via, passed_through_us, strip_hop_by_hop},
    pool::{Lease, Upstreams},
    rules::{NameCheck, Rule, RuleSet, Verdict},
    target::{Host, Target, TargetError, connect_target, http_target},
    tunnel,
};
use crate::{
    metrics::{
        Active,
        http::{Decision, HttpMetrics, Kind, RequestError},
    },
    protected::{self, Protected},
    relay::PipePool,
    upstream,
};

/// Everything the connections share; built once by `serve`.
pub(super) struct Shared {
    pub rules: RuleSet,
    /// Addresses reached only through a rule that names them.
    pub protected: Protected,
    pub resolver: TokioResolver,
    pub source: Option<IpAddr>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub debug: bool,
    pub server: http1::Builder,
    pub client: hyper::client::conn::http1::Builder,
    /// Idle upstream connections, for any client's next request to the same address.
    pub pool: Arc<Upstreams>,
    /// Splice pipes lent to CONNECT tunnels.
    pub pipes: Arc<PipePool>,
    /// Fired when shutdown starts: connections finish their request and close.
    pub draining: CancellationToken,
    /// Fired when the grace period is over: everything still running is dropped.
    pub abort: CancellationToken,
    pub tasks: TaskTracker,
    pub metrics: HttpMetrics,
}

/// Serves one client connection until it closes, or shutdown ends it.
pub(super) async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        client,
        _permit: permit,
        _active: Active::new(&shared.metrics.active_connections),
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let http = shared
        .server
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(http);
    let result = tokio::select! {
        r = http.as_mut() => r,
        () = shared.draining.cancelled() => {
            http.as_mut().graceful_shutdown();
            tokio::select! {
                r = http.as_mut() => r,
                () = shared.abort.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_parse() {
            // hyper answered 400 or 431 itself.
            shared.metrics.unparsable();
        }
        if shared.debug {
            // Malformed requests, header timeouts, resets.
            tracing::info!(client = %client, error = %e, "http-proxy connection ended");
        }
    }
}

/// Per client connection state. Kept alive by a running CONNECT tunnel too, so that the
/// connection-limit permit covers tunnels.
struct Conn {
    shared: Arc<Shared>,
    client: SocketAddr,
    _permit: OwnedSemaphorePermit,
    _active: Active,
}

/// A request the proxy answers itself: denied (403, `error` None) or an error of its own.
struct Reject {
    status: StatusCode,
    reason: Cow<'static, str>,
    error: Option<RequestError>,
}

impl Reject {
    fn new(status: StatusCode, error: RequestError, reason: impl Into<Cow<'static, str>>) -> Self {
        Reject {
            status,
            reason: reason.into(),
            error: Some(error),
        }
    }
}

impl From<TargetError> for Reject {
    fn from(e: TargetError) -> Self {
        match e {
            TargetError::Bad(m) => {
                Reject::new(StatusCode::BAD_REQUEST, RequestError::InvalidRequest, m)
            }
            TargetError::Unsupported(m) => {
                Reject::new(StatusCode::NOT_IMPLEMENTED, RequestError::NotImplemented, m)
            }
        }
    }
}

/// What the rules decided about a request answered with `status`: a 403 is their denial;
/// otherwise an allow rule decided, or none could (the request failed before).
fn decision(rule: Option<&Rule>, status: StatusCode) -> Decision {
    if status == StatusCode::FORBIDDEN {
        Decision::Denied
    } else if rule.is_some_and(|r| r.allow) {
        Decision::Allowed
    } else {
        Decision::Undecided
    }
}

fn kind(method: &Method) -> Kind {
    if method == Method::CONNECT {
        Kind::Connect
    } else {
        Kind::Forward
    }
}

/// The addresses a request may go to, each with the rule that let it pass.
type Admitted<'r> = Vec<(IpAddr, &'r Rule)>;

impl Conn {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResBody> {
        let start = Instant::now();
        if req.method() == Method::CONNECT {
            self.connect(req, start).await
        } else {
            self.forward(req, start).await
        }
    }

    fn log(
        &self,
        method: &Method,
        target: &dyn std::fmt::Display,
        rule: Option<&Rule>,
        status: StatusCode,
        start: Instant,
    ) -> Option<Box<RequestLog>> {
        self.shared.debug.then(|| {
            Box::new(RequestLog {
                client: self.client,
                method: method.clone(),
                target: target.to_string(),
                rule: rule.map_or_else(|| "none".to_string(), |r| r.to_string()),
                status,
                start,
                up: None,
                down: 0,
                reason: None,
            })
        })
    }

    fn reject(
        &self,
        method: &Method,
        target: &Uri,
        rule: Option<&Rule>,
        r: Reject,
        start: Instant,
    ) -> Response<ResBody> {
        let m = &self.shared.metrics;
        let decided = decision(rule, r.status);
        m.answered(
            kind(method),
            decided,
            r.status.as_u16(),
            r.error,
            start.elapsed().as_secs_f64(),
        );
        if decided == Decision::Denied {
            m.denied(rule.map(|r| r.line));
            tracing::info!(
                client = %self.client,
                method = %method,
                request_target = %target,
                rule_line = rule.map(|r| r.line),
                reason = %r.reason,
                "request denied"
            );
        } else if r.status.is_server_error() {
            tracing::warn!(
                client = %self.client,
                method = %method,
                request_target = %target,
                status = r.status.as_u16(),
                error = r.error.map_or("", |e| e.as_str()),
                reason = %r.reason,
                "upstream failure"
            );
        }
        let mut log = self.log(method, target, rule, r.status, start);
        if let Some(log) = &mut log {
            log.reason = Some(r.reason.to_string());
        }
        let mut text = r.reason.into_owned();
        text.push('\n');
        let mut res = Response::new(ResBody::text(text, log));
        *res.status_mut() = r.status;
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    }

    // ---- plain HTTP ----

    async fn forward(&self, req: Request<Incoming>, start: Instant) -> Response<ResBody> {
        let (mut parts, body) = req.into_parts();
        let uri = std::mem::take(&mut parts.uri);
        let mut rule = None;
        match self
            .forward_inner(&uri, &mut parts, body, start, &mut rule)
            .await
        {
            Ok(res) => res,
            Err(r) => self.reject(&parts.method, &uri, rule, r, start),
        }
    }

    async fn forward_inner<'s>(
        &'s self,
        uri: &Uri,
        parts: &mut Parts,
        body: Incoming,
        start: Instant,
        decided_by: &mut Option<&'s Rule>,
    ) -> Result<Response<ResBody>, Reject> {
        if passed_through_us(&parts.headers) {
            // A request for the proxy's own address comes back here carrying our Via.
            return Err(Reject::new(
                StatusCode::LOOP_DETECTED,
                RequestError::Loop,
                "forwarding loop: the request already passed through egress-router (Via)",
            ));
        }
        let target = http_target(uri)?;
        let admitted = self.admit(&target, decided_by).await?;

        // The upstream request: origin-form target, Host from the request target (RFC 9112
        // 3.2.2), hop-by-hop fields removed, Via added.
        let received = parts.version;
        let mut up = Request::new(());
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = match uri.path_and_query() {
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        };
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = std::mem::take(&mut parts.headers);
        let headers = up.headers_mut();
        strip_hop_by_hop(headers);
        headers.insert(
            HOST,
            HeaderValue::from_str(target.authority).map_err(|_| {
                Reject::new(
                    StatusCode::BAD_REQUEST,
                    RequestError::InvalidRequest,
                    "invalid host",
                )
            })?,
        );
        add_via(headers, received);
        let up_count = self.shared.debug.then(|| Arc::new(AtomicU64::new(0)));
        let up = up.map(|()| {
            ReqBody::new(
                body,
                up_count.clone(),
                self.shared.metrics.bytes_upstream.clone(),
            )
        });

        let (res, lease, rule) = self.send(up, &admitted, target.port).await?;
        *decided_by = Some(rule);

        let (mut rparts, rbody) = res.into_parts();
        // hyper closes the connection after such a response anyway; not worth a wait for it.
        let lease = keeps_alive(&rparts).then_some(lease);
        strip_hop_by_hop(&mut rparts.headers);
        add_via(&mut rparts.headers, rparts.version);
        rparts.version = Version::HTTP_11;
        self.shared.metrics.answered(
            Kind::Forward,
            Decision::Allowed,
            rparts.status.as_u16(),
            None,
            start.elapsed().as_secs_f64(),
        );
        let mut log = self.log(&parts.method, uri, Some(rule), rparts.status, start);
        if let Some(log) = &mut log {
            log.up = up_count;
        }
        let bytes = self.shared.metrics.bytes_downstream.clone();
        Ok(Response::from_parts(
            rparts,
            ResBody::upstream(rbody, log, lease, bytes),
        ))
    }

    /// Sends `req` to one of the admitted addresses, on an idle pooled connection to one of
    /// them if there is one. The lease goes with the response body, back to the pool at its end.
    async fn send<'r>(
        &self,
        req: Request<ReqBody>,
        admitted: &Admitted<'r>,
        port: u16,
    ) -> Result<(Response<Incoming>, Lease, &'r Rule), Reject> {
        let mut req = req;
        let pooled = admitted.iter().find_map(|&(ip, rule)| {
            let addr = SocketAddr::new(ip, port);
            let sender = self.shared.pool.take(addr)?;
            Some((Lease::new(self.shared.pool.clone(), addr, sender), rule))
        });
        if let Some((mut lease, rule)) = pooled {
            match self.await_response(&mut lease, req).await {
                Ok(res) => return Ok((res, lease, rule)),
                // Closed by the server meanwhile, before taking the request: once more on a
                // new connection.
                Err(SendError::NotSent(back)) => req = *back,
                Err(SendError::Failed(r)) => return Err(r),
            }
        }
        let (stream, addr, rule) = self.connect_any(admitted, port).await?;
        let (sender, connection) = self
            .shared
            .client
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                Reject::new(
                    StatusCode::BAD_GATEWAY,
                    RequestError::UpstreamFailure,
                    format!("upstream {addr}: {e}"),
                )
            })?;
        let abort = self.shared.abort.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = abort.cancelled() => {}
            }
        });
        let mut lease = Lease::new(self.shared.pool.clone(), addr, sender);
        match self.await_response(&mut lease, req).await {
            Ok(res) => Ok((res, lease, rule)),
            Err(SendError::NotSent(_)) => Err(Reject::new(
                StatusCode::BAD_GATEWAY,
                RequestError::UpstreamFailure,
                format!("upstream {addr} closed the connection"),
            )),
            Err(SendError::Failed(r)) => Err(r),
        }
    }

    async fn await_response(
        &self,
        up: &mut Lease,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let idle = self.shared.idle_timeout;
        let addr = up.addr();
        match tokio::time::timeout(idle, up.sender().try_send_request(req)).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(mut e)) => match e.take_message() {
                Some(req) => Err(SendError::NotSent(Box::new(req))),
                None => Err(SendError::Failed(Reject::new(
                    StatusCode::BAD_GATEWAY,
                    RequestError::UpstreamFailure,
                    format!("upstream {addr}: {}", e.into_error()),
                ))),
            },
            Err(_) => Err(SendError::Failed(Reject::new(
                StatusCode::GATEWAY_TIMEOUT,
                RequestError::UpstreamTimeout,
                format!("upstream {addr} sent no response within {idle:?}"),
            ))),
        }
    }

    // ---- CONNECT ----

    async fn connect(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        start: Instant,
    ) -> Response<ResBody> {
        let mut rule = None;
        let result = async {
            let target = connect_target(req.uri())?;
            let admitted = self.admit(&target, &mut rule).await?;
            let (stream, addr, r) = self.connect_any(&admitted, target.port).await?;
            rule = Some(r);
            Ok::<_, Reject>((stream, addr))
        }
        .await;
        let (stream, addr) = match result {
            Ok(ok) => ok,
            Err(r) => return self.reject(req.method(), req.uri(), rule, r, start),
        };
        self.shared.metrics.answered(
            Kind::Connect,
            Decision::Allowed,
            StatusCode::OK.as_u16(),
            None,
            start.elapsed().as_secs_f64(),
        );
        let log = self.log(req.method(), req.uri(), rule, StatusCode::OK, start);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let this = self.clone();
        self.shared.tasks.spawn(async move {
            let _active = Active::new(&this.shared.metrics.active_tunnels);
            let idle = this.shared.idle_timeout;
            let tunnel = async {
                match on_upgrade.await {
                    Ok(client) => {
                        tunnel::run(TokioIo::new(client), stream, idle, &this.shared.pipes).await
                    }
                    Err(e) => tunnel::TunnelEnd {
                        up: 0,
                        down: 0,
                        error: Some(io::Error::other(e)),
                    },
                }
            };
            let end = tokio::select! {
                end = tunnel => end,
                () = this.shared.abort.cancelled() => return,
            };
            let m = &this.shared.metrics;
            m.bytes_upstream.inc_by(end.up);
            m.bytes_downstream.inc_by(end.down);
            if let Some(mut log) = log {
                log.up = Some(Arc::new(AtomicU64::new(end.up)));
                log.down = end.down;
                log.reason = end.error.map(|e| format!("tunnel to {addr}: {e}"));
            }
        });
        Response::new(ResBody::text("", None))
    }

    // ---- rules, resolution, connection ----

    /// Checks the rules; for a host name, resolves it once and keeps the addresses that pass.
    async fn admit<'s>(
        &'s self,
        target: &Target<'_>,
        decided_by: &mut Option<&'s Rule>,
    ) -> Result<Admitted<'s>, Reject> {
        let (host, admitted) = match target.host {
            Host::Ip(ip) => (ip.to_string(), self.check_rules_ip(ip, decided_by)?),
            Host::Name(name) => (
                name.to_string(),
                self.check_rules_name(name, decided_by).await?,
            ),
        };
        self.unprotected(&host, admitted)
    }

    /// Drops the addresses that are the router pod's own, loopback or link-local unless the
    /// rule that allowed them names them; 403 when none is left.
    fn unprotected<'s>(
        &'s self,
        host: &str,
        admitted: Admitted<'s>,
    ) -> Result<Admitted<'s>, Reject> {
        let mut refused = None;
        let kept: Admitted<'s> = admitted
            .into_iter()
            .filter(
                |&(ip, rule)| match self.shared.protected.admits(ip, rule.net()) {
                    Ok(()) => true,
                    Err(p) => {
                        refused.get_or_insert((ip, p, rule));
                        false
                    }
                },
            )
            .collect();
        match refused {
            Some((ip, p, rule)) if kept.is_empty() => Err(Reject {
                status: StatusCode::FORBIDDEN,
                reason: protected::refusal(host, ip, &p, rule).into(),
                error: None,
            }),
            _ => Ok(kept),
        }
    }

    fn check_rules_ip<'s>(
        &'s self,
        ip: IpAddr,
        decided_by: &mut Option<&'s Rule>,
    ) -> Result<Admitted<'s>, Reject> {
        let v = self.shared.rules.check_ip(ip);
        *decided_by = v.rule();
        match v {
            Verdict::Allow(r) => Ok(vec![(ip, r)]),
            v => Err(denied(v, &ip.to_string(), None)),
        }
    }

    async fn check_rules_name<'s>(
        &'s self,
        name: &str,
        decided_by: &mut Option<&'s Rule>,
    ) -> Result<Admitted<'s>, Reject> {
        match self.shared.rules.check_name(name) {
            NameCheck::Decided(v) => {
                *decided_by = v.rule();
                let Verdict::Allow(rule) = v else {
                    return Err(denied(v, name, None));
                };
                let addrs = self.resolve(name).await?;
                Ok(addrs.into_iter().map(|ip| (ip, rule)).collect())
            }
            NameCheck::ByAddress(check) => {
                let addrs = self.resolve(name).await?;
                let mut admitted = Vec::with_capacity(addrs.len());
                let mut first_denial = None;
                for ip in addrs {
                    match check.check(ip) {
                        Verdict::Allow(r) => admitted.push((ip, r)),
                        v => {
                            first_denial.get_or_insert((v, ip));
                        }
                    }
                }
                match (admitted.first(), first_denial) {
                    (Some(&(_, r)), _) => {
                        *decided_by = Some(r);
                        Ok(admitted)
                    }
                    (None, Some((v, ip))) => {
                        *decided_by = v.rule();
                        Err(denied(v, name, Some(ip)))
                    }
                    (None, None) => unreachable!("resolve returns at least one address"),
                }
            }
        }
    }

    /// The addresses `name` resolves to (IPv4 first: upstream connections leave from the IPv4
    /// EGRESS_SOURCE). Names with a dot are resolved as absolute names, without the search list.
    async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, Reject> {
        let timeout = self.shared.connect_timeout;
        let query: Cow<'_, str> = if name.contains('.') {
            format!("{name}.").into()
        } else {
            name.into()
        };
        let lookup = tokio::time::timeout(timeout, self.shared.resolver.lookup_ip(&*query)).await;
        let err = match lookup {
            Err(_) => {
                return Err(Reject::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    RequestError::DnsTimeout,
                    format!("resolving {name} timed out after {timeout:?}"),
                ));
            }
            Ok(Ok(ips)) => {
                let mut ips: Vec<IpAddr> = ips.iter().collect();
                if ips.is_empty() {
                    return Err(Reject::new(
                        StatusCode::BAD_GATEWAY,
                        RequestError::DnsFailure,
                        format!("cannot resolve {name}: no addresses"),
                    ));
                }
                ips.sort_by_key(|ip| ip.is_ipv6());
                return Ok(ips);
            }
            Ok(Err(e)) => e,
        };
        let (status, error) = if matches!(err, NetError::Timeout) {
            (StatusCode::GATEWAY_TIMEOUT, RequestError::DnsTimeout)
        } else {
            (StatusCode::BAD_GATEWAY, RequestError::DnsFailure)
        };
        let why = if err.is_nx_domain() {
            "no such name".to_string()
        } else if err.is_no_records_found() {
            "no addresses".to_string()
        } else {
            err.to_string()
        };
        Err(Reject::new(
            status,
            error,
            format!("cannot resolve {name}: {why}"),
        ))
    }

    /// Connects from EGRESS_SOURCE to the first admitted address that accepts, within the
    /// connect timeout overall.
    async fn connect_any<'r>(
        &self,
        admitted: &Admitted<'r>,
        port: u16,
    ) -> Result<(TcpStream, SocketAddr, &'r Rule), Reject> {
        let timeout = self.shared.connect_timeout;
        let deadline = Instant::now() + timeout;
        let source = self.shared.source;
        // Only addresses reachable from EGRESS_SOURCE are tried (IPv4 ones: a name's AAAA
        // records are never connected to from another address of the pod).
        let reachable: Vec<_> = admitted
            .iter()
            .filter(|(ip, _)| upstream::unreachable_from(source, *ip).is_none())
            .collect();
        if reachable.is_empty()
            && let Some(&(ip, _)) = admitted.first()
        {
            let why = upstream::unreachable_from(source, ip).unwrap_or_default();
            return Err(Reject::new(
                StatusCode::BAD_GATEWAY,
                RequestError::ConnectFailure,
                format!("cannot connect to {}: {why}", SocketAddr::new(ip, port)),
            ));
        }
        let mut last = None;
        for &&(ip, rule) in &reachable {
            let addr = SocketAddr::new(ip, port);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let attempt = Instant::now();
            match upstream::connect(source, addr, left).await {
                Ok(stream) => {
                    self.shared
                        .metrics
                        .connected(attempt.elapsed().as_secs_f64());
                    return Ok((stream, addr, rule));
                }
                Err(e) => {
                    self.shared.metrics.connect_failed(&e);
                    last = Some((addr, e));
                }
            }
        }
        Err(match last {
            Some((addr, e)) if e.kind() != io::ErrorKind::TimedOut => Reject::new(
                StatusCode::BAD_GATEWAY,
                RequestError::ConnectFailure,
                format!("connecting to {addr}: {e}"),
            ),
            Some((addr, _)) => Reject::new(
                StatusCode::GATEWAY_TIMEOUT,
                RequestError::ConnectTimeout,
                format!("connecting to {addr} timed out after {timeout:?}"),
            ),
            None => Reject::new(
                StatusCode::GATEWAY_TIMEOUT,
                RequestError::ConnectTimeout,
                format!("connecting timed out after {timeout:?}"),
            ),
        })
    }
}

/// Whether the upstream keeps the connection open after this response (HTTP/1.1 without
/// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`).
fn keeps_alive(res: &hyper::http::response::Parts) -> bool {
    let has = |token: &str| {
        res.headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match res.version {
        Version::HTTP_11 => !has("close"),
        Version::HTTP_10 => has("keep-alive"),
        _ => false,
    }
}

enum SendError {
    /// The connection could not take the request; here it is back.
    NotSent(Box<Request<ReqBody>>),
    Failed(Reject),
}

fn denied(v: Verdict<'_>, host: &str, resolved: Option<IpAddr>) -> Reject {
    let mut text = match v.rule() {
        Some(rule) => format!("denied by {rule}"),
        None => format!("no rule allows {host}"),
    };
    if let Some(ip) = resolved {
        if v.rule().is_some() {
            text.push_str(&format!(" ({host} resolves to {ip})"));
        } else {
            text.push_str(&format!(" (resolves to {ip})"));
        }
    }
    Reject {
        status: StatusCode::FORBIDDEN,
        reason: text.into(),
        error: None,
    }
}
