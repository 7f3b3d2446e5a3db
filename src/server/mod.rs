//! The receiving side: listeners, the acceptor threads, the worker pool
//! and shutdown. One acceptor per listen address hands connections over a
//! bounded crossbeam channel to `limits.max_sessions` worker threads; each
//! worker owns one session from greeting to QUIT.
//!
//! Refusals happen in the acceptor (421), so a client is never left
//! hanging in a backlog nobody will serve.

mod acceptor;
mod connection;
pub mod control;
mod limits;
pub mod local;
pub mod notify;
mod pool;
pub mod privileges;
mod screen;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::config::Config;
use crate::intake::Intake;
use crate::protocol::address::Address;
use crate::protocol::session::{ListenerKind, SessionConfig};
use crate::tls::ServerTls;
pub use limits::{ConnectionLimits, LimitSettings, Refusal};
use pool::WorkerPool;

const ACCEPTOR_STACK: usize = 128 * 1024;
/// Pending connections the kernel keeps for us; small backlogs (5, 20)
/// drop bursts of connects and stall clients for seconds in SYN retries.
const LISTEN_BACKLOG: i32 = 1024;

crate::error::message_error!(StartError, "The listeners could not start.");

/// Sessions that are open now, so shutdown can end them.
#[derive(Default)]
pub struct ConnectionRegistry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Endable>>,
}

/// A handle that can end a session's reading.
enum Endable {
    Tcp(TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

pub struct Registration<'a> {
    registry: &'a ConnectionRegistry,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl ConnectionRegistry {
    fn register(&self, stream: &connection::Stream) -> std::io::Result<Registration<'_>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let clone = match stream {
            connection::Stream::Tcp(stream) => Endable::Tcp(stream.try_clone()?),
            connection::Stream::Unix(stream) => Endable::Unix(stream.try_clone()?),
            // A replay ends by itself at the end of its file.
            connection::Stream::Replay(_) => return Ok(Registration { registry: self, id }),
        };
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, clone);
        Ok(Registration { registry: self, id })
    }

    /// Ends reading on every open session: idle ones see end-of-input and
    /// answer 421; one mid-DATA loses only its unacknowledged message.
    fn shut_down_reads(&self) {
        for stream in self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = match stream {
                Endable::Tcp(stream) => stream.shutdown(Shutdown::Read),
                Endable::Unix(stream) => stream.shutdown(Shutdown::Read),
            };
        }
    }
}

/// What the worker threads share.
pub struct ServerContext {
    pub config: Arc<Config>,
    /// What sessions ask, and where their messages go.
    pub intake: Intake,
    pub tls: Option<Arc<ServerTls>>,
    /// Per listener kind: smtp, submission, smtps, local.
    sessions: [Arc<SessionConfig>; 4],
    registry: ConnectionRegistry,
    shutting_down: AtomicBool,
}

impl ServerContext {
    fn session_config(&self, listener: ListenerKind) -> Arc<SessionConfig> {
        let index = match listener {
            ListenerKind::Smtp => 0,
            ListenerKind::Submission => 1,
            ListenerKind::Smtps => 2,
            ListenerKind::Local => 3,
        };
        Arc::clone(&self.sessions[index])
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

fn session_config(config: &Config, listener: ListenerKind, tls_available: bool) -> SessionConfig {
    SessionConfig {
        hostname: config.hostname.clone(),
        listener,
        max_message_size: config.limits.max_message_size.bytes(),
        max_recipients: config.limits.max_recipients,
        max_errors: config.limits.max_errors,
        soft_errors: config.limits.soft_errors,
        tls_available,
        postmaster: config
            .domains
            .local
            .first()
            .and_then(|domain| Address::parse(&format!("postmaster@{domain}")).ok()),
        max_header_size: config.limits.max_header_size.bytes(),
        max_hops: config.limits.max_hops,
    }
}

/// Listening sockets, bound before anything else starts, so the addresses
/// they got are known (delivery must never connect back to them). The TCP
/// ports are bound first (perhaps as root, for port 25); the local socket
/// lives in `data_dir` and is bound only once root is gone.
pub struct Bound {
    listeners: Vec<(ListenerKind, TcpListener)>,
    /// The local submission socket (`petrel sendmail`).
    local: Option<(std::os::unix::net::UnixListener, std::path::PathBuf)>,
}

impl Bound {
    /// Binds every configured TCP listener, failing if any cannot be bound.
    pub fn bind(config: &Config, tls_available: bool) -> Result<Bound, StartError> {
        let mut listeners = Vec::new();
        for (kind, addresses) in [
            (ListenerKind::Smtp, &config.smtp.listen),
            (ListenerKind::Submission, &config.submission.listen),
            (ListenerKind::Smtps, &config.smtps.listen),
        ] {
            if kind == ListenerKind::Smtps && !tls_available && !addresses.is_empty() {
                return Err(StartError("smtps needs a TLS certificate".into()));
            }
            for address in addresses {
                let listener = bind(*address).map_err(|e| {
                    StartError(format!("cannot listen on {address} ({}): {e}", kind.name()))
                })?;
                listeners.push((kind, listener));
            }
        }
        Ok(Bound {
            listeners,
            local: None,
        })
    }

    /// Binds the local submission socket in `data_dir/public/`.
    pub fn bind_local(&mut self, config: &Config) -> Result<(), StartError> {
        let local_path = crate::store::data_dir::submit_socket(&config.data_dir);
        let local = local::bind(&config.data_dir).map_err(|e| {
            StartError(format!(
                "cannot listen on the local socket {}: {e}",
                local_path.display()
            ))
        })?;
        self.local = Some((local, local_path));
        Ok(())
    }

    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(_, listener)| listener.local_addr().ok())
            .collect()
    }
}

