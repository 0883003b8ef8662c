//! Any method, any call kind: the relay of every call that is not one of dlb's five
//! operations. Messages are opaque bytes (only their 5-byte prefixes are read, to count them and
//! to hold the size limit); the request goes on to the instance as it arrives and the answer
//! comes back as it arrives, each way at the pace HTTP/2 flow control allows, so a slow reader
//! slows the instance and the gateway holds at most a window per stream.
//!
//! Retries follow gRFC A6's transparent retry: a call may go to another instance only while
//! nothing of the answer has reached the caller (not even its headers: a Trailers-Only
//! UNAVAILABLE, or a failure before any answer) and every byte of the request sent so far is
//! still held, up to [`REPLAY_BYTES`]; past that bound the request is no longer held and a
//! failure goes to the caller. The call is committed when the answer's headers come (they go
//! to the caller at once: a caller may wait for them before it sends); from then on, an
//! instance that fails mid-stream ends the call at once with UNAVAILABLE.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Code, Status};
use tower::ServiceExt;
use tower::retry::budget::Budget;

use super::framing::{Counted, MessageCounter};
use super::{GatewayService, Pool, add_headers, error_response, grpc_code};
use crate::conn::{AnswerBody, send_flow};
use crate::endpoint::{Lease, Outgoing, Tried};
use crate::error::Error;
use crate::failure::{Failure, classify};

/// The most of a streaming call's request the gateway holds to send it again elsewhere (gRFC
/// A6's per-call retry buffer, at its default in gRPC's own clients).
pub const REPLAY_BYTES: usize = 256 * 1024;

/// The caller's request as the relay feeds it to an instance: what it holds for a retry, and
/// the rest of the body still to read.
struct Feed {
    body: Body,
    /// Every chunk read so far, while [`Feed::replayable`].
    held: Vec<Bytes>,
    held_bytes: usize,
    /// All that was read is held: the call can be sent again.
    replayable: bool,
    /// The caller's body ended.
    ended: bool,
    /// Held chunks already sent on the current attempt's stream.
    sent: usize,
    /// A chunk partly sent (the instance's window was full).
    pending: Option<Bytes>,
    /// The end of the request was sent on the current attempt's stream.
    end_sent: bool,
    messages: MessageCounter,
}

/// Why feeding the instance stopped.
enum FeedError {
    /// The caller's fault or doing: a message over the limit, a broken prefix, a cancel.
    Caller(Status),
    /// The instance's stream refused more (reset, connection lost): its answer says why.
    Instance,
}

impl Feed {
    fn new(body: Body, limit: usize, compressed_ok: bool) -> Self {
        Self {
            body,
            held: Vec::new(),
            held_bytes: 0,
            replayable: true,
            ended: false,
            sent: 0,
            pending: None,
            end_sent: false,
            messages: MessageCounter::new(limit, compressed_ok),
        }
    }

    /// Starts again on a new attempt's stream: everything held is to be sent.
    fn rewind(&mut self) {
        debug_assert!(self.replayable);
        self.sent = 0;
        self.pending = None;
        self.end_sent = false;
    }

    /// Stops holding: the answer reached the caller, no retry is possible any more. Held
    /// chunks not yet sent on this attempt's stream stay, to be sent.
    fn release(&mut self) {
        self.replayable = false;
        self.held.drain(..self.sent);
        self.sent = 0;
        self.held_bytes = 0;
    }

    /// Makes the next held chunk not yet sent on this attempt's stream the one to send.
    fn take_next_held(&mut self) {
        if self.pending.is_none() && self.sent < self.held.len() {
            self.pending = Some(self.held[self.sent].clone());
            self.sent += 1;
        }
    }

