//! Membership: which instances exist. A [`Membership`] source says so as a stream of changes;
//! [`supervise`] keeps one health [`Monitor`] per member. Sources: the static `--backend` list
//! ([`StaticMembership`]), the control service's `WatchInstances` ([`ControlMembership`]), or
//! both ([`Merged`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dlb::events::EventLog;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use crate::config::Backend;
use crate::endpoint::{EndpointStats, EndpointTable};
use crate::health::{BalancerChanges, Monitor};

/// The balancer's discovery stream: endpoints inserted and removed by the health monitors.
pub type Discovered = tokio_stream::wrappers::UnboundedReceiverStream<
    Result<
        tower::discover::Change<Arc<str>, crate::endpoint::EndpointService>,
        std::convert::Infallible,
    >,
>;

/// A change of membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// An instance exists at this address (new, or moved).
    Upsert(Backend),
    /// An instance is gone.
    Remove(String),
}

/// A source of membership changes.
pub trait Membership: Send + 'static {
    /// The changes, from the initial members on.
    fn changes(self: Box<Self>) -> Pin<Box<dyn Stream<Item = MemberChange> + Send>>;
}

/// A fixed list of instances (`--backend`).
#[derive(Debug, Clone)]
pub struct StaticMembership(pub Vec<Backend>);

impl Membership for StaticMembership {
    fn changes(self: Box<Self>) -> Pin<Box<dyn Stream<Item = MemberChange> + Send>> {
        let initial = tokio_stream::iter(self.0.into_iter().map(MemberChange::Upsert));
        // Then nothing more, ever: the stream stays open.
        Box::pin(initial.chain(tokio_stream::pending()))
    }
}

/// How monitors are set up.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// Check polling interval, keepalive interval.
    pub interval: Duration,
    /// Bound on each probe and connection attempt.
    pub probe_timeout: Duration,
    /// HTTP/2 connections per endpoint.
    pub connections: usize,
}

/// Follows `membership`, starting and stopping one monitor per member.
pub async fn supervise(
    membership: Box<dyn Membership>,
    table: Arc<EndpointTable>,
    balancer: BalancerChanges,
    events: EventLog,
    settings: MonitorSettings,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut changes = membership.changes();
    let mut monitors: HashMap<String, (String, CancellationToken)> = HashMap::new();
    loop {
        let change = tokio::select! {
            change = changes.next() => change,
            () = cancel.cancelled() => None,
        };
        let Some(change) = change else {
            break;
        };
        match change {
            MemberChange::Upsert(backend) => {
                if monitors
                    .get(&backend.id)
                    .is_some_and(|(addr, _)| *addr == backend.addr)
                {
                    continue;
                }
                if let Some((_, old)) = monitors.remove(&backend.id) {
                    old.cancel();
                }
                let Some(channels) = connect(&backend, &settings) else {
                    tracing::error!(instance = %backend.id, addr = %backend.addr, "invalid backend address");
                    continue;
                };
                let stats = Arc::new(EndpointStats::new(&backend.id, &backend.addr));
                table.insert(Arc::clone(&stats));
                let token = cancel.child_token();
                monitors.insert(backend.id.clone(), (backend.addr.clone(), token.clone()));
                tracker.spawn(
                    Monitor {
                        stats,
                        channels,
                        balancer: balancer.clone(),
                        events: events.clone(),
                        interval: settings.interval,
                        probe_timeout: settings.probe_timeout,
                        cancel: token,
                    }
                    .run(),
                );
            }
            MemberChange::Remove(id) => {
                if let Some((_, token)) = monitors.remove(&id) {
                    token.cancel();
                }
                table.remove(&id);
            }
        }
    }
    for (_, token) in monitors.into_values() {
        token.cancel();
    }
}

