//! Starting a gateway in-process for tests: port 0 on loopback, a handle to stop it.

use std::net::SocketAddr;

use dlb::testing::InProcess;
use tokio::net::TcpListener;

use crate::config::Backend;
use crate::{Config, RunError, run};

/// A gateway running on this process's runtime: [`InProcess`] and where it serves `/metrics`.
#[derive(Debug)]
pub struct RunningGateway {
    server: InProcess,
    /// Where it serves `/metrics`, if asked for.
    pub metrics_addr: Option<SocketAddr>,
}

impl std::ops::Deref for RunningGateway {
    type Target = InProcess;

    fn deref(&self) -> &InProcess {
        &self.server
    }
}

impl RunningGateway {
    /// Starts a gateway over a static list of `backends` (and `config.control`, if set) with
    /// `config` (use port 0), and `/metrics` on a port of its own when `metrics`.
    ///
    /// # Errors
    ///
    /// The bind error.
    pub async fn start(
        mut config: Config,
        backends: Vec<Backend>,
        metrics: bool,
    ) -> std::io::Result<Self> {
        config.backends = backends;
        let metrics = if metrics {
            Some(TcpListener::bind("127.0.0.1:0").await?)
        } else {
            None
        };
        let metrics_addr = metrics.as_ref().map(TcpListener::local_addr).transpose()?;
        let membership = config.membership();
        let server = InProcess::start(config.listen, move |listener, shutdown| {
            run(listener, metrics, config, membership, shutdown)
        })
        .await?;
        Ok(Self {
            server,
            metrics_addr,
        })
    }

    /// Starts a gateway whose instances come from `membership` alone (a test sends the
    /// changes), with `config` (use port 0), no `/metrics`.
    ///
    /// # Errors
    ///
    /// The bind error.
    pub async fn with_membership(
        config: Config,
        membership: Box<dyn crate::membership::Membership>,
    ) -> std::io::Result<Self> {
        let server = InProcess::start(config.listen, move |listener, shutdown| {
            run(listener, None, config, membership, shutdown)
        })
        .await?;
        Ok(Self {
            server,
            metrics_addr: None,
        })
    }

    /// Drains and waits for [`run`] to return; a panic in it is passed on.
    ///
    /// # Errors
    ///
    /// What `run` returned.
    pub async fn shutdown(self) -> Result<(), RunError> {
        self.server.shutdown().await
    }
}
