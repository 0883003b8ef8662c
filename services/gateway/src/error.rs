//! Gateway errors and their one mapping to gRPC status.

use std::time::Duration;

use tonic::{Code, Status};

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
    /// An instance's answer was larger than the gateway relays.
    #[error("the instance's answer is over {limit} bytes, the most the gateway relays")]
    AnswerTooLarge {
        /// The bound.
        limit: usize,
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
            Error::Overloaded { .. } | Error::AnswerTooLarge { .. } => Code::ResourceExhausted,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        };
        Status::new(code, error.to_string())
    }
}
