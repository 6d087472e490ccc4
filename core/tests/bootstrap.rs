//! `sluice aws bootstrap` against the local AWS stand-in: run again it is harmless; run with
//! other queue settings it says which queue and which settings, and changes nothing; a prefix S3
//! would refuse is refused before anything is made.

use aws_sdk_sqs::types::QueueAttributeName;
use sluice_core::backend::Backend;
use sluice_core::backend::aws::Clients;
use sluice_core::backend::aws::bootstrap::{bootstrap, check, teardown};
use sluice_core::testing::{aws_store_config, unique_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_again_is_harmless_and_other_settings_are_named() {
    let config = aws_store_config(&unique_prefix("boot"));
    let made = bootstrap(&config).await.unwrap();
    assert_eq!(bootstrap(&config).await.unwrap().queues, made.queues);

    // A work queue keeps a message less long than its DLQ (which keeps the message's first
    // enqueue time), as the CDK data stack has it.
    let clients = Clients::load(&config.aws, Default::default()).await.unwrap();
    let retention = |queue: &'static str| {
        let (sqs, name) = (clients.sqs.clone(), format!("{}-{queue}", config.aws.prefix));
        async move {
            let url = sqs.get_queue_url().queue_name(name).send().await.unwrap().queue_url.unwrap();
            let attributes = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::MessageRetentionPeriod)
                .send()
                .await
                .unwrap();
            attributes.attributes.unwrap()[&QueueAttributeName::MessageRetentionPeriod].parse::<u64>().unwrap()
        }
    };
    assert_eq!(retention("features").await, 14 * 24 * 3600);
    assert_eq!(retention("features-dlq").await, 14 * 24 * 3600);
    assert_eq!(retention("review").await, 14 * 24 * 3600);

    let stricter = sluice_core::config::StoreConfig { max_receives: config.max_receives + 2, ..config.clone() };
    let err = bootstrap(&stricter).await.unwrap_err().to_string();
    assert!(err.contains(&format!("queue {}-features exists with other settings", config.aws.prefix)), "{err}");
    assert!(err.contains("RedrivePolicy"), "{err}");
    assert!(!err.contains("VisibilityTimeout is"), "only what differs is named: {err}");
    check(&config).await.unwrap();
    // Workers configured to give up later than the queues redrive are told so before they start.
    let err = check(&stricter).await.unwrap_err().to_string();
    let features = format!(
        "queue {}-features redrives after {} receives, the workers give up after {}",
        config.aws.prefix, config.max_receives, stricter.max_receives
    );
    assert!(err.contains("do not match the configuration") && err.contains(&features), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_s3_would_refuse_makes_nothing() {
    let mut config = aws_store_config(&unique_prefix("boot"));
    config.aws.prefix = config.aws.prefix.to_uppercase();
    let err = bootstrap(&config).await.unwrap_err().to_string();
    assert!(err.contains("which S3 refuses"), "{err}");
    let err = check(&config).await.unwrap_err().to_string();
    assert!(err.contains("incomplete") && err.contains("stream"), "nothing was made: {err}");
}

/// Outside us-east-1 S3 wants the bucket's region named: bootstrap there makes everything, and
/// says where. A results table made without the index the workers query is named, not passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_outside_us_east_1_and_a_table_of_an_older_shape() {
    let mut config = aws_store_config(&unique_prefix("region"));
    config.aws.region = Some("eu-west-1".to_owned());
    let made = bootstrap(&config).await.unwrap();
    assert_eq!(made.region, "eu-west-1");
    assert_eq!(check(&config).await.unwrap().bucket, made.bucket);
    teardown(&config).await.unwrap();

    let older = aws_store_config(&unique_prefix("older"));
    let clients = Clients::load(&older.aws, Default::default()).await.unwrap();
    let key = |name: &str| {
        (
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .unwrap(),
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .unwrap(),
        )
    };
    let (attribute, schema) = key("record_id");
    clients
        .dynamodb
        .create_table()
        .table_name(format!("{}-results", older.aws.prefix))
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .attribute_definitions(attribute)
        .key_schema(schema)
        .send()
        .await
        .unwrap();
    let err = bootstrap(&older).await.unwrap_err().to_string();
    assert!(err.contains(&format!("{}-results exists without the index", older.aws.prefix)), "{err}");
    teardown(&older).await.unwrap();
}

