//! The five operations as plain functions, free of gRPC: parsing, limits and the algorithms.
//!
//! Each long-running function takes a [`Cancel`] and checks it between steps, so a call whose
//! client went away or whose deadline passed stops using CPU.

pub mod fibonacci;
pub mod palindrome;
pub mod prime;
pub mod reverse;
pub mod word_count;

use tokio_util::sync::CancellationToken;

/// Cooperative cancellation for CPU-bound work: checked between steps of long loops.
pub type Cancel = CancellationToken;

/// The work was abandoned because its [`Cancel`] fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// Returns `Err(Cancelled)` once `cancel` has fired.
///
/// # Errors
///
/// [`Cancelled`] when the token is cancelled.
pub fn check(cancel: &Cancel) -> Result<(), Cancelled> {
    if cancel.is_cancelled() {
        Err(Cancelled)
    } else {
        Ok(())
    }
}
