//! What a session asks of the rest of the server ([`Services`], with the
//! facts it hands over: [`ClientView`]) and what it hands over when a
//! message is complete ([`Envelope`]). The types a server decides (a routed
//! recipient, a verdict on the sender) stay opaque here ([`Kinds`]).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::address::{Address, ReversePath};
use super::dsn::{Notify, Ret};
use super::reply::Reply;
use super::session::ListenerKind;

/// A user of this host submitting through the local socket, as the kernel
/// identified them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUser {
    pub uid: u32,
    pub name: String,
    /// The envelope sender this user may use: name@(first local domain).
    pub address: String,
    /// root, or a member of `[sendmail] trusted_group`: may use any sender.
    pub trusted: bool,
}

/// What the session needs to know of a routed recipient; the rest (where
/// its mail goes) it carries to the queue without looking.
pub trait Target: Clone + std::fmt::Debug + PartialEq + Eq {
    /// The address its mail goes to (for a local mailbox, its key).
    fn address(&self) -> &str;
    /// The mailbox, when it is one of ours (mail-loop detection).
    fn local_mailbox(&self) -> Option<&str>;
}

/// The types the session carries for its [`Services`] without looking
/// into them: a routed recipient, and the verdict on the sender that goes
/// with the message (SPF's, in petrel). Keeps `protocol` a leaf: routing
/// and mail authentication live above it.
pub trait Kinds: Clone + std::fmt::Debug + PartialEq + Eq {
    type Target: Target;
    type Verdict: Clone + std::fmt::Debug + PartialEq + Eq;
}

/// A message the session has accepted, as it hands it over to be queued.
#[derive(Debug, Clone)]
pub struct Envelope<K: Kinds> {
    /// The queue id the connection gave it (see [`Stamp`]).
    pub id: String,
    /// The reverse path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<EnvelopeRecipient<K>>,
    /// Our Received header, to go in front of the body the connection
    /// spooled (the session never holds the message itself).
    pub trace_header: Vec<u8>,
    /// Octets of the body.
    pub body_size: u64,
    pub client_ip: IpAddr,
    /// Forward-confirmed reverse DNS name of the client.
    pub client_name: Option<String>,
    /// The TLS version the session used ("TLSv1_3"), if any.
    pub tls_version: Option<String>,
    pub helo: Option<String>,
    pub auth_user: Option<String>,
    /// The app password `auth_user` logged in with; `None`: the main one.
    pub auth_label: Option<String>,
    pub listener: ListenerKind,
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// RFC 3461 RET and ENVID.
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    /// From MAIL FROM: present when the message is to be checked.
    pub spf: Option<K::Verdict>,
    /// The login every From: address must belong to (see
    /// [`SenderStanding::from_owner`]).
    pub from_owner: Option<FromOwner>,
}

/// One final recipient, routed when it was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeRecipient<K: Kinds> {
    pub target: K::Target,
    /// The RCPT TO address, when it differs from `target.address`.
    pub original: Option<String>,
    /// RFC 3461 NOTIFY as it will be honoured; `None` when not given.
    pub notify: Option<Notify>,
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubmissionOutcome {
    pub queued: u32,
    pub refused_for_good: bool,
}

/// What the connection provides when DATA ends: the session never makes
/// ids or reads the clock itself.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub id: String,
    pub now: SystemTime,
}

/// The part of the session state that policy decisions depend on.
#[derive(Debug, Clone, Copy)]
pub struct ClientView<'a> {
    pub ip: IpAddr,
    /// Forward-confirmed reverse DNS name, when there is one.
    pub name: Option<&'a str>,
    /// The HELO/EHLO name, when given.
    pub helo: Option<&'a str>,
    pub user: Option<&'a str>,
    pub listener: ListenerKind,
    /// Set on the local socket.
    pub local: Option<&'a LocalUser>,
}

impl ClientView<'_> {
    /// "name[ip]" as logs show a client ("unknown" without a name);
    /// "local[uid=1000]" for a user of this host.
    pub fn label(&self) -> String {
        match self.local {
            Some(local) => format!("local[uid={}]", local.uid),
            None => format!("{}[{}]", self.name.unwrap_or("unknown"), self.ip),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthVerdict {
    /// Logged in as `account` (canonical form), with the main password or
    /// the app password labelled `app_password`.
    Success {
        account: String,
        app_password: Option<String>,
    },
    /// Wrong user or password; reply after this delay.
    Failure { delay: Duration },
    /// Too many failures from this address.
    LockedOut,
    /// The account store could not be read.
    Unavailable,
    /// Too many password checks in progress: try again in a moment.
    Busy,
}

/// How far the server trusts the client that gave a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderStanding<K: Kinds> {
    /// An authenticated user or a trusted network: accountable for what it
    /// sends, so it may ask for success reports (RFC 3461 NOTIFY=SUCCESS).
    /// A stranger may not: a report to a forged sender is backscatter.
    pub accountable: bool,
    /// The SPF verdict, when the message is to be checked (SPF, DKIM,
    /// DMARC, as petrel's services decide); it goes with the message.
    pub spf: Option<K::Verdict>,
    /// Who the message's From: addresses must belong to: the login of an
    /// authenticated user, or a local user who may not choose the sender;
    /// `None` for anyone else (strangers' mail, trusted networks, root).
    /// Decided here, at MAIL, and read when the message is complete.
    pub from_owner: Option<FromOwner>,
}

/// A login that From: addresses must belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromOwner {
    /// The account (or local user's address), canonical.
    pub login: String,
    /// A local user owns exactly its address; an account, its aliases too.
    pub local: bool,
}

/// Why a message the session handed over was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotQueued {
    /// The queue could not take it: try again later (451).
    Failed(String),
    /// A check of the complete message refused it, with this reply.
    Refused(Reply),
}

/// The outside world as the session sees it.
pub trait Services<K: Kinds> {
    /// `Err` carries the refusal reply.
    fn check_sender(
        &self,
        client: &ClientView,
        sender: &ReversePath,
    ) -> Result<SenderStanding<K>, Reply>;
    /// The final recipients with their routes (aliases expanded), or the
    /// refusal.
    fn check_recipient(
        &self,
        client: &ClientView,
        recipient: &Address,
    ) -> Result<Vec<K::Target>, Reply>;
    /// `mechanism` ("PLAIN", "LOGIN") is for the log.
    fn authenticate(
        &self,
        client: &ClientView,
        mechanism: &str,
        username: &str,
        password: &str,
    ) -> AuthVerdict;
    fn is_locked_out(&self, ip: IpAddr) -> bool;
    /// Whether there is room for new mail (disk space above the floor).
    fn has_room(&self) -> bool;
    /// Whether what a session logged in with still stands: the account
    /// exists, and the app password (`app_password`: its label) has not
    /// been revoked. Asked at each transaction.
    fn login_stands(&self, account: &str, app_password: Option<&str>) -> bool;
}
