//! Every metric sluice exports, each name defined once, with its fixed label set.
//!
//! Names follow OpenTelemetry's conventions (dotted, unit apart); on `/metrics` they read the
//! Prometheus way: `sluice.records.processed` becomes `sluice_records_processed_total`, a
//! duration in `s` gains `_seconds`. The stages and the worker loop record through
//! [`metrics()`]; [`super::init`] sets up where the numbers go (the Prometheus text on each
//! worker's `/metrics`, and OTLP when `OTEL_EXPORTER_OTLP_*` says so). Without it (library
//! tests) every instrument is a no-op.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};

use crate::topology::{QueueName, StageName};

/// The instrumentation scope of every sluice metric.
pub const METER: &str = "sluice";

pub const RECORDS_RECEIVED: &str = "sluice.records.received";
pub const RECORDS_PROCESSED: &str = "sluice.records.processed";
pub const RECORDS_FAILED: &str = "sluice.records.failed";
pub const RECORDS_ARRIVED: &str = "sluice.records.arrived";
pub const DLQ_ENTRIES: &str = "sluice.dlq.entries";
pub const REVIEW_ENTRIES: &str = "sluice.review.entries";
pub const BATCH_SIZE: &str = "sluice.batch.size";
pub const BATCH_DURATION: &str = "sluice.batch.duration";
pub const QUEUE_MESSAGES: &str = "sluice.queue.messages";
pub const QUEUE_OLDEST_AGE: &str = "sluice.queue.oldest_message.age";
pub const STREAM_LAG: &str = "sluice.stream.lag";
pub const STREAM_LEASES: &str = "sluice.stream.leases";
pub const STREAM_TRIMMED: &str = "sluice.stream.trimmed";
pub const INFERENCE_DURATION: &str = "sluice.inference.duration";
pub const INFERENCE_RECORDS: &str = "sluice.inference.records";
pub const BREAKER_STATE: &str = "sluice.breaker.state";
pub const PREDICTION_CONFIDENCE: &str = "sluice.prediction.confidence";
pub const RECORD_LATENCY: &str = "sluice.record.latency";
pub const AWS_REQUESTS: &str = "sluice.aws.requests";
pub const CAPTURE_RECORDS: &str = "sluice.capture.records";
pub const MODEL_ACCURACY: &str = "sluice.model.accuracy";
pub const DRIFT_PSI: &str = "sluice.drift.psi";
pub const MONITOR_ALERTS: &str = "sluice.monitor.alerts";

/// Label keys.
pub const STAGE: &str = "stage";
pub const REASON: &str = "reason";
pub const ACTION: &str = "action";
pub const QUEUE: &str = "queue";
pub const STATE: &str = "state";
pub const SHARD: &str = "shard";
pub const BACKEND: &str = "backend";
pub const CLASS: &str = "class";
pub const OPERATION: &str = "operation";
pub const OUTCOME: &str = "outcome";
pub const CHECK: &str = "check";

/// What became of a failed record (`action` of [`RECORDS_FAILED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    DeadLettered,
    Retried,
}

impl FailureAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::DeadLettered => "dead_lettered",
            Self::Retried => "retried",
        }
    }
}

/// The circuit breaker's state as [`BREAKER_STATE`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BreakerGauge {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// A circuit breaker whose state [`BREAKER_STATE`] reports, read each time metrics are
/// collected (an inference stage's; see [`watch_breaker`]).
pub trait BreakerReading: Send + Sync {
    fn reading(&self) -> BreakerGauge;
}

/// The breakers of this process's inference stages, for as long as each is there.
static BREAKERS: Mutex<Vec<Weak<dyn BreakerReading>>> = Mutex::new(Vec::new());

/// Reports `breaker`'s state from now on, until it is dropped: read when metrics are collected,
/// not recorded after each batch, which left the last value standing once batches stopped (an
/// open breaker read as open all through a quiet night, though the next batch would probe).
pub fn watch_breaker(breaker: &Arc<impl BreakerReading + 'static>) {
    let breaker: Arc<dyn BreakerReading> = breaker.clone();
    BREAKERS.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&breaker));
}

/// The gauge of [`watch_breaker`]'s breakers: the worst of them (a process running several
/// inference workers has one each); none, and nothing is reported.
pub(super) fn observe_breakers(meter: &Meter) {
    meter
        .u64_observable_gauge(BREAKER_STATE)
        .with_description(
            "The model's circuit breaker: 0 closed, 1 half-open (the next batch probes the model), \
             2 open (batches go to the fallback)",
        )
        .with_callback(|observer| {
            let mut breakers = BREAKERS.lock().unwrap_or_else(|e| e.into_inner());
            breakers.retain(|b| b.strong_count() > 0);
            if let Some(worst) = breakers.iter().filter_map(Weak::upgrade).map(|b| b.reading()).max() {
                observer.observe(worst as u64, &[]);
            }
        })
        .build();
}

