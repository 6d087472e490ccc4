//! `sluice report --out DIR`: one HTML page (`DIR/index.html`, charts inline as SVG, no
//! assets from anywhere) of how the model and the pipeline did over a window: confidence by
//! class, throughput and latency, review and DLQ rates by reason, accuracy against the
//! baseline, drift (PSI) and the fallback's share, each over time.

mod charts;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sluice_core::backend::Backend;
use sluice_core::dlq::{Filter, Letters};
use sluice_core::model::ModelManifest;
use sluice_core::record::ResultStatus;
use sluice_core::{ReasonCode, Result, SluiceError};

use self::charts::{Chart, Series, XAxis};
use crate::MonitorConfig;
use crate::alert::AlertState;
use crate::check::load_reference;
use crate::drift::{BINS, Profile, compare, feature_names};
use crate::quality::{Accuracy, quality};
use crate::window::{Observation, Window};

/// What the page says in numbers, also printed by `sluice report`.
#[derive(Debug, Clone, Serialize)]
pub struct ReportSummary {
    pub page: PathBuf,
    pub since_ms: u64,
    pub until_ms: u64,
    pub records: u64,
    pub labelled: u64,
    pub accuracy: Option<f64>,
    /// Predictions sent to review in the window...
    pub review: u64,
    /// ...and those of them no one has reviewed yet.
    pub review_waiting: u64,
    pub dead_lettered: BTreeMap<String, u64>,
    pub fallback_share: f64,
    /// `saved` (the monitor's reference) or `window` (the whole window, when none is saved).
    pub reference: &'static str,
    pub charts: usize,
}

/// Bucket widths a window is cut into, the smallest that gives at most [`MAX_BUCKETS`].
const BUCKET_WIDTHS_S: [u64; 14] = [1, 2, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 10_800, 21_600, 86_400];
const MAX_BUCKETS: u64 = 40;

/// The backend label a fallback prediction carries starts with this.
const FALLBACK_PREFIX: &str = "sagemaker";

struct DeadLetter {
    at_ms: u64,
    reason: String,
    /// Whether its record would have been captured (`results.capture.sample_rate`): rates
    /// against the captured predictions count only these.
    sampled: bool,
}

/// Writes the report of `since_ms..=until_ms` into `out` (created if needed). `sample_rate` is
/// the results stage's `capture.sample_rate`: the share of predictions captured, by record id.
pub async fn write(
    backend: &Backend,
    config: &MonitorConfig,
    manifest: &ModelManifest,
    (since_ms, until_ms): (u64, u64),
    sample_rate: f64,
    out: &Path,
) -> Result<ReportSummary> {
    if since_ms > until_ms {
        return Err(SluiceError::permanent(ReasonCode::SchemaMismatch, "a report's window must start before it ends"));
    }
    let window = Window::read(backend, since_ms, until_ms, config.max_records).await?;
    // A window cut to a sample is a lower rate of the same sampling.
    let sample_rate = if sample_rate > 0.0 { sample_rate.min(1.0) } else { 1.0 }.min(window.sample_rate);
    let mut dead = Vec::new();
    for letters in Letters::ALL.into_iter().filter(|l| *l != Letters::Review) {
        for item in sluice_core::dlq::list(backend, letters, &Filter::default(), usize::MAX).await? {
            let at_ms = item.entry.last_failure_ms;
            if (since_ms..=until_ms).contains(&at_ms) {
                let reason = format!("{}/{}", item.entry.stage, item.entry.reason);
                let sampled = item.record_id().is_none_or(|id| sluice_core::capture::sampled(id, sample_rate));
                dead.push(DeadLetter { at_ms, reason, sampled });
            }
        }
    }
    let saved = load_reference(backend).await?;
    let state = AlertState::load(backend.capture.as_ref()).await?;
    let page = Page::new(&window, &dead, saved.as_ref().map(|r| &r.profile), manifest, config, sample_rate);
    let (html, charts) = page.render(&state)?;
    std::fs::create_dir_all(out).map_err(|e| io_error(out, e))?;
    let path = out.join("index.html");
    std::fs::write(&path, html).map_err(|e| io_error(&path, e))?;
    let all = quality(&window.observations).overall;
    let (review, review_waiting) = window.review();
    Ok(ReportSummary {
        page: path,
        since_ms,
        until_ms,
        records: window.observations.len() as u64,
        labelled: all.labelled,
        accuracy: all.value(),
        review,
        review_waiting,
        dead_lettered: dead.iter().fold(BTreeMap::new(), |mut m, d| {
            *m.entry(d.reason.clone()).or_default() += 1;
            m
        }),
        fallback_share: share(
            window.captures().filter(|c| c.backend.starts_with(FALLBACK_PREFIX)).count(),
            window.observations.len(),
        ),
        reference: if saved.is_some() { "saved" } else { "window" },
        charts,
    })
}

