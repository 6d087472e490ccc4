//! Work queues on SQS: batches of ten, long polling, visibility changes, and SQS's own redrive
//! policy (set by `sluice aws bootstrap`) to move poison messages to the stage's DLQ.
//!
//! A message body must be XML-safe text within the queue's `MaximumMessageSize` (256 KiB by
//! default until 2025, up to 1 MiB since; `sluice aws bootstrap` and the CDK stack make queues of
//! 1 MiB). JSON envelopes are sent as they are; other bodies (raw producer bytes in the ingest
//! DLQ) are base64-encoded, and anything too large after that is stored in S3 and referenced —
//! the body a receiver sees is always the original bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageAttributeValue,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::s3::S3BlobStore;
use super::{classify, concurrently};
use crate::backend::{BlobStore, OutgoingMessage, QueueDepth, Receipt, ReceivedMessage, WorkQueue};
use crate::envelope::RecordId;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::record::{DlqEntry, dlq_attr};
use crate::topology::{QueueName, StageName};

/// SQS's limit on the entries of one batch call.
const BATCH_ENTRIES: usize = 10;
/// The most bytes a message (and a batch call, all its messages together) may hold on any queue:
/// SQS's default before 2025. A send that would go past it asks the queue for its own limit
/// first (once), so that small messages cost no extra request.
const SURE_MESSAGE_BYTES: usize = 256 * 1024;
/// What a message's attributes may take of it: a body over its limit less this goes to S3.
const ATTRIBUTE_ROOM: usize = 56 * 1024;
const MAX_WAIT_SECONDS: u64 = 20;
/// How long a look (`peek`) hides each message it has read, were it never to show them again
/// itself.
const PEEK_HIDDEN_SECONDS: i32 = 300;
/// How long a look reads before it stops (its first receipts must still be good when it shows
/// the messages again).
const PEEK_READING: Duration = Duration::from_secs(240);

/// Message attribute names sluice uses on SQS.
const ATTRIBUTES: &str = "sluice.attributes";
const BODY_ENCODING: &str = "sluice.body_encoding";
const BODY_REF: &str = "sluice.body_ref";
/// The [`BODY_ENCODING`] of an empty body.
const EMPTY: &str = "empty";
const TRACEPARENT: &str = "traceparent";

pub(super) struct SqsQueue {
    client: aws_sdk_sqs::Client,
    name: QueueName,
    queue_name: String,
    /// Looked up on first use: a worker touches only the few queues its stage uses.
    url: tokio::sync::OnceCell<String>,
    /// The queue's `MaximumMessageSize`, asked only when a send would pass [`SURE_MESSAGE_BYTES`].
    max_message_bytes: tokio::sync::OnceCell<usize>,
    blobs: Arc<S3BlobStore>,
    /// A work queue's: the DLQ of the stage that reads it, and that stage.
    dead_letters: Option<(StageName, Arc<SqsQueue>)>,
}

impl SqsQueue {
    pub(super) fn new(
        client: aws_sdk_sqs::Client,
        name: QueueName,
        queue_name: String,
        blobs: Arc<S3BlobStore>,
    ) -> Self {
        Self {
            client,
            name,
            queue_name,
            url: tokio::sync::OnceCell::new(),
            max_message_bytes: tokio::sync::OnceCell::new(),
            blobs,
            dead_letters: None,
        }
    }

    /// A work queue read by `stage`, whose messages that cannot be read go to `dlq`.
    pub(super) fn read_by(self, stage: StageName, dlq: Arc<SqsQueue>) -> Self {
        Self { dead_letters: Some((stage, dlq)), ..self }
    }

    async fn url(&self) -> Result<&str> {
        self.url
            .get_or_try_init(|| async {
                self.client
                    .get_queue_url()
                    .queue_name(&self.queue_name)
                    .send()
                    .await
                    // Named: a wrong prefix is a queue that is not there.
                    .map_err(|e| classify(&format!("GetQueueUrl {}", self.queue_name), e))?
                    .queue_url
                    .ok_or_else(|| {
                        SluiceError::permanent(ReasonCode::StoreUnavailable, format!("no URL for {}", self.queue_name))
                    })
            })
            .await
            .map(String::as_str)
    }

