//! Files a run can write besides its report: the latency distribution as an
//! HdrHistogram percentile file (`--hdr-out`, the `.hgrm` text format that
//! HdrHistogram's `outputPercentileDistribution` writes and its plotter reads),
//! and an SVG plot (`--plot`) of the latency percentiles and of the send and
//! receive rates over time. The SVG is written by hand: two panels of polylines,
//! no dependency.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::stats::Series;

/// Reporting ticks per half distance to 100 % in the percentile file, as
/// HdrHistogram's own tools default to.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// Value scale of the `.hgrm` file: histogram values are ns, the file is in µs.
const NS_PER_UNIT: f64 = 1_000.0;

/// The percentile distribution of `h` (values in ns) in the `.hgrm` text format,
/// values in microseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / NS_PER_UNIT;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    o,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(o, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (
            h.mean() / NS_PER_UNIT,
            h.stdev() / NS_PER_UNIT,
            h.max() as f64 / NS_PER_UNIT,
        )
    };
    let _ = writeln!(o, "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]");
    let _ = writeln!(
        o,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        o,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets(h)
    );
    o
}

/// Sub-buckets per bucket of `h`: 2 × 10^digits rounded up to a power of two.
fn sub_buckets(h: &Histogram<u64>) -> u64 {
    let largest = 2 * 10u64.pow(u32::from(h.sigfig()));
    largest.next_power_of_two()
}

/// Plot geometry, pixels.
const WIDTH: f64 = 900.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 80.0;
const MARGIN_R: f64 = 30.0;
const MARGIN_T: f64 = 40.0;
const GAP: f64 = 80.0;

/// Most points of a rate line: the series is re-bucketed to at most this many.
const RATE_POINTS_MAX: usize = 300;

/// Narrowest time bucket of a rate line: 10 ms counts are mostly noise.
const RATE_BUCKET_NS_MIN: u64 = 100_000_000;

/// Highest percentile the latency panel shows: 99.9999 %.
const NINES_MAX: f64 = 6.0;

/// An SVG with the latency percentile curve of `latency` (ns) and the rates of
/// `sent` and `received` over time; `warm_ns` marks the end of the warmup.
pub fn svg(
    title: &str,
    latency: &Histogram<u64>,
    sent: &Series,
    received: &Series,
    warm_ns: u64,
) -> String {
    let height = MARGIN_T + 2.0 * PANEL_H + GAP + 50.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{MARGIN_L}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    latency_panel(&mut o, latency, MARGIN_T);
    rate_panel(&mut o, sent, received, warm_ns, MARGIN_T + PANEL_H + GAP);
    o.push_str("</svg>\n");
    o
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum at or above `v`: 1, 2 or 5 times a power of ten.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&m| m >= v)
        .unwrap_or(10.0 * p)
}

fn frame(o: &mut String, top: f64, x_label: &str, y_label: &str) {
    let (w, h) = (WIDTH - MARGIN_L - MARGIN_R, PANEL_H);
    let _ = writeln!(
        o,
        r#"<rect x="{MARGIN_L}" y="{top}" width="{w}" height="{h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        MARGIN_L + w / 2.0,
        top + h + 35.0
    );
    let _ = writeln!(
        o,
        r#"<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">{y_label}</text>"#,
        top + h / 2.0,
        top + h / 2.0
    );
}

fn y_ticks(o: &mut String, top: f64, y_max: f64) {
    for k in 0..=4 {
        let v = y_max * f64::from(k) / 4.0;
        let y = top + PANEL_H - PANEL_H * f64::from(k) / 4.0;
        let _ = writeln!(
            o,
            r##"<line x1="{MARGIN_L}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            WIDTH - MARGIN_R,
            MARGIN_L - 5.0,
            y + 4.0,
            short(v)
        );
    }
}

/// 1234567 as "1.23M", 1500 as "1.5k".
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.3}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
    .replace(".000", "")
}

fn latency_panel(o: &mut String, h: &Histogram<u64>, top: f64) {
    frame(o, top, "percentile", "latency (µs)");
    let w = WIDTH - MARGIN_L - MARGIN_R;
    if h.is_empty() {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">no latency samples</text>"#,
            MARGIN_L + w / 2.0,
            top + PANEL_H / 2.0
        );
        return;
    }
    let y_max = nice_max(h.max() as f64 / NS_PER_UNIT);
    y_ticks(o, top, y_max);
    for (nines, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "99.999%"),
        (6.0, "99.9999%"),
    ] {
        let x = MARGIN_L + w * nines / NINES_MAX;
        let _ = writeln!(
            o,
            r#"<text x="{x}" y="{}" text-anchor="middle">{label}</text>"#,
            top + PANEL_H + 16.0
        );
    }
    let mut points = String::new();
    for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        let q = v.quantile_iterated_to();
        let nines = if q >= 1.0 {
            NINES_MAX
        } else {
            (1.0 / (1.0 - q)).log10().min(NINES_MAX)
        };
        let x = MARGIN_L + w * nines / NINES_MAX;
        let y = top + PANEL_H - PANEL_H * (v.value_iterated_to() as f64 / NS_PER_UNIT) / y_max;
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        o,
        r##"<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##
    );
}

