//! `sluice aws bootstrap`: creates the stream, queues (with DLQs and redrive policies), tables
//! and bucket a pipeline needs, for local development and tests. Running it again is harmless.
//! `sluice aws teardown` deletes them again (a demo's, say: a stream bills by the hour).
//! Production infrastructure is declared under `deploy/cdk`; `sluice aws check` tells whether a
//! deployed stack holds everything the workers will look for, its queues redriving as they count.

use std::time::Duration;

use aws_sdk_dynamodb::client::Waiters as _;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use aws_sdk_kinesis::types::StreamStatus;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::resources::Table;
use super::{Clients, Names, classify, error_code};
use crate::config::StoreConfig;
use crate::error::{ReasonCode, Result, SluiceError};
use crate::topology::QueueName;

/// What bootstrap made (or found already there).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Bootstrapped {
    /// The region they are in (the credential chain's, unless set): a wrong one is the likeliest
    /// reason a deployed stack's resources are "missing".
    pub region: String,
    pub stream: String,
    pub queues: Vec<String>,
    pub tables: Vec<String>,
    pub bucket: String,
}

/// How long every queue keeps a message: SQS's most (see below).
const QUEUE_RETENTION: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

pub async fn bootstrap(config: &StoreConfig) -> Result<Bootstrapped> {
    let names = Names::new(&config.aws.prefix);
    names.check().map_err(|e| SluiceError::permanent(ReasonCode::SchemaMismatch, e))?;
    let clients = Clients::load(&config.aws, super::RequestCounter::default()).await?;
    let region = clients.region();
    let mut made = Bootstrapped { region, stream: names.stream(), bucket: names.bucket(), ..Default::default() };

    // The bucket first: its name is global, so another account may hold it, and found so, nothing
    // else has been made yet.
    create_bucket(&clients.s3, &names.bucket(), &made.region).await?;
    create_stream(&clients.kinesis, &names.stream(), config.shards.max(1) as i32).await?;

    // DLQs first: the work queues' redrive policies name them.
    // Whole seconds on SQS, rounded up: the workers time their heartbeats by the configured
    // value, so the queue must not let a message go sooner.
    let visibility = config.visibility_timeout_ms.div_ceil(1000).max(1).to_string();
    let order = [
        QueueName::IngestDlq,
        QueueName::FeaturesDlq,
        QueueName::InferenceDlq,
        QueueName::ResultsDlq,
        QueueName::Review,
        QueueName::Features,
        QueueName::Inference,
        QueueName::Results,
    ];
    for queue in order {
        // Every queue keeps the 14 days SQS allows: SQS drops a message past its retention
        // without a DLQ entry, so a work queue keeps it as long as it can (SQS's default 4 days
        // would lose the backlog of a stage stopped over a long weekend). An entry a worker
        // dead-letters is a new message, kept 14 days more; one SQS moves keeps its first
        // enqueue time.
        // (As the CDK data stack does; `aws bootstrap` on its prefix finds nothing to differ.)
        let retention = QUEUE_RETENTION;
        let mut wanted = vec![
            (QueueAttributeName::VisibilityTimeout, visibility.clone()),
            (QueueAttributeName::MessageRetentionPeriod, retention.as_secs().to_string()),
            // SQS's most (since 2025): photo-sized envelopes travel eight to a call, not in S3.
            (QueueAttributeName::MaximumMessageSize, "1048576".to_owned()),
        ];
        if let Some(dlq) = queue.redrive_target() {
            let arn = queue_arn(&clients.sqs, &names.queue(dlq)).await?;
            let policy = serde_json::json!({ "deadLetterTargetArn": arn, "maxReceiveCount": config.max_receives });
            wanted.push((QueueAttributeName::RedrivePolicy, policy.to_string()));
        }
        let name = names.queue(queue);
        create_queue(&clients.sqs, &name, &wanted).await?;
        made.queues.push(name);
    }

    for (table, spec) in names.tables() {
        create_table(&clients.dynamodb, &table, spec).await?;
        made.tables.push(table);
    }
    if config.aws.result_ttl_days > 0 {
        let attribute = super::resources::result_ttl_attribute();
        enable_ttl(&clients.dynamodb, &names.results_table(), attribute, "store.aws.result_ttl_days").await?;
    }
    if config.aws.feature_ttl_days > 0 {
        let attribute = super::resources::feature_ttl_attribute();
        enable_ttl(&clients.dynamodb, &names.features_table(), attribute, "store.aws.feature_ttl_days").await?;
    }
    Ok(made)
}