    /// The most bytes a message or a batch call may hold on this queue: [`SURE_MESSAGE_BYTES`]
    /// unless `needed` is more, when the queue is asked for its `MaximumMessageSize` (once).
    async fn limit_for(&self, needed: usize) -> Result<usize> {
        if needed <= SURE_MESSAGE_BYTES {
            return Ok(SURE_MESSAGE_BYTES);
        }
        let max = self
            .max_message_bytes
            .get_or_try_init(|| async {
                let said = self.attributes(&[QueueAttributeName::MaximumMessageSize]).await?;
                Ok::<_, SluiceError>(
                    number(&said, QueueAttributeName::MaximumMessageSize).unwrap_or(SURE_MESSAGE_BYTES),
                )
            })
            .await?;
        Ok((*max).max(SURE_MESSAGE_BYTES))
    }

    /// The queue's attributes of `names`, as SQS gives them.
    async fn attributes(&self, names: &[QueueAttributeName]) -> Result<HashMap<QueueAttributeName, String>> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(self.url().await?)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| classify("GetQueueAttributes", e))?;
        Ok(output.attributes.unwrap_or_default())
    }

    /// The SQS form of a message: text body plus attributes.
    async fn encode(&self, message: OutgoingMessage, id: usize) -> Result<(SendMessageBatchRequestEntry, usize)> {
        let mut attributes = message.attributes;
        if let Some(key) = &message.dedup_key {
            attributes.entry(dlq_attr::RECORD_ID.to_owned()).or_insert_with(|| key.clone());
        }
        let mut sqs_attrs = BTreeMap::new();
        if let Some(trace) = attributes.get(TRACEPARENT).filter(|t| is_xml_safe(t)) {
            sqs_attrs.insert(TRACEPARENT.to_owned(), trace.clone());
        }
        let mut body = match String::from_utf8(message.body) {
            Ok(text) if is_xml_safe(&text) => text,
            Ok(text) => encode_base64(text.into_bytes(), &mut sqs_attrs),
            Err(e) => encode_base64(e.into_bytes(), &mut sqs_attrs),
        };
        let attributes = xml_safe_json(&attributes);
        // Room for the attributes as they are, should they ever outgrow the room kept for them.
        let room = ATTRIBUTE_ROOM.max(attributes.len() + 1024);
        if body.len() > self.limit_for(body.len() + room).await?.saturating_sub(room) {
            let reference = self.blobs.put(std::mem::take(&mut body).into_bytes()).await?;
            // SQS refuses an empty body: the reference stands in for it (the receiver reads the
            // attribute).
            body.clone_from(&reference);
            sqs_attrs.insert(BODY_REF.to_owned(), reference);
        } else if body.is_empty() {
            // SQS refuses an empty body (a zero-byte record on its way to a DLQ): one character
            // stands in for it, and the encoding says there is nothing.
            body = "-".to_owned();
            sqs_attrs.insert(BODY_ENCODING.to_owned(), EMPTY.to_owned());
        }
        sqs_attrs.insert(ATTRIBUTES.to_owned(), attributes);
        let size = body.len() + sqs_attrs.iter().map(|(k, v)| k.len() + v.len() + 16).sum::<usize>();
        let mut entry = SendMessageBatchRequestEntry::builder().id(id.to_string()).message_body(body);
        for (key, value) in sqs_attrs {
            entry = entry.message_attributes(key, string_attribute(value));
        }
        let entry = entry.build().map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))?;
        Ok((entry, size))
    }

    /// The message as sent, with SQS's message id (stable across receives).
    async fn decode(&self, message: &aws_sdk_sqs::types::Message) -> Result<ReceivedMessage> {
        let attrs = message.message_attributes.as_ref();
        let text = |key: &str| attrs.and_then(|a| a.get(key)).and_then(|v| v.string_value.clone());
        let mut received = as_held(message);
        if let Some(reference) = text(BODY_REF) {
            received.body = self.blobs.get(&reference).await?;
        }
        match text(BODY_ENCODING).as_deref() {
            Some("base64") => {
                received.body = STANDARD.decode(&received.body).map_err(|e| {
                    SluiceError::permanent(ReasonCode::MalformedMessage, format!("base64 body does not decode: {e}"))
                })?;
            }
            Some(EMPTY) => received.body.clear(),
            _ => {}
        }
        Ok(received)
    }

    /// A message that cannot be read as sent (its claim-checked body gone from S3, an encoding no
    /// sluice sender wrote): its worker could do nothing with it but fail every receive of the
    /// rest with it, and stop. From a work queue it goes to its stage's DLQ at once, its body as
    /// SQS holds it, under the reason the read gave (`claim_check_missing`, `malformed_message`);
    /// from a DLQ or the review queue it is handed out as SQS holds it, so that it can be seen
    /// and purged.
    /// Marked [`dlq_attr::UNREADABLE`] either way: a replay leaves it, since what it holds is
    /// not what was sent. Any other error (S3 refusing access, say) is the receive's, as it was.
    async fn unreadable(
        &self,
        message: &aws_sdk_sqs::types::Message,
        error: SluiceError,
    ) -> Result<Option<ReceivedMessage>> {
        if !unreadable_as_sent(&error) {
            return Err(error);
        }
        let held = held_unreadable(message, &error);
        let Some((stage, dlq)) = &self.dead_letters else {
            tracing::warn!(queue = %self.name, %error, "a message that cannot be read is handed out as SQS holds it");
            return Ok(Some(held));
        };
        tracing::warn!(queue = %self.name, %error, "a message that cannot be read goes to the DLQ");
        let record_id = held.attributes.get(dlq_attr::RECORD_ID).and_then(|id| RecordId::parse(id.clone()).ok());
        let entry = DlqEntry::new(*stage, &error, held.receive_count, record_id.clone(), Vec::new());
        let mut attributes = held.attributes;
        attributes.extend(entry.attributes());
        let dead = OutgoingMessage { body: held.body, attributes, dedup_key: record_id.map(String::from) };
        dlq.send_batch(vec![dead]).await?;
        self.ack(std::slice::from_ref(&held.receipt)).await?;
        Ok(None)
    }

    /// One ReceiveMessage call, its messages decoded (see [`WorkQueue::receive`]).
    async fn receive_decoded(
        &self,
        max: usize,
        wait: Duration,
        visibility: Option<i32>,
    ) -> Result<Vec<ReceivedMessage>> {
        let mut out: Vec<ReceivedMessage> = Vec::new();
        let messages = self.receive_messages(max, wait, visibility).await?;
        for (i, message) in messages.iter().enumerate() {
            let read = match self.decode(message).await {
                Ok(message) => Ok(Some(message)),
                // S3 busy, say: the receive is tried again.
                Err(error) if error.is_retryable() => Err(error),
                Err(error) => self.unreadable(message, error).await,
            };
            match read {
                Ok(message) => out.extend(message),
                // What it took (but what it dead-lettered) is shown again now rather than after
                // its hold: an operator's pass holds for minutes.
                Err(error) => {
                    let rest = messages[i..].iter().map(|m| Receipt(m.receipt_handle.clone().unwrap_or_default()));
                    let taken: Vec<Receipt> = out.into_iter().map(|m| m.receipt).chain(rest).collect();
                    self.show_again(&taken).await;
                    return Err(error);
                }
            }
        }
        Ok(out)
    }

    /// One ReceiveMessage call: the messages as SQS gives them, not yet decoded.
    async fn receive_messages(
        &self,
        max: usize,
        wait: Duration,
        visibility: Option<i32>,
    ) -> Result<Vec<aws_sdk_sqs::types::Message>> {
        let wait_seconds = (wait.as_secs_f64().round() as u64).min(MAX_WAIT_SECONDS) as i32;
        let mut request = self
            .client
            .receive_message()
            .queue_url(self.url().await?)
            .max_number_of_messages(max.clamp(1, BATCH_ENTRIES) as i32)
            .wait_time_seconds(wait_seconds)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp)
            .message_attribute_names("All");
        if let Some(seconds) = visibility {
            request = request.visibility_timeout(seconds);
        }
        let output = request.send().await.map_err(|e| classify("ReceiveMessage", e))?;
        Ok(output.messages.unwrap_or_default())
    }

    /// Makes the messages of `receipts` visible again, as many as can be: a receipt gone stale
    /// (its message came round again) or a failed call is logged, not returned, and no chunk
    /// waits on another's failure. Their timeout shows the rest again anyway.
    async fn show_again(&self, receipts: &[Receipt]) {
        // Each chunk's failure is its result, not the whole call's, so no chunk stops another.
        let shown = concurrently(
            receipts.chunks(BATCH_ENTRIES).map(|chunk| async move { Ok(self.change_visibility(chunk, 0).await.err()) }),
        )
        .await;
        let failed: Vec<SluiceError> = shown.into_iter().flatten().flatten().collect();
        if let Some(error) = failed.first() {
            tracing::warn!(%error, calls = failed.len(), "a look left some messages hidden until their visibility timeout");
        }
    }

    async fn change_visibility(&self, receipts: &[Receipt], seconds: i32) -> Result<()> {
        let url = self.url().await?;
        concurrently(receipts.chunks(BATCH_ENTRIES).map(|chunk| async move {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&r.0)
                        .visibility_timeout(seconds)
                        .build()
                        .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            let output = self
                .client
                .change_message_visibility_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| classify("ChangeMessageVisibilityBatch", e))?;
            check_failed(
                "ChangeMessageVisibilityBatch",
                output.failed.iter().map(|f| (f.code.as_str(), f.sender_fault)),
            )
        }))
        .await?;
        Ok(())
    }
}

