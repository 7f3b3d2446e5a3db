//! Where mail for an address goes, decided once: when a message is
//! accepted (RCPT TO in an SMTP session, or `petrel sendmail`). The answer
//! is stored with each recipient in the queue, and the scheduler and the
//! delivery workers read it back; nothing after acceptance asks again
//! whether an address is local, which mailbox it is, or whether it exists.
//!
//! Pure: account existence comes from the caller ([`Mailboxes`]); no DNS,
//! no IO. Who may send to a route is [`crate::policy`]'s question, asked
//! right after this one.

use std::collections::HashSet;

use crate::config::Config;
pub use crate::envelope::{Recipient, Route};
use crate::protocol::address::Address;

/// Alias chains longer than this are refused rather than followed.
pub const MAX_ALIAS_DEPTH: usize = 10;
/// One RCPT may fan out to at most this many final recipients, so one
/// message cannot turn into unbounded outbound work.
pub const MAX_ALIAS_TARGETS: usize = 1000;

/// Why an address has no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// A local domain, but no account and no alias by that name.
    NoSuchMailbox,
    /// An alias chain deeper than [`MAX_ALIAS_DEPTH`].
    AliasTooDeep,
    /// An alias that fans out to more than [`MAX_ALIAS_TARGETS`] recipients.
    TooManyTargets,
    /// The account store could not be read.
    Unavailable(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NoSuchMailbox => f.write_str("no such mailbox"),
            RouteError::AliasTooDeep => write!(
                f,
                "an alias leads through more than {MAX_ALIAS_DEPTH} others (a loop?)"
            ),
            RouteError::TooManyTargets => write!(
                f,
                "an alias leads to more than {MAX_ALIAS_TARGETS} recipients"
            ),
            RouteError::Unavailable(why) => write!(f, "the accounts cannot be read: {why}"),
        }
    }
}

/// The outcome for one address: its final recipients, and alias targets
/// that were dropped because they name no mailbox (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The address is in one of `domains.local`.
    pub local_domain: bool,
    pub targets: Vec<Recipient>,
    pub skipped: Vec<String>,
}

/// The accounts, as far as routing needs them.
pub trait Mailboxes {
    /// Whether the mailbox with this canonical key exists.
    fn mailbox_exists(&self, mailbox: &str) -> Result<bool, String>;
}

/// Resolves an address given in RCPT TO (or to `sendmail`): aliases are
/// expanded, local targets are checked against the accounts, and each
/// final recipient gets its route.
pub fn resolve(
    config: &Config,
    mailboxes: &dyn Mailboxes,
    address: &Address,
) -> Result<Resolution, RouteError> {
    if !config.is_local_domain(address.domain()) {
        return Ok(Resolution {
            local_domain: false,
            targets: vec![route_final(config, address)],
            skipped: Vec::new(),
        });
    }
    let finals = match expand_alias(config, address)? {
        Some(finals) => finals,
        None => vec![address.clone()],
    };
    let is_alias = config.aliases.contains_key(&address.mailbox_key());
    let mut resolution = Resolution {
        local_domain: true,
        targets: Vec::new(),
        skipped: Vec::new(),
    };
    for target in finals {
        let routed = route_final(config, &target);
        if let Route::Local { mailbox } = &routed.route {
            let exists = mailboxes
                .mailbox_exists(mailbox)
                .map_err(RouteError::Unavailable)?;
            if !exists {
                // A stale alias target must not stop mail to the others,
                // nor be accepted and bounced later.
                resolution.skipped.push(mailbox.clone());
                continue;
            }
        }
        if !resolution
            .targets
            .iter()
            .any(|t| t.route == routed.route && t.address == routed.address)
        {
            resolution.targets.push(routed);
        }
    }
    if resolution.targets.is_empty() {
        return Err(RouteError::NoSuchMailbox);
    }
    if !is_alias {
        resolution.skipped.clear();
    }
    Ok(resolution)
}

