//! `sluice produce`: writes files, or the bundled digits, to the stream as a producer would.

use std::path::PathBuf;

use anyhow::Context;
use sluice_core::backend::{Backend, BlobStore, RecordStream, StreamInput};
use sluice_core::config::BackendKind;
use sluice_core::envelope::{ContentType, Envelope, RecordId};
use sluice_core::telemetry::traces;

use crate::digits::{self, Digit, Split};

/// Kinesis PutRecords takes at most 500 records a call; the embedded stream takes the same.
const PUT_BATCH: usize = 500;

#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["dir", "digits"])))]
pub struct ProduceArgs {
    /// Write every file in this directory as a raw record (as any Kinesis producer would).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Write the bundled digits of this split as PNG records, labelled.
    #[arg(long, value_enum)]
    pub digits: Option<Split>,
    /// Write everything this many times, each copy a distinct record.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Write digits as tabular JSON events instead of PNG images.
    #[arg(long)]
    pub json: bool,
    /// Write only the first this many records.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Digits as sluice envelopes labelled with their true class. Ids carry `run` so that every
/// produce call, and every repeat, makes distinct records.
pub fn digit_records(set: &[Digit], split: Split, repeat: usize, as_json: bool, run: &str) -> Vec<StreamInput> {
    let split_name = format!("{split:?}").to_lowercase();
    let mut out = Vec::with_capacity(set.len() * repeat);
    for copy in 0..repeat {
        for digit in set {
            let id =
                RecordId::parse(format!("digits-{run}-{split_name}-{:04}-{copy}", digit.index)).expect("a valid id");
            let (content_type, data) = if as_json {
                (ContentType::Json, serde_json::to_vec(&digit.to_event()).expect("serialises"))
            } else {
                (ContentType::Png, digit.to_png())
            };
            let mut envelope = Envelope::inline(id.clone(), "sluice-produce", content_type, data);
            envelope.attributes.insert("label".to_owned(), digit.label.to_string());
            out.push(StreamInput { partition_key: id.to_string(), data: envelope.to_json() });
        }
    }
    out
}

/// A short random tag for this producer run.
pub fn run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// The most a stream record may carry, partition key included (Kinesis: 1 MiB).
const MAX_STREAM_RECORD: usize = 1024 * 1024;

/// Writes `records` to the stream in batches. A record too large for the stream goes to the
/// blob store first and travels as an envelope holding the claim-check reference.
pub async fn put_all(backend: &Backend, records: Vec<StreamInput>) -> anyhow::Result<usize> {
    let n = records.len();
    let mut checked = Vec::with_capacity(records.len());
    for record in records {
        let record = if traces::enabled() { with_create_span(backend, record) } else { record };
        checked.push(claim_check_if_large(backend.blobs.as_ref(), record).await?);
    }
    let stream: &dyn RecordStream = backend.stream.as_ref();
    let progress = crate::progress::bar(n as u64, "records");
    let mut records = checked;
    while !records.is_empty() {
        let rest = records.split_off(records.len().min(PUT_BATCH));
        let put = records.len() as u64;
        stream.put_records(records).await?;
        progress.inc(put);
        records = rest;
    }
    progress.finish_and_clear();
    Ok(n)
}

/// Starts the trace of a sluice envelope that has none: a producer's `create` span, whose
/// context the envelope carries to ingest. A raw record stays as it is (its trace starts at
/// ingest, as a foreign producer's would).
fn with_create_span(backend: &Backend, record: StreamInput) -> StreamInput {
    let Ok(mut envelope) = Envelope::from_json(&record.data) else { return record };
    if envelope.trace.is_some() {
        return record;
    }
    let (system, _) = traces::messaging_systems(backend.kind() == BackendKind::Aws);
    let destination = traces::Destination { system, name: traces::STREAM.to_owned() };
    envelope.trace = traces::create(&destination, envelope.record_id.as_str());
    StreamInput { partition_key: record.partition_key, data: envelope.to_json() }
}

async fn claim_check_if_large(blobs: &dyn BlobStore, record: StreamInput) -> anyhow::Result<StreamInput> {
    if record.data.len() + record.partition_key.len() <= MAX_STREAM_RECORD {
        return Ok(record);
    }
    let content_type = ContentType::sniff(&record.data).map_or("application/octet-stream", ContentType::as_str);
    let id = RecordId::from_content(&record.data);
    let reference = blobs.put(record.data).await?;
    // Built as JSON, not as an `Envelope`: the content type may be one sluice does not take,
    // and ingest is where that is judged and dead-lettered.
    let envelope = serde_json::json!({
        "schema_version": sluice_core::envelope::SCHEMA_VERSION,
        "record_id": id,
        "source": "sluice-produce",
        "content_type": content_type,
        "payload": { "kind": "claim_check", "reference": reference },
        "timestamps": { "produced_ms": sluice_core::envelope::now_ms() },
    });
    Ok(StreamInput { partition_key: record.partition_key, data: serde_json::to_vec(&envelope)? })
}

/// What `args` asks to produce.
pub fn records_for(args: &ProduceArgs) -> anyhow::Result<Vec<StreamInput>> {
    let mut records = all_records_for(args)?;
    if let Some(limit) = args.limit {
        records.truncate(limit);
    }
    Ok(records)
}

fn all_records_for(args: &ProduceArgs) -> anyhow::Result<Vec<StreamInput>> {
    if let Some(split) = args.digits {
        let set = digits::load_split(split)?;
        return Ok(digit_records(&set, split, args.repeat, args.json, &run_tag()));
    }
    let dir = args.dir.as_ref().expect("clap requires --dir or --digits");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for _ in 0..args.repeat {
        for path in &files {
            let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let key = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(StreamInput { partition_key: key, data });
        }
    }
    Ok(out)
}
