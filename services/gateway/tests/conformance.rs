//! The conformance matrix: gRPC client stacks nobody here wrote (Python grpcio/C-core, Node
//! grpc-js, grpc-go as grpcurl) and tonic call dlb straight and through the gateway, and must
//! see the same thing both ways: the code, the message, the answer, the metadata. Also control's
//! RPCs from every stack, an instance written in another stack (Python) behind the gateway, and
//! the frames of a Trailers-Only answer read off the wire. Fails (never skips) when a stack is
//! not installed; `.ci/run` installs them all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use dlb::proto::v1::{
    FibonacciRequest, GetLoadRequest, InstanceRequest, IsPrimeRequest, ListInstancesRequest,
    LoadReport, ReverseRequest, StopInstanceRequest, load_client::LoadClient,
    operations_client::OperationsClient,
};
use dlb_compute::testing::RunningCompute;
use dlb_gateway::Config;
use dlb_gateway::config::Backend;
use dlb_gateway::testing::RunningGateway;
use prost::Message;
use support::interop::{Call, Outcome, RawCodec, Stack, hex, workspace_file};
use support::{PATIENCE, channel, wait_serving};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REVERSE: &str = "/dlb.v1.Operations/Reverse";
const IS_PRIME: &str = "/dlb.v1.Operations/IsPrime";
const FIBONACCI: &str = "/dlb.v1.Operations/Fibonacci";

/// The limit on request messages of instances and gateway alike (their default).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

fn reverse(text: &str) -> Vec<u8> {
    ReverseRequest { text: text.into() }.encode_to_vec()
}

fn prime(number: &str) -> Vec<u8> {
    IsPrimeRequest {
        number: number.into(),
    }
    .encode_to_vec()
}

fn fibonacci(n: u64) -> Vec<u8> {
    FibonacciRequest { n }.encode_to_vec()
}

fn backend(id: &str, addr: impl ToString) -> Backend {
    Backend {
        id: id.to_owned(),
        addr: addr.to_string(),
    }
}