fn string_attribute(value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder().data_type("String").string_value(value).build().expect("data type is set")
}

/// A numeric queue attribute of `attrs`, where it is there and a number.
fn number<T: std::str::FromStr>(attrs: &HashMap<QueueAttributeName, String>, name: QueueAttributeName) -> Option<T> {
    attrs.get(&name).and_then(|v| v.parse().ok())
}

/// How many of the messages of `sizes`, in order, go in each batch call: up to ten, and no more
/// than `limit` bytes together (a message alone is within it, or it would have gone to S3).
fn calls_for(sizes: &[usize], limit: usize) -> Vec<usize> {
    let mut calls: Vec<(usize, usize)> = Vec::new();
    for &size in sizes {
        match calls.last_mut() {
            Some((n, bytes)) if *n < BATCH_ENTRIES && *bytes + size <= limit => {
                *n += 1;
                *bytes += size;
            }
            _ => calls.push((1, size)),
        }
    }
    calls.into_iter().map(|(n, _)| n).collect()
}

fn encode_base64(bytes: Vec<u8>, attrs: &mut BTreeMap<String, String>) -> String {
    attrs.insert(BODY_ENCODING.to_owned(), "base64".to_owned());
    STANDARD.encode(bytes)
}

/// Whether SQS accepts `text` as a message body or attribute (XML 1.0 characters only).
fn is_xml_safe(text: &str) -> bool {
    text.chars().all(is_xml_char)
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// `attributes` as JSON that SQS takes as an attribute's text: serde_json escapes control
/// characters but writes U+FFFE and U+FFFF (from a partition key, say) as they are, which SQS
/// refuses; they are escaped too (`\uFFFE` reads back as the same character).
fn xml_safe_json(attributes: &BTreeMap<String, String>) -> String {
    let json = serde_json::to_string(attributes).expect("map serialises");
    if is_xml_safe(&json) {
        return json;
    }
    let mut safe = String::with_capacity(json.len() + 12);
    for c in json.chars() {
        if is_xml_char(c) {
            safe.push(c);
        } else {
            // Only characters of the basic plane are outside XML's, and only inside strings.
            safe.push_str(&format!("\\u{:04X}", u32::from(c)));
        }
    }
    safe
}

/// A failed entry of a batch call: a stale receipt (the message was received again, or is
/// gone) is no failure for sluice; anything else fails the call, retryably unless it is the
/// sender's fault.
fn check_failed<'a>(operation: &str, failed: impl Iterator<Item = (&'a str, bool)>) -> Result<()> {
    for (code, sender_fault) in failed {
        if matches!(
            code,
            "ReceiptHandleIsInvalid" | "InvalidReceiptHandle" | "AWS.SimpleQueueService.ReceiptHandleIsInvalid"
        ) {
            continue;
        }
        let detail = format!("{operation}: entry failed with {code}");
        return Err(if sender_fault {
            SluiceError::permanent(ReasonCode::StoreUnavailable, detail)
        } else {
            SluiceError::retryable(ReasonCode::StoreBusy, detail)
        });
    }
    Ok(())
}

