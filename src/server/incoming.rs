//! The accepted connections of every dlb server: closed gently, bounded in number, and
//! patient when the process runs out of descriptors.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;

/// How long a closed connection waits for its peer to close too (see [`Incoming`]).
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The accepted connections of a server, closed gently. When the server lets go of one, its
/// write side is shut down (a FIN after everything queued) and it is read until the peer
/// closes, for at most [`LINGER`], instead of being closed at once. Closing a socket with
/// unread data (a client's late WINDOW_UPDATE or PING) makes the kernel send a reset, and the
/// client then loses the end of the last response it had not read yet: the tail of a 2 MB
/// answer sent just before a drain ends. Await [`Incoming::closed`] after the server stops.
///
/// [`Incoming::limited`] also bounds the connections open at once (each holds a permit until
/// its socket is closed, linger included): at the bound the server stops accepting, and new
/// connections wait in the kernel's listen backlog, as HAProxy's `maxconn` makes them. A
/// connection that has not sent [`HANDSHAKE_BYTES`] within [`HANDSHAKE_TIMEOUT`] of being
/// accepted is closed, so that clients which connect and never speak cannot hold the places. And
/// when the process runs out of file descriptors (or the kernel of memory for sockets), it
/// waits [`ACCEPT_BACKOFF`] before accepting again, instead of retrying at once: the pending
/// connection keeps the listener readable, so an immediate retry fails the same way, in a loop
/// that takes a whole core.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    lingering: tokio_util::task::TaskTracker,
    /// Connections that may be open at once (none: no bound).
    limit: Option<(usize, std::sync::Arc<tokio::sync::Semaphore>)>,
    /// Connections open now, closing ones included.
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The handshake's time limit (none: [`HANDSHAKE_TIMEOUT`]).
    handshake_timeout: Option<std::time::Duration>,
}

/// How long an accepted connection has to send its first [`HANDSHAKE_BYTES`] before it is
/// closed, freeing its place under [`Incoming::limited`]'s bound.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What every client sends first, at least: the HTTP/2 connection preface (24 bytes) and the
/// SETTINGS frame that must follow it (9 bytes at least); a TLS hello is longer.
pub const HANDSHAKE_BYTES: usize = 33;

/// This process's limit on open files (its soft `RLIMIT_NOFILE`), when it has one.
pub fn open_file_limit() -> Option<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
        .filter(|soft| *soft != RLIM_INFINITY)
}

/// How long accepting pauses after the process or the kernel ran out of descriptors or memory.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

impl Incoming {
    /// At most `max` connections open at once (see [`Incoming`]).
    pub fn limited(max: usize) -> Self {
        Self {
            lingering: tokio_util::task::TaskTracker::new(),
            limit: Some((max, std::sync::Arc::new(tokio::sync::Semaphore::new(max)))),
            ..Self::default()
        }
    }

    /// Gives each connection `timeout` for its handshake instead of [`HANDSHAKE_TIMEOUT`].
    #[must_use]
    pub fn with_handshake_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.handshake_timeout = Some(timeout);
        self
    }

    /// Connections open now (accepted and not yet closed, closing ones included).
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `listener`'s connections (TCP_NODELAY on), each closed gently.
    pub fn accept(
        &self,
        listener: tokio::net::TcpListener,
    ) -> impl Stream<Item = std::io::Result<GentleClose>> + Send + 'static {
        Accepting {
            listener: tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true)),
            lingering: self.lingering.clone(),
            limit: self.limit.as_ref().map(|(max, permits)| {
                (
                    *max,
                    tokio_util::sync::PollSemaphore::new(std::sync::Arc::clone(permits)),
                )
            }),
            permit: None,
            full: false,
            warned: None,
            said_full: false,
            backoff: None,
            open: std::sync::Arc::clone(&self.open),
            handshake_timeout: self.handshake_timeout.unwrap_or(HANDSHAKE_TIMEOUT),
        }
    }

    /// Waits (at most [`LINGER`]) for connections being closed.
    pub async fn closed(&self) {
        self.lingering.close();
        let _ = tokio::time::timeout(LINGER, self.lingering.wait()).await;
    }
}

