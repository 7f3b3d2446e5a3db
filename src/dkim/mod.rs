//! DKIM signing (RFC 6376; ed25519-sha256 from RFC 8463, and rsa-sha256)
//! of mail sent by local users, done once when the message is accepted so
//! that the queued copy is the signed one. Relaxed/relaxed
//! canonicalization; the body is hashed as it streams past (a large
//! message is never held whole), the header section is read up to its
//! end, which the session has already bounded (`limits.max_header_size`).
//!
//! Keys: `key_dir/DOMAIN.SELECTOR.pem`, PKCS#8 (ed25519 or RSA) or PKCS#1
//! (RSA), made by `petrel dkim generate`, which prints the TXT record.
//! Signatures are made with ring; RustCrypto's `rsa` only generates RSA
//! keys (ring cannot).

pub mod canonical;
pub mod verify;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::config::Config;
use crate::watched::Watched;
use canonical::{RelaxedBody, relaxed_header};

crate::error::message_error!(DkimError, "DKIM failed.");

/// The header fields signed when present (RFC 6376 5.4.1): what
/// identifies and describes the message. From is signed once more than it
/// appears ("oversigning"), so a From added on the way breaks the
/// signature instead of fooling the reader.
pub const SIGNED_HEADERS: &[&str] = &[
    "from",
    "reply-to",
    "subject",
    "date",
    "to",
    "cc",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Ed25519,
    Rsa,
}

impl Algorithm {
    pub fn parse(name: &str) -> Result<Algorithm, DkimError> {
        match name {
            "ed25519" => Ok(Algorithm::Ed25519),
            "rsa" => Ok(Algorithm::Rsa),
            other => Err(DkimError(format!(
                "unknown algorithm {other:?} (ed25519 or rsa)"
            ))),
        }
    }
}

enum Key {
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

impl Key {
    fn tag(&self) -> &'static str {
        match self {
            Key::Ed25519(_) => "ed25519-sha256",
            Key::Rsa(_) => "rsa-sha256",
        }
    }

    /// The TXT record value that publishes this key.
    fn record(&self) -> String {
        let (k, public) = match self {
            Key::Ed25519(key) => ("ed25519", key.public_key().as_ref().to_vec()),
            // p= is a SubjectPublicKeyInfo, as OpenDKIM publishes and every
            // verifier takes; ring gives the PKCS#1 key inside it.
            Key::Rsa(key) => ("rsa", spki_of_rsa(key.public().as_ref())),
        };
        format!("v=DKIM1; k={k}; p={}", BASE64.encode(public))
    }

    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, DkimError> {
        match self {
            // RFC 8463 3: Ed25519 signs the SHA-256 hash of the data.
            Key::Ed25519(key) => {
                let hash = ring::digest::digest(&ring::digest::SHA256, data);
                Ok(key.sign(hash.as_ref()).as_ref().to_vec())
            }
            Key::Rsa(key) => {
                let mut signature = vec![0u8; key.public().modulus_len()];
                key.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    data,
                    &mut signature,
                )
                .map_err(|_| DkimError("RSA signing failed".into()))?;
                Ok(signature)
            }
        }
    }
}

/// The keys petrel signs with, by domain (lower case).
#[derive(Default)]
pub struct Signer {
    selector: String,
    keys: HashMap<String, Key>,
    /// `limits.max_header_size`: the session refuses larger header
    /// sections, so the buffer that collects one never grows past it.
    max_header_section: usize,
}

/// Where the key for `domain` and `selector` is.
pub fn key_path(dir: &Path, domain: &str, selector: &str) -> PathBuf {
    dir.join(format!("{}.{selector}.pem", domain.to_ascii_lowercase()))
}

/// The domains mail is signed for, and whether they were listed
/// (`dkim.domains`) rather than taken from `domains.local`.
pub fn signing_domains(config: &Config) -> (&[String], bool) {
    if config.dkim.domains.is_empty() {
        (&config.domains.local, false)
    } else {
        (&config.dkim.domains, true)
    }
}

