//! Model monitoring as a user runs it, on the embedded store: a demo run's predictions are
//! captured; honest true labels fed back change nothing and raise no alert; labels drawn from
//! a shifted distribution raise exactly one alert at a webhook, however often the monitor runs;
//! feeding a file twice changes nothing the second time; the report draws every chart.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use common::{bin, demo_summary, model_dir, test_env};

fn sluice(store: &Path, args: &[&str]) -> Output {
    let out = test_env(&mut Command::new(bin("sluice")))
        .env("SLUICE__MODEL__DIR", model_dir())
        .args(args)
        .arg("--store")
        .arg(store)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A webhook receiver on 127.0.0.1 that keeps every body posted to it.
fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let posts: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let kept = Arc::clone(&posts);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().route(
                "/alerts",
                axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        kept.lock().unwrap().push(body);
                        "ok"
                    }
                }),
            );
            axum::serve(listener, app).await.unwrap();
        });
    });
    (url, posts)
}

#[test]
fn shifted_labels_raise_one_alert_honest_ones_none_and_the_report_draws_every_chart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("run.sqlite");
    let demo = demo_summary(test_env(&mut Command::new(bin("sluice"))).args(["demo", "--json", "--store"]).arg(&store));
    let stored = demo["results"].as_u64().unwrap() + demo["review"].as_u64().unwrap();

    // Every stored prediction is in the capture log beside the store.
    let capture_dir = dir.path().join("run.capture");
    let lines: Vec<serde_json::Value> = std::fs::read_dir(&capture_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|p| {
            std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(lines.len() as u64, stored);
    assert!(
        lines.iter().all(|l| l["schema"] == "sluice.capture/1" && l["probabilities"].as_array().unwrap().len() == 10)
    );
    // The producer's attributes come along: the demo labels every digit.
    assert!(lines.iter().all(|l| l["attributes"]["label"].is_string()), "{}", lines[0]);

    let results: Vec<serde_json::Value> =
        String::from_utf8(sluice(&store, &["results", "list", "--limit", "1000", "--json"]).stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(results.len() as u64, stored);
    let (url, posts) = webhook();
    sluice(&store, &["monitor", "--set-reference"]);

    // Honest labels: what the producer said already.
    let honest = dir.path().join("honest.csv");
    let mut csv = String::from("record_id,label\n");
    for r in &results {
        csv.push_str(&format!("{},{}\n", r["record_id"].as_str().unwrap(), r["ground_truth"].as_str().unwrap()));
    }
    csv.push_str("no-such-record,4\nbroken line\n");
    std::fs::write(&honest, csv).unwrap();
    let fed = json(&sluice(&store, &["feedback", "--file", honest.to_str().unwrap(), "--json"]));
    assert_eq!((fed["recorded"].as_u64(), fed["unchanged"].as_u64()), (Some(0), Some(stored)), "{fed}");
    assert_eq!(fed["unknown_ids"], serde_json::json!(["no-such-record"]));
    assert_eq!(fed["rejected"].as_array().unwrap().len(), 1, "{fed}");
    let pass = json(&sluice(&store, &["monitor", "--webhook-url", &url, "--json"]));
    let checks = pass["checks"].as_array().unwrap();
    assert!(!checks.is_empty() && checks.iter().all(|c| c["breached"] == false), "{pass}");
    assert!(pass["quality"]["overall"]["correct"].as_u64().unwrap() as f64 > 0.95 * stored as f64, "{pass}");
    assert!(posts.lock().unwrap().is_empty(), "honest labels raise nothing");

    // Shifted labels: every third record "was" the next digit.
    let shifted = dir.path().join("shifted.jsonl");
    let mut jsonl = String::new();
    for (i, r) in results.iter().enumerate() {
        let truth: u32 = r["ground_truth"].as_str().unwrap().parse().unwrap();
        let label = if i % 3 == 0 { (truth + 1) % 10 } else { truth };
        jsonl.push_str(&format!("{}\n", serde_json::json!({"record_id": r["record_id"], "label": label.to_string()})));
    }
    std::fs::write(&shifted, jsonl).unwrap();
    let fed = json(&sluice(&store, &["feedback", "--file", shifted.to_str().unwrap(), "--json"]));
    assert_eq!(fed["recorded"].as_u64(), Some(stored.div_ceil(3)), "{fed}");
    let again = json(&sluice(&store, &["feedback", "--file", shifted.to_str().unwrap(), "--json"]));
    assert_eq!(again["recorded"].as_u64(), Some(0), "feeding the same file again changes nothing: {again}");
    for _ in 0..3 {
        sluice(&store, &["monitor", "--webhook-url", &url]);
    }
    let got = posts.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one alert for one crossing: {got:?}");
    assert_eq!(got[0]["sluice"]["check"], "accuracy");
    assert_eq!(got[0]["sluice"]["status"], "firing");
    assert!(got[0]["text"].as_str().unwrap().contains("baseline 85.0%"), "{got:?}");

    // One review item settled: the report counts it as sent to review, no longer waiting.
    let sent_to_review = demo["review"].as_u64().unwrap();
    assert!(sent_to_review > 0, "the demo sends some to review: {demo}");
    let waiting = results.iter().find(|r| r["status"] == "review").unwrap();
    sluice(&store, &["review", "--label", waiting["record_id"].as_str().unwrap(), "3"]);

    // The report: one page, every chart drawn with data.
    let out = dir.path().join("report");
    let summary = json(&sluice(&store, &["report", "--out", out.to_str().unwrap(), "--json"]));
    assert_eq!(summary["charts"], 7, "{summary}");
    assert_eq!(summary["records"].as_u64(), Some(stored));
    assert_eq!(
        (summary["review"].as_u64(), summary["review_waiting"].as_u64()),
        (Some(sent_to_review), Some(sent_to_review - 1))
    );
    assert_eq!(summary["dead_lettered"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 6);
    let page = std::fs::read_to_string(out.join("index.html")).unwrap();
    let charts: Vec<&str> = page.split("<svg").skip(1).collect();
    assert_eq!(charts.len(), 7);
    for chart in charts {
        assert!(
            chart.contains("<circle") || chart.contains("<polyline"),
            "a chart with nothing drawn: {}",
            &chart[..300.min(chart.len())]
        );
    }
    for fetch in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!page.contains(fetch), "the page needs nothing from the network ({fetch})");
    }
    assert!(page.contains("alerts firing") && page.contains(">accuracy<"));
    assert!(page.contains(&format!("{sent_to_review} ({} waiting)", sent_to_review - 1)));
}
