//! The one shutdown signal of every long-running role (legacy redirect, the exporter, the HTTP
//! and DNS proxies): SIGTERM, what the kubelet sends, or SIGINT. Everything that stops with the
//! process (the proxy's accept loop, the legacy wait loop, the metrics listener's readiness)
//! watches the same token.
use anyhow::{Context as _, Result};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Starts watching SIGTERM and SIGINT; the token is cancelled when the first arrives. Call it
/// inside a tokio runtime, as early as possible: a signal that arrives after this call and
/// before anything waits on the token is not lost (the default action, dying at once, no longer
/// applies).
pub fn on_signal() -> Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received: shutting down"),
        }
        fire.cancel();
    });
    Ok(token)
}
