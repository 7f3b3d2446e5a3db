//! SPF (RFC 7208): may this client address send mail for this domain?
//! `check_host()` with every mechanism and modifier the RFC defines except
//! `exp=` (the explanation is only shown to the client on a refusal, and
//! petrel does not refuse on SPF alone), and with the RFC's limits on what
//! a record can make us look up: 10 terms that query DNS (section 4.6.4),
//! 2 lookups that find nothing, 10 MX or PTR names per mechanism, and an
//! overall time budget, so a hostile record costs a bounded number of
//! queries and never holds a session longer than that budget.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::Lookups;
use crate::dns::DnsFailure;

/// RFC 7208 4.6.4: terms that cause DNS queries, per evaluation.
const MAX_DNS_TERMS: u32 = 10;
/// RFC 7208 4.6.4: lookups that find no records (an attack signature).
const MAX_VOID_LOOKUPS: u32 = 2;
/// RFC 7208 4.6.4: names looked at per `mx` or `ptr` mechanism.
const MAX_NAMES_PER_MECHANISM: usize = 10;
/// RFC 7208 4.6.4 asks for at least 20 s before giving up.
pub const EVALUATION_BUDGET: Duration = Duration::from_secs(20);

/// The results of RFC 7208 section 2.6, as RFC 8601 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfResult {
    None,
    Neutral,
    Pass,
    Fail,
    SoftFail,
    TempError,
    PermError,
}

impl SpfResult {
    pub fn name(self) -> &'static str {
        match self {
            SpfResult::None => "none",
            SpfResult::Neutral => "neutral",
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }
}

/// Which identity was checked (RFC 7208 2.3, 2.4): the MAIL FROM domain,
/// or the HELO name when the reverse path is null.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    MailFrom,
    Helo,
}

/// What SPF said about one transaction, kept until the message is
/// complete (DMARC and the Authentication-Results header need it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfVerdict {
    pub result: SpfResult,
    pub identity: Identity,
    /// The domain checked (lower case).
    pub domain: String,
    /// Why, for the header's comment and the log.
    pub reason: String,
}

/// The facts check_host() works from.
#[derive(Debug, Clone)]
pub struct Client<'a> {
    pub ip: IpAddr,
    /// The HELO/EHLO name as given.
    pub helo: &'a str,
}

/// Checks the transaction's sender (`sender`: the reverse path, empty for
/// the null sender) from `client`. The MAIL FROM identity is checked, or
/// the HELO identity for the null sender (RFC 7208 2.4).
pub fn check_sender(lookups: &dyn Lookups, client: &Client, sender: &str) -> SpfVerdict {
    let (identity, sender, domain) = match sender.rsplit_once('@') {
        Some((local, domain)) if !sender.is_empty() => {
            let local = if local.is_empty() {
                "postmaster"
            } else {
                local
            };
            (
                Identity::MailFrom,
                format!("{local}@{domain}"),
                domain.to_ascii_lowercase(),
            )
        }
        _ => (
            Identity::Helo,
            format!("postmaster@{}", client.helo),
            client.helo.to_ascii_lowercase(),
        ),
    };
    let mut evaluation = Evaluation {
        lookups,
        ip: unmapped(client.ip),
        helo: client.helo,
        sender: &sender,
        dns_terms: 0,
        voids: 0,
        deadline: Instant::now() + EVALUATION_BUDGET,
    };
    let (result, reason) = match evaluation.check_host(&domain, 0) {
        Ok(outcome) => outcome,
        Err(Stop(result, reason)) => (result, reason),
    };
    SpfVerdict {
        result,
        identity,
        domain,
        reason,
    }
}

/// An IPv4 client that reaches an IPv6 socket is still IPv4 to SPF.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Ends the whole evaluation (temperror or permerror), whatever the
/// nesting of include and redirect.
struct Stop(SpfResult, String);

fn permerror(reason: impl Into<String>) -> Stop {
    Stop(SpfResult::PermError, reason.into())
}

struct Evaluation<'a> {
    lookups: &'a dyn Lookups,
    ip: IpAddr,
    helo: &'a str,
    sender: &'a str,
    dns_terms: u32,
    voids: u32,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

