//! The session's window on the rest of the server: gathers the facts a
//! policy decision needs (config, accounts, aliases, the brute-force
//! limiter) and asks [`crate::policy`] for the verdict.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::{Accounts, AuthLimiter, FailureOutcome, password};
use crate::config::Config;
use crate::dns::Dns;
use crate::policy::{self, DomainStatus, RecipientDecision, RecipientFacts, SenderFacts};
use crate::protocol::address::{Address, ReversePath};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{AuthVerdict, ClientView, Services};

/// Alias chains longer than this are cut (and the last address used as is).
const MAX_ALIAS_DEPTH: usize = 10;

pub struct Directory {
    config: Arc<Config>,
    accounts: Accounts,
    limiter: AuthLimiter,
    /// Address verification; without it domains are not checked.
    dns: Option<Arc<Dns>>,
}

impl Directory {
    pub fn new(config: Arc<Config>, accounts: Accounts, dns: Option<Arc<Dns>>) -> Directory {
        let limiter = AuthLimiter::new(&config.auth);
        Directory {
            config,
            accounts,
            limiter,
            dns,
        }
    }

    fn domain_status(&self, address: &Address) -> DomainStatus {
        if address.domain().literal_ip().is_some() {
            return DomainStatus::Exists;
        }
        match &self.dns {
            Some(dns) => dns.domain_status(address.domain().as_str()),
            None => DomainStatus::NotChecked,
        }
    }

    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// The final addresses a local alias leads to, or `None` when the
    /// address is not an alias.
    pub fn expand_alias(&self, address: &Address) -> Option<Vec<Address>> {
        expand_alias(&self.config, address)
    }

    fn local_error(&self, what: &str, error: impl std::fmt::Display) -> Reply {
        log::error!("{what}: {error}");
        Reply::new(
            reply::LOCAL_ERROR,
            "Local error in processing, try again later",
        )
    }
}

/// Recursive alias expansion. An address met again on its own chain is a
/// mailbox, so `"alice" = ["alice", "archive"]` delivers to both.
pub fn expand_alias(config: &Config, address: &Address) -> Option<Vec<Address>> {
    config.aliases.get(&address.lookup_key())?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    expand_into(config, address, 0, &mut seen, &mut out);
    Some(out)
}

fn expand_into(
    config: &Config,
    address: &Address,
    depth: usize,
    seen: &mut HashSet<String>,
    out: &mut Vec<Address>,
) {
    let key = address.lookup_key();
    let targets = config.aliases.get(&key);
    match targets {
        Some(targets) if depth < MAX_ALIAS_DEPTH && seen.insert(key) => {
            for target in targets.as_slice() {
                if let Ok(target) = Address::parse(target) {
                    expand_into(config, &target, depth + 1, seen, out);
                }
            }
        }
        _ => {
            if !out.contains(address) {
                out.push(address.clone());
            }
        }
    }
}

/// Problems that make mail undeliverable without making the config invalid:
/// `postmaster@` of a local domain that goes nowhere (RFC 5321 4.5.1
/// requires it), and aliases that point at local mailboxes that do not exist.
pub fn deliverability_warnings(
    config: &Config,
    account_exists: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let deliverable = |address: &Address| {
        let key = address.lookup_key();
        config.aliases.contains_key(&key) || account_exists(&key)
    };
    for domain in &config.domains.local {
        if let Ok(postmaster) = Address::parse(&format!("postmaster@{domain}"))
            && !deliverable(&postmaster)
        {
            warnings.push(format!(
                "postmaster@{domain} is neither an account nor an alias; RFC 5321 requires it to \
                 be deliverable: add [aliases] \"postmaster@{domain}\" = \"you@{domain}\""
            ));
        }
    }
    for alias in config.aliases.keys() {
        let Ok(address) = Address::parse(alias) else {
            continue;
        };
        for target in expand_alias(config, &address).unwrap_or_default() {
            if config.is_local_domain(target.domain()) && !account_exists(&target.lookup_key()) {
                warnings.push(format!(
                    "alias {alias} leads to {target}, which is not an account; mail to it would bounce"
                ));
            }
        }
    }
    warnings
}

impl Services for Directory {
    fn check_sender(&self, client: &ClientView, sender: &ReversePath) -> Result<(), Reply> {
        let address = sender.address();
        let owned_by_user = match (client.user, address) {
            (Some(user), Some(address)) => {
                address.lookup_key() == user
                    || self
                        .expand_alias(address)
                        .is_some_and(|targets| targets.iter().any(|t| t.lookup_key() == user))
            }
            _ => false,
        };
        let mut facts = SenderFacts {
            null_sender: address.is_none(),
            authenticated_as: client.user.map(str::to_string),
            owned_by_user,
            login_must_match: self.config.auth.sender_login_match,
            trusted_network: self.config.relay.is_trusted(client.ip),
            local_domain: address.is_some_and(|a| self.config.is_local_domain(a.domain())),
            domain: DomainStatus::NotChecked,
        };
        if let Some(address) = address
            && policy::sender_needs_dns(&facts)
        {
            facts.domain = self.domain_status(address);
        }
        policy::decide_sender(&facts)
    }

