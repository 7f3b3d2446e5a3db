//! Mailbox and domain syntax per RFC 5321 4.1.2 / 4.1.3, with the UTF-8
//! extensions of RFC 6531 (SMTPUTF8). Pure parsing: no DNS, no policy.
//!
//! Limits are those of RFC 5321 4.5.3.1: local-part 64 octets, domain 255
//! octets, path 256 octets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use unicode_normalization::UnicodeNormalization as _;

pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;
pub const MAX_PATH: usize = 256;
const MAX_LABEL: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    Empty,
    MissingAt,
    LocalPartTooLong,
    DomainTooLong,
    PathTooLong,
    BadLocalPart,
    BadDomain(&'static str),
    BadPath,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::Empty => f.write_str("empty address"),
            AddressError::MissingAt => f.write_str("address has no @domain"),
            AddressError::LocalPartTooLong => {
                write!(f, "local part longer than {MAX_LOCAL_PART} octets")
            }
            AddressError::DomainTooLong => write!(f, "domain longer than {MAX_DOMAIN} octets"),
            AddressError::PathTooLong => write!(f, "path longer than {MAX_PATH} octets"),
            AddressError::BadLocalPart => f.write_str("invalid characters in local part"),
            AddressError::BadDomain(why) => write!(f, "invalid domain: {why}"),
            AddressError::BadPath => f.write_str("path must be written as <local@domain>"),
        }
    }
}

impl std::error::Error for AddressError {}

/// A domain name or address literal, stored in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    pub fn parse(text: &str) -> Result<Domain, AddressError> {
        if text.is_empty() {
            return Err(AddressError::BadDomain("empty"));
        }
        if text.len() > MAX_DOMAIN {
            return Err(AddressError::DomainTooLong);
        }
        if text.starts_with('[') {
            parse_address_literal(text)?;
            return Ok(Domain(text.to_ascii_lowercase()));
        }
        for label in text.split('.') {
            check_label(label)?;
        }
        Ok(Domain(text.nfc().collect::<String>().to_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_ascii(&self) -> bool {
        self.0.is_ascii()
    }

    /// `[192.0.2.1]` or `[IPv6:2001:db8::1]`, which name a host directly.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        parse_address_literal(&self.0).ok().flatten()
    }

    pub fn eq_ignore_case(&self, other: &str) -> bool {
        self.0 == other.to_lowercase()
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_label(label: &str) -> Result<(), AddressError> {
    if label.is_empty() {
        return Err(AddressError::BadDomain("empty label"));
    }
    if label.len() > MAX_LABEL {
        return Err(AddressError::BadDomain("label longer than 63 octets"));
    }
    // Let-dig [Ldh-str]; non-ASCII characters count as letters (U-labels,
    // RFC 6531), whether the session may use them is the caller's question.
    let let_dig = |c: char| c.is_ascii_alphanumeric() || !c.is_ascii();
    let first = label.chars().next().unwrap_or('-');
    let last = label.chars().next_back().unwrap_or('-');
    if !let_dig(first) || !let_dig(last) {
        return Err(AddressError::BadDomain(
            "a label must start and end with a letter or digit",
        ));
    }
    if !label.chars().all(|c| let_dig(c) || c == '-') {
        return Err(AddressError::BadDomain(
            "only letters, digits and hyphens are allowed",
        ));
    }
    Ok(())
}

/// Returns the IP of a literal; `Ok(None)` for a General-address-literal
/// (RFC 5321 4.1.3), which is syntactically fine but names nothing we use.
fn parse_address_literal(text: &str) -> Result<Option<IpAddr>, AddressError> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or(AddressError::BadDomain("unterminated address literal"))?;
    if let Some(v6) = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
    {
        return v6
            .parse::<Ipv6Addr>()
            .map(|ip| Some(IpAddr::V6(ip)))
            .map_err(|_| AddressError::BadDomain("bad IPv6 address literal"));
    }
    if let Ok(v4) = inner.parse::<Ipv4Addr>() {
        return Ok(Some(IpAddr::V4(v4)));
    }
    match inner.split_once(':') {
        Some((tag, content))
            if !tag.is_empty()
                && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !content.is_empty()
                && content.chars().all(|c| matches!(c, '!'..='Z' | '^'..='~')) =>
        {
            Ok(None)
        }
        _ => Err(AddressError::BadDomain("bad address literal")),
    }
}

/// A mailbox `local-part@domain`. The local part keeps its case (RFC 5321
/// 2.4: only the destination host may interpret it); the domain is lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    local: String,
    domain: Domain,
}

