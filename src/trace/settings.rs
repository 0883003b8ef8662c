//! Where spans go and which are recorded: `--otlp-endpoint` and OpenTelemetry's standard
//! environment variables, read once at start. A value dlb cannot honour (a protocol other
//! than gRPC, a sampler ratio that is no number) stops the start with the variable's name:
//! quietly dropping every span would be worse.

use std::time::Duration;

/// The tracing flag every dlb server and client takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TraceArgs {
    /// Export spans with OTLP over gRPC to this collector (`http://HOST:4317`, or `https://`
    /// with OTEL_EXPORTER_OTLP_CERTIFICATE); tracing is off without it. The other standard
    /// OTEL_* variables apply (sampler, service name, headers, batching): see docs/tracing.md.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl TraceArgs {
    /// Checks the endpoint and the standard variables as the server will read them, so that
    /// a bad setting is said before the server says it listens.
    ///
    /// # Errors
    ///
    /// As [`Settings::from_process`].
    pub fn check(&self, service: &str, instance: &str) -> Result<(), String> {
        Settings::from_process(self, service, instance).map(|_| ())
    }
}

/// Which traces are recorded: OpenTelemetry's standard samplers (`OTEL_TRACES_SAMPLER`,
/// `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// A share of the traces, by trace id (the same ones in every service).
    Ratio(f64),
    /// As the caller's `sampled` flag says; `root` decides the traces started here.
    ParentBased(Root),
}

/// How a parent-based sampler decides a trace with no parent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl Default for Sampler {
    fn default() -> Self {
        Self::ParentBased(Root::AlwaysOn)
    }
}

impl Sampler {
    /// Whether a span with `parent` (none: a new trace) in trace `trace_id` is recorded.
    pub fn sample(&self, parent: Option<&super::SpanContext>, trace_id: &[u8; 16]) -> bool {
        match (self, parent) {
            (Self::AlwaysOn, _) => true,
            (Self::AlwaysOff, _) => false,
            (Self::Ratio(ratio), _) => by_ratio(*ratio, trace_id),
            (Self::ParentBased(_), Some(parent)) => parent.sampled,
            (Self::ParentBased(Root::AlwaysOn), None) => true,
            (Self::ParentBased(Root::AlwaysOff), None) => false,
            (Self::ParentBased(Root::Ratio(ratio)), None) => by_ratio(*ratio, trace_id),
        }
    }

    /// The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` name.
    ///
    /// # Errors
    ///
    /// An unknown sampler, or an argument that is not a ratio from 0 to 1.
    pub fn from_env(name: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim) {
                None | Some("") => Ok(1.0),
                Some(text) => text
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG={text:?} is not a ratio from 0 to 1")
                    }),
            }
        };
        Ok(match name.map(str::trim).unwrap_or("") {
            "" | "parentbased_always_on" => Self::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Self::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Self::ParentBased(Root::Ratio(ratio()?)),
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::Ratio(ratio()?),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not a sampler dlb knows (always_on, \
                     always_off, traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio)"
                ));
            }
        })
    }
}

/// Whether `trace_id` falls in the sampled share: its last 8 bytes (random in every W3C id)
/// below `ratio` of their range, so every service decides a trace alike.
fn by_ratio(ratio: f64, trace_id: &[u8; 16]) -> bool {
    let mut low = [0; 8];
    low.copy_from_slice(&trace_id[8..]);
    let value = u64::from_be_bytes(low) >> 11; // 53 bits: exact in an f64
    #[allow(clippy::cast_precision_loss)]
    let bound = ratio * (1u64 << 53) as f64;
    #[allow(clippy::cast_precision_loss)]
    let below = (value as f64) < bound;
    below
}

/// Everything the exporter needs, as read at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `http://` or `https://` URL of the collector.
    pub endpoint: String,
    pub sampler: Sampler,
    /// `service.name`.
    pub service_name: String,
    /// More resource attributes: `service.instance.id` and `OTEL_RESOURCE_ATTRIBUTES`.
    pub resource: Vec<(String, String)>,
    /// Metadata on every export (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(String, String)>,
    /// How long one export may take.
    pub timeout: Duration,
    /// How long an ended span may wait before its batch goes.
    pub schedule_delay: Duration,
    /// Spans waiting at most; more are dropped (and counted).
    pub max_queue: usize,
    /// Spans per export at most.
    pub max_batch: usize,
    /// PEM files for `https://`: the collector's CA, and our certificate and key for mutual TLS.
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
}

