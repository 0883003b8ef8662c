//! `dlb bench-suite` (`just bench`): dlb's gateway against direct calls, NGINX `grpc_pass` and
//! HAProxy in HTTP/2 mode, measured in one run on this machine.
//!
//! Three compute instances are started, then each path in front of them: direct (the load
//! generator spreads over the three itself), `dlb-gateway`, NGINX and HAProxy (each from a
//! generated configuration, round robin over the three, keepalive on, the same number of
//! threads for each: `--threads`, the machine's cores by default, which is each one's own
//! default; `saturation_1t` runs a second set with one thread each). Every scenario runs its paths interleaved
//! (A B C D A B C D ...) for `--reps` repetitions; the report gives medians and the median of the per-repetition ratios.
//! A proxy that is not installed is reported and left out; this is a benchmark, not a test.
//!
//! Output: `target/bench/suite.md` (a table), `suite.json` and `suite.svg` (a chart).

mod degraded;
mod observed;
mod proxies;
mod report;
mod streams;
mod svg;

use self::proxies::{Children, STREAMS, haproxy_config, nginx_config, wait_answers};
use self::report::{markdown, median, summarize};
use crate::process::find_program;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::{Child, Command};

use dlb::client::Op;
use dlb::client::bench::{self, BenchConfig, BenchReport, Progress};

/// Flags of `dlb bench-suite`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Repetitions of every scenario and path (interleaved).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Warm-up seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Where the service binaries are (default: next to this `dlb`, built there if missing).
    #[arg(long, env = "DLB_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Leave out NGINX and HAProxy even when installed.
    #[arg(long)]
    pub no_proxies: bool,
    /// Only these paths (of direct, dlb-gateway, nginx, haproxy; comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub paths: Vec<String>,
    /// Threads of each proxy, the same for all: the gateway's --threads, NGINX's worker
    /// processes, HAProxy's nbthread. By default the machine's cores, which is each one's own
    /// default (users run them so); `--threads 1` measures one thread each.
    #[arg(long, default_value_t = cores())]
    pub threads: usize,
    /// Only these scenarios (of saturation, c1, open, fib, reverse_1mib, saturation_1t (one
    /// thread per proxy, when --threads is more), stream_server, stream_bidi, slow_instance,
    /// paused, observability, and mixed, which runs only when named; comma-separated;
    /// open needs saturation, whose direct rate it takes half of).
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
}

/// One way to reach the instances.
#[derive(Debug, Clone, Serialize)]
struct Target {
    name: &'static str,
    addrs: Vec<String>,
    /// The proxy's processes (empty for direct).
    #[serde(skip)]
    pids: Vec<u32>,
}

/// One scenario.
#[derive(Debug, Clone)]
struct Scenario {
    key: &'static str,
    title: &'static str,
    op: Op,
    concurrency: usize,
    /// Open loop at this fraction of the direct saturation rate.
    open_fraction: Option<f64>,
    /// Through the proxies with one thread each (not `--threads`).
    one_thread: bool,
}

/// The key of the scenario of one thread per proxy.
const SATURATION_ONE_THREAD: &str = "saturation_1t";

/// One measured run.
#[derive(Debug, Clone, Serialize)]
struct Run {
    rep: usize,
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    ok: u64,
    errors: u64,
    /// CPU time (user + system) the proxy's processes used per call, warm-up included (none
    /// for direct).
    cpu_us_per_call: Option<f64>,
}

/// Medians of one path in one scenario.
#[derive(Debug, Clone, Serialize, Default)]
struct Summary {
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    cpu_us_per_call: Option<f64>,
}

/// What one proxy process tree used over the whole suite.
#[derive(Debug, Clone, Serialize)]
struct Usage {
    cpu_secs: f64,
    peak_rss_mb: f64,
}

/// A target met or not.
#[derive(Debug, Clone, Serialize)]
struct Verdict {
    target: String,
    measured: String,
    met: bool,
}

