//! Traces across the stages, after OpenTelemetry's messaging conventions.
//!
//! Each batch a worker handles is one trace of its own: a `receive` span (client), a `process`
//! span (consumer) linked to every record's creation context, and a `send` span (producer) per
//! queue it writes to. Each record also gets a `process` span per stage, a child of the context
//! it arrived with (the previous stage's span, or the producer's) and linked to its batch; that
//! span's context is what the record carries on, in its envelope and in the `traceparent`
//! message attribute. So one record's spans from all four stages share one trace. A record
//! from a producer that sent no context starts its trace at ingest.
//!
//! Off unless OTLP export is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); then [`enabled`] is false and the worker loop does no
//! tracing work at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Link, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The message attribute (and envelope field's format) carrying a W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The record stream's name in spans.
pub const STREAM: &str = "records";

/// The instrumentation scope of sluice's spans.
const TRACER: &str = "sluice";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(super) fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Where a batch came from or goes: `messaging.system` and `messaging.destination.name`.
#[derive(Debug, Clone)]
pub struct Destination {
    pub system: &'static str,
    pub name: String,
}

/// The `messaging.system` of the stream and of the queues for a backend.
pub fn messaging_systems(aws: bool) -> (&'static str, &'static str) {
    if aws { ("aws_kinesis", "aws_sqs") } else { ("sluice_embedded", "sluice_embedded") }
}

fn attributes(operation: &'static str, destination: &Destination) -> Vec<KeyValue> {
    vec![
        KeyValue::new("messaging.system", destination.system),
        KeyValue::new("messaging.destination.name", destination.name.clone()),
        KeyValue::new("messaging.operation.type", operation),
        KeyValue::new("messaging.operation.name", operation),
    ]
}

