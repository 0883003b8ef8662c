//! Fixtures of the dashboard's end-to-end tests.

#![allow(dead_code)]

pub mod webdriver;

use dlb::testing::InProcess;
use dlb::testing::{RedisServer, workspace_binary};
use dlb_gateway::testing::RunningGateway;
use dlb_ui::testing::RunningUi;

/// A whole mesh on loopback: a private redis-server, control with real compute processes, a
/// gateway following control, and the dashboard over all three.
pub struct TestMesh {
    pub redis: RedisServer,
    pub control: InProcess,
    pub gateway: RunningGateway,
    pub ui: RunningUi,
}

impl TestMesh {
    /// Starts it with `computes` instances (A, B, C, ...), every service logging to Redis.
    pub async fn start(computes: usize) -> Self {
        let redis = RedisServer::start();
        let mut control_config =
            dlb_control::Config::for_tests(workspace_binary("dlb-compute"), computes);
        control_config.events.redis = redis.url();
        let control = dlb_control::testing::start(control_config).await.unwrap();
        let mut gateway_config = dlb_gateway::Config::for_tests(Vec::new());
        gateway_config.control = Some(control.uri());
        gateway_config.events.redis = redis.url();
        let gateway = RunningGateway::start(gateway_config, Vec::new(), false)
            .await
            .unwrap();
        let mut ui_config =
            dlb_ui::Config::for_tests(&gateway.addr.to_string(), Some(&control.addr.to_string()));
        ui_config.events.redis = redis.url();
        let ui = dlb_ui::testing::start(ui_config).await.unwrap();
        Self {
            redis,
            control,
            gateway,
            ui,
        }
    }

    /// Stops the dashboard, the gateway and control (which stops its instances).
    pub async fn shutdown(self) {
        self.ui.shutdown().await.unwrap();
        self.gateway.shutdown().await.unwrap();
        self.control.shutdown().await.unwrap();
    }
}
