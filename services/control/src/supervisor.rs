//! The supervisor: every instance's lifecycle, and the only place that starts, signals and
//! reaps compute processes.
//!
//! Each instance is a [`Slot`] in one map behind a mutex. A start spawns the process, and a
//! waiter task owns the child until it exits; the waiter decides what the exit means: `stopped`
//! when a stop was asked for, `crashed` otherwise (then, with `--restart on-failure`, a
//! restart after a backoff). Every change publishes a new snapshot on a watch channel, which
//! `WatchInstances` streams to the gateway.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlb::events::EventLog;
use dlb::proto::v1::{
    GetLoadRequest, Instance, InstanceList, InstanceState, load_client::LoadClient,
};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::config::{Config, Restart, instance_id};
use crate::process::{self, StderrTail};

/// Linux reports CPU in USER_HZ ticks, fixed at 100 per second by the kernel ABI.
const TICKS_PER_SECOND: f64 = 100.0;

/// Why an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No instance has this id.
    #[error("unknown instance {id:?}; known: {known} (ListInstances shows them)")]
    NotFound {
        /// The id asked for.
        id: String,
        /// The ids there are.
        known: String,
    },
    /// The instance cannot do that in its state.
    #[error("instance {id} is {state}; {hint}")]
    Busy {
        /// The instance.
        id: String,
        /// Its state.
        state: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// It did not start.
    #[error("instance {id} did not start: {reason}")]
    StartFailed {
        /// The instance.
        id: String,
        /// Why.
        reason: String,
    },
}

#[derive(Debug)]
struct Slot {
    id: String,
    /// The address it serves on; fixed after its first start.
    listen: String,
    state: InstanceState,
    pid: u32,
    /// Which spawn of this slot is current; a waiter of an older one changes nothing.
    generation: u64,
    serving_since: Option<Instant>,
    restarts: u32,
    last_error: String,
    /// A stop was asked for: an exit is not a crash.
    stopping: bool,
    /// Removal was asked for: do not restart.
    removed: bool,
    cpu_sample: Option<(Instant, u64)>,
    cpu_percent: f64,
    rss_bytes: u64,
}

impl Slot {
    /// As reported; `advertise_host` replaces the host it listens on.
    fn snapshot_as(&self, advertise_host: Option<&str>) -> Instance {
        let address = match (advertise_host, self.listen.rsplit_once(':')) {
            (Some(host), Some((_, port))) if host.parse::<std::net::Ipv6Addr>().is_ok() => {
                format!("[{host}]:{port}")
            }
            (Some(host), Some((_, port))) => format!("{host}:{port}"),
            _ => self.listen.clone(),
        };
        Instance {
            id: self.id.clone(),
            address,
            state: self.state.into(),
            pid: self.pid,
            uptime_ms: self.serving_since.map_or(0, |t| {
                u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
            }),
            restarts: self.restarts,
            cpu_percent: self.cpu_percent,
            rss_bytes: self.rss_bytes,
            last_error: self.last_error.clone(),
        }
    }
}

fn state_name(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Starting => "starting",
        InstanceState::Serving => "serving",
        InstanceState::Draining => "draining",
        InstanceState::Stopped => "stopped",
        InstanceState::Crashed => "crashed",
        InstanceState::Unspecified => "unknown",
    }
}

