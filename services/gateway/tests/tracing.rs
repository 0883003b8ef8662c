//! Distributed tracing end to end: real `dlb-gateway` and `dlb-compute` processes export
//! their spans with OTLP/gRPC to a receiver written with the official opentelemetry-proto
//! code in Python grpcio (`tests/interop/otlp_receiver.py`); the callers are Python grpcio and
//! `dlb call`. The trace must read caller → gateway call → attempt(s) → compute operation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{ChildStdin, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dlb::events::reader::EventReader;
use dlb::proto::v1::operations_client::OperationsClient;
use dlb::proto::v1::{IsPrimeRequest, ReverseRequest};
use dlb::testing::{KillOnDrop, PATIENCE, RedisServer};
use prost::Message;
use serde_json::Value;
use support::interop::{Call, PythonScript, Stack};
use support::{ComputeProcess, channel, gateway_process};
use tonic::transport::Channel;

/// Spans leave each process within this (instead of the standard 5 s).
const SCHEDULE: &str = "OTEL_BSP_SCHEDULE_DELAY=50";

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The OTLP receiver, and every span it has printed so far.
struct Receiver {
    url: String,
    lines: mpsc::Receiver<String>,
    spans: Vec<Value>,
    _stdin: ChildStdin,
    _child: KillOnDrop,
}

impl Receiver {
    fn start() -> Self {
        let script = PythonScript::start("otlp_receiver.py", &[]);
        let addr = script.listening_addr();
        Self {
            url: format!("http://{addr}"),
            lines: script.lines,
            spans: Vec::new(),
            _stdin: script.stdin,
            _child: script.child,
        }
    }

    /// The spans of `trace` once at least `n` have come (bounded by [`PATIENCE`]).
    fn trace(&mut self, trace: &str, n: usize) -> Vec<Value> {
        let until = Instant::now() + PATIENCE;
        loop {
            let found: Vec<Value> = self
                .spans
                .iter()
                .filter(|s| s["trace_id"] == trace)
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.spans.push(serde_json::from_str(&line).unwrap()),
                Err(_) => panic!(
                    "{} of {n} spans of trace {trace} in {PATIENCE:?}: {found:#?}",
                    found.len()
                ),
            }
        }
    }

    /// Takes in whatever has come by now.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.spans.push(serde_json::from_str(&line).unwrap());
        }
    }
}

/// A `dlb-gateway` process with `flags`, exporting to `otlp` (spans leave within 50 ms).
fn gateway(otlp: &str, backends: &[(&str, &str)], flags: &[&str]) -> (KillOnDrop, String) {
    let flags: Vec<&str> = ["--otlp-endpoint", otlp]
        .iter()
        .chain(flags)
        .copied()
        .collect();
    gateway_process(backends, &flags, &[("OTEL_BSP_SCHEDULE_DELAY", "50")])
}

fn compute(id: &str, otlp: &str) -> ComputeProcess {
    ComputeProcess::start_with(
        &["env", SCHEDULE],
        id,
        "127.0.0.1:0",
        &["--redis", "none", "--otlp-endpoint", otlp],
    )
}

/// The one span of `spans` that `pick` says.
fn one<'a>(spans: &'a [Value], what: &str, pick: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "one {what} in {spans:#?}");
    found[0]
}

fn children<'a>(spans: &'a [Value], parent: &Value) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["parent_span_id"] == parent["span_id"])
        .collect()
}

