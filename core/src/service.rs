//! What every worker binary shares: its command line, its start-up, and its graceful stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backend::Backend;
use crate::config::{Settings, StoreArgs};
use crate::telemetry::health::{self, Health};
use crate::telemetry::metrics::metrics;
use crate::topology::{QueueName, StageName};
use crate::worker::{Stage, Worker, WorkerReport, source_for};

/// An error while building a stage (bad config, missing model bundle…).
pub type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// The command line of `sluice-ingest`, `sluice-features`, `sluice-inference`, `sluice-results`.
#[derive(Debug, Clone, Parser)]
pub struct WorkerArgs {
    /// TOML configuration file (environment `SLUICE__SECTION__KEY` overrides it).
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// This worker's name in its logs and, at ingest, in the shard leases it holds; defaults to
    /// host and process id.
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Do not run: ask the health endpoint of this worker kind on this host (`/healthz`) and
    /// exit 0 if it answers 200 (the container health check; the images have no curl).
    #[arg(long)]
    pub healthcheck: bool,
}

impl WorkerArgs {
    /// The command line of `stage`'s worker, its help saying what the worker does.
    fn for_stage(stage: StageName) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let (name, does) = match stage {
            StageName::Ingest => {
                ("sluice-ingest", "reads the stream, checks each record and sends it on to features (or to its DLQ)")
            }
            StageName::Features => (
                "sluice-features",
                "turns each record into its feature vector, stores it and sends the record to inference",
            ),
            StageName::Inference => (
                "sluice-inference",
                "runs the model on batches of feature vectors (the SageMaker fallback when it fails)",
            ),
            StageName::Results => {
                ("sluice-results", "stores each prediction, and sends those under their class threshold to review")
            }
        };
        let command = Self::command()
            .name(name)
            .about(format!("The {stage} worker: it {does}."))
            .version(env!("CARGO_PKG_VERSION"));
        Self::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
    }

    pub fn settings(&self) -> Result<Settings, BuildError> {
        Ok(self.store.apply(Settings::load(self.config.as_deref())?))
    }
}

/// A worker name unique among live processes.
pub fn default_worker_id(stage: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned());
    format!("{stage}-{host}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Runs one stage's worker until `shutdown`, then gives it the configured grace period; tells
/// `health` once it runs and again when it stops.
pub async fn serve(
    stage: Arc<dyn Stage>,
    settings: &Settings,
    backend: Backend,
    worker_id: &str,
    shutdown: CancellationToken,
    health: &Health,
) -> Result<WorkerReport, BuildError> {
    let store = settings.store()?;
    let worker_config = settings.worker()?;
    let grace = Duration::from_millis(worker_config.shutdown_grace_ms);
    let source = source_for(stage.name(), &backend, &store, worker_id).await?;
    let depths = tokio::spawn(watch_queues(backend.clone(), stage.name(), shutdown.clone()));
    let abandon = CancellationToken::new();
    let worker = Worker::new(Arc::clone(&stage), source, backend, worker_config, &store)
        .reporting_to(health.clone())
        .abandoning_on(abandon.clone());
    let mut running = tokio::spawn(worker.run(shutdown.clone()));
    let finished: Result<WorkerReport, BuildError> = tokio::select! {
        finished = &mut running => flatten(finished),
        _ = shutdown.cancelled() => match { health.stopping(); stop_within(grace, &abandon, running) }.await {
            Ok(finished) => flatten(finished),
            Err(_) => Err(format!("in-flight work did not finish within the {grace:?} grace period; it will be redelivered").into()),
        },
    };
    depths.abort();
    finished
}

/// How often a process adds its AWS requests to the shared ledger.
const REQUEST_REPORT_EVERY: Duration = Duration::from_secs(30);

/// Runs `work` (the process's workers, until they have stopped), adding the process's AWS
/// requests to the shared ledger every [`REQUEST_REPORT_EVERY`] meanwhile and what is left once
/// it is done: one reporter a process, however many workers it runs (the ledger's write is
/// itself a request).
pub async fn recording_requests<T>(backend: &Backend, work: impl std::future::Future<Output = T>) -> T {
    let record = || async {
        if let Err(e) = crate::backend::aws::flush_requests(backend.requests.as_ref()).await {
            tracing::warn!(error = %e, "could not record this process's AWS requests");
        }
    };
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => {
                record().await;
                return done;
            }
            _ = tokio::time::sleep(REQUEST_REPORT_EVERY) => record().await,
        }
    }
}

/// Waits up to `grace` for the worker to finish its batch and stop; with a fifth of the grace
/// (at most 5 s) left, tells it to hand an unfinished batch back instead, so that what it holds
/// is visible to other workers at once and its leases are let go before the process is killed.
async fn stop_within(
    grace: Duration,
    abandon: &CancellationToken,
    running: tokio::task::JoinHandle<crate::Result<WorkerReport>>,
) -> Result<Result<crate::Result<WorkerReport>, tokio::task::JoinError>, tokio::time::error::Elapsed> {
    let finish_by = grace.saturating_sub((grace / 5).min(Duration::from_secs(5)));
    let abandon = abandon.clone();
    let deadline = tokio::spawn(async move {
        tokio::time::sleep(finish_by).await;
        abandon.cancel();
    });
    let stopped = tokio::time::timeout(grace, running).await;
    deadline.abort();
    stopped
}

