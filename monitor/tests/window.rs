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

    let window = Window::read(&backend, 0, now_ms() + 60_000).await.unwrap();
    assert_eq!(window.observations.len(), 1);
    let seen = &window.observations[0];
    assert_eq!((seen.truth.as_deref(), seen.status_now), (None, None), "not scored, no result standing");
    assert_eq!(window.review(), (1, 0), "sent to review, waiting no more");
}