/// What the server needs besides its config.
pub struct ServerParts {
    pub tls: Option<Arc<ServerTls>>,
    /// Checks, signs and commits what sessions accept.
    pub intake: Intake,
}

/// A running set of listeners and workers.
pub struct Server {
    context: Arc<ServerContext>,
    listeners: Vec<(ListenerKind, SocketAddr)>,
    acceptors: Vec<JoinHandle<()>>,
    pool: Arc<WorkerPool>,
    limits: Arc<ConnectionLimits>,
    /// Duplicates of every listening socket, shut down to wake the
    /// acceptors blocked in accept(). Connecting to the listener would
    /// hang shutdown forever if the socket file was removed or the
    /// address can no longer be reached.
    wakers: Vec<std::os::fd::OwnedFd>,
    pickup: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Server {
    /// Starts the acceptors and workers on listeners already bound.
    pub fn start(
        config: Arc<Config>,
        bound: Bound,
        parts: ServerParts,
    ) -> Result<Server, StartError> {
        if parts.tls.is_none()
            && bound
                .listeners
                .iter()
                .any(|(k, _)| *k == ListenerKind::Smtps)
        {
            return Err(StartError("smtps needs a TLS certificate".into()));
        }

        let context = Arc::new(ServerContext {
            config: Arc::clone(&config),
            sessions: session_configs(&config, parts.tls.is_some()),
            intake: parts.intake,
            tls: parts.tls,
            registry: ConnectionRegistry::default(),
            shutting_down: AtomicBool::new(false),
        });

        let max_sessions = config.limits.max_sessions;
        let max_local = config.limits.max_local_sessions;
        // Local sessions have workers of their own beside max_sessions.
        let pool = Arc::new(
            WorkerPool::start(Arc::clone(&context), max_sessions + max_local)
                .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?,
        );

        let limits = connection_limits(&config);
        let shared = Shared {
            pool: &pool,
            limits: &limits,
            context: &context,
        };
        let (listeners, mut acceptors, mut wakers) = start_acceptors(bound.listeners, &shared)?;
        let (local_acceptor, local_waker) = start_local_acceptor(bound.local, &shared)?;
        acceptors.push(local_acceptor);
        wakers.push(local_waker);
        let stop = Arc::new(AtomicBool::new(false));
        let pickup = {
            let (context, limits, stop) =
                (Arc::clone(&context), Arc::clone(&limits), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("pickup".into())
                .spawn(move || local::pickup_loop(context, limits, stop))
                .map_err(|e| StartError(format!("cannot start the pickup thread: {e}")))?
        };
        Ok(Server {
            context,
            listeners,
            acceptors,
            pool,
            limits,
            wakers,
            pickup: Some((stop, pickup)),
        })
    }

    /// The bound address of the first listener of a kind (tests bind port 0).
    pub fn local_addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, address)| *address)
    }

    /// Sessions holding a worker right now.
    pub fn active_sessions(&self) -> usize {
        self.limits.active()
    }

    pub fn context(&self) -> &ServerContext {
        &self.context
    }

    /// The context, to keep (the control socket's `reload-aliases`).
    pub fn shared_context(&self) -> Arc<ServerContext> {
        Arc::clone(&self.context)
    }

    /// Stops accepting, ends open sessions (421 to idle ones) and waits for
    /// the workers. Messages already acknowledged are in the queue.
    pub fn shutdown(mut self) {
        self.context.shutting_down.store(true, Ordering::SeqCst);
        for listener in &self.wakers {
            // accept() then fails at once (EINVAL); the acceptor sees the flag.
            if let Err(error) = rustix::net::shutdown(listener, rustix::net::Shutdown::Both) {
                log::warn!("cannot wake an acceptor: {error}");
            }
        }
        if let Some((stop, pickup)) = self.pickup.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = pickup.join();
        }
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
        self.context.registry.shut_down_reads();
        self.pool.close();
    }

    /// Session threads started so far (they start as sessions need them).
    pub fn worker_threads(&self) -> usize {
        self.pool.size()
    }
}

fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        // "[::]:25" serves IPv6 only, so it can be listed next to
        // "0.0.0.0:25" without the two colliding.
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
/// The session settings of each listener kind.
fn session_configs(config: &Config, tls_available: bool) -> [Arc<SessionConfig>; 4] {
    [
        ListenerKind::Smtp,
        ListenerKind::Submission,
        ListenerKind::Smtps,
        ListenerKind::Local,
    ]
    .map(|kind| {
        // No STARTTLS on the local socket: nothing travels a network.
        let tls = tls_available && kind != ListenerKind::Local;
        Arc::new(session_config(config, kind, tls))
    })
}

fn connection_limits(config: &Config) -> Arc<ConnectionLimits> {
    let max_sessions = config.limits.max_sessions;
    let reserved = config.limits.submission_reserved.min(max_sessions / 2);
    ConnectionLimits::new(LimitSettings {
        max_total: max_sessions,
        max_smtp: max_sessions - reserved,
        max_per_client: config.limits.max_sessions_per_ip,
        per_minute: config.limits.max_connection_rate,
        max_local: config.limits.max_local_sessions,
        max_local_per_user: config.limits.max_local_sessions_per_user,
    })
}

/// What every acceptor hands connections to.
struct Shared<'a> {
    pool: &'a Arc<WorkerPool>,
    limits: &'a Arc<ConnectionLimits>,
    context: &'a Arc<ServerContext>,
}

type Started = (
    Vec<(ListenerKind, SocketAddr)>,
    Vec<JoinHandle<()>>,
    Vec<std::os::fd::OwnedFd>,
);

/// One acceptor thread per TCP listener; returns the addresses, the
/// threads and a copy of each socket (shutdown wakes the acceptors
/// through them).
fn start_acceptors(
    bound: Vec<(ListenerKind, std::net::TcpListener)>,
    shared: &Shared,
) -> Result<Started, StartError> {
    let mut listeners = Vec::new();
    let mut acceptors = Vec::new();
    let mut wakers = Vec::new();
    for (kind, listener) in bound {
        let address = listener
            .local_addr()
            .map_err(|e| StartError(format!("cannot read listen address: {e}")))?;
        wakers.push(waker_of(listener.try_clone().map(Into::into))?);
        log::info!("listening on {address} ({})", kind.name());
        listeners.push((kind, address));
        let acceptor = acceptor::Acceptor {
            listener,
            kind,
            pool: Arc::clone(shared.pool),
            limits: Arc::clone(shared.limits),
            context: Arc::clone(shared.context),
        };
        let handle = std::thread::Builder::new()
            .name(format!("accept-{}-{address}", kind.name()))
            .stack_size(ACCEPTOR_STACK)
            .spawn(move || acceptor.run())
            .map_err(|e| StartError(format!("cannot start acceptor thread: {e}")))?;
        acceptors.push(handle);
    }
    Ok((listeners, acceptors, wakers))
}

fn start_local_acceptor(
    local: Option<(std::os::unix::net::UnixListener, std::path::PathBuf)>,
    shared: &Shared,
) -> Result<(JoinHandle<()>, std::os::fd::OwnedFd), StartError> {
    let (local_listener, local_path) =
        local.ok_or_else(|| StartError("the local socket is not bound".into()))?;
    let waker = waker_of(local_listener.try_clone().map(Into::into))?;
    let local_acceptor = local::LocalAcceptor {
        listener: local_listener,
        pool: Arc::clone(shared.pool),
        limits: Arc::clone(shared.limits),
        context: Arc::clone(shared.context),
    };
    let handle = std::thread::Builder::new()
        .name("accept-local".into())
        .stack_size(ACCEPTOR_STACK)
        .spawn(move || local_acceptor.run())
        .map_err(|e| StartError(format!("cannot start acceptor thread: {e}")))?;
    log::info!("listening on {} (local)", local_path.display());
    Ok((handle, waker))
}

fn waker_of(fd: std::io::Result<std::os::fd::OwnedFd>) -> Result<std::os::fd::OwnedFd, StartError> {
    fd.map_err(|e| StartError(format!("cannot duplicate a listening socket: {e}")))
}
