//! Starting the mesh: ports, binaries, Redis, certificates, then each service once the one
//! before it is ready.

use super::children::{
    Probe, Service, grpc_serving, http_ok, instances_serving, redis_answers, wait_ready,
};
use super::*;
use crate::process::find_on_path;

// === ports ===

/// A port `dlb up` needs, with the flag that changes it.
pub(super) struct PortNeed {
    port: u16,
    what: String,
    flag: &'static str,
}

/// Binds each port once to see that it is free; the first taken one is the error.
pub(super) fn check_ports(needs: &[PortNeed]) -> Result<(), String> {
    for need in needs {
        if need.port == 0 {
            continue;
        }
        if let Err(error) = StdTcpListener::bind(("127.0.0.1", need.port)) {
            return Err(format!(
                "port {} ({}) is not available: {error}. Choose another with `dlb up {} <PORT>`, \
                 or stop what uses it (`dlb down` stops a mesh started with --detach)",
                need.port, need.what, need.flag
            ));
        }
    }
    Ok(())
}

// === binaries ===

/// This program as a shell word: its absolute path (quoted when it needs to be), so the
/// commands `dlb up` prints paste into any shell, whatever its directory and `PATH`.
pub(super) fn this_program() -> String {
    std::env::current_exe().map_or_else(|_| "dlb".to_owned(), |exe| shell_word(&exe))
}

/// grpcurl as a shell word: the one the quick start installs into the checkout's `.venv`,
/// when there is one, else `grpcurl` (from `PATH`).
pub(super) fn grpcurl_program() -> String {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl");
    if venv.exists() {
        shell_word(&venv)
    } else {
        "grpcurl".to_owned()
    }
}

/// `path` as one shell word: as it is when it is made of safe characters only, else quoted.
pub(super) fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%".contains(c);
    if text.chars().all(safe) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Finds the service binaries, building them with cargo when some are missing and this `dlb`
/// was built from a checkout that is still there.
pub(crate) fn service_binaries(bin_dir: Option<&Path>) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let dir = match bin_dir {
        Some(dir) => dir.to_path_buf(),
        None => exe
            .parent()
            .map(Path::to_path_buf)
            .ok_or("cannot find this program's directory")?,
    };
    let missing: Vec<&str> = SERVICE_BINARIES
        .iter()
        .copied()
        .filter(|name| !dir.join(name).exists())
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    if bin_dir.is_some() || !checkout.join("Cargo.toml").exists() {
        return Err(format!(
            "{} not found in {}; build them with `cargo build --release` in the dlb checkout, \
             or point --bin-dir at them",
            missing.join(", "),
            dir.display()
        ));
    }
    // Build into the same target directory and profile as this program.
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("release");
    let target_dir = dir.parent().unwrap_or(&dir);
    say(format!(
        "building {} ({profile}) with cargo; the first build takes a few minutes",
        missing.join(", ")
    ));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = std::process::Command::new(&cargo);
    // Under `cargo run`, this process has the variables cargo sets for the program it runs
    // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...). Some build scripts (ring's) are rerun when
    // one of them changes, so handing them down would compile ring and all that depends on
    // it a second time; the build then sees the environment a shell's `cargo build` does.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(cargo_run_variable) {
            build.env_remove(&name);
        }
    }
    build
        .current_dir(checkout)
        .arg("build")
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    for name in SERVICE_BINARIES {
        build.args(["-p", name]);
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e} (is Rust installed?)"))?;
    if !status.success() {
        return Err(format!("building the services failed ({status})"));
    }
    Ok(dir)
}

/// Whether `name` is one of the variables `cargo run` sets for the program it runs.
pub(super) fn cargo_run_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

/// The services started so far (the caller stops them, newest first, if a later one fails)
/// and the state file, rewritten as each one starts so that `dlb down` can always find it.
struct Launcher<'a> {
    started: &'a mut Vec<Service>,
    state: State,
    state_path: PathBuf,
    log_dir: Option<&'a Path>,
}

