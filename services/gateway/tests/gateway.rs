//! The gateway with real compute instances on 127.0.0.1 port 0: rotation, failover when an
//! instance is killed or stopped, no healthy instance, slow calls, deadlines, Redis outages,
//! stats and metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dlb::client::Op;
use dlb::client::bench::{self, BenchConfig, Progress};
use dlb::events::EventLogArgs;
use dlb::proto::v1::{
    FibonacciRequest, GetLoadRequest, ReverseRequest, load_client::LoadClient,
    operations_client::OperationsClient,
};
use dlb::testing::RedisServer;
use dlb_compute::testing::RunningCompute;
use dlb_gateway::Config;
use dlb_gateway::config::Backend;
use dlb_gateway::testing::RunningGateway;
use support::{ComputeProcess, PATIENCE, channel, state_of, stats, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

/// Tests that load the machine take turns: one test's load must not starve another's health
/// probes and retries on two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn heavy_turn() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// Real compute processes A, B and C behind an in-process gateway, all serving.
async fn three_processes_behind_a_gateway() -> (Vec<ComputeProcess>, RunningGateway, Channel) {
    let computes: Vec<ComputeProcess> = ["A", "B", "C"]
        .iter()
        .map(|id| ComputeProcess::start(id, "127.0.0.1:0"))
        .collect();
    let gateway = RunningGateway::start(
        Config::for_tests(vec![]),
        computes.iter().map(ComputeProcess::backend).collect(),
        false,
    )
    .await
    .unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &["A", "B", "C"], PATIENCE).await;
    (computes, gateway, gw)
}

async fn in_process(ids: &[&str]) -> Vec<RunningCompute> {
    let mut computes = Vec::new();
    for id in ids {
        computes.push(
            dlb_compute::testing::start(dlb_compute::Config::for_tests(id))
                .await
                .unwrap(),
        );
    }
    computes
}

/// In-process instances `ids` behind a gateway started with `config`, once all serve.
async fn gateway_over(
    ids: &[&str],
    config: Config,
) -> (Vec<RunningCompute>, RunningGateway, Channel) {
    let computes = in_process(ids).await;
    let (gateway, gw) = gateway_with(config, backends(&computes, ids), ids).await;
    (computes, gateway, gw)
}

/// A gateway over `list`, once instances `ids` serve.
async fn gateway_with(
    config: Config,
    list: Vec<Backend>,
    ids: &[&str],
) -> (RunningGateway, Channel) {
    let gateway = RunningGateway::start(config, list, false).await.unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, ids, PATIENCE).await;
    (gateway, gw)
}

/// A gateway over `addr` alone, as instance R, once it serves.
async fn gateway_over_r(addr: std::net::SocketAddr) -> (RunningGateway, Channel) {
    let list = vec![Backend {
        id: "R".to_owned(),
        addr: addr.to_string(),
    }];
    gateway_with(Config::for_tests(vec![]), list, &["R"]).await
}

/// Stops the gateway, then the instances.
async fn stop(gateway: RunningGateway, computes: Vec<RunningCompute>) {
    gateway.shutdown().await.unwrap();
    for c in computes {
        c.shutdown().await.unwrap();
    }
}

fn backends(computes: &[RunningCompute], ids: &[&str]) -> Vec<Backend> {
    computes
        .iter()
        .zip(ids)
        .map(|(c, id)| Backend {
            id: (*id).to_owned(),
            addr: c.addr.to_string(),
        })
        .collect()
}

async fn reverse(
    gateway: &Channel,
    text: &str,
) -> Result<tonic::Response<dlb::proto::v1::ReverseResponse>, tonic::Status> {
    OperationsClient::new(gateway.clone())
        .reverse(ReverseRequest { text: text.into() })
        .await
}

