//! `dlb bench-suite` (`just bench`): dlb's gateway against direct calls, NGINX `grpc_pass` and
//! HAProxy in HTTP/2 mode, measured in one run on this machine.
//!
//! Three compute instances are started, then each path in front of them: direct (the load
//! generator spreads over the three itself), `dlb-gateway`, NGINX and HAProxy (each from a
//! generated configuration, round robin over the three, keepalive on, the same number of
//! threads for each: `--threads`, one by default). Every scenario runs its paths interleaved
//! (A B C D A B C D ...) for `--reps` repetitions; the report gives medians and the median of the per-repetition ratios.
//! A proxy that is not installed is reported and left out; this is a benchmark, not a test.
//!
//! Output: `target/bench/suite.md` (a table), `suite.json` and `suite.svg` (a chart).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::{Child, Command};

use crate::bench::{self, BenchConfig, BenchReport, Progress};
use crate::call::Op;

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
    /// processes, HAProxy's nbthread. One by default: the load generator and the three
    /// instances run on the same machine.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Only these scenarios (of saturation, c1, open, fib, reverse_1mib; comma-separated;
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
}

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
}

/// Medians of one path in one scenario.
#[derive(Debug, Clone, Serialize, Default)]
struct Summary {
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
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

fn say(message: impl AsRef<str>) {
    eprintln!("bench-suite: {}", message.as_ref());
}

fn median(mut values: Vec<f64>) -> f64 {
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

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

/// Processes started by the suite; all are stopped (SIGTERM, then SIGKILL) when it ends.
#[derive(Default)]
struct Children {
    children: Vec<(String, Child)>,
}

impl Children {
    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> Result<u32, String> {
        let child = Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// The stderr of `name` if it has exited (for error messages).
    async fn exited(&mut self, name: &str) -> Option<String> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| n == name)?;
        let status = child.try_wait().ok()??;
        let mut text = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            use tokio::io::AsyncReadExt as _;
            let _ = stderr.read_to_string(&mut text).await;
        }
        Some(format!("{name} exited ({status}): {}", text.trim()))
    }

    async fn stop_all(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        self.children.clear();
    }
}

