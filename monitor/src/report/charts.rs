//! The report's charts: line charts drawn with plotters into SVG strings, inlined in the page.
//! Text is left to the browser (no font files are read), so the page draws the same offline.

use std::ops::Range;

use plotters::prelude::*;

/// One line of a chart.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
    /// A reference line (baseline, threshold): thinner, grey-red, no markers.
    pub(crate) reference: bool,
}

impl Series {
    pub(crate) fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, reference: false }
    }

    pub(crate) fn reference(name: impl Into<String>, y: f64, x: &Range<f64>) -> Self {
        Self { name: name.into(), points: vec![(x.start, y), (x.end, y)], reference: true }
    }
}

/// How the x axis reads.
pub(crate) enum XAxis {
    /// Seconds after `origin_ms`, labelled as UTC clock times.
    Time { origin_ms: u64, span_s: f64 },
    /// Plain numbers.
    Value,
}

pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) x_desc: String,
    pub(crate) y_desc: String,
    pub(crate) x: Range<f64>,
    pub(crate) y: Range<f64>,
    pub(crate) x_axis: XAxis,
    /// How many labels the x axis gets at most.
    pub(crate) x_labels: usize,
    pub(crate) series: Vec<Series>,
}

const SIZE: (u32, u32) = (680, 340);
const REFERENCE_COLOUR: RGBColor = RGBColor(200, 60, 60);
/// Ten colours told apart at a glance (Tableau 10), in order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

impl Chart {
    /// The chart as an SVG document.
    pub(crate) fn to_svg(&self) -> Result<String, String> {
        let mut svg = String::new();
        self.draw(&mut svg).map_err(|e| format!("{}: {e}", self.title))?;
        Ok(svg)
    }

    fn draw(&self, out: &mut String) -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(out, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let x = if self.x.end > self.x.start { self.x.clone() } else { self.x.start..self.x.start + 1.0 };
        let y = if self.y.end > self.y.start { self.y.clone() } else { self.y.start..self.y.start + 1.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(64)
            .build_cartesian_2d(x.clone(), y)?;
        let time_label = |v: &f64| match self.x_axis {
            XAxis::Time { origin_ms, span_s } => clock(origin_ms + (*v * 1000.0).max(0.0) as u64, span_s),
            XAxis::Value => format!("{v:.2}"),
        };
        chart
            .configure_mesh()
            .x_desc(&self.x_desc)
            .y_desc(&self.y_desc)
            .x_labels(self.x_labels)
            .y_labels(6)
            .x_label_formatter(&time_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        let mut palette = 0;
        for series in &self.series {
            let colour = if series.reference {
                REFERENCE_COLOUR.to_rgba()
            } else {
                palette += 1;
                PALETTE[(palette - 1) % PALETTE.len()].to_rgba()
            };
            let width = if series.reference { 1 } else { 2 };
            chart
                .draw_series(LineSeries::new(series.points.iter().copied(), colour.stroke_width(width)))?
                .label(&series.name)
                .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 18, ly)], colour.stroke_width(2)));
            if !series.reference && series.points.len() <= 60 {
                chart.draw_series(series.points.iter().map(|&p| Circle::new(p, 2, colour.filled())))?;
            }
        }
        if !self.series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(("sans-serif", 12))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

/// A UTC clock time, as precise as the span needs.
fn clock(ms: u64, span_s: f64) -> String {
    let stamp =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string();
    if span_s < 86_400.0 { stamp[11..19].to_owned() } else { format!("{} {}", &stamp[5..10], &stamp[11..16]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_its_lines_legend_and_labels() {
        let x = 0.0..10.0;
        let chart = Chart {
            title: "Accuracy".into(),
            x_desc: "time (UTC)".into(),
            y_desc: "%".into(),
            x: x.clone(),
            y: 0.0..100.0,
            x_axis: XAxis::Time { origin_ms: 1_795_000_000_000, span_s: 10.0 },
            x_labels: 6,
            series: vec![
                Series::line("accuracy", vec![(0.0, 90.0), (5.0, 95.0), (10.0, 50.0)]),
                Series::reference("baseline 85%", 85.0, &x),
            ],
        };
        let svg = chart.to_svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.contains("Accuracy") && svg.contains("baseline 85%") && svg.contains("11:06:40"));
        assert!(svg.matches("<polyline").count() >= 2, "two lines drawn");
        assert!(svg.contains("<circle"), "markers on the data line");
    }
}
