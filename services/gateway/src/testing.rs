//! Starting a gateway in-process for tests: port 0 on loopback, a handle to stop it.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Backend;
use crate::{Config, RunError, run};

/// A gateway running on this process's runtime.
#[derive(Debug)]
pub struct RunningGateway {
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Where it serves `/metrics`, if asked for.
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl RunningGateway {
    /// Starts a gateway over a static list of `backends` (and `config.control`, if set) with
    /// `config` (use port 0).
    ///
    /// # Errors
    ///
    /// The bind error.
    pub async fn start(
        mut config: Config,
        backends: Vec<Backend>,
        metrics: bool,
    ) -> std::io::Result<Self> {
        config.backends = backends.clone();
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let metrics = if metrics {
            Some(TcpListener::bind("127.0.0.1:0").await?)
        } else {
            None
        };
        let metrics_addr = metrics.as_ref().map(TcpListener::local_addr).transpose()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let membership = config.membership();
        let task = tokio::spawn(run(listener, metrics, config, membership, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            metrics_addr,
            stop: Some(stop),
            task,
        })
    }

    /// `http://` URI of the gateway.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drains and waits for [`run`] to return.
    ///
    /// # Errors
    ///
    /// What `run` returned.
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(RunError::Config(format!("gateway task failed: {join}"))),
        }
    }
}
