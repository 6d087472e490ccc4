//! KCL-style shard leases in a DynamoDB table. No maintained Rust crate coordinates Kinesis
//! leases, so this follows the KCL v2 lease table: one item per shard with `leaseKey`,
//! `leaseOwner`, `leaseCounter`, `checkpoint`, `parentShardIds` and
//! `ownerSwitchesSinceCheckpoint`.
//!
//! - A holder renews by a conditional increment of the counter.
//! - An observer judges a lease expired when its counter has not moved for the failover time on
//!   the observer's own clock: no wall-clock comparison across machines.
//! - A worker takes expired (or free) leases first, then steals one at a time from the most
//!   loaded worker only while it holds less than its fair share: no churn once balanced.
//! - A child shard's lease becomes available only once every parent is checkpointed at
//!   `SHARD_END`.
//! - The table is scanned at every rebalance while another worker holds a lease (to see its
//!   counter stop), but a worker that holds every lease there is to hold has nobody to watch:
//!   it scans every twice the failover time (the KCL's taker interval), and at once when a lease
//!   is lost or created or a shard ends. Renewals keep their pace either way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::AttributeValue;

use super::{classify, error_code};
use crate::error::{ReasonCode, Result, SluiceError};

pub(super) const TRIM_HORIZON: &str = "TRIM_HORIZON";
pub(super) const SHARD_END: &str = "SHARD_END";

/// The lease table's hash key, as `resources.json` names it.
pub(super) const LEASE_KEY: &str = "leaseKey";
const OWNER: &str = "leaseOwner";
const COUNTER: &str = "leaseCounter";
const CHECKPOINT: &str = "checkpoint";
const PARENTS: &str = "parentShardIds";
const SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
/// Records checkpointed in the shard so far: what arrived from any producer, counted once
/// because it moves in the same conditional write as the checkpoint.
const ARRIVED: &str = "recordsCheckpointed";
/// Every record that arrived in the shard before this time (ms since the epoch) is checkpointed:
/// a shard taken up again once the stream's retention has passed it may have lost records to
/// trimming, unread (`kinesis.rs`). Written with checkpoints and renewals.
const READ_THROUGH: &str = "readThroughMs";

/// One shard's lease as read from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Lease {
    pub(super) shard: String,
    pub(super) owner: Option<String>,
    pub(super) counter: u64,
    pub(super) checkpoint: String,
    pub(super) parents: Vec<String>,
    pub(super) arrived: u64,
    /// See [`READ_THROUGH`]; none where no worker has said.
    pub(super) read_through_ms: Option<u64>,
}

impl Lease {
    fn from_item(item: &HashMap<String, AttributeValue>) -> Option<Self> {
        let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
        let n = |k: &str| item.get(k).and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()).unwrap_or(0);
        Some(Self {
            shard: s(LEASE_KEY)?,
            owner: s(OWNER),
            counter: n(COUNTER),
            arrived: n(ARRIVED),
            read_through_ms: Some(n(READ_THROUGH)).filter(|&ms| ms > 0),
            checkpoint: s(CHECKPOINT).unwrap_or_else(|| TRIM_HORIZON.to_owned()),
            parents: item.get(PARENTS).and_then(|v| v.as_ss().ok()).cloned().unwrap_or_default(),
        })
    }

    pub(super) fn finished(&self) -> bool {
        self.checkpoint == SHARD_END
    }
}

pub(super) struct LeaseCoordinator {
    client: aws_sdk_dynamodb::Client,
    table: String,
    owner: String,
    failover: Duration,
    /// Shard → (counter last seen, when this observer first saw that counter).
    observed: HashMap<String, (u64, Instant)>,
    /// Shard → the counter this worker last wrote, and when.
    held: BTreeMap<String, (u64, Instant)>,
    /// Every shard with a lease, as of the last scan (and the leases created since).
    known: HashSet<String>,
    /// Shards this worker lost (taken, or its write refused) since [`Self::take_lost`] was last
    /// asked: one taken back since is read again from its stored checkpoint, not on from where
    /// this worker's reader was (another worker may have checkpointed past it meanwhile).
    lost: Vec<String>,
    /// When [`Self::rebalance`] next reads the table.
    next_scan: Instant,
    /// Held shard → its [`READ_THROUGH`] time, to write with its next checkpoint or renewal
    /// (forgotten when a lease is taken: only a held lease is written).
    read_through: HashMap<String, u64>,
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

impl LeaseCoordinator {
    pub(super) fn new(client: aws_sdk_dynamodb::Client, table: String, owner: String, failover: Duration) -> Self {
        Self {
            client,
            table,
            owner,
            failover,
            observed: HashMap::new(),
            held: BTreeMap::new(),
            known: Default::default(),
            lost: Vec::new(),
            next_scan: Instant::now(),
            read_through: HashMap::new(),
        }
    }

