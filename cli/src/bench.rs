//! `sluice bench`: Candle measured side by side with a baseline, on the same architecture,
//! weights, inputs, thread count and batch sizes, for the digits CNN and ResNet-18.
//!
//! - `inference`: Candle on the CPU against ONNX Runtime on the CPU. ONNX Runtime runs in
//!   `bench/ort_runner.py` (Python `onnxruntime`; `pip install -r bench/requirements.txt`),
//!   which builds its graph from the same safetensors file.
//! - `cuda`: Candle on the GPU, at each precision, against Candle on the CPU and against PyTorch
//!   eager on the same GPU (`bench/torch_runner.py`, the machine's own PyTorch); a build with
//!   `--features cuda`. Each precision's agreement with the CPU's f32 outputs is reported.
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
use sluice_inference::model::{CandleClassifier, DevicePreference, Precision, select_device, use_candle_convolutions};

use crate::digits::{Split, load_split};
use crate::resnet18;

/// Largest difference allowed between the two sides' probabilities, relative to the largest
/// probability of the row.
const AGREEMENT: f32 = 1e-4;
/// Rows compared before timing.
const CHECK_ROWS: usize = 32;
/// Input rows to cycle through: held-out digits, preprocessed as each model's features stage would.
const INPUT_ROWS: usize = 128;

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
    pub architectures: Vec<Architecture>,
    /// CPU threads for every CPU runtime (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,512")]
    pub batches: Vec<usize>,
    /// Time each batch size for at least this long, per runtime (all rounds together, for
    /// `inference`).
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
    /// The Python that has bench/requirements.txt installed (or, for `cuda`, PyTorch).
    #[arg(long, env = "SLUICE_BENCH_PYTHON", default_value = "python3")]
    pub python: String,
    /// ONNX Runtime's side of the bench, relative to the working directory (run from the
    /// repository's root, or say where it is).
    #[arg(long, env = "SLUICE_BENCH_ORT_RUNNER", default_value = "bench/ort_runner.py")]
    pub ort_runner: PathBuf,
    /// Rounds of the comparison, the two runtimes taking turns, `--min-seconds` shared among
    /// them; each side's fastest round is reported. A shared VM's speed drifts by a fifth or more
    /// within a minute, between one runtime's timings and the other's.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchCudaArgs {
    #[command(flatten)]
    pub bench: BenchArgs,
    /// Precisions to time on the GPU, each first compared with the CPU's f32 outputs.
    #[arg(long, value_delimiter = ',', default_value = "f32,tf32,f16,bf16")]
    pub precisions: Vec<Precision>,
    /// The Python whose PyTorch (and torchvision) runs the same models eagerly on the same GPU.
    #[arg(long, env = "SLUICE_BENCH_PYTHON", default_value = "python3")]
    pub python: String,
    /// PyTorch's side of the bench, relative to the working directory.
    #[arg(long, env = "SLUICE_BENCH_TORCH_RUNNER", default_value = "bench/torch_runner.py")]
    pub torch_runner: PathBuf,
    /// Candle only: no PyTorch comparison.
    #[arg(long)]
    pub no_pytorch: bool,
    /// To see what the fused cuDNN convolutions are worth: Candle's own convolution instead
    /// (set NVIDIA_TF32_OVERRIDE=0 with it, or f32 disagrees with the CPU and nothing is timed).
    #[arg(long)]
    pub candle_convolutions: bool,
}

