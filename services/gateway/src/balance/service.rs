//! `RoundRobin`: selection in `poll_ready`, the call in `call`.

use std::collections::BTreeMap;
use std::time::Duration;

use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use tokio::time::Instant;

use tower::BoxError;
use tower::Service;
use tower::discover::{Change, Discover};

use super::BalanceError;

/// How the balancer picks among the ready endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Strict rotation by key.
    RoundRobin,
    /// Smooth weighted round robin (nginx's), weights from each endpoint's [`Load`], with an
    /// endpoint's share ramping up over `slow_start` after it joins the ring.
    Weighted {
        /// How long a new or returning endpoint's weight takes to reach its full value.
        slow_start: Duration,
    },
}

/// What the weighted pick knows of an endpoint now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Recent latency of its answers, microseconds (an EWMA); `None` until it answered.
    pub latency_us: Option<f64>,
    /// Calls in flight to it.
    pub in_flight: u64,
    /// The share of its recent answers that failed, 0 to 1.
    pub failure_ratio: f64,
}

/// An endpoint that tells its [`Load`] (the weighted pick's input). The default says nothing
/// is known, which weighs every endpoint the same.
pub trait Weigh {
    /// Its load now.
    fn load(&self) -> Load {
        Load::default()
    }
}

/// A request that may name endpoints it should not go to: those its call already tried
/// (a retry after a refusal goes elsewhere if it can). Picks happen in `poll_ready`, before
/// the request is seen, so [`RoundRobin::call`] swaps an avoided pick for the next ready
/// endpoint in rotation that is not avoided, if there is one.
pub trait Avoid<K> {
    /// Whether the endpoint `key` should not get it.
    fn avoids(&self, _key: &K) -> bool {
        false
    }

    /// Whether it avoids any endpoint: a retry or a hedge of a call that went elsewhere
    /// first. Its pick takes no turn of the strict rotation, which stays the first tries'
    /// (else a hedge to the fast instance would hand every next first try to the slow one).
    fn avoids_any(&self) -> bool {
        false
    }

    /// Whether it must not go to an avoided endpoint at all (a hedge: a second copy on the
    /// same instance helps nothing): with none other ready, the call fails with
    /// [`BalanceError::NoneReady`] instead.
    fn strictly(&self) -> bool {
        false
    }
}

/// The smallest share of its weight a new endpoint starts with (Envoy's default too).
const SLOW_START_FLOOR: f64 = 0.1;

/// The most times slower than the pool's median an endpoint's latency counts.
const MAX_SLOWER: f64 = 10.0;

/// An endpoint failing every call keeps this share of its weight (outlier detection is what
/// takes it out).
const FAILURE_FLOOR: f64 = 0.1;

/// One endpoint in the ring.
#[derive(Debug)]
struct Slot<S> {
    service: S,
    /// When it joined the ring (slow start counts from here).
    since: Instant,
    /// Its smooth weighted round robin credit.
    current: f64,
}

/// The shared ring: endpoints by key and the last key picked.
#[derive(Debug)]
struct Ring<K, S> {
    endpoints: BTreeMap<K, Slot<S>>,
    last: Option<K>,
}

impl<K: Ord + Clone, S> Ring<K, S> {
    /// The endpoints in rotation order: the keys after the last pick, then from the start up
    /// to and including it. No allocation: two ranges of the map, chained.
    fn rotation(&self) -> impl Iterator<Item = (&K, &Slot<S>)> {
        let (after, upto) = match &self.last {
            Some(last) => (
                self.endpoints
                    .range::<K, _>((Bound::Excluded(last), Bound::Unbounded)),
                Some(
                    self.endpoints
                        .range::<K, _>((Bound::Unbounded, Bound::Included(last))),
                ),
            ),
            None => (self.endpoints.range::<K, _>(..), None),
        };
        after.chain(upto.into_iter().flatten())
    }
}

/// A ready endpoint and what the weighted pick makes of it.
struct Candidate<K, S> {
    key: K,
    service: S,
    in_flight: u64,
    weight: f64,
}

