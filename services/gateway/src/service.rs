//! `GatewayService`: `dlb.v1.Operations` in front of the balancer. A call enters here, takes a
//! concurrency permit (or gets RESOURCE_EXHAUSTED), and is forwarded through the balancer with
//! the caller's deadline; a connection failure or UNAVAILABLE is retried on another instance
//! within the retry budget; the answer goes back with `x-served-by` and `x-attempts`, and one
//! event goes to the log.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dlb::events::{EventLog, RequestFields, preview};
use dlb::proto::v1::operations_client::OperationsClient;
use dlb::proto::v1::{
    FibonacciRequest, FibonacciResponse, IsPalindromeRequest, IsPalindromeResponse, IsPrimeRequest,
    IsPrimeResponse, ReverseRequest, ReverseResponse, WordCountRequest, WordCountResponse,
    operations_server::Operations,
};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use tower::BoxError;
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::BoxCloneSyncService;

use crate::endpoint::{EndpointTable, ServedBy};
use crate::error::{Error, describe, is_balance_error, is_retryable};

/// The balancer as the gRPC client sees it, whatever the policy. The error type is concrete
/// (not `BoxError`): tonic's client needs that to prove its futures `Send` for every lifetime.
pub type Balanced = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, ForwardError>;

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

/// Moves a `poll_ready` failure into the next `call`. tonic's client turns a readiness error into
/// a sourceless UNKNOWN "Service was not ready" status, losing what went wrong; an error from
/// `call` keeps its source, so [`is_balance_error`] can tell "no healthy instance" apart.
#[derive(Debug, Clone)]
pub struct ReadyErrorsInCall<S> {
    inner: S,
    failed: Option<Arc<ForwardError>>,
}

impl<S> ReadyErrorsInCall<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            failed: None,
        }
    }
}

impl<S, Req> tower::Service<Req> for ReadyErrorsInCall<S>
where
    S: tower::Service<Req, Error = ForwardError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = ForwardError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, ForwardError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            std::task::Poll::Ready(Err(error)) => {
                self.failed = Some(Arc::new(error));
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.failed.take() {
            Some(error) => Box::pin(std::future::ready(Err(ForwardError(Box::new(
                SharedError(error),
            ))))),
            None => Box::pin(self.inner.call(request)),
        }
    }
}

/// A readiness error handed on to `call`.
#[derive(Debug)]
struct SharedError(Arc<ForwardError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(self.0.as_ref())
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
}

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls answered.
    pub requests: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
    /// Calls answered with an error.
    pub failures: AtomicU64,
}

/// Implements `dlb.v1.Operations` by forwarding. Cheap to clone.
#[derive(Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

struct Inner {
    balancer: Balanced,
    table: Arc<EndpointTable>,
    permits: Arc<Semaphore>,
    budget: TpsBudget,
    settings: ForwardSettings,
    events: EventLog,
    counters: Arc<Counters>,
    gateway_id: String,
    next_request: AtomicU64,
}

impl std::fmt::Debug for GatewayService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

type CallFuture<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

impl GatewayService {
    /// A service forwarding through `balancer`.
    pub fn new(
        balancer: Balanced,
        table: Arc<EndpointTable>,
        settings: ForwardSettings,
        events: EventLog,
        counters: Arc<Counters>,
        gateway_id: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                balancer,
                table,
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

    /// Calls served now.
    pub fn in_flight(&self) -> usize {
        self.inner.settings.max_in_flight - self.inner.permits.available_permits()
    }

    fn client(&self) -> OperationsClient<Balanced> {
        OperationsClient::new(self.inner.balancer.clone())
            .max_decoding_message_size(
                self.inner
                    .settings
                    .max_message_bytes
                    .max(dlb::endpoint::MAX_RESPONSE_BYTES),
            )
            .max_encoding_message_size(self.inner.settings.max_message_bytes)
    }

    async fn forward<Req, Resp>(
        &self,
        op: &'static str,
        request: Request<Req>,
        input: String,
        send: impl Fn(OperationsClient<Balanced>, Request<Req>) -> CallFuture<Resp>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
    {
        let inner = &self.inner;
        let start = Instant::now();
        let Ok(_permit) = inner.permits.try_acquire() else {
            let status: Status = Error::Overloaded {
                limit: inner.settings.max_in_flight,
            }
            .into();
            return Err(self.answer_error(op, &input, start, 0, None, &status));
        };
        let timeout = dlb::deadline::from_metadata(request.metadata())
            .unwrap_or(inner.settings.default_timeout);
        let deadline = start + timeout;
        let message = request.into_inner();
        inner.budget.deposit();

        let mut attempts = 0u32;
        let outcome = loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let budget = remaining.saturating_sub(DEADLINE_MARGIN);
            if budget.is_zero() {
                break Err(Error::DeadlineExceeded {
                    deadline: timeout,
                    attempts: attempts - 1,
                }
                .into());
            }
            let mut request = Request::new(message.clone());
            request.set_timeout(remaining);
            match tokio::time::timeout(budget, send(self.client(), request)).await {
                // Dropping the call cancels it at the instance too (HTTP/2 RST_STREAM).
                Err(_) => {
                    break Err(Error::DeadlineExceeded {
                        deadline: timeout,
                        attempts,
                    }
                    .into());
                }
                Ok(Ok(response)) => break Ok(response),
                Ok(Err(status)) if is_balance_error(&status) => {
                    break Err(Error::NoHealthyInstance {
                        summary: inner.table.summary(),
                    }
                    .into());
                }
                Ok(Err(status)) => {
                    if is_retryable(&status)
                        && attempts < inner.settings.max_attempts
                        && inner.budget.withdraw()
                    {
                        inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(op, attempts, error = %describe(&status), "retrying on another instance");
                        continue;
                    }
                    if std::error::Error::source(&status).is_some() {
                        break Err(Error::Unreachable {
                            attempts,
                            last: describe(&status),
                        }
                        .into());
                    }
                    // An instance's own answer (bad input, overload): relay it.
                    break Err(status);
                }
            }
        };
        match outcome {
            Ok(response) => {
                let served_by = response
                    .extensions()
                    .get::<ServedBy>()
                    .map(|s| s.0.to_string())
                    .or_else(|| header(response.metadata(), dlb::metadata::SERVED_BY));
                self.record(op, &input, start, attempts, served_by.as_deref(), "OK");
                let mut answer = Response::new(response.into_inner());
                add_metadata(answer.metadata_mut(), served_by.as_deref(), attempts);
                Ok(answer)
            }
            Err(status) => {
                let served_by = header(status.metadata(), dlb::metadata::SERVED_BY);
                // Bad input is the caller's mistake, not the instance's: not counted against it.
                let callers_fault = matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::NotFound
                        | tonic::Code::OutOfRange
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::AlreadyExists
                );
                if !callers_fault
                    && let Some(endpoint) = served_by.as_deref().and_then(|id| inner.table.get(id))
                {
                    endpoint.record_error();
                }
                Err(self.answer_error(op, &input, start, attempts, served_by.as_deref(), &status))
            }
        }
    }

