//! One operation against a gateway or a compute instance, with its result, the instance that
//! served it and the latency (what `dlb call` and the dashboard's form send), and how a failed
//! call's status reads to the person who made it.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::proto::v1::{
    Certainty, FibonacciRequest, IsPalindromeRequest, IsPrimeRequest, ReverseRequest,
    WordCountRequest, operations_client::OperationsClient,
};
use crate::status::code_name;

/// One of the five operations with its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `IsPrime`.
    Prime {
        /// Decimal number, validated by the server.
        number: String,
    },
    /// `IsPalindrome`.
    Palindrome {
        /// The text.
        text: String,
        /// Ignore case, whitespace and punctuation.
        normalize: bool,
    },
    /// `Reverse`.
    Reverse {
        /// The text.
        text: String,
    },
    /// `Fibonacci`.
    Fibonacci {
        /// Which Fibonacci number.
        n: u64,
    },
    /// `WordCount`.
    WordCount {
        /// The text.
        text: String,
        /// How many of the most frequent words to return.
        top: u32,
    },
}

impl Op {
    /// The gRPC method of the operation (`IsPrime`).
    pub fn method(&self) -> &'static str {
        match self {
            Op::Prime { .. } => "IsPrime",
            Op::Palindrome { .. } => "IsPalindrome",
            Op::Reverse { .. } => "Reverse",
            Op::Fibonacci { .. } => "Fibonacci",
            Op::WordCount { .. } => "WordCount",
        }
    }

    /// The CLI name of the operation.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Prime { .. } => "prime",
            Op::Palindrome { .. } => "palindrome",
            Op::Reverse { .. } => "reverse",
            Op::Fibonacci { .. } => "fib",
            Op::WordCount { .. } => "wc",
        }
    }

    /// Builds an operation from a CLI name and a single input string.
    ///
    /// # Errors
    ///
    /// A message when the name is unknown or the input does not fit the operation.
    pub fn parse(name: &str, input: &str) -> Result<Self, String> {
        Ok(match name {
            "prime" | "is-prime" => Op::Prime {
                number: input.to_owned(),
            },
            "palindrome" | "is-palindrome" => Op::Palindrome {
                text: input.to_owned(),
                normalize: false,
            },
            "reverse" => Op::Reverse {
                text: input.to_owned(),
            },
            "fib" | "fibonacci" => Op::Fibonacci {
                n: input.parse().map_err(|_| {
                    format!(
                        "fib needs a whole number n between 0 and {}, got {input:?}",
                        u64::MAX
                    )
                })?,
            },
            "wc" | "word-count" | "wordcount" => Op::WordCount {
                text: input.to_owned(),
                top: 0,
            },
            other => {
                return Err(format!(
                    "unknown operation {other:?}: use prime, palindrome, reverse, fib or wc"
                ));
            }
        })
    }

    /// Sends the operation; returns the result as JSON and the response metadata. A call the
    /// server refused before processing it ([`refused_unprocessed`]) is sent again, up to
    /// [`REFUSED_STREAM_TRIES`] times in all, within `timeout`.
    ///
    /// # Errors
    ///
    /// The gRPC status of a failed call.
    pub async fn send(
        &self,
        client: &mut OperationsClient<Channel>,
        timeout: Option<Duration>,
    ) -> Result<(serde_json::Value, MetadataMap), Status> {
        self.send_in_trace(client, timeout, None).await
    }

    /// [`Op::send`] as part of a trace: `traceparent` names the caller's span.
    ///
    /// # Errors
    ///
    /// As [`Op::send`].
    pub async fn send_in_trace(
        &self,
        client: &mut OperationsClient<Channel>,
        timeout: Option<Duration>,
        traceparent: Option<&crate::trace::SpanContext>,
    ) -> Result<(serde_json::Value, MetadataMap), Status> {
        let start = Instant::now();
        let mut tries = 1;
        loop {
            let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
            match self.send_once(client, left, traceparent).await {
                // Sent again only with time left: a try with none would fail locally and hide
                // the refusal.
                Err(status)
                    if tries < REFUSED_STREAM_TRIES
                        && refused_unprocessed(&status)
                        && timeout.is_none_or(|t| start.elapsed() < t) =>
                {
                    tries += 1;
                }
                result => return result,
            }
        }
    }

    async fn send_once(
        &self,
        client: &mut OperationsClient<Channel>,
        timeout: Option<Duration>,
        trace: Option<&crate::trace::SpanContext>,
    ) -> Result<(serde_json::Value, MetadataMap), Status> {
        let traceparent =
            trace.and_then(|t| tonic::metadata::MetadataValue::try_from(t.to_traceparent()).ok());
        fn traced<T>(
            message: T,
            timeout: Option<Duration>,
            traceparent: Option<&tonic::metadata::AsciiMetadataValue>,
        ) -> Request<T> {
            let mut request = Request::new(message);
            if let Some(timeout) = timeout {
                request.set_timeout(timeout);
            }
            if let Some(value) = traceparent {
                request
                    .metadata_mut()
                    .insert(crate::trace::TRACEPARENT, value.clone());
            }
            request
        }
        Ok(match self.clone() {
            Op::Prime { number } => {
                let response = client
                    .is_prime(traced(
                        IsPrimeRequest { number },
                        timeout,
                        traceparent.as_ref(),
                    ))
                    .await?;
                let metadata = response.metadata().clone();
                let body = response.into_inner();
                let certainty = Certainty::try_from(body.certainty)
                    .unwrap_or(Certainty::Unspecified)
                    .as_str_name();
                (
                    json!({ "prime": body.prime, "certainty": certainty }),
                    metadata,
                )
            }
            Op::Palindrome { text, normalize } => {
                let response = client
                    .is_palindrome(traced(
                        IsPalindromeRequest { text, normalize },
                        timeout,
                        traceparent.as_ref(),
                    ))
                    .await?;
                let metadata = response.metadata().clone();
                (
                    json!({ "palindrome": response.into_inner().palindrome }),
                    metadata,
                )
            }
            Op::Reverse { text } => {
                let response = client
                    .reverse(traced(
                        ReverseRequest { text },
                        timeout,
                        traceparent.as_ref(),
                    ))
                    .await?;
                let metadata = response.metadata().clone();
                (json!({ "text": response.into_inner().text }), metadata)
            }
            Op::Fibonacci { n } => {
                let response = client
                    .fibonacci(traced(
                        FibonacciRequest { n },
                        timeout,
                        traceparent.as_ref(),
                    ))
                    .await?;
                let metadata = response.metadata().clone();
                let body = response.into_inner();
                (
                    json!({ "value": body.value, "digits": body.digits }),
                    metadata,
                )
            }
            Op::WordCount { text, top } => {
                let response = client
                    .word_count(traced(
                        WordCountRequest { text, top },
                        timeout,
                        traceparent.as_ref(),
                    ))
                    .await?;
                let metadata = response.metadata().clone();
                let body = response.into_inner();
                let top: Vec<_> = body
                    .top
                    .iter()
                    .map(|w| json!({ "word": w.word, "count": w.count }))
                    .collect();
                (
                    json!({
                        "words": body.words,
                        "lines": body.lines,
                        "characters": body.characters,
                        "bytes": body.bytes,
                        "top": top,
                    }),
                    metadata,
                )
            }
        })
    }
}

