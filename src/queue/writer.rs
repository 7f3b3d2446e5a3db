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
use crate::routing::Route;
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
    let mut last_maintenance = Instant::now();
    while !stopping {
        if last_maintenance.elapsed() >= MAINTENANCE_INTERVAL {
            reclaim_space(&conn);
            last_maintenance = Instant::now();
        }
        let first = match requests.recv_timeout(MAINTENANCE_INTERVAL) {
            Ok(Request::Write(request)) => request,
            Err(RecvTimeoutError::Timeout) => continue,
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
        let results = commit_batch(&mut conn, &batch, &stats);
        for (request, result) in batch.into_iter().zip(results) {
            // A session that gave up waiting is gone; nothing to tell it.
            let _ = request.done.send(result);
        }
    }
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

fn commit_batch(
    conn: &mut Connection,
    batch: &[WriteRequest],
    stats: &QueueStats,
) -> Vec<Result<WriteOutput, QueueError>> {
    let fail_all = |error: QueueError| {
        log::error!("queue: {error}");
        batch
            .iter()
            .map(|_| Err(QueueError::new(error.to_string())))
            .collect()
    };
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
    stats.commits.fetch_add(1, Ordering::Relaxed);
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

    fn pages(conn: &Connection, pragma: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
            .unwrap()
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
