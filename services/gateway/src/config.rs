//! Configuration of the gateway: flags, with `DLB_GATEWAY_*` environment equivalents.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use dlb::events::EventLogArgs;

/// Default listen address: the original balancer's port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:12000";

/// Default address of the Prometheus `/metrics` endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:12002";

/// Default bound on calls served at once; above it calls get RESOURCE_EXHAUSTED. Envoy's
/// default circuit breaker allows the same 1,024 requests per cluster.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Default HTTP/2 streams a caller may have open on one connection to the gateway
/// (SETTINGS_MAX_CONCURRENT_STREAMS); a caller's further calls wait in its own HTTP/2 client.
/// Calls refused past `--max-in-flight` still arrive, are read and are answered, so without
/// this bound an overload the gateway cannot keep up with is held in its memory, stream by
/// stream (10,000 open streams took 46 MB). NGINX allows 128, HAProxy 100, hyper 200.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;

/// Descriptors the default `--max-connections` leaves to everything but callers' connections:
/// instance connections (`--connections` per instance on each of the `--threads` runtimes, and
/// one per health monitor: 2 threads, 1 connection and 60 instances take 180), Redis, the
/// listeners, files.
pub const RESERVED_FILES: u64 = 256;

/// The largest `--max-connections`.
pub const MAX_CONNECTIONS: usize = 10_000_000;

/// The default `--max-connections` under an open-file limit of `limit`: what the limit leaves
/// after [`RESERVED_FILES`] (at least 16, at most [`MAX_CONNECTIONS`]), or 65,536 without a
/// limit.
pub fn default_max_connections(limit: Option<u64>) -> usize {
    limit.map_or(65_536, |limit| {
        usize::try_from(limit.saturating_sub(RESERVED_FILES).max(16))
            .unwrap_or(MAX_CONNECTIONS)
            .min(MAX_CONNECTIONS)
    })
}

/// Default instances tried per call (the first attempt plus retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Default health probe interval (for `Check` polling and reconnection), milliseconds.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1_000;

/// Default timeout of one health probe, milliseconds.
pub const DEFAULT_PROBE_TIMEOUT_MS: u64 = 1_000;

/// Default deadline of a call that carries none, seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// Default time an instance with calls in flight may answer nothing before it is probed,
/// milliseconds.
pub const DEFAULT_STALL_TIMEOUT_MS: u64 = 250;

/// Default slow start of `--policy weighted`, milliseconds.
pub const DEFAULT_SLOW_START_MS: u64 = 15_000;

/// Default interval between DNS resolutions (`--discover dns:...`), milliseconds.
pub const DEFAULT_DNS_INTERVAL_MS: u64 = 5_000;

/// Default HTTP/2 connections per backend: calls are multiplexed, and one connection batches
/// more of them per write (measured faster than 2 or 4, see README Performance).
pub const DEFAULT_CONNECTIONS: usize = 1;

/// How the gateway picks an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Strict rotation over ready instances (ours).
    RoundRobin,
    /// tower's power of two choices over peak-EWMA latency, for comparison.
    P2c,
    /// Smooth weighted round robin by latency, recent failures and calls in flight, with
    /// slow start (ours).
    Weighted,
}

impl Policy {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::P2c => "p2c",
            Policy::Weighted => "weighted",
        }
    }
}

/// One `--backend ID=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Instance id, the balancer's key.
    pub id: String,
    /// host:port (a name or an address; remote hosts allowed).
    pub addr: String,
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not ID=HOST:PORT (e.g. A=127.0.0.1:13001)"))?;
        dlb::metadata::validate_instance_id(id)?;
        dlb::dial::validate_host_port(addr)?;
        Ok(Self {
            id: id.to_owned(),
            addr: addr.to_owned(),
        })
    }
}

/// A discovery source beyond `--backend` and `--control`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discover {
    /// The Redis instance registry (at the `--redis` URL).
    Redis,
    /// Every A/AAAA record of a name, each an instance on `port`.
    Dns {
        /// The name (e.g. a Kubernetes headless service).
        name: String,
        /// The instances' port.
        port: u16,
    },
}

