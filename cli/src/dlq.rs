//! `sluice dlq list|replay`: what operators do with dead letters.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_core::backend::{Backend, OutgoingMessage, StreamInput};
use sluice_core::record::DlqEntry;
use sluice_core::topology::StageName;
use sluice_core::{ReasonCode, SluiceError};

/// Messages moved per replay round.
const REPLAY_BATCH: usize = 100;

/// Up to `limit` entries of `stage`'s DLQ, oldest first, without taking them off the queue.
pub async fn entries(backend: &Backend, stage: StageName, limit: usize) -> Result<Vec<DlqEntry>, SluiceError> {
    let messages = backend.queue(stage.dlq()).peek(limit).await?;
    Ok(messages
        .into_iter()
        .map(|m| DlqEntry::from_message(stage, m.body, &m.attributes, m.receive_count, m.sent_at_ms))
        .collect())
}

/// Moves up to `limit` entries (only those with `reason`, if given) back to where `stage` reads,
/// body and original attributes as they were. Returns how many moved.
pub async fn replay(
    backend: &Backend,
    stage: StageName,
    reason: Option<ReasonCode>,
    limit: usize,
) -> Result<usize, SluiceError> {
    let dlq = backend.queue(stage.dlq());
    let mut moved = 0;
    let mut skipped = Vec::new();
    let progress = crate::progress::counter("entries replayed");
    while moved < limit {
        let batch = dlq.receive(REPLAY_BATCH.min(limit - moved), Duration::ZERO).await?;
        if batch.is_empty() {
            break;
        }
        let (mut take, mut receipts, mut stream_records) = (Vec::new(), Vec::new(), Vec::new());
        for message in batch {
            let entry = DlqEntry::from_message(
                stage,
                Vec::new(),
                &message.attributes,
                message.receive_count,
                message.sent_at_ms,
            );
            if reason.is_some_and(|r| r != entry.reason) {
                skipped.push(message.receipt);
                continue;
            }
            let attributes: BTreeMap<String, String> =
                message.attributes.into_iter().filter(|(k, _)| !k.starts_with("sluice.")).collect();
            match stage.input_queue() {
                Some(_) => take.push(OutgoingMessage {
                    body: message.body,
                    attributes,
                    dedup_key: entry.record_id.map(String::from),
                }),
                None => stream_records.push(StreamInput {
                    partition_key: attributes.get("partition_key").cloned().unwrap_or_else(|| "replay".to_owned()),
                    data: message.body,
                }),
            }
            receipts.push(message.receipt);
        }
        moved += receipts.len();
        progress.inc(receipts.len() as u64);
        match stage.input_queue() {
            Some(queue) => backend.queue(queue).send_batch(take).await?,
            None if !stream_records.is_empty() => backend.stream.put_records(stream_records).await?,
            None => {}
        }
        dlq.ack(&receipts).await?;
    }
    progress.finish_and_clear();
    if !skipped.is_empty() {
        dlq.release(&skipped, Duration::ZERO).await?;
    }
    Ok(moved)
}
