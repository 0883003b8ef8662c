//! The processes of the suite and the proxies' configurations.

use super::*;
use crate::process::is_root;

/// Processes started by the suite; all are stopped (SIGTERM, then SIGKILL) when it ends. Each
/// one's stderr goes to a file of its own (a pipe nobody reads would stop a process that logs
/// much once its buffer is full), read when it exits early and removed at the end.
#[derive(Default)]
pub(super) struct Children {
    children: Vec<(String, Child, PathBuf)>,
}

impl Children {
    pub(super) fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> Result<u32, String> {
        self.spawn_with_env(name, program, args, &[])
    }

    /// [`Children::spawn`] with `env` set. No `OTEL_*` variable of the suite's own environment
    /// reaches a child: a collector set for everyday use must not make the measured proxies
    /// trace.
    pub(super) fn spawn_with_env(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<u32, String> {
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().copied());
        let log = std::env::temp_dir().join(format!(
            "dlb-bench-suite-{}-{}.stderr",
            std::process::id(),
            self.children.len()
        ));
        let stderr = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = command
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().unwrap_or(0);
        self.children.push((name.to_owned(), child, log));
        Ok(pid)
    }

    /// The end of `name`'s stderr if it has exited (for error messages).
    pub(super) async fn exited(&mut self, name: &str) -> Option<String> {
        let (_, child, log) = self.children.iter_mut().find(|(n, _, _)| n == name)?;
        let status = child.try_wait().ok()??;
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let text = text.trim();
        // The last lines say why.
        let start = text.char_indices().rev().nth(2000).map_or(0, |(at, _)| at);
        Some(format!("{name} exited ({status}): {}", &text[start..]))
    }

    pub(super) async fn stop_all(&mut self) {
        for (_, child, log) in self.children.iter_mut().rev() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            let _ = std::fs::remove_file(log);
        }
        self.children.clear();
    }
}

/// Waits until `addr` answers a Reverse call (the proxies have no health service).
pub(super) async fn wait_answers(
    children: &mut Children,
    name: &str,
    addr: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    loop {
        if let Some(exit) = children.exited(name).await {
            return Err(exit);
        }
        if let Ok(endpoint) = dlb::dial::endpoint(addr)
            && let Ok(channel) = endpoint.connect().await
        {
            let mut client = dlb::proto::v1::operations_client::OperationsClient::new(channel);
            let outcome = dlb::client::call(
                &mut client,
                &Op::Reverse {
                    text: "ready?".into(),
                },
                Some(Duration::from_secs(2)),
            )
            .await;
            match outcome.error {
                None => return Ok(()),
                Some(error) => last = format!("{}: {}", error.code, error.message),
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{name} at {addr} does not answer: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// HTTP/2 streams each proxy lets one caller connection have open at once (the gateway's
/// `--max-concurrent-streams` default; NGINX's default is 128 too, HAProxy's 100), so that all
/// three make a caller's excess wait in its client alike.
pub(super) const STREAMS: u32 = 128;

/// NGINX with `grpc_pass` over an upstream of the instances, keepalive on.
pub(super) fn nginx_config(dir: &Path, port: u16, backends: &[String], workers: usize) -> String {
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b};\n"))
        .collect();
    let d = dir.display();
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "# Generated by dlb bench-suite.\n{user}worker_processes {workers};\n\
         daemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{\n  worker_connections 4096;\n}}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           client_max_body_size 16m;\n  http2_max_concurrent_streams {STREAMS};\n\
           keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
           upstream computes {{\n{servers}    keepalive 64;\n    keepalive_requests 1000000;\n  }}\n\
           server {{\n    listen 127.0.0.1:{port} http2;\n\
               location / {{\n      grpc_pass grpc://computes;\n      grpc_buffer_size 1m;\n    }}\n  }}\n}}\n"
    )
}

/// HAProxy in HTTP mode, HTTP/2 on both sides, round robin.
pub(super) fn haproxy_config(port: u16, backends: &[String], threads: usize) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(n, b)| format!("  server s{n} {b} proto h2\n"))
        .collect();
    format!(
        "# Generated by dlb bench-suite.\nglobal\n  nbthread {threads}\n  maxconn 4000\n\
         \x20 tune.h2.max-concurrent-streams {STREAMS}\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend grpc\n  bind 127.0.0.1:{port} proto h2\n  default_backend computes\n\
         backend computes\n  balance roundrobin\n{servers}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn configs_name_every_backend() {
        let backends = vec!["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()];
        let nginx = nginx_config(Path::new("/tmp/x"), 9, &backends, 2);
        assert!(nginx.contains("server 127.0.0.1:2;"));
        assert!(nginx.contains("grpc_pass grpc://computes;"));
        assert!(nginx.contains("worker_processes 2;"));
        let haproxy = haproxy_config(9, &backends, 2);
        assert!(haproxy.contains("server s1 127.0.0.1:2 proto h2"));
        assert!(haproxy.contains("balance roundrobin"));
        assert!(haproxy.contains("nbthread 2"));
        // The same bound on a caller connection's open streams as the gateway's.
        assert!(nginx.contains("http2_max_concurrent_streams 128;"));
        assert!(haproxy.contains("\n  tune.h2.max-concurrent-streams 128\n"));
    }
}
