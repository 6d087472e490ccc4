//! `sluice stats` for people: where every record is, as a table (`--json` gives the numbers).

use std::fmt::Write as _;

use sluice_core::backend::aws::requests_moving_records;
use sluice_core::stats::PipelineStats;
use sluice_core::topology::{QueueName, StageName};

/// Records in that have reached no end yet: `(not yet done, none of these)`. Once the pipeline
/// is drained nothing is left to do, so what is missing then ended in no result and no DLQ
/// entry: purged from a DLQ, a record id a producer wrote more than once (its copies share a
/// result), or, on AWS, a message SQS deleted at the end of its retention (14 days).
fn unended(stats: &PipelineStats) -> (u64, u64) {
    let missing = stats.records_in.saturating_sub(stats.accounted());
    if stats.is_drained() { (0, missing) } else { (missing, 0) }
}

/// The stats as JSON, with what the table says of the records without an end:
/// `drained`, `not_yet_done` and `none_of_these`.
pub fn to_json(stats: &PipelineStats) -> serde_json::Result<serde_json::Value> {
    let mut value = serde_json::to_value(stats)?;
    let (not_yet_done, none_of_these) = unended(stats);
    if let Some(fields) = value.as_object_mut() {
        fields.insert("drained".into(), stats.is_drained().into());
        fields.insert("not_yet_done".into(), not_yet_done.into());
        fields.insert("none_of_these".into(), none_of_these.into());
    }
    Ok(value)
}

/// The stats as a few aligned lines: records in and where they ended, the stream, each queue.
pub fn render(stats: &PipelineStats) -> String {
    let mut out = String::new();
    let (not_yet_done, none_of_these) = unended(stats);
    let _ = writeln!(out, "records in      {:>10}   (taken in by ingest, from any producer)", stats.records_in);
    let _ = writeln!(out, "  results       {:>10}", stats.results);
    let _ =
        writeln!(out, "  review        {:>10}   (waiting for a person: sluice results --status review)", stats.review);
    for stage in StageName::ALL {
        let _ = writeln!(out, "  dlq {:<9} {:>10}", stage.as_str(), stats.dlq.get(&stage).copied().unwrap_or(0));
    }
    if none_of_these > 0 {
        let why = "(drained: DLQ entries purged, record ids written more than once, or on AWS messages SQS deleted after 14 days)";
        let _ = writeln!(out, "  none of these {none_of_these:>10}   {why}");
    } else {
        let _ = writeln!(out, "  not yet done  {not_yet_done:>10}");
    }
    if stats.stream.pending > 0 {
        // Counted in once ingest has taken them: until then they are the stream's only.
        let at_least = if stats.stream.pending_at_least { "at least that many " } else { "" };
        let _ =
            writeln!(out, "waiting         {:>10}   ({at_least}in the stream, not yet taken in)", stats.stream.pending);
    }

    let stream = &stats.stream;
    let behind = stream.millis_behind_latest.map(|ms| format!(", {ms} ms behind")).unwrap_or_default();
    let _ = writeln!(
        out,
        "\nstream          {} shards, {}{} records past the checkpoints{behind}",
        stream.shards,
        if stream.pending_at_least { "at least " } else { "" },
        stream.pending
    );
    for (shard, records) in &stream.arrived {
        let _ = writeln!(out, "  {shard:<13} {records:>10} taken in");
    }
    for (owner, shards) in &stream.leases {
        let _ = writeln!(out, "  lease         {owner} holds {shards}");
    }

    let _ = writeln!(out, "\nqueue           {:>10} {:>10}", "visible", "in flight");
    for queue in QueueName::ALL {
        let depth = &stats.queues[&queue];
        let _ = writeln!(out, "  {:<13} {:>10} {:>10}", queue.as_str(), depth.visible, depth.in_flight);
    }
    if let Some(per_record) = stats.aws_requests_per_record {
        let _ = writeln!(out, "\nAWS requests    {per_record:.2} per record in");
        let moving = requests_moving_records(&stats.aws_requests) as f64 / stats.records_in.max(1) as f64;
        let _ = writeln!(
            out,
            "  moving records {moving:.2} per record in (the rest, leases, stream reads and queue depths, grow with time)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sluice_core::backend::{QueueDepth, StreamStats};

    use super::*;

    /// Ten records in: five results, one for review, one in the ingest DLQ, three not yet done.
    fn sample() -> PipelineStats {
        let queues = QueueName::ALL.into_iter().map(|q| (q, QueueDepth { visible: 2, in_flight: 1 })).collect();
        PipelineStats {
            records_in: 10,
            results: 5,
            review: 1,
            dlq: BTreeMap::from([(StageName::Ingest, 1)]),
            stream: StreamStats {
                shards: 4,
                records: 10,
                arrived: BTreeMap::from([("shard-0".to_owned(), 10)]),
                pending: 0,
                pending_at_least: false,
                millis_behind_latest: Some(20),
                leases: BTreeMap::from([("ingest-a".to_owned(), 4)]),
            },
            queues,
            aws_requests_per_record: None,
            aws_requests: BTreeMap::new(),
        }
    }

    #[test]
    fn the_table_names_every_end_and_queue() {
        let text = render(&sample());
        assert!(text.contains("records in              10"), "{text}");
        assert!(text.contains("not yet done           3"), "{text}");
        assert!(text.contains("ingest-a holds 4") && text.contains("20 ms behind"), "{text}");
        for queue in QueueName::ALL {
            assert!(text.contains(&format!("  {:<13}          2          1", queue.as_str())), "{queue}: {text}");
        }
        assert!(!text.contains("AWS requests"));
        assert!(!text.contains("not yet taken in"), "nothing waits in the stream: {text}");
        // Records produced and not yet taken in are said at the top too, not only per shard.
        let mut produced = sample();
        produced.stream.pending = 7;
        let text = render(&produced);
        assert!(text.contains(&format!("waiting         {:>10}   (in the stream, not yet taken in)", 7)), "{text}");
        // On Kinesis one read past each checkpoint counts them: a lower bound, said so.
        produced.stream.pending_at_least = true;
        let text = render(&produced);
        assert!(
            text.contains("(at least that many in the stream") && text.contains("at least 7 records past"),
            "{text}"
        );
    }

    /// Drained with records unaccounted for: they were purged or written twice, not in progress.
    #[test]
    fn records_missing_from_a_drained_pipeline_are_not_called_in_progress() {
        let mut stats = sample();
        for depth in stats.queues.values_mut() {
            *depth = QueueDepth::default();
        }
        let text = render(&stats);
        assert!(!text.contains("not yet done"), "{text}");
        assert!(text.contains("none of these          3   (drained: DLQ entries purged, record ids"), "{text}");
    }

    #[test]
    fn aws_requests_are_split_into_those_that_move_records_and_the_rest() {
        let stats = PipelineStats {
            aws_requests_per_record: Some(2.5),
            aws_requests: BTreeMap::from([
                ("SQS.SendMessageBatch".to_owned(), 6),
                ("DynamoDB.TransactWriteItems".to_owned(), 5),
                ("DynamoDB.UpdateItem".to_owned(), 9),
                ("Kinesis.GetRecords".to_owned(), 5),
            ]),
            ..sample()
        };
        let text = render(&stats);
        assert!(text.contains("AWS requests    2.50 per record in"), "{text}");
        assert!(text.contains("moving records 1.10 per record in"), "{text}");
    }
}
