//! The gateway with real compute instances on 127.0.0.1 port 0, one module per theme:
//! `balancing` (rotation, stats, metrics, no healthy instance), `failover` (instances killed,
//! stopped, resetting streams or closing connections under load), `deadlines` (slow calls,
//! expired deadlines), `events` (Redis outages under load) and `limits` (overload, stream and
//! connection bounds, bad and oversize input, large messages). The fixtures they share are
//! here; `../support` has those of the other gateway test binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod balancing;
mod deadlines;
mod events;
mod failover;
mod limits;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dlb::client::Op;
use dlb::client::bench::{self, BenchConfig, Progress};
use dlb::events::EventLogArgs;
use dlb::proto::v1::{
    FibonacciRequest, GetLoadRequest, ReverseRequest, load_client::LoadClient,
    operations_client::OperationsClient,
};
use dlb::testing::RedisServer;
use dlb_compute::testing::RunningCompute;
use dlb_gateway::Config;
use dlb_gateway::config::Backend;
use dlb_gateway::testing::RunningGateway;
use support::{ComputeProcess, PATIENCE, channel, state_of, stats, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

/// Tests that load the machine take turns: one test's load must not starve another's health
/// probes and retries on two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn heavy_turn() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// Real compute processes A, B and C behind an in-process gateway, all serving.
async fn three_processes_behind_a_gateway() -> (Vec<ComputeProcess>, RunningGateway, Channel) {
    let computes: Vec<ComputeProcess> = ["A", "B", "C"]
        .iter()
        .map(|id| ComputeProcess::start(id, "127.0.0.1:0"))
        .collect();
    let gateway = RunningGateway::start(
        Config::for_tests(vec![]),
        computes.iter().map(ComputeProcess::backend).collect(),
        false,
    )
    .await
    .unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, &["A", "B", "C"], PATIENCE).await;
    (computes, gateway, gw)
}

async fn in_process(ids: &[&str]) -> Vec<RunningCompute> {
    let mut computes = Vec::new();
    for id in ids {
        computes.push(
            dlb_compute::testing::start(dlb_compute::Config::for_tests(id))
                .await
                .unwrap(),
        );
    }
    computes
}

/// In-process instances `ids` behind a gateway started with `config`, once all serve.
async fn gateway_over(
    ids: &[&str],
    config: Config,
) -> (Vec<RunningCompute>, RunningGateway, Channel) {
    let computes = in_process(ids).await;
    let (gateway, gw) = gateway_with(config, backends(&computes, ids), ids).await;
    (computes, gateway, gw)
}

/// A gateway over `list`, once instances `ids` serve.
async fn gateway_with(
    config: Config,
    list: Vec<Backend>,
    ids: &[&str],
) -> (RunningGateway, Channel) {
    let gateway = RunningGateway::start(config, list, false).await.unwrap();
    let gw = channel(&gateway.uri()).await;
    wait_serving(&gw, ids, PATIENCE).await;
    (gateway, gw)
}

/// A gateway over `addr` alone, as instance R, once it serves.
async fn gateway_over_r(addr: std::net::SocketAddr) -> (RunningGateway, Channel) {
    let list = vec![Backend {
        id: "R".to_owned(),
        addr: addr.to_string(),
    }];
    gateway_with(Config::for_tests(vec![]), list, &["R"]).await
}

/// Stops the gateway, then the instances.
async fn stop(gateway: RunningGateway, computes: Vec<RunningCompute>) {
    gateway.shutdown().await.unwrap();
    for c in computes {
        c.shutdown().await.unwrap();
    }
}

fn backends(computes: &[RunningCompute], ids: &[&str]) -> Vec<Backend> {
    computes
        .iter()
        .zip(ids)
        .map(|(c, id)| Backend {
            id: (*id).to_owned(),
            addr: c.addr.to_string(),
        })
        .collect()
}

async fn reverse(
    gateway: &Channel,
    text: &str,
) -> Result<tonic::Response<dlb::proto::v1::ReverseResponse>, tonic::Status> {
    OperationsClient::new(gateway.clone())
        .reverse(ReverseRequest { text: text.into() })
        .await
}

