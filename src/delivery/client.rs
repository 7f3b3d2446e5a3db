//! The SMTP client connection used for delivery: blocking IO with the
//! RFC 5321 4.5.3.2 timeouts, STARTTLS with rustls, AUTH, and a reply
//! parser that never buffers more than a bounded amount from a remote
//! server.
//!
//! A remote server is a stranger: each timeout is a deadline for the whole
//! reply (a server that sends one byte every few seconds still runs out of
//! time), a reply is bounded in lines and octets, and the whole attempt
//! (every host, every reply, every write, the TLS handshake) has a
//! deadline of its own, so a hostile MX host holds a delivery worker for a
//! bounded time.

use std::io::{self, Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use crate::tls::Transport;

/// RFC 5321 4.5.3.2 timeouts.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub const DATA_START_TIMEOUT: Duration = Duration::from_secs(2 * 60);
pub const DATA_BLOCK_TIMEOUT: Duration = Duration::from_secs(3 * 60);
pub const DATA_END_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// A remote server's reply lines are short; anything longer is garbage.
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 200;
/// A whole reply (a long EHLO list is under 1 KiB).
const MAX_REPLY_OCTETS: usize = 64 * 1024;

/// How long remote servers may take: `reply` caps the wait for any one
/// whole reply (RFC 5321's timeouts are the most it waits: 5 minutes for
/// most replies, 2 for DATA's), the reply after the message gets twice
/// `reply` (RFC: 10 minutes), and `attempt` bounds a whole delivery
/// attempt, every host tried included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub reply: Duration,
    pub attempt: Duration,
}

impl Timeouts {
    pub fn from_config(delivery: &crate::config::DeliveryConfig) -> Timeouts {
        Timeouts {
            connect: delivery.connect_timeout.get(),
            reply: delivery.reply_timeout.get(),
            attempt: delivery.attempt_timeout.get(),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            reply: COMMAND_TIMEOUT,
            attempt: Duration::from_secs(15 * 60),
        }
    }
}

/// A socket timeout that lets a read or write end by `deadline`: whole
/// seconds while there is time (so that the next reply usually needs no
/// new one), the exact rest at the end. `None`: the deadline has passed.
fn timeout_within(deadline: Instant, now: Instant) -> Option<Duration> {
    let left = deadline
        .checked_duration_since(now)
        .filter(|d| !d.is_zero())?;
    Some(if left >= Duration::from_secs(1) {
        Duration::from_secs(left.as_secs())
    } else {
        left
    })
}

fn timed_out(what: &str) -> ClientError {
    ClientError::Io(io::Error::new(io::ErrorKind::TimedOut, what.to_string()))
}

/// One reply from the remote server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl ServerReply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The enhanced status code (RFC 3463) if the server gave one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let token = first.split(' ').next()?;
        let mut parts = token.split('.');
        let class = parts.next()?;
        let valid = matches!(class, "2" | "4" | "5")
            && parts.clone().count() == 2
            && parts
                .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()));
        valid.then_some(token)
    }
}

impl std::fmt::Display for ServerReply {
    /// "550 5.1.1 No such user" with continuation lines joined by spaces,
    /// as Postfix logs remote replies.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code)?;
        for line in &self.lines {
            write!(f, " {line}")?;
        }
        Ok(())
    }
}