/// How far a precision's probabilities may stray from the CPU's f32 ones (relative to the row's
/// largest) before the report flags it: f32 must agree to [`AGREEMENT`] or nothing is timed.
fn bound(precision: Precision) -> f32 {
    match precision {
        Precision::F32 => AGREEMENT,
        Precision::Tf32 | Precision::F16 => 1e-2,
        Precision::Bf16 => 5e-2,
    }
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
    pub architecture: Architecture,
    /// Where the weights came from: a bundle, or random initialisation.
    pub weights: String,
    /// What is measured (`candle-cpu`, `candle-cuda`) and against what.
    pub runtime: String,
    pub baseline: String,
    pub threads: usize,
    /// Rounds the two sides took turns in; each side's fastest is reported.
    pub rounds: usize,
    /// The largest difference between the two sides' probabilities (relative to the row's largest).
    pub max_relative_error: f32,
    /// For a GPU precision: its agreement with the CPU's f32 outputs on the held-out inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Agreement>,
    pub rows: Vec<Row>,
}

/// How a precision's outputs compare with the CPU's f32 ones over every held-out input.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub precision: Precision,
    pub max_relative_error: f32,
    /// Inputs whose most likely class is the same, of all.
    pub top1_agreement: f64,
    pub bound: f32,
    pub within_bound: bool,
}

