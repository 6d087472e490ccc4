//! One monitoring pass: read the window, judge accuracy and drift against their thresholds,
//! and raise an alert for each crossing.

use serde::Serialize;
use sluice_core::backend::Backend;
use sluice_core::model::ModelManifest;
use sluice_core::telemetry::metrics::metrics;
use sluice_core::{ReasonCode, Result, SluiceError};

use crate::MonitorConfig;
use crate::alert::{Alert, AlertState, Check, Notifier, crossings, notify, resolves};
use crate::drift::{Drift, Profile, REFERENCE_DOCUMENT, Reference, compare, feature_names};
use crate::quality::{Quality, quality};
use crate::window::Window;

/// What one pass found and did.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorRun {
    pub since_ms: u64,
    pub until_ms: u64,
    pub records: u64,
    pub quality: Quality,
    /// Against the saved reference; absent without one.
    pub drift: Option<Drift>,
    pub checks: Vec<Check>,
    /// Crossings raised by this pass.
    pub alerts: Vec<Alert>,
    /// Alerts a destination could not take (tried again next pass).
    pub undelivered: Vec<String>,
    pub skipped_lines: u64,
}

pub async fn load_reference(backend: &Backend) -> Result<Option<Reference>> {
    match backend.capture.get_meta(REFERENCE_DOCUMENT).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SluiceError::permanent(ReasonCode::SchemaMismatch, format!("{REFERENCE_DOCUMENT}: {e}"))),
    }
}

/// Saves the profile of `since_ms..=until_ms` as the reference later windows are compared with.
/// A window with fewer than `monitor.min_records` predictions is refused: drift against next to
/// nothing would read as no drift.
pub async fn set_reference(
    backend: &Backend,
    since_ms: u64,
    until_ms: u64,
    config: &MonitorConfig,
) -> Result<Reference> {
    let min_records = config.min_records;
    let window = Window::read(backend, since_ms, until_ms, config.max_records).await?;
    if (window.observations.len() as u64) < min_records.max(1) {
        return Err(SluiceError::permanent(
            ReasonCode::SchemaMismatch,
            format!(
                "{} predictions captured in that window; a reference needs at least {} (monitor.min_records)",
                window.observations.len(),
                min_records.max(1)
            ),
        ));
    }
    let reference = Reference {
        created_ms: sluice_core::envelope::now_ms(),
        since_ms,
        until_ms,
        profile: Profile::of(window.captures()),
    };
    let bytes = serde_json::to_vec_pretty(&reference).expect("a reference serialises");
    backend.capture.put_meta(REFERENCE_DOCUMENT, bytes).await?;
    Ok(reference)
}