/// Parses reply lines as bytes arrive (sans-IO).
#[derive(Debug, Default)]
pub struct ReplyParser {
    lines: Vec<String>,
    code: Option<u16>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseStep {
    More,
    Done(ServerReply),
}

impl ReplyParser {
    /// Takes one line without its CRLF.
    pub fn line(&mut self, line: &[u8]) -> Result<ParseStep, String> {
        let text = String::from_utf8_lossy(line);
        let bad = || {
            format!(
                "malformed reply line {:?}",
                text.chars().take(80).collect::<String>()
            )
        };
        // Work on bytes: a hostile server's text need not be ASCII, and
        // slicing a str inside a character would panic.
        let digits = line
            .get(..3)
            .filter(|d| d.iter().all(u8::is_ascii_digit))
            .ok_or_else(bad)?;
        let code = digits
            .iter()
            .fold(0u16, |code, digit| code * 10 + u16::from(digit - b'0'));
        if !(200..600).contains(&code) {
            return Err(bad());
        }
        if self.code.is_some_and(|c| c != code) {
            return Err(format!("reply code changed within a reply ({code})"));
        }
        self.code = Some(code);
        let separator = line.get(3).copied();
        let rest = String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned();
        self.lines.push(rest);
        if self.lines.len() > MAX_REPLY_LINES {
            return Err("reply has too many lines".into());
        }
        match separator {
            Some(b'-') => Ok(ParseStep::More),
            None | Some(b' ') => Ok(ParseStep::Done(ServerReply {
                code,
                lines: std::mem::take(&mut self.lines),
            })),
            Some(_) => Err(bad()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// RFC 3461 delivery status notifications.
    pub dsn: bool,
    /// SIZE limit; 0 or absent means none announced.
    pub size: Option<u64>,
    pub auth: Vec<String>,
}

impl Extensions {
    /// From the lines of an EHLO reply (the first line is the greeting).
    pub fn parse(reply: &ServerReply) -> Extensions {
        let mut extensions = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => extensions.pipelining = true,
                "STARTTLS" => extensions.starttls = true,
                "8BITMIME" => extensions.eight_bit_mime = true,
                "SMTPUTF8" => extensions.smtputf8 = true,
                "DSN" => extensions.dsn = true,
                "SIZE" => {
                    extensions.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0)
                }
                "AUTH" => extensions.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        extensions
    }
}

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The server said something we cannot parse.
    Protocol(String),
    Tls(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(error) if error.kind() == io::ErrorKind::WouldBlock => {
                f.write_str("timed out")
            }
            ClientError::Io(error) => write!(f, "{error}"),
            ClientError::Protocol(why) => write!(f, "protocol error: {why}"),
            ClientError::Tls(why) => write!(f, "TLS failed: {why}"),
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(error: io::Error) -> Self {
        ClientError::Io(error)
    }
}

pub struct SmtpClient {
    conn: Transport<ClientConnection>,
    buffer: Vec<u8>,
    /// The read timeout the socket has. Pipelined replies arrive together
    /// and each reply of a reused connection wants the same few timeouts:
    /// setting it again before every reply was a system call for nothing.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// The most any one reply may take (`delivery.reply_timeout`).
    reply_cap: Duration,
    /// When the current attempt must be over, whatever the server does.
    deadline: Instant,
    pub peer: SocketAddr,
}

impl SmtpClient {
    /// Connects and reads the greeting; the attempt ends by `deadline`.
    pub fn connect(
        peer: SocketAddr,
        timeouts: &Timeouts,
        deadline: Instant,
    ) -> Result<(SmtpClient, ServerReply), ClientError> {
        let mut client = SmtpClient::open(peer, timeouts, deadline)?;
        let greeting = client.read_reply(GREETING_TIMEOUT)?;
        Ok((client, greeting))
    }

    /// Connects with implicit TLS (port 465) and reads the greeting.
    pub fn connect_tls(
        peer: SocketAddr,
        timeouts: &Timeouts,
        deadline: Instant,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<(SmtpClient, ServerReply), ClientError> {
        let mut client = SmtpClient::open(peer, timeouts, deadline)?;
        client.handshake(config, server_name)?;
        let greeting = client.read_reply(GREETING_TIMEOUT)?;
        Ok((client, greeting))
    }

    fn open(
        peer: SocketAddr,
        timeouts: &Timeouts,
        deadline: Instant,
    ) -> Result<SmtpClient, ClientError> {
        let connect = timeout_within(deadline, Instant::now())
            .ok_or_else(|| timed_out("the attempt ran out of time before connecting"))?
            .min(timeouts.connect);
        let tcp = TcpStream::connect_timeout(&peer, connect)?;
        tcp.set_nodelay(true)?;
        Ok(SmtpClient {
            conn: Transport::Plain(tcp),
            buffer: Vec::new(),
            read_timeout: None,
            write_timeout: None,
            reply_cap: timeouts.reply,
            deadline,
            peer,
        })
    }

    /// A reused connection starts a new attempt.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    fn handshake(
        &mut self,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<(), ClientError> {
        let name = match server_name.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(server_name.to_string())
                .map_err(|e| ClientError::Tls(format!("bad server name {server_name:?}: {e}")))?,
        };
        let connection =
            ClientConnection::new(config, name).map_err(|e| ClientError::Tls(e.to_string()))?;
        let deadline = self
            .deadline
            .min(Instant::now() + COMMAND_TIMEOUT.min(self.reply_cap));
        let placeholder = Transport::Plain(self.conn.tcp().try_clone()?);
        let plain = std::mem::replace(&mut self.conn, placeholder);
        // The handshake sets the socket's timeouts itself.
        self.read_timeout = None;
        self.write_timeout = None;
        self.conn = plain
            .upgrade(connection, Some(deadline))
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(())
    }

    fn tcp(&self) -> &TcpStream {
        self.conn.tcp()
    }

    pub fn is_tls(&self) -> bool {
        self.conn.is_tls()
    }

    /// "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384", for logs.
    pub fn tls_description(&self) -> Option<String> {
        self.conn
            .summary()
            .map(|tls| format!("{} with cipher {}", tls.version, tls.cipher))
    }

    /// Writes `data`, each block within RFC 5321's 3 minutes (or the
    /// reply cap) and all of it before the attempt's deadline.
    pub fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        /// A block of at most this is written within one socket timeout.
        const WRITE_BLOCK: usize = 16 * 1024;
        for block in data.chunks(WRITE_BLOCK) {
            let now = Instant::now();
            let limit = timeout_within(self.deadline, now)
                .ok_or_else(|| timed_out("the attempt ran out of time while sending"))?
                .min(DATA_BLOCK_TIMEOUT.min(self.reply_cap));
            if self.write_timeout.is_none_or(|set| set > limit) {
                self.write_timeout = None;
                self.tcp().set_write_timeout(Some(limit))?;
                self.write_timeout = Some(limit);
            }
            self.conn.write_all(block)?;
        }
        Ok(self.conn.flush()?)
    }

    /// Reads what the server sent, by `deadline` at the latest.
    fn read_some(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let limit = timeout_within(deadline, Instant::now())
            .ok_or_else(|| timed_out("timed out waiting for the reply"))?;
        // A socket timeout shorter than what is left is fine (a read ends
        // by the deadline either way); a longer one is lowered.
        if self.read_timeout.is_none_or(|set| set > limit) {
            self.read_timeout = None;
            self.tcp().set_read_timeout(Some(limit))?;
            self.read_timeout = Some(limit);
        }
        let mut chunk = [0u8; 4096];
        let n = self.conn.read(&mut chunk)?;
        if n == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the remote server",
            )));
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One whole reply within `timeout` (at most `delivery.reply_timeout`)
    /// and the attempt's deadline.
    pub fn read_reply(&mut self, timeout: Duration) -> Result<ServerReply, ClientError> {
        self.read_reply_within(timeout.min(self.reply_cap))
    }

