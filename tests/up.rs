//! `dlb up` as a user runs it: a real subprocess that starts Redis, control with compute
//! processes, the gateway and the dashboard; and the README's grpcurl commands, run against it.
//! Ports are free ones picked by the test, never the fixed defaults.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dlb::testing::{
    eventually_blocking, free_port, process_gone, processes_mentioning, run_grpcurl,
    workspace_binary,
};
use serde_json::Value;

/// The state file `dlb up` writes in its state directory (what `dlb down` reads).
const STATE_FILE: &str = "up.json";

use dlb::testing::PATIENCE;

/// Every port and directory of one `dlb up`.
struct Ports {
    gateway: u16,
    control: u16,
    metrics: u16,
    ui: u16,
    redis: u16,
    state_dir: PathBuf,
}

impl Ports {
    fn new(name: &str) -> Self {
        let state_dir = std::env::temp_dir().join(format!(
            "dlb-up-test-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        Self {
            gateway: free_port(),
            control: free_port(),
            metrics: free_port(),
            ui: free_port(),
            redis: free_port(),
            state_dir,
        }
    }

    fn args(&self) -> Vec<String> {
        [
            "up",
            "--gateway-port",
            &self.gateway.to_string(),
            "--control-port",
            &self.control.to_string(),
            "--metrics-port",
            &self.metrics.to_string(),
            "--ui-port",
            &self.ui.to_string(),
            "--first-port",
            "0",
            // Nothing answers here, so dlb up starts (and later stops) a private redis-server.
            "--redis",
            &format!("redis://127.0.0.1:{}", self.redis),
            "--state-dir",
            &self.state_dir.display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    fn gateway(&self) -> String {
        format!("127.0.0.1:{}", self.gateway)
    }

    fn control(&self) -> String {
        format!("127.0.0.1:{}", self.control)
    }
}

/// `dlb up` running as a child, its output collected in a file.
struct Up {
    child: Child,
    log: PathBuf,
    ports: Ports,
}

impl Up {
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Self {
        let ports = Ports::new(name);
        std::fs::create_dir_all(&ports.state_dir).unwrap();
        let log = ports.state_dir.join("dlb-up.out");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(workspace_binary("dlb"))
            .args(ports.args())
            .args(extra)
            .env_remove("DLB_REDIS_URL")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child, log, ports }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the dashboard's HTTP 200 and the gateway's health SERVING.
    fn wait_up(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("dlb up exited ({status}):\n{}", self.output());
            }
            let dashboard =
                http_get(self.ports.ui, "/").is_some_and(|r| r.starts_with("HTTP/1.1 200"));
            let gateway = dashboard
                && run_grpcurl(&[
                    "-plaintext",
                    &self.ports.gateway(),
                    "grpc.health.v1.Health/Check",
                ])
                .is_ok_and(|out| out.contains("\"SERVING\""));
            if dashboard && gateway {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the mesh did not come up:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every process the mesh consists of: what the state file lists and control's instances.
    fn pids(&self) -> Vec<(String, u32)> {
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(self.ports.state_dir.join(STATE_FILE)).unwrap(),
        )
        .unwrap();
        let mut pids: Vec<(String, u32)> = state["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    u32::try_from(p["pid"].as_u64().unwrap()).unwrap(),
                )
            })
            .collect();
        for instance in instances(&self.ports.control()) {
            pids.push((
                format!("compute {}", instance["id"].as_str().unwrap()),
                u32::try_from(instance["pid"].as_u64().unwrap()).unwrap(),
            ));
        }
        pids
    }

    /// SIGINT, as Ctrl-C sends; waits for the exit status.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dlb up did not stop:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A failed test still stops what it started: dlb up itself stops its children.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.interrupt();
        }
        let _ = std::fs::remove_dir_all(&self.ports.state_dir);
    }
}

/// `GET path` from the mesh's port `port` on loopback, if it answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    dlb::testing::http_get(([127, 0, 0, 1], port).into(), path).ok()
}

fn instances(control: &str) -> Vec<Value> {
    let out = run_grpcurl(&["-plaintext", control, "dlb.v1.Control/ListInstances"]).unwrap();
    let list: Value = serde_json::from_str(&out).unwrap();
    list["instances"].as_array().cloned().unwrap_or_default()
}

