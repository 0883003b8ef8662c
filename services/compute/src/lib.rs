//! dlb compute instance: serves the five `dlb.v1.Operations`, health and reflection.
//!
//! A request enters through tonic, gets its `x-served-by` header from the layer built in
//! [`run`], and is answered by [`service::OperationsService`], which validates it and runs the
//! algorithm from [`ops`] inline when cheap or on the bounded [`pool::CpuPool`] when heavy, so a
//! slow Fibonacci never delays health checks or cheap calls.
//!
//! Shutdown: when the `shutdown` future given to [`run`] resolves (SIGTERM in `main`), health
//! turns NOT_SERVING, calls keep being served until none is in flight (bounded by the grace
//! period), then the server closes and [`run`] returns.

pub mod config;
pub mod error;
pub mod load;
pub mod ops;
pub mod pool;
pub mod service;
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dlb::events::EventLog;
use dlb::health::HealthState;
use dlb::proto::v1::{load_server::LoadServer, operations_server::OperationsServer};
use dlb::registry::{Entry, Registry, RegistryError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::codegen::http::{self, HeaderValue};
use tonic_health::pb::health_check_response::ServingStatus;
use tower::util::MapResponseLayer;

pub use config::Config;
pub use dlb::server::RunError;

use crate::load::LoadService;
use crate::pool::CpuPool;
use crate::service::{CallStats, Limits, OperationsService};

/// How long the server may take to close connections once drained: the last responses'
/// bodies are still being sent (a 2 MB Fibonacci value takes many flow-control round trips on
/// a loaded machine), so this is a bound, not a wait; it ends as soon as connections close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves on `listener` until `shutdown` resolves, then drains and returns.
///
/// # Errors
///
/// [`RunError`] when the configuration is invalid or the server fails.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    config.validate().map_err(RunError::Config)?;
    let served_by = HeaderValue::from_str(&config.id)
        .map_err(|_| RunError::Config(format!("--id {:?} is not a header value", config.id)))?;
    let pool = CpuPool::new(config.workers(), config.queue);
    let calls = Arc::new(CallStats::default());
    let limits = Limits {
        max_prime_digits: config.max_prime_digits,
        max_fib_n: config.max_fib_n,
    };
    let events_config = config.events.config().map_err(RunError::Config)?;
    let writer_stop = CancellationToken::new();
    let (events, writer) =
        EventLog::start(events_config, "compute", &config.id, writer_stop.clone());
    let operations = OperationsService::new(
        config.id.clone(),
        limits,
        pool.clone(),
        Arc::clone(&calls),
        events.clone(),
    );
    let load = LoadService::new(config.id.clone(), Arc::clone(&calls), pool);

    let health = HealthState::new(&["dlb.v1.Operations"]);

    let (reflection_v1, reflection_v1alpha) =
        dlb::server::reflection(&["dlb.v1.Operations", "dlb.v1.Load"])?;

    let stop = CancellationToken::new();
    let local = listener.local_addr().unwrap_or(config.listen);
    let addr = local.to_string();
    let connections = dlb::server::Incoming::default();
    let incoming = connections.accept(listener);
    let builder = dlb::server::builder(&config.tls)?;
    let health_listener = match config.health_listen {
        Some(addr) => Some(dlb::server::spawn_health_listener(addr, &health, stop.clone()).await?),
        None => None,
    };
    let server = builder
        .layer(MapResponseLayer::new(
            move |mut response: http::Response<tonic::body::Body>| {
                response
                    .headers_mut()
                    .insert(dlb::metadata::SERVED_BY, served_by.clone());
                response
            },
        ))
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            OperationsServer::new(operations)
                // gzip either way (identity always); answers are compressed only for callers
                // whose grpc-accept-encoding names gzip.
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(config.max_message_bytes)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(LoadServer::new(load))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::pin!(server);
    events.lifecycle("started", &[("addr", &addr)]);

    // Registration runs beside the server (Redis may be slow or away); it ends on its own only
    // when the id is taken by another instance.
    let mut registration = match register(&config, local, &events) {
        Ok(registration) => registration,
        Err(message) => {
            stop.cancel();
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut server).await;
            writer_stop.cancel();
            let _ = writer.await;
            return Err(RunError::Config(message));
        }
    };
    let heartbeat_stop = registration.as_ref().map(|(stop, _)| stop.clone());
    let refused = async {
        match registration.as_mut() {
            Some((_, heartbeat)) => match heartbeat.await {
                Ok(Err(error)) => error.to_string(),
                _ => std::future::pending::<String>().await,
            },
            None => std::future::pending::<String>().await,
        }
    };
    let failed = tokio::select! {
        message = refused => Some(Err(RunError::Registry(message))),
        result = &mut server => Some(result.map_err(RunError::from)),
        () = shutdown => None,
    };
    if let Some(failed) = failed {
        stop.cancel();
        if let Some(heartbeat_stop) = heartbeat_stop {
            heartbeat_stop.cancel();
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut server).await;
        if let Err(error) = &failed {
            events.error("stopped", &[("error", &error.to_string())]);
        }
        writer_stop.cancel();
        let _ = writer.await;
        return failed;
    }

    // Out of the registry first, so gateways stop choosing it; then drain.
    if let Some((heartbeat_stop, heartbeat)) = registration {
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
    }
    tracing::info!(instance = %config.id, in_flight = calls.in_flight(), "draining");
    events.lifecycle("draining", &[("in_flight", &calls.in_flight().to_string())]);
    calls.start_draining();
    health.set(ServingStatus::NotServing);
    let grace = config.grace_period();
    if tokio::time::timeout(grace, calls.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            instance = %config.id,
            in_flight = calls.in_flight(),
            grace_secs = grace.as_secs(),
            "grace period over with calls in flight"
        );
    }
    // Watchers have seen NOT_SERVING; end their streams so connections can close.
    health.close();
    stop.cancel();
    match tokio::time::timeout(CLOSE_TIMEOUT, &mut server).await {
        Ok(result) => result?,
        Err(_) => tracing::debug!(instance = %config.id, "closing connections with open streams"),
    }
    if let Some(task) = health_listener {
        let _ = task.await;
    }
    // Let clients read the last bytes before the process exits.
    connections.closed().await;
    tracing::info!(instance = %config.id, "stopped");
    events.lifecycle("stopped", &[]);
    // The writer makes one bounded attempt to flush what is queued, then ends.
    writer_stop.cancel();
    let _ = writer.await;
    Ok(())
}

/// The heartbeat's stop token and task.
type Registration = (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), RegistryError>>,
);

/// With `--register`: starts the heartbeat that claims this instance's id in the registry and
/// keeps it (cancel the token to withdraw). Redis being away is not fatal (the heartbeat
/// registers when it is back); the id being taken by another instance is: the task then ends
/// with [`RegistryError::Duplicate`].
fn register(
    config: &Config,
    local: std::net::SocketAddr,
    events: &EventLog,
) -> Result<Option<Registration>, String> {
    if !config.register {
        return Ok(None);
    }
    let url = config
        .events
        .config()?
        .redis_url
        .ok_or_else(|| "--register needs --redis".to_owned())?;
    let registry = Registry::open(&url)?;
    let entry = Entry::for_this_process(&config.id, &config.advertised(local)?);
    let stop = CancellationToken::new();
    let events = events.clone();
    let heartbeat = tokio::spawn(registry.heartbeat(
        entry,
        config.register_ttl(),
        stop.clone(),
        move |entry| events.lifecycle("registered", &[("address", &entry.address)]),
    ));
    Ok(Some((stop, heartbeat)))
}
