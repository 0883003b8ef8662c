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

    /// Seconds to wait for in-flight calls after SIGTERM before stopping anyway.
    #[arg(long, env = "DLB_COMPUTE_GRACE_PERIOD_SECS", default_value_t = DEFAULT_GRACE_PERIOD_SECS)]
    pub grace_period_secs: u64,

    /// Drain and exit when the parent process goes away (set by dlb-control, so that no
    /// instance outlives its supervisor, even one killed with SIGKILL).
    #[arg(long, env = "DLB_COMPUTE_EXIT_WITH_PARENT")]
    pub exit_with_parent: bool,

    /// Where events go (the Redis event log).
    #[command(flatten)]
    pub events: EventLogArgs,
}

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
            grace_period_secs: DEFAULT_GRACE_PERIOD_SECS,
            exit_with_parent: false,
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
        Ok(())
    }
}
