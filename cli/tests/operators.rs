//! The operators' loop with `sluice dlq` and `sluice review`, on both backends, as commands: a
//! demo run's corrupt and low-confidence records are counted, listed, filtered and dry-run; the
//! review items are replayed after a fix (lowered thresholds) and end as results; a person labels
//! one; a replay interrupted (Ctrl-C) gives back what it holds, and one killed with SIGKILL
//! halfway and run again leaves no record with two results and no entry lost. Every count stays exact throughout.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{aws_env, bin, demo_summary, model_dir, test_env};
use sluice_core::backend::{Backend, OutgoingMessage};
use sluice_core::config::StoreConfig;
use sluice_core::envelope::{ContentType, Envelope, Payload, RecordId};
use sluice_core::stats::PipelineStats;
use sluice_core::testing::{aws_store_config, unique_prefix};
use sluice_core::topology::{QueueName, StageName};
use sluice_core::vector::FeatureVector;

/// Where a test's commands point: an embedded store file, or a prefix on the AWS stand-in.
enum Target {
    Embedded(String),
    Aws(String),
}

impl Target {
    fn command(&self, model: &Path) -> Command {
        let mut cmd = Command::new(bin("sluice"));
        match self {
            Target::Embedded(_) => test_env(&mut cmd),
            Target::Aws(prefix) => aws_env(&mut cmd, prefix),
        };
        cmd.env("SLUICE__MODEL__DIR", model);
        cmd
    }

    fn store_args(&self) -> Vec<String> {
        match self {
            Target::Embedded(path) => vec!["--store".into(), path.clone()],
            Target::Aws(prefix) => vec!["--prefix".into(), prefix.clone()],
        }
    }

    fn config(&self) -> StoreConfig {
        match self {
            Target::Embedded(path) => common::store_config(Path::new(path)),
            Target::Aws(prefix) => aws_store_config(prefix),
        }
    }

