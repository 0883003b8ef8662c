//! Gray failures: instances that degrade instead of dying, behind a real `dlb-gateway`
//! process. The degraded instances are Python grpcio servers (`tests/interop/grpc_peer.py`)
//! told on stdin to fail while their health stays SERVING; the full ones are real
//! `dlb-compute` processes with room for two calls each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ChildStdin;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dlb::client::bench::{self, BenchConfig, Progress};
use dlb::proto::v1::operations_client::OperationsClient;
use dlb::proto::v1::{FibonacciRequest, InstanceStats, ReverseRequest};
use dlb::testing::{KillOnDrop, PATIENCE};
use dlb_gateway::Config;
use dlb_gateway::config::Policy;
use dlb_gateway::membership::{MemberChange, Membership};
use dlb_gateway::testing::RunningGateway;
use support::interop::PythonScript;
use support::{ComputeProcess, channel, gateway_process, stats};
use tonic::Code;
use tonic::transport::Channel;

/// A Python grpcio instance whose answers the test changes on its stdin.
struct Peer {
    id: &'static str,
    addr: String,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    _child: KillOnDrop,
}

impl Peer {
    fn start(id: &'static str) -> Self {
        let script = PythonScript::start("grpc_peer.py", &["server"]);
        let addr = script.listening_addr();
        Self {
            id,
            addr,
            stdin: script.stdin,
            lines: script.lines,
            _child: script.child,
        }
    }

    /// Tells it how to answer ("fail 13", "heal"); returns once it has applied it.
    fn tell(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        let done = self
            .lines
            .recv_timeout(PATIENCE)
            .expect("the peer's answer");
        assert_eq!(done, format!("done: {line}"));
    }

    /// Waits until it has said `n` calls were cancelled before their answer (bounded).
    fn wait_cancelled(&mut self, n: usize) {
        for seen in 0..n {
            let line = self
                .lines
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("{seen} of {n} calls cancelled at {}", self.id));
            assert_eq!(line, "cancelled");
        }
    }
}

/// The tests here measure shares and counts under load: one at a time, so that another's
/// load does not skew them on two cores.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `dlb-gateway` process over `backends` with `flags`, and a channel to it.
async fn gateway(backends: &[(&str, &str)], flags: &[&str]) -> (KillOnDrop, Channel) {
    let flags: Vec<&str> = ["--redis", "none"].iter().chain(flags).copied().collect();
    let (child, addr) = gateway_process(backends, &flags, &[]);
    let channel = channel(&format!("http://{addr}")).await;
    (child, channel)
}

async fn instances(gateway: &Channel) -> BTreeMap<String, InstanceStats> {
    stats(gateway)
        .await
        .instances
        .into_iter()
        .map(|i| (i.instance.clone(), i))
        .collect()
}

async fn wait_serving(gateway: &Channel, n: usize) {
    dlb::testing::eventually("every instance serving", || async {
        let all = instances(gateway).await;
        (all.values().filter(|i| i.state == "serving").count() == n).then_some(())
    })
    .await;
}

/// What `n` calls made `concurrency` at a time got.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    failed: BTreeMap<String, usize>,
    served_by: BTreeMap<String, usize>,
}

impl Tally {
    fn failures(&self) -> usize {
        self.failed.values().sum()
    }
}

/// `n` Reverse calls, `concurrency` at a time, each with `metadata` (the peers echo the
/// request, so "hello" comes back as is).
async fn reverse_calls(
    gateway: &Channel,
    n: usize,
    concurrency: usize,
    metadata: &[(&'static str, &'static str)],
) -> Tally {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut client = OperationsClient::new(gateway.clone());
        let next = std::sync::Arc::clone(&next);
        let metadata = metadata.to_vec();
        tasks.spawn(async move {
            let mut tally = Tally::default();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let mut request = tonic::Request::new(ReverseRequest {
                    text: "hello".into(),
                });
                request.set_timeout(Duration::from_secs(5));
                for (key, value) in &metadata {
                    request.metadata_mut().insert(*key, value.parse().unwrap());
                }
                match client.reverse(request).await {
                    Ok(answer) => {
                        let by = answer.metadata().get("x-served-by").unwrap();
                        *tally
                            .served_by
                            .entry(by.to_str().unwrap().to_owned())
                            .or_default() += 1;
                        tally.ok += 1;
                    }
                    Err(status) => {
                        let name = dlb::status::code_name(status.code()).to_owned();
                        *tally.failed.entry(name).or_default() += 1;
                    }
                }
            }
            tally
        });
    }
    let mut total = Tally::default();
    while let Some(tally) = tasks.join_next().await {
        let tally = tally.unwrap();
        total.ok += tally.ok;
        for (k, v) in tally.failed {
            *total.failed.entry(k).or_default() += v;
        }
        for (k, v) in tally.served_by {
            *total.served_by.entry(k).or_default() += v;
        }
    }
    total
}

