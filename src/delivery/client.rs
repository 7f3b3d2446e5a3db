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

use crate::protocol::client::{Extensions, ParseStep, ReplyParser, ServerReply};

use crate::tls::Transport;

/// RFC 5321 4.5.3.2 timeouts.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub const DATA_START_TIMEOUT: Duration = Duration::from_secs(2 * 60);
pub const DATA_BLOCK_TIMEOUT: Duration = Duration::from_secs(3 * 60);
pub const DATA_END_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// A remote server's reply lines are short; anything longer is garbage.
const MAX_REPLY_LINE: usize = 4096;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

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
