//! A circuit breaker in front of the Candle model: too many failed or slow batches open it, and
//! batches go to the fallback until a probe finds Candle healthy again.
//!
//! Written here rather than taken from a crate: the maintained breakers (`failsafe`, for one)
//! judge only success and failure, and this one also opens on latency, counts per batch, and
//! must say which route a batch takes so that exactly one batch probes at a time.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_core::telemetry::metrics::{BreakerGauge, BreakerReading};

/// `[inference.breaker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// How many recent model batches the error rate is judged over.
    pub window: usize,
    /// No judgement before this many batches are in the window.
    pub min_batches: usize,
    /// Open when at least this share of the window failed or was too slow.
    #[serde(deserialize_with = "sluice_core::config::decimal")]
    pub max_error_rate: f64,
    /// A batch slower than this counts as a failure.
    pub max_latency_ms: u64,
    /// How long the breaker stays open before one batch probes the model again.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { window: 20, min_batches: 5, max_error_rate: 0.5, max_latency_ms: 5_000, open_ms: 30_000 }
    }
}

impl BreakerConfig {
    /// Refuses settings with which the breaker would open on success (`max_error_rate` 0) or
    /// never open (`min_batches` over `window`, a rate over 1 or not a number).
    pub fn check(&self) -> Result<(), String> {
        if !(self.max_error_rate > 0.0 && self.max_error_rate <= 1.0) {
            return Err(format!(
                "inference.breaker.max_error_rate must be over 0 and at most 1 (got {})",
                self.max_error_rate
            ));
        }
        if self.min_batches == 0 || self.min_batches > self.window {
            return Err(format!(
                "inference.breaker.min_batches must be 1 to window ({}) (got {})",
                self.window, self.min_batches
            ));
        }
        Ok(())
    }
}

impl BreakerReading for CircuitBreaker {
    fn reading(&self) -> BreakerGauge {
        match self.state() {
            State::Closed => BreakerGauge::Closed,
            State::HalfOpen => BreakerGauge::HalfOpen,
            State::Open => BreakerGauge::Open,
        }
    }
}

/// Where one batch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The model, as usual (closed).
    Model,
    /// The model, as the one probe of a half-open breaker.
    Probe,
    /// The fallback (open, or half-open with a probe already out).
    Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed { recent: VecDeque<bool> },
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, inner: Mutex::new(Inner::Closed { recent: VecDeque::new() }) }
    }

    /// Its state now: an open breaker whose time is up is half-open, as the next batch probes.
    pub fn state(&self) -> State {
        match *self.lock() {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { until } if Instant::now() < until => State::Open,
            Inner::Open { .. } | Inner::HalfOpen => State::HalfOpen,
        }
    }

    /// The route for the next batch. An open breaker whose time is up lets one batch probe.
    pub fn route(&self) -> Route {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Route::Model,
            Inner::Open { until } if Instant::now() >= until => {
                *inner = Inner::HalfOpen;
                tracing::info!("circuit breaker half-open: probing the model");
                Route::Probe
            }
            Inner::Open { .. } | Inner::HalfOpen => Route::Fallback,
        }
    }

    /// What became of a batch sent by `route`: whether the model served it, and how long it took.
    pub fn record(&self, route: Route, ok: bool, latency: Duration) {
        let bad = !ok || latency > Duration::from_millis(self.config.max_latency_ms);
        let mut inner = self.lock();
        match (route, &mut *inner) {
            (Route::Probe, _) if bad => self.open(&mut inner, "the probe failed"),
            (Route::Probe, _) => {
                tracing::info!("circuit breaker closed: the model serves again");
                *inner = Inner::Closed { recent: VecDeque::new() };
            }
            (Route::Model, Inner::Closed { recent }) => {
                recent.push_back(bad);
                while recent.len() > self.config.window.max(1) {
                    recent.pop_front();
                }
                let failed = recent.iter().filter(|b| **b).count();
                if recent.len() >= self.config.min_batches.max(1)
                    && failed as f64 >= self.config.max_error_rate * recent.len() as f64
                {
                    self.open(&mut inner, "too many failed or slow batches");
                }
            }
            // A batch that started before the breaker changed state says nothing new.
            _ => {}
        }
    }

    fn open(&self, inner: &mut Inner, why: &str) {
        tracing::warn!(why, open_ms = self.config.open_ms, "circuit breaker open: batches go to the fallback");
        *inner = Inner::Open { until: Instant::now() + Duration::from_millis(self.config.open_ms) };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            window: 4,
            min_batches: 4,
            max_error_rate: 0.5,
            max_latency_ms: 100,
            open_ms,
        })
    }

    const FAST: Duration = Duration::from_millis(1);

    #[test]
    fn opens_on_errors_and_closes_after_a_good_probe() {
        let b = breaker(200);
        for ok in [true, false, true] {
            assert_eq!(b.route(), Route::Model);
            b.record(Route::Model, ok, FAST);
        }
        assert_eq!(b.state(), State::Closed, "too few batches to judge");
        b.record(Route::Model, false, FAST);
        assert_eq!(b.state(), State::Open, "2 of 4 failed");
        assert_eq!(b.route(), Route::Fallback);

        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(b.route(), Route::Probe);
        assert_eq!(b.route(), Route::Fallback, "one probe at a time");
        b.record(Route::Probe, true, FAST);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.route(), Route::Model);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = breaker(200);
        for _ in 0..4 {
            b.record(Route::Model, false, FAST);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(b.route(), Route::Probe);
        b.record(Route::Probe, false, FAST);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.route(), Route::Fallback);
    }

    /// With no batch to take it half-open, the gauge still reads it so once its time is up: an
    /// open breaker with no traffic is not an open breaker for ever.
    #[test]
    fn an_open_breaker_reads_half_open_once_its_time_is_up() {
        let b = breaker(200);
        for _ in 0..4 {
            b.record(Route::Model, false, FAST);
        }
        assert_eq!((b.state(), b.reading()), (State::Open, BreakerGauge::Open));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!((b.state(), b.reading()), (State::HalfOpen, BreakerGauge::HalfOpen));
        assert_eq!(b.route(), Route::Probe, "the next batch probes");
        assert_eq!(b.reading(), BreakerGauge::HalfOpen);
    }

    #[test]
    fn slow_batches_count_as_failures() {
        let b = breaker(1_000);
        for _ in 0..4 {
            b.record(Route::Model, true, Duration::from_millis(150));
        }
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn occasional_failures_keep_it_closed() {
        let b = breaker(1_000);
        for i in 0..40 {
            b.record(Route::Model, i % 4 != 0, FAST);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn settings_that_would_open_on_success_or_never_are_refused() {
        assert!(BreakerConfig::default().check().is_ok());
        for wrong in [
            BreakerConfig { max_error_rate: 0.0, ..BreakerConfig::default() },
            BreakerConfig { max_error_rate: 1.5, ..BreakerConfig::default() },
            BreakerConfig { max_error_rate: f64::NAN, ..BreakerConfig::default() },
            BreakerConfig { min_batches: 0, ..BreakerConfig::default() },
            BreakerConfig { min_batches: 21, window: 20, ..BreakerConfig::default() },
        ] {
            assert!(wrong.check().is_err(), "{wrong:?}");
        }
    }
}
