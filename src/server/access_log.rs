//! The access log: one JSON line per call a server answered, written by a thread of its own.
//!
//! Unlike the Redis event log (the latest 1,000 events, lossy under load by design), nothing
//! is dropped: every call's line is queued (memory grows only while the disk is slower than
//! the calls) and written in order, and the log is flushed whenever the queue runs dry and
//! when the server stops. A call's line is written when its answer ends: its last byte sent,
//! or the caller gone (status `CANCELLED`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

// The headers read of every answer, named ahead (a lookup by string parses the name).
const SERVED_BY: http::HeaderName = http::HeaderName::from_static(crate::metadata::SERVED_BY);
const ATTEMPTS: http::HeaderName = http::HeaderName::from_static(crate::metadata::ATTEMPTS);
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    /// Appended to.
    File(PathBuf),
}

impl Target {
    /// Checks that the lines can go where asked: a file is created if missing and opened for
    /// appending (then closed), so that a bad path is said before the server says it listens.
    ///
    /// # Errors
    ///
    /// A file that cannot be opened, named with the reason.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Stdout => Ok(()),
            Self::File(path) => open_file(path).map(drop),
        }
    }
}

/// `path` opened for appending, created if missing.
fn open_file(path: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("--access-log {}: cannot open it: {e}", path.display()))
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("--access-log needs stdout or a file path".to_owned()),
            "stdout" | "-" => Ok(Self::Stdout),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// Text a line holds: short text (paths, instance ids: nearly all) inline, so that a line
/// owns no heap memory for the writer thread to free (a free across threads costs more than
/// the copy), longer text on the heap.
#[derive(Debug, Clone)]
enum Text {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

/// The longest text kept inline.
const INLINE: usize = 62;

impl Text {
    fn new(text: &str) -> Self {
        match u8::try_from(text.len()) {
            Ok(len) if text.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..text.len()].copy_from_slice(text.as_bytes());
                Self::Inline { len, bytes }
            }
            _ => Self::Heap(text.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied whole from a str: always UTF-8.
            Self::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or("")
            }
            Self::Heap(text) => text,
        }
    }
}

/// One call, as logged.
#[derive(Debug)]
struct Line {
    /// When the call arrived (the writer makes it a time of day: no clock read on the call's
    /// way for it).
    arrived: Instant,
    method: Option<Text>,
    status: &'static str,
    instance: Option<Text>,
    attempts: Option<u32>,
    latency_us: u64,
    peer: Option<SocketAddr>,
    identity: Option<String>,
    trace_id: Option<[u8; 16]>,
    request_bytes: u64,
    response_bytes: u64,
}

/// The RFC 3339 text of the last second a line was written in (the writer makes a line's
/// time from it and the milliseconds: most lines share their second with the one before).
#[derive(Debug, Default)]
struct Second {
    secs: Option<u64>,
    text: String,
}

impl Second {
    /// `ms` as `2026-12-02T18:30:12.417Z`, into `out`.
    fn write(&mut self, ms: u64, out: &mut String) {
        let secs = ms / 1000;
        if self.secs != Some(secs) {
            self.secs = Some(secs);
            self.text = crate::events::time::rfc3339_ms(secs * 1000);
            // Up to the seconds: ".000Z" goes.
            self.text.truncate(self.text.len().saturating_sub(5));
        }
        out.push_str(&self.text);
        let millis = ms % 1000;
        out.push('.');
        for digit in [millis / 100, millis / 10 % 10, millis % 10] {
            // A decimal digit: the cast is exact.
            #[allow(clippy::cast_possible_truncation)]
            out.push(char::from(b'0' + digit as u8));
        }
        out.push('Z');
    }
}

impl Line {
    /// Writes the line's JSON object (no newline) to `out`, its time `ts_ms` (Unix ms),
    /// without allocating: the writer formats every call's line, so this is on the way of
    /// every call's CPU.
    fn write_json(&self, ts_ms: u64, second: &mut Second, out: &mut String) {
        let optional = |out: &mut String, key: &str, value: Option<&str>| {
            out.push_str(key);
            match value {
                Some(value) => json_string(out, value),
                None => out.push_str("null"),
            }
        };
        out.push_str("{\"ts\":\"");
        second.write(ts_ms, out);
        out.push_str("\",\"method\":");
        json_string(out, self.method.as_ref().map_or("", Text::as_str));
        out.push_str(",\"status\":\"");
        out.push_str(self.status);
        out.push('"');
        optional(
            out,
            ",\"instance\":",
            self.instance.as_ref().map(Text::as_str),
        );
        out.push_str(",\"attempts\":");
        match self.attempts {
            Some(n) => push_u64(out, u64::from(n)),
            None => out.push_str("null"),
        }
        out.push_str(",\"latency_us\":");
        push_u64(out, self.latency_us);
        out.push_str(",\"peer\":");
        match self.peer {
            Some(peer) => {
                out.push('"');
                push_addr(out, peer);
                out.push('"');
            }
            None => out.push_str("null"),
        }
        optional(out, ",\"identity\":", self.identity.as_deref());
        out.push_str(",\"trace_id\":");
        match &self.trace_id {
            Some(id) => {
                out.push('"');
                crate::trace::push_hex(out, id);
                out.push('"');
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"request_bytes\":");
        push_u64(out, self.request_bytes);
        out.push_str(",\"response_bytes\":");
        push_u64(out, self.response_bytes);
        out.push('}');
    }

    #[cfg(test)]
    fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(0, &mut Second::default(), &mut out);
        out
    }
}

