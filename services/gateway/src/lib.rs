//! dlb gateway: serves `dlb.v1.Operations` and spreads each call over compute instances.
//!
//! A call enters [`relay::GatewayService`], which forwards it through the balancer (our
//! [`balance::RoundRobin`], or tower's p2c with `--policy p2c`) to an [`endpoint`]. Which
//! endpoints are in the balancer is decided by one health [`monitor`] per instance, and which
//! instances exist by a [`membership`] source (the static `--backend` list, the control
//! service's `WatchInstances`, the Redis registry or DNS, alone or together). Stats are
//! served as `dlb.v1.Gateway/Stats` and as Prometheus text ([`stats`]); every call is an event in
//! the Redis log.

pub mod balance;
pub mod config;
pub mod conn;
pub mod dns;
pub mod endpoint;
pub mod error;
pub mod failure;
pub mod membership;
pub mod methods;
pub mod monitor;
pub mod outlier;
pub mod reflection;
pub mod relay;
pub mod routing;
pub mod runtimes;
pub mod stats;
#[cfg(feature = "test-fixtures")]
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dlb::events::EventLog;
use dlb::proto::v1::gateway_server::GatewayServer;
use dlb::server::{CLOSE_TIMEOUT, Incoming, Scaffold, Spec};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer;
use tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer as ServerReflectionServerV1Alpha;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

pub use config::Config;
pub use dlb::server::RunError;

use crate::balance::{Pick, RoundRobin, RoundRobinLayer};
use crate::config::Policy;
use crate::endpoint::EndpointTable;
use crate::membership::{Membership, MonitorSettings};
use crate::relay::{
    Balanced, Counters, DEFAULT_POOL, ForwardError, ForwardSettings, GatewayService, Pool,
};
use crate::stats::{GatewayStatsService, StatsSource};

/// How long shutdown waits for calls in flight.
pub const GRACE_PERIOD: Duration = Duration::from_secs(10);

fn build_balancer(
    policy: Policy,
    slow_start: Duration,
    discover: membership::Discovered,
) -> Balanced {
    match policy {
        Policy::RoundRobin => {
            BoxCloneSyncService::new(RoundRobinLayer::new().layer(discover).map_err(ForwardError))
        }
        Policy::Weighted => BoxCloneSyncService::new(
            RoundRobin::with_pick(discover, Pick::Weighted { slow_start }).map_err(ForwardError),
        ),
        Policy::P2c => {
            let ewma = tower::load::PeakEwmaDiscover::new(
                discover,
                Duration::from_millis(1),
                Duration::from_secs(10),
                tower::load::CompleteOnResponse::default(),
            );
            let balance = tower::balance::p2c::Balance::new(ewma);
            BoxCloneSyncService::new(
                tower::buffer::Buffer::new(balance, 1024).map_err(ForwardError),
            )
        }
    }
}

/// Checks the authorization policy (`--authz-policy`, `--allow`) before anything is started,
/// so that a bad one stops the start before the port is taken and announced.
///
/// # Errors
///
/// What is wrong with it, and where.
pub fn check_authz(config: &Config) -> Result<(), String> {
    // No list of services: the gateway relays any service to its instances.
    config
        .authz
        .policy(dlb::authz::GATEWAY_POLICY, None)
        .map(|_| ())
}

/// Serves on `listener` (and `/metrics` on `metrics`) until `shutdown` resolves, then drains.
///
/// # Errors
///
/// [`RunError`] when the configuration is invalid or the server fails.
pub async fn run(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
    membership: Box<dyn Membership>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    run_spread(listener, metrics, config, membership, shutdown, Vec::new()).await
}

