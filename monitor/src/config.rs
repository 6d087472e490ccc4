//! `[monitor]`: the window, the thresholds and where alerts go.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// The rolling window every check looks at, in hours (default: seven days).
    pub window_hours: u64,
    /// Accuracy against true labels under which an alert goes out.
    #[serde(deserialize_with = "sluice_core::config::decimal")]
    pub accuracy_baseline: f64,
    /// Fewer labelled predictions in the window than this, and accuracy is not judged.
    pub min_labelled: u64,
    /// Population stability index over which a distribution has drifted (0.1 is commonly read
    /// as "some change", 0.2 as "a significant shift").
    #[serde(deserialize_with = "sluice_core::config::decimal")]
    pub psi_threshold: f64,
    /// Fewer captured predictions in the window than this, and drift is not judged.
    pub min_records: u64,
    /// The most records a pass reads from the window; past that, it judges a sample of them,
    /// chosen by record id (the monitor holds about a kilobyte a record it keeps).
    pub max_records: usize,
    /// How often `sluice monitor --watch` runs the checks.
    pub interval_s: u64,
    /// Alerts are POSTed here as Slack-compatible JSON (`{"text": …}`).
    pub webhook_url: Option<String>,
    /// Alerts are published to this SNS topic.
    pub sns_topic_arn: Option<String>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            window_hours: 7 * 24,
            accuracy_baseline: 0.85,
            min_labelled: 50,
            psi_threshold: 0.2,
            min_records: 100,
            max_records: 200_000,
            interval_s: 3600,
            webhook_url: None,
            sns_topic_arn: None,
        }
    }
}

impl MonitorConfig {
    /// Where the rolling window ending at `until_ms` starts.
    pub fn window_start(&self, until_ms: u64) -> u64 {
        until_ms.saturating_sub(self.window_hours.saturating_mul(3_600_000))
    }
}
