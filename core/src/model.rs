//! The model bundle: a directory with `model.toml` (what the model is, what it takes, what its
//! outputs mean, how sure it must be) and `model.safetensors` (its weights).
//!
//! [`ModelBundle::load`] checks everything the stages rely on, so a loaded bundle is a valid one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vector::FeatureVector;

pub const MANIFEST_FILE: &str = "model.toml";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// A bundle that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(
        "model bundle {path}: not there (a relative directory is read from where the command runs: set [model] dir, or SLUICE__MODEL__DIR, to the bundle's directory)"
    )]
    Missing { path: PathBuf },
    #[error("model bundle {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("model bundle {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("model bundle {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// The network a bundle's weights are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// Two 3×3 convolutions and two dense layers over 8×8 greyscale digits.
    DigitsCnn,
    /// ResNet-18 (He et al., 2015) over RGB images, weights named as torchvision names them
    /// (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`, …, `fc.weight`).
    #[serde(rename = "resnet18")]
    Resnet18,
}

impl Architecture {
    /// As `model.toml` names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::DigitsCnn => "digits-cnn",
            Self::Resnet18 => "resnet18",
        }
    }
}

/// `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub name: String,
    pub version: String,
    pub architecture: Architecture,
    /// Output classes, in the order of the model's outputs.
    pub labels: Vec<String>,
    pub input: InputSpec,
    pub thresholds: Thresholds,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackSpec>,
    /// Figures measured when the bundle was trained (accuracy, calibration), for the record.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// What the model takes. A bundle may accept images, tabular events, or both, as long as both
/// produce vectors of the same length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tabular: Option<TabularSpec>,
}

impl InputSpec {
    /// What the features stage's vectors depend on, in 16 hex digits: the image size and crop,
    /// the tabular fields, their ranges and categories; not the image mean and std, which the
    /// model applies on its device. The features stage sends it with each record; inference
    /// refuses a record made for another, whose vector it would read wrong (a bundle changed
    /// while its queues still held records featured by the old one).
    pub fn fingerprint(&self) -> String {
        let mut made_of = self.clone();
        if let Some(image) = &mut made_of.image {
            image.mean.clear();
            image.std.clear();
        }
        let bytes = serde_json::to_vec(&made_of).expect("an input spec serialises");
        // FNV-1a: stable across builds and machines (std's hashers promise neither); no
        // adversary chooses a bundle's spec.
        let hash =
            bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
        format!("{hash:016x}")
    }
}

/// Images are resized to `width`×`height` (or, with `resize_shorter_side`, resized so their
/// shorter side has that length, aspect kept, and then centre-cropped to `width`×`height`, as
/// ImageNet models expect), converted to `channels`, scaled to 0..1 and then normalised per
/// channel as `(x - mean) / std`. The vector is channel-major (C, H, W).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_shorter_side: Option<u32>,
}

impl ImageInput {
    /// The picture a feature vector of this input shows (for a values vector, the
    /// normalisation undone), channel-major planes put back together (grey for one channel).
    /// `None` if the length does not fit.
    pub fn picture(&self, vector: &FeatureVector) -> Option<image::RgbImage> {
        let (channels, plane) = (self.channels as usize, (self.width * self.height) as usize);
        if vector.len() != channels * plane || self.mean.len() < channels || self.std.len() < channels {
            return None;
        }
        let value = |c: usize, i: usize| match vector {
            FeatureVector::Pixels(pixels) => pixels[c * plane + i],
            FeatureVector::Values(values) => {
                let x = values[c * plane + i] * self.std[c] + self.mean[c];
                (x.clamp(0.0, 1.0) * 255.0).round() as u8
            }
        };
        Some(image::RgbImage::from_fn(self.width, self.height, |x, y| {
            let i = (y * self.width + x) as usize;
            match channels {
                1 => image::Rgb([value(0, i); 3]),
                _ => image::Rgb([value(0, i), value(1, i), value(2, i)]),
            }
        }))
    }

