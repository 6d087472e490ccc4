//! `sluice bench`: Candle measured side by side with a baseline, on the same architecture,
//! weights, inputs, thread count and batch sizes, for the digits CNN and ResNet-18.
//!
//! - `inference`: Candle on the CPU against ONNX Runtime on the CPU. ONNX Runtime runs in
//!   `bench/ort_runner.py` (Python `onnxruntime`; `pip install -r bench/requirements.txt`),
//!   which builds its graph from the same safetensors file.
//! - `cuda`: Candle on the GPU against Candle on the CPU (a build with `--features cuda`).
//!
//! Before anything is timed, both sides must give the same probabilities for the same rows.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use candle_core::Device;
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use sluice_core::model::{Architecture, ImageInput, MANIFEST_FILE, ModelBundle, WEIGHTS_FILE};
use sluice_core::vector::{f32_from_le_bytes, f32_to_le_bytes};
use sluice_inference::model::{CandleClassifier, DevicePreference, select_device};

use crate::digits::{Split, load_split};
use crate::resnet18;

/// Largest difference allowed between the two sides' probabilities, relative to the largest
/// probability of the row.
const AGREEMENT: f32 = 1e-4;
/// Rows compared before timing.
const CHECK_ROWS: usize = 32;
/// Input rows to cycle through: held-out digits, preprocessed as each model's features stage would.
const INPUT_ROWS: usize = 128;

/// The architectures the benches know how to build on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchArchitecture {
    DigitsCnn,
    Resnet18,
}

impl BenchArchitecture {
    pub fn name(self) -> &'static str {
        match self {
            Self::DigitsCnn => "digits-cnn",
            Self::Resnet18 => "resnet18",
        }
    }
}

/// What both benches measure, and how long.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The digits CNN's bundle.
    #[arg(long, default_value = "models/digits")]
    pub model: PathBuf,
    /// A ResNet-18 bundle (`sluice bundle resnet18`). Without one, ResNet-18 gets seeded random
    /// weights: fine for speed, and the report says so.
    #[arg(long)]
    pub resnet18_model: Option<PathBuf>,
    /// Architectures to measure, in this order.
    #[arg(long, value_delimiter = ',', default_value = "digits-cnn,resnet18")]
    pub architectures: Vec<BenchArchitecture>,
    /// CPU threads for every CPU runtime (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,512")]
    pub batches: Vec<usize>,
    /// Time each batch size for at least this long, per runtime.
    #[arg(long, default_value_t = 2.0)]
    pub min_seconds: f64,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchInferenceArgs {
    #[command(flatten)]
    pub bench: BenchArgs,
    /// The Python that has bench/requirements.txt installed.
    #[arg(long, env = "SLUICE_BENCH_PYTHON", default_value = "python3")]
    pub python: String,
    /// ONNX Runtime's side of the bench, relative to the working directory (run from the
    /// repository's root, or say where it is).
    #[arg(long, env = "SLUICE_BENCH_ORT_RUNNER", default_value = "bench/ort_runner.py")]
    pub ort_runner: PathBuf,
}

/// One batch size, both sides.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub batch: usize,
    pub images_per_s: f64,
    pub ms_per_batch: f64,
    pub baseline_images_per_s: f64,
    pub baseline_ms_per_batch: f64,
    /// Throughput over the baseline's.
    pub ratio: f64,
}

/// One architecture, every batch size.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub architecture: BenchArchitecture,
    /// Where the weights came from: a bundle, or random initialisation.
    pub weights: String,
    /// What is measured (`candle-cpu`, `candle-cuda`) and against what.
    pub runtime: String,
    pub baseline: String,
    pub threads: usize,
    /// The largest difference between the two sides' probabilities (relative to the row's largest).
    pub max_relative_error: f32,
    pub rows: Vec<Row>,
}

/// A bundle to measure, with its inputs.
struct Subject {
    architecture: BenchArchitecture,
    bundle: ModelBundle,
    weights: String,
    image: ImageInput,
    /// Input vectors laid end to end.
    inputs: Vec<f32>,
}

