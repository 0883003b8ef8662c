//! `dlb up` and `dlb down`: the whole mesh with one command.
//!
//! `dlb up` checks every port first (so a conflict starts nothing), builds the service binaries
//! if they are missing, then starts, in order and each only once the previous one is healthy:
//! Redis (the one at `--redis` if it answers, else a private `redis-server` without persistence,
//! else no event log), `dlb-control` with its compute instances, `dlb-gateway` following control,
//! and `dlb-ui`. It prints where everything is and, in the foreground, waits for Ctrl-C or
//! SIGTERM; then it stops them in the reverse order (dashboard, gateway, control, which drains
//! its instances, private Redis). With `--detach` it leaves them running and `dlb down` stops
//! them later, from the state file both write.
//!
//! Children run in their own process group, so a Ctrl-C in the terminal reaches `dlb up` alone
//! and the stop order holds.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::proto::v1::control_client::ControlClient;
use crate::proto::v1::{InstanceState, ListInstancesRequest};

/// The service binaries `dlb up` runs, looked for next to `dlb`.
pub const SERVICE_BINARIES: [&str; 4] = ["dlb-compute", "dlb-control", "dlb-gateway", "dlb-ui"];

/// Name of the state file in the state directory.
pub const STATE_FILE: &str = "up.json";

/// How long each service may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a service may take to stop after SIGTERM before SIGKILL (control drains its
/// instances within its own grace period, so it gets longer).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const CONTROL_STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// Flags of `dlb up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Compute instances control starts (A, B, C, ...).
    #[arg(long, default_value_t = 3)]
    pub instances: usize,
    /// Port of the gateway (gRPC).
    #[arg(long, default_value_t = 12000)]
    pub gateway_port: u16,
    /// Port of control (gRPC).
    #[arg(long, default_value_t = 12001)]
    pub control_port: u16,
    /// Port of the gateway's Prometheus `/metrics`.
    #[arg(long, default_value_t = 12002)]
    pub metrics_port: u16,
    /// Port of the dashboard.
    #[arg(long, default_value_t = 5000)]
    pub ui_port: u16,
    /// Port of instance A (B gets the next, ...); 0 lets each pick a free port.
    #[arg(long, default_value_t = 13001)]
    pub first_port: u16,
    /// Redis of the event log: used if it answers, else a private redis-server is started on
    /// its port (loopback URLs) and stopped on exit.
    #[arg(long, env = "DLB_REDIS_URL", default_value = crate::events::DEFAULT_REDIS_URL)]
    pub redis: String,
    /// Start everything in the background and return; `dlb down` stops it.
    #[arg(long)]
    pub detach: bool,
    /// Where the state file and (with --detach) the logs go.
    #[arg(long, env = "DLB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the service binaries are (default: next to this `dlb`, built there if missing).
    #[arg(long, env = "DLB_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Mutual TLS on every gRPC hop (gateway, control, instances, the dashboard's calls), with
    /// the certificates in --certs-dir (made with `dlb certs init` there when missing).
    #[arg(long)]
    pub tls: bool,
    /// Certificates for --tls (default: `certs` in the state directory).
    #[arg(long, env = "DLB_CERTS_DIR")]
    pub certs_dir: Option<PathBuf>,
}

/// Flags of `dlb down`.
#[derive(Debug, Clone, clap::Args)]
pub struct DownArgs {
    /// The state directory `dlb up` used.
    #[arg(long, env = "DLB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// One process `dlb up` started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    /// `redis`, `control`, `gateway` or `ui`.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22), so a reused pid
    /// is never signalled.
    pub start_ticks: u64,
}

/// What `dlb up` writes to the state file.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct State {
    /// The pid of `dlb up` itself (gone after `--detach`).
    pub up_pid: u32,
    /// Its start time, as for [`Started::start_ticks`].
    #[serde(default)]
    pub up_start_ticks: u64,
    /// Started processes, in start order.
    pub processes: Vec<Started>,
    /// The dashboard's URL.
    pub dashboard: String,
    /// The gateway's address.
    pub gateway: String,
    /// Control's address.
    pub control: String,
    /// The event log's URL, or `none`.
    pub redis: String,
}

