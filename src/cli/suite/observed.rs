//! The `observability` scenario: what watching every call costs. Three instances behind four
//! gateways, interleaved at concurrency 64: everything off; the access log to a file; tracing
//! with 1% of the traces sampled (parent-based ratio, the gateway starting every trace, spans to
//! an OTLP receiver in this process); and both. Asked: both on within 5% of off, as medians of
//! the per-repetition ratios. The gateway's CPU time per call comes from `/proc`, and the
//! instances' too (what the gateway's watching costs them).

use super::degraded::{interleave, load, reverse, start_gateway_with_env, write_json};
use super::*;

/// Callers at once (as the saturation scenario).
const CONCURRENCY: usize = 64;

/// The baseline path.
const OFF: &str = "off";

/// A gateway of the scenario: its name, flags and environment.
type Variant<'a> = (&'a str, Vec<&'a str>, &'a [(&'a str, &'a str)]);

/// One measured run of one path.
#[derive(Debug, Clone, Serialize)]
struct ObservedRun {
    rep: usize,
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    /// The gateway's CPU time (user + system) per call of the run, warm-up included.
    cpu_us_per_call: f64,
    /// The three instances' CPU time per call, likewise: what the gateway's watching costs
    /// them (a `traceparent` to read on every call).
    instances_cpu_us_per_call: f64,
    errors: u64,
}

/// Runs the scenario; writes `observability.json` and gives the report's markdown section.
pub(super) async fn run_observability(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    warmup: Duration,
    duration: Duration,
) -> Result<String, String> {
    let computes = start_computes(
        children,
        bins,
        " (observability)",
        &[("A", &[]), ("B", &[]), ("C", &[])],
    )
    .await?;
    let instances: Vec<u32> = computes.iter().map(|c| c.pid).collect();
    let backends: Vec<String> = computes.into_iter().map(|c| c.backend).collect();
    let receiver = dlb::trace::Receiver::start(false)
        .await
        .map_err(|e| format!("the OTLP receiver: {e}"))?;
    let otlp = receiver.url();
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let log = args.out.join("observability-access.jsonl");
    let log_both = args.out.join("observability-access-both.jsonl");
    for file in [&log, &log_both] {
        let _ = std::fs::remove_file(file);
    }
    let (log, log_both) = (log.display().to_string(), log_both.display().to_string());
    let sampled: &[(&str, &str)] = &[
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
    ];
    let variants: [Variant; 4] = [
        (OFF, vec![], &[]),
        ("access log", vec!["--access-log", &log], &[]),
        ("tracing 1%", vec!["--otlp-endpoint", &otlp], sampled),
        (
            "access log + tracing 1%",
            vec!["--access-log", &log_both, "--otlp-endpoint", &otlp],
            sampled,
        ),
    ];
    let mut paths: Vec<(String, String)> = Vec::new();
    let mut pids: BTreeMap<String, u32> = BTreeMap::new();
    for (name, flags, env) in &variants {
        let label = format!("{name} (observability)");
        let (addr, pid) =
            start_gateway_with_env(args, children, bins, &label, &backends, flags, env).await?;
        pids.insert(addr.clone(), pid);
        paths.push(((*name).to_owned(), addr));
    }

    let (pids, instances) = (&pids, &instances);
    let runs = interleave(args.reps, "observability", &paths, |rep, addr| async move {
        let pid = pids.get(&addr).copied().unwrap_or(0);
        let cpu_before = usage_of(&[pid]).0;
        let instances_before = usage_of(instances).0;
        let config = load(addr, reverse(), CONCURRENCY, None, warmup, duration);
        let report = bench::run(config, Arc::new(Progress::default()))
            .await
            .map_err(|e| e.to_string())?;
        let cpu = usage_of(&[pid]).0 - cpu_before;
        let instances_cpu = usage_of(instances).0 - instances_before;
        // The warm-up's calls used CPU too: count them at the run's rate.
        let calls = report.throughput * (warmup + duration).as_secs_f64();
        Ok(ObservedRun {
            rep,
            throughput: report.throughput,
            p50_us: report.latency.p50_us,
            p99_us: report.latency.p99_us,
            cpu_us_per_call: 1e6 * cpu / calls.max(1.0),
            instances_cpu_us_per_call: 1e6 * instances_cpu / calls.max(1.0),
            errors: report.errors.values().sum(),
        })
    })
    .await?;
    // Let the last batches of spans arrive before counting them.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let lines = |path: &str| {
        std::fs::read(path)
            .map(|bytes| bytes.iter().filter(|b| **b == b'\n').count())
            .unwrap_or(0)
    };
    let (log_lines, log_both_lines) = (lines(&log), lines(&log_both));
    let spans = receiver.count();
    for file in [&log, &log_both] {
        let _ = std::fs::remove_file(file);
    }

    let baseline: Vec<f64> = runs[OFF].iter().map(|r| r.throughput).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## What watching costs: the access log and 1% tracing\n\n\
         Reverse(\"hello\"), concurrency {CONCURRENCY}, gateway threads {}, medians of {} runs \
         of {:.0} s; ratio: throughput against the gateway with both off, same repetition. \
         Written meanwhile: {log_lines} + {log_both_lines} access log lines, {spans} spans \
         received.\n\n\
         | gateway | req/s | ratio | p50 | p99 | gateway CPU per call | instances' CPU per call | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|",
        args.threads,
        args.reps,
        duration.as_secs_f64()
    );
    let mut json_rows = BTreeMap::new();
    let mut both_ratio = f64::NAN;
    for (name, _) in &paths {
        let rows = &runs[name];
        let ratio = median(
            rows.iter()
                .map(|r| r.throughput / baseline[r.rep])
                .collect(),
        );
        let m = |f: fn(&ObservedRun) -> f64| median(rows.iter().map(f).collect());
        let errors: u64 = rows.iter().map(|r| r.errors).sum();
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {ratio:.2}x | {:.2} ms | {:.2} ms | {:.1} µs | {:.1} µs | {errors} |",
            m(|r| r.throughput),
            m(|r| r.p50_us) / 1e3,
            m(|r| r.p99_us) / 1e3,
            m(|r| r.cpu_us_per_call),
            m(|r| r.instances_cpu_us_per_call),
        );
        if name.contains('+') {
            both_ratio = ratio;
        }
        json_rows.insert(
            name.clone(),
            serde_json::json!({ "runs": rows, "ratio_median": ratio }),
        );
    }
    let met = both_ratio >= 0.95;
    let _ = writeln!(
        out,
        "\nTarget: access log + 1% tracing within 5% of off: {both_ratio:.2}x, {}.",
        if met { "met" } else { "**not met**" }
    );
    json_rows.insert(
        "written".to_owned(),
        serde_json::json!({
            "access_log_lines": log_lines,
            "access_log_lines_both": log_both_lines,
            "spans_received": spans,
        }),
    );
    write_json(args, "observability.json", &json_rows)?;
    Ok(out)
}
