//! `dlb certs`: a certificate authority and a certificate per service for mutual TLS.

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Make a private CA and a certificate for each service (gateway, compute, control, ui,
    /// client) in DIR, valid for localhost, 127.0.0.1 and ::1 (and each --host), for mutual TLS.
    Init {
        /// Where to write them (created if missing; existing files are never overwritten).
        dir: std::path::PathBuf,
        /// Another name or address the certificates are valid for (repeat for several).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

/// Runs `dlb certs ...`.
pub fn run(args: CertsArgs) -> Result<ExitCode, String> {
    match args.command {
        CertsCommand::Init { dir, hosts } => {
            let files = dlb::tls::init(&dir, &hosts)?;
            println!("wrote {} files to {}:", files.len(), dir.display());
            for file in &files {
                println!("  {}", file.display());
            }
            let d = dir.display();
            println!(
                "\nmutual TLS, for example:\n  dlb-compute --tls-cert {d}/compute.pem --tls-key {d}/compute.key --tls-ca {d}/ca.pem\n  dlb-gateway --tls-cert {d}/gateway.pem --tls-key {d}/gateway.key --tls-ca {d}/ca.pem --backend A=127.0.0.1:13001\n  dlb call --tls-cert {d}/client.pem --tls-key {d}/client.key --tls-ca {d}/ca.pem reverse hello\nKeep ca.key private: whoever has it can mint certificates every service trusts."
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
