//! The session's window on the rest of the server: gathers the facts a
//! policy decision needs (config, accounts, aliases) and asks
//! [`crate::policy`] for the verdict.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::policy::{self, DomainStatus, RecipientDecision, RecipientFacts, SenderFacts};
use crate::protocol::address::{Address, ReversePath};
use crate::protocol::reply::Reply;
use crate::protocol::session::{AuthVerdict, ClientView, Services};

pub struct Directory {
    config: Arc<Config>,
}

impl Directory {
    pub fn new(config: Arc<Config>) -> Directory {
        Directory { config }
    }

    /// Alias targets for a local address, if it is an alias.
    fn alias_targets(&self, address: &Address) -> Option<Vec<Address>> {
        let targets = self.config.aliases.get(&address.lookup_key())?;
        Some(
            targets
                .as_slice()
                .iter()
                .filter_map(|t| Address::parse(t).ok())
                .collect(),
        )
    }
}

impl Services for Directory {
    fn check_sender(&self, client: &ClientView, sender: &ReversePath) -> Result<(), Reply> {
        let address = sender.address();
        let facts = SenderFacts {
            null_sender: address.is_none(),
            authenticated_as: client.user.map(str::to_string),
            owned_by_user: false,
            login_must_match: self.config.auth.sender_login_match,
            trusted_network: self.config.relay.is_trusted(client.ip),
            local_domain: address.is_some_and(|a| self.config.is_local_domain(a.domain())),
            domain: DomainStatus::NotChecked,
        };
        policy::decide_sender(&facts)
    }

    fn check_recipient(
        &self,
        client: &ClientView,
        recipient: &Address,
    ) -> Result<Vec<Address>, Reply> {
        let local_domain = self.config.is_local_domain(recipient.domain());
        let aliases = if local_domain {
            self.alias_targets(recipient)
        } else {
            None
        };
        let facts = RecipientFacts {
            local_domain,
            // Until accounts exist, every address of a local domain is a mailbox.
            mailbox_exists: local_domain,
            authenticated: client.user.is_some(),
            trusted_network: self.config.relay.is_trusted(client.ip),
            domain: DomainStatus::NotChecked,
        };
        match policy::decide_recipient(&facts) {
            RecipientDecision::DeliverLocally => {
                Ok(aliases.unwrap_or_else(|| vec![recipient.clone()]))
            }
            RecipientDecision::Relay => Ok(vec![recipient.clone()]),
            RecipientDecision::Refuse(reply) => Err(reply),
        }
    }

    fn authenticate(&self, _ip: IpAddr, _username: &str, _password: &str) -> AuthVerdict {
        AuthVerdict::Unavailable
    }

    fn is_locked_out(&self, _ip: IpAddr) -> bool {
        false
    }
}
