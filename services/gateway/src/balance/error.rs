//! Errors of the round-robin balancer.

/// Why the balancer could not pick an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    /// The ring is empty.
    #[error("no endpoints")]
    NoEndpoints,
    /// Every endpoint failed its readiness check.
    #[error("none of {endpoints} endpoints is ready")]
    NoneReady {
        /// Endpoints in the ring.
        endpoints: usize,
    },
    /// `call` without a successful `poll_ready` first.
    #[error("call without a ready endpoint (poll_ready first)")]
    NotReady,
}
