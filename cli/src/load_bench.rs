//! `sluice bench load`: latency under a steady load rather than a backlog.
//!
//! The pipeline's capacity comes from a short backlog run (`sluice bench pipeline`'s, or
//! `--capacity`); then, for each load (50% and 90% of it by default), the whole pipeline runs on
//! a fresh embedded store in this process (or on fresh resources at a local AWS endpoint, with
//! `--backend aws`) while the load generator writes labelled digits at that rate for `--duration`. Reported per load: end-to-end latency from arrival (the producer's
//! timestamp, taken as it writes) to the stored result, p50/p95/p99; how long records spent at
//! each stage (from one stage's timestamp to the next: its queue wait and its work); and whether
//! the backlog stayed bounded (sampled four times a second; bounded when what was still waiting
//! at the end of the load was under a second of arrivals more than the pipeline holds while it
//! keeps up: by Little's law, the rate times the median latency of what was stored meanwhile).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use sluice_core::backend::Backend;
use sluice_core::config::{BackendKind, Settings, StoreArgs};
use sluice_core::envelope::StageTimes;
use sluice_core::record::PredictionResult;
use sluice_core::stats::PipelineStats;
use sluice_core::topology::QueueName;
use tokio_util::sync::CancellationToken;

use crate::demo::{all_results, percentile};
use crate::digits::{Split, load_split};
use crate::load::Pattern;
use crate::pipeline_bench::{BenchPipelineArgs, bench_pipeline};
use crate::produce::{Catalogue, DigitForm, run_tag};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchLoadArgs {
    /// `--backend aws --endpoint-url URL`: each load on fresh resources there (a rate the
    /// endpoint sustains: give `--capacity`); default a fresh embedded store.
    #[command(flatten)]
    pub store: StoreArgs,
    /// How long each load runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub duration: Duration,
    /// The loads, as shares of the capacity.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.9")]
    pub loads: Vec<f64>,
    /// Records a second the pipeline can take (default: measured first, from a backlog of
    /// `--probe-records`).
    #[arg(long)]
    pub capacity: Option<f64>,
    #[arg(long, default_value_t = 5_000)]
    pub probe_records: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadBenchReport {
    /// Records a second from the backlog run.
    pub capacity: f64,
    pub runs: Vec<LoadRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadRun {
    pub load: f64,
    /// The rate asked…
    pub rate: f64,
    /// …and the rate the producer wrote at; the most records it was ever behind its schedule.
    /// Each record is stamped with when it was due, so a producer behind counts in the latency.
    pub achieved_rate: f64,
    pub most_behind: u64,
    pub records: u64,
    /// Arrival to stored result, in milliseconds.
    pub latency_ms: Percentiles,
    /// Per stage, from the previous stage's timestamp (arrival, for ingest) to its own.
    pub stage_ms: BTreeMap<&'static str, Percentiles>,
    /// The most records waiting (stream and work queues) at any sample, and at the load's end.
    pub max_backlog: u64,
    pub backlog_at_end: u64,
    pub bounded: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        Self { p50: percentile(&values, 0.50), p95: percentile(&values, 0.95), p99: percentile(&values, 0.99) }
    }
}

/// Arrival (the producer's timestamp) to stored result, and each stage's span: from the previous
/// stage's timestamp (arrival, for ingest) to its own, its queue wait and its work.
pub fn stage_spans(results: &[PredictionResult]) -> (Percentiles, BTreeMap<&'static str, Percentiles>) {
    let times: Vec<&StageTimes> = results.iter().map(|r| &r.timestamps).collect();
    let span = |from: fn(&StageTimes) -> Option<u64>, to: fn(&StageTimes) -> Option<u64>| {
        Percentiles::of(times.iter().filter_map(|t| Some(to(t)?.saturating_sub(from(t)?))).collect())
    };
    let stages = BTreeMap::from([
        ("1 ingest", span(|t| t.produced_ms, |t| t.ingested_ms)),
        ("2 features", span(|t| t.ingested_ms, |t| t.featured_ms)),
        ("3 inference", span(|t| t.featured_ms, |t| t.inferred_ms)),
        ("4 results", span(|t| t.inferred_ms, |t| t.stored_ms)),
    ]);
    (span(|t| t.produced_ms, |t| t.stored_ms), stages)
}

impl fmt::Display for LoadBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "capacity (backlog run): {:.0} records/s", self.capacity)?;
        for run in &self.runs {
            writeln!(f)?;
            writeln!(
                f,
                "{:.0}% load: {:.0} records/s asked, {:.0} written, {} records (at most {} behind schedule)",
                run.load * 100.0,
                run.rate,
                run.achieved_rate,
                run.records,
                run.most_behind
            )?;
            let l = run.latency_ms;
            writeln!(
                f,
                "  arrival → stored     p50 {:>6.0} ms   p95 {:>6.0} ms   p99 {:>6.0} ms",
                l.p50, l.p95, l.p99
            )?;
            for (stage, p) in &run.stage_ms {
                writeln!(f, "  at {stage:<17} p50 {:>6.0} ms   p95 {:>6.0} ms   p99 {:>6.0} ms", p.p50, p.p95, p.p99)?;
            }
            writeln!(
                f,
                "  backlog              at most {}, {} at the end of the load: {}",
                run.max_backlog,
                run.backlog_at_end,
                if run.bounded { "bounded" } else { "GROWING" }
            )?;
        }
        Ok(())
    }
}