impl FromStr for Discover {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "redis" {
            return Ok(Self::Redis);
        }
        let Some(rest) = s.strip_prefix("dns:") else {
            return Err(format!(
                "{s:?} is not a discovery source: use \"redis\" or \"dns:NAME:PORT\" (e.g. dns:dlb-compute.default.svc.cluster.local:13001)"
            ));
        };
        let (name, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port: use dns:NAME:PORT"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{port:?} is not a port number (1-65535)"))?;
        crate::dns::validate_name(name)?;
        Ok(Self::Dns {
            name: name.trim_end_matches('.').to_owned(),
            port,
        })
    }
}

/// The gateway's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "dlb-gateway",
    version,
    about = "dlb gateway: balances dlb.v1.Operations, and any other gRPC service, over instances"
)]
pub struct Config {
    /// Address to serve gRPC on (IP:PORT, e.g. 127.0.0.1:12000; port 0 picks a free one).
    #[arg(long, env = "DLB_GATEWAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Address of the Prometheus text endpoint `/metrics` ("none" turns it off).
    #[arg(long, env = "DLB_GATEWAY_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: String,

    /// This gateway's id in the event log.
    #[arg(long, env = "DLB_GATEWAY_ID", default_value = "gw")]
    pub id: String,

    /// A compute instance: ID=HOST:PORT. Repeat the flag or separate with commas.
    #[arg(long = "backend", env = "DLB_GATEWAY_BACKENDS", value_delimiter = ',')]
    pub backends: Vec<Backend>,

    /// The control service to follow for membership (e.g. http://127.0.0.1:12001), in
    /// addition to any --backend.
    #[arg(long, env = "DLB_GATEWAY_CONTROL")]
    pub control: Option<String>,

    /// Follow a discovery source as well: "redis" (the instance registry at --redis) or
    /// "dns:NAME:PORT" (every A/AAAA record of NAME, re-resolved every --dns-interval-ms).
    #[arg(long, env = "DLB_GATEWAY_DISCOVER")]
    pub discover: Option<Discover>,

    /// Sends a service (package.Service) or the methods under a path prefix (/package.) to a
    /// named pool instead of the default one: SERVICE=POOL or /PREFIX=POOL, repeatable. The
    /// longest matching prefix wins. POOL `default` is the pool of --backend, --control and
    /// --discover.
    #[arg(long = "route", env = "DLB_GATEWAY_ROUTES", value_delimiter = ',')]
    pub routes: Vec<crate::routing::RouteArg>,