impl Address {
    pub fn parse(text: &str) -> Result<Address, AddressError> {
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        let at = find_domain_separator(text)?;
        let (local, domain) = (&text[..at], &text[at + 1..]);
        if local.len() > MAX_LOCAL_PART {
            return Err(AddressError::LocalPartTooLong);
        }
        check_local_part(local)?;
        let domain = Domain::parse(domain)?;
        Ok(Address {
            local: local.to_string(),
            domain,
        })
    }

    pub fn local_part(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// The canonical mailbox key of this address: the one form in which
    /// accounts, aliases, Maildirs and stored routes name a mailbox of ours.
    /// The local part loses quotes it did not need (`"alice"@` is `alice@`,
    /// RFC 5321 4.1.2), is put in Unicode NFC (RFC 5198) and lower-cased
    /// with Unicode rules, so `ALICE@`, `Alice@` and `JÖSÉ@` reach `alice@`
    /// and `jösé@`. Nothing else in petrel normalises an address.
    pub fn mailbox_key(&self) -> String {
        let local = match unquoted(&self.local) {
            Some(unquoted) => unquoted,
            None => self.local.clone(),
        };
        // ASCII text is already in NFC: skip the normaliser (the common case).
        if local.is_ascii() && self.domain.is_ascii() {
            return format!("{}@{}", local.to_ascii_lowercase(), self.domain.0);
        }
        let local: String = local.nfc().collect::<String>().to_lowercase();
        let domain: String = self.domain.0.nfc().collect();
        format!("{local}@{domain}")
    }

    /// True for `postmaster@…` in any case (RFC 5321 4.5.1).
    pub fn is_postmaster(&self) -> bool {
        self.local.eq_ignore_ascii_case("postmaster")
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The dot-string a quoted local part stands for, when it needs no quotes
/// (`"john.doe"` is `john.doe`; `"john doe"` stays quoted).
fn unquoted(local: &str) -> Option<String> {
    let body = local.strip_prefix('"')?.strip_suffix('"')?;
    let mut plain = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        plain.push(if c == '\\' { chars.next()? } else { c });
    }
    let is_dot_string = plain
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext));
    is_dot_string.then_some(plain)
}

/// The `@` that separates local part and domain: the last one outside a
/// quoted local part.
fn find_domain_separator(text: &str) -> Result<usize, AddressError> {
    if text.starts_with('"') {
        let bytes = text.as_bytes();
        let mut i = 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    return if bytes.get(i + 1) == Some(&b'@') {
                        Ok(i + 1)
                    } else {
                        Err(AddressError::MissingAt)
                    };
                }
                _ => i += 1,
            }
        }
        return Err(AddressError::BadLocalPart);
    }
    text.rfind('@').ok_or(AddressError::MissingAt)
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || "!#$%&'*+-/=?^_`{|}~".contains(c)
        || !c.is_ascii() && !c.is_control()
}

fn check_local_part(local: &str) -> Result<(), AddressError> {
    if local.is_empty() {
        return Err(AddressError::BadLocalPart);
    }
    if let Some(quoted) = local.strip_prefix('"') {
        let body = quoted.strip_suffix('"').ok_or(AddressError::BadLocalPart)?;
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(' '..='~') => {}
                    _ => return Err(AddressError::BadLocalPart),
                },
                '"' => return Err(AddressError::BadLocalPart),
                ' '..='~' => {}
                c if !c.is_ascii() && !c.is_control() => {}
                _ => return Err(AddressError::BadLocalPart),
            }
        }
        return Ok(());
    }
    // Dot-string: atoms separated by single dots, no leading/trailing dot.
    if local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
    {
        Ok(())
    } else {
        Err(AddressError::BadLocalPart)
    }
}

/// A reverse-path (`MAIL FROM`) may be the null path `<>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Mailbox(Address),
}

impl ReversePath {
    pub fn address(&self) -> Option<&Address> {
        match self {
            ReversePath::Null => None,
            ReversePath::Mailbox(address) => Some(address),
        }
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(address) => address.fmt(f),
        }
    }
}