impl Qualifier {
    fn result(self) -> SpfResult {
        match self {
            Qualifier::Pass => SpfResult::Pass,
            Qualifier::Fail => SpfResult::Fail,
            Qualifier::SoftFail => SpfResult::SoftFail,
            Qualifier::Neutral => SpfResult::Neutral,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mechanism {
    All,
    Include(MacroString),
    A {
        domain: Option<MacroString>,
        v4: u8,
        v6: u8,
    },
    Mx {
        domain: Option<MacroString>,
        v4: u8,
        v6: u8,
    },
    Ptr(Option<MacroString>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(MacroString),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    directives: Vec<(Qualifier, Mechanism)>,
    redirect: Option<MacroString>,
}

const MAX_DEPTH: u32 = 10;

impl Evaluation<'_> {
    /// RFC 7208 4: the result for `domain`, and why.
    fn check_host(&mut self, domain: &str, depth: u32) -> Result<(SpfResult, String), Stop> {
        // Guards the stack; the DNS term limit ends loops long before.
        if depth > MAX_DEPTH {
            return Err(permerror("include/redirect nested too deeply"));
        }
        if !is_domain(domain) {
            return Ok((SpfResult::None, format!("{domain:?} is not a domain name")));
        }
        let texts = self.txt(domain)?;
        let mut records = texts.iter().filter(|text| is_spf_record(text));
        let Some(text) = records.next() else {
            return Ok((SpfResult::None, format!("no SPF record at {domain}")));
        };
        if records.next().is_some() {
            return Err(permerror(format!("more than one SPF record at {domain}")));
        }
        let record = parse_record(text).map_err(|why| permerror(format!("{domain}: {why}")))?;
        for (qualifier, mechanism) in &record.directives {
            if self.matches(mechanism, domain, depth)? {
                let result = qualifier.result();
                return Ok((
                    result,
                    format!("{domain} gives {} for {}", result.name(), self.ip),
                ));
            }
        }
        if let Some(target) = &record.redirect {
            self.count_dns_term()?;
            let target = self.expand(target, domain)?;
            return match self.check_host(&target, depth + 1)? {
                (SpfResult::None, why) => Err(permerror(format!("redirect: {why}"))),
                outcome => Ok(outcome),
            };
        }
        Ok((
            SpfResult::Neutral,
            format!("{domain} matched nothing for {}", self.ip),
        ))
    }

    fn matches(&mut self, mechanism: &Mechanism, domain: &str, depth: u32) -> Result<bool, Stop> {
        match mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4(net, bits) => Ok(in_network(self.ip, IpAddr::V4(*net), *bits)),
            Mechanism::Ip6(net, bits) => Ok(in_network(self.ip, IpAddr::V6(*net), *bits)),
            Mechanism::Include(target) => {
                self.count_dns_term()?;
                let target = self.expand(target, domain)?;
                match self.check_host(&target, depth + 1)?.0 {
                    SpfResult::Pass => Ok(true),
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(false),
                    SpfResult::TempError => Err(Stop(
                        SpfResult::TempError,
                        format!("include:{target} could not be looked up"),
                    )),
                    SpfResult::None | SpfResult::PermError => Err(permerror(format!(
                        "include:{target} has no usable SPF record"
                    ))),
                }
            }
            Mechanism::A {
                domain: target,
                v4,
                v6,
            } => {
                self.count_dns_term()?;
                let target = self.target(target.as_ref(), domain)?;
                let addresses = self.addresses(&target, self.ip.is_ipv6(), true)?;
                Ok(addresses
                    .iter()
                    .any(|a| in_network(self.ip, *a, self.bits(*v4, *v6))))
            }
            Mechanism::Mx {
                domain: target,
                v4,
                v6,
            } => {
                self.count_dns_term()?;
                let target = self.target(target.as_ref(), domain)?;
                let hosts = self.mx_names(&target)?;
                if hosts.len() > MAX_NAMES_PER_MECHANISM {
                    return Err(permerror(format!(
                        "mx:{target} has more than 10 MX records"
                    )));
                }
                for host in hosts {
                    let addresses = self.addresses(&host, self.ip.is_ipv6(), false)?;
                    if addresses
                        .iter()
                        .any(|a| in_network(self.ip, *a, self.bits(*v4, *v6)))
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr(target) => {
                self.count_dns_term()?;
                let target = self.target(target.as_ref(), domain)?;
                Ok(self.validated_names(&target)?)
            }
            Mechanism::Exists(target) => {
                self.count_dns_term()?;
                let target = self.expand(target, domain)?;
                // RFC 7208 5.7: always an A query, whatever the client's family.
                Ok(!self.addresses(&target, false, true)?.is_empty())
            }
        }
    }

    fn bits(&self, v4: u8, v6: u8) -> u8 {
        if self.ip.is_ipv6() { v6 } else { v4 }
    }

    fn target(&mut self, spec: Option<&MacroString>, domain: &str) -> Result<String, Stop> {
        match spec {
            Some(spec) => self.expand(spec, domain),
            None => Ok(domain.to_string()),
        }
    }

    /// RFC 7208 5.5: a PTR name of the client that is `target` or below it
    /// and whose addresses include the client. Lookup failures of the
    /// names are no match, not errors.
    fn validated_names(&mut self, target: &str) -> Result<bool, Stop> {
        self.check_deadline()?;
        let names = self.lookups.reverse_names(self.ip).unwrap_or_default();
        let target = target.trim_end_matches('.').to_ascii_lowercase();
        for name in names.into_iter().take(MAX_NAMES_PER_MECHANISM) {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name != target && !name.ends_with(&format!(".{target}")) {
                continue;
            }
            self.check_deadline()?;
            if self
                .lookups
                .addresses(&name, self.ip.is_ipv6())
                .is_ok_and(|addresses| addresses.contains(&self.ip))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn count_dns_term(&mut self) -> Result<(), Stop> {
        self.dns_terms += 1;
        if self.dns_terms > MAX_DNS_TERMS {
            return Err(permerror("more than 10 DNS-querying terms"));
        }
        Ok(())
    }

    fn check_deadline(&self) -> Result<(), Stop> {
        if Instant::now() > self.deadline {
            return Err(Stop(
                SpfResult::TempError,
                "SPF evaluation took too long".into(),
            ));
        }
        Ok(())
    }

    fn void(&mut self, name: &str) -> Result<(), Stop> {
        self.voids += 1;
        if self.voids > MAX_VOID_LOOKUPS {
            return Err(permerror(format!(
                "more than 2 lookups found nothing (last: {name})"
            )));
        }
        Ok(())
    }

    fn txt(&mut self, name: &str) -> Result<Vec<String>, Stop> {
        self.check_deadline()?;
        self.lookups
            .txt(name)
            .map_err(|failure| temperror(name, &failure))
    }

    /// A or AAAA records; `counts_void`: a name with none counts against
    /// the void lookup limit (the names of `mx` hosts do not: RFC 7208
    /// 4.6.4 counts the mechanism's own query).
    fn addresses(
        &mut self,
        name: &str,
        ipv6: bool,
        counts_void: bool,
    ) -> Result<Vec<IpAddr>, Stop> {
        self.check_deadline()?;
        let addresses = self
            .lookups
            .addresses(name, ipv6)
            .map_err(|failure| temperror(name, &failure))?;
        if addresses.is_empty() && counts_void {
            self.void(name)?;
        }
        Ok(addresses)
    }

    fn mx_names(&mut self, name: &str) -> Result<Vec<String>, Stop> {
        self.check_deadline()?;
        let names = self
            .lookups
            .mx_names(name)
            .map_err(|failure| temperror(name, &failure))?;
        if names.is_empty() {
            self.void(name)?;
        }
        Ok(names)
    }

    fn expand(&self, spec: &MacroString, domain: &str) -> Result<String, Stop> {
        let expanded = spec.expand(&MacroContext {
            sender: self.sender,
            domain,
            ip: self.ip,
            helo: self.helo,
        });
        Ok(truncate_domain(&expanded))
    }
}

fn temperror(name: &str, failure: &DnsFailure) -> Stop {
    Stop(
        SpfResult::TempError,
        format!("DNS lookup of {name}: {failure}"),
    )
}

/// RFC 7208 4.5: "v=spf1" alone or followed by a space.
fn is_spf_record(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 6
        && bytes[..6].eq_ignore_ascii_case(b"v=spf1")
        && (bytes.len() == 6 || bytes[6] == b' ')
}

/// RFC 7208 4.3: a name with at least two labels, none empty or longer
/// than 63 octets, 253 octets in all, of letters, digits, "-" and "_"
/// (an address literal given as HELO name is not one).
fn is_domain(domain: &str) -> bool {
    let domain = domain.trim_end_matches('.');
    !domain.is_empty()
        && domain.len() <= 253
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// RFC 7208 4.8: an expanded name longer than 253 octets loses labels on
/// the left until it fits.
fn truncate_domain(name: &str) -> String {
    let mut name = name.trim_end_matches('.');
    while name.len() > 253 {
        match name.split_once('.') {
            Some((_, rest)) => name = rest,
            None => break,
        }
    }
    name.to_string()
}

fn in_network(ip: IpAddr, network: IpAddr, bits: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(bits.min(32)))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(bits.min(128)))
                .unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

fn parse_record(text: &str) -> Result<Record, String> {
    let mut record = Record {
        directives: Vec::new(),
        redirect: None,
    };
    let mut explanation_seen = false;
    for term in text[6..].split(' ').filter(|t| !t.is_empty()) {
        if let Some((name, value)) = modifier(term) {
            match name.to_ascii_lowercase().as_str() {
                "redirect" => {
                    if record.redirect.is_some() {
                        return Err("redirect= given twice".into());
                    }
                    record.redirect = Some(MacroString::parse(value, false)?);
                }
                "exp" => {
                    if explanation_seen {
                        return Err("exp= given twice".into());
                    }
                    explanation_seen = true;
                    MacroString::parse(value, false)?;
                }
                // RFC 7208 6: unknown modifiers are ignored, but must parse.
                _ => {
                    MacroString::parse(value, true)?;
                }
            }
            continue;
        }
        record.directives.push(parse_directive(term)?);
    }
    // RFC 7208 6.1: with "all" present, redirect is never reached.
    if record
        .directives
        .iter()
        .any(|(_, m)| matches!(m, Mechanism::All))
    {
        record.redirect = None;
    }
    Ok(record)
}

/// `name=value` where name is ALPHA *( ALPHA / DIGIT / "-" / "_" / "." ).
fn modifier(term: &str) -> Option<(&str, &str)> {
    let (name, value) = term.split_once('=')?;
    let mut chars = name.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    .then_some((name, value))
}

fn parse_directive(term: &str) -> Result<(Qualifier, Mechanism), String> {
    let (qualifier, rest) = match term.as_bytes()[0] {
        b'+' => (Qualifier::Pass, &term[1..]),
        b'-' => (Qualifier::Fail, &term[1..]),
        b'~' => (Qualifier::SoftFail, &term[1..]),
        b'?' => (Qualifier::Neutral, &term[1..]),
        _ => (Qualifier::Pass, term),
    };
    let split = rest.find([':', '/']).unwrap_or(rest.len());
    let (name, argument) = rest.split_at(split);
    let bad = || format!("bad term {term:?}");
    let mechanism = match name.to_ascii_lowercase().as_str() {
        "all" if argument.is_empty() => Mechanism::All,
        "include" => Mechanism::Include(required_domain(argument).ok_or_else(bad)?),
        "exists" => Mechanism::Exists(required_domain(argument).ok_or_else(bad)?),
        "a" | "mx" => {
            let (domain, v4, v6) = domain_and_cidr(argument).ok_or_else(bad)?;
            if name.eq_ignore_ascii_case("a") {
                Mechanism::A { domain, v4, v6 }
            } else {
                Mechanism::Mx { domain, v4, v6 }
            }
        }
        "ptr" => match argument {
            "" => Mechanism::Ptr(None),
            _ => Mechanism::Ptr(Some(required_domain(argument).ok_or_else(bad)?)),
        },
        "ip4" => {
            let value = argument.strip_prefix(':').ok_or_else(bad)?;
            let (address, bits) = address_and_bits(value, 32).ok_or_else(bad)?;
            Mechanism::Ip4(address.parse().map_err(|_| bad())?, bits)
        }
        "ip6" => {
            let value = argument.strip_prefix(':').ok_or_else(bad)?;
            let (address, bits) = address_and_bits(value, 128).ok_or_else(bad)?;
            Mechanism::Ip6(address.parse().map_err(|_| bad())?, bits)
        }
        _ => return Err(format!("unknown mechanism in {term:?}")),
    };
    Ok((qualifier, mechanism))
}

fn required_domain(argument: &str) -> Option<MacroString> {
    let spec = argument.strip_prefix(':')?;
    if spec.is_empty() {
        return None;
    }
    MacroString::parse(spec, false).ok()
}

fn address_and_bits(value: &str, max: u8) -> Option<(&str, u8)> {
    match value.split_once('/') {
        None => Some((value, max)),
        Some((address, bits)) => Some((address, cidr_length(bits, max)?)),
    }
}

/// RFC 7208 5.6: a decimal without leading zeros, at most `max`.
fn cidr_length(text: &str, max: u8) -> Option<u8> {
    if text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    let bits: u8 = text.parse().ok()?;
    (bits <= max).then_some(bits)
}

/// `[":" domain-spec] ["/" ip4-cidr] ["//" ip6-cidr]` of `a` and `mx`.
fn domain_and_cidr(argument: &str) -> Option<(Option<MacroString>, u8, u8)> {
    let (spec, cidr) = match argument.strip_prefix(':') {
        Some(rest) => match rest.find('/') {
            Some(at) => (Some(&rest[..at]), &rest[at..]),
            None => (Some(rest), ""),
        },
        None => (None, argument),
    };
    let domain = match spec {
        Some("") => return None,
        Some(spec) => Some(MacroString::parse(spec, false).ok()?),
        None => None,
    };
    let (v4, v6) = if let Some(v6) = cidr.strip_prefix("//") {
        (32, cidr_length(v6, 128)?)
    } else if let Some(rest) = cidr.strip_prefix('/') {
        match rest.split_once("//") {
            Some((v4, v6)) => (cidr_length(v4, 32)?, cidr_length(v6, 128)?),
            None => (cidr_length(rest, 32)?, 128),
        }
    } else if cidr.is_empty() {
        (32, 128)
    } else {
        return None;
    };
    Some((domain, v4, v6))
}

/// A domain-spec or modifier value with macros (RFC 7208 7), parsed once
/// so that a syntax error anywhere makes the whole record a permerror.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MacroString(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Macro {
        letter: char,
        url_escape: bool,
        keep: Option<usize>,
        reverse: bool,
        delimiters: String,
    },
}

struct MacroContext<'a> {
    sender: &'a str,
    domain: &'a str,
    ip: IpAddr,
    helo: &'a str,
}

impl MacroString {
    /// `explanation_letters`: c, r and t are allowed (exp= text only; an
    /// unknown modifier's value is parsed the same way, leniently).
    fn parse(text: &str, explanation_letters: bool) -> Result<MacroString, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                if !(' '..='~').contains(&c) {
                    return Err(format!("bad character in {text:?}"));
                }
                literal.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => literal.push('%'),
                Some('_') => literal.push(' '),
                Some('-') => literal.push_str("%20"),
                Some('{') => {
                    let mut body = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => body.push(c),
                            None => return Err(format!("unclosed macro in {text:?}")),
                        }
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(parse_macro(&body, explanation_letters)?);
                }
                _ => return Err(format!("bad % in {text:?}")),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(MacroString(pieces))
    }

    fn expand(&self, context: &MacroContext) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Macro {
                    letter,
                    url_escape,
                    keep,
                    reverse,
                    delimiters,
                } => {
                    let value = macro_value(*letter, context);
                    let delimiters = if delimiters.is_empty() {
                        "."
                    } else {
                        delimiters
                    };
                    let mut parts: Vec<&str> = value.split(|c| delimiters.contains(c)).collect();
                    if *reverse {
                        parts.reverse();
                    }
                    if let Some(keep) = keep
                        && parts.len() > *keep
                    {
                        parts.drain(..parts.len() - keep);
                    }
                    let joined = parts.join(".");
                    if *url_escape {
                        out.push_str(&url_escaped(&joined));
                    } else {
                        out.push_str(&joined);
                    }
                }
            }
        }
        out
    }
}

