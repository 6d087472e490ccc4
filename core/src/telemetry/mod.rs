//! Telemetry set up in one place: every binary calls [`init`] first; workers serve their health
//! endpoints from [`health`].

pub mod health;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Flushes telemetry when dropped. Logs go to stderr unbuffered today; exporters added later
/// flush here.
#[must_use = "telemetry is flushed when the guard drops"]
pub struct TelemetryGuard(());

/// Chooses the log format: `SLUICE_LOG_FORMAT=json|text`, else JSON lines when stderr is not a
/// terminal (a container's log driver, CloudWatch Logs Insights) and text when a person watches.
pub const LOG_FORMAT_VAR: &str = "SLUICE_LOG_FORMAT";

/// Logs to stderr (stdout stays free for commands' own output), filtered by `RUST_LOG` (default
/// `default_level`, e.g. `info`), in the format [`LOG_FORMAT_VAR`] picks.
pub fn init(default_level: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = match std::env::var(LOG_FORMAT_VAR).as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests, `sluice run` after `sluice train`) keeps the first subscriber.
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    TelemetryGuard(())
}