/// The outcome of one `dlb call`, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct CallOutcome {
    /// Operation name.
    pub op: &'static str,
    /// The result fields, or `null` on error.
    pub result: Option<serde_json::Value>,
    /// The error, if the call failed.
    pub error: Option<CallError>,
    /// The `x-served-by` metadata.
    pub served_by: Option<String>,
    /// The `x-attempts` metadata (through a gateway).
    pub attempts: Option<u64>,
    /// Wall time of the call, microseconds.
    pub latency_us: u64,
    /// The trace this call started (tracing on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A failed call, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct CallError {
    /// The gRPC code name, e.g. `INVALID_ARGUMENT`.
    pub code: &'static str,
    /// The server's message.
    pub message: String,
    /// The failure happened on this client's own connection (not answered by a server).
    #[serde(skip)]
    pub local: bool,
}

/// The code name of a failed call as the caller should see it: tonic reports its own
/// client-side deadline as CANCELLED, which is DEADLINE_EXCEEDED here.
pub fn failure_code(status: &Status) -> &'static str {
    if expired_locally(status) {
        "DEADLINE_EXCEEDED"
    } else if matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown)
        && below_grpc(status)
    {
        // tonic says CANCELLED or UNKNOWN when the connection failed under the call (a server
        // refusing this client's certificate during or after the handshake, a server gone):
        // nobody cancelled, and no server answered UNKNOWN; the server was unavailable, as
        // other gRPC clients report it.
        "UNAVAILABLE"
    } else {
        code_name(status.code())
    }
}

