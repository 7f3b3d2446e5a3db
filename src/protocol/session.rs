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
use std::time::Duration;

use super::address::{Address, ReversePath};
use super::command::{BodyType, Command, ForwardPath, MailParams, RcptParams, parse_command};
use super::data::{ContentLimits, DataError, DataSummary, content_refusal};
use super::dsn::Notify;
use super::reply::{self, Reply};
use super::sasl;
pub use super::services::{
    AuthVerdict, ClientView, Envelope, EnvelopeRecipient, FromOwner, Kinds, LocalUser, NotQueued,
    SenderStanding, Services, Stamp, SubmissionOutcome, Target,
};

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
pub enum Action<K: Kinds> {
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
    Enqueue(Box<Envelope<K>>),
}

#[derive(Debug)]
pub struct Step<K: Kinds> {
    pub replies: Vec<Reply>,
    pub action: Action<K>,
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

impl<K: Kinds> Step<K> {
    fn reply(reply: Reply) -> Step<K> {
        Step {
            replies: vec![reply],
            action: Action::Continue,
            delay: None,
            rejected: None,
        }
    }

    fn then(mut self, action: Action<K>) -> Step<K> {
        self.action = action;
        self
    }

    fn nothing(action: Action<K>) -> Step<K> {
        Step {
            replies: Vec::new(),
            action,
            delay: None,
            rejected: None,
        }
    }
}

#[derive(Debug)]
struct Transaction<K: Kinds> {
    sender: ReversePath,
    params: MailParams,
    standing: SenderStanding<K>,
    recipients: Vec<AcceptedRecipient<K>>,
}

#[derive(Debug)]
struct AcceptedRecipient<K: Kinds> {
    envelope: Address,
    targets: Vec<K::Target>,
    notify: Option<Notify>,
    orcpt: Option<String>,
}

/// The message handed to the queue, and what a refusal's log line needs.
#[derive(Debug)]
struct AwaitingQueue {
    id: String,
    from: Option<String>,
    to: Option<String>,
}

#[derive(Debug)]
pub struct Session<K: Kinds> {
    config: Arc<SessionConfig>,
    client_ip: IpAddr,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsInfo>,
    user: Option<String>,
    /// The app password `user` logged in with.
    app_password: Option<String>,
    transaction: Option<Transaction<K>>,
    auth: Option<sasl::Exchange>,
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

impl<K: Kinds> Session<K> {
    /// `tls` is set for implicit-TLS listeners, where the handshake came first.
    pub fn new(config: Arc<SessionConfig>, client_ip: IpAddr, tls: Option<TlsInfo>) -> Session<K> {
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
    pub fn with_local_user(mut self, user: LocalUser) -> Session<K> {
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
    pub fn with_client_name(mut self, name: Option<String>) -> Session<K> {
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
    pub fn line_too_long(&mut self) -> Step<K> {
        self.auth = None;
        self.finish(Reply::new(reply::LINE_TOO_LONG, "Line too long"))
    }

    /// One line of input (without CRLF) in command mode.
    pub fn handle_line(&mut self, line: &[u8], services: &dyn Services<K>) -> Step<K> {
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

    fn command(&mut self, line: &[u8], services: &dyn Services<K>) -> Step<K> {
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
        mut step: Step<K>,
        stage: &'static str,
        from: Option<String>,
        to: Option<String>,
    ) -> Step<K> {
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

    fn run_command(&mut self, command: Command, services: &dyn Services<K>) -> Step<K> {
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

    fn finish(&mut self, reply: Reply) -> Step<K> {
        self.count_errors(Step::reply(reply))
    }

    /// Every 5xx counts; past the soft limit each one is answered a second
    /// late, past the hard limit the client is told 421 and dropped, which
    /// stops blind scanners and broken loops early.
    fn count_errors(&mut self, mut step: Step<K>) -> Step<K> {
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

    fn ehlo(&mut self, name: String, esmtp: bool) -> Step<K> {
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

    fn mail(
        &mut self,
        from: ReversePath,
        params: MailParams,
        services: &dyn Services<K>,
    ) -> Step<K> {
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

    fn rcpt(&mut self, to: ForwardPath, params: RcptParams, services: &dyn Services<K>) -> Step<K> {
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

    fn data(&mut self) -> Step<K> {
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
    pub fn data_finished(
        &mut self,
        result: Result<DataSummary, DataError>,
        stamp: Stamp,
    ) -> Step<K> {
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
        transaction: Transaction<K>,
        result: Result<DataSummary, DataError>,
        stamp: Stamp,
    ) -> Step<K> {
        let message = match result {
            Ok(message) => message,
            Err(error) => return self.finish(self.data_refused(error)),
        };
        if let Some(refusal) = self.refuse_content(&transaction, &message) {
            return self.finish(refusal);
        }
        let id = stamp.id;
        let trace_header = self.added_header(&id, &transaction, &message, stamp.now);

        let recipients = final_recipients(&transaction);
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
            client_name: self.client_name.clone(),
            tls_version: self.tls.as_ref().map(|tls| tls.version.to_string()),
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

    fn data_refused(&self, error: DataError) -> Reply {
        match error {
            DataError::TooLarge => Reply::new(
                reply::MESSAGE_TOO_BIG,
                format!(
                    "Message size exceeds fixed maximum message size ({} octets)",
                    self.config.max_message_size
                ),
            ),
            DataError::LineTooLong => {
                Reply::new(reply::LINE_TOO_LONG, DataError::LineTooLong.describe())
            }
            DataError::NoStorage => {
                Reply::new(reply::STORAGE_FULL, DataError::NoStorage.describe())
            }
            error => Reply::new(reply::BAD_MESSAGE_DATA, error.describe()),
        }
    }

    fn refuse_content(&self, transaction: &Transaction<K>, message: &DataSummary) -> Option<Reply> {
        let local_mailboxes = transaction
            .recipients
            .iter()
            .flat_map(|r| &r.targets)
            .filter_map(|t| t.local_mailbox());
        let limits = ContentLimits {
            max_header_size: self.config.max_header_size,
            max_hops: self.config.max_hops,
        };
        content_refusal(&message.headers, &limits, local_mailboxes)
    }

    /// The queue's answer for the message from [`Action::Enqueue`]: only now
    /// may the client hear 250, because only now is the message on disk.
    pub fn enqueued(&mut self, result: Result<(), NotQueued>) -> Step<K> {
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

    fn starttls(&mut self) -> Step<K> {
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

    fn auth(
        &mut self,
        mechanism: &str,
        initial: Option<String>,
        services: &dyn Services<K>,
    ) -> Step<K> {
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
        let Some((exchange, challenge)) = sasl::start(mechanism) else {
            return Step::reply(Reply::new(
                reply::UNKNOWN_AUTH_MECHANISM,
                "Unrecognized authentication mechanism",
            ));
        };
        match initial {
            None => self.challenge(exchange, challenge),
            Some(response) => self.continue_auth(exchange, response.as_bytes(), services),
        }
    }

    fn challenge(&mut self, next: sasl::Exchange, text: &str) -> Step<K> {
        self.auth = Some(next);
        Step::reply(Reply::new(reply::AUTH_CHALLENGE, text))
    }

    fn locked_out(&mut self) -> Step<K> {
        Step::reply(Reply::new(
            reply::AUTH_LOCKED_OUT,
            "Too many failed logins from your address, try again later",
        ))
        .then(Action::Close)
    }

    fn continue_auth(
        &mut self,
        exchange: sasl::Exchange,
        line: &[u8],
        services: &dyn Services<K>,
    ) -> Step<K> {
        let mechanism = match exchange {
            sasl::Exchange::PlainResponse => "PLAIN",
            _ => "LOGIN",
        };
        match sasl::respond(exchange, line) {
            sasl::Response::Cancelled => Step::reply(Reply::new(
                reply::AUTH_CANCELLED,
                "Authentication cancelled",
            )),
            sasl::Response::Malformed => Step::reply(Reply::new(
                reply::AUTH_MALFORMED,
                "Malformed authentication response",
            )),
            sasl::Response::ActingAsOther => Step::reply(Reply::new(
                reply::AUTH_INVALID_CREDENTIALS,
                "Authentication credentials invalid",
            )),
            sasl::Response::Challenge(next, text) => self.challenge(next, text),
            sasl::Response::Credentials { username, password } => {
                self.verify_password(mechanism, &username, &password, services)
            }
        }
    }

    fn verify_password(
        &mut self,
        mechanism: &str,
        username: &str,
        password: &str,
        services: &dyn Services<K>,
    ) -> Step<K> {
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

/// Every final recipient once: two aliases that end at the same mailbox
/// deliver once.
fn final_recipients<K: Kinds>(transaction: &Transaction<K>) -> Vec<EnvelopeRecipient<K>> {
    let mut recipients: Vec<EnvelopeRecipient<K>> = Vec::new();
    for accepted in &transaction.recipients {
        for target in &accepted.targets {
            if recipients.iter().any(|r| r.target == *target) {
                continue;
            }
            let original = accepted.envelope.to_string();
            recipients.push(EnvelopeRecipient {
                original: (original != target.address()).then_some(original),
                target: target.clone(),
                notify: accepted.notify,
                orcpt: accepted.orcpt.clone(),
            });
        }
    }
    recipients
}

#[path = "session_trace.rs"]
mod trace;

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
