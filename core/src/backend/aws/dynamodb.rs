//! The feature store and the result store on DynamoDB.
//!
//! Features: `BatchWriteItem` (25 a call) with the vector as a binary attribute; a vector is a
//! pure function of the record's payload and bundle, so a redelivery rewriting it is harmless.
//! An item may not exceed 400 KB. An ImageNet-sized image is stored as its pixels (3×224×224
//! bytes, 147 KiB) and fits; a vector over `store.aws.inline_vector_bytes` (380,000 at most and by
//! default: bigger inputs, or f32 values of that size; set lower, it trades DynamoDB's write
//! units for S3 requests) goes to S3 as a claim-check and the item keeps its reference.
//! Results: `BatchWriteItem` cannot carry conditions, so results go in `TransactWriteItems`
//! calls, each item a put conditional on `attribute_not_exists(record_id)`, together with an
//! update of the per-status counters: one request per batch, and a redelivered record never
//! gets a second result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, KeysAndAttributes, Put, PutRequest, TransactWriteItem, Update, WriteRequest,
};
use backon::{BackoffBuilder, ExponentialBuilder};

use super::s3::S3BlobStore;
use super::{classify, concurrently, error_code};
use crate::backend::{
    BlobStore, FeatureStore, FeedbackOutcome, PageToken, PutOutcome, ResultCounts, ResultPage, ResultQuery,
    ResultStore, ReviewOutcome, StoredVector,
};
use crate::envelope::{RecordId, now_ms};
use crate::error::{ReasonCode, Result, SluiceError};
use crate::record::{PredictionResult, Resolution, ResultStatus};
use crate::vector::FeatureVector;

/// The feature and result tables' hash key, as `resources.json` names it.
pub(super) const RECORD_KEY: &str = "record_id";
const BATCH_GET_KEYS: usize = 100;
const BATCH_WRITE_ITEMS: usize = 25;
/// 100 items per transaction, one of them the counter update.
const TRANSACT_RESULTS: usize = 99;
/// The counters items that hold result counts by status: `results`, `results#1` …
/// `results#15`, summed on read. Every results transaction updates one of them, and DynamoDB
/// cancels a transaction that touches an item another one is changing
/// (`TransactionConflict`): on one item, results workers running side by side would cancel
/// each other's batches. A batch's item is chosen by its first record id.
const RESULT_COUNTERS: &str = "results";
const RESULT_COUNTER_ITEMS: u64 = 16;
/// How many times in all a transaction cancelled only by conflicts is sent, a moment apart (the
/// SDK does not retry a cancelled transaction); past that the batch goes back to its queue.
const CONFLICT_ATTEMPTS: usize = 3;
pub(super) const COUNTER_KEY: &str = "name";

type Item = HashMap<String, AttributeValue>;

/// Retries what a batch call left unprocessed (the SDK retries whole calls, not those).
pub(super) fn unprocessed_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default().with_min_delay(Duration::from_millis(50)).with_max_times(8).with_jitter().build()
}

fn unprocessed_error(operation: &str, left: usize) -> SluiceError {
    SluiceError::retryable(ReasonCode::StoreBusy, format!("{operation}: {left} items still unprocessed after retries"))
}

/// A TTL attribute's value: `days` after `now_ms`, in seconds since the epoch.
fn expires_at(now_ms: u64, days: u64) -> AttributeValue {
    AttributeValue::N((now_ms / 1000 + days.saturating_mul(86_400)).to_string())
}

fn key(id: &RecordId) -> Item {
    HashMap::from([(RECORD_KEY.to_owned(), AttributeValue::S(id.to_string()))])
}

/// `BatchGetItem` over any number of ids, retrying unprocessed keys. Strongly consistent: a
/// vector is read by inference moments after features wrote it, and an eventually consistent
/// read can miss a write that recent (the record would be dead-lettered as `missing_features`).
async fn batch_get(client: &aws_sdk_dynamodb::Client, table: &str, ids: &[RecordId]) -> Result<Vec<Item>> {
    let found = concurrently(ids.chunks(BATCH_GET_KEYS).map(|chunk| async move {
        let mut unique: Vec<&RecordId> = chunk.iter().collect();
        unique.sort();
        unique.dedup();
        get_keys(client, table, unique.into_iter().map(key).collect()).await
    }))
    .await?;
    Ok(found.into_iter().flatten().collect())
}