/// A bundle to measure, with its inputs.
struct Subject {
    architecture: Architecture,
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
            rounds: 1,
            max_relative_error,
            accuracy: None,
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
            (Architecture::DigitsCnn, _) => (ModelBundle::load(&args.model)?, args.model.display().to_string()),
            (Architecture::Resnet18, Some(dir)) => (ModelBundle::load(dir)?, dir.display().to_string()),
            (Architecture::Resnet18, None) => {
                (random_resnet18(&scratch.join("resnet18"))?, resnet18::RANDOM_WEIGHTS.to_owned())
            }
        };
        ensure!(
            bundle.manifest.architecture == architecture,
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

/// How often each batch size runs at least, in all: a round runs it a share of that.
const MIN_RUNS: usize = 3;

/// Seconds per batch on `classifier` for `x`, `batch` rows: a warm-up where `warm_up`, then at
/// least `min_runs` runs and `min_seconds`.
fn time_candle(
    classifier: &CandleClassifier,
    (x, batch): (&[f32], usize),
    (min_seconds, min_runs): (f64, usize),
    warm_up: bool,
) -> anyhow::Result<f64> {
    if warm_up {
        classifier.predict(x, batch)?;
    }
    let (mut runs, started) = (0, Instant::now());
    while runs < min_runs || started.elapsed().as_secs_f64() < min_seconds {
        classifier.predict(x, batch)?;
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

/// `sluice bench inference`: Candle on the CPU against ONNX Runtime, in rounds: ONNX Runtime
/// times every batch size, then Candle does, and again; each side's fastest time is kept.
pub fn bench_inference(args: &BenchInferenceArgs) -> anyhow::Result<Vec<Report>> {
    let threads = cpu_threads(&args.bench)?;
    let scratch = tempfile::tempdir()?;
    let rounds = args.rounds.max(1);
    let round = BenchInferenceArgs {
        bench: BenchArgs { min_seconds: args.bench.min_seconds / rounds as f64, ..args.bench.clone() },
        ..args.clone()
    };
    let timing = (round.bench.min_seconds, MIN_RUNS.div_ceil(rounds));
    let batches = &args.bench.batches;
    let mut reports = Vec::new();
    for subject in subjects(&args.bench, scratch.path())? {
        let classifier = CandleClassifier::load(&subject.bundle, Device::Cpu, "candle-cpu")?;
        let candle_check = classifier.predict(&subject.check_rows(), CHECK_ROWS)?;
        let (mut fastest, mut error) = (vec![(f64::INFINITY, f64::INFINITY); batches.len()], 0.0f32);
        let progress = crate::progress::bar((batches.len() * rounds) as u64, "batch sizes timed");
        for turn in 0..rounds {
            let ort = run_ort(&round, threads, &subject, scratch.path(), timing.1)?;
            error = error.max(check_agreement(&subject, &candle_check, &ort.check, "Candle and ONNX Runtime")?);
            for (&batch, (candle, baseline)) in batches.iter().zip(&mut fastest) {
                progress.inc(1);
                *candle = candle.min(time_candle(&classifier, (&subject.batch(batch), batch), timing, turn == 0)?);
                let o = ort.timings.iter().find(|t| t.batch == batch).context("no ONNX Runtime timing")?;
                *baseline = baseline.min(o.per_batch());
            }
        }
        let rows = batches.iter().zip(fastest).map(|(&batch, (candle, ort))| row(batch, candle, ort)).collect();
        let mut report = subject.report("candle-cpu", "onnxruntime-cpu", threads, error, rows);
        report.rounds = rounds;
        reports.push(report);
    }
    Ok(reports)
}

/// One batch size timed by a runner script: `{"batch": B, "runs": N, "seconds": T}`, and the
/// precision in PyTorch's.
#[derive(Deserialize)]
struct Timing {
    #[serde(default)]
    precision: Option<String>,
    batch: usize,
    runs: u64,
    seconds: f64,
}

impl Timing {
    fn per_batch(&self) -> f64 {
        self.seconds / self.runs as f64
    }
}

/// A baseline's side of a bench: a Python script in `bench/` that builds the same architecture
/// from the bundle's safetensors, writes its probabilities for the first rows and prints a
/// [`Timing`] line per batch size.
struct Runner<'a> {
    /// The runtime, for messages.
    name: &'a str,
    python: &'a str,
    script: &'a Path,
    /// What to do when the script is not found, and what it needs installed.
    not_found: &'a str,
    needs: &'a str,
}

impl Runner<'_> {
    /// Runs the script over `subject`'s inputs at `bench`'s batch sizes, with its own `extra`
    /// arguments; its check outputs go to `check_out`.
    fn run(
        &self,
        subject: &Subject,
        bench: &BenchArgs,
        scratch: &Path,
        check_out: &Path,
        extra: &[String],
    ) -> anyhow::Result<Vec<Timing>> {
        let inputs_file = scratch.join("rows.f32");
        std::fs::write(&inputs_file, f32_to_le_bytes(&subject.inputs))?;
        ensure!(self.script.is_file(), "{} not found: {}", self.script.display(), self.not_found);
        let batches: Vec<String> = bench.batches.iter().map(usize::to_string).collect();
        let image = &subject.image;
        let output = Command::new(self.python)
            .arg(self.script)
            .args(["--architecture", subject.architecture.name()])
            .arg("--weights")
            .arg(subject.bundle.weights_path())
            .args(["--input-shape", &format!("{},{},{}", image.channels, image.height, image.width)])
            .arg("--inputs")
            .arg(&inputs_file)
            .args(["--batches", &batches.join(","), "--min-seconds", &bench.min_seconds.to_string()])
            .arg("--check-out")
            .arg(check_out)
            .args(extra)
            .output()
            .with_context(|| format!("running {} ({})", self.python, self.needs))?;
        if !output.status.success() {
            bail!("{} failed:\n{}", self.script.display(), String::from_utf8_lossy(&output.stderr));
        }
        String::from_utf8(output.stdout)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}'s timings", self.name))
    }

    /// The probability rows the script wrote to `path`: `rows` of `classes` each.
    fn probabilities(&self, path: &Path, rows: usize, classes: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        let values = f32_from_le_bytes(&std::fs::read(path)?);
        ensure!(values.len() == rows * classes, "{} gave {} values in {}", self.name, values.len(), path.display());
        Ok(values.chunks(classes).map(<[f32]>::to_vec).collect())
    }
}

struct OrtRun {
    /// Probabilities of the check rows.
    check: Vec<Vec<f32>>,
    timings: Vec<Timing>,
}

