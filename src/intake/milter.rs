//! Content filters over the milter protocol (rspamd, OpenDKIM, OpenDMARC,
//! ClamAV): when DATA ends, before the final reply, each configured milter
//! is told the whole conversation (connect, HELO, MAIL, RCPT, DATA, the
//! header fields, the body in 64 KiB pieces, end of message) and its
//! verdict and changes are applied; the next milter sees them. A reject
//! is an SMTP reject (no bounce), and petrel's DKIM signature, made after,
//! covers the filtered message.
//!
//! The conversation is held at the end of DATA rather than command by
//! command: a milter's refusal at any stage refuses the message (a
//! recipient it refuses at RCPT refuses the message rather than being
//! dropped unheard by the sender).
//!
//! Bounded: each reply within `command_timeout`, the message from its
//! first header to the verdict within `content_timeout`, packets of at
//! most [`crate::protocol::milter::MAX_PACKET`] read into a fixed buffer, header edits within
//! `limits.max_header_size`, a replaced body within
//! `limits.max_message_size`. A milter that cannot be asked costs at most
//! its timeouts, then `on_failure` applies, logged.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{Config, MilterAddress, MilterConfig, OnFailure};
use crate::printable::escape;
use crate::protocol::milter::{
    BODY_CHUNK, Command, Family, PacketReader, Response, Stage, VERSION, actions, steps,
};
use crate::protocol::reply::{self, Reply};
use crate::queue::content::{Body, Content, Spool};

/// What the milters decided about a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queue it (with the changes applied to the draft).
    Accept,
    /// Refuse it with this reply (4xx or 5xx).
    Refuse(Reply),
    /// Say 250 and drop it.
    Discard,
}

/// The message as the milters see and change it: its header fields, its
/// body, and its envelope.
pub struct Draft {
    /// Name and value (the text after the colon, folding kept).
    pub headers: Vec<(String, String)>,
    body: DraftBody,
    pub sender: String,
    /// MAIL FROM's parameters (`SIZE=`, `BODY=8BITMIME`, ...).
    pub sender_args: Vec<String>,
    pub recipients: Vec<String>,
    /// Set by a milter: held in the queue until an operator releases it.
    pub quarantine: Option<String>,
    /// Header fields or body were changed: the content must be rebuilt.
    pub changed: bool,
    /// Where a rebuilt or replaced body is spooled.
    data_dir: PathBuf,
}

/// Where the body is: inside the received content, after its header
/// section, or replaced by a milter.
enum DraftBody {
    Original { content: Content, offset: u64 },
    Replaced(Body),
}

/// Facts about the session, for the connect, HELO, MAIL and RCPT steps
/// and their macros.
pub struct Session<'a> {
    pub queue_id: &'a str,
    pub hostname: &'a str,
    pub client_ip: IpAddr,
    pub client_name: Option<&'a str>,
    pub helo: Option<&'a str>,
    pub auth_user: Option<&'a str>,
    pub tls_version: Option<&'a str>,
}

/// Bounds on what milters may make of a message.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub max_header_size: u64,
    pub max_message_size: u64,
}

impl Bounds {
    pub fn of(config: &Config) -> Bounds {
        Bounds {
            max_header_size: config.limits.max_header_size.bytes(),
            max_message_size: config.limits.max_message_size.bytes(),
        }
    }
}

