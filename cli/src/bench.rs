//! `sluice bench inference`: Candle against ONNX Runtime on the same architecture, weights,
//! inputs, thread count and batch sizes, side by side in one run.
//!
//! ONNX Runtime runs in `bench/ort_runner.py` (Python `onnxruntime`; `pip install -r
//! bench/requirements.txt`), which builds its graph from the same safetensors file. Before
//! anything is timed, both must give the same probabilities for the same rows.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use sluice_core::model::{Architecture, ModelBundle};
use sluice_inference::model::CandleClassifier;

use crate::digits::{Split, load_split};

/// Largest difference allowed between Candle's and ONNX Runtime's probabilities, relative to
/// the largest probability of the row.
const AGREEMENT: f32 = 1e-4;
/// Rows compared before timing.
const CHECK_ROWS: usize = 32;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchInferenceArgs {
    /// The model bundle (the digits CNN).
    #[arg(long, default_value = "models/digits")]
    pub model: PathBuf,
    /// CPU threads for both runtimes (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,512")]
    pub batches: Vec<usize>,
    /// Time each batch size for at least this long, per runtime.
    #[arg(long, default_value_t = 2.0)]
    pub min_seconds: f64,
    /// The Python that has bench/requirements.txt installed.
    #[arg(long, env = "SLUICE_BENCH_PYTHON", default_value = "python3")]
    pub python: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One batch size, both runtimes.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub batch: usize,
    pub candle_images_per_s: f64,
    pub candle_ms_per_batch: f64,
    pub ort_images_per_s: f64,
    pub ort_ms_per_batch: f64,
    /// Candle's throughput over ONNX Runtime's.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub architecture: String,
    pub device: &'static str,
    pub threads: usize,
    /// The largest difference between the runtimes' probabilities (relative to the row's largest).
    pub max_relative_error: f32,
    pub rows: Vec<Row>,
}

#[derive(Deserialize)]
struct OrtTiming {
    batch: usize,
    runs: u64,
    seconds: f64,
}

pub fn bench_inference(args: &BenchInferenceArgs) -> anyhow::Result<Report> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    sluice_inference::model::use_cpu_threads(threads).context("sizing Candle's thread pool")?;
    let bundle = ModelBundle::load(&args.model)?;
    ensure!(
        bundle.manifest.architecture == Architecture::DigitsCnn,
        "bench/ort_runner.py builds the digits CNN only; {} is {:?}",
        bundle.manifest.name,
        bundle.manifest.architecture
    );
    let image = bundle.manifest.input.image.clone().context("the bundle has no image input")?;
    let classifier = CandleClassifier::load(&bundle, Device::Cpu, "candle-cpu")?;
    let width = classifier.vector_len();
    let inputs = held_out_rows()?;
    ensure!(inputs.len().is_multiple_of(width), "digit rows have {width} values");
    let rows = inputs.len() / width;

    let dir = tempfile::tempdir()?;
    let inputs_file = dir.path().join("rows.f32");
    std::fs::write(&inputs_file, inputs.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let check_file = dir.path().join("check.f32");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/ort_runner.py");
    let batches: Vec<String> = args.batches.iter().map(usize::to_string).collect();
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("--weights")
        .arg(bundle.weights_path())
        .args(["--input-shape", &format!("{},{},{}", image.channels, image.height, image.width)])
        .arg("--inputs")
        .arg(&inputs_file)
        .args(["--threads", &threads.to_string(), "--batches", &batches.join(",")])
        .args(["--min-seconds", &args.min_seconds.to_string(), "--check-rows", &CHECK_ROWS.to_string()])
        .arg("--check-out")
        .arg(&check_file)
        .output()
        .with_context(|| format!("running {} (pip install -r bench/requirements.txt)", args.python))?;
    if !output.status.success() {
        bail!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&output.stderr));
    }

    // Same outputs first: timing two different computations would say nothing.
    let ort_check: Vec<f32> = std::fs::read(&check_file)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let candle_check = classifier.predict(inputs[..CHECK_ROWS * width].to_vec(), CHECK_ROWS)?;
    let classes = bundle.manifest.labels.len();
    ensure!(ort_check.len() == CHECK_ROWS * classes, "ONNX Runtime gave {} values", ort_check.len());
    let max_relative_error = candle_check
        .iter()
        .zip(ort_check.chunks(classes))
        .map(|(c, o)| {
            let scale = o.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            c.iter().zip(o).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale))
        })
        .fold(0f32, f32::max);
    ensure!(
        max_relative_error < AGREEMENT,
        "Candle and ONNX Runtime disagree: relative error {max_relative_error:e} (limit {AGREEMENT:e})"
    );

    let ort: Vec<OrtTiming> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reading ONNX Runtime's timings")?;
    let mut out = Vec::new();
    for &batch in &args.batches {
        let x: Vec<f32> = (0..batch).flat_map(|i| inputs[(i % rows) * width..][..width].iter().copied()).collect();
        for _ in 0..3 {
            classifier.predict(x.clone(), batch)?;
        }
        let (mut runs, started) = (0u64, Instant::now());
        while runs < 3 || started.elapsed().as_secs_f64() < args.min_seconds {
            classifier.predict(x.clone(), batch)?;
            runs += 1;
        }
        let candle_s = started.elapsed().as_secs_f64() / runs as f64;
        let o = ort.iter().find(|t| t.batch == batch).context("no ONNX Runtime timing")?;
        let ort_s = o.seconds / o.runs as f64;
        out.push(Row {
            batch,
            candle_images_per_s: batch as f64 / candle_s,
            candle_ms_per_batch: candle_s * 1e3,
            ort_images_per_s: batch as f64 / ort_s,
            ort_ms_per_batch: ort_s * 1e3,
            ratio: ort_s / candle_s,
        });
    }
    Ok(Report {
        model: bundle.manifest.name.clone(),
        architecture: "digits-cnn".to_owned(),
        device: "cpu",
        threads,
        max_relative_error,
        rows: out,
    })
}

/// The held-out digits as the features stage makes them (PNG intensities over 255).
fn held_out_rows() -> anyhow::Result<Vec<f32>> {
    let digits = load_split(Split::Test)?;
    Ok(digits.iter().flat_map(|d| d.to_image().into_raw()).map(|v| f32::from(v) / 255.0).collect())
}

impl Report {
    pub fn print_text(&self) {
        println!(
            "sluice bench inference: {} ({}) on {}, {} threads; outputs agree (max relative error {:.1e})",
            self.model, self.architecture, self.device, self.threads, self.max_relative_error
        );
        println!();
        println!("  batch   candle img/s   candle ms/batch   ORT img/s   ORT ms/batch   candle/ORT");
        for r in &self.rows {
            println!(
                "  {:>5}   {:>12.0}   {:>15.3}   {:>9.0}   {:>12.3}   {:>9.2}×",
                r.batch, r.candle_images_per_s, r.candle_ms_per_batch, r.ort_images_per_s, r.ort_ms_per_batch, r.ratio
            );
        }
    }
}
