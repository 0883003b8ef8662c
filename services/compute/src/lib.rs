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
#[cfg(feature = "test-fixtures")]
pub mod testing;

use std::future::Future;
use std::sync::Arc;

use dlb::events::EventLog;
use dlb::proto::v1::{load_server::LoadServer, operations_server::OperationsServer};
use dlb::registry::{Entry, Registry, RegistryError};
use dlb::server::{Incoming, Scaffold, Spec};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::codegen::http::HeaderValue;

pub use config::Config;
pub use dlb::server::RunError;

use crate::load::LoadService;
use crate::pool::CpuPool;
use crate::service::{CallStats, Limits, OperationsService};

/// The services an instance's policy may name.
const SERVICES: &[&str] = &["dlb.v1.Operations", "dlb.v1.Load"];

/// Checks the authorization policy (`--authz-policy`, `--allow`) before anything is started,
/// so that a bad one stops the start before the port is taken and announced.
///
/// # Errors
///
/// What is wrong with it, and where.
pub fn check_authz(config: &Config) -> Result<(), String> {
    config
        .authz
        .policy(dlb::authz::COMPUTE_POLICY, Some(SERVICES))
        .map(|_| ())
}

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
        inject_delay: std::time::Duration::from_millis(config.inject_delay_ms),
    };
    let events_config = config.events.config().map_err(RunError::Config)?;
    let (events, writer) = EventLog::spawn(events_config, "compute", &config.id);
    let operations = OperationsService::new(
        config.id.clone(),
        limits,
        pool.clone(),
        Arc::clone(&calls),
        events.clone(),
    );
    let load = LoadService::new(config.id.clone(), Arc::clone(&calls), pool);

    let local = listener.local_addr().unwrap_or(config.listen);
    let addr = local.to_string();
    let (_, exporting) = dlb::trace::Exporting::from_args(&config.trace, "dlb-compute", &config.id)
        .map_err(RunError::Config)?;
    let scaffold = Scaffold::new(Spec {
        services: &["dlb.v1.Operations", "dlb.v1.Load"],
        tls: &config.tls,
        health_listen: config.health_listen,
        connections: Incoming::default(),
        served_by: Some(served_by),
        max_concurrent_streams: None,
        health_names: &[],
        reflection: true,
        authz: dlb::authz::guard(
            &format!("compute {}", config.id),
            &config.authz,
            dlb::authz::COMPUTE_POLICY,
            Some(SERVICES),
            &config.tls,
            &events,
        )
        .map_err(RunError::Config)?,
        access_log: dlb::server::access_log::AccessLog::default(),
        exporting,
        // A span per operation (not per load report).
        traced: dlb::trace::Traced {
            only: &["/dlb.v1.Operations/"],
            skip: &[],
        },
        relayed: None,
    })
    .await?;
    let mut serving = scaffold.serve(listener, |router| {
        router
            .add_service(
                OperationsServer::new(operations)
                    // gzip either way (identity always); answers are compressed only for
                    // callers whose grpc-accept-encoding names gzip.
                    .accept_compressed(CompressionEncoding::Gzip)
                    .send_compressed(CompressionEncoding::Gzip)
                    .max_decoding_message_size(config.max_message_bytes)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(LoadServer::new(load))
    })?;
    events.lifecycle("started", &[("addr", &addr)]);

    // Registration runs beside the server (Redis may be slow or away); it ends on its own only
    // when the id is taken by another instance.
    let mut registration = match register(&config, local, &events) {
        Ok(registration) => registration,
        Err(message) => {
            let _ = serving.close().await;
            writer.finish().await;
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
    let ended = serving
        .until(async {
            tokio::select! {
                message = refused => Some(message),
                () = shutdown => None,
            }
        })
        .await;
    let failed = match ended {
        Ok(None) => None,
        Ok(Some(message)) => Some(RunError::Registry(message)),
        Err(error) => Some(error),
    };
    if let Some(failed) = failed {
        if let Some(heartbeat_stop) = heartbeat_stop {
            heartbeat_stop.cancel();
        }
        let _ = serving.close().await;
        events.error("stopped", &[("error", &failed.to_string())]);
        writer.finish().await;
        return Err(failed);
    }

    // Out of the registry first, so gateways stop choosing it; then drain.
    if let Some((heartbeat_stop, heartbeat)) = registration {
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
    }
    tracing::info!(instance = %config.id, in_flight = calls.in_flight(), "draining");
    events.lifecycle("draining", &[("in_flight", &calls.in_flight().to_string())]);
    calls.start_draining();
    let grace = config.grace_period();
    if !serving.drain(calls.wait_idle(), grace).await? {
        tracing::warn!(
            instance = %config.id,
            in_flight = calls.in_flight(),
            grace_secs = grace.as_secs(),
            "grace period over with calls in flight"
        );
    }
    serving.finish(&events, writer).await;
    tracing::info!(instance = %config.id, "stopped");
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
