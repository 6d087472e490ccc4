//! `sluice-api`: the results and review HTTP API on its own (`sluice serve` is the same).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sluice_core::backend::Backend;
use sluice_core::config::{Settings, StoreArgs};
use sluice_core::model::ModelBundle;

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
        // A taken port is said at once, not after the store has answered; it is held only once
        // the API can answer on it (a client meanwhile is refused, not left waiting).
        let address = SocketAddr::new(args.address, args.port);
        drop(sluice_api::bind(address).await?);
        let state = sluice_api::ApiState::new(
            Backend::open_watcher(&settings.store()?).await?,
            ModelBundle::load(settings.model()?.dir)?.manifest.labels,
        );
        let listener = sluice_api::bind(address).await?;
        sluice_api::serve(listener, state, sluice_core::shutdown::on_signal()).await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the results API stopped");
            ExitCode::FAILURE
        }
    }
}
