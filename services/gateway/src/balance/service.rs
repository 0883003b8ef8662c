//! `RoundRobin`: selection in `poll_ready`, the call in `call`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tower::BoxError;
use tower::Service;
use tower::discover::{Change, Discover};

use super::BalanceError;

/// The shared ring: endpoints by key and the last key picked.
#[derive(Debug)]
struct Ring<K, S> {
    endpoints: BTreeMap<K, S>,
    last: Option<K>,
}

// === impl RoundRobin ===

/// Round robin over the endpoints of a discovery stream. Cheap to clone; clones share the ring.
pub struct RoundRobin<K, S> {
    ring: Arc<Mutex<Ring<K, S>>>,
    /// The endpoint picked by the last successful `poll_ready`, used by the next `call`.
    picked: Option<S>,
    /// Clones that answered `Pending`, kept so they can wake us when ready.
    waiting: Vec<S>,
}

impl<K, S> Clone for RoundRobin<K, S> {
    fn clone(&self) -> Self {
        Self {
            ring: Arc::clone(&self.ring),
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
    /// Balances over `discover`, which a background task drains as changes come, so updates
    /// apply without traffic. Must be called within a tokio runtime.
    pub fn new<D>(discover: D) -> Self
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
                        lock(&ring).endpoints.insert(key, service);
                    }
                    Some(Ok(Change::Remove(key))) => {
                        lock(&ring).endpoints.remove(&key);
                    }
                }
            }
        });
        Self {
            ring,
            picked: None,
            waiting: Vec::new(),
        }
    }

    /// The keys in the ring now.
    pub fn keys(&self) -> Vec<K> {
        lock(&self.ring).endpoints.keys().cloned().collect()
    }
}

impl<K, S, Req> Service<Req> for RoundRobin<K, S>
where
    K: Ord + Clone,
    S: Service<Req> + Clone,
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
        let mut ring = lock(&self.ring);
        if ring.endpoints.is_empty() {
            return Poll::Ready(Err(BalanceError::NoEndpoints.into()));
        }
        // Candidates in rotation order: the keys after the last pick, then from the start up to
        // and including it. No allocation: two ranges of the map, chained.
        let mut chosen = None;
        let mut pending = false;
        {
            let ring = &*ring;
            let (after, upto) = match &ring.last {
                Some(last) => (
                    ring.endpoints
                        .range::<K, _>((Bound::Excluded(last), Bound::Unbounded)),
                    Some(
                        ring.endpoints
                            .range::<K, _>((Bound::Unbounded, Bound::Included(last))),
                    ),
                ),
                None => (ring.endpoints.range::<K, _>(..), None),
            };
            for (key, service) in after.chain(upto.into_iter().flatten()) {
                let mut candidate = service.clone();
                match candidate.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        chosen = Some((key.clone(), candidate));
                        break;
                    }
                    Poll::Pending => {
                        pending = true;
                        self.waiting.push(candidate);
                    }
                    // Skipped for this pick only; discovery decides whether it leaves the ring.
                    Poll::Ready(Err(_)) => {}
                }
            }
        }
        match chosen {
            Some((key, service)) => {
                ring.last = Some(key);
                self.picked = Some(service);
                self.waiting.clear();
                Poll::Ready(Ok(()))
            }
            None if pending => Poll::Pending,
            None => Poll::Ready(Err(BalanceError::NoneReady {
                endpoints: ring.endpoints.len(),
            }
            .into())),
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.picked.take() {
            Some(mut service) => {
                let future = service.call(request);
                Box::pin(async move { future.await.map_err(Into::into) })
            }
            None => Box::pin(std::future::ready(Err(BalanceError::NotReady.into()))),
        }
    }
}
