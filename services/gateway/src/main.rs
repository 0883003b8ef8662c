//! `dlb-gateway`: parse flags, bind, serve until SIGTERM or SIGINT, drain, exit 0.

use std::process::ExitCode;

use clap::Parser;
use dlb_gateway::Config;
use tokio::net::TcpListener;

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        eprintln!("dlb-gateway: {message}");
        return ExitCode::from(2);
    }
    // One current-thread runtime per thread (see `dlb_gateway::runtimes`): this one, and
    // the others started here.
    let workers = match dlb_gateway::runtimes::Workers::start(config.worker_threads() - 1) {
        Ok(workers) => workers,
        Err(error) => {
            eprintln!("dlb-gateway: cannot start the runtimes: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve(config, workers.handles())),
        Err(error) => {
            eprintln!("dlb-gateway: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, runtimes: Vec<tokio::runtime::Handle>) -> ExitCode {
    dlb::telemetry::init();
    if let Err(message) = dlb_gateway::check_authz(&config) {
        eprintln!("dlb-gateway: {message}");
        return ExitCode::from(2);
    }
    let listener =
        match dlb::server::bind_listen("dlb-gateway", config.listen, "DLB_GATEWAY_LISTEN").await {
            Ok(listener) => listener,
            Err(code) => return code,
        };
    let metrics = match config.metrics_addr() {
        Ok(Some(addr)) => match TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(error) => {
                eprintln!(
                    "dlb-gateway: cannot listen on {addr} for /metrics: {error} (choose another with --metrics-listen, or \"none\")"
                );
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    if config.backends.is_empty() && config.control.is_none() {
        eprintln!(
            "dlb-gateway: warning: no --backend or --control given; every call will get UNAVAILABLE"
        );
    }
    let addr = listener.local_addr().unwrap_or(config.listen);
    dlb::server::warn_if_exposed("dlb-gateway", addr, &config.tls);
    println!("dlb-gateway listening on {addr}");
    let membership = config.membership();
    match dlb_gateway::run_spread(
        listener,
        metrics,
        config,
        membership,
        dlb::server::shutdown_signal(),
        runtimes,
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlb-gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}