impl Launcher<'_> {
    /// Spawns one service, records it, and waits until `check` says it is `what`.
    async fn launch<F, Fut>(
        &mut self,
        (name, label): (&'static str, &'static str),
        program: &Path,
        args: &[String],
        what: &str,
        check: F,
    ) -> Result<String, String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<String, Probe>>,
    {
        self.started
            .push(Service::spawn(name, label, program, args, self.log_dir)?);
        let service = self
            .started
            .last_mut()
            .ok_or_else(|| format!("{name} did not start"))?;
        self.state.processes.push(service.started.clone());
        write_state(&self.state_path, &self.state)?;
        wait_ready(service, what, check).await
    }
}

/// Starts the whole mesh in order, each service once the one before it is ready, and returns
/// the summary to print.
pub(super) async fn start_all(args: &UpArgs, started: &mut Vec<Service>) -> Result<String, String> {
    if args.instances == 0 {
        return Err("--instances must be at least 1".to_owned());
    }
    let state_dir = state_dir(args.state_dir.as_deref());
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        format!(
            "cannot create the state directory {}: {e}",
            state_dir.display()
        )
    })?;
    let state_path = state_dir.join(STATE_FILE);
    no_mesh_running(&state_path)?;
    // Every port first, so that a conflict starts nothing.
    check_ports(&port_needs(args)?)?;
    // And the tracing settings (the flag and the OTEL_* variables every service inherits), so
    // that a bad one stops nothing half-started.
    dlb::trace::Settings::from_process(&args.trace, "dlb", "up")?;
    let trace_args: Vec<String> = args
        .trace
        .otlp_endpoint
        .iter()
        .flat_map(|url| ["--otlp-endpoint".to_owned(), url.clone()])
        .collect();

    let bins = service_binaries(args.bin_dir.as_deref())?;
    let up_pid = std::process::id();
    let mut mesh = Launcher {
        started,
        state: State {
            up_pid,
            up_start_ticks: start_ticks(up_pid).unwrap_or(0),
            ..State::default()
        },
        state_path,
        log_dir: args.detach.then_some(state_dir.as_path()),
    };
    let begun = Instant::now();

    let (redis_url, redis_note) = event_log(args, &state_dir, &mut mesh).await?;
    mesh.state.redis = dlb::events::redact_url(&redis_url);
    let certs = certificates(args, &state_dir)?;
    let tls_args = |name: &str| {
        certs
            .as_ref()
            .map(|dir| dlb::tls::args_for(dir, name).to_args())
            .unwrap_or_default()
    };
    let client_tls = match &certs {
        Some(dir) => dlb::tls::args_for(dir, "client")
            .load()?
            .and_then(|tls| tls.client()),
        None => None,
    };
    // Whether control serves its instances, asked as the dashboard would (control lists them
    // only to the gateway and ui).
    let ui_tls = match &certs {
        Some(dir) => dlb::tls::args_for(dir, "ui")
            .load()?
            .and_then(|tls| tls.client()),
        None => None,
    };

    // Control and its instances.
    let control_addr = format!("127.0.0.1:{}", args.control_port);
    say(format!(
        "starting control with {} compute instance(s) on {control_addr}",
        args.instances
    ));
    let control_args = [
        "--listen",
        &control_addr,
        "--instances",
        &args.instances.to_string(),
        "--first-port",
        &args.first_port.to_string(),
        "--restart",
        "on-failure",
        "--compute-bin",
        &bins.join("dlb-compute").display().to_string(),
        "--redis",
        &redis_url,
    ]
    .map(str::to_owned)
    .into_iter()
    .chain(tls_args("control"))
    // Control passes it on to the instances it starts.
    .chain(trace_args.iter().cloned())
    .chain(
        args.operators
            .iter()
            .flat_map(|role| ["--allow".to_owned(), format!("/dlb.v1.Control/*={role}")]),
    )
    // Its instances present compute.pem, not control's certificate.
    .chain(certs.as_ref().map_or_else(Vec::new, |dir| {
        let compute = dlb::tls::args_for(dir, "compute");
        let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
        vec![
            "--instance-tls-cert".to_owned(),
            path(compute.tls_cert),
            "--instance-tls-key".to_owned(),
            path(compute.tls_key),
        ]
    }))
    .collect::<Vec<_>>();
    let instances = {
        let (addr, count, tls) = (control_addr.clone(), args.instances, ui_tls.clone());
        mesh.launch(
            ("control", "control"),
            &bins.join("dlb-control"),
            &control_args,
            "serving every instance",
            move || {
                let (addr, tls) = (addr.clone(), tls.clone());
                async move { instances_serving(&addr, count, tls.as_ref()).await }
            },
        )
        .await?
    };
    mesh.state.control.clone_from(&control_addr);

    // Gateway.
    let gateway_addr = format!("127.0.0.1:{}", args.gateway_port);
    say(format!("starting the gateway on {gateway_addr}"));
    let gateway_args = [
        "--listen",
        &gateway_addr,
        "--metrics-listen",
        &format!("127.0.0.1:{}", args.metrics_port),
        "--control",
        &format!("http://{control_addr}"),
        "--redis",
        &redis_url,
    ]
    .map(str::to_owned)
    .into_iter()
    .chain(tls_args("gateway"))
    .chain(trace_args.iter().cloned())
    .collect::<Vec<_>>();
    mesh.launch(
        ("gateway", "gateway"),
        &bins.join("dlb-gateway"),
        &gateway_args,
        "serving",
        || grpc_serving(&gateway_addr, client_tls.as_ref()),
    )
    .await?;
    mesh.state.gateway.clone_from(&gateway_addr);

    // Dashboard.
    let ui_addr = SocketAddr::from(([127, 0, 0, 1], args.ui_port));
    say(format!("starting the dashboard on http://{ui_addr}"));
    let ui_args = [
        "--listen",
        &ui_addr.to_string(),
        "--gateway",
        &gateway_addr,
        "--control",
        &control_addr,
        "--redis",
        &redis_url,
    ]
    .map(str::to_owned)
    .into_iter()
    .chain(tls_args("ui"))
    .chain(trace_args.iter().cloned())
    .collect::<Vec<_>>();
    mesh.launch(
        ("ui", "dashboard"),
        &bins.join("dlb-ui"),
        &ui_args,
        "answering",
        || http_ok(ui_addr, "/healthz"),
    )
    .await?;
    mesh.state.dashboard = format!("http://{ui_addr}");
    write_state(&mesh.state_path, &mesh.state)?;

    Ok(summary(&Summary {
        elapsed: begun.elapsed(),
        ui_addr,
        gateway_addr: &gateway_addr,
        metrics_port: args.metrics_port,
        control_addr: &control_addr,
        instances: &instances,
        redis_note: &redis_note,
        certs: certs.as_deref(),
    }))
}

