//! The server side of tracing: a span per call served, continuing the caller's trace.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http;

use super::{Kind, Span, SpanContext, TRACESTATE, Tracer, Value};

/// Which calls a server traces: never health checks and reflection (probes and tools, not
/// work), nor those under one of `skip`'s path prefixes; of the rest, those under one of
/// `only`'s, or all when `only` is empty.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traced {
    pub only: &'static [&'static str],
    pub skip: &'static [&'static str],
}

impl Traced {
    /// Every call but health and reflection.
    pub const ALL: Self = Self {
        only: &[],
        skip: &[],
    };

    fn includes(self, path: &str) -> bool {
        !path.starts_with("/grpc.health.")
            && !path.starts_with("/grpc.reflection.")
            && !self.skip.iter().any(|p| path.starts_with(p))
            && (self.only.is_empty() || self.only.iter().any(|p| path.starts_with(p)))
    }
}

/// Makes a server span per traced call (nothing when the tracer is off) and hands the
/// call on with that span as its [`super::CallSpan`], so the server's own calls become its
/// children. The span ends with the answer: its status from the trailers (or the
/// Trailers-Only headers), CANCELLED when the caller goes first. It also notes the
/// `x-served-by` and `x-attempts` an answer carries.
#[derive(Debug, Clone, Default)]
pub struct TraceLayer {
    tracer: Tracer,
    traced: Traced,
}

impl TraceLayer {
    pub fn new(tracer: Tracer, traced: Traced) -> Self {
        Self { tracer, traced }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService {
            inner,
            tracer: self.tracer.clone(),
            traced: self.traced,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
    tracer: Tracer,
    traced: Traced,
}

impl<S> tower::Service<http::Request<Body>> for TraceService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = TraceFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if !self.tracer.is_on() || !self.traced.includes(path) {
            return TraceFuture::Passed {
                future: self.inner.call(request),
            };
        }
        let parent = SpanContext::from_headers(request.headers());
        let mut span = self.tracer.start(
            super::rpc_span_name(path),
            Kind::Server,
            parent.as_ref(),
            None,
        );
        if span.is_recording()
            && let Some(state) = request
                .headers()
                .get(TRACESTATE)
                .and_then(|v| v.to_str().ok())
        {
            // The caller's tracestate matters only to a span that is recorded.
            span.set_trace_state(state);
        }
        request
            .extensions_mut()
            .insert(super::CallSpan(*span.context()));
        if !span.is_recording() {
            // Nothing to note: the call only carries the trace on (flag 00).
            return TraceFuture::Passed {
                future: self.inner.call(request),
            };
        }
        super::set_rpc_attributes(&mut span, request.uri().path());
        let response = self.inner.call(request);
        TraceFuture::Spanned {
            future: Box::pin(async move {
                // Dropped with the future when the caller goes before the answer begins.
                let mut pending = Ending(Some(span));
                let response = response.await?;
                let Some(mut span) = pending.0.take() else {
                    return Ok(response);
                };
                let (head, body) = response.into_parts();
                let header = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
                if let Some(instance) = header(crate::metadata::SERVED_BY) {
                    span.set("dlb.instance", instance.to_owned());
                }
                if let Some(attempts) =
                    header(crate::metadata::ATTEMPTS).and_then(|a| a.parse().ok())
                {
                    span.set("dlb.attempts", Value::Int(attempts));
                }
                if header("grpc-status").is_some() {
                    // Trailers-Only: the status is in the headers, the body is empty.
                    end_with(span, &head.headers);
                    return Ok(http::Response::from_parts(head, body));
                }
                let body = Body::new(Spanned {
                    inner: body,
                    span: Some(span),
                });
                Ok(http::Response::from_parts(head, body))
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a call through [`TraceService`]: the inner one as it is when nothing is
    /// recorded (no allocation on the way of the calls not sampled), boxed with the span's
    /// bookkeeping when it is.
    #[project = TracedProj]
    #[allow(missing_docs)]
    pub enum TraceFuture<F, E> {
        Passed { #[pin] future: F },
        Spanned { future: Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>> },
    }
}

impl<F, E> Future for TraceFuture<F, E>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TracedProj::Passed { future } => future.poll(cx),
            TracedProj::Spanned { future } => future.as_mut().poll(cx),
        }
    }
}

/// Ends a span from the `grpc-status` and `grpc-message` in `headers`.
fn end_with(mut span: Span, headers: &http::HeaderMap) {
    let code = crate::status::grpc_status(headers).unwrap_or(tonic::Code::Unknown);
    // Percent-encoded on the wire: the span says it as the caller reads it.
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(crate::status::percent_decode)
        .unwrap_or_default();
    span.set_grpc_status(code, &message);
}

/// A span whose call has no answer yet: CANCELLED if dropped.
struct Ending(Option<Span>);

impl Drop for Ending {
    fn drop(&mut self) {
        if let Some(mut span) = self.0.take() {
            span.set_grpc_status(tonic::Code::Cancelled, "the caller went before the answer");
        }
    }
}

/// An answer's body that ends its call's span with the trailers.
struct Spanned {
    inner: Body,
    span: Option<Span>,
}

impl HttpBody for Spanned {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(span) = self.span.take()
                {
                    end_with(span, trailers);
                }
            }
            Some(Err(status)) => {
                if let Some(mut span) = self.span.take() {
                    span.set_grpc_status(status.code(), status.message());
                }
            }
            None => {
                if let Some(mut span) = self.span.take() {
                    span.set_grpc_status(tonic::Code::Unknown, "the answer ended without a status");
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Spanned {
    fn drop(&mut self) {
        if let Some(mut span) = self.span.take() {
            span.set_grpc_status(tonic::Code::Cancelled, "the caller went before the end");
        }
    }
}
