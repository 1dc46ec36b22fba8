//! TLS on both sides of Weir, configured with PgBouncer's settings and meanings.
//!
//! - Facing clients (`client_tls_*`): Weir answers a client's SSLRequest with `S` and runs the
//!   server half of the handshake when `client_tls_sslmode` is anything but `disable`;
//!   `require` and stronger refuse a plaintext StartupMessage over TCP ("SSL required", as
//!   PgBouncer). `verify-ca`/`verify-full` demand a client certificate that chains to
//!   `client_tls_ca_file`; weaker modes do not ask for one.
//! - Facing servers (`server_tls_*`): every mode but `disable` sends PostgreSQL an SSLRequest
//!   before the StartupMessage. `N` continues in plaintext for `allow`/`prefer` and fails for
//!   `require` and stronger. `require` encrypts without checking the certificate (as libpq and
//!   PgBouncer do), `verify-ca` checks the chain against `server_tls_ca_file`, `verify-full`
//!   also the host name.
//!
//! Everything is built when the config loads, so a missing or malformed file is a config error
//! naming its key, `weir --check` finds it, and RELOAD/SIGHUP picks up changed certificates (a
//! reload that fails keeps the running config, certificates included).

mod verify;

use crate::config::{resolve, General};
use crate::net::Stream;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::ServerCertVerifier;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// PgBouncer's `client_tls_sslmode` / `server_tls_sslmode` values, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// A TLS setting that cannot be used: the `[weir]` key to blame and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub key: &'static str,
    pub message: String,
}

fn setting_error(key: &'static str, message: impl Into<String>) -> SettingError {
    SettingError {
        key,
        message: message.into(),
    }
}

/// Both sides' TLS, built from one config.
#[derive(Clone, Debug)]
pub struct Tls {
    pub client: ClientTls,
    pub server: ServerTls,
}

impl Tls {
    /// Reads the certificate files `g` names (relative paths are relative to the config file
    /// at `config_path`) and builds the acceptor and connector.
    pub fn load(config_path: &Path, g: &General) -> Result<Tls, SettingError> {
        let files = Files { config_path };
        Ok(Tls {
            client: ClientTls::load(&files, g)?,
            server: ServerTls::load(&files, g)?,
        })
    }
}

/// How Weir treats TLS from clients (`client_tls_*`).
#[derive(Clone)]
pub struct ClientTls {
    pub mode: SslMode,
    acceptor: Option<TlsAcceptor>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ClientTls({})", self.mode)
    }
}