/// Parses `<mailbox>` (with an optional, ignored source route, RFC 5321
/// 4.1.1.3 / C) into an address. The caller handles `<>`.
pub fn parse_path(path: &str) -> Result<Address, AddressError> {
    if path.len() > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    let inner = path
        .strip_prefix('<')
        .and_then(|p| p.strip_suffix('>'))
        .ok_or(AddressError::BadPath)?;
    let mailbox = match inner.strip_prefix('@') {
        // A-d-l: "@relay1,@relay2:user@host"; the route is obsolete and ignored.
        Some(_) => inner
            .split_once(':')
            .map(|(_, mailbox)| mailbox)
            .ok_or(AddressError::BadPath)?,
        None => inner,
    };
    Address::parse(mailbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_addresses() {
        for text in [
            "alice@example.com",
            "a.b.c@example.com",
            "first+tag@sub.example.co.uk",
            "x@localhost",
            "\"john doe\"@example.com",
            "\"a\\\"b\"@example.com",
            "user@[192.0.2.1]",
            "user@[IPv6:2001:db8::1]",
            "o'brien@example.ie",
            "用户@例子.广告",
            "a@xn--bcher-kva.example",
        ] {
            assert!(Address::parse(text).is_ok(), "{text} should parse");
        }
    }

    #[test]
    fn invalid_addresses() {
        for (text, error) in [
            ("", AddressError::Empty),
            ("alice", AddressError::MissingAt),
            ("@example.com", AddressError::BadLocalPart),
            (".alice@example.com", AddressError::BadLocalPart),
            ("al..ice@example.com", AddressError::BadLocalPart),
            ("alice.@example.com", AddressError::BadLocalPart),
            ("al ice@example.com", AddressError::BadLocalPart),
            ("al(ice@example.com", AddressError::BadLocalPart),
            ("\"unterminated@example.com", AddressError::BadLocalPart),
            ("alice@", AddressError::BadDomain("empty")),
            (
                "alice@-example.com",
                AddressError::BadDomain("a label must start and end with a letter or digit"),
            ),
            (
                "alice@exa_mple.com",
                AddressError::BadDomain("only letters, digits and hyphens are allowed"),
            ),
            ("alice@example..com", AddressError::BadDomain("empty label")),
            (
                "alice@[300.1.1.1]",
                AddressError::BadDomain("bad address literal"),
            ),
        ] {
            assert_eq!(Address::parse(text), Err(error), "{text}");
        }
    }

    #[test]
    fn rfc5321_length_limits() {
        let local64 = "a".repeat(64);
        assert!(Address::parse(&format!("{local64}@example.com")).is_ok());
        assert_eq!(
            Address::parse(&format!("{local64}b@example.com")),
            Err(AddressError::LocalPartTooLong)
        );
        let label63 = "b".repeat(63);
        assert!(Address::parse(&format!("a@{label63}.com")).is_ok());
        assert!(Address::parse(&format!("a@{label63}c.com")).is_err());
        // 4 labels of 63 + 3 dots = 255 octets: the longest domain.
        let domain255 = [label63.as_str(); 4].join(".");
        assert_eq!(domain255.len(), 255);
        assert!(Domain::parse(&domain255).is_ok());
        assert_eq!(
            Domain::parse(&format!("a{domain255}")),
            Err(AddressError::DomainTooLong)
        );
        // A path over 256 octets is refused even if its parts fit.
        let long_path = format!("<{local64}@{}>", [label63.as_str(); 3].join("."));
        assert!(long_path.len() > 256);
        assert_eq!(parse_path(&long_path), Err(AddressError::PathTooLong));
    }

    #[test]
    fn domains_are_lower_cased_local_parts_are_not() {
        let address = Address::parse("Alice@Example.COM").unwrap();
        assert_eq!(address.to_string(), "Alice@example.com");
        assert_eq!(address.mailbox_key(), "alice@example.com");
    }

    #[test]
    fn mailbox_keys_are_canonical() {
        for (text, key) in [
            ("ALICE@Example.COM", "alice@example.com"),
            ("\"alice\"@example.com", "alice@example.com"),
            ("\"john.doe\"@example.com", "john.doe@example.com"),
            ("\"john doe\"@example.com", "\"john doe\"@example.com"),
            ("\"a\\lice\"@example.com", "alice@example.com"),
            ("JÖSÉ@example.com", "jösé@example.com"),
            // Decomposed (NFD) input: O + combining diaeresis.
            ("JO\u{308}SE\u{301}@example.com", "jösé@example.com"),
            ("ÄRGER@BÜCHER.example", "ärger@bücher.example"),
        ] {
            assert_eq!(Address::parse(text).unwrap().mailbox_key(), key, "{text}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("<alice@example.com>").unwrap().to_string(),
            "alice@example.com"
        );
        assert_eq!(
            parse_path("<@relay.example,@other.example:bob@example.org>")
                .unwrap()
                .to_string(),
            "bob@example.org"
        );
        assert_eq!(parse_path("alice@example.com"), Err(AddressError::BadPath));
        assert_eq!(parse_path("<alice@example.com"), Err(AddressError::BadPath));
    }

    #[test]
    fn address_literals() {
        let domain = Domain::parse("[127.0.0.1]").unwrap();
        assert_eq!(domain.literal_ip(), Some("127.0.0.1".parse().unwrap()));
        let domain = Domain::parse("[IPv6:::1]").unwrap();
        assert_eq!(domain.literal_ip(), Some("::1".parse().unwrap()));
    }

    #[test]
    fn utf8_is_flagged() {
        assert!(!Address::parse("用户@example.com").unwrap().is_ascii());
        assert!(Address::parse("user@example.com").unwrap().is_ascii());
    }
}
