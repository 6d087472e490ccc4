//! The record stream on Kinesis: a `PutRecords` producer that retries only the records that
//! failed, and a consumer that reads the shards its leases (see `lease_coordinator`) give it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};

use super::lease_coordinator::{LeaseCoordinator, SHARD_END, TRIM_HORIZON};
use super::{Clients, Names, classify, error_code};
use crate::backend::{PutReport, RecordStream, StreamConsumer, StreamInput, StreamRecord, StreamStats};
use crate::config::StoreConfig;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::telemetry::metrics::metrics;

/// PutRecords limits: 500 records and 5 MiB (data plus partition keys) a call.
const PUT_RECORDS: usize = 500;
const PUT_BYTES: usize = 5 * 1024 * 1024;
/// Kinesis allows five GetRecords calls per shard per second; a shard that is caught up is
/// read every 1.5 s (the KCL's default idle time between reads).
const GET_RECORDS_INTERVAL: Duration = Duration::from_millis(200);
const IDLE_READ_INTERVAL: Duration = Duration::from_millis(1500);
/// How often the shard list is read again to find new shards (a reshard) even when no shard
/// this worker reads has ended.
const SHARD_SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Pause for a shard whose read throughput is exceeded. GetRecords is not retried by the SDK
/// (`read_once`): a shard over its 2 MB/s stays throttled for seconds after a large read, and
/// the SDK's attempts would hold every other shard's reads, and the lease renewals that run
/// between polls, for as long.
const THROTTLED_PAUSE: Duration = Duration::from_secs(1);
const GET_RECORDS_LIMIT: usize = 10_000;
/// The fewest records one GetRecords call asks for, whatever the poll wants: what is left over
/// waits in the shard's reader for the next polls. Five calls a second of only what a batch
/// takes (ingest's 100) would cap a shard at 500 records a second, half what it accepts. (One
/// call returns at most 10 MB: what a reader may hold.)
const READ_AHEAD: usize = 1_000;
/// The most records `stats` reads past a shard's checkpoint to count what waits there.
const STATS_READ_LIMIT: usize = 1_000;

pub(super) struct KinesisStream {
    clients: Clients,
    stream: String,
    lease_table: String,
    failover: Duration,
}

impl KinesisStream {
    pub(super) fn new(clients: Clients, names: &Names, config: &StoreConfig) -> Self {
        Self {
            clients,
            stream: names.stream(),
            lease_table: names.lease_table(),
            failover: Duration::from_millis(config.aws.lease_failover_ms),
        }
    }
}

/// Every shard of the stream, open and closed, with its parents.
async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<(String, Vec<String>)>> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // Real Kinesis rejects StreamName together with NextToken.
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let output = request.send().await.map_err(|e| classify("ListShards", e))?;
        for shard in output.shards() {
            let parents = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()].into_iter().flatten();
            shards.push((shard.shard_id().to_owned(), parents.map(str::to_owned).collect()));
        }
        match output.next_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(shards),
        }
    }
}

