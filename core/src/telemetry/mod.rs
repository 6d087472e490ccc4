//! Telemetry set up in one place: every binary calls [`init`] first; workers serve their health
//! endpoints from [`health`].

pub mod health;

use tracing_subscriber::EnvFilter;

/// Flushes telemetry when dropped. Logs go to stderr unbuffered today; exporters added later
/// flush here.
#[must_use = "telemetry is flushed when the guard drops"]
pub struct TelemetryGuard(());

/// Logs to stderr, filtered by `RUST_LOG` (default `default_level`, e.g. `info`).
pub fn init(default_level: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // A second init (tests, `sluice run` after `sluice train`) keeps the first subscriber.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    TelemetryGuard(())
}
