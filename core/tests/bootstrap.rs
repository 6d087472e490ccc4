//! `sluice aws bootstrap` against the local AWS stand-in: run again it is harmless; run with
//! other queue settings it says which queue and which settings, and changes nothing; a prefix S3
//! would refuse is refused before anything is made.

use sluice_core::backend::aws::bootstrap::{bootstrap, check};
use sluice_core::testing::{aws_store_config, unique_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_again_is_harmless_and_other_settings_are_named() {
    let config = aws_store_config(&unique_prefix("boot"));
    let made = bootstrap(&config).await.unwrap();
    assert_eq!(bootstrap(&config).await.unwrap().queues, made.queues);

    let stricter = sluice_core::config::StoreConfig { max_receives: config.max_receives + 2, ..config.clone() };
    let err = bootstrap(&stricter).await.unwrap_err().to_string();
    assert!(err.contains(&format!("queue {}-features exists with other settings", config.aws.prefix)), "{err}");
    assert!(err.contains("RedrivePolicy"), "{err}");
    assert!(!err.contains("VisibilityTimeout is"), "only what differs is named: {err}");
    check(&config).await.unwrap();
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
