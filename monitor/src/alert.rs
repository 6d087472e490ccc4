//! Alerts: a check that crosses its threshold raises one alert, and no other until it has
//! come back (then one "resolved" notice). The state of each check is kept beside the capture
//! log, so a monitor run by cron or as an ECS scheduled task remembers what it already said.
//!
//! Every alert goes to the log and the metrics; to a webhook (Slack-compatible JSON) and an
//! SNS topic when configured. An alert that one of those could not take is not marked sent,
//! so the next run tries again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_core::backend::CaptureLog;
use sluice_core::config::AwsConfig;
use sluice_core::telemetry::metrics::metrics;
use sluice_core::{ReasonCode, Result, SluiceError};

use crate::MonitorConfig;

/// One threshold judged on one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// `accuracy`, `prediction_drift`, `confidence_drift`, `feature_drift`.
    pub name: String,
    pub value: Option<f64>,
    pub threshold: f64,
    /// `None`: not judged (too little data, no reference).
    pub breached: Option<bool>,
    /// Back within the threshold by a margin ([`resolves`]): what a firing alert needs to be
    /// over, so that a value hovering at the threshold does not fire and resolve by turns.
    pub clear: bool,
    /// What a person reading the alert needs: the numbers and what they are over.
    pub detail: String,
}

/// What the monitor has said so far, per check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    /// Checks in breach whose alert went out, with when.
    pub firing: BTreeMap<String, u64>,
}

/// Its name beside the capture log.
pub const STATE_DOCUMENT: &str = "alert-state.json";

impl AlertState {
    pub async fn load(log: &dyn CaptureLog) -> Result<Self> {
        match log.get_meta(STATE_DOCUMENT).await? {
            None => Ok(Self::default()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| SluiceError::permanent(ReasonCode::SchemaMismatch, format!("{STATE_DOCUMENT}: {e}"))),
        }
    }

    pub async fn save(&self, log: &dyn CaptureLog) -> Result<()> {
        log.put_meta(STATE_DOCUMENT, serde_json::to_vec_pretty(self).expect("state serialises")).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

/// A crossing, one way or the other.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub check: String,
    pub status: AlertStatus,
    pub value: Option<f64>,
    pub threshold: f64,
    pub text: String,
}

/// How far back within its threshold a firing check must come to resolve: accuracy a point
/// over its baseline, a PSI under four fifths of its threshold.
pub mod resolves {
    pub const ACCURACY_MARGIN: f64 = 0.01;
    pub const PSI_SHARE: f64 = 0.8;
}

/// The crossings `checks` make from `state`: a breach not yet alerted, or an alerted one that
/// is clearly over. Checks not judged change nothing.
pub fn crossings(state: &AlertState, checks: &[Check], model: &str) -> Vec<Alert> {
    checks
        .iter()
        .filter_map(|check| {
            let status = match (check.breached, state.firing.contains_key(&check.name)) {
                (Some(true), false) => AlertStatus::Firing,
                (Some(false), true) if check.clear => AlertStatus::Resolved,
                _ => return None,
            };
            let text = match status {
                AlertStatus::Firing => {
                    format!("sluice: {model}: {} crossed its threshold: {}", check.name, check.detail)
                }
                AlertStatus::Resolved => {
                    format!("sluice: {model}: {} is back within its threshold: {}", check.name, check.detail)
                }
            };
            Some(Alert { check: check.name.clone(), status, value: check.value, threshold: check.threshold, text })
        })
        .collect()
}

/// Where alerts go besides the log and the metrics.
pub struct Notifier {
    webhook: Option<(reqwest::Client, String)>,
    sns: Option<(aws_sdk_sns::Client, String)>,
}

impl Notifier {
    pub async fn new(config: &MonitorConfig, aws: &AwsConfig) -> Self {
        let webhook = config.webhook_url.clone().map(|url| {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("an HTTP client with a timeout builds");
            (client, url)
        });
        let sns = match &config.sns_topic_arn {
            Some(arn) => {
                let shared = sluice_core::backend::aws::sdk_config(aws, aws.endpoint_url.as_deref()).await;
                Some((aws_sdk_sns::Client::new(&shared), arn.clone()))
            }
            None => None,
        };
        Self { webhook, sns }
    }