    /// Every record of `shard` that arrived before `ms` is checkpointed: said in its lease at the
    /// next checkpoint or renewal.
    pub(super) fn read_through(&mut self, shard: &str, ms: u64) {
        self.read_through.insert(shard.to_owned(), ms);
    }

    /// `update` also setting the shard's [`READ_THROUGH`] time, where this worker knows one.
    fn with_read_through(
        &self,
        shard: &str,
        update: UpdateItemFluentBuilder,
        set: &mut String,
    ) -> UpdateItemFluentBuilder {
        let Some(&ms) = self.read_through.get(shard) else { return update };
        set.push_str(", #t = :t");
        update.expression_attribute_names("#t", READ_THROUGH).expression_attribute_values(":t", n(ms))
    }

    /// The shards lost since this was last asked (see [`Self::lost`]).
    pub(super) fn take_lost(&mut self) -> Vec<String> {
        std::mem::take(&mut self.lost)
    }

    /// `shard` is no longer held: taken by another worker, or a write of ours refused.
    fn lose(&mut self, shard: &str) {
        self.held.remove(shard);
        self.lost.push(shard.to_owned());
        self.scan_soon();
    }

    /// Whether the lease of `shard` reads as ours at `counter`, holding `checkpoint` where one is
    /// given (a consistent read): a write of ours whose answer was lost and whose retry by the
    /// SDK then failed its condition was carried out, and the lease is still ours. (The
    /// checkpoint too: an earlier write of ours whose answer was lost moves the counter alike.)
    async fn written_by_us(&self, shard: &str, counter: u64, checkpoint: Option<&str>) -> Result<bool> {
        Ok(self.stored_lease(shard).await?.is_some_and(|l| {
            l.owner.as_deref() == Some(self.owner.as_str())
                && l.counter == counter
                && checkpoint.is_none_or(|c| l.checkpoint == c)
        }))
    }

