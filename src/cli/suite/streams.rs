//! The streaming scenarios of `dlb bench-suite`: a server stream and a bidirectional stream of
//! 64 KiB messages, straight to a streaming instance and through a `dlb-gateway` in front of it,
//! interleaved, in messages/s and MB/s, with the gateway's peak RSS.
//!
//! The instance is written here on tonic's server (raw bytes, no protobuf: what the gateway
//! must relay whatever the codec) and runs in the suite's process; the load is h2 directly:
//! each path is measured by the same client against the same instance, so the ratio is the
//! gateway's cost.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;

/// The benchmark's service.
const SERVICE: &str = "dlb.bench.v1.Streams";

/// Bytes of each message.
pub const MESSAGE_BYTES: usize = 64 * 1024;

/// Streams at once per run.
pub const STREAMS: usize = 4;

/// Messages a bidi stream has sent and not yet seen echoed.
const BIDI_WINDOW: u64 = 8;

/// A gRPC frame of `len` bytes of payload.
fn message(len: usize) -> Bytes {
    let mut framed = Vec::with_capacity(len + 5);
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    framed.resize(len + 5, 0x5a);
    Bytes::from(framed)
}

fn ok_trailers() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers
}

/// A server stream's answer: the same message `left` more times, then OK.
struct Repeat {
    message: Bytes,
    left: u64,
    done: bool,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left > 0 {
            self.left -= 1;
            return Poll::Ready(Some(Ok(Frame::data(self.message.clone()))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(ok_trailers()))))
    }
}

/// A bidi stream's answer: the request's bytes back as they come, then OK.
struct Echo {
    request: Body,
    done: bool,
}

impl http_body::Body for Echo {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.request).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::new())))),
            },
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(ok_trailers()))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn grpc_response(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Serves `ServerStream` (the request: a count, 8 bytes big-endian; the answer: that many
/// messages) and `Bidi` (every message echoed).
async fn serve_call(request: http::Request<Body>) -> Result<http::Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let Some(method) = path
        .strip_prefix("/")
        .and_then(|p| p.strip_prefix(SERVICE))
        .and_then(|p| p.strip_prefix("/"))
        .filter(|m| matches!(*m, "Bidi" | "ServerStream"))
    else {
        return Ok(tonic::Status::unimplemented(format!("no method {path}")).into_http());
    };
    if method == "Bidi" {
        return Ok(grpc_response(Body::new(Echo {
            request: request.into_body(),
            done: false,
        })));
    }
    let bytes = collect(request.into_body()).await;
    let count = bytes
        .get(5..13)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes);
    Ok(grpc_response(Body::new(Repeat {
        message: message(MESSAGE_BYTES),
        left: count,
        done: false,
    })))
}

/// A (small) request body, whole.
async fn collect(mut body: Body) -> Vec<u8> {
    use http_body::Body as _;
    let mut out = Vec::new();
    while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
        if out.len() > 1024 {
            break;
        }
    }
    out
}

/// Starts the streaming instance on 127.0.0.1 (with health, so a gateway takes it in); it
/// serves until `stop`.
pub async fn start_instance(stop: CancellationToken) -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("stream instance: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("stream instance: {e}"))?
        .to_string();
    let tls = dlb::tls::TlsArgs::default();
    let scaffold = dlb::server::Scaffold::new(dlb::server::Spec {
        services: &[SERVICE],
        tls: &tls,
        health_listen: None,
        connections: dlb::server::Incoming::default(),
        served_by: None,
        max_concurrent_streams: None,
        health_names: &[],
        reflection: false,
        authz: dlb::authz::Guard::default(),
        access_log: dlb::server::access_log::AccessLog::default(),
        exporting: None,
        traced: dlb::trace::Traced::ALL,
        relayed: None,
    })
    .await
    .map_err(|e| format!("stream instance: {e}"))?;
    let mut serving = scaffold
        .serve(listener, |routes| {
            dlb::server::with_fallback(routes, tower::service_fn(serve_call))
        })
        .map_err(|e| format!("stream instance: {e}"))?;
    tokio::spawn(async move {
        let _ = serving.until(stop.cancelled()).await;
        let _ = serving.close().await;
    });
    Ok(addr)
}

