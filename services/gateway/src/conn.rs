//! One HTTP/2 connection to an instance for relayed calls, on the h2 crate directly: a call
//! hands its frames to the connection from its own task (no buffer task in between, as a
//! tonic `Channel` has), and the connection's driver task only writes and reads. It connects
//! on first use and again after it closed. It sends no HTTP/2 PINGs of its own: C-core and
//! grpc-go servers allow one PING per 5 minutes on a connection without data by default and
//! close a connection pinged more often (GOAWAY ENHANCE_YOUR_CALM "too_many_pings"). A peer
//! that stops answering is found by the health monitor's probes instead (see `health`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::codegen::http;
use tower::BoxError;

use crate::failure::{Failure, classify};
use crate::lock;

/// How connections are made and kept.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// Bound on TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
    /// TLS towards the instance, if on.
    pub tls: Option<dlb::tls::ClientTls>,
    /// The gateway's runtimes (see [`crate::runtimes`]): each has a connection of its own.
    pub runtimes: usize,
}

/// A lazily connecting HTTP/2 connection to one address, one per runtime of the gateway (each
/// runtime's calls go over its own, whose driver task runs there too). Cheap to clone; the
/// connections close once every clone is gone and their last calls have finished.
#[derive(Debug, Clone)]
pub struct Conn {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// HOST:PORT, for TCP.
    addr: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    settings: ConnSettings,
    /// Each runtime's connection.
    slots: Box<[Slot]>,
    /// The last failed attempt to connect: when it ended, and why. Calls that were waiting
    /// for that attempt fail with it instead of each trying again in turn.
    failed: Mutex<Option<(Instant, String)>>,
}

/// One runtime's connection.
#[derive(Debug, Default)]
struct Slot {
    /// The live connection, if any.
    live: Mutex<Option<Live>>,
    /// Held while connecting: one handshake at a time.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
struct Live {
    sender: SendRequest<Bytes>,
    /// Set by the driver task when the connection has ended, or by a call the connection
    /// refused to open a stream for.
    closed: Arc<AtomicBool>,
    /// Set once the instance answered a call on it.
    answered: Arc<AtomicBool>,
}

/// A stream opened for a call (see [`Conn::open`]): the request body goes on `stream`, the
/// answer comes from `response` (or from [`Opened::answer`], which also notes the connection
/// answered).
#[derive(Debug)]
pub struct Opened {
    conn: Conn,
    live: Live,
    /// The answer's headers, once they come.
    pub response: h2::client::ResponseFuture,
    /// The request body's way out.
    pub stream: h2::SendStream<Bytes>,
}

impl Opened {
    /// Waits for the answer's headers.
    ///
    /// # Errors
    ///
    /// The stream or the connection failed before the headers came.
    pub async fn answer(self) -> Result<Answer, BoxError> {
        Self::answered(&self.conn, &self.live, self.response.await)
    }

    /// Splits it: the connection's handle, the answer to come and the request's way out.
    pub fn into_parts(
        self,
    ) -> (
        OpenedConn,
        h2::client::ResponseFuture,
        h2::SendStream<Bytes>,
    ) {
        (
            OpenedConn {
                conn: self.conn,
                live: self.live,
            },
            self.response,
            self.stream,
        )
    }

