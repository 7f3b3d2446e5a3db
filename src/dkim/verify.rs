//! DKIM verification (RFC 6376, with RFC 8301's algorithm rules and
//! RFC 8463's ed25519-sha256) of inbound mail: every result RFC 8601 can
//! report, never an error for a malformed signature or key (those are
//! `permerror`), and a temporary result only for a DNS failure.
//!
//! Bounded work per message, linear in its size with small constants: at
//! most [`MAX_SIGNATURES`] signatures are looked at, each of at most
//! [`MAX_SIGNATURE_FIELD`] octets, [`MAX_TAGS`] tags and
//! [`MAX_SIGNED_FIELDS`] `h=` entries; the header fields are indexed once
//! per message (a message with more than [`MAX_HEADER_FIELDS`] is not
//! verified at all), so each `h=` entry costs one lookup, not a scan; and
//! each body is read once, hashed for all signatures side by side. Past a
//! bound, the signature is a `permerror` at once, as RFC 6376 allows a
//! verifier that limits what it accepts.

use std::collections::HashMap;
use std::io::Read;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, UnparsedPublicKey};

use super::canonical::{RelaxedBody, relaxed_header};
use super::{find_body, header_fields};
use crate::mailauth::Lookups;

/// A message with more signatures than this is unusual; the rest are not
/// verified (each costs a DNS query and a body hash).
pub const MAX_SIGNATURES: usize = 5;
/// A DKIM-Signature field longer than this is refused unparsed: a 4096-bit
/// RSA signature is 700 octets, and a long h= list of real mail well
/// under 2 KiB.
pub const MAX_SIGNATURE_FIELD: usize = 16 * 1024;
/// Tags in one tag list (signature or key record): RFC 6376 defines 14.
pub const MAX_TAGS: usize = 64;
/// Entries in h=: real signers list a dozen or two, oversigning included.
pub const MAX_SIGNED_FIELDS: usize = 256;
/// Header fields of a message worth verifying: real mail has well under
/// a hundred (the Received: fields of 50 hops included).
pub const MAX_HEADER_FIELDS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimResult {
    Pass,
    Fail,
    Neutral,
    TempError,
    PermError,
}

impl DkimResult {
    pub fn name(self) -> &'static str {
        match self {
            DkimResult::Pass => "pass",
            DkimResult::Fail => "fail",
            DkimResult::Neutral => "neutral",
            DkimResult::TempError => "temperror",
            DkimResult::PermError => "permerror",
        }
    }
}

/// The verdict on one signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimOutcome {
    pub result: DkimResult,
    /// d= (lower case); empty when the signature had none.
    pub domain: String,
    /// s=
    pub selector: String,
    /// The first 8 characters of b= (RFC 6008 header.b), to tell
    /// signatures of one domain apart.
    pub signature_start: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    RsaSha256,
    Ed25519Sha256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Canonicalization {
    Simple,
    Relaxed,
}

#[derive(Debug)]
struct Signature {
    algorithm: Algorithm,
    signature: Vec<u8>,
    body_hash: Vec<u8>,
    header_canon: Canonicalization,
    body_canon: Canonicalization,
    domain: String,
    selector: String,
    signed_headers: Vec<String>,
    /// The i= domain, when given.
    identity_domain: Option<String>,
    body_length: Option<u64>,
    /// The whole field as it came, for the signed data.
    field: Vec<u8>,
}

/// A message's header section, split into fields, and the first octets
/// of its body (read with it).
pub struct HeaderSection {
    pub fields: Vec<(String, Vec<u8>)>,
    pub body_start: Vec<u8>,
}

/// Reads the header section of `message`, which is left at the body.
pub fn read_header_section(
    message: &mut dyn Read,
    max_header_section: usize,
) -> std::io::Result<HeaderSection> {
    let mut headers = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut body_start = Vec::new();
    loop {
        let n = message.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        headers.extend_from_slice(&chunk[..n]);
        if let Some(start) = find_body(&headers) {
            body_start = headers.split_off(start);
            break;
        }
        if headers.len() > max_header_section {
            return Err(std::io::Error::other("header section too large to verify"));
        }
    }
    Ok(HeaderSection {
        fields: header_fields(&headers),
        body_start,
    })
}

