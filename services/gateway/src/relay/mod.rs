//! `GatewayService`: `dlb.v1.Operations` in front of the balancer, as a relay. A call enters
//! here, takes a concurrency permit (or gets RESOURCE_EXHAUSTED), and its request, read whole
//! but never decoded, is forwarded through the balancer with the caller's deadline; a
//! connection failure or UNAVAILABLE is retried on another instance within the retry budget;
//! the instance's answer, also read whole (so a failure mid-answer is retried too) and passed
//! on byte for byte, goes back with `x-served-by` and `x-attempts`, and one event goes to the
//! log. Protobuf is parsed only for the event's input preview (its first field).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dlb::events::{EventLog, RequestFields, preview};
use http_body::Frame;
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};

mod framing;
pub mod hedge;
mod preview;
pub mod stream;

use self::framing::{ReadAnswerError, copy_prefix, may_be_compressed, read_answer, read_request};
use self::preview::{PREVIEW_BYTES, framed_preview};
use crate::endpoint::{self, EndpointTable, Outgoing, ServedBy, Tried};
use crate::error::Error;
use crate::failure::{Failure, classify};
use crate::methods::{Finished, MethodTable};

/// The balancer as the relay sees it, whatever the policy.
pub type Balanced = BoxCloneSyncService<http::Request<Outgoing>, crate::conn::Answer, ForwardError>;

/// A message as it arrived, in the pieces it arrived in (forwarded without joining them).
pub type Chunks = Vec<Bytes>;

/// Any failure below the gRPC client: no endpoint, connection refused or reset, ...
#[derive(Debug)]
pub struct ForwardError(pub BoxError);

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ForwardError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// Time kept back from the caller's deadline (see [`dlb::deadline::MARGIN`]).
const DEADLINE_MARGIN: Duration = dlb::deadline::MARGIN;

/// Settings of the forwarding path.
#[derive(Debug, Clone)]
pub struct ForwardSettings {
    /// Calls served at once.
    pub max_in_flight: usize,
    /// Instances tried per call.
    pub max_attempts: u32,
    /// Deadline of calls that carry none.
    pub default_timeout: Duration,
    /// Largest message either way.
    pub max_message_bytes: usize,
    /// When a call of the five operations gets a second copy.
    pub hedge: hedge::Hedge,
    /// Makes a span per attempt (when on), child of the call's span.
    pub tracer: dlb::trace::Tracer,
}

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls answered.
    pub requests: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
    /// Hedges sent.
    pub hedges: AtomicU64,
    /// Calls answered with an error.
    pub failures: AtomicU64,
}

/// The name of the pool of `--backend`, `--control` and `--discover`, which serves every call
/// no route sends elsewhere.
pub const DEFAULT_POOL: &str = "default";

/// A named set of instances: its own balancer over its own endpoints.
#[derive(Clone)]
pub struct Pool {
    /// Its name (`default`, or the name routes give it).
    pub name: String,
    /// Its balancer.
    pub balancer: Balanced,
    /// Its endpoints.
    pub table: Arc<EndpointTable>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Every instance and its state, naming the pool unless it is the default one.
    pub fn summary(&self) -> String {
        let summary = self.table.summary();
        if self.name == DEFAULT_POOL {
            summary
        } else if self.table.all().is_empty() {
            format!(
                "pool {:?} has no instances (give it some with --pool-backend or --pool-discover)",
                self.name
            )
        } else {
            format!("pool {:?}: {summary}", self.name)
        }
    }
}

/// A route: calls whose path starts with `prefix` go to pool `pool` (an index into the
/// pools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `/package.Service/` or any path prefix.
    pub prefix: String,
    /// The pool's index.
    pub pool: usize,
}

/// Implements `dlb.v1.Operations` by relaying. Cheap to clone.
#[derive(Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

struct Inner {
    pools: Vec<Pool>,
    /// Path prefixes and the pool each goes to, longest first.
    routes: Vec<(String, usize)>,
    methods: Arc<MethodTable>,
    /// The five operations' keys in `methods`, in [`METHODS`] order.
    op_keys: [Arc<str>; 5],
    /// The five operations' recent latencies, for `--hedge-after auto`.
    recent: [hedge::RecentLatency; 5],
    permits: Arc<Semaphore>,
    budget: TpsBudget,
    settings: ForwardSettings,
    events: EventLog,
    counters: Arc<Counters>,
    gateway_id: String,
    next_request: AtomicU64,
}

