//! The span exporter: ended spans wait in a bounded queue, and a task sends them to the
//! collector in batches (`OTEL_BSP_*`: up to 512 per export, at least every 5 s, at most
//! 2,048 waiting). A call never waits on it: a full queue drops the span and counts it. An
//! export that fails is tried once more a second later, then its spans are given up (and
//! counted), so a collector that is away costs a bounded amount of memory. At the end the
//! queue is flushed within the export timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::proto::trace_service_client::TraceServiceClient;
use super::proto::{self, any_value};
use super::{Kind, Settings, SpanData, Tracer, Value};

/// Ended spans waiting to be exported.
#[derive(Debug)]
pub(super) struct Queue {
    spans: Mutex<Vec<SpanData>>,
    wake: tokio::sync::Notify,
    max: usize,
    batch: usize,
    /// Spans lost: the queue full, or their export failed twice.
    dropped: AtomicU64,
    exported: AtomicU64,
}

impl Queue {
    pub(super) fn new(max: usize, batch: usize) -> Self {
        Self {
            spans: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            max,
            batch,
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<SpanData>> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn push(&self, span: SpanData) {
        let mut spans = self.lock();
        if spans.len() >= self.max {
            drop(spans);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        spans.push(span);
        let full = spans.len() >= self.batch;
        drop(spans);
        if full {
            self.wake.notify_one();
        }
    }

    /// Spans lost so far.
    #[cfg(test)]
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Up to a batch of the oldest spans, and how many stay behind.
    pub(super) fn take(&self) -> (Vec<SpanData>, usize) {
        let mut spans = self.lock();
        let n = spans.len().min(self.batch);
        let batch: Vec<SpanData> = spans.drain(..n).collect();
        (batch, spans.len())
    }
}

/// Tracing on: the tracer to make spans with, and the task exporting them.
#[derive(Debug)]
pub struct Exporting {
    tracer: Tracer,
    queue: Arc<Queue>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    timeout: Duration,
}

impl Exporting {
    /// Starts exporting as `settings` say (on the current tokio runtime).
    ///
    /// # Errors
    ///
    /// The collector's address, or a certificate file for `https://`, is unusable.
    pub fn start(settings: Settings) -> Result<Self, String> {
        let channel = channel(&settings)?;
        let queue = Arc::new(Queue::new(settings.max_queue, settings.max_batch));
        let stop = CancellationToken::new();
        let tracer = Tracer::recording(Arc::clone(&queue), settings.sampler);
        let timeout = settings.timeout;
        let task = tokio::spawn(run(
            TraceServiceClient::new(channel),
            settings,
            Arc::clone(&queue),
            stop.clone(),
        ));
        Ok(Self {
            tracer,
            queue,
            stop,
            task,
            timeout,
        })
    }

    /// Tracing as `args` and the environment say for a process of `service` (`dlb-gateway`)
    /// and `instance`: a tracer, and the exporter to [`Exporting::finish`] at the end (none
    /// when tracing is off).
    ///
    /// # Errors
    ///
    /// A bad setting (see [`Settings::from_env`]) or an unusable address.
    pub fn from_args(
        args: &super::TraceArgs,
        service: &str,
        instance: &str,
    ) -> Result<(Tracer, Option<Self>), String> {
        match Settings::from_process(args, service, instance)? {
            None => Ok((Tracer::default(), None)),
            Some(settings) => {
                let exporting = Self::start(settings)?;
                Ok((exporting.tracer(), Some(exporting)))
            }
        }
    }

    /// The tracer whose recorded spans this exports.
    pub fn tracer(&self) -> Tracer {
        self.tracer.clone()
    }

    /// Spans exported so far, and spans lost.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.queue.exported.load(Ordering::Relaxed),
            self.queue.dropped.load(Ordering::Relaxed),
        )
    }

    /// Exports what is left (within the export timeout, plus a second) and stops. Says how
    /// many spans were exported and how many lost.
    pub async fn finish(self) -> (u64, u64) {
        self.stop.cancel();
        let bound = self.timeout + Duration::from_secs(1);
        if tokio::time::timeout(bound, self.task).await.is_err() {
            tracing::warn!("traces: the last spans could not be exported in time");
        }
        let (exported, dropped) = (
            self.queue.exported.load(Ordering::Relaxed),
            self.queue.dropped.load(Ordering::Relaxed),
        );
        if dropped > 0 {
            tracing::warn!(exported, dropped, "traces: some spans were not exported");
        }
        (exported, dropped)
    }
}

/// The channel to the collector (connected on first use).
fn channel(settings: &Settings) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| format!("--otlp-endpoint {}: {e}", settings.endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(settings.timeout);
    if settings.endpoint.starts_with("https://") {
        let read = |path: &str| {
            std::fs::read(path).map_err(|e| format!("cannot read {path} (OTLP TLS): {e}"))
        };
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &settings.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&settings.client_cert_file, &settings.client_key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("--otlp-endpoint {}: {e}", settings.endpoint))?;
    }
    Ok(endpoint.connect_lazy())
}