impl Draft {
    /// Splits `content` into its header fields and the rest, reading at
    /// most `max_header_size` (and 64 KiB of slack) of it.
    pub fn of(
        data_dir: &Path,
        content: Content,
        sender: String,
        sender_args: Vec<String>,
        recipients: Vec<String>,
        bounds: Bounds,
    ) -> io::Result<Draft> {
        let limit = bounds.max_header_size + 65_536;
        let mut head = Vec::new();
        content.reader()?.take(limit).read_to_end(&mut head)?;
        let (headers, offset) = split_header_section(&head);
        Ok(Draft {
            headers,
            body: DraftBody::Original {
                content,
                offset: offset as u64,
            },
            sender,
            sender_args,
            recipients,
            quarantine: None,
            changed: false,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Reads the body (what follows the header section's blank line).
    fn body_reader(&self) -> io::Result<Box<dyn Read + '_>> {
        match &self.body {
            DraftBody::Original { content, offset } => {
                let mut reader = content.reader()?;
                io::copy(&mut (&mut reader).take(*offset), &mut io::sink())?;
                Ok(reader)
            }
            DraftBody::Replaced(body) => body.reader(),
        }
    }

    /// The message as it now stands: unchanged content as it came, or the
    /// header fields and body written out anew (spooled in `data_dir`).
    pub fn into_content(self) -> io::Result<Content> {
        if !self.changed
            && let DraftBody::Original { content, .. } = self.body
        {
            return Ok(content);
        }
        let mut prefix = Vec::new();
        for (name, value) in &self.headers {
            prefix.extend_from_slice(name.as_bytes());
            prefix.push(b':');
            prefix.extend_from_slice(value.as_bytes());
            prefix.extend_from_slice(b"\r\n");
        }
        prefix.extend_from_slice(b"\r\n");
        let mut spool = Spool::new(&self.data_dir);
        let mut reader = self.body_reader()?;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            spool.write(&chunk[..n])?;
        }
        drop(reader);
        Ok(Content {
            prefix,
            body: spool.finish()?,
        })
    }

    fn header_size(&self) -> u64 {
        self.headers
            .iter()
            .map(|(name, value)| (name.len() + value.len() + 3) as u64)
            .sum()
    }
}

/// Header fields (name, value after the colon) and where the body starts.
/// A section without its blank line (the message is all header) ends at
/// the end of what was read.
fn split_header_section(head: &[u8]) -> (Vec<(String, String)>, usize) {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut at = 0;
    while at < head.len() {
        let end = head[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head.len(), |n| at + n + 1);
        let line = &head[at..end];
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.is_empty() {
            return (headers, end);
        }
        let text = String::from_utf8_lossy(text);
        if text.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push_str("\r\n");
                value.push_str(&text);
            }
        } else if let Some((name, value)) = text.split_once(':') {
            headers.push((name.to_string(), value.to_string()));
        } else {
            // Not a header field: the body starts here (no blank line).
            return (headers, at);
        }
        at = end;
    }
    (headers, at)
}

/// Asks every milter configured for `listener`, in order, each seeing the
/// changes of those before. The first refusal or discard ends it.
pub fn filter(
    milters: &[MilterConfig],
    listener: &str,
    session: &Session,
    draft: &mut Draft,
    bounds: Bounds,
) -> Verdict {
    for milter in milters
        .iter()
        .filter(|m| m.on.iter().any(|on| on == listener))
    {
        let outcome = match ask(milter, session, draft, bounds) {
            Ok(outcome) => outcome,
            Err(failure) => failed(milter, session, &failure),
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::Refuse(reply) => return Verdict::Refuse(reply),
            Outcome::Discard => return Verdict::Discard,
        }
    }
    Verdict::Accept
}

/// One milter's say.
enum Outcome {
    Continue,
    Refuse(Reply),
    Discard,
}

/// `on_failure`, logged.
fn failed(milter: &MilterConfig, session: &Session, failure: &Failure) -> Outcome {
    let id = session.queue_id;
    let address = &milter.address;
    match milter.on_failure {
        OnFailure::Tempfail => {
            log::warn!(
                "{id}: milter {address}: {failure}; message deferred (on_failure = tempfail)"
            );
            Outcome::Refuse(Reply::new(
                reply::MILTER_UNAVAILABLE,
                "Service unavailable - try again later",
            ))
        }
        OnFailure::Accept => {
            log::warn!(
                "{id}: milter {address}: {failure}; message accepted unfiltered (on_failure = accept)"
            );
            Outcome::Continue
        }
        OnFailure::Reject => {
            log::warn!("{id}: milter {address}: {failure}; message refused (on_failure = reject)");
            Outcome::Refuse(Reply::new(reply::MILTER_FAILED, "Service unavailable"))
        }
    }
}

