//! The queue side of delivery: claiming due recipients, recording attempt
//! outcomes (with any bounce or delay notice in the same transaction, so a
//! notice is never lost nor sent twice), crash recovery and the operator's
//! actions. Plain functions over a connection: the writer thread runs them
//! for the server, the CLI runs them directly.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};

use super::insert_message;
use super::{MessageKind, NewMessage};
use crate::config::Config;
use crate::envelope::Route;
use crate::protocol::address::Address;
use crate::protocol::dsn::{Notify, Ret};
use crate::routing;
use crate::store::StoreError;
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
    /// As stored when the message was accepted; never re-derived.
    pub route: Route,
    /// RFC 3461 NOTIFY as accepted (`None`: not given).
    pub notify: Option<Notify>,
    pub orcpt: Option<String>,
    /// The last attempt's reply and its RFC 3463 status, if any.
    pub last_reply: Option<String>,
    pub last_status: Option<String>,
}

impl ClaimedRecipient {
    /// What the sender asked to be told about this recipient.
    pub fn notify(&self) -> Notify {
        self.notify.unwrap_or(Notify::DEFAULT)
    }
}

/// The columns [`claimed_from_row`] reads, in order.
const CLAIMED_COLUMNS: &str = "id, message_id, address, original_address, attempts, route, \
     mailbox, domain, notify, orcpt, last_reply, last_status";

/// Rows whose stored route is complete; anything else (a corrupt row, a
/// recipient not routed yet) is left alone for the operator to see.
const ROUTED: &str = "CASE route WHEN 'local' THEN mailbox IS NOT NULL \
     WHEN 'mx' THEN domain IS NOT NULL WHEN 'smarthost' THEN 1 ELSE 0 END";

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
    /// Its RFC 3463 status code, e.g. "4.4.1".
    pub reply_status: String,
    /// host[ip]:port, or "local".
    pub relay: Option<String>,
}

/// Everything one delivery attempt changes, committed together.
#[derive(Debug)]
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
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    /// Octets of the whole message.
    pub size: u64,
    /// Its first octets (see [`load_message`]).
    pub head: Vec<u8>,
}

fn kind_from(text: &str) -> MessageKind {
    match text {
        "bounce" => MessageKind::Bounce,
        "delay_warning" => MessageKind::DelayWarning,
        _ => MessageKind::Normal,
    }
}

fn claimed_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ClaimedRecipient> {
    let kind: Option<String> = row.get(5)?;
    let mailbox: Option<String> = row.get(6)?;
    let domain: Option<String> = row.get(7)?;
    let route = match (kind.as_deref(), mailbox, domain) {
        (Some("local"), Some(mailbox), _) => Route::Local { mailbox },
        (Some("mx"), _, Some(domain)) => Route::Remote { domain },
        (Some("smarthost"), _, _) => Route::SmartHost,
        (kind, _, _) => {
            return Err(rusqlite::Error::InvalidColumnType(
                5,
                format!("route {kind:?} is incomplete"),
                rusqlite::types::Type::Text,
            ));
        }
    };
    let notify: Option<String> = row.get(8)?;
    Ok(ClaimedRecipient {
        id: row.get(0)?,
        message_id: row.get(1)?,
        address: row.get(2)?,
        original: row.get(3)?,
        attempts: row.get(4)?,
        route,
        notify: notify.and_then(|n| Notify::parse(&n).ok()),
        orcpt: row.get(9)?,
        last_reply: row.get(10)?,
        last_status: row.get(11)?,
    })
}

/// How much one claim may take.
#[derive(Debug, Clone)]
pub struct ClaimLimits {
    /// Due recipient rows read, at most (the walk's length).
    pub rows: usize,
    /// Jobs (one message to one destination) a destination may take now;
    /// 0 passes it over (its window is full).
    pub room: Vec<(String, usize)>,
    /// Room of destinations not listed.
    pub default_room: usize,
    /// Claim only for these destinations, each read from its own part of
    /// the destination index: O(room · log n) whatever else is due. Empty:
    /// walk the due rows of every destination, earliest first.
    pub only: Vec<String>,
}

impl ClaimLimits {
    /// Up to `rows` rows, no destination limited.
    pub fn rows(rows: usize) -> ClaimLimits {
        ClaimLimits {
            rows,
            room: Vec::new(),
            default_room: usize::MAX,
            only: Vec::new(),
        }
    }

    /// ... passing over these destinations.
    pub fn skipping(mut self, destinations: &[&str]) -> ClaimLimits {
        self.room
            .extend(destinations.iter().map(|d| (d.to_string(), 0)));
        self
    }

    fn room_of(&self, destination: &str) -> usize {
        self.room
            .iter()
            .find(|(d, _)| d == destination)
            .map_or(self.default_room, |(_, room)| *room)
    }
}

/// What a claim took, and which destinations it stopped short for.
#[derive(Debug, Default)]
pub struct Claimed {
    pub recipients: Vec<ClaimedRecipient>,
    /// Destinations whose room was filled: more of theirs may be due.
    pub filled: Vec<String>,
    /// Due rows read; `rows` when the walk stopped at its limit.
    pub walked: usize,
}

