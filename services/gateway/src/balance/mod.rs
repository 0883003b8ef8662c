//! Our round-robin balancer: a `tower::Service` over a `tower::discover` stream of endpoints.
//!
//! tower has only power-of-two-choices, and its `ReadyCache` drops an endpoint for good once its
//! `poll_ready` fails, polls discovery only when traffic arrives, and can route a call to the
//! wrong endpoint after a removal reorders its ready set (tower issue 856). [`RoundRobin`]
//! differs on each point:
//!
//! - Rotation is by key: endpoints live in a `BTreeMap`, and the next pick is the first ready
//!   endpoint after the last picked *key*, so inserts and removals never shift the rotation.
//! - Discovery is drained by a background task, so membership changes apply on an idle balancer.
//! - An endpoint whose `poll_ready` fails is skipped for that pick and stays in the ring; it is
//!   picked again once ready. Removing endpoints is discovery's job (our health monitor).
//! - The service picked in `poll_ready` is a clone held by this handle, so `call` always goes to
//!   the endpoint that was picked, whatever happened to the ring in between.
//! - No endpoint at all, or none that can ever become ready, fails `poll_ready` at once rather
//!   than waiting.
//!
//! Handles are cheap clones sharing one ring and one rotation, so rotation is exact across all
//! concurrent callers: with N ready endpoints, each gets 1/N of the picks.

mod error;
mod layer;
mod service;
#[cfg(test)]
mod tests;

pub use error::BalanceError;
pub use layer::RoundRobinLayer;
pub use service::{Avoid, Load, Pick, RoundRobin, Weigh};
