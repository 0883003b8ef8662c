//! Gateway errors and their one mapping to gRPC status.

use std::time::Duration;

use tonic::{Code, Status};

use crate::balance::BalanceError;

/// Why the gateway answered a call itself instead of relaying an instance's answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No instance is in the rotation.
    #[error("no healthy instance: {summary}")]
    NoHealthyInstance {
        /// Every instance and its state.
        summary: String,
    },
    /// Too many calls in flight.
    #[error("gateway overloaded: {limit} calls in flight (--max-in-flight); retry later")]
    Overloaded {
        /// The bound.
        limit: usize,
    },
    /// The call's deadline passed.
    #[error("deadline of {deadline:?} exceeded after {attempts} attempt(s)")]
    DeadlineExceeded {
        /// The deadline the call had.
        deadline: Duration,
        /// Instances tried.
        attempts: u32,
    },
    /// Every attempt failed at the connection level.
    #[error("instances unreachable after {attempts} attempt(s): {last}")]
    Unreachable {
        /// Instances tried.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::NoHealthyInstance { .. } | Error::Unreachable { .. } => Code::Unavailable,
            Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        };
        Status::new(code, error.to_string())
    }
}

/// Did this status come from the balancer finding no endpoint?
pub fn is_balance_error(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.downcast_ref::<BalanceError>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

/// May this failure be retried on another instance? All five operations are pure, so a call
/// that failed before an instance answered it, or that an instance refused as UNAVAILABLE,
/// can go elsewhere. A status with a source was made by our own client stack (connection
/// refused or reset, protocol error), not sent by an instance.
pub fn is_retryable(status: &Status) -> bool {
    !is_balance_error(status)
        && (status.code() == Code::Unavailable || std::error::Error::source(status).is_some())
}

/// The status text with its source chain, for messages and logs.
pub fn describe(status: &Status) -> String {
    dlb::call::status_message(status)
}
