//! How `dlb bench` prints a report for people (`--json` prints the report itself).

use dlb::client::bench::BenchReport;

/// The human-readable report.
pub fn human(report: &BenchReport) -> String {
    let ms = |us: f64| format!("{:.3} ms", us / 1000.0);
    let mut out = String::new();
    let shape = match (report.mode, report.concurrency, report.rate) {
        ("closed", Some(c), _) => format!("closed loop, concurrency {c}"),
        (_, _, Some(r)) => format!("open loop, {r} req/s"),
        _ => report.mode.to_owned(),
    };
    out.push_str(&format!(
        "{} over {} address(es), {} connection(s): {}\n",
        report.op,
        report.addrs.len(),
        report.connections,
        shape
    ));
    out.push_str(&format!(
        "requests    {} in {:.2} s (ok {}, errors {})\n",
        report.requests,
        report.elapsed_secs,
        report.ok,
        report.requests - report.ok
    ));
    out.push_str(&format!("throughput  {:.1} req/s\n", report.throughput));
    let l = &report.latency;
    out.push_str(&format!(
        "latency     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.p999_us),
        ms(l.max_us)
    ));
    let total: u64 = report.per_instance.values().sum();
    let split: Vec<String> = report
        .per_instance
        .iter()
        .map(|(id, n)| format!("{id} {n} ({:.1}%)", 100.0 * *n as f64 / total.max(1) as f64))
        .collect();
    out.push_str(&format!("instances   {}\n", split.join("  ")));
    if !report.errors.is_empty() {
        let errors: Vec<String> = report
            .errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        out.push_str(&format!("errors      {}\n", errors.join("  ")));
        for (code, message) in &report.error_samples {
            out.push_str(&format!("  first {code}: {message}\n"));
        }
    }
    out
}