impl Settings {
    /// The settings of a process whose `service.name` defaults to `service` (`dlb-gateway`)
    /// and whose instance is `instance`, from `args` and the environment as `env` reads it.
    /// `None` when tracing is off: no endpoint, `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none`.
    ///
    /// # Errors
    ///
    /// A message naming the variable or flag and what is wrong with it.
    pub fn from_env(
        args: &TraceArgs,
        service: &str,
        instance: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER={other:?}: dlb exports traces with otlp only (or none)"
                ));
            }
        }
        // The traces' own endpoint wins over the general one, unless a flag gave it.
        let general = var("OTEL_EXPORTER_OTLP_ENDPOINT");
        let endpoint = match (
            &args.otlp_endpoint,
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ) {
            (Some(flag), Some(traces)) if general.as_deref() == Some(flag.as_str()) => traces,
            (Some(flag), _) => flag.clone(),
            (None, Some(traces)) => traces,
            (None, None) => return Ok(None),
        };
        let endpoint = endpoint_url(&endpoint)?;
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = var(name) {
                if protocol.trim() != "grpc" {
                    return Err(format!(
                        "{name}={protocol:?}: dlb exports OTLP over gRPC only; use a \
                         collector's gRPC port (4317) and grpc, or unset it"
                    ));
                }
                break;
            }
        }
        let sampler = Sampler::from_env(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )?;
        let mut resource = vec![("service.instance.id".to_owned(), instance.to_owned())];
        let mut service_name = service.to_owned();
        if let Some(list) = var("OTEL_RESOURCE_ATTRIBUTES") {
            for (key, value) in key_values("OTEL_RESOURCE_ATTRIBUTES", &list)? {
                if key == "service.name" {
                    service_name = value;
                } else {
                    resource.retain(|(k, _)| *k != key);
                    resource.push((key, value));
                }
            }
        }
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            service_name = name.trim().to_owned();
        }
        let mut headers = Vec::new();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(list) = var(name) {
                for (key, value) in key_values(name, &list)? {
                    let key = key.to_ascii_lowercase();
                    let valid = tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(
                        key.as_bytes(),
                    )
                    .is_ok()
                        && tonic::metadata::MetadataValue::<tonic::metadata::Ascii>::try_from(
                            value.as_str(),
                        )
                        .is_ok();
                    if !valid || key.ends_with("-bin") {
                        return Err(format!("{name}: {key:?} is not a usable gRPC header"));
                    }
                    headers.retain(|(k, _)| *k != key);
                    headers.push((key, value));
                }
            }
        }
        let millis = |names: &[&str], default: u64| -> Result<Duration, String> {
            for name in names {
                if let Some(text) = var(name) {
                    return text
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|ms| (1..=600_000).contains(ms))
                        .map(Duration::from_millis)
                        .ok_or_else(|| {
                            format!("{name}={text:?} is not milliseconds from 1 to 600000")
                        });
                }
            }
            Ok(Duration::from_millis(default))
        };
        let count = |name: &str, default: usize| -> Result<usize, String> {
            match var(name) {
                None => Ok(default),
                Some(text) => text
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or_else(|| format!("{name}={text:?} is not a count from 1 to 1000000")),
            }
        };
        let max_queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?;
        let max_batch = count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.min(max_queue);
        let file = |names: &[&str]| names.iter().find_map(|name| var(name));
        let settings = Self {
            sampler,
            service_name,
            resource,
            headers,
            timeout: millis(
                &[
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                ],
                10_000,
            )?,
            schedule_delay: millis(&["OTEL_BSP_SCHEDULE_DELAY"], 5_000)?,
            max_queue,
            max_batch,
            ca_file: file(&[
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ]),
            client_cert_file: file(&[
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ]),
            client_key_file: file(&[
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ]),
            endpoint,
        };
        if settings.endpoint.starts_with("https://") && settings.ca_file.is_none() {
            return Err(format!(
                "--otlp-endpoint {}: for https, set OTEL_EXPORTER_OTLP_CERTIFICATE to the \
                 collector's CA certificate (PEM)",
                settings.endpoint
            ));
        }
        if settings.client_cert_file.is_some() != settings.client_key_file.is_some() {
            return Err(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go \
                 together: set both or neither"
                    .to_owned(),
            );
        }
        Ok(Some(settings))
    }

    /// [`Settings::from_env`] with the process's environment.
    ///
    /// # Errors
    ///
    /// As [`Settings::from_env`].
    pub fn from_process(
        args: &TraceArgs,
        service: &str,
        instance: &str,
    ) -> Result<Option<Self>, String> {
        Self::from_env(args, service, instance, |name| std::env::var(name).ok())
    }
}

/// The collector's URL: `http://` or `https://` with a host; a bare `HOST:PORT` is taken as
/// `http://`.
fn endpoint_url(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    let url = if text.contains("://") {
        text.to_owned()
    } else {
        // A bare address needs its port: without a scheme there is no default to take (the
        // one rule every dlb address follows).
        crate::dial::validate_host_port(text).map_err(|why| {
            format!(
                "--otlp-endpoint {text:?}: {why}; give HOST:PORT, http://HOST:PORT or https://HOST:PORT"
            )
        })?;
        format!("http://{text}")
    };
    let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "--otlp-endpoint {text:?}: use http://HOST:PORT or https://HOST:PORT"
        ));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || rest.contains('/') {
        return Err(format!(
            "--otlp-endpoint {text:?}: give the collector's address only \
             ({scheme}://HOST:PORT, OTLP/gRPC has no path)"
        ));
    }
    tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| format!("--otlp-endpoint {text:?}: {e}"))?;
    Ok(url)
}

/// `key=value,key=value` as the OTEL variables write them (values percent-encoded).
fn key_values(name: &str, list: &str) -> Result<Vec<(String, String)>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{name}: {item:?} is not key=value"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("{name}: {item:?} has no key"));
            }
            Ok((key.to_owned(), crate::status::percent_decode(value.trim())))
        })
        .collect()
}