/// [`run`], with calls served on `runtimes` too (see [`runtimes`]): the current runtime runs
/// everything else and accepts, and each runtime serves the connections it is handed.
///
/// # Errors
///
/// [`RunError`] when the configuration is invalid or the server fails.
pub async fn run_spread(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
    membership: Box<dyn Membership>,
    shutdown: impl Future<Output = ()> + Send,
    runtimes: Vec<tokio::runtime::Handle>,
) -> Result<(), RunError> {
    config.validate().map_err(RunError::Config)?;
    let events_config = config.events.config().map_err(RunError::Config)?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (events, writer) = EventLog::spawn(events_config, "gateway", &config.id);
    let authz = dlb::authz::guard(
        "gateway",
        &config.authz,
        dlb::authz::GATEWAY_POLICY,
        None,
        &config.tls,
        &events,
    )
    .map_err(RunError::Config)?;
    let (access_log, access_log_writer) = match &config.access_log {
        Some(target) => {
            let (log, writer) =
                dlb::server::access_log::AccessLog::open(target).map_err(RunError::Config)?;
            (log, Some(writer))
        }
        None => (dlb::server::access_log::AccessLog::default(), None),
    };

    let (tracer, exporting) =
        dlb::trace::Exporting::from_args(&config.trace, "dlb-gateway", &config.id)
            .map_err(RunError::Config)?;
    let plan = config.plan().map_err(RunError::Config)?;
    let outlier = config.outlier().map_err(RunError::Config)?;
    let settings = |health_service: &str| MonitorSettings {
        interval: config.health_interval(),
        probe_timeout: config.probe_timeout(),
        connections: config.connections,
        stall_timeout: config.stall_timeout(),
        tls: config.client_tls(),
        health_service: health_service.to_owned(),
        runtimes: runtimes.len() + 1,
    };
    let start_pool = |name: &str, members: Box<dyn Membership>, settings: MonitorSettings| {
        let table = Arc::new(EndpointTable::new(outlier.clone()));
        let (changes, discovered) = mpsc::unbounded_channel();
        let balancer = build_balancer(
            config.policy,
            Duration::from_millis(config.slow_start_ms),
            UnboundedReceiverStream::new(discovered),
        );
        tracker.spawn(membership::supervise(
            members,
            Arc::clone(&table),
            changes,
            events.clone(),
            settings,
            cancel.clone(),
            tracker.clone(),
        ));
        tracker.spawn(endpoint::sample_rates(Arc::clone(&table), cancel.clone()));
        Pool {
            name: name.to_owned(),
            balancer,
            table,
        }
    };
    let mut pools = vec![start_pool(DEFAULT_POOL, membership, settings(""))];
    for pool in &plan.pools {
        pools.push(start_pool(
            &pool.name,
            config.pool_membership(pool),
            settings(&pool.health_service),
        ));
        tracing::info!(
            pool = %pool.name,
            services = ?pool.services,
            health_service = %pool.health_service,
            "pool"
        );
    }
    let table = Arc::clone(&pools[0].table);
    // Health answers for each routed service and each pool (dlb.pool.NAME): SERVING while
    // its pool has an instance serving.
    let mut watched: Vec<(String, usize)> = pools
        .iter()
        .enumerate()
        .map(|(i, pool)| (format!("{POOL_HEALTH_PREFIX}{}", pool.name), i))
        .collect();
    watched.extend(plan.default_services.iter().map(|s| (s.clone(), 0)));
    for (i, pool) in plan.pools.iter().enumerate() {
        watched.extend(pool.services.iter().map(|s| (s.clone(), i + 1)));
    }
    let health_names: Vec<String> = watched.iter().map(|(name, _)| name.clone()).collect();

    let counters = Arc::new(Counters::default());
    let service = GatewayService::with_pools(
        pools,
        plan.routes.clone(),
        ForwardSettings {
            max_in_flight: config.max_in_flight,
            max_attempts: config.max_attempts,
            default_timeout: Duration::from_secs(config.timeout_secs),
            max_message_bytes: config.max_message_bytes,
            hedge: config.hedge_after,
            tracer,
        },
        events.clone(),
        Arc::clone(&counters),
        config.id.clone(),
    );
    let max_connections = config.max_connections();
    if let Some(limit) = dlb::server::open_file_limit()
        && config.max_connections.is_some()
        && max_connections as u64 > limit.saturating_sub(config::RESERVED_FILES)
    {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "--max-connections is near or over the open-file limit (ulimit -n): past it, \
             accepting pauses and connecting to instances can fail"
        );
    }
    tracing::info!(
        "accepting up to {max_connections} connections from callers at once \
         (--max-connections), each with up to {} calls open (--max-concurrent-streams)",
        config.max_concurrent_streams
    );
    let scaffold = Scaffold::new(Spec {
        services: OWN_SERVICES,
        tls: &config.tls,
        health_listen: config.health_listen,
        connections: Incoming::limited(max_connections),
        served_by: None,
        max_concurrent_streams: Some(config.max_concurrent_streams),
        health_names: &health_names,
        reflection: false,
        authz: authz.clone(),
        access_log,
        exporting,
        // Every call it relays, not the Stats the dashboard and probes poll.
        traced: dlb::trace::Traced {
            only: &[],
            skip: &["/dlb.v1.Gateway/"],
        },
        relayed: Some(dlb::server::Relayed {
            relay: relay::GatewayService::relay_fn(&service),
            except: SERVED_HERE,
        }),
    })
    .await?
    .spread_over(runtimes);
    tracker.spawn(follow_pool_health(
        scaffold.health().clone(),
        service.clone(),
        watched,
        cancel.clone(),
    ));
    let source = StatsSource {
        table: Arc::clone(&table),
        counters,
        service: service.clone(),
        events: events.clone(),
        policy: config.policy.name(),
        max_in_flight: config.max_in_flight,
        health_interval_ms: config.health_interval_ms,
        probe_timeout_ms: config.probe_timeout_ms,
        authz,
        connections: scaffold.connections().clone(),
        max_connections,
    };
    if let Some(metrics) = metrics {
        tracker.spawn(stats::serve_metrics(
            metrics,
            source.clone(),
            cancel.clone(),
        ));
    }

    let addr = listener
        .local_addr()
        .map_or_else(|_| config.listen.to_string(), |a| a.to_string());
    // Reflection answers for the gateway's own services and its instances'.
    let (own_reflection, _) = dlb::server::reflection(OWN_SERVICES).map_err(RunError::from)?;
    let reflection = reflection::GatewayReflection::new(
        BoxCloneSyncService::new(own_reflection),
        service.clone(),
        config.client_tls(),
    );
    let mut serving = scaffold.serve(listener, |router| {
        let routes = router
            .add_service(ServerReflectionServer::new(reflection.clone()))
            .add_service(ServerReflectionServerV1Alpha::new(
                reflection::GatewayReflectionV1Alpha(reflection),
            ))
            .add_service(GatewayServer::new(GatewayStatsService(source)));
        // Every other call (the five operations, any other service) is relayed: taken
        // before the router (`Spec::relayed`).
        routes
    })?;
    events.lifecycle(
        "started",
        &[
            ("addr", &addr),
            ("policy", config.policy.name()),
            ("max_connections", &max_connections.to_string()),
        ],
    );

    let served = serving.until(shutdown).await;
    if served.is_ok() {
        tracing::info!(in_flight = service.in_flight(), "draining");
        events.lifecycle("draining", &[]);
        let idle = async {
            while service.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = serving.drain(idle, GRACE_PERIOD).await;
    } else {
        let _ = serving.close().await;
    }
    cancel.cancel();
    tracker.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, tracker.wait()).await;
    // Let callers read the last bytes before the process exits.
    serving.finish(&events, writer).await;
    // Every call's line written and flushed, the last ones included.
    if let Some(writer) = access_log_writer {
        let _ = tokio::task::spawn_blocking(move || writer.finish()).await;
    }
    served
}

