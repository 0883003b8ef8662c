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
        let process = ProcessUsage::read().unwrap_or_default();
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

/// CPU time and memory of this process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUsage {
    /// User + system CPU time, microseconds.
    pub cpu_micros: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Linux reports CPU times in `/proc` in USER_HZ ticks, which the kernel ABI fixes at 100/s.
const TICKS_PER_SECOND: u64 = 100;

impl ProcessUsage {
    /// Reads `/proc/self/stat` and `/proc/self/status`; `None` where they are missing (not Linux).
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(Self {
            cpu_micros: (utime + stime) * (1_000_000 / TICKS_PER_SECOND),
            rss_bytes: rss_kib * 1024,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process_usage() {
        let usage = ProcessUsage::read().expect("/proc is readable on Linux");
        assert!(usage.rss_bytes > 0);
        // Burn some CPU so the counter moves past zero.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(ProcessUsage::read().unwrap().cpu_micros > 0);
    }
}
