//! Who may call what: authorization by the identity in a caller's mutual-TLS certificate.
//!
//! Every certificate `dlb certs` makes names a role in a SPIFFE-style URI subject alternative
//! name (`spiffe://dlb.local/gateway`, [`spiffe_id`]). Each server holds a [`Policy`]: rules that
//! map gRPC methods (`/package.Service/Method`, `*` matching anything) to the identities that
//! may call them. A call no rule allows gets PERMISSION_DENIED naming the caller's identity and
//! the rule it missed, an event in the log, and a count ([`Guard::denied`]).
//!
//! Authorization needs mutual TLS: a plaintext server, or TLS without a client CA, has no
//! identity to decide on and serves every caller as before (with the warning it prints).

mod der;
mod layer;
mod policy;

pub use der::{issuer, public_key_info, subject, uri_sans};
pub use layer::{AuthzLayer, AuthzService};
pub use policy::{Denied, Policy, Rule, Who};

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_rustls::rustls::pki_types::CertificateDer;

use crate::events::EventLog;

/// The trust domain of every identity `dlb certs` writes.
pub const TRUST_DOMAIN: &str = "dlb.local";

/// The identity URI of `role`: `spiffe://dlb.local/ROLE`.
pub fn spiffe_id(role: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{role}")
}

/// Checks a role name: 1 to 64 of lower-case letters, digits, `.`, `_` and `-`, starting with a
/// letter or digit.
///
/// # Errors
///
/// A message saying what is wrong with it.
pub fn check_role(role: &str) -> Result<(), String> {
    let valid = !role.is_empty()
        && role.len() <= 64
        && role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && role.as_bytes()[0].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{role:?} is not a role name (1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit)"
        ))
    }
}

/// Who is calling, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The certificate's `spiffe://` URI.
    Spiffe(String),
    /// A certificate from the mesh's CA that names no `spiffe://` identity (made by a dlb
    /// before identities, or by another tool).
    Anonymous,
}

impl Caller {
    /// The identity of the leaf certificate `der`.
    pub fn of_certificate(der: &[u8]) -> Self {
        uri_sans(der)
            .into_iter()
            .find(|uri| uri.starts_with("spiffe://"))
            .map_or(Self::Anonymous, Self::Spiffe)
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Spiffe(id) => f.write_str(id),
            Self::Anonymous => f.write_str("a certificate naming no spiffe:// identity"),
        }
    }
}

