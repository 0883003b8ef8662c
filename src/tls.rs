//! TLS and mutual TLS for every gRPC hop (rustls, through tonic).
//!
//! Every service takes the same three flags ([`TlsArgs`]): `--tls-cert` and `--tls-key` (the
//! certificate this process presents, as a server and as a client), and `--tls-ca` (the CA it
//! trusts). A server with a certificate serves TLS only; with a CA as well it requires every
//! client to present a certificate signed by that CA (mTLS). A client with a CA verifies the
//! server's certificate against it, including the name it dialled (an address or a host name),
//! and presents its own certificate when it has one. [`init`] (`dlb certs init DIR`) makes a
//! private CA and one certificate per service, usable both ways.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// TLS flags shared by every binary.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) this process presents, as a server and to the servers it calls.
    /// With --tls-key, its gRPC server speaks TLS only.
    #[arg(long, env = "DLB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DLB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: servers require client certificates signed by it (mutual TLS), and
    /// clients verify servers against it.
    #[arg(long, env = "DLB_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name to check the servers' certificates against, instead of the host dialled (for
    /// addresses no certificate can name, such as pod IPs found by DNS discovery).
    #[arg(long, env = "DLB_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// Environment variables a parent must not hand down to the services it starts (they get
/// explicit flags instead): TLS settings and per-service health ports.
pub const PRIVATE_ENV: [&str; 8] = [
    "DLB_TLS_CERT",
    "DLB_AUTHZ_POLICY",
    "DLB_TLS_KEY",
    "DLB_TLS_CA",
    "DLB_TLS_SERVER_NAME",
    "DLB_COMPUTE_HEALTH_LISTEN",
    "DLB_GATEWAY_HEALTH_LISTEN",
    "DLB_CONTROL_HEALTH_LISTEN",
];

/// Loaded TLS material. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tls {
    identity: Option<Identity>,
    ca: Option<Certificate>,
    /// The same material as PEM, for clients that use rustls directly.
    pem: Arc<Pem>,
    args: TlsArgs,
}

#[derive(Debug, Default)]
struct Pem {
    ca: Option<Vec<u8>>,
    /// Certificate chain and key.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The client side: how to verify servers and who to be.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Built on first use by [`ClientTls::rustls_connector`].
    rustls: Arc<std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>>,
    config: ClientTlsConfig,
    pem: Arc<Pem>,
    /// `--tls-server-name`.
    server_name_override: Option<String>,
    identity: bool,
    /// `--tls-server-name` was given: it wins over any name derived from the address.
    server_name: bool,
}

impl ClientTls {
    /// The tonic configuration; `domain` overrides the name checked against the server's
    /// certificate (default: `--tls-server-name`, else the host in the address).
    pub fn config(&self, domain: Option<&str>) -> ClientTlsConfig {
        match (domain, self.server_name) {
            (Some(domain), false) => self.config.clone().domain_name(domain),
            _ => self.config.clone(),
        }
    }

    /// A rustls connector (HTTP/2 by ALPN) with the name to verify for `host` (an IPv6
    /// address may come with its URI brackets): `--tls-server-name` when given, else `host`.
    ///
    /// # Errors
    ///
    /// Unreadable PEM material or an invalid name.
    pub fn rustls_connector(
        &self,
        host: &str,
    ) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), String> {
        let config = self
            .rustls
            .get_or_init(|| client_config(&self.pem).map(Arc::new))
            .clone()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = self.server_name_override.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{name:?} cannot be checked against a certificate: {e}"))?;
        Ok((tokio_rustls::TlsConnector::from(config), name))
    }
}

