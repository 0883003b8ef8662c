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

mod children;
mod start;

use self::children::Service;
pub(crate) use self::start::service_binaries;
use self::start::start_all;
use crate::process::{signal, start_ticks};

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

use dlb::proto::v1::control_client::ControlClient;
use dlb::proto::v1::{InstanceState, ListInstancesRequest};

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
    #[arg(long, env = "DLB_REDIS_URL", default_value = dlb::events::DEFAULT_REDIS_URL)]
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
    /// With --tls: certificates of this role (made with `dlb certs issue NAME --role ROLE`) may
    /// start, stop, add and remove instances at control, as the dashboard may (repeat for
    /// several roles).
    #[arg(long = "operator", value_name = "ROLE", requires = "tls")]
    pub operators: Vec<String>,
    /// Tracing: every service (and the instances) exports spans to this collector.
    #[command(flatten)]
    pub trace: dlb::trace::TraceArgs,
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

fn alive(process: &Started) -> bool {
    start_ticks(process.pid) == Some(process.start_ticks)
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

fn say(message: impl AsRef<str>) {
    eprintln!("dlb up: {}", message.as_ref());
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
        // The command that finds this mesh: with its state directory when it is not the
        // default one.
        let down = match &args.state_dir {
            // Absolute: the hint works from any directory.
            Some(dir) => format!(
                "dlb down --state-dir {}",
                shell_word(
                    &std::path::absolute(dir)
                        .unwrap_or_else(|_| dir.clone())
                        .display()
                        .to_string()
                )
            ),
            None => "dlb down".to_owned(),
        };
        say(format!(
            "running in the background; logs in {}; `{down}` stops everything",
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

/// `text` as one shell word: as it is when it holds nothing the shell reads, else in single
/// quotes.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@%,".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
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
            "dlb down: nothing to stop (no state file at {}; a mesh started with `dlb up \
             --state-dir DIR` is stopped with `dlb down --state-dir DIR`)",
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
    use super::shell_word;

    #[test]
    fn a_path_is_said_as_one_shell_word() {
        assert_eq!(shell_word("/tmp/dlb-state"), "/tmp/dlb-state");
        assert_eq!(shell_word("/tmp/my state"), "'/tmp/my state'");
        assert_eq!(shell_word("/tmp/it's"), r"'/tmp/it'\''s'");
        assert_eq!(shell_word("/tmp/$HOME"), "'/tmp/$HOME'");
        assert_eq!(shell_word(""), "''");
    }
}
