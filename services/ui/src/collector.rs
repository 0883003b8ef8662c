//! The dashboard's picture of the mesh, kept current by background loops:
//!
//! - control's `WatchInstances` stream: lifecycle state of each instance, and the trail of its
//!   transitions (so a drain reads `serving → draining → stopped` even when it took 50 ms);
//! - the gateway's `Stats`, every `--refresh-ms`: health as the gateway sees it, requests,
//!   rate, latency, errors, in flight; the rate also feeds a five-minute history per instance;
//! - Redis pub/sub `lb_logs:live`: every event as it is written, passed on to the pages.
//!
//! Each loop reports whether its source answers; a source that does not is shown as a banner
//! and the rest keeps working. Every change publishes a new [`Snapshot`] on a watch channel,
//! which the pages' event streams follow.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dlb::events::reader::EventReader;
use dlb::events::{Event, time::now_ms};
use dlb::proto::v1::control_client::ControlClient;
use dlb::proto::v1::gateway_client::GatewayClient;
use dlb::proto::v1::{
    Instance, InstanceState, ListInstancesRequest, StatsRequest, StatsResponse,
    WatchInstancesRequest,
};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Transitions kept per instance.
pub const TRAIL_LEN: usize = 8;

/// How far back the throughput history goes.
pub const HISTORY_MS: u64 = 5 * 60 * 1000;

/// Most throughput samples kept per instance (five minutes at the fastest refresh, 50 ms).
pub const HISTORY_MAX_POINTS: usize = 6_000;

/// Longest wait between reconnection attempts to control or Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Live messages the pages receive besides snapshots.
#[derive(Debug, Clone)]
pub enum Live {
    /// An event just written to the log.
    Event(Arc<Event>),
    /// The tail was (re)connected and may have missed events: read the latest again.
    Resync,
}

/// Whether one source of the dashboard answers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Source {
    /// Where it is.
    pub addr: String,
    /// `ok`, `down`, `connecting` or `off` (not configured).
    pub state: &'static str,
    /// Why it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
    /// Down because it stopped answering while its connection stayed open (control: see
    /// [`CONTROL_MISSES`]), so an answer is what brings it back.
    #[serde(skip)]
    quiet: bool,
}

impl Source {
    fn new(addr: &str, state: &'static str) -> Self {
        Self {
            addr: addr.to_owned(),
            state,
            error: None,
            since_ms: now_ms(),
            quiet: false,
        }
    }

    /// Control's listing missed `misses` times in a row: down (quiet) at [`CONTROL_MISSES`],
    /// only over a control that looked fine (one whose stream broke is down with that
    /// reason). True when it went down now.
    fn listing_missed(&mut self, misses: u32, error: String) -> bool {
        if misses >= CONTROL_MISSES && self.state == "ok" {
            self.set("down", Some(error));
            self.quiet = true;
            return true;
        }
        false
    }

    /// Control's listing answered: a control down for not answering is back (a broken
    /// stream is not: its return says so).
    fn listing_answered(&mut self) {
        if self.quiet {
            self.quiet = false;
            self.set("ok", None);
        }
    }

    /// Its stream delivered (`None`) or broke (`Some(why)`). True when that is news.
    fn stream(&mut self, broke: Option<String>) -> bool {
        self.quiet = false;
        match broke {
            None => self.set("ok", None),
            Some(error) => self.set("down", Some(error)),
        }
    }

    fn set(&mut self, state: &'static str, error: Option<String>) -> bool {
        if self.state == state && self.error == error {
            return false;
        }
        if self.state != state {
            self.since_ms = now_ms();
        }
        self.state = state;
        self.error = error;
        true
    }
}

/// The three sources.
#[derive(Debug, Clone, Serialize)]
pub struct Sources {
    /// The gateway (stats and operations).
    pub gateway: Source,
    /// Control (lifecycle).
    pub control: Source,
    /// Redis (event log).
    pub redis: Source,
}