async fn wait_serving(gateway: &Channel, n: usize) {
    dlb::testing::eventually("every instance serving", || async {
        let stats = support::stats(gateway).await;
        (stats
            .instances
            .iter()
            .filter(|i| i.state == "serving")
            .count()
            == n)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_makes_the_span_tree_caller_gateway_attempt_compute_and_events_carry_its_trace() {
    let mut receiver = Receiver::start();
    let redis = RedisServer::start();
    let a = compute("A", &receiver.url);
    let b = compute("B", &receiver.url);
    let (_gateway, addr) = gateway(
        &receiver.url,
        &[("A", &a.addr), ("B", &b.addr)],
        &["--redis", &redis.url()],
    );
    let gw = channel(&format!("http://{addr}")).await;
    wait_serving(&gw, 2).await;

    // Python grpcio calls with its own sampled span as the parent, and a vendor's tracestate.
    let mut call = Call::new(
        "traced reverse",
        "/dlb.v1.Operations/Reverse",
        ReverseRequest {
            text: "trace me".into(),
        }
        .encode_to_vec(),
        None,
    );
    call.metadata = vec![
        (
            "traceparent".into(),
            format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"),
        ),
        ("tracestate".into(), "vendor=opaque".into()),
    ];
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut unsampled = call.clone();
    unsampled.name = "unsampled";
    unsampled.metadata[0].1 = format!("00-{unsampled_trace}-b7ad6b7169203331-00");
    let outcomes = Stack::Python.run(&addr, &[unsampled, call]).await;
    for (call, outcome) in &outcomes {
        assert_eq!(outcome.code, "OK", "{}: {outcome:?}", call.name);
    }
    let served_by = outcomes[1].1.metadata("x-served-by").unwrap().to_owned();

    let spans = receiver.trace(CALLER_TRACE, 3);
    let gateway_span = one(&spans, "gateway call span", |s| {
        s["service"] == "dlb-gateway" && s["kind"] == "SPAN_KIND_SERVER"
    });
    assert_eq!(gateway_span["parent_span_id"], CALLER_SPAN);
    assert_eq!(gateway_span["name"], "dlb.v1.Operations/Reverse");
    assert_eq!(gateway_span["trace_state"], "vendor=opaque");
    assert_eq!(gateway_span["attributes"]["rpc.system"], "grpc");
    assert_eq!(
        gateway_span["attributes"]["rpc.service"],
        "dlb.v1.Operations"
    );
    assert_eq!(gateway_span["attributes"]["rpc.method"], "Reverse");
    assert_eq!(gateway_span["attributes"]["rpc.grpc.status_code"], 0);
    assert_eq!(gateway_span["attributes"]["dlb.attempts"], 1);
    assert_eq!(
        gateway_span["attributes"]["dlb.instance"],
        served_by.as_str()
    );
    assert_eq!(gateway_span["status"], "STATUS_CODE_UNSET");

    let attempts = children(&spans, gateway_span);
    assert_eq!(attempts.len(), 1, "{spans:#?}");
    let attempt = attempts[0];
    assert_eq!(attempt["kind"], "SPAN_KIND_CLIENT");
    assert_eq!(attempt["service"], "dlb-gateway");
    assert_eq!(attempt["attributes"]["dlb.instance"], served_by.as_str());
    assert_eq!(attempt["attributes"]["rpc.grpc.status_code"], 0);

    let operations = children(&spans, attempt);
    assert_eq!(operations.len(), 1, "{spans:#?}");
    let operation = operations[0];
    assert_eq!(operation["service"], "dlb-compute");
    assert_eq!(operation["kind"], "SPAN_KIND_SERVER");
    assert_eq!(operation["name"], "dlb.v1.Operations/Reverse");
    assert_eq!(
        operation["resource"]["service.instance.id"],
        served_by.as_str()
    );
    assert_eq!(operation["trace_state"], "vendor=opaque");
    // Times nest: the gateway's call holds its attempt, which holds the operation.
    let within = |inner: &Value, outer: &Value| {
        inner["start"].as_u64() >= outer["start"].as_u64()
            && inner["end"].as_u64() <= outer["end"].as_u64()
    };
    assert!(within(attempt, gateway_span), "{spans:#?}");

    // The request event in Redis carries the trace id (and so the dashboard's row).
    let reader = EventReader::new(&redis.url()).unwrap();
    let event = dlb::testing::eventually("the traced call's event", || async {
        reader.recent(50).await.ok()?.into_iter().find(|e| {
            e.request
                .as_ref()
                .is_some_and(|r| r.trace_id.as_deref() == Some(CALLER_TRACE))
        })
    })
    .await;
    assert_eq!(event.request.unwrap().backend, served_by);

    // `dlb call` starts a trace of its own: its client span is the root, the gateway's call
    // its child, and it prints the trace id.
    let output = Command::new(dlb::testing::workspace_binary("dlb"))
        .args(["call", "--addr", &addr, "--otlp-endpoint", &receiver.url])
        .args(["reverse", "from the cli"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let trace = stdout
        .split("trace ")
        .nth(1)
        .map(|rest| rest.trim().to_owned())
        .unwrap_or_else(|| panic!("no trace id in {stdout:?}"));
    assert_eq!(trace.len(), 32, "{stdout:?}");
    let spans = receiver.trace(&trace, 4);
    let root = one(&spans, "dlb call's span", |s| s["service"] == "dlb");
    assert_eq!(root["parent_span_id"], "");
    assert_eq!(root["kind"], "SPAN_KIND_CLIENT");
    let call = one(&spans, "gateway call span", |s| {
        s["service"] == "dlb-gateway" && s["kind"] == "SPAN_KIND_SERVER"
    });
    assert_eq!(call["parent_span_id"], root["span_id"]);

    // A failed call's spans say why in plain text: `grpc-message` comes percent-encoded (its
    // spaces as %20), and is read back decoded, as the caller reads it.
    let failed_trace = "5a1f0c7e2b9d4e3f8a6b7c8d9e0f1a2b";
    let mut bad = Call::new(
        "bad number",
        "/dlb.v1.Operations/IsPrime",
        IsPrimeRequest {
            number: "abc".into(),
        }
        .encode_to_vec(),
        None,
    );
    bad.metadata = vec![(
        "traceparent".into(),
        format!("00-{failed_trace}-{CALLER_SPAN}-01"),
    )];
    let outcomes = Stack::Python.run(&addr, &[bad]).await;
    let outcome = &outcomes[0].1;
    assert_eq!(outcome.code, "INVALID_ARGUMENT", "{outcome:?}");
    assert!(outcome.message.contains(' '), "{outcome:?}");
    let spans = receiver.trace(failed_trace, 3);
    let attempt = one(&spans, "the failed call's attempt", |s| {
        s["kind"] == "SPAN_KIND_CLIENT"
    });
    assert_eq!(attempt["status"], "STATUS_CODE_ERROR");
    assert_eq!(
        attempt["status_message"],
        format!("INVALID_ARGUMENT: {}", outcome.message).as_str(),
        "{attempt:#?}"
    );

    // The caller said "not sampled": parent-based sampling records nothing of that trace,
    // although it came first and every later span has arrived. Nor is the gateway's own
    // Stats (this test polled it) traced.
    receiver.drain();
    assert!(
        receiver
            .spans
            .iter()
            .all(|s| !s["name"].as_str().unwrap().starts_with("dlb.v1.Gateway/")),
        "Stats calls were traced: {:#?}",
        receiver.spans
    );
    assert!(
        receiver
            .spans
            .iter()
            .all(|s| s["trace_id"] != unsampled_trace),
        "an unsampled trace was recorded: {:#?}",
        receiver.spans
    );
}

/// A Python grpcio instance answering `delay_ms` late, so a call is in flight there when it is
/// SIGKILLed.
fn slow_peer(delay_ms: u32) -> (PythonScript, String) {
    let mut peer = PythonScript::start("grpc_peer.py", &["server"]);
    let addr = peer.listening_addr();
    writeln!(peer.stdin, "delay {delay_ms}").unwrap();
    let done = peer.lines.recv_timeout(PATIENCE).expect("its answer");
    assert_eq!(done, format!("done: delay {delay_ms}"));
    (peer, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_retried_after_its_instance_is_sigkilled_shows_two_attempts() {
    let mut receiver = Receiver::start();
    let (mut slow, slow_addr) = slow_peer(30_000);
    let b = compute("B", &receiver.url);
    let (_gateway, addr) = gateway(
        &receiver.url,
        &[("P", &slow_addr), ("B", &b.addr)],
        &["--redis", "none", "--policy", "round-robin"],
    );
    let gw = channel(&format!("http://{addr}")).await;
    wait_serving(&gw, 2).await;

    // Calls one at a time until one sits at P (round robin sends every other one there).
    let mut trace = String::new();
    let mut pending = None;
    for n in 0..6u32 {
        let id = format!("{:032x}", 0xabc0_0000_u64 + u64::from(n));
        let mut request = tonic::Request::new(ReverseRequest {
            text: "retry me".into(),
        });
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{id}-{CALLER_SPAN}-01").parse().unwrap(),
        );
        request.set_timeout(Duration::from_secs(20));
        let mut client = OperationsClient::new(gw.clone());
        let mut call = tokio::spawn(async move { client.reverse(request).await });
        if tokio::time::timeout(Duration::from_millis(500), &mut call)
            .await
            .is_err()
        {
            trace = id;
            pending = Some(call);
            break;
        }
    }
    let pending = pending.expect("a call waiting at the slow instance");
    // Killed mid-call: the gateway sends the call again, to B.
    slow.child.0.kill().unwrap();
    slow.child.0.wait().unwrap();
    let answer = tokio::time::timeout(PATIENCE, pending)
        .await
        .expect("answered after the kill")
        .unwrap()
        .expect("the retry succeeded");
    assert_eq!(answer.metadata().get("x-attempts").unwrap(), "2");
    assert_eq!(answer.metadata().get("x-served-by").unwrap(), "B");

    let spans = receiver.trace(&trace, 4);
    let call = one(&spans, "gateway call span", |s| {
        s["service"] == "dlb-gateway" && s["kind"] == "SPAN_KIND_SERVER"
    });
    assert_eq!(call["attributes"]["dlb.attempts"], 2);
    let attempts: BTreeMap<String, &Value> = children(&spans, call)
        .into_iter()
        .map(|a| {
            (
                a["attributes"]["dlb.instance"].as_str().unwrap().to_owned(),
                a,
            )
        })
        .collect();
    assert_eq!(
        attempts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["B", "P"],
        "{spans:#?}"
    );
    let (killed, retried) = (attempts["P"], attempts["B"]);
    assert_eq!(killed["status"], "STATUS_CODE_ERROR", "{killed:#}");
    assert!(
        !killed["status_message"].as_str().unwrap().is_empty(),
        "{killed:#}"
    );
    assert_eq!(retried["status"], "STATUS_CODE_UNSET");
    assert!(killed["end"].as_u64() <= retried["start"].as_u64());
    let operation = one(&spans, "B's operation", |s| s["service"] == "dlb-compute");
    assert_eq!(operation["parent_span_id"], retried["span_id"]);
    assert_eq!(operation["resource"]["service.instance.id"], "B");
}
