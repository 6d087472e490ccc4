//! The demo on the AWS backend, against the local endpoint (moto server on 127.0.0.1), at the
//! store's default timeouts, so its request count is what a user would see.

mod common;

use std::process::Command;

use common::{aws_env, bin, demo_summary};
use sluice_core::testing::unique_prefix;

#[test]
fn demo_runs_end_to_end_on_aws_and_batches_its_requests() {
    let summary = demo_summary(aws_env(&mut Command::new(bin("sluice")), &unique_prefix("demo")).args([
        "demo",
        "--backend",
        "aws",
        "--json",
    ]));
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.97);
    let per_record = summary["aws_requests_per_record"].as_f64().unwrap();
    assert!(per_record <= 1.5, "{per_record} AWS requests per record: {}", summary["aws_requests"]);
}