/// Verifies the DKIM signatures of a message: `section` as read by
/// [`read_header_section`], `body` the rest. `Err` only when the message
/// cannot be read.
pub fn verify(
    lookups: &dyn Lookups,
    section: &HeaderSection,
    body: &mut dyn Read,
    now: SystemTime,
) -> std::io::Result<Vec<DkimOutcome>> {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (mut outcomes, mut pending) = parse_signatures(&section.fields, now);
    if pending.is_empty() {
        return Ok(outcomes);
    }
    let mut hashers: Vec<&mut BodyHasher> = pending.iter_mut().map(|p| &mut p.hasher).collect();
    hash_body(&section.body_start, body, &mut hashers)?;
    // After one key lookup fails for want of DNS, the others are not
    // tried: a dead name server costs one timeout, not one per signature.
    let mut dns_failure: Option<String> = None;
    let field_index = FieldIndex::new(&section.fields);
    for Pending {
        index,
        signature,
        hasher,
    } in pending
    {
        let (result, reason) = match hasher.finish() {
            None => (
                DkimResult::PermError,
                "l= is longer than the body".to_string(),
            ),
            Some(hash) if hash != signature.body_hash => {
                (DkimResult::Fail, "body hash did not verify".to_string())
            }
            Some(_) => match &dns_failure {
                Some(why) => (
                    DkimResult::TempError,
                    format!("key not looked up after {why}"),
                ),
                None => check_signature(lookups, &signature, &field_index),
            },
        };
        if result == DkimResult::TempError && dns_failure.is_none() {
            dns_failure = Some(reason.clone());
        }
        outcomes[index].result = result;
        outcomes[index].reason = reason;
    }
    Ok(outcomes)
}

/// A signature that parsed, waiting for its body hash; `index` is its
/// outcome's.
struct Pending {
    index: usize,
    signature: Signature,
    hasher: BodyHasher,
}

/// An outcome for each of the first [`MAX_SIGNATURES`] signature fields
/// (a permanent error for those that do not parse), and the ones to
/// verify.
fn parse_signatures(fields: &[(String, Vec<u8>)], now: u64) -> (Vec<DkimOutcome>, Vec<Pending>) {
    let mut outcomes = Vec::new();
    let mut pending = Vec::new();
    let too_many_fields = fields.len() > MAX_HEADER_FIELDS;
    for (_, field) in fields
        .iter()
        .filter(|(name, _)| name == "dkim-signature")
        .take(MAX_SIGNATURES)
    {
        let tags = if field.len() > MAX_SIGNATURE_FIELD {
            Err(format!(
                "signature field longer than {MAX_SIGNATURE_FIELD} octets"
            ))
        } else if too_many_fields {
            Err(format!(
                "more than {MAX_HEADER_FIELDS} header fields; not verified"
            ))
        } else {
            parse_tags(field_value(field))
        };
        let mut outcome = DkimOutcome {
            result: DkimResult::PermError,
            domain: tag(&tags, "d").unwrap_or_default().to_ascii_lowercase(),
            selector: tag(&tags, "s").unwrap_or_default().to_string(),
            signature_start: tag(&tags, "b")
                .map(|b| strip_whitespace(b).chars().take(8).collect())
                .unwrap_or_default(),
            reason: String::new(),
        };
        match tags.and_then(|tags| parse_signature(&tags, field, now)) {
            Ok(signature) => pending.push(Pending {
                index: outcomes.len(),
                hasher: BodyHasher::new(signature.body_canon, signature.body_length),
                signature,
            }),
            Err(why) => outcome.reason = why,
        }
        outcomes.push(outcome);
    }
    (outcomes, pending)
}

/// Passes the body (`start`, then the rest from `body`) through every
/// hasher, one read at a time.
fn hash_body(
    start: &[u8],
    body: &mut dyn Read,
    hashers: &mut [&mut BodyHasher],
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    for hasher in hashers.iter_mut() {
        hasher.push(start);
    }
    loop {
        let n = body.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        for hasher in hashers.iter_mut() {
            hasher.push(&chunk[..n]);
        }
    }
}

fn check_signature(
    lookups: &dyn Lookups,
    signature: &Signature,
    fields: &FieldIndex<'_>,
) -> (DkimResult, String) {
    let name = format!("{}._domainkey.{}", signature.selector, signature.domain);
    let texts = match lookups.txt(&name) {
        Ok(texts) => texts,
        Err(failure) => return (DkimResult::TempError, format!("key lookup: {failure}")),
    };
    let Some(text) = texts.first() else {
        return (DkimResult::PermError, format!("no key at {name}"));
    };
    let key = match parse_key(text, signature) {
        Ok(key) => key,
        Err(why) => return (DkimResult::PermError, why),
    };
    let data = signed_data(signature, fields);
    let verified = match signature.algorithm {
        Algorithm::RsaSha256 => {
            UnparsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, &key)
                .verify(&data, &signature.signature)
        }
        // RFC 8463 3: Ed25519 signs the SHA-256 hash of the data.
        Algorithm::Ed25519Sha256 => {
            let hash = ring::digest::digest(&ring::digest::SHA256, &data);
            UnparsedPublicKey::new(&ED25519, &key).verify(hash.as_ref(), &signature.signature)
        }
    };
    match verified {
        Ok(()) => (DkimResult::Pass, "signature verified".to_string()),
        Err(_) => (DkimResult::Fail, "signature did not verify".to_string()),
    }
}