/// The key file of each domain signed for (present or not), in the order
/// of [`signing_domains`].
pub fn key_paths(config: &Config) -> Vec<PathBuf> {
    let dir = config.dkim_key_dir();
    signing_domains(config)
        .0
        .iter()
        .map(|domain| key_path(&dir, domain, &config.dkim.selector))
        .collect()
}

/// The keys in use, replaced whole when they change: a key file that
/// appears or changes for a domain signed for is noticed at the next
/// signing (looked at most every couple of seconds, as certificates are),
/// and [`Keys::reload`] (SIGHUP, `petrel reload`) applies a new `[dkim]`.
pub struct Keys {
    loaded: RwLock<Arc<Loaded>>,
}

struct Loaded {
    /// What the keys were loaded from (its `[dkim]`, local domains and
    /// data dir).
    config: Arc<Config>,
    signer: Arc<Signer>,
    files: Watched,
}

impl Loaded {
    fn new(config: Arc<Config>) -> Result<Loaded, DkimError> {
        let files = Watched::new(key_paths(&config));
        let signer = Arc::new(Signer::load(&config)?);
        Ok(Loaded {
            config,
            signer,
            files,
        })
    }
}

impl Keys {
    pub fn load(config: &Config) -> Result<Keys, DkimError> {
        let loaded = Loaded::new(Arc::new(config.clone()))?;
        Ok(Keys {
            loaded: RwLock::new(Arc::new(loaded)),
        })
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.loaded.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The keys to sign with now, after a look at the key files when one
    /// is due: a new key is used without a restart or a signal.
    pub fn signer(&self) -> Arc<Signer> {
        let loaded = self.current();
        let Some(stamp) = loaded.files.changed() else {
            return Arc::clone(&loaded.signer);
        };
        match Loaded::new(Arc::clone(&loaded.config)) {
            Ok(fresh) => {
                log::info!("dkim: key files changed; {}", fresh.signer.summary());
                let signer = Arc::clone(&fresh.signer);
                *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
                signer
            }
            Err(error) => {
                // A key half written, or unreadable: the old keys stay,
                // and the next change is tried.
                loaded.files.loaded(stamp);
                log::warn!("dkim: keeping the keys in use: {error}");
                Arc::clone(&loaded.signer)
            }
        }
    }

    /// Loads the keys `config` names (its `[dkim]` section, local
    /// domains); on error the keys in use stay. Returns what the log says.
    pub fn reload(&self, config: &Config) -> Result<String, DkimError> {
        let fresh = Loaded::new(Arc::new(config.clone()))?;
        let said = format!("dkim: {}", fresh.signer.summary());
        *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        Ok(said)
    }
}

impl Signer {
    /// Loads the key of each domain to sign for. A domain listed in
    /// `dkim.domains` without a usable key is an error (its mail would
    /// leave unsigned and fail DMARC); a local domain without a key, when
    /// none are listed, is simply not signed for.
    pub fn load(config: &Config) -> Result<Signer, DkimError> {
        let selector = config.dkim.selector.clone();
        let (domains, listed) = signing_domains(config);
        let mut keys = HashMap::new();
        for (domain, path) in domains.iter().zip(key_paths(config)) {
            // Missing is fine for a local domain not listed; a key that is
            // there but cannot be read (permissions) is said as such.
            match std::fs::metadata(&path) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound && !listed => continue,
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DkimError(format!(
                        "dkim: {domain}: cannot read {}: {error} (the server's user must \
                         read it)",
                        path.display()
                    )));
                }
                _ => {}
            }
            let key = load_key(&path).map_err(|e| {
                DkimError(format!(
                    "dkim: {domain}: {e} (make one with `petrel dkim generate {domain} \
                     --selector {selector}`)"
                ))
            })?;
            keys.insert(domain.to_ascii_lowercase(), key);
        }
        Ok(Signer {
            selector,
            keys,
            // Plus the trace fields petrel adds in front.
            max_header_section: usize::try_from(config.limits.max_header_size.bytes() + 65536)
                .unwrap_or(usize::MAX),
        })
    }

    /// The selector in use.
    pub fn selector(&self) -> &str {
        &self.selector
    }

    /// The TXT record value for `domain`'s key, if it has one.
    pub fn record(&self, domain: &str) -> Option<String> {
        self.keys.get(&domain.to_ascii_lowercase()).map(Key::record)
    }

    /// "signing for a.example, b.example with selector s1", or that mail
    /// leaves unsigned.
    pub fn summary(&self) -> String {
        if self.keys.is_empty() {
            return "no keys: mail leaves unsigned".to_string();
        }
        format!(
            "signing for {} with selector {}",
            self.domains().join(", "),
            self.selector
        )
    }

    /// The domains signed for, sorted.
    pub fn domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = self.keys.keys().cloned().collect();
        domains.sort();
        domains
    }

    /// A `DKIM-Signature:` header field (ending in CRLF) for the message
    /// `content` reads, if mail from `domain` is signed.
    pub fn sign(
        &self,
        domain: &str,
        content: &mut dyn Read,
        now: std::time::SystemTime,
    ) -> Result<Option<String>, DkimError> {
        let domain = domain.to_ascii_lowercase();
        let Some(key) = self.keys.get(&domain) else {
            return Ok(None);
        };
        let (headers, body_hash) = read_message(content, self.max_header_section)?;
        let fields = header_fields(&headers);
        let mut signed_names: Vec<&str> = Vec::new();
        for name in SIGNED_HEADERS {
            let count = fields.iter().filter(|(n, _)| n == name).count();
            let count = if *name == "from" { count + 1 } else { count };
            signed_names.extend(std::iter::repeat_n(*name, count));
        }
        let timestamp = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let unsigned = format!(
            "DKIM-Signature: v=1; a={}; c=relaxed/relaxed; d={domain};\r\n\
             \ts={}; t={timestamp};\r\n\th={};\r\n\tbh={};\r\n\tb=",
            key.tag(),
            self.selector,
            signed_names.join(":"),
            BASE64.encode(body_hash),
        );
        let mut data = Vec::new();
        // RFC 6376 5.4.2: instances are taken from the bottom up.
        let mut used: HashMap<&str, usize> = HashMap::new();
        for name in &signed_names {
            let taken = used.entry(name).or_default();
            let instance = fields.iter().rev().filter(|(n, _)| n == name).nth(*taken);
            *taken += 1;
            if let Some((_, field)) = instance {
                data.extend_from_slice(&relaxed_header(field));
            }
        }
        let mut own = relaxed_header(unsigned.as_bytes());
        own.truncate(own.len() - 2);
        data.extend_from_slice(&own);
        let signature = BASE64.encode(key.sign(&data)?);
        let mut header = unsigned;
        for (n, piece) in signature.as_bytes().chunks(64).enumerate() {
            if n > 0 {
                header.push_str("\r\n\t ");
            }
            header.push_str(&String::from_utf8_lossy(piece));
        }
        header.push_str("\r\n");
        Ok(Some(header))
    }
}

