//! `dlb-compute`: parse flags, bind, serve until SIGTERM or SIGINT, drain, exit 0.

use std::process::ExitCode;

use clap::Parser;
use dlb_compute::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        eprintln!("dlb-compute: {message}");
        return ExitCode::from(2);
    }
    dlb::telemetry::init();
    if let Err(message) = dlb_compute::check_authz(&config) {
        eprintln!("dlb-compute: {message}");
        return ExitCode::from(2);
    }
    let listener =
        match dlb::server::bind_listen("dlb-compute", config.listen, "DLB_COMPUTE_LISTEN").await {
            Ok(listener) => listener,
            Err(code) => return code,
        };
    let addr = listener.local_addr().unwrap_or(config.listen);
    dlb::server::warn_if_exposed("dlb-compute", addr, &config.tls);
    // One machine-readable line on stdout, so a parent that asked for port 0 learns the port.
    println!("dlb-compute {} listening on {addr}", config.id);
    tracing::info!(instance = %config.id, %addr, "listening");
    let exit_with_parent = config.exit_with_parent;
    let shutdown = async move {
        if exit_with_parent {
            tokio::select! {
                () = dlb::server::shutdown_signal() => {}
                () = parent_gone() => tracing::warn!("parent process gone; stopping"),
            }
        } else {
            dlb::server::shutdown_signal().await;
        }
    };
    match dlb_compute::run(listener, config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlb-compute: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves once this process has been re-parented: its parent (dlb-control) exited, however
/// it exited. Polled, because the kernel's parent-death signal needs unsafe code to set up.
async fn parent_gone() {
    let parent = std::os::unix::process::parent_id();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tick.tick().await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}
