//! The results and review HTTP API, for applications that read predictions and for review tools:
//!
//! - `GET /results/{id}`: one record's result;
//! - `GET /results?status=&class=&since=&min_confidence=&max_confidence=&limit=&page_token=`
//!   (`since`: milliseconds since the epoch, an RFC 3339 time, or an age such as `2h`):
//!   results in the order they were stored, a page at a time;
//! - `GET /review?limit=&page_token=`: the results waiting for a person;
//! - `POST /review/{id}` with `{"label": "..."}`: a person's label, which settles the result
//!   (status `reviewed`, both labels kept) and takes the item off the review queue;
//! - `GET /openapi.json`: the OpenAPI document of all this.
//!
//! Bad input (an unknown parameter, a malformed id, a body over 4 KiB or not JSON) gets a 4xx
//! with `{"error": "..."}` saying what is wrong; only a store that cannot be reached is a 5xx.
//! So is a request past the API's bounds ([`Limits`]): more than 64 at once, or one the store
//! has not answered in 30 s (503, with `Retry-After` when it is only busy).

mod openapi;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::Request;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sluice_core::backend::{Backend, PageToken, ResultQuery, ReviewOutcome};
use sluice_core::config::Settings;
use sluice_core::envelope::RecordId;
use sluice_core::model::ModelBundle;
use sluice_core::record::{PredictionResult, ResultStatus};
use tokio_util::sync::CancellationToken;

/// The API's port unless told otherwise (the workers' health ports are 9100 to 9104).
pub const DEFAULT_PORT: u16 = 9105;

/// The largest request body accepted (a label is a few bytes).
pub const BODY_LIMIT: usize = 4 * 1024;
/// The most results one page holds, and how many without `limit`.
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_LIMIT: usize = 100;

/// How much the API takes on at once, so that a flood of requests, or a store that hangs (an SDK
/// call may take 90 s an attempt), holds neither the store nor the API's memory without end.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests served at once; one more is answered 503 with `Retry-After` straight away (a
    /// client waiting in a queue it cannot see is worse than one told to come back).
    pub in_flight: usize,
    /// How long a request may take before it is answered 503. A label given past this may still
    /// be stored: a client trying again is told 409 if it was. (A call to the embedded store
    /// already begun runs on, on its blocking thread, up to `store.busy_timeout_ms`: the bound is
    /// on requests, and such calls wait their turn on the store's one connection.)
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { in_flight: 64, timeout: Duration::from_secs(30) }
    }
}

/// Where the API listens, and the names it answers to: `sluice serve` and `sluice-api`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub address: IpAddr,
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// A host name clients reach the API by (a load balancer's, a proxy's), besides an IP
    /// address and `localhost`, which are always answered; repeat for several. A request naming
    /// any other host is refused (421): a web page that rebinds its own name to this machine
    /// would otherwise read and label results through the reviewer's browser.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
}

/// What the handlers share: the store, the labels a person may give, and the host names
/// answered besides addresses and `localhost`.
#[derive(Clone)]
pub struct ApiState {
    backend: Backend,
    labels: Arc<Vec<String>>,
    hosts: Arc<Vec<String>>,
    limits: Limits,
}

impl ApiState {
    pub fn new(backend: Backend, labels: Vec<String>) -> Self {
        Self { backend, labels: Arc::new(labels), hosts: Arc::default(), limits: Limits::default() }
    }

    /// Serves within `limits` rather than the default ones.
    pub fn limited(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Answers requests naming `hosts` too (see [`ServeArgs::allow_hosts`]).
    pub fn answering(mut self, hosts: Vec<String>) -> Self {
        self.hosts = Arc::new(hosts);
        self
    }
}

/// Refuses a request whose `Host` is a name the API was not told it goes by (DNS rebinding).
async fn check_host(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    match request.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("?")) {
        Some(host) if !host_allowed(host, &state.hosts) => ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this API does not answer to the host {host:?}: start it with --allow-host NAME for a name of its own"
            ),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

/// What [`bound`] keeps to: [`Limits`] and the permits of the requests being served.
struct Bounds {
    permits: Arc<tokio::sync::Semaphore>,
    limits: Limits,
}

impl Bounds {
    fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self { permits: Arc::new(tokio::sync::Semaphore::new(limits.in_flight)), limits })
    }
}

