//! The bottom of petrel's persistence: one SQLite file in `data_dir`, its
//! migrations, the one writer thread that commits everyone's writes
//! together (group commit), the shared read connections, and the layout
//! of `data_dir` itself.
//!
//! `store/` knows no table's meaning. The queue, the accounts and the
//! MTA-STS cache each own their SQL ([`crate::queue`],
//! [`crate::auth::accounts`], [`crate::mta_sts`]) and hand the writer
//! closures; the next persisted feature gets a module of its own, not an
//! edit here.

pub mod data_dir;
mod pool;
pub mod schema;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use rusqlite::Connection;

pub use pool::ReadPool;
pub use schema::SCHEMA_VERSION;
pub use writer::Commit;
use writer::{Request, WriteRequest};

/// Errors are values with the context an operator needs to act on them.
#[derive(Debug)]
pub struct StoreError {
    message: String,
}

impl StoreError {
    pub fn new(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
        }
    }

    /// For `map_err`: `StoreError::sqlite("cannot insert")`.
    pub fn sqlite(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let context = context.into();
        move |error| StoreError::new(format!("{context}: {error}"))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {}

/// Counters that show group commit at work.
#[derive(Debug, Default)]
pub struct StoreStats {
    commits: AtomicU64,
    insert_commits: AtomicU64,
    messages: AtomicU64,
    synced_commits: AtomicU64,
    wal_syncs: AtomicU64,
}

impl StoreStats {
    /// Transactions committed by the writer.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Transactions that stored at least one new message: with group
    /// commit, fewer than `messages()` under concurrent load.
    pub fn insert_commits(&self) -> u64 {
        self.insert_commits.load(Ordering::Relaxed)
    }

    /// Messages stored ([`Commit::NewMail`] writes that succeeded).
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// Commits that waited for the disk; the others reached it with a
    /// later one or a WAL sync.
    pub fn synced_commits(&self) -> u64 {
        self.synced_commits.load(Ordering::Relaxed)
    }

    /// WAL syncs made on their own, for commits that had not waited.
    pub fn wal_syncs(&self) -> u64 {
        self.wal_syncs.load(Ordering::Relaxed)
    }
}

/// A cheap, clonable handle for submitting writes and opening readers.
#[derive(Clone)]
pub struct StoreHandle {
    requests: Sender<Request>,
    stats: Arc<StoreStats>,
    path: Arc<PathBuf>,
}

impl StoreHandle {
    /// Runs `work` on the writer thread inside the next transaction (in a
    /// savepoint of its own: its failure undoes only its writes) and
    /// returns its result once that transaction is committed, as durably
    /// as `commit` asks. `work` gets the connection and the transaction's
    /// timestamp (`YYYY-MM-DD HH:MM:SS`, UTC), one for every write in it.
    pub fn write<T: Send + 'static>(
        &self,
        commit: Commit,
        work: impl FnOnce(&Connection, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, answer) = crossbeam_channel::bounded(1);
        self.send(WriteRequest::new(commit, work, move |result| {
            // A caller that gave up waiting is gone; nothing to tell it.
            let _ = done.send(result);
        }))?;
        answer
            .recv()
            .map_err(|_| StoreError::new("the store's writer stopped before answering"))?
    }

    /// Hands `work` to the writer without waiting for it: for records
    /// whose loss in a crash costs no mail (the login audit trail), which
    /// must not slow down the thread that makes them. A failure is logged.
    pub fn write_later(
        &self,
        what: &'static str,
        work: impl FnOnce(&Connection, &str) -> Result<(), StoreError> + Send + 'static,
    ) {
        let request = WriteRequest::new(Commit::Durable, work, move |result| {
            if let Err(error) = result {
                log::warn!("store: {what} was not recorded: {error}");
            }
        });
        if let Err(error) = self.send(request) {
            log::warn!("store: {what} was not recorded: {error}");
        }
    }

    fn send(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.requests
            .send(Request::Write(request))
            .map_err(|_| StoreError::new("the store's writer has stopped"))
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// A new read connection, for queries that must not wait on the writer.
    pub fn reader(&self) -> Result<Connection, StoreError> {
        schema::open_connection(&self.path)
    }

    /// A pool of at most `limit` read connections.
    pub fn read_pool(&self, limit: usize) -> ReadPool {
        ReadPool::new(&self.path, limit)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The store and its writer thread. Dropping every handle and calling
/// [`Store::close`] lets the writer finish what it was given and stop.
pub struct Store {
    handle: StoreHandle,
    writer: JoinHandle<()>,
}

impl Store {
    /// Opens `data_dir/queue.db`, creating and migrating it, and starts
    /// the writer.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        data_dir::create(data_dir)?;
        let path = data_dir.join(data_dir::QUEUE_FILE);
        let conn = schema::open(&path)?;
        let stats = Arc::new(StoreStats::default());
        let (requests, receiver) = crossbeam_channel::bounded(writer::CHANNEL_CAPACITY);
        let writer = writer::spawn(conn, receiver, Arc::clone(&stats))?;
        Ok(Store {
            handle: StoreHandle {
                requests,
                stats,
                path: Arc::new(path),
            },
            writer,
        })
    }

    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Lets the writer finish every request sent before this call, then
    /// stops it; later requests through other handles get an error.
    pub fn close(self) {
        let stats = Arc::clone(&self.handle.stats);
        let _ = self.handle.requests.send(Request::Stop);
        drop(self.handle);
        if self.writer.join().is_err() {
            log::error!("the store's writer thread panicked");
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

/// A connection of its own to `data_dir/queue.db`, created and migrated
/// if need be: for the command line and tests, which do not run a writer.
pub fn open_direct(data_dir: &Path) -> Result<Connection, StoreError> {
    data_dir::create(data_dir)?;
    schema::open(&data_dir.join(data_dir::QUEUE_FILE))
}