/// One `BatchGetItem` of up to 100 `keys`, read consistently, retrying what it leaves
/// unprocessed; the items found.
async fn get_keys(client: &aws_sdk_dynamodb::Client, table: &str, keys: Vec<Item>) -> Result<Vec<Item>> {
    let mut request = KeysAndAttributes::builder()
        .set_keys(Some(keys))
        .consistent_read(true)
        .build()
        .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))?;
    let mut out = Vec::new();
    let mut delays = unprocessed_backoff();
    loop {
        let output = client
            .batch_get_item()
            .request_items(table, request)
            .send()
            .await
            .map_err(|e| classify("BatchGetItem", e))?;
        out.extend(output.responses.unwrap_or_default().remove(table).unwrap_or_default());
        match output.unprocessed_keys.unwrap_or_default().remove(table) {
            Some(left) if !left.keys.is_empty() => {
                let delay = delays.next().ok_or_else(|| unprocessed_error("BatchGetItem", left.keys.len()))?;
                tokio::time::sleep(delay).await;
                request = left;
            }
            _ => return Ok(out),
        }
    }
}

pub(super) struct DynamoFeatureStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// Where vectors too large for an item go.
    blobs: Arc<S3BlobStore>,
    /// `store.aws.feature_ttl_days`.
    ttl_days: u64,
    /// `store.aws.inline_vector_bytes`: the largest vector kept in its item.
    inline_most: usize,
}

impl DynamoFeatureStore {
    pub(super) fn new(
        client: aws_sdk_dynamodb::Client,
        table: String,
        blobs: Arc<S3BlobStore>,
        aws: &crate::config::AwsConfig,
    ) -> Self {
        Self { client, table, blobs, ttl_days: aws.feature_ttl_days, inline_most: aws.inline_vector_bytes }
    }

    /// The vector's attribute: its bytes, or where in S3 they are.
    async fn vector_attribute(&self, vector: &FeatureVector) -> Result<(&'static str, AttributeValue)> {
        let bytes = vector.to_bytes();
        if bytes.len() <= self.inline_most {
            return Ok(("vector", AttributeValue::B(Blob::new(bytes))));
        }
        // Content-addressed, so a redelivery rewrites the same object.
        Ok(("vector_ref", AttributeValue::S(self.blobs.put(bytes).await?)))
    }

    async fn vector_of(&self, item: &Item) -> Result<Option<StoredVector>> {
        match (item.get("vector").and_then(|v| v.as_b().ok()), item.get("vector_ref")) {
            (Some(blob), _) => Ok(Some(FeatureVector::from_bytes(blob.as_ref()))),
            (None, Some(AttributeValue::S(reference))) => match self.blobs.get(reference).await {
                Ok(bytes) => Ok(Some(FeatureVector::from_bytes(&bytes))),
                // Expired (the bucket's claim-check lifecycle) or deleted: this record's vector
                // is gone, which fails the record, not its batch.
                Err(e) if e.code() == ReasonCode::ClaimCheckMissing => Ok(Some(Err(SluiceError::permanent(
                    ReasonCode::MissingFeatures,
                    format!("the stored vector's object is gone: {}", e.detail()),
                )))),
                // Refused alone (archived, say): this record's failure too, not every record's
                // of the batch; a store that cannot be reached, or a deployment at fault, is.
                Err(e) if !e.is_retryable() && !e.is_misconfiguration() => Ok(Some(Err(SluiceError::permanent(
                    ReasonCode::MissingFeatures,
                    format!("the stored vector's object cannot be read: {}", e.detail()),
                )))),
                Err(e) => Err(e),
            },
            _ => Ok(None),
        }
    }
}

