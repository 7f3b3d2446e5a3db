//! The one thread that writes to the queue. Requests that arrive while a
//! commit is in progress are gathered into the next transaction, so many
//! sessions finishing at once share one fsync (group commit). Each request
//! runs inside its own savepoint: one failing write never fails the others.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{Connection, TransactionBehavior, params};

use super::delivery::{self, ClaimLimits, Claimed, DeliveryReport};
use super::{NewMessage, QueueError, QueueStats};
use crate::auth::accounts::{self, LoginEvent};
use crate::envelope::Route;
use crate::timefmt::sql_timestamp;

/// Sessions waiting to be committed; beyond this, senders wait, which is
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

pub enum WriteOp {
    Insert(Box<NewMessage>),
    /// Take due recipients for delivery (see [`delivery::claim_due`]).
    Claim(ClaimLimits),
    Record(Box<DeliveryReport>),
    /// Put recipients stuck "delivering" back: these, or all when `None`;
    /// due at `retry_at` if given, else when they were due before.
    Requeue {
        ids: Option<Vec<i64>>,
        retry_at: Option<String>,
    },
    /// A destination's waiting recipients wait until `until`.
    BackOff {
        destination: String,
        until: String,
    },
    /// A login, for `petrel user list` (accounts live in this database).
    Login(Box<LoginEvent>),
    /// An MTA-STS policy just fetched, replacing its domain's.
    StorePolicy(Box<crate::mta_sts::Policy>),
}

pub enum WriteOutput {
    Done,
    Claimed(Claimed),
    Count(usize),
}

pub struct WriteRequest {
    pub op: WriteOp,
    pub done: Sender<Result<WriteOutput, QueueError>>,
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
    stats: Arc<QueueStats>,
) -> Result<JoinHandle<()>, QueueError> {
    std::thread::Builder::new()
        .name("queue-writer".into())
        .spawn(move || run(conn, requests, stats))
        .map_err(|e| QueueError::new(format!("cannot start queue writer thread: {e}")))
}

fn run(mut conn: Connection, requests: Receiver<Request>, stats: Arc<QueueStats>) {
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
        let results = commit_batch(&mut conn, &batch, &stats, &mut durability);
        for (request, result) in batch.into_iter().zip(results) {
            // A session that gave up waiting is gone; nothing to tell it.
            let _ = request.done.send(result);
        }
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
            log::warn!("queue: cannot read the free page count: {error}");
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
        log::warn!("queue: incremental vacuum failed: {error}");
        return;
    }
    // Readers may hold the WAL; a checkpoint that cannot finish now is
    // simply tried again next time.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

/// Runs one request inside a savepoint, so its failure undoes only its own
/// writes. The savepoint statements are prepared once (SQLite would parse
/// them anew for every request otherwise).
fn in_savepoint(
    conn: &Connection,
    work: impl FnOnce() -> Result<WriteOutput, QueueError>,
) -> Result<WriteOutput, QueueError> {
    let run = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut statement| statement.execute([]))
            .map(|_| ())
    };
    run("SAVEPOINT request").map_err(QueueError::sqlite("cannot open savepoint"))?;
    match work() {
        Ok(output) => {
            run("RELEASE request").map_err(QueueError::sqlite("cannot release savepoint"))?;
            Ok(output)
        }
        Err(error) => {
            let _ = run("ROLLBACK TO request");
            let _ = run("RELEASE request");
            Err(error)
        }
    }
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

    fn for_batch(&self, batch: &[WriteRequest]) -> SyncSetting {
        let deferrable = |op: &WriteOp| matches!(op, WriteOp::Claim(_) | WriteOp::Record(_));
        let overdue = self
            .unsynced_since
            .is_some_and(|since| since.elapsed() >= SYNC_WITHIN);
        if !overdue && batch.iter().all(|request| deferrable(&request.op)) {
            SyncSetting::Deferred
        } else {
            SyncSetting::Durable
        }
    }

    /// Sets `wanted` on the connection, before the transaction: a commit
    /// that must be durable never runs on a setting we are unsure of.
    fn set(&mut self, conn: &Connection, wanted: SyncSetting) -> Result<(), QueueError> {
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
            .map_err(QueueError::sqlite("cannot set the commit's durability"))?;
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
    fn sync_now(&mut self, stats: &QueueStats) {
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
                log::warn!("queue: cannot sync {}: {error}", wal.display());
                self.sync_failed = true;
            }
        }
    }
}

fn commit_batch(
    conn: &mut Connection,
    batch: &[WriteRequest],
    stats: &QueueStats,
    durability: &mut Durability,
) -> Vec<Result<WriteOutput, QueueError>> {
    let fail_all = |error: QueueError| {
        log::error!("queue: {error}");
        batch
            .iter()
            .map(|_| Err(QueueError::new(error.to_string())))
            .collect()
    };
    let setting = durability.for_batch(batch);
    if let Err(error) = durability.set(conn, setting) {
        return fail_all(error);
    }
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(QueueError::new(format!("cannot begin transaction: {e}"))),
    };
    let now = sql_timestamp(SystemTime::now());
    let mut results = Vec::with_capacity(batch.len());
    let mut inserted = 0u64;
    for request in batch {
        let result = in_savepoint(&tx, || apply(&tx, &request.op, &now));
        if result.is_ok() && matches!(request.op, WriteOp::Insert(_)) {
            inserted += 1;
        }
        results.push(result);
    }
    if let Err(e) = tx.commit() {
        return fail_all(QueueError::new(format!("commit failed: {e}")));
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
    results
}