/// A connection accepted on one runtime, on its way to the runtime that serves it: out of the
/// first one's reactor, with its place under the bound.
#[derive(Debug)]
struct Moved {
    stream: std::net::TcpStream,
    place: Option<Place>,
}

impl Incoming {
    /// `listener`'s connections (as [`Incoming::accept`]: bounded, closed gently) spread in
    /// turn over `runtimes` servers, each on a runtime of its own: the returned future accepts
    /// (run it on the listener's runtime, until `stop`), and stream `i` gives runtime `i` its
    /// share, each connection registered with the reactor of the runtime that polls it. Taking
    /// turns spreads connections evenly, where `SO_REUSEPORT`'s hash may give one runtime
    /// most of a few connections.
    pub fn spread(
        &self,
        listener: tokio::net::TcpListener,
        runtimes: usize,
        stop: tokio_util::sync::CancellationToken,
    ) -> (
        impl Future<Output = ()> + Send + 'static,
        Vec<impl Stream<Item = std::io::Result<GentleClose>> + Send + 'static>,
    ) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..runtimes.max(1))
            .map(|_| tokio::sync::mpsc::unbounded_channel::<Moved>())
            .unzip();
        let accepted = self.accept(listener);
        let accepting = async move {
            let mut accepted = std::pin::pin!(accepted);
            let mut next = 0;
            loop {
                let connection = tokio::select! {
                    // Stopping first: no connection is handed to a runtime once its server
                    // may have stopped taking them.
                    biased;
                    () = stop.cancelled() => return,
                    connection = tokio_stream::StreamExt::next(&mut accepted) => connection,
                };
                let mut connection = match connection {
                    None => return,
                    Some(Ok(connection)) => connection,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "cannot accept a connection");
                        continue;
                    }
                };
                let (Some(stream), place) = (connection.stream.take(), connection.place.take())
                else {
                    continue;
                };
                let Ok(stream) = stream.into_std() else {
                    continue;
                };
                // A runtime that has stopped serving takes none: the next one does.
                let mut moved = Moved { stream, place };
                for _ in 0..senders.len() {
                    let sender = &senders[next % senders.len()];
                    next = next.wrapping_add(1);
                    match sender.send(moved) {
                        Ok(()) => break,
                        Err(returned) => moved = returned.0,
                    }
                }
            }
        };
        let lingering = self.lingering.clone();
        let handshake_timeout = self.handshake_timeout.unwrap_or(HANDSHAKE_TIMEOUT);
        let streams = receivers
            .into_iter()
            .map(|receiver| {
                let lingering = lingering.clone();
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnboundedReceiverStream::new(receiver),
                    move |moved| {
                        tokio::net::TcpStream::from_std(moved.stream).map(|stream| GentleClose {
                            stream: Some(stream),
                            lingering: lingering.clone(),
                            place: moved.place,
                            handshake: Some((
                                HANDSHAKE_BYTES,
                                Box::pin(tokio::time::sleep(handshake_timeout)),
                            )),
                        })
                    },
                )
            })
            .collect();
        (accepting, streams)
    }
}

/// The stream of [`Incoming::accept`].
struct Accepting {
    listener: tonic::transport::server::TcpIncoming,
    lingering: tokio_util::task::TaskTracker,
    limit: Option<(usize, tokio_util::sync::PollSemaphore)>,
    /// The permit the next connection takes.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// At the bound now.
    full: bool,
    /// When reaching the bound was last said (at most every [`LIMIT_WARNING_INTERVAL`]).
    warned: Option<std::time::Instant>,
    /// That it was reached has been said, and not yet that accepting goes on.
    said_full: bool,
    /// Accepting again after this.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    handshake_timeout: std::time::Duration,
}

/// How often reaching the connection bound is said at most.
const LIMIT_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepting failed for want of descriptors or memory: the connection waits in the backlog,
/// and accepting again at once fails the same way (wait [`ACCEPT_BACKOFF`]).
pub fn out_of_resources(error: &std::io::Error) -> bool {
    use nix::errno::Errno;
    error.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
            .iter()
            .any(|errno| *errno as i32 == code)
    })
}