    /// Sends `alert` everywhere it goes; `Err` names what could not take it.
    pub async fn send(&self, alert: &Alert) -> std::result::Result<(), String> {
        match alert.status {
            AlertStatus::Firing => {
                tracing::warn!(check = %alert.check, value = alert.value, threshold = alert.threshold, "{}", alert.text)
            }
            AlertStatus::Resolved => tracing::info!(check = %alert.check, value = alert.value, "{}", alert.text),
        }
        let mut failed = Vec::new();
        if let Some((client, url)) = &self.webhook {
            let body = serde_json::json!({ "text": alert.text, "sluice": alert });
            match client.post(url).json(&body).send().await.and_then(reqwest::Response::error_for_status) {
                Ok(_) => {}
                // Named by its host: a webhook's URL is its secret (anyone who has it can post),
                // and the error goes to the log, the exit message and `--json`.
                Err(e) => failed.push(format!("webhook ({}): {}", host_of(url), e.without_url())),
            }
        }
        if let Some((client, arn)) = &self.sns {
            let message = serde_json::to_string(alert).expect("an alert serialises");
            let subject: String = format!("sluice alert: {}", alert.check).chars().take(100).collect();
            if let Err(e) = client.publish().topic_arn(arn).subject(subject).message(message).send().await {
                failed.push(format!("SNS: {}", sluice_core::backend::aws::display_chain(&e)));
            }
        }
        if failed.is_empty() { Ok(()) } else { Err(failed.join("; ")) }
    }
}

/// The host a URL names, for messages that must not show the whole of it.
fn host_of(url: &str) -> String {
    reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_else(|| "?".to_owned())
}

/// Sends each crossing and records in `state` the ones that went out.
pub async fn notify(state: &mut AlertState, alerts: &[Alert], notifier: &Notifier, now_ms: u64) -> Vec<String> {
    let mut failures = Vec::new();
    for alert in alerts {
        match notifier.send(alert).await {
            // Counted once it went out: one undelivered is sent again by every pass until it is.
            Ok(()) => match alert.status {
                AlertStatus::Firing => {
                    metrics().monitor_alert(&alert.check, true);
                    state.firing.insert(alert.check.clone(), now_ms);
                }
                AlertStatus::Resolved => {
                    metrics().monitor_alert(&alert.check, false);
                    state.firing.remove(&alert.check);
                }
            },
            Err(e) => {
                tracing::error!(check = %alert.check, error = %e, "alert not delivered; the next run tries again");
                failures.push(format!("{}: {e}", alert.check));
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, breached: Option<bool>) -> Check {
        let clear = breached == Some(false);
        Check { name: name.into(), value: Some(0.5), threshold: 0.85, breached, clear, detail: "d".into() }
    }

    /// A webhook that cannot be reached is named by its host: its URL (whose path is the secret
    /// of a Slack-style hook) goes to no log or message.
    #[tokio::test]
    async fn a_webhook_that_fails_is_named_by_its_host_not_its_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let webhook_url = Some(format!("http://127.0.0.1:{port}/services/T000/SECRET"));
        let notifier =
            Notifier::new(&MonitorConfig { webhook_url, ..MonitorConfig::default() }, &AwsConfig::default()).await;
        let alert = crossings(&AlertState::default(), &[check("accuracy", Some(true))], "m").remove(0);
        let error = notifier.send(&alert).await.unwrap_err();
        assert!(error.starts_with("webhook (127.0.0.1): "), "{error}");
        assert!(!error.contains("SECRET") && !error.contains("services"), "{error}");
    }

    #[test]
    fn one_alert_per_crossing_and_one_notice_when_it_is_over() {
        let mut state = AlertState::default();
        let alerts = crossings(&state, &[check("accuracy", Some(true)), check("prediction_drift", Some(false))], "m");
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].status, AlertStatus::Firing);
        state.firing.insert("accuracy".into(), 1);
        assert!(crossings(&state, &[check("accuracy", Some(true))], "m").is_empty(), "no storm");
        assert!(crossings(&state, &[check("accuracy", None)], "m").is_empty(), "not judged: no change");
        // Back within, but not by the margin: still firing, no notice.
        let hovering = Check { clear: false, ..check("accuracy", Some(false)) };
        assert!(crossings(&state, &[hovering], "m").is_empty(), "no flapping at the threshold");
        let over = crossings(&state, &[check("accuracy", Some(false))], "m");
        assert_eq!(over[0].status, AlertStatus::Resolved);
    }
}