/// Why a milter could not be asked.
#[derive(Debug)]
pub enum Failure {
    Connect(String),
    Io(io::Error),
    Timeout(&'static str),
    Protocol(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(why) => write!(f, "cannot connect: {why}"),
            Failure::Io(error) => write!(f, "connection failed: {error}"),
            Failure::Timeout(what) => write!(f, "no reply in time ({what})"),
            Failure::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Failure {
        if matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Failure::Timeout("a read")
        } else {
            Failure::Io(error)
        }
    }
}

/// A connection to one milter, with the deadlines of what is being said.
struct Conversation {
    socket: Socket,
    reader: PacketReader,
    command_timeout: Duration,
    /// The end of the content phase, once it has begun.
    content_deadline: Option<Instant>,
    /// The milter's protocol flags (steps it skips or leaves unanswered).
    protocol: u32,
    out: Vec<u8>,
}

enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn connect(address: &MilterAddress, timeout: Duration) -> Result<Socket, Failure> {
        match address {
            MilterAddress::Unix(path) => {
                // A local socket connects at once or not at all.
                let stream = UnixStream::connect(path)
                    .map_err(|e| Failure::Connect(format!("{}: {e}", path.display())))?;
                Ok(Socket::Unix(stream))
            }
            MilterAddress::Inet(host_port) => {
                let (host, port) =
                    crate::config::parse_host_port(host_port).map_err(Failure::Connect)?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let addresses = (host, port)
                    .to_socket_addrs()
                    .map_err(|e| Failure::Connect(format!("{host_port}: {e}")))?;
                let mut last = format!("{host_port}: no address");
                for peer in addresses {
                    match TcpStream::connect_timeout(&peer, timeout) {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            return Ok(Socket::Tcp(stream));
                        }
                        Err(error) => last = format!("{peer}: {error}"),
                    }
                }
                Err(Failure::Connect(last))
            }
        }
    }

    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Socket::Unix(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))
            }
            Socket::Tcp(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))
            }
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(stream) => stream.read(buf),
            Socket::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(stream) => stream.write(buf),
            Socket::Tcp(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conversation {
    fn open(milter: &MilterConfig) -> Result<Conversation, Failure> {
        let address = MilterAddress::parse(&milter.address).map_err(Failure::Connect)?;
        let socket = Socket::connect(&address, milter.connect_timeout.get())?;
        let mut conversation = Conversation {
            socket,
            reader: PacketReader::default(),
            command_timeout: milter.command_timeout.get(),
            content_deadline: None,
            protocol: 0,
            out: Vec::with_capacity(BODY_CHUNK + 16),
        };
        conversation.negotiate()?;
        Ok(conversation)
    }

    fn negotiate(&mut self) -> Result<(), Failure> {
        self.send(&Command::Negotiate {
            version: VERSION,
            actions: actions::OFFERED,
            protocol: steps::OFFERED,
        })?;
        match self.receive()? {
            Response::Negotiated {
                version, protocol, ..
            } if (2..=VERSION).contains(&version) => {
                self.protocol = protocol & steps::OFFERED;
                Ok(())
            }
            Response::Negotiated { version, .. } => Err(Failure::Protocol(format!(
                "it speaks version {version}, petrel {VERSION}"
            ))),
            other => Err(Failure::Protocol(format!(
                "{other:?} instead of the option negotiation"
            ))),
        }
    }

    fn send(&mut self, command: &Command) -> Result<(), Failure> {
        self.out.clear();
        command.encode(&mut self.out);
        self.socket.set_timeouts(self.wait())?;
        self.socket.write_all(&self.out)?;
        Ok(())
    }

    /// How long the next read or write may take.
    fn wait(&self) -> Duration {
        let left = self
            .content_deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let wait = match left {
            Some(left) => left.min(self.command_timeout),
            None => self.command_timeout,
        };
        wait.max(Duration::from_millis(1))
    }

    /// The next response, read into a fixed buffer.
    fn receive(&mut self) -> Result<Response, Failure> {
        let mut buffer = [0u8; 8192];
        loop {
            if let Some(response) = self
                .reader
                .next_response()
                .map_err(|e| Failure::Protocol(e.to_string()))?
            {
                return Ok(response);
            }
            if self
                .content_deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                return Err(Failure::Timeout("content_timeout"));
            }
            self.socket.set_timeouts(self.wait())?;
            let n = match self.socket.read(&mut buffer) {
                Ok(0) => {
                    return Err(Failure::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the milter closed the connection",
                    )));
                }
                Ok(n) => n,
                Err(error) => return Err(error.into()),
            };
            self.reader.push(&buffer[..n]);
        }
    }

    /// The reply to a step: progress reports are waited through.
    fn reply(&mut self) -> Result<Response, Failure> {
        loop {
            match self.receive()? {
                Response::Progress => continue,
                response => return Ok(response),
            }
        }
    }

    /// Sends a stage's macros and command, and reads its reply unless the
    /// milter skips the stage or does not answer it.
    fn step(
        &mut self,
        stage: Stage,
        macros: &[(&str, String)],
        command: &Command,
    ) -> Result<Option<Response>, Failure> {
        if stage.skipped(self.protocol) {
            return Ok(None);
        }
        if !macros.is_empty() {
            self.send(&Command::Macros {
                stage,
                pairs: macros,
            })?;
        }
        self.send(command)?;
        if stage.unanswered(self.protocol) {
            return Ok(None);
        }
        self.reply().map(Some)
    }

    fn quit(&mut self) {
        let _ = self.send(&Command::Quit);
    }
}