/// Where each header field name occurs, built once per message: an h=
/// entry is then one lookup, whatever the number of fields.
struct FieldIndex<'a> {
    fields: &'a [(String, Vec<u8>)],
    by_name: HashMap<&'a str, Vec<usize>>,
}

impl<'a> FieldIndex<'a> {
    fn new(fields: &'a [(String, Vec<u8>)]) -> FieldIndex<'a> {
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        for (position, (name, _)) in fields.iter().enumerate() {
            by_name.entry(name.as_str()).or_default().push(position);
        }
        FieldIndex { fields, by_name }
    }

    /// The `nth` instance of `name` counted from the bottom.
    fn nth_from_bottom(&self, name: &str, nth: usize) -> Option<&'a [u8]> {
        let positions = self.by_name.get(name)?;
        let position = positions.iter().rev().nth(nth)?;
        Some(&self.fields[*position].1)
    }
}

/// The header hash input (RFC 6376 3.7): the signed fields, each
/// instance taken from the bottom up, then the signature field itself
/// with b= empty and without its final CRLF.
fn signed_data(signature: &Signature, fields: &FieldIndex<'_>) -> Vec<u8> {
    let canonical = |field: &[u8]| match signature.header_canon {
        Canonicalization::Simple => field.to_vec(),
        Canonicalization::Relaxed => relaxed_header(field),
    };
    let mut data = Vec::new();
    let mut used: HashMap<&str, usize> = HashMap::new();
    for name in &signature.signed_headers {
        let taken = used.entry(name).or_default();
        let instance = fields.nth_from_bottom(name, *taken);
        *taken += 1;
        if let Some(field) = instance {
            data.extend_from_slice(&canonical(field));
        }
    }
    let mut own = canonical(&without_signature_value(&signature.field));
    if own.ends_with(b"\r\n") {
        own.truncate(own.len() - 2);
    }
    data.extend_from_slice(&own);
    data
}

/// The field with the value of its b= tag removed, all else as it came.
fn without_signature_value(field: &[u8]) -> Vec<u8> {
    let colon = field.iter().position(|&b| b == b':').map_or(0, |c| c + 1);
    let mut out = field[..colon].to_vec();
    let value = &field[colon..];
    let mut start = 0;
    while start <= value.len() {
        let end = value[start..]
            .iter()
            .position(|&b| b == b';')
            .map_or(value.len(), |at| start + at);
        let segment = &value[start..end];
        let name_start = segment
            .iter()
            .position(|b| !b" \t\r\n".contains(b))
            .unwrap_or(segment.len());
        let rest = &segment[name_start..];
        let is_b = rest.first() == Some(&b'b')
            && rest[1..]
                .iter()
                .find(|b| !b" \t\r\n".contains(b))
                .is_some_and(|&b| b == b'=');
        if is_b {
            let equals = name_start + rest.iter().position(|&b| b == b'=').unwrap_or(0);
            out.extend_from_slice(&segment[..=equals]);
            // Keep the field's own line end when b= is the last tag.
            if end == value.len() && segment.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        } else {
            out.extend_from_slice(segment);
        }
        if end < value.len() {
            out.push(b';');
        }
        start = end + 1;
    }
    out
}

fn field_value(field: &[u8]) -> &[u8] {
    let colon = field.iter().position(|&b| b == b':').map_or(0, |c| c + 1);
    &field[colon..]
}

fn strip_whitespace(value: &str) -> String {
    value.chars().filter(|c| !c.is_ascii_whitespace()).collect()
}

