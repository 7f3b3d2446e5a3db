//! The durable queue: a SQLite database in `data_dir/queue.db`.
//!
//! Owns every write to the queue through one writer thread that commits in
//! batches (group commit); readers open their own connections. It must never
//! report a message as stored before its transaction is committed on disk.

pub mod content;
pub mod delivery;
mod id;
mod schema;
pub mod views;
mod writer;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use rusqlite::Connection;

use crate::protocol::dsn::{Notify, Ret};
use crate::routing::Route;
use delivery::{ClaimLimits, Claimed, DeliveryReport};
pub use id::QueueId;
pub use schema::SCHEMA_VERSION;
use writer::{Request, WriteOp, WriteOutput, WriteRequest};

pub const QUEUE_FILE: &str = "queue.db";

/// Errors are values with the context an operator needs to act on them.
#[derive(Debug)]
pub struct QueueError {
    message: String,
}

impl QueueError {
    pub fn new(message: impl Into<String>) -> QueueError {
        QueueError {
            message: message.into(),
        }
    }

    /// For `map_err`: `QueueError::sqlite("cannot insert")`.
    pub fn sqlite(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> QueueError {
        let context = context.into();
        move |error| QueueError::new(format!("{context}: {error}"))
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for QueueError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Normal,
    /// A delivery status notification we generated: never bounced itself.
    Bounce,
    DelayWarning,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Normal => "normal",
            MessageKind::Bounce => "bounce",
            MessageKind::DelayWarning => "delay_warning",
        }
    }
}

/// A message ready to be committed, as a session or `sendmail` hands it over.
#[derive(Debug)]
pub struct NewMessage {
    pub id: QueueId,
    /// Envelope sender; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<NewRecipient>,
    pub content: content::Content,
    pub client_ip: Option<IpAddr>,
    pub helo: Option<String>,
    pub auth_user: Option<String>,
    /// The app password `auth_user` logged in with; `None`: the main one.
    pub auth_label: Option<String>,
    pub listener: String,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub kind: MessageKind,
    /// RFC 3461 RET and ENVID, as the client gave them.
    pub ret: Option<Ret>,
    pub envid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecipient {
    pub address: String,
    /// The RCPT TO address when an alias (or case) turned it into `address`.
    pub original: Option<String>,
    /// Decided by [`crate::routing`] when the message was accepted.
    pub route: Route,
    /// The recipient's domain, lower case.
    pub domain: String,
    /// RFC 3461 NOTIFY as accepted; `None` when not given.
    pub notify: Option<Notify>,
    pub orcpt: Option<String>,
}

/// Counters that show group commit at work.
#[derive(Debug, Default)]
pub struct QueueStats {
    commits: AtomicU64,
    insert_commits: AtomicU64,
    messages: AtomicU64,
}

impl QueueStats {
    /// Transactions committed by the writer.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Transactions that stored at least one new message: with group
    /// commit, fewer than `messages()` under concurrent load.
    pub fn insert_commits(&self) -> u64 {
        self.insert_commits.load(Ordering::Relaxed)
    }

    /// Messages inserted by the writer.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// A cheap, clonable handle for submitting writes.
#[derive(Clone)]
pub struct QueueHandle {
    requests: Sender<Request>,
    stats: Arc<QueueStats>,
    path: Arc<PathBuf>,
}

impl QueueHandle {
    /// Commits the message and returns only once it is on disk.
    pub fn insert(&self, message: NewMessage) -> Result<(), QueueError> {
        self.submit(WriteOp::Insert(Box::new(message))).map(|_| ())
    }

    /// Marks the `rows` recipients due longest, and the other due
    /// recipients of their messages, as being delivered, leaving out the
    /// destinations in `skip`.
    pub fn claim_due(&self, limits: ClaimLimits) -> Result<Claimed, QueueError> {
        match self.submit(WriteOp::Claim(limits))? {
            WriteOutput::Claimed(claimed) => Ok(claimed),
            _ => Ok(Claimed::default()),
        }
    }

    pub fn record(&self, report: DeliveryReport) -> Result<(), QueueError> {
        self.submit(WriteOp::Record(Box::new(report))).map(|_| ())
    }

