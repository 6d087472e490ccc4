//! The embedded feature and result stores: tables keyed by record id, first write wins.

use std::collections::HashMap;
use std::rc::Rc;

use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::vtab::array::Array;
use rusqlite::{OptionalExtension, params};

use super::{Db, SWEEP_RECORDS, Sweeps, oldest_past};
use crate::backend::{
    FeatureStore, FeedbackOutcome, PageToken, PutOutcome, ResultCounts, ResultPage, ResultQuery, ResultStore,
    ReviewOutcome, StoredVector,
};
use crate::config::StoreConfig;
use crate::envelope::{RecordId, now_ms};
use crate::error::Result;
use crate::record::{PredictionResult, Resolution, ResultStatus};
use crate::topology::QueueName;
use crate::vector::FeatureVector;

pub(super) struct EmbeddedFeatureStore {
    db: Db,
    /// `store.feature_retention_days`.
    sweeps: Sweeps,
}

impl EmbeddedFeatureStore {
    pub(super) fn new(db: Db, config: &StoreConfig) -> Self {
        Self { db, sweeps: Sweeps::new(config.feature_retention_days) }
    }
}

/// How long before its message is sent a vector may have been written: the features stage writes
/// a batch's vectors, then sends its messages on, moments later; an hour covers any batch.
const SENT_AFTER_WRITTEN_MS: i64 = 3_600_000;

/// Deletes the oldest vectors written before `before` (ms), after row `after`, as much as
/// [`oldest_past`] lets go (rows are in write order: rowid); where it stopped at its limit, the
/// last row it looked at. A vector something still waits on is kept however old: a review
/// item's (its result is in review, and the reviewer is shown its image) and a DLQ entry's (a
/// replay needs it). Nor does it go past the oldest message waiting in the inference queue (a
/// pipeline stopped past the retention with a backlog: inference reads their vectors once it
/// runs again), less [`SENT_AFTER_WRITTEN_MS`]; the messages themselves are packed in batches,
/// which a look for each vector's id would read whole.
fn sweep_features(tx: &rusqlite::Transaction<'_>, before: i64, after: i64) -> rusqlite::Result<Option<i64>> {
    let waiting: Option<i64> = tx
        .prepare_cached("SELECT MIN(sent_at_ms) FROM queue_runs WHERE queue = ?1")?
        .query_row([QueueName::Inference.as_str()], |r| r.get(0))?;
    let before = waiting.map_or(before, |sent| before.min(sent - SENT_AFTER_WRITTEN_MS));
    let dlqs: Array = Rc::new(
        QueueName::ALL
            .into_iter()
            .filter(|q| q.dlq_stage().is_some())
            .map(|q| Value::from(q.as_str().to_owned()))
            .collect(),
    );
    let mut oldest = tx.prepare_cached(
        "SELECT f.rowid, f.created_ms, length(f.vector), \
         EXISTS (SELECT 1 FROM results r WHERE r.record_id = f.record_id AND r.status = 'review') \
         OR EXISTS (SELECT 1 FROM queue_runs q WHERE q.queue IN rarray(?3) AND q.dedup_key = f.record_id) \
         FROM features f WHERE f.rowid > ?2 ORDER BY f.rowid LIMIT ?1",
    )?;
    let oldest = oldest_past(oldest.query(params![SWEEP_RECORDS, after, dlqs])?, before, SWEEP_RECORDS)?;
    if !oldest.gone.is_empty() {
        let gone: Array = Rc::new(oldest.gone.into_iter().map(Value::from).collect());
        let deleted = tx.prepare_cached("DELETE FROM features WHERE rowid IN rarray(?1)")?.execute([gone])?;
        tracing::debug!(deleted, "feature vectors past the retention deleted");
    }
    Ok(oldest.last.filter(|_| oldest.full))
}