/// RFC 6376 3.2 tag=value list; a tag given twice is an error, and so
/// are more than [`MAX_TAGS`] tags (the duplicate check is then at most
/// that many comparisons per tag).
fn parse_tags(value: &[u8]) -> Result<Vec<(String, String)>, String> {
    let text = String::from_utf8_lossy(value);
    let mut tags: Vec<(String, String)> = Vec::new();
    for spec in text.split(';') {
        if tags.len() == MAX_TAGS {
            return Err(format!("more than {MAX_TAGS} tags"));
        }
        if spec.trim().is_empty() {
            continue;
        }
        let Some((name, value)) = spec.split_once('=') else {
            return Err(format!("malformed tag {:?}", spec.trim()));
        };
        let name = name.trim().to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("malformed tag name {name:?}"));
        }
        if tags.iter().any(|(n, _)| *n == name) {
            return Err(format!("tag {name}= given twice"));
        }
        tags.push((name, value.trim().to_string()));
    }
    Ok(tags)
}

fn tag<'a>(tags: &'a Result<Vec<(String, String)>, String>, name: &str) -> Option<&'a str> {
    tags.as_ref()
        .ok()?
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn parse_signature(tags: &[(String, String)], field: &[u8], now: u64) -> Result<Signature, String> {
    let tags = Tags(tags);
    if tags.required("v")? != "1" {
        return Err("v= is not 1".into());
    }
    let algorithm = match tags.required("a")?.to_ascii_lowercase().as_str() {
        "rsa-sha256" => Algorithm::RsaSha256,
        "ed25519-sha256" => Algorithm::Ed25519Sha256,
        "rsa-sha1" => return Err("rsa-sha1 is not accepted (RFC 8301)".into()),
        other => return Err(format!("unknown algorithm {other:?}")),
    };
    // In the order the tags were always checked: a broken signature
    // reports the same first error.
    let signature = tags.base64("b")?;
    let body_hash = tags.base64("bh")?;
    let (header_canon, body_canon) = match tags.get("c").map(str::to_ascii_lowercase) {
        None => (Canonicalization::Simple, Canonicalization::Simple),
        Some(c) => {
            let (header, body) = c.split_once('/').unwrap_or((c.as_str(), "simple"));
            (canonicalization(header)?, canonicalization(body)?)
        }
    };
    let domain = tags.required("d")?.to_ascii_lowercase();
    if domain.is_empty() {
        return Err("d= is empty".into());
    }
    let selector = tags.required("s")?.to_string();
    let signed_headers = signed_fields(tags.required("h")?)?;
    let identity_domain = identity_domain(tags.get("i"), &domain)?;
    if let Some(q) = tags.get("q")
        && !q
            .split(':')
            .any(|q| q.trim().eq_ignore_ascii_case("dns/txt"))
    {
        return Err(format!("unknown key query method {q:?}"));
    }
    let body_length = tags.number("l")?;
    let timestamp = tags.number("t")?;
    if let Some(expiry) = tags.number("x")? {
        if timestamp.is_some_and(|t| expiry < t) {
            return Err("x= is before t=".into());
        }
        if expiry < now {
            return Err("signature expired".into());
        }
    }
    Ok(Signature {
        algorithm,
        signature,
        body_hash,
        header_canon,
        body_canon,
        domain,
        selector,
        signed_headers,
        identity_domain,
        body_length,
        field: field.to_vec(),
    })
}

/// A signature's tags, as parsed (bounded in number by the parser).
struct Tags<'a>(&'a [(String, String)]);

impl Tags<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, name: &str) -> Result<&str, String> {
        self.get(name).ok_or_else(|| format!("no {name}= tag"))
    }

    fn base64(&self, name: &str) -> Result<Vec<u8>, String> {
        BASE64
            .decode(strip_whitespace(self.required(name)?))
            .map_err(|_| format!("{name}= is not base64"))
    }

    fn number(&self, name: &str) -> Result<Option<u64>, String> {
        self.get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("{name}= is not a number"))
            })
            .transpose()
    }
}

/// h=: the signed field names, at most [`MAX_SIGNED_FIELDS`], From among
/// them.
fn signed_fields(h: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = h
        .split(':')
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .take(MAX_SIGNED_FIELDS + 1)
        .collect();
    if names.len() > MAX_SIGNED_FIELDS {
        return Err(format!("h= lists more than {MAX_SIGNED_FIELDS} fields"));
    }
    if !names.iter().any(|name| name == "from") {
        return Err("h= does not sign From".into());
    }
    Ok(names)
}