/// Teardown deletes all bootstrap made, the bucket's objects with it; run again, it finds
/// nothing; a stream CloudFormation made is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_deletes_what_bootstrap_made_and_no_stack() {
    let config = aws_store_config(&unique_prefix("down"));
    let made = bootstrap(&config).await.unwrap();
    let backend = Backend::open(&config).await.unwrap();
    backend.blobs.put(b"a claim-checked payload".to_vec()).await.unwrap();
    let done = teardown(&config).await.unwrap();
    assert_eq!(done.deleted.len(), 1 + made.queues.len() + made.tables.len() + 1, "{done:?}");
    assert!(done.absent.is_empty(), "{done:?}");
    let err = check(&config).await.unwrap_err().to_string();
    assert!(err.contains(&made.stream) && err.contains(&made.bucket), "{err}");
    let again = teardown(&config).await.unwrap();
    assert!(again.deleted.is_empty() && again.absent.len() == done.deleted.len(), "{again:?}");

    let stack = aws_store_config(&unique_prefix("stack"));
    bootstrap(&stack).await.unwrap();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(stack.aws.endpoint_url.clone().unwrap())
        .credentials_provider(aws_credential_types::Credentials::from_keys("testing", "testing", None))
        .load()
        .await;
    let kinesis = aws_sdk_kinesis::Client::new(&config);
    let stream = format!("{}-records", stack.aws.prefix);
    kinesis
        .add_tags_to_stream()
        .stream_name(&stream)
        .tags("aws:cloudformation:stack-name", "sluice-beta-data")
        .send()
        .await
        .unwrap();
    let err = teardown(&stack).await.unwrap_err().to_string();
    assert!(err.contains("cdk destroy") && err.contains("sluice-beta-data"), "{err}");
    check(&stack).await.unwrap();
}

/// A deployment whose resources are gone is no record's fault: the feature store, the queues,
/// the result store and sluice's own bucket say `misconfigured` (the worker stops,
/// dead-letters nothing), while a producer's claim-check to a bucket that is gone is that
/// record's `claim_check_rejected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_gone_are_a_misconfiguration_and_a_claim_check_stays_the_records() {
    use sluice_core::backend::OutgoingMessage;
    use sluice_core::envelope::RecordId;
    use sluice_core::topology::QueueName;
    use sluice_core::vector::FeatureVector;
    use sluice_core::{ReasonCode, SluiceError};

    let mut config = aws_store_config(&unique_prefix("gone"));
    let producers = format!("{}-producers", config.aws.prefix);
    config.aws.claim_check_buckets = vec![producers.clone()];
    bootstrap(&config).await.unwrap();
    let backend = Backend::open(&config).await.unwrap();
    let reference = backend.blobs.put(b"a claim-checked payload".to_vec()).await.unwrap();
    teardown(&config).await.unwrap();

    let id = RecordId::parse("r-1").unwrap();
    let misconfigured = |what: &str, result: Result<(), SluiceError>| {
        let error = result.unwrap_err();
        assert!(!error.is_retryable() && error.code() == ReasonCode::Misconfigured, "{what}: {error}");
        assert!(error.detail().contains("sluice aws bootstrap"), "{what}: {error}");
    };
    let vector = FeatureVector::Values(vec![0.5; 4]);
    misconfigured("features", backend.features.put_if_absent(vec![(id.clone(), vector)]).await);
    misconfigured("results", backend.results.get_batch(std::slice::from_ref(&id)).await.map(drop));
    let message = OutgoingMessage { body: b"{}".to_vec(), ..Default::default() };
    misconfigured("queue", backend.queue(QueueName::Inference).send_batch(vec![message]).await.map(drop));

    misconfigured("own claim-check", backend.blobs.get(&reference).await.map(drop));
    let error = backend.blobs.get(&format!("s3://{producers}/photo.jpg")).await.unwrap_err();
    assert_eq!((error.is_retryable(), error.code()), (false, ReasonCode::ClaimCheckRejected), "{error}");
}

/// Producers write sluice's claim-check bucket too (`sluice produce`): an object there the
/// workers may not read when they may read the others (archived, or under a KMS key of the
/// producer's) is that record's `claim_check_rejected`, not a misconfiguration that would stop
/// ingest on it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_refused_alone_in_sluices_bucket_is_the_records_failure() {
    use aws_sdk_s3::types::StorageClass;
    use sluice_core::ReasonCode;

    let config = aws_store_config(&unique_prefix("refused"));
    bootstrap(&config).await.unwrap();
    let backend = Backend::open(&config).await.unwrap();
    let readable = backend.blobs.put(b"a claim-checked payload".to_vec()).await.unwrap();
    let archived = backend.blobs.put(b"another payload, archived".to_vec()).await.unwrap();
    let (bucket, key) = archived.strip_prefix("s3://").unwrap().split_once('/').unwrap();
    let s3 = Clients::load(&config.aws, Default::default()).await.unwrap().s3;
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .storage_class(StorageClass::Glacier)
        .body(b"another payload, archived".to_vec().into())
        .send()
        .await
        .unwrap();

    assert_eq!(backend.blobs.get(&readable).await.unwrap(), b"a claim-checked payload");
    let error = backend.blobs.get(&archived).await.unwrap_err();
    assert_eq!((error.is_retryable(), error.code()), (false, ReasonCode::ClaimCheckRejected), "{error}");
    assert!(error.detail().contains("GLACIER"), "{error}");
    teardown(&config).await.unwrap();
}

