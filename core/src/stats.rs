//! Where every record is: the numbers `sluice stats`, `sluice run --until-drained` and the
//! demo report.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::{Backend, QueueDepth, StreamStats};
use crate::error::Result;
use crate::topology::{QueueName, StageName};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineStats {
    /// Records ingest has taken in from the stream (checkpointed), from any producer; those
    /// still waiting in the stream are `stream.pending`.
    pub records_in: u64,
    /// Results not waiting for review (accepted, or reviewed by a person).
    pub results: u64,
    /// Results waiting for a person.
    pub review: u64,
    /// DLQ entries by stage.
    pub dlq: BTreeMap<StageName, u64>,
    pub stream: StreamStats,
    /// Depth of every queue.
    pub queues: BTreeMap<QueueName, QueueDepth>,
    /// AWS requests the workers have sent, per record in (AWS backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_requests_per_record: Option<f64>,
    /// Those requests by service and operation.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub aws_requests: BTreeMap<String, u64>,
}

impl PipelineStats {
    pub async fn collect(backend: &Backend) -> Result<Self> {
        let stream = backend.stream.stats().await?;
        let counts = backend.results.counts().await?;
        let mut queues = BTreeMap::new();
        for name in QueueName::ALL {
            queues.insert(name, backend.queue(name).depth().await?);
        }
        let dlq = StageName::ALL.into_iter().map(|stage| (stage, queues[&stage.dlq()].total())).collect();
        let aws_requests = backend.requests.totals().await?;
        let total: u64 = aws_requests.values().sum();
        Ok(Self {
            aws_requests_per_record: (total > 0).then(|| total as f64 / stream.records.max(1) as f64),
            aws_requests,
            records_in: stream.records,
            results: counts.accepted + counts.reviewed,
            review: counts.review,
            dlq,
            stream,
            queues,
        })
    }

    /// What [`accounted`](Self::accounted) counts, read alone: the result counts and the DLQs'
    /// depths, not the stream or the work queues (cheap enough to poll while a run is timed).
    pub async fn accounted_in(backend: &Backend) -> Result<u64> {
        let counts = backend.results.counts().await?;
        let mut dlq = 0;
        for stage in StageName::ALL {
            dlq += backend.queue(stage.dlq()).depth().await?.total();
        }
        Ok(counts.accepted + counts.reviewed + counts.review + dlq)
    }

    /// Messages in the work queues (visible or in flight), read alone: a look cheaper than
    /// [`collect`](Self::collect) (three requests on AWS, not a dozen) that already says the
    /// pipeline is not drained whenever it is above zero.
    pub async fn work_queued(backend: &Backend) -> Result<u64> {
        let mut queued = 0;
        for name in QueueName::WORK {
            queued += backend.queue(name).depth().await?.total();
        }
        Ok(queued)
    }

    /// Records that have reached an end: a result, a review, or a DLQ entry.
    pub fn accounted(&self) -> u64 {
        self.results + self.review + self.dlq.values().sum::<u64>()
    }

    /// Nothing left to do: the stream is checkpointed to its end and no work queue holds a message.
    pub fn is_drained(&self) -> bool {
        self.stream.pending == 0 && QueueName::WORK.iter().all(|q| self.queues[q].total() == 0)
    }
}
