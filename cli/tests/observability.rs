//! Watching a running pipeline on the AWS stand-in: the four worker processes export spans and
//! metrics over OTLP to a receiver in this test and serve `/metrics` and `/readyz`; `sluice
//! produce` starts each record's trace, and a foreign producer (boto3, as an application would
//! use it) writes raw records beside it.
//!
//! It checks that one record's spans from all four stages share one trace (links to the batch
//! spans included) and a raw record's trace starts at ingest; that each worker's `/metrics`
//! holds the numbers the run implies, agreeing with `sluice stats`, which counts the raw records
//! in too; that every metric the Grafana dashboard and the alert rules name is exported; that
//! the inference worker is not ready before its model has loaded and is after; and that each
//! worker stops within its grace period on SIGTERM, flushing its telemetry.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use common::{Worker, aws_env, bin, wait_for};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use sluice_cli::digits::{Split, load_split};
use sluice_core::backend::Backend;
use sluice_core::backend::aws::Names;
use sluice_core::telemetry::health::{fetch, probe};
use sluice_core::telemetry::scrape::{self, total};
use sluice_core::testing::{SETUP_HINT, aws_endpoint, aws_store_config, free_port, unique_prefix};
use sluice_core::topology::StageName;

const GRACE: Duration = Duration::from_secs(10);
const TRACED: usize = 6;
const RAW_IMAGES: usize = 2;
/// One raw record that is not an image nor JSON: ingest dead-letters it.
const RAW_BAD: usize = 1;
const RECORDS: usize = TRACED + RAW_IMAGES + RAW_BAD;

/// What the in-test OTLP/HTTP receiver has been sent.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    metric_names: BTreeSet<String>,
}

/// Listens on a free loopback port for OTLP over HTTP (protobuf), as a collector would.
async fn otlp_receiver() -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let (traces, metrics) = (Arc::clone(&received), Arc::clone(&received));
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(move |body: Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP traces in protobuf");
                let spans = request.resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
                traces.lock().unwrap().spans.extend(spans);
                ""
            }),
        )
        .route(
            "/v1/metrics",
            post(move |body: Bytes| async move {
                let request = ExportMetricsServiceRequest::decode(body).expect("OTLP metrics in protobuf");
                let names = request.resource_metrics.into_iter().flat_map(|r| r.scope_metrics).flat_map(|s| s.metrics);
                metrics.lock().unwrap().metric_names.extend(names.map(|m| m.name));
                ""
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// Telemetry settings every process of this test shares.
fn otel_env<'a>(cmd: &'a mut Command, prefix: &str, collector: &str) -> &'a mut Command {
    aws_env(cmd, prefix)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "1000")
}

fn has(span: &Span, key: &str) -> bool {
    span.attributes.iter().any(|a| a.key == key)
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

/// Puts raw records on the stream with boto3, as an application that never heard of sluice does.
fn boto3_put_records(prefix: &str, files: &[&Path]) {
    let moto = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("moto_server")).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("boto3 comes with moto server's virtual environment: {SETUP_HINT}"));
    let python = moto.with_file_name("python");
    let script = r#"