/// Takes the recipients due longest, at most `limits.rows`, leaving out
/// the destinations without room (those already at their concurrency
/// limit) and taking at most its room of messages for each other one;
/// every due recipient of a taken message at the same destination comes
/// along, so one message's recipients at one domain share one job. Marks
/// them as being delivered and returns them.
///
/// The cost is O(rows · log n) plus the due rows of passed-over
/// destinations: the earliest due rows are read in index order and the
/// walk stops at `rows`; the taken messages' recipients are found through
/// the message index. Nothing scans the queue
/// (`tests::claim_uses_indexes_only` checks the plans). Choosing per
/// destination in Rust, in the same transaction, rather than claiming
/// and putting back, keeps a busy destination's surplus from being
/// written twice.
pub fn claim_due(
    conn: &Connection,
    now: &str,
    limits: &ClaimLimits,
) -> Result<Claimed, StoreError> {
    let skip: Vec<String> = limits
        .room
        .iter()
        .filter(|(_, room)| *room == 0)
        .map(|(destination, _)| destination.clone())
        .collect();
    let skip = json_array(&skip);
    let (due, mut filled) = due_rows(conn, now, limits, &skip)?;
    let (messages, walked) = choose_messages(due, limits, &mut filled);
    if messages.is_empty() {
        return Ok(Claimed {
            recipients: Vec::new(),
            filled,
            walked,
        });
    }
    let mut claim = conn
        .prepare_cached(&claim_sql())
        .map_err(StoreError::sqlite("cannot prepare claim"))?;
    let rows = claim
        .query_map(params![now, json_array(&messages), skip], claimed_from_row)
        .map_err(StoreError::sqlite("cannot claim recipients"))?;
    let mut recipients = rows
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(StoreError::sqlite("cannot claim recipients"))?;
    recipients.sort_by_key(|r| r.id);
    Ok(Claimed {
        recipients,
        filled,
        walked,
    })
}

/// A recipient due: its message's id and its destination key.
type DueRow = (String, String);

/// (message, destination) rows due, earliest first, of the destinations
/// `limits` asks for, and the destinations whose reading stopped at their
/// limit (more may be due).
fn due_rows(
    conn: &Connection,
    now: &str,
    limits: &ClaimLimits,
    skip: &str,
) -> Result<(Vec<DueRow>, Vec<String>), StoreError> {
    let read_due = |sql: String, key: &str, limit: usize| -> Result<Vec<DueRow>, StoreError> {
        let mut statement = conn
            .prepare_cached(&sql)
            .map_err(StoreError::sqlite("cannot prepare claim"))?;
        let rows = statement
            .query_map(params![now, limit as i64, key], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(StoreError::sqlite("cannot read due recipients"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(StoreError::sqlite("cannot read due recipients"))
    };
    if limits.only.is_empty() {
        return Ok((read_due(due_walk_sql(), skip, limits.rows)?, Vec::new()));
    }
    let mut due = Vec::new();
    let mut filled = Vec::new();
    for destination in &limits.only {
        // A refill reads no further than the destination can take: its
        // room, and one row more to tell whether anything is left (a
        // window's worth of room against a budget of rows, the rest was
        // read for nothing).
        let limit = limits
            .room_of(destination)
            .saturating_add(1)
            .min(limits.rows);
        let rows = read_due(destination_due_sql(), destination, limit)?;
        if rows.len() == limit {
            // Stopped at the limit: more may be due, even if the rows
            // were fewer messages than the room.
            filled.push(destination.clone());
        }
        due.extend(rows);
    }
    Ok((due, filled))
}

/// The messages to claim from the due rows, in order, each destination
/// taking no more than its room; a destination that had more adds itself
/// to `filled`. Also returns how many rows were walked.
fn choose_messages(
    due: Vec<DueRow>,
    limits: &ClaimLimits,
    filled: &mut Vec<String>,
) -> (Vec<String>, usize) {
    let mut taken: HashMap<String, HashSet<String>> = HashMap::new();
    let mut messages: Vec<String> = Vec::new();
    let mut chosen: HashSet<String> = HashSet::new();
    let mut walked = 0;
    for (message_id, destination) in due {
        walked += 1;
        let room = limits.room_of(&destination);
        let jobs = taken.entry(destination.clone()).or_default();
        if jobs.contains(&message_id) {
            continue;
        }
        if jobs.len() >= room {
            if !filled.contains(&destination) {
                filled.push(destination);
            }
            continue;
        }
        jobs.insert(message_id.clone());
        if chosen.insert(message_id.clone()) {
            messages.push(message_id);
        }
    }
    (messages, walked)
}

/// The due rows, earliest first, of destinations not passed over.
fn due_walk_sql() -> String {
    format!(
        "SELECT message_id, destination FROM recipients INDEXED BY recipients_due
         WHERE status = 'queued' AND next_attempt_at <= ?1 AND {ROUTED}
           AND destination NOT IN (SELECT value FROM json_each(?3))
         ORDER BY next_attempt_at LIMIT ?2"
    )
}

/// The due rows of one destination, earliest first.
fn destination_due_sql() -> String {
    format!(
        "SELECT message_id, destination FROM recipients INDEXED BY recipients_by_destination
         WHERE status = 'queued' AND destination = ?3 AND next_attempt_at <= ?1 AND {ROUTED}
         ORDER BY next_attempt_at LIMIT ?2"
    )
}

/// Every due recipient of the chosen messages, at destinations not passed over.
fn claim_sql() -> String {
    format!(
        "UPDATE recipients INDEXED BY recipients_by_message
         SET status = 'delivering', updated_at = ?1
         WHERE message_id IN (SELECT value FROM json_each(?2))
           AND status = 'queued' AND next_attempt_at <= ?1 AND {ROUTED}
           AND destination NOT IN (SELECT value FROM json_each(?3))
         RETURNING {CLAIMED_COLUMNS}"
    )
}

/// `["a","b"]`, for `json_each`: a list as one SQL parameter.
fn json_array(items: &[String]) -> String {
    let mut out = String::from("[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push(']');
    out
}

/// Applies one attempt's outcome. Updates only recipients still marked as
/// being delivered, so an operator's `queue delete` or `bounce` meanwhile wins.
pub fn record(conn: &Connection, report: &DeliveryReport, now: &str) -> Result<(), StoreError> {
    for notice in &report.notices {
        insert_message(conn, notice, now)?;
    }
    if remove_if_last(conn, report)? {
        return Ok(());
    }
    let mut update = conn
        .prepare_cached(
            "UPDATE recipients
             SET status = ?2, attempts = attempts + 1, last_attempt_at = ?3,
                 next_attempt_at = ?4, last_reply = ?5, relay = ?6, updated_at = ?3,
                 last_status = ?7
             WHERE id = ?1 AND status = 'delivering'",
        )
        .map_err(StoreError::sqlite("cannot prepare recipient update"))?;
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
                change.relay,
                change.reply_status
            ])
            .map_err(StoreError::sqlite(format!(
                "{}: cannot record attempt",
                report.message_id
            )))?;
    }
    if report.delay_warning_sent {
        conn.execute(
            "UPDATE messages SET delay_warning_sent_at = ?2 WHERE id = ?1",
            params![report.message_id, now],
        )
        .map_err(StoreError::sqlite("cannot mark delay warning"))?;
    }
    remove_if_finished(conn, &report.message_id)
}

/// The common end of a message: its one recipient in flight is done
/// (sent or bounced) and nobody else waits. The message goes at once,
/// without first rewriting that recipient's row and moving it in two
/// indexes only for the delete to undo it: 5 of the 24 B-tree changes a
/// one-recipient message costs from insert to removal. True if it went.
fn remove_if_last(conn: &Connection, report: &DeliveryReport) -> Result<bool, StoreError> {
    let [only] = report.updates.as_slice() else {
        return Ok(false);
    };
    if matches!(only.status, RecipientStatus::Deferred { .. }) {
        return Ok(false);
    }
    // A row no longer 'delivering' (put back by an operator meanwhile)
    // keeps the message, as the UPDATE below would leave that row alone.
    let removed = conn
        .prepare_cached(
            "DELETE FROM messages WHERE id = ?1 AND NOT EXISTS (
                 SELECT 1 FROM recipients WHERE message_id = ?1
                 AND status IN ('queued', 'delivering')
                 AND NOT (status = 'delivering' AND id = ?2))",
        )
        .and_then(|mut statement| statement.execute(params![report.message_id, only.recipient_id]))
        // Worded only on failure: this runs for every message relayed.
        .map_err(|error| {
            let context = format!("{}: cannot remove delivered message", report.message_id);
            StoreError::sqlite(context)(error)
        })?;
    Ok(removed > 0)
}

