//! dlb dashboard (`dlb-ui`): the whole mesh live in one page, safe by default.
//!
//! A browser loads `/` and its three assets, then follows `GET /api/stream` (server-sent
//! events): a [`collector::Snapshot`] on every change (instances from control's
//! `WatchInstances`, health and traffic from the gateway's `Stats`) and every event written to
//! the Redis log. Buttons and the operation form `POST` to `/api/...` ([`routes`]); every such
//! request passes the [`security`] checks first. A source that does not answer becomes a banner
//! on the page, never an error page.

pub mod collector;
pub mod config;
pub mod error;
pub mod routes;
pub mod security;
#[cfg(feature = "test-fixtures")]
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use dlb::events::EventLog;
use dlb::events::reader::EventReader;
use dlb::proto::v1::control_client::ControlClient;
use dlb::proto::v1::operations_client::OperationsClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

pub use config::Config;

use crate::collector::Collector;
use crate::security::Policy;

/// How long shutdown waits for open requests (a drain in progress) before giving up.
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);

const PAGE: &str = include_str!("../assets/index.html");

/// Errors that stop the dashboard from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No randomness for the CSRF token.
    #[error("reading /dev/urandom for the CSRF token")]
    Random(#[source] std::io::Error),
    /// Serving failed.
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
}

/// What every route shares.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    page: String,
    policy: Arc<Policy>,
    collector: Arc<Collector>,
    operations: OperationsClient<Channel>,
    control: Option<(String, ControlClient<Channel>)>,
    reader: Option<EventReader>,
    events: EventLog,
    call_timeout: Duration,
    cancel: CancellationToken,
    tracer: dlb::trace::Tracer,
}

impl AppState {
    /// Connects (lazily) to the gateway, control and Redis and starts the background loops on
    /// `tracker`; they stop when `cancel` fires.
    ///
    /// # Errors
    ///
    /// [`StartError`] for a bad address or no randomness.
    pub fn start(
        config: &Config,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        let tls = config.client_tls().map_err(StartError::Config)?;
        let gateway = dlb::dial::endpoint_tls(&config.gateway, tls.as_ref())
            .map(|endpoint| endpoint.connect_lazy())
            .map_err(|e| StartError::Config(format!("--gateway: {e}")))?;
        let control = config
            .control_addr()
            .map(|addr| {
                dlb::dial::endpoint_tls(addr, tls.as_ref())
                    .map(|endpoint| (addr.to_owned(), endpoint.connect_lazy()))
                    .map_err(|e| StartError::Config(format!("--control: {e}")))
            })
            .transpose()?;
        let log_config = config.events.config().map_err(StartError::Config)?;
        let reader = log_config
            .redis_url
            .as_deref()
            .map(EventReader::new)
            .transpose()
            .map_err(|e| StartError::Config(format!("--redis: {e}")))?;
        let redis_shown = log_config.redis_url.as_deref().map(dlb::events::redact_url);
        let boot_id = security::random_token().map_err(StartError::Random)?;
        let collector = Collector::new(
            &boot_id[..16],
            &config.gateway,
            control.as_ref().map(|(addr, _)| addr.as_str()),
            redis_shown.as_deref(),
        );
        let (tracer, exporting) = dlb::trace::Exporting::from_args(&config.trace, "dlb-ui", "ui")
            .map_err(StartError::Config)?;
        if let Some(exporting) = exporting {
            let stop = cancel.clone();
            tracker.spawn(async move {
                stop.cancelled().await;
                exporting.finish().await;
            });
        }
        let (events, writer) = EventLog::start(log_config, "ui", "ui", cancel.clone());
        tracker.spawn(async move {
            let _ = writer.await;
        });
        tracker.spawn(collector::poll_gateway(
            Arc::clone(&collector),
            gateway.clone(),
            config.refresh(),
            cancel.clone(),
        ));
        if let Some((_, channel)) = &control {
            tracker.spawn(collector::watch_control(
                Arc::clone(&collector),
                channel.clone(),
                cancel.clone(),
            ));
            tracker.spawn(collector::poll_resources(
                Arc::clone(&collector),
                channel.clone(),
                cancel.clone(),
            ));
        }
        if let Some(reader) = &reader {
            tracker.spawn(collector::tail_events(
                Arc::clone(&collector),
                reader.clone(),
                cancel.clone(),
            ));
        }
        let csrf_token = security::random_token().map_err(StartError::Random)?;
        let admin_required = config.admin_token.is_some();
        // The token is hex and the flags are constants: nothing here needs escaping.
        let page = PAGE.replace("{{CSRF_TOKEN}}", &csrf_token).replace(
            "{{ADMIN_REQUIRED}}",
            if admin_required { "yes" } else { "no" },
        );
        events.lifecycle("started", &[("addr", &config.listen.to_string())]);
        Ok(Self {
            inner: Arc::new(Inner {
                page,
                policy: Arc::new(Policy {
                    csrf_token,
                    admin_token: config.admin_token.clone(),
                    loopback_only: config.listen.ip().is_loopback(),
                }),
                collector,
                operations: OperationsClient::new(gateway)
                    .max_decoding_message_size(dlb::dial::MAX_RESPONSE_BYTES),
                control: control.map(|(addr, channel)| (addr, ControlClient::new(channel))),
                reader,
                events,
                call_timeout: config.call_timeout(),
                cancel,
                tracer,
            }),
        })
    }