/// Reads the message as the next hop will receive it: lines longer than
/// SMTP allows are folded on the way out (`DotStuffer`), so the signature
/// must cover the folded form or it would break in transit.
struct AsSent<'a> {
    inner: &'a mut dyn Read,
    folder: crate::protocol::client::DotStuffer,
    pending: Vec<u8>,
    at: usize,
    done: bool,
    /// On the heap: signing runs on a session thread's small stack.
    chunk: Vec<u8>,
}

impl Read for AsSent<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.pending.len() {
            if self.done {
                return Ok(0);
            }
            let n = self.inner.read(&mut self.chunk)?;
            self.pending.clear();
            self.at = 0;
            if n == 0 {
                self.done = true;
                return Ok(0);
            }
            self.folder.push(&self.chunk[..n], &mut self.pending);
        }
        let n = out.len().min(self.pending.len() - self.at);
        out[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The header section (up to the empty line) and the SHA-256 of the
/// relaxed body, reading `content` in chunks, folded as it will be sent.
fn read_message(
    content: &mut dyn Read,
    max_header_section: usize,
) -> Result<(Vec<u8>, Vec<u8>), DkimError> {
    let content = &mut AsSent {
        inner: content,
        folder: crate::protocol::client::DotStuffer::folding_only(),
        pending: Vec::new(),
        at: 0,
        done: false,
        chunk: vec![0u8; 16 * 1024],
    };
    let mut headers = Vec::new();
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut body = RelaxedBody::default();
    let mut in_body = false;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut canonical = Vec::new();
    loop {
        let n = content
            .read(&mut chunk)
            .map_err(|e| DkimError(format!("cannot read the message: {e}")))?;
        if n == 0 {
            break;
        }
        let mut rest = &chunk[..n];
        if !in_body {
            headers.extend_from_slice(rest);
            match find_body(&headers) {
                Some(start) => {
                    rest = &[];
                    let tail = headers.split_off(start);
                    canonical.clear();
                    body.push(&tail, &mut canonical);
                    hasher.update(&canonical);
                    in_body = true;
                }
                None if headers.len() > max_header_section => {
                    return Err(DkimError("header section too large to sign".into()));
                }
                None => continue,
            }
        }
        canonical.clear();
        body.push(rest, &mut canonical);
        hasher.update(&canonical);
    }
    canonical.clear();
    body.finish(&mut canonical);
    hasher.update(&canonical);
    Ok((headers, hasher.finish().as_ref().to_vec()))
}

/// Where the body starts: after the first empty line.
pub(crate) fn find_body(section: &[u8]) -> Option<usize> {
    if section.starts_with(b"\r\n") {
        return Some(2);
    }
    memchr::memmem::find(section, b"\r\n\r\n").map(|at| at + 4)
}

/// The fields of a header section, each with its lower-case name and its
/// whole text (continuation lines included).
pub(crate) fn header_fields(section: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = Vec::new();
    for line in section.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            if let Some((_, field)) = fields.last_mut() {
                field.extend_from_slice(line);
            }
            continue;
        }
        if line == b"\r\n" {
            break;
        }
        let name = line
            .iter()
            .position(|&b| b == b':')
            .map(|colon| {
                String::from_utf8_lossy(&line[..colon])
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        fields.push((name, line.to_vec()));
    }
    fields
}

fn load_key(path: &Path) -> Result<Key, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))?;
    let invalid = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    match der {
        PrivateKeyDer::Pkcs8(pkcs8) => {
            let der = pkcs8.secret_pkcs8_der();
            // An ed25519 key, or an RSA key in PKCS#8 (as openssl writes).
            match Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                Ok(key) => Ok(Key::Ed25519(key)),
                Err(_) => RsaKeyPair::from_pkcs8(der)
                    .map(Key::Rsa)
                    .map_err(|e| invalid(&e)),
            }
        }
        PrivateKeyDer::Pkcs1(pkcs1) => RsaKeyPair::from_der(pkcs1.secret_pkcs1_der())
            .map(Key::Rsa)
            .map_err(|e| invalid(&e)),
        _ => Err(format!(
            "{}: an ed25519 or RSA key is needed",
            path.display()
        )),
    }
}