/// A message leaves the queue once no recipient is waiting.
fn remove_if_finished(conn: &Connection, message_id: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM messages WHERE id = ?1 AND NOT EXISTS (
             SELECT 1 FROM recipients WHERE message_id = ?1 AND status IN ('queued', 'delivering'))",
    )
    .and_then(|mut statement| statement.execute([message_id]))
    .map_err(StoreError::sqlite(format!("{message_id}: cannot remove finished message")))?;
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
) -> Result<usize, StoreError> {
    let mut statement = conn
        .prepare_cached(
            "UPDATE recipients
             SET status = 'queued', updated_at = ?2, next_attempt_at = coalesce(?3, next_attempt_at)
             WHERE status = 'delivering' AND (?1 IS NULL OR id = ?1)",
        )
        .map_err(StoreError::sqlite("cannot prepare requeue"))?;
    let error = || StoreError::sqlite("cannot requeue recipients");
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

/// Recipients one back-off moves at most: the ones due soonest. It runs
/// in the writer, so it must be short; the rest move at the next failed
/// probe (the destination's window is one by then).
pub const BACK_OFF_CHUNK: usize = 500;

/// Puts the waiting recipients for `destination` due soonest (before
/// `until`, at most [`BACK_OFF_CHUNK`]) back to `until`, through the
/// destination index; returns how many.
pub fn back_off(
    conn: &Connection,
    destination: &str,
    until: &str,
    now: &str,
) -> Result<usize, StoreError> {
    conn.prepare_cached(
        "UPDATE recipients SET next_attempt_at = ?2, updated_at = ?3
         WHERE id IN (SELECT id FROM recipients INDEXED BY recipients_by_destination
                      WHERE status = 'queued' AND destination = ?1 AND next_attempt_at < ?2
                      ORDER BY next_attempt_at LIMIT ?4)",
    )
    .and_then(|mut statement| {
        statement.execute(params![destination, until, now, BACK_OFF_CHUNK as i64])
    })
    .map_err(StoreError::sqlite(format!("cannot back off {destination}")))
}

/// When the scheduler next has something to do.
pub fn next_due(conn: &Connection) -> Result<Option<SystemTime>, StoreError> {
    let next: Option<String> = conn
        .query_row(
            "SELECT min(next_attempt_at) FROM recipients WHERE status = 'queued'",
            [],
            |row| row.get(0),
        )
        .map_err(StoreError::sqlite("cannot read next due time"))?;
    Ok(next.as_deref().and_then(parse_sql_timestamp))
}

/// A message's metadata and the first `head_limit` octets of its content
/// (enough for notices: headers, or all of a small message); the rest is
/// read in chunks when delivered ([`super::content::ContentReader`]).
pub fn load_message(
    conn: &Connection,
    id: &str,
    head_limit: usize,
) -> Result<Option<StoredMessage>, StoreError> {
    // A message that fits in the head (nearly all) comes with this query;
    // only bigger ones are read through a blob handle.
    let message = conn
        .prepare_cached(
            "SELECT m.id, m.sender, m.kind, m.received_at, m.eight_bit, m.smtputf8,
                    m.delay_warning_sent_at IS NOT NULL, m.size, m.dsn_ret, m.dsn_envid,
                    CASE WHEN m.size <= ?2
                         THEN (SELECT c.content FROM message_contents c WHERE c.id = m.content_id)
                    END
             FROM messages m WHERE m.id = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row(params![id, head_limit as i64], |row| {
                    let kind: String = row.get(2)?;
                    let received: String = row.get(3)?;
                    Ok(StoredMessage {
                        id: row.get(0)?,
                        sender: row.get(1)?,
                        kind: kind_from(&kind),
                        received_at: parse_sql_timestamp(&received)
                            .unwrap_or(SystemTime::UNIX_EPOCH),
                        eight_bit: row.get(4)?,
                        smtputf8: row.get(5)?,
                        delay_warning_sent: row.get(6)?,
                        size: row.get::<_, i64>(7)?.max(0) as u64,
                        ret: row
                            .get::<_, Option<String>>(8)?
                            .and_then(|r| Ret::parse(&r).ok()),
                        envid: row.get(9)?,
                        head: row.get::<_, Option<Vec<u8>>>(10)?.unwrap_or_default(),
                    })
                })
                .optional()
        })
        .map_err(StoreError::sqlite(format!("{id}: cannot load message")))?;
    let Some(mut message) = message else {
        return Ok(None);
    };
    if (message.head.len() as u64) < message.size.min(head_limit as u64) {
        message.head = super::content::head(conn, id, head_limit)?;
    }
    Ok(Some(message))
}

