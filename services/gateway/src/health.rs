//! Health monitoring: one task per endpoint owns its state and its place in the rotation.
//!
//! The task watches `grpc.health.v1.Health/Watch` (the instance pushes every change), falls back
//! to `Check` every interval when `Watch` is UNIMPLEMENTED, and bounds every probe by a
//! timeout. HTTP/2 keepalive on the connection catches a peer that vanished silently. A
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
    /// Its connections (the first also carries the probes).
    pub channels: Vec<Channel>,
    /// Where to insert and remove it.
    pub balancer: BalancerChanges,
    /// The event log (health changes, on change only).
    pub events: EventLog,
    /// `Check` polling interval.
    pub interval: Duration,
    /// Bound on every probe.
    pub probe_timeout: Duration,
    /// Stops the monitor (the endpoint left the membership, or the gateway stops).
    pub cancel: CancellationToken,
}

impl Monitor {
    /// Runs until cancelled, then takes the endpoint out of the ring.
    pub async fn run(self) {
        let eject = Arc::new(Notify::new());
        let mut watcher = Watcher {
            in_ring: false,
            service: EndpointService::new(
                Arc::clone(&self.stats),
                self.channels.clone(),
                Arc::clone(&eject),
            ),
            monitor: &self,
        };
        let pause = self.interval.min(MAX_RECONNECT_PAUSE);
        while !self.cancel.is_cancelled() {
            watcher.watch(&eject).await;
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
    service: EndpointService,
    in_ring: bool,
}

fn state_of(status: ServingStatus) -> State {
    match status {
        ServingStatus::Serving => State::Serving,
        _ => State::NotServing,
    }
}

impl Watcher<'_> {
    fn set(&mut self, state: State) {
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
        if state == State::Serving && !self.in_ring {
            self.in_ring = true;
            let _ = m
                .balancer
                .send(Ok(Change::Insert(id, self.service.clone())));
        } else if state != State::Serving && self.in_ring {
            self.in_ring = false;
            let _ = m.balancer.send(Ok(Change::Remove(id)));
        }
    }

    /// Follows `Watch` until it ends, fails, or a call reports a connection failure.
    async fn watch(&mut self, eject: &Notify) {
        let m = self.monitor;
        let mut client = HealthClient::new(m.channels[0].clone());
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let opened = tokio::select! {
            opened = tokio::time::timeout(m.probe_timeout, client.watch(request)) => opened,
            () = m.cancel.cancelled() => return,
        };
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                return self.poll_check(eject).await;
            }
            _ => return self.unreachable(),
        };
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(reply)) => self.set(state_of(reply.status())),
                    Ok(None) | Err(_) => return self.unreachable(),
                },
                () = eject.notified() => return self.set(State::Ejected),
                () = m.cancel.cancelled() => return,
            }
        }
    }

    /// For instances without `Watch`: `Check` every interval.
    async fn poll_check(&mut self, eject: &Notify) {
        let m = self.monitor;
        let mut client = HealthClient::new(m.channels[0].clone());
        let mut tick = tokio::time::interval(m.interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = eject.notified() => return self.set(State::Ejected),
                () = m.cancel.cancelled() => return,
            }
            let request = HealthCheckRequest {
                service: String::new(),
            };
            match tokio::time::timeout(m.probe_timeout, client.check(request)).await {
                Ok(Ok(reply)) => self.set(state_of(reply.into_inner().status())),
                _ => return self.unreachable(),
            }
        }
    }

    fn unreachable(&mut self) {
        // An endpoint never heard from stays "connecting" until it answers once.
        let next = match self.monitor.stats.state() {
            State::Connecting => State::Connecting,
            _ => State::Ejected,
        };
        self.set(next);
    }
}
