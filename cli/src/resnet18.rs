//! ResNet-18 bundles: `sluice bundle resnet18` turns torchvision-named weights (safetensors) and
//! a labels file into a model bundle with ImageNet preprocessing. [`write_random_weights`] makes
//! seeded stand-in weights for speed benchmarks and tests: a model with them predicts nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_core::model::{
    Architecture, ImageInput, InputSpec, MANIFEST_FILE, ModelBundle, ModelManifest, Thresholds, WEIGHTS_FILE,
};
use sluice_inference::model::{CandleClassifier, Resnet18};

/// What a report says of a model with [`write_random_weights`]' weights.
pub const RANDOM_WEIGHTS: &str = "random initialisation (speed only: its predictions mean nothing)";

#[derive(Debug, Clone, clap::Args)]
pub struct BundleResnet18Args {
    /// ResNet-18 weights with torchvision's names, as safetensors (from PyTorch:
    /// `safetensors.torch.save_file(model.state_dict(), "resnet18.safetensors")`).
    #[arg(long, required_unless_present = "random_weights", conflicts_with = "random_weights")]
    pub weights: Option<PathBuf>,
    /// Seeded random stand-in weights instead: a model that predicts nothing, for speed
    /// benchmarks on a machine without PyTorch.
    #[arg(long)]
    pub random_weights: bool,
    /// The class labels, one per line, in the order of the model's outputs.
    #[arg(long)]
    pub labels: PathBuf,
    /// The bundle directory to create.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "resnet18")]
    pub name: String,
    #[arg(long, default_value = "1")]
    pub version: String,
    /// Minimum confidence for a prediction to be accepted without review.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
}

/// The manifest of a ResNet-18 bundle: 224×224 RGB with ImageNet preprocessing.
pub fn manifest(name: &str, version: &str, labels: Vec<String>, threshold: f32) -> ModelManifest {
    ModelManifest {
        name: name.to_owned(),
        version: version.to_owned(),
        architecture: Architecture::Resnet18,
        labels,
        input: InputSpec { image: Some(ImageInput::imagenet()), tabular: None },
        thresholds: Thresholds { default: threshold, per_class: BTreeMap::new() },
        fallback: None,
        metrics: BTreeMap::new(),
    }
}

/// Writes the bundle `args` describe, once its weights have loaded and classified an image.
pub fn bundle(args: &BundleResnet18Args) -> anyhow::Result<ModelBundle> {
    let text = std::fs::read_to_string(&args.labels).with_context(|| format!("{}", args.labels.display()))?;
    let labels: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
    ensure!(!labels.is_empty(), "{} holds no labels", args.labels.display());
    ensure!(!args.out.exists(), "{} already exists", args.out.display());
    let manifest = manifest(&args.name, &args.version, labels, args.threshold);
    manifest.check().map_err(|e| anyhow::anyhow!("{e} (as --labels, --threshold, --name and --version give it)"))?;
    let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    // Built beside its destination and moved there once it works: no half-made bundle is left.
    let staging = tempfile::tempdir_in(parent)?;
    let weights = match &args.weights {
        Some(path) => {
            std::fs::copy(path, staging.path().join(WEIGHTS_FILE)).with_context(|| format!("{}", path.display()))?;
            path.display().to_string()
        }
        None => {
            write_random_weights(&staging.path().join(WEIGHTS_FILE), manifest.labels.len(), 0)?;
            "the random weights".to_owned()
        }
    };
    std::fs::write(staging.path().join(MANIFEST_FILE), manifest.to_toml())?;
    check(&ModelBundle::load(staging.path())?)
        .with_context(|| format!("{weights} is not a ResNet-18 for {} classes", manifest.labels.len()))?;
    // The staging folder is private (0700), and a copied file keeps its source's mode: a bundle
    // is read by other users too (a container's worker runs as one of its own).
    use std::os::unix::fs::PermissionsExt;
    for file in [WEIGHTS_FILE, MANIFEST_FILE] {
        std::fs::set_permissions(staging.path().join(file), std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(staging.keep(), &args.out)?;
    Ok(ModelBundle::load(&args.out)?)
}

/// Loads `bundle` on the CPU and classifies a blank image.
fn check(bundle: &ModelBundle) -> anyhow::Result<()> {
    let classifier = CandleClassifier::load(bundle, Device::Cpu, "candle-cpu")?;
    let probabilities = classifier.predict(&vec![0.0; classifier.vector_len()], 1)?;
    ensure!(probabilities[0].iter().all(|p| p.is_finite()), "the weights give non-finite outputs");
    Ok(())
}

/// Seeded random ResNet-18 weights for `classes` classes at `path`, named as torchvision names
/// them. Convolution and dense weights are uniform with variance 1/fan-in (activations keep
/// their scale through the residual blocks); batch-norm scales and variances lie around 1,
/// shifts and means around 0, so every parameter matters to the output.
pub fn write_random_weights(path: &Path, classes: usize, seed: u64) -> anyhow::Result<()> {
    let varmap = VarMap::new();
    Resnet18::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), classes)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let var = &vars[name];
        let dims = var.dims();
        let mut draw =
            |low: f32, high: f32| -> Vec<f32> { (0..var.elem_count()).map(|_| rng.random_range(low..high)).collect() };
        let values = if dims.len() > 1 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = (3.0 / fan_in as f32).sqrt();
            draw(-bound, bound)
        } else if name.ends_with(".weight") || name.ends_with(".running_var") {
            draw(0.5, 1.5)
        } else {
            draw(-0.1, 0.1)
        };
        tensors.insert(name.clone(), Tensor::from_vec(values, dims, &Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}