/// The default state directory: `$XDG_STATE_HOME/dlb`, `~/.local/state/dlb`, or a temp dir.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("dlb");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/dlb");
    }
    std::env::temp_dir().join("dlb")
}

/// A process's start time (field 22 of `/proc/<pid>/stat`), if it runs.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command come field 3 (state) onwards: field 22 is index 19.
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn alive(process: &Started) -> bool {
    start_ticks(process.pid) == Some(process.start_ticks)
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

fn say(message: impl AsRef<str>) {
    eprintln!("dlb up: {}", message.as_ref());
}

// === ports ===

/// A port `dlb up` needs, with the flag that changes it.
struct PortNeed {
    port: u16,
    what: String,
    flag: &'static str,
}

/// Binds each port once to see that it is free; the first taken one is the error.
fn check_ports(needs: &[PortNeed]) -> Result<(), String> {
    for need in needs {
        if need.port == 0 {
            continue;
        }
        if let Err(error) = StdTcpListener::bind(("127.0.0.1", need.port)) {
            return Err(format!(
                "port {} ({}) is not available: {error}. Choose another with `dlb up {} <PORT>`, \
                 or stop what uses it (`dlb down` stops a mesh started with --detach)",
                need.port, need.what, need.flag
            ));
        }
    }
    Ok(())
}

// === binaries ===

/// This program as a shell word: its absolute path (quoted when it needs to be), so the
/// commands `dlb up` prints paste into any shell, whatever its directory and `PATH`.
fn this_program() -> String {
    std::env::current_exe().map_or_else(|_| "dlb".to_owned(), |exe| shell_word(&exe))
}

/// grpcurl as a shell word: the one the quick start installs into the checkout's `.venv`,
/// when there is one, else `grpcurl` (from `PATH`).
fn grpcurl_program() -> String {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl");
    if venv.exists() {
        shell_word(&venv)
    } else {
        "grpcurl".to_owned()
    }
}

/// `path` as one shell word: as it is when it is made of safe characters only, else quoted.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%".contains(c);
    if text.chars().all(safe) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Finds the service binaries, building them with cargo when some are missing and this `dlb`
/// was built from a checkout that is still there.
pub(crate) fn service_binaries(bin_dir: Option<&Path>) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let dir = match bin_dir {
        Some(dir) => dir.to_path_buf(),
        None => exe
            .parent()
            .map(Path::to_path_buf)
            .ok_or("cannot find this program's directory")?,
    };
    let missing: Vec<&str> = SERVICE_BINARIES
        .iter()
        .copied()
        .filter(|name| !dir.join(name).exists())
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    if bin_dir.is_some() || !checkout.join("Cargo.toml").exists() {
        return Err(format!(
            "{} not found in {}; build them with `cargo build --release` in the dlb checkout, \
             or point --bin-dir at them",
            missing.join(", "),
            dir.display()
        ));
    }
    // Build into the same target directory and profile as this program.
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("release");
    let target_dir = dir.parent().unwrap_or(&dir);
    say(format!(
        "building {} ({profile}) with cargo; the first build takes a few minutes",
        missing.join(", ")
    ));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = std::process::Command::new(&cargo);
    // Under `cargo run`, this process has the variables cargo sets for the program it runs
    // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...). Some build scripts (ring's) are rerun when
    // one of them changes, so handing them down would compile ring and all that depends on
    // it a second time; the build then sees the environment a shell's `cargo build` does.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(cargo_run_variable) {
            build.env_remove(&name);
        }
    }
    build
        .current_dir(checkout)
        .arg("build")
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    for name in SERVICE_BINARIES {
        build.args(["-p", name]);
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e} (is Rust installed?)"))?;
    if !status.success() {
        return Err(format!("building the services failed ({status})"));
    }
    Ok(dir)
}

/// Whether `name` is one of the variables `cargo run` sets for the program it runs.
fn cargo_run_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

// === children ===

/// A service `dlb up` started and watches.
struct Service {
    name: &'static str,
    label: &'static str,
    child: Child,
    started: Started,
}

