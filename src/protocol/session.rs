//! The server side of one SMTP session as a state machine (sans-IO).
//!
//! The session never touches a socket, the queue or the clock beyond
//! formatting a header: the worker thread that owns the connection feeds it
//! parsed lines and DATA results and performs the [`Action`] each [`Step`]
//! asks for. Questions about the outside world (may this recipient be
//! accepted? is this password right?) go through the [`Services`] trait, so
//! the whole dialogue is unit-testable without a network.
//!
//! Each command has a check (sequence, syntax, policy), whose failure is a
//! reply, and a proceed step that changes state.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::address::{Address, ReversePath};
use super::command::{BodyType, Command, ForwardPath, MailParams, RcptParams, parse_command};
use super::data::{ContentLimits, DataError, DataSummary, content_refusal};
use super::dsn::{Notify, Ret};
use super::reply::{self, Reply};
use crate::mailauth::spf::SpfVerdict;
use crate::routing::{Recipient, Route};

/// RFC 5321 4.5.3.1.4: 512 octets including the CRLF.
pub const MAX_COMMAND_LINE: usize = 510;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Port 25: mail from the world and relaying for trusted networks.
    Smtp,
    /// Port 587: users' mail clients; AUTH required (RFC 6409).
    Submission,
    /// Port 465: submission over implicit TLS (RFC 8314).
    Smtps,
    /// `petrel sendmail` on this host, through the local socket: the
    /// kernel tells who the user is (SO_PEERCRED), so no AUTH.
    Local,
}

impl ListenerKind {
    /// AUTH must come before MAIL (local users are known by their uid).
    pub fn requires_auth(self) -> bool {
        matches!(self, ListenerKind::Submission | ListenerKind::Smtps)
    }

    /// Mail from our own users (the submission ports and local
    /// sendmail), which a submission server may complete (RFC 6409 8).
    pub fn is_submission(self) -> bool {
        self != ListenerKind::Smtp
    }

    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Smtps => "smtps",
            ListenerKind::Local => "local",
        }
    }
}

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

/// How long an error reply waits once a session is past its soft error
/// limit (Postfix's smtpd_error_sleep_time).
pub const ERROR_SLEEP: Duration = Duration::from_secs(1);

/// What every session on one listener shares.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub listener: ListenerKind,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    /// Past this many errors, each error reply waits [`ERROR_SLEEP`].
    pub soft_errors: u32,
    /// A certificate is loaded, so STARTTLS can be offered.
    pub tls_available: bool,
    /// Where `RCPT TO:<Postmaster>` goes (RFC 5321 4.1.1.3).
    pub postmaster: Option<Address>,
    /// Largest header section accepted, in octets.
    pub max_header_size: u64,
    /// `Received:` fields a message may already carry (hop count).
    pub max_hops: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

#[derive(Debug)]
pub enum Action {
    /// Keep reading commands.
    Continue,
    /// Send the replies, then close the connection.
    Close,
    /// Send the replies, drop any buffered input, run the TLS handshake,
    /// then call [`Session::tls_started`].
    StartTls,
    /// Send the replies (354), then stream DATA into a decoder and call
    /// [`Session::data_finished`].
    ReceiveData,
    /// Commit this message to the queue, then call [`Session::enqueued`].
    Enqueue(Box<Envelope>),
}

/// A message the session has accepted, as it hands it over to be queued.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The queue id the connection gave it (see [`Stamp`]).
    pub id: String,
    /// The reverse path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<EnvelopeRecipient>,
    /// Our Received header, to go in front of the body the connection
    /// spooled (the session never holds the message itself).
    pub trace_header: Vec<u8>,
    /// Octets of the body.
    pub body_size: u64,
    pub client_ip: IpAddr,
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
    pub spf: Option<SpfVerdict>,
    /// The login every From: address must belong to (see
    /// [`SenderStanding::from_owner`]).
    pub from_owner: Option<FromOwner>,
}

/// One final recipient, routed when it was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeRecipient {
    pub target: Recipient,
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

#[derive(Debug)]
pub struct Step {
    pub replies: Vec<Reply>,
    pub action: Action,
    /// Wait this long before sending the replies (slows password guessing).
    pub delay: Option<Duration>,
    /// A mail transaction command was refused: the connection logs it.
    pub rejected: Option<Rejection>,
}

/// A refused MAIL, RCPT, DATA or message, with what the log line needs
/// (Postfix's "NOQUEUE: reject: RCPT from ...", which fail2ban reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// "MAIL", "RCPT", "DATA" or "END-OF-MESSAGE".
    pub stage: &'static str,
    pub reply: Reply,
    pub from: Option<String>,
    pub to: Option<String>,
    pub helo: Option<String>,
    pub esmtp: bool,
}

impl Step {
    fn reply(reply: Reply) -> Step {
        Step {
            replies: vec![reply],
            action: Action::Continue,
            delay: None,
            rejected: None,
        }
    }

    fn then(mut self, action: Action) -> Step {
        self.action = action;
        self
    }

    fn nothing(action: Action) -> Step {
        Step {
            replies: Vec::new(),
            action,
            delay: None,
            rejected: None,
        }
    }
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
pub struct SenderStanding {
    /// An authenticated user or a trusted network: accountable for what it
    /// sends, so it may ask for success reports (RFC 3461 NOTIFY=SUCCESS).
    /// A stranger may not: a report to a forged sender is backscatter.
    pub accountable: bool,
    /// The SPF verdict, when the message is to be checked (SPF, DKIM,
    /// DMARC: [`crate::mailauth::applies`]); it goes with the message.
    pub spf: Option<SpfVerdict>,
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
pub trait Services {
    /// `Err` carries the refusal reply.
    fn check_sender(
        &self,
        client: &ClientView,
        sender: &ReversePath,
    ) -> Result<SenderStanding, Reply>;
    /// The final recipients with their routes (aliases expanded), or the
    /// refusal.
    fn check_recipient(
        &self,
        client: &ClientView,
        recipient: &Address,
    ) -> Result<Vec<Recipient>, Reply>;
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

#[derive(Debug)]
struct Transaction {
    sender: ReversePath,
    params: MailParams,
    standing: SenderStanding,
    recipients: Vec<AcceptedRecipient>,
}

#[derive(Debug)]
struct AcceptedRecipient {
    envelope: Address,
    targets: Vec<Recipient>,
    notify: Option<Notify>,
    orcpt: Option<String>,
}

#[derive(Debug)]
enum AuthExchange {
    PlainResponse,
    LoginUsername,
    LoginPassword { username: String },
}

/// The message handed to the queue, and what a refusal's log line needs.
#[derive(Debug)]
struct AwaitingQueue {
    id: String,
    from: Option<String>,
    to: Option<String>,
}

#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    client_ip: IpAddr,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsInfo>,
    user: Option<String>,
    /// The app password `user` logged in with.
    app_password: Option<String>,
    transaction: Option<Transaction>,
    auth: Option<AuthExchange>,
    /// A message went to the queue and its fate is not known yet.
    awaiting_queue: Option<AwaitingQueue>,
    errors: u32,
    client_name: Option<String>,
    local: Option<LocalUser>,
    /// Messages committed to the queue in this session.
    queued: u32,
    /// The last refusal of MAIL, RCPT, DATA or a message.
    last_refusal: Option<u16>,
    /// Per command: name, accepted, total (for the disconnect line).
    counts: Vec<(&'static str, u32, u32)>,
}

impl Session {
    /// `tls` is set for implicit-TLS listeners, where the handshake came first.
    pub fn new(config: Arc<SessionConfig>, client_ip: IpAddr, tls: Option<TlsInfo>) -> Session {
        Session {
            config,
            client_ip,
            helo: None,
            esmtp: false,
            tls,
            user: None,
            app_password: None,
            transaction: None,
            auth: None,
            awaiting_queue: None,
            errors: 0,
            client_name: None,
            local: None,
            queued: 0,
            last_refusal: None,
            // A session's usual commands: EHLO, MAIL, RCPT, DATA, QUIT.
            counts: Vec::with_capacity(8),
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::new(
            reply::SERVICE_READY,
            format!("{} ESMTP petrel", self.config.hostname),
        )
    }

    pub fn authenticated_user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    fn view(&self) -> ClientView<'_> {
        ClientView {
            ip: self.client_ip,
            name: self.client_name.as_deref(),
            helo: self.helo.as_deref(),
            user: self.user.as_deref(),
            listener: self.config.listener,
            local: self.local.as_ref(),
        }
    }

