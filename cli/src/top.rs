//! `sluice top`: the pipeline live, refreshed in the terminal.
//!
//! From the store (any backend): records taken in and their rate, results and review, DLQ
//! entries and their growth, queue depths, the stream's backlog and lag. From whichever
//! workers' `/metrics` answer (the default ports on this host, or `--metrics`): each stage's
//! processed and failed rates, batch latency, and end-to-end latency percentiles.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_core::backend::Backend;
use sluice_core::stats::PipelineStats;
use sluice_core::telemetry::health::{self, TelemetryConfig};
use sluice_core::telemetry::scrape::{self, Sample};
use sluice_core::topology::{QueueName, StageName};

#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// Seconds between refreshes (0.2 to 3600); default 2, and 10 on AWS, where each refresh
    /// reads every shard past its checkpoint from the read quota ingest uses (5 calls and 2 MB a
    /// second a shard).
    #[arg(long, value_parser = seconds)]
    pub interval: Option<f64>,
    /// A worker's health/metrics address to read (repeatable). Default: the default port of
    /// every worker kind and of `sluice run` on this host, where one answers.
    #[arg(long = "metrics")]
    pub metrics: Vec<SocketAddr>,
    /// Print one view (after one interval, for the rates) and exit.
    #[arg(long)]
    pub once: bool,
}

/// What one look at the pipeline found.
struct Reading {
    at: Instant,
    stats: PipelineStats,
    samples: Vec<Sample>,
    endpoints: usize,
    /// Endpoints that answered for another store (another pipeline on this host).
    elsewhere: usize,
    /// The addresses asked.
    asked: Vec<SocketAddr>,
}

/// Reads the store, and the `/metrics` of those `endpoints` that work on `store` (by its
/// [identity](sluice_core::config::StoreConfig::identity); one that does not say counts as ours).
async fn read(backend: &Backend, store: &str, endpoints: &[SocketAddr]) -> sluice_core::error::Result<Reading> {
    let stats = PipelineStats::collect(backend).await?;
    let mut samples = Vec::new();
    let (mut answered, mut elsewhere) = (0, 0);
    for &address in endpoints {
        if let Ok((200, theirs)) = health::fetch(address, "/store").await
            && theirs.trim() != store
        {
            elsewhere += 1;
            continue;
        }
        if let Ok((200, body)) = health::fetch(address, "/metrics").await {
            answered += 1;
            samples.extend(scrape::parse(&body));
        }
    }
    Ok(Reading { at: Instant::now(), stats, samples, endpoints: answered, elsewhere, asked: endpoints.to_vec() })
}

/// The addresses to read `/metrics` from.
pub fn endpoints(args: &TopArgs, telemetry: &TelemetryConfig) -> Vec<SocketAddr> {
    if !args.metrics.is_empty() {
        return args.metrics.clone();
    }
    let mut out: Vec<SocketAddr> = std::iter::once(None)
        .chain(StageName::ALL.into_iter().map(Some))
        .filter_map(|stage| telemetry.local_address(stage))
        .collect();
    out.dedup();
    out
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.2..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds, 0.2 to 3600")),
    }
}

