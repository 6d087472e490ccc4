//! Drift by population stability index (PSI): how far a distribution has moved from a
//! reference, summed over bins as `(actual − expected) · ln(actual / expected)` of the shares.
//! Measured on the predicted classes, on the confidences, and on each tabular feature.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_core::capture::CaptureRecord;
use sluice_core::model::{FieldSpec, ModelManifest};

/// Equal-width bins over 0..1 for confidences and features (tabular features are scaled into
/// 0..1 by the bundle's spec; one-hot entries are 0 or 1).
pub const BINS: usize = 10;

/// A share of zero would make the index infinite: empty bins count as this small share.
const EMPTY_SHARE: f64 = 1e-4;

/// The distributions of a set of captured predictions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub records: u64,
    /// Predictions by predicted class.
    pub classes: BTreeMap<String, u64>,
    /// Confidences in [`BINS`] bins.
    pub confidence: Vec<u64>,
    /// Per feature-vector entry, its values in [`BINS`] bins (tabular records only).
    pub features: Vec<Vec<u64>>,
    /// How many records carried a feature vector.
    pub feature_records: u64,
}

fn bin(value: f32) -> usize {
    ((value.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1)
}

impl Profile {
    pub fn of<'a>(captures: impl IntoIterator<Item = &'a CaptureRecord>) -> Self {
        let mut out = Self { confidence: vec![0; BINS], ..Self::default() };
        for c in captures {
            out.records += 1;
            *out.classes.entry(c.label.clone()).or_default() += 1;
            out.confidence[bin(c.confidence)] += 1;
            if let Some(features) = &c.features {
                if out.features.len() < features.len() {
                    out.features.resize(features.len(), vec![0; BINS]);
                }
                for (i, &v) in features.iter().enumerate() {
                    out.features[i][bin(v)] += 1;
                }
                out.feature_records += 1;
            }
        }
        out
    }
}