/// `n` in decimal.
fn push_u64(out: &mut String, n: u64) {
    out.push_str(crate::decimal::digits(n, &mut [0; 20]));
}

/// `addr` as `127.0.0.1:5000` (or `[::1]:5000`).
fn push_addr(out: &mut String, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(octet));
            }
            out.push(':');
            push_u64(out, u64::from(v4.port()));
        }
        SocketAddr::V6(_) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{addr}");
        }
    }
}

/// `value` as a JSON string.
fn json_string(out: &mut String, value: &str) {
    use std::fmt::Write as _;
    out.push('"');
    if !value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Nothing to escape (the usual case): as it is.
        out.push_str(value);
        out.push('"');
        return;
    }
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// How long the writer sleeps between batches: callers never wake it (no system call per
/// call), it comes for the lines.
const WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Lines queued past this wake the writer early, so that a burst does not wait in memory.
const WAKE_AT: usize = 8_192;

/// The queue between the calls and the writer thread.
#[derive(Debug, Default)]
struct Queue {
    /// The lock every call takes, on a cache line of its own, so that nothing else the writer
    /// touches pulls that line away from the calls' core.
    lines: CacheLine<std::sync::Mutex<(Vec<Line>, bool)>>,
    /// Lines queued past [`WAKE_AT`], or the stop.
    wake: std::sync::Condvar,
    written: AtomicU64,
}

/// A value aligned to (and so alone on) a 64-byte cache line, or two on CPUs that fetch
/// lines in pairs.
#[derive(Debug, Default)]
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A server's access log, or none. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    queue: Option<Arc<Queue>>,
}

/// Ends the writer thread, after the last line is written and flushed.
#[derive(Debug)]
pub struct AccessLogWriter {
    queue: Arc<Queue>,
    thread: std::thread::JoinHandle<()>,
}

impl AccessLogWriter {
    /// Writes and flushes every line queued so far, then ends the writer (call it once the
    /// server has closed its connections: later lines are not written).
    pub fn finish(self) {
        lock(&self.queue.lines).1 = true;
        self.queue.wake.notify_one();
        let _ = self.thread.join();
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AccessLog {
    /// Opens `target` (a file is created if missing and appended to) and starts the writer.
    ///
    /// # Errors
    ///
    /// A file that cannot be opened, named with the reason.
    pub fn open(target: &Target) -> Result<(Self, AccessLogWriter), String> {
        let out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(open_file(path)?),
        };
        let queue = Arc::new(Queue::default());
        let thread = std::thread::Builder::new()
            .name("access-log".to_owned())
            .spawn({
                let queue = Arc::clone(&queue);
                move || write_lines(out, &queue)
            })
            .map_err(|e| format!("--access-log: cannot start its writer: {e}"))?;
        Ok((
            Self {
                queue: Some(Arc::clone(&queue)),
            },
            AccessLogWriter { queue, thread },
        ))
    }

    /// Whether lines are written.
    pub fn is_on(&self) -> bool {
        self.queue.is_some()
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.queue
            .as_ref()
            .map_or(0, |q| q.written.load(Ordering::Relaxed))
    }

    fn send(&self, line: Line) {
        if let Some(queue) = &self.queue {
            let mut lines = lock(&queue.lines);
            lines.0.push(line);
            if lines.0.len() == WAKE_AT {
                queue.wake.notify_one();
            }
        }
    }
}

/// The writer thread: every [`WRITE_INTERVAL`] (or sooner for a burst), the lines queued, in
/// order, then a flush; at the stop, what is left.
fn write_lines(out: Box<dyn Write + Send>, queue: &Queue) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    let mut batch = Vec::new();
    let mut text = String::with_capacity(512);
    let mut second = Second::default();
    let mut failed = false;
    loop {
        let stop = {
            let mut lines = lock(&queue.lines);
            if lines.0.len() < WAKE_AT && !lines.1 {
                lines = queue
                    .wake
                    .wait_timeout(lines, WRITE_INTERVAL)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut lines.0, &mut batch);
            lines.1
        };
        // The batch's lines get their times of day from one reading of both clocks.
        let (now_ms, now) = (crate::events::time::now_ms(), Instant::now());
        let mut written = 0;
        for line in batch.drain(..) {
            text.clear();
            let ago = now.saturating_duration_since(line.arrived).as_millis();
            let ts_ms = now_ms.saturating_sub(u64::try_from(ago).unwrap_or(u64::MAX));
            line.write_json(ts_ms, &mut second, &mut text);
            text.push('\n');
            match out.write_all(text.as_bytes()) {
                Ok(()) => written += 1,
                Err(error) if !failed => {
                    failed = true;
                    eprintln!("access log: cannot write ({error}); lines are being lost");
                }
                Err(_) => {}
            }
        }
        // Once per batch: the count shares no line with the queue's lock, but is read by
        // stats only.
        queue.written.fetch_add(written, Ordering::Relaxed);
        if let Err(error) = out.flush()
            && !failed
        {
            failed = true;
            eprintln!("access log: cannot write ({error}); lines are being lost");
        }
        if stop && lock(&queue.lines).0.is_empty() {
            return;
        }
    }
}

