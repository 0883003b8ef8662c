//! dlb control service: supervises `dlb-compute` processes and tells the gateway about them.
//!
//! A request enters [`service::ControlService`] and is carried out by the [`supervisor`],
//! which owns every compute process ([`process`] spawns them directly, no shell). Every change
//! is a new snapshot on `WatchInstances`, which the gateway follows. No instance outlives
//! control: on SIGTERM/SIGINT it drains them all; if control dies any other way, each instance
//! notices its parent is gone (`--exit-with-parent`) and stops itself.

pub mod config;
pub mod process;
pub mod service;
pub mod supervisor;
#[cfg(feature = "test-fixtures")]
pub mod testing;

use std::future::Future;
use std::time::Duration;

use dlb::events::EventLog;
use dlb::proto::v1::control_server::ControlServer;
use dlb::server::{CLOSE_TIMEOUT, Incoming, Scaffold, Spec};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codec::CompressionEncoding;

pub use config::Config;
pub use dlb::server::RunError;

use crate::service::ControlService;
use crate::supervisor::Supervisor;

/// The services control's policy may name.
const SERVICES: &[&str] = &["dlb.v1.Control"];

/// Checks the authorization policy (`--authz-policy`, `--allow`) before anything is started,
/// so that a bad one stops the start before the port is taken and announced.
///
/// # Errors
///
/// What is wrong with it, and where.
pub fn check_authz(config: &Config) -> Result<(), String> {
    config
        .authz
        .policy(dlb::authz::CONTROL_POLICY, Some(SERVICES))
        .map(|_| ())
}

/// Starts the configured instances, serves on `listener` until `shutdown`, then drains every
/// instance and returns.
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
    let events_config = config.events.config().map_err(RunError::Config)?;
    let (events, writer) = EventLog::spawn(events_config, "control", &config.id);
    let authz = dlb::authz::guard(
        "control",
        &config.authz,
        dlb::authz::CONTROL_POLICY,
        Some(SERVICES),
        &config.tls,
        &events,
    )
    .map_err(RunError::Config)?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let supervisor = Supervisor::new(&config, events.clone(), cancel.clone(), tracker.clone());

    let closing = CancellationToken::new();
    let (_, exporting) = dlb::trace::Exporting::from_args(&config.trace, "dlb-control", &config.id)
        .map_err(RunError::Config)?;
    let scaffold = Scaffold::new(Spec {
        services: &["dlb.v1.Control"],
        tls: &config.tls,
        health_listen: config.health_listen,
        connections: Incoming::default(),
        served_by: None,
        max_concurrent_streams: None,
        health_names: &[],
        reflection: true,
        authz,
        access_log: dlb::server::access_log::AccessLog::default(),
        exporting,
        // A span per lifecycle call (not per listing, nor the long watches).
        traced: dlb::trace::Traced {
            only: &[
                "/dlb.v1.Control/StartInstance",
                "/dlb.v1.Control/StopInstance",
                "/dlb.v1.Control/AddInstance",
                "/dlb.v1.Control/RemoveInstance",
            ],
            skip: &[],
        },
        relayed: None,
    })
    .await?;
    let mut serving = scaffold.serve(listener, |router| {
        router.add_service(
            ControlServer::new(ControlService {
                supervisor: supervisor.clone(),
                closing: closing.clone(),
            })
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip),
        )
    })?;

    // Start the initial instances while already answering List/Watch.
    let initial = {
        let supervisor = supervisor.clone();
        let count = config.instances;
        tokio::spawn(async move {
            let starts: Vec<_> = (0..count)
                .map(|_| {
                    let supervisor = supervisor.clone();
                    tokio::spawn(async move { supervisor.add().await })
                })
                .collect();
            for start in starts {
                if let Ok(Err(error)) = start.await {
                    tracing::error!(%error, "initial instance did not start");
                }
            }
        })
    };
    let sampler = {
        let supervisor = supervisor.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => supervisor.sample_usage().await,
                    () = cancel.cancelled() => return,
                }
            }
        })
    };
    events.lifecycle("started", &[]);

    let served = serving.until(shutdown).await;
    tracing::info!("stopping every instance");
    initial.abort();
    // Each instance's own grace period bounds its stop; the drain waits for all of them.
    let stopped = async {
        supervisor.stop_all().await;
        // WatchInstances streams end, so the connections can close.
        closing.cancel();
    };
    let _ = serving.drain(stopped, Duration::MAX).await;
    cancel.cancel();
    sampler.abort();
    tracker.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, tracker.wait()).await;
    serving.finish(&events, writer).await;
    served
}
