//! The queue side of delivery: claiming due recipients, recording attempt
//! outcomes (with any bounce or delay notice in the same transaction, so a
//! notice is never lost nor sent twice), crash recovery and the operator's
//! actions. Plain functions over a connection: the writer thread runs them
//! for the server, the CLI runs them directly.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use super::writer::insert_message;
use super::{MessageKind, NewMessage, QueueError};
use crate::timefmt::{parse_sql_timestamp, sql_timestamp};

/// A recipient taken by the scheduler for one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRecipient {
    pub id: i64,
    pub message_id: String,
    pub address: String,
    pub original: Option<String>,
    /// Attempts before this one.
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientStatus {
    Sent,
    Deferred { next_attempt: SystemTime },
    Bounced,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientUpdate {
    pub recipient_id: i64,
    pub status: RecipientStatus,
    /// The remote reply, or why we could not get one.
    pub reply: String,
    /// host[ip]:port, or "local".
    pub relay: Option<String>,
}

/// Everything one delivery attempt changes, committed together.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    pub message_id: String,
    pub updates: Vec<RecipientUpdate>,
    /// Bounces and delay warnings to queue.
    pub notices: Vec<NewMessage>,
    pub delay_warning_sent: bool,
}

/// What a worker needs to know about a message.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub id: String,
    pub sender: String,
    pub kind: MessageKind,
    pub received_at: SystemTime,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub delay_warning_sent: bool,
    pub content: Vec<u8>,
}

fn kind_from(text: &str) -> MessageKind {
    match text {
        "bounce" => MessageKind::Bounce,
        "delay_warning" => MessageKind::DelayWarning,
        _ => MessageKind::Normal,
    }
}

fn claimed_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ClaimedRecipient> {
    Ok(ClaimedRecipient {
        id: row.get(0)?,
        message_id: row.get(1)?,
        address: row.get(2)?,
        original: row.get(3)?,
        attempts: row.get(4)?,
    })
}

/// Marks the due recipients of up to `messages` messages (those due
/// longest first) as being delivered and returns them. Claiming whole
/// messages keeps one message's recipients at one domain in one job.
pub fn claim_due(
    conn: &Connection,
    now: &str,
    messages: usize,
) -> Result<Vec<ClaimedRecipient>, QueueError> {
    let mut statement = conn
        .prepare_cached(
            "UPDATE recipients SET status = 'delivering', updated_at = ?1
             WHERE status = 'queued' AND next_attempt_at <= ?1
               AND message_id IN (SELECT message_id FROM recipients
                                  WHERE status = 'queued' AND next_attempt_at <= ?1
                                  GROUP BY message_id
                                  ORDER BY min(next_attempt_at), message_id LIMIT ?2)
             RETURNING id, message_id, address, original_address, attempts",
        )
        .map_err(QueueError::sqlite("cannot prepare claim"))?;
    let rows = statement
        .query_map(params![now, messages as i64], claimed_from_row)
        .map_err(QueueError::sqlite("cannot claim recipients"))?;
    let mut claimed = rows
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(QueueError::sqlite("cannot claim recipients"))?;
    claimed.sort_by_key(|r| r.id);
    Ok(claimed)
}

/// Applies one attempt's outcome. Updates only recipients still marked as
/// being delivered, so an operator's `queue delete` or `bounce` meanwhile wins.
pub fn record(conn: &Connection, report: &DeliveryReport, now: &str) -> Result<(), QueueError> {
    let mut update = conn
        .prepare_cached(
            "UPDATE recipients
             SET status = ?2, attempts = attempts + 1, last_attempt_at = ?3,
                 next_attempt_at = ?4, last_reply = ?5, relay = ?6, updated_at = ?3
             WHERE id = ?1 AND status = 'delivering'",
        )
        .map_err(QueueError::sqlite("cannot prepare recipient update"))?;
    for change in &report.updates {
        let (status, next) = match &change.status {
            RecipientStatus::Sent => ("sent", now.to_string()),
            RecipientStatus::Bounced => ("bounced", now.to_string()),
            RecipientStatus::Deferred { next_attempt } => ("queued", sql_timestamp(*next_attempt)),
        };
        update
            .execute(params![
                change.recipient_id,
                status,
                now,
                next,
                change.reply,
                change.relay
            ])
            .map_err(QueueError::sqlite(format!(
                "{}: cannot record attempt",
                report.message_id
            )))?;
    }
    for notice in &report.notices {
        insert_message(conn, notice, now)?;
    }
    if report.delay_warning_sent {
        conn.execute(
            "UPDATE messages SET delay_warning_sent_at = ?2 WHERE id = ?1",
            params![report.message_id, now],
        )
        .map_err(QueueError::sqlite("cannot mark delay warning"))?;
    }
    remove_if_finished(conn, &report.message_id)
}

/// A message leaves the queue once no recipient is waiting.
fn remove_if_finished(conn: &Connection, message_id: &str) -> Result<(), QueueError> {
    conn.execute(
        "DELETE FROM messages WHERE id = ?1 AND NOT EXISTS (
             SELECT 1 FROM recipients WHERE message_id = ?1 AND status IN ('queued', 'delivering'))",
        [message_id],
    )
    .map_err(QueueError::sqlite(format!("{message_id}: cannot remove finished message")))?;
    Ok(())
}