/// Waits until `addr` answers a Reverse call (the proxies have no health service).
async fn wait_answers(children: &mut Children, name: &str, addr: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    loop {
        if let Some(exit) = children.exited(name).await {
            return Err(exit);
        }
        if let Ok(endpoint) = crate::endpoint::endpoint(addr)
            && let Ok(channel) = endpoint.connect().await
        {
            let mut client = crate::proto::v1::operations_client::OperationsClient::new(channel);
            let outcome = crate::call::call(
                &mut client,
                &Op::Reverse {
                    text: "ready?".into(),
                },
                Some(Duration::from_secs(2)),
            )
            .await;
            match outcome.error {
                None => return Ok(()),
                Some(error) => last = format!("{}: {}", error.code, error.message),
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{name} at {addr} does not answer: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    crate::up::find_on_path(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/local/sbin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// HTTP/2 streams each proxy lets one caller connection have open at once (the gateway's
/// `--max-concurrent-streams` default; NGINX's default is 128 too, HAProxy's 100), so that all
/// three make a caller's excess wait in its client alike.
const STREAMS: u32 = 128;

/// NGINX with `grpc_pass` over an upstream of the instances, keepalive on.
fn nginx_config(dir: &Path, port: u16, backends: &[String], workers: usize) -> String {
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b};\n"))
        .collect();
    let d = dir.display();
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "# Generated by dlb bench-suite.\n{user}worker_processes {workers};\n\
         daemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{\n  worker_connections 4096;\n}}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           client_max_body_size 16m;\n  http2_max_concurrent_streams {STREAMS};\n\
           keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
           upstream computes {{\n{servers}    keepalive 64;\n    keepalive_requests 1000000;\n  }}\n\
           server {{\n    listen 127.0.0.1:{port} http2;\n\
               location / {{\n      grpc_pass grpc://computes;\n      grpc_buffer_size 1m;\n    }}\n  }}\n}}\n"
    )
}

/// HAProxy in HTTP mode, HTTP/2 on both sides, round robin.
fn haproxy_config(port: u16, backends: &[String], threads: usize) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(n, b)| format!("  server s{n} {b} proto h2\n"))
        .collect();
    format!(
        "# Generated by dlb bench-suite.\nglobal\n  nbthread {threads}\n  maxconn 4000\n\
         \x20 tune.h2.max-concurrent-streams {STREAMS}\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend grpc\n  bind 127.0.0.1:{port} proto h2\n  default_backend computes\n\
         backend computes\n  balance roundrobin\n{servers}"
    )
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
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
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
    let work = args.out.join("work");
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;

    // Three instances.
    let mut backends = Vec::new();
    for id in ["A", "B", "C"] {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let name = format!("compute {id}");
        children.spawn(
            &name,
            &bins.join("dlb-compute"),
            &[
                "--id".into(),
                id.into(),
                "--listen".into(),
                addr.clone(),
                "--redis".into(),
                "none".into(),
            ],
        )?;
        wait_answers(children, &name, &addr).await?;
        backends.push(addr);
    }
    say(format!("instances: {}", backends.join(", ")));

    let mut targets = vec![Target {
        name: "direct",
        addrs: backends.clone(),
        pids: Vec::new(),
    }];
    let mut skipped = Vec::new();

    // The gateway.
    let gateway = format!("127.0.0.1:{}", free_port()?);
    let backend_flag = ["A", "B", "C"]
        .iter()
        .zip(&backends)
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let pid = children.spawn(
        "dlb-gateway",
        &bins.join("dlb-gateway"),
        &[
            "--listen".into(),
            gateway.clone(),
            "--metrics-listen".into(),
            "none".into(),
            "--backend".into(),
            backend_flag,
            "--redis".into(),
            "none".into(),
            "--threads".into(),
            threads.to_string(),
            "--max-concurrent-streams".into(),
            STREAMS.to_string(),
        ],
    )?;
    wait_answers(children, "dlb-gateway", &gateway).await?;
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
                let dir = std::path::absolute(work.join("nginx"))
                    .map_err(|e| format!("nginx dir: {e}"))?;
                for sub in ["", "body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    std::fs::create_dir_all(dir.join(sub))
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                let port = free_port()?;
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_config(&dir, port, &backends, threads))
                    .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                let addr = format!("127.0.0.1:{port}");
                let pid = children.spawn(
                    "nginx",
                    &nginx,
                    &[
                        "-p".into(),
                        dir.display().to_string(),
                        "-c".into(),
                        conf.display().to_string(),
                    ],
                )?;
                match wait_answers(children, "nginx", &addr).await {
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
                let conf = work.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_config(port, &backends, threads))
                    .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                let addr = format!("127.0.0.1:{port}");
                let pid = children.spawn(
                    "haproxy",
                    &haproxy,
                    &["-db".into(), "-f".into(), conf.display().to_string()],
                )?;
                match wait_answers(children, "haproxy", &addr).await {
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
    if !args.paths.is_empty() {
        for wanted in &args.paths {
            if !["direct", "dlb-gateway", "nginx", "haproxy"].contains(&wanted.as_str()) {
                return Err(format!(
                    "--paths: unknown path {wanted:?} (use direct, dlb-gateway, nginx, haproxy)"
                ));
            }
        }
        targets.retain(|t| args.paths.iter().any(|p| p == t.name));
        if !targets.iter().any(|t| t.name == "direct") {
            return Err("--paths must include direct (the baseline)".to_owned());
        }
    }
    for skip in &skipped {
        say(format!("skipped {skip}"));
    }

    let scenarios = pick_scenarios(all_scenarios(), &args.scenarios)?;

    let before: BTreeMap<&str, f64> = targets
        .iter()
        .filter(|t| !t.pids.is_empty())
        .map(|t| (t.name, usage_of(&t.pids).0))
        .collect();
    let mut runs: BTreeMap<String, BTreeMap<&'static str, Vec<Run>>> = BTreeMap::new();
    let mut open_rate = 0.0;
    let total = scenarios.len() * args.reps * targets.len();
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
            for target in &targets {
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
                let report: BenchReport =
                    bench::run(config, Arc::new(Progress::default()))
                        .await
                        .map_err(|e| format!("{} via {}: {e}", scenario.key, target.name))?;
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

    let report = summarize(args, &targets, skipped, open_rate, runs, usage, &scenarios);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    let markdown = markdown(&report, &scenarios);
    let svg = svg(&report, &scenarios);
    for (name, text) in [
        ("suite.json", json),
        ("suite.md", markdown.clone()),
        ("suite.svg", svg),
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

/// Every scenario, in the order they run.
fn all_scenarios() -> [Scenario; 5] {
    [
        Scenario {
            key: "saturation",
            title: "Reverse(\"hello\"), concurrency 64",
            op: Op::Reverse {
                text: "hello".into(),
            },
            concurrency: 64,
            open_fraction: None,
        },
        Scenario {
            key: "c1",
            title: "Reverse(\"hello\"), concurrency 1",
            op: Op::Reverse {
                text: "hello".into(),
            },
            concurrency: 1,
            open_fraction: None,
        },
        Scenario {
            key: "open",
            title: "Reverse(\"hello\"), open loop at 50% of direct saturation",
            op: Op::Reverse {
                text: "hello".into(),
            },
            concurrency: 0,
            open_fraction: Some(0.5),
        },
        Scenario {
            key: "fib",
            title: "Fibonacci(100000), concurrency 16",
            op: Op::Fibonacci { n: 100_000 },
            concurrency: 16,
            open_fraction: None,
        },
        Scenario {
            key: "reverse_1mib",
            title: "Reverse of 1 MiB, concurrency 4",
            op: Op::Reverse {
                text: "abcdefgh".repeat(128 * 1024),
            },
            concurrency: 4,
            open_fraction: None,
        },
    ]
}

/// The scenarios `--scenarios` names, in the suite's order (all when it names none).
fn pick_scenarios(all: [Scenario; 5], wanted: &[String]) -> Result<Vec<Scenario>, String> {
    if wanted.is_empty() {
        return Ok(all.into());
    }
    let keys: Vec<&str> = all.iter().map(|s| s.key).collect();
    if let Some(unknown) = wanted.iter().find(|w| !keys.contains(&w.as_str())) {
        return Err(format!(
            "--scenarios: unknown scenario {unknown:?} (use {})",
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

fn summarize(
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
    if ran("saturation") {
        let r = ratio("saturation", "throughput gateway/direct");
        check("c=64 throughput >= 0.6x direct", times(r, 0.6), r >= 0.6);
    }
    if names.contains(&"nginx") && ran("c1") {
        let (g, n) = (p("c1", "dlb-gateway").p50_us, p("c1", "nginx").p50_us);
        check(
            "c=1 p50 <= NGINX's",
            format!("{g:.0} us vs {n:.0} us"),
            g <= n,
        );
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

fn markdown(report: &Report, scenarios: &[Scenario]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## dlb bench-suite\n\n{}; {} thread(s) per proxy; {} repetitions of {} s per path and \
         scenario, interleaved; medians.\n",
        report.machine, report.threads, report.reps, report.duration_secs
    );
    let _ = writeln!(
        out,
        "| scenario | path | throughput (req/s) | p50 | p99 | p99.9 | errors |\n|---|---|---:|---:|---:|---:|---:|"
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
                let _ = writeln!(
                    out,
                    "| {title} | {path} | {:.0} | {} | {} | {} | {} |",
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
        "\n| proxy | CPU seconds (whole suite) | peak RSS |\n|---|---:|---:|"
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

/// Escapes text for SVG.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Two panels: throughput of each path relative to direct, per scenario; and p50/p99/p99.9
/// of each path at concurrency 1 and in the open loop.
fn svg(report: &Report, scenarios: &[Scenario]) -> String {
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

/// A ratio as "1.23x", with more decimals (up to six) while two would round it onto
/// `target`: 0.5997 against 0.6 is "0.5997x", not "0.60x" beside "not met".
fn times(ratio: f64, target: f64) -> String {
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
    fn scenarios_are_picked_by_key_and_open_needs_saturation() {
        let keys = |wanted: &[&str]| {
            let wanted: Vec<String> = wanted.iter().map(|w| (*w).to_owned()).collect();
            pick_scenarios(all_scenarios(), &wanted)
                .map(|s| s.iter().map(|s| s.key).collect::<Vec<_>>())
        };
        assert_eq!(keys(&[]).unwrap().len(), 5);
        assert_eq!(keys(&["c1", "saturation"]).unwrap(), ["saturation", "c1"]);
        assert!(keys(&["open"]).unwrap_err().contains("needs saturation"));
        assert!(
            keys(&["fast"])
                .unwrap_err()
                .contains("unknown scenario \"fast\"")
        );
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn configs_name_every_backend() {
        let backends = vec!["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()];
        let nginx = nginx_config(Path::new("/tmp/x"), 9, &backends, 2);
        assert!(nginx.contains("server 127.0.0.1:2;"));
        assert!(nginx.contains("grpc_pass grpc://computes;"));
        assert!(nginx.contains("worker_processes 2;"));
        let haproxy = haproxy_config(9, &backends, 2);
        assert!(haproxy.contains("server s1 127.0.0.1:2 proto h2"));
        assert!(haproxy.contains("balance roundrobin"));
        assert!(haproxy.contains("nbthread 2"));
        // The same bound on a caller connection's open streams as the gateway's.
        assert!(nginx.contains("http2_max_concurrent_streams 128;"));
        assert!(haproxy.contains("\n  tune.h2.max-concurrent-streams 128\n"));
    }

    #[test]
    fn svg_text_is_escaped() {
        assert_eq!(xml("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