/// The cases whose outcome must be the same straight to an instance and through the gateway,
/// with the code each must end with.
fn operations_cases() -> Vec<(Call, &'static str)> {
    let mut ok = Call::new("ok", REVERSE, reverse("hello"), Some(r#"{"text":"hello"}"#));
    ok.metadata = vec![
        ("x-custom".into(), "custom value".into()),
        ("x-custom-bin".into(), hex(&[0, 1, 2, 0xfe, 0xff])),
    ];
    let mut gzip = Call::new("gzip request", REVERSE, reverse("squeeze me"), None);
    gzip.gzip = true;
    let too_many_digits = "9".repeat(2_001);
    let big_text = "a".repeat(MAX_MESSAGE - 16);
    let over_text = "a".repeat(MAX_MESSAGE + 1);
    let mut slow = Call::new(
        "deadline (50 ms) for Fibonacci(10,000,000)",
        FIBONACCI,
        fibonacci(10_000_000),
        Some(r#"{"n":"10000000"}"#),
    );
    slow.timeout = Some(Duration::from_millis(50));
    vec![
        (ok, "OK"),
        (gzip, "OK"),
        (
            Call::new(
                "4 MiB message",
                REVERSE,
                reverse(&big_text),
                Some(&format!(r#"{{"text":"{big_text}"}}"#)),
            ),
            "OK",
        ),
        (
            Call::new(
                "not a number",
                IS_PRIME,
                prime("abc"),
                Some(r#"{"number":"abc"}"#),
            ),
            "INVALID_ARGUMENT",
        ),
        (
            Call::new(
                "negative",
                IS_PRIME,
                prime("-7"),
                Some(r#"{"number":"-7"}"#),
            ),
            "INVALID_ARGUMENT",
        ),
        (
            Call::new(
                "over the digit limit",
                IS_PRIME,
                prime(&too_many_digits),
                Some(&format!(r#"{{"number":"{too_many_digits}"}}"#)),
            ),
            "INVALID_ARGUMENT",
        ),
        (
            Call::new(
                "n over the maximum",
                FIBONACCI,
                fibonacci(1_000_000_000_000),
                Some(r#"{"n":"1000000000000"}"#),
            ),
            "INVALID_ARGUMENT",
        ),
        (
            Call::new(
                "oversize message",
                REVERSE,
                reverse(&over_text),
                Some(&format!(r#"{{"text":"{over_text}"}}"#)),
            ),
            "RESOURCE_EXHAUSTED",
        ),
        (
            Call::new(
                "unknown method",
                "/dlb.v1.Operations/Nope",
                Vec::new(),
                None,
            ),
            "UNIMPLEMENTED",
        ),
        (
            Call::new("unknown service", "/acme.v1.Widgets/Get", Vec::new(), None),
            "UNIMPLEMENTED",
        ),
        (slow, "DEADLINE_EXCEEDED"),
    ]
}

/// Checks one outcome against its expected code, and what an OK answer must hold.
fn check(stack: Stack, via: &str, call: &Call, outcome: &Outcome, code: &str) {
    let case = format!("{stack:?} {via} {:?}", call.name);
    assert_eq!(outcome.code, code, "{case}: {outcome:?}");
    match call.name {
        "ok" => assert!(
            outcome.response.windows(5).any(|w| w == b"olleh"),
            "{case}: {outcome:?}"
        ),
        "4 MiB message" => assert!(
            outcome.response.len() >= MAX_MESSAGE - 16,
            "{case}: an answer of {} bytes",
            outcome.response.len()
        ),
        _ if code != "OK" && code != "DEADLINE_EXCEEDED" => {
            // A deadline may end at the caller first, in the caller's own words; every other
            // error says what went wrong.
            assert!(!outcome.message.is_empty(), "{case}: a message");
        }
        _ => {}
    }
}

/// Whether an instance answers `call` when it goes through the gateway (the gateway answers
/// the rest itself: methods it does not relay, oversize requests; and a deadline may end
/// at the caller first).
fn instance_answers(call: &Call) -> bool {
    !matches!(
        call.name,
        "unknown method" | "unknown service" | "oversize message"
    ) && call.timeout.is_none()
}

/// Every stack, every operations case, straight to instance A and through a gateway over A
/// and B: the same code and message both ways; x-served-by and x-attempts through the gateway
/// whenever an instance answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stack_sees_the_same_status_straight_and_through_the_gateway() {
    let (computes, gateway) = gateway_over_computes(&["A", "B"]).await;
    let direct = computes[0].addr.to_string();
    let through = gateway.addr.to_string();
    let cases = operations_cases();
    let calls: Vec<Call> = cases.iter().map(|(c, _)| c.clone()).collect();
    for stack in Stack::ALL {
        let straight = stack.run(&direct, &calls).await;
        let relayed = stack.run(&through, &calls).await;
        for ((call, direct), (_, relayed)) in straight.iter().zip(&relayed) {
            let code = cases.iter().find(|(c, _)| c.name == call.name).unwrap().1;
            check(stack, "direct", call, direct, code);
            check(stack, "via gateway", call, relayed, code);
            let case = format!("{stack:?} {:?}", call.name);
            if code != "DEADLINE_EXCEEDED" {
                assert_eq!(direct.message, relayed.message, "{case}: same message");
                assert_eq!(
                    direct.metadata("x-served-by"),
                    Some("A"),
                    "{case}: {direct:?}"
                );
            }
            if instance_answers(call) {
                let by = relayed.metadata("x-served-by");
                assert!(matches!(by, Some("A" | "B")), "{case}: {relayed:?}");
                assert_eq!(
                    relayed.metadata("x-attempts"),
                    Some("1"),
                    "{case}: {relayed:?}"
                );
            }
        }
        // A deadline shorter than the margin the gateway keeps back (20 ms) ends at the
        // gateway, at once, before any instance and before the caller's own timer (straight,
        // Reverse would answer within it).
        let mut expired = Call::new("deadline (15 ms)", REVERSE, reverse("hi"), None);
        expired.timeout = Some(dlb::deadline::MARGIN / 4 * 3);
        if stack.can_make(&expired) {
            let relayed = stack.run(&through, std::slice::from_ref(&expired)).await;
            assert_eq!(
                relayed[0].1.code, "DEADLINE_EXCEEDED",
                "{stack:?}: {:?}",
                relayed[0].1
            );
        }
        let names: Vec<&str> = straight.iter().map(|(c, _)| c.name).collect();
        eprintln!(
            "{stack:?}: {} cases, the same both ways: {names:?}",
            names.len()
        );
    }
    gateway.shutdown().await.unwrap();
    for compute in computes {
        compute.shutdown().await.unwrap();
    }
}

/// Instances `ids` in-process, and a gateway over them once all serve.
async fn gateway_over_computes(ids: &[&str]) -> (Vec<RunningCompute>, RunningGateway) {
    let mut computes = Vec::new();
    for id in ids {
        let config = dlb_compute::Config::for_tests(id);
        computes.push(dlb_compute::testing::start(config).await.unwrap());
    }
    let list = computes
        .iter()
        .zip(ids)
        .map(|(c, id)| backend(id, c.addr))
        .collect();
    let gateway = RunningGateway::start(Config::for_tests(vec![]), list, false)
        .await
        .unwrap();
    wait_serving(&channel(&gateway.uri()).await, ids, PATIENCE).await;
    (computes, gateway)
}

async fn load(addr: std::net::SocketAddr) -> LoadReport {
    LoadClient::new(channel(&format!("http://{addr}")).await)
        .get_load(GetLoadRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Waits until `what` holds of instance `addr`'s load report.
async fn wait_load(addr: std::net::SocketAddr, what: &str, holds: impl Fn(&LoadReport) -> bool) {
    let mut last = LoadReport::default();
    let waited = tokio::time::timeout(PATIENCE, async {
        loop {
            last = load(addr).await;
            if holds(&last) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what} within {PATIENCE:?}: {last:?}");
}

/// An instance whose one CPU worker is busy refuses heavy calls with RESOURCE_EXHAUSTED:
/// every stack reads the instance's own words through the gateway. And a caller's cancel
/// reaches the instance, whose computation stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_full_and_cancels_reach_every_stack_and_the_instance() {
    let mut config = dlb_compute::Config::for_tests("P");
    config.workers = Some(1);
    config.queue = 0;
    config.max_fib_n = 400_000_000;
    let compute = dlb_compute::testing::start(config).await.unwrap();
    let gateway = RunningGateway::start(
        Config::for_tests(vec![]),
        vec![backend("P", compute.addr)],
        false,
    )
    .await
    .unwrap();
    wait_serving(&channel(&gateway.uri()).await, &["P"], PATIENCE).await;
    let direct = compute.addr.to_string();
    let through = gateway.addr.to_string();

    // A caller's cancel, straight and through the gateway: the instance abandons the work.
    let mut cancel = Call::new("cancel", FIBONACCI, fibonacci(400_000_000), None);
    cancel.cancel_after = Some(Duration::from_millis(300));
    cancel.timeout = Some(Duration::from_secs(60));
    let mut cancelled = 0;
    for stack in Stack::ALL.into_iter().filter(|s| s.can_make(&cancel)) {
        for target in [&direct, &through] {
            let outcome = stack.run(target, std::slice::from_ref(&cancel)).await;
            assert_eq!(outcome[0].1.code, "CANCELLED", "{stack:?} {target}");
            cancelled += 1;
            wait_load(compute.addr, "the cancelled work stopped", |l| {
                l.cancelled == cancelled && l.busy_workers == 0 && l.in_flight == 0
            })
            .await;
        }
    }

    // Every pool full: the one worker busy with a long call held by the test.
    let holder = {
        let channel = channel(&format!("http://{direct}")).await;
        tokio::spawn(async move {
            let mut request = tonic::Request::new(FibonacciRequest { n: 400_000_000 });
            request.set_timeout(Duration::from_secs(120));
            OperationsClient::new(channel).fibonacci(request).await
        })
    };
    wait_load(compute.addr, "the worker busy", |l| l.busy_workers == 1).await;
    let full = Call::new(
        "pool full",
        FIBONACCI,
        fibonacci(100_000),
        Some(r#"{"n":"100000"}"#),
    );
    for stack in Stack::ALL {
        let straight = stack.run(&direct, std::slice::from_ref(&full)).await;
        let relayed = stack.run(&through, std::slice::from_ref(&full)).await;
        let (direct, relayed) = (&straight[0].1, &relayed[0].1);
        assert_eq!(
            direct.code, "RESOURCE_EXHAUSTED",
            "{stack:?} direct {direct:?}"
        );
        assert_eq!(
            relayed.code, "RESOURCE_EXHAUSTED",
            "{stack:?} gateway {relayed:?}"
        );
        assert!(direct.message.contains("busy"), "{stack:?}: {direct:?}");
        assert_eq!(direct.message, relayed.message, "{stack:?}");
    }
    assert_eq!(
        load(compute.addr).await.busy_workers,
        1,
        "still held: the calls were refused"
    );
    holder.abort();
    wait_load(compute.addr, "the held work stopped", |l| {
        l.busy_workers == 0
    })
    .await;
    gateway.shutdown().await.unwrap();
    compute.shutdown().await.unwrap();
}

/// No healthy instance: every stack gets UNAVAILABLE from the gateway, with its words, at
/// once; straight to a port nobody serves, the stack's own UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_is_unavailable_for_every_stack() {
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = nobody.local_addr().unwrap();
    drop(nobody);
    let gateway = RunningGateway::start(Config::for_tests(vec![]), vec![backend("D", dead)], false)
        .await
        .unwrap();
    let call = Call::new(
        "no instance",
        REVERSE,
        reverse("x"),
        Some(r#"{"text":"x"}"#),
    );
    for stack in Stack::ALL {
        let relayed = stack
            .run(&gateway.addr.to_string(), std::slice::from_ref(&call))
            .await;
        let relayed = &relayed[0].1;
        assert_eq!(relayed.code, "UNAVAILABLE", "{stack:?}: {relayed:?}");
        assert!(
            relayed.message.contains("no healthy instance"),
            "{stack:?}: {relayed:?}"
        );
        let straight = stack
            .run(&dead.to_string(), std::slice::from_ref(&call))
            .await;
        assert_eq!(
            straight[0].1.code, "UNAVAILABLE",
            "{stack:?}: {:?}",
            straight[0].1
        );
    }
    gateway.shutdown().await.unwrap();
}

/// Control's RPCs, its answers and its errors, from every stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stack_speaks_to_control() {
    let config = dlb_control::Config::for_tests(support::compute_binary(), 0);
    let control = dlb_control::testing::start(config).await.unwrap();
    let target = control.addr.to_string();
    let cases = [
        (
            Call::new(
                "list",
                "/dlb.v1.Control/ListInstances",
                ListInstancesRequest {}.encode_to_vec(),
                Some("{}"),
            ),
            "OK",
        ),
        (
            Call::new(
                "stop an unknown id",
                "/dlb.v1.Control/StopInstance",
                StopInstanceRequest {
                    id: "ZZ".into(),
                    force: false,
                }
                .encode_to_vec(),
                Some(r#"{"id":"ZZ"}"#),
            ),
            "NOT_FOUND",
        ),
        (
            Call::new(
                "remove an unknown id",
                "/dlb.v1.Control/RemoveInstance",
                InstanceRequest { id: "Q".into() }.encode_to_vec(),
                Some(r#"{"id":"Q"}"#),
            ),
            "NOT_FOUND",
        ),
        (
            Call::new(
                "start without an id",
                "/dlb.v1.Control/StartInstance",
                InstanceRequest { id: String::new() }.encode_to_vec(),
                Some("{}"),
            ),
            "INVALID_ARGUMENT",
        ),
        (
            Call::new(
                "unknown method",
                "/dlb.v1.Control/Explode",
                Vec::new(),
                None,
            ),
            "UNIMPLEMENTED",
        ),
    ];
    let calls: Vec<Call> = cases.iter().map(|(c, _)| c.clone()).collect();
    let mut messages: Vec<Vec<String>> = Vec::new();
    for stack in Stack::ALL {
        let outcomes = stack.run(&target, &calls).await;
        for (call, outcome) in &outcomes {
            let code = cases.iter().find(|(c, _)| c.name == call.name).unwrap().1;
            assert_eq!(outcome.code, code, "{stack:?} {:?}: {outcome:?}", call.name);
            if code != "OK" {
                assert!(!outcome.message.is_empty(), "{stack:?} {:?}", call.name);
            }
        }
        messages.push(outcomes.iter().map(|(_, o)| o.message.clone()).collect());
    }
    // Every stack read the same words (grpcurl's list is shorter: compare what it made).
    assert_eq!(messages[0], messages[1], "Python and Node");
    assert_eq!(messages[0], messages[3], "Python and tonic");
    control.shutdown().await.unwrap();
}

/// A Python grpcio instance behind the gateway: its answers, metadata (ASCII and -bin, both
/// ways, headers and trailers) and errors (with a percent-encoded message and
/// grpc-status-details-bin) reach every stack as they reach it straight from the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_in_another_stack_is_relayed_exactly() {
    let peer = PythonInstance::start().await;
    let addr = peer.addr.clone();

    let gateway =
        RunningGateway::start(Config::for_tests(vec![]), vec![backend("Y", &addr)], false)
            .await
            .unwrap();
    wait_serving(&channel(&gateway.uri()).await, &["Y"], PATIENCE).await;

    let raw = vec![0x0a, 3, b'r', b'a', b'w'];
    let mut echo = Call::new("echo", REVERSE, raw.clone(), None);
    echo.metadata = vec![
        ("x-echo-text".into(), "plain value".into()),
        ("x-echo-data-bin".into(), hex(&[0, 0xff, 0x10, 0x80])),
    ];
    let message = "100% sûr: <b>not</b>\tok\n🦀";
    let details = hex(b"\x08\x09\x12\x07details");
    let mut error = Call::new("error", REVERSE, raw.clone(), None);
    error.metadata = vec![
        ("x-want-code".into(), "9".into()),
        ("x-want-message".into(), hex(message.as_bytes())),
        ("x-want-details-bin".into(), details.clone()),
    ];
    let mut deadline = Call::new("deadline", REVERSE, raw.clone(), None);
    deadline.timeout = Some(Duration::from_secs(5));
    let calls = [echo, error, deadline];
    for stack in [Stack::Python, Stack::Node, Stack::Tonic] {
        let straight = stack.run(&addr, &calls).await;
        let relayed = stack.run(&gateway.addr.to_string(), &calls).await;
        // grpc-timeout reaches the instance as what is left of the caller's deadline: about
        // 5 s (C-core rounds the timeout it sends up, here to 5,009 ms), and less, but not
        // by much, through the gateway (the margin here is generous, for a loaded machine).
        for (via, outcomes) in [("direct", &straight), ("via gateway", &relayed)] {
            let left: u64 = outcomes[2]
                .1
                .metadata("x-time-remaining-ms")
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                (3_000..=5_100).contains(&left),
                "{stack:?} {via}: {left} ms left of 5 s"
            );
        }
        for ((call, direct), (_, relayed)) in straight.iter().zip(&relayed) {
            let case = format!("{stack:?} {:?}", call.name);
            assert_eq!(direct.code, relayed.code, "{case}: {direct:?} {relayed:?}");
            assert_eq!(direct.message, relayed.message, "{case}");
            assert_eq!(direct.response, relayed.response, "{case}");
            assert_eq!(
                relayed.metadata("x-served-by"),
                Some("Y"),
                "{case}: {relayed:?}"
            );
            assert_eq!(relayed.metadata("x-attempts"), Some("1"), "{case}");
            for key in [
                "x-echo-text",
                "x-echo-data-bin",
                "x-peer-trailer",
                "grpc-status-details-bin",
            ] {
                assert_eq!(direct.metadata(key), relayed.metadata(key), "{case} {key}");
            }
        }
        let (echoed, failed) = (&relayed[0].1, &relayed[1].1);
        assert_eq!(echoed.code, "OK", "{stack:?}: {echoed:?}");
        assert_eq!(echoed.response, raw, "{stack:?}");
        assert_eq!(
            echoed.metadata("x-echo-text"),
            Some("plain value"),
            "{stack:?}"
        );
        assert_eq!(
            echoed.metadata("x-echo-data-bin"),
            Some("00ff1080"),
            "{stack:?}"
        );
        assert_eq!(
            echoed.metadata("x-peer-trailer"),
            Some("trailing"),
            "{stack:?}"
        );
        assert_eq!(failed.code, "FAILED_PRECONDITION", "{stack:?}: {failed:?}");
        assert_eq!(failed.message, message, "{stack:?}");
        assert_eq!(
            failed.metadata("grpc-status-details-bin"),
            Some(details.as_str()),
            "{stack:?}: {failed:?}"
        );
    }
    gateway.shutdown().await.unwrap();
    peer.stop().await;
}

/// `tests/interop/grpc_peer.py server`: an instance in Python grpcio at C-core's defaults.
struct PythonInstance {
    child: tokio::process::Child,
    addr: String,
}

impl PythonInstance {
    /// Starts it and waits for its "listening on" line.
    async fn start() -> Self {
        let mut child = tokio::process::Command::new(workspace_file(".venv/bin/python"))
            .arg(workspace_file("tests/interop/grpc_peer.py"))
            .arg("server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python peer");
        let mut stdout = child.stdout.take().unwrap();
        let mut line = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            let mut byte = [0u8; 1];
            while stdout.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
        })
        .await
        .expect("the peer's listening line");
        let line = String::from_utf8(line).unwrap();
        assert!(line.contains("listening on"), "{line}");
        let addr = line.rsplit(' ').next().unwrap().to_owned();
        Self { child, addr }
    }

    /// Closes its stdin (it stops) and waits for it, bounded.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(PATIENCE, self.child.wait()).await;
    }
}

/// A grpcio instance at C-core's defaults, which close a connection pinged more often than
/// every 5 minutes without data (GOAWAY ENHANCE_YOUR_CALM "too_many_pings", on the third such
/// PING), stays in the gateway's rotation and serves every call while the gateway watches its
/// health, at the gateway's default health interval (1 s) and at the tests' (200 ms). The
/// gateway once PINGed every interval and lost such an instance every few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_at_grpcio_defaults_is_never_dropped_for_pinging() {
    let peer = PythonInstance::start().await;
    for interval in [dlb_gateway::config::DEFAULT_HEALTH_INTERVAL_MS, 200] {
        let mut config = Config::for_tests(vec![]);
        config.health_interval_ms = interval;
        let gateway = RunningGateway::start(config, vec![backend("Y", &peer.addr)], false)
            .await
            .unwrap();
        let gw = channel(&gateway.uri()).await;
        wait_serving(&gw, &["Y"], PATIENCE).await;
        // Past five health intervals (C-core closes on the third PING within 5 minutes): a
        // call every 100 ms or so, each answered by Y, which stays serving throughout.
        let mut client = tonic::client::Grpc::new(gw.clone());
        let calls = (interval * 5 / 100).max(40);
        for i in 0..calls {
            client.ready().await.unwrap();
            let path = REVERSE.parse().unwrap();
            let answer = client
                .unary(tonic::Request::new(vec![0x0a, 1, b'x']), path, RawCodec)
                .await;
            let answer = answer.unwrap_or_else(|status| {
                panic!("call {i} at a {interval} ms health interval: {status:?}")
            });
            let by = answer
                .metadata()
                .get("x-served-by")
                .map(|v| v.to_str().unwrap());
            assert_eq!(by, Some("Y"), "call {i}");
            assert_eq!(
                support::state_of(&gw, "Y").await,
                "serving",
                "after call {i}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        gateway.shutdown().await.unwrap();
    }
    peer.stop().await;
}

/// An instance's Trailers-Only answer leaves the gateway as one HEADERS frame with END_STREAM
/// (read off the wire with a client of our own that decodes frames, not messages): no DATA
/// frame, no second HEADERS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailers_only_answer_stays_one_headers_frame() {
    let (computes, gateway) = gateway_over_computes(&["A"]).await;
    for (via, addr) in [("direct", computes[0].addr), ("via gateway", gateway.addr)] {
        let frames = raw_call(addr, IS_PRIME, &prime("abc")).await;
        let kinds: Vec<(u8, u8)> = frames.iter().map(|f| (f.kind, f.flags)).collect();
        // HEADERS (1) with END_STREAM (1) and END_HEADERS (4), and nothing else.
        assert_eq!(
            kinds,
            vec![(1, 0x5)],
            "{via}: frames of stream 1: {frames:?}"
        );
        // And a good answer: HEADERS, DATA, trailing HEADERS with END_STREAM.
        let frames = raw_call(addr, REVERSE, &reverse("hello")).await;
        let kinds: Vec<u8> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(kinds.first(), Some(&1), "{via}: {frames:?}");
        assert_eq!(kinds.last(), Some(&1), "{via}: {frames:?}");
        let data: usize = frames.iter().filter(|f| f.kind == 0).map(|f| f.len).sum();
        assert!(data > 5, "{via}: a message in DATA frames: {frames:?}");
        assert_eq!(
            frames.last().unwrap().flags & 1,
            1,
            "{via}: END_STREAM last"
        );
    }
    gateway.shutdown().await.unwrap();
    for compute in computes {
        compute.shutdown().await.unwrap();
    }
}

/// One HTTP/2 frame of stream 1.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    len: usize,
}

/// Sends one gRPC call as stream 1 over a fresh connection, with a hand-made HPACK block
/// (literal fields, no Huffman), and returns the frames of stream 1 until it ends.
async fn raw_call(addr: std::net::SocketAddr, path: &str, message: &[u8]) -> Vec<Frame> {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]); // SETTINGS
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "dlb"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0); // literal without indexing, new name
        hpack_string(&mut block, name);
        hpack_string(&mut block, value);
    }
    frame(&mut out, 1, 0x4, 1, &block); // HEADERS, END_HEADERS
    let mut data = vec![0];
    data.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    data.extend_from_slice(message);
    frame(&mut out, 0, 0x1, 1, &data); // DATA, END_STREAM
    socket.write_all(&out).await.unwrap();

    let mut frames = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let mut head = [0u8; 9];
            socket.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            socket.read_exact(&mut payload).await.unwrap();
            if kind == 4 && flags & 1 == 0 {
                // The server's SETTINGS: acknowledge.
                let mut ack = Vec::new();
                frame(&mut ack, 4, 1, 0, &[]);
                socket.write_all(&ack).await.unwrap();
            }
            if stream != 1 || kind == 3 || kind == 8 {
                // Other streams, RST_STREAM after the end, WINDOW_UPDATE: not the answer.
                continue;
            }
            frames.push(Frame { kind, flags, len });
            if flags & 1 == 1 {
                return;
            }
        }
    })
    .await
    .expect("the answer's frames");
    frames
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap();
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn hpack_string(out: &mut Vec<u8>, text: &str) {
    // Short strings only: a 7-bit length prefix, no Huffman.
    assert!(text.len() < 127);
    out.push(u8::try_from(text.len()).unwrap());
    out.extend_from_slice(text.as_bytes());
}

/// Requests that break the protocol, sent with a raw HTTP/2 client (no gRPC library would send
/// them), straight and through the gateway: each gets the status the gRPC specs name, with a
/// message, and the caller's connection keeps serving its other calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_protocol_status_and_the_connection_serves_on() {
    let (computes, gateway) = gateway_over_computes(&["A"]).await;
    let hello = reverse("hello");
    let framed = |flag: u8, declared: usize, message: &[u8]| {
        let mut body = vec![flag];
        body.extend_from_slice(&u32::try_from(declared).unwrap().to_be_bytes());
        body.extend_from_slice(message);
        body
    };
    let cases: [(&str, Option<&str>, Vec<u8>, &str); 4] = [
        (
            "a length prefix that lies",
            None,
            framed(0, hello.len() + 10, &hello),
            "INTERNAL",
        ),
        (
            "the compressed flag without grpc-encoding",
            None,
            framed(1, hello.len(), &hello),
            "INTERNAL",
        ),
        (
            "an unknown compression flag",
            None,
            framed(7, hello.len(), &hello),
            "INTERNAL",
        ),
        (
            "an encoding nobody has",
            Some("x-unheard-of"),
            framed(1, hello.len(), &hello),
            "UNIMPLEMENTED",
        ),
    ];
    for (via, addr) in [("direct", computes[0].addr), ("via gateway", gateway.addr)] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(connection);
        for (name, encoding, body, code) in &cases {
            let (status, message, headers) = h2_call(&client, REVERSE, *encoding, body).await;
            let case = format!("{via} {name}");
            assert_eq!(dlb::status::code_name(status), *code, "{case}: {message}");
            assert!(!message.is_empty(), "{case}: a message");
            if *code == "UNIMPLEMENTED" {
                // The spec: the server says which encodings it accepts.
                let accepted = headers
                    .get("grpc-accept-encoding")
                    .map(|v| v.to_str().unwrap());
                assert!(
                    accepted.is_some_and(|a| a.contains("gzip")),
                    "{case}: {headers:?}"
                );
            }
            // The same connection still serves.
            let (status, message, _) =
                h2_call(&client, REVERSE, None, &framed(0, hello.len(), &hello)).await;
            assert_eq!(
                status,
                tonic::Code::Ok,
                "{case}, then a good call: {message}"
            );
        }
        driver.abort();
    }
    gateway.shutdown().await.unwrap();
    for compute in computes {
        compute.shutdown().await.unwrap();
    }
}

/// One call with h2: `body` as the request's whole DATA; returns the status, its message
/// (decoded) and the response headers (the trailers merged in).
async fn h2_call(
    client: &h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    encoding: Option<&str>,
    body: &[u8],
) -> (tonic::Code, String, tonic::codegen::http::HeaderMap) {
    let mut request = tonic::codegen::http::Request::post(format!("http://dlb{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(encoding) = encoding {
        request = request.header("grpc-encoding", encoding);
    }
    let request = request.body(()).unwrap();
    let mut client = client.clone().ready().await.unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(bytes::Bytes::copy_from_slice(body), true)
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .unwrap()
        .unwrap();
    let (head, mut answer) = response.into_parts();
    let mut headers = head.headers;
    while let Some(data) = answer.data().await {
        let data = data.unwrap();
        let _ = answer.flow_control().release_capacity(data.len());
    }
    if let Some(trailers) = answer.trailers().await.unwrap() {
        headers.extend(trailers);
    }
    let status = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
        .map_or(tonic::Code::Unknown, tonic::Code::from);
    let message = headers
        .get("grpc-message")
        .map(|v| dlb::status::percent_decode(v.to_str().unwrap()))
        .unwrap_or_default();
    (status, message, headers)
}
