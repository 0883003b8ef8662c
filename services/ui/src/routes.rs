//! The dashboard's routes. Pages read (`GET`), never change anything; every change is a `POST`
//! that passes [`crate::security::guard_writes`] first.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page (its CSRF token in `<meta name="csrf-token">`) |
//! | `GET /assets/{app.js,app.css,favicon.svg}` | the only assets; nothing from other hosts |
//! | `GET /healthz` | `ok` once serving |
//! | `GET /api/snapshot` | instances, gateway settings, which sources answer |
//! | `GET /api/history` | throughput per instance, last five minutes |
//! | `GET /api/events?kind=&limit=` | latest events, newest first |
//! | `GET /api/stream` | server-sent events: `snapshot`, `log`, `resync` |
//! | `POST /api/call` | run one operation through the gateway |
//! | `POST /api/instances` | add an instance |
//! | `POST /api/instances/{id}/{start,stop,kill,remove}` | lifecycle |

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use dlb::client::Op;
use dlb::events::Kind;
use dlb::proto::v1::{AddInstanceRequest, InstanceRequest, StopInstanceRequest};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::{Stream, StreamExt};

use crate::AppState;
use crate::collector::Live;
use crate::error::AppError;

/// Events shown by default.
pub const DEFAULT_EVENTS: usize = 50;

/// Most events one request may ask for.
pub const MAX_EVENTS: usize = 200;

/// How far back in the log a kind filter looks (the list's default cap).
pub const FILTER_SCAN: usize = dlb::events::DEFAULT_MAX_ENTRIES;

/// Longest Fibonacci value sent to the page, in digits; the digit count is always exact.
pub const MAX_SHOWN_DIGITS: usize = 10_000;

/// How long a lifecycle request may take (a drain waits for calls in flight, then the grace
/// period).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const FAVICON: &str = include_str!("../assets/favicon.svg");

/// The page.
pub async fn index(State(state): State<AppState>) -> Html<String> {
    Html(state.inner.page.clone())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `app.js`.
pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `app.css`.
pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// `favicon.svg`.
pub async fn favicon() -> Response {
    asset("image/svg+xml", FAVICON)
}

/// Liveness for scripts (`dlb up` waits on it).
pub async fn healthz() -> &'static str {
    "ok"
}

/// Anything else.
pub async fn not_found(uri: Uri) -> AppError {
    AppError::NotFound(format!("no such page: {}", uri.path()))
}

/// A method the route does not take (axum adds the `Allow` header).
pub async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    let message = if method == axum::http::Method::GET {
        format!("{} changes state: use POST", uri.path())
    } else {
        format!("{method} is not allowed on {}", uri.path())
    };
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "error": message })),
    )
        .into_response()
}

/// The latest snapshot.
pub async fn snapshot(State(state): State<AppState>) -> Response {
    Json(&*state.inner.collector.snapshot()).into_response()
}

/// Throughput history.
pub async fn history(State(state): State<AppState>) -> Response {
    Json(state.inner.collector.history()).into_response()
}

/// Query of `/api/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// `request`, `health`, `lifecycle`, `error`, or `all` (default).
    kind: Option<String>,
    /// How many, at most [`MAX_EVENTS`].
    limit: Option<usize>,
}

/// The latest events, newest first, optionally of one kind.
pub async fn events(
    State(state): State<AppState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(DEFAULT_EVENTS);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(AppError::BadRequest(format!(
            "limit must be between 1 and {MAX_EVENTS}, got {limit}"
        )));
    }
    let kind = match query.kind.as_deref().unwrap_or("all") {
        "all" | "" => None,
        name => Some(
            serde_json::from_value::<Kind>(Value::String(name.to_owned())).map_err(|_| {
                AppError::BadRequest(format!(
                    "unknown kind {name:?}: use all, request, health, lifecycle or error"
                ))
            })?,
        ),
    };
    let Some(reader) = &state.inner.reader else {
        return Err(AppError::Unavailable(
            "the event log is off (--redis none)".to_owned(),
        ));
    };
    let scan = if kind.is_some() { FILTER_SCAN } else { limit };
    let events = match reader.recent(scan).await {
        Ok(events) => events,
        Err(error) => {
            let message = dlb::status::error_chain(&error);
            state.inner.collector.redis_failed(message.clone());
            return Err(AppError::Unavailable(format!(
                "event log unavailable: {message}"
            )));
        }
    };
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| kind.is_none_or(|k| e.kind == k))
        .take(limit)
        .collect();
    Ok(Json(json!({ "events": events })).into_response())
}

