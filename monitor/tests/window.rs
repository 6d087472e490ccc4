//! The monitor's window: the captured predictions, each joined with what its result says now.

use sluice_core::backend::{Backend, OutgoingMessage};
use sluice_core::capture::CaptureRecord;
use sluice_core::config::StoreConfig;
use sluice_core::envelope::now_ms;
use sluice_core::record::ResultStatus;
use sluice_core::topology::QueueName;
use sluice_monitor::window::Window;

/// A record a reviewer rejected has no result, only a marker of its end in the DLQ: a true label
/// fed back for it afterwards does not score the model, as none did before the marker existed.
#[tokio::test]
async fn a_rejected_record_is_not_scored() {
    let dir = tempfile::tempdir().unwrap();
    let backend =
        Backend::open(&StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    let mut result = sluice_core::testing::prediction_result("unfit", "1", ResultStatus::Review);
    result.timestamps.stored_ms = Some(now_ms());
    backend.results.put_if_absent(vec![result.clone()]).await.unwrap();
    let line = CaptureRecord::new(&result, "image/png", None, Default::default()).to_line();
    backend.capture.append(line, now_ms()).await.unwrap();
    let item = OutgoingMessage { body: serde_json::to_vec(&result).unwrap(), ..OutgoingMessage::default() };
    backend.queue(QueueName::Review).send_batch(vec![item]).await.unwrap();
    let rejected = sluice_core::dlq::reject(&backend, &result.record_id).await.unwrap();
    assert_eq!(rejected, sluice_core::dlq::Rejected::Rejected);
    backend.results.set_ground_truth(&result.record_id, "7").await.unwrap();

    let window = Window::read(&backend, 0, now_ms() + 60_000, 1000).await.unwrap();
    assert_eq!(window.observations.len(), 1);
    let seen = &window.observations[0];
    assert_eq!((seen.truth.as_deref(), seen.status_now), (None, None), "not scored, no result standing");
    assert_eq!(window.review(), (1, 0), "sent to review, waiting no more");
}

/// A window of more records than a pass keeps is read a chunk at a time into a sample: the
/// records whose ids hash lowest, each once however often captured, with its first capture, and
/// the rate the sample stands for, which `capture::sampled` agrees with record by record.
#[tokio::test]
async fn a_window_past_the_most_a_pass_keeps_is_a_sample_by_record_id() {
    use sluice_core::capture::sampled;
    let dir = tempfile::tempdir().unwrap();
    let backend =
        Backend::open(&StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    let t0 = now_ms();
    let mut all = Vec::new();
    for chunk in 0..4_u64 {
        let mut lines = Vec::new();
        for i in 0..50_u64 {
            let mut result =
                sluice_core::testing::prediction_result(&format!("r-{chunk}-{i}"), "1", ResultStatus::Accepted);
            result.timestamps.stored_ms = Some(t0 + chunk * 10 + i % 10);
            lines.extend(CaptureRecord::new(&result, "image/png", None, Default::default()).to_line());
            all.push(result);
        }
        backend.capture.append(lines, t0 + chunk * 10).await.unwrap();
    }
    // A redelivered record captured again, later.
    let mut again = all[7].clone();
    again.timestamps.stored_ms = Some(t0 + 100);
    backend
        .capture
        .append(CaptureRecord::new(&again, "image/png", None, Default::default()).to_line(), t0 + 100)
        .await
        .unwrap();

    let whole = Window::read(&backend, 0, t0 + 60_000, 1000).await.unwrap();
    assert_eq!((whole.observations.len(), whole.sample_rate), (200, 1.0));
    let cut = Window::read(&backend, 0, t0 + 60_000, 30).await.unwrap();
    assert_eq!(cut.observations.len(), 30);
    assert!(cut.sample_rate < 1.0, "{}", cut.sample_rate);
    let kept: std::collections::BTreeSet<_> = cut.captures().map(|c| c.record_id.clone()).collect();
    let expected: std::collections::BTreeSet<_> =
        all.iter().map(|r| r.record_id.clone()).filter(|id| sampled(id, cut.sample_rate)).collect();
    assert_eq!(kept, expected);
    let times: Vec<u64> = cut.captures().map(|c| c.captured_ms).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]) && times.iter().all(|&t| t < t0 + 100), "{times:?}");
    assert!(cut.captures().all(|c| c.probabilities.is_empty()), "probabilities are not kept");
    let again = Window::read(&backend, 0, t0 + 60_000, 30).await.unwrap();
    assert_eq!(
        again.captures().map(|c| &c.record_id).collect::<Vec<_>>(),
        cut.captures().map(|c| &c.record_id).collect::<Vec<_>>()
    );
}
