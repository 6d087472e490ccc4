//! The `sluice` command as a user runs it.

mod common;

use std::process::Command;

use common::{bin, demo_summary, test_env};
use sluice_core::envelope::{ContentType, Envelope, RecordId};

fn sluice(args: &[&str]) -> std::process::Output {
    let out = test_env(&mut Command::new(bin("sluice"))).args(args).output().unwrap();
    assert!(out.status.success(), "sluice {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `--photos`: the same digits as 480×360 JPEGs, each record accounted for (the digits model
/// shrinks them back to 8×8, so no accuracy bar).
#[test]
fn the_demo_on_photos_accounts_for_every_record() {
    let summary = demo_summary(test_env(&mut Command::new(bin("sluice"))).args(["demo", "--photos", "--json"]));
    assert_eq!(summary["dlq"]["features"], 0, "every photo decoded and resized: {summary}");
}

/// `sluice train` makes a bundle the pipeline serves: trained on what the features stage makes
/// (u8 pixels) through the model's own normalisation, as serving is.
#[test]
fn a_trained_bundle_serves_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("digits");
    let report = json(&sluice(&["train", "--epochs", "3", "--out", bundle.to_str().unwrap()]));
    assert!(report["test_accuracy"].as_f64().unwrap() >= 0.95, "{report}");
    let summary = demo_summary(
        test_env(&mut Command::new(bin("sluice"))).env("SLUICE__MODEL__DIR", &bundle).args(["demo", "--json"]),
    );
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.95, "{summary}");
}

/// Run away from the repository (an installed binary), as the README's first command: its
/// data and its model are built in.
#[test]
fn demo_accounts_for_every_record_and_meets_the_accuracy_bar() {
    let elsewhere = tempfile::tempdir().unwrap();
    let summary = demo_summary(
        test_env(&mut Command::new(bin("sluice")))
            .env_remove("SLUICE__MODEL__DIR")
            .current_dir(elsewhere.path())
            .args(["demo", "--json"]),
    );
    for key in ["records_in", "results", "review", "dlq", "accuracy", "throughput_rps", "latency_ms"] {
        assert!(summary.get(key).is_some(), "missing {key} in {summary}");
    }
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.97, "{summary}");
    assert!(summary["latency_ms"]["p99"].as_f64().unwrap() >= summary["latency_ms"]["p50"].as_f64().unwrap());
    assert!(summary["throughput_rps"].as_f64().unwrap() > 0.0);
}

