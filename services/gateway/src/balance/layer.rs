//! `RoundRobinLayer`: builds a [`RoundRobin`] over a discovery stream.

use std::fmt;
use std::marker::PhantomData;

use tower::Layer;
use tower::discover::Discover;

use super::RoundRobin;

/// Turns a `tower::discover::Discover` stream into a [`RoundRobin`] balancer.
pub struct RoundRobinLayer<D> {
    _discover: PhantomData<fn(D)>,
}

impl<D> RoundRobinLayer<D> {
    /// A new layer.
    pub fn new() -> Self {
        Self {
            _discover: PhantomData,
        }
    }
}

impl<D> Default for RoundRobinLayer<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D> fmt::Debug for RoundRobinLayer<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundRobinLayer").finish()
    }
}

impl<D> Layer<D> for RoundRobinLayer<D>
where
    D: Discover + Send + Unpin + 'static,
    D::Key: Ord + Clone + Send + 'static,
    D::Service: Clone + Send + 'static,
    D::Error: fmt::Display,
{
    type Service = RoundRobin<D::Key, D::Service>;

    fn layer(&self, discover: D) -> Self::Service {
        RoundRobin::new(discover)
    }
}
