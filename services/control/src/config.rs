//! Configuration of the control service: flags, with `DLB_CONTROL_*` environment equivalents.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use dlb::events::EventLogArgs;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:12001";

/// Port of instance A; B gets the next one, and so on.
pub const DEFAULT_FIRST_PORT: u16 = 13001;

/// What to do when an instance exits without being asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Restart {
    /// Report it as crashed and leave it.
    Never,
    /// Report it, then start it again after a backoff (0.5 s doubling to 10 s).
    OnFailure,
}

/// The control service's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "dlb-control",
    version,
    about = "dlb control: supervises dlb-compute instances"
)]
pub struct Config {
    /// Address to serve gRPC on (IP:PORT, e.g. 127.0.0.1:12001; port 0 picks a free one).
    #[arg(long, env = "DLB_CONTROL_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// The dlb-compute binary (default: next to this executable).
    #[arg(long, env = "DLB_CONTROL_COMPUTE_BIN")]
    pub compute_bin: Option<PathBuf>,

    /// Instances started at launch (ids A, B, C, ...).
    #[arg(long, env = "DLB_CONTROL_INSTANCES", default_value_t = 3)]
    pub instances: usize,

    /// Port of instance A; B gets the next, and so on. 0 lets each instance pick a free port
    /// (kept across its restarts).
    #[arg(long, env = "DLB_CONTROL_FIRST_PORT", default_value_t = DEFAULT_FIRST_PORT)]
    pub first_port: u16,

    /// Restart instances that exit on their own.
    #[arg(long, env = "DLB_CONTROL_RESTART", value_enum, default_value = "never")]
    pub restart: Restart,

    /// Seconds an instance has to report SERVING after it is spawned.
    #[arg(long, env = "DLB_CONTROL_START_TIMEOUT_SECS", default_value_t = 10)]
    pub start_timeout_secs: u64,

    /// Seconds a stop waits for in-flight calls before SIGTERM.
    #[arg(long, env = "DLB_CONTROL_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,

    /// Seconds after SIGTERM before SIGKILL.
    #[arg(long, env = "DLB_CONTROL_GRACE_PERIOD_SECS", default_value_t = 10)]
    pub grace_period_secs: u64,

    /// IP address the instances listen on. Anything but loopback exposes them to the network.
    #[arg(long, env = "DLB_CONTROL_INSTANCE_HOST", default_value = "127.0.0.1")]
    pub instance_host: std::net::IpAddr,

    /// This control's name in the events it writes and in its traces: give each its own when
    /// several (one per host) write to the same Redis.
    #[arg(long, env = "DLB_CONTROL_ID", default_value = "control")]
    pub id: String,

    /// Prefix of instance ids (e.g. "h1-" gives h1-A, h1-B, ...): ids must be unique across
    /// every host that registers in the same registry.
    #[arg(long, env = "DLB_CONTROL_ID_PREFIX", default_value = "")]
    pub id_prefix: String,

    /// Instances announce themselves in the Redis registry (`--redis`), for gateways started
    /// with `--discover redis`.
    #[arg(long, env = "DLB_CONTROL_REGISTER")]
    pub register: bool,

    /// Host name or address gateways reach the instances at, as registered (default: the
    /// instance host; required with --register when that is 0.0.0.0 or ::).
    #[arg(long, env = "DLB_CONTROL_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,

    /// A second, plaintext address serving only grpc.health.v1 (for probes that cannot speak
    /// TLS); the Control API stays behind TLS.
    #[arg(long, env = "DLB_CONTROL_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// TLS: served (mutual with --tls-ca), used towards the instances, and given to every
    /// instance it starts (they serve with --instance-tls-cert when given, else with the same
    /// certificate).
    #[command(flatten)]
    pub tls: dlb::tls::TlsArgs,

    /// Who may call what under mutual TLS (built in: starting, stopping, adding and removing
    /// instances only to ui, listing them to ui and the gateway). `--allow
    /// '/dlb.v1.Control/*=operator'` gives role `operator` the lifecycle RPCs too.
    #[command(flatten)]
    pub authz: dlb::authz::AuthzArgs,

    /// Distributed tracing (off unless an OTLP endpoint is given).
    #[command(flatten)]
    pub trace: dlb::trace::TraceArgs,

    /// PEM certificate the instances it starts serve with, instead of control's own
    /// --tls-cert (`dlb up --tls` gives them compute.pem).
    #[arg(
        long,
        env = "DLB_CONTROL_INSTANCE_TLS_CERT",
        requires = "instance_tls_key"
    )]
    pub instance_tls_cert: Option<PathBuf>,

    /// PEM private key of --instance-tls-cert.
    #[arg(
        long,
        env = "DLB_CONTROL_INSTANCE_TLS_KEY",
        requires = "instance_tls_cert"
    )]
    pub instance_tls_key: Option<PathBuf>,

    /// Where events go (the Redis event log); instances log to the same Redis.
    #[command(flatten)]
    pub events: EventLogArgs,
}

