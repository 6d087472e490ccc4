//! The AWS backend: the stream on Kinesis (with KCL-style leases in DynamoDB), queues on SQS,
//! the feature and result stores on DynamoDB, claim-checks on S3. Same traits, same conformance
//! suite as the embedded store; chosen with `[store] backend = "aws"`.
//!
//! The SDK's own retry policy handles throttling and transient errors of each call; sluice adds
//! retries only where the SDK cannot (records a batch call left unprocessed).

mod accounting;
pub mod bootstrap;
mod capture;
mod dynamodb;
mod kinesis;
mod lease_coordinator;
mod resources;
mod s3;
mod sqs;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use aws_config::{BehaviorVersion, Region};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

pub use accounting::{RequestCounter, requests_moving_records};
pub use resources::Names;

use super::{Backend, WorkQueue};
use crate::config::{AwsConfig, StoreConfig};
use crate::error::{ReasonCode, Result, SluiceError};
use crate::topology::{QueueName, StageName};

/// The pipeline's AWS requests in this process, whichever backend handle sent them.
static REQUESTS: LazyLock<RequestCounter> = LazyLock::new(RequestCounter::default);

/// The pipeline's request counts in this process so far (observers' requests not included).
pub fn requests() -> &'static RequestCounter {
    &REQUESTS
}

/// What this process has already added to the shared ledger.
static FLUSHED: LazyLock<tokio::sync::Mutex<BTreeMap<String, u64>>> = LazyLock::new(Default::default);

/// Adds this process's pipeline requests since the last flush to `ledger`. Whichever worker
/// loop of the process calls it, each request is added once.
pub async fn flush_requests(ledger: &dyn super::RequestLedger) -> Result<()> {
    let mut flushed = FLUSHED.lock().await;
    let now = requests().snapshot();
    let delta: BTreeMap<String, u64> = now
        .iter()
        .map(|(k, n)| (k.clone(), n - flushed.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    if delta.is_empty() {
        return Ok(());
    }
    ledger.add(delta).await?;
    *flushed = now;
    Ok(())
}

/// The SDK clients, configured once, all counting their requests.
#[derive(Clone)]
pub struct Clients {
    pub kinesis: aws_sdk_kinesis::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub s3: aws_sdk_s3::Client,
}

impl Clients {
    /// Loads the standard credential chain and region, pointed at `endpoint_url` if set; every
    /// request is counted in `counter`. With no credentials to be found at all, an error at once
    /// that says what to set: no call would find any later either, and a worker should stop, not
    /// retry each call for ever. (A provider that fails or times out, an ECS task role's endpoint
    /// say, is left to the calls: it is worth another try.)
    pub async fn load(config: &AwsConfig, counter: RequestCounter) -> Result<Self> {
        let shared = sdk_config(config, config.endpoint_url.as_deref()).await;
        if let Some(provider) = shared.credentials_provider() {
            use aws_credential_types::provider::{ProvideCredentials as _, error::CredentialsError};
            if let Err(error @ CredentialsError::CredentialsNotLoaded(_)) = provider.provide_credentials().await {
                return Err(SluiceError::permanent(
                    ReasonCode::Misconfigured,
                    format!(
                        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or \
                         give the task a role ({})",
                        display_chain(&error)
                    ),
                ));
            }
        }
        Ok(Self {
            kinesis: {
                let mut kinesis = aws_sdk_kinesis::config::Builder::from(&shared).interceptor(counter.clone());
                if let Some(url) = &config.kinesis_endpoint_url {
                    kinesis = kinesis.endpoint_url(url);
                }
                aws_sdk_kinesis::Client::from_conf(kinesis.build())
            },
            sqs: aws_sdk_sqs::Client::from_conf(
                aws_sdk_sqs::config::Builder::from(&shared).interceptor(counter.clone()).build(),
            ),
            dynamodb: aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::config::Builder::from(&shared).interceptor(counter.clone()).build(),
            ),
            // Local endpoints serve buckets by path, not by virtual host.
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&shared)
                    .force_path_style(config.endpoint_url.is_some())
                    .interceptor(counter)
                    .build(),
            ),
        })
    }

    /// The region the clients call (the credential chain's, unless set; us-east-1 at the last).
    pub fn region(&self) -> String {
        self.s3.config().region().map_or_else(|| "us-east-1".to_owned(), |r| r.as_ref().to_owned())
    }
}

/// How long one attempt of any call may take before it fails (and is tried again, as a timeout
/// is): the SDK sets none, and a call that hangs would hold its batch, and its records, for as
/// long as the heartbeat keeps it. Well above the longest a call takes when all is well: a 20 s
/// long poll, a 32 MiB claim-checked object, a SageMaker invocation (60 s at most).
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);
/// The SDK's own default for connecting.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(3_100);

