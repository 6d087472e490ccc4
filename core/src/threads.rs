//! How many threads model math runs on, fixed once per process, before any thread starts.
//!
//! Candle 0.11 asks for its thread count on every matrix product, and unless `RAYON_NUM_THREADS`
//! (or `CANDLE_NUM_THREADS`) is set, the answer comes from parsing `/proc/cpuinfo` each time:
//! profiled in `sluice bench pipeline` on 2 cores, that was an eighth of all CPU time, and the
//! digits model alone ran at less than half its speed. Both rayon's pool and Candle's read the
//! variable, so setting it once sizes both and makes the lookup cheap.
//!
//! The stages' own work on a batch's records (reading envelopes, decoding images) runs on a pool
//! of its own: [`on_every_core`].

use std::sync::OnceLock;

use rayon::prelude::*;
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

/// The pool the stages' own per-record work runs on (reading envelopes, decoding and resizing
/// images), a thread a core. Not rayon's global pool, where the model's kernels run: in a
/// process that runs every stage, a batch of images would wait there behind the model's batch.
fn stage_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(1, usize::from))
            .thread_name(|i| format!("sluice-stage-{i}"))
            .build()
            .expect("the stages' thread pool starts")
    })
}

/// How many threads [`on_every_core`] spreads work over.
pub fn stage_threads() -> usize {
    stage_pool().current_num_threads()
}

/// `work` done on each of `items`, spread over every core, the results in the items' order.
///
/// A stage's batch of images is hundreds of independent decodes and resizes: one after another
/// on the thread that polls the stage, one core's worth caps the stage (a photo-sized JPEG is
/// about a millisecond to decode). Like that work done in place, this blocks the calling thread
/// until every item is done.
pub fn on_every_core<T: Send, R: Send>(items: Vec<T>, work: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
    let pool = stage_pool();
    // One item, or one core (a task given one vCPU): nothing to spread, no hand-off.
    if items.len() < 2 || pool.current_num_threads() < 2 {
        return items.into_iter().map(work).collect();
    }
    pool.install(|| items.into_par_iter().map(work).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_on_every_core_keeps_the_items_order() {
        let items: Vec<u64> = (0..1000).collect();
        let squares = on_every_core(items.clone(), |i| {
            // Uneven work, so that the pieces finish out of order.
            std::thread::sleep(std::time::Duration::from_micros(1000 - i));
            i * i
        });
        assert_eq!(squares, items.iter().map(|i| i * i).collect::<Vec<_>>());
    }
}
