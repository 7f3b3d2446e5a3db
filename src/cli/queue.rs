//! `petrel queue list|show|retry|delete|bounce`: look at the queue and act
//! on it, also while the server runs (the server is woken through its
//! control socket and notices at once).

use std::time::SystemTime;

use clap::Subcommand;
use rusqlite::Connection;

use super::{Failure, say};
use crate::config::Config;
use crate::delivery::dsn;
use crate::delivery::outcome::{self, Attempt, Stage};
use crate::printable::{escape, escape_lines};
use crate::queue::views::{MessageOrigin, RecipientState};
use crate::queue::{QueueId, delivery, views};
use crate::routing;
use crate::server::control;
use crate::timefmt::sql_timestamp;

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List waiting messages and where each recipient stands, a page at a time
    List {
        /// Messages per page
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this queue id (the last one of the previous page)
        #[arg(long)]
        after: Option<String>,
    },
    /// The queue's shape, as Postfix's qshape: waiting recipients per
    /// destination and age
    Summary,
    /// Show one message: envelope, recipients and headers
    Show { id: String },
    /// Make waiting recipients due now
    Retry {
        /// Queue id of one message
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every waiting message
        #[arg(long)]
        all: bool,
    },
    /// Remove a message without delivering it and without telling the sender
    Delete { id: String },
    /// Give up on a message now: its waiting recipients bounce to the sender
    Bounce { id: String },
    /// Let a message a content filter quarantined go on to delivery
    Release { id: String },
}

pub fn run(config: &Config, command: QueueCommand) -> Result<(), Failure> {
    run_as(config, command, "petrel queue")
}

/// [`run`], named `command` in what it tells a user without the rights
/// (`mailq`, `sendmail -q` run it too).
pub fn run_as(config: &Config, command: QueueCommand, name: &str) -> Result<(), Failure> {
    let asked_by = super::as_server_user(config, name)?;
    let mut conn = crate::store::open_direct(&config.data_dir).map_err(runtime)?;
    match command {
        QueueCommand::List { limit, after } => {
            let after = match after {
                Some(after) => parse_id(&after)?.to_string(),
                None => String::new(),
            };
            list(&conn, &after, limit.max(1))
        }
        QueueCommand::Summary => summary(&conn),
        QueueCommand::Show { id } => show(&conn, &parse_id(&id)?),
        QueueCommand::Retry { id, all } => {
            let id = match (id, all) {
                (Some(id), false) => Some(parse_id(&id)?),
                _ => None,
            };
            let now = sql_timestamp(SystemTime::now());
            let count = match &id {
                Some(id) => delivery::retry_now(&conn, id.as_str(), &now),
                None => delivery::retry_all(&conn, &now, delivery::RETRY_CHUNK),
            }
            .map_err(runtime)?;
            if let Some(id) = &id
                && count == 0
            {
                return Err(Failure::Runtime(format!(
                    "{id}: no waiting recipients (not in the queue?)"
                )));
            }
            let what = match &id {
                Some(id) => format!("{id}: retry now, by the operator"),
                None => format!("{count} recipients: retry now, by the operator"),
            };
            log_action(config, &what, asked_by);
            say!("{count} recipients due now{}", wake(config));
            Ok(())
        }
        QueueCommand::Delete { id } => {
            let id = parse_id(&id)?;
            if !delivery::delete_message(&conn, id.as_str()).map_err(runtime)? {
                return Err(Failure::Runtime(format!("{id}: not in the queue")));
            }
            log_action(config, &format!("{id}: deleted by the operator"), asked_by);
            say!("{id}: deleted");
            Ok(())
        }
        QueueCommand::Bounce { id } => bounce(config, &mut conn, &parse_id(&id)?, asked_by),
        QueueCommand::Release { id } => {
            let id = parse_id(&id)?;
            let now = sql_timestamp(SystemTime::now());
            let count = delivery::release(&conn, id.as_str(), &now).map_err(runtime)?;
            if count == 0 {
                return Err(Failure::Runtime(format!(
                    "{id}: not in quarantine (see `petrel queue list`)"
                )));
            }
            log_action(
                config,
                &format!("{id}: released from quarantine by the operator"),
                asked_by,
            );
            say!("{id}: released; {count} recipients due now{}", wake(config));
            Ok(())
        }
    }
}

