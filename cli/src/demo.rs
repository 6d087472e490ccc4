//! `sluice demo`: a fresh embedded store, the held-out digits plus a handful of corrupt records,
//! all four stages in one process until drained, and a summary read back from the store.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use sluice_core::backend::Backend;
use sluice_core::backend::aws::{requests, requests_moving_records};
use sluice_core::config::{BackendKind, Settings, StoreArgs};
use sluice_core::record::PredictionResult;
use sluice_core::stats::PipelineStats;
use sluice_core::telemetry::health::Health;
use sluice_core::topology::StageName;
use tokio_util::sync::CancellationToken;

use crate::digits::{self, Split};
use crate::produce::{DigitForm, digit_records, put_all, run_tag};
use sluice_core::dlq::Letters;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The embedded store file to create (must not exist; default: a temporary one, removed
    /// afterwards), or with `--backend aws` the endpoint and resource prefix (default: a fresh
    /// `sluice-demo-<run>` set of resources, created first).
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub inference: sluice_inference::InferenceArgs,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Produce the held-out digits this many times.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// The digits as photo-sized JPEGs (480×360) instead of 8×8 PNGs: what an image model such
    /// as ResNet-18 is fed, for its requests and speed (the digits CNN reads them poorly).
    #[arg(long)]
    pub photos: bool,
    /// With `--backend aws --prefix P`: use the resources that are there (a deployed stack),
    /// creating none; the demo stops first if any is missing.
    #[arg(long, requires = "prefix")]
    pub no_bootstrap: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub records_in: u64,
    pub results: u64,
    pub review: u64,
    pub dlq: BTreeMap<StageName, u64>,
    /// Correct predictions among all results (accepted and review) that carry a label.
    pub accuracy: f64,
    /// Correct predictions among accepted results.
    pub accepted_accuracy: f64,
    pub throughput_rps: f64,
    pub latency_ms: Latency,
    pub elapsed_s: f64,
    /// AWS requests the pipeline sent per record in (AWS backend only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_requests_per_record: Option<f64>,
    /// Of those, the requests that move records (`requests_moving_records`), per record in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_record_requests_per_record: Option<f64>,
    /// The rest (leases, reads of a caught-up stream, queue-depth samples, look-ups at start) per
    /// second of the run: they grow with time and workers, not records, so a short or slow run
    /// pays more of them per record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_coordination_requests_per_s: Option<f64>,
    /// Those requests by service and operation.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub aws_requests: BTreeMap<String, u64>,
    /// DLQ entries by stage and reason code.
    pub dlq_reasons: BTreeMap<String, u64>,
    /// The prefix of the AWS resources the demo ran on (AWS backend only). Those it made are
    /// left in place: `sluice aws teardown --prefix P` deletes them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_prefix: Option<String>,
    /// Results and review entries by the backend that served their prediction.
    pub served_by: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// Shards of the stream the demo creates on AWS: one takes 1,000 records a second, and the
/// producer's retries of what a shard refuses carry a larger `--repeat` through.
const DEMO_AWS_SHARDS: u32 = 1;

pub async fn demo(args: &DemoArgs, settings: Settings) -> anyhow::Result<Summary> {
    let temp = tempfile::tempdir()?;
    let mut settings = args.inference.apply(args.store.apply(settings));
    let model_dir = settings.model()?.dir;
    if model_dir == sluice_core::config::ModelConfig::default().dir && !model_dir.exists() {
        // Run away from the repository (an installed binary): its own digits model, as its data.
        let built_in = temp.path().join("digits-model");
        crate::digits::write_model(&built_in)?;
        eprintln!(
            "{} is not here: the demo runs the digits model built into sluice (the other commands read [model] dir, \
             or SLUICE__MODEL__DIR: `sluice train --out DIR` makes a bundle)",
            model_dir.display()
        );
        settings = settings.set("model.dir", &built_in);
    }
    // Before anything is made: a run that cannot load its model would leave AWS resources behind.
    sluice_core::model::ModelBundle::load(settings.model()?.dir)?;
    let mut made = None;
    match settings.store()?.backend {
        BackendKind::Embedded => {
            let path = match &args.store.store {
                Some(path) if path.exists() => {
                    bail!("{} already exists; the demo starts from a fresh store", path.display())
                }
                Some(path) => path.clone(),
                None => temp.path().join("demo.sqlite"),
            };
            settings = settings.set("store.path", &path);
        }
        BackendKind::Aws => {
            if args.store.prefix.is_none() {
                // Fresh resources, sized to the demo: a few hundred records need far less than one
                // shard's 1 MB/s, and every shard adds idle reads and lease renewals that a run
                // this short pays for per record.
                settings = settings
                    .set("store.aws.prefix", format!("sluice-demo-{}", run_tag()))
                    .set("store.shards", DEMO_AWS_SHARDS);
            }
            let store = settings.store()?;
            if args.no_bootstrap {
                sluice_core::backend::aws::bootstrap::check(&store).await?;
            } else {
                // Failed half way, what it made bills on: say which prefix to tear down.
                let prefix = &store.aws.prefix;
                sluice_core::backend::aws::bootstrap::bootstrap(&store).await.with_context(|| {
                    format!(
                        "bootstrapping prefix {prefix}: `sluice aws teardown --prefix {prefix}` deletes what it made"
                    )
                })?;
                made = Some(prefix.clone());
            }
        }
    }
    // Stopped by Ctrl-C, it ends as a failed run does: the prefix it made is named (and a
    // temporary store deleted), where the signal's default would end it without a word.
    let stop = sluice_core::shutdown::on_signal();
    let ran = tokio::select! {
        ran = run(args, &settings) => ran,
        () = stop.cancelled() => Err(anyhow::anyhow!("stopped by a signal before the demo was done")),
    };
    // What the run made stays, and bills: a run that failed says which prefix to tear down.
    match made {
        Some(prefix) => ran.with_context(|| {
            format!(
                "the demo's resources stay under prefix {prefix}: `sluice aws teardown --prefix {prefix}` deletes them"
            )
        }),
        None => ran,
    }
}

/// The demo on the store `settings` name, made or checked already.
async fn run(args: &DemoArgs, settings: &Settings) -> anyhow::Result<Summary> {
    let store = settings.store()?;
    let backend = Backend::open(&store).await?;
    if store.backend == BackendKind::Aws {
        // The summary is read back from the resources: records already there would be counted.
        // On an observer's handle: these requests are not the pipeline's.
        let stats = PipelineStats::collect(&Backend::open_observer(&store).await?).await?;
        let there = stats.records_in + stats.stream.pending + stats.accounted();
        if there > 0 {
            bail!(
                "prefix {:?} holds {there} records already, and the demo's counts are of everything there: run \
                 it without --prefix (it makes fresh resources of its own)",
                store.aws.prefix
            );
        }
    }

    let test = digits::load_split(Split::Test)?;
    let records =
        digit_records(&test, Split::Test, args.repeat.max(1), DigitForm::from_flags(false, args.photos), &run_tag());
    let ingest: sluice_ingest::IngestConfig = settings.section("ingest")?;
    let mut bad = sluice_ingest::samples::bad_records(&test[0].to_png(), ingest.max_payload_bytes);
    if store.backend == BackendKind::Aws {
        // Kinesis refuses a record over 1 MiB: with `ingest.max_payload_bytes` that high, the
        // oversized sample cannot be written inline, as a producer that checks nothing would.
        if !bad.iter().all(|b| b.input.fits()) {
            eprintln!(
                "the oversized sample is left out: ingest.max_payload_bytes ({}) is over what one stream record \
                 carries (1 MiB)",
                ingest.max_payload_bytes
            );
            bad.retain(|b| b.input.fits());
        }
    }

    let started = Instant::now();
    put_all(&backend, records, &ingest).await?;
    // As a producer that checks nothing writes them: the oversized one inline, not claim-checked.
    backend.stream.put_records(bad.into_iter().map(|b| b.input).collect()).await?;
    crate::pipeline::run_all(settings, CancellationToken::new(), true, &Health::new(StageName::ALL.len())).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let pipeline_requests = requests().snapshot();
    let mut summary = summarise(&Backend::open_observer(&store).await?, elapsed).await?;
    if store.backend == BackendKind::Aws {
        let records_in = summary.records_in.max(1) as f64;
        let total: u64 = pipeline_requests.values().sum();
        let moving = requests_moving_records(&pipeline_requests);
        summary.aws_requests_per_record = Some(total as f64 / records_in);
        summary.aws_record_requests_per_record = Some(moving as f64 / records_in);
        summary.aws_coordination_requests_per_s = Some((total - moving) as f64 / elapsed.max(1e-9));
        summary.aws_requests = pipeline_requests;
        summary.aws_prefix = Some(store.aws.prefix.clone());
    }
    Ok(summary)
}

pub async fn summarise(backend: &Backend, elapsed_s: f64) -> anyhow::Result<Summary> {
    let stats = PipelineStats::collect(backend).await?;
    let results = all_results(backend).await?;
    let labelled: Vec<bool> = results.iter().filter_map(PredictionResult::is_correct).collect();
    let accepted: Vec<bool> = results
        .iter()
        .filter(|r| r.status == sluice_core::record::ResultStatus::Accepted)
        .filter_map(PredictionResult::is_correct)
        .collect();
    let mut latencies: Vec<u64> = results.iter().filter_map(PredictionResult::latency_ms).collect();
    latencies.sort_unstable();
    Ok(Summary {
        records_in: stats.records_in,
        results: stats.results,
        review: stats.review,
        dlq: stats.dlq.clone(),
        accuracy: fraction(&labelled),
        accepted_accuracy: fraction(&accepted),
        throughput_rps: stats.records_in as f64 / elapsed_s.max(1e-9),
        latency_ms: Latency { p50: percentile(&latencies, 0.50), p99: percentile(&latencies, 0.99) },
        elapsed_s,
        aws_requests_per_record: None,
        aws_record_requests_per_record: None,
        aws_coordination_requests_per_s: None,
        aws_requests: BTreeMap::new(),
        aws_prefix: None,
        dlq_reasons: dlq_reasons(backend).await?,
        served_by: results.iter().fold(BTreeMap::new(), |mut by, r| {
            *by.entry(r.backend.clone()).or_default() += 1;
            by
        }),
    })
}

/// Every stored result, in record id order (a reviewer's rejection's marker is none).
pub async fn all_results(backend: &Backend) -> anyhow::Result<Vec<PredictionResult>> {
    let mut out: Vec<PredictionResult> = Vec::new();
    let mut after = None;
    loop {
        let page = backend.results.scan(after.as_ref(), 1000, None).await?;
        let Some(last) = page.last() else { return Ok(out) };
        after = Some(last.record_id.clone());
        out.extend(page.into_iter().filter(|r| r.status != sluice_core::record::ResultStatus::Rejected));
    }
}

async fn dlq_reasons(backend: &Backend) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for stage in StageName::ALL {
        let all = sluice_core::dlq::Filter::default();
        for item in sluice_core::dlq::list(backend, Letters::Stage(stage), &all, usize::MAX).await? {
            *out.entry(format!("{stage}/{}", item.entry.reason)).or_default() += 1;
        }
    }
    Ok(out)
}

