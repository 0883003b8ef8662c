//! Configuration of a compute instance: flags, with `DLB_COMPUTE_*` environment equivalents.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use dlb::events::EventLogArgs;

use crate::ops::{fibonacci, prime};
use crate::pool;

/// Default listen address: the first of the original's backend ports.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:13001";

/// Default largest request message, in bytes (gRPC's customary 4 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Default time a draining instance waits for in-flight calls after SIGTERM, in seconds.
pub const DEFAULT_GRACE_PERIOD_SECS: u64 = 10;

/// A compute instance's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "dlb-compute",
    version,
    about = "dlb compute instance: serves dlb.v1.Operations"
)]
pub struct Config {
    /// Address to listen on (IP:PORT, e.g. 127.0.0.1:13001; port 0 picks a free one).
    #[arg(long, env = "DLB_COMPUTE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Instance id, sent back in the `x-served-by` metadata of every response.
    #[arg(long, env = "DLB_COMPUTE_ID", default_value = "A")]
    pub id: String,

    /// Largest number of decimal digits `IsPrime` accepts.
    #[arg(long, env = "DLB_COMPUTE_MAX_PRIME_DIGITS", default_value_t = prime::DEFAULT_MAX_PRIME_DIGITS)]
    pub max_prime_digits: usize,

    /// Largest n `Fibonacci` accepts.
    #[arg(long, env = "DLB_COMPUTE_MAX_FIB_N", default_value_t = fibonacci::DEFAULT_MAX_FIB_N)]
    pub max_fib_n: u64,

    /// Largest request message, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DLB_COMPUTE_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Heavy calls computed at once (default: the number of CPUs).
    #[arg(long, env = "DLB_COMPUTE_WORKERS")]
    pub workers: Option<usize>,

    /// Heavy calls waiting for a worker before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DLB_COMPUTE_QUEUE", default_value_t = pool::DEFAULT_QUEUE)]
    pub queue: usize,

    /// Answers every operation this many milliseconds late: a slow instance on purpose, to
    /// see what a gateway does with one (0: off).
    #[arg(long, env = "DLB_COMPUTE_INJECT_DELAY_MS", default_value_t = 0)]
    pub inject_delay_ms: u64,

    /// Seconds to wait for in-flight calls after SIGTERM before stopping anyway.
    #[arg(long, env = "DLB_COMPUTE_GRACE_PERIOD_SECS", default_value_t = DEFAULT_GRACE_PERIOD_SECS)]
    pub grace_period_secs: u64,

    /// Drain and exit when the parent process goes away (set by dlb-control, so that no
    /// instance outlives its supervisor, even one killed with SIGKILL).
    #[arg(long, env = "DLB_COMPUTE_EXIT_WITH_PARENT")]
    pub exit_with_parent: bool,

    /// Announce this instance in the Redis registry (the `--redis` URL) while it serves, so
    /// gateways started with `--discover redis` find it; withdrawn on shutdown.
    #[arg(long, env = "DLB_COMPUTE_REGISTER")]
    pub register: bool,

    /// HOST or HOST:PORT that gateways use to reach this instance, as registered (default:
    /// the address it listens on; required when that is 0.0.0.0 or [::]). Without a port, the
    /// port it listens on.
    #[arg(long, env = "DLB_COMPUTE_ADVERTISE")]
    pub advertise: Option<String>,

    /// Lifetime of the registration in milliseconds; renewed every third of it, so an instance
    /// that dies without withdrawing drops out of the registry within this time.
    #[arg(long, env = "DLB_COMPUTE_REGISTER_TTL_MS", default_value_t = DEFAULT_REGISTER_TTL_MS)]
    pub register_ttl_ms: u64,

    /// A second, plaintext address serving only grpc.health.v1 (for probes that cannot speak
    /// TLS); the operations stay behind TLS.
    #[arg(long, env = "DLB_COMPUTE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// TLS (mutual with --tls-ca).
    #[command(flatten)]
    pub tls: dlb::tls::TlsArgs,