fn parse_macro(body: &str, explanation_letters: bool) -> Result<Piece, String> {
    let mut chars = body.chars();
    let letter = chars.next().ok_or("empty macro")?;
    let lower = letter.to_ascii_lowercase();
    let allowed = matches!(lower, 's' | 'l' | 'o' | 'd' | 'i' | 'p' | 'v' | 'h')
        || (explanation_letters && matches!(lower, 'c' | 'r' | 't'));
    if !allowed {
        return Err(format!("unknown macro letter {letter:?}"));
    }
    let rest: String = chars.collect();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let mut rest = &rest[digits.len()..];
    let keep = if digits.is_empty() {
        None
    } else {
        let keep: usize = digits.parse().map_err(|_| "bad macro digits")?;
        if keep == 0 {
            return Err("macro keeps zero parts".into());
        }
        Some(keep)
    };
    let reverse = rest.starts_with(['r', 'R']);
    if reverse {
        rest = &rest[1..];
    }
    if !rest.chars().all(|c| ".-+,/_=".contains(c)) {
        return Err(format!("bad macro delimiters {rest:?}"));
    }
    Ok(Piece::Macro {
        letter: lower,
        url_escape: letter.is_ascii_uppercase(),
        keep,
        reverse,
        delimiters: rest.to_string(),
    })
}