    /// A local user on the local socket: known, accountable, may relay.
    pub fn with_local_user(mut self, user: LocalUser) -> Session {
        self.user = Some(user.address.clone());
        self.local = Some(user);
        self
    }

    /// What the session achieved: messages queued, and whether the last
    /// refusal was for good (5xx) — what the maildrop pickup needs to
    /// decide what to do with a file.
    pub fn submission_outcome(&self) -> SubmissionOutcome {
        SubmissionOutcome {
            queued: self.queued,
            refused_for_good: self.last_refusal.is_some_and(|code| code >= 500),
        }
    }

    /// "name[ip]" as logs show this client.
    pub fn client_label(&self) -> String {
        self.view().label()
    }

    /// The client's forward-confirmed name, for the Received header.
    pub fn with_client_name(mut self, name: Option<String>) -> Session {
        self.client_name = name;
        self
    }

    /// What the client did, for the disconnect line: "ehlo=1 mail=1
    /// rcpt=0/1 quit=1 commands=3/4" (accepted/total where some failed).
    pub fn command_counts(&self) -> String {
        use std::fmt::Write as _;
        // Written in place: one allocation per session, not one per command.
        let mut out = String::with_capacity(80);
        let (mut ok, mut total) = (0, 0);
        for (name, accepted, all) in &self.counts {
            ok += accepted;
            total += all;
            let _ = if accepted == all {
                write!(out, "{name}={all} ")
            } else {
                write!(out, "{name}={accepted}/{all} ")
            };
        }
        let _ = if ok == total {
            write!(out, "commands={total}")
        } else {
            write!(out, "commands={ok}/{total}")
        };
        out
    }

    fn count(&mut self, name: &'static str, accepted: bool) {
        let entry = match self.counts.iter_mut().find(|(n, _, _)| *n == name) {
            Some(entry) => entry,
            None => {
                self.counts.push((name, 0, 0));
                let last = self.counts.len() - 1;
                &mut self.counts[last]
            }
        };
        entry.2 += 1;
        if accepted {
            entry.1 += 1;
        }
    }

    /// A line that exceeded even the AUTH limit, already discarded.
    pub fn line_too_long(&mut self) -> Step {
        self.auth = None;
        self.finish(Reply::new(reply::LINE_TOO_LONG, "Line too long"))
    }

    /// One line of input (without CRLF) in command mode.
    pub fn handle_line(&mut self, line: &[u8], services: &dyn Services) -> Step {
        let step = match self.auth.take() {
            Some(exchange) => {
                let step = self.continue_auth(exchange, line, services);
                let code = step.replies.first().map(Reply::code);
                if code != Some(reply::AUTH_CHALLENGE.code) {
                    self.count("auth", code == Some(reply::AUTH_SUCCEEDED.code));
                }
                step
            }
            None => self.command(line, services),
        };
        self.count_errors(step)
    }

    fn command(&mut self, line: &[u8], services: &dyn Services) -> Step {
        let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
        if line.len() > MAX_COMMAND_LINE && !is_auth {
            return Step::reply(Reply::new(reply::LINE_TOO_LONG, "Line too long"));
        }
        let command = match parse_command(line) {
            Ok(command) => command,
            Err(error) => {
                self.count("unknown", false);
                return Step::reply(error.reply());
            }
        };
        let name = command_name(&command);
        let (stage, from, to) = match &command {
            Command::Mail { from, .. } => (Some("MAIL"), Some(from.to_string()), None),
            Command::Rcpt { to, .. } => (Some("RCPT"), None, Some(to.to_string())),
            Command::Data => (Some("DATA"), None, None),
            _ => (None, None, None),
        };
        let from = from.or_else(|| self.transaction.as_ref().map(|t| t.sender.to_string()));
        let step = self.run_command(command, services);
        let code = step.replies.first().map(Reply::code);
        // An AUTH exchange is counted when it ends, not at its first 334.
        if code != Some(reply::AUTH_CHALLENGE.code) {
            self.count(name, code.is_none_or(|c| c < 400));
        }
        match stage {
            Some(stage) => self.note_rejection(step, stage, from, to),
            None => step,
        }
    }

    /// Marks a refused transaction command for the log.
    fn note_rejection(
        &mut self,
        mut step: Step,
        stage: &'static str,
        from: Option<String>,
        to: Option<String>,
    ) -> Step {
        // Policy refusals (4xx, 55x), not syntax or sequence errors (50x),
        // as Postfix logs them.
        let refusal = |r: &&Reply| (400..500).contains(&r.code()) || r.code() >= 550;
        if let Some(reply) = step.replies.first().filter(refusal) {
            self.last_refusal = Some(reply.code());
            step.rejected = Some(Rejection {
                stage,
                reply: reply.clone(),
                from,
                to,
                helo: self.helo.clone(),
                esmtp: self.esmtp,
            });
        }
        step
    }