/// Runs `query`, whose `?1` is the list of `ids` (`… IN rarray(?1)`: SQLite's table-valued
/// array), on one cached statement for any number of ids: an `IN (?, ?, …)` list of the batch's
/// size was prepared anew for every batch, as batches come in many sizes.
fn select_in<T>(
    conn: &rusqlite::Connection,
    query: &str,
    ids: &[RecordId],
    mut row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let ids: Array = Rc::new(ids.iter().map(|id| Value::from(id.as_str().to_owned())).collect());
    let mut stmt = conn.prepare_cached(query)?;
    let rows = stmt.query_map([ids], &mut row)?;
    rows.collect()
}

#[async_trait]
impl FeatureStore for EmbeddedFeatureStore {
    async fn put_if_absent(&self, items: Vec<(RecordId, FeatureVector)>) -> Result<()> {
        // Encoded before taking the connection, which every stage waits for.
        let items: Vec<(RecordId, Vec<u8>)> = items.into_iter().map(|(id, vector)| (id, vector.to_bytes())).collect();
        let now = now_ms();
        // Now and then the write deletes what is past the retention too, in its transaction.
        let sweep = self.sweeps.due(now);
        let swept = self
            .db
            .write(move |tx| {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO features (record_id, vector, created_ms) VALUES (?1, ?2, ?3)",
                )?;
                for (id, vector) in items {
                    insert.execute(params![id.as_str(), vector, now as i64])?;
                }
                sweep.map(|sweep| sweep_features(tx, sweep.before, sweep.after)).transpose()
            })
            .await?;
        if let Some(stopped_at) = swept {
            self.sweeps.stopped(stopped_at);
        }
        Ok(())
    }

    /// Written again as of now, under a new row: rows stay in the order of their times, which
    /// the sweep relies on (it stops at the first young one).
    async fn refresh(&self, ids: &[RecordId]) -> Result<()> {
        let ids = ids.to_vec();
        let now = now_ms() as i64;
        self.db
            .write(move |tx| {
                let mut again = tx.prepare_cached(
                    "INSERT OR REPLACE INTO features (record_id, vector, created_ms) \
                     SELECT record_id, vector, ?2 FROM features WHERE record_id = ?1",
                )?;
                for id in ids {
                    again.execute(params![id.as_str(), now])?;
                }
                Ok(())
            })
            .await
    }

    async fn get_batch(&self, ids: &[RecordId]) -> Result<HashMap<RecordId, StoredVector>> {
        let ids = ids.to_vec();
        self.db
            .call(move |conn| {
                select_in(conn, "SELECT record_id, vector FROM features WHERE record_id IN rarray(?1)", &ids, |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
            })
            .await
            // Decoded off the connection.
            .map(|rows| {
                rows.into_iter()
                    .filter_map(|(id, bytes)| Some((RecordId::parse(id).ok()?, FeatureVector::from_bytes(&bytes))))
                    .collect()
            })
    }
}

/// Results in time order after (?2, ?3), up to ?4, of status ?1. One statement per case, each
/// on its own index: one `?1 IS NULL OR status = ?1` statement let the planner pick only the time
/// index, so listing the few results waiting for review read every accepted one too.
const LIST_BY_STATUS: &str = "SELECT created_ms, body FROM results WHERE status = ?1 \
     AND (created_ms, record_id) > (?2, ?3) ORDER BY created_ms, record_id LIMIT ?4";

/// [`LIST_BY_STATUS`] of every status: ?1 (no status) is bound and not used.
const LIST_ALL: &str = "SELECT created_ms, body FROM results \
     WHERE (created_ms, record_id) > (?2, ?3) ORDER BY created_ms, record_id LIMIT ?4";

pub(super) struct EmbeddedResultStore {
    db: Db,
}

impl EmbeddedResultStore {
    pub(super) fn new(db: Db) -> Self {
        Self { db }
    }
}

/// The result of `id` if it waits for review; else what a review call answers (`Missing`,
/// `NotWaiting`).
fn waiting_for_review(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
) -> rusqlite::Result<std::result::Result<PredictionResult, ReviewOutcome>> {
    let stored: Option<String> =
        tx.query_row("SELECT body FROM results WHERE record_id = ?1", [id], |r| r.get(0)).optional()?;
    let Some(stored) = stored else { return Ok(Err(ReviewOutcome::Missing)) };
    let result = decode_result(&stored)?;
    Ok(if result.status == ResultStatus::Review {
        Ok(result)
    } else {
        Err(ReviewOutcome::NotWaiting(Box::new(result)))
    })
}