/// `series` re-bucketed to `step` buckets: (seconds from `t0_ns`, msg/s) points.
fn rates(series: &Series, step: usize, t0_ns: u64) -> Vec<(f64, f64)> {
    let bucket_s = series.bucket_ns() as f64 / 1e9;
    series
        .counts()
        .chunks(step)
        .enumerate()
        .map(|(k, c)| {
            let t = (series.start_ns() - t0_ns.min(series.start_ns())) as f64 / 1e9
                + (k * step) as f64 * bucket_s;
            (
                t,
                c.iter().sum::<u64>() as f64 / (c.len() as f64 * bucket_s),
            )
        })
        .collect()
}

fn rate_panel(o: &mut String, sent: &Series, received: &Series, warm_ns: u64, top: f64) {
    frame(o, top, "time since the first message (s)", "msg/s");
    let w = WIDTH - MARGIN_L - MARGIN_R;
    // Leave out the trailing empty buckets (the series covers the drain and a
    // second of slack).
    let last = sent
        .counts()
        .iter()
        .zip(received.counts())
        .rposition(|(a, b)| a + b > 0)
        .map_or(1, |i| i + 1);
    let step = last
        .div_ceil(RATE_POINTS_MAX)
        .max((RATE_BUCKET_NS_MIN / sent.bucket_ns()).max(1) as usize);
    let t0 = sent.start_ns();
    let s = rates(sent, step, t0);
    let r = rates(received, step, t0);
    let n = last.div_ceil(step).min(s.len());
    let (s, r) = (&s[..n], &r[..n.min(r.len())]);
    let t_max = nice_max(
        s.last()
            .map_or(1.0, |p| p.0 + step as f64 * sent.bucket_ns() as f64 / 1e9),
    );
    let y_max = nice_max(s.iter().chain(r).map(|p| p.1).fold(0.0, f64::max));
    y_ticks(o, top, y_max);
    for k in 0..=5 {
        let t = t_max * f64::from(k) / 5.0;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            MARGIN_L + w * f64::from(k) / 5.0,
            top + PANEL_H + 16.0,
            short(t)
        );
    }
    let warm_x = MARGIN_L + w * (warm_ns.saturating_sub(t0) as f64 / 1e9) / t_max;
    let _ = writeln!(
        o,
        r##"<line x1="{warm_x:.1}" x2="{warm_x:.1}" y1="{top}" y2="{}" stroke="#999" stroke-dasharray="4 4"/><text x="{:.1}" y="{}">warmup ends</text>"##,
        top + PANEL_H,
        warm_x + 4.0,
        top + 14.0
    );
    for (points, color, label, dy) in [
        (s, "#1f77b4", "sent", 0.0),
        (r, "#ff7f0e", "received", 16.0),
    ] {
        let mut p = String::new();
        for &(t, v) in points {
            let _ = write!(
                p,
                "{:.1},{:.1} ",
                MARGIN_L + w * t / t_max,
                top + PANEL_H - PANEL_H * v / y_max
            );
        }
        let _ = writeln!(
            o,
            r#"<polyline points="{p}" fill="none" stroke="{color}" stroke-width="1.5"/><text x="{}" y="{}" fill="{color}">{label}</text>"#,
            WIDTH - MARGIN_R - 70.0,
            top + 16.0 + dy
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{latency_histogram, record_ns};

    #[test]
    fn hgrm_lists_percentiles_in_microseconds() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            record_ns(&mut h, us * 1000);
        }
        let text = hgrm(&h);
        let first = text.lines().nth(2).unwrap();
        let cols: Vec<&str> = first.split_whitespace().collect();
        assert_eq!(cols.len(), 4, "{first}");
        assert!(
            (cols[0].parse::<f64>().unwrap() - 1.0).abs() < 0.01,
            "{first}"
        );
        let last_value = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        assert!(last_value.contains("1.000000000000"), "{last_value}");
        assert!(text.contains("Total count    =         1000"), "{text}");
    }

    #[test]
    fn nice_axis_maxima() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.5), 5.0);
        assert_eq!(nice_max(120.0), 150.0);
        assert_eq!(nice_max(1000.0), 1000.0);
    }
}
