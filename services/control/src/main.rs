//! `dlb-control`: parse flags, bind, start the instances, serve until SIGTERM or SIGINT, stop
//! every instance, exit 0.

use std::process::ExitCode;

use clap::Parser;
use dlb_control::Config;

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
    if let Err(message) = dlb_control::check_authz(&config) {
        eprintln!("dlb-control: {message}");
        return ExitCode::from(2);
    }
    let listener =
        match dlb::server::bind_listen("dlb-control", config.listen, "DLB_CONTROL_LISTEN").await {
            Ok(listener) => listener,
            Err(code) => return code,
        };
    let addr = listener.local_addr().unwrap_or(config.listen);
    dlb::server::warn_if_exposed("dlb-control", addr, &config.tls);
    println!("dlb-control listening on {addr}");
    match dlb_control::run(listener, config, dlb::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlb-control: {error:#}");
            ExitCode::FAILURE
        }
    }
}