/// The SDK configuration every client of the pipeline starts from: the standard credential
/// chain and region (static keys and region from `config` where set, `us-east-1` when nothing
/// names one), pointed at `endpoint_url` if given, each attempt of a call timed out after
/// [`ATTEMPT_TIMEOUT`].
pub async fn sdk_config(config: &AwsConfig, endpoint_url: Option<&str>) -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(timeouts);
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
        loader = loader.credentials_provider(aws_credential_types::Credentials::from_keys(id, secret.expose(), None));
    }
    let shared = loader.load().await;
    if shared.region().is_some() {
        return shared;
    }
    shared.into_builder().region(Region::from_static("us-east-1")).build()
}

/// Opens the AWS backend; its resources must exist (`sluice aws bootstrap` creates them).
/// Its requests are counted in `counter`.
pub async fn open(config: &StoreConfig, counter: RequestCounter) -> Result<Backend> {
    let aws = &config.aws;
    let clients = Clients::load(aws, counter).await?;
    let names = Names::new(&aws.prefix);
    let blobs = Arc::new(s3::S3BlobStore::new(clients.s3.clone(), names.bucket(), &aws.claim_check_buckets));
    let queue = |name| sqs::SqsQueue::new(clients.sqs.clone(), name, names.queue(name), Arc::clone(&blobs));
    let mut queues: BTreeMap<QueueName, Arc<dyn WorkQueue>> = BTreeMap::new();
    for stage in StageName::ALL {
        let dlq = Arc::new(queue(stage.dlq()));
        if let Some(input) = stage.input_queue() {
            queues.insert(input, Arc::new(queue(input).read_by(stage, Arc::clone(&dlq))));
        }
        queues.insert(stage.dlq(), dlq);
    }
    for name in QueueName::ALL {
        queues.entry(name).or_insert_with(|| Arc::new(queue(name)));
    }
    Ok(Backend {
        stream: Arc::new(kinesis::KinesisStream::new(clients.clone(), &names, config)),
        features: Arc::new(dynamodb::DynamoFeatureStore::new(
            clients.dynamodb.clone(),
            names.features_table(),
            Arc::clone(&blobs),
            aws,
        )),
        results: Arc::new(dynamodb::DynamoResultStore::new(
            clients.dynamodb.clone(),
            names.results_table(),
            names.counters_table(),
            aws.result_ttl_days,
        )),
        requests: Arc::new(dynamodb::DynamoRequestLedger::new(clients.dynamodb.clone(), names.counters_table())),
        capture: Arc::new(capture::S3CaptureLog::new(clients.s3.clone(), names.bucket())),
        blobs,
        kind: crate::config::BackendKind::Aws,
        queues: Arc::new(queues),
    })
}

/// How many of one batch's calls (a `SendMessageBatch` or `DeleteMessageBatch` per ten messages,
/// a `BatchWriteItem` per 25 items, a `BatchGetItem` per 100 keys) are in flight at once. The
/// request count is the same, but a batch of 200 messages goes out in the time of five calls,
/// not twenty, and lands downstream at once: the next stage receives it whole rather than ten
/// at a time as the calls trickle in, so it makes fewer receives and writes (docs/benchmarks.md:
/// 1.04–1.11 → 1.00–1.02 requests per record for the demo's moving part). More at once gained
/// nothing on the local stand-in, whose single Python process is the bottleneck there.
const CONCURRENT_CALLS: usize = 4;

/// The `calls` (one future a chunk of a batch), up to [`CONCURRENT_CALLS`] at a time; what they
/// return, in no particular order, or the first error (calls already made stay made: every
/// caller's batch is redone whole on an error, and every sink is idempotent).
pub(super) async fn concurrently<R, Fut>(calls: impl IntoIterator<Item = Fut>) -> Result<Vec<R>>
where
    Fut: Future<Output = Result<R>>,
{
    use futures_util::{StreamExt as _, TryStreamExt as _};
    // Collected first: a lazily mapped iterator inside the stream trips the compiler's check
    // that the caller's (`async_trait`, `Send`) future is Send for every lifetime.
    let calls: Vec<Fut> = calls.into_iter().collect();
    futures_util::stream::iter(calls).buffer_unordered(CONCURRENT_CALLS).try_collect().await
}

/// Error codes that mean "slow down or try again".
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "PriorRequestNotComplete",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalServerError",
    "InternalFailure",
    "InternalError",
    "TransactionConflictException",
    // A transaction retried with its idempotency token while the first try still runs.
    "TransactionInProgressException",
    // SQS: 120,000 messages in flight on one queue; some will be acknowledged.
    "OverLimit",
    "KMSThrottlingException",
    "KMS.ThrottlingException",
    "KmsThrottled",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Whether an AWS answer's HTTP status is worth another try whatever its error code says: a 5xx
