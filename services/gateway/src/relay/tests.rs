//! The relay's retry loop under `tower-test`: the balancer is a mock whose handle plays the
//! instances (answers built whole, connection failures, no instance left). No sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dlb::events::{EventLog, EventLogConfig};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codegen::http;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_test::mock::{self, Handle};

use super::{Balanced, Counters, ForwardError, ForwardSettings, GatewayService};
use crate::balance::BalanceError;
use crate::conn::{Answer, AnswerBody, GivenAnswer};
use crate::endpoint::{EndpointTable, Outgoing, ServedBy};

type Instances = Handle<http::Request<Outgoing>, Answer>;

/// A relay over a mock balancer, and the handle that answers in the instances' place.
fn relay(max_attempts: u32) -> (GatewayService, Instances) {
    let (balancer, instances) = mock::pair::<http::Request<Outgoing>, Answer>();
    let balancer: Balanced = BoxCloneSyncService::new(balancer.map_err(ForwardError));
    let (events, _writer) = EventLog::spawn(EventLogConfig::disabled(), "gateway", "gw");
    let service = GatewayService::new(
        balancer,
        Arc::new(EndpointTable::default()),
        ForwardSettings {
            max_in_flight: 16,
            max_attempts,
            default_timeout: Duration::from_secs(30),
            max_message_bytes: 1 << 20,
            hedge: super::hedge::Hedge::Off,
            tracer: dlb::trace::Tracer::default(),
        },
        events,
        Arc::new(Counters::default()),
        "gw".into(),
    );
    (service, instances)
}

/// A gRPC message frame: no compression, the length, the bytes.
fn frame(message: &[u8]) -> Bytes {
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// A caller's `Reverse("hello")`.
fn reverse_hello() -> http::Request<Body> {
    let body = http_body_util::Full::new(frame(b"\x0a\x05hello"));
    http::Request::builder()
        .method(http::Method::POST)
        .uri("/dlb.v1.Operations/Reverse")
        .header("content-type", "application/grpc")
        .body(Body::new(body))
        .unwrap()
}

/// Instance `id`'s answer: `message` (if any), then trailers with `code` (and `text`).
fn answer(id: &str, message: Option<&[u8]>, code: u8, text: &str) -> Answer {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(u16::from(code)));
    if !text.is_empty() {
        trailers.insert("grpc-message", http::HeaderValue::from_str(text).unwrap());
    }
    let data: VecDeque<Result<Bytes, String>> = message.map(|m| Ok(frame(m))).into_iter().collect();
    with_id(
        id,
        AnswerBody::Given(Box::new(GivenAnswer {
            data,
            trailers: Some(trailers),
        })),
    )
}

fn with_id(id: &str, body: AnswerBody) -> Answer {
    let mut response = http::Response::new(body);
    response.extensions_mut().insert(ServedBy(Arc::from(id)));
    response
}

/// What the caller got.
#[derive(Debug)]
struct Got {
    code: String,
    message: String,
    served_by: Option<String>,
    attempts: String,
    data: Bytes,
}

async fn got(response: http::Response<Body>) -> Got {
    let (head, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let data = collected.to_bytes();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.headers.get(name))
            .map(|v| v.to_str().unwrap().to_owned())
    };
    Got {
        code: field("grpc-status").unwrap(),
        message: dlb::status::percent_decode(&field("grpc-message").unwrap_or_default()),
        served_by: head
            .headers
            .get(dlb::metadata::SERVED_BY)
            .map(|v| v.to_str().unwrap().to_owned()),
        attempts: head.headers[dlb::metadata::ATTEMPTS]
            .to_str()
            .unwrap()
            .to_owned(),
        data,
    }
}

/// Sends the caller's call through `relay` while `play` answers in the instances' place.
async fn call<F, Fut>(relay: &mut GatewayService, instances: Instances, play: F) -> Got
where
    F: FnOnce(Instances) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let player = tokio::spawn(play(instances));
    let response = relay.relay(reverse_hello()).await;
    let got = got(response).await;
    player.await.unwrap();
    got
}

/// The next attempt: the request the relay sent, and where to answer it.
async fn next(instances: &mut Instances) -> (http::Request<Outgoing>, mock::SendResponse<Answer>) {
    instances.next_request().await.expect("an attempt")
}

fn refused() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")
}

#[tokio::test]
async fn an_unavailable_answer_goes_to_the_next_instance() {
    let (mut relay, instances) = relay(3);
    let got = call(&mut relay, instances, |mut instances| async move {
        let (request, send) = next(&mut instances).await;
        assert_eq!(request.uri().path(), "/dlb.v1.Operations/Reverse");
        assert!(request.headers().contains_key("grpc-timeout"));
        send.send_response(answer("A", None, 14, "draining"));
        let (_, send) = next(&mut instances).await;
        send.send_response(answer("B", Some(b"\x0a\x05olleh"), 0, ""));
    })
    .await;
    assert_eq!(got.code, "0", "{got:?}");
    assert_eq!(got.served_by.as_deref(), Some("B"));
    assert_eq!(got.attempts, "2");
    assert_eq!(got.data, frame(b"\x0a\x05olleh"));
}