#[async_trait]
impl RecordStream for KinesisStream {
    async fn put_records(&self, records: Vec<StreamInput>) -> Result<PutReport> {
        let mut report = PutReport::default();
        let mut rest = records;
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len() && take < PUT_RECORDS {
                let size = rest[take].data.len() + rest[take].partition_key.len();
                if take > 0 && bytes + size > PUT_BYTES {
                    break;
                }
                bytes += size;
                take += 1;
            }
            let batch: Vec<StreamInput> = rest.drain(..take).collect();
            report += self.put_batch(batch).await?;
        }
        Ok(report)
    }

    async fn consumer(&self, worker_id: &str) -> Result<Box<dyn StreamConsumer>> {
        let coordinator = LeaseCoordinator::new(
            self.clients.dynamodb.clone(),
            self.lease_table.clone(),
            worker_id.to_owned(),
            self.failover,
        );
        Ok(Box::new(KinesisConsumer {
            kinesis: self.clients.kinesis.clone(),
            stream: self.stream.clone(),
            coordinator,
            readers: BTreeMap::new(),
            next_rebalance: Instant::now(),
            next_shard_sync: Instant::now(),
            rebalance_every: self.failover / 3,
            lag_ms: None,
            turn: 0,
            retention_ms: None,
        }))
    }

    async fn stats(&self) -> Result<StreamStats> {
        let shards = list_shards(&self.clients.kinesis, &self.stream).await?;
        let coordinator = LeaseCoordinator::new(
            self.clients.dynamodb.clone(),
            self.lease_table.clone(),
            String::new(),
            self.failover,
        );
        let all = coordinator.scan().await?;
        let mut owners: BTreeMap<String, u64> = BTreeMap::new();
        for owner in all.iter().filter_map(|l| l.owner.clone()) {
            *owners.entry(owner).or_default() += 1;
        }
        let arrived: BTreeMap<String, u64> = all.iter().map(|l| (l.shard.clone(), l.arrived)).collect();
        let leases: BTreeMap<String, String> = all.into_iter().map(|l| (l.shard, l.checkpoint)).collect();
        // Kinesis does not count records: pending is what one read past each checkpoint finds,
        // of at most STATS_READ_LIMIT records (the shard's 2 MB/s of reads are ingest's too,
        // and `sluice top` asks every 2 s).
        let mut pending = 0u64;
        let mut lag = None::<u64>;
        for (shard, _) in &shards {
            let checkpoint = leases.get(shard).map(String::as_str).unwrap_or(TRIM_HORIZON);
            if checkpoint == SHARD_END {
                continue;
            }
            let iterator = shard_iterator(&self.clients.kinesis, &self.stream, shard, checkpoint).await?;
            let output = self
                .clients
                .kinesis
                .get_records()
                .shard_iterator(iterator)
                .limit(STATS_READ_LIMIT as i32)
                .send()
                .await
                .map_err(|e| classify("GetRecords", e))?;
            pending += output.records().len() as u64;
            if let Some(ms) = output.millis_behind_latest() {
                lag = Some(lag.unwrap_or(0).max(ms.max(0) as u64));
            }
        }
        Ok(StreamStats {
            shards: shards.len(),
            records: arrived.values().sum(),
            arrived,
            pending,
            pending_at_least: true,
            millis_behind_latest: lag,
            leases: owners,
        })
    }
}

impl KinesisStream {
    /// One PutRecords call, then again with only the records that failed, until none do.
    async fn put_batch(&self, batch: Vec<StreamInput>) -> Result<PutReport> {
        let mut report = PutReport { records: batch.len() as u64, ..PutReport::default() };
        let mut pending: Vec<PutRecordsRequestEntry> = batch
            .into_iter()
            .map(|r| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(r.data))
                    .partition_key(r.partition_key)
                    .build()
                    .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))
            })
            .collect::<Result<_>>()?;
        let mut delays = super::dynamodb::unprocessed_backoff();
        loop {
            let output = self
                .clients
                .kinesis
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(pending.clone()))
                .send()
                .await
                .map_err(|e| classify("PutRecords", e))?;
            if output.failed_record_count().unwrap_or(0) == 0 {
                return Ok(report);
            }
            let failed: Vec<PutRecordsRequestEntry> = pending
                .into_iter()
                .zip(output.records())
                .filter(|(_, result)| result.error_code().is_some())
                .map(|(entry, _)| entry)
                .collect();
            report.retried += failed.len() as u64;
            report.throttled += output
                .records()
                .iter()
                .filter(|r| r.error_code() == Some("ProvisionedThroughputExceededException"))
                .count() as u64;
            let delay = delays.next().ok_or_else(|| {
                SluiceError::retryable(
                    ReasonCode::StoreBusy,
                    format!("PutRecords: {} records still failing", failed.len()),
                )
            })?;
            tracing::debug!(failed = failed.len(), ?delay, "retrying the records PutRecords refused");
            tokio::time::sleep(delay).await;
            pending = failed;
        }
    }
}

/// A GetRecords call tried once: a throttled shard is paused on its own (`THROTTLED_PAUSE`), and
/// any other failure is read again next poll, while the other shards are read meanwhile.
fn read_once() -> aws_sdk_kinesis::config::Builder {
    aws_sdk_kinesis::config::Builder::default().retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
}

/// Whether `shard` is no longer among the stream's shards, the stream being there.
async fn shard_is_gone(client: &aws_sdk_kinesis::Client, stream: &str, shard: &str) -> Result<bool> {
    Ok(list_shards(client, stream).await?.iter().all(|(s, _)| s != shard))
}