/// What a reply to a step before the end of the message means.
enum Early {
    Next,
    /// The milter accepts the message and wants to see no more of it.
    Done,
    Say(Outcome),
}

fn early(response: Option<Response>, id: &str, milter: &str) -> Result<Early, Failure> {
    let Some(response) = response else {
        return Ok(Early::Next);
    };
    Ok(match response {
        Response::Continue => Early::Next,
        Response::Accept => Early::Done,
        Response::Skip => Early::Next,
        final_response => Early::Say(final_outcome(final_response, id, milter)?),
    })
}

/// Reject, tempfail, reply code and discard, as the message's outcome.
fn final_outcome(response: Response, id: &str, milter: &str) -> Result<Outcome, Failure> {
    Ok(match response {
        Response::Continue | Response::Accept => Outcome::Continue,
        Response::Reject => Outcome::Refuse(Reply::new(reply::MILTER_REFUSED, "Command rejected")),
        Response::Tempfail => Outcome::Refuse(Reply::new(
            reply::MILTER_UNAVAILABLE,
            "Service unavailable - try again later",
        )),
        Response::ReplyCode(text) => Outcome::Refuse(reply_of(&text)?),
        Response::Discard => {
            log::info!("{id}: milter {milter}: discard");
            Outcome::Discard
        }
        other => {
            return Err(Failure::Protocol(format!(
                "{other:?} where a verdict was expected"
            )));
        }
    })
}

/// `NNN X.Y.Z text` (lines joined by CRLF, `NNN-` before all but the
/// last): a 4xx or 5xx reply.
fn reply_of(text: &str) -> Result<Reply, Failure> {
    let bad = || Failure::Protocol(format!("{:?} is not a 4xx or 5xx reply", escape(text)));
    let code: u16 = text.get(..3).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    if !(400..600).contains(&code) {
        return Err(bad());
    }
    let lines: Vec<String> = text
        .split("\r\n")
        .filter(|line| !line.is_empty())
        .map(|line| {
            let rest = line.get(4..).unwrap_or("");
            escape(rest).into_owned()
        })
        .collect();
    let mut reply = Reply::new(
        reply::plain(code),
        lines.first().cloned().unwrap_or_default(),
    );
    reply.lines = lines;
    Ok(reply)
}