#[async_trait]
impl FeatureStore for DynamoFeatureStore {
    async fn put_if_absent(&self, items: Vec<(RecordId, FeatureVector)>) -> Result<()> {
        let now = now_ms();
        let expires = (self.ttl_days > 0).then(|| expires_at(now, self.ttl_days));
        let now = now.to_string();
        let mut requests: Vec<WriteRequest> = Vec::with_capacity(items.len());
        let mut seen = std::collections::HashSet::new();
        let mut pending = Vec::with_capacity(items.len());
        for (id, vector) in items {
            if !seen.insert(id.clone()) {
                continue; // one batch may not write a key twice
            }
            pending.push(async move {
                let (name, value) = self.vector_attribute(&vector).await?;
                Ok::<_, SluiceError>((id, name, value))
            });
        }
        // Vectors bound for S3 go up a few at a time, not one after another nor a batch at once.
        for (id, name, value) in concurrently(pending).await? {
            let mut item = key(&id);
            item.insert(name.to_owned(), value);
            item.insert("created_ms".to_owned(), AttributeValue::N(now.clone()));
            if let Some(expires) = &expires {
                item.insert(super::resources::feature_ttl_attribute().to_owned(), expires.clone());
            }
            let put = PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        concurrently(requests.chunks(BATCH_WRITE_ITEMS).map(|chunk| async move {
            let mut pending = chunk.to_vec();
            let mut delays = unprocessed_backoff();
            loop {
                let output = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .send()
                    .await
                    .map_err(|e| classify("BatchWriteItem", e))?;
                match output.unprocessed_items.unwrap_or_default().remove(&self.table) {
                    Some(left) if !left.is_empty() => {
                        let delay = delays.next().ok_or_else(|| unprocessed_error("BatchWriteItem", left.len()))?;
                        tokio::time::sleep(delay).await;
                        pending = left;
                    }
                    _ => return Ok(()),
                }
            }
        }))
        .await?;
        Ok(())
    }

    /// A new expiry for each vector there is (one gone is left gone). A vector offloaded to S3
    /// keeps its object's lifecycle, which counts from the object's write.
    async fn refresh(&self, ids: &[RecordId]) -> Result<()> {
        if self.ttl_days == 0 {
            return Ok(());
        }
        let expires = expires_at(now_ms(), self.ttl_days);
        let attribute = super::resources::feature_ttl_attribute();
        concurrently(ids.iter().map(|id| {
            let expires = expires.clone();
            async move {
                let result = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key(id)))
                    .update_expression("SET #e = :e")
                    .condition_expression("attribute_exists(#k)")
                    .expression_attribute_names("#e", attribute)
                    .expression_attribute_names("#k", RECORD_KEY)
                    .expression_attribute_values(":e", expires)
                    .send()
                    .await;
                match result {
                    Ok(_) => Ok(()),
                    Err(e) if error_code(&e) == Some("ConditionalCheckFailedException") => Ok(()),
                    Err(e) => Err(classify("UpdateItem", e)),
                }
            }
        }))
        .await?;
        Ok(())
    }

    async fn get_batch(&self, ids: &[RecordId]) -> Result<HashMap<RecordId, StoredVector>> {
        let items = batch_get(&self.client, &self.table, ids).await?;
        let vectors = concurrently(items.iter().map(|item| async move {
            let Some(id) =
                item.get(RECORD_KEY).and_then(|v| v.as_s().ok()).and_then(|s| RecordId::parse(s.clone()).ok())
            else {
                return Ok(None);
            };
            Ok::<_, SluiceError>(self.vector_of(item).await?.map(|vector| (id, vector)))
        }))
        .await?;
        Ok(vectors.into_iter().flatten().collect())
    }
}

pub(super) struct DynamoResultStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    counters: String,
    ttl_days: u64,
}

impl DynamoResultStore {
    pub(super) fn new(client: aws_sdk_dynamodb::Client, table: String, counters: String, ttl_days: u64) -> Self {
        Self { client, table, counters, ttl_days }
    }