/// The route of an address that is already final (no alias expansion, no
/// existence check): used by [`resolve`] for each target, and once when
/// recipients queued by an older petrel are given their stored route.
pub fn route_final(config: &Config, address: &Address) -> Recipient {
    let domain = address.domain().as_str().to_string();
    if config.is_local_domain(address.domain()) {
        let mailbox = address.mailbox_key();
        return Recipient {
            address: mailbox.clone(),
            domain,
            route: Route::Local { mailbox },
        };
    }
    Recipient {
        address: address.to_string(),
        route: remote_route(config, &domain),
        domain,
    }
}

/// Non-local mail goes to the smart host when one is configured, else to
/// the domain's MX hosts.
pub fn remote_route(config: &Config, domain: &str) -> Route {
    if config.delivery.smarthost.is_some() {
        Route::SmartHost
    } else {
        Route::Remote {
            domain: domain.to_string(),
        }
    }
}

/// Where a delivery status notification to `sender` goes: routed like any
/// recipient (a local sender's alias is expanded); an address that routes
/// nowhere still gets its plain route, so a failure there is recorded
/// (and, being about a notice, never reported again).
pub fn notice_route(config: &Config, mailboxes: &dyn Mailboxes, sender: &str) -> Vec<Recipient> {
    let Ok(address) = Address::parse(sender) else {
        return Vec::new();
    };
    match resolve(config, mailboxes, &address) {
        Ok(resolution) => resolution.targets,
        Err(_) => vec![route_final(config, &address)],
    }
}