impl ClientTls {
    fn load(files: &Files, g: &General) -> Result<ClientTls, SettingError> {
        let mode = g.client_tls_sslmode;
        if mode == SslMode::Disable {
            return Ok(ClientTls {
                mode,
                acceptor: None,
            });
        }
        let needs = |key| {
            setting_error(
                key,
                format!(
                    "client_tls_sslmode {mode} needs client_tls_key_file and client_tls_cert_file"
                ),
            )
        };
        let key_path = files
            .path(&g.client_tls_key_file)
            .ok_or_else(|| needs("client_tls_key_file"))?;
        let cert_path = files
            .path(&g.client_tls_cert_file)
            .ok_or_else(|| needs("client_tls_cert_file"))?;
        let ca_path = files.path(&g.client_tls_ca_file);
        let certs = read_certs("client_tls_cert_file", &cert_path)?.1;
        let key = read_key("client_tls_key_file", &key_path)?.1;
        let roots = match ca_path {
            Some(p) => Some(read_roots("client_tls_ca_file", &p)?.1),
            None => None,
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setting_error("client_tls_sslmode", e.to_string()))?;
        let builder = match client_verifier(mode, roots)? {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let cannot_serve = |e: String| {
            setting_error(
                "client_tls_key_file",
                format!(
                    "{} cannot serve {}: {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        };
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| cannot_serve(e.to_string()))?;
        let certified = rustls::sign::CertifiedKey::new(certs, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(cannot_serve(
                    "the key does not match the certificate".into(),
                ));
            }
            // The certificate could not be parsed for the comparison: webpki reads only
            // X.509 v3, while the clients that check Weir's certificate (libpq with OpenSSL,
            // JDBC, …) also take v1 certificates, which older CAs and test setups still
            // issue. Serve it; a client that cannot use it says so in its handshake.
            Err(_) => {}
        }
        let config =
            builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        Ok(ClientTls {
            mode,
            acceptor: Some(TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// True when Weir answers a client's SSLRequest with `S`.
    pub fn offered(&self) -> bool {
        self.acceptor.is_some()
    }

    /// True when a plaintext TCP client must be refused (Unix sockets are exempt, as in
    /// PgBouncer).
    pub fn required(&self) -> bool {
        self.mode >= SslMode::Require
    }

    /// Runs the server half of the handshake on a client that asked for TLS and was told `S`.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let Some(acceptor) = &self.acceptor else {
            return Err(std::io::Error::other("TLS is not configured for clients"));
        };
        let tls = acceptor.accept(tcp).await?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }
}

/// How Weir uses TLS towards PostgreSQL (`server_tls_*`).
///
/// Part of each pool's target: two values are equal when the mode and every certificate
/// file's contents are, so a reload that changes a certificate retires the pools (their
/// connections drain) while an unchanged one keeps them.
#[derive(Clone)]
pub struct ServerTls {
    pub mode: SslMode,
    connector: Option<TlsConnector>,
    fingerprint: [u8; 32],
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ServerTls({})", self.mode)
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.fingerprint == other.fingerprint
    }
}

impl Eq for ServerTls {}

/// Why TLS towards a server could not be set up.
#[derive(Debug, Error)]
pub enum ServerTlsError {
    /// PgBouncer's wording.
    #[error("server refused SSL")]
    Refused,
    #[error("bad answer to SSLRequest: {0:#04x}")]
    BadAnswer(u8),
    #[error("cannot check the certificate of {0}: not a valid host name")]
    ServerName(String),
    #[error("TLS handshake with the server failed: {0}")]
    Handshake(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ServerTls {
    /// No TLS (Weir's own command-line tools talking to its console).
    pub fn disabled() -> ServerTls {
        let mut fingerprint = Sha256::new();
        fingerprint.update([SslMode::Disable as u8]);
        ServerTls {
            mode: SslMode::Disable,
            connector: None,
            fingerprint: fingerprint.finalize().into(),
        }
    }

    fn load(files: &Files, g: &General) -> Result<ServerTls, SettingError> {
        let mode = g.server_tls_sslmode;
        let mut fingerprint = Sha256::new();
        fingerprint.update([mode as u8]);
        if mode == SslMode::Disable {
            return Ok(ServerTls {
                mode,
                connector: None,
                fingerprint: fingerprint.finalize().into(),
            });
        }
        let ca = match files.path(&g.server_tls_ca_file) {
            Some(p) => {
                let (bytes, roots) = read_roots("server_tls_ca_file", &p)?;
                fingerprint.update(&bytes);
                Some(roots)
            }
            None => None,
        };
        let identity = server_identity(files, g, &mut fingerprint)?;
        let p = provider();
        let verifier = server_verifier(mode, ca, p.clone())?;
        let builder = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| setting_error("server_tls_sslmode", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match identity {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
                setting_error(
                    "server_tls_key_file",
                    format!("does not fit server_tls_cert_file: {e}"),
                )
            })?,
            None => builder.with_no_client_auth(),
        };
        Ok(ServerTls {
            mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
            fingerprint: fingerprint.finalize().into(),
        })
    }

    /// Starts a server connection the way `server_tls_sslmode` says: for any mode but
    /// `disable`, an SSLRequest, then the handshake on `S`; plaintext on `N` unless TLS is
    /// required. `host` is what `verify-full` checks the certificate against.
    pub async fn negotiate(
        &self,
        mut tcp: TcpStream,
        host: &str,
    ) -> Result<Stream, ServerTlsError> {
        let Some(connector) = &self.connector else {
            return Ok(Stream::Tcp(tcp));
        };
        tcp.write_all(&crate::wire::build::ssl_request()).await?;
        // Exactly one byte: anything after it would be unencrypted data a man in the middle
        // could have injected (CVE-2021-23222), so none is read before the handshake.
        match tcp.read_u8().await? {
            b'S' => {}
            b'N' if self.mode < SslMode::Require => return Ok(Stream::Tcp(tcp)),
            b'N' => return Err(ServerTlsError::Refused),
            other => return Err(ServerTlsError::BadAnswer(other)),
        }
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| ServerTlsError::ServerName(host.to_string()))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(ServerTlsError::Handshake)?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }
}

/// The check of client certificates for `verify-ca`/`verify-full`; `None` for weaker modes,
/// which do not ask for one.
fn client_verifier(
    mode: SslMode,
    roots: Option<RootCertStore>,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, SettingError> {
    if mode < SslMode::VerifyCa {
        return Ok(None);
    }
    // As PgBouncer: verify-full must name its CA; verify-ca falls back to the system's.
    let roots = match roots {
        Some(r) => r,
        None if mode == SslMode::VerifyFull => {
            let message = "client_tls_sslmode verify-full needs client_tls_ca_file";
            return Err(setting_error("client_tls_ca_file", message));
        }
        None => system_roots("client_tls_ca_file")?,
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| setting_error("client_tls_ca_file", e.to_string()))?;
    Ok(Some(verifier))
}

/// A certificate chain and its private key.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Weir's own certificate and key for servers that ask for one (`server_tls_cert_file`,
/// `server_tls_key_file`), fed into the fingerprint.
fn server_identity(
    files: &Files,
    g: &General,
    fingerprint: &mut Sha256,
) -> Result<Option<Identity>, SettingError> {
    let key = files.path(&g.server_tls_key_file);
    let cert = files.path(&g.server_tls_cert_file);
    let (key, cert) = match (key, cert) {
        (Some(key), Some(cert)) => (key, cert),
        (None, None) => return Ok(None),
        (Some(_), None) => {
            let message = "server_tls_key_file needs its certificate too";
            return Err(setting_error("server_tls_cert_file", message));
        }
        (None, Some(_)) => {
            let message = "server_tls_cert_file needs its private key too";
            return Err(setting_error("server_tls_key_file", message));
        }
    };
    let (cert_bytes, certs) = read_certs("server_tls_cert_file", &cert)?;
    let (key_bytes, key) = read_key("server_tls_key_file", &key)?;
    fingerprint.update(&cert_bytes);
    fingerprint.update(&key_bytes);
    Ok(Some((certs, key)))
}

/// What `mode` checks of a server's certificate (see the module comment).
fn server_verifier(
    mode: SslMode,
    ca: Option<RootCertStore>,
    p: Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, SettingError> {
    if mode < SslMode::VerifyCa {
        return Ok(Arc::new(verify::Relaxed::any_certificate(p)));
    }
    let roots = match ca {
        Some(r) => Arc::new(r),
        None => Arc::new(system_roots("server_tls_ca_file")?),
    };
    if mode == SslMode::VerifyCa {
        return Ok(Arc::new(verify::Relaxed::chain_only(roots, p)));
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, p)
        .build()
        .map_err(|e| setting_error("server_tls_ca_file", e.to_string()))?;
    Ok(verifier)
}

/// The crypto provider: ring, as built into tokio-rustls here.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where the config file is, to resolve relative certificate paths.
struct Files<'a> {
    config_path: &'a Path,
}

impl Files<'_> {
    /// A path setting; PgBouncer treats an empty value as not set.
    fn path(&self, value: &Option<String>) -> Option<PathBuf> {
        value
            .as_deref()
            .filter(|v| !v.trim().is_empty())
            .map(|v| resolve(self.config_path, v.trim()))
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, SettingError> {
    std::fs::read(path)
        .map_err(|e| setting_error(key, format!("cannot read {}: {e}", path.display())))
}

/// A PEM certificate chain, leaf first, with the file's bytes.
fn read_certs(
    key: &'static str,
    path: &Path,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), SettingError> {
    let bytes = read(key, path)?;
    let certs = parse_certs(key, path, &bytes)?;
    Ok((bytes, certs))
}

fn parse_certs(
    key: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, SettingError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setting_error(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(setting_error(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// A PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC), with the file's bytes.
fn read_key(
    key: &'static str,
    path: &Path,
) -> Result<(Vec<u8>, PrivateKeyDer<'static>), SettingError> {
    let bytes = read(key, path)?;
    let private = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        setting_error(
            key,
            format!("{} holds no usable PEM private key: {e}", path.display()),
        )
    })?;
    Ok((bytes, private))
}

/// Trusted roots from a PEM CA file, with the file's bytes.
fn read_roots(key: &'static str, path: &Path) -> Result<(Vec<u8>, RootCertStore), SettingError> {
    let bytes = read(key, path)?;
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(key, path, &bytes)? {
        roots
            .add(cert)
            .map_err(|e| setting_error(key, format!("{}: {e}", path.display())))?;
    }
    Ok((bytes, roots))
}

/// The usual places of the operating system's CA bundle (Debian, Red Hat, SUSE, Alpine).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's trusted roots, used like libtls's default CA file when no CA file is set.
fn system_roots(key: &'static str) -> Result<RootCertStore, SettingError> {
    for file in SYSTEM_CA_FILES {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok);
        roots.add_parsable_certificates(certs);
        if !roots.is_empty() {
            return Ok(roots);
        }
    }
    Err(setting_error(
        key,
        "not set and no system CA bundle found; name the CA file that signed the certificates",
    ))
}

#[cfg(test)]
mod tests;
