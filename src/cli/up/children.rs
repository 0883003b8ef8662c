//! The services `dlb up` starts: spawned in their own process group, their output labelled or
//! logged, and probed until ready.

use super::*;

// === children ===

/// A service `dlb up` started and watches.
pub(super) struct Service {
    pub(super) name: &'static str,
    pub(super) label: &'static str,
    pub(super) child: Child,
    pub(super) started: Started,
}

impl Service {
    /// Spawns `program args` in its own process group, its output either printed with a
    /// `label |` prefix (foreground) or appended to `<log_dir>/<name>.log` (detached).
    pub(super) fn spawn(
        name: &'static str,
        label: &'static str,
        program: &Path,
        args: &[String],
        log_dir: Option<&Path>,
    ) -> Result<Self, String> {
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null()).process_group(0);
        // TLS and health ports come as flags (with --tls), never from this shell.
        for name in dlb::tls::PRIVATE_ENV {
            command.env_remove(name);
        }
        let log = match log_dir {
            Some(dir) => {
                let path = dir.join(format!("{name}.log"));
                let file = std::fs::File::create(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                let copy = file
                    .try_clone()
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                command.stdout(copy).stderr(file);
                Some(path)
            }
            None => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
                None
            }
        };
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        if log.is_none() {
            for stream in [
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ]
            .into_iter()
            .flatten()
            {
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stream).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        eprintln!("{label:>9} | {line}");
                    }
                });
            }
        }
        Ok(Self {
            name,
            label,
            child,
            started: Started {
                name: name.to_owned(),
                pid,
                start_ticks: start_ticks(pid).unwrap_or(0),
            },
        })
    }

    /// The exit status if it has exited.
    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `patience`.
    pub(super) async fn stop(&mut self, patience: Duration) {
        if self.exited().is_some() {
            return;
        }
        let begun = Instant::now();
        say(format!("stopping {}", self.label));
        signal(self.started.pid, nix::sys::signal::Signal::SIGTERM);
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(_) => say(format!(
                "{} stopped ({:.1} s)",
                self.label,
                begun.elapsed().as_secs_f64()
            )),
            Err(_) => {
                let _ = self.child.kill().await;
                say(format!(
                    "{} did not stop within {} s; killed",
                    self.label,
                    patience.as_secs()
                ));
            }
        }
    }
}

/// Why a service is not ready.
pub(super) enum Probe {
    /// Not yet: keep waiting.
    NotYet(String),
    /// It will not become ready (an instance crashed): stop waiting.
    Failed(String),
}

/// Polls `check` until it says ready, the child exits, the check fails for good, or the time
/// is up.
pub(super) async fn wait_ready<F, Fut>(
    service: &mut Service,
    what: &str,
    mut check: F,
) -> Result<String, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, Probe>>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = String::from("no answer yet");
    loop {
        if let Some(status) = service.exited() {
            return Err(format!(
                "{} exited while starting ({status}): {last}",
                service.label
            ));
        }
        match check().await {
            Ok(detail) => return Ok(detail),
            Err(Probe::NotYet(why)) => last = why,
            Err(Probe::Failed(why)) => {
                return Err(format!("{} cannot start: {why}", service.label));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} was not {what} within {} s: {last}",
                service.label,
                START_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn redis_answers(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| format!("--redis {url:?}: {e}"))?;
    let ping = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(dlb::status::error_chain(&e)),
        Err(_) => Err("no answer within 1 s".to_owned()),
    }
}

pub(super) async fn connect(
    addr: &str,
    tls: Option<&dlb::tls::ClientTls>,
) -> Result<tonic::transport::Channel, Probe> {
    dlb::dial::endpoint_tls(addr, tls)
        .map_err(|e| Probe::Failed(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Probe::NotYet(dlb::status::error_chain(&e)))
}

pub(super) async fn grpc_serving(
    addr: &str,
    tls: Option<&dlb::tls::ClientTls>,
) -> Result<String, Probe> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(1));
    let status = HealthClient::new(connect(addr, tls).await?)
        .check(request)
        .await
        .map_err(|s| Probe::NotYet(dlb::client::status_message(&s)))?
        .into_inner()
        .status();
    if status == ServingStatus::Serving {
        Ok(String::new())
    } else {
        Err(Probe::NotYet(format!(
            "health says {}",
            status.as_str_name()
        )))
    }
}

/// Ready when every instance is SERVING; fails at once when one crashed.
pub(super) async fn instances_serving(
    addr: &str,
    count: usize,
    tls: Option<&dlb::tls::ClientTls>,
) -> Result<String, Probe> {
    let list = ControlClient::new(connect(addr, tls).await?)
        .list_instances(ListInstancesRequest {})
        .await
        .map_err(|s| {
            // Refused by control's policy: waiting will not change that.
            if s.code() == tonic::Code::PermissionDenied {
                Probe::Failed(dlb::client::status_message(&s))
            } else {
                Probe::NotYet(dlb::client::status_message(&s))
            }
        })?
        .into_inner();
    let describe = |i: &dlb::proto::v1::Instance| {
        let mut s = format!("{} {}", i.id, i.state().as_str_name().to_ascii_lowercase());
        if !i.last_error.is_empty() {
            let _ = write!(s, " ({})", i.last_error);
        }
        s
    };
    let serving: Vec<String> = list
        .instances
        .iter()
        .filter(|i| i.state() == InstanceState::Serving)
        .map(|i| format!("{} {}", i.id, i.address))
        .collect();
    if serving.len() >= count {
        return Ok(serving.join(", "));
    }
    if let Some(crashed) = list
        .instances
        .iter()
        .find(|i| i.state() == InstanceState::Crashed)
    {
        return Err(Probe::Failed(describe(crashed)));
    }
    Err(Probe::NotYet(
        list.instances
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

pub(super) async fn http_ok(addr: SocketAddr, path: &str) -> Result<String, Probe> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(1), exchange).await {
        Ok(Ok(head)) if head.starts_with("HTTP/1.1 200") => Ok(String::new()),
        Ok(Ok(head)) => Err(Probe::NotYet(format!(
            "answered {:?}",
            head.lines().next().unwrap_or("")
        ))),
        Ok(Err(e)) => Err(Probe::NotYet(e.to_string())),
        Err(_) => Err(Probe::NotYet("no answer within 1 s".to_owned())),
    }
}