/// Makes a message's waiting recipients due now (`queue retry ID`); a
/// quarantined message stays held (`queue release` lets it go).
pub fn retry_now(conn: &Connection, message_id: &str, now: &str) -> Result<usize, StoreError> {
    conn.execute(
        "UPDATE recipients SET next_attempt_at = ?1, updated_at = ?1
         WHERE status = 'queued' AND message_id = ?2 AND next_attempt_at < ?3",
        params![now, message_id, super::HELD_UNTIL],
    )
    .map_err(StoreError::sqlite("cannot schedule retry"))
}

/// Lets a quarantined message go (`queue release ID`): its recipients are
/// due now. Returns how many; 0 when it was not held.
pub fn release(conn: &Connection, message_id: &str, now: &str) -> Result<usize, StoreError> {
    let released = conn
        .execute(
            "UPDATE recipients SET next_attempt_at = ?1, updated_at = ?1
             WHERE status = 'queued' AND message_id = ?2 AND next_attempt_at = ?3",
            params![now, message_id, super::HELD_UNTIL],
        )
        .map_err(StoreError::sqlite("cannot release the message"))?;
    conn.execute(
        "UPDATE messages SET quarantine = NULL WHERE id = ?1",
        [message_id],
    )
    .map_err(StoreError::sqlite("cannot release the message"))?;
    Ok(released)
}

/// Recipients `retry --all` makes due per transaction: each is short, so
/// the server's writer (and every inbound 250) waits milliseconds between
/// them, never the whole update.
pub const RETRY_CHUNK: usize = 5000;

/// `queue retry --all`: every waiting recipient due now, in transactions
/// of `chunk`, each through the due index. Returns how many are due now.
pub fn retry_all(conn: &Connection, now: &str, chunk: usize) -> Result<usize, StoreError> {
    let mut statement = conn
        .prepare(
            "UPDATE recipients SET next_attempt_at = ?1, updated_at = ?1
             WHERE id IN (SELECT id FROM recipients INDEXED BY recipients_due
                          WHERE status = 'queued' AND next_attempt_at > ?1
                            AND next_attempt_at < ?3 LIMIT ?2)",
        )
        .map_err(StoreError::sqlite("cannot schedule retry"))?;
    // Each round leaves fewer rows after `now`, so the loop ends.
    while statement
        .execute(params![now, chunk as i64, super::HELD_UNTIL])
        .map_err(StoreError::sqlite("cannot schedule retry"))?
        == chunk
    {}
    let due: i64 = conn
        .query_row(
            "SELECT count(*) FROM recipients WHERE status = 'queued' AND next_attempt_at <= ?1",
            [now],
            |row| row.get(0),
        )
        .map_err(StoreError::sqlite("cannot count due recipients"))?;
    Ok(usize::try_from(due).unwrap_or(0))
}

