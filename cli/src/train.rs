//! `sluice train`: trains the digits CNN with Candle, picks per-class confidence thresholds on
//! the validation split, measures the held-out test split, and writes a model bundle.
//!
//! Reproducible: weights are initialised and batches shuffled from a seeded generator, and the
//! network has no dropout.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sluice_core::model::{
    Architecture, FieldSpec, ImageInput, InputSpec, MANIFEST_FILE, ModelManifest, TabularSpec, Thresholds, WEIGHTS_FILE,
};
use sluice_inference::model::{DigitsCnn, Normalise};

use crate::digits::{self, Digit, Split};

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Where to write the bundle.
    #[arg(long, default_value = "models/digits")]
    pub out: std::path::PathBuf,
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    pub epochs: usize,
    /// Share of the target mass spread over all classes; keeps confidences honest.
    #[arg(long, default_value_t = 0.1, value_parser = share_under_one)]
    pub label_smoothing: f64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The accuracy a class's accepted validation predictions must reach to set its threshold.
    #[arg(long, default_value_t = 0.995, value_parser = precision)]
    pub target_precision: f64,
}

// Arguments that would write a useless bundle over the real one (untrained weights, thresholds
// no confidence reaches) are refused before training.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: a whole number, at least 1")),
    }
}

fn share_under_one(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: a number from 0 up to (not including) 1")),
    }
}

fn precision(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{s:?}: a number over 0, at most 1")),
    }
}

/// What training measured.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub train_records: usize,
    pub test_records: usize,
    pub test_accuracy: f64,
    /// Fraction of test records at or above their class threshold.
    pub test_accepted_fraction: f64,
    /// Accuracy among those.
    pub test_accepted_accuracy: f64,
    pub thresholds: BTreeMap<String, f32>,
}

const LABELS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
const NAME: &str = "digits-cnn";
const VERSION: &str = "1.0.0";

/// The bundle's input spec: 8×8 greyscale, scaled to 0..1; the same digits as tabular events.
pub fn input_spec() -> InputSpec {
    let side = digits::SIDE;
    let fields = (0..(side * side) as usize)
        .map(|i| FieldSpec::Numeric {
            name: digits::field_name(i),
            min: 0.0,
            max: f32::from(digits::MAX_INTENSITY),
            default: 0.0,
            clamp: false,
        })
        .collect();
    InputSpec {
        image: Some(ImageInput {
            width: side,
            height: side,
            channels: 1,
            mean: vec![0.0],
            std: vec![1.0],
            resize_shorter_side: None,
        }),
        tabular: Some(TabularSpec { fields, required: Vec::new(), min_present: None }),
    }
}

pub fn train(args: &TrainArgs) -> anyhow::Result<TrainReport> {
    let all = digits::load()?;
    let of = |split| all.iter().filter(|d| d.split == split).cloned().collect::<Vec<_>>();
    let (train_set, validation, test) = (of(Split::Train), of(Split::Validation), of(Split::Test));
    let spec = input_spec();
    let image_spec = spec.image.clone().expect("digits take images");
    let device = Device::Cpu;
    let augmented: Vec<Digit> = train_set.iter().flat_map(shifted_copies).collect();
    let (x_train, y_train) = tensors(&augmented, &image_spec, &device)?;

    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let varmap = VarMap::new();
    let shape = (1, digits::SIDE as usize, digits::SIDE as usize);
    let model = DigitsCnn::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), shape, LABELS.len())?;
    seed_weights(&varmap, &mut rng)?;
    let params = ParamsAdamW { lr: args.learning_rate, weight_decay: 1e-4, ..Default::default() };
    let mut optimiser = AdamW::new(varmap.all_vars(), params)?;

    let mut order: Vec<u32> = (0..augmented.len() as u32).collect();
    let progress = crate::progress::bar(args.epochs as u64, "epochs");
    for epoch in 0..args.epochs {
        progress.inc(1);
        order.shuffle(&mut rng);
        let mut total = 0.0;
        for chunk in order.chunks(args.batch_size.max(1)) {
            let idx = Tensor::new(chunk, &device)?;
            let logits = model.forward(&x_train.index_select(&idx, 0)?)?;
            let loss = smoothed_cross_entropy(&logits, &y_train.index_select(&idx, 0)?, args.label_smoothing)?;
            optimiser.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? * chunk.len() as f32;
        }
        if epoch % 10 == 9 || epoch + 1 == args.epochs {
            tracing::info!(epoch = epoch + 1, loss = total / augmented.len() as f32, "training");
        }
    }

    progress.finish_and_clear();
    let thresholds = pick_thresholds(&predict(&model, &validation, &image_spec, &device)?, args.target_precision);
    let scored_test = predict(&model, &test, &image_spec, &device)?;
    let report = evaluate(&scored_test, &thresholds, train_set.len());

    let manifest = ModelManifest {
        name: NAME.to_owned(),
        version: VERSION.to_owned(),
        architecture: Architecture::DigitsCnn,
        labels: LABELS.iter().map(|l| l.to_string()).collect(),
        input: spec,
        thresholds: Thresholds { default: 0.5, per_class: thresholds },
        fallback: None,
        metrics: BTreeMap::from([
            ("test_accuracy".to_owned(), round4(report.test_accuracy)),
            ("test_accepted_fraction".to_owned(), round4(report.test_accepted_fraction)),
            ("test_accepted_accuracy".to_owned(), round4(report.test_accepted_accuracy)),
        ]),
    };
    write_bundle(&args.out, &manifest, &varmap)?;
    Ok(report)
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Inputs through the features stage's own preprocessing, so training sees what serving sees.
fn tensors(set: &[Digit], spec: &ImageInput, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let mut xs = Vec::with_capacity(set.len() * 64);
    for digit in set {
        xs.extend(sluice_features::image::preprocess(&image::DynamicImage::ImageLuma8(digit.to_image()), spec));
    }
    let side = digits::SIDE as usize;
    let pixels = Tensor::from_vec(xs, (set.len(), 1, side, side), device)?;
    let x = Normalise::new(spec, device)?.apply(&pixels)?;
    let y = Tensor::from_vec(set.iter().map(|d| u32::from(d.label)).collect::<Vec<_>>(), set.len(), device)?;
    Ok((x, y))
}