/// or a 429 (a proxy's or a load balancer's answer may carry no code, or one of its own).
pub fn transient_status(status: u16) -> bool {
    status >= 500 || status == 429
}

/// Classifies an SDK failure: transport trouble, throttling and 5xx are retryable; the rest
/// (missing resources, bad requests, access denied) need a person.
pub(crate) fn classify<E>(operation: &str, error: SdkError<E, HttpResponse>) -> SluiceError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown").to_owned();
            let message = service.err().message().unwrap_or_default().to_owned();
            let status = service.raw().status().as_u16();
            let detail = format!("{operation}: {code} ({status}): {message}");
            if RETRYABLE_CODES.contains(&code.as_str()) || transient_status(status) {
                SluiceError::retryable(ReasonCode::StoreBusy, detail)
            } else if let Some(hint) = misconfiguration(&code, status) {
                SluiceError::permanent(ReasonCode::Misconfigured, format!("{detail} ({hint})"))
            } else {
                SluiceError::permanent(ReasonCode::StoreUnavailable, detail)
            }
        }
        SdkError::ConstructionFailure(_) => {
            SluiceError::permanent(ReasonCode::Internal, format!("{operation}: {}", display_chain(&error)))
        }
        _ => SluiceError::retryable(ReasonCode::StoreUnavailable, format!("{operation}: {}", display_chain(&error))),
    }
}

/// What to look at when an answer is the deployment's to fix, not the request's: a resource
/// that is not there, or a caller refused. Retryable answers are matched before this.
pub fn misconfiguration(code: &str, status: u16) -> Option<&'static str> {
    if code.contains("NotFound") || code.contains("NonExistent") || matches!(code, "NoSuchBucket" | "QueueDoesNotExist")
    {
        Some("has `sluice aws bootstrap` created the resources?")
    } else if refused(code, status) {
        Some("do the task's role and its keys allow this call?")
    } else {
        None
    }
}

/// Whether an answer refuses the caller rather than the request: credentials, permissions, a
/// KMS key (KMSThrottlingException is retryable, and matched before this).
fn refused(code: &str, status: u16) -> bool {
    matches!(status, 401 | 403)
        || code.ends_with("AccessDenied")
        || code.ends_with("AccessDeniedException")
        || code.starts_with("KMS")
        || code.starts_with("Kms")
        || matches!(
            code,
            "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "MissingAuthenticationToken"
                | "IncompleteSignature"
                | "ExpiredToken"
                | "ExpiredTokenException"
                | "InvalidSecurity"
        )
}

/// An error and its sources, on one line.
pub fn display_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// The service error code of an SDK failure, if the service answered.
pub(crate) fn error_code<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> Option<&str> {
    match error {
        SdkError::ServiceError(service) => service.err().code(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    use super::*;

    /// What sluice makes of AWS answering `code` with `status`.
    fn answer(code: &str, status: u16) -> SluiceError {
        let error = SendMessageBatchError::generic(ErrorMetadata::builder().code(code).message("no").build());
        let raw = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        classify("SendMessageBatch", SdkError::service_error(error, raw))
    }

    #[test]
    fn answers_that_refuse_the_deployment_are_misconfigurations() {
        assert!(answer("ThrottlingException", 400).is_retryable());
        for kms_busy in ["KMSThrottlingException", "KMS.ThrottlingException", "KmsThrottled"] {
            assert!(answer(kms_busy, 400).is_retryable(), "{kms_busy}");
        }
        assert!(answer("Gateway", 504).is_retryable());
        for busy in ["TransactionInProgressException", "OverLimit", "RequestTimeoutException"] {
            assert!(answer(busy, 400).is_retryable(), "{busy}");
        }
        for (code, status) in [
            ("AccessDeniedException", 400),
            ("AccessDenied", 403),
            ("UnrecognizedClientException", 400),
            ("ResourceNotFoundException", 400),
            ("QueueDoesNotExist", 400),
            ("KMSDisabledException", 400),
            ("RequestTimeTooSkewed", 403),
        ] {
            let e = answer(code, status);
            assert!(!e.is_retryable() && e.is_misconfiguration(), "{code}: {e}");
        }
        // A request that is wrong is the record's to answer for (its stage's DLQ).
        let e = answer("ValidationException", 400);
        assert_eq!((e.is_retryable(), e.code()), (false, ReasonCode::StoreUnavailable), "{e}");
    }
}
