//! Health monitoring: one task per endpoint owns its state and its place in the rotation.
//!
//! The task watches `grpc.health.v1.Health/Watch` (the instance pushes every change), falls back
//! to `Check` every interval when `Watch` is UNIMPLEMENTED, and bounds every probe by a
//! timeout. Beside `Watch`, a `Check` every interval on the same connection catches a peer that
//! vanished silently (a quiet `Watch` looks the same as a dead link). These probes are calls,
//! not HTTP/2 PINGs: C-core and grpc-go servers close a connection that is pinged more often
//! than every 5 minutes without data (GOAWAY ENHANCE_YOUR_CALM "too_many_pings"), and a call's
//! answer is data, so an instance of any stack accepts a probe a second. A
//! connection failure of a real call ([`EndpointService`] wakes `eject`) takes the endpoint out at
//! once. The endpoint is in the balancer's ring exactly while its state is `Serving`, and it
//! comes back by itself when its health says SERVING again: nothing is evicted forever.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use dlb::events::EventLog;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::discover::Change;

use crate::conn::{Conn, ConnSettings};
use crate::endpoint::{EndpointService, EndpointStats, State};

/// Changes sent to the balancer.
pub type BalancerChanges =
    mpsc::UnboundedSender<Result<Change<Arc<str>, EndpointService>, Infallible>>;

/// How long a removed endpoint's connections stay open for calls still in flight on them.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(60);

/// Extra time after the last response headers, for response bodies and trailers.
const BODY_GRACE: Duration = Duration::from_secs(1);

/// Longest pause between reconnection attempts to an unreachable endpoint.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// One endpoint's monitor.
#[derive(Debug)]
pub struct Monitor {
    /// The endpoint's state and counters.
    pub stats: Arc<EndpointStats>,
    /// Where it is (HOST:PORT).
    pub addr: String,
    /// Probe timing and connections.
    pub settings: MonitorSettings,
    /// Where to insert and remove it.
    pub balancer: BalancerChanges,
    /// The event log (health changes, on change only).
    pub events: EventLog,
    /// Stops the monitor (the endpoint left the membership, or the gateway stops).
    pub cancel: CancellationToken,
}

/// How monitors are set up.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// Check polling interval, and the interval of the liveness `Check` beside `Watch`.
    pub interval: Duration,
    /// Bound on each probe and connection attempt.
    pub probe_timeout: Duration,
    /// HTTP/2 connections per endpoint.
    pub connections: usize,
    /// How long an endpoint with calls in flight may answer nothing before it is probed.
    pub stall_timeout: Duration,
    /// TLS towards instances, if on.
    pub tls: Option<dlb::tls::ClientTls>,
    /// The service named in health checks (`grpc.health.v1`): "" (the whole server) for the
    /// default pool, the pool's service for a routed one.
    pub health_service: String,
    /// The gateway's runtimes (see [`crate::runtimes`]).
    pub runtimes: usize,
}

/// Lazily connecting connections to `addr`, no I/O until first used: the monitor's own
/// channel (health `Watch`/`Check`) and the connections calls go over. `None` when the
/// address does not parse.
pub fn connect(addr: &str, settings: &MonitorSettings) -> Option<(Channel, Vec<Conn>)> {
    let channel = dlb::dial::endpoint_tls(addr, settings.tls.as_ref())
        .ok()?
        .connect_timeout(settings.probe_timeout)
        .connect_lazy();
    let conn_settings = ConnSettings {
        connect_timeout: settings.probe_timeout,
        tls: settings.tls.clone(),
        runtimes: settings.runtimes,
    };
    let conns = (0..settings.connections.max(1))
        .map(|_| Conn::new(addr, conn_settings.clone()).ok())
        .collect::<Option<Vec<_>>>()?;
    Some((channel, conns))
}

impl Monitor {
    /// Runs until cancelled, then takes the endpoint out of the ring.
    pub async fn run(self) {
        let Some(mut watcher) = Watcher::new(&self) else {
            tracing::error!(instance = %self.stats.id, addr = %self.addr, "invalid address");
            return;
        };
        let pause = self.settings.interval.min(MAX_RECONNECT_PAUSE);
        while !self.cancel.is_cancelled() {
            watcher.watch().await;
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.cancel.cancelled() => {}
            }
        }
        if watcher.in_ring {
            let _ = self
                .balancer
                .send(Ok(Change::Remove(Arc::clone(&self.stats.id))));
        }
        // Calls already sent keep running on these connections: hold them open until those
        // calls are done (bounded), or removing an instance would cut its in-flight calls.
        let _ = tokio::time::timeout(IN_FLIGHT_GRACE, async {
            while self.stats.snapshot().in_flight > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        tokio::time::sleep(BODY_GRACE).await;
        drop(watcher);
    }
}

struct Watcher<'a> {
    monitor: &'a Monitor,
    /// The monitor's own connection (health `Watch`/`Check`).
    channel: Channel,
    /// The connections calls go over (probed when calls stall).
    conns: Vec<Conn>,
    service: EndpointService,
    /// Cuts the calls in flight on `service` (the instance stopped answering).
    cut: CancellationToken,
    eject: Arc<Notify>,
    in_ring: bool,
    /// The state health (and connection failures) last gave it, before outlier ejection.
    health: State,
    /// Outlier ejections already told (events), so each is told once.
    ejections_told: u64,
}

