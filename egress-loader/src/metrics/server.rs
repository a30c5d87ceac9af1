//! The listener: HTTP/1.1 on hyper, GET (or HEAD) of three paths, nothing else.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{ACCEPT, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Health;

/// Scrapes and probes served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// A scraper has this long to send its request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the listener serves: the registry and the readiness of the role.
pub struct Endpoint {
    pub registry: Registry,
    pub health: Arc<Health>,
    /// Cancelled when the process starts shutting down: not ready from then on.
    pub shutdown: CancellationToken,
}

/// Binds `addr` and serves `endpoint` on the current tokio runtime until the runtime ends.
/// Returns the bound address.
pub fn start(addr: SocketAddr, endpoint: Endpoint) -> Result<SocketAddr> {
    let listener = crate::listener::listen(addr, 128).with_context(|| {
        format!(
            "listening on {addr} for metrics and health probes (EGRESS_METRICS_ADDRESS, \
             --metrics-address; 'off' turns the listener off)"
        )
    })?;
    let bound = listener.local_addr()?;
    info!(listen = %bound, "metrics and health listener: /metrics /healthz /readyz");
    tokio::spawn(serve(listener, Arc::new(endpoint)));
    Ok(bound)
}

async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(answer(&endpoint, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

async fn answer<B>(endpoint: &Arc<Endpoint>, req: Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".to_string(),
        );
        res.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let ep = endpoint.clone();
            // Collectors read BPF maps with system calls (a full connection table is many):
            // off the async workers.
            let encoded =
                tokio::task::spawn_blocking(move || super::encode(&ep.registry, &accept)).await;
            match encoded {
                Ok((body, content_type)) => {
                    let mut res = text(StatusCode::OK, body);
                    res.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                    res
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding the metrics failed: {e}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".to_string()),
        "/readyz" => {
            let state = if endpoint.shutdown.is_cancelled() {
                Err("shutting down".to_string())
            } else {
                // A check may make system calls (the dataplane's maps and attachments): off
                // the async workers too.
                let ep = endpoint.clone();
                tokio::task::spawn_blocking(move || ep.health.check())
                    .await
                    .unwrap_or_else(|e| Err(format!("the readiness check failed: {e}")))
            };
            match state {
                Ok(()) => text(StatusCode::OK, "ready\n".to_string()),
                Err(missing) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {missing}\n"),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz or /readyz\n".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Role, registry};

    fn endpoint() -> Arc<Endpoint> {
        Arc::new(Endpoint {
            registry: registry(Role::Exporter),
            health: Health::new("the maps are not readable yet"),
            shutdown: CancellationToken::new(),
        })
    }

    async fn get(ep: &Arc<Endpoint>, path: &str, accept: Option<&str>) -> (StatusCode, String) {
        let mut req = Request::get(path);
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        let res = answer(ep, req.body(()).unwrap()).await;
        let status = res.status();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let ep = endpoint();
        assert_eq!(
            get(&ep, "/healthz", None).await,
            (StatusCode::OK, "ok\n".into())
        );
        assert_eq!(
            get(&ep, "/readyz", None).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the maps are not readable yet\n".into()
            )
        );
        ep.health.ready();
        assert_eq!(get(&ep, "/readyz", None).await.0, StatusCode::OK);
        ep.shutdown.cancel();
        assert_eq!(
            get(&ep, "/readyz", None).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: shutting down\n".into()
            )
        );
        let (status, body) = get(&ep, "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("egress_router_build_info{"), "{body}");
        let (_, om) = get(&ep, "/metrics", Some("application/openmetrics-text")).await;
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(get(&ep, "/other", None).await.0, StatusCode::NOT_FOUND);
    }
}
