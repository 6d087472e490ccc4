//! Accuracy against true labels: overall, and per true class.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::window::Observation;

/// Labelled predictions and how many were right.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Accuracy {
    pub labelled: u64,
    pub correct: u64,
}

impl Accuracy {
    pub fn add(&mut self, correct: bool) {
        self.labelled += 1;
        self.correct += u64::from(correct);
    }

    /// The share right, when anything is labelled.
    pub fn value(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Quality {
    pub overall: Accuracy,
    /// By true class (each class's recall).
    pub by_class: BTreeMap<String, Accuracy>,
}

pub fn quality<'a>(observations: impl IntoIterator<Item = &'a Observation>) -> Quality {
    let mut out = Quality::default();
    for observation in observations {
        let (Some(truth), Some(correct)) = (&observation.truth, observation.correct()) else { continue };
        out.overall.add(correct);
        out.by_class.entry(truth.clone()).or_default().add(correct);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::tests::capture;

    #[test]
    fn accuracy_counts_only_labelled_predictions_by_their_true_class() {
        let obs = |label: &str, truth: Option<&str>| Observation {
            capture: capture(label, 0.9, None),
            truth: truth.map(str::to_owned),
            status_now: None,
        };
        let q = quality(&[obs("1", Some("1")), obs("1", Some("2")), obs("2", Some("2")), obs("3", None)]);
        assert_eq!(q.overall, Accuracy { labelled: 3, correct: 2 });
        assert_eq!(q.by_class["2"], Accuracy { labelled: 2, correct: 1 });
        assert_eq!(q.by_class["1"].value(), Some(1.0));
        assert!(!q.by_class.contains_key("3"));
        assert_eq!(Accuracy::default().value(), None);
    }
}
