//! The results stage: thresholds, review routing, and one result per record.

use std::path::Path;

use std::collections::HashMap;

use sluice_core::backend::{
    Backend, FeedbackOutcome, PutOutcome, Receipt, ResultCounts, ResultPage, ResultQuery, ResultStore, ReviewOutcome,
};
use sluice_core::config::{Settings, StoreConfig};
use sluice_core::envelope::{ContentType, Envelope, RecordId};
use sluice_core::record::{InferredRecord, Prediction, PredictionResult, Resolution, ResultStatus, dlq_attr};
use sluice_core::topology::QueueName;
use sluice_core::worker::{Delivery, Origin, Outcome, Stage};
use sluice_core::{ReasonCode, SluiceError};
use sluice_results::ResultsStage;

fn delivery(id: &str, probabilities: Vec<f32>) -> Delivery {
    labelled(id, probabilities, "3")
}

/// A record whose producer sent `label` as its true label.
fn labelled(id: &str, probabilities: Vec<f32>, label: &str) -> Delivery {
    let mut envelope = Envelope::inline(RecordId::parse(id).unwrap(), "test", ContentType::Png, Vec::new());
    envelope.attributes.insert("label".into(), label.into());
    let record = InferredRecord {
        envelope,
        prediction: Prediction {
            probabilities,
            model: "digits-cnn".into(),
            model_version: "1.0.0".into(),
            backend: "candle-cpu".into(),
        },
    };
    Delivery {
        body: record.to_json(),
        attributes: Default::default(),
        receive_count: 1,
        first_received_ms: None,
        origin: Origin::Queue(Receipt(id.into())),
    }
}

fn peaked(class: usize, p: f32) -> Vec<f32> {
    (0..10).map(|i| if i == class { p } else { (1.0 - p) / 9.0 }).collect()
}

/// A fresh embedded store (kept while the directory lives).
async fn store() -> (tempfile::TempDir, Backend) {
    let dir = tempfile::tempdir().unwrap();
    let backend =
        Backend::open(&StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() }).await.unwrap();
    (dir, backend)
}

/// The results stage of the shipped digits bundle on `backend`.
fn stage_on(backend: &Backend) -> ResultsStage {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    let settings = Settings::load(None).unwrap().set("model.dir", model);
    ResultsStage::build(&settings, backend).unwrap()
}

#[tokio::test]
async fn applies_thresholds_routes_review_and_keeps_the_first_result() {
    let (_dir, backend) = store().await;
    let stage = stage_on(&backend);

    let outcomes = stage
        .process(&[
            delivery("sure", peaked(3, 0.97)),
            delivery("unsure", peaked(5, 0.3)),
            delivery("bad", vec![1.0]),
            delivery("negative", peaked(2, 1.5)),
        ])
        .await;
    assert_eq!(outcomes[0], Outcome::Forward(vec![]), "an accepted result goes nowhere else");
    let Outcome::Forward(review) = &outcomes[1] else { panic!("{:?}", outcomes[1]) };
    assert_eq!(review[0].0, QueueName::Review);
    assert_eq!(review[0].1.attributes[dlq_attr::REASON], ReasonCode::BelowThreshold.as_str());
    for bad in &outcomes[2..] {
        match bad {
            Outcome::Failed { error, .. } => assert_eq!(error.code(), ReasonCode::InvalidModelOutput),
            other => panic!("{other:?}"),
        }
    }

    let ids: Vec<RecordId> = ["sure", "unsure"].iter().map(|s| RecordId::parse(*s).unwrap()).collect();
    let stored = backend.results.get_batch(&ids).await.unwrap();
    let sure = &stored[&ids[0]];
    assert_eq!(
        (sure.label.as_str(), sure.status, sure.ground_truth.as_deref()),
        ("3", ResultStatus::Accepted, Some("3"))
    );
    assert!(sure.timestamps.stored_ms.is_some());
    assert_eq!(stored[&ids[1]].status, ResultStatus::Review);

    // A redelivery with a different prediction changes nothing, and review is routed again
    // from what is stored, so a crash between the write and the review send loses nothing.
    let again = stage.process(&[delivery("unsure", peaked(5, 0.99)), delivery("sure", peaked(4, 0.2))]).await;
    assert!(matches!(&again[0], Outcome::Forward(m) if m[0].0 == QueueName::Review));
    assert_eq!(again[1], Outcome::Forward(vec![]));
    let counts = backend.results.counts().await.unwrap();
    assert_eq!((counts.accepted, counts.review), (1, 1));

    // A label that is none of the model's classes is no ground truth (it would count as wrong).
    stage.process(&[labelled("foreign", peaked(3, 0.97), "notaclass")]).await;
    let foreign = RecordId::parse("foreign").unwrap();
    assert_eq!(backend.results.get_batch(std::slice::from_ref(&foreign)).await.unwrap()[&foreign].ground_truth, None);
}

