//! A fault-injecting HTTP proxy for the local AWS stand-in: the SDK talks to it as it would to
//! AWS, and it passes each request on to the stand-in, or, at the configured rates, answers
//! as a busy AWS does: throttling in each service's own error shape
//! (`ProvisionedThroughputExceededException` for Kinesis and DynamoDB, `RequestThrottled` for
//! SQS, `SlowDown` for S3), a 500 or a 503, added latency, or a dropped connection, before the
//! request reaches the stand-in or after it was carried out there (the response lost: the case
//! that makes non-idempotent calls happen twice). On its own (not in [`FaultRates::spread`]): an
//! SQS SendMessageBatch carried out for all its entries but the last, which is answered as failed
//! (`InternalError`, not the sender's fault), as SQS may answer a batch it takes in part.
//!
//! Written here rather than taken from the registries: the proxies there (toxiproxy and the
//! like) cut and slow TCP, but none answers with AWS's error shapes per service.
//!
//! `cargo run -p sluice-core --example fault_proxy -- UPSTREAM RATE [PORT]` runs one by hand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

/// How often each fault is injected, as a share of requests (the shares add up).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRates {
    pub throttle: f64,
    pub server_error: f64,
    pub latency: f64,
    pub drop_before: f64,
    pub drop_after: f64,
    /// An SQS SendMessageBatch of two entries or more taken in part (its last entry failed).
    pub partial: f64,
    /// How long a delayed request waits.
    pub delay: Duration,
    /// This many requests pass untouched before faults begin.
    pub clean_first: u64,
}

impl FaultRates {
    /// `total` of all requests faulted, spread evenly over the five kinds.
    pub fn spread(total: f64) -> Self {
        let each = total / 5.0;
        Self {
            throttle: each,
            server_error: each,
            latency: each,
            drop_before: each,
            drop_after: each,
            partial: 0.0,
            delay: Duration::from_millis(300),
            clean_first: 0,
        }
    }
}

/// What the proxy did, so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    pub requests: u64,
    pub throttled: u64,
    pub server_errors: u64,
    pub delayed: u64,
    pub dropped_before: u64,
    pub dropped_after: u64,
    pub partial: u64,
}

impl FaultCounts {
    /// Requests the client had to send again (a delayed one succeeds as it is).
    pub fn failed(&self) -> u64 {
        self.throttled + self.server_errors + self.dropped_before + self.dropped_after
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    throttled: AtomicU64,
    server_errors: AtomicU64,
    delayed: AtomicU64,
    dropped_before: AtomicU64,
    dropped_after: AtomicU64,
    partial: AtomicU64,
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    pub url: String,
    counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Its thread, joined on drop: once dropped, its port and connections are closed.
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The service a request is for, as the SDK addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Kinesis,
    DynamoDb,
    Sqs,
    /// Anything else: S3 (REST/XML).
    S3,
}

impl Service {
    fn of(request: &Request<Incoming>) -> Self {
        let target = request.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if target.starts_with("Kinesis_") {
            Self::Kinesis
        } else if target.starts_with("DynamoDB_") {
            Self::DynamoDb
        } else if target.starts_with("AmazonSQS") {
            Self::Sqs
        } else {
            Self::S3
        }
    }

    /// A throttling answer in this service's shape.
    fn throttled(self) -> Response<Full<Bytes>> {
        match self {
            Self::Kinesis => json(
                StatusCode::BAD_REQUEST,
                "ProvisionedThroughputExceededException",
                "Rate exceeded for shard shardId-000000000000.",
                "application/x-amz-json-1.1",
            ),
            Self::DynamoDb => json(
                StatusCode::BAD_REQUEST,
                "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
                "The level of configured provisioned throughput for the table was exceeded.",
                "application/x-amz-json-1.0",
            ),
            Self::Sqs => {
                let mut response = json(
                    StatusCode::BAD_REQUEST,
                    "com.amazonaws.sqs#RequestThrottled",
                    "Request is throttled.",
                    "application/x-amz-json-1.0",
                );
                response
                    .headers_mut()
                    .insert("x-amzn-query-error", "RequestThrottled;Sender".parse().expect("a header"));
                response
            }
            Self::S3 => xml(StatusCode::SERVICE_UNAVAILABLE, "SlowDown", "Please reduce your request rate."),
        }
    }

    /// A 500 or a 503 in this service's shape.
    fn server_error(self, unavailable: bool) -> Response<Full<Bytes>> {
        let (status, code) = if unavailable {
            (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
        } else {
            (StatusCode::INTERNAL_SERVER_ERROR, if self == Self::S3 { "InternalError" } else { "InternalFailure" })
        };
        match self {
            Self::S3 => xml(status, code, "We encountered an internal error. Please try again."),
            Self::Kinesis => json(status, code, "Internal service failure.", "application/x-amz-json-1.1"),
            Self::DynamoDb | Self::Sqs => json(status, code, "Internal service failure.", "application/x-amz-json-1.0"),
        }
    }
}

fn json(status: StatusCode, code: &str, message: &str, content_type: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "__type": code, "message": message }).to_string();
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-amzn-requestid", uuid::Uuid::new_v4().to_string())
        .body(Full::new(Bytes::from(body)))
        .expect("a response")
}

fn xml(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{}</RequestId></Error>",
        uuid::Uuid::new_v4().simple()
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("a response")
}

/// The connection is cut without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

struct Proxy {
    upstream: String,
    client: reqwest::Client,
    rates: FaultRates,
    counters: Arc<Counters>,
    rng: std::sync::Mutex<rand_chacha::ChaCha8Rng>,
}