/// One milter's whole conversation about the message.
fn ask(
    milter: &MilterConfig,
    session: &Session,
    draft: &mut Draft,
    bounds: Bounds,
) -> Result<Outcome, Failure> {
    let mut talk = Conversation::open(milter)?;
    let result = converse(&mut talk, milter, session, draft, bounds);
    match &result {
        Ok(_) => talk.quit(),
        Err(_) => {
            let _ = talk.send(&Command::Abort);
            talk.quit();
        }
    }
    result
}

fn converse(
    talk: &mut Conversation,
    milter: &MilterConfig,
    session: &Session,
    draft: &mut Draft,
    bounds: Bounds,
) -> Result<Outcome, Failure> {
    let id = session.queue_id;
    let name = milter.address.as_str();
    macro_rules! early_step {
        ($stage:expr, $macros:expr, $command:expr) => {
            match early(talk.step($stage, $macros, $command)?, id, name)? {
                Early::Next => {}
                Early::Done => return Ok(Outcome::Continue),
                Early::Say(outcome) => return Ok(outcome),
            }
        };
    }
    let ip = session.client_ip.to_string();
    let client_name = session.client_name.unwrap_or("unknown").to_string();
    let connect_macros = [
        ("j", session.hostname.to_string()),
        ("{daemon_name}", "petrel".to_string()),
        ("{client_addr}", ip.clone()),
        ("{client_name}", client_name.clone()),
        ("_", format!("{client_name} [{ip}]")),
    ];
    let family = match session.client_ip {
        IpAddr::V4(_) => Family::Inet,
        IpAddr::V6(_) => Family::Inet6,
    };
    let connect_name = session
        .client_name
        .map_or_else(|| format!("[{ip}]"), str::to_string);
    early_step!(
        Stage::Connect,
        &connect_macros,
        &Command::Connect {
            hostname: &connect_name,
            family,
            port: 0,
            address: &ip,
        }
    );
    let mut helo_macros = Vec::new();
    if let Some(version) = session.tls_version {
        helo_macros.push(("{tls_version}", version.to_string()));
    }
    early_step!(
        Stage::Helo,
        &helo_macros,
        &Command::Helo(session.helo.unwrap_or(""))
    );
    let mut mail_macros = vec![("i", id.to_string()), ("{mail_addr}", draft.sender.clone())];
    if let Some(user) = session.auth_user {
        mail_macros.push(("{auth_authen}", user.to_string()));
    }
    let mut mail = vec![format!("<{}>", draft.sender)];
    mail.extend(draft.sender_args.iter().cloned());
    early_step!(Stage::Mail, &mail_macros, &Command::Mail(&mail));
    for recipient in draft.recipients.clone() {
        let macros = [("{rcpt_addr}", recipient.clone())];
        early_step!(
            Stage::Rcpt,
            &macros,
            &Command::Rcpt(&[format!("<{recipient}>")])
        );
    }
    early_step!(Stage::Data, &[], &Command::Data);
    talk.content_deadline = Some(Instant::now() + milter.content_timeout.get());
    if talk.protocol & steps::NO_HEADERS == 0 {
        for (field, value) in draft.headers.clone() {
            // One leading space belongs to the separator (SMFIP_HDR_LEADSPC
            // is not offered).
            let value = value.strip_prefix(' ').unwrap_or(&value);
            talk.send(&Command::Header {
                name: &field,
                value,
            })?;
            if talk.protocol & steps::NO_REPLY_HEADER == 0 {
                match early(Some(talk.reply()?), id, name)? {
                    Early::Next => {}
                    Early::Done => return Ok(Outcome::Continue),
                    Early::Say(outcome) => return Ok(outcome),
                }
            }
        }
    }
    early_step!(Stage::EndOfHeaders, &[], &Command::EndOfHeaders);
    if talk.protocol & steps::NO_BODY == 0 {
        match send_body(talk, draft, id, name)? {
            Early::Next => {}
            Early::Done => return Ok(Outcome::Continue),
            Early::Say(outcome) => return Ok(outcome),
        }
    }
    talk.send(&Command::EndOfMessage)?;
    end_of_message(talk, milter, session, draft, bounds)
}

fn name_of(milter: &MilterConfig) -> &str {
    milter.address.as_str()
}