async fn shard_iterator(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard: &str,
    checkpoint: &str,
) -> Result<String> {
    let request = client.get_shard_iterator().stream_name(stream).shard_id(shard);
    let request = if checkpoint == TRIM_HORIZON {
        request.shard_iterator_type(ShardIteratorType::TrimHorizon)
    } else {
        request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).starting_sequence_number(checkpoint)
    };
    let output = request.send().await.map_err(|e| classify("GetShardIterator", e))?;
    output
        .shard_iterator
        .ok_or_else(|| SluiceError::retryable(ReasonCode::StoreUnavailable, format!("no iterator for {shard}")))
}

/// Where reading one held shard stands.
struct ShardReader {
    /// Where the next GetRecords reads: after the last record fetched (in `ahead` or handed out).
    iterator: Option<String>,
    /// Last sequence handed out, and last one checkpointed.
    read: Option<String>,
    checkpointed: String,
    /// Records fetched and not handed out yet, in order.
    ahead: VecDeque<StreamRecord>,
    /// The shard is closed and everything in it has been fetched.
    ended: bool,
    next_read: Instant,
    /// Every record that arrived before this (ms since the epoch) has been fetched: the last
    /// read's time less how far behind the tip it was.
    fetched_through_ms: Option<u64>,
}

impl ShardReader {
    fn starting_at(checkpoint: String) -> Self {
        Self {
            iterator: None,
            read: None,
            checkpointed: checkpoint,
            ahead: VecDeque::new(),
            ended: false,
            next_read: Instant::now(),
            fetched_through_ms: None,
        }
    }

    /// The time before which every record that arrived is checkpointed, when this reader knows
    /// one: all it fetched has been handed out and checkpointed.
    fn checkpointed_through(&self) -> Option<u64> {
        let settled = self.ahead.is_empty() && self.read.as_ref().is_none_or(|read| *read == self.checkpointed);
        self.fetched_through_ms.filter(|_| settled)
    }

    /// Hands out up to `max` of the records read ahead.
    fn hand_out(&mut self, max: usize, out: &mut Vec<StreamRecord>) {
        let take = max.min(self.ahead.len());
        out.extend(self.ahead.drain(..take));
        if let Some(last) = out.last().filter(|_| take > 0) {
            self.read = Some(last.sequence.clone());
        }
    }

    /// Forgets what was read ahead: the next read starts after the last record handed out.
    fn forget_ahead(&mut self) {
        self.ahead.clear();
        self.iterator = None;
        self.ended = false;
        self.fetched_through_ms = None;
    }
}

struct KinesisConsumer {
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    coordinator: LeaseCoordinator,
    readers: BTreeMap<String, ShardReader>,
    next_rebalance: Instant,
    next_shard_sync: Instant,
    rebalance_every: Duration,
    lag_ms: Option<i64>,
    /// Which held shard the next poll takes first: each in turn, so that one with a backlog
    /// does not keep the others unread.
    turn: usize,
    /// How long the stream keeps records (ms), once Kinesis has said.
    retention_ms: Option<u64>,
}

impl KinesisConsumer {
    async fn maintain_leases(&mut self) -> Result<()> {
        if Instant::now() < self.next_rebalance {
            return Ok(());
        }
        self.next_rebalance = Instant::now() + self.rebalance_every;
        let mut leases = self.coordinator.rebalance().await?;
        self.drop_lost_readers();
        if Instant::now() >= self.next_shard_sync {
            self.next_shard_sync = Instant::now() + SHARD_SYNC_INTERVAL;
            let mut created = false;
            for (shard, parents) in list_shards(&self.kinesis, &self.stream).await? {
                if !self.coordinator.known().contains(&shard) {
                    self.coordinator.ensure_lease(&shard, &parents).await?;
                    created = true;
                }
            }
            if created {
                // A new lease makes the coordinator read the table again: take it now.
                leases = self.coordinator.rebalance().await?;
                self.drop_lost_readers();
            }
        }
        let held: Vec<String> = self.coordinator.held().cloned().collect();
        self.readers.retain(|shard, _| held.contains(shard));
        for shard in held {
            if self.readers.contains_key(&shard) {
                continue;
            }
            let (checkpoint, read_through) = match leases.iter().flatten().find(|l| l.shard == shard) {
                Some(lease) => (lease.checkpoint.clone(), lease.read_through_ms),
                // Held, but its reader was dropped since the last scan (a checkpoint failed):
                // it goes on from its stored checkpoint, never from the start.
                None => self.coordinator.stored_checkpoint(&shard).await?,
            };
            let trimmed = match read_through {
                Some(read_through) => self.say_if_trimmed(&shard, read_through).await,
                None => false,
            };
            metrics().stream_taken_up(&shard, trimmed);
            self.readers.insert(shard, ShardReader::starting_at(checkpoint));
        }
        Ok(())
    }