impl Inner {
    /// The next call's id in the event log: `GATEWAY-N` (taken only for an event made).
    fn next_request_id(&self) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.gateway_id)
    }
}

impl std::fmt::Debug for GatewayService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// The operations relayed, by the method part of their path.
const METHODS: [&str; 5] = [
    "IsPrime",
    "IsPalindrome",
    "Reverse",
    "Fibonacci",
    "WordCount",
];

/// The service part of their paths.
const PATH_PREFIX: &str = "/dlb.v1.Operations/";

/// The gRPC message prefix: a compression flag and a 4-byte big-endian length.
const FRAME_HEADER: usize = 5;

/// How one attempt ended.
enum Attempt {
    /// An instance answered (any status): the answer, whole.
    Answered(Box<Whole>),
    /// The balancer had no instance to offer.
    NoInstance,
    /// Failed below gRPC (connection refused or reset, cut off, the stream reset by the
    /// instance): never answered.
    Failed(String),
    /// The deadline passed.
    TimedOut,
    /// The answer was over [`dlb::dial::MAX_RESPONSE_BYTES`]: not retried, it would be
    /// as large elsewhere.
    TooLarge,
}

/// Where an attempt may go.
struct Steer {
    /// Instances its call tried already: it goes to another if one is ready.
    tried: Vec<Arc<str>>,
    /// Never to one of `tried` (a hedge).
    strictly: bool,
    /// Learns which instance it went to.
    picked: Option<endpoint::PickedBy>,
}

/// An attempt that may be made again on another instance.
enum Retry {
    /// The instance answered UNAVAILABLE.
    Refused(Box<Whole>),
    /// Never answered.
    Failed(String),
}

/// An instance's whole answer.
struct Whole {
    head: http::response::Parts,
    data: Chunks,
    trailers: Option<http::HeaderMap>,
    served_by: Option<Arc<str>>,
    /// Its grpc-status (from the trailers, or from the headers of a trailers-only answer).
    status: Code,
}

impl GatewayService {
    /// A service relaying through `balancer`, one pool for every call.
    pub fn new(
        balancer: Balanced,
        table: Arc<EndpointTable>,
        settings: ForwardSettings,
        events: EventLog,
        counters: Arc<Counters>,
        gateway_id: String,
    ) -> Self {
        let pool = Pool {
            name: DEFAULT_POOL.to_owned(),
            balancer,
            table,
        };
        Self::with_pools(
            vec![pool],
            Vec::new(),
            settings,
            events,
            counters,
            gateway_id,
        )
    }

