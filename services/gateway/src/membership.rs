//! Membership: which instances exist. A [`Membership`] source says so as a stream of changes;
//! [`supervise`] keeps one health [`Monitor`] per member. Sources: the static `--backend` list
//! ([`StaticMembership`]), the control service's `WatchInstances` ([`ControlMembership`]), the
//! Redis instance registry (`--discover redis`, [`RegistryMembership`]), DNS (`--discover
//! dns:NAME:PORT`, [`DnsMembership`]), or several at once ([`Merged`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dlb::events::EventLog;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Backend;
use crate::endpoint::EndpointTable;
pub use crate::monitor::MonitorSettings;
use crate::monitor::{BalancerChanges, Monitor, connect};

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
                if connect(&backend.addr, &settings).is_none() {
                    tracing::error!(instance = %backend.id, addr = %backend.addr, "invalid backend address");
                    continue;
                }
                let stats = table.join(&backend.id, &backend.addr);
                table.insert(Arc::clone(&stats));
                let token = cancel.child_token();
                monitors.insert(backend.id.clone(), (backend.addr.clone(), token.clone()));
                tracker.spawn(
                    Monitor {
                        stats,
                        addr: backend.addr.clone(),
                        settings: settings.clone(),
                        balancer: balancer.clone(),
                        events: events.clone(),
                        cancel: token,
                    }
                    .run(),
                );
            }
            MemberChange::Remove(id) => {
                if let Some((addr, token)) = monitors.remove(&id) {
                    token.cancel();
                    // Said, as its joining is (its health's first change): an instance
                    // stopped or removed leaves the log a trace of its going.
                    tracing::info!(instance = %id, %addr, "instance left the membership");
                    events.health("left", &[("instance", &id), ("addr", &addr)]);
                }
                table.remove(&id);
            }
        }
    }
    for (_, token) in monitors.into_values() {
        token.cancel();
    }
}

/// Membership from the control service's `WatchInstances`: instances that are starting or
/// serving are members; draining, stopped, crashed or removed ones are not. While control is
/// unreachable the last membership stays as it was, and the stream reconnects by itself.
#[derive(Debug, Clone)]
pub struct ControlMembership {
    /// The control service, e.g. `http://127.0.0.1:12001`.
    pub addr: String,
    /// TLS towards it, if on.
    pub tls: Option<dlb::tls::ClientTls>,
}

/// Longest wait between reconnections to control.
const CONTROL_MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Membership for ControlMembership {
    fn changes(self: Box<Self>) -> Pin<Box<dyn Stream<Item = MemberChange> + Send>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(follow_control(self.addr, self.tls, tx));
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    }
}