/// A rustls client configuration from PEM: the CA as the only root, the identity when given,
/// HTTP/2 by ALPN, ring as the crypto provider.
fn client_config(pem: &Pem) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.ca.as_deref().unwrap_or_default()) {
        let cert = cert.map_err(|e| format!("--tls-ca: {e}"))?;
        roots.add(cert).map_err(|e| format!("--tls-ca: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut config = match &pem.identity {
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--tls-cert: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("--tls-key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read_pem(flag: &str, path: &Path, kind: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(kind) {
        return Err(format!(
            "{flag} {}: not a PEM {} (expected a \"-----BEGIN ...{kind}-----\" block)",
            path.display(),
            kind.to_lowercase()
        ));
    }
    Ok(bytes)
}

impl TlsArgs {
    /// Nothing set: plaintext.
    pub fn is_off(&self) -> bool {
        self.tls_cert.is_none() && self.tls_key.is_none() && self.tls_ca.is_none()
    }

    /// Whether a server with these flags requires client certificates (mutual TLS).
    pub fn is_mutual(&self) -> bool {
        self.tls_cert.is_some() && self.tls_ca.is_some()
    }

    /// Reads the files, or `None` when no TLS flag is set.
    ///
    /// # Errors
    ///
    /// A one-line message naming the flag and the file.
    pub fn load(&self) -> Result<Option<Tls>, String> {
        if self.is_off() {
            return Ok(None);
        }
        let mut pem = Pem::default();
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let cert = read_pem("--tls-cert", cert, "CERTIFICATE")?;
                let key = read_pem("--tls-key", key, "PRIVATE KEY")?;
                pem.identity = Some((cert.clone(), key.clone()));
                Some(Identity::from_pem(cert, key))
            }
            (None, None) => None,
            _ => return Err("--tls-cert and --tls-key go together".to_owned()),
        };
        let ca = match &self.tls_ca {
            Some(ca) => {
                let ca = read_pem("--tls-ca", ca, "CERTIFICATE")?;
                pem.ca = Some(ca.clone());
                Some(Certificate::from_pem(ca))
            }
            None => None,
        };
        Ok(Some(Tls {
            identity,
            ca,
            pem: Arc::new(pem),
            args: self.clone(),
        }))
    }

    /// The same flags for a child process (absolute paths).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (flag, path) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(path) = path {
                let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                out.push(flag.to_owned());
                out.push(path.display().to_string());
            }
        }
        if let Some(name) = &self.tls_server_name {
            out.push("--tls-server-name".to_owned());
            out.push(name.clone());
        }
        out
    }
}

impl Tls {
    /// The server configuration: TLS with this process's certificate, and client certificates
    /// required when a CA is configured. `None` without a certificate (a CA alone only makes
    /// this process a TLS client).
    pub fn server(&self) -> Option<ServerTlsConfig> {
        let config = ServerTlsConfig::new().identity(self.identity.clone()?);
        Some(match &self.ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        })
    }

    /// The client side, or `None` when there is no CA to verify servers with.
    pub fn client(&self) -> Option<ClientTls> {
        let ca = self.ca.clone()?;
        let config = ClientTlsConfig::new().ca_certificate(ca);
        let config = match &self.args.tls_server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        };
        let config = match &self.identity {
            Some(identity) => config.identity(identity.clone()),
            None => config,
        };
        Some(ClientTls {
            config,
            pem: Arc::clone(&self.pem),
            server_name_override: self.args.tls_server_name.clone(),
            rustls: Arc::new(std::sync::OnceLock::new()),
            identity: self.identity.is_some(),
            server_name: self.args.tls_server_name.is_some(),
        })
    }

    /// Whether servers require client certificates.
    pub fn mutual(&self) -> bool {
        self.ca.is_some() && self.identity.is_some()
    }

    /// The flags this was loaded from.
    pub fn args(&self) -> &TlsArgs {
        &self.args
    }
}

/// What a failed call's error most likely means for TLS, given how the client connected
/// (`tls`: none, or with or without a client certificate). Servers requiring client
/// certificates close the connection right after the handshake, which the client sees only as
/// "connection closed"; a plaintext client talking to a TLS server sees an HTTP/2 framing
/// error. `None` when nothing points at TLS.
pub fn hint(message: &str, tls: Option<&ClientTls>) -> Option<&'static str> {
    let closed = message.contains("connection closed")
        || message.contains("connection reset")
        || message.contains("broken pipe");
    match tls {
        None if message.contains("frame with invalid size") || closed => Some(
            "the server may require TLS: give --tls-ca (and --tls-cert/--tls-key for mutual TLS)",
        ),
        Some(_) if message.contains("Expired") || message.contains("expired") => Some(
            "a certificate has expired: make new ones with `dlb certs init` in a new directory",
        ),
        Some(_)
            if message.contains("NotValidForName") || message.contains("not valid for name") =>
        {
            Some(
                "the server's certificate is not valid for the name or address dialled (dlb certs init --host NAME adds one; --tls-server-name checks another)",
            )
        }
        Some(_)
            if message.contains("UnknownIssuer")
                || message.contains("BadSignature")
                || message.contains("invalid peer certificate") =>
        {
            Some("the server's certificate is not signed by the CA given with --tls-ca")
        }
        Some(_) if message.contains("CertificateRequired") => Some(
            "the server requires a client certificate (mutual TLS): give --tls-cert and --tls-key",
        ),
        Some(_)
            if message.contains("alert: DecryptError")
                || message.contains("alert: BadCertificate")
                || message.contains("alert: UnknownCA") =>
        {
            Some("the server refused this client certificate: it is not signed by the server's CA")
        }
        Some(tls) if closed && !tls.identity => Some(
            "the server closed the connection after the TLS handshake: it requires a client certificate (mutual TLS); give --tls-cert and --tls-key",
        ),
        Some(_) if closed => Some(
            "the server closed the connection after the TLS handshake: it refused this client certificate (signed by another CA?)",
        ),
        Some(_)
            if message.contains("InvalidContentType") || message.contains("corrupt message") =>
        {
            Some("the server does not speak TLS: drop --tls-ca, or turn TLS on at the server")
        }
        _ => None,
    }
}

