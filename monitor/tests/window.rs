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
    // A redelivered record captured again, later: the one a sample keeps first.
    let lowest = all.iter().min_by_key(|r| sluice_core::capture::id_hash(&r.record_id)).unwrap();
    let mut again = lowest.clone();
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
    assert!(kept.contains(&lowest.record_id), "the redelivered record is kept, with its first capture");
    assert!(whole.captures().all(|c| c.captured_ms < t0 + 100), "each record once, with its first capture");
    assert!(cut.captures().all(|c| c.probabilities.is_empty()), "probabilities are not kept");
    let again = Window::read(&backend, 0, t0 + 60_000, 30).await.unwrap();
    assert_eq!(
        again.captures().map(|c| &c.record_id).collect::<Vec<_>>(),
        cut.captures().map(|c| &c.record_id).collect::<Vec<_>>()
    );
}

/// Two records whose ids share a hash at the sample's edge go together: the sample is exactly
/// what `capture::sampled` takes at its rate, the one or the other alone would not be.
#[tokio::test]
async fn records_sharing_a_hash_at_the_edge_of_a_sample_go_together() {
    use sluice_core::capture::{id_hash, sampled};
    use sluice_core::envelope::RecordId;
    // Found once by search (CRC-32 of the two ids).
    let (first, second) = (RecordId::parse("c699378").unwrap(), RecordId::parse("c18020006").unwrap());
    assert_eq!(id_hash(&first), id_hash(&second));
    let edge = id_hash(&first);
    let mut others = (0..).map(|i| RecordId::parse(format!("o{i}")).unwrap());
    let below: Vec<RecordId> = others.by_ref().filter(|id| id_hash(id) < edge).take(5).collect();
    let above: Vec<RecordId> = others.filter(|id| id_hash(id) > edge).take(5).collect();

    let dir = tempfile::tempdir().unwrap();
    let backend =
        Backend::open(&StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    let t0 = now_ms();
    let mut lines = Vec::new();
    for id in below.iter().chain(&above).chain([&first, &second]) {
        let mut result = sluice_core::testing::prediction_result(id.as_str(), "1", ResultStatus::Accepted);
        result.timestamps.stored_ms = Some(t0);
        lines.extend(CaptureRecord::new(&result, "image/png", None, Default::default()).to_line());
    }
    backend.capture.append(lines, t0).await.unwrap();

    let window = Window::read(&backend, 0, t0 + 60_000, 6).await.unwrap();
    let kept: std::collections::BTreeSet<RecordId> = window.captures().map(|c| c.record_id.clone()).collect();
    let taken: std::collections::BTreeSet<RecordId> = below
        .iter()
        .chain(&above)
        .chain([&first, &second])
        .filter(|id| sampled(id, window.sample_rate))
        .cloned()
        .collect();
    assert_eq!(kept, taken);
    assert_eq!(kept, below.into_iter().collect());
}