    /// Moves the request one step: a chunk (or its end) to the instance, or one chunk read
    /// from the caller. Cancel-safe: what is not sent stays in `pending`. Pends forever once
    /// everything was sent.
    async fn step(&mut self, stream: &mut h2::SendStream<Bytes>) -> Result<(), FeedError> {
        self.take_next_held();
        if let Some(pending) = &mut self.pending {
            send_flow(stream, pending)
                .await
                .map_err(|_| FeedError::Instance)?;
            self.pending = None;
            return Ok(());
        }
        if self.ended {
            if !self.end_sent {
                self.end_sent = true;
                stream
                    .send_data(Bytes::new(), true)
                    .map_err(|_| FeedError::Instance)?;
                return Ok(());
            }
            return std::future::pending().await;
        }
        match self.body.frame().await {
            None => {
                self.ended = true;
                if let Err(status) = self.messages.finish() {
                    return Err(FeedError::Caller(status));
                }
            }
            Some(Err(status)) => {
                return Err(FeedError::Caller(Status::cancelled(format!(
                    "the request ended early: {}",
                    status.message()
                ))));
            }
            Some(Ok(frame)) => {
                // gRPC requests carry no trailers; anything but data is ignored.
                let Ok(data) = frame.into_data() else {
                    return Ok(());
                };
                if let Counted::Refused(status) = self.messages.feed(&data) {
                    return Err(FeedError::Caller(status));
                }
                if self.replayable && self.held_bytes + data.len() <= REPLAY_BYTES {
                    self.held_bytes += data.len();
                    self.held.push(data);
                } else {
                    // Past the bound: no longer held, so no longer retried (everything held
                    // was sent: reading comes after).
                    if self.replayable {
                        self.release();
                    }
                    self.pending = Some(data);
                }
            }
        }
        Ok(())
    }
}

/// How one streaming attempt ended before anything reached the caller.
enum Attempt {
    /// The answer's headers came: the answer goes to the caller.
    Committed(http::response::Parts, Box<StreamAnswer>),
    /// The instance answered UNAVAILABLE, Trailers-Only: may go elsewhere.
    Refused(http::response::Parts),
    /// Failed below gRPC before any answer: may go elsewhere.
    Failed(String),
    /// The caller's fault or cancel, or its deadline: answered as is.
    Ended(Status),
}

/// What a call of another service needs to be finished: counted, logged, its permit returned.
struct Call {
    service: GatewayService,
    /// Its pool's index.
    pool: usize,
    method: Arc<str>,
    start: super::Started,
    attempts: u32,
    served_by: Option<Arc<str>>,
    /// Counted and logged already.
    finished: std::sync::atomic::AtomicBool,
    _permit: OwnedSemaphorePermit,
}

/// Whose status a call ended with: the instance's own answer counts against it (unless it
/// is the caller's fault); the gateway's (failures below gRPC were counted as they happened,
/// the caller's mistakes and cancels are not the instance's) does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Said {
    Instance,
    Gateway,
}

impl Call {
    /// Counts and logs the call, once.
    fn finish(&self, code: Code, said: Said, messages_in: u64, messages_out: u64) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        self.service.record_stream(
            self.pool,
            &self.method,
            self.start,
            self.attempts,
            self.served_by.as_deref().filter(|_| said == Said::Instance),
            self.served_by.as_deref(),
            code,
            messages_in,
            messages_out,
        );
    }
}

impl Drop for Call {
    /// A call dropped unfinished: the caller went before its answer began (hyper drops the
    /// relay's future on the caller's RST_STREAM).
    fn drop(&mut self) {
        self.finish(Code::Cancelled, Said::Gateway, 0, 0);
    }
}

