//! The statuses every dlb server answers where tonic's own would be wrong or mute, applied as
//! one layer ([`StatusLayer`]) that [`crate::server::Scaffold`] puts in front of every service.
//!
//! - A request over the decoding limit: tonic says OUT_OF_RANGE; gRPC's convention (and our
//!   contract) is RESOURCE_EXHAUSTED, with a message naming the limit and the flag.
//! - A method or service the server does not have: tonic says UNIMPLEMENTED with no message;
//!   ours names the path ([`unknown_method`]), the same text from an instance as through the
//!   gateway.
//!
//! Both are Trailers-Only answers (the status in the response headers, no body), so the layer
//! looks at headers only and leaves every other answer as it is.
//!
//! Also here, for servers and clients alike: [`code_name`] and [`error_chain`], how dlb writes
//! a status code and an error in messages and logs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{self, HeaderValue};

/// The canonical upper-case name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error followed by its sources, e.g. "transport error: Connection refused (os error 111)".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = inner.source();
    }
    message
}

/// The message of UNIMPLEMENTED for a path no service here serves.
pub fn unknown_method(path: &str) -> String {
    format!("unknown method {path}: not served here")
}

/// The [`tower::Layer`] of [`StatusService`].
#[derive(Debug, Clone, Default)]
pub struct StatusLayer {
    served_by: Option<std::sync::Arc<HeaderValue>>,
}

impl StatusLayer {
    /// Also puts `x-served-by: id` on every answer (what a compute instance does).
    pub fn serving_as(id: HeaderValue) -> Self {
        Self {
            served_by: Some(std::sync::Arc::new(id)),
        }
    }
}

impl<S> tower::Layer<S> for StatusLayer {
    type Service = StatusService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusService {
            inner,
            served_by: self.served_by.clone(),
        }
    }
}

/// Rewrites tonic's oversize and unknown-method answers (see the module docs), and names the
/// instance that answered when it was given one.
#[derive(Debug, Clone)]
pub struct StatusService<S> {
    inner: S,
    // Behind an Arc: every call's future carries it, and most servers (all but compute)
    // have none.
    served_by: Option<std::sync::Arc<HeaderValue>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for StatusService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = StatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The path is kept only in case the answer is UNIMPLEMENTED; a Uri clone is a
        // reference count, not a copy.
        let uri = request.uri().clone();
        StatusFuture {
            inner: self.inner.call(request),
            uri,
            served_by: self.served_by.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`StatusService`].
    #[derive(Debug)]
    pub struct StatusFuture<F> {
        #[pin]
        inner: F,
        uri: http::Uri,
        served_by: Option<std::sync::Arc<HeaderValue>>,
    }
}

impl<F, R, E> Future for StatusFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        let headers = response.headers_mut();
        oversize_is_resource_exhausted(headers);
        name_unknown_method(headers, this.uri.path());
        if let Some(id) = this.served_by.take() {
            headers.insert(crate::metadata::SERVED_BY, HeaderValue::clone(&id));
        }
        Poll::Ready(Ok(response))
    }
}

/// The code in a `grpc-status` header (of an answer's headers or trailers), if any.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(tonic::Code::from)
}

/// gRPC's status codes as they appear in a `grpc-status` header.
const UNIMPLEMENTED: &str = "12";
const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";

/// A Trailers-Only UNIMPLEMENTED without a message gets one that names `path`.
fn name_unknown_method(headers: &mut http::HeaderMap, path: &str) {
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some(UNIMPLEMENTED)
        || headers.get("grpc-message").is_some_and(|v| !v.is_empty())
    {
        return;
    }
    if let Ok(value) = HeaderValue::from_str(&percent_encode(&unknown_method(path))) {
        headers.insert("grpc-message", value);
    }
}

/// tonic answers a request over the decoding limit with OUT_OF_RANGE; our handlers never use
/// OUT_OF_RANGE, so any such Trailers-Only status is this case: it becomes RESOURCE_EXHAUSTED
/// with a message naming the limit and the flag.
fn oversize_is_resource_exhausted(headers: &mut http::HeaderMap) {
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some(OUT_OF_RANGE) {
        return;
    }
    let original = percent_decode(
        headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    );
    // tonic's text: "Error, decoded message length too large: found N bytes, the limit is: M bytes"
    let numbers: Vec<&str> = original
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    let message = match numbers.as_slice() {
        [found, limit] => oversize_message(found, limit),
        _ => "request message is over the size limit (--max-message-bytes)".to_owned(),
    };
    headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", value);
    }
}

/// The message of RESOURCE_EXHAUSTED for a request message of `found` bytes over `limit`:
/// the same words from an instance and from the gateway.
pub fn oversize_message(found: impl std::fmt::Display, limit: impl std::fmt::Display) -> String {
    format!(
        "request message is {found} bytes, over the limit of {limit} bytes (--max-message-bytes)"
    )
}

/// The trailers of a status the gateway gives itself mid-answer (or in place of a missing
/// one): `grpc-status` and, when there is one, the percent-encoded `grpc-message`.
pub fn trailers(code: tonic::Code, message: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code as i32));
    if !message.is_empty()
        && let Ok(value) = HeaderValue::from_str(&percent_encode(message))
    {
        trailers.insert("grpc-message", value);
    }
    trailers
}

/// Encodes a `grpc-message` value as the gRPC over HTTP/2 protocol says: every byte outside
/// printable ASCII, and `%` itself, as `%XX` of its UTF-8 bytes.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes the percent-encoding of a `grpc-message` header.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers_only(status: &'static str, message: Option<&'static str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static(status));
        if let Some(message) = message {
            headers.insert("grpc-message", HeaderValue::from_static(message));
        }
        headers
    }

    #[test]
    fn an_unknown_method_is_named() {
        let mut headers = trailers_only(UNIMPLEMENTED, None);
        name_unknown_method(&mut headers, "/dlb.v1.Operations/Nope");
        assert_eq!(
            headers["grpc-message"],
            "unknown method /dlb.v1.Operations/Nope: not served here"
        );
        // A message of the server's own is kept.
        let mut headers = trailers_only(UNIMPLEMENTED, Some("gzip is not supported"));
        name_unknown_method(&mut headers, "/x.Y/Z");
        assert_eq!(headers["grpc-message"], "gzip is not supported");
        // Other statuses are left alone.
        let mut headers = trailers_only("3", None);
        name_unknown_method(&mut headers, "/x.Y/Z");
        assert!(headers.get("grpc-message").is_none());
    }

    #[test]
    fn tonics_oversize_is_resource_exhausted() {
        let mut headers = trailers_only(
            OUT_OF_RANGE,
            Some(
                "Error, decoded message length too large: found 5000 bytes, the limit is: 4000 bytes",
            ),
        );
        oversize_is_resource_exhausted(&mut headers);
        assert_eq!(headers["grpc-status"], RESOURCE_EXHAUSTED);
        assert_eq!(
            percent_decode(headers["grpc-message"].to_str().unwrap_or_default()),
            oversize_message(5000, 4000)
        );
    }

    #[test]
    fn messages_round_trip_through_percent_encoding() {
        let text = "100% sûr: <tab>\there, 🦀\n";
        let encoded = percent_encode(text);
        assert!(
            encoded.bytes().all(|b| (0x20..=0x7e).contains(&b)),
            "{encoded}"
        );
        assert_eq!(percent_decode(&encoded), text);
    }
}