impl SqsQueue {
    /// One SendMessageBatch call, then again with only the entries SQS did not take (the SDK
    /// retries whole calls, not those), until it has taken them all: sent again whole, those it
    /// took would be sent twice, and a DLQ entry twice is two entries. An entry refused as the
    /// sender's fault fails the send at once. Entries still refused after the retries fail the
    /// send, and the caller counts every message of the call as not gone out (sinks are
    /// idempotent; a DLQ entry taken beside one refused is then sent again).
    async fn send_call(&self, url: &str, entries: Vec<SendMessageBatchRequestEntry>) -> Result<()> {
        let mut pending = entries;
        let mut delays = super::dynamodb::unprocessed_backoff();
        loop {
            let output = self
                .client
                .send_message_batch()
                .queue_url(url)
                .set_entries(Some(pending.clone()))
                .send()
                .await
                .map_err(|e| classify("SendMessageBatch", e))?;
            if output.failed.is_empty() {
                return Ok(());
            }
            let senders = output.failed.iter().filter(|f| f.sender_fault);
            check_failed("SendMessageBatch", senders.map(|f| (f.code.as_str(), true)))?;
            let refused: std::collections::HashSet<&str> = output.failed.iter().map(|f| f.id.as_str()).collect();
            pending.retain(|entry| refused.contains(entry.id()));
            let Some(delay) = delays.next().filter(|_| !pending.is_empty()) else {
                // Out of retries, or failures naming none of the entries sent (sent again empty,
                // the call would be refused as the sender's fault).
                return check_failed("SendMessageBatch", output.failed.iter().map(|f| (f.code.as_str(), false)));
            };
            tracing::debug!(refused = pending.len(), ?delay, "sending again the entries SendMessageBatch refused");
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait]
impl WorkQueue for SqsQueue {
    fn name(&self) -> QueueName {
        self.name
    }

    fn per_call(&self) -> Option<usize> {
        Some(BATCH_ENTRIES)
    }

    async fn send_batch(&self, messages: Vec<OutgoingMessage>) -> Result<()> {
        // Up to ten entries a call, and as many bytes as the queue takes in one message.
        let mut encoded = Vec::with_capacity(messages.len());
        for (i, message) in messages.into_iter().enumerate() {
            encoded.push(self.encode(message, i).await?);
        }
        let sizes: Vec<usize> = encoded.iter().map(|(_, size)| *size).collect();
        // The most any ten messages in a row would put in one call.
        let fullest = sizes.windows(BATCH_ENTRIES.min(sizes.len()).max(1)).map(|w| w.iter().sum()).max();
        let limit = self.limit_for(fullest.unwrap_or(0)).await?;
        let mut entries = encoded.into_iter().map(|(entry, _)| entry);
        let calls: Vec<Vec<SendMessageBatchRequestEntry>> =
            calls_for(&sizes, limit).into_iter().map(|n| entries.by_ref().take(n).collect()).collect();
        let url = self.url().await?;
        concurrently(calls.into_iter().map(|entries| self.send_call(url, entries))).await?;
        Ok(())
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        self.receive_decoded(max, wait, None).await
    }

    async fn receive_hidden(&self, max: usize, wait: Duration, hidden: Duration) -> Result<Vec<ReceivedMessage>> {
        self.receive_decoded(max, wait, Some(whole_seconds(hidden).min(43_200))).await
    }

    async fn ack(&self, receipts: &[Receipt]) -> Result<()> {
        let url = self.url().await?;
        concurrently(receipts.chunks(BATCH_ENTRIES).map(|chunk| async move {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&r.0)
                        .build()
                        .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            let output = self
                .client
                .delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| classify("DeleteMessageBatch", e))?;
            check_failed("DeleteMessageBatch", output.failed.iter().map(|f| (f.code.as_str(), f.sender_fault)))
        }))
        .await?;
        Ok(())
    }