    /// A service relaying to `pools` (the first is the default) by `routes`.
    pub fn with_pools(
        pools: Vec<Pool>,
        mut routes: Vec<Route>,
        settings: ForwardSettings,
        events: EventLog,
        counters: Arc<Counters>,
        gateway_id: String,
    ) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self {
            inner: Arc::new(Inner {
                pools,
                routes: routes.into_iter().map(|r| (r.prefix, r.pool)).collect(),
                methods: Arc::new(MethodTable::default()),
                op_keys: METHODS.map(|m| Arc::from(format!("{PATH_PREFIX}{m}"))),
                recent: Default::default(),
                permits: Arc::new(Semaphore::new(settings.max_in_flight)),
                // Retries may add 20% to the load, plus 10 per second, over a 10 s window.
                budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
                settings,
                events,
                counters,
                gateway_id,
                next_request: AtomicU64::new(0),
            }),
        }
    }

    /// The pool a call of `path` goes to.
    fn pool_for(&self, path: &str) -> &Pool {
        &self.inner.pools[self.pool_index(path)]
    }

    /// The index in [`GatewayService::pools`] of the pool a call of `path` goes to: the
    /// longest route matching, else the default pool (0).
    pub fn pool_index(&self, path: &str) -> usize {
        self.inner
            .routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(0, |(_, pool)| *pool)
    }

    /// The pools, the default first.
    pub fn pools(&self) -> &[Pool] {
        &self.inner.pools
    }

    /// Calls counted by method.
    pub fn methods(&self) -> &Arc<MethodTable> {
        &self.inner.methods
    }

    fn method_key(&self, path: &str) -> Arc<str> {
        self.inner.methods.key(path)
    }

    /// Counts and logs a finished call of another service: `blamed`, when given, is the
    /// instance whose own answer it was (counted against it unless the caller's fault).
    #[allow(clippy::too_many_arguments)]
    fn record_stream(
        &self,
        pool: usize,
        method: &Arc<str>,
        start: Started,
        attempts: u32,
        blamed: Option<&str>,
        served_by: Option<&str>,
        code: Code,
        messages_in: u64,
        messages_out: u64,
    ) {
        let inner = &self.inner;
        let pool = &inner.pools[pool];
        let duration_us = u64::try_from(start.at.elapsed().as_micros()).unwrap_or(u64::MAX);
        inner.methods.finished(
            method,
            Finished {
                pool: &pool.name,
                failed: code != Code::Ok,
                messages_in,
                messages_out,
                duration_us,
            },
        );
        if let Some(id) = blamed {
            pool.table.answered(id, code);
        }
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        if code != Code::Ok {
            inner.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        inner.events.request_with(|| RequestFields {
            request_id: inner.next_request_id(),
            op: method.to_string(),
            backend: served_by.unwrap_or("-").to_owned(),
            status: dlb::status::code_name(code).to_owned(),
            latency_us: duration_us,
            attempts,
            input: format!("{messages_in} message(s) in, {messages_out} out"),
            trace_id: start.trace_id(),
        });
    }

    /// Calls served now.
    pub fn in_flight(&self) -> usize {
        self.inner.settings.max_in_flight - self.inner.permits.available_permits()
    }

    /// Relays one call; every outcome is an HTTP response carrying a gRPC status.
    async fn relay(&self, request: http::Request<Body>) -> http::Response<Body> {
        let start = Started::now(&request, self.inner.events.is_enabled());
        let Some(method) = request.uri().path().strip_prefix(PATH_PREFIX) else {
            // Any other service: relayed as a stream of opaque messages.
            let pool = self.pool_index(request.uri().path());
            // Boxed: kept out of this future, which the five operations move on every call.
            return Box::pin(self.relay_stream(pool, start, request)).await;
        };
        let pool = self.pool_for(request.uri().path());
        let Some(op) = METHODS.iter().find(|known| **known == method).copied() else {
            // The words of every dlb server (dlb::status), so a caller reads the same here
            // as from an instance.
            let status = Status::unimplemented(dlb::status::unknown_method(request.uri().path()));
            return status.into_http();
        };
        // Counted even if the caller goes before its answer (hyper then drops this future).
        let mut call = Unanswered {
            service: self,
            op,
            start,
            answered: false,
        };
        let response = self.relay_op(pool, op, start, request).await;
        call.answered = true;
        response
    }

    /// Relays one of the five operations: [`GatewayService::relay`] once the operation is
    /// known.
    async fn relay_op(
        &self,
        pool: &Pool,
        op: &'static str,
        start: Started,
        request: http::Request<Body>,
    ) -> http::Response<Body> {
        let inner = &self.inner;
        let Ok(_permit) = inner.permits.try_acquire() else {
            let status: Status = Error::Overloaded {
                limit: inner.settings.max_in_flight,
            }
            .into();
            return self.answer_error(op, "", start, 0, None, status);
        };
        let timeout = dlb::deadline::from_headers(request.headers())
            .unwrap_or(inner.settings.default_timeout);
        let deadline = start.at + timeout;
        let (head, body) = request.into_parts();
        let message = match tokio::time::timeout(
            timeout,
            read_request(
                body,
                inner.settings.max_message_bytes,
                may_be_compressed(&head.headers),
            ),
        )
        .await
        {
            Ok(Ok(message)) => message,
            Ok(Err(status)) => return self.answer_error(op, "", start, 0, None, status),
            Err(_) => {
                let status = Error::DeadlineExceeded {
                    deadline: timeout,
                    attempts: 0,
                }
                .into();
                return self.answer_error(op, "", start, 0, None, status);
            }
        };
        let input = {
            // The message's first bytes suffice for the preview.
            let total: usize = message.iter().map(Bytes::len).sum();
            let mut start = vec![0; total.min(PREVIEW_BYTES)];
            copy_prefix(&message, &mut start);
            framed_preview(op, &start, start.len() == total)
        };
        inner.budget.deposit();

        let mut attempts = 0u32;
        // How the last attempt that may be retried went: what to answer if no instance is
        // left to retry on.
        let mut previous: Option<Retry> = None;
        // The instances that refused it: a retry goes to another if one is ready.
        let mut tried: Vec<Arc<str>> = Vec::new();
        let answer = loop {
            attempts += 1;
            let budget = deadline
                .saturating_duration_since(Instant::now())
                .saturating_sub(DEADLINE_MARGIN);
            if budget.is_zero() {
                // This one is not made: the answer counts only those sent.
                attempts -= 1;
                break Err(Error::DeadlineExceeded {
                    deadline: timeout,
                    attempts,
                });
            }
            let may_hedge = attempts < inner.settings.max_attempts;
            let picked = endpoint::PickedBy::default();
            let (outcome, hedged) = self
                .attempt_or_hedge(
                    op, pool, &head, &message, deadline, &tried, may_hedge, &picked,
                )
                .await;
            attempts += hedged;
            if previous.is_some() && !matches!(outcome, Attempt::NoInstance) {
                // A retry counts as made once it reached an instance (as x-attempts does).
                inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            let retry = match outcome {
                Attempt::Answered(answer)
                    if !refused(
                        answer.status,
                        &answer.head.headers,
                        answer.trailers.as_ref(),
                    ) =>
                {
                    break Ok(answer);
                }
                // Refused by the instance (draining, or full with a pushback): it may go
                // elsewhere; when it cannot, the instance's answer is relayed.
                Attempt::Answered(answer) => {
                    tried.extend(answer.served_by.clone());
                    Retry::Refused(answer)
                }
                Attempt::NoInstance => {
                    let summary = pool.summary();
                    let Some(previous) = previous else {
                        break Err(Error::NoHealthyInstance { summary });
                    };
                    // This try reached no instance: it does not count (not as an attempt,
                    // nor as a retry made), and the previous one's outcome says more than
                    // "none left".
                    attempts -= 1;
                    break match previous {
                        Retry::Refused(answer) => Ok(answer),
                        Retry::Failed(last) => Err(Error::Unreachable {
                            attempts,
                            last: format!("{last} (and no other instance is healthy: {summary})"),
                        }),
                    };
                }
                Attempt::TimedOut => {
                    // Dropping the call cancelled it at the instance too (RST_STREAM).
                    break Err(Error::DeadlineExceeded {
                        deadline: timeout,
                        attempts,
                    });
                }
                Attempt::TooLarge => {
                    break Err(Error::AnswerTooLarge {
                        limit: dlb::dial::MAX_RESPONSE_BYTES,
                    });
                }
                Attempt::Failed(last) => {
                    // Its instance failed it (reset the stream, say): a retry goes elsewhere.
                    tried.extend(picked.0.get().cloned());
                    Retry::Failed(last)
                }
            };
            if attempts < inner.settings.max_attempts && inner.budget.withdraw() {
                tracing::debug!(op, attempts, "retrying on another instance");
                previous = Some(retry);
                continue;
            }
            match retry {
                Retry::Refused(answer) => break Ok(answer),
                Retry::Failed(last) => break Err(Error::Unreachable { attempts, last }),
            }
        };
        match answer {
            Ok(answer) => self.answer(op, &input, start, attempts, answer),
            Err(error) => self.answer_error(op, &input, start, attempts, None, error.into()),
        }
    }

    /// The hedge delay of `op` now, if it is hedged.
    fn hedge_delay(&self, op: usize) -> Option<Duration> {
        match self.inner.settings.hedge {
            hedge::Hedge::Off => None,
            hedge::Hedge::After(delay) => Some(delay),
            hedge::Hedge::Auto => self.inner.recent[op].p95(),
        }
    }

    /// One try (see [`GatewayService::attempt`]), and, when `may_hedge`, a second copy on
    /// another instance if the first has no answer within the hedge delay and the retry
    /// budget allows (see [`GatewayService::hedge`]). `picked` learns the first copy's
    /// instance. Also says how many copies were added (0 or 1).
    #[allow(clippy::too_many_arguments)]
    async fn attempt_or_hedge(
        &self,
        op: &'static str,
        pool: &Pool,
        head: &http::request::Parts,
        message: &Chunks,
        deadline: Instant,
        tried: &[Arc<str>],
        may_hedge: bool,
        picked: &endpoint::PickedBy,
    ) -> (Attempt, u32) {
        let start = Instant::now();
        let index = METHODS.iter().position(|m| *m == op).unwrap_or(0);
        let delay = self.hedge_delay(index).filter(|_| may_hedge);
        let first = Steer {
            tried: tried.to_vec(),
            strictly: false,
            picked: Some(picked.clone()),
        };
        let first = self.attempt(pool, head, message, deadline, first);
        tokio::pin!(first);
        let outcome = match delay {
            None => (first.await, 0),
            Some(delay) => {
                tokio::select! {
                    outcome = &mut first => (outcome, 0),
                    () = tokio::time::sleep(delay) => {
                        let mut avoid = tried.to_vec();
                        avoid.extend(picked.0.get().cloned());
                        let second = Steer { tried: avoid, strictly: true, picked: None };
                        let second = self.attempt(pool, head, message, deadline, second);
                        // Boxed, as hedging is rare: the two copies' state would triple the
                        // size of every call's future, which is moved at each await.
                        Box::pin(self.hedge(first, second)).await
                    }
                }
            }
        };
        if let Attempt::Answered(_) = &outcome.0
            && self.inner.settings.hedge == hedge::Hedge::Auto
        {
            self.inner.recent[index].record(start.elapsed(), Instant::now());
        }
        outcome
    }

    /// Races a call's `first` try, still unanswered, against its `second` copy (on another
    /// instance, never the same), within the retry budget. The first good outcome wins, and
    /// dropping the other cancels it at its instance. Good is an answer that is neither a
    /// refusal nor the instance's own failure (INTERNAL, UNKNOWN, DATA_LOSS, ABORTED): the
    /// operations are pure, so a quick failure of one copy waits for the other. If neither is
    /// good, an answer is preferred to no answer. Says whether the copy went out (0 or 1).
    async fn hedge(
        &self,
        mut first: Pin<&mut impl Future<Output = Attempt>>,
        second: impl Future<Output = Attempt>,
    ) -> (Attempt, u32) {
        if !self.inner.budget.withdraw() {
            return (first.await, 0);
        }
        tokio::pin!(second);
        let good = |outcome: &Attempt| match outcome {
            Attempt::Answered(answer) => {
                !refused(
                    answer.status,
                    &answer.head.headers,
                    answer.trailers.as_ref(),
                ) && !matches!(
                    answer.status,
                    Code::Internal | Code::Unknown | Code::DataLoss | Code::Aborted
                )
            }
            Attempt::TooLarge => true,
            Attempt::NoInstance | Attempt::Failed(_) | Attempt::TimedOut => false,
        };
        let answered = |outcome: &Attempt| matches!(outcome, Attempt::Answered(_));
        let (outcome, copy_sent) = tokio::select! {
            outcome = &mut first => {
                if good(&outcome) {
                    // The copy may not have reached an instance yet: counted as sent anyway,
                    // it was (or is being) made.
                    (outcome, true)
                } else {
                    let other = second.await;
                    let sent = !matches!(other, Attempt::NoInstance);
                    if good(&other) || !answered(&outcome) && sent {
                        (other, sent)
                    } else {
                        (outcome, sent)
                    }
                }
            }
            outcome = &mut second => {
                let sent = !matches!(outcome, Attempt::NoInstance);
                if good(&outcome) {
                    (outcome, sent)
                } else {
                    let other = first.await;
                    if good(&other) || answered(&other) || !answered(&outcome) {
                        (other, sent)
                    } else {
                        (outcome, sent)
                    }
                }
            }
        };
        if copy_sent {
            self.inner.counters.hedges.fetch_add(1, Ordering::Relaxed);
        }
        (outcome, u32::from(copy_sent))
    }

    /// One try on whichever instance the balancer picks, steered by `steer`, within what is
    /// left of `deadline` (less the margin).
    async fn attempt(
        &self,
        pool: &Pool,
        head: &http::request::Parts,
        message: &Chunks,
        deadline: Instant,
        steer: Steer,
    ) -> Attempt {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let budget = remaining.saturating_sub(DEADLINE_MARGIN);
        let mut span = self.attempt_span(head, steer.strictly);
        let mut steer = steer;
        if span.is_some() && steer.picked.is_none() {
            // The span names the instance even when the attempt fails before answering.
            steer.picked = Some(endpoint::PickedBy::default());
        }
        let picked = span.as_ref().and(steer.picked.clone());
        let mut request = http::Request::new(Outgoing::Whole(message.clone()));
        if !steer.tried.is_empty() {
            request.extensions_mut().insert(Tried {
                ids: steer.tried,
                strictly: steer.strictly,
            });
        }
        if let Some(picked) = steer.picked {
            request.extensions_mut().insert(picked);
        }
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = head.uri.clone();
        *request.headers_mut() = head.headers.clone();
        request.headers_mut().insert(
            dlb::deadline::GRPC_TIMEOUT,
            dlb::deadline::to_header(remaining),
        );
        if let Some(traceparent) = traceparent_for(span.as_ref(), head) {
            request
                .headers_mut()
                .insert(dlb::trace::TRACEPARENT_NAME, traceparent);
        }
        let call = async {
            let response = match pool.balancer.clone().oneshot(request).await {
                Ok(response) => response,
                Err(error) if classify(&error) == Failure::NoInstance => {
                    return Attempt::NoInstance;
                }
                Err(error) => return Attempt::Failed(dlb::status::error_chain(&error)),
            };
            let served_by = response
                .extensions()
                .get::<ServedBy>()
                .map(|s| Arc::clone(&s.0));
            let (head, body) = response.into_parts();
            let limit = dlb::dial::MAX_RESPONSE_BYTES + FRAME_HEADER;
            let (data, trailers) = match read_answer(body, limit).await {
                Ok(read) => read,
                Err(ReadAnswerError::TooLarge) => return Attempt::TooLarge,
                Err(ReadAnswerError::Failed(error)) => return Attempt::Failed(error),
            };
            let status = trailers
                .as_ref()
                .and_then(grpc_code)
                .or_else(|| grpc_code(&head.headers));
            // An answer without a status is not a gRPC answer: the caller gets UNKNOWN.
            let (status, trailers) = match status {
                Some(status) => (status, trailers),
                None => (Code::Unknown, Some(no_status_trailers(head.status))),
            };
            if let Some(id) = &served_by {
                pool.table.answered(id, status);
            }
            Attempt::Answered(Box::new(Whole {
                head,
                data,
                trailers,
                served_by,
                status,
            }))
        };
        let outcome = tokio::time::timeout(budget, call)
            .await
            .unwrap_or(Attempt::TimedOut);
        if let Some(span) = span.as_mut().and_then(AttemptSpan::take) {
            let instance = picked.as_ref().and_then(|p| p.0.get().cloned());
            end_attempt_span(span, &outcome, instance.as_deref());
        }
        outcome
    }

    /// A span for one attempt (a client span, child of the call's span: `trace::CallSpan`),
    /// when tracing is on. Dropped unended (a hedge lost, the caller gone), it says so.
    fn attempt_span(&self, head: &http::request::Parts, hedge: bool) -> Option<AttemptSpan> {
        let tracer = &self.inner.settings.tracer;
        if !tracer.is_on() {
            return None;
        }
        let path = head.uri.path();
        let parent = dlb::trace::SpanContext::of_request(&head.headers, &head.extensions);
        if parent.is_some_and(|p| !p.sampled) {
            // Every sampler decides an attempt as its call (the same trace id, or the call
            // as parent): nothing of this trace is recorded, and the instance gets the
            // call's unsampled context as it is.
            return None;
        }
        let mut span = tracer.start(
            dlb::trace::rpc_span_name(path),
            dlb::trace::Kind::Client,
            parent.as_ref(),
            None,
        );
        dlb::trace::set_rpc_attributes(&mut span, path);
        if hedge {
            span.set("dlb.hedge", true);
        }
        Some(AttemptSpan(Some(span)))
    }

    /// Passes an instance's answer on, marked with who answered and how many tries it took.
    fn answer(
        &self,
        op: &'static str,
        input: &str,
        start: Started,
        attempts: u32,
        answer: Box<Whole>,
    ) -> http::Response<Body> {
        let Whole {
            mut head,
            data,
            trailers,
            served_by,
            status,
        } = *answer;
        let served_by = served_by.map(|s| s.to_string()).or_else(|| {
            head.headers
                .get(dlb::metadata::SERVED_BY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        self.record(
            op,
            input,
            start,
            attempts,
            served_by.as_deref(),
            dlb::status::code_name(status),
        );
        add_headers(&mut head.headers, served_by.as_deref(), attempts);
        if data.is_empty() && trailers.is_none() {
            // Trailers-Only (the status in the headers, nothing after them): an empty body
            // makes hyper end the stream on the HEADERS frame itself. A body that only turns
            // out empty would add a DATA frame with END_STREAM and no trailers, which the
            // protocol does not allow: C-core and grpc-js then report UNKNOWN or INTERNAL
            // instead of the instance's status.
            return http::Response::from_parts(head, Body::empty());
        }
        let mut frames: Vec<Result<_, Status>> = Vec::with_capacity(data.len() + 1);
        frames.extend(data.into_iter().map(|chunk| Ok(Frame::data(chunk))));
        if let Some(trailers) = trailers {
            frames.push(Ok(Frame::trailers(trailers)));
        }
        let body = Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
        http::Response::from_parts(head, body)
    }

    fn answer_error(
        &self,
        op: &'static str,
        input: &str,
        start: Started,
        attempts: u32,
        served_by: Option<&str>,
        status: Status,
    ) -> http::Response<Body> {
        self.record(
            op,
            input,
            start,
            attempts,
            served_by,
            dlb::status::code_name(status.code()),
        );
        error_response(&status, served_by, attempts)
    }

    fn record(
        &self,
        op: &'static str,
        input: &str,
        start: Started,
        attempts: u32,
        served_by: Option<&str>,
        code: &str,
    ) {
        let inner = &self.inner;
        let latency_us = u64::try_from(start.at.elapsed().as_micros()).unwrap_or(u64::MAX);
        if let Some(key) = METHODS
            .iter()
            .position(|m| *m == op)
            .map(|i| &inner.op_keys[i])
        {
            let answered = attempts > 0 && served_by.is_some();
            inner.methods.finished(
                key,
                Finished {
                    pool: &self.pool_for(key).name,
                    failed: code != "OK",
                    messages_in: 1,
                    messages_out: u64::from(answered && code == "OK"),
                    duration_us: latency_us,
                },
            );
        }
        // Counted after its method (as `record_stream` does), so that stats which show the
        // call show it by method too.
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        if code != "OK" {
            inner.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        // Made only when events go somewhere (so is the trace id: `Started::now`).
        inner.events.request_with(|| RequestFields {
            request_id: inner.next_request_id(),
            op: op.to_owned(),
            backend: served_by.unwrap_or("-").to_owned(),
            status: code.to_owned(),
            latency_us,
            attempts,
            input: preview(input),
            trace_id: start.trace_id(),
        });
    }
}

/// When a call arrived, and in which trace (the gateway's own span for it when tracing,
/// `trace::CallSpan`, else the caller's `traceparent`), for its event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started {
    at: Instant,
    trace: Option<[u8; 16]>,
}

impl Started {
    /// `request`, arriving now; its trace id is read only when it goes into an event
    /// (`events`).
    fn now<B>(request: &http::Request<B>, events: bool) -> Self {
        Self {
            at: Instant::now(),
            trace: events
                .then(|| {
                    dlb::trace::SpanContext::of_request(request.headers(), request.extensions())
                })
                .flatten()
                .map(|c| c.trace_id),
        }
    }

    fn trace_id(&self) -> Option<String> {
        self.trace.map(|id| dlb::trace::hex(&id))
    }
}

/// An attempt's span until the attempt ends; dropped before, it ends as cancelled (the
/// hedge that lost, or the caller gone).
pub(crate) struct AttemptSpan(Option<dlb::trace::Span>);

impl AttemptSpan {
    fn context(&self) -> Option<&dlb::trace::SpanContext> {
        self.0.as_ref().map(dlb::trace::Span::context)
    }

    fn take(&mut self) -> Option<dlb::trace::Span> {
        self.0.take()
    }
}

impl Drop for AttemptSpan {
    fn drop(&mut self) {
        if let Some(mut span) = self.0.take() {
            span.set_grpc_status(Code::Cancelled, "the attempt was given up");
        }
    }
}

/// The `traceparent` an attempt sends its instance: the attempt's own span when it has one
/// (recorded), else the gateway's span for the call (not recorded: the trace goes on, flag
/// 00), else none added (tracing off: the caller's own header goes as it came).
fn traceparent_for(
    span: Option<&AttemptSpan>,
    head: &http::request::Parts,
) -> Option<http::HeaderValue> {
    span.and_then(AttemptSpan::context)
        .or_else(|| {
            head.extensions
                .get::<dlb::trace::CallSpan>()
                .map(|call| &call.0)
        })
        .map(dlb::trace::SpanContext::header_value)
}

/// Ends an attempt's span with how it went, on `instance`.
fn end_attempt_span(mut span: dlb::trace::Span, outcome: &Attempt, instance: Option<&str>) {
    if let Attempt::Answered(answer) = outcome {
        if let Some(id) = answer.served_by.as_deref().or(instance) {
            span.set("dlb.instance", id.to_owned());
        }
        // Percent-encoded on the wire: the span says it as the caller reads it.
        let message = answer
            .trailers
            .as_ref()
            .unwrap_or(&answer.head.headers)
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(dlb::status::percent_decode)
            .unwrap_or_default();
        span.set_grpc_status(answer.status, &message);
        return;
    }
    if let Some(id) = instance {
        span.set("dlb.instance", id.to_owned());
    }
    match outcome {
        Attempt::Answered(_) => {}
        Attempt::NoInstance => span.fail("no instance to send it to"),
        Attempt::Failed(why) => span.fail(why.clone()),
        Attempt::TimedOut => {
            span.set_grpc_status(Code::DeadlineExceeded, "no answer within the deadline");
        }
        Attempt::TooLarge => span.fail("the answer was over the size limit"),
    }
}

/// A call of the five operations being relayed: dropped unanswered only when the caller
/// went before its answer, and then counted and logged as CANCELLED.
struct Unanswered<'a> {
    service: &'a GatewayService,
    op: &'static str,
    start: Started,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.service
                .record(self.op, "", self.start, 0, None, "CANCELLED");
        }
    }
}

/// Trailers for an answer that came without a grpc-status.
fn no_status_trailers(http_status: http::StatusCode) -> http::HeaderMap {
    let message = format!("the instance answered HTTP {http_status} without a gRPC status");
    dlb::status::trailers(Code::Unknown, &message)
}

/// The gateway's own answer with `status`, marked with who answered and how many tries it
/// took (Trailers-Only).
fn error_response(status: &Status, served_by: Option<&str>, attempts: u32) -> http::Response<Body> {
    let mut metadata = MetadataMap::new();
    if let Some(value) = served_by.and_then(|s| MetadataValue::try_from(s).ok()) {
        metadata.insert(dlb::metadata::SERVED_BY, value);
    }
    metadata.insert(dlb::metadata::ATTEMPTS, MetadataValue::from(attempts));
    Status::with_metadata(status.code(), status.message(), metadata).into_http()
}

/// Whether an answer with `code` refused the call untouched, so that it may go to another
/// instance: UNAVAILABLE (draining, shedding), or RESOURCE_EXHAUSTED with a gRFC A6
/// pushback (`grpc-retry-pushback-ms`, as dlb's computes send when their pool is full). A
/// RESOURCE_EXHAUSTED without it (a quota, an oversize message) would fail as well elsewhere.
fn refused(code: Code, headers: &http::HeaderMap, trailers: Option<&http::HeaderMap>) -> bool {
    let pushback = |h: &http::HeaderMap| {
        h.get(dlb::metadata::RETRY_PUSHBACK_MS)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.parse::<u64>().is_ok())
    };
    match code {
        Code::Unavailable => true,
        Code::ResourceExhausted => pushback(headers) || trailers.is_some_and(pushback),
        _ => false,
    }
}

