//! The load generator behind `dlb bench`: every dlb performance claim is measured with.
//!
//! Two modes over any list of addresses, with several HTTP/2 connections per address:
//! - closed loop: `concurrency` workers each send the next request as soon as the last returns;
//! - open loop: requests start at a fixed `rate`, each timed from its *intended* start, so a slow
//!   server cannot hide its stalls by slowing the generator (no coordinated omission).
//!
//! Latencies go into HdrHistograms (nanoseconds, 3 significant digits); results carry
//! throughput, percentiles, errors by gRPC code and the split by `x-served-by`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Instant;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;

use crate::client::Op;
use crate::proto::v1::operations_client::OperationsClient;

/// Default connections opened to each address.
pub const DEFAULT_CONNECTIONS: usize = 4;

/// Default closed-loop concurrency.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// In open loop, requests outstanding at once before the generator waits (their latency still
/// counts from their intended start).
pub const MAX_OPEN_LOOP_IN_FLIGHT: usize = 10_000;

/// Highest latency recorded exactly, in nanoseconds (larger values are clamped): 5 minutes.
const MAX_LATENCY_NS: u64 = 300_000_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Addresses to spread requests over.
    pub addrs: Vec<String>,
    /// The request sent, again and again.
    pub op: Op,
    /// Closed-loop workers (ignored in open loop).
    pub concurrency: usize,
    /// Open-loop rate in requests per second; `None` for closed loop.
    pub rate: Option<f64>,
    /// HTTP/2 connections per address.
    pub connections: usize,
    /// Unrecorded run time before measuring.
    pub warmup: Duration,
    /// Measured run time (used when `requests` is `None`).
    pub duration: Duration,
    /// Stop after this many measured requests instead of after `duration`.
    pub requests: Option<u64>,
    /// Per-request deadline.
    pub timeout: Duration,
    /// TLS towards the addresses, if on.
    pub tls: Option<crate::tls::ClientTls>,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// No address given.
    #[error("no address to benchmark: give at least one --addr")]
    NoAddress,
    /// A bad setting.
    #[error("{0}")]
    Invalid(String),
    /// An address does not parse.
    #[error(transparent)]
    Addr(#[from] crate::dial::AddrError),
    /// A connection could not be opened.
    #[error("cannot connect to {addr}: {}", crate::status::error_chain(source))]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// The result of a benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Operation benchmarked.
    pub op: &'static str,
    /// Addresses used.
    pub addrs: Vec<String>,
    /// Closed-loop concurrency, if closed loop.
    pub concurrency: Option<usize>,
    /// Target rate, if open loop.
    pub rate: Option<f64>,
    /// Total HTTP/2 connections.
    pub connections: usize,
    /// Measured requests completed.
    pub requests: u64,
    /// Of which succeeded.
    pub ok: u64,
    /// Failures by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// The first failure's message for each code (what went wrong, not just how often).
    pub error_samples: BTreeMap<String, String>,
    /// Measured time, seconds.
    pub elapsed_secs: f64,
    /// Completed requests per second.
    pub throughput: f64,
    /// Latency of all measured requests (successes and failures).
    pub latency: Latency,
    /// Completed requests by `x-served-by` (responses without it are under `-`).
    pub per_instance: BTreeMap<String, u64>,
}

/// Live counters, for a progress line while the benchmark runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Measured requests completed so far.
    pub completed: AtomicU64,
    /// Of which failed.
    pub errors: AtomicU64,
    /// True during warm-up.
    pub warming_up: AtomicBool,
}

/// What each worker accumulates; merged at the end.
struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    samples: BTreeMap<&'static str, String>,
    per_instance: BTreeMap<String, u64>,
}

impl Tally {
    #[allow(clippy::expect_used)]
    fn new() -> Self {
        Self {
            // Constant, valid bounds (low >= 1, high >= 2 * low, sigfig <= 5): cannot fail.
            histogram: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .expect("constant histogram bounds are valid"),
            ok: 0,
            errors: BTreeMap::new(),
            samples: BTreeMap::new(),
            per_instance: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: &Outcome) {
        let ns = u64::try_from(latency.as_nanos())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_LATENCY_NS);
        self.histogram.saturating_record(ns);
        match outcome.code {
            None => self.ok += 1,
            Some(code) => {
                *self.errors.entry(code).or_insert(0) += 1;
                if let Some(message) = &outcome.message {
                    self.samples.entry(code).or_insert_with(|| message.clone());
                }
            }
        }
        let instance = outcome.served_by.as_deref().unwrap_or("-");
        if let Some(count) = self.per_instance.get_mut(instance) {
            *count += 1;
        } else {
            self.per_instance.insert(instance.to_owned(), 1);
        }
    }