fn load(gateway: &RunningGateway, concurrency: usize, requests: u64) -> BenchConfig {
    dlb::testing::load(gateway.addr, concurrency, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_over_three_instances() {
    let ids = ["A", "B", "C"];
    let computes = in_process(&ids).await;
    let gateway = RunningGateway::start(Config::for_tests(vec![]), backends(&computes, &ids), true)
        .await
        .unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &ids, PATIENCE).await;

    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut client = OperationsClient::new(gw.clone());
    for _ in 0..3_000 {
        let response = client
            .reverse(ReverseRequest {
                text: "hello".into(),
            })
            .await
            .unwrap();
        assert_eq!(response.metadata().get("x-attempts").unwrap(), "1");
        let served_by = response
            .metadata()
            .get("x-served-by")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(response.into_inner().text, "olleh");
        *counts.entry(served_by).or_default() += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([
            ("A".into(), 1_000),
            ("B".into(), 1_000),
            ("C".into(), 1_000)
        ])
    );

    // The same numbers in Stats and on /metrics.
    let snapshot = stats(&gw).await;
    assert_eq!(snapshot.policy, "round-robin");
    assert_eq!(snapshot.requests, 3_000);
    for instance in &snapshot.instances {
        assert_eq!(instance.requests, 1_000, "{instance:?}");
        assert_eq!(instance.state, "serving");
        assert!(instance.p50_us > 0.0);
    }
    let metrics = http_get(gateway.metrics_addr.unwrap(), "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics.contains("dlb_gateway_instance_requests_total{instance=\"B\"} 1000"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dlb_gateway_requests_total 3000"),
        "{metrics}"
    );
    let other = http_get(gateway.metrics_addr.unwrap(), "/debug").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");

    stop(gateway, computes).await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    // On a blocking thread: the gateway serves /metrics on this test's runtime.
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || dlb::testing::http_get(addr, &path))
        .await
        .unwrap()
        .unwrap()
}

async fn failover_under_load(signal: &str) {
    let _turn = heavy_turn().await;
    let (mut computes, gateway, gw) = three_processes_behind_a_gateway().await;

    let progress = Arc::new(Progress::default());
    let run = tokio::spawn(bench::run(load(&gateway, 32, 5_000), Arc::clone(&progress)));
    tokio::time::timeout(PATIENCE, async {
        while progress.completed.load(Ordering::Relaxed) < 1_000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let status = computes[1].signal_and_wait(signal);
    if signal == "TERM" {
        assert_eq!(status.code(), Some(0), "a drained instance exits 0");
    }
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.requests, 5_000);
    assert!(
        report.errors.is_empty(),
        "failed calls: {:?}",
        report.errors
    );
    assert_eq!(report.ok, 5_000);

    // B is out of the rotation and receives nothing.
    let state = state_of(&gw, "B").await;
    assert!(state == "ejected" || state == "not_serving", "{state}");
    let report = bench::run(load(&gateway, 4, 300), Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(report.ok, 300);
    assert_eq!(
        report.per_instance.get("B"),
        None,
        "{:?}",
        report.per_instance
    );

    // Restarted on the same port, it is back in rotation within 2 s.
    computes[1].restart();
    wait_serving(&gw, &["A", "B", "C"], Duration::from_secs(2)).await;
    let report = bench::run(load(&gateway, 1, 30), Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(
        report.per_instance.get("B"),
        Some(&10),
        "{:?}",
        report.per_instance
    );

    gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_instance_under_load_loses_no_call() {
    failover_under_load("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_an_instance_under_load_loses_no_call() {
    failover_under_load("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_instance_is_unavailable_at_once_and_service_resumes() {
    let ids = ["A", "B"];
    let computes = in_process(&ids).await;
    let addrs: Vec<_> = computes.iter().map(|c| c.addr).collect();
    let gateway =
        RunningGateway::start(Config::for_tests(vec![]), backends(&computes, &ids), false)
            .await
            .unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &ids, PATIENCE).await;
    for c in computes {
        c.shutdown().await.unwrap();
    }
    wait_serving(&gw, &[], PATIENCE).await;

    // The call carries a 60 s deadline: UNAVAILABLE (not DEADLINE_EXCEEDED) means no waiting.
    let mut request = tonic::Request::new(ReverseRequest { text: "x".into() });
    request.set_timeout(Duration::from_secs(60));
    let status = OperationsClient::new(gw.clone())
        .reverse(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("no healthy instance"),
        "{}",
        status.message()
    );
    // The message names every instance with its state (draining ones may still say not_serving).
    assert!(
        status.message().contains("A ") && status.message().contains("B "),
        "{}",
        status.message()
    );

    // One instance comes back on its old address: service resumes.
    let mut config = dlb_compute::Config::for_tests("A");
    config.listen = addrs[0];
    let back = dlb_compute::testing::start(config).await.unwrap();
    wait_serving(&gw, &["A"], PATIENCE).await;
    let response = reverse(&gw, "back").await.unwrap();
    assert_eq!(response.metadata().get("x-served-by").unwrap(), "A");
    gateway.shutdown().await.unwrap();
    back.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fibonacci_does_not_delay_cheap_calls() {
    let ids = ["A", "B", "C"];
    let (computes, gateway, gw) = gateway_over(&ids, Config::for_tests(vec![])).await;

    let mut client = OperationsClient::new(gw.clone()).max_decoding_message_size(64 << 20);
    let slow = tokio::spawn(async move {
        client
            .fibonacci(FibonacciRequest { n: 10_000_000 })
            .await
            .map(|r| r.into_inner().digits)
    });
    // Wait until it computes somewhere.
    tokio::time::timeout(PATIENCE, async {
        loop {
            let mut busy = 0;
            for c in &computes {
                busy += LoadClient::new(channel(&c.uri()).await)
                    .get_load(GetLoadRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .busy_workers;
            }
            if busy > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    for _ in 0..30 {
        assert_eq!(reverse(&gw, "abc").await.unwrap().into_inner().text, "cba");
    }
    assert!(
        !slow.is_finished(),
        "30 cheap calls were answered while F(10^7) computed"
    );
    assert_eq!(slow.await.unwrap().unwrap(), 2_089_877);
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_is_exceeded_and_the_instance_stops_the_work() {
    let ids = ["A"];
    let (computes, gateway, gw) = gateway_over(&ids, Config::for_tests(vec![])).await;

    let mut request = tonic::Request::new(FibonacciRequest { n: 10_000_000 });
    request.set_timeout(Duration::from_millis(150));
    let status = OperationsClient::new(gw.clone())
        .fibonacci(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline"),
        "{}",
        status.message()
    );

    let mut load = LoadClient::new(channel(&computes[0].uri()).await);
    tokio::time::timeout(PATIENCE, async {
        loop {
            let report = load.get_load(GetLoadRequest {}).await.unwrap().into_inner();
            if report.cancelled == 1 && report.busy_workers == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the instance abandons the computation");
    // The abandoned call is no longer counted in flight at the gateway either.
    tokio::time::timeout(PATIENCE, async {
        while stats(&gw).await.instances.iter().any(|i| i.in_flight > 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("in-flight count back to zero");
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_during_load_fails_no_call_and_logging_resumes() {
    let _turn = heavy_turn().await;
    let mut redis = RedisServer::start();
    let ids = ["A", "B", "C"];
    let computes = in_process(&ids).await;
    let mut config = Config::for_tests(vec![]);
    config.events = EventLogArgs {
        redis: redis.url(),
        ..EventLogArgs::disabled()
    };
    let gateway = RunningGateway::start(config, backends(&computes, &ids), false)
        .await
        .unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &ids, PATIENCE).await;

    let progress = Arc::new(Progress::default());
    let run = tokio::spawn(bench::run(load(&gateway, 16, 3_000), Arc::clone(&progress)));
    tokio::time::timeout(PATIENCE, async {
        while progress.completed.load(Ordering::Relaxed) < 500 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    redis.stop();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.ok, 3_000, "{:?}", report.errors);

    redis.restart();
    let reader = dlb::events::reader::EventReader::new(&redis.url()).unwrap();
    reverse(&gw, "after").await.unwrap();
    let events = tokio::time::timeout(PATIENCE, async {
        loop {
            let events = reader.recent(50).await.unwrap_or_default();
            if events.iter().any(|e| {
                e.request
                    .as_ref()
                    .is_some_and(|r| r.input == "after" && r.op == "Reverse" && r.status == "OK")
            }) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("request events reach Redis again");
    let after = events
        .iter()
        .find(|e| e.request.as_ref().is_some_and(|r| r.input == "after"))
        .unwrap();
    assert_eq!(after.service, "gateway");
    let request = after.request.as_ref().unwrap();
    assert!(ids.contains(&request.backend.as_str()));
    assert_eq!(request.attempts, 1);
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_and_bad_input_are_answered_clearly() {
    let ids = ["A"];
    let mut config = Config::for_tests(vec![]);
    config.max_in_flight = 1;
    let (computes, gateway, gw) = gateway_over(&ids, config).await;

    // An instance's own answer passes through, with who answered and how many tries.
    let status = OperationsClient::new(gw.clone())
        .is_prime(dlb::proto::v1::IsPrimeRequest {
            number: "12a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("number "),
        "{}",
        status.message()
    );
    assert_eq!(status.metadata().get("x-served-by").unwrap(), "A");
    assert_eq!(status.metadata().get("x-attempts").unwrap(), "1");

    let mut client = OperationsClient::new(gw.clone()).max_decoding_message_size(64 << 20);
    let slow =
        tokio::spawn(async move { client.fibonacci(FibonacciRequest { n: 5_000_000 }).await });
    tokio::time::timeout(PATIENCE, async {
        while stats(&gw).await.in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    let status = reverse(&gw, "x").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-in-flight"),
        "{}",
        status.message()
    );
    assert!(slow.await.unwrap().is_ok());
    assert!(reverse(&gw, "x").await.is_ok());
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_streams_a_connection_may_open_wait_and_are_all_served() {
    let ids = ["A"];
    let mut config = Config::for_tests(vec![]);
    config.max_concurrent_streams = 2;
    let (computes, gateway, gw) = gateway_over(&ids, config).await;

    // The bound is announced in the gateway's HTTP/2 SETTINGS, which precede its answer to
    // a PING.
    let tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (_client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().unwrap();
    tokio::select! {
        ended = &mut connection => panic!("the connection ended: {ended:?}"),
        pong = ping.ping(h2::Ping::opaque()) => drop(pong.unwrap()),
    }
    assert_eq!(connection.max_concurrent_send_streams(), 2);

    // Four slow calls at once on a new connection: two are served at a time, the others wait
    // in the caller's client, and every one is answered. (Streams opened before the client
    // has the gateway's SETTINGS may go past the bound; the gateway refuses those unserved,
    // with REFUSED_STREAM, and `Op::send` sends them again.)
    let calls = channel(&gateway.uri()).await;
    let running: Vec<_> = (0..4)
        .map(|_| {
            let mut client = OperationsClient::new(calls.clone());
            tokio::spawn(async move {
                Op::Fibonacci { n: 1_000_000 }
                    .send(&mut client, Some(PATIENCE))
                    .await
            })
        })
        .collect();
    let mut most = 0;
    while !running.iter().all(tokio::task::JoinHandle::is_finished) {
        most = most.max(stats(&gw).await.in_flight);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for call in running {
        call.await.unwrap().unwrap();
    }
    assert_eq!(most, 2, "calls served at once over one connection");
    stop(gateway, computes).await;
}

#[tokio::test]
async fn past_its_connection_limit_new_connections_wait_until_one_closes() {
    let mut config = Config::for_tests(vec![]);
    config.max_connections = Some(2);
    let computes = in_process(&["A"]).await;
    let gateway = RunningGateway::start(config, backends(&computes, &["A"]), true)
        .await
        .unwrap();
    // `gw` is the first connection, `second` the last the bound allows.
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &["A"], PATIENCE).await;
    let second = channel(&gateway.uri()).await;
    assert_eq!(
        reverse(&second, "ab").await.unwrap().into_inner().text,
        "ba"
    );

    // A third connection is not accepted: its call waits (in the listen backlog), unanswered.
    let uri = gateway.uri();
    let waiting = tokio::spawn(async move { reverse(&channel(&uri).await, "abc").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a call over a connection past the bound was answered: {:?}",
        waiting.await
    );
    // The connections within the bound are served meanwhile, and /metrics shows them.
    assert_eq!(reverse(&gw, "xy").await.unwrap().into_inner().text, "yx");
    let metrics = http_get(gateway.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("\ndlb_gateway_connections 2\n")
            && metrics.contains("\ndlb_gateway_max_connections 2\n"),
        "{metrics}"
    );

    // Once one closes, the waiting connection is accepted and its call answered.
    drop(second);
    let answered = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the waiting call was answered once a connection closed")
        .unwrap();
    assert_eq!(answered.unwrap().into_inner().text, "cba");
    stop(gateway, computes).await;
}

#[tokio::test]
async fn a_gateway_out_of_file_descriptors_backs_off_and_serves_again() {
    let computes = in_process(&["A"]).await;
    // The gateway process may open 48 files; its connection bound is far above that.
    let log = std::env::temp_dir().join(format!("dlb-gw-emfile-{}.log", std::process::id()));
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -n 48 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_dlb-gateway"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "none"])
        .args([
            "--redis",
            "none",
            "--threads",
            "1",
            "--max-connections",
            "1000",
        ])
        .arg("--backend")
        .arg(format!("A={}", computes[0].addr))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(dlb::testing::KillOnDrop)
        .unwrap();
    let addr = dlb::testing::listening_addr(&mut child.0);
    let gw = channel(&format!("http://{addr}")).await;
    wait_serving(&gw, &["A"], PATIENCE).await;
    // Its connections to A are opened now, while it has descriptors to spare.
    for _ in 0..8 {
        assert_eq!(reverse(&gw, "ab").await.unwrap().into_inner().text, "ba");
    }

    // More connections than it has descriptors: the rest wait in the listen backlog, and
    // accepting them fails (EMFILE) until some close.
    let mut flood = Vec::new();
    for _ in 0..60 {
        flood.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let said = std::fs::read_to_string(&log).unwrap();
    let retries = said.matches("cannot accept a connection").count();
    // It says so, and tries again every 100 ms rather than at once (an immediate retry fails
    // the same way: a loop taking a whole core, and thousands of these lines).
    assert!(
        (1..=20).contains(&retries),
        "{retries} accept retries in 1.5 s:\n{said}"
    );
    assert_eq!(reverse(&gw, "ab").await.unwrap().into_inner().text, "ba");

    // Once they close, new connections are accepted and served.
    drop(flood);
    let fresh = tokio::time::timeout(PATIENCE, async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(Ok(answer)) = tokio::time::timeout(
                Duration::from_secs(1),
                reverse(&channel(&format!("http://{addr}")).await, "abc"),
            )
            .await
            {
                break answer.into_inner().text;
            }
        }
    })
    .await
    .expect("a new connection was served once the flood closed");
    assert_eq!(fresh, "cba");
    drop(child);
    let _ = std::fs::remove_file(&log);
    for c in computes {
        c.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_is_shed_and_never_ejects_a_healthy_instance() {
    let _turn = heavy_turn().await;
    // Offered far beyond what the gateway can forward here, so that responses pile up unread
    // on its connections to the instances (h2's small-frame guard once closed them, and every
    // instance was ejected: everything answered UNAVAILABLE).
    let (_computes, gateway, gw) = three_processes_behind_a_gateway().await;

    // Over enough connections that the streams they may open exceed --max-in-flight.
    let mut config = load(&gateway, 1, 40_000);
    config.rate = Some(40_000.0);
    config.connections = 16;
    let report = bench::run(config, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(report.requests, 40_000);
    assert!(
        report
            .errors
            .keys()
            .all(|code| code == "RESOURCE_EXHAUSTED" || code == "DEADLINE_EXCEEDED"),
        "an overload is shed, never failed as UNAVAILABLE: {:?} {:?}",
        report.errors,
        report.error_samples
    );
    assert!(
        report.errors.contains_key("RESOURCE_EXHAUSTED"),
        "the load was meant to go past --max-in-flight: {report:?}"
    );
    for id in ["A", "B", "C"] {
        assert_eq!(state_of(&gw, id).await, "serving", "{id}");
    }
    let counters = stats(&gw).await;
    assert!(
        counters.instances.iter().all(|i| i.errors == 0),
        "{counters:?}"
    );
    gateway.shutdown().await.unwrap();
}

/// One call by hand over HTTP/2 (no gRPC client): its grpc-status and grpc-message, from the
/// headers of a trailers-only answer or from the trailers.
async fn raw_call(addr: std::net::SocketAddr, path: &str, body: Vec<u8>) -> (String, String) {
    use tonic::codegen::http;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(bytes::Bytes::from(body), true).unwrap();
    let (head, mut body) = response.await.unwrap().into_parts();
    // grpc-message is percent-encoded.
    let read = |map: &http::HeaderMap, key: &str| {
        let raw = map
            .get(key)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let mut out = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            if raw[i] == b'%' && i + 2 < raw.len() {
                let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(raw[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    if head.headers.contains_key("grpc-status") {
        return (
            read(&head.headers, "grpc-status"),
            read(&head.headers, "grpc-message"),
        );
    }
    while let Some(data) = body.data().await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    (
        read(&trailers, "grpc-status"),
        read(&trailers, "grpc-message"),
    )
}

#[tokio::test]
async fn dlb_clients_send_a_call_again_when_its_stream_was_refused_unprocessed() {
    // R refuses every other call with REFUSED_STREAM (and answers the rest "cba").
    let (refusing, task, _) = resetting_instance(Some(2)).await;
    let mut client = OperationsClient::new(channel(&format!("http://{refusing}")).await);
    let abc = Op::Reverse { text: "abc".into() };
    for _ in 0..3 {
        let (answer, _) = abc.send(&mut client, Some(PATIENCE)).await.unwrap();
        assert_eq!(answer["text"], "cba");
    }
    task.abort();

    // A server that refuses every try: the refusal is reported once the tries are spent.
    let (refusing, task, calls) = resetting_instance(None).await;
    let mut client = OperationsClient::new(channel(&format!("http://{refusing}")).await);
    let status = abc.send(&mut client, Some(PATIENCE)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(dlb::client::refused_unprocessed(&status), "{status:?}");
    assert_eq!(
        calls.load(Ordering::Relaxed),
        dlb::client::REFUSED_STREAM_TRIES as usize
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_only_instance_failed_is_told_why_not_only_that_none_is_left() {
    // R says SERVING, then closes the connection of the first call: it is ejected, and the
    // retry finds no instance. The caller hears about the connection failure.
    let (closing, task, calls) = raw_instance(OnCall::Close).await;
    let (gateway, gw) = gateway_over_r(closing).await;
    let status = reverse(&gw, "abc").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(
        message.starts_with("instances unreachable after 1 attempt(s): ")
            && message.contains("(and no other instance is healthy: R "),
        "{message}"
    );
    assert_eq!(status.metadata().get("x-attempts").unwrap(), "1");
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    // The retry that found no instance is not counted as one made.
    let stats = stats(&gw).await;
    assert_eq!((stats.requests, stats.retries), (1, 0));
    task.abort();
    gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_recycling_its_connections_with_goaway_loses_no_call_and_stays_in() {
    // R answers every call, and closes each connection gracefully after 3 calls on it.
    let (recycling, task, calls) = raw_instance(OnCall::GoAwayAfter { calls: 3 }).await;
    let (gateway, gw) = gateway_over_r(recycling).await;
    let before = stats(&gw).await.instances.remove(0);
    // Eight at a time, so that calls are in flight, and new ones start, as the GOAWAYs come.
    let report = bench::run(load(&gateway, 8, 600), Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_eq!(
        report.ok, 600,
        "{:?} {:?}",
        report.errors, report.error_samples
    );
    assert_eq!(
        calls.load(Ordering::Relaxed),
        600,
        "each call reached R once"
    );
    let after = stats(&gw).await.instances.remove(0);
    assert_eq!(after.state, "serving");
    assert_eq!(after.state_since_ms, before.state_since_ms, "R never left");
    // Not asserted: R's error count. A connection recycled before its first answer came back
    // leaves its latest calls unprocessed as `ClosedUnused`, counted like a reset stream.
    task.abort();
    gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_closes_every_new_connection_at_once_is_ejected() {
    // R's health (on the monitor's connection, made first) goes on saying SERVING, but every
    // connection made after `now` is closed (GOAWAY with NO_ERROR) before it carries a call.
    let now = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (closing, task, calls) = raw_instance(OnCall::GoAwayNewConnections {
        now: Arc::clone(&now),
    })
    .await;
    let (gateway, gw) = gateway_over_r(closing).await;
    now.store(true, Ordering::Relaxed);

    // Each call tries R (up to 3 times); R is ejected once it has closed connections on
    // RESETS_BEFORE_EJECTION tries in a row.
    let mut messages = Vec::new();
    for _ in 0..dlb_gateway::endpoint::RESETS_BEFORE_EJECTION {
        let status = reverse(&gw, "abc").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        messages.push(status.message().to_owned());
        if state_of(&gw, "R").await != "serving" {
            break;
        }
    }
    assert_ne!(
        state_of(&gw, "R").await,
        "serving",
        "R was not ejected: {messages:?}"
    );
    assert!(
        messages
            .iter()
            .all(|m| m.contains("closed a connection that had answered no call")),
        "{messages:?}"
    );
    assert_eq!(calls.load(Ordering::Relaxed), 0);
    task.abort();
    gateway.shutdown().await.unwrap();
}

/// An HTTP/2 server that answers every health check with SERVING (keeping `Watch` open) and
/// resets calls with REFUSED_STREAM, as an instance past its own stream limit does: all of
/// them, or all but every `answer_every`-th, which it answers as `Reverse("abc")`. Also
/// returns the count of calls (not health checks) it received.
async fn resetting_instance(
    answer_every: Option<usize>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    raw_instance(OnCall::Reset { answer_every }).await
}

/// What a raw instance does with a call (health checks are always answered SERVING).
#[derive(Clone)]
enum OnCall {
    /// Resets it with REFUSED_STREAM, or answers every `answer_every`-th.
    Reset { answer_every: Option<usize> },
    /// Closes the connection it came on, answering nothing.
    Close,
    /// Answers it (`Reverse("abc")`), and after every `calls` calls on one connection closes
    /// that connection gracefully (GOAWAY, as a server recycling its connections does).
    GoAwayAfter { calls: usize },
    /// Answers it; once `now` is set, every new connection is closed (GOAWAY with NO_ERROR,
    /// no stream processed) as soon as it is made (connections made before go on).
    GoAwayNewConnections {
        now: Arc<std::sync::atomic::AtomicBool>,
    },
}

/// An HTTP/2 server on 127.0.0.1 port 0 doing `on_call` with every call; see
/// [`resetting_instance`].
async fn raw_instance(
    on_call: OnCall,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use tonic::codegen::http;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let calls = Arc::clone(&calls);
            let on_call = on_call.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                if let OnCall::GoAwayNewConnections { now } = &on_call
                    && now.load(Ordering::Relaxed)
                {
                    // GOAWAY(last stream 0, NO_ERROR): nothing on it will be processed.
                    connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
                let mut on_this_connection = 0;
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let path = request.uri().path().to_owned();
                    let (message, end) = if path.starts_with("/grpc.health.v1.Health/") {
                        // HealthCheckResponse { status: SERVING }; Watch stays open.
                        (
                            &[0u8, 0, 0, 0, 2, 0x08, 0x01][..],
                            !path.ends_with("/Watch"),
                        )
                    } else {
                        let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
                        on_this_connection += 1;
                        let answer_every = match &on_call {
                            OnCall::Reset { answer_every } => *answer_every,
                            // Dropping the connection closes it.
                            OnCall::Close => return,
                            OnCall::GoAwayAfter { calls } => {
                                if on_this_connection % calls == 0 {
                                    // Streams already open are still served; accept() ends
                                    // once they are done.
                                    connection.graceful_shutdown();
                                }
                                Some(1)
                            }
                            OnCall::GoAwayNewConnections { .. } => Some(1),
                        };
                        if answer_every.is_none_or(|every| !n.is_multiple_of(every)) {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        // ReverseResponse { text: "cba" }
                        (&[0u8, 0, 0, 0, 5, 0x0a, 3, b'c', b'b', b'a'][..], true)
                    };
                    // Answered from a task of its own: the connection must go on being
                    // polled while the request body is read.
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        while let Some(Ok(data)) = body.data().await {
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                        let head = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(head, false) else {
                            return;
                        };
                        let _ = send.send_data(bytes::Bytes::from_static(message), false);
                        if end {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let _ = send.send_trailers(trailers);
                        } else {
                            std::future::pending::<()>().await;
                        }
                    });
                }
                // Closed gracefully: what is queued still goes out before the socket closes.
                let _ = std::future::poll_fn(|cx| connection.poll_closed(cx)).await;
            });
        }
    });
    (addr, task, counted)
}

/// Instance B and `resetting` as R behind a gateway; `calls` sequential `Reverse("abc")`
/// calls, each checked. Returns R's stats before and after, and the calls retried.
async fn calls_beside(
    resetting: std::net::SocketAddr,
    calls: usize,
) -> (
    dlb::proto::v1::InstanceStats,
    dlb::proto::v1::InstanceStats,
    BTreeMap<String, usize>,
    u64,
) {
    let computes = in_process(&["B"]).await;
    let mut list = backends(&computes, &["B"]);
    list.push(Backend {
        id: "R".to_owned(),
        addr: resetting.to_string(),
    });
    let (gateway, gw) = gateway_with(Config::for_tests(vec![]), list, &["B", "R"]).await;
    let r_of = |s: dlb::proto::v1::StatsResponse| {
        s.instances.into_iter().find(|i| i.instance == "R").unwrap()
    };
    let before = r_of(stats(&gw).await);
    let mut client = OperationsClient::new(gw.clone());
    let mut served_by = BTreeMap::new();
    let mut retried = 0;
    for _ in 0..calls {
        let response = client
            .reverse(ReverseRequest { text: "abc".into() })
            .await
            .unwrap();
        let by = response.metadata().get("x-served-by").unwrap();
        *served_by
            .entry(by.to_str().unwrap().to_owned())
            .or_insert(0) += 1;
        if response.metadata().get("x-attempts").unwrap() != "1" {
            retried += 1;
        }
        assert_eq!(response.into_inner().text, "cba");
    }
    let after = r_of(stats(&gw).await);
    stop(gateway, computes).await;
    (before, after, served_by, retried)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_is_retried_elsewhere_and_its_instance_stays_in_rotation() {
    // R resets every other call it gets: never RESETS_BEFORE_EJECTION in a row.
    let (addr, server, _) = resetting_instance(Some(2)).await;
    let (before, after, served_by, retried) = calls_beside(addr, 12).await;
    server.abort();
    assert!(
        served_by["R"] >= 2,
        "R answered too few calls: {served_by:?}"
    );
    assert!(retried >= 2, "R reset too few calls: {retried} retried");
    assert_eq!(after.errors, retried, "each reset counts against R");
    assert_eq!(after.state, "serving");
    assert_eq!(
        after.state_since_ms, before.state_since_ms,
        "R left the rotation after a reset stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_resets_every_call_is_ejected_after_a_few() {
    let (addr, server, _) = resetting_instance(None).await;
    let (before, after, served_by, retried) = calls_beside(addr, 12).await;
    server.abort();
    assert_eq!(served_by.get("R"), None, "R answered: {served_by:?}");
    assert!(
        after.errors >= u64::from(dlb_gateway::endpoint::RESETS_BEFORE_EJECTION),
        "R was tried {} times",
        after.errors
    );
    assert!(retried >= after.errors, "every reset call was retried on B");
    assert_ne!(
        after.state_since_ms, before.state_since_ms,
        "R stayed in rotation though it reset every call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_requests_get_clear_errors_and_serving_goes_on() {
    let ids = ["A"];
    let mut config = Config::for_tests(vec![]);
    config.max_message_bytes = 1024;
    let (computes, gateway, gw) = gateway_over(&ids, config).await;

    // Over --max-message-bytes: refused by the gateway, which names the sizes and the flag.
    let status = reverse(&gw, &"x".repeat(2000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("is 2003 bytes, over the limit of 1024 bytes (--max-message-bytes)"),
        "{}",
        status.message()
    );

    // No such method.
    let (code, message) = raw_call(gateway.addr, "/dlb.v1.Operations/Nope", vec![0; 5]).await;
    assert_eq!(code, "12", "{message}");
    assert!(message.contains("Nope"), "{message}");

    // Not a gRPC message: too short, or shorter than its prefix announces.
    let (code, message) = raw_call(gateway.addr, "/dlb.v1.Operations/Reverse", vec![0; 3]).await;
    assert_eq!(code, "13", "{message}");
    assert!(message.contains("carries no gRPC message"), "{message}");
    let (code, message) = raw_call(
        gateway.addr,
        "/dlb.v1.Operations/Reverse",
        vec![0, 0, 0, 0, 10, 0x0a, 1, b'x'],
    )
    .await;
    assert_eq!(code, "13", "{message}");
    assert!(
        message.contains("10 bytes announced, 3 received"),
        "{message}"
    );

    // A well-formed call by hand is relayed byte for byte: Reverse("ab") is "ba".
    let (code, message) = raw_call(
        gateway.addr,
        "/dlb.v1.Operations/Reverse",
        vec![0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b'],
    )
    .await;
    assert_eq!(code, "0", "{message}");

    // Still serving, and none of that counted against the instance.
    assert_eq!(reverse(&gw, "abc").await.unwrap().into_inner().text, "cba");
    let counters = stats(&gw).await;
    assert!(
        counters.instances.iter().all(|i| i.errors == 0),
        "{counters:?}"
    );
    stop(gateway, computes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_crosses_the_gateway_intact() {
    // 3 MiB each way: many HTTP/2 frames, forwarded in the pieces they arrived in.
    let ids = ["A"];
    let (computes, gateway, gw) = gateway_over(&ids, Config::for_tests(vec![])).await;
    let text: String = (0..3 * 1024 * 1024 / 8)
        .map(|i| format!("{:07}é", i % 9_999_999))
        .collect::<String>();
    let expected: String = text.chars().rev().collect();
    let response = reverse(&gw, &text).await.unwrap();
    assert_eq!(response.metadata().get("x-served-by").unwrap(), "A");
    assert!(
        response.into_inner().text == expected,
        "the reversed text differs"
    );
    stop(gateway, computes).await;
}
