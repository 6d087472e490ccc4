//! `sluice-api`: the results and review HTTP API on its own (`sluice serve` is the same).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sluice_core::config::{Settings, StoreArgs};

/// The results and review HTTP API (`GET /results`, `POST /review/{id}`, `/openapi.json`), as
/// `sluice serve` serves it.
#[derive(Debug, Parser)]
#[command(name = "sluice-api", version)]
struct Args {
    /// TOML configuration file (environment `SLUICE__SECTION__KEY` overrides it).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    serve: sluice_api::ServeArgs,
}

fn main() -> ExitCode {
    let _telemetry = sluice_core::telemetry::init("sluice-api", "info");
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        let settings = args.store.apply(Settings::load(args.config.as_deref())?);
        sluice_api::run(&settings, &args.serve).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the results API stopped");
            ExitCode::FAILURE
        }
    }
}
