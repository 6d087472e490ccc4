//! Model monitoring: what SageMaker Model Monitor did for the people who run sluice, over the
//! capture log the results stage writes and the results the pipeline keeps.
//!
//! - [`window`]: captured predictions of a time window, one per record, joined to their true
//!   labels (fed back, or given in review).
//! - [`feedback`]: `sluice feedback`: true labels from a CSV or JSON-lines file into the results.
//! - [`quality`]: accuracy against those labels, overall and per class.
//! - [`drift`]: population stability of predicted classes, confidences and tabular features
//!   against a saved reference.
//! - [`alert`]: thresholds, one alert per crossing, to the log, the metrics, a webhook, SNS.
//! - [`check`]: one monitoring pass (`sluice monitor`).
//! - [`report`]: `sluice report`: one offline HTML page of charts.

pub mod alert;
pub mod check;
pub mod config;
pub mod drift;
pub mod feedback;
pub mod quality;
pub mod report;
pub mod window;

pub use config::MonitorConfig;
