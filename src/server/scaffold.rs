//! The one serve-and-drain sequence of compute, gateway and control: each `run` describes its
//! server ([`Spec`]), adds its own services ([`Scaffold::serve`]) and says what "idle" means
//! for it ([`Serving::drain`]); the listener, TLS, health, reflection, the exact statuses, the
//! health-only port, the drain order and the close timeout are here, once.
//!
//! The drain order every server keeps: health says NOT_SERVING (gateways and probes stop
//! sending), the calls in flight end (bounded by the server's grace period), `Watch` streams
//! end, the server stops accepting and closes its connections (bounded by [`CLOSE_TIMEOUT`]),
//! then the connections linger until the clients have read the last bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::HeaderValue;
use tonic::service::Routes;
use tonic_health::pb::health_check_response::ServingStatus;

use super::access_log::{AccessLog, AccessLogLayer};
use super::{Incoming, RunError, reflection, spawn_health_listener};
use crate::authz::{AuthzLayer, Guard};
use crate::events::{EventLog, Writer};
use crate::health::HealthState;
use crate::status::StatusLayer;
use crate::tls::TlsArgs;
use crate::trace::{Exporting, TraceLayer, Traced};

/// How long a server may take to close its connections once drained. A bound, not a wait: it
/// ends as soon as the connections close. The last answers' bodies may still be on their way
/// (a 2 MB Fibonacci value takes many flow-control round trips on a loaded machine).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The layers in front of every dlb server's services: tracing (its span covers the whole
/// call, and the access log below reads the trace it puts in the request's extensions,
/// `trace::CallSpan`), the access log
/// (it sees every answer as sent), exact statuses, authorization, then the relay when the
/// server has one (the gateway: [`Relayed`]).
type Layers = tower::layer::util::Stack<
    RelayLayer,
    tower::layer::util::Stack<
        AuthzLayer,
        tower::layer::util::Stack<
            StatusLayer,
            tower::layer::util::Stack<
                AccessLogLayer,
                tower::layer::util::Stack<TraceLayer, tower::layer::util::Identity>,
            >,
        >,
    >,
>;

/// What a dlb server is, as far as the scaffold is concerned.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The gRPC services it implements, for health (each starts SERVING) and reflection.
    pub services: &'a [&'a str],
    /// `--tls-cert`, `--tls-key`, `--tls-ca`.
    pub tls: &'a TlsArgs,
    /// `--health-listen`: a plaintext port with nothing but health.
    pub health_listen: Option<SocketAddr>,
    /// The accepted connections (bounded or not).
    pub connections: Incoming,
    /// `x-served-by` on every answer (compute instances).
    pub served_by: Option<HeaderValue>,
    /// HTTP/2 streams a client may have open on one connection (none: tonic's default).
    pub max_concurrent_streams: Option<u32>,
    /// More names health answers for, each with a status of its own
    /// ([`HealthState::set_service`]), not listed by reflection: the gateway's routed services
    /// and pools.
    pub health_names: &'a [String],
    /// Serve reflection of `services` (v1 and v1alpha); false when the caller adds its own
    /// (the gateway's also answers for its instances).
    pub reflection: bool,
    /// Who may call what (under mutual TLS).
    pub authz: Guard,
    /// One line per call (`--access-log`; off by default).
    pub access_log: AccessLog,
    /// Span export (`--otlp-endpoint`; none: tracing off), flushed by [`Serving::finish`].
    pub exporting: Option<Exporting>,
    /// Which calls get a span.
    pub traced: Traced,
    /// Where the calls the server does not answer itself go, if anywhere (else they get
    /// UNIMPLEMENTED from the router).
    pub relayed: Option<Relayed>,
}

/// A server being set up: health and the health-only port exist, nothing is served yet.
#[derive(Debug)]
pub struct Scaffold {
    health: HealthState,
    services: Vec<String>,
    builder: tonic::transport::Server<Layers>,
    reflection: bool,
    connections: Incoming,
    stop: CancellationToken,
    health_listener: Option<JoinHandle<()>>,
    exporting: Option<Exporting>,
    /// More runtimes to serve on besides the current one (see [`Scaffold::spread_over`]).
    runtimes: Vec<tokio::runtime::Handle>,
}