    fn run_command(&mut self, command: Command, services: &dyn Services) -> Step {
        match command {
            Command::Ehlo(name) => self.ehlo(name, true),
            Command::Helo(name) => self.ehlo(name, false),
            Command::Mail { from, params } => self.mail(from, params, services),
            Command::Rcpt { to, params } => self.rcpt(to, params, services),
            Command::Data => self.data(),
            Command::Rset => {
                self.transaction = None;
                Step::reply(Reply::new(reply::OK, "Reset OK"))
            }
            Command::Noop => Step::reply(Reply::new(reply::OK, "OK")),
            Command::Quit => Step::reply(Reply::new(reply::CLOSING, "Bye")).then(Action::Close),
            // Never confirm or deny that a mailbox exists (no enumeration).
            Command::Vrfy => Step::reply(Reply::new(
                reply::CANNOT_VRFY,
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => Step::reply(Reply::new(reply::NOT_IMPLEMENTED, "EXPN not available")),
            Command::Help => Step::reply(Reply::new(
                reply::HELP,
                "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
            )),
            Command::StartTls => self.starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(&mechanism, initial_response, services),
        }
    }

    fn finish(&mut self, reply: Reply) -> Step {
        self.count_errors(Step::reply(reply))
    }

    /// Every 5xx counts; past the soft limit each one is answered a second
    /// late, past the hard limit the client is told 421 and dropped, which
    /// stops blind scanners and broken loops early.
    fn count_errors(&mut self, mut step: Step) -> Step {
        let failed = step.replies.iter().any(|r| r.code() >= 500);
        if failed {
            self.errors += 1;
            if self.errors > self.config.soft_errors {
                step.delay = Some(step.delay.unwrap_or_default().max(ERROR_SLEEP));
            }
            if self.errors >= self.config.max_errors && !matches!(step.action, Action::Close) {
                step.replies.push(Reply::new(
                    reply::TOO_MANY_ERRORS,
                    format!(
                        "{} Too many errors, closing connection",
                        self.config.hostname
                    ),
                ));
                step.action = Action::Close;
            }
        }
        step
    }

    fn ehlo(&mut self, name: String, esmtp: bool) -> Step {
        self.transaction = None;
        self.helo = Some(name.clone());
        self.esmtp = esmtp;
        let first = format!("{} Hello {name} [{}]", self.config.hostname, self.client_ip);
        if !esmtp {
            return Step::reply(Reply::new(reply::HELLO_OK, first));
        }
        let mut lines = vec![
            first,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "DSN".to_string(),
            "SMTPUTF8".to_string(),
        ];
        if self.tls.is_none() && self.config.tls_available {
            lines.push("STARTTLS".to_string());
        }
        // Passwords only ever travel inside TLS (RFC 4954 4, RFC 8314).
        if self.tls.is_some() && self.user.is_none() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        lines.push("HELP".to_string());
        Step::reply(Reply::multiline(reply::HELLO_OK, lines))
    }

    fn mail(&mut self, from: ReversePath, params: MailParams, services: &dyn Services) -> Step {
        if self.helo.is_none() {
            return Step::reply(Reply::new(reply::BAD_SEQUENCE, "Send EHLO or HELO first"));
        }
        if self.transaction.is_some() {
            return Step::reply(Reply::new(reply::BAD_SEQUENCE, "Nested MAIL command"));
        }
        // A local user is who the kernel says; a login may be revoked.
        if let Some(user) = &self.user
            && self.local.is_none()
            && !services.login_stands(user, self.app_password.as_deref())
        {
            // Revoked while this session ran: it sends nothing more.
            self.user = None;
            self.app_password = None;
            return Step::reply(Reply::new(
                reply::AUTH_REQUIRED,
                "Authentication required: the password this session logged in with was revoked",
            ));
        }
        if self.config.listener.requires_auth() && self.user.is_none() {
            let text = if self.tls.is_none() {
                "Must issue a STARTTLS command and authenticate first"
            } else {
                "Authentication required"
            };
            return Step::reply(Reply::new(reply::AUTH_REQUIRED, text));
        }
        if !self.esmtp && params != MailParams::default() {
            return Step::reply(Reply::new(
                reply::UNKNOWN_PARAMETER,
                "MAIL parameters need EHLO",
            ));
        }
        if !services.has_room() {
            return Step::reply(Reply::new(
                reply::STORAGE_FULL,
                "Insufficient system storage, try again later",
            ));
        }
        if let Some(size) = params.size
            && size > self.config.max_message_size
        {
            return Step::reply(Reply::new(
                reply::MESSAGE_TOO_BIG,
                format!(
                    "Message size exceeds fixed maximum message size ({} octets)",
                    self.config.max_message_size
                ),
            ));
        }
        if let Some(address) = from.address()
            && !address.is_ascii()
            && !params.smtputf8
        {
            return Step::reply(Reply::new(
                reply::NON_ASCII_WITHOUT_SMTPUTF8,
                "Non-ASCII sender address needs the SMTPUTF8 parameter",
            ));
        }
        let standing = match services.check_sender(&self.view(), &from) {
            Ok(standing) => standing,
            Err(refusal) => return Step::reply(refusal),
        };
        self.transaction = Some(Transaction {
            sender: from,
            params,
            standing,
            recipients: Vec::new(),
        });
        Step::reply(Reply::new(reply::SENDER_OK, "Sender OK"))
    }

    fn rcpt(&mut self, to: ForwardPath, params: RcptParams, services: &dyn Services) -> Step {
        let view = ClientView {
            ip: self.client_ip,
            name: self.client_name.as_deref(),
            helo: self.helo.as_deref(),
            user: self.user.as_deref(),
            listener: self.config.listener,
            local: self.local.as_ref(),
        };
        let Some(transaction) = self.transaction.as_mut() else {
            return Step::reply(Reply::new(reply::BAD_SEQUENCE, "Need MAIL command first"));
        };
        if transaction.recipients.len() >= self.config.max_recipients {
            return Step::reply(Reply::new(
                reply::TOO_MANY_RECIPIENTS,
                "Too many recipients",
            ));
        }
        let address = match to {
            ForwardPath::Mailbox(address) => address,
            ForwardPath::Postmaster => match &self.config.postmaster {
                Some(postmaster) => postmaster.clone(),
                None => {
                    return Step::reply(Reply::new(reply::NO_SUCH_USER, "No postmaster here"));
                }
            },
        };
        if !address.is_ascii() && !transaction.params.smtputf8 {
            return Step::reply(Reply::new(
                reply::NON_ASCII_WITHOUT_SMTPUTF8,
                "Non-ASCII recipient address needs SMTPUTF8 in MAIL FROM",
            ));
        }
        if !self.esmtp && params != RcptParams::default() {
            return Step::reply(Reply::new(
                reply::UNKNOWN_PARAMETER,
                "RCPT parameters need EHLO",
            ));
        }
        match services.check_recipient(&view, &address) {
            Ok(targets) => {
                let mut notify = params.notify;
                if let Some(notify) = &mut notify
                    && !transaction.standing.accountable
                {
                    notify.success = false;
                }
                transaction.recipients.push(AcceptedRecipient {
                    envelope: address,
                    targets,
                    notify,
                    orcpt: params.orcpt,
                });
                Step::reply(Reply::new(reply::RECIPIENT_OK, "Recipient OK"))
            }
            Err(refusal) => Step::reply(refusal),
        }
    }

    fn data(&mut self) -> Step {
        match &self.transaction {
            None => Step::reply(Reply::new(reply::BAD_SEQUENCE, "Need MAIL command first")),
            // RFC 2920 3.1: with pipelining, DATA after all RCPTs failed.
            Some(t) if t.recipients.is_empty() => {
                Step::reply(Reply::new(reply::BAD_SEQUENCE, "No valid recipients"))
            }
            Some(_) => Step::reply(Reply::new(
                reply::START_DATA,
                "End data with <CR><LF>.<CR><LF>",
            ))
            .then(Action::ReceiveData),
        }
    }

    /// The DATA stream ended (at `<CRLF>.<CRLF>`). Whatever can be known
    /// about the message now is checked now, so that nothing accepted can
    /// turn into a bounce later for a reason the client could have been told.
    pub fn data_finished(&mut self, result: Result<DataSummary, DataError>, stamp: Stamp) -> Step {
        let Some(transaction) = self.transaction.take() else {
            return Step::reply(Reply::new(reply::BAD_SEQUENCE, "No transaction"));
        };
        let from = Some(transaction.sender.to_string());
        let to = transaction
            .recipients
            .first()
            .map(|r| r.envelope.to_string());
        let step = self.finish_message(transaction, result, stamp);
        self.note_rejection(step, "END-OF-MESSAGE", from, to)
    }

    fn finish_message(
        &mut self,
        transaction: Transaction,
        result: Result<DataSummary, DataError>,
        stamp: Stamp,
    ) -> Step {
        let message = match result {
            Ok(message) => message,
            Err(DataError::TooLarge) => {
                return self.finish(Reply::new(
                    reply::MESSAGE_TOO_BIG,
                    format!(
                        "Message size exceeds fixed maximum message size ({} octets)",
                        self.config.max_message_size
                    ),
                ));
            }
            Err(DataError::LineTooLong) => {
                return self.finish(Reply::new(
                    reply::LINE_TOO_LONG,
                    DataError::LineTooLong.describe(),
                ));
            }
            Err(DataError::NoStorage) => {
                return self.finish(Reply::new(
                    reply::STORAGE_FULL,
                    DataError::NoStorage.describe(),
                ));
            }
            Err(error) => {
                return self.finish(Reply::new(reply::BAD_MESSAGE_DATA, error.describe()));
            }
        };
        if let Some(refusal) = self.refuse_content(&transaction, &message) {
            return self.finish(refusal);
        }
        let id = stamp.id;
        let mut trace_header = self.received_header(&id, &transaction, stamp.now);
        // RFC 6409 8.1, 8.3: a submission server may add what a user's
        // program left out, on every way in of our own users (the same
        // as `petrel sendmail` adds). The MX port never rewrites a message.
        if self.config.listener.is_submission() {
            if self.config.listener == ListenerKind::Local
                && !message.headers.has_from
                && let Some(sender) = transaction.sender.address()
            {
                // Postfix's cleanup does so for local submissions.
                trace_header.push_str(&format!("From: <{sender}>\r\n"));
            }
            if !message.headers.has_date {
                trace_header.push_str(&format!(
                    "Date: {}\r\n",
                    crate::timefmt::rfc5322_date(stamp.now)
                ));
            }
            if !message.headers.has_message_id {
                trace_header.push_str(&format!("Message-ID: <{id}@{}>\r\n", self.config.hostname));
            }
        }
        let trace_header = trace_header.into_bytes();

        let mut recipients: Vec<EnvelopeRecipient> = Vec::new();
        for accepted in &transaction.recipients {
            for target in &accepted.targets {
                // Two aliases that end at the same mailbox deliver once.
                if recipients
                    .iter()
                    .any(|r| r.target.route == target.route && r.target.address == target.address)
                {
                    continue;
                }
                let original = accepted.envelope.to_string();
                recipients.push(EnvelopeRecipient {
                    original: (original != target.address).then_some(original),
                    target: target.clone(),
                    notify: accepted.notify,
                    orcpt: accepted.orcpt.clone(),
                });
            }
        }
        self.awaiting_queue = Some(AwaitingQueue {
            id: id.clone(),
            from: Some(transaction.sender.to_string()),
            to: transaction
                .recipients
                .first()
                .map(|r| r.envelope.to_string()),
        });
        let envelope = Envelope {
            id,
            sender: transaction.sender.to_string(),
            recipients,
            trace_header,
            body_size: message.size,
            client_ip: self.client_ip,
            helo: self.helo.clone(),
            auth_user: self.user.clone(),
            auth_label: self.app_password.clone(),
            listener: self.config.listener,
            eight_bit: transaction.params.body == BodyType::EightBitMime,
            smtputf8: transaction.params.smtputf8,
            ret: transaction.params.ret,
            envid: transaction.params.envid.clone(),
            spf: transaction.standing.spf.clone(),
            from_owner: transaction.standing.from_owner.clone(),
        };
        Step::nothing(Action::Enqueue(Box::new(envelope)))
    }

    fn refuse_content(&self, transaction: &Transaction, message: &DataSummary) -> Option<Reply> {
        let local_mailboxes = transaction
            .recipients
            .iter()
            .flat_map(|r| &r.targets)
            .filter_map(|t| match &t.route {
                Route::Local { mailbox } => Some(mailbox.as_str()),
                _ => None,
            });
        let limits = ContentLimits {
            max_header_size: self.config.max_header_size,
            max_hops: self.config.max_hops,
        };
        content_refusal(&message.headers, &limits, local_mailboxes)
    }

    /// The queue's answer for the message from [`Action::Enqueue`]: only now
    /// may the client hear 250, because only now is the message on disk.
    pub fn enqueued(&mut self, result: Result<(), NotQueued>) -> Step {
        let Some(pending) = self.awaiting_queue.take() else {
            return Step::reply(Reply::new(reply::LOCAL_ERROR, "No message pending"));
        };
        match result {
            Ok(()) => {
                self.queued += 1;
                Step::reply(Reply::new(
                    reply::MESSAGE_QUEUED,
                    format!("OK queued as {}", pending.id),
                ))
            }
            Err(NotQueued::Failed(_)) => {
                self.last_refusal = Some(reply::LOCAL_ERROR.code);
                Step::reply(Reply::new(
                    reply::LOCAL_ERROR,
                    "Local error in processing, try again later",
                ))
            }
            Err(NotQueued::Refused(refusal)) => {
                let step = self.finish(refusal);
                self.note_rejection(step, "END-OF-MESSAGE", pending.from, pending.to)
            }
        }
    }

    fn received_header(&self, id: &str, transaction: &Transaction, now: SystemTime) -> String {
        if let Some(local) = &self.local {
            // As Postfix's pickup: who on this host, not a network peer.
            return format!(
                "Received: by {} (petrel, from userid {}) id {id}; {}\r\n",
                self.config.hostname,
                local.uid,
                crate::timefmt::rfc5322_date(now)
            );
        }
        // RFC 3848 / RFC 6531 3.7.3 protocol names.
        let mut protocol = String::from(if transaction.params.smtputf8 {
            "UTF8SMTP"
        } else if self.esmtp {
            "ESMTP"
        } else {
            "SMTP"
        });
        if self.esmtp || transaction.params.smtputf8 {
            if self.tls.is_some() {
                protocol.push('S');
            }
            if self.user.is_some() {
                protocol.push('A');
            }
        }
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let mut header = format!(
            "Received: from {helo} ({}[{}])\r\n\tby {} (petrel) with {protocol} id {id}",
            self.client_name
                .as_deref()
                .map(|name| format!("{name} "))
                .unwrap_or_default(),
            self.client_ip,
            self.config.hostname
        );
        if let Some(tls) = &self.tls {
            header.push_str(&format!(
                "\r\n\t(using {} with cipher {})",
                tls.version, tls.cipher
            ));
        }
        // Which login sent it, and from which device: a leaked app
        // password shows in the mail it sent.
        if let Some(user) = &self.user {
            header.push_str(&format!("\r\n\t(Authenticated sender: {user}"));
            if let Some(label) = &self.app_password {
                header.push_str(&format!(", app password {label}"));
            }
            header.push(')');
        }
        // Naming the recipient only when there is one keeps Bcc private.
        if let [only] = transaction.recipients.as_slice() {
            header.push_str(&format!("\r\n\tfor <{}>", only.envelope));
        }
        header.push_str(&format!("; {}\r\n", crate::timefmt::rfc5322_date(now)));
        header
    }

    fn starttls(&mut self) -> Step {
        if self.tls.is_some() {
            return Step::reply(Reply::new(reply::BAD_SEQUENCE, "TLS already active"));
        }
        if !self.config.tls_available {
            return Step::reply(Reply::new(reply::TLS_NOT_AVAILABLE, "TLS not available"));
        }
        Step::reply(Reply::new(reply::READY_FOR_TLS, "Ready to start TLS")).then(Action::StartTls)
    }

    /// The handshake succeeded: forget everything learned in plaintext
    /// (RFC 3207 4.2); the client must EHLO again.
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.esmtp = false;
        self.transaction = None;
        self.user = None;
        self.app_password = None;
        self.auth = None;
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>, services: &dyn Services) -> Step {
        if self.helo.is_none() || !self.esmtp {
            return Step::reply(Reply::new(reply::BAD_SEQUENCE, "Send EHLO first"));
        }
        if self.tls.is_none() {
            return Step::reply(Reply::new(
                reply::ENCRYPTION_REQUIRED_FOR_AUTH,
                "Must issue a STARTTLS command first",
            ));
        }
        if self.user.is_some() {
            return Step::reply(Reply::new(reply::BAD_SEQUENCE, "Already authenticated"));
        }
        if self.transaction.is_some() {
            return Step::reply(Reply::new(
                reply::BAD_SEQUENCE,
                "AUTH not allowed during a mail transaction",
            ));
        }
        if services.is_locked_out(self.client_ip) {
            return self.locked_out();
        }
        match (mechanism, initial) {
            ("PLAIN", None) => self.challenge(AuthExchange::PlainResponse, ""),
            ("PLAIN", Some(response)) => {
                self.continue_auth(AuthExchange::PlainResponse, response.as_bytes(), services)
            }
            ("LOGIN", None) => self.challenge(AuthExchange::LoginUsername, "VXNlcm5hbWU6"),
            ("LOGIN", Some(response)) => {
                self.continue_auth(AuthExchange::LoginUsername, response.as_bytes(), services)
            }
            _ => Step::reply(Reply::new(
                reply::UNKNOWN_AUTH_MECHANISM,
                "Unrecognized authentication mechanism",
            )),
        }
    }

    fn challenge(&mut self, next: AuthExchange, text: &str) -> Step {
        self.auth = Some(next);
        Step::reply(Reply::new(reply::AUTH_CHALLENGE, text))
    }

    fn locked_out(&mut self) -> Step {
        Step::reply(Reply::new(
            reply::AUTH_LOCKED_OUT,
            "Too many failed logins from your address, try again later",
        ))
        .then(Action::Close)
    }

    fn continue_auth(
        &mut self,
        exchange: AuthExchange,
        line: &[u8],
        services: &dyn Services,
    ) -> Step {
        if line == b"*" {
            return Step::reply(Reply::new(
                reply::AUTH_CANCELLED,
                "Authentication cancelled",
            ));
        }
        let malformed = || {
            Step::reply(Reply::new(
                reply::AUTH_MALFORMED,
                "Malformed authentication response",
            ))
        };
        // RFC 4954 4: "=" is an empty initial response.
        let decoded = if line == b"=" {
            Vec::new()
        } else {
            match BASE64.decode(line) {
                Ok(decoded) => decoded,
                Err(_) => return malformed(),
            }
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return malformed();
        };
        match exchange {
            AuthExchange::PlainResponse => {
                // authzid NUL authcid NUL password (RFC 4616)
                let mut parts = decoded.split('\0');
                let (Some(authzid), Some(username), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return malformed();
                };
                if !authzid.is_empty() && authzid != username {
                    // Acting as someone else is not something we offer.
                    return Step::reply(Reply::new(
                        reply::AUTH_INVALID_CREDENTIALS,
                        "Authentication credentials invalid",
                    ));
                }
                self.verify_password("PLAIN", username, password, services)
            }
            AuthExchange::LoginUsername => self.challenge(
                AuthExchange::LoginPassword { username: decoded },
                "UGFzc3dvcmQ6",
            ),
            AuthExchange::LoginPassword { username } => {
                self.verify_password("LOGIN", &username, &decoded, services)
            }
        }
    }

    fn verify_password(
        &mut self,
        mechanism: &str,
        username: &str,
        password: &str,
        services: &dyn Services,
    ) -> Step {
        match services.authenticate(&self.view(), mechanism, username, password) {
            AuthVerdict::Success {
                account,
                app_password,
            } => {
                self.user = Some(account);
                self.app_password = app_password;
                Step::reply(Reply::new(
                    reply::AUTH_SUCCEEDED,
                    "Authentication successful",
                ))
            }
            AuthVerdict::Failure { delay } => {
                let mut step = Step::reply(Reply::new(
                    reply::AUTH_INVALID_CREDENTIALS,
                    "Authentication credentials invalid",
                ));
                step.delay = (!delay.is_zero()).then_some(delay);
                step
            }
            AuthVerdict::LockedOut => self.locked_out(),
            AuthVerdict::Unavailable => Step::reply(Reply::new(
                reply::AUTH_TEMPORARY_FAILURE,
                "Temporary authentication failure",
            )),
            AuthVerdict::Busy => Step::reply(Reply::new(
                reply::AUTH_TEMPORARY_FAILURE,
                "Too many logins in progress, try again in a moment",
            )),
        }
    }
}

/// The name a command is counted under.
fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Ehlo(_) => "ehlo",
        Command::Helo(_) => "helo",
        Command::Mail { .. } => "mail",
        Command::Rcpt { .. } => "rcpt",
        Command::Data => "data",
        Command::Rset => "rset",
        Command::Noop => "noop",
        Command::Quit => "quit",
        Command::Vrfy => "vrfy",
        Command::Expn => "expn",
        Command::Help => "help",
        Command::StartTls => "starttls",
        Command::Auth { .. } => "auth",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::data::{DataDecoder, Progress};