impl Subject {
    /// `batch` rows, cycling through the inputs.
    fn batch(&self, batch: usize) -> Vec<f32> {
        let width = self.image.vector_len();
        let rows = self.inputs.len() / width;
        (0..batch).flat_map(|i| self.inputs[(i % rows) * width..][..width].iter().copied()).collect()
    }

    fn check_rows(&self) -> Vec<f32> {
        self.batch(CHECK_ROWS)
    }

    fn report(&self, runtime: &str, baseline: &str, threads: usize, max_relative_error: f32, rows: Vec<Row>) -> Report {
        Report {
            model: self.bundle.manifest.name.clone(),
            architecture: self.architecture,
            weights: self.weights.clone(),
            runtime: runtime.to_owned(),
            baseline: baseline.to_owned(),
            threads,
            max_relative_error,
            rows,
        }
    }
}

/// Sizes Candle's CPU thread pool, and says how big it is.
fn cpu_threads(args: &BenchArgs) -> anyhow::Result<usize> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    sluice_inference::model::use_cpu_threads(threads).context("sizing Candle's thread pool")?;
    Ok(threads)
}

/// The bundles `args` name, ResNet-18's made up in `scratch` when none is given.
fn subjects(args: &BenchArgs, scratch: &Path) -> anyhow::Result<Vec<Subject>> {
    let mut out = Vec::new();
    for &architecture in &args.architectures {
        let (bundle, weights) = match (architecture, &args.resnet18_model) {
            (BenchArchitecture::DigitsCnn, _) => (ModelBundle::load(&args.model)?, args.model.display().to_string()),
            (BenchArchitecture::Resnet18, Some(dir)) => (ModelBundle::load(dir)?, dir.display().to_string()),
            (BenchArchitecture::Resnet18, None) => {
                (random_resnet18(&scratch.join("resnet18"))?, resnet18::RANDOM_WEIGHTS.to_owned())
            }
        };
        let expected = match architecture {
            BenchArchitecture::DigitsCnn => Architecture::DigitsCnn,
            BenchArchitecture::Resnet18 => Architecture::Resnet18,
        };
        ensure!(
            bundle.manifest.architecture == expected,
            "{} is {:?}, not {}",
            bundle.dir.display(),
            bundle.manifest.architecture,
            architecture.name()
        );
        let image = bundle.manifest.input.image.clone().context("the bundle has no image input")?;
        let inputs = held_out_rows(&image)?;
        let rows = inputs.len() / image.vector_len();
        ensure!(rows >= CHECK_ROWS, "only {rows} input rows");
        out.push(Subject { architecture, bundle, weights, image, inputs });
    }
    Ok(out)
}

/// A bundle of seeded random ResNet-18 weights over 1000 unnamed classes, in `dir`.
fn random_resnet18(dir: &Path) -> anyhow::Result<ModelBundle> {
    std::fs::create_dir_all(dir)?;
    resnet18::write_random_weights(&dir.join(WEIGHTS_FILE), 1000, 0)?;
    let labels = (0..1000).map(|i| format!("class-{i}")).collect();
    std::fs::write(dir.join(MANIFEST_FILE), resnet18::manifest("resnet18-random", "0", labels, 0.5).to_toml())?;
    Ok(ModelBundle::load(dir)?)
}

/// Held-out digits as the features stage makes them for a model taking `image`, normalised as
/// the model takes them.
fn held_out_rows(image: &ImageInput) -> anyhow::Result<Vec<f32>> {
    let digits = load_split(Split::Test)?;
    Ok(digits
        .iter()
        .take(INPUT_ROWS)
        .flat_map(|d| {
            image.normalise(&sluice_features::image::preprocess(&DynamicImage::ImageLuma8(d.to_image()), image))
        })
        .collect())
}

/// The largest difference between `a`'s and `b`'s probability rows, relative to `b`'s largest.
fn max_relative_error(a: &[Vec<f32>], b: &[Vec<f32>]) -> anyhow::Result<f32> {
    ensure!(a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len()), "outputs differ in shape");
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs() / scale))
        })
        .fold(0f32, f32::max))
}