    async fn extend_visibility(&self, receipts: &[Receipt], by: Duration) -> Result<()> {
        self.change_visibility(receipts, whole_seconds(by).clamp(1, 43_200)).await
    }

    async fn release(&self, receipts: &[Receipt], delay: Duration) -> Result<()> {
        self.change_visibility(receipts, whole_seconds(delay).min(43_200)).await
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let attrs = self
            .attributes(&[
                QueueAttributeName::ApproximateNumberOfMessages,
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                QueueAttributeName::ApproximateNumberOfMessagesDelayed,
            ])
            .await?;
        let get = |name: QueueAttributeName| number(&attrs, name).unwrap_or(0);
        Ok(QueueDepth {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                + get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        })
    }

    /// SQS cannot read without receiving. A receive that leaves a message visible (a zero
    /// visibility timeout) lets the next receive show it again, so a look made of such receives
    /// stops, at random, when one shows nothing new: on a queue of 63 it saw 10. So each message
    /// read stays hidden while the look goes on, and every one is made visible again before the
    /// look returns, whatever happened (a message that cannot be decoded is passed over). A look stops
    /// reading after [`PEEK_READING`], well inside the [`PEEK_HIDDEN_SECONDS`] its messages stay
    /// hidden were the process to die; it has then read part of the queue (`dlq::look` says so).
    /// Receive counts go up by one; another reader meanwhile sees only what this look has not
    /// reached yet.
    async fn peek(&self, max: usize) -> Result<Vec<ReceivedMessage>> {
        let started = std::time::Instant::now();
        let mut out: Vec<ReceivedMessage> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut receipts = Vec::new();
        let read = async {
            while out.len() < max && started.elapsed() < PEEK_READING && !crate::shutdown::interrupted() {
                // A short long poll: a short poll may answer nothing while messages wait.
                let batch =
                    self.receive_messages(max - out.len(), Duration::from_secs(1), Some(PEEK_HIDDEN_SECONDS)).await?;
                receipts.extend(batch.iter().map(|m| Receipt(m.receipt_handle.clone().unwrap_or_default())));
                let mut fresh = false;
                for message in batch {
                    let id = message.message_id.clone().unwrap_or_default();
                    if !seen.insert(id) {
                        continue;
                    }
                    fresh = true;
                    // One message that cannot be read (its claim-checked body gone) does not
                    // keep the rest from being looked at; the look then counts as partial.
                    match self.decode(&message).await {
                        Ok(message) => out.push(message),
                        // A DLQ's: shown as SQS holds it, as a receive hands it out.
                        Err(error) if self.dead_letters.is_none() && unreadable_as_sent(&error) => {
                            out.push(held_unreadable(&message, &error));
                        }
                        Err(error) => tracing::warn!(%error, "a look passed over a message it cannot read"),
                    }
                }
                // Nothing, or only messages read already (shown again by someone else).
                if !fresh {
                    break;
                }
            }
            Ok::<(), SluiceError>(())
        }
        .await;
        self.show_again(&receipts).await;
        read.map(|()| out)
    }
}

