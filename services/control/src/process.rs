//! One compute process: spawning it (no shell), learning its address, signals, and what
//! `/proc` says about its CPU and memory.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Lines of a process's stderr kept for error messages.
const STDERR_LINES: usize = 5;

/// How long an exit's report waits for the last stderr lines: the pipe ends when the process
/// does, unless something it started still holds it.
const STDERR_END_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The last lines a process wrote to stderr.
#[derive(Debug, Clone, Default)]
pub struct StderrTail(Arc<Tail>);

#[derive(Debug, Default)]
struct Tail {
    lines: Mutex<VecDeque<String>>,
    /// The reader has seen the pipe's end.
    ended: std::sync::atomic::AtomicBool,
    ending: tokio::sync::Notify,
}

impl StderrTail {
    /// The kept lines, joined.
    pub fn text(&self) -> String {
        let lines = self.0.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// The kept lines once the pipe has ended (the process's last words, a panic's message,
    /// are read by then), or after [`STDERR_END_WAIT`] at most.
    pub async fn last_text(&self) -> String {
        let ended = async {
            loop {
                let notified = self.0.ending.notified();
                if self.0.ended.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(STDERR_END_WAIT, ended).await;
        self.text()
    }

    fn push(&self, line: String) {
        let mut lines = self.0.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == STDERR_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn end(&self) {
        self.0
            .ended
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.ending.notify_waiters();
    }
}

/// A spawned `dlb-compute`.
#[derive(Debug)]
pub struct Spawned {
    /// The child; killed if dropped.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// The address it reported.
    pub addr: String,
    /// Its last stderr lines.
    pub stderr: StderrTail,
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The binary could not be executed.
    #[error("cannot run {bin}: {source} (set --compute-bin)")]
    Exec {
        /// The binary.
        bin: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process exited before it listened.
    #[error("exited before listening: {stderr}")]
    Exited {
        /// What it said.
        stderr: String,
    },
}

/// Spawns `bin --id ID --listen LISTEN ...` directly, and waits for its "listening on" line.
///
/// # Errors
///
/// [`SpawnError`] when it cannot run or exits before listening.
pub async fn spawn(
    bin: &Path,
    id: &str,
    listen: &str,
    redis: &str,
    extra: &[String],
) -> Result<Spawned, SpawnError> {
    let mut command = Command::new(bin);
    command
        .args([
            "--id",
            id,
            "--listen",
            listen,
            "--redis",
            redis,
            "--exit-with-parent",
        ])
        .args(extra);
    // TLS, registration and health ports come as flags: nothing of ours leaks in from the
    // environment (a health port inherited by every instance would clash).
    for name in dlb::tls::PRIVATE_ENV
        .iter()
        .chain(&["DLB_COMPUTE_REGISTER", "DLB_COMPUTE_ADVERTISE"])
    {
        command.env_remove(name);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SpawnError::Exec {
            bin: bin.display().to_string(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    let stderr = StderrTail::default();
    if let Some(err) = child.stderr.take() {
        // Drain stderr for good, so the child never blocks on a full pipe.
        let tail = stderr.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tail.push(line);
            }
            tail.end();
        });
    }
    let mut addr = None;
    if let Some(out) = child.stdout.take() {
        let mut lines = BufReader::new(out).lines();
        if let Ok(Some(line)) = lines.next_line().await {
            // "dlb-compute <id> listening on <addr>"
            addr = line
                .split_once(" listening on ")
                .map(|(_, a)| a.trim().to_owned());
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    }
    match addr {
        Some(addr) => Ok(Spawned {
            child,
            pid,
            addr,
            stderr,
        }),
        None => {
            let _ = child.wait().await;
            Err(SpawnError::Exited {
                stderr: stderr.last_text().await,
            })
        }
    }
}

/// Sends SIGTERM (`force` false) or SIGKILL.
pub fn signal(pid: u32, force: bool) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if raw <= 0 {
        return;
    }
    let signal = if force {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    let _ = kill(Pid::from_raw(raw), signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report of an exit waits for the pipe's end, so the last line (a panic's message,
    /// written just before the exit) is in it.
    #[tokio::test]
    async fn the_last_stderr_line_is_read_before_the_exit_is_reported() {
        let tail = StderrTail::default();
        tail.push("INFO listening".to_owned());
        let reader = tail.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            reader.push("panic: out of widgets".to_owned());
            reader.end();
        });
        assert_eq!(tail.text(), "INFO listening");
        assert_eq!(
            tail.last_text().await,
            "INFO listening | panic: out of widgets"
        );
        // Once ended, at once.
        assert_eq!(
            tail.last_text().await,
            "INFO listening | panic: out of widgets"
        );
    }
}
