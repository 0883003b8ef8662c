//! A minimal OTLP trace receiver: what `dlb bench-suite` points traced gateways at (counting
//! spans), and what in-process tests read spans from. The tracing tests proper use a receiver
//! built on the official OTLP code in another stack (`tests/interop/otlp_receiver.py`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::proto::trace_service_server::{TraceService, TraceServiceServer};
use super::proto::{ExportTraceServiceRequest, ExportTraceServiceResponse, Span};

/// A receiver serving on 127.0.0.1 until dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Shared {
    spans: AtomicU64,
    /// Every span with its `service.name`, when kept.
    kept: Option<Mutex<Vec<(String, Span)>>>,
}

#[derive(Debug, Clone)]
struct Service(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.clone())
                .map(|v| match v {
                    super::proto::any_value::Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                self.0
                    .spans
                    .fetch_add(scope.spans.len() as u64, Ordering::Relaxed);
                if let Some(kept) = &self.0.kept {
                    let mut kept = kept
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    kept.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Starts one on a free port of 127.0.0.1; `keep`: hold every span for [`Receiver::spans`]
    /// (else only count them).
    ///
    /// # Errors
    ///
    /// The port cannot be bound.
    pub async fn start(keep: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            spans: AtomicU64::new(0),
            kept: keep.then(Mutex::default),
        });
        let service = TraceServiceServer::new(Service(Arc::clone(&shared)));
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!("OTLP receiver: {error}");
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Its URL, for `--otlp-endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Spans received so far.
    pub fn count(&self) -> u64 {
        self.shared.spans.load(Ordering::Relaxed)
    }

    /// The spans received so far with their `service.name` (none unless kept).
    pub fn spans(&self) -> Vec<(String, Span)> {
        self.shared.kept.as_ref().map_or_else(Vec::new, |kept| {
            kept.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
