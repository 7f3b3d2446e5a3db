//! `petrel dns-check DOMAIN`: are the DNS records that big providers look
//! at in place for DOMAIN and this server, and if not, exactly what to
//! publish. Asks through the same resolver as delivery (`dns.nameservers`).
//!
//! Required (exit 1 when one is missing or wrong): MX, the MX host's
//! addresses, forward-confirmed reverse DNS of the server's addresses,
//! SPF, DKIM, DMARC. Recommended (exit 1 only with `--strict`): MTA-STS
//! and TLS-RPT.

use std::net::IpAddr;

use crate::config::{AddressFamily, Config};
use crate::dns::{Dns, DnsFailure};

use super::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Missing,
    Wrong,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "MISSING",
            Status::Wrong => "WRONG",
        }
    }
}

struct Row {
    check: &'static str,
    required: bool,
    status: Status,
    found: String,
    /// What to publish (or do) when the status is not ok.
    fix: Option<String>,
}

pub fn run(
    config: &Config,
    domain: &str,
    addresses: &[IpAddr],
    strict: bool,
) -> Result<(), Failure> {
    let dns = Dns::new(&config.dns).map_err(|e| Failure::Runtime(e.to_string()))?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let addresses = if addresses.is_empty() {
        public_listen_addresses(config)
    } else {
        addresses.to_vec()
    };
    let rows = check(config, &dns, &domain, &addresses);
    super::say!("{}", render(&domain, &config.hostname, &rows).trim_end());
    let failed = rows
        .iter()
        .any(|row| row.status != Status::Ok && (row.required || strict));
    if failed {
        return Err(Failure::Runtime(format!(
            "{domain}: DNS is not ready for mail (see above)"
        )));
    }
    Ok(())
}

/// The server's own addresses from its listeners, when they name one.
fn public_listen_addresses(config: &Config) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = config
        .smtp
        .listen
        .iter()
        .map(|address| address.ip())
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
        .collect();
    found.dedup();
    found
}

fn temporary(failure: &DnsFailure) -> Option<String> {
    match failure {
        DnsFailure::Temporary(why) => Some(why.clone()),
        _ => None,
    }
}

fn txt_starting(dns: &Dns, name: &str, tag: &str) -> Result<Vec<String>, String> {
    dns.txt(name)
        .map(|records| {
            records
                .into_iter()
                .filter(|r| {
                    r.to_ascii_lowercase()
                        .starts_with(&tag.to_ascii_lowercase())
                })
                .collect()
        })
        .map_err(|failure| temporary(&failure).unwrap_or_else(|| failure.to_string()))
}

/// What every check looks at.
struct Subject<'a> {
    config: &'a Config,
    dns: &'a Dns,
    domain: &'a str,
    /// This server's name, lower case.
    hostname: String,
    /// This server's public addresses, as given or as listened on.
    addresses: &'a [IpAddr],
    /// The addresses `hostname` resolves to (looked up once).
    host_addresses: std::cell::OnceCell<Result<Vec<IpAddr>, DnsFailure>>,
}

impl Subject<'_> {
    fn host_addresses(&self) -> &Result<Vec<IpAddr>, DnsFailure> {
        self.host_addresses
            .get_or_init(|| self.dns.addresses(&self.hostname, AddressFamily::Any))
    }
}

/// The checks, in the order the table shows them.
const CHECKS: [fn(&Subject) -> Vec<Row>; 8] = [
    mx_row,
    address_row,
    ptr_rows,
    spf_row,
    dkim_row,
    dmarc_row,
    mta_sts_row,
    tls_rpt_row,
];

fn check(config: &Config, dns: &Dns, domain: &str, addresses: &[IpAddr]) -> Vec<Row> {
    let subject = Subject {
        config,
        dns,
        domain,
        hostname: config.hostname.trim_end_matches('.').to_ascii_lowercase(),
        addresses,
        host_addresses: std::cell::OnceCell::new(),
    };
    CHECKS.iter().flat_map(|check| check(&subject)).collect()
}