    fn merge(&mut self, other: Tally) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_insert(0) += n;
        }
        for (code, message) in other.samples {
            self.samples.entry(code).or_insert(message);
        }
        for (instance, n) in other.per_instance {
            *self.per_instance.entry(instance).or_insert(0) += n;
        }
    }
}

/// One response, reduced to what the report needs.
struct Outcome {
    code: Option<&'static str>,
    served_by: Option<String>,
    /// The error's message, for failures.
    message: Option<String>,
}

async fn send_one(client: &mut OperationsClient<Channel>, op: &Op, timeout: Duration) -> Outcome {
    match op.send(client, Some(timeout)).await {
        Ok((_, metadata)) => Outcome {
            code: None,
            message: None,
            served_by: metadata
                .get(crate::metadata::SERVED_BY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
        Err(status) => Outcome {
            code: Some(crate::client::failure_code(&status)),
            message: Some(crate::client::status_message(&status)),
            served_by: status
                .metadata()
                .get(crate::metadata::SERVED_BY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
    }
}

async fn connect(config: &BenchConfig) -> Result<Vec<OperationsClient<Channel>>, BenchError> {
    let mut clients = Vec::new();
    for addr in &config.addrs {
        for _ in 0..config.connections {
            let channel = crate::dial::endpoint_tls(addr, config.tls.as_ref())?
                .connect()
                .await
                .map_err(|source| BenchError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            clients.push(
                OperationsClient::new(channel)
                    .max_decoding_message_size(crate::dial::MAX_RESPONSE_BYTES),
            );
        }
    }
    Ok(clients)
}

/// Runs the benchmark described by `config`, updating `progress` as it goes.
///
/// # Errors
///
/// [`BenchError`] when the configuration is invalid or an address cannot be reached.
pub async fn run(config: BenchConfig, progress: Arc<Progress>) -> Result<BenchReport, BenchError> {
    if config.addrs.is_empty() {
        return Err(BenchError::NoAddress);
    }
    if config.connections == 0 {
        return Err(BenchError::Invalid(
            "--connections must be at least 1".into(),
        ));
    }
    if config.rate.is_none() && config.concurrency == 0 {
        return Err(BenchError::Invalid(
            "--concurrency must be at least 1".into(),
        ));
    }
    if let Some(rate) = config.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(BenchError::Invalid(format!(
            "--rate must be a positive number of requests per second, got {rate}"
        )));
    }
    if config.requests == Some(0) {
        return Err(BenchError::Invalid("--requests must be at least 1".into()));
    }
    let clients = connect(&config).await?;
    let connections = clients.len();
    progress
        .warming_up
        .store(!config.warmup.is_zero(), Ordering::Relaxed);
    let (tally, elapsed) = match config.rate {
        None => closed_loop(&config, clients, &progress).await,
        Some(rate) => open_loop(&config, clients, rate, &progress).await,
    };
    let h = &tally.histogram;
    let us = |ns: u64| ns as f64 / 1000.0;
    let requests = h.len();
    let elapsed_secs = elapsed.as_secs_f64();
    Ok(BenchReport {
        mode: if config.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        op: config.op.name(),
        addrs: config.addrs.clone(),
        concurrency: config.rate.is_none().then_some(config.concurrency),
        rate: config.rate,
        connections,
        requests,
        ok: tally.ok,
        errors: tally
            .errors
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        error_samples: tally
            .samples
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        elapsed_secs,
        throughput: if elapsed_secs > 0.0 {
            requests as f64 / elapsed_secs
        } else {
            0.0
        },
        latency: if requests == 0 {
            Latency::default()
        } else {
            Latency {
                p50_us: us(h.value_at_quantile(0.5)),
                p90_us: us(h.value_at_quantile(0.9)),
                p99_us: us(h.value_at_quantile(0.99)),
                p999_us: us(h.value_at_quantile(0.999)),
                max_us: us(h.max()),
                mean_us: h.mean() / 1000.0,
            }
        },
        per_instance: tally.per_instance,
    })
}

/// Shared stop rule: by count of measured requests, or by the end of the measured window.
struct Budget {
    measure_from: Instant,
    until: Option<Instant>,
    remaining: Option<AtomicU64>,
}

impl Budget {
    fn new(config: &BenchConfig, start: Instant) -> Self {
        let measure_from = start + config.warmup;
        Self {
            measure_from,
            until: config
                .requests
                .is_none()
                .then_some(measure_from + config.duration),
            remaining: config.requests.map(AtomicU64::new),
        }
    }

    /// May another request start at `now`? Returns `Some(measured)` if so.
    fn take(&self, now: Instant) -> Option<bool> {
        let measured = now >= self.measure_from;
        if !measured {
            return Some(false);
        }
        if let Some(until) = self.until
            && now >= until
        {
            return None;
        }
        if let Some(remaining) = &self.remaining {
            let left =
                remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if left.is_err() {
                return None;
            }
        }
        Some(true)
    }
}

async fn closed_loop(
    config: &BenchConfig,
    clients: Vec<OperationsClient<Channel>>,
    progress: &Arc<Progress>,
) -> (Tally, Duration) {
    let start = Instant::now();
    let budget = Arc::new(Budget::new(config, start));
    let mut workers = Vec::with_capacity(config.concurrency);
    for i in 0..config.concurrency {
        let mut client = clients[i % clients.len()].clone();
        let op = config.op.clone();
        let timeout = config.timeout;
        let budget = Arc::clone(&budget);
        let progress = Arc::clone(progress);
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut last_end = None;
            loop {
                let sent = Instant::now();
                let Some(measured) = budget.take(sent) else {
                    break;
                };
                let outcome = send_one(&mut client, &op, timeout).await;
                let done = Instant::now();
                if measured {
                    progress.warming_up.store(false, Ordering::Relaxed);
                    tally.record(done - sent, &outcome);
                    progress.completed.fetch_add(1, Ordering::Relaxed);
                    if outcome.code.is_some() {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    last_end = Some(done);
                }
            }
            (tally, last_end)
        }));
    }
    let mut total = Tally::new();
    let mut end = budget.measure_from;
    for worker in workers {
        if let Ok((tally, last_end)) = worker.await {
            total.merge(tally);
            if let Some(last_end) = last_end {
                end = end.max(last_end);
            }
        }
    }
    (total, end.saturating_duration_since(budget.measure_from))
}

async fn open_loop(
    config: &BenchConfig,
    clients: Vec<OperationsClient<Channel>>,
    rate: f64,
    progress: &Arc<Progress>,
) -> (Tally, Duration) {
    let start = Instant::now();
    let budget = Budget::new(config, start);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let slots = Arc::new(Semaphore::new(MAX_OPEN_LOOP_IN_FLIGHT));
    let clients = clients.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Duration, Outcome, Instant)>();
    let collector = {
        let progress = Arc::clone(progress);
        tokio::spawn(async move {
            let mut tally = Tally::new();
            let mut end = None;
            while let Some((latency, outcome, done)) = rx.recv().await {
                progress.warming_up.store(false, Ordering::Relaxed);
                progress.completed.fetch_add(1, Ordering::Relaxed);
                if outcome.code.is_some() {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
                tally.record(latency, &outcome);
                end = Some(done);
            }
            (tally, end)
        })
    };
    // The schedule runs on its own OS thread: its sleeps are precise to tens of microseconds,
    // where tokio's timer rounds up to whole milliseconds and would add that to every latency.
    let runtime = tokio::runtime::Handle::current();
    let dispatcher = {
        let clients = clients.clone();
        let op = config.op.clone();
        let timeout = config.timeout;
        std::thread::spawn(move || {
            let mut i: u64 = 0;
            loop {
                // Each request's intended start is fixed by the schedule, whatever happens to
                // the others.
                let intended = start + interval.mul_f64(i as f64);
                i += 1;
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                let Some(measured) = budget.take(intended) else {
                    break;
                };
                let Ok(slot) = runtime.block_on(Arc::clone(&slots).acquire_owned()) else {
                    break;
                };
                let mut client = clients[(i as usize) % clients.len()].clone();
                let op = op.clone();
                let tx = tx.clone();
                runtime.spawn(async move {
                    let outcome = send_one(&mut client, &op, timeout).await;
                    let done = Instant::now();
                    drop(slot);
                    if measured {
                        let _ = tx.send((done - intended, outcome, done));
                    }
                });
            }
            budget.measure_from
        })
    };
    let measure_from = tokio::task::spawn_blocking(move || dispatcher.join())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(start);
    let (tally, end) = collector.await.unwrap_or_else(|_| (Tally::new(), None));
    let end = end.unwrap_or(measure_from);
    (tally, end.saturating_duration_since(measure_from))
}