    /// The lease of `shard` as stored (a consistent read); `None` where there is none.
    async fn stored_lease(&self, shard: &str) -> Result<Option<Lease>> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(shard))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("GetItem", e))?;
        Ok(output.item.as_ref().and_then(Lease::from_item))
    }

    /// The shards that have a lease, as of the last scan.
    pub(super) fn known(&self) -> &HashSet<String> {
        &self.known
    }

    /// Makes the next [`Self::rebalance`] read the table.
    fn scan_soon(&mut self) {
        self.next_scan = Instant::now();
    }

    pub(super) fn held(&self) -> impl Iterator<Item = &String> {
        self.held.keys()
    }

    /// Creates the lease of a shard that has none yet (a no-op if it exists).
    pub(super) async fn ensure_lease(&mut self, shard: &str, parents: &[String]) -> Result<()> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(LEASE_KEY, s(shard))
            .item(COUNTER, n(0))
            .item(CHECKPOINT, s(TRIM_HORIZON))
            .item(SWITCHES, n(0))
            .condition_expression("attribute_not_exists(leaseKey)");
        if !parents.is_empty() {
            put = put.item(PARENTS, AttributeValue::Ss(parents.to_vec()));
        }
        let result = match put.send().await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e) == Some("ConditionalCheckFailedException") => Ok(()),
            Err(e) => Err(classify("PutItem", e)),
        };
        if result.is_ok() {
            self.known.insert(shard.to_owned());
            self.scan_soon();
        }
        result
    }

    /// Every lease, read consistently.
    pub(super) async fn scan(&self) -> Result<Vec<Lease>> {
        let mut leases = Vec::new();
        let mut start = None;
        loop {
            let output = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| classify("Scan", e))?;
            leases.extend(output.items.unwrap_or_default().iter().filter_map(Lease::from_item));
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(leases),
            }
        }
    }

    /// Renews held leases, then, when a scan is due, takes a fair share and returns every lease
    /// as read (`None` when the table was not read).
    pub(super) async fn rebalance(&mut self) -> Result<Option<Vec<Lease>>> {
        self.renew().await?;
        if Instant::now() < self.next_scan {
            return Ok(None);
        }
        let leases = self.scan().await?;
        self.known = leases.iter().map(|l| l.shard.clone()).collect();
        let now = Instant::now();
        for lease in &leases {
            let seen = self.observed.entry(lease.shard.clone()).or_insert((lease.counter, now));
            if seen.0 != lease.counter {
                *seen = (lease.counter, now);
            }
            if self.held.contains_key(&lease.shard) && lease.owner.as_deref() != Some(&self.owner) {
                tracing::warn!(shard = lease.shard, thief = ?lease.owner, "lease taken by another worker");
                self.lose(&lease.shard);
            }
        }

        let finished: HashMap<&str, bool> = leases.iter().map(|l| (l.shard.as_str(), l.finished())).collect();
        // A parent whose lease is gone has aged out of the stream: it counts as finished.
        let available: Vec<&Lease> = leases
            .iter()
            .filter(|l| !l.finished() && l.parents.iter().all(|p| finished.get(p.as_str()).copied().unwrap_or(true)))
            .collect();
        let is_expired = |l: &Lease| match &l.owner {
            None => true,
            // Ours in the table but not held: a write that took or renewed it was carried out
            // but its answer was lost (and its retry then failed its condition). Nobody else
            // would take it while it reads as ours, so it is taken back at once.
            Some(owner) if *owner == self.owner => !self.held.contains_key(&l.shard),
            Some(_) => {
                self.observed.get(&l.shard).is_some_and(|(_, since)| now.duration_since(*since) >= self.failover)
            }
        };
        let expired: Vec<Lease> = available.iter().filter(|l| is_expired(l)).map(|l| (*l).clone()).collect();
        let mut load: BTreeMap<String, Vec<Lease>> = BTreeMap::new();
        for lease in available.iter().filter(|l| !is_expired(l)) {
            if let Some(owner) = &lease.owner {
                load.entry(owner.clone()).or_default().push((*lease).clone());
            }
        }
        let workers = load.keys().filter(|o| **o != self.owner).count() + 1;
        let target = available.len().div_ceil(workers);
        let mine = available.iter().filter(|l| self.held.contains_key(&l.shard)).count();
        // Alone with every lease: nobody's counter to watch until something changes.
        let alone = mine == available.len();
        drop(available);
        self.next_scan = if alone { now + self.failover * 2 } else { now };

        let mut wanted = target.saturating_sub(mine);
        for lease in &expired {
            if wanted == 0 {
                break;
            }
            if self.take(lease).await? {
                wanted -= 1;
            }
        }
        if wanted > 0 {
            let busiest = load.iter().filter(|(o, _)| **o != self.owner).max_by_key(|(_, ls)| ls.len());
            if let Some((_, theirs)) = busiest.filter(|(_, ls)| ls.len() > target) {
                let victim = theirs.last().expect("non-empty").clone();
                self.take(&victim).await?;
            }
        }
        Ok(Some(leases))
    }

    /// Conditional on the counter this worker observed: whoever moved it first wins.
    async fn take(&mut self, lease: &Lease) -> Result<bool> {
        let next = lease.counter + 1;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(&lease.shard))
            .update_expression("SET #o = :me, #c = :next ADD #w :one")
            .condition_expression("attribute_exists(#k) AND #c = :seen")
            .expression_attribute_names("#o", OWNER)
            .expression_attribute_names("#c", COUNTER)
            .expression_attribute_names("#w", SWITCHES)
            .expression_attribute_names("#k", LEASE_KEY)
            .expression_attribute_values(":me", s(&self.owner))
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":seen", n(lease.counter))
            .expression_attribute_values(":one", n(1))
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(shard = lease.shard, previous = ?lease.owner, "lease taken");
                self.held.insert(lease.shard.clone(), (next, Instant::now()));
                // What this worker knew of the shard before it last let it go is not so now:
                // another may have read it further since.
                self.read_through.remove(&lease.shard);
                Ok(true)
            }
            Err(e) if error_code(&e) == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }

    /// Renews the held leases not written (renewed, taken or checkpointed) in the last third
    /// of the failover time.
    pub(super) async fn renew(&mut self) -> Result<()> {
        let stale = Instant::now() - self.failover / 3;
        let held: Vec<(String, u64)> =
            self.held.iter().filter(|(_, (_, at))| *at <= stale).map(|(k, (c, _))| (k.clone(), *c)).collect();
        for (shard, counter) in held {
            let mut set = "SET #c = :next".to_owned();
            let update = self.client.update_item().table_name(&self.table).key(LEASE_KEY, s(&shard));
            let result = self
                .with_read_through(&shard, update, &mut set)
                .update_expression(set)
                .condition_expression("#o = :me AND #c = :held")
                .expression_attribute_names("#o", OWNER)
                .expression_attribute_names("#c", COUNTER)
                .expression_attribute_values(":me", s(&self.owner))
                .expression_attribute_values(":held", n(counter))
                .expression_attribute_values(":next", n(counter + 1))
                .send()
                .await;
            match result {
                Ok(_) => {
                    self.held.insert(shard, (counter + 1, Instant::now()));
                }
                Err(e) if error_code(&e) == Some("ConditionalCheckFailedException") => {
                    if self.written_by_us(&shard, counter + 1, None).await? {
                        self.held.insert(shard, (counter + 1, Instant::now()));
                        continue;
                    }
                    tracing::warn!(shard, "lease lost before renewal");
                    self.lose(&shard);
                }
                Err(e) => return Err(classify("UpdateItem", e)),
            }
        }
        Ok(())
    }

    /// Records progress in `shard`; fails with `lease_lost` if another worker holds it now.
    /// A checkpoint moves the counter too, so it renews the lease. Checkpointing `SHARD_END`
    /// also gives the lease up: there is nothing more to read. `arrived` is how many records
    /// this checkpoint newly covers.
    pub(super) async fn checkpoint(&mut self, shard: &str, checkpoint: &str, arrived: u64) -> Result<()> {
        let Some(&(counter, _)) = self.held.get(shard) else {
            return Err(SluiceError::retryable(ReasonCode::LeaseLost, format!("{shard} is not held by this worker")));
        };
        let mut set = "SET #p = :cp, #w = :zero, #c = :next".to_owned();
        let update = self.client.update_item().table_name(&self.table).key(LEASE_KEY, s(shard));
        let mut update = self
            .with_read_through(shard, update, &mut set)
            .condition_expression("#o = :me AND #c = :held")
            .expression_attribute_names("#o", OWNER)
            .expression_attribute_names("#c", COUNTER)
            .expression_attribute_names("#p", CHECKPOINT)
            .expression_attribute_names("#w", SWITCHES)
            .expression_attribute_names("#a", ARRIVED)
            .expression_attribute_values(":me", s(&self.owner))
            .expression_attribute_values(":held", n(counter))
            .expression_attribute_values(":next", n(counter + 1))
            .expression_attribute_values(":cp", s(checkpoint))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":arrived", n(arrived));
        update = if checkpoint == SHARD_END {
            update.update_expression(format!("{set} ADD #a :arrived REMOVE #o"))
        } else {
            update.update_expression(format!("{set} ADD #a :arrived"))
        };
        match update.send().await {
            Ok(_) => {
                if checkpoint == SHARD_END {
                    self.held.remove(shard);
                    // Its children may be taken now.
                    self.scan_soon();
                } else {
                    self.held.insert(shard.to_owned(), (counter + 1, Instant::now()));
                }
                Ok(())
            }
            // Written, its answer lost, and the SDK's retry refused: done (SHARD_END: given up).
            Err(e)
                if error_code(&e) == Some("ConditionalCheckFailedException")
                    && checkpoint != SHARD_END
                    && self.written_by_us(shard, counter + 1, Some(checkpoint)).await? =>
            {
                self.held.insert(shard.to_owned(), (counter + 1, Instant::now()));
                Ok(())
            }
            Err(e) if error_code(&e) == Some("ConditionalCheckFailedException") => {
                self.lose(shard);
                Err(SluiceError::retryable(ReasonCode::LeaseLost, format!("{shard} is now held by another worker")))
            }
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }

    /// The checkpoint stored for `shard`, and its [`READ_THROUGH`] time where one is.
    pub(super) async fn stored_checkpoint(&self, shard: &str) -> Result<(String, Option<u64>)> {
        Ok(self
            .stored_lease(shard)
            .await?
            .map_or_else(|| (TRIM_HORIZON.to_owned(), None), |l| (l.checkpoint, l.read_through_ms)))
    }

    /// Gives every held lease up so another worker can take it at once; one that cannot be given
    /// up (the first error is returned) does not keep the others held until their failover.
    pub(super) async fn release_all(&mut self) -> Result<()> {
        let held: Vec<String> = self.held.keys().cloned().collect();
        let mut first_error = None;
        for shard in held {
            let result = self
                .client
                .update_item()
                .table_name(&self.table)
                .key(LEASE_KEY, s(&shard))
                .update_expression("REMOVE #o ADD #c :one")
                .condition_expression("#o = :me")
                .expression_attribute_names("#o", OWNER)
                .expression_attribute_names("#c", COUNTER)
                .expression_attribute_values(":me", s(&self.owner))
                .expression_attribute_values(":one", n(1))
                .send()
                .await;
            match result {
                Ok(_) => {}
                Err(e) if error_code(&e) == Some("ConditionalCheckFailedException") => {}
                Err(e) => {
                    first_error.get_or_insert(classify("UpdateItem", e));
                    continue;
                }
            }
            self.held.remove(&shard);
        }
        first_error.map_or(Ok(()), Err)
    }
}