/// An instance answering INTERNAL to every call while its health says SERVING is ejected:
/// after 600 calls, at most 1% of the next 3,000 fail (the bar). Its ejection is
/// told in stats (why, until when) and it comes back within two ejection periods of answering
/// well again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_failing_while_serving_is_ejected_and_back_once_it_answers_well() {
    let _turn = TURN.lock().await;
    let mut peers: Vec<Peer> = ["A", "B", "C"].into_iter().map(Peer::start).collect();
    let backends: Vec<(&str, &str)> = peers.iter().map(|p| (p.id, p.addr.as_str())).collect();
    // Ejections of 1 s (the default is 30 s, growing): the test sees several come and go.
    let (_gateway, gw) = gateway(
        &backends,
        &[
            "--outlier-ejection-ms",
            "1000",
            "--outlier-max-ejection-ms",
            "1000",
        ],
    )
    .await;
    wait_serving(&gw, 3).await;

    peers[1].tell("fail 13");
    let warm = reverse_calls(&gw, 600, 8, &[]).await;
    let ejected = instances(&gw).await["B"].clone();
    assert!(ejected.ejections >= 1, "{ejected:?} after {warm:?}");
    let after = reverse_calls(&gw, 3_000, 8, &[]).await;
    eprintln!("first 600: {warm:?}\nnext 3,000: {after:?}");
    assert!(
        after.failures() <= 30,
        "{} of the next 3,000 calls failed: {after:?}",
        after.failures()
    );
    assert!(
        after.failed.keys().all(|k| k == "INTERNAL"),
        "only B's own answers fail: {after:?}"
    );

    // Seen in stats while out: why, and when it is back. (Calls go on meanwhile: B may be
    // back on probation, and its next call ejects it again.)
    let seen = dlb::testing::eventually("B ejected, with why", || async {
        reverse_calls(&gw, 20, 2, &[]).await;
        let b = instances(&gw).await["B"].clone();
        (!b.ejection.is_empty() && b.state == "ejected").then_some(b)
    })
    .await;
    assert!(seen.ejection.contains("INTERNAL"), "{:?}", seen.ejection);
    assert!(seen.back_at_ms > 0, "{seen:?}");

    peers[1].tell("heal");
    let healed = Instant::now();
    dlb::testing::eventually("B serving calls again", || async {
        let tally = reverse_calls(&gw, 30, 1, &[]).await;
        (tally.failures() == 0 && tally.served_by.get("B").copied().unwrap_or(0) > 0).then_some(())
    })
    .await;
    let back_after = healed.elapsed();
    assert!(
        back_after <= Duration::from_millis(2_000),
        "back {back_after:?} after answering well (two 1 s ejection periods allowed)"
    );
    let b = instances(&gw).await["B"].clone();
    assert!(b.ejection.is_empty() && b.state == "serving", "{b:?}");
}

/// The cap: with 3 of 4 instances failing and the default 50% cap, exactly two are ejected
/// and the third stays in; the good one is never ejected. Before that, calls failing as the
/// caller's mistake (INVALID_ARGUMENT) eject nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_keeps_half_the_pool_and_the_callers_own_errors_eject_nothing() {
    let _turn = TURN.lock().await;
    let mut peers: Vec<Peer> = ["A", "B", "C", "D"].into_iter().map(Peer::start).collect();
    let backends: Vec<(&str, &str)> = peers.iter().map(|p| (p.id, p.addr.as_str())).collect();
    let (_gateway, gw) = gateway(&backends, &[]).await;
    wait_serving(&gw, 4).await;

    // x-want-code makes each peer answer that status: the caller's fault, counted nowhere.
    let invalid = reverse_calls(&gw, 200, 4, &[("x-want-code", "3")]).await;
    assert_eq!(
        invalid.failed.get("INVALID_ARGUMENT"),
        Some(&200),
        "{invalid:?}"
    );
    let all = instances(&gw).await;
    assert!(
        all.values()
            .all(|i| i.ejections == 0 && i.state == "serving"),
        "{all:?}"
    );

    for peer in &mut peers[..3] {
        peer.tell("fail 13");
    }
    let tally = reverse_calls(&gw, 400, 4, &[]).await;
    let all = instances(&gw).await;
    let ejected: Vec<&str> = all
        .values()
        .filter(|i| !i.ejection.is_empty())
        .map(|i| i.instance.as_str())
        .collect();
    assert_eq!(ejected.len(), 2, "{all:?} after {tally:?}");
    assert!(!ejected.contains(&"D"), "the good one stays: {all:?}");
    assert_eq!(all["D"].ejections, 0, "{all:?}");
    let kept: Vec<&InstanceStats> = all
        .values()
        .filter(|i| i.instance != "D" && i.ejection.is_empty())
        .collect();
    assert_eq!(kept.len(), 1, "one failing instance stays in: {all:?}");
    assert_eq!(kept[0].state, "serving", "{all:?}");
    // What the kept one answers still reaches callers; D serves the rest.
    assert!(tally.served_by.contains_key("D"), "{tally:?}");
}

