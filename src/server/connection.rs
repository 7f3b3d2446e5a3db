//! One SMTP connection, greeting to QUIT, on a worker thread: the short
//! loop that reads bytes, feeds the session, writes its replies and carries
//! out its actions (TLS handshake, DATA, queue commit). Policy and protocol
//! decisions are the session's; this file only does IO.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConnection;

use super::ServerContext;
use super::limits::Permit;
use super::screen::{self, Screened};
use crate::intake::Mail;
use crate::mailauth::results::ForgedResultsFilter;
use crate::printable::escape;
use crate::protocol::data::{DataDecoder, DataError, DataSummary, Progress};
use crate::protocol::line::{Line, LineReader};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{
    Action, ListenerKind, LocalUser, NotQueued, Rejection, Session, Stamp, Step, SubmissionOutcome,
    TlsInfo,
};
use crate::queue::QueueId;
use crate::queue::content::{Body, Spool};
use crate::tls::{ServerTls, Transport};

/// Per session: 100 sessions at once hold 100 of these (16 KiB was 0.8 MB
/// of peak memory, bench/memory.sh); a bigger DATA chunk only takes more
/// reads of the same socket.
const READ_BUFFER: usize = 8 * 1024;

/// What a worker keeps from one session to the next, so that a session
/// (one per message for most senders) does not allocate its buffers anew:
/// the 8 KiB read buffer alone made glibc merge its free lists on every
/// connection (`malloc_consolidate`, 4 % of the session threads' time in
/// `perf` with 100 senders). Each session starts with them empty, and
/// what a big session grew them to is given back when the next one starts
/// ([`RETAINED`]).
#[derive(Default)]
pub struct Buffers {
    read: Vec<u8>,
    out: Vec<u8>,
    lines: LineReader,
    decoded: Vec<u8>,
    filtered: Vec<u8>,
}

/// Capacity a buffer keeps between sessions; a session that needed more
/// (a long AUTH line, a big header field) does not pin it for good.
const RETAINED: usize = 16 * 1024;

impl Buffers {
    /// Empties every buffer for the next session, which must not see a
    /// byte of this one's, and trims the ones a big session grew.
    fn recycle(&mut self) {
        self.lines.discard();
        self.lines.shrink_to(RETAINED);
        for buffer in [&mut self.out, &mut self.decoded, &mut self.filtered] {
            buffer.clear();
            buffer.shrink_to(RETAINED);
        }
        // Fixed size, and only ever read up to what a read filled in.
        self.read.resize(READ_BUFFER, 0);
    }
}

/// A connection handed from an acceptor to a worker.
pub struct Incoming {
    pub stream: Stream,
    pub peer: SocketAddr,
    pub listener: ListenerKind,
    pub permit: Permit,
    /// Who is on the other end of the local socket.
    pub local: Option<LocalUser>,
}

/// What a session is read from and answered on.
pub enum Stream {
    Tcp(TcpStream),
    /// The local submission socket.
    Unix(UnixStream),
    /// A message from the maildrop: the dialogue `petrel sendmail` would
    /// have had with the server, replayed; answers go nowhere.
    Replay(Box<dyn Read + Send>),
}

/// The client's connection: TCP (plain, after STARTTLS or implicit TLS),
/// the local socket, or a replayed maildrop file.
enum Conn {
    Net(Transport<ServerConnection>),
    Unix(UnixStream),
    Replay(Box<dyn Read + Send>),
}

impl Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Net(transport) => transport.read(buf),
            Conn::Unix(stream) => stream.read(buf),
            Conn::Replay(input) => input.read(buf),
        }
    }

    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Conn::Net(transport) => transport.send(data),
            Conn::Unix(stream) => stream.write_all(data),
            Conn::Replay(_) => Ok(()),
        }
    }

    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Conn::Net(transport) => transport.tcp().set_read_timeout(Some(timeout)),
            Conn::Unix(stream) => stream.set_read_timeout(Some(timeout)),
            Conn::Replay(_) => Ok(()),
        }
    }
}