    /// The reply to the end of the message: RFC 5321's 10 minutes, or
    /// twice `delivery.reply_timeout`.
    pub fn read_final_reply(&mut self) -> Result<ServerReply, ClientError> {
        self.read_reply_within(DATA_END_TIMEOUT.min(self.reply_cap * 2))
    }

    fn read_reply_within(&mut self, timeout: Duration) -> Result<ServerReply, ClientError> {
        let deadline = self.deadline.min(Instant::now() + timeout);
        let mut parser = ReplyParser::default();
        let mut octets = 0usize;
        loop {
            let Some(end) = self.buffer.iter().position(|&b| b == b'\n') else {
                if self.buffer.len() > MAX_REPLY_LINE {
                    return Err(ClientError::Protocol("reply line too long".into()));
                }
                self.read_some(deadline)?;
                continue;
            };
            octets += end + 1;
            if octets > MAX_REPLY_OCTETS {
                return Err(ClientError::Protocol("reply too long".into()));
            }
            let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            match parser.line(&line).map_err(ClientError::Protocol)? {
                ParseStep::More => {}
                ParseStep::Done(reply) => return Ok(reply),
            }
        }
    }

    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<ServerReply, ClientError> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.read_reply(timeout)
    }

    /// EHLO, falling back to HELO when the server does not know EHLO.
    pub fn hello(&mut self, name: &str) -> Result<(ServerReply, Extensions), ClientError> {
        let reply = self.command(&format!("EHLO {name}"), COMMAND_TIMEOUT)?;
        if reply.is_positive() {
            let extensions = Extensions::parse(&reply);
            return Ok((reply, extensions));
        }
        if reply.code >= 500 {
            let reply = self.command(&format!("HELO {name}"), COMMAND_TIMEOUT)?;
            return Ok((reply, Extensions::default()));
        }
        Ok((reply, Extensions::default()))
    }

    /// STARTTLS and the handshake. `Ok(Err(reply))` when the server
    /// refused the command (the connection is still usable in plaintext).
    pub fn starttls(
        &mut self,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<Result<(), ServerReply>, ClientError> {
        let reply = self.command("STARTTLS", COMMAND_TIMEOUT)?;
        if reply.code != 220 {
            return Ok(Err(reply));
        }
        if !self.buffer.is_empty() {
            return Err(ClientError::Protocol(
                "data pipelined after the STARTTLS reply".into(),
            ));
        }
        self.handshake(config, server_name)?;
        Ok(Ok(()))
    }

    /// AUTH PLAIN if offered, else LOGIN (RFC 4954).
    pub fn authenticate(
        &mut self,
        extensions: &Extensions,
        user: &str,
        password: &str,
    ) -> Result<ServerReply, ClientError> {
        if extensions.auth.iter().any(|m| m == "PLAIN")
            || !extensions.auth.iter().any(|m| m == "LOGIN")
        {
            let token = BASE64.encode(format!("\0{user}\0{password}"));
            return self.command(&format!("AUTH PLAIN {token}"), COMMAND_TIMEOUT);
        }
        let reply = self.command("AUTH LOGIN", COMMAND_TIMEOUT)?;
        if reply.code != 334 {
            return Ok(reply);
        }
        let reply = self.command(&BASE64.encode(user), COMMAND_TIMEOUT)?;
        if reply.code != 334 {
            return Ok(reply);
        }
        self.command(&BASE64.encode(password), COMMAND_TIMEOUT)
    }

    /// Best effort: the transaction's outcome is already known.
    pub fn quit(self) {
        self.quit_within(Duration::from_secs(10));
    }

    /// QUIT, waiting at most `wait` for the reply (whenever the last
    /// attempt ended: a cached connection is closed later).
    pub fn quit_within(mut self, wait: Duration) {
        self.deadline = Instant::now() + wait;
        if self.send(b"QUIT\r\n").is_ok() {
            let _ = self.read_reply(wait);
        }
    }
}