#[test]
fn produce_run_and_stats_as_separate_commands() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.sqlite");
    let store = store.to_str().unwrap();
    sluice(&["produce", "--store", store, "--digits", "test", "--repeat", "2"]);
    sluice(&["produce", "--store", store, "--digits", "validation", "--json"]);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("empty.png"), b"").unwrap();
    std::fs::write(files.join("notes.txt"), b"not an image").unwrap();
    // A JSON-lines file is a record a line; a hidden file and a subdirectory are passed over.
    std::fs::write(files.join("events.jsonl"), b"{\"p00\": 3}\r\n\n{\"p01\": 5}\n").unwrap();
    std::fs::write(files.join(".DS_Store"), b"\0\0\0\x01Bud1").unwrap();
    std::fs::create_dir(files.join("sub")).unwrap();
    let produced = sluice(&["produce", "--store", store, "--dir", files.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&produced.stderr);
    assert!(said.contains("passed over (hidden, or not a file): .DS_Store, sub"), "{said}");
    // A file too large for a stream record travels by claim-check; each copy is a record still.
    let large = dir.path().join("large");
    std::fs::create_dir(&large).unwrap();
    std::fs::write(large.join("noise.png"), noise_png(700, 600)).unwrap();
    sluice(&["produce", "--store", store, "--dir", large.to_str().unwrap(), "--repeat", "2"]);

    let before = json(&sluice(&["stats", "--store", store, "--json"]));
    assert_eq!(before["records_in"], 0, "nothing has reached ingest yet");
    assert_eq!(before["stream"]["pending"], 355 * 2 + 185 + 4 + 2);
    assert_eq!(before["results"], 0);

    sluice(&["run", "--store", store, "--until-drained"]);
    let after = json(&sluice(&["stats", "--store", store, "--json"]));
    // A backup is a store that says the same.
    let copy = dir.path().join("backup.sqlite");
    sluice(&["backup", "--store", store, copy.to_str().unwrap()]);
    let copied = json(&sluice(&["stats", "--store", copy.to_str().unwrap(), "--json"]));
    assert_eq!((&copied["records_in"], &copied["results"]), (&after["records_in"], &after["results"]));
    let n = |k: &str| after[k].as_u64().unwrap();
    assert_eq!(n("records_in"), 355 * 2 + 185 + 4 + 2);
    assert_eq!(n("results") + n("review"), 355 * 2 + 185 + 2 + 2, "repeats and JSON events are distinct records");
    assert_eq!(after["dlq"]["ingest"], 2);

    let review = String::from_utf8(
        sluice(&["results", "--store", store, "--status", "review", "--limit", "100000", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(review.lines().count() as u64, n("review"));
    // One result, with the store's flags before the subcommand or after it.
    let first: serde_json::Value = serde_json::from_str(review.lines().next().unwrap()).unwrap();
    let id = first["record_id"].as_str().unwrap();
    for args in
        [&["results", "--store", store, "get", id, "--json"][..], &["results", "get", id, "--store", store, "--json"]]
    {
        assert_eq!(json(&sluice(args))["record_id"], id, "sluice {args:?}");
    }
    let mixed = test_env(&mut Command::new(bin("sluice")))
        .args(["results", "--store", store, "--status", "review", "get", id])
        .output()
        .unwrap();
    assert!(!mixed.status.success() && String::from_utf8_lossy(&mixed.stderr).contains("go after `list`"));
    let listed = String::from_utf8(sluice(&["dlq", "list", "--store", store, "--stage", "ingest"]).stdout).unwrap();
    assert!(listed.contains("empty_payload") && listed.contains("unsupported_content_type"), "{listed}");
    // A file's result says which file it was: its record's partition key (a line's, for JSON
    // lines; a copy's, claim-checked or not).
    let all = String::from_utf8(sluice(&["results", "--store", store, "--limit", "100000", "--json"]).stdout).unwrap();
    let mut keys: Vec<String> = all
        .lines()
        .filter_map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["attributes"]["partition_key"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    keys.sort();
    assert_eq!(keys, ["events.jsonl:1-0", "events.jsonl:3-0", "noise.png-0", "noise.png-1"]);
}

/// Files over what ingest takes inline travel by claim-check, and keep the ids they name: a PNG
/// between ingest's 1,000,000 bytes and the stream's 1 MiB (once refused as payload_too_large),
/// an envelope (once wrapped whole, and read as a raw event without its id), and a JSON event
/// naming its id in `ingest.record_id_field` (once known only by its content's hash).
#[test]
fn large_files_travel_by_claim_check_under_their_own_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.sqlite");
    let store = store.to_str().unwrap();
    let files = dir.path().join("large");
    std::fs::create_dir(&files).unwrap();
    let between = noise_png(580, 586);
    assert!((1_000_001..1024 * 1024).contains(&between.len()), "{}", between.len());
    std::fs::write(files.join("between.png"), &between).unwrap();
    let envelope =
        Envelope::inline(RecordId::parse("big-envelope").unwrap(), "test", ContentType::Png, noise_png(700, 600));
    std::fs::write(files.join("envelope.json"), envelope.to_json()).unwrap();
    // The same after a byte-order mark (once read as a raw event, under a hash of sluice's).
    let marked =
        Envelope::inline(RecordId::parse("big-bom-envelope").unwrap(), "test", ContentType::Png, noise_png(700, 600));
    std::fs::write(files.join("envelope-bom.json"), [&b"\xEF\xBB\xBF"[..], &marked.to_json()].concat()).unwrap();
    let mut event: serde_json::Map<String, serde_json::Value> =
        (0..64).map(|i| (format!("p{i:02}"), serde_json::Value::from(i % 17))).collect();
    event.insert("event_id".into(), "big-event".into());
    // Over what ingest takes inline, under the 1 MiB it takes of a JSON event (`max_event_bytes`).
    event.insert("note".into(), "x".repeat(1_010_000).into());
    std::fs::write(files.join("event.json"), serde_json::to_vec(&event).unwrap()).unwrap();
    // The same after a byte-order mark, under an id of its own.
    event.insert("event_id".into(), "big-bom-event".into());
    std::fs::write(files.join("event-bom.json"), [&b"\xEF\xBB\xBF"[..], &serde_json::to_vec(&event).unwrap()].concat())
        .unwrap();

    let run = |args: &[&str]| {
        let out = test_env(&mut Command::new(bin("sluice")))
            .env("SLUICE__INGEST__RECORD_ID_FIELD", "event_id")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "sluice {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    run(&["produce", "--store", store, "--dir", files.to_str().unwrap()]);
    run(&["run", "--store", store, "--until-drained"]);
    let stats = json(&run(&["stats", "--store", store, "--json"]));
    assert_eq!(stats["dlq"]["ingest"], 0, "{stats}");
    assert_eq!(stats["results"].as_u64().unwrap() + stats["review"].as_u64().unwrap(), 5, "{stats}");
    for id in ["big-envelope", "big-bom-envelope", "big-event", "big-bom-event"] {
        assert_eq!(json(&run(&["results", "get", id, "--store", store, "--json"]))["record_id"], id);
    }
    // An id field that holds no record id is refused, as ingest refuses it inline.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    event.insert("event_id".into(), 42.into());
    std::fs::write(bad.join("event.json"), serde_json::to_vec(&event).unwrap()).unwrap();
    let refused = test_env(&mut Command::new(bin("sluice")))
        .env("SLUICE__INGEST__RECORD_ID_FIELD", "event_id")
        .args(["produce", "--store", store, "--dir", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("event.json-0") && stderr.contains("event_id"), "{stderr}");
    // So is an envelope ingest would refuse, rather than sent on as a JSON event.
    std::fs::remove_file(bad.join("event.json")).unwrap();
    let mut wrong: serde_json::Value = serde_json::from_slice(&envelope.to_json()).unwrap();
    wrong["schema_version"] = 9.into();
    std::fs::write(bad.join("envelope.json"), serde_json::to_vec(&wrong).unwrap()).unwrap();
    let refused = test_env(&mut Command::new(bin("sluice")))
        .args(["produce", "--store", store, "--dir", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("the envelope envelope.json-0")
            && stderr.contains("schema_version 9"),
        "{stderr}"
    );
}

/// A PNG of noise, which does not compress: over a stream record's 1 MiB at 700×600, about
/// three bytes a pixel.
fn noise_png(width: u32, height: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let img = image::RgbImage::from_fn(width, height, |_, _| {
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        };
        image::Rgb([next(), next(), next()])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// Arguments a command cannot work with are refused as usage errors (exit 2, the flag named),
/// not a panic or a useless result: an endless refresh, a bundle of untrained weights or
/// thresholds no confidence reaches written over the real one, a demo whose model is missing
/// (refused before it makes anything).
#[test]
fn arguments_no_command_can_work_with_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("bundle");
    let out_dir = out_dir.to_str().unwrap();
    for (args, names) in [
        (&["top", "--interval", "inf", "--once"][..], "--interval"),
        (&["train", "--out", out_dir, "--epochs", "0"], "--epochs"),
        (&["train", "--out", out_dir, "--target-precision", "1.5"], "--target-precision"),
    ] {
        let out = test_env(&mut Command::new(bin("sluice"))).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "sluice {args:?}: {stderr}");
        assert!(stderr.contains(names), "sluice {args:?}: {stderr}");
    }
    assert!(!dir.path().join("bundle").exists(), "nothing was trained");
    let missing = dir.path().join("no-model");
    // Said on one line, where to set the bundle too, however the user's shell is set up.
    let out = test_env(&mut Command::new(bin("sluice")))
        .args(["demo"])
        .env("SLUICE__MODEL__DIR", &missing)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no-model") && stderr.contains("SLUICE__MODEL__DIR"), "{stderr}");
    assert!(stderr.trim().lines().count() == 1 && stderr.starts_with("Error: "), "{stderr}");
}

/// Commands that read a store refuse a path with no store, rather than make an empty one there
/// that would look like an idle pipeline.
#[test]
fn reading_commands_refuse_a_store_that_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo").join("s.sqlite");
    let missing = missing.to_str().unwrap();
    let report = dir.path().join("report");
    for args in [
        &["stats", "--store", missing][..],
        &["dlq", "stats", "--store", missing],
        &["dlq", "list", "--store", missing, "--stage", "ingest"],
        &["results", "--store", missing],
        &["report", "--store", missing, "--out", report.to_str().unwrap()],
    ] {
        let out = test_env(&mut Command::new(bin("sluice"))).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "sluice {args:?} passed");
        assert!(stderr.contains("there is no store at"), "sluice {args:?}: {stderr}");
    }
    assert!(!dir.path().join("typo").exists(), "a reading command made the store's folder");
}

#[test]
fn worker_binaries_explain_bad_setup_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.sqlite");
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "[worker]\npoll_wait = 10\n").unwrap();
    // A port another process holds, as a second worker of a kind on one host would find its default.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    for stage in ["ingest", "features", "inference", "results"] {
        let run = |extra: &[&str], model: &std::path::Path, port: &str| {
            let out = Command::new(bin(&format!("sluice-{stage}")))
                .env("SLUICE__MODEL__DIR", model)
                .env("SLUICE__TELEMETRY__PORT", port)
                .args(["--store", store.to_str().unwrap()])
                .args(extra)
                .output()
                .unwrap();
            assert!(!out.status.success(), "sluice-{stage} should refuse to start");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let stderr = run(&["--config", config.to_str().unwrap()], &common::model_dir(), "0");
        assert!(stderr.contains("worker.poll_wait in "), "sluice-{stage} does not name the unknown key:\n{stderr}");
        let stderr = run(&[], &common::model_dir(), &taken_port);
        assert!(
            stderr.contains("SLUICE__TELEMETRY__PORT"),
            "sluice-{stage} does not explain the taken port:\n{stderr}"
        );
        if stage != "ingest" {
            let stderr = run(&[], &dir.path().join("no-such-model"), "0");
            assert!(stderr.contains("model bundle"), "sluice-{stage} does not explain the missing bundle:\n{stderr}");
        }
    }
}

#[test]
fn produce_keeps_to_a_rate_for_a_duration() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("load.sqlite");
    let store = store.to_str().unwrap();
    let started = std::time::Instant::now();
    let out = sluice(&[
        "produce",
        "--store",
        store,
        "--digits",
        "test",
        "--rate",
        "400",
        "--duration",
        "2s",
        "--pattern",
        "spikes",
    ]);
    let took = started.elapsed();
    let report = String::from_utf8(out.stdout).unwrap();
    // Spikes: five times the rate in the first second of every ten: 400 × 5 + 400 × 1 records.
    assert!(report.contains("produced 2400 records"), "{report}");
    assert!(took >= std::time::Duration::from_millis(1500), "it paced itself rather than writing at once ({took:?})");
    let stats = json(&sluice(&["stats", "--store", store, "--json"]));
    assert_eq!(stats["stream"]["pending"], 2400, "distinct records, all on the stream");
}

/// A load run stopped with Ctrl-C stops between two stream calls, exits 0 and says so; what it
/// wrote is on the stream.
#[test]
fn produce_stopped_with_ctrl_c_says_how_far_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("stopped.sqlite");
    let store = store.to_str().unwrap();
    let run = test_env(&mut Command::new(bin("sluice")))
        .args(["produce", "--store", store, "--digits", "test", "--rate", "200", "--duration", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(Command::new("kill").args(["-INT", &run.id().to_string()]).status().unwrap().success());
    let out = run.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("(stopped before the end)"), "{report}");
    let written: u64 =
        report.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{report}"));
    assert!((1..12_000).contains(&written), "{report}");
    let stats = json(&sluice(&["stats", "--store", store, "--json"]));
    assert_eq!(stats["stream"]["pending"], written, "what it said it wrote is on the stream");
}

/// A demo stopped with Ctrl-C stops at once and says so, as a failed run does (on AWS, naming
/// the prefix to tear down), rather than ending without a word.
#[test]
fn the_demo_stopped_with_ctrl_c_says_so() {
    let demo = test_env(&mut Command::new(bin("sluice")))
        .args(["demo", "--repeat", "200"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let signalled = std::time::Instant::now();
    assert!(Command::new("kill").args(["-INT", &demo.id().to_string()]).status().unwrap().success());
    let out = demo.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("stopped by a signal before the demo was done"), "{stderr}");
    assert!(signalled.elapsed() < std::time::Duration::from_secs(20), "stopped at once: {:?}", signalled.elapsed());
}

/// `sluice demo | head`: a reader that goes away is no panic and no error.
#[test]
fn the_demo_passes_over_a_reader_gone_away() {
    let mut demo = test_env(&mut Command::new(bin("sluice")))
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(demo.stdout.take());
    let out = demo.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{stderr}");
}

/// `sluice serve` on a port another program holds says which, at once (before it waits for a
/// store, here one that is not there).
#[test]
fn serve_on_a_taken_port_says_so_at_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sqlite");
    let mut serve = test_env(&mut Command::new(bin("sluice")))
        .args(["serve", "--port", &port, "--store", missing.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while serve.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            serve.kill().unwrap();
            panic!("still running after 20 s: it waits for the store before it binds");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = serve.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")) && stderr.contains("--port"), "{stderr}");
}

/// `sluice top` reads the `/metrics` of its own store's workers only: one of another pipeline
/// on this host (the same default ports) is left out, and said to be.
#[test]
fn top_leaves_out_the_workers_of_another_store() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours.sqlite"), dir.path().join("theirs.sqlite"));
    for store in [&ours, &theirs] {
        sluice(&["produce", "--digits", "test", "--limit", "1", "--store", store.to_str().unwrap()]);
    }
    let port = sluice_core::testing::free_port().unwrap();
    let address = format!("127.0.0.1:{port}");
    let mut worker = test_env(&mut Command::new(bin("sluice-ingest")))
        .args(["--store", theirs.to_str().unwrap()])
        .env("SLUICE__TELEMETRY__PORT", port.to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let top = |store: &std::path::Path| {
        loop {
            let out = sluice(&[
                "top",
                "--once",
                "--interval",
                "0.2",
                "--metrics",
                &address,
                "--store",
                store.to_str().unwrap(),
            ]);
            let view = String::from_utf8(out.stdout).unwrap();
            if !view.contains("no worker /metrics") || view.contains("another store") {
                return view;
            }
            assert!(std::time::Instant::now() < deadline, "the worker's /metrics never answered:\n{view}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let theirs_view = top(&theirs);
    assert!(theirs_view.contains("(/metrics of 1 process)"), "{theirs_view}");
    let ours_view = top(&ours);
    assert!(
        ours_view.contains(&format!(
            "no worker /metrics of this store answered (asked {address}); 1 answering for another store left out"
        )),
        "{ours_view}"
    );
    let _ = worker.kill();
    let _ = worker.wait();
}