    fn answered(
        conn: &Conn,
        live: &Live,
        result: Result<http::Response<h2::RecvStream>, h2::Error>,
    ) -> Result<Answer, BoxError> {
        match result {
            Ok(answer) => {
                // Written once, not by every call (the flag is shared by all threads' calls).
                if !live.answered.load(Ordering::Relaxed) {
                    live.answered.store(true, Ordering::Relaxed);
                }
                Ok(answer.map(AnswerBody::Stream))
            }
            Err(error) if classify(&error) == Failure::WentAway => Err(conn.went_away(live, error)),
            Err(error) => Err(error.into()),
        }
    }
}

/// The connection a stream was opened on, kept to report its answer (see [`Opened::into_parts`]).
#[derive(Debug)]
pub struct OpenedConn {
    conn: Conn,
    live: Live,
}

impl OpenedConn {
    /// The answer's headers as [`Opened::answer`] reports them.
    ///
    /// # Errors
    ///
    /// As [`Opened::answer`].
    pub fn headers(
        &self,
        result: Result<http::Response<h2::RecvStream>, h2::Error>,
    ) -> Result<Answer, BoxError> {
        Opened::answered(&self.conn, &self.live, result)
    }
}

/// Sends `data` on `stream` as the peer's HTTP/2 window allows, so a slow reader slows the
/// sender instead of filling the gateway's memory. Cancel-safe: `data` keeps what is not sent
/// yet.
///
/// # Errors
///
/// The stream was reset or the connection failed.
pub async fn send_flow(
    stream: &mut h2::SendStream<Bytes>,
    data: &mut Bytes,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            // The stream can send no more (reset, or ended): say why.
            None => {
                return Err(std::future::poll_fn(|cx| stream.poll_reset(cx))
                    .await
                    .map_or_else(|e| e, h2::Error::from));
            }
        };
        if granted == 0 {
            continue;
        }
        let part = data.split_to(granted.min(data.len()));
        stream.send_data(part, false)?;
    }
    Ok(())
}

/// A call's answer: headers now, body and trailers from [`AnswerBody`].
pub type Answer = http::Response<AnswerBody>;

/// An instance's answer body as the relay reads it.
#[derive(Debug)]
pub enum AnswerBody {
    /// From a real instance: h2's stream, read with flow control.
    Stream(h2::RecvStream),
    /// Given whole: what unit tests of the relay answer with, in place of an instance (boxed,
    /// so that every real answer, moved through the balancer's futures, stays small).
    Given(Box<GivenAnswer>),
    /// No answer yet: a streaming call's hold on the endpoint picked, for the relay to open
    /// the stream itself (see [`crate::endpoint::Outgoing::Lease`]).
    Lease(Box<crate::endpoint::Lease>),
}

/// An answer body given whole (see [`AnswerBody::Given`]).
#[derive(Debug, Default)]
pub struct GivenAnswer {
    /// The DATA frames, in order; an error ends the body there, as a reset stream does.
    pub data: std::collections::VecDeque<Result<Bytes, String>>,
    /// The trailers.
    pub trailers: Option<http::HeaderMap>,
}

impl AnswerBody {
    /// The next DATA frame; `None` at the end of the data.
    ///
    /// # Errors
    ///
    /// The stream failed (reset, connection lost).
    pub async fn data(&mut self) -> Option<Result<Bytes, BoxError>> {
        match self {
            Self::Stream(stream) => {
                let data = stream.data().await?;
                if let Ok(data) = &data {
                    // Read, so the instance may send more (HTTP/2 flow control).
                    let _ = stream.flow_control().release_capacity(data.len());
                }
                Some(data.map_err(BoxError::from))
            }
            Self::Given(given) => given.data.pop_front().map(|d| d.map_err(BoxError::from)),
            Self::Lease(_) => None,
        }
    }

    /// The trailers, once the data is read.
    ///
    /// # Errors
    ///
    /// The stream failed (reset, connection lost).
    pub async fn trailers(&mut self) -> Result<Option<http::HeaderMap>, BoxError> {
        match self {
            Self::Stream(stream) => stream.trailers().await.map_err(BoxError::from),
            Self::Given(given) => Ok(given.trailers.take()),
            Self::Lease(_) => Ok(None),
        }
    }
}

impl Conn {
    /// A connection to `addr` (HOST:PORT), opened on first use.
    ///
    /// # Errors
    ///
    /// A message when `addr` is not a valid HOST:PORT.
    pub fn new(addr: &str, settings: ConnSettings) -> Result<Self, String> {
        let authority: http::uri::Authority = addr
            .parse()
            .map_err(|e| format!("invalid address {addr:?}: {e}"))?;
        let scheme = if settings.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        Ok(Self {
            shared: Arc::new(Shared {
                addr: addr.to_owned(),
                scheme,
                authority,
                slots: (0..settings.runtimes.max(1))
                    .map(|_| Slot::default())
                    .collect(),
                settings,
                failed: Mutex::new(None),
            }),
        })
    }

