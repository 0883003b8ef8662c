//! An endpoint: one compute instance as the gateway sees it. [`EndpointStats`] holds its state
//! and traffic counters (read by stats and metrics); [`EndpointService`] is the `tower::Service`
//! the balancer holds for it, spreading calls over its HTTP/2 connections, counting them, and
//! reporting connection failures to the health monitor (passive ejection).

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tower::Service;

use crate::conn::{Answer, Conn};
use crate::failure::{Failure, classify};
use crate::lock;
use crate::outlier::{Detector, Ejection, OutlierSettings};

/// How far back the request rate looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// An endpoint's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not yet heard from.
    Connecting,
    /// Health says SERVING: in the rotation.
    Serving,
    /// Health says NOT_SERVING (for example draining after SIGTERM): out of the rotation.
    NotServing,
    /// Unreachable, or a call failed at the connection level: out of the rotation until its
    /// health says SERVING again.
    Ejected,
    /// Being drained on purpose: out of the rotation. Reserved: today control takes a draining
    /// instance out of the membership instead, and its health then says NOT_SERVING.
    Draining,
}

impl State {
    /// Lower-case name, as in stats and events.
    pub fn name(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Serving => "serving",
            State::NotServing => "not_serving",
            State::Ejected => "ejected",
            State::Draining => "draining",
        }
    }
}

/// Marks a response with the endpoint that produced it (an http extension).
#[derive(Debug, Clone)]
pub struct ServedBy(pub Arc<str>);

/// Filled by the endpoint a request goes to with its id, as soon as it is picked (an http
/// extension): a hedge then goes to another.
#[derive(Debug, Clone, Default)]
pub struct PickedBy(pub Arc<std::sync::OnceLock<Arc<str>>>);

/// Marks a request with the instances its call already tried (an http extension): the
/// balancer sends it elsewhere if another instance is ready (see [`crate::balance::Avoid`]).
#[derive(Debug, Clone)]
pub struct Tried {
    /// The instances.
    pub ids: Vec<Arc<str>>,
    /// A hedge: never to one of them (see [`crate::balance::Avoid::strictly`]).
    pub strictly: bool,
}

impl crate::balance::Avoid<Arc<str>> for http::Request<Outgoing> {
    fn avoids(&self, key: &Arc<str>) -> bool {
        self.extensions()
            .get::<Tried>()
            .is_some_and(|tried| tried.ids.contains(key))
    }

    fn strictly(&self) -> bool {
        self.extensions().get::<Tried>().is_some_and(|t| t.strictly)
    }

    fn avoids_any(&self) -> bool {
        self.extensions()
            .get::<Tried>()
            .is_some_and(|tried| !tried.ids.is_empty())
    }
}

/// Microseconds since the first call, on the monotonic clock (never steps with the wall clock).
fn monotonic_us() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// State and counters of one endpoint.
#[derive(Debug)]
pub struct EndpointStats {
    /// Instance id.
    pub id: Arc<str>,
    /// host:port.
    pub addr: String,
    state: Mutex<(State, u64)>,
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    /// A call failed below gRPC (connection refused, reset, ...): the balancer skips it until
    /// its health monitor has seen it SERVING again, so retries go elsewhere meanwhile.
    suspect: std::sync::atomic::AtomicBool,
    /// Calls whose stream the instance reset since its last answer (see
    /// [`RESETS_BEFORE_EJECTION`]).
    resets_in_a_row: std::sync::atomic::AtomicU32,
    /// When it last made progress: answered a call or a probe, or became busy (microseconds
    /// on the monotonic clock, see [`monotonic_us`]).
    progress_us: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    rate_samples: Mutex<VecDeque<(Instant, u64)>>,
    /// Its answers as outlier detection sees them, and its ejection.
    outlier: Mutex<Detector>,
    /// Woken when an outlier ejection starts (its monitor takes it out of the ring).
    outlier_ejected: Notify,
    /// Latency of its unary answers (the weighted policy's input).
    latency: Mutex<Option<LatencyAverage>>,
}