fn io_error(path: &Path, e: std::io::Error) -> SluiceError {
    SluiceError::permanent(ReasonCode::Internal, format!("{}: {e}", path.display()))
}

fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// The window cut into time buckets.
struct Page<'a> {
    window: &'a Window,
    dead: &'a [DeadLetter],
    reference: Profile,
    reference_name: &'static str,
    manifest: &'a ModelManifest,
    config: &'a MonitorConfig,
    origin_ms: u64,
    width_s: u64,
    buckets: Vec<Bucket<'a>>,
    /// The share of predictions captured (`results.capture.sample_rate`).
    sample_rate: f64,
}

#[derive(Default)]
struct Bucket<'a> {
    observations: Vec<&'a Observation>,
    dead: BTreeMap<&'a str, u64>,
}

impl<'a> Page<'a> {
    fn new(
        window: &'a Window,
        dead: &'a [DeadLetter],
        saved: Option<&Profile>,
        manifest: &'a ModelManifest,
        config: &'a MonitorConfig,
        sample_rate: f64,
    ) -> Self {
        let times = window.captures().map(|c| c.captured_ms).chain(dead.iter().map(|d| d.at_ms));
        let (first, last) = times.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
        let (first, last) = if first > last { (window.since_ms, window.until_ms) } else { (first, last) };
        let span_s = (last - first) / 1000 + 1;
        let width_s = BUCKET_WIDTHS_S.into_iter().find(|w| span_s.div_ceil(*w) <= MAX_BUCKETS).unwrap_or(86_400);
        let origin_ms = first - first % (width_s * 1000);
        let count = ((last - origin_ms) / (width_s * 1000) + 1) as usize;
        let mut buckets: Vec<Bucket<'a>> = (0..count).map(|_| Bucket::default()).collect();
        let index = |t: u64| (((t - origin_ms) / (width_s * 1000)) as usize).min(count - 1);
        for o in &window.observations {
            buckets[index(o.capture.captured_ms)].observations.push(o);
        }
        // Beside the captured predictions, the entries of records that would have been captured.
        for d in dead.iter().filter(|d| d.sampled) {
            *buckets[index(d.at_ms)].dead.entry(d.reason.as_str()).or_default() += 1;
        }
        let (reference, reference_name) = match saved {
            Some(profile) => (profile.clone(), "saved"),
            None => (Profile::of(window.captures()), "window"),
        };
        Self { window, dead, reference, reference_name, manifest, config, origin_ms, width_s, buckets, sample_rate }
    }

    /// The x of bucket `i`: its middle, in seconds after the origin.
    fn x(&self, i: usize) -> f64 {
        (i as f64 + 0.5) * self.width_s as f64
    }

    fn x_range(&self) -> std::ops::Range<f64> {
        0.0..(self.buckets.len() as f64 * self.width_s as f64)
    }

