//! Errors of the compute service and their one mapping to gRPC status.

use tonic::{Code, Status};

use crate::ops::prime::NumberError;
use crate::pool::PoolError;

/// Everything that can go wrong in an operations call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `IsPrime.number` is not an acceptable number.
    #[error("number {source}")]
    Number {
        /// What is wrong with it.
        #[from]
        source: NumberError,
    },
    /// `Fibonacci.n` is over the configured maximum.
    #[error("n = {n} is over the maximum of {max} (--max-fib-n)")]
    FibTooLarge {
        /// The requested n.
        n: u64,
        /// The configured maximum.
        max: u64,
    },
    /// `WordCount.top` is over its limit.
    #[error("top = {top} is over the maximum of {max}")]
    TopTooLarge {
        /// The requested top.
        top: u32,
        /// The limit.
        max: u32,
    },
    /// The CPU pool refused, was cancelled, or a job failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// The id of the instance answering, for error messages that name it.
#[derive(Debug)]
pub(crate) struct InstanceError<'a> {
    pub(crate) instance: &'a str,
    pub(crate) error: Error,
}

impl From<InstanceError<'_>> for Status {
    fn from(InstanceError { instance, error }: InstanceError<'_>) -> Self {
        match &error {
            Error::Number { .. } | Error::FibTooLarge { .. } | Error::TopTooLarge { .. } => {
                Status::invalid_argument(error.to_string())
            }
            Error::Pool(PoolError::Full { .. }) => {
                // Refused before any work: safe to send elsewhere at once (gRFC A6 pushback,
                // which the gateway reads).
                let mut metadata = tonic::metadata::MetadataMap::new();
                metadata.insert(
                    dlb::metadata::RETRY_PUSHBACK_MS,
                    tonic::metadata::MetadataValue::from(0u32),
                );
                Status::with_metadata(
                    Code::ResourceExhausted,
                    format!("instance {instance} is overloaded: {error}; retry later or elsewhere"),
                    metadata,
                )
            }
            Error::Pool(PoolError::Cancelled(_)) => Status::cancelled("call cancelled"),
            Error::Pool(PoolError::Join(source)) => {
                tracing::error!(instance, error = %source, "CPU job failed");
                Status::internal("internal error")
            }
        }
    }
}
