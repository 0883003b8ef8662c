//! `OperationsService`: the gRPC face of [`crate::ops`]. A request enters here, is validated
//! against the configured limits, runs inline when cheap or on the [`CpuPool`] when heavy, and
//! leaves as a response or a status naming the field and the limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dlb::events::EventLog;
use dlb::proto::v1::{
    Certainty as PbCertainty, FibonacciRequest, FibonacciResponse, IsPalindromeRequest,
    IsPalindromeResponse, IsPrimeRequest, IsPrimeResponse, ReverseRequest, ReverseResponse,
    WordCountRequest, WordCountResponse, WordFrequency, operations_server::Operations,
};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::error::{Error, InstanceError};
use crate::ops::{self, Cancel, fibonacci, palindrome, prime, reverse, word_count};
use crate::pool::{CpuPool, PoolError};

/// Limits on what one call may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest number of significant digits for `IsPrime`.
    pub max_prime_digits: usize,
    /// Largest n for `Fibonacci`.
    pub max_fib_n: u64,
    /// Every answer this much late (`--inject-delay-ms`: a slow instance, to try a gateway).
    pub inject_delay: Duration,
}

/// Implements `dlb.v1.Operations`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OperationsService {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    id: String,
    limits: Limits,
    pool: CpuPool,
    calls: Arc<CallStats>,
    events: EventLog,
}

/// Counters of operations calls, shared with load reporting and the drain logic.
#[derive(Debug)]
pub struct CallStats {
    in_flight: AtomicU64,
    served: AtomicU64,
    draining: AtomicBool,
    idle: Notify,
    started: Instant,
}

impl Default for CallStats {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            started: Instant::now(),
        }
    }
}

impl CallStats {
    fn begin(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        CallGuard {
            stats: Arc::clone(self),
        }
    }

    /// Calls being served now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Calls finished since start.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether the instance is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Marks the instance as draining.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Time since the instance started.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Resolves once no call is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counts one call as in flight until dropped, whichever way the call ends.
struct CallGuard {
    stats: Arc<CallStats>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.stats.served.fetch_add(1, Ordering::Relaxed);
        if self.stats.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.stats.idle.notify_waiters();
        }
    }
}