impl Service {
    /// Spawns `program args` in its own process group, its output either printed with a
    /// `label |` prefix (foreground) or appended to `<log_dir>/<name>.log` (detached).
    fn spawn(
        name: &'static str,
        label: &'static str,
        program: &Path,
        args: &[String],
        log_dir: Option<&Path>,
    ) -> Result<Self, String> {
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null()).process_group(0);
        // TLS and health ports come as flags (with --tls), never from this shell.
        for name in crate::tls::PRIVATE_ENV {
            command.env_remove(name);
        }
        let log = match log_dir {
            Some(dir) => {
                let path = dir.join(format!("{name}.log"));
                let file = std::fs::File::create(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                let copy = file
                    .try_clone()
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                command.stdout(copy).stderr(file);
                Some(path)
            }
            None => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
                None
            }
        };
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        if log.is_none() {
            for stream in [
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ]
            .into_iter()
            .flatten()
            {
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stream).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        eprintln!("{label:>9} | {line}");
                    }
                });
            }
        }
        Ok(Self {
            name,
            label,
            child,
            started: Started {
                name: name.to_owned(),
                pid,
                start_ticks: start_ticks(pid).unwrap_or(0),
            },
        })
    }

    /// The exit status if it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `patience`.
    async fn stop(&mut self, patience: Duration) {
        if self.exited().is_some() {
            return;
        }
        let begun = Instant::now();
        say(format!("stopping {}", self.label));
        signal(self.started.pid, nix::sys::signal::Signal::SIGTERM);
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(_) => say(format!(
                "{} stopped ({:.1} s)",
                self.label,
                begun.elapsed().as_secs_f64()
            )),
            Err(_) => {
                let _ = self.child.kill().await;
                say(format!(
                    "{} did not stop within {} s; killed",
                    self.label,
                    patience.as_secs()
                ));
            }
        }
    }
}

/// Why a service is not ready.
enum Probe {
    /// Not yet: keep waiting.
    NotYet(String),
    /// It will not become ready (an instance crashed): stop waiting.
    Failed(String),
}

/// Polls `check` until it says ready, the child exits, the check fails for good, or the time
/// is up.
async fn wait_ready<F, Fut>(
    service: &mut Service,
    what: &str,
    mut check: F,
) -> Result<String, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, Probe>>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = String::from("no answer yet");
    loop {
        if let Some(status) = service.exited() {
            return Err(format!(
                "{} exited while starting ({status}): {last}",
                service.label
            ));
        }
        match check().await {
            Ok(detail) => return Ok(detail),
            Err(Probe::NotYet(why)) => last = why,
            Err(Probe::Failed(why)) => {
                return Err(format!("{} cannot start: {why}", service.label));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} was not {what} within {} s: {last}",
                service.label,
                START_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn redis_answers(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| format!("--redis {url:?}: {e}"))?;
    let ping = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(crate::call::error_chain(&e)),
        Err(_) => Err("no answer within 1 s".to_owned()),
    }
}

async fn connect(
    addr: &str,
    tls: Option<&crate::tls::ClientTls>,
) -> Result<tonic::transport::Channel, Probe> {
    crate::endpoint::endpoint_tls(addr, tls)
        .map_err(|e| Probe::Failed(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Probe::NotYet(crate::call::error_chain(&e)))
}

async fn grpc_serving(addr: &str, tls: Option<&crate::tls::ClientTls>) -> Result<String, Probe> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(1));
    let status = HealthClient::new(connect(addr, tls).await?)
        .check(request)
        .await
        .map_err(|s| Probe::NotYet(crate::call::status_message(&s)))?
        .into_inner()
        .status();
    if status == ServingStatus::Serving {
        Ok(String::new())
    } else {
        Err(Probe::NotYet(format!(
            "health says {}",
            status.as_str_name()
        )))
    }
}

