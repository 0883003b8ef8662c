//! A runtime per thread (`--threads N`, see `dlb_gateway::runtimes`), in a real `dlb-gateway`
//! process over real `dlb-compute` processes: the callers' connections are served on every
//! runtime, the rotation stays one rotation across them, and SIGTERM still drains and exits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use dlb::proto::v1::ReverseRequest;
use dlb::proto::v1::operations_client::OperationsClient;
use dlb::testing::PATIENCE;
use support::{ComputeProcess, channel, gateway_process, wait_serving};

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_every_runtime_share_one_rotation_and_sigterm_still_drains() {
    let computes: Vec<ComputeProcess> = ["A", "B", "C"]
        .iter()
        .map(|id| ComputeProcess::start(id, "127.0.0.1:0"))
        .collect();
    let backends: Vec<(&str, &str)> = computes
        .iter()
        .map(|c| (c.id.as_str(), c.addr.as_str()))
        .collect();
    let (mut gateway, addr) = gateway_process(
        &backends,
        &[
            "--threads",
            "3",
            "--policy",
            "round-robin",
            "--redis",
            "none",
        ],
        &[],
    );
    let pid = gateway.0.id();
    // A new thread has its creator's name until it has run and named itself.
    let started = std::time::Instant::now();
    let mut names = thread_names(pid);
    while !["dlb-gateway-1", "dlb-gateway-2"]
        .iter()
        .all(|worker| names.iter().any(|n| n == worker))
    {
        assert!(
            started.elapsed() < PATIENCE,
            "no thread per runtime: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        names = thread_names(pid);
    }
    let uri = format!("http://{addr}");
    let first = channel(&uri).await;
    wait_serving(&first, &["A", "B", "C"], PATIENCE).await;

    // Six connections of their own (a tonic channel is one connection), taken in turn by the
    // three runtimes; calls one after another, each on the next connection.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(OperationsClient::new(channel(&uri).await));
    }
    let mut served = Vec::new();
    for i in 0..60 {
        let count = clients.len();
        let response = clients[i % count]
            .reverse(ReverseRequest {
                text: "hello".into(),
            })
            .await
            .unwrap();
        let by = response.metadata().get("x-served-by").unwrap();
        served.push(by.to_str().unwrap().to_owned());
        assert_eq!(response.into_inner().text, "olleh");
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for by in &served {
        *counts.entry(by.as_str()).or_default() += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([("A", 20), ("B", 20), ("C", 20)]),
        "{served:?}"
    );
    assert!(
        served
            .windows(3)
            .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2]),
        "not one rotation across the runtimes: {served:?}"
    );

    // SIGTERM: the drain ends every runtime and the process exits 0.
    drop(clients);
    drop(first);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = gateway.0.wait().unwrap();
        (status, gateway)
    });
    let (status, _gateway) = tokio::time::timeout(Duration::from_secs(20), exited)
        .await
        .expect("the gateway exits within 20 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