/// One lifecycle state change of an instance.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Transition {
    /// The new state.
    pub state: String,
    /// When the dashboard saw it (ms since the epoch).
    pub at_ms: u64,
}

/// One instance as the page shows it: control's view merged with the gateway's.
#[derive(Debug, Clone, Serialize, Default)]
pub struct InstanceView {
    /// Instance id.
    pub id: String,
    /// Its gRPC address.
    pub address: String,
    /// Lifecycle state from control (`starting`, `serving`, `draining`, `stopped`, `crashed`),
    /// or `None` when control does not know it or cannot be reached.
    pub state: Option<String>,
    /// Health as the gateway sees it (`serving`, `not_serving`, `ejected`, `connecting`,
    /// `draining`), or `None` when it is not in the gateway's membership.
    pub health: Option<String>,
    /// Since when the gateway has seen that health (ms since the epoch).
    pub health_since_ms: Option<u64>,
    /// Why the gateway ejected it as an outlier ("5 x INTERNAL in a row"), while it is.
    pub ejection: Option<String>,
    /// When that ejection ends (ms since the epoch).
    pub back_at_ms: Option<u64>,
    /// Calls the gateway sent it.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// In flight now.
    pub in_flight: u64,
    /// Calls per second, recent.
    pub rate: f64,
    /// Recent median latency, microseconds.
    pub p50_us: f64,
    /// Recent 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Process id (control).
    pub pid: u32,
    /// Uptime, ms (control).
    pub uptime_ms: u64,
    /// Restarts (control).
    pub restarts: u32,
    /// CPU use, percent of one core (control).
    pub cpu_percent: f64,
    /// Resident memory, bytes (control).
    pub rss_bytes: u64,
    /// Why it last failed (control).
    pub last_error: String,
    /// Latest lifecycle transitions, oldest first.
    pub trail: Vec<Transition>,
}

/// The gateway's settings and totals.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayView {
    /// Balancing policy.
    pub policy: String,
    /// Calls in flight now.
    pub in_flight: u64,
    /// Bound on calls in flight.
    pub max_in_flight: u64,
    /// Calls received.
    pub requests: u64,
    /// Retries made.
    pub retries: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Health probe interval, ms.
    pub health_interval_ms: u64,
    /// Health probe timeout, ms.
    pub probe_timeout_ms: u64,
    /// Events the gateway wrote to Redis.
    pub events_written: u64,
    /// Events the gateway dropped (Redis away too long).
    pub events_dropped: u64,
    /// Calls by method (every service the gateway relays).
    pub methods: Vec<MethodView>,
}

/// One method's calls, as the gateway counts them.
#[derive(Debug, Clone, Serialize)]
pub struct MethodView {
    /// `/package.Service/Method`, or `other`.
    pub method: String,
    /// The pool its calls go to.
    pub pool: String,
    /// Calls finished, and those that failed.
    pub calls: u64,
    /// Calls that ended with a status other than OK.
    pub failures: u64,
    /// Messages from callers, and to them.
    pub messages_in: u64,
    /// Messages to callers.
    pub messages_out: u64,
    /// Mean duration, microseconds.
    pub mean_duration_us: f64,
}

/// Everything the page shows except the events.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// When it was taken (ms since the epoch).
    pub at_ms: u64,
    /// Instances by id.
    pub instances: Vec<InstanceView>,
    /// The gateway's settings and totals, when it answers.
    pub gateway: Option<GatewayView>,
    /// Whether each source answers.
    pub sources: Sources,
    /// Whether instances can be started and stopped from here.
    pub control_enabled: bool,
    /// Changes when the dashboard restarts (the page then reloads for its new CSRF token).
    pub boot_id: String,
}

/// One throughput sample.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RatePoint {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Calls per second.
    pub rate: f64,
}

