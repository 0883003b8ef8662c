//! `dlb-control`: parse flags, bind, start the instances, serve until SIGTERM or SIGINT, stop
//! every instance, exit 0.

use std::process::ExitCode;

use clap::Parser;
use dlb_control::Config;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        eprintln!("dlb-control: {message}");
        return ExitCode::from(2);
    }
    dlb::telemetry::init();
    let bin = config.compute_bin();
    if !bin.exists() {
        eprintln!(
            "dlb-control: warning: {} does not exist; build it (cargo build --release) or set --compute-bin",
            bin.display()
        );
    }
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "dlb-control: cannot listen on {}: {error} (choose another with --listen or DLB_CONTROL_LISTEN)",
                config.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(config.listen);
    println!("dlb-control listening on {addr}");
    match dlb_control::run(listener, config, dlb::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlb-control: {error:#}");
            ExitCode::FAILURE
        }
    }
}