    /// Accepts everything under `localhost`; relays only when authenticated;
    /// one account alice@localhost / "Correct-Horse-9".
    struct FakeServices;

    impl Services for FakeServices {
        fn check_sender(
            &self,
            client: &ClientView,
            sender: &ReversePath,
        ) -> Result<SenderStanding, Reply> {
            match (client.user, sender.address()) {
                (Some(user), Some(address)) if address.mailbox_key() != user => Err(Reply::new(
                    reply::SENDER_NOT_OWNED,
                    "Sender address not owned by user",
                )),
                _ => Ok(SenderStanding {
                    accountable: client.user.is_some(),
                    spf: None,
                    from_owner: None,
                }),
            }
        }

        fn check_recipient(
            &self,
            client: &ClientView,
            recipient: &Address,
        ) -> Result<Vec<Recipient>, Reply> {
            if recipient.domain().as_str() == "localhost" {
                if recipient.local_part() == "team" {
                    return Ok(vec![local("alice@localhost"), remote("bob@example.org")]);
                }
                return Ok(vec![local(&recipient.mailbox_key())]);
            }
            if client.user.is_some() {
                return Ok(vec![remote(&recipient.to_string())]);
            }
            Err(Reply::new(reply::RELAY_DENIED, "Relay access denied"))
        }