impl Stream for Accepting {
    type Item = std::io::Result<GentleClose>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = this.backoff.as_mut() {
                std::task::ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            if let Some((max, permits)) = this.limit.as_mut()
                && this.permit.is_none()
            {
                match permits.poll_acquire(cx) {
                    Poll::Ready(Some(permit)) => {
                        this.permit = Some(permit);
                        this.full = false;
                        if this.said_full {
                            this.said_full = false;
                            tracing::info!(max = *max, "a connection closed: accepting again");
                        }
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {
                        let now = std::time::Instant::now();
                        if !this.full
                            && this
                                .warned
                                .is_none_or(|at| now.duration_since(at) >= LIMIT_WARNING_INTERVAL)
                        {
                            this.warned = Some(now);
                            this.said_full = true;
                            tracing::warn!(
                                max = *max,
                                "connection limit reached: new connections wait until one closes"
                            );
                        }
                        this.full = true;
                        return Poll::Pending;
                    }
                }
            }
            match std::task::ready!(Pin::new(&mut this.listener).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(stream)) => {
                    this.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(GentleClose {
                        stream: Some(stream),
                        lingering: this.lingering.clone(),
                        place: Some(Place {
                            _permit: this.permit.take(),
                            open: std::sync::Arc::clone(&this.open),
                        }),
                        handshake: Some((
                            HANDSHAKE_BYTES,
                            Box::pin(tokio::time::sleep(this.handshake_timeout)),
                        )),
                    })));
                }
                Some(Err(error)) if out_of_resources(&error) => {
                    tracing::warn!(
                        %error,
                        "cannot accept a connection; trying again in {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
            }
        }
    }
}

/// One accepted connection; see [`Incoming`].
#[derive(Debug)]
pub struct GentleClose {
    stream: Option<tokio::net::TcpStream>,
    lingering: tokio_util::task::TaskTracker,
    /// Its place under the bound of [`Incoming::limited`], given back once the socket closes.
    place: Option<Place>,
    /// Until the handshake's bytes have come: how many are still due, and by when (see
    /// [`HANDSHAKE_TIMEOUT`]).
    handshake: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
}

/// A connection's place among those open: its permit under the bound (if any) and its count,
/// both given back when the socket is closed.
#[derive(Debug)]
struct Place {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl GentleClose {
    /// The socket (only `drop` takes it away).
    fn stream(self: Pin<&mut Self>) -> std::io::Result<Pin<&mut tokio::net::TcpStream>> {
        self.get_mut()
            .stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl tokio::io::AsyncRead for GentleClose {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::NotConnected)));
        };
        let before = buf.filled().len();
        let polled = Pin::new(stream).poll_read(cx, buf);
        if let Some((due, deadline)) = this.handshake.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) => {
                    *due = due.saturating_sub(buf.filled().len() - before);
                    if *due == 0 {
                        this.handshake = None;
                    }
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client did not complete its handshake in time",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for GentleClose {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.stream() {
            Ok(stream) => stream.poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.stream() {
            Ok(stream) => stream.poll_write_vectored(cx, bufs),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(stream) => stream.poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(stream) => stream.poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl tonic::transport::server::Connected for GentleClose {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.stream.as_ref().and_then(|s| s.local_addr().ok()),
            remote_addr: self.stream.as_ref().and_then(|s| s.peer_addr().ok()),
        }
    }
}