impl Scaffold {
    /// Builds the server: TLS, the HTTP/2 windows, [`StatusLayer`], health with every service
    /// SERVING, and the health-only port when asked for (listening from now on).
    ///
    /// # Errors
    ///
    /// [`RunError::Config`] for unreadable TLS files or a health port that cannot be bound,
    /// [`RunError::Serve`] when tonic refuses the TLS configuration.
    pub async fn new(spec: Spec<'_>) -> Result<Self, RunError> {
        let layer = match spec.served_by {
            Some(id) => StatusLayer::serving_as(id),
            None => StatusLayer::default(),
        };
        let tracer = spec
            .exporting
            .as_ref()
            .map(Exporting::tracer)
            .unwrap_or_default();
        let mut builder = tonic::transport::Server::builder()
            .layer(TraceLayer::new(tracer, spec.traced))
            .layer(AccessLogLayer::new(spec.access_log))
            .layer(layer)
            .layer(AuthzLayer::new(spec.authz))
            .layer(RelayLayer(spec.relayed))
            .initial_stream_window_size(crate::dial::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(crate::dial::CONNECTION_WINDOW_BYTES)
            .max_frame_size(crate::dial::MAX_FRAME_BYTES)
            .max_concurrent_streams(spec.max_concurrent_streams);
        if let Some(tls) = crate::tls::for_server(spec.tls).map_err(RunError::Config)? {
            builder = builder.tls_config(tls)?;
        }
        let names: Vec<&str> = spec
            .services
            .iter()
            .copied()
            .chain(spec.health_names.iter().map(String::as_str))
            .collect();
        let health = HealthState::new(&names);
        let stop = CancellationToken::new();
        let health_listener = match spec.health_listen {
            Some(addr) => Some(spawn_health_listener(addr, &health, stop.clone()).await?),
            None => None,
        };
        Ok(Self {
            health,
            services: spec.services.iter().map(|s| (*s).to_owned()).collect(),
            builder,
            reflection: spec.reflection,
            connections: spec.connections,
            stop,
            health_listener,
            exporting: spec.exporting,
            runtimes: Vec::new(),
        })
    }

    /// Serves on `runtimes` too, besides the current runtime: the listener's connections are
    /// taken in turn by a server on each (see [`Incoming::spread`]), and each connection's
    /// calls stay on the runtime that took it.
    #[must_use]
    pub fn spread_over(mut self, runtimes: Vec<tokio::runtime::Handle>) -> Self {
        self.runtimes = runtimes;
        self
    }

    /// The server's health, to turn NOT_SERVING by hand (control's drain does).
    pub fn health(&self) -> &HealthState {
        &self.health
    }

    /// The accepted connections (the gateway reports how many are open).
    pub fn connections(&self) -> &Incoming {
        &self.connections
    }

    /// Starts serving on `listener`: health, reflection (v1 and v1alpha) and whatever `add`
    /// adds. The server runs as [`Serving`] is awaited.
    ///
    /// # Errors
    ///
    /// [`RunError::Reflection`] when the descriptor sets do not decode (a build problem).
    pub fn serve(
        self,
        listener: TcpListener,
        add: impl FnOnce(Routes) -> Routes,
    ) -> Result<Serving, RunError> {
        let mut routes = Routes::new(self.health.service());
        if self.reflection {
            let names: Vec<&str> = self.services.iter().map(String::as_str).collect();
            let (reflection_v1, reflection_v1alpha) = reflection(&names)?;
            routes = routes
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha);
        }
        let routes = add(routes).prepare();
        let mut others = Vec::new();
        let server: Pin<Box<dyn Future<Output = _> + Send>> = if self.runtimes.is_empty() {
            Box::pin(self.builder.serve_with_incoming_shutdown(
                routes,
                self.connections.accept(listener),
                self.stop.clone().cancelled_owned(),
            ))
        } else {
            let (accepting, mut streams) =
                self.connections
                    .spread(listener, self.runtimes.len() + 1, self.stop.clone());
            let own = streams.remove(0);
            tokio::spawn(accepting);
            for (runtime, incoming) in self.runtimes.iter().zip(streams) {
                others.push(
                    runtime.spawn(self.builder.clone().serve_with_incoming_shutdown(
                        routes.clone(),
                        incoming,
                        self.stop.clone().cancelled_owned(),
                    )),
                );
            }
            Box::pin(self.builder.serve_with_incoming_shutdown(
                routes,
                own,
                self.stop.clone().cancelled_owned(),
            ))
        };
        Ok(Serving {
            server,
            others,
            ended: false,
            health: self.health,
            connections: self.connections,
            stop: self.stop,
            health_listener: self.health_listener,
            exporting: self.exporting,
        })
    }
}