#[test]
fn up_runs_the_whole_mesh_and_ctrl_c_leaves_no_process_behind() {
    let mut up = Up::start("sigint");
    up.wait_up();
    let gateway = up.ports.gateway();
    for (data, method, want) in [
        (r#"{"number": "97"}"#, "IsPrime", r#""prime": true"#),
        (
            r#"{"text": "Racecar", "normalize": true}"#,
            "IsPalindrome",
            r#""palindrome": true"#,
        ),
        (
            r#"{"text": "stressed"}"#,
            "Reverse",
            r#""text": "desserts""#,
        ),
        (
            r#"{"n": 90}"#,
            "Fibonacci",
            r#""value": "2880067194370816120""#,
        ),
        (
            r#"{"text": "a b a", "top": 1}"#,
            "WordCount",
            r#""words": "3""#,
        ),
    ] {
        let out = run_grpcurl(&[
            "-plaintext",
            "-d",
            data,
            &gateway,
            &format!("dlb.v1.Operations/{method}"),
        ])
        .unwrap_or_else(|e| panic!("{method}: {e}"));
        assert!(out.contains(want), "{method}: {out}");
    }
    let pids = up.pids();
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "redis",
            "control",
            "gateway",
            "ui",
            "compute A",
            "compute B",
            "compute C"
        ],
        "{pids:?}"
    );
    let output = up.output();
    assert!(output.contains("dlb is up"), "{output}");
    assert!(output.contains(&format!("dashboard  http://127.0.0.1:{}", up.ports.ui)));
    assert!(output.contains("private redis-server"), "{output}");

    let status = up.interrupt();
    assert!(status.success(), "{status}:\n{}", up.output());
    for (name, pid) in &pids {
        assert!(process_gone(*pid), "{name} (pid {pid}) is still running");
    }
    let state_dir = up.ports.state_dir.display().to_string();
    assert_eq!(processes_mentioning(&state_dir), Vec::<String>::new());
    assert_eq!(
        processes_mentioning(&up.ports.control()),
        Vec::<String>::new()
    );
    assert!(!up.ports.state_dir.join(STATE_FILE).exists());
    let output = up.output();
    let order: Vec<usize> = [
        "stopping dashboard",
        "stopping gateway",
        "stopping control",
        "stopping redis",
    ]
    .iter()
    .map(|step| {
        output
            .find(step)
            .unwrap_or_else(|| panic!("no {step:?} in:\n{output}"))
    })
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "stop order:\n{output}"
    );
}

/// Splits a shell command line as the README writes them: words, 'single' and "double" quotes.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let w = word.get_or_insert_with(String::new);
                for inner in chars.by_ref() {
                    if inner == c {
                        break;
                    }
                    w.push(inner);
                }
            }
            c if c.is_whitespace() => words.extend(word.take()),
            '#' if word.is_none() => break,
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// Every command line inside the ```sh blocks of README.md and of docs/*.md (comments and
/// blank lines left out), in order: what a user may paste. A command that a later page shows
/// again (docs/security.md repeats the README's) is run once; one page may run a command twice
/// (start B after a stop, and again after a kill).
fn readme_commands() -> Vec<String> {
    let mut pages = vec![checkout().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(checkout().join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    let mut commands: Vec<String> = Vec::new();
    for page in pages {
        let text = std::fs::read_to_string(page).unwrap();
        let mut in_sh = false;
        let mut on_page = Vec::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with("```") {
                in_sh = trimmed == "```sh";
                continue;
            }
            if in_sh && !trimmed.is_empty() && !trimmed.starts_with('#') {
                on_page.push(trimmed.to_owned());
            }
        }
        on_page.retain(|command| !commands.contains(command));
        commands.extend(on_page);
    }
    commands
}

/// Every `grpcurl` (and `curl`) line inside the README's ```sh blocks.
fn readme_grpcurl_commands() -> Vec<String> {
    readme_commands()
        .into_iter()
        .filter(|c| c.starts_with("grpcurl ") || c.starts_with("curl "))
        .collect()
}

/// The checkout (where README's commands are meant to be pasted).
fn checkout() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `line` as a user pastes it: `bash -c` in the checkout, with `env` added; its output
/// when it exits 0 within a minute.
fn run_shell(line: &str, env: &[(&str, String)]) -> Result<String, String> {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(line)
        .current_dir(checkout())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("still running after 60 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{}: {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The certificate (DER) the TLS server at `addr` presents to a client with the `client`
/// certificate of `certs`.
fn presented_certificate(addr: &str, certs: &Path) -> Vec<u8> {
    let tls = dlb::tls::args_for(certs, "client")
        .load()
        .unwrap()
        .and_then(|tls| tls.client())
        .unwrap();
    let (host, _) = addr.rsplit_once(':').unwrap();
    let (connector, name) = tls.rustls_connector(host).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        let presented = stream.get_ref().1.peer_certificates().unwrap();
        presented[0].as_ref().to_vec()
    })
}

/// The first certificate of a PEM file, as DER.
fn pem_certificate(path: &Path) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}