/// Keeps requests within their bounds: more at once than they allow are turned away, and one that
/// runs past its time is answered for. (tower's limit and timeout layers queue a request rather
/// than refuse it, and answer without the API's `{"error": ...}` body.)
async fn bound(State(bounds): State<Arc<Bounds>>, request: Request, next: Next) -> Response {
    let Ok(_permit) = bounds.permits.clone().try_acquire_owned() else {
        let message = format!("the API is serving {} requests already: try again shortly", bounds.limits.in_flight);
        let mut busy = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
        busy.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return busy;
    };
    let timeout = bounds.limits.timeout;
    tokio::time::timeout(timeout, next.run(request)).await.unwrap_or_else(|_| {
        tracing::warn!(?timeout, "results API: a request ran past its time");
        let message = format!("the result store did not answer within {timeout:?}: try again shortly");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).into_response()
    })
}

/// Whether `host` (a `Host` header: a name or address, perhaps with a port) is an IP address,
/// `localhost`, or one of `names`.
fn host_allowed(host: &str, names: &[String]) -> bool {
    if let Some(bracketed) = host.strip_prefix('[') {
        return bracketed.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/results", get(list_results))
        .route("/results/{id}", get(get_result))
        .route("/review", get(list_review))
        .route("/review/{id}", axum::routing::post(label_review))
        .route(
            "/openapi.json",
            get(|State(state): State<ApiState>| async move { Json(openapi::document(&state.labels)) }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint: see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint takes another method: see /openapi.json")
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(Bounds::new(state.limits), bound))
        .layer(axum::middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state)
}

/// Serves the API of the store `settings` name on `address` until SIGTERM or SIGINT: `sluice
/// serve` and `sluice-api`. A taken port is said at once, not after the store has answered; it
/// is held only once the API can answer on it (a client meanwhile is refused, not left waiting).
pub async fn run(settings: &Settings, args: &ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let address = SocketAddr::new(args.address, args.port);
    drop(bind(address).await?);
    let state = ApiState::new(
        Backend::open_watcher(&settings.store()?).await?,
        ModelBundle::load(settings.model()?.dir)?.manifest.labels,
    )
    .answering(args.allow_hosts.clone());
    let listener = bind(address).await?;
    serve(listener, state, sluice_core::shutdown::on_signal()).await?;
    Ok(())
}

/// Listens on `address`; a port another program holds is said with the address and the way out.
async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse { " (choose another with --port)" } else { "" };
        std::io::Error::new(e.kind(), format!("the results API cannot listen on {address}: {e}{hint}"))
    })
}

/// Serves the API on `listener` until `shutdown`.
async fn serve(listener: tokio::net::TcpListener, state: ApiState, shutdown: CancellationToken) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "results API: /results, /review, /openapi.json");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// An error answer: its status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

impl From<sluice_core::SluiceError> for ApiError {
    fn from(e: sluice_core::SluiceError) -> Self {
        // The cause goes to the log, not to the client: it can name the account's resources and
        // roles, and the API authenticates no one.
        tracing::warn!(error = %e, "results API: store error");
        let when = if e.is_retryable() { "now: try again shortly" } else { "now: the server's log says why" };
        Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("the result store cannot answer {when}"))
    }
}

fn rejected(status: StatusCode, body: String) -> ApiError {
    ApiError::new(status, body)
}

fn record_id(path: Result<Path<String>, PathRejection>) -> Result<RecordId, ApiError> {
    let Path(raw) = path.map_err(|e| rejected(e.status(), e.body_text()))?;
    RecordId::parse(raw).map_err(|e| ApiError::bad_request(e.detail().to_owned()))
}

/// A page of results.
#[derive(Debug, Serialize)]
struct Page {
    results: Vec<PredictionResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    class: Option<String>,
    /// Stored at or after: milliseconds since the epoch, an RFC 3339 time, or an age.
    since: Option<String>,
    min_confidence: Option<f32>,
    max_confidence: Option<f32>,
    limit: Option<usize>,
    page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageParams {
    limit: Option<usize>,
    page_token: Option<String>,
}

fn page_query(limit: Option<usize>, page_token: Option<&str>) -> Result<ResultQuery, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_LIMIT}")));
    }
    let page_token =
        page_token.map(PageToken::parse).transpose().map_err(|e| ApiError::bad_request(e.detail().to_owned()))?;
    Ok(ResultQuery { limit, page_token, ..ResultQuery::default() })
}

fn confidence(name: &str, value: Option<f32>) -> Result<Option<f32>, ApiError> {
    match value {
        Some(v) if !(0.0..=1.0).contains(&v) => Err(ApiError::bad_request(format!("{name} must be between 0 and 1"))),
        other => Ok(other),
    }
}

async fn page(state: &ApiState, query: &ResultQuery) -> Result<Json<Page>, ApiError> {
    let page = state.backend.results.query(query).await?;
    Ok(Json(Page { results: page.results, next_page_token: page.next_page_token.map(|t| t.to_string()) }))
}