/// A compute instance's built-in policy: the operations only to the gateway and control (so
/// nobody bypasses the gateway's balancing, limits and log), its load report to the mesh's
/// services, health and reflection to any certificate.
pub const COMPUTE_POLICY: &str = "\
/dlb.v1.Operations/* = gateway, control
/dlb.v1.Load/* = gateway, control, ui
/grpc.health.v1.Health/* = *
/grpc.reflection.* = *
";

/// Control's built-in policy: listing and watching instances to ui and the gateway; starting,
/// stopping, adding and removing them to ui only (`--allow` names more); health and
/// reflection to any certificate.
pub const CONTROL_POLICY: &str = "\
/dlb.v1.Control/ListInstances = gateway, ui
/dlb.v1.Control/WatchInstances = gateway, ui
/dlb.v1.Control/* = ui
/grpc.health.v1.Health/* = *
/grpc.reflection.* = *
";

/// The gateway's built-in policy: everything it serves and relays, to any certificate from the
/// CA.
pub const GATEWAY_POLICY: &str = "* = *\n";

/// The [`Guard`] of server `server` (its name in refusals and events) from its flags and
/// built-in policy `default`; `services`: what it serves (`None`: anything, it relays). Without
/// mutual TLS there is no identity to decide on: every call passes, and flags that set a
/// policy are warned about.
///
/// # Errors
///
/// A bad policy, in one line.
pub fn guard(
    server: &str,
    args: &AuthzArgs,
    default: &str,
    services: Option<&[&str]>,
    tls: &crate::tls::TlsArgs,
    events: &EventLog,
) -> Result<Guard, String> {
    let policy = args.policy(default, services)?;
    let served = services.map(|services| {
        services
            .iter()
            .chain(policy::COMMON_SERVICES.iter())
            .map(|s| (*s).to_owned())
            .collect()
    });
    if !tls.is_mutual() {
        if args.is_set() {
            eprintln!(
                "{server}: warning: --authz-policy and --allow have no effect without mutual TLS (--tls-cert, --tls-key and --tls-ca): no caller has an identity to decide on"
            );
        }
        return Ok(Guard::default());
    }
    if policy.is_none() {
        eprintln!(
            "{server}: WARNING: --authz-policy off: every certificate from the CA may call every method here"
        );
    }
    Ok(Guard::new(policy, server, events.clone()).serving(served))
}

/// The authorization flags every server takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthzArgs {
    /// Who may call what on this server under mutual TLS: a policy file (one rule per line,
    /// `METHOD = WHO, WHO`; see docs/security.md) replacing the built-in one, or `off` to let
    /// every certificate from the CA call everything.
    #[arg(long, env = "DLB_AUTHZ_POLICY", value_name = "FILE|off")]
    pub authz_policy: Option<PathBuf>,
    /// One more rule, `METHOD=WHO[,WHO...]` (repeat for several), on top of the policy: for
    /// example `/dlb.v1.Control/*=operator` lets certificates of role `operator` start and stop
    /// instances. WHO is a role, a `spiffe://` URI, or `*` for any certificate from the CA.
    #[arg(long = "allow", value_name = "RULE")]
    pub allow: Vec<String>,
}

impl AuthzArgs {
    /// The policy these flags give a server whose built-in policy is `default` and which serves
    /// `services` (`None`: any service, the gateway relays them). `None` when `--authz-policy
    /// off`.
    ///
    /// # Errors
    ///
    /// A one-line message naming the file and line, or the flag, and what is wrong.
    pub fn policy(
        &self,
        default: &str,
        services: Option<&[&str]>,
    ) -> Result<Option<Policy>, String> {
        let mut policy = match &self.authz_policy {
            Some(path) if path.as_os_str() == "off" => {
                if !self.allow.is_empty() {
                    return Err("--allow has no effect with --authz-policy off".to_owned());
                }
                return Ok(None);
            }
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("--authz-policy {}: cannot read it: {e}", path.display())
                })?;
                Policy::parse(&text, &format!("--authz-policy {}", path.display()))?
            }
            None => Policy::parse(default, "the built-in policy")?,
        };
        for rule in &self.allow {
            policy.push(Rule::parse(rule).map_err(|e| format!("--allow {rule:?}: {e}"))?);
        }
        if let Some(services) = services {
            policy.check_services(services)?;
        }
        policy.check_methods(policy::known_methods())?;
        Ok(Some(policy))
    }

    /// Whether anything was set (a server without mutual TLS says it has no effect).
    pub fn is_set(&self) -> bool {
        self.authz_policy.is_some() || !self.allow.is_empty()
    }
}

/// A server's authorization: its policy, where refusals are logged and counted. Cheap to clone;
/// the default lets every call through (no policy).
#[derive(Debug, Clone, Default)]
pub struct Guard {
    inner: Option<Arc<GuardInner>>,
    denied: Arc<AtomicU64>,
}

#[derive(Debug)]
struct GuardInner {
    policy: Policy,
    /// The policy lets any certificate call everything ([`Policy::allows_everyone`]).
    everyone: bool,
    /// Which server says no, in refusals ("control", "compute A", ...).
    server: String,
    /// The services it decides (none: all, the gateway relays any).
    served: Option<Vec<String>>,
    events: EventLog,
    refusal_events: std::sync::Mutex<RefusalEvents>,
}

/// The refusal events of the current second.
#[derive(Debug)]
struct RefusalEvents {
    second: std::time::Instant,
    logged: u32,
    /// Refusals not logged since the last one that was.
    left_out: u64,
}

impl Guard {
    /// Decides with `policy` (none: everything is allowed), logging refusals to `events`.
    pub fn new(policy: Option<Policy>, server: &str, events: EventLog) -> Self {
        Self {
            inner: policy.map(|policy| {
                Arc::new(GuardInner {
                    everyone: policy.allows_everyone(),
                    policy,
                    server: server.to_owned(),
                    served: None,
                    events,
                    refusal_events: std::sync::Mutex::new(RefusalEvents {
                        second: std::time::Instant::now(),
                        logged: 0,
                        left_out: 0,
                    }),
                })
            }),
            denied: Arc::default(),
        }
    }

    /// Decides only calls of these services (with `/`, `/package.Service/Method`): a call of
    /// any other gets the server's UNIMPLEMENTED, as without TLS, and the refusal of an unknown
    /// method never blames a caller that only relayed it.
    pub fn serving(mut self, services: Option<Vec<String>>) -> Self {
        if let Some(inner) = self.inner.as_mut().and_then(Arc::get_mut) {
            inner.served = services;
        }
        self
    }

    /// Calls refused so far.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Whether a policy decides (else every call passes).
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Decides a call to `method` by the holder of `certificates` (the chain its connection
    /// presented, leaf first); `Err` is the refusal's message, already logged and counted.
    fn decide(
        &self,
        method: &str,
        certificates: Option<&Arc<Vec<CertificateDer<'static>>>>,
    ) -> Result<(), String> {
        let Some(inner) = self.inner.as_ref().filter(|i| !i.everyone) else {
            return Ok(());
        };
        if let Some(served) = &inner.served {
            let service = method
                .strip_prefix('/')
                .and_then(|rest| rest.split_once('/'))
                .map_or("", |(service, _)| service);
            if !served.iter().any(|s| s == service) {
                return Ok(());
            }
        }
        let Some(certificates) = certificates else {
            self.denied.fetch_add(1, Ordering::Relaxed);
            inner.refused("no client certificate", method, "none");
            return Err(format!(
                "a call without a client certificate may not call {method} ({})",
                inner.server
            ));
        };
        let Err(denied) = with_caller(certificates, |caller| inner.policy.check(method, caller))
        else {
            return Ok(());
        };
        self.denied.fetch_add(1, Ordering::Relaxed);
        let rule = denied.rule.as_deref().unwrap_or("none");
        inner.refused(&denied.caller.to_string(), method, rule);
        Err(format!("{} ({})", denied, inner.server))
    }
}

/// Refusal events logged per second at most, per server: a caller looping refused calls
/// cannot push the log's other events out (the count in [`Guard::denied`] stays exact).
const REFUSAL_EVENTS_PER_SECOND: u32 = 20;

impl GuardInner {
    /// Logs a refusal, unless this second's share is spent; the next one logged says how many
    /// were left out.
    fn refused(&self, identity: &str, method: &str, rule: &str) {
        let mut events = self
            .refusal_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if now.duration_since(events.second) >= std::time::Duration::from_secs(1) {
            events.second = now;
            events.logged = 0;
        }
        if events.logged >= REFUSAL_EVENTS_PER_SECOND {
            events.left_out += 1;
            return;
        }
        events.logged += 1;
        let left_out = std::mem::take(&mut events.left_out);
        drop(events);
        let mut fields = vec![
            ("identity", identity.to_owned()),
            ("method", method.to_owned()),
            ("rule", rule.to_owned()),
        ];
        if left_out > 0 {
            fields.push(("refusals_not_logged", left_out.to_string()));
        }
        self.events.emit(
            crate::events::Kind::Error,
            "permission denied",
            fields,
            None,
        );
        tracing::info!(identity, method, rule, "permission denied");
    }
}

/// Connections whose caller this thread read last, most recent first: tonic hands every call
/// of a connection the same `Arc` of its certificates, so a call need not read its certificate
/// again. An entry holds its `Arc`, so no other connection's certificates can take its address.
const RECENT_CALLERS: usize = 16;

thread_local! {
    static RECENT: std::cell::RefCell<Vec<(Arc<Vec<CertificateDer<'static>>>, Caller)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The caller that a connection's `certificates` (leaf first) name, read once per connection
/// and thread (the access log asks for every call, as authorization does).
pub fn caller_of(certificates: &Arc<Vec<CertificateDer<'static>>>) -> Caller {
    with_caller(certificates, Caller::clone)
}

/// Runs `f` with the caller that `certificates` (leaf first) name.
fn with_caller<R>(
    certificates: &Arc<Vec<CertificateDer<'static>>>,
    f: impl FnOnce(&Caller) -> R,
) -> R {
    RECENT.with_borrow_mut(|recent| {
        let index = match recent
            .iter()
            .position(|(c, _)| Arc::ptr_eq(c, certificates))
        {
            Some(index) => index,
            None => {
                let caller = certificates
                    .first()
                    .map_or(Caller::Anonymous, |leaf| Caller::of_certificate(leaf));
                recent.truncate(RECENT_CALLERS - 1);
                recent.insert(0, (Arc::clone(certificates), caller));
                0
            }
        };
        f(&recent[index].1)
    })
}

#[cfg(test)]
mod tests;