/// MX: the domain's mail comes to this server.
fn mx_row(subject: &Subject) -> Vec<Row> {
    let Subject {
        domain, hostname, ..
    } = subject;
    let (status, found) = match subject.dns.mail_hosts(domain) {
        Ok(hosts) => {
            let names: Vec<String> = hosts.iter().map(|h| h.name.to_ascii_lowercase()).collect();
            let ours = names.contains(hostname) && hosts.iter().any(|h| h.name != *domain);
            (
                if ours { Status::Ok } else { Status::Wrong },
                names.join(", "),
            )
        }
        Err(DnsFailure::Temporary(why)) => (Status::Wrong, format!("lookup failed: {why}")),
        Err(failure) => (Status::Missing, failure.to_string()),
    };
    vec![Row {
        check: "MX",
        required: true,
        status,
        found,
        fix: Some(format!("{domain}. IN MX 10 {hostname}.")),
    }]
}

/// The MX host's addresses: this server's.
fn address_row(subject: &Subject) -> Vec<Row> {
    let hostname = &subject.hostname;
    let (status, found) = match subject.host_addresses() {
        Ok(found) => {
            let missing = subject.addresses.iter().any(|ip| !found.contains(ip));
            (
                if missing { Status::Wrong } else { Status::Ok },
                join(found),
            )
        }
        Err(failure) => (Status::Missing, failure.to_string()),
    };
    let fix = if subject.addresses.is_empty() {
        format!("{hostname}. IN A <this server's address> (give it with --address)")
    } else {
        subject
            .addresses
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(_) => format!("{hostname}. IN A {ip}"),
                IpAddr::V6(_) => format!("{hostname}. IN AAAA {ip}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    vec![Row {
        check: "A/AAAA",
        required: true,
        status,
        found,
        fix: Some(fix),
    }]
}

/// Reverse DNS, forward-confirmed, naming this server.
fn ptr_rows(subject: &Subject) -> Vec<Row> {
    let hostname = &subject.hostname;
    let checked: Vec<IpAddr> = if subject.addresses.is_empty() {
        subject.host_addresses().clone().unwrap_or_default()
    } else {
        subject.addresses.to_vec()
    };
    if checked.is_empty() {
        return vec![Row {
            check: "PTR",
            required: true,
            status: Status::Missing,
            found: "no address to check".into(),
            fix: Some("give this server's public addresses with --address".into()),
        }];
    }
    let dns = subject.dns;
    checked
        .iter()
        .map(|ip| {
            let names = dns.reverse_names(*ip).unwrap_or_default();
            let confirmed = names.iter().any(|name| {
                name.eq_ignore_ascii_case(hostname)
                    && dns
                        .addresses(name, AddressFamily::Any)
                        .is_ok_and(|found| found.contains(ip))
            });
            Row {
                check: "PTR",
                required: true,
                status: match (confirmed, names.is_empty()) {
                    (true, _) => Status::Ok,
                    (false, true) => Status::Missing,
                    (false, false) => Status::Wrong,
                },
                found: format!("{ip} -> {}", none_if_empty(&names.join(", "))),
                fix: Some(format!(
                    "reverse DNS of {ip} -> {hostname} (set at your hosting provider)"
                )),
            }
        })
        .collect()
}

/// SPF: one record that lets this server send.
fn spf_row(subject: &Subject) -> Vec<Row> {
    let domain = subject.domain;
    let (status, found) = match txt_starting(subject.dns, domain, "v=spf1") {
        Ok(records) if records.is_empty() => (Status::Missing, "none".to_string()),
        Ok(records) if records.len() > 1 => (
            Status::Wrong,
            format!("{} SPF records (RFC 7208 allows one)", records.len()),
        ),
        Ok(records) => (
            spf_lets_us_send(&records[0], subject.addresses),
            records[0].clone(),
        ),
        Err(why) => (Status::Wrong, format!("lookup failed: {why}")),
    };
    vec![Row {
        check: "SPF",
        required: true,
        status,
        found,
        fix: Some(format!("{domain}. IN TXT \"v=spf1 mx -all\"")),
    }]
}

/// Ok when `record` names this server (by mx, a, an include or redirect,
/// or one of `addresses`) and does not let everyone send.
fn spf_lets_us_send(record: &str, addresses: &[IpAddr]) -> Status {
    let terms: Vec<String> = record
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let lets_us = terms.iter().any(|t| {
        matches!(t.as_str(), "mx" | "a" | "+mx" | "+a")
            || t.starts_with("include:")
            || t.starts_with("redirect=")
            || addresses
                .iter()
                .any(|ip| t.trim_start_matches('+').ends_with(&format!(":{ip}")))
    });
    let open = terms.iter().any(|t| t == "+all" || t == "all");
    if lets_us && !open {
        Status::Ok
    } else {
        Status::Wrong
    }
}

