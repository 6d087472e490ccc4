//! What every worker binary shares: its command line, its start-up, and its graceful stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{Settings, StoreArgs};
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
    /// This worker's name in shard leases; defaults to host and process id.
    #[arg(long)]
    pub worker_id: Option<String>,
}

impl WorkerArgs {
    pub fn settings(&self) -> Result<Settings, BuildError> {
        Ok(self.store.apply(Settings::load(self.config.as_deref())?))
    }
}

/// A worker name unique among live processes.
pub fn default_worker_id(stage: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned());
    format!("{stage}-{host}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Runs one stage's worker until `shutdown`, then gives it the configured grace period.
pub async fn serve(
    stage: Arc<dyn Stage>,
    settings: &Settings,
    backend: Backend,
    worker_id: &str,
    shutdown: CancellationToken,
) -> Result<WorkerReport, BuildError> {
    let store = settings.store()?;
    let worker_config = settings.worker()?;
    let grace = Duration::from_millis(worker_config.shutdown_grace_ms);
    let source = source_for(stage.name(), &backend, &store, worker_id).await?;
    let ledger = Arc::clone(&backend.requests);
    let worker = Worker::new(stage, source, backend, worker_config, &store);
    let reporting = tokio::spawn(report_requests(Arc::clone(&ledger), shutdown.clone()));
    let mut running = tokio::spawn(worker.run(shutdown.clone()));
    let finished: Result<WorkerReport, BuildError> = tokio::select! {
        finished = &mut running => flatten(finished),
        _ = shutdown.cancelled() => match tokio::time::timeout(grace, running).await {
            Ok(finished) => flatten(finished),
            Err(_) => Err(format!("in-flight work did not finish within the {grace:?} grace period; it will be redelivered").into()),
        },
    };
    reporting.abort();
    if let Err(e) = crate::backend::aws::flush_requests(ledger.as_ref()).await {
        tracing::warn!(error = %e, "could not record this worker's AWS requests");
    }
    finished
}

fn flatten(joined: Result<crate::Result<WorkerReport>, tokio::task::JoinError>) -> Result<WorkerReport, BuildError> {
    Ok(joined??)
}

/// How often a worker adds its AWS requests to the shared ledger.
const REQUEST_REPORT_EVERY: Duration = Duration::from_secs(10);

async fn report_requests(ledger: Arc<dyn crate::backend::RequestLedger>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REQUEST_REPORT_EVERY) => {}
        }
        if let Err(e) = crate::backend::aws::flush_requests(ledger.as_ref()).await {
            tracing::warn!(error = %e, "could not record this worker's AWS requests");
        }
    }
}

/// The whole `main` of a worker binary: parse arguments, build the stage, run until signalled.
pub fn binary_main<S, F>(stage_name: &str, build: F) -> ExitCode
where
    S: Stage + 'static,
    F: FnOnce(&Settings, &Backend) -> Result<S, BuildError>,
{
    let _telemetry = crate::telemetry::init("info");
    let args = WorkerArgs::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let settings = args.settings()?;
        let backend = Backend::open(&settings.store()?).await?;
        let stage = build(&settings, &backend)?;
        let worker_id = args.worker_id.clone().unwrap_or_else(|| default_worker_id(stage_name));
        tracing::info!(worker_id, backend = ?settings.store()?.backend, "{stage_name} worker started");
        serve(Arc::new(stage), &settings, backend, &worker_id, crate::shutdown::on_signal()).await
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{stage_name} worker failed");
            ExitCode::FAILURE
        }
    }
}