impl GatewayService {
    /// Relays a call of any method to `pool`; every outcome is an HTTP response carrying a
    /// gRPC status.
    pub(super) async fn relay_stream(
        &self,
        pool_index: usize,
        start: super::Started,
        request: http::Request<Body>,
    ) -> http::Response<Body> {
        let inner = &self.inner;
        let pool: &Pool = &inner.pools[pool_index];
        let method = self.method_key(request.uri().path());
        let Ok(permit) = Arc::clone(&inner.permits).try_acquire_owned() else {
            let status: Status = Error::Overloaded {
                limit: inner.settings.max_in_flight,
            }
            .into();
            self.record_stream(
                pool_index,
                &method,
                start,
                0,
                None,
                None,
                status.code(),
                0,
                0,
            );
            return status.into_http();
        };
        // The caller's deadline only: a stream may rightly last longer than --timeout.
        let deadline = dlb::deadline::from_headers(request.headers()).map(|t| start.at + t);
        let (head, body) = request.into_parts();
        let mut feed = Feed::new(
            body,
            inner.settings.max_message_bytes,
            super::framing::may_be_compressed(&head.headers),
        );
        inner.budget.deposit();
        let mut call = Call {
            service: self.clone(),
            pool: pool_index,
            method,
            start,
            attempts: 0,
            served_by: None,
            finished: std::sync::atomic::AtomicBool::new(false),
            _permit: permit,
        };
        let mut previous: Option<Result<http::response::Parts, String>> = None;
        // The instances that refused it: a retry goes to another if one is ready.
        let mut tried: Vec<Arc<str>> = Vec::new();
        loop {
            call.attempts += 1;
            if let Some(deadline) = deadline
                && deadline
                    .saturating_duration_since(Instant::now())
                    .saturating_sub(super::DEADLINE_MARGIN)
                    .is_zero()
            {
                call.attempts -= 1;
                return self.stream_error(
                    &call,
                    &feed,
                    Error::DeadlineExceeded {
                        deadline: deadline - start.at,
                        attempts: call.attempts,
                    }
                    .into(),
                );
            }
            let mut request = http::Request::new(Outgoing::Lease);
            if !tried.is_empty() {
                request.extensions_mut().insert(Tried {
                    ids: tried.clone(),
                    strictly: false,
                });
            }
            let lease = match pool.balancer.clone().oneshot(request).await {
                Ok(answer) => match answer.into_body() {
                    AnswerBody::Lease(lease) => lease,
                    // The endpoint answers a lease request with a lease, always.
                    _ => {
                        let status = Status::internal("the balancer answered without a lease");
                        return self.stream_error(&call, &feed, status);
                    }
                },
                Err(error) if classify(&error) == Failure::NoInstance => {
                    call.attempts -= 1;
                    let summary = pool.summary();
                    return match previous {
                        None => self.stream_error(
                            &call,
                            &feed,
                            Error::NoHealthyInstance { summary }.into(),
                        ),
                        Some(last) => self.give_up(&call, &feed, last, Some(summary)),
                    };
                }
                Err(error) => {
                    previous = Some(Err(dlb::status::error_chain(&error)));
                    if self.may_retry(&call, &feed) {
                        continue;
                    }
                    break;
                }
            };
            if previous.is_some() {
                inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            call.served_by = Some(Arc::clone(lease.id()));
            if call.attempts > 1 {
                feed.rewind();
            }
            let mut span = self.attempt_span(&head, false);
            let traceparent = super::traceparent_for(span.as_ref(), &head);
            let mut span = span.as_mut().and_then(super::AttemptSpan::take);
            if let Some(span) = &mut span {
                span.set("dlb.instance", lease.id().to_string());
            }
            match self
                .attempt_stream(&head, &mut feed, lease, deadline, traceparent)
                .await
            {
                Attempt::Committed(mut parts, mut answer) => {
                    // It ends with the answer.
                    answer.span = span;
                    add_headers(&mut parts.headers, call.served_by.as_deref(), call.attempts);
                    return commit(call, feed, parts, answer);
                }
                Attempt::Ended(status) => {
                    if let Some(span) = &mut span {
                        span.set_grpc_status(status.code(), status.message());
                    }
                    return self.stream_error(&call, &feed, status);
                }
                Attempt::Refused(parts) => {
                    if let Some(span) = &mut span {
                        let code = grpc_code(&parts.headers).unwrap_or(Code::Unknown);
                        span.set_grpc_status(code, "refused");
                    }
                    tried.extend(call.served_by.clone());
                    previous = Some(Ok(parts));
                }
                Attempt::Failed(why) => {
                    if let Some(span) = &mut span {
                        span.fail(why.clone());
                    }
                    // Its instance failed it: a retry goes elsewhere.
                    tried.extend(call.served_by.clone());
                    previous = Some(Err(why));
                }
            }
            if !self.may_retry(&call, &feed) {
                break;
            }
            tracing::debug!(method = %call.method, attempts = call.attempts, "retrying the stream");
        }
        match previous {
            Some(last) => self.give_up(&call, &feed, last, None),
            None => self.stream_error(&call, &feed, Status::internal("no attempt was made")),
        }
    }

    fn may_retry(&self, call: &Call, feed: &Feed) -> bool {
        feed.replayable
            && call.attempts < self.inner.settings.max_attempts
            && self.inner.budget.withdraw()
    }

    /// One try on the instance of `lease`: opens the stream, sends what is held and follows
    /// the caller, until the answer's headers come.
    async fn attempt_stream(
        &self,
        head: &http::request::Parts,
        feed: &mut Feed,
        mut lease: Box<Lease>,
        deadline: Option<Instant>,
        traceparent: Option<http::HeaderValue>,
    ) -> Attempt {
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = head.uri.clone();
        *request.headers_mut() = head.headers.clone();
        if let Some(traceparent) = traceparent {
            request
                .headers_mut()
                .insert(dlb::trace::TRACEPARENT_NAME, traceparent);
        }
        if let Some(deadline) = deadline {
            request.headers_mut().insert(
                dlb::deadline::GRPC_TIMEOUT,
                dlb::deadline::to_header(deadline.saturating_duration_since(Instant::now())),
            );
        }
        let far = Instant::now() + std::time::Duration::from_secs(86_400 * 365);
        let expiry = tokio::time::sleep_until(deadline.unwrap_or(far).into());
        tokio::pin!(expiry);

        let opened = tokio::select! {
            opened = lease.conn.open(request, false) => opened,
            () = &mut expiry => return timed_out(),
            () = lease.cut() => return Attempt::Failed(format!("instance {} stopped answering", lease.id())),
        };
        let (conn, mut response, mut send) = match opened {
            Ok(opened) => opened.into_parts(),
            Err(error) => {
                lease.failed(error.as_ref());
                return Attempt::Failed(dlb::status::error_chain(error.as_ref()));
            }
        };
        // Feed the request until the answer's headers come.
        let mut feeding = true;
        let headers = match feed_until(
            &mut response,
            feed,
            &mut send,
            &mut feeding,
            expiry.as_mut(),
            &lease,
        )
        .await
        {
            Ok(headers) => headers,
            Err(ended) => return ended,
        };
        let answer = match conn.headers(headers) {
            Ok(answer) => answer,
            Err(error) => {
                lease.failed(error.as_ref());
                return Attempt::Failed(dlb::status::error_chain(error.as_ref()));
            }
        };
        lease.answered();
        let (parts, body) = answer.into_parts();
        let AnswerBody::Stream(recv) = body else {
            // A connection answers with h2's stream, always.
            return Attempt::Failed("the connection answered without a stream".into());
        };
        if recv.is_end_stream() {
            // Trailers-Only: the status in the headers.
            let code = grpc_code(&parts.headers).unwrap_or(Code::Unknown);
            if super::refused(code, &parts.headers, None) {
                lease.finish();
                return Attempt::Refused(parts);
            }
            let code = grpc_code(&parts.headers);
            return Attempt::Committed(parts, answered_whole(None, code, lease, feed, send));
        }
        // The answer began (gRFC A6 commits a call on its response headers): it streams to
        // the caller from here, and the request's rest follows on a task of its own.
        let mut answer = StreamAnswer::done();
        answer.recv = Some(recv);
        answer.cut = Some(Box::pin(lease.cut_token().cancelled_owned()));
        answer.lease = Some(lease);
        answer.feed = Some(send);
        Attempt::Committed(parts, Box::new(answer))
    }

    fn trailers_only(
        &self,
        call: &Call,
        feed: &Feed,
        mut parts: http::response::Parts,
    ) -> http::Response<Body> {
        add_headers(&mut parts.headers, call.served_by.as_deref(), call.attempts);
        let code = grpc_code(&parts.headers).unwrap_or(Code::Unknown);
        call.finish(code, Said::Instance, feed.messages.count(), 0);
        http::Response::from_parts(parts, Body::empty())
    }

    fn stream_error(&self, call: &Call, feed: &Feed, status: Status) -> http::Response<Body> {
        call.finish(status.code(), Said::Gateway, feed.messages.count(), 0);
        error_response(&status, call.served_by.as_deref(), call.attempts)
    }

    /// No attempt is left: the last refusal is relayed, or the last failure told (with why no
    /// other instance was tried, when that is known).
    fn give_up(
        &self,
        call: &Call,
        feed: &Feed,
        last: Result<http::response::Parts, String>,
        none_left: Option<String>,
    ) -> http::Response<Body> {
        match last {
            Ok(refused) => self.trailers_only(call, feed, refused),
            Err(last) => {
                let last = match none_left {
                    Some(summary) => {
                        format!("{last} (and no other instance is healthy: {summary})")
                    }
                    None => last,
                };
                let error = Error::Unreachable {
                    attempts: call.attempts,
                    last,
                };
                self.stream_error(call, feed, error.into())
            }
        }
    }
}

fn timed_out() -> Attempt {
    Attempt::Ended(Status::deadline_exceeded("deadline exceeded"))
}

/// Feeds the request (while `feeding`: the instance's stream may refuse more, and then its
/// answer says why) until `until` resolves. The attempt ends instead when the caller breaks
/// the request or goes, the deadline passes, or the instance stops answering.
async fn feed_until<T>(
    until: impl std::future::Future<Output = T>,
    feed: &mut Feed,
    send: &mut h2::SendStream<Bytes>,
    feeding: &mut bool,
    mut expiry: Pin<&mut tokio::time::Sleep>,
    lease: &Lease,
) -> Result<T, Attempt> {
    tokio::pin!(until);
    loop {
        tokio::select! {
            biased;
            done = &mut until => return Ok(done),
            step = feed.step(send), if *feeding => match step {
                Ok(()) => {}
                Err(FeedError::Caller(status)) => {
                    send.send_reset(h2::Reason::CANCEL);
                    return Err(Attempt::Ended(status));
                }
                Err(FeedError::Instance) => *feeding = false,
            },
            () = &mut expiry => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(timed_out());
            }
            () = lease.cut() => {
                return Err(Attempt::Failed(format!("instance {} stopped answering", lease.id())));
            }
        }
    }
}