/// The commands `dlb up` printed under "Try", as printed.
fn printed_commands(output: &str) -> Vec<String> {
    output
        .lines()
        .skip_while(|l| !l.starts_with("Try"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.starts_with("mutual TLS"))
        .collect()
}

#[test]
fn shell_words_split_like_the_shell() {
    assert_eq!(
        shell_words(r#"grpcurl -plaintext -d '{"n": 94}' 127.0.0.1:12000 x   # comment"#),
        [
            "grpcurl",
            "-plaintext",
            "-d",
            r#"{"n": 94}"#,
            "127.0.0.1:12000",
            "x"
        ]
    );
    assert_eq!(shell_words(r#"a "b c"d"#), ["a", "b cd"]);
}

#[test]
fn every_grpcurl_command_in_the_readme_works_against_dlb_up() {
    let commands = readme_grpcurl_commands();
    // Every operation, health and control are documented.
    for needle in [
        "IsPrime",
        "IsPalindrome",
        "Reverse",
        "Fibonacci",
        "WordCount",
        "grpc.health.v1.Health/Check",
        "dlb.v1.Control/ListInstances",
        "dlb.v1.Control/StopInstance",
        "dlb.v1.Gateway/Stats",
    ] {
        assert!(
            commands.iter().any(|c| c.contains(needle)),
            "README has no grpcurl example of {needle}"
        );
    }
    let mut up = Up::start("readme");
    up.wait_up();
    let instance_a = instances(&up.ports.control())
        .into_iter()
        .find(|i| i["id"] == "A")
        .and_then(|i| i["address"].as_str().map(str::to_owned))
        .unwrap();
    for command in &commands {
        if command.contains("-cacert") {
            // Mutual TLS: run against `dlb up --tls` by the test below.
            continue;
        }
        if let Some(url) = command.strip_prefix("curl -s http://127.0.0.1:12002") {
            let response = http_get(up.ports.metrics, url).unwrap();
            assert!(
                response.starts_with("HTTP/1.1 200"),
                "{command}: {response}"
            );
            assert!(response.contains("dlb_gateway"), "{command}: {response}");
            println!("ok: {command}");
            continue;
        }
        assert!(
            command.starts_with("grpcurl "),
            "README: untested command {command}"
        );
        // The README's addresses are the defaults of `dlb up`; this mesh runs on free ports.
        let line = command
            .replace("127.0.0.1:12000", &up.ports.gateway())
            .replace("127.0.0.1:12001", &up.ports.control())
            .replace("127.0.0.1:13001", &instance_a);
        let words = shell_words(&line);
        let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
        let out = run_grpcurl(&args)
            .unwrap_or_else(|e| panic!("{command}\nfailed: {e}\ndlb up said:\n{}", up.output()));
        assert!(!out.trim().is_empty(), "{command}: no output");
        println!("ok: {command}");
    }

    // Every `dlb` and `just` line too, pasted into bash in the checkout as it is written, with
    // this test's dlb binary at target/release/dlb's place and the mesh's ports.
    let instance_b = instances(&up.ports.control())
        .into_iter()
        .find(|i| i["id"] == "B")
        .and_then(|i| i["address"].as_str().map(str::to_owned))
        .unwrap();
    let dlb = workspace_binary("dlb").display().to_string();
    let env = [
        ("DLB_ADDR", up.ports.gateway()),
        ("DLB_CONTROL_ADDR", up.ports.control()),
        // `just call` and `just load` run it instead of building the release binaries.
        ("DLB_BIN", dlb.clone()),
        // `dlb certs init ~/...` writes here.
        (
            "HOME",
            up.ports.state_dir.join("home").display().to_string(),
        ),
    ];
    let mut ran = 0;
    for command in readme_commands() {
        if command.starts_with("grpcurl ") || command.starts_with("curl ") {
            continue; // above
        }
        if command.starts_with("s=$(command -v sudo); ") || command.starts_with("cargo ") {
            continue; // installs and builds: what .ci/run does before this test
        }
        if command.starts_with("target/release/dlb-") {
            // Services on other hosts (the several-machines example).
            assert!(
                command.contains("10.0.0."),
                "README: untested command {command}"
            );
            continue;
        }
        if command.starts_with("target/release/dlb up") {
            continue; // what Up::start runs, on free ports
        }
        if command.starts_with("target/release/dlb certs issue") {
            continue; // needs dlb up --tls's CA: the mutual TLS test runs it
        }
        assert!(
            command.starts_with("target/release/dlb ") || command.starts_with(".venv/bin/just "),
            "README: untested command {command}"
        );
        let line = command
            .replacen("target/release/dlb ", &format!("{dlb} "), 1)
            .replace("127.0.0.1:12000", &up.ports.gateway())
            .replace("127.0.0.1:12001", &up.ports.control())
            .replace("127.0.0.1:13001", &instance_a)
            .replace("127.0.0.1:13002", &instance_b)
            // Shorter loads than the README's.
            .replace(" -d 10", " -d 1 --warmup 0")
            .replace(" -n 100000", " -n 300 --warmup 0");
        let out = run_shell(&line, &env)
            .unwrap_or_else(|e| panic!("{command}\nfailed: {e}\ndlb up said:\n{}", up.output()));
        assert!(!out.trim().is_empty(), "{command}: no output");
        println!("ok: {command}");
        ran += 1;
    }
    assert!(ran >= 12, "README's dlb and just commands: {ran} run");

    // And the commands dlb up printed, as printed.
    let printed = printed_commands(&up.output());
    assert_eq!(printed.len(), 2, "{}", up.output());
    for command in printed {
        let out = run_shell(&command, &[])
            .unwrap_or_else(|e| panic!("{command}\nfailed: {e}\ndlb up said:\n{}", up.output()));
        assert!(!out.trim().is_empty(), "{command}: no output");
        println!("ok: {command}");
    }
    assert!(up.interrupt().success());
}

/// grpcurl with the certificate of a role (`ui`, `client`, ...), and its outcome.
type AsRole<'a> = dyn Fn(&str, &[&str]) -> Result<String, String> + 'a;

/// Under `dlb up --tls --operator operator`, with grpcurl (grpc-go) and Python grpcio as the
/// callers: client.pem calls the gateway but is refused, with PERMISSION_DENIED naming its
/// identity, at control's lifecycle RPCs and straight at an instance; ui.pem and an operator's
/// certificate stop and start an instance; the gateway serves a steady load through it all with
/// no failed call; a certificate from another CA is refused at the handshake; refusals are
/// events on the dashboard.
fn authorization_follows_the_certificate_identity(
    up: &Up,
    certs: &Path,
    instance: &str,
    as_role: &AsRole<'_>,
) {
    let (gateway, control) = (up.ports.gateway(), up.ports.control());
    let tls_flag =
        |flag: &str, file: &str| [flag.to_owned(), certs.join(file).display().to_string()];
    // A steady load through the gateway as client.pem, for the whole of this.
    let load = Command::new(workspace_binary("dlb"))
        .args([
            "bench", "--addr", &gateway, "-c", "4", "-d", "10", "--warmup", "0", "--json", "-q",
        ])
        .args(["--op", "reverse", "--input", "hello"])
        .args(tls_flag("--tls-ca", "ca.pem"))
        .args(tls_flag("--tls-cert", "client.pem"))
        .args(tls_flag("--tls-key", "client.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let denied = |result: Result<String, String>, what: &str| {
        let error = result.expect_err(what);
        assert!(
            error.contains("Code: PermissionDenied")
                && error.contains("spiffe://dlb.local/client may not call"),
            "{what}: {error}"
        );
        error
    };
    // client.pem: served at the gateway, refused at control's lifecycle and at an instance.
    let served = as_role(
        "client",
        &[
            "-d",
            r#"{"text": "hi"}"#,
            &gateway,
            "dlb.v1.Operations/Reverse",
        ],
    );
    assert!(
        served.as_ref().is_ok_and(|out| out.contains("ih")),
        "{served:?}"
    );
    for (method, body) in [
        ("StopInstance", r#"{"id": "B", "force": true}"#),
        ("StartInstance", r#"{"id": "B"}"#),
        ("AddInstance", "{}"),
        ("RemoveInstance", r#"{"id": "B"}"#),
    ] {
        let error = denied(
            as_role(
                "client",
                &["-d", body, &control, &format!("dlb.v1.Control/{method}")],
            ),
            method,
        );
        assert!(
            error.contains(&format!("/dlb.v1.Control/{method}: the policy's rule")),
            "{error}"
        );
        assert!(
            !error.contains("ui") && !error.contains("operator"),
            "the refusal lists who may: {error}"
        );
    }
    let error = denied(
        as_role(
            "client",
            &[
                "-d",
                r#"{"text": "hi"}"#,
                instance,
                "dlb.v1.Operations/Reverse",
            ],
        ),
        "straight at an instance",
    );
    assert!(error.contains("(compute "), "{error}");
    // The same refusals for Python grpcio.
    let plan = serde_json::json!({
        "target": instance,
        "tls": {
            "ca": certs.join("ca.pem"),
            "cert": certs.join("client.pem"),
            "key": certs.join("client.key"),
        },
        "cases": [
            // ReverseRequest { text: "hello" }
            {"name": "instance", "method": "/dlb.v1.Operations/Reverse", "request": "0a0568656c6c6f", "timeout_ms": 5000},
        ],
    });
    let control_plan = serde_json::json!({
        "target": control,
        "tls": plan["tls"],
        "cases": [
            // StopInstanceRequest { id: "B" }
            {"name": "stop", "method": "/dlb.v1.Control/StopInstance", "request": "0a0142", "timeout_ms": 5000},
        ],
    });
    for plan in [plan, control_plan] {
        let mut python = Command::new(checkout().join(".venv/bin/python"))
            .arg(checkout().join("tests/interop/grpc_peer.py"))
            .arg("client")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        python
            .stdin
            .take()
            .unwrap()
            .write_all(plan.to_string().as_bytes())
            .unwrap();
        let out = python.wait_with_output().unwrap();
        let result: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "grpcio printed {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(result["code"], "PERMISSION_DENIED", "{result}");
        assert!(
            result["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("spiffe://dlb.local/client may not call")),
            "{result}"
        );
    }

    // ui.pem (the dashboard's) stops and starts B; so does an operator's certificate.
    for role in ["ui", "alice"] {
        let stopped = as_role(
            role,
            &[
                "-d",
                r#"{"id": "B"}"#,
                &control,
                "dlb.v1.Control/StopInstance",
            ],
        );
        assert!(stopped.is_ok(), "{role} stops B: {stopped:?}");
        let started = as_role(
            role,
            &[
                "-d",
                r#"{"id": "B"}"#,
                &control,
                "dlb.v1.Control/StartInstance",
            ],
        );
        assert!(started.is_ok(), "{role} starts B: {started:?}");
    }

    // A certificate from another CA: refused at the handshake, before any policy.
    let other = up.ports.state_dir.join("other-ca");
    dlb::tls::init(&other, &[]).unwrap();
    let stranger = run_grpcurl(&[
        "-cacert".to_owned(),
        certs.join("ca.pem").display().to_string(),
        "-cert".to_owned(),
        other.join("ui.pem").display().to_string(),
        "-key".to_owned(),
        other.join("ui.key").display().to_string(),
        "-max-time".to_owned(),
        "5".to_owned(),
        control.clone(),
        "dlb.v1.Control/ListInstances".to_owned(),
    ]);
    // grpc-go does not say why a handshake failed; that it never got a connection (where a
    // certificate from the CA gets one within the same -max-time, above) is the point.
    let error = stranger.expect_err("another CA's certificate is refused");
    assert!(
        error.contains("Failed to dial target host") && !error.contains("PermissionDenied"),
        "{error}"
    );

    // The gateway served the load throughout: no failed call.
    let out = load.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dlb bench printed {:?} / {:?}: {e}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(report["ok"].as_u64().unwrap_or(0) > 100, "{report}");
    assert_eq!(report["ok"], report["requests"], "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");

    // Refusals are events: the dashboard shows them (one more, since the load's calls have
    // pushed the earlier ones out of the log's latest 1,000).
    denied(
        as_role(
            "client",
            &[
                "-d",
                r#"{"id": "B"}"#,
                &control,
                "dlb.v1.Control/StopInstance",
            ],
        ),
        "after the load",
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let events = http_get(up.ports.ui, "/api/events?kind=error&limit=100").unwrap_or_default();
        if events.contains("permission denied") && events.contains("spiffe://dlb.local/client") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal among the events: {}",
            &events[events.len().saturating_sub(3000)..]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_readme_mutual_tls_commands_work_against_dlb_up_tls_and_strangers_are_refused() {
    let commands: Vec<String> = readme_grpcurl_commands()
        .into_iter()
        .filter(|c| c.contains("-cacert"))
        .collect();
    assert!(
        commands.iter().any(|c| c.contains("dlb.v1.Operations/")),
        "README has a grpcurl call with mutual TLS"
    );
    let mut up = Up::start_with("tls", &["--tls", "--operator", "operator"]);
    let deadline = Instant::now() + PATIENCE;
    while !up.output().contains("dlb is up") {
        if let Ok(Some(status)) = up.child.try_wait() {
            panic!("dlb up --tls exited ({status}):\n{}", up.output());
        }
        assert!(Instant::now() < deadline, "not up:\n{}", up.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    let certs = up.ports.state_dir.join("certs");
    assert!(up.output().contains("mutual TLS"), "{}", up.output());
    // A person's certificate with the role `dlb up --operator` named, as docs/security.md
    // makes it (beside dlb up's CA).
    let issue = readme_commands()
        .into_iter()
        .find(|c| c.starts_with("target/release/dlb certs issue alice"))
        .expect("docs/security.md issues alice's certificate");
    let issued = run_shell(
        &issue.replacen(
            "target/release/dlb ",
            &format!("{} ", workspace_binary("dlb").display()),
            1,
        ),
        &[("DLB_STATE_DIR", up.ports.state_dir.display().to_string())],
    )
    .unwrap_or_else(|e| panic!("{issue}: {e}"));
    assert!(issued.contains("spiffe://dlb.local/operator"), "{issued}");
    assert!(certs.join("alice.pem").exists(), "{issued}");
    for command in &commands {
        let line = command
            .replace("~/.local/state/dlb/certs", &certs.display().to_string())
            .replace("127.0.0.1:12000", &up.ports.gateway())
            .replace("127.0.0.1:12001", &up.ports.control());
        let words = shell_words(&line);
        let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
        let out = run_grpcurl(&args)
            .unwrap_or_else(|e| panic!("{command}\nfailed: {e}\ndlb up said:\n{}", up.output()));
        assert!(!out.trim().is_empty(), "{command}: no output");
        println!("ok: {command}");
    }
    // The commands dlb up --tls printed, as printed.
    let printed = printed_commands(&up.output());
    assert_eq!(printed.len(), 2, "{}", up.output());
    for command in printed {
        assert!(command.contains("client.pem"), "{command}");
        let out = run_shell(&command, &[])
            .unwrap_or_else(|e| panic!("{command}\nfailed: {e}\ndlb up said:\n{}", up.output()));
        assert!(!out.trim().is_empty(), "{command}: no output");
        println!("ok: {command}");
    }
    let as_role = |role: &str, args: &[&str]| -> Result<String, String> {
        let flags = [
            ("-cacert", "ca.pem".to_owned()),
            ("-cert", format!("{role}.pem")),
            ("-key", format!("{role}.key")),
        ];
        let mut all: Vec<String> = flags
            .iter()
            .flat_map(|(flag, file)| [(*flag).to_owned(), certs.join(file).display().to_string()])
            .collect();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        run_grpcurl(&all)
    };
    let list: Value = serde_json::from_str(
        &as_role("ui", &[&up.ports.control(), "dlb.v1.Control/ListInstances"]).unwrap(),
    )
    .unwrap();
    let instance = list["instances"][0]["address"].as_str().unwrap().to_owned();
    authorization_follows_the_certificate_identity(&up, &certs, &instance, &as_role);
    // Each service presents its own certificate: the gateway gateway.pem, control
    // control.pem, and the instances control starts compute.pem.
    for (addr, own) in [
        (up.ports.gateway(), "gateway.pem"),
        (up.ports.control(), "control.pem"),
        (instance, "compute.pem"),
    ] {
        assert!(
            presented_certificate(&addr, &certs) == pem_certificate(&certs.join(own)),
            "{addr} does not present {own}"
        );
    }
    // The gateway says it follows control over https.
    assert!(
        up.output().contains("following control addr=https://"),
        "{}",
        up.output()
    );
    // `dlb call` refused for want of a client certificate: the error (with its latency) on one
    // line, the hint on the next.
    let refused = Command::new(workspace_binary("dlb"))
        .args(["call", "--addr", &up.ports.gateway(), "--tls-ca"])
        .arg(certs.join("ca.pem"))
        .args(["fib", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!refused.status.success(), "{stderr}");
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with("error: UNAVAILABLE: ") && lines[0].ends_with(" ms)"),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("hint: ") && lines[1].contains("client certificate"),
        "{stderr}"
    );
    // The dashboard reaches control and the gateway over mutual TLS.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let snapshot = http_get(up.ports.ui, "/api/snapshot").unwrap_or_default();
        // Lifecycle state from control, health from the gateway.
        if snapshot.contains("\"state\":\"serving\"") && snapshot.contains("\"health\":\"serving\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard without data: {snapshot}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same services refuse plaintext, and TLS without a client certificate.
    let ca = certs.join("ca.pem").display().to_string();
    for addr in [up.ports.gateway(), up.ports.control()] {
        let plaintext = run_grpcurl(&[
            "-plaintext",
            "-max-time",
            "5",
            &addr,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(
            plaintext.is_err(),
            "{addr} answered in plaintext: {plaintext:?}"
        );
        let anonymous = run_grpcurl(&[
            "-cacert",
            &ca,
            "-max-time",
            "5",
            &addr,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(
            anonymous.is_err(),
            "{addr} answered without a client certificate: {anonymous:?}"
        );
    }
    assert!(up.interrupt().success());
}

#[test]
fn a_taken_gateway_port_is_named_with_its_flag_and_nothing_starts() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let ports = Ports::new("conflict");
    let mut args = ports.args();
    let at = args.iter().position(|a| a == "--gateway-port").unwrap();
    args[at + 1] = port.to_string();
    let stderr = up_refused(&ports, &args);
    assert!(
        stderr.contains(&format!("port {port} (gateway) is not available")),
        "{stderr}"
    );
    assert!(stderr.contains("--gateway-port"), "{stderr}");
    assert_eq!(
        processes_mentioning(&format!("127.0.0.1:{}", ports.control)),
        Vec::<String>::new()
    );
    let _ = std::fs::remove_dir_all(&ports.state_dir);
    drop(taken);
}

/// Runs `dlb up` with `args` (of `ports`), asserts that it fails having started nothing (no
/// "starting" line, no process of its state directory, no state file), and gives its stderr.
fn up_refused(ports: &Ports, args: &[String]) -> String {
    let output = Command::new(workspace_binary("dlb"))
        .args(args)
        .env_remove("DLB_REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    assert!(!stderr.contains("starting"), "nothing may start:\n{stderr}");
    let state_dir = ports.state_dir.display().to_string();
    assert_eq!(processes_mentioning(&state_dir), Vec::<String>::new());
    assert!(!ports.state_dir.join(STATE_FILE).exists());
    stderr
}

#[test]
fn a_bad_tracing_setting_is_named_and_nothing_starts() {
    let ports = Ports::new("badtrace");
    let mut args = ports.args();
    args.extend([
        "--otlp-endpoint".to_owned(),
        "ftp://127.0.0.1:4317".to_owned(),
    ]);
    let stderr = up_refused(&ports, &args);
    assert!(stderr.contains("ftp://127.0.0.1:4317"), "{stderr}");
    let _ = std::fs::remove_dir_all(&ports.state_dir);
}

/// Runs `dlb down --state-dir dir`.
fn dlb_down(dir: &Path) -> Output {
    Command::new(workspace_binary("dlb"))
        .args(["down", "--state-dir", &dir.display().to_string()])
        .output()
        .unwrap()
}

/// Runs `dlb down` on drop, so a failed detach test leaves nothing running.
struct DownOnDrop(PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        // Not `dlb_down`: a panic here, while a failed test unwinds, would abort.
        let _ = Command::new(workspace_binary("dlb"))
            .args(["down", "--state-dir", &self.0.display().to_string()])
            .output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn detach_leaves_the_mesh_running_and_down_stops_all_of_it() {
    let ports = Ports::new("detach");
    let _guard = DownOnDrop(ports.state_dir.clone());
    let mut args = ports.args();
    args.push("--detach".to_owned());
    let output = Command::new(workspace_binary("dlb"))
        .args(&args)
        .env_remove("DLB_REDIS_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("running in the background"), "{stderr}");
    // It names the `dlb down` that finds this mesh (its own state directory).
    let down_command = format!("`dlb down --state-dir {}` stops", ports.state_dir.display());
    assert!(stderr.contains(&down_command), "{stderr}");
    // It returned, and the mesh serves.
    let out = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"text": "detached"}"#,
        &ports.gateway(),
        "dlb.v1.Operations/Reverse",
    ])
    .unwrap();
    assert!(out.contains("dehcated"), "{out}");
    assert!(http_get(ports.ui, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    let logs = ["redis.log", "control.log", "gateway.log", "ui.log"];
    for log in logs {
        assert!(ports.state_dir.join(log).exists(), "{log}");
    }
    // A second `dlb up` on the same state refuses to start another mesh.
    let again = Command::new(workspace_binary("dlb"))
        .args(ports.args())
        .env_remove("DLB_REDIS_URL")
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let computes: Vec<u32> = instances(&ports.control())
        .iter()
        .map(|i| u32::try_from(i["pid"].as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(computes.len(), 3);
    let down = dlb_down(&ports.state_dir);
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "{stderr}");
    assert!(stderr.contains("everything stopped"), "{stderr}");
    for pid in computes {
        assert!(process_gone(pid), "compute pid {pid} is still running");
    }
    assert_eq!(
        processes_mentioning(&ports.state_dir.display().to_string()),
        Vec::<String>::new()
    );
    assert_eq!(processes_mentioning(&ports.control()), Vec::<String>::new());
    // Nothing left to stop is not an error.
    let down = dlb_down(&ports.state_dir);
    assert!(down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("nothing to stop"));
}

fn state_pids(state_dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(state_dir.join(STATE_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .map(|state| {
            state["processes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| u32::try_from(p["pid"].as_u64()?).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ctrl_c_while_starting_stops_what_has_started() {
    // The real binaries, except a gateway that never becomes healthy: `dlb up` is still
    // starting when the signal comes.
    let bin_dir = std::env::temp_dir().join(format!("dlb-up-test-bins-{}", std::process::id()));
    std::fs::create_dir_all(&bin_dir).unwrap();
    for name in ["dlb-compute", "dlb-control", "dlb-ui"] {
        let _ = std::fs::remove_file(bin_dir.join(name));
        std::os::unix::fs::symlink(workspace_binary(name), bin_dir.join(name)).unwrap();
    }
    let gateway = bin_dir.join("dlb-gateway");
    std::fs::write(&gateway, "#!/bin/sh\nexec sleep 120\n").unwrap();
    let mut permissions = std::fs::metadata(&gateway).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&gateway, permissions).unwrap();

    let bin_flag = bin_dir.display().to_string();
    let mut up = Up::start_with("early-sigint", &["--bin-dir", &bin_flag]);
    // Redis, control and the stand-in gateway run; dlb up waits for the gateway's health.
    let mut pids = eventually_blocking("three processes recorded", || {
        let pids = state_pids(&up.ports.state_dir);
        (pids.len() == 3).then_some(pids)
    });
    assert!(up.output().contains("starting the gateway"));
    for instance in instances(&up.ports.control()) {
        pids.push(u32::try_from(instance["pid"].as_u64().unwrap()).unwrap());
    }
    assert_eq!(pids.len(), 6, "redis, control, gateway and three computes");
    let status = up.interrupt();
    assert!(!status.success(), "an interrupted start is a failure");
    let output = up.output();
    assert!(output.contains("interrupted while starting"), "{output}");
    for pid in pids {
        assert!(process_gone(pid), "pid {pid} is still running:\n{output}");
    }
    assert_eq!(
        processes_mentioning(&up.ports.state_dir.display().to_string()),
        Vec::<String>::new()
    );
    assert_eq!(
        processes_mentioning(&up.ports.control()),
        Vec::<String>::new()
    );
    let _ = std::fs::remove_dir_all(&bin_dir);
}

#[test]
fn a_service_that_dies_stops_the_rest_and_up_fails() {
    let mut up = Up::start("dies");
    up.wait_up();
    let pids = up.pids();
    let gateway = pids.iter().find(|(name, _)| name == "gateway").unwrap().1;
    let killed = Command::new("kill")
        .args(["-KILL", &gateway.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = eventually_blocking("dlb up to exit", || up.child.try_wait().unwrap());
    assert!(!status.success());
    let output = up.output();
    assert!(
        output.contains("gateway (signal: 9") && output.contains("exited unexpectedly"),
        "{output}"
    );
    for (name, pid) in &pids {
        assert!(process_gone(*pid), "{name} (pid {pid}) is still running");
    }
}
