//! `dlb-ui`: parse flags, bind, serve the dashboard until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use dlb_ui::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        eprintln!("dlb-ui: {message}");
        return ExitCode::from(2);
    }
    dlb::telemetry::init();
    let listener = match dlb::server::bind_listen("dlb-ui", config.listen, "DLB_UI_LISTEN").await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let addr = listener.local_addr().unwrap_or(config.listen);
    println!("dlb-ui listening on http://{addr}");
    match dlb_ui::run(listener, config, dlb::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlb-ui: {error:#}");
            ExitCode::FAILURE
        }
    }
}
