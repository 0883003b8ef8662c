//! The `slow_instance` scenario: one instance of three answers 200 ms late (a compute with
//! `--inject-delay-ms 200`), and each of the gateway's policies is measured over the three at
//! concurrency 16, against a gateway over the two good ones alone, interleaved, `--reps`
//! times. What the issue asked of the default policy: p99 at most 50 ms, the slow one's
//! share at most 2%, throughput at least 0.9x the two good alone.

use super::*;

/// How late the slow instance answers.
const DELAY_MS: u64 = 200;

/// Callers at once.
const CONCURRENCY: usize = 16;

/// The policies compared (the gateway's `--policy` values).
const POLICIES: [&str; 3] = ["round-robin", "p2c", "weighted"];

/// The baseline path: a gateway over the two good instances alone.
const TWO_GOOD: &str = "two good alone";

/// One measured run of one path.
#[derive(Debug, Clone, Serialize)]
struct SlowRun {
    rep: usize,
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    /// Share of the calls the slow instance answered, percent.
    slow_share: f64,
    errors: u64,
}

/// Runs the scenario; writes `slow_instance.json` and gives the report's markdown section.
pub(super) async fn run_slow_instance(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    warmup: Duration,
    duration: Duration,
) -> Result<String, String> {
    let delay = DELAY_MS.to_string();
    let slow: &[&str] = &["--inject-delay-ms", &delay];
    let backends: Vec<String> = start_computes(
        children,
        bins,
        " (slow_instance)",
        &[("G1", &[]), ("G2", &[]), ("S", slow)],
    )
    .await?
    .into_iter()
    .map(|c| c.backend)
    .collect();
    let mut paths: Vec<(String, String)> = Vec::new();
    let two_good = &backends[..2];
    let addr = start_gateway(args, children, bins, TWO_GOOD, two_good, &[]).await?;
    paths.push((TWO_GOOD.to_owned(), addr));
    for policy in POLICIES {
        let flags = ["--policy", policy];
        let addr = start_gateway(args, children, bins, policy, &backends, &flags).await?;
        paths.push((policy.to_owned(), addr));
    }

    let runs = interleave(args.reps, "slow_instance", &paths, |rep, addr| async move {
        // The load-aware policies learn the latencies in the warm-up.
        let warmup = warmup.max(Duration::from_secs(2));
        let config = load(addr, reverse(), CONCURRENCY, None, warmup, duration);
        let report = bench::run(config, Arc::new(Progress::default()))
            .await
            .map_err(|e| e.to_string())?;
        let slow = report.per_instance.get("S").copied().unwrap_or(0);
        Ok(SlowRun {
            rep,
            throughput: report.throughput,
            p50_us: report.latency.p50_us,
            p99_us: report.latency.p99_us,
            slow_share: 100.0 * slow as f64 / report.requests.max(1) as f64,
            errors: report.errors.values().sum(),
        })
    })
    .await?;

    let baseline: Vec<f64> = runs[TWO_GOOD].iter().map(|r| r.throughput).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## One instance of three {DELAY_MS} ms late: the gateway's policies\n\n\
         Reverse(\"hello\"), concurrency {CONCURRENCY}, medians of {} runs of {:.0} s; ratio: \
         throughput against a gateway over the two good instances alone, same repetition.\n\n\
         | path | req/s | ratio | p50 | p99 | slow one's share | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|",
        args.reps,
        duration.as_secs_f64()
    );
    let mut json_rows = BTreeMap::new();
    for (name, _) in &paths {
        let rows = &runs[name];
        let ratios: Vec<f64> = rows
            .iter()
            .map(|r| r.throughput / baseline[r.rep])
            .collect();
        let m = |f: fn(&SlowRun) -> f64| median(rows.iter().map(f).collect());
        let errors: u64 = rows.iter().map(|r| r.errors).sum();
        let ratio = median(ratios);
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {ratio:.2}x | {:.2} ms | {:.2} ms | {:.2}% | {errors} |",
            m(|r| r.throughput),
            m(|r| r.p50_us) / 1e3,
            m(|r| r.p99_us) / 1e3,
            m(|r| r.slow_share),
        );
        json_rows.insert(
            name.clone(),
            serde_json::json!({
                "runs": rows,
                "ratio_median": ratio,
                "p99_us_median": m(|r| r.p99_us),
                "slow_share_median": m(|r| r.slow_share),
            }),
        );
    }
    write_json(args, "slow_instance.json", &json_rows)?;
    Ok(out)
}

