//! All four stages in one process (`sluice run`, `sluice demo`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use sluice_core::backend::Backend;
use sluice_core::config::{BackendKind, Settings};
use sluice_core::service::{BuildError, default_worker_id, recording_requests, serve};
use sluice_core::stats::PipelineStats;
use sluice_core::telemetry::health::Health;
use sluice_core::topology::StageName;
use sluice_core::worker::Stage;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How many looks in a row `--until-drained` needs to find the store drained: two when every
/// record is accounted for, more when some are not (duplicate record ids, or queue counts that
/// lag, as SQS's approximate ones can).
const DRAINED_LOOKS: u32 = 2;
const DRAINED_LOOKS_UNACCOUNTED: u32 = 25;

pub fn build_stage(stage: StageName, settings: &Settings, backend: &Backend) -> Result<Arc<dyn Stage>, BuildError> {
    Ok(match stage {
        StageName::Ingest => Arc::new(sluice_ingest::IngestStage::build(settings, backend)?),
        StageName::Features => Arc::new(sluice_features::FeaturesStage::build(settings, backend)?),
        StageName::Inference => Arc::new(sluice_inference::InferenceStage::build(settings, backend)?),
        StageName::Results => Arc::new(sluice_results::ResultsStage::build(settings, backend)?),
    })
}

/// Runs every stage until `shutdown` (or, with `until_drained`, until nothing is left to do),
/// telling `health` as each starts and stops (`Health::new(4)`).
pub async fn run_all(
    settings: &Settings,
    shutdown: CancellationToken,
    until_drained: bool,
    health: &Health,
) -> anyhow::Result<()> {
    run_built(settings, build_all(settings).await?, shutdown, until_drained, health).await
}

/// Every stage, built on one handle before any starts.
pub struct Built {
    /// On the embedded store the process's one connection, on AWS one set of SDK clients (one
    /// connection pool) and one look-up of each queue's URL.
    shared: Backend,
    stages: Vec<(StageName, Arc<dyn Stage>)>,
}