import sys, boto3
client = boto3.client("kinesis", endpoint_url=sys.argv[1], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
records = [{"Data": open(path, "rb").read(), "PartitionKey": path} for path in sys.argv[3:]]
response = client.put_records(StreamName=sys.argv[2], Records=records)
assert response["FailedRecordCount"] == 0, response
"#;
    let out = Command::new(python)
        .args(["-c", script, &aws_endpoint(), &Names::new(prefix).stream()])
        .args(files)
        .output()
        .unwrap();
    assert!(out.status.success(), "boto3 put_records: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_seen_in_traces_metrics_health_and_stats() {
    let (collector, received) = otlp_receiver().await;
    let prefix = unique_prefix("observe");
    let config = aws_store_config(&prefix);
    sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
    let backend = Backend::open_observer(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut workers = Vec::new();
    let mut addresses = BTreeMap::new();
    for stage in StageName::ALL {
        let address = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
        let name = format!("sluice-{stage}");
        let mut cmd = Command::new(bin(&name));
        otel_env(&mut cmd, &prefix, &collector)
            .env("SLUICE__TELEMETRY__PORT", address.port().to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("{stage}.log"))).unwrap());
        let mut child = cmd.spawn().unwrap();
        if stage == StageName::Inference {
            // The endpoint answers at once; readiness waits for the model and the first receive.
            let deadline = Instant::now() + Duration::from_secs(60);
            let first = loop {
                match probe(address, "/readyz").await {
                    Ok(ready) => break ready,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
                assert!(child.try_wait().unwrap().is_none(), "the inference worker exited before it answered");
                assert!(Instant::now() < deadline, "the inference worker's endpoint never answered");
            };
            assert!(!first, "the inference worker was ready before its model had loaded");
        }
        addresses.insert(stage, address);
        workers.push(Worker { name: name.clone(), child, log: dir.path().join(format!("{stage}.log")) });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (stage, address) in &addresses {
        while !probe(*address, "/readyz").await.unwrap_or(false) {
            assert!(Instant::now() < deadline, "{stage} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Six records from `sluice produce` (traced from their creation), three raw from boto3.
    let produced = otel_env(&mut Command::new(bin("sluice")), &prefix, &collector)
        .args(["produce", "--digits", "test", "--limit", &TRACED.to_string()])
        .output()
        .unwrap();
    assert!(produced.status.success(), "{}", String::from_utf8_lossy(&produced.stderr));
    let digits = load_split(Split::Test).unwrap();
    let mut files = Vec::new();
    for (i, digit) in digits.iter().skip(100).take(RAW_IMAGES).enumerate() {
        files.push(dir.path().join(format!("raw-{i}.png")));
        std::fs::write(files.last().unwrap(), digit.to_png()).unwrap();
    }
    files.push(dir.path().join("raw-bad.bin"));
    std::fs::write(files.last().unwrap(), b"\x00\x01 neither an image nor JSON").unwrap();
    boto3_put_records(&prefix, &files.iter().map(|p| p.as_path()).collect::<Vec<_>>());

    let stats = wait_for(&backend, Duration::from_secs(180), "every record to reach an end", |s| {
        s.accounted() >= RECORDS as u64 && s.is_drained()
    })
    .await;
    assert_eq!(stats.records_in, RECORDS as u64, "raw records count in too: {stats:#?}");
    assert_eq!(stats.accounted(), RECORDS as u64, "{stats:#?}");
    assert_eq!(stats.dlq[&StageName::Ingest], RAW_BAD as u64, "{stats:#?}");
    let shown =
        otel_env(&mut Command::new(bin("sluice")), &prefix, &collector).args(["stats", "--json"]).output().unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["records_in"], RECORDS, "{shown}");

    // Each worker's /metrics: the numbers this run implies.
    let mut scrapes = BTreeMap::new();
    for (stage, address) in &addresses {
        let (status, body) = fetch(*address, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        scrapes.insert(*stage, scrape::parse(&body));
    }
    let good = (RECORDS - RAW_BAD) as f64;
    let stage_total = |stage: StageName, name: &str| total(&scrapes[&stage], name, &[("stage", stage.as_str())]);
    let ingest = &scrapes[&StageName::Ingest];
    assert_eq!(stage_total(StageName::Ingest, "sluice_records_received_total"), RECORDS as f64);
    assert_eq!(total(ingest, "sluice_records_arrived_total", &[]), stats.records_in as f64, "arrivals by shard");
    assert_eq!(stage_total(StageName::Ingest, "sluice_dlq_entries_total"), stats.dlq[&StageName::Ingest] as f64);
    assert_eq!(
        total(ingest, "sluice_records_failed_total", &[("stage", "ingest"), ("action", "dead_lettered")]),
        RAW_BAD as f64
    );
    assert_eq!(total(ingest, "sluice_stream_leases", &[]), stats.stream.shards as f64, "one worker holds every shard");
    for stage in StageName::ALL {
        assert_eq!(stage_total(stage, "sluice_records_processed_total"), good, "{stage} processed");
        assert!(stage_total(stage, "sluice_batch_size_count") >= 1.0, "{stage} batches");
    }
    let inference = &scrapes[&StageName::Inference];
    assert_eq!(total(inference, "sluice_inference_records_total", &[("backend", "candle-cpu")]), good);
    assert_eq!(total(inference, "sluice_breaker_state", &[]), 0.0, "the breaker stayed closed");
    let results = &scrapes[&StageName::Results];
    assert_eq!((stats.results + stats.review) as f64, good);
    assert_eq!(total(results, "sluice_review_entries_total", &[]), stats.review as f64);
    assert_eq!(total(results, "sluice_prediction_confidence_ratio_count", &[]), good);
    assert_eq!(total(results, "sluice_record_latency_seconds_count", &[]), good);
    assert!(
        total(&scrapes[&StageName::Features], "sluice_aws_requests_total", &[("operation", "SQS.ReceiveMessage")])
            > 0.0
    );

    // Every metric the dashboard and the alert rules query is one the workers export.
    let exported: BTreeSet<&str> = scrapes.values().flatten().map(|s| s.name.as_str()).collect();
    let named = Command::new("python3").arg("../deploy/prometheus/metric_names.py").output().unwrap();
    assert!(named.status.success(), "{}", String::from_utf8_lossy(&named.stderr));
    let named = String::from_utf8(named.stdout).unwrap();
    assert!(named.lines().count() > 10, "the dashboard names metrics: {named}");
    for name in named.lines() {
        assert!(exported.contains(name), "the dashboard or alerts query {name}, which no worker exports");
    }

    // deploy/prometheus/metrics.txt, which the dashboard check reads offline, lists exactly the
    // families exported.
    let listed = std::fs::read_to_string("../deploy/prometheus/metrics.txt").unwrap();
    let listed: BTreeMap<&str, &str> = listed
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once(' '))
        .collect();
    let family = |name: &str| -> String {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix));
        base.filter(|b| listed.get(b) == Some(&"histogram")).unwrap_or(name).to_owned()
    };
    let families: BTreeSet<String> = exported.iter().filter(|n| n.starts_with("sluice_")).map(|n| family(n)).collect();
    assert_eq!(
        families,
        listed.keys().map(|k| k.to_string()).collect::<BTreeSet<_>>(),
        "metrics.txt lists what is exported"
    );
    let described = std::fs::read_to_string("../docs/observability.md").unwrap();
    for family in listed.keys() {
        assert!(described.contains(&format!("| `{family}`")), "docs/observability.md's table lacks {family}");
    }

    // SIGTERM: each stops within its grace period, flushing its spans.
    for worker in workers {
        let log = worker.terminate(GRACE + Duration::from_secs(2));
        assert!(log.contains("worker stopped"), "{log}");
    }

    let received = received.lock().unwrap();
    assert!(received.metric_names.contains("sluice.records.processed"), "metrics over OTLP too");
    let spans = &received.spans;
    let by_trace = |trace: &[u8]| -> Vec<&Span> { spans.iter().filter(|s| s.trace_id == trace).collect() };
    let stages_in = |trace: &[u8]| -> BTreeSet<String> {
        by_trace(trace).into_iter().filter_map(|s| attribute(s, "sluice.stage")).map(str::to_owned).collect()
    };
    let all_stages: BTreeSet<String> = StageName::ALL.iter().map(|s| s.as_str().to_owned()).collect();
    let span_ids: BTreeSet<&[u8]> = spans.iter().map(|s| s.span_id.as_slice()).collect();

    let created: Vec<&Span> = spans.iter().filter(|s| s.name == "create records").collect();
    assert_eq!(created.len(), TRACED, "one create span per produced record");
    for create in created {
        assert_eq!(
            stages_in(&create.trace_id),
            all_stages,
            "{:?}: one trace through all four stages",
            attribute(create, "messaging.message.id")
        );
        for span in by_trace(&create.trace_id).into_iter().filter(|s| s.span_id != create.span_id) {
            assert!(!span.parent_span_id.is_empty(), "{} hangs off the record's trace", span.name);
            assert!(
                span.links.iter().any(|l| span_ids.contains(l.span_id.as_slice())),
                "{} links to its batch",
                span.name
            );
        }
    }
    // The raw images' traces start at ingest and reach the end; the bad record's ends there.
    let raw_roots: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            attribute(s, "sluice.stage") == Some("ingest")
                && s.parent_span_id.is_empty()
                && !s.name.starts_with("receive")
        })
        .filter(|s| !has(s, "messaging.batch.message_count") && has(s, "messaging.message.id"))
        .collect();
    let complete = raw_roots.iter().filter(|root| stages_in(&root.trace_id) == all_stages).count();
    assert_eq!(complete, RAW_IMAGES, "each raw image's trace starts at ingest and runs to results");
    assert!(raw_roots.iter().any(|root| attribute(root, "error.type").is_some()), "the bad record's span says why");
    // Batch process spans link to each record's creation context.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "process records" && has(s, "messaging.batch.message_count") && !s.links.is_empty())
    );
}