fn runtime(error: impl std::fmt::Display) -> Failure {
    Failure::Runtime(error.to_string())
}

fn parse_id(text: &str) -> Result<QueueId, Failure> {
    QueueId::parse(text).ok_or_else(|| {
        Failure::Usage(format!(
            "{text:?} is not a queue id (16 hex digits, as `petrel queue list` shows)"
        ))
    })
}

fn wake(config: &Config) -> &'static str {
    if control::poke(&config.data_dir) {
        " (the running server was told)"
    } else {
        " (no running server was reached; it will see this when it starts)"
    }
}

/// Operator actions go to the running server's log (through its control
/// socket, so they sit beside what the server did) and to stderr.
/// `asked_by`: the uid that ran the command (root, usually), not the
/// server's user it became.
fn log_action(config: &Config, what: &str, asked_by: u32) {
    control::notify(
        &config.data_dir,
        &format!("{what} (petrel queue, uid={asked_by})"),
    );
    eprintln!("petrel: {what}");
}

fn list(conn: &Connection, after: &str, limit: usize) -> Result<(), Failure> {
    let page = views::list_page(conn, after, limit).map_err(runtime)?;
    let (messages, recipients) = views::totals(conn).map_err(runtime)?;
    let now = SystemTime::now();
    let mut current = "";
    let mut shown = 0;
    for row in &page {
        if row.message_id != current {
            if shown == 0 {
                say!(
                    "{:<16}  {:>9}  {:<19}  SENDER",
                    "QUEUE ID",
                    "SIZE",
                    "RECEIVED"
                );
            }
            say!(
                "{}  {:>9}  {}  <{}>",
                row.message_id,
                row.size,
                row.received_at,
                escape(&row.sender)
            );
            current = &row.message_id;
            shown += 1;
        }
        let reply = row
            .last_reply
            .as_deref()
            .map(|r| format!("; last reply: {}", escape(r)))
            .unwrap_or_default();
        say!(
            "    <{}>  {}, {} attempts, {}{reply}",
            escape(&row.address),
            row.status,
            row.attempts,
            row.waiting(now)
        );
    }
    if messages == 0 {
        say!("the queue is empty");
        return Ok(());
    }
    say!("{messages} messages, {recipients} recipients waiting");
    if shown == limit {
        say!("more: petrel queue list --after {current}");
    }
    Ok(())
}

fn summary(conn: &Connection) -> Result<(), Failure> {
    let rows = views::shape(conn, SystemTime::now()).map_err(runtime)?;
    if rows.is_empty() {
        say!("the queue is empty");
        return Ok(());
    }
    let mut header = format!("{:<32} {:>8}", "DESTINATION", "T");
    for upper in views::AGE_BUCKETS {
        header.push_str(&format!(" {:>6}", format!("{upper}m")));
    }
    header.push_str(&format!(" {:>6}", "older"));
    say!("{header}  (recipients waiting, by minutes since received)");
    let mut totals = vec![0i64; views::AGE_BUCKETS.len() + 2];
    for row in &rows {
        let mut line = format!("{:<32} {:>8}", escape(&row.destination), row.total);
        totals[0] += row.total;
        for (n, count) in row.by_age.iter().enumerate() {
            line.push_str(&format!(" {count:>6}"));
            totals[n + 1] += count;
        }
        say!("{line}");
    }
    let mut line = format!("{:<32} {:>8}", "TOTAL", totals[0]);
    for count in &totals[1..] {
        line.push_str(&format!(" {count:>6}"));
    }
    say!("{line}");
    Ok(())
}

