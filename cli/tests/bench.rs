//! `sluice bench inference` runs both runtimes on the same inputs and checks they agree before
//! timing (a short run: the figures themselves belong in docs/benchmarks.md, not in a test).

mod common;

use std::process::Command;

use common::{bin, model_dir};

#[test]
fn the_inference_bench_checks_agreement_and_reports_every_batch_size() {
    let python = std::env::var("SLUICE_BENCH_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = Command::new(bin("sluice"))
        .args(["bench", "inference", "--batches", "1,4", "--min-seconds", "0.05", "--threads", "1", "--json"])
        .arg("--model")
        .arg(model_dir())
        .arg("--python")
        .arg(python)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} (pip install -r bench/requirements.txt, or set SLUICE_BENCH_PYTHON)",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["max_relative_error"].as_f64().unwrap() < 1e-4, "{report}");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 4]);
    for row in rows {
        for key in ["candle_images_per_s", "ort_images_per_s", "ratio"] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key}: {report}");
        }
    }
}