fn tls_info(conn: &Conn) -> Option<TlsInfo> {
    let Conn::Net(transport) = conn else {
        return None;
    };
    transport.summary().map(|summary| TlsInfo {
        version: summary.version,
        cipher: summary.cipher,
    })
}

/// Why a session ended, for the log.
#[derive(Debug)]
enum End {
    Closed,
    ClientDisconnected,
    Timeout,
    ShuttingDown,
    /// Refused by the gate before the session.
    Refused,
}

impl End {
    /// Said after the counts when the session did not end normally.
    fn note(&self) -> &'static str {
        match self {
            End::Closed | End::ClientDisconnected => "",
            End::Timeout => " (timeout)",
            End::ShuttingDown => " (shutting down)",
            End::Refused => " (refused before the session)",
        }
    }
}

/// Runs one session to its end; never panics on client input. Returns
/// what it achieved (for the maildrop pickup). `buffers` are the worker's,
/// lent for the session.
pub fn serve(job: Incoming, ctx: &ServerContext, buffers: &mut Buffers) -> SubmissionOutcome {
    let Incoming {
        stream,
        peer,
        listener,
        permit,
        local,
    } = job;
    let _registration = match ctx.registry.register(&stream) {
        Ok(registration) => registration,
        Err(error) => {
            log::warn!("{peer}: cannot register connection: {error}");
            return SubmissionOutcome::default();
        }
    };
    // Forward-confirmed reverse DNS, as Postfix shows clients; loopback
    // clients are local programs and need no lookup.
    let name = if peer.ip().is_loopback() {
        None
    } else {
        ctx.intake.directory().client_name(peer.ip())
    };
    let label = match &local {
        Some(user) => format!("local[uid={}]", user.uid),
        None => format!("{}[{}]", name.as_deref().unwrap_or("unknown"), peer.ip()),
    };
    log::info!("connect from {label} on {}", listener.name());
    let mut counts = (String::new(), SubmissionOutcome::default());
    let client = Client {
        peer,
        name,
        local,
        listener,
    };
    match run(stream, client, ctx, buffers, &mut counts) {
        Ok(end) => log::info!(
            "disconnect from {label} {}",
            format!("{}{}", counts.0, end.note()).trim_start()
        ),
        Err(error) => log::info!("disconnect from {label} {} (error: {error})", counts.0),
    }
    drop(permit);
    counts.1
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Deadlines of one session: a total one, and one for the request being
/// read (a command line, or the DATA stream), neither of which a client can
/// push back by trickling bytes.
struct Clock {
    session_end: Instant,
    /// The read timeout last set on the socket (`None`: unknown), so it is
    /// changed (a system call) only when it would outlast the deadline by
    /// more than [`DEADLINE_SLACK`]. A shorter one costs a second read
    /// when it runs out, which a client that answers in time never sees.
    socket_timeout: Option<Duration>,
}

/// How far a read may run past a deadline, in exchange for not setting the
/// socket's timeout before every read.
const DEADLINE_SLACK: Duration = Duration::from_millis(250);

impl Clock {
    /// Reads with a timeout that ends at `deadline` (or the session's end).
    fn read(&mut self, conn: &mut Conn, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        let end = deadline.min(self.session_end);
        // Twice at most: a socket timeout that ran out early is then set
        // to what is left, and runs out at the deadline.
        for _ in 0..2 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if self
                .socket_timeout
                .is_none_or(|set| set > left + DEADLINE_SLACK)
            {
                conn.set_read_timeout(left)?;
                self.socket_timeout = Some(left);
            }
            match conn.read(buf) {
                Err(error) if is_timeout(&error) && Instant::now() + DEADLINE_SLACK < end => {
                    self.socket_timeout = None;
                }
                done => return done,
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    }

    fn session_over(&self) -> bool {
        Instant::now() >= self.session_end
    }
}

/// Who a session is with.
struct Client {
    peer: SocketAddr,
    /// Forward-confirmed reverse DNS name.
    name: Option<String>,
    local: Option<LocalUser>,
    listener: ListenerKind,
}

/// Runs the session; `counts` gets the client's command counts for the
/// disconnect line, however the session ends.
fn run(
    stream: Stream,
    client: Client,
    ctx: &ServerContext,
    buffers: &mut Buffers,
    counts: &mut (String, SubmissionOutcome),
) -> io::Result<End> {
    let limits = &ctx.config.limits;
    let command_timeout = limits.command_timeout.get();
    // The shorter of the two deadlines a read waits for: set once here,
    // it need not change between commands and DATA (see `Clock`).
    let read_timeout = command_timeout.min(limits.data_timeout.get());
    let clock = Clock {
        session_end: Instant::now() + limits.session_timeout.get(),
        socket_timeout: Some(read_timeout),
    };
    let conn = match stream {
        Stream::Tcp(stream) => {
            stream.set_read_timeout(Some(read_timeout))?;
            stream.set_write_timeout(Some(command_timeout))?;
            stream.set_nodelay(true)?;
            let label = format!(
                "{}[{}]",
                client.name.as_deref().unwrap_or("unknown"),
                client.peer.ip()
            );
            let screened = screen::screen(
                &stream,
                client.peer,
                client.listener,
                &label,
                ctx,
                read_timeout,
            )?;
            match screened {
                Screened::Passed => {}
                Screened::Refused => return Ok(End::Refused),
                Screened::HungUp => return Ok(End::ClientDisconnected),
            }
            let mut conn = Conn::Net(Transport::Plain(stream));
            if client.listener == ListenerKind::Smtps {
                let Some(tls) = &ctx.tls else {
                    return Err(io::Error::other(
                        "implicit TLS listener without a certificate",
                    ));
                };
                conn = start_tls(conn, tls, limits)?;
            }
            conn
        }
        Stream::Unix(stream) => {
            stream.set_read_timeout(Some(read_timeout))?;
            stream.set_write_timeout(Some(command_timeout))?;
            Conn::Unix(stream)
        }
        Stream::Replay(input) => Conn::Replay(input),
    };
    let mut session = Session::new(
        ctx.session_config(client.listener),
        client.peer.ip(),
        tls_info(&conn),
    )
    .with_client_name(client.name);
    if let Some(local) = client.local {
        session = session.with_local_user(local);
    }
    buffers.recycle();
    let mut io = SessionIo {
        conn,
        buffers: std::mem::take(buffers),
        peer: client.peer,
        clock,
    };
    let result = converse(&mut session, &mut io, ctx);
    *buffers = io.buffers;
    *counts = (session.command_counts(), session.submission_outcome());
    result
}

/// The dialogue, from the greeting to the end of the session.
fn converse(
    session: &mut Session<Mail>,
    io: &mut SessionIo,
    ctx: &ServerContext,
) -> io::Result<End> {
    let command_timeout = ctx.config.limits.command_timeout.get();
    if ctx.is_shutting_down() {
        io.conn.send(shutting_down_reply(ctx).as_bytes())?;
        return Ok(End::ShuttingDown);
    }
    session.greeting().write_wire(&mut io.buffers.out);

    // A command must arrive whole within command_timeout of when we began
    // waiting for it, however slowly its bytes trickle in.
    let mut request_deadline = Instant::now() + command_timeout;
    loop {
        while let Some(line) = io.buffers.lines.next_line() {
            let step = match line {
                Line::Complete(line) => session.handle_line(line, ctx.intake.directory()),
                Line::TooLong => session.line_too_long(),
            };
            if let Some(end) = perform(step, session, io, ctx)? {
                return Ok(end);
            }
            request_deadline = Instant::now() + command_timeout;
        }
        // No complete command left: send the batched replies before
        // blocking (RFC 2920 3.1).
        flush(&mut io.conn, &mut io.buffers.out)?;
        match io
            .clock
            .read(&mut io.conn, &mut io.buffers.read, request_deadline)
        {
            Ok(0) => {
                if ctx.is_shutting_down() {
                    let _ = io.conn.send(shutting_down_reply(ctx).as_bytes());
                    return Ok(End::ShuttingDown);
                }
                return Ok(End::ClientDisconnected);
            }
            Ok(n) => io.buffers.lines.push(&io.buffers.read[..n]),
            Err(error) if is_timeout(&error) => {
                return Ok(timed_out(io, ctx));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Everything the IO loop owns besides the session.
struct SessionIo {
    conn: Conn,
    buffers: Buffers,
    peer: SocketAddr,
    clock: Clock,
}

/// Tells the client why it is being dropped (RFC 5321 4.5.3.2: 421).
fn timed_out(io: &mut SessionIo, ctx: &ServerContext) -> End {
    let hostname = &ctx.config.hostname;
    let text = if io.clock.session_over() {
        format!("{hostname} Session time limit exceeded, closing connection")
    } else {
        format!("{hostname} Timeout, closing connection")
    };
    let _ = io
        .conn
        .send(Reply::new(reply::TIMEOUT, text).to_wire().as_bytes());
    log::info!("{}: timeout; connection closed", io.peer);
    End::Timeout
}

fn shutting_down_reply(ctx: &ServerContext) -> String {
    Reply::new(
        reply::SHUTTING_DOWN,
        format!(
            "{} Service shutting down, try again later",
            ctx.config.hostname
        ),
    )
    .to_wire()
}

fn flush(conn: &mut Conn, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        conn.send(out)?;
        out.clear();
    }
    Ok(())
}

/// Carries out a step and the steps that follow from it (DATA leads to a
/// commit, which leads to the final reply). `Some(end)` ends the session.
fn perform(
    mut step: Step<Mail>,
    session: &mut Session<Mail>,
    io: &mut SessionIo,
    ctx: &ServerContext,
) -> io::Result<Option<End>> {
    // The body of the message DATA just received, until the queue has it.
    let mut body: Option<Body> = None;
    loop {
        if let Some(rejection) = &step.rejected {
            log_rejection(rejection, &session.client_label());
        }
        if let Some(delay) = step.delay {
            flush(&mut io.conn, &mut io.buffers.out)?;
            std::thread::sleep(delay);
        }
        for reply in &step.replies {
            reply.write_wire(&mut io.buffers.out);
        }
        step = match step.action {
            Action::Continue => return Ok(None),
            Action::Close => {
                // Many clients hang up after QUIT without reading the 221:
                // the session ended as it should, not with an error.
                let _ = flush(&mut io.conn, &mut io.buffers.out);
                return Ok(Some(End::Closed));
            }
            Action::StartTls => {
                upgrade(session, io, ctx)?;
                return Ok(None);
            }
            Action::ReceiveData => match take_data(session, io, ctx)? {
                Data::Taken(next, received_body) => {
                    body = received_body;
                    *next
                }
                Data::Ended(end) => return Ok(Some(end)),
            },
            Action::Enqueue(envelope) => {
                let result = match body.take() {
                    Some(body) => ctx.intake.accept(*envelope, body, &session.client_label()),
                    None => Err(NotQueued::Failed("no message body to queue".to_string())),
                };
                session.enqueued(result)
            }
        };
    }
}

/// STARTTLS accepted: the handshake, on the same socket.
fn upgrade(session: &mut Session<Mail>, io: &mut SessionIo, ctx: &ServerContext) -> io::Result<()> {
    flush(&mut io.conn, &mut io.buffers.out)?;
    let dropped = io.buffers.lines.discard();
    if dropped > 0 {
        log::warn!(
            "{}: discarded {dropped} bytes pipelined after STARTTLS",
            io.peer
        );
    }
    let Some(tls) = &ctx.tls else {
        return Err(io::Error::other("STARTTLS accepted without a certificate"));
    };
    let Conn::Net(transport) = &io.conn else {
        return Err(io::Error::other("STARTTLS on a connection that is not TCP"));
    };
    let placeholder = Conn::Net(Transport::Plain(transport.tcp().try_clone()?));
    let plain = std::mem::replace(&mut io.conn, placeholder);
    io.conn = start_tls(plain, tls, &ctx.config.limits)?;
    // The handshake left its own read timeout on the socket.
    io.clock.socket_timeout = None;
    if let Some(info) = tls_info(&io.conn) {
        session.tls_started(info);
    }
    Ok(())
}

/// What became of DATA.
enum Data {
    /// The session's next step, with the body to queue (none when the
    /// message was refused).
    Taken(Box<Step<Mail>>, Option<Body>),
    /// The client stalled or left.
    Ended(End),
}

/// DATA accepted: the message, then the session's next step.
fn take_data(
    session: &mut Session<Mail>,
    io: &mut SessionIo,
    ctx: &ServerContext,
) -> io::Result<Data> {
    let peer = io.peer;
    flush(&mut io.conn, &mut io.buffers.out)?;
    let received = match receive_data(io, ctx) {
        Ok(received) => received,
        Err(error) if is_timeout(&error) => {
            log::info!("{peer}: DATA too slow or stalled; nothing queued");
            return Ok(Data::Ended(timed_out(io, ctx)));
        }
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
            log::info!("{peer}: disconnected during DATA; nothing queued");
            return Ok(Data::Ended(End::ClientDisconnected));
        }
        Err(error) => return Err(error),
    };
    io.buffers.lines.push(&received.rest);
    let mut body = None;
    let summary = match received.message {
        Ok((summary, received_body)) => {
            body = Some(received_body);
            Ok(summary)
        }
        Err(error) => {
            log::info!("{peer}: message refused: {}", error.describe());
            Err(error)
        }
    };
    let stamp = Stamp {
        id: QueueId::generate().to_string(),
        now: SystemTime::now(),
    };
    Ok(Data::Taken(
        Box::new(session.data_finished(summary, stamp)),
        body,
    ))
}

/// One line per refused transaction command, in Postfix's form, so
/// fail2ban filters and an operator's grep work unchanged.
fn log_rejection(rejection: &Rejection, client: &str) {
    let reply = rejection.reply.to_wire();
    log::info!(
        "NOQUEUE: reject: {} from {client}: {}; from=<{}> to=<{}> proto={} helo=<{}>",
        rejection.stage,
        escape(reply.trim_end()),
        escape(rejection.from.as_deref().unwrap_or("")),
        escape(rejection.to.as_deref().unwrap_or("")),
        if rejection.esmtp { "ESMTP" } else { "SMTP" },
        escape(rejection.helo.as_deref().unwrap_or("")),
    );
}

/// The message (its summary and spooled body, or why it was refused) and
/// the bytes that followed the terminator, which are the client's next
/// commands.
struct ReceivedData {
    message: Result<(DataSummary, Body), DataError>,
    rest: Vec<u8>,
}

/// Reads the DATA stream up to its terminator into a spool: a small buffer
/// in memory, the rest on disk. The stream must keep a minimum rate: the
/// deadline starts at `data_timeout` and each read earns more time in
/// proportion to what it brought (as Postfix's smtpd_min_data_rate).
fn receive_data(io: &mut SessionIo, ctx: &ServerContext) -> io::Result<ReceivedData> {
    let limits = &ctx.config.limits;
    let rate = limits.min_data_rate.bytes().max(1) as f64;
    let mut deadline = Instant::now() + limits.data_timeout.get();
    let mut decoder = DataDecoder::new(
        limits.max_message_size.bytes() as usize,
        limits.max_line_length.bytes() as usize,
    );
    let mut spool = Spool::new(&ctx.config.data_dir);
    let mut spool_error: Option<io::Error> = None;
    let SessionIo {
        conn,
        buffers,
        peer,
        clock,
    } = io;
    let (decoded, filtered) = (&mut buffers.decoded, &mut buffers.filtered);
    // Only we may claim results under our name (RFC 8601 5), whoever the
    // client is.
    let mut forged = ForgedResultsFilter::new(
        &ctx.config.hostname,
        limits.max_header_size.bytes() as usize,
    );
    let mut feed = |input: &[u8]| {
        let progress = decoder.feed(input, decoded);
        forged.push(decoded, filtered);
        if matches!(progress, Progress::Done { .. }) {
            forged.finish(filtered);
        }
        if spool_error.is_none()
            && !filtered.is_empty()
            && let Err(error) = spool.write(filtered)
        {
            spool_error = Some(error);
        }
        decoded.clear();
        filtered.clear();
        progress
    };
    let mut rest = None;
    let pending = buffers.lines.buffered();
    if let Progress::Done { consumed } = feed(pending) {
        rest = Some(pending[consumed..].to_vec());
    }
    buffers.lines.discard();
    while rest.is_none() {
        let n = clock.read(conn, &mut buffers.read, deadline)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed during DATA",
            ));
        }
        deadline += Duration::from_secs_f64(n as f64 / rate);
        if let Progress::Done { consumed } = feed(&buffers.read[..n]) {
            rest = Some(buffers.read[consumed..n].to_vec());
        }
    }
    let message = match decoder.finish() {
        Err(error) => Err(error),
        Ok(summary) => match spool_error.map_or_else(|| spool.finish(), Err) {
            Ok(body) => Ok((summary, body)),
            Err(error) => {
                log::error!("{peer}: cannot spool a message: {error}");
                Err(DataError::NoStorage)
            }
        },
    };
    Ok(ReceivedData {
        message,
        rest: rest.unwrap_or_default(),
    })
}

/// The handshake must be over within one command timeout, however the
/// client trickles it; the socket then gets the session's timeouts back.
fn start_tls(
    conn: Conn,
    tls: &ServerTls,
    limits: &crate::config::LimitsConfig,
) -> io::Result<Conn> {
    let Conn::Net(transport) = conn else {
        return Err(io::Error::other("TLS on a connection that is not TCP"));
    };
    let server = ServerConnection::new(tls.server_config()).map_err(io::Error::other)?;
    let command_timeout = limits.command_timeout.get();
    let upgraded = transport.upgrade(server, Some(Instant::now() + command_timeout))?;
    upgraded.tcp().set_write_timeout(Some(command_timeout))?;
    Ok(Conn::Net(upgraded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_buffers_are_empty_and_trimmed() {
        let mut buffers = Buffers::default();
        buffers.recycle();
        assert_eq!(buffers.read.len(), READ_BUFFER);
        buffers
            .lines
            .push(b"QUIT\r\nMAIL FROM:<left@example.org>\r\n");
        assert!(buffers.lines.next_line().is_some());
        buffers.out.extend_from_slice(&[b'x'; 4 * RETAINED]);
        buffers.decoded.extend_from_slice(b"Subject: old\r\n");
        buffers.filtered.extend_from_slice(&[b'y'; 2 * RETAINED]);
        buffers.read.truncate(10);

        buffers.recycle();
        assert_eq!(buffers.lines.next_line(), None);
        assert!(buffers.lines.buffered().is_empty());
        for buffer in [&buffers.out, &buffers.decoded, &buffers.filtered] {
            assert!(buffer.is_empty());
            assert!(buffer.capacity() <= RETAINED, "{}", buffer.capacity());
        }
        assert_eq!(buffers.read.len(), READ_BUFFER);
    }
}
