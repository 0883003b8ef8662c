//! What every dlb gRPC server shares: the error that stops one, reflection, the shutdown
//! signal, ending server streams on shutdown, the accepted connections ([`Incoming`]), the
//! serve-and-drain sequence ([`Scaffold`]), and running one in-process for tests.

pub mod access_log;
mod incoming;
mod scaffold;

pub use incoming::{
    ACCEPT_BACKOFF, GentleClose, HANDSHAKE_BYTES, HANDSHAKE_TIMEOUT, Incoming, LINGER,
    open_file_limit, out_of_resources,
};
pub use scaffold::{
    CLOSE_TIMEOUT, Relay, RelayFuture, RelayLayer, RelayService, RelayServiceFuture, Relayed,
    Scaffold, Serving, Spec, with_fallback,
};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic_reflection::server::Error as ReflectionError;

/// Server reflection in both protocol versions (v1, and v1alpha for grpcurl 1.8 and other older
/// clients), listing `services` (the ones this server implements) and grpc.health.v1.Health.
/// Every dlb proto is described, so any message type resolves.
///
/// # Errors
///
/// When a descriptor set does not decode (a build problem).
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ReflectionError,
> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    let v1 = builder().build_v1()?;
    let v1alpha = builder().build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Resolves on the first SIGTERM or SIGINT. Only binaries' `main` should wait on it.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers, never resolve: the default action still ends the process.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Binds a service binary's `--listen` address; on failure prints one line naming the address,
/// the reason and how to choose another (`--listen` or `env`), and gives the exit code.
///
/// # Errors
///
/// [`std::process::ExitCode::FAILURE`] after printing why.
pub async fn bind_listen(
    program: &str,
    addr: std::net::SocketAddr,
    env: &str,
) -> Result<tokio::net::TcpListener, std::process::ExitCode> {
    tokio::net::TcpListener::bind(addr).await.map_err(|error| {
        eprintln!(
            "{program}: cannot listen on {addr}: {error} (choose another with --listen or {env})"
        );
        std::process::ExitCode::FAILURE
    })
}

/// `stream`, ending early once `cancel` fires: for server streams (health `Watch`,
/// `WatchInstances`) that would otherwise hold a draining server's connections open forever.
pub fn until_cancelled<S: Stream + Unpin>(
    stream: S,
    cancel: CancellationToken,
) -> impl Stream<Item = S::Item> {
    UntilCancelled {
        inner: stream,
        cancelled: Box::pin(cancel.cancelled_owned()),
    }
}

struct UntilCancelled<S> {
    inner: S,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S: Stream + Unpin> Stream for UntilCancelled<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Failures that stop a dlb server's `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Reflection could not be built from the descriptor sets.
    #[error("building the reflection service")]
    Reflection(#[from] ReflectionError),
    /// The instance registry refused this instance (its id is taken).
    #[error("{0}")]
    Registry(String),
    /// The server failed while serving.
    #[error("serving gRPC")]
    Serve(#[from] tonic::transport::Error),
    /// The server stopped without being asked to.
    #[error("the server stopped on its own")]
    Ended,
}

/// Starts a plaintext server on `addr` with nothing but `grpc.health.v1` (the same state as the
/// main server), for probes that cannot speak TLS (Kubernetes' gRPC probes): the operations
/// stay behind TLS. It stops when `stop` is cancelled.
///
/// # Errors
///
/// [`RunError::Config`] when `addr` cannot be bound.
pub async fn spawn_health_listener(
    addr: std::net::SocketAddr,
    health: &crate::health::HealthState,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RunError::Config(format!("--health-listen {addr}: cannot listen: {e}")))?;
    let service = health.service();
    Ok(tokio::spawn(async move {
        let incoming = Incoming::default().accept(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
    }))
}

/// A loud warning for a server bound beyond loopback without TLS: anyone who can reach the
/// address can call it directly, bypassing the gateway.
pub fn warn_if_exposed(program: &str, addr: std::net::SocketAddr, tls: &crate::tls::TlsArgs) {
    if tls.tls_cert.is_some() && tls.tls_ca.is_none() {
        eprintln!(
            "{program}: WARNING: TLS without --tls-ca: connections are encrypted, but any client may call;\n\
             give --tls-ca to require client certificates (mutual TLS)."
        );
    }
    if tls.tls_cert.is_some() || addr.ip().is_loopback() {
        return;
    }
    let what = match program {
        "dlb-compute" => "call it directly, bypassing the gateway,",
        "dlb-control" => "start, stop and kill instances,",
        _ => "call it,",
    };
    eprintln!(
        "\n{program}: WARNING: listening on {addr} WITHOUT TLS. Anyone who can reach this address can\n\
         {what} and read every request and response in transit.\n\
         Turn on mutual TLS (--tls-cert, --tls-key, --tls-ca; `dlb certs init DIR` makes them) or\n\
         listen on 127.0.0.1.\n"
    );
    tracing::warn!(%addr, "listening beyond loopback without TLS");
}
