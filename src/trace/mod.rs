//! Distributed tracing: W3C Trace Context in and out, spans exported with OTLP over gRPC.
//!
//! Off unless an OTLP endpoint is given (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`):
//! then a [`Tracer`] is a `None` and every server passes a caller's `traceparent` on
//! untouched, as without tracing. On, a server's [`TraceLayer`] continues the caller's trace
//! (or starts one) with a span per call, and puts that span's context in the request's
//! `traceparent`, so whatever the server calls next (the gateway's attempts) becomes its child.
//! Which traces are recorded is the standard sampler's choice (`OTEL_TRACES_SAMPLER`, by
//! default parent-based always-on); an unrecorded span still gets ids and is propagated, so a
//! trace stays whole across services that sample alike.
//!
//! Ended spans wait in a bounded queue (full: dropped and counted, never blocking a call) that
//! a task exports in batches ([`export`]). Hand-written rather than the `opentelemetry` SDK
//! crates: dlb needs a span's ids, times, attributes and status and one exporter, which is this
//! module and a reduced OTLP proto (`proto/otlp/`), with no new dependency in every build.

mod export;
mod layer;
mod receiver;
mod settings;

pub use export::Exporting;
pub use layer::{TraceFuture, TraceLayer, TraceService, Traced};
pub use receiver::Receiver;
pub use settings::{Sampler, Settings, TraceArgs};

use std::borrow::Cow;
use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tonic::codegen::http::{HeaderMap, HeaderValue};

/// The generated OTLP trace export messages and service (`proto/otlp/trace_export.proto`).
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod proto {
    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
}

/// The W3C Trace Context header of a call's parent span.
pub const TRACEPARENT: &str = "traceparent";
/// Vendors' trace state, passed on as it came.
pub const TRACESTATE: &str = "tracestate";

/// [`TRACEPARENT`] named ahead: looked up and written on every call, and a name given as a
/// string is parsed each time.
pub const TRACEPARENT_NAME: tonic::codegen::http::HeaderName =
    tonic::codegen::http::HeaderName::from_static(TRACEPARENT);

/// A span's identity as it travels: trace id, span id and whether it is recorded (the
/// `sampled` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl SpanContext {
    /// Reads a `traceparent` value (`VERSION-TRACEID-SPANID-FLAGS`, lower-case hex). `None`
    /// when malformed, version `ff`, or an id all zeros (the W3C rules: the caller's trace is
    /// then restarted). Versions above `00` may add fields after the flags.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let bytes = value.as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let version = hex_byte(&bytes[0..2])?;
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if version > 0 && bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        let mut trace_id = [0; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&bytes[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(&bytes[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&bytes[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The context in a request's `traceparent`, if any and well formed.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        headers
            .get(&TRACEPARENT_NAME)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
    }

    /// The trace a request served is in: the server's own span for it when the server
    /// traces it ([`CallSpan`], put there by [`TraceLayer`]), else the caller's
    /// `traceparent`, untouched.
    pub fn of_request(
        headers: &HeaderMap,
        extensions: &tonic::codegen::http::Extensions,
    ) -> Option<Self> {
        extensions
            .get::<CallSpan>()
            .map(|span| span.0)
            .or_else(|| Self::from_headers(headers))
    }

    /// As a `traceparent` value (version 00).
    pub fn to_traceparent(&self) -> String {
        String::from_utf8_lossy(&self.traceparent_bytes()).into_owned()
    }

    /// The 55 bytes of its `traceparent` value, made on the stack.
    fn traceparent_bytes(&self) -> [u8; 55] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 55];
        out[0] = b'0';
        out[1] = b'0';
        let mut put = |at: usize, bytes: &[u8]| {
            for (i, b) in bytes.iter().enumerate() {
                out[at + 2 * i] = DIGITS[usize::from(b >> 4)];
                out[at + 2 * i + 1] = DIGITS[usize::from(b & 0xf)];
            }
        };
        put(3, &self.trace_id);
        put(36, &self.span_id);
        put(53, &[u8::from(self.sampled)]);
        out
    }

    /// As a `traceparent` header value. Marked sensitive so that HPACK never indexes it: a
    /// value new on every call would only push the headers that do repeat (`content-type`,
    /// `te`, the path) out of the connection's dynamic table.
    pub fn header_value(&self) -> HeaderValue {
        // Hex and dashes only: always a valid header value.
        let mut value = HeaderValue::from_bytes(&self.traceparent_bytes())
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }

    /// The trace id in lower-case hex, as logs and dashboards show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// The span a server made for a call it serves, in the call's request extensions: what the
/// server's own calls on its behalf continue (the gateway sends it, or an attempt's span
/// under it, to the instance as `traceparent`). The request's `traceparent` header stays
/// the caller's: a header map is not grown (nor its value copied) on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSpan(pub SpanContext);

/// `bytes` in lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// The value of each lower-case hex digit, 0xff for every other byte (W3C allows no upper
/// case).
const HEX: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Two lower-case hex digits.
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let (high, low) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
    (high < 16 && low < 16).then_some(high << 4 | low)
}

thread_local! {
    /// Each thread's id generator state, seeded from the OS through std's hasher keys.
    static RANDOM: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() | 1
}

/// A random 64-bit number (splitmix64 over a per-thread seed): ids must be unique and
/// unpredictable enough to sample on, not secret.
fn random_u64() -> u64 {
    RANDOM.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id = random_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&new_span_id());
    id
}

