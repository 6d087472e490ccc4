//! `/healthz` (the process serves) and `/readyz` (store open, stage built with its model loaded,
//! worker loop running, not stopping) for ECS container health checks and load balancers: one
//! small HTTP server per process, on `[telemetry]`'s address and port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::topology::StageName;

/// `[telemetry]`: where a process serves its health endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address the endpoints listen on (`0.0.0.0` for a load balancer's probes).
    pub address: IpAddr,
    /// Port; unset: each worker kind's own (ingest 9101, features 9102, inference 9103,
    /// results 9104, `sluice run` 9100), so four workers can share a host. 0 turns them off.
    pub port: Option<u16>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { address: IpAddr::V4(Ipv4Addr::LOCALHOST), port: None }
    }
}

impl TelemetryConfig {
    /// The address a worker of `stage` (or `sluice run`, with `None`) serves on, if any.
    pub fn health_address(&self, stage: Option<StageName>) -> Option<SocketAddr> {
        let port = self.port.unwrap_or_else(|| default_port(stage));
        (port != 0).then_some(SocketAddr::new(self.address, port))
    }

    /// Where a client on this host reaches that worker's endpoints (the loopback address when
    /// it listens on every address).
    pub fn local_address(&self, stage: Option<StageName>) -> Option<SocketAddr> {
        let mut address = self.health_address(stage)?;
        if address.ip().is_unspecified() {
            address.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        Some(address)
    }
}

/// `sluice monitor --watch`'s default port: its own, so that it runs beside `sluice run` and the
/// API (`sluice serve`, 9105).
pub const MONITOR_PORT: u16 = 9106;

/// Each worker kind's default port.
pub const fn default_port(stage: Option<StageName>) -> u16 {
    match stage {
        None => 9100,
        Some(StageName::Ingest) => 9101,
        Some(StageName::Features) => 9102,
        Some(StageName::Inference) => 9103,
        Some(StageName::Results) => 9104,
    }
}

/// Whether the process is ready for work: every one of its workers (one, or four in `sluice
/// run`) has started, and none is stopping. Cheap to clone and share.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Parts>,
}

#[derive(Debug)]
struct Parts {
    expected: usize,
    ready: AtomicUsize,
    stopping: AtomicBool,
}

impl Health {
    /// Ready once `workers` workers have said so.
    pub fn new(workers: usize) -> Self {
        Self {
            inner: Arc::new(Parts { expected: workers, ready: AtomicUsize::new(0), stopping: AtomicBool::new(false) }),
        }
    }

    /// One worker has its store, its stage (model loaded) and its source, and runs.
    pub fn worker_ready(&self) {
        self.inner.ready.fetch_add(1, Ordering::Relaxed);
    }

    /// Shutting down: load balancers should stop sending work.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        !self.inner.stopping.load(Ordering::Relaxed) && self.inner.ready.load(Ordering::Relaxed) >= self.inner.expected
    }
}

/// Serves the endpoints on `listener` until `shutdown`; `/store` answers `store`, the
/// [identity](crate::config::StoreConfig::identity) of the store the process works on.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    store: String,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "health endpoints: /healthz, /readyz, /metrics, /store");
    axum::serve(listener, router(health, store)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

fn router(health: Health, store: String) -> Router {
    let store = format!("{store}\n");
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/store", get(|| async move { store }))
        .with_state(health)
}

async fn readyz(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.is_ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

async fn metrics() -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    super::scraped();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], super::prometheus_text())
}

/// GETs `path` on `address` and tells whether it answered 200: the container health check
/// (`sluice-<stage> --healthcheck`), for images without curl.
pub async fn probe(address: SocketAddr, path: &str) -> std::io::Result<bool> {
    Ok(fetch(address, path).await?.0 == 200)
}

/// GETs `path` on `address`: the status code and the body. A bare HTTP/1.0 request on a socket
/// is all our own endpoints need (the probe, `sluice top` reading `/metrics`); no HTTP client
/// crate is worth it here.
pub async fn fetch(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5 s")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthz_answers_and_readyz_follows_readiness() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let health = Health::new(2);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, health.clone(), "embedded /x.sqlite".into(), shutdown.clone()));
        assert!(probe(address, "/healthz").await.unwrap(), "/healthz answers 200");
        assert_eq!(fetch(address, "/store").await.unwrap(), (200, "embedded /x.sqlite\n".to_owned()));
        assert!(!probe(address, "/readyz").await.unwrap(), "not ready before its workers are");
        health.worker_ready();
        assert!(!probe(address, "/readyz").await.unwrap(), "one of two workers is not enough");
        health.worker_ready();
        assert!(probe(address, "/readyz").await.unwrap());
        health.stopping();
        assert!(!probe(address, "/readyz").await.unwrap(), "not ready once stopping");
        assert!(!probe(address, "/nothing").await.unwrap());
        shutdown.cancel();
        server.await.unwrap().unwrap();
        assert!(probe(address, "/healthz").await.is_err(), "nothing listens after shutdown");
    }

    #[test]
    fn each_worker_kind_has_its_own_port_and_zero_turns_them_off() {
        let config = TelemetryConfig::default();
        let ports: std::collections::BTreeSet<u16> =
            StageName::ALL.into_iter().map(|s| config.health_address(Some(s)).unwrap().port()).collect();
        assert_eq!(ports.len(), 4);
        assert_eq!(config.health_address(None).unwrap().port(), 9100);
        let off = TelemetryConfig { port: Some(0), ..Default::default() };
        assert_eq!(off.health_address(Some(StageName::Ingest)), None);
    }
}
