//! Models the inference stage can run, and the device they run on.

mod conv;
mod cudnn;
mod digits_cnn;
mod direct;
mod product;
mod resnet18;
mod winograd;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sluice_core::model::{Architecture, ImageInput, ModelBundle};
use sluice_core::vector::FeatureVector;
use sluice_core::{ReasonCode, SluiceError};

pub use cudnn::use_candle_convolutions;
pub use digits_cnn::DigitsCnn;
pub use resnet18::Resnet18;

/// Which device to run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DevicePreference {
    /// The GPU when built with `cuda` and one works, else the CPU.
    #[default]
    Auto,
    Cpu,
}

/// The device to use, and the backend name results record.
pub fn select_device(preference: DevicePreference) -> (Device, &'static str) {
    if preference == DevicePreference::Auto && cfg!(feature = "cuda") {
        // `Device::cuda_if_available` does not fall back when initialisation fails; this does.
        // A device that opens can still fail its first kernel (driver and toolkit mismatch):
        // run one small op before trusting it.
        match Device::new_cuda(0).and_then(|device| probe(&device).map(|()| device)) {
            Ok(device) => return (device, "candle-cuda"),
            Err(e) => tracing::warn!(error = %e, "CUDA device unavailable; running on the CPU"),
        }
    }
    (Device::Cpu, "candle-cpu")
}

/// The number format the model computes in on a GPU (`inference.precision`). Weights are
/// converted when the bundle loads and inputs on the device; probabilities come back as f32. The
/// CPU always computes in f32. `sluice bench cuda` reports each one's agreement with the CPU's
/// f32 outputs next to its speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// f32 values, matrix products on tensor cores at TF32 (10-bit mantissa inputs).
    Tf32,
    F16,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    fn dtype(self) -> DType {
        match self {
            Self::F32 | Self::Tf32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Sizes the CPU thread pool Candle's kernels run on (rayon's global pool). It can be sized once
/// per process, before first use; later calls fail and leave it as it is.
pub fn use_cpu_threads(threads: usize) -> Result<(), rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()
}

/// A matrix product on `device`, read back: fails if the device cannot run kernels.
fn probe(device: &Device) -> candle_core::Result<()> {
    let a = Tensor::ones((8, 8), DType::F32, device)?;
    let sum: f32 = a.matmul(&a)?.sum_all()?.to_scalar()?;
    if sum == 512.0 { Ok(()) } else { Err(candle_core::Error::Msg(format!("probe computed {sum}, not 512"))) }
}

/// A loaded classifier: feature vectors in, probability vectors out.
pub struct CandleClassifier {
    model: Box<dyn Module + Send + Sync>,
    device: Device,
    backend: &'static str,
    precision: Precision,
    input_shape: (usize, usize, usize),
    normalise: Normalise,
}

/// Pixels in, the model's input values out, on the device: `x / 255`, less the bundle's mean,
/// over its std, a channel each. Serving and training (`sluice train`) both go through it.
pub struct Normalise {
    /// Each of shape (1, C, 1, 1).
    mean: Tensor,
    std: Tensor,
}

impl Normalise {
    pub fn new(image: &ImageInput, device: &Device) -> candle_core::Result<Self> {
        let per_channel = |values: &[f32]| Tensor::from_slice(values, (1, image.channels as usize, 1, 1), device);
        Ok(Self { mean: per_channel(&image.mean)?, std: per_channel(&image.std)? })
    }

    /// `pixels`, u8 of shape (N, C, H, W), as f32 model inputs.
    pub fn apply(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        (pixels.to_dtype(DType::F32)? / 255.0)?.broadcast_sub(&self.mean)?.broadcast_div(&self.std)
    }
}

impl CandleClassifier {
    /// The bundle's model on `device`, computing in f32.
    pub fn load(bundle: &ModelBundle, device: Device, backend: &'static str) -> Result<Self, SluiceError> {
        Self::load_at(bundle, device, backend, Precision::F32)
    }

