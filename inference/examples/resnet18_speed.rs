//! Candle's ResNet-18 alone on the CPU, no other runtime beside it: images a second for a batch
//! size, the best and the median of repeated runs, over seeded random weights. For profiling the
//! model code (`perf record` on this, not on the whole bench).
//!
//! cargo run --release -p sluice-inference --example resnet18_speed -- [BATCH] [RUNS] [THREADS]

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sluice_inference::model::{Resnet18, use_cpu_threads};

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (batch, runs, threads) = (arg(1, 8), arg(2, 10), arg(3, 2));
    use_cpu_threads(threads)?;
    let device = Device::Cpu;
    let vars = VarMap::new();
    // A first build creates the variables; the model is built again over random values.
    Resnet18::new(VarBuilder::from_varmap(&vars, DType::F32, &device), 1000)?;
    for var in vars.all_vars() {
        var.set(&Tensor::rand(0.5f32, 1.5, var.shape(), &device)?)?;
    }
    let model = Resnet18::new(VarBuilder::from_varmap(&vars, DType::F32, &device), 1000)?;
    let xs = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &device)?;
    model.forward(&xs)?;
    let mut seconds: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            model.forward(&xs).map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<_>>()?;
    seconds.sort_by(f64::total_cmp);
    let rate = |s: f64| batch as f64 / s;
    println!(
        "resnet18 batch {batch}, {threads} threads, {runs} runs: best {:.1} img/s, median {:.1} img/s",
        rate(seconds[0]),
        rate(seconds[runs / 2])
    );
    Ok(())
}
