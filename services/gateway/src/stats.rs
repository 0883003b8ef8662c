//! `dlb.v1.Gateway/Stats` and the Prometheus text on `/metrics`: the same numbers, two formats.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dlb::events::EventLog;
use dlb::proto::v1::{
    InstanceStats, MethodStats, StatsRequest, StatsResponse, gateway_server::Gateway,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::endpoint::EndpointTable;
use crate::relay::{Counters, GatewayService};

/// Everything the stats are read from.
#[derive(Debug, Clone)]
pub struct StatsSource {
    /// Endpoints.
    pub table: Arc<EndpointTable>,
    /// Gateway counters.
    pub counters: Arc<Counters>,
    /// The forwarding service (for in-flight calls).
    pub service: GatewayService,
    /// The event log (for its counters).
    pub events: EventLog,
    /// Policy name.
    pub policy: &'static str,
    /// Bound on calls in flight.
    pub max_in_flight: usize,
    /// Health probe interval, ms.
    pub health_interval_ms: u64,
    /// The callers' connections (for how many are open).
    pub connections: dlb::server::Incoming,
    /// Bound on them (`--max-connections`).
    pub max_connections: usize,
    /// Probe timeout, ms.
    pub probe_timeout_ms: u64,
    /// Authorization (for its refusals).
    pub authz: dlb::authz::Guard,
}

impl StatsSource {
    /// A snapshot as the protobuf message.
    pub fn snapshot(&self) -> StatsResponse {
        let events = self.events.stats();
        StatsResponse {
            instances: self
                .service
                .pools()
                .iter()
                .flat_map(|pool| pool.table.all().into_iter().map(move |e| (pool, e)))
                .map(|(pool, e)| {
                    let s = e.snapshot();
                    InstanceStats {
                        instance: s.id,
                        address: s.addr,
                        state: s.state.name().to_owned(),
                        requests: s.requests,
                        errors: s.errors,
                        in_flight: s.in_flight,
                        rate: s.rate,
                        p50_us: s.p50_us,
                        p99_us: s.p99_us,
                        state_since_ms: s.state_since_ms,
                        pool: pool.name.clone(),
                        back_at_ms: s.ejection.as_ref().map_or(0, |e| e.1),
                        ejection: s.ejection.map(|e| e.0).unwrap_or_default(),
                        ejections: s.ejections,
                    }
                })
                .collect(),
            methods: self
                .service
                .methods()
                .snapshot()
                .into_iter()
                .map(|(method, t)| MethodStats {
                    method,
                    pool: t.pool,
                    calls: t.calls,
                    failures: t.failures,
                    messages_in: t.messages_in,
                    messages_out: t.messages_out,
                    mean_duration_us: if t.calls == 0 {
                        0.0
                    } else {
                        t.duration_us as f64 / t.calls as f64
                    },
                })
                .collect(),
            policy: self.policy.to_owned(),
            in_flight: self.service.in_flight() as u64,
            max_in_flight: self.max_in_flight as u64,
            requests: self.counters.requests.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
            hedges: self.counters.hedges.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
            health_interval_ms: self.health_interval_ms,
            probe_timeout_ms: self.probe_timeout_ms,
            events_written: events.written,
            events_dropped: events.dropped,
            events_queued: events.queued,
        }
    }

    /// The snapshot as Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let per = |f: &dyn Fn(&InstanceStats) -> String| -> Vec<(String, String)> {
            s.instances
                .iter()
                .map(|i| {
                    let labels = format!("{{instance=\"{}\",pool=\"{}\"}}", i.instance, i.pool);
                    (labels, f(i))
                })
                .collect()
        };
        metric(
            "dlb_gateway_instance_requests_total",
            "counter",
            "Calls sent to the instance.",
            per(&|i| i.requests.to_string()),
        );
        metric(
            "dlb_gateway_instance_errors_total",
            "counter",
            "Calls to the instance that failed.",
            per(&|i| i.errors.to_string()),
        );
        metric(
            "dlb_gateway_instance_in_flight",
            "gauge",
            "Calls in flight to the instance.",
            per(&|i| i.in_flight.to_string()),
        );
        metric(
            "dlb_gateway_instance_rate",
            "gauge",
            "Calls per second over the last 10 s.",
            per(&|i| format!("{:.3}", i.rate)),
        );
        metric(
            "dlb_gateway_instance_latency_p50_seconds",
            "gauge",
            "Median call latency.",
            per(&|i| format!("{:.6}", i.p50_us / 1e6)),
        );
        metric(
            "dlb_gateway_instance_latency_p99_seconds",
            "gauge",
            "99th percentile call latency.",
            per(&|i| format!("{:.6}", i.p99_us / 1e6)),
        );
        metric(
            "dlb_gateway_instance_serving",
            "gauge",
            "1 when the instance is in the rotation.",
            per(&|i| u8::from(i.state == "serving").to_string()),
        );
        metric(
            "dlb_gateway_instance_outlier_ejected",
            "gauge",
            "1 while the instance is ejected as an outlier (its answers failed).",
            per(&|i| u8::from(!i.ejection.is_empty()).to_string()),
        );
        metric(
            "dlb_gateway_instance_outlier_ejections_total",
            "counter",
            "Times the instance was ejected as an outlier.",
            per(&|i| i.ejections.to_string()),
        );
        // Methods: a bounded set (see crate::methods), paths of [A-Za-z0-9._/] (anything
        // else is escaped as the exposition format asks).
        let by_method = |f: &dyn Fn(&MethodStats) -> String| -> Vec<(String, String)> {
            s.methods
                .iter()
                .map(|m| {
                    let labels = format!(
                        "{{method=\"{}\",pool=\"{}\"}}",
                        escape_label(&m.method),
                        m.pool
                    );
                    (labels, f(m))
                })
                .collect()
        };
        metric(
            "dlb_gateway_method_calls_total",
            "counter",
            "Calls finished, by method.",
            by_method(&|m| m.calls.to_string()),
        );
        metric(
            "dlb_gateway_method_failures_total",
            "counter",
            "Calls that ended with a status other than OK, by method.",
            by_method(&|m| m.failures.to_string()),
        );
        metric(
            "dlb_gateway_method_messages_in_total",
            "counter",
            "Messages from callers to instances, by method.",
            by_method(&|m| m.messages_in.to_string()),
        );
        metric(
            "dlb_gateway_method_messages_out_total",
            "counter",
            "Messages from instances to callers, by method.",
            by_method(&|m| m.messages_out.to_string()),
        );
        metric(
            "dlb_gateway_method_duration_seconds_mean",
            "gauge",
            "Mean call (or stream) duration, by method.",
            by_method(&|m| format!("{:.6}", m.mean_duration_us / 1e6)),
        );
        let one = |v: u64| vec![(String::new(), v.to_string())];
        metric(
            "dlb_gateway_requests_total",
            "counter",
            "Calls answered by the gateway.",
            one(s.requests),
        );
        metric(
            "dlb_gateway_retries_total",
            "counter",
            "Retries on another instance.",
            one(s.retries),
        );
        metric(
            "dlb_gateway_permission_denied_total",
            "counter",
            "Calls refused because the caller's certificate identity is not allowed the method (mutual TLS).",
            one(self.authz.denied()),
        );
        metric(
            "dlb_gateway_hedges_total",
            "counter",
            "Second copies of calls slower than --hedge-after (the slower copy is cancelled).",
            one(s.hedges),
        );
        metric(
            "dlb_gateway_failures_total",
            "counter",
            "Calls answered with an error.",
            one(s.failures),
        );
        metric(
            "dlb_gateway_in_flight",
            "gauge",
            "Calls being served.",
            one(s.in_flight),
        );
        metric(
            "dlb_gateway_connections",
            "gauge",
            "Callers' connections open (closing ones included).",
            one(self.connections.open() as u64),
        );
        metric(
            "dlb_gateway_max_connections",
            "gauge",
            "Callers' connections accepted at once (--max-connections).",
            one(self.max_connections as u64),
        );
        metric(
            "dlb_gateway_events_written_total",
            "counter",
            "Events written to Redis.",
            one(s.events_written),
        );
        metric(
            "dlb_gateway_events_dropped_total",
            "counter",
            "Events dropped while Redis was away.",
            one(s.events_dropped),
        );
        out
    }
}

/// Implements `dlb.v1.Gateway`.
/// A label value as the Prometheus text format wants it: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Debug, Clone)]
pub struct GatewayStatsService(pub StatsSource);

#[tonic::async_trait]
impl Gateway for GatewayStatsService {
    async fn stats(
        &self,
        _request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(self.0.snapshot()))
    }
}

/// Largest HTTP request head read on the metrics port.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Serves `GET /metrics` (and nothing else) on `listener` until `cancel`.
pub async fn serve_metrics(listener: TcpListener, source: StatsSource, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => return,
        };
        let mut socket = match accepted {
            Ok((socket, _)) => socket,
            Err(error) if dlb::server::out_of_resources(&error) => {
                tracing::warn!(%error, "/metrics: cannot accept a connection; trying again soon");
                tokio::time::sleep(dlb::server::ACCEPT_BACKOFF).await;
                continue;
            }
            Err(_) => continue,
        };
        let source = source.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD_BYTES {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let request_line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let (status, content_type, body) = match request_line {
                b"GET /metrics HTTP/1.1" | b"GET /metrics HTTP/1.0" => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    source.prometheus(),
                ),
                _ => (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "only GET /metrics is served here\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