    /// The values the model takes for channel-major `pixels` (one image or several end to
    /// end): each scaled to 0..1, then `(x - mean) / std` for its channel.
    pub fn normalise(&self, pixels: &[u8]) -> Vec<f32> {
        let plane = (self.width * self.height) as usize;
        let channels = self.channels as usize;
        pixels
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let c = (i / plane) % channels;
                (f32::from(p) / 255.0 - self.mean[c]) / self.std[c]
            })
            .collect()
    }

    /// ImageNet preprocessing at 224×224: shorter side to 256, centre crop, ImageNet's channel
    /// means and standard deviations (what torchvision's classifiers were trained with).
    pub fn imagenet() -> Self {
        Self {
            width: 224,
            height: 224,
            channels: 3,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            resize_shorter_side: Some(256),
        }
    }

    pub fn vector_len(&self) -> usize {
        (self.width * self.height * self.channels) as usize
    }
}

/// A declarative feature spec for JSON events: each field becomes one or more vector entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TabularSpec {
    pub fields: Vec<FieldSpec>,
    /// Fields an event must carry (not missing, not null); the others may fall back to their
    /// defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// The least share (0 to 1) of the fields an event must carry. Unset: at least one: an event
    /// with none of the fields is not something the model can judge, whatever the defaults say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_present: Option<f32>,
}

impl TabularSpec {
    pub fn vector_len(&self) -> usize {
        self.fields.iter().map(FieldSpec::width).sum()
    }

    /// The fields as the model saw them in `vector` (one this spec made), each with its value in
    /// raw units or its category (`–` where none was hot: a missing or unknown value without a
    /// default). `None` if the length does not fit.
    pub fn read_back(&self, vector: &[f32]) -> Option<Vec<(&str, String)>> {
        if vector.len() != self.vector_len() {
            return None;
        }
        let mut rest = vector;
        let fields = self.fields.iter().map(|field| {
            let (mine, after) = rest.split_at(field.width());
            rest = after;
            let value = match field {
                FieldSpec::Numeric { min, max, .. } => six_figures(mine[0] * (max - min) + min),
                FieldSpec::Categorical { categories, .. } => {
                    mine.iter().position(|&x| x > 0.5).map_or("–".to_owned(), |hot| categories[hot].clone())
                }
            };
            (field.name(), value)
        });
        Some(fields.collect())
    }

    /// Whether `event` carries enough of the spec to make a prediction of ([`check_present`](Self::check_present)),
    /// and every numeric field it carries a number within the field's range (unless the field
    /// clamps). The error says what is wrong.
    pub fn check(&self, event: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
        self.check_present(event)?;
        for field in &self.fields {
            if let Some(value) = event.get(field.name()).filter(|v| !v.is_null()) {
                field.value(value)?;
            }
        }
        Ok(())
    }

    /// Whether `event` carries enough of the spec to make a prediction of: every required field,
    /// and at least the least share (or one) of all fields. The error says what is missing.
    pub fn check_present(&self, event: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
        let present = |name: &str| event.get(name).is_some_and(|v| !v.is_null());
        let missing: Vec<&str> = self.required.iter().map(String::as_str).filter(|n| !present(n)).collect();
        if !missing.is_empty() {
            return Err(format!("the event lacks the required field(s) {}", missing.join(", ")));
        }
        let found = self.fields.iter().filter(|f| present(f.name())).count();
        let wanted = match self.min_present {
            Some(share) => (share.clamp(0.0, 1.0) * self.fields.len() as f32).ceil() as usize,
            None => 1,
        };
        if found < wanted.max(1) {
            // The first few names say what the model reads; all 64 of a digit say no more.
            const NAMED: usize = 8;
            let names: Vec<&str> = self.fields.iter().map(FieldSpec::name).take(NAMED).collect();
            let more = match self.fields.len().saturating_sub(NAMED) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            return Err(format!(
                "the event carries {found} of the model's {} fields ({}{more}); at least {} needed",
                self.fields.len(),
                names.join(", "),
                wanted.max(1)
            ));
        }
        Ok(())
    }
}

/// `x` to six significant figures, without trailing zeros: the scaling back leaves 120.00001
/// of an event's 120.
fn six_figures(x: f32) -> String {
    // Zero's logarithm is an infinity, which `as` takes to i32::MIN.
    let decimals = 5_i32.saturating_sub(x.abs().log10().floor() as i32).clamp(0, 9) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_owned() } else { text }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FieldSpec {
    /// A number, scaled from `min..max` to 0..1; `default` (in raw units) when missing. A value
    /// outside `min..max` is refused (schema_mismatch: the model never saw its like), or, with
    /// `clamp = true`, taken to the nearer end.
    Numeric {
        name: String,
        min: f32,
        max: f32,
        default: f32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        clamp: bool,
    },
    /// One of `categories`, one-hot encoded; an unknown or missing value is all zeros unless a
    /// `default` category is given.
    Categorical {
        name: String,
        categories: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<String>,
    },
}