/// Refuses to start over a mesh that `dlb up` started and that still runs; forgets a state
/// file whose processes are all gone.
fn no_mesh_running(state_path: &Path) -> Result<(), String> {
    if let Some(previous) = read_state(state_path) {
        if previous.processes.iter().any(alive) {
            return Err(format!(
                "a mesh started by dlb up is already running (dashboard {}); stop it with \
                 `dlb down`",
                if previous.dashboard.is_empty() {
                    "not up yet"
                } else {
                    &previous.dashboard
                }
            ));
        }
        let _ = std::fs::remove_file(state_path);
    }
    Ok(())
}

/// Every fixed port the mesh will listen on, each with the flag that moves it.
fn port_needs(args: &UpArgs) -> Result<Vec<PortNeed>, String> {
    let mut needs = vec![
        PortNeed {
            port: args.gateway_port,
            what: "gateway".into(),
            flag: "--gateway-port",
        },
        PortNeed {
            port: args.control_port,
            what: "control".into(),
            flag: "--control-port",
        },
        PortNeed {
            port: args.metrics_port,
            what: "gateway metrics".into(),
            flag: "--metrics-port",
        },
        PortNeed {
            port: args.ui_port,
            what: "dashboard".into(),
            flag: "--ui-port",
        },
    ];
    if args.first_port != 0 {
        for n in 0..args.instances {
            let port = u16::try_from(usize::from(args.first_port) + n)
                .map_err(|_| "--first-port leaves no room for every instance".to_owned())?;
            needs.push(PortNeed {
                port,
                what: format!("compute instance {}", instance_name(n)),
                flag: "--first-port",
            });
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for need in &needs {
        if need.port != 0 && !seen.insert(need.port) {
            return Err(format!(
                "port {} is given for two services ({})",
                need.port, need.what
            ));
        }
    }
    Ok(needs)
}

/// The event log: the Redis at `--redis` if it answers, else a private `redis-server`, else
/// none. Returns its URL (or `none`) and what to say about it.
async fn event_log(
    args: &UpArgs,
    state_dir: &Path,
    mesh: &mut Launcher<'_>,
) -> Result<(String, String), String> {
    if args.redis.trim().eq_ignore_ascii_case("none") {
        return Ok(("none".to_owned(), "off (--redis none)".to_owned()));
    }
    let why = match redis_answers(&args.redis).await {
        Ok(()) => {
            let note = format!("{} (already running)", dlb::events::redact_url(&args.redis));
            return Ok((args.redis.clone(), note));
        }
        Err(why) => why,
    };
    Ok(match private_redis(args, state_dir, &why, mesh).await? {
        Some(url) => {
            let note = format!("{url} (private redis-server, stopped with the mesh)");
            (url, note)
        }
        None => (
            "none".to_owned(),
            "off: redis-server is not installed (install it with \
             `sudo apt-get install -y redis-server`)"
                .to_owned(),
        ),
    })
}

/// With `--tls`: the certificate directory, made once with a private CA and then reused, each
/// service's files checked before anything starts.
fn certificates(args: &UpArgs, state_dir: &Path) -> Result<Option<PathBuf>, String> {
    if !args.tls {
        return Ok(None);
    }
    let dir = args
        .certs_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("certs"));
    if dir.join("ca.pem").exists() {
        say(format!(
            "mutual TLS with the certificates in {}",
            dir.display()
        ));
    } else {
        dlb::tls::init(&dir, &[]).map_err(|e| format!("--tls: {e}"))?;
        say(format!(
            "mutual TLS: made a private CA and certificates in {}",
            dir.display()
        ));
    }
    for name in dlb::tls::SERVICES {
        dlb::tls::args_for(&dir, name)
            .load()
            .map_err(|e| format!("--tls: {e} (remove {} to make new ones)", dir.display()))?;
        // Servers decide who may call what by the identity a certificate names.
        let path = dir.join(format!("{name}.pem"));
        let expected = dlb::authz::Caller::Spiffe(dlb::authz::spiffe_id(name));
        if dlb::tls::identity_of(&path)? != expected {
            return Err(format!(
                "--tls: {} does not name the identity {expected} (made by a dlb before identities?); \
                 move {} aside to make new certificates, and hand out the new client.pem",
                path.display(),
                dir.display()
            ));
        }
    }
    for role in &args.operators {
        dlb::authz::check_role(role).map_err(|e| format!("--operator {e}"))?;
    }
    Ok(Some(dir))
}

/// What the summary printed once the mesh is up names.
struct Summary<'a> {
    elapsed: Duration,
    ui_addr: SocketAddr,
    gateway_addr: &'a str,
    metrics_port: u16,
    control_addr: &'a str,
    instances: &'a str,
    redis_note: &'a str,
    certs: Option<&'a Path>,
}