    fn put_item(&self, result: &PredictionResult) -> Result<TransactWriteItem> {
        let mut item = key(&result.record_id);
        let created_ms = now_ms();
        item.insert("status".to_owned(), AttributeValue::S(result.status.as_str().to_owned()));
        item.insert("body".to_owned(), AttributeValue::S(serde_json::to_string(result).expect("a result serialises")));
        item.insert("created_ms".to_owned(), AttributeValue::N(created_ms.to_string()));
        // The index by status sorts on this: store time, then record id.
        item.insert(
            super::resources::results_index().sort.clone(),
            AttributeValue::S(PageToken::after(created_ms, &result.record_id).key()),
        );
        if self.ttl_days > 0 {
            item.insert(super::resources::result_ttl_attribute().to_owned(), expires_at(created_ms, self.ttl_days));
        }
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(record_id)")
            .build()
            .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    fn count_update(&self, results: &[&PredictionResult]) -> Result<TransactWriteItem> {
        let n = |status| results.iter().filter(|r| r.status == status).count().to_string();
        let item = results.first().map_or_else(|| RESULT_COUNTERS.to_owned(), |r| result_counters_item(&r.record_id));
        let update = Update::builder()
            .table_name(&self.counters)
            .key(COUNTER_KEY, AttributeValue::S(item))
            .update_expression("ADD accepted :a, review :r, reviewed :d, rejected :x")
            .expression_attribute_values(":a", AttributeValue::N(n(ResultStatus::Accepted)))
            .expression_attribute_values(":r", AttributeValue::N(n(ResultStatus::Review)))
            .expression_attribute_values(":d", AttributeValue::N(n(ResultStatus::Reviewed)))
            .expression_attribute_values(":x", AttributeValue::N(n(ResultStatus::Rejected)))
            .build()
            .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// Writes those of `results` whose records have none yet; returns the indexes that already had one.
    async fn insert_new(&self, results: &[PredictionResult]) -> Result<Vec<usize>> {
        let mut candidates: Vec<usize> = (0..results.len()).collect();
        let mut present = Vec::new();
        let mut conflicts = 0;
        while !candidates.is_empty() {
            let mut items = candidates.iter().map(|&i| self.put_item(&results[i])).collect::<Result<Vec<_>>>()?;
            items.push(self.count_update(&candidates.iter().map(|&i| &results[i]).collect::<Vec<_>>())?);
            match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
                Ok(_) => break,
                Err(e) => {
                    let reasons = match e.as_service_error() {
                        Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
                            cancelled.cancellation_reasons().to_vec()
                        }
                        _ => return Err(classify("TransactWriteItems", e)),
                    };
                    let code = |i: usize| reasons.get(i).and_then(|r| r.code()).unwrap_or("None");
                    let only_conflicts = (0..=candidates.len()).any(|i| code(i) == "TransactionConflict")
                        && (0..=candidates.len()).all(|i| matches!(code(i), "None" | "TransactionConflict"));
                    if only_conflicts && conflicts + 1 < CONFLICT_ATTEMPTS {
                        // Another transaction held an item a moment: nothing was written.
                        conflicts += 1;
                        tokio::time::sleep(Duration::from_millis(20 * conflicts as u64)).await;
                        continue;
                    }
                    if !(0..candidates.len()).any(|i| code(i) == "ConditionalCheckFailed") {
                        // Conflicts or throttling: nothing was written; the caller retries.
                        return Err(SluiceError::retryable(
                            ReasonCode::StoreBusy,
                            format!(
                                "TransactWriteItems cancelled: {:?}",
                                (0..=candidates.len()).map(code).collect::<Vec<_>>()
                            ),
                        ));
                    }
                    let (taken, rest): (Vec<_>, Vec<_>) =
                        candidates.iter().enumerate().partition(|(i, _)| code(*i) == "ConditionalCheckFailed");
                    present.extend(taken.into_iter().map(|(_, &idx)| idx));
                    candidates = rest.into_iter().map(|(_, &idx)| idx).collect();
                }
            }
        }
        Ok(present)
    }
}

impl DynamoResultStore {
    /// The result of `id` if it waits for review; else what a review call answers.
    async fn waiting_for_review(&self, id: &RecordId) -> Result<std::result::Result<PredictionResult, ReviewOutcome>> {
        Ok(match self.get_batch(std::slice::from_ref(id)).await?.remove(id) {
            None => Err(ReviewOutcome::Missing),
            Some(result) if result.status != ResultStatus::Review => Err(ReviewOutcome::NotWaiting(Box::new(result))),
            Some(result) => Ok(result),
        })
    }

