//! How a call that got no answer failed, decided in one place ([`classify`]): the endpoint
//! uses it to choose between ejecting the instance and failing the one call, the relay to
//! tell "no instance left" from a failure it may retry elsewhere.

use crate::balance::BalanceError;

/// Why a call got no answer from an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The balancer had no instance to offer: nothing was sent.
    NoInstance,
    /// The instance is closing the connection gracefully (GOAWAY with NO_ERROR) and saw
    /// nothing of the call: not its failure; the call goes on a new connection.
    WentAway,
    /// The instance reset the call's stream (RST_STREAM, such as REFUSED_STREAM), or left it
    /// unprocessed closing a connection that had answered no call
    /// ([`crate::conn::ClosedUnused`]): that call failed, the connection may be fine.
    Reset,
    /// The connection failed: refused, closed, timed out, a protocol error.
    Connection,
}

/// Classifies `error` (from the balancer, an endpoint or a connection), looking through its
/// sources.
pub fn classify(error: &(dyn std::error::Error + 'static)) -> Failure {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<BalanceError>() {
            return Failure::NoInstance;
        }
        if error.is::<crate::conn::ClosedUnused>() {
            return Failure::Reset;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR) {
                return Failure::WentAway;
            }
            if h2.is_reset() && h2.is_remote() {
                return Failure::Reset;
            }
            return Failure::Connection;
        }
        next = error.source();
    }
    Failure::Connection
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> tower::BoxError {
        Box::new(error)
    }

    #[test]
    fn each_failure_is_told_apart_through_its_sources() {
        // h2 makes the instance's resets and GOAWAYs only from frames off the wire: those
        // kinds are covered by the gateway's integration tests; here, what can be built.
        assert_eq!(classify(&BalanceError::NoEndpoints), Failure::NoInstance);
        assert_eq!(
            classify(boxed(crate::conn::ClosedUnused("closed".into())).as_ref()),
            Failure::Reset
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(classify(&io), Failure::Connection);
        let wrapped = crate::relay::ForwardError(boxed(crate::conn::ClosedUnused("x".into())));
        assert_eq!(classify(&wrapped), Failure::Reset);
    }
}
