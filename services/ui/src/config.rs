//! Flags and environment of `dlb-ui`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use dlb::events::EventLogArgs;

/// Default dashboard address (the original's port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";

/// Default gateway address: operations and `dlb.v1.Gateway/Stats`.
pub const DEFAULT_GATEWAY: &str = "127.0.0.1:12000";

/// Default control address: instance lifecycle.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:12001";

/// Shortest admin token accepted, in characters: long enough that guessing is hopeless.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// Largest request body (a call's text), in bytes: the compute's default message limit plus
/// room for the JSON around it.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024 + 64 * 1024;

/// The dashboard's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "dlb-ui",
    version,
    about = "dlb dashboard: the whole mesh live in a browser"
)]
pub struct Config {
    /// Address to serve on. Beyond loopback it needs DLB_UI_ADMIN_TOKEN.
    #[arg(long, env = "DLB_UI_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Gateway gRPC address (operations and stats).
    #[arg(long, env = "DLB_UI_GATEWAY", default_value = DEFAULT_GATEWAY)]
    pub gateway: String,

    /// Control gRPC address; "none" shows the instances without lifecycle controls.
    #[arg(long, env = "DLB_UI_CONTROL", default_value = DEFAULT_CONTROL)]
    pub control: String,

    /// Token every state-changing request must carry (`Authorization: Bearer ...`); required
    /// when --listen is beyond loopback. Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "DLB_UI_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// How often the gateway's stats are read, milliseconds.
    #[arg(long, env = "DLB_UI_REFRESH_MS", default_value_t = 1000)]
    pub refresh_ms: u64,

    /// Deadline of a call run from the form, seconds.
    #[arg(long, env = "DLB_UI_CALL_TIMEOUT_SECS", default_value_t = 30)]
    pub call_timeout_secs: u64,

    /// TLS towards the gateway and control (--tls-ca verifies them; --tls-cert/--tls-key is
    /// the client certificate mutual TLS asks for). The dashboard's own HTTP stays on loopback.
    #[command(flatten)]
    pub tls: dlb::tls::TlsArgs,

    /// Distributed tracing: calls and instance actions from the page start traces (off
    /// unless an OTLP endpoint is given).
    #[command(flatten)]
    pub trace: dlb::trace::TraceArgs,

    /// The event log (read for the events panel; the dashboard logs its own actions too).
    #[command(flatten)]
    pub events: EventLogArgs,
}

impl Config {
    /// Port 0 on loopback, the given gateway and control, no event log.
    /// TLS towards the gateway and control, if `--tls-ca` is given.
    ///
    /// # Errors
    ///
    /// A message naming a bad TLS file.
    pub fn client_tls(&self) -> Result<Option<dlb::tls::ClientTls>, String> {
        Ok(self.tls.load()?.and_then(|tls| tls.client()))
    }

    pub fn for_tests(gateway: &str, control: Option<&str>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway: gateway.to_owned(),
            control: control.unwrap_or("none").to_owned(),
            admin_token: None,
            refresh_ms: 200,
            call_timeout_secs: 30,
            tls: dlb::tls::TlsArgs::default(),
            trace: dlb::trace::TraceArgs::default(),
            events: EventLogArgs::disabled(),
        }
    }

    /// The control address, unless turned off.
    pub fn control_addr(&self) -> Option<&str> {
        let value = self.control.trim();
        (!value.is_empty() && !value.eq_ignore_ascii_case("none")).then_some(value)
    }

    /// Gateway stats interval.
    pub fn refresh(&self) -> Duration {
        Duration::from_millis(self.refresh_ms)
    }

    /// Deadline of form calls.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.call_timeout_secs)
    }

    /// Checks what clap cannot, above all that the dashboard is never open to the network
    /// without a token.
    ///
    /// # Errors
    ///
    /// A one-line message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        self.trace.check("dlb-ui", "ui")?;
        if let Some(token) = &self.admin_token {
            if !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(
                    "DLB_UI_ADMIN_TOKEN must be printable ASCII without spaces (it travels in \
                     an HTTP header)"
                        .to_owned(),
                );
            }
            if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
                return Err(format!(
                    "DLB_UI_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_CHARS} characters \
                     (e.g. `openssl rand -hex 16`)"
                ));
            }
        } else if !self.listen.ip().is_loopback() {
            return Err(format!(
                "refusing to serve on {} (beyond loopback) without an admin token: anyone who \
                 can reach it could stop instances. Set DLB_UI_ADMIN_TOKEN (at least \
                 {MIN_ADMIN_TOKEN_CHARS} characters), or listen on 127.0.0.1",
                self.listen
            ));
        }
        if self.refresh_ms < 50 {
            return Err("--refresh-ms must be at least 50".to_owned());
        }
        if self.call_timeout_secs == 0 {
            return Err("--call-timeout-secs must be at least 1".to_owned());
        }
        let tls = self.client_tls()?;
        dlb::dial::endpoint_tls(&self.gateway, tls.as_ref())
            .map_err(|e| format!("--gateway: {e}"))?;
        if let Some(control) = self.control_addr() {
            dlb::dial::endpoint_tls(control, tls.as_ref())
                .map_err(|e| format!("--control: {e}"))?;
        }
        self.events.config()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, token: Option<&str>) -> Config {
        let mut config = Config::for_tests("127.0.0.1:12000", None);
        config.listen = listen.parse().unwrap();
        config.admin_token = token.map(str::to_owned);
        config
    }

    #[test]
    fn beyond_loopback_needs_a_long_token() {
        assert!(config("127.0.0.1:5000", None).validate().is_ok());
        assert!(config("[::1]:5000", None).validate().is_ok());
        let error = config("0.0.0.0:5000", None).validate().unwrap_err();
        assert!(error.contains("DLB_UI_ADMIN_TOKEN"), "{error}");
        let error = config("0.0.0.0:5000", Some("short"))
            .validate()
            .unwrap_err();
        assert!(error.contains("at least 16"), "{error}");
        assert!(
            config("0.0.0.0:5000", Some("0123456789abcdef"))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn bad_addresses_name_the_flag() {
        let mut c = config("127.0.0.1:5000", None);
        c.gateway = "https://x:1".into();
        assert!(c.validate().unwrap_err().starts_with("--gateway"));
        let mut c = config("127.0.0.1:5000", None);
        c.control = "ftp://x".into();
        assert!(c.validate().unwrap_err().starts_with("--control"));
    }
}
