//! One SMTP connection, greeting to QUIT, on a worker thread: the short
//! loop that reads bytes, feeds the session, writes its replies and carries
//! out its actions (TLS handshake, DATA, queue commit). Policy and protocol
//! decisions are the session's; this file only does IO.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use rustls::{ServerConnection, StreamOwned};

use super::ServerContext;
use super::limits::Permit;
use crate::protocol::data::{DataDecoder, DataError, Progress};
use crate::protocol::line::{Line, LineReader};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{Action, ListenerKind, Session, Step, TlsInfo};
use crate::queue::NewMessage;
use crate::tls::{self, ServerTls};

const READ_BUFFER: usize = 16 * 1024;

/// A connection handed from an acceptor to a worker.
pub struct Job {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub listener: ListenerKind,
    pub permit: Permit,
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(tcp) => tcp,
            Conn::Tls(stream) => &stream.sock,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(tcp) => tcp.read(buf),
            Conn::Tls(stream) => stream.read(buf),
        }
    }

    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(tcp) => tcp.write_all(data),
            Conn::Tls(stream) => {
                stream.write_all(data)?;
                stream.flush()
            }
        }
    }

    fn tls_info(&self) -> Option<TlsInfo> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(stream) => Some(TlsInfo {
                version: tls::version_name(stream.conn.protocol_version()),
                cipher: tls::cipher_name(stream.conn.negotiated_cipher_suite()),
            }),
        }
    }
}

/// Why a session ended, for the log.
#[derive(Debug)]
enum End {
    Closed,
    ClientDisconnected,
    Timeout,
    ShuttingDown,
}

/// Runs one session to its end; never panics on client input.
pub fn serve(job: Job, ctx: &ServerContext) {
    let Job {
        stream,
        peer,
        listener,
        permit,
    } = job;
    let _registration = match ctx.registry.register(&stream) {
        Ok(registration) => registration,
        Err(error) => {
            log::warn!("{peer}: cannot register connection: {error}");
            return;
        }
    };
    log::debug!("{peer}: connect on {}", listener.name());
    match run(stream, peer, listener, ctx) {
        Ok(end) => log::debug!("{peer}: disconnect ({end:?})"),
        Err(error) => log::debug!("{peer}: disconnect after error: {error}"),
    }
    drop(permit);
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn run(
    stream: TcpStream,
    peer: SocketAddr,
    listener: ListenerKind,
    ctx: &ServerContext,
) -> io::Result<End> {
    let limits = &ctx.config.limits;
    let command_timeout = limits.command_timeout.get();
    stream.set_read_timeout(Some(command_timeout))?;
    stream.set_write_timeout(Some(command_timeout))?;
    stream.set_nodelay(true)?;
    let mut conn = Conn::Plain(stream);
    if listener == ListenerKind::Smtps {
        let Some(tls) = &ctx.tls else {
            return Err(io::Error::other(
                "implicit TLS listener without a certificate",
            ));
        };
        conn = start_tls(conn, tls)?;
    }
    let mut session = Session::new(ctx.session_config(listener), peer.ip(), conn.tls_info());
    let mut out: Vec<u8> = Vec::new();
    if ctx.is_shutting_down() {
        conn.send(shutting_down_reply(ctx).as_bytes())?;
        return Ok(End::ShuttingDown);
    }
    out.extend_from_slice(session.greeting().to_wire().as_bytes());

    let mut lines = LineReader::new();
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        while let Some(line) = lines.next_line() {
            let step = match line {
                Line::Complete(line) => session.handle_line(&line, &ctx.services),
                Line::TooLong => session.line_too_long(),
            };
            if let Some(end) = perform(
                step,
                &mut session,
                &mut conn,
                &mut lines,
                &mut out,
                &mut buf,
                peer,
                ctx,
            )? {
                return Ok(end);
            }
        }
        // No complete command left: send the batched replies before
        // blocking (RFC 2920 3.1).
        flush(&mut conn, &mut out)?;
        match conn.read(&mut buf) {
            Ok(0) => {
                if ctx.is_shutting_down() {
                    let _ = conn.send(shutting_down_reply(ctx).as_bytes());
                    return Ok(End::ShuttingDown);
                }
                return Ok(End::ClientDisconnected);
            }
            Ok(n) => lines.push(&buf[..n]),
            Err(error) if is_timeout(&error) => {
                let reply = Reply::new(
                    reply::TIMEOUT,
                    format!("{} Timeout, closing connection", ctx.config.hostname),
                );
                let _ = conn.send(reply.to_wire().as_bytes());
                return Ok(End::Timeout);
            }
            Err(error) => return Err(error),
        }
    }
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
#[allow(clippy::too_many_arguments)]
fn perform(
    mut step: Step,
    session: &mut Session,
    conn: &mut Conn,
    lines: &mut LineReader,
    out: &mut Vec<u8>,
    buf: &mut [u8],
    peer: SocketAddr,
    ctx: &ServerContext,
) -> io::Result<Option<End>> {
    loop {
        if let Some(delay) = step.delay {
            flush(conn, out)?;
            std::thread::sleep(delay);
        }
        for reply in &step.replies {
            out.extend_from_slice(reply.to_wire().as_bytes());
        }
        step = match step.action {
            Action::Continue => return Ok(None),
            Action::Close => {
                flush(conn, out)?;
                return Ok(Some(End::Closed));
            }
            Action::StartTls => {
                flush(conn, out)?;
                let dropped = lines.discard();
                if dropped > 0 {
                    log::warn!("{peer}: discarded {dropped} bytes pipelined after STARTTLS");
                }
                let Some(tls) = &ctx.tls else {
                    return Err(io::Error::other("STARTTLS accepted without a certificate"));
                };
                let placeholder = Conn::Plain(conn.tcp().try_clone()?);
                let plain = std::mem::replace(conn, placeholder);
                *conn = start_tls(plain, tls)?;
                if let Some(info) = conn.tls_info() {
                    session.tls_started(info);
                }
                return Ok(None);
            }
            Action::ReceiveData => {
                flush(conn, out)?;
                let pending = lines.take_buffered();
                let limits = &ctx.config.limits;
                let received = match receive_data(
                    conn,
                    pending,
                    buf,
                    limits.max_message_size.bytes() as usize,
                    limits.data_timeout.get(),
                ) {
                    Ok(received) => received,
                    Err(error) if is_timeout(&error) => {
                        let reply = Reply::new(
                            reply::TIMEOUT,
                            "Timeout waiting for DATA, closing connection",
                        );
                        let _ = conn.send(reply.to_wire().as_bytes());
                        return Ok(Some(End::Timeout));
                    }
                    Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                        log::info!("{peer}: disconnected during DATA; nothing queued");
                        return Ok(Some(End::ClientDisconnected));
                    }
                    Err(error) => return Err(error),
                };
                conn.tcp()
                    .set_read_timeout(Some(limits.command_timeout.get()))?;
                lines.push(&received.rest);
                if let Err(error) = &received.message {
                    log::info!("{peer}: message refused: {}", error.describe());
                }
                session.data_finished(received.message, SystemTime::now())
            }
            Action::Enqueue(message) => {
                let result = commit(*message, peer, ctx);
                session.enqueued(result)
            }
        };
    }
}