    fn check_recipient(
        &self,
        client: &ClientView,
        recipient: &Address,
    ) -> Result<Vec<Address>, Reply> {
        let local_domain = self.config.is_local_domain(recipient.domain());
        let mut aliases = None;
        let mut mailbox_exists = false;
        if local_domain {
            aliases = self.expand_alias(recipient);
            mailbox_exists = aliases.is_some()
                || match self.accounts.exists(&recipient.lookup_key()) {
                    Ok(exists) => exists,
                    Err(error) => return Err(self.local_error("recipient lookup", error)),
                };
        }
        let mut facts = RecipientFacts {
            local_domain,
            mailbox_exists,
            authenticated: client.user.is_some(),
            trusted_network: self.config.relay.is_trusted(client.ip),
            domain: DomainStatus::NotChecked,
        };
        if policy::recipient_needs_dns(&facts) {
            facts.domain = self.domain_status(recipient);
        }
        match policy::decide_recipient(&facts) {
            RecipientDecision::DeliverLocally => {
                Ok(aliases.unwrap_or_else(|| vec![recipient.clone()]))
            }
            RecipientDecision::Relay => Ok(vec![recipient.clone()]),
            RecipientDecision::Refuse(reply) => Err(reply),
        }
    }

    fn authenticate(&self, ip: IpAddr, username: &str, password: &str) -> AuthVerdict {
        if self.limiter.is_locked_out(ip) {
            return AuthVerdict::LockedOut;
        }
        let key = Address::parse(username).map(|a| a.lookup_key()).ok();
        let stored = match &key {
            Some(key) => match self.accounts.password_hash(key) {
                Ok(stored) => stored,
                Err(error) => {
                    log::error!("auth: {error}");
                    return AuthVerdict::Unavailable;
                }
            },
            None => None,
        };
        let valid = match &stored {
            Some(stored) => password::verify(password, stored),
            None => {
                password::verify_against_nothing(password);
                false
            }
        };
        match (valid, key) {
            (true, Some(key)) => {
                self.limiter.record_success(ip);
                log::info!("{ip}: AUTH succeeded for {key}");
                AuthVerdict::Success(key)
            }
            _ => {
                let outcome = self.limiter.record_failure(ip);
                log::warn!("{ip}: AUTH failed for {username:?} ({outcome:?})");
                match outcome {
                    FailureOutcome::Delay(delay) => AuthVerdict::Failure { delay },
                    FailureOutcome::LockedOut => AuthVerdict::LockedOut,
                }
            }
        }
    }

    fn is_locked_out(&self, ip: IpAddr) -> bool {
        self.limiter.is_locked_out(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(aliases: &str) -> Config {
        Config::parse(&format!(
            "[domains]\nlocal = [\"example.com\"]\n[aliases]\n{aliases}"
        ))
        .unwrap()
    }

    fn expand(config: &Config, address: &str) -> Option<Vec<String>> {
        expand_alias(config, &Address::parse(address).unwrap())
            .map(|list| list.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn aliases_expand_recursively_without_loops() {
        let config = config_with(
            r#"
"postmaster@example.com" = "abuse@example.com"
"abuse@example.com" = ["alice@example.com", "bob@elsewhere.org"]
"alice@example.com" = ["alice@example.com", "archive@example.com"]
"loop1@example.com" = "loop2@example.com"
"loop2@example.com" = "loop1@example.com"
"#,
        );
        assert_eq!(
            expand(&config, "Postmaster@EXAMPLE.com"),
            Some(vec![
                "alice@example.com".into(),
                "archive@example.com".into(),
                "bob@elsewhere.org".into()
            ])
        );
        assert_eq!(
            expand(&config, "loop1@example.com"),
            Some(vec!["loop1@example.com".into()])
        );
        assert_eq!(expand(&config, "carol@example.com"), None);
    }

    #[test]
    fn warnings_for_undeliverable_postmaster_and_aliases() {
        let config =
            config_with("\"team@example.com\" = [\"alice@example.com\", \"ghost@example.com\"]\n");
        let warnings = deliverability_warnings(&config, |address| address == "alice@example.com");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("postmaster@example.com"));
        assert!(warnings[1].contains("ghost@example.com"));
        let fixed = config_with("\"postmaster@example.com\" = \"alice@example.com\"\n");
        assert!(deliverability_warnings(&fixed, |a| a == "alice@example.com").is_empty());
    }
}
