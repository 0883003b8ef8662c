//! `dlb.v1.Load`: the instance's own load (in-flight calls, CPU time, memory), read from the
//! service counters and from `/proc/self`.

use std::sync::Arc;

use dlb::proto::v1::{GetLoadRequest, LoadReport, load_server::Load};
use tonic::{Request, Response, Status};

use crate::pool::CpuPool;
use crate::service::CallStats;

/// Implements `dlb.v1.Load`.
#[derive(Debug, Clone)]
pub struct LoadService {
    id: String,
    calls: Arc<CallStats>,
    pool: CpuPool,
}

impl LoadService {
    /// Reports on the given counters as instance `id`.
    pub fn new(id: String, calls: Arc<CallStats>, pool: CpuPool) -> Self {
        Self { id, calls, pool }
    }
}

#[tonic::async_trait]
impl Load for LoadService {
    async fn get_load(
        &self,
        _request: Request<GetLoadRequest>,
    ) -> Result<Response<LoadReport>, Status> {
        let process = dlb::procfs::Usage::own().unwrap_or_default();
        Ok(Response::new(LoadReport {
            instance: self.id.clone(),
            in_flight: self.calls.in_flight(),
            served: self.calls.served(),
            rejected: self.pool.rejected(),
            cpu_micros: process.cpu_micros,
            rss_bytes: process.rss_bytes,
            uptime_ms: u64::try_from(self.calls.uptime().as_millis()).unwrap_or(u64::MAX),
            draining: self.calls.draining(),
            cancelled: self.pool.cancelled(),
            busy_workers: self.pool.busy() as u64,
            workers: self.pool.workers() as u64,
        }))
    }
}