/// Removes a message and all its recipients (`queue delete`).
pub fn delete_message(conn: &Connection, message_id: &str) -> Result<bool, StoreError> {
    conn.execute("DELETE FROM messages WHERE id = ?1", [message_id])
        .map(|n| n > 0)
        .map_err(StoreError::sqlite(format!("{message_id}: cannot delete")))
}

/// Waiting recipients of a message, for `queue bounce`.
pub fn waiting_recipients(
    conn: &Connection,
    message_id: &str,
) -> Result<Vec<ClaimedRecipient>, StoreError> {
    let mut statement = conn
        .prepare(&format!(
            "SELECT {CLAIMED_COLUMNS} FROM recipients
             WHERE message_id = ?1 AND status IN ('queued', 'delivering') AND {ROUTED}
             ORDER BY id"
        ))
        .map_err(StoreError::sqlite("cannot read recipients"))?;
    let rows = statement
        .query_map([message_id], claimed_from_row)
        .map_err(StoreError::sqlite("cannot read recipients"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(StoreError::sqlite("cannot read recipients"))
}

/// Operator bounce: the given recipients fail now with `reason`, and the
/// notices (if any) are queued, all in one transaction.
pub fn bounce_now(
    conn: &mut Connection,
    message_id: &str,
    recipients: &[ClaimedRecipient],
    reason: &str,
    notices: &[NewMessage],
) -> Result<(), StoreError> {
    let now = sql_timestamp(SystemTime::now());
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite("cannot begin transaction"))?;
    {
        let mut update = tx
            .prepare(
                "UPDATE recipients SET status = 'bounced', last_reply = ?2, updated_at = ?3
                 WHERE id = ?1 AND status IN ('queued', 'delivering')",
            )
            .map_err(StoreError::sqlite("cannot prepare bounce"))?;
        for recipient in recipients {
            update
                .execute(params![recipient.id, reason, now])
                .map_err(StoreError::sqlite("cannot bounce recipient"))?;
        }
    }
    for notice in notices {
        insert_message(&tx, notice, &now)?;
    }
    remove_if_finished(&tx, message_id)?;
    tx.commit()
        .map_err(StoreError::sqlite("cannot commit bounce"))
}

/// What [`assign_routes`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    /// Recipients queued by petrel 0.1 (no stored route) that got one.
    pub routed: usize,
    /// Waiting recipients whose address cannot be parsed: left alone.
    pub unroutable: Vec<i64>,
    /// Waiting remote recipients moved between MX and smart host delivery
    /// because `delivery.smarthost` was set or removed.
    pub rerouted: usize,
}