    /// The CSRF token the page carries (for tests and scripts that POST).
    pub fn csrf_token(&self) -> &str {
        &self.inner.policy.csrf_token
    }

    /// The collector behind the page (for tests).
    pub fn collector(&self) -> &Arc<Collector> {
        &self.inner.collector
    }
}

/// The dashboard's router: routes, then the write guard, the `Host` check and the security
/// headers around all of them.
pub fn app(state: AppState) -> Router {
    let policy = Arc::clone(&state.inner.policy);
    Router::new()
        .route("/", get(routes::index))
        .route("/healthz", get(routes::healthz))
        .route("/assets/app.js", get(routes::app_js))
        .route("/assets/app.css", get(routes::app_css))
        .route("/assets/favicon.svg", get(routes::favicon))
        .route("/api/snapshot", get(routes::snapshot))
        .route("/api/history", get(routes::history))
        .route("/api/events", get(routes::events))
        .route("/api/stream", get(routes::stream))
        .route("/api/call", post(routes::call))
        .route("/api/instances", post(routes::add))
        .route("/api/instances/{id}/start", post(routes::start))
        .route("/api/instances/{id}/stop", post(routes::stop))
        .route("/api/instances/{id}/kill", post(routes::kill))
        .route("/api/instances/{id}/remove", post(routes::remove))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(config::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&policy),
            security::guard_writes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            policy,
            security::check_host,
        ))
        .layer(axum::middleware::from_fn(security::headers))
        .with_state(state)
}

/// Serves the dashboard on `listener` until `shutdown` resolves, then ends the live streams
/// and waits (at most [`GRACE_PERIOD`]) for open requests.
///
/// # Errors
///
/// [`StartError`] for bad configuration or a failing listener.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let state = AppState::start(&config, cancel.clone(), &tracker)?;
    let events = state.inner.events.clone();
    let stop = cancel.clone();
    let serve = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        // Logged before the cancel: the cancel also ends the event log's writer.
        events.lifecycle("stopping", &[]);
        stop.cancel();
    });
    let mut serve = tokio::spawn(async move { serve.await });
    let finished = tokio::select! {
        () = cancel.cancelled() => None,
        // The server does not end on its own; if it fails, stop the loops too.
        result = &mut serve => {
            cancel.cancel();
            Some(result)
        }
    };
    let finished = match finished {
        Some(result) => Some(result),
        None => match tokio::time::timeout(GRACE_PERIOD, &mut serve).await {
            Ok(result) => Some(result),
            Err(_) => {
                tracing::warn!("requests still open after the grace period; closing them");
                serve.abort();
                None
            }
        },
    };
    let served = match finished {
        Some(Ok(result)) => result.map_err(StartError::Serve),
        Some(Err(join)) => Err(StartError::Serve(std::io::Error::other(join))),
        None => Ok(()),
    };
    tracker.close();
    let _ = tokio::time::timeout(GRACE_PERIOD, tracker.wait()).await;
    served
}
