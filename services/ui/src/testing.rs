//! Starting the dashboard in-process for tests: port 0 on loopback, a handle to stop it.

use dlb::testing::InProcess;

use crate::{Config, StartError, run};

/// A dashboard running on this process's runtime.
pub type RunningUi = InProcess<StartError>;

/// Starts a dashboard with `config` (use port 0 in `config.listen`).
///
/// # Errors
///
/// The bind error.
pub async fn start(config: Config) -> std::io::Result<RunningUi> {
    InProcess::start(config.listen, move |listener, shutdown| {
        run(listener, config, shutdown)
    })
    .await
}
