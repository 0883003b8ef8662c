//! Any service behind the gateway: a service of all four call kinds written in Python grpcio
//! (`tests/interop/stream_peer.py`), called by Python grpcio clients through a real
//! `dlb-gateway` process; pools and routes; bad routes refused at start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dlb::testing::{KillOnDrop, PATIENCE, free_port, http_get, listening_addr};
use serde_json::Value;

fn workspace_file(relative: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative);
    assert!(
        path.exists(),
        "{} is missing: install the client stacks as .ci/run does",
        path.display()
    );
    path
}

fn python() -> PathBuf {
    workspace_file(".venv/bin/python")
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A child's stdout lines, as they are printed.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    lines
}

/// A Python grpcio instance: its address, and its event lines ("cancelled ...") as they come.
struct Peer {
    child: KillOnDrop,
    addr: String,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    fn start(name: &str, service: &str) -> Self {
        Self::start_with(name, service, false)
    }

    /// With `refuse`, it answers every call UNAVAILABLE after reading its request whole.
    fn start_with(name: &str, service: &str, refuse: bool) -> Self {
        let mut child = Command::new(python())
            .arg(workspace_file("tests/interop/stream_peer.py"))
            .args(["server", name, service])
            .env("STREAM_PEER_REFUSE", if refuse { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python peer");
        let lines = lines_of(child.stdout.take().unwrap());
        let first = lines
            .recv_timeout(PATIENCE)
            .expect("the peer's listening line");
        assert!(first.contains("listening on"), "{first}");
        let addr = first.rsplit(' ').next().unwrap().to_owned();
        Self {
            child: KillOnDrop(child),
            addr,
            lines,
        }
    }
}

/// A `dlb-gateway` process: its address and its `/metrics` address.
struct Gateway {
    child: KillOnDrop,
    addr: String,
    metrics: std::net::SocketAddr,
}

impl Gateway {
    fn start(args: &[String]) -> Self {
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_dlb-gateway"))
            .args(["--listen", "127.0.0.1:0", "--redis", "none"])
            .args(["--health-interval-ms", "200"])
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map(KillOnDrop)
            .unwrap();
        let addr = listening_addr(&mut child.0);
        Self {
            child,
            addr,
            metrics,
        }
    }

    /// Peak resident memory so far (VmHWM), bytes.
    fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.0.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics").unwrap()
    }

    /// Waits until the gateway's health says `service` is SERVING (its pool has an instance
    /// in the rotation), or `want` otherwise.
    fn wait_health(&self, service: &str, want: &str) {
        dlb::testing::eventually_blocking(&format!("health of {service} {want}"), || {
            let out = dlb::testing::run_grpcurl(&[
                "-plaintext",
                "-d",
                &format!("{{\"service\":\"{service}\"}}"),
                &self.addr,
                "grpc.health.v1.Health/Check",
            ])
            .ok()?;
            out.contains(want).then_some(())
        });
    }
}

/// Runs the Python client; its last stdout line, as JSON.
fn client(target: &str, service: Option<&str>, args: &[&str]) -> Value {
    let mut command = Command::new(python());
    command
        .arg(workspace_file("tests/interop/stream_peer.py"))
        .args(["client", target])
        .args(args)
        .stderr(Stdio::inherit());
    if let Some(service) = service {
        command.env("STREAM_PEER_SERVICE", service);
    }
    let out = command.output().expect("python client");
    assert!(out.status.success(), "client {args:?} failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Starts a client whose stdout lines come as they are printed.
fn client_lines(target: &str, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(python())
        .arg(workspace_file("tests/interop/stream_peer.py"))
        .args(["client", target])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    (child, lines)
}

fn backends(peers: &[(&str, &Peer)]) -> Vec<String> {
    peers
        .iter()
        .flat_map(|(id, p)| ["--backend".to_owned(), format!("{id}={}", p.addr)])
        .collect()
}

fn wait_all_serving(gateway: &Gateway, n: usize) {
    dlb::testing::eventually_blocking("every instance serving", || {
        let metrics = gateway.metrics();
        let serving = metrics
            .lines()
            .filter(|l| l.starts_with("dlb_gateway_instance_serving{") && l.ends_with(" 1"))
            .count();
        (serving == n).then_some(())
    });
}

#[test]
fn every_call_kind_of_a_python_service_passes_through_the_gateway() {
    let mut peers = [
        Peer::start("P1", "test.v1.Streams"),
        Peer::start("P2", "test.v1.Streams"),
        Peer::start("P3", "test.v1.Streams"),
    ];
    // Strict rotation, which the unary calls below count exactly (the default, weighted,
    // follows the instances' latencies).
    let mut args = backends(&[("A", &peers[0]), ("B", &peers[1]), ("C", &peers[2])]);
    args.extend(["--policy".to_owned(), "round-robin".to_owned()]);
    let gateway = Gateway::start(&args);
    wait_all_serving(&gateway, 3);
    let target = gateway.addr.as_str();

    // Unary: exact round robin.
    let unary = client(target, None, &["unary", "30"]);
    let served: Vec<&str> = unary["served_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(served.len(), 30, "{unary}");
    for id in ["A", "B", "C"] {
        assert_eq!(
            served.iter().filter(|s| **s == id).count(),
            10,
            "{served:?}"
        );
    }
    assert!(
        served
            .windows(3)
            .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2]),
        "not a strict rotation: {served:?}"
    );

    // Server streams: 20 calls at once, 1,000 messages 10 ms apart each; the first message
    // comes through within 50 ms (the highest of 20 is their p99), all in order.
    let streams = client(target, None, &["server-stream", "20", "1000", "10"]);
    let calls = streams["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 20);
    let mut first_ms: Vec<f64> = calls
        .iter()
        .map(|c| c["first_ms"].as_f64().unwrap())
        .collect();
    first_ms.sort_by(f64::total_cmp);
    for call in calls {
        assert_eq!(call["messages"], 1000, "{call}");
        assert_eq!(call["in_order"], true, "{call}");
    }
    let p99 = first_ms[first_ms.len() - 1];
    eprintln!(
        "server stream: first message p50 {:.1} ms, p99 {p99:.1} ms",
        first_ms[10]
    );
    assert!(p99 <= 50.0, "first messages took {first_ms:?} ms");

    // Bidi ping-pong: each answer before the next request.
    let bidi = client(target, None, &["bidi", "100"]);
    assert_eq!(bidi["rounds"], 100, "{bidi}");

    // A burst: every message sent at once, all echoed in order (the answer begins while
    // the request is still coming, and nothing of it may be lost then).
    for _ in 0..5 {
        let burst = client(target, None, &["bidi-burst", "300"]);
        assert_eq!(burst["echoed"], 300, "{burst}");
        assert_eq!(burst["in_order"], true, "{burst}");
    }

    // A 1 GiB client stream of 1 MiB messages, with the gateway's memory bounded.
    let upload = client(
        target,
        None,
        &["client-stream", &(1u64 << 30).to_string(), "1048576"],
    );
    assert_eq!(upload["messages"], 1024, "{upload}");
    assert_eq!(upload["bytes"], 1u64 << 30, "{upload}");
    let rss = gateway.peak_rss();
    eprintln!(
        "1 GiB client stream in {:.2} s; gateway peak RSS {:.1} MB",
        upload["seconds"].as_f64().unwrap(),
        rss as f64 / 1e6
    );
    assert!(rss <= 64 * 1024 * 1024, "peak RSS {rss} bytes");

    // A caller's cancel reaches the instance within 1 s.
    let cancel = client(target, None, &["cancel", "200"]);
    let cancelled_at = cancel["cancelled_at"].as_f64().unwrap();
    let seen = peers
        .iter()
        .find_map(|p| {
            let line = p.lines.recv_timeout(Duration::from_secs(2)).ok()?;
            line.starts_with("cancelled").then_some(line)
        })
        .expect("an instance saw the cancel");
    let seen_at: f64 = seen.rsplit(' ').next().unwrap().parse().unwrap();
    eprintln!(
        "cancel reached the instance in {:.1} ms",
        (seen_at - cancelled_at) * 1e3
    );
    assert!(seen_at - cancelled_at < 1.0, "{seen} vs {cancelled_at}");

    // An instance SIGKILLed mid-stream: the caller gets UNAVAILABLE within 2 s.
    let (mut streaming, lines) = client_lines(target, &["until-killed"]);
    let started: Value = serde_json::from_str(&lines.recv_timeout(PATIENCE).unwrap()).unwrap();
    let victim = match started["served_by"].as_str().unwrap() {
        "A" => 0,
        "B" => 1,
        _ => 2,
    };
    let killed_at = now();
    // SIGKILL (std's kill on Unix).
    peers[victim].child.0.kill().unwrap();
    let ended: Value = serde_json::from_str(&lines.recv_timeout(PATIENCE).unwrap()).unwrap();
    let _ = streaming.wait();
    assert_eq!(ended["code"], "UNAVAILABLE", "{ended}");
    let after = ended["ended_at"].as_f64().unwrap() - killed_at;
    eprintln!(
        "killed mid-stream: UNAVAILABLE after {:.1} ms ({})",
        after * 1e3,
        ended["message"]
    );
    assert!(after < 2.0, "{after} s");

    // Counted by method.
    let metrics = gateway.metrics();
    assert!(
        metrics.contains(
            "dlb_gateway_method_calls_total{method=\"/test.v1.Streams/Unary\",pool=\"default\"} 30"
        ),
        "{metrics}"
    );
    let value = |line: &str| -> u64 {
        let found = metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .unwrap_or_else(|| panic!("{line} in {metrics}"));
        found.trim().parse().unwrap()
    };
    // 20 streams of 1,000, then the cancelled and the killed ones (both failed).
    let server_stream = "{method=\"/test.v1.Streams/ServerStream\",pool=\"default\"}";
    assert_eq!(
        value(&format!("dlb_gateway_method_calls_total{server_stream}")),
        22
    );
    assert_eq!(
        value(&format!("dlb_gateway_method_failures_total{server_stream}")),
        2
    );
    assert!(
        value(&format!(
            "dlb_gateway_method_messages_out_total{server_stream}"
        )) > 20_000
    );
    assert!(
        metrics.contains(
            "dlb_gateway_method_messages_in_total{method=\"/test.v1.Streams/ClientStream\",pool=\"default\"} 1024"
        ),
        "{metrics}"
    );
}

/// gRFC A6's transparent retry: a stream refused (UNAVAILABLE, nothing answered) goes to
/// another instance while the gateway still holds its whole request, and to the caller once it
/// no longer does.
#[test]
fn a_refused_stream_is_sent_again_only_while_its_request_is_held() {
    let refuser = Peer::start_with("R", "test.v1.Streams", true);
    let good = Peer::start("G", "test.v1.Streams");
    let gateway = Gateway::start(&backends(&[("R", &refuser), ("G", &good)]));
    wait_all_serving(&gateway, 2);
    let target = gateway.addr.as_str();

    // 64 KiB requests, held whole: every call succeeds, some after a second attempt.
    let small = client(target, None, &["uploads", "6", "65536", "8192"]);
    let calls = small["calls"].as_array().unwrap();
    assert!(calls.iter().all(|c| c["code"] == "OK"), "{small}");
    assert!(calls.iter().any(|c| c["attempts"] == "2"), "{small}");

    // 1 MiB requests, past the 256 KiB the gateway holds: a refusal reaches the caller.
    let large = client(target, None, &["uploads", "4", "1048576", "65536"]);
    let calls = large["calls"].as_array().unwrap();
    let refused: Vec<&Value> = calls.iter().filter(|c| c["code"] != "OK").collect();
    assert!(!refused.is_empty(), "{large}");
    for call in refused {
        assert_eq!(call["code"], "UNAVAILABLE", "{call}");
        assert_eq!(call["attempts"], "1", "{call}");
        assert!(
            call["message"].as_str().unwrap().contains("R refuses"),
            "{call}"
        );
    }
}

#[test]
fn pools_route_services_to_their_own_instances() {
    let default_peer = Peer::start("D", "other.v1.Streams");
    let streams_peer = Peer::start("X", "test.v1.Streams");
    let closed = format!("127.0.0.1:{}", free_port());
    let gateway = Gateway::start(&[
        "--backend".into(),
        format!("D={}", default_peer.addr),
        "--route".into(),
        "test.v1.Streams=streams".into(),
        "--pool-backend".into(),
        format!("streams:X={}", streams_peer.addr),
        "--route".into(),
        "test.v1.Down=down".into(),
        "--pool-backend".into(),
        format!("down:Z={closed}"),
    ]);
    gateway.wait_health("test.v1.Streams", "\"SERVING\"");
    gateway.wait_health("dlb.pool.default", "\"SERVING\"");
    gateway.wait_health("dlb.pool.down", "NOT_SERVING");
    let target = gateway.addr.as_str();

    // Each service to its own pool's instance, by its own health checks.
    let routed = client(target, Some("test.v1.Streams"), &["unary", "4"]);
    assert_eq!(
        routed["served_by"],
        serde_json::json!(["X", "X", "X", "X"]),
        "{routed}"
    );
    let default = client(target, Some("other.v1.Streams"), &["unary", "4"]);
    assert_eq!(
        default["served_by"],
        serde_json::json!(["D", "D", "D", "D"]),
        "{default}"
    );
    // Streams follow the routes too.
    let bidi = client(target, Some("test.v1.Streams"), &["bidi", "10"]);
    assert_eq!(bidi["rounds"], 10);

    // Reflection through the gateway: its own services and each pool's instances'.
    let list = dlb::testing::run_grpcurl(&["-plaintext", target, "list"]).unwrap();
    for service in [
        "dlb.v1.Gateway",
        "grpc.health.v1.Health",
        "test.v1.Streams",
        "other.v1.Streams",
    ] {
        assert!(
            list.lines().any(|l| l.trim() == service),
            "{service} in {list}"
        );
    }
    let described =
        dlb::testing::run_grpcurl(&["-plaintext", target, "describe", "test.v1.Streams"]).unwrap();
    assert!(
        described.contains("rpc Bidi ( stream .test.v1.Chunk )"),
        "{described}"
    );
    let echoed = dlb::testing::run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"data":"aGk="}"#,
        target,
        "test.v1.Streams/Unary",
    ])
    .unwrap();
    assert!(echoed.contains("\"aGk=\""), "{echoed}");

