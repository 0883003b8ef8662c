//! Starting a compute instance in-process for tests: port 0 on loopback, a handle to stop it.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{Config, RunError, run};

/// A compute instance running on this process's runtime.
#[derive(Debug)]
pub struct RunningCompute {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl RunningCompute {
    /// Binds `config.listen` (use port 0) and starts serving; the listener is bound before this
    /// returns, so calls can be made at once.
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

    /// `http://` URI of the instance.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Triggers the drain (as SIGTERM does) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Drains and waits for [`run`] to return.
    ///
    /// # Errors
    ///
    /// What `run` returned, or a panic of its task as [`RunError::Config`].
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        self.begin_shutdown();
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(RunError::Config(format!("compute task failed: {join}"))),
        }
    }
}