/// Three computes with room for two calls each (`--workers 1 --queue 1`) and five callers of
/// Fibonacci(100000) (rounds of 300 calls): a compute refusing for a full pool says so with a pushback
/// (`grpc-retry-pushback-ms`), the gateway sends the call to another with room, and no caller
/// sees RESOURCE_EXHAUSTED. The refusals did happen: the gateway counts retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_by_a_full_pool_go_to_one_with_room() {
    let _turn = TURN.lock().await;
    let computes: Vec<ComputeProcess> = ["F1", "F2", "F3"]
        .into_iter()
        .map(|id| {
            ComputeProcess::start_with(
                &[],
                id,
                "127.0.0.1:0",
                &["--redis", "none", "--workers", "1", "--queue", "1"],
            )
        })
        .collect();
    let backends: Vec<(&str, &str)> = computes
        .iter()
        .map(|c| (c.id.as_str(), c.addr.as_str()))
        .collect();
    // Strict rotation, which fills a pool while another has room. (The weighted policy,
    // the default, sees the calls in flight and seldom sends one to a full pool at all.)
    let (_gateway, gw) = gateway(&backends, &["--policy", "round-robin"]).await;
    wait_serving(&gw, 3).await;

    // Rounds of 300 calls until a pool was full at least once (how often five callers meet
    // in one pool is up to timing), at most five.
    let calls = 300usize;
    let mut failed = Vec::new();
    let mut s = stats(&gw).await;
    for _ in 0..5 {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let mut client = OperationsClient::new(gw.clone());
            let next = std::sync::Arc::clone(&next);
            tasks.spawn(async move {
                let mut failed = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                    let mut request = tonic::Request::new(FibonacciRequest { n: 100_000 });
                    request.set_timeout(PATIENCE);
                    match client.fibonacci(request).await {
                        Ok(answer) => assert_eq!(answer.into_inner().digits, 20_899),
                        Err(status) => failed.push((status.code(), status.message().to_owned())),
                    }
                }
                failed
            });
        }
        while let Some(result) = tasks.join_next().await {
            failed.extend(result.unwrap());
        }
        s = stats(&gw).await;
        eprintln!(
            "{} calls: {} failed, {} retries; served {:?}",
            s.requests,
            failed.len(),
            s.retries,
            s.instances
                .iter()
                .map(|i| (i.instance.clone(), i.requests))
                .collect::<Vec<_>>()
        );
        if s.retries > 0 {
            break;
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        !failed
            .iter()
            .any(|(code, _)| *code == Code::ResourceExhausted),
        "no RESOURCE_EXHAUSTED reached a caller"
    );
    assert!(s.retries > 0, "the pools were full at times: {s:?}");
    assert!(
        s.instances.iter().all(|i| i.ejections == 0),
        "refusals for load eject nobody: {s:?}"
    );
}

/// Membership a test drives: each change sent is applied.
struct Driven(tokio::sync::mpsc::UnboundedReceiver<MemberChange>);

impl Membership for Driven {
    fn changes(
        self: Box<Self>,
    ) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = MemberChange> + Send>> {
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(self.0))
    }
}

/// Who answered the calls of one second of open-loop load at `rate` calls per second.
async fn one_second_at(gateway: std::net::SocketAddr, rate: f64) -> BTreeMap<String, u64> {
    let config = BenchConfig {
        addrs: vec![gateway.to_string()],
        op: dlb::client::Op::Reverse {
            text: "hello".into(),
        },
        concurrency: 64,
        rate: Some(rate),
        connections: 2,
        warmup: Duration::ZERO,
        duration: Duration::from_secs(1),
        requests: None,
        timeout: Duration::from_secs(5),
        tls: None,
    };
    let report = bench::run(config, std::sync::Arc::new(Progress::default()))
        .await
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.error_samples);
    report.per_instance
}