async fn follow_control(
    addr: String,
    tls: Option<dlb::tls::ClientTls>,
    tx: tokio::sync::mpsc::UnboundedSender<MemberChange>,
) {
    use dlb::proto::v1::{InstanceState, WatchInstancesRequest, control_client::ControlClient};
    let mut members: HashMap<String, String> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    let endpoint = match dlb::dial::endpoint_tls(&addr, tls.as_ref()) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::error!(%addr, %error, "invalid --control address");
            return;
        }
    };
    // As dialled: https when TLS is on, whatever --control says.
    let addr = endpoint.uri().to_string();
    while !tx.is_closed() {
        let stream = match endpoint.connect().await {
            Ok(channel) => ControlClient::new(channel)
                .watch_instances(WatchInstancesRequest {})
                .await
                .map(tonic::Response::into_inner)
                .ok(),
            Err(_) => None,
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
                send_difference(&members, &wanted, &tx);
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

/// Sends what changed from `members` to `wanted` (id to address).
fn send_difference(
    members: &HashMap<String, String>,
    wanted: &HashMap<String, String>,
    tx: &tokio::sync::mpsc::UnboundedSender<MemberChange>,
) {
    for change in difference(members, wanted) {
        let _ = tx.send(change);
    }
}

/// What changed from `members` to `wanted` (id to address): the members gone, then the new
/// and moved ones, each in id order.
fn difference(
    members: &HashMap<String, String>,
    wanted: &HashMap<String, String>,
) -> Vec<MemberChange> {
    let mut gone: Vec<&String> = members
        .keys()
        .filter(|id| !wanted.contains_key(*id))
        .collect();
    gone.sort();
    let mut changed: Vec<(&String, &String)> = wanted
        .iter()
        .filter(|(id, addr)| members.get(*id) != Some(*addr))
        .collect();
    changed.sort();
    gone.into_iter()
        .map(|id| MemberChange::Remove(id.clone()))
        .chain(changed.into_iter().map(|(id, addr)| {
            MemberChange::Upsert(Backend {
                id: id.clone(),
                addr: addr.clone(),
            })
        }))
        .collect()
}

/// Membership from the Redis instance registry (`--discover redis`): every registered
/// instance, from a snapshot on, following changes as they are announced. While Redis is
/// away the last membership stays; after a reconnection the registry is read again.
#[derive(Debug, Clone)]
pub struct RegistryMembership {
    /// The Redis URL.
    pub url: String,
}

impl Membership for RegistryMembership {
    fn changes(self: Box<Self>) -> Pin<Box<dyn Stream<Item = MemberChange> + Send>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        match dlb::registry::Registry::open(&self.url) {
            Ok(registry) => {
                tokio::spawn(async move {
                    let mut snapshots = registry.follow();
                    let mut members = HashMap::new();
                    loop {
                        let snapshot = tokio::select! {
                            snapshot = snapshots.recv() => snapshot,
                            () = tx.closed() => return,
                        };
                        let Some(snapshot) = snapshot else { return };
                        let wanted: HashMap<String, String> = snapshot
                            .into_values()
                            .filter(|entry| dlb::dial::validate_host_port(&entry.address).is_ok())
                            .map(|entry| (entry.id, entry.address))
                            .collect();
                        tracing::debug!(instances = wanted.len(), "registry changed");
                        send_difference(&members, &wanted, &tx);
                        members = wanted;
                    }
                });
            }
            Err(error) => tracing::error!(%error, "--discover redis: invalid --redis URL"),
        }
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    }
}

/// Membership from DNS (`--discover dns:NAME:PORT`): one instance per A/AAAA record of the
/// name, re-resolved every `interval`. A resolver failure keeps the last membership; a name
/// that has no records (any more) has no members.
#[derive(Debug, Clone)]
pub struct DnsMembership {
    /// The name.
    pub name: String,
    /// The instances' port.
    pub port: u16,
    /// The DNS server to ask (default: the system resolver).
    pub server: Option<std::net::SocketAddr>,
    /// Time between resolutions.
    pub interval: Duration,
}

impl Membership for DnsMembership {
    fn changes(self: Box<Self>) -> Pin<Box<dyn Stream<Item = MemberChange> + Send>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut members = HashMap::new();
            let mut failing = false;
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = tx.closed() => return,
                }
                match crate::dns::resolve(&self.name, self.server).await {
                    Ok(addresses) => {
                        if failing {
                            tracing::info!(name = %self.name, "DNS answers again");
                            failing = false;
                        }
                        let wanted: HashMap<String, String> = addresses
                            .into_iter()
                            .map(|ip| {
                                let addr = std::net::SocketAddr::new(ip, self.port);
                                (crate::dns::instance_id(ip, self.port), addr.to_string())
                            })
                            .collect();
                        send_difference(&members, &wanted, &tx);
                        members = wanted;
                    }
                    Err(error) => {
                        if !failing {
                            tracing::warn!(%error, "DNS discovery failed; keeping the last membership");
                            failing = true;
                        }
                    }
                }
            }
        });
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    }
}

/// Several sources at once (a static list, control, a discovery source).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(id, addr)| ((*id).to_owned(), (*addr).to_owned()))
            .collect()
    }

    fn shown(changes: &[MemberChange]) -> Vec<String> {
        changes
            .iter()
            .map(|change| match change {
                MemberChange::Upsert(backend) => format!("+{}@{}", backend.id, backend.addr),
                MemberChange::Remove(id) => format!("-{id}"),
            })
            .collect()
    }

    #[test]
    fn the_difference_removes_the_gone_then_adds_the_new_and_the_moved() {
        let members = map(&[("A", "h:1"), ("B", "h:2"), ("C", "h:3")]);
        let wanted = map(&[("A", "h:1"), ("C", "h:30"), ("D", "h:4")]);
        assert_eq!(
            shown(&difference(&members, &wanted)),
            ["-B", "+C@h:30", "+D@h:4"]
        );
    }

    #[test]
    fn the_same_membership_changes_nothing_and_from_nothing_adds_all() {
        let members = map(&[("A", "h:1"), ("B", "h:2")]);
        assert!(difference(&members, &members).is_empty());
        assert_eq!(
            shown(&difference(&HashMap::new(), &members)),
            ["+A@h:1", "+B@h:2"]
        );
        assert_eq!(shown(&difference(&members, &HashMap::new())), ["-A", "-B"]);
    }
}