/// Creates the bucket in the clients' region, or finds it this account's already.
async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str, region: &str) -> Result<()> {
    let mut request = s3.create_bucket().bucket(bucket);
    // S3 wants the region named outside us-east-1 (and refuses it named there).
    if region != "us-east-1" {
        let constraint = BucketLocationConstraint::from(region);
        let configuration = CreateBucketConfiguration::builder().location_constraint(constraint).build();
        request = request.create_bucket_configuration(configuration);
    }
    match request.send().await {
        Ok(_) => Ok(()),
        Err(e) if error_code(&e) == Some("BucketAlreadyOwnedByYou") => Ok(()),
        Err(e) if error_code(&e) == Some("BucketAlreadyExists") => Err(SluiceError::permanent(
            ReasonCode::Misconfigured,
            format!(
                "the bucket {bucket} belongs to another AWS account (bucket names are global): choose another \
                 prefix (--prefix); nothing was made"
            ),
        )),
        Err(e) => Err(classify("CreateBucket", e)),
    }
}

/// How long bootstrap waits for a resource that is being made or deleted (a teardown just before,
/// another bootstrap at the same time).
const SETTLING: Duration = Duration::from_secs(120);

/// Creates a queue with `wanted`; one there already with other settings is named, not changed.
/// A queue deleted less than a minute ago (a teardown just before) cannot be made again yet:
/// it waits that out.
async fn create_queue(sqs: &aws_sdk_sqs::Client, name: &str, wanted: &[(QueueAttributeName, String)]) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let request = sqs.create_queue().queue_name(name).set_attributes(Some(wanted.iter().cloned().collect()));
        match request.send().await {
            Ok(_) => return Ok(()),
            Err(e) if error_code(&e) == Some("QueueAlreadyExists") => {
                return Err(settled_otherwise(sqs, name, wanted).await);
            }
            Err(e)
                if error_code(&e).is_some_and(|code| code.ends_with("QueueDeletedRecently"))
                    && started.elapsed() < SETTLING =>
            {
                tracing::info!(queue = name, "deleted less than a minute ago: waiting to make it again");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(e) => return Err(classify("CreateQueue", e)),
        }
    }
}

/// Turns on a table's time to live, on the expiry `attribute` the workers write (as `setting`
/// says). One on another attribute is named, not changed: items would never expire where the
/// workers expect them to.
async fn enable_ttl(dynamodb: &aws_sdk_dynamodb::Client, table: &str, attribute: &str, setting: &str) -> Result<()> {
    let described = dynamodb
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| classify("DescribeTimeToLive", e))?;
    if let Some(ttl) = described.time_to_live_description
        && matches!(ttl.time_to_live_status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling))
    {
        return match ttl.attribute_name.as_deref() {
            Some(name) if name == attribute => Ok(()),
            other => Err(SluiceError::permanent(
                ReasonCode::Misconfigured,
                format!(
                    "table {table} expires items by {other:?}, not by {attribute:?} as the workers write: \
                     its items would never expire ({setting})"
                ),
            )),
        };
    }
    let ttl = TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(attribute)
        .build()
        .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))?;
    dynamodb
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(ttl)
        .send()
        .await
        .map_err(|e| classify("UpdateTimeToLive", e))?;
    Ok(())
}

