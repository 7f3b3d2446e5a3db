//! Who may send what to whom: the relay and sender decisions as pure
//! functions of facts gathered elsewhere, and ([`outbound`]) which hosts
//! delivery may connect to. No lookups happen here, so every rule is a row
//! in a table test.

pub mod outbound;

use crate::protocol::reply::{self, Reply};

/// What is known about one RCPT TO address when it is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientFacts {
    /// The domain is one of `domains.local`.
    pub local_domain: bool,
    /// For local domains: an account or alias exists for the address.
    pub mailbox_exists: bool,
    /// The client authenticated with AUTH.
    pub authenticated: bool,
    /// The client address is in `relay.trusted_networks`.
    pub trusted_network: bool,
    /// Relayed mail goes to `delivery.smarthost`, which decides what it
    /// takes: the domain is not looked up here (as Postfix does with a
    /// relayhost).
    pub by_smarthost: bool,
    /// For relayed recipients: what DNS says about the domain.
    pub domain: DomainStatus,
}

/// The DNS verdict on a domain (MX, or A/AAAA fallback; RFC 5321 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainStatus {
    /// Not looked up (local domains, or lookups not needed for this decision).
    NotChecked,
    Exists,
    /// NXDOMAIN, or no MX and no address records.
    DoesNotExist,
    /// RFC 7505 null MX: the domain accepts no mail.
    NullMx,
    /// Every mail host of the domain is at an address delivery may not
    /// connect to ([`outbound`]): mail to it could never be delivered.
    Unreachable,
    /// SERVFAIL or timeout: ask the client to try again later.
    TemporaryFailure,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientDecision {
    DeliverLocally,
    Relay,
    Refuse(Reply),
}

/// Whether a relayed recipient needs a DNS check before the decision.
pub fn recipient_needs_dns(facts: &RecipientFacts) -> bool {
    !facts.local_domain && may_relay(facts) && !facts.by_smarthost
}

fn may_relay(facts: &RecipientFacts) -> bool {
    facts.authenticated || facts.trusted_network
}

pub fn decide_recipient(facts: &RecipientFacts) -> RecipientDecision {
    use RecipientDecision::*;
    if facts.local_domain {
        return if facts.mailbox_exists {
            DeliverLocally
        } else {
            Refuse(Reply::new(
                reply::NO_SUCH_USER,
                "Recipient address rejected: no such mailbox here",
            ))
        };
    }
    if !may_relay(facts) {
        // Same reply whether or not the domain exists: no open relay, and
        // no hints for people probing for one.
        return Refuse(Reply::new(reply::RELAY_DENIED, "Relay access denied"));
    }
    match facts.domain {
        DomainStatus::NotChecked | DomainStatus::Exists => Relay,
        DomainStatus::DoesNotExist => Refuse(Reply::new(
            reply::NO_SUCH_DOMAIN,
            "Recipient address rejected: domain does not exist",
        )),
        DomainStatus::NullMx => Refuse(Reply::new(
            reply::DOMAIN_ACCEPTS_NO_MAIL,
            "Recipient address rejected: domain does not accept mail (null MX)",
        )),
        DomainStatus::Unreachable => Refuse(Reply::new(
            reply::DESTINATION_NOT_ALLOWED,
            "Recipient address rejected: its mail servers are at private or reserved \
             addresses this server does not deliver to",
        )),
        DomainStatus::TemporaryFailure => Refuse(Reply::new(
            reply::DNS_TEMPORARY_FAILURE,
            "Recipient domain lookup failed temporarily, try again later",
        )),
    }
}

/// What is known about the MAIL FROM address when it is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderFacts {
    /// The null sender `<>` (bounces).
    pub null_sender: bool,
    /// The account the client logged in as, if any.
    pub authenticated_as: Option<String>,
    /// The sender address is the account itself or an alias that reaches it.
    pub owned_by_user: bool,
    /// `auth.sender_login_match` is on.
    pub login_must_match: bool,
    pub trusted_network: bool,
    /// The sender's domain is one of ours.
    pub local_domain: bool,
    pub domain: DomainStatus,
}

