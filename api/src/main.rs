//! `sluice-api`: the results and review HTTP API on its own (`sluice serve` is the same).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
    /// Address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    address: IpAddr,
    #[arg(long, default_value_t = sluice_api::DEFAULT_PORT)]
    port: u16,
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
        sluice_api::run(&settings, SocketAddr::new(args.address, args.port)).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the results API stopped");
            ExitCode::FAILURE
        }
    }
}