/// Where everything is, and commands to try that paste into any shell.
fn summary(up: &Summary<'_>) -> String {
    let Summary {
        gateway_addr,
        control_addr,
        ..
    } = *up;
    let mut summary = String::new();
    let _ = writeln!(summary, "\ndlb is up ({:.1} s):", up.elapsed.as_secs_f64());
    let _ = writeln!(summary, "  dashboard  http://{}", up.ui_addr);
    let _ = writeln!(
        summary,
        "  gateway    {gateway_addr} (gRPC)   metrics http://127.0.0.1:{}/metrics",
        up.metrics_port
    );
    let _ = writeln!(
        summary,
        "  control    {control_addr} (gRPC)   instances {}",
        up.instances
    );
    let _ = writeln!(summary, "  event log  {}", up.redis_note);
    let _ = writeln!(summary, "Try (from any shell):");
    let (dlb, grpcurl) = (this_program(), grpcurl_program());
    match up.certs {
        None => {
            let _ = writeln!(
                summary,
                "  {grpcurl} -plaintext -d '{{\"number\": \"97\"}}' {gateway_addr} dlb.v1.Operations/IsPrime"
            );
            let _ = write!(summary, "  {dlb} call --addr {gateway_addr} fib 90");
        }
        Some(dir) => {
            let d = dir.display();
            let _ = writeln!(
                summary,
                "  mutual TLS on every gRPC hop; certificates in {d}"
            );
            let _ = writeln!(
                summary,
                "  {grpcurl} -cacert {d}/ca.pem -cert {d}/client.pem -key {d}/client.key -d '{{\"number\": \"97\"}}' {gateway_addr} dlb.v1.Operations/IsPrime"
            );
            let _ = write!(
                summary,
                "  {dlb} call --tls-ca {d}/ca.pem --tls-cert {d}/client.pem --tls-key {d}/client.key --addr {gateway_addr} fib 90"
            );
        }
    }
    summary
}