/// Runs until Ctrl-C (or one view with `--once`). A store that does not answer for a moment is
/// said on a line and read again at the next refresh, as `monitor --watch` does.
pub async fn top(backend: &Backend, store: &str, args: &TopArgs, endpoints: &[SocketAddr]) -> anyhow::Result<()> {
    let default = if backend.kind() == sluice_core::config::BackendKind::Aws { 10.0 } else { 2.0 };
    let seconds = args.interval.unwrap_or(default);
    let interval = Duration::from_secs_f64(seconds.clamp(0.2, 3600.0));
    // One listener for the whole run: a Ctrl-C pressed while the store is read counts too.
    let shutdown = sluice_core::shutdown::on_signal();
    let mut before: Option<Reading> = None;
    // Every reading but the first waits for the interval.
    let mut first = true;
    loop {
        let now = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            reading = async {
                if !std::mem::take(&mut first) {
                    tokio::time::sleep(interval).await;
                }
                read(backend, store, endpoints).await
            } => reading,
        };
        let now = match now {
            Ok(now) => now,
            Err(error) if !args.once && error.is_retryable() => {
                crate::outln!("sluice top: the store did not answer ({error}); reading again in {:.1} s", seconds)?;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        // The first reading is what the next one's rates are taken against.
        let Some(previous) = before.replace(now) else { continue };
        let view = render(&previous, before.as_ref().expect("just replaced"), args.once);
        if args.once {
            crate::out!("{view}")?;
            return Ok(());
        }
        // On a terminal, clear the screen and draw from the top-left corner; into a file or a
        // pipe, one view after another.
        if std::io::stdout().is_terminal() {
            crate::out!("\x1b[2J\x1b[H")?;
        }
        crate::out!("{view}")?;
    }
}

/// The view of what changed from `before` to `now`; `once`: the only view (`--once`).
fn render(before: &Reading, now: &Reading, once: bool) -> String {
    let seconds = now.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let rate = |a: u64, b: u64| (b as f64 - a as f64) / seconds;
    let (b, n) = (&before.stats, &now.stats);
    let mut out = String::new();
    let header =
        if once { format!("rates over {seconds:.1} s") } else { format!("every {seconds:.1} s (Ctrl-C to quit)") };
    let _ = writeln!(out, "sluice top: {header}\n");
    let lag = n.stream.millis_behind_latest.map(|ms| format!(", {ms} ms behind")).unwrap_or_default();
    let _ = writeln!(
        out,
        "records in   {:>10}  {:>8.1}/s   {}{} waiting in the stream{lag}",
        n.records_in,
        rate(b.records_in, n.records_in),
        if n.stream.pending_at_least { "at least " } else { "" },
        n.stream.pending
    );
    let _ = writeln!(
        out,
        // As `sluice stats` counts them: a result waiting for a person is under review only.
        "results      {:>10}  {:>8.1}/s   review {} ({:+.1}/s)",
        n.results,
        rate(b.results, n.results),
        n.review,
        rate(b.review, n.review)
    );
    let dlq = StageName::ALL
        .iter()
        .map(|s| {
            let (was, is) = (b.dlq.get(s).copied().unwrap_or(0), n.dlq.get(s).copied().unwrap_or(0));
            format!("{s} {is} ({:+})", is as i64 - was as i64)
        })
        .collect::<Vec<_>>()
        .join("   ");
    let _ = writeln!(out, "dlq          {dlq}");

    let _ = writeln!(out, "\nqueue            visible  in flight");
    for queue in QueueName::ALL {
        let depth = n.queues.get(&queue).copied().unwrap_or_default();
        let _ = writeln!(out, "  {:<14} {:>8} {:>10}", queue.as_str(), depth.visible, depth.in_flight);
    }

    let elsewhere = match now.elsewhere {
        0 => String::new(),
        n => format!("; {n} answering for another store left out"),
    };
    if now.endpoints == 0 {
        let asked = now.asked.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            out,
            "\n(no worker /metrics of this store answered (asked {asked}){elsewhere}: per-stage rates and latency \
             need a worker of this store running, or its address in --metrics)"
        );
        return out;
    }
    let processes = if now.endpoints == 1 { "process" } else { "processes" };
    let _ = writeln!(
        out,
        "\nstage        processed/s  failed/s   batch p50   batch p99   (/metrics of {} {processes}{elsewhere})",
        now.endpoints
    );
    let counter_rate = |name: &str, stage: StageName| {
        let with = [("stage", stage.as_str())];
        (scrape::total(&now.samples, name, &with) - scrape::total(&before.samples, name, &with)).max(0.0) / seconds
    };
    for stage in StageName::ALL {
        let with = [("stage", stage.as_str())];
        let window = scrape::bucket_delta(
            &scrape::buckets(&now.samples, "sluice_batch_duration_seconds", &with),
            &scrape::buckets(&before.samples, "sluice_batch_duration_seconds", &with),
        );
        let _ = writeln!(
            out,
            "  {:<10} {:>11.1} {:>9.1} {:>11} {:>11}",
            stage.as_str(),
            counter_rate("sluice_records_processed_total", stage),
            counter_rate("sluice_records_failed_total", stage),
            millis(scrape::quantile(0.5, &window)),
            millis(scrape::quantile(0.99, &window)),
        );
    }
    let latency = scrape::bucket_delta(
        &scrape::buckets(&now.samples, "sluice_record_latency_seconds", &[]),
        &scrape::buckets(&before.samples, "sluice_record_latency_seconds", &[]),
    );
    let _ = writeln!(
        out,
        "\nend to end   p50 {}   p99 {}   (arrival at ingest to stored result, this interval)",
        millis(scrape::quantile(0.5, &latency)),
        millis(scrape::quantile(0.99, &latency))
    );
    out
}

fn millis(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |s| format!("{:.0} ms", s * 1000.0))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sluice_core::backend::{QueueDepth, StreamStats};

    use super::*;

    fn reading(at: Instant, records: u64, processed: f64) -> Reading {
        let stats = PipelineStats {
            records_in: records,
            results: records / 2,
            review: 0,
            dlq: BTreeMap::from([(StageName::Ingest, 1)]),
            stream: StreamStats::default(),
            queues: QueueName::ALL.into_iter().map(|q| (q, QueueDepth::default())).collect(),
            aws_requests_per_record: None,
            aws_requests: BTreeMap::new(),
        };
        let text = format!(
            "sluice_records_processed_total{{stage=\"features\"}} {processed}\n\
             sluice_record_latency_seconds_bucket{{le=\"0.1\"}} {processed}\n\
             sluice_record_latency_seconds_bucket{{le=\"+Inf\"}} {processed}\n"
        );
        Reading { at, stats, samples: scrape::parse(&text), endpoints: 1, elsewhere: 0, asked: Vec::new() }
    }

    #[test]
    fn rates_come_from_the_difference_between_two_readings() {
        let start = Instant::now();
        let view = render(&reading(start, 100, 10.0), &reading(start + Duration::from_secs(2), 300, 50.0), false);
        assert!(view.contains("records in          300     100.0/s"), "{view}");
        assert!(view.contains("  features          20.0"), "{view}");
        assert!(view.contains("ingest 1 (+0)"), "{view}");
        assert!(view.contains("end to end   p50 50 ms"), "{view}");
        let once = render(&reading(start, 100, 10.0), &reading(start + Duration::from_secs(2), 300, 50.0), true);
        assert!(once.starts_with("sluice top: rates over 2.0 s\n"), "{once}");
    }
}