/// Whether the sender's domain must be looked up: only for strangers,
/// since users and trusted hosts are accountable in other ways.
pub fn sender_needs_dns(facts: &SenderFacts) -> bool {
    !facts.null_sender
        && facts.authenticated_as.is_none()
        && !facts.trusted_network
        && !facts.local_domain
}

pub fn decide_sender(facts: &SenderFacts) -> Result<(), Reply> {
    if facts.authenticated_as.is_some() {
        if facts.login_must_match && !facts.owned_by_user {
            return Err(Reply::new(
                reply::SENDER_NOT_OWNED,
                "Sender address rejected: not owned by the authenticated user",
            ));
        }
        return Ok(());
    }
    match facts.domain {
        DomainStatus::DoesNotExist => Err(Reply::new(
            reply::SENDER_DOMAIN_UNKNOWN,
            "Sender address rejected: domain does not exist",
        )),
        DomainStatus::NullMx => Err(Reply::new(
            reply::SENDER_DOMAIN_UNKNOWN,
            "Sender address rejected: domain accepts no mail (null MX), so it cannot receive replies",
        )),
        DomainStatus::Unreachable => Err(Reply::new(
            reply::SENDER_DOMAIN_UNKNOWN,
            "Sender address rejected: its mail servers are at private or reserved addresses, \
             so it cannot receive replies",
        )),
        DomainStatus::TemporaryFailure => Err(Reply::new(
            reply::DNS_TEMPORARY_FAILURE,
            "Sender domain lookup failed temporarily, try again later",
        )),
        DomainStatus::NotChecked | DomainStatus::Exists => Ok(()),
    }
}

