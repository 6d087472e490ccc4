//! Reading the workers' `/metrics` back: `sluice top` and the tests.
//!
//! Only what sluice itself writes needs reading (the Prometheus text format, no timestamps, no
//! escaped quotes in label values), so a few lines do; a general parser crate would bring a
//! regex engine and a date library along for it.

use std::collections::BTreeMap;

/// One line of the text format: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a scrape; comments and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = labels
        .split("\",")
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect::<Option<_>>()?;
    Some(Sample { name: name.to_owned(), labels, value: value.parse().ok()? })
}

fn matches(sample: &Sample, name: &str, with: &[(&str, &str)]) -> bool {
    sample.name == name && with.iter().all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
}

/// The sum of `name`'s samples whose labels include all of `with`.
pub fn total(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples.iter().filter(|s| matches(s, name, with)).map(|s| s.value).sum()
}

/// The histogram's cumulative bucket counts (`name_bucket`, summed over the series matching
/// `with`), by upper bound.
pub fn buckets(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut by_bound: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for sample in samples.iter().filter(|s| matches(s, &bucket, with)) {
        let Some(bound) = sample.labels.get("le").and_then(|le| le.replace("+Inf", "inf").parse::<f64>().ok()) else {
            continue;
        };
        by_bound.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += sample.value;
    }
    let mut out: Vec<(f64, f64)> = by_bound.into_values().collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile of the observations counted in cumulative `buckets` (as Prometheus's
/// `histogram_quantile` estimates it: linearly within the bucket it falls in). `None` without
/// observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let count = buckets.last()?.1;
    if count <= 0.0 {
        return None;
    }
    let rank = q * count;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, cumulative) in buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = cumulative - below;
            let fraction = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
            return Some(lower + (bound - lower) * fraction);
        }
        (lower, below) = (bound, cumulative);
    }
    Some(lower)
}

/// Cumulative buckets minus an earlier reading of the same histogram: the observations between.
pub fn bucket_delta(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(bound, count)| {
            let earlier = before.iter().find(|(b, _)| *b == bound).map_or(0.0, |(_, c)| *c);
            (bound, (count - earlier).max(0.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE x counter\n\
        sluice_records_processed_total{stage=\"ingest\"} 7\n\
        sluice_records_processed_total{stage=\"results\"} 5\n\
        lat_seconds_bucket{le=\"0.1\"} 2\n\
        lat_seconds_bucket{le=\"1\"} 8\n\
        lat_seconds_bucket{le=\"+Inf\"} 10\n\
        up 1\n";

    #[test]
    fn samples_sum_by_label() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 6);
        assert_eq!(total(&samples, "sluice_records_processed_total", &[]), 12.0);
        assert_eq!(total(&samples, "sluice_records_processed_total", &[("stage", "results")]), 5.0);
        assert_eq!(total(&samples, "up", &[]), 1.0);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let b = buckets(&parse(TEXT), "lat_seconds", &[]);
        assert_eq!(b.len(), 3);
        assert_eq!(quantile(0.1, &b), Some(0.05));
        assert!((quantile(0.5, &b).unwrap() - 0.55).abs() < 1e-9);
        assert_eq!(quantile(0.99, &b), Some(1.0), "past the last finite bound: that bound");
        assert_eq!(quantile(0.5, &bucket_delta(&b, &b)), None);
    }
}