/// DKIM: the selector in use publishes this server's key.
fn dkim_row(subject: &Subject) -> Vec<Row> {
    let domain = subject.domain;
    let signer = crate::dkim::Signer::load(subject.config);
    let selector = &subject.config.dkim.selector;
    let name = format!("{selector}._domainkey.{domain}");
    let ours = signer.as_ref().ok().and_then(|s| s.record(domain));
    let (status, found) = match txt_starting(subject.dns, &name, "v=DKIM1") {
        Ok(records) if records.is_empty() => (Status::Missing, "none".to_string()),
        Ok(records) => {
            let matches = ours
                .as_ref()
                .is_some_and(|ours| records.iter().any(|r| same_key(r, ours)));
            (
                if matches { Status::Ok } else { Status::Wrong },
                shorten(&records[0]),
            )
        }
        Err(why) => (Status::Wrong, format!("lookup failed: {why}")),
    };
    let fix = match (&ours, &signer) {
        (Some(record), _) => format!("{name}. IN TXT {}", crate::dkim::txt_strings(record)),
        // Keys are the server user's, 0600: run as root or as that user.
        (None, Err(error)) => format!("cannot read the DKIM keys: {error}"),
        (None, Ok(_)) => format!("no key here yet: run `petrel dkim generate {domain}`"),
    };
    vec![Row {
        check: "DKIM",
        required: true,
        status,
        found: format!("{selector}: {found}"),
        fix: Some(fix),
    }]
}

fn dmarc_row(subject: &Subject) -> Vec<Row> {
    let domain = subject.domain;
    vec![tag_row(
        subject.dns,
        "DMARC",
        true,
        &format!("_dmarc.{domain}"),
        "v=DMARC1",
        // Start safe: reports only. Tighten to p=quarantine, then
        // p=reject, once the reports show only your own mail passing.
        format!(
            "_dmarc.{domain}. IN TXT \"v=DMARC1; p=none; rua=mailto:postmaster@{domain}\" \
             (start with p=none; once the reports at rua show all your mail passing, move to \
             p=quarantine, then p=reject)"
        ),
    )]
}

/// Recommended: the TXT record, then the policy it announces.
fn mta_sts_row(subject: &Subject) -> Vec<Row> {
    let Subject {
        domain, hostname, ..
    } = subject;
    let mut mta_sts = tag_row(
        subject.dns,
        "MTA-STS",
        false,
        &format!("_mta-sts.{domain}"),
        "v=STSv1",
        format!(
            "_mta-sts.{domain}. IN TXT \"v=STSv1; id=1\" and a policy at \
             https://mta-sts.{domain}/.well-known/mta-sts.txt (text/plain):\n    \
             version: STSv1\n    mode: testing\n    mx: {hostname}\n    max_age: 604800\n    \
             (start in testing; once TLS reports show senders reaching you over valid TLS, \
             switch to mode: enforce and raise the id)"
        ),
    );
    if mta_sts.status == Status::Ok {
        let (status, found) = mta_sts_policy(subject.config, subject.dns, domain);
        mta_sts.status = status;
        mta_sts.found = format!("{}; {found}", mta_sts.found);
    }
    vec![mta_sts]
}

/// Recommended.
fn tls_rpt_row(subject: &Subject) -> Vec<Row> {
    let domain = subject.domain;
    vec![tag_row(
        subject.dns,
        "TLS-RPT",
        false,
        &format!("_smtp._tls.{domain}"),
        "v=TLSRPTv1",
        format!("_smtp._tls.{domain}. IN TXT \"v=TLSRPTv1; rua=mailto:postmaster@{domain}\""),
    )]
}

