//! `sluice report --out DIR`: the monitoring report, one offline HTML page of charts (the work
//! is `sluice_monitor::report`).

use std::path::PathBuf;

use sluice_core::backend::Backend;
use sluice_core::config::{Settings, StoreArgs};
use sluice_core::model::ModelBundle;
use sluice_monitor::MonitorConfig;
use sluice_monitor::report::{ReportSummary, write};

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The directory to write `index.html` into (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// The window's start: RFC 3339 or an age such as `24h` (default: the monitor's window,
    /// `monitor.window_hours`).
    #[arg(long)]
    pub since: Option<String>,
    /// The window's end (default now).
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &ReportArgs, settings: Settings) -> anyhow::Result<ReportSummary> {
    let settings = args.store.apply(settings);
    let config: MonitorConfig = settings.section("monitor")?;
    let results: sluice_results::ResultsConfig = settings.section("results")?;
    let manifest = ModelBundle::load(settings.model()?.dir)?.manifest;
    let backend = Backend::open_observer(&settings.store()?).await?;
    let (since, until) = crate::monitor::window(args.since.as_deref(), args.until.as_deref(), &config)?;
    let sample_rate = results.capture.sample_rate;
    Ok(write(&backend, &config, &manifest, (since, until), sample_rate, &args.out).await?)
}

pub fn print_text(summary: &ReportSummary) -> std::io::Result<()> {
    outln!("report written to {}", summary.page.display())?;
    let accuracy = summary.accuracy.map_or("–".to_owned(), |a| format!("{:.1}%", a * 100.0));
    outln!(
        "  {} predictions, {} labelled (accuracy {accuracy}), {} sent to review ({} still waiting), {} dead-lettered, fallback {:.1}%, {} charts",
        summary.records,
        summary.labelled,
        summary.review,
        summary.review_waiting,
        summary.dead_lettered.values().sum::<u64>(),
        summary.fallback_share * 100.0,
        summary.charts
    )
}