impl FieldSpec {
    pub fn name(&self) -> &str {
        match self {
            Self::Numeric { name, .. } | Self::Categorical { name, .. } => name,
        }
    }

    /// A numeric field's value in raw units (within `min..max`, clamped there if the field
    /// clamps), or why `value` is not one. A categorical field takes a string, number or boolean
    /// (`None`: one not among its categories is its default), not an object or array.
    pub fn value(&self, value: &serde_json::Value) -> Result<Option<f32>, String> {
        let (name, min, max, clamp) = match self {
            Self::Numeric { name, min, max, clamp, .. } => (name, min, max, clamp),
            Self::Categorical { name, .. } if value.is_object() || value.is_array() => {
                return Err(format!("field {name:?} must be one of its categories (a string), got {value}"));
            }
            Self::Categorical { .. } => return Ok(None),
        };
        let Some(x) = value.as_f64() else {
            return Err(format!("field {name:?} must be a number, got {value}"));
        };
        // In f32, as the bounds are: 0.7 read from JSON is the bound 0.7, whatever f64 makes of it.
        // (A number past f32's range becomes an infinity, and lies outside any range.)
        let x = x as f32;
        if *clamp {
            return Ok(Some(x.clamp(*min, *max)));
        }
        if !(min..=max).contains(&&x) {
            return Err(format!("field {name:?} is {x}, outside its range {min} to {max} (the model bundle's spec)"));
        }
        Ok(Some(x))
    }

    /// Vector entries this field produces.
    pub fn width(&self) -> usize {
        match self {
            Self::Numeric { .. } => 1,
            Self::Categorical { categories, .. } => categories.len(),
        }
    }
}

/// Minimum confidence for a prediction to be accepted without review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub default: f32,
    /// Per predicted label; labels not listed use `default`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_class: BTreeMap<String, f32>,
}

/// Where to send feature vectors when the local model cannot serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackSpec {
    /// SageMaker endpoint name.
    pub endpoint: String,
}

/// A loaded, checked bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBundle {
    pub manifest: ModelManifest,
    pub dir: PathBuf,
}

impl ModelBundle {
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => BundleError::Missing { path: path.clone() },
            _ => BundleError::Io { path: path.clone(), source },
        })?;
        let manifest: ModelManifest =
            toml::from_str(&text).map_err(|source| BundleError::Parse { path: path.clone(), source })?;
        manifest.check().map_err(|problem| BundleError::Invalid { path: path.clone(), problem })?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(BundleError::Invalid { path: weights, problem: "weights file is missing".to_owned() });
        }
        Ok(Self { manifest, dir })
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }
}

impl ModelManifest {
    /// Checks what [`ModelBundle::load`] promises.
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() || self.version.trim().is_empty() {
            return Err("name and version must not be empty (results and the capture carry them)".to_owned());
        }
        if self.labels.is_empty() {
            return Err("labels must not be empty".to_owned());
        }
        if let Some(label) = self.labels.iter().find(|l| l.trim().is_empty()) {
            return Err(format!("labels must not be empty strings (found {label:?})"));
        }
        if let Some(twice) = first_repeated(&self.labels) {
            return Err(format!("label {twice:?} comes twice: thresholds and reviews could not tell them apart"));
        }
        let in_unit = |t: f32| (0.0..=1.0).contains(&t);
        if !in_unit(self.thresholds.default) || !self.thresholds.per_class.values().all(|&t| in_unit(t)) {
            return Err("thresholds must lie in 0..=1".to_owned());
        }
        if let Some(unknown) = self.thresholds.per_class.keys().find(|l| !self.labels.contains(l)) {
            return Err(format!("threshold for unknown label {unknown:?}"));
        }
        // Every architecture is a convolutional network: it takes its values as an image, and a
        // tabular spec lays an event's fields out as one (as many values as the image has).
        let Some(image) = &self.input.image else {
            return Err(format!(
                "input.image is needed: {} takes its input as an image (width × height × channels values); \
                 a tabular spec lays an event's fields out as one, with as many values",
                self.architecture.name()
            ));
        };
        let image_len = check_image(image)?;
        match self.input.tabular.as_ref().map(check_tabular).transpose()? {
            Some(tabular_len) if tabular_len != image_len => {
                Err(format!("image input gives {image_len} features but tabular gives {tabular_len}"))
            }
            _ => Ok(()),
        }
    }

    /// Length of the feature vector the model takes.
    pub fn vector_len(&self) -> usize {
        self.input
            .image
            .as_ref()
            .map(ImageInput::vector_len)
            .or_else(|| self.input.tabular.as_ref().map(TabularSpec::vector_len))
            .unwrap_or_default()
    }

    /// The confidence a prediction of `label` needs to be accepted.
    pub fn threshold(&self, label: &str) -> f32 {
        self.thresholds.per_class.get(label).copied().unwrap_or(self.thresholds.default)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest serialises")
    }
}