/// Judges the window ending at `now_ms` and sends an alert for each crossing.
pub async fn run_once(
    backend: &Backend,
    config: &MonitorConfig,
    manifest: &ModelManifest,
    notifier: &Notifier,
    now_ms: u64,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Option<MonitorRun>> {
    let since_ms = config.window_start(now_ms);
    // Reading and judging stop at `stop` (`None`: nothing was sent or recorded); sending the
    // alerts and recording them is seen through, as one sent and not recorded would go again.
    let read = async {
        let window = Window::read(backend, since_ms, now_ms, config.max_records).await?;
        let reference = load_reference(backend).await?;
        let state = AlertState::load(backend.capture.as_ref()).await?;
        Ok::<_, sluice_core::SluiceError>((window, reference, state))
    };
    let (window, reference, mut state) = tokio::select! {
        read = read => read?,
        () = stop => return Ok(None),
    };
    let quality = quality(&window.observations);
    let profile = Profile::of(window.captures());
    let reference = reference.filter(|r| r.profile.records > 0);
    let drift = reference.as_ref().map(|r| compare(&r.profile, &profile, &feature_names(manifest)));
    let checks = judge(config, &quality, drift.as_ref(), profile.records, reference.is_some());
    report_metrics(&quality, drift.as_ref());

    let alerts = crossings(&state, &checks, &manifest.name);
    let undelivered = notify(&mut state, &alerts, notifier, now_ms).await;
    if !alerts.is_empty() {
        state.save(backend.capture.as_ref()).await?;
    }
    Ok(Some(MonitorRun {
        since_ms,
        until_ms: now_ms,
        records: profile.records,
        quality,
        drift,
        checks,
        alerts,
        undelivered,
        skipped_lines: window.skipped_lines,
    }))
}

fn judge(
    config: &MonitorConfig,
    quality: &Quality,
    drift: Option<&Drift>,
    records: u64,
    has_reference: bool,
) -> Vec<Check> {
    let overall = &quality.overall;
    let accuracy = overall.value();
    let mut checks = vec![Check {
        name: "accuracy".into(),
        value: accuracy,
        threshold: config.accuracy_baseline,
        breached: (overall.labelled >= config.min_labelled).then(|| accuracy.unwrap_or(1.0) < config.accuracy_baseline),
        clear: overall.labelled >= config.min_labelled
            && accuracy.unwrap_or(1.0) >= (config.accuracy_baseline + resolves::ACCURACY_MARGIN).min(1.0),
        detail: match accuracy {
            Some(a) => format!(
                "accuracy {:.1}% over {} labelled predictions (baseline {:.1}%{})",
                a * 100.0,
                overall.labelled,
                config.accuracy_baseline * 100.0,
                if overall.labelled < config.min_labelled {
                    format!("; not judged under {} labelled", config.min_labelled)
                } else {
                    String::new()
                }
            ),
            None => "no labelled predictions in the window".into(),
        },
    }];
    let enough = records >= config.min_records;
    let why_not = if !has_reference {
        "no reference saved (sluice monitor --set-reference)".to_owned()
    } else {
        format!("{records} predictions in the window; drift is judged from {}", config.min_records)
    };
    let psi_check = |name: &str, value: Option<f64>, what: String, enough: bool, why_not: String| Check {
        name: name.into(),
        value,
        threshold: config.psi_threshold,
        breached: value.filter(|_| enough).map(|v| v > config.psi_threshold),
        clear: value.filter(|_| enough).is_some_and(|v| v <= config.psi_threshold * resolves::PSI_SHARE),
        detail: match value {
            Some(v) if enough => {
                format!("PSI {v:.3} of {what} against the reference (threshold {})", config.psi_threshold)
            }
            _ => why_not,
        },
    };
    let predictions = drift.map(|d| d.prediction_psi);
    checks.push(psi_check("prediction_drift", predictions, "the predicted classes".into(), enough, why_not.clone()));
    let confidences = drift.map(|d| d.confidence_psi);
    checks.push(psi_check("confidence_drift", confidences, "the confidences".into(), enough, why_not.clone()));
    if let Some(drift) = drift
        && let Some(worst) = drift.worst_feature()
    {
        // Judged from as many records with features, on both sides, as the others are from.
        let enough = drift.feature_records >= config.min_records;
        let why_not = format!(
            "{} records with feature vectors in the window or the reference; feature drift is judged from {}",
            drift.feature_records, config.min_records
        );
        let what = format!("input feature {:?} (the most moved)", worst.0);
        checks.push(psi_check("feature_drift", Some(worst.1), what, enough, why_not));
    }
    checks
}

fn report_metrics(quality: &Quality, drift: Option<&Drift>) {
    if let Some(a) = quality.overall.value() {
        metrics().model_accuracy("all", a);
    }
    for (class, accuracy) in &quality.by_class {
        if let Some(a) = accuracy.value() {
            metrics().model_accuracy(class, a);
        }
    }
    if let Some(d) = drift {
        metrics().drift_psi("prediction_drift", d.prediction_psi);
        metrics().drift_psi("confidence_drift", d.confidence_psi);
        if let Some((_, worst)) = d.worst_feature() {
            metrics().drift_psi("feature_drift", *worst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature_drift(feature_records: u64) -> Option<Check> {
        let config = MonitorConfig::default();
        let drift = Drift { features: vec![("amount".into(), 2.0)], feature_records, ..Drift::default() };
        judge(&config, &Quality::default(), Some(&drift), 5_000, true).into_iter().find(|c| c.name == "feature_drift")
    }

    /// A window of thousands of images and three tabular events has three values a feature:
    /// their PSI says nothing, and is shown, not judged.
    #[test]
    fn feature_drift_is_judged_from_as_many_records_with_features_as_the_rest() {
        let few = feature_drift(3).unwrap();
        assert_eq!(few.breached, None, "{few:?}");
        assert!(few.detail.contains("3 records with feature vectors"), "{}", few.detail);
        let many = feature_drift(MonitorConfig::default().min_records).unwrap();
        assert_eq!(many.breached, Some(true), "{many:?}");
    }
}
