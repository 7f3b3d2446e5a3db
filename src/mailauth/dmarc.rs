//! DMARC (RFC 7489): does the domain in the From header stand behind this
//! message, through an SPF or DKIM pass for an aligned domain, and what
//! does it ask receivers to do when not?
//!
//! The Organizational Domain is found by the DNS tree walk of DMARCbis
//! (draft-ietf-dmarc-dmarcbis), which needs no copy of the Public Suffix
//! List: the `_dmarc` records above a name, and their `psd=` tags, say
//! where the organization's boundary is. Each walk is at most 8 queries,
//! remembered for the rest of the message, under an overall time budget.

use std::collections::HashMap;
use std::time::Instant;

use super::Lookups;
use super::spf::{SpfResult, SpfVerdict};
use crate::dkim::verify::{DkimOutcome, DkimResult};

/// DMARCbis 4.10: names longer than this are shortened before the walk.
const MAX_WALK_LABELS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcResult {
    None,
    Pass,
    Fail,
    TempError,
    PermError,
}

impl DmarcResult {
    pub fn name(self) -> &'static str {
        match self {
            DmarcResult::None => "none",
            DmarcResult::Pass => "pass",
            DmarcResult::Fail => "fail",
            DmarcResult::TempError => "temperror",
            DmarcResult::PermError => "permerror",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }

    fn parse(value: &str) -> Option<DmarcPolicy> {
        match value.trim().to_ascii_lowercase().as_str() {
            "none" => Some(DmarcPolicy::None),
            "quarantine" => Some(DmarcPolicy::Quarantine),
            "reject" => Some(DmarcPolicy::Reject),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcVerdict {
    pub result: DmarcResult,
    /// The From header's domain, when there was exactly one.
    pub from_domain: Option<String>,
    /// What the domain asks for this message (p=, or sp= for a
    /// subdomain), when it has a record.
    pub policy: Option<DmarcPolicy>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    policy: DmarcPolicy,
    subdomain_policy: Option<DmarcPolicy>,
    strict_dkim: bool,
    strict_spf: bool,
    /// DMARCbis psd=: Some(true) "a public suffix", Some(false) "an
    /// organizational domain".
    public_suffix: Option<bool>,
}

/// Evaluates DMARC for a message whose From header names `from_domain`
/// (`Err`: why there is no single From domain).
pub fn evaluate(
    lookups: &dyn Lookups,
    from_domain: Result<&str, String>,
    spf: &SpfVerdict,
    dkim: &[DkimOutcome],
    deadline: Instant,
) -> DmarcVerdict {
    let from_domain = match from_domain {
        Ok(domain) => domain.trim_end_matches('.').to_ascii_lowercase(),
        Err(why) => {
            return DmarcVerdict {
                result: DmarcResult::PermError,
                from_domain: None,
                policy: None,
                reason: why,
            };
        }
    };
    // "localhost" and other one-label names have no policy to look up
    // (and asking a resolver about them only leaks them).
    if !from_domain.contains('.') {
        return DmarcVerdict {
            result: DmarcResult::None,
            reason: format!("{from_domain} is not a public domain"),
            from_domain: Some(from_domain),
            policy: None,
        };
    }
    let mut walker = Walker {
        lookups,
        records: HashMap::new(),
        deadline,
    };
    let verdict = |result, policy, reason: String| DmarcVerdict {
        result,
        from_domain: Some(from_domain.clone()),
        policy,
        reason,
    };
    let (found_at, record) = match walker.policy_record(&from_domain) {
        Ok(Some(found)) => found,
        Ok(None) => {
            return verdict(
                DmarcResult::None,
                None,
                format!("no DMARC record for {from_domain}"),
            );
        }
        Err(why) => return verdict(DmarcResult::TempError, None, why),
    };
    let policy = if found_at == from_domain {
        record.policy
    } else {
        record.subdomain_policy.unwrap_or(record.policy)
    };
    match aligned_pass(&mut walker, &from_domain, &record, spf, dkim) {
        Ok(Some(why)) => verdict(DmarcResult::Pass, Some(policy), why),
        Ok(None) => verdict(
            DmarcResult::Fail,
            Some(policy),
            "no aligned SPF or DKIM pass".to_string(),
        ),
        Err(why) => verdict(DmarcResult::TempError, Some(policy), why),
    }
}

/// Which pass, if any, is aligned with the From domain (RFC 7489 3.1):
/// `Some(why)` for the first found; an error when none is and a lookup
/// for an Organizational Domain failed on the way.
fn aligned_pass(
    walker: &mut Walker,
    from_domain: &str,
    record: &Record,
    spf: &SpfVerdict,
    dkim: &[DkimOutcome],
) -> Result<Option<String>, String> {
    let mut aligned = |domain: &str, strict: bool| -> Result<bool, String> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain == from_domain {
            return Ok(true);
        }
        if strict || !shares_a_parent(&domain, from_domain) {
            return Ok(false);
        }
        Ok(walker.organizational_domain(&domain)? == walker.organizational_domain(from_domain)?)
    };
    let mut temporary = None;
    for outcome in dkim.iter().filter(|o| o.result == DkimResult::Pass) {
        match aligned(&outcome.domain, record.strict_dkim) {
            Ok(true) => {
                return Ok(Some(format!(
                    "DKIM signature of {} is aligned",
                    outcome.domain
                )));
            }
            Ok(false) => {}
            Err(why) => temporary = Some(why),
        }
    }
    if spf.result == SpfResult::Pass {
        match aligned(&spf.domain, record.strict_spf) {
            Ok(true) => return Ok(Some(format!("SPF pass for {} is aligned", spf.domain))),
            Ok(false) => {}
            Err(why) => temporary = Some(why),
        }
    }
    match temporary {
        Some(why) => Err(why),
        None => Ok(None),
    }
}

/// Two names can share an Organizational Domain only if they end alike.
fn shares_a_parent(a: &str, b: &str) -> bool {
    let last = |name: &str| name.rsplit('.').next().map(str::to_string);
    a.contains('.') && b.contains('.') && last(a) == last(b)
}

struct Walker<'a> {
    lookups: &'a dyn Lookups,
    /// `_dmarc` lookups already made for this message.
    records: HashMap<String, Option<Record>>,
    deadline: Instant,
}

impl Walker<'_> {
    /// The names the tree walk queries for `domain`, longest first:
    /// the name itself, then (from 7 labels at most) each parent.
    fn walk(domain: &str) -> Vec<String> {
        let labels: Vec<&str> = domain.split('.').collect();
        let mut names = vec![domain.to_string()];
        let start = if labels.len() > MAX_WALK_LABELS {
            labels.len() - (MAX_WALK_LABELS - 1)
        } else {
            1
        };
        for skip in start..labels.len() {
            names.push(labels[skip..].join("."));
        }
        names
    }