/// Same outputs first: timing two different computations would say nothing.
fn check_agreement(subject: &Subject, a: &[Vec<f32>], b: &[Vec<f32>], sides: &str) -> anyhow::Result<f32> {
    let error = max_relative_error(a, b)?;
    ensure!(
        error < AGREEMENT,
        "{}: {sides} disagree: relative error {error:e} (limit {AGREEMENT:e})",
        subject.architecture.name()
    );
    Ok(error)
}

/// Seconds per batch on `classifier` for `x`, `batch` rows: one warm-up, then at least three
/// runs and `min_seconds`.
fn time_candle(classifier: &CandleClassifier, x: &[f32], batch: usize, min_seconds: f64) -> anyhow::Result<f64> {
    classifier.predict(x.to_vec(), batch)?;
    let (mut runs, started) = (0u64, Instant::now());
    while runs < 3 || started.elapsed().as_secs_f64() < min_seconds {
        classifier.predict(x.to_vec(), batch)?;
        runs += 1;
    }
    Ok(started.elapsed().as_secs_f64() / runs as f64)
}

fn row(batch: usize, seconds: f64, baseline_seconds: f64) -> Row {
    Row {
        batch,
        images_per_s: batch as f64 / seconds,
        ms_per_batch: seconds * 1e3,
        baseline_images_per_s: batch as f64 / baseline_seconds,
        baseline_ms_per_batch: baseline_seconds * 1e3,
        ratio: baseline_seconds / seconds,
    }
}

/// `sluice bench inference`: Candle on the CPU against ONNX Runtime.
pub fn bench_inference(args: &BenchInferenceArgs) -> anyhow::Result<Vec<Report>> {
    let threads = cpu_threads(&args.bench)?;
    let scratch = tempfile::tempdir()?;
    let mut reports = Vec::new();
    for subject in subjects(&args.bench, scratch.path())? {
        let classifier = CandleClassifier::load(&subject.bundle, Device::Cpu, "candle-cpu")?;
        let ort = run_ort(args, threads, &subject, scratch.path())?;
        let candle_check = classifier.predict(subject.check_rows(), CHECK_ROWS)?;
        let error = check_agreement(&subject, &candle_check, &ort.check, "Candle and ONNX Runtime")?;
        let mut rows = Vec::new();
        let progress = crate::progress::bar(args.bench.batches.len() as u64, "batch sizes timed");
        for &batch in &args.bench.batches {
            progress.inc(1);
            let candle = time_candle(&classifier, &subject.batch(batch), batch, args.bench.min_seconds)?;
            let o = ort.timings.iter().find(|t| t.batch == batch).context("no ONNX Runtime timing")?;
            rows.push(row(batch, candle, o.seconds / o.runs as f64));
        }
        reports.push(subject.report("candle-cpu", "onnxruntime-cpu", threads, error, rows));
    }
    Ok(reports)
}

#[derive(Deserialize)]
struct OrtTiming {
    batch: usize,
    runs: u64,
    seconds: f64,
}

struct OrtRun {
    /// Probabilities of the check rows.
    check: Vec<Vec<f32>>,
    timings: Vec<OrtTiming>,
}