    /// Sends one unary call: `head`'s path and headers, `body` (in pieces) as the whole
    /// request body.
    ///
    /// # Errors
    ///
    /// Connection failures (refused, reset, closed, protocol errors): the instance never saw
    /// the call, or never answered it.
    pub async fn send(
        &self,
        head: http::Request<()>,
        body: Vec<Bytes>,
    ) -> Result<Answer, BoxError> {
        self.send_on(crate::runtimes::current(), head, body).await
    }

    /// [`Conn::send`] over runtime `slot`'s connection.
    async fn send_on(
        &self,
        slot: usize,
        head: http::Request<()>,
        body: Vec<Bytes>,
    ) -> Result<Answer, BoxError> {
        let end_of_stream = body.is_empty();
        let mut opened = self.open_on(slot, head, end_of_stream).await?;
        let last = body.len().saturating_sub(1);
        for (i, chunk) in body.into_iter().enumerate() {
            if let Err(error) = opened.stream.send_data(chunk, i == last) {
                // The instance may have reset the stream meanwhile: that is the reason to
                // report (see `EndpointService`), not "inactive stream".
                return Err(match opened.response.await {
                    Err(reset) => reset.into(),
                    Ok(_) => error.into(),
                });
            }
        }
        opened.answer().await
    }

    /// Opens a stream for a call: `head`'s path and headers are sent; the body goes on the
    /// returned [`Opened`]'s `stream` (with HTTP/2 flow control: see [`send_flow`]).
    ///
    /// # Errors
    ///
    /// Connection failures: the instance never saw the call.
    pub async fn open(
        &self,
        head: http::Request<()>,
        end_of_stream: bool,
    ) -> Result<Opened, BoxError> {
        self.open_on(crate::runtimes::current(), head, end_of_stream)
            .await
    }

    /// [`Conn::open`] over runtime `slot`'s connection.
    async fn open_on(
        &self,
        slot: usize,
        head: http::Request<()>,
        end_of_stream: bool,
    ) -> Result<Opened, BoxError> {
        let (mut parts, ()) = head.into_parts();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.shared.scheme.clone());
        uri.authority = Some(self.shared.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = http::Uri::from_parts(uri)?;
        let mut reconnected = false;
        let (mut sender, live) = loop {
            let live = self.live(slot).await?;
            match live.sender.clone().ready().await {
                Ok(sender) => break (sender, live),
                Err(error) => {
                    // The connection takes no new streams (GOAWAY, closed): the next call
                    // opens another instead of failing on this one until its last stream is
                    // done.
                    live.closed.store(true, Ordering::Release);
                    // An instance closing the connection gracefully (recycling it, or
                    // draining) has seen nothing of this call: it goes on a new connection.
                    if classify(&error) == Failure::WentAway {
                        if !reconnected {
                            reconnected = true;
                            continue;
                        }
                        return Err(self.went_away(&live, error));
                    }
                    return Err(error.into());
                }
            }
        };
        match sender.send_request(http::Request::from_parts(parts, ()), end_of_stream) {
            Ok((response, stream)) => Ok(Opened {
                conn: self.clone(),
                live,
                response,
                stream,
            }),
            Err(error) => {
                live.closed.store(true, Ordering::Release);
                Err(error.into())
            }
        }
    }

    /// The error of a call left unprocessed by a graceful GOAWAY: no fault of the instance's
    /// when the connection answered calls before (it is recycled), [`ClosedUnused`] when it
    /// never did (an instance closing every connection at once takes no calls).
    fn went_away(&self, live: &Live, error: h2::Error) -> BoxError {
        if live.answered.load(Ordering::Relaxed) {
            error.into()
        } else {
            Box::new(ClosedUnused(format!(
                "{} closed a connection that had answered no call ({error})",
                self.shared.addr
            )))
        }
    }

    /// The live connection, connecting first when there is none.
    async fn live(&self, slot: usize) -> Result<Live, BoxError> {
        if let Some(live) = self.current(slot) {
            return Ok(live);
        }
        // Boxed: the handshakes' state is kilobytes, and every call's future would otherwise
        // carry (and move) room for it.
        Box::pin(self.reconnect(slot)).await
    }

