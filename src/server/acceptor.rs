//! Accepts connections on one listen address and hands them to the worker
//! pool, or refuses them at once with 421 when the limits say no.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::ServerContext;
use super::connection::{Incoming, Stream};
use super::limits::{ConnectionLimits, Refusal};
use super::pool::WorkerPool;
use crate::protocol::reply::{self, Reply};
use crate::protocol::session::ListenerKind;

/// A refusal must never stall the acceptor on a client that does not read.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// After accept() fails (e.g. out of file descriptors), wait before trying
/// again rather than spinning on the error.
pub(super) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub struct Acceptor {
    pub listener: TcpListener,
    pub kind: ListenerKind,
    pub pool: Arc<WorkerPool>,
    pub limits: Arc<ConnectionLimits>,
    pub context: Arc<ServerContext>,
}

impl Acceptor {
    pub fn run(self) {
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(error) => {
                    if self.context.is_shutting_down() {
                        return;
                    }
                    log::warn!("accept on {} failed: {error}", self.kind.name());
                    std::thread::sleep(ACCEPT_ERROR_PAUSE);
                    continue;
                }
            };
            if self.context.is_shutting_down() {
                return;
            }
            let trusted = self.context.config.relay.is_trusted(peer.ip());
            match self.limits.try_acquire(peer.ip(), self.kind, trusted) {
                Ok(permit) => {
                    let job = Incoming {
                        stream: Stream::Tcp(stream),
                        peer,
                        listener: self.kind,
                        permit,
                        local: None,
                    };
                    if self.pool.submit(job).is_err() {
                        return;
                    }
                }
                Err(refusal) => self.refuse(stream, peer, refusal),
            }
        }
    }

    fn refuse(&self, mut stream: TcpStream, peer: SocketAddr, refusal: Refusal) {
        let hostname = &self.context.config.hostname;
        let reply = match refusal {
            Refusal::ServerBusy => Reply::new(
                reply::TOO_BUSY,
                format!("{hostname} Too many connections, try again later"),
            ),
            Refusal::ListenerFull => Reply::new(
                reply::TOO_BUSY,
                format!("{hostname} Too many connections on this port, try again later"),
            ),
            Refusal::TooManyFromAddress => Reply::new(
                reply::TOO_MANY_CONNECTIONS_FROM_YOU,
                format!("{hostname} Too many connections from your address"),
            ),
            Refusal::TooFast => Reply::new(
                reply::TOO_MANY_CONNECTIONS_FROM_YOU,
                format!("{hostname} Too many connections from your address, slow down"),
            ),
            // Local refusals never reach a TCP listener.
            Refusal::LocalFull | Refusal::TooManyFromUser => Reply::new(
                reply::TOO_BUSY,
                format!("{hostname} Too many connections, try again later"),
            ),
        };
        log::info!(
            "{peer}: refused on {}: {}",
            self.kind.name(),
            refusal.describe()
        );
        // Implicit TLS clients would not understand a plaintext reply;
        // closing is the clearest answer we can give them.
        if self.kind != ListenerKind::Smtps {
            let _ = stream.set_write_timeout(Some(REFUSAL_WRITE_TIMEOUT));
            let _ = stream.write_all(reply.to_wire().as_bytes());
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}