/// Makes a key for `domain` (written 0600; an existing one is never
/// replaced) and returns its path and the TXT record to publish.
pub fn generate(
    dir: &Path,
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
) -> Result<(PathBuf, String), DkimError> {
    let path = key_path(dir, domain, selector);
    if path.exists() {
        return Err(DkimError(format!(
            "{} exists; use another --selector for a new key (README: key rollover)",
            path.display()
        )));
    }
    let failed = |e: &dyn std::fmt::Display| DkimError(format!("cannot generate a key: {e}"));
    let pem = match algorithm {
        Algorithm::Ed25519 => {
            let pkcs8 =
                Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|e| failed(&e))?;
            pem("PRIVATE KEY", pkcs8.as_ref())
        }
        Algorithm::Rsa => {
            use rsa::pkcs8::EncodePrivateKey as _;
            let private =
                rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).map_err(|e| failed(&e))?;
            let pkcs8 = private.to_pkcs8_der().map_err(|e| failed(&e))?;
            pem("PRIVATE KEY", pkcs8.as_bytes())
        }
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| DkimError(format!("cannot create {}: {e}", dir.display())))?;
    write_private(&path, &pem)?;
    // The record comes from the key as it will be loaded for signing.
    let key = load_key(&path).map_err(DkimError)?;
    let record = format!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        txt_strings(&key.record())
    );
    Ok((path, record))
}

