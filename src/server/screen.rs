//! The gate's IO before a session on the MX port (the decisions are
//! [`crate::intake::gate`]'s): the two-line greeting with a wait between
//! its lines, during which the DNS lists are asked, and the refusal.

use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::ServerContext;
use crate::intake::gate::{self, Listing, Screening};
use crate::printable::escape;
use crate::protocol::reply::Reply;
use crate::protocol::session::ListenerKind;

/// How the gate let a client through, or why not.
pub enum Screened {
    /// On to the session. If the first line of a two-line greeting was
    /// sent, the session's greeting is its last.
    Passed,
    /// Refused and told so; the connection is to be closed.
    Refused,
    /// The client hung up while it was being screened.
    HungUp,
}

/// Screens a client of the MX port: the pregreet test and the DNS lists
/// at once (their waits overlap), then the verdict. `label` names the
/// client in the log (`name[ip]`); `read_timeout` is restored afterwards.
pub fn screen(
    tcp: &TcpStream,
    peer: SocketAddr,
    listener: ListenerKind,
    label: &str,
    ctx: &ServerContext,
    read_timeout: Duration,
) -> io::Result<Screened> {
    let gate = ctx.intake.gate();
    let ip = peer.ip();
    let Screening::Screen { pregreet, dnsbl } = gate.screening(ip, listener) else {
        return Ok(Screened::Passed);
    };
    let (waited, listing) = std::thread::scope(|scope| {
        let lookup = dnsbl
            .then(|| {
                std::thread::Builder::new()
                    .name("dnsbl".into())
                    .spawn_scoped(scope, || gate.listing(ip))
                    .ok()
            })
            .flatten();
        let waited = if pregreet {
            wait_for_greeting(tcp, ctx, gate.greet_wait()).map(Some)
        } else {
            Ok(None)
        };
        let listing = match lookup {
            Some(lookup) => lookup.join().unwrap_or_default(),
            // No thread to spare: asked here, after the wait.
            None if dnsbl => gate.listing(ip),
            None => Listing::default(),
        };
        (waited, listing)
    });
    tcp.set_read_timeout(Some(read_timeout))?;
    match waited? {
        Some(Waited::HungUp(after)) => {
            log::info!(
                "HANGUP after {:.2}s from [{ip}]:{}",
                after.as_secs_f64(),
                peer.port()
            );
            return Ok(Screened::HungUp);
        }
        Some(Waited::Talked { after, early }) => {
            log::info!(
                "PREGREET {} after {:.2}s from [{ip}]:{}: {}",
                early.len(),
                after.as_secs_f64(),
                peer.port(),
                escape(&String::from_utf8_lossy(&early))
            );
            refuse(tcp, label, gate::pregreet_reply(ip))?;
            return Ok(Screened::Refused);
        }
        Some(Waited::Quietly) => gate.passed_pregreet(ip),
        None => {}
    }
    if gate.refuses(&listing) {
        log::info!("DNSBL rank {} for [{ip}]:{}", listing.score, peer.port());
        refuse(tcp, label, gate::blocked_reply(ip, &listing))?;
        return Ok(Screened::Refused);
    }
    Ok(Screened::Passed)
}

/// What the client did while the greeting was held back.
enum Waited {
    Quietly,
    /// Sent these bytes (the first few) this long after the first line.
    Talked {
        after: Duration,
        early: Vec<u8>,
    },
    HungUp(Duration),
}

/// Bytes of a pregreet shown in the log, at most.
const PREGREET_SHOWN: usize = 64;

/// Sends the first line of the greeting and waits `wait` for the client
/// to stay quiet, looking at what it sends without taking it.
fn wait_for_greeting(tcp: &TcpStream, ctx: &ServerContext, wait: Duration) -> io::Result<Waited> {
    let mut writer = tcp;
    writer.write_all(format!("220-{} ESMTP petrel\r\n", ctx.config.hostname).as_bytes())?;
    let started = Instant::now();
    let mut early = [0u8; PREGREET_SHOWN];
    loop {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Ok(Waited::Quietly);
        }
        tcp.set_read_timeout(Some(left))?;
        match tcp.peek(&mut early) {
            Ok(0) => return Ok(Waited::HungUp(started.elapsed())),
            Ok(n) => {
                return Ok(Waited::Talked {
                    after: started.elapsed(),
                    early: early[..n].to_vec(),
                });
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(error),
        }
    }
}

/// Tells the client why, logs it in the NOQUEUE form fail2ban reads, and
/// leaves the closing to the caller.
fn refuse(tcp: &TcpStream, label: &str, reply: Reply) -> io::Result<()> {
    let wire = reply.to_wire();
    log::info!(
        "NOQUEUE: reject: CONNECT from {label}: {}; proto=SMTP",
        escape(wire.trim_end())
    );
    let mut writer = tcp;
    writer.write_all(wire.as_bytes())
}
