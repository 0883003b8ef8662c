//! The suite's chart, drawn as SVG by hand (no plotting dependency).

use super::*;

/// Escapes text for SVG.
pub(super) fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Two panels: throughput of each path relative to direct, per scenario; and p50/p99/p99.9
/// of each path at concurrency 1 and in the open loop.
pub(super) fn svg(report: &Report, scenarios: &[Scenario]) -> String {
    const COLORS: [&str; 4] = ["#64748b", "#2563eb", "#16a34a", "#d97706"];
    let (width, height) = (960.0, 640.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"20\" y=\"24\" font-size=\"16\">dlb bench-suite: {}</text>",
        xml(&report.machine)
    );
    // Legend.
    for (n, path) in report.paths.iter().enumerate() {
        let x = 20.0 + n as f64 * 150.0;
        let _ = writeln!(
            out,
            "<rect x=\"{x}\" y=\"36\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"46\">{}</text>",
            COLORS[n % 4],
            x + 16.0,
            xml(path)
        );
    }
    // Panel 1: throughput relative to direct.
    let (top, panel_h, left) = (80.0, 220.0, 60.0);
    let _ = writeln!(
        out,
        "<text x=\"20\" y=\"{}\">Throughput relative to direct (labels: req/s)</text>",
        top - 8.0
    );
    let keys: Vec<&Scenario> = scenarios.iter().collect();
    let group_w = (width - left - 20.0) / keys.len() as f64;
    let max_ratio = 1.25;
    for k in 0..=5 {
        let v = max_ratio * f64::from(k) / 5.0;
        let y = top + panel_h * (1.0 - v / max_ratio);
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#e2e8f0\"/><text x=\"20\" y=\"{}\">{v:.2}</text>",
            width - 20.0,
            y + 4.0
        );
    }
    for (g, scenario) in keys.iter().enumerate() {
        let Some(by_path) = report.medians.get(scenario.key) else {
            continue;
        };
        let direct = by_path.get("direct").map_or(f64::NAN, |s| s.throughput);
        let bar_w = group_w / (report.paths.len() as f64 + 1.0);
        for (n, path) in report.paths.iter().enumerate() {
            let Some(s) = by_path.get(path) else { continue };
            let ratio = (s.throughput / direct).min(max_ratio);
            let h = panel_h * ratio / max_ratio;
            let x = left + g as f64 * group_w + bar_w * (n as f64 + 0.5);
            let y = top + panel_h - h;
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{:.0}</text>",
                bar_w * 0.9,
                COLORS[n % 4],
                x + bar_w * 0.45,
                y - 3.0,
                s.throughput
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            left + g as f64 * group_w + group_w / 2.0,
            top + panel_h + 16.0,
            xml(scenario.key)
        );
    }
    // Panel 2: latency percentiles at c=1 and in the open loop.
    let top2 = top + panel_h + 70.0;
    let panel2_h = 220.0;
    let _ = writeln!(
        out,
        "<text x=\"20\" y=\"{}\">Latency p50 / p99 / p99.9 (ms, log scale), concurrency 1 and open loop</text>",
        top2 - 8.0
    );
    let groups = ["c1", "open"];
    // A log scale from 0.1 ms: a c=1 p50 and an overloaded p99.9 differ by 10,000x.
    let mut max_us: f64 = 1_000.0;
    for key in groups {
        if let Some(by_path) = report.medians.get(key) {
            for s in by_path.values() {
                max_us = max_us.max(s.p999_us);
            }
        }
    }
    let min_us: f64 = 100.0;
    let decades = (max_us / min_us).log10().ceil().max(1.0);
    let scale = |us: f64| (us.max(min_us) / min_us).log10() / decades;
    let group2_w = (width - left - 20.0) / groups.len() as f64;
    for k in 0..=decades as i32 {
        let v_us = min_us * 10f64.powi(k);
        let y = top2 + panel2_h * (1.0 - scale(v_us));
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#e2e8f0\"/><text x=\"20\" y=\"{}\">{}</text>",
            width - 20.0,
            y + 4.0,
            v_us / 1000.0
        );
    }
    for (g, key) in groups.iter().enumerate() {
        let Some(by_path) = report.medians.get(*key) else {
            continue;
        };
        let slot = group2_w / (report.paths.len() as f64 + 1.0);
        for (n, path) in report.paths.iter().enumerate() {
            let Some(s) = by_path.get(path) else { continue };
            for (m, (value, opacity)) in [(s.p50_us, 1.0), (s.p99_us, 0.65), (s.p999_us, 0.35)]
                .iter()
                .enumerate()
            {
                let h = panel2_h * scale(*value).min(1.0);
                let x =
                    left + g as f64 * group2_w + slot * (n as f64 + 0.5) + m as f64 * slot / 3.2;
                let _ = writeln!(
                    out,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\" fill-opacity=\"{opacity}\"/>",
                    top2 + panel2_h - h,
                    slot / 3.4,
                    COLORS[n % 4]
                );
            }
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            left + g as f64 * group2_w + group2_w / 2.0,
            top2 + panel2_h + 16.0,
            if *key == "c1" {
                "concurrency 1"
            } else {
                "open loop, 50% of direct saturation"
            }
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_text_is_escaped() {
        assert_eq!(xml("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