#[derive(Debug)]
struct Model {
    boot_id: String,
    sources: Sources,
    control_enabled: bool,
    instances: Vec<Instance>,
    stats: Option<StatsResponse>,
    trails: BTreeMap<String, VecDeque<Transition>>,
    history: BTreeMap<String, VecDeque<RatePoint>>,
    /// The gateway's last totals (requests, errors) of each instance control lists, kept
    /// while the gateway does not list it (stopped): its row keeps its totals.
    last_counts: BTreeMap<String, (u64, u64)>,
    /// Instances this dashboard asked control to kill: their next `stopped` is `killed`.
    killing: BTreeSet<String>,
}

impl Model {
    fn snapshot(&self) -> Snapshot {
        let mut views: BTreeMap<String, InstanceView> = BTreeMap::new();
        for instance in &self.instances {
            let view = views.entry(instance.id.clone()).or_default();
            view.id.clone_from(&instance.id);
            view.address.clone_from(&instance.address);
            view.state = Some(state_name(instance.state));
            view.pid = instance.pid;
            view.uptime_ms = instance.uptime_ms;
            view.restarts = instance.restarts;
            view.cpu_percent = instance.cpu_percent;
            view.rss_bytes = instance.rss_bytes;
            view.last_error.clone_from(&instance.last_error);
        }
        if let Some(stats) = &self.stats {
            // The rows are the default pool's instances (control's); a routed pool's have
            // ids of their own, which may repeat these.
            let default_pool = stats
                .instances
                .iter()
                .filter(|s| s.pool.is_empty() || s.pool == "default");
            for s in default_pool {
                let view = views.entry(s.instance.clone()).or_default();
                view.id.clone_from(&s.instance);
                if view.address.is_empty() {
                    view.address.clone_from(&s.address);
                }
                view.health = Some(s.state.clone());
                view.health_since_ms = Some(s.state_since_ms);
                if !s.ejection.is_empty() {
                    view.ejection = Some(s.ejection.clone());
                    view.back_at_ms = Some(s.back_at_ms);
                }
                view.requests = s.requests;
                view.errors = s.errors;
                view.in_flight = s.in_flight;
                view.rate = s.rate;
                view.p50_us = s.p50_us;
                view.p99_us = s.p99_us;
            }
        }
        for (id, view) in &mut views {
            if let Some(trail) = self.trails.get(id) {
                view.trail = trail.iter().cloned().collect();
            }
            if view.health.is_none()
                && let Some((requests, errors)) = self.last_counts.get(id)
            {
                // Not in the gateway's membership now (stopped): what it served until then.
                view.requests = *requests;
                view.errors = *errors;
            }
        }
        Snapshot {
            at_ms: now_ms(),
            instances: views.into_values().collect(),
            gateway: self.stats.as_ref().map(|s| GatewayView {
                policy: s.policy.clone(),
                in_flight: s.in_flight,
                max_in_flight: s.max_in_flight,
                requests: s.requests,
                retries: s.retries,
                failures: s.failures,
                health_interval_ms: s.health_interval_ms,
                probe_timeout_ms: s.probe_timeout_ms,
                events_written: s.events_written,
                events_dropped: s.events_dropped,
                methods: s
                    .methods
                    .iter()
                    .map(|m| MethodView {
                        method: m.method.clone(),
                        pool: m.pool.clone(),
                        calls: m.calls,
                        failures: m.failures,
                        messages_in: m.messages_in,
                        messages_out: m.messages_out,
                        mean_duration_us: m.mean_duration_us,
                    })
                    .collect(),
            }),
            sources: self.sources.clone(),
            control_enabled: self.control_enabled,
            boot_id: self.boot_id.clone(),
        }
    }

    /// Takes the live uptime, CPU and memory of the instances control lists, for those it
    /// lists with the same process as the last state change said (a newer process waits for
    /// its state to arrive through the watch).
    fn set_resources(&mut self, listed: &[Instance]) {
        for fresh in listed {
            if let Some(known) = self
                .instances
                .iter_mut()
                .find(|i| i.id == fresh.id && i.pid == fresh.pid)
            {
                known.uptime_ms = fresh.uptime_ms;
                known.cpu_percent = fresh.cpu_percent;
                known.rss_bytes = fresh.rss_bytes;
            }
        }
    }