use dlb::status::grpc_status as grpc_code;

fn add_headers(headers: &mut http::HeaderMap, served_by: Option<&str>, attempts: u32) {
    match served_by.and_then(|s| http::HeaderValue::from_str(s).ok()) {
        Some(value) => {
            headers.insert(dlb::metadata::SERVED_BY, value);
        }
        None => {
            headers.remove(dlb::metadata::SERVED_BY);
        }
    }
    headers.insert(dlb::metadata::ATTEMPTS, http::HeaderValue::from(attempts));
}

impl GatewayService {
    /// The relay as the scaffold calls it ([`dlb::server::Relayed`]).
    pub fn relay_fn(service: &Self) -> dlb::server::Relay {
        let service = service.clone();
        Arc::new(move |request| {
            let service = service.clone();
            Box::pin(async move { service.relay(request).await })
        })
    }
}

#[cfg(test)]
mod tests;

/// Every call's future is built on the stack and moved into its box, and each `async fn` it
/// awaits moves in whole too: what it holds is copied several times per call. Rare paths
/// (streams, hedges) are boxed so that the five operations' calls stay small.
#[cfg(test)]
mod future_size {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn size_of_future<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_operations_call_future_stays_small() {
        let relay = size_of_future(
            |service: GatewayService, request: http::Request<Body>| async move {
                service.relay(request).await
            },
        );
        // 7,192 bytes with the stream relay and the hedge's two copies held inline.
        assert!(relay <= 4096, "relay future: {relay} bytes");
    }
}
