//! The `dlb` binary as a user runs it, against real compute instances on port 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use dlb_compute::Config;

async fn dlb(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_dlb"))
            .args(&args)
            .output()
            .expect("run dlb")
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_prints_result_server_and_latency() {
    let compute = dlb_compute::testing::start(Config::for_tests("A"))
        .await
        .unwrap();
    let addr = compute.addr.to_string();

    let out = dlb(strings(&["call", "--addr", &addr, "prime", "97"])).await;
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("97 is prime (proven)"), "{text}");
    assert!(text.contains("served by A"), "{text}");

    let out = dlb(strings(&["call", "--addr", &addr, "fib", "94"])).await;
    assert!(stdout(&out).contains("F(94) = 19740274219868223167 (20 digits)"));

    let out = dlb(strings(&[
        "call",
        "--addr",
        &addr,
        "wc",
        "the cat the hat",
        "--top",
        "1",
    ]))
    .await;
    let text = stdout(&out);
    assert!(
        text.contains("words 4") && text.contains("2  the"),
        "{text}"
    );

    let out = dlb(strings(&[
        "call",
        "--addr",
        &addr,
        "--json",
        "reverse",
        "e\u{301}a",
    ]))
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["result"]["text"], "ae\u{301}");
    assert_eq!(json["served_by"], "A");
    assert!(json["latency_us"].as_u64().unwrap() > 0);

    let out = dlb(strings(&[
        "call",
        "--addr",
        &addr,
        "palindrome",
        "--normalize",
        "Racecar",
    ]))
    .await;
    assert!(stdout(&out).contains("is a palindrome"));

    compute.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_reports_errors_with_code_and_exit_status() {
    let compute = dlb_compute::testing::start(Config::for_tests("A"))
        .await
        .unwrap();
    let addr = compute.addr.to_string();

    let out = dlb(strings(&["call", "--addr", &addr, "prime", "12a"])).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("number"),
        "{err}"
    );

    let out = dlb(strings(&[
        "call",
        "--addr",
        &addr,
        "--json",
        "fib",
        "99999999999",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["code"], "INVALID_ARGUMENT");

    // A deadline shorter than the work: DEADLINE_EXCEEDED, whoever noticed first.
    let out = dlb(strings(&[
        "call",
        "--addr",
        &addr,
        "--json",
        "--timeout",
        "0.05",
        "fib",
        "10000000",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["code"], "DEADLINE_EXCEEDED", "{json}");

    // Nothing listens on port 1 of loopback.
    let out = dlb(strings(&["call", "--addr", "127.0.0.1:1", "prime", "7"])).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("UNAVAILABLE") && err.contains("refused"),
        "{err}"
    );

    let out = dlb(strings(&["call", "--addr", "ftp://x:1", "prime", "7"])).await;
    assert_eq!(out.status.code(), Some(2));

    compute.shutdown().await.unwrap();
}

/// A server that never answers: the call ends at its own deadline, said as such (not as
/// tonic's "Timeout expired: transport error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_nobody_answers_ends_at_its_deadline_said_plainly() {
    // Accepts connections (the kernel does) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = dlb(strings(&[
        "call",
        "--addr",
        &addr,
        "--timeout",
        "0.2",
        "prime",
        "7",
    ]))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("DEADLINE_EXCEEDED: no answer within 200ms, this call's deadline"),
        "{err}"
    );
    drop(silent);
}

/// Flags that cannot work are said as such, before anything is dialled: not as "connection
/// refused", a parser's "unexpected argument", or a run of nothing that exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_addresses_deadlines_and_durations_are_refused_with_the_reason() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["call", "--addr", "127.0.0.1:99999", "prime", "7"],
            "\"99999\" is not a port number",
        ),
        (
            &["call", "--addr", "127.0.0.1", "prime", "7"],
            "\"127.0.0.1\" has no port",
        ),
        (
            &["health", "--addr", "127.0.0.1:99999"],
            "\"99999\" is not a port number",
        ),
        (
            &["bench", "--addr", "localhost", "-n", "1"],
            "\"localhost\" has no port",
        ),
        (
            &["call", "--timeout", "0", "prime", "7"],
            "--timeout must be a positive number of seconds, got 0",
        ),
        (
            &["call", "--timeout", "-1", "prime", "7"],
            "--timeout must be a positive number of seconds, got -1",
        ),
        (
            &["health", "--timeout", "-0.5"],
            "--timeout must be a positive number of seconds, got -0.5",
        ),
        (
            &["bench", "-d", "0"],
            "--duration must be a positive number of seconds, got 0",
        ),
        (
            &["bench", "--warmup", "-1", "-n", "1"],
            "--warmup must be a non-negative number of seconds, got -1",
        ),
    ];
    for (args, says) in cases {
        let out = dlb(strings(args)).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_requests_and_splits_by_instance() {
    let a = dlb_compute::testing::start(Config::for_tests("A"))
        .await
        .unwrap();
    let b = dlb_compute::testing::start(Config::for_tests("B"))
        .await
        .unwrap();
    let addrs = format!("{},{}", a.addr, b.addr);

    let out = dlb(strings(&[
        "bench",
        "--addr",
        &addrs,
        "-c",
        "4",
        "--connections",
        "2",
        "-n",
        "400",
        "--warmup",
        "0",
        "--json",
        "-q",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["requests"], 400);
    assert_eq!(report["ok"], 400);
    assert_eq!(report["connections"], 4);
    // Workers are spread over both addresses; a shared count bound decides who sends how many.
    let a_count = report["per_instance"]["A"].as_u64().unwrap();
    let b_count = report["per_instance"]["B"].as_u64().unwrap();
    assert!(a_count > 0 && b_count > 0, "{report}");
    assert_eq!(a_count + b_count, 400);
    let latency = &report["latency"];
    assert!(latency["p50_us"].as_f64().unwrap() > 0.0);
    assert!(latency["p50_us"].as_f64() <= latency["p99_us"].as_f64());
    assert!(latency["p99_us"].as_f64() <= latency["max_us"].as_f64());

    // Open loop at a fixed rate, bounded by count.
    let out = dlb(strings(&[
        "bench", "--addr", &addrs, "--rate", "400", "-n", "200", "--warmup", "0", "--json", "-q",
        "--op", "prime", "--input", "97",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "open");
    assert_eq!(report["requests"], 200);
    assert_eq!(report["op"], "prime");

    // Errors are counted by code, not hidden.
    let out = dlb(strings(&[
        "bench", "--addr", &addrs, "-c", "2", "-n", "50", "--warmup", "0", "--json", "-q", "--op",
        "prime", "--input", "x1",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1), "nothing succeeded");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], 0);
    assert_eq!(report["errors"]["INVALID_ARGUMENT"], 50);

    // The human report has the headline numbers.
    let out = dlb(strings(&[
        "bench", "--addr", &addrs, "-c", "2", "-n", "20", "--warmup", "0", "-q",
    ]))
    .await;
    let text = stdout(&out);
    assert!(
        text.contains("throughput") && text.contains("p99.9") && text.contains("instances   A "),
        "{text}"
    );

    // A bad setting or an unreachable address is a clear error, exit 2.
    let out = dlb(strings(&[
        "bench",
        "--addr",
        "127.0.0.1:1",
        "-n",
        "1",
        "-q",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to 127.0.0.1:1") && err.contains("refused"),
        "{err}"
    );
    let out = dlb(strings(&["bench", "--addr", &addrs, "--rate", "-5", "-q"])).await;
    assert_eq!(out.status.code(), Some(2));

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