/// The whole report (also written as JSON).
#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: String,
    /// Threads of each proxy.
    threads: usize,
    reps: usize,
    duration_secs: f64,
    paths: Vec<&'static str>,
    skipped: Vec<String>,
    open_rate: f64,
    runs: BTreeMap<String, BTreeMap<&'static str, Vec<Run>>>,
    medians: BTreeMap<String, BTreeMap<&'static str, Summary>>,
    ratios: BTreeMap<String, BTreeMap<String, f64>>,
    usage: BTreeMap<&'static str, Usage>,
    verdicts: Vec<Verdict>,
}

/// The machine's cores (what `--threads` is by default).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn say(message: impl AsRef<str>) {
    eprintln!("bench-suite: {}", message.as_ref());
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

/// CPU seconds (user + system) and resident peak of `pid` and its children.
fn usage_of(pids: &[u32]) -> (f64, f64) {
    let ticks_per_sec = 100.0;
    let mut all: Vec<u32> = pids.to_vec();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
            let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent.is_some_and(|p| pids.contains(&p)) && !all.contains(&pid) {
                all.push(pid);
            }
        }
    }
    let (mut cpu, mut rss_kb) = (0.0, 0.0);
    for pid in all {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
            cpu += (field(11).unwrap_or(0.0) + field(12).unwrap_or(0.0)) / ticks_per_sec;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            rss_kb += status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    (cpu, rss_kb / 1024.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = cores();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

/// Runs `dlb bench-suite`.
pub async fn suite(args: SuiteArgs) -> ExitCode {
    let mut children = Children::default();
    let result = run_suite(&args, &mut children).await;
    children.stop_all().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            say(format!("error: {message}"));
            ExitCode::FAILURE
        }
    }
}