/// The smallest std an image input may divide by: anything smaller makes every value huge or
/// infinite, and the model's answer the same for every image.
const MIN_STD: f32 = 1e-6;

/// The largest width or height a model may take: 4096 × 4096 × 3 is 48 MiB of pixels a record,
/// far past what a feature store item or a queue message holds.
const MAX_IMAGE_SIDE: u32 = 4096;

/// Checks an image input; its vector length.
fn check_image(image: &ImageInput) -> Result<usize, String> {
    if image.width == 0 || image.height == 0 || !matches!(image.channels, 1 | 3) {
        return Err("input.image needs a non-zero size and 1 or 3 channels".to_owned());
    }
    if image.width.max(image.height).max(image.resize_shorter_side.unwrap_or(0)) > MAX_IMAGE_SIDE {
        return Err(format!("input.image width, height and resize_shorter_side must be at most {MAX_IMAGE_SIDE}"));
    }
    let per_channel = image.channels as usize;
    if image.mean.len() != per_channel || image.std.len() != per_channel {
        return Err("input.image mean and std need one value per channel".to_owned());
    }
    if !image.mean.iter().all(|m| m.is_finite()) {
        return Err(format!("input.image mean must be finite numbers (got {:?})", image.mean));
    }
    if !image.std.iter().all(|&s| s.is_finite() && s >= MIN_STD) {
        return Err(format!("input.image std must be finite and at least {MIN_STD} (got {:?})", image.std));
    }
    if image.resize_shorter_side.is_some_and(|side| side < image.width.max(image.height)) {
        return Err("input.image resize_shorter_side must be at least the crop's width and height".to_owned());
    }
    Ok(image.vector_len())
}

/// Checks a tabular spec; its vector length.
fn check_tabular(spec: &TabularSpec) -> Result<usize, String> {
    let names: Vec<&str> = spec.fields.iter().map(FieldSpec::name).collect();
    if names.iter().any(|n| n.trim().is_empty()) {
        return Err("every field needs a name".to_owned());
    }
    if let Some(twice) = first_repeated(&names) {
        return Err(format!("field {twice:?} comes twice"));
    }
    for field in &spec.fields {
        match field {
            FieldSpec::Numeric { name, min, max, default, .. } => {
                if ![min, max, default].iter().all(|x| x.is_finite()) {
                    return Err(format!("field {name:?}: min, max and default must be finite numbers"));
                }
                if max <= min {
                    return Err(format!("field {name:?}: max must exceed min"));
                }
                if !(max - min).is_finite() {
                    return Err(format!(
                        "field {name:?}: max - min must be a finite number (the field is scaled by it)"
                    ));
                }
                if !(min..=max).contains(&default) {
                    return Err(format!("field {name:?}: default must lie within min..max"));
                }
            }
            FieldSpec::Categorical { name, categories, default } => {
                if categories.is_empty() {
                    return Err(format!("field {name:?}: categories must not be empty"));
                }
                if let Some(twice) = first_repeated(categories) {
                    return Err(format!("field {name:?}: category {twice:?} comes twice"));
                }
                if default.as_ref().is_some_and(|d| !categories.contains(d)) {
                    return Err(format!("field {name:?}: default is not one of its categories"));
                }
            }
        }
    }
    if let Some(unknown) = spec.required.iter().find(|r| !names.contains(&r.as_str())) {
        return Err(format!("required field {unknown:?} is not one of the fields"));
    }
    if spec.min_present.is_some_and(|share| !(0.0..=1.0).contains(&share)) {
        return Err("min_present must lie in 0..=1 (a share of the fields)".to_owned());
    }
    Ok(spec.vector_len())
}