/// The share of its weight an endpoint has `age` after joining, over `window`.
fn slow_start_factor(age: Duration, window: Duration) -> f64 {
    if window.is_zero() {
        return 1.0;
    }
    (age.as_secs_f64() / window.as_secs_f64()).clamp(SLOW_START_FLOOR, 1.0)
}

// === impl RoundRobin ===

/// Round robin over the endpoints of a discovery stream. Cheap to clone; clones share the ring.
pub struct RoundRobin<K, S> {
    ring: Arc<Mutex<Ring<K, S>>>,
    pick: Pick,
    /// The endpoint picked by the last successful `poll_ready` (and its key), used by the
    /// next `call`, and the rotation's last pick before it (given back when the call turns
    /// out to be a retry or a hedge, see [`Avoid::avoids_any`]).
    picked: Option<(K, S, Option<K>)>,
    /// Clones that answered `Pending`, kept so they can wake us when ready.
    waiting: Vec<S>,
}

impl<K, S> Clone for RoundRobin<K, S> {
    fn clone(&self) -> Self {
        Self {
            ring: Arc::clone(&self.ring),
            pick: self.pick,
            picked: None,
            waiting: Vec::new(),
        }
    }
}

impl<K: fmt::Debug, S> fmt::Debug for RoundRobin<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = lock(&self.ring);
        f.debug_struct("RoundRobin")
            .field("endpoints", &ring.endpoints.keys().collect::<Vec<_>>())
            .field("last", &ring.last)
            .field("pick", &self.pick)
            .finish()
    }
}

fn lock<K, S>(ring: &Mutex<Ring<K, S>>) -> MutexGuard<'_, Ring<K, S>> {
    // The ring stays consistent even if a holder panicked: every update is one map operation.
    ring.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K, S> RoundRobin<K, S>
where
    K: Ord + Clone + Send + 'static,
    S: Clone + Send + 'static,
{
    /// Balances over `discover` in strict rotation (see [`RoundRobin::with_pick`]).
    pub fn new<D>(discover: D) -> Self
    where
        D: Discover<Key = K, Service = S> + Send + Unpin + 'static,
        D::Error: fmt::Display,
    {
        Self::with_pick(discover, Pick::RoundRobin)
    }

    /// Balances over `discover` by `pick`; a background task drains `discover` as changes
    /// come, so updates apply without traffic. Must be called within a tokio runtime.
    pub fn with_pick<D>(discover: D, pick: Pick) -> Self
    where
        D: Discover<Key = K, Service = S> + Send + Unpin + 'static,
        D::Error: fmt::Display,
    {
        let ring = Arc::new(Mutex::new(Ring {
            endpoints: BTreeMap::new(),
            last: None,
        }));
        let weak = Arc::downgrade(&ring);
        tokio::spawn(async move {
            let mut discover = discover;
            loop {
                let change =
                    std::future::poll_fn(|cx| Pin::new(&mut discover).poll_discover(cx)).await;
                let Some(ring) = weak.upgrade() else {
                    return; // every handle is gone
                };
                match change {
                    None => return,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "endpoint discovery failed");
                        return;
                    }
                    Some(Ok(Change::Insert(key, service))) => {
                        let slot = Slot {
                            service,
                            since: Instant::now(),
                            current: 0.0,
                        };
                        lock(&ring).endpoints.insert(key, slot);
                    }
                    Some(Ok(Change::Remove(key))) => {
                        lock(&ring).endpoints.remove(&key);
                    }
                }
            }
        });
        Self {
            ring,
            pick,
            picked: None,
            waiting: Vec::new(),
        }
    }

    /// The keys in the ring now.
    pub fn keys(&self) -> Vec<K> {
        lock(&self.ring).endpoints.keys().cloned().collect()
    }
}