/// SEQUENCE { SEQUENCE { rsaEncryption, NULL }, BIT STRING { key } }
fn spki_of_rsa(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = RSA_ENCRYPTION.to_vec();
    body.extend_from_slice(&der(0x03, &bits));
    der(0x30, &body)
}

/// One DER element: tag, definite length, content.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = content.len().to_be_bytes();
    let significant: Vec<u8> = length.iter().copied().skip_while(|b| *b == 0).collect();
    match significant.as_slice() {
        [] => out.push(0),
        [small] if *small < 0x80 => out.push(*small),
        bytes => {
            out.push(0x80 | bytes.len() as u8);
            out.extend_from_slice(bytes);
        }
    }
    out.extend_from_slice(content);
    out
}

fn pem(label: &str, der: &[u8]) -> String {
    let encoded = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A TXT value as quoted strings of at most 255 octets (RFC 1035 3.3.14):
/// an RSA key does not fit in one.
pub fn txt_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|part| format!("\"{}\"", String::from_utf8_lossy(part)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_private(path: &Path, text: &str) -> Result<(), DkimError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DkimError(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| DkimError(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_and_sign_with_both_algorithms() {
        let dir = tempfile::tempdir().unwrap();
        for (domain, algorithm, k) in [
            ("ed.example", Algorithm::Ed25519, "k=ed25519"),
            ("rsa.example", Algorithm::Rsa, "k=rsa"),
        ] {
            let (path, record) = generate(dir.path(), domain, "s1", algorithm).unwrap();
            if algorithm == Algorithm::Rsa {
                // The SubjectPublicKeyInfo petrel wraps is what RustCrypto
                // makes of the same key.
                use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
                let pem = std::fs::read_to_string(&path).unwrap();
                let private = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).unwrap();
                let spki = private.to_public_key().to_public_key_der().unwrap();
                let p = BASE64.encode(spki.as_bytes());
                assert!(record.replace("\" \"", "").contains(&p), "{record}");
            }
            let expected = format!("s1._domainkey.{domain}. IN TXT \"v=DKIM1; {k}; p=");
            assert!(record.starts_with(&expected), "{record}");
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert!(
                generate(dir.path(), domain, "s1", algorithm).is_err(),
                "an existing key is never replaced"
            );
        }
        let mut config = Config::default();
        config.domains.local = vec![
            "ed.example".into(),
            "rsa.example".into(),
            "none.example".into(),
        ];
        config.dkim.selector = "s1".into();
        config.dkim.key_dir = Some(dir.path().to_path_buf());
        let signer = Signer::load(&config).unwrap();
        assert_eq!(signer.domains(), vec!["ed.example", "rsa.example"]);
        let message = b"From: a@ed.example\r\nSubject: hi\r\n\r\nbody\r\n";
        let now = std::time::SystemTime::now();
        let header = signer
            .sign("ED.example", &mut &message[..], now)
            .unwrap()
            .unwrap();
        assert!(
            header.starts_with(
                "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=ed.example;"
            ),
            "{header}"
        );
        assert!(header.contains("h=from:from:subject;"), "{header}");
        assert!(header.ends_with("\r\n"));
        let header = signer
            .sign("rsa.example", &mut &message[..], now)
            .unwrap()
            .unwrap();
        assert!(header.contains("a=rsa-sha256"), "{header}");
        assert!(
            signer
                .sign("none.example", &mut &message[..], now)
                .unwrap()
                .is_none()
        );
        config.dkim.domains = vec!["none.example".into()];
        let error = Signer::load(&config).err().unwrap().to_string();
        assert!(
            error.contains("petrel dkim generate none.example"),
            "{error}"
        );
    }

    #[test]
    fn fields_keep_their_continuation_lines() {
        let fields = header_fields(b"Subject: a\r\n  b\r\nFrom: x\r\n\r\n");
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[0].0, "subject");
        assert_eq!(fields[0].1, b"Subject: a\r\n  b\r\n");
        assert_eq!(fields[1].0, "from");
    }
}