/// A record a reviewer rejected has ended in the results DLQ: a copy of it reaching results later
/// (at-least-once delivery, a replay upstream) finds the rejection's marker and is given no
/// result and no review item, so the record keeps exactly one end.
#[tokio::test]
async fn a_copy_of_a_rejected_record_is_given_no_result() {
    let (_dir, backend) = store().await;
    let stage = stage_on(&backend);
    let Outcome::Forward(mut review) = stage.process(&[delivery("unfit", peaked(5, 0.3))]).await.remove(0) else {
        panic!("not forwarded")
    };
    let (queue, item) = review.remove(0);
    backend.queue(queue).send_batch(vec![item]).await.unwrap();
    let id = RecordId::parse("unfit").unwrap();
    assert_eq!(sluice_core::dlq::reject(&backend, &id).await.unwrap(), sluice_core::dlq::Rejected::Rejected);

    let copy = stage.process(&[delivery("unfit", peaked(5, 0.3))]).await;
    assert_eq!(copy[0], Outcome::Forward(vec![]), "no review item for the copy");
    let stored = backend.results.get_batch(std::slice::from_ref(&id)).await.unwrap();
    assert_eq!(stored[&id].status, ResultStatus::Rejected);
    let counts = backend.results.counts().await.unwrap();
    assert_eq!((counts.accepted, counts.review, counts.reviewed, counts.rejected), (0, 0, 0, 1));
    assert_eq!(backend.queue(QueueName::ResultsDlq).depth().await.unwrap().total(), 1);
    assert_eq!(backend.queue(QueueName::Review).depth().await.unwrap().total(), 0);
    let listed = backend.results.query(&ResultQuery { limit: 10, ..ResultQuery::default() }).await.unwrap();
    assert!(listed.results.is_empty(), "a rejection's marker is no result: {listed:?}");
    let asked = ResultQuery { status: Some(ResultStatus::Rejected), limit: 10, ..ResultQuery::default() };
    assert_eq!(backend.results.query(&asked).await.unwrap().results.len(), 1, "listed when asked for");
    let fed = backend.results.set_ground_truth(&id, "5").await.unwrap();
    assert_eq!(fed, FeedbackOutcome::Missing, "no result to label");
}

/// A result store that stores the first of a batch and then fails, as DynamoDB's transactions
/// of 99 can leave a batch of 200: the first stored, the write failing after.
struct PartlyStored(std::sync::Arc<dyn ResultStore>);

#[async_trait::async_trait]
impl ResultStore for PartlyStored {
    async fn put_if_absent(&self, mut results: Vec<PredictionResult>) -> sluice_core::Result<Vec<PutOutcome>> {
        results.truncate(1);
        self.0.put_if_absent(results).await?;
        Err(SluiceError::retryable(ReasonCode::StoreBusy, "throttled after the first transaction"))
    }
    async fn get_batch(&self, ids: &[RecordId]) -> sluice_core::Result<HashMap<RecordId, PredictionResult>> {
        self.0.get_batch(ids).await
    }
    async fn counts(&self) -> sluice_core::Result<ResultCounts> {
        self.0.counts().await
    }
    async fn withdraw_review(&self, id: &RecordId) -> sluice_core::Result<ReviewOutcome> {
        self.0.withdraw_review(id).await
    }
    async fn query(&self, query: &ResultQuery) -> sluice_core::Result<ResultPage> {
        self.0.query(query).await
    }
    async fn resolve_review(&self, id: &RecordId, resolution: &Resolution) -> sluice_core::Result<ReviewOutcome> {
        self.0.resolve_review(id, resolution).await
    }
    async fn set_ground_truth(&self, id: &RecordId, label: &str) -> sluice_core::Result<FeedbackOutcome> {
        self.0.set_ground_truth(id, label).await
    }
    async fn scan(
        &self,
        after: Option<&RecordId>,
        limit: usize,
        status: Option<ResultStatus>,
    ) -> sluice_core::Result<Vec<PredictionResult>> {
        self.0.scan(after, limit, status).await
    }
}

/// A write that stored part of a batch before it failed: the stored records are done (routed
/// from their result), only the rest fail; on a last receive they would otherwise be
/// dead-lettered with a result stored too, in two places.
#[tokio::test]
async fn a_batch_stored_in_part_fails_only_the_records_left_unstored() {
    let (_dir, mut backend) = store().await;
    backend.results = std::sync::Arc::new(PartlyStored(backend.results.clone()));
    let stage = stage_on(&backend);

    let outcomes = stage.process(&[delivery("stored", peaked(5, 0.3)), delivery("not-stored", peaked(3, 0.97))]).await;
    let Outcome::Forward(review) = &outcomes[0] else { panic!("{:?}", outcomes[0]) };
    assert_eq!(review[0].0, QueueName::Review, "routed from its stored result");
    match &outcomes[1] {
        Outcome::Failed { error, .. } => assert!(error.is_retryable(), "{error}"),
        other => panic!("{other:?}"),
    }
}