impl<K: Ord + Clone, S> RoundRobin<K, S> {
    /// Polls `service` (a clone of a ring endpoint): `Some` when ready; kept to wake us when
    /// pending; skipped for this pick when failed (discovery decides whether it leaves).
    fn poll_candidate<Req>(&mut self, service: &S, cx: &mut Context<'_>) -> Option<S>
    where
        S: Service<Req> + Clone,
    {
        let mut candidate = service.clone();
        match candidate.poll_ready(cx) {
            Poll::Ready(Ok(())) => Some(candidate),
            Poll::Pending => {
                self.waiting.push(candidate);
                None
            }
            Poll::Ready(Err(_)) => None,
        }
    }

    /// The first endpoint after the last pick, in rotation, that is ready now and that
    /// `request` does not avoid.
    fn other_than_avoided<Req>(&mut self, request: &Req) -> Option<S>
    where
        S: Service<Req> + Clone,
        Req: Avoid<K>,
    {
        let ring = lock(&self.ring);
        // Not waiting to be woken: a pick that is not ready now is not taken.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut chosen = None;
        for (key, slot) in ring.rotation() {
            if request.avoids(key) {
                continue;
            }
            let mut candidate = slot.service.clone();
            if let Poll::Ready(Ok(())) = candidate.poll_ready(&mut cx) {
                chosen = Some((key.clone(), candidate));
                break;
            }
        }
        // A retry or hedge takes no turn of the rotation (see `call`).
        chosen.map(|(_, service)| service)
    }

    /// Strict rotation: the first ready endpoint after the last pick.
    fn next_in_rotation<Req>(&mut self, ring: &Ring<K, S>, cx: &mut Context<'_>) -> Option<(K, S)>
    where
        S: Service<Req> + Clone,
    {
        for (key, slot) in ring.rotation() {
            if let Some(service) = self.poll_candidate(&slot.service, cx) {
                return Some((key.clone(), service));
            }
        }
        None
    }

    /// Smooth weighted round robin over the ready endpoints. An endpoint's weight is the
    /// inverse of its latency (the pool's median while it has none), less for recent failures,
    /// times its slow-start factor. One holding more than its weight's share of the calls in
    /// flight (plus one) is passed over, so a slow endpoint never gathers the callers of a
    /// closed loop. Ties go in rotation order.
    fn heaviest<Req>(
        &mut self,
        ring: &mut Ring<K, S>,
        slow_start: Duration,
        cx: &mut Context<'_>,
    ) -> Option<(K, S)>
    where
        S: Service<Req> + Clone + Weigh,
    {
        let now = Instant::now();
        // Each ready endpoint with its latency (if known), its slow-start factor, and the rest
        // of its weight.
        let mut ready: Vec<(Candidate<K, S>, Option<f64>, f64)> =
            Vec::with_capacity(ring.endpoints.len());
        for (key, slot) in ring.rotation() {
            let Some(service) = self.poll_candidate(&slot.service, cx) else {
                continue;
            };
            let load = service.load();
            let factor = slow_start_factor(now.saturating_duration_since(slot.since), slow_start);
            let health = (1.0 - load.failure_ratio).clamp(FAILURE_FLOOR, 1.0);
            let candidate = Candidate {
                key: key.clone(),
                service,
                in_flight: load.in_flight,
                weight: factor * health,
            };
            ready.push((candidate, load.latency_us, factor));
        }
        if ready.is_empty() {
            return None;
        }
        // The pool's typical latency, for endpoints with none yet: the median, which one very
        // slow endpoint does not drag up.
        let mut known: Vec<f64> = ready
            .iter()
            .filter_map(|(_, latency, _)| *latency)
            .collect();
        known.sort_by(f64::total_cmp);
        let typical = known.get(known.len() / 2).copied().unwrap_or(1.0);
        let candidates: Vec<Candidate<K, S>> = ready
            .into_iter()
            .map(|(mut c, latency, factor)| {
                // At most MAX_SLOWER times the pool's median: the bound on calls in flight
                // is what keeps a much slower endpoint from gathering calls; its weight need
                // only say "less". Past that, one slow spell (a cold first call) would starve
                // it of the calls that would show it fast again.
                let latency = latency.unwrap_or(typical).min(typical * MAX_SLOWER);
                // While it ramps up, a fast (idle, fresh) endpoint counts as no faster than
                // the pool's median: its share is at most its factor of a fair one.
                let latency = if factor < 1.0 {
                    latency.max(typical)
                } else {
                    latency
                };
                c.weight /= latency.max(1.0);
                c
            })
            .collect();
        let total_weight: f64 = candidates.iter().map(|c| c.weight).sum();
        let total_in_flight: u64 = candidates.iter().map(|c| c.in_flight).sum();
        // Smooth weighted round robin: every endpoint earns its share of the weight each
        // pick (shares sum to one, so credit keeps its meaning while latencies change); the
        // one with the most credit among those within their share of the calls in flight
        // wins, and pays one.
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in candidates.iter().enumerate() {
            let Some(slot) = ring.endpoints.get_mut(&c.key) else {
                continue;
            };
            let part = c.weight / total_weight;
            slot.current = (slot.current + part).min(1.0);
            let share = total_in_flight as f64 * part;
            if c.in_flight as f64 >= share.floor() + 1.0 {
                continue;
            }
            // Ties (within rounding) go in rotation order.
            if best.is_none_or(|(_, current)| slot.current > current + 1e-9) {
                best = Some((i, slot.current));
            }
        }
        let chosen = match best {
            Some((i, _)) => i,
            // Every one at its share (rounding): the least loaded for its weight.
            None => {
                let cost = |c: &Candidate<K, S>| (c.in_flight + 1) as f64 / c.weight;
                let mut least = 0;
                for (i, c) in candidates.iter().enumerate() {
                    if cost(c) < cost(&candidates[least]) {
                        least = i;
                    }
                }
                least
            }
        };
        let chosen = candidates.into_iter().nth(chosen)?;
        if let Some(slot) = ring.endpoints.get_mut(&chosen.key) {
            // A pick costs the whole round's weight (one), which every endpoint earned: an
            // endpoint passed over for its calls in flight keeps its credit, and one that
            // takes the calls the busy ones cannot pays for them, so that over time each
            // share stays its weight's (a slow start is not cut short under load). Credit
            // and debt are bounded to one round, so that weights that changed a lot leave
            // no lasting debt or credit.
            slot.current = (slot.current - 1.0).max(-1.0);
        }
        Some((chosen.key, chosen.service))
    }
}

impl<K, S, Req> Service<Req> for RoundRobin<K, S>
where
    K: Ord + Clone,
    Req: Avoid<K>,
    S: Service<Req> + Clone + Weigh,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.picked.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.waiting.clear();
        let shared = Arc::clone(&self.ring);
        let mut ring = lock(&shared);
        if ring.endpoints.is_empty() {
            return Poll::Ready(Err(BalanceError::NoEndpoints.into()));
        }
        let chosen = match self.pick {
            Pick::RoundRobin => self.next_in_rotation(&ring, cx),
            Pick::Weighted { slow_start } => self.heaviest(&mut ring, slow_start, cx),
        };
        match chosen {
            Some((key, service)) => {
                let before = ring.last.replace(key.clone());
                self.picked = Some((key, service, before));
                self.waiting.clear();
                Poll::Ready(Ok(()))
            }
            None if !self.waiting.is_empty() => Poll::Pending,
            None => Poll::Ready(Err(BalanceError::NoneReady {
                endpoints: ring.endpoints.len(),
            }
            .into())),
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.picked.take() {
            Some((key, mut service, before)) => {
                if request.avoids_any() {
                    // A retry or hedge: the rotation's turn goes back to where it was, unless
                    // another pick has taken the next one since.
                    let mut ring = lock(&self.ring);
                    if ring.last.as_ref() == Some(&key) {
                        ring.last = before;
                    }
                }
                if request.avoids(&key) {
                    match self.other_than_avoided(&request) {
                        Some(other) => service = other,
                        None if request.strictly() => {
                            let endpoints = lock(&self.ring).endpoints.len();
                            let error = BalanceError::NoneReady { endpoints };
                            return Box::pin(std::future::ready(Err(error.into())));
                        }
                        None => {}
                    }
                }
                let future = service.call(request);
                Box::pin(async move { future.await.map_err(Into::into) })
            }
            None => Box::pin(std::future::ready(Err(BalanceError::NotReady.into()))),
        }
    }
}
