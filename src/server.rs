//! What every dlb gRPC server shares: reflection, the shutdown signal, and ending server
//! streams on shutdown.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic_reflection::server::Error as ReflectionError;

/// Server reflection for every dlb proto and grpc.health.v1, in both protocol versions: v1, and
/// v1alpha for grpcurl 1.8 and other older clients.
///
/// # Errors
///
/// When a descriptor set does not decode (a build problem).
pub fn reflection() -> Result<
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
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
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
