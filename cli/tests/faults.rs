//! The AWS demo through injected faults: a proxy between the pipeline and the AWS stand-in
//! throttles (in each service's own error shape), fails with 500 and 503, delays, and drops
//! connections before and after requests are carried out, at 5% and at 20% of requests. Every
//! record still ends in exactly one result, review item or DLQ entry, and only the corrupt ones
//! in a DLQ; the run says how many requests the faults made the SDK send again.
//!
//! A DLQ entry is known by its record id: when the response to a DLQ send is lost after SQS
//! took the message, the SDK sends it again and a standard queue keeps both copies (as a kill
//! between send and acknowledgement can, in the chaos tests); the copies are one entry.

mod common;

use std::process::Command;

use common::{aws_env, bin, demo_output};
use sluice_core::backend::Backend;
use sluice_core::dlq::{self, Filter, Letters};
use sluice_core::testing::{FaultProxy, FaultRates, aws_endpoint, aws_store_config, unique_prefix};
use sluice_core::topology::StageName;

fn demo_through_faults(rate: f64, seed: u64, sdk_attempts: Option<u32>) {
    let prefix = unique_prefix("faults");
    // The resources are made directly; the pipeline's traffic goes through the faults.
    let mut config = aws_store_config(&prefix);
    config.shards = 2;
    tokio::runtime::Runtime::new().unwrap().block_on(sluice_core::backend::aws::bootstrap::bootstrap(&config)).unwrap();
    let proxy = FaultProxy::start(&aws_endpoint(), FaultRates::spread(rate), seed).unwrap();
    let mut demo = Command::new(bin("sluice"));
    aws_env(&mut demo, &prefix).env("SLUICE__STORE__AWS__ENDPOINT_URL", &proxy.url).args([
        "demo",
        "--backend",
        "aws",
        "--prefix",
        &prefix,
        "--no-bootstrap",
        "--json",
    ]);
    if let Some(attempts) = sdk_attempts {
        // The SDK's standard setting. The workers retry a failed batch anyway; the demo's own
        // summary reads at the end (the DLQs, their claim-checks in S3) are single calls.
        demo.env("AWS_MAX_ATTEMPTS", attempts.to_string());
    }
    let summary = demo_output(&mut demo);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(n(&summary["records_in"]), 355 + 6, "the held-out digits plus six corrupt records: {summary}");
    assert_eq!(n(&summary["results"]) + n(&summary["review"]), 355, "one result per good record: {summary}");
    // The demo's summary looked at the DLQs through the faults: a look whose ReceiveMessage was
    // carried out but its response dropped left those messages hidden for the look's 300 s (SQS
    // has no way to undo a receive nobody heard), so a look here may have to wait them out.
    let (dead, records) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let backend = Backend::open(&config).await.unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(330);
        loop {
            let dead =
                dlq::list(&backend, Letters::Stage(StageName::Ingest), &Filter::default(), usize::MAX).await.unwrap();
            let records: std::collections::BTreeSet<String> =
                dead.iter().map(|e| e.record_id().expect("a corrupt record keeps its id").to_string()).collect();
            if records.len() >= 6 || std::time::Instant::now() > until {
                break (dead, records);
            }
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
    });
    assert_eq!(records.len(), 6, "one DLQ entry per corrupt record ({} copies in all): {summary}", dead.len());
    let dlq_reasons = summary["dlq_reasons"].as_object().unwrap();
    assert!(dlq_reasons.keys().all(|k| k.starts_with("ingest/")), "only the corrupt records: {summary}");
    let counts = proxy.counts();
    let sent: u64 = summary["aws_requests"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    eprintln!(
        "{:.0}% faults: {} requests through the proxy, {} failed and were sent again ({} throttled, {} 5xx, \
         {} dropped before, {} dropped after), {} delayed; the pipeline counted {sent} attempts; summary {summary}",
        rate * 100.0,
        counts.requests,
        counts.failed(),
        counts.throttled,
        counts.server_errors,
        counts.dropped_before,
        counts.dropped_after,
        counts.delayed,
    );
    assert!(counts.failed() > 0 && counts.delayed > 0, "faults were injected: {counts:?}");
}

#[test]
fn the_aws_demo_accounts_for_every_record_through_5_percent_faults() {
    demo_through_faults(0.05, 5, None);
}

#[test]
fn the_aws_demo_accounts_for_every_record_through_20_percent_faults() {
    // One call in five failing outlasts the SDK's default three attempts about once in 125 calls.
    demo_through_faults(0.20, 20, Some(6));
}
