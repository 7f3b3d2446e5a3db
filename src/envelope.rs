//! The envelope's vocabulary, at the bottom of the crate: a final
//! recipient and where its mail goes, as routing decides it when a message
//! is accepted, the queue stores it, and delivery reads it back. One shape
//! for all of them, and one place ([`Destination::key`]) that names where
//! delivery connects. Imports nothing of the crate.

/// Where one final recipient's mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// One of our Maildirs, named by its canonical mailbox key.
    Local { mailbox: String },
    /// The MX hosts (or address) of this domain.
    Remote { domain: String },
    /// The configured smart host (`delivery.smarthost`).
    SmartHost,
}

impl Route {
    /// The stored name of the route kind (the `route` column).
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Local { .. } => "local",
            Route::Remote { .. } => "mx",
            Route::SmartHost => "smarthost",
        }
    }

    /// Where delivery connects for this route: every local mailbox is one
    /// destination, each MX domain one, the smart host one.
    pub fn destination(&self) -> Destination {
        match self {
            Route::Local { .. } => Destination::Local,
            Route::SmartHost => Destination::SmartHost,
            Route::Remote { domain } => Destination::Domain(domain.clone()),
        }
    }

    /// [`Destination::key`] of this route's destination.
    pub fn key(&self) -> String {
        self.destination().key()
    }
}

/// What a delivery worker connects to: recipients of one message that
/// share a destination share one transaction; concurrency limits and
/// back-off are per destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Local,
    SmartHost,
    Domain(String),
}

impl Destination {
    /// The one key: `local`, `smarthost` or `mx:` and the domain. The
    /// queue's `recipients.destination` column (sql/0007) computes the
    /// same from the stored route.
    pub fn key(&self) -> String {
        match self {
            Destination::Local => "local".into(),
            Destination::SmartHost => "smarthost".into(),
            Destination::Domain(domain) => format!("mx:{domain}"),
        }
    }

    /// The inverse of [`Destination::key`].
    pub fn from_key(key: &str) -> Option<Destination> {
        match key {
            "local" => Some(Destination::Local),
            "smarthost" => Some(Destination::SmartHost),
            _ => key
                .strip_prefix("mx:")
                .map(|domain| Destination::Domain(domain.to_string())),
        }
    }
}

/// A final recipient: the address for the envelope and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// For local mailboxes the mailbox key; otherwise the address as given
    /// (the remote host decides what its local part means, RFC 5321 2.4).
    pub address: String,
    /// The recipient's domain (lower case), for the queue views.
    pub domain: String,
    pub route: Route,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_key_reads_back_as_its_destination() {
        for route in [
            Route::Local {
                mailbox: "a@example.test".into(),
            },
            Route::Remote {
                domain: "example.org".into(),
            },
            Route::SmartHost,
        ] {
            let key = route.key();
            assert_eq!(Destination::from_key(&key), Some(route.destination()));
        }
        assert_eq!(
            Route::Remote {
                domain: "x.example".into()
            }
            .key(),
            "mx:x.example"
        );
        assert_eq!(Destination::from_key("nonsense"), None);
    }
}
