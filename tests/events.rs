//! The event log against a real `redis-server`: order, cap, schema, recent, tail, and what
//! happens while Redis is away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dlb::events::reader::EventReader;
use dlb::events::{EventLog, EventLogConfig, Kind, RequestFields, preview};
use dlb::testing::RedisServer;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use dlb::testing::PATIENCE;

fn config(redis: &RedisServer) -> EventLogConfig {
    let mut config = EventLogConfig::new(&redis.url());
    config.max_backoff = Duration::from_millis(200);
    config
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    dlb::testing::eventually(what, || std::future::ready(done().then_some(()))).await;
}

async fn list(redis: &RedisServer, key: &str) -> Vec<serde_json::Value> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut connection)
        .await
        .unwrap();
    entries
        .iter()
        .map(|e| serde_json::from_str(e).expect("every entry is JSON"))
        .collect()
}

fn request(n: usize) -> RequestFields {
    RequestFields {
        request_id: format!("req-{n}"),
        op: "Reverse".into(),
        backend: "A".into(),
        status: "OK".into(),
        latency_us: 100 + n as u64,
        attempts: 1,
        input: preview(&format!("input {n} <script>{}", "x".repeat(200))),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
    }
}

#[tokio::test]
async fn entries_are_newest_first_capped_and_complete() {
    let redis = RedisServer::start();
    let mut config = config(&redis);
    config.max_entries = 100;
    let stop = CancellationToken::new();
    let (log, writer) = EventLog::start(config, "gateway", "gw1", stop.clone());
    for n in 0..250 {
        log.request(request(n));
    }
    wait_for("250 written", || log.stats().written == 250).await;

    let entries = list(&redis, "lb_logs").await;
    assert_eq!(entries.len(), 100);
    for (i, entry) in entries.iter().enumerate() {
        let n = 249 - i;
        assert_eq!(entry["request_id"], format!("req-{n}"), "newest first");
        for field in dlb::events::REQUEST_EVENT_FIELDS {
            assert!(entry.get(field).is_some(), "{field} in {entry}");
        }
        assert_eq!(entry["service"], "gateway");
        assert_eq!(entry["instance"], "gw1");
        assert_eq!(entry["kind"], "request");
        assert!(entry["ts"].as_str().unwrap().ends_with('Z'));
        let input = entry["input"].as_str().unwrap();
        assert!(
            input.chars().count() <= dlb::events::INPUT_PREVIEW_CHARS + 1,
            "{input}"
        );
    }

    let reader = EventReader::new(&redis.url()).unwrap();
    let recent = reader.recent(50).await.unwrap();
    assert_eq!(recent.len(), 50);
    let ids: Vec<String> = recent
        .iter()
        .map(|e| e.request.as_ref().unwrap().request_id.clone())
        .collect();
    let expected: Vec<String> = (200..250).rev().map(|n| format!("req-{n}")).collect();
    assert_eq!(ids, expected);

    stop.cancel();
    writer.await.unwrap();
}

#[tokio::test]
async fn tail_delivers_new_events() {
    let redis = RedisServer::start();
    let stop = CancellationToken::new();
    let (log, writer) = EventLog::start(config(&redis), "compute", "A", stop.clone());
    let reader = EventReader::new(&redis.url()).unwrap();
    let mut tail = Box::pin(reader.tail().await.unwrap());
    log.lifecycle("started", &[("addr", "127.0.0.1:13001")]);
    let event = tokio::time::timeout(PATIENCE, tail.next())
        .await
        .expect("an event within the patience bound")
        .expect("the tail is open");
    assert_eq!(event.kind, Kind::Lifecycle);
    assert_eq!(event.message, "started");
    assert_eq!(event.fields["addr"], "127.0.0.1:13001");
    stop.cancel();
    writer.await.unwrap();
}

#[tokio::test]
async fn outage_keeps_the_newest_events_and_counts_drops_exactly() {
    const BOUND: usize = 1_000;
    const EMITTED: usize = 10_000;
    let mut redis = RedisServer::start();
    let mut config = config(&redis);
    config.queue_bound = BOUND;
    config.max_entries = 5_000;
    let stop = CancellationToken::new();
    let (log, writer) = EventLog::start(config, "gateway", "gw1", stop.clone());
    log.lifecycle("before outage", &[]);
    wait_for("first event written", || log.stats().written == 1).await;

    redis.stop();
    // `emit` is a plain function: it cannot await Redis, whatever state Redis is in.
    for n in 0..EMITTED {
        log.request(request(n));
    }
    let stats = log.stats();
    assert_eq!(stats.emitted, 1 + EMITTED as u64);
    // Every event is written, queued, in one batch in flight, or dropped and counted.
    wait_for("the writer to notice the outage", || {
        let s = log.stats();
        !s.connected && s.queued == BOUND as u64
    })
    .await;
    assert_eq!(log.stats().dropped, (EMITTED - BOUND) as u64);
    assert!(!writer.is_finished(), "the writer survives the outage");

    redis.restart();
    wait_for("queued events written after restart", || {
        log.stats().written == 1 + BOUND as u64
    })
    .await;
    let stats = log.stats();
    assert_eq!(stats.dropped, (EMITTED - BOUND) as u64);
    assert_eq!(stats.queued, 0);
    assert!(stats.reconnects >= 1, "{stats:?}");

    // The restarted Redis has no persistence: it holds exactly the newest BOUND events.
    let entries = list(&redis, "lb_logs").await;
    assert_eq!(entries.len(), BOUND);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry["request_id"], format!("req-{}", EMITTED - 1 - i));
    }

    // And it keeps working.
    log.lifecycle("after outage", &[]);
    wait_for("one more", || log.stats().written == 2 + BOUND as u64).await;
    stop.cancel();
    writer.await.unwrap();
}

#[tokio::test]
async fn a_log_started_without_redis_writes_once_redis_appears() {
    let port = dlb::testing::free_port();
    let mut config = EventLogConfig::new(&format!("redis://127.0.0.1:{port}"));
    config.max_backoff = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let (log, writer) = EventLog::start(config, "compute", "A", stop.clone());
    log.lifecycle("started", &[]);
    wait_for("a failed connection attempt", || !log.stats().connected).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(log.stats().written, 0);

    let redis = RedisServer::start_on(port);
    wait_for("the queued event written", || log.stats().written == 1).await;
    let entries = list(&redis, "lb_logs").await;
    assert_eq!(entries[0]["message"], "started");
    stop.cancel();
    writer.await.unwrap();
}

#[tokio::test]
async fn a_disabled_log_counts_events_as_dropped() {
    let stop = CancellationToken::new();
    let (log, writer) = EventLog::start(EventLogConfig::disabled(), "compute", "A", stop.clone());
    log.lifecycle("started", &[]);
    assert_eq!(log.stats().dropped, 1);
    assert_eq!(log.stats().queued, 0);
    // A request event is counted without being made (a gateway makes one per call).
    log.request_with(|| panic!("a disabled log made a request event"));
    let stats = log.stats();
    assert_eq!((stats.emitted, stats.dropped, stats.queued), (2, 2, 0));
    stop.cancel();
    writer.await.unwrap();
}