/// Did the call fail in the transport (the connection), rather than get a status answered?
fn below_grpc(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.downcast_ref::<tonic::transport::Error>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Did our own client give up because the call's deadline passed?
pub fn expired_locally(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Tries in all for a call refused with REFUSED_STREAM (gRPC clients in Go and Java retry
/// these transparently too).
pub const REFUSED_STREAM_TRIES: u32 = 3;

/// True when the server refused the call's HTTP/2 stream before processing any of it
/// (REFUSED_STREAM, RFC 9113 section 8.7), so sending it again is safe. A server past its
/// SETTINGS_MAX_CONCURRENT_STREAMS does that to streams a client opened before it learnt the
/// limit, or the moment it saw a slot free that the server had not freed yet.
pub fn refused_unprocessed(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            // A reset of this stream by the peer; not a GOAWAY, whose streams may have been
            // processed.
            return h2.is_reset()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = error.source();
    }
    false
}

/// The status message followed by its source chain, so "tcp connect error" says why.
pub fn status_message(status: &Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let text = error.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = error.source();
    }
    message
}

fn metadata_str(metadata: &MetadataMap, key: &str) -> Option<String> {
    metadata
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Runs `op` once and describes what happened.
pub async fn call(
    client: &mut OperationsClient<Channel>,
    op: &Op,
    timeout: Option<Duration>,
) -> CallOutcome {
    call_traced(client, op, timeout, &crate::trace::Tracer::default()).await
}

/// [`call`], starting a trace with a client span when `tracer` is on (the outcome then says
/// its trace id).
pub async fn call_traced(
    client: &mut OperationsClient<Channel>,
    op: &Op,
    timeout: Option<Duration>,
    tracer: &crate::trace::Tracer,
) -> CallOutcome {
    let mut span = tracer.is_on().then(|| {
        let path = format!("/dlb.v1.Operations/{}", op.method());
        let mut span = tracer.start(
            crate::trace::rpc_span_name(&path),
            crate::trace::Kind::Client,
            None,
            None,
        );
        crate::trace::set_rpc_attributes(&mut span, &path);
        span
    });
    let start = Instant::now();
    let result = op
        .send_in_trace(
            client,
            timeout,
            span.as_ref().map(crate::trace::Span::context),
        )
        .await;
    let mut outcome = outcome(op, result, start);
    if let (Some(error), Some(timeout)) = (&mut outcome.error, timeout)
        && error.local
        && error.code == "DEADLINE_EXCEEDED"
    {
        // This client's own timer fired before any answer (tonic says "Timeout expired").
        error.message = format!("no answer within {timeout:?}, this call's deadline");
    }
    if let Some(mut span) = span.take() {
        outcome.trace_id = Some(span.context().trace_id_hex());
        if let Some(served_by) = &outcome.served_by {
            span.set("dlb.instance", served_by.clone());
        }
        match &outcome.error {
            None => span.set_grpc_status(tonic::Code::Ok, ""),
            Some(error) => span.set_grpc_status(dlb_code(error.code), &error.message),
        }
    }
    outcome
}

/// The code of a code name `status::code_name` gave.
fn dlb_code(name: &str) -> tonic::Code {
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|code| crate::status::code_name(*code) == name)
        .unwrap_or(tonic::Code::Unknown)
}

fn outcome(
    op: &Op,
    result: Result<(serde_json::Value, MetadataMap), Status>,
    start: Instant,
) -> CallOutcome {
    let latency_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Ok((value, metadata)) => CallOutcome {
            op: op.name(),
            result: Some(value),
            error: None,
            served_by: metadata_str(&metadata, crate::metadata::SERVED_BY),
            attempts: metadata_str(&metadata, crate::metadata::ATTEMPTS)
                .and_then(|a| a.parse().ok()),
            latency_us,
            trace_id: None,
        },
        Err(status) => CallOutcome {
            op: op.name(),
            result: None,
            error: Some(CallError {
                code: failure_code(&status),
                message: status_message(&status),
                local: std::error::Error::source(&status).is_some(),
            }),
            served_by: metadata_str(status.metadata(), crate::metadata::SERVED_BY),
            attempts: metadata_str(status.metadata(), crate::metadata::ATTEMPTS)
                .and_then(|a| a.parse().ok()),
            latency_us,
            trace_id: None,
        },
    }
}