/// Finds every resource the workers of `config.aws.prefix` will use, creating nothing; the error
/// names each one that is missing or unreadable.
pub async fn check(config: &StoreConfig) -> Result<Bootstrapped> {
    let clients = Clients::load(&config.aws, super::RequestCounter::default()).await?;
    let names = Names::new(&config.aws.prefix);
    let mut missing = Vec::new();
    let region = clients.region();
    let mut found = Bootstrapped { region, stream: names.stream(), bucket: names.bucket(), ..Default::default() };
    // An endpoint that cannot be reached says nothing of the resources: that is the answer, at
    // once, not fourteen resources "missing".
    if let Err(e) = clients.kinesis.describe_stream_summary().stream_name(names.stream()).send().await {
        let error = classify("DescribeStreamSummary", e);
        if error.is_retryable() {
            return Err(error);
        }
        missing.push(format!("stream {}: {error}", names.stream()));
    }
    let mut differ = Vec::new();
    for queue in QueueName::ALL {
        match clients.sqs.get_queue_url().queue_name(names.queue(queue)).send().await {
            Ok(got) => {
                found.queues.push(names.queue(queue));
                if let Some(dlq) = queue.redrive_target() {
                    let url = got.queue_url.unwrap_or_default();
                    differ.extend(
                        redrive_differs(&clients.sqs, &url, &names.queue(queue), &names.queue(dlq), config).await?,
                    );
                }
            }
            Err(e) => missing.push(format!("queue {}: {}", names.queue(queue), classify("GetQueueUrl", e))),
        }
    }
    for (table, _) in names.tables() {
        match clients.dynamodb.describe_table().table_name(&table).send().await {
            Ok(_) => found.tables.push(table),
            Err(e) => missing.push(format!("table {table}: {}", classify("DescribeTable", e))),
        }
    }
    if let Err(e) = clients.s3.head_bucket().bucket(names.bucket()).send().await {
        missing.push(format!("bucket {}: {}", names.bucket(), classify("HeadBucket", e)));
    }
    if !missing.is_empty() {
        return Err(SluiceError::permanent(
            ReasonCode::StoreUnavailable,
            format!(
                "the resources of prefix {:?} in region {} are incomplete: {}",
                config.aws.prefix,
                found.region,
                missing.join("; ")
            ),
        ));
    }
    if !differ.is_empty() {
        return Err(SluiceError::permanent(
            ReasonCode::Misconfigured,
            format!(
                "the queues of prefix {:?} do not match the configuration: {}",
                config.aws.prefix,
                differ.join("; ")
            ),
        ));
    }
    Ok(found)
}

/// What of a work queue's redrive policy the workers would not agree with: it must move a message
/// to its stage's DLQ after `store.max_receives` receives, the count at which a worker gives a
/// failing record up with its failure's reason. Redriven sooner, a retryable failure ends as
/// `max_receives_exceeded` with its cause lost; later, records are given up before the queue
/// would.
async fn redrive_differs(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    name: &str,
    dlq: &str,
    config: &StoreConfig,
) -> Result<Option<String>> {
    let Some(policy) = queue_attribute(sqs, url, QueueAttributeName::RedrivePolicy).await? else {
        return Ok(Some(format!(
            "queue {name} has no redrive policy (to {dlq} after {} receives)",
            config.max_receives
        )));
    };
    let policy: serde_json::Value = serde_json::from_str(&policy).unwrap_or_default();
    // A number, or (as some tools write it) a number in a string.
    let count = match &policy["maxReceiveCount"] {
        serde_json::Value::String(text) => text.parse::<u64>().ok(),
        value => value.as_u64(),
    };
    let target = policy["deadLetterTargetArn"].as_str().unwrap_or_default();
    let mut wrong = Vec::new();
    if count != Some(u64::from(config.max_receives)) {
        wrong.push(format!(
            "redrives after {} receives, the workers give up after {} (store.max_receives)",
            count.map_or("?".to_owned(), |c| c.to_string()),
            config.max_receives
        ));
    }
    if target.rsplit(':').next() != Some(dlq) {
        wrong.push(format!("redrives to {target:?}, not {dlq}"));
    }
    Ok((!wrong.is_empty()).then(|| format!("queue {name} {}", wrong.join(" and "))))
}

