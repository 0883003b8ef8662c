//! The supervisor: every instance's lifecycle, and the only place that starts, signals and
//! reaps compute processes.
//!
//! Each instance is a [`Slot`] in one map behind a mutex. A start spawns the process, and a
//! waiter task owns the child until it exits; the waiter decides what the exit means: `stopped`
//! when a stop was asked for, `crashed` otherwise (then, with `--restart on-failure`, a
//! restart after a backoff). Every change publishes a new snapshot on a watch channel, which
//! `WatchInstances` streams to the gateway.

mod lifecycle;

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
    /// When CPU time was last sampled, and the CPU time (µs) then.
    cpu_sample: Option<(Instant, u64)>,
    cpu_percent: f64,
    rss_bytes: u64,
}

/// What an instance's exit means (see [`Slot::exited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// It was asked to stop (or was already reported crashed while stopping).
    Stopped,
    /// Nobody asked: a crash, restarted after a backoff when `restart` says so.
    Crashed { restart: bool },
}

impl Slot {
    /// A slot for instance `id` on `listen`, stopped, never started.
    fn new(id: String, listen: String) -> Self {
        Self {
            id,
            listen,
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
        }
    }

    /// The transition when the current process exits with `status` (its last stderr lines
    /// `said`): STOPPED after a stop was asked, else CRASHED with the reason, restarted under
    /// `--restart on-failure` unless it is being removed.
    fn exited(&mut self, status: &str, said: &str, restart: Restart) -> Exit {
        self.pid = 0;
        self.serving_since = None;
        self.cpu_sample = None;
        self.cpu_percent = 0.0;
        self.rss_bytes = 0;
        if self.stopping {
            if self.state != InstanceState::Crashed {
                self.state = InstanceState::Stopped;
            }
            return Exit::Stopped;
        }
        self.state = InstanceState::Crashed;
        self.last_error = if said.is_empty() {
            format!("exited: {status}")
        } else {
            format!("exited: {status}: {said}")
        };
        Exit::Crashed {
            restart: !self.removed && restart == Restart::OnFailure,
        }
    }

    /// Whether a restart planned after a crash should still happen (nobody started, stopped
    /// or removed it meanwhile).
    fn still_crashed(&self) -> bool {
        self.state == InstanceState::Crashed && !self.removed && !self.stopping
    }

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

/// How long to wait before the restart that follows `restarts` earlier ones: 0.5 s doubling,
/// at most 10 s.
fn restart_backoff(restarts: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1 << restarts.min(5))
        .min(Duration::from_secs(10))
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
                Slot::new(
                    id.clone(),
                    std::net::SocketAddr::new(self.inner.instance_host, port).to_string(),
                ),
            );
            self.publish(&slots).await;
            id
        };
        match self.start(&id).await {
            Ok(instance) => Ok(instance),
            Err(error) => {
                // An add that fails adds nothing: a caller who retries it must not collect
                // dead entries to remove by hand. (Its events say it was added, crashed and
                // removed.)
                let _ = self.remove(&id).await;
                Err(error)
            }
        }
    }

    /// Starts an instance and waits until its health says SERVING. Idempotent for a running one.
    ///
    /// # Errors
    ///
    /// [`ControlError`] when unknown, draining, or it does not start.
    // Boxed: a crash restart calls `start` from a task that `start` itself spawned, and the
    // compiler cannot prove such a recursive future `Send` through an opaque type.
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
            if let Some(usage) = dlb::procfs::Usage::of(slot.pid) {
                if let Some((then, before)) = slot.cpu_sample {
                    let micros = now.duration_since(then).as_micros() as f64;
                    if micros > 0.0 {
                        slot.cpu_percent =
                            usage.cpu_micros.saturating_sub(before) as f64 / micros * 100.0;
                    }
                }
                slot.cpu_sample = Some((now, usage.cpu_micros));
                slot.rss_bytes = usage.rss_bytes;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn running(id: &str) -> Slot {
        let mut slot = Slot::new(id.to_owned(), "127.0.0.1:13001".to_owned());
        slot.state = InstanceState::Serving;
        slot.pid = 4242;
        slot.serving_since = Some(Instant::now());
        slot.rss_bytes = 1 << 20;
        slot
    }

    #[test]
    fn an_exit_nobody_asked_for_is_a_crash_with_its_reason_and_a_restart() {
        let mut slot = running("A");
        let exit = slot.exited("signal: 9 (SIGKILL)", "", Restart::OnFailure);
        assert_eq!(exit, Exit::Crashed { restart: true });
        assert_eq!(slot.state, InstanceState::Crashed);
        assert_eq!(slot.last_error, "exited: signal: 9 (SIGKILL)");
        assert_eq!((slot.pid, slot.rss_bytes, slot.serving_since), (0, 0, None));
        assert!(slot.still_crashed());

        let mut slot = running("B");
        let exit = slot.exited("exit status: 1", "port taken", Restart::Never);
        assert_eq!(exit, Exit::Crashed { restart: false });
        assert_eq!(slot.last_error, "exited: exit status: 1: port taken");
    }

    #[test]
    fn an_exit_after_a_stop_is_stopped_and_never_restarted() {
        let mut slot = running("A");
        slot.stopping = true;
        assert_eq!(
            slot.exited("exit status: 0", "", Restart::OnFailure),
            Exit::Stopped
        );
        assert_eq!(slot.state, InstanceState::Stopped);
        assert!(slot.last_error.is_empty());
        assert!(!slot.still_crashed());
    }

    #[test]
    fn a_removed_instance_that_crashes_is_not_restarted() {
        let mut slot = running("A");
        slot.removed = true;
        assert_eq!(
            slot.exited("signal: 11 (SIGSEGV)", "", Restart::OnFailure),
            Exit::Crashed { restart: false }
        );
        assert!(!slot.still_crashed());
    }

    #[test]
    fn a_restart_is_called_off_once_someone_starts_or_stops_it() {
        let mut slot = running("A");
        slot.exited("signal: 9 (SIGKILL)", "", Restart::OnFailure);
        slot.state = InstanceState::Starting;
        assert!(!slot.still_crashed());
    }

    #[test]
    fn restart_backoff_doubles_from_half_a_second_up_to_ten() {
        let backoffs: Vec<u64> = (0..8)
            .map(|n| restart_backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(
            backoffs,
            [500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
        );
    }
}