/// Ready when every instance is SERVING; fails at once when one crashed.
async fn instances_serving(
    addr: &str,
    count: usize,
    tls: Option<&crate::tls::ClientTls>,
) -> Result<String, Probe> {
    let list = ControlClient::new(connect(addr, tls).await?)
        .list_instances(ListInstancesRequest {})
        .await
        .map_err(|s| Probe::NotYet(crate::call::status_message(&s)))?
        .into_inner();
    let describe = |i: &crate::proto::v1::Instance| {
        let mut s = format!("{} {}", i.id, i.state().as_str_name().to_ascii_lowercase());
        if !i.last_error.is_empty() {
            let _ = write!(s, " ({})", i.last_error);
        }
        s
    };
    let serving: Vec<String> = list
        .instances
        .iter()
        .filter(|i| i.state() == InstanceState::Serving)
        .map(|i| format!("{} {}", i.id, i.address))
        .collect();
    if serving.len() >= count {
        return Ok(serving.join(", "));
    }
    if let Some(crashed) = list
        .instances
        .iter()
        .find(|i| i.state() == InstanceState::Crashed)
    {
        return Err(Probe::Failed(describe(crashed)));
    }
    Err(Probe::NotYet(
        list.instances
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

async fn http_ok(addr: SocketAddr, path: &str) -> Result<String, Probe> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(1), exchange).await {
        Ok(Ok(head)) if head.starts_with("HTTP/1.1 200") => Ok(String::new()),
        Ok(Ok(head)) => Err(Probe::NotYet(format!(
            "answered {:?}",
            head.lines().next().unwrap_or("")
        ))),
        Ok(Err(e)) => Err(Probe::NotYet(e.to_string())),
        Err(_) => Err(Probe::NotYet("no answer within 1 s".to_owned())),
    }
}

// === signals ===

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP (terminal closed): each one asks `dlb up` to stop.
struct StopSignals {
    streams: Vec<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
        ]
        .into_iter()
        .filter_map(|kind| signal(kind).ok())
        .collect();
        Self { streams }
    }

    /// Resolves at the next signal.
    async fn next(&mut self) {
        if self.streams.is_empty() {
            std::future::pending::<()>().await;
        }
        let waits: Vec<_> = self
            .streams
            .iter_mut()
            .map(|s| Box::pin(s.recv()))
            .collect();
        let _ = futures_select_all(waits).await;
    }
}

