//! Every route of the dashboard through `app(state).oneshot(request)`: the security checks,
//! the clear errors, and the answers with real servers behind (a compute instance standing in
//! for the gateway, a control service, a redis-server).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use dlb::testing::{RedisServer, workspace_binary};
use dlb_ui::{AppState, Config, app};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

const HOST: &str = "127.0.0.1:5000";

/// A dashboard state whose loops stop when the value is dropped.
struct Ui {
    state: AppState,
    cancel: CancellationToken,
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Ui {
    fn start(config: Config) -> Self {
        let cancel = CancellationToken::new();
        let state = AppState::start(&config, cancel.clone(), &TaskTracker::new()).unwrap();
        Self { state, cancel }
    }

    /// A dashboard over a gateway address nothing listens on, without control or Redis.
    fn alone() -> Self {
        Self::start(Config::for_tests("127.0.0.1:1", None))
    }

    async fn send(&self, request: Request<Body>) -> Response {
        app(self.state.clone()).oneshot(request).await.unwrap()
    }

    /// A POST as the page sends it: same origin, CSRF token, JSON body.
    fn post(&self, path: &str, body: Option<Value>) -> Request<Body> {
        let builder = Request::post(path)
            .header(header::HOST, HOST)
            .header(header::ORIGIN, format!("http://{HOST}"))
            .header("sec-fetch-site", "same-origin")
            .header("x-csrf-token", self.state.csrf_token());
        match body {
            Some(body) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
            None => builder.body(Body::empty()).unwrap(),
        }
    }
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header(header::HOST, HOST)
        .body(Body::empty())
        .unwrap()
}

async fn body_text(response: Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn json_body(response: Response) -> Value {
    let text = body_text(response).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts the status and that the body is `{"error": "..."}` containing `needle`.
async fn assert_error(response: Response, status: StatusCode, needle: &str) {
    assert_eq!(response.status(), status);
    let body = json_body(response).await;
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "error {message:?} should contain {needle:?}"
    );
}

#[tokio::test]
async fn the_page_carries_its_csrf_token_and_strict_security_headers() {
    let ui = Ui::alone();
    let response = ui.send(get("/")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
    let page = body_text(response).await;
    let meta = format!(
        "<meta name=\"csrf-token\" content=\"{}\">",
        ui.state.csrf_token()
    );
    assert!(page.contains(&meta), "page lacks {meta}");
    assert!(
        page.contains("content=\"no\""),
        "admin not required on loopback"
    );
    // No inline script and nothing from another host.
    assert_eq!(
        page.matches("<script").count(),
        page.matches("<script src=\"/assets/").count()
    );
    assert!(!page.contains("//cdn") && !page.contains("https://"));
}

#[tokio::test]
async fn assets_are_served_with_their_types_and_nothing_else_is() {
    let ui = Ui::alone();
    for (path, content_type, needle) in [
        ("/assets/app.js", "text/javascript", "EventSource"),
        ("/assets/app.css", "text/css", "font"),
        ("/assets/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let response = ui.send(get(path)).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with(content_type)
        );
        assert_eq!(
            response.headers()[header::X_CONTENT_TYPE_OPTIONS],
            "nosniff"
        );
        assert!(body_text(response).await.contains(needle), "{path}");
    }
    // The script never parses mesh text as HTML.
    let js = body_text(ui.send(get("/assets/app.js")).await).await;
    assert!(!js.contains("innerHTML") && !js.contains("insertAdjacentHTML"));
    let response = ui.send(get("/assets/../Cargo.toml")).await;
    assert_error(response, StatusCode::NOT_FOUND, "no such page").await;
    let response = ui.send(get("/debug")).await;
    assert_error(response, StatusCode::NOT_FOUND, "/debug").await;
    assert_eq!(body_text(ui.send(get("/healthz")).await).await, "ok");
}

#[tokio::test]
async fn a_foreign_host_name_is_refused_against_dns_rebinding() {
    let ui = Ui::alone();
    let request = Request::get("/")
        .header(header::HOST, "evil.example:5000")
        .body(Body::empty())
        .unwrap();
    assert_error(
        ui.send(request).await,
        StatusCode::FORBIDDEN,
        "evil.example",
    )
    .await;
    for host in ["localhost:5000", "[::1]:5000", "127.0.0.1"] {
        let request = Request::get("/healthz")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap();
        assert_eq!(ui.send(request).await.status(), StatusCode::OK, "{host}");
    }
}

#[tokio::test]
async fn state_changing_routes_refuse_get_with_405() {
    let ui = Ui::alone();
    for path in [
        "/api/call",
        "/api/instances",
        "/api/instances/B/start",
        "/api/instances/B/stop",
        "/api/instances/B/kill",
        "/api/instances/B/remove",
    ] {
        let response = ui.send(get(path)).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(response.headers()[header::ALLOW], "POST", "{path}");
        assert_error(response, StatusCode::METHOD_NOT_ALLOWED, "use POST").await;
    }
}

#[tokio::test]
async fn a_post_without_a_valid_csrf_token_gets_403() {
    let ui = Ui::alone();
    let body = json!({ "op": "reverse", "input": "x" }).to_string();
    let missing = Request::post("/api/call")
        .header(header::HOST, HOST)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.clone()))
        .unwrap();
    assert_error(ui.send(missing).await, StatusCode::FORBIDDEN, "CSRF token").await;
    let wrong = Request::post("/api/instances/B/stop")
        .header(header::HOST, HOST)
        .header("x-csrf-token", "0".repeat(64))
        .body(Body::empty())
        .unwrap();
    assert_error(ui.send(wrong).await, StatusCode::FORBIDDEN, "CSRF token").await;
}

#[tokio::test]
async fn a_cross_origin_post_gets_403_even_with_the_token() {
    let ui = Ui::alone();
    let mut request = ui.post("/api/instances/B/kill", None);
    request
        .headers_mut()
        .insert(header::ORIGIN, "http://evil.example".parse().unwrap());
    assert_error(
        ui.send(request).await,
        StatusCode::FORBIDDEN,
        "cross-origin",
    )
    .await;

    let mut request = ui.post("/api/instances", None);
    request
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_error(ui.send(request).await, StatusCode::FORBIDDEN, "cross-site").await;

    let mut request = ui.post("/api/instances", None);
    request
        .headers_mut()
        .insert(header::ORIGIN, "null".parse().unwrap());
    assert_error(
        ui.send(request).await,
        StatusCode::FORBIDDEN,
        "cross-origin",
    )
    .await;
}

#[tokio::test]
async fn with_an_admin_token_writes_need_it() {
    let mut config = Config::for_tests("127.0.0.1:1", None);
    config.admin_token = Some("correct-horse-battery-staple".to_owned());
    let ui = Ui::start(config);
    let page = body_text(ui.send(get("/")).await).await;
    assert!(page.contains("<meta name=\"admin-required\" content=\"yes\">"));
    let response = ui.send(ui.post("/api/instances", None)).await;
    assert_eq!(
        response.headers()[header::WWW_AUTHENTICATE],
        "Bearer realm=\"dlb\""
    );
    assert_error(response, StatusCode::UNAUTHORIZED, "admin token required").await;
    let mut request = ui.post("/api/instances", None);
    request.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer wrong-horse-battery-staple".parse().unwrap(),
    );
    assert_error(
        ui.send(request).await,
        StatusCode::UNAUTHORIZED,
        "admin token",
    )
    .await;
    // The right token passes the guard; without control the route says so.
    let mut request = ui.post("/api/instances", None);
    request.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer correct-horse-battery-staple".parse().unwrap(),
    );
    assert_error(
        ui.send(request).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "no control service",
    )
    .await;
}