pub async fn bench_load(args: &BenchLoadArgs, settings: Settings) -> anyhow::Result<LoadBenchReport> {
    // Each load runs on a fresh store of its own: a named one would be passed over.
    anyhow::ensure!(
        args.store.store.is_none(),
        "bench load makes a fresh store for each load: --store does not apply (--backend aws --endpoint-url URL \
         runs it on fresh AWS resources)"
    );
    let settings = args.store.apply(settings);
    let aws = settings.store()?.backend == BackendKind::Aws;
    let capacity = match args.capacity {
        Some(capacity) => capacity,
        None if aws => bail!("on AWS, give --capacity: the records a second the endpoint sustains"),
        None => {
            let probe = BenchPipelineArgs { records: args.probe_records, photos: false, json: false };
            bench_pipeline(&probe, settings.clone()).await?.pipeline_records_per_s
        }
    };
    let mut runs = Vec::new();
    for &load in &args.loads {
        if !(load > 0.0 && load.is_finite()) {
            bail!("--loads are positive shares of the capacity");
        }
        runs.push(run_at(&settings, load, capacity * load, args.duration).await?);
    }
    Ok(LoadBenchReport { capacity, runs })
}

/// Whether a run kept up: what waited at the end of the load is under a second of arrivals
/// beyond what a pipeline holds while it keeps up (Little's law: the rate times the time a
/// record spends inside, the median latency of the records stored while the load ran; those
/// drained after it waited for the backlog being judged). A pipeline that stores a share `1 − f`
/// of the arrivals ends a load of `T` seconds with about `f × rate × T` more waiting, while the
/// median record stored during it (stored at `T/2`) waited about `f × T / 2` more: it fails once
/// `f > 2 / T`, over the default 20 s a shortfall of a tenth of the rate.
fn is_bounded(backlog_at_end: u64, rate: f64, stored_during_p50_ms: f64) -> bool {
    (backlog_at_end as f64) < rate.max(1.0) * (1.0 + stored_during_p50_ms / 1000.0)
}

/// The median arrival-to-stored latency of the results stored by `until_ms` (0 when none were).
fn p50_stored_by(results: &[PredictionResult], until_ms: u64) -> f64 {
    let latencies = results
        .iter()
        .filter_map(|r| Some((r.timestamps.produced_ms?, r.timestamps.stored_ms?)))
        .filter(|&(_, stored)| stored <= until_ms)
        .map(|(produced, stored)| stored.saturating_sub(produced))
        .collect();
    Percentiles::of(latencies).p50
}

/// Waiting anywhere before a result: the stream past its checkpoints and the work queues.
fn backlog(stats: &PipelineStats) -> u64 {
    stats.stream.pending + QueueName::WORK.iter().map(|q| stats.queues[q].total()).sum::<u64>()
}