    /// Connects, unless another call has meanwhile.
    async fn reconnect(&self, slot: usize) -> Result<Live, BoxError> {
        let waited_from = Instant::now();
        let _one_at_a_time = self.slot(slot).connecting.lock().await;
        if let Some(live) = self.current(slot) {
            return Ok(live);
        }
        if let Some((when, why)) = &*lock(&self.shared.failed)
            && *when >= waited_from
        {
            return Err(why.clone().into());
        }
        let timeout = self.shared.settings.connect_timeout;
        let connected = match tokio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(live)) => Ok(live),
            Ok(Err(error)) => Err(format!(
                "cannot connect to {}: {}",
                self.shared.addr,
                dlb::status::error_chain(error.as_ref())
            )),
            Err(_) => Err(format!(
                "connecting to {} timed out after {timeout:?}",
                self.shared.addr
            )),
        };
        match connected {
            Ok(live) => {
                *lock(&self.slot(slot).live) = Some(live.clone());
                Ok(live)
            }
            Err(why) => {
                *lock(&self.shared.failed) = Some((Instant::now(), why.clone()));
                Err(why.into())
            }
        }
    }

    /// Runtime `index`'s connection.
    fn slot(&self, index: usize) -> &Slot {
        let slots = &self.shared.slots;
        &slots[index % slots.len()]
    }

    fn current(&self, slot: usize) -> Option<Live> {
        let live = lock(&self.slot(slot).live);
        live.as_ref()
            .filter(|l| !l.closed.load(Ordering::Acquire))
            .cloned()
    }

    async fn connect(&self) -> Result<Live, BoxError> {
        let shared = &self.shared;
        let tcp = TcpStream::connect(&shared.addr).await?;
        tcp.set_nodelay(true)?;
        match &shared.settings.tls {
            None => self.handshake(tcp).await,
            Some(tls) => {
                let (connector, name) = tls.rustls_connector(shared.authority.host())?;
                let stream = connector.connect(name, tcp).await?;
                self.handshake(stream).await
            }
        }
    }

    async fn handshake<T>(&self, io: T) -> Result<Live, BoxError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(dlb::dial::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(dlb::dial::CONNECTION_WINDOW_BYTES)
            .max_frame_size(dlb::dial::MAX_FRAME_BYTES)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let addr = self.shared.addr.clone();
        let ended = Arc::clone(&closed);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "connection to instance ended");
            }
            ended.store(true, Ordering::Release);
        });
        Ok(Live {
            sender,
            closed,
            answered: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Sends `grpc.health.v1.Health/Check` on this connection; true when it answered SERVING
    /// or NOT_SERVING (it is alive) within `timeout`.
    /// With a connection per runtime, every live one is probed (a stall on any of them is
    /// the endpoint's), or, with none live, this runtime's (connecting).
    pub async fn probe(&self, timeout: Duration) -> bool {
        let mut slots: Vec<usize> = (0..self.shared.slots.len())
            .filter(|slot| self.current(*slot).is_some())
            .collect();
        if slots.is_empty() {
            slots.push(crate::runtimes::current());
        }
        let mut probes = tokio::task::JoinSet::new();
        for slot in slots {
            let conn = self.clone();
            probes.spawn(async move { conn.probe_on(slot, timeout).await });
        }
        let mut answered = true;
        while let Some(probe) = probes.join_next().await {
            answered &= probe.unwrap_or(false);
        }
        answered
    }

    async fn probe_on(&self, slot: usize, timeout: Duration) -> bool {
        let head = http::Request::builder()
            .method(http::Method::POST)
            .uri("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(());
        let Ok(head) = head else {
            return false;
        };
        // One empty HealthCheckRequest: no compression, length 0.
        let call = async {
            let answer = self
                .send_on(slot, head, vec![Bytes::from_static(&[0, 0, 0, 0, 0])])
                .await
                .ok()?;
            let mut body = answer.into_body();
            while let Some(data) = body.data().await {
                data.ok()?;
            }
            let trailers = body.trailers().await.ok()??;
            (trailers.get("grpc-status")? == "0").then_some(())
        };
        matches!(tokio::time::timeout(timeout, call).await, Ok(Some(())))
    }
}

/// A call left unprocessed by an instance closing (GOAWAY with NO_ERROR) a connection that had
/// answered no call. Counted against the instance like a reset stream (see
/// `EndpointService`): once now and then is a connection recycled early, every time is an
/// instance that takes no calls.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClosedUnused(pub String);