#[tokio::test]
async fn snapshot_history_and_stream_answer_with_every_source_down() {
    let ui = Ui::alone();
    // Give the gateway poll a moment to fail (it connects to port 1).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if ui.state.collector().snapshot().sources.gateway.state == "down" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("gateway marked down");
    let response = ui.send(get("/api/snapshot")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let snapshot = json_body(response).await;
    assert_eq!(snapshot["sources"]["gateway"]["state"], "down");
    let error = snapshot["sources"]["gateway"]["error"].as_str().unwrap();
    assert!(!error.is_empty(), "the banner says why");
    assert_eq!(snapshot["sources"]["control"]["state"], "off");
    assert_eq!(snapshot["sources"]["redis"]["state"], "off");
    assert_eq!(snapshot["control_enabled"], false);

    let response = ui.send(get("/api/history")).await;
    assert_eq!(json_body(response).await, json!({}));

    let response = ui.send(get("/api/events")).await;
    assert_error(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "event log is off",
    )
    .await;

    let response = ui.send(get("/api/stream")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body().into_data_stream();
    let first = tokio_stream::StreamExt::next(&mut body)
        .await
        .unwrap()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("event: snapshot\ndata: {"), "{first}");
}

#[tokio::test]
async fn calls_run_through_the_gateway_address_and_bad_input_is_explained() {
    // A compute instance answers the same Operations API a gateway does.
    let compute = dlb_compute::testing::start(dlb_compute::Config::for_tests("X"))
        .await
        .unwrap();
    let ui = Ui::start(Config::for_tests(&compute.addr.to_string(), None));

    let response = ui
        .send(ui.post(
            "/api/call",
            Some(json!({ "op": "reverse", "input": "<b>héllo</b>" })),
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let outcome = json_body(response).await;
    assert_eq!(outcome["result"]["text"], ">b/<olléh>b<");
    assert_eq!(outcome["served_by"], "X");
    assert!(outcome["latency_us"].as_u64().unwrap() > 0);

    for (body, field, want) in [
        (
            json!({ "op": "prime", "input": "97" }),
            "prime",
            json!(true),
        ),
        (json!({ "op": "fib", "input": "10" }), "value", json!("55")),
        (
            json!({ "op": "palindrome", "input": "A man, a plan, a canal: Panama", "normalize": true }),
            "palindrome",
            json!(true),
        ),
        (
            json!({ "op": "wc", "input": "a b a", "top": 1 }),
            "words",
            json!(3),
        ),
    ] {
        let outcome = json_body(ui.send(ui.post("/api/call", Some(body.clone()))).await).await;
        assert_eq!(outcome["result"][field], want, "{body}: {outcome}");
    }

    // The server's own answer to bad input is passed on as code and message.
    let outcome = json_body(
        ui.send(ui.post("/api/call", Some(json!({ "op": "prime", "input": "12x" }))))
            .await,
    )
    .await;
    assert_eq!(outcome["error"]["code"], "INVALID_ARGUMENT");
    assert!(outcome["result"].is_null());

    // Input the dashboard can tell is wrong never leaves it.
    let cases = [
        (
            json!({ "op": "fib", "input": "-1" }),
            StatusCode::BAD_REQUEST,
            "whole number",
        ),
        (
            json!({ "op": "fib", "input": "99999999999999999999999" }),
            StatusCode::BAD_REQUEST,
            "whole number",
        ),
        (
            json!({ "op": "sqrt", "input": "4" }),
            StatusCode::BAD_REQUEST,
            "unknown operation",
        ),
        (
            json!({ "op": "wc", "input": "x", "top": -1 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "top",
        ),
        (
            json!({ "op": "reverse", "input": "x", "extra": 1 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "extra",
        ),
        (
            json!({ "input": "x" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "op",
        ),
    ];
    for (body, status, needle) in cases {
        let response = ui.send(ui.post("/api/call", Some(body.clone()))).await;
        assert_eq!(response.status(), status, "{body}");
        assert_error(response, status, needle).await;
    }
    let mut not_json = ui.post("/api/call", None);
    *not_json.body_mut() = Body::from("op=reverse");
    not_json.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/x-www-form-urlencoded".parse().unwrap(),
    );
    assert_eq!(
        ui.send(not_json).await.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let huge = "x".repeat(dlb_ui::config::MAX_BODY_BYTES + 1);
    let response = ui
        .send(ui.post("/api/call", Some(json!({ "op": "reverse", "input": huge }))))
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(json_body(response).await["error"].is_string());

    // A huge Fibonacci value is cut for the page; the digit count stays exact.
    let outcome = json_body(
        ui.send(ui.post("/api/call", Some(json!({ "op": "fib", "input": "100000" }))))
            .await,
    )
    .await;
    assert_eq!(outcome["result"]["digits"], 20_899);
    assert_eq!(outcome["result"]["value_truncated"], true);
    assert_eq!(
        outcome["result"]["value"].as_str().unwrap().len(),
        dlb_ui::routes::MAX_SHOWN_DIGITS
    );

    // And the instance is still serving.
    let outcome = json_body(
        ui.send(ui.post("/api/call", Some(json!({ "op": "reverse", "input": "ok" }))))
            .await,
    )
    .await;
    assert_eq!(outcome["result"]["text"], "ko");
    drop(ui);
    compute.shutdown().await.unwrap();
}

#[tokio::test]
async fn events_come_newest_first_filtered_by_kind_and_bad_queries_are_explained() {
    let redis = RedisServer::start();
    let mut config = Config::for_tests("127.0.0.1:1", None);
    config.events.redis = redis.url();
    let ui = Ui::start(config);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    for (n, kind) in ["request", "health", "lifecycle", "request", "error"]
        .iter()
        .enumerate()
    {
        let event = json!({
            "ts": "2026-11-27T00:00:00.000Z", "ts_ms": n, "service": "test", "instance": "t",
            "kind": kind, "message": format!("m{n}"),
        });
        let _: () = redis::cmd("LPUSH")
            .arg("lb_logs")
            .arg(event.to_string())
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    let all = json_body(ui.send(get("/api/events?limit=3")).await).await;
    let messages: Vec<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["m4", "m3", "m2"]);
    let requests = json_body(ui.send(get("/api/events?kind=request")).await).await;
    let messages: Vec<&str> = requests["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["m3", "m0"]);
    for (query, needle) in [
        ("kind=bogus", "unknown kind"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("limit=ten", "limit"),
        ("colour=red", "colour"),
    ] {
        let response = ui.send(get(&format!("/api/events?{query}"))).await;
        let status = response.status();
        assert!(status.is_client_error(), "{query}");
        assert_error(response, status, needle).await;
    }
}

#[tokio::test]
async fn events_with_redis_down_answer_503_and_mark_the_banner() {
    let mut redis = RedisServer::start();
    let mut config = Config::for_tests("127.0.0.1:1", None);
    config.events.redis = redis.url();
    let ui = Ui::start(config);
    redis.stop();
    let response = ui.send(get("/api/events")).await;
    assert_error(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "event log unavailable",
    )
    .await;
    let snapshot = json_body(ui.send(get("/api/snapshot")).await).await;
    assert_eq!(snapshot["sources"]["redis"]["state"], "down");
    // The page itself still loads.
    assert_eq!(ui.send(get("/")).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_routes_drive_control_and_unknown_ids_get_404() {
    let control = dlb_control::testing::start(dlb_control::Config::for_tests(
        workspace_binary("dlb-compute"),
        1,
    ))
    .await
    .unwrap();
    let ui = Ui::start(Config::for_tests(
        "127.0.0.1:1",
        Some(&control.addr.to_string()),
    ));

    let response = ui.send(ui.post("/api/instances/ZZ/stop", None)).await;
    assert_error(response, StatusCode::NOT_FOUND, "ZZ").await;
    let response = ui.send(ui.post("/api/instances/%3Cb%3E/start", None)).await;
    assert_error(response, StatusCode::BAD_REQUEST, "instance id").await;

    let patience = Duration::from_secs(30);
    // Control's stream gives its latest state (a watch): a state that lasts only until the
    // next request can be skipped under load, so each one the trail shows is awaited.
    let seen = |state: &'static str| {
        let ui = &ui;
        tokio::time::timeout(patience, async move {
            while !ui
                .state
                .collector()
                .snapshot()
                .instances
                .iter()
                .any(|i| i.id == "A" && i.state.as_deref() == Some(state))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    seen("serving").await.expect("A serving on the dashboard");
    let stop = ui.send(ui.post("/api/instances/A/stop", None));
    let body = json_body(tokio::time::timeout(patience, stop).await.unwrap()).await;
    assert_eq!(body["instance"]["state"], "stopped", "{body}");
    seen("stopped").await.expect("A stopped on the dashboard");
    let start = ui.send(ui.post("/api/instances/A/start", None));
    let body = json_body(tokio::time::timeout(patience, start).await.unwrap()).await;
    assert_eq!(body["instance"]["state"], "serving", "{body}");
    seen("serving")
        .await
        .expect("A serving again on the dashboard");
    let kill = ui.send(ui.post("/api/instances/A/kill", None));
    let body = json_body(tokio::time::timeout(patience, kill).await.unwrap()).await;
    assert_eq!(body["instance"]["state"], "stopped", "{body}");

    let response = tokio::time::timeout(patience, ui.send(ui.post("/api/instances", None)))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = json_body(response).await;
    assert_eq!(body["instance"]["id"], "B");
    assert_eq!(body["instance"]["state"], "serving");
    let remove = ui.send(ui.post("/api/instances/B/remove", None));
    let body = json_body(tokio::time::timeout(patience, remove).await.unwrap()).await;
    assert_eq!(body["removed"], "B");
    let response = ui.send(ui.post("/api/instances/B/start", None)).await;
    assert_error(response, StatusCode::NOT_FOUND, "B").await;

    // The snapshot follows control's stream, with the trail of A's transitions.
    let trail = tokio::time::timeout(patience, async {
        loop {
            let snapshot = ui.state.collector().snapshot();
            if let Some(a) = snapshot.instances.iter().find(|i| i.id == "A")
                && snapshot.instances.len() == 1
                && a.state.as_deref() == Some("stopped")
            {
                return a.trail.iter().map(|t| t.state.clone()).collect::<Vec<_>>();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    // Stopped (drained), started, killed: a kill shows as such, not as a drain.
    let tail: Vec<&str> = trail.iter().map(String::as_str).collect();
    assert_eq!(
        tail[tail.len() - 5..],
        ["draining", "stopped", "starting", "serving", "killed"],
        "{trail:?}"
    );

    drop(ui);
    control.shutdown().await.unwrap();
}

#[tokio::test]
async fn control_unreachable_and_control_failing_are_told_apart() {
    // Nothing listens on port 1: the connection fails.
    let ui = Ui::start(Config::for_tests("127.0.0.1:1", Some("127.0.0.1:1")));
    let response = ui.send(ui.post("/api/instances/A/stop", None)).await;
    assert_error(response, StatusCode::SERVICE_UNAVAILABLE, "unreachable").await;

    // Control answers, but cannot start an instance: its own message comes through.
    let mut config = dlb_control::Config::for_tests("/nonexistent/dlb-compute".into(), 0);
    config.start_timeout_secs = 2;
    let control = dlb_control::testing::start(config).await.unwrap();
    let ui = Ui::start(Config::for_tests(
        "127.0.0.1:1",
        Some(&control.addr.to_string()),
    ));
    let response = ui.send(ui.post("/api/instances", None)).await;
    let status = response.status();
    assert_ne!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        status.is_server_error() || status == StatusCode::CONFLICT,
        "{status}"
    );
    assert_error(response, status, "/nonexistent/dlb-compute").await;
    drop(ui);
    control.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_dashboard_starts_a_trace_for_each_call_and_instance_action() {
    let receiver = dlb::trace::Receiver::start(true).await.unwrap();
    let traced = dlb::trace::TraceArgs {
        otlp_endpoint: Some(receiver.url()),
    };
    let mut compute_config = dlb_compute::Config::for_tests("X");
    compute_config.trace = traced.clone();
    let compute = dlb_compute::testing::start(compute_config).await.unwrap();
    let mut control_config = dlb_control::Config::for_tests(workspace_binary("dlb-compute"), 1);
    control_config.trace = traced.clone();
    let control = dlb_control::testing::start(control_config).await.unwrap();
    let mut config = Config::for_tests(&compute.addr.to_string(), Some(&control.addr.to_string()));
    config.trace = traced;
    let ui = Ui::start(config);

    // A call from the form: the outcome names its trace, whose root is the dashboard's client
    // span and whose child is the instance's operation.
    let outcome = json_body(
        ui.send(ui.post(
            "/api/call",
            Some(json!({ "op": "reverse", "input": "traced" })),
        ))
        .await,
    )
    .await;
    let trace = outcome["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(trace.len(), 32, "{outcome}");
    // An instance action: the dashboard's span, and control's span under it.
    let patience = Duration::from_secs(30);
    let stop = ui.send(ui.post("/api/instances/A/stop", None));
    let body = json_body(tokio::time::timeout(patience, stop).await.unwrap()).await;
    assert_eq!(body["instance"]["state"], "stopped", "{body}");

    let hex = |bytes: &[u8]| dlb::trace::hex(bytes);
    let spans = dlb::testing::eventually("the dashboard's and the servers' spans", || async {
        let spans = receiver.spans();
        let of = |service: &str, name: &str| {
            spans
                .iter()
                .find(|(s, span)| s == service && span.name == name)
                .map(|(_, span)| span.clone())
        };
        Some((
            of("dlb-ui", "dlb.v1.Operations/Reverse")?,
            of("dlb-compute", "dlb.v1.Operations/Reverse")?,
            of("dlb-ui", "dlb.v1.Control/StopInstance")?,
            of("dlb-control", "dlb.v1.Control/StopInstance")?,
        ))
    })
    .await;
    let (ui_call, operation, ui_stop, control_stop) = spans;
    assert_eq!(hex(&ui_call.trace_id), trace);
    assert!(ui_call.parent_span_id.is_empty(), "a root span");
    assert_eq!(operation.trace_id, ui_call.trace_id);
    assert_eq!(operation.parent_span_id, ui_call.span_id);
    assert!(ui_stop.parent_span_id.is_empty(), "a root span");
    assert_eq!(control_stop.trace_id, ui_stop.trace_id);
    assert_eq!(control_stop.parent_span_id, ui_stop.span_id);
    // Listing and watching instances (the dashboard polls them) are not traced.
    assert!(
        receiver
            .spans()
            .iter()
            .all(|(_, s)| !s.name.contains("ListInstances") && !s.name.contains("Watch")),
        "only lifecycle calls of control are traced"
    );
}

/// A control that stops answering with its connection open (a SIGSTOPped process: its
/// instance stream just goes quiet) shows as down, saying why, and as ok once it answers
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_that_stops_answering_shows_down_and_comes_back() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(workspace_binary("dlb-control"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--instances",
            "0",
            "--redis",
            "none",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let control = dlb::testing::KillOnDrop(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_once(" listening on ")
        .map(|(_, addr)| addr.trim().to_owned())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let pid = control.0.id().to_string();
    let ui = Ui::start(Config::for_tests("127.0.0.1:1", Some(&addr)));
    let control_is = |state: &'static str| {
        let ui = &ui;
        async move {
            tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    let source = ui.state.collector().snapshot().sources.control.clone();
                    if source.state == state {
                        return source;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("control never showed {state}"))
        }
    };
    control_is("ok").await;
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name} {pid}");
    };
    signal("-STOP");
    let down = control_is("down").await;
    let error = down.error.unwrap_or_default();
    assert!(error.contains("no answer"), "{error}");
    signal("-CONT");
    control_is("ok").await;
    drop(control);
}