/// A feature vector too large for its item lives in S3, under claim-checks that the bucket
/// expires: one whose object is gone fails its own record (`missing_features`), not the batch
/// asking for it with others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_vector_whose_object_is_gone_fails_only_its_record() {
    use sluice_core::ReasonCode;
    use sluice_core::backend::aws::Names;
    use sluice_core::envelope::RecordId;
    use sluice_core::vector::FeatureVector;

    let config = aws_store_config(&unique_prefix("gone"));
    bootstrap(&config).await.unwrap();
    let backend = Backend::open(&config).await.unwrap();
    let (large, small) = (RecordId::parse("large").unwrap(), RecordId::parse("small").unwrap());
    let vectors = vec![
        (large.clone(), FeatureVector::Values(vec![0.25; 3 * 224 * 224])),
        (small.clone(), FeatureVector::Values(vec![0.5; 4])),
    ];
    backend.features.put_if_absent(vectors).await.unwrap();
    let s3 = Clients::load(&config.aws, Default::default()).await.unwrap().s3;
    let bucket = Names::new(&config.aws.prefix).bucket();
    let listed = s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
    for object in listed.contents() {
        s3.delete_object().bucket(&bucket).key(object.key().unwrap()).send().await.unwrap();
    }
    assert_eq!(listed.contents().len(), 1, "only the large vector went to S3");

    let got = backend.features.get_batch(&[large.clone(), small.clone()]).await.unwrap();
    let error = got[&large].as_ref().unwrap_err();
    assert_eq!((error.is_retryable(), error.code()), (false, ReasonCode::MissingFeatures), "{error}");
    assert_eq!(got[&small].as_ref().unwrap(), &FeatureVector::Values(vec![0.5; 4]));

    // A lower `store.aws.inline_vector_bytes` sends an ImageNet-sized image's pixels (147 KiB,
    // kept in its item by default) to S3 too, trading write units for two requests.
    let mut lower = config.clone();
    lower.aws.inline_vector_bytes = 100_000;
    let pixels = FeatureVector::Pixels(vec![7; 3 * 224 * 224]);
    let photo = RecordId::parse("photo").unwrap();
    Backend::open(&lower).await.unwrap().features.put_if_absent(vec![(photo.clone(), pixels.clone())]).await.unwrap();
    let listed = s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
    assert_eq!(listed.contents().len(), 1, "the photo's vector went to S3");
    assert_eq!(
        backend.features.get_batch(std::slice::from_ref(&photo)).await.unwrap()[&photo].as_ref().unwrap(),
        &pixels
    );
    teardown(&config).await.unwrap();
}

/// Feature vectors expire (DynamoDB TTL) once no replay could want them: bootstrap turns the
/// features table's TTL on, on the attribute the features stage writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_vectors_expire() {
    use sluice_core::backend::aws::Names;
    use sluice_core::envelope::{RecordId, now_ms};
    use sluice_core::vector::FeatureVector;

    let config = aws_store_config(&unique_prefix("ttl"));
    assert_eq!(
        config.aws.feature_ttl_days, 30,
        "longer than a work queue and then its DLQ keep a message (14 days each)"
    );
    bootstrap(&config).await.unwrap();
    let dynamodb = Clients::load(&config.aws, Default::default()).await.unwrap().dynamodb;
    let table = Names::new(&config.aws.prefix).features_table();
    let ttl = dynamodb.describe_time_to_live().table_name(&table).send().await.unwrap();
    let ttl = ttl.time_to_live_description.unwrap();
    assert_eq!(ttl.attribute_name(), Some("expires_at"));

    let backend = Backend::open(&config).await.unwrap();
    let id = RecordId::parse("expiring").unwrap();
    backend.features.put_if_absent(vec![(id.clone(), FeatureVector::Values(vec![0.5; 4]))]).await.unwrap();
    let item = dynamodb
        .get_item()
        .table_name(&table)
        .key("record_id", aws_sdk_dynamodb::types::AttributeValue::S(id.to_string()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let expires: u64 = item["expires_at"].as_n().unwrap().parse().unwrap();
    let days = (expires - now_ms() / 1000) as f64 / 86_400.0;
    assert!((29.9..=30.0).contains(&days), "{days} days");
    teardown(&config).await.unwrap();
}