impl Drop for GentleClose {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let place = self.place.take();
        self.lingering.spawn(async move {
            let _place = place;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::{GentleClose, HANDSHAKE_BYTES, Incoming};

    /// Serves like hyper would: reads a handshake from each accepted connection, then answers
    /// "ok".
    async fn serve(incoming: Incoming, listener: tokio::net::TcpListener) {
        let mut accepted = std::pin::pin!(incoming.accept(listener));
        while let Some(connection) = accepted.next().await {
            let mut connection = connection.unwrap();
            tokio::spawn(async move {
                let mut handshake = [0u8; HANDSHAKE_BYTES];
                if connection.read_exact(&mut handshake).await.is_ok() {
                    let _ = connection.write_all(b"ok").await;
                }
            });
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_before_its_handshake_is_closed_and_frees_its_place() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = Incoming::limited(1).with_handshake_timeout(Duration::from_millis(300));
        let server = tokio::spawn(serve(incoming.clone(), listener));

        // The one place goes to a client that sends one byte and stops; the next waits for it.
        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"P").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(incoming.open(), 1);
        let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
        next.write_all(&[b'x'; HANDSHAKE_BYTES]).await.unwrap();

        // The stalled one is closed (end of stream, not a reset)...
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut rest))
            .await
            .expect("the stalled connection was closed");
        assert_eq!(read.unwrap(), 0);
        // ...and once it has closed its side too, the waiting one is served.
        drop(stalled);
        let mut answer = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), next.read_exact(&mut answer))
            .await
            .expect("the waiting connection was served")
            .unwrap();
        assert_eq!(&answer, b"ok");
        server.abort();
    }

    #[test]
    fn spread_hands_connections_to_each_runtime_in_turn_and_they_are_served_there() {
        // Three runtimes, each on a thread of its own, as the gateway runs them: the first
        // accepts, and each serves (echoes a byte back) what it is handed, noting its thread.
        let accepting = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let others: Vec<tokio::runtime::Runtime> = (0..2)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
            })
            .collect();
        let incoming = Incoming::limited(100);
        let stop = tokio_util::sync::CancellationToken::new();
        let (listener, addr) = accepting.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            (listener, addr)
        });
        let (accept, streams) =
            accepting.block_on(async { incoming.spread(listener, 3, stop.clone()) });
        let (served_tx, served_rx) = std::sync::mpsc::channel();
        let serve = |streams: std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = std::io::Result<GentleClose>> + Send>,
        >,
                     served: std::sync::mpsc::Sender<(usize, std::thread::ThreadId)>,
                     index: usize| async move {
            let mut streams = streams;
            while let Some(Ok(mut connection)) = tokio_stream::StreamExt::next(&mut streams).await {
                let served = served.clone();
                tokio::spawn(async move {
                    let mut byte = [0u8; HANDSHAKE_BYTES];
                    connection.read_exact(&mut byte).await.unwrap();
                    served.send((index, std::thread::current().id())).unwrap();
                    connection.write_all(b"ok").await.unwrap();
                    let _ = connection.read(&mut byte).await;
                });
            }
        };
        let mut streams: Vec<_> = streams
            .into_iter()
            .map(|s| Box::pin(s) as std::pin::Pin<Box<dyn tokio_stream::Stream<Item = _> + Send>>)
            .collect();
        let own = streams.remove(0);
        let mut threads = Vec::new();
        for (index, (runtime, stream)) in others.into_iter().zip(streams).enumerate() {
            let served = served_tx.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let id = std::thread::current().id();
                runtime.block_on(async move {
                    tokio::spawn(serve(stream, served, index + 1));
                    stop.cancelled().await;
                });
                id
            }));
        }
        let main = std::thread::current().id();
        accepting.block_on(async {
            tokio::spawn(accept);
            tokio::spawn(serve(own, served_tx, 0));
            let mut clients = Vec::new();
            for _ in 0..6 {
                let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
                client.write_all(&[b'x'; HANDSHAKE_BYTES]).await.unwrap();
                let mut answer = [0u8; 2];
                tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut answer))
                    .await
                    .expect("served")
                    .unwrap();
                assert_eq!(&answer, b"ok");
                clients.push(client);
            }
            assert_eq!(incoming.open(), 6);
            stop.cancel();
        });
        let ids: Vec<std::thread::ThreadId> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        let served: Vec<(usize, std::thread::ThreadId)> = served_rx.try_iter().collect();
        // Two each, in turn, and each on its runtime's own thread.
        let order: Vec<usize> = served.iter().map(|(index, _)| *index).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        for (index, thread) in &served {
            let want = if *index == 0 { main } else { ids[*index - 1] };
            assert_eq!(*thread, want, "runtime {index} served on another thread");
        }
    }
}