    /// Caches an MTA-STS policy (see [`crate::mta_sts`]).
    pub fn store_policy(&self, policy: crate::mta_sts::Policy) -> Result<(), QueueError> {
        self.submit(WriteOp::StorePolicy(Box::new(policy)))
            .map(|_| ())
    }

    /// Puts every in-flight recipient back in the queue (crash recovery).
    pub fn requeue_all(&self) -> Result<usize, QueueError> {
        self.requeue_with(None, None)
    }

    /// Puts these in-flight recipients back, due at `retry_at`.
    pub fn requeue_at(
        &self,
        ids: Vec<i64>,
        retry_at: std::time::SystemTime,
    ) -> Result<usize, QueueError> {
        self.requeue_with(Some(ids), Some(crate::timefmt::sql_timestamp(retry_at)))
    }

    /// Puts claimed recipients back as they were (a job never started).
    pub fn requeue(&self, ids: Vec<i64>) -> Result<usize, QueueError> {
        self.requeue_with(Some(ids), None)
    }

    /// Every waiting recipient for `destination` (a
    /// [`crate::routing::Route::destination`] key) due before `until` is
    /// put back to `until`; returns how many.
    pub fn back_off(
        &self,
        destination: String,
        until: std::time::SystemTime,
    ) -> Result<usize, QueueError> {
        let until = crate::timefmt::sql_timestamp(until);
        match self.submit(WriteOp::BackOff { destination, until })? {
            WriteOutput::Count(count) => Ok(count),
            _ => Ok(0),
        }
    }

    fn requeue_with(
        &self,
        ids: Option<Vec<i64>>,
        retry_at: Option<String>,
    ) -> Result<usize, QueueError> {
        match self.submit(WriteOp::Requeue { ids, retry_at })? {
            WriteOutput::Count(count) => Ok(count),
            _ => Ok(0),
        }
    }

    /// Records a login without waiting for the commit: the audit trail
    /// must not slow AUTH down, and a crash may lose the last few events
    /// (never mail).
    pub fn record_login(&self, event: crate::auth::accounts::LoginEvent) {
        let (done, _) = crossbeam_channel::bounded(1);
        let request = Request::Write(WriteRequest {
            op: WriteOp::Login(Box::new(event)),
            done,
        });
        if self.requests.send(request).is_err() {
            log::warn!("auth: the queue writer has stopped; a login was not recorded");
        }
    }

