//! Batch sizes that follow the model's speed: as many records as fit in a target time per model
//! call, between a floor and the configured most. A small model (the digits CNN, 20 µs a record
//! on a CPU) gets the largest batches, whose fixed costs per batch in the store and queues are
//! shared by the most records; a large one on a CPU (ResNet-18, 35 ms a record) keeps the floor.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The first batch, and the smallest: below it the requests per record (a queue receive, send
/// and delete and a feature-store read per batch on AWS) grow faster than the batch's time falls.
/// A model too slow for batches this large is given a smaller `inference.batch_size`.
const FLOOR: usize = 64;

pub struct BatchSizer {
    least: usize,
    most: usize,
    target: Duration,
    size: AtomicUsize,
}

impl BatchSizer {
    /// Batches of up to `most` records sized to take about `target` each (zero: always `most`).
    pub fn new(most: usize, target: Duration) -> Self {
        let most = most.max(1);
        let least = most.min(FLOOR);
        let first = if target.is_zero() { most } else { least };
        Self { least, most, target, size: AtomicUsize::new(first) }
    }

    /// The most records the next batch takes.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// A model call took `elapsed` for `records`. A batch grows at most twofold per call (a
    /// small batch's time per record includes the call's fixed cost, so it overstates what a
    /// larger batch would take), and shrinks at once to what fits, down to the floor.
    pub fn observe(&self, records: usize, elapsed: Duration) {
        if self.target.is_zero() || records == 0 {
            return;
        }
        let per_record = elapsed.as_secs_f64() / records as f64;
        let fits = if per_record > 0.0 { self.target.as_secs_f64() / per_record } else { f64::MAX };
        let current = self.size();
        let next = (fits as usize).min(current.saturating_mul(2)).clamp(self.least, self.most);
        self.size.store(next, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(2_000);

    /// Runs batches of a model taking `per_record` until the size settles.
    fn settle(sizer: &BatchSizer, per_record: Duration) -> usize {
        for _ in 0..20 {
            let records = sizer.size();
            sizer.observe(records, per_record * records as u32);
        }
        sizer.size()
    }

    #[test]
    fn a_fast_model_grows_to_the_most_a_batch_may_hold() {
        let sizer = BatchSizer::new(256, TARGET);
        assert_eq!(sizer.size(), FLOOR);
        sizer.observe(64, Duration::from_micros(64 * 20));
        assert_eq!(sizer.size(), 128, "at most twofold per call");
        assert_eq!(settle(&sizer, Duration::from_micros(20)), 256);
    }

    #[test]
    fn a_slower_model_gets_batches_that_fit_the_target_down_to_the_floor() {
        let sizer = BatchSizer::new(256, TARGET);
        assert_eq!(settle(&sizer, Duration::from_millis(10)), 200);
        // The same model slowed down (a busy machine): the next batch shrinks at once, to the floor.
        sizer.observe(200, Duration::from_millis(200 * 100));
        assert_eq!(sizer.size(), FLOOR);
        // ResNet-18 on two CPU cores, 35 ms a record: 57 would fit 2 s; the floor holds.
        assert_eq!(settle(&sizer, Duration::from_millis(35)), FLOOR);
        // A configured most below the floor is kept to.
        let small = BatchSizer::new(16, TARGET);
        assert_eq!((small.size(), settle(&small, Duration::from_secs(1))), (16, 16));
    }

    #[test]
    fn no_target_always_takes_the_most() {
        let sizer = BatchSizer::new(64, Duration::ZERO);
        assert_eq!(sizer.size(), 64);
        sizer.observe(64, Duration::from_secs(60));
        assert_eq!(sizer.size(), 64);
    }
}
