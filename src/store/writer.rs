//! The one thread that writes to the store. Requests that arrive while a
//! commit is in progress are gathered into the next transaction, so many
//! sessions finishing at once share one fsync (group commit). Each request
//! runs inside its own savepoint: one failing write never fails the others.
//! What a request writes is its owner's business: the writer runs the
//! closure it was handed and knows only how durable its commit must be.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::{Connection, TransactionBehavior};

use super::{StoreError, StoreStats};
use crate::timefmt::sql_timestamp;

/// Requests waiting to be committed; beyond this, senders wait, which is
/// the back-pressure we want when the disk is slower than the network.
pub const CHANNEL_CAPACITY: usize = 1024;

/// Upper bound for one transaction, so a burst cannot delay the first
/// message of the batch indefinitely.
const MAX_BATCH: usize = 256;
/// How often the writer gives freed pages back to the filesystem.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);
/// Free pages tolerated before they are given back ...
const FREE_PAGES_KEPT: i64 = 256;
/// ... and at most this many per step, so a step is short (8 MiB at 4 KiB).
const PAGES_PER_STEP: i64 = 2048;

/// How durable a write's commit must be, decided by the write's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// A new message: on disk before the call returns (the 250 promises
    /// it), and counted in [`StoreStats::messages`].
    NewMail,
    /// On disk before the call returns.
    Durable,
    /// May wait for a later commit's sync, [`SYNC_WITHIN`] at most: for
    /// writes whose loss in a power cut loses no mail (a claim, a delivery
    /// outcome: the message is tried, or delivered, again).
    Deferrable,
}

/// What the writer does with a write's outcome once the transaction ends:
/// tell whoever is waiting.
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// An owner's write, with the answer to give when it is done.
trait Job: Send {
    /// Runs the write; says whether it succeeded (else its savepoint is
    /// rolled back) and how to answer once the commit is known.
    fn run(self: Box<Self>, conn: &Connection, now: &str) -> (bool, Reply);
    /// Answers without running: the transaction could not begin.
    fn refuse(self: Box<Self>, error: StoreError);
}

struct TypedJob<T, W, A> {
    work: W,
    answer: A,
    output: PhantomData<fn() -> T>,
}

impl<T, W, A> Job for TypedJob<T, W, A>
where
    T: Send + 'static,
    W: FnOnce(&Connection, &str) -> Result<T, StoreError> + Send,
    A: FnOnce(Result<T, StoreError>) + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection, now: &str) -> (bool, Reply) {
        let TypedJob { work, answer, .. } = *self;
        let result = work(conn, now);
        let succeeded = result.is_ok();
        (
            succeeded,
            Box::new(move |committed| answer(committed.and(result))),
        )
    }

    fn refuse(self: Box<Self>, error: StoreError) {
        (self.answer)(Err(error));
    }
}

pub struct WriteRequest {
    commit: Commit,
    job: Box<dyn Job>,
}

impl WriteRequest {
    /// `answer` gets the write's result, or the transaction's error, once
    /// the transaction has ended.
    pub fn new<T: Send + 'static>(
        commit: Commit,
        work: impl FnOnce(&Connection, &str) -> Result<T, StoreError> + Send + 'static,
        answer: impl FnOnce(Result<T, StoreError>) + Send + 'static,
    ) -> WriteRequest {
        WriteRequest {
            commit,
            job: Box::new(TypedJob {
                work,
                answer,
                output: PhantomData,
            }),
        }
    }
}

/// What the writer thread receives.
pub enum Request {
    Write(WriteRequest),
    /// Finish what came before, then stop; handles still held elsewhere
    /// (a delivery worker that outlives shutdown) get errors, not a hang.
    Stop,
}

pub fn spawn(
    conn: Connection,
    requests: Receiver<Request>,
    stats: Arc<StoreStats>,
) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(conn, requests, stats))
        .map_err(|e| StoreError::new(format!("cannot start the store's writer thread: {e}")))
}