    fn submit(&self, op: WriteOp) -> Result<WriteOutput, QueueError> {
        let (done, result) = crossbeam_channel::bounded(1);
        self.requests
            .send(Request::Write(WriteRequest { op, done }))
            .map_err(|_| QueueError::new("queue writer has stopped"))?;
        result
            .recv()
            .map_err(|_| QueueError::new("queue writer stopped before answering"))?
    }

    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// A new read connection, for queries that must not wait on the writer.
    pub fn reader(&self) -> Result<Connection, QueueError> {
        schema::open_connection(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The queue and its writer thread. Dropping every handle and calling
/// [`Queue::close`] lets the writer finish what it was given and stop.
pub struct Queue {
    handle: QueueHandle,
    writer: JoinHandle<()>,
}

impl Queue {
    /// Opens `data_dir/queue.db`, migrating it, and starts the writer.
    pub fn open(data_dir: &Path) -> Result<Queue, QueueError> {
        create_data_dir(data_dir)?;
        match content::clear_spool(data_dir) {
            Ok(0) => {}
            Ok(n) => log::info!("queue: removed {n} spool files of messages never acknowledged"),
            Err(error) => log::warn!("queue: cannot clear the spool: {error}"),
        }
        let path = data_dir.join(QUEUE_FILE);
        let conn = schema::open(&path)?;
        let stats = Arc::new(QueueStats::default());
        let (requests, receiver) = crossbeam_channel::bounded(writer::CHANNEL_CAPACITY);
        let writer = writer::spawn(conn, receiver, Arc::clone(&stats))?;
        Ok(Queue {
            handle: QueueHandle {
                requests,
                stats,
                path: Arc::new(path),
            },
            writer,
        })
    }

    pub fn handle(&self) -> QueueHandle {
        self.handle.clone()
    }

    /// Lets the writer finish every request sent before this call, then
    /// stops it; later requests through other handles get an error.
    pub fn close(self) {
        let stats = Arc::clone(&self.handle.stats);
        let _ = self.handle.requests.send(Request::Stop);
        drop(self.handle);
        if self.writer.join().is_err() {
            log::error!("queue writer thread panicked");
        }
        log::info!(
            "queue closed: {} messages stored in {} commits since start ({} commits in all)",
            stats.messages(),
            stats.insert_commits(),
            stats.commits()
        );
    }
}

/// Read connections shared by the worker threads (account and alias
/// lookups). Connections are reused; at most `MAX_IDLE` are kept open.
pub struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    const MAX_IDLE: usize = 16;

    pub fn new(path: &Path) -> ReadPool {
        ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn with<T>(
        &self,
        what: &str,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, QueueError> {
        self.run(|conn| query(conn).map_err(QueueError::sqlite(what.to_string())))
    }

    /// Runs `work` on a pooled connection.
    pub fn run<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => schema::open_connection(&self.path)?,
        };
        let result = work(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < Self::MAX_IDLE {
            idle.push(conn);
        }
        result
    }
}

/// Opens the queue database of `data_dir` for reading and one-off writes
/// (the CLI), migrating it if needed. Works while a server runs.
pub fn open_direct(data_dir: &Path) -> Result<Connection, QueueError> {
    create_data_dir(data_dir)?;
    schema::open(&data_dir.join(QUEUE_FILE))
}

fn create_data_dir(data_dir: &Path) -> Result<(), QueueError> {
    create_private_dir(data_dir).map_err(|e| {
        QueueError::new(format!(
            "cannot create data_dir {}: {e}",
            data_dir.display()
        ))
    })
}

/// Makes what petrel keeps in `data_dir` readable by its own user only,
/// whatever umask or hand made it: folders 0700, the queue database
/// (queued mail, password hashes) and private keys 0600. `data_dir` itself
/// and its `public/` folder are 0711 (others may pass through to the local
/// submission socket, never list or read), the maildrop 1733.
/// Returns a warning for each that was more open. Maildir messages are
/// written 0600 from the start; they are not walked here (there may be
/// millions).
pub fn make_private(data_dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut warnings = Vec::new();
    // `mode` is what to set when any bit of `open` is set.
    let mut restrict = |path: &Path, mode: u32, open: u32| {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.file_type().is_symlink() {
            return;
        }
        let current = meta.permissions().mode() & 0o7777;
        if current & open != 0 {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                Ok(()) => warnings.push(format!(
                    "{} was readable by others (mode {current:o}); now {mode:o}",
                    path.display()
                )),
                Err(error) => warnings.push(format!(
                    "{} is readable by others (mode {current:o}) and cannot be changed: {error}",
                    path.display()
                )),
            }
        }
    };
    let private = 0o077;
    let passable = 0o066;
    restrict(data_dir, 0o711, passable);
    restrict(
        &data_dir.join(crate::server::local::PUBLIC_DIR),
        0o711,
        passable,
    );
    for file in [QUEUE_FILE, "queue.db-wal", "queue.db-shm"] {
        restrict(&data_dir.join(file), 0o600, private);
    }
    for dir in [
        content::SPOOL_DIR,
        "tls",
        crate::delivery::maildir::MAIL_DIR,
        crate::server::local::REFUSED_DIR,
    ] {
        restrict(&data_dir.join(dir), 0o700, private);
    }
    if let Ok(entries) = std::fs::read_dir(data_dir.join("tls")) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().contains("key") {
                restrict(&entry.path(), 0o600, private);
            }
        }
    }
    // Mail folders: mail/<domain>/<user>/{,tmp,new,cur}.
    if let Ok(domains) = std::fs::read_dir(data_dir.join(crate::delivery::maildir::MAIL_DIR)) {
        for domain in domains.flatten() {
            restrict(&domain.path(), 0o700, private);
            let Ok(users) = std::fs::read_dir(domain.path()) else {
                continue;
            };
            for user in users.flatten() {
                restrict(&user.path(), 0o700, private);
                for sub in ["tmp", "new", "cur"] {
                    restrict(&user.path().join(sub), 0o700, private);
                }
            }
        }
    }
    warnings
}

/// Space left for new mail on the filesystem of `data_dir`, in octets (as
/// an unprivileged process may use it).
pub fn free_space(data_dir: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(data_dir)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Creates `dir` (with its parents) for petrel's user only: 0700 whatever
/// the umask, since it holds queued mail, password hashes and keys.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