        fn authenticate(
            &self,
            _client: &ClientView,
            _mechanism: &str,
            username: &str,
            password: &str,
        ) -> AuthVerdict {
            if username == "alice@localhost" && password == "Correct-Horse-9" {
                AuthVerdict::Success {
                    account: username.to_string(),
                    app_password: None,
                }
            } else if username == "alice@localhost" && password == "app-password" {
                AuthVerdict::Success {
                    account: username.to_string(),
                    app_password: Some("phone".into()),
                }
            } else if username == "alice@localhost" && password == "revoked-soon" {
                AuthVerdict::Success {
                    account: username.to_string(),
                    app_password: Some("revoked".into()),
                }
            } else {
                AuthVerdict::Failure {
                    delay: Duration::from_millis(500),
                }
            }
        }

        fn is_locked_out(&self, ip: IpAddr) -> bool {
            ip == IpAddr::from([192, 0, 2, 66])
        }

        fn has_room(&self) -> bool {
            true
        }

        /// The app password "revoked" is revoked as soon as it is used.
        fn login_stands(&self, _account: &str, app_password: Option<&str>) -> bool {
            app_password != Some("revoked")
        }
    }

    fn local(mailbox: &str) -> Recipient {
        Recipient {
            address: mailbox.to_string(),
            domain: "localhost".into(),
            route: Route::Local {
                mailbox: mailbox.to_string(),
            },
        }
    }

    fn remote(address: &str) -> Recipient {
        let domain = address.rsplit_once('@').unwrap().1.to_string();
        Recipient {
            address: address.to_string(),
            route: Route::Remote {
                domain: domain.clone(),
            },
            domain,
        }
    }

    fn stamp() -> Stamp {
        Stamp {
            id: "0123456789ABCDEF".into(),
            now: SystemTime::now(),
        }
    }

