//! Telemetry set up in one place: every binary calls [`init`] first.

use tracing_subscriber::EnvFilter;

/// Flushes telemetry when dropped. Logs go to stderr unbuffered today; exporters added later
/// flush here.
#[must_use = "telemetry is flushed when the guard drops"]
pub struct TelemetryGuard(());

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init() -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests, `sluice run` after `sluice train`) keeps the first subscriber.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    TelemetryGuard(())
}
