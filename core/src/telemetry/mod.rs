//! Telemetry set up in one place: every binary calls [`init`] first. Logs go to stderr;
//! [`metrics`] are served as Prometheus text on each worker's `/metrics` ([`health`]'s server)
//! and pushed over OTLP when configured; [`traces`] are exported over OTLP when configured.
//! The returned guard flushes every exporter when it drops.

pub mod health;
pub mod metrics;
pub mod scrape;
pub mod traces;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry_prometheus_text_exporter::PrometheusExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

/// Flushes and shuts down the metric and span exporters when dropped.
#[must_use = "telemetry is flushed when the guard drops"]
pub struct TelemetryGuard {
    meters: Option<SdkMeterProvider>,
    tracer: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take()
            && let Err(e) = tracer.shutdown()
        {
            tracing::warn!(error = %e, "spans not flushed");
        }
        if let Some(meters) = self.meters.take()
            && let Err(e) = meters.shutdown()
        {
            tracing::warn!(error = %e, "metrics not flushed");
        }
    }
}

/// Chooses the log format: `SLUICE_LOG_FORMAT=json|text`, else JSON lines when stderr is not a
/// terminal (a container's log driver, CloudWatch Logs Insights) and text when a person watches.
pub const LOG_FORMAT_VAR: &str = "SLUICE_LOG_FORMAT";

/// Where `/metrics` reads from.
static PROMETHEUS: OnceLock<PrometheusExporter> = OnceLock::new();

/// Sets up logs, metrics and traces for the process `service` (the OpenTelemetry
/// `service.name` unless `OTEL_SERVICE_NAME` names another).
///
/// Logs go to stderr (stdout stays free for commands' own output), filtered by `RUST_LOG`
/// (default `default_level`, e.g. `info`), in the format [`LOG_FORMAT_VAR`] picks. OTLP export
/// follows the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or the per-signal
/// `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`) turns it on, over HTTP with protobuf;
/// `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER=none` or `OTEL_SDK_DISABLED=true` keep it off.
/// Call it before any async runtime starts (the exporters run on threads of their own).
pub fn init(service: &str, default_level: &str) -> TelemetryGuard {
    init_logs(default_level);
    if PROMETHEUS.get().is_some() {
        // A second init in one process (tests) keeps the first set-up.
        return TelemetryGuard { meters: None, tracer: None };
    }
    let resource = {
        let builder = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
            builder
        } else {
            builder.with_service_name(service.to_owned())
        }
        .build()
    };
    let prometheus = PrometheusExporter::builder().without_scope_info().build();
    let _ = PROMETHEUS.set(prometheus.clone());
    let mut meters = SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(prometheus);
    if otlp_wanted("METRICS") {
        match opentelemetry_otlp::MetricExporter::builder().with_http().build() {
            Ok(exporter) => {
                OTLP_METRICS.store(true, Ordering::Relaxed);
                meters = meters.with_periodic_exporter(exporter);
            }
            Err(e) => tracing::error!(error = %e, "OTLP metrics export not set up"),
        }
    }
    let meters = meters.build();
    opentelemetry::global::set_meter_provider(meters.clone());
    let meter = opentelemetry::global::meter(metrics::METER);
    metrics::observe_aws_requests(&meter);
    metrics::observe_breakers(&meter);

    let tracer = otlp_wanted("TRACES").then(|| opentelemetry_otlp::SpanExporter::builder().with_http().build());
    let tracer = match tracer {
        Some(Ok(exporter)) => {
            let provider = SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            traces::set_enabled();
            Some(provider)
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "OTLP trace export not set up");
            None
        }
        None => None,
    };
    TelemetryGuard { meters: Some(meters), tracer }
}

fn init_logs(default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = match std::env::var(LOG_FORMAT_VAR).as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests, `sluice run` after `sluice train`) keeps the first subscriber.
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// Whether the standard variables ask for OTLP export of `signal` (`TRACES`, `METRICS`).
fn otlp_wanted(signal: &str) -> bool {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    if var(&format!("OTEL_{signal}_EXPORTER")).is_some_and(|v| v.eq_ignore_ascii_case("none")) {
        return false;
    }
    var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || var(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some()
}

/// Whether metrics go out over OTLP.
static OTLP_METRICS: AtomicBool = AtomicBool::new(false);
/// When `/metrics` was last read.
static LAST_SCRAPE: Mutex<Option<Instant>> = Mutex::new(None);
/// How long after a scrape the gauges that cost a request are still sampled (Prometheus scrapes
/// every 15 s to a minute).
const SCRAPE_KEEPS_SAMPLING: Duration = Duration::from_secs(300);

/// Woken when a scrape makes the sampled gauges wanted again.
static SAMPLING_WANTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Notes a read of `/metrics`.
pub(crate) fn scraped() {
    let was = LAST_SCRAPE.lock().unwrap_or_else(|e| e.into_inner()).replace(Instant::now());
    if was.is_none_or(|at| at.elapsed() >= SCRAPE_KEEPS_SAMPLING) {
        // The first scrape (or the first in a while): the samplers need not wait out their interval.
        SAMPLING_WANTED.notify_waiters();
    }
}

/// Resolves when a scrape makes the sampled gauges wanted (see [`sampled_gauges_wanted`]).
pub async fn sampling_wanted() {
    SAMPLING_WANTED.notified().await;
}

/// Whether anyone reads the gauges that cost a request to sample (queue depths on SQS): an
/// OTLP exporter, or a `/metrics` scrape in the last five minutes. Nobody pays for samples
/// nobody reads (an idle AWS pipeline's requests a second were a fifth queue-depth samples).
pub fn sampled_gauges_wanted() -> bool {
    OTLP_METRICS.load(Ordering::Relaxed)
        || LAST_SCRAPE.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|at| at.elapsed() < SCRAPE_KEEPS_SAMPLING)
}

/// This process's metrics in the Prometheus text format (empty before [`init`]).
pub fn prometheus_text() -> String {
    let mut out = Vec::new();
    if let Some(exporter) = PROMETHEUS.get()
        && let Err(e) = exporter.export(&mut out)
    {
        tracing::warn!(error = %e, "metrics not rendered");
    }
    String::from_utf8(out).unwrap_or_default()
}