fn share(counts: &BTreeMap<String, u64>, id: &str) -> f64 {
    let total: u64 = counts.values().sum();
    counts.get(id).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

/// Slow start (`--policy weighted`, 15 s by default): an instance added under an open loop
/// of 2,000 calls per second over three gets at most 10% of the calls in its first 5 s (its
/// steady share is 25%), then its share grows second by second, without a dip, to about a
/// quarter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_ramps_up_from_a_small_share() {
    let _turn = TURN.lock().await;
    let computes: Vec<ComputeProcess> = ["A", "B", "C", "D"]
        .into_iter()
        .map(|id| ComputeProcess::start(id, "127.0.0.1:0"))
        .collect();
    let (changes, membership) = tokio::sync::mpsc::unbounded_channel();
    let mut config = Config::for_tests(vec![]);
    config.policy = Policy::Weighted;
    let gateway = RunningGateway::with_membership(config, Box::new(Driven(membership)))
        .await
        .unwrap();
    let gw = channel(&gateway.uri()).await;
    for compute in &computes[..3] {
        changes
            .send(MemberChange::Upsert(compute.backend()))
            .unwrap();
    }
    wait_serving(&gw, 3).await;
    // The three have been in for a while (slow start is over) and their latencies are known.
    for _ in 0..3 {
        one_second_at(gateway.addr, 2_000.0).await;
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        one_second_at(gateway.addr, 500.0).await;
    }

    changes
        .send(MemberChange::Upsert(computes[3].backend()))
        .unwrap();
    wait_serving(&gw, 4).await;
    let mut first = BTreeMap::new();
    let mut shares = Vec::new();
    let added = Instant::now();
    while added.elapsed() < Duration::from_secs(5) {
        let counts = one_second_at(gateway.addr, 2_000.0).await;
        shares.push(share(&counts, "D"));
        for (id, n) in counts {
            *first.entry(id).or_insert(0) += n;
        }
    }
    let early = share(&first, "D");
    while added.elapsed() < Duration::from_secs(19) {
        shares.push(share(&one_second_at(gateway.addr, 2_000.0).await, "D"));
    }
    eprintln!(
        "D's share in its first 5 s: {:.1}%; second by second: {:?}",
        early * 100.0,
        shares
            .iter()
            .map(|s| (s * 1000.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    assert!(early <= 0.10, "{:.1}% in the first 5 s", early * 100.0);
    // Rising without a dip: each second at least the best before it, less 4 points of noise.
    let mut best: f64 = 0.0;
    for (second, s) in shares.iter().enumerate() {
        assert!(
            *s >= best - 0.04,
            "second {second}: {:.1}% after {:.1}% ({shares:?})",
            s * 100.0,
            best * 100.0
        );
        best = best.max(*s);
    }
    let last = shares[shares.len() - 1];
    assert!(
        (0.20..=0.30).contains(&last),
        "steady share {:.1}% (a quarter expected)",
        last * 100.0
    );
    gateway.shutdown().await.unwrap();
}

/// Hedging (`--hedge-after`): a call its instance has not answered within the delay is sent to
/// another instance; the first answer goes to the caller and the slower copy is cancelled at
/// its instance, whose work on it stops there (the peer says so). Every call succeeds, and
/// the gateway counts the hedges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_first_instance_sits_on_is_hedged_and_the_copy_cancelled() {
    let _turn = TURN.lock().await;
    let mut peers: Vec<Peer> = ["A", "B"].into_iter().map(Peer::start).collect();
    peers[1].tell("delay 5000");
    let backends: Vec<(&str, &str)> = peers.iter().map(|p| (p.id, p.addr.as_str())).collect();
    // Strict rotation, so that half of the first copies go to B.
    let (_gateway, gw) = gateway(
        &backends,
        &["--policy", "round-robin", "--hedge-after", "50"],
    )
    .await;
    wait_serving(&gw, 2).await;
    let mut client = OperationsClient::new(gw.clone());
    let mut hedged = 0;
    for _ in 0..10 {
        let answer = client
            .reverse(ReverseRequest {
                text: "hello".into(),
            })
            .await
            .unwrap();
        let attempts = answer
            .metadata()
            .get("x-attempts")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(answer.metadata().get("x-served-by").unwrap(), "A");
        if attempts == "2" {
            hedged += 1;
        }
    }
    // B got at least every other first copy (a hedge's pick moves the rotation on too);
    // each was hedged to A, and cancelled at B.
    assert!(hedged >= 5, "{hedged} hedged");
    peers[1].wait_cancelled(hedged);
    let s = stats(&gw).await;
    assert_eq!((s.hedges, s.failures), (hedged as u64, 0), "{s:?}");
}