    /// The bundle's model on `device`, computing in `precision` there (f32 on the CPU, which is
    /// said in the log when another was asked for). TF32 is a switch of the whole process's CUDA
    /// matrix products: the last model loaded sets it.
    pub fn load_at(
        bundle: &ModelBundle,
        device: Device,
        backend: &'static str,
        precision: Precision,
    ) -> Result<Self, SluiceError> {
        let precision = if device.is_cpu() && precision != Precision::F32 {
            tracing::warn!(precision = precision.name(), "the CPU computes in f32");
            Precision::F32
        } else {
            precision
        };
        if !device.is_cpu() {
            candle_core::cuda::set_gemm_reduced_precision_f32(precision == Precision::Tf32);
        }
        let dtype = precision.dtype();
        let manifest = &bundle.manifest;
        let image = manifest.input.image.as_ref().ok_or_else(|| {
            SluiceError::permanent(ReasonCode::ModelFailure, format!("{} needs an image input spec", manifest.name))
        })?;
        let input_shape = (image.channels as usize, image.height as usize, image.width as usize);
        let weights = std::fs::read(bundle.weights_path()).map_err(|e| {
            SluiceError::permanent(ReasonCode::ModelFailure, format!("{}: {e}", bundle.weights_path().display()))
        })?;
        let vb = VarBuilder::from_buffered_safetensors(weights, dtype, &device).map_err(bundle_error)?;
        let classes = manifest.labels.len();
        // Weights of another shape: for another architecture, input size or number of labels.
        let not_these = |e: candle_core::Error| {
            bundle_error(format!(
                "{e} (the weights do not fit model.toml: {} over {}×{}×{} inputs with {classes} labels)",
                manifest.architecture.name(),
                image.width,
                image.height,
                image.channels
            ))
        };
        let model: Box<dyn Module + Send + Sync> = match manifest.architecture {
            Architecture::DigitsCnn => Box::new(DigitsCnn::new(vb, input_shape, classes).map_err(not_these)?),
            Architecture::Resnet18 => {
                if image.channels != 3 {
                    return Err(bundle_error("ResNet-18 takes 3-channel images"));
                }
                Box::new(Resnet18::new(vb, classes).map_err(not_these)?)
            }
        };
        let normalise = Normalise::new(image, &device).map_err(bundle_error)?;
        Ok(Self { model, device, backend, precision, input_shape, normalise })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `candle-cpu` or `candle-cuda`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn vector_len(&self) -> usize {
        let (c, h, w) = self.input_shape;
        c * h * w
    }

    /// Runs one all-zero input through the model, so that the first real batch does not pay for
    /// first-use work (kernel loading on a GPU, allocations) and a model that cannot run at all
    /// fails here, before the worker says it is ready.
    pub fn warm_up(&self) -> Result<(), SluiceError> {
        let started = std::time::Instant::now();
        let output = self.predict_batch(FeatureVector::Pixels(vec![0; self.vector_len()]), 1)?;
        // Weights gone to NaN or infinity (a training run that diverged) load without complaint
        // and answer every record with output no threshold can judge.
        if output.iter().flatten().any(|p| !p.is_finite()) {
            return Err(SluiceError::permanent(
                ReasonCode::InvalidModelOutput,
                format!("the model's output for a blank input is not finite: {output:?} (are its weights?)"),
            ));
        }
        tracing::info!(backend = self.backend, elapsed_ms = started.elapsed().as_millis() as u64, "model warmed up");
        Ok(())
    }

    /// Class probabilities for `batch` vectors of values (already normalised) laid end to end in
    /// `inputs`, copied to the device from where they lie.
    pub fn predict(&self, inputs: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, SluiceError> {
        let (c, h, w) = self.input_shape;
        let xs = Tensor::from_slice(inputs, (batch, c, h, w), &self.device).map_err(model_error)?;
        self.forward(xs)
    }

    /// Class probabilities for `batch` vectors laid end to end in `inputs`: pixels go to the
    /// device as bytes (a quarter of the transfer) and are normalised there.
    pub fn predict_batch(&self, inputs: FeatureVector, batch: usize) -> Result<Vec<Vec<f32>>, SluiceError> {
        let (c, h, w) = self.input_shape;
        let shape = (batch, c, h, w);
        let xs = match inputs {
            FeatureVector::Values(values) => Tensor::from_vec(values, shape, &self.device),
            FeatureVector::Pixels(pixels) => {
                Tensor::from_vec(pixels, shape, &self.device).and_then(|pixels| self.normalise.apply(&pixels))
            }
        }
        .map_err(model_error)?;
        self.forward(xs)
    }

    /// Probabilities for a batch of model inputs on the device.
    fn forward(&self, xs: Tensor) -> Result<Vec<Vec<f32>>, SluiceError> {
        let xs = xs.to_dtype(self.precision.dtype()).map_err(model_error)?;
        let logits = self.model.forward(&xs).and_then(|l| l.to_dtype(DType::F32)).map_err(model_error)?;
        if !matches!(logits.device(), Device::Cpu) {
            let probabilities = candle_nn::ops::softmax_last_dim(&logits).map_err(model_error)?;
            return probabilities.to_vec2::<f32>().map_err(model_error);
        }
        Ok(softmax(logits.to_vec2::<f32>().map_err(model_error)?))
    }
}

/// Each row's softmax on the CPU's own thread: a batch has a few logits a row, and Candle's CPU op
/// hands its rows to the thread pool, a hand-off that from outside the pool took longer than the
/// arithmetic (40 µs a call, a fifth of the digits CNN's time for a batch of 32). A GPU keeps
/// Candle's op, on the device.
fn softmax(mut rows: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    for row in &mut rows {
        let largest = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for value in row.iter_mut() {
            *value = (*value - largest).exp();
            sum += *value;
        }
        row.iter_mut().for_each(|value| *value /= sum);
    }
    rows
}

/// Weights that do not fit the architecture (missing names, wrong shapes) will never load.
fn bundle_error(e: impl std::fmt::Display) -> SluiceError {
    SluiceError::permanent(ReasonCode::ModelFailure, format!("model bundle: {e}"))
}

fn model_error(e: candle_core::Error) -> SluiceError {
    SluiceError::retryable(ReasonCode::ModelFailure, e.to_string())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use sluice_core::model::ModelBundle;
    use sluice_core::vector::FeatureVector;

    use super::{CandleClassifier, Precision, softmax};

    #[test]
    fn an_empty_batch_is_no_predictions() {
        let bundle = ModelBundle::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits")).unwrap();
        let classifier = CandleClassifier::load(&bundle, Device::Cpu, "candle-cpu").unwrap();
        assert!(classifier.predict(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn softmax_is_candles() {
        let logits = candle_core::Tensor::randn(0f32, 4.0, (5, 10), &Device::Cpu).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&logits).unwrap().to_vec2::<f32>().unwrap();
        let got = softmax(logits.to_vec2().unwrap());
        for (got, want) in got.iter().zip(&want) {
            assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{got:?} against {want:?}");
            }
        }
    }

    /// A reduced precision asked of the CPU computes in f32, and says so.
    #[test]
    fn the_cpu_computes_in_f32_whatever_is_asked() {
        let bundle = ModelBundle::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits")).unwrap();
        let f32 = CandleClassifier::load(&bundle, Device::Cpu, "candle-cpu").unwrap();
        let asked = CandleClassifier::load_at(&bundle, Device::Cpu, "candle-cpu", Precision::Bf16).unwrap();
        assert_eq!(asked.precision(), Precision::F32);
        let pixels = || FeatureVector::Pixels((0..64u8).map(|i| i * 4).collect());
        assert_eq!(asked.predict_batch(pixels(), 1).unwrap(), f32.predict_batch(pixels(), 1).unwrap());
    }
}
