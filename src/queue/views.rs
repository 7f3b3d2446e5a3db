//! What the operator reads from the queue (`petrel queue list` and
//! `summary`), written to stay fast with a million recipients waiting: a
//! page of messages in queue id order, totals from an index alone, and the
//! queue's shape (waiting recipients per destination and age) without
//! reading any message content.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension as _, params};

use crate::store::StoreError;
use crate::timefmt::parse_sql_timestamp;

/// One waiting recipient, with its message, as `queue list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRecipient {
    pub message_id: String,
    pub size: i64,
    pub received_at: String,
    pub sender: String,
    pub address: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: String,
    pub last_reply: Option<String>,
}

impl ListedRecipient {
    /// Why it waits, in words.
    pub fn waiting(&self, now: SystemTime) -> String {
        let due = parse_sql_timestamp(&self.next_attempt_at).is_none_or(|at| at <= now);
        if self.next_attempt_at == super::HELD_UNTIL {
            return "quarantined: held until `petrel queue release`".into();
        }
        match (self.status.as_str(), due, self.attempts) {
            ("delivering", _, _) => "being delivered now".into(),
            (_, true, 0) => "new, due now".into(),
            (_, true, _) => "due now".into(),
            _ => format!("retry at {}", self.next_attempt_at),
        }
    }
}

