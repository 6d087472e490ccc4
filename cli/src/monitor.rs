//! `sluice monitor`: accuracy and drift over the rolling window, alerts on crossings; once
//! (for cron or an ECS scheduled task) or `--watch`. `--set-reference` saves a window's
//! profile as what drift is measured against. The work is `sluice_monitor::check`.

use std::time::Duration;

use sluice_core::backend::Backend;
use sluice_core::config::{Settings, StoreArgs};
use sluice_core::envelope::now_ms;
use sluice_core::model::ModelBundle;
use sluice_core::telemetry::health::Health;
use sluice_monitor::MonitorConfig;
use sluice_monitor::alert::Notifier;
use sluice_monitor::check::{MonitorRun, run_once, set_reference};

use crate::dlq::parse_time;

#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Run the checks every `monitor.interval_s` until stopped, instead of once.
    #[arg(long)]
    pub watch: bool,
    /// Save the profile of a window judged healthy (`--since`, `--until`; default the monitor's
    /// window) as the reference drift is measured against, and stop.
    #[arg(long)]
    pub set_reference: bool,
    /// With `--set-reference`: the window's start (RFC 3339 or an age such as `2h`).
    #[arg(long, requires = "set_reference")]
    pub since: Option<String>,
    /// With `--set-reference`: the window's end (default now).
    #[arg(long, requires = "set_reference")]
    pub until: Option<String>,
    /// POST alerts here (overrides `monitor.webhook_url`). A hook's URL is its secret and a flag
    /// shows in `ps`: on a shared machine prefer `SLUICE__MONITOR__WEBHOOK_URL`.
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Print each pass as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &MonitorArgs, settings: Settings) -> anyhow::Result<()> {
    let mut settings = args.store.apply(settings);
    if let Some(url) = &args.webhook_url {
        settings = settings.set("monitor.webhook_url", url);
    }
    let config: MonitorConfig = settings.section("monitor")?;
    let store = settings.store()?;
    // Watching, it may start before the workers; once, it reports on a store that is there.
    let backend =
        if args.watch { Backend::open_watcher(&store).await? } else { Backend::open_observer(&store).await? };
    if args.set_reference {
        let (since, until) = window(args.since.as_deref(), args.until.as_deref(), &config)?;
        let reference = set_reference(&backend, since, until, &config).await?;
        outln!(
            "reference saved in {}: {} predictions ({} with feature vectors)",
            backend.capture.location(),
            reference.profile.records,
            reference.profile.feature_records
        )?;
        return Ok(());
    }
    let manifest = ModelBundle::load(settings.model()?.dir)?.manifest;
    let notifier = Notifier::new(&config, &store.aws).await;
    let shutdown = sluice_core::shutdown::on_signal();
    // Watching, the monitor's gauges and alert counts are on /metrics, as a worker's are: on
    // `telemetry.port` when it is set, else on a port of the monitor's own beside `sluice run`'s.
    let _endpoints = if args.watch {
        if settings.telemetry()?.port.is_none() {
            settings = settings.set("telemetry.port", sluice_core::telemetry::health::MONITOR_PORT);
        }
        Some(
            sluice_core::service::spawn_health_endpoints(&settings, None, Health::new(0))
                .map_err(|e| anyhow::anyhow!(e))?,
        )
    } else {
        None
    };
    loop {
        // A signal stops a pass while it reads (the one-shot pass is the scheduled task's, whose
        // stop would otherwise wait for SIGKILL); alerts under way are sent and recorded first.
        let pass = match run_once(&backend, &config, &manifest, &notifier, now_ms(), shutdown.cancelled()).await {
            Ok(Some(pass)) => pass,
            Ok(None) if args.watch => return Ok(()),
            Ok(None) => anyhow::bail!("stopped by a signal before the pass was judged: nothing sent or recorded"),
            // Watching, a store that is busy for a moment is tried again at the next pass.
            Err(error) if args.watch && error.is_retryable() => {
                tracing::warn!(%error, "monitor pass failed; trying again at the next");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(config.interval_s.max(1))) => {}
                }
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        if args.json {
            outln!("{}", serde_json::to_string(&pass)?)?;
        } else {
            print_text(&pass)?;
        }
        if !args.watch {
            anyhow::ensure!(pass.undelivered.is_empty(), "alerts not delivered: {}", pass.undelivered.join("; "));
            return Ok(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(config.interval_s.max(1))) => {}
        }
    }
}

/// `--since` and `--until` (RFC 3339 or ages), defaulting to the monitor's window ending now.
pub(crate) fn window(since: Option<&str>, until: Option<&str>, config: &MonitorConfig) -> anyhow::Result<(u64, u64)> {
    let until = until.map(parse_time).transpose()?.unwrap_or_else(now_ms);
    let since = since.map(parse_time).transpose()?.unwrap_or_else(|| config.window_start(until));
    anyhow::ensure!(since <= until, "--since must come before --until");
    Ok((since, until))
}

/// A window's length as people write it: `7 days`, `1 hour`, or humantime's `1h 30m`.
fn span_text(seconds: u64) -> String {
    let plural = |n: u64, unit: &str| if n == 1 { format!("1 {unit}") } else { format!("{n} {unit}s") };
    match seconds {
        s if s >= 86_400 && s % 86_400 == 0 => plural(s / 86_400, "day"),
        s if s >= 3_600 && s % 3_600 == 0 => plural(s / 3_600, "hour"),
        s => humantime::format_duration(Duration::from_secs(s)).to_string(),
    }
}

fn print_text(pass: &MonitorRun) -> std::io::Result<()> {
    outln!("sluice monitor: {} predictions over {}", pass.records, span_text((pass.until_ms - pass.since_ms) / 1000))?;
    for check in &pass.checks {
        let verdict = match check.breached {
            Some(true) => "BREACHED",
            Some(false) => "ok",
            None => "not judged",
        };
        outln!("  {:<18} {:<10} {}", check.name, verdict, check.detail)?;
    }
    for alert in &pass.alerts {
        outln!("  alert {:?}: {}", alert.status, alert.text)?;
    }
    for failure in &pass.undelivered {
        outln!("  NOT DELIVERED {failure}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_read_as_people_write_them() {
        assert_eq!(span_text(7 * 86_400), "7 days");
        assert_eq!(span_text(3_600), "1 hour");
        assert_eq!(span_text(5_400), "1h 30m");
    }
}