fn flatten(joined: Result<crate::Result<WorkerReport>, tokio::task::JoinError>) -> Result<WorkerReport, BuildError> {
    Ok(joined??)
}

/// How often a worker reports the depth of the queues it reads and writes.
const QUEUE_DEPTH_EVERY: Duration = Duration::from_secs(15);

/// Reports the depth of `stage`'s input queue, its DLQ (and, for results, the review queue)
/// as metrics until `shutdown`, while anyone reads them (`telemetry::sampled_gauges_wanted`).
async fn watch_queues(backend: Backend, stage: StageName, shutdown: CancellationToken) {
    let mut queues: Vec<QueueName> = stage.input_queue().into_iter().chain([stage.dlq()]).collect();
    if stage == StageName::Results {
        queues.push(QueueName::Review);
    }
    loop {
        if crate::telemetry::sampled_gauges_wanted() {
            for &queue in &queues {
                match backend.queue(queue).depth().await {
                    Ok(depth) => metrics().queue_depth(queue, depth.visible, depth.in_flight),
                    Err(e) => tracing::debug!(%queue, error = %e, "queue depth not read"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(QUEUE_DEPTH_EVERY) => {}
            // Read at once for the first scrape, not up to an interval later.
            _ = crate::telemetry::sampling_wanted() => {}
        }
    }
}

/// Serves `/healthz` and `/readyz` for `stage` (or all of `sluice run`) where `[telemetry]`
/// says, until the returned guard drops: hold it past the workers' drain, so a stopping process
/// answers "not ready" rather than closing its port. A port already taken is an error: the
/// process stops rather than run unwatched (set `[telemetry] port = 0` to serve none).
pub fn spawn_health_endpoints(
    settings: &Settings,
    stage: Option<StageName>,
    health: Health,
) -> Result<DropGuard, BuildError> {
    let stop = CancellationToken::new();
    if let Some(address) = settings.telemetry()?.health_address(stage) {
        let store = settings.store()?.identity();
        // Bound here, not in the task: a port another process holds (a second worker of this kind
        // on one host) stops this one at start, rather than leave it running unwatched, without
        // /metrics and /readyz.
        let listener = std::net::TcpListener::bind(address)
            .and_then(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            })
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => format!(
                    "health endpoints on {address}: {e} (another process serves there: give this one a port \
                     of its own with SLUICE__TELEMETRY__PORT, or 0 for none)"
                ),
                _ => format!("health endpoints on {address}: {e} (telemetry.address and telemetry.port)"),
            })?;
        let stopped = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve(listener, health, store, stopped).await {
                tracing::error!(%address, error = %e, "health endpoints stopped");
            }
        });
    }
    Ok(stop.drop_guard())
}

/// How long a stopped process waits for the tasks still running (a model call on a blocking
/// thread) before it exits without them.
pub const RUNTIME_WIND_DOWN: std::time::Duration = std::time::Duration::from_millis(500);

/// The whole `main` of a worker binary: parse arguments, build the stage, run until signalled.
pub fn binary_main<S, F>(stage_name: StageName, build: F) -> ExitCode
where
    S: Stage + 'static,
    F: FnOnce(&Settings, &Backend) -> Result<S, BuildError>,
{
    let args = WorkerArgs::for_stage(stage_name);
    // Before any thread starts; a configuration that cannot be read is reported below.
    crate::threads::pin(args.settings().map(|s| crate::threads::configured(&s)).unwrap_or_default());
    let _telemetry = crate::telemetry::init(&format!("sluice-{stage_name}"), "info");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    if args.healthcheck {
        return runtime.block_on(healthcheck(&args, stage_name));
    }
    let result = runtime.block_on(async {
        let settings = args.settings()?;
        let shutdown = crate::shutdown::on_signal();
        let health = Health::new(1);
        let _endpoints = spawn_health_endpoints(&settings, Some(stage_name), health.clone())?;
        let backend = Backend::open(&settings.store()?).await?;
        let stage = build(&settings, &backend)?;
        let worker_id = args.worker_id.clone().unwrap_or_else(|| default_worker_id(stage_name.as_str()));
        tracing::info!(worker_id, backend = ?settings.store()?.backend, "{stage_name} worker started");
        recording_requests(&backend, serve(Arc::new(stage), &settings, backend.clone(), &worker_id, shutdown, &health))
            .await
    });
    // The worker has handed back what it held; a model call still running on a blocking thread
    // (its batch given back when the grace ran out) must not hold the exit past the grace, as
    // dropping the runtime would: it waits for every blocking task.
    runtime.shutdown_timeout(RUNTIME_WIND_DOWN);
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{stage_name} worker failed");
            ExitCode::FAILURE
        }
    }
}

async fn healthcheck(args: &WorkerArgs, stage: StageName) -> ExitCode {
    let address = match args.settings().map(|s| s.telemetry()) {
        Ok(Ok(config)) => config.local_address(Some(stage)),
        Ok(Err(e)) => return fail(&e),
        Err(e) => return fail(&*e),
    };
    let Some(address) = address else {
        eprintln!("health endpoints are off ([telemetry] port = 0)");
        return ExitCode::FAILURE;
    };
    match health::probe(address, "/healthz").await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => fail(&format!("{address}/healthz did not answer 200")),
        Err(e) => fail(&format!("{address}/healthz: {e}")),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("unhealthy: {error}");
    ExitCode::FAILURE
}