async fn run_suite(args: &SuiteArgs, children: &mut Children) -> Result<(), String> {
    if args.reps == 0 {
        return Err("--reps must be at least 1".to_owned());
    }
    let duration = Duration::try_from_secs_f64(args.duration)
        .map_err(|_| "--duration must be a positive number of seconds".to_owned())?;
    let warmup = Duration::try_from_secs_f64(args.warmup)
        .map_err(|_| "--warmup must be a number of seconds".to_owned())?;
    let bins = crate::up::service_binaries(args.bin_dir.as_deref())?;
    if args.threads == 0 {
        return Err("--threads must be at least 1".to_owned());
    }
    let threads = args.threads;
    if threads == 1 && args.scenarios.iter().any(|w| w == SATURATION_ONE_THREAD) {
        return Err(format!(
            "--scenarios {SATURATION_ONE_THREAD} compares the proxies at one thread each \
             against --threads; with --threads 1 every scenario is one thread each (run \
             saturation)"
        ));
    }
    let work = args.out.join("work");
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;

    // Three instances.
    let backends: Vec<String> =
        start_computes(children, &bins, "", &[("A", &[]), ("B", &[]), ("C", &[])])
            .await?
            .into_iter()
            .map(|c| c.addr)
            .collect();
    say(format!("instances: {}", backends.join(", ")));

    let (mut targets, mut skipped) =
        start_proxies(args, children, &bins, &work, &backends, threads, "").await?;
    // One thread each as well, for the scenario that compares them so (when the default is
    // more): the gateway, NGINX and HAProxy again, in front of the same instances.
    let one_thread = threads != 1 && wants_one_thread(args);
    let mut single = if one_thread {
        let (single, missing) =
            start_proxies(args, children, &bins, &work, &backends, 1, ONE_THREAD_TAG).await?;
        // Those installed but not started in this set are said (not installed: said once).
        skipped.extend(
            missing
                .into_iter()
                .filter(|m| !m.contains("not installed") && !m.contains("--no-proxies"))
                .map(|m| format!("{m}{ONE_THREAD_TAG}")),
        );
        single
    } else {
        Vec::new()
    };
    if !args.paths.is_empty() {
        for wanted in &args.paths {
            if !["direct", "dlb-gateway", "nginx", "haproxy"].contains(&wanted.as_str()) {
                return Err(format!(
                    "--paths: unknown path {wanted:?} (use direct, dlb-gateway, nginx, haproxy)"
                ));
            }
        }
        targets.retain(|t| args.paths.iter().any(|p| p == t.name));
        single.retain(|t| args.paths.iter().any(|p| p == t.name));
        if !targets.iter().any(|t| t.name == "direct") {
            return Err("--paths must include direct (the baseline)".to_owned());
        }
    }
    for skip in &skipped {
        say(format!("skipped {skip}"));
    }

    let stream_keys = [streams::Kind::ServerStream, streams::Kind::Bidi];
    let kinds: Vec<streams::Kind> = stream_keys
        .into_iter()
        .filter(|k| args.scenarios.is_empty() || args.scenarios.iter().any(|w| w == k.key()))
        .collect();
    let slow_instance =
        args.scenarios.is_empty() || args.scenarios.iter().any(|w| w == SLOW_INSTANCE);
    let paused = args.scenarios.is_empty() || args.scenarios.iter().any(|w| w == PAUSED);
    let observability =
        args.scenarios.is_empty() || args.scenarios.iter().any(|w| w == OBSERVABILITY);
    // Long (its two loads must settle): only when asked for.
    let mixed = args.scenarios.iter().any(|w| w == MIXED);
    let unary_wanted: Vec<String> = args
        .scenarios
        .iter()
        .filter(|w| {
            !stream_keys.iter().any(|k| k.key() == w.as_str())
                && *w != SLOW_INSTANCE
                && *w != MIXED
                && *w != PAUSED
                && *w != OBSERVABILITY
        })
        .cloned()
        .collect();
    let scenarios = if !args.scenarios.is_empty() && unary_wanted.is_empty() {
        Vec::new()
    } else {
        pick_scenarios(all_scenarios(), &unary_wanted)?
    };
    // One thread each is a scenario of its own only when the others run with more.
    let scenarios: Vec<Scenario> = scenarios
        .into_iter()
        .filter(|s| !s.one_thread || one_thread)
        .collect();

    let before: BTreeMap<&str, f64> = targets
        .iter()
        .filter(|t| !t.pids.is_empty())
        .map(|t| (t.name, usage_of(&t.pids).0))
        .collect();
    let mut runs: BTreeMap<String, BTreeMap<&'static str, Vec<Run>>> = BTreeMap::new();
    let mut open_rate = 0.0;
    let paths_of = |scenario: &Scenario| {
        if scenario.one_thread {
            &single
        } else {
            &targets
        }
    };
    let total: usize = scenarios
        .iter()
        .map(|s| args.reps * paths_of(s).len())
        .sum();
    let mut done = 0;
    for scenario in &scenarios {
        let rate = scenario.open_fraction.map(|fraction| {
            let direct: Vec<f64> = runs
                .get("saturation")
                .and_then(|r| r.get("direct"))
                .map(|r| r.iter().map(|run| run.throughput).collect())
                .unwrap_or_default();
            open_rate = (median(direct) * fraction).max(1.0);
            open_rate
        });
        for rep in 0..args.reps {
            for target in paths_of(scenario) {
                done += 1;
                say(format!(
                    "[{done}/{total}] {} via {} (rep {})",
                    scenario.key,
                    target.name,
                    rep + 1
                ));
                let config = BenchConfig {
                    addrs: target.addrs.clone(),
                    op: scenario.op.clone(),
                    concurrency: scenario.concurrency.max(1),
                    rate,
                    connections: bench::DEFAULT_CONNECTIONS,
                    warmup,
                    duration,
                    requests: None,
                    timeout: Duration::from_secs(10),
                    tls: None,
                };
                let cpu_before = (!target.pids.is_empty()).then(|| usage_of(&target.pids).0);
                let report: BenchReport =
                    bench::run(config, Arc::new(Progress::default()))
                        .await
                        .map_err(|e| format!("{} via {}: {e}", scenario.key, target.name))?;
                // The warm-up's calls used CPU too: they are counted at the run's rate.
                let calls = report.throughput * (warmup + duration).as_secs_f64();
                let cpu_us_per_call = cpu_before
                    .map(|before| 1e6 * (usage_of(&target.pids).0 - before) / calls.max(1.0));
                let errors: u64 = report.errors.values().sum();
                if errors > 0 {
                    say(format!(
                        "  {errors} errors via {}: {:?}",
                        target.name, report.errors
                    ));
                }
                runs.entry(scenario.key.to_owned())
                    .or_default()
                    .entry(target.name)
                    .or_default()
                    .push(Run {
                        rep,
                        throughput: report.throughput,
                        p50_us: report.latency.p50_us,
                        p99_us: report.latency.p99_us,
                        p999_us: report.latency.p999_us,
                        ok: report.ok,
                        errors,
                        cpu_us_per_call,
                    });
            }
        }
    }
    let usage: BTreeMap<&'static str, Usage> = targets
        .iter()
        .filter(|t| !t.pids.is_empty())
        .map(|t| {
            let (cpu, rss) = usage_of(&t.pids);
            (
                t.name,
                Usage {
                    cpu_secs: cpu - before.get(t.name).copied().unwrap_or(0.0),
                    peak_rss_mb: rss,
                },
            )
        })
        .collect();

    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let streamed = if kinds.is_empty() || !targets.iter().any(|t| t.name == "dlb-gateway") {
        None
    } else {
        Some(run_streams(args, children, &bins, &kinds, warmup, duration).await?)
    };
    let slowed = if slow_instance && wanted(args, "dlb-gateway") {
        Some(degraded::run_slow_instance(args, children, &bins, warmup, duration).await?)
    } else {
        None
    };
    let mixed = if mixed && wanted(args, "dlb-gateway") {
        Some(degraded::run_mixed(args, children, &bins, warmup, duration).await?)
    } else {
        None
    };
    let paused = if paused && wanted(args, "dlb-gateway") {
        Some(degraded::run_paused(args, children, &bins, warmup, duration).await?)
    } else {
        None
    };
    let observed = if observability && wanted(args, "dlb-gateway") {
        Some(observed::run_observability(args, children, &bins, warmup, duration).await?)
    } else {
        None
    };
    let extra: Vec<String> = streamed
        .into_iter()
        .chain(slowed)
        .chain(paused)
        .chain(observed)
        .chain(mixed)
        .collect();
    if scenarios.is_empty() {
        for section in extra {
            println!("{section}");
        }
        return Ok(());
    }
    let report = summarize(args, &targets, skipped, open_rate, runs, usage, &scenarios);
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    let mut markdown = markdown(&report, &scenarios);
    for section in extra {
        markdown.push('\n');
        markdown.push_str(&section);
    }
    let chart = svg::svg(&report, &scenarios);
    for (name, text) in [
        ("suite.json", json),
        ("suite.md", markdown.clone()),
        ("suite.svg", chart),
    ] {
        let path = args.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    println!("{markdown}");
    say(format!(
        "wrote {0}/suite.md, {0}/suite.json and {0}/suite.svg",
        args.out.display()
    ));
    Ok(())
}

/// What tells the proxies with one thread each apart from the others (in process names).
const ONE_THREAD_TAG: &str = " (1 thread)";

/// What the files of the proxies `tag` names end with.
fn file_suffix(tag: &str) -> &'static str {
    if tag.is_empty() { "" } else { "-1-thread" }
}

