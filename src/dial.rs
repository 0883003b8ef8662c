//! How every dlb client dials: user-given gRPC addresses (`127.0.0.1:13001`, `localhost:12000`
//! or `http://host:port`), TLS when it is on, and the HTTP/2 windows and frame size every
//! dlb connection uses. (The gateway's own `endpoint` module is an instance in its balancer.)

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// The largest response a dlb client accepts, in bytes: room for Fibonacci values of millions of
/// digits (tonic's own default of 4 MiB is too small for the largest allowed F(n) on some configs).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control window of each stream, in bytes, for dlb clients and servers: a 1 MiB
/// message crosses in one round trip.
pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// HTTP/2 flow-control window of each connection, in bytes. Besides throughput it sizes h2's
/// guard against floods of small DATA frames (half the window, about 17,000 small gRPC
/// messages here): with the 64 KiB default, about 130 unread responses on one connection (an
/// overloaded gateway) made h2 close the whole connection with ENHANCE_YOUR_CALM, and the
/// gateway then ejected every instance.
pub const CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// Largest HTTP/2 frame every dlb server and client accepts, in bytes: a large message crosses
/// in a few frames (and a few system calls) instead of one per 16 KiB (the HTTP/2 default).
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// How long a client waits for a TCP + HTTP/2 connection before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors from parsing an address.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The address is not `host:port` or `http://host:port`.
    #[error("invalid address {addr:?}: expected host:port or http://host:port")]
    Invalid {
        /// What the user gave.
        addr: String,
        /// Why it did not parse.
        #[source]
        source: tonic::transport::Error,
    },
    /// No host or port, or a port that is not 1-65535.
    #[error("invalid address {addr:?}: {why}")]
    HostPort {
        /// What the user gave.
        addr: String,
        /// What is wrong, with an example.
        why: String,
    },
    /// A scheme other than http (TLS comes with its own flags).
    #[error(
        "invalid address {addr:?}: use host:port or http://host:port (https:// is used when --tls-ca is given)"
    )]
    Scheme {
        /// What the user gave.
        addr: String,
    },
    /// The TLS settings were refused.
    #[error("TLS for {addr:?}: {source}")]
    Tls {
        /// What the user gave.
        addr: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Checks that `addr` says where to dial: a bare `host:port` its port (1 to 65535), a URL a
/// host and, if it gives one, a real port (else its scheme's). A missing or impossible port
/// would otherwise surface as "connection refused".
///
/// # Errors
///
/// [`AddrError::HostPort`], saying what is missing.
pub fn check_port(addr: &str) -> Result<(), AddrError> {
    let trimmed = addr.trim();
    let refused = |why: String| AddrError::HostPort {
        addr: addr.to_owned(),
        why,
    };
    let Some((_, rest)) = trimmed.split_once("://") else {
        // A bare address: its port is all there is to say where.
        return validate_host_port(trimmed).map_err(refused);
    };
    let authority = rest.split('/').next().unwrap_or("");
    // `[::1]` is a host with colons in it, not a host and a port.
    let gives_port = authority.rsplit_once(':').is_some()
        && !(authority.starts_with('[') && authority.ends_with(']'));
    if gives_port {
        validate_host_port(authority).map_err(refused)
    } else if authority.is_empty() {
        Err(refused("it has no host".to_owned()))
    } else {
        Ok(())
    }
}

/// Turns `addr` into a full `http://` URI, adding the scheme when missing.
///
/// # Errors
///
/// [`AddrError`] when `addr` is not a valid URI or uses another scheme.
pub fn endpoint(addr: &str) -> Result<Endpoint, AddrError> {
    let addr = addr.trim();
    check_port(addr)?;
    let uri = if addr.contains("://") {
        if !addr.starts_with("http://") {
            return Err(AddrError::Scheme {
                addr: addr.to_owned(),
            });
        }
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|source| AddrError::Invalid {
        addr: addr.to_owned(),
        source,
    })?;
    Ok(tune(endpoint))
}

/// Like [`endpoint`], over TLS when `tls` is given: the address becomes `https://` (an
/// `http://` one is upgraded) and the server's certificate is checked against the CA and the
/// host in the address.
///
/// # Errors
///
/// [`AddrError`] when `addr` is not a valid address.
pub fn endpoint_tls(
    addr: &str,
    tls: Option<&crate::tls::ClientTls>,
) -> Result<Endpoint, AddrError> {
    let Some(tls) = tls else {
        return endpoint(addr);
    };
    check_port(addr)?;
    let trimmed = addr.trim();
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .unwrap_or(trimmed);
    if rest.contains("://") {
        return Err(AddrError::Scheme {
            addr: addr.to_owned(),
        });
    }
    let endpoint =
        Endpoint::from_shared(format!("https://{rest}")).map_err(|source| AddrError::Invalid {
            addr: addr.to_owned(),
            source,
        })?;
    // rustls wants an IPv6 address without its URI brackets.
    let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host);
    let bare_v6 = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
    let endpoint = endpoint
        .tls_config(tls.config(bare_v6))
        .map_err(|source| AddrError::Tls {
            addr: addr.to_owned(),
            source,
        })?;
    Ok(tune(endpoint))
}

/// The settings every dlb client uses.
fn tune(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
}

/// Checks that `addr` is HOST:PORT with a non-empty host and a port from 1 to 65535.
///
/// # Errors
///
/// A message with an example.
pub fn validate_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} has no port (e.g. 10.0.0.5:13001)"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{addr:?} has no host (e.g. 10.0.0.5:13001)"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .map(|_| ())
        .ok_or_else(|| format!("{port:?} is not a port number (1-65535)"))
}

/// A lazily connecting channel to `addr`: no I/O until the first call.
///
/// # Errors
///
/// [`AddrError`] when `addr` does not parse.
pub fn lazy_channel(addr: &str) -> Result<Channel, AddrError> {
    Ok(endpoint(addr)?.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(
            endpoint("127.0.0.1:13001").unwrap().uri().to_string(),
            "http://127.0.0.1:13001/"
        );
        assert_eq!(
            endpoint("http://localhost:12000")
                .unwrap()
                .uri()
                .to_string(),
            "http://localhost:12000/"
        );
        assert!(matches!(
            endpoint("ftp://x:1"),
            Err(AddrError::Scheme { .. })
        ));
        assert!(endpoint("not an address").is_err());
    }

    #[test]
    fn an_address_without_a_usable_port_is_refused_before_dialing() {
        for addr in [
            "127.0.0.1",
            "127.0.0.1:99999",
            "127.0.0.1:0",
            "http://localhost:99999",
            "localhost:grpc",
            ":13001",
            "http://",
        ] {
            let error = endpoint(addr).unwrap_err();
            assert!(
                matches!(error, AddrError::HostPort { .. }),
                "{addr}: {error}"
            );
            assert!(error.to_string().contains(addr), "{addr}: {error}");
        }
        // A URL may leave the port to its scheme.
        for addr in [
            "127.0.0.1:1",
            "localhost:65535",
            "http://[::1]:13001",
            "http://localhost",
            "http://[::1]",
            "http://localhost/",
        ] {
            assert!(endpoint(addr).is_ok(), "{addr}");
        }
    }
}