/// Sends every call `routes` has no service for to `fallback` (the gateway relays them),
/// instead of answering UNIMPLEMENTED.
pub fn with_fallback<S>(mut routes: Routes, fallback: S) -> Routes
where
    S: tower::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    use tower::ServiceExt;
    let router = routes.axum_router_mut();
    *router = std::mem::take(router).fallback_service(fallback.map_request(
        |request: tonic::codegen::http::Request<axum::body::Body>| {
            request.map(tonic::body::Body::new)
        },
    ));
    routes
}

/// A relay's answer to one call.
pub type RelayFuture =
    Pin<Box<dyn Future<Output = tonic::codegen::http::Response<tonic::body::Body>> + Send>>;

/// The service that takes every call a server does not serve itself (the gateway's relay).
pub type Relay = std::sync::Arc<
    dyn Fn(tonic::codegen::http::Request<tonic::body::Body>) -> RelayFuture + Send + Sync,
>;

/// A relay and what it leaves to the server's own services: the calls under any of
/// `except`'s path prefixes go to the router, every other call straight to `relay`, under
/// the same layers (tracing, access log, statuses, authorization), without the router's
/// lookup and the boxing of its routes and fallback on every call.
#[derive(Clone)]
pub struct Relayed {
    pub relay: Relay,
    pub except: &'static [&'static str],
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed")
            .field("except", &self.except)
            .finish_non_exhaustive()
    }
}

/// Sends the calls [`Relayed`] takes to its relay, the rest to the service inside.
#[derive(Debug, Clone, Default)]
pub struct RelayLayer(Option<Relayed>);

impl<S> tower::Layer<S> for RelayLayer {
    type Service = RelayService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RelayService {
            inner,
            relayed: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelayService<S> {
    inner: S,
    relayed: Option<Relayed>,
}

impl<S> tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for RelayService<S>
where
    S: tower::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        >,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = RelayServiceFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        match &self.relayed {
            Some(relayed)
                if !relayed
                    .except
                    .iter()
                    .any(|prefix| request.uri().path().starts_with(prefix)) =>
            {
                RelayServiceFuture::Relayed {
                    future: (relayed.relay)(request),
                }
            }
            _ => RelayServiceFuture::Inner {
                future: Box::pin(self.inner.call(request)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a call through [`RelayService`]: the relay's, or the inner service's,
    /// boxed too (the router's future is large, and every layer above moves this one into
    /// its own on every call: the relayed calls, nearly all, keep it two pointers wide).
    #[project = RelayServiceProj]
    #[allow(missing_docs)]
    pub enum RelayServiceFuture<F> {
        Inner { future: Pin<Box<F>> },
        Relayed { future: RelayFuture },
    }
}

impl<F, E> Future for RelayServiceFuture<F>
where
    F: Future<Output = Result<tonic::codegen::http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            RelayServiceProj::Inner { future } => future.as_mut().poll(cx),
            RelayServiceProj::Relayed { future } => future.as_mut().poll(cx).map(Ok),
        }
    }
}

/// A server that is serving (while awaited) until it drains.
pub struct Serving {
    server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>,
    /// The servers on the other runtimes ([`Scaffold::spread_over`]).
    others: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The server future has returned (it must not be polled again).
    ended: bool,
    health: HealthState,
    connections: Incoming,
    stop: CancellationToken,
    health_listener: Option<JoinHandle<()>>,
    exporting: Option<Exporting>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Serving {
    /// Serves until `until` resolves, with its value.
    ///
    /// # Errors
    ///
    /// [`RunError::Serve`] when the server fails first.
    pub async fn until<T>(&mut self, until: impl Future<Output = T>) -> Result<T, RunError> {
        tokio::select! {
            result = &mut self.server => {
                self.ended = true;
                result?;
                Err(RunError::Ended)
            }
            value = until => Ok(value),
        }
    }

    /// The drain: NOT_SERVING, then `idle` (the server's calls in flight end, or control's
    /// instances stop) for at most `grace`, then the close. True when `idle` finished in time.
    ///
    /// # Errors
    ///
    /// [`RunError::Serve`] when the server fails while closing.
    pub async fn drain(
        &mut self,
        idle: impl Future<Output = ()>,
        grace: Duration,
    ) -> Result<bool, RunError> {
        self.health.set(ServingStatus::NotServing);
        let in_time = tokio::time::timeout(grace, idle).await.is_ok();
        self.close().await?;
        Ok(in_time)
    }

    /// Ends `Watch` streams and closes every connection at once (after a failure), bounded by
    /// [`CLOSE_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// [`RunError::Serve`] when the server fails while closing.
    pub async fn close(&mut self) -> Result<(), RunError> {
        // Watchers have seen NOT_SERVING (or the server failed); end their streams so the
        // connections can close.
        self.health.close();
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        let own = if self.ended {
            Ok(())
        } else {
            match tokio::time::timeout_at(deadline, &mut self.server).await {
                Ok(result) => {
                    self.ended = true;
                    result
                }
                Err(_) => {
                    tracing::debug!("closing connections with open streams");
                    Ok(())
                }
            }
        };
        // The servers on other runtimes stop with this one (the same stop); their failures
        // are said, this one's returned.
        for other in std::mem::take(&mut self.others) {
            match tokio::time::timeout_at(deadline, other).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::error!(%error, "a runtime's server failed"),
                Ok(Err(error)) => tracing::error!(%error, "a runtime's server ended"),
                Err(_) => tracing::debug!("closing connections with open streams"),
            }
        }
        Ok(own?)
    }

