//! Event log benchmarks against a private redis-server:
//! - `emit`: the caller's cost of logging one event (criterion);
//! - writer throughput: events per second the batched, pipelined writer gets into Redis,
//!   against one `LPUSH` + `LTRIM` round trip per event (the original's way), interleaved in
//!   the same run, same Redis; medians of 3.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion};
use dlb::events::{EventLog, EventLogConfig, RequestFields, preview};
use dlb::testing::RedisServer;
use tokio_util::sync::CancellationToken;

const BATCHED_EVENTS: usize = 100_000;
const NAIVE_EVENTS: usize = 10_000;

fn request(n: usize) -> RequestFields {
    RequestFields {
        request_id: format!("{n:016x}"),
        op: "Reverse".into(),
        backend: "A".into(),
        status: "OK".into(),
        latency_us: 250,
        attempts: 1,
        input: preview("hello"),
        trace_id: None,
    }
}

fn emit_cost(c: &mut Criterion, runtime: &tokio::runtime::Runtime, redis: &RedisServer) {
    let _guard = runtime.enter();
    let stop = CancellationToken::new();
    let (log, _writer) = EventLog::start(
        EventLogConfig::new(&redis.url()),
        "bench",
        "B",
        stop.clone(),
    );
    // The caller builds its fields anyway; only `emit` itself is timed.
    c.bench_function("event_log/emit_request", |b| {
        b.iter_batched(
            || request(1),
            |fields| log.request(black_box(fields)),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("event_log/emit_lifecycle", |b| {
        b.iter(|| log.lifecycle(black_box("started"), &[("addr", "127.0.0.1:13001")]))
    });
    stop.cancel();
}

async fn batched(redis: &RedisServer) -> f64 {
    let stop = CancellationToken::new();
    let mut config = EventLogConfig::new(&redis.url());
    config.queue_bound = BATCHED_EVENTS;
    let (log, writer) = EventLog::start(config, "bench", "B", stop.clone());
    log.lifecycle("warm-up", &[]);
    while log.stats().written < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = Instant::now();
    for n in 0..BATCHED_EVENTS {
        log.request(request(n));
    }
    while log.stats().written < 1 + BATCHED_EVENTS as u64 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let rate = BATCHED_EVENTS as f64 / start.elapsed().as_secs_f64();
    assert_eq!(log.stats().dropped, 0);
    stop.cancel();
    writer.await.unwrap();
    rate
}

async fn naive(redis: &RedisServer) -> f64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let start = Instant::now();
    for n in 0..NAIVE_EVENTS {
        let payload = serde_json::to_string(&request(n)).unwrap();
        let _: () = redis::cmd("LPUSH")
            .arg("lb_logs")
            .arg(payload)
            .query_async(&mut connection)
            .await
            .unwrap();
        let _: () = redis::cmd("LTRIM")
            .arg("lb_logs")
            .arg(0)
            .arg(999)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    NAIVE_EVENTS as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = RedisServer::start();
    let mut criterion = Criterion::default().configure_from_args();
    emit_cost(&mut criterion, &runtime, &redis);
    criterion.final_summary();

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ours.push(runtime.block_on(batched(&redis)));
        theirs.push(runtime.block_on(naive(&redis)));
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        "\nevent log writer: batched {ours:.0} events/s, one LPUSH+LTRIM round trip per event \
         {theirs:.0} events/s: {:.1}x (median of 3, same Redis)",
        ours / theirs
    );
}
