//! `sluice bench pipeline`: how close the pipeline comes to its own model.
//!
//! The same N labelled digits go (a) through a bare in-memory loop — decode, preprocess, infer
//! in the inference stage's batch size on its device, no store, no queues — and (b) through the
//! whole pipeline on a fresh embedded store, all four stages running in this process, from a full
//! stream to the last result. It prints records/s for both and the ratio, each stage's busy time (the sum of
//! its batches' receive-to-acknowledge times, from the workers' own metrics), the records'
//! latency from ingest to stored result, and the bytes the process handed to `write` calls during
//! the run, a record (nearly all the store's log and checkpoints, and the capture log): the
//! store's cost, which on a noisy machine moves far less from run to run than records/s.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use sluice_core::backend::Backend;
use sluice_core::config::Settings;
use sluice_core::envelope::{Envelope, Payload};
use sluice_core::model::ModelBundle;
use sluice_core::stats::PipelineStats;
use sluice_core::telemetry::scrape;
use sluice_core::topology::StageName;
use sluice_core::vector::FeatureVector;
use sluice_inference::model::{CandleClassifier, select_device};

use crate::digits::{Split, load_split};
use crate::load_bench::{Percentiles, stage_spans};
use crate::produce::{DigitForm, digit_records, put_all, run_tag};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchPipelineArgs {
    /// Records through each side.
    #[arg(long, default_value_t = 10_000)]
    pub records: usize,
    /// The digits as photo-sized colour JPEGs instead of 8×8 PNGs: records that cost what photos
    /// cost to decode and resize, for an image model such as ResNet-18.
    #[arg(long)]
    pub photos: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    pub records: usize,
    /// Whether the digits went as photo-sized JPEGs (`--photos`) rather than 8×8 PNGs.
    pub photos: bool,
    pub bare_records_per_s: f64,
    pub pipeline_records_per_s: f64,
    /// Pipeline over bare loop.
    pub ratio: f64,
    /// Each stage's summed batch time, in seconds.
    pub stage_busy_s: BTreeMap<String, f64>,
    pub pipeline_s: f64,
    /// Bytes handed to `write` calls during the pipeline's run, per record (Linux's `wchar`):
    /// nearly all the store's files (its log, the checkpoints' copies into the database file,
    /// of the stream the producer wrote just before too) and the capture log, besides a little
    /// logging. Absent where the system does not tell.
    pub written_bytes_per_record: Option<f64>,
    /// The process's CPU time during the pipeline's run over its wall time: how many cores the
    /// stages kept busy (at most the machine's). Absent where the system does not tell.
    pub cores_busy: Option<f64>,
    pub latency_ms: Latency,
    /// Where records waited: per stage, from the previous stage's timestamp (the producer's, for
    /// ingest) to its own, in milliseconds.
    pub stage_ms: BTreeMap<&'static str, Percentiles>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
}

impl fmt::Display for PipelineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form = if self.photos { "as 480×360 JPEGs" } else { "as 8×8 PNGs" };
        writeln!(f, "{} labelled digits {form}, each side", self.records)?;
        writeln!(f, "  bare loop (decode, preprocess, infer)  {:>9.0} records/s", self.bare_records_per_s)?;
        writeln!(f, "  whole pipeline, embedded store         {:>9.0} records/s", self.pipeline_records_per_s)?;
        writeln!(f, "  ratio                                  {:>9.2}", self.ratio)?;
        writeln!(
            f,
            "  latency ingest → stored               p50 {} ms, p99 {} ms",
            self.latency_ms.p50, self.latency_ms.p99
        )?;
        if let Some(cores) = self.cores_busy {
            writeln!(f, "  cores busy during the pipeline's run    {cores:>9.2}")?;
        }
        if let Some(bytes) = self.written_bytes_per_record {
            writeln!(
                f,
                "  written, per record                    {:>9.1} KiB (store log, checkpoints, capture)",
                bytes / 1024.0
            )?;
        }
        writeln!(f, "  busy time per stage over {:.2} s:", self.pipeline_s)?;
        for (stage, busy) in &self.stage_busy_s {
            writeln!(f, "    {stage:<10} {busy:>7.2} s ({:.0}%)", 100.0 * busy / self.pipeline_s.max(1e-9))?;
        }
        writeln!(f, "  time at each stage (queue wait and work):")?;
        for (stage, p) in &self.stage_ms {
            writeln!(f, "    {stage:<12} p50 {:>6.0} ms   p99 {:>6.0} ms", p.p50, p.p99)?;
        }
        Ok(())
    }
}