impl CallOutcome {
    /// The human-readable rendering: the result, then who served it and how fast.
    pub fn human(&self, op: &Op) -> String {
        let mut trailer = Vec::new();
        if let Some(served_by) = &self.served_by {
            trailer.push(format!("served by {served_by}"));
        }
        if let Some(attempts) = &self.attempts {
            trailer.push(format!("attempts {attempts}"));
        }
        trailer.push(format!("{:.3} ms", self.latency_us as f64 / 1000.0));
        if let Some(trace) = &self.trace_id {
            trailer.push(format!("trace {trace}"));
        }
        let trailer = trailer.join(", ");
        match (&self.error, &self.result) {
            // One line, so that a hint printed after it follows the error it explains.
            (Some(error), _) => format!("error: {}: {} ({trailer})", error.code, error.message),
            (None, Some(result)) => format!("{}\n{trailer}", render_result(op, result)),
            (None, None) => trailer,
        }
    }
}

/// `text` in double quotes as a reader sees it (emoji, accents and joiners as they are), with
/// only quotes, backslashes and control characters escaped, so that it stays on one line.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.extend(c.escape_debug()),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_result(op: &Op, result: &serde_json::Value) -> String {
    match op {
        Op::Prime { number } => {
            let prime = result["prime"].as_bool().unwrap_or(false);
            let certainty = result["certainty"].as_str().unwrap_or("").to_lowercase();
            let verdict = if prime { "prime" } else { "not prime" };
            format!("{number} is {verdict} ({certainty})")
        }
        Op::Palindrome { text, .. } => {
            let yes = result["palindrome"].as_bool().unwrap_or(false);
            format!(
                "{} is {}a palindrome",
                quoted(text),
                if yes { "" } else { "not " }
            )
        }
        Op::Reverse { .. } => result["text"].as_str().unwrap_or("").to_owned(),
        Op::Fibonacci { n } => {
            let digits = result["digits"].as_u64().unwrap_or(0);
            format!(
                "F({n}) = {} ({digits} digit{})",
                result["value"].as_str().unwrap_or(""),
                if digits == 1 { "" } else { "s" }
            )
        }
        Op::WordCount { .. } => {
            let mut s = format!(
                "words {}  lines {}  characters {}  bytes {}",
                result["words"], result["lines"], result["characters"], result["bytes"]
            );
            if let Some(top) = result["top"].as_array() {
                for entry in top {
                    s.push_str(&format!(
                        "\n  {:>8}  {}",
                        entry["count"],
                        entry["word"].as_str().unwrap_or("")
                    ));
                }
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_read_as_a_person_writes_them() {
        let family = "👨\u{200d}👩\u{200d}👧x👨\u{200d}👩\u{200d}👧";
        let palindrome = Op::Palindrome {
            text: family.to_owned(),
            normalize: false,
        };
        let said = render_result(&palindrome, &serde_json::json!({ "palindrome": true }));
        // The joiners stay joiners (one family emoji each side), not `\u{200d}`.
        assert_eq!(said, format!("\"{family}\" is a palindrome"));
        let odd = Op::Palindrome {
            text: "a\"b\\c\nd".to_owned(),
            normalize: false,
        };
        let said = render_result(&odd, &serde_json::json!({ "palindrome": false }));
        assert_eq!(said, r#""a\"b\\c\nd" is not a palindrome"#);

        let one = render_result(
            &Op::Fibonacci { n: 1 },
            &serde_json::json!({ "value": "1", "digits": 1 }),
        );
        assert_eq!(one, "F(1) = 1 (1 digit)");
        let many = render_result(
            &Op::Fibonacci { n: 94 },
            &serde_json::json!({ "value": "19740274219868223167", "digits": 20 }),
        );
        assert_eq!(many, "F(94) = 19740274219868223167 (20 digits)");
    }
}