    /// Says (an error; `sluice.stream.trimmed` counts it) when a shard is taken up past the stream's
    /// retention: no worker read it from `read_through_ms` for longer than Kinesis keeps records,
    /// so records that arrived then may have been trimmed before ingest read them, and have no
    /// result and no DLQ entry. Kinesis reads on from the oldest record it still has without a
    /// word, and the records themselves are gone: this is all that can be said of them.
    async fn say_if_trimmed(&mut self, shard: &str, read_through_ms: u64) -> bool {
        if self.retention_ms.is_none() {
            // Asked again at the next take-up if this fails (a throttle, say): only an answer is kept.
            match self.kinesis.describe_stream_summary().stream_name(&self.stream).send().await {
                Ok(summary) => {
                    self.retention_ms =
                        summary.stream_description_summary.map(|s| s.retention_period_hours.max(0) as u64 * 3_600_000)
                }
                Err(e) => {
                    let error = classify("DescribeStreamSummary", e);
                    tracing::warn!(shard, %error, "the stream's retention is unknown: whether records were trimmed unread is not checked");
                }
            }
        }
        let Some(retention_ms) = self.retention_ms else { return false };
        let Some(gap_ms) = trimmed_for(read_through_ms, crate::envelope::now_ms(), retention_ms) else { return false };
        let at = |ms: u64| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms));
        tracing::error!(
            shard,
            read_through = %at(read_through_ms),
            retention_hours = retention_ms / 3_600_000,
            "no worker read this shard for longer than the stream keeps records: those that arrived from {} to {} \
             may have been trimmed unread, and have no result and no DLQ entry (docs/operations.md)",
            at(read_through_ms),
            at(read_through_ms + gap_ms),
        );
        true
    }

    /// Drops the reader of each shard lost since this was last done: one taken back meanwhile
    /// (in the very rebalance that found it lost, say) starts again from its stored checkpoint,
    /// as another worker may have read and checkpointed past where this one's reader was, and
    /// reading on from there would redo those records and move the checkpoint back. Done right
    /// after each rebalance, before anything else can fail and leave the old reader in place.
    fn drop_lost_readers(&mut self) {
        for shard in self.coordinator.take_lost() {
            self.readers.remove(&shard);
        }
    }

    /// A closed shard whose every record is checkpointed is finished: say so in its lease.
    async fn finish_ended_shards(&mut self) -> Result<()> {
        let done: Vec<String> = self
            .readers
            .iter()
            .filter(|(_, r)| r.ended && r.ahead.is_empty() && r.read.as_ref().is_none_or(|seq| *seq == r.checkpointed))
            .map(|(s, _)| s.clone())
            .collect();
        for shard in done {
            self.coordinator.checkpoint(&shard, SHARD_END, 0).await?;
            self.readers.remove(&shard);
            tracing::info!(shard, "shard finished; its children may start");
            // Children become available at once: list shards and leases again on the next poll.
            self.next_rebalance = Instant::now();
            self.next_shard_sync = Instant::now();
        }
        Ok(())
    }
}