    /// Writes `change` (conditional on the result still waiting for review) and moves the status
    /// counts from review to `to` (none: the result is gone) in one transaction: `Resolved` with
    /// `done`, or what another reviewer (or a retry of this call) left.
    async fn change_review(
        &self,
        id: &RecordId,
        change: TransactWriteItem,
        to: Option<ResultStatus>,
        done: PredictionResult,
    ) -> Result<ReviewOutcome> {
        let one = |status| AttributeValue::N(u8::from(to == Some(status)).to_string());
        let counts = Update::builder()
            .table_name(&self.counters)
            .key(COUNTER_KEY, AttributeValue::S(result_counters_item(id)))
            .update_expression("ADD review :minus, accepted :a, reviewed :d")
            .expression_attribute_values(":minus", AttributeValue::N("-1".to_owned()))
            .expression_attribute_values(":a", one(ResultStatus::Accepted))
            .expression_attribute_values(":d", one(ResultStatus::Reviewed))
            .build()
            .map_err(build_error)?;
        let items = vec![change, TransactWriteItem::builder().update(counts).build()];
        match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
            Ok(_) => Ok(ReviewOutcome::Resolved(Box::new(done))),
            Err(e) if first_condition_failed(&e) => {
                Ok(match self.get_batch(std::slice::from_ref(id)).await?.remove(id) {
                    Some(now) => ReviewOutcome::NotWaiting(Box::new(now)),
                    None => ReviewOutcome::Missing,
                })
            }
            // A conflict with another transaction on the counters (the results worker's): again.
            Err(e)
                if matches!(e.as_service_error(), Some(TransactWriteItemsError::TransactionCanceledException(_))) =>
            {
                Err(SluiceError::retryable(ReasonCode::StoreBusy, format!("TransactWriteItems cancelled: {e}")))
            }
            Err(e) => Err(classify("TransactWriteItems", e)),
        }
    }
}

/// The counters item a result's counts go to.
fn result_counters_item(id: &RecordId) -> String {
    // Any spread will do (the sums are over every item): a plain polynomial hash of the id.
    let hash = id.as_str().bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    result_counters_item_number(hash % RESULT_COUNTER_ITEMS)
}

fn result_counters_item_number(n: u64) -> String {
    // The first is the one item counts went to before there were several.
    if n == 0 { RESULT_COUNTERS.to_owned() } else { format!("{RESULT_COUNTERS}#{n}") }
}

/// The sums of the numeric attributes of the counters items `names`, read consistently.
async fn read_counter_items(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    names: &[String],
) -> Result<BTreeMap<String, i64>> {
    let keys = names.iter().map(|n| HashMap::from([(COUNTER_KEY.to_owned(), AttributeValue::S(n.clone()))]));
    let mut sums = BTreeMap::new();
    for item in get_keys(client, table, keys.collect()).await? {
        for (k, v) in item {
            if let Some(n) = v.as_n().ok().and_then(|n| n.parse::<i64>().ok()) {
                *sums.entry(k).or_insert(0) += n;
            }
        }
    }
    Ok(sums)
}

/// How many times a true label is written over a result that keeps changing under it.
const FEEDBACK_ATTEMPTS: usize = 5;

fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> SluiceError {
    SluiceError::permanent(ReasonCode::Internal, e.to_string())
}

/// Whether a transaction was cancelled because its first item's condition did not hold.
fn first_condition_failed<R>(e: &aws_sdk_dynamodb::error::SdkError<TransactWriteItemsError, R>) -> bool {
    matches!(
        e.as_service_error(),
        Some(TransactWriteItemsError::TransactionCanceledException(c))
            if c.cancellation_reasons().first().and_then(|r| r.code()) == Some("ConditionalCheckFailed")
    )
}

fn decode_result(item: &Item) -> Result<PredictionResult> {
    let body = item
        .get("body")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| SluiceError::permanent(ReasonCode::StoreUnavailable, "a stored result has no body"))?;
    serde_json::from_str(body).map_err(|e| {
        SluiceError::permanent(ReasonCode::StoreUnavailable, format!("a stored result does not parse: {e}"))
    })
}

