//! Client-side TLS for delivery: opportunistic encryption to MX hosts (as
//! Postfix's "may" level: encrypt, accept any certificate, because MX
//! certificates are rarely valid for the MX name) and verified TLS to a
//! smart host (credentials go there).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use super::{PROTOCOL_VERSIONS, TlsError, load_certificates, provider};

/// Accepts any certificate but still checks the handshake signatures, so
/// the session is encrypted against passive eavesdroppers.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// For MX hosts and `smarthost_tls = "encrypt"`.
pub fn unverified() -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError(format!("TLS client setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What the operator trusts for the smart host besides the Mozilla roots.
#[derive(Debug, Clone, Default)]
pub struct SmarthostTrust {
    /// `smarthost_ca`: extra trust anchors (an internal CA), and each of its
    /// certificates also pinned: a smart host presenting exactly one of
    /// them is trusted, as operators behind a firewall do with a self-signed
    /// certificate made by `openssl req -x509` (CA:TRUE, which WebPKI would
    /// otherwise refuse to see as a server's own certificate).
    pub ca_file: Option<std::path::PathBuf>,
    /// `smarthost_fingerprint`: the SHA-256 of the smart host's certificate.
    pub fingerprint: Option<[u8; 32]>,
}

/// For `smarthost_tls = "verify"`: the Mozilla roots (webpki-roots) and
/// `smarthost_ca` as anchors, plus exact-match pinning (see
/// [`SmarthostTrust`]).
pub fn verified(trust: &SmarthostTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut pinned = Vec::new();
    if let Some(path) = &trust.ca_file {
        for cert in load_certificates(path)? {
            // A plain self-signed server certificate need not be a usable
            // anchor: it is still pinned.
            let _ = roots.add(cert.clone());
            pinned.push(cert);
        }
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| TlsError(format!("TLS client setup: {e}")))?;
    let verifier = PinningVerifier {
        webpki,
        pinned,
        fingerprint: trust.fingerprint,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError(format!("TLS client setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// WebPKI verification, except that a certificate the operator named
/// exactly (in `smarthost_ca`, or by fingerprint) is trusted as it is.
#[derive(Debug)]
struct PinningVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
    fingerprint: Option<[u8; 32]>,
}

/// The SHA-256 of a certificate's DER form.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let presented = end_entity.as_ref();
        if self.pinned.iter().any(|cert| cert.as_ref() == presented)
            || self.fingerprint == Some(fingerprint(presented))
        {
            return Ok(ServerCertVerified::assertion());
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