#[async_trait]
impl StreamConsumer for KinesisConsumer {
    async fn poll(&mut self, max: usize) -> Result<Vec<StreamRecord>> {
        self.maintain_leases().await?;
        self.finish_ended_shards().await?;
        let mut out = Vec::new();
        let mut shards: Vec<String> = self.readers.keys().cloned().collect();
        if !shards.is_empty() {
            let first = self.turn % shards.len();
            shards.rotate_left(first);
            self.turn = self.turn.wrapping_add(1);
        }
        // Each shard in turn hands out what it read ahead, or, with nothing ahead, is read.
        for shard in shards {
            let remaining = max.saturating_sub(out.len());
            let reader = self.readers.get_mut(&shard).expect("listed above");
            if !reader.ahead.is_empty() {
                reader.hand_out(remaining, &mut out);
                continue;
            }
            if remaining == 0 || reader.ended || Instant::now() < reader.next_read {
                continue;
            }
            if reader.iterator.is_none() {
                let from = reader.read.clone().unwrap_or_else(|| reader.checkpointed.clone());
                let failed = match shard_iterator(&self.kinesis, &self.stream, &shard, &from).await {
                    Ok(iterator) => {
                        reader.iterator = Some(iterator);
                        None
                    }
                    // A closed shard past the stream's retention is gone (ResourceNotFound) and
                    // no longer listed: it has ended, or its children would wait for it for ever.
                    Err(e) if e.is_misconfiguration() => match shard_is_gone(&self.kinesis, &self.stream, &shard).await
                    {
                        Ok(true) => {
                            tracing::error!(
                                shard,
                                error = %e,
                                "the shard is past the stream's retention and gone: records it held that were not \
                                 read are lost; it is finished so that its children are read"
                            );
                            reader.ended = true;
                            continue;
                        }
                        Ok(false) => Some(e),
                        // Whether it is gone is not known now (ListShards throttled, say): the
                        // listing's error, retryable where it is, and asked again next poll.
                        Err(listing) => Some(listing),
                    },
                    Err(e) => Some(e),
                };
                if let Some(e) = failed {
                    // As below: what other shards gave is handed out first.
                    if !out.is_empty() {
                        tracing::warn!(shard, error = %e, "GetShardIterator failed; this shard is read again next poll");
                        break;
                    }
                    return Err(e);
                }
            }
            reader.next_read = Instant::now() + GET_RECORDS_INTERVAL;
            let result = self
                .kinesis
                .get_records()
                .shard_iterator(reader.iterator.clone().expect("set above"))
                .limit(remaining.clamp(READ_AHEAD, GET_RECORDS_LIMIT) as i32)
                .customize()
                .config_override(read_once())
                .send()
                .await;
            let output = match result {
                Ok(output) => output,
                Err(e) if error_code(&e) == Some("ProvisionedThroughputExceededException") => {
                    reader.next_read = Instant::now() + THROTTLED_PAUSE;
                    continue;
                }
                Err(e) if error_code(&e) == Some("ExpiredIteratorException") => {
                    reader.forget_ahead();
                    continue;
                }
                // The shard aged out of the stream while it was read (a closed parent near the
                // retention's end): a fresh iterator next poll says whether it is gone.
                Err(e) if error_code(&e) == Some("ResourceNotFoundException") => {
                    tracing::warn!(shard, "GetRecords: the shard was not found; asking for a fresh iterator");
                    reader.forget_ahead();
                    continue;
                }
                // What other shards gave this poll is handed out (their readers have moved past
                // it); this shard is read again next time from where it was.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(shard, error = %classify("GetRecords", e), "GetRecords failed; this shard is read again next poll");
                    break;
                }
                Err(e) => return Err(classify("GetRecords", e)),
            };
            self.lag_ms = output.millis_behind_latest();
            if let Some(lag) = output.millis_behind_latest() {
                metrics().stream_lag(&shard, lag.max(0) as u64);
                reader.fetched_through_ms = Some(crate::envelope::now_ms().saturating_sub(lag.max(0) as u64));
            }
            if output.records().is_empty() && output.millis_behind_latest().unwrap_or(0) == 0 {
                reader.next_read = Instant::now() + IDLE_READ_INTERVAL;
            }
            // End of a closed shard: no next iterator, or the children are named.
            reader.ended = output.next_shard_iterator().is_none() || !output.child_shards().is_empty();
            reader.iterator = output.next_shard_iterator().map(str::to_owned);
            reader.ahead.extend(output.records().iter().map(|record| StreamRecord {
                shard: shard.clone(),
                sequence: record.sequence_number().to_owned(),
                partition_key: record.partition_key().to_owned(),
                data: record.data().as_ref().to_vec(),
                arrived_ms: record.approximate_arrival_timestamp().and_then(|t| t.to_millis().ok()).unwrap_or(0) as u64,
            }));
            reader.hand_out(remaining, &mut out);
            if let Some(ms) = reader.checkpointed_through() {
                self.coordinator.read_through(&shard, ms);
            }
        }
        if let Some(lag) = self.lag_ms {
            tracing::debug!(millis_behind_latest = lag, "stream lag");
        }
        Ok(out)
    }

    async fn checkpoint(&mut self, shard: &str, sequence: &str, records: u64) -> Result<()> {
        // Records read before the shard was lost and taken back, behind where its reader starts
        // now: their checkpoint would move the shard's back (another worker's progress undone).
        if let Some(reader) = self.readers.get(shard)
            && reader.checkpointed.bytes().all(|b| b.is_ascii_digit())
            && crate::worker::compare_sequences(sequence, &reader.checkpointed).is_lt()
        {
            return Err(SluiceError::retryable(
                ReasonCode::LeaseLost,
                format!("{shard}: records read before the lease was lost and taken back are checkpointed past"),
            ));
        }
        let result = self.coordinator.checkpoint(shard, sequence, records).await;
        match (&result, self.readers.get_mut(shard)) {
            (Ok(()), Some(reader)) => {
                reader.checkpointed = sequence.to_owned();
                if let Some(ms) = reader.checkpointed_through() {
                    self.coordinator.read_through(shard, ms);
                }
            }
            (Err(_), _) => {
                self.readers.remove(shard);
            }
            _ => {}
        }
        result
    }

    async fn rewind(&mut self, shard: &str) -> Result<()> {
        match self.coordinator.stored_checkpoint(shard).await {
            Ok((checkpoint, _)) => {
                if let Some(reader) = self.readers.get_mut(shard) {
                    *reader = ShardReader::starting_at(checkpoint);
                }
                Ok(())
            }
            Err(e) => {
                // Never read on past what was not settled: without its reader, the shard goes on
                // from its stored checkpoint once the leases are next looked at.
                self.readers.remove(shard);
                Err(e)
            }
        }
    }

    async fn renew_leases(&mut self) -> Result<()> {
        let renewed = self.coordinator.renew().await;
        self.drop_lost_readers();
        renewed
    }

    async fn release(&mut self) -> Result<()> {
        self.readers.clear();
        self.coordinator.release_all().await
    }

    fn shards(&self) -> Vec<String> {
        self.coordinator.held().cloned().collect()
    }
}