/// i=: its domain, which must be d= or below it.
fn identity_domain(identity: Option<&str>, domain: &str) -> Result<Option<String>, String> {
    let Some(identity) = identity else {
        return Ok(None);
    };
    let (_, idomain) = identity
        .rsplit_once('@')
        .ok_or("i= has no domain".to_string())?;
    let idomain = idomain.to_ascii_lowercase();
    if idomain != domain && !idomain.ends_with(&format!(".{domain}")) {
        return Err("i= is not in the d= domain".into());
    }
    Ok(Some(idomain))
}

fn canonicalization(name: &str) -> Result<Canonicalization, String> {
    match name {
        "simple" => Ok(Canonicalization::Simple),
        "relaxed" => Ok(Canonicalization::Relaxed),
        other => Err(format!("unknown canonicalization {other:?}")),
    }
}

/// The public key of a key record (RFC 6376 3.6.1), in the form ring
/// verifies with: PKCS#1 RSAPublicKey, or the 32 octets of an Ed25519 key.
fn parse_key(text: &str, signature: &Signature) -> Result<Vec<u8>, String> {
    let tags = parse_tags(text.as_bytes()).map_err(|why| format!("key record: {why}"))?;
    let get = |name: &str| {
        tags.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(version) = get("v")
        && version != "DKIM1"
    {
        return Err("key record: v= is not DKIM1".into());
    }
    let kind = get("k").unwrap_or("rsa").to_ascii_lowercase();
    let expected = match signature.algorithm {
        Algorithm::RsaSha256 => "rsa",
        Algorithm::Ed25519Sha256 => "ed25519",
    };
    if kind != expected {
        return Err(format!("key is k={kind}, signature needs {expected}"));
    }
    if let Some(hashes) = get("h")
        && !hashes
            .split(':')
            .any(|h| h.trim().eq_ignore_ascii_case("sha256"))
    {
        return Err("key does not allow sha256".into());
    }
    if let Some(services) = get("s")
        && !services
            .split(':')
            .any(|s| matches!(s.trim(), "*" | "email"))
    {
        return Err("key is not for email".into());
    }
    if let Some(flags) = get("t")
        && flags.split(':').any(|f| f.trim() == "s")
        && signature
            .identity_domain
            .as_ref()
            .is_some_and(|i| *i != signature.domain)
    {
        return Err("key requires i= to be exactly d= (t=s)".into());
    }
    let public = get("p").ok_or("key record has no p=")?;
    let public = strip_whitespace(public);
    if public.is_empty() {
        return Err("key revoked".into());
    }
    let der = BASE64
        .decode(public)
        .map_err(|_| "key p= is not base64".to_string())?;
    match signature.algorithm {
        Algorithm::Ed25519Sha256 if der.len() == 32 => Ok(der),
        Algorithm::Ed25519Sha256 => Err("ed25519 key is not 32 octets".into()),
        // Keys are published as SubjectPublicKeyInfo; a bare RSAPublicKey
        // is taken too, as OpenDKIM does.
        Algorithm::RsaSha256 => Ok(rsa_key_of_spki(&der).unwrap_or(der)),
    }
}

/// The RSAPublicKey inside a SubjectPublicKeyInfo:
/// SEQUENCE { SEQUENCE { algorithm }, BIT STRING { 0, RSAPublicKey } }.
fn rsa_key_of_spki(der: &[u8]) -> Option<Vec<u8>> {
    let (tag, info, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, _, rest) = der_element(info)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, bits, _) = der_element(rest)?;
    if tag != 0x03 || bits.first() != Some(&0) {
        return None;
    }
    Some(bits[1..].to_vec())
}

/// One DER element: tag, contents, what follows.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *der.first()?;
    let first = *der.get(1)? as usize;
    let (length, header) = if first < 0x80 {
        (first, 2)
    } else {
        let octets = first & 0x7f;
        if octets == 0 || octets > 3 {
            return None;
        }
        let mut length = 0usize;
        for i in 0..octets {
            length = (length << 8) | *der.get(2 + i)? as usize;
        }
        (length, 2 + octets)
    };
    let contents = der.get(header..header + length)?;
    Some((tag, contents, &der[header + length..]))
}

/// Simple body canonicalization (RFC 6376 3.4.3): empty lines at the end
/// go, and a body ends with exactly one CRLF (an empty body is CRLF).
#[derive(Debug)]
struct SimpleBody {
    /// Empty lines held back until a line with content follows.
    pending: usize,
    at_line_start: bool,
    cr: bool,
    wrote: bool,
}