/// Runs `bench/ort_runner.py` over `subject`: its outputs for the check rows, and its timings.
fn run_ort(args: &BenchInferenceArgs, threads: usize, subject: &Subject, scratch: &Path) -> anyhow::Result<OrtRun> {
    let inputs_file = scratch.join("rows.f32");
    std::fs::write(&inputs_file, f32_to_le_bytes(&subject.inputs))?;
    let check_file = scratch.join("check.f32");
    let script = &args.ort_runner;
    ensure!(
        script.is_file(),
        "{} not found: run from the repository's root, or pass --ort-runner (SLUICE_BENCH_ORT_RUNNER)",
        script.display()
    );
    let batches: Vec<String> = args.bench.batches.iter().map(usize::to_string).collect();
    let image = &subject.image;
    let output = Command::new(&args.python)
        .arg(script)
        .args(["--architecture", subject.architecture.name()])
        .arg("--weights")
        .arg(subject.bundle.weights_path())
        .args(["--input-shape", &format!("{},{},{}", image.channels, image.height, image.width)])
        .arg("--inputs")
        .arg(&inputs_file)
        .args(["--threads", &threads.to_string(), "--batches", &batches.join(",")])
        .args(["--min-seconds", &args.bench.min_seconds.to_string(), "--check-rows", &CHECK_ROWS.to_string()])
        .arg("--check-out")
        .arg(&check_file)
        .output()
        .with_context(|| format!("running {} (pip install -r bench/requirements.txt)", args.python))?;
    if !output.status.success() {
        bail!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&output.stderr));
    }
    let classes = subject.bundle.manifest.labels.len();
    let values = f32_from_le_bytes(&std::fs::read(&check_file)?);
    ensure!(values.len() == CHECK_ROWS * classes, "ONNX Runtime gave {} values", values.len());
    let timings = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reading ONNX Runtime's timings")?;
    Ok(OrtRun { check: values.chunks(classes).map(<[f32]>::to_vec).collect(), timings })
}

/// `sluice bench cuda`: Candle on the GPU against Candle on the CPU.
pub fn bench_cuda(args: &BenchArgs) -> anyhow::Result<Vec<Report>> {
    let threads = cpu_threads(args)?;
    let (device, backend) = select_device(DevicePreference::Auto);
    ensure!(
        backend == "candle-cuda",
        "no usable CUDA device: build with `--features cuda` and run on a machine with an NVIDIA GPU (see the log)"
    );
    let scratch = tempfile::tempdir()?;
    let mut reports = Vec::new();
    for subject in subjects(args, scratch.path())? {
        let cpu = CandleClassifier::load(&subject.bundle, Device::Cpu, "candle-cpu")?;
        let gpu = CandleClassifier::load(&subject.bundle, device.clone(), backend)?;
        let check_rows = subject.check_rows();
        let gpu_check = gpu.predict(check_rows.clone(), CHECK_ROWS)?;
        let cpu_check = cpu.predict(check_rows, CHECK_ROWS)?;
        let error = check_agreement(&subject, &gpu_check, &cpu_check, "CUDA and CPU")?;
        let mut rows = Vec::new();
        let progress = crate::progress::bar(args.batches.len() as u64, "batch sizes timed");
        for &batch in &args.batches {
            progress.inc(1);
            let x = subject.batch(batch);
            let on_gpu = time_candle(&gpu, &x, batch, args.min_seconds)?;
            let on_cpu = time_candle(&cpu, &x, batch, args.min_seconds)?;
            rows.push(row(batch, on_gpu, on_cpu));
        }
        reports.push(subject.report(backend, "candle-cpu", threads, error, rows));
    }
    Ok(reports)
}

impl Report {
    pub fn print_text(&self) {
        println!(
            "sluice bench: {} ({}), {} against {}, {} CPU threads; outputs agree (max relative error {:.1e})",
            self.model,
            self.architecture.name(),
            self.runtime,
            self.baseline,
            self.threads,
            self.max_relative_error
        );
        println!("  weights: {}", self.weights);
        println!();
        let (ours, theirs) = (&self.runtime, &self.baseline);
        println!(
            "  batch   {:>14}   {:>16}   {:>16}   {:>18}   ratio",
            format!("{ours} img/s"),
            format!("{ours} ms/batch"),
            format!("{theirs} img/s"),
            format!("{theirs} ms/batch")
        );
        for r in &self.rows {
            println!(
                "  {:>5}   {:>14.1}   {:>16.3}   {:>16.1}   {:>18.3}   {:>5.2}×",
                r.batch, r.images_per_s, r.ms_per_batch, r.baseline_images_per_s, r.baseline_ms_per_batch, r.ratio
            );
        }
    }
}
