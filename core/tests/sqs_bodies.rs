//! What SQS itself receives: never an empty message body, which real SQS refuses
//! (`MissingParameter`) though the local stand-in takes it. A zero-byte record on its way to the
//! ingest DLQ, and a body kept in the blob store, are sent with a stand-in character and read
//! back as they were.

use aws_sdk_sqs::types::MessageSystemAttributeName;
use sluice_core::ReasonCode;
use sluice_core::backend::aws::Clients;
use sluice_core::backend::aws::bootstrap::bootstrap;
use sluice_core::backend::{Backend, OutgoingMessage};
use sluice_core::config::StoreConfig;
use sluice_core::record::dlq_attr;
use sluice_core::testing::{aws_store_config, unique_prefix};
use sluice_core::topology::QueueName;

/// Fresh resources under a prefix of `name`: their configuration, a backend on them, and the
/// SDK's clients to look at them directly.
async fn fresh(name: &str) -> (StoreConfig, Backend, Clients) {
    let config = aws_store_config(&unique_prefix(name));
    bootstrap(&config).await.unwrap();
    let backend = Backend::open(&config).await.unwrap();
    let clients = Clients::load(&config.aws, Default::default()).await.unwrap();
    (config, backend, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_never_gets_an_empty_body_and_each_reads_back_as_sent() {
    let (config, backend, clients) = fresh("bodies").await;
    let queue = backend.queue(QueueName::IngestDlq);
    let large = vec![b'x'; 1_100_000];
    let sent = [Vec::new(), large.clone(), b"plain".to_vec()];
    for body in &sent {
        queue.send_batch(vec![OutgoingMessage { body: body.clone(), ..Default::default() }]).await.unwrap();
    }

    let raw = as_sqs_holds(&clients, &config.aws.prefix, QueueName::IngestDlq, sent.len()).await;
    assert_eq!(raw.len(), sent.len(), "{raw:?}");
    assert!(raw.iter().all(|(_, body)| !body.is_empty()), "an empty body went to SQS: {raw:?}");
    assert!(raw.iter().all(|(_, body)| body.len() < 300_000), "the large one went to the blob store");

    let mut read: Vec<Vec<u8>> = queue.peek(10).await.unwrap().into_iter().map(|m| m.body).collect();
    read.sort();
    let mut expected = sent.to_vec();
    expected.sort();
    assert_eq!(read, expected, "each body reads back as sent");
}

/// The bodies of up to `n` messages of `queue` as SQS holds them (looked at and made visible
/// again at once), by message id.
async fn as_sqs_holds(clients: &Clients, prefix: &str, queue: QueueName, n: usize) -> Vec<(String, String)> {
    let name = format!("{prefix}-{}", queue.as_str());
    let url = clients.sqs.get_queue_url().queue_name(name).send().await.unwrap().queue_url.unwrap();
    let mut raw: Vec<(String, String)> = Vec::new();
    for _ in 0..10 {
        let got = clients
            .sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        for message in got.messages.unwrap_or_default() {
            if !raw.iter().any(|(id, _)| Some(id) == message.message_id.as_ref()) {
                raw.push((message.message_id.unwrap(), message.body.unwrap_or_default()));
            }
        }
        if raw.len() >= n {
            break;
        }
    }
    raw
}

/// A message whose claim-checked body is gone from S3 cannot be read: it goes to its stage's
/// DLQ (reason `claim_check_missing`) while the rest of the receive is handed out, rather than
/// fail every receive (and stop the worker) until SQS's redrive takes it, with its neighbours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_body_is_gone_goes_to_the_dlq_and_the_rest_is_read() {
    let (config, backend, clients) = fresh("unreadable").await;
    let queue = backend.queue(QueueName::Features);
    let message = |body: Vec<u8>, id: &str| OutgoingMessage {
        body,
        attributes: [(dlq_attr::RECORD_ID.to_owned(), id.to_owned())].into(),
        dedup_key: Some(id.to_owned()),
    };
    queue.send_batch(vec![message(vec![b'x'; 1_100_000], "gone")]).await.unwrap();
    queue.send_batch(vec![message(b"{}".to_vec(), "fine")]).await.unwrap();

    let raw = as_sqs_holds(&clients, &config.aws.prefix, QueueName::Features, 2).await;
    let reference = raw.iter().map(|(_, body)| body).find(|b| b.starts_with("s3://")).expect("one claim-checked");
    let (bucket, key) = reference.strip_prefix("s3://").unwrap().split_once('/').unwrap();
    clients.s3.delete_object().bucket(bucket).key(key).send().await.unwrap();

    let (mut read, mut dead) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let got = queue.receive(10, std::time::Duration::from_secs(1)).await.expect("the receive goes on");
        read.extend(got.into_iter().map(|m| m.body));
        dead = backend.queue(QueueName::FeaturesDlq).peek(10).await.unwrap();
        if !read.is_empty() && !dead.is_empty() {
            break;
        }
    }
    assert_eq!(read, vec![b"{}".to_vec()]);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].attributes[dlq_attr::REASON], ReasonCode::ClaimCheckMissing.as_str());
    assert_eq!(dead[0].attributes[dlq_attr::RECORD_ID], "gone");
    assert_eq!(dead[0].body, reference.as_bytes(), "its body as SQS held it");
    assert!(dead[0].attributes.contains_key(dlq_attr::UNREADABLE), "and a replay leaves it");
}