fn state_of(status: ServingStatus) -> State {
    match status {
        ServingStatus::Serving => State::Serving,
        _ => State::NotServing,
    }
}

/// A change to the balancer's ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RingChange {
    Insert,
    Remove,
}

/// The ring invariant: an endpoint is in the ring exactly while its state is SERVING. What
/// must change for an endpoint now in `state`, in the ring or not.
fn ring_change(in_ring: bool, state: State) -> Option<RingChange> {
    match (in_ring, state == State::Serving) {
        (false, true) => Some(RingChange::Insert),
        (true, false) => Some(RingChange::Remove),
        _ => None,
    }
}

/// Why a watch ended early.
enum Stall {
    /// Still answering: keep going.
    Alive,
    /// Not answering: it was ejected and its calls cut.
    Dead,
}

impl<'a> Watcher<'a> {
    fn new(monitor: &'a Monitor) -> Option<Self> {
        let (channel, conns) = connect(&monitor.addr, &monitor.settings)?;
        let eject = Arc::new(Notify::new());
        let cut = CancellationToken::new();
        Some(Self {
            service: EndpointService::new(
                Arc::clone(&monitor.stats),
                conns.clone(),
                Arc::clone(&eject),
                cut.clone(),
            ),
            channel,
            conns,
            cut,
            eject,
            monitor,
            in_ring: false,
            health: State::Connecting,
            ejections_told: 0,
        })
    }

    /// Sets the state health gives it; while ejected as an outlier, SERVING still reads
    /// `Ejected` (out of the ring).
    fn set(&mut self, health: State) {
        self.health = health;
        let state = if health == State::Serving && self.monitor.stats.ejection().is_some() {
            State::Ejected
        } else {
            health
        };
        let m = self.monitor;
        let old = m.stats.set_state(state);
        if old != state {
            tracing::info!(instance = %m.stats.id, from = old.name(), to = state.name(), "health changed");
            m.events.health(
                "health changed",
                &[
                    ("instance", &m.stats.id),
                    ("from", old.name()),
                    ("to", state.name()),
                ],
            );
        }
        let id = Arc::clone(&m.stats.id);
        match ring_change(self.in_ring, state) {
            Some(RingChange::Insert) => {
                self.in_ring = true;
                self.service.clear_failed();
                let _ = m
                    .balancer
                    .send(Ok(Change::Insert(id, self.service.clone())));
            }
            Some(RingChange::Remove) => {
                self.in_ring = false;
                let _ = m.balancer.send(Ok(Change::Remove(id)));
            }
            None => {}
        }
    }

    /// An outlier ejection started or is due to end: out of the ring, or back on probation
    /// if health says SERVING; told once each.
    fn outlier_changed(&mut self) {
        let m = self.monitor;
        if m.stats.end_ejection_if_due() {
            tracing::info!(instance = %m.stats.id, "outlier back on probation");
            m.events.health(
                "outlier back on probation",
                &[("instance", &m.stats.id), ("health", self.health.name())],
            );
        } else if let Some(ejection) = m.stats.ejection() {
            let total = m.stats.snapshot().ejections;
            if total != self.ejections_told {
                self.ejections_told = total;
                m.events.health(
                    "outlier ejected",
                    &[
                        ("instance", &m.stats.id),
                        ("reason", &ejection.reason),
                        ("for_ms", &ejection.length.as_millis().to_string()),
                    ],
                );
            }
        }
        self.set(self.health);
    }

    /// Takes the endpoint out, fails its calls in flight (they are retried elsewhere), and
    /// starts over with new connections: the old ones may be stuck behind a dead link.
    fn cut_off(&mut self) {
        self.set(State::Ejected);
        self.cut.cancel();
        let Some((channel, conns)) = connect(&self.monitor.addr, &self.monitor.settings) else {
            return;
        };
        self.cut = CancellationToken::new();
        // A new generation: failures reported by the old connections must not eject it.
        self.eject = Arc::new(Notify::new());
        self.service = EndpointService::new(
            Arc::clone(&self.monitor.stats),
            conns.clone(),
            Arc::clone(&self.eject),
            self.cut.clone(),
        );
        self.channel = channel;
        self.conns = conns;
    }