#[tokio::test]
async fn a_connection_failure_is_retried_and_the_caller_sees_the_answer() {
    let (mut relay, instances) = relay(3);
    let got = call(&mut relay, instances, |mut instances| async move {
        let (_, send) = next(&mut instances).await;
        send.send_error(refused());
        let (_, send) = next(&mut instances).await;
        send.send_response(answer("B", Some(b"\x0a\x05olleh"), 0, ""));
    })
    .await;
    assert_eq!((got.code.as_str(), got.attempts.as_str()), ("0", "2"));
    assert_eq!(got.served_by.as_deref(), Some("B"));
}

#[tokio::test]
async fn an_answer_cut_mid_body_is_retried() {
    let (mut relay, instances) = relay(3);
    let got = call(&mut relay, instances, |mut instances| async move {
        let (_, send) = next(&mut instances).await;
        let cut = AnswerBody::Given(Box::new(GivenAnswer {
            data: VecDeque::from([Ok(frame(b"\x0a")), Err("stream reset by peer".to_owned())]),
            trailers: None,
        }));
        send.send_response(with_id("A", cut));
        let (_, send) = next(&mut instances).await;
        send.send_response(answer("C", Some(b"\x0a\x05olleh"), 0, ""));
    })
    .await;
    assert_eq!((got.code.as_str(), got.attempts.as_str()), ("0", "2"));
    assert_eq!(got.served_by.as_deref(), Some("C"));
}

#[tokio::test]
async fn the_callers_error_is_relayed_from_the_first_instance_not_retried() {
    let (mut relay, instances) = relay(3);
    let got = call(&mut relay, instances, |mut instances| async move {
        let (_, send) = next(&mut instances).await;
        send.send_response(answer("A", None, 3, "text must be UTF-8"));
    })
    .await;
    assert_eq!(got.code, "3");
    assert_eq!(got.message, "text must be UTF-8");
    assert_eq!(got.served_by.as_deref(), Some("A"));
    assert_eq!(got.attempts, "1");
}

#[tokio::test]
async fn no_instance_at_all_is_unavailable_at_once() {
    let (mut relay, instances) = relay(3);
    let got = call(&mut relay, instances, |mut instances| async move {
        let (_, send) = next(&mut instances).await;
        send.send_error(BalanceError::NoEndpoints);
    })
    .await;
    assert_eq!(got.code, "14");
    assert!(got.message.starts_with("no healthy instance"), "{got:?}");
}

#[tokio::test]
async fn a_failure_with_no_instance_left_names_the_failure() {
    let (mut relay, instances) = relay(3);
    let got = call(&mut relay, instances, |mut instances| async move {
        let (_, send) = next(&mut instances).await;
        send.send_error(refused());
        let (_, send) = next(&mut instances).await;
        send.send_error(BalanceError::NoEndpoints);
    })
    .await;
    assert_eq!(got.code, "14");
    assert!(
        got.message
            .starts_with("instances unreachable after 1 attempt(s): connection reset")
            && got.message.contains("(and no other instance is healthy"),
        "{got:?}"
    );
    // The try that reached no instance does not count.
    assert_eq!(got.attempts, "1");
}

#[tokio::test]
async fn an_instances_unavailable_with_no_instance_left_is_relayed_as_it_was() {
    let (mut relay, instances) = relay(3);
    let got = call(&mut relay, instances, |mut instances| async move {
        let (_, send) = next(&mut instances).await;
        send.send_response(answer("A", None, 14, "instance A is draining"));
        let (_, send) = next(&mut instances).await;
        send.send_error(BalanceError::NoEndpoints);
    })
    .await;
    assert_eq!(got.code, "14");
    assert_eq!(got.message, "instance A is draining");
    assert_eq!(got.served_by.as_deref(), Some("A"));
    assert_eq!(got.attempts, "1");
}

#[tokio::test]
async fn attempts_stop_at_max_attempts() {
    let (mut relay, instances) = relay(2);
    let got = call(&mut relay, instances, |mut instances| async move {
        for _ in 0..2 {
            let (_, send) = next(&mut instances).await;
            send.send_error(refused());
        }
    })
    .await;
    assert_eq!(got.code, "14");
    assert!(
        got.message
            .starts_with("instances unreachable after 2 attempt(s)"),
        "{got:?}"
    );
    assert_eq!(got.attempts, "2");
}

#[tokio::test]
async fn a_deadline_too_short_to_try_answers_at_once_counting_no_attempt() {
    let (relay, mut instances) = relay(3);
    // 5 ms: less than the margin the gateway keeps to answer in time, so no attempt is made.
    let mut request = reverse_hello();
    request
        .headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("5m"));
    let got = got(relay.relay(request).await).await;
    assert_eq!(got.code, "4", "{got:?}");
    assert!(got.message.ends_with("after 0 attempt(s)"), "{got:?}");
    // The count the caller reads agrees with the message.
    assert_eq!(got.attempts, "0", "{got:?}");
    // And nothing reached an instance.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), instances.next_request())
            .await
            .is_err()
    );
}