/// The first of `futures` to finish.
async fn futures_select_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> F::Output {
    std::future::poll_fn(|cx| {
        for future in &mut futures {
            if let std::task::Poll::Ready(out) = std::pin::Pin::new(future).poll(cx) {
                return std::task::Poll::Ready(out);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

// === state file ===

fn read_state(path: &Path) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_state(path: &Path, state: &State) -> Result<(), String> {
    let text = serde_json::to_string_pretty(state).map_err(|e| e.to_string())?;
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, text)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

// === up ===

/// Runs `dlb up`.
pub async fn up(args: UpArgs) -> ExitCode {
    let mut signals = StopSignals::new();
    let mut started: Vec<Service> = Vec::new();
    let state_path = state_dir(args.state_dir.as_deref()).join(STATE_FILE);
    // A signal while starting stops what has started so far.
    let outcome = tokio::select! {
        outcome = start_all(&args, &mut started) => outcome,
        () = signals.next() => Err("interrupted while starting".to_owned()),
    };
    let summary = match outcome {
        Ok(summary) => summary,
        Err(message) => {
            say(format!("error: {message}"));
            stop_all(&mut started, &mut signals).await;
            if message.starts_with("interrupted") || !started_any(&state_path) {
                let _ = std::fs::remove_file(&state_path);
            }
            return ExitCode::FAILURE;
        }
    };
    eprintln!("{summary}");
    if args.detach {
        say(format!(
            "running in the background; logs in {}; `dlb down` stops everything",
            state_path.parent().unwrap_or(Path::new(".")).display()
        ));
        return ExitCode::SUCCESS;
    }
    eprintln!("Ctrl-C stops everything (a second Ctrl-C kills at once).");
    let failed = tokio::select! {
        () = signals.next() => None,
        name = first_exit(&mut started) => Some(name),
    };
    match &failed {
        Some(name) => say(format!("{name} exited unexpectedly; stopping the rest")),
        None => eprintln!(),
    }
    stop_all(&mut started, &mut signals).await;
    let _ = std::fs::remove_file(&state_path);
    say("everything stopped");
    if failed.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Whether the state file still names a live process (after a failed start it must not).
fn started_any(state_path: &Path) -> bool {
    read_state(state_path).is_some_and(|state| state.processes.iter().any(alive))
}

fn state_dir(flag: Option<&Path>) -> PathBuf {
    flag.map_or_else(default_state_dir, Path::to_path_buf)
}

/// Resolves when one of the services exits; names it.
async fn first_exit(services: &mut [Service]) -> String {
    loop {
        for service in services.iter_mut() {
            if let Some(status) = service.exited() {
                return format!("{} ({status})", service.label);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops in reverse start order; another signal meanwhile kills what is left at once.
async fn stop_all(services: &mut Vec<Service>, signals: &mut StopSignals) {
    let in_order = async {
        for service in services.iter_mut().rev() {
            let patience = if service.name == "control" {
                CONTROL_STOP_TIMEOUT
            } else {
                STOP_TIMEOUT
            };
            service.stop(patience).await;
        }
    };
    let forced = tokio::select! {
        () = in_order => false,
        () = signals.next() => true,
    };
    if forced {
        say("second signal: killing everything now");
    }
    while let Some(mut service) = services.pop() {
        if service.exited().is_none() {
            // Control's instances notice their parent is gone and stop themselves.
            let _ = service.child.kill().await;
        }
    }
}

/// Records a started process in the state file at once, so that `dlb down` can always find
/// it.
fn record(state: &mut State, path: &Path, service: &Service) -> Result<(), String> {
    state.processes.push(service.started.clone());
    write_state(path, state)
}

async fn start_all(args: &UpArgs, started: &mut Vec<Service>) -> Result<String, String> {
    if args.instances == 0 {
        return Err("--instances must be at least 1".to_owned());
    }
    let state_dir = state_dir(args.state_dir.as_deref());
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        format!(
            "cannot create the state directory {}: {e}",
            state_dir.display()
        )
    })?;
    let state_path = state_dir.join(STATE_FILE);
    if let Some(previous) = read_state(&state_path) {
        if previous.processes.iter().any(alive) {
            return Err(format!(
                "a mesh started by dlb up is already running (dashboard {}); stop it with \
                 `dlb down`",
                if previous.dashboard.is_empty() {
                    "not up yet"
                } else {
                    &previous.dashboard
                }
            ));
        }
        let _ = std::fs::remove_file(&state_path);
    }

    // Every port first, so that a conflict starts nothing.
    let mut needs = vec![
        PortNeed {
            port: args.gateway_port,
            what: "gateway".into(),
            flag: "--gateway-port",
        },
        PortNeed {
            port: args.control_port,
            what: "control".into(),
            flag: "--control-port",
        },
        PortNeed {
            port: args.metrics_port,
            what: "gateway metrics".into(),
            flag: "--metrics-port",
        },
        PortNeed {
            port: args.ui_port,
            what: "dashboard".into(),
            flag: "--ui-port",
        },
    ];
    if args.first_port != 0 {
        for n in 0..args.instances {
            let port = u16::try_from(usize::from(args.first_port) + n)
                .map_err(|_| "--first-port leaves no room for every instance".to_owned())?;
            needs.push(PortNeed {
                port,
                what: format!("compute instance {}", instance_name(n)),
                flag: "--first-port",
            });
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for need in &needs {
        if need.port != 0 && !seen.insert(need.port) {
            return Err(format!(
                "port {} is given for two services ({})",
                need.port, need.what
            ));
        }
    }
    check_ports(&needs)?;

    let bins = service_binaries(args.bin_dir.as_deref())?;
    let log_dir = args.detach.then_some(state_dir.as_path());
    let up_pid = std::process::id();
    let mut state = State {
        up_pid,
        up_start_ticks: start_ticks(up_pid).unwrap_or(0),
        ..State::default()
    };
    let begun = Instant::now();

    // Redis: the configured one, a private one, or none.
    let redis_note;
    let redis_url = if args.redis.trim().eq_ignore_ascii_case("none") {
        redis_note = "off (--redis none)".to_owned();
        "none".to_owned()
    } else {
        match redis_answers(&args.redis).await {
            Ok(()) => {
                redis_note = format!(
                    "{} (already running)",
                    crate::events::redact_url(&args.redis)
                );
                args.redis.clone()
            }
            Err(why) => match private_redis(args, &state_dir, log_dir, &why, started).await? {
                Some(url) => {
                    if let Some(service) = started.last() {
                        record(&mut state, &state_path, service)?;
                    }
                    redis_note = format!("{url} (private redis-server, stopped with the mesh)");
                    url
                }
                None => {
                    redis_note = "off: redis-server is not installed (install it with \
                                  `sudo apt-get install -y redis-server`)"
                        .to_owned();
                    "none".to_owned()
                }
            },
        }
    };
    state.redis = crate::events::redact_url(&redis_url);

    // Certificates for --tls: made once, then reused.
    let certs = if args.tls {
        let dir = args
            .certs_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("certs"));
        if dir.join("ca.pem").exists() {
            say(format!(
                "mutual TLS with the certificates in {}",
                dir.display()
            ));
        } else {
            crate::tls::init(&dir, &[]).map_err(|e| format!("--tls: {e}"))?;
            say(format!(
                "mutual TLS: made a private CA and certificates in {}",
                dir.display()
            ));
        }
        for name in crate::tls::SERVICES {
            crate::tls::args_for(&dir, name)
                .load()
                .map_err(|e| format!("--tls: {e} (remove {} to make new ones)", dir.display()))?;
        }
        Some(dir)
    } else {
        None
    };
    let tls_args = |name: &str| {
        certs
            .as_ref()
            .map(|dir| crate::tls::args_for(dir, name).to_args())
            .unwrap_or_default()
    };
    let client_tls = match &certs {
        Some(dir) => crate::tls::args_for(dir, "client")
            .load()?
            .and_then(|tls| tls.client()),
        None => None,
    };

    // Control and its instances.
    let control_addr = format!("127.0.0.1:{}", args.control_port);
    say(format!(
        "starting control with {} compute instance(s) on {control_addr}",
        args.instances
    ));
    let control_args = vec![
        "--listen".to_owned(),
        control_addr.clone(),
        "--instances".to_owned(),
        args.instances.to_string(),
        "--first-port".to_owned(),
        args.first_port.to_string(),
        "--restart".to_owned(),
        "on-failure".to_owned(),
        "--compute-bin".to_owned(),
        bins.join("dlb-compute").display().to_string(),
        "--redis".to_owned(),
        redis_url.clone(),
    ]
    .into_iter()
    .chain(tls_args("control"))
    // Its instances present compute.pem, not control's certificate.
    .chain(certs.as_ref().map_or_else(Vec::new, |dir| {
        let compute = crate::tls::args_for(dir, "compute");
        let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
        vec![
            "--instance-tls-cert".to_owned(),
            path(compute.tls_cert),
            "--instance-tls-key".to_owned(),
            path(compute.tls_key),
        ]
    }))
    .collect::<Vec<_>>();
    started.push(Service::spawn(
        "control",
        "control",
        &bins.join("dlb-control"),
        &control_args,
        log_dir,
    )?);
    let control = started.last_mut().ok_or("control did not start")?;
    record(&mut state, &state_path, control)?;
    let instances = {
        let addr = control_addr.clone();
        let count = args.instances;
        let tls = client_tls.clone();
        wait_ready(control, "serving every instance", move || {
            let (addr, tls) = (addr.clone(), tls.clone());
            async move { instances_serving(&addr, count, tls.as_ref()).await }
        })
        .await?
    };
    state.control.clone_from(&control_addr);

    // Gateway.
    let gateway_addr = format!("127.0.0.1:{}", args.gateway_port);
    say(format!("starting the gateway on {gateway_addr}"));
    let gateway_args = vec![
        "--listen".to_owned(),
        gateway_addr.clone(),
        "--metrics-listen".to_owned(),
        format!("127.0.0.1:{}", args.metrics_port),
        "--control".to_owned(),
        format!("http://{control_addr}"),
        "--redis".to_owned(),
        redis_url.clone(),
    ]
    .into_iter()
    .chain(tls_args("gateway"))
    .collect::<Vec<_>>();
    started.push(Service::spawn(
        "gateway",
        "gateway",
        &bins.join("dlb-gateway"),
        &gateway_args,
        log_dir,
    )?);
    let gateway = started.last_mut().ok_or("the gateway did not start")?;
    record(&mut state, &state_path, gateway)?;
    wait_ready(gateway, "serving", || {
        grpc_serving(&gateway_addr, client_tls.as_ref())
    })
    .await?;
    state.gateway.clone_from(&gateway_addr);

    // Dashboard.
    let ui_addr = SocketAddr::from(([127, 0, 0, 1], args.ui_port));
    say(format!("starting the dashboard on http://{ui_addr}"));
    let ui_args = vec![
        "--listen".to_owned(),
        ui_addr.to_string(),
        "--gateway".to_owned(),
        gateway_addr.clone(),
        "--control".to_owned(),
        control_addr.clone(),
        "--redis".to_owned(),
        redis_url.clone(),
    ]
    .into_iter()
    .chain(tls_args("ui"))
    .collect::<Vec<_>>();
    started.push(Service::spawn(
        "ui",
        "dashboard",
        &bins.join("dlb-ui"),
        &ui_args,
        log_dir,
    )?);
    let ui = started.last_mut().ok_or("the dashboard did not start")?;
    record(&mut state, &state_path, ui)?;
    wait_ready(ui, "answering", || http_ok(ui_addr, "/healthz")).await?;
    state.dashboard = format!("http://{ui_addr}");
    write_state(&state_path, &state)?;

    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "\ndlb is up ({:.1} s):",
        begun.elapsed().as_secs_f64()
    );
    let _ = writeln!(summary, "  dashboard  http://{ui_addr}");
    let _ = writeln!(
        summary,
        "  gateway    {gateway_addr} (gRPC)   metrics http://127.0.0.1:{}/metrics",
        args.metrics_port
    );
    let _ = writeln!(
        summary,
        "  control    {control_addr} (gRPC)   instances {instances}"
    );
    let _ = writeln!(summary, "  event log  {redis_note}");
    let _ = writeln!(summary, "Try (from any shell):");
    let (dlb, grpcurl) = (this_program(), grpcurl_program());
    match &certs {
        None => {
            let _ = writeln!(
                summary,
                "  {grpcurl} -plaintext -d '{{\"number\": \"97\"}}' {gateway_addr} dlb.v1.Operations/IsPrime"
            );
            let _ = write!(summary, "  {dlb} call --addr {gateway_addr} fib 90");
        }
        Some(dir) => {
            let d = dir.display();
            let _ = writeln!(
                summary,
                "  mutual TLS on every gRPC hop; certificates in {d}"
            );
            let _ = writeln!(
                summary,
                "  {grpcurl} -cacert {d}/ca.pem -cert {d}/client.pem -key {d}/client.key -d '{{\"number\": \"97\"}}' {gateway_addr} dlb.v1.Operations/IsPrime"
            );
            let _ = write!(
                summary,
                "  {dlb} call --tls-ca {d}/ca.pem --tls-cert {d}/client.pem --tls-key {d}/client.key --addr {gateway_addr} fib 90"
            );
        }
    }
    Ok(summary)
}

fn instance_name(index: usize) -> String {
    let letter = |i: usize| char::from(b'A' + u8::try_from(i % 26).unwrap_or(0));
    if index < 26 {
        letter(index).to_string()
    } else {
        format!("{}{}", letter(index / 26 - 1), letter(index % 26))
    }
}

/// Starts a private `redis-server` (no persistence) on the configured URL's port when it is a
/// loopback URL, else on 6379, and pushes it on `started`; `None` when redis-server is not
/// installed.
async fn private_redis(
    args: &UpArgs,
    state_dir: &Path,
    log_dir: Option<&Path>,
    why: &str,
    started: &mut Vec<Service>,
) -> Result<Option<String>, String> {
    let shown = crate::events::redact_url(&args.redis);
    let Some(program) = find_on_path("redis-server") else {
        say(format!(
            "no Redis at {shown} ({why}) and redis-server is not installed: running WITHOUT \
             the event log. Install it with `sudo apt-get install -y redis-server`"
        ));
        return Ok(None);
    };
    let port = redis::parse_redis_url(&args.redis)
        .filter(|u| matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")))
        .and_then(|u| u.port())
        .unwrap_or(6379);
    check_ports(&[PortNeed {
        port,
        what: "private Redis".into(),
        flag: "--redis redis://127.0.0.1:<PORT>",
    }])?;
    let dir = state_dir.join("redis");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    say(format!(
        "no Redis at {shown} ({why}); starting a private redis-server on 127.0.0.1:{port} \
         (no persistence)"
    ));
    let redis_args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    started.push(Service::spawn(
        "redis",
        "redis",
        &program,
        &redis_args,
        log_dir,
    )?);
    let service = started.last_mut().ok_or("redis did not start")?;
    let url = format!("redis://127.0.0.1:{port}");
    wait_ready(service, "answering PING", || async {
        redis_answers(&url)
            .await
            .map(|()| String::new())
            .map_err(Probe::NotYet)
    })
    .await?;
    Ok(Some(url))
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// === down ===

/// Stops one process: SIGTERM, then SIGKILL after `patience`. False if it survived.
async fn terminate(process: &Started, patience: Duration) -> bool {
    eprintln!("dlb down: stopping {} (pid {})", process.name, process.pid);
    signal(process.pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + patience;
    while alive(process) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !alive(process) {
        return true;
    }
    signal(process.pid, nix::sys::signal::Signal::SIGKILL);
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!(
        "dlb down: {} did not stop within {} s; killed",
        process.name,
        patience.as_secs()
    );
    !alive(process)
}

/// Runs `dlb down`: asks a running `dlb up` to stop everything (it knows the order), then
/// stops whatever the state file still lists as running, newest first, and removes the file.
pub async fn down(args: DownArgs) -> ExitCode {
    let path = state_dir(args.state_dir.as_deref()).join(STATE_FILE);
    let Some(state) = read_state(&path) else {
        eprintln!(
            "dlb down: nothing to stop (no state file at {})",
            path.display()
        );
        return ExitCode::SUCCESS;
    };
    let mut failed = false;
    let up = Started {
        name: "dlb up".to_owned(),
        pid: state.up_pid,
        start_ticks: state.up_start_ticks,
    };
    if state.up_start_ticks != 0 && alive(&up) {
        // Control drains first, then the rest: give it all that time.
        let patience = CONTROL_STOP_TIMEOUT + STOP_TIMEOUT * 3;
        failed |= !terminate(&up, patience).await;
    }
    for process in state.processes.iter().rev() {
        if !alive(process) {
            continue;
        }
        let patience = if process.name == "control" {
            CONTROL_STOP_TIMEOUT
        } else {
            STOP_TIMEOUT
        };
        failed |= !terminate(process, patience).await;
    }
    let _ = std::fs::remove_file(&path);
    if failed {
        eprintln!("dlb down: some processes are still running");
        ExitCode::FAILURE
    } else {
        eprintln!("dlb down: everything stopped");
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_read_and_a_missing_pid_has_none() {
        assert!(start_ticks(std::process::id()).is_some());
        assert_eq!(start_ticks(u32::MAX), None);
    }

    #[test]
    fn a_taken_port_names_itself_and_its_flag() {
        let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let error = check_ports(&[PortNeed {
            port,
            what: "gateway".into(),
            flag: "--gateway-port",
        }])
        .unwrap_err();
        assert!(error.contains(&format!("port {port} (gateway)")), "{error}");
        assert!(error.contains("--gateway-port"), "{error}");
    }

    #[test]
    fn instance_names_follow_control() {
        assert_eq!(instance_name(0), "A");
        assert_eq!(instance_name(25), "Z");
        assert_eq!(instance_name(26), "AA");
    }
}
