//! Starting the control service in-process for tests (its instances are real processes).

use dlb::testing::InProcess;

use crate::{Config, run};

/// A control service running on this process's runtime.
pub type RunningControl = InProcess;

/// Starts control with `config` (use port 0 in `config.listen`).
///
/// # Errors
///
/// The bind error.
pub async fn start(config: Config) -> std::io::Result<RunningControl> {
    InProcess::start(config.listen, move |listener, shutdown| {
        run(listener, config, shutdown)
    })
    .await
}
