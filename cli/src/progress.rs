//! Progress bars for the long commands (`produce`, `dlq replay`, `train`, `bench`): drawn on
//! stderr when it is a terminal, nothing at all otherwise (a pipe, a CI log, a container).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar for `len` steps of `what` (e.g. "records", "epochs").
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template = format!("{{spinner}} {{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, {{eta}} left) {{msg}}");
    bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// A counter for work whose total is unknown (e.g. the entries of a DLQ).
pub fn counter(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    let template = format!("{{spinner}} {{pos}} {what} ({{per_sec}})");
    bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_spinner()));
    bar
}