/// An endpoint's latency, microseconds: the quickest of its first two answers, then an EWMA
/// over [`LATENCY_DECAY`] and at least [`LATENCY_SAMPLES`] answers, fed the median of the last
/// three. One answer delayed by something else (a first call that opened the connection, the
/// host preempting the instance or the gateway) does not make an instance look slow for a
/// second and cost it its share, while two slow answers in three do at once.
#[derive(Clone, Copy, Debug)]
struct LatencyAverage {
    value: f64,
    /// When it last moved.
    at: Instant,
    /// Answers seen.
    samples: u32,
    /// The last three answers, newest first (copies of the first one at the start).
    recent: [f64; 3],
}

impl LatencyAverage {
    fn first(sample: f64, at: Instant) -> Self {
        Self {
            value: sample,
            at,
            samples: 1,
            recent: [sample; 3],
        }
    }

    /// Takes an answer's latency.
    fn answered(&mut self, sample: f64, now: Instant) {
        self.recent = [sample, self.recent[0], self.recent[1]];
        self.samples = self.samples.saturating_add(1);
        if self.samples < 3 {
            self.value = self.value.min(sample);
        } else {
            let mut sorted = self.recent;
            sorted.sort_by(f64::total_cmp);
            self.moved_towards(sorted[1], now);
        }
        self.at = now;
    }

    /// Moves towards `sample` by time (63% after LATENCY_DECAY without a sample), and at least
    /// by count (the first answers are averaged).
    fn moved_towards(&mut self, sample: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let by_time = 1.0 - (-elapsed / LATENCY_DECAY.as_secs_f64()).exp();
        let by_count = 1.0 / f64::from(self.samples.clamp(1, LATENCY_SAMPLES));
        self.value += (sample - self.value) * by_time.max(by_count);
    }
}

/// Each answer moves an endpoint's latency EWMA at least by 1/this (the first ones are
/// averaged), however close together they come.
pub const LATENCY_SAMPLES: u32 = 20;

/// How fast an endpoint's latency fades while no answer updates it (the weighted policy then
/// tries it again): to 37% after this long.
pub const LATENCY_STALE: Duration = Duration::from_secs(10);

/// The time constant of an endpoint's latency EWMA: a sample after a pause this long moves it
/// 63% of the way; a stream of samples, by their share of it.
pub const LATENCY_DECAY: Duration = Duration::from_secs(1);

/// A point-in-time copy of [`EndpointStats`].
#[derive(Debug, Clone)]
pub struct EndpointSnapshot {
    /// Instance id.
    pub id: String,
    /// host:port.
    pub addr: String,
    /// State now.
    pub state: State,
    /// Since when (ms since the epoch).
    pub state_since_ms: u64,
    /// Calls sent.
    pub requests: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Calls in flight.
    pub in_flight: u64,
    /// Calls per second over [`RATE_WINDOW`].
    pub rate: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// The outlier ejection in force: why, and when it ends (ms since the epoch).
    pub ejection: Option<(String, u64)>,
    /// Outlier ejections so far.
    pub ejections: u64,
}