pub(super) fn instance_name(index: usize) -> String {
    let letter = |i: usize| char::from(b'A' + u8::try_from(i % 26).unwrap_or(0));
    if index < 26 {
        letter(index).to_string()
    } else {
        format!("{}{}", letter(index / 26 - 1), letter(index % 26))
    }
}

/// Starts a private `redis-server` (no persistence) on the configured URL's port when it is a
/// loopback URL, else on 6379; `None` when redis-server is not installed.
async fn private_redis(
    args: &UpArgs,
    state_dir: &Path,
    why: &str,
    mesh: &mut Launcher<'_>,
) -> Result<Option<String>, String> {
    let shown = dlb::events::redact_url(&args.redis);
    let Some(program) = find_on_path("redis-server") else {
        say(format!(
            "no Redis at {shown} ({why}) and redis-server is not installed: running WITHOUT \
             the event log. Install it with `sudo apt-get install -y redis-server`"
        ));
        return Ok(None);
    };
    let port = redis::parse_redis_url(&args.redis)
        .filter(|u| matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")))
        .and_then(|u| u.port())
        .unwrap_or(6379);
    check_ports(&[PortNeed {
        port,
        what: "private Redis".into(),
        flag: "--redis redis://127.0.0.1:<PORT>",
    }])?;
    let dir = state_dir.join("redis");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    say(format!(
        "no Redis at {shown} ({why}); starting a private redis-server on 127.0.0.1:{port} \
         (no persistence)"
    ));
    let redis_args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let url = format!("redis://127.0.0.1:{port}");
    mesh.launch(
        ("redis", "redis"),
        &program,
        &redis_args,
        "answering PING",
        || async {
            redis_answers(&url)
                .await
                .map(|()| String::new())
                .map_err(Probe::NotYet)
        },
    )
    .await?;
    Ok(Some(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_names_itself_and_its_flag() {
        let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let error = check_ports(&[PortNeed {
            port,
            what: "gateway".into(),
            flag: "--gateway-port",
        }])
        .unwrap_err();
        assert!(error.contains(&format!("port {port} (gateway)")), "{error}");
        assert!(error.contains("--gateway-port"), "{error}");
    }

    #[test]
    fn instance_names_follow_control() {
        assert_eq!(instance_name(0), "A");
        assert_eq!(instance_name(25), "Z");
        assert_eq!(instance_name(26), "AA");
    }
}
