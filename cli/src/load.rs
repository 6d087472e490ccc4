//! `sluice produce --rate N --duration D [--pattern steady|steps|spikes]`: a load generator.
//!
//! It writes the chosen records (cycled, each copy distinct) at a rate that follows the pattern,
//! keeping to the schedule by the record count due so far rather than by sleeping a fixed time
//! per batch, so a slow call is caught up on. Records the stream refuses are sent again (as the
//! KPL does) and counted. A progress line shows on a terminal; the report comes at the end.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sluice_core::backend::{Backend, PutReport};
use tokio_util::sync::CancellationToken;

use crate::produce::{Catalogue, PUT_BATCH, put_batch, written_before};

/// How the rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// The rate, all along.
    Steady,
    /// A quarter of the rate for the first quarter of the run, then a half, three quarters, all.
    Steps,
    /// The rate, with five times it for the first second of every ten.
    Spikes,
}

/// Length of one spike period, and of the spike at its start.
const SPIKE_PERIOD: f64 = 10.0;
const SPIKE: f64 = 1.0;
const SPIKE_FACTOR: f64 = 5.0;

impl Pattern {
    /// Records due after `t` seconds of a run of `length` seconds at `rate` a second: the
    /// integral of the pattern's rate.
    pub fn due(self, rate: f64, length: f64, t: f64) -> f64 {
        let t = t.clamp(0.0, length);
        match self {
            Self::Steady => rate * t,
            Self::Steps => {
                let quarter = length / 4.0;
                (0..4)
                    .map(|k| {
                        let start = k as f64 * quarter;
                        let inside = (t - start).clamp(0.0, quarter);
                        rate * (k + 1) as f64 / 4.0 * inside
                    })
                    .sum()
            }
            Self::Spikes => {
                let periods = (t / SPIKE_PERIOD).floor();
                let into = t - periods * SPIKE_PERIOD;
                let spiking = periods * SPIKE + into.min(SPIKE);
                rate * t + rate * (SPIKE_FACTOR - 1.0) * spiking
            }
        }
    }

    /// Seconds into the run at which the `n`-th record (from 1) is due: the first time [`due`]
    /// reaches `n` (bisected: every pattern's count only grows).
    ///
    /// [`due`]: Self::due
    pub fn due_at(self, rate: f64, length: f64, n: u64) -> f64 {
        let (mut early, mut late) = (0.0, length);
        for _ in 0..48 {
            let middle = (early + late) / 2.0;
            if self.due(rate, length, middle) >= n as f64 { late = middle } else { early = middle }
        }
        late
    }
}

/// What a load run did.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub pattern: Pattern,
    pub target_rate: f64,
    pub seconds: f64,
    /// Records written, and the stream's refusals that were sent again.
    #[serde(flatten)]
    pub put: PutReport,
    /// The most records the run was ever behind its schedule by.
    pub most_behind: u64,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "produced {} records in {:.1} s ({:.1}/s; asked {:?} at {}/s); ",
            self.put.records,
            self.seconds,
            self.put.records as f64 / self.seconds.max(1e-9),
            self.pattern,
            self.target_rate,
        )?;
        match self.put.retried {
            0 => write!(f, "the stream took every one at first")?,
            n => write!(f, "the stream refused {n} at first ({} throttled), all sent again", self.put.throttled)?,
        }
        write!(f, "; at most {} behind schedule", self.most_behind)
    }
}

/// How often the schedule is looked at when nothing is due.
const TICK: Duration = Duration::from_millis(10);

pub async fn run(
    backend: &Backend,
    catalogue: &Catalogue,
    rate: f64,
    duration: Duration,
    pattern: Pattern,
    ingest: &sluice_ingest::IngestConfig,
    stop: &CancellationToken,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be a positive number of records a second");
    let length = duration.as_secs_f64();
    // Rounded down as `due` is below, so the last record due is the last one written.
    let total = pattern.due(rate, length, length).floor() as u64;
    let progress = crate::progress::bar(total, "records");
    let (started, started_ms) = (Instant::now(), sluice_core::envelope::now_ms());
    let (mut put, mut most_behind) = (PutReport::default(), 0);
    while put.records < total && !stop.is_cancelled() {
        let due = (pattern.due(rate, length, started.elapsed().as_secs_f64()).floor() as u64).min(total);
        if due <= put.records {
            tokio::time::sleep(TICK).await;
            continue;
        }
        most_behind = most_behind.max(due - put.records);
        let n = (due - put.records).min(PUT_BATCH as u64);
        // Each record says it was produced when it was due, not when a producer that fell behind
        // got to it: a latency measured from it counts the wait (no coordinated omission).
        let records = (put.records..put.records + n)
            .map(|i| {
                let due_ms = started_ms + (pattern.due_at(rate, length, i + 1) * 1000.0) as u64;
                catalogue.record_produced_at(i, Some(due_ms))
            })
            .collect();
        put += put_batch(backend, records, ingest).await.with_context(|| written_before(put.records, total))?;
        progress.set_position(put.records);
        progress.set_message(format!("{} refused and resent", put.retried));
    }
    progress.finish_and_clear();
    Ok(LoadReport { pattern, target_rate: rate, seconds: started.elapsed().as_secs_f64(), put, most_behind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_integrate_their_rates() {
        assert_eq!(Pattern::Steady.due(100.0, 60.0, 30.0), 3000.0);
        assert_eq!(Pattern::Steady.due(100.0, 60.0, 90.0), 6000.0, "nothing due past the end");
        // Steps over 40 s at 100/s: 25, 50, 75, 100 a second for ten seconds each.
        assert_eq!(Pattern::Steps.due(100.0, 40.0, 10.0), 250.0);
        assert_eq!(Pattern::Steps.due(100.0, 40.0, 40.0), 2500.0);
        // Spikes: five times the rate for the first second of every ten.
        assert_eq!(Pattern::Spikes.due(100.0, 60.0, 1.0), 500.0);
        assert_eq!(Pattern::Spikes.due(100.0, 60.0, 10.0), 1400.0);
        assert_eq!(Pattern::Spikes.due(100.0, 60.0, 10.5), 1400.0 + 250.0);
    }

    #[test]
    fn a_record_is_due_when_its_pattern_first_counts_it() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(Pattern::Steady.due_at(100.0, 60.0, 1), 0.01));
        assert!(close(Pattern::Steady.due_at(100.0, 60.0, 3000), 30.0));
        // Steps: the 251st record comes in the second quarter, at 50 a second.
        assert!(close(Pattern::Steps.due_at(100.0, 40.0, 251), 10.02));
        // Spikes: the first second at five times the rate.
        assert!(close(Pattern::Spikes.due_at(100.0, 60.0, 500), 1.0));
        for n in [1, 17, 999, 1400] {
            let at = Pattern::Spikes.due_at(100.0, 60.0, n);
            assert!(Pattern::Spikes.due(100.0, 60.0, at) >= n as f64 - 1e-6);
            assert!(Pattern::Spikes.due(100.0, 60.0, at - 1e-3) < n as f64);
        }
    }
}