/// Lazily connecting channels to `backend`: no I/O until first used.
fn connect(backend: &Backend, settings: &MonitorSettings) -> Option<Vec<Channel>> {
    (0..settings.connections.max(1))
        .map(|_| {
            dlb::endpoint::endpoint(&backend.addr).ok().map(|endpoint| {
                endpoint
                    .connect_timeout(settings.probe_timeout)
                    .http2_keep_alive_interval(settings.interval)
                    .keep_alive_timeout(settings.probe_timeout)
                    .keep_alive_while_idle(true)
                    .connect_lazy()
            })
        })
        .collect()
}

/// Membership from the control service's `WatchInstances`: instances that are starting or
/// serving are members; draining, stopped, crashed or removed ones are not. While control is
/// unreachable the last membership stays as it was, and the stream reconnects by itself.
#[derive(Debug, Clone)]
pub struct ControlMembership {
    /// The control service, e.g. `http://127.0.0.1:12001`.
    pub addr: String,
}

/// Longest wait between reconnections to control.
const CONTROL_MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Membership for ControlMembership {
    fn changes(self: Box<Self>) -> Pin<Box<dyn Stream<Item = MemberChange> + Send>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(follow_control(self.addr, tx));
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    }
}

async fn follow_control(addr: String, tx: tokio::sync::mpsc::UnboundedSender<MemberChange>) {
    use dlb::proto::v1::{InstanceState, WatchInstancesRequest, control_client::ControlClient};
    let mut members: HashMap<String, String> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    while !tx.is_closed() {
        let stream = match dlb::endpoint::endpoint(&addr) {
            Ok(endpoint) => match endpoint.connect().await {
                Ok(channel) => ControlClient::new(channel)
                    .watch_instances(WatchInstancesRequest {})
                    .await
                    .map(tonic::Response::into_inner)
                    .ok(),
                Err(_) => None,
            },
            Err(error) => {
                tracing::error!(%addr, %error, "invalid --control address");
                return;
            }
        };
        if stream.is_none() && !warned {
            warned = true;
            tracing::warn!(%addr, "cannot reach control; retrying (instances it lists stay as they were)");
        }
        if let Some(mut stream) = stream {
            tracing::info!(%addr, "following control");
            warned = false;
            backoff = Duration::from_millis(100);
            loop {
                // Stop following as soon as the gateway stops listening.
                let message = tokio::select! {
                    message = stream.message() => message,
                    () = tx.closed() => return,
                };
                let Ok(Some(list)) = message else {
                    break;
                };
                let wanted: HashMap<String, String> = list
                    .instances
                    .into_iter()
                    .filter(|i| {
                        matches!(i.state(), InstanceState::Starting | InstanceState::Serving)
                            && !i.address.ends_with(":0")
                    })
                    .map(|i| (i.id, i.address))
                    .collect();
                for id in members.keys() {
                    if !wanted.contains_key(id) {
                        let _ = tx.send(MemberChange::Remove(id.clone()));
                    }
                }
                for (id, addr) in &wanted {
                    if members.get(id) != Some(addr) {
                        let _ = tx.send(MemberChange::Upsert(Backend {
                            id: id.clone(),
                            addr: addr.clone(),
                        }));
                    }
                }
                members = wanted;
            }
            tracing::warn!(%addr, "lost control; keeping the last membership");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = tx.closed() => return,
        }
        backoff = (backoff * 2).min(CONTROL_MAX_BACKOFF);
    }
}

/// Both sources at once: a static list and control.
#[derive(Debug)]
pub struct Merged(pub Vec<Box<dyn Membership>>);

impl std::fmt::Debug for dyn Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Membership")
    }
}

impl Membership for Merged {
    fn changes(self: Box<Self>) -> Pin<Box<dyn Stream<Item = MemberChange> + Send>> {
        let mut merged: Pin<Box<dyn Stream<Item = MemberChange> + Send>> =
            Box::pin(tokio_stream::pending());
        for source in self.0 {
            merged = Box::pin(merged.merge(source.changes()));
        }
        merged
    }
}
