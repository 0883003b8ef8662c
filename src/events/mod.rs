//! The centralized event log: every dlb service writes its events to one Redis list.
//!
//! An event enters through [`EventLog::emit`], a plain (non-async) function that stamps it and
//! pushes it on a bounded in-memory queue: it never waits on Redis. One background writer
//! ([`writer`]) takes batches off the queue (up to [`EventLogConfig::batch_max`] events, after a
//! short [`EventLogConfig::flush_interval`] to let a batch fill) and sends each batch as one
//! pipeline: `LPUSH lb_logs e1 .. ek`, `LTRIM lb_logs 0 max-1`, and one `PUBLISH lb_logs:live e`
//! per event for live tails. When Redis is unreachable the queue keeps the newest events up to
//! its bound and drops the oldest, counting every drop; the writer reconnects with backoff.
//!
//! The reading side ([`reader`]) serves the dashboard: [`reader::EventReader::recent`] reads
//! the list, [`reader::EventReader::tail`] follows the pub/sub channel. Pub/sub is
//! fire-and-forget, so a reader that reconnects first re-reads `recent`, then tails.
//!
//! Delivery is at least once: if Redis applied a batch but the reply was lost, the batch is
//! queued again and may appear twice.

pub mod reader;
pub mod time;
pub mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The Redis list events go to, newest first (the original's name).
pub const DEFAULT_KEY: &str = "lb_logs";

/// The pub/sub channel every written event is also published on, for live tails.
pub const DEFAULT_CHANNEL: &str = "lb_logs:live";

/// Default Redis URL (`--redis`, `DLB_REDIS_URL`).
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Default cap of the list: `LRANGE lb_logs 0 49` shows the latest 50 of these.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000;

/// Default number of events held in memory while Redis is slow or away.
pub const DEFAULT_QUEUE_BOUND: usize = 10_000;

/// Default largest batch sent as one pipeline.
pub const DEFAULT_BATCH_MAX: usize = 256;

/// Default time the writer waits for a batch to fill before sending it.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(5);

/// Default longest wait between reconnection attempts (it starts at 50 ms and doubles).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Longest input preview kept in a request event, in characters.
pub const INPUT_PREVIEW_CHARS: usize = 64;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One call through the gateway.
    Request,
    /// A change of an instance's health (only on change).
    Health,
    /// A service or instance started, drained, stopped, crashed, restarted.
    Lifecycle,
    /// Something failed.
    Error,
}

/// The fields of a request event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFields {
    /// Unique id of the request.
    pub request_id: String,
    /// Operation, e.g. `Reverse`.
    pub op: String,
    /// Instance that answered (or the last one tried).
    pub backend: String,
    /// gRPC status code name, e.g. `OK`, `INVALID_ARGUMENT`.
    pub status: String,
    /// Latency as seen by the service that logs it, microseconds.
    pub latency_us: u64,
    /// Instances tried.
    pub attempts: u32,
    /// The start of the input, at most [`INPUT_PREVIEW_CHARS`] characters (`…` marks a cut).
    pub input: String,
    /// The W3C trace id of the call (32 hex digits), when it came with a `traceparent` or the
    /// gateway traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// One entry of the event log, stored in Redis as one JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// UTC time, RFC 3339 with milliseconds: `2026-11-27T02:10:25.065Z`.
    pub ts: String,
    /// The same instant in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `compute`, `gateway`, `control` or `ui`.
    pub service: String,
    /// The instance id of the service that logged the event.
    pub instance: String,
    /// What the event is about.
    pub kind: Kind,
    /// A short constant phrase: `started`, `draining`, `health changed`, `call`.
    pub message: String,
    /// Extra context (for example `addr`, `from`, `to`, `error`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// Present on request events; flattened into the object.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestFields>,
}