/// The MTA-STS policy the TXT record announces, fetched as delivery
/// would: it must parse and list this server's hostname as an MX.
fn mta_sts_policy(config: &Config, dns: &Dns, domain: &str) -> (Status, String) {
    let trust = crate::tls::client::SmarthostTrust {
        ca_file: config.delivery.ca_file.clone(),
        fingerprint: None,
    };
    let tls = match crate::tls::client::verified(&trust) {
        Ok(tls) => tls,
        Err(error) => return (Status::Wrong, format!("policy not fetched: {error}")),
    };
    let policy = crate::mta_sts::fetch::policy_text(
        dns,
        &crate::policy::outbound::OutboundPolicy::from_config(config),
        domain,
        config.delivery.mta_sts_port,
        tls,
    )
    .and_then(|body| crate::mta_sts::parse_policy(domain, "", &body, std::time::SystemTime::now()));
    match policy {
        Err(why) => (Status::Wrong, format!("policy: {why}")),
        Ok(policy) if !policy.allows_host(&config.hostname) => (
            Status::Wrong,
            format!(
                "policy ({}) does not list {} as an MX",
                policy.mode.name(),
                config.hostname
            ),
        ),
        Ok(policy) => (
            Status::Ok,
            format!(
                "policy: mode {}, mx {}",
                policy.mode.name(),
                policy.mx.join(" ")
            ),
        ),
    }
}

/// A record identified by its version tag: present or not.
fn tag_row(
    dns: &Dns,
    check: &'static str,
    required: bool,
    name: &str,
    tag: &str,
    fix: String,
) -> Row {
    let (status, found) = match txt_starting(dns, name, tag) {
        Ok(records) if records.is_empty() => (Status::Missing, "none".to_string()),
        Ok(records) if records.len() > 1 => (
            Status::Wrong,
            format!("{} records (one is allowed)", records.len()),
        ),
        Ok(records) => (Status::Ok, shorten(&records[0])),
        Err(why) => (Status::Wrong, format!("lookup failed: {why}")),
    };
    Row {
        check,
        required,
        status,
        found,
        fix: Some(fix),
    }
}

/// Two DKIM records publish the same key (tags compared without spaces).
fn same_key(published: &str, ours: &str) -> bool {
    let p_of = |record: &str| {
        record
            .split(';')
            .map(|tag| tag.split_whitespace().collect::<String>())
            .find_map(|tag| tag.strip_prefix("p=").map(str::to_string))
    };
    p_of(published).is_some() && p_of(published) == p_of(ours)
}

fn shorten(text: &str) -> String {
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text.to_string()
    }
}

fn none_if_empty(text: &str) -> &str {
    if text.is_empty() { "none" } else { text }
}

fn join(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn render(domain: &str, hostname: &str, rows: &[Row]) -> String {
    let mut out = format!("DNS for {domain}, mail server {hostname}\n\n");
    out.push_str(&format!(
        "{:<8} {:<12} {:<8} {}\n",
        "CHECK", "NEED", "STATUS", "FOUND"
    ));
    for row in rows {
        let kind = if row.required {
            "required"
        } else {
            "recommended"
        };
        out.push_str(&format!(
            "{:<8} {:<12} {:<8} {}\n",
            row.check,
            kind,
            row.status.word(),
            crate::printable::escape(&row.found)
        ));
    }
    let gaps: Vec<&Row> = rows.iter().filter(|r| r.status != Status::Ok).collect();
    if gaps.is_empty() {
        out.push_str("\nEverything is in place.\n");
    } else {
        out.push_str("\nTo publish:\n");
        for row in gaps {
            if let Some(fix) = &row.fix {
                for line in fix.lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_spf_records_let_this_server_send() {
        let ours: [IpAddr; 2] = ["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()];
        #[rustfmt::skip]
        let table = [
            ("v=spf1 mx -all", Status::Ok),
            ("v=spf1 +a ~all", Status::Ok),
            ("v=spf1 include:_spf.example.net -all", Status::Ok),
            ("v=spf1 redirect=example.net", Status::Ok),
            ("v=spf1 ip4:192.0.2.7 -all", Status::Ok),
            ("v=spf1 IP6:2001:db8::7 -all", Status::Ok),
            ("v=spf1 ip4:198.51.100.1 -all", Status::Wrong),
            ("v=spf1 -all", Status::Wrong),
            ("v=spf1 mx +all", Status::Wrong),
            ("v=spf1 mx all", Status::Wrong),
        ];
        for (record, expected) in table {
            assert_eq!(spf_lets_us_send(record, &ours), expected, "{record}");
        }
    }
}