/// The instruments, created once from the global meter provider.
pub struct Metrics {
    records_received: Counter<u64>,
    records_processed: Counter<u64>,
    records_failed: Counter<u64>,
    records_arrived: Counter<u64>,
    dlq_entries: Counter<u64>,
    review_entries: Counter<u64>,
    batch_size: Histogram<u64>,
    batch_duration: Histogram<f64>,
    queue_messages: Gauge<u64>,
    queue_oldest_age: Gauge<f64>,
    stream_lag: Gauge<u64>,
    stream_leases: Gauge<u64>,
    stream_trimmed: Counter<u64>,
    inference_duration: Histogram<f64>,
    inference_records: Counter<u64>,
    confidence: Histogram<f64>,
    record_latency: Histogram<f64>,
    capture_records: Counter<u64>,
    model_accuracy: Gauge<f64>,
    drift_psi: Gauge<f64>,
    monitor_alerts: Counter<u64>,
}

/// Seconds, from a millisecond up to five minutes: the SDK's default buckets are made for
/// milliseconds and would put every latency in one bucket.
const SECONDS_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
const CONFIDENCE_BUCKETS: [f64; 11] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99];

impl Metrics {
    fn new(meter: &Meter) -> Self {
        let counter = |name: &'static str, unit: &'static str, help: &'static str| {
            meter.u64_counter(name).with_unit(unit).with_description(help).build()
        };
        let seconds = |name: &'static str, help: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(help)
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build()
        };
        Self {
            records_received: counter(RECORDS_RECEIVED, "{record}", "Records a stage received (redeliveries included)"),
            records_processed: counter(
                RECORDS_PROCESSED,
                "{record}",
                "Records a stage handled and passed on (or stored, at results)",
            ),
            records_failed: counter(
                RECORDS_FAILED,
                "{record}",
                "Records a stage could not handle, by reason and whether they were dead-lettered or will be retried",
            ),
            records_arrived: counter(
                RECORDS_ARRIVED,
                "{record}",
                "Records ingest took in from the stream (checkpointed), by shard: every producer's",
            ),
            dlq_entries: counter(DLQ_ENTRIES, "{entry}", "Entries a stage wrote to its dead-letter queue"),
            review_entries: counter(REVIEW_ENTRIES, "{entry}", "Low-confidence results sent to the review queue"),
            batch_size: meter
                .u64_histogram(BATCH_SIZE)
                .with_unit("{record}")
                .with_description("Records per batch a stage processed")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            batch_duration: seconds(BATCH_DURATION, "Time from receiving a batch to acknowledging it"),
            queue_messages: meter
                .u64_gauge(QUEUE_MESSAGES)
                .with_unit("{message}")
                .with_description(
                    "Messages in a queue: visible (waiting) or in flight (received, not yet acknowledged)",
                )
                .build(),
            queue_oldest_age: meter
                .f64_gauge(QUEUE_OLDEST_AGE)
                .with_unit("s")
                .with_description("Age of the oldest message in the last batch received from a queue; 0 once a receive finds none")
                .build(),
            stream_lag: meter
                .u64_gauge(STREAM_LAG)
                .with_unit("ms")
                .with_description("How far this consumer's read position is behind the tip of a shard")
                .build(),
            stream_leases: meter
                .u64_gauge(STREAM_LEASES)
                .with_unit("{lease}")
                .with_description("1 for each shard whose lease this worker holds, 0 once let go")
                .build(),
            stream_trimmed: counter(
                STREAM_TRIMMED,
                "{shard}",
                "Shards taken up again past a checkpoint older than the stream keeps records: records \
                 written after it may have been trimmed before ingest read them",
            ),
            inference_duration: seconds(INFERENCE_DURATION, "Time one inference call took, by backend"),
            inference_records: counter(INFERENCE_RECORDS, "{record}", "Records scored, by backend"),
            confidence: meter
                .f64_histogram(PREDICTION_CONFIDENCE)
                .with_unit("1")
                .with_description("Confidence of each prediction, by predicted class")
                .with_boundaries(CONFIDENCE_BUCKETS.to_vec())
                .build(),
            record_latency: seconds(RECORD_LATENCY, "Time from a record's arrival at ingest to its stored result"),
            capture_records: counter(
                CAPTURE_RECORDS,
                "{record}",
                "Predictions written to the capture log, or dropped after it could not be written for too long",
            ),
            model_accuracy: meter
                .f64_gauge(MODEL_ACCURACY)
                .with_unit("1")
                .with_description("Accuracy against true labels over the monitor's window, overall (class=all) and per true class")
                .build(),
            drift_psi: meter
                .f64_gauge(DRIFT_PSI)
                .with_unit("1")
                .with_description("Population stability index against the reference: predicted classes, confidences, the most moved feature")
                .build(),
            monitor_alerts: counter(MONITOR_ALERTS, "{alert}", "Alerts the monitor sent, raised (state=firing) or closed (state=resolved), by check: one a crossing, counted once delivered"),
        }
    }

    /// Starts `stage`'s counters at zero, so that a rate or an alert on them has a series to
    /// read before the first record, DLQ entry or review comes. (Failures are not: their
    /// reasons and actions come with them, and a series without them would break the counter's
    /// label set; `or vector(0)` reads an absent one as zero.)
    pub fn start(&self, stage: StageName) {
        for counter in [&self.records_received, &self.records_processed, &self.dlq_entries] {
            counter.add(0, &[stage_label(stage)]);
        }
        if stage == StageName::Results {
            self.review_entries.add(0, &[]);
            self.captured(0, 0);
        }
    }

    pub fn received(&self, stage: StageName, n: usize) {
        self.records_received.add(n as u64, &[stage_label(stage)]);
    }

    pub fn processed(&self, stage: StageName, n: usize) {
        self.records_processed.add(n as u64, &[stage_label(stage)]);
    }

    pub fn failed(&self, stage: StageName, reason: &str, action: FailureAction) {
        let labels =
            [stage_label(stage), KeyValue::new(REASON, reason.to_owned()), KeyValue::new(ACTION, action.as_str())];
        self.records_failed.add(1, &labels);
    }

    pub fn arrived(&self, shard: &str, n: u64) {
        self.records_arrived.add(n, &[KeyValue::new(SHARD, shard.to_owned())]);
    }

    /// Messages a worker sent to `queue`: counted as DLQ or review entries where they are.
    pub fn sent(&self, queue: QueueName, n: usize) {
        if let Some(stage) = queue.dlq_stage() {
            self.dlq_entries.add(n as u64, &[stage_label(stage)]);
        } else if queue == QueueName::Review {
            self.review_entries.add(n as u64, &[]);
        }
    }

    pub fn batch(&self, stage: StageName, size: usize, seconds: f64) {
        self.batch_size.record(size as u64, &[stage_label(stage)]);
        self.batch_duration.record(seconds, &[stage_label(stage)]);
    }

    pub fn queue_depth(&self, queue: QueueName, visible: u64, in_flight: u64) {
        let name = KeyValue::new(QUEUE, queue.as_str());
        self.queue_messages.record(visible, &[name.clone(), KeyValue::new(STATE, "visible")]);
        self.queue_messages.record(in_flight, &[name, KeyValue::new(STATE, "in_flight")]);
    }

    pub fn oldest_message_age(&self, queue: QueueName, seconds: f64) {
        self.queue_oldest_age.record(seconds, &[KeyValue::new(QUEUE, queue.as_str())]);
    }

    pub fn stream_lag(&self, shard: &str, millis: u64) {
        self.stream_lag.record(millis, &[KeyValue::new(SHARD, shard.to_owned())]);
    }

    /// A shard taken up: `trimmed` if past the stream's retention (0 otherwise, so that the
    /// series is there to alert on its first increase).
    pub fn stream_taken_up(&self, shard: &str, trimmed: bool) {
        self.stream_trimmed.add(u64::from(trimmed), &[KeyValue::new(SHARD, shard.to_owned())]);
    }

    pub fn lease(&self, shard: &str, held: bool) {
        self.stream_leases.record(u64::from(held), &[KeyValue::new(SHARD, shard.to_owned())]);
    }

    pub fn inference(&self, backend: &str, records: usize, seconds: f64) {
        let labels = [KeyValue::new(BACKEND, backend.to_owned())];
        self.inference_duration.record(seconds, &labels);
        self.inference_records.add(records as u64, &labels);
    }

    pub fn prediction(&self, class: &str, confidence: f64) {
        self.confidence.record(confidence, &[KeyValue::new(CLASS, class.to_owned())]);
    }

    pub fn record_latency(&self, seconds: f64) {
        self.record_latency.record(seconds, &[]);
    }

    pub fn model_accuracy(&self, class: &str, value: f64) {
        self.model_accuracy.record(value, &[KeyValue::new(CLASS, class.to_owned())]);
    }

    pub fn drift_psi(&self, check: &str, value: f64) {
        self.drift_psi.record(value, &[KeyValue::new(CHECK, check.to_owned())]);
    }

    pub fn monitor_alert(&self, check: &str, firing: bool) {
        let state = if firing { "firing" } else { "resolved" };
        self.monitor_alerts.add(1, &[KeyValue::new(CHECK, check.to_owned()), KeyValue::new(STATE, state)]);
    }

    pub fn captured(&self, written: u64, dropped: u64) {
        self.capture_records.add(written, &[KeyValue::new(OUTCOME, "written")]);
        self.capture_records.add(dropped, &[KeyValue::new(OUTCOME, "dropped")]);
    }
}

fn stage_label(stage: StageName) -> KeyValue {
    KeyValue::new(STAGE, stage.as_str())
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's instruments (no-ops until [`super::init`] has set up a meter provider).
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(&opentelemetry::global::meter(METER)))
}

/// Reports this process's AWS requests by operation, read from the request counter each time
/// metrics are collected (a counter kept elsewhere is observed, not counted twice).
pub(super) fn observe_aws_requests(meter: &Meter) {
    meter
        .u64_observable_counter(AWS_REQUESTS)
        .with_unit("{request}")
        .with_description("AWS requests this process's pipeline work sent, by service and operation")
        .with_callback(|observer| {
            for (operation, n) in crate::backend::aws::requests().snapshot() {
                observer.observe(n, &[KeyValue::new(OPERATION, operation)]);
            }
        })
        .build();
}
