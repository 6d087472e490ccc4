//! `sluice review` as a person uses it, driven through tmux: it shows each item (the model's
//! top classes and the digit drawn in half blocks), takes a label typed at its prompt, and the
//! labelled results end `reviewed` with both labels kept; an item whose result was settled
//! before is taken off unseen.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, demo_summary, model_dir, test_env};
use sluice_core::backend::{Backend, ReviewOutcome};
use sluice_core::dlq::{self, Filter, Letters};
use sluice_core::record::{Resolution, ResultStatus};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux is needed: scripts/test installs it");
    assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the pane shows `text` `times` times, and returns what it shows.
fn wait_for_screen(session: &str, text: &str, times: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let screen = tmux(&["capture-pane", "-p", "-S", "-", "-t", session]);
        if screen.matches(text).count() >= times {
            return screen;
        }
        assert!(Instant::now() < deadline, "no {text:?} ({times}x) on the screen:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_labels_items_in_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("review.sqlite");
    // A demo run leaves its low-confidence digits for review.
    demo_summary(test_env(&mut Command::new(bin("sluice"))).args([
        "demo",
        "--json",
        "--store",
        store.to_str().unwrap(),
    ]));
    let backend = Backend::open_observer(&common::store_config(&store)).await.unwrap();
    let waiting = dlq::list(&backend, Letters::Review, &Filter::default(), 100).await.unwrap();
    assert!(waiting.len() >= 3, "the demo leaves at least three items for review, found {}", waiting.len());
    // One result settled elsewhere with its item left behind (as a record written twice leaves
    // an item a copy): the walk takes that item off unseen.
    let stale = waiting[0].record_id().unwrap().clone();
    let settled = backend.results.resolve_review(&stale, &Resolution::Label("0".into())).await.unwrap();
    assert!(matches!(settled, ReviewOutcome::Resolved(_)));

    let session = format!("sluice-review-{}", std::process::id());
    let command = format!(
        "env SLUICE__MODEL__DIR={} {} review --store {}; sleep 30",
        model_dir().display(),
        bin("sluice").display(),
        store.display()
    );
    tmux(&["new-session", "-d", "-s", &session, "-x", "120", "-y", "50", &command]);
    let labels = ["1", "2"];
    for (i, label) in labels.iter().enumerate() {
        let screen = wait_for_screen(&session, "Enter = the model's", i + 1);
        assert!(screen.contains("model says"), "{screen}");
        assert!(screen.contains('▀'), "the digit is drawn:\n{screen}");
        tmux(&["send-keys", "-t", &session, label, "Enter"]);
    }
    let screen = wait_for_screen(&session, "-> reviewed as 2", 1);
    assert!(!screen.contains(&format!("── {stale} ──")), "an item settled before is not shown:\n{screen}");
    tmux(&["send-keys", "-t", &session, "q", "Enter"]);
    let _ = Command::new("tmux").args(["kill-session", "-t", &session]).status();

    let reviewed = backend.results.scan(None, 1000, Some(ResultStatus::Reviewed)).await.unwrap();
    let mut given: Vec<&str> = reviewed.iter().filter_map(|r| r.reviewed_label.as_deref()).collect();
    given.sort();
    given.retain(|&l| l != "0");
    assert_eq!(given, labels, "two results reviewed, each with the label typed");
    assert!(reviewed.iter().all(|r| !r.label.is_empty() && r.reviewed_ms.is_some()), "the model's label is kept");
    let left = dlq::list(&backend, Letters::Review, &Filter::default(), 100).await.unwrap();
    assert_eq!(left.len(), waiting.len() - 3, "labelled and stale items leave the review queue; the rest stay");
}
