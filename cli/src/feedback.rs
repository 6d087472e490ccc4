//! `sluice feedback --file labels.csv|labels.jsonl`: true labels onto results, by record id
//! (the work is `sluice_monitor::feedback`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use sluice_core::backend::Backend;
use sluice_core::config::{Settings, StoreArgs};
use sluice_core::model::ModelBundle;
use sluice_monitor::feedback::{FeedbackReport, LabelFormat, apply, parse_labels};

#[derive(Debug, clap::Args)]
pub struct FeedbackArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// CSV (`record_id,label`, header optional) or JSON lines (`{"record_id": …, "label": …}`,
    /// a `.jsonl`/`.ndjson`/`.json` file; a `.json` file may hold an array of them).
    #[arg(long)]
    pub file: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &FeedbackArgs, settings: Settings) -> anyhow::Result<FeedbackReport> {
    let settings = args.store.apply(settings);
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read the labels file {}", args.file.display()))?;
    let classes = ModelBundle::load(settings.model()?.dir)?.manifest.labels;
    let backend = Backend::open_observer(&settings.store()?).await?;
    let mut report = FeedbackReport::default();
    let labels = parse_labels(&text, LabelFormat::of(&args.file), &classes, &mut report.rejected);
    Ok(apply(backend.results.as_ref(), labels, report).await?)
}

/// Writes the report as text; the rejected lines may be many (a reader gone, `| head`, is an
/// error the caller passes over).
pub fn print_text(report: &FeedbackReport) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} labels: {} recorded, {} already known, {} for unknown record ids, {} lines rejected",
        report.labels,
        report.recorded,
        report.unchanged,
        report.unknown,
        report.rejected.len()
    )?;
    if !report.unknown_ids.is_empty() {
        let more = report.unknown - report.unknown_ids.len() as u64;
        let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
        writeln!(out, "  unknown: {}{tail}", report.unknown_ids.join(", "))?;
    }
    for line in &report.rejected {
        writeln!(out, "  rejected {line}")?;
    }
    Ok(())
}