/// The decoded message (or why it was refused) and the bytes that
/// followed the terminator, which are the client's next commands.
struct ReceivedData {
    message: Result<Vec<u8>, DataError>,
    rest: Vec<u8>,
}

/// Reads the DATA stream up to its terminator.
fn receive_data(
    conn: &mut Conn,
    pending: Vec<u8>,
    buf: &mut [u8],
    max_size: usize,
    timeout: Duration,
) -> io::Result<ReceivedData> {
    conn.tcp().set_read_timeout(Some(timeout))?;
    let mut decoder = DataDecoder::new(max_size);
    if let Progress::Done { consumed } = decoder.feed(&pending) {
        return Ok(ReceivedData {
            message: decoder.finish(),
            rest: pending[consumed..].to_vec(),
        });
    }
    loop {
        let n = conn.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed during DATA",
            ));
        }
        if let Progress::Done { consumed } = decoder.feed(&buf[..n]) {
            return Ok(ReceivedData {
                message: decoder.finish(),
                rest: buf[consumed..n].to_vec(),
            });
        }
    }
}

fn start_tls(conn: Conn, tls: &ServerTls) -> io::Result<Conn> {
    let Conn::Plain(mut tcp) = conn else {
        return Err(io::Error::other("TLS is already active"));
    };
    let mut server = ServerConnection::new(tls.server_config()).map_err(io::Error::other)?;
    while server.is_handshaking() {
        server.complete_io(&mut tcp)?;
    }
    Ok(Conn::Tls(Box::new(StreamOwned::new(server, tcp))))
}

/// Hands the message to the queue writer and logs the outcome; the client
/// hears 250 only if this returns `Ok`.
fn commit(message: NewMessage, peer: SocketAddr, ctx: &ServerContext) -> Result<(), String> {
    let id = message.id.clone();
    let summary = format!(
        "from=<{}>, size={}, nrcpt={}, client={}[{}], listener={}{}, to={}",
        message.sender,
        message.content.len(),
        message.recipients.len(),
        message.helo.as_deref().unwrap_or("unknown"),
        peer.ip(),
        message.listener,
        message
            .auth_user
            .as_deref()
            .map(|u| format!(", sasl_username={u}"))
            .unwrap_or_default(),
        message
            .recipients
            .iter()
            .map(|r| format!("<{}>", r.address))
            .collect::<Vec<_>>()
            .join(","),
    );
    match ctx.queue.insert(message) {
        Ok(()) => {
            log::info!("{id}: accepted {summary}");
            ctx.message_queued();
            Ok(())
        }
        Err(error) => {
            log::error!("{id}: NOT queued ({error}): {summary}");
            Err(error.to_string())
        }
    }
}