/// What a span stands for, as OTLP says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A call served.
    Server,
    /// A call made.
    Client,
    /// Work within a service.
    Internal,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Self::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Str(Cow::Owned(s))
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Self::Int(n)
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Self::Int(i64::from(n))
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

/// A recorded span once ended, as it waits for export.
#[derive(Debug, Clone)]
pub struct SpanData {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    pub trace_state: Option<String>,
    pub name: Cow<'static, str>,
    pub kind: Kind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)` when the span failed.
    pub error: Option<String>,
}

/// Makes spans, and hands the recorded ones to the exporter. Cheap to clone; the default is
/// off (no span is made, nothing costs).
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<export::Queue>>,
    sampler: Sampler,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("on", &self.is_on())
            .field("sampler", &self.sampler)
            .finish()
    }
}

impl Tracer {
    /// Whether spans are made at all.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// A span named `name`, child of `parent` (a remote caller's or one of ours) or the root
    /// of a new trace, recorded when the sampler says so. `trace_state` is the caller's
    /// `tracestate`, kept on the span. When off, a span that records nothing.
    pub fn start(
        &self,
        name: &str,
        kind: Kind,
        parent: Option<&SpanContext>,
        trace_state: Option<&str>,
    ) -> Span {
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        let sampled = self.is_on() && self.sampler.sample(parent, &trace_id);
        let context = SpanContext {
            trace_id,
            span_id: new_span_id(),
            sampled,
        };
        let record = match (&self.inner, sampled) {
            (Some(queue), true) => Some(Box::new(Recording {
                queue: Arc::clone(queue),
                data: SpanData {
                    context,
                    parent: parent.map(|p| p.span_id),
                    trace_state: trace_state.filter(|s| !s.is_empty()).map(str::to_owned),
                    // Copied only for a span that is recorded.
                    name: Cow::Owned(name.to_owned()),
                    kind,
                    start_unix_nanos: unix_nanos(),
                    end_unix_nanos: 0,
                    attributes: Vec::new(),
                    error: None,
                },
                start: Instant::now(),
            })),
            _ => None,
        };
        Span { context, record }
    }

    /// A tracer that records into `queue` (see [`Exporting`]).
    fn recording(queue: Arc<export::Queue>, sampler: Sampler) -> Self {
        Self {
            inner: Some(queue),
            sampler,
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One span: its context (to propagate), and, when recorded, what it says. Ends (and goes to
/// the exporter) when dropped or [`Span::end`]ed.
#[derive(Debug)]
pub struct Span {
    context: SpanContext,
    record: Option<Box<Recording>>,
}

#[derive(Debug)]
struct Recording {
    queue: Arc<export::Queue>,
    data: SpanData,
    start: Instant,
}

impl Span {
    /// Its context, for the `traceparent` of what it calls.
    pub fn context(&self) -> &SpanContext {
        &self.context
    }

    /// Whether attributes set on it are kept (it was sampled).
    pub fn is_recording(&self) -> bool {
        self.record.is_some()
    }

    /// Sets an attribute (kept only when recording; a second value for a key replaces the
    /// first).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(record) = &mut self.record {
            let value = value.into();
            let attributes = &mut record.data.attributes;
            match attributes.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => attributes.push((key, value)),
            }
        }
    }

    /// Keeps the caller's `tracestate` on it (when recording).
    pub fn set_trace_state(&mut self, state: &str) {
        if let Some(record) = &mut self.record
            && !state.is_empty()
        {
            record.data.trace_state = Some(state.to_owned());
        }
    }

    /// Marks it failed, with why.
    pub fn fail(&mut self, message: impl Into<String>) {
        if let Some(record) = &mut self.record {
            record.data.error = Some(message.into());
        }
    }

    /// Records a gRPC call's end as OpenTelemetry's RPC conventions say:
    /// `rpc.grpc.status_code`, and a failure when the code is one the span's side is to
    /// blame for or cannot ignore (a server: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
    /// INTERNAL, UNAVAILABLE, DATA_LOSS; a client: any code but OK).
    pub fn set_grpc_status(&mut self, code: tonic::Code, message: &str) {
        let Some(record) = &self.record else {
            return;
        };
        let failed = match record.data.kind {
            Kind::Server => matches!(
                code,
                tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unimplemented
                    | tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::DataLoss
            ),
            Kind::Client | Kind::Internal => code != tonic::Code::Ok,
        };
        self.set("rpc.grpc.status_code", i64::from(code as i32));
        if failed {
            let name = crate::status::code_name(code);
            self.fail(if message.is_empty() {
                name.to_owned()
            } else {
                format!("{name}: {message}")
            });
        }
    }

    /// Ends it now.
    pub fn end(self) {
        drop(self);
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            let elapsed = u64::try_from(record.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            record.data.end_unix_nanos = record.data.start_unix_nanos.saturating_add(elapsed);
            record.queue.push(record.data);
        }
    }
}

/// Sets the `rpc.*` attributes of a gRPC call's span from its path
/// (`/package.Service/Method`).
pub fn set_rpc_attributes(span: &mut Span, path: &str) {
    if !span.is_recording() {
        return;
    }
    span.set("rpc.system", "grpc");
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    span.set("rpc.service", service.to_owned());
    span.set("rpc.method", method.to_owned());
}

/// The span name OpenTelemetry's conventions give a gRPC call: its path without the first
/// `/` (`dlb.v1.Operations/Reverse`).
pub fn rpc_span_name(path: &str) -> &str {
    path.trim_start_matches('/')
}

#[cfg(test)]
mod tests;