/// Runs `bench/ort_runner.py` over `subject`: its outputs for the check rows, and its timings.
fn run_ort(
    args: &BenchInferenceArgs,
    threads: usize,
    subject: &Subject,
    scratch: &Path,
    min_runs: usize,
) -> anyhow::Result<OrtRun> {
    let runner = Runner {
        name: "ONNX Runtime",
        python: &args.python,
        script: &args.ort_runner,
        not_found: "run from the repository's root, or pass --ort-runner (SLUICE_BENCH_ORT_RUNNER)",
        needs: "pip install -r bench/requirements.txt",
    };
    let check_file = scratch.join("check.f32");
    let extra = [
        "--threads".to_owned(),
        threads.to_string(),
        "--check-rows".to_owned(),
        CHECK_ROWS.to_string(),
        "--min-runs".to_owned(),
        min_runs.to_string(),
    ];
    let timings = runner.run(subject, &args.bench, scratch, &check_file, &extra)?;
    let check = runner.probabilities(&check_file, CHECK_ROWS, subject.bundle.manifest.labels.len())?;
    Ok(OrtRun { check, timings })
}

/// `sluice bench cuda`: Candle on the GPU, at each precision, against Candle on the CPU (f32,
/// every core) and against PyTorch eager on the same GPU at the same precision.
pub fn bench_cuda(args: &BenchCudaArgs) -> anyhow::Result<Vec<Report>> {
    let threads = cpu_threads(&args.bench)?;
    let (device, backend) = select_device(DevicePreference::Auto);
    ensure!(
        backend == "candle-cuda",
        "no usable CUDA device: build with `--features cuda` and run on a machine with an NVIDIA GPU (see the log)"
    );
    use_candle_convolutions(args.candle_convolutions);
    let scratch = tempfile::tempdir()?;
    let mut reports = Vec::new();
    for subject in subjects(&args.bench, scratch.path())? {
        let cpu = CandleClassifier::load(&subject.bundle, Device::Cpu, "candle-cpu")?;
        let rows = subject.inputs.len() / subject.image.vector_len();
        let reference = cpu.predict(&subject.inputs, rows)?;
        let torch = (!args.no_pytorch).then(|| run_torch(args, &subject, scratch.path(), rows)).transpose()?;
        let mut on_cpu = Vec::new();
        for &batch in &args.bench.batches {
            on_cpu.push(time_candle(&cpu, (&subject.batch(batch), batch), (args.bench.min_seconds, MIN_RUNS), true)?);
        }
        for &precision in &args.precisions {
            let gpu = CandleClassifier::load_at(&subject.bundle, device.clone(), backend, precision)?;
            let outputs = gpu.predict(&subject.inputs, rows)?;
            if precision == Precision::F32 {
                check_agreement(&subject, &outputs, &reference, "CUDA and CPU")?;
            }
            let accuracy = agreement(precision, &outputs, &reference)?;
            let runtime = format!("{backend}-{}", precision.name());
            let mut against_cpu = Vec::new();
            let mut against_torch = Vec::new();
            let progress = crate::progress::bar(args.bench.batches.len() as u64, "batch sizes timed");
            for (&batch, &cpu_seconds) in args.bench.batches.iter().zip(&on_cpu) {
                progress.inc(1);
                let seconds =
                    time_candle(&gpu, (&subject.batch(batch), batch), (args.bench.min_seconds, MIN_RUNS), true)?;
                against_cpu.push(row(batch, seconds, cpu_seconds));
                if let Some(torch) = &torch {
                    let t = torch
                        .timings
                        .iter()
                        .find(|t| t.batch == batch && t.precision.as_deref() == Some(precision.name()))
                        .context("no PyTorch timing")?;
                    against_torch.push(row(batch, seconds, t.per_batch()));
                }
            }
            let mut report = subject.report(&runtime, "candle-cpu", threads, accuracy.max_relative_error, against_cpu);
            report.accuracy = Some(accuracy.clone());
            reports.push(report);
            if let Some(torch) = &torch {
                let theirs = torch.check.get(precision.name()).context("no PyTorch outputs")?;
                let error = max_relative_error(&outputs, theirs)?;
                let baseline = format!("pytorch-cuda-{}", precision.name());
                let mut report = subject.report(&runtime, &baseline, threads, error, against_torch);
                report.accuracy = Some(agreement(precision, theirs, &reference)?);
                reports.push(report);
            }
        }
    }
    Ok(reports)
}

