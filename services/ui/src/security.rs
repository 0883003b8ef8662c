//! What keeps the dashboard safe by default, as axum middleware:
//!
//! - [`headers`]: a strict Content-Security-Policy (scripts and styles only from this server, no
//!   inline code), `nosniff`, frame denial and no referrer on every response.
//! - [`check_host`]: bound to loopback, only loopback `Host` names are served, so a web page
//!   cannot reach the dashboard through DNS rebinding and read its CSRF token.
//! - [`guard_writes`]: every request that is not GET/HEAD must be same-origin (`Origin`,
//!   `Sec-Fetch-Site`), carry the page's CSRF token and, when configured, the admin token.
//!
//! Architecture Invariant: no state-changing route is reachable by GET, and no POST passes
//! without the CSRF token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::AppError;

/// The Content-Security-Policy of every response.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The header that carries the CSRF token (read from the page's `<meta name="csrf-token">`).
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What the checks compare against.
#[derive(Debug)]
pub struct Policy {
    /// The token in this process's page; a cross-site page cannot read it.
    pub csrf_token: String,
    /// Required on writes when set.
    pub admin_token: Option<String>,
    /// Only loopback `Host` names are served (the dashboard is bound to loopback).
    pub loopback_only: bool,
}

/// A fresh random token: 32 bytes from the kernel, hex.
///
/// # Errors
///
/// When `/dev/urandom` cannot be read.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without an early exit, so timing says nothing about how much of a token matched.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Adds the security headers to every response.
pub async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn is_loopback_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses `Host` names that are not loopback while bound to loopback.
pub async fn check_host(
    State(policy): State<Arc<Policy>>,
    request: Request,
    next: Next,
) -> Response {
    if policy.loopback_only {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_loopback_name(host_name(host)) {
            return AppError::Forbidden(format!(
                "this dashboard serves only loopback names (Host {host:?} refused, against DNS \
                 rebinding); open it as http://127.0.0.1 or http://localhost"
            ))
            .into_response();
        }
    }
    next.run(request).await
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Why a write is refused, if it is.
fn write_refusal(policy: &Policy, headers: &HeaderMap) -> Option<AppError> {
    if let Some(site) = header_str(headers, "sec-fetch-site")
        && site != "same-origin"
    {
        return Some(AppError::Forbidden(format!(
            "cross-site request refused (Sec-Fetch-Site: {site})"
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = header_str(headers, "host").unwrap_or("");
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !same {
            return Some(AppError::Forbidden(format!(
                "cross-origin request refused (Origin {:?} is not this dashboard)",
                origin.to_str().unwrap_or("?")
            )));
        }
    }
    let csrf_ok = header_str(headers, CSRF_HEADER)
        .is_some_and(|token| same_secret(token, &policy.csrf_token));
    if !csrf_ok {
        return Some(AppError::Forbidden(
            "missing or invalid CSRF token (send the page's token in X-CSRF-Token; reload the \
             page if the dashboard restarted)"
                .to_owned(),
        ));
    }
    if let Some(expected) = &policy.admin_token {
        let given = header_str(headers, "authorization").and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        });
        if !given.is_some_and(|token| same_secret(token, expected)) {
            return Some(AppError::Unauthorized(
                "admin token required: enter it in the dashboard's header (Authorization: \
                 Bearer <DLB_UI_ADMIN_TOKEN>)"
                    .to_owned(),
            ));
        }
    }
    None
}

/// Lets GET and HEAD through; every other method must pass the same-origin, CSRF and admin
/// checks.
pub async fn guard_writes(
    State(policy): State<Arc<Policy>>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    if let Some(refusal) = write_refusal(&policy, request.headers()) {
        tracing::warn!(
            method = %request.method(),
            path = %request.uri().path(),
            reason = %refusal,
            "write refused"
        );
        return refusal.into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(host_name("[::1]:5000"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
        assert!(is_loopback_name("127.0.0.2"));
        assert!(is_loopback_name("LOCALHOST"));
        assert!(is_loopback_name("::1"));
        assert!(!is_loopback_name("evil.example"));
        assert!(!is_loopback_name("localhost.evil.example"));
        assert!(!is_loopback_name(""));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