async fn run_at(settings: &Settings, load: f64, rate: f64, duration: Duration) -> anyhow::Result<LoadRun> {
    let dir = tempfile::tempdir()?;
    let settings = match settings.store()?.backend {
        BackendKind::Embedded => settings.clone().set("store.path", dir.path().join("load.sqlite")),
        BackendKind::Aws => {
            let fresh = settings
                .clone()
                .set("store.aws.prefix", format!("sluice-load-{}-{:.0}", run_tag(), load * 100.0))
                .set("store.shards", 2);
            sluice_core::backend::aws::bootstrap::bootstrap(&fresh.store()?).await?;
            fresh
        }
    }
    .set("telemetry.port", 0);
    let backend = Backend::open(&settings.store()?).await?;
    // Looks at the backlog and the results on a connection of their own (embedded) and
    // uncounted (AWS), so that watching the run costs its stages nothing.
    let observer = Backend::open_observer(&settings.store()?).await?;
    let mut pipeline = crate::pipeline::InProcess::start(&settings).await?;
    let sampling = CancellationToken::new();
    let sampler = {
        let (backend, stop) = (observer.clone(), sampling.clone());
        tokio::spawn(async move {
            // The most seen, and how many looks failed of how many.
            let (mut most, mut failed, mut looks) = (0, 0, 0);
            while !stop.is_cancelled() {
                looks += 1;
                match PipelineStats::collect(&backend).await {
                    Ok(stats) => most = most.max(backlog(&stats)),
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (most, failed, looks)
        })
    };
    let catalogue = Catalogue::digits(load_split(Split::Test)?, Split::Test, DigitForm::Png, &run_tag());
    let produced = crate::load::run(
        &backend,
        &catalogue,
        rate,
        duration,
        Pattern::Steady,
        &settings.section("ingest")?,
        &Default::default(),
    )
    .await?;
    let load_ended_ms = sluice_core::envelope::now_ms();
    let backlog_at_end = backlog(&PipelineStats::collect(&observer).await?);
    sampling.cancel();
    let (max_backlog, failed, looks) = sampler.await?;
    // A backlog never read is no backlog of 0.
    anyhow::ensure!(
        looks == 0 || failed < looks,
        "the backlog could not be read during the run ({failed} looks failed)"
    );
    pipeline.wait_accounted(&observer, produced.put.records).await?;
    pipeline.stop().await?;

    let results = all_results(&backend).await?;
    let (latency_ms, stage_ms) = stage_spans(&results);
    Ok(LoadRun {
        load,
        rate,
        achieved_rate: produced.put.records as f64 / produced.seconds.max(1e-9),
        most_behind: produced.most_behind,
        records: produced.put.records,
        latency_ms,
        stage_ms,
        max_backlog,
        backlog_at_end,
        bounded: is_bounded(backlog_at_end, rate, p50_stored_by(&results, load_ended_ms)),
    })
}

#[cfg(test)]
mod tests {
    use sluice_core::envelope::StageTimes;
    use sluice_core::record::{PredictionResult, ResultStatus};
    use sluice_core::testing::prediction_result;

    use super::{is_bounded, p50_stored_by};

    fn stored(produced_ms: u64, stored_ms: u64) -> PredictionResult {
        let mut result = prediction_result("r-1", "7", ResultStatus::Accepted);
        result.timestamps =
            StageTimes { produced_ms: Some(produced_ms), stored_ms: Some(stored_ms), ..StageTimes::default() };
        result
    }

    /// A load of 100/s for 20 s that the pipeline stores at `share` of, with 100 ms to go
    /// through when nothing waits: the backlog at the end, and the results of the whole run.
    fn run(share: f64) -> (u64, Vec<PredictionResult>) {
        let (rate, seconds, base_ms) = (100.0, 20.0, 100.0);
        let arrivals = (rate * seconds) as u64;
        let gap_ms = 1000.0 / rate;
        let results = (0..arrivals)
            .map(|i| {
                let produced = i as f64 * gap_ms;
                // Stored in arrival order, no sooner than base_ms after arrival, at share × rate.
                let at = (produced + base_ms).max(base_ms + i as f64 * gap_ms / share);
                stored(produced as u64, at as u64)
            })
            .collect::<Vec<_>>();
        let end_ms = (seconds * 1000.0) as u64;
        let waiting = results.iter().filter(|r| r.timestamps.stored_ms.unwrap() > end_ms).count() as u64;
        (waiting, results)
    }

    #[test]
    fn a_pipeline_that_falls_behind_is_not_bounded_however_far_behind() {
        for (share, bounded) in [(1.0, true), (0.95, true), (0.8, false), (0.5, false), (0.2, false)] {
            let (waiting, results) = run(share);
            let p50 = p50_stored_by(&results, 20_000);
            assert_eq!(is_bounded(waiting, 100.0, p50), bounded, "share {share}: {waiting} waiting, p50 {p50} ms");
        }
    }

    #[test]
    fn a_backlog_is_bounded_up_to_a_second_of_arrivals_past_what_the_latency_holds() {
        // 20 a second with a second's latency (the AWS stand-in on a slow host) holds 20 inside.
        assert!(is_bounded(37, 20.0, 1_011.0));
        assert!(!is_bounded(41, 20.0, 1_000.0));
        // Fast stores: a second of arrivals, as before.
        assert!(is_bounded(279, 2_051.0, 98.0));
        assert!(!is_bounded(2_300, 2_051.0, 98.0));
        assert!(is_bounded(0, 0.5, 10.0));
    }
}