/// Longest line sent, CRLF not included (RFC 5321 4.5.3.1.6).
pub const MAX_LINE_OUT: usize = 998;

/// Prepares a message for DATA a chunk at a time: dot-stuffs it (RFC 5321
/// 4.5.2), folds lines over 998 octets by inserting CRLF SPACE (as
/// Postfix's smtp_line_length_limit does, which keeps MIME structure
/// intact; petrel takes longer lines in, so it must not pass them on), and
/// makes sure the message ends with CRLF. Folding applies on 8BITMIME hops
/// too: only BINARYMIME lifts the line limit, and petrel does not send it.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    /// Octets on the current line so far.
    line_length: usize,
    /// The last two octets seen, to know how the message ends.
    tail: [u8; 2],
    /// Off: lines are only folded, as the receiver will see them once it
    /// has removed the stuffing (what a DKIM signature must cover).
    stuffing: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            line_length: 0,
            tail: [0, 0],
            stuffing: true,
        }
    }
}

impl DotStuffer {
    /// Folds long lines exactly as sending will, without dot-stuffing.
    pub fn folding_only() -> DotStuffer {
        DotStuffer {
            stuffing: false,
            ..DotStuffer::default()
        }
    }

    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 64 + 2);
        let mut rest = chunk;
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |at| at + 1);
            let (segment, after) = rest.split_at(end);
            self.push_segment(segment, out);
            rest = after;
        }
    }

    /// A line, or the part of one a chunk holds, copied whole when it
    /// needs no folding and has no bare CR (nearly always); octet by
    /// octet otherwise.
    fn push_segment(&mut self, segment: &[u8], out: &mut Vec<u8>) {
        let ends_line = segment.last() == Some(&b'\n');
        let text = segment.strip_suffix(b"\n").unwrap_or(segment);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let stuffed = self.stuffing && self.at_line_start && text.first() == Some(&b'.');
        let length = self.line_length + usize::from(stuffed) + text.len();
        if length > MAX_LINE_OUT || memchr::memchr(b'\r', text).is_some() {
            for &byte in segment {
                self.push_byte(byte, out);
            }
            return;
        }
        if stuffed {
            out.push(b'.');
        }
        out.extend_from_slice(segment);
        self.line_length = if ends_line { 0 } else { length };
        self.at_line_start = ends_line;
        self.tail = match segment {
            [.., a, b] => [*a, *b],
            [b] => [self.tail[1], *b],
            [] => self.tail,
        };
    }

    fn push_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        if byte != b'\r' && byte != b'\n' && self.line_length >= MAX_LINE_OUT {
            out.extend_from_slice(b"\r\n ");
            self.line_length = 1;
            self.at_line_start = false;
        }
        if self.stuffing && self.at_line_start && byte == b'.' {
            out.push(b'.');
            self.line_length += 1;
        }
        out.push(byte);
        self.at_line_start = byte == b'\n';
        if byte == b'\n' {
            self.line_length = 0;
        } else if byte != b'\r' {
            self.line_length += 1;
        }
        self.tail = [self.tail[1], byte];
    }

    /// What must follow the last chunk before the terminating ".CRLF".
    pub fn finish(&self, out: &mut Vec<u8>) {
        if self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Dot-stuffs a whole message held in memory.
#[cfg(test)]
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut stuffer = DotStuffer::default();
    let mut out = Vec::new();
    stuffer.push(content, &mut out);
    stuffer.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    fn parse(lines: &[&str]) -> Result<ServerReply, String> {
        let mut parser = ReplyParser::default();
        for line in lines {
            if let ParseStep::Done(reply) = parser.line(line.as_bytes())? {
                return Ok(reply);
            }
        }
        Err("incomplete".into())
    }

    #[test]
    fn replies_parse() {
        let reply = parse(&["250-mx.example Hello", "250-PIPELINING", "250 SIZE 1000"]).unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(reply.lines.len(), 3);
        let extensions = Extensions::parse(&reply);
        assert!(extensions.pipelining);
        assert_eq!(extensions.size, Some(1000));
        let reply = parse(&["550 5.1.1 No such user"]).unwrap();
        assert_eq!(reply.enhanced(), Some("5.1.1"));
        assert_eq!(reply.to_string(), "550 5.1.1 No such user");
        assert_eq!(parse(&["354 go ahead"]).unwrap().enhanced(), None);
        assert_eq!(parse(&["250"]).unwrap().lines, vec![""]);
    }

    #[test]
    fn bad_replies_are_errors() {
        assert!(parse(&["hello"]).is_err());
        assert!(
            parse(&["\u{e9}\u{e9}\u{e9}"]).is_err(),
            "non-ASCII never panics"
        );
        assert!(parse(&["25"]).is_err());
        assert!(parse(&["999 what"]).is_err());
        assert!(parse(&["250-a", "251 b"]).is_err());
        assert!(parse(&["250xhello"]).is_err());
    }

    #[test]
    fn extensions() {
        let reply = parse(&[
            "250-mx",
            "250-STARTTLS",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-AUTH PLAIN login",
            "250 SIZE",
        ])
        .unwrap();
        let extensions = Extensions::parse(&reply);
        assert!(extensions.starttls && extensions.eight_bit_mime && extensions.smtputf8);
        assert_eq!(extensions.auth, vec!["PLAIN", "LOGIN"]);
        assert_eq!(extensions.size, None);
    }

    #[test]
    fn whole_lines_are_stuffed_exactly_as_octet_by_octet() {
        // Lines of every kind (dots, bare CRs, long ones to fold), split at
        // arbitrary points: the fast path must not change a single octet.
        let mut next = crate::test_numbers(0x2545_f491_4f6c_dd1d_u64);
        for _ in 0..200 {
            let mut message = Vec::new();
            for _ in 0..next(20) {
                let pieces: [&[u8]; 6] = [b".", b"\r", b"\n", b"\r\n", b"x", b"abcdefghij"];
                let piece = pieces[next(pieces.len())];
                let repeat = if next(10) == 0 { 150 } else { 1 + next(3) };
                for _ in 0..repeat {
                    message.extend_from_slice(piece);
                }
            }
            let mut expected = Vec::new();
            let mut reference = DotStuffer::default();
            for &byte in &message {
                reference.push_byte(byte, &mut expected);
            }
            reference.finish(&mut expected);
            let mut got = Vec::new();
            let mut stuffer = DotStuffer::default();
            let mut rest = &message[..];
            while !rest.is_empty() {
                let (chunk, after) = rest.split_at(1 + next(rest.len()));
                stuffer.push(chunk, &mut got);
                rest = after;
            }
            stuffer.finish(&mut got);
            assert_eq!(got, expected, "{:?}", String::from_utf8_lossy(&message));
        }
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n");
        assert_eq!(dot_stuff(b""), b"\r\n");
        // Lines over 998 octets are folded with CRLF SPACE, at any split.
        let long = [b"X: ".as_slice(), &[b'a'; 2000], b"\r\n.x\r\n"].concat();
        let sent = dot_stuff(&long);
        assert!(sent.split(|&b| b == b'\n').all(|line| line.len() <= 1000));
        let unfolded: Vec<u8> = String::from_utf8(sent.clone())
            .unwrap()
            .replace("\r\n ", "")
            .into_bytes();
        assert_eq!(
            unfolded,
            [b"X: ".as_slice(), &[b'a'; 2000], b"\r\n..x\r\n"].concat()
        );
        let exact = [&[b'b'; 998][..], b"\r\n"].concat();
        assert_eq!(dot_stuff(&exact), exact, "998 octets is not folded");
        // Chunk boundaries anywhere give the same result.
        let message = b"x\r\n.one\r\n..two\r\nend\r\n";
        for split in 0..message.len() {
            let mut stuffer = DotStuffer::default();
            let mut out = Vec::new();
            stuffer.push(&message[..split], &mut out);
            stuffer.push(&message[split..], &mut out);
            stuffer.finish(&mut out);
            assert_eq!(out, dot_stuff(message), "split at {split}");
        }
    }

    /// A loopback server that sends `script` at once, then stays silent
    /// with the connection open until the client goes.
    fn silent_after(script: &'static [u8]) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let address = listener.local_addr().expect("listener address");
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.write_all(script);
                let _ = stream.read(&mut [0u8; 64]);
            }
        });
        address
    }

    fn connect(server: SocketAddr, timeouts: &Timeouts) -> SmtpClient {
        let deadline = Instant::now() + timeouts.attempt;
        let (client, greeting) = SmtpClient::connect(server, timeouts, deadline).expect("connect");
        assert_eq!(greeting.code, 220);
        client
    }

    fn assert_timed_out(result: Result<ServerReply, ClientError>) {
        match result {
            Err(ClientError::Io(error)) => assert!(
                matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{error}"
            ),
            other => panic!(
                "expected a timeout, got {:?}",
                other.map(|reply| reply.code)
            ),
        }
    }

    #[test]
    fn each_read_waits_for_its_own_timeout_and_buffered_replies_need_none() {
        let server = silent_after(b"220 hi\r\n250 one\r\n250 two\r\n");
        let mut client = connect(server, &Timeouts::default());
        let after_greeting = client.read_timeout.expect("set for the greeting");
        assert!(after_greeting <= GREETING_TIMEOUT, "{after_greeting:?}");
        // Already buffered: no read, so the socket's timeout stays as it was.
        for expected in ["one", "two"] {
            let reply = client
                .read_reply(Duration::from_millis(300))
                .expect("reply");
            assert_eq!(reply.lines, [expected]);
        }
        assert_eq!(client.read_timeout, Some(after_greeting));
        // A read is needed now: the short timeout applies, not the greeting's.
        let started = Instant::now();
        assert_timed_out(client.read_reply(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(client.read_timeout <= Some(Duration::from_millis(300)));
    }

    /// A server that sends `script` a byte every `pause`, then holds the
    /// connection open until the client goes.
    fn trickling(script: &'static [u8], pause: Duration) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let address = listener.local_addr().expect("listener address");
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                for byte in script.iter().cycle().take(100_000) {
                    if stream.write_all(&[*byte]).is_err() {
                        return;
                    }
                    std::thread::sleep(pause);
                }
            }
        });
        address
    }

    #[test]
    fn a_reply_trickled_a_byte_at_a_time_runs_out_of_time_as_a_whole() {
        // Each byte comes well within any per-read timeout; the reply
        // never ends ("220-" lines forever).
        let server = trickling(b"220-slow\r\n", Duration::from_millis(20));
        let timeouts = Timeouts {
            reply: Duration::from_millis(700),
            ..Timeouts::default()
        };
        let started = Instant::now();
        let result = SmtpClient::connect(server, &timeouts, started + timeouts.attempt);
        assert_timed_out(result.map(|(_, greeting)| greeting));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(600), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn an_endless_reply_is_cut_off_by_its_size() {
        let server = trickling(b"220-more to say\r\n", Duration::ZERO);
        let timeouts = Timeouts::default();
        match SmtpClient::connect(server, &timeouts, Instant::now() + timeouts.attempt) {
            Err(ClientError::Protocol(why)) => assert!(why.contains("too many lines"), "{why}"),
            other => panic!("expected a protocol error, got {:?}", other.map(|(_, r)| r)),
        }
    }

    #[test]
    fn the_attempt_has_one_deadline_however_prompt_each_reply_is() {
        // Every reply comes in time; together they take too long.
        let server = trickling(b"250 ok\r\n", Duration::from_millis(40));
        let timeouts = Timeouts {
            reply: Duration::from_secs(5),
            attempt: Duration::from_millis(1500),
            ..Timeouts::default()
        };
        let started = Instant::now();
        let deadline = started + timeouts.attempt;
        let (mut client, _) = match SmtpClient::connect(server, &timeouts, deadline) {
            Ok(connected) => connected,
            Err(error) => panic!("{error}"),
        };
        let mut replies = 1;
        let result = loop {
            match client.read_reply(COMMAND_TIMEOUT) {
                Ok(_) => replies += 1,
                Err(error) => break error,
            }
            assert!(replies < 1000, "the deadline never came");
        };
        assert!(matches!(result, ClientError::Io(_)), "{result}");
        assert!(replies > 2, "{replies}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        // Writing is bounded by the same deadline.
        assert!(client.send(b"NOOP\r\n").is_err());
    }
}
