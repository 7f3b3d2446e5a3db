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
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use rusqlite::Connection;

use crate::envelope::Route;
use crate::protocol::dsn::{Notify, Ret};
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
    synced_commits: AtomicU64,
    wal_syncs: AtomicU64,
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

    /// Commits that waited for the disk; the others (claims and delivery
    /// outcomes only) reached it with a later one or a WAL sync.
    pub fn synced_commits(&self) -> u64 {
        self.synced_commits.load(Ordering::Relaxed)
    }

    /// WAL syncs made on their own, for commits that had not waited.
    pub fn wal_syncs(&self) -> u64 {
        self.wal_syncs.load(Ordering::Relaxed)
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
    /// [`crate::envelope::Route::key`]) due before `until` is
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
            "queue closed: {} messages stored in {} commits since start ({} commits in all, \
             {} waited for the disk, {} later syncs)",
            stats.messages(),
            stats.insert_commits(),
            stats.commits(),
            stats.synced_commits(),
            stats.wal_syncs()
        );
    }
}

/// Read connections shared by threads (account and alias lookups, content
/// for delivery): at most `limit` open at once, kept open for reuse.
///
/// The bound matters: each connection costs about 100 KiB (SQLite's
/// lookaside, page cache and parsed schema), and 100 clients whose RCPT
/// arrived at once used to open 100 of them, a third of the server's
/// memory (heaptrack, bench/memory.sh senders). A thread that finds every
/// connection busy waits for one; queries here take microseconds.
pub struct ReadPool {
    path: PathBuf,
    limit: usize,
    /// How long a thread waits for a busy pool: [`POOL_WAIT`].
    wait: Duration,
    state: Mutex<PoolState>,
    returned: Condvar,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Connection>,
    /// Connections open, idle or lent.
    open: usize,
}

/// How long a thread waits for a busy pool before giving up with an
/// error (a temporary failure for the client), rather than forever.
const POOL_WAIT: Duration = Duration::from_secs(10);

impl ReadPool {
    /// A pool of at most `limit` connections (at least one).
    pub fn new(path: &Path, limit: usize) -> ReadPool {
        ReadPool {
            path: path.to_path_buf(),
            limit: limit.max(1),
            wait: POOL_WAIT,
            state: Mutex::new(PoolState::default()),
            returned: Condvar::new(),
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
        let lease = self.lease()?;
        match &lease.conn {
            Some(conn) => work(conn),
            // Only a lease being dropped has none.
            None => Err(QueueError::new("read connection missing")),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease(&self) -> Result<Lease<'_>, QueueError> {
        let deadline = Instant::now() + self.wait;
        let mut state = self.state();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(Lease {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if state.open < self.limit {
                state.open += 1;
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QueueError::new(format!(
                    "all {} read connections to the queue stayed busy for {:?}",
                    self.limit, self.wait
                )));
            }
            state = self
                .returned
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(state);
        // Opened outside the lock, in the slot just taken.
        match schema::open_connection(&self.path) {
            Ok(conn) => Ok(Lease {
                pool: self,
                conn: Some(conn),
            }),
            Err(error) => {
                self.give_back(None);
                Err(error)
            }
        }
    }

    /// A lent connection back in the pool; `None`: its slot, unused.
    fn give_back(&self, conn: Option<Connection>) {
        let mut state = self.state();
        match conn {
            Some(conn) => state.idle.push(conn),
            None => state.open = state.open.saturating_sub(1),
        }
        self.returned.notify_one();
    }
}

/// A connection lent by a [`ReadPool`]; back in the pool when dropped,
/// even if the work on it panicked.
struct Lease<'a> {
    pool: &'a ReadPool,
    conn: Option<Connection>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.give_back(self.conn.take());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn pool(dir: &tempfile::TempDir, limit: usize) -> ReadPool {
        open_direct(dir.path()).unwrap();
        ReadPool::new(&dir.path().join(QUEUE_FILE), limit)
    }

    #[test]
    fn a_read_pool_never_opens_more_than_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 3);
        let busy = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..20 {
                scope.spawn(|| {
                    for _ in 0..20 {
                        pool.with("count", |conn| {
                            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let users: i64 =
                                conn.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?;
                            std::thread::yield_now();
                            busy.fetch_sub(1, Ordering::SeqCst);
                            Ok(users)
                        })
                        .unwrap();
                    }
                });
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?}");
        let state = pool.state();
        assert!(state.open <= 3 && state.open >= 1, "{}", state.open);
        assert_eq!(state.idle.len(), state.open, "every connection came back");
    }

    #[test]
    fn a_busy_read_pool_makes_the_next_thread_wait_then_fail() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = pool(&dir, 1);
        pool.wait = Duration::from_millis(200);
        let (held, release) = crossbeam_channel::bounded::<()>(0);
        let (started, running) = crossbeam_channel::bounded::<()>(0);
        std::thread::scope(|scope| {
            let pool = &pool;
            scope.spawn(move || {
                pool.run(|_| {
                    started.send(()).unwrap();
                    release.recv().unwrap();
                    Ok(())
                })
                .unwrap();
            });
            running.recv().unwrap();
            let error = pool.run(|_| Ok(())).unwrap_err();
            assert!(error.to_string().contains("busy"), "{error}");
            held.send(()).unwrap();
        });
        // Given back: the next one gets it at once.
        pool.run(|_| Ok(())).unwrap();
        assert_eq!(pool.state().open, 1);
    }

    #[test]
    fn a_connection_comes_back_even_when_its_work_panics() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 1);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(|_| -> Result<(), QueueError> { panic!("work failed") })
        }));
        assert!(panicked.is_err());
        assert_eq!(pool.state().idle.len(), 1);
        pool.run(|_| Ok(())).unwrap();
    }

    #[test]
    fn a_failed_open_gives_its_slot_back() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the database should be: every open fails.
        let path = dir.path().join("not-a-database");
        std::fs::create_dir(&path).unwrap();
        let mut pool = ReadPool::new(&path, 1);
        pool.wait = Duration::from_millis(100);
        for _ in 0..2 {
            // Not "busy": the slot came back.
            let error = pool.run(|_| Ok(())).unwrap_err().to_string();
            assert!(error.contains("cannot open"), "{error}");
        }
        assert_eq!(pool.state().open, 0);
    }
}