/// An answer with no message: its status alone (Trailers-Only, or headers then trailers).
fn answered_whole(
    trailers: Option<http::HeaderMap>,
    code: Option<Code>,
    mut lease: Box<Lease>,
    feed: &Feed,
    mut send: h2::SendStream<Bytes>,
) -> Box<StreamAnswer> {
    lease.finish();
    // The instance is done: whatever the caller still sends goes nowhere.
    if !feed.end_sent {
        send.send_reset(h2::Reason::CANCEL);
    }
    let mut done = StreamAnswer::done();
    done.code = code;
    done.trailers = trailers;
    done.lease = Some(lease);
    Box::new(done)
}

/// Hands the answer to the caller: the request's rest is fed by a task of its own, and the
/// call is finished when the answer ends (or the caller goes).
fn commit(
    call: Call,
    mut feed: Feed,
    parts: http::response::Parts,
    mut answer: Box<StreamAnswer>,
) -> http::Response<Body> {
    feed.release();
    let messages_in = Arc::new(AtomicU64::new(feed.messages.count()));
    if let Some(mut send) = answer.feed.take() {
        let (failed, caller_failed) = oneshot::channel();
        let counted = Arc::clone(&messages_in);
        answer.caller_failed = Some(caller_failed);
        answer.pump = Some(tokio::spawn(async move {
            while !(feed.ended && feed.end_sent && feed.pending.is_none()) {
                let step = feed.step(&mut send).await;
                counted.store(feed.messages.count(), Ordering::Relaxed);
                match step {
                    Ok(()) => {}
                    Err(FeedError::Caller(status)) => {
                        // The answer hears why first: resetting wakes its reader, which must
                        // not take our own reset for the instance's failure.
                        let _ = failed.send(status);
                        send.send_reset(h2::Reason::CANCEL);
                        return;
                    }
                    // The instance will say why in its answer.
                    Err(FeedError::Instance) => return,
                }
            }
        }));
    }
    answer.messages_in = messages_in;
    answer.call = Some(call);
    if answer.recv.is_none() {
        let code = answer.code.unwrap_or(Code::Unknown);
        answer.end(code, Said::Instance);
        if answer.trailers.is_none() {
            // Trailers-Only: hyper ends the stream on the HEADERS frame itself.
            return http::Response::from_parts(parts, Body::empty());
        }
    }
    http::Response::from_parts(parts, Body::new(*answer))
}