/// The services the gateway serves itself (besides health and reflection).
const OWN_SERVICES: &[&str] = &["dlb.v1.Operations", "dlb.v1.Gateway"];

/// The calls the gateway answers itself (its stats, health, reflection); every other path
/// is relayed.
const SERVED_HERE: &[&str] = &[
    "/dlb.v1.Gateway/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Health names of pools: `dlb.pool.NAME`.
pub const POOL_HEALTH_PREFIX: &str = "dlb.pool.";

/// Keeps each watched health name SERVING while its pool has an instance serving, NOT_SERVING
/// otherwise (checked twice a second).
async fn follow_pool_health(
    health: dlb::health::HealthState,
    service: GatewayService,
    watched: Vec<(String, usize)>,
    cancel: CancellationToken,
) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let serving: Vec<bool> = service
            .pools()
            .iter()
            .map(|pool| {
                pool.table
                    .all()
                    .iter()
                    .any(|e| e.state() == endpoint::State::Serving)
            })
            .collect();
        for (name, pool) in &watched {
            let status = if serving[*pool] {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service(name, status);
        }
    }
}

/// Locks `m`. Every critical section of the gateway leaves its data valid, so a panic
/// elsewhere does not poison it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use tonic::server::NamedService;

    use super::*;

    #[test]
    fn served_here_is_every_service_the_gateway_answers_itself() {
        // The services `run` adds to its routes and the scaffold's health: a call to any of
        // them must reach the router, not the relay.
        let own = [
            <GatewayServer<stats::GatewayStatsService> as NamedService>::NAME,
            <tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>
                as NamedService>::NAME,
            <ServerReflectionServer<reflection::GatewayReflection> as NamedService>::NAME,
            <ServerReflectionServerV1Alpha<reflection::GatewayReflectionV1Alpha> as NamedService>::NAME,
        ];
        let prefixes: Vec<String> = own.iter().map(|name| format!("/{name}/")).collect();
        assert_eq!(prefixes, SERVED_HERE);
    }
}
