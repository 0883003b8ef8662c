//! Starting a compute instance in-process for tests: port 0 on loopback, a handle to stop it.

use dlb::testing::InProcess;

use crate::{Config, run};

/// A compute instance running on this process's runtime.
pub type RunningCompute = InProcess;

/// Starts an instance with `config` (use port 0 in `config.listen`).
///
/// # Errors
///
/// The bind error.
pub async fn start(config: Config) -> std::io::Result<RunningCompute> {
    InProcess::start(config.listen, move |listener, shutdown| {
        run(listener, config, shutdown)
    })
    .await
}