fn show(conn: &Connection, id: &QueueId) -> Result<(), Failure> {
    let Some(message) =
        delivery::load_message(conn, id.as_str(), dsn::MAX_RETURNED_HEADERS).map_err(runtime)?
    else {
        return Err(Failure::Runtime(format!("{id}: not in the queue")));
    };
    let Some(origin) = views::origin(conn, id.as_str()).map_err(runtime)? else {
        return Err(Failure::Runtime(format!("{id}: not in the queue")));
    };
    let MessageOrigin {
        received,
        listener,
        client,
        helo,
        user,
        app_password,
        quarantine,
    } = origin;
    say!("queue id:  {id}");
    say!("received:  {received} UTC via {listener}");
    if let Some(client) = client {
        say!("client:    {}[{client}]", escape(&helo.unwrap_or_default()));
    }
    match (user, app_password) {
        (Some(user), Some(label)) => say!("auth user: {user} (app password {label})"),
        (Some(user), None) => say!("auth user: {user}"),
        _ => {}
    }
    if let Some(reason) = quarantine {
        say!(
            "held:      quarantined by a content filter ({}); `petrel queue release {id}` lets it go",
            escape(&reason)
        );
    }
    say!("sender:    <{}>", escape(&message.sender));
    say!("size:      {} octets", message.size);
    say!("kind:      {}", message.kind.as_str());
    let recipients = views::recipients_of(conn, id.as_str()).map_err(runtime)?;
    say!("recipients:");
    for recipient in recipients {
        let RecipientState {
            address,
            original,
            status,
            attempts,
            next,
            last,
            reply,
            relay,
        } = recipient;
        let original = original
            .map(|o| format!(" (sent to {})", escape(&o)))
            .unwrap_or_default();
        say!(
            "  <{}>{original}: {status}, {attempts} attempts",
            escape(&address)
        );
        if status == "queued" {
            say!("      next attempt: {next} UTC");
        }
        if let Some(last) = last {
            say!(
                "      last attempt: {last} UTC via {}",
                escape(&relay.unwrap_or_default())
            );
        }
        if let Some(reply) = reply {
            say!("      last reply:   {}", escape(&reply));
        }
    }
    say!("headers:");
    // Headers come from the network: control characters are escaped.
    let (headers, cut) = dsn::capped_headers(&message.head, dsn::MAX_RETURNED_HEADERS);
    for line in escape_lines(headers).lines() {
        say!("  {line}");
    }
    if cut {
        say!(
            "  ... (header section longer than {} KiB)",
            dsn::MAX_RETURNED_HEADERS / 1024
        );
    }
    Ok(())
}

fn bounce(
    config: &Config,
    conn: &mut Connection,
    id: &QueueId,
    asked_by: u32,
) -> Result<(), Failure> {
    let Some(message) =
        delivery::load_message(conn, id.as_str(), dsn::MAX_RETURNED_MESSAGE).map_err(runtime)?
    else {
        return Err(Failure::Runtime(format!("{id}: not in the queue")));
    };
    let waiting = delivery::waiting_recipients(conn, id.as_str()).map_err(runtime)?;
    if waiting.is_empty() {
        return Err(Failure::Runtime(format!("{id}: no waiting recipients")));
    }
    let reason = Attempt::local(
        outcome::CANCELLED_BY_OPERATOR,
        Stage::Routing,
        "Delivery cancelled by the mail administrator",
    );
    // The sender learns why delivery was failing, not only that it stopped.
    let problems: Vec<dsn::Problem> = waiting
        .iter()
        .filter(|r| r.notify().failure)
        .map(|r| dsn::Problem {
            address: r.address.clone(),
            original: dsn::original_recipient(r.orcpt.as_deref(), r.original.as_deref()),
            diagnostic: match &r.last_reply {
                Some(last) => format!("{last} (then cancelled by the mail administrator)"),
                None => reason.to_string(),
            },
            status: r
                .last_status
                .clone()
                .unwrap_or_else(|| reason.status.clone()),
            remote_mta: None,
            relayed: false,
        })
        .collect();
    let to = routing::notice_route(config, &*conn, &message.sender);
    let notice = dsn::notice(
        &config.hostname,
        &message,
        dsn::NoticeKind::Failed,
        &problems,
        to,
        SystemTime::now(),
        None,
    );
    delivery::bounce_now(
        conn,
        id.as_str(),
        &waiting,
        &reason.to_string(),
        notice.as_slice(),
    )
    .map_err(runtime)?;
    log_action(
        config,
        &format!(
            "{id}: bounced by the operator ({} recipients)",
            waiting.len()
        ),
        asked_by,
    );
    match &notice {
        Some(notice) => say!(
            "{id}: {} recipients bounced; notice {} queued to <{}>{}",
            waiting.len(),
            notice.id,
            message.sender,
            wake(config)
        ),
        None => say!(
            "{id}: {} recipients bounced; no notice (null sender, a notice itself, or NOTIFY)",
            waiting.len()
        ),
    }
    Ok(())
}