/// Builds every stage (the model loaded and warmed up) before any starts: a stage that cannot be
/// built (a missing model, say) stops the run before the others have done work whose AWS
/// requests would go unrecorded.
pub async fn build_all(settings: &Settings) -> anyhow::Result<Built> {
    let shared = Backend::open(&settings.store()?).await?;
    let stages = StageName::ALL
        .into_iter()
        .map(|stage_name| {
            let stage = build_stage(stage_name, settings, &shared).map_err(|e| anyhow!("{stage_name}: {e}"))?;
            Ok((stage_name, stage))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Built { shared, stages })
}

/// [`run_all`] of stages built already.
async fn run_built(
    settings: &Settings,
    built: Built,
    shutdown: CancellationToken,
    until_drained: bool,
    health: &Health,
) -> anyhow::Result<()> {
    let store = settings.store()?;
    let mut workers = JoinSet::new();
    let Built { shared, stages } = built;
    for (stage_name, stage) in stages {
        let backend = shared.clone();
        let (settings, token, health) = (settings.clone(), shutdown.clone(), health.clone());
        workers.spawn(async move {
            let worker_id = default_worker_id(stage_name.as_str());
            serve(stage, &settings, backend, &worker_id, token, &health)
                .await
                .map_err(|e| anyhow!("{stage_name} worker: {e}"))
        });
    }
    if until_drained {
        let backend = Backend::open_observer(&store).await?;
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut looks = 0;
            let mut needed = DRAINED_LOOKS;
            while !token.is_cancelled() {
                tokio::time::sleep(drain_check(backend.kind())).await;
                match drained_look(&backend).await {
                    Ok(Some(stats)) => {
                        looks += 1;
                        needed = if stats.accounted() >= stats.records_in {
                            DRAINED_LOOKS
                        } else {
                            DRAINED_LOOKS_UNACCOUNTED
                        };
                    }
                    Ok(None) => looks = 0,
                    Err(e) => tracing::warn!(error = %e, "cannot read pipeline stats"),
                }
                if looks >= needed {
                    tracing::info!("stream and queues drained; stopping");
                    token.cancel();
                }
            }
        });
    }
    let stopped = async {
        let mut first_error = None;
        while let Some(joined) = workers.join_next().await {
            let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = outcome {
                shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        first_error
    };
    recording_requests(&shared, stopped).await.map_or(Ok(()), Err)
}

/// How often `--until-drained` looks at the store. The embedded store answers from its file;
/// on AWS a look is requests to a shared endpoint (up to a dozen: queue depths, the lease table,
/// a Kinesis read past each checkpoint) that would compete with the workers' own.
fn drain_check(kind: BackendKind) -> Duration {
    match kind {
        BackendKind::Embedded => Duration::from_millis(200),
        BackendKind::Aws => Duration::from_secs(1),
    }
}

/// The pipeline's stats when it looks drained, `None` when it does not. The work queues are
/// read first, on their own, as they are what is busy while records flow; the full look
/// reads them again after the stream, in the order records move, so none is missed in between.
async fn drained_look(backend: &Backend) -> sluice_core::error::Result<Option<PipelineStats>> {
    if PipelineStats::work_queued(backend).await? > 0 {
        return Ok(None);
    }
    let stats = PipelineStats::collect(backend).await?;
    Ok(stats.is_drained().then_some(stats))
}

/// All four stages running in a task of this process until stopped: the benches' pipeline.
pub struct InProcess {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    shutdown: CancellationToken,
}

impl InProcess {
    /// Builds the stages and starts them; returns once they are built (the model loaded and
    /// warmed up), so that a bench times the stages' work, as it does the bare loop's.
    pub async fn start(settings: &Settings) -> anyhow::Result<Self> {
        let built = build_all(settings).await?;
        let shutdown = CancellationToken::new();
        let (settings, stop) = (settings.clone(), shutdown.clone());
        let task = tokio::spawn(async move { run_built(&settings, built, stop, false, &Health::new(4)).await });
        Ok(Self { task, shutdown })
    }

    /// Returns once `records` are accounted for (results, review, DLQs); fails if the pipeline
    /// stops first. `backend` is best an observer ([`Backend::open_observer`]): the looks come
    /// every 20 to 250 ms, often only near the end.
    pub async fn wait_accounted(&mut self, backend: &Backend, records: u64) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if self.task.is_finished() {
                anyhow::bail!("the pipeline stopped before its records were through: {:?}", (&mut self.task).await?);
            }
            let accounted = PipelineStats::accounted_in(backend).await?;
            if accounted >= records {
                return Ok(());
            }
            tokio::time::sleep(next_look(started.elapsed(), accounted, records)).await;
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// How long to wait before counting again: half the time the rate so far says is left, from 20
/// to 250 ms. Each count reads every result so far (on a connection of its own, but on the cores
/// the stages run on): a count every 20 ms took ~3% of the CPU of a 20,000-record bench.
fn next_look(elapsed: Duration, accounted: u64, records: u64) -> Duration {
    let left = (records.saturating_sub(accounted) as f64 / accounted as f64) * elapsed.as_secs_f64();
    Duration::try_from_secs_f64(left / 2.0)
        .unwrap_or(Duration::MAX)
        .clamp(Duration::from_millis(20), Duration::from_millis(250))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_often_only_near_the_end() {
        let second = Duration::from_secs(1);
        assert_eq!(next_look(Duration::ZERO, 0, 100), Duration::from_millis(250), "nothing through yet");
        assert_eq!(next_look(second, 50, 100), Duration::from_millis(250), "a second to go");
        assert_eq!(next_look(second, 80, 100), Duration::from_millis(125), "a quarter second to go");
        assert_eq!(next_look(second, 99, 100), Duration::from_millis(20), "all but through");
    }
}