impl Config {
    /// Port 0 for control and instances, no event log, `instances` instances.
    pub fn for_tests(compute_bin: PathBuf, instances: usize) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            compute_bin: Some(compute_bin),
            instances,
            first_port: 0,
            restart: Restart::Never,
            start_timeout_secs: 10,
            drain_timeout_secs: 10,
            grace_period_secs: 10,
            instance_host: std::net::IpAddr::from([127, 0, 0, 1]),
            id: "control".to_owned(),
            id_prefix: String::new(),
            register: false,
            advertise_host: None,
            health_listen: None,
            tls: dlb::tls::TlsArgs::default(),
            authz: dlb::authz::AuthzArgs::default(),
            trace: dlb::trace::TraceArgs::default(),
            instance_tls_cert: None,
            instance_tls_key: None,
            events: EventLogArgs::disabled(),
        }
    }

    /// The compute binary to spawn.
    pub fn compute_bin(&self) -> PathBuf {
        self.compute_bin.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("dlb-compute")))
                .unwrap_or_else(|| PathBuf::from("dlb-compute"))
        })
    }

    /// Start timeout.
    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.start_timeout_secs)
    }

    /// Drain timeout.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// SIGTERM to SIGKILL.
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }

    /// Checks what clap cannot.
    ///
    /// # Errors
    ///
    /// A one-line message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        dlb::metadata::validate_instance_id(&self.id).map_err(|e| format!("--id: {e}"))?;
        self.trace.check("dlb-control", &self.id)?;
        if self.instances > 26 * 27 {
            return Err("--instances must be at most 702 (ids A to ZZ)".to_owned());
        }
        if self.first_port != 0 && usize::from(self.first_port) + self.instances > 65_536 {
            return Err("--first-port leaves no room for every instance's port".to_owned());
        }
        self.events.config()?;
        self.tls.load()?;
        if self.tls.tls_ca.is_some() && self.tls.tls_cert.is_none() {
            return Err(
                "--tls-ca without --tls-cert/--tls-key: control and the instances it starts serve with that certificate"
                    .to_owned(),
            );
        }
        if self.instance_tls_cert.is_some() {
            if self.tls.tls_cert.is_none() {
                return Err(
                    "--instance-tls-cert without --tls-cert/--tls-key: TLS is off, the instances serve plaintext"
                        .to_owned(),
                );
            }
            self.instance_tls().load()?;
        }
        if !self.id_prefix.is_empty() {
            dlb::metadata::validate_instance_id(&format!("{}A", self.id_prefix))
                .map_err(|e| format!("--id-prefix: {e}"))?;
        }
        if self.register {
            if self.events.config()?.redis_url.is_none() {
                return Err("--register needs Redis: give --redis URL, not \"none\"".to_owned());
            }
            if self.instance_host.is_unspecified() && self.advertise_host.is_none() {
                return Err(format!(
                    "--register with --instance-host {} needs --advertise-host: the name other hosts reach the instances at",
                    self.instance_host
                ));
            }
        }
        if let Some(host) = &self.advertise_host
            && host.parse::<std::net::IpAddr>().is_err()
            && host_name(host).is_err()
        {
            return Err(format!(
                "--advertise-host {host:?} is not a host name or an IP address"
            ));
        }
        Ok(())
    }

    /// The TLS settings of the instances it starts: control's own, with --instance-tls-cert
    /// and --instance-tls-key in place of its certificate when given.
    pub fn instance_tls(&self) -> dlb::tls::TlsArgs {
        let mut tls = self.tls.clone();
        if let (Some(cert), Some(key)) = (&self.instance_tls_cert, &self.instance_tls_key) {
            tls.tls_cert = Some(cert.clone());
            tls.tls_key = Some(key.clone());
        }
        tls
    }

    /// Arguments every spawned instance gets beyond its id, address and Redis.
    pub fn instance_args(&self) -> Vec<String> {
        let mut args = self.instance_tls().to_args();
        if self.register {
            args.push("--register".to_owned());
            if let Some(host) = &self.advertise_host {
                args.push("--advertise".to_owned());
                args.push(host.clone());
            }
        }
        // The instances trace where control does (the other OTEL_* variables they inherit).
        if let Some(endpoint) = &self.trace.otlp_endpoint {
            args.push("--otlp-endpoint".to_owned());
            args.push(endpoint.clone());
        }
        args
    }
}

/// Checks a host name: letters, digits, '-', '.', at most 253 characters.
fn host_name(host: &str) -> Result<(), ()> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if ok { Ok(()) } else { Err(()) }
}

/// The id of the instance at `index`: A..Z, then AA..ZZ.
pub fn instance_id(index: usize) -> String {
    let letter = |i: usize| char::from(b'A' + (i % 26) as u8);
    if index < 26 {
        letter(index).to_string()
    } else {
        let rest = index - 26;
        format!("{}{}", letter(rest / 26), letter(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_run_a_to_z_then_aa() {
        assert_eq!(instance_id(0), "A");
        assert_eq!(instance_id(2), "C");
        assert_eq!(instance_id(25), "Z");
        assert_eq!(instance_id(26), "AA");
        assert_eq!(instance_id(27), "AB");
        assert_eq!(instance_id(26 + 26 * 26 - 1), "ZZ");
    }

    #[test]
    fn instances_present_their_own_certificate_when_given() {
        let mut config = Config::for_tests(PathBuf::from("dlb-compute"), 0);
        config.tls.tls_cert = Some(PathBuf::from("/certs/control.pem"));
        config.tls.tls_key = Some(PathBuf::from("/certs/control.key"));
        config.tls.tls_ca = Some(PathBuf::from("/certs/ca.pem"));
        let args = config.instance_args();
        assert!(
            args.windows(2)
                .any(|w| w == ["--tls-cert", "/certs/control.pem"]),
            "{args:?}"
        );
        config.instance_tls_cert = Some(PathBuf::from("/certs/compute.pem"));
        config.instance_tls_key = Some(PathBuf::from("/certs/compute.key"));
        let args = config.instance_args();
        assert!(
            args.windows(2)
                .any(|w| w == ["--tls-cert", "/certs/compute.pem"]),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--tls-key", "/certs/compute.key"]),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--tls-ca", "/certs/ca.pem"]),
            "{args:?}"
        );
        // Without TLS on, a certificate for the instances is a mistake, said so.
        config.tls = dlb::tls::TlsArgs::default();
        let error = config.validate().unwrap_err();
        assert!(
            error.contains("--instance-tls-cert without --tls-cert"),
            "{error}"
        );
    }
}