/// The first value that comes a second time.
fn first_repeated<T: AsRef<str>>(values: &[T]) -> Option<&str> {
    let mut seen = std::collections::BTreeSet::new();
    values.iter().map(AsRef::as_ref).find(|v| !seen.insert(*v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ModelManifest {
        ModelManifest {
            name: "m".into(),
            version: "1".into(),
            architecture: Architecture::DigitsCnn,
            labels: vec!["a".into(), "b".into()],
            input: InputSpec {
                image: Some(ImageInput {
                    width: 2,
                    height: 1,
                    channels: 1,
                    mean: vec![0.0],
                    std: vec![1.0],
                    resize_shorter_side: None,
                }),
                tabular: Some(TabularSpec {
                    fields: vec![FieldSpec::Categorical {
                        name: "c".into(),
                        categories: vec!["x".into(), "y".into()],
                        default: None,
                    }],
                    required: Vec::new(),
                    min_present: None,
                }),
            },
            thresholds: Thresholds { default: 0.9, per_class: BTreeMap::from([("b".into(), 0.5)]) },
            fallback: None,
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn an_event_without_the_fields_hears_the_first_eight_named() {
        let field =
            |i: usize| FieldSpec::Numeric { name: format!("f{i}"), min: 0.0, max: 1.0, default: 0.0, clamp: false };
        let spec = TabularSpec { fields: (0..10).map(field).collect(), required: Vec::new(), min_present: None };
        let said = spec.check_present(&serde_json::Map::new()).unwrap_err();
        assert!(said.contains("0 of the model's 10 fields (f0, f1, f2, f3, f4, f5, f6, f7 and 2 more)"), "{said}");
    }

    #[test]
    fn manifest_round_trips_and_is_checked() {
        let m = manifest();
        assert_eq!(m.check(), Ok(()));
        assert_eq!(toml::from_str::<ModelManifest>(&m.to_toml()).unwrap(), m);
        assert_eq!(m.threshold("a"), 0.9);
        assert_eq!(m.threshold("b"), 0.5);
        assert_eq!(m.vector_len(), 2);

        let mut bad = manifest();
        bad.thresholds.per_class.insert("zzz".into(), 0.5);
        assert!(bad.check().is_err());
        let mut bad = manifest();
        bad.input.image.as_mut().unwrap().width = 3;
        assert!(bad.check().unwrap_err().contains("tabular"));
        let mut bad = manifest();
        bad.input.image.as_mut().unwrap().resize_shorter_side = Some(1);
        assert!(bad.check().unwrap_err().contains("resize_shorter_side"));
        bad.input.image.as_mut().unwrap().resize_shorter_side = Some(2);
        assert_eq!(bad.check(), Ok(()));
        // A numeric field whose default lies outside its range (which values are refused from).
        let mut numeric = manifest();
        let field = |default, clamp| FieldSpec::Numeric { name: "n".into(), min: 0.0, max: 2.0, default, clamp };
        numeric.input.tabular.as_mut().unwrap().fields = vec![field(3.0, false)];
        assert!(numeric.check().unwrap_err().contains("default must lie within"));
        // `clamp` is written only when set, and read back.
        numeric.input.tabular.as_mut().unwrap().fields = vec![field(1.0, true)];
        assert!(numeric.to_toml().contains("clamp = true"));
        assert_eq!(toml::from_str::<ModelManifest>(&numeric.to_toml()).unwrap(), numeric);
    }

    /// Bundle mistakes that would start and then serve wrong answers: each refused, named.
    /// The fingerprint follows what the vectors are made of, and only that.
    #[test]
    fn an_input_fingerprint_moves_with_what_the_vectors_are_made_of() {
        let spec = manifest().input;
        assert_eq!(spec.fingerprint(), manifest().input.fingerprint(), "stable");
        assert_eq!(spec.fingerprint().len(), 16);
        // Pinned: records in flight and inference DLQ entries carry the fingerprint they were
        // featured under, for months. A build that computed it otherwise would refuse them all
        // as made for another input: change the computation only with a way to read the old.
        assert_eq!(spec.fingerprint(), "dd748e09c63258c0", "the fingerprint's computation changed");
        let mut normalised = spec.clone();
        normalised.image.as_mut().unwrap().mean = vec![0.5];
        normalised.image.as_mut().unwrap().std = vec![0.25];
        assert_eq!(normalised.fingerprint(), spec.fingerprint(), "the model normalises on its device");
        let mut wider = spec.clone();
        wider.image.as_mut().unwrap().width += 1;
        assert_ne!(wider.fingerprint(), spec.fingerprint());
        let mut no_events = spec.clone();
        no_events.tabular = None;
        assert_ne!(no_events.fingerprint(), spec.fingerprint());
    }

    #[test]
    fn a_bundle_that_would_serve_wrong_answers_is_refused() {
        fn refused(change: impl Fn(&mut ModelManifest), says: &str) {
            let mut m = manifest();
            change(&mut m);
            let err = m.check().expect_err(says);
            assert!(err.contains(says), "{says}: {err}");
        }
        fn image(m: &mut ModelManifest) -> &mut ImageInput {
            m.input.image.as_mut().unwrap()
        }
        fn tabular(m: &mut ModelManifest) -> &mut TabularSpec {
            m.input.tabular.as_mut().unwrap()
        }
        // Two one-wide fields, as wide as the image input.
        fn fields(m: &mut ModelManifest, (a, b): (&str, &str), (min, max): (f32, f32)) {
            let numeric = |name: &str| FieldSpec::Numeric { name: name.into(), min, max, default: 0.0, clamp: false };
            tabular(m).fields = vec![numeric(a), numeric(b)];
        }
        refused(|m| m.version = " ".into(), "name and version");
        refused(|m| m.labels = vec!["a".into(), "a".into()], "label \"a\" comes twice");
        refused(|m| m.labels[0] = String::new(), "empty strings");
        refused(|m| image(m).mean = vec![f32::NAN], "mean must be finite");
        refused(|m| image(m).width = 65_536, "must be at most 4096");
        refused(|m| image(m).resize_shorter_side = Some(u32::MAX), "must be at most 4096");
        refused(|m| image(m).std = vec![1e-45], "std must be finite");
        refused(|m| image(m).std = vec![f32::INFINITY], "std must be finite");
        refused(|m| fields(m, ("x", "x"), (0.0, 1.0)), "field \"x\" comes twice");
        refused(|m| fields(m, ("", "y"), (0.0, 1.0)), "needs a name");
        refused(|m| fields(m, ("x", "y"), (f32::NEG_INFINITY, 1.0)), "finite numbers");
        refused(|m| fields(m, ("x", "y"), (-3e38, 3e38)), "max - min must be a finite number");
        refused(
            |m| {
                tabular(m).fields[0] =
                    FieldSpec::Categorical { name: "c".into(), categories: vec!["x".into(), "x".into()], default: None }
            },
            "category \"x\" comes twice",
        );
        refused(|m| tabular(m).required = vec!["amout".into()], "required field \"amout\"");
        refused(|m| tabular(m).min_present = Some(2.0), "min_present");
        refused(|m| tabular(m).min_present = Some(f32::NAN), "min_present");
        refused(|m| m.input.image = None, "input.image is needed");
        let mut fine = manifest();
        fields(&mut fine, ("x", "y"), (0.0, 1.0));
        tabular(&mut fine).required = vec!["y".into()];
        assert_eq!(fine.check(), Ok(()));
    }

    /// The `model.toml` docs/models.md shows is one a bundle may have.
    #[test]
    fn the_documented_manifest_is_a_valid_one() {
        let doc = include_str!("../../docs/models.md");
        let toml = doc.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
        let manifest: ModelManifest = toml::from_str(toml).unwrap();
        assert_eq!(manifest.check(), Ok(()));
        assert_eq!(manifest.vector_len(), 4);
    }

    #[test]
    fn load_rejects_a_bundle_without_weights() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST_FILE), manifest().to_toml()).unwrap();
        let err = ModelBundle::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("weights"), "{err}");
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"").unwrap();
        assert!(ModelBundle::load(dir.path()).is_ok());
    }
}