fn macro_value(letter: char, context: &MacroContext) -> String {
    let (local, sender_domain) = context
        .sender
        .rsplit_once('@')
        .unwrap_or(("postmaster", context.sender));
    match letter {
        's' => context.sender.to_string(),
        'l' => local.to_string(),
        'o' => sender_domain.to_string(),
        'd' => context.domain.to_string(),
        'i' => match context.ip {
            IpAddr::V4(v4) => v4.to_string(),
            // RFC 7208 7.3: nibbles, dot-separated.
            IpAddr::V6(v6) => v6
                .octets()
                .iter()
                .flat_map(|o| [o >> 4, o & 0xf])
                .map(|n| format!("{n:x}"))
                .collect::<Vec<_>>()
                .join("."),
        },
        'v' => match context.ip {
            IpAddr::V4(_) => "in-addr".to_string(),
            IpAddr::V6(_) => "ip6".to_string(),
        },
        'h' => context.helo.to_string(),
        'c' => context.ip.to_string(),
        // RFC 7208 7.3: %{p} SHOULD NOT be used; "unknown" is the value
        // allowed when it is not validated, and costs no lookups.
        _ => "unknown".to_string(),
    }
}

fn url_escaped(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailauth::tests::FakeDns;

    fn check(dns: &FakeDns, ip: &str, sender: &str) -> SpfVerdict {
        let client = Client {
            ip: ip.parse().unwrap(),
            helo: "mail.example.org",
        };
        check_sender(dns, &client, sender)
    }

    /// Checks each (client address, sender, expected result).
    fn expect(dns: &FakeDns, cases: &[(&str, &str, SpfResult)]) {
        for (ip, sender, expected) in cases {
            assert_eq!(
                check(dns, ip, sender).result,
                *expected,
                "{sender} from {ip}"
            );
        }
    }

    #[test]
    fn mechanisms_and_qualifiers() {
        let dns = FakeDns::default()
            .txt("example.org", "v=spf1 ip4:192.0.2.0/24 a mx -all")
            .a("example.org", "198.51.100.1")
            .mx("example.org", "mx.example.org")
            .a("mx.example.org", "198.51.100.2")
            .txt("soft.example", "v=spf1 ip6:2001:db8::/32 ~all")
            .txt("neutral.example", "v=spf1 ?all")
            .txt("empty.example", "v=spf1");
        expect(
            &dns,
            &[
                ("192.0.2.7", "a@example.org", SpfResult::Pass),
                ("198.51.100.1", "a@example.org", SpfResult::Pass),
                ("198.51.100.2", "a@example.org", SpfResult::Pass),
                ("203.0.113.9", "a@example.org", SpfResult::Fail),
                // a mapped IPv4 client is IPv4
                ("::ffff:192.0.2.7", "a@example.org", SpfResult::Pass),
                ("2001:db8::1", "x@soft.example", SpfResult::Pass),
                ("2001:db9::1", "x@soft.example", SpfResult::SoftFail),
                ("192.0.2.1", "x@neutral.example", SpfResult::Neutral),
                ("192.0.2.1", "x@empty.example", SpfResult::Neutral),
                ("192.0.2.1", "x@nothing.example", SpfResult::None),
            ],
        );
    }

    #[test]
    fn the_null_sender_checks_the_helo_name() {
        let dns = FakeDns::default().txt("mail.example.org", "v=spf1 ip4:192.0.2.1 -all");
        let verdict = check(&dns, "192.0.2.1", "");
        assert_eq!(verdict.result, SpfResult::Pass);
        assert_eq!(verdict.identity, Identity::Helo);
        assert_eq!(verdict.domain, "mail.example.org");
        // An address literal or a one-label name is no domain: none, unasked.
        for helo in ["[192.0.2.1]", "localhost"] {
            let client = Client {
                ip: "192.0.2.1".parse().unwrap(),
                helo,
            };
            let before = dns.queries();
            assert_eq!(check_sender(&dns, &client, "").result, SpfResult::None);
            assert_eq!(dns.queries(), before, "{helo}");
        }
    }

    #[test]
    fn include_and_redirect() {
        let dns = FakeDns::default()
            .txt("example.org", "v=spf1 include:_spf.provider.example -all")
            .txt("_spf.provider.example", "v=spf1 ip4:192.0.2.0/28 ~all")
            .txt("redirected.example", "v=spf1 redirect=example.org")
            .txt("broken.example", "v=spf1 include:nothing.example -all")
            .txt("dangling.example", "v=spf1 redirect=nothing.example");
        expect(&dns, &[("192.0.2.3", "a@example.org", SpfResult::Pass)]);
        // The include's ~all is "no match"; the outer -all decides.
        expect(
            &dns,
            &[
                ("192.0.2.99", "a@example.org", SpfResult::Fail),
                ("192.0.2.3", "a@redirected.example", SpfResult::Pass),
                ("192.0.2.3", "a@broken.example", SpfResult::PermError),
                ("192.0.2.3", "a@dangling.example", SpfResult::PermError),
            ],
        );
    }

    #[test]
    fn limits_make_permerrors() {
        let dns = FakeDns::default()
            .txt("loop.example", "v=spf1 include:loop.example -all")
            .txt(
                "many.example",
                "v=spf1 a:a1.example a:a2.example a:a3.example a:a4.example a:a5.example \
                 a:a6.example a:a7.example a:a8.example a:a9.example a:a10.example \
                 a:a11.example -all",
            )
            .txt(
                "void.example",
                "v=spf1 a:v1.example a:v2.example a:v3.example -all",
            )
            .txt("two.example", "v=spf1 -all")
            .txt("two.example", "v=spf1 +all")
            .txt("syntax.example", "v=spf1 ip4:192.0.2.300 -all")
            .txt("unknown.example", "v=spf1 foo:bar -all")
            .txt("macro.example", "v=spf1 exists:%{z}.example -all");
        for n in 1..=11 {
            dns.add_a(&format!("a{n}.example"), "203.0.113.1");
        }
        for domain in [
            "loop.example",
            "many.example",
            "void.example",
            "two.example",
            "syntax.example",
            "unknown.example",
            "macro.example",
        ] {
            let before = dns.queries();
            expect(
                &dns,
                &[("192.0.2.1", &format!("a@{domain}"), SpfResult::PermError)],
            );
            // The record's TXT query and at most 10 more: the loop and
            // the long record cost no more than the limit allows.
            let queries = dns.queries() - before;
            assert!(queries <= 11, "{domain}: {queries} queries");
        }
    }

    #[test]
    fn dns_failures_are_temperrors() {
        let dns = FakeDns::default()
            .fail("down.example")
            .txt("example.org", "v=spf1 a:down.example -all");
        expect(
            &dns,
            &[
                ("192.0.2.1", "a@down.example", SpfResult::TempError),
                ("192.0.2.1", "a@example.org", SpfResult::TempError),
            ],
        );
    }

    #[test]
    fn macros_expand_as_the_rfc_examples() {
        // RFC 7208 7.4, with the sender strong-bad@email.example.com.
        let context = MacroContext {
            sender: "strong-bad@email.example.com",
            domain: "email.example.com",
            ip: "192.0.2.3".parse().unwrap(),
            helo: "mx.example.org",
        };
        let expand = |spec: &str| MacroString::parse(spec, false).unwrap().expand(&context);
        assert_eq!(expand("%{s}"), "strong-bad@email.example.com");
        assert_eq!(expand("%{o}"), "email.example.com");
        assert_eq!(expand("%{d}"), "email.example.com");
        assert_eq!(expand("%{d4}"), "email.example.com");
        assert_eq!(expand("%{d3}"), "email.example.com");
        assert_eq!(expand("%{d2}"), "example.com");
        assert_eq!(expand("%{d1}"), "com");
        assert_eq!(expand("%{dr}"), "com.example.email");
        assert_eq!(expand("%{d2r}"), "example.email");
        assert_eq!(expand("%{l}"), "strong-bad");
        assert_eq!(expand("%{l-}"), "strong.bad");
        assert_eq!(expand("%{lr}"), "strong-bad");
        assert_eq!(expand("%{lr-}"), "bad.strong");
        assert_eq!(expand("%{l1r-}"), "strong");
        assert_eq!(
            expand("%{ir}.%{v}._spf.%{d2}"),
            "3.2.0.192.in-addr._spf.example.com"
        );
        assert_eq!(
            expand("%{lr-}.lp._spf.%{d2}"),
            "bad.strong.lp._spf.example.com"
        );
        let v6 = MacroContext {
            ip: "2001:db8::cb01".parse().unwrap(),
            ..context
        };
        assert_eq!(
            MacroString::parse("%{ir}.%{v}._spf.%{d2}", false)
                .unwrap()
                .expand(&v6),
            "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
        );
        assert!(MacroString::parse("%{c}", false).is_err());
        assert!(MacroString::parse("%{d0}", false).is_err());
        assert!(MacroString::parse("50%", false).is_err());
    }

    #[test]
    fn exists_with_macros() {
        let dns = FakeDns::default()
            .txt("example.org", "v=spf1 exists:%{i}._spf.%{d} -all")
            .a_only("192.0.2.5._spf.example.org", "127.0.0.2");
        expect(
            &dns,
            &[
                ("192.0.2.5", "a@example.org", SpfResult::Pass),
                ("192.0.2.6", "a@example.org", SpfResult::Fail),
            ],
        );
    }

    #[test]
    fn ptr_needs_a_forward_confirmed_name_under_the_domain() {
        let dns = FakeDns::default()
            .txt("example.org", "v=spf1 ptr -all")
            .ptr("192.0.2.8", "host.example.org")
            .a("host.example.org", "192.0.2.8")
            .ptr("192.0.2.9", "liar.example.org");
        expect(
            &dns,
            &[
                ("192.0.2.8", "a@example.org", SpfResult::Pass),
                ("192.0.2.9", "a@example.org", SpfResult::Fail),
            ],
        );
    }

    #[test]
    fn cidr_forms() {
        let dns = FakeDns::default()
            .txt("example.org", "v=spf1 a:net.example/24//64 -all")
            .a("net.example", "192.0.2.1")
            .aaaa("net.example", "2001:db8:1:1::1");
        expect(
            &dns,
            &[
                ("192.0.2.200", "a@example.org", SpfResult::Pass),
                ("2001:db8:1:1::99", "a@example.org", SpfResult::Pass),
                ("2001:db8:1:2::1", "a@example.org", SpfResult::Fail),
            ],
        );
        assert_eq!(cidr_length("033", 128), None);
        assert_eq!(cidr_length("33", 32), None);
    }
}