    /// `sluice <args> <store args>`, which must succeed.
    fn sluice(&self, model: &Path, args: &[&str]) -> Output {
        let out = self.command(model).args(args).args(self.store_args()).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "sluice {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        out
    }
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A copy of the digits bundle whose thresholds accept everything (the "fix" for review items).
fn lenient_bundle(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("lenient");
    std::fs::create_dir_all(&out).unwrap();
    for file in ["model.toml", "model.safetensors"] {
        std::fs::copy(model_dir().join(file), out.join(file)).unwrap();
    }
    let mut manifest = sluice_core::model::ModelBundle::load(model_dir()).unwrap().manifest;
    manifest.thresholds.default = 0.0;
    manifest.thresholds.per_class.clear();
    std::fs::write(out.join("model.toml"), manifest.to_toml()).unwrap();
    out
}

async fn operators_loop(target: Target) {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir();
    let stats = |backend: &Backend| {
        let backend = backend.clone();
        async move { PipelineStats::collect(&backend).await.unwrap() }
    };

    // A demo run, kept: 361 records, six corrupt ones in the ingest DLQ, some in review.
    let demo = demo_summary(target.command(&model).args(["demo", "--json"]).args(target.store_args()));
    let backend = Backend::open_observer(&target.config()).await.unwrap();
    let start = stats(&backend).await;
    assert_eq!(start.accounted(), 361);
    assert!(start.review > 0, "the demo leaves something for review: {demo}");

    // Counted, listed, filtered, shown.
    let counts = json(&target.sluice(&model, &["dlq", "stats", "--json"]));
    let of = |queue: &str| counts.as_array().unwrap().iter().find(|q| q["queue"] == queue).unwrap().clone();
    assert_eq!(of("ingest")["entries"], 6);
    assert_eq!(of("ingest")["records"], 6);
    assert_eq!(of("review")["entries"], start.review);
    assert_eq!(of("ingest")["by_reason"]["invalid_json"], 1);
    let ingest = lines(&target.sluice(&model, &["dlq", "list", "--stage", "ingest", "--json"]));
    assert_eq!(ingest.len(), 6);
    let filtered =
        lines(&target.sluice(&model, &["dlq", "list", "--stage", "ingest", "--reason", "empty_payload", "--json"]));
    assert_eq!(filtered.len(), 1);
    let shown = json(&target.sluice(&model, &["dlq", "show", filtered[0]["record_id"].as_str().unwrap(), "--json"]));
    assert_eq!(shown["reason"], "empty_payload");
    assert_eq!(shown["queue"], "ingest");
    let review = lines(&target.sluice(&model, &["dlq", "list", "--stage", "review", "--limit", "1000", "--json"]));
    assert_eq!(review.len() as u64, start.review);
    // A review item shows the record's attributes, as its result holds them.
    assert!(review.iter().all(|r| r["attributes"]["label"].is_string()), "{:?}", review[0]);
    // Filtered at the median confidence: exactly the items at or under it.
    let confidence = |r: &serde_json::Value| r["verdict"]["confidence"].as_f64().unwrap();
    let mut confidences: Vec<f64> = review.iter().map(confidence).collect();
    confidences.sort_by(f64::total_cmp);
    let median = confidences[confidences.len() / 2];
    let ids = |items: &mut dyn Iterator<Item = &serde_json::Value>| {
        items.map(|r| r["record_id"].as_str().unwrap().to_owned()).collect::<std::collections::BTreeSet<_>>()
    };
    let expected = ids(&mut review.iter().filter(|r| confidence(r) <= median));
    let low = lines(
        &target
            .sluice(&model, &["dlq", "list", "--stage", "review", "--max-confidence", &median.to_string(), "--json"]),
    );
    assert_eq!(ids(&mut low.iter()), expected, "the review items at or under {median}");
    assert!(confidences[0] == median || expected.len() < review.len(), "the filter left some out: {confidences:?}");
    let none = lines(
        &target.sluice(&model, &["dlq", "list", "--stage", "ingest", "--since", "2099-01-01T00:00:00Z", "--json"]),
    );
    assert!(none.is_empty(), "a time window in the future matches nothing");

    // A dry run moves nothing, and lists what a replay would accept: under the thresholds that
    // sent them to review, none.
    let dry = lines(&target.sluice(&model, &["dlq", "replay", "--stage", "review", "--dry-run", "--json"]));
    assert!(dry.is_empty(), "{dry:?}");
    assert_eq!(stats(&backend).await.review, start.review);
    // A listing cut at its limit says how many more match.
    let cut = target
        .command(&model)
        .args(["dlq", "list", "--stage", "ingest", "--limit", "2"])
        .args(target.store_args())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cut.stdout).lines().count(), 2);
    assert!(String::from_utf8_lossy(&cut.stderr).contains("2 of 6 entries that match"), "{cut:?}");
    // Entries go only to a stage that reads what they hold.
    let elsewhere = target
        .command(&model)
        .args(["dlq", "replay", "--stage", "ingest", "--to", "results", "--dry-run"])
        .args(target.store_args())
        .output()
        .unwrap();
    assert!(!elsewhere.status.success());
    assert!(String::from_utf8_lossy(&elsewhere.stderr).contains("cannot go to results"), "{elsewhere:?}");

    // A person labels one item; it leaves review as `reviewed`, both labels kept.
    let first = review[0]["record_id"].as_str().unwrap().to_owned();
    target.sluice(&model, &["review", "--label", &first, "7"]);
    let record = RecordId::parse(&first).unwrap();
    let stored = backend.results.get_batch(std::slice::from_ref(&record)).await.unwrap().remove(&record).unwrap();
    assert_eq!(stored.status.as_str(), "reviewed");
    assert_eq!(stored.reviewed_label.as_deref(), Some("7"));
    assert_eq!(stored.label, review[0]["verdict"]["label"].as_str().unwrap(), "the model's label is kept");
    // Rejecting it now changes nothing, and says so as a failure, as a second label does.
    let late = target.command(&model).args(["review", "--reject", &first]).args(target.store_args()).output().unwrap();
    assert!(!late.status.success(), "{late:?}");
    assert!(String::from_utf8_lossy(&late.stderr).contains("not waiting for review (status reviewed)"), "{late:?}");

    // Another is not fit for a result: it leaves review for the results DLQ, its result gone.
    let second = review[1]["record_id"].as_str().unwrap().to_owned();
    target.sluice(&model, &["review", "--reject", &second]);
    let rejected = lines(
        &target.sluice(&model, &["dlq", "list", "--stage", "results", "--reason", "rejected_in_review", "--json"]),
    );
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["record_id"], second.as_str());
    let record = RecordId::parse(&second).unwrap();
    let marker = backend.results.get_batch(std::slice::from_ref(&record)).await.unwrap().remove(&record).unwrap();
    assert_eq!(marker.status.as_str(), "rejected", "its result is gone: a marker of its end is in its place");
    let markers = lines(&target.sluice(&model, &["results", "list", "--status", "rejected", "--json"]));
    assert_eq!((markers.len(), markers[0]["record_id"].as_str()), (1, Some(second.as_str())), "{markers:?}");
    assert_eq!(stats(&backend).await.accounted(), 361, "one DLQ entry instead of one result");
    // A rejected record has ended: a replay of the results DLQ leaves it where it is.
    let left = json(&target.sluice(&model, &["dlq", "replay", "--stage", "results", "--json"]));
    assert_eq!((left["moved"].as_u64(), left["kept"].as_u64()), (Some(0), Some(1)), "{left}");

    // The fix: thresholds that accept everything. Replayed, the rest of review ends as results.
    let lenient = lenient_bundle(dir.path());
    let dry = lines(&target.sluice(&lenient, &["dlq", "replay", "--stage", "review", "--dry-run", "--json"]));
    assert_eq!(dry.len() as u64, start.review - 2);
    let moved = json(&target.sluice(&lenient, &["dlq", "replay", "--stage", "review", "--json"]));
    assert_eq!(moved["moved"], start.review - 2);
    let after = stats(&backend).await;
    assert_eq!(after.review, 0);
    assert_eq!(after.results, start.results + start.review - 1);
    assert_eq!(after.dlq[&StageName::Results], 1);
    assert_eq!(after.accounted(), 361, "counts stay exact");

    // A replay of records that fail again puts each back once: still six ingest entries.
    let replayed =
        json(&target.sluice(&model, &["dlq", "replay", "--stage", "ingest", "--reason", "invalid_json", "--json"]));
    assert_eq!(replayed["moved"], 1);
    target.sluice(&model, &["run", "--until-drained"]);
    let after = stats(&backend).await;
    assert_eq!(after.dlq[&StageName::Ingest], 6);
    assert_eq!(after.accounted(), after.records_in, "{after:#?}");

    // Purge deletes for good, only what matches, and never without saying so.
    let unasked = target
        .command(&model)
        .args(["dlq", "purge", "--stage", "ingest"])
        .args(target.store_args())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!unasked.status.success(), "no purge without --yes or a terminal");
    let purged = json(&target.sluice(
        &model,
        &["dlq", "purge", "--stage", "ingest", "--reason", "unsupported_content_type", "--yes", "--json"],
    ));
    assert_eq!(purged["deleted"], 1);
    assert_eq!(stats(&backend).await.dlq[&StageName::Ingest], 5);

    // SIGKILL halfway through a replay, then again to the end: each record one result.
    const ORPHANS: usize = 30;
    let ids: Vec<RecordId> = (0..ORPHANS).map(|i| RecordId::parse(format!("orphan-{i:02}")).unwrap()).collect();
    let messages = ids
        .iter()
        .map(|id| {
            let mut envelope = Envelope::inline(id.clone(), "test", ContentType::Png, Vec::new());
            envelope.payload = Payload::Released;
            OutgoingMessage { body: envelope.to_json(), dedup_key: Some(id.to_string()), ..Default::default() }
        })
        .collect();
    backend.queue(QueueName::Inference).send_batch(messages).await.unwrap();
    target.sluice(&model, &["run", "--until-drained"]);
    assert_eq!(stats(&backend).await.dlq[&StageName::Inference], ORPHANS as u64, "no features: dead-lettered");
    backend
        .features
        .put_if_absent(ids.iter().map(|id| (id.clone(), FeatureVector::Pixels(vec![0; 64]))).collect())
        .await
        .unwrap();
    // Ctrl-C halfway through a replay: it says what it replayed and fails, and the entries it
    // had not reached are there to be read at once (on SQS, not hidden for their timeout).
    let mut interrupted = target.command(&model);
    interrupted.args(["dlq", "replay", "--stage", "inference", "--rate", "5"]).args(target.store_args());
    let child = interrupted.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Signalled once it has replayed some (it has the entries then), not at a guess of a time.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while stats(&backend).await.dlq[&StageName::Inference] == ORPHANS as u64 {
        assert!(std::time::Instant::now() < deadline, "the replay never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("interrupted: the entries not reached stay"), "{out:?}");
    let replayed: usize = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!((1..ORPHANS).contains(&replayed), "{out:?}");
    let listed = lines(&target.sluice(&model, &["dlq", "list", "--stage", "inference", "--json"]));
    assert_eq!(listed.len(), ORPHANS - replayed, "the rest readable at once");
    target.sluice(&model, &["run", "--until-drained"]);

    let mut slow = target.command(&model);
    slow.args(["dlq", "replay", "--stage", "inference", "--rate", "10"]).args(target.store_args());
    let mut child = slow.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let left = stats(&backend).await.dlq[&StageName::Inference];
    assert!(left < (ORPHANS - replayed) as u64, "the killed replay had moved some ({left} left)");
    target.sluice(&model, &["dlq", "replay", "--stage", "inference"]);
    target.sluice(&model, &["run", "--until-drained"]);
    let end = stats(&backend).await;
    assert_eq!(end.dlq[&StageName::Inference], 0, "{end:#?}");
    assert_eq!(end.results + end.review, after.results + after.review + ORPHANS as u64, "one result each: {end:#?}");
    let stored = backend.results.get_batch(&ids).await.unwrap();
    assert_eq!(stored.len(), ORPHANS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_loop_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("ops.sqlite").to_str().unwrap().to_owned();
    operators_loop(Target::Embedded(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_loop_on_aws() {
    operators_loop(Target::Aws(unique_prefix("ops"))).await;
}