    fn record(&mut self, name: &str) -> Result<Option<Record>, String> {
        if let Some(record) = self.records.get(name) {
            return Ok(record.clone());
        }
        if Instant::now() > self.deadline {
            return Err("DMARC lookups took too long".into());
        }
        let texts = self
            .lookups
            .txt(&format!("_dmarc.{name}"))
            .map_err(|failure| format!("DNS lookup of _dmarc.{name}: {failure}"))?;
        let mut records = texts.iter().filter_map(|text| parse_record(text));
        // RFC 7489 6.6.3: more than one record is as good as none.
        let record = match (records.next(), records.next()) {
            (Some(record), None) => Some(record),
            _ => None,
        };
        self.records.insert(name.to_string(), record.clone());
        Ok(record)
    }

    /// RFC 7489 6.6.3 / DMARCbis 4.10.1: the record for the name, or the
    /// first found walking up.
    fn policy_record(&mut self, domain: &str) -> Result<Option<(String, Record)>, String> {
        for name in Walker::walk(domain) {
            if let Some(record) = self.record(&name)? {
                return Ok(Some((name, record)));
            }
        }
        Ok(None)
    }

    /// DMARCbis 4.10.2: psd=n marks the Organizational Domain, psd=y the
    /// public suffix above it; otherwise the record with the fewest labels
    /// does; with no records at all, the name itself.
    fn organizational_domain(&mut self, domain: &str) -> Result<String, String> {
        let names = Walker::walk(domain);
        let mut fewest = None;
        for (at, name) in names.iter().enumerate() {
            match self.record(name)? {
                Some(Record {
                    public_suffix: Some(false),
                    ..
                }) => return Ok(name.clone()),
                Some(Record {
                    public_suffix: Some(true),
                    ..
                }) => {
                    let below = if at == 0 { name } else { &names[at - 1] };
                    return Ok(below.clone());
                }
                Some(_) => fewest = Some(name.clone()),
                None => {}
            }
        }
        Ok(fewest.unwrap_or_else(|| domain.to_string()))
    }
}

