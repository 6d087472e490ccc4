//! `sluice produce`: writes files, or the bundled digits, to the stream as a producer would.

use std::path::PathBuf;

use anyhow::Context;
use sluice_core::backend::{Backend, BlobStore, MAX_STREAM_RECORD, PutReport, StreamInput};
use sluice_core::config::BackendKind;
use sluice_core::envelope::{ContentType, Envelope, Payload, RecordId};
use sluice_core::telemetry::traces;
use sluice_ingest::IngestConfig;
use tokio_util::sync::CancellationToken;

use crate::digits::{self, Digit, Split};

/// Kinesis PutRecords takes at most 500 records a call; the embedded stream takes the same.
pub const PUT_BATCH: usize = 500;

#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["dir", "digits"])))]
pub struct ProduceArgs {
    /// Write every file in this directory as a raw record (as any Kinesis producer would); a
    /// JSON-lines file (`.jsonl`, `.ndjson`) as a record a line. Hidden files and subdirectories
    /// are passed over (and said).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Write the bundled digits of this split as PNG records, labelled.
    #[arg(long, value_enum)]
    pub digits: Option<Split>,
    /// Write everything this many times, each copy a distinct record (but for records that name
    /// their id: envelopes, and JSON events with `ingest.record_id_field`, whose copies are one).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Write digits as tabular JSON events instead of PNG images.
    #[arg(long, conflicts_with = "photos")]
    pub json: bool,
    /// Write digits as photo-sized colour JPEGs (480×360, ~90 KB) instead of 8×8 PNGs: records
    /// that cost what photos cost, for an image model such as ResNet-18.
    #[arg(long)]
    pub photos: bool,
    /// Write only the first this many records.
    #[arg(long, conflicts_with = "rate")]
    pub limit: Option<usize>,
    /// Write at this many records a second, for `--duration`: a load generator. The chosen
    /// records are written over and over, each copy a distinct record.
    #[arg(long, requires = "duration", value_parser = crate::dlq::parse_rate)]
    pub rate: Option<f64>,
    /// How long to write at `--rate` (`90s`, `10m`).
    #[arg(long, value_parser = humantime::parse_duration, requires = "rate")]
    pub duration: Option<std::time::Duration>,
    /// How the rate moves over the run.
    #[arg(long, value_enum, default_value_t = crate::load::Pattern::Steady, requires = "rate")]
    pub pattern: crate::load::Pattern,
}

/// Digits as sluice envelopes labelled with their true class. Ids carry `run` so that every
/// produce call, and every repeat, makes distinct records.
pub fn digit_records(set: &[Digit], split: Split, repeat: usize, form: DigitForm, run: &str) -> Vec<StreamInput> {
    let catalogue = Catalogue::digits(set.to_vec(), split, form, run);
    (0..(set.len() * repeat) as u64).map(|i| catalogue.record(i)).collect()
}

/// What a producer writes, record by record: the `i`-th record of a run that goes through the
/// set again and again, each pass a new copy (distinct record ids for digits; raw files get
/// theirs from their stream positions).
pub enum Catalogue {
    /// Labelled digits, each digit's payload made once.
    Digits {
        set: Vec<Digit>,
        payloads: Vec<(ContentType, Vec<u8>)>,
        split: Split,
        run: String,
    },
    Files(Vec<(String, Vec<u8>)>),
}

/// How a digit travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigitForm {
    /// An 8×8 greyscale PNG.
    #[default]
    Png,
    /// A tabular JSON event.
    Json,
    /// A photo-sized colour JPEG ([`Digit::to_photo`]).
    Photo,
}

impl DigitForm {
    /// The form `--json` or `--photos` asks for.
    pub fn from_flags(json: bool, photos: bool) -> Self {
        match (json, photos) {
            (true, _) => Self::Json,
            (false, true) => Self::Photo,
            (false, false) => Self::Png,
        }
    }

    fn payload(self, digit: &Digit) -> (ContentType, Vec<u8>) {
        match self {
            Self::Png => (ContentType::Png, digit.to_png()),
            Self::Json => (ContentType::Json, serde_json::to_vec(&digit.to_event()).expect("serialises")),
            Self::Photo => (ContentType::Jpeg, digit.to_photo()),
        }
    }
}