/// Loads `args` for a server binary: its server TLS configuration, `None` for plaintext.
///
/// # Errors
///
/// A one-line message.
pub fn for_server(args: &TlsArgs) -> Result<Option<ServerTlsConfig>, String> {
    Ok(args.load()?.and_then(|tls| tls.server()))
}

/// Who gets a certificate from [`init`]: the file stem.
pub const SERVICES: [&str; 5] = ["gateway", "compute", "control", "ui", "client"];

/// Services that also serve (their certificates name hosts and allow server use); the others
/// only call.
const SERVERS: [&str; 3] = ["gateway", "compute", "control"];

/// Makes a private CA and one certificate per entry of [`SERVICES`] in `dir` (created if
/// missing): `ca.pem`, `ca.key`, and `NAME.pem` + `NAME.key`. The servers' certificates
/// (gateway, compute, control) are valid for `localhost`, `127.0.0.1`, `::1`, `NAME`,
/// `dlb-NAME` and each of `hosts`, for server and client use (they call each other); `ui` and
/// `client` are client certificates only, naming no host. Valid from January 1 of last year to
/// January 1 of the year after next. Keys are written with mode 0600. Refuses to overwrite
/// anything.
///
/// # Errors
///
/// A message naming the file or the problem; nothing is written when a file exists already.
pub fn init(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, String> {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
    };
    let mut files = vec![dir.join("ca.pem"), dir.join("ca.key")];
    for name in SERVICES {
        files.push(dir.join(format!("{name}.pem")));
        files.push(dir.join(format!("{name}.key")));
    }
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        return Err(format!(
            "{} exists already; nothing was written (use another directory, or remove the old files)",
            existing.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let year: i32 = crate::events::time::rfc3339_ms(crate::events::time::now_ms())[..4]
        .parse()
        .unwrap_or(2026);
    let validity = |params: &mut CertificateParams| {
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    };
    let failed = |e: rcgen::Error| format!("generating certificates: {e}");

    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca_params = ca_params().map_err(failed)?;
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(failed)?;
    let mut outputs = vec![
        (dir.join("ca.pem"), ca_cert.pem()),
        (dir.join("ca.key"), ca_key.serialize_pem()),
    ];
    let issuer = Issuer::new(ca_params, ca_key);
    for name in SERVICES {
        let server = SERVERS.contains(&name);
        let mut names = Vec::new();
        if server {
            names.extend(["localhost", "127.0.0.1", "::1"].map(str::to_owned));
            names.push(name.to_owned());
            names.push(format!("dlb-{name}"));
            names.extend(hosts.iter().cloned());
        }
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::new(names).map_err(failed)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("dlb {name}"));
        params.subject_alt_names.push(identity(name)?);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        validity(&mut params);
        let cert = params.signed_by(&key, &issuer).map_err(failed)?;
        outputs.push((dir.join(format!("{name}.pem")), cert.pem()));
        outputs.push((dir.join(format!("{name}.key")), key.serialize_pem()));
    }
    for (path, contents) in &outputs {
        write_new(path, contents.as_bytes())?;
    }
    Ok(outputs.into_iter().map(|(path, _)| path).collect())
}

/// The parameters of the CA [`init`] makes (its name is what every certificate it issues
/// names as issuer).
fn ca_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "dlb private CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// The subject alternative name naming `role`'s identity (`spiffe://dlb.local/ROLE`).
fn identity(role: &str) -> Result<rcgen::SanType, String> {
    let uri = crate::authz::spiffe_id(role);
    let uri = uri
        .as_str()
        .try_into()
        .map_err(|e| format!("{uri}: not a URI a certificate can hold: {e}"))?;
    Ok(rcgen::SanType::URI(uri))
}

/// Makes one more client certificate from the CA [`init`] wrote in `dir`: `NAME.pem` and
/// `NAME.key`, naming the identity of `role` (`spiffe://dlb.local/ROLE`), valid from January 1
/// of last year to January 1 of the year after next (no longer than the CA's own, when it was
/// made this year or last). Refuses to overwrite anything.
///
/// # Errors
///
/// A message naming the file or the problem (no CA there, a CA key that does not match its
/// certificate, a bad name or role); nothing is written then.
pub fn issue(dir: &Path, name: &str, role: &str) -> Result<Vec<PathBuf>, String> {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, PublicKeyData,
    };
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    crate::authz::check_role(name).map_err(|e| format!("certificate name {e}"))?;
    crate::authz::check_role(role).map_err(|e| format!("--role {e}"))?;
    if name == "ca" {
        return Err("\"ca\" is the CA's own file name: choose another name".to_owned());
    }
    let files = [
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    ];
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        return Err(format!(
            "{} exists already; nothing was written (choose another name, or remove the old files)",
            existing.display()
        ));
    }
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{}: cannot read it ({e}); make a CA there first with `dlb certs init {}`",
                path.display(),
                dir.display()
            )
        })
    };
    let (ca_pem, ca_key) = (read("ca.pem")?, read("ca.key")?);
    let ca_der = tokio_rustls::rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| {
            format!(
                "{}: not a PEM certificate: {e}",
                dir.join("ca.pem").display()
            )
        })?;
    let ca_key = KeyPair::from_pem(&ca_key).map_err(|e| {
        format!(
            "{}: not a PEM private key: {e}",
            dir.join("ca.key").display()
        )
    })?;
    if crate::authz::public_key_info(&ca_der) != Some(&ca_key.subject_public_key_info()[..]) {
        return Err(format!(
            "{} is not the key of {}: they must be the pair `dlb certs init` wrote",
            dir.join("ca.key").display(),
            dir.join("ca.pem").display()
        ));
    }
    let failed = |e: rcgen::Error| format!("generating the certificate: {e}");
    let issuer = Issuer::new(ca_params().map_err(failed)?, ca_key);
    let year: i32 = crate::events::time::rfc3339_ms(crate::events::time::now_ms())[..4]
        .parse()
        .unwrap_or(2026);
    let key = KeyPair::generate().map_err(failed)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("dlb {name}"));
    params.subject_alt_names.push(identity(role)?);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let cert = params.signed_by(&key, &issuer).map_err(failed)?;
    // Issued under the name the CA certificate has, or no server would accept it.
    let same_name = matches!(
        (crate::authz::issuer(cert.der()), crate::authz::subject(&ca_der)),
        (Some(issuer), Some(subject)) if issuer == subject
    );
    if !same_name {
        return Err(format!(
            "{} was not made by `dlb certs init`: its name differs from the one dlb issues under",
            dir.join("ca.pem").display()
        ));
    }
    write_new(&files[0], cert.pem().as_bytes())?;
    write_new(&files[1], key.serialize_pem().as_bytes())?;
    Ok(files.to_vec())
}

/// The identity the certificate in the PEM file `path` names.
///
/// # Errors
///
/// An unreadable file, or one holding no certificate.
pub fn identity_of(path: &Path) -> Result<crate::authz::Caller, String> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = read_pem("--tls-cert", path, "CERTIFICATE")?;
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
    Ok(crate::authz::Caller::of_certificate(&der))
}

/// Writes a new file (never an existing one); keys are readable by the owner only.
fn write_new(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let private = path.extension().is_some_and(|e| e == "key");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(contents)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The flags that make a service use the certificates [`init`] wrote in `dir` for `name`.
pub fn args_for(dir: &Path, name: &str) -> TlsArgs {
    TlsArgs {
        tls_cert: Some(dir.join(format!("{name}.pem"))),
        tls_key: Some(dir.join(format!("{name}.key"))),
        tls_ca: Some(dir.join("ca.pem")),
        tls_server_name: None,
    }
}