/// How long before `now_ms` the stream's retention passed a shard read through `read_through_ms`
/// (see `say_if_trimmed`): none while it has not.
fn trimmed_for(read_through_ms: u64, now_ms: u64, retention_ms: u64) -> Option<u64> {
    now_ms.checked_sub(retention_ms)?.checked_sub(read_through_ms).filter(|&gap| gap > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    /// A shard read through a time the stream's retention has since passed may have lost what
    /// arrived in between; one read within the retention has lost nothing.
    #[test]
    fn a_shard_unread_past_the_retention_is_said_to_have_lost_what_arrived_meanwhile() {
        let now = 1_000 * HOUR;
        assert_eq!(trimmed_for(now - 30 * HOUR, now, 24 * HOUR), Some(6 * HOUR));
        assert_eq!(trimmed_for(now - 24 * HOUR, now, 24 * HOUR), None);
        assert_eq!(trimmed_for(now - HOUR, now, 24 * HOUR), None);
        assert_eq!(trimmed_for(now + HOUR, now, 24 * HOUR), None, "a clock ahead of this one");
    }

    /// A reader knows through when the shard is checkpointed only once all it fetched has been
    /// handed out and checkpointed.
    #[test]
    fn a_reader_is_checkpointed_through_its_last_read_only_when_settled() {
        let record = |sequence: &str| StreamRecord {
            shard: "s".into(),
            sequence: sequence.into(),
            partition_key: "k".into(),
            data: vec![],
            arrived_ms: 1,
        };
        let mut reader = ShardReader::starting_at("10".into());
        assert_eq!(reader.checkpointed_through(), None, "nothing read yet");
        reader.fetched_through_ms = Some(500);
        assert_eq!(reader.checkpointed_through(), Some(500), "read, and nothing there");
        reader.ahead.extend([record("11"), record("12")]);
        assert_eq!(reader.checkpointed_through(), None, "fetched, not handed out");
        let mut out = Vec::new();
        reader.hand_out(1, &mut out);
        reader.hand_out(1, &mut out);
        assert_eq!(reader.checkpointed_through(), None, "handed out, not checkpointed");
        reader.checkpointed = "12".into();
        assert_eq!(reader.checkpointed_through(), Some(500));
    }
}