/// What teardown deleted, and what of the prefix's resources was not there.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TornDown {
    pub deleted: Vec<String>,
    pub absent: Vec<String>,
}

/// The tag CloudFormation puts on what a stack made.
const STACK_TAG: &str = "aws:cloudformation:stack-name";

/// Deletes every resource of `config.aws.prefix` that bootstrap makes: the stream, queues,
/// tables, and the bucket with what it holds. What is not there is passed over, so it can run
/// again after a failure (and on a prefix S3 refuses, which an older bootstrap took, it deletes
/// all but the bucket, which cannot exist). A deployed stack's resources are refused, before
/// anything is deleted (CloudFormation tags what it makes): `cdk destroy` takes a stack down,
/// and takes it down whole.
pub async fn teardown(config: &StoreConfig) -> Result<TornDown> {
    let names = Names::new(&config.aws.prefix);
    let clients = Clients::load(&config.aws, super::RequestCounter::default()).await?;
    let bucket = names.check().is_ok().then(|| names.bucket());
    // Each queue's URL, found once: for the stack's tags, then for the deletion.
    let mut queues = Vec::new();
    for queue in QueueName::ALL {
        let name = names.queue(queue);
        let url = queue_url(&clients.sqs, &name).await?;
        queues.push((name, url));
    }
    if let Some((resource, stack)) = stack_of(&clients, &names, &queues, bucket.as_deref()).await? {
        return Err(SluiceError::permanent(
            ReasonCode::StoreUnavailable,
            format!(
                "{resource} belongs to the CloudFormation stack {stack}: take a deployed stack down with \
                 `cdk destroy` (deploy/cdk), not piece by piece"
            ),
        ));
    }
    let mut done = TornDown::default();
    match delete_all(&clients, &names, queues, bucket, &mut done).await {
        Ok(()) => Ok(done),
        // Stopped half way (a bucket a worker still writes to, say): what is gone already is said,
        // so that what is left can be seen to; run again, it goes on.
        Err(error) if !done.deleted.is_empty() => {
            let detail = format!("{}; deleted before it: {}", error.detail(), done.deleted.join(", "));
            Err(if error.is_retryable() {
                SluiceError::retryable(error.code(), detail)
            } else {
                SluiceError::permanent(error.code(), detail)
            })
        }
        Err(error) => Err(error),
    }
}

/// Deletes the stream, `queues` (name, URL if there), tables and `bucket`, noting each in `done`.
async fn delete_all(
    clients: &Clients,
    names: &Names,
    queues: Vec<(String, Option<String>)>,
    bucket: Option<String>,
    done: &mut TornDown,
) -> Result<()> {
    let mut gone = |deleted: bool, name: String| if deleted { done.deleted.push(name) } else { done.absent.push(name) };
    let stream = names.stream();
    let deleted = clients.kinesis.delete_stream().stream_name(&stream).enforce_consumer_deletion(true).send().await;
    gone(absent_if(deleted, "DeleteStream", &["ResourceNotFoundException"])?, stream);
    for (name, url) in queues {
        let deleted = match url {
            Some(url) => absent_if(clients.sqs.delete_queue().queue_url(url).send().await, "DeleteQueue", NO_QUEUE)?,
            None => false,
        };
        gone(deleted, name);
    }
    for (table, _) in names.tables() {
        let deleted = clients.dynamodb.delete_table().table_name(&table).send().await;
        gone(absent_if(deleted, "DeleteTable", &["ResourceNotFoundException"])?, table);
    }
    if let Some(bucket) = bucket {
        let deleted = empty_bucket(&clients.s3, &bucket).await?
            && absent_if(clients.s3.delete_bucket().bucket(&bucket).send().await, "DeleteBucket", &["NoSuchBucket"])?;
        gone(deleted, bucket);
    }
    Ok(())
}

