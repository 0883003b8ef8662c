//! Tracing set-up for binaries. Libraries only emit events; only `main` installs a subscriber.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset: dlb at info, dependencies at warn.
pub const DEFAULT_FILTER: &str = "warn,dlb=info,dlb_compute=info";

/// Installs a compact stderr subscriber filtered by `RUST_LOG` (default [`DEFAULT_FILTER`]).
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // A second init (for example in a test harness) is harmless, so its error is ignored.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .compact()
        .try_init();
}
