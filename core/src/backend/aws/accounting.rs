//! Counts every HTTP request the AWS SDK sends, by service and operation (retries included), so
//! `sluice stats` and the demo can report requests per record.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Request counts keyed by (service, operation). Cheap to clone; clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<(String, String), u64>>>,
}

impl RequestCounter {
    /// A snapshot: `"Service.Operation" → requests`.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|((service, op), n)| (format!("{service}.{op}"), *n)).collect()
    }

    pub fn total(&self) -> u64 {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
    }
}

/// Of `counts` (as [`RequestCounter::snapshot`] gives them), the requests whose number grows
/// with the records: the producer's puts, queue sends, receives (a waiting stage's long polls
/// among them) and deletes, feature-store and result writes and reads, capture. The others keep
/// the workers coordinated and grow with time and workers, not records: lease renewals,
/// checkpoints and scans, reads of a caught-up stream, queue-depth samples, and the look-ups at
/// start.
pub fn requests_moving_records(counts: &BTreeMap<String, u64>) -> u64 {
    counts.iter().filter(|(operation, _)| moves_records(operation)).map(|(_, n)| n).sum()
}

fn moves_records(operation: &str) -> bool {
    matches!(
        operation,
        "Kinesis.PutRecords"
            | "SQS.SendMessageBatch"
            | "SQS.ReceiveMessage"
            | "SQS.DeleteMessageBatch"
            | "DynamoDB.BatchWriteItem"
            | "DynamoDB.BatchGetItem"
            | "DynamoDB.TransactWriteItems"
            | "S3.PutObject"
            | "S3.GetObject"
    )
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "sluice-request-counter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (service, operation) = cfg
            .load::<Metadata>()
            .map(|m| (m.service().to_owned(), m.name().to_owned()))
            .unwrap_or_else(|| ("unknown".to_owned(), "unknown".to_owned()));
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()).entry((service, operation)).or_default() += 1;
        Ok(())
    }
}