/// Run at start, before delivery: recipients queued by an older petrel get
/// the route [`routing::route_final`] gives their (final, already expanded)
/// address, which also repairs mixed-case local addresses stored by 0.1;
/// waiting remote recipients follow the current smart host setting. Local
/// routes are never changed: the mailbox was decided at acceptance.
pub fn assign_routes(conn: &mut Connection, config: &Config) -> Result<RouteChanges, StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite("cannot begin transaction"))?;
    let mut changes = RouteChanges::default();
    let legacy: Vec<(i64, String)> = {
        let mut statement = tx
            .prepare("SELECT id, address FROM recipients WHERE route IS NULL AND status IN ('queued', 'delivering')")
            .map_err(StoreError::sqlite("cannot read unrouted recipients"))?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(StoreError::sqlite("cannot read unrouted recipients"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(StoreError::sqlite("cannot read unrouted recipients"))?
    };
    {
        let mut update = tx
            .prepare(
                "UPDATE recipients SET route = ?2, mailbox = ?3, domain = ?4, address = ?5,
                     original_address = CASE WHEN address != ?5
                         THEN coalesce(original_address, address) ELSE original_address END
                 WHERE id = ?1",
            )
            .map_err(StoreError::sqlite("cannot prepare route update"))?;
        for (id, text) in legacy {
            let Ok(address) = Address::parse(&text) else {
                changes.unroutable.push(id);
                continue;
            };
            let routed = routing::route_final(config, &address);
            let mailbox = match &routed.route {
                Route::Local { mailbox } => Some(mailbox.clone()),
                _ => None,
            };
            update
                .execute(params![
                    id,
                    routed.route.kind(),
                    mailbox,
                    routed.domain,
                    routed.address
                ])
                .map_err(StoreError::sqlite("cannot store a route"))?;
            changes.routed += 1;
        }
    }
    let (from, to) = match routing::remote_route(config, "") {
        Route::SmartHost => ("mx", "smarthost"),
        _ => ("smarthost", "mx"),
    };
    changes.rerouted = tx
        .execute(
            "UPDATE recipients SET route = ?2 WHERE route = ?1 AND status = 'queued'
               AND domain IS NOT NULL",
            params![from, to],
        )
        .map_err(StoreError::sqlite("cannot re-route remote recipients"))?;
    tx.commit()
        .map_err(StoreError::sqlite("cannot commit routes"))?;
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue with `messages` messages, each with one recipient per
    /// destination in `destinations`, due at `due`.
    fn fill(conn: &Connection, first: usize, messages: usize, destinations: &[&str], due: &str) {
        let mut message = conn
            .prepare(
                "INSERT INTO messages (id, received_at, sender, listener, size, content_id)
                 VALUES (?1, ?2, 'a@example.org', 'smtp', 1, 0)",
            )
            .unwrap();
        let mut recipient = conn
            .prepare(
                "INSERT INTO recipients (message_id, address, next_attempt_at, updated_at,
                                         route, mailbox, domain)
                 VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6)",
            )
            .unwrap();
        for n in first..first + messages {
            let id = format!("{n:016X}");
            message.execute(params![id, due]).unwrap();
            for destination in destinations {
                let (route, mailbox, domain) = match *destination {
                    "local" => ("local", Some("bob@example.test"), Some("example.test")),
                    "smarthost" => ("smarthost", None, Some("example.net")),
                    domain => ("mx", None, Some(domain)),
                };
                let address = format!("r{n}@{}", domain.unwrap_or("x"));
                recipient
                    .execute(params![id, address, due, route, mailbox, domain])
                    .unwrap();
            }
        }
    }

    fn queue() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_direct(dir.path()).unwrap();
        (dir, conn)
    }

    #[test]
    fn each_destination_takes_no_more_messages_than_its_room() {
        let row = |message: &str, destination: &str| (message.to_string(), destination.to_string());
        let due = vec![
            row("m1", "mx:a.test"),
            row("m1", "mx:b.test"),
            row("m2", "mx:a.test"),
            row("m2", "mx:a.test"),
            row("m3", "mx:a.test"),
            row("m4", "mx:b.test"),
        ];
        let mut limits = ClaimLimits::rows(100);
        limits.room = vec![("mx:a.test".into(), 2)];
        limits.default_room = 5;
        let mut filled = Vec::new();
        let (messages, walked) = choose_messages(due, &limits, &mut filled);
        // m3 waits: a.test's room of 2 went to m1 and m2 (one job each,
        // whatever their recipients); b.test had room for both of its.
        assert_eq!(messages, ["m1", "m2", "m4"]);
        assert_eq!(filled, ["mx:a.test"]);
        assert_eq!(walked, 6);
    }

    #[test]
    fn claims_are_not_recompiled_when_their_limit_changes() {
        let (_dir, conn) = queue();
        fill(&conn, 0, 20, &["busy.example"], "2026-01-01 00:00:00");
        let now = "2026-06-01 00:00:00";
        for sql in [destination_due_sql(), due_walk_sql()] {
            let mut statement = conn.prepare_cached(&sql).unwrap();
            for limit in [3i64, 5, 8] {
                let third = if sql.contains("json_each") {
                    "[]"
                } else {
                    "mx:busy.example"
                };
                let rows = statement
                    .query_map(params![now, limit, third], |_| Ok(()))
                    .unwrap()
                    .count();
                assert_eq!(rows as i64, limit);
            }
            assert_eq!(
                statement.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{sql}"
            );
        }
    }

    #[test]
    fn claim_uses_indexes_only() {
        let (_dir, conn) = queue();
        fill(
            &conn,
            0,
            200,
            &["dead.example", "local"],
            "2026-01-01 00:00:00",
        );
        conn.execute_batch("ANALYZE").unwrap();
        let plan_of = |sql: String, second: &dyn rusqlite::ToSql| {
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = explain
                .query_map(params!["2026-06-01 00:00:00", second, "[]"], |row| {
                    row.get(3)
                })
                .unwrap()
                .map(Result::unwrap)
                .collect();
            plan.join("\n")
        };
        let text = format!(
            "{}\n{}",
            plan_of(due_walk_sql(), &8),
            plan_of(claim_sql(), &"[\"0000000000000001\"]")
        );
        let refill = plan_of(destination_due_sql(), &8);
        assert!(
            refill.contains(
                "SEARCH recipients USING INDEX recipients_by_destination \
                 (status=? AND destination=? AND next_attempt_at<?)"
            ),
            "{refill}"
        );
        assert!(!refill.contains("TEMP B-TREE"), "no sort: {refill}");
        assert!(
            text.contains("SEARCH recipients USING INDEX recipients_by_message"),
            "{text}"
        );
        assert!(
            text.contains(
                "SEARCH recipients USING INDEX recipients_due (status=? AND next_attempt_at<?)"
            ),
            "{text}"
        );
        assert!(!text.contains("SCAN recipients"), "no full scan: {text}");
        assert!(!text.contains("TEMP B-TREE"), "no sort: {text}");
    }

    fn outcome(recipient_id: i64, status: RecipientStatus) -> RecipientUpdate {
        RecipientUpdate {
            recipient_id,
            status,
            reply: "250 2.0.0 Ok".into(),
            reply_status: "2.0.0".into(),
            relay: Some("sink[127.0.0.1]:25".into()),
        }
    }

    fn report(message_id: &str, updates: Vec<RecipientUpdate>) -> DeliveryReport {
        DeliveryReport {
            message_id: message_id.into(),
            updates,
            notices: Vec::new(),
            delay_warning_sent: false,
        }
    }

    fn statuses(conn: &Connection, message_id: &str) -> Vec<String> {
        let mut statement = conn
            .prepare("SELECT status FROM recipients WHERE message_id = ?1 ORDER BY id")
            .unwrap();
        statement
            .query_map([message_id], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn message_exists(conn: &Connection, message_id: &str) -> bool {
        conn.query_row(
            "SELECT count(*) FROM messages WHERE id = ?1",
            [message_id],
            |row| row.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    }

    const DUE: &str = "2026-01-01 00:00:00";
    const NOW: &str = "2026-06-01 00:00:00";

    #[test]
    fn a_message_leaves_with_its_last_recipient_and_not_before() {
        let (_dir, conn) = queue();
        fill(&conn, 0, 1, &["one.example"], DUE);
        fill(&conn, 1, 1, &["one.example", "two.example"], DUE);
        let claimed = claim_due(&conn, NOW, &ClaimLimits::rows(10))
            .unwrap()
            .recipients;
        let ids = |message: &str| -> Vec<i64> {
            claimed
                .iter()
                .filter(|r| r.message_id == message)
                .map(|r| r.id)
                .collect()
        };
        let (single, pair) = ("0000000000000000", "0000000000000001");

        record(
            &conn,
            &report(single, vec![outcome(ids(single)[0], RecipientStatus::Sent)]),
            NOW,
        )
        .unwrap();
        assert!(!message_exists(&conn, single));
        assert!(
            statuses(&conn, single).is_empty(),
            "its recipient went with it"
        );

        let [first, second] = ids(pair)[..] else {
            panic!("two recipients claimed: {claimed:?}");
        };
        record(
            &conn,
            &report(pair, vec![outcome(first, RecipientStatus::Sent)]),
            NOW,
        )
        .unwrap();
        assert!(
            message_exists(&conn, pair),
            "one recipient is still in flight"
        );
        assert_eq!(statuses(&conn, pair), vec!["sent", "delivering"]);
        record(
            &conn,
            &report(pair, vec![outcome(second, RecipientStatus::Bounced)]),
            NOW,
        )
        .unwrap();
        assert!(!message_exists(&conn, pair));
    }

    #[test]
    fn a_recipient_put_back_or_deferred_keeps_its_message() {
        let (_dir, conn) = queue();
        fill(&conn, 0, 2, &["one.example"], DUE);
        let claimed = claim_due(&conn, NOW, &ClaimLimits::rows(10))
            .unwrap()
            .recipients;
        let [requeued, deferred] = claimed.as_slice() else {
            panic!("two recipients claimed: {claimed:?}");
        };
        // An operator (or a restart) put it back before the worker's
        // report came in: the report must not remove a waiting message.
        requeue(&conn, Some(&[requeued.id]), NOW, None).unwrap();
        let sent = report(
            &requeued.message_id,
            vec![outcome(requeued.id, RecipientStatus::Sent)],
        );
        record(&conn, &sent, NOW).unwrap();
        assert!(message_exists(&conn, &requeued.message_id));
        assert_eq!(statuses(&conn, &requeued.message_id), vec!["queued"]);

        let later = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
        let retry = RecipientStatus::Deferred {
            next_attempt: later,
        };
        record(
            &conn,
            &report(&deferred.message_id, vec![outcome(deferred.id, retry)]),
            NOW,
        )
        .unwrap();
        assert!(message_exists(&conn, &deferred.message_id));
        assert_eq!(statuses(&conn, &deferred.message_id), vec!["queued"]);
        let next: String = conn
            .query_row(
                "SELECT next_attempt_at FROM recipients WHERE id = ?1",
                [deferred.id],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(next, sql_timestamp(later));
    }

    #[test]
    fn claims_whole_messages_oldest_first_and_skips_busy_destinations() {
        let (_dir, conn) = queue();
        fill(&conn, 0, 3, &["dead.example"], "2026-01-01 00:00:00");
        fill(
            &conn,
            3,
            3,
            &["good.example", "local"],
            "2026-01-02 00:00:00",
        );
        fill(&conn, 6, 1, &["good.example"], "2030-01-01 00:00:00");
        let now = "2026-06-01 00:00:00";

        let first = claim_due(&conn, now, &ClaimLimits::rows(2))
            .unwrap()
            .recipients;
        let messages: Vec<&str> = first.iter().map(|r| r.message_id.as_str()).collect();
        assert_eq!(messages, vec!["0000000000000000", "0000000000000001"]);

        // dead.example is at its limit: the next claim passes it over.
        let limits = ClaimLimits::rows(4).skipping(&["mx:dead.example"]);
        let second = claim_due(&conn, now, &limits).unwrap().recipients;
        let mut claimed: Vec<(String, String)> = second
            .iter()
            .map(|r| (r.message_id.clone(), r.route.key()))
            .collect();
        claimed.sort();
        assert_eq!(
            claimed,
            vec![
                ("0000000000000003".into(), "local".into()),
                ("0000000000000003".into(), "mx:good.example".into()),
                ("0000000000000004".into(), "local".into()),
                ("0000000000000004".into(), "mx:good.example".into()),
            ]
        );
        // Not due yet: never claimed.
        let rest = claim_due(&conn, now, &ClaimLimits::rows(100))
            .unwrap()
            .recipients;
        assert!(rest.iter().all(|r| r.message_id != "0000000000000006"));
        assert_eq!(rest.len(), 3, "{rest:?}");
    }

    #[test]
    fn a_claim_takes_each_destination_up_to_its_room_and_says_which_it_filled() {
        let (_dir, conn) = queue();
        // Ten messages for a busy domain come first, then three for another.
        fill(&conn, 0, 10, &["busy.example"], "2026-01-01 00:00:00");
        fill(&conn, 10, 3, &["other.example"], "2026-01-02 00:00:00");
        let now = "2026-06-01 00:00:00";
        let limits = ClaimLimits {
            rows: 100,
            room: vec![("mx:busy.example".into(), 4)],
            default_room: 8,
            only: Vec::new(),
        };
        let claimed = claim_due(&conn, now, &limits).unwrap();
        let count = |destination: &str| {
            claimed
                .recipients
                .iter()
                .filter(|r| r.route.key() == destination)
                .count()
        };
        assert_eq!(count("mx:busy.example"), 4);
        assert_eq!(count("mx:other.example"), 3);
        assert_eq!(claimed.filled, vec!["mx:busy.example".to_string()]);
        assert_eq!(claimed.walked, 13);
        // What was left over is still queued, untouched: not claimed and
        // put back.
        let (queued, updated): (i64, i64) = conn
            .query_row(
                "SELECT count(*), sum(updated_at != next_attempt_at) FROM recipients
                 WHERE status = 'queued'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((queued, updated), (6, 0));
    }

    #[test]
    fn a_refill_reads_only_its_destinations_rows() {
        let (_dir, conn) = queue();
        fill(&conn, 0, 50, &["dead.example"], "2026-01-01 00:00:00");
        fill(&conn, 50, 5, &["good.example"], "2026-01-02 00:00:00");
        let limits = ClaimLimits {
            only: vec!["mx:good.example".into()],
            room: vec![("mx:good.example".into(), 3)],
            ..ClaimLimits::rows(10)
        };
        let claimed = claim_due(&conn, "2026-06-01 00:00:00", &limits).unwrap();
        let messages: Vec<&str> = claimed
            .recipients
            .iter()
            .map(|r| r.message_id.as_str())
            .collect();
        assert_eq!(
            messages,
            vec!["0000000000000032", "0000000000000033", "0000000000000034"]
        );
        assert_eq!(claimed.filled, vec!["mx:good.example".to_string()]);
        // Its room and one row more, none of the fifty older ones of
        // dead.example, nor the budget of ten.
        assert_eq!(claimed.walked, 4);
    }

    #[test]
    fn a_refill_that_stops_at_its_limit_says_more_may_be_due() {
        let (_dir, conn) = queue();
        // Two recipients per message: four rows are only two messages.
        fill(
            &conn,
            0,
            5,
            &["two.example", "two.example"],
            "2026-01-01 00:00:00",
        );
        let limits = ClaimLimits {
            only: vec!["mx:two.example".into()],
            room: vec![("mx:two.example".into(), 3)],
            ..ClaimLimits::rows(100)
        };
        let claimed = claim_due(&conn, "2026-06-01 00:00:00", &limits).unwrap();
        let mut messages: Vec<&str> = claimed
            .recipients
            .iter()
            .map(|r| r.message_id.as_str())
            .collect();
        messages.dedup();
        assert_eq!(messages, vec!["0000000000000000", "0000000000000001"]);
        // Both recipients of each message come along.
        assert_eq!(claimed.recipients.len(), 4);
        assert_eq!(claimed.walked, 4);
        assert_eq!(claimed.filled, vec!["mx:two.example".to_string()]);

        // A destination read to its end is not reported.
        let rest = claim_due(&conn, "2026-06-01 00:00:00", &limits).unwrap();
        assert_eq!(rest.recipients.len(), 4);
        let last = claim_due(&conn, "2026-06-01 00:00:00", &limits).unwrap();
        assert_eq!(last.recipients.len(), 2);
        assert!(last.filled.is_empty(), "{:?}", last.filled);
    }

    #[test]
    fn the_stored_destination_is_the_one_rust_derives() {
        let (_dir, conn) = queue();
        fill(
            &conn,
            0,
            1,
            &["b.example", "local", "smarthost"],
            "2026-01-01 00:00:00",
        );
        let claimed = claim_due(&conn, "2026-06-01 00:00:00", &ClaimLimits::rows(10))
            .unwrap()
            .recipients;
        assert_eq!(claimed.len(), 3);
        for recipient in claimed {
            let stored: String = conn
                .query_row(
                    "SELECT destination FROM recipients WHERE id = ?1",
                    [recipient.id],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(stored, recipient.route.key());
        }
    }

    #[test]
    fn retry_all_goes_in_chunks_and_makes_everything_due() {
        let (_dir, conn) = queue();
        fill(&conn, 0, 10, &["a.example"], "2030-01-01 00:00:00");
        fill(&conn, 10, 2, &["a.example"], "2026-01-01 00:00:00");
        let now = "2026-06-01 00:00:00";
        assert_eq!(retry_all(&conn, now, 3).unwrap(), 12);
        let later: i64 = conn
            .query_row(
                "SELECT count(*) FROM recipients WHERE next_attempt_at > ?1",
                [now],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(later, 0);
        assert_eq!(retry_all(&conn, now, 3).unwrap(), 12, "idempotent");
    }

    #[test]
    fn skip_lists_are_json_whatever_the_name() {
        assert_eq!(json_array(&[]), "[]");
        assert_eq!(
            json_array(&["mx:a.example".into(), "x\"y\\z\n".into()]),
            r#"["mx:a.example","x\"y\\z\u000a"]"#
        );
    }
}
