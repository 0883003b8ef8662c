//! The client side of dlb, for the CLI, the dashboard and tests: one call ([`call()`]) and the
//! load generator ([`bench`](mod@bench)). Services use only what their clients share with them
//! ([`Op`], [`status_message`]); how a report is printed belongs to the `dlb` binary.

pub mod bench;
mod call;

pub use call::{
    CallError, CallOutcome, Op, REFUSED_STREAM_TRIES, call, call_traced, expired_locally,
    failure_code, refused_unprocessed, status_message,
};