    fn set_instances(&mut self, instances: Vec<Instance>) {
        let at_ms = now_ms();
        for instance in &instances {
            let mut state = state_name(instance.state);
            if state == "stopped" && self.killing.remove(&instance.id) {
                state = "killed".to_owned();
            }
            let trail = self.trails.entry(instance.id.clone()).or_default();
            // A killed instance is stopped: later snapshots that say so add nothing.
            let same = |last: &Transition| {
                last.state == state || (last.state == "killed" && state == "stopped")
            };
            if trail.back().is_none_or(|last| !same(last)) {
                trail.push_back(Transition { state, at_ms });
                if trail.len() > TRAIL_LEN {
                    trail.pop_front();
                }
            }
        }
        let listed = |id: &String| instances.iter().any(|i| &i.id == id);
        self.trails.retain(|id, _| listed(id));
        self.last_counts.retain(|id, _| listed(id));
        // A removed instance leaves the chart too.
        let in_gateway = self.gateway_ids();
        self.history
            .retain(|id, _| listed(id) || in_gateway.contains(id));
        self.instances = instances;
    }

    /// The ids the gateway's last stats list.
    fn gateway_ids(&self) -> BTreeSet<String> {
        self.stats
            .iter()
            .flat_map(|s| s.instances.iter().map(|i| i.instance.clone()))
            .collect()
    }

    fn set_stats(&mut self, stats: Option<StatsResponse>) {
        if let Some(stats) = &stats {
            for s in &stats.instances {
                self.last_counts
                    .insert(s.instance.clone(), (s.requests, s.errors));
            }
            // Kept for instances the gateway or control lists, no others.
            let instances = &self.instances;
            self.last_counts.retain(|id, _| {
                stats.instances.iter().any(|i| &i.instance == id)
                    || instances.iter().any(|i| &i.id == id)
            });
            let at_ms = now_ms();
            let horizon = at_ms.saturating_sub(HISTORY_MS);
            let trim = |history: &mut VecDeque<RatePoint>| {
                while history.len() > HISTORY_MAX_POINTS
                    || history.front().is_some_and(|p| p.at_ms < horizon)
                {
                    history.pop_front();
                }
            };
            for s in &stats.instances {
                let history = self.history.entry(s.instance.clone()).or_default();
                history.push_back(RatePoint {
                    at_ms,
                    rate: s.rate,
                });
                trim(history);
            }
            // One control lists and the gateway does not (stopped) takes no calls: its rate is
            // 0 from now on, not the last one the gateway gave (the chart's legend shows it).
            for (id, history) in &mut self.history {
                let stopped = !stats.instances.iter().any(|i| &i.instance == id)
                    && self.instances.iter().any(|i| &i.id == id);
                if stopped {
                    history.push_back(RatePoint { at_ms, rate: 0.0 });
                    trim(history);
                }
            }
            // Instances gone from the gateway keep their history until it ages out of view.
            self.history
                .retain(|_, h| h.back().is_some_and(|p| p.at_ms >= horizon));
        }
        self.stats = stats;
    }
}

/// `SERVING` → `serving`.
fn state_name(state: i32) -> String {
    InstanceState::try_from(state)
        .map_or("unknown", |s| s.as_str_name())
        .to_ascii_lowercase()
}

/// Shared by the loops and the routes.
#[derive(Debug)]
pub struct Collector {
    model: Mutex<Model>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    live: broadcast::Sender<Live>,
}