    /// After [`Serving::close`]: exports the spans left, waits for the health-only port to
    /// stop and for every connection to be closed, lingering ones included, so clients read
    /// the last bytes before the process exits.
    pub async fn closed(mut self) {
        if let Some(exporting) = self.exporting.take() {
            exporting.finish().await;
        }
        self.stop.cancel();
        if let Some(task) = self.health_listener {
            let _ = task.await;
        }
        self.connections.closed().await;
    }

    /// The end of every dlb server: [`Serving::closed`], the `stopped` event, and one bounded
    /// attempt to write the events still queued.
    pub async fn finish(self, events: &EventLog, writer: Writer) {
        self.closed().await;
        events.lifecycle("stopped", &[]);
        writer.finish().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codegen::http;
    use tower::ServiceExt;

    /// An answer naming who gave it.
    fn answer(by: &'static str) -> http::Response<tonic::body::Body> {
        let mut response = http::Response::new(tonic::body::Body::empty());
        response
            .headers_mut()
            .insert("by", http::HeaderValue::from_static(by));
        response
    }

    async fn who_answers(relayed: Option<Relayed>, path: &str) -> String {
        let inner = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
            Ok::<_, std::convert::Infallible>(answer("router"))
        });
        let service = tower::Layer::layer(&RelayLayer(relayed), inner);
        let request = http::Request::builder()
            .uri(path)
            .body(tonic::body::Body::empty())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        response.headers()["by"].to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn the_relay_takes_every_call_but_those_the_server_serves_itself() {
        let relay: Relay = std::sync::Arc::new(|_| Box::pin(async { answer("relay") }));
        let relayed = Relayed {
            relay,
            except: &["/dlb.v1.Gateway/", "/grpc.health.v1.Health/"],
        };
        for (path, by) in [
            ("/dlb.v1.Operations/Reverse", "relay"),
            ("/shop.Cart/Add", "relay"),
            ("/dlb.v1.Gateway/Stats", "router"),
            ("/grpc.health.v1.Health/Check", "router"),
            // A prefix only when whole: another service whose name starts the same is relayed.
            ("/dlb.v1.GatewayX/Stats", "relay"),
        ] {
            assert_eq!(who_answers(Some(relayed.clone()), path).await, by, "{path}");
        }
        // Without a relay (compute, control) the router answers everything.
        assert_eq!(who_answers(None, "/shop.Cart/Add").await, "router");
    }
}