/// `outputs` at `precision` against the CPU's f32 `reference`.
fn agreement(precision: Precision, outputs: &[Vec<f32>], reference: &[Vec<f32>]) -> anyhow::Result<Agreement> {
    let error = max_relative_error(outputs, reference)?;
    let top1 = |row: &Vec<f32>| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
    let same = outputs.iter().zip(reference).filter(|(a, b)| top1(a) == top1(b)).count();
    Ok(Agreement {
        precision,
        max_relative_error: error,
        top1_agreement: same as f64 / reference.len().max(1) as f64,
        bound: bound(precision),
        within_bound: error <= bound(precision),
    })
}

struct TorchRun {
    /// Probabilities of every input row, by precision.
    check: std::collections::BTreeMap<String, Vec<Vec<f32>>>,
    timings: Vec<Timing>,
}

/// Runs `bench/torch_runner.py` over `subject` on the GPU, every precision asked for.
fn run_torch(args: &BenchCudaArgs, subject: &Subject, scratch: &Path, rows: usize) -> anyhow::Result<TorchRun> {
    let runner = Runner {
        name: "PyTorch",
        python: &args.python,
        script: &args.torch_runner,
        not_found: "run from the repository's root, pass --torch-runner, or --no-pytorch",
        needs: "it needs PyTorch; or pass --no-pytorch",
    };
    let check = scratch.join("torch-check");
    let precisions: Vec<&str> = args.precisions.iter().map(|p| p.name()).collect();
    let extra = ["--precisions".to_owned(), precisions.join(","), "--check-rows".to_owned(), rows.to_string()];
    let timings = runner.run(subject, &args.bench, scratch, &check, &extra)?;
    let classes = subject.bundle.manifest.labels.len();
    let mut outputs = std::collections::BTreeMap::new();
    for precision in precisions {
        let path = PathBuf::from(format!("{}-{precision}.f32", check.display()));
        outputs.insert(precision.to_owned(), runner.probabilities(&path, rows, classes)?);
    }
    Ok(TorchRun { check: outputs, timings })
}

impl Report {
    pub fn print_text(&self) -> std::io::Result<()> {
        outln!(
            "sluice bench: {} ({}), {} against {}, {} CPU threads{}; outputs agree (max relative error {:.1e})",
            self.model,
            self.architecture.name(),
            self.runtime,
            self.baseline,
            self.threads,
            match self.rounds {
                1 => String::new(),
                n => format!(", each side's fastest of {n} rounds taken in turn"),
            },
            self.max_relative_error
        )?;
        outln!("  weights: {}", self.weights)?;
        if let Some(a) = &self.accuracy {
            outln!(
                "  {} against the CPU's f32: max relative error {:.1e} (bound {:.0e}{}), top-1 agreement {:.1}%",
                if self.baseline.starts_with("pytorch") { "PyTorch" } else { "Candle" },
                a.max_relative_error,
                a.bound,
                if a.within_bound { "" } else { ", OVER IT" },
                a.top1_agreement * 100.0
            )?;
        }
        outln!()?;
        let (ours, theirs) = (&self.runtime, &self.baseline);
        outln!(
            "  batch   {:>14}   {:>16}   {:>16}   {:>18}   ratio",
            format!("{ours} img/s"),
            format!("{ours} ms/batch"),
            format!("{theirs} img/s"),
            format!("{theirs} ms/batch")
        )?;
        for r in &self.rows {
            outln!(
                "  {:>5}   {:>14.1}   {:>16.3}   {:>16.1}   {:>18.3}   {:>5.2}×",
                r.batch,
                r.images_per_s,
                r.ms_per_batch,
                r.baseline_images_per_s,
                r.baseline_ms_per_batch,
                r.ratio
            )?;
        }
        Ok(())
    }
}