impl Collector {
    /// An empty picture: every configured source `connecting`. `boot_id` names this run of
    /// the dashboard.
    pub fn new(
        boot_id: &str,
        gateway: &str,
        control: Option<&str>,
        redis: Option<&str>,
    ) -> Arc<Self> {
        let model = Model {
            boot_id: boot_id.to_owned(),
            sources: Sources {
                gateway: Source::new(gateway, "connecting"),
                control: match control {
                    Some(addr) => Source::new(addr, "connecting"),
                    None => Source::new("", "off"),
                },
                redis: match redis {
                    Some(url) => Source::new(url, "connecting"),
                    None => Source::new("", "off"),
                },
            },
            control_enabled: control.is_some(),
            instances: Vec::new(),
            stats: None,
            trails: BTreeMap::new(),
            history: BTreeMap::new(),
            last_counts: BTreeMap::new(),
            killing: BTreeSet::new(),
        };
        let (snapshots, _) = watch::channel(Arc::new(model.snapshot()));
        let (live, _) = broadcast::channel(1024);
        Arc::new(Self {
            model: Mutex::new(model),
            snapshots,
            live,
        })
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        // A panic while holding the lock leaves a consistent model (every update is one
        // assignment), so a poisoned lock is still usable.
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Model)) {
        let snapshot = {
            let mut model = self.model();
            change(&mut model);
            Arc::new(model.snapshot())
        };
        self.snapshots.send_replace(snapshot);
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// Follows every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    /// Follows events and resyncs.
    pub fn live(&self) -> broadcast::Receiver<Live> {
        self.live.subscribe()
    }

    /// Throughput history per instance, oldest first.
    pub fn history(&self) -> BTreeMap<String, Vec<RatePoint>> {
        self.model()
            .history
            .iter()
            .map(|(id, h)| (id.clone(), h.iter().copied().collect()))
            .collect()
    }

    /// Notes that this dashboard asked control to kill `id`: its next `stopped` shows as
    /// `killed` in its trail. Not for one already stopped (or crashed): that kill does
    /// nothing, and its trail must not say it did.
    pub fn killing(&self, id: &str) {
        let mut model = self.model();
        let at_rest = model
            .instances
            .iter()
            .find(|i| i.id == id)
            .is_some_and(|i| {
                matches!(
                    InstanceState::try_from(i.state),
                    Ok(InstanceState::Stopped | InstanceState::Crashed)
                )
            });
        if !at_rest {
            model.killing.insert(id.to_owned());
        }
    }

    /// Takes back [`Collector::killing`] (control refused the kill).
    pub fn not_killing(&self, id: &str) {
        self.model().killing.remove(id);
    }

    /// Marks Redis down from a failed read in a route.
    pub fn redis_failed(&self, error: String) {
        self.update(|m| {
            m.sources.redis.set("down", Some(error));
        });
    }
}

/// Reads the gateway's stats every `interval` until `cancel`.
pub async fn poll_gateway(
    collector: Arc<Collector>,
    channel: Channel,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut client = GatewayClient::new(channel);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut request = tonic::Request::new(StatsRequest {});
        request.set_timeout(interval.max(Duration::from_secs(1)));
        let result = client.stats(request).await;
        collector.update(|m| match result {
            Ok(response) => {
                m.sources.gateway.set("ok", None);
                m.set_stats(Some(response.into_inner()));
            }
            Err(status) => {
                m.sources
                    .gateway
                    .set("down", Some(dlb::client::status_message(&status)));
                m.set_stats(None);
            }
        });
    }
}

/// How often the dashboard reads control's instance list for the instances' uptime, CPU and
/// memory: `WatchInstances` sends a list only when an instance changes state, and these change
/// all the time. Control samples them about once a second, so the cells are at most about two
/// seconds old.
pub const RESOURCES_INTERVAL: Duration = Duration::from_secs(1);

/// Failed reads of control's list in a row that mark control down: its watch stream shows a
/// control that is gone, not one that stopped answering (a stream open on a frozen process
/// just stays quiet). Two, so that one slow answer on a loaded machine raises no banner.
const CONTROL_MISSES: u32 = 2;