/// The export task: a batch whenever one is full, the schedule delay has passed, or at the
/// end (then everything left).
async fn run(
    mut client: TraceServiceClient<Channel>,
    settings: Settings,
    queue: Arc<Queue>,
    stop: CancellationToken,
) {
    let resource = proto::Resource {
        attributes: std::iter::once(("service.name".to_owned(), settings.service_name.clone()))
            .chain(settings.resource.iter().cloned())
            .chain(std::iter::once((
                "service.version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )))
            .map(|(key, value)| key_value(key, &Value::from(value)))
            .collect(),
        dropped_attributes_count: 0,
    };
    let mut warned: Option<Instant> = None;
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = queue.wake.notified() => false,
            () = tokio::time::sleep(settings.schedule_delay) => false,
        };
        loop {
            let (batch, left) = queue.take();
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            let request = proto::ExportTraceServiceRequest {
                resource_spans: vec![proto::ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![proto::ScopeSpans {
                        scope: Some(proto::InstrumentationScope {
                            name: "dlb".to_owned(),
                            version: env!("CARGO_PKG_VERSION").to_owned(),
                        }),
                        spans: batch.into_iter().map(span).collect(),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            let mut result = export(&mut client, &settings, request.clone()).await;
            if result.is_err() && !stopping {
                tokio::time::sleep(Duration::from_secs(1)).await;
                result = export(&mut client, &settings, request).await;
            }
            match result {
                Ok(rejected) => {
                    queue
                        .exported
                        .fetch_add(n.saturating_sub(rejected), Ordering::Relaxed);
                    queue.dropped.fetch_add(rejected, Ordering::Relaxed);
                }
                Err(why) => {
                    queue.dropped.fetch_add(n, Ordering::Relaxed);
                    // Said once a minute at most: a collector away must not flood stderr.
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        warned = Some(Instant::now());
                        tracing::warn!(
                            endpoint = %settings.endpoint,
                            lost = queue.dropped.load(Ordering::Relaxed),
                            "traces: cannot export spans: {why}"
                        );
                    }
                }
            }
            if !stopping && left < queue.batch {
                break;
            }
        }
        if stopping {
            return;
        }
    }
}

/// One export; the spans the collector says it rejected.
async fn export(
    client: &mut TraceServiceClient<Channel>,
    settings: &Settings,
    request: proto::ExportTraceServiceRequest,
) -> Result<u64, String> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(settings.timeout);
    for (key, value) in &settings.headers {
        // Checked when the settings were read.
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    match tokio::time::timeout(settings.timeout, client.export(request)).await {
        Err(_) => Err(format!("no answer within {:?}", settings.timeout)),
        Ok(Err(status)) => Err(format!(
            "{}: {}",
            crate::status::code_name(status.code()),
            status.message()
        )),
        Ok(Ok(answer)) => Ok(answer
            .into_inner()
            .partial_success
            .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))),
    }
}

fn key_value(key: impl Into<String>, value: &Value) -> proto::KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s.to_string()),
        Value::Int(n) => any_value::Value::IntValue(*n),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
    };
    proto::KeyValue {
        key: key.into(),
        value: Some(proto::AnyValue { value: Some(value) }),
    }
}

/// A recorded span as OTLP has it.
fn span(data: SpanData) -> proto::Span {
    use proto::span::SpanKind;
    use proto::status::StatusCode;
    let kind = match data.kind {
        Kind::Server => SpanKind::Server,
        Kind::Client => SpanKind::Client,
        Kind::Internal => SpanKind::Internal,
    };
    let status = match data.error {
        Some(message) => proto::Status {
            message,
            code: StatusCode::Error.into(),
        },
        None => proto::Status {
            message: String::new(),
            code: StatusCode::Unset.into(),
        },
    };
    proto::Span {
        trace_id: data.context.trace_id.to_vec(),
        span_id: data.context.span_id.to_vec(),
        trace_state: data.trace_state.unwrap_or_default(),
        parent_span_id: data.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: data.name.into_owned(),
        kind: kind.into(),
        start_time_unix_nano: data.start_unix_nanos,
        end_time_unix_nano: data.end_unix_nanos,
        attributes: data
            .attributes
            .iter()
            .map(|(key, value)| key_value(*key, value))
            .collect(),
        dropped_attributes_count: 0,
        status: Some(status),
        // The W3C flags (sampled), and "parent known as remote or not" left unset.
        flags: u32::from(data.context.sampled),
    }
}