/// A user of this host (the local socket, `petrel sendmail`) sends as
/// themselves; root and `[sendmail] trusted_group` may use any sender, as
/// daemons sending on behalf of others need to.
pub fn decide_local_sender(
    user: &crate::protocol::session::LocalUser,
    sender: &crate::protocol::address::ReversePath,
) -> Result<(), Reply> {
    if user.trusted {
        return Ok(());
    }
    let own = sender
        .address()
        .is_some_and(|a| a.mailbox_key() == user.address.to_lowercase());
    if own {
        Ok(())
    } else {
        Err(Reply::new(
            reply::SENDER_NOT_OWNED,
            format!(
                "Sender address rejected: local user {} may only send as <{}> \
                 (root and [sendmail] trusted_group may use -f)",
                user.name, user.address
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DomainStatus::*;

    fn facts(
        local_domain: bool,
        mailbox_exists: bool,
        authenticated: bool,
        trusted_network: bool,
        domain: DomainStatus,
    ) -> RecipientFacts {
        RecipientFacts {
            local_domain,
            mailbox_exists,
            authenticated,
            trusted_network,
            by_smarthost: false,
            domain,
        }
    }

    #[test]
    fn recipient_table() {
        // (local, exists, auth, trusted, dns) -> code (0 = accepted), relayed?
        let table = [
            // local mailboxes: anyone may send to existing ones
            ((true, true, false, false, NotChecked), 0, false),
            ((true, true, true, false, NotChecked), 0, false),
            ((true, false, false, false, NotChecked), 550, false),
            ((true, false, true, true, NotChecked), 550, false),
            // foreign domains: strangers are refused, whatever DNS says
            ((false, false, false, false, NotChecked), 554, false),
            ((false, false, false, false, Exists), 554, false),
            ((false, false, false, false, DoesNotExist), 554, false),
            // authenticated users and trusted networks relay
            ((false, false, true, false, Exists), 0, true),
            ((false, false, false, true, Exists), 0, true),
            ((false, false, true, false, NotChecked), 0, true),
            // ... to domains that exist
            ((false, false, true, false, DoesNotExist), 550, false),
            ((false, false, false, true, NullMx), 556, false),
            ((false, false, true, false, TemporaryFailure), 451, false),
            ((false, false, true, false, Unreachable), 550, false),
        ];
        for ((local, exists, auth, trusted, dns), code, relayed) in table {
            let f = facts(local, exists, auth, trusted, dns);
            let decision = decide_recipient(&f);
            match decision {
                RecipientDecision::Refuse(reply) => assert_eq!(reply.code(), code, "{f:?}"),
                RecipientDecision::Relay => assert!(code == 0 && relayed, "{f:?}"),
                RecipientDecision::DeliverLocally => assert!(code == 0 && !relayed, "{f:?}"),
            }
        }
    }

    #[test]
    fn dns_is_only_asked_when_it_can_change_the_answer() {
        assert!(!recipient_needs_dns(&facts(
            true, true, true, true, NotChecked
        )));
        assert!(!recipient_needs_dns(&facts(
            false, false, false, false, NotChecked
        )));
        assert!(recipient_needs_dns(&facts(
            false, false, true, false, NotChecked
        )));
        assert!(recipient_needs_dns(&facts(
            false, false, false, true, NotChecked
        )));
        // A smart host carries relayed mail: it decides, not our DNS.
        let mut relayed = facts(false, false, true, false, NotChecked);
        relayed.by_smarthost = true;
        assert!(!recipient_needs_dns(&relayed));
        assert_eq!(decide_recipient(&relayed), RecipientDecision::Relay);
    }

    fn sender(
        user: Option<&str>,
        owned: bool,
        trusted: bool,
        local: bool,
        domain: DomainStatus,
    ) -> SenderFacts {
        SenderFacts {
            null_sender: false,
            authenticated_as: user.map(str::to_string),
            owned_by_user: owned,
            login_must_match: true,
            trusted_network: trusted,
            local_domain: local,
            domain,
        }
    }

    #[test]
    fn sender_table() {
        let table = [
            (
                sender(Some("alice@example.com"), true, false, true, NotChecked),
                0,
            ),
            (
                sender(Some("alice@example.com"), false, false, true, NotChecked),
                553,
            ),
            (sender(None, false, false, false, Exists), 0),
            (sender(None, false, false, false, DoesNotExist), 553),
            (sender(None, false, false, false, NullMx), 553),
            (sender(None, false, false, false, TemporaryFailure), 451),
            (sender(None, false, false, false, Unreachable), 553),
            (sender(None, false, true, false, NotChecked), 0),
        ];
        for (facts, code) in table {
            match decide_sender(&facts) {
                Ok(()) => assert_eq!(code, 0, "{facts:?}"),
                Err(reply) => assert_eq!(reply.code(), code, "{facts:?}"),
            }
        }
        let mut free = sender(Some("alice@example.com"), false, false, true, NotChecked);
        free.login_must_match = false;
        assert!(decide_sender(&free).is_ok());
    }

    #[test]
    fn local_users_send_as_themselves_unless_trusted() {
        use crate::protocol::address::{Address, ReversePath};
        use crate::protocol::session::LocalUser;
        let mut user = LocalUser {
            uid: 1000,
            name: "www-data".into(),
            address: "www-data@example.com".into(),
            trusted: false,
        };
        let path = |a: &str| ReversePath::Mailbox(Address::parse(a).unwrap());
        assert!(decide_local_sender(&user, &path("www-data@example.com")).is_ok());
        assert!(decide_local_sender(&user, &path("WWW-DATA@Example.com")).is_ok());
        let refused = decide_local_sender(&user, &path("ceo@example.com")).unwrap_err();
        assert_eq!(refused.code(), 553);
        assert!(decide_local_sender(&user, &ReversePath::Null).is_err());
        user.trusted = true;
        assert!(decide_local_sender(&user, &path("ceo@example.com")).is_ok());
        assert!(decide_local_sender(&user, &ReversePath::Null).is_ok());
    }

    #[test]
    fn who_gets_a_sender_dns_check() {
        assert!(sender_needs_dns(&sender(
            None, false, false, false, NotChecked
        )));
        assert!(!sender_needs_dns(&sender(
            Some("a@b.c"),
            true,
            false,
            false,
            NotChecked
        )));
        assert!(!sender_needs_dns(&sender(
            None, false, true, false, NotChecked
        )));
        assert!(!sender_needs_dns(&sender(
            None, false, false, true, NotChecked
        )));
        let mut null = sender(None, false, false, false, NotChecked);
        null.null_sender = true;
        assert!(!sender_needs_dns(&null));
    }
}