/// The digit itself and four copies shifted by one pixel up, down, left and right (vacated
/// pixels are blank), so the network learns small translations rather than exact positions.
fn shifted_copies(digit: &Digit) -> Vec<Digit> {
    let side = digits::SIDE as i32;
    [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
        .into_iter()
        .map(|(dx, dy)| {
            let mut pixels = [0u8; 64];
            for y in 0..side {
                for x in 0..side {
                    let (sx, sy) = (x - dx, y - dy);
                    if (0..side).contains(&sx) && (0..side).contains(&sy) {
                        pixels[(y * side + x) as usize] = digit.pixels[(sy * side + sx) as usize];
                    }
                }
            }
            Digit { pixels, ..digit.clone() }
        })
        .collect()
}

/// Cross-entropy against targets with `smoothing` of their mass spread evenly over all classes.
fn smoothed_cross_entropy(logits: &Tensor, targets: &Tensor, smoothing: f64) -> candle_core::Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = log_p.gather(&targets.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    let uniform = log_p.mean(D::Minus1)?.neg()?.mean_all()?;
    (nll * (1.0 - smoothing))? + (uniform * smoothing)?
}

/// PyTorch's default initialisation, U(-1/√fan_in, 1/√fan_in), drawn in name order from `rng`.
fn seed_weights(varmap: &VarMap, rng: &mut ChaCha8Rng) -> anyhow::Result<()> {
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let layer = name.rsplit_once('.').map_or(name.as_str(), |(layer, _)| layer);
        let weight: &Var = vars.get(&format!("{layer}.weight")).context("every layer has a weight")?;
        let fan_in: usize = weight.dims()[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let var = &vars[name];
        let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.random_range(-bound..bound)).collect();
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// (probabilities, true label) per record.
fn predict(
    model: &DigitsCnn,
    set: &[Digit],
    spec: &ImageInput,
    device: &Device,
) -> anyhow::Result<Vec<(Vec<f32>, u8)>> {
    let (x, _) = tensors(set, spec, device)?;
    let probabilities = candle_nn::ops::softmax(&model.forward(&x)?, D::Minus1)?.to_vec2::<f32>()?;
    Ok(probabilities.into_iter().zip(set.iter().map(|d| d.label)).collect())
}

fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).expect("non-empty")
}

/// Per predicted class, the lowest threshold at which the validation predictions it accepts
/// reach `target` accuracy (never below 0.5).
fn pick_thresholds(scored: &[(Vec<f32>, u8)], target: f64) -> BTreeMap<String, f32> {
    let mut out = BTreeMap::new();
    for (class, label) in LABELS.iter().enumerate() {
        let mut mine: Vec<(f32, bool)> = scored
            .iter()
            .filter_map(|(p, truth)| {
                let (best, confidence) = argmax(p);
                (best == class).then_some((confidence, best == usize::from(*truth)))
            })
            .collect();
        mine.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Walk up from the least confident until what is left is accurate enough.
        let mut threshold = 0.5f32;
        for start in 0..mine.len() {
            let kept = &mine[start..];
            let correct = kept.iter().filter(|(_, ok)| *ok).count();
            if correct as f64 >= target * kept.len() as f64 {
                break;
            }
            threshold = threshold.max(next_up(mine[start].0));
        }
        out.insert(label.to_string(), (threshold * 10_000.0).ceil() / 10_000.0);
    }
    out
}

/// Just above `x`, so a prediction at exactly `x` falls under the threshold.
fn next_up(x: f32) -> f32 {
    (x + 1e-6).min(1.0)
}

fn evaluate(scored: &[(Vec<f32>, u8)], thresholds: &BTreeMap<String, f32>, train_records: usize) -> TrainReport {
    let (mut correct, mut accepted, mut accepted_correct) = (0usize, 0usize, 0usize);
    for (p, truth) in scored {
        let (best, confidence) = argmax(p);
        let ok = best == usize::from(*truth);
        correct += usize::from(ok);
        if confidence >= thresholds[LABELS[best]] {
            accepted += 1;
            accepted_correct += usize::from(ok);
        }
    }
    let n = scored.len().max(1) as f64;
    TrainReport {
        train_records,
        test_records: scored.len(),
        test_accuracy: correct as f64 / n,
        test_accepted_fraction: accepted as f64 / n,
        test_accepted_accuracy: accepted_correct as f64 / accepted.max(1) as f64,
        thresholds: thresholds.clone(),
    }
}

fn write_bundle(dir: &Path, manifest: &ModelManifest, varmap: &VarMap) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    varmap.save(dir.join(WEIGHTS_FILE)).context("writing the weights")?;
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_toml()).context("writing model.toml")?;
    Ok(())
}
