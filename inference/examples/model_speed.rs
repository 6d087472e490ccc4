//! One of the models alone on the CPU, no other runtime beside it: images a second for a batch
//! size, the best and the median of repeated runs, over seeded random weights. For profiling the
//! model code (`perf record` on this, not on the whole bench).
//!
//! cargo run --release -p sluice-inference --example model_speed -- resnet18|digits [BATCH] [RUNS] [THREADS]

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sluice_inference::model::{DigitsCnn, Resnet18, use_cpu_threads};

/// Builds a model over a variable builder.
type Build = fn(VarBuilder) -> candle_core::Result<Box<dyn Module>>;

fn main() -> anyhow::Result<()> {
    let architecture = std::env::args().nth(1).unwrap_or_else(|| "resnet18".into());
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (batch, runs, threads) = (arg(2, 8), arg(3, 10), arg(4, 2));
    use_cpu_threads(threads)?;
    let device = Device::Cpu;
    let (input, build): ((usize, usize, usize), Build) = match architecture.as_str() {
        "resnet18" => ((3, 224, 224), |vb| Ok(Box::new(Resnet18::new(vb, 1000)?))),
        "digits" => ((1, 8, 8), |vb| Ok(Box::new(DigitsCnn::new(vb, (1, 8, 8), 10)?))),
        other => anyhow::bail!("unknown architecture {other}: resnet18 or digits"),
    };
    // A first build creates the variables; the model is built again over random values, as
    // plain tensors (a loaded bundle's; variables keep the training path).
    let vars = VarMap::new();
    build(VarBuilder::from_varmap(&vars, DType::F32, &device))?;
    let weights = vars
        .data()
        .lock()
        .expect("variables")
        .iter()
        .map(|(name, var)| Ok((name.clone(), Tensor::rand(0.5f32, 1.5, var.shape(), &device)?)))
        .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
    let model = build(VarBuilder::from_tensors(weights, DType::F32, &device))?;
    let (c, h, w) = input;
    let xs = Tensor::randn(0f32, 1.0, (batch, c, h, w), &device)?;
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
        "{architecture} batch {batch}, {threads} threads, {runs} runs: best {:.1} img/s, median {:.1} img/s",
        rate(seconds[0]),
        rate(seconds[runs / 2])
    );
    Ok(())
}