fn apply(conn: &Connection, op: &WriteOp, now: &str) -> Result<WriteOutput, QueueError> {
    match op {
        WriteOp::Insert(message) => insert_message(conn, message, now).map(|()| WriteOutput::Done),
        WriteOp::Claim(limits) => delivery::claim_due(conn, now, limits).map(WriteOutput::Claimed),
        WriteOp::Record(report) => delivery::record(conn, report, now).map(|()| WriteOutput::Done),
        WriteOp::BackOff { destination, until } => {
            delivery::back_off(conn, destination, until, now).map(WriteOutput::Count)
        }
        WriteOp::Login(event) => accounts::record(conn, event, now)
            .map(|()| WriteOutput::Done)
            .map_err(QueueError::sqlite("cannot record a login")),
        WriteOp::StorePolicy(policy) => {
            crate::mta_sts::store(conn, policy, now).map(|()| WriteOutput::Done)
        }
        WriteOp::Requeue { ids, retry_at } => {
            delivery::requeue(conn, ids.as_deref(), now, retry_at.as_deref())
                .map(WriteOutput::Count)
        }
    }
}

pub fn insert_message(
    conn: &Connection,
    message: &NewMessage,
    now: &str,
) -> Result<(), QueueError> {
    let id = message.id.as_str();
    if message.recipients.is_empty() {
        return Err(QueueError::new(format!("{id}: message has no recipients")));
    }
    let content_id = super::content::store(conn, id, &message.content)?;
    conn.prepare_cached(
        "INSERT INTO messages (id, received_at, sender, kind, listener, client_ip, helo, auth_user,
                               eight_bit, smtputf8, size, dsn_ret, dsn_envid, content_id,
                               auth_label)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )
    .and_then(|mut insert| {
        insert.execute(params![
            id,
            now,
            message.sender,
            message.kind.as_str(),
            message.listener,
            message.client_ip.map(|ip| ip.to_string()),
            message.helo,
            message.auth_user,
            message.eight_bit,
            message.smtputf8,
            message.content.len() as i64,
            message.ret.map(|r| r.as_str()),
            message.envid,
            content_id,
            message.auth_label,
        ])
    })
    .map_err(QueueError::sqlite(format!("{id}: cannot insert message")))?;
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO recipients (message_id, address, original_address, status,
                                     next_attempt_at, updated_at, route, mailbox, domain,
                                     notify, orcpt)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(QueueError::sqlite("cannot prepare recipient insert"))?;
    for recipient in &message.recipients {
        let mailbox = match &recipient.route {
            Route::Local { mailbox } => Some(mailbox.as_str()),
            _ => None,
        };
        insert
            .execute(params![
                id,
                recipient.address,
                recipient.original,
                now,
                recipient.route.kind(),
                mailbox,
                recipient.domain,
                recipient.notify.map(|n| n.to_param()),
                recipient.orcpt,
            ])
            .map_err(QueueError::sqlite(format!("{id}: cannot insert recipient")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::delivery::ClaimLimits;

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

    #[test]
    fn claims_commit_without_waiting_for_the_disk_and_are_synced_soon_after() {
        let dir = tempfile::tempdir().unwrap();
        let queue = crate::queue::Queue::open(dir.path()).unwrap();
        let handle = queue.handle();
        let stats = handle.stats();
        handle.requeue_all().unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (1, 1));
        handle.claim_due(ClaimLimits::rows(10)).unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (2, 1));
        wait_until("the WAL sync", || stats.wal_syncs() == 1);
        // Anything but claims and outcomes waits for the disk again.
        handle.requeue_all().unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (3, 2));
        queue.close();
    }

    fn request(op: WriteOp) -> WriteRequest {
        WriteRequest {
            op,
            done: crossbeam_channel::bounded(1).0,
        }
    }

    #[test]
    fn only_batches_of_claims_and_outcomes_defer_their_sync_and_never_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::queue::open_direct(dir.path()).unwrap();
        let mut durability = Durability::new(&conn);
        let claim = || request(WriteOp::Claim(ClaimLimits::rows(1)));
        let requeue = || {
            request(WriteOp::Requeue {
                ids: None,
                retry_at: None,
            })
        };
        assert_eq!(
            durability.for_batch(&[claim(), claim()]),
            SyncSetting::Deferred
        );
        assert_eq!(
            durability.for_batch(&[claim(), requeue()]),
            SyncSetting::Durable
        );
        durability.committed(SyncSetting::Deferred);
        assert!(durability.wait() <= SYNC_WITHIN);
        assert_eq!(durability.for_batch(&[claim()]), SyncSetting::Deferred);
        // Waited long enough: the next commit syncs, whatever it holds.
        durability.unsynced_since = Instant::now().checked_sub(SYNC_WITHIN);
        assert_eq!(durability.wait(), Duration::ZERO);
        assert_eq!(durability.for_batch(&[claim()]), SyncSetting::Durable);
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
        let conn = crate::queue::open_direct(dir.path()).unwrap();
        let mut durability = Durability::new(&conn);
        // Under a regular file: opening fails, and not as "no WAL".
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        durability.wal = Some(file.join("queue.db-wal"));
        durability.committed(SyncSetting::Deferred);
        durability.unsynced_since = Instant::now().checked_sub(SYNC_WITHIN);
        let stats = QueueStats::default();
        durability.sync_now(&stats);
        assert_eq!(stats.wal_syncs(), 0);
        assert_eq!(durability.wait(), MAINTENANCE_INTERVAL, "no busy loop");
        let claim = request(WriteOp::Claim(ClaimLimits::rows(1)));
        assert_eq!(durability.for_batch(&[claim]), SyncSetting::Durable);
    }

    #[test]
    fn a_maintenance_step_gives_back_up_to_its_share_of_free_pages() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::queue::open_direct(dir.path()).unwrap();
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