/// The error codes of a queue that is not there.
const NO_QUEUE: &[&str] = &["AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"];

/// A queue's URL, or none where there is no such queue.
async fn queue_url(sqs: &aws_sdk_sqs::Client, name: &str) -> Result<Option<String>> {
    match sqs.get_queue_url().queue_name(name).send().await {
        Ok(found) => Ok(found.queue_url),
        Err(e) if error_code(&e).is_some_and(|code| NO_QUEUE.contains(&code)) => Ok(None),
        Err(e) => Err(classify("GetQueueUrl", e)),
    }
}

/// The first of the prefix's resources a CloudFormation stack made, and the stack's name.
/// `queues`: each queue's name and URL, where it exists.
async fn stack_of(
    clients: &Clients,
    names: &Names,
    queues: &[(String, Option<String>)],
    bucket: Option<&str>,
) -> Result<Option<(String, String)>> {
    let stream = names.stream();
    match clients.kinesis.list_tags_for_stream().stream_name(&stream).limit(50).send().await {
        Ok(tags) => {
            if let Some(tag) = tags.tags.iter().find(|t| t.key == STACK_TAG) {
                return Ok(Some((stream, tag.value.clone().unwrap_or_default())));
            }
        }
        Err(e) if error_code(&e) == Some("ResourceNotFoundException") => {}
        Err(e) => return Err(classify("ListTagsForStream", e)),
    }
    for (name, url) in queues {
        let Some(url) = url else { continue };
        let tags =
            clients.sqs.list_queue_tags().queue_url(url).send().await.map_err(|e| classify("ListQueueTags", e))?;
        if let Some(stack) = tags.tags.and_then(|tags| tags.get(STACK_TAG).cloned()) {
            return Ok(Some((name.clone(), stack)));
        }
    }
    for (table, _) in names.tables() {
        let arn = match clients.dynamodb.describe_table().table_name(&table).send().await {
            Ok(found) => found.table.and_then(|t| t.table_arn),
            Err(e) if error_code(&e) == Some("ResourceNotFoundException") => None,
            Err(e) => return Err(classify("DescribeTable", e)),
        };
        let Some(arn) = arn else { continue };
        let tags = clients
            .dynamodb
            .list_tags_of_resource()
            .resource_arn(arn)
            .send()
            .await
            .map_err(|e| classify("ListTagsOfResource", e))?;
        if let Some(tag) = tags.tags().iter().find(|t| t.key == STACK_TAG) {
            return Ok(Some((table, tag.value.clone())));
        }
    }
    if let Some(bucket) = bucket {
        match clients.s3.get_bucket_tagging().bucket(bucket).send().await {
            Ok(tags) => {
                if let Some(tag) = tags.tag_set().iter().find(|t| t.key == STACK_TAG) {
                    return Ok(Some((bucket.to_owned(), tag.value.clone())));
                }
            }
            Err(e) if matches!(error_code(&e), Some("NoSuchBucket" | "NoSuchTagSet")) => {}
            Err(e) => return Err(classify("GetBucketTagging", e)),
        }
    }
    Ok(None)
}

/// `Ok(true)` for a call that deleted something, `Ok(false)` for one that found nothing to
/// delete (its error code among `absent`), the error otherwise.
fn absent_if<T, E>(
    result: std::result::Result<T, SdkError<E, HttpResponse>>,
    operation: &str,
    absent: &[&str],
) -> Result<bool>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(e) if error_code(&e).is_some_and(|code| absent.contains(&code)) => Ok(false),
        Err(e) => Err(classify(operation, e)),
    }
}