/// Whether `error`, reading a message back, says it cannot be read as it was sent (rather than
/// that it cannot be read now).
fn unreadable_as_sent(error: &SluiceError) -> bool {
    matches!(error.code(), ReasonCode::ClaimCheckMissing | ReasonCode::MalformedMessage)
}

/// A message that cannot be read as sent, as SQS holds it, marked [`dlq_attr::UNREADABLE`].
fn held_unreadable(message: &aws_sdk_sqs::types::Message, error: &SluiceError) -> ReceivedMessage {
    let mut held = as_held(message);
    held.attributes.insert(dlq_attr::UNREADABLE.to_owned(), error.detail().to_owned());
    held
}

/// A message as SQS holds it: its body the text SQS has (not yet read back from the blob store or
/// its encoding), its attributes those its sender gave.
fn as_held(message: &aws_sdk_sqs::types::Message) -> ReceivedMessage {
    let attributes: BTreeMap<String, String> = message
        .message_attributes
        .as_ref()
        .and_then(|a| a.get(ATTRIBUTES))
        .and_then(|v| v.string_value.as_deref())
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default();
    let system = message.attributes.as_ref();
    let number =
        |name: MessageSystemAttributeName| system.and_then(|s| s.get(&name)).and_then(|v| v.parse::<u64>().ok());
    ReceivedMessage {
        id: message.message_id.clone().unwrap_or_default(),
        body: message.body.clone().unwrap_or_default().into_bytes(),
        attributes,
        receipt: Receipt(message.receipt_handle.clone().unwrap_or_default()),
        receive_count: number(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1) as u32,
        sent_at_ms: number(MessageSystemAttributeName::SentTimestamp).unwrap_or_default(),
        first_received_ms: number(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp),
    }
}