#[async_trait]
impl ResultStore for DynamoResultStore {
    async fn put_if_absent(&self, results: Vec<PredictionResult>) -> Result<Vec<PutOutcome>> {
        let mut outcomes: Vec<PutOutcome> = vec![PutOutcome::Inserted; results.len()];
        // A transaction may not touch one key twice: later duplicates in the batch see the first.
        let mut first_of: HashMap<&RecordId, usize> = HashMap::new();
        let mut unique = Vec::new();
        let mut duplicates = Vec::new();
        for (i, r) in results.iter().enumerate() {
            match first_of.get(&r.record_id) {
                Some(_) => duplicates.push(i),
                None => {
                    first_of.insert(&r.record_id, i);
                    unique.push(i);
                }
            }
        }
        let mut present_ids: Vec<RecordId> = duplicates.iter().map(|&i| results[i].record_id.clone()).collect();
        let mut present_idx = duplicates;
        for chunk in unique.chunks(TRANSACT_RESULTS) {
            let batch: Vec<PredictionResult> = chunk.iter().map(|&i| results[i].clone()).collect();
            for j in self.insert_new(&batch).await? {
                present_idx.push(chunk[j]);
                present_ids.push(results[chunk[j]].record_id.clone());
            }
        }
        if !present_idx.is_empty() {
            let stored = self.get_batch(&present_ids).await?;
            for i in present_idx {
                let existing = stored.get(&results[i].record_id).cloned().ok_or_else(|| {
                    SluiceError::retryable(ReasonCode::StoreBusy, "a result reported present could not be read yet")
                })?;
                outcomes[i] = PutOutcome::AlreadyPresent(Box::new(existing));
            }
        }
        Ok(outcomes)
    }

    async fn get_batch(&self, ids: &[RecordId]) -> Result<HashMap<RecordId, PredictionResult>> {
        let items = batch_get(&self.client, &self.table, ids).await?;
        items.iter().map(|item| decode_result(item).map(|r| (r.record_id.clone(), r))).collect()
    }

    async fn counts(&self) -> Result<ResultCounts> {
        let items: Vec<String> = (0..RESULT_COUNTER_ITEMS).map(result_counters_item_number).collect();
        let counters = read_counter_items(&self.client, &self.counters, &items).await?;
        // An item may hold a negative count (a review settled on another item than it was
        // counted on); the sums are right.
        let n = |k: &str| counters.get(k).copied().unwrap_or(0).max(0) as u64;
        Ok(ResultCounts {
            accepted: n("accepted"),
            review: n("review"),
            reviewed: n("reviewed"),
            rejected: n("rejected"),
        })
    }

