//! `RoundRobin` under `tower-test` mocks: no sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::discover::Change;
use tower::{Service, ServiceExt};
use tower_test::mock::{self, Handle, Mock};

use super::{Avoid, BalanceError, Load, Pick, RoundRobin, Weigh};

type Req = &'static str;
type Changes = mpsc::UnboundedSender<Result<Change<&'static str, Endpoint>, Infallible>>;

/// A mock endpoint whose load the test sets.
#[derive(Clone)]
struct Endpoint {
    mock: Mock<Req, Req>,
    load: Arc<Mutex<Load>>,
}

impl Service<Req> for Endpoint {
    type Response = Req;
    type Error = tower::BoxError;
    type Future = <Mock<Req, Req> as Service<Req>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.mock.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.mock.call(request)
    }
}

/// A request `"avoid A,B"` avoids A and B; `"strictly avoid A,B"` never goes to them.
impl Avoid<&'static str> for &'static str {
    fn avoids(&self, key: &&'static str) -> bool {
        self.trim_start_matches("strictly ")
            .strip_prefix("avoid ")
            .is_some_and(|keys| keys.split(',').any(|k| k == *key))
    }

    fn strictly(&self) -> bool {
        self.starts_with("strictly ")
    }

    fn avoids_any(&self) -> bool {
        self.trim_start_matches("strictly ").starts_with("avoid ")
    }
}

impl Weigh for Endpoint {
    fn load(&self) -> Load {
        *self.load.lock().unwrap()
    }
}

