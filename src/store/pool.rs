//! Read connections the threads share (account and alias lookups, the
//! content delivery sends): bounded in number, kept open for reuse.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::{StoreError, schema};

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
    ) -> Result<T, StoreError> {
        self.run(|conn| query(conn).map_err(StoreError::sqlite(what.to_string())))
    }

    /// Runs `work` on a pooled connection.
    pub fn run<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let lease = self.lease()?;
        match &lease.conn {
            Some(conn) => work(conn),
            // Only a lease being dropped has none.
            None => Err(StoreError::new("read connection missing")),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease(&self) -> Result<Lease<'_>, StoreError> {
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
                return Err(StoreError::new(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn pool(dir: &tempfile::TempDir, limit: usize) -> ReadPool {
        crate::store::open_direct(dir.path()).unwrap();
        ReadPool::new(&dir.path().join(super::super::data_dir::QUEUE_FILE), limit)
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
            pool.run(|_| -> Result<(), StoreError> { panic!("work failed") })
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
