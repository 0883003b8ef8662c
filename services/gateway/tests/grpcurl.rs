//! grpcurl 1.8.6 (reflection v1alpha only) against the gateway: list, describe, health, every
//! operation, and `-v` shows `x-served-by` and `x-attempts`. Fails (never skips) without grpcurl.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dlb_gateway::Config;
use dlb_gateway::config::Backend;
use dlb_gateway::testing::RunningGateway;
use support::{PATIENCE, channel, wait_serving};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_talks_to_the_gateway() {
    let mut computes = Vec::new();
    let mut backends = Vec::new();
    for id in ["A", "B"] {
        let c = dlb_compute::testing::start(dlb_compute::Config::for_tests(id))
            .await
            .unwrap();
        backends.push(Backend {
            id: id.into(),
            addr: c.addr.to_string(),
        });
        computes.push(c);
    }
    let gateway = RunningGateway::start(Config::for_tests(vec![]), backends, false)
        .await
        .unwrap();
    wait_serving(&channel(&gateway.uri()).await, &["A", "B"], PATIENCE).await;
    let addr = gateway.addr.to_string();
    let addr = addr.as_str();

    let list = dlb::testing::grpcurl_ok(&["-plaintext", addr, "list"]).await;
    // The gateway's own services, and its instances' (dlb.v1.Load is compute's only).
    for service in [
        "dlb.v1.Operations",
        "dlb.v1.Gateway",
        "grpc.health.v1.Health",
        "dlb.v1.Load",
    ] {
        assert!(
            list.lines().any(|l| l.trim() == service),
            "{service} in {list}"
        );
    }
    let described =
        dlb::testing::grpcurl_ok(&["-plaintext", addr, "describe", "dlb.v1.Operations"]).await;
    assert!(described.contains("rpc Fibonacci ("), "{described}");
    let health =
        dlb::testing::grpcurl_ok(&["-plaintext", addr, "grpc.health.v1.Health/Check"]).await;
    assert!(health.contains("\"SERVING\""), "{health}");

    let calls = [
        ("IsPrime", r#"{"number": "97"}"#, "\"prime\": true"),
        (
            "IsPalindrome",
            r#"{"text": "Racecar", "normalize": true}"#,
            "\"palindrome\": true",
        ),
        ("Reverse", r#"{"text": "hello"}"#, "\"text\": \"olleh\""),
        ("Fibonacci", r#"{"n": 94}"#, "19740274219868223167"),
        (
            "WordCount",
            r#"{"text": "to be or not to be", "top": 1}"#,
            "\"words\": \"6\"",
        ),
    ];
    for (method, data, expected) in calls {
        let out = dlb::testing::grpcurl_ok(&[
            "-plaintext",
            "-v",
            "-d",
            data,
            addr,
            &format!("dlb.v1.Operations/{method}"),
        ])
        .await;
        assert!(out.contains(expected), "{method}: {out}");
        assert!(
            out.contains("x-served-by: A") || out.contains("x-served-by: B"),
            "{method}: {out}"
        );
        assert!(out.contains("x-attempts: 1"), "{method}: {out}");
    }
    let stats = dlb::testing::grpcurl_ok(&["-plaintext", addr, "dlb.v1.Gateway/Stats"]).await;
    assert!(stats.contains("\"state\": \"serving\""), "{stats}");

    gateway.shutdown().await.unwrap();
    for c in computes {
        c.shutdown().await.unwrap();
    }
}