struct Fixture {
    balancer: RoundRobin<&'static str, Endpoint>,
    changes: Changes,
    handles: Vec<(&'static str, Handle<Req, Req>)>,
    loads: Vec<(&'static str, Arc<Mutex<Load>>)>,
}

impl Fixture {
    async fn new(keys: &[&'static str]) -> Self {
        Self::with_pick(keys, Pick::RoundRobin).await
    }

    async fn with_pick(keys: &[&'static str], pick: Pick) -> Self {
        let (changes, rx) = mpsc::unbounded_channel();
        let balancer = RoundRobin::with_pick(UnboundedReceiverStream::new(rx), pick);
        let mut fixture = Self {
            balancer,
            changes,
            handles: Vec::new(),
            loads: Vec::new(),
        };
        for key in keys {
            fixture.insert(key).await;
        }
        fixture
    }

    async fn insert(&mut self, key: &'static str) {
        let (mock, handle) = mock::pair();
        let load = Arc::new(Mutex::new(Load::default()));
        let service = Endpoint {
            mock,
            load: Arc::clone(&load),
        };
        self.changes.send(Ok(Change::Insert(key, service))).unwrap();
        self.handles.push((key, handle));
        self.loads.push((key, load));
        self.wait_for(|keys| keys.contains(&key)).await;
    }

    fn set_load(&self, key: &str, load: Load) {
        let (_, shared) = self.loads.iter().find(|(k, _)| *k == key).unwrap();
        *shared.lock().unwrap() = load;
    }

    /// Who gets each of `n` calls.
    async fn route(&mut self, n: usize) -> Vec<&'static str> {
        let mut order = Vec::with_capacity(n);
        for _ in 0..n {
            order.push(self.route_one().await);
            // A fresh poll of this task each time: tokio's cooperative budget (128 channel
            // operations per poll) would otherwise make the mocks' channel look empty.
            tokio::task::yield_now().await;
        }
        order
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

fn latency(us: f64) -> Load {
    Load {
        latency_us: Some(us),
        ..Load::default()
    }
}

const WEIGHTED: Pick = Pick::Weighted {
    slow_start: Duration::ZERO,
};

fn count(order: &[&'static str], key: &str) -> usize {
    order.iter().filter(|k| **k == key).count()
}

#[tokio::test]
async fn weighted_with_equal_loads_is_exact_rotation() {
    let mut f = Fixture::with_pick(&["A", "B", "C"], WEIGHTED).await;
    assert_eq!(f.route(6).await, ["A", "B", "C", "A", "B", "C"]);
}

#[tokio::test]
async fn weighted_shares_follow_inverse_latency_smoothly() {
    let mut f = Fixture::with_pick(&["A", "B"], WEIGHTED).await;
    f.set_load("A", latency(1_000.0));
    f.set_load("B", latency(3_000.0));
    let order = f.route(400).await;
    assert_eq!((count(&order, "A"), count(&order, "B")), (300, 100));
    // Smooth: B every fourth pick, never two A-runs longer than three.
    let longest_run = order.split(|k| *k == "B").map(<[&str]>::len).max().unwrap();
    assert!(longest_run <= 3, "{order:?}");
    // Failures weigh an endpoint down (until outlier detection takes it out).
    f.set_load("B", latency(1_000.0));
    f.set_load(
        "A",
        Load {
            failure_ratio: 0.5,
            ..latency(1_000.0)
        },
    );
    let order = f.route(300).await;
    assert_eq!((count(&order, "A"), count(&order, "B")), (100, 200));
}

#[tokio::test]
async fn a_slow_endpoint_never_holds_more_than_its_share_of_the_calls_in_flight() {
    let mut f = Fixture::with_pick(&["A", "B", "C"], WEIGHTED).await;
    // C is 40 times slower, and holds one call of the 16 in flight: its share of 16 is
    // under one, so it gets no second call however its credit grows.
    f.set_load(
        "A",
        Load {
            in_flight: 8,
            ..latency(5_000.0)
        },
    );
    f.set_load(
        "B",
        Load {
            in_flight: 7,
            ..latency(5_000.0)
        },
    );
    f.set_load(
        "C",
        Load {
            in_flight: 1,
            ..latency(200_000.0)
        },
    );
    let order = f.route(500).await;
    assert_eq!(count(&order, "C"), 0, "{order:?}");
    // With nothing in flight it is picked by its weight, as at most 10 times slower than the
    // median: 1 in 21, and once more for the credit it banked while passed over (bounded to
    // one round's worth).
    f.set_load("A", latency(5_000.0));
    f.set_load("B", latency(5_000.0));
    f.set_load("C", latency(200_000.0));
    let order = f.route(840).await;
    assert_eq!(count(&order, "C"), 41);
}

#[tokio::test(start_paused = true)]
async fn a_new_endpoint_starts_at_a_tenth_of_its_weight() {
    let slow_start = Pick::Weighted {
        slow_start: Duration::from_secs(3_600),
    };
    let mut f = Fixture::with_pick(&["A", "B"], slow_start).await;
    f.set_load("A", latency(1_000.0));
    f.set_load("B", latency(1_000.0));
    // A and B have been in for the whole window; a new C starts at 10% of its weight (the
    // floor), with no latency of its own yet (it counts as the pool's mean).
    tokio::time::advance(Duration::from_secs(3_600)).await;
    f.insert("C").await;
    let order = f.route(210).await;
    assert_eq!(count(&order, "C"), 10, "{order:?}");
    assert_eq!(count(&order, "A"), 100);
    // Halfway through, C has half its weight; at the end, all of it.
    tokio::time::advance(Duration::from_secs(1_800)).await;
    let order = f.route(250).await;
    assert_eq!(count(&order, "C"), 50, "{order:?}");
    tokio::time::advance(Duration::from_secs(1_800)).await;
    let order = f.route(300).await;
    assert_eq!(count(&order, "C"), 100, "{order:?}");
}

#[tokio::test]
async fn a_retry_goes_to_an_endpoint_its_call_has_not_tried() {
    let mut f = Fixture::new(&["A", "B", "C"]).await;
    assert_eq!(f.route_one().await, "A");
    // B is next in rotation, but the call tried B already: C gets it.
    let ready = f.balancer.ready().await.unwrap();
    let _response = ready.call("avoid B");
    assert_eq!(f.received(), Some("C"));
    // A retry takes no turn: B is still next. Every one tried: the pick (B) stands (a retry
    // needs an instance more than a new one).
    let ready = f.balancer.ready().await.unwrap();
    let _response = ready.call("avoid A,B,C");
    assert_eq!(f.received(), Some("B"));
    // A not ready is not taken in B's place either.
    f.handle("C").allow(0);
    let mut order = Vec::new();
    for _ in 0..2 {
        let ready = f.balancer.ready().await.unwrap();
        let _response = ready.call("avoid B");
        order.push(f.received().unwrap());
    }
    assert!(!order.contains(&"C"), "{order:?}");
    // A hedge never goes to an instance it avoids: with no other ready, it fails instead.
    f.handle("C").allow(u64::MAX);
    let ready = f.balancer.ready().await.unwrap();
    let error = ready.call("strictly avoid A,B,C").await.unwrap_err();
    assert!(error.downcast_ref::<BalanceError>().is_some(), "{error}");
    assert_eq!(f.received(), None);
}

/// Every call hedged (the first instance is slow): the hedges go to the other instance, and
/// the first tries still take turns, rather than the hedge's pick handing every first try
/// back to the slow one.
#[tokio::test]
async fn hedges_take_no_turn_so_first_tries_keep_strict_rotation() {
    let mut f = Fixture::new(&["A", "B"]).await;
    let mut first_tries = Vec::new();
    for _ in 0..6 {
        let first = f.route_one().await;
        first_tries.push(first);
        let hedge = if first == "A" {
            "strictly avoid A"
        } else {
            "strictly avoid B"
        };
        let ready = f.balancer.ready().await.unwrap();
        let _response = ready.call(hedge);
        let copy = f.received().unwrap();
        assert_ne!(copy, first, "a hedge went to its own first instance");
        tokio::task::yield_now().await;
    }
    assert_eq!(first_tries, ["A", "B", "A", "B", "A", "B"]);
}