fn run(mut conn: Connection, requests: Receiver<Request>, stats: Arc<StoreStats>) {
    let mut stopping = false;
    let mut durability = Durability::new(&conn);
    let mut last_maintenance = Instant::now();
    while !stopping {
        if last_maintenance.elapsed() >= MAINTENANCE_INTERVAL {
            reclaim_space(&conn);
            last_maintenance = Instant::now();
        }
        let first = match requests.recv_timeout(durability.wait()) {
            Ok(Request::Write(request)) => request,
            Err(RecvTimeoutError::Timeout) => {
                durability.sync_now(&stats);
                continue;
            }
            Ok(Request::Stop) | Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(Request::Write(request)) => batch.push(request),
                Ok(Request::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, batch, &stats, &mut durability);
    }
    durability.sync_now(&stats);
}

/// Gives freed pages back to the filesystem (auto_vacuum=INCREMENTAL), a
/// step at a time, and cuts the WAL back once idle, so queue.db does not
/// stay at its peak size after a burst drains.
fn reclaim_space(conn: &Connection) {
    let free: i64 = match conn.query_row("PRAGMA freelist_count", [], |row| row.get(0)) {
        Ok(free) => free,
        Err(error) => {
            log::warn!("store: cannot read the free page count: {error}");
            return;
        }
    };
    if free <= FREE_PAGES_KEPT {
        return;
    }
    // The pragma frees one page per step of the statement: it must be
    // stepped to the end (execute_batch stops after the first).
    let step = format!("PRAGMA incremental_vacuum({PAGES_PER_STEP})");
    let vacuumed = conn.prepare(&step).and_then(|mut statement| {
        let mut rows = statement.query([])?;
        while rows.next()?.is_some() {}
        Ok(())
    });
    if let Err(error) = vacuumed {
        log::warn!("store: incremental vacuum failed: {error}");
        return;
    }
    // Readers may hold the WAL; a checkpoint that cannot finish now is
    // simply tried again next time.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

/// Runs one request inside a savepoint, so its failure undoes only its own
/// writes. The savepoint statements are prepared once (SQLite would parse
/// them anew for every request otherwise).
fn in_savepoint(conn: &Connection, job: Box<dyn Job>, now: &str) -> (bool, Reply) {
    let run = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut statement| statement.execute([]))
            .map(|_| ())
    };
    if let Err(error) = run("SAVEPOINT request") {
        job.refuse(StoreError::new(format!("cannot open savepoint: {error}")));
        return (false, Box::new(|_| {}));
    }
    let (succeeded, reply) = job.run(conn, now);
    if succeeded {
        match run("RELEASE request") {
            Ok(()) => return (true, reply),
            Err(error) => {
                let error = StoreError::new(format!("cannot release savepoint: {error}"));
                let _ = run("ROLLBACK TO request");
                let _ = run("RELEASE request");
                return (false, Box::new(move |_| reply(Err(error))));
            }
        }
    }
    let _ = run("ROLLBACK TO request");
    let _ = run("RELEASE request");
    (false, reply)
}

/// How long a delivery's outcome may stay written but unsynced: after
/// this, the next commit is durable whatever it holds, or the WAL is synced
/// on its own when nothing comes.
const SYNC_WITHIN: Duration = Duration::from_millis(200);

/// Which commits wait for the disk. New mail always does: the 250 promises
/// it. Claims and delivery outcomes need not: a claim lost to a power cut
/// leaves its recipients queued (what startup makes of claimed ones
/// anyway), and a lost outcome means the message is delivered again, never
/// lost. Under load they were two commits in three, each waiting for an
/// fsync while sessions waited behind it. They are written to the WAL at
/// once and reach the disk with the next durable commit (the WAL is one
/// file, synced whole), or after [`SYNC_WITHIN`] at the latest.
struct Durability {
    /// As last set on the connection; `None`: unknown (not set yet, or
    /// setting it failed), set before the next commit.
    setting: Option<SyncSetting>,
    /// Since when a commit has been waiting for a sync.
    unsynced_since: Option<Instant>,
    /// The last direct sync failed: wait no more for one, the next commit
    /// is durable.
    sync_failed: bool,
    /// The WAL, synced directly when the writer is idle.
    wal: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncSetting {
    /// `synchronous = FULL`: the WAL is synced before the commit returns.
    Durable,
    /// `synchronous = NORMAL`: written to the WAL, synced later.
    Deferred,
}

impl Durability {
    fn new(conn: &Connection) -> Durability {
        Durability {
            setting: None,
            unsynced_since: None,
            sync_failed: false,
            wal: conn
                .path()
                .filter(|path| !path.is_empty())
                .map(|path| format!("{path}-wal").into()),
        }
    }

    fn for_batch(&self, commits: impl IntoIterator<Item = Commit>) -> SyncSetting {
        let overdue = self
            .unsynced_since
            .is_some_and(|since| since.elapsed() >= SYNC_WITHIN);
        if !overdue
            && commits
                .into_iter()
                .all(|commit| commit == Commit::Deferrable)
        {
            SyncSetting::Deferred
        } else {
            SyncSetting::Durable
        }
    }

