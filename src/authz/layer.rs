//! The tower layer in front of every dlb server's services that applies its [`Guard`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::Guard;

/// Refuses, with PERMISSION_DENIED, calls by a client certificate its [`Guard`] does not
/// allow. A guard is on only under mutual TLS ([`super::guard`]); there a call whose
/// connection shows no client certificate is refused too, so that a change in how connections
/// are accepted cannot turn authorization off unnoticed.
#[derive(Debug, Clone, Default)]
pub struct AuthzLayer {
    guard: Guard,
}

impl AuthzLayer {
    pub fn new(guard: Guard) -> Self {
        Self { guard }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            guard: self.guard.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthzService<S> {
    inner: S,
    guard: Guard,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthzService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = AuthzFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if self.guard.is_on() {
            let certificates = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            if let Err(message) = self
                .guard
                .decide(request.uri().path(), certificates.as_ref())
            {
                return AuthzFuture::Denied {
                    response: Some(tonic::Status::permission_denied(message).into_http()),
                };
            }
        }
        AuthzFuture::Allowed {
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = AuthzProjection]
    #[derive(Debug)]
    pub enum AuthzFuture<F, R> {
        Allowed { #[pin] inner: F },
        Denied { response: Option<http::Response<R>> },
    }
}

impl<F, R, E> Future for AuthzFuture<F, R>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    R: Default,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthzProjection::Allowed { inner } => inner.poll(cx),
            AuthzProjection::Denied { response } => {
                Poll::Ready(Ok(response.take().unwrap_or_default()))
            }
        }
    }
}