    fn config(listener: ListenerKind) -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            hostname: "mx.test".into(),
            listener,
            max_message_size: 1000,
            max_recipients: 3,
            max_errors: 10,
            soft_errors: 10,
            tls_available: true,
            postmaster: Address::parse("postmaster@localhost").ok(),
            max_header_size: 500,
            max_hops: 5,
        })
    }

    fn session() -> Session {
        Session::new(
            config(ListenerKind::Smtp),
            IpAddr::from([127, 0, 0, 1]),
            None,
        )
    }

    fn tls_info() -> TlsInfo {
        TlsInfo {
            version: "TLSv1_3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
        }
    }

    /// Sends one line, returns the codes of the replies.
    fn send(session: &mut Session, line: &str) -> (Vec<u16>, Action) {
        let step = session.handle_line(line.as_bytes(), &FakeServices);
        (step.replies.iter().map(Reply::code).collect(), step.action)
    }

    fn code(session: &mut Session, line: &str) -> u16 {
        let (codes, _) = send(session, line);
        assert_eq!(codes.len(), 1, "{line}: {codes:?}");
        codes[0]
    }

    /// A stranger's session after EHLO, MAIL, RCPT to alice and DATA (354).
    fn at_data() -> Session {
        let mut s = session();
        code(&mut s, "EHLO c");
        code(&mut s, "MAIL FROM:<a@example.org>");
        code(&mut s, "RCPT TO:<alice@localhost>");
        code(&mut s, "DATA");
        s
    }

    /// [`at_data`], then a message the session handed to the queue.
    fn handed_to_queue() -> Session {
        let mut s = at_data();
        let step = finish_data(&mut s, b"x\r\n.\r\n");
        assert!(matches!(step.action, Action::Enqueue(_)));
        s
    }

    fn finish_data(session: &mut Session, data: &[u8]) -> Step {
        let mut decoder = DataDecoder::new(1000, crate::protocol::data::MAX_TEXT_LINE);
        let mut body = Vec::new();
        assert!(matches!(
            decoder.feed(data, &mut body),
            Progress::Done { .. }
        ));
        session.data_finished(decoder.finish(), stamp())
    }

    fn deliver(session: &mut Session, data: &[u8]) -> Envelope {
        let step = finish_data(session, data);
        let Action::Enqueue(message) = step.action else {
            panic!("expected Enqueue, got {:?}", step.replies);
        };
        assert!(step.replies.is_empty(), "250 must wait for the queue");
        let step = session.enqueued(Ok(()));
        assert_eq!(step.replies[0].code(), 250);
        assert!(step.replies[0].lines[0].contains(&message.id));
        *message
    }

    #[test]
    fn full_transaction() {
        let mut s = session();
        assert_eq!(s.greeting().code(), 220);
        assert_eq!(code(&mut s, "EHLO client.test"), 250);
        assert_eq!(code(&mut s, "MAIL FROM:<sender@example.org> SIZE=100"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<Postmaster>"), 250);
        let (codes, action) = send(&mut s, "DATA");
        assert_eq!(codes, vec![354]);
        assert!(matches!(action, Action::ReceiveData));
        let message = deliver(&mut s, b"Subject: hi\r\n\r\nHello\r\n.\r\n");
        assert_eq!(message.sender, "sender@example.org");
        let to: Vec<&str> = message
            .recipients
            .iter()
            .map(|r| r.target.address.as_str())
            .collect();
        assert_eq!(to, vec!["alice@localhost", "postmaster@localhost"]);
        let text = String::from_utf8(message.trace_header).unwrap();
        assert!(text.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (petrel) with ESMTP id "
        ));
        assert!(text.ends_with(" +0000\r\n"), "{text}");
        assert_eq!(
            message.body_size,
            b"Subject: hi\r\n\r\nHello\r\n".len() as u64
        );
        assert!(!text.contains("for <"), "two recipients: no 'for' clause");
        // The transaction is over; a new one needs MAIL again.
        assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 503);
        let (codes, action) = send(&mut s, "QUIT");
        assert_eq!(codes, vec![221]);
        assert!(matches!(action, Action::Close));
    }