    /// Queries the index by status (each status in turn when none is asked for) from the page
    /// token on, and merges them in store order; the class and confidence filters apply to what
    /// the index returns.
    async fn query(&self, query: &ResultQuery) -> Result<ResultPage> {
        let index = super::resources::results_index();
        let statuses = query
            .status
            .map_or(vec![ResultStatus::Accepted, ResultStatus::Review, ResultStatus::Reviewed], |s| vec![s]);
        let start = query.start().key();
        let limit = query.limit.max(1);
        let budget = query.examined_at_most().div_ceil(statuses.len());
        let mut found: Vec<(String, PredictionResult)> = Vec::new();
        // Of the statuses read up to their budget, the least position reached: past it some
        // status was not read, so the page ends there.
        let mut cut: Option<String> = None;
        for status in statuses {
            let mut exclusive_start = None;
            let (mut matched, mut examined) = (0, 0);
            loop {
                let output = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .index_name(&index.name)
                    .key_condition_expression("#p = :status AND #k > :start")
                    .expression_attribute_names("#p", &index.partition)
                    .expression_attribute_names("#k", &index.sort)
                    .expression_attribute_values(":status", AttributeValue::S(status.as_str().to_owned()))
                    .expression_attribute_values(":start", AttributeValue::S(start.clone()))
                    .set_exclusive_start_key(exclusive_start.take())
                    .limit(limit.saturating_add(1).saturating_mul(2).min(1000).min(budget - examined) as i32)
                    .send()
                    .await
                    .map_err(|e| classify("Query", e))?;
                let mut last = None;
                for item in output.items() {
                    examined += 1;
                    let result = decode_result(item)?;
                    let Some(position) = item.get(&index.sort).and_then(|v| v.as_s().ok()) else { continue };
                    last = Some(position.clone());
                    if query.matches(&result) {
                        matched += 1;
                        found.push((position.clone(), result));
                    }
                }
                exclusive_start = output.last_evaluated_key().cloned();
                if matched > limit || exclusive_start.is_none() {
                    break;
                }
                if examined >= budget {
                    if let Some(last) = last {
                        cut = Some(cut.map_or(last.clone(), |c| c.min(last)));
                    }
                    break;
                }
            }
        }
        if let Some(cut) = &cut {
            found.retain(|(position, _)| position <= cut);
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > limit;
        found.truncate(limit);
        let next_page_token = match (found.last(), &cut) {
            (Some((position, _)), _) if more => Some(PageToken::parse(position)?),
            (_, Some(cut)) => Some(PageToken::parse(cut)?),
            _ => None,
        };
        Ok(ResultPage { results: found.into_iter().map(|(_, r)| r).collect(), next_page_token })
    }

    async fn withdraw_review(&self, id: &RecordId) -> Result<ReviewOutcome> {
        let current = match self.waiting_for_review(id).await? {
            Ok(result) => result,
            Err(outcome) => return Ok(outcome),
        };
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(id)))
            .condition_expression("#s = :review")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":review", AttributeValue::S(ResultStatus::Review.as_str().to_owned()))
            .build()
            .map_err(build_error)?;
        self.change_review(id, TransactWriteItem::builder().delete(delete).build(), None, current).await
    }

    async fn resolve_review(&self, id: &RecordId, resolution: &Resolution) -> Result<ReviewOutcome> {
        // Conditional on the body read too, so that a true label fed back in between is not
        // written over: on such a clash, read again.
        for _ in 0..FEEDBACK_ATTEMPTS {
            let Some(item) = batch_get(&self.client, &self.table, std::slice::from_ref(id)).await?.pop() else {
                return Ok(ReviewOutcome::Missing);
            };
            let current = decode_result(&item)?;
            if current.status != ResultStatus::Review {
                return Ok(ReviewOutcome::NotWaiting(Box::new(current)));
            }
            let settled = current.resolved(resolution);
            let update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(id)))
                .update_expression("SET #s = :new, body = :body")
                .condition_expression("#s = :review AND body = :old")
                .expression_attribute_names("#s", "status")
                .expression_attribute_values(":new", AttributeValue::S(settled.status.as_str().to_owned()))
                .expression_attribute_values(":review", AttributeValue::S(ResultStatus::Review.as_str().to_owned()))
                .expression_attribute_values(
                    ":body",
                    AttributeValue::S(serde_json::to_string(&settled).expect("a result serialises")),
                )
                .expression_attribute_values(":old", item["body"].clone())
                .build()
                .map_err(build_error)?;
            let status = settled.status;
            match self
                .change_review(id, TransactWriteItem::builder().update(update).build(), Some(status), settled)
                .await?
            {
                // Still waiting: its body changed under the write (a true label fed back).
                ReviewOutcome::NotWaiting(now) if now.status == ResultStatus::Review => continue,
                outcome => return Ok(outcome),
            }
        }
        Err(SluiceError::retryable(
            ReasonCode::StoreBusy,
            format!("the result of {id} kept changing while it was reviewed"),
        ))
    }

    async fn set_ground_truth(&self, id: &RecordId, label: &str) -> Result<FeedbackOutcome> {
        // Read, change the body, write it back only if nobody changed it in between (a review
        // settling it, say); on a clash, read again.
        for _ in 0..FEEDBACK_ATTEMPTS {
            let Some(item) = batch_get(&self.client, &self.table, std::slice::from_ref(id)).await?.pop() else {
                return Ok(FeedbackOutcome::Missing);
            };
            let mut result = decode_result(&item)?;
            // A reviewer's rejection's marker: no result to label.
            if result.status == ResultStatus::Rejected {
                return Ok(FeedbackOutcome::Missing);
            }
            if result.ground_truth.as_deref() == Some(label) {
                return Ok(FeedbackOutcome::Unchanged);
            }
            let old = item["body"].clone();
            result.ground_truth = Some(label.to_owned());
            let new = AttributeValue::S(serde_json::to_string(&result).expect("a result serialises"));
            let written = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(id)))
                .update_expression("SET body = :new")
                .condition_expression("body = :old")
                .expression_attribute_values(":new", new)
                .expression_attribute_values(":old", old)
                .send()
                .await;
            match written {
                Ok(_) => return Ok(FeedbackOutcome::Recorded),
                Err(e) if error_code(&e) == Some("ConditionalCheckFailedException") => continue,
                Err(e) => return Err(classify("UpdateItem", e)),
            }
        }
        Err(SluiceError::retryable(
            ReasonCode::StoreBusy,
            format!("the result of {id} kept changing while its true label was recorded"),
        ))
    }

    /// Pages in DynamoDB's scan order (stable, not sorted): resume after the last id returned.
    async fn scan(
        &self,
        after: Option<&RecordId>,
        limit: usize,
        status: Option<ResultStatus>,
    ) -> Result<Vec<PredictionResult>> {
        let mut out = Vec::new();
        let mut start = after.map(key);
        while out.len() < limit {
            let mut request = self.client.scan().table_name(&self.table).set_exclusive_start_key(start.take());
            if let Some(status) = status {
                request = request
                    .filter_expression("#s = :s")
                    .expression_attribute_names("#s", "status")
                    .expression_attribute_values(":s", AttributeValue::S(status.as_str().to_owned()));
            }
            let output =
                request.limit((limit - out.len()).min(1000) as i32).send().await.map_err(|e| classify("Scan", e))?;
            for item in output.items.unwrap_or_default() {
                out.push(decode_result(&item)?);
            }
            match output.last_evaluated_key {
                Some(last) if !last.is_empty() => start = Some(last),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

/// The counters item where worker processes add up their AWS requests.
const REQUEST_COUNTERS: &str = "requests";

/// A counters item (one per name in the counters table: `requests`; results are counted over
/// several, [`read_counter_items`]): its numeric attributes, read consistently; empty if the
/// item does not exist yet.
pub(super) async fn read_counters(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    name: &str,
) -> Result<BTreeMap<String, u64>> {
    let output = client
        .get_item()
        .table_name(table)
        .key(COUNTER_KEY, AttributeValue::S(name.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| classify("GetItem", e))?;
    Ok(output
        .item
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_n().ok()?.parse().ok()?)))
        .collect())
}

/// Adds `delta` to the counters item `name`, atomically, in one request.
pub(super) async fn add_to_counters(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    name: &str,
    delta: BTreeMap<String, u64>,
) -> Result<()> {
    let delta: Vec<(String, u64)> = delta.into_iter().filter(|(_, n)| *n > 0).collect();
    if delta.is_empty() {
        return Ok(());
    }
    let terms: Vec<String> = (0..delta.len()).map(|i| format!("#k{i} :v{i}")).collect();
    let mut update = client
        .update_item()
        .table_name(table)
        .key(COUNTER_KEY, AttributeValue::S(name.to_owned()))
        .update_expression(format!("ADD {}", terms.join(", ")));
    for (i, (counter, n)) in delta.into_iter().enumerate() {
        update = update
            .expression_attribute_names(format!("#k{i}"), counter)
            .expression_attribute_values(format!(":v{i}"), AttributeValue::N(n.to_string()));
    }
    update.send().await.map_err(|e| classify("UpdateItem", e))?;
    Ok(())
}

pub(super) struct DynamoRequestLedger {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoRequestLedger {
    pub(super) fn new(client: aws_sdk_dynamodb::Client, table: String) -> Self {
        Self { client, table }
    }
}

#[async_trait]
impl crate::backend::RequestLedger for DynamoRequestLedger {
    async fn add(&self, delta: BTreeMap<String, u64>) -> Result<()> {
        add_to_counters(&self.client, &self.table, REQUEST_COUNTERS, delta).await
    }

    async fn totals(&self) -> Result<BTreeMap<String, u64>> {
        read_counters(&self.client, &self.table, REQUEST_COUNTERS).await
    }
}