/// The final addresses a local alias leads to, or `None` when the address
/// is not an alias. An address met again on its own chain is a mailbox,
/// so `"alice" = ["alice", "archive"]` delivers to both.
pub fn expand_alias(
    config: &Config,
    address: &Address,
) -> Result<Option<Vec<Address>>, RouteError> {
    if !config.aliases.contains_key(&address.mailbox_key()) {
        return Ok(None);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    expand_into(config, address, 0, &mut seen, &mut out)?;
    Ok(Some(out))
}

fn expand_into(
    config: &Config,
    address: &Address,
    depth: usize,
    seen: &mut HashSet<String>,
    out: &mut Vec<Address>,
) -> Result<(), RouteError> {
    let key = address.mailbox_key();
    match config.aliases.get(&key) {
        Some(targets) if !seen.contains(&key) => {
            if depth >= MAX_ALIAS_DEPTH {
                return Err(RouteError::AliasTooDeep);
            }
            seen.insert(key.clone());
            for target in targets.as_slice() {
                // Targets were validated when the config was loaded.
                if let Ok(target) = Address::parse(target) {
                    expand_into(config, &target, depth + 1, seen, out)?;
                }
            }
            seen.remove(&key);
        }
        _ => {
            if !out.contains(address) {
                if out.len() >= MAX_ALIAS_TARGETS {
                    return Err(RouteError::TooManyTargets);
                }
                out.push(address.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Accounts(&'static [&'static str]);

    impl Mailboxes for Accounts {
        fn mailbox_exists(&self, mailbox: &str) -> Result<bool, String> {
            Ok(self.0.contains(&mailbox))
        }
    }

    const ACCOUNTS: Accounts = Accounts(&[
        "alice@example.com",
        "archive@example.com",
        "jösé@example.com",
    ]);

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            "[domains]\nlocal = [\"example.com\"]\n[aliases]\n\
             \"postmaster@example.com\" = \"abuse@example.com\"\n\
             \"abuse@example.com\" = [\"ALICE@example.com\", \"bob@elsewhere.org\"]\n\
             \"alice@example.com\" = [\"alice@example.com\", \"archive@example.com\"]\n\
             \"loop1@example.com\" = \"loop2@example.com\"\n\
             \"loop2@example.com\" = \"loop1@example.com\"\n\
             \"team@example.com\" = [\"alice@example.com\", \"ghost@example.com\"]\n\
             {extra}"
        ))
        .unwrap()
    }

    fn routes(config: &Config, address: &str) -> Result<Vec<(String, Route)>, RouteError> {
        let address = Address::parse(address).unwrap();
        resolve(config, &ACCOUNTS, &address).map(|r| {
            r.targets
                .into_iter()
                .map(|t| (t.address, t.route))
                .collect()
        })
    }

    fn local(mailbox: &str) -> (String, Route) {
        (
            mailbox.to_string(),
            Route::Local {
                mailbox: mailbox.to_string(),
            },
        )
    }

    #[test]
    fn local_addresses_route_to_their_canonical_mailbox() {
        let config = config("");
        for address in [
            "ALICE@example.com",
            "Alice@EXAMPLE.com",
            "\"alice\"@example.com",
        ] {
            assert_eq!(
                routes(&config, address).unwrap(),
                vec![local("alice@example.com"), local("archive@example.com")],
                "{address}"
            );
        }
        assert_eq!(
            routes(&config, "JÖSÉ@example.com").unwrap(),
            vec![local("jösé@example.com")]
        );
        assert_eq!(
            routes(&config, "carol@example.com"),
            Err(RouteError::NoSuchMailbox)
        );
    }

    #[test]
    fn aliases_expand_recursively_and_skip_missing_mailboxes() {
        let config = config("");
        assert_eq!(
            routes(&config, "Postmaster@EXAMPLE.com").unwrap(),
            vec![
                local("alice@example.com"),
                local("archive@example.com"),
                (
                    "bob@elsewhere.org".to_string(),
                    Route::Remote {
                        domain: "elsewhere.org".into()
                    }
                ),
            ]
        );
        // A loop with no mailbox in it leads nowhere.
        assert_eq!(
            routes(&config, "loop1@example.com"),
            Err(RouteError::NoSuchMailbox)
        );
        let team = resolve(
            &config,
            &ACCOUNTS,
            &Address::parse("team@example.com").unwrap(),
        )
        .unwrap();
        assert_eq!(team.skipped, vec!["ghost@example.com".to_string()]);
        assert_eq!(team.targets.len(), 2, "alice's own alias still expands");
    }

    #[test]
    fn deep_and_wide_aliases_are_refused() {
        let mut chain = String::new();
        for n in 0..=MAX_ALIAS_DEPTH {
            chain.push_str(&format!(
                "\"a{n}@example.com\" = \"a{}@example.com\"\n",
                n + 1
            ));
        }
        let deep = config(&chain);
        assert_eq!(
            routes(&deep, "a0@example.com"),
            Err(RouteError::AliasTooDeep)
        );
        let many: Vec<String> = (0..=MAX_ALIAS_TARGETS)
            .map(|n| format!("\"u{n}@elsewhere.org\""))
            .collect();
        let wide = config(&format!("\"list@example.com\" = [{}]\n", many.join(", ")));
        assert_eq!(
            routes(&wide, "list@example.com"),
            Err(RouteError::TooManyTargets)
        );
    }

    #[test]
    fn remote_addresses_keep_their_case_and_follow_the_smart_host() {
        let direct = config("");
        assert_eq!(
            routes(&direct, "Bob@Elsewhere.ORG").unwrap(),
            vec![(
                "Bob@elsewhere.org".to_string(),
                Route::Remote {
                    domain: "elsewhere.org".into()
                }
            )]
        );
        let relayed = config("[delivery]\nsmarthost = \"relay.example.net:587\"\n");
        assert_eq!(
            routes(&relayed, "bob@elsewhere.org").unwrap(),
            vec![("bob@elsewhere.org".to_string(), Route::SmartHost)]
        );
        // Local mail never goes to the smart host.
        assert_eq!(
            routes(&relayed, "jösé@example.com").unwrap(),
            vec![local("jösé@example.com")]
        );
    }
}
