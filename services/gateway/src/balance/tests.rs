//! `RoundRobin` under `tower-test` mocks: no sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::discover::Change;
use tower::{Service, ServiceExt};
use tower_test::mock::{self, Handle, Mock};

use super::{BalanceError, RoundRobin};

type Req = &'static str;
type Endpoint = Mock<Req, Req>;
type Changes = mpsc::UnboundedSender<Result<Change<&'static str, Endpoint>, Infallible>>;

struct Fixture {
    balancer: RoundRobin<&'static str, Endpoint>,
    changes: Changes,
    handles: Vec<(&'static str, Handle<Req, Req>)>,
}

impl Fixture {
    async fn new(keys: &[&'static str]) -> Self {
        let (changes, rx) = mpsc::unbounded_channel();
        let balancer = RoundRobin::new(UnboundedReceiverStream::new(rx));
        let mut fixture = Self {
            balancer,
            changes,
            handles: Vec::new(),
        };
        for key in keys {
            fixture.insert(key).await;
        }
        fixture
    }

    async fn insert(&mut self, key: &'static str) {
        let (service, handle) = mock::pair();
        self.changes.send(Ok(Change::Insert(key, service))).unwrap();
        self.handles.push((key, handle));
        self.wait_for(|keys| keys.contains(&key)).await;
    }

    async fn remove(&mut self, key: &'static str) {
        self.changes.send(Ok(Change::Remove(key))).unwrap();
        self.wait_for(|keys| !keys.contains(&key)).await;
    }

    /// Waits, without sending any request, until the ring satisfies `done`.
    async fn wait_for(&self, done: impl Fn(&[&'static str]) -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done(&self.balancer.keys()) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("discovery applied in the background");
    }

    fn handle(&mut self, key: &str) -> &mut Handle<Req, Req> {
        &mut self.handles.iter_mut().find(|(k, _)| *k == key).unwrap().1
    }

    /// Sends one request and returns the key of the endpoint that received it.
    async fn route_one(&mut self) -> &'static str {
        let ready = self.balancer.ready().await.unwrap();
        let _response = ready.call("request");
        self.received().expect("one endpoint received the request")
    }

    fn received(&mut self) -> Option<&'static str> {
        let mut got = None;
        for (key, handle) in &mut self.handles {
            if let Poll::Ready(Some((_, respond))) = handle.poll_request() {
                assert!(got.is_none(), "two endpoints received one request");
                respond.send_response("ok");
                got = Some(*key);
            }
        }
        got
    }
}

#[tokio::test]
async fn rotation_is_exact_and_in_key_order() {
    let mut f = Fixture::new(&["C", "A", "B"]).await;
    let mut order = Vec::new();
    for _ in 0..9 {
        order.push(f.route_one().await);
    }
    assert_eq!(order, ["A", "B", "C", "A", "B", "C", "A", "B", "C"]);
}

#[tokio::test]
async fn clones_share_one_rotation() {
    let mut f = Fixture::new(&["A", "B", "C"]).await;
    let mut other = f.balancer.clone();
    let mut order = Vec::new();
    for i in 0..6 {
        if i % 2 == 0 {
            order.push(f.route_one().await);
        } else {
            let ready = other.ready().await.unwrap();
            let _response = ready.call("request");
            order.push(f.received().unwrap());
        }
    }
    assert_eq!(order, ["A", "B", "C", "A", "B", "C"]);
}

#[tokio::test]
async fn not_ready_endpoints_are_skipped_until_ready() {
    let mut f = Fixture::new(&["A", "B", "C"]).await;
    f.handle("B").allow(0);
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(f.route_one().await);
    }
    assert_eq!(order, ["A", "C", "A", "C"]);
    f.handle("B").allow(u64::MAX);
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(f.route_one().await);
    }
    // The last pick was C, so rotation resumes at A and includes B again.
    assert_eq!(order, ["A", "B", "C"]);
}

#[tokio::test]
async fn waits_while_every_endpoint_is_busy_and_wakes_when_one_frees() {
    let mut f = Fixture::new(&["A", "B"]).await;
    f.handle("A").allow(0);
    f.handle("B").allow(0);
    let mut balancer = f.balancer.clone();
    let mut task = tokio_test::task::spawn(balancer.ready());
    assert!(task.poll().is_pending());
    f.handle("B").allow(1);
    assert!(task.is_woken());
    assert!(matches!(task.poll(), Poll::Ready(Ok(_))));
}

#[tokio::test]
async fn removal_mid_rotation_never_routes_to_the_wrong_key() {
    let mut f = Fixture::new(&["A", "B", "C", "D"]).await;
    assert_eq!(f.route_one().await, "A");
    // B is picked, then removed before the call: the call still goes to B, never to C or D.
    f.balancer.ready().await.unwrap();
    f.remove("B").await;
    let _response = f.balancer.call("request");
    assert_eq!(f.received(), Some("B"));
    // Rotation continues by key after B.
    assert_eq!(f.route_one().await, "C");
    f.remove("D").await;
    assert_eq!(f.route_one().await, "A");
    assert_eq!(f.route_one().await, "C");
}

#[tokio::test]
async fn a_failed_endpoint_comes_back() {
    let mut f = Fixture::new(&["A", "B"]).await;
    f.handle("A").send_error("connection refused");
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(f.route_one().await);
    }
    // A's failure skips it for one pick only; it stays in the ring and is picked again.
    assert_eq!(order, ["B", "A", "B"]);
    assert_eq!(f.balancer.keys(), ["A", "B"]);
}

#[tokio::test]
async fn insert_on_an_idle_balancer_is_visible_without_a_request() {
    let mut f = Fixture::new(&[]).await;
    assert!(f.balancer.keys().is_empty());
    f.insert("A").await; // waits on keys() only: no request was sent
    assert_eq!(f.balancer.keys(), ["A"]);
    assert_eq!(f.route_one().await, "A");
}

#[tokio::test]
async fn no_endpoints_fails_at_once() {
    let mut f = Fixture::new(&[]).await;
    let error = f.balancer.ready().await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<BalanceError>(),
        Some(&BalanceError::NoEndpoints)
    );
    let mut f = Fixture::new(&["A"]).await;
    f.handle("A").send_error("down");
    let error = f.balancer.ready().await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<BalanceError>(),
        Some(&BalanceError::NoneReady { endpoints: 1 })
    );
}