/// The body in chunks of at most 64 KiB, read from the draft as it goes.
fn send_body(
    talk: &mut Conversation,
    draft: &Draft,
    id: &str,
    name: &str,
) -> Result<Early, Failure> {
    let mut reader = draft.body_reader()?;
    let mut chunk = vec![0u8; BODY_CHUNK];
    loop {
        let n = read_full(&mut reader, &mut chunk)?;
        if n == 0 {
            return Ok(Early::Next);
        }
        talk.send(&Command::Body(&chunk[..n]))?;
        if talk.protocol & steps::NO_REPLY_BODY == 0 {
            match talk.reply()? {
                Response::Skip => return Ok(Early::Next),
                response => match early(Some(response), id, name)? {
                    Early::Next => {}
                    other => return Ok(other),
                },
            }
        }
    }
}

/// Fills `buf` as far as the reader allows.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The changes, then the verdict.
fn end_of_message(
    talk: &mut Conversation,
    milter: &MilterConfig,
    session: &Session,
    draft: &mut Draft,
    bounds: Bounds,
) -> Result<Outcome, Failure> {
    let id = session.queue_id;
    let name = name_of(milter);
    let mut new_body: Option<Spool> = None;
    loop {
        let response = talk.reply()?;
        match response {
            Response::AddHeader { name: field, value } => {
                let value = field_value(&field, &value)?;
                draft.headers.push((field, value));
                draft.changed = true;
            }
            Response::InsertHeader {
                index,
                name: field,
                value,
            } => {
                let value = field_value(&field, &value)?;
                let at = (index as usize).min(draft.headers.len());
                draft.headers.insert(at, (field, value));
                draft.changed = true;
            }
            Response::ChangeHeader {
                index,
                name: field,
                value,
            } => {
                change_header(draft, index, &field, &value)?;
                draft.changed = true;
            }
            Response::AddRecipient(recipient) => {
                let recipient = unbracket(&recipient);
                log::info!(
                    "{id}: milter {name}: add recipient <{}>",
                    escape(&recipient)
                );
                draft.recipients.push(recipient);
            }
            Response::DeleteRecipient(recipient) => {
                let recipient = unbracket(&recipient);
                log::info!(
                    "{id}: milter {name}: delete recipient <{}>",
                    escape(&recipient)
                );
                draft
                    .recipients
                    .retain(|r| !r.eq_ignore_ascii_case(&recipient));
            }
            Response::ReplaceBody(piece) => {
                let spool = new_body.get_or_insert_with(|| Spool::new(&draft.data_dir));
                if spool.len() + piece.len() as u64 > bounds.max_message_size {
                    return Err(Failure::Protocol(
                        "a replacement body larger than limits.max_message_size".into(),
                    ));
                }
                spool.write(&piece)?;
            }
            Response::Quarantine(reason) => {
                log::info!("{id}: milter {name}: quarantine: {}", escape(&reason));
                draft.quarantine = Some(reason);
            }
            Response::Progress | Response::Skip => {}
            verdict => {
                if draft.header_size() > bounds.max_header_size {
                    return Err(Failure::Protocol(
                        "its header changes make the header section larger than \
                         limits.max_header_size"
                            .into(),
                    ));
                }
                if let Some(spool) = new_body.take() {
                    draft.body = DraftBody::Replaced(spool.finish()?);
                    draft.changed = true;
                }
                return final_outcome(verdict, id, name);
            }
        }
    }
}

