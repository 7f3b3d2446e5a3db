//! One SMTP connection, greeting to QUIT, on a worker thread: the short
//! loop that reads bytes, feeds the session, writes its replies and carries
//! out its actions (TLS handshake, DATA, queue commit). Policy and protocol
//! decisions are the session's; this file only does IO.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use rustls::ServerConnection;

use super::ServerContext;
use super::limits::Permit;
use crate::printable::escape;
use crate::protocol::data::{DataDecoder, DataError, DecodedMessage, Progress};
use crate::protocol::line::{Line, LineReader};
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::{
    Action, Envelope, ListenerKind, Rejection, Session, Stamp, Step, TlsInfo,
};
use crate::queue::{MessageKind, NewMessage, NewRecipient, QueueId};
use crate::tls::{ServerTls, Transport};

const READ_BUFFER: usize = 16 * 1024;

/// A connection handed from an acceptor to a worker.
pub struct Job {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub listener: ListenerKind,
    pub permit: Permit,
}

/// The client's connection, plain or after STARTTLS / implicit TLS.
type Conn = Transport<ServerConnection>;

fn tls_info(conn: &Conn) -> Option<TlsInfo> {
    conn.summary().map(|summary| TlsInfo {
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
    let mut conn = Transport::Plain(stream);
    if listener == ListenerKind::Smtps {
        let Some(tls) = &ctx.tls else {
            return Err(io::Error::other(
                "implicit TLS listener without a certificate",
            ));
        };
        conn = start_tls(conn, tls)?;
    }
    let mut session = Session::new(ctx.session_config(listener), peer.ip(), tls_info(&conn));
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
        if let Some(rejection) = &step.rejected {
            log_rejection(rejection, peer);
        }
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
                let placeholder = Transport::Plain(conn.tcp().try_clone()?);
                let plain = std::mem::replace(conn, placeholder);
                *conn = start_tls(plain, tls)?;
                if let Some(info) = tls_info(conn) {
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
                let stamp = Stamp {
                    id: QueueId::generate().to_string(),
                    now: SystemTime::now(),
                };
                session.data_finished(received.message, stamp)
            }
            Action::Enqueue(message) => {
                let result = commit(*message, peer, ctx);
                session.enqueued(result)
            }
        };
    }
}

/// One line per refused transaction command, in Postfix's form, so
/// fail2ban filters and an operator's grep work unchanged. We do not look
/// up the client's reverse DNS name: "unknown" stands where Postfix puts it.
fn log_rejection(rejection: &Rejection, peer: SocketAddr) {
    let reply = rejection.reply.to_wire();
    log::info!(
        "NOQUEUE: reject: {} from unknown[{}]: {}; from=<{}> to=<{}> proto={} helo=<{}>",
        rejection.stage,
        peer.ip(),
        escape(reply.trim_end()),
        escape(rejection.from.as_deref().unwrap_or("")),
        escape(rejection.to.as_deref().unwrap_or("")),
        if rejection.esmtp { "ESMTP" } else { "SMTP" },
        escape(rejection.helo.as_deref().unwrap_or("")),
    );
}

/// The decoded message (or why it was refused) and the bytes that
/// followed the terminator, which are the client's next commands.
struct ReceivedData {
    message: Result<DecodedMessage, DataError>,
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
    let server = ServerConnection::new(tls.server_config()).map_err(io::Error::other)?;
    conn.upgrade(server)
}

/// The queue's form of a message the session accepted.
fn queued_form(envelope: Envelope) -> Result<NewMessage, String> {
    let id = QueueId::parse(&envelope.id).ok_or("the session produced a bad queue id")?;
    Ok(NewMessage {
        id,
        sender: envelope.sender,
        recipients: envelope
            .recipients
            .into_iter()
            .map(|r| NewRecipient {
                address: r.target.address,
                original: r.original,
                route: r.target.route,
                domain: r.target.domain,
                notify: r.notify,
                orcpt: r.orcpt,
            })
            .collect(),
        content: envelope.content,
        client_ip: Some(envelope.client_ip),
        helo: envelope.helo,
        auth_user: envelope.auth_user,
        listener: envelope.listener.name().to_string(),
        eight_bit: envelope.eight_bit,
        smtputf8: envelope.smtputf8,
        kind: MessageKind::Normal,
        ret: envelope.ret,
        envid: envelope.envid,
    })
}

/// Hands the message to the queue writer and logs the outcome; the client
/// hears 250 only if this returns `Ok`.
fn commit(envelope: Envelope, peer: SocketAddr, ctx: &ServerContext) -> Result<(), String> {
    let message = queued_form(envelope)?;
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