    fn answer_error(
        &self,
        op: &'static str,
        input: &str,
        start: Instant,
        attempts: u32,
        served_by: Option<&str>,
        status: &Status,
    ) -> Status {
        self.record(
            op,
            input,
            start,
            attempts,
            served_by,
            dlb::call::code_name(status.code()),
        );
        let mut metadata = MetadataMap::new();
        add_metadata(&mut metadata, served_by, attempts);
        Status::with_metadata(status.code(), status.message(), metadata)
    }

    fn record(
        &self,
        op: &'static str,
        input: &str,
        start: Instant,
        attempts: u32,
        served_by: Option<&str>,
        code: &str,
    ) {
        let inner = &self.inner;
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        if code != "OK" {
            inner.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        let n = inner.next_request.fetch_add(1, Ordering::Relaxed);
        inner.events.request(RequestFields {
            request_id: format!("{}-{n}", inner.gateway_id),
            op: op.to_owned(),
            backend: served_by.unwrap_or("-").to_owned(),
            status: code.to_owned(),
            latency_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
            attempts,
            input: preview(input),
        });
    }
}

fn header(metadata: &MetadataMap, key: &str) -> Option<String> {
    metadata
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn add_metadata(metadata: &mut MetadataMap, served_by: Option<&str>, attempts: u32) {
    if let Some(value) = served_by.and_then(|s| MetadataValue::try_from(s).ok()) {
        metadata.insert(dlb::metadata::SERVED_BY, value);
    }
    metadata.insert(dlb::metadata::ATTEMPTS, MetadataValue::from(attempts));
}

#[tonic::async_trait]
impl Operations for GatewayService {
    async fn is_prime(
        &self,
        request: Request<IsPrimeRequest>,
    ) -> Result<Response<IsPrimeResponse>, Status> {
        let input = preview(&request.get_ref().number);
        self.forward("IsPrime", request, input, |mut client, request| {
            Box::pin(async move { client.is_prime(request).await })
        })
        .await
    }

    async fn is_palindrome(
        &self,
        request: Request<IsPalindromeRequest>,
    ) -> Result<Response<IsPalindromeResponse>, Status> {
        let input = preview(&request.get_ref().text);
        self.forward("IsPalindrome", request, input, |mut client, request| {
            Box::pin(async move { client.is_palindrome(request).await })
        })
        .await
    }

    async fn reverse(
        &self,
        request: Request<ReverseRequest>,
    ) -> Result<Response<ReverseResponse>, Status> {
        let input = preview(&request.get_ref().text);
        self.forward("Reverse", request, input, |mut client, request| {
            Box::pin(async move { client.reverse(request).await })
        })
        .await
    }

    async fn fibonacci(
        &self,
        request: Request<FibonacciRequest>,
    ) -> Result<Response<FibonacciResponse>, Status> {
        let input = request.get_ref().n.to_string();
        self.forward("Fibonacci", request, input, |mut client, request| {
            Box::pin(async move { client.fibonacci(request).await })
        })
        .await
    }

    async fn word_count(
        &self,
        request: Request<WordCountRequest>,
    ) -> Result<Response<WordCountResponse>, Status> {
        let input = preview(&request.get_ref().text);
        self.forward("WordCount", request, input, |mut client, request| {
            Box::pin(async move { client.word_count(request).await })
        })
        .await
    }
}
