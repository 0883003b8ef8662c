//! Shared fixtures of the gateway tests: compute instances as real child processes or
//! in-process servers, a gateway on port 0, and waiting on the gateway's own stats.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod interop;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dlb::proto::v1::{StatsRequest, StatsResponse, gateway_client::GatewayClient};
use dlb_gateway::config::Backend;
use tonic::transport::Channel;

// Not every test binary that includes this module uses both.
#[allow(unused_imports)]
pub use dlb::testing::{PATIENCE, channel};

/// The `dlb-compute` binary, built on demand when this package's tests run alone.
pub fn compute_binary() -> PathBuf {
    dlb::testing::workspace_binary("dlb-compute")
}

/// A `dlb-compute` child process; killed on drop so none outlives the test.
pub struct ComputeProcess {
    pub id: String,
    pub addr: String,
    child: Option<Child>,
    /// Runs the binary (e.g. `ip netns exec NS`), if anything.
    launcher: Vec<String>,
    /// Flags beyond --id and --listen.
    flags: Vec<String>,
}

impl ComputeProcess {
    /// Starts `dlb-compute --id ID --listen LISTEN` and waits for its "listening" line.
    pub fn start(id: &str, listen: &str) -> Self {
        Self::start_with(&[], id, listen, &["--redis", "none"])
    }

    /// Starts `LAUNCHER... dlb-compute --id ID --listen LISTEN FLAGS...` and waits for its
    /// "listening" line. The launcher must exec the binary (its pid is the instance's).
    pub fn start_with(launcher: &[&str], id: &str, listen: &str, flags: &[&str]) -> Self {
        let launcher: Vec<String> = launcher.iter().map(|s| (*s).to_owned()).collect();
        let flags: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(compute_binary());
                command
            }
            None => Command::new(compute_binary()),
        };
        let mut child = command
            .args(["--id", id, "--listen", listen])
            .args(&flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dlb-compute");
        let addr = dlb::testing::listening_addr(&mut child);
        Self {
            id: id.to_owned(),
            addr,
            child: Some(child),
            launcher,
            flags,
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ID=ADDR` for the gateway.
    pub fn backend(&self) -> Backend {
        Backend {
            id: self.id.clone(),
            addr: self.addr.clone(),
        }
    }

    /// Sends a signal (`KILL` or `TERM`) and waits for the process to end.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap()
    }

    /// Starts the same instance again on the same address.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        let launcher: Vec<&str> = self.launcher.iter().map(String::as_str).collect();
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let again = Self::start_with(&launcher, &self.id, &self.addr, &flags);
        *self = again;
    }
}

impl Drop for ComputeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The gateway's stats now.
pub async fn stats(gateway: &Channel) -> StatsResponse {
    GatewayClient::new(gateway.clone())
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The state of instance `id` as the gateway sees it.
pub async fn state_of(gateway: &Channel, id: &str) -> String {
    stats(gateway)
        .await
        .instances
        .into_iter()
        .find(|i| i.instance == id)
        .map(|i| i.state)
        .unwrap_or_default()
}

/// Waits until the gateway sees exactly these instances serving.
pub async fn wait_serving(gateway: &Channel, ids: &[&str], bound: Duration) {
    let mut want: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    tokio::time::timeout(bound, async {
        loop {
            let mut serving: Vec<String> = stats(gateway)
                .await
                .instances
                .into_iter()
                .filter(|i| i.state == "serving")
                .map(|i| i.instance)
                .collect();
            serving.sort();
            if serving == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("instances {want:?} serving within {bound:?}"));
}

/// Who served each of `n` sequential `Reverse("hello")` calls through `gw` (each answer
/// checked).
pub async fn served_by(gw: &Channel, n: usize) -> std::collections::BTreeMap<String, usize> {
    use dlb::proto::v1::{ReverseRequest, operations_client::OperationsClient};
    let mut client = OperationsClient::new(gw.clone());
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let response = client
            .reverse(ReverseRequest {
                text: "hello".into(),
            })
            .await
            .unwrap();
        let by = response.metadata().get("x-served-by").unwrap();
        *counts.entry(by.to_str().unwrap().to_owned()).or_default() += 1;
        assert_eq!(response.into_inner().text, "olleh");
    }
    counts
}

/// A `dlb-gateway` process (plaintext on 127.0.0.1 port 0, no `/metrics`, health checks every
/// 200 ms) over `backends` (`(id, address)`), with `flags` and `env`; killed on drop. Gives it
/// and its address.
pub fn gateway_process(
    backends: &[(&str, &str)],
    flags: &[&str],
    env: &[(&str, &str)],
) -> (dlb::testing::KillOnDrop, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dlb-gateway"));
    command
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "none"])
        .args(["--health-interval-ms", "200"])
        .args(flags)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (id, addr) in backends {
        command.args(["--backend", &format!("{id}={addr}")]);
    }
    let mut child = dlb::testing::KillOnDrop(command.spawn().unwrap());
    let addr = dlb::testing::listening_addr(&mut child.0);
    (child, addr)
}