/// The PSI between two histograms over the same bins.
pub fn psi(expected: &[u64], actual: &[u64]) -> f64 {
    let (e_total, a_total) = (expected.iter().sum::<u64>() as f64, actual.iter().sum::<u64>() as f64);
    if e_total == 0.0 || a_total == 0.0 {
        return 0.0;
    }
    expected
        .iter()
        .zip(actual)
        .map(|(&e, &a)| {
            let e = (e as f64 / e_total).max(EMPTY_SHARE);
            let a = (a as f64 / a_total).max(EMPTY_SHARE);
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// How far a window has moved from the reference.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Drift {
    pub prediction_psi: f64,
    pub confidence_psi: f64,
    /// Per feature (named after the bundle's tabular spec), where both sides have vectors.
    pub features: Vec<(String, f64)>,
    /// The fewer of the two sides' records with feature vectors: where a bundle takes images and
    /// tabular events, the tabular ones may be a handful of a window's predictions.
    pub feature_records: u64,
}

impl Drift {
    /// The feature that moved most.
    pub fn worst_feature(&self) -> Option<&(String, f64)> {
        self.features.iter().max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

pub fn compare(reference: &Profile, current: &Profile, feature_names: &[String]) -> Drift {
    let classes: std::collections::BTreeSet<&String> = reference.classes.keys().chain(current.classes.keys()).collect();
    let count = |p: &Profile| -> Vec<u64> { classes.iter().map(|c| p.classes.get(*c).copied().unwrap_or(0)).collect() };
    let features = if reference.feature_records > 0 && current.feature_records > 0 {
        reference
            .features
            .iter()
            .zip(&current.features)
            .enumerate()
            .map(|(i, (r, c))| (feature_names.get(i).cloned().unwrap_or_else(|| format!("f{i}")), psi(r, c)))
            .collect()
    } else {
        Vec::new()
    };
    Drift {
        prediction_psi: psi(&count(reference), &count(current)),
        confidence_psi: psi(&reference.confidence, &current.confidence),
        features,
        feature_records: reference.feature_records.min(current.feature_records),
    }
}

/// The name of each entry of a tabular bundle's feature vector: a numeric field's name, or
/// `field=category` for each one-hot entry.
pub fn feature_names(manifest: &ModelManifest) -> Vec<String> {
    let Some(spec) = &manifest.input.tabular else { return Vec::new() };
    spec.fields
        .iter()
        .flat_map(|field| match field {
            FieldSpec::Numeric { name, .. } => vec![name.clone()],
            FieldSpec::Categorical { name, categories, .. } => {
                categories.iter().map(|c| format!("{name}={c}")).collect()
            }
        })
        .collect()
}

/// The reference a window is compared with: the profile of a window judged healthy, saved by
/// `sluice monitor --set-reference`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    pub created_ms: u64,
    pub since_ms: u64,
    pub until_ms: u64,
    pub profile: Profile,
}

/// Its name beside the capture log.
pub const REFERENCE_DOCUMENT: &str = "reference.json";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sluice_core::envelope::{RecordId, StageTimes};
    use sluice_core::record::ResultStatus;

    pub(crate) fn capture(label: &str, confidence: f32, features: Option<Vec<f32>>) -> CaptureRecord {
        CaptureRecord {
            schema: sluice_core::capture::CAPTURE_SCHEMA.to_owned(),
            record_id: RecordId::parse(format!("r-{label}-{confidence}")).unwrap(),
            captured_ms: 1,
            model: "m".into(),
            model_version: "1".into(),
            backend: "candle-cpu".into(),
            label: label.into(),
            confidence,
            probabilities: vec![],
            status: ResultStatus::Accepted,
            content_type: "application/json".into(),
            timestamps: StageTimes::default(),
            features,
            attributes: Default::default(),
        }
    }

    #[test]
    fn the_same_distribution_has_no_drift_and_a_shifted_one_has() {
        assert_eq!(psi(&[10, 20, 30], &[20, 40, 60]), 0.0);
        assert!(psi(&[50, 50], &[90, 10]) > 0.2);
        assert!(psi(&[50, 50, 0], &[50, 45, 5]).is_finite(), "an empty bin does not blow up");
        assert_eq!(psi(&[], &[]), 0.0);
    }

    #[test]
    fn profiles_compare_classes_confidences_and_features() {
        let even: Vec<CaptureRecord> =
            (0..100).map(|i| capture(&(i % 2).to_string(), 0.95, Some(vec![0.1, (i % 2) as f32]))).collect();
        let skewed: Vec<CaptureRecord> =
            (0..100).map(|i| capture(if i < 90 { "0" } else { "1" }, 0.55, Some(vec![0.1, 0.0]))).collect();
        let names = vec!["a".to_owned(), "b".to_owned()];
        let same = compare(&Profile::of(&even), &Profile::of(&even), &names);
        assert_eq!((same.prediction_psi, same.confidence_psi), (0.0, 0.0));
        let moved = compare(&Profile::of(&even), &Profile::of(&skewed), &names);
        assert!(moved.prediction_psi > 0.2, "{moved:?}");
        assert!(moved.confidence_psi > 1.0, "{moved:?}");
        // A class the reference never saw counts once, beside the ones both have.
        let with_new: Vec<CaptureRecord> = (0..100)
            .map(|i| capture(["0", "1", "2"][usize::from(i >= 50) + usize::from(i >= 90)], 0.95, None))
            .collect();
        let psi_new = compare(&Profile::of(&even), &Profile::of(&with_new), &names).prediction_psi;
        // Shares 0.5/0.5/0 against 0.5/0.4/0.1 (0 floored at 1e-4).
        let expected = (0.4_f64 - 0.5) * (0.4_f64 / 0.5).ln() + (0.1_f64 - 1e-4) * (0.1_f64 / 1e-4).ln();
        assert!((psi_new - expected).abs() < 1e-9, "{psi_new} against {expected}");
        assert_eq!(moved.features[0], ("a".to_owned(), 0.0));
        assert_eq!(moved.worst_feature().unwrap().0, "b");
    }
}