/// Live updates: the current snapshot at once, then every change; every event as it is
/// written (`log`); `resync` when events may have been missed. Ends when the dashboard stops.
pub async fn stream(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let snapshots = WatchStream::new(state.inner.collector.subscribe()).filter_map(|snapshot| {
        SseEvent::default()
            .event("snapshot")
            .json_data(&*snapshot)
            .ok()
    });
    let live = BroadcastStream::new(state.inner.collector.live()).filter_map(|message| {
        match message {
            Ok(Live::Event(event)) => SseEvent::default().event("log").json_data(&*event).ok(),
            // A page that fell behind reads the latest events again.
            Ok(Live::Resync) | Err(_) => Some(SseEvent::default().event("resync").data("")),
        }
    });
    let merged = dlb::server::until_cancelled(snapshots.merge(live), state.inner.cancel.clone());
    Sse::new(merged.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Body of `POST /api/call`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// `prime`, `palindrome`, `reverse`, `fib` or `wc`.
    op: String,
    /// The number (prime, fib) or text.
    #[serde(default)]
    input: String,
    /// Palindrome: ignore case, whitespace and punctuation.
    #[serde(default)]
    normalize: bool,
    /// Word count: how many of the most frequent words.
    #[serde(default)]
    top: u32,
}

/// Runs one operation through the gateway: the result (or the error as code and message),
/// served-by, attempts and latency.
pub async fn call(
    State(state): State<AppState>,
    body: Result<Json<CallRequest>, JsonRejection>,
) -> Result<Response, AppError> {
    let Json(request) = body?;
    let mut op = Op::parse(request.op.trim(), &request.input).map_err(AppError::BadRequest)?;
    match &mut op {
        Op::Palindrome { normalize, .. } => *normalize = request.normalize,
        Op::WordCount { top, .. } => *top = request.top,
        _ => {}
    }
    let mut client = state.inner.operations.clone();
    let mut outcome = dlb::client::call_traced(
        &mut client,
        &op,
        Some(state.inner.call_timeout),
        &state.inner.tracer,
    )
    .await;
    if let Some(Value::Object(result)) = &mut outcome.result
        && let Some(Value::String(value)) = result.get_mut("value")
        && value.len() > MAX_SHOWN_DIGITS
    {
        value.truncate(MAX_SHOWN_DIGITS);
        result.insert("value_truncated".to_owned(), Value::Bool(true));
    }
    Ok(Json(outcome).into_response())
}

fn control(
    state: &AppState,
) -> Result<
    (
        &str,
        dlb::proto::v1::control_client::ControlClient<tonic::transport::Channel>,
    ),
    AppError,
> {
    state
        .inner
        .control
        .as_ref()
        .map(|(addr, client)| (addr.as_str(), client.clone()))
        .ok_or_else(|| {
            AppError::Unavailable(
                "no control service configured (start dlb-ui with --control)".to_owned(),
            )
        })
}

fn checked_id(id: &str) -> Result<(), AppError> {
    dlb::metadata::validate_instance_id(id).map_err(AppError::BadRequest)
}

fn with_timeout<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CONTROL_TIMEOUT);
    request
}

/// A call to control as the start of a trace (tracing on): its client span, and the request
/// carrying it.
fn traced<T>(
    state: &AppState,
    method: &'static str,
    message: T,
) -> (tonic::Request<T>, Option<dlb::trace::Span>) {
    let mut request = with_timeout(message);
    let tracer = &state.inner.tracer;
    if !tracer.is_on() {
        return (request, None);
    }
    let path = format!("/dlb.v1.Control/{method}");
    let mut span = tracer.start(
        dlb::trace::rpc_span_name(&path),
        dlb::trace::Kind::Client,
        None,
        None,
    );
    dlb::trace::set_rpc_attributes(&mut span, &path);
    if let Ok(value) = span.context().to_traceparent().parse() {
        request
            .metadata_mut()
            .insert(dlb::trace::TRACEPARENT, value);
    }
    (request, Some(span))
}