/// An event as queued: only what the caller knows, so `emit` stays cheap. The writer turns it
/// into an [`Event`] (timestamp text, service, instance) off the caller's path.
#[derive(Debug, Clone)]
struct Pending {
    ts_ms: u64,
    kind: Kind,
    message: &'static str,
    fields: Vec<(&'static str, String)>,
    request: Option<RequestFields>,
}

impl Pending {
    fn into_event(self, service: &str, instance: &str) -> Event {
        Event {
            ts: time::rfc3339_ms(self.ts_ms),
            ts_ms: self.ts_ms,
            service: service.to_owned(),
            instance: instance.to_owned(),
            kind: self.kind,
            message: self.message.to_owned(),
            fields: self
                .fields
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            request: self.request,
        }
    }
}

/// Cuts `input` to [`INPUT_PREVIEW_CHARS`] characters, marking a cut with `…`.
pub fn preview(input: &str) -> String {
    match input.char_indices().nth(INPUT_PREVIEW_CHARS) {
        None => input.to_owned(),
        Some((cut, _)) => format!("{}…", &input[..cut]),
    }
}

/// A Redis URL without its password, for printing and for pages.
pub fn redact_url(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// How the event log connects and how much it buffers.
#[derive(Debug, Clone)]
pub struct EventLogConfig {
    /// Redis URL; `None` turns the log off (events are counted as dropped).
    pub redis_url: Option<String>,
    /// List key.
    pub key: String,
    /// Pub/sub channel for live tails.
    pub channel: String,
    /// Cap of the list.
    pub max_entries: usize,
    /// Events held in memory at most; beyond it the oldest are dropped and counted.
    pub queue_bound: usize,
    /// Largest batch per pipeline.
    pub batch_max: usize,
    /// Wait for a batch to fill.
    pub flush_interval: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl EventLogConfig {
    /// Defaults for `url`; `"none"` or an empty string turns the log off.
    pub fn new(url: &str) -> Self {
        let url = url.trim();
        Self {
            redis_url: (!url.is_empty() && !url.eq_ignore_ascii_case("none"))
                .then(|| url.to_owned()),
            key: DEFAULT_KEY.to_owned(),
            channel: DEFAULT_CHANNEL.to_owned(),
            max_entries: DEFAULT_MAX_ENTRIES,
            queue_bound: DEFAULT_QUEUE_BOUND,
            batch_max: DEFAULT_BATCH_MAX,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }

    /// A log that writes nowhere.
    pub fn disabled() -> Self {
        Self::new("none")
    }
}

/// Event log flags shared by every service binary.
#[derive(Debug, Clone, clap::Args)]
pub struct EventLogArgs {
    /// Redis URL of the event log ("none" turns it off). Services start and serve without Redis.
    #[arg(long = "redis", env = "DLB_REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub redis: String,
    /// Entries kept in the Redis list `lb_logs` (newest first).
    #[arg(long, env = "DLB_LOG_MAX_ENTRIES", default_value_t = DEFAULT_MAX_ENTRIES)]
    pub log_max_entries: usize,
    /// Events buffered in memory while Redis is away; beyond it the oldest are dropped and counted.
    #[arg(long, env = "DLB_LOG_QUEUE", default_value_t = DEFAULT_QUEUE_BOUND)]
    pub log_queue: usize,
}

impl EventLogArgs {
    /// The flags as a configuration.
    ///
    /// # Errors
    ///
    /// A one-line message naming a bad flag.
    pub fn config(&self) -> Result<EventLogConfig, String> {
        if self.log_max_entries == 0 {
            return Err("--log-max-entries must be at least 1".to_owned());
        }
        if self.log_queue == 0 {
            return Err("--log-queue must be at least 1".to_owned());
        }
        let mut config = EventLogConfig::new(&self.redis);
        if let Some(url) = &config.redis_url {
            redis::Client::open(url.as_str())
                .map_err(|e| format!("--redis {url:?} is not a valid Redis URL: {e}"))?;
        }
        config.max_entries = self.log_max_entries;
        config.queue_bound = self.log_queue;
        Ok(config)
    }

    /// Event log flags for tests: no Redis.
    pub fn disabled() -> Self {
        Self {
            redis: "none".to_owned(),
            log_max_entries: DEFAULT_MAX_ENTRIES,
            log_queue: DEFAULT_QUEUE_BOUND,
        }
    }
}

/// Counters of the event log, for callers to expose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventStats {
    /// Events given to `emit`.
    pub emitted: u64,
    /// Events written to Redis.
    pub written: u64,
    /// Events waiting in memory now.
    pub queued: u64,
    /// Events dropped because the queue was full (or the log is off).
    pub dropped: u64,
    /// Connections re-established after one was lost or refused.
    pub reconnects: u64,
    /// Whether the writer holds a working connection.
    pub connected: bool,
}

/// The bounded queue and counters shared by emitters and the writer.
#[derive(Debug)]
struct Shared {
    service: String,
    instance: String,
    enabled: bool,
    queue: Mutex<VecDeque<Pending>>,
    bound: usize,
    wake: Notify,
    emitted: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    /// Events of a disabled log: each both emitted and dropped, counted once (one atomic
    /// per call instead of two, on a line the threads share).
    disabled: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicBool,
}

impl Shared {
    /// An empty queue of at most `bound` events (at least one), all counters at zero.
    fn new(service: &str, instance: &str, enabled: bool, bound: usize) -> Self {
        Self {
            service: service.to_owned(),
            instance: instance.to_owned(),
            enabled,
            queue: Mutex::new(VecDeque::new()),
            bound: bound.max(1),
            wake: Notify::new(),
            emitted: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            disabled: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        // A panic while holding the lock leaves a valid VecDeque; keep using it.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, event: Pending) {
        if !self.enabled {
            self.disabled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.emitted.fetch_add(1, Ordering::Relaxed);
        {
            let mut queue = self.lock();
            if queue.len() >= self.bound {
                queue.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(event);
        }
        self.wake.notify_one();
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn take_batch(&self, max: usize) -> Vec<Pending> {
        let mut queue = self.lock();
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    /// Returns a batch that could not be written to the front of the queue. The batch is older
    /// than anything queued since, so when room is short its oldest events are the ones dropped.
    fn put_back(&self, batch: Vec<Pending>) {
        let mut queue = self.lock();
        let room = self.bound.saturating_sub(queue.len());
        let keep = batch.len().min(room);
        let lost = batch.len() - keep;
        self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        for event in batch.into_iter().rev().take(keep) {
            queue.push_front(event);
        }
    }
}

/// The fields every request event has in Redis (part of the public contract; `fields` is
/// there only when not empty).
pub const REQUEST_EVENT_FIELDS: [&str; 13] = [
    "ts",
    "ts_ms",
    "service",
    "instance",
    "kind",
    "message",
    "request_id",
    "op",
    "backend",
    "status",
    "latency_us",
    "attempts",
    "input",
];

/// The writer task of a service's event log (see [`EventLog::spawn`]).
#[derive(Debug)]
pub struct Writer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Writer {
    /// Makes one bounded attempt to write what is queued, then ends the writer.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A cheap-to-clone handle to the event log of one service instance.
#[derive(Debug, Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

impl EventLog {
    /// [`EventLog::start`] with its own stop: a service's log and its [`Writer`], which
    /// [`Writer::finish`] flushes and ends when the service stops.
    pub fn spawn(config: EventLogConfig, service: &str, instance: &str) -> (Self, Writer) {
        let stop = CancellationToken::new();
        let (log, task) = Self::start(config, service, instance, stop.clone());
        (log, Writer { stop, task })
    }

    /// Starts the log for `service`/`instance`: spawns the writer on the current tokio runtime.
    /// The writer stops when `cancel` fires, after one last bounded flush.
    pub fn start(
        config: EventLogConfig,
        service: &str,
        instance: &str,
        cancel: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let shared = Arc::new(Shared::new(
            service,
            instance,
            config.redis_url.is_some(),
            config.queue_bound,
        ));
        let writer = tokio::spawn(writer::run(Arc::clone(&shared), config, cancel));
        (Self { shared }, writer)
    }

    /// Stamps an event with the time and queues it. Never waits; when the queue is full the
    /// oldest queued event is dropped (and counted) to make room.
    pub fn emit(
        &self,
        kind: Kind,
        message: &'static str,
        fields: Vec<(&'static str, String)>,
        request: Option<RequestFields>,
    ) {
        self.shared.push(Pending {
            ts_ms: time::now_ms(),
            kind,
            message,
            fields,
            request,
        });
    }

    /// A lifecycle event (`started`, `draining`, `stopped`, ...).
    pub fn lifecycle(&self, message: &'static str, fields: &[(&'static str, &str)]) {
        self.emit(Kind::Lifecycle, message, owned(fields), None);
    }

    /// An error event.
    pub fn error(&self, message: &'static str, fields: &[(&'static str, &str)]) {
        self.emit(Kind::Error, message, owned(fields), None);
    }

    /// A health change event.
    pub fn health(&self, message: &'static str, fields: &[(&'static str, &str)]) {
        self.emit(Kind::Health, message, owned(fields), None);
    }

    /// Whether events go anywhere (a log without Redis only counts them).
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled
    }

    /// A request event.
    pub fn request(&self, request: RequestFields) {
        self.emit(Kind::Request, "call", Vec::new(), Some(request));
    }

    /// A request event made by `make` only when the log is enabled: a disabled log counts it
    /// (emitted and dropped) without the allocations and the clock read of making one, which
    /// a gateway would otherwise pay on every call it relays.
    pub fn request_with(&self, make: impl FnOnce() -> RequestFields) {
        if self.shared.enabled {
            self.request(make());
        } else {
            self.shared.disabled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub fn stats(&self) -> EventStats {
        let s = &self.shared;
        let disabled = s.disabled.load(Ordering::Relaxed);
        EventStats {
            emitted: s.emitted.load(Ordering::Relaxed) + disabled,
            written: s.written.load(Ordering::Relaxed),
            queued: s.len() as u64,
            dropped: s.dropped.load(Ordering::Relaxed) + disabled,
            reconnects: s.reconnects.load(Ordering::Relaxed),
            connected: s.connected.load(Ordering::Relaxed),
        }
    }
}

fn owned(fields: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    fields.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://:***@10.0.0.5:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("none"), "none");
    }

    fn event(n: u64) -> Pending {
        Pending {
            ts_ms: n,
            kind: Kind::Lifecycle,
            message: "test",
            fields: Vec::new(),
            request: None,
        }
    }

    fn shared(bound: usize) -> Shared {
        Shared::new("test", "T", true, bound)
    }

    fn messages(s: &Shared) -> Vec<u64> {
        s.lock().iter().map(|e| e.ts_ms).collect()
    }

    #[test]
    fn full_queue_drops_oldest_and_counts() {
        let s = shared(3);
        for n in 0..5 {
            s.push(event(n));
        }
        assert_eq!(messages(&s), vec![2, 3, 4]);
        assert_eq!(s.dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn failed_batch_goes_back_in_front_keeping_the_newest() {
        let s = shared(4);
        for n in 0..4 {
            s.push(event(n));
        }
        let batch = s.take_batch(3); // 0, 1, 2 in flight
        s.push(event(4));
        s.push(event(5)); // queue: 3, 4, 5; room for one more
        s.put_back(batch);
        assert_eq!(messages(&s), vec![2, 3, 4, 5]);
        assert_eq!(s.dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn events_serialize_flat_with_every_field() {
        let mut pending = event(1_795_745_425_065);
        pending.kind = Kind::Request;
        pending.fields.push(("addr", "127.0.0.1:1".to_owned()));
        pending.request = Some(RequestFields {
            request_id: "r1".into(),
            op: "Reverse".into(),
            backend: "A".into(),
            status: "OK".into(),
            latency_us: 412,
            attempts: 1,
            input: preview("hello"),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        });
        let e = pending.into_event("gateway", "gw1");
        let json: serde_json::Value = serde_json::to_value(&e).unwrap();
        for field in REQUEST_EVENT_FIELDS {
            assert!(json.get(field).is_some(), "{field} in {json}");
        }
        assert_eq!(json["kind"], "request");
        assert_eq!(json["ts"], "2026-11-27T02:10:25.065Z");
        assert_eq!(json["fields"]["addr"], "127.0.0.1:1");
        assert_eq!(json["service"], "gateway");
        assert_eq!(json["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn previews_are_cut_by_characters() {
        assert_eq!(preview("short"), "short");
        let long = "é".repeat(100);
        let p = preview(&long);
        assert_eq!(p.chars().count(), INPUT_PREVIEW_CHARS + 1);
        assert!(p.ends_with('…'));
    }
}