/// Up to `limit` messages after `after` (a queue id; "" for the first
/// page), with their waiting recipients: the messages in primary key
/// order, then their recipients through the message index.
pub fn list_page(
    conn: &Connection,
    after: &str,
    limit: usize,
) -> Result<Vec<ListedRecipient>, StoreError> {
    let mut statement = conn
        .prepare_cached(
            "SELECT m.id, m.size, m.received_at, m.sender, r.address, r.status, r.attempts,
                    r.next_attempt_at, r.last_reply
             FROM (SELECT id, size, received_at, sender FROM messages
                   WHERE id > ?1 ORDER BY id LIMIT ?2) m
             JOIN recipients r ON r.message_id = m.id
             WHERE r.status IN ('queued', 'delivering')
             ORDER BY m.id, r.id",
        )
        .map_err(StoreError::sqlite("cannot list the queue"))?;
    let rows = statement
        .query_map(params![after, limit as i64], |row| {
            Ok(ListedRecipient {
                message_id: row.get(0)?,
                size: row.get(1)?,
                received_at: row.get(2)?,
                sender: row.get(3)?,
                address: row.get(4)?,
                status: row.get(5)?,
                attempts: row.get(6)?,
                next_attempt_at: row.get(7)?,
                last_reply: row.get(8)?,
            })
        })
        .map_err(StoreError::sqlite("cannot list the queue"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(StoreError::sqlite("cannot list the queue"))
}

/// Messages in the queue and recipients waiting, counted from indexes.
pub fn totals(conn: &Connection) -> Result<(i64, i64), StoreError> {
    let messages: i64 = conn
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .map_err(StoreError::sqlite("cannot count messages"))?;
    let recipients: i64 = conn
        .query_row(
            "SELECT count(*) FROM recipients WHERE status IN ('queued', 'delivering')",
            [],
            |r| r.get(0),
        )
        .map_err(StoreError::sqlite("cannot count recipients"))?;
    Ok((messages, recipients))
}

/// Age buckets of the queue's shape, as Postfix's qshape: upper bounds in
/// minutes since the message was received; one more bucket takes the rest.
pub const AGE_BUCKETS: [u32; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// Waiting recipients per destination and age bucket. The age comes from
/// the queue id, whose first 13 hex digits are the arrival time in
/// microseconds: comparing ids with the bucket limits' ids needs no look
/// at the messages table.
fn shape_sql(now: SystemTime) -> String {
    let mut bucket = String::from("CASE");
    for (n, minutes) in AGE_BUCKETS.iter().enumerate() {
        let at = now - std::time::Duration::from_secs(u64::from(*minutes) * 60);
        bucket.push_str(&format!(
            " WHEN message_id >= '{}' THEN {n}",
            super::QueueId::prefix_at(at)
        ));
    }
    bucket.push_str(&format!(" ELSE {} END", AGE_BUCKETS.len()));
    format!(
        "SELECT coalesce(destination, 'unrouted'), {bucket} AS bucket, count(*)
         FROM recipients
         WHERE status IN ('queued', 'delivering')
         GROUP BY 1, 2"
    )
}

/// One row of the shape: a destination, its total, then one count per
/// bucket of [`AGE_BUCKETS`] and one for older.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeRow {
    pub destination: String,
    pub total: i64,
    pub by_age: Vec<i64>,
}

/// The shape, busiest destination first.
pub fn shape(conn: &Connection, now: SystemTime) -> Result<Vec<ShapeRow>, StoreError> {
    let mut statement = conn
        .prepare(&shape_sql(now))
        .map_err(StoreError::sqlite("cannot read the queue's shape"))?;
    let cells = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .map_err(StoreError::sqlite("cannot read the queue's shape"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(StoreError::sqlite("cannot read the queue's shape"))?;
    let mut rows: Vec<ShapeRow> = Vec::new();
    for (destination, bucket, count) in cells {
        let index = usize::try_from(bucket).unwrap_or(0).min(AGE_BUCKETS.len());
        let row = match rows.iter_mut().position(|r| r.destination == destination) {
            Some(at) => &mut rows[at],
            None => {
                rows.push(ShapeRow {
                    destination,
                    total: 0,
                    by_age: vec![0; AGE_BUCKETS.len() + 1],
                });
                let last = rows.len() - 1;
                &mut rows[last]
            }
        };
        row.total += count;
        row.by_age[index] += count;
    }
    rows.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then(a.destination.cmp(&b.destination))
    });
    Ok(rows)
}
/// Where a message came from, as `queue show` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageOrigin {
    pub received: String,
    pub listener: String,
    pub client: Option<String>,
    pub helo: Option<String>,
    pub user: Option<String>,
    /// The app password `user` logged in with.
    pub app_password: Option<String>,
    /// Why a content filter holds it, if one does.
    pub quarantine: Option<String>,
}

/// `None`: no message `id` in the queue.
pub fn origin(conn: &Connection, id: &str) -> Result<Option<MessageOrigin>, StoreError> {
    conn.query_row(
        "SELECT received_at, listener, client_ip, helo, auth_user, auth_label, quarantine
         FROM messages WHERE id = ?1",
        [id],
        |row| {
            Ok(MessageOrigin {
                received: row.get(0)?,
                listener: row.get(1)?,
                client: row.get(2)?,
                helo: row.get(3)?,
                user: row.get(4)?,
                app_password: row.get(5)?,
                quarantine: row.get(6)?,
            })
        },
    )
    .optional()
    .map_err(StoreError::sqlite(format!("{id}: cannot read the message")))
}

/// A recipient of a message and where its delivery stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientState {
    pub address: String,
    /// The RCPT TO address an alias turned into `address`.
    pub original: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub next: String,
    pub last: Option<String>,
    pub reply: Option<String>,
    pub relay: Option<String>,
}

/// Every recipient of message `id`, in the order they were given.
pub fn recipients_of(conn: &Connection, id: &str) -> Result<Vec<RecipientState>, StoreError> {
    let context = || format!("{id}: cannot read the recipients");
    let mut statement = conn
        .prepare(
            "SELECT address, original_address, status, attempts, next_attempt_at, last_attempt_at,
                    last_reply, relay
             FROM recipients WHERE message_id = ?1 ORDER BY id",
        )
        .map_err(StoreError::sqlite(context()))?;
    let rows = statement
        .query_map([id], |row| {
            Ok(RecipientState {
                address: row.get(0)?,
                original: row.get(1)?,
                status: row.get(2)?,
                attempts: row.get(3)?,
                next: row.get(4)?,
                last: row.get(5)?,
                reply: row.get(6)?,
                relay: row.get(7)?,
            })
        })
        .map_err(StoreError::sqlite(context()))?;
    rows.collect::<Result<_, _>>()
        .map_err(StoreError::sqlite(context()))
}
