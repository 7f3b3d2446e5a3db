//! The durable queue: messages, their recipients and delivery state, in
//! the store's database (see [`crate::store`]).
//!
//! Owns the queue's SQL; every write goes through the store's writer, which
//! commits many together (group commit). It must never report a message as
//! stored before its transaction is committed on disk.

pub mod content;
pub mod delivery;
mod id;
pub mod views;

use std::net::IpAddr;
use std::path::Path;

use rusqlite::{Connection, params};

use crate::envelope::Route;
use crate::protocol::dsn::{Notify, Ret};
use crate::store::{Commit, Store, StoreError, StoreHandle, StoreStats};
use delivery::{ClaimLimits, Claimed, DeliveryReport};
pub use id::QueueId;

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
    /// Why a content filter held it: stored, and not delivered until an
    /// operator releases it (`petrel queue release`).
    pub quarantine: Option<String>,
}

/// When the recipients of a quarantined message are due: never, until
/// released (a time no retry or back-off reaches).
pub const HELD_UNTIL: &str = "9999-12-31 23:59:59";

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

/// A cheap, clonable handle for the queue's writes and reads.
#[derive(Clone)]
pub struct QueueHandle {
    store: StoreHandle,
}

impl QueueHandle {
    /// The queue in `store`.
    pub fn new(store: StoreHandle) -> QueueHandle {
        QueueHandle { store }
    }

    /// Commits the message and returns only once it is on disk.
    pub fn insert(&self, message: NewMessage) -> Result<(), StoreError> {
        self.store.write(Commit::NewMail, move |conn, now| {
            insert_message(conn, &message, now)
        })
    }

    /// Marks the `rows` recipients due longest, and the other due
    /// recipients of their messages, as being delivered, leaving out the
    /// destinations in `skip`. A claim lost in a power cut leaves its
    /// recipients queued, what startup makes of claimed ones anyway: it
    /// need not wait for the disk.
    pub fn claim_due(&self, limits: ClaimLimits) -> Result<Claimed, StoreError> {
        self.store.write(Commit::Deferrable, move |conn, now| {
            delivery::claim_due(conn, now, &limits)
        })
    }

    /// Records a delivery attempt's outcome. Lost in a power cut, the
    /// message is delivered again, never lost: it need not wait for the
    /// disk.
    pub fn record(&self, report: DeliveryReport) -> Result<(), StoreError> {
        self.store.write(Commit::Deferrable, move |conn, now| {
            delivery::record(conn, &report, now)
        })
    }

    /// Puts every in-flight recipient back in the queue (crash recovery).
    pub fn requeue_all(&self) -> Result<usize, StoreError> {
        self.requeue_with(None, None)
    }

    /// Puts these in-flight recipients back, due at `retry_at`.
    pub fn requeue_at(
        &self,
        ids: Vec<i64>,
        retry_at: std::time::SystemTime,
    ) -> Result<usize, StoreError> {
        self.requeue_with(Some(ids), Some(crate::timefmt::sql_timestamp(retry_at)))
    }

    /// Puts claimed recipients back as they were (a job never started).
    pub fn requeue(&self, ids: Vec<i64>) -> Result<usize, StoreError> {
        self.requeue_with(Some(ids), None)
    }

    /// Every waiting recipient for `destination` (a
    /// [`crate::envelope::Route::key`]) due before `until` is
    /// put back to `until`; returns how many.
    pub fn back_off(
        &self,
        destination: String,
        until: std::time::SystemTime,
    ) -> Result<usize, StoreError> {
        let until = crate::timefmt::sql_timestamp(until);
        self.store.write(Commit::Durable, move |conn, now| {
            delivery::back_off(conn, &destination, &until, now)
        })
    }

    /// Puts recipients stuck "delivering" back: these, or all when `None`;
    /// due at `retry_at` if given, else when they were due before.
    fn requeue_with(
        &self,
        ids: Option<Vec<i64>>,
        retry_at: Option<String>,
    ) -> Result<usize, StoreError> {
        self.store.write(Commit::Durable, move |conn, now| {
            delivery::requeue(conn, ids.as_deref(), now, retry_at.as_deref())
        })
    }

    pub fn stats(&self) -> &StoreStats {
        self.store.stats()
    }

    /// A new read connection, for queries that must not wait on the writer.
    pub fn reader(&self) -> Result<Connection, StoreError> {
        self.store.reader()
    }

    /// The store the queue lives in.
    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }
}

/// The queue with a store of its own. Dropping every handle and calling
/// [`Queue::close`] lets the store's writer finish what it was given and
/// stop.
pub struct Queue {
    store: Store,
}

impl Queue {
    /// Opens the store in `data_dir`, migrating it, after clearing the
    /// spool of messages never acknowledged.
    pub fn open(data_dir: &Path) -> Result<Queue, StoreError> {
        crate::store::data_dir::create(data_dir)?;
        match content::clear_spool(data_dir) {
            Ok(0) => {}
            Ok(n) => log::info!("queue: removed {n} spool files of messages never acknowledged"),
            Err(error) => log::warn!("queue: cannot clear the spool: {error}"),
        }
        Ok(Queue {
            store: Store::open(data_dir)?,
        })
    }

    pub fn handle(&self) -> QueueHandle {
        QueueHandle::new(self.store.handle())
    }

    /// Lets the writer finish every request sent before this call, then
    /// stops it; later requests through other handles get an error.
    pub fn close(self) {
        self.store.close();
    }
}

fn insert_message(conn: &Connection, message: &NewMessage, now: &str) -> Result<(), StoreError> {
    let id = message.id.as_str();
    if message.recipients.is_empty() {
        return Err(StoreError::new(format!("{id}: message has no recipients")));
    }
    let content_id = content::store(conn, id, &message.content)?;
    conn.prepare_cached(
        "INSERT INTO messages (id, received_at, sender, kind, listener, client_ip, helo, auth_user,
                               eight_bit, smtputf8, size, dsn_ret, dsn_envid, content_id,
                               auth_label, quarantine)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
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
            message.quarantine,
        ])
    })
    .map_err(StoreError::sqlite(format!("{id}: cannot insert message")))?;
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO recipients (message_id, address, original_address, status,
                                     next_attempt_at, updated_at, route, mailbox, domain,
                                     notify, orcpt)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?10, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(StoreError::sqlite("cannot prepare recipient insert"))?;
    // Held in quarantine: never due until released.
    let due = if message.quarantine.is_some() {
        HELD_UNTIL
    } else {
        now
    };
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
                due,
                recipient.route.kind(),
                mailbox,
                recipient.domain,
                recipient.notify.map(|n| n.to_param()),
                recipient.orcpt,
                now,
            ])
            .map_err(StoreError::sqlite(format!("{id}: cannot insert recipient")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn claims_commit_without_waiting_for_the_disk_and_are_synced_soon_after() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path()).unwrap();
        let handle = queue.handle();
        let stats = handle.stats();
        handle.requeue_all().unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (1, 1));
        handle.claim_due(ClaimLimits::rows(10)).unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (2, 1));
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.wal_syncs() != 1 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the WAL sync"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Anything but claims and outcomes waits for the disk again.
        handle.requeue_all().unwrap();
        assert_eq!((stats.commits(), stats.synced_commits()), (3, 2));
        queue.close();
    }
}
