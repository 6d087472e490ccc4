//! What the pipeline's AWS resources are called and keyed by: `resources.json`, which the CDK
//! app in `deploy/cdk` reads too, so the stack makes exactly what the workers look for.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::Deserialize;

use crate::topology::QueueName;

/// `resources.json`, parsed once.
#[derive(Debug, Deserialize)]
struct Resources {
    stream: String,
    queues: BTreeMap<String, String>,
    tables: Tables,
    bucket: String,
    claim_check_key_prefix: String,
    capture_key_prefix: String,
    monitor_key_prefix: String,
}

#[derive(Debug, Deserialize)]
struct Tables {
    features: Table,
    results: Table,
    leases: Table,
    counters: Table,
}

/// A DynamoDB table: its name after the prefix and its string hash key.
#[derive(Debug, Deserialize)]
pub(super) struct Table {
    pub(super) name: String,
    pub(super) key: String,
    pub(super) ttl_attribute: Option<String>,
    /// A global secondary index, both keys strings.
    pub(super) index: Option<Index>,
}

/// A global secondary index: the results by status, in the order they were stored
/// (`created_key` is the store time, zero-padded, then the record id: unique and sortable).
#[derive(Debug, Deserialize)]
pub(super) struct Index {
    pub(super) name: String,
    pub(super) partition: String,
    pub(super) sort: String,
}

/// The results table's index by status and store time.
pub(super) fn results_index() -> &'static Index {
    RESOURCES.tables.results.index.as_ref().expect("resources.json gives the results table its index")
}

static RESOURCES: LazyLock<Resources> = LazyLock::new(|| {
    serde_json::from_str(include_str!("resources.json")).expect("resources.json is valid (unit-tested)")
});

/// Resource names derived from the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// Whether every name made from the prefix is one AWS takes. The bucket's are the strictest
    /// (S3: 3 to 63 lowercase letters, digits and hyphens), so the prefix keeps to them, short
    /// enough for `<prefix>-claims`. Checked before anything is created, so that a prefix S3
    /// refuses does not leave a stream, queues and tables behind.
    pub fn check(&self) -> Result<(), String> {
        let longest = 63 - RESOURCES.bucket.len() - 1;
        let fits = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        let prefix = &self.prefix;
        if prefix.is_empty() || prefix.len() > longest || !prefix.chars().all(fits) || prefix.starts_with('-') {
            return Err(format!(
                "the prefix {prefix:?} would name the bucket {:?}, which S3 refuses: a prefix is 1 to {longest} \
                 lowercase letters, digits and hyphens, and starts with a letter or digit",
                self.bucket()
            ));
        }
        Ok(())
    }

    fn named(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn stream(&self) -> String {
        self.named(&RESOURCES.stream)
    }

    pub fn queue(&self, queue: QueueName) -> String {
        self.named(&RESOURCES.queues[queue.as_str()])
    }

    pub fn features_table(&self) -> String {
        self.named(&RESOURCES.tables.features.name)
    }

    pub fn results_table(&self) -> String {
        self.named(&RESOURCES.tables.results.name)
    }

    pub fn lease_table(&self) -> String {
        self.named(&RESOURCES.tables.leases.name)
    }

    /// Counters the pipeline keeps for itself (results by status, AWS requests).
    pub fn counters_table(&self) -> String {
        self.named(&RESOURCES.tables.counters.name)
    }

    pub fn bucket(&self) -> String {
        self.named(&RESOURCES.bucket)
    }

    /// Every table with its name, in the order bootstrap creates them.
    pub(super) fn tables(&self) -> [(String, &'static Table); 4] {
        let tables = &RESOURCES.tables;
        [&tables.features, &tables.results, &tables.leases, &tables.counters].map(|t| (self.named(&t.name), t))
    }
}

/// Where claim-checks and offloaded vectors go in the bucket (the stack expires them there).
pub(super) fn claim_check_key_prefix() -> &'static str {
    &RESOURCES.claim_check_key_prefix
}

/// Where the results stage writes prediction capture objects in the bucket.
pub(super) fn capture_key_prefix() -> &'static str {
    &RESOURCES.capture_key_prefix
}

/// Where the monitor keeps its alert state and reference statistics in the bucket.
pub(super) fn monitor_key_prefix() -> &'static str {
    &RESOURCES.monitor_key_prefix
}

/// The attribute DynamoDB's TTL reads on the results table.
pub(super) fn result_ttl_attribute() -> &'static str {
    RESOURCES.tables.results.ttl_attribute.as_deref().expect("resources.json names the results TTL attribute")
}

/// The attribute DynamoDB's TTL reads on the features table.
pub(super) fn feature_ttl_attribute() -> &'static str {
    RESOURCES.tables.features.ttl_attribute.as_deref().expect("resources.json names the features TTL attribute")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_and_table_has_a_name() {
        assert_eq!(RESOURCES.queues.len(), QueueName::ALL.len());
        let names = Names::new("p");
        for queue in QueueName::ALL {
            assert_eq!(names.queue(queue), format!("p-{queue}"));
        }
        assert_eq!(names.stream(), "p-records");
        assert_eq!(names.bucket(), "p-claims");
        assert_eq!(names.tables().map(|(name, _)| name), ["p-features", "p-results", "p-leases", "p-counters"]);
        assert_eq!(result_ttl_attribute(), "expires_at");
        assert_eq!(feature_ttl_attribute(), "expires_at");
        assert!(claim_check_key_prefix().ends_with('/'));
    }

    #[test]
    fn a_prefix_makes_names_aws_takes() {
        for good in ["p", "team-a", "sluice-demo-1a2b3c4d", &"x".repeat(56)] {
            assert_eq!(Names::new(good).check(), Ok(()), "{good}");
        }
        for bad in ["", "MyTeam", "team_a", "-team", "team.a", &"x".repeat(57)] {
            let err = Names::new(bad).check().unwrap_err();
            assert!(err.contains("which S3 refuses"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_stores_use_the_keys_named_here() {
        let tables = &RESOURCES.tables;
        assert_eq!(tables.leases.key, super::super::lease_coordinator::LEASE_KEY);
        assert_eq!(tables.counters.key, super::super::dynamodb::COUNTER_KEY);
        assert_eq!(tables.features.key, super::super::dynamodb::RECORD_KEY);
        assert_eq!(tables.results.key, super::super::dynamodb::RECORD_KEY);
    }

    #[test]
    fn the_redrive_map_is_the_topology() {
        let json: serde_json::Value = serde_json::from_str(include_str!("resources.json")).unwrap();
        for queue in QueueName::ALL {
            let target = json["redrive"][queue.as_str()].as_str();
            assert_eq!(target, queue.redrive_target().map(QueueName::as_str), "{queue}");
        }
        for stage in crate::topology::StageName::ALL {
            let spec = &json["stages"][stage.as_str()];
            assert_eq!(spec["input"].as_str(), stage.input_queue().map(QueueName::as_str), "{stage}");
            assert_eq!(spec["dlq"].as_str(), Some(stage.dlq().as_str()), "{stage}");
        }
    }
}