/// A DMARC record (RFC 7489 6.3): "v=DMARC1" first; a record without a
/// valid p= is used as p=none when it has rua= (6.6.3), else ignored.
fn parse_record(text: &str) -> Option<Record> {
    let mut tags = text.split(';').map(|spec| {
        let (name, value) = spec.split_once('=').unwrap_or((spec, ""));
        (name.trim().to_ascii_lowercase(), value.trim())
    });
    let (name, value) = tags.next()?;
    if name != "v" || value != "DMARC1" {
        return None;
    }
    let mut policy = None;
    let mut has_rua = false;
    let mut record = Record {
        policy: DmarcPolicy::None,
        subdomain_policy: None,
        strict_dkim: false,
        strict_spf: false,
        public_suffix: None,
    };
    for (name, value) in tags {
        match name.as_str() {
            "p" => policy = DmarcPolicy::parse(value),
            "sp" => record.subdomain_policy = DmarcPolicy::parse(value),
            "adkim" => record.strict_dkim = value.eq_ignore_ascii_case("s"),
            "aspf" => record.strict_spf = value.eq_ignore_ascii_case("s"),
            "psd" => {
                record.public_suffix = match value {
                    "y" => Some(true),
                    "n" => Some(false),
                    _ => None,
                }
            }
            "rua" => has_rua = true,
            _ => {}
        }
    }
    match policy {
        Some(policy) => record.policy = policy,
        None if has_rua => record.policy = DmarcPolicy::None,
        None => return None,
    }
    Some(record)
}

/// The domain of the From header field (RFC 7489 6.6.1), or why there is
/// no single one: the field must appear once, and all its mailboxes must
/// be in one domain.
pub fn from_domain(fields: &[(String, Vec<u8>)]) -> Result<String, String> {
    let mut from = fields.iter().filter(|(name, _)| name == "from");
    let (Some((_, field)), None) = (from.next(), from.next()) else {
        return Err("the message must have exactly one From field".into());
    };
    let value = String::from_utf8_lossy(field);
    let value = value.split_once(':').map_or("", |(_, v)| v);
    let mut domains: Vec<String> = Vec::new();
    for mailbox in split_mailboxes(&without_comments_and_quotes(value)) {
        let address = match (mailbox.find('<'), mailbox.rfind('>')) {
            (Some(open), Some(close)) if open < close => &mailbox[open + 1..close],
            _ => mailbox.as_str(),
        };
        let Some((_, domain)) = address.rsplit_once('@') else {
            continue;
        };
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if !domain.is_empty() && !domains.contains(&domain) {
            domains.push(domain);
        }
    }
    match domains.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err("the From field has no address".into()),
        _ => Err("the From field names more than one domain".into()),
    }
}

/// Every address in every From field, as written (comments and display
/// names left out; a quoted local part shows as `""`).
pub fn from_addresses(fields: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut addresses = Vec::new();
    for (_, field) in fields.iter().filter(|(name, _)| name == "from") {
        let value = String::from_utf8_lossy(field);
        let value = value.split_once(':').map_or("", |(_, v)| v);
        for mailbox in split_mailboxes(&without_comments_and_quotes(value)) {
            let address = match (mailbox.find('<'), mailbox.rfind('>')) {
                (Some(open), Some(close)) if open < close => &mailbox[open + 1..close],
                _ => mailbox.as_str(),
            };
            addresses.push(address.trim().to_string());
        }
    }
    addresses
}

/// Comments (nested) go; quoted strings become empty, so that an "@" or
/// "," inside a display name is not taken for part of an address.
fn without_comments_and_quotes(value: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => {
                quoted = !quoted;
                if !quoted {
                    out.push_str("\"\"");
                }
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if quoted || depth > 0 => {}
            c => out.push(c),
        }
    }
    out
}