/// Whether the scenario of one thread per proxy is to run (`--scenarios` names it, or names
/// nothing).
fn wants_one_thread(args: &SuiteArgs) -> bool {
    args.scenarios.is_empty() || args.scenarios.iter().any(|w| w == SATURATION_ONE_THREAD)
}

/// Starts the paths in front of `backends`: direct, then `dlb-gateway`, NGINX and HAProxy with
/// `threads` threads each (`tag` added to their process names), and says which proxies are
/// not installed or did not start.
async fn start_proxies(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    work: &Path,
    backends: &[String],
    threads: usize,
    tag: &str,
) -> Result<(Vec<Target>, Vec<String>), String> {
    let mut targets = vec![Target {
        name: "direct",
        addrs: backends.to_vec(),
        pids: Vec::new(),
    }];
    let mut skipped = Vec::new();

    // The gateway.
    let gateway = format!("127.0.0.1:{}", free_port()?);
    let backend_flag = ["A", "B", "C"]
        .iter()
        .zip(backends)
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let label = format!("dlb-gateway{tag}");
    let pid = spawn_gateway(
        children,
        &label,
        bins,
        &gateway,
        &backend_flag,
        threads,
        &[],
        &[],
    )?;
    wait_answers(children, &label, &gateway).await?;
    targets.push(Target {
        name: "dlb-gateway",
        addrs: vec![gateway],
        pids: vec![pid],
    });

    if args.no_proxies {
        skipped.push("nginx and haproxy (--no-proxies)".to_owned());
    } else {
        match find_program("nginx") {
            None => skipped.push(
                "nginx: not installed (`sudo apt-get install -y nginx-light` or `nginx`)"
                    .to_owned(),
            ),
            Some(nginx) => {
                let dir = std::path::absolute(work.join(format!("nginx{}", file_suffix(tag))))
                    .map_err(|e| format!("nginx dir: {e}"))?;
                for sub in ["", "body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    std::fs::create_dir_all(dir.join(sub))
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                let port = free_port()?;
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_config(&dir, port, backends, threads))
                    .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                let addr = format!("127.0.0.1:{port}");
                let label = format!("nginx{tag}");
                let pid = children.spawn(
                    &label,
                    &nginx,
                    &[
                        "-p".into(),
                        dir.display().to_string(),
                        "-c".into(),
                        conf.display().to_string(),
                    ],
                )?;
                match wait_answers(children, &label, &addr).await {
                    Ok(()) => targets.push(Target {
                        name: "nginx",
                        addrs: vec![addr],
                        pids: vec![pid],
                    }),
                    Err(error) => skipped.push(format!("nginx: {error}")),
                }
            }
        }
        match find_program("haproxy") {
            None => skipped
                .push("haproxy: not installed (`sudo apt-get install -y haproxy`)".to_owned()),
            Some(haproxy) => {
                let port = free_port()?;
                let conf = work.join(format!("haproxy{}.cfg", file_suffix(tag)));
                std::fs::write(&conf, haproxy_config(port, backends, threads))
                    .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                let addr = format!("127.0.0.1:{port}");
                let label = format!("haproxy{tag}");
                let pid = children.spawn(
                    &label,
                    &haproxy,
                    &["-db".into(), "-f".into(), conf.display().to_string()],
                )?;
                match wait_answers(children, &label, &addr).await {
                    Ok(()) => targets.push(Target {
                        name: "haproxy",
                        addrs: vec![addr],
                        pids: vec![pid],
                    }),
                    Err(error) => skipped.push(format!("haproxy: {error}")),
                }
            }
        }
    }
    Ok((targets, skipped))
}

