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

/// Waits until the instance behind `channel` has a busy worker: a heavy call is computing.
///
/// # Panics
///
/// After [`dlb::testing::PATIENCE`], or when the instance does not answer `GetLoad`.
pub async fn wait_busy(channel: &tonic::transport::Channel) {
    use dlb::proto::v1::{GetLoadRequest, load_client::LoadClient};
    let load = LoadClient::new(channel.clone());
    dlb::testing::eventually("a busy worker", || {
        let mut load = load.clone();
        async move {
            let busy = load
                .get_load(GetLoadRequest {})
                .await
                .unwrap_or_else(|status| panic!("GetLoad: {status}"))
                .into_inner()
                .busy_workers;
            (busy > 0).then_some(())
        }
    })
    .await;
}