/// Puts recipients marked as being delivered back in the queue: all of them
/// at start-up (whatever was in flight when the server stopped), or the
/// given ones when a worker could not finish.
pub fn requeue(
    conn: &Connection,
    ids: Option<&[i64]>,
    now: &str,
    retry_at: Option<&str>,
) -> Result<usize, QueueError> {
    let mut statement = conn
        .prepare_cached(
            "UPDATE recipients
             SET status = 'queued', updated_at = ?2, next_attempt_at = coalesce(?3, next_attempt_at)
             WHERE status = 'delivering' AND (?1 IS NULL OR id = ?1)",
        )
        .map_err(QueueError::sqlite("cannot prepare requeue"))?;
    let error = || QueueError::sqlite("cannot requeue recipients");
    match ids {
        None => statement
            .execute(params![None::<i64>, now, retry_at])
            .map_err(error()),
        Some(ids) => {
            let mut count = 0;
            for id in ids {
                count += statement
                    .execute(params![id, now, retry_at])
                    .map_err(error())?;
            }
            Ok(count)
        }
    }
}

/// When the scheduler next has something to do.
pub fn next_due(conn: &Connection) -> Result<Option<SystemTime>, QueueError> {
    let next: Option<String> = conn
        .query_row(
            "SELECT min(next_attempt_at) FROM recipients WHERE status = 'queued'",
            [],
            |row| row.get(0),
        )
        .map_err(QueueError::sqlite("cannot read next due time"))?;
    Ok(next.as_deref().and_then(parse_sql_timestamp))
}

pub fn load_message(conn: &Connection, id: &str) -> Result<Option<StoredMessage>, QueueError> {
    conn.query_row(
        "SELECT id, sender, kind, received_at, eight_bit, smtputf8,
                delay_warning_sent_at IS NOT NULL, content
         FROM messages WHERE id = ?1",
        [id],
        |row| {
            let kind: String = row.get(2)?;
            let received: String = row.get(3)?;
            Ok(StoredMessage {
                id: row.get(0)?,
                sender: row.get(1)?,
                kind: kind_from(&kind),
                received_at: parse_sql_timestamp(&received).unwrap_or(SystemTime::UNIX_EPOCH),
                eight_bit: row.get(4)?,
                smtputf8: row.get(5)?,
                delay_warning_sent: row.get(6)?,
                content: row.get(7)?,
            })
        },
    )
    .optional()
    .map_err(QueueError::sqlite(format!("{id}: cannot load message")))
}

/// Makes waiting recipients due now (`queue retry`). `None`: every message.
pub fn retry_now(
    conn: &Connection,
    message_id: Option<&str>,
    now: &str,
) -> Result<usize, QueueError> {
    conn.execute(
        "UPDATE recipients SET next_attempt_at = ?1, updated_at = ?1
         WHERE status = 'queued' AND (?2 IS NULL OR message_id = ?2)",
        params![now, message_id],
    )
    .map_err(QueueError::sqlite("cannot schedule retry"))
}

/// Removes a message and all its recipients (`queue delete`).
pub fn delete_message(conn: &Connection, message_id: &str) -> Result<bool, QueueError> {
    conn.execute("DELETE FROM messages WHERE id = ?1", [message_id])
        .map(|n| n > 0)
        .map_err(QueueError::sqlite(format!("{message_id}: cannot delete")))
}

/// Waiting recipients of a message, for `queue bounce`.
pub fn waiting_recipients(
    conn: &Connection,
    message_id: &str,
) -> Result<Vec<ClaimedRecipient>, QueueError> {
    let mut statement = conn
        .prepare(
            "SELECT id, message_id, address, original_address, attempts FROM recipients
             WHERE message_id = ?1 AND status IN ('queued', 'delivering') ORDER BY id",
        )
        .map_err(QueueError::sqlite("cannot read recipients"))?;
    let rows = statement
        .query_map([message_id], claimed_from_row)
        .map_err(QueueError::sqlite("cannot read recipients"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(QueueError::sqlite("cannot read recipients"))
}

/// Operator bounce: the given recipients fail now with `reason`, and the
/// notices (if any) are queued, all in one transaction.
pub fn bounce_now(
    conn: &mut Connection,
    message_id: &str,
    recipients: &[ClaimedRecipient],
    reason: &str,
    notices: &[NewMessage],
) -> Result<(), QueueError> {
    let now = sql_timestamp(SystemTime::now());
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(QueueError::sqlite("cannot begin transaction"))?;
    {
        let mut update = tx
            .prepare(
                "UPDATE recipients SET status = 'bounced', last_reply = ?2, updated_at = ?3
                 WHERE id = ?1 AND status IN ('queued', 'delivering')",
            )
            .map_err(QueueError::sqlite("cannot prepare bounce"))?;
        for recipient in recipients {
            update
                .execute(params![recipient.id, reason, now])
                .map_err(QueueError::sqlite("cannot bounce recipient"))?;
        }
    }
    for notice in notices {
        insert_message(&tx, notice, &now)?;
    }
    remove_if_finished(&tx, message_id)?;
    tx.commit()
        .map_err(QueueError::sqlite("cannot commit bounce"))
}