impl OperationsService {
    /// A service answering as instance `id`.
    pub fn new(
        id: String,
        limits: Limits,
        pool: CpuPool,
        calls: Arc<CallStats>,
        events: EventLog,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                id,
                limits,
                pool,
                calls,
                events,
            }),
        }
    }

    fn status(&self, error: impl Into<Error>) -> Status {
        let error = error.into();
        if let Error::Pool(PoolError::Join(source)) = &error {
            self.shared
                .events
                .error("CPU job failed", &[("error", &source.to_string())]);
        }
        InstanceError {
            instance: &self.shared.id,
            error,
        }
        .into()
    }

    /// Runs `job` inline when `inline` (cheap), else on the CPU pool within the caller's
    /// deadline; when it passes, the job is cancelled and the answer is DEADLINE_EXCEEDED.
    async fn compute<T, F>(
        &self,
        inline: bool,
        deadline: Option<Duration>,
        job: F,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Cancel) -> Result<T, ops::Cancelled> + Send + 'static,
    {
        if !self.shared.limits.inject_delay.is_zero() {
            // A slow instance on purpose; the deadline and a cancel still end the call.
            let delay = self.shared.limits.inject_delay;
            match deadline {
                Some(deadline) if deadline <= delay => {
                    tokio::time::sleep(deadline.saturating_sub(dlb::deadline::MARGIN)).await;
                    return Err(Status::deadline_exceeded(format!(
                        "deadline of {deadline:?} exceeded (--inject-delay-ms {})",
                        delay.as_millis()
                    )));
                }
                _ => tokio::time::sleep(delay).await,
            }
        }
        if inline {
            return job(&Cancel::new()).map_err(|e| self.status(PoolError::from(e)));
        }
        let run = self.shared.pool.run(job);
        let Some(deadline) = deadline else {
            return run.await.map_err(|e| self.status(e));
        };
        // Dropping `run` at the deadline cancels the job.
        match tokio::time::timeout(deadline.saturating_sub(dlb::deadline::MARGIN), run).await {
            Ok(result) => result.map_err(|e| self.status(e)),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "deadline of {deadline:?} exceeded; the computation was stopped"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn is_prime(
        &self,
        request: Request<IsPrimeRequest>,
    ) -> Result<Response<IsPrimeResponse>, Status> {
        let _call = self.shared.calls.begin();
        let deadline = dlb::deadline::from_metadata(request.metadata());
        let number = prime::parse_number(
            &request.into_inner().number,
            self.shared.limits.max_prime_digits,
        )
        .map_err(|e| self.status(e))?;
        let inline = matches!(number, prime::Number::Small(_));
        let answer = self
            .compute(inline, deadline, move |cancel| {
                prime::is_prime(&number, cancel)
            })
            .await?;
        Ok(Response::new(IsPrimeResponse {
            prime: answer.prime,
            certainty: match answer.certainty {
                prime::Certainty::Proven => PbCertainty::Proven,
                prime::Certainty::Probable => PbCertainty::Probable,
            }
            .into(),
        }))
    }

    async fn is_palindrome(
        &self,
        request: Request<IsPalindromeRequest>,
    ) -> Result<Response<IsPalindromeResponse>, Status> {
        let _call = self.shared.calls.begin();
        let deadline = dlb::deadline::from_metadata(request.metadata());
        let IsPalindromeRequest { text, normalize } = request.into_inner();
        let inline = text.len() <= palindrome::INLINE_MAX_BYTES;
        let palindrome = self
            .compute(inline, deadline, move |_| {
                Ok(palindrome::is_palindrome(&text, normalize))
            })
            .await?;
        Ok(Response::new(IsPalindromeResponse { palindrome }))
    }

    async fn reverse(
        &self,
        request: Request<ReverseRequest>,
    ) -> Result<Response<ReverseResponse>, Status> {
        let _call = self.shared.calls.begin();
        let deadline = dlb::deadline::from_metadata(request.metadata());
        let text = request.into_inner().text;
        let inline = text.len() <= reverse::INLINE_MAX_BYTES;
        let text = self
            .compute(inline, deadline, move |_| Ok(reverse::reverse(&text)))
            .await?;
        Ok(Response::new(ReverseResponse { text }))
    }

    async fn fibonacci(
        &self,
        request: Request<FibonacciRequest>,
    ) -> Result<Response<FibonacciResponse>, Status> {
        let _call = self.shared.calls.begin();
        let deadline = dlb::deadline::from_metadata(request.metadata());
        let n = request.into_inner().n;
        let max = self.shared.limits.max_fib_n;
        if n > max {
            return Err(self.status(Error::FibTooLarge { n, max }));
        }
        let inline = n <= fibonacci::INLINE_MAX_N;
        let value = self
            .compute(inline, deadline, move |cancel| {
                fibonacci::fibonacci(n, cancel)
            })
            .await?;
        Ok(Response::new(FibonacciResponse {
            digits: value.len() as u64,
            value,
        }))
    }

    async fn word_count(
        &self,
        request: Request<WordCountRequest>,
    ) -> Result<Response<WordCountResponse>, Status> {
        let _call = self.shared.calls.begin();
        let deadline = dlb::deadline::from_metadata(request.metadata());
        let WordCountRequest { text, top } = request.into_inner();
        if top > word_count::MAX_TOP {
            return Err(self.status(Error::TopTooLarge {
                top,
                max: word_count::MAX_TOP,
            }));
        }
        let inline = text.len() <= word_count::INLINE_MAX_BYTES;
        let counts = self
            .compute(inline, deadline, move |cancel| {
                word_count::word_count(&text, top, cancel)
            })
            .await?;
        Ok(Response::new(WordCountResponse {
            words: counts.words,
            lines: counts.lines,
            characters: counts.characters,
            bytes: counts.bytes,
            top: counts
                .top
                .into_iter()
                .map(|(word, count)| WordFrequency { word, count })
                .collect(),
        }))
    }
}