/// Starts a `dlb-gateway` named `name` over `backends` (`ID=HOST:PORT`) with `flags`, and
/// waits until it answers with every instance serving; gives its address.
async fn start_gateway(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    name: &str,
    backends: &[String],
    flags: &[&str],
) -> Result<String, String> {
    let (addr, _) =
        start_gateway_with_env(args, children, bins, name, backends, flags, &[]).await?;
    Ok(addr)
}

/// [`start_gateway`] with `env` set for the gateway; gives its address and pid.
pub(super) async fn start_gateway_with_env(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    name: &str,
    backends: &[String],
    flags: &[&str],
    env: &[(&str, &str)],
) -> Result<(String, u32), String> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let flags: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
    let backends_flag = backends.join(",");
    let pid = spawn_gateway(
        children,
        name,
        bins,
        &addr,
        &backends_flag,
        args.threads,
        &flags,
        env,
    )?;
    wait_answers(children, name, &addr).await?;
    wait_serving(&addr, backends.len()).await?;
    Ok((addr, pid))
}

/// Waits until the gateway at `addr` has `want` instances serving (its `Stats`).
async fn wait_serving(addr: &str, want: usize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(endpoint) = dlb::dial::endpoint(addr)
            && let Ok(channel) = endpoint.connect().await
        {
            let mut client = dlb::proto::v1::gateway_client::GatewayClient::new(channel);
            if let Ok(stats) = client.stats(dlb::proto::v1::StatsRequest {}).await {
                let serving = stats
                    .into_inner()
                    .instances
                    .iter()
                    .filter(|i| i.state == "serving")
                    .count();
                if serving == want {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the gateway at {addr} has not {want} instances serving"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One measured run of the mixed load through one gateway.
#[derive(Debug, Clone, Serialize)]
struct MixedRun {
    rep: usize,
    reverse_throughput: f64,
    reverse_p50_us: f64,
    reverse_p99_us: f64,
    fib_throughput: f64,
    /// Failures by code, both loads together.
    errors: BTreeMap<String, u64>,
}

/// The `mixed` scenario: three computes with room for three heavy calls each (`--workers 1
/// --queue 2`), Fibonacci(1000000) at concurrency 6 and Reverse at 32 at once, through a
/// gateway of each policy, interleaved. Asked of the default policy: no RESOURCE_EXHAUSTED
/// reaches a caller, and Reverse's p99 is no worse than strict round robin's.
pub(super) async fn run_mixed(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    warmup: Duration,
    duration: Duration,
) -> Result<String, String> {
    let small: &[&str] = &["--workers", "1", "--queue", "2"];
    let backends: Vec<String> = start_computes(
        children,
        bins,
        " (mixed)",
        &[("M1", small), ("M2", small), ("M3", small)],
    )
    .await?
    .into_iter()
    .map(|c| c.backend)
    .collect();
    let mut paths: Vec<(String, String)> = Vec::new();
    for policy in POLICIES {
        let name = format!("{policy} (mixed)");
        let flags = ["--policy", policy];
        let addr = start_gateway(args, children, bins, &name, &backends, &flags).await?;
        paths.push((policy.to_owned(), addr));
    }
    let warmup = warmup.max(Duration::from_secs(2));
    let runs = interleave(args.reps, "mixed", &paths, |rep, addr| async move {
        let fib = Op::Fibonacci { n: 1_000_000 };
        let fib = load(addr.clone(), fib, 6, None, warmup, duration);
        let fib = bench::run(fib, Arc::new(Progress::default()));
        let reverse = load(addr, reverse(), 32, None, warmup, duration);
        let reverse = bench::run(reverse, Arc::new(Progress::default()));
        let (fib, reverse) = tokio::join!(fib, reverse);
        let (fib, reverse) = (
            fib.map_err(|e| e.to_string())?,
            reverse.map_err(|e| e.to_string())?,
        );
        let mut errors = fib.errors.clone();
        for (code, n) in &reverse.errors {
            *errors.entry(code.clone()).or_default() += n;
        }
        Ok(MixedRun {
            rep,
            reverse_throughput: reverse.throughput,
            reverse_p50_us: reverse.latency.p50_us,
            reverse_p99_us: reverse.latency.p99_us,
            fib_throughput: fib.throughput,
            errors,
        })
    })
    .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Mixed load: Fibonacci(1000000) at 6 and Reverse at 32, pools of 3 (`--workers 1 --queue 2`)\n\n\
         Medians of {} runs of {:.0} s; errors summed over the runs.\n\n\
         | policy | Reverse req/s | Reverse p50 | Reverse p99 | Fibonacci/s | errors |\n\
         |---|---:|---:|---:|---:|---|",
        args.reps,
        duration.as_secs_f64()
    );
    for (name, _) in &paths {
        let rows = &runs[name];
        let m = |f: fn(&MixedRun) -> f64| median(rows.iter().map(f).collect());
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for row in rows {
            for (code, n) in &row.errors {
                *errors.entry(code.clone()).or_default() += n;
            }
        }
        let errors = if errors.is_empty() {
            "none".to_owned()
        } else {
            format!("{errors:?}")
        };
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {:.1} | {errors} |",
            m(|r| r.reverse_throughput),
            m(|r| r.reverse_p50_us) / 1e3,
            m(|r| r.reverse_p99_us) / 1e3,
            m(|r| r.fib_throughput),
        );
    }
    write_json(args, "mixed.json", &runs)?;
    Ok(out)
}

/// One measured run of the paused instance through one gateway.
#[derive(Debug, Clone, Serialize)]
struct PausedRun {
    rep: usize,
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// Hedges the gateway sent, percent of the calls.
    hedged: f64,
    errors: u64,
}

/// The open-loop rate of the paused scenario, calls per second.
const PAUSED_RATE: f64 = 2_000.0;

/// How long the paused instance is stopped, and how often.
const PAUSE: Duration = Duration::from_millis(30);
const PAUSE_EVERY: Duration = Duration::from_millis(300);

/// The `paused` scenario: one instance of three is stopped (SIGSTOP) 30 ms of every 300 ms,
/// and gateways without hedging are measured against ones with `--hedge-after auto`, with
/// each policy, interleaved, Reverse in an open loop. Asked of hedging: p99 at most half
/// the run without, extra attempts at most 10% of the calls.
pub(super) async fn run_paused(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    warmup: Duration,
    duration: Duration,
) -> Result<String, String> {
    let started = start_computes(
        children,
        bins,
        " (paused)",
        &[("P1", &[]), ("P2", &[]), ("P3", &[])],
    )
    .await?;
    // The last one is stopped and continued.
    let paused_pid = started.last().map_or(0, |c| c.pid);
    let backends: Vec<String> = started.into_iter().map(|c| c.backend).collect();
    let mut paths: Vec<(String, String)> = Vec::new();
    let setups = [
        ("weighted", "weighted", "off"),
        ("weighted, --hedge-after auto", "weighted", "auto"),
        ("round-robin", "round-robin", "off"),
        ("round-robin, --hedge-after auto", "round-robin", "auto"),
    ];
    for (name, policy, hedge) in setups {
        let flags = ["--policy", policy, "--hedge-after", hedge];
        let addr = start_gateway(args, children, bins, name, &backends, &flags).await?;
        paths.push((name.to_owned(), addr));
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let pauser = tokio::spawn(pause_repeatedly(paused_pid, stop.clone()));
    let measured = measure_paused(args, &paths, warmup, duration).await;
    stop.cancel();
    let _ = pauser.await;
    let runs = measured?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## One instance of three stopped {} ms of every {} ms: hedging\n\n\
         Reverse(\"hello\"), open loop at {PAUSED_RATE} calls/s (latency from each call's \
         intended start); medians of {} runs of {:.0} s; hedged: second copies sent, percent \
         of the calls.\n\n\
         | gateway | p50 | p99 | p99.9 | hedged | errors |\n|---|---:|---:|---:|---:|---:|",
        PAUSE.as_millis(),
        PAUSE_EVERY.as_millis(),
        args.reps,
        duration.as_secs_f64()
    );
    for (name, _) in &paths {
        let rows = &runs[name];
        let m = |f: fn(&PausedRun) -> f64| median(rows.iter().map(f).collect());
        let errors: u64 = rows.iter().map(|r| r.errors).sum();
        let _ = writeln!(
            out,
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1}% | {errors} |",
            m(|r| r.p50_us) / 1e3,
            m(|r| r.p99_us) / 1e3,
            m(|r| r.p999_us) / 1e3,
            m(|r| r.hedged),
        );
    }
    write_json(args, "paused.json", &runs)?;
    Ok(out)
}

/// Writes `value` as pretty JSON to `name` in the report's directory.
pub(super) fn write_json(
    args: &SuiteArgs,
    name: &str,
    value: &impl Serialize,
) -> Result<(), String> {
    let path = args.out.join(name);
    let json = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Stops `pid` for [`PAUSE`] every [`PAUSE_EVERY`] until `stop`; leaves it running.
async fn pause_repeatedly(pid: u32, stop: tokio_util::sync::CancellationToken) {
    use nix::sys::signal::{Signal, kill};
    let Ok(pid) = i32::try_from(pid).map(nix::unistd::Pid::from_raw) else {
        return;
    };
    let mut tick = tokio::time::interval(PAUSE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let _ = kill(pid, Signal::SIGSTOP);
        tokio::time::sleep(PAUSE).await;
        let _ = kill(pid, Signal::SIGCONT);
    }
    let _ = kill(pid, Signal::SIGCONT);
}

/// The runs of the paused scenario, interleaved.
async fn measure_paused(
    args: &SuiteArgs,
    paths: &[(String, String)],
    warmup: Duration,
    duration: Duration,
) -> Result<BTreeMap<String, Vec<PausedRun>>, String> {
    interleave(args.reps, "paused", paths, |rep, addr| async move {
        let before = gateway_counts(&addr).await?;
        // Open loop: calls keep coming while the instance is stopped, as they do from
        // independent callers (a closed loop stalls with it, and hides the wait). The warm-up
        // is long enough for --hedge-after auto to have a full window of latencies.
        let warmup = warmup.max(Duration::from_secs(6));
        let rate = Some(PAUSED_RATE);
        let config = load(addr.clone(), reverse(), 256, rate, warmup, duration);
        let report = bench::run(config, Arc::new(Progress::default()))
            .await
            .map_err(|e| e.to_string())?;
        let after = gateway_counts(&addr).await?;
        let calls = after.0.saturating_sub(before.0).max(1);
        let hedges = after.1.saturating_sub(before.1);
        Ok(PausedRun {
            rep,
            throughput: report.throughput,
            p50_us: report.latency.p50_us,
            p99_us: report.latency.p99_us,
            p999_us: report.latency.p999_us,
            hedged: 100.0 * hedges as f64 / calls as f64,
            errors: report.errors.values().sum(),
        })
    })
    .await
}

/// Reverse("hello"), the call these scenarios make.
pub(super) fn reverse() -> Op {
    Op::Reverse {
        text: "hello".into(),
    }
}

/// A load of `op` on `addr`: closed loop at `concurrency`, or open at `rate` (with at most
/// `concurrency` calls open).
pub(super) fn load(
    addr: String,
    op: Op,
    concurrency: usize,
    rate: Option<f64>,
    warmup: Duration,
    duration: Duration,
) -> BenchConfig {
    BenchConfig {
        addrs: vec![addr],
        op,
        concurrency,
        rate,
        connections: bench::DEFAULT_CONNECTIONS,
        warmup,
        duration,
        requests: None,
        timeout: Duration::from_secs(30),
        tls: None,
    }
}

/// Runs `measure` on each path `reps` times, interleaved (A B C A B C ...), saying how far it
/// is; gives the runs by path name.
pub(super) async fn interleave<R, Fut>(
    reps: usize,
    scenario: &str,
    paths: &[(String, String)],
    mut measure: impl FnMut(usize, String) -> Fut,
) -> Result<BTreeMap<String, Vec<R>>, String>
where
    Fut: std::future::Future<Output = Result<R, String>>,
{
    let mut runs: BTreeMap<String, Vec<R>> = BTreeMap::new();
    let total = reps * paths.len();
    let mut done = 0;
    for rep in 0..reps {
        for (name, addr) in paths {
            done += 1;
            say(format!(
                "[{done}/{total}] {scenario} via {name} (rep {})",
                rep + 1
            ));
            let run = measure(rep, addr.clone())
                .await
                .map_err(|e| format!("{scenario} via {name}: {e}"))?;
            runs.entry(name.clone()).or_default().push(run);
        }
    }
    Ok(runs)
}

/// The gateway's calls and hedges so far.
async fn gateway_counts(addr: &str) -> Result<(u64, u64), String> {
    let endpoint = dlb::dial::endpoint(addr).map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let stats = dlb::proto::v1::gateway_client::GatewayClient::new(channel)
        .stats(dlb::proto::v1::StatsRequest {})
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok((stats.requests, stats.hedges))
}