impl EndpointStats {
    /// A new endpoint in state `Connecting`.
    #[allow(clippy::expect_used)]
    pub fn new(id: &str, addr: &str) -> Self {
        Self {
            id: Arc::from(id),
            addr: addr.to_owned(),
            state: Mutex::new((State::Connecting, dlb::events::time::now_ms())),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            suspect: std::sync::atomic::AtomicBool::new(false),
            resets_in_a_row: std::sync::atomic::AtomicU32::new(0),
            progress_us: AtomicU64::new(monotonic_us()),
            // Constant, valid bounds: 1 us to 10 min at 2 significant digits.
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds"),
            ),
            rate_samples: Mutex::new(VecDeque::new()),
            outlier: Mutex::new(Detector::new(Instant::now())),
            outlier_ejected: Notify::new(),
            latency: Mutex::new(None),
        }
    }

    /// A new endpoint in state `Connecting` whose totals (calls, errors, latencies) go on
    /// from `earlier`'s: the same instance back, or at a new address.
    pub fn continuing(earlier: &EndpointStats, id: &str, addr: &str) -> Self {
        let stats = Self::new(id, addr);
        stats
            .requests
            .store(earlier.requests.load(Ordering::Relaxed), Ordering::Relaxed);
        stats
            .errors
            .store(earlier.errors.load(Ordering::Relaxed), Ordering::Relaxed);
        *lock(&stats.latency_us) = lock(&earlier.latency_us).clone();
        let ejections = lock(&earlier.outlier).total();
        lock(&stats.outlier).carry_total(ejections);
        stats
    }

    /// Sets the state; returns the previous one.
    pub fn set_state(&self, state: State) -> State {
        let mut guard = lock(&self.state);
        let old = guard.0;
        if old != state {
            *guard = (state, dlb::events::time::now_ms());
        }
        old
    }

    /// The state now.
    pub fn state(&self) -> State {
        lock(&self.state).0
    }

    /// Counts a failed call (a status from the instance, or a connection failure).
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves the latency EWMA towards `latency` (a unary call answered).
    fn observe_latency(&self, latency: Duration) {
        self.observe_latency_sample(latency, false);
    }

    /// Moves the latency EWMA towards `latency`; with `at_least`, only up (a call dropped
    /// unanswered took at least that long: it must not make the instance look faster).
    fn observe_latency_sample(&self, latency: Duration, at_least: bool) {
        let now = Instant::now();
        let sample = latency.as_secs_f64() * 1e6;
        let mut average = lock(&self.latency);
        match average.as_mut() {
            None => *average = Some(LatencyAverage::first(sample, now)),
            // A lower bound, not an answer: it only raises, and goes in unfiltered.
            Some(average) if at_least => {
                if sample > average.value {
                    average.samples = average.samples.saturating_add(1);
                    average.moved_towards(sample, now);
                    average.at = now;
                }
            }
            Some(average) => average.answered(sample, now),
        }
    }

    /// What the weighted policy weighs it by. The latency of an instance not heard from for a
    /// while fades (by [`LATENCY_STALE`]), so that one slow spell, or one long call dropped at
    /// its deadline, does not starve it for good: it gets a call again and is measured anew.
    pub fn load(&self) -> crate::balance::Load {
        let latency_us = lock(&self.latency).map(|average| {
            let age = average.at.elapsed().as_secs_f64();
            average.value * (-age / LATENCY_STALE.as_secs_f64()).exp()
        });
        crate::balance::Load {
            latency_us,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            failure_ratio: lock(&self.outlier).failure_ratio(),
        }
    }

    /// The outlier ejection in force, if any.
    pub fn ejection(&self) -> Option<Ejection> {
        lock(&self.outlier).ejection().cloned()
    }

    /// Ends the outlier ejection if its time has come; says whether it did (the instance is
    /// then on probation).
    pub fn end_ejection_if_due(&self) -> bool {
        lock(&self.outlier).end_if_due(Instant::now())
    }

    /// Resolves when an outlier ejection starts, or the one in force is due to end.
    pub async fn outlier_change(&self) {
        let until = lock(&self.outlier).ejection().map(|e| e.until);
        match until {
            Some(until) => tokio::select! {
                () = tokio::time::sleep_until(until.into()) => {}
                () = self.outlier_ejected.notified() => {}
            },
            None => self.outlier_ejected.notified().await,
        }
    }

    /// Notes that the instance answered (a call or a probe) just now.
    pub fn mark_progress(&self) {
        self.progress_us.store(monotonic_us(), Ordering::Relaxed);
    }

    /// How long it has had calls in flight without answering any, if it has calls in flight.
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let since = self.progress_us.load(Ordering::Relaxed);
        Some(Duration::from_micros(monotonic_us().saturating_sub(since)))
    }

    fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        lock(&self.latency_us).saturating_record(us);
    }

    /// Samples the request counter for the rate; called about once a second.
    pub fn sample_rate(&self, now: Instant) {
        let mut samples = lock(&self.rate_samples);
        samples.push_back((now, self.requests.load(Ordering::Relaxed)));
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> EndpointSnapshot {
        let (state, since) = *lock(&self.state);
        let requests = self.requests.load(Ordering::Relaxed);
        let rate = {
            let samples = lock(&self.rate_samples);
            match (samples.front(), samples.back()) {
                (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                    (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64()
                }
                _ => 0.0,
            }
        };
        let (p50_us, p99_us) = {
            let h = lock(&self.latency_us);
            if h.is_empty() {
                (0.0, 0.0)
            } else {
                (
                    h.value_at_quantile(0.5) as f64,
                    h.value_at_quantile(0.99) as f64,
                )
            }
        };
        let (ejection, ejections) = {
            let outlier = lock(&self.outlier);
            let now = Instant::now();
            (
                // In force only: one whose time is up is over, even before its monitor has
                // put the instance back (it may be unreachable meanwhile).
                outlier
                    .ejection()
                    .filter(|e| e.until > now)
                    .map(|e| (e.reason.clone(), e.back_at_ms)),
                outlier.total(),
            )
        };
        EndpointSnapshot {
            ejection,
            ejections,
            id: self.id.to_string(),
            addr: self.addr.clone(),
            state,
            state_since_ms: since,
            requests,
            errors: self.errors.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            rate,
            p50_us,
            p99_us,
        }
    }
}

/// Removed endpoints whose totals are kept, for an instance that comes back under its id.
const RETIRED_MAX: usize = 1_024;

/// Every endpoint the gateway knows, by id, and the totals of removed ones: an instance that
/// is stopped and started again (same id) goes on counting where it stopped, so per-instance
/// totals add up to the gateway's own over restarts (and Prometheus counters never go back).
#[derive(Debug, Default)]
pub struct EndpointTable {
    endpoints: RwLock<BTreeMap<String, Arc<EndpointStats>>>,
    /// Removed endpoints, oldest removal first, at most [`RETIRED_MAX`].
    retired: Mutex<VecDeque<Arc<EndpointStats>>>,
    /// How outliers are ejected.
    outlier: OutlierSettings,
    /// Held while deciding an ejection, so two at once cannot pass the cap together.
    ejecting: Mutex<()>,
}

impl EndpointTable {
    /// A table whose endpoints are ejected as outliers by `outlier`.
    pub fn new(outlier: OutlierSettings) -> Self {
        Self {
            outlier,
            ..Self::default()
        }
    }

    /// Counts the answer of the instance `id` with `code` (a status it sent itself): an
    /// error against it unless the caller's fault, and an answer for outlier detection,
    /// which may eject it (within the pool's cap).
    pub fn answered(&self, id: &str, code: tonic::Code) {
        let Some(endpoint) = self.get(id) else {
            return;
        };
        if code != tonic::Code::Ok && !crate::outlier::callers_fault(code) {
            endpoint.record_error();
        }
        let now = Instant::now();
        let Some(reason) = lock(&endpoint.outlier).observe(code, now, &self.outlier) else {
            return;
        };
        let _deciding = lock(&self.ejecting);
        // The cap counts the instances that serve or would (in rotation, or out only as
        // outliers); down or draining ones are no help either way. The last one serving is
        // never ejected: a failing instance serves some calls, an empty pool none.
        let all = self.all();
        let in_force = |e: &EndpointStats| e.ejection().is_some_and(|j| j.until > now);
        let ejected = all.iter().filter(|e| in_force(e)).count();
        let serving = all
            .iter()
            .filter(|e| e.state() == State::Serving && !in_force(e))
            .count();
        let members = ejected + serving;
        if serving <= 1 || !self.outlier.may_eject(ejected, members) {
            tracing::debug!(
                instance = %endpoint.id,
                %reason,
                ejected,
                of = members,
                "outlier kept in: the pool has as many ejected as --outlier-max-ejected-percent allows, or no other instance serving"
            );
            return;
        }
        let mut detector = lock(&endpoint.outlier);
        if detector.ejection().is_some() {
            return; // ejected meanwhile by another answer
        }
        let ejection = detector.eject(reason, now, &self.outlier);
        tracing::info!(
            instance = %endpoint.id,
            reason = %ejection.reason,
            for_ms = ejection.length.as_millis(),
            "outlier ejected"
        );
        drop(detector);
        endpoint.outlier_ejected.notify_one();
    }

    /// The stats of a member `id` at `addr` joining: new, with the totals of the endpoint it
    /// replaces or of a removed one with the same id.
    pub fn join(&self, id: &str, addr: &str) -> Arc<EndpointStats> {
        let earlier = self.get(id).or_else(|| {
            let mut retired = lock(&self.retired);
            let at = retired.iter().position(|e| &*e.id == id)?;
            retired.remove(at)
        });
        Arc::new(match earlier {
            Some(earlier) => EndpointStats::continuing(&earlier, id, addr),
            None => EndpointStats::new(id, addr),
        })
    }

    /// Adds or replaces an endpoint.
    pub fn insert(&self, stats: Arc<EndpointStats>) {
        self.endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(stats.id.to_string(), stats);
    }

    /// Removes an endpoint (its totals are kept for its return, see [`EndpointTable::join`]).
    pub fn remove(&self, id: &str) {
        let removed = self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(removed) = removed {
            let mut retired = lock(&self.retired);
            retired.retain(|e| e.id != removed.id);
            if retired.len() == RETIRED_MAX {
                retired.pop_front();
            }
            retired.push_back(removed);
        }
    }

    /// The endpoint with this id.
    pub fn get(&self, id: &str) -> Option<Arc<EndpointStats>> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Every endpoint, in id order.
    pub fn all(&self) -> Vec<Arc<EndpointStats>> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// "A serving, B ejected": for messages.
    pub fn summary(&self) -> String {
        let all = self.all();
        if all.is_empty() {
            return "no instances known (give --backend, --control or --discover, and check that the source answers)"
                .to_owned();
        }
        all.iter()
            .map(|e| {
                let suspect = if e.suspect.load(Ordering::Relaxed) {
                    " (a call failed at the connection level; being checked)"
                } else {
                    ""
                };
                format!("{} {}{suspect}", e.id, e.state().name())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

// === impl EndpointService ===

/// The balancer's handle on one endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EndpointService {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    stats: Arc<EndpointStats>,
    conns: Vec<Conn>,
    next: AtomicUsize,
    eject: Arc<Notify>,
    cut: CancellationToken,
}

/// The failure of a call cut short because its instance stopped answering (see
/// [`crate::monitor`]): it was never answered, so it is retried elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("instance {id} stopped answering (no reply to a health probe); call moved")]
pub struct Unresponsive {
    /// The instance.
    pub id: Arc<str>,
}

impl EndpointService {
    /// Calls go over `conns` in turn; a connection failure wakes `eject`.
    pub fn new(
        stats: Arc<EndpointStats>,
        conns: Vec<Conn>,
        eject: Arc<Notify>,
        cut: CancellationToken,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                stats,
                conns,
                next: AtomicUsize::new(0),
                eject,
                cut,
            }),
        }
    }

    /// Back in rotation: no longer skipped (see `failed`).
    pub fn clear_failed(&self) {
        self.shared.stats.suspect.store(false, Ordering::Relaxed);
    }

    fn pick(&self) -> Option<Conn> {
        let n = self.shared.conns.len();
        if n == 0 {
            return None;
        }
        let i = self.shared.next.fetch_add(1, Ordering::Relaxed) % n;
        Some(self.shared.conns[i].clone())
    }
}

/// What a call sends through the balancer to the endpoint it picks.
#[derive(Debug)]
pub enum Outgoing {
    /// A unary call's request body, whole, in the pieces it arrived in: the endpoint sends it
    /// and answers with the instance's answer.
    Whole(Vec<Bytes>),
    /// A streaming call: the endpoint answers at once with a [`Lease`] (its body is
    /// [`crate::conn::AnswerBody::Lease`]), and the relay opens and feeds the stream itself.
    Lease,
}

/// A streaming call's hold on the endpoint the balancer picked: the connection to open its
/// stream on, the call counted in flight until the lease is dropped, and where to report how
/// the stream went (so that it counts for the instance's health as a unary call does).
#[derive(Debug)]
pub struct Lease {
    shared: Arc<Shared>,
    /// The connection to open the stream on.
    pub conn: Conn,
    in_flight: Option<InFlight>,
}

impl Lease {
    /// The instance's id.
    pub fn id(&self) -> &Arc<str> {
        &self.shared.stats.id
    }

    /// Resolves when the instance stopped answering and its calls are being cut (see
    /// [`Unresponsive`]).
    pub async fn cut(&self) {
        self.shared.cut.cancelled().await;
    }

    /// Cancelled when the instance stopped answering (see [`Lease::cut`]).
    pub fn cut_token(&self) -> CancellationToken {
        self.shared.cut.clone()
    }

    /// The stream's answer began (headers came): progress, and no reset in a row.
    pub fn answered(&mut self) {
        self.shared.stats.mark_progress();
        self.shared
            .stats
            .resets_in_a_row
            .store(0, Ordering::Relaxed);
    }

    /// The stream ended (answered whole, or given up): its latency is recorded.
    pub fn finish(&mut self) {
        self.shared.stats.mark_progress();
        if let Some(in_flight) = self.in_flight.take() {
            let _ = in_flight.finish();
        }
    }

    /// The stream failed below gRPC: counted as the unary call's failure would be (see
    /// [`EndpointService`]), ejecting the instance when the connection failed.
    pub fn failed(&self, error: &(dyn std::error::Error + 'static)) {
        report_failure(&self.shared, error);
    }
}

impl crate::balance::Weigh for EndpointService {
    fn load(&self) -> crate::balance::Load {
        self.shared.stats.load()
    }
}

impl Service<http::Request<Outgoing>> for EndpointService {
    type Response = Answer;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, tower::BoxError>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.shared.stats.suspect.load(Ordering::Relaxed) {
            // The balancer skips it for this pick.
            return Poll::Ready(Err(
                "instance failed at the connection level; skipped until healthy again".into(),
            ));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Outgoing>) -> Self::Future {
        let Some(conn) = self.pick() else {
            return Box::pin(std::future::ready(
                Err("endpoint has no connections".into()),
            ));
        };
        let shared = Arc::clone(&self.shared);
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        // Counted out on drop, so a call abandoned mid-way (deadline, client gone) is too.
        let unary = matches!(request.body(), Outgoing::Whole(_));
        let guard = InFlight::new(Arc::clone(&shared.stats), unary);
        if let Some(picked) = request.extensions().get::<PickedBy>() {
            let _ = picked.0.set(Arc::clone(&shared.stats.id));
        }
        let (head, body) = request.into_parts();
        let body = match body {
            Outgoing::Whole(body) => body,
            Outgoing::Lease => {
                let mut answer =
                    http::Response::new(crate::conn::AnswerBody::Lease(Box::new(Lease {
                        shared: Arc::clone(&shared),
                        conn,
                        in_flight: Some(guard),
                    })));
                answer
                    .extensions_mut()
                    .insert(ServedBy(Arc::clone(&shared.stats.id)));
                return Box::pin(std::future::ready(Ok(answer)));
            }
        };
        Box::pin(async move {
            let result = tokio::select! {
                result = conn.send(http::Request::from_parts(head, ()), body) => result,
                () = shared.cut.cancelled() => {
                    return Err(Unresponsive { id: Arc::clone(&shared.stats.id) }.into());
                }
            };
            shared.stats.mark_progress();
            let latency = guard.finish();
            match result {
                Ok(mut response) => {
                    // Only a real answer's latency: an error in the headers (Trailers-Only:
                    // a refusal, a failure, UNIMPLEMENTED) comes at once, and would make a
                    // failing instance look the fastest.
                    if !response.headers().contains_key("grpc-status") {
                        shared.stats.observe_latency(latency);
                    }
                    shared.stats.resets_in_a_row.store(0, Ordering::Relaxed);
                    response
                        .extensions_mut()
                        .insert(ServedBy(Arc::clone(&shared.stats.id)));
                    Ok(response)
                }
                Err(error) => {
                    report_failure(&shared, error.as_ref());
                    Err(error)
                }
            }
        })
    }
}

/// Counts a call that failed below gRPC against its instance: a graceful GOAWAY is no
/// failure; a reset stream fails that call only, until [`RESETS_BEFORE_EJECTION`] in a row;
/// anything else (the connection failed) ejects the instance at once.
fn report_failure(shared: &Shared, error: &(dyn std::error::Error + 'static)) {
    match classify(error) {
        Failure::WentAway => {
            // The instance is closing that connection gracefully and saw nothing of the
            // call (GOAWAY with NO_ERROR): not its failure. The call is retried; the next
            // one opens a new connection.
            tracing::debug!(
                instance = %shared.stats.id,
                "call refused by a connection closing gracefully"
            );
            return;
        }
        Failure::Reset => {
            shared.stats.record_error();
            // A stream the instance reset (REFUSED_STREAM, say) fails that call only: its
            // connection is fine. It is taken out after several in a row, as an instance
            // that resets everything is of no use.
            let in_a_row = shared.stats.resets_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
            if in_a_row < RESETS_BEFORE_EJECTION {
                tracing::debug!(
                    instance = %shared.stats.id,
                    error = %dlb::status::error_chain(error),
                    in_a_row,
                    "instance reset the call's stream"
                );
                return;
            }
        }
        Failure::NoInstance | Failure::Connection => shared.stats.record_error(),
    }
    shared.stats.resets_in_a_row.store(0, Ordering::Relaxed);
    tracing::debug!(
        instance = %shared.stats.id,
        error = %dlb::status::error_chain(error),
        "call failed below gRPC; ejecting"
    );
    // Passive health: a connection failure (or the last of too many resets) takes the
    // endpoint out at once.
    shared.stats.suspect.store(true, Ordering::Relaxed);
    shared.eject.notify_one();
}

/// Streams an instance may reset in a row (with no answer between) before it is ejected, as a
/// connection failure ejects it at once: Envoy's default for consecutive errors.
pub const RESETS_BEFORE_EJECTION: u32 = 5;

/// One call in flight to an endpoint: counted in on creation, out on drop; latency recorded
/// when the call finishes normally. A unary call dropped unanswered (its hedge won, its
/// deadline passed) moves the latency EWMA towards how long it waited: the instance took at
/// least that long, and one that answers nothing in time must not look fast.
#[derive(Debug)]
struct InFlight {
    stats: Arc<EndpointStats>,
    start: Instant,
    unary: bool,
    finished: bool,
}

impl InFlight {
    fn new(stats: Arc<EndpointStats>, unary: bool) -> Self {
        if stats.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            // Idle until now: a stall is counted from here.
            stats.mark_progress();
        }
        Self {
            stats,
            start: Instant::now(),
            unary,
            finished: false,
        }
    }

    /// Records its latency, and returns it.
    fn finish(mut self) -> Duration {
        self.finished = true;
        let latency = self.start.elapsed();
        self.stats.record(latency);
        latency
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.unary && !self.finished {
            self.stats
                .observe_latency_sample(self.start.elapsed(), true);
        }
    }
}

/// Keeps each endpoint's rate samples fresh; one task per gateway.
pub async fn sample_rates(table: Arc<EndpointTable>, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let now = Instant::now();
        for endpoint in table.all() {
            endpoint.sample_rate(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_back_under_its_id_goes_on_counting() {
        let table = EndpointTable::default();
        let a = table.join("A", "127.0.0.1:13001");
        table.insert(Arc::clone(&a));
        a.requests.fetch_add(7, Ordering::Relaxed);
        a.record_error();
        table.remove("A");
        assert!(table.get("A").is_none());

        // Stopped and started again: a fresh endpoint (connecting, new address) whose totals
        // go on from where they were.
        let again = table.join("A", "127.0.0.1:13005");
        table.insert(Arc::clone(&again));
        let snapshot = again.snapshot();
        assert_eq!((snapshot.requests, snapshot.errors), (7, 1));
        assert_eq!(snapshot.addr, "127.0.0.1:13005");
        assert_eq!(snapshot.state, State::Connecting);
        // Another id starts from nothing.
        assert_eq!(table.join("B", "127.0.0.1:13002").snapshot().requests, 0);
    }

    #[test]
    fn the_latency_average_forgets_a_slow_first_call_and_dropped_calls_only_raise_it() {
        let e = EndpointStats::new("A", "127.0.0.1:1");
        assert_eq!(e.load().latency_us, None);
        // Alone, a slow first answer is what there is.
        e.observe_latency(Duration::from_millis(10));
        let first = e.load().latency_us.unwrap();
        assert!((9_900.0..10_010.0).contains(&first), "{first}");
        // A slow first call (it opened the connection), then quick ones: it is forgotten.
        for _ in 0..9 {
            e.observe_latency(Duration::from_millis(1));
        }
        let mean = e.load().latency_us.unwrap();
        assert!((990.0..1_010.0).contains(&mean), "{mean}");
        // A call dropped after 0.1 ms says nothing of a 1.9 ms instance; one dropped after
        // 50 ms raises it.
        e.observe_latency_sample(Duration::from_micros(100), true);
        assert!((mean - e.load().latency_us.unwrap()).abs() < 1.0);
        e.observe_latency_sample(Duration::from_millis(50), true);
        assert!(e.load().latency_us.unwrap() > 4_000.0);
    }

    #[test]
    fn one_slow_answer_among_quick_ones_is_not_a_slow_instance_but_two_are() {
        let e = EndpointStats::new("A", "127.0.0.1:1");
        for _ in 0..30 {
            e.observe_latency(Duration::from_millis(1));
        }
        // One answer delayed 30x (the host preempted it): the average does not move.
        e.observe_latency(Duration::from_millis(30));
        e.observe_latency(Duration::from_millis(1));
        let after_one = e.load().latency_us.unwrap();
        assert!((990.0..1_010.0).contains(&after_one), "{after_one}");
        // Two slow answers in three: the instance is slower, and the average says so at once.
        e.observe_latency(Duration::from_millis(30));
        e.observe_latency(Duration::from_millis(30));
        let after_two = e.load().latency_us.unwrap();
        assert!(after_two > 2_000.0, "{after_two}");
    }

    #[test]
    fn removed_totals_are_bounded() {
        let table = EndpointTable::default();
        for n in 0..RETIRED_MAX + 10 {
            let id = format!("i{n}");
            let stats = table.join(&id, "127.0.0.1:1");
            stats.requests.fetch_add(1, Ordering::Relaxed);
            table.insert(stats);
            table.remove(&id);
        }
        assert_eq!(lock(&table.retired).len(), RETIRED_MAX);
        // The oldest went first.
        assert_eq!(table.join("i0", "127.0.0.1:1").snapshot().requests, 0);
        assert_eq!(table.join("i20", "127.0.0.1:1").snapshot().requests, 1);
    }
}