/// Deletes every object in `bucket`; false when there is no such bucket.
async fn empty_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<bool> {
    use aws_sdk_s3::types::{Delete, ObjectIdentifier};
    let mut token = None;
    loop {
        let listed = s3.list_objects_v2().bucket(bucket).set_continuation_token(token).send().await;
        let listed = match listed {
            Ok(listed) => listed,
            Err(e) if error_code(&e) == Some("NoSuchBucket") => return Ok(false),
            Err(e) => return Err(classify("ListObjectsV2", e)),
        };
        let keys: Vec<ObjectIdentifier> = listed
            .contents()
            .iter()
            .filter_map(|o| o.key().and_then(|k| ObjectIdentifier::builder().key(k).build().ok()))
            .collect();
        if !keys.is_empty() {
            let delete = Delete::builder()
                .set_objects(Some(keys))
                .quiet(true)
                .build()
                .map_err(|e| SluiceError::permanent(ReasonCode::Internal, e.to_string()))?;
            let deleted = s3
                .delete_objects()
                .bucket(bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify("DeleteObjects", e))?;
            if let Some(error) = deleted.errors().first() {
                return Err(SluiceError::retryable(
                    ReasonCode::StoreUnavailable,
                    format!(
                        "DeleteObjects: {} of {bucket}'s objects were not deleted (the first, {:?}: {:?})",
                        deleted.errors().len(),
                        error.key(),
                        error.message()
                    ),
                ));
            }
        }
        match listed.next_continuation_token {
            Some(next) if listed.is_truncated == Some(true) => token = Some(next),
            _ => return Ok(true),
        }
    }
}

/// What to say of a queue that exists with other settings than bootstrap's (SQS refuses to
/// create it again): each setting that differs, for bootstrap changes nothing that exists.
async fn settled_otherwise(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    wanted: &[(QueueAttributeName, String)],
) -> SluiceError {
    let url = match sqs.get_queue_url().queue_name(name).send().await {
        Ok(found) => found.queue_url.unwrap_or_default(),
        Err(e) => return classify("GetQueueUrl", e),
    };
    let have = match sqs.get_queue_attributes().queue_url(url).attribute_names(QueueAttributeName::All).send().await {
        Ok(found) => found.attributes.unwrap_or_default(),
        Err(e) => return classify("GetQueueAttributes", e),
    };
    // A redrive policy is JSON: compared as values, not as text.
    let same = |a: &str, b: &str| match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let differ: Vec<String> = wanted
        .iter()
        .filter(|(key, value)| !have.get(key).is_some_and(|had| same(had, value)))
        .map(|(key, value)| format!("{key} is {}, not {value}", have.get(key).map_or("unset", String::as_str)))
        .collect();
    SluiceError::permanent(
        ReasonCode::StoreUnavailable,
        format!(
            "queue {name} exists with other settings ({}): bootstrap changes nothing that exists. Use another \
             --prefix, set the queue as the configuration says, or, for a deployed stack, leave bootstrap out \
             (`sluice aws check` finds what the workers need)",
            differ.join("; ")
        ),
    )
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, name: &str) -> Result<String> {
    let url = sqs.get_queue_url().queue_name(name).send().await.map_err(|e| classify("GetQueueUrl", e))?.queue_url;
    queue_attribute(sqs, url.as_deref().unwrap_or_default(), QueueAttributeName::QueueArn)
        .await?
        .ok_or_else(|| SluiceError::permanent(ReasonCode::StoreUnavailable, format!("no ARN for queue {name}")))
}

/// One attribute of the queue at `url`, where it has it.
async fn queue_attribute(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    attribute: QueueAttributeName,
) -> Result<Option<String>> {
    let found = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(attribute.clone())
        .send()
        .await
        .map_err(|e| classify("GetQueueAttributes", e))?;
    Ok(found.attributes.and_then(|mut a| a.remove(&attribute)))
}

