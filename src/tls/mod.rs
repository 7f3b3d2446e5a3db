//! TLS with rustls (ring provider, TLS 1.2 and 1.3 only): the server's
//! certificate, generated when none is configured and reloaded when the
//! files change on disk (certbot renewals need no restart), and the client
//! configurations delivery uses.
//!
//! Never falls back to anything older than TLS 1.2.

pub mod client;
mod stream;

pub use stream::{TlsSummary, Transport};

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::store::data_dir::TLS_DIR;
use crate::watched::{FileStamp, Watched};

/// Generated certificate and key (in [`TLS_DIR`]), when none is configured.
const GENERATED_CERT: &str = "selfsigned-cert.pem";
const GENERATED_KEY: &str = "selfsigned-key.pem";

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

crate::error::message_error!(TlsError, "A certificate, key or TLS configuration problem.");

/// The server's TLS configuration, swapped atomically on reload; sessions
/// already in TLS keep the configuration they started with.
pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// The certificate and key files, looked at on new connections.
    files: Watched,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads `tls.cert`/`tls.key`, or generates a self-signed pair in
    /// `data_dir/tls/` on first start when none is configured.
    pub fn load(config: &Config) -> Result<ServerTls, TlsError> {
        let (cert_path, key_path) = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => ensure_self_signed(&config.data_dir, &config.hostname)?,
        };
        let files = Watched::new(vec![cert_path.clone(), key_path.clone()]);
        let server_config = build_server_config(&cert_path, &key_path)?;
        Ok(ServerTls {
            cert_path,
            key_path,
            files,
            current: RwLock::new(server_config),
        })
    }

    /// The configuration for a new handshake, reloading first if the files
    /// changed (checked at most every couple of seconds).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        if let Some(stamp) = self.files.changed() {
            self.reload(stamp);
        }
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&current)
    }

    /// SIGHUP (or `petrel reload`): read the files again now. Returns what
    /// the log says.
    pub fn force_reload(&self) -> String {
        self.reload(self.files.current())
    }

    fn reload(&self, stamp: FileStamp) -> String {
        // Half-written files during a renewal are normal: the old
        // certificate stays in service, and the next change is tried.
        self.files.loaded(stamp);
        match build_server_config(&self.cert_path, &self.key_path) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
                let said = format!("tls: reloaded certificate {}", self.cert_path.display());
                log::info!("{said}");
                said
            }
            Err(error) => {
                let said = format!("tls: keeping the previous certificate: {error}");
                log::warn!("{said}");
                said
            }
        }
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsError(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} contains no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Loads a certificate chain and its key and checks that they go together,
/// as the server will; returns the end-entity certificate.
pub fn check_pair(cert_path: &Path, key_path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    build_server_config(cert_path, key_path)?;
    let mut certs = load_certificates(cert_path)?;
    Ok(certs.swap_remove(0))
}

/// Whether a certificate is valid for `hostname` (its SAN names); the
/// reason in words when it is not.
pub fn covers_name(cert: &CertificateDer<'_>, hostname: &str) -> Result<(), String> {
    let end_entity = webpki::EndEntityCert::try_from(cert).map_err(|e| describe_webpki(&e))?;
    let name = rustls::pki_types::ServerName::try_from(hostname)
        .map_err(|_| format!("{hostname:?} is not a host name"))?;
    end_entity
        .verify_is_valid_for_subject_name(&name)
        .map_err(|e| describe_webpki(&e))
}

/// webpki's errors display as their Rust names
/// (`CertNotValidForName(InvalidNameContext { .. })`): an operator reads
/// these instead.
fn describe_webpki(error: &webpki::Error) -> String {
    match error {
        webpki::Error::CertNotValidForName(context) if context.presented.is_empty() => {
            "it names no host in its subjectAltName".to_string()
        }
        webpki::Error::CertNotValidForName(context) => {
            format!("it is only valid for {}", context.presented.join(", "))
        }
        webpki::Error::BadDer | webpki::Error::BadDerTime => {
            "it is not a well-formed certificate".to_string()
        }
        other => format!("the certificate was refused ({other:?})"),
    }
}

fn build_server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certificates(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        TlsError(format!(
            "cannot read private key from {}: {e}",
            key_path.display()
        ))
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError(format!(
                "certificate {} does not go with key {}: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
    Ok(Arc::new(config))
}

/// Returns the generated pair's paths, creating it if needed.
fn ensure_self_signed(data_dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let dir = data_dir.join(TLS_DIR);
    let cert_path = dir.join(GENERATED_CERT);
    let key_path = dir.join(GENERATED_KEY);
    if cert_path.exists() && key_path.exists() {
        log::warn!(
            "tls: no [tls] cert/key configured; using the self-signed certificate {}",
            cert_path.display()
        );
        return Ok((cert_path, key_path));
    }
    crate::store::data_dir::create_private_dir(&dir)
        .map_err(|e| TlsError(format!("cannot create {}: {e}", dir.display())))?;
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".to_string());
    }
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError(format!("cannot generate a certificate: {e}")))?;
    // Key first, private from the first byte; the certificate's presence
    // marks a complete pair.
    write_file(
        &key_path,
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&cert_path, generated.cert.pem().as_bytes(), 0o644)?;
    log::warn!(
        "tls: no [tls] cert/key configured; generated a self-signed certificate for {hostname} in {} \
         (clients will not trust it; configure tls.cert and tls.key for production)",
        cert_path.display()
    );
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let result = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        });
    result.map_err(|e| TlsError(format!("cannot write {}: {e}", path.display())))
}

/// "TLSv1.3" rather than rustls' debug name, for Received headers and logs.
pub fn version_name(version: Option<rustls::ProtocolVersion>) -> String {
    match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    }
}

pub fn cipher_name(suite: Option<rustls::SupportedCipherSuite>) -> String {
    suite
        .and_then(|s| s.suite().as_str())
        .map(str::to_string)
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            hostname: "mx.test".into(),
            ..Config::default()
        };
        let first = ServerTls::load(&config).unwrap();
        let pem = fs::read(first.cert_path()).unwrap();
        let mode = fs::metadata(dir.path().join("tls").join(GENERATED_KEY))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let second = ServerTls::load(&config).unwrap();
        assert_eq!(fs::read(second.cert_path()).unwrap(), pem);
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        fs::write(&cert, "not a certificate").unwrap();
        fs::write(&key, "not a key").unwrap();
        let mut config = Config::default();
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        let error = ServerTls::load(&config).err().unwrap().to_string();
        assert!(error.contains("cert.pem"), "{error}");
        config.tls.cert = Some(dir.path().join("missing.pem"));
        let error = ServerTls::load(&config).err().unwrap().to_string();
        assert!(error.contains("missing.pem"), "{error}");
    }
}