/// The layer that logs every call through it to its [`AccessLog`] (nothing when it is off).
#[derive(Debug, Clone, Default)]
pub struct AccessLogLayer {
    log: AccessLog,
}

impl AccessLogLayer {
    pub fn new(log: AccessLog) -> Self {
        Self { log }
    }
}

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLogService {
            inner,
            log: self.log.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLogService<S> {
    inner: S,
    log: AccessLog,
}

/// What is known of a call when it arrives, and its request's bytes as they are read: one
/// allocation per call, shared by the request's body and the answer's.
#[derive(Debug)]
struct Arrival {
    start: Instant,
    method: Option<Text>,
    peer: Option<SocketAddr>,
    identity: Option<String>,
    trace_id: Option<[u8; 16]>,
    request_bytes: AtomicU64,
}

impl<S> tower::Service<http::Request<Body>> for AccessLogService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !self.log.is_on() {
            return AccessLogFuture {
                inner: self.inner.call(request),
                pending: Pending(None),
            };
        }
        let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let peer = tls
            .and_then(|info| info.get_ref().remote_addr())
            .or_else(|| {
                request
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(TcpConnectInfo::remote_addr)
            });
        let identity = tls
            .and_then(TlsConnectInfo::peer_certs)
            .map(|certs| crate::authz::caller_of(&certs).to_string());
        // The gateway's own span when it traces (the trace layer runs first), else the
        // caller's.
        let trace_id =
            crate::trace::SpanContext::of_request(request.headers(), request.extensions())
                .map(|c| c.trace_id);
        let arrival = Arc::new(Arrival {
            start: Instant::now(),
            method: Some(Text::new(request.uri().path())),
            peer,
            identity,
            trace_id,
            request_bytes: AtomicU64::new(0),
        });
        let request = request.map(|body| {
            Body::new(Counted {
                inner: body,
                arrival: Arc::clone(&arrival),
            })
        });
        AccessLogFuture {
            inner: self.inner.call(request),
            pending: Pending(Some((self.log.clone(), arrival))),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a call through [`AccessLogService`]: the inner one, and the call's line
    /// to be written (none when the log is off), which goes with the answer's body once the
    /// answer begins.
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        pending: Pending,
    }
}

impl<F, E> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let Some((log, arrival)) = this.pending.0.take() else {
            return Poll::Ready(Ok(response));
        };
        let (head, body) = response.into_parts();
        let answer = Answer {
            instance: head
                .headers
                .get(&SERVED_BY)
                // Header values that are not text are shown as nothing rather than guessed.
                .map(|v| Text::new(v.to_str().unwrap_or(""))),
            attempts: head
                .headers
                .get(&ATTEMPTS)
                .and_then(|v| v.to_str().ok())
                .and_then(|a| a.parse().ok()),
            status: status_of(&head.headers),
        };
        let body = Body::new(Logged {
            inner: body,
            bytes: 0,
            pending: Some((log, arrival, answer)),
        });
        Poll::Ready(Ok(http::Response::from_parts(head, body)))
    }
}

/// A call whose line is still to be written, until its answer begins: dropped before (the
/// caller gone, or the service failed), its line says CANCELLED.
#[derive(Debug)]
struct Pending(Option<(AccessLog, Arc<Arrival>)>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((log, arrival)) = self.0.take() {
            finish(&log, &arrival, &Answer::default(), "CANCELLED", 0);
        }
    }
}