/// The supervisor. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bin: PathBuf,
    first_port: u16,
    redis: String,
    id_prefix: String,
    instance_args: Vec<String>,
    instance_host: std::net::IpAddr,
    advertise_host: Option<String>,
    /// Instances register themselves: a stop skips waiting on the gateways (they follow the
    /// registry, which the instance leaves when it gets SIGTERM).
    register: bool,
    tls: Option<dlb::tls::ClientTls>,
    restart: Restart,
    start_timeout: Duration,
    drain_timeout: Duration,
    grace: Duration,
    slots: Mutex<BTreeMap<String, Slot>>,
    /// Slot order of creation, for the next id.
    next_index: Mutex<usize>,
    snapshots: watch::Sender<InstanceList>,
    events: EventLog,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Supervisor {
    fn snapshot_of(&self, slot: &Slot) -> Instance {
        slot.snapshot_as(self.inner.advertise_host.as_deref())
    }

    /// A supervisor with no instances yet.
    pub fn new(
        config: &Config,
        events: EventLog,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let (snapshots, _) = watch::channel(InstanceList::default());
        Self {
            inner: Arc::new(Inner {
                bin: config.compute_bin(),
                first_port: config.first_port,
                redis: config.events.redis.clone(),
                id_prefix: config.id_prefix.clone(),
                instance_args: config.instance_args(),
                instance_host: config.instance_host,
                advertise_host: config.advertise_host.clone(),
                register: config.register,
                tls: config
                    .tls
                    .load()
                    .ok()
                    .flatten()
                    .and_then(|tls| tls.client()),
                restart: config.restart,
                start_timeout: config.start_timeout(),
                drain_timeout: config.drain_timeout(),
                grace: config.grace_period(),
                slots: Mutex::new(BTreeMap::new()),
                next_index: Mutex::new(0),
                snapshots,
                events,
                cancel,
                tracker,
            }),
        }
    }

    /// Every instance now.
    pub async fn list(&self) -> InstanceList {
        let slots = self.inner.slots.lock().await;
        InstanceList {
            instances: slots.values().map(|slot| self.snapshot_of(slot)).collect(),
        }
    }

    /// Snapshots, the current one first.
    pub fn subscribe(&self) -> watch::Receiver<InstanceList> {
        self.inner.snapshots.subscribe()
    }

    async fn publish(&self, slots: &BTreeMap<String, Slot>) {
        self.inner.snapshots.send_replace(InstanceList {
            instances: slots.values().map(|slot| self.snapshot_of(slot)).collect(),
        });
    }

    async fn not_found(&self, id: &str) -> ControlError {
        let slots = self.inner.slots.lock().await;
        ControlError::NotFound {
            id: id.to_owned(),
            known: slots.keys().cloned().collect::<Vec<_>>().join(", "),
        }
    }

    /// Creates a new instance with the next id and port, and starts it.
    ///
    /// # Errors
    ///
    /// [`ControlError::StartFailed`] when it does not reach SERVING.
    pub async fn add(&self) -> Result<Instance, ControlError> {
        let id = {
            let mut next = self.inner.next_index.lock().await;
            let mut slots = self.inner.slots.lock().await;
            let (index, id) = loop {
                let id = format!("{}{}", self.inner.id_prefix, instance_id(*next));
                *next += 1;
                if !slots.contains_key(&id) {
                    break (*next - 1, id);
                }
            };
            let port = if self.inner.first_port == 0 {
                0
            } else {
                self.inner
                    .first_port
                    .saturating_add(u16::try_from(index).unwrap_or(u16::MAX))
            };
            slots.insert(
                id.clone(),
                Slot {
                    id: id.clone(),
                    listen: std::net::SocketAddr::new(self.inner.instance_host, port).to_string(),
                    state: InstanceState::Stopped,
                    pid: 0,
                    generation: 0,
                    serving_since: None,
                    restarts: 0,
                    last_error: String::new(),
                    stopping: false,
                    removed: false,
                    cpu_sample: None,
                    cpu_percent: 0.0,
                    rss_bytes: 0,
                },
            );
            self.publish(&slots).await;
            id
        };
        self.start(&id).await
    }

    /// Starts an instance and waits until its health says SERVING. Idempotent for a running one.
    ///
    /// # Errors
    ///
    /// [`ControlError`] when unknown, draining, or it does not start.
    // Boxed: a crash restart calls `start` from a task that `start` itself spawned, and the
    // compiler cannot prove such a recursive future `Send` through an opaque type.
    pub fn start<'a>(
        &'a self,
        id: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Instance, ControlError>> + Send + 'a>,
    > {
        Box::pin(self.start_inner(id))
    }

    async fn start_inner(&self, id: &str) -> Result<Instance, ControlError> {
        let (listen, generation) = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                drop(slots);
                return Err(self.not_found(id).await);
            };
            match slot.state {
                InstanceState::Serving | InstanceState::Starting => {
                    return Ok(self.snapshot_of(slot));
                }
                InstanceState::Draining => {
                    return Err(ControlError::Busy {
                        id: id.to_owned(),
                        state: "draining",
                        hint: "wait until it has stopped, then start it again",
                    });
                }
                _ => {}
            }
            slot.state = InstanceState::Starting;
            slot.stopping = false;
            slot.generation += 1;
            slot.last_error.clear();
            let out = (slot.listen.clone(), slot.generation);
            self.publish(&slots).await;
            out
        };
        let spawned = tokio::time::timeout(
            self.inner.start_timeout,
            process::spawn(
                &self.inner.bin,
                id,
                &listen,
                &self.inner.redis,
                &self.inner.instance_args,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            // Dropping the spawn future kills the child (kill_on_drop).
            Err(process::SpawnError::Exited {
                stderr: format!("no address reported within {:?}", self.inner.start_timeout),
            })
        });
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                let reason = error.to_string();
                self.fail_start(id, generation, &reason).await;
                return Err(ControlError::StartFailed {
                    id: id.to_owned(),
                    reason,
                });
            }
        };
        {
            let mut slots = self.inner.slots.lock().await;
            match slots.get_mut(id) {
                Some(slot) if slot.generation == generation && !slot.stopping => {
                    slot.pid = spawned.pid;
                    slot.listen = spawned.addr.clone();
                }
                // Stopped or removed while the process was being spawned: it must not run.
                _ => {
                    drop(slots);
                    let mut child = spawned.child;
                    let _ = child.kill().await;
                    return Err(ControlError::StartFailed {
                        id: id.to_owned(),
                        reason: "stopped while starting".to_owned(),
                    });
                }
            }
            self.publish(&slots).await;
        }
        let addr = spawned.addr.clone();
        let stderr = spawned.stderr.clone();
        let this = self.clone();
        let id_owned = id.to_owned();
        let mut child = spawned.child;
        self.inner.tracker.spawn(async move {
            let status = child.wait().await;
            this.exited(&id_owned, generation, status, &stderr).await;
        });

        match tokio::time::timeout(
            self.inner.start_timeout,
            self.wait_serving(id, generation, &addr),
        )
        .await
        {
            Ok(true) => {}
            _ => {
                let reason = format!(
                    "no SERVING health within {:?} at {addr}",
                    self.inner.start_timeout
                );
                self.fail_start(id, generation, &reason).await;
                return Err(ControlError::StartFailed {
                    id: id.to_owned(),
                    reason,
                });
            }
        }
        let mut slots = self.inner.slots.lock().await;
        let Some(slot) = slots.get_mut(id) else {
            return Err(ControlError::StartFailed {
                id: id.to_owned(),
                reason: "removed while starting".to_owned(),
            });
        };
        if slot.generation != generation || slot.state != InstanceState::Starting {
            let reason = if slot.last_error.is_empty() {
                format!("it is {} now", state_name(slot.state))
            } else {
                slot.last_error.clone()
            };
            return Err(ControlError::StartFailed {
                id: id.to_owned(),
                reason,
            });
        }
        slot.state = InstanceState::Serving;
        slot.serving_since = Some(Instant::now());
        let snapshot = self.snapshot_of(slot);
        self.publish(&slots).await;
        drop(slots);
        tracing::info!(instance = id, addr = %addr, "instance started");
        self.inner
            .events
            .lifecycle("started", &[("instance", id), ("addr", &addr)]);
        Ok(snapshot)
    }

    /// Polls health until SERVING; false once this start is no longer current (the process
    /// exited, or it was stopped or removed).
    async fn wait_serving(&self, id: &str, generation: u64, addr: &str) -> bool {
        let addr = &dialable(addr);
        let Ok(endpoint) = dlb::dial::endpoint_tls(addr, self.inner.tls.as_ref()) else {
            return false;
        };
        let channel = endpoint.connect_lazy();
        let mut client = HealthClient::new(channel);
        loop {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_secs(1), client.check(request)).await
                && reply.into_inner().status() == ServingStatus::Serving
            {
                return true;
            }
            let current = self.inner.slots.lock().await.get(id).is_some_and(|slot| {
                slot.generation == generation
                    && slot.state == InstanceState::Starting
                    && !slot.stopping
            });
            if !current {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn fail_start(&self, id: &str, generation: u64, reason: &str) {
        let pid = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                return;
            };
            if slot.generation != generation {
                return;
            }
            slot.state = InstanceState::Crashed;
            slot.stopping = true; // its exit, if it is still running, is expected now
            slot.last_error = reason.to_owned();
            let pid = slot.pid;
            self.publish(&slots).await;
            pid
        };
        if pid != 0 {
            process::signal(pid, true);
        }
        tracing::warn!(instance = id, reason, "instance did not start");
        self.inner
            .events
            .error("start failed", &[("instance", id), ("reason", reason)]);
    }

    /// The waiter's verdict on an exit.
    async fn exited(
        &self,
        id: &str,
        generation: u64,
        status: std::io::Result<std::process::ExitStatus>,
        stderr: &StderrTail,
    ) {
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let restart = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                return;
            };
            if slot.generation != generation {
                return;
            }
            slot.pid = 0;
            slot.serving_since = None;
            slot.cpu_sample = None;
            slot.cpu_percent = 0.0;
            slot.rss_bytes = 0;
            let restart = if slot.stopping {
                if slot.state != InstanceState::Crashed {
                    slot.state = InstanceState::Stopped;
                }
                false
            } else {
                slot.state = InstanceState::Crashed;
                let said = stderr.text();
                slot.last_error = if said.is_empty() {
                    format!("exited: {status}")
                } else {
                    format!("exited: {status}: {said}")
                };
                !slot.removed && self.inner.restart == Restart::OnFailure
            };
            let crashed = slot.state == InstanceState::Crashed && !slot.stopping;
            let restarts = slot.restarts;
            self.publish(&slots).await;
            drop(slots);
            if crashed {
                tracing::warn!(instance = id, %status, "instance crashed");
                self.inner
                    .events
                    .lifecycle("crashed", &[("instance", id), ("status", &status)]);
            } else {
                tracing::info!(instance = id, "instance stopped");
                self.inner.events.lifecycle("stopped", &[("instance", id)]);
            }
            restart.then_some(restarts)
        };
        if let Some(restarts) = restart {
            let backoff = Duration::from_millis(500)
                .saturating_mul(1 << restarts.min(5))
                .min(Duration::from_secs(10));
            let this = self.clone();
            let id = id.to_owned();
            let cancel = self.inner.cancel.clone();
            self.inner.tracker.spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => return,
                }
                {
                    let mut slots = this.inner.slots.lock().await;
                    match slots.get_mut(&id) {
                        Some(slot)
                            if slot.state == InstanceState::Crashed
                                && !slot.removed
                                && !slot.stopping =>
                        {
                            slot.restarts += 1;
                        }
                        _ => return,
                    }
                }
                if this.start(&id).await.is_ok() {
                    this.inner
                        .events
                        .lifecycle("restarted", &[("instance", &id)]);
                }
            });
        }
    }

    /// Stops an instance: drain (out of rotation, wait for in-flight calls, SIGTERM, SIGKILL
    /// after the grace period), or SIGKILL at once with `force`. Returns once it has exited.
    ///
    /// # Errors
    ///
    /// [`ControlError::NotFound`] for an unknown id.
    pub async fn stop(&self, id: &str, force: bool) -> Result<Instance, ControlError> {
        let (pid, generation, addr) = {
            let mut slots = self.inner.slots.lock().await;
            let Some(slot) = slots.get_mut(id) else {
                drop(slots);
                return Err(self.not_found(id).await);
            };
            slot.stopping = true;
            if slot.pid == 0 {
                // Crashed and waiting to restart, or still being spawned: neither may come up.
                if slot.state != InstanceState::Stopped {
                    slot.state = InstanceState::Stopped;
                    slot.serving_since = None;
                }
                let snapshot = self.snapshot_of(slot);
                self.publish(&slots).await;
                return Ok(snapshot);
            }
            if !force {
                // A kill does not drain: the instance stays as it is until it is gone (then
                // stopped), so nobody reads a kill as a drain.
                slot.state = InstanceState::Draining;
            }
            let out = (slot.pid, slot.generation, slot.listen.clone());
            self.publish(&slots).await;
            out
        };
        tracing::info!(instance = id, force, "stopping instance");
        self.inner.events.lifecycle(
            if force { "killing" } else { "draining" },
            &[("instance", id)],
        );
        if force {
            process::signal(pid, true);
        } else {
            // The gateway takes it out of rotation from the snapshot just published; calls
            // already there finish first. A registered instance leaves the registry itself on
            // SIGTERM, before it drains: no waiting here.
            if !self.inner.register {
                let _ = tokio::time::timeout(
                    self.inner.drain_timeout,
                    wait_idle(&addr, self.inner.tls.as_ref()),
                )
                .await;
            }
            if self.still_running(id, generation, pid).await {
                process::signal(pid, false);
            }
        }
        let mut snapshots = self.subscribe();
        let exited = tokio::time::timeout(self.inner.grace, async {
            loop {
                let gone = snapshots
                    .borrow_and_update()
                    .instances
                    .iter()
                    .any(|i| i.id == id && i.pid == 0);
                if gone {
                    return;
                }
                if snapshots.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if exited.is_err() {
            tracing::warn!(instance = id, "grace period over; killing");
            if self.still_running(id, generation, pid).await {
                process::signal(pid, true);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if snapshots
                        .borrow_and_update()
                        .instances
                        .iter()
                        .any(|i| i.id == id && i.pid == 0)
                    {
                        return;
                    }
                    if snapshots.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
        }
        let slots = self.inner.slots.lock().await;
        match slots.get(id) {
            Some(slot) => Ok(self.snapshot_of(slot)),
            None => Err(ControlError::NotFound {
                id: id.to_owned(),
                known: slots.keys().cloned().collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Is `pid` still this slot's live process (so signalling it cannot hit a reused pid)?
    async fn still_running(&self, id: &str, generation: u64, pid: u32) -> bool {
        self.inner
            .slots
            .lock()
            .await
            .get(id)
            .is_some_and(|slot| slot.generation == generation && slot.pid == pid && pid != 0)
    }

    /// Drains an instance if it runs, then forgets it.
    ///
    /// # Errors
    ///
    /// [`ControlError::NotFound`] for an unknown id.
    pub async fn remove(&self, id: &str) -> Result<(), ControlError> {
        {
            let mut slots = self.inner.slots.lock().await;
            match slots.get_mut(id) {
                Some(slot) => slot.removed = true,
                None => {
                    drop(slots);
                    return Err(self.not_found(id).await);
                }
            }
        }
        self.stop(id, false).await?;
        let mut slots = self.inner.slots.lock().await;
        slots.remove(id);
        self.publish(&slots).await;
        drop(slots);
        self.inner.events.lifecycle("removed", &[("instance", id)]);
        Ok(())
    }

    /// Stops every running instance (draining), for shutdown.
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.inner.slots.lock().await.keys().cloned().collect();
        let stops: Vec<_> = ids
            .iter()
            .map(|id| {
                let this = self.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let _ = this.stop(&id, false).await;
                })
            })
            .collect();
        for stop in stops {
            let _ = stop.await;
        }
    }

    /// Samples CPU and memory of every running instance; about once a second.
    pub async fn sample_usage(&self) {
        let mut slots = self.inner.slots.lock().await;
        let now = Instant::now();
        for slot in slots.values_mut() {
            if slot.pid == 0 {
                continue;
            }
            if let Some((ticks, rss)) = process::usage(slot.pid) {
                if let Some((then, before)) = slot.cpu_sample {
                    let secs = now.duration_since(then).as_secs_f64();
                    if secs > 0.0 {
                        slot.cpu_percent =
                            (ticks.saturating_sub(before) as f64 / TICKS_PER_SECOND) / secs * 100.0;
                    }
                }
                slot.cpu_sample = Some((now, ticks));
                slot.rss_bytes = rss;
            }
        }
    }
}

/// Waits until the instance at `addr` reports no calls in flight (or cannot be asked).
/// Where control reaches an instance on its own host: loopback for a wildcard listen address
/// (which is also a name its certificate has).
fn dialable(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(socket) if socket.ip().is_unspecified() => {
            let loopback: std::net::IpAddr = if socket.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(loopback, socket.port()).to_string()
        }
        _ => addr.to_owned(),
    }
}

async fn wait_idle(addr: &str, tls: Option<&dlb::tls::ClientTls>) {
    let addr = &dialable(addr);
    let Ok(endpoint) = dlb::dial::endpoint_tls(addr, tls) else {
        return;
    };
    let mut load = LoadClient::new(endpoint.connect_lazy());
    loop {
        match load.get_load(GetLoadRequest {}).await {
            Ok(report) if report.get_ref().in_flight > 0 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => return,
        }
    }
}