impl Catalogue {
    pub fn digits(set: Vec<Digit>, split: Split, form: DigitForm, run: &str) -> Self {
        let payloads = set.iter().map(|digit| form.payload(digit)).collect();
        Self::Digits { set, payloads, split, run: run.to_owned() }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Digits { set, .. } => set.len(),
            Self::Files(files) => files.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn record(&self, i: u64) -> StreamInput {
        self.record_produced_at(i, None)
    }

    /// [`record`](Self::record), an envelope saying it was produced at `produced_ms` (default:
    /// now). A raw file has no envelope to say it in: its time is its arrival's.
    pub fn record_produced_at(&self, i: u64, produced_ms: Option<u64>) -> StreamInput {
        let (copy, at) = (i / self.len().max(1) as u64, (i % self.len().max(1) as u64) as usize);
        match self {
            Self::Digits { set, payloads, split, run } => {
                let digit = &set[at];
                let split_name = format!("{split:?}").to_lowercase();
                let id = RecordId::parse(format!("digits-{run}-{split_name}-{:04}-{copy}", digit.index))
                    .expect("a valid id");
                let (content_type, data) = &payloads[at];
                let mut envelope = Envelope::inline(id.clone(), "sluice-produce", *content_type, data.clone());
                envelope.attributes.insert("label".to_owned(), digit.label.to_string());
                if produced_ms.is_some() {
                    envelope.timestamps.produced_ms = produced_ms;
                }
                StreamInput { partition_key: id.to_string(), data: envelope.to_json() }
            }
            Self::Files(files) => {
                let (name, data) = &files[at];
                StreamInput { partition_key: format!("{name}-{copy}"), data: data.clone() }
            }
        }
    }
}

/// A short random tag for this producer run.
pub fn run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// The most bytes a record is written with inline: what ingest takes inline
/// (`ingest.max_payload_bytes`) and the stream carries. A larger one goes to the blob store first.
pub fn inline_most(ingest: &IngestConfig) -> usize {
    ingest.max_payload_bytes.min(MAX_STREAM_RECORD)
}

/// Writes `records` to the stream in batches, as ingest (configured as `ingest`) takes them: a
/// record over [`inline_most`] bytes goes to the blob store first and travels as an envelope
/// holding the claim-check reference.
pub async fn put_all(backend: &Backend, records: Vec<StreamInput>, ingest: &IngestConfig) -> anyhow::Result<PutReport> {
    put_until(backend, records, ingest, &CancellationToken::new()).await
}

/// Writes `records` a batch at a time until they are all written or `stop` is cancelled (looked
/// at between batches: a batch sent is seen through). An error says how many were written before it.
pub async fn put_until(
    backend: &Backend,
    records: Vec<StreamInput>,
    ingest: &IngestConfig,
    stop: &CancellationToken,
) -> anyhow::Result<PutReport> {
    let total = records.len() as u64;
    let progress = crate::progress::bar(total, "records");
    let mut report = PutReport::default();
    let mut records = records;
    while !records.is_empty() && !stop.is_cancelled() {
        let rest = records.split_off(records.len().min(PUT_BATCH));
        report += put_batch(backend, records, ingest).await.with_context(|| written_before(report.records, total))?;
        progress.set_position(report.records);
        records = rest;
    }
    progress.finish_and_clear();
    Ok(report)
}

/// What a write that failed part way had done: every record is written again by a rerun.
pub fn written_before(written: u64, total: u64) -> String {
    format!("{written} of {total} records were written before this error (a rerun writes all {total} again)")
}

/// Writes up to [`PUT_BATCH`] records in one stream call (claim-checks and trace context first).
pub async fn put_batch(
    backend: &Backend,
    records: Vec<StreamInput>,
    ingest: &IngestConfig,
) -> anyhow::Result<PutReport> {
    let mut checked = Vec::with_capacity(records.len());
    for record in records {
        let record = if traces::enabled() { with_create_span(backend, record) } else { record };
        checked.push(claim_check_if_large(backend.blobs.as_ref(), record, ingest).await?);
    }
    Ok(backend.stream.put_records(checked).await?)
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

async fn claim_check_if_large(
    blobs: &dyn BlobStore,
    record: StreamInput,
    ingest: &IngestConfig,
) -> anyhow::Result<StreamInput> {
    let size = record.data.len();
    if size <= inline_most(ingest) && record.fits() {
        return Ok(record);
    }
    // JSON after a byte-order mark is JSON, as ingest reads an inline record; the blob holds it
    // without the mark, which the features stage would not read past.
    let mut data = record.data;
    data.drain(..data.len() - sluice_core::envelope::without_bom(&data).len());
    let json = serde_json::from_slice::<serde_json::Value>(&data).ok();
    // An envelope already (as ingest tells one): its payload goes to the blob store, and it keeps
    // its record id, label and attributes (wrapped whole in another envelope, it would be read as
    // a raw JSON event, under an id of sluice's). One ingest would refuse stops the run, as it
    // cannot travel as it is.
    if let Some(value) = json.as_ref().filter(|v| Envelope::looks_like_envelope(v)) {
        let mut envelope = Envelope::from_value(value.clone())
            .map_err(|e| anyhow::anyhow!("the envelope {}: {}", record.partition_key, e.detail()))?;
        if let Payload::Inline { data } = &mut envelope.payload {
            let reference = blobs.put(std::mem::take(data)).await?;
            envelope.payload = Payload::ClaimCheck { reference };
        }
        return Ok(StreamInput { partition_key: record.partition_key, data: envelope.to_json() });
    }
    let content_type = ContentType::sniff(&data).map_or("application/octet-stream", ContentType::as_str);
    // A raw JSON event names its id as ingest would read it (`ingest.record_id_field`), and one
    // whose field holds no valid id is refused as ingest would refuse it. Else a record of its
    // own, as a small file is by its stream position: the content's hash names it for people,
    // and a nonce keeps a copy (`--repeat`) or another file with the same bytes from sharing its
    // result. The id is in the envelope, so a redelivery keeps it.
    let named = match &json {
        Some(event) => sluice_ingest::raw_event_id(event, ingest)
            .map_err(|e| anyhow::anyhow!("the JSON event {}: {}", record.partition_key, e.detail()))?,
        None => None,
    };
    let id = match named {
        Some(id) => id.to_string(),
        None => format!("{}-{}", RecordId::from_content(&data), &uuid::Uuid::new_v4().simple().to_string()[..12]),
    };
    let reference = blobs.put(data).await?;
    // Built as JSON, not as an `Envelope`: the content type may be one sluice does not take,
    // and ingest is where that is judged and dead-lettered. The partition key is kept as ingest
    // keeps a raw record's.
    let envelope = serde_json::json!({
        "schema_version": sluice_core::envelope::SCHEMA_VERSION,
        "record_id": id,
        "source": "sluice-produce",
        "content_type": content_type,
        "payload": { "kind": "claim_check", "reference": reference },
        "attributes": { sluice_core::envelope::PARTITION_KEY_ATTRIBUTE: &record.partition_key },
        "timestamps": { "produced_ms": sluice_core::envelope::now_ms() },
    });
    Ok(StreamInput { partition_key: record.partition_key, data: serde_json::to_vec(&envelope)? })
}

/// What `args` asks to produce (all of it: `--repeat` copies, cut at `--limit`).
pub fn records_for(args: &ProduceArgs) -> anyhow::Result<Vec<StreamInput>> {
    let catalogue = catalogue_for(args)?;
    let total = (catalogue.len() * args.repeat).min(args.limit.unwrap_or(usize::MAX));
    Ok((0..total as u64).map(|i| catalogue.record(i)).collect())
}

/// The set `args` names: the digits of a split, or the files of a directory.
pub fn catalogue_for(args: &ProduceArgs) -> anyhow::Result<Catalogue> {
    if let Some(split) = args.digits {
        let set = digits::load_split(split)?;
        return Ok(Catalogue::digits(set, split, DigitForm::from_flags(args.json, args.photos), &run_tag()));
    }
    let dir = args.dir.as_ref().expect("clap requires --dir or --digits");
    anyhow::ensure!(
        !args.json && !args.photos,
        "--json and --photos shape the bundled digits; --dir writes files as they are"
    );
    let (mut paths, mut passed_over) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // A `.DS_Store` is no record; a subdirectory's files are not this directory's.
        if name.starts_with('.') || !path.is_file() {
            passed_over.push(name);
        } else {
            paths.push((name, path));
        }
    }
    if !passed_over.is_empty() {
        passed_over.sort();
        eprintln!("passed over (hidden, or not a file): {}", passed_over.join(", "));
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for (name, path) in paths {
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            let lines = data.split(|&b| b == b'\n').enumerate();
            let lines = lines.filter(|(_, line)| !line.trim_ascii().is_empty());
            files.extend(lines.map(|(i, line)| (format!("{name}:{}", i + 1), line.trim_ascii_end().to_vec())));
        } else {
            files.push((name, data));
        }
    }
    anyhow::ensure!(!files.is_empty(), "{} holds no files", dir.display());
    Ok(Catalogue::Files(files))
}
