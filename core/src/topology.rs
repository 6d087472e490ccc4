//! The fixed shape of the pipeline: its stages and the queues between them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of the four stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageName {
    Ingest,
    Features,
    Inference,
    Results,
}

impl StageName {
    pub const ALL: [StageName; 4] = [Self::Ingest, Self::Features, Self::Inference, Self::Results];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Features => "features",
            Self::Inference => "inference",
            Self::Results => "results",
        }
    }

    /// The queue this stage consumes; ingest consumes the stream instead.
    pub fn input_queue(self) -> Option<QueueName> {
        match self {
            Self::Ingest => None,
            Self::Features => Some(QueueName::Features),
            Self::Inference => Some(QueueName::Inference),
            Self::Results => Some(QueueName::Results),
        }
    }

    /// Where this stage's permanent failures go.
    pub fn dlq(self) -> QueueName {
        match self {
            Self::Ingest => QueueName::IngestDlq,
            Self::Features => QueueName::FeaturesDlq,
            Self::Inference => QueueName::InferenceDlq,
            Self::Results => QueueName::ResultsDlq,
        }
    }
}

impl fmt::Display for StageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StageName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|stage| stage.as_str() == s)
            .ok_or_else(|| format!("unknown stage {s:?}: expected ingest, features, inference or results"))
    }
}

/// Every queue of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueName {
    Features,
    Inference,
    Results,
    /// Low-confidence predictions, for people to look at.
    Review,
    IngestDlq,
    FeaturesDlq,
    InferenceDlq,
    ResultsDlq,
}

impl QueueName {
    pub const ALL: [QueueName; 8] = [
        Self::Features,
        Self::Inference,
        Self::Results,
        Self::Review,
        Self::IngestDlq,
        Self::FeaturesDlq,
        Self::InferenceDlq,
        Self::ResultsDlq,
    ];

    /// Queues that must be empty for the pipeline to count as drained.
    pub const WORK: [QueueName; 3] = [Self::Features, Self::Inference, Self::Results];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Features => "features",
            Self::Inference => "inference",
            Self::Results => "results",
            Self::Review => "review",
            Self::IngestDlq => "ingest-dlq",
            Self::FeaturesDlq => "features-dlq",
            Self::InferenceDlq => "inference-dlq",
            Self::ResultsDlq => "results-dlq",
        }
    }

    /// The dead-letter queue a message moves to after `max_receives` receives, if any.
    pub fn redrive_target(self) -> Option<QueueName> {
        match self {
            Self::Features => Some(Self::FeaturesDlq),
            Self::Inference => Some(Self::InferenceDlq),
            Self::Results => Some(Self::ResultsDlq),
            _ => None,
        }
    }

    /// The stage whose failures a DLQ holds.
    pub fn dlq_stage(self) -> Option<StageName> {
        StageName::ALL.into_iter().find(|stage| stage.dlq() == self)
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_work_queue_redrives_to_its_stage_dlq() {
        for stage in StageName::ALL {
            if let Some(queue) = stage.input_queue() {
                assert_eq!(queue.redrive_target(), Some(stage.dlq()));
            }
            assert_eq!(stage.dlq().dlq_stage(), Some(stage));
            assert_eq!(stage.as_str().parse::<StageName>().unwrap(), stage);
        }
    }
}