fn decode_result(body: &str) -> rusqlite::Result<PredictionResult> {
    serde_json::from_str(body)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

#[async_trait]
impl ResultStore for EmbeddedResultStore {
    async fn put_if_absent(&self, results: Vec<PredictionResult>) -> Result<Vec<PutOutcome>> {
        // Written out before taking the connection, which every stage waits for.
        let rows: Vec<(RecordId, ResultStatus, String)> = results
            .into_iter()
            .map(|result| {
                let body = serde_json::to_string(&result).expect("a result serialises");
                (result.record_id, result.status, body)
            })
            .collect();
        self.db
            .write(move |tx| {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO results (record_id, status, body, created_ms) VALUES (?1, ?2, ?3, ?4)",
                )?;
                let mut existing = tx.prepare_cached("SELECT body FROM results WHERE record_id = ?1")?;
                let now = now_ms() as i64;
                let mut outcomes = Vec::with_capacity(rows.len());
                for (id, status, body) in rows {
                    if insert.execute(params![id.as_str(), status.as_str(), body, now])? == 1 {
                        outcomes.push(PutOutcome::Inserted);
                    } else {
                        // Read back in the transaction: a stored result this build cannot read
                        // fails the whole batch, none of it written (redeliveries only).
                        let stored: String = existing.query_row([id.as_str()], |r| r.get(0))?;
                        outcomes.push(PutOutcome::AlreadyPresent(Box::new(decode_result(&stored)?)));
                    }
                }
                Ok(outcomes)
            })
            .await
    }

    async fn get_batch(&self, ids: &[RecordId]) -> Result<HashMap<RecordId, PredictionResult>> {
        let ids = ids.to_vec();
        self.db
            .call(move |conn| {
                let rows = select_in(conn, "SELECT body FROM results WHERE record_id IN rarray(?1)", &ids, |r| {
                    decode_result(&r.get::<_, String>(0)?)
                })?;
                Ok(rows.into_iter().map(|r| (r.record_id.clone(), r)).collect())
            })
            .await
    }

    async fn counts(&self) -> Result<ResultCounts> {
        self.db
            .call(|conn| {
                let mut counts = ResultCounts::default();
                let mut stmt = conn.prepare_cached("SELECT status, COUNT(*) FROM results GROUP BY status")?;
                let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
                for row in rows {
                    let (status, n) = row?;
                    match ResultStatus::parse(&status) {
                        Some(ResultStatus::Accepted) => counts.accepted = n as u64,
                        Some(ResultStatus::Review) => counts.review = n as u64,
                        Some(ResultStatus::Reviewed) => counts.reviewed = n as u64,
                        Some(ResultStatus::Rejected) => counts.rejected = n as u64,
                        None => {}
                    }
                }
                Ok(counts)
            })
            .await
    }

    async fn query(&self, query: &ResultQuery) -> Result<ResultPage> {
        let query = query.clone();
        self.db
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(if query.status.is_some() { LIST_BY_STATUS } else { LIST_ALL })?;
                let status = query.status.map(ResultStatus::as_str);
                let mut from = query.start();
                let mut page = ResultPage::default();
                let limit = query.limit.max(1);
                let chunk = limit.saturating_mul(2).clamp(50, 1000);
                let (budget, mut examined) = (query.examined_at_most(), 0);
                loop {
                    let after = from.record_id.as_ref().map_or("", |id| id.as_str()).to_owned();
                    // No more than the budget leaves, and one to tell whether the page ends there.
                    let want = chunk.min(budget - examined + 1);
                    let rows: Vec<(u64, PredictionResult)> = stmt
                        .query_map(params![status, from.stored_ms as i64, after, want as i64], |r| {
                            Ok((r.get::<_, i64>(0)? as u64, decode_result(&r.get::<_, String>(1)?)?))
                        })?
                        .collect::<rusqlite::Result<_>>()?;
                    let exhausted = rows.len() < want;
                    for (stored_ms, result) in rows {
                        if examined == budget {
                            // Read as much as a page may: it ends here, to go on from.
                            page.next_page_token = Some(from);
                            return Ok(page);
                        }
                        examined += 1;
                        from = PageToken::after(stored_ms, &result.record_id);
                        if !query.matches(&result) {
                            continue;
                        }
                        if page.results.len() == limit {
                            // One more exists: the page ends at the last one it holds.
                            return Ok(page);
                        }
                        page.results.push(result);
                        page.next_page_token = Some(from.clone());
                    }
                    if exhausted {
                        page.next_page_token = None;
                        return Ok(page);
                    }
                }
            })
            .await
    }

    async fn withdraw_review(&self, id: &RecordId) -> Result<ReviewOutcome> {
        let id = id.as_str().to_owned();
        self.db
            .write(move |tx| {
                let result = match waiting_for_review(tx, &id)? {
                    Ok(result) => result,
                    Err(outcome) => return Ok(outcome),
                };
                tx.execute("DELETE FROM results WHERE record_id = ?1 AND status = 'review'", [&id])?;
                Ok(ReviewOutcome::Resolved(Box::new(result)))
            })
            .await
    }

    async fn resolve_review(&self, id: &RecordId, resolution: &Resolution) -> Result<ReviewOutcome> {
        let (id, resolution) = (id.as_str().to_owned(), resolution.clone());
        self.db
            .write(move |tx| {
                let settled = match waiting_for_review(tx, &id)? {
                    Ok(result) => result.resolved(&resolution),
                    Err(outcome) => return Ok(outcome),
                };
                let body = serde_json::to_string(&settled).expect("a result serialises");
                tx.execute(
                    "UPDATE results SET status = ?1, body = ?2 WHERE record_id = ?3 AND status = 'review'",
                    params![settled.status.as_str(), body, id],
                )?;
                Ok(ReviewOutcome::Resolved(Box::new(settled)))
            })
            .await
    }

    async fn set_ground_truth(&self, id: &RecordId, label: &str) -> Result<FeedbackOutcome> {
        let (id, label) = (id.as_str().to_owned(), label.to_owned());
        self.db
            .write(move |tx| {
                let stored: Option<String> =
                    tx.query_row("SELECT body FROM results WHERE record_id = ?1", [&id], |r| r.get(0)).optional()?;
                let Some(stored) = stored else { return Ok(FeedbackOutcome::Missing) };
                let mut result = decode_result(&stored)?;
                // A reviewer's rejection's marker: no result to label.
                if result.status == ResultStatus::Rejected {
                    return Ok(FeedbackOutcome::Missing);
                }
                if result.ground_truth.as_deref() == Some(label.as_str()) {
                    return Ok(FeedbackOutcome::Unchanged);
                }
                result.ground_truth = Some(label);
                let body = serde_json::to_string(&result).expect("a result serialises");
                tx.execute("UPDATE results SET body = ?1 WHERE record_id = ?2", params![body, id])?;
                Ok(FeedbackOutcome::Recorded)
            })
            .await
    }

    async fn scan(
        &self,
        after: Option<&RecordId>,
        limit: usize,
        status: Option<ResultStatus>,
    ) -> Result<Vec<PredictionResult>> {
        let after = after.map(|id| id.as_str().to_owned()).unwrap_or_default();
        let status = status.map(ResultStatus::as_str);
        self.db
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT body FROM results WHERE record_id > ?1 AND (?2 IS NULL OR status = ?2) \
                     ORDER BY record_id LIMIT ?3",
                )?;
                let rows =
                    stmt.query_map(params![after, status, limit as i64], |r| decode_result(&r.get::<_, String>(0)?))?;
                rows.collect()
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedStore;
    use crate::config::StoreConfig;

    /// What SQLite's planner says it does for `sql` with `bound`, its steps joined.
    fn plan(conn: &rusqlite::Connection, sql: &str, bound: impl rusqlite::Params) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let steps = stmt.query_map(bound, |r| r.get::<_, String>(3)).unwrap();
        steps.collect::<rusqlite::Result<Vec<_>>>().unwrap().join("; ")
    }

    /// [`plan`] of the result listings, with a status, a position and a limit bound.
    fn listing_plan(conn: &rusqlite::Connection, sql: &str) -> String {
        plan(conn, sql, params![None::<String>, 0, "", 10])
    }

    /// A write now and then deletes the vectors past `store.feature_retention_days`, oldest
    /// first, a bounded number at a time, and keeps the younger ones and those a review item or
    /// a DLQ entry still waits on; 0 keeps them all.
    #[tokio::test]
    async fn vectors_past_their_retention_are_deleted_by_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { path: dir.path().join("s.sqlite"), feature_retention_days: 1, ..Default::default() };
        let store = EmbeddedStore::open(&config).unwrap();
        let backend = store.clone().into_backend();
        let id = |i: usize| RecordId::parse(format!("r{i}")).unwrap();
        let old = (SWEEP_RECORDS + 5) as usize;
        let vectors = (0..old + 3).map(|i| (id(i), FeatureVector::Pixels(vec![1, 2, 3]))).collect();
        backend.features.put_if_absent(vectors).await.unwrap();
        // The first `old` written two days ago; r3 waits for review, r7 in a DLQ.
        let two_days_ago = (now_ms() - 2 * 24 * 3_600_000) as i64;
        let backdate = move |tx: &rusqlite::Transaction<'_>| {
            tx.execute("UPDATE features SET created_ms = ?1 WHERE rowid <= ?2", params![two_days_ago, old as i64])?;
            tx.execute("INSERT INTO results (record_id, status, body, created_ms) VALUES ('r3', 'review', '{}', 0)", [])
        };
        store.db.write(backdate).await.unwrap();
        let entry = crate::backend::OutgoingMessage {
            body: b"{}".to_vec(),
            attributes: Default::default(),
            dedup_key: Some("r7".to_owned()),
        };
        backend.queue(QueueName::InferenceDlq).send_batch(vec![entry]).await.unwrap();
        let count = || async {
            store
                .db
                .call(|conn| conn.query_row("SELECT COUNT(*) FROM features", [], |r| r.get::<_, i64>(0)))
                .await
                .unwrap()
        };

        let kept = EmbeddedStore::open(&StoreConfig { feature_retention_days: 0, ..config.clone() }).unwrap();
        kept.into_backend().features.put_if_absent(vec![(id(9_000), FeatureVector::Pixels(vec![1]))]).await.unwrap();
        assert_eq!(count().await, old as i64 + 4, "0 keeps every vector");

        // A fresh handle's first write sweeps: a bounded number of rows looked at, the two held
        // kept; the next write goes on at once after them.
        let features = store.clone().into_backend().features;
        features.put_if_absent(vec![(id(9_001), FeatureVector::Pixels(vec![1]))]).await.unwrap();
        assert_eq!(count().await, old as i64 + 5 - (SWEEP_RECORDS - 2));
        features.put_if_absent(vec![(id(9_002), FeatureVector::Pixels(vec![1]))]).await.unwrap();
        assert_eq!(count().await, 2 + 3 + 3, "the two held, the three young ones and the three written since");
        let ids = [id(0), id(3), id(7), id(old - 1), id(old), id(old + 2), id(9_002)];
        let left = features.get_batch(&ids).await.unwrap();
        assert_eq!(
            left.keys().map(RecordId::as_str).collect::<std::collections::BTreeSet<_>>(),
            ["r3", "r7", "r1005", "r1007", "r9002"].into()
        );

        // Its review settled, r3's vector goes at a later sweep, which starts from the oldest again.
        store.db.write(|tx| tx.execute("DELETE FROM results WHERE record_id = 'r3'", [])).await.unwrap();
        let features = store.clone().into_backend().features;
        features.put_if_absent(vec![(id(9_003), FeatureVector::Pixels(vec![1]))]).await.unwrap();
        let left = features.get_batch(&[id(3), id(7)]).await.unwrap();
        assert_eq!(left.keys().map(RecordId::as_str).collect::<Vec<_>>(), ["r7"]);
    }

    /// A pipeline stopped past the retention with a backlog in the inference queue: the sweep
    /// keeps the vectors from the oldest message waiting there on, which inference reads once it
    /// runs again; those are swept once the queue has moved on.
    #[tokio::test]
    async fn vectors_of_records_waiting_in_the_inference_queue_are_kept_past_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { path: dir.path().join("s.sqlite"), feature_retention_days: 1, ..Default::default() };
        let store = EmbeddedStore::open(&config).unwrap();
        let backend = store.clone().into_backend();
        let id = |i: usize| RecordId::parse(format!("r{i}")).unwrap();
        backend
            .features
            .put_if_absent((0..5).map(|i| (id(i), FeatureVector::Pixels(vec![1]))).collect())
            .await
            .unwrap();
        let message = |i: usize| crate::backend::OutgoingMessage {
            body: id(i).to_string().into_bytes(),
            attributes: Default::default(),
            dedup_key: Some(id(i).to_string()),
        };
        backend.queue(QueueName::Inference).send_batch(vec![message(3)]).await.unwrap();
        // r0–r2 written three days ago; r3 two days ago and sent on at once; r4 just after.
        let day = 24 * 3_600_000;
        let now = now_ms() as i64;
        store
            .db
            .write(move |tx| {
                tx.execute(
                    "UPDATE features SET created_ms = ?1 WHERE record_id IN ('r0', 'r1', 'r2')",
                    [now - 3 * day],
                )?;
                tx.execute("UPDATE features SET created_ms = ?1 WHERE record_id = 'r3'", [now - 2 * day])?;
                tx.execute("UPDATE features SET created_ms = ?1 WHERE record_id = 'r4'", [now - 2 * day + 2])?;
                tx.execute("UPDATE queue_runs SET sent_at_ms = ?1", [now - 2 * day + 1])
            })
            .await
            .unwrap();
        let left = |features: std::sync::Arc<dyn FeatureStore>| async move {
            let found = features.get_batch(&(0..5).map(id).collect::<Vec<_>>()).await.unwrap();
            found.keys().map(RecordId::to_string).collect::<std::collections::BTreeSet<_>>()
        };
        // A fresh handle's first write sweeps.
        let features = store.clone().into_backend().features;
        features.put_if_absent(vec![(id(100), FeatureVector::Pixels(vec![1]))]).await.unwrap();
        assert_eq!(left(features).await, ["r3".to_owned(), "r4".to_owned()].into(), "kept from the oldest waiting on");

        // Taken and done with, the queue holds nothing: the next sweep takes them.
        let queue = backend.queue(QueueName::Inference);
        let taken = queue.receive(10, std::time::Duration::ZERO).await.unwrap();
        queue.ack(&taken.iter().map(|m| m.receipt.clone()).collect::<Vec<_>>()).await.unwrap();
        let features = store.clone().into_backend().features;
        features.put_if_absent(vec![(id(101), FeatureVector::Pixels(vec![1]))]).await.unwrap();
        assert!(left(features).await.is_empty());
    }

    /// Look-ups by record id take any number of ids on one statement, each id found through
    /// the table's record id index, not a scan.
    #[tokio::test]
    async fn look_ups_by_record_id_take_any_number_on_one_statement_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { path: dir.path().join("s.sqlite"), ..Default::default() };
        let store = EmbeddedStore::open(&config).unwrap();
        let features = store.clone().into_backend().features;
        let ids: Vec<RecordId> = (0..1200).map(|i| RecordId::parse(format!("r{i}")).unwrap()).collect();
        let vectors = ids.iter().map(|id| (id.clone(), FeatureVector::Pixels(vec![1, 2, 3]))).collect();
        features.put_if_absent(vectors).await.unwrap();
        let mut wanted = ids[..700].to_vec();
        wanted.push(RecordId::parse("missing").unwrap());
        assert_eq!(features.get_batch(&wanted).await.unwrap().len(), 700);
        assert_eq!(features.get_batch(&ids[1100..]).await.unwrap().len(), 100);

        let plans = store
            .db
            .call(|conn| {
                Ok(["features", "results"].map(|table| {
                    let sql = format!("SELECT * FROM {table} WHERE record_id IN rarray(?1)");
                    plan(conn, &sql, [Rc::new(Vec::<Value>::new())])
                }))
            })
            .await
            .unwrap();
        for plan in plans {
            assert!(plan.contains("USING INDEX sqlite_autoindex"), "{plan}");
            assert!(!plan.contains("SCAN features") && !plan.contains("SCAN results"), "{plan}");
        }
    }

    #[tokio::test]
    async fn result_listings_search_their_index_and_an_older_layout_is_moved() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { path: dir.path().join("s.sqlite"), ..Default::default() };
        // A store as builds before 2026-12-05 made it: both tables keyed by record id, and from
        // before 2026-11-28 an index no query used. Opening moves the rows and drops the index.
        rusqlite::Connection::open(&config.path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE results (record_id TEXT PRIMARY KEY, status TEXT NOT NULL, body TEXT NOT NULL, \
                 created_ms INTEGER NOT NULL) WITHOUT ROWID; \
                 CREATE INDEX results_by_status ON results (status, record_id); \
                 CREATE INDEX results_by_time ON results (created_ms, record_id); \
                 INSERT INTO results VALUES ('b', 'accepted', 'body b', 1), ('a', 'review', 'body a', 2); \
                 CREATE TABLE features (record_id TEXT PRIMARY KEY, vector BLOB NOT NULL, \
                 created_ms INTEGER NOT NULL) WITHOUT ROWID; \
                 INSERT INTO features VALUES ('a', x'0000c03f', 2);",
            )
            .unwrap();
        let store = EmbeddedStore::open(&config).unwrap();
        let features = store.clone().into_backend().features;
        let a = RecordId::parse("a").unwrap();
        let vector = features.get_batch(std::slice::from_ref(&a)).await.unwrap().remove(&a).unwrap().unwrap();
        assert_eq!(vector, crate::vector::FeatureVector::Values(vec![1.5]));
        // The same store opened again (another process) finds nothing to move.
        drop(EmbeddedStore::open_separate(&config).unwrap());
        let (by_status, all, indexes, rows, tables) = store
            .db
            .call(|conn| {
                let indexes: Vec<String> = conn
                    .prepare(
                        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'results' ORDER BY name",
                    )?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let rows: Vec<(String, String, String)> = conn
                    .prepare("SELECT record_id, status, body FROM results ORDER BY rowid")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                let tables: Vec<String> = conn
                    .prepare(
                        "SELECT name || ': ' || sql FROM sqlite_master WHERE type = 'table' \
                         AND (name IN ('features', 'results') OR name LIKE '%keyed_by%') ORDER BY name",
                    )?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                Ok((listing_plan(conn, LIST_BY_STATUS), listing_plan(conn, LIST_ALL), indexes, rows, tables))
            })
            .await
            .unwrap();
        let row = |id: &str, status: &str, body: &str| (id.to_owned(), status.to_owned(), body.to_owned());
        assert_eq!(rows, [row("b", "accepted", "body b"), row("a", "review", "body a")], "in time order");
        assert_eq!(tables.len(), 2, "{tables:#?}");
        assert!(!tables.iter().any(|t| t.contains("WITHOUT ROWID")), "{tables:#?}");
        assert!(by_status.starts_with("SEARCH results USING INDEX results_by_status_time (status=?"), "{by_status}");
        assert!(all.starts_with("SEARCH results USING INDEX results_by_time"), "{all}");
        assert!(!by_status.contains("TEMP B-TREE") && !all.contains("TEMP B-TREE"), "{by_status} / {all}");
        assert!(!indexes.iter().any(|name| name == "results_by_status"), "{indexes:?}");
    }
}
