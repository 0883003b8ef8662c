//! Instances that die, drain, reset streams or close connections under load: no call is lost.

use super::*;

pub(crate) async fn failover_under_load(signal: &str) {
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

/// Instance B and `resetting` as R behind a gateway; `calls` sequential `Reverse("abc")`
/// calls, each checked. Returns R's stats before and after, and the calls retried.
pub(crate) async fn calls_beside(
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