/// `<a@b>` or `a@b` as `a@b`.
fn unbracket(address: &str) -> String {
    address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// A field name of printable ASCII without a colon, and its value as it
/// will be written: a space after the colon, lines joined by CRLF and
/// continued with white space.
fn field_value(name: &str, value: &str) -> Result<String, Failure> {
    let good_name = !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    if !good_name {
        return Err(Failure::Protocol(format!(
            "{:?} is not a header field name",
            escape(name)
        )));
    }
    let lines: Vec<&str> = value
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .collect();
    let continued = lines
        .iter()
        .skip(1)
        .all(|line| line.starts_with([' ', '\t']));
    let control = value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'));
    if !continued || control {
        return Err(Failure::Protocol(format!(
            "the value of {name} is not a header field value"
        )));
    }
    Ok(format!(" {}", lines.join("\r\n")))
}

/// The `index`th (from 1) field called `name`: changed, or deleted when
/// `value` is empty; added when there is no such field.
fn change_header(draft: &mut Draft, index: u32, name: &str, value: &str) -> Result<(), Failure> {
    let position = draft
        .headers
        .iter()
        .enumerate()
        .filter(|(_, (field, _))| field.eq_ignore_ascii_case(name))
        .nth((index.max(1) - 1) as usize)
        .map(|(at, _)| at);
    match (position, value.is_empty()) {
        (Some(at), true) => {
            draft.headers.remove(at);
        }
        (Some(at), false) => draft.headers[at].1 = field_value(name, value)?,
        (None, true) => {}
        (None, false) => draft
            .headers
            .push((name.to_string(), field_value(name, value)?)),
    }
    Ok(())
}

/// Asks a milter its options and says goodbye: `check-config`'s test that
/// it answers.
pub fn probe(milter: &MilterConfig) -> Result<(), String> {
    let mut talk = Conversation::open(milter).map_err(|e| e.to_string())?;
    talk.quit();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sections_split_with_folding_and_without_a_blank_line() {
        let (headers, offset) =
            split_header_section(b"Subject: hi\r\n\tthere\r\nFrom: a@b\r\n\r\nbody\r\n");
        assert_eq!(
            headers,
            [
                ("Subject".to_string(), " hi\r\n\tthere".to_string()),
                ("From".to_string(), " a@b".to_string())
            ]
        );
        assert_eq!(offset, 34);
        let (headers, offset) = split_header_section(b"Subject: only\r\n");
        assert_eq!(headers.len(), 1);
        assert_eq!(offset, 15);
        let (headers, offset) = split_header_section(b"Subject: x\r\nnot a header\r\n");
        assert_eq!(headers.len(), 1);
        assert_eq!(offset, 12);
    }

    #[test]
    fn milter_replies_become_smtp_replies() {
        let reply = reply_of("554 5.7.1 Gtube pattern").unwrap();
        assert_eq!(reply.to_wire(), "554 5.7.1 Gtube pattern\r\n");
        let reply = reply_of("451-4.7.1 first\r\n451 4.7.1 second").unwrap();
        assert_eq!(reply.to_wire(), "451-4.7.1 first\r\n451 4.7.1 second\r\n");
        for bad in ["250 ok", "xyz", "", "99"] {
            assert!(reply_of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn header_edits_as_libmilter_defines_them() {
        let content = Content::in_memory(b"A: 1\r\nB: 2\r\nA: 3\r\n\r\nbody\r\n".to_vec());
        let bounds = Bounds {
            max_header_size: 1024,
            max_message_size: 1 << 20,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut draft =
            Draft::of(dir.path(), content, "s@x".into(), vec![], vec![], bounds).unwrap();
        change_header(&mut draft, 2, "a", "three").unwrap();
        change_header(&mut draft, 1, "B", "").unwrap();
        change_header(&mut draft, 5, "C", "new").unwrap();
        assert_eq!(
            draft.headers,
            [
                ("A".to_string(), " 1".to_string()),
                ("A".to_string(), " three".to_string()),
                ("C".to_string(), " new".to_string()),
            ]
        );
        assert!(field_value("X-Bad Name", "v").is_err());
        assert!(field_value("X-Injected", "a\r\nBcc: x@y").is_err());
        assert_eq!(field_value("X-Folded", "a\n\tb").unwrap(), " a\r\n\tb");
        draft.changed = true;
        let content = draft.into_content().unwrap();
        let mut text = Vec::new();
        content.reader().unwrap().read_to_end(&mut text).unwrap();
        assert_eq!(text, b"A: 1\r\nA: three\r\nC: new\r\n\r\nbody\r\n");
    }
}