    /// An instance of a named pool: POOL:ID=HOST:PORT, repeatable.
    #[arg(
        long = "pool-backend",
        env = "DLB_GATEWAY_POOL_BACKENDS",
        value_delimiter = ','
    )]
    pub pool_backends: Vec<crate::routing::PoolBackend>,

    /// A named pool's instances from DNS: POOL:dns:NAME:PORT, repeatable.
    #[arg(
        long = "pool-discover",
        env = "DLB_GATEWAY_POOL_DISCOVER",
        value_delimiter = ','
    )]
    pub pool_discover: Vec<crate::routing::PoolDiscover>,

    /// The service a named pool's health checks name: POOL=SERVICE (POOL= for the whole
    /// server). Default: the first service routed to the pool, or the whole server.
    #[arg(
        long = "pool-health",
        env = "DLB_GATEWAY_POOL_HEALTH",
        value_delimiter = ','
    )]
    pub pool_health: Vec<crate::routing::PoolHealth>,

    /// DNS server for `--discover dns:...` (IP:PORT); default: the system resolver.
    #[arg(long, env = "DLB_GATEWAY_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,

    /// Interval between DNS resolutions, in milliseconds.
    #[arg(long, env = "DLB_GATEWAY_DNS_INTERVAL_MS", default_value_t = DEFAULT_DNS_INTERVAL_MS)]
    pub dns_interval_ms: u64,

    /// How to pick an instance.
    #[arg(
        long,
        env = "DLB_GATEWAY_POLICY",
        value_enum,
        default_value = "weighted"
    )]
    pub policy: Policy,

    /// With --policy weighted: how long a new or returning instance's share takes to ramp up
    /// from 10% of its weight to all of it, in milliseconds (0: no slow start).
    #[arg(long, env = "DLB_GATEWAY_SLOW_START_MS", default_value_t = DEFAULT_SLOW_START_MS)]
    pub slow_start_ms: u64,

    /// Hedging of the five operations (all pure): a call unanswered this long is sent again
    /// to another instance, within the retry budget, and the slower copy is cancelled. A
    /// number of milliseconds, `auto` (the operation's p95 over the last 5 s), or `off`.
    #[arg(long, env = "DLB_GATEWAY_HEDGE_AFTER", default_value = "off")]
    pub hedge_after: crate::relay::hedge::Hedge,

    /// One JSON line per call (time, method, status, instance, attempts, latency, peer,
    /// certificate identity, trace id, bytes each way), to `stdout` or appended to a file.
    /// Lossless: every call gets its line, however many there are.
    #[arg(long, env = "DLB_GATEWAY_ACCESS_LOG", value_name = "stdout|FILE")]
    pub access_log: Option<dlb::server::access_log::Target>,

    /// Calls served at once before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DLB_GATEWAY_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// HTTP/2 streams a caller may have open at once on one connection; its further calls
    /// wait in its own client. Bounds the gateway's memory under overload.
    #[arg(
        long,
        env = "DLB_GATEWAY_MAX_CONCURRENT_STREAMS",
        default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS
    )]
    pub max_concurrent_streams: u32,

    /// Callers' connections open at once; past it the gateway stops accepting and new
    /// connections wait in the listen backlog until one closes. Default: the open-file limit
    /// (ulimit -n) less 256 kept for instance connections, Redis and files (at least 16).
    #[arg(long, env = "DLB_GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Instances tried per call, counting the first (retries only on UNAVAILABLE or a
    /// connection failure, within the retry budget and the call's deadline).
    #[arg(long, env = "DLB_GATEWAY_MAX_ATTEMPTS", default_value_t = DEFAULT_MAX_ATTEMPTS)]
    pub max_attempts: u32,

    /// Health probe interval in milliseconds (Check polling, reconnection).
    #[arg(long, env = "DLB_GATEWAY_HEALTH_INTERVAL_MS", default_value_t = DEFAULT_HEALTH_INTERVAL_MS)]
    pub health_interval_ms: u64,

    /// Timeout of one health probe in milliseconds.
    #[arg(long, env = "DLB_GATEWAY_PROBE_TIMEOUT_MS", default_value_t = DEFAULT_PROBE_TIMEOUT_MS)]
    pub probe_timeout_ms: u64,

    /// Deadline for calls that carry none, in seconds.
    #[arg(long, env = "DLB_GATEWAY_TIMEOUT_SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout_secs: u64,

    /// An instance with calls in flight that has answered nothing for this long (ms) is probed
    /// on each connection (within --probe-timeout-ms). If it does not answer, its calls are
    /// retried on other instances and it is ejected; if it does, long calls keep running.
    #[arg(long, env = "DLB_GATEWAY_STALL_TIMEOUT_MS", default_value_t = DEFAULT_STALL_TIMEOUT_MS)]
    pub stall_timeout_ms: u64,

    /// Outlier detection: failures in a row (statuses of --outlier-codes) that eject an
    /// instance (0: never by count).
    #[arg(long, env = "DLB_GATEWAY_OUTLIER_CONSECUTIVE", default_value_t = 5)]
    pub outlier_consecutive: u32,

    /// Outlier detection: the failure percentage over --outlier-window-ms that ejects an
    /// instance, once the window holds --outlier-min-volume calls (0: never by rate).
    #[arg(
        long,
        env = "DLB_GATEWAY_OUTLIER_FAILURE_PERCENT",
        default_value_t = 50
    )]
    pub outlier_failure_percent: u32,

    /// Outlier detection: calls the window must hold before its failure rate counts.
    #[arg(long, env = "DLB_GATEWAY_OUTLIER_MIN_VOLUME", default_value_t = 20)]
    pub outlier_min_volume: u32,

    /// Outlier detection: how far back the failure rate looks, in milliseconds.
    #[arg(long, env = "DLB_GATEWAY_OUTLIER_WINDOW_MS", default_value_t = 10_000)]
    pub outlier_window_ms: u64,

    /// Outlier detection: the first ejection's length in milliseconds; the n-th lasts n
    /// times as long (up to --outlier-max-ejection-ms). Back on probation after it.
    #[arg(
        long,
        env = "DLB_GATEWAY_OUTLIER_EJECTION_MS",
        default_value_t = 30_000
    )]
    pub outlier_ejection_ms: u64,

    /// Outlier detection: the longest ejection, in milliseconds.
    #[arg(
        long,
        env = "DLB_GATEWAY_OUTLIER_MAX_EJECTION_MS",
        default_value_t = 300_000
    )]
    pub outlier_max_ejection_ms: u64,

    /// Outlier detection: the most of a pool ejected at once, percent of its instances
    /// serving or ejected so (its last instance serving is never ejected).
    #[arg(
        long,
        env = "DLB_GATEWAY_OUTLIER_MAX_EJECTED_PERCENT",
        default_value_t = 50
    )]
    pub outlier_max_ejected_percent: u32,

    /// Outlier detection: the statuses that count as an instance's failure, of internal,
    /// unknown, data-loss, unavailable, aborted ("" turns outlier detection off).
    #[arg(
        long,
        env = "DLB_GATEWAY_OUTLIER_CODES",
        default_value = "internal,unknown,data-loss,unavailable"
    )]
    pub outlier_codes: String,

    /// HTTP/2 connections opened to each instance.
    #[arg(long, env = "DLB_GATEWAY_CONNECTIONS", default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,

    /// Threads serving calls (0: one per CPU), each a runtime of its own: the callers'
    /// connections are spread over them in turn and each connection's calls stay on its
    /// thread. 1 runs everything on one thread.
    #[arg(long, env = "DLB_GATEWAY_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Largest request message, in bytes.
    #[arg(long, env = "DLB_GATEWAY_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// A second, plaintext address serving only grpc.health.v1 (for probes that cannot speak
    /// TLS); the operations stay behind TLS.
    #[arg(long, env = "DLB_GATEWAY_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// TLS: served to callers (mutual with --tls-ca), and used towards instances and control
    /// (verified against --tls-ca, presenting --tls-cert).
    #[command(flatten)]
    pub tls: dlb::tls::TlsArgs,

    /// Who may call what under mutual TLS (built in: every certificate from the CA may call
    /// every method).
    #[command(flatten)]
    pub authz: dlb::authz::AuthzArgs,

    /// Distributed tracing (off unless an OTLP endpoint is given).
    #[command(flatten)]
    pub trace: dlb::trace::TraceArgs,

    /// Where events go (the Redis event log).
    #[command(flatten)]
    pub events: EventLogArgs,
}