/// The answer of a call of another service as the caller reads it: the instance's messages
/// as they come, then its trailers; an instance failing mid-stream ends it with UNAVAILABLE.
struct StreamAnswer {
    recv: Option<h2::RecvStream>,
    /// The answer's trailers when they are known already.
    trailers: Option<http::HeaderMap>,
    /// The status when known already.
    code: Option<Code>,
    lease: Option<Box<Lease>>,
    /// The request's way to the instance until the task feeding it starts.
    feed: Option<h2::SendStream<Bytes>>,
    pump: Option<JoinHandle<()>>,
    caller_failed: Option<oneshot::Receiver<Status>>,
    messages_in: Arc<AtomicU64>,
    messages_out: u64,
    call: Option<Call>,
    ended: bool,
    counter: MessageCounter,
    /// Resolves when the instance is found to have stopped answering.
    cut: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    /// The attempt's span (tracing on), ended with the answer.
    span: Option<dlb::trace::Span>,
}

impl StreamAnswer {
    fn done() -> Self {
        Self {
            recv: None,
            trailers: None,
            code: None,
            lease: None,
            feed: None,
            pump: None,
            caller_failed: None,
            messages_in: Arc::default(),
            messages_out: 0,
            call: None,
            ended: false,
            counter: MessageCounter::new(usize::MAX, true),
            cut: None,
            span: None,
        }
    }