/// Ends a control call's span with how the call went.
fn end_span<T>(span: Option<dlb::trace::Span>, result: &Result<T, tonic::Status>) {
    if let Some(mut span) = span {
        match result {
            Ok(_) => span.set_grpc_status(tonic::Code::Ok, ""),
            Err(status) => span.set_grpc_status(status.code(), status.message()),
        }
    }
}

/// Which lifecycle action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Stop,
    Kill,
    Remove,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Kill => "kill",
            Action::Remove => "remove",
        }
    }
}

async fn lifecycle(state: AppState, id: String, action: Action) -> Result<Response, AppError> {
    checked_id(&id)?;
    let (addr, mut client) = control(&state)?;
    let addr = addr.to_owned();
    state.inner.events.lifecycle(
        "instance action requested",
        &[("instance", &id), ("action", action.name())],
    );
    let result = match action {
        Action::Start => {
            let (request, span) =
                traced(&state, "StartInstance", InstanceRequest { id: id.clone() });
            let result = client.start_instance(request).await;
            end_span(span, &result);
            result.map(|r| json!({ "instance": instance_json(&r.into_inner()) }))
        }
        Action::Stop | Action::Kill => {
            if action == Action::Kill {
                state.inner.collector.killing(&id);
            }
            let (request, span) = traced(
                &state,
                "StopInstance",
                StopInstanceRequest {
                    id: id.clone(),
                    force: action == Action::Kill,
                },
            );
            let result = client.stop_instance(request).await;
            end_span(span, &result);
            result.map(|r| json!({ "instance": instance_json(&r.into_inner()) }))
        }
        Action::Remove => {
            let (request, span) =
                traced(&state, "RemoveInstance", InstanceRequest { id: id.clone() });
            let result = client.remove_instance(request).await;
            end_span(span, &result);
            result.map(|_| json!({ "removed": id }))
        }
    };
    if result.is_err() && action == Action::Kill {
        state.inner.collector.not_killing(&id);
    }
    result
        .map(|body| Json(body).into_response())
        .map_err(|status| AppError::from_control(&status, &addr))
}

fn instance_json(instance: &dlb::proto::v1::Instance) -> Value {
    json!({
        "id": instance.id,
        "address": instance.address,
        "state": dlb::proto::v1::InstanceState::try_from(instance.state)
            .map_or("unknown", |s| s.as_str_name())
            .to_ascii_lowercase(),
        "pid": instance.pid,
        "last_error": instance.last_error,
    })
}

/// `POST /api/instances/{id}/start`.
pub async fn start(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    lifecycle(state, id, Action::Start).await
}

/// `POST /api/instances/{id}/stop`: drain, then stop.
pub async fn stop(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    lifecycle(state, id, Action::Stop).await
}

/// `POST /api/instances/{id}/kill`: SIGKILL at once.
pub async fn kill(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    lifecycle(state, id, Action::Kill).await
}

/// `POST /api/instances/{id}/remove`: drain, then forget.
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    lifecycle(state, id, Action::Remove).await
}

/// `POST /api/instances`: start one more instance.
pub async fn add(State(state): State<AppState>) -> Result<Response, AppError> {
    let (addr, mut client) = control(&state)?;
    let addr = addr.to_owned();
    state
        .inner
        .events
        .lifecycle("instance action requested", &[("action", "add")]);
    let (request, span) = traced(&state, "AddInstance", AddInstanceRequest {});
    let result = client.add_instance(request).await;
    end_span(span, &result);
    let instance = result
        .map_err(|status| AppError::from_control(&status, &addr))?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        Json(json!({ "instance": instance_json(&instance) })),
    )
        .into_response())
}