impl Config {
    /// Port 0 on loopback, no metrics listener, no event log, the given backends.
    pub fn for_tests(backends: Vec<Backend>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: "none".to_owned(),
            id: "gw".to_owned(),
            backends,
            control: None,
            discover: None,
            routes: Vec::new(),
            pool_backends: Vec::new(),
            pool_discover: Vec::new(),
            pool_health: Vec::new(),
            dns_server: None,
            dns_interval_ms: DEFAULT_DNS_INTERVAL_MS,
            policy: Policy::RoundRobin,
            slow_start_ms: DEFAULT_SLOW_START_MS,
            hedge_after: crate::relay::hedge::Hedge::Off,
            access_log: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_connections: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            health_interval_ms: 200,
            probe_timeout_ms: DEFAULT_PROBE_TIMEOUT_MS,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            stall_timeout_ms: DEFAULT_STALL_TIMEOUT_MS,
            connections: DEFAULT_CONNECTIONS,
            outlier_consecutive: 5,
            outlier_failure_percent: 50,
            outlier_min_volume: 20,
            outlier_window_ms: 10_000,
            outlier_ejection_ms: 30_000,
            outlier_max_ejection_ms: 300_000,
            outlier_max_ejected_percent: 50,
            outlier_codes: "internal,unknown,data-loss,unavailable".to_owned(),
            threads: 0,
            max_message_bytes: 4 * 1024 * 1024,
            health_listen: None,
            tls: dlb::tls::TlsArgs::default(),
            authz: dlb::authz::AuthzArgs::default(),
            trace: dlb::trace::TraceArgs::default(),
            events: EventLogArgs::disabled(),
        }
    }

    /// Callers' connections open at once: `--max-connections`, or what the open-file limit
    /// leaves (see [`default_max_connections`]).
    pub fn max_connections(&self) -> usize {
        self.max_connections
            .unwrap_or_else(|| default_max_connections(dlb::server::open_file_limit()))
    }

    /// Worker threads to run: `--threads`, or one per CPU.
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
        }
    }

    /// The membership sources this configuration names: the static list, control, a
    /// discovery source, or several at once.
    pub fn membership(&self) -> Box<dyn crate::membership::Membership> {
        use crate::membership::{
            ControlMembership, Membership, Merged, RegistryMembership, StaticMembership,
        };
        let mut sources: Vec<Box<dyn Membership>> =
            vec![Box::new(StaticMembership(self.backends.clone()))];
        if let Some(addr) = &self.control {
            sources.push(Box::new(ControlMembership {
                addr: addr.clone(),
                tls: self.client_tls(),
            }));
        }
        match &self.discover {
            None => {}
            Some(Discover::Redis) => {
                if let Ok(Some(url)) = self.events.config().map(|c| c.redis_url) {
                    sources.push(Box::new(RegistryMembership { url }));
                }
            }
            Some(Discover::Dns { name, port }) => sources.push(self.dns_membership(name, *port)),
        }
        if sources.len() == 1 {
            return sources.remove(0);
        }
        Box::new(Merged(sources))
    }

    /// The TLS client side (towards instances and control), if TLS is on.
    /// Every A/AAAA record of `name`, each an instance on `port`, by `--dns-server` and
    /// `--dns-interval-ms`.
    fn dns_membership(&self, name: &str, port: u16) -> Box<dyn crate::membership::Membership> {
        Box::new(crate::membership::DnsMembership {
            name: name.to_owned(),
            port,
            server: self.dns_server,
            interval: Duration::from_millis(self.dns_interval_ms),
        })
    }

    /// The pools and routes the flags give (see [`crate::routing`]).
    ///
    /// # Errors
    ///
    /// A message naming the flag at fault.
    pub fn plan(&self) -> Result<crate::routing::Plan, String> {
        crate::routing::plan(
            &self.routes,
            &self.pool_backends,
            &self.pool_discover,
            &self.pool_health,
        )
    }

    /// Where a named pool's instances come from.
    pub fn pool_membership(
        &self,
        pool: &crate::routing::PoolPlan,
    ) -> Box<dyn crate::membership::Membership> {
        use crate::membership::{Membership, Merged, StaticMembership};
        let mut sources: Vec<Box<dyn Membership>> =
            vec![Box::new(StaticMembership(pool.backends.clone()))];
        for (name, port) in &pool.dns {
            sources.push(self.dns_membership(name, *port));
        }
        if sources.len() == 1 {
            return sources.remove(0);
        }
        Box::new(Merged(sources))
    }

    pub fn client_tls(&self) -> Option<dlb::tls::ClientTls> {
        self.tls.load().ok().flatten().and_then(|tls| tls.client())
    }

    /// The stall timeout.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_ms)
    }

    /// Health probe interval.
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    /// Health probe timeout.
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }

    /// The metrics address, if enabled.
    ///
    /// # Errors
    ///
    /// A message when it is neither "none" nor HOST:PORT.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        let value = self.metrics_listen.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        value.parse().map(Some).map_err(|_| {
            format!("--metrics-listen {value:?} is not IP:PORT (e.g. 127.0.0.1:12002) or \"none\"")
        })
    }

    /// Outlier detection's settings.
    ///
    /// # Errors
    ///
    /// A message naming the bad `--outlier-*` flag.
    pub fn outlier(&self) -> Result<crate::outlier::OutlierSettings, String> {
        let settings = crate::outlier::OutlierSettings {
            consecutive: self.outlier_consecutive,
            failure_percent: self.outlier_failure_percent,
            min_volume: self.outlier_min_volume,
            window: Duration::from_millis(self.outlier_window_ms),
            base_ejection: Duration::from_millis(self.outlier_ejection_ms),
            max_ejection: Duration::from_millis(self.outlier_max_ejection_ms),
            max_ejected_percent: self.outlier_max_ejected_percent,
            codes: crate::outlier::parse_codes(&self.outlier_codes)?,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what clap cannot.
    ///
    /// # Errors
    ///
    /// A one-line message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        self.plan()?;
        self.outlier()?;
        self.trace.check("dlb-gateway", &self.id)?;
        if let Some(control) = &self.control {
            dlb::dial::check_port(control).map_err(|e| format!("--control: {e}"))?;
        }
        if let Some(target) = &self.access_log {
            target.check()?;
        }
        dlb::metadata::validate_instance_id(&self.id).map_err(|e| format!("--id: {e}"))?;
        let mut ids: Vec<&str> = self.backends.iter().map(|b| b.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("--backend: instance id {:?} given twice", pair[0]));
        }
        for (flag, value) in [
            ("--max-in-flight", self.max_in_flight as u64),
            (
                "--max-concurrent-streams",
                u64::from(self.max_concurrent_streams),
            ),
            ("--max-attempts", u64::from(self.max_attempts)),
            (
                "--max-connections",
                self.max_connections.map_or(1, |max| max as u64),
            ),
            ("--health-interval-ms", self.health_interval_ms),
            ("--probe-timeout-ms", self.probe_timeout_ms),
            ("--timeout-secs", self.timeout_secs),
            ("--connections", self.connections as u64),
            ("--stall-timeout-ms", self.stall_timeout_ms),
            ("--dns-interval-ms", self.dns_interval_ms),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if let Some(max) = self.max_connections
            && max > MAX_CONNECTIONS
        {
            return Err(format!(
                "--max-connections {max} is too large (at most {MAX_CONNECTIONS})"
            ));
        }
        self.metrics_addr()?;
        self.tls.load()?;
        let events = self.events.config()?;
        if self.discover == Some(Discover::Redis) && events.redis_url.is_none() {
            return Err(
                "--discover redis follows the registry at --redis: give --redis URL, not \"none\""
                    .to_owned(),
            );
        }
        if self.dns_server.is_some() && !matches!(self.discover, Some(Discover::Dns { .. })) {
            return Err("--dns-server is only used with --discover dns:NAME:PORT".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_bound_leaves_descriptors_for_the_rest() {
        assert_eq!(default_max_connections(Some(1024)), 768);
        assert_eq!(default_max_connections(Some(20_000)), 19_744);
        // A tiny limit still lets some callers in; accepting backs off when it runs out.
        assert_eq!(default_max_connections(Some(100)), 16);
        assert_eq!(default_max_connections(None), 65_536);
        assert_eq!(default_max_connections(Some(u64::MAX - 1)), MAX_CONNECTIONS);
        let mut config = Config::for_tests(vec![]);
        assert_eq!(
            config.max_connections(),
            default_max_connections(dlb::server::open_file_limit())
        );
        config.max_connections = Some(3);
        assert_eq!(config.max_connections(), 3);
        config.max_connections = Some(0);
        assert_eq!(
            config.validate().unwrap_err(),
            "--max-connections must be at least 1"
        );
        config.max_connections = Some(usize::MAX);
        assert!(
            config.validate().unwrap_err().contains("is too large"),
            "{:?}",
            config.validate()
        );
    }

    #[test]
    fn backends_parse_with_clear_errors() {
        assert_eq!(
            "A=127.0.0.1:13001".parse::<Backend>(),
            Ok(Backend {
                id: "A".into(),
                addr: "127.0.0.1:13001".into()
            })
        );
        assert!("compute-7=host.example:443".parse::<Backend>().is_ok());
        assert!(
            "127.0.0.1:13001"
                .parse::<Backend>()
                .unwrap_err()
                .contains("ID=HOST:PORT")
        );
        assert!(
            "A=127.0.0.1"
                .parse::<Backend>()
                .unwrap_err()
                .contains("no port")
        );
        assert!(
            "A=127.0.0.1:0"
                .parse::<Backend>()
                .unwrap_err()
                .contains("port number")
        );
        assert!("A=host:x".parse::<Backend>().is_err());
        assert!("<b>=h:1".parse::<Backend>().is_err());
    }
}