fn load(gateway: &RunningGateway, concurrency: usize, requests: u64) -> BenchConfig {
    dlb::testing::load(gateway.addr, concurrency, requests)
}

/// What a raw instance does with a call (health checks are always answered SERVING).
#[derive(Clone)]
enum OnCall {
    /// Resets it with REFUSED_STREAM, or answers every `answer_every`-th.
    Reset { answer_every: Option<usize> },
    /// Closes the connection it came on, answering nothing.
    Close,
    /// Answers it (`Reverse("abc")`), and after every `calls` calls on one connection closes
    /// that connection gracefully (GOAWAY, as a server recycling its connections does).
    GoAwayAfter { calls: usize },
    /// Answers it; once `now` is set, every new connection is closed (GOAWAY with NO_ERROR,
    /// no stream processed) as soon as it is made (connections made before go on).
    GoAwayNewConnections {
        now: Arc<std::sync::atomic::AtomicBool>,
    },
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    // On a blocking thread: the gateway serves /metrics on this test's runtime.
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || dlb::testing::http_get(addr, &path))
        .await
        .unwrap()
        .unwrap()
}

/// An HTTP/2 server that answers every health check with SERVING (keeping `Watch` open) and
/// resets calls with REFUSED_STREAM, as an instance past its own stream limit does: all of
/// them, or all but every `answer_every`-th, which it answers as `Reverse("abc")`. Also
/// returns the count of calls (not health checks) it received.
async fn resetting_instance(
    answer_every: Option<usize>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    raw_instance(OnCall::Reset { answer_every }).await
}

/// An HTTP/2 server on 127.0.0.1 port 0 doing `on_call` with every call; see
/// [`resetting_instance`].
async fn raw_instance(
    on_call: OnCall,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use tonic::codegen::http;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let calls = Arc::clone(&calls);
            let on_call = on_call.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                if let OnCall::GoAwayNewConnections { now } = &on_call
                    && now.load(Ordering::Relaxed)
                {
                    // GOAWAY(last stream 0, NO_ERROR): nothing on it will be processed.
                    connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
                let mut on_this_connection = 0;
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let path = request.uri().path().to_owned();
                    let (message, end) = if path.starts_with("/grpc.health.v1.Health/") {
                        // HealthCheckResponse { status: SERVING }; Watch stays open.
                        (
                            &[0u8, 0, 0, 0, 2, 0x08, 0x01][..],
                            !path.ends_with("/Watch"),
                        )
                    } else {
                        let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
                        on_this_connection += 1;
                        let answer_every = match &on_call {
                            OnCall::Reset { answer_every } => *answer_every,
                            // Dropping the connection closes it.
                            OnCall::Close => return,
                            OnCall::GoAwayAfter { calls } => {
                                if on_this_connection % calls == 0 {
                                    // Streams already open are still served; accept() ends
                                    // once they are done.
                                    connection.graceful_shutdown();
                                }
                                Some(1)
                            }
                            OnCall::GoAwayNewConnections { .. } => Some(1),
                        };
                        if answer_every.is_none_or(|every| !n.is_multiple_of(every)) {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        // ReverseResponse { text: "cba" }
                        (&[0u8, 0, 0, 0, 5, 0x0a, 3, b'c', b'b', b'a'][..], true)
                    };
                    // Answered from a task of its own: the connection must go on being
                    // polled while the request body is read.
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        while let Some(Ok(data)) = body.data().await {
                            let _ = body.flow_control().release_capacity(data.len());
                        }
                        let head = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(head, false) else {
                            return;
                        };
                        let _ = send.send_data(bytes::Bytes::from_static(message), false);
                        if end {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let _ = send.send_trailers(trailers);
                        } else {
                            std::future::pending::<()>().await;
                        }
                    });
                }
                // Closed gracefully: what is queued still goes out before the socket closes.
                let _ = std::future::poll_fn(|cx| connection.poll_closed(cx)).await;
            });
        }
    });
    (addr, task, counted)
}