    /// When calls have been waiting on the endpoint longer than the stall timeout with no
    /// answer: probes every connection; cuts the endpoint off if one does not answer.
    async fn check_stall(&mut self) -> Stall {
        let m = self.monitor;
        if m.stats
            .stalled_for()
            .is_none_or(|stalled| stalled < m.settings.stall_timeout)
        {
            return Stall::Alive;
        }
        // One probe per connection, at once: any one of them may be the stuck one.
        let mut probes = tokio::task::JoinSet::new();
        for conn in &self.conns {
            let conn = conn.clone();
            let timeout = m.settings.probe_timeout;
            probes.spawn(async move { conn.probe(timeout).await });
        }
        let all_answered = async {
            while let Some(answered) = probes.join_next().await {
                if !matches!(answered, Ok(true)) {
                    return false;
                }
            }
            true
        };
        let answered = tokio::select! {
            answered = all_answered => answered,
            () = m.cancel.cancelled() => return Stall::Alive,
        };
        if answered {
            m.stats.mark_progress();
            return Stall::Alive;
        }
        tracing::warn!(
            instance = %m.stats.id,
            in_flight = m.stats.snapshot().in_flight,
            "instance stopped answering (calls stalled, health probe unanswered); moving its calls"
        );
        m.events.health(
            "instance stopped answering",
            &[
                ("instance", &m.stats.id),
                ("action", "calls retried elsewhere"),
            ],
        );
        self.cut_off();
        Stall::Dead
    }

    /// Follows `Watch` until it ends, fails, or a call reports a connection failure.
    async fn watch(&mut self) {
        let m = self.monitor;
        let eject = Arc::clone(&self.eject);
        let mut client = HealthClient::new(self.channel.clone());
        let request = HealthCheckRequest {
            service: m.settings.health_service.clone(),
        };
        let opened = tokio::select! {
            opened = tokio::time::timeout(m.settings.probe_timeout, client.watch(request)) => opened,
            () = m.cancel.cancelled() => return,
        };
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                return self.poll_check().await;
            }
            _ => return self.unreachable(),
        };
        let mut stall_tick = stall_ticker(m.settings.stall_timeout);
        let mut alive_tick = liveness_ticker(m.settings.interval);
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(reply)) => self.set(state_of(reply.status())),
                    Ok(None) | Err(_) => return self.unreachable(),
                },
                _ = alive_tick.tick() => {
                    // Any answer will do (Watch says what the status is); none in time means
                    // the link or the instance is gone.
                    let request = HealthCheckRequest { service: m.settings.health_service.clone() };
                    let answered = tokio::select! {
                        answered = tokio::time::timeout(m.settings.probe_timeout, client.check(request)) => answered,
                        () = m.cancel.cancelled() => return,
                    };
                    if !matches!(answered, Ok(Ok(_))) {
                        tracing::debug!(instance = %m.stats.id, "liveness probe unanswered");
                        return self.unreachable();
                    }
                }
                _ = stall_tick.tick() => {
                    if let Stall::Dead = self.check_stall().await {
                        return;
                    }
                }
                () = eject.notified() => return self.set(State::Ejected),
                () = m.stats.outlier_change() => self.outlier_changed(),
                () = m.cancel.cancelled() => return,
            }
        }
    }

    /// For instances without `Watch`: `Check` every interval.
    async fn poll_check(&mut self) {
        let m = self.monitor;
        let eject = Arc::clone(&self.eject);
        let mut client = HealthClient::new(self.channel.clone());
        let mut tick = tokio::time::interval(m.settings.interval);
        let mut stall_tick = stall_ticker(m.settings.stall_timeout);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stall_tick.tick() => {
                    if let Stall::Dead = self.check_stall().await {
                        return;
                    }
                    continue;
                }
                () = eject.notified() => return self.set(State::Ejected),
                () = m.stats.outlier_change() => {
                    self.outlier_changed();
                    continue;
                }
                () = m.cancel.cancelled() => return,
            }
            let request = HealthCheckRequest {
                service: m.settings.health_service.clone(),
            };
            match tokio::time::timeout(m.settings.probe_timeout, client.check(request)).await {
                Ok(Ok(reply)) => self.set(state_of(reply.into_inner().status())),
                _ => return self.unreachable(),
            }
        }
    }

    fn unreachable(&mut self) {
        match self.monitor.stats.state() {
            // An endpoint never heard from stays "connecting" until it answers once.
            State::Connecting => self.set(State::Connecting),
            // It was answering: its connections may be stuck behind a dead link.
            _ => self.cut_off(),
        }
    }
}

/// Ticks every `interval` after the first, skipping missed ticks.
fn liveness_ticker(interval: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick
}

/// Ticks four times per stall timeout, skipping missed ticks.
fn stall_ticker(stall_timeout: Duration) -> tokio::time::Interval {
    let period = (stall_timeout / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_in_the_ring_exactly_while_serving() {
        let states = [
            State::Connecting,
            State::Serving,
            State::NotServing,
            State::Ejected,
            State::Draining,
        ];
        for state in states {
            for in_ring in [false, true] {
                let change = ring_change(in_ring, state);
                let after = match change {
                    Some(RingChange::Insert) => true,
                    Some(RingChange::Remove) => false,
                    None => in_ring,
                };
                assert_eq!(
                    after,
                    state == State::Serving,
                    "{state:?}, in ring {in_ring}"
                );
                // Nothing is sent when nothing changes.
                assert_eq!(
                    change.is_none(),
                    in_ring == after,
                    "{state:?}, in ring {in_ring}"
                );
            }
        }
    }
}