/// Creates the stream, or finds it, and waits until it takes records: one being deleted (a
/// teardown just before) is made again once it is gone; one being resharded takes records.
async fn create_stream(kinesis: &aws_sdk_kinesis::Client, name: &str, shards: i32) -> Result<()> {
    let started = std::time::Instant::now();
    while started.elapsed() < SETTLING {
        let summary = kinesis.describe_stream_summary().stream_name(name).send().await;
        let status = match summary {
            Ok(found) => found.stream_description_summary.map(|s| s.stream_status),
            Err(e) if error_code(&e) == Some("ResourceNotFoundException") => None,
            Err(e) => return Err(classify("DescribeStreamSummary", e)),
        };
        match status {
            Some(StreamStatus::Active | StreamStatus::Updating) => return Ok(()),
            None => match kinesis.create_stream().stream_name(name).shard_count(shards).send().await {
                // Made, or being made by someone else meanwhile: waited for alike.
                Ok(_) => {}
                Err(e) if error_code(&e) == Some("ResourceInUseException") => {}
                Err(e) => return Err(classify("CreateStream", e)),
            },
            // Being made, or deleted.
            Some(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(SluiceError::retryable(ReasonCode::StoreUnavailable, format!("stream {name} did not become active")))
}

async fn create_table(dynamodb: &aws_sdk_dynamodb::Client, name: &str, spec: &Table) -> Result<()> {
    let build_error =
        |e: aws_sdk_dynamodb::error::BuildError| SluiceError::permanent(ReasonCode::Internal, e.to_string());
    let string = |attribute: &str| {
        AttributeDefinition::builder()
            .attribute_name(attribute)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(build_error)
    };
    let key = |attribute: &str, kind: KeyType| {
        KeySchemaElement::builder().attribute_name(attribute).key_type(kind).build().map_err(build_error)
    };
    let mut request = dynamodb
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string(&spec.key)?)
        .key_schema(key(&spec.key, KeyType::Hash)?);
    if let Some(index) = &spec.index {
        request = request
            .attribute_definitions(string(&index.partition)?)
            .attribute_definitions(string(&index.sort)?)
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(&index.name)
                    .key_schema(key(&index.partition, KeyType::Hash)?)
                    .key_schema(key(&index.sort, KeyType::Range)?)
                    .projection(Projection::builder().projection_type(ProjectionType::All).build())
                    .build()
                    .map_err(build_error)?,
            );
    }
    let waited =
        |e: &dyn std::fmt::Display| SluiceError::retryable(ReasonCode::StoreUnavailable, format!("table {name}: {e}"));
    match request.clone().send().await {
        Ok(_) => {}
        // There already: being deleted (a teardown just before), it is made again once gone.
        Err(e) if error_code(&e) == Some("ResourceInUseException") => {
            let described = dynamodb.describe_table().table_name(name).send().await;
            let table = described.map_err(|e| classify("DescribeTable", e))?.table;
            if table.as_ref().and_then(|t| t.table_status.as_ref()) == Some(&TableStatus::Deleting) {
                dynamodb.wait_until_table_not_exists().table_name(name).wait(SETTLING).await.map_err(|e| waited(&e))?;
                request.send().await.map_err(|e| classify("CreateTable", e))?;
            } else if let Some(index) = &spec.index {
                let indexes = table.and_then(|t| t.global_secondary_indexes).unwrap_or_default();
                if !indexes.iter().any(|i| i.index_name.as_deref() == Some(index.name.as_str())) {
                    return Err(SluiceError::permanent(
                        ReasonCode::Misconfigured,
                        format!(
                            "table {name} exists without the index {} the workers query (made by an older \
                             sluice): add it, or tear the prefix down and bootstrap again",
                            index.name
                        ),
                    ));
                }
            }
        }
        Err(e) => return Err(classify("CreateTable", e)),
    }
    dynamodb.wait_until_table_exists().table_name(name).wait(SETTLING).await.map_err(|e| waited(&e))?;
    Ok(())
}
