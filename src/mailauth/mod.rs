//! Email authentication of inbound mail on the MX port: SPF at MAIL FROM
//! ([`spf`]), DKIM verification ([`crate::dkim::verify`]) and DMARC
//! ([`dmarc`]) when the message is complete, and the
//! `Authentication-Results:` header (RFC 8601) that records them for the
//! reader's mail program ([`results`]).
//!
//! Which mail is checked is decided once, in [`applies`], at MAIL FROM;
//! the transaction carries the SPF verdict from then on, and its presence
//! is what later stages read. Every lookup goes through the server's DNS
//! facade (its timeouts, its cache) behind the [`Lookups`] trait, so the
//! evaluators are unit-tested against a table.

pub mod dmarc;
pub mod results;
pub mod spf;

use std::io::Read;
use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use crate::config::{Config, MailAuthConfig};
use crate::dkim::verify::{self as dkim_verify, DkimOutcome};
use crate::dns::{Dns, DnsFailure};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{ClientView, ListenerKind};
use dmarc::{DmarcPolicy, DmarcResult, DmarcVerdict};
use spf::SpfVerdict;

/// The DNS questions SPF, DKIM and DMARC ask. An empty answer (no such
/// name, or no records of the type) is `Ok` and empty.
pub trait Lookups {
    fn txt(&self, name: &str) -> Result<Vec<String>, DnsFailure>;
    /// AAAA records when `ipv6`, else A records.
    fn addresses(&self, name: &str, ipv6: bool) -> Result<Vec<IpAddr>, DnsFailure>;
    /// The exchanges of the MX records, as they are (no implicit MX).
    fn mx_names(&self, name: &str) -> Result<Vec<String>, DnsFailure>;
    fn reverse_names(&self, ip: IpAddr) -> Result<Vec<String>, DnsFailure>;
}

impl Lookups for Dns {
    fn txt(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        Dns::txt(self, name)
    }

    fn addresses(&self, name: &str, ipv6: bool) -> Result<Vec<IpAddr>, DnsFailure> {
        let family = if ipv6 {
            crate::config::AddressFamily::Ipv6
        } else {
            crate::config::AddressFamily::Ipv4
        };
        match Dns::addresses(self, name, family) {
            Ok(addresses) => Ok(addresses),
            Err(DnsFailure::Temporary(why)) => Err(DnsFailure::Temporary(why)),
            Err(_) => Ok(Vec::new()),
        }
    }

    fn mx_names(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        Dns::mx_names(self, name)
    }

    fn reverse_names(&self, ip: IpAddr) -> Result<Vec<String>, DnsFailure> {
        Dns::reverse_names(self, ip)
    }
}

/// Whether mail from this client is checked: only on the MX port, only
/// from strangers (unless configured otherwise). The one place this is
/// decided; later stages look at whether the transaction has a verdict.
pub fn applies(config: &Config, client: &ClientView) -> bool {
    let settings = &config.mail_auth;
    settings.enabled
        && client.listener == ListenerKind::Smtp
        && client.local.is_none()
        && !(settings.skip_authenticated && client.user.is_some())
        && !(settings.skip_trusted_networks && config.relay.is_trusted(client.ip))
}

/// The SPF check at MAIL FROM.
pub fn check_sender(lookups: &dyn Lookups, client: &ClientView, sender: &str) -> SpfVerdict {
    let client = spf::Client {
        ip: client.ip,
        helo: client.helo.unwrap_or(""),
    };
    spf::check_sender(lookups, &client, sender)
}

/// What the checks at the end of DATA found and decided.
#[derive(Debug)]
pub struct MessageVerdict {
    /// The `Authentication-Results:` field, ending in CRLF.
    pub header: String,
    /// Set when the message is to be refused (DMARC p=reject).
    pub refusal: Option<Reply>,
    /// One line for the log (domains from the message escaped).
    pub summary: String,
}

/// Verifies DKIM and evaluates DMARC for the message `message` reads (as
/// received, before any header of ours), given the SPF verdict from MAIL
/// FROM. `Err` only if the message cannot be read.
pub fn check_message(
    lookups: &dyn Lookups,
    settings: &MailAuthConfig,
    hostname: &str,
    spf: &SpfVerdict,
    message: &mut dyn Read,
    max_header_section: usize,
) -> std::io::Result<MessageVerdict> {
    let section = dkim_verify::read_header_section(message, max_header_section)?;
    let dkim = dkim_verify::verify(lookups, &section, message, SystemTime::now())?;
    let from = dmarc::from_domain(&section.fields);
    let dmarc = dmarc::evaluate(
        lookups,
        from.as_deref().map_err(Clone::clone),
        spf,
        &dkim,
        Instant::now() + spf::EVALUATION_BUDGET,
    );
    let refusal = refusal(settings, &dmarc);
    Ok(MessageVerdict {
        header: results::header(hostname, spf, &dkim, &dmarc),
        summary: summary(spf, &dkim, &dmarc),
        refusal,
    })
}

/// RFC 7489 6.7: honour p=reject when configured to; quarantine and
/// none only tag (there is no junk folder to file mail into).
fn refusal(settings: &MailAuthConfig, dmarc: &DmarcVerdict) -> Option<Reply> {
    let rejecting = dmarc.result == DmarcResult::Fail && dmarc.policy == Some(DmarcPolicy::Reject);
    (rejecting && settings.honour_dmarc_reject).then(|| {
        Reply::new(
            reply::DMARC_REJECT,
            format!(
                "Message refused: the DMARC policy of {} says reject, and neither SPF nor DKIM \
                 passed for it",
                dmarc.from_domain.as_deref().unwrap_or("the sender")
            ),
        )
    })
}