/// Reads control's instance list every [`RESOURCES_INTERVAL`] until `cancel`, for the live
/// uptime, CPU and memory of each instance (states come from [`watch_control`]); also how
/// the dashboard learns that control stopped answering (see [`CONTROL_MISSES`]).
pub async fn poll_resources(
    collector: Arc<Collector>,
    channel: Channel,
    cancel: CancellationToken,
) {
    let mut client = ControlClient::new(channel);
    let mut ticker = tokio::time::interval(RESOURCES_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut misses = 0;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut request = tonic::Request::new(ListInstancesRequest {});
        request.set_timeout(RESOURCES_INTERVAL);
        match client.list_instances(request).await {
            Ok(list) => {
                misses = 0;
                collector.update(|m| {
                    m.set_resources(&list.into_inner().instances);
                    m.sources.control.listing_answered();
                });
            }
            Err(status) => {
                misses += 1;
                let error = format!(
                    "no answer to a listing {misses} times in a row: {}",
                    dlb::client::status_message(&status)
                );
                collector.update(|m| {
                    if m.sources.control.listing_missed(misses, error) {
                        tracing::warn!(error = ?m.sources.control.error, "control not answering");
                    }
                });
            }
        }
    }
}

/// Follows control's instance list until `cancel`, reconnecting with backoff.
pub async fn watch_control(collector: Arc<Collector>, channel: Channel, cancel: CancellationToken) {
    let mut client = ControlClient::new(channel);
    let mut backoff = Duration::from_millis(100);
    loop {
        let followed = async {
            let mut stream = client
                .watch_instances(WatchInstancesRequest {})
                .await?
                .into_inner();
            while let Some(list) = stream.message().await? {
                collector.update(|m| {
                    m.sources.control.stream(None);
                    m.set_instances(list.instances);
                });
                backoff = Duration::from_millis(100);
            }
            Err(tonic::Status::unavailable("the instance stream ended"))
        };
        let error = tokio::select! {
            () = cancel.cancelled() => return,
            result = followed => match result {
                Ok(()) => continue,
                Err(status) => dlb::client::status_message(&status),
            },
        };
        collector.update(|m| {
            if m.sources.control.stream(Some(error)) {
                tracing::warn!(error = ?m.sources.control.error, "control unreachable");
            }
            // Stale lifecycle states would mislead; the gateway's view stays.
            m.set_instances(Vec::new());
        });
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Tails the event log until `cancel`, passing events on; reconnects with backoff and tells
/// the pages to read the latest events again after each (re)connection.
pub async fn tail_events(
    collector: Arc<Collector>,
    reader: EventReader,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let error = match tokio::select! {
            () = cancel.cancelled() => return,
            tail = reader.tail() => tail,
        } {
            Ok(stream) => {
                collector.update(|m| {
                    m.sources.redis.set("ok", None);
                });
                let _ = collector.live.send(Live::Resync);
                backoff = Duration::from_millis(100);
                let mut stream = std::pin::pin!(stream);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        next = stream.next() => match next {
                            Some(event) => {
                                let _ = collector.live.send(Live::Event(Arc::new(event)));
                            }
                            None => break,
                        },
                    }
                }
                "connection to Redis lost".to_owned()
            }
            Err(error) => dlb::status::error_chain(&error),
        };
        collector.update(|m| {
            if m.sources.redis.set("down", Some(error)) {
                tracing::warn!(error = ?m.sources.redis.error, "event log unreachable");
            }
        });
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, state: InstanceState) -> Instance {
        Instance {
            id: id.into(),
            address: format!("127.0.0.1:1300{id}"),
            state: state as i32,
            ..Instance::default()
        }
    }

    #[test]
    fn resources_follow_the_instance_list_between_state_changes() {
        let collector = Collector::new("boot", "gw", Some("control"), None);
        let serving = |pid, uptime_ms, rss_bytes| Instance {
            pid,
            uptime_ms,
            rss_bytes,
            cpu_percent: 1.5,
            ..instance("A", InstanceState::Serving)
        };
        collector.update(|m| m.set_instances(vec![serving(7, 3, 0)]));
        // The list read a second later: same process, live values.
        collector.update(|m| m.set_resources(&[serving(7, 1_003, 9_000_000)]));
        let view = |c: &Collector| {
            let snapshot = c.snapshot();
            let a = snapshot.instances.iter().find(|i| i.id == "A").unwrap();
            (a.uptime_ms, a.rss_bytes)
        };
        assert_eq!(view(&collector), (1_003, 9_000_000));
        // A list that already shows a new process (restarted): its state comes by the watch.
        collector.update(|m| m.set_resources(&[serving(8, 5, 100)]));
        assert_eq!(view(&collector), (1_003, 9_000_000));
    }

    #[test]
    fn trails_record_each_change_once() {
        let collector = Collector::new("boot", "gw", Some("control"), None);
        for state in [
            InstanceState::Serving,
            InstanceState::Serving,
            InstanceState::Draining,
            InstanceState::Stopped,
        ] {
            collector.update(|m| m.set_instances(vec![instance("B", state)]));
        }
        let snapshot = collector.snapshot();
        let trail: Vec<&str> = snapshot.instances[0]
            .trail
            .iter()
            .map(|t| t.state.as_str())
            .collect();
        assert_eq!(trail, ["serving", "draining", "stopped"]);
        assert_eq!(snapshot.instances[0].state.as_deref(), Some("stopped"));
    }

    #[test]
    fn control_goes_down_quiet_or_broken_and_comes_back_by_the_right_sign() {
        let mut control = Source::new("control", "connecting");
        control.stream(None);
        // Frozen: one missed listing is not enough, two are.
        assert!(!control.listing_missed(1, "slow".to_owned()));
        assert_eq!(control.state, "ok");
        assert!(control.listing_missed(2, "no answer".to_owned()));
        assert_eq!(control.state, "down");
        // It answers again: back.
        control.listing_answered();
        assert_eq!(control.state, "ok");
        // Frozen, then its stream breaks (it died): a listing that answers (a new control
        // on the port) does not say ok while the stream is down; the stream's return does.
        control.listing_missed(2, "no answer".to_owned());
        control.stream(Some("connection reset".to_owned()));
        control.listing_answered();
        assert_eq!(control.state, "down");
        assert_eq!(control.error.as_deref(), Some("connection reset"));
        control.stream(None);
        assert_eq!(control.state, "ok");
        // A broken stream is not overwritten by missed listings either.
        control.stream(Some("refused".to_owned()));
        assert!(!control.listing_missed(5, "no answer".to_owned()));
        assert_eq!(control.error.as_deref(), Some("refused"));
    }

    #[test]
    fn a_kill_of_a_stopped_instance_is_not_recorded_as_a_kill() {
        let collector = Collector::new("boot", "gw", Some("control"), None);
        let trail = |c: &Collector| -> Vec<String> {
            c.snapshot().instances[0]
                .trail
                .iter()
                .map(|t| t.state.clone())
                .collect()
        };
        collector.update(|m| m.set_instances(vec![instance("C", InstanceState::Serving)]));
        collector.update(|m| m.set_instances(vec![instance("C", InstanceState::Stopped)]));
        // Killing it now does nothing at control, and the next list says stopped again.
        collector.killing("C");
        collector.update(|m| m.set_instances(vec![instance("C", InstanceState::Stopped)]));
        collector.update(|m| m.set_instances(vec![instance("C", InstanceState::Serving)]));
        collector.update(|m| m.set_instances(vec![instance("C", InstanceState::Stopped)]));
        assert_eq!(
            trail(&collector),
            ["serving", "stopped", "serving", "stopped"]
        );
        // A kill of a running one is.
        collector.killing("C");
        collector.update(|m| m.set_instances(vec![instance("C", InstanceState::Serving)]));
        collector.killing("C");
        collector.update(|m| m.set_instances(vec![instance("C", InstanceState::Stopped)]));
        assert_eq!(
            trail(&collector),
            [
                "serving", "stopped", "serving", "stopped", "serving", "killed"
            ]
        );
    }

    #[test]
    fn a_stopped_instance_charts_no_calls_rather_than_its_last_rate() {
        let collector = Collector::new("boot", "gw", Some("control"), None);
        let stats = |rate| StatsResponse {
            instances: vec![dlb::proto::v1::InstanceStats {
                instance: "A".into(),
                state: "serving".into(),
                rate,
                ..Default::default()
            }],
            ..Default::default()
        };
        collector.update(|m| {
            m.set_instances(vec![
                instance("A", InstanceState::Serving),
                instance("C", InstanceState::Serving),
            ]);
            m.set_stats(Some(StatsResponse {
                instances: vec![
                    stats(2.0).instances[0].clone(),
                    dlb::proto::v1::InstanceStats {
                        instance: "C".into(),
                        state: "serving".into(),
                        rate: 0.1,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }));
        });
        // C stops: control still lists it, the gateway no longer does.
        collector.update(|m| {
            m.set_instances(vec![
                instance("A", InstanceState::Serving),
                instance("C", InstanceState::Stopped),
            ]);
            m.set_stats(Some(stats(2.0)));
        });
        let history = collector.history();
        let last = |id: &str| history[id].last().unwrap().rate;
        assert_eq!(last("C"), 0.0);
        assert_eq!(last("A"), 2.0);
        // Removed: its history goes with it, as before.
        collector.update(|m| {
            m.set_instances(vec![instance("A", InstanceState::Serving)]);
            m.set_stats(Some(stats(2.0)));
        });
        assert!(!collector.history().contains_key("C"));
    }

    #[test]
    fn control_and_gateway_views_merge_by_id() {
        let collector = Collector::new("boot", "gw", Some("control"), None);
        collector.update(|m| {
            m.set_instances(vec![instance("A", InstanceState::Serving)]);
            m.set_stats(Some(StatsResponse {
                instances: vec![dlb::proto::v1::InstanceStats {
                    instance: "A".into(),
                    state: "serving".into(),
                    requests: 7,
                    rate: 2.5,
                    ..Default::default()
                }],
                ..Default::default()
            }));
        });
        let snapshot = collector.snapshot();
        assert_eq!(snapshot.instances.len(), 1);
        let a = &snapshot.instances[0];
        assert_eq!(
            (a.state.as_deref(), a.health.as_deref()),
            (Some("serving"), Some("serving"))
        );
        assert_eq!(a.requests, 7);
        assert_eq!(collector.history()["A"][0].rate, 2.5);
    }

    #[test]
    fn an_outlier_ejection_reaches_the_row_while_it_lasts() {
        let collector = Collector::new("boot", "gw", None, None);
        let stats = |ejection: &str, back_at_ms| StatsResponse {
            instances: vec![dlb::proto::v1::InstanceStats {
                instance: "B".into(),
                state: "ejected".into(),
                ejection: ejection.into(),
                back_at_ms,
                ..Default::default()
            }],
            ..Default::default()
        };
        collector.update(|m| m.set_stats(Some(stats("5 x INTERNAL in a row", 1_700))));
        let b = collector.snapshot().instances[0].clone();
        assert_eq!(b.ejection.as_deref(), Some("5 x INTERNAL in a row"));
        assert_eq!(b.back_at_ms, Some(1_700));
        collector.update(|m| m.set_stats(Some(stats("", 0))));
        let b = collector.snapshot().instances[0].clone();
        assert_eq!((b.ejection, b.back_at_ms), (None, None));
    }

    #[test]
    fn history_is_bounded() {
        let collector = Collector::new("boot", "gw", None, None);
        for _ in 0..HISTORY_MAX_POINTS + 10 {
            collector.update(|m| {
                m.set_stats(Some(StatsResponse {
                    instances: vec![dlb::proto::v1::InstanceStats {
                        instance: "A".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }));
            });
        }
        assert_eq!(collector.history()["A"].len(), HISTORY_MAX_POINTS);
    }
}