pub async fn bench_pipeline(args: &BenchPipelineArgs, settings: Settings) -> anyhow::Result<PipelineReport> {
    let n = args.records.max(1);
    let test = load_split(Split::Test)?;
    let mut records = digit_records(
        &test,
        Split::Test,
        n.div_ceil(test.len()),
        DigitForm::from_flags(false, args.photos),
        &run_tag(),
    );
    records.truncate(n);

    let bare = bare_loop(&settings, &records)?;

    let dir = tempfile::tempdir()?;
    let settings = settings
        .set("store.backend", "embedded")
        .set("store.path", dir.path().join("bench.sqlite"))
        .set("telemetry.port", 0);
    let backend = Backend::open(&settings.store()?).await?;
    // Counts the results while the stages run on a connection of their own: on the stages' one,
    // each look (a count over the results index, every 20 ms) held them all up while it ran.
    let observer = Backend::open_observer(&settings.store()?).await?;
    put_all(&backend, records, &settings.section("ingest")?).await?;
    // Timed from the stages' start, their model loaded and warmed up: the bare loop's timing
    // leaves its model's loading out too.
    let mut pipeline = crate::pipeline::InProcess::start(&settings).await?;
    let written_before = bytes_written();
    let cpu_before = cpu_seconds();
    let (started, started_ms) = (Instant::now(), sluice_core::envelope::now_ms());
    pipeline.wait_accounted(&observer, n as u64).await?;
    let pipeline_s = started.elapsed().as_secs_f64();
    let cores_busy = cpu_before.zip(cpu_seconds()).map(|(before, after)| (after - before) / pipeline_s.max(1e-9));
    let written_bytes_per_record =
        written_before.zip(bytes_written()).map(|(before, after)| after.saturating_sub(before) as f64 / n as f64);
    pipeline.stop().await?;
    // A record dead-lettered is accounted for, but not come through: a pipeline that failed
    // records would look as fast as one that served them.
    let dead: u64 = PipelineStats::collect(&observer).await?.dlq.values().sum();
    anyhow::ensure!(dead == 0, "{dead} of the {n} records were dead-lettered (`sluice dlq stats`): no figures");

    let samples = scrape::parse(&sluice_core::telemetry::prometheus_text());
    let stage_busy_s = StageName::ALL
        .iter()
        .map(|s| {
            let busy = scrape::total(&samples, "sluice_batch_duration_seconds_sum", &[("stage", s.as_str())]);
            (s.as_str().to_owned(), busy)
        })
        .collect();
    let mut results = crate::demo::all_results(&backend).await?;
    // The records were made and written before the bare loop ran: their wait at ingest counts
    // from the pipeline's start.
    for result in &mut results {
        let produced = &mut result.timestamps.produced_ms;
        *produced = produced.map(|at| at.max(started_ms));
    }
    let (_, stage_ms) = stage_spans(&results);
    let mut latencies: Vec<u64> = results
        .iter()
        .filter_map(|r| Some(r.timestamps.stored_ms?.saturating_sub(r.timestamps.ingested_ms?)))
        .collect();
    latencies.sort_unstable();
    let pipeline_records_per_s = n as f64 / pipeline_s.max(1e-9);
    let bare_records_per_s = n as f64 / bare.max(1e-9);
    Ok(PipelineReport {
        records: n,
        photos: args.photos,
        bare_records_per_s,
        pipeline_records_per_s,
        ratio: pipeline_records_per_s / bare_records_per_s,
        stage_busy_s,
        pipeline_s,
        written_bytes_per_record,
        cores_busy,
        latency_ms: Latency {
            p50: crate::demo::percentile(&latencies, 0.5) as u64,
            p99: crate::demo::percentile(&latencies, 0.99) as u64,
        },
        stage_ms,
    })
}

/// Bytes this process has handed to `write` and its kin so far (`wchar` in `/proc/self/io`), where
/// the system tells.
fn bytes_written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|line| line.strip_prefix("wchar:"))?.trim().parse().ok()
}

/// CPU seconds this process has used so far, all its threads, user and system (`/proc/self/stat`'s
/// `utime` and `stime`, in Linux's fixed 100 ticks a second), where the system tells.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the whole line, the 12th and 13th here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Seconds the bare loop takes over `records`: what the stages do to each, and nothing else.
fn bare_loop(settings: &Settings, records: &[sluice_core::backend::StreamInput]) -> anyhow::Result<f64> {
    let bundle = ModelBundle::load(settings.model()?.dir)?;
    let features: sluice_features::FeaturesConfig = settings.section("features")?;
    let inference: sluice_inference::InferenceConfig = settings.section("inference")?;
    // The device and precision the inference stage would use (a GPU where there is one).
    let (device, backend) = select_device(inference.device);
    let classifier = CandleClassifier::load_at(&bundle, device, backend, inference.precision)?;
    classifier.warm_up()?;
    let started = Instant::now();
    for chunk in records.chunks(inference.batch_size.max(1)) {
        // Preprocessed on every core, as the features stage does.
        let vectors = sluice_core::threads::on_every_core(chunk.iter().collect(), |record| {
            let envelope = Envelope::from_json(&record.data)?;
            let Payload::Inline { data } = &envelope.payload else { bail!("a digit record travels inline") };
            let vector =
                sluice_features::vectorise(&bundle.manifest, envelope.content_type, data, &features.image_limits)
                    .context("preprocessing")?;
            let FeatureVector::Pixels(vector) = vector else { bail!("a digit's features are its pixels") };
            Ok(vector)
        });
        let mut pixels = Vec::with_capacity(chunk.len() * bundle.manifest.vector_len());
        for vector in vectors {
            pixels.extend(vector?);
        }
        classifier.predict_batch(FeatureVector::Pixels(pixels), chunk.len())?;
    }
    Ok(started.elapsed().as_secs_f64())
}