    #[test]
    fn ehlo_advertises_extensions() {
        let mut s = session();
        let step = s.handle_line(b"EHLO c", &FakeServices);
        let lines = &step.replies[0].lines;
        for extension in [
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
            "STARTTLS",
        ] {
            assert!(
                lines.iter().any(|l| l == extension),
                "{extension} missing: {lines:?}"
            );
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("AUTH")),
            "no AUTH before TLS"
        );
        s.tls_started(tls_info());
        let step = s.handle_line(b"EHLO c", &FakeServices);
        let lines = &step.replies[0].lines;
        assert!(lines.iter().any(|l| l == "AUTH PLAIN LOGIN"));
        assert!(!lines.iter().any(|l| l == "STARTTLS"));
    }

    #[test]
    fn helo_gets_a_single_line_and_no_extensions() {
        let mut s = session();
        let step = s.handle_line(b"HELO c", &FakeServices);
        assert_eq!(step.replies[0].lines.len(), 1);
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org> SIZE=10"), 555);
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
    }

    #[test]
    fn bad_sequences() {
        let mut s = session();
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 503);
        assert_eq!(code(&mut s, "EHLO c"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 503);
        assert_eq!(code(&mut s, "DATA"), 503);
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 503);
        assert_eq!(code(&mut s, "DATA"), 503, "no valid recipients");
        assert_eq!(code(&mut s, "RSET"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<alice@localhost>"), 503);
    }

    #[test]
    fn misc_commands() {
        let mut s = session();
        assert_eq!(code(&mut s, "NOOP"), 250);
        assert_eq!(code(&mut s, "VRFY alice"), 252);
        assert_eq!(code(&mut s, "EXPN list"), 502);
        assert_eq!(code(&mut s, "HELP"), 214);
        assert_eq!(code(&mut s, "BOGUS"), 500);
        assert_eq!(code(&mut s, &format!("NOOP {}", "x".repeat(600))), 500);
    }

    #[test]
    fn size_is_checked_at_mail() {
        let mut s = session();
        code(&mut s, "EHLO c");
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org> SIZE=1001"), 552);
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org> SIZE=1000"), 250);
    }

    #[test]
    fn refused_data_resets_the_transaction() {
        let mut s = at_data();
        let step = s.data_finished(Err(DataError::TooLarge), stamp());
        assert_eq!(step.replies[0].code(), 552);
        code(&mut s, "MAIL FROM:<a@example.org>");
        code(&mut s, "RCPT TO:<alice@localhost>");
        code(&mut s, "DATA");
        let step = s.data_finished(Err(DataError::BareLineFeed), stamp());
        assert_eq!(step.replies[0].code(), 554);
        assert_eq!(code(&mut s, "DATA"), 503);
    }

    #[test]
    fn queue_failure_is_a_temporary_error() {
        let mut s = handed_to_queue();
        assert_eq!(
            s.enqueued(Err(NotQueued::Failed("disk full".into())))
                .replies[0]
                .code(),
            451
        );
    }

    #[test]
    fn a_message_refused_by_a_check_is_a_logged_rejection() {
        let mut s = handed_to_queue();
        let refusal = Reply::new(reply::DMARC_REJECT, "DMARC says no");
        let step = s.enqueued(Err(NotQueued::Refused(refusal)));
        assert_eq!(step.replies[0].to_wire(), "550 5.7.1 DMARC says no\r\n");
        let rejection = step.rejected.expect("logged as a rejection");
        assert_eq!(rejection.stage, "END-OF-MESSAGE");
        assert_eq!(rejection.from.as_deref(), Some("a@example.org"));
        assert_eq!(rejection.to.as_deref(), Some("alice@localhost"));
        // The session goes on: the next transaction is possible.
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
    }

    #[test]
    fn too_many_recipients() {
        let mut s = session();
        code(&mut s, "EHLO c");
        code(&mut s, "MAIL FROM:<a@example.org>");
        for n in 0..3 {
            assert_eq!(code(&mut s, &format!("RCPT TO:<u{n}@localhost>")), 250);
        }
        assert_eq!(code(&mut s, "RCPT TO:<u9@localhost>"), 452);
    }

    #[test]
    fn relay_is_refused_without_auth() {
        let mut s = session();
        code(&mut s, "EHLO c");
        code(&mut s, "MAIL FROM:<a@example.org>");
        let step = s.handle_line(b"RCPT TO:<x@elsewhere.example>", &FakeServices);
        assert_eq!(step.replies[0].code(), 554);
        let rejected = step.rejected.expect("refusals are marked for the log");
        assert_eq!(rejected.stage, "RCPT");
        assert_eq!(rejected.from.as_deref(), Some("a@example.org"));
        assert_eq!(rejected.to.as_deref(), Some("x@elsewhere.example"));
        assert_eq!(rejected.helo.as_deref(), Some("c"));
        let accepted = s.handle_line(b"RCPT TO:<alice@localhost>", &FakeServices);
        assert!(accepted.rejected.is_none());
    }

    #[test]
    fn aliases_expand_and_deduplicate() {
        let mut s = session();
        code(&mut s, "EHLO c");
        code(&mut s, "MAIL FROM:<a@example.org>");
        code(&mut s, "RCPT TO:<team@localhost>");
        code(&mut s, "RCPT TO:<alice@localhost>");
        code(&mut s, "DATA");
        let message = deliver(&mut s, b"x\r\n.\r\n");
        let recipients: Vec<(&str, Option<&str>)> = message
            .recipients
            .iter()
            .map(|r| (r.target.address.as_str(), r.original.as_deref()))
            .collect();
        assert_eq!(
            recipients,
            vec![
                ("alice@localhost", Some("team@localhost")),
                ("bob@example.org", Some("team@localhost")),
            ]
        );
    }

    #[test]
    fn mixed_case_local_recipients_become_their_mailbox() {
        let mut s = session();
        code(&mut s, "EHLO c");
        code(&mut s, "MAIL FROM:<a@example.org>");
        code(&mut s, "RCPT TO:<ALICE@localhost>");
        code(&mut s, "RCPT TO:<alice@LOCALHOST>");
        code(&mut s, "DATA");
        let message = deliver(&mut s, b"x\r\n.\r\n");
        assert_eq!(message.recipients.len(), 1, "one mailbox, delivered once");
        let recipient = &message.recipients[0];
        assert_eq!(recipient.target.address, "alice@localhost");
        assert_eq!(
            recipient.target.route,
            Route::Local {
                mailbox: "alice@localhost".into()
            }
        );
        assert_eq!(recipient.original.as_deref(), Some("ALICE@localhost"));
    }

    fn refused_at_end_of_data(data: &[u8]) -> Reply {
        let mut s = at_data();
        let step = finish_data(&mut s, data);
        assert!(matches!(step.action, Action::Continue), "nothing queued");
        assert_eq!(code(&mut s, "DATA"), 503, "the transaction is over");
        step.replies[0].clone()
    }

    #[test]
    fn hop_count_header_size_and_loops_are_refused_at_end_of_data() {
        let hops = "Received: x\r\n".repeat(5) + "\r\nbody\r\n.\r\n";
        let reply = refused_at_end_of_data(hops.as_bytes());
        assert_eq!(reply.to_wire().get(..10), Some("554 5.4.6 "), "{reply:?}");
        assert!(reply.lines[0].contains("Too many hops"));

        let big = format!("X-Big: {}\r\n\r\n.\r\n", "y".repeat(600));
        let reply = refused_at_end_of_data(big.as_bytes());
        assert_eq!(reply.to_wire().get(..10), Some("552 5.3.4 "), "{reply:?}");
        assert!(reply.lines[0].contains("header section"));

        let looped = b"Delivered-To: ALICE@localhost\r\n\r\nx\r\n.\r\n";
        let reply = refused_at_end_of_data(looped);
        assert_eq!(reply.to_wire().get(..10), Some("554 5.4.6 "), "{reply:?}");
        assert!(reply.lines[0].contains("loop"));

        // Just under every limit: accepted.
        let mut s = at_data();
        let fine = "Received: x\r\n".repeat(4) + "Delivered-To: bob@localhost\r\n\r\n.\r\n";
        deliver(&mut s, fine.as_bytes());
    }

    #[test]
    fn success_reports_only_for_accountable_senders() {
        let mut s = session();
        code(&mut s, "EHLO c");
        code(&mut s, "MAIL FROM:<a@example.org> RET=FULL ENVID=abc");
        code(
            &mut s,
            "RCPT TO:<alice@localhost> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+40localhost",
        );
        code(&mut s, "DATA");
        let message = deliver(&mut s, b"x\r\n.\r\n");
        assert_eq!(message.ret, Some(Ret::Full));
        assert_eq!(message.envid.as_deref(), Some("abc"));
        let recipient = &message.recipients[0];
        assert_eq!(
            recipient.notify,
            Some(Notify {
                success: false,
                failure: true,
                delay: false
            }),
            "a stranger cannot order success reports"
        );
        assert_eq!(recipient.orcpt.as_deref(), Some("rfc822;A@localhost"));

        let mut s = tls_session(ListenerKind::Submission);
        let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
        code(&mut s, &format!("AUTH PLAIN {plain}"));
        code(&mut s, "MAIL FROM:<alice@localhost>");
        code(&mut s, "RCPT TO:<x@elsewhere.example> NOTIFY=SUCCESS");
        code(&mut s, "DATA");
        let message = deliver(&mut s, b"x\r\n.\r\n");
        assert!(message.recipients[0].notify.is_some_and(|n| n.success));
    }

    #[test]
    fn utf8_addresses_need_smtputf8() {
        let mut s = session();
        code(&mut s, "EHLO c");
        assert_eq!(code(&mut s, "MAIL FROM:<José@example.org>"), 553);
        assert_eq!(code(&mut s, "MAIL FROM:<a@example.org>"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<josé@localhost>"), 553);
        code(&mut s, "RSET");
        assert_eq!(code(&mut s, "MAIL FROM:<José@example.org> SMTPUTF8"), 250);
        assert_eq!(code(&mut s, "RCPT TO:<josé@localhost>"), 250);
        code(&mut s, "DATA");
        let message = deliver(&mut s, b"x\r\n.\r\n");
        assert!(message.smtputf8);
        assert!(
            String::from_utf8(message.trace_header)
                .unwrap()
                .contains("with UTF8SMTP id")
        );
    }

    #[test]
    fn too_many_errors_closes() {
        let mut s = session();
        for _ in 0..9 {
            let (codes, action) = send(&mut s, "BOGUS");
            assert_eq!(codes, vec![500]);
            assert!(matches!(action, Action::Continue));
        }
        let (codes, action) = send(&mut s, "BOGUS");
        assert_eq!(codes, vec![500, 421]);
        assert!(matches!(action, Action::Close));
    }

    #[test]
    fn starttls_resets_state() {
        let mut s = session();
        code(&mut s, "EHLO c");
        code(&mut s, "MAIL FROM:<a@example.org>");
        let (codes, action) = send(&mut s, "STARTTLS");
        assert_eq!(codes, vec![220]);
        assert!(matches!(action, Action::StartTls));
        s.tls_started(tls_info());
        assert_eq!(
            code(&mut s, "MAIL FROM:<a@example.org>"),
            503,
            "EHLO needed again"
        );
        assert_eq!(code(&mut s, "EHLO c"), 250);
        assert_eq!(code(&mut s, "STARTTLS"), 503);
    }

    #[test]
    fn starttls_without_certificate() {
        let mut s = Session::new(
            Arc::new(SessionConfig {
                tls_available: false,
                ..(*config(ListenerKind::Smtp)).clone()
            }),
            IpAddr::from([127, 0, 0, 1]),
            None,
        );
        code(&mut s, "EHLO c");
        assert_eq!(code(&mut s, "STARTTLS"), 454);
    }

    #[test]
    fn auth_needs_tls() {
        let mut s = session();
        code(&mut s, "EHLO c");
        assert_eq!(
            code(
                &mut s,
                "AUTH PLAIN AGFsaWNlQGxvY2FsaG9zdABDb3JyZWN0LUhvcnNlLTk="
            ),
            538
        );
        assert!(s.authenticated_user().is_none());
    }

    fn tls_session(listener: ListenerKind) -> Session {
        let mut s = Session::new(
            config(listener),
            IpAddr::from([127, 0, 0, 1]),
            Some(tls_info()),
        );
        code(&mut s, "EHLO c");
        s
    }

    #[test]
    fn auth_plain_initial_response() {
        let mut s = tls_session(ListenerKind::Submission);
        assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 530);
        let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
        assert_eq!(code(&mut s, &format!("AUTH PLAIN {plain}")), 235);
        assert_eq!(s.authenticated_user(), Some("alice@localhost"));
        assert_eq!(code(&mut s, "AUTH PLAIN {plain}"), 503);
        assert_eq!(code(&mut s, "MAIL FROM:<bob@localhost>"), 553);
        assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 250);
        assert_eq!(
            code(&mut s, "RCPT TO:<x@elsewhere.example>"),
            250,
            "authenticated relay"
        );
        code(&mut s, "DATA");
        let message = deliver(&mut s, b"x\r\n.\r\n");
        assert_eq!(message.auth_user.as_deref(), Some("alice@localhost"));
        let text = String::from_utf8(message.trace_header).unwrap();
        assert!(text.contains("with ESMTPSA id"), "{text}");
        assert!(
            text.contains("(using TLSv1_3 with cipher TLS13_AES_256_GCM_SHA384)"),
            "{text}"
        );
        assert!(text.contains("for <x@elsewhere.example>"), "{text}");
    }

    #[test]
    fn a_session_whose_app_password_is_revoked_sends_nothing_more() {
        let mut s = tls_session(ListenerKind::Submission);
        let plain = BASE64.encode("\0alice@localhost\0revoked-soon");
        assert_eq!(code(&mut s, &format!("AUTH PLAIN {plain}")), 235);
        assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 530);
        assert!(s.authenticated_user().is_none(), "logged out");
        // The next transaction needs a login that stands.
        assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 530);
        let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
        assert_eq!(code(&mut s, &format!("AUTH PLAIN {plain}")), 235);
        assert_eq!(code(&mut s, "MAIL FROM:<alice@localhost>"), 250);
    }

    #[test]
    fn submission_adds_a_missing_date_and_message_id_the_mx_port_does_not() {
        let mut s = tls_session(ListenerKind::Submission);
        let plain = BASE64.encode("\0alice@localhost\0Correct-Horse-9");
        code(&mut s, &format!("AUTH PLAIN {plain}"));
        code(&mut s, "MAIL FROM:<alice@localhost>");
        code(&mut s, "RCPT TO:<bob@localhost>");
        code(&mut s, "DATA");
        let message = deliver(&mut s, b"Subject: bare\r\n\r\nx\r\n.\r\n");
        let text = String::from_utf8(message.trace_header).unwrap();
        assert!(text.contains("\r\nDate: "), "{text}");
        assert!(
            text.contains(&format!("\r\nMessage-ID: <{}@mx.test>\r\n", message.id)),
            "{text}"
        );

        code(&mut s, "MAIL FROM:<alice@localhost>");
        code(&mut s, "RCPT TO:<bob@localhost>");
        code(&mut s, "DATA");
        let message = deliver(
            &mut s,
            b"Date: Sun, 1 Nov 2026 10:00:00 +0000\r\nMessage-ID: <own@x>\r\n\r\nx\r\n.\r\n",
        );
        let text = String::from_utf8(message.trace_header).unwrap();
        assert!(
            !text.contains("Date:") && !text.contains("Message-ID:"),
            "{text}"
        );

        let mut mx = session();
        code(&mut mx, "EHLO c");
        code(&mut mx, "MAIL FROM:<a@example.org>");
        code(&mut mx, "RCPT TO:<alice@localhost>");
        code(&mut mx, "DATA");
        let message = deliver(&mut mx, b"Subject: bare\r\n\r\nx\r\n.\r\n");
        let text = String::from_utf8(message.trace_header).unwrap();
        assert!(
            !text.contains("Date:") && !text.contains("Message-ID:"),
            "{text}"
        );
    }

    #[test]
    fn auth_plain_with_challenge_and_login() {
        let mut s = tls_session(ListenerKind::Smtps);
        let step = s.handle_line(b"AUTH PLAIN", &FakeServices);
        assert_eq!(step.replies[0].to_wire(), "334 \r\n");
        let plain = BASE64.encode("alice@localhost\0alice@localhost\0Correct-Horse-9");
        assert_eq!(code(&mut s, &plain), 235);

        let mut s = tls_session(ListenerKind::Smtps);
        let step = s.handle_line(b"AUTH LOGIN", &FakeServices);
        assert_eq!(step.replies[0].to_wire(), "334 VXNlcm5hbWU6\r\n");
        let step = s.handle_line(BASE64.encode("alice@localhost").as_bytes(), &FakeServices);
        assert_eq!(step.replies[0].to_wire(), "334 UGFzc3dvcmQ6\r\n");
        assert_eq!(code(&mut s, &BASE64.encode("Correct-Horse-9")), 235);
    }

    #[test]
    fn auth_failures() {
        let mut s = tls_session(ListenerKind::Submission);
        let step = s.handle_line(
            format!("AUTH PLAIN {}", BASE64.encode("\0alice@localhost\0wrong")).as_bytes(),
            &FakeServices,
        );
        assert_eq!(step.replies[0].code(), 535);
        assert_eq!(step.delay, Some(Duration::from_millis(500)));
        assert_eq!(code(&mut s, "AUTH PLAIN !!!notbase64"), 501);
        assert_eq!(
            code(&mut s, &format!("AUTH PLAIN {}", BASE64.encode("no-nuls"))),
            501
        );
        assert_eq!(code(&mut s, "AUTH CRAM-MD5"), 504);
        code(&mut s, "AUTH LOGIN");
        assert_eq!(code(&mut s, "*"), 501, "cancelled");
        assert_eq!(code(&mut s, "NOOP"), 250, "back in command mode");
        let plain = BASE64.encode("bob@localhost\0alice@localhost\0Correct-Horse-9");
        assert_eq!(
            code(&mut s, &format!("AUTH PLAIN {plain}")),
            535,
            "no proxy auth"
        );
    }

    #[test]
    fn locked_out_address_is_dropped() {
        let mut s = Session::new(
            config(ListenerKind::Submission),
            IpAddr::from([192, 0, 2, 66]),
            Some(tls_info()),
        );
        code(&mut s, "EHLO c");
        let (codes, action) = send(&mut s, "AUTH LOGIN");
        assert_eq!(codes, vec![421]);
        assert!(matches!(action, Action::Close));
    }
}