    /// Sets `wanted` on the connection, before the transaction: a commit
    /// that must be durable never runs on a setting we are unsure of.
    fn set(&mut self, conn: &Connection, wanted: SyncSetting) -> Result<(), StoreError> {
        if self.setting == Some(wanted) {
            return Ok(());
        }
        self.setting = None;
        let pragma = match wanted {
            SyncSetting::Durable => "PRAGMA synchronous = FULL",
            SyncSetting::Deferred => "PRAGMA synchronous = NORMAL",
        };
        conn.prepare_cached(pragma)
            .and_then(|mut statement| statement.execute([]))
            .map_err(StoreError::sqlite("cannot set the commit's durability"))?;
        self.setting = Some(wanted);
        Ok(())
    }

    fn committed(&mut self, setting: SyncSetting) {
        match setting {
            SyncSetting::Durable => {
                self.unsynced_since = None;
                self.sync_failed = false;
            }
            SyncSetting::Deferred => {
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// How long the writer may wait for a request before syncing.
    fn wait(&self) -> Duration {
        match self.unsynced_since {
            Some(since) if !self.sync_failed => SYNC_WITHIN.saturating_sub(since.elapsed()),
            _ => MAINTENANCE_INTERVAL,
        }
    }

    /// Syncs the WAL if a commit waits for it, counted in `stats`. On
    /// failure the next commit is durable (the wait is over), which syncs
    /// it all the same.
    fn sync_now(&mut self, stats: &StoreStats) {
        if self.unsynced_since.is_none() || self.sync_failed {
            return;
        }
        let Some(wal) = &self.wal else {
            self.sync_failed = true;
            return;
        };
        match std::fs::File::open(wal).and_then(|file| file.sync_data()) {
            Ok(()) => {
                self.unsynced_since = None;
                stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
            }
            // No WAL: a checkpoint moved it all into the database, syncing
            // both first.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                self.unsynced_since = None;
            }
            Err(error) => {
                log::warn!("store: cannot sync {}: {error}", wal.display());
                self.sync_failed = true;
            }
        }
    }
}

fn commit_batch(
    conn: &mut Connection,
    batch: Vec<WriteRequest>,
    stats: &StoreStats,
    durability: &mut Durability,
) {
    let refuse_all = |batch: Vec<WriteRequest>, error: StoreError| {
        log::error!("store: {error}");
        for request in batch {
            request.job.refuse(StoreError::new(error.to_string()));
        }
    };
    let setting = durability.for_batch(batch.iter().map(|request| request.commit));
    if let Err(error) = durability.set(conn, setting) {
        return refuse_all(batch, error);
    }
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            return refuse_all(
                batch,
                StoreError::new(format!("cannot begin transaction: {e}")),
            );
        }
    };
    let now = sql_timestamp(SystemTime::now());
    let mut replies = Vec::with_capacity(batch.len());
    let mut inserted = 0u64;
    for request in batch {
        let (succeeded, reply) = in_savepoint(&tx, request.job, &now);
        if succeeded && request.commit == Commit::NewMail {
            inserted += 1;
        }
        replies.push(reply);
    }
    if let Err(e) = tx.commit() {
        let error = StoreError::new(format!("commit failed: {e}"));
        log::error!("store: {error}");
        for reply in replies {
            reply(Err(StoreError::new(error.to_string())));
        }
        return;
    }
    durability.committed(setting);
    stats.commits.fetch_add(1, Ordering::Relaxed);
    if setting == SyncSetting::Durable {
        stats.synced_commits.fetch_add(1, Ordering::Relaxed);
    }
    if inserted > 0 {
        stats.insert_commits.fetch_add(1, Ordering::Relaxed);
        stats.messages.fetch_add(inserted, Ordering::Relaxed);
    }
    for reply in replies {
        reply(Ok(()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    fn pages(conn: &Connection, pragma: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
            .unwrap()
    }

    /// Polls a counter: the writer syncs on its own schedule.
    fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn execute(sql: &'static str) -> impl FnOnce(&Connection, &str) -> Result<(), StoreError> {
        move |conn, _| {
            conn.execute(sql, [])
                .map(|_| ())
                .map_err(StoreError::sqlite(sql))
        }
    }

    #[test]
    fn deferrable_writes_commit_without_waiting_for_the_disk_and_are_synced_soon_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::open(dir.path()).unwrap();
        let handle = store.handle();
        let stats = handle.stats();
        handle
            .write(Commit::Durable, execute("CREATE TABLE t (x)"))
            .unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (1, 1));
        handle
            .write(Commit::Deferrable, execute("INSERT INTO t VALUES (1)"))
            .unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (2, 1));
        wait_until("the WAL sync", || stats.wal_syncs() == 1);
        handle
            .write(Commit::Durable, execute("INSERT INTO t VALUES (2)"))
            .unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (3, 2));
        assert_eq!(stats.messages(), 0);
        store.close();
    }

