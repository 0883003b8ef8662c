//! Starting the control service in-process for tests: port 0 on loopback.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{Config, RunError, run};

/// A control service running on this process's runtime (its instances are real processes).
#[derive(Debug)]
pub struct RunningControl {
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl RunningControl {
    /// Binds `config.listen` (use port 0) and starts.
    ///
    /// # Errors
    ///
    /// The bind error.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, config, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// `http://` URI.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops every instance and waits for [`run`] to return.
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
            Err(join) => Err(RunError::Config(format!("control task failed: {join}"))),
        }
    }
}