/// A compute instance the suite started.
struct Started {
    /// `ID=HOST:PORT`, for `--backend`.
    backend: String,
    /// HOST:PORT.
    addr: String,
    pid: u32,
}

/// Starts a `dlb-compute` for each `(id, extra flags)` (named `compute ID` plus `tag`), without
/// Redis, and waits until each answers.
async fn start_computes(
    children: &mut Children,
    bins: &Path,
    tag: &str,
    instances: &[(&str, &[&str])],
) -> Result<Vec<Started>, String> {
    let mut started = Vec::new();
    for (id, extra) in instances {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let name = format!("compute {id}{tag}");
        let mut flags: Vec<String> = ["--id", id, "--listen", &addr, "--redis", "none"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        flags.extend(extra.iter().map(|s| (*s).to_owned()));
        let pid = children.spawn(&name, &bins.join("dlb-compute"), &flags)?;
        wait_answers(children, &name, &addr).await?;
        started.push(Started {
            backend: format!("{id}={addr}"),
            addr,
            pid,
        });
    }
    Ok(started)
}

/// Starts a `dlb-gateway` on `listen` in front of `backends` (`ID=HOST:PORT,...`), without
/// Redis or `/metrics`, with `threads` threads and [`STREAMS`] streams per caller connection.
#[allow(clippy::too_many_arguments)]
fn spawn_gateway(
    children: &mut Children,
    name: &str,
    bins: &Path,
    listen: &str,
    backends: &str,
    threads: usize,
    extra: &[String],
    env: &[(&str, &str)],
) -> Result<u32, String> {
    let mut flags: Vec<String> = vec![
        "--listen".into(),
        listen.to_owned(),
        "--metrics-listen".into(),
        "none".into(),
        "--backend".into(),
        backends.to_owned(),
        "--redis".into(),
        "none".into(),
        "--threads".into(),
        threads.to_string(),
        "--max-concurrent-streams".into(),
        STREAMS.to_string(),
    ];
    flags.extend_from_slice(extra);
    children.spawn_with_env(name, &bins.join("dlb-gateway"), &flags, env)
}

/// The streaming scenarios: a streaming instance in this process, a `dlb-gateway` of its own
/// in front of it, each kind measured straight and through the gateway, interleaved, `--reps`
/// times. Writes `streams.json` and gives the report's markdown section.
async fn run_streams(
    args: &SuiteArgs,
    children: &mut Children,
    bins: &Path,
    kinds: &[streams::Kind],
    warmup: Duration,
    duration: Duration,
) -> Result<String, String> {
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let instance = streams::start_instance(stop.clone()).await?;
    // Each path: its name, its address, its processes.
    let mut paths: Vec<(&'static str, String, Vec<u32>)> =
        vec![("direct", instance.clone(), Vec::new())];
    let gateway = format!("127.0.0.1:{}", free_port()?);
    let pid = spawn_gateway(
        children,
        "dlb-gateway (streams)",
        bins,
        &gateway,
        &format!("S={instance}"),
        args.threads,
        &[],
        &[],
    )?;
    wait_streams(children, "dlb-gateway (streams)", &gateway).await?;
    paths.push(("dlb-gateway", gateway, vec![pid]));
    let haproxy = find_program("haproxy").filter(|_| !args.no_proxies && wanted(args, "haproxy"));
    if let Some(haproxy) = haproxy {
        let port = free_port()?;
        let conf = args.out.join("work").join("haproxy-streams.cfg");
        std::fs::write(
            &conf,
            haproxy_config(port, std::slice::from_ref(&instance), args.threads),
        )
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let addr = format!("127.0.0.1:{port}");
        let pid = children.spawn(
            "haproxy (streams)",
            &haproxy,
            &["-db".into(), "-f".into(), conf.display().to_string()],
        )?;
        match wait_streams(children, "haproxy (streams)", &addr).await {
            Ok(()) => paths.push(("haproxy", addr, vec![pid])),
            Err(error) => say(format!("streams: skipped haproxy: {error}")),
        }
    }
    #[derive(Serialize)]
    struct Row {
        scenario: &'static str,
        message_bytes: usize,
        /// Every run, by path.
        runs: BTreeMap<&'static str, Vec<streams::Measured>>,
        /// The median of the per-repetition ratios to direct, by path.
        ratio_median: BTreeMap<&'static str, f64>,
    }
    let mut rows = Vec::new();
    for kind in kinds {
        let mut runs: BTreeMap<&'static str, Vec<streams::Measured>> = BTreeMap::new();
        for rep in 0..args.reps {
            for (path, addr, _) in &paths {
                say(format!("{} via {path} (rep {})", kind.key(), rep + 1));
                let measured = streams::measure(addr, *kind, warmup, duration)
                    .await
                    .map_err(|e| format!("{} via {path}: {e}", kind.key()))?;
                runs.entry(path).or_default().push(measured);
            }
        }
        let direct = runs.get("direct").cloned().unwrap_or_default();
        let ratio_median = runs
            .iter()
            .filter(|(path, _)| **path != "direct")
            .map(|(path, measured)| {
                let ratios = direct
                    .iter()
                    .zip(measured)
                    .map(|(d, m)| m.mb_per_sec / d.mb_per_sec.max(f64::MIN_POSITIVE))
                    .collect();
                (*path, median(ratios))
            })
            .collect();
        rows.push(Row {
            scenario: kind.key(),
            message_bytes: streams::MESSAGE_BYTES,
            runs,
            ratio_median,
        });
    }
    let peak_rss_mb: BTreeMap<&str, f64> = paths
        .iter()
        .filter(|(_, _, pids)| !pids.is_empty())
        .map(|(path, _, pids)| (*path, usage_of(pids).1))
        .collect();
    let path = args.out.join("streams.json");
    let json = serde_json::json!({ "scenarios": &rows, "peak_rss_mb": peak_rss_mb });
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut out = String::new();
    let rss: Vec<String> = peak_rss_mb
        .iter()
        .map(|(path, mb)| format!("{path} {mb:.1} MB"))
        .collect();
    let _ = writeln!(
        out,
        "Streams of {} KiB messages, {} at once on one connection (medians of {} interleaved \
         runs; peak RSS: {}):\n",
        streams::MESSAGE_BYTES / 1024,
        streams::STREAMS,
        args.reps,
        rss.join(", ")
    );
    let _ = writeln!(
        out,
        "| scenario | path | MB/s | messages/s | ratio to direct |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    for row in &rows {
        for (path, _, _) in &paths {
            let measured = row.runs.get(path).map(Vec::as_slice).unwrap_or_default();
            let med = |f: fn(&streams::Measured) -> f64| median(measured.iter().map(f).collect());
            let ratio = row
                .ratio_median
                .get(path)
                .map_or_else(|| "1.00x".to_owned(), |r| format!("{r:.2}x"));
            let _ = writeln!(
                out,
                "| {} | {path} | {:.0} | {:.0} | {ratio} |",
                row.scenario,
                med(|m| m.mb_per_sec),
                med(|m| m.messages_per_sec),
            );
        }
    }
    say(format!("wrote {}", path.display()));
    Ok(out)
}

/// Whether `--paths` lets `path` run (all run when it names none).
fn wanted(args: &SuiteArgs, path: &str) -> bool {
    args.paths.is_empty() || args.paths.iter().any(|p| p == path)
}

/// Waits until `addr` relays a short server stream (a proxy takes the instance in once its
/// health says SERVING, or once it connects).
async fn wait_streams(children: &mut Children, name: &str, addr: &str) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..200 {
        if let Some(exit) = children.exited(name).await {
            return Err(exit);
        }
        let probe = streams::measure(
            addr,
            streams::Kind::ServerStream,
            Duration::ZERO,
            Duration::from_millis(50),
        );
        match probe.await {
            Ok(measured) if measured.mb_per_sec > 0.0 => return Ok(()),
            Ok(_) => last = "no data".into(),
            Err(error) => last = error,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{name} at {addr} relayed no stream in 20 s: {last}"
    ))
}

/// The key of the scenario of one slow instance (see [`degraded`]).
const SLOW_INSTANCE: &str = "slow_instance";

/// The key of the scenario of a paused instance and hedging (see [`degraded`]).
const PAUSED: &str = "paused";

/// The key of the mixed-load scenario (see [`degraded`]); run only when named.
const MIXED: &str = "mixed";

/// The key of the scenario of the access log's and tracing's cost (see [`observed`]).
const OBSERVABILITY: &str = "observability";

/// Every scenario, in the order they run.
fn all_scenarios() -> [Scenario; 6] {
    [
        Scenario {
            key: "saturation",
            title: "Reverse(\"hello\"), concurrency 64",
            op: Op::Reverse {
                text: "hello".into(),
            },
            concurrency: 64,
            open_fraction: None,
            one_thread: false,
        },
        Scenario {
            key: "c1",
            title: "Reverse(\"hello\"), concurrency 1",
            op: Op::Reverse {
                text: "hello".into(),
            },
            concurrency: 1,
            open_fraction: None,
            one_thread: false,
        },
        Scenario {
            key: "open",
            title: "Reverse(\"hello\"), open loop at 50% of direct saturation",
            op: Op::Reverse {
                text: "hello".into(),
            },
            concurrency: 0,
            open_fraction: Some(0.5),
            one_thread: false,
        },
        Scenario {
            key: "fib",
            title: "Fibonacci(100000), concurrency 16",
            op: Op::Fibonacci { n: 100_000 },
            concurrency: 16,
            open_fraction: None,
            one_thread: false,
        },
        Scenario {
            key: "reverse_1mib",
            title: "Reverse of 1 MiB, concurrency 4",
            op: Op::Reverse {
                text: "abcdefgh".repeat(128 * 1024),
            },
            concurrency: 4,
            open_fraction: None,
            one_thread: false,
        },
        Scenario {
            key: SATURATION_ONE_THREAD,
            title: "Reverse(\"hello\"), concurrency 64, one thread per proxy",
            op: Op::Reverse {
                text: "hello".into(),
            },
            concurrency: 64,
            open_fraction: None,
            one_thread: true,
        },
    ]
}

/// The scenarios `--scenarios` names, in the suite's order (all when it names none).
fn pick_scenarios(all: [Scenario; 6], wanted: &[String]) -> Result<Vec<Scenario>, String> {
    if wanted.is_empty() {
        return Ok(all.into());
    }
    let keys: Vec<&str> = all.iter().map(|s| s.key).collect();
    if let Some(unknown) = wanted.iter().find(|w| !keys.contains(&w.as_str())) {
        return Err(format!(
            "--scenarios: unknown scenario {unknown:?} (use {}, stream_server, stream_bidi, \
             {SLOW_INSTANCE}, {PAUSED}, {OBSERVABILITY}, {MIXED})",
            keys.join(", ")
        ));
    }
    let has = |key: &str| wanted.iter().any(|w| w == key);
    if has("open") && !has("saturation") {
        return Err(
            "--scenarios: open needs saturation too (its rate is half the direct saturation rate)"
                .to_owned(),
        );
    }
    Ok(all.into_iter().filter(|s| has(s.key)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_are_picked_by_key_and_open_needs_saturation() {
        let keys = |wanted: &[&str]| {
            let wanted: Vec<String> = wanted.iter().map(|w| (*w).to_owned()).collect();
            pick_scenarios(all_scenarios(), &wanted)
                .map(|s| s.iter().map(|s| s.key).collect::<Vec<_>>())
        };
        assert_eq!(keys(&[]).unwrap().len(), 6);
        assert_eq!(keys(&["saturation_1t"]).unwrap(), ["saturation_1t"]);
        assert!(all_scenarios().iter().filter(|s| s.one_thread).count() == 1);
        assert_eq!(keys(&["c1", "saturation"]).unwrap(), ["saturation", "c1"]);
        assert!(keys(&["open"]).unwrap_err().contains("needs saturation"));
        assert!(
            keys(&["fast"])
                .unwrap_err()
                .contains("unknown scenario \"fast\"")
        );
    }
}