    // A pool with no instance serving: UNAVAILABLE naming the pool, at once.
    let start = Instant::now();
    let down = client(target, Some("test.v1.Down"), &["unary", "1"]);
    assert_eq!(down["code"], "UNAVAILABLE", "{down}");
    assert!(
        down["message"].as_str().unwrap().contains("pool \"down\""),
        "{down}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));

    let metrics = gateway.metrics();
    assert!(
        metrics.contains("dlb_gateway_instance_serving{instance=\"X\",pool=\"streams\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            // Four from Python, one from grpcurl.
            "dlb_gateway_method_calls_total{method=\"/test.v1.Streams/Unary\",pool=\"streams\"} 5"
        ),
        "{metrics}"
    );
}

#[test]
fn bad_routes_stop_the_start_with_a_clear_error() {
    let port = free_port();
    for (args, says) in [
        (
            vec!["--route", "test.v1.Streams=nowhere"],
            "pool \"nowhere\" has no instances",
        ),
        (vec!["--route", "test.v1.Streams"], "is not SERVICE=POOL"),
        (vec!["--route", "not a service=p"], "neither a service name"),
        (
            vec!["--pool-backend", "orders:o1=127.0.0.1:5001"],
            "no --route sends calls to it",
        ),
        (
            vec!["--pool-backend", "default:o1=127.0.0.1:5001"],
            "takes its instances from --backend",
        ),
        (
            vec![
                "--route",
                "a.B=p",
                "--route",
                "a.B=default",
                "--pool-backend",
                "p:x=127.0.0.1:1",
            ],
            "routed twice",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dlb-gateway"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--redis", "none"])
            .args(["--metrics-listen", "none", "--backend", "A=127.0.0.1:1"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        // Nothing was started: the port is still free.
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "{args:?}"
        );
    }
}