fn fraction(flags: &[bool]) -> f64 {
    flags.iter().filter(|&&ok| ok).count() as f64 / flags.len().max(1) as f64
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

impl Summary {
    pub fn print_text(&self) -> std::io::Result<()> {
        let dlq_total: u64 = self.dlq.values().sum();
        outln!("sluice demo: {} records through ingest → features → inference → results", self.records_in)?;
        outln!()?;
        outln!("  records in      {:>8}", self.records_in)?;
        outln!("  results         {:>8}   (accepted above their class threshold)", self.results)?;
        outln!("  review          {:>8}   (below threshold, waiting for a person)", self.review)?;
        for (stage, n) in &self.dlq {
            outln!("  dlq {:<11} {:>8}", stage.as_str(), n)?;
        }
        outln!("  accounted       {:>8}   (results + review + dlq)", self.results + self.review + dlq_total)?;
        outln!()?;
        outln!("  accuracy        {:>8.2}%  over all labelled results", self.accuracy * 100.0)?;
        outln!("  accepted acc.   {:>8.2}%  over accepted results", self.accepted_accuracy * 100.0)?;
        outln!("  throughput      {:>8.0} records/s  ({:.2} s end to end)", self.throughput_rps, self.elapsed_s)?;
        outln!("  latency p50     {:>8.0} ms  (produced → result stored)", self.latency_ms.p50)?;
        outln!("  latency p99     {:>8.0} ms", self.latency_ms.p99)?;
        let served: Vec<String> = self.served_by.iter().map(|(backend, n)| format!("{backend} {n}")).collect();
        outln!("  served by       {}", served.join(", "))?;
        if let Some(per_record) = self.aws_requests_per_record {
            outln!("  AWS requests    {per_record:>8.2} per record")?;
        }
        if let (Some(moving), Some(per_s)) = (self.aws_record_requests_per_record, self.aws_coordination_requests_per_s)
        {
            outln!("    moving records{moving:>8.2} per record  (queues, feature store, results, capture)")?;
            outln!(
                "    coordination  {per_s:>8.2} per second  (leases, stream reads, queue depths: with time, not records)"
            )?;
        }
        if !self.dlq_reasons.is_empty() {
            outln!()?;
            outln!("  dead-lettered, by reason:")?;
            for (reason, n) in &self.dlq_reasons {
                outln!("    {reason:<40} {n}")?;
            }
        }
        if let Some(prefix) = &self.aws_prefix {
            outln!()?;
            outln!("  The AWS resources of prefix {prefix} stay (a stream bills by the hour); to delete them:")?;
            outln!("    sluice aws teardown --prefix {prefix} (with the same --endpoint-url, if any)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