    /// Who may call what under mutual TLS (built in: the operations only to the gateway and
    /// control).
    #[command(flatten)]
    pub authz: dlb::authz::AuthzArgs,

    /// Distributed tracing (off unless an OTLP endpoint is given).
    #[command(flatten)]
    pub trace: dlb::trace::TraceArgs,

    /// Where events go (the Redis event log).
    #[command(flatten)]
    pub events: EventLogArgs,
}

/// `host` as HOST:PORT, adding `port` when it has none (`[::1]` and `::1` are hosts).
fn with_port(host: &str, port: u16) -> String {
    let has_port = if host.starts_with('[') {
        host.contains("]:")
    } else {
        host.matches(':').count() == 1
    };
    match (has_port, host.parse::<std::net::Ipv6Addr>()) {
        (true, _) => host.to_owned(),
        (false, Ok(v6)) => format!("[{v6}]:{port}"),
        (false, Err(_)) => format!("{host}:{port}"),
    }
}

/// Default registration lifetime, milliseconds.
pub const DEFAULT_REGISTER_TTL_MS: u64 = 5_000;

impl Config {
    /// The configuration a test wants: port 0 on loopback, no event log, defaults elsewhere.
    pub fn for_tests(id: &str) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            id: id.to_owned(),
            max_prime_digits: prime::DEFAULT_MAX_PRIME_DIGITS,
            max_fib_n: fibonacci::DEFAULT_MAX_FIB_N,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            workers: None,
            queue: pool::DEFAULT_QUEUE,
            inject_delay_ms: 0,
            grace_period_secs: DEFAULT_GRACE_PERIOD_SECS,
            exit_with_parent: false,
            register: false,
            advertise: None,
            register_ttl_ms: DEFAULT_REGISTER_TTL_MS,
            health_listen: None,
            tls: dlb::tls::TlsArgs::default(),
            authz: dlb::authz::AuthzArgs::default(),
            trace: dlb::trace::TraceArgs::default(),
            events: EventLogArgs::disabled(),
        }
    }

    /// The grace period as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }

    /// Workers for the CPU pool.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        })
    }

    /// Checks values that clap cannot.
    ///
    /// # Errors
    ///
    /// A one-line message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        dlb::metadata::validate_instance_id(&self.id).map_err(|e| format!("--id: {e}"))?;
        self.trace.check("dlb-compute", &self.id)?;
        if self.max_prime_digits == 0 {
            return Err("--max-prime-digits must be at least 1".to_owned());
        }
        if self.workers == Some(0) {
            return Err("--workers must be at least 1".to_owned());
        }
        if self.max_message_bytes < 1024 {
            return Err("--max-message-bytes must be at least 1024".to_owned());
        }
        self.events.config()?;
        self.tls.load()?;
        if self.register {
            if self.events.config()?.redis_url.is_none() {
                return Err(
                    "--register needs Redis: give --redis URL (or DLB_REDIS_URL), not \"none\""
                        .to_owned(),
                );
            }
            if self.register_ttl_ms < 1_000 {
                return Err("--register-ttl-ms must be at least 1000".to_owned());
            }
            // Said before binding anything.
            self.advertised(self.listen)?;
        }
        if let Some(advertise) = &self.advertise {
            dlb::dial::validate_host_port(&with_port(advertise, 1))
                .map_err(|e| format!("--advertise: {e}"))?;
        }
        Ok(())
    }

    /// The address to register: `--advertise`, or the one `local` listens on.
    ///
    /// # Errors
    ///
    /// A message when only a wildcard address is known.
    pub fn advertised(&self, local: SocketAddr) -> Result<String, String> {
        if let Some(advertise) = &self.advertise {
            return Ok(with_port(advertise, local.port()));
        }
        if local.ip().is_unspecified() {
            return Err(format!(
                "--register with --listen {local} needs --advertise HOST:PORT: the address other hosts reach this instance at"
            ));
        }
        Ok(local.to_string())
    }

    /// The registration lifetime.
    pub fn register_ttl(&self) -> Duration {
        Duration::from_millis(self.register_ttl_ms)
    }
}