/// The mailboxes of an address list, group names dropped.
fn split_mailboxes(value: &str) -> Vec<String> {
    value
        .split([',', ';'])
        .map(|part| match part.split_once(':') {
            // "group: a@b, c@d;" — what follows the colon.
            Some((_, rest)) if !part.contains('<') || part.find(':') < part.find('<') => {
                rest.trim().to_string()
            }
            _ => part.trim().to_string(),
        })
        .filter(|part| !part.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailauth::spf::Identity;
    use crate::mailauth::tests::FakeDns;
    use std::time::Duration;

    fn spf(result: SpfResult, domain: &str) -> SpfVerdict {
        SpfVerdict {
            result,
            identity: Identity::MailFrom,
            domain: domain.into(),
            reason: String::new(),
        }
    }

    fn dkim(result: DkimResult, domain: &str) -> DkimOutcome {
        DkimOutcome {
            result,
            domain: domain.into(),
            selector: "s".into(),
            signature_start: String::new(),
            reason: String::new(),
        }
    }

    fn eval(dns: &FakeDns, from: &str, spf: &SpfVerdict, dkim: &[DkimOutcome]) -> DmarcVerdict {
        evaluate(
            dns,
            Ok(from),
            spf,
            dkim,
            Instant::now() + Duration::from_secs(20),
        )
    }

    fn zone() -> FakeDns {
        FakeDns::default()
            .txt("_dmarc.example.org", "v=DMARC1; p=reject")
            .txt(
                "_dmarc.strict.example",
                "v=DMARC1; p=quarantine; adkim=s; aspf=s",
            )
            .txt("_dmarc.sub.example", "v=DMARC1; p=none; sp=reject")
            .txt("_dmarc.com", "v=DMARC1; p=none; psd=y")
    }

    #[test]
    fn alignment_relaxed_and_strict() {
        let dns = zone();
        let none = spf(SpfResult::None, "other.example");
        let v = eval(
            &dns,
            "example.org",
            &none,
            &[dkim(DkimResult::Pass, "example.org")],
        );
        assert_eq!(
            (v.result, v.policy),
            (DmarcResult::Pass, Some(DmarcPolicy::Reject))
        );
        // Relaxed: a subdomain of the same organization is aligned.
        let v = eval(
            &dns,
            "example.org",
            &spf(SpfResult::Pass, "bounces.example.org"),
            &[],
        );
        assert_eq!(v.result, DmarcResult::Pass);
        // A pass for someone else's domain is not.
        let v = eval(
            &dns,
            "example.org",
            &spf(SpfResult::Pass, "evil.example"),
            &[
                dkim(DkimResult::Pass, "evil.example"),
                dkim(DkimResult::Fail, "example.org"),
            ],
        );
        assert_eq!(
            (v.result, v.policy),
            (DmarcResult::Fail, Some(DmarcPolicy::Reject))
        );
        // Strict: the subdomain is not enough.
        let v = eval(
            &dns,
            "strict.example",
            &spf(SpfResult::Pass, "mail.strict.example"),
            &[],
        );
        assert_eq!(
            (v.result, v.policy),
            (DmarcResult::Fail, Some(DmarcPolicy::Quarantine))
        );
        let v = eval(
            &dns,
            "strict.example",
            &spf(SpfResult::Pass, "strict.example"),
            &[],
        );
        assert_eq!(v.result, DmarcResult::Pass);
    }

    #[test]
    fn subdomains_get_the_organizations_sp() {
        let dns = zone();
        let v = eval(
            &dns,
            "a.b.sub.example",
            &spf(SpfResult::Fail, "a.b.sub.example"),
            &[],
        );
        assert_eq!(
            (v.result, v.policy),
            (DmarcResult::Fail, Some(DmarcPolicy::Reject))
        );
        let v = eval(&dns, "nothing.example", &spf(SpfResult::Fail, "x"), &[]);
        assert_eq!(v.result, DmarcResult::None);
    }

    #[test]
    fn a_public_suffix_is_not_an_organization() {
        let dns = zone();
        // Both under .com, which says psd=y: different organizations.
        let v = eval(&dns, "alice.com", &spf(SpfResult::Pass, "mallory.com"), &[]);
        assert_eq!(v.result, DmarcResult::Fail);
        let v = eval(
            &dns,
            "alice.com",
            &spf(SpfResult::Pass, "mail.alice.com"),
            &[],
        );
        assert_eq!(v.result, DmarcResult::Pass);
    }

    #[test]
    fn one_label_names_are_not_looked_up() {
        let dns = zone();
        let v = eval(&dns, "localhost", &spf(SpfResult::None, "localhost"), &[]);
        assert_eq!(v.result, DmarcResult::None);
        assert_eq!(dns.queries(), 0);
    }

    #[test]
    fn dns_failure_is_a_temperror() {
        let dns = FakeDns::default().fail("_dmarc.down.example");
        let v = eval(
            &dns,
            "down.example",
            &spf(SpfResult::Pass, "down.example"),
            &[],
        );
        assert_eq!(v.result, DmarcResult::TempError);
    }

    #[test]
    fn records_and_from_fields() {
        assert_eq!(parse_record("v=DMARC1"), None);
        assert_eq!(parse_record("v=spf1 -all"), None);
        assert_eq!(
            parse_record("v=DMARC1; rua=mailto:x@example.org").map(|r| r.policy),
            Some(DmarcPolicy::None)
        );
        let field = |text: &str| vec![("from".to_string(), text.as_bytes().to_vec())];
        assert_eq!(
            from_domain(&field("From: \"Bob, the @builder\" <bob@Example.ORG>\r\n")),
            Ok("example.org".into())
        );
        assert_eq!(
            from_domain(&field("From: bob@example.org (Bob (the) builder)\r\n")),
            Ok("example.org".into())
        );
        assert!(from_domain(&field("From: a@x.example, b@y.example\r\n")).is_err());
        assert!(from_domain(&field("From: undisclosed\r\n")).is_err());
        let mut two = field("From: a@x.example\r\n");
        two.extend(field("From: a@y.example\r\n"));
        assert!(from_domain(&two).is_err());
    }

    #[test]
    fn the_walk_is_bounded() {
        assert_eq!(
            Walker::walk("a.b.example"),
            vec!["a.b.example", "b.example", "example"]
        );
        let long = "1.2.3.4.5.6.7.8.9.10.example";
        let walk = Walker::walk(long);
        assert_eq!(walk.len(), 8);
        assert_eq!(walk[1], "5.6.7.8.9.10.example");
    }
}
