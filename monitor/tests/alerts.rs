//! Alert delivery: to a webhook (Slack-compatible JSON) and to an SNS topic on the AWS
//! stand-in; an alert a destination refused is not marked sent, so the next pass tries again.

use std::sync::{Arc, Mutex};

use sluice_core::config::AwsConfig;
use sluice_monitor::MonitorConfig;
use sluice_monitor::alert::{Alert, AlertState, AlertStatus, Notifier, notify};

/// A receiver on 127.0.0.1 that keeps what is posted and answers `status`.
async fn receiver(status: u16) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let posts: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let kept = Arc::clone(&posts);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let kept = Arc::clone(&kept);
            async move {
                kept.lock().unwrap().push(body);
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, posts)
}

fn alert() -> Alert {
    Alert {
        check: "accuracy".into(),
        status: AlertStatus::Firing,
        value: Some(0.61),
        threshold: 0.85,
        text: "sluice: m: accuracy crossed its threshold".into(),
    }
}

async fn webhook_notifier(url: String) -> Notifier {
    Notifier::new(&MonitorConfig { webhook_url: Some(url), ..MonitorConfig::default() }, &AwsConfig::default()).await
}

#[tokio::test]
async fn a_refused_alert_is_not_marked_sent() {
    let (url, posts) = receiver(503).await;
    let mut state = AlertState::default();
    let failures = notify(&mut state, &[alert()], &webhook_notifier(url).await, 1).await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(state.firing.is_empty(), "not sent, so not firing: the next pass sends it");
    assert_eq!(posts.lock().unwrap().len(), 1);

    let (url, posts) = receiver(200).await;
    assert!(notify(&mut state, &[alert()], &webhook_notifier(url).await, 2).await.is_empty());
    assert_eq!(state.firing.get("accuracy"), Some(&2));
    let body = posts.lock().unwrap()[0].clone();
    assert_eq!(body["text"], "sluice: m: accuracy crossed its threshold", "Slack reads `text`");
    assert_eq!(body["sluice"]["value"], 0.61);
}

#[tokio::test]
async fn alerts_are_published_to_an_sns_topic() {
    let aws = sluice_core::testing::aws_store_config("unused").aws;
    let shared = sluice_core::backend::aws::sdk_config(&aws, aws.endpoint_url.as_deref()).await;
    let (sns, sqs) = (aws_sdk_sns::Client::new(&shared), aws_sdk_sqs::Client::new(&shared));
    let name = sluice_core::testing::unique_prefix("alerts");
    let topic = sns.create_topic().name(&name).send().await.unwrap().topic_arn.unwrap();
    let queue = sqs.create_queue().queue_name(&name).send().await.unwrap().queue_url.unwrap();
    let arn_attribute = aws_sdk_sqs::types::QueueAttributeName::QueueArn;
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&queue)
        .attribute_names(arn_attribute.clone())
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap();
    sns.subscribe().topic_arn(&topic).protocol("sqs").endpoint(&attributes[&arn_attribute]).send().await.unwrap();

    let config = MonitorConfig { sns_topic_arn: Some(topic), ..MonitorConfig::default() };
    let notifier = Notifier::new(&config, &aws).await;
    let mut state = AlertState::default();
    assert!(notify(&mut state, &[alert()], &notifier, 1).await.is_empty());
    let received = sqs.receive_message().queue_url(&queue).wait_time_seconds(5).send().await.unwrap();
    let envelope: serde_json::Value = serde_json::from_str(received.messages()[0].body().unwrap()).unwrap();
    assert_eq!(envelope["Subject"], "sluice alert: accuracy");
    let message: serde_json::Value = serde_json::from_str(envelope["Message"].as_str().unwrap()).unwrap();
    assert_eq!((message["check"].as_str(), message["status"].as_str()), (Some("accuracy"), Some("firing")));
}
