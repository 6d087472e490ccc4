//! ImageNet preprocessing (decode excluded: resize to shorter side 256, centre crop 224, planes)
//! with the resampler the features stage uses against `image`'s, side by side on the same
//! pictures, one thread:
//!
//!     cargo run --release -p sluice-features --example resize_speed
//!
//! Figures are recorded in docs/benchmarks.md.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_core::model::ImageInput;
use sluice_features::image::{Resampler, preprocess_with};

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/imagenet");
    let spec = ImageInput::imagenet();
    println!("{:<20} {:>14} {:>14} {:>8}", "picture", "image (ms)", "fast (ms)", "speed-up");
    for name in ["landscape-512x384", "portrait-300x500", "small-97x131"] {
        let img = image::open(dir.join(format!("{name}.png"))).expect("test picture");
        let time = |resampler| {
            let started = Instant::now();
            let mut runs = 0u32;
            while started.elapsed() < Duration::from_secs(1) || runs < 20 {
                std::hint::black_box(preprocess_with(&img, &spec, resampler));
                runs += 1;
            }
            started.elapsed().as_secs_f64() * 1000.0 / f64::from(runs)
        };
        let (slow, fast) = (time(Resampler::Image), time(Resampler::Fast));
        println!("{name:<20} {slow:>14.3} {fast:>14.3} {:>7.1}×", slow / fast);
    }
}