enum Fault {
    None,
    Throttle,
    ServerError(bool),
    Delay,
    DropBefore,
    DropAfter,
    Partial,
}

impl Proxy {
    fn draw(&self) -> Fault {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let r: f64 = rng.random();
        let rates = &self.rates;
        let mut edge = 0.0;
        for (rate, fault) in [
            (rates.throttle, Fault::Throttle),
            (rates.server_error, Fault::ServerError(rng.random_bool(0.5))),
            (rates.latency, Fault::Delay),
            (rates.drop_before, Fault::DropBefore),
            (rates.drop_after, Fault::DropAfter),
            (rates.partial, Fault::Partial),
        ] {
            edge += rate;
            if r < edge {
                return fault;
            }
        }
        Fault::None
    }

    async fn handle(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
        let c = &self.counters;
        let n = c.requests.fetch_add(1, Ordering::Relaxed);
        let service = Service::of(&request);
        let fault = if n < self.rates.clean_first { Fault::None } else { self.draw() };
        match fault {
            Fault::Throttle => {
                c.throttled.fetch_add(1, Ordering::Relaxed);
                Ok(service.throttled())
            }
            Fault::ServerError(unavailable) => {
                c.server_errors.fetch_add(1, Ordering::Relaxed);
                Ok(service.server_error(unavailable))
            }
            Fault::DropBefore => {
                c.dropped_before.fetch_add(1, Ordering::Relaxed);
                Err(Dropped)
            }
            Fault::Delay => {
                c.delayed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.rates.delay).await;
                self.forward(request).await
            }
            Fault::DropAfter => {
                // Carried out upstream; the answer never arrives.
                let _ = self.forward(request).await;
                c.dropped_after.fetch_add(1, Ordering::Relaxed);
                Err(Dropped)
            }
            Fault::Partial if service == Service::Sqs => self.take_in_part(request).await,
            Fault::None | Fault::Partial => self.forward(request).await,
        }
    }

    async fn forward(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
        self.send(parts, body).await
    }

    /// A SendMessageBatch of two entries or more passed on without its last entry, which the
    /// answer says failed; any other request passed on as it is.
    async fn take_in_part(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
        let batch = request.headers().get("x-amz-target").is_some_and(|t| t == "AmazonSQS.SendMessageBatch");
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
        let mut json: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(json) if batch => json,
            _ => return self.send(parts, body).await,
        };
        let Some(entries) = json.get_mut("Entries").and_then(|e| e.as_array_mut()).filter(|e| e.len() >= 2) else {
            return self.send(parts, body).await;
        };
        let failed = entries.pop().expect("two entries or more");
        self.counters.partial.fetch_add(1, Ordering::Relaxed);
        let response = self.send(parts, Bytes::from(json.to_string())).await?;
        let (parts, body) = response.into_parts();
        let mut answer: serde_json::Value =
            serde_json::from_slice(&body.collect().await.map_err(|_| Dropped)?.to_bytes()).map_err(|_| Dropped)?;
        let failure = serde_json::json!({
            "Id": failed["Id"], "SenderFault": false, "Code": "InternalError", "Message": "taken in part by the fault proxy"
        });
        match answer.get_mut("Failed").and_then(|f| f.as_array_mut()) {
            Some(list) => list.push(failure),
            None => answer["Failed"] = serde_json::json!([failure]),
        }
        Ok(Response::from_parts(parts, Full::new(Bytes::from(answer.to_string()))))
    }

    async fn send(&self, parts: hyper::http::request::Parts, body: Bytes) -> Result<Response<Full<Bytes>>, Dropped> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut outgoing = self.client.request(parts.method, format!("{}{path}", self.upstream)).body(body);
        for (name, value) in &parts.headers {
            if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
                outgoing = outgoing.header(name, value);
            }
        }
        // The stand-in unreachable reads to the client as a dropped connection, as it would.
        let answer = outgoing.send().await.map_err(|_| Dropped)?;
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if name != hyper::header::CONTENT_LENGTH && name != hyper::header::TRANSFER_ENCODING {
                response = response.header(name, value);
            }
        }
        let bytes = answer.bytes().await.map_err(|_| Dropped)?;
        Ok(response.body(Full::new(bytes)).expect("a response"))
    }
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream` (`http://127.0.0.1:…`),
    /// on a thread of its own. `seed` makes the faults it draws repeatable.
    pub fn start(upstream: &str, rates: FaultRates, seed: u64) -> std::io::Result<Self> {
        Self::start_on(0, upstream, rates, seed)
    }

    /// The same on `port` (0: any free one).
    pub fn start_on(port: u16, upstream: &str, rates: FaultRates, seed: u64) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let counters = Arc::new(Counters::default());
        let proxy = Arc::new(Proxy {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder().pool_max_idle_per_host(32).build().map_err(std::io::Error::other)?,
            rates,
            counters: Arc::clone(&counters),
            rng: std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                let serve = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        let proxy = Arc::clone(&proxy);
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |request| {
                                let proxy = Arc::clone(&proxy);
                                async move { proxy.handle(request).await }
                            });
                            // A dropped request ends its connection: the client sees it cut.
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(Self { url, counters, stop: Some(stop), thread: Some(thread) })
    }

    pub fn counts(&self) -> FaultCounts {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            requests: n(&c.requests),
            throttled: n(&c.throttled),
            server_errors: n(&c.server_errors),
            delayed: n(&c.delayed),
            dropped_before: n(&c.dropped_before),
            dropped_after: n(&c.dropped_after),
            partial: n(&c.partial),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