/// The context a `traceparent` value names (an empty context for none or a malformed one).
pub fn extract(traceparent: Option<&str>) -> Context {
    let Some(value) = traceparent else { return Context::new() };
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The `traceparent` value naming `cx`'s span.
pub fn inject(cx: &Context) -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// `traceparent` in its canonical W3C form, or `None` when it names no valid span context: a
/// producer's value travels on in queue attributes, where SQS refuses control characters, so
/// only one that parses goes on (a malformed one starts a new trace, as W3C asks).
pub fn canonical(traceparent: &str) -> Option<String> {
    inject(&extract(Some(traceparent)))
}

/// The spans of one batch, from receive to acknowledgement.
pub struct BatchTrace {
    process: Context,
    records: Vec<Context>,
}

impl BatchTrace {
    /// Starts a batch received from `source` since `started`, one record per `parents` entry
    /// (the `traceparent` it arrived with, if any).
    pub fn start(stage: &str, source: &Destination, parents: &[Option<&str>], started: SystemTime) -> Self {
        let tracer = global::tracer(TRACER);
        let count = KeyValue::new("messaging.batch.message_count", parents.len() as i64);
        let stage_attribute = KeyValue::new("sluice.stage", stage.to_owned());

        let mut receive_attributes = attributes("receive", source);
        receive_attributes.extend([count.clone(), stage_attribute.clone()]);
        let receive = tracer
            .span_builder(format!("receive {}", source.name))
            .with_kind(SpanKind::Client)
            .with_start_time(started)
            .with_attributes(receive_attributes)
            .start_with_context(&tracer, &Context::new());
        let receive = Context::new().with_span(receive);
        receive.span().end();

        let parent_contexts: Vec<Context> = parents.iter().map(|p| extract(*p)).collect();
        let links = parent_contexts
            .iter()
            .map(|cx| cx.span().span_context().clone())
            .filter(|sc| sc.is_valid())
            .map(Link::with_context)
            .collect();
        let mut process_attributes = attributes("process", source);
        process_attributes.extend([count, stage_attribute.clone()]);
        let process = tracer
            .span_builder(format!("process {}", source.name))
            .with_kind(SpanKind::Consumer)
            .with_attributes(process_attributes)
            .with_links(links)
            .start_with_context(&tracer, &receive);
        let process = receive.with_span(process);

        let batch_link = Link::with_context(process.span().span_context().clone());
        let records = parent_contexts
            .iter()
            .map(|parent| {
                let mut record_attributes = attributes("process", source);
                record_attributes.push(stage_attribute.clone());
                let span = tracer
                    .span_builder(format!("process {}", source.name))
                    .with_kind(SpanKind::Consumer)
                    .with_attributes(record_attributes)
                    .with_links(vec![batch_link.clone()])
                    .start_with_context(&tracer, parent);
                parent.with_span(span)
            })
            .collect();
        Self { process, records }
    }

    /// The context record `index` carries on to the next stage.
    pub fn traceparent(&self, index: usize) -> Option<String> {
        self.records.get(index).and_then(inject)
    }

    /// Names the record on its span, once the stage has read its id.
    pub fn record_id(&self, index: usize, record_id: &str) {
        if let Some(cx) = self.records.get(index) {
            cx.span().set_attribute(KeyValue::new("messaging.message.id", record_id.to_owned()));
        }
    }

    /// Marks record `index` as failed with `reason` (a reason code).
    pub fn record_failed(&self, index: usize, reason: &str, detail: &str) {
        if let Some(cx) = self.records.get(index) {
            cx.span().set_attribute(KeyValue::new("error.type", reason.to_owned()));
            cx.span().set_status(Status::error(detail.to_owned()));
        }
    }

    /// A `send` span for `count` messages to `destination`, linked to the records they carry;
    /// it ends when the returned guard drops.
    pub fn send(&self, destination: &Destination, records: &[usize]) -> SendSpan {
        let tracer = global::tracer(TRACER);
        let links = records
            .iter()
            .filter_map(|&i| self.records.get(i))
            .map(|cx| Link::with_context(cx.span().span_context().clone()))
            .collect();
        let mut send_attributes = attributes("send", destination);
        send_attributes.push(KeyValue::new("messaging.batch.message_count", records.len() as i64));
        let span = tracer
            .span_builder(format!("send {}", destination.name))
            .with_kind(SpanKind::Producer)
            .with_attributes(send_attributes)
            .with_links(links)
            .start_with_context(&tracer, &self.process);
        SendSpan(self.process.with_span(span))
    }

    /// Ends every span of the batch: it is settled.
    pub fn finish(self) {
        for cx in &self.records {
            cx.span().end();
        }
        self.process.span().end();
    }
}

/// A `send` span; ends on drop, failed if [`SendSpan::failed`] said so.
pub struct SendSpan(Context);

impl SendSpan {
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        self.0.span().set_status(Status::error(error.to_string()));
    }
}

impl Drop for SendSpan {
    fn drop(&mut self) {
        self.0.span().end();
    }
}

/// A producer's `create` span for one record written to `destination`, ended at once; returns
/// the `traceparent` the record should carry, or `None` when tracing is off.
pub fn create(destination: &Destination, record_id: &str) -> Option<String> {
    if !enabled() {
        return None;
    }
    let tracer = global::tracer(TRACER);
    let mut create_attributes = attributes("create", destination);
    create_attributes.push(KeyValue::new("messaging.message.id", record_id.to_owned()));
    let span = tracer
        .span_builder(format!("create {}", destination.name))
        .with_kind(SpanKind::Producer)
        .with_attributes(create_attributes)
        .start_with_context(&tracer, &Context::new());
    let cx = Context::new().with_span(span);
    let traceparent = inject(&cx);
    cx.span().end();
    traceparent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_bad_ones_are_ignored() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = extract(Some(value));
        assert!(cx.span().span_context().is_valid());
        assert_eq!(inject(&cx).as_deref(), Some(value));
        assert!(!extract(Some("nonsense")).span().span_context().is_valid());
        assert!(!extract(None).span().span_context().is_valid());
        assert_eq!(canonical(value).as_deref(), Some(value));
        assert_eq!(canonical(&format!("{value}\u{1}")), None);
        assert_eq!(canonical("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
    }
}