async fn list_results(
    State(state): State<ApiState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut query = page_query(params.limit, params.page_token.as_deref())?;
    query.status = params
        .status
        .map(|s| {
            ResultStatus::parse(&s).ok_or_else(|| {
                ApiError::bad_request(format!("status {s:?} is none of accepted, review, reviewed, rejected"))
            })
        })
        .transpose()?;
    query.class = params.class;
    let since = params.since.as_deref().map(sluice_core::envelope::parse_time).transpose();
    let since = since.map_err(|e| ApiError::bad_request(format!("since: {e}")))?;
    if since.is_some_and(|since| since > sluice_core::backend::MAX_STORED_MS) {
        return Err(ApiError::bad_request(format!("since must be at most {}", sluice_core::backend::MAX_STORED_MS)));
    }
    query.since_ms = since;
    query.min_confidence = confidence("min_confidence", params.min_confidence)?;
    query.max_confidence = confidence("max_confidence", params.max_confidence)?;
    page(&state, &query).await
}

async fn list_review(
    State(state): State<ApiState>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut query = page_query(params.limit, params.page_token.as_deref())?;
    query.status = Some(ResultStatus::Review);
    page(&state, &query).await
}

async fn get_result(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<PredictionResult>, ApiError> {
    let id = record_id(id)?;
    let mut found = state.backend.results.get_batch(std::slice::from_ref(&id)).await?;
    found.remove(&id).map(Json).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no result for {id}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelBody {
    label: String,
}

async fn label_review(
    State(state): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<LabelBody>, JsonRejection>,
) -> Result<Json<PredictionResult>, ApiError> {
    let id = record_id(id)?;
    let Json(body) = body.map_err(|e| rejected(e.status(), e.body_text()))?;
    if !state.labels.contains(&body.label) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not one of the model's labels: {}",
            body.label,
            state.labels.join(", ")
        )));
    }
    match sluice_core::dlq::label(&state.backend, &id, &body.label).await? {
        ReviewOutcome::Resolved(result) => Ok(Json(*result)),
        ReviewOutcome::NotWaiting(result) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{id} is not waiting for review (status {})", result.status.as_str()),
        )),
        ReviewOutcome::Missing => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no result for {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use sluice_core::telemetry::health::fetch;

    use super::*;

    /// Serves `app` on a free port of 127.0.0.1 for the rest of the test.
    async fn served(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        address
    }

    #[tokio::test]
    async fn a_request_past_the_limits_is_answered_503_and_the_next_one_is_served() {
        let started = Arc::new(tokio::sync::Notify::new());
        let slow = {
            let started = started.clone();
            move || async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }
        };
        let limits = Limits { in_flight: 1, timeout: Duration::from_secs(2) };
        let app = Router::new()
            .route("/slow", get(slow))
            .route("/fast", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(Bounds::new(limits), bound));
        let address = served(app).await;

        let begun = Instant::now();
        let hanging = tokio::spawn(fetch(address, "/slow"));
        started.notified().await;
        let (status, body) = fetch(address, "/fast").await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("serving 1 requests already"), "{body}");

        let (status, body) = hanging.await.unwrap().unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("did not answer within 2s"), "{body}");
        assert!(begun.elapsed() < Duration::from_secs(5), "answered after {:?}", begun.elapsed());
        assert_eq!(fetch(address, "/fast").await.unwrap(), (200, "ok".to_owned()), "the permit was not given back");
    }

    /// The API's router is bounded: with room for no request, each is turned away.
    #[tokio::test]
    async fn the_router_keeps_to_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let config = sluice_core::config::StoreConfig { path: dir.path().join("api.sqlite"), ..Default::default() };
        let backend = Backend::open(&config).await.unwrap();
        let full = Limits { in_flight: 0, ..Limits::default() };
        let address = served(router(ApiState::new(backend.clone(), vec!["cat".to_owned()]).limited(full))).await;
        let (status, body) = fetch(address, "/openapi.json").await.unwrap();
        assert_eq!(status, 503, "{body}");
        let address = served(router(ApiState::new(backend, vec!["cat".to_owned()]))).await;
        assert_eq!(fetch(address, "/openapi.json").await.unwrap().0, 200);
    }

    #[test]
    fn addresses_localhost_and_names_given_are_answered() {
        let names = ["results.internal".to_owned()];
        for host in
            ["127.0.0.1", "127.0.0.1:9105", "[::1]:9105", "[::1]", "10.0.3.7", "LOCALHOST:80", "results.internal"]
        {
            assert!(host_allowed(host, &names), "{host}");
        }
        for host in
            ["rebound.example", "rebound.example:9105", "127.0.0.1.nip.io", "[not-v6]", "", "results.internal.evil"]
        {
            assert!(!host_allowed(host, &names), "{host}");
        }
    }
}
