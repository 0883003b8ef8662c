//! The suite's report: medians and ratios per scenario and path, as JSON and Markdown.

use super::*;

pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
pub(super) fn summarize(
    args: &SuiteArgs,
    targets: &[Target],
    skipped: Vec<String>,
    open_rate: f64,
    runs: BTreeMap<String, BTreeMap<&'static str, Vec<Run>>>,
    usage: BTreeMap<&'static str, Usage>,
    scenarios: &[Scenario],
) -> Report {
    let mut medians: BTreeMap<String, BTreeMap<&'static str, Summary>> = BTreeMap::new();
    let mut ratios: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for scenario in scenarios {
        let Some(by_path) = runs.get(scenario.key) else {
            continue;
        };
        for (path, list) in by_path {
            let pick = |f: fn(&Run) -> f64| median(list.iter().map(f).collect());
            medians.entry(scenario.key.to_owned()).or_default().insert(
                path,
                Summary {
                    throughput: pick(|r| r.throughput),
                    p50_us: pick(|r| r.p50_us),
                    p99_us: pick(|r| r.p99_us),
                    p999_us: pick(|r| r.p999_us),
                    errors: list.iter().map(|r| r.errors).sum(),
                    cpu_us_per_call: list
                        .iter()
                        .map(|r| r.cpu_us_per_call)
                        .collect::<Option<Vec<f64>>>()
                        .map(median),
                },
            );
        }
        // Per-repetition ratios of the gateway to each other path, then their median.
        if let Some(gateway) = by_path.get("dlb-gateway") {
            for (other, list) in by_path {
                if *other == "dlb-gateway" {
                    continue;
                }
                let throughput: Vec<f64> = gateway
                    .iter()
                    .zip(list)
                    .map(|(g, o)| g.throughput / o.throughput)
                    .collect();
                let p50: Vec<f64> = gateway
                    .iter()
                    .zip(list)
                    .map(|(g, o)| g.p50_us - o.p50_us)
                    .collect();
                let entry = ratios.entry(scenario.key.to_owned()).or_default();
                entry.insert(format!("throughput gateway/{other}"), median(throughput));
                entry.insert(format!("p50 gateway-{other} us"), median(p50));
            }
        }
    }
    let ratio = |scenario: &str, key: &str| {
        ratios
            .get(scenario)
            .and_then(|r| r.get(key))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let p = |scenario: &str, path: &str| {
        medians
            .get(scenario)
            .and_then(|m| m.get(path))
            .cloned()
            .unwrap_or_default()
    };
    let mut verdicts = Vec::new();
    let mut check = |target: &str, measured: String, met: bool| {
        verdicts.push(Verdict {
            target: target.to_owned(),
            measured,
            met,
        });
    };
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    // Only the targets of the scenarios that ran (see --scenarios).
    let ran = |scenario: &str| medians.contains_key(scenario);
    for proxy in ["nginx", "haproxy"] {
        if names.contains(&proxy) && ran("saturation") {
            let r = ratio("saturation", &format!("throughput gateway/{proxy}"));
            check(
                &format!("c=64 throughput >= 1.0x {proxy}"),
                times(r, 1.0),
                r >= 1.0,
            );
        }
    }
    if names.contains(&"haproxy") && ran("saturation") {
        let cpu = |path: &str| p("saturation", path).cpu_us_per_call.unwrap_or(f64::NAN);
        let (g, h) = (cpu("dlb-gateway"), cpu("haproxy"));
        check(
            "c=64 CPU per call <= HAProxy's",
            format!("{g:.1} us vs {h:.1} us"),
            g <= h,
        );
    }
    if ran("saturation") {
        let r = ratio("saturation", "throughput gateway/direct");
        check("c=64 throughput >= 0.6x direct", times(r, 0.6), r >= 0.6);
    }
    for (proxy, name) in [("nginx", "NGINX"), ("haproxy", "HAProxy")] {
        if names.contains(&proxy) && ran("c1") {
            let (g, n) = (p("c1", "dlb-gateway").p50_us, p("c1", proxy).p50_us);
            check(
                &format!("c=1 p50 <= {name}'s"),
                format!("{g:.0} us vs {n:.0} us"),
                g <= n,
            );
        }
    }
    if ran("c1") {
        let added = ratio("c1", "p50 gateway-direct us");
        check(
            "c=1 added p50 over direct <= 100 us",
            format!("+{added:.0} us"),
            added <= 100.0,
        );
    }
    if ran("open") {
        let tail = p("open", "dlb-gateway").p999_us;
        check(
            "open loop p99.9 < 5 ms",
            format!("{:.2} ms", tail / 1000.0),
            tail < 5000.0,
        );
    }
    if ran("reverse_1mib") {
        let r = ratio("reverse_1mib", "throughput gateway/direct");
        check("1 MiB Reverse >= 0.8x direct", times(r, 0.8), r >= 0.8);
    }
    let rss = usage.get("dlb-gateway").map_or(f64::NAN, |u| u.peak_rss_mb);
    check(
        "gateway peak RSS <= 30 MB",
        format!("{rss:.1} MB"),
        rss <= 30.0,
    );
    Report {
        machine: machine(),
        threads: args.threads,
        reps: args.reps,
        duration_secs: args.duration,
        paths: names,
        skipped,
        open_rate,
        runs,
        medians,
        ratios,
        usage,
        verdicts,
    }
}

pub(super) fn markdown(report: &Report, scenarios: &[Scenario]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## dlb bench-suite\n\n{}; {} thread(s) per proxy; {} repetitions of {} s per path and \
         scenario, interleaved; medians. CPU per call: the proxy's processes (user + system, \
         from /proc), warm-up included.\n",
        report.machine, report.threads, report.reps, report.duration_secs
    );
    let _ = writeln!(
        out,
        "| scenario | path | throughput (req/s) | p50 | p99 | p99.9 | CPU per call | errors |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    let ms = |us: f64| format!("{:.3} ms", us / 1000.0);
    for scenario in scenarios {
        let Some(by_path) = report.medians.get(scenario.key) else {
            continue;
        };
        let title = if scenario.key == "open" {
            format!("{} ({:.0} req/s)", scenario.title, report.open_rate)
        } else {
            scenario.title.to_owned()
        };
        for path in &report.paths {
            if let Some(s) = by_path.get(path) {
                let cpu = s
                    .cpu_us_per_call
                    .map_or_else(|| "-".to_owned(), |us| format!("{us:.1} µs"));
                let _ = writeln!(
                    out,
                    "| {title} | {path} | {:.0} | {} | {} | {} | {cpu} | {} |",
                    s.throughput,
                    ms(s.p50_us),
                    ms(s.p99_us),
                    ms(s.p999_us),
                    s.errors
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n| proxy | CPU seconds (whole suite, the --threads set) | peak RSS |\n|---|---:|---:|"
    );
    for (name, usage) in &report.usage {
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} MB |",
            usage.cpu_secs, usage.peak_rss_mb
        );
    }
    let _ = writeln!(out, "\n| target | measured | met |\n|---|---|---|");
    for v in &report.verdicts {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            v.target,
            v.measured,
            if v.met { "yes" } else { "**no**" }
        );
    }
    for skip in &report.skipped {
        let _ = writeln!(out, "\nSkipped: {skip}");
    }
    out
}

/// A ratio as "1.23x", with more decimals (up to six) while two would round it onto
/// `target`: 0.5997 against 0.6 is "0.5997x", not "0.60x" beside "not met".
pub(super) fn times(ratio: f64, target: f64) -> String {
    let mut digits = 2;
    while digits < 6 && format!("{ratio:.digits$}") == format!("{target:.digits$}") {
        digits += 1;
    }
    format!("{ratio:.digits$}x")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_next_to_its_target_shows_which_side_it_is_on() {
        assert_eq!(times(0.5997, 0.6), "0.5997x");
        assert_eq!(times(0.6004, 0.6), "0.6004x");
        assert_eq!(times(0.58, 0.6), "0.58x");
        assert_eq!(times(1.991, 1.0), "1.99x");
        assert_eq!(times(0.59996, 0.6), "0.59996x");
        assert_eq!(times(0.6, 0.6), "0.600000x");
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
