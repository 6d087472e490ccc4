//! How many threads model math runs on, fixed once per process, before any thread starts.
//!
//! Candle 0.11 asks for its thread count on every matrix product, and unless `RAYON_NUM_THREADS`
//! (or `CANDLE_NUM_THREADS`) is set, the answer comes from parsing `/proc/cpuinfo` each time:
//! profiled in `sluice bench pipeline` on 2 cores, that was an eighth of all CPU time, and the
//! digits model alone ran at less than half its speed. Both rayon's pool and Candle's read the
//! variable, so setting it once sizes both and makes the lookup cheap.

use serde::Deserialize;

use crate::config::Settings;

/// The variable rayon and Candle size their pools by.
pub const VARIABLE: &str = "RAYON_NUM_THREADS";

/// `inference.threads` (0: every core); 0 when the settings do not say or cannot be read.
pub fn configured(settings: &Settings) -> usize {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Inference {
        threads: usize,
    }
    settings.section::<Inference>("inference").map(|i| i.threads).unwrap_or_default()
}

/// Half the cores this process may use, at least one: the model's share when every stage runs
/// in one process.
pub fn half_the_cores() -> usize {
    (std::thread::available_parallelism().map_or(1, usize::from) / 2).max(1)
}

/// Sets [`VARIABLE`] to `threads` (0: every core) unless the environment sets it already, and
/// returns the count in force.
///
/// Call it first thing in `main`, before any other thread starts (the environment is not
/// thread-safe to change).
#[allow(unsafe_code)] // the only way to set the variable; sound before other threads exist
pub fn pin(threads: usize) -> usize {
    if let Some(set) = std::env::var(VARIABLE).ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0) {
        return set;
    }
    let threads = if threads > 0 { threads } else { std::thread::available_parallelism().map_or(1, usize::from) };
    // SAFETY: called from `main` before any other thread exists, so nothing reads the
    // environment while it changes.
    unsafe { std::env::set_var(VARIABLE, threads.to_string()) };
    threads
}
