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
    /// Make one more client certificate, NAME.pem and NAME.key, from the CA in --dir, naming
    /// the identity spiffe://dlb.local/ROLE: for example one per person or per team, given
    /// rights with the servers' --allow (or `dlb up --operator ROLE`).
    Issue {
        /// The file name (and the certificate's common name, "dlb NAME").
        name: String,
        /// The role the certificate names (default: NAME).
        #[arg(long)]
        role: Option<String>,
        /// Where the CA is (ca.pem and ca.key, as `dlb certs init` wrote them) and the new
        /// files go (default: the certificates of `dlb up --tls`, in its state directory).
        #[arg(long, env = "DLB_CERTS_DIR")]
        dir: Option<std::path::PathBuf>,
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
        CertsCommand::Issue { name, role, dir } => {
            let dir = dir.unwrap_or_else(|| {
                std::env::var_os("DLB_STATE_DIR")
                    .map_or_else(crate::up::default_state_dir, std::path::PathBuf::from)
                    .join("certs")
            });
            let role = role.unwrap_or_else(|| name.clone());
            let files = dlb::tls::issue(&dir, &name, &role)?;
            if dlb::tls::SERVICES.contains(&role.as_str()) && role != "client" {
                eprintln!(
                    "note: role {role} is the {role} service's own: this certificate may call whatever {role} may (the built-in policies trust it)"
                );
            }
            let id = dlb::authz::spiffe_id(&role);
            println!("wrote {} with the identity {id}:", dir.display());
            for file in &files {
                println!("  {}", file.display());
            }
            let d = dir.display();
            println!(
                "\nit may call what the servers' policies allow {id} (or role {role}); to let it start and stop instances:\n  dlb-control --allow '/dlb.v1.Control/*={role}' ...   (or: dlb up --tls --operator {role})\nthen, for example:\n  grpcurl -cacert {d}/ca.pem -cert {d}/{name}.pem -key {d}/{name}.key -d '{{\"id\": \"B\"}}' 127.0.0.1:12001 dlb.v1.Control/StopInstance"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