impl SimpleBody {
    fn new() -> SimpleBody {
        SimpleBody {
            pending: 0,
            at_line_start: true,
            cr: false,
            wrote: false,
        }
    }

    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        for &byte in chunk {
            if self.cr {
                self.cr = false;
                if byte == b'\n' {
                    if self.at_line_start {
                        self.pending += 1;
                    } else {
                        out.extend_from_slice(b"\r\n");
                    }
                    self.at_line_start = true;
                    continue;
                }
                self.octet(b'\r', out);
            }
            if byte == b'\r' {
                self.cr = true;
            } else {
                self.octet(byte, out);
            }
        }
    }

    fn octet(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.at_line_start {
            for _ in 0..self.pending {
                out.extend_from_slice(b"\r\n");
            }
            self.pending = 0;
            self.at_line_start = false;
        }
        self.wrote = true;
        out.push(byte);
    }

    fn finish(mut self, out: &mut Vec<u8>) {
        if self.cr {
            self.cr = false;
            self.octet(b'\r', out);
        }
        if !self.at_line_start || !self.wrote {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// One signature's body hash, fed the body in any chunks.
struct BodyHasher {
    canon: Result<SimpleBody, RelaxedBody>,
    limit: Option<u64>,
    hashed: u64,
    hash: ring::digest::Context,
    scratch: Vec<u8>,
}

impl BodyHasher {
    fn new(canon: Canonicalization, limit: Option<u64>) -> BodyHasher {
        BodyHasher {
            canon: match canon {
                Canonicalization::Simple => Ok(SimpleBody::new()),
                Canonicalization::Relaxed => Err(RelaxedBody::default()),
            },
            limit,
            hashed: 0,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            scratch: Vec::new(),
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.scratch.clear();
        match &mut self.canon {
            Ok(simple) => simple.push(chunk, &mut self.scratch),
            Err(relaxed) => relaxed.push(chunk, &mut self.scratch),
        }
        self.take_scratch();
    }

    fn take_scratch(&mut self) {
        let room = self
            .limit
            .map_or(self.scratch.len() as u64, |l| l.saturating_sub(self.hashed));
        let n = (self.scratch.len() as u64).min(room) as usize;
        self.hash.update(&self.scratch[..n]);
        self.hashed += n as u64;
    }

    /// The hash, or `None` when l= promised more body than there was.
    fn finish(mut self) -> Option<Vec<u8>> {
        self.scratch.clear();
        let canon = std::mem::replace(&mut self.canon, Err(RelaxedBody::default()));
        match canon {
            Ok(simple) => simple.finish(&mut self.scratch),
            Err(relaxed) => relaxed.finish(&mut self.scratch),
        }
        self.take_scratch();
        if self.limit.is_some_and(|l| l > self.hashed) {
            return None;
        }
        Some(self.hash.finish().as_ref().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(input: &[u8]) -> Vec<u8> {
        let mut canonical = SimpleBody::new();
        let mut out = Vec::new();
        canonical.push(input, &mut out);
        canonical.finish(&mut out);
        out
    }

    fn verify_text(dns: &crate::mailauth::tests::FakeDns, message: &[u8]) -> Vec<DkimOutcome> {
        let mut reader = message;
        let section = read_header_section(&mut reader, 64 * 1024).unwrap();
        verify(dns, &section, &mut reader, SystemTime::now()).unwrap()
    }

    #[test]
    fn petrels_own_signatures_verify_and_tampering_fails() {
        use crate::dkim::{Algorithm, Signer, generate};
        use crate::mailauth::tests::FakeDns;
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), "ed.example", "s1", Algorithm::Ed25519).unwrap();
        generate(dir.path(), "rsa.example", "s1", Algorithm::Rsa).unwrap();
        let mut config = crate::config::Config::default();
        config.domains.local = vec!["ed.example".into(), "rsa.example".into()];
        config.dkim.selector = "s1".into();
        config.dkim.key_dir = Some(dir.path().to_path_buf());
        let signer = Signer::load(&config).unwrap();
        for domain in ["ed.example", "rsa.example"] {
            let message = format!(
                "From: A <a@{domain}>\r\nSubject: a  long\r\n subject\r\n\r\nbody  text\r\n\r\n"
            );
            let header = signer
                .sign(domain, &mut message.as_bytes(), SystemTime::now())
                .unwrap()
                .unwrap();
            let signed = format!("{header}{message}");
            let dns = FakeDns::default().txt(
                &format!("s1._domainkey.{domain}"),
                &signer.record(domain).unwrap(),
            );
            let outcome = &verify_text(&dns, signed.as_bytes())[0];
            assert_eq!(outcome.result, DkimResult::Pass, "{domain}: {outcome:?}");
            assert_eq!(outcome.domain, domain);
            // Relaxed canonicalization survives re-folding and spacing.
            let refolded =
                signed.replace("Subject: a  long\r\n subject", "Subject: a long subject");
            let refolded = refolded.replace("body  text", "body text");
            assert_eq!(
                verify_text(&dns, refolded.as_bytes())[0].result,
                DkimResult::Pass
            );
            let body = signed.replace("body  text", "body texts");
            let outcome = &verify_text(&dns, body.as_bytes())[0];
            assert_eq!(outcome.result, DkimResult::Fail);
            assert_eq!(outcome.reason, "body hash did not verify");
            let subject = signed.replace("a  long", "a short");
            assert_eq!(
                verify_text(&dns, subject.as_bytes())[0].result,
                DkimResult::Fail
            );
            // A second From above the signed one breaks it (oversigning).
            let from = format!("{header}From: evil@x.example\r\n{message}");
            assert_eq!(
                verify_text(&dns, from.as_bytes())[0].result,
                DkimResult::Fail
            );
            let nokey = FakeDns::default();
            assert_eq!(
                verify_text(&nokey, signed.as_bytes())[0].result,
                DkimResult::PermError
            );
            let down = FakeDns::default().fail(&format!("s1._domainkey.{domain}"));
            assert_eq!(
                verify_text(&down, signed.as_bytes())[0].result,
                DkimResult::TempError
            );
            let kind = if domain.starts_with("ed") {
                "ed25519"
            } else {
                "rsa"
            };
            let revoked = FakeDns::default().txt(
                &format!("s1._domainkey.{domain}"),
                &format!("v=DKIM1; k={kind}; p="),
            );
            let outcome = &verify_text(&revoked, signed.as_bytes())[0];
            assert_eq!(
                (outcome.result, outcome.reason.as_str()),
                (DkimResult::PermError, "key revoked")
            );
        }
    }

    /// Each shape of hostile signature the review found (79 s of CPU for
    /// one message before the bounds), plus the largest one still
    /// verified: each costs a bounded, linear amount of work. Timed with a
    /// bound a quadratic walk could never meet, not as a measurement.
    #[test]
    fn hostile_signatures_are_refused_or_verified_quickly() {
        use crate::mailauth::tests::FakeDns;
        let body = "body\r\n";
        let body_hash = BASE64.encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()));
        let dns = FakeDns::default().txt(
            "s._domainkey.x.example",
            &format!("v=DKIM1; k=ed25519; p={}", BASE64.encode([7u8; 32])),
        );
        let signature = |h: &str, extra: &str| {
            format!(
                "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/simple; d=x.example; s=s;\r\n \
                 h={h}; bh={body_hash}; {extra}b=AAAA\r\n"
            )
        };
        let fields = |count: usize| "X-Filler: y\r\n".repeat(count);
        let many_tags: String = (0..115_000).map(|n| format!("t{n}=;")).collect();
        let seventy_tags: String = (0..70).map(|n| format!("t{n}=; ")).collect();
        let cases = [
            (
                "290k h= entries over 100k fields",
                signature(&"x-filler:".repeat(290_000), "") + &fields(100_000),
                DkimResult::PermError,
                "signature field longer than",
            ),
            (
                "115k distinct tags",
                signature("from", &many_tags) + &fields(10),
                DkimResult::PermError,
                "signature field longer than",
            ),
            (
                "70 tags",
                signature("from", &seventy_tags) + &fields(10),
                DkimResult::PermError,
                "more than 64 tags",
            ),
            (
                "257 h= entries",
                signature(&"x-filler:".repeat(257), "") + &fields(10),
                DkimResult::PermError,
                "h= lists more than 256 fields",
            ),
            (
                "a signature above 1,001 fields",
                signature("from", "") + &fields(1001),
                DkimResult::PermError,
                "more than 1000 header fields",
            ),
            (
                "the most work still done: 256 h= entries over 998 fields",
                signature(&format!("from:{}", "x-filler:".repeat(255)), "") + &fields(998),
                DkimResult::Fail,
                "signature did not verify",
            ),
        ];
        for (shape, header, result, reason) in cases {
            let message = format!("{header}From: a@x.example\r\n\r\n{body}");
            let started = std::time::Instant::now();
            let mut reader = message.as_bytes();
            let section = read_header_section(&mut reader, 8 << 20).unwrap();
            let outcomes = verify(&dns, &section, &mut reader, SystemTime::now()).unwrap();
            let took = started.elapsed();
            eprintln!("{shape}: {:?} in {took:?}", outcomes[0].result);
            assert_eq!(outcomes.len(), 1, "{shape}");
            assert_eq!(outcomes[0].result, result, "{shape}: {:?}", outcomes[0]);
            assert!(
                outcomes[0].reason.starts_with(reason),
                "{shape}: {:?}",
                outcomes[0]
            );
            assert!(
                took < std::time::Duration::from_secs(1),
                "{shape}: {took:?}"
            );
        }
    }

    #[test]
    fn malformed_signatures_are_permerrors() {
        let dns = crate::mailauth::tests::FakeDns::default();
        for signature in [
            "DKIM-Signature: v=1; a=rsa-sha256; d=x.example; s=s; h=subject; bh=; b=",
            "DKIM-Signature: v=1; a=rsa-sha1; d=x.example; s=s; h=from; bh=; b=",
            "DKIM-Signature: v=2; a=rsa-sha256; d=x.example; s=s; h=from; bh=; b=",
            "DKIM-Signature: v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=!!; b=",
            "DKIM-Signature: v=1; a=rsa-sha256; d=x.example; d=y.example",
            "DKIM-Signature: v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=; b=; x=1",
            "DKIM-Signature: garbage",
        ] {
            let message = format!("{signature}\r\nFrom: a@x.example\r\n\r\nbody\r\n");
            let outcomes = verify_text(&dns, message.as_bytes());
            assert_eq!(outcomes.len(), 1);
            assert_eq!(
                outcomes[0].result,
                DkimResult::PermError,
                "{signature}: {outcomes:?}"
            );
        }
        assert_eq!(dns.queries(), 0, "nothing malformed costs a lookup");
        let many = "DKIM-Signature: v=1; b=\r\n".repeat(20) + "From: a@x.example\r\n\r\n";
        assert_eq!(verify_text(&dns, many.as_bytes()).len(), MAX_SIGNATURES);
    }

    #[test]
    fn simple_body_as_the_rfc_example() {
        // RFC 6376 3.4.5.
        assert_eq!(
            simple(b" C \r\nD \t E\r\n\r\n\r\n"),
            b" C \r\nD \t E\r\n".to_vec()
        );
        assert_eq!(simple(b""), b"\r\n");
        assert_eq!(simple(b"\r\n\r\n"), b"\r\n");
        assert_eq!(simple(b"a\r\n\r\nb"), b"a\r\n\r\nb\r\n");
        for split in 0..12 {
            let input = b"x\r\n\r\ny\r\r\n\r\n";
            let mut canonical = SimpleBody::new();
            let mut out = Vec::new();
            canonical.push(&input[..split], &mut out);
            canonical.push(&input[split..], &mut out);
            canonical.finish(&mut out);
            assert_eq!(out, simple(input), "split at {split}");
        }
    }

    #[test]
    fn the_signature_value_is_removed_and_nothing_else() {
        let field =
            b"DKIM-Signature: v=1; a=rsa-sha256; bh=abc=;\r\n\tb=Zm9v\r\n  YmFy; d=x.example\r\n";
        assert_eq!(
            without_signature_value(field),
            b"DKIM-Signature: v=1; a=rsa-sha256; bh=abc=;\r\n\tb=; d=x.example\r\n".to_vec()
        );
        let last = b"DKIM-Signature: d=x.example; b = Zm9v\r\n";
        assert_eq!(
            without_signature_value(last),
            b"DKIM-Signature: d=x.example; b =\r\n".to_vec()
        );
    }

    #[test]
    fn tags_given_twice_or_malformed_are_errors() {
        assert!(parse_tags(b" v=1; d=a; d=b").is_err());
        assert!(parse_tags(b" v=1; nonsense").is_err());
        assert_eq!(
            parse_tags(b" v = 1 ;\r\n\td=example.org;").unwrap(),
            vec![("v".into(), "1".into()), ("d".into(), "example.org".into())]
        );
    }

    #[test]
    fn a_body_length_limit_counts_canonical_octets() {
        let mut hasher = BodyHasher::new(Canonicalization::Simple, Some(5));
        hasher.push(b"abc\r\nextra\r\n");
        let limited = hasher.finish().unwrap();
        assert_eq!(
            limited,
            ring::digest::digest(&ring::digest::SHA256, b"abc\r\n").as_ref()
        );
        let mut short = BodyHasher::new(Canonicalization::Simple, Some(50));
        short.push(b"abc\r\n");
        assert_eq!(short.finish(), None);
    }
}