/// SQS counts visibility in whole seconds: a delay is rounded up, so a retry 200 ms later is one
/// a second later, not at once.
fn whole_seconds(delay: Duration) -> i32 {
    delay.as_secs_f64().ceil().min(f64::from(i32::MAX)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_is_rounded_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 0, "released at once");
        assert_eq!(whole_seconds(Duration::from_millis(200)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
    }

    #[test]
    fn batch_calls_take_ten_messages_or_as_many_bytes_as_the_queue_allows() {
        let kib = 1024;
        assert_eq!(calls_for(&[600; 25], SURE_MESSAGE_BYTES), [10, 10, 5]);
        // Photo-sized envelopes (~123 KB): two to a call on a queue of 256 KiB, eight on one of 1 MiB.
        assert_eq!(calls_for(&[123 * kib; 8], SURE_MESSAGE_BYTES), [2, 2, 2, 2]);
        assert_eq!(calls_for(&[123 * kib; 9], 1024 * kib), [8, 1]);
        // A call closes where the next message would take it past the limit.
        assert_eq!(calls_for(&[10, 1000 * kib, 30 * kib, 10], 1024 * kib), [2, 2]);
        assert!(calls_for(&[], SURE_MESSAGE_BYTES).is_empty());
    }

    #[test]
    fn only_xml_characters_are_sent_as_text() {
        assert!(is_xml_safe("{\"a\": \"ünïcode\"}\n"));
        assert!(!is_xml_safe("nul \u{0} inside"));
    }

    #[test]
    fn attributes_are_sent_as_xml_text_and_read_back_alike() {
        let attributes: BTreeMap<String, String> = [
            ("partition_key".to_owned(), "a\u{fffe}b\u{ffff}\u{1}é\u{1F600}".to_owned()),
            ("k".to_owned(), "v".to_owned()),
        ]
        .into();
        let json = xml_safe_json(&attributes);
        assert!(is_xml_safe(&json), "{json}");
        assert_eq!(serde_json::from_str::<BTreeMap<String, String>>(&json).unwrap(), attributes);
        let plain: BTreeMap<String, String> = [("k".to_owned(), "v".to_owned())].into();
        assert_eq!(xml_safe_json(&plain), r#"{"k":"v"}"#);
    }

    #[test]
    fn stale_receipts_are_not_failures() {
        assert!(check_failed("X", [("ReceiptHandleIsInvalid", true)].into_iter()).is_ok());
        assert!(check_failed("X", [("InternalError", false)].into_iter()).unwrap_err().is_retryable());
        assert!(!check_failed("X", [("InvalidParameterValue", true)].into_iter()).unwrap_err().is_retryable());
    }
}