    /// A chart over the window's buckets; its y axis reaches at least `least_top`.
    fn time_chart(&self, title: &str, y_desc: &str, least_top: f64, series: Vec<Series>) -> Chart {
        let top = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(least_top / 1.15, f64::max);
        Chart {
            title: title.to_owned(),
            x_desc: format!("time (UTC), {} s buckets", self.width_s),
            y_desc: y_desc.to_owned(),
            x: self.x_range(),
            y: 0.0..(top * 1.15).max(1e-3),
            x_axis: XAxis::Time { origin_ms: self.origin_ms, span_s: self.x_range().end },
            x_labels: (self.buckets.len() + 1).min(7),
            series,
        }
    }

    /// `value` of each bucket where it has one.
    fn per_bucket(&self, value: impl Fn(&Bucket<'a>) -> Option<f64>) -> Vec<(f64, f64)> {
        self.buckets.iter().enumerate().filter_map(|(i, b)| value(b).map(|v| (self.x(i), v))).collect()
    }

    fn charts(&self) -> Vec<(Chart, &'static str)> {
        let labels = &self.manifest.labels;
        let mut out = Vec::new();

        // Confidence by predicted class.
        let mut by_class: BTreeMap<&str, Vec<u64>> = labels.iter().map(|l| (l.as_str(), vec![0; BINS])).collect();
        for c in self.window.captures() {
            let bin = ((c.confidence.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1);
            by_class.entry(c.label.as_str()).or_insert_with(|| vec![0; BINS])[bin] += 1;
        }
        let series = by_class
            .iter()
            .filter(|(_, bins)| bins.iter().any(|&n| n > 0))
            .map(|(label, bins)| {
                let points =
                    bins.iter().enumerate().map(|(b, &n)| ((b as f64 + 0.5) / BINS as f64, n as f64)).collect();
                Series::line(format!("class {label}"), points)
            })
            .collect::<Vec<_>>();
        let top = by_class.values().flatten().copied().max().unwrap_or(0) as f64;
        out.push((
            Chart {
                title: "Confidence by predicted class".into(),
                x_desc: "confidence".into(),
                y_desc: "predictions".into(),
                x: 0.0..1.0,
                y: 0.0..(top * 1.15).max(1.0),
                x_axis: XAxis::Value,
                x_labels: 11,
                series,
            },
            "How sure the model is, per class it predicts. A class whose mass slides left is one it is losing its grip on.",
        ));

        // Throughput: the captured predictions, scaled up by the capture's sample rate.
        let per_second = self.width_s as f64 * self.sample_rate;
        let throughput = self.per_bucket(|b| Some(b.observations.len() as f64 / per_second));
        out.push((
            self.time_chart("Throughput", "results / s", 1.0, vec![Series::line("results stored", throughput)]),
            if self.sample_rate < 1.0 {
                "Predictions stored per second, estimated from the sample (results.capture.sample_rate, monitor.max_records)."
            } else {
                "Predictions stored per second."
            },
        ));

        // Latency.
        let latency = |q: f64| {
            self.per_bucket(move |b| {
                let mut ms: Vec<u64> = b
                    .observations
                    .iter()
                    .filter_map(|o| o.capture.timestamps.stored_ms?.checked_sub(o.capture.timestamps.produced_ms?))
                    .collect();
                ms.sort_unstable();
                (!ms.is_empty()).then(|| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1] as f64)
            })
        };
        out.push((
            self.time_chart(
                "End-to-end latency",
                "ms (produced → stored)",
                10.0,
                vec![Series::line("p50", latency(0.5)), Series::line("p99", latency(0.99))],
            ),
            "From the producer's timestamp to the stored result, by the time the result was stored.",
        ));

        // Review and DLQ rates.
        let reasons: Vec<&str> = {
            let mut r: Vec<&str> = self.dead.iter().map(|d| d.reason.as_str()).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        let total = |b: &Bucket<'_>| b.observations.len() as f64 + b.dead.values().sum::<u64>() as f64;
        let mut series = vec![Series::line(
            "review (below threshold)",
            self.per_bucket(|b| {
                let n = total(b);
                (n > 0.0).then(|| {
                    100.0 * b.observations.iter().filter(|o| o.capture.status == ResultStatus::Review).count() as f64
                        / n
                })
            }),
        )];
        for reason in reasons {
            series.push(Series::line(
                format!("DLQ {reason}"),
                self.per_bucket(|b| {
                    let n = total(b);
                    (n > 0.0).then(|| 100.0 * b.dead.get(reason).copied().unwrap_or(0) as f64 / n)
                }),
            ));
        }
        out.push((
            self.time_chart("Review and dead-letter rates", "% of records", 5.0, series),
            "The share of each bucket's records sent to review, and dead-lettered, by reason.",
        ));

        // Accuracy.
        let x = self.x_range();
        let accuracy = self.per_bucket(|b| {
            let mut a = Accuracy::default();
            b.observations.iter().filter_map(|o| o.correct()).for_each(|ok| a.add(ok));
            a.value().map(|v| 100.0 * v)
        });
        let mut chart = self.time_chart(
            "Accuracy against ground truth",
            "% correct",
            100.0,
            vec![
                Series::line("accuracy (labelled predictions)", accuracy),
                Series::reference(
                    format!("baseline {:.0}%", self.config.accuracy_baseline * 100.0),
                    self.config.accuracy_baseline * 100.0,
                    &x,
                ),
            ],
        );
        chart.y = 0.0..105.0;
        out.push((
            chart,
            "Predictions whose true label is known (fed back, or given in review), by when they were stored.",
        ));

        // Drift.
        let names = feature_names(self.manifest);
        // A bucket gets a point from as many predictions (and a feature, records with features)
        // as the monitor judges drift from: fewer read as drift by chance (a class missing
        // from 20 predictions adds ~0.7), on an unchanged stream.
        let enough = self.config.min_records.max(1);
        let drifts: Vec<(f64, crate::drift::Drift)> = self
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| b.observations.len() as u64 >= enough)
            .map(|(i, b)| {
                (self.x(i), compare(&self.reference, &Profile::of(b.observations.iter().map(|o| &o.capture)), &names))
            })
            .collect();
        let psi = |pick: &dyn Fn(&crate::drift::Drift) -> Option<f64>| -> Vec<(f64, f64)> {
            drifts.iter().filter_map(|(x, d)| pick(d).map(|v| (*x, v))).collect()
        };
        let mut series = vec![
            Series::line("predicted classes", psi(&|d| Some(d.prediction_psi))),
            Series::line("confidences", psi(&|d| Some(d.confidence_psi))),
        ];
        let features = psi(&|d| d.worst_feature().filter(|_| d.feature_records >= enough).map(|w| w.1));
        if !features.is_empty() {
            series.push(Series::line("most moved feature", features));
        }
        series.push(Series::reference(
            format!("threshold {}", self.config.psi_threshold),
            self.config.psi_threshold,
            &x,
        ));
        out.push((
            self.time_chart("Drift (population stability index)", "PSI", 0.25, series),
            if self.reference_name == "saved" {
                "Each bucket against the reference saved with `sluice monitor --set-reference`; a bucket \
                 with fewer predictions than `monitor.min_records` has no point."
            } else {
                "Each bucket against the whole window (no reference saved: `sluice monitor --set-reference`); \
                 a bucket with fewer predictions than `monitor.min_records` has no point."
            },
        ));

        // Fallback share.
        out.push((
            self.time_chart(
                "Fallback share",
                "% of predictions",
                5.0,
                vec![Series::line(
                    "served by the SageMaker fallback",
                    self.per_bucket(|b| {
                        (!b.observations.is_empty()).then(|| {
                            100.0
                                * share(
                                    b.observations
                                        .iter()
                                        .filter(|o| o.capture.backend.starts_with(FALLBACK_PREFIX))
                                        .count(),
                                    b.observations.len(),
                                )
                        })
                    }),
                )],
            ),
            "Predictions the fallback endpoint served while the model's circuit breaker was open.",
        ));
        out
    }

    /// The page, and how many charts it holds.
    fn render(&self, state: &AlertState) -> Result<(String, usize)> {
        let charts = self.charts();
        let all = quality(&self.window.observations);
        let mut html = String::new();
        let title = format!("sluice report: {} {}", self.manifest.name, self.manifest.version);
        let _ = write!(
            html,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body><h1>{}</h1>",
            escape(&title),
            escape(&title)
        );
        let _ = write!(
            html,
            "<p class=\"window\">{} → {} (UTC) · {} predictions captured · generated {}</p>",
            stamp(self.window.since_ms.max(self.origin_ms)),
            stamp(self.window.until_ms),
            self.window.observations.len(),
            stamp(sluice_core::envelope::now_ms())
        );
        html.push_str("<table class=\"summary\"><tr>");
        let accuracy = all.overall.value().map_or("–".to_owned(), |a| format!("{:.1}%", a * 100.0));
        let cells = [
            ("predictions", self.window.observations.len().to_string()),
            ("labelled", all.overall.labelled.to_string()),
            ("accuracy", accuracy),
            ("baseline", format!("{:.0}%", self.config.accuracy_baseline * 100.0)),
            ("sent to review", {
                let (sent, waiting) = self.window.review();
                format!("{sent} ({waiting} waiting)")
            }),
            ("dead-lettered", self.dead.len().to_string()),
            (
                "alerts firing",
                if state.firing.is_empty() {
                    "none".to_owned()
                } else {
                    state.firing.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            ),
        ];
        for (name, value) in &cells {
            let _ = write!(
                html,
                "<td><div class=\"v\">{}</div><div class=\"k\">{}</div></td>",
                escape(value),
                escape(name)
            );
        }
        html.push_str("</tr></table>");
        if !all.by_class.is_empty() {
            html.push_str("<table class=\"classes\"><tr><th>true class</th>");
            for class in all.by_class.keys() {
                let _ = write!(html, "<th>{}</th>", escape(class));
            }
            html.push_str("</tr><tr><th>accuracy</th>");
            for a in all.by_class.values() {
                let low = a.value().is_some_and(|v| v < self.config.accuracy_baseline);
                let _ = write!(
                    html,
                    "<td{}>{}<br><small>{} of {}</small></td>",
                    if low { " class=\"low\"" } else { "" },
                    a.value().map_or("–".to_owned(), |v| format!("{:.0}%", v * 100.0)),
                    a.correct,
                    a.labelled
                );
            }
            html.push_str("</tr></table>");
        }
        html.push_str("<div class=\"grid\">");
        for (chart, caption) in &charts {
            let svg = chart.to_svg().map_err(|e| SluiceError::permanent(ReasonCode::Internal, e))?;
            let _ = write!(html, "<figure>{svg}<figcaption>{}</figcaption></figure>", escape(caption));
        }
        html.push_str("</div></body></html>\n");
        Ok((html, charts.len()))
    }
}

fn stamp(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1420px;padding:0 16px;color:#222}\
h1{font-size:22px;margin:0 0 4px}.window{color:#666;margin:0 0 16px}\
table{border-collapse:collapse;margin:0 0 16px}.summary td{padding:8px 18px 8px 0}.summary .v{font-size:22px;font-weight:600}\
.summary .k{color:#666;font-size:13px}.classes th,.classes td{border:1px solid #ddd;padding:4px 10px;text-align:center;font-size:13px}\
.classes td.low{background:#fde2e2}.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(640px,1fr));gap:16px}\
figure{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:8px}figure svg{width:100%;height:auto}\
figcaption{color:#555;font-size:13px;padding:4px 8px}";
