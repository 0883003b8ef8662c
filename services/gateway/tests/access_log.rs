//! The gateway's access log (`--access-log FILE`): one JSON line per call, lossless under
//! load, bad inputs and an instance SIGKILLed mid-run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dlb::client::bench::{self, Progress};
use dlb::proto::v1::{IsPrimeRequest, ReverseRequest, operations_client::OperationsClient};
use dlb::server::access_log::Target;
use dlb_gateway::Config;
use dlb_gateway::testing::RunningGateway;
use serde_json::Value;
use support::{ComputeProcess, PATIENCE, wait_serving};
use tonic::transport::Channel;

const GOOD: u64 = 99_000;
const BAD: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_exactly_one_line_through_bad_inputs_and_a_sigkill() {
    let path = std::env::temp_dir().join(format!(
        "dlb-access-log-{}-{}.jsonl",
        std::process::id(),
        dlb::testing::free_port()
    ));
    let mut computes: Vec<ComputeProcess> = ["A", "B", "C"]
        .iter()
        .map(|id| ComputeProcess::start_with(&[], id, "127.0.0.1:0", &["--redis", "none"]))
        .collect();
    let mut config = Config::for_tests(vec![]);
    config.access_log = Some(Target::File(path.clone()));
    let backends = computes.iter().map(ComputeProcess::backend).collect();
    let gateway = RunningGateway::start(config, backends, false)
        .await
        .unwrap();
    let gw = Channel::from_shared(gateway.uri()).unwrap().connect_lazy();
    wait_serving(&gw, &["A", "B", "C"], PATIENCE).await;

    // One call carrying a W3C traceparent: its trace id is on its line.
    let mut traced = tonic::Request::new(ReverseRequest {
        text: "traced".into(),
    });
    traced.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    OperationsClient::new(gw.clone())
        .reverse(traced)
        .await
        .unwrap();

    // 99,000 good calls at c=64 (B SIGKILLed a fifth of the way), and 1,000 bad inputs
    // alongside.
    let progress = Arc::new(Progress::default());
    let load = bench::BenchConfig {
        duration: Duration::from_secs(600),
        ..dlb::testing::load(gateway.addr, 64, GOOD)
    };
    let good = tokio::spawn(bench::run(load, Arc::clone(&progress)));
    let bad = tokio::spawn({
        let gw = gw.clone();
        async move {
            let mut refused = 0;
            for _ in 0..BAD {
                let status = OperationsClient::new(gw.clone())
                    .is_prime(IsPrimeRequest {
                        number: "12x".into(),
                    })
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
                refused += 1;
            }
            refused
        }
    });
    tokio::time::timeout(Duration::from_secs(120), async {
        while progress.completed.load(Ordering::Relaxed) < GOOD / 5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    computes[1].signal_and_wait("KILL");
    let report = good.await.unwrap().unwrap();
    assert_eq!(bad.await.unwrap(), BAD);
    assert_eq!(report.ok, GOOD, "{:?}", report.errors);
    gateway.shutdown().await.unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    let mut by_method: BTreeMap<(String, String), u64> = BTreeMap::new();
    for line in &lines {
        let key = (
            line["method"].as_str().unwrap().to_owned(),
            line["status"].as_str().unwrap().to_owned(),
        );
        *by_method.entry(key).or_default() += 1;
    }
    let count = |method: &str, status: &str| {
        by_method
            .get(&(format!("/dlb.v1.Operations/{method}"), status.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    // Exactly one line per call: the good ones (and the traced one) OK, the bad ones refused,
    // nothing else of the operations.
    assert_eq!(count("Reverse", "OK"), GOOD + 1, "{by_method:?}");
    assert_eq!(count("IsPrime", "INVALID_ARGUMENT"), BAD, "{by_method:?}");
    let operations: u64 = by_method
        .iter()
        .filter(|((method, _), _)| method.starts_with("/dlb.v1.Operations/"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(operations, GOOD + 1 + BAD, "{by_method:?}");

    // The calls B's death interrupted went again elsewhere: attempts > 1, answered by A or C
    // with what that call gets anywhere (a bad input in flight on B is refused by A or C).
    let retried: Vec<&Value> = lines
        .iter()
        .filter(|l| l["attempts"].as_u64().unwrap_or(0) > 1)
        .collect();
    assert!(
        !retried.is_empty(),
        "no retried call among {} lines",
        lines.len()
    );
    for line in &retried {
        let expected = if line["method"] == "/dlb.v1.Operations/IsPrime" {
            "INVALID_ARGUMENT"
        } else {
            "OK"
        };
        assert_eq!(line["status"], expected, "{line}");
        assert!(line["instance"] == "A" || line["instance"] == "C", "{line}");
    }

    // Every line says who, what and how much.
    for line in lines
        .iter()
        .filter(|l| l["method"] == "/dlb.v1.Operations/Reverse")
    {
        assert!(
            line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        assert!(line["latency_us"].as_u64().unwrap() > 0, "{line}");
        assert!(line["request_bytes"].as_u64().unwrap() > 5, "{line}");
        assert!(line["response_bytes"].as_u64().unwrap() > 5, "{line}");
        assert!(line["ts"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    let traced: Vec<&Value> = lines
        .iter()
        .filter(|l| l["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        .collect();
    assert_eq!(traced.len(), 1, "the traced call's line");
    assert_eq!(traced[0]["status"], "OK");

    drop(computes);
    let _ = std::fs::remove_file(&path);
}

/// A log, a trace export or a control address that cannot work stops the start, said before
/// the gateway says it listens (a script that waits for "listening on" must not take it for
/// started), with nothing left bound.
#[test]
fn an_access_log_otlp_endpoint_or_control_that_cannot_work_stops_the_start() {
    // A directory of this test's own: the log cannot be a directory, nor be in a missing one.
    let dir = std::env::temp_dir().join(format!("dlb-access-log-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such-dir").join("access.log");
    let missing = missing.to_str().unwrap();
    let a_dir = dir.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (args, says) in [
        (vec!["--access-log", missing], "cannot open it"),
        (vec!["--access-log", a_dir], "cannot open it"),
        (
            vec!["--otlp-endpoint", "ftp://collector:4317"],
            "use http://",
        ),
        (vec!["--otlp-endpoint", "collector"], "give HOST:PORT"),
        (vec!["--otlp-endpoint", "collector:0"], "give HOST:PORT"),
        (vec!["--control", "ctl.internal"], "has no port"),
        (
            vec!["--control", "http://ctl.internal:99999"],
            "is not a port number",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dlb-gateway"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--redis", "none"])
            .args(["--metrics-listen", "none", "--backend", "A=127.0.0.1:1"])
            .args(&args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stdout.contains("listening"), "{args:?}: {stdout}");
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "{args:?}: the port was left bound"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