/// What the answer's head said.
#[derive(Debug, Default)]
struct Answer {
    instance: Option<Text>,
    attempts: Option<u32>,
    /// From a trailers-only answer.
    status: Option<&'static str>,
}

fn finish(log: &AccessLog, arrival: &Arrival, answer: &Answer, status: &'static str, bytes: u64) {
    log.send(Line {
        arrived: arrival.start,
        method: arrival.method.clone(),
        status,
        instance: answer.instance.clone(),
        attempts: answer.attempts,
        latency_us: u64::try_from(arrival.start.elapsed().as_micros()).unwrap_or(u64::MAX),
        peer: arrival.peer,
        identity: arrival.identity.clone(),
        trace_id: arrival.trace_id,
        request_bytes: arrival.request_bytes.load(Ordering::Relaxed),
        response_bytes: bytes,
    });
}

/// The gRPC code name of the `grpc-status` in `headers` (`UNKNOWN` for one that is no
/// code), if there is one.
fn status_of(headers: &http::HeaderMap) -> Option<&'static str> {
    headers.contains_key(&GRPC_STATUS).then(|| {
        crate::status::code_name(
            crate::status::grpc_status(headers).unwrap_or(tonic::Code::Unknown),
        )
    })
}

/// A request body, its data bytes counted.
struct Counted {
    inner: Body,
    arrival: Arc<Arrival>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            self.arrival
                .request_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
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

/// A response body that writes its call's line when it ends (or is dropped unfinished).
struct Logged {
    inner: Body,
    bytes: u64,
    pending: Option<(AccessLog, Arc<Arrival>, Answer)>,
}

impl Logged {
    fn done(&mut self, status: &'static str) {
        if let Some((log, arrival, answer)) = self.pending.take() {
            finish(&log, &arrival, &answer, status, self.bytes);
        }
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    let status = status_of(trailers).unwrap_or("UNKNOWN");
                    self.done(status);
                }
            }
            Some(Err(_)) => self.done("INTERNAL"),
            None => {
                let status = self
                    .pending
                    .as_ref()
                    .and_then(|(_, _, answer)| answer.status)
                    .unwrap_or("UNKNOWN");
                self.done(status);
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

impl Drop for Logged {
    fn drop(&mut self) {
        // Ended without trailers: a trailers-only answer says its status in its head; else
        // the caller went first.
        let status = self
            .pending
            .as_ref()
            .and_then(|(_, _, answer)| answer.status)
            .unwrap_or("CANCELLED");
        self.done(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object() {
        let line = Line {
            arrived: Instant::now(),
            method: Some(Text::new("/dlb.v1.Operations/Reverse")),
            status: "OK",
            instance: Some(Text::new("A")),
            attempts: Some(2),
            latency_us: 512,
            peer: Some(([127, 0, 0, 1], 5000).into()),
            identity: None,
            trace_id: Some([0xab; 16]),
            request_bytes: 12,
            response_bytes: 12,
        };
        let json: serde_json::Value = serde_json::from_str(&line.to_json()).unwrap();
        assert_eq!(json["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["attempts"], 2);
        assert_eq!(json["peer"], "127.0.0.1:5000");
        assert_eq!(json["identity"], serde_json::Value::Null);
        assert_eq!(json["method"], "/dlb.v1.Operations/Reverse");
        assert_eq!(json["instance"], "A");
        assert_eq!(json["trace_id"], "ab".repeat(16));
        assert!(!line.to_json().contains('\n'));
        // Whatever a string holds, the line stays one JSON object on one line.
        let strange = Line {
            method: Some(Text::new("/a\"b\\c\n\u{1}é")),
            ..line
        };
        let parsed: serde_json::Value = serde_json::from_str(&strange.to_json()).unwrap();
        assert_eq!(parsed["method"], "/a\"b\\c\n\u{1}é");
    }

    #[test]
    fn text_of_any_length_is_kept_whole() {
        for text in [
            "",
            "A",
            &"x".repeat(INLINE),
            &"y".repeat(INLINE + 1),
            "/é/ü",
        ] {
            assert_eq!(Text::new(text).as_str(), text);
        }
        assert!(matches!(Text::new(&"z".repeat(300)), Text::Heap(_)));
    }

    #[test]
    fn times_are_written_from_the_cached_second_exactly() {
        let mut second = Second::default();
        let mut out = String::new();
        for ms in [
            0,
            999,
            1_000,
            1_795_745_425_065,
            1_795_745_425_999,
            1_795_745_426_000,
        ] {
            out.clear();
            second.write(ms, &mut out);
            assert_eq!(out, crate::events::time::rfc3339_ms(ms), "{ms}");
        }
    }
}