    #[test]
    fn a_failed_write_undoes_only_its_own_rows_and_each_gets_its_answer_after_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_direct(dir.path()).unwrap();
        conn.execute("CREATE TABLE t (x)", []).unwrap();
        let (answers, answered) = crossbeam_channel::unbounded();
        let request = |rows: &'static str, fail: bool| {
            let answers = answers.clone();
            WriteRequest::new(
                Commit::NewMail,
                move |conn: &Connection, _: &str| {
                    conn.execute(rows, []).map_err(StoreError::sqlite(rows))?;
                    if fail {
                        return Err(StoreError::new("refused"));
                    }
                    Ok(rows)
                },
                move |result: Result<&'static str, StoreError>| {
                    answers.send(result.map_err(|e| e.to_string())).unwrap()
                },
            )
        };
        let batch = vec![
            request("INSERT INTO t VALUES (1)", false),
            request("INSERT INTO t VALUES (2), (3)", true),
            request("INSERT INTO t VALUES (4)", false),
        ];
        let stats = StoreStats::default();
        let mut durability = Durability::new(&conn);
        commit_batch(&mut conn, batch, &stats, &mut durability);
        let answers: Vec<_> = answered.try_iter().collect();
        assert_eq!(
            answers,
            [
                Ok("INSERT INTO t VALUES (1)"),
                Err("refused".to_string()),
                Ok("INSERT INTO t VALUES (4)")
            ]
        );
        let rows: Vec<i64> = conn
            .prepare("SELECT x FROM t ORDER BY x")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [1, 4]);
        assert_eq!(
            (stats.commits(), stats.insert_commits(), stats.messages()),
            (1, 1, 2)
        );
    }

    #[test]
    fn only_batches_of_claims_and_outcomes_defer_their_sync_and_never_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_direct(dir.path()).unwrap();
        let mut durability = Durability::new(&conn);
        let claim = || Commit::Deferrable;
        let requeue = || Commit::Durable;
        assert_eq!(
            durability.for_batch([claim(), claim()]),
            SyncSetting::Deferred
        );
        assert_eq!(
            durability.for_batch([claim(), requeue()]),
            SyncSetting::Durable
        );
        durability.committed(SyncSetting::Deferred);
        assert!(durability.wait() <= SYNC_WITHIN);
        assert_eq!(durability.for_batch([claim()]), SyncSetting::Deferred);
        // Waited long enough: the next commit syncs, whatever it holds.
        durability.unsynced_since = Instant::now().checked_sub(SYNC_WITHIN);
        assert_eq!(durability.wait(), Duration::ZERO);
        assert_eq!(durability.for_batch([claim()]), SyncSetting::Durable);
        durability.committed(SyncSetting::Durable);
        assert_eq!(durability.wait(), MAINTENANCE_INTERVAL);
        // The setting on the connection follows.
        let synchronous = || -> i64 {
            conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap()
        };
        durability.set(&conn, SyncSetting::Deferred).unwrap();
        assert_eq!(synchronous(), 1, "NORMAL");
        durability.set(&conn, SyncSetting::Durable).unwrap();
        assert_eq!(synchronous(), 2, "FULL");
    }

    #[test]
    fn a_failed_wal_sync_makes_the_next_commit_durable_without_spinning() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_direct(dir.path()).unwrap();
        let mut durability = Durability::new(&conn);
        // Under a regular file: opening fails, and not as "no WAL".
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        durability.wal = Some(file.join("queue.db-wal"));
        durability.committed(SyncSetting::Deferred);
        durability.unsynced_since = Instant::now().checked_sub(SYNC_WITHIN);
        let stats = StoreStats::default();
        durability.sync_now(&stats);
        assert_eq!(stats.wal_syncs(), 0);
        assert_eq!(durability.wait(), MAINTENANCE_INTERVAL, "no busy loop");
        assert_eq!(
            durability.for_batch([Commit::Deferrable]),
            SyncSetting::Durable
        );
    }

    #[test]
    fn a_maintenance_step_gives_back_up_to_its_share_of_free_pages() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_direct(dir.path()).unwrap();
        // 16 MiB of content, then gone: 4,096 free pages of 4 KiB.
        let blob = vec![7u8; 1 << 20];
        for _ in 0..16 {
            conn.execute(
                "INSERT INTO message_contents (content) VALUES (?1)",
                params![blob],
            )
            .unwrap();
        }
        conn.execute("DELETE FROM message_contents", []).unwrap();
        let free = pages(&conn, "freelist_count");
        assert!(free > PAGES_PER_STEP, "{free} free pages");
        reclaim_space(&conn);
        assert_eq!(pages(&conn, "freelist_count"), free - PAGES_PER_STEP);
        reclaim_space(&conn);
        assert!(pages(&conn, "freelist_count") <= FREE_PAGES_KEPT);
    }
}