    /// Finishes the call with `code`, once.
    fn end(&mut self, code: Code, said: Said) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.recv = None;
        if let Some(mut span) = self.span.take() {
            span.set("dlb.messages_out", self.counter.count().cast_signed());
            span.set_grpc_status(code, "");
        }
        if let Some(lease) = &mut self.lease {
            lease.finish();
        }
        self.lease = None;
        if let Some(call) = self.call.take() {
            call.finish(
                code,
                said,
                self.messages_in.load(Ordering::Relaxed),
                self.counter.count(),
            );
        }
    }

    /// Ends the answer with the gateway's own status.
    fn status_trailers(&mut self, status: &Status) -> Frame<Bytes> {
        self.end(status.code(), Said::Gateway);
        Frame::trailers(dlb::status::trailers(status.code(), status.message()))
    }

    fn data(&mut self, data: Bytes) -> Frame<Bytes> {
        let _ = self.counter.feed(&data);
        self.messages_out = self.counter.count();
        Frame::data(data)
    }
}

impl http_body::Body for StreamAnswer {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        if let Some(failed) = &mut this.caller_failed
            && let Poll::Ready(result) = Pin::new(failed).poll(cx)
        {
            this.caller_failed = None;
            if let Ok(status) = result {
                // The caller broke the request (a message over the limit, say): the instance
                // was reset; the caller hears why.
                return Poll::Ready(Some(Ok(this.status_trailers(&status))));
            }
        }
        if let Some(cut) = &mut this.cut
            && cut.as_mut().poll(cx).is_ready()
        {
            // The instance stopped answering (the stall check probed it): the stream will
            // not go on.
            this.cut = None;
            let id = this
                .lease
                .as_ref()
                .map_or_else(String::new, |l| l.id().to_string());
            let status = Status::unavailable(format!(
                "instance {id} stopped answering (no reply to a health probe); stream cut"
            ));
            return Poll::Ready(Some(Ok(this.status_trailers(&status))));
        }
        let Some(recv) = &mut this.recv else {
            let code = this.code.unwrap_or(Code::Unknown);
            this.end(code, Said::Instance);
            return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
        };
        match recv.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                // Read: the instance may send more (the caller's pace sets ours).
                let _ = recv.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(this.data(data))))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Ok(this.failed(&error)))),
            Poll::Ready(None) => match recv.poll_trailers(cx) {
                Poll::Ready(Ok(Some(trailers))) => {
                    this.end(
                        grpc_code(&trailers).unwrap_or(Code::Unknown),
                        Said::Instance,
                    );
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Poll::Ready(Ok(None)) => {
                    let status =
                        Status::unknown("the instance ended its answer without a gRPC status");
                    Poll::Ready(Some(Ok(this.status_trailers(&status))))
                }
                Poll::Ready(Err(error)) => Poll::Ready(Some(Ok(this.failed(&error)))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.trailers.is_none()
    }
}

impl StreamAnswer {
    /// The instance's stream failed mid-answer: counted against it, and the caller hears
    /// UNAVAILABLE at once.
    fn failed(&mut self, error: &h2::Error) -> Frame<Bytes> {
        let id = self
            .lease
            .as_ref()
            .map_or_else(|| "?".to_owned(), |l| l.id().to_string());
        // Our own reset (the caller went, or broke its request) is no failure of the
        // instance's.
        let ours = error.is_reset() && !error.is_remote();
        if let Some(lease) = &self.lease
            && !ours
        {
            lease.failed(error);
        }
        let status = Status::unavailable(format!(
            "instance {id} failed mid-stream: {}",
            dlb::status::error_chain(error)
        ));
        self.status_trailers(&status)
    }
}

impl Drop for StreamAnswer {
    fn drop(&mut self) {
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
        // Dropped before its end: the caller went (cancel, or its deadline).
        self.end(Code::Cancelled, Said::Gateway);
    }
}

impl std::fmt::Debug for StreamAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamAnswer").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_holding(chunks: &[&'static [u8]]) -> Feed {
        let mut feed = Feed::new(Body::empty(), 1024, false);
        for chunk in chunks {
            feed.held.push(Bytes::from_static(chunk));
            feed.held_bytes += chunk.len();
        }
        feed
    }

    fn sends(feed: &mut Feed) -> Vec<Bytes> {
        let mut out = Vec::new();
        loop {
            feed.take_next_held();
            match feed.pending.take() {
                Some(chunk) => out.push(chunk),
                None => return out,
            }
        }
    }

    #[test]
    fn a_retry_sends_everything_held_again_in_order() {
        let mut feed = feed_holding(&[b"a", b"b", b"c"]);
        assert_eq!(sends(&mut feed), ["a", "b", "c"]);
        feed.rewind();
        assert_eq!(sends(&mut feed), ["a", "b", "c"]);
    }

    #[test]
    fn what_was_held_but_not_sent_when_the_answer_began_is_still_sent() {
        // "a" went out; "b" and "c" were read and held, and the answer's headers came before
        // they were sent: the call commits, and they must still reach the instance.
        let mut feed = feed_holding(&[b"a", b"b", b"c"]);
        feed.take_next_held();
        feed.pending = None;
        feed.release();
        assert!(!feed.replayable);
        assert_eq!(sends(&mut feed), ["b", "c"]);
    }
}