/// A streaming scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// The instance sends as fast as the caller reads.
    ServerStream,
    /// The caller sends, the instance echoes, at most [`BIDI_WINDOW`] messages outstanding.
    Bidi,
}

impl Kind {
    /// The scenario's key.
    pub fn key(self) -> &'static str {
        match self {
            Kind::ServerStream => "stream_server",
            Kind::Bidi => "stream_bidi",
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measured {
    /// Messages received per second.
    pub messages_per_sec: f64,
    /// Megabytes (10^6) received per second.
    pub mb_per_sec: f64,
}

/// Runs `kind` against `addr` with [`STREAMS`] streams on one HTTP/2 connection for
/// `duration` after `warmup`.
pub async fn measure(
    addr: &str,
    kind: Kind,
    warmup: Duration,
    duration: Duration,
) -> Result<Measured, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(dlb::dial::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(dlb::dial::CONNECTION_WINDOW_BYTES)
        .max_frame_size(dlb::dial::MAX_FRAME_BYTES)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 with {addr}: {e}"))?;
    let driver = tokio::spawn(connection);
    let start = Instant::now();
    let measured_from = start + warmup;
    let until = measured_from + duration;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let client = client.clone();
        let authority = addr.to_owned();
        streams.push(tokio::spawn(async move {
            one_stream(client, &authority, kind, measured_from, until).await
        }));
    }
    let mut bytes = 0u64;
    for stream in streams {
        bytes += stream.await.map_err(|e| e.to_string())??;
    }
    driver.abort();
    let secs = duration.as_secs_f64();
    let frame = (MESSAGE_BYTES + 5) as f64;
    Ok(Measured {
        messages_per_sec: bytes as f64 / frame / secs,
        mb_per_sec: bytes as f64 / 1e6 / secs,
    })
}

/// One stream until `until`: the bytes received between `from` and `until`.
async fn one_stream(
    client: h2::client::SendRequest<Bytes>,
    authority: &str,
    kind: Kind,
    from: Instant,
    until: Instant,
) -> Result<u64, String> {
    let method = match kind {
        Kind::ServerStream => "ServerStream",
        Kind::Bidi => "Bidi",
    };
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{authority}/{SERVICE}/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let (response, mut send) = client
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    let one = message(MESSAGE_BYTES);
    if kind == Kind::ServerStream {
        let mut ask = vec![0u8, 0, 0, 0, 8];
        ask.extend_from_slice(&u64::MAX.to_be_bytes());
        send.send_data(Bytes::from(ask), true)
            .map_err(|e| e.to_string())?;
    }
    let mut body = response.await.map_err(|e| e.to_string())?.into_body();
    let frame = (MESSAGE_BYTES + 5) as u64;
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut counted = 0u64;
    loop {
        if Instant::now() >= until {
            // Dropping the stream cancels it at the instance (RST_STREAM).
            return Ok(counted);
        }
        if kind == Kind::Bidi && sent < received / frame + BIDI_WINDOW {
            send.reserve_capacity(one.len());
            let mut left = one.clone();
            while !left.is_empty() {
                let remaining = until.saturating_duration_since(Instant::now());
                let Ok(granted) = tokio::time::timeout(
                    remaining,
                    std::future::poll_fn(|cx| send.poll_capacity(cx)),
                )
                .await
                else {
                    return Ok(counted);
                };
                let granted = granted
                    .ok_or("the stream closed")?
                    .map_err(|e| e.to_string())?;
                let part = left.split_to(granted.min(left.len()));
                send.send_data(part, false).map_err(|e| e.to_string())?;
            }
            sent += 1;
            continue;
        }
        let remaining = until.saturating_duration_since(Instant::now());
        let data = match tokio::time::timeout(remaining, body.data()).await {
            Err(_) => return Ok(counted),
            Ok(None) => return Err("the answer ended early".into()),
            Ok(Some(data)) => data.map_err(|e| e.to_string())?,
        };
        let _ = body.flow_control().release_capacity(data.len());
        received += data.len() as u64;
        if Instant::now() >= from {
            counted += data.len() as u64;
        }
    }
}