fn summary(spf: &SpfVerdict, dkim: &[DkimOutcome], dmarc: &DmarcVerdict) -> String {
    let dkim = if dkim.is_empty() {
        "none".to_string()
    } else {
        dkim.iter()
            .map(|o| format!("{}({})", o.result.name(), o.domain))
            .collect::<Vec<_>>()
            .join(",")
    };
    let line = format!(
        "spf={}({}) dkim={dkim} dmarc={}({}{})",
        spf.result.name(),
        spf.domain,
        dmarc.result.name(),
        dmarc.from_domain.as_deref().unwrap_or(""),
        dmarc
            .policy
            .map(|p| format!(" p={}", p.name()))
            .unwrap_or_default()
    );
    crate::printable::escape(&line).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::{HashMap, HashSet};

    #[test]
    fn strangers_on_the_mx_port_are_checked_and_nobody_else() {
        let mut config = Config::default();
        config.relay.trusted_networks = vec!["10.0.0.0/8".parse().unwrap()];
        let local = crate::protocol::session::LocalUser {
            uid: 1000,
            name: "u".into(),
            address: "u@localhost".into(),
            trusted: false,
        };
        let view = |ip: &str, user: Option<&'static str>, listener| ClientView {
            ip: ip.parse().unwrap(),
            name: None,
            helo: Some("client.example"),
            user,
            listener,
            local: None,
        };
        let stranger = view("192.0.2.1", None, ListenerKind::Smtp);
        assert!(applies(&config, &stranger));
        assert!(!applies(
            &config,
            &view("10.1.2.3", None, ListenerKind::Smtp)
        ));
        assert!(!applies(
            &config,
            &view("192.0.2.1", Some("a@b"), ListenerKind::Smtp)
        ));
        assert!(!applies(
            &config,
            &view("192.0.2.1", None, ListenerKind::Submission)
        ));
        assert!(!applies(
            &config,
            &view("192.0.2.1", None, ListenerKind::Smtps)
        ));
        let local_view = ClientView {
            local: Some(&local),
            ..view("127.0.0.1", None, ListenerKind::Smtp)
        };
        assert!(!applies(&config, &local_view));
        config.mail_auth.skip_trusted_networks = false;
        config.mail_auth.skip_authenticated = false;
        assert!(applies(
            &config,
            &view("10.1.2.3", None, ListenerKind::Smtp)
        ));
        assert!(applies(
            &config,
            &view("192.0.2.1", Some("a@b"), ListenerKind::Smtp)
        ));
        config.mail_auth.enabled = false;
        assert!(!applies(&config, &stranger));
    }

    /// A DNS table for the evaluators' unit tests; counts queries.
    #[derive(Default)]
    pub struct FakeDns {
        txt: RefCell<HashMap<String, Vec<String>>>,
        addresses: RefCell<HashMap<String, Vec<IpAddr>>>,
        mx: RefCell<HashMap<String, Vec<String>>>,
        ptr: RefCell<HashMap<IpAddr, Vec<String>>>,
        failing: RefCell<HashSet<String>>,
        queries: Cell<usize>,
    }

    impl FakeDns {
        pub fn txt(self, name: &str, text: &str) -> Self {
            self.txt
                .borrow_mut()
                .entry(name.to_string())
                .or_default()
                .push(text.to_string());
            self
        }

        pub fn add_a(&self, name: &str, ip: &str) {
            self.addresses
                .borrow_mut()
                .entry(name.to_string())
                .or_default()
                .push(ip.parse().unwrap());
        }

        pub fn a(self, name: &str, ip: &str) -> Self {
            self.add_a(name, ip);
            self
        }

        pub fn aaaa(self, name: &str, ip: &str) -> Self {
            self.a(name, ip)
        }

        /// An A record under a name that is only ever asked with A.
        pub fn a_only(self, name: &str, ip: &str) -> Self {
            self.a(name, ip)
        }

        pub fn mx(self, name: &str, host: &str) -> Self {
            self.mx
                .borrow_mut()
                .entry(name.to_string())
                .or_default()
                .push(host.to_string());
            self
        }

        pub fn ptr(self, ip: &str, name: &str) -> Self {
            self.ptr
                .borrow_mut()
                .entry(ip.parse().unwrap())
                .or_default()
                .push(name.to_string());
            self
        }

        pub fn fail(self, name: &str) -> Self {
            self.failing.borrow_mut().insert(name.to_string());
            self
        }

        pub fn queries(&self) -> usize {
            self.queries.get()
        }

        fn ask(&self, name: &str) -> Result<(), DnsFailure> {
            self.queries.set(self.queries.get() + 1);
            if self.failing.borrow().contains(name) {
                return Err(DnsFailure::Temporary("SERVFAIL".into()));
            }
            Ok(())
        }
    }

    impl Lookups for FakeDns {
        fn txt(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
            self.ask(name)?;
            Ok(self.txt.borrow().get(name).cloned().unwrap_or_default())
        }

        fn addresses(&self, name: &str, ipv6: bool) -> Result<Vec<IpAddr>, DnsFailure> {
            self.ask(name)?;
            let all = self
                .addresses
                .borrow()
                .get(name)
                .cloned()
                .unwrap_or_default();
            Ok(all.into_iter().filter(|ip| ip.is_ipv6() == ipv6).collect())
        }

        fn mx_names(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
            self.ask(name)?;
            Ok(self.mx.borrow().get(name).cloned().unwrap_or_default())
        }

        fn reverse_names(&self, ip: IpAddr) -> Result<Vec<String>, DnsFailure> {
            self.ask(&ip.to_string())?;
            Ok(self.ptr.borrow().get(&ip).cloned().unwrap_or_default())
        }
    }
}
