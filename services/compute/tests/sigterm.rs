//! The real `dlb-compute` binary drains on SIGTERM: health turns NOT_SERVING, the in-flight call
//! still completes OK, and the process exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use dlb::proto::v1::{FibonacciRequest, operations_client::OperationsClient};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use dlb::testing::{KillOnDrop, PATIENCE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_dlb-compute"))
            // A long grace period: the slow call must finish however loaded the machine is.
            .args([
                "--listen",
                "127.0.0.1:0",
                "--id",
                "T",
                "--grace-period-secs",
                "120",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dlb-compute"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    // "dlb-compute T listening on 127.0.0.1:PORT"
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(line.contains("listening on"), "{line:?}");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut client = OperationsClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let slow = tokio::spawn(async move {
        client
            .fibonacci(FibonacciRequest { n: 10_000_000 })
            .await
            .map(|r| r.into_inner().digits)
    });
    dlb_compute::testing::wait_busy(&channel).await;

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut health = HealthClient::new(channel.clone());
    tokio::time::timeout(PATIENCE, async {
        loop {
            let reply = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            if reply.status() == ServingStatus::NotServing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("health turns NOT_SERVING after SIGTERM");
    assert!(
        !slow.is_finished(),
        "the slow call is still running while draining"
    );

    let digits = tokio::time::timeout(PATIENCE, slow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(digits, 2_089_877);

    let exit = tokio::task::spawn_blocking(move || {
        let status = child.0.wait();
        (status, child)
    });
    let (status, _child) = tokio::time::timeout(PATIENCE, exit).await.unwrap().unwrap();
    assert_eq!(status.unwrap().code(), Some(0));
}
